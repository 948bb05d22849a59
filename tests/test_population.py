"""The simulated population: deterministic builds, ground-truth preferences, new-user splits, clear errors."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest

from vpl_trl.data import PreferenceDataError, read_jsonl
from vpl_trl.data.__main__ import main
from vpl_trl.data.population import (
    ATTRIBUTES,
    Population,
    PopulationConfig,
    build_population,
    load_pool,
    raw_attributes,
    true_utility,
    utility_from_weights,
)
from vpl_trl.data.population_pool import trim_to_sentence, write_pool

PROMPTS = ["How do I cook rice?", "Why is the sky blue?", "How can I sleep better?", "Name a good pet.",
           "How do I save money?", "Write a line about the sea."]
# answers that differ in enthusiasm, structure, hedging, numbers, questions and caution
PIECES = {
    "plain": "Here is an answer to your question.",
    "excited": "Wow, this is amazing! I love it! Great question!",
    "list": "\n1. First step.\n2. Second step.\n3. Third step.",
    "hedge": "Maybe it depends, perhaps it might work, I am not sure.",
    "facts": "About 70% of people use 2 cups and 15 minutes at 100 degrees.",
    "ask": "Could you tell me more about your situation?",
    "careful": "Please be careful and consult a professional to stay safe.",
}


def tiny_pool() -> list[dict]:
    rows = []
    combos = [("plain",), ("plain", "excited"), ("plain", "list"), ("hedge",), ("plain", "facts"), ("ask",),
              ("careful", "plain"), ("excited", "facts", "list"), ("hedge", "careful"), ("ask", "excited")]
    for prompt_id, prompt in enumerate(PROMPTS):
        for combo in combos:
            rows.append({"id": len(rows), "prompt_id": prompt_id, "prompt": prompt, "style": "+".join(combo),
                         "response": " ".join(PIECES[p] for p in combo)})
    return rows


SMALL = dict(train_users=12, new_users=6, pairs_per_user=12, test_pairs_per_user=4, context_pairs=8,
             new_test_pairs=4)


@pytest.fixture
def pool_file(tmp_path):
    path = tmp_path / "pool.jsonl.gz"
    write_pool(tiny_pool(), path)
    return path


def pair_key(row):
    return row["prompt"], frozenset((row["chosen"], row["rejected"]))


def test_attributes_score_what_they_name():
    names = list(ATTRIBUTES)
    plain, excited, listed, hedge, facts, ask, careful = raw_attributes(
        [PIECES[k] for k in ("plain", "excited", "list", "hedge", "facts", "ask", "careful")])
    col = {n: i for i, n in enumerate(names)}
    assert excited[col["enthusiasm"]] > plain[col["enthusiasm"]]
    assert listed[col["structure"]] > plain[col["structure"]]
    assert hedge[col["hedging"]] > plain[col["hedging"]]
    assert facts[col["specifics"]] > plain[col["specifics"]]
    assert ask[col["questions"]] > plain[col["questions"]]
    assert careful[col["caution"]] > plain[col["caution"]]
    assert len(names) >= 6


def test_builder_is_deterministic_for_a_seed(tmp_path, pool_file):
    files = ("train.jsonl", "test.jsonl", "new_users.jsonl", "users.json")
    build_population(tmp_path / "a", PopulationConfig(**SMALL, seed=3), pool=pool_file)
    build_population(tmp_path / "b", PopulationConfig(**SMALL, seed=3), pool=pool_file)
    build_population(tmp_path / "c", PopulationConfig(**SMALL, seed=4), pool=pool_file)
    for name in files:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert (tmp_path / "a" / "train.jsonl").read_bytes() != (tmp_path / "c" / "train.jsonl").read_bytes()


def test_a_user_who_weighs_one_attribute_prefers_more_of_it(tmp_path, pool_file):
    config = PopulationConfig(**SMALL, attributes=tuple(ATTRIBUTES), shared_weights={"enthusiasm": 3.0}, spread=0.1,
                              temperature=0.3, seed=0)
    build_population(tmp_path, config, pool=pool_file)
    column = list(ATTRIBUTES).index("enthusiasm")
    rows = [r for r in read_jsonl(tmp_path / "train.jsonl")]
    chosen, rejected = (raw_attributes([r[k] for r in rows])[:, column] for k in ("chosen", "rejected"))
    differ = chosen != rejected
    assert differ.sum() >= 50
    assert (chosen > rejected)[differ].mean() > 0.8
    population = Population.load(tmp_path / "users.json")
    assert population.weights("user_000")[population.attributes.index("enthusiasm")] > 2.5


def test_new_users_share_no_pair_and_no_id_with_training_users(tmp_path, pool_file):
    stats = build_population(tmp_path, PopulationConfig(**SMALL, seed=1), pool=pool_file)
    train, test, new = (read_jsonl(tmp_path / f"{s}.jsonl") for s in ("train", "test", "new_users"))
    assert stats["rows"] == {"train": 12 * 12, "test": 12 * 4, "new_users": 6 * 4}
    seen_users = {r["user_id"] for r in train + test}
    new_users = {r["user_id"] for r in new}
    assert len(seen_users) == 12 and len(new_users) == 6 and not seen_users & new_users
    seen_pairs = {pair_key(r) for r in train + test}
    for user in new_users:
        rows = [r for r in new if r["user_id"] == user]
        context = rows[0]["context"]
        assert len(context) == 8 and all(r["context"] == context for r in rows)
        context_pairs, test_pairs = {pair_key(p) for p in context}, {pair_key(r) for r in rows}
        assert len(context_pairs) == 8 and len(test_pairs) == 4
        assert not context_pairs & test_pairs
        assert not (context_pairs | test_pairs) & seen_pairs
    # a training user's test pairs are not among their own training pairs
    for user in seen_users:
        mine = {pair_key(r) for r in train if r["user_id"] == user}
        assert not mine & {pair_key(r) for r in test if r["user_id"] == user}


def test_true_utility_matches_the_written_margins(tmp_path, pool_file):
    build_population(tmp_path, PopulationConfig(**SMALL, seed=2), pool=pool_file)
    users = tmp_path / "users.json"
    for row in read_jsonl(tmp_path / "new_users.jsonl")[:5]:
        utilities = true_utility([row["chosen"], row["rejected"]], row["user_id"], users)
        assert utilities[0] - utilities[1] == pytest.approx(row["true_margin"], abs=1e-4)
        weights = Population.load(users).weights(row["user_id"])
        assert np.allclose(utility_from_weights([row["chosen"]], weights, users), utilities[:1])
    stats = json.loads(users.read_text())["settings"]["statistics"]
    assert 0.5 < stats["train"]["label_agreement"] <= 1.0


def test_malformed_users_file_and_wrong_weights_give_clear_errors(tmp_path, pool_file):
    build_population(tmp_path, PopulationConfig(**SMALL, seed=0), pool=pool_file)
    users = tmp_path / "users.json"
    n = len(PopulationConfig().attributes)
    with pytest.raises(ValueError, match=f"vector of {n} numbers.*got shape \\(3,\\)"):
        utility_from_weights(["Hello."], [1.0, 2.0, 3.0], users)
    with pytest.raises(KeyError, match="no user 'nobody'"):
        true_utility(["Hello."], "nobody", users)

    data = json.loads(users.read_text())
    data["users"]["user_001"]["weights"] = [1.0]
    users.write_text(json.dumps(data))
    with pytest.raises(PreferenceDataError, match=f"users.json: field `users.user_001.weights` must be a list of {n}"):
        Population.load(users)
    del data["attributes"]
    users.write_text(json.dumps(data))
    with pytest.raises(PreferenceDataError, match="users.json: field `attributes`"):
        Population.load(users)
    users.write_text("{not json")
    with pytest.raises(PreferenceDataError, match="users.json, line 1: not valid JSON"):
        Population.load(users)
    with pytest.raises(PreferenceDataError, match="no such users file"):
        Population.load(tmp_path / "missing.json")


def test_attribute_choice(tmp_path, pool_file):
    build_population(tmp_path, PopulationConfig(**SMALL, attributes=("hedging", "caution")), pool=pool_file)
    population = Population.load(tmp_path / "users.json")
    assert population.attributes == ["hedging", "caution"] and population.weights("new_000").shape == (2,)
    with pytest.raises(SystemExit, match="--attributes must name"):
        main(["population", "--output", str(tmp_path / "x"), "--attributes", "length,kindness"])


def test_cli_builds_and_refuses_to_overwrite(tmp_path, pool_file, capsys):
    args = ["population", "--output", str(tmp_path / "out"), "--pool", str(pool_file), "--train_users", "4",
            "--new-users", "2", "--pairs_per_user", "6", "--test_pairs_per_user", "2", "--context_pairs", "4",
            "--new_test_pairs", "2", "--temperature", "0.5", "--seed", "5", "--attributes", "hedging,caution",
            "--shared-weights", "caution=2"]
    main(args)
    assert "label agreement" in capsys.readouterr().out
    assert len(read_jsonl(tmp_path / "out" / "new_users.jsonl")) == 4
    assert Population.load(tmp_path / "out" / "users.json").attributes == ["hedging", "caution"]
    with pytest.raises(SystemExit, match="--overwrite"):
        main(args)
    with pytest.raises(SystemExit, match="response pool"):
        main(args[:3] + ["--pool", str(tmp_path / "none.jsonl.gz"), "--overwrite"])


def test_pool_too_small_is_reported(tmp_path, pool_file):
    with pytest.raises(PreferenceDataError, match="answer pairs to training users"):
        build_population(tmp_path, PopulationConfig(train_users=2, new_users=1, pairs_per_user=500), pool=pool_file)


def test_shipped_pool_is_varied_and_builds_a_population(tmp_path):
    rows = load_pool()
    assert len(rows) >= 600
    assert len({r["prompt"] for r in rows}) >= 40 and len({r["style"] for r in rows}) >= 8
    scores = raw_attributes([r["response"] for r in rows])
    assert (scores.std(axis=0) > 0).all()
    stats = build_population(tmp_path, PopulationConfig(train_users=5, new_users=3, seed=0))
    assert stats["rows"] == {"train": 5 * 32, "test": 5 * 8, "new_users": 3 * 64}
    assert len(read_jsonl(tmp_path / "new_users.jsonl")[0]["context"]) == 32


def test_trim_to_sentence():
    assert trim_to_sentence("One two three four. Five six se") == "One two three four."
    assert trim_to_sentence("Steps:\n1. Boil.\n2.") == "Steps:\n1. Boil."
    assert trim_to_sentence("No end here") == "No end here"


def test_pairs_are_two_answers_to_one_prompt(tmp_path, pool_file):
    build_population(tmp_path, PopulationConfig(**SMALL, seed=0), pool=pool_file)
    pool = {r["id"]: r for r in load_pool(pool_file)}
    for row in itertools.chain(*(read_jsonl(tmp_path / f"{s}.jsonl") for s in ("train", "test", "new_users"))):
        chosen, rejected = pool[row["chosen_id"]], pool[row["rejected_id"]]
        assert chosen["id"] != rejected["id"] and chosen["prompt"] == rejected["prompt"]
        assert row["prompt"] == f"Human: {chosen['prompt']}\n\nAssistant:"
        assert (" " + chosen["response"], " " + rejected["response"]) == (row["chosen"], row["rejected"])


def test_population_is_a_builtin_dataset_name(tmp_path, monkeypatch):
    import vpl_trl.data.population as population
    from vpl_trl.data.registry import load_named_dataset

    build = population.build_population
    monkeypatch.setattr(population, "build_population",
                        lambda folder: build(folder, PopulationConfig(train_users=3, new_users=2)))
    splits = load_named_dataset("population", data_dir=tmp_path)
    assert len(splits["train"]) == 3 * 32 and len(splits["test"]) == 3 * 8
    assert (tmp_path / "population" / "new_users.jsonl").exists()
