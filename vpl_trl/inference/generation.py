"""Sampling from a policy LLM: its input text (chat template for chat models) and `n` candidates per prompt.

- `generate_candidates` samples n completions per prompt in batches, optionally conditioned on users' latents
  (and guided by them: `vpl_trl.inference.latent_guidance`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from accelerate import PartialState
from tqdm.auto import tqdm
from transformers import LogitsProcessorList, PreTrainedModel, PreTrainedTokenizerBase

from ..models.latent_prompt import conditioned_on, find_latent_embedding
from ..precision import inference_autocast
from ..text import policy_input_text
from .latent_guidance import LatentGuidanceLogitsProcessor


@dataclass
class GenerationSettings:
    """Sampling settings of `generate_candidates`. `latent_guidance_scale`: for a latent-conditioned policy, how far
    each token is pushed from what the policy writes for the null latent `z = 0` (1: not at all; about twice the
    generation's cost otherwise; `vpl_trl.inference.latent_guidance`)."""

    max_new_tokens: int = 64
    temperature: float = 0.8
    top_p: float = 0.95
    batch_size: int = 8
    seed: int | None = 0
    latent_guidance_scale: float = 1.0


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

    settings = settings or GenerationSettings()
    if latents is not None and latents.size(0) not in (1, len(prompts)):
        raise ValueError(f"{latents.size(0)} latents for {len(prompts)} prompts.")
    row_latents = latents if latents is None or latents.size(0) == 1 else latents.repeat_interleave(n, dim=0)
    guided = latents is not None and settings.latent_guidance_scale != 1 and find_latent_embedding(model) is not None
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
            processors = LogitsProcessorList()
            if guided:
                processors.append(LatentGuidanceLogitsProcessor(
                    model, settings.latent_guidance_scale, batch["attention_mask"],
                    torch.zeros_like(batch_latents[:1]),
                ))
            with conditioned_on(model, batch_latents), inference_autocast(device):
                generated = model.generate(
                    **batch,
                    logits_processor=processors,
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
