"""vpl-trl: Variational Preference Learning (personalized reward models) on Hugging Face TRL."""

__version__ = "0.1.0"

from .models import VPLConfig, VPLRewardModel  # noqa: E402
from .trainer import VPLRewardConfig, VPLRewardTrainer  # noqa: E402

__all__ = ["VPLConfig", "VPLRewardConfig", "VPLRewardModel", "VPLRewardTrainer", "__version__"]
