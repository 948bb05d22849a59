"""A user's files: their labelled context pairs (JSON or JSONL) and prompt files, checked line by line.

- `load_user_context` reads a user's pairs: a JSON list (or an object with a `context` list) or JSONL of
  `{prompt?, chosen, rejected}`.
- `read_prompts` reads prompts: JSONL rows with `prompt`, else one prompt per line.
- For policy optimization: `resolve_data_source` (a folder, file or built-in dataset), `load_user_pairs` (each
  user's labelled pairs, from a dataset or a `{user: context}` mapping), `draw_context`, `held_out_contexts`, `load_prompt_list`.
"""

from __future__ import annotations

import gzip
import json
import os
import random
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .format import PreferenceDataError, load_preference_splits, read_jsonl, validate_example
from .registry import BUILTIN, builtin_dataset_folder


def load_user_context(path: str | os.PathLike) -> list[dict[str, Any]]:
    """A user's labelled pairs from a JSON file (a list, or an object with a `context` list) or a JSONL file.

    Raises `PreferenceDataError` naming the file and the line (JSONL) or entry (JSON) of any malformed pair.
    """
    path = Path(path)
    if not path.is_file():
        raise PreferenceDataError(f"{path}: no such user context file.")
    if _is_json_document(path):
        pairs = _read_json_pairs(path)
        where = [f"{path}, entry {i}" for i in range(1, len(pairs) + 1)]
    else:
        pairs, where = read_jsonl(path), _jsonl_line_names(path)
    if not pairs:
        raise PreferenceDataError(
            f"{path}: no context pairs (expected a JSON list or JSONL of {{prompt?, chosen, rejected}} objects)."
        )
    for pair, name in zip(pairs, where):
        if not isinstance(pair, Mapping):
            raise PreferenceDataError(f"{name}: expected an object with `chosen` and `rejected`, got {type(pair).__name__}.")
        validate_example(pair, name)
    return [dict(pair) for pair in pairs]


def _is_json_document(path: Path) -> bool:
    if path.suffix == ".json":
        return True
    if path.suffix in (".jsonl", ".gz"):
        return False
    with open(path, encoding="utf-8") as handle:
        head = handle.read(4096).lstrip()
    return head.startswith("[")


def _read_json_pairs(path: Path) -> list[Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise PreferenceDataError(f"{path}, line {error.lineno}: not valid JSON ({error.msg}).") from None
    if isinstance(data, Mapping) and isinstance(data.get("context"), list):
        data = data["context"]
    if not isinstance(data, list):
        raise PreferenceDataError(
            f"{path}: expected a JSON list of {{prompt?, chosen, rejected}} pairs, got {type(data).__name__}."
        )
    return data


def _jsonl_line_names(path: Path) -> list[str]:
    """`FILE, line N` for each non-blank line, matching the rows `read_jsonl` returns."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as handle:
        return [f"{path}, line {number}" for number, line in enumerate(handle, start=1) if line.strip()]


def read_prompts(path: str | os.PathLike) -> list[Any]:
    """Prompts from a file: JSONL rows with `prompt` (`.jsonl`, or a first line starting with `{`), else one per line."""
    path = Path(path)
    if not path.is_file():
        raise PreferenceDataError(f"{path}: no such prompts file.")
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if path.suffix == ".jsonl" or (lines and lines[0].lstrip().startswith("{")):
        rows = read_jsonl(path)
        for name, row in zip(_jsonl_line_names(path), rows):
            if not row.get("prompt"):
                raise PreferenceDataError(f"{name}: missing field `prompt`.")
        prompts = [row["prompt"] for row in rows]
    else:
        prompts = lines
    if not prompts:
        raise PreferenceDataError(f"{path}: no prompts.")
    return prompts


PAIR_KEYS = ("prompt", "chosen", "rejected")


def resolve_data_source(source: str, data_dir: str | Path = "data") -> Path:
    """A folder or file; a built-in dataset name (`pets`, `pets_controversial`) is generated into `data_dir`
    when missing."""
    if source in BUILTIN and not Path(source).exists():
        return builtin_dataset_folder(source, data_dir)
    path = Path(source)
    if not path.exists():
        raise PreferenceDataError(f"{source}: no such dataset folder or file.")
    return path


def load_user_pairs(source: Path, split: str = "train") -> dict[str, list[dict[str, Any]]]:
    """Each user's labelled pairs: from a dataset folder in our format (its `split`, grouped by `user_id`), or
    from a JSON mapping `{user: context file, or a list of pairs}` (files relative to the mapping)."""
    if source.is_dir():
        splits = load_preference_splits(source)
        if split not in splits:
            raise PreferenceDataError(f"{source}: no `{split}` split.")
        pairs: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for row in splits[split]:
            pairs[str(row["user_id"])].append({key: row.get(key) or "" for key in PAIR_KEYS})
        return dict(pairs)
    return _load_context_mapping(source)


def _load_context_mapping(path: Path) -> dict[str, list[dict[str, Any]]]:
    try:
        mapping = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise PreferenceDataError(f"{path}, line {error.lineno}: not valid JSON ({error.msg}).") from None
    if not isinstance(mapping, dict) or not mapping:
        raise PreferenceDataError(
            f"{path}: expected a JSON object mapping each user to a context file or a list of pairs."
        )
    users = {}
    for user, value in mapping.items():
        if isinstance(value, str):
            users[str(user)] = load_user_context(path.parent / value)
            continue
        if not isinstance(value, list) or not value:
            raise PreferenceDataError(
                f"{path}, user {user!r}: expected a context file name or a non-empty list of pairs."
            )
        for number, pair in enumerate(value, start=1):
            if not isinstance(pair, dict):
                raise PreferenceDataError(f"{path}, user {user!r}, pair {number}: expected an object.")
            validate_example(pair, f"{path}, user {user!r}, pair {number}")
        users[str(user)] = value
    return users


def draw_context(pairs: Sequence[dict[str, Any]], k: int, rng: random.Random) -> list[dict[str, Any]]:
    """`k` of a user's pairs, drawn without replacement (all of them when the user has fewer)."""
    return list(pairs) if len(pairs) <= k else rng.sample(list(pairs), k)


def held_out_contexts(
    source: Path, users: Sequence[str], k: int, rng: random.Random
) -> dict[str, list[dict[str, Any]]]:
    """Contexts to evaluate a conditioned policy with: `k` pairs of each user's test split in the dataset folder
    `source`, which no training prompt showed (as for a new user), when it has them for every one of `users`;
    else none (`{}`)."""
    if not source.is_dir():
        return {}
    try:
        test_pairs = load_user_pairs(source, "test")
    except PreferenceDataError:
        return {}
    if not all(test_pairs.get(user) for user in users):
        return {}
    return {user: draw_context(test_pairs[user], k, rng) for user in users}


def load_prompt_list(source: Path, split: str = "train") -> list[Any]:
    """The distinct prompts of a dataset folder's `split`, or of a prompts file (lines or JSONL with `prompt`)."""
    if source.is_dir():
        splits = load_preference_splits(source)
        if split not in splits:
            return []
        if "prompt" not in splits[split].column_names:
            return []
        return _distinct([p for p in splits[split]["prompt"] if p])
    return read_prompts(source)


def _distinct(prompts: list[Any]) -> list[Any]:
    seen, result = set(), []
    for prompt in prompts:
        key = json.dumps(prompt, sort_keys=True)
        if key not in seen:
            seen.add(key)
            result.append(prompt)
    return result
