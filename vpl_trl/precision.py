"""bf16 for inference where the hardware computes it natively: frozen embeddings, reward scoring, generation.

A CPU with AVX512-BF16 or AMX runs a SmolLM2 forward about twice as fast in bf16 as in fp32; one without them
emulates bf16 and runs it several times slower, so it keeps fp32. `VPL_TRL_BF16=1` or `0` forces the choice
(to compare accuracy, say); the default follows the hardware.
"""

from __future__ import annotations

import contextlib
import os

import torch


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 matrix products natively (AVX512-BF16 or AMX)."""
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)


def inference_bf16(device: torch.device | str) -> bool:
    """Whether inference on `device` runs in bf16: `VPL_TRL_BF16` when set, else the hardware's native support."""
    forced = os.environ.get("VPL_TRL_BF16", "").strip().lower()
    if forced in ("1", "true", "yes"):
        return True
    if forced in ("0", "false", "no"):
        return False
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return device.type == "cpu" and cpu_has_native_bf16()


def inference_autocast(device: torch.device | str):
    """A bf16 autocast context for inference on `device` when `inference_bf16(device)`, else a no-op."""
    device = torch.device(device)
    if not inference_bf16(device):
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
