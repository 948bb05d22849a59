"""A policy conditioned on users: built for training (LoRA, and the soft-prompt module for latent conditioning),
described by `vpl_policy.json` beside its adapter, and loaded back to serve any user from their pairs.

`vpl_policy.json` holds the conditioning (`text`, `latent` or `none`), the latent size of the reward model whose
encoder gives `z`, that reward model, and the base model. The folder travels: the base model is recorded as given
(a hub id such as the embedded default's, which each machine resolves to its own local copy, not that copy's path),
and a local reward model is saved beside the adapter (`reward_model/`) and recorded relative to the folder. Folders
saved before, with absolute paths, still load where those paths exist.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from peft import PeftConfig, PeftModel, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from peft.utils import load_peft_weights
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from ..embedded_model import resolve_model_name_or_path
from ..models.latent_prompt import add_latent_prompt, latent_prompt_trainable, load_latent_prompt
from .conditioning import PolicyConditioning

POLICY_CONFIG = "vpl_policy.json"
REWARD_FOLDER = "reward_model"  # a policy's copy of its reward model, beside the adapter


class PolicyError(ValueError):
    """Raised when a conditioned policy cannot be built or loaded, or does not fit its reward model."""


def build_policy(
    base_model: str, tokenizer: PreTrainedTokenizerBase, conditioning: PolicyConditioning, latent_dim: int, lora_config,
    init_adapter: str | os.PathLike | None = None,
) -> PeftModel:
    """The base causal LM with a LoRA adapter (fresh, or with the weights of the saved adapter `init_adapter`, e.g.
    a user-blind policy trained for a few rounds) and, for latent conditioning, a fresh soft-prompt module
    (trainable) reading `latent_dim`-sized latents; `tokenizer` gets the placeholder token."""
    model = AutoModelForCausalLM.from_pretrained(resolve_model_name_or_path(base_model))
    if conditioning.uses_latent:
        if latent_dim <= 0:
            raise PolicyError("latent conditioning needs a reward model with a user latent (`vae`).")
        add_latent_prompt(model, tokenizer, latent_dim, conditioning.latent_tokens)
    model = get_peft_model(model, lora_config)
    if init_adapter is not None:
        load_adapter_weights(model, init_adapter)
    latent_prompt_trainable(model)
    return model


def load_adapter_weights(model: PeftModel, folder: str | os.PathLike) -> None:
    """Set `model`'s LoRA weights to those of the adapter saved in `folder`, which must have the same LoRA settings
    (rank, target modules)."""
    if any(hasattr(param, "ds_id") for param in model.parameters()):
        raise PolicyError(f"{folder}: starting from a saved adapter is not supported under ZeRO-3 (its weights are "
                          "partitioned as the model loads); use ZeRO-2 or one process.")
    try:
        weights = load_peft_weights(str(folder), device="cpu")
    except (OSError, ValueError) as error:
        raise PolicyError(f"{folder}: no LoRA adapter to start from ({error}).") from None
    current = get_peft_model_state_dict(model)
    expected = {key for key in current if "lora_" in key}
    given = set(weights)
    if given != expected:
        raise PolicyError(
            f"{folder}: its adapter does not fit the policy's LoRA settings ({len(given - expected)} weights the "
            f"policy lacks, e.g. {sorted(given - expected)[:1]}; {len(expected - given)} missing, e.g. "
            f"{sorted(expected - given)[:1]}); use the same --lora_r, --lora_target_modules and base model."
        )
    mismatched = [key for key, value in current.items() if key in weights and weights[key].shape != value.shape]
    if mismatched:
        raise PolicyError(f"{folder}: adapter weights of another shape ({mismatched[0]}); use the same --lora_r and "
                          "base model.")
    set_peft_model_state_dict(model, weights)


def write_policy_config(
    folder: str | os.PathLike, conditioning: PolicyConditioning, latent_dim: int, reward_model: str, base_model: str,
    **extra: Any,
) -> Path:
    """Write `folder/vpl_policy.json`. A local `reward_model` folder outside `folder` is copied into
    `folder/reward_model` (its files, not its checkpoints) and recorded relative to `folder`, as one inside it is;
    a hub id is recorded as it is. `base_model` is recorded as given (a hub id, or a folder), here and in the
    adapter's `adapter_config.json` when that names the local copy the hub id resolves to."""
    folder = Path(folder)
    path = folder / POLICY_CONFIG
    path.parent.mkdir(parents=True, exist_ok=True)
    config = {"conditioning": conditioning.to_dict(), "latent_dim": latent_dim,
              "reward_model": _reward_beside(folder, reward_model), "base_model": str(base_model), **extra}
    path.write_text(json.dumps(config, indent=2))
    _name_base_model(folder, str(base_model))
    return path


def _name_base_model(folder: Path, base_model: str) -> None:
    """Name the hub id in the adapter's config where PEFT recorded the local copy it resolves to (the embedded
    default's converted folder in this machine's cache). Training keeps the local path, so that PEFT's saves do
    not look the id up on the hub."""
    adapter_config = folder / "adapter_config.json"
    if not adapter_config.is_file():
        return
    config = json.loads(adapter_config.read_text())
    recorded = config.get("base_model_name_or_path")
    local = resolve_model_name_or_path(base_model)
    if recorded and recorded != base_model and Path(local).exists() and Path(recorded) == Path(local):
        config["base_model_name_or_path"] = base_model
        adapter_config.write_text(json.dumps(config, indent=2, sort_keys=True))


def _reward_beside(folder: Path, reward_model: str | os.PathLike) -> str:
    """The reward model as `vpl_policy.json` records it: relative to `folder` (copied there first when it is a
    local folder elsewhere), or a hub id as it is."""
    source = Path(reward_model)
    if not source.is_dir():
        return str(reward_model)
    if source.resolve().is_relative_to(folder.resolve()):
        return source.resolve().relative_to(folder.resolve()).as_posix()
    target = folder / REWARD_FOLDER
    if target.exists():
        shutil.rmtree(target)
    target.mkdir(parents=True)
    for item in source.iterdir():  # the model's files: config, weights, tokenizer (not checkpoint-* folders)
        if item.is_file():
            shutil.copy2(item, target / item.name)
    return REWARD_FOLDER


def policy_reward_model(folder: str | os.PathLike, config: dict[str, Any]) -> str | None:
    """The reward model a saved policy was trained with: its recorded path resolved against the policy's folder
    (where it was copied), else as recorded (a hub id, or the absolute path an older folder holds)."""
    recorded = config.get("reward_model")
    if not recorded:
        return None
    beside = Path(folder) / recorded
    return str(beside) if beside.exists() else str(recorded)


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
