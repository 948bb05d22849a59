"""TRL trainers for a policy conditioned on users' latents (`vpl_trl.models.latent_prompt`).

Each batch row carries its user's latent (`user_latent`, a dataset column); the trainers set the latents
around every forward and generation of the policy, so the soft prompt trains with the LoRA adapter. With text
conditioning (no latent column) they behave exactly as TRL's.

- `ConditionedGRPOTrainer`: `trl.GRPOTrainer` (PPO's clipped surrogate with group-relative advantages).
- `ConditionedSFTTrainer`: `trl.SFTTrainer`, the base of best-of-n distillation (`vpl_trl.policy.distillation`).
- `ConditionedDPOTrainer`: `trl.DPOTrainer`, the base of reward-ranked DPO (`vpl_trl.policy.ranked_dpo`).
- `TimeBudgetCallback`: stops training after a wall-time budget, on every process together.

All three keep the `user_latent` column in their batches (`LatentColumn`: a signature column, passed through by
TRL's default collator), save the soft-prompt module with the adapter, loading it back when resuming
(`LatentPromptCheckpoints`), and train it at `latent_prompt_lr_ratio` times the learning rate
(`LatentPromptLearningRate`, a field of `LatentPromptArguments` in their configs).
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from accelerate.utils import broadcast_object_list
from peft import PeftModel
from transformers import TrainerCallback
from transformers.integrations import is_deepspeed_zero3_enabled
from trl import DPOTrainer, GRPOTrainer, SFTTrainer
from trl.trainer.dpo_trainer import DataCollatorForPreference
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

from ..checkpoints import FaultTolerantCheckpoints
from ..models.latent_prompt import (
    conditioned_on,
    find_latent_embedding,
    load_latent_prompt_weights,
    save_latent_prompt,
)
from .lm_head import add_logits_lm_head

LATENT_COLUMN = "user_latent"


class TimeBudgetCallback(TrainerCallback):
    """Stop training once `seconds` of wall time have passed since `start` (default: when training began), checked
    after each step; the main process decides, so that every process stops at the same step."""

    def __init__(self, seconds: float | None, start: float | None = None):
        self.seconds, self.start = seconds, start  # `start`: a `time.perf_counter()` taken before training began

    def on_train_begin(self, args, state, control, **kwargs):
        if self.start is None:
            self.start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        if not self.seconds:
            return
        stop = [time.perf_counter() - self.start >= self.seconds]
        if args.world_size > 1:
            broadcast_object_list(stop)
        if stop[0]:
            control.should_training_stop = True


class LatentPromptCheckpoints:
    """Trainer mixin: the soft-prompt module is saved beside the adapter (final model and checkpoints), and a run
    resumed from a checkpoint loads it back (PEFT's adapter checkpoint does not hold it; DeepSpeed's does)."""

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False):
        super().save_model(output_dir, _internal_call)
        # every process takes part in gathering the module under ZeRO-3
        model = self.accelerator.unwrap_model(self.model)
        save_latent_prompt(model, output_dir or self.args.output_dir, write=self.args.should_save)

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        load_latent_prompt_weights(model or self.model, resume_from_checkpoint)


@dataclass
class LatentPromptArguments:
    """The field that the conditioned trainers' configs add for the soft-prompt module."""

    latent_prompt_lr_ratio: float = field(
        default=1.0, metadata={"help": "The soft-prompt module's learning rate over the adapter's (as LoRA+'s ratio "
                                       "for LoRA's B matrices): at the adapter's rate it barely moves from its "
                                       "initialization in a short run, and the policy reads little of `z`."}
    )

    def __post_init__(self):
        if self.latent_prompt_lr_ratio <= 0:
            raise ValueError(f"latent_prompt_lr_ratio must be above 0, got {self.latent_prompt_lr_ratio}.")
        parent = getattr(super(), "__post_init__", None)
        if parent is not None:  # a trainer config's own checks (TrainingArguments)
            parent()


class LatentPromptLearningRate:
    """Trainer mixin: the soft-prompt module's parameters get their own optimizer groups, at `latent_prompt_lr_ratio`
    times the learning rate of the groups they came from (the scheduler then scales every group alike)."""

    def create_optimizer(self, model=None):
        optimizer = super().create_optimizer(model)
        ratio = getattr(self.args, "latent_prompt_lr_ratio", 1.0)
        layer = find_latent_embedding(self.model if model is None else model)
        if ratio == 1.0 or layer is None:
            return optimizer
        prompt = {id(p) for p in layer.prompt.parameters()}
        for group in list(optimizer.param_groups):
            moved = [p for p in group["params"] if id(p) in prompt]
            if moved:
                group["params"] = [p for p in group["params"] if id(p) not in prompt]
                optimizer.add_param_group({**group, "params": moved, "lr": group["lr"] * ratio})
        optimizer.param_groups[:] = [g for g in optimizer.param_groups if g["params"]]
        return optimizer


class LatentCollator:
    """Collator mixin: each example's `user_latent` passes through as a (batch, d) float tensor."""

    def torch_call(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        output = super().torch_call(examples)
        if LATENT_COLUMN in examples[0]:
            output[LATENT_COLUMN] = torch.tensor([example[LATENT_COLUMN] for example in examples], dtype=torch.float32)
        return output


class LatentDataCollator(LatentCollator, DataCollatorForLanguageModeling):
    """TRL's language-modeling collator, passing each example's `user_latent` through."""


class LatentPreferenceCollator(LatentCollator, DataCollatorForPreference):
    """TRL's preference collator, passing each pair's `user_latent` through."""


_LATENT_COLLATORS = {
    DataCollatorForLanguageModeling: LatentDataCollator, DataCollatorForPreference: LatentPreferenceCollator
}


class LatentColumn:
    """Trainer mixin: each row's `user_latent` reaches the batches. It is one of the signature columns (which TRL
    keeps), and TRL's default collator, whenever the trainer sets it, becomes its latent subclass with the same
    settings (a collator passed by the caller is kept as it is, unless it is exactly TRL's default class)."""

    @property
    def data_collator(self):
        return self._data_collator

    @data_collator.setter
    def data_collator(self, collator) -> None:
        latent_class = _LATENT_COLLATORS.get(type(collator))
        if latent_class is not None:
            settings = {f.name: getattr(collator, f.name) for f in dataclasses.fields(collator) if f.init}
            collator = latent_class(**settings)
        self._data_collator = collator

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        if LATENT_COLUMN not in self._signature_columns:
            self._signature_columns = [*self._signature_columns, LATENT_COLUMN]


class ConditionedGRPOTrainer(FaultTolerantCheckpoints, LatentColumn, LatentPromptCheckpoints, LatentPromptLearningRate,
                             GRPOTrainer):
    """`trl.GRPOTrainer` for a latent-conditioned policy: the rows' `user_latent` condition generation, the old
    and reference log-probabilities and the loss. The soft-prompt module is saved with the adapter."""

    _latents: torch.Tensor | None = None

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.timings = {"generation": 0.0, "scoring": 0.0}

    def _generate(self, prompts):
        start = time.perf_counter()
        try:
            return super()._generate(prompts)
        finally:
            self.timings["generation"] += time.perf_counter() - start

    def _calculate_rewards(self, *args, **kwargs):
        start = time.perf_counter()
        try:
            return super()._calculate_rewards(*args, **kwargs)
        finally:
            self.timings["scoring"] += time.perf_counter() - start

    def _generate_and_score_completions(self, inputs: list[dict[str, Any]]) -> dict[str, Any]:
        if LATENT_COLUMN not in inputs[0]:
            return super()._generate_and_score_completions(inputs)
        latents = torch.tensor([row[LATENT_COLUMN] for row in inputs], device=self.accelerator.device)
        self._latents = latents
        try:
            with conditioned_on(self.model, latents):
                output = super()._generate_and_score_completions(inputs)
        finally:
            self._latents = None
        output[LATENT_COLUMN] = latents  # shuffled and split with the batch's other tensors
        return output

    def _compute_loss(self, model, inputs):
        self._latents = inputs.get(LATENT_COLUMN)
        try:
            return super()._compute_loss(model, inputs)
        finally:
            self._latents = None

    def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep, batch_size=None,
                                           **kwargs):
        latents = self._latents
        if latents is None:
            return super()._get_per_token_logps_and_entropies(
                model, input_ids, attention_mask, logits_to_keep, batch_size, **kwargs
            )
        # TRL computes these in chunks of `batch_size` rows: each chunk gets its rows' latents
        batch_size = batch_size or input_ids.size(0)
        chunks = []
        for start in range(0, input_ids.size(0), batch_size):
            end = start + batch_size
            with conditioned_on(model, latents[start:end]):
                chunks.append(super()._get_per_token_logps_and_entropies(
                    model, input_ids[start:end], attention_mask[start:end], logits_to_keep, batch_size, **kwargs
                ))
        logps = torch.cat([c[0] for c in chunks])
        entropies = torch.cat([c[1] for c in chunks]) if chunks[0][1] is not None else None
        aux = torch.stack([c[2] for c in chunks]).mean() if chunks[0][2] is not None else None
        return logps, entropies, aux


class ConditionedSFTTrainer(LatentColumn, LatentPromptCheckpoints, LatentPromptLearningRate, SFTTrainer):
    """`trl.SFTTrainer` for a latent-conditioned policy: each example's `user_latent` conditions its forward."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        latents = inputs.pop(LATENT_COLUMN, None)
        with conditioned_on(model, latents):
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)


def _chosen_and_rejected(latents: torch.Tensor | None) -> torch.Tensor | None:
    """TRL's preference batches stack the chosen rows, then the rejected ones: each pair's latent serves both."""
    return None if latents is None else torch.cat([latents, latents])


class ConditionedDPOTrainer(LatentColumn, LatentPromptCheckpoints, LatentPromptLearningRate, DPOTrainer):
    """`trl.DPOTrainer` for a latent-conditioned policy: each pair's `user_latent` conditions the policy's (and the
    reference's) forward of both its completions. The soft-prompt module is saved with the adapter. On a CPU (not
    under ZeRO-3, whose sharded head TRL's gathers), the log-probabilities come from the completions' logits
    (`vpl_trl.policy.lm_head`): the same numbers as TRL's chunked head, faster there."""

    def _use_logits_head(self) -> None:
        if not is_deepspeed_zero3_enabled():
            add_logits_lm_head(self.model.get_base_model() if isinstance(self.model, PeftModel) else self.model)

    def _compute_loss(self, model, inputs, return_outputs):
        self._use_logits_head()
        latents = inputs.pop(LATENT_COLUMN, None)
        with conditioned_on(model, _chosen_and_rejected(latents)):
            return super()._compute_loss(model, inputs, return_outputs)

    def compute_ref_log_probs(self, model, inputs):
        self._use_logits_head()
        latents = inputs.pop(LATENT_COLUMN, None)
        with conditioned_on(model, _chosen_and_rejected(latents)):
            return super().compute_ref_log_probs(model, inputs)
