"""The VPL reward model and its configuration."""

from .configuration_vpl import REWARD_TYPES, VPLConfig
from .modeling_vpl import UserContextEncoder, VPLRewardModel, VPLRewardOutput, load_backbone

__all__ = ["REWARD_TYPES", "UserContextEncoder", "VPLConfig", "VPLRewardModel", "VPLRewardOutput", "load_backbone"]
