"""The VPL reward as a TRL reward function: each completion scored under the latent of its prompt's user."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from ..inference.scoring import PersonalizedRewardScorer
from ..text import completion_text


class PersonalizedRewardFunction:
    """`reward_func(prompts, completions, user_id, raw_prompt, **kwargs) -> list[float]` for `trl.GRPOTrainer`.

    `user_id` and `raw_prompt` are dataset columns, which TRL passes as keyword arguments: each completion
    is scored after its bare prompt (without the user preamble the policy saw), under its user's
    precomputed latent. Per-user mean rewards are logged as `reward/<user>` when TRL offers `log_metric`.
    """

    __name__ = "vpl_reward"

    def __init__(self, scorer: PersonalizedRewardScorer, latents: Mapping[str, torch.Tensor]):
        self.scorer = scorer
        self.latents = dict(latents)

    def latent_rows(self, users: Sequence[str]) -> torch.Tensor:
        missing = sorted({u for u in users if u not in self.latents})
        if missing:
            raise KeyError(f"no latent for user(s) {missing}: the reward knows {sorted(self.latents)}.")
        return torch.cat([self.latents[u] for u in users])

    def __call__(
        self,
        prompts: Sequence[Any],
        completions: Sequence[Any],
        user_id: Sequence[str],
        raw_prompt: Sequence[Any] | None = None,
        log_metric: Callable[[str, float], None] | None = None,
        **kwargs,
    ) -> list[float]:
        texts = [completion_text(c).strip() for c in completions]
        rewards = self.scorer.score(list(raw_prompt or prompts), texts, self.latent_rows(list(user_id)))
        if log_metric is not None:
            for user, values in _by_user(user_id, rewards).items():
                log_metric(f"reward/{user}", sum(values) / len(values))
        return rewards


def _by_user(users: Sequence[str], rewards: Sequence[float]) -> dict[str, list[float]]:
    grouped: dict[str, list[float]] = defaultdict(list)
    for user, reward in zip(users, rewards):
        grouped[user].append(reward)
    return grouped
