"""Checkpoints and output folders that survive faults on shared machines.

- Every checkpoint gets a manifest (`checkpoint_manifest.json`: each file's size and SHA-256), written last, once
  the whole checkpoint is on disk; `verify_checkpoint` checks a checkpoint against it (or, for one saved without
  it, checks that each file is whole) and names the first damaged file.
- `resolve_resume`: `--resume_from_checkpoint DIR` is verified first; `true`/`last` takes the newest intact
  checkpoint, passing over (with a warning) those that a kill or a full disk left truncated.
- `FaultTolerantCheckpoints`, a trainer mixin: writes the manifest, verifies what `train(resume_from_checkpoint=...)`
  is given, and turns a save that fails (no space left, a file-size limit) into an error that says the previous
  checkpoint is intact, after removing the partial one.
- `OutputDirLock`: one run at a time per output folder; a second run started on it is refused at once.
"""

from __future__ import annotations

import datetime
import errno
import fcntl
import hashlib
import json
import os
import shutil
import struct
import zipfile
from pathlib import Path

from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from transformers.utils import logging

logger = logging.get_logger(__name__)

MANIFEST_NAME = "checkpoint_manifest.json"
TRAINER_STATE_NAME = "trainer_state.json"
LOCK_NAME = ".vpl_trl.lock"


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed from (missing, truncated or corrupt files)."""


class CheckpointSaveError(RuntimeError):
    """A checkpoint could not be written; the previous one is intact."""


# ----- manifests and verification ------------------------------------------------------------------------------


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST_NAME)


def write_manifest(folder: str | os.PathLike) -> Path:
    """Record every file of a finished checkpoint (size and SHA-256), atomically: the manifest marks it complete."""
    folder = Path(folder)
    files = {str(p.relative_to(folder)): {"size": p.stat().st_size, "sha256": _sha256(p)} for p in _files(folder)}
    manifest = folder / MANIFEST_NAME
    temporary = folder / f".{MANIFEST_NAME}.tmp"
    temporary.write_text(json.dumps({"files": files}, indent=1))
    os.replace(temporary, manifest)
    return manifest


def _check_whole(path: Path) -> None:
    """Raise `CheckpointError` when a file is visibly cut short or unreadable (for checkpoints without manifest)."""
    size = path.stat().st_size
    if path.suffix == ".safetensors":
        with path.open("rb") as file:
            header = file.read(8)
            length = struct.unpack("<Q", header)[0] if len(header) == 8 else None
            try:
                entries = json.loads(file.read(length)) if length is not None and 8 + length <= size else None
            except ValueError:
                entries = None
        if entries is None:
            raise CheckpointError(f"{path}: the safetensors header is cut short or unreadable ({size} bytes)")
        end = max((e["data_offsets"][1] for k, e in entries.items() if k != "__metadata__"), default=0)
        if 8 + length + end != size:
            raise CheckpointError(f"{path}: {size} bytes, its header describes {8 + length + end} (truncated)")
    elif path.suffix in (".pt", ".pth", ".bin"):  # torch.save's zip archives: the index is at the end
        try:
            with zipfile.ZipFile(path) as archive:
                bad = archive.testzip()
        except (zipfile.BadZipFile, OSError) as error:
            raise CheckpointError(f"{path}: not a readable torch archive ({size} bytes; truncated?)") from error
        if bad is not None:
            raise CheckpointError(f"{path}: corrupt entry {bad} in the torch archive")
    elif path.suffix == ".json":
        try:
            json.loads(path.read_text())
        except ValueError as error:
            raise CheckpointError(f"{path}: not valid JSON ({error})") from error


def verify_checkpoint(folder: str | os.PathLike) -> None:
    """Raise `CheckpointError`, naming the file, unless `folder` is a complete and undamaged checkpoint."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: no such checkpoint folder")
    if not (folder / TRAINER_STATE_NAME).is_file():
        raise CheckpointError(f"{folder / TRAINER_STATE_NAME}: missing, so the save of this checkpoint did not finish")
    manifest = folder / MANIFEST_NAME
    if not manifest.is_file():  # saved before manifests, or killed between the save and its manifest
        for path in _files(folder):
            _check_whole(path)
        return
    try:
        recorded = json.loads(manifest.read_text())["files"]
    except (ValueError, KeyError) as error:
        raise CheckpointError(f"{manifest}: unreadable manifest ({error})") from error
    for name, expected in recorded.items():
        path = folder / name
        if not path.is_file():
            raise CheckpointError(f"{path}: missing (the checkpoint's manifest lists it)")
        size = path.stat().st_size
        if size != expected["size"]:
            raise CheckpointError(f"{path}: {size} bytes, {expected['size']} when saved (truncated or overwritten)")
        if _sha256(path) != expected["sha256"]:
            raise CheckpointError(f"{path}: its contents changed since it was saved (SHA-256 differs)")


def checkpoint_folders(output_dir: str | os.PathLike) -> list[Path]:
    """`checkpoint-<step>` folders of a run, newest (highest step) first."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    steps = []
    for path in output_dir.glob(f"{PREFIX_CHECKPOINT_DIR}-*"):
        suffix = path.name[len(PREFIX_CHECKPOINT_DIR) + 1 :]
        if path.is_dir() and suffix.isdigit():
            steps.append((int(suffix), path))
    return [path for _, path in sorted(steps, reverse=True)]


def newest_intact_checkpoint(output_dir: str | os.PathLike) -> tuple[Path | None, list[str]]:
    """The newest checkpoint that verifies, and why each newer one was passed over."""
    problems = []
    for folder in checkpoint_folders(output_dir):
        try:
            verify_checkpoint(folder)
        except CheckpointError as error:
            problems.append(str(error))
            continue
        return folder, problems
    return None, problems


def resolve_resume(value: str | None, output_dir: str | Path, required: bool = True) -> str | None:
    """The checkpoint to resume from, as the recipes take `--resume_from_checkpoint`: a folder, verified; or for
    `true`/`last` the newest intact `checkpoint-*` folder in `output_dir` (damaged newer ones are reported and
    passed over). With `required`, no usable checkpoint is an error; without, the run starts afresh."""
    if value is None or str(value).lower() in ("", "false", "none"):
        return None
    if str(value).lower() not in ("true", "last"):
        try:
            verify_checkpoint(value)
        except CheckpointError as error:
            raise SystemExit(f"error: --resume_from_checkpoint {value}: {error}.") from None
        return str(value)
    last, problems = newest_intact_checkpoint(output_dir)
    for problem in problems:
        logger.warning(f"Passing over a damaged checkpoint: {problem}.")
    if last is None and required:
        why = f": {'; '.join(problems)}" if problems else ""
        raise SystemExit(f"error: --resume_from_checkpoint {value}: no intact checkpoint-* folder in {output_dir}"
                         f"{why}.")
    if last is not None and problems:
        logger.warning(f"Resuming from {last}, the newest intact checkpoint.")
    return str(last) if last is not None else None


# ----- the trainer side --------------------------------------------------------------------------------------


class FaultTolerantCheckpoints:
    """Trainer mixin (first in the bases, so that it wraps everything a checkpoint holds): each checkpoint gets its
    manifest once complete; a failed save removes its partial folder and raises `CheckpointSaveError`, which names
    the intact previous checkpoint; `train(resume_from_checkpoint=...)` refuses a damaged checkpoint by name, and
    `True` takes the newest intact one."""

    def _save_checkpoint(self, model, trial):
        run_dir = Path(self._get_output_dir(trial=trial))
        folder = run_dir / f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        try:
            super()._save_checkpoint(model, trial)
        except Exception as error:  # OSError, or torch's/safetensors' own errors for a write that failed
            raise CheckpointSaveError(self._failed_save_message(run_dir, folder, error)) from error
        self.accelerator.wait_for_everyone()  # every process has written its part (DeepSpeed shards)
        if self.args.should_save:
            write_manifest(folder)

    def _failed_save_message(self, run_dir: Path, folder: Path, error: BaseException) -> str:
        if self.args.should_save:
            shutil.rmtree(folder, ignore_errors=True)  # a partial checkpoint is worse than none: resume would take it
        previous, _ = newest_intact_checkpoint(run_dir)
        cause = "no space left on the device" if getattr(error, "errno", None) in (errno.ENOSPC, errno.EDQUOT) else (
            "the file-size limit was reached" if getattr(error, "errno", None) == errno.EFBIG else "the write failed")
        kept = (f"the previous checkpoint, {previous}, is intact: free some space, then resume from it with "
                "--resume_from_checkpoint true" if previous is not None else "no earlier checkpoint exists")
        return (f"Saving {folder.name} in {run_dir} failed ({cause}: {type(error).__name__}: {error}); the partial "
                f"folder was removed and {kept}.")

    def train(self, resume_from_checkpoint: str | bool | None = None, *args, **kwargs):
        if resume_from_checkpoint is True:
            last, problems = newest_intact_checkpoint(self.args.output_dir)
            for problem in problems:
                logger.warning(f"Passing over a damaged checkpoint: {problem}.")
            if last is None:
                raise CheckpointError(f"no intact checkpoint-* folder in {self.args.output_dir} to resume from")
            resume_from_checkpoint = str(last)
        elif resume_from_checkpoint:
            verify_checkpoint(resume_from_checkpoint)
        if resume_from_checkpoint:
            self._check_resume_checkpoint(Path(resume_from_checkpoint))
        return super().train(resume_from_checkpoint, *args, **kwargs)

    def _check_resume_checkpoint(self, folder: Path) -> None:
        """A subclass refuses a checkpoint of another model here (before any process loads it)."""


# ----- one run per output folder ------------------------------------------------------------------------------


class OutputDirLock:
    """An exclusive lock on an output folder for the length of a run (a context manager).

    A second run on the same folder is refused at once with the first one's process id and start time. The lock
    is the kernel's (`flock`), so a run that is killed releases it; its small file is removed on a clean exit.
    """

    def __init__(self, output_dir: str | os.PathLike):
        self.path = Path(output_dir) / LOCK_NAME
        self._file = None

    def __enter__(self) -> OutputDirLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            file = open(self.path, "a+")  # noqa: SIM115 (held open for the run)
            try:
                fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                file.seek(0)
                holder = file.read().strip() or "another process"
                file.close()
                raise SystemExit(
                    f"error: output directory {self.path.parent} is in use by another run ({holder}; lock file "
                    f"{self.path}). Wait for it to finish, or choose another --output_dir."
                ) from None
            # The previous holder may have removed the file between our open and our lock: lock the file in place.
            if self.path.exists() and os.path.samestat(os.fstat(file.fileno()), os.stat(self.path)):
                break
            file.close()
        file.seek(0)
        file.truncate()
        started = datetime.datetime.now().isoformat(timespec="seconds")
        file.write(f"pid {os.getpid()} on {os.uname().nodename}, started {started}")
        file.flush()
        self._file = file
        return self

    def __exit__(self, *exc_info) -> None:
        if self._file is not None:
            self.path.unlink(missing_ok=True)  # while still holding the lock
            fcntl.flock(self._file, fcntl.LOCK_UN)
            self._file.close()
            self._file = None
