"""QLoRA-style training on a bitsandbytes-quantized backbone (the recipe's `--load_in_4bit` / `--load_in_8bit`),
on CPU: bitsandbytes >= 0.49 runs 4-bit and 8-bit layers, forward and backward, on its CPU backend."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from bitsandbytes.nn import Linear4bit, Linear8bitLt
from transformers import AutoTokenizer, BitsAndBytesConfig
from trl import ModelConfig

from vpl_trl import VPLRewardConfig, VPLRewardModel, VPLRewardTrainer
from vpl_trl.embeddings import _tokenize
from vpl_trl.models.backbone import load_backbone
from vpl_trl.scripts.train_reward import model_inputs
from vpl_trl.text import render_text

pytestmark = pytest.mark.slow  # quantized backbones (make test-fast skips them)

QUANTIZED_LAYER = {"load_in_4bit": Linear4bit, "load_in_8bit": Linear8bitLt}

# In a fresh interpreter: the reward recipe's and the data CLI's --help, and vpl_trl, leave bitsandbytes unimported; a
# quantized backbone imports it then, and peft still wraps its 4-bit layers with LoRA.
LAZY_BITSANDBYTES = """
import contextlib, io, runpy, sys
import torch
backbone = sys.argv[1]
sys.argv = ["recipes/train_reward.py", "--help"]
with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):
    runpy.run_path("recipes/train_reward.py", run_name="__main__")
import vpl_trl
from vpl_trl.data.__main__ import main
with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):
    main(["--help"])
assert "bitsandbytes" not in sys.modules, "bitsandbytes imported by the recipe, vpl_trl or the data CLI"
from transformers import BitsAndBytesConfig
quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.bfloat16)
model = vpl_trl.VPLRewardModel.from_backbone(backbone, dtype=torch.bfloat16, embedding_mode="lora", latent_dim=4,
                                             hidden_dim=8, backbone_kwargs={"quantization_config": quantization})
from bitsandbytes.nn import Linear4bit
assert isinstance(model.backbone.layers[0].self_attn.q_proj.base_layer, Linear4bit)
"""



def trainable(model) -> dict[str, torch.Tensor]:
    return {name: param for name, param in model.named_parameters() if param.requires_grad}


@torch.no_grad()
def rewards(model: VPLRewardModel, tokenizer, pairs, context) -> torch.Tensor:
    model.eval()
    texts = [render_text(tokenizer, p["prompt"], p[side]) for side in ("chosen", "rejected") for p in pairs]
    encoded = _tokenize(tokenizer, texts, max_length=128)
    inputs = {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}
    for side in ("chosen", "rejected"):
        ctx = _tokenize(tokenizer, [render_text(tokenizer, p["prompt"], p[side]) for p in context], max_length=128)
        inputs[f"context_{side}"] = model.embed(ctx["input_ids"], ctx["attention_mask"], use_adapter=False)[None]
    return model(**inputs).logits.squeeze(-1).float()


@pytest.mark.parametrize("flag", ["load_in_4bit", "load_in_8bit"])
def test_quantized_backbone_trains_the_adapter_and_heads_in_bf16(flag, tiny_backbone, pets_data, tmp_path):
    args = VPLRewardConfig(
        output_dir=str(tmp_path / "out"), model_type="vae", embedding_mode="lora", latent_dim=8, hidden_dim=32,
        num_context="4", pooling="mean", max_length=128, per_device_train_batch_size=8, max_steps=3,
        learning_rate=3e-3, logging_steps=1, report_to="none", save_strategy="no", disable_tqdm=True,
    )
    # The recipe's path: ModelConfig flags -> BitsAndBytesConfig (bf16 compute) -> the backbone's from_pretrained.
    inputs = model_inputs(ModelConfig(model_name_or_path=tiny_backbone, **{flag: True}), args)
    trainer = VPLRewardTrainer(**inputs, args=args, train_dataset=pets_data["train"].select(range(64)))
    model = trainer.model.get_base_model()  # the adapter is added as TRL adds one: PEFT wraps the whole model
    backbone = model.backbone
    assert isinstance(backbone.layers[0].self_attn.q_proj.base_layer, QUANTIZED_LAYER[flag])
    assert getattr(model, f"is_loaded_in_{flag[len('load_in_'):]}")
    if flag == "load_in_4bit":
        assert backbone.config.quantization_config.bnb_4bit_compute_dtype == torch.bfloat16
    # Heads and adapter in bf16, as TRL casts the trainable parameters of quantized models.
    before = {name: param.detach().clone() for name, param in trainable(model).items()}
    assert {param.dtype for param in before.values()} == {torch.bfloat16}
    assert any(name.startswith("encoder.") for name in before) and any("lora_B" in name for name in before)

    trainer.train()

    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
    after = trainable(model)
    assert {param.dtype for param in after.values()} == {torch.bfloat16}
    # The LoRA B matrices start at zero: gradients reached the adapter through the quantized layers.
    lora_b = [name for name in after if "lora_B" in name]
    assert all(after[name].abs().sum() > 0 for name in lora_b), "an adapter layer received no gradient"
    assert not torch.equal(after["decoder.0.weight"], before["decoder.0.weight"])

    if flag == "load_in_4bit":
        # The saved heads and adapter reload onto a freshly quantized backbone to the same rewards.
        model.save_pretrained(tmp_path / "saved")
        quantized = load_backbone(
            tiny_backbone, dtype=torch.bfloat16, quantization_config=backbone.config.quantization_config
        )
        reloaded = VPLRewardModel.from_pretrained(tmp_path / "saved", backbone=quantized)
        tokenizer = AutoTokenizer.from_pretrained(tiny_backbone)
        test = pets_data["test"]
        pairs = [test[i] for i in range(6)]
        context = [row for row in pets_data["train"].select(range(40)) if row["user_id"] == "helpful"][:4]
        expected = rewards(model, tokenizer, pairs, context)
        torch.testing.assert_close(rewards(reloaded, tokenizer, pairs, context), expected)


def test_bitsandbytes_is_imported_only_for_a_quantized_backbone(tiny_backbone):
    run = subprocess.run([sys.executable, "-c", LAZY_BITSANDBYTES, tiny_backbone], cwd=Path(__file__).parents[1],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-4000:]


def test_4bit_layers_keep_passing_gradients_after_inference(tiny_backbone):
    """The path of a CPU with AVX512-BF16: there bitsandbytes would repack a 4-bit weight for its inference kernel the
    first time the layer runs without gradients, and the layer would then pass none back to the adapters below it
    (and fail to repack a layer narrower than a quantization block). Every loaded backbone keeps the trainable
    layout; on other CPUs the same steps run the plain path."""
    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.bfloat16)
    model = VPLRewardModel.from_backbone(tiny_backbone, dtype=torch.bfloat16, embedding_mode="lora", latent_dim=4,
                                         hidden_dim=8, backbone_kwargs={"quantization_config": quantization})
    layers = [m for m in model.modules() if isinstance(m, Linear4bit)]
    assert layers and not any(layer.support_avx512bf16_for_cpu for layer in layers)
    tokenizer = AutoTokenizer.from_pretrained(tiny_backbone)
    batch = _tokenize(tokenizer, ["Dogs are loyal.", "A calm cat sleeps all day long."], max_length=64)

    model.eval()
    with torch.no_grad():  # as contexts are embedded, and as evaluation runs
        model.embed(batch["input_ids"], batch["attention_mask"], use_adapter=False)
    assert not any(getattr(layer.weight.quant_state, "packing_format_for_cpu", False) for layer in layers)

    model.train()
    model.embed(batch["input_ids"], batch["attention_mask"]).float().pow(2).sum().backward()
    # lora_B starts at zero, so the first layer's adapter gets a gradient only back through the 4-bit layers above
    first = model.backbone.layers[0].self_attn.q_proj.lora_B["default"].weight
    assert first.grad is not None and first.grad.abs().sum() > 0
