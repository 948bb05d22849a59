"""A user's files: their labelled context pairs (JSON or JSONL) and prompt files, checked line by line.

- `load_user_context` reads a user's pairs: a JSON list (or an object with a `context` list) or JSONL of
  `{prompt?, chosen, rejected}`.
- `read_prompts` reads prompts: JSONL rows with `prompt`, else one prompt per line.
"""

from __future__ import annotations

import gzip
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .format import PreferenceDataError, read_jsonl, validate_example


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
