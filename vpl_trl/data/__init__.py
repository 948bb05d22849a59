"""Preference data with users: our format, context sampling and dataset builders."""

from .context import attach_contexts, parse_num_context
from .format import (
    PreferenceDataError,
    load_preference_file,
    load_preference_splits,
    read_jsonl,
    validate_context,
    validate_example,
    write_jsonl,
)
from .pets import build_pets

__all__ = [
    "PreferenceDataError",
    "attach_contexts",
    "build_pets",
    "load_preference_file",
    "load_preference_splits",
    "parse_num_context",
    "read_jsonl",
    "validate_context",
    "validate_example",
    "write_jsonl",
]
