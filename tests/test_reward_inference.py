"""One reward-inference path (`RewardInference`): the trainer prepares its data with it, and a saved model scores,
predicts and serves users with it, through the same embedding cache."""

import dataclasses

import pytest
import torch
from peft import LoraConfig

from vpl_trl import VPLRewardConfig, VPLRewardModel, VPLRewardTrainer
from vpl_trl.inference.reward_inference import RewardInference
from vpl_trl.inference.scoring import PersonalizedRewardScorer


def frozen_args(tmp_path, **kwargs) -> VPLRewardConfig:
    settings = dict(output_dir=str(tmp_path / "out"), model_type="vae", embedding_mode="frozen", latent_dim=8,
                    hidden_dim=32, num_context="4", per_device_train_batch_size=16, max_steps=4, learning_rate=1e-3,
                    report_to="none", save_strategy="no", disable_tqdm=True, logging_steps=1)
    return VPLRewardConfig(**{**settings, **kwargs})


@pytest.fixture(scope="module")
def saved_frozen_vae(tiny_backbone, pets_data, tmp_path_factory):
    folder = tmp_path_factory.mktemp("frozen-vae")
    trainer = VPLRewardTrainer(model=tiny_backbone, args=frozen_args(folder), train_dataset=pets_data["train"])
    trainer.train()
    trainer.save_model(str(folder / "model"))
    return trainer, str(folder / "model")


def count_backbone_forwards(model: VPLRewardModel) -> dict[str, int]:
    calls = {"forwards": 0}
    model.backbone.register_forward_hook(lambda *_: calls.__setitem__("forwards", calls["forwards"] + 1))
    return calls


def test_scoring_what_training_embedded_embeds_nothing_again(saved_frozen_vae, pets_data):
    _, folder = saved_frozen_vae
    scorer = PersonalizedRewardScorer.from_pretrained(folder, device="cpu")
    calls = count_backbone_forwards(scorer.model)
    train = pets_data["train"]
    rows = [train[i] for i in range(12)]
    context = [r for r in rows if r["user_id"] == rows[0]["user_id"]][:4]

    latent = scorer.user_latent(context)  # context pairs: from the cache training wrote
    rewards = scorer.score([r["prompt"] for r in rows], [r["chosen"] for r in rows], latent)
    assert calls["forwards"] == 0 and len(rewards) == 12

    scorer.score([rows[0]["prompt"]], [" A text that training never saw."], latent)
    assert calls["forwards"] == 1  # a new text is embedded, once
    scorer.score([rows[0]["prompt"]], [" A text that training never saw."], latent)
    assert calls["forwards"] == 1


def test_a_saved_model_predicts_as_its_trainer_did(saved_frozen_vae, pets_data):
    trainer, folder = saved_frozen_vae
    test = pets_data["test"].select(range(24))
    by_trainer = trainer.predict_preferences(test, name="check")
    scorer = PersonalizedRewardScorer.from_pretrained(folder, device="cpu")
    inference = RewardInference(scorer.model, scorer.tokenizer, num_context="4", seed=trainer.args.seed,
                                context_pool=pets_data["train"])
    by_inference = inference.predict_preferences(test, name="check")  # the same name: the same context draws
    assert by_inference["user_id"] == by_trainer["user_id"]
    for key in ("reward_chosen", "reward_rejected", "latent_mean", "kl"):
        torch.testing.assert_close(torch.tensor(by_inference[key]), torch.tensor(by_trainer[key]), atol=1e-5, rtol=1e-5)


def test_prediction_leaves_the_arguments_alone_and_covers_every_pair(saved_frozen_vae, pets_data):
    trainer, _ = saved_frozen_vae
    before = dataclasses.asdict(trainer.args)
    trainer.args.dataloader_drop_last = True  # as a training run may set it: predictions still cover every pair
    try:
        predicted = trainer.predict_preferences(pets_data["test"].select(range(21)), batch_size=8, name="odd")
    finally:
        trainer.args.dataloader_drop_last = before["dataloader_drop_last"]
    assert len(predicted["reward_chosen"]) == 21
    assert dataclasses.asdict(trainer.args) == before


def test_trl_metrics_are_logged(saved_frozen_vae, tiny_backbone, pets_data, tmp_path):
    trainer, _ = saved_frozen_vae
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert {"min_reward", "mean_reward", "max_reward", "accuracy", "margin", "kl", "beta"} <= set(logged[-1])
    assert "num_tokens" not in logged[-1]  # frozen mode: no tokens go through the backbone in training

    args = frozen_args(tmp_path, model_type="base", embedding_mode="full", max_steps=2, per_device_train_batch_size=4)
    full = VPLRewardTrainer(model=tiny_backbone, args=args, train_dataset=pets_data["train"].select(range(16)))
    full.train()
    tokens = [entry["num_tokens"] for entry in full.state.log_history if "loss" in entry]
    assert len(tokens) == 2 and 0 < tokens[0] < tokens[1]


def test_frozen_mode_with_a_peft_config_is_refused(tiny_backbone, pets_data, tmp_path):
    with pytest.raises(ValueError, match="peft_config trains a LoRA adapter.*embedding_mode='frozen'"):
        VPLRewardTrainer(model=tiny_backbone, args=frozen_args(tmp_path), train_dataset=pets_data["train"],
                         peft_config=LoraConfig(r=4, target_modules="all-linear"))
