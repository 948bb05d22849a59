"""Text rendering and cached backbone embeddings.

Context pairs (and, in `frozen` mode, every response) are embedded once with the frozen backbone and
kept in an `EmbeddingCache`: in memory, and on disk in one folder per backbone (keyed by its identity,
a digest of its weights, the pooling and the maximum length), written in shards as the work goes, so an
interrupted precomputation resumes where it stopped.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from accelerate import PartialState
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm
from transformers.utils import logging

from .embedded_model import cache_dir
from .precision import inference_autocast, inference_bf16

logger = logging.get_logger(__name__)


def text_key(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def backbone_fingerprint(model, pooling: str, max_length: int | None) -> str:
    """Identifies the embeddings a backbone produces: name, architecture, a digest of weights, pooling, length."""
    backbone = model.backbone.get_base_model() if hasattr(model.backbone, "get_base_model") else model.backbone
    digest = hashlib.sha256()
    digest.update(json.dumps(model.config.backbone_signature, sort_keys=True).encode())
    digest.update(f"{pooling}-{max_length}".encode())
    params = [p for p in backbone.parameters()]
    for param in (params[0], params[len(params) // 2], params[-1]):
        digest.update(param.detach().flatten()[:4096].float().cpu().numpy().tobytes())
    name = Path(str(model.config.backbone_name_or_path or "backbone")).name
    return f"{name}-{digest.hexdigest()[:16]}"


class EmbeddingCache:
    """Text -> embedding vector, in memory and (when `directory` is set) in shards on disk."""

    def __init__(self, directory: str | os.PathLike | None):
        self.directory = Path(directory) if directory else None
        self._vectors: dict[str, torch.Tensor] = {}
        self._loaded: set[str] = set()
        self.refresh()

    def refresh(self) -> None:
        """Load shards written since the last look (by an interrupted run, or by another process)."""
        if not self.directory or not self.directory.exists():
            return
        for shard in sorted(self.directory.glob("shard-*.safetensors")):
            keys_file = shard.with_suffix(".json")
            if shard.name in self._loaded or not keys_file.exists():
                continue  # seen already, or incomplete: a shard's key list is written last
            self._loaded.add(shard.name)  # an unreadable shard is reported once, its texts embedded again
            try:
                keys, vectors = json.loads(keys_file.read_text()), load_file(str(shard))["embeddings"]
                if not isinstance(keys, list) or len(keys) != len(vectors):
                    raise ValueError(f"expected a list of {len(vectors)} keys in {keys_file.name}")
            except Exception as error:  # truncated or corrupt files (safetensors raises its own error types)
                warnings.warn(
                    f"Skipping the unreadable embedding cache shard {shard} (keys: {keys_file.name}): {error}. "
                    "Its texts are embedded again.",
                    stacklevel=2,
                )
                continue
            self._vectors.update(zip(keys, vectors))

    def __len__(self) -> int:
        return len(self._vectors)

    def __contains__(self, text: str) -> bool:
        return text_key(text) in self._vectors

    def get(self, text: str) -> torch.Tensor:
        return self._vectors[text_key(text)]

    def add(self, texts: Sequence[str], vectors: torch.Tensor) -> None:
        keys = [text_key(t) for t in texts]
        vectors = vectors.detach().float().cpu()
        self._vectors.update(zip(keys, vectors))
        if self.directory:
            self.directory.mkdir(parents=True, exist_ok=True)
            shard = self.directory / f"shard-{time.time_ns()}-{os.getpid()}.safetensors"
            _write_atomically(shard, lambda path: save_file({"embeddings": vectors.contiguous()}, str(path)))
            # The key list is written last: a shard is complete only once it exists.
            _write_atomically(shard.with_suffix(".json"), lambda path: path.write_text(json.dumps(keys)))
            self._loaded.add(shard.name)


def _write_atomically(path: Path, write: Callable[[Path], Any]) -> None:
    """`write(temporary)` in `path`'s folder, then rename onto `path`: readers never see a partial file."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # shard names are unique per process already
    try:
        write(temporary)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def embedding_key(config) -> str:
    """What, besides the backbone's weights, decides a text's embedding: the pooling, and the layer pooled (caches
    of the last layer keep the name they had before the layer could be chosen)."""
    layer = str(getattr(config, "embedding_layer", None) or "last")
    return config.pooling if layer == "last" else f"{config.pooling}-layer-{layer}"


def default_embedding_cache_dir(model, pooling: str, max_length: int | None) -> Path:
    """The cache of one backbone's embeddings, per pooling, maximum length and precision (bf16 ones apart)."""
    precision = "-bf16" if inference_bf16(next(model.parameters()).device) else ""
    return cache_dir() / "embeddings" / (backbone_fingerprint(model, pooling, max_length) + precision)


@torch.no_grad()
def compute_embeddings(
    model,
    tokenizer,
    texts: Sequence[str],
    cache: EmbeddingCache | None = None,
    batch_size: int = 16,
    max_length: int | None = 512,
    use_adapter: bool = False,
    save_every: int = 256,
    desc: str = "Embedding texts",
) -> torch.Tensor:
    """Embeddings (len(texts), d) of `texts` with the model's backbone, computing only what `cache` lacks.

    Texts are sorted by length and batched; results reach the cache every `save_every` texts.
    """
    cache = cache if cache is not None else EmbeddingCache(None)
    cache.refresh()
    todo = sorted({t for t in texts if t not in cache}, key=len)
    if todo:
        was_training = model.training
        model.eval()
        device = next(model.backbone.parameters()).device
        start, pending_texts, pending_vectors = time.perf_counter(), [], []
        report = PartialState().is_main_process  # in a multi-process run, progress comes from the main process only
        bar = tqdm(total=len(todo), desc=desc, unit="seq", disable=len(todo) < batch_size or not report)
        for begin in range(0, len(todo), batch_size):
            batch = todo[begin : begin + batch_size]
            encoded = _tokenize(tokenizer, batch, max_length).to(device)
            with inference_autocast(device):
                vectors = model.embed(encoded["input_ids"], encoded["attention_mask"], use_adapter=use_adapter)
            pending_texts += batch
            pending_vectors.append(vectors.float().cpu())
            bar.update(len(batch))
            if len(pending_texts) >= save_every or begin + batch_size >= len(todo):
                cache.add(pending_texts, torch.cat(pending_vectors))
                pending_texts, pending_vectors = [], []
        bar.close()
        elapsed = time.perf_counter() - start
        if len(todo) >= batch_size and report:
            logger.info(f"{desc}: {len(todo)} sequences in {elapsed:.1f} s ({len(todo) / elapsed:.1f} seq/s)")
        model.train(was_training)
    return torch.stack([cache.get(t) for t in texts]) if texts else torch.empty(0)


def _tokenize(tokenizer, texts: Iterable[str], max_length: int | None):
    """Right-padded batch with EOS appended; over-long texts keep their end (where the last token is)."""
    eos = tokenizer.eos_token or ""
    texts = [t if t.endswith(eos) else t + eos for t in texts]
    side = tokenizer.truncation_side
    tokenizer.truncation_side = "left"
    try:
        return tokenizer(
            texts,
            padding=True,
            truncation=max_length is not None,
            max_length=max_length,
            return_tensors="pt",
            add_special_tokens=False,
        )
    finally:
        tokenizer.truncation_side = side


class EmbeddingTable:
    """A growing table of distinct texts and their embeddings; datasets refer to rows by index."""

    def __init__(self, model, tokenizer, cache: EmbeddingCache, batch_size: int, max_length: int | None):
        self.model, self.tokenizer, self.cache = model, tokenizer, cache
        self.batch_size, self.max_length = batch_size, max_length
        self.index: dict[str, int] = {}
        self._rows: list[torch.Tensor] = []
        self._tensor: torch.Tensor | None = None

    def add(self, texts: Iterable[str], desc: str = "Embedding texts") -> None:
        new = [t for t in dict.fromkeys(texts) if t not in self.index]
        if not new:
            return
        vectors = compute_embeddings(
            self.model, self.tokenizer, new, self.cache, self.batch_size, self.max_length, use_adapter=False, desc=desc
        )
        for text, vector in zip(new, vectors):
            self.index[text] = len(self._rows)
            self._rows.append(vector)
        self._tensor = None

    def reset(self, model) -> None:
        """Forget every text and embedding (the backbone changed): texts added from now on are embedded by
        `model`, in memory."""
        self.model, self.cache = model, EmbeddingCache(None)
        self.index, self._rows, self._tensor = {}, [], None

    @property
    def tensor(self) -> torch.Tensor:
        if self._tensor is None:
            self._tensor = torch.stack(self._rows)
        return self._tensor
