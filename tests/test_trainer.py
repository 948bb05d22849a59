"""VPLRewardTrainer on a tiny backbone: VPL learns per-user preferences, baselines train, checkpoints resume."""

import json

import pytest
import torch

from vpl_trl import VPLRewardConfig, VPLRewardModel, VPLRewardTrainer
from vpl_trl.evaluation.metrics import evaluate_reward_model


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
        embedding_mode="frozen",
    )
    defaults.update(kwargs)
    return VPLRewardConfig(**defaults)


@pytest.fixture(scope="module")
def trained_vae(tiny_backbone, pets_data, tmp_path_factory):
    trainer = VPLRewardTrainer(
        model=tiny_backbone,
        args=config(tmp_path_factory.mktemp("vae"), num_train_epochs=10, latent_dim=16, learning_rate=1e-3),
        train_dataset=pets_data["train"]
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
    trainer = VPLRewardTrainer(
        model=tiny_backbone, args=config(tmp_path, model_type="base"), train_dataset=pets_data["train"]
    )
    trainer.train()
    metrics = evaluate_reward_model(trainer, pets_data["test"])
    assert metrics["agreed_accuracy"] >= 0.65
    assert 0.3 <= metrics["controversial_accuracy"] <= 0.7
    assert "context_swap" not in metrics


@pytest.mark.parametrize("model_type", ["mean_and_variance", "categorical"])
def test_distributional_baselines_train(tiny_backbone, pets_data, tmp_path, model_type):
    trainer = VPLRewardTrainer(
        model=tiny_backbone,
        args=config(tmp_path, model_type=model_type, num_train_epochs=3),
        train_dataset=pets_data["train"]
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
    assert lora_before and any(
        not torch.equal(p, lora_before[n]) for n, p in trainer.model.named_parameters() if n in lora_before
    )
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
    layers = trainer.model.backbone.layers
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
    args = config(
        tmp_path, max_steps=8, save_strategy="steps", save_steps=4, per_device_train_batch_size=8, logging_steps=1
    )
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


# ----- trl.RewardTrainer's conventions -----------------------------------------------------------------------


@pytest.mark.parametrize("model_type", ["base", "vae"])
def test_without_peft_config_the_backbone_is_fine_tuned_and_saved_with_the_heads(tiny_backbone, pets_data, tmp_path,
                                                                                 model_type):
    train = pets_data["train"].select(range(32))
    args = config(tmp_path, model_type=model_type, embedding_mode=None, max_steps=2, per_device_train_batch_size=8)
    trainer = VPLRewardTrainer(model=tiny_backbone, args=args, train_dataset=train)
    assert trainer.model.config.embedding_mode == "full"
    before = {n: p.clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    assert all(not torch.equal(p, before[n]) for n, p in trainer.model.named_parameters())
    trainer.save_model(tmp_path / "saved")
    sample = train.select(range(4))
    expected = trainer.predict_preferences(sample)["reward_chosen"]
    trainer.model = VPLRewardModel.from_pretrained(tmp_path / "saved")
    assert trainer.predict_preferences(sample)["reward_chosen"] == pytest.approx(expected, abs=1e-5)


def test_peft_config_trains_a_lora_adapter_and_the_heads_and_reloads(tiny_backbone, pets_data, tmp_path):
    from peft import LoraConfig, PeftModel

    train = pets_data["train"].select(range(16))
    args = config(tmp_path, model_type="vae", embedding_mode=None, max_steps=3, per_device_train_batch_size=8)
    trainer = VPLRewardTrainer(model=tiny_backbone, args=args, train_dataset=train, peft_config=LoraConfig(r=4))
    assert isinstance(trainer.model, PeftModel)  # wrapped as trl.RewardTrainer wraps its models
    model = trainer.model.get_base_model()
    assert model.config.embedding_mode == "lora" and model.config.peft_config["r"] == 4
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {n for n in trainable if n.startswith("model.")} == {n for n, _ in model.named_parameters() if "lora_" in n}
    assert {"decoder.0.weight", "encoder.mean_head.weight"} <= trainable
    before = {n: p.clone() for n, p in model.named_parameters()}
    trainer.train()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert "decoder.0.weight" in changed and any("lora_A" in n for n in changed)
    assert all(n in trainable for n in changed)  # the backbone's own weights stay as they were

    trainer.save_model(tmp_path / "saved")
    sample = train.select(range(4))
    expected = trainer.predict_preferences(sample)["reward_chosen"]
    trainer.model = VPLRewardModel.from_pretrained(tmp_path / "saved")
    assert trainer.predict_preferences(sample)["reward_chosen"] == pytest.approx(expected, abs=1e-6)


def test_a_peft_model_trains_its_own_adapter(tiny_backbone, pets_data, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification

    train = pets_data["train"].select(range(16))
    args = config(tmp_path, model_type="base", embedding_mode=None, max_steps=1, per_device_train_batch_size=8)
    classifier = AutoModelForSequenceClassification.from_pretrained(tiny_backbone, num_labels=1)
    peft_model = get_peft_model(classifier, LoraConfig(r=2, init_lora_weights=False))
    adapter = {
        n.replace("base_model.model.model.", ""): p.clone() for n, p in peft_model.named_parameters() if "lora_" in n
    }
    trainer = VPLRewardTrainer(model=peft_model, args=args, train_dataset=train)
    carried = {n.replace("base_model.model.model.", ""): p for n, p in trainer.model.named_parameters() if "lora_" in n}
    assert carried.keys() == adapter.keys() and all(torch.equal(carried[n], adapter[n]) for n in adapter)
    assert trainer.model.get_base_model().config.peft_config["r"] == 2
    with pytest.raises(ValueError, match="PeftModel.*peft_config"):
        VPLRewardTrainer(model=peft_model, args=args, train_dataset=train, peft_config=LoraConfig())


def test_a_classifier_with_two_labels_is_refused(tiny_backbone, pets_data, tmp_path):
    from transformers import AutoModelForSequenceClassification

    classifier = AutoModelForSequenceClassification.from_pretrained(tiny_backbone)  # num_labels=2
    with pytest.raises(ValueError, match="reward models require `num_labels=1`"):
        VPLRewardTrainer(model=classifier, args=config(tmp_path), train_dataset=pets_data["train"].select(range(8)))


@pytest.mark.parametrize("embedding_mode", ["frozen", "full"])
def test_the_margin_column_raises_the_loss(tiny_backbone, pets_data, tmp_path, embedding_mode):
    train = pets_data["train"].select(range(8))
    args = config(tmp_path, model_type="base", embedding_mode=embedding_mode)
    trainer = VPLRewardTrainer(model=tiny_backbone, args=args, train_dataset=train.add_column("margin", [3.0] * 8))
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(8)])
    assert torch.equal(batch["margin"], torch.full((8,), 3.0))
    with torch.no_grad():
        with_margin = trainer.compute_loss(trainer.model, batch)
        without = trainer.compute_loss(trainer.model, {k: v for k, v in batch.items() if k != "margin"})
    assert with_margin > without + 1.0


def test_evaluation_calls_compute_metrics_with_the_rewards_and_latents(tiny_backbone, pets_data, tmp_path):
    seen = {}

    def compute_metrics(prediction):
        seen["rewards"], seen["latent_mean"], seen["kl"] = prediction.predictions
        return {"my_metric": 0.5}

    data = pets_data["test"].select(range(8))
    trainer = VPLRewardTrainer(model=tiny_backbone, args=config(tmp_path, per_device_eval_batch_size=3),
                               train_dataset=pets_data["train"].select(range(16)), eval_dataset=data,
                               compute_metrics=compute_metrics)
    assert trainer.evaluate()["eval_my_metric"] == 0.5
    # One row per pair, in the data's order across batches: (chosen, rejected) rewards, the user's latent, its KL.
    assert seen["rewards"].shape == (8, 2) and seen["latent_mean"].shape == (8, 8) and seen["kl"].shape == (8,)
    batch = trainer.data_collator([trainer.eval_dataset[i] for i in range(8)])
    trainer.model.eval()
    with torch.no_grad():
        outputs = trainer.model(**batch)
    rewards = outputs.logits.view(2, 8).T
    torch.testing.assert_close(torch.as_tensor(seen["rewards"]), rewards)
    torch.testing.assert_close(torch.as_tensor(seen["latent_mean"]), outputs.latent_mean)
    assert bool((torch.as_tensor(seen["kl"]) > 0).all())

    predicted = trainer.predict_preferences(data, batch_size=5)  # by Trainer.predict, other batches alike
    assert predicted["reward_chosen"] == pytest.approx(rewards[:, 0].tolist(), abs=1e-6)
    assert predicted["reward_rejected"] == pytest.approx(rewards[:, 1].tolist(), abs=1e-6)
    assert predicted["kl"] == pytest.approx(seen["kl"].tolist(), abs=1e-6)
    assert predicted["user_id"] == data["user_id"] and len(predicted["latent_mean"]) == 8
    assert not trainer._metrics["eval"]  # predictions leave nothing in the next evaluation's log
    assert trainer.args.per_device_eval_batch_size == 3


def test_a_streaming_dataset_trains_a_baseline(tiny_backbone, pets_data, tmp_path):
    stream = pets_data["train"].select(range(32)).to_iterable_dataset()
    args = config(tmp_path, model_type="base", embedding_mode=None, max_steps=2, per_device_train_batch_size=8)
    trainer = VPLRewardTrainer(model=tiny_backbone, args=args, train_dataset=stream)
    assert bool((trainer.model.embedding_mean != 0).any())  # standardized by the first streamed pairs
    trainer.train()
    assert trainer.state.global_step == 2
    with pytest.raises(TypeError, match="vae model needs a map-style Dataset"):
        VPLRewardTrainer(model=tiny_backbone, args=config(tmp_path, embedding_mode=None), train_dataset=stream)


def test_a_cloned_chat_template_resizes_the_backbone_and_reloads(tiny_backbone, pets_data, tmp_path):
    from transformers import AutoTokenizer
    from trl import clone_chat_template

    train = pets_data["train"].select(range(8))
    args = config(tmp_path, model_type="base", embedding_mode=None, max_steps=1, per_device_train_batch_size=8)
    trainer = VPLRewardTrainer(model=tiny_backbone, args=args, train_dataset=train)
    source = tmp_path / "source-tokenizer"
    tokenizer = AutoTokenizer.from_pretrained(tiny_backbone)
    tokenizer.add_tokens(["<new_a>", "<new_b>"])
    tokenizer.save_pretrained(source)
    model, tokenizer, added = clone_chat_template(trainer.model, trainer.processing_class, str(source))
    assert model.get_input_embeddings().num_embeddings == len(tokenizer.vocab)
    assert model.config.backbone_signature["vocab_size"] == len(tokenizer.vocab)
    model.save_pretrained(tmp_path / "saved")
    reloaded = VPLRewardModel.from_pretrained(tmp_path / "saved")
    assert torch.equal(reloaded.get_input_embeddings().weight, model.get_input_embeddings().weight)


def test_scalar_heads_have_no_bias_and_old_checkpoints_with_one_load(tiny_backbone, tmp_path):
    from safetensors.torch import load_file, save_file

    model = VPLRewardModel.from_backbone(tiny_backbone, reward_type="vae", latent_dim=4, hidden_dim=8)
    assert model.decoder[-1].bias is None
    assert (
        VPLRewardModel.from_backbone(tiny_backbone, reward_type="categorical", hidden_dim=8).decoder[-1].bias
        is not None
    )
    model.save_pretrained(tmp_path / "saved")
    weights = load_file(tmp_path / "saved" / "model.safetensors")
    save_file({**weights, "decoder.4.bias": torch.zeros(1)}, tmp_path / "saved" / "model.safetensors")
    reloaded = VPLRewardModel.from_pretrained(tmp_path / "saved")
    assert torch.equal(reloaded.decoder[-1].weight, model.decoder[-1].weight)


def test_a_reloaded_full_mode_vae_embeds_contexts_with_its_trained_backbone(tiny_backbone, pets_data, tmp_path,
                                                                           precision):
    from vpl_trl.embeddings import compute_embeddings
    from vpl_trl.inference.scoring import PersonalizedRewardScorer

    train = pets_data["train"].select(range(32))
    args = config(tmp_path, model_type="vae", embedding_mode="full", max_steps=3, per_device_train_batch_size=8,
                  num_context="2")
    trainer = VPLRewardTrainer(model=tiny_backbone, args=args, train_dataset=train)
    pretrained_contexts = trainer.inference.table.tensor.clone()
    trainer.train()
    trainer.save_model(tmp_path / "saved")
    sample = pets_data["test"].select(range(4))
    in_memory = trainer.predict_preferences(sample)

    reloaded = VPLRewardModel.from_pretrained(tmp_path / "saved")
    table = trainer.inference.table
    texts = list(table.index)
    with torch.no_grad():
        by_reloaded = compute_embeddings(reloaded, trainer.processing_class, texts, max_length=args.max_length)
    precision.assert_close(table.tensor[[table.index[t] for t in texts]], by_reloaded)
    assert not torch.allclose(pretrained_contexts, table.tensor[: len(pretrained_contexts)])  # the backbone trained

    # The same contexts give the reloaded model the same latents and rewards, in a new trainer and in the scorer.
    fresh = VPLRewardTrainer(model=reloaded, args=args, train_dataset=train)
    again = fresh.predict_preferences(sample)
    assert again["reward_chosen"] == precision.approx(in_memory["reward_chosen"])
    precision.assert_close(again["latent_mean"], in_memory["latent_mean"])
    prepared = fresh._prepare_dataset(sample, fresh.processing_class, args, "eval")
    context = prepared[0]["context"]  # the pairs drawn for it, as the user wrote them
    scorer = PersonalizedRewardScorer(reloaded, trainer.processing_class, max_length=args.max_length)
    expected_latent = reloaded.normalize_latent(torch.tensor(in_memory["latent_mean"][:1]))
    precision.assert_close(scorer.encode_context(context), expected_latent)
