"""`VPLRewardTrainer`: `trl.RewardTrainer` for personalized reward models (VPL) and their baselines."""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import is_peft_model
from datasets import Dataset, IterableDataset
from torch.utils.data import DataLoader
from transformers import AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase, set_seed
from transformers.utils import logging
from trl import RewardTrainer
from trl.data_utils import get_dataset_column_names
from trl.trainer.reward_trainer import DataCollatorForPreference

from ..checkpoints import FaultTolerantCheckpoints
from ..distributed import gathered_parameters
from ..embedded_model import resolve_model_name_or_path
from ..embeddings import EmbeddingTable
from ..inference.reward_inference import AUTO, CONTEXT_COLUMNS, INDEX_COLUMNS, RewardInference, padded_contexts
from ..losses import gaussian_kl, kl_weight_at, preference_loss
from ..models import VPLConfig, VPLRewardModel
from ..models.backbone import load_backbone, peft_config_for_whole_model, split_peft_model, train_heads_under_peft
from ..models.configuration_vpl import peft_config_to_dict
from ..models.modeling_vpl import WEIGHTS_NAME
from .vpl_reward_config import VPLRewardConfig

logger = logging.get_logger(__name__)

# Columns the trainer builds and the collator reads
TOKEN_COLUMNS = ("chosen_ids", "rejected_ids")
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
            output.update(padded_contexts(self.table.tensor, [e["context_chosen_index"] for e in examples],
                                          [e["context_rejected_index"] for e in examples]))
        return output


def check_pooled_reward(config, source: str, theirs=None) -> None:
    """`pooled_reward` other than `joint` replaces the residual decoder's pooled reward on frozen embeddings, by a
    Bradley-Terry (`base`) model's on the same backbone and embedding (`theirs`, its config, when given)."""
    if config.decoder_type != "residual" or config.embedding_mode != "frozen":
        raise ValueError(f"pooled_reward={source!r} replaces the residual decoder's pooled reward on frozen "
                         f"embeddings, not decoder_type={config.decoder_type!r} with embedding_mode="
                         f"{config.embedding_mode!r}: use --decoder_type residual --embedding_mode frozen, or "
                         "--pooled_reward joint.")
    if theirs is None:
        return
    expected = {name: "base" if name == "reward_type" else getattr(config, name)
                for name in ("reward_type", "embedding_dim", "hidden_dim", "pooling", "embedding_layer",
                             "embedding_mode", "backbone_signature")}
    mismatched = [name for name, value in expected.items() if getattr(theirs, name, None) != value]
    if mismatched:
        raise ValueError(f"pooled_reward={source!r}: a Bradley-Terry (`base`) model on the same backbone and "
                         "embedding is needed; it differs in "
                         + ", ".join(f"{n} ({getattr(theirs, n, None)!r}, expected {expected[n]!r})"
                                     for n in mismatched))


def adopt_pooled_reward(model: VPLRewardModel, pooled: VPLRewardModel, source: str = "bradley_terry") -> None:
    """Make a trained Bradley-Terry model's reward the residual decoder's pooled reward, with the embedding
    standardization it was trained with (the same training texts': equal up to summation order): a user whose latent
    is 0 gets exactly its reward, and the users' deviations from the pooled reward stay as trained."""
    check_pooled_reward(model.config, source, pooled.config)
    with torch.no_grad():
        model.decoder.pooled.load_state_dict(pooled.decoder.state_dict())
        model.embedding_mean.copy_(pooled.embedding_mean)
        model.embedding_scale.copy_(pooled.embedding_scale)


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
        given = model
        model, peft_config, adapter = self._create_model(model, args, quantization_config, peft_config)
        # with pooled_reward bradley_terry: the backbone and pairs its Bradley-Terry model trains on, after this one
        self._pooled_reward_inputs = None
        if args.pooled_reward != "joint" and model.config.use_latent:  # checked now, not after training
            if args.pooled_reward == "bradley_terry":
                check_pooled_reward(model.config, args.pooled_reward)
                self._check_bradley_terry_inputs(given, args)
                self._pooled_reward_inputs = (given, train_dataset)
            else:
                check_pooled_reward(model.config, args.pooled_reward,
                                    VPLConfig.from_pretrained(resolve_model_name_or_path(args.pooled_reward)))
        # like context_dropout, a no-op for a model without a latent (one configuration serves VPL and its baseline)
        if args.pooled_loss_weight and model.config.use_latent and model.config.decoder_type != "residual":
            raise ValueError(f"pooled_loss_weight={args.pooled_loss_weight} trains the residual decoder's pooled "
                             f"reward, but decoder_type={model.config.decoder_type!r}: use decoder_type='residual' "
                             "or pooled_loss_weight=0.")
        if processing_class is None:
            processing_class = AutoTokenizer.from_pretrained(
                resolve_model_name_or_path(model.config.backbone_name_or_path), trust_remote_code=args.trust_remote_code
            )
        processing_class.pad_token = args.pad_token or processing_class.pad_token or processing_class.eos_token
        model.config.max_sequence_length = args.max_length  # saved with the model, so scoring truncates alike

        # Embeddings, contexts and latents: datasets are prepared by the same component that serves the saved model.
        self.inference = RewardInference(
            model, processing_class, num_context=args.num_context, seed=args.seed,
            context_pool=train_dataset if model.config.use_latent else None, batch_size=args.embedding_batch_size,
            max_length=args.max_length, cache_dir=_embedding_cache_dir(model, args), collective=True,
        )
        if data_collator is None:
            data_collator = DataCollatorForVPL(
                pad_token_id=processing_class.pad_token_id,
                pad_to_multiple_of=args.pad_to_multiple_of,
                table=self.inference.table,
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
                peft_config=None if peft_config is None else peft_config_for_whole_model(model, peft_config),
            )
        finally:
            args.model_init_kwargs = model_init_kwargs
        if peft_config is not None:
            train_heads_under_peft(model, adapter)
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
            model, peft_config, adapter = split_peft_model(model)
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
        settings = args.model_config_kwargs(peft_config)  # refuses a peft_config beside frozen or full mode
        # The adapter is added as TRL adds one, by wrapping the whole model (`RewardTrainer.__init__`).
        vpl_model = VPLRewardModel.from_backbone(
            backbone, **{**settings, "embedding_mode": "full", "peft_config": None}
        )
        vpl_model.config.update({**settings, "peft_config": peft_config_to_dict(peft_config)})
        return vpl_model, peft_config, adapter

    @staticmethod
    def _check_bradley_terry_inputs(given, args: VPLRewardConfig) -> None:
        """The model given can train the Bradley-Terry model of `pooled_reward='bradley_terry'` beside this one."""
        if isinstance(given, VPLRewardModel):
            raise ValueError(
                "pooled_reward='bradley_terry' trains the pooled reward of a new model, but this trainer was given a "
                "VPLRewardModel, which has its own: pass its backbone or id to train a new model, a trained "
                "Bradley-Terry model's folder as pooled_reward, or pooled_reward='joint' to go on training this one."
            )
        if args.distributed_state.distributed_type == "DEEPSPEED":
            raise ValueError(
                "pooled_reward='bradley_terry' trains a second model in this process, and DeepSpeed allows one "
                "Accelerator per process: train the Bradley-Terry model first (this configuration with --model_type "
                "base and --num_train_epochs times --train_context_draws epochs) and pass its folder as "
                "--pooled_reward DIR, or launch without DeepSpeed (frozen embeddings train only the heads)."
            )

    def _pooled_reward_model(self) -> VPLRewardModel:
        """The trained Bradley-Terry model that `pooled_reward` names, or with `bradley_terry` one trained here, as a
        `base` run of this configuration with as many updates (each context draw an epoch)."""
        args = self.args
        if args.pooled_reward != "bradley_terry":
            return VPLRewardModel.from_pretrained(resolve_model_name_or_path(args.pooled_reward))
        draws = args.train_context_draws
        base_args = replace(args, model_type="base", pooled_reward="joint", train_context_draws=1,
                            num_train_epochs=args.num_train_epochs * draws,
                            max_steps=args.max_steps * draws if args.max_steps > 0 else -1,
                            save_strategy="no", report_to=[])
        logger.info("Training the pooled reward: a Bradley-Terry model of the training pairs.")
        set_seed(args.seed)
        backbone, pairs = self._pooled_reward_inputs
        trainer = VPLRewardTrainer(model=backbone, args=base_args, train_dataset=pairs)
        trainer.train()
        return trainer.accelerator.unwrap_model(trainer.model)

    def train(self, *args, **kwargs):
        """`Trainer.train`; then, with `pooled_reward` other than `joint`, the residual decoder's pooled reward (trained
        with the deviations) is replaced by the Bradley-Terry model's (`adopt_pooled_reward`)."""
        output = super().train(*args, **kwargs)
        model = self.accelerator.unwrap_model(self.model)
        if self.args.pooled_reward != "joint" and model.config.use_latent:
            adopt_pooled_reward(model, self._pooled_reward_model(), self.args.pooled_reward)
        return output

    def _fit_embedding_statistics(self) -> None:
        """Standardize the heads' inputs by the training data's frozen embeddings: every embedded training text
        (`frozen` mode, or the contexts), else those of the first `STATISTICS_SAMPLE` training pairs."""
        table, dataset = self.inference.table, self.train_dataset
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
        model = self.inference.model
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

    def _prepare_dataset(self, dataset, processing_class, args: VPLRewardConfig, dataset_name: str,
                         keep_in_memory: bool = False):
        """Contexts (and in `frozen` mode the responses) as rows of the embedding table, by the inference
        component; then, in the other modes, tokenized as TRL does."""
        draws = args.train_context_draws if dataset is self.inference.context_pool else 1
        dataset = self.inference.prepare(dataset, dataset_name, context_draws=draws, keep_in_memory=keep_in_memory)
        if self.inference.model.config.embedding_mode == "frozen":
            return dataset
        return super()._prepare_dataset(dataset, processing_class, args, dataset_name)

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
        model_inputs = {k: v for k, v in inputs.items() if k != "margin"}
        if mode == "train" and config.use_latent and self.args.context_dropout > 0:
            users = model_inputs["context_chosen"].shape[0]
            model_inputs["latent_dropout"] = torch.rand(users, device=model_inputs["context_chosen"].device) < (
                self.args.context_dropout
            )
        outputs = model(**model_inputs)
        head_chosen, head_rejected = torch.chunk(outputs.head, chunks=2)
        rewards_chosen, rewards_rejected = torch.chunk(outputs.logits.squeeze(-1), chunks=2)
        pref_loss = preference_loss(
            head_chosen, head_rejected, config.reward_type, self.args.entropy_coeff, margin=inputs.get("margin")
        )
        loss = pref_loss
        if self.args.pooled_loss_weight and mode == "train" and outputs.pooled is not None:
            pooled_chosen, pooled_rejected = torch.chunk(outputs.pooled, chunks=2)
            pooled_loss = preference_loss(pooled_chosen, pooled_rejected, "base", margin=inputs.get("margin"))
            loss = loss + self.args.pooled_loss_weight * pooled_loss
            self._metrics[mode]["pooled_bt_loss"].append(
                self.accelerator.gather_for_metrics(pooled_loss.detach()).mean().item())
        if self.args.center_rewards_coefficient is not None:
            loss = loss + self.args.center_rewards_coefficient * torch.mean((rewards_chosen + rewards_rejected) ** 2)
        metrics = self._metrics[mode]
        if mode == "train" and "attention_mask" in inputs:  # frozen mode feeds embeddings: no tokens pass
            tokens = self.accelerator.gather_for_metrics(inputs["attention_mask"].sum()).sum().item()
            self._total_train_tokens += tokens // self._tp_size
        if "attention_mask" in inputs or self._total_train_tokens:
            metrics["num_tokens"] = [self._total_train_tokens]
        if config.use_latent:
            beta = self.current_kl_weight()
            loss = loss + beta * outputs.kl
            with torch.no_grad():
                means = self.accelerator.gather_for_metrics(outputs.latent_mean.detach())
                metrics["kl"].append(self.accelerator.gather_for_metrics(outputs.kl.detach()).mean().item())
                metrics["beta"].append(beta)
                metrics["active_units"].append(count_active_units(means))
        with torch.no_grad():
            all_rewards = self.accelerator.gather(outputs.logits.detach())
            metrics["min_reward"].append(all_rewards.min().item())
            metrics["mean_reward"].append(all_rewards.mean().item())
            metrics["max_reward"].append(all_rewards.max().item())
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
        model = self.accelerator.unwrap_model(self.model)
        if model.config.embedding_mode != "full" or not model.config.use_latent:
            return
        if self._contexts_embedded_by == (model, self.state.global_step) or not self.inference.table.index:
            return
        self.inference.reembed_contexts(model)
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
        # kept in memory: predictions, unlike training sets, are prepared once and would only fill datasets' cache
        prepared = self._prepare_dataset(dataset, self.processing_class, self.args, name, keep_in_memory=True)
        model = self.accelerator.unwrap_model(self.model)
        was_training, eval_metrics = model.training, self._metrics["eval"]
        self._metrics["eval"] = defaultdict(list)
        # Every pair, whatever `dataloader_drop_last` says for training; the batches spread over the processes.
        loader = DataLoader(self._remove_unused_columns(prepared, description="prediction"),
                            batch_size=batch_size or self.args.per_device_eval_batch_size,
                            collate_fn=self.data_collator, num_workers=self.args.dataloader_num_workers)
        try:
            predictions = self.evaluation_loop(self.accelerator.prepare(loader), description="Prediction",
                                               metric_key_prefix=name).predictions
        finally:
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


def _embedding_cache_dir(model: VPLRewardModel, args: VPLRewardConfig):
    """Where frozen embeddings are cached: `args.embedding_cache_dir`, else the vpl-trl cache (keyed by the
    backbone's weights); a fine-tuned backbone's embeddings change as it trains, so they stay in memory."""
    if model.config.embedding_mode == "full":
        return None
    return args.embedding_cache_dir or AUTO
