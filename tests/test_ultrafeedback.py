"""UltraFeedback P-2 / P-4 builders, on small fixtures in the upstream schemas."""

from __future__ import annotations

import json
import logging
import random
from collections import defaultdict
from pathlib import Path

import pytest

from vpl_trl.data import PreferenceDataError, read_jsonl, write_jsonl
from vpl_trl.data.__main__ import main
from vpl_trl.data.ultrafeedback import (
    ATTRIBUTES,
    LabelledPair,
    Pair,
    build_ultrafeedback,
    identifies,
    label_pair,
    sample_context,
)

# (helpfulness, honesty, instruction_following, truthfulness) of the binarized chosen, rejected response
PATTERNS = [
    ((5, 2, 4, 3), (2, 5, 3, 4)),  # helpfulness+instruction_following vs honesty+truthfulness
    ((5, 4, 2, 2), (3, 2, 4, 5)),  # helpfulness+honesty vs instruction_following+truthfulness
    ((4, 2, 2, 5), (2, 4, 4, 3)),  # helpfulness+truthfulness vs honesty+instruction_following
    ((5, 5, 5, 5), (1, 1, 1, 1)),  # everyone agrees
    ((5, 1, 1, 1), (1, 5, 5, 5)),  # helpfulness alone
]
N_REGULAR = 20
TIE_PROMPT = "Tie question?"  # ties on helpfulness and instruction_following


def _winners(first: tuple, second: tuple) -> dict[str, int]:
    return {user: 0 if a > b else 1 for user, a, b in zip(ATTRIBUTES, first, second)}


def completion(response: str, ratings: tuple, flat: bool = False) -> dict:
    annotations = {
        attribute: {"Rating": str(rating), "Rationale": "because"} for attribute, rating in zip(ATTRIBUTES, ratings)
    }
    if flat:
        return {"model": "m", "response": response, **annotations}
    return {"model": "m", "custom_system_prompt": "", "response": response, "annotations": annotations}


def binarized(prompt: str, chosen: str, rejected: str) -> dict:
    return {
        "source": "test",
        "prompt": prompt,
        "chosen": [{"role": "user", "content": prompt}, {"role": "assistant", "content": chosen}],
        "chosen-rating": 5.0,
        "rejected": [{"role": "user", "content": prompt}, {"role": "assistant", "content": rejected}],
        "rejected-rating": 1.0,
    }


def fixture_rows() -> tuple[list[dict], list[dict]]:
    """UltraFeedback rows and binarized rows: 20 regular pairs, a tie, an N/A, an empty response
    and one binarized pair with no UltraFeedback match."""
    uf, pairs = [], []
    for n in range(N_REGULAR):
        first, second = PATTERNS[n % len(PATTERNS)]
        prompt, a, b = f"Question {n}?", f"Answer A{n}.", f"Answer B{n}."
        uf.append({"source": "t", "instruction": prompt, "models": ["m"] * 3, "completions": [
            completion(f"Unused {n}.", (3, 3, 3, 3)), completion(b, second), completion(a, first, flat=n == 1)]})
        pairs.append(binarized(prompt, a + "\n", b))  # whitespace differences still match
    uf.append({"instruction": TIE_PROMPT, "completions": [
        completion("Tie A.", (4, 4, 3, 2)), completion("Tie B.", (4, 2, 3, 5))]})
    pairs.append(binarized(TIE_PROMPT, "Tie A.", "Tie B."))
    uf.append({"instruction": "NA question?", "completions": [
        completion("NA A.", (5, "N/A", 3, 2)), completion("NA B.", (4, 2, 3, 5))]})
    pairs.append(binarized("NA question?", "NA A.", "NA B."))
    uf.append({"instruction": "Empty question?", "completions": [
        completion("", (1, 1, 1, 1)), completion("Empty B.", (4, 2, 3, 5))]})
    pairs.append(binarized("Empty question?", "", "Empty B."))
    pairs.append(binarized("A question nobody asked?", "Answer A0.", "Answer B0."))
    return uf, pairs


@pytest.fixture
def sources(tmp_path: Path) -> tuple[Path, Path]:
    uf, pairs = fixture_rows()
    write_jsonl(uf, tmp_path / "uf" / "ultrafeedback.jsonl")
    write_jsonl(pairs, tmp_path / "binarized.jsonl")
    return tmp_path / "uf", tmp_path / "binarized.jsonl"


def build(variant: str, sources, output: Path, **options) -> dict:
    options = {"num_context": 2, "num_duplicates": 2, "survey_size": 100, **options}
    return build_ultrafeedback(variant, sources[0], sources[1], output, **options)


def rows_of(output: Path) -> dict[str, list[dict]]:
    return {split: read_jsonl(output / f"{split}.jsonl") for split in ("train", "test")}


def test_p4_join_labels_and_satisfied_users(sources, tmp_path):
    stats = build("p4", sources, tmp_path / "out", all_pairs=True)
    assert stats["skipped"] == {
        "with an N/A rating": 1, "with an empty response": 1, "with no UltraFeedback match": 1,
    }
    assert stats["joined"] == stats["kept"] == N_REGULAR + 1
    rows = [row for split in rows_of(tmp_path / "out").values() for row in split]
    by_pair = defaultdict(dict)
    for row in rows:
        by_pair[row["pair_id"]][row["user_id"]] = row
    assert set(by_pair) == set(range(N_REGULAR + 1))
    for n in range(N_REGULAR):
        first, second = PATTERNS[n % len(PATTERNS)]
        winners = _winners(first, second)
        users = by_pair[n]
        assert set(users) == set(ATTRIBUTES)
        for user, row in users.items():
            answers = (f"Answer A{n}.\n", f"Answer B{n}.")
            assert row["prompt"] == f"Question {n}?"
            assert (row["chosen"], row["rejected"]) == (answers[winners[user]], answers[1 - winners[user]])
            assert row["chosen_ratings"][user] > row["rejected_ratings"][user]
            assert row["satisfied_users"] == [u for u in ATTRIBUTES if winners[u] == winners[user]]
            assert row["controversial"] == (n % len(PATTERNS) != 3)
            assert row["tie"] is False
    tie_rows = by_pair[N_REGULAR]
    assert {user for user, row in tie_rows.items() if row["tie"]} == {"helpfulness", "instruction_following"}
    assert tie_rows["honesty"]["chosen"] == "Tie A." and tie_rows["truthfulness"]["chosen"] == "Tie B."


def test_tie_breaking_is_seeded():
    pair = Pair(7, "p", ("x", "y"), ({a: 3 for a in ATTRIBUTES}, {a: 3 for a in ATTRIBUTES}))
    assert label_pair(pair, ATTRIBUTES, seed=5) == label_pair(pair, ATTRIBUTES, seed=5)
    assert label_pair(pair, ATTRIBUTES, seed=5).ties == frozenset(ATTRIBUTES)
    outcomes = {label_pair(pair, ATTRIBUTES, seed).winners["honesty"] for seed in range(20)}
    assert outcomes == {0, 1}


def test_p2_users_ties_and_controversy(sources, tmp_path):
    stats = build("p2", sources, tmp_path / "out", num_duplicates=3)
    assert stats["skipped"]["tied on helpfulness or honesty"] == 1
    rows = rows_of(tmp_path / "out")
    assert {row["user_id"] for split in rows.values() for row in split} == {"helpfulness", "honesty"}
    for split, copies in (("train", 3), ("test", 1)):
        assert rows[split], split
        assert all(row["controversial"] and row["satisfied_users"] == [row["user_id"]] for row in rows[split])
        assert all(row["prompt"] != TIE_PROMPT for row in rows[split])
        pair_rows = defaultdict(list)
        for row in rows[split]:
            pair_rows[row["pair_id"]].append(row["user_id"])
        assert all(sorted(users) == ["helpfulness"] * copies + ["honesty"] * copies for users in pair_rows.values())
        assert stats[split]["user_blind_accuracy"] == 0.5
        assert all(len(row["context"]) == 2 for row in rows[split])
    # patterns 0, 2 and 4 set helpfulness against honesty
    assert stats["controversial_fraction"] == pytest.approx(12 / 20)


def test_p4_contexts_identify_their_user(sources, tmp_path):
    stats = build("p4", sources, tmp_path / "out", survey_size=12)
    pools = json.loads((tmp_path / "out" / "survey_pools.json").read_text())
    assert set(pools) == set(ATTRIBUTES) and all(len(pool) == 12 for pool in pools.values())
    rows = rows_of(tmp_path / "out")
    train_ids = {row["pair_id"] for row in rows["train"]}
    for user, pool in pools.items():
        assert {item["pair_id"] for item in pool} <= train_ids
        assert all(user in item["satisfied_users"] and len(item["satisfied_users"]) < 4 for item in pool)
    for split in ("train", "test"):
        assert len(rows[split]) == stats[split]["pairs"] * 4 * (2 if split == "train" else 1)
        for row in rows[split]:
            pool = {(p["prompt"], p["chosen"], p["rejected"]): p for p in pools[row["user_id"]]}
            context = [pool[(c["prompt"], c["chosen"], c["rejected"])] for c in row["context"]]
            assert len(context) == 2 and len({c["pair_id"] for c in context}) == 2
            assert row["pair_id"] not in {c["pair_id"] for c in context}
            assert set.intersection(*(set(c["satisfied_users"]) for c in context)) == {row["user_id"]}
    assert 0.5 <= stats["train"]["user_blind_accuracy"] < 1


def test_a_survey_short_of_controversial_pairs_is_a_warning(sources, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="vpl_trl"):
        build("p4", sources, tmp_path / "out", survey_size=100)
    warnings = [r for r in caplog.records if r.name == "vpl_trl.data.ultrafeedback" and r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "pairs for a survey of 100; the survey pools hold all of them" in warnings[0].getMessage()


def _labelled(pair_id: int, winners: dict[str, int]) -> LabelledPair:
    pair = Pair(pair_id, f"q{pair_id}", (f"a{pair_id}", f"b{pair_id}"), ({}, {}))
    return LabelledPair(pair, winners, frozenset())


def test_unique_identification_rule():
    hi_tr = _labelled(0, {"helpfulness": 0, "honesty": 1, "instruction_following": 1, "truthfulness": 0})
    hi_in = _labelled(1, {"helpfulness": 0, "honesty": 1, "instruction_following": 0, "truthfulness": 1})
    hi_ho = _labelled(2, {"helpfulness": 0, "honesty": 0, "instruction_following": 1, "truthfulness": 1})
    assert not identifies([hi_tr], "helpfulness") and identifies([hi_tr, hi_in], "helpfulness")
    context = sample_context([hi_tr, hi_in, hi_ho], "helpfulness", 99, (2, 2), random.Random(0))
    assert len(context) == 2 and all(c["chosen"].startswith("a") for c in context)
    # only the first and the last of these pairs together leave truthfulness alone
    tied_up = [
        _labelled(3, {"truthfulness": 0, "helpfulness": 0, "honesty": 1, "instruction_following": 1}),
        _labelled(4, {"truthfulness": 0, "helpfulness": 0, "honesty": 0, "instruction_following": 1}),
        _labelled(5, {"truthfulness": 0, "helpfulness": 1, "honesty": 0, "instruction_following": 0}),
    ]
    for seed in range(5):
        picked = sample_context(tied_up, "truthfulness", 99, (2, 2), random.Random(seed))
        assert {c["prompt"] for c in picked} == {"q3", "q5"}
    with pytest.raises(PreferenceDataError, match="no context can identify user 'helpfulness'"):
        sample_context([hi_tr, hi_in], "helpfulness", 1, (1, 1), random.Random(0))
    with pytest.raises(PreferenceDataError, match="fewer than num_context=3"):
        sample_context([hi_tr, hi_in, hi_ho], "helpfulness", 0, (3, 3), random.Random(0))


def test_splits_are_disjoint_by_pair(sources, tmp_path):
    stats = build("p4", sources, tmp_path / "out", all_pairs=True, test_fraction=0.25)
    rows = rows_of(tmp_path / "out")
    ids = {split: {row["pair_id"] for row in split_rows} for split, split_rows in rows.items()}
    prompts = {split: {row["prompt"] for row in split_rows} for split, split_rows in rows.items()}
    assert not ids["train"] & ids["test"] and not prompts["train"] & prompts["test"]
    assert len(ids["test"]) == round(0.25 * (N_REGULAR + 1))
    assert len(ids["train"] | ids["test"]) == stats["kept"]


def test_cli_is_deterministic_and_prints_statistics(sources, tmp_path, capsys, caplog):
    def run(output: str, seed: int) -> dict[str, bytes]:
        main(["uf-p4", "--ultrafeedback", str(sources[0]), "--binarized", str(sources[1]), "--output",
              str(tmp_path / output), "--seed", str(seed), "--num-context", "2", "--num_duplicates", "2"])
        return {name: (tmp_path / output / name).read_bytes()
                for name in ("train.jsonl", "test.jsonl", "survey_pools.json")}

    with caplog.at_level(logging.WARNING, logger="vpl_trl"):
        first = run("a", 0)
    out = capsys.readouterr().out
    assert "skipped 1 pair with no UltraFeedback match" in out and "best user-blind accuracy" in out
    assert any(r.levelno == logging.WARNING and "controversial training pairs for a survey" in r.getMessage()
               for r in caplog.records)
    assert "helpfulness" in out.split("train:")[1]
    assert run("b", 0) == first
    assert run("c", 1) != first


def test_cli_refuses_to_overwrite(sources, tmp_path):
    args = ["uf-p2", "--ultrafeedback", str(sources[0]), "--binarized", str(sources[1]),
            "--output", str(tmp_path / "out"), "--num_context", "2"]
    main(args)
    before = (tmp_path / "out" / "train.jsonl").read_bytes()
    (tmp_path / "out" / "train.jsonl").unlink()
    with pytest.raises(SystemExit, match="survey_pools.json; pass --overwrite"):
        main(args)
    assert not (tmp_path / "out" / "train.jsonl").exists()
    main(args + ["--overwrite"])
    assert (tmp_path / "out" / "train.jsonl").read_bytes() == before


def test_other_source_formats_give_the_same_rows(sources, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    from datasets import Dataset

    uf, pairs = fixture_rows()
    (tmp_path / "parquet").mkdir()
    pq.write_table(pa.Table.from_pylist(uf[:10]), tmp_path / "parquet" / "0.parquet")
    pq.write_table(pa.Table.from_pylist(uf[10:]), tmp_path / "parquet" / "1.parquet")
    Dataset.from_list(pairs).save_to_disk(str(tmp_path / "saved"))
    build("p4", sources, tmp_path / "jsonl")
    build("p4", (tmp_path / "parquet", tmp_path / "saved"), tmp_path / "other")
    assert rows_of(tmp_path / "other") == rows_of(tmp_path / "jsonl")
    (tmp_path / "array.json").write_text(json.dumps(uf))
    build("p4", (tmp_path / "array.json", sources[1]), tmp_path / "json")
    assert rows_of(tmp_path / "json") == rows_of(tmp_path / "jsonl")


def _run_expecting_error(tmp_path: Path, uf: list[dict], pairs: list[dict]) -> str:
    write_jsonl(uf, tmp_path / "bad_uf.jsonl")
    write_jsonl(pairs, tmp_path / "bad_pairs.jsonl")
    with pytest.raises(SystemExit) as error:
        main(["uf-p4", "--ultrafeedback", str(tmp_path / "bad_uf.jsonl"), "--binarized",
              str(tmp_path / "bad_pairs.jsonl"), "--output", str(tmp_path / "out")])
    return str(error.value)


def test_missing_column_is_a_clear_error(tmp_path):
    uf, pairs = fixture_rows()
    del uf[3]["instruction"]
    message = _run_expecting_error(tmp_path, uf, pairs)
    assert "bad_uf.jsonl, line 4: missing field `instruction`" in message
    uf, pairs = fixture_rows()
    del pairs[2]["rejected"]
    message = _run_expecting_error(tmp_path, uf, pairs)
    assert "bad_pairs.jsonl, line 3: field `rejected`" in message


def test_non_numeric_rating_is_a_clear_error(tmp_path):
    uf, pairs = fixture_rows()
    uf[2]["completions"][2]["annotations"]["truthfulness"]["Rating"] = "high"
    message = _run_expecting_error(tmp_path, uf, pairs)
    assert "bad_uf.jsonl, line 3, completions[2], `annotations.truthfulness.Rating`" in message
    assert "'high' is not a number or 'N/A'" in message


def test_missing_rating_and_missing_source_are_clear_errors(tmp_path):
    uf, pairs = fixture_rows()
    del uf[0]["completions"][1]["annotations"]["honesty"]
    assert "line 1, completions[1]: missing `annotations.honesty.Rating`" in _run_expecting_error(tmp_path, uf, pairs)
    with pytest.raises(PreferenceDataError, match="no such file or folder"):
        build_ultrafeedback("p2", tmp_path / "nowhere.jsonl", tmp_path / "bad_pairs.jsonl", tmp_path / "out")
