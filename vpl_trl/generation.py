"""Personalized best-of-n: sample candidates from a policy LLM and rank them with a VPL reward r(x, z).

- `load_user_context` reads a user's labelled pairs (JSON list or JSONL of `{prompt?, chosen, rejected}`).
- `PersonalizedRewardScorer` infers (and caches) a user's latent `z` from those pairs and scores
  (prompt, completion) pairs under it, batched, rendering texts exactly as the reward model was trained.
- `generate_candidates` samples n completions per prompt in batches (chat template for chat models).
- `PersonalizedBestOfN` puts both together and returns each prompt's candidates ranked by reward.

Example:
```python
>>> from vpl_trl.generation import PersonalizedBestOfN, load_user_context
>>> bon = PersonalizedBestOfN.from_pretrained("outputs/vpl-pets")  # policy: the embedded SmolLM2 instruct model
>>> ranking = bon.rank("Please talk about one kind of pet.", context=load_user_context("me.jsonl"), n=8)
>>> ranking.best.text, ranking.best.reward
```
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import json
import os
import re
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from .data.format import PreferenceDataError, read_jsonl, validate_example
from .distributed import is_main_process
from .embedded_model import DEFAULT_MODEL, resolve_model_name_or_path
from .embeddings import EmbeddingCache, compute_embeddings, default_embedding_cache_dir, is_chat, render_text
from .models import VPLRewardModel, local_model_folder
from .precision import inference_autocast

Pair = Mapping[str, Any]
Device = str | torch.device | None


class RewardModelError(ValueError):
    """Raised when a reward model cannot be loaded."""


# ----- user contexts ----------------------------------------------------------------------------------------


def load_user_context(path: str | os.PathLike) -> list[dict[str, Any]]:
    """A user's labelled pairs from a JSON file (a list, or an object with a `context` list) or a JSONL file.

    Raises `PreferenceDataError` naming the file and the line (JSONL) or entry (JSON) of any malformed pair.
    """
    path = Path(path)
    if not path.is_file():
        raise PreferenceDataError(f"{path}: no such user context file.")
    if _is_json_document(path):
        pairs = _read_json_pairs(path)
        where = [f"{path}, entry {i}" for i in range(1, len(pairs) + 1)]
    else:
        pairs, where = read_jsonl(path), _jsonl_line_names(path)
    if not pairs:
        raise PreferenceDataError(
            f"{path}: no context pairs (expected a JSON list or JSONL of {{prompt?, chosen, rejected}} objects)."
        )
    for pair, name in zip(pairs, where):
        if not isinstance(pair, Mapping):
            raise PreferenceDataError(f"{name}: expected an object with `chosen` and `rejected`, got {type(pair).__name__}.")
        validate_example(pair, name)
    return [dict(pair) for pair in pairs]


def _is_json_document(path: Path) -> bool:
    if path.suffix == ".json":
        return True
    if path.suffix in (".jsonl", ".gz"):
        return False
    with open(path, encoding="utf-8") as handle:
        head = handle.read(4096).lstrip()
    return head.startswith("[")


def _read_json_pairs(path: Path) -> list[Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise PreferenceDataError(f"{path}, line {error.lineno}: not valid JSON ({error.msg}).") from None
    if isinstance(data, Mapping) and isinstance(data.get("context"), list):
        data = data["context"]
    if not isinstance(data, list):
        raise PreferenceDataError(
            f"{path}: expected a JSON list of {{prompt?, chosen, rejected}} pairs, got {type(data).__name__}."
        )
    return data


def _jsonl_line_names(path: Path) -> list[str]:
    """`FILE, line N` for each non-blank line, matching the rows `read_jsonl` returns."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as handle:
        return [f"{path}, line {number}" for number, line in enumerate(handle, start=1) if line.strip()]


def read_prompts(path: str | os.PathLike) -> list[Any]:
    """Prompts from a file: JSONL rows with `prompt` (`.jsonl`, or a first line starting with `{`), else one per line."""
    path = Path(path)
    if not path.is_file():
        raise PreferenceDataError(f"{path}: no such prompts file.")
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if path.suffix == ".jsonl" or (lines and lines[0].lstrip().startswith("{")):
        rows = read_jsonl(path)
        for name, row in zip(_jsonl_line_names(path), rows):
            if not row.get("prompt"):
                raise PreferenceDataError(f"{name}: missing field `prompt`.")
        prompts = [row["prompt"] for row in rows]
    else:
        prompts = lines
    if not prompts:
        raise PreferenceDataError(f"{path}: no prompts.")
    return prompts


def context_digest(context: Sequence[Pair]) -> str:
    """A stable hash of a user's context pairs (the key of their cached latent)."""
    return hashlib.sha256(json.dumps(list(context), sort_keys=True, default=str).encode("utf-8")).hexdigest()


def completion_text(completion: Any) -> str:
    """The text of a completion given as a string or as chat messages (TRL's conversational format)."""
    if isinstance(completion, str):
        return completion
    return "".join(message["content"] for message in completion if message.get("role", "assistant") == "assistant")


def join_response(prompt: Any, response: str) -> str:
    """The response as scored after `prompt`: after a plain-text prompt ending in a non-space (`...Assistant:`)
    a response gets the leading space that `Human:/Assistant:` data (HH-RLHF, Pets) put there."""
    if isinstance(prompt, str) and prompt and not prompt[-1].isspace() and response and not response[0].isspace():
        return " " + response
    return response


# ----- scoring ----------------------------------------------------------------------------------------------


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


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class PersonalizedRewardScorer:
    """Scores (prompt, completion) pairs with a VPL reward model under users' latents, batched.

    Users' latents are inferred once from their context pairs and cached by user id or, without one, by
    a hash of the pairs (`latent_computations` counts the encodings done). Context pairs are embedded with
    the backbone's adapter disabled (cached on disk as in training); scored texts with it.
    """

    def __init__(
        self,
        model: VPLRewardModel,
        tokenizer: PreTrainedTokenizerBase,
        batch_size: int = 16,
        max_length: int | None = None,
    ):
        self.model, self.tokenizer = model.eval(), tokenizer
        # by default, truncate where training did (models saved before this setting existed trained at 512)
        self.max_length = max_length or getattr(model.config, "max_sequence_length", 512)
        self.batch_size = batch_size
        self.context_cache = EmbeddingCache(default_embedding_cache_dir(model, model.config.pooling, self.max_length))
        self._latents: dict[str, tuple[str, torch.Tensor]] = {}
        self.latent_computations = 0

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, device: Device = None, **kwargs) -> PersonalizedRewardScorer:
        model, tokenizer = load_reward_model(path, device)
        return cls(model, tokenizer, **kwargs)

    @property
    def uses_latent(self) -> bool:
        return bool(self.model.config.use_latent)

    @property
    def device(self) -> torch.device:
        return next(self.model.decoder.parameters()).device

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

    @torch.no_grad()
    def encode_context(self, context: Sequence[Pair]) -> torch.Tensor:
        """The posterior-mean latent (1, latent_dim) of one user's context pairs (not cached)."""
        self.latent_computations += 1
        chosen = [render_text(self.tokenizer, p.get("prompt"), p["chosen"]) for p in context]
        rejected = [render_text(self.tokenizer, p.get("prompt"), p["rejected"]) for p in context]
        embeddings = self._embed(chosen + rejected, use_adapter=False, cache=self.context_cache).to(self.device)
        pairs = embeddings.view(2, 1, len(context), -1)
        mean, logvar = self.model.encode_context(pairs[0], pairs[1])
        return self.model.latent_from_posterior(mean, logvar)

    # ----- scores -----------------------------------------------------------------------------------------

    def score(self, prompts: Sequence[Any], completions: Sequence[Any], latent: torch.Tensor | None = None) -> list[float]:
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
        """Embeddings (N, d) of the scored texts, rendered as in training (adapter enabled)."""
        if len(prompts) != len(completions):
            raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions.")
        texts = [render_text(self.tokenizer, p, join_response(p, completion_text(c))) for p, c in zip(prompts, completions)]
        return self._embed(texts, use_adapter=True, cache=EmbeddingCache(None)).to(self.device)

    @torch.no_grad()
    def rewards(self, embeddings: torch.Tensor, latent: torch.Tensor | None = None) -> list[float]:
        """The reward head on precomputed embeddings (N, d) under `latent` ((1, d) or (N, d); default: prior)."""
        if self.uses_latent:
            latent = self.model.prior_latent(1) if latent is None else latent.to(self.device)
            if latent.shape[0] not in (1, len(embeddings)):
                raise ValueError(
                    f"{latent.shape[0]} latents for {len(embeddings)} completions: give 1 or one per completion."
                )
        rewards: list[float] = []
        for begin in range(0, len(embeddings), self.batch_size):
            rows = slice(begin, begin + self.batch_size)
            batch_latent = None
            if self.uses_latent:
                batch_latent = latent if latent.shape[0] == 1 else latent[rows]
            output = self.model(embeddings=embeddings[rows], latent=batch_latent)
            rewards += output.logits.squeeze(-1).float().cpu().tolist()
        return rewards

    def _embed(self, texts: list[str], use_adapter: bool, cache: EmbeddingCache) -> torch.Tensor:
        # compute_embeddings reports its throughput on stdout: keep stdout for the caller's results
        with contextlib.redirect_stdout(sys.stderr):
            return compute_embeddings(
                self.model, self.tokenizer, texts, cache, self.batch_size, self.max_length,
                use_adapter=use_adapter, desc="Scoring texts" if use_adapter else "Embedding context pairs",
            )


# ----- generation -------------------------------------------------------------------------------------------


def load_policy(name_or_path: str = DEFAULT_MODEL, device: Device = None) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A causal LM (eval mode) and its tokenizer; the default is the embedded SmolLM2 instruct model."""
    path = resolve_model_name_or_path(name_or_path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(path)
    return model.to(device or default_device()).eval(), tokenizer


def dialogue_messages(text: str) -> list[dict[str, str]] | None:
    """Chat messages of a `Human: ... Assistant:` dialogue ending in an open assistant turn (HH-RLHF and Pets
    prompts), or None when `text` is not one."""
    turns = re.split(r"(?:^|\n\n)(Human|Assistant):", text)
    if turns[0].strip() or len(turns) < 3 or turns[1] != "Human" or turns[-2] != "Assistant" or turns[-1].strip():
        return None
    roles = {"Human": "user", "Assistant": "assistant"}
    return [{"role": roles[turns[i]], "content": turns[i + 1].strip()} for i in range(1, len(turns) - 2, 2)]


def policy_input_text(tokenizer: PreTrainedTokenizerBase, prompt: Any) -> str:
    """The text a policy continues: the chat template with a generation prompt when the tokenizer has one
    (a `Human:/Assistant:` dialogue becomes its turns, other text one user message)."""
    if getattr(tokenizer, "chat_template", None):
        messages = prompt if is_chat(prompt) else dialogue_messages(prompt) or [{"role": "user", "content": prompt}]
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    if is_chat(prompt):
        raise ValueError("a chat prompt needs a policy tokenizer with a chat template.")
    return prompt


@dataclass
class GenerationSettings:
    """Sampling settings of `generate_candidates`."""

    max_new_tokens: int = 64
    temperature: float = 0.8
    top_p: float = 0.95
    batch_size: int = 8
    seed: int | None = 0


@torch.no_grad()
def generate_candidates(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[Any],
    n: int,
    settings: GenerationSettings | None = None,
    latents: torch.Tensor | None = None,
    progress: str | None = None,
) -> list[list[str]]:
    """`n` sampled completions for each prompt, generated `settings.batch_size` sequences at a time. A policy
    conditioned on users' latents gets `latents`: one row per prompt, or one row for all. `progress`: the
    description of a progress bar (none by default)."""
    from .policy.latent_prompt import conditioned_on  # here: vpl_trl.policy imports this module

    settings = settings or GenerationSettings()
    if latents is not None and latents.size(0) not in (1, len(prompts)):
        raise ValueError(f"{latents.size(0)} latents for {len(prompts)} prompts.")
    row_latents = latents if latents is None or latents.size(0) == 1 else latents.repeat_interleave(n, dim=0)
    if settings.seed is not None:
        torch.manual_seed(settings.seed)
    templated = bool(getattr(tokenizer, "chat_template", None))
    inputs = [policy_input_text(tokenizer, p) for p in prompts for _ in range(n)]
    outputs: list[str] = []
    device = next(model.parameters()).device
    padding_side, tokenizer.padding_side = tokenizer.padding_side, "left"
    was_training = model.training
    model.eval()  # no dropout while sampling; a model in training is put back in training mode after
    bar = tqdm(total=len(inputs), desc=progress, unit="seq", disable=progress is None or not is_main_process())
    try:
        for begin in range(0, len(inputs), settings.batch_size):
            batch = tokenizer(
                inputs[begin : begin + settings.batch_size], return_tensors="pt", padding=True,
                add_special_tokens=not templated,
            ).to(device)
            batch_latents = row_latents
            if row_latents is not None and row_latents.size(0) > 1:
                batch_latents = row_latents[begin : begin + settings.batch_size]
            with conditioned_on(model, batch_latents), inference_autocast(device):
                generated = model.generate(
                    **batch,
                    max_new_tokens=settings.max_new_tokens,
                    do_sample=settings.temperature > 0,
                    temperature=settings.temperature if settings.temperature > 0 else None,
                    top_p=settings.top_p if settings.temperature > 0 else None,
                    pad_token_id=tokenizer.pad_token_id,
                    # callers hold the full weights (ZeRO-3 ones gathered): no process waits for the others, which
                    # may generate for other prompts, or none
                    synced_gpus=False,
                )
            texts = tokenizer.batch_decode(generated[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
            outputs += [t.strip() if templated else t for t in texts]
            bar.update(len(texts))
    finally:
        tokenizer.padding_side = padding_side
        model.train(was_training)
        bar.close()
    return [outputs[i * n : (i + 1) * n] for i in range(len(prompts))]


# ----- best-of-n --------------------------------------------------------------------------------------------


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

    def rank(self, prompt: Any, context: Sequence[Pair] | None = None, user_id: str | None = None, n: int = 8) -> Ranking:
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
