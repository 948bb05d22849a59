"""`RewardInference`: the one path from texts to a VPL reward model's rewards, in training and after it.

It embeds texts with the backbone into an `EmbeddingTable` backed by the disk cache (context pairs always, with the
adapter disabled; in `frozen` mode every scored response too, so what training embedded is never embedded again),
attaches each example's context pairs (drawn from the users' pairs in `context_pool`), encodes users into latents
and scores. `VPLRewardTrainer` prepares its datasets with it; `PersonalizedRewardScorer` serves a saved model with
it; `python -m vpl_trl.evaluate` and active queries predict with it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from accelerate import PartialState
from datasets import Dataset, IterableDataset, concatenate_datasets
from trl.data_utils import get_dataset_column_names

from ..data.context import attach_contexts
from ..data.format import PreferenceDataError
from ..distributed import barrier, gathered_parameters, is_zero3_partitioned, union_across_processes
from ..embeddings import (
    EmbeddingCache,
    EmbeddingTable,
    compute_embeddings,
    default_embedding_cache_dir,
    embedding_key,
)
from ..losses import gaussian_kl
from ..models import VPLRewardModel
from ..text import render_text

# Columns that a prepared dataset carries: rows of the embedding table
INDEX_COLUMNS = ("chosen_index", "rejected_index")
CONTEXT_COLUMNS = ("context_chosen_index", "context_rejected_index")
AUTO = "auto"


class RewardInference:
    """Embeddings (cached), contexts, user latents and rewards of one VPL reward model.

    Args:
        model: the reward model (unwrapped; its backbone may be partitioned by DeepSpeed ZeRO-3).
        tokenizer: its tokenizer, which renders texts as in training.
        num_context: context pairs per example without its own context, `"8"` or a range `"2-8"`.
        seed: the seed of context draws (the same draws as in training for the same seed and dataset name).
        context_pool: the pairs that contexts are drawn from (the training set), by user.
        batch_size: texts per embedding batch, and pairs per prediction batch.
        max_length: tokens of a scored sequence (default: the length the model was trained with).
        cache_dir: the embedding cache: a folder, `"auto"` (the vpl-trl cache, keyed by the backbone's weights) or
            None (in memory only, as when the backbone is being fine-tuned).
        collective: every process of a multi-process run embeds and prepares the same texts at the same time (the
            trainer's dataset preparation), so the main process of each machine embeds first and writes the cache
            for the others, and a ZeRO-3 partitioned backbone embeds on all of them together. Without it (serving,
            a policy run scoring its own samples on each process) each process embeds what it needs, alone.
    """

    def __init__(
        self,
        model: VPLRewardModel,
        tokenizer,
        num_context: int | str = "8",
        seed: int = 0,
        context_pool: Dataset | None = None,
        batch_size: int = 16,
        max_length: int | None = None,
        cache_dir: str | Path | None = AUTO,
        collective: bool = False,
    ):
        self.model, self.tokenizer = model, tokenizer
        self.collective = collective
        self.num_context, self.seed, self.context_pool = num_context, seed, context_pool
        self.batch_size = batch_size
        # by default, truncate where training did (models saved before this setting existed trained at 512)
        self.max_length = max_length or getattr(model.config, "max_sequence_length", None) or 512
        if cache_dir == AUTO:
            with gathered_parameters(model.backbone):  # the folder is keyed by a digest of the backbone's weights
                cache_dir = default_embedding_cache_dir(model, embedding_key(model.config), self.max_length)
        self.cache = EmbeddingCache(cache_dir)
        self.table = EmbeddingTable(model, tokenizer, self.cache, batch_size, self.max_length)
        self._scored = EmbeddingCache(None)  # texts embedded with the adapter (lora and full modes), in memory

    @property
    def inference(self) -> RewardInference:
        """Itself: evaluation code takes a trainer or a `RewardInference`, and reads `.inference` of either."""
        return self

    @property
    def uses_latent(self) -> bool:
        return bool(self.model.config.use_latent)

    @property
    def device(self) -> torch.device:
        return next(self.model.decoder.parameters()).device

    # ----- texts ------------------------------------------------------------------------------------------

    def embed(self, texts: Sequence[str], desc: str = "Embedding texts") -> torch.Tensor:
        """Frozen embeddings (backbone without its adapter) of `texts`, through the cache (`collective`: added to
        the table, as the trainer's datasets refer to them)."""
        if self.collective:
            self.add_to_table(texts, desc)
            return self.rows(texts)
        return compute_embeddings(self.model, self.tokenizer, list(texts), self.cache, self.batch_size,
                                  self.max_length, desc=desc)

    def add_to_table(self, texts: Sequence[str], desc: str = "Embedding texts") -> None:
        """Add the frozen embeddings of `texts` to the table, through its cache.

        `collective`: the main process of each machine embeds what the cache lacks and writes it, and the others
        read it from there; under ZeRO-3 each process holds a slice of the backbone, so all of them embed the
        missing texts together (the same forward calls), and the main ones write the cache.
        """
        table, state = self.table, PartialState()
        if not self.collective:
            table.add(texts, desc=desc)
        elif not is_zero3_partitioned(self.model.backbone):
            with state.local_main_process_first():
                table.add(texts, desc=desc)
        else:
            table.cache.refresh()
            missing = union_across_processes([t for t in dict.fromkeys(texts) if t not in table.index
                                              and t not in table.cache])
            with gathered_parameters(self.model.backbone):
                vectors = compute_embeddings(self.model, self.tokenizer, missing, None, self.batch_size,
                                             self.max_length, desc=desc)
            if missing and (state.local_process_index == 0 or table.cache.directory is None):
                table.cache.add(missing, vectors)
            barrier()
            table.add(texts, desc=desc)  # all cached now

    def rows(self, texts: Sequence[str]) -> torch.Tensor:
        """The table's embeddings of texts it holds."""
        if not texts:
            return torch.empty(0, self.model.config.embedding_dim)
        return self.table.tensor[torch.tensor([self.table.index[t] for t in texts])]

    def embed_scored(self, texts: Sequence[str], desc: str = "Scoring texts") -> torch.Tensor:
        """Embeddings of texts to score: in `frozen` mode the frozen ones (through the cache, on disk shared with
        training); otherwise the backbone's with its adapter, kept in memory."""
        if self.model.config.embedding_mode == "frozen":
            return self.embed(texts, desc=desc)
        return compute_embeddings(self.model, self.tokenizer, texts, self._scored, self.batch_size, self.max_length,
                                  use_adapter=True, desc=desc)

    def reembed_contexts(self, model: VPLRewardModel) -> None:
        """Embed every text of the table again with `model`'s backbone, into the same rows (in memory): in `full`
        mode that backbone trains, and a saved and reloaded model embeds the contexts with what it became."""
        texts = list(self.table.index)
        self.model = model
        self.table.reset(model)
        self.cache, self._scored = self.table.cache, EmbeddingCache(None)
        self.add_to_table(texts, desc="Embedding contexts with the trained backbone")

    # ----- datasets ---------------------------------------------------------------------------------------

    def prepare(self, dataset: Dataset | IterableDataset, name: str, context_draws: int = 1,
                keep_in_memory: bool = False) -> Dataset:
        """`dataset` with each example's context pairs as rows of the table (`vae` models), and in `frozen` mode its
        responses too (`chosen_index`, `rejected_index`); other modes' responses are left to be tokenized.
        `context_draws` copies of the context pool itself, each with its own draw. Prepared datasets come back
        as they are. `keep_in_memory` writes nothing to `datasets`' cache (predictions: the cache would only grow)."""
        config = self.model.config
        columns = get_dataset_column_names(dataset)
        if any(c in columns for c in INDEX_COLUMNS):
            return dataset
        frozen = config.embedding_mode == "frozen"
        if frozen or config.use_latent:
            if not isinstance(dataset, Dataset):
                raise TypeError(
                    f"{name} dataset: {'frozen mode' if frozen else 'a vae model'} needs a map-style Dataset "
                    "(streaming datasets are for the baselines with a trained backbone)."
                )
            missing = [c for c in ("chosen", "rejected") if c not in columns]
            if missing and not (not frozen and "chosen_ids" in columns):
                raise PreferenceDataError(f"{name} dataset: missing column(s) {missing}; it has {columns}.")
        if config.use_latent:
            dataset = self.add_contexts(dataset, name, context_draws)
        return self.index_responses(dataset, name, keep_in_memory) if frozen else dataset

    def add_contexts(self, dataset: Dataset, name: str, draws: int = 1) -> Dataset:
        """Draw each example's context pairs (from the pool, or the pool itself with `draws` draws), embed them
        and index them."""
        if "context_chosen_index" in dataset.column_names:
            return dataset
        check_users(dataset, name)
        if dataset is self.context_pool and draws > 1:
            dataset = concatenate_datasets([
                attach_contexts(dataset, self.num_context, self.seed, name=name + (f"-draw{d}" if d else ""))
                for d in range(draws)
            ])
        else:
            pool = None if dataset is self.context_pool else self.context_pool
            dataset = attach_contexts(dataset, self.num_context, self.seed, pool=pool, name=name)
        # Rendered and indexed here, not by `Dataset.map`: a map would write every example's context texts (and
        # the rest of its columns) to datasets' cache again, gigabytes per pass with long contexts and many draws.
        # Each distinct text is rendered once; the examples keep only their rows of the table.
        rendered: dict[tuple, str] = {}

        def render(pair: dict[str, Any], side: str) -> str:
            key = (pair.get("prompt"), pair[side])
            if key not in rendered:
                rendered[key] = render_text(self.tokenizer, *key)
            return rendered[key]

        texts = {"chosen": [], "rejected": []}
        for context in dataset["context"]:
            for side, rows in texts.items():
                rows.append([render(pair, side) for pair in context])
        self.add_to_table([text for chosen, rejected in zip(texts["chosen"], texts["rejected"])
                           for text in chosen + rejected], desc=f"Embedding {name} texts")
        index = self.table.index
        for side, rows in texts.items():
            dataset = dataset.add_column(f"context_{side}_index", [[index[text] for text in row] for row in rows])
        return dataset

    def index_responses(self, dataset: Dataset, name: str, keep_in_memory: bool = False) -> Dataset:
        """Frozen mode: embed each response (prompt included) once, and refer to it by its row of the table."""
        with self._datasets_first():
            dataset = dataset.map(_render_example, fn_kwargs={"tokenizer": self.tokenizer},
                                  desc=f"Rendering {name} texts", keep_in_memory=keep_in_memory)
        self.add_to_table(list(dataset["chosen_text"]) + list(dataset["rejected_text"]), desc=f"Embedding {name} texts")
        return self._index(dataset, INDEX_COLUMNS, f"{name} dataset", keep_in_memory)

    def _index(self, dataset: Dataset, columns: tuple[str, ...], what: str, keep_in_memory: bool = False) -> Dataset:
        with self._datasets_first():
            return dataset.map(_index_columns, fn_kwargs={"index": self.table.index, "columns": columns},
                               desc=f"Indexing {what}", keep_in_memory=keep_in_memory)

    def _datasets_first(self):
        """When `collective`, the local main process maps datasets first (writing `datasets`' cache) and the others
        then read it."""
        return PartialState().local_main_process_first() if self.collective else contextlib.nullcontext()

    # ----- users and rewards ------------------------------------------------------------------------------

    @torch.no_grad()
    def encode_context(self, context: Sequence[dict[str, Any]]) -> torch.Tensor:
        """The latent (1, latent_dim) one user's context pairs give at inference (`VPLRewardModel.user_latent`)."""
        chosen = [render_text(self.tokenizer, p.get("prompt"), p["chosen"]) for p in context]
        rejected = [render_text(self.tokenizer, p.get("prompt"), p["rejected"]) for p in context]
        pairs = self.embed(chosen + rejected, desc="Embedding context pairs").to(self.device)
        pairs = pairs.view(2, 1, len(context), -1)
        with _eval_mode(self.model):
            return self.model.user_latent(pairs[0], pairs[1])[0]

    @torch.no_grad()
    def rewards(self, embeddings: torch.Tensor, latent: torch.Tensor | None = None) -> list[float]:
        """The reward head on embeddings (N, d) under `latent` ((1, d) or (N, d); default: the prior mean user)."""
        if self.uses_latent:
            latent = self.model.prior_latent(1) if latent is None else latent.to(self.device)
            if latent.shape[0] not in (1, len(embeddings)):
                raise ValueError(
                    f"{latent.shape[0]} latents for {len(embeddings)} completions: give 1 or one per completion."
                )
        rewards: list[float] = []
        with _eval_mode(self.model):
            for begin in range(0, len(embeddings), self.batch_size):
                rows = slice(begin, begin + self.batch_size)
                batch_latent = None
                if self.uses_latent:
                    batch_latent = latent if latent.shape[0] == 1 else latent[rows]
                output = self.model(embeddings=embeddings[rows].to(self.device), latent=batch_latent)
                rewards += output.logits.squeeze(-1).float().cpu().tolist()
        return rewards

    @torch.no_grad()
    def predict_preferences(self, dataset: Dataset, batch_size: int | None = None, name: str = "eval"
                            ) -> dict[str, Any]:
        """Rewards of every pair of `dataset` (contexts attached from the pool if absent), in this process.

        Returns `reward_chosen`, `reward_rejected`, the rows' `user_id` and `controversial` (when present), and
        for `vae` models each example's posterior `latent_mean` and `kl` (what `VPLRewardTrainer.predict_preferences`
        returns, there through `Trainer.predict`).
        """
        prepared = self.prepare(dataset, name, keep_in_memory=True)
        if self.model.config.embedding_mode == "frozen":
            chosen, rejected = self.rows(prepared["chosen_text"]), self.rows(prepared["rejected_text"])
        else:
            rendered = prepared.map(_render_example, fn_kwargs={"tokenizer": self.tokenizer},
                                    desc=f"Rendering {name} texts", keep_in_memory=True)
            scored = self.embed_scored(list(rendered["chosen_text"]) + list(rendered["rejected_text"]))
            chosen, rejected = scored[: len(prepared)], scored[len(prepared):]
        result: dict[str, list] = {"reward_chosen": [], "reward_rejected": []}
        if self.uses_latent:
            result.update(latent_mean=[], kl=[])
        step = batch_size or self.batch_size
        with _eval_mode(self.model):
            for begin in range(0, len(prepared), step):
                rows = slice(begin, begin + step)
                inputs = {"embeddings": torch.cat([chosen[rows], rejected[rows]]).to(self.device)}
                if self.uses_latent:
                    inputs.update(self.context_inputs(prepared[rows]))
                output = self.model(**inputs)
                rewards = output.logits.squeeze(-1).float().cpu()
                n = len(rewards) // 2
                result["reward_chosen"] += rewards[:n].tolist()
                result["reward_rejected"] += rewards[n:].tolist()
                if self.uses_latent:
                    result["latent_mean"] += output.latent_mean.float().cpu().tolist()
                    result["kl"] += _pair_kl(output).cpu().tolist()
        for column in ("user_id", "controversial"):
            if column in prepared.column_names:
                result[column] = list(prepared[column])
        return result

    def context_inputs(self, batch: dict[str, list]) -> dict[str, torch.Tensor]:
        """A batch's contexts as the model takes them (see `padded_contexts`), on the model's device."""
        inputs = padded_contexts(self.table.tensor, batch["context_chosen_index"], batch["context_rejected_index"])
        return {name: tensor.to(self.device) for name, tensor in inputs.items()}


def padded_contexts(table: torch.Tensor, chosen_rows: Sequence[Sequence[int]], rejected_rows: Sequence[Sequence[int]]
                    ) -> dict[str, torch.Tensor]:
    """`context_chosen`, `context_rejected` (B, K, d): each example's context pairs as rows of `table`, padded to the
    batch's largest K, and `context_mask` (B, K) marking the real pairs."""
    k = max(len(rows) for rows in chosen_rows)
    index = torch.zeros(len(chosen_rows), 2, k, dtype=torch.long)
    mask = torch.zeros(len(chosen_rows), k, dtype=torch.bool)
    for row, (chosen, rejected) in enumerate(zip(chosen_rows, rejected_rows)):
        index[row, 0, : len(chosen)], index[row, 1, : len(rejected)] = torch.tensor(chosen), torch.tensor(rejected)
        mask[row, : len(chosen)] = True
    return {"context_chosen": table[index[:, 0]], "context_rejected": table[index[:, 1]], "context_mask": mask}


def check_users(dataset: Dataset, dataset_name: str) -> None:
    """A `vae` model draws each example's context from its user's other pairs: data without users is refused
    with what to do about it."""
    columns = dataset.column_names
    if "user_id" in columns or ("context" in columns and None not in dataset["context"]):
        return
    raise PreferenceDataError(
        f"{dataset_name} dataset: model_type='vae' infers each user from other pairs that user labelled, but the data "
        f"has no `user_id` column (it has {columns}). Name the column that says who labelled each pair with a column "
        "mapping (the recipe's --column_mapping 'annotator=user_id', or Dataset.rename_column), give every example "
        "a `context`, or train a model without users: model_type='base'."
    )


def _pair_kl(output) -> torch.Tensor:
    return gaussian_kl(output.latent_mean.float(), output.latent_logvar.float(), reduction="none")


@contextlib.contextmanager
def _eval_mode(model) -> Iterator[None]:
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _render_example(example: dict[str, Any], tokenizer) -> dict[str, Any]:
    prompt = example.get("prompt")
    return {
        "chosen_text": render_text(tokenizer, prompt, example["chosen"]),
        "rejected_text": render_text(tokenizer, prompt, example["rejected"]),
    }


def _index_columns(example: dict[str, Any], index: dict[str, int], columns: tuple[str, ...]) -> dict[str, Any]:
    """`chosen_index` from `chosen_text`, `rejected_index` from `rejected_text`."""
    return {column: index[example[column.replace("_index", "_text")]] for column in columns}
