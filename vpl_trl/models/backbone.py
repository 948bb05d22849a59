"""The VPL model's backbone LLM: loading or building it, its LoRA adapter and PEFT wrapping, quantization and
checkpointing plumbing."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn as nn
from transformers import AutoConfig, AutoModel, PretrainedConfig, PreTrainedModel
from transformers.utils import logging as transformers_logging

from ..embedded_model import resolve_model_name_or_path

if TYPE_CHECKING:
    from .modeling_vpl import VPLRewardModel


def load_backbone(name_or_path: str, dtype: torch.dtype | str | None = torch.float32, **kwargs) -> PreTrainedModel:
    """The backbone LLM without its LM head (`AutoModel`), from a hub id or a folder, loaded as TRL loads models
    (`kwargs` are `from_pretrained`'s: `trust_remote_code`, `quantization_config`, ...); on the CPU unless a
    `device_map` is given."""
    from trl.trainer.utils import create_model_from_path

    kwargs.setdefault("device_map", None)
    # Loading a causal LM's checkpoint into its base model leaves the LM head out, as intended: don't report it.
    verbosity = transformers_logging.get_verbosity()
    transformers_logging.set_verbosity_error()
    try:
        return create_model_from_path(resolve_model_name_or_path(name_or_path), AutoModel, dtype=dtype, **kwargs)
    finally:
        transformers_logging.set_verbosity(verbosity)


def build_backbone(backbone_config: dict | None, name_or_path: str | None) -> PreTrainedModel:
    """A backbone with freshly initialized weights, from its configuration (a `to_dict()`), or for configurations
    saved without one, from the configuration file of `name_or_path` (no weights are read)."""
    if backbone_config:
        settings = dict(backbone_config)
        config = AutoConfig.for_model(settings.pop("model_type"), **settings)
    elif name_or_path:
        config = AutoConfig.from_pretrained(resolve_model_name_or_path(name_or_path))
    else:
        raise ValueError("the VPL configuration names no backbone (`backbone_config` or `backbone_name_or_path`).")
    return AutoModel.from_config(config)


def backbone_config_dict(config: PretrainedConfig) -> dict:
    """The backbone's configuration as saved in the VPL configuration (its architecture; a quantization applies to
    loaded weights only)."""
    settings = config.to_dict()
    settings.pop("quantization_config", None)
    return settings


def backbone_signature(backbone_config: PretrainedConfig) -> dict:
    """Architecture facts that a checkpoint's heads depend on."""
    return {
        "model_type": backbone_config.model_type,
        "hidden_size": backbone_config.hidden_size,
        "num_hidden_layers": getattr(backbone_config, "num_hidden_layers", None),
        "vocab_size": getattr(backbone_config, "vocab_size", None),
    }


def local_model_folder(name_or_path: str | os.PathLike) -> Path:
    """A saved model's folder: the path itself, or the downloaded (and cached) snapshot of a Hub repo id."""
    folder = Path(name_or_path)
    if folder.exists():
        return folder
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(str(name_or_path)))


# ----- LoRA adapter --------------------------------------------------------------------------------------------


DEFAULT_LORA = {"peft_type": "LORA", "r": 16, "lora_alpha": 32, "lora_dropout": 0.05, "target_modules": "all-linear"}


def lora_config(config):
    """The backbone's adapter of a VPL configuration: `config.peft_config` (the trainer's `peft_config`), else
    `DEFAULT_LORA`."""
    from peft.mapping import get_peft_config

    return get_peft_config(dict(config.peft_config or DEFAULT_LORA))


def inject_lora_adapter(backbone: PreTrainedModel, config) -> PreTrainedModel:
    """The frozen backbone with a trainable LoRA adapter injected in place (no PEFT wrapper)."""
    from peft import inject_adapter_in_model

    backbone.requires_grad_(False)
    return inject_adapter_in_model(lora_config(config), backbone)


@contextlib.contextmanager
def adapter_disabled(backbone: nn.Module):
    """The backbone as it was before training its LoRA adapter (a no-op without one)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [m for m in backbone.modules() if isinstance(m, BaseTunerLayer)]
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield
    finally:
        for layer in layers:
            layer.enable_adapters(True)


# ----- PEFT: a PEFT model given to the trainer, and PEFT wrapping the whole VPL model as TRL wraps models ------


def split_peft_model(model) -> tuple[PreTrainedModel, Any, dict[str, torch.Tensor]]:
    """A PEFT model as its base model (adapter layers removed), the adapter's configuration, and the adapter's
    weights named as in a VPL model (a classification head's are left out: VPL brings its heads)."""
    name = model.active_adapter
    weights = {k: v.detach().clone() for k, v in model.state_dict().items() if f".{name}." in k and "lora_" in k}
    config = model.peft_config[name]
    base = model.unload()
    prefix = "base_model.model." + (f"{base.base_model_prefix}." if base.base_model is not base else "")
    adapter = {"model." + k[len(prefix):].replace(f".{name}.", ".default."): v
               for k, v in weights.items() if k.startswith(prefix)}
    return base, config, adapter


def peft_config_for_whole_model(model: VPLRewardModel, peft_config):
    """`peft_config` for wrapping the whole VPL model as TRL wraps its models (so parameters are named as TRL
    names them): the modules it targets in the backbone (`all-linear`, or by default those PEFT knows for the
    backbone's architecture), never the heads."""
    from peft.tuners.tuners_utils import _maybe_include_all_linear_layers
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as DEFAULT_TARGETS

    config = dataclasses.replace(peft_config, task_type=None, modules_to_save=None)
    if config.target_modules is None:
        config.target_modules = DEFAULT_TARGETS.get(model.backbone.config.model_type)
    config = _maybe_include_all_linear_layers(config, model.backbone)
    _convert_for_transformers_v5(config, model.backbone)
    targets = config.target_modules
    if not targets:
        return config
    if isinstance(targets, str):
        return dataclasses.replace(config, target_modules=rf"model\.(?:{targets})")
    names = "|".join(re.escape(name) for name in sorted(targets))
    return dataclasses.replace(config, target_modules=rf"model\.(?:.*\.)?(?:{names})")


def _convert_for_transformers_v5(config, backbone: PreTrainedModel) -> None:
    """PEFT's own update of a configuration to the backbone's transformers 5 layout (e.g. fused MoE experts, then
    targeted as parameters), which it applies to transformers models only."""
    try:
        from peft.utils.transformers_weight_conversion import (
            convert_peft_config_for_transformers,
            get_model_conversion_mapping,
        )
    except ImportError:  # transformers < 5
        return
    convert_peft_config_for_transformers(config, model=backbone, conversions=get_model_conversion_mapping(backbone))


def train_heads_under_peft(model: VPLRewardModel, adapter: dict[str, torch.Tensor] | None) -> None:
    """PEFT freezes what it does not adapt: the heads train all the same; a PEFT model's adapter is loaded."""
    for module in (getattr(model, "encoder", None), model.decoder):
        if module is not None:
            module.requires_grad_(True)
    if adapter:
        unexpected = model.load_state_dict(adapter, strict=False).unexpected_keys
        if unexpected:
            raise ValueError(f"the PEFT model's adapter does not fit its backbone: {unexpected[:5]}")


# ----- precision, quantization, gradient checkpointing ---------------------------------------------------------


def keep_4bit_layers_differentiable(backbone: nn.Module) -> None:
    """Keep bitsandbytes' 4-bit layers in their trainable layout on every CPU.

    On CPUs with AVX512-BF16, bitsandbytes 0.50 repacks a 4-bit layer's weight for its fused inference kernel the
    first time the layer runs in eval mode without gradients (as context embedding and evaluation do), and keeps it
    repacked: from then on the layer passes no gradient back to the LoRA adapters below it, and a layer whose input
    width is not a multiple of the 64-value quantization block fails to repack (`shape '[N, 0]' is invalid`).
    Turning that path off costs inference speed on such CPUs only; CPUs without AVX512-BF16 never take it.
    """
    for module in backbone.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def match_backbone_dtype(model: PreTrainedModel, backbone: PreTrainedModel, quantized: bool) -> PreTrainedModel:
    """Put the heads (and adapter) in the backbone's dtype. Under DeepSpeed ZeRO-3 a bf16 run partitions the
    backbone in bf16 as it loads; heads left in fp32 would make a mixed-dtype partition, which DeepSpeed's
    coalesced all-gather has failed on (deepspeed#8072). On a bitsandbytes-quantized backbone the trainable
    parameters go to bf16, as TRL trains those of quantized models (QLoRA); quantized weights and norms stay."""
    if quantized:
        for param in model.parameters():
            if param.requires_grad and param.dtype.is_floating_point:
                param.data = param.data.to(torch.bfloat16)
        return model
    dtype = backbone.dtype
    return model.to(dtype) if dtype.is_floating_point else model


def enable_checkpointing(backbone: PreTrainedModel, checkpointing_kwargs: dict | None, **kwargs) -> None:
    """Checkpoint the backbone's activations; `kwargs` are what the installed transformers passes along."""
    # transformers >= 5.x names it activation checkpointing; the old name is a deprecated alias there.
    if hasattr(backbone, "activation_checkpointing_enable"):
        backbone.activation_checkpointing_enable(activation_checkpointing_kwargs=checkpointing_kwargs, **kwargs)
    else:
        backbone.gradient_checkpointing_enable(gradient_checkpointing_kwargs=checkpointing_kwargs, **kwargs)
    backbone.enable_input_require_grads()


def disable_checkpointing(backbone: PreTrainedModel) -> None:
    if hasattr(backbone, "activation_checkpointing_disable"):
        backbone.activation_checkpointing_disable()
    else:
        backbone.gradient_checkpointing_disable()
