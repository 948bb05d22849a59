"""Our preference format, context sampling and the Pets generator."""

import json

import pytest
from datasets import Dataset

from vpl_trl.data import PreferenceDataError, attach_contexts, build_pets, load_preference_file, read_jsonl
from vpl_trl.data.context import parse_num_context
from vpl_trl.data.pets import KINDS, prefers, sentences


def write_lines(path, lines):
    path.write_text("\n".join(lines) + "\n")
    return path


def test_malformed_jsonl_line_names_file_and_line(tmp_path):
    path = write_lines(tmp_path / "bad.jsonl", ['{"chosen": "a", "rejected": "b", "user_id": "u"}', '{"chosen": "a", '])
    with pytest.raises(PreferenceDataError, match=r"bad\.jsonl, line 2: not valid JSON"):
        read_jsonl(path)


def test_missing_chosen_names_the_field(tmp_path):
    path = write_lines(
        tmp_path / "d.jsonl", ['{"chosen": "a", "rejected": "b", "user_id": "u"}', '{"rejected": "b", "user_id": "u"}']
    )
    with pytest.raises(PreferenceDataError, match=r"d\.jsonl, example 2: missing field `chosen`"):
        load_preference_file(path)


def test_missing_user_id_is_reported(tmp_path):
    path = write_lines(tmp_path / "d.jsonl", ['{"chosen": "a", "rejected": "b"}'])
    with pytest.raises(PreferenceDataError, match=r"d\.jsonl: missing field `user_id`.*model_type='base'"):
        load_preference_file(path)


@pytest.mark.parametrize(
    "context, message",
    [
        ("not a list", "must be a non-empty list"),
        ([], "got an empty list"),
        ([["a", "b"]], r"`context\[0\]` must be an object"),
        ([{"chosen": "a"}], r"`context\[0\]` has no valid `rejected`"),
    ],
)
def test_context_of_the_wrong_shape_is_rejected(tmp_path, context, message):
    row = {"chosen": "a", "rejected": "b", "user_id": "u", "context": context}
    path = write_lines(tmp_path / "c.jsonl", [json.dumps(row)])
    with pytest.raises(PreferenceDataError, match=message):
        load_preference_file(path)


def _pairs(users):
    return Dataset.from_list(
        [
            {"prompt": "p", "chosen": f"{u} good {i}", "rejected": f"{u} bad {i}", "user_id": u}
            for i, u in enumerate(users)
        ]
    )


def test_contexts_come_from_the_same_user_and_never_the_example_itself():
    data = _pairs(["a"] * 6 + ["b"] * 6)
    with_context = attach_contexts(data, 3, seed=0)
    for row in with_context:
        assert len(row["context"]) == 3
        for pair in row["context"]:
            assert pair["chosen"].startswith(row["user_id"])
            assert pair["chosen"] != row["chosen"]


def test_context_draws_are_deterministic_and_depend_on_the_seed():
    data = _pairs(["a"] * 10)
    first = attach_contexts(data, 4, seed=1)["context"]
    assert attach_contexts(data, 4, seed=1)["context"] == first
    assert attach_contexts(data, 4, seed=2)["context"] != first


def test_eval_contexts_are_drawn_from_the_training_pool():
    train = _pairs(["a"] * 5)
    test = Dataset.from_list([{"chosen": "new", "rejected": "other", "user_id": "a"}])
    context = attach_contexts(test, 2, seed=0, pool=train, name="test")[0]["context"]
    assert all(pair["chosen"] in set(train["chosen"]) for pair in context)


def test_context_size_range():
    data = _pairs(["a"] * 30)
    sizes = {len(c) for c in attach_contexts(data, "2-5", seed=0)["context"]}
    assert sizes <= {2, 3, 4, 5} and len(sizes) > 1
    assert parse_num_context("8") == (8, 8)
    with pytest.raises(ValueError, match="LOW <= HIGH"):
        parse_num_context("5-2")


def test_user_without_other_pairs_gets_a_clear_error():
    data = _pairs(["a", "a", "lonely"])
    with pytest.raises(PreferenceDataError, match="user 'lonely' has no other labelled pairs"):
        attach_contexts(data, 2, seed=0, name="train")


def test_pets_splits_use_disjoint_sentences_and_consistent_labels(tmp_path):
    for kind in KINDS:
        assert len(sentences(kind, "train")) == 80 and len(sentences(kind, "test")) == 20
        assert not set(sentences(kind, "train")) & set(sentences(kind, "test"))
    build_pets(tmp_path, n_train_per_user=200, n_test_per_user=50)
    train = read_jsonl(tmp_path / "train.jsonl")
    test = read_jsonl(tmp_path / "test.jsonl")
    assert len(train) == 400 and len(test) == 100
    assert not {r["chosen"] for r in train} & {r["chosen"] for r in test}
    for row in train:
        assert prefers(row["user_id"], row["chosen_kind"], row["rejected_kind"])
        assert row["controversial"] == ({row["chosen_kind"], row["rejected_kind"]} == {"dog", "cat"})
    controversial = [r for r in train if r["controversial"]]
    assert 0.35 < len(controversial) / len(train) < 0.65  # up-sampled from the natural 1/6
    # The users disagree on exactly the controversial pairs.
    assert {r["chosen_kind"] for r in controversial if r["user_id"] == "helpful"} == {"dog"}
    assert {r["chosen_kind"] for r in controversial if r["user_id"] == "harmless"} == {"cat"}


def test_pets_controversial_variant_and_cli_refuses_to_overwrite(tmp_path, capsys):
    from vpl_trl.data.__main__ import main

    main(["pets", "--variant", "controversial", "--output", str(tmp_path), "--n-train-per-user", "20"])
    rows = read_jsonl(tmp_path / "train.jsonl")
    assert len(rows) == 40 and all(r["controversial"] for r in rows)
    before = (tmp_path / "train.jsonl").read_bytes()
    with pytest.raises(SystemExit, match="--overwrite"):
        main(["pets", "--output", str(tmp_path)])
    assert (tmp_path / "train.jsonl").read_bytes() == before
