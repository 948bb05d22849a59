"""Shared fixtures: a tiny Llama backbone with a tokenizer trained here, tiny Pets data, an isolated cache."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@dataclass(frozen=True)
class Precision:
    """An inference precision (`VPL_TRL_BF16`) and the tolerances of comparing what ran in it by two paths
    (batched and alone, scorer and forward): fp32's rounding, or bf16's 8-bit mantissa (torch's bf16 defaults)."""

    bf16: bool
    atol: float
    rtol: float

    def approx(self, expected):
        return pytest.approx(expected, abs=self.atol, rel=self.rtol)

    def assert_close(self, actual, expected) -> None:
        torch.testing.assert_close(torch.as_tensor(actual), torch.as_tensor(expected), atol=self.atol, rtol=self.rtol)


PRECISIONS = {"bf16": Precision(True, atol=1e-2, rtol=1.6e-2), "fp32": Precision(False, atol=1e-5, rtol=1e-4)}


@pytest.fixture(params=list(PRECISIONS))
def precision(request, monkeypatch) -> Precision:
    """Runs a precision-sensitive test once in bf16 and once in fp32, whatever this CPU would choose by itself
    (bf16 runs on any CPU, emulated where it is not native), and gives the tolerances of each."""
    chosen = PRECISIONS[request.param]
    monkeypatch.setenv("VPL_TRL_BF16", "1" if chosen.bf16 else "0")
    return chosen


def build_tiny_backbone(folder: Path, hidden_size: int = 32, seed: int = 0) -> Path:
    """A 2-layer Llama (random weights) and a byte-level BPE tokenizer trained on Pets sentences."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from vpl_trl.data.pets import KINDS, PROMPT, sentences

    corpus = [PROMPT] + [s for kind in KINDS for split in ("train", "test") for s in sentences(kind, split)]
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600,
        special_tokens=["<pad>", "<eos>", "<unk>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<eos>", pad_token="<pad>", unk_token="<unk>")
    fast.chat_template = (
        "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}<eos>{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}"
    )
    config = LlamaConfig(
        vocab_size=len(fast),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        pad_token_id=fast.pad_token_id,
        eos_token_id=fast.eos_token_id,
        bos_token_id=None,
    )
    torch.manual_seed(seed)
    LlamaForCausalLM(config).save_pretrained(folder)
    fast.save_pretrained(folder)
    return folder


@pytest.fixture(autouse=True, scope="session")
def _isolated_cache(tmp_path_factory):
    """Embedding caches go to a per-session folder, never the user's cache."""
    old = os.environ.get("VPL_TRL_CACHE")
    os.environ["VPL_TRL_CACHE"] = str(tmp_path_factory.mktemp("vpl-cache"))
    yield
    if old is None:
        os.environ.pop("VPL_TRL_CACHE", None)
    else:
        os.environ["VPL_TRL_CACHE"] = old


@pytest.fixture(scope="session")
def tiny_backbone(tmp_path_factory) -> str:
    return str(build_tiny_backbone(tmp_path_factory.mktemp("tiny-llama")))


@pytest.fixture(scope="session")
def other_backbone(tmp_path_factory) -> str:
    """A second tiny backbone of another width (for checkpoint-mismatch errors)."""
    return str(build_tiny_backbone(tmp_path_factory.mktemp("tiny-llama-48"), hidden_size=48, seed=1))


@pytest.fixture(scope="session")
def pets_data(tmp_path_factory):
    """A small Pets dataset (full variant) as `datasets` splits."""
    from vpl_trl.data import build_pets, load_preference_splits

    folder = tmp_path_factory.mktemp("pets")
    build_pets(folder, n_train_per_user=300, n_test_per_user=60, seed=0)
    return load_preference_splits(folder)


def train_tiny_reward_model(folder: Path, backbone: str, pets_data, model_type: str) -> str:
    """A tiny reward model of `model_type` trained briefly on Pets, saved with its tokenizer."""
    from vpl_trl import VPLRewardConfig, VPLRewardTrainer

    args = VPLRewardConfig(
        output_dir=str(folder / "run"),
        model_type=model_type,
        latent_dim=8,
        hidden_dim=32,
        learning_rate=1e-3,
        num_train_epochs=1,
        per_device_train_batch_size=16,
        num_context="4",
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
        embedding_mode="frozen",
    )
    trainer = VPLRewardTrainer(model=backbone, args=args, train_dataset=pets_data["train"].select(range(160)))
    trainer.train()
    trainer.save_model(str(folder / "model"))
    return str(folder / "model")


@pytest.fixture(scope="session")
def tiny_reward_model(tmp_path_factory, tiny_backbone, pets_data) -> str:
    """A tiny VPL (`vae`) reward model trained briefly on Pets, saved with its tokenizer."""
    return train_tiny_reward_model(tmp_path_factory.mktemp("tiny-vpl-reward"), tiny_backbone, pets_data, "vae")


@pytest.fixture(scope="session")
def tiny_base_reward_model(tmp_path_factory, tiny_backbone, pets_data) -> str:
    """A tiny Bradley-Terry (`base`) reward model: the same reward for every user."""
    return train_tiny_reward_model(tmp_path_factory.mktemp("tiny-bt-reward"), tiny_backbone, pets_data, "base")
