"""Preference data with users: our format, context sampling and dataset builders."""

from .context import attach_contexts, parse_num_context
from .format import PreferenceDataError, load_preference_file, load_preference_splits, read_jsonl, validate_context, validate_example, write_jsonl
from .hh_rlhf import build_hh_relabeled
from .pets import build_pets
from .population import Population, build_population, true_utility, utility_from_weights
from .ukp_conv_arg import UKPConvArgConfig, build_ukp_conv_arg
from .ultrafeedback import build_ultrafeedback, iter_source_rows
from .user_files import load_user_context, read_prompts

__all__ = [
    "Population",
    "PreferenceDataError",
    "UKPConvArgConfig",
    "attach_contexts",
    "build_hh_relabeled",
    "build_pets",
    "build_population",
    "build_ukp_conv_arg",
    "build_ultrafeedback",
    "iter_source_rows",
    "load_user_context",
    "load_preference_file",
    "load_preference_splits",
    "parse_num_context",
    "read_prompts",
    "read_jsonl",
    "true_utility",
    "utility_from_weights",
    "validate_context",
    "validate_example",
    "write_jsonl",
]
