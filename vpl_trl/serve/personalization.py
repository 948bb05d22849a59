"""The model side of the service: each user's latent from their stored pairs, scores under it, the next most
informative pair to ask (`vpl_trl.evaluation.active_queries`), best-of-n answers and the onboarding page's preview.

Model calls are serialized by one lock (one model, CPU threads shared); store reads and writes are not. Users' texts
are embedded into a bounded in-memory cache, never the on-disk embedding cache: a deleted user's texts leave no trace
there, and a long-running server neither fills the disk nor grows without bound.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import torch

from ..embeddings import compute_embeddings, text_key
from ..evaluation.active_queries import PairSet, choose_query
from ..inference.best_of_n import PersonalizedBestOfN, Ranking
from ..inference.scoring import PersonalizedRewardScorer
from ..text import render_text
from .store import UserLatent, UserStore


class NoLatentError(ValueError):
    """The reward model has no user latent (a Bradley-Terry model): nothing to ask a user."""


class NoGenerationError(ValueError):
    """The service was started without a policy to generate with."""


class MemoryEmbeddingCache:
    """Text -> embedding in memory, the least recently used dropped past `max_texts` (the interface of
    `vpl_trl.embeddings.EmbeddingCache` that `compute_embeddings` uses)."""

    def __init__(self, max_texts: int):
        self.max_texts = max_texts
        self._vectors: OrderedDict[str, torch.Tensor] = OrderedDict()

    def refresh(self) -> None:
        """Nothing on disk to look at."""

    def __len__(self) -> int:
        return len(self._vectors)

    def __contains__(self, text: str) -> bool:
        return text_key(text) in self._vectors

    def get(self, text: str) -> torch.Tensor:
        key = text_key(text)
        self._vectors.move_to_end(key)
        return self._vectors[key]

    def add(self, texts: Sequence[str], vectors: torch.Tensor) -> None:
        for text, vector in zip(texts, vectors.detach().float().cpu()):
            self._vectors[text_key(text)] = vector
            self._vectors.move_to_end(text_key(text))
        while len(self._vectors) > self.max_texts:
            self._vectors.popitem(last=False)


def pair_key(prompt: str, first: str, second: str) -> tuple[str, frozenset[str]]:
    """A pair's identity whichever response was chosen."""
    return prompt, frozenset((first, second))


class Personalization:
    """Users' latents (cached in memory and in the store, recomputed when their pairs change), scores, active
    queries from `pool` (pairs `{prompt, chosen, rejected}`: candidates to ask, their labels unused) and
    best-of-n with `best_of_n` (None: no generation)."""

    def __init__(
        self,
        scorer: PersonalizedRewardScorer,
        store: UserStore,
        pool: Sequence[dict[str, str]],
        best_of_n: PersonalizedBestOfN | None = None,
        sample_prompt: str | None = None,
        num_samples: int = 64,
        cached_users: int = 10_000,
        cached_texts: int = 100_000,
    ):
        self.scorer, self.model, self.store, self.best_of_n = scorer, scorer.model, store, best_of_n
        self.num_samples, self.cached_users = num_samples, cached_users
        self._lock = threading.RLock()
        self._latents: OrderedDict[str, UserLatent] = OrderedDict()
        self.latent_computations = 0  # latents computed from pairs (not found in memory or in the store)
        unique = {pair_key(p["prompt"], p["chosen"], p["rejected"]): p for p in pool}
        self.pool, self.pool_keys = list(unique.values()), list(unique)
        if not self.pool:
            raise ValueError("the query pool has no pairs.")
        self.candidates = self._pair_set(self.pool, scored=True)  # through the disk cache: quick restarts
        scorer.cache = MemoryEmbeddingCache(cached_texts)  # users' texts (generation's latents too)
        scorer.cache.add(self._context_texts(self.pool), torch.cat([self.candidates.context_chosen,
                                                                            self.candidates.context_rejected]))
        self.sample_prompt = sample_prompt or max(
            {p["prompt"] for p in self.pool}, key=[p["prompt"] for p in self.pool].count
        )
        if not any(p["prompt"] == self.sample_prompt for p in self.pool):
            raise ValueError(f"the sample prompt {self.sample_prompt!r} is not a prompt of the query pool.")
        self._preview_texts, self._preview_embeddings = self._preview_candidates()

    # ----- embeddings -------------------------------------------------------------------------------------

    def _pair_set(self, pairs: Sequence[dict[str, str]], scored: bool) -> PairSet:
        """Pairs as embeddings: what the context encoder reads (rendered as `PersonalizedRewardScorer.encode_context`
        renders context pairs) and, when `scored`, what the reward scores (else the same tensors)."""
        scorer = self.scorer
        with self._lock:
            context = compute_embeddings(
                self.model, scorer.tokenizer, self._context_texts(pairs), scorer.cache, scorer.batch_size,
                scorer.max_length, use_adapter=False, desc="Embedding context pairs",
            ).to(scorer.device)
            if scored:
                prompts = [p["prompt"] for p in pairs] * 2
                responses = [p[side] for side in ("chosen", "rejected") for p in pairs]
                rewarded = scorer.embed_completions(prompts, responses)
            else:
                rewarded = context
        n = len(pairs)
        return PairSet(rewarded[:n], rewarded[n:], context[:n], context[n:])

    def _context_texts(self, pairs: Sequence[dict[str, str]]) -> list[str]:
        """The texts of the pairs' chosen, then rejected, responses, as the context encoder reads them."""
        tokenizer = self.scorer.tokenizer
        return [render_text(tokenizer, p["prompt"], p[side]) for side in ("chosen", "rejected") for p in pairs]

    def _preview_candidates(self, preview_pairs: int = 4) -> tuple[list[str], torch.Tensor]:
        """The preview's answers: those of the sample prompt's `preview_pairs` pool pairs that users disagree on most
        (the highest information gain under the prior), so that the best of them depends on the user."""
        rows = [i for i, p in enumerate(self.pool) if p["prompt"] == self.sample_prompt]
        if self.scorer.uses_latent:
            with self._lock:
                _, gain = choose_query(self.model, self.candidates.subset(rows), [], self.num_samples,
                                       torch.Generator().manual_seed(0))
            rows = [rows[i] for i in gain.argsort(descending=True)[:preview_pairs].tolist()]
        texts, embeddings = [], []
        for i in rows[:preview_pairs]:
            for side, table in (("chosen", self.candidates.chosen), ("rejected", self.candidates.rejected)):
                if self.pool[i][side] not in texts:
                    texts.append(self.pool[i][side])
                    embeddings.append(table[i])
        return texts, torch.stack(embeddings)

    # ----- latents ----------------------------------------------------------------------------------------

    def prior(self) -> UserLatent:
        zeros = torch.zeros(1, self.model.config.latent_dim if self.scorer.uses_latent else 0)
        return UserLatent(0, self.model.prior_latent(1).cpu() if self.scorer.uses_latent else zeros, zeros, zeros)

    def latent(self, user_id: str) -> UserLatent:
        """The user's latent at their current pairs: from memory, else the store, else computed (and stored)."""
        version = self.store.version(user_id)
        if version is None:
            raise KeyError(user_id)
        with self._lock:
            cached = self._latents.get(user_id)
            if cached is not None and cached.version == version:
                self._latents.move_to_end(user_id)
                return cached
        latent = self.store.latent(user_id, version) if version else None
        if latent is None:
            latent = self._compute_latent(user_id)
        with self._lock:
            self._latents[user_id] = latent
            self._latents.move_to_end(user_id)
            while len(self._latents) > self.cached_users:
                self._latents.popitem(last=False)
        return latent

    def forget(self, user_id: str) -> None:
        """Delete the user from the store and their latent from memory."""
        self.store.delete_user(user_id)
        with self._lock:
            self._latents.pop(user_id, None)

    def _compute_latent(self, user_id: str) -> UserLatent:
        version, pairs = self.store.pairs(user_id)
        if not pairs or not self.scorer.uses_latent:
            prior = self.prior()
            return UserLatent(version, prior.z, prior.mean, prior.logvar)
        answered = self._pair_set(pairs, scored=False)
        with self._lock, torch.no_grad():
            self.latent_computations += 1
            z, mean, logvar = self.model.user_latent(answered.context_chosen[None], answered.context_rejected[None])
        latent = UserLatent(version, z.cpu(), mean.float().cpu(), logvar.float().cpu())
        self.store.save_latent(user_id, latent)
        return latent

    # ----- serving ----------------------------------------------------------------------------------------

    def score(self, requests: Sequence[tuple[str, str, Sequence[str]]]) -> list[list[float]]:
        """Rewards of each `(user_id, prompt, completions)` under that user's latent, scored in one batch."""
        latents = {user: self.latent(user).z for user in {user for user, _, _ in requests}}
        prompts = [prompt for _, prompt, completions in requests for _ in completions]
        completions = [c for _, _, cs in requests for c in cs]
        if not completions:
            return [[] for _ in requests]
        rows = torch.cat([latents[user].expand(len(cs), -1) for user, _, cs in requests])
        with self._lock:
            rewards = self.scorer.score(prompts, completions, rows if self.scorer.uses_latent else None)
        out, begin = [], 0
        for _, _, cs in requests:
            out.append(rewards[begin : begin + len(cs)])
            begin += len(cs)
        return out

    def next_pair(self, user_id: str) -> dict[str, Any] | None:
        """The unanswered pool pair with the most expected information about the user's latent (None: all answered),
        its responses in an order drawn per user and pair."""
        if not self.scorer.uses_latent:
            raise NoLatentError(f"the reward model is a {self.model.config.reward_type!r} model without a user latent.")
        version, pairs = self.store.pairs(user_id)
        done = {pair_key(p["prompt"], p["chosen"], p["rejected"]) for p in pairs}
        open_pairs = [i for i, key in enumerate(self.pool_keys) if key not in done]
        if not open_pairs:
            return None
        # the user's own pairs first, as `choose_query`'s answered candidates (their reward embeddings are never
        # scored, so the context ones stand in), then the open pool pairs
        answered = self._pair_set(pairs, scored=False) if pairs else None
        pool = self.candidates.subset(open_pairs)
        candidates = pool if answered is None else PairSet(
            *(torch.cat([getattr(answered, f), getattr(pool, f)]) for f in
              ("chosen", "rejected", "context_chosen", "context_rejected"))
        )
        seed = int.from_bytes(hashlib.sha256(f"{user_id}:{version}".encode()).digest()[:8], "little")
        generator = torch.Generator().manual_seed(seed)
        with self._lock:
            choice, scores = choose_query(self.model, candidates, list(range(len(pairs))), self.num_samples, generator)
        pair = self.pool[open_pairs[choice - len(pairs)]]
        a, b = (pair["chosen"], pair["rejected"]) if seed % 2 else (pair["rejected"], pair["chosen"])
        return {"prompt": pair["prompt"], "a": a, "b": b, "information_gain": float(scores[choice])}

    def generate(self, user_id: str, prompt: str, n: int) -> Ranking:
        """Best-of-n for the user: n policy samples (a conditioned policy conditioned on the user) ranked by their
        reward; the prior user's without pairs."""
        if self.best_of_n is None:
            raise NoGenerationError("this server was started without a policy.")
        _, pairs = self.store.pairs(user_id)
        with self._lock:
            return self.best_of_n.rank(prompt, context=pairs or None, user_id=user_id if pairs else None, n=n)

    def profile(self, user_id: str) -> dict[str, Any]:
        """How sure the model is of the user (the posterior's standard deviation per latent dimension, and its mean:
        the spread, 1 for the prior) and the preview: their best answer to the sample prompt beside the prior's."""
        latent = self.latent(user_id)
        std = torch.exp(0.5 * latent.logvar).flatten()
        with self._lock:
            mine = self.scorer.rewards(self._preview_embeddings, latent.z if self.scorer.uses_latent else None)
            generic = self.scorer.rewards(self._preview_embeddings, None)

        def best(rewards: list[float]) -> dict[str, Any]:
            index = max(range(len(rewards)), key=rewards.__getitem__)
            return {"text": self._preview_texts[index], "reward": rewards[index]}

        return {
            "user_id": user_id,
            "pairs": self.store.count_pairs(user_id),
            "posterior": {"spread": float(std.mean()) if len(std) else None, "std": std.tolist()},
            "preview": {"prompt": self.sample_prompt, "personalized": best(mine), "generic": best(generic)},
        }
