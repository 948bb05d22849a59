"""Personalization that never hurts: the residual decoder's pooled reward, the Bayesian context encoder's shrinkage,
context dropout, and the choice of settings on pseudo-new users (whole users held out)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from datasets import Dataset
from transformers import set_seed

from vpl_trl.data.format import PreferenceDataError
from vpl_trl.models import VPLConfig, VPLRewardModel
from vpl_trl.models.modeling_vpl import BayesianContextEncoder
from vpl_trl.scripts import train_reward
from vpl_trl.selection import SelectionArguments, split_pseudo_new_users

ROOT = Path(__file__).resolve().parents[1]


def users_dataset(n_users: int = 10, pairs_each: int = 6) -> Dataset:
    return Dataset.from_list([{"prompt": f"q{u}-{i}", "chosen": f" good {u} {i}", "rejected": f" bad {u} {i}",
                               "user_id": f"u{u}"} for u in range(n_users) for i in range(pairs_each)])


def test_pseudo_new_users_are_held_out_whole_with_their_own_context():
    data = users_dataset()
    train, pseudo_new = split_pseudo_new_users(data, fraction=0.2, seed=0, context_pairs=2)
    held = set(pseudo_new["user_id"])
    assert len(held) == 2 and not held & set(train["user_id"]) and len(train) == 8 * 6
    assert len(pseudo_new) == 2 * (6 - 2)  # every held-out pair outside the user's context is scored
    for row in pseudo_new:
        context = {(c["prompt"], c["chosen"]) for c in row["context"]}
        assert len(context) == 2 and all(p.startswith(f"q{row['user_id'][1:]}-") for p, _ in context)
        assert (row["prompt"], row["chosen"]) not in context
    again = split_pseudo_new_users(data, fraction=0.2, seed=0, context_pairs=2)[1]
    assert again.to_list() == pseudo_new.to_list()


def test_pseudo_new_users_in_folds_score_each_pair_with_another_part_as_context():
    data = users_dataset(pairs_each=6)
    _, one = split_pseudo_new_users(data, fraction=0.2, seed=0, context_pairs=3)
    _, folded = split_pseudo_new_users(data, fraction=0.2, seed=0, context_pairs=3, folds=2)
    assert folded.to_list()[: len(one) // 2] == one.to_list()[: len(one) // 2]  # the first fold is the unfolded split
    assert len(folded) == 2 * len(one) == 2 * 2 * 3
    for user in set(folded["user_id"]):
        rows = [r for r in folded if r["user_id"] == user]
        contexts = {tuple(c["prompt"] for c in r["context"]) for r in rows}
        assert len(contexts) == 2 and not set(contexts.pop()) & set(contexts.pop())  # two disjoint parts
        scored = [r["prompt"] for r in rows]
        assert sorted(set(scored)) == sorted(scored) == sorted(f"q{user[1:]}-{i}" for i in range(6))
        for row in rows:
            assert row["prompt"] not in {c["prompt"] for c in row["context"]}
    # never more folds than parts: 6 pairs in parts of 2 give 3 folds at most
    _, many = split_pseudo_new_users(data, fraction=0.2, seed=0, context_pairs=2, folds=5)
    assert len(many) == 2 * 3 * (6 - 2)


def test_pseudo_new_users_need_enough_users_and_a_user_column():
    with pytest.raises(PreferenceDataError, match="fewer than 2 to train on"):
        split_pseudo_new_users(users_dataset(n_users=2), fraction=0.5, seed=0)
    with pytest.raises(PreferenceDataError, match="no `user_id`"):
        split_pseudo_new_users(users_dataset().remove_columns("user_id"), fraction=0.2, seed=0)


def test_selection_arguments_check_their_values():
    args = SelectionArguments(selection_fraction=0.2, selection_grid="{kl_weight: [0.001, 0.01], num_train_epochs: 2}")
    assert args.grid({"kl_weight", "num_train_epochs"}) == [{"kl_weight": 0.001, "num_train_epochs": 2},
                                                            {"kl_weight": 0.01, "num_train_epochs": 2}]
    with pytest.raises(ValueError, match="not VPLRewardConfig fields"):
        SelectionArguments(selection_grid="{klweight: [1]}").grid({"kl_weight"})
    with pytest.raises(ValueError, match="selection_fraction"):
        SelectionArguments(selection_fraction=1.5)
    with pytest.raises(ValueError, match="selection_latent_scales"):
        SelectionArguments(selection_latent_scales="0,half")


def test_latent_fits_need_a_decoder_linear_in_the_latent(tmp_path):
    from vpl_trl import VPLRewardConfig
    from vpl_trl.selection import select_settings

    args = VPLRewardConfig(output_dir=str(tmp_path), model_type="vae", decoder_type="mlp", report_to="none")
    selection = SelectionArguments(selection_fraction=0.2, selection_latent_fit_precisions="0,0.1")

    def never(*_):
        raise AssertionError("no candidate is trained before the settings are checked")

    with pytest.raises(ValueError, match="decoder_type='mlp'"):
        select_settings(args, selection, users_dataset(), never, tmp_path)
    with pytest.raises(ValueError, match="selection_latent_fit_precisions >= 0"):
        SelectionArguments(selection_latent_fit_precisions="0,-1")


def residual_model(tiny_backbone) -> VPLRewardModel:
    torch.manual_seed(0)
    return VPLRewardModel.from_backbone(tiny_backbone, latent_dim=4, hidden_dim=16, encoder_type="bayesian",
                                        decoder_type="residual").eval()


def test_residual_decoder_gives_the_prior_user_the_pooled_reward(tiny_backbone):
    model = residual_model(tiny_backbone)
    assert model.config.normalize_latent is False  # by default its latent 0, the prior user, stays unmoved
    embeddings = torch.randn(6, model.config.embedding_dim)
    with torch.no_grad():
        prior = model(embeddings=embeddings, latent=model.prior_latent(1)).logits
        pooled = model.decoder.pooled(model._standardize(embeddings))
        someone = model(embeddings=embeddings, latent=torch.ones(1, 4)).logits
    assert torch.equal(prior, pooled) and not torch.allclose(someone, pooled)


def test_bayesian_encoder_narrows_with_evidence_and_cancels_contradictions():
    torch.manual_seed(0)
    encoder = BayesianContextEncoder(embedding_dim=8, hidden_dim=16, latent_dim=4)
    chosen, rejected = torch.randn(1, 1, 8), torch.randn(1, 1, 8)
    means, logvars = [], []
    with torch.no_grad():
        for k in (1, 2, 4, 16, 64):
            mean, logvar = encoder(chosen.repeat(1, k, 1), rejected.repeat(1, k, 1))
            means.append(mean.abs()), logvars.append(logvar)
        # the same pair read both ways: no evidence either way, the prior user
        both = encoder(torch.cat([chosen, rejected], 1), torch.cat([rejected, chosen], 1))
    assert all((a < b).all() for a, b in zip(means, means[1:]))  # the mean moves away from 0 with each repeat
    assert all((a > b).all() for a, b in zip(logvars, logvars[1:])) and (logvars[0] < 0).all()
    assert torch.allclose(both[0], torch.zeros(1, 4), atol=1e-6)
    padded = encoder(torch.cat([chosen, torch.randn(1, 3, 8)], 1), torch.cat([rejected, torch.randn(1, 3, 8)], 1),
                     mask=torch.tensor([[True, False, False, False]]))
    assert torch.allclose(padded[0], encoder(chosen, rejected)[0])  # padded pairs carry no evidence


def test_context_dropout_trains_the_pooled_reward(tiny_backbone, pets_data, tmp_path):
    """On Pets (two users who disagree on half the pairs), a user with one context pair stays nearer the pooled
    reward than a user with sixteen, and training with context dropout moves the pooled reward too."""
    from vpl_trl import VPLRewardConfig, VPLRewardTrainer

    args = VPLRewardConfig(
        output_dir=str(tmp_path), model_type="vae", latent_dim=4, hidden_dim=32, learning_rate=3e-3,
        num_train_epochs=2, per_device_train_batch_size=16, num_context="1-16", report_to="none", save_strategy="no",
        disable_tqdm=True, embedding_mode="frozen", encoder_type="bayesian", decoder_type="residual",
        context_dropout=0.3, kl_weight=0.05, kl_schedule="constant", seed=0,
    )
    torch.manual_seed(0)
    trainer = VPLRewardTrainer(model=tiny_backbone, args=args, train_dataset=pets_data["train"].select(range(300)))
    model = trainer.model
    pooled_before = [p.detach().clone() for p in model.decoder.pooled.parameters()]
    trainer.train()
    assert any(not torch.equal(a, b) for a, b in zip(pooled_before, model.decoder.pooled.parameters()))

    model.eval()
    inference = trainer.inference
    test = pets_data["test"].filter(lambda r: r["user_id"] == "harmless").to_list()
    texts = [r["prompt"] + r["chosen"] for r in test[:16]] + [r["prompt"] + r["rejected"] for r in test[:16]]
    embeddings = inference.embed(texts)
    pooled = torch.tensor(inference.rewards(embeddings))
    context = [{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in test[16:32]]
    coin = torch.Generator().manual_seed(0)
    random_labels = [c if torch.rand(1, generator=coin) < 0.5
                     else {**c, "chosen": c["rejected"], "rejected": c["chosen"]} for c in context]
    moved = {name: (torch.tensor(inference.rewards(embeddings, inference.encode_context(pairs))) - pooled).norm().item()
             for name, pairs in (("one", context[:1]), ("random", random_labels), ("sixteen", context))}
    assert moved["one"] < moved["sixteen"] and moved["random"] < moved["sixteen"]


def test_pooled_loss_adds_a_bradley_terry_loss_on_the_pooled_reward(tiny_backbone, pets_data, tmp_path):
    """With `pooled_loss_weight` w, every training batch's loss gains w times the Bradley-Terry loss of the residual
    decoder's pooled reward alone (the reward of a user without context) on its pairs, logged as `pooled_bt_loss`;
    a model without a pooled reward gets a clear error."""
    from vpl_trl import VPLRewardConfig, VPLRewardTrainer

    def trainer(weight: float, decoder: str = "residual"):
        args = VPLRewardConfig(
            output_dir=str(tmp_path), model_type="vae", latent_dim=4, hidden_dim=32, learning_rate=3e-3,
            max_steps=6, per_device_train_batch_size=16, num_context="4-8", report_to="none", save_strategy="no",
            disable_tqdm=True, embedding_mode="frozen", encoder_type="difference", decoder_type=decoder,
            pooled_loss_weight=weight, kl_weight=1e-3, kl_schedule="constant", seed=0, logging_steps=2,
        )
        return VPLRewardTrainer(model=tiny_backbone, args=args, train_dataset=pets_data["train"].select(range(200)))

    weighted = trainer(0.5)
    model = weighted.model.train()
    batch = next(iter(weighted.get_train_dataloader()))

    def loss(weight: float) -> float:
        weighted.args.pooled_loss_weight = weight
        torch.manual_seed(0)  # the same draw of the latents
        with torch.no_grad():
            return weighted.compute_loss(model, batch).item()

    with torch.no_grad():
        inputs = {k: v for k, v in batch.items() if k != "margin"}
        pooled_chosen, pooled_rejected = torch.chunk(model(**inputs).pooled.squeeze(-1), chunks=2)
    expected = torch.nn.functional.softplus(pooled_rejected - pooled_chosen).mean().item()
    assert loss(0.5) - loss(0.0) == pytest.approx(0.5 * expected, rel=1e-4)
    weighted.args.pooled_loss_weight = 0.5
    weighted.train()
    assert len([e for e in weighted.state.log_history if "pooled_bt_loss" in e]) == 3
    with pytest.raises(ValueError, match="pooled_loss_weight=1.0 trains the residual decoder's pooled reward"):
        trainer(1.0, decoder="bilinear")


def test_pooled_reward_bradley_terry_is_exactly_the_bradley_terry_model(tiny_backbone, pets_data, tmp_path):
    """With `pooled_reward="bradley_terry"` the trained model's pooled reward is the Bradley-Terry model that a
    `base` run of the same configuration trains (each context draw an epoch): a user whose latent is 0 gets exactly
    its rewards, and the users' deviations stay as trained. A saved Bradley-Terry model serves the same way; a model
    that is not one on the same embedding gets a clear error."""
    from vpl_trl import VPLRewardConfig, VPLRewardTrainer

    data = pets_data["train"].select(range(160))

    def config(model_type: str, name: str, **overrides) -> VPLRewardConfig:
        settings = dict(
            output_dir=str(tmp_path / name), model_type=model_type, latent_dim=4, hidden_dim=16, learning_rate=3e-3,
            num_train_epochs=1, train_context_draws=2, per_device_train_batch_size=16, num_context="2-4",
            report_to="none", save_strategy="no", disable_tqdm=True, embedding_mode="frozen", decoder_type="residual",
            encoder_type="difference", kl_weight=1e-3, kl_schedule="constant", seed=3, pooled_loss_weight=1.0,
            pooled_reward="bradley_terry")
        return VPLRewardConfig(**{**settings, **overrides})

    def train(args: VPLRewardConfig) -> VPLRewardTrainer:
        set_seed(args.seed)
        trainer = VPLRewardTrainer(model=tiny_backbone, args=args, train_dataset=data)
        trainer.train()
        return trainer

    # the baseline as the benchmarks train it beside VPL: as many updates; pooled_reward means nothing to it
    bradley_terry = train(config("base", "base", num_train_epochs=2, train_context_draws=1))
    joint, vpl = train(config("vae", "joint", pooled_reward="joint")), train(config("vae", "vpl"))
    model, base = vpl.model.eval(), bradley_terry.model.eval()
    embeddings = torch.randn(8, model.config.embedding_dim)
    someone = torch.ones(1, 4)
    with torch.no_grad():
        expected = base(embeddings=embeddings).logits
        torch.testing.assert_close(model(embeddings=embeddings, latent=model.prior_latent(1)).logits, expected,
                                   rtol=0, atol=0)
        assert not torch.allclose(joint.model.eval()(embeddings=embeddings, latent=joint.model.prior_latent(1)).logits,
                                  expected, atol=1e-3)
        # the deviation from the pooled reward is the jointly trained model's
        deviation = model(embeddings=embeddings, latent=someone).logits - expected
        joint_pooled = joint.model(embeddings=embeddings, latent=joint.model.prior_latent(1)).logits
        torch.testing.assert_close(deviation, joint.model(embeddings=embeddings, latent=someone).logits - joint_pooled,
                                   atol=1e-4, rtol=1e-4)
        assert deviation.abs().max() > 1e-3

    bradley_terry.save_model(str(tmp_path / "saved-base"))
    from_folder = train(config("vae", "again", pooled_reward=str(tmp_path / "saved-base"))).model.eval()
    with torch.no_grad():
        torch.testing.assert_close(from_folder(embeddings=embeddings, latent=from_folder.prior_latent(1)).logits,
                                   expected, rtol=0, atol=0)
    vpl.save_model(str(tmp_path / "saved-vpl"))
    with pytest.raises(ValueError, match="differs in reward_type \\('vae', expected 'base'\\)"):
        train(config("vae", "wrong", pooled_reward=str(tmp_path / "saved-vpl")))
    with pytest.raises(OSError, match="no-such-model"):  # before any training
        VPLRewardTrainer(model=tiny_backbone, train_dataset=data,
                         args=config("vae", "missing", pooled_reward=str(tmp_path / "no-such-model")))
    with pytest.raises(ValueError, match="was given a VPLRewardModel, which has its own"):
        VPLRewardTrainer(model=VPLRewardModel.from_pretrained(tmp_path / "saved-vpl"), args=config("vae", "given"),
                         train_dataset=data)
    with pytest.raises(ValueError, match="not decoder_type='bilinear'"):
        VPLRewardTrainer(model=tiny_backbone, args=config("vae", "bilinear", decoder_type="bilinear"),
                         train_dataset=data)


@pytest.fixture(scope="module")
def many_users_dir(tmp_path_factory):
    from vpl_trl.data.population import PopulationConfig, build_population

    folder = tmp_path_factory.mktemp("many-users")
    build_population(folder, PopulationConfig(train_users=12, new_users=3, pairs_per_user=8, test_pairs_per_user=2,
                                              context_pairs=4, new_test_pairs=3))
    return folder


@pytest.mark.slow
def test_recipe_selects_on_pseudo_new_users_deterministically(tiny_backbone, many_users_dir, tmp_path):
    def run(output: str) -> dict:
        train_reward.main([
            "--model_name_or_path", tiny_backbone, "--dataset", str(many_users_dir), "--model_type", "vae",
            "--embedding_mode", "frozen", "--latent_dim", "4", "--hidden_dim", "16", "--max_steps", "3",
            "--encoder_type", "bayesian", "--decoder_type", "residual", "--context_dropout", "0.25",
            "--selection_fraction", "0.25", "--selection-grid", "{kl_weight: [0.001, 0.1]}",
            "--selection_context_sizes", "1,2", "--selection-latent-fit-precisions", "0,0.5",
            "--report_to", "none", "--output_dir", str(tmp_path / output),
        ])
        selection = json.loads((tmp_path / output / "selection.json").read_text())
        selection.pop("seconds")
        return selection

    first, second = run("a"), run("b")
    assert first == second
    assert first["users"] == {"training": 9, "pseudo_new": 3, "pseudo_new_pairs": 2 * 3 * (8 - 4), "folds": 2}
    # each trained candidate is scored with and without the latent fit, which needs no training of its own
    assert [(c["settings"], c["latent_fit_precision"]) for c in first["candidates"]] == [
        ({"kl_weight": 0.001}, 0.0), ({"kl_weight": 0.001}, 0.5), ({"kl_weight": 0.1}, 0.0), ({"kl_weight": 0.1}, 0.5)]
    assert set(first["candidates"][0]["scores"]) == {"0", "0.5", "1"} and "best mean accuracy" in first["reason"]
    assert set(first["latent_scale"]) == {"1", "2"} and set(first["latent_scale"].values()) <= {0.0, 0.5, 1.0}
    scores = next(c for c in first["candidates"] if c["settings"] == first["settings"]
                  and c["latent_fit_precision"] == first["latent_fit_precision"])["scores"]
    for k, scale in first["latent_scale"].items():  # at each K, never below the pooled reward on the pseudo-new users
        assert scores[f"{scale:g}"][k]["accuracy"] >= scores["0"][k]["accuracy"]
        assert all(len(entry[k]["per_user"]) == 3 for entry in scores.values())
    saved = json.loads((tmp_path / "a" / "config.json").read_text())
    assert saved["latent_scale"] == first["latent_scale"]
    assert saved["latent_fit_precision"] == first["latent_fit_precision"]
    results = json.loads((tmp_path / "a" / "eval_results.json").read_text())
    assert results["selection"]["settings"] == first["settings"]


@pytest.mark.slow
def test_general_configuration_serves_the_bradley_terry_reward_where_personalization_did_not_pay(
        tiny_backbone, many_users_dir, tmp_path):
    """The shipped many-user configuration, as the README runs it (smaller): a user whose latent is 0, as where the
    selection keeps a context size at scale 0, gets exactly the reward of a Bradley-Terry run of the same
    configuration with as many updates."""
    config = ROOT / "recipes" / "configs" / "many_users.yaml"
    small = ["--model_name_or_path", tiny_backbone, "--dataset", str(many_users_dir), "--latent_dim", "4",
             "--hidden_dim", "16", "--num_context", "2-4", "--selection_context_sizes", "1,4",
             "--per_device_train_batch_size", "8"]
    train_reward.main(["--config", str(config), *small, "--output_dir", str(tmp_path / "vpl")])
    train_reward.main(["--config", str(config), *small, "--model_type", "base", "--num_train_epochs", "4",
                       "--train_context_draws", "1", "--selection_fraction", "0", "--output_dir", str(tmp_path / "bt")])
    vpl, base = (VPLRewardModel.from_pretrained(tmp_path / name).eval() for name in ("vpl", "bt"))
    selection = json.loads((tmp_path / "vpl" / "selection.json").read_text())
    assert vpl.config.latent_scale == selection["latent_scale"] and vpl.config.latent_fit_precision in (0.1, 0.3)
    embeddings = torch.randn(6, vpl.config.embedding_dim)
    chosen, rejected = torch.randn(2, 1, 1, vpl.config.embedding_dim)
    with torch.no_grad():
        expected = base(embeddings=embeddings).logits
        torch.testing.assert_close(vpl(embeddings=embeddings, latent=vpl.prior_latent(1)).logits, expected,
                                   rtol=0, atol=0)
        vpl.config.latent_scale = {**selection["latent_scale"], "1": 0.0}  # as where one pair did not pay
        served = vpl(embeddings=embeddings, context_chosen=chosen, context_rejected=rejected).logits
    torch.testing.assert_close(served, expected, rtol=0, atol=0)


def context_log_likelihood(model: VPLRewardModel, chosen, rejected, latent) -> float:
    with torch.no_grad():
        rewards = [model(embeddings=side[0], latent=latent).logits for side in (chosen, rejected)]
    margins = rewards[0] - rewards[1]
    return torch.nn.functional.logsigmoid(margins).sum().item()


def test_latent_fit_explains_the_context_and_a_strong_prior_keeps_the_pooled_reward(tiny_backbone, tmp_path):
    model = residual_model(tiny_backbone)
    torch.manual_seed(1)
    chosen, rejected = torch.randn(2, 1, 6, model.config.embedding_dim)
    scored = torch.randn(5, model.config.embedding_dim)
    with torch.no_grad():
        encoded, _, _ = model.user_latent(chosen, rejected)
        pooled = model(embeddings=scored, latent=model.prior_latent(1)).logits

    model.config.latent_fit_precision = 0.01
    with torch.no_grad():
        fitted, _, _ = model.user_latent(chosen, rejected)
        served = model(embeddings=scored, context_chosen=chosen, context_rejected=rejected).logits
    assert context_log_likelihood(model, chosen, rejected, fitted) > context_log_likelihood(
        model, chosen, rejected, encoded) + 0.1
    # a MAP fit: no latent near it explains the pairs better, prior included
    def objective(latent: torch.Tensor) -> float:
        return -context_log_likelihood(model, chosen, rejected, latent) + 0.005 * latent.pow(2).sum().item()
    assert all(objective(fitted) <= objective(fitted + 0.05 * torch.randn(1, 4)) for _ in range(10))
    # users are fitted each on their own: a user's latent does not depend on who else is in the batch
    others = torch.randn(2, 3, 6, model.config.embedding_dim)
    batch = model.fit_latent(torch.cat([chosen, others[0]]), torch.cat([rejected, others[1]]))
    torch.testing.assert_close(batch[:1], fitted, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(served, model(embeddings=scored, latent=fitted).logits.detach())
    assert not any(p.grad is not None for p in model.parameters())  # the fit leaves the model's gradients alone

    model.save_pretrained(tmp_path / "fitted")
    reloaded = VPLRewardModel.from_pretrained(tmp_path / "fitted").eval()
    assert reloaded.config.latent_fit_precision == 0.01
    with torch.no_grad():
        again = reloaded(embeddings=scored, context_chosen=chosen, context_rejected=rejected).logits
    torch.testing.assert_close(again, served)

    model.config.latent_fit_precision = 1e6  # a prior that no context pair outweighs: the pooled reward
    with torch.no_grad():
        shrunk = model(embeddings=scored, context_chosen=chosen, context_rejected=rejected).logits
    torch.testing.assert_close(shrunk, pooled, atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="latent_fit_precision must be >= 0"):
        VPLConfig(latent_fit_precision=-1.0)
    torch.manual_seed(0)
    mlp = VPLRewardModel.from_backbone(tiny_backbone, latent_dim=4, hidden_dim=16, latent_fit_precision=0.1).eval()
    with pytest.raises(ValueError, match="needs a decoder linear in the latent"):
        mlp(embeddings=scored, context_chosen=chosen, context_rejected=rejected)


def test_latent_scale_by_context_size_interpolates_in_log_k(tiny_backbone):
    from vpl_trl.models.modeling_vpl import latent_scale_at

    table = {"1": 0.0, "4": 0.5, "16": 1.0}
    factors = latent_scale_at(table, torch.tensor([1, 2, 4, 8, 16, 64]), 6).flatten()
    assert factors.tolist() == pytest.approx([0.0, 0.25, 0.5, 0.75, 1.0, 1.0])
    assert latent_scale_at(0.5, None, 3).flatten().tolist() == [0.5, 0.5, 0.5]
    model = residual_model(tiny_backbone)
    model.config.latent_scale = {"1": 0.0, "16": 1.0}
    chosen, rejected = torch.randn(2, 1, 4, model.config.embedding_dim)
    mean, logvar = model.encode_context(chosen, rejected)
    one = model.latent_from_posterior(mean, logvar, torch.tensor([1]))
    sixteen = model.latent_from_posterior(mean, logvar, 16)
    assert torch.equal(one, torch.zeros_like(one)) and torch.allclose(sixteen, mean)
    with pytest.raises(ValueError, match="latent_scale must be"):
        VPLConfig(latent_scale={"0": 1.0})


def test_scales_by_context_size_never_shrink_as_pairs_grow_and_ties_stay_pooled():
    from vpl_trl.selection import _best_scales, _held_back

    def scores(table: dict[str, list[float]], spread: dict[str, list[float]] | None = None,
               worst: dict[str, list[float]] | None = None) -> dict:
        """Scores of 20 pseudo-new users at K=1/4/16: each user's accuracy is the mean plus the same offset under
        every scale (plus `spread[scale]`'s, alternating in sign, per K)."""
        offsets = np.linspace(-0.1, 0.1, 20)
        signs = np.resize([1.0, -1.0], 20)
        result = {}
        for scale, accuracies in table.items():
            result[scale] = {}
            for i, (k, accuracy) in enumerate(zip(("1", "4", "16"), accuracies)):
                noise = (spread or {}).get(scale, [0.0] * 3)[i] * signs
                result[scale][k] = {"accuracy": accuracy, "per_user": (accuracy + offsets + noise).tolist(),
                                    "worst_decile": (worst or {}).get(scale, [accuracy - 0.1] * 3)[i]}
        return result

    # K=16 alone would take 0.5, below K=4's 1: the best non-decreasing choice keeps 1 from K=4 on
    chosen, mean = _best_scales(scores({"0": [0.60, 0.60, 0.60], "0.5": [0.55, 0.62, 0.72], "1": [0.50, 0.66, 0.70]}),
                                [1, 4, 16])
    assert chosen == {"1": 0.0, "4": 1.0, "16": 1.0} and mean == pytest.approx((0.60 + 0.66 + 0.70) / 3)
    assert _best_scales(scores({s: [0.6] * 3 for s in ("0", "0.5", "1")}), [1, 4, 16])[0] == {
        "1": 0.0, "4": 0.0, "16": 0.0}
    assert _best_scales({"-": {"0": {"accuracy": 0.7}, "score": 0.7}}, [1]) == (None, 0.7)

    # a higher mean within noise (half the users gain 20 points, half lose 19) keeps the pooled reward
    noisy = scores({"0": [0.60] * 3, "1": [0.605] * 3}, spread={"1": [0.195] * 3})
    assert _best_scales(noisy, [1, 4, 16])[0] == {"1": 0.0, "4": 0.0, "16": 0.0}
    assert _held_back(noisy, {"1": 0.0, "4": 0.0, "16": 0.0}).startswith("K=1 (scale 1: 60.5% against 60.0%)")
    # so does a clear gain that costs the worst-served users more than a point
    costly = scores({"0": [0.60] * 3, "1": [0.60, 0.65, 0.70]}, worst={"1": [0.50, 0.48, 0.52]})
    assert _best_scales(costly, [1, 4, 16])[0] == {"1": 0.0, "4": 0.0, "16": 1.0}
