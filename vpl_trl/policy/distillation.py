"""Conditioned best-of-n distillation (expert iteration) with TRL's `SFTTrainer`.

Each round (`vpl_trl.policy.best_of_n_rounds`), the policy samples `n` completions for each (user, prompt) row
under that user's conditioning; the user's personalized reward ranks them, and the best `keep` so far become
supervised examples, conditioned the same way. The policy is fine-tuned on them for `epochs_per_round` epochs,
then samples the next round.
"""

from __future__ import annotations

from typing import Any

from datasets import Dataset

from ..checkpoints import FaultTolerantCheckpoints
from .best_of_n_rounds import BestOfNRounds, Ranked, as_completion, with_latent
from .trainers import ConditionedSFTTrainer


class BestOfNDistillationTrainer(FaultTolerantCheckpoints, BestOfNRounds, ConditionedSFTTrainer):
    """[`ConditionedSFTTrainer`] on the best `keep` of `n` samples per (user, prompt), refreshed every round; its
    arguments are [`BestOfNRounds`]' (`args`: an `SFTConfig`)."""

    def _select(self, row: dict[str, Any], ranked: Ranked) -> list[tuple[float, dict[str, Any]]]:
        """The best `keep` candidates, as prompt-completion examples."""
        return [(reward, with_latent(row, {"prompt": row["prompt"], "completion": as_completion(row, text)}))
                for reward, text in ranked[: self.settings.keep]]

    def _prepare_round(self, data: Dataset) -> Dataset:
        return self._prepare_dataset(data, self.processing_class, self.args, False, None, "distillation")
