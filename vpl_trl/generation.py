"""Sampling from a policy LLM: its input text (chat template for chat models) and `n` candidates per prompt.

- `load_policy` loads a causal LM and its tokenizer (default: the embedded SmolLM2 instruct model).
- `generate_candidates` samples n completions per prompt in batches, optionally conditioned on users' latents.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from accelerate import PartialState
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from .embedded_model import DEFAULT_MODEL, resolve_model_name_or_path
from .embeddings import is_chat
from .precision import inference_autocast
from .scoring import Device, default_device


def load_policy(
    name_or_path: str = DEFAULT_MODEL, device: Device = None
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
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
    # each prompt n times, batched by sequences (a batch may hold part of a prompt's n): not `num_return_sequences`,
    # which would batch whole prompts and so draw other samples for the same seed
    inputs = [policy_input_text(tokenizer, p) for p in prompts for _ in range(n)]
    outputs: list[str] = []
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()  # no dropout while sampling; a model in training is put back in training mode after
    show_progress = progress is not None and PartialState().is_main_process
    bar = tqdm(total=len(inputs), desc=progress, unit="seq", disable=not show_progress)
    try:
        for begin in range(0, len(inputs), settings.batch_size):
            batch = tokenizer(
                inputs[begin : begin + settings.batch_size], return_tensors="pt", padding=True, padding_side="left",
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
        model.train(was_training)
        bar.close()
    return [outputs[i * n : (i + 1) * n] for i in range(len(prompts))]
