"""Reward models on frozen embeddings that the population benchmark sets beside VPL: a LoRe-style low-rank
personalized reward (`lore`) and the ground-truth oracle, VPL's decoder given the users' true weights (`oracle`)."""

from .lore import LowRankReward, fit_low_rank_reward
from .oracle import OracleReward, fit_oracle_reward
from .pairs import PreferencePairs

__all__ = ["LowRankReward", "OracleReward", "PreferencePairs", "fit_low_rank_reward", "fit_oracle_reward"]
