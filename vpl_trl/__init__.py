"""vpl-trl: Variational Preference Learning (personalized reward models) on Hugging Face TRL."""

import contextlib
import importlib.util
import sys

__version__ = "0.1.0"


def _import_peft_without_bitsandbytes() -> None:
    """Import peft with bitsandbytes hidden from it.

    peft imports bitsandbytes eagerly (peft.helpers), and transformers imports peft with TrainingArguments: every
    command would pay bitsandbytes' slow import and its warnings (about `kernels`, on CPUs with AVX512-BF16).
    transformers imports bitsandbytes itself when a quantized backbone is asked for (--load_in_4bit/--load_in_8bit);
    only peft.helpers' SVD helper for quantized layers (unused here) goes without it.
    """
    if "peft" in sys.modules or "bitsandbytes" in sys.modules or importlib.util.find_spec("peft") is None:
        return
    sys.modules["bitsandbytes"] = None  # `import bitsandbytes` raises ImportError, which peft.helpers tolerates
    try:
        import peft  # noqa: F401
    finally:
        del sys.modules["bitsandbytes"]


# transformers prints "[INFO] Running in WANDB offline mode" to stdout on import when WANDB_MODE=offline;
# stdout is for results (`python -m vpl_trl.sample --json`), so import-time chatter goes to stderr.
with contextlib.redirect_stdout(sys.stderr):
    _import_peft_without_bitsandbytes()
    from .models import VPLConfig, VPLRewardModel
    from .trainer import VPLRewardConfig, VPLRewardTrainer

__all__ = ["VPLConfig", "VPLRewardConfig", "VPLRewardModel", "VPLRewardTrainer", "__version__"]
