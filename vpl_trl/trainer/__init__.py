"""Trainer and configuration for VPL reward models."""

from .vpl_reward_config import VPLRewardConfig
from .vpl_reward_trainer import DataCollatorForVPL, VPLRewardTrainer, count_active_units

__all__ = ["DataCollatorForVPL", "VPLRewardConfig", "VPLRewardTrainer", "count_active_units"]
