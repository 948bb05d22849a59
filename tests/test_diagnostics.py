"""Latent diagnostics and evaluation curves on constructed cases: the probe, the untrained-encoder reference,
the PCA map, per-user breakdowns and the shape of the accuracy-against-K curve."""

import zlib
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from datasets import Dataset

from vpl_trl.evaluation.diagnostics import (
    chance_accuracy,
    latent_diagnostics,
    linear_probe_accuracy,
    pca_2d,
    plot_accuracy,
    plot_context_curve,
    plot_latent_map,
    untrained_encoder,
)
from vpl_trl.evaluation.metrics import context_size_curve, default_context_sizes, per_user_breakdown
from vpl_trl.models import VPLConfig, VPLRewardModel
from vpl_trl.models.modeling_vpl import UserContextEncoder


def vpl_model(latent_dim: int = 16) -> VPLRewardModel:
    """A VPL model on a tiny Llama built from its configuration (fresh weights, nothing loaded)."""
    from transformers import LlamaConfig

    backbone = LlamaConfig(vocab_size=16, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                           num_attention_heads=2, num_key_value_heads=1)
    torch.manual_seed(0)
    config = VPLConfig(backbone_config=backbone, embedding_dim=8, latent_dim=latent_dim, hidden_dim=8)
    return VPLRewardModel(config).eval()


def users_and_latents(carries_user: bool, n: int = 200, dim: int = 16, seed: int = 0):
    rng = np.random.default_rng(seed)
    users = np.array(["a", "b"] * (n // 2))
    latents = rng.normal(size=(n, dim))
    if carries_user:
        latents[:, 3] += np.where(users == "a", 2.0, -2.0)  # one direction separates the users
    return latents, users


def test_probe_recovers_a_user_carried_by_the_latent():
    latents, users = users_and_latents(carries_user=True)
    assert linear_probe_accuracy(latents, users) >= 0.9


def test_probe_is_at_chance_when_the_latent_ignores_the_user():
    latents, users = users_and_latents(carries_user=False)
    assert chance_accuracy(users) == 0.5
    assert 0.35 <= linear_probe_accuracy(latents, users) <= 0.65


def test_probe_handles_several_users_and_is_deterministic():
    rng = np.random.default_rng(1)
    users = np.repeat(["a", "b", "c"], 40)
    centres = {"a": [3, 0], "b": [0, 3], "c": [-3, -3]}
    latents = np.array([centres[u] for u in users]) + rng.normal(size=(120, 2))
    first = linear_probe_accuracy(latents, users, folds=4, seed=3)
    assert first >= 0.9
    assert linear_probe_accuracy(latents, users, folds=4, seed=3) == first
    with pytest.raises(ValueError, match="two distinct labels"):
        linear_probe_accuracy(latents, ["a"] * 120)


def test_diagnostics_see_the_latent_as_the_decoder_does():
    model = vpl_model(latent_dim=4)
    chosen, rejected = torch.randn(3, 2, 8), torch.randn(3, 2, 8)
    with torch.no_grad():
        output = model(embeddings=torch.randn(6, 8), context_chosen=chosen, context_rejected=rejected)
    # In evaluation the decoder gets the posterior mean scaled to norm sqrt(latent_dim).
    torch.testing.assert_close(model.normalize_latent(output.latent_mean), output.latent)
    torch.testing.assert_close(output.latent.norm(dim=-1), torch.full((3,), 2.0))
    means, users = users_and_latents(carries_user=True)
    result = latent_diagnostics(vpl_model(), means, means, users.tolist())
    normalized = torch.tensor(means, dtype=torch.float32)
    normalized = (normalized / normalized.norm(dim=-1, keepdim=True) * 4).numpy()
    np.testing.assert_allclose(result["pca"]["trained"]["coords"], pca_2d(normalized)[0], atol=1e-4)
    model.config.normalize_latent = False
    assert torch.equal(model.normalize_latent(output.latent_mean), output.latent_mean)


def test_untrained_encoder_is_swapped_in_and_restored():
    config = SimpleNamespace(embedding_dim=6, hidden_dim=8, latent_dim=4)
    model = SimpleNamespace(config=config, encoder=UserContextEncoder(6, 8, 4))
    trained = model.encoder
    with untrained_encoder(model, seed=5) as swapped:
        fresh = swapped.encoder
        assert fresh is not trained
        assert not torch.equal(fresh.mean_head.weight, trained.mean_head.weight)
    assert model.encoder is trained
    with untrained_encoder(model, seed=5):
        assert torch.equal(model.encoder.mean_head.weight, fresh.mean_head.weight)  # the same seed, the same encoder


def test_latent_diagnostics_and_pca_map(tmp_path):
    trained, users = users_and_latents(carries_user=True)
    untrained, _ = users_and_latents(carries_user=False, seed=1)
    result = latent_diagnostics(vpl_model(), trained, untrained, users.tolist())
    assert result["probe"]["trained"] >= 0.9 and result["probe"]["untrained"] <= 0.65
    assert result["probe"]["chance"] == 0.5
    coords = np.asarray(result["pca"]["trained"]["coords"])
    assert coords.shape == (200, 2)
    # The first principal component is the direction that separates the users.
    assert abs(coords[users == "a", 0].mean() - coords[users == "b", 0].mean()) > 2
    plot_latent_map(result, tmp_path / "map.png", "constructed")
    assert (tmp_path / "map.png").stat().st_size > 10_000


def test_pca_of_a_line_explains_everything():
    x = np.outer(np.arange(10.0), [1.0, 2.0, 0.0])
    coords, explained = pca_2d(x)
    assert explained[0] == pytest.approx(1.0)
    assert np.allclose(coords[:, 1], 0, atol=1e-9)


def test_per_user_breakdown():
    predictions = {
        "reward_chosen": [1, 1, 0, 1, 0, 1],
        "reward_rejected": [0, 0, 1, 0, 1, 0],
        "user_id": ["a", "a", "a", "b", "b", "b"],
        "controversial": [True, False, True, True, True, False],
    }
    breakdown = per_user_breakdown(predictions)
    assert breakdown["a"] == {
        "accuracy": pytest.approx(2 / 3), "n": 3, "controversial_accuracy": 0.5, "agreed_accuracy": 1.0
    }
    assert breakdown["b"]["controversial_accuracy"] == 0.5 and breakdown["b"]["agreed_accuracy"] == 1.0


def constructed_pool(n_per_user: int = 40, controversial_every: int = 4) -> Dataset:
    """Two users; one pair in `controversial_every` is controversial (it reveals the user), the rest agreed."""
    rows = []
    for user in ("u1", "u2"):
        for i in range(n_per_user):
            contested = i % controversial_every == 0
            rows.append({"prompt": "", "chosen": f"{user}-{i}", "rejected": f"r-{i}", "user_id": user,
                         "controversial": contested})
    return Dataset.from_list(rows)


def test_default_context_sizes_stop_at_the_pool():
    assert default_context_sizes(constructed_pool(n_per_user=40)) == [1, 2, 4, 8, 16, 32]
    assert default_context_sizes(constructed_pool(n_per_user=12)) == [1, 2, 4, 8, 12]
    assert default_context_sizes(constructed_pool(n_per_user=40), max_context=8) == [1, 2, 4, 8]


def test_context_curve_rises_as_contexts_more_often_reveal_the_user():
    """A predictor that is right on controversial pairs only when the context holds a controversial pair of the
    user (a coin flip otherwise): its accuracy must follow 1 - (3/4)^K / 2 on controversial pairs."""
    pool = constructed_pool()
    revealing = {r["chosen"] for r in pool.to_list() if r["controversial"]}
    test = Dataset.from_list([{"prompt": "", "chosen": f"t{i}", "rejected": f"s{i}", "user_id": ("u1", "u2")[i % 2],
                               "controversial": True} for i in range(400)])

    def predict(dataset, name):
        rng = np.random.default_rng(zlib.crc32(name.encode()))
        knows = np.array([any(p["chosen"] in revealing for p in c) for c in dataset["context"]])
        correct = knows | (rng.random(len(knows)) < 0.5)
        return {"reward_chosen": correct.astype(float), "reward_rejected": np.zeros(len(knows)),
                "controversial": dataset["controversial"], "user_id": dataset["user_id"]}

    curve = context_size_curve(predict, test, pool, [1, 2, 4, 8, 16], draws=3, seed=0)
    assert curve["k"] == [1, 2, 4, 8, 16] and all(len(row) == 3 for row in curve["accuracy"])
    means = [float(np.mean(row)) for row in curve["controversial_accuracy"]]
    assert all(later >= earlier - 0.03 for earlier, later in zip(means, means[1:]))
    for k, mean in zip(curve["k"], means):
        assert mean == pytest.approx(1 - 0.75**k / 2, abs=0.06)
    assert means[-1] >= 0.98


def test_evaluation_plots_are_written(tmp_path):
    metrics = {"accuracy": 0.8, "controversial_accuracy": 0.6, "agreed_accuracy": 1.0}
    breakdown = {"a": {"accuracy": 0.8, "controversial_accuracy": 0.6, "agreed_accuracy": 1.0, "n": 10}}
    plot_accuracy(metrics, breakdown, tmp_path / "accuracy.png", "constructed")
    curve = {"k": [1, 2, 4], "draws": 2, "accuracy": [[0.6, 0.7], [0.8, 0.8], [0.9, 1.0]],
             "controversial_accuracy": [[0.5, 0.6], [0.7, 0.8], [0.9, 0.9]]}
    plot_context_curve(curve, tmp_path / "curve.png", "constructed", trained_k=2)
    for name in ("accuracy.png", "curve.png"):
        assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG"
