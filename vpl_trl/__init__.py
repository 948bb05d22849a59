"""vpl-trl: Variational Preference Learning (personalized reward models) on Hugging Face TRL."""

import contextlib
import sys

__version__ = "0.1.0"

# transformers prints "[INFO] Running in WANDB offline mode" to stdout on import when WANDB_MODE=offline;
# stdout is for results (`python -m vpl_trl.sample --json`), so import-time chatter goes to stderr.
with contextlib.redirect_stdout(sys.stderr):
    from .models import VPLConfig, VPLRewardModel
    from .trainer import VPLRewardConfig, VPLRewardTrainer

__all__ = ["VPLConfig", "VPLRewardConfig", "VPLRewardModel", "VPLRewardTrainer", "__version__"]
