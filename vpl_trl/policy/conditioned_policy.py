"""A policy conditioned on users: built for training (LoRA, and the soft-prompt module for latent conditioning),
described by `vpl_policy.json` beside its adapter, and loaded back to serve any user from their pairs.

`vpl_policy.json` holds the conditioning (`text`, `latent` or `none`), the latent size of the reward model whose
encoder gives `z`, and that reward model's folder.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from peft import PeftConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from ..embedded_model import resolve_model_name_or_path
from ..models.latent_prompt import add_latent_prompt, latent_prompt_trainable, load_latent_prompt
from .conditioning import PolicyConditioning

POLICY_CONFIG = "vpl_policy.json"


class PolicyError(ValueError):
    """Raised when a conditioned policy cannot be built or loaded, or does not fit its reward model."""


def build_policy(
    base_model: str, tokenizer: PreTrainedTokenizerBase, conditioning: PolicyConditioning, latent_dim: int, lora_config
) -> PeftModel:
    """The base causal LM with a fresh LoRA adapter and, for latent conditioning, a fresh soft-prompt module
    (trainable) reading `latent_dim`-sized latents; `tokenizer` gets the placeholder token."""
    model = AutoModelForCausalLM.from_pretrained(resolve_model_name_or_path(base_model))
    if conditioning.uses_latent:
        if latent_dim <= 0:
            raise PolicyError("latent conditioning needs a reward model with a user latent (`vae`).")
        add_latent_prompt(model, tokenizer, latent_dim, conditioning.latent_tokens)
    model = get_peft_model(model, lora_config)
    latent_prompt_trainable(model)
    return model


def write_policy_config(
    folder: str | os.PathLike, conditioning: PolicyConditioning, latent_dim: int, reward_model: str, base_model: str,
    **extra: Any,
) -> Path:
    path = Path(folder) / POLICY_CONFIG
    path.parent.mkdir(parents=True, exist_ok=True)
    config = {"conditioning": conditioning.to_dict(), "latent_dim": latent_dim, "reward_model": reward_model,
              "base_model": base_model, **extra}
    path.write_text(json.dumps(config, indent=2))
    return path


def read_policy_config(folder: str | os.PathLike) -> dict[str, Any] | None:
    """The policy's `vpl_policy.json`, or None for a folder without one (a plain model or adapter)."""
    path = Path(folder) / POLICY_CONFIG
    if not path.is_file():
        return None
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
        PolicyConditioning(**config["conditioning"])
        int(config["latent_dim"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as error:
        raise PolicyError(f"{path}: not a valid conditioned-policy description ({error}).") from None
    return config


def check_reward_fits(config: dict[str, Any], reward_latent_dim: int, where: str) -> None:
    """A latent-conditioned policy reads `z` of its reward model's size: refuse a reward model of another one."""
    if config["conditioning"]["kind"] == "latent" and reward_latent_dim != config["latent_dim"]:
        raise PolicyError(
            f"{where}: the policy was trained on latents of size {config['latent_dim']} (reward model "
            f"{config.get('reward_model')}), but this reward model's latent has size {reward_latent_dim}; use the "
            "reward model the policy was trained with."
        )


def load_conditioned_policy(
    folder: str | os.PathLike, device: str | torch.device | None = None
) -> tuple[torch.nn.Module, PreTrainedTokenizerBase, PolicyConditioning, dict[str, Any]]:
    """A saved conditioned policy (eval mode): the base model, its LoRA adapter, the soft-prompt module for latent
    conditioning, the tokenizer saved with it, its conditioning and its `vpl_policy.json`."""
    config = read_policy_config(folder)
    if config is None:
        raise PolicyError(f"{folder}: no {POLICY_CONFIG}; not a conditioned policy saved by vpl-trl.")
    conditioning = PolicyConditioning(**config["conditioning"])
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    base = PeftConfig.from_pretrained(folder).base_model_name_or_path
    model = AutoModelForCausalLM.from_pretrained(resolve_model_name_or_path(base))
    if conditioning.uses_latent:
        load_latent_prompt(model, tokenizer, folder, config["latent_dim"], conditioning.latent_tokens)
    model = PeftModel.from_pretrained(model, folder)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return model.to(device).eval(), tokenizer, conditioning, config
