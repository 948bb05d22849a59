"""The VPL reward model: latent conditioning, save/reload, errors; the losses and the KL schedule."""

import json

import pytest
import torch
from transformers import AutoModel

from vpl_trl import VPLRewardConfig
from vpl_trl.losses import categorical_chosen_probability, kl_weight_at, mean_and_variance_loss
from vpl_trl.models import VPLConfig, VPLRewardModel


def make_model(backbone, **kwargs):
    torch.manual_seed(0)
    kwargs.setdefault("latent_dim", 8)
    kwargs.setdefault("hidden_dim", 16)
    return VPLRewardModel.from_backbone(backbone, **kwargs).eval()


def context(batch=2, k=3, d=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, k, d, generator=g), torch.randn(batch, k, d, generator=g)


def test_rewards_depend_on_the_user_context(tiny_backbone):
    model = make_model(tiny_backbone)
    embeddings = torch.randn(4, 32)
    chosen_a, rejected_a = context(seed=1)
    out_a = model(embeddings=embeddings, context_chosen=chosen_a, context_rejected=rejected_a)
    out_b = model(embeddings=embeddings, context_chosen=rejected_a, context_rejected=chosen_a)
    assert out_a.logits.shape == (4, 1) and out_a.kl.ndim == 0
    assert not torch.allclose(out_a.logits, out_b.logits)
    # Rows follow TRL's layout (chosen then rejected): rows i and i + 2 are scored under user i's latent.
    for row in range(4):
        user = row % 2
        alone = model(embeddings=embeddings[row : row + 1], latent=out_a.latent[user : user + 1]).logits
        torch.testing.assert_close(alone[0], out_a.logits[row])
    assert not torch.allclose(model(embeddings=embeddings, latent=out_a.latent.flip(0)).logits, out_a.logits)


def test_unknown_forward_arguments_are_refused(tiny_backbone):
    model = make_model(tiny_backbone, reward_type="base")
    embeddings = torch.randn(2, 32)
    expected = model(embeddings=embeddings).logits
    # What Trainer and TRL pass along changes nothing.
    torch.testing.assert_close(model(embeddings=embeddings, use_cache=False, return_dict=True).logits, expected)
    with pytest.raises(TypeError, match=r"unexpected argument\(s\) \['context'\]"):
        model(embeddings=embeddings, context=torch.randn(1, 2, 32))


def test_a_model_built_from_its_config_loads_no_weights(tiny_backbone, tmp_path):
    pretrained = make_model(tiny_backbone)
    built = VPLRewardModel(pretrained.config)  # the backbone from `config.backbone_config`, freshly initialized
    assert type(built.model) is type(pretrained.model)
    assert (
        built.model.config.hidden_size == 32
        and built.config.backbone_signature == pretrained.config.backbone_signature
    )
    assert not torch.equal(built.model.embed_tokens.weight, pretrained.model.embed_tokens.weight)
    # A configuration saved before `backbone_config` existed builds from the backbone's configuration file.
    pretrained.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["backbone_config"]["model_type"] == "llama"
    del saved["backbone_config"]
    (tmp_path / "config.json").write_text(json.dumps(saved))
    old = VPLConfig.from_pretrained(tmp_path)
    assert VPLRewardModel(old).model.config.num_hidden_layers == 2
    reloaded = VPLRewardModel.from_pretrained(tmp_path)
    ids = torch.tensor([[5, 6, 7, 8]])
    chosen, rejected = context(batch=1)
    kwargs = dict(input_ids=ids, context_chosen=chosen, context_rejected=rejected)
    torch.testing.assert_close(reloaded(**kwargs).logits, pretrained(**kwargs).logits, rtol=0, atol=0)


def test_padded_context_pairs_are_ignored(tiny_backbone):
    model = make_model(tiny_backbone)
    chosen, rejected = context(batch=1, k=2)
    mean, _ = model.encode_context(chosen, rejected)
    padded = (torch.cat([chosen, torch.randn(1, 3, 32)], 1), torch.cat([rejected, torch.randn(1, 3, 32)], 1))
    mask = torch.tensor([[True, True, False, False, False]])
    padded_mean, _ = model.encode_context(*padded, context_mask=mask)
    torch.testing.assert_close(mean, padded_mean)


def test_context_of_the_wrong_shape_gets_a_clear_error(tiny_backbone):
    model = make_model(tiny_backbone)
    with pytest.raises(ValueError, match=r"shape \(batch, K, embedding_dim\)"):
        model(embeddings=torch.randn(2, 32), context_chosen=torch.randn(2, 32), context_rejected=torch.randn(2, 32))
    with pytest.raises(ValueError, match="needs the user's context pairs"):
        model(embeddings=torch.randn(2, 32))


def test_baselines_ignore_context(tiny_backbone):
    model = make_model(tiny_backbone, reward_type="base")
    assert not hasattr(model, "encoder")
    assert model(embeddings=torch.randn(3, 32)).logits.shape == (3, 1)


@pytest.mark.parametrize("mode", ["frozen", "lora"])
def test_saved_model_reloads_to_identical_rewards(tiny_backbone, tmp_path, mode):
    model = make_model(tiny_backbone, embedding_mode=mode)
    model.fit_embedding_statistics(torch.randn(10, 32) * 3 + 1)
    if mode == "lora":  # make the adapter non-trivial, as after training
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_B" in name:
                    param.normal_(0, 0.1)
    model.save_pretrained(tmp_path)
    saved = {p.name for p in tmp_path.iterdir()}
    assert saved == {"config.json", "model.safetensors"}
    assert (tmp_path / "model.safetensors").stat().st_size < 200_000  # heads and adapter, not the backbone
    reloaded = VPLRewardModel.from_pretrained(tmp_path)
    ids = torch.tensor([[5, 6, 7, 8], [9, 10, 11, 0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]])
    chosen, rejected = context(batch=1)
    kwargs = dict(input_ids=ids, attention_mask=mask, context_chosen=chosen, context_rejected=rejected)
    torch.testing.assert_close(model(**kwargs).logits, reloaded(**kwargs).logits, rtol=0, atol=0)
    if mode == "frozen":  # the Auto classes know the model type too
        auto = AutoModel.from_pretrained(tmp_path)
        assert isinstance(auto, VPLRewardModel)
        torch.testing.assert_close(auto(**kwargs).logits, reloaded(**kwargs).logits, rtol=0, atol=0)


def test_loading_with_another_backbone_is_refused(tiny_backbone, other_backbone, tmp_path):
    make_model(tiny_backbone).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="trained on a backbone with .*hidden_size.*32.*48"):
        VPLRewardModel.from_pretrained(tmp_path, backbone=other_backbone)


def test_loading_a_folder_that_is_not_a_vpl_model(tiny_backbone):
    with pytest.raises(ValueError, match="not a VPL reward model"):
        VPLRewardModel.from_pretrained(tiny_backbone)


def test_distributional_losses():
    same = torch.zeros(4, 10)
    torch.testing.assert_close(categorical_chosen_probability(same, same), torch.full((4,), 0.5))
    high, low = torch.full((1, 10), -10.0), torch.full((1, 10), -10.0)
    high[0, -1], low[0, 0] = 10.0, 10.0
    assert categorical_chosen_probability(high, low).item() > 0.99
    better = torch.tensor([[2.0, 0.0]])
    worse = torch.tensor([[0.0, 0.0]])
    assert mean_and_variance_loss(better, worse) < mean_and_variance_loss(worse, better)


def test_kl_schedule():
    assert kl_weight_at(123, 0.5, "constant", 100, 0.1) == 0.5
    assert kl_weight_at(0, 1.0, "linear", 100, 0.0) == 0.0
    assert kl_weight_at(50, 1.0, "linear", 100, 0.0) == pytest.approx(0.5)
    assert kl_weight_at(0, 1.0, "cyclical", 100, 0.1) == pytest.approx(0.1)
    assert kl_weight_at(50, 1.0, "cyclical", 100, 0.1) == pytest.approx(1.0)
    assert kl_weight_at(100, 1.0, "cyclical", 100, 0.1) == pytest.approx(0.1)  # a new cycle


def test_the_model_shape_is_declared_once_and_old_lora_settings_load(tmp_path):
    from dataclasses import fields

    from vpl_trl.models.configuration_vpl import VPLArchitecture

    args = VPLRewardConfig(output_dir=str(tmp_path), latent_dim=8, pooling="mean", decoder_type="bilinear",
                           normalize_latent=False, report_to="none")
    config = VPLConfig(**args.model_config_kwargs())
    assert {f.name: getattr(config, f.name) for f in fields(VPLArchitecture)} == args.architecture()
    assert config.reward_type == args.model_type and config.peft_config is None
    # A configuration saved when LoRA had fields of its own: they become its adapter's configuration.
    legacy = VPLConfig(embedding_mode="lora", lora_r=4, lora_target_modules=["q_proj"])
    assert {k: legacy.peft_config[k] for k in ("r", "lora_alpha", "target_modules")} == {
        "r": 4, "lora_alpha": 32, "target_modules": ["q_proj"]}
    assert not hasattr(legacy, "lora_r")
