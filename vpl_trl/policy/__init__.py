"""Policy optimization against personalized rewards: user conditioning, the reward function, the trainers of each
signal and their runs, evaluation."""

from ..data.user_files import draw_context, held_out_contexts, load_prompt_list, load_user_pairs, resolve_data_source
from ..models.latent_prompt import (
    LATENT_TOKEN,
    LatentConditionedEmbedding,
    LatentPrompt,
    add_latent_prompt,
    conditioned_on,
)
from .best_of_n_rounds import BestOfNRoundsArguments, BestOfNRoundsConfig, candidate_pool
from .conditioned_policy import (
    POLICY_CONFIG,
    PolicyError,
    build_policy,
    check_reward_fits,
    load_conditioned_policy,
    policy_reward_model,
    read_policy_config,
    write_policy_config,
)
from .conditioning import PolicyConditioning, build_policy_dataset, context_preamble, policy_prompt
from .distillation import BestOfNDistillationConfig, BestOfNDistillationTrainer
from .evaluation import (
    PolicyEvaluation,
    format_results,
    margin_interval,
    mean_rewards,
    plot_matrices,
    score_completions,
    summarize,
    write_results,
)
from .ranked_dpo import RewardRankedDPOConfig, RewardRankedDPOTrainer
from .reward import PersonalizedRewardFunction
from .runs import SIGNALS, round_config, run_record, train_policy
from .trainers import (
    ConditionedDPOTrainer,
    ConditionedGRPOTrainer,
    ConditionedSFTTrainer,
    LatentPromptArguments,
    TimeBudgetCallback,
)

__all__ = [
    "LATENT_TOKEN",
    "POLICY_CONFIG",
    "SIGNALS",
    "BestOfNDistillationConfig",
    "BestOfNDistillationTrainer",
    "BestOfNRoundsArguments",
    "BestOfNRoundsConfig",
    "ConditionedDPOTrainer",
    "ConditionedGRPOTrainer",
    "ConditionedSFTTrainer",
    "LatentConditionedEmbedding",
    "LatentPromptArguments",
    "LatentPrompt",
    "PolicyConditioning",
    "PolicyEvaluation",
    "PolicyError",
    "TimeBudgetCallback",
    "add_latent_prompt",
    "build_policy",
    "check_reward_fits",
    "conditioned_on",
    "load_conditioned_policy",
    "margin_interval",
    "policy_reward_model",
    "read_policy_config",
    "write_policy_config",
    "PersonalizedRewardFunction",
    "RewardRankedDPOConfig",
    "RewardRankedDPOTrainer",
    "build_policy_dataset",
    "candidate_pool",
    "context_preamble",
    "draw_context",
    "format_results",
    "held_out_contexts",
    "load_prompt_list",
    "load_user_pairs",
    "mean_rewards",
    "plot_matrices",
    "policy_prompt",
    "resolve_data_source",
    "round_config",
    "run_record",
    "score_completions",
    "summarize",
    "train_policy",
    "write_results",
]
