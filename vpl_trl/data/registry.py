"""Dataset names the recipes accept: the built-in Pets variants and simulated population, a folder or file in
our format, or a hub id."""

from __future__ import annotations

import json
from pathlib import Path

from datasets import DatasetDict
from transformers.utils import logging

from .format import load_preference_splits
from .pets import build_pets

logger = logging.get_logger(__name__)

BUILTIN = {"pets": "full", "pets_controversial": "controversial", "population": None}


def parse_column_mapping(value: str | dict | None) -> dict[str, str] | None:
    """`'{"question": "prompt"}'` or `'question=prompt,good=chosen'` -> a mapping of column names."""
    if value is None or isinstance(value, dict):
        return value
    text = value.strip()
    if text.startswith("{"):
        return json.loads(text)
    try:
        return dict(part.split("=", 1) for part in text.split(",") if part)
    except ValueError:
        raise ValueError(f"column_mapping must be JSON or 'theirs=ours,...', got {value!r}.") from None


def builtin_dataset_folder(name: str, data_dir: str | Path = "data") -> Path:
    """The folder of a built-in dataset (`pets`, `pets_controversial`, `population`), generated into
    `data_dir/NAME` on first use, always with the same data seed (0), as `python -m vpl_trl.data pets` (or
    `population`) does, so every run sees the same benchmark."""
    folder = Path(data_dir) / name
    if not (folder / "train.jsonl").exists():
        if name == "population":
            from .population import build_population

            counts = build_population(folder)["rows"]
        else:
            counts = build_pets(folder, variant=BUILTIN[name])
        logger.info(f"Generated {name}: {counts['train']} train / {counts['test']} test rows in {folder}")
    return folder


def load_named_dataset(name: str, data_dir: str | Path = "data", column_mapping: str | dict | None = None,
                       require_user: bool = True) -> DatasetDict:
    """Load `train`/`test` splits of a built-in dataset (see `builtin_dataset_folder`), a folder or file in our
    format, or a hub dataset."""
    if name in BUILTIN:
        return load_preference_splits(builtin_dataset_folder(name, data_dir))
    return load_preference_splits(name, column_mapping=parse_column_mapping(column_mapping), require_user=require_user)
