"""`VPLRewardTrainer`: `trl.RewardTrainer` for personalized reward models (VPL) and their baselines."""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset
from transformers import AutoTokenizer, PreTrainedTokenizerBase, set_seed
from transformers.data.data_collator import DataCollatorMixin
from trl import RewardTrainer
from trl.trainer.utils import pad

from ..data.context import attach_contexts
from ..data.format import PreferenceDataError
from ..distributed import (
    barrier,
    configure_torch_extensions_dir,
    gathered_parameters,
    is_zero3_partitioned,
    union_across_processes,
)
from ..embedded_model import resolve_model_name_or_path
from ..embeddings import (
    EmbeddingCache,
    EmbeddingTable,
    _tokenize,
    compute_embeddings,
    default_embedding_cache_dir,
    render_text,
)
from ..losses import gaussian_kl, kl_weight_at, preference_loss
from ..models import VPLRewardModel
from ..models.modeling_vpl import WEIGHTS_NAME
from .vpl_reward_config import VPLRewardConfig

# Columns the trainer builds and the collator reads
TOKEN_COLUMNS = ("chosen_ids", "rejected_ids")
INDEX_COLUMNS = ("chosen_index", "rejected_index")
CONTEXT_COLUMNS = ("context_chosen_index", "context_rejected_index")
ACTIVE_UNIT_THRESHOLD = 0.01

# DeepSpeed builds its ops on first use (during `TrainingArguments` set-up): keep the builds in the vpl-trl cache.
configure_torch_extensions_dir()


@dataclass
class DataCollatorForVPL(DataCollatorMixin):
    """Batches for [`VPLRewardModel`]: the target pairs as token ids (`lora` mode) or as rows of the
    embedding table (`frozen` mode), laid out as TRL does (all chosen, then all rejected), and each
    example's context pairs as embeddings padded to the batch's largest K with a `context_mask`."""

    pad_token_id: int
    table: EmbeddingTable
    pad_to_multiple_of: int | None = None
    return_tensors: str = "pt"

    def torch_call(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        output: dict[str, Any] = {}
        if "chosen_ids" in examples[0]:
            ids = [torch.tensor(e["chosen_ids"]) for e in examples] + [torch.tensor(e["rejected_ids"]) for e in examples]
            mask = [torch.ones_like(i) for i in ids]
            output["input_ids"] = pad(ids, self.pad_token_id, padding_side="right", pad_to_multiple_of=self.pad_to_multiple_of)
            output["attention_mask"] = pad(mask, 0, padding_side="right", pad_to_multiple_of=self.pad_to_multiple_of)
        else:
            rows = [e["chosen_index"] for e in examples] + [e["rejected_index"] for e in examples]
            output["embeddings"] = self.table.tensor[torch.tensor(rows)]
        if "context_chosen_index" in examples[0]:
            k = max(len(e["context_chosen_index"]) for e in examples)
            index = torch.zeros(len(examples), 2, k, dtype=torch.long)
            context_mask = torch.zeros(len(examples), k, dtype=torch.bool)
            for row, example in enumerate(examples):
                n = len(example["context_chosen_index"])
                index[row, 0, :n] = torch.tensor(example["context_chosen_index"])
                index[row, 1, :n] = torch.tensor(example["context_rejected_index"])
                context_mask[row, :n] = True
            output["context_chosen"] = self.table.tensor[index[:, 0]]
            output["context_rejected"] = self.table.tensor[index[:, 1]]
            output["context_mask"] = context_mask
        return output


class VPLRewardTrainer(RewardTrainer):
    """Trains a [`VPLRewardModel`] (VPL, or a Bradley-Terry / DPL baseline) on preference data with users.

    Examples without a `context` get `args.num_context` pairs drawn from their user's pairs (evaluation
    examples from the training pool). Context pairs, and in `frozen` mode every response, are embedded
    once by the frozen backbone and cached; the collator looks them up by index.

    Example:
    ```python
    >>> from vpl_trl import VPLRewardConfig, VPLRewardTrainer
    >>> from vpl_trl.data import load_preference_splits
    >>> data = load_preference_splits("data/pets")
    >>> trainer = VPLRewardTrainer(
    ...     model="HuggingFaceTB/SmolLM2-135M-Instruct",
    ...     args=VPLRewardConfig(output_dir="outputs/vpl-pets", model_type="vae"),
    ...     train_dataset=data["train"],
    ...     eval_dataset=data["test"],
    ... )
    >>> trainer.train()
    ```
    """

    _tag_names = ["trl", "reward-trainer", "vpl"]
    _name = "VPL Reward"

    def __init__(
        self,
        model: str | VPLRewardModel,
        args: VPLRewardConfig | None = None,
        data_collator=None,
        train_dataset: Dataset | None = None,
        eval_dataset: Dataset | dict[str, Dataset] | None = None,
        processing_class: PreTrainedTokenizerBase | None = None,
        compute_metrics=None,
        callbacks=None,
        optimizers=(None, None),
        optimizer_cls_and_kwargs=None,
        preprocess_logits_for_metrics=None,
        model_init_kwargs: dict | None = None,
    ):
        args = args or VPLRewardConfig(output_dir="vpl-reward-model")
        if isinstance(model, str):
            set_seed(args.seed)  # the heads' initialization follows the run's seed, not the process's RNG history
            model = VPLRewardModel.from_backbone(model, **args.model_config_kwargs(), **(model_init_kwargs or {}))
        if not isinstance(model, VPLRewardModel):
            raise TypeError(f"VPLRewardTrainer trains a VPLRewardModel (or a backbone name), got {type(model).__name__}.")
        if processing_class is None:
            processing_class = AutoTokenizer.from_pretrained(resolve_model_name_or_path(model.config.backbone_name_or_path))
        processing_class.pad_token = processing_class.pad_token or processing_class.eos_token
        model.config.max_sequence_length = args.max_length  # saved with the model, so scoring truncates alike

        cache_dir = args.embedding_cache_dir
        if cache_dir is None:
            with gathered_parameters(model.backbone):  # the folder is keyed by a digest of the backbone's weights
                cache_dir = default_embedding_cache_dir(model, model.config.pooling, args.max_length)
        self.embedding_table = EmbeddingTable(
            model, processing_class, EmbeddingCache(cache_dir), args.embedding_batch_size, args.max_length
        )
        self._context_pool: Dataset | None = None
        if data_collator is None:
            data_collator = DataCollatorForVPL(
                pad_token_id=processing_class.pad_token_id,
                table=self.embedding_table,
                pad_to_multiple_of=args.pad_to_multiple_of,
            )
        self._fit_statistics = bool((model.embedding_scale == 1).all() and (model.embedding_mean == 0).all())
        super().__init__(
            model=model,
            args=args,
            data_collator=data_collator,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            compute_metrics=compute_metrics,
            callbacks=callbacks,
            optimizers=optimizers,
            optimizer_cls_and_kwargs=optimizer_cls_and_kwargs,
            preprocess_logits_for_metrics=preprocess_logits_for_metrics,
        )

    # ----- data ---------------------------------------------------------------------------------------------

    def _prepare_dataset(self, dataset: Dataset, processing_class, args: VPLRewardConfig, dataset_name: str) -> Dataset:
        """Attach contexts, render texts, embed what must be embedded, and index or tokenize."""
        columns = dataset.column_names
        if any(c in columns for c in INDEX_COLUMNS + TOKEN_COLUMNS):
            return dataset  # already prepared
        model_config = self.embedding_table.model.config  # `self.model` is not set yet while __init__ prepares data
        missing = [c for c in ("chosen", "rejected") if c not in columns]
        if missing:
            raise PreferenceDataError(f"{dataset_name} dataset: missing column(s) {missing}; it has {columns}.")
        if model_config.use_latent:
            _check_users(dataset, dataset_name)
        with args.main_process_first(desc=f"preparing the {dataset_name} dataset"):
            if model_config.use_latent:
                # The first dataset prepared is the training set: later ones draw contexts from its pool.
                if self._context_pool is None:
                    self._context_pool = dataset
                pool = None if dataset is self._context_pool else self._context_pool
                dataset = attach_contexts(dataset, args.num_context, args.seed, pool=pool, name=dataset_name)
            dataset = dataset.map(
                _render_example, fn_kwargs={"tokenizer": processing_class}, desc=f"Rendering {dataset_name} texts"
            )
        frozen = model_config.embedding_mode == "frozen"
        texts = []
        if model_config.use_latent:
            for chosen, rejected in zip(dataset["context_chosen_text"], dataset["context_rejected_text"]):
                texts += list(chosen) + list(rejected)
        if frozen or (self._fit_statistics and not texts):
            # Frozen mode looks every response up; otherwise (lora mode without contexts) the frozen embeddings
            # of the training responses are needed once, for the standardization statistics.
            texts += list(dataset["chosen_text"]) + list(dataset["rejected_text"])
        self._embed_texts(texts, args, desc=f"Embedding {dataset_name} texts")
        with args.main_process_first(desc=f"indexing the {dataset_name} dataset"):
            if self._fit_statistics:  # a new model: standardize embeddings by the training texts' statistics
                self.embedding_table.model.fit_embedding_statistics(self.embedding_table.tensor)
                self._fit_statistics = False
            dataset = dataset.map(
                _index_example,
                fn_kwargs={
                    "index": self.embedding_table.index,
                    "tokenizer": None if frozen else processing_class,
                    "use_latent": model_config.use_latent,
                },
                desc=f"Indexing {dataset_name} dataset",
            )
            if not frozen and args.max_length is not None:
                before = len(dataset)
                dataset = dataset.filter(
                    lambda e: max(len(e["chosen_ids"]), len(e["rejected_ids"])) <= args.max_length,
                    desc=f"Filtering {dataset_name} >{args.max_length} tokens",
                )
                if len(dataset) < before and args.process_index == 0:
                    print(f"{dataset_name}: dropped {before - len(dataset)} pairs longer than {args.max_length} tokens")
        return dataset

    def _embed_texts(self, texts: list[str], args: VPLRewardConfig, desc: str) -> None:
        """Add `texts` to the embedding table. The main process of each machine embeds what the cache lacks and
        writes it; the others then read it from the cache. Under ZeRO-3 each process holds a slice of the backbone,
        so all of them embed the missing texts together (same forward calls), and the main ones write the cache."""
        table = self.embedding_table
        if not is_zero3_partitioned(table.model.backbone):
            with args.main_process_first(desc=desc):
                table.add(texts, desc=desc)
            return
        table.cache.refresh()
        missing = [t for t in dict.fromkeys(texts) if t not in table.index and t not in table.cache]
        missing = union_across_processes(missing)
        with gathered_parameters(table.model.backbone):
            vectors = compute_embeddings(
                table.model, table.tokenizer, missing, None, table.batch_size, table.max_length, desc=desc
            )
        if missing and args.local_process_index == 0:
            table.cache.add(missing, vectors)
        barrier()
        table.add(texts, desc=desc)  # all cached now

    def _set_signature_columns_if_needed(self):
        if self._signature_columns is None:
            self._signature_columns = list(TOKEN_COLUMNS + INDEX_COLUMNS + CONTEXT_COLUMNS)

    # ----- loss and metrics ---------------------------------------------------------------------------------

    def current_kl_weight(self) -> float:
        args = self.args
        return kl_weight_at(self.state.global_step, args.kl_weight, args.kl_schedule, args.kl_anneal_steps,
                            args.kl_anneal_baseline)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        mode = "train" if self.model.training else "eval"
        config = self.accelerator.unwrap_model(model).config
        outputs = model(**inputs)
        head_chosen, head_rejected = torch.chunk(outputs.head, chunks=2)
        rewards_chosen, rewards_rejected = torch.chunk(outputs.logits.squeeze(-1), chunks=2)
        pref_loss = preference_loss(head_chosen, head_rejected, config.reward_type, self.args.entropy_coeff)
        loss = pref_loss
        if self.args.center_rewards_coefficient is not None:
            loss = loss + self.args.center_rewards_coefficient * torch.mean((rewards_chosen + rewards_rejected) ** 2)
        metrics = self._metrics[mode]
        if config.use_latent:
            beta = self.current_kl_weight()
            loss = loss + beta * outputs.kl
            with torch.no_grad():
                means = self.accelerator.gather_for_metrics(outputs.latent_mean.detach())
                metrics["kl"].append(self.accelerator.gather_for_metrics(outputs.kl.detach()).mean().item())
                metrics["beta"].append(beta)
                metrics["active_units"].append(count_active_units(means))
        with torch.no_grad():
            name = "bt_loss" if config.reward_type in ("vae", "base") else "dpl_loss"
            metrics[name].append(self.accelerator.gather_for_metrics(pref_loss.detach()).mean().item())
            accuracy = (rewards_chosen > rewards_rejected).float().mean()
            metrics["accuracy"].append(self.accelerator.gather_for_metrics(accuracy).mean().item())
            margin = (rewards_chosen - rewards_rejected).mean()
            metrics["margin"].append(self.accelerator.gather_for_metrics(margin).mean().item())
        return (loss, {"logits": outputs.logits}) if return_outputs else loss

    # ----- prediction ---------------------------------------------------------------------------------------

    @torch.no_grad()
    def predict_preferences(self, dataset: Dataset, batch_size: int | None = None, name: str = "eval") -> dict[str, Any]:
        """Rewards of every pair of `dataset` (contexts attached from the training pool if absent).

        Returns `reward_chosen`, `reward_rejected`, the rows' `user_id` and `controversial` (when present),
        and for `vae` models each example's posterior `latent_mean` and `kl`.
        """
        prepared = self._prepare_dataset(dataset, self.processing_class, self.args, name)
        model = self.accelerator.unwrap_model(self.model)
        was_training = model.training
        model.eval()
        device = next(model.decoder.parameters()).device
        batch_size = batch_size or self.args.per_device_eval_batch_size
        keep = [c for c in TOKEN_COLUMNS + INDEX_COLUMNS + CONTEXT_COLUMNS if c in prepared.column_names]
        result: dict[str, list] = defaultdict(list)
        for begin in range(0, len(prepared), batch_size):
            rows = prepared.select(range(begin, min(begin + batch_size, len(prepared))))
            batch = self.data_collator([{c: r[c] for c in keep} for r in rows])
            batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
            outputs = model(**batch)
            chosen, rejected = torch.chunk(outputs.logits.squeeze(-1).float().cpu(), 2)
            result["reward_chosen"] += chosen.tolist()
            result["reward_rejected"] += rejected.tolist()
            if outputs.latent_mean is not None:
                result["latent_mean"] += outputs.latent_mean.float().cpu().tolist()
                kl = gaussian_kl(outputs.latent_mean.float(), outputs.latent_logvar.float(), reduction="none")
                result["kl"] += kl.cpu().tolist()
        for column in ("user_id", "controversial"):
            if column in prepared.column_names:
                result[column] = list(prepared[column])
        model.train(was_training)
        return dict(result)

    # ----- checkpoints --------------------------------------------------------------------------------------

    def train(self, resume_from_checkpoint: str | bool | None = None, *args, **kwargs):
        # Checked here, not in `_load_from_checkpoint`, which DeepSpeed runs never reach.
        if isinstance(resume_from_checkpoint, (str, Path)):
            check_checkpoint_matches(resume_from_checkpoint, self.accelerator.unwrap_model(self.model).config)
        return super().train(resume_from_checkpoint, *args, **kwargs)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        weights = Path(resume_from_checkpoint) / WEIGHTS_NAME
        if not weights.exists():
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        # The checkpoint holds the heads and adapter only: load those (the backbone's weights are not missing).
        self.accelerator.unwrap_model(model or self.model).load_trained_weights(weights)


def count_active_units(latent_means: torch.Tensor, threshold: float = ACTIVE_UNIT_THRESHOLD) -> int:
    """Latent dimensions whose posterior mean varies across users (variance above `threshold`); zero means
    the posterior has collapsed and the reward ignores the user."""
    if latent_means.shape[0] < 2:
        return 0
    return int((latent_means.float().var(dim=0) > threshold).sum().item())


def check_checkpoint_matches(checkpoint: str | Path, config) -> None:
    """Refuse a checkpoint saved from another backbone or another model layout, naming both."""
    config_file = Path(checkpoint) / "config.json"
    if not config_file.exists():
        return
    saved = json.loads(config_file.read_text())
    for key in ("backbone_signature", "reward_type", "embedding_mode", "latent_dim", "hidden_dim"):
        if key in saved and saved[key] != getattr(config, key):
            raise ValueError(
                f"checkpoint {checkpoint} was saved with {key}={saved[key]!r} (backbone "
                f"{saved.get('backbone_name_or_path')!r}), but this run has {key}={getattr(config, key)!r} (backbone "
                f"{config.backbone_name_or_path!r}): resume with the same model and settings, or start a new run."
            )


def _check_users(dataset: Dataset, dataset_name: str) -> None:
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


def _render_example(example: dict[str, Any], tokenizer) -> dict[str, Any]:
    prompt = example.get("prompt")
    output = {
        "chosen_text": render_text(tokenizer, prompt, example["chosen"]),
        "rejected_text": render_text(tokenizer, prompt, example["rejected"]),
    }
    if example.get("context") is not None:
        output["context_chosen_text"] = [render_text(tokenizer, p.get("prompt"), p["chosen"]) for p in example["context"]]
        output["context_rejected_text"] = [
            render_text(tokenizer, p.get("prompt"), p["rejected"]) for p in example["context"]
        ]
    return output


def _index_example(example: dict[str, Any], index: dict[str, int], tokenizer, use_latent: bool) -> dict[str, Any]:
    if tokenizer is None:
        output = {"chosen_index": index[example["chosen_text"]], "rejected_index": index[example["rejected_text"]]}
    else:
        encoded = _tokenize(tokenizer, [example["chosen_text"], example["rejected_text"]], max_length=None)
        lengths = encoded["attention_mask"].sum(-1).tolist()
        ids = encoded["input_ids"].tolist()
        output = {"chosen_ids": ids[0][: lengths[0]], "rejected_ids": ids[1][: lengths[1]]}
    if use_latent:
        output["context_chosen_index"] = [index[t] for t in example["context_chosen_text"]]
        output["context_rejected_index"] = [index[t] for t in example["context_rejected_text"]]
    return output
