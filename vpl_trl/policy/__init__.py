"""Policy optimization against personalized rewards: user conditioning, the reward function, evaluation."""

from .conditioning import build_policy_dataset, context_preamble, policy_prompt
from .evaluation import (
    format_results,
    generate_for_user,
    mean_rewards,
    plot_matrices,
    score_completions,
    summarize,
    write_results,
)
from .reward import PersonalizedRewardFunction
from .users import draw_context, load_prompt_list, load_user_pairs, resolve_data_source

__all__ = [
    "PersonalizedRewardFunction",
    "build_policy_dataset",
    "context_preamble",
    "draw_context",
    "format_results",
    "generate_for_user",
    "load_prompt_list",
    "load_user_pairs",
    "mean_rewards",
    "plot_matrices",
    "policy_prompt",
    "resolve_data_source",
    "score_completions",
    "summarize",
    "write_results",
]
