"""Latent guidance: classifier-free guidance between a user's latent and a null latent, for a latent-conditioned
policy at generation.

At each step the next-token log-probabilities under the user's `z` are pushed away from those under the null
latent (the prior's mean, `z = 0`: a user the policy knows nothing about):

    log p_guided = log p(. | z) + (scale - 1) * (log p(. | z) - log p(. | z_null))

`scale = 1` is the policy as trained; above 1 it amplifies what sets the user apart. As in classifier-free
guidance for language models (Sanchez et al., 2023, "Stay on topic with classifier-free guidance"), the null
branch is a second forward pass with its own KV cache. Transformers' own
`UnbatchedClassifierFreeGuidanceLogitsProcessor` takes a negative prompt of token ids, which cannot carry another
latent, and gives no position ids to left-padded rows.
"""

from __future__ import annotations

import torch
from transformers import LogitsProcessor

from ..models.latent_prompt import conditioned_on


class LatentGuidanceLogitsProcessor(LogitsProcessor):
    """Guide each row's next token away from the same prompt under `null_latents` ((1, latent_dim) or one row per
    batch row). Pass it first, before temperature and top-p (`generate_candidates` does); it returns
    log-probabilities. One instance serves one `generate` call: it keeps the null branch's cache."""

    def __init__(self, model: torch.nn.Module, guidance_scale: float, attention_mask: torch.Tensor,
                 null_latents: torch.Tensor):
        if guidance_scale < 0:
            raise ValueError(f"guidance_scale must be at least 0 (1: no guidance), got {guidance_scale}.")
        self.model, self.guidance_scale, self.null_latents = model, guidance_scale, null_latents
        self.attention_mask = attention_mask
        self.cache = None

    @torch.no_grad()
    def null_logits(self, input_ids: torch.LongTensor) -> torch.Tensor:
        """The last position's logits under the null latent, feeding only the tokens it has not seen."""
        if self.cache is None:
            tokens, mask = input_ids, self.attention_mask
            positions = (mask.cumsum(-1) - 1).clamp(min=0)
        else:
            tokens = input_ids[:, -1:]
            mask = torch.cat([self.attention_mask, self.attention_mask.new_ones(tokens.shape)], dim=1)
            positions = mask.sum(-1, keepdim=True) - 1
        with conditioned_on(self.model, self.null_latents):
            out = self.model(input_ids=tokens, attention_mask=mask, position_ids=positions, cache=self.cache,
                             use_cache=True)
        self.attention_mask, self.cache = mask, out.cache
        return out.logits[:, -1].float()

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        scores = torch.log_softmax(scores.float(), dim=-1)
        if self.guidance_scale == 1:
            return scores
        null = torch.log_softmax(self.null_logits(input_ids), dim=-1)
        guided = scores + (self.guidance_scale - 1) * (scores - null)
        # tokens an earlier processor ruled out stay out (-inf - -inf would be nan)
        return guided.masked_fill(torch.isinf(scores), float("-inf"))
