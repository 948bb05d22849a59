"""bf16 inference where the hardware has it (forced here with VPL_TRL_BF16, since any CPU can emulate it)."""

from __future__ import annotations

import torch
from transformers import AutoTokenizer

from vpl_trl import VPLRewardModel
from vpl_trl.embeddings import EmbeddingCache, compute_embeddings, default_embedding_cache_dir
from vpl_trl.precision import cpu_has_native_bf16, inference_bf16


def test_default_follows_the_hardware(monkeypatch):
    monkeypatch.delenv("VPL_TRL_BF16", raising=False)
    assert inference_bf16("cpu") == cpu_has_native_bf16()
    monkeypatch.setenv("VPL_TRL_BF16", "0")
    assert not inference_bf16("cpu")
    monkeypatch.setenv("VPL_TRL_BF16", "1")
    assert inference_bf16("cpu")


def test_bf16_embeddings_are_close_to_fp32_and_cached_apart(tiny_backbone, monkeypatch):
    model = VPLRewardModel.from_backbone(tiny_backbone, latent_dim=8, hidden_dim=16)
    tokenizer = AutoTokenizer.from_pretrained(tiny_backbone)
    texts = ["Dogs are loyal and friendly.", "Cats are calm.", "A parrot can talk, and lives for decades."]
    monkeypatch.setenv("VPL_TRL_BF16", "0")
    fp32, fp32_dir = (
        compute_embeddings(model, tokenizer, texts, EmbeddingCache(None)),
        default_embedding_cache_dir(model, "mean", 64),
    )
    monkeypatch.setenv("VPL_TRL_BF16", "1")
    bf16, bf16_dir = (
        compute_embeddings(model, tokenizer, texts, EmbeddingCache(None)),
        default_embedding_cache_dir(model, "mean", 64),
    )
    assert bf16.dtype == torch.float32 and not torch.equal(bf16, fp32)  # computed in bf16, stored as fp32
    torch.testing.assert_close(bf16, fp32, rtol=0.05, atol=0.05 * float(fp32.abs().max()))
    assert bf16_dir != fp32_dir
