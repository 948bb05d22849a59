"""Personalized best-of-n: sample candidates from a policy LLM and rank them with a VPL reward r(x, z).

`PersonalizedBestOfN` samples n candidates per prompt (`vpl_trl.inference.generation`) and returns them ranked by the
user's reward (`vpl_trl.inference.scoring`).

Example:
```python
>>> from vpl_trl.inference.best_of_n import PersonalizedBestOfN
>>> from vpl_trl.data.user_files import load_user_context
>>> bon = PersonalizedBestOfN.from_pretrained("outputs/vpl-pets")  # policy: the embedded SmolLM2 instruct model
>>> ranking = bon.rank("Please talk about one kind of pet.", context=load_user_context("me.jsonl"), n=8)
>>> ranking.best.text, ranking.best.reward
```
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ..embedded_model import DEFAULT_MODEL
from ..models.causal_lm import load_policy
from .generation import GenerationSettings, generate_candidates
from .scoring import Device, Pair, PersonalizedRewardScorer


@dataclass
class Candidate:
    text: str
    reward: float


@dataclass
class Ranking:
    """One prompt's candidates, best first."""

    prompt: Any
    candidates: list[Candidate] = field(default_factory=list)

    @property
    def best(self) -> Candidate:
        return self.candidates[0]

    def to_dict(self) -> dict[str, Any]:
        return {
            "prompt": self.prompt,
            "best": {"text": self.best.text, "reward": self.best.reward},
            "candidates": [{"text": c.text, "reward": c.reward} for c in self.candidates],
        }


def rank_candidates(prompt: Any, texts: Sequence[str], rewards: Sequence[float]) -> Ranking:
    ranked = sorted((Candidate(t, float(r)) for t, r in zip(texts, rewards)), key=lambda c: c.reward, reverse=True)
    return Ranking(prompt=prompt, candidates=ranked)


class PersonalizedBestOfN:
    """Best-of-n sampling for a user: n candidates from the policy, ranked by r(x, z_user). A user-conditioned
    policy (`conditioning`) is itself conditioned on the user's pairs or latent.

    Users are given by their context pairs (`context`), by a `user_id` whose latent is cached (give the
    context with it once), or neither (the prior mean user). Latents are cached by the scorer.
    """

    def __init__(
        self,
        policy: PreTrainedModel,
        policy_tokenizer: PreTrainedTokenizerBase,
        scorer: PersonalizedRewardScorer,
        settings: GenerationSettings | None = None,
        conditioning: Any = None,
    ):
        self.policy, self.policy_tokenizer, self.scorer = policy, policy_tokenizer, scorer
        self.settings = settings or GenerationSettings()
        self.conditioning = conditioning  # a `vpl_trl.policy.PolicyConditioning` for a user-conditioned policy

    @classmethod
    def from_pretrained(
        cls,
        reward_model: str | os.PathLike,
        policy: str = DEFAULT_MODEL,
        device: Device = None,
        settings: GenerationSettings | None = None,
        score_batch_size: int = 16,
    ) -> PersonalizedBestOfN:
        scorer = PersonalizedRewardScorer.from_pretrained(reward_model, device=device, batch_size=score_batch_size)
        model, tokenizer = load_policy(policy, device=device)
        return cls(model, tokenizer, scorer, settings)

    def rank(
        self, prompt: Any, context: Sequence[Pair] | None = None, user_id: str | None = None, n: int = 8
    ) -> Ranking:
        """One prompt's n candidates ranked for the user."""
        return self.rank_many([prompt], context=context, user_id=user_id, n=n)[0]

    def rank_many(
        self, prompts: Sequence[Any], context: Sequence[Pair] | None = None, user_id: str | None = None, n: int = 8
    ) -> list[Ranking]:
        """Each prompt's n candidates ranked for the user (one latent, generation batched across prompts)."""
        if n < 1:
            raise ValueError(f"n must be at least 1, got {n}.")
        latent = self.scorer.user_latent(context, user_id)
        policy_prompts, policy_latent = prompts, None
        if self.conditioning is not None:  # the policy itself serves the user: shown their pairs, or their z
            chat = bool(getattr(self.policy_tokenizer, "chat_template", None))
            policy_prompts = [self.conditioning.prompt(p, context, chat) for p in prompts]
            policy_latent = latent if self.conditioning.uses_latent else None
        candidates = generate_candidates(self.policy, self.policy_tokenizer, policy_prompts, n, self.settings,
                                         latents=policy_latent)
        flat_prompts = [p for p, texts in zip(prompts, candidates) for _ in texts]
        rewards = self.scorer.score(flat_prompts, [t for texts in candidates for t in texts], latent)
        return [
            rank_candidates(prompt, texts, rewards[i * n : (i + 1) * n])
            for i, (prompt, texts) in enumerate(zip(prompts, candidates))
        ]
