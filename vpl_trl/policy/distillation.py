"""Conditioned best-of-n distillation (expert iteration) with TRL's `SFTTrainer`.

Each round (`vpl_trl.policy.best_of_n_rounds`), the policy samples `n` completions for each (user, prompt) row
under that user's conditioning; the user's personalized reward ranks them, and the best `keep` so far become
supervised examples, conditioned the same way. The policy is fine-tuned on them for `epochs_per_round` epochs,
then samples the next round.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from datasets import Dataset

from .best_of_n_rounds import BestOfNRounds, Ranked, RoundSettings, as_completion, with_latent
from .trainers import ConditionedSFTTrainer


class BestOfNDistillationTrainer(BestOfNRounds, ConditionedSFTTrainer):
    """[`ConditionedSFTTrainer`] on the best of `n` samples per (user, prompt), refreshed every round.

    Args:
        model: the policy (a PEFT model; latent-conditioned or not).
        args: an `SFTConfig`.
        prompt_dataset: rows with `prompt` (what the policy sees), `raw_prompt` (what the reward scores),
            `bare_prompt` (the prompt without conditioning, for the shared first round), `user_id` and, for latent
            conditioning, `user_latent` (`vpl_trl.policy.build_policy_dataset` makes them).
        reward_function: TRL's reward-function signature, `f(prompts, completions, user_id, raw_prompt) -> list`.
        settings: [`RoundSettings`].
        deadline: a `time.perf_counter()` value past which no new round starts (a wall-time budget).
    """

    def __init__(
        self,
        model,
        args,
        prompt_dataset: Dataset,
        reward_function: Callable[..., list[float]],
        settings: RoundSettings,
        processing_class,
        callbacks=None,
        deadline: float | None = None,
    ):
        first = self._start_rounds(model, prompt_dataset, reward_function, settings, processing_class, args, deadline)
        super().__init__(model=model, args=args, train_dataset=first, processing_class=processing_class,
                         callbacks=callbacks)
        self._install_rounds()

    def _select(self, row: dict[str, Any], ranked: Ranked) -> list[tuple[float, dict[str, Any]]]:
        """The best `keep` candidates, as prompt-completion examples."""
        return [(reward, with_latent(row, {"prompt": row["prompt"], "completion": as_completion(row, text)}))
                for reward, text in ranked[: self.settings.keep]]

    def _prepare_round(self, data: Dataset) -> Dataset:
        return self._prepare_dataset(data, self.processing_class, self.args, False, None, "distillation")
