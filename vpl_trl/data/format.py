"""The vpl-trl preference format: reading, validating and writing it.

One example is a JSON object (a JSONL line or a `datasets` row):

- `chosen`, `rejected` (required): the preferred and the other response, as text or as a chat
  (a list of `{"role", "content"}` messages, rendered with the tokenizer's chat template).
- `prompt` (optional): prepended to both responses.
- `user_id` (required for personalized training): who labelled the pair.
- `context` (optional): a list of `{prompt?, chosen, rejected}` pairs labelled by the same user.
  When absent, contexts are drawn from the user's other pairs (see `vpl_trl.data.context`).
- Any other field is kept (`controversial`, `satisfied_users`, ...).
"""

from __future__ import annotations

import gzip
import json
import os
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from datasets import Dataset, DatasetDict, load_dataset, load_from_disk

REQUIRED_COLUMNS = ("chosen", "rejected")


class PreferenceDataError(ValueError):
    """Raised when preference data does not follow the vpl-trl format."""


def _is_text_or_chat(value: Any) -> bool:
    if isinstance(value, str):
        return True
    return isinstance(value, list) and all(isinstance(m, Mapping) and "role" in m and "content" in m for m in value)


def validate_example(example: Mapping[str, Any], where: str, require_user: bool = False) -> None:
    """Check one example; `where` names it in the error (e.g. `data/train.jsonl, line 3`)."""
    for column in REQUIRED_COLUMNS:
        if example.get(column) is None:  # a row read as a table has every column, null where the line lacks it
            raise PreferenceDataError(f"{where}: missing field `{column}` (expected a string or a chat message list).")
        if not _is_text_or_chat(example[column]):
            raise PreferenceDataError(
                f"{where}: field `{column}` must be a string or a list of chat messages, "
                f"got {type(example[column]).__name__}."
            )
    if "prompt" in example and example["prompt"] is not None and not _is_text_or_chat(example["prompt"]):
        raise PreferenceDataError(f"{where}: field `prompt` must be a string or a list of chat messages.")
    if require_user and example.get("user_id") in (None, ""):
        raise PreferenceDataError(f"{where}: missing field `user_id` (who labelled this pair).")
    context = example.get("context")
    if context is not None:
        validate_context(context, where)


def validate_context(context: Any, where: str) -> None:
    """A context is a non-empty list of `{prompt?, chosen, rejected}` pairs."""
    if not isinstance(context, list) or not context:
        raise PreferenceDataError(
            f"{where}: field `context` must be a non-empty list of {{chosen, rejected}} pairs, "
            f"got {type(context).__name__ if not isinstance(context, list) else 'an empty list'}."
        )
    for j, pair in enumerate(context):
        if not isinstance(pair, Mapping):
            raise PreferenceDataError(
                f"{where}: `context[{j}]` must be an object with `chosen` and `rejected`, got {type(pair).__name__}."
            )
        for column in REQUIRED_COLUMNS:
            if column not in pair or not _is_text_or_chat(pair[column]):
                raise PreferenceDataError(f"{where}: `context[{j}]` has no valid `{column}` (expected a string).")


def iter_jsonl(path: str | os.PathLike) -> Iterator[tuple[int, dict[str, Any]]]:
    """Stream `(line number, object)` from a JSONL (optionally `.gz`) file, naming the file and line of any
    malformed line."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise PreferenceDataError(f"{path}, line {number}: not valid JSON ({error.msg}).") from None
            if not isinstance(row, dict):
                raise PreferenceDataError(f"{path}, line {number}: expected a JSON object, got {type(row).__name__}.")
            yield number, row


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Read a JSONL (optionally `.gz`) file, naming the file and line of any malformed line."""
    return [row for _, row in iter_jsonl(path)]


def write_jsonl(rows: Iterable[Mapping[str, Any]], path: str | os.PathLike) -> int:
    """Write rows as JSONL (keys in insertion order, deterministic bytes); returns the row count."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    count = 0
    with open(path, "w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
            count += 1
    return count


def load_preference_file(path: str | os.PathLike, require_user: bool = True, column_mapping=None) -> Dataset:
    """Load one file in our format with `datasets`' own readers (JSONL, optionally `.gz`, or Parquet), rename
    columns by `column_mapping` and validate every row. A JSONL line the reader cannot parse is named with its
    line number."""
    path = Path(path)
    reader = "parquet" if path.suffix == ".parquet" else "json"
    try:
        dataset = load_dataset(reader, data_files=str(path), split="train")
    except Exception as error:  # the reader says what failed but not where: find the line
        if reader == "json":
            for _ in iter_jsonl(path):
                pass
        raise PreferenceDataError(f"{path}: cannot be read as {reader} rows ({error}).") from error
    if len(dataset) == 0:
        raise PreferenceDataError(f"{path}: no examples.")
    dataset = rename_columns(dataset, column_mapping)
    validate_dataset(dataset, str(path), require_user=require_user)
    return dataset


def rename_columns(dataset: Dataset, column_mapping: Mapping[str, str] | None) -> Dataset:
    """Map the user's column names onto ours (`{"their_name": "chosen", ...}`)."""
    if not column_mapping:
        return dataset
    missing = [name for name in column_mapping if name not in dataset.column_names]
    if missing:
        raise PreferenceDataError(
            f"column mapping names {missing}, which the dataset does not have (it has {dataset.column_names})."
        )
    return dataset.rename_columns(dict(column_mapping))


def validate_dataset(dataset: Dataset, name: str, require_user: bool = True) -> None:
    """Validate every row of a `datasets.Dataset` in our format."""
    missing = [c for c in REQUIRED_COLUMNS if c not in dataset.column_names]
    if missing:
        raise PreferenceDataError(
            f"{name}: missing column(s) {missing}; it has {dataset.column_names}. "
            "Use a column mapping to rename columns."
        )
    if require_user and "user_id" not in dataset.column_names:
        raise PreferenceDataError(
            f"{name}: missing field `user_id` (who labelled each pair) in every example; it has "
            f"{dataset.column_names}. Name that column with a column mapping (--column_mapping 'annotator=user_id'), "
            "or train a model without users (model_type='base')."
        )
    for number, row in enumerate(dataset, start=1):
        validate_example(row, f"{name}, example {number}", require_user=require_user)


SPLIT_FILES = ("train", "validation", "test", "new_users")
SPLIT_SUFFIXES = (".jsonl", ".jsonl.gz", ".parquet")


def load_preference_splits(
    source: str | os.PathLike,
    column_mapping: Mapping[str, str] | None = None,
    require_user: bool = True,
) -> DatasetDict:
    """Load the splits of a folder of `train.jsonl` and any of `validation.jsonl`, `test.jsonl`,
    `new_users.jsonl` (users absent from training, each row with its user's own `context`), also `.jsonl.gz` or
    `.parquet`; of a `save_to_disk` folder; of a single file (train only); or of a hub dataset id."""
    source_path = Path(source)
    if source_path.is_dir() and any((source_path / f"train{s}").exists() for s in SPLIT_SUFFIXES):
        splits = {}
        for split in SPLIT_FILES:
            for suffix in SPLIT_SUFFIXES:
                file = source_path / f"{split}{suffix}"
                if file.exists():
                    splits[split] = load_preference_file(file, require_user, column_mapping)
                    break
        return DatasetDict(splits)
    if source_path.is_dir() and (source_path / "dataset_dict.json").exists():
        loaded = load_from_disk(str(source_path))
    elif source_path.is_file():
        return DatasetDict({"train": load_preference_file(source_path, require_user, column_mapping)})
    elif source_path.exists():
        raise PreferenceDataError(f"{source}: expected train.jsonl (or .jsonl.gz, .parquet) in this folder.")
    else:
        loaded = load_dataset(str(source))
    loaded = DatasetDict({split: rename_columns(ds, column_mapping) for split, ds in loaded.items()})
    for split, ds in loaded.items():
        validate_dataset(ds, f"{source} [{split}]", require_user=require_user)
    return loaded

