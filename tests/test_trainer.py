"""VPLRewardTrainer on a tiny backbone: VPL learns per-user preferences, baselines train, checkpoints resume."""

import json

import pytest
import torch

from vpl_trl import VPLRewardConfig, VPLRewardModel, VPLRewardTrainer
from vpl_trl.evaluation import evaluate_reward_model


def config(tmp_path, **kwargs):
    defaults = dict(
        output_dir=str(tmp_path / "out"),
        latent_dim=8,
        hidden_dim=64,
        num_train_epochs=6,
        per_device_train_batch_size=16,
        learning_rate=3e-3,
        report_to="none",
        save_strategy="no",
        pooling="mean",
        num_context="4",
        disable_tqdm=True,
    )
    defaults.update(kwargs)
    return VPLRewardConfig(**defaults)


@pytest.fixture(scope="module")
def trained_vae(tiny_backbone, pets_data, tmp_path_factory):
    trainer = VPLRewardTrainer(
        model=tiny_backbone, args=config(tmp_path_factory.mktemp("vae"), num_train_epochs=10, latent_dim=16, learning_rate=1e-3), train_dataset=pets_data["train"]
    )
    trainer.train()
    return trainer


def test_vpl_learns_each_users_preference_and_uses_the_context(trained_vae, pets_data):
    # Test answers are unseen sentences and the tiny backbone is random: accuracy is well above chance, not perfect.
    metrics = evaluate_reward_model(trained_vae, pets_data["test"])
    assert metrics["controversial_accuracy"] >= 0.65
    assert metrics["agreed_accuracy"] >= 0.65
    assert set(metrics["per_user"]) == {"helpful", "harmless"}
    assert metrics["active_units"] > 0
    # With the other user's context, the preferred response flips on controversial pairs.
    assert metrics["context_swap"]["controversial_accuracy"] <= 0.35


def test_training_logs_vpl_metrics(trained_vae):
    logged = {key for entry in trained_vae.state.log_history for key in entry}
    assert {"bt_loss", "kl", "beta", "accuracy", "active_units"} <= logged


def test_bradley_terry_cannot_tell_the_users_apart(tiny_backbone, pets_data, tmp_path):
    trainer = VPLRewardTrainer(model=tiny_backbone, args=config(tmp_path, model_type="base"), train_dataset=pets_data["train"])
    trainer.train()
    metrics = evaluate_reward_model(trainer, pets_data["test"])
    assert metrics["agreed_accuracy"] >= 0.65
    assert 0.3 <= metrics["controversial_accuracy"] <= 0.7
    assert "context_swap" not in metrics


@pytest.mark.parametrize("model_type", ["mean_and_variance", "categorical"])
def test_distributional_baselines_train(tiny_backbone, pets_data, tmp_path, model_type):
    trainer = VPLRewardTrainer(
        model=tiny_backbone, args=config(tmp_path, model_type=model_type, num_train_epochs=3), train_dataset=pets_data["train"]
    )
    trainer.train()
    assert "dpl_loss" in {key for entry in trainer.state.log_history for key in entry}
    assert evaluate_reward_model(trainer, pets_data["test"])["agreed_accuracy"] >= 0.65


def test_lora_mode_trains_the_adapter_and_reloads(tiny_backbone, pets_data, tmp_path):
    train = pets_data["train"].select(range(32))
    args = config(tmp_path, embedding_mode="lora", max_steps=3, per_device_train_batch_size=8, num_context="2")
    trainer = VPLRewardTrainer(model=tiny_backbone, args=args, train_dataset=train)
    lora_before = {n: p.clone() for n, p in trainer.model.named_parameters() if "lora_B" in n}
    trainer.train()
    assert lora_before and any(not torch.equal(p, lora_before[n]) for n, p in trainer.model.named_parameters() if n in lora_before)
    trainer.save_model(tmp_path / "saved")
    reloaded = VPLRewardModel.from_pretrained(tmp_path / "saved")
    sample = train.select(range(4))
    expected = trainer.predict_preferences(sample)
    trainer.model = reloaded
    assert trainer.predict_preferences(sample)["reward_chosen"] == expected["reward_chosen"]


def test_lora_mode_trains_with_gradient_checkpointing(tiny_backbone, pets_data, tmp_path):
    train = pets_data["train"].select(range(32))
    args = config(tmp_path, model_type="vae", embedding_mode="lora", gradient_checkpointing=True, max_steps=2,
                  per_device_train_batch_size=8, num_context="2", logging_steps=1)
    trainer = VPLRewardTrainer(model=tiny_backbone, args=args, train_dataset=train)
    lora_before = {n: p.clone() for n, p in trainer.model.named_parameters() if "lora_B" in n}
    trainer.train()
    layers = trainer.model.backbone.get_base_model().layers
    assert all(layer.gradient_checkpointing for layer in layers)
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
    # Gradients reach the adapter through the checkpointed layers.
    assert all(not torch.equal(p, lora_before[n]) for n, p in trainer.model.named_parameters() if n in lora_before)

    trainer.model.gradient_checkpointing_disable()
    trainer.model.gradient_checkpointing_enable({"use_reentrant": False}, every_n_layers=2)  # as transformers passes
    assert [layer.gradient_checkpointing for layer in layers] == [True, False]


def test_saved_model_gives_identical_rewards(trained_vae, pets_data, tmp_path):
    sample = pets_data["test"].select(range(8))
    expected = trained_vae.predict_preferences(sample)
    trained_vae.save_model(tmp_path / "saved")
    saved_config = json.loads((tmp_path / "saved" / "config.json").read_text())
    assert saved_config["reward_type"] == "vae"
    assert saved_config["max_sequence_length"] == trained_vae.args.max_length  # scoring truncates alike
    model = trained_vae.model
    try:
        trained_vae.model = VPLRewardModel.from_pretrained(tmp_path / "saved")
        assert trained_vae.predict_preferences(sample)["reward_chosen"] == expected["reward_chosen"]
    finally:
        trained_vae.model = model


def test_resume_from_checkpoint_continues_from_its_step(tiny_backbone, pets_data, tmp_path):
    train = pets_data["train"].select(range(64))
    args = config(tmp_path, max_steps=8, save_strategy="steps", save_steps=4, per_device_train_batch_size=8, logging_steps=1)
    full = VPLRewardTrainer(model=tiny_backbone, args=args, train_dataset=train)
    full.train()
    losses = {e["step"]: e["loss"] for e in full.state.log_history if "loss" in e}

    resumed = VPLRewardTrainer(model=tiny_backbone, args=args, train_dataset=train)
    resumed.train(resume_from_checkpoint=str(tmp_path / "out" / "checkpoint-4"))
    resumed_losses = {e["step"]: e["loss"] for e in resumed.state.log_history if "loss" in e and e["step"] > 4}
    assert resumed.state.global_step == 8
    assert sorted(resumed_losses) == [5, 6, 7, 8]  # it continued from step 4, not from the start
    for step, loss in resumed_losses.items():
        assert loss == pytest.approx(losses[step], rel=1e-4)


def test_resuming_a_checkpoint_of_another_backbone_is_refused(tiny_backbone, other_backbone, pets_data, tmp_path):
    train = pets_data["train"].select(range(32))
    args = config(tmp_path, max_steps=2, save_strategy="steps", save_steps=2, per_device_train_batch_size=8)
    VPLRewardTrainer(model=tiny_backbone, args=args, train_dataset=train).train()
    other = VPLRewardTrainer(model=other_backbone, args=config(tmp_path, max_steps=4), train_dataset=train)
    with pytest.raises(ValueError, match="hidden_size"):
        other.train(resume_from_checkpoint=str(tmp_path / "out" / "checkpoint-2"))


def test_training_data_without_chosen_is_refused(tiny_backbone, pets_data, tmp_path):
    from vpl_trl.data import PreferenceDataError

    broken = pets_data["train"].select(range(8)).remove_columns("chosen")
    with pytest.raises(PreferenceDataError, match=r"missing column\(s\) \['chosen'\]"):
        VPLRewardTrainer(model=tiny_backbone, args=config(tmp_path), train_dataset=broken)


def test_vae_on_data_without_users_says_what_to_do(tiny_backbone, pets_data, tmp_path):
    from vpl_trl.data import PreferenceDataError
    from vpl_trl.data.format import rename_columns
    from vpl_trl.data.registry import parse_column_mapping

    anonymous = pets_data["train"].select(range(16)).remove_columns("user_id")
    with pytest.raises(PreferenceDataError, match=r"train dataset: model_type='vae' .* no `user_id` column") as error:
        VPLRewardTrainer(model=tiny_backbone, args=config(tmp_path, model_type="vae"), train_dataset=anonymous)
    assert "--column_mapping 'annotator=user_id'" in str(error.value) and "model_type='base'" in str(error.value)
    # Both ways out work: the Bradley-Terry model needs no users, and the suggested mapping names them.
    VPLRewardTrainer(model=tiny_backbone, args=config(tmp_path, model_type="base"), train_dataset=anonymous)
    annotated = pets_data["train"].select(range(16)).rename_column("user_id", "annotator")
    mapped = rename_columns(annotated, parse_column_mapping("annotator=user_id"))
    VPLRewardTrainer(model=tiny_backbone, args=config(tmp_path, model_type="vae"), train_dataset=mapped)


def test_a_model_built_from_a_backbone_name_follows_the_seed(tiny_backbone, pets_data, tmp_path):
    """Runs are reproducible from their seed, whatever the process did before (tests, other models)."""
    train = pets_data["train"].select(range(16))
    first = VPLRewardTrainer(model=tiny_backbone, args=config(tmp_path), train_dataset=train).model
    torch.rand(1000)  # other work consumes the global RNG
    second = VPLRewardTrainer(model=tiny_backbone, args=config(tmp_path), train_dataset=train).model
    expected = first.trainable_state_dict()
    assert expected and all(torch.equal(w, expected[n]) for n, w in second.trainable_state_dict().items())
    other = VPLRewardTrainer(model=tiny_backbone, args=config(tmp_path, seed=7), train_dataset=train).model
    assert not all(torch.equal(w, expected[n]) for n, w in other.trainable_state_dict().items())
