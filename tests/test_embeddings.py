"""Cached, batched, resumable embedding precomputation."""

import logging
import re
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from vpl_trl import embeddings
from vpl_trl.embeddings import EmbeddingCache, compute_embeddings, default_embedding_cache_dir, embedding_key
from vpl_trl.models import VPLRewardModel
from vpl_trl.text import render_text


@pytest.fixture(scope="module")
def model_and_tokenizer(tiny_backbone):
    torch.manual_seed(0)
    model = VPLRewardModel.from_backbone(tiny_backbone, latent_dim=4, hidden_dim=8, pooling="mean")
    return model, AutoTokenizer.from_pretrained(tiny_backbone)


class Killed(Exception):
    """Stands for the run being killed mid-way."""


def counting(model, fail_after=None):
    """Wrap `model.embed` to count the sequences it embeds (and fail after some calls, like a killed run)."""
    calls = {"sequences": 0, "batches": 0}
    embed = model.embed

    def wrapped(input_ids, attention_mask, use_adapter=True):
        if fail_after is not None and calls["batches"] >= fail_after:
            raise Killed
        calls["sequences"] += input_ids.shape[0]
        calls["batches"] += 1
        return embed(input_ids, attention_mask, use_adapter=use_adapter)

    return wrapped, calls


def test_interrupted_precomputation_resumes_without_recomputing(model_and_tokenizer, tmp_path, monkeypatch):
    model, tokenizer = model_and_tokenizer
    texts = [f"Dogs are loyal pets number {i}." for i in range(20)]
    wrapped, calls = counting(model, fail_after=3)
    monkeypatch.setattr(model, "embed", wrapped)
    with pytest.raises(Killed):
        compute_embeddings(model, tokenizer, texts, EmbeddingCache(tmp_path), batch_size=4, save_every=4)
    assert calls["sequences"] == 12

    monkeypatch.undo()
    wrapped, calls = counting(model)
    monkeypatch.setattr(model, "embed", wrapped)
    resumed = compute_embeddings(model, tokenizer, texts, EmbeddingCache(tmp_path), batch_size=4, save_every=4)
    assert calls["sequences"] == 8  # only what the interrupted run had not saved
    monkeypatch.undo()
    fresh = compute_embeddings(model, tokenizer, texts, EmbeddingCache(None), batch_size=4)
    torch.testing.assert_close(resumed, fresh, atol=1e-5, rtol=1e-5)


def test_throughput_is_logged_at_info(model_and_tokenizer, caplog):
    model, tokenizer = model_and_tokenizer
    texts = [f"Cats are independent pets number {i}." for i in range(8)]
    with caplog.at_level(logging.INFO, logger="vpl_trl"):
        compute_embeddings(model, tokenizer, texts, batch_size=4, desc="Embedding test texts")
    assert re.search(r"Embedding test texts: 8 sequences in [\d.]+ s \([\d.]+ seq/s\)", caplog.text)
    assert all(record.levelno == logging.INFO for record in caplog.records if record.name.startswith("vpl_trl"))


def test_batching_does_not_change_embeddings(model_and_tokenizer, precision):
    model, tokenizer = model_and_tokenizer
    texts = ["A short one.", "A much longer sentence about a cheerful budgie in a roomy cage."]
    one_by_one = torch.cat([compute_embeddings(model, tokenizer, [t]) for t in texts])
    precision.assert_close(compute_embeddings(model, tokenizer, texts, batch_size=2), one_by_one)


def test_cache_folder_depends_on_the_backbone_weights_and_pooling(model_and_tokenizer, other_backbone):
    model, _ = model_and_tokenizer
    other = VPLRewardModel.from_backbone(other_backbone, latent_dim=4, hidden_dim=8)
    assert default_embedding_cache_dir(model, "mean", 512) != default_embedding_cache_dir(other, "mean", 512)
    assert default_embedding_cache_dir(model, "mean", 512) != default_embedding_cache_dir(model, "last", 512)
    assert default_embedding_cache_dir(model, "mean", 512) == default_embedding_cache_dir(model, "mean", 512)


def test_chat_messages_are_rendered_with_the_chat_template(model_and_tokenizer):
    _, tokenizer = model_and_tokenizer
    chat = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    assert render_text(tokenizer, None, chat) == "<user>Hi<eos><assistant>Hello<eos>"
    assert render_text(tokenizer, "Hi", [{"role": "assistant", "content": "Hello"}]) == (
        "<user>Hi<eos><assistant>Hello<eos>"
    )
    assert render_text(tokenizer, "Q: ", "A") == "Q: A"


@pytest.mark.parametrize("damaged", ["safetensors", "json"])
def test_unreadable_shard_is_skipped_with_a_warning_and_embedded_again(damaged, model_and_tokenizer, tmp_path,
                                                                        monkeypatch):
    model, tokenizer = model_and_tokenizer
    texts = [f"Cats nap in the sun, take {i}." for i in range(12)]
    first = compute_embeddings(model, tokenizer, texts, EmbeddingCache(tmp_path), batch_size=4, save_every=4)
    shards = sorted(tmp_path.glob("shard-*.safetensors"))
    assert len(shards) == 3 and not list(tmp_path.glob(".*.tmp"))  # temporary files were renamed into place
    victim = shards[1].with_suffix(f".{damaged}")
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])  # as a crash mid-write would leave it

    wrapped, calls = counting(model)
    monkeypatch.setattr(model, "embed", wrapped)
    with pytest.warns(UserWarning, match=shards[1].name):
        again = compute_embeddings(model, tokenizer, texts, EmbeddingCache(tmp_path), batch_size=4, save_every=4)
    assert calls["sequences"] == 4  # only the damaged shard's texts
    torch.testing.assert_close(again, first)


def test_shard_is_written_atomically(model_and_tokenizer, tmp_path, monkeypatch):
    def killed_mid_write(tensors, path):
        Path(path).write_bytes(b"partial")
        raise Killed

    model, tokenizer = model_and_tokenizer
    texts = ["A goldfish circles its bowl.", "A parrot repeats a word."]
    monkeypatch.setattr(embeddings, "save_file", killed_mid_write)
    with pytest.raises(Killed):
        compute_embeddings(model, tokenizer, texts, EmbeddingCache(tmp_path), batch_size=2)
    assert not list(tmp_path.iterdir())  # neither a partial shard nor a leftover temporary file


def test_embedding_layer_pools_the_hidden_state_it_names(tiny_backbone):
    """`embedding_layer` picks the hidden state that is pooled (0: token embeddings; middle; last, the default), and
    embeddings of another layer are cached apart."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_backbone)
    batch = tokenizer(["a dog runs home", "the cat"], padding=True, return_tensors="pt")
    models = {layer: VPLRewardModel.from_backbone(tiny_backbone, latent_dim=4, hidden_dim=8, pooling="mean",
                                                  embedding_layer=layer).eval()
              for layer in ("last", "middle", "1", "2", "0")}
    with torch.no_grad():
        hidden = models["last"].model(**batch, output_hidden_states=True).hidden_states  # 2 layers: 3 states
        embedded = {layer: model.embed(batch["input_ids"], batch["attention_mask"]) for layer, model in models.items()}
    weights = batch["attention_mask"].unsqueeze(-1).float()
    for layer, state in (("0", hidden[0]), ("1", hidden[1]), ("middle", hidden[1]), ("2", hidden[2]),
                         ("last", hidden[2])):
        torch.testing.assert_close(embedded[layer], (state * weights).sum(1) / weights.sum(1))
    assert not torch.allclose(embedded["middle"], embedded["last"])
    assert embedding_key(models["middle"].config) != embedding_key(models["last"].config) == "mean"
    with pytest.raises(ValueError, match="outside the backbone's 0..2 hidden states"):
        VPLRewardModel.from_backbone(tiny_backbone, latent_dim=4, hidden_dim=8, embedding_layer="5")
    with pytest.raises(ValueError, match="last, middle or a layer number"):
        VPLRewardModel.from_backbone(tiny_backbone, latent_dim=4, hidden_dim=8, embedding_layer="top")
