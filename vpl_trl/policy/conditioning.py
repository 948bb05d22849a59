"""Conditioning a policy on a user: their context pairs rendered into the prompt, or their latent `z` as a soft
prompt; and the dataset of policy prompts.

One conditioned policy serves any user, a new one included, given only their labelled pairs; per-user policies
(one adapter each) see the bare prompt.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from datasets import Dataset

from ..data.format import PreferenceDataError
from ..data.user_files import draw_context
from ..models.latent_prompt import LATENT_TOKEN
from ..text import completion_text, dialogue_messages, is_chat

PREAMBLE_HEADER = "Here are answers this user preferred, each over another answer:"
PREAMBLE_FOOTER = "Answer the next request the way this user would prefer."


def _clip(text: str, max_chars: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= max_chars else text[: max_chars - 3].rstrip() + "..."


def context_preamble(context: Sequence[Mapping[str, Any]], max_pairs: int = 4, max_chars: int = 160) -> str:
    """A short text listing up to `max_pairs` of the user's choices as `preferred: ... / over: ...`."""
    lines = [PREAMBLE_HEADER]
    for pair in list(context)[:max_pairs]:
        chosen, rejected = completion_text(pair["chosen"]), completion_text(pair["rejected"])
        lines.append(f"- preferred: {_clip(chosen, max_chars)} / over: {_clip(rejected, max_chars)}")
    lines.append(PREAMBLE_FOOTER)
    return "\n".join(lines)


def policy_prompt(prompt: Any, context: Sequence[Mapping[str, Any]] | None, chat: bool, max_pairs: int = 4) -> Any:
    """The prompt the policy sees. For chat policies: chat messages (a `Human:/Assistant:` dialogue becomes its
    turns) after a system message holding the user's preamble when `context` is given. For plain policies: the
    preamble, a blank line, and the prompt text."""
    preamble = context_preamble(context, max_pairs) if context else None
    if not chat and not is_chat(prompt):
        return f"{preamble}\n\n{prompt}" if preamble else prompt
    if is_chat(prompt):
        messages = list(prompt)
    else:
        messages = dialogue_messages(prompt) or [{"role": "user", "content": prompt}]
    return ([{"role": "system", "content": preamble}] if preamble else []) + messages


@dataclass
class PolicyConditioning:
    """How one policy is told which user it serves.

    - `text`: the user's pairs rendered into the prompt (a system message for chat policies); runs on any
      serving stack.
    - `latent`: `num_tokens` placeholder tokens that the policy's input embedding replaces with a soft prompt
      computed from the user's latent `z` (`vpl_trl.models.latent_prompt`); compact and exact.
    - `none`: the bare prompt (per-user policies, one adapter each).
    """

    kind: str = "latent"
    preamble_pairs: int = 2
    latent_tokens: int = 4

    def __post_init__(self):
        if self.kind not in CONDITIONING_KINDS:
            raise ValueError(f"conditioning must be one of {CONDITIONING_KINDS}, got {self.kind!r}.")

    @property
    def uses_latent(self) -> bool:
        return self.kind == "latent"

    def prompt(self, raw_prompt: Any, context: Sequence[Mapping[str, Any]] | None, chat: bool) -> Any:
        """The prompt the policy sees for a user with these context pairs."""
        if self.kind == "text":
            return policy_prompt(raw_prompt, context, chat, self.preamble_pairs)
        if self.kind == "none":
            return policy_prompt(raw_prompt, None, chat)
        placeholders = LATENT_TOKEN * self.latent_tokens
        if not chat and not is_chat(raw_prompt):
            return f"{placeholders}\n\n{raw_prompt}"
        return [{"role": "system", "content": placeholders}] + policy_prompt(raw_prompt, None, True)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "preamble_pairs": self.preamble_pairs, "latent_tokens": self.latent_tokens}


CONDITIONING_KINDS = ("latent", "text", "none")
LatentFn = Callable[[Sequence[Mapping[str, Any]]], torch.Tensor]


def build_policy_dataset(
    prompts: Sequence[Any],
    user_pairs: Mapping[str, Sequence[Mapping[str, Any]]],
    conditioning: PolicyConditioning,
    chat: bool,
    rows_per_user: int,
    num_context: int = 8,
    seed: int = 0,
    user_latent: LatentFn | None = None,
) -> Dataset:
    """Policy prompts: `rows_per_user` rows per user cycling through `prompts` (each user starting where the
    previous one stopped, so that users with fewer rows than prompts still cover them all together), with `prompt`
    (what the policy sees), `raw_prompt` (what the reward scores), `bare_prompt` (the prompt without the user's
    conditioning), `user_id` and, for latent conditioning, `user_latent` (the latent of the row's context, from
    `user_latent(pairs)`). Each conditioned row shows a fresh draw of the user's pairs (`preamble_pairs` in a
    preamble, `num_context` encoded into `z`), so the policy learns to read a user's pairs rather than memorize one
    draw."""
    if not prompts:
        raise ValueError("no prompts to optimize the policy on.")
    if conditioning.uses_latent and user_latent is None:
        raise ValueError("latent conditioning needs `user_latent`, the reward model's encoder of a user's pairs.")
    rng = random.Random(f"policy-dataset-{seed}")
    rows = []
    for number, (user, pairs) in enumerate(user_pairs.items()):
        if not pairs:
            raise PreferenceDataError(f"user {user!r}: no labelled pairs to condition the policy on.")
        for index in range(number * rows_per_user, (number + 1) * rows_per_user):
            raw = prompts[index % len(prompts)]
            size = num_context if conditioning.uses_latent else conditioning.preamble_pairs
            context = draw_context(pairs, size, rng) if conditioning.kind != "none" else None
            row = {"prompt": conditioning.prompt(raw, context, chat), "raw_prompt": raw, "user_id": user,
                   "bare_prompt": policy_prompt(raw, None, chat)}
            if conditioning.uses_latent:
                row["user_latent"] = user_latent(context).reshape(-1).float().cpu().tolist()
            rows.append(row)
    rng.shuffle(rows)
    return Dataset.from_list(rows)
