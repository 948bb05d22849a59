"""Multi-process runs (`accelerate launch` with DDP or DeepSpeed ZeRO), on GPUs and on CPU-only machines.

- `configure_torch_extensions_dir`: DeepSpeed compiles its C++ ops (its CPU communication op, `DeepSpeedCPUAdam`
  for offload) once into `$TORCH_EXTENSIONS_DIR`, defaulted here to the vpl-trl cache so later runs reuse them.
- `cpu_launch_defaults`: what `TrainingArguments` needs to run several processes on a machine without GPUs.
- ZeRO-3: a backbone loaded under DeepSpeed ZeRO-3 is partitioned across the processes as it is loaded. Every
  process must then run the same forward calls at the same time, and a forward outside the DeepSpeed engine (the
  embedding precomputation, before training starts) needs the parameters gathered: `gathered_parameters`.

Which process this is and sharing work out go through Accelerate (`PartialState`, `gather_object`).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch
from accelerate import PartialState
from accelerate.utils import gather_object

from .embedded_model import cache_dir


def configure_torch_extensions_dir() -> str:
    """Default `$TORCH_EXTENSIONS_DIR` (where DeepSpeed's one-time op builds go) to `<vpl-trl cache>/torch_extensions`
    when unset; returns the folder in use. Called as a run sets up (`VPLRewardConfig`, the policy recipe), never on
    import."""
    return os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(cache_dir() / "torch_extensions"))


def has_accelerator() -> bool:
    return torch.cuda.is_available() or (hasattr(torch, "xpu") and torch.xpu.is_available())


def cpu_launch_defaults() -> dict:
    """`TrainingArguments` defaults for a multi-process launch on a machine without GPUs (none otherwise).

    Under DeepSpeed (`accelerate launch --config_file deepspeed_configs/zero*.yaml`), Accelerate finds no backend
    on CPU and silently falls back to one process: `ddp_backend="gloo"` keeps DeepSpeed, on its CPU accelerator.
    Under DDP (`deepspeed_configs/ddp.yaml`), `use_cpu=True` selects Accelerate's multi-CPU mode (gloo).
    """
    launched_processes = int(os.environ.get("WORLD_SIZE", "1"))  # read before Accelerate's state exists: it sets it up
    if launched_processes <= 1 or has_accelerator():
        return {}
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        return {"ddp_backend": "gloo"}
    return {"use_cpu": True}


def is_zero3_partitioned(module: torch.nn.Module) -> bool:
    """Whether `module` has parameters partitioned by DeepSpeed ZeRO-3."""
    return any(hasattr(param, "ds_id") for param in module.parameters())


@contextlib.contextmanager
def gathered_parameters(module: torch.nn.Module, params: list[torch.nn.Parameter] | None = None) -> Iterator[None]:
    """Gather the ZeRO-3 partitioned `params` (default: all of `module`'s) for use outside a DeepSpeed engine,
    and partition them again on exit; a no-op when nothing is partitioned, or when an engine already manages
    `module` (its hooks gather each layer for the forward). Every process must enter it together."""
    params = list(module.parameters()) if params is None else params
    partitioned = [param for param in params if hasattr(param, "ds_id")]
    managed_by_engine = hasattr(module, "ds_id")  # set on every submodule by the ZeRO-3 engine's hooks
    if not partitioned or managed_by_engine:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(partitioned):
        yield


@contextlib.contextmanager
def full_weights_for_generation(model: torch.nn.Module, accelerator=None) -> Iterator[torch.nn.Module]:
    """The model with its full weights on every process, for generation: a model that an `accelerator` prepared
    (DDP or DeepSpeed) unwrapped by TRL's `unwrap_model_for_generation`, or a plain model with its ZeRO-3
    partitions gathered. Every process must enter it together."""
    if accelerator is not None:
        from trl.models import unwrap_model_for_generation

        with unwrap_model_for_generation(model, accelerator) as unwrapped:
            yield unwrapped
        return
    with gathered_parameters(model):
        yield model


@contextlib.contextmanager
def replicated_loading() -> Iterator[None]:
    """Load models whole on every process inside, also under ZeRO-3 (which would partition them as they load):
    for frozen models that every process runs on its own, such as a reward model scoring its own completions."""
    from transformers.integrations import deepspeed as hf_deepspeed

    config = hf_deepspeed._hf_deepspeed_config_weak_ref
    hf_deepspeed._hf_deepspeed_config_weak_ref = None
    try:
        yield
    finally:
        hf_deepspeed._hf_deepspeed_config_weak_ref = config


def union_across_processes(items: list[str]) -> list[str]:
    """The sorted union of every process's `items`: the same list on every process."""
    return sorted(set(gather_object(items)))


def barrier() -> None:
    """Wait for every process (a no-op in a single-process run): Accelerate's `wait_for_everyone`."""
    PartialState().wait_for_everyone()
