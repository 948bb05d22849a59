"""Scoring completions with a VPL reward model r(x, z) under users' latents.

- `load_reward_model` loads a saved VPL reward model and its tokenizer, with a one-line reason when it cannot.
- `PersonalizedRewardScorer`, the model's `RewardInference` for serving: it infers (and caches) a user's latent `z`
  from their labelled pairs and scores (prompt, completion) pairs under it, batched, rendering and embedding texts
  exactly as the reward model was trained (through the same embedding cache).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from ..data.format import PreferenceDataError
from ..embedded_model import resolve_model_name_or_path
from ..models import VPLRewardModel, local_model_folder
from ..models.causal_lm import Device, default_device
from ..text import completion_text, join_response, render_text
from .reward_inference import RewardInference

Pair = Mapping[str, Any]


class RewardModelError(ValueError):
    """Raised when a reward model cannot be loaded."""


def context_digest(context: Sequence[Pair]) -> str:
    """A stable hash of a user's context pairs (the key of their cached latent)."""
    return hashlib.sha256(json.dumps(list(context), sort_keys=True, default=str).encode("utf-8")).hexdigest()


def load_reward_model(path: str | os.PathLike, device: Device = None) -> tuple[VPLRewardModel, PreTrainedTokenizerBase]:
    """A saved VPL reward model (eval mode) and its tokenizer, or `RewardModelError` with a one-line reason."""
    folder = Path(path)
    if not folder.exists() and (str(path).startswith((".", "/", "~")) or str(path).count("/") != 1):
        raise RewardModelError(f"reward model {path}: no such directory.")
    if folder.is_dir() and not (folder / "config.json").exists():
        raise RewardModelError(f"reward model {path}: no config.json; is this a saved VPL reward model?")
    try:
        folder = local_model_folder(path)  # a Hub repo id: its cached snapshot, tokenizer files included
        model = VPLRewardModel.from_pretrained(folder)
    except (OSError, ValueError, KeyError) as error:
        where = "" if Path(path).exists() else " (no such directory, and not on the Hugging Face Hub)"
        raise RewardModelError(f"reward model {path} cannot be loaded{where}: {_one_line(error)}") from error
    # the tokenizer saved with the reward model, else (a model saved without one) its backbone's
    tokenizer_source = folder if (folder / "tokenizer_config.json").exists() else resolve_model_name_or_path(
        model.config.backbone_name_or_path
    )
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_source)
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    return model.to(device or default_device()).eval(), tokenizer


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


class PersonalizedRewardScorer(RewardInference):
    """Scores (prompt, completion) pairs with a saved VPL reward model under users' latents, batched: the model's
    `RewardInference` for users and policies.

    Users' latents are inferred once from their context pairs and cached by user id or, without one, by a hash of
    the pairs (`latent_computations` counts the encodings done). Texts are embedded as in training and through the
    same cache: context pairs with the backbone's adapter disabled, scored texts with it; in `frozen` mode a text
    that training (or an earlier call) embedded is not embedded again.
    """

    def __init__(self, model: VPLRewardModel, tokenizer: PreTrainedTokenizerBase, batch_size: int = 16,
                 max_length: int | None = None, **kwargs):
        super().__init__(model.eval(), tokenizer, batch_size=batch_size, max_length=max_length, **kwargs)
        self._latents: dict[str, tuple[str, torch.Tensor]] = {}
        self.latent_computations = 0

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, device: Device = None, **kwargs) -> PersonalizedRewardScorer:
        model, tokenizer = load_reward_model(path, device)
        return cls(model, tokenizer, **kwargs)

    # ----- latents ----------------------------------------------------------------------------------------

    def user_latent(self, context: Sequence[Pair] | None = None, user_id: str | None = None) -> torch.Tensor:
        """The latent (1, latent_dim) of a user: from their context pairs (cached under `user_id`, or under the
        pairs' hash), from the cache by `user_id` alone, or the prior mean user when neither is given."""
        if not self.uses_latent:
            return torch.zeros(1, 0, device=self.device)
        if context is None and user_id is None:
            return self.model.prior_latent(1)
        if context is not None and not context:
            raise PreferenceDataError(f"user {user_id or '(unnamed)'}: the context has no pairs.")
        key = user_id if user_id is not None else context_digest(context)
        cached = self._latents.get(key)
        if context is None:
            if cached is None:
                raise KeyError(f"no latent cached for user {user_id!r}: give their context pairs once.")
            return cached[1]
        digest = context_digest(context)
        if cached is None or cached[0] != digest:
            self._latents[key] = (digest, self.encode_context(context))
        return self._latents[key][1]

    def encode_context(self, context: Sequence[Pair]) -> torch.Tensor:
        """The posterior-mean latent (1, latent_dim) of one user's context pairs (not cached)."""
        self.latent_computations += 1
        return super().encode_context(context)

    # ----- scores -----------------------------------------------------------------------------------------

    def score(
        self, prompts: Sequence[Any], completions: Sequence[Any], latent: torch.Tensor | None = None
    ) -> list[float]:
        """r(prompt + completion, z) for each pair; `latent` is (1, d) for one user or (N, d), one row per pair.
        Without `latent`, the prior mean user's."""
        return self.rewards(self.embed_completions(prompts, completions), latent)

    def score_users(
        self, prompts: Sequence[Any], completions: Sequence[Any], latents: Mapping[str, torch.Tensor]
    ) -> dict[str, list[float]]:
        """The same completions scored under each user's latent (each text embedded once)."""
        embeddings = self.embed_completions(prompts, completions)
        return {user: self.rewards(embeddings, latent) for user, latent in latents.items()}

    def embed_completions(self, prompts: Sequence[Any], completions: Sequence[Any]) -> torch.Tensor:
        """Embeddings (N, d) of the scored texts, rendered as in training."""
        if len(prompts) != len(completions):
            raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions.")
        texts = [
            render_text(self.tokenizer, p, join_response(p, completion_text(c))) for p, c in zip(prompts, completions)
        ]
        return self.embed_scored(texts).to(self.device)
