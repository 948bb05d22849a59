"""Iterative DPO on pairs ranked by each user's personalized reward, with TRL's `DPOTrainer`.

Each round (`vpl_trl.policy.best_of_n_rounds`), the policy samples `n` completions for each (user, prompt) row
under that user's conditioning, and the user's reward ranks them; the best against the worst (then the second best
against the second worst, up to `keep` pairs) become preference pairs, conditioned the same way. The reference is
the policy as the round begins (its log-probabilities computed once per round, TRL's `precompute_ref_log_probs`),
as in iterative DPO (Xu et al. 2023; Pang et al. 2024): each round improves on the last one, within DPO's KL bound
to it. A latent-conditioned policy's soft prompt is then part of the reference too, not only of the policy.
"""

from __future__ import annotations

from typing import Any

import torch
from accelerate import PartialState
from datasets import Dataset

from ..checkpoints import FaultTolerantCheckpoints
from ..distributed import full_weights_for_generation
from ..models.latent_prompt import conditioned_on
from .best_of_n_rounds import BestOfNRounds, Ranked, RoundSettings, as_completion, with_latent
from .trainers import LATENT_COLUMN, ConditionedDPOTrainer


class RewardRankedDPOTrainer(FaultTolerantCheckpoints, BestOfNRounds, ConditionedDPOTrainer):
    """[`ConditionedDPOTrainer`] on best-against-worst pairs of `n` samples per (user, prompt), refreshed every
    round, against the policy as the round began. Its arguments are [`BestOfNRounds`]' (`args`: a `DPOConfig`, whose
    `precompute_ref_log_probs` is implied; `settings.keep`: the pairs per (user, prompt))."""

    def _start_rounds(self, model, prompt_dataset, reward_function, settings: RoundSettings, *args, **kwargs):
        if settings.n < 2 * settings.keep:
            raise ValueError(f"{settings.keep} pairs per prompt need at least {2 * settings.keep} candidates; "
                             f"got n={settings.n}.")
        return super()._start_rounds(model, prompt_dataset, reward_function, settings, *args, **kwargs)

    def _before_trainer_init(self, args) -> None:
        args.precompute_ref_log_probs = False  # TRL's would score against the base model: computed here per round

    def _after_trainer_init(self) -> None:
        self._drop_reference_adapter()
        self.precompute_ref_logps = True  # the loss reads the round's reference log-probabilities from the batch
        if self._resumed is None:  # a resumed run reads the round's reference log-probabilities from its checkpoint
            with full_weights_for_generation(self.model) as policy:
                self.train_dataset = self._with_reference_logps(self.train_dataset, policy)

    def _drop_reference_adapter(self) -> None:
        """TRL copies a PEFT policy's adapter into a frozen `ref` adapter for its reference; this trainer's reference
        comes from the round's log-probabilities instead, so the copy is dropped (and not saved)."""
        if "ref" in getattr(self.model, "peft_config", {}):
            self.model.delete_adapter("ref")
            self.model.set_adapter("default")

    def _select(self, row: dict[str, Any], ranked: Ranked) -> list[tuple[float, dict[str, Any]]]:
        """`keep` pairs: the i-th best candidate against the i-th worst, scored by their reward gap."""
        pairs = []
        for i in range(self.settings.keep):
            (high, chosen), (low, rejected) = ranked[i], ranked[-1 - i]
            example = {"prompt": row["prompt"], "chosen": as_completion(row, chosen),
                       "rejected": as_completion(row, rejected)}
            pairs.append((high - low, with_latent(row, example)))
        return pairs

    def _prepare_round(self, data: Dataset) -> Dataset:
        prepared = self._prepare_dataset(data, self.processing_class, self.args, "ranked pairs")
        with full_weights_for_generation(self.model_wrapped, self.accelerator) as policy:
            return self._with_reference_logps(prepared, policy)

    @torch.no_grad()
    def _with_reference_logps(self, dataset: Dataset, policy) -> Dataset:
        """`dataset` with `ref_chosen_logps` and `ref_rejected_logps` under `policy` (the policy as the round begins).
        Every process computes them all (the same numbers), so no process waits for another's."""
        was_training = policy.training
        policy.eval()
        chosen, rejected = [], []
        size = self.args.precompute_ref_batch_size or self.args.per_device_train_batch_size
        device = self.accelerator.device
        for start in range(0, len(dataset), size):
            batch = self.data_collator([dataset[i] for i in range(start, min(start + size, len(dataset)))])
            latents = batch.pop(LATENT_COLUMN, None)
            labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
            with conditioned_on(policy, None if latents is None else torch.cat([latents, latents]).to(device)):
                outputs = policy(input_ids=batch["input_ids"].to(device), labels=labels.to(device),
                                 attention_mask=batch["attention_mask"].to(device), fused_lm_head=True,
                                 use_cache=False)
            logps = outputs.log_probs[:, -(labels.size(1) - 1):].sum(dim=1).float().cpu()
            chosen_logps, rejected_logps = logps.chunk(2)
            chosen += chosen_logps.tolist()
            rejected += rejected_logps.tolist()
        policy.train(was_training)
        PartialState().wait_for_everyone()
        dataset = dataset.remove_columns([c for c in ("ref_chosen_logps", "ref_rejected_logps")
                                          if c in dataset.column_names])
        return dataset.add_column("ref_chosen_logps", chosen).add_column("ref_rejected_logps", rejected)
