"""The per-token log-probabilities of TRL's fused LM head, from the logits: for CPUs.

TRL's trainers (`DPOTrainer`) patch the policy with `trl.trainer.utils.add_fused_lm_head`, which scores the labels
through the LM head in vocabulary tiles so as never to hold the `(batch, length, vocab)` logits. Without Triton (a
CPU) the tiles are folded in eager torch, and every position goes through the head. `add_logits_lm_head` keeps
TRL's contract (`model(..., labels=..., fused_lm_head=True)` returns a `FusedCausalLMOutput`) and computes it from
the logits at the labelled positions only (the completions: DPO scores no prompt or padding token), which a CPU's
memory holds easily: on SmolLM2 a DPO step 23% faster than TRL's head, a reference pass 11%
(`benchmarks/results/dpo_head.md`).
"""

from __future__ import annotations

import functools
import types

import torch
from transformers import PreTrainedModel
from trl.trainer.utils import FusedCausalLMOutput

_PATCHED = "_vpl_logits_lm_head"


def plain_head_applies(model: PreTrainedModel) -> bool:
    """Whether `model`'s head can be replaced: on a CPU, and with plain logits (no softcapping or scaling, which
    TRL's head handles)."""
    config = model.config.get_text_config()
    scaled = any(getattr(config, name, None) not in (None, 1.0) for name in
                 ("final_logit_softcapping", "logit_scale", "output_multiplier", "lm_head_multiplier",
                  "logits_scaling"))
    return next(model.parameters()).device.type == "cpu" and not scaled


def add_logits_lm_head(model: PreTrainedModel, temperature: float = 1.0) -> bool:
    """Make `model(..., labels=..., fused_lm_head=True)` (TRL's fused head, already added) compute its outputs from
    the full logits. Returns whether the head was replaced now (not when it already was, or does not apply)."""
    if getattr(model, _PATCHED, False) or not plain_head_applies(model):
        return False
    fused_forward = model.forward

    @functools.wraps(type(model).forward)
    def forward(self, *args, fused_lm_head=False, labels=None, shift_labels=None, num_items_in_batch=None, **kwargs):
        if not fused_lm_head:
            return fused_forward(*args, labels=labels, shift_labels=shift_labels,
                                 num_items_in_batch=num_items_in_batch, **kwargs)
        kwargs["use_cache"] = False
        hidden = self.base_model(*args, **kwargs).last_hidden_state
        if shift_labels is None:
            hidden, labels = hidden[:, :-1], labels[:, 1:]
        else:
            labels = shift_labels
        mask = labels != -100
        # the head only where a label is scored (the completions): a prompt's and padding's logits are not needed
        logits = self.get_output_embeddings()(hidden[mask]).float() / temperature
        log_norm = logits.logsumexp(dim=-1)
        target = logits.gather(-1, labels[mask].unsqueeze(-1)).squeeze(-1)

        def per_token(values: torch.Tensor) -> torch.Tensor:  # (labelled tokens,) -> (batch, length), 0 elsewhere
            return values.new_zeros(mask.shape).masked_scatter(mask, values)

        log_probs = per_token(target - log_norm)
        with torch.no_grad():  # TRL's metrics (DPO's entropy and logits means, the labels' top-1 rate)
            probs = torch.softmax(logits, dim=-1)
            entropy = per_token(log_norm - (probs * logits).sum(dim=-1))
            log_sum_sq_probs = per_token(probs.square().sum(dim=-1).log())
            mean_logits = per_token(logits.mean(dim=-1))
            is_top1 = per_token(target >= logits.max(dim=-1).values)
        loss = -log_probs.sum() / (mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch)
        return FusedCausalLMOutput(loss=loss, log_probs=log_probs, entropy=entropy, log_sum_sq_probs=log_sum_sq_probs,
                                   mean_logits=mean_logits, is_top1=is_top1, label_mask=mask)

    model.forward = types.MethodType(forward, model)
    setattr(model, _PATCHED, True)
    return True
