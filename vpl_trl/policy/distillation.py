"""Conditioned best-of-n distillation (expert iteration) with TRL's `SFTTrainer`.

Each round (`vpl_trl.policy.best_of_n_rounds`), the policy samples `bon_n` completions for each (user, prompt) row
under that user's conditioning; the user's personalized reward ranks them, and the best `bon_keep` so far become
supervised examples, conditioned the same way. The policy is fine-tuned on them for `bon_epochs_per_round` epochs,
then samples the next round. With `offline_pool`, the first round's candidates are a shared pool's answers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from datasets import Dataset
from trl import SFTConfig

from ..checkpoints import FaultTolerantCheckpoints
from .best_of_n_rounds import BestOfNRounds, BestOfNRoundsConfig, Ranked, SharedRanking, as_completion, with_latent
from .trainers import ConditionedSFTTrainer, LatentPromptArguments


@dataclass
class BestOfNDistillationConfig(BestOfNRoundsConfig, LatentPromptArguments, SFTConfig):
    r"""
    [`~trl.SFTConfig`] for [`BestOfNDistillationTrainer`], with the rounds' fields ([`BestOfNRoundsConfig`]):
    `bon_n` candidates per user and prompt each round, the best `bon_keep` distilled, a new round every
    `bon_epochs_per_round` epochs, how the candidates are sampled, `candidates_file` and `offline_pool`, and the
    soft prompt's `latent_prompt_lr_ratio` ([`LatentPromptArguments`]). The examples of a (user, prompt) are the
    best of every round so far (`replay`, on by default).
    """

    replay: bool = field(
        default=True, metadata={"help": "Keep the best examples of every round so far, not of the last one only."}
    )


class BestOfNDistillationTrainer(FaultTolerantCheckpoints, BestOfNRounds, ConditionedSFTTrainer):
    """[`ConditionedSFTTrainer`] on the best `bon_keep` of `bon_n` samples per (user, prompt), refreshed every round;
    its arguments are [`BestOfNRounds`]' (`args`: a [`BestOfNDistillationConfig`])."""

    @classmethod
    def _config_name(cls) -> str:
        return "a BestOfNDistillationConfig"

    def _select(self, row: dict[str, Any], ranked: Ranked, shared: SharedRanking | None = None
                ) -> list[tuple[float, dict[str, Any]]]:
        """The best `bon_keep` candidates, as prompt-completion examples."""
        return [(reward, with_latent(row, {"prompt": row["prompt"], "completion": as_completion(row, text)}))
                for reward, text in ranked[: self.args.bon_keep]]

    def _prepare_round(self, data: Dataset) -> Dataset:
        return self._prepare_dataset(data, self.processing_class, self.args, False, None, "distillation")
