"""`VPLRewardTrainer`: `trl.RewardTrainer` for personalized reward models (VPL) and their baselines."""

from __future__ import annotations

import dataclasses
import json
import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import is_peft_model
from datasets import Dataset, IterableDataset, concatenate_datasets
from transformers import AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase, set_seed
from trl import RewardTrainer
from trl.data_utils import get_dataset_column_names
from trl.trainer.reward_trainer import DataCollatorForPreference

from ..checkpoints import FaultTolerantCheckpoints
from ..data.context import attach_contexts
from ..data.format import PreferenceDataError
from ..distributed import barrier, gathered_parameters, is_zero3_partitioned, union_across_processes
from ..embedded_model import resolve_model_name_or_path
from ..embeddings import EmbeddingCache, EmbeddingTable, compute_embeddings, default_embedding_cache_dir
from ..losses import gaussian_kl, kl_weight_at, preference_loss
from ..models import VPLRewardModel
from ..models.backbone import load_backbone
from ..models.configuration_vpl import peft_config_to_dict
from ..models.modeling_vpl import WEIGHTS_NAME
from ..text import render_text
from .vpl_reward_config import VPLRewardConfig

# Columns the trainer builds and the collator reads
TOKEN_COLUMNS = ("chosen_ids", "rejected_ids")
INDEX_COLUMNS = ("chosen_index", "rejected_index")
CONTEXT_COLUMNS = ("context_chosen_index", "context_rejected_index")
ACTIVE_UNIT_THRESHOLD = 0.01
STATISTICS_SAMPLE = 256  # training pairs whose embeddings standardize a trained backbone's (without contexts)


@dataclass
class DataCollatorForVPL(DataCollatorForPreference):
    """TRL's [`DataCollatorForPreference`] (token ids, all chosen then all rejected, and `margin`), or in `frozen`
    mode the pairs as rows of the embedding `table`; plus each example's context pairs as embeddings padded to the
    batch's largest K with a `context_mask`."""

    table: EmbeddingTable | None = None

    def torch_call(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        if "chosen_ids" in examples[0]:
            output = super().torch_call(examples)
        else:
            rows = [e["chosen_index"] for e in examples] + [e["rejected_index"] for e in examples]
            output = {"embeddings": self.table.tensor[torch.tensor(rows)]}
            if "margin" in examples[0]:
                output["margin"] = torch.tensor([e["margin"] for e in examples], dtype=torch.float)
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


class VPLRewardTrainer(FaultTolerantCheckpoints, RewardTrainer):
    """`trl.RewardTrainer` for a [`VPLRewardModel`] (VPL, or a Bradley-Terry / DPL baseline) on preference data
    with users. It takes what `RewardTrainer` takes, and means the same by it: a model id, a backbone, or a
    sequence-classification model (whose backbone gets VPL's heads), `args.model_init_kwargs`, `peft_config`,
    `quantization_config`, plain or conversational, pretokenized or streaming data, and a `margin` column.

    Without `peft_config` the backbone is fine-tuned with the heads; with it, a LoRA adapter of the backbone is.
    `args.embedding_mode="frozen"` chooses the fast CPU path instead: every response is embedded once by the frozen
    backbone, and only the heads train.

    Examples without a `context` get `args.num_context` pairs drawn from their user's pairs (evaluation examples
    from the training set). Context pairs are embedded once by the backbone (without its adapter) and cached; the
    collator looks them up by index. In `full` mode, where that backbone trains, they are embedded again before
    evaluation and prediction, as the saved model embeds them.

    Predictions (`predict`, `compute_metrics`) have one row per pair: the rewards (chosen, rejected), and for `vae`
    models the posterior latent mean and the KL term.

    Example:
    ```python
    >>> from vpl_trl import VPLRewardConfig, VPLRewardTrainer
    >>> from vpl_trl.data import load_preference_splits
    >>> data = load_preference_splits("data/pets")
    >>> trainer = VPLRewardTrainer(
    ...     model="HuggingFaceTB/SmolLM2-135M-Instruct",
    ...     args=VPLRewardConfig(output_dir="outputs/vpl-pets", model_type="vae", embedding_mode="frozen"),
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
        model: str | PreTrainedModel,
        args: VPLRewardConfig | None = None,
        data_collator=None,
        train_dataset: Dataset | IterableDataset | None = None,
        eval_dataset=None,
        processing_class: PreTrainedTokenizerBase | None = None,
        compute_metrics=None,
        callbacks=None,
        optimizers=(None, None),
        optimizer_cls_and_kwargs=None,
        preprocess_logits_for_metrics=None,
        quantization_config=None,
        peft_config=None,
    ):
        args = args or VPLRewardConfig(output_dir="vpl-reward-model")
        if train_dataset is None:
            raise ValueError("`train_dataset` is required")
        model, peft_config, adapter = self._create_model(model, args, quantization_config, peft_config)
        if processing_class is None:
            processing_class = AutoTokenizer.from_pretrained(
                resolve_model_name_or_path(model.config.backbone_name_or_path), trust_remote_code=args.trust_remote_code
            )
        processing_class.pad_token = args.pad_token or processing_class.pad_token or processing_class.eos_token
        model.config.max_sequence_length = args.max_length  # saved with the model, so scoring truncates alike

        self.embedding_table = self._create_embedding_table(model, processing_class, args)
        self._context_pool = train_dataset if model.config.use_latent else None  # contexts are drawn from it
        if data_collator is None:
            data_collator = DataCollatorForVPL(
                pad_token_id=processing_class.pad_token_id,
                pad_to_multiple_of=args.pad_to_multiple_of,
                table=self.embedding_table,
            )
        model_init_kwargs, args.model_init_kwargs = args.model_init_kwargs, None  # used above: no warning about them
        try:
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
                peft_config=None if peft_config is None else _wrapper_peft_config(model, peft_config),
            )
        finally:
            args.model_init_kwargs = model_init_kwargs
        if peft_config is not None:
            _train_heads_under_peft(model, adapter)
        if bool((model.embedding_scale == 1).all() and (model.embedding_mean == 0).all()):
            self._fit_embedding_statistics()  # a new model: standardize embeddings by the training data's
        self._contexts_embedded_by = (model, self.state.global_step)

    # ----- model --------------------------------------------------------------------------------------------

    @staticmethod
    def _create_model(model, args: VPLRewardConfig, quantization_config, peft_config):
        """A VPL model as given, or a new one on a backbone given by id or as a model (a sequence-classification
        model's head is replaced by VPL's heads), set up as `args` and `peft_config` ask. Returns it, the PEFT
        configuration of its adapter (a PEFT model's own), and a PEFT model's adapter weights."""
        if isinstance(model, VPLRewardModel):
            if peft_config is not None:
                raise ValueError("peft_config builds a new model's adapter; this VPLRewardModel has its own "
                                 f"(embedding_mode={model.config.embedding_mode!r}).")
            return model, None, None
        adapter = None
        if not isinstance(model, str) and is_peft_model(model):
            if peft_config is not None:
                raise ValueError(
                    "You passed a `PeftModel` instance together with a `peft_config` to the trainer. "
                    "Please first merge "
                    "and unload the existing adapter, save the resulting base model, and then pass that base model "
                    "along with the new `peft_config` to the trainer."
                )
            model, peft_config, adapter = _split_peft_model(model)
        set_seed(args.seed)  # the heads' initialization follows the run's seed, not the process's RNG history
        if isinstance(model, str):
            kwargs = dict(args.model_init_kwargs or {})
            if quantization_config is not None:
                kwargs["quantization_config"] = quantization_config
            kwargs.setdefault("trust_remote_code", args.trust_remote_code)
            if args.distributed_state.distributed_type in ("MULTI_GPU", "DEEPSPEED"):
                kwargs["device_map"] = None
            model = load_backbone(model, **kwargs)
        elif not isinstance(model, PreTrainedModel):
            raise TypeError(
                f"VPLRewardTrainer trains a VPLRewardModel, a backbone or its id, got {type(model).__name__}."
            )
        elif type(model).__name__.endswith("ForSequenceClassification") and model.config.num_labels != 1:
            raise ValueError(
                f"The model has `num_labels={model.config.num_labels}`, but reward models require `num_labels=1` "
                "to output a single scalar reward per sequence. Please instantiate your model with `num_labels=1` "
                "or pass a model name as a string to have it configured automatically."
            )
        backbone = model.base_model  # without an LM or classification head
        backbone.config.name_or_path = model.config.name_or_path
        if peft_config is None:
            return VPLRewardModel.from_backbone(backbone, **args.model_config_kwargs()), None, None
        # The adapter is added as TRL adds one, by wrapping the whole model (`RewardTrainer.__init__`).
        vpl_model = VPLRewardModel.from_backbone(backbone, **{**args.model_config_kwargs(), "embedding_mode": "full"})
        vpl_model.config.update({**args.model_config_kwargs(), "embedding_mode": "lora"})
        vpl_model.config.peft_config = peft_config_to_dict(peft_config)
        return vpl_model, peft_config, adapter

    @staticmethod
    def _create_embedding_table(model: VPLRewardModel, tokenizer, args: VPLRewardConfig) -> EmbeddingTable:
        """The table of frozen embeddings (contexts, and in `frozen` mode every response), backed by a disk cache
        keyed by the backbone's weights; a fine-tuned backbone's embeddings change, so they are not cached on disk."""
        cache_dir = args.embedding_cache_dir
        if model.config.embedding_mode == "full":
            cache_dir = None
        elif cache_dir is None:
            with gathered_parameters(model.backbone):  # the folder is keyed by a digest of the backbone's weights
                cache_dir = default_embedding_cache_dir(model, model.config.pooling, args.max_length)
        return EmbeddingTable(model, tokenizer, EmbeddingCache(cache_dir), args.embedding_batch_size, args.max_length)

    def _fit_embedding_statistics(self) -> None:
        """Standardize the heads' inputs by the training data's frozen embeddings: every embedded training text
        (`frozen` mode, or the contexts), else those of the first `STATISTICS_SAMPLE` training pairs."""
        table, dataset = self.embedding_table, self.train_dataset
        columns = get_dataset_column_names(dataset)
        rows = set()
        for column in INDEX_COLUMNS + CONTEXT_COLUMNS:
            if column in columns:
                values = dataset[column]
                rows.update(v for value in values for v in (value if isinstance(value, list) else [value]))
        if rows:
            embeddings = table.tensor[torch.tensor(sorted(rows))]
        else:
            embeddings = self._embed_token_ids(dataset)
        table.model.fit_embedding_statistics(embeddings)

    @torch.no_grad()
    def _embed_token_ids(self, dataset: Dataset | IterableDataset) -> torch.Tensor:
        """Frozen embeddings of the first `STATISTICS_SAMPLE` tokenized training pairs."""
        model = self.embedding_table.model
        if isinstance(dataset, Dataset):
            sample = dataset.select(range(min(STATISTICS_SAMPLE, len(dataset))))
        else:
            sample = dataset.take(STATISTICS_SAMPLE)
        examples = [{"chosen_ids": e["chosen_ids"], "rejected_ids": e["rejected_ids"]} for e in sample]
        collate = DataCollatorForPreference(pad_token_id=self.processing_class.pad_token_id)
        was_training, vectors = model.training, []
        model.eval()
        device = next(model.backbone.parameters()).device
        with gathered_parameters(model.backbone):
            for begin in range(0, len(examples), self.args.embedding_batch_size):
                batch = collate(examples[begin : begin + self.args.embedding_batch_size])
                ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
                vectors.append(model.embed(ids, mask, use_adapter=False).float().cpu())
        model.train(was_training)
        return torch.cat(vectors)

    # ----- data ---------------------------------------------------------------------------------------------

    def _prepare_dataset(self, dataset, processing_class, args: VPLRewardConfig, dataset_name: str):
        """Attach each example's context (as rows of the embedding table), then tokenize as TRL does, or in
        `frozen` mode embed the responses and index them. Prepared datasets are returned as they are."""
        config = self.embedding_table.model.config
        columns = get_dataset_column_names(dataset)
        if any(c in columns for c in INDEX_COLUMNS):
            return dataset  # already prepared (frozen mode)
        frozen = config.embedding_mode == "frozen"
        if frozen or config.use_latent:
            if not isinstance(dataset, Dataset):
                raise TypeError(
                    f"{dataset_name} dataset: {'frozen mode' if frozen else 'a vae model'} needs a map-style Dataset "
                    "(streaming datasets are for the baselines with a trained backbone)."
                )
            missing = [c for c in ("chosen", "rejected") if c not in columns]
            if missing and not (not frozen and "chosen_ids" in columns):
                raise PreferenceDataError(f"{dataset_name} dataset: missing column(s) {missing}; it has {columns}.")
        if config.use_latent:
            dataset = self._add_contexts(dataset, processing_class, args, dataset_name)
        if not frozen:
            return super()._prepare_dataset(dataset, processing_class, args, dataset_name)
        return self._index_responses(dataset, processing_class, args, dataset_name)

    def _add_contexts(self, dataset: Dataset, processing_class, args: VPLRewardConfig, dataset_name: str) -> Dataset:
        """Draw each example's context pairs (from the training set), embed them and index them."""
        if "context_chosen_index" in dataset.column_names:
            return dataset
        _check_users(dataset, dataset_name)
        pool = None if dataset is self._context_pool else self._context_pool
        with args.main_process_first(desc=f"drawing the {dataset_name} contexts"):
            if pool is None and args.train_context_draws > 1:  # the training set: one copy of it per draw
                dataset = concatenate_datasets([
                    attach_contexts(
                        dataset, args.num_context, args.seed, name=dataset_name + (f"-draw{d}" if d else "")
                    )
                    for d in range(args.train_context_draws)
                ])
            else:
                dataset = attach_contexts(dataset, args.num_context, args.seed, pool=pool, name=dataset_name)
            dataset = dataset.map(
                _render_context, fn_kwargs={"tokenizer": processing_class}, desc=f"Rendering {dataset_name} contexts"
            )
        texts = []
        for chosen, rejected in zip(dataset["context_chosen_text"], dataset["context_rejected_text"]):
            texts += list(chosen) + list(rejected)
        self._embed_texts(texts, args, desc=f"Embedding {dataset_name} texts")
        with args.main_process_first(desc=f"indexing the {dataset_name} contexts"):
            return dataset.map(
                _index_columns,
                fn_kwargs={"index": self.embedding_table.index, "columns": CONTEXT_COLUMNS},
                desc=f"Indexing {dataset_name} contexts",
            )

    def _index_responses(self, dataset: Dataset, processing_class, args: VPLRewardConfig, dataset_name: str) -> Dataset:
        """Frozen mode: embed each response (prompt included) once, and refer to it by its row of the table."""
        with args.main_process_first(desc=f"rendering the {dataset_name} dataset"):
            dataset = dataset.map(
                _render_example, fn_kwargs={"tokenizer": processing_class}, desc=f"Rendering {dataset_name} texts"
            )
        self._embed_texts(
            list(dataset["chosen_text"]) + list(dataset["rejected_text"]), args, desc=f"Embedding {dataset_name} texts"
        )
        with args.main_process_first(desc=f"indexing the {dataset_name} dataset"):
            return dataset.map(
                _index_columns,
                fn_kwargs={"index": self.embedding_table.index, "columns": INDEX_COLUMNS},
                desc=f"Indexing {dataset_name} dataset",
            )

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
        if missing and (args.local_process_index == 0 or table.cache.directory is None):  # an in-memory cache: all
            table.cache.add(missing, vectors)
        barrier()
        table.add(texts, desc=desc)  # all cached now

    def _set_signature_columns_if_needed(self):
        if self._signature_columns is None:
            self._signature_columns = list(TOKEN_COLUMNS + INDEX_COLUMNS + CONTEXT_COLUMNS) + ["margin"]

    # ----- loss and metrics ---------------------------------------------------------------------------------

    def current_kl_weight(self) -> float:
        args = self.args
        return kl_weight_at(self.state.global_step, args.kl_weight, args.kl_schedule, args.kl_anneal_steps,
                            args.kl_anneal_baseline)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        mode = "train" if self.model.training else "eval"
        config = self.accelerator.unwrap_model(model).config
        outputs = model(**{k: v for k, v in inputs.items() if k != "margin"})
        head_chosen, head_rejected = torch.chunk(outputs.head, chunks=2)
        rewards_chosen, rewards_rejected = torch.chunk(outputs.logits.squeeze(-1), chunks=2)
        pref_loss = preference_loss(
            head_chosen, head_rejected, config.reward_type, self.args.entropy_coeff, margin=inputs.get("margin")
        )
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
        return (loss, _predictions(outputs, rewards_chosen, rewards_rejected)) if return_outputs else loss

    # ----- prediction ---------------------------------------------------------------------------------------

    def evaluation_loop(self, *args, **kwargs):
        # `evaluate` and `predict` run through here: contexts as the model embeds them now.
        self._refresh_context_embeddings()
        return super().evaluation_loop(*args, **kwargs)

    def _refresh_context_embeddings(self) -> None:
        """In `full` mode the backbone that embeds the contexts is trained: once it has changed (training steps, or
        another model in its place), embed the contexts again with it, into the same rows, as a saved and reloaded
        model embeds them."""
        table = self.embedding_table
        model = self.accelerator.unwrap_model(self.model)
        if model.config.embedding_mode != "full" or not model.config.use_latent:
            return
        if self._contexts_embedded_by == (model, self.state.global_step) or not table.index:
            return
        texts = list(table.index)
        table.reset(model)
        self._embed_texts(texts, self.args, desc="Embedding contexts with the trained backbone")
        self._contexts_embedded_by = (model, self.state.global_step)

    def predict_preferences(
        self, dataset: Dataset, batch_size: int | None = None, name: str = "eval"
    ) -> dict[str, Any]:
        """Rewards of every pair of `dataset` (contexts attached from the training pool if absent), by
        `Trainer.predict`; the metrics of the evaluation log are left as they were.

        Returns `reward_chosen`, `reward_rejected`, the rows' `user_id` and `controversial` (when present),
        and for `vae` models each example's posterior `latent_mean` and `kl`.
        """
        self._refresh_context_embeddings()  # before new contexts are embedded
        prepared = self._prepare_dataset(dataset, self.processing_class, self.args, name)
        model = self.accelerator.unwrap_model(self.model)
        was_training, eval_metrics = model.training, self._metrics["eval"]
        self._metrics["eval"] = defaultdict(list)
        settings = {"per_device_eval_batch_size": batch_size or self.args.per_device_eval_batch_size,
                    "dataloader_drop_last": False}
        before = {key: getattr(self.args, key) for key in settings}
        try:
            for key, value in settings.items():
                setattr(self.args, key, value)
            predictions = self.predict(prepared, metric_key_prefix=name).predictions
        finally:
            for key, value in before.items():
                setattr(self.args, key, value)
            self._metrics["eval"] = eval_metrics
            model.train(was_training)
        rewards, *latent = predictions if isinstance(predictions, tuple) else (predictions,)
        result = {"reward_chosen": rewards[:, 0].tolist(), "reward_rejected": rewards[:, 1].tolist()}
        if latent:
            result["latent_mean"], result["kl"] = latent[0].tolist(), latent[1].tolist()
        for column in ("user_id", "controversial"):
            if column in prepared.column_names:
                result[column] = list(prepared[column])
        return result

    # ----- checkpoints --------------------------------------------------------------------------------------

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """Save the VPL model (config, heads, and what was trained of the backbone), also when PEFT wraps it."""
        if not is_peft_model(self.model):
            return super()._save(output_dir, state_dict)
        wrapped, self.model = self.model, self.model.get_base_model()
        if state_dict is not None:
            state_dict = {key.removeprefix("base_model.model."): value for key, value in state_dict.items()}
        try:
            return super()._save(output_dir, state_dict)
        finally:
            self.model = wrapped

    def _check_resume_checkpoint(self, folder: Path) -> None:
        # Checked here, not in `_load_from_checkpoint`, which DeepSpeed runs never reach.
        check_checkpoint_matches(folder, self.accelerator.unwrap_model(self.model).config)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        weights = Path(resume_from_checkpoint) / WEIGHTS_NAME
        if not weights.exists():
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        # The checkpoint holds the heads and adapter only: load those (the backbone's weights are not missing).
        self.accelerator.unwrap_model(model or self.model).load_trained_weights(weights)


def _predictions(outputs, rewards_chosen: torch.Tensor, rewards_rejected: torch.Tensor) -> dict[str, torch.Tensor]:
    """What `Trainer.prediction_step` returns as predictions (and `compute_metrics` sees), one row per pair:
    `rewards` (chosen, rejected), and for `vae` models the posterior `latent_mean` and the pair's `kl`."""
    predictions = {"rewards": torch.stack([rewards_chosen, rewards_rejected], dim=-1).float()}
    if outputs.latent_mean is not None:
        mean, logvar = outputs.latent_mean.float(), outputs.latent_logvar.float()
        predictions.update(latent_mean=mean, kl=gaussian_kl(mean, logvar, reduction="none"))
    return predictions


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


def _split_peft_model(model) -> tuple[PreTrainedModel, Any, dict[str, torch.Tensor]]:
    """A PEFT model as its base model (adapter layers removed), the adapter's configuration, and the adapter's
    weights named as in a VPL model (a classification head's are left out: VPL brings its heads)."""
    name = model.active_adapter
    weights = {k: v.detach().clone() for k, v in model.state_dict().items() if f".{name}." in k and "lora_" in k}
    config = model.peft_config[name]
    base = model.unload()
    prefix = "base_model.model." + (f"{base.base_model_prefix}." if base.base_model is not base else "")
    adapter = {"model." + k[len(prefix):].replace(f".{name}.", ".default."): v
               for k, v in weights.items() if k.startswith(prefix)}
    return base, config, adapter


def _wrapper_peft_config(model: VPLRewardModel, peft_config):
    """`peft_config` for wrapping the whole VPL model as TRL wraps its models (so parameters are named as TRL
    names them): the modules it targets in the backbone (`all-linear`, or by default those PEFT knows for the
    backbone's architecture), never the heads."""
    from peft.tuners.tuners_utils import _maybe_include_all_linear_layers
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as DEFAULT_TARGETS

    config = dataclasses.replace(peft_config, task_type=None, modules_to_save=None)
    if config.target_modules is None:
        config.target_modules = DEFAULT_TARGETS.get(model.backbone.config.model_type)
    config = _maybe_include_all_linear_layers(config, model.backbone)
    _convert_for_transformers_v5(config, model.backbone)
    targets = config.target_modules
    if not targets:
        return config
    if isinstance(targets, str):
        return dataclasses.replace(config, target_modules=rf"model\.(?:{targets})")
    names = "|".join(re.escape(name) for name in sorted(targets))
    return dataclasses.replace(config, target_modules=rf"model\.(?:.*\.)?(?:{names})")


def _convert_for_transformers_v5(config, backbone: PreTrainedModel) -> None:
    """PEFT's own update of a configuration to the backbone's transformers 5 layout (e.g. fused MoE experts, then
    targeted as parameters), which it applies to transformers models only."""
    try:
        from peft.utils.transformers_weight_conversion import (
            convert_peft_config_for_transformers,
            get_model_conversion_mapping,
        )
    except ImportError:  # transformers < 5
        return
    convert_peft_config_for_transformers(config, model=backbone, conversions=get_model_conversion_mapping(backbone))


def _train_heads_under_peft(model: VPLRewardModel, adapter: dict[str, torch.Tensor] | None) -> None:
    """PEFT freezes what it does not adapt: the heads train all the same; a PEFT model's adapter is loaded."""
    for module in (getattr(model, "encoder", None), model.decoder):
        if module is not None:
            module.requires_grad_(True)
    if adapter:
        unexpected = model.load_state_dict(adapter, strict=False).unexpected_keys
        if unexpected:
            raise ValueError(f"the PEFT model's adapter does not fit its backbone: {unexpected[:5]}")


def _render_example(example: dict[str, Any], tokenizer) -> dict[str, Any]:
    prompt = example.get("prompt")
    return {
        "chosen_text": render_text(tokenizer, prompt, example["chosen"]),
        "rejected_text": render_text(tokenizer, prompt, example["rejected"]),
    }


def _render_context(example: dict[str, Any], tokenizer) -> dict[str, Any]:
    context = example["context"]
    return {
        "context_chosen_text": [render_text(tokenizer, p.get("prompt"), p["chosen"]) for p in context],
        "context_rejected_text": [render_text(tokenizer, p.get("prompt"), p["rejected"]) for p in context],
    }


def _index_columns(example: dict[str, Any], index: dict[str, int], columns: tuple[str, ...]) -> dict[str, Any]:
    """`chosen_index` from `chosen_text`, `context_chosen_index` from `context_chosen_text`, ..."""
    output = {}
    for column in columns:
        texts = example[column.replace("_index", "_text")]
        output[column] = index[texts] if isinstance(texts, str) else [index[t] for t in texts]
    return output
