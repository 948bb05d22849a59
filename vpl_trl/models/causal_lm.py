"""Loading a policy: a causal LM and its tokenizer, on the default device."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from ..embedded_model import DEFAULT_MODEL, resolve_model_name_or_path

Device = str | torch.device | None


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_policy(
    name_or_path: str = DEFAULT_MODEL, device: Device = None
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A causal LM (eval mode) and its tokenizer; the default is the embedded SmolLM2 instruct model."""
    path = resolve_model_name_or_path(name_or_path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(path)
    return model.to(device or default_device()).eval(), tokenizer
