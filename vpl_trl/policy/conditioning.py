"""Conditioning a policy on a user: their context pairs rendered into the prompt, and the GRPO prompt dataset.

One policy trained on prompts that carry each user's preamble serves any user, a new one included,
given only their labelled pairs; per-user policies (one adapter each) see the bare prompt.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from typing import Any

from datasets import Dataset

from ..embeddings import is_chat
from ..generation import completion_text, dialogue_messages
from .users import draw_context

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


def build_policy_dataset(
    prompts: Sequence[Any],
    user_pairs: Mapping[str, Sequence[Mapping[str, Any]]],
    conditioned: bool,
    chat: bool,
    rows_per_user: int,
    preamble_pairs: int = 4,
    seed: int = 0,
) -> Dataset:
    """GRPO prompts: `rows_per_user` rows per user cycling through `prompts`, with `prompt` (what the policy sees),
    `raw_prompt` (what the reward scores) and `user_id`. Conditioned rows show a fresh draw of the user's pairs
    each, so the policy learns to read a preamble rather than memorize one."""
    if not prompts:
        raise ValueError("no prompts to optimize the policy on.")
    rng = random.Random(f"policy-dataset-{seed}")
    rows = []
    for user, pairs in user_pairs.items():
        for index in range(rows_per_user):
            raw = prompts[index % len(prompts)]
            context = draw_context(pairs, preamble_pairs, rng) if conditioned else None
            rows.append({"prompt": policy_prompt(raw, context, chat, preamble_pairs), "raw_prompt": raw, "user_id": user})
    rng.shuffle(rows)
    return Dataset.from_list(rows)
