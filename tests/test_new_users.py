"""Evaluation for many users and for new users who bring their own context: the context swap, true-preference
accuracy, unknown controversy, context limits and curves, the LoRe-style and oracle baselines, z's R^2."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from datasets import Dataset

from vpl_trl.baselines import PreferencePairs, fit_low_rank_reward, fit_oracle_reward
from vpl_trl.evaluation.diagnostics import latent_weight_r2
from vpl_trl.evaluation.metrics import (
    context_size_curve,
    limit_contexts,
    own_contexts,
    preference_metrics,
    swap_contexts,
    worst_fraction_mean,
)
from vpl_trl.scripts import train_reward


def pair(user: str, i: int) -> dict:
    return {"prompt": f"{user} asks {i}", "chosen": f" {user} good {i}", "rejected": f" {user} bad {i}"}


def new_users(n_users: int = 4, rows_each: int = 3, context_pairs: int = 6) -> Dataset:
    rows = []
    for u in range(n_users):
        user = f"new_{u}"
        context = [pair(user, 100 + i) for i in range(context_pairs)]
        rows += [{**pair(user, i), "user_id": user, "context": context, "true_margin": 1.0} for i in range(rows_each)]
    return Dataset.from_list(rows)


def pool(users=("user_a", "user_b"), pairs_each: int = 5) -> Dataset:
    return Dataset.from_list([{**pair(u, i), "user_id": u} for u in users for i in range(pairs_each)])


def context_owner(context: list[dict]) -> str:
    return context[0]["prompt"].split(" asks ")[0]


def test_context_swap_gives_new_users_another_users_context():
    data = new_users()
    swapped = swap_contexts(data, pool(), num_context=3, seed=0)
    assert swapped["user_id"] == data["user_id"]  # the examples keep their user
    owners = [context_owner(c) for c in swapped["context"]]
    assert all(owner != user for owner, user in zip(owners, data["user_id"]))
    assert {"user_a", "user_b"} & set(owners) and {f"new_{u}" for u in range(4)} & set(owners)
    for owner, context in zip(owners, swapped["context"]):  # a pool user's context has num_context pairs
        assert len(context) == (3 if owner.startswith("user_") else 6)
    assert swap_contexts(data, pool(), 3, seed=0)["context"] == swapped["context"]  # deterministic for a seed


def test_context_swap_works_without_a_pool_and_refuses_a_single_user():
    swapped = swap_contexts(new_users(n_users=2), None, num_context=3, seed=1)
    assert [context_owner(c) for c in swapped["context"]] == ["new_1"] * 3 + ["new_0"] * 3
    with pytest.raises(ValueError, match="at least two users"):
        swap_contexts(new_users(n_users=1), None, num_context=3, seed=0)


def test_unknown_controversy_is_neither_controversial_nor_agreed():
    predictions = {"reward_chosen": [1.0, 1.0, 0.0, 0.0], "reward_rejected": [0.0, 0.0, 1.0, 1.0],
                   "controversial": [True, False, None, None], "user_id": ["a", "a", "b", "b"]}
    metrics = preference_metrics(predictions)
    assert metrics["accuracy"] == 0.5
    assert metrics["controversial_accuracy"] == 1.0 and metrics["agreed_accuracy"] == 1.0
    assert metrics["controversy_unknown"] == 2
    all_unknown = preference_metrics({**predictions, "controversial": [None] * 4})
    assert all_unknown["controversial_accuracy"] is None and all_unknown["agreed_accuracy"] is None


def test_accuracy_against_the_true_preference_and_the_worst_users():
    # the model agrees with every label; user b's first label contradicts their true preference
    predictions = {"reward_chosen": [1.0] * 4, "reward_rejected": [0.0] * 4, "user_id": ["a", "a", "b", "b"],
                   "true_margin": [0.5, 2.0, -1.0, 0.3]}
    metrics = preference_metrics(predictions)
    assert metrics["accuracy"] == 1.0 and metrics["true_accuracy"] == 0.75
    assert metrics["true_accuracy_worst_decile"] == 0.5  # user b
    assert worst_fraction_mean([0.9, 0.2, 0.8, 0.7, 0.6, 0.5, 0.4, 0.95, 1.0, 0.3], 0.2) == pytest.approx(0.25)


def test_limit_contexts_keeps_a_prefix_or_one_draw_per_user():
    data = new_users()
    first = limit_contexts(data, 2)
    assert all(c == data[0]["context"][:2] for c in first["context"][:3])
    drawn = limit_contexts(data, 3, seed=7)
    for user in set(data["user_id"]):
        contexts = [c for c, u in zip(drawn["context"], drawn["user_id"]) if u == user]
        assert len(contexts[0]) == 3 and all(c == contexts[0] for c in contexts)  # one context per user
    assert limit_contexts(data, 3, seed=7)["context"] == drawn["context"]
    assert own_contexts(data)["new_0"] == data[0]["context"]


def test_context_curve_of_new_users_draws_from_their_own_pairs():
    data = new_users()
    seen = []

    def predict(dataset, name):
        seen.append(dataset)
        # a "model" that is right exactly when the context has at least 3 pairs
        right = [len(c) >= 3 for c in dataset["context"]]
        return {"reward_chosen": [1.0 if r else 0.0 for r in right], "reward_rejected": [0.5] * len(right),
                "user_id": dataset["user_id"], "true_margin": dataset["true_margin"]}

    curve = context_size_curve(predict, data, pool=None, context_sizes=[1, 2, 4], draws=2, seed=0)
    assert curve["k"] == [1, 2, 4]
    assert curve["accuracy"] == [[0.0, 0.0], [0.0, 0.0], [1.0, 1.0]]
    assert curve["true_accuracy"] == curve["accuracy"]
    for dataset in seen:  # every context comes from the user's own pairs
        assert all(context_owner(c) == u for c, u in zip(dataset["context"], dataset["user_id"]))


def linear_users(n_users: int, user_seed: int, dim: int = 16, rank: int = 3, pairs_each: int = 60):
    """Responses as random vectors and `rank` linear reward heads, the same for every call; each user (drawn from
    `user_seed`) weighs the heads with signed weights."""
    fixed = np.random.default_rng(1234)
    embeddings = torch.tensor(fixed.normal(size=(400, dim)), dtype=torch.float32)
    heads = torch.tensor(fixed.normal(size=(rank, dim)), dtype=torch.float32)
    rng = np.random.default_rng(user_seed)
    weights = torch.tensor(rng.normal(size=(n_users, rank)), dtype=torch.float32)
    a = torch.tensor(rng.integers(0, 400, size=n_users * pairs_each))
    b = torch.tensor(rng.integers(0, 400, size=n_users * pairs_each))
    user = torch.arange(n_users).repeat_interleave(pairs_each)
    utility = lambda idx, u: (embeddings[idx] @ heads.T * weights[u]).sum(-1)  # noqa: E731
    prefer_a = utility(a, user) > utility(b, user)
    pairs = PreferencePairs(torch.where(prefer_a, a, b), torch.where(prefer_a, b, a), user)
    return embeddings, pairs, weights, utility


def truly_right(margin_fn, embeddings, pairs, utility) -> float:
    with torch.no_grad():
        margins = margin_fn(pairs)
    truth = utility(pairs.chosen, pairs.user) - utility(pairs.rejected, pairs.user)
    return float(((margins > 0) == (truth > 0)).float().mean())


def test_lore_serves_a_new_user_from_their_pairs_better_than_one_pooled_reward():
    embeddings, train, _, _ = linear_users(40, user_seed=0)
    lore = fit_low_rank_reward(embeddings, train, num_users=40, rank=6, steps=1500, seed=0)
    _, new, _, utility = linear_users(10, user_seed=1)  # new users: other weights over the same heads
    new_users_pairs = PreferencePairs(new.chosen, new.rejected, new.user)
    right, pooled = [], []
    uniform = torch.full((6,), 1 / 6)
    for u in range(10):
        mine = (new_users_pairs.user == u).nonzero().squeeze(-1)
        context, held_out = mine[:20], mine[20:]
        weights = lore.fit_user(embeddings[new.chosen[context]], embeddings[new.rejected[context]])
        assert torch.isclose(weights.sum(), torch.tensor(1.0)) and (weights >= 0).all()  # on the simplex
        sub = PreferencePairs(new.chosen[held_out], new.rejected[held_out], new.user[held_out])
        for w, out in ((weights, right), (uniform, pooled)):
            out.append(truly_right(lambda p: lore(embeddings[p.chosen], w) - lore(embeddings[p.rejected], w),
                                   embeddings, sub, utility))
    assert np.mean(right) > 0.8 and np.mean(right) > np.mean(pooled) + 0.1


@pytest.mark.parametrize("decoder_type", ["bilinear", "mlp", "residual"])
def test_oracle_uses_the_true_weights(decoder_type):
    embeddings, pairs, weights, _ = linear_users(60, user_seed=2)
    oracle = fit_oracle_reward(embeddings, pairs, weights, hidden_dim=64, decoder_type=decoder_type, steps=1500)
    _, new, new_weights, new_utility = linear_users(20, user_seed=3)
    with_truth = truly_right(lambda p: oracle(embeddings[p.chosen], new_weights[p.user])
                             - oracle(embeddings[p.rejected], new_weights[p.user]), embeddings, new, new_utility)
    shuffled = new_weights[torch.randperm(20, generator=torch.Generator().manual_seed(0))]
    with_others = truly_right(lambda p: oracle(embeddings[p.chosen], shuffled[p.user])
                              - oracle(embeddings[p.rejected], shuffled[p.user]), embeddings, new, new_utility)
    assert with_truth > 0.8 and with_truth > with_others + 0.15
    with pytest.raises(ValueError, match="decoder_type"):
        fit_oracle_reward(embeddings, pairs, weights, decoder_type="attention", steps=1)


def test_z_r2_is_high_when_z_encodes_the_weights_and_not_otherwise():
    rng = np.random.default_rng(0)
    train_w, new_w = rng.normal(size=(200, 4)), rng.normal(size=(50, 4))
    mix = rng.normal(size=(4, 8))
    encode = lambda w: w @ mix + 0.05 * rng.normal(size=(len(w), 8))  # noqa: E731
    assert latent_weight_r2(encode(train_w), train_w, encode(new_w), new_w) > 0.95
    assert latent_weight_r2(rng.normal(size=(200, 8)), train_w, rng.normal(size=(50, 8)), new_w) < 0.1
    with pytest.raises(ValueError, match="matching"):
        latent_weight_r2(encode(train_w), train_w[:10], encode(new_w), new_w)


# ----- python -m vpl_trl.evaluate on a small simulated population --------------------------------------------


@pytest.fixture(scope="module")
def population_dir(tmp_path_factory):
    from vpl_trl.data.population import PopulationConfig, build_population

    folder = tmp_path_factory.mktemp("population")
    build_population(folder, PopulationConfig(train_users=24, new_users=6, pairs_per_user=12, test_pairs_per_user=4,
                                              context_pairs=8, new_test_pairs=6))
    return folder


@pytest.fixture(scope="module")
def population_vae(tiny_backbone, population_dir, tmp_path_factory):
    from vpl_trl import VPLRewardConfig, VPLRewardTrainer
    from vpl_trl.data import load_preference_splits

    folder = tmp_path_factory.mktemp("population-vae")
    args = VPLRewardConfig(
        output_dir=str(folder), model_type="vae", latent_dim=4, hidden_dim=16, num_train_epochs=1, learning_rate=1e-2,
        per_device_train_batch_size=32, report_to="none", save_strategy="no", pooling="mean", num_context="1-8",
        disable_tqdm=True, embedding_mode="frozen", encoder_type="difference", decoder_type="bilinear",
        train_context_draws=2,
    )
    trainer = VPLRewardTrainer(model=tiny_backbone, args=args,
                               train_dataset=load_preference_splits(population_dir)["train"])
    assert len(trainer.train_dataset) == 2 * 24 * 12  # one copy of the training pairs per context draw
    trainer.train()
    trainer.save_model(str(folder))
    return str(folder)


def test_evaluate_reports_new_users_of_a_population(population_vae, population_dir, tmp_path):
    from vpl_trl.evaluation.cli import main

    out = tmp_path / "eval"
    metrics = main(["--model", population_vae, "--dataset", str(population_dir), "--output_dir", str(out),
                    "--num_context", "4", "--context_draws", "2", "--active", "--active_queries", "2",
                    "--active_samples", "8", "--active_users", "1", "--active_candidates", "6"])
    assert 0.0 <= metrics["true_accuracy"] <= 1.0  # the training users' test pairs, against the truth
    new = metrics["new_users"]
    assert new["num_users"] == 6 and new["n_eval"] == 36 and new["num_context"] == 4
    assert {"accuracy", "true_accuracy", "true_accuracy_worst_decile", "worst_decile_accuracy"} <= set(new)
    assert new["true_accuracy_worst_decile"] <= new["true_accuracy"]
    assert set(new["context_swap"]) >= {"accuracy", "true_accuracy"}  # new users' contexts swap without a KeyError
    assert new["context_curve"]["k"] == [1, 2, 4, 8] and len(new["context_curve"]["true_accuracy"][0]) == 2
    assert -1.0 <= new["z_r2"] <= 1.0
    assert new["active_queries"]["queries"] == [0, 1, 2] and new["active_queries"]["num_simulated_users"] == 6
    report = (out / "report.md").read_text()
    assert "## New users" in report and "true preference" in report
    for name in ("new_users_accuracy_vs_context.png", "new_users_active_queries.png", "accuracy.png"):
        assert (out / name).read_bytes()[:4] == b"\x89PNG"


def test_new_user_active_queries_are_scored_against_the_true_preference(population_vae, population_dir, tmp_path):
    """Evaluation pairs are turned so that `chosen` is the truly preferred response: a user whose labels all
    contradict their true preference is still scored against the truth."""
    from vpl_trl import VPLRewardConfig, VPLRewardTrainer
    from vpl_trl.data import load_preference_splits
    from vpl_trl.evaluation.active_queries import simulate_new_user_queries
    from vpl_trl.models import VPLRewardModel

    splits = load_preference_splits(population_dir)
    trainer = VPLRewardTrainer(model=VPLRewardModel.from_pretrained(population_vae),
                               args=VPLRewardConfig(output_dir=str(tmp_path), report_to="none", disable_tqdm=True),
                               train_dataset=splits["train"])
    new = splits["new_users"]
    flipped = new.map(lambda r: {"chosen": r["rejected"], "rejected": r["chosen"], "true_margin": -r["true_margin"]})
    original = simulate_new_user_queries(trainer, new, num_queries=2, num_samples=8)
    mirrored = simulate_new_user_queries(trainer, flipped, num_queries=2, num_samples=8)
    assert original["random"]["accuracy"] == mirrored["random"]["accuracy"]
    assert original["num_candidates"] == 8


@pytest.mark.slow
def test_recipe_trains_on_a_population_and_evaluates_its_new_users(tiny_backbone, population_dir, tmp_path, capsys):
    """The final evaluation once crashed on users absent from the training pool (KeyError in the context swap)."""
    results = train_reward.main([
        "--model_name_or_path", tiny_backbone, "--dataset", str(population_dir), "--model_type", "vae",
        "--config", str(Path(__file__).resolve().parents[1] / "recipes" / "configs" / "population.yaml"),
        "--latent_dim", "4", "--hidden_dim", "16", "--max_steps", "3",
        "--train_context_draws", "2", "--output_dir", str(tmp_path / "run"),
    ])
    new = results["by_test_set"][f"{population_dir} (new users)"]
    assert new["n_eval"] == 36 and len(new["per_user"]) == 6 and "true_accuracy" in new
    assert "true_accuracy" in new["context_swap"]
    table = capsys.readouterr().out
    assert "worst 10% of users" in table and "true preference" in table  # 24 training users: no column each


def test_table_of_many_users_reports_the_worst_users():
    from vpl_trl.evaluation.metrics import format_table

    per_user = {f"u{i:02d}": i / 20 for i in range(20)}
    table = format_table({"vpl": {"accuracy": 0.5, "per_user": per_user, "true_accuracy": 0.6}})
    assert "user u00" not in table and "| vpl | 50.0% | 2.5% |" in table and "60.0%" in table
    two = format_table({"vpl": {"accuracy": 0.5, "per_user": {"a": 1.0, "b": 0.0}}})
    assert "user a" in two and "true preference" not in two
