"""vpl-trl: Variational Preference Learning (personalized reward models) on Hugging Face TRL.

Importing it leaves the process as it was: `sys.modules`' bitsandbytes entry, `sys.stdout` and `os.environ`.
"""

import contextlib
import importlib.util
import os
import sys

__version__ = "0.1.0"


def _import_peft_without_bitsandbytes() -> None:
    """Import peft with bitsandbytes hidden from it.

    peft imports bitsandbytes eagerly (peft.helpers), and transformers imports peft with TrainingArguments: every
    command would pay bitsandbytes' import (2.1 s measured on a 2-core CPU, beside 5.4 s for all of vpl_trl) and,
    on CPUs with AVX512-BF16, its warning about the `kernels` package. transformers imports bitsandbytes itself when
    a quantized backbone is asked for (--load_in_4bit/--load_in_8bit); only peft.helpers' SVD helper for quantized
    layers (unused here) goes without it. An entry the caller already has is left alone.
    """
    if "peft" in sys.modules or "bitsandbytes" in sys.modules or importlib.util.find_spec("peft") is None:
        return
    sys.modules["bitsandbytes"] = None  # `import bitsandbytes` raises ImportError, which peft.helpers tolerates
    try:
        import peft  # noqa: F401
    finally:
        del sys.modules["bitsandbytes"]


@contextlib.contextmanager
def _without_side_effects():
    """Send import-time chatter to stderr (transformers prints "[INFO] Running in WANDB offline mode" to stdout when
    WANDB_MODE=offline; stdout is for results, as `python -m vpl_trl.sample --json` writes them) and undo what the
    imports write to the environment (torch records its compile cache folder there as transformers imports its
    generation code; torch sets it again when it compiles)."""
    environment = dict(os.environ)
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        for name in set(os.environ) - set(environment):
            del os.environ[name]
        os.environ.update({k: v for k, v in environment.items() if os.environ.get(k) != v})


with _without_side_effects():
    _import_peft_without_bitsandbytes()
    from .models import VPLConfig, VPLRewardModel
    from .trainer import VPLRewardConfig, VPLRewardTrainer

__all__ = ["VPLConfig", "VPLRewardConfig", "VPLRewardModel", "VPLRewardTrainer", "__version__"]
