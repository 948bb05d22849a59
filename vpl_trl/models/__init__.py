"""The VPL reward model and its configuration."""

from transformers import AutoConfig, AutoModel

from .backbone import load_backbone, local_model_folder
from .configuration_vpl import REWARD_TYPES, VPLConfig
from .modeling_vpl import UserContextEncoder, VPLRewardModel, VPLRewardOutput

# saved folders load with the Auto classes too (AutoTokenizer reads config.json to find the model type)
AutoConfig.register(VPLConfig.model_type, VPLConfig)
AutoModel.register(VPLConfig, VPLRewardModel)

__all__ = [
    "REWARD_TYPES",
    "UserContextEncoder",
    "VPLConfig",
    "VPLRewardModel",
    "VPLRewardOutput",
    "load_backbone",
    "local_model_folder",
]
