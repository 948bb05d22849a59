"""`--resume_from_checkpoint` as the recipes take it: a checkpoint folder, or `true`/`last` for the newest one."""

from __future__ import annotations

from pathlib import Path

from transformers.trainer_utils import get_last_checkpoint


def resolve_resume(value: str | None, output_dir: str | Path, required: bool = True) -> str | None:
    """The checkpoint to resume from: `value` itself, or for `true`/`last` the newest `checkpoint-*` folder in
    `output_dir` (with `required`, its absence is an error; without, the run starts afresh)."""
    if value is None or str(value).lower() not in ("true", "last"):
        return value
    output_dir = Path(output_dir)
    last = get_last_checkpoint(str(output_dir)) if output_dir.is_dir() else None
    if last is None and required:
        raise SystemExit(f"error: --resume_from_checkpoint {value}: no checkpoint-* folder in {output_dir}.")
    return last
