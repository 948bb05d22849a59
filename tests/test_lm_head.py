"""The logits-based LM head that DPO uses on a CPU gives TRL's fused head's outputs and gradients."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM
from trl.trainer.utils import add_fused_lm_head

from vpl_trl.policy.lm_head import add_logits_lm_head

OUTPUTS = ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1")


def test_logits_head_matches_trl_fused_head():
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    trl_model = LlamaForCausalLM(config)
    ours = copy.deepcopy(trl_model)
    add_fused_lm_head(trl_model, outputs=OUTPUTS)
    add_fused_lm_head(ours, outputs=OUTPUTS)
    assert add_logits_lm_head(ours) and not add_logits_lm_head(ours)  # replaced once
    ids = torch.randint(300, (3, 12))
    labels = ids.clone()
    labels[:, :4] = -100  # the prompt
    labels[2, 9:] = -100  # padding
    expected = trl_model(input_ids=ids, labels=labels, fused_lm_head=True)
    found = ours(input_ids=ids, labels=labels, fused_lm_head=True)
    for name in ("loss", *OUTPUTS, "label_mask"):
        assert torch.allclose(getattr(found, name).float(), getattr(expected, name).float(), atol=1e-5), name
    expected.loss.backward()
    found.loss.backward()
    for theirs, mine in zip(trl_model.parameters(), ours.parameters()):
        assert torch.allclose(mine.grad, theirs.grad, atol=1e-6)
    # without `fused_lm_head` the model is the model: logits, as generation needs
    assert torch.equal(ours(input_ids=ids).logits, trl_model(input_ids=ids).logits)


@pytest.mark.parametrize("name", ["final_logit_softcapping", "logit_scale"])
def test_logits_head_leaves_scaled_heads_to_trl(name):
    config = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, **{name: 30.0})
    model = LlamaForCausalLM(config)
    add_fused_lm_head(model)
    assert not add_logits_lm_head(model)
