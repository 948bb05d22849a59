"""Faults in long runs: a run killed and resumed, damaged checkpoints, a disk that fills up, two runs on one folder.

The recipe runs in subprocesses through a small harness that slows each training step down or holds it until a file
appears (so that a run can be caught part-way) and, for the disk test, lowers the file-size limit once the first
checkpoint is saved.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from vpl_trl.checkpoints import (
    LOCK_NAME,
    MANIFEST_NAME,
    CheckpointError,
    OutputDirLock,
    checkpoint_folders,
    resolve_resume,
    verify_checkpoint,
    write_manifest,
)

REPO = Path(__file__).resolve().parents[1]

HARNESS = """
import os, resource, runpy, signal, sys, time
from vpl_trl import VPLRewardTrainer

training_step = VPLRewardTrainer.training_step
def slow_step(self, *args, **kwargs):
    time.sleep(float(os.environ.get("STEP_SECONDS", "0")))
    while os.environ.get("WAIT_FOR_FILE") and not os.path.exists(os.environ["WAIT_FOR_FILE"]):
        time.sleep(0.05)
    return training_step(self, *args, **kwargs)
VPLRewardTrainer.training_step = slow_step

if os.environ.get("FILE_SIZE_LIMIT_AFTER_FIRST_SAVE"):
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails (EFBIG) instead of killing
    save = VPLRewardTrainer._save_checkpoint
    def save_then_fill_up(self, model, trial):
        save(self, model, trial)
        limit = int(os.environ["FILE_SIZE_LIMIT_AFTER_FIRST_SAVE"])
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
    VPLRewardTrainer._save_checkpoint = save_then_fill_up

sys.argv = ["recipes/train_reward.py"] + sys.argv[1:]
runpy.run_path("recipes/train_reward.py", run_name="__main__")
"""


def recipe_args(tiny_backbone: str, data_dir: Path, output_dir: Path, *extra: str) -> list[str]:
    return [
        "--model_name_or_path", tiny_backbone, "--dataset", "pets_controversial", "--data_dir", str(data_dir),
        "--model_type", "vae", "--embedding_mode", "frozen", "--latent_dim", "8", "--hidden_dim", "16",
        "--max_train_samples", "96", "--max_eval_samples", "40", "--per_device_train_batch_size", "8",
        "--max_steps", "12", "--save_strategy", "steps", "--save_steps", "4", "--logging_steps", "1",
        "--report_to", "none", "--disable_tqdm", "true", "--output_dir", str(output_dir), *extra,
    ]


def start(args: list[str], **env: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", HARNESS, *args], cwd=REPO, env={**os.environ, **env},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(process: subprocess.Popen, timeout: float = 300) -> subprocess.CompletedProcess:
    out, err = process.communicate(timeout=timeout)
    return subprocess.CompletedProcess(process.args, process.returncode, out, err)


def wait_for(condition, process: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if process.poll() is not None:
            raise AssertionError(f"the run ended first:\n{process.stderr.read()[-3000:]}")
        if time.monotonic() > deadline:
            process.kill()
            raise AssertionError("timed out")
        time.sleep(0.05)


def final_state(output_dir: Path) -> tuple[dict, float]:
    """The run's evaluation and its last logged training loss (from the final checkpoint's trainer state)."""
    results = json.loads((output_dir / "eval_results.json").read_text())
    history = json.loads((output_dir / "checkpoint-12" / "trainer_state.json").read_text())["log_history"]
    return results, [entry["loss"] for entry in history if "loss" in entry][-1]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fault-data")


@pytest.mark.slow
def test_a_run_killed_after_its_first_checkpoint_resumes_to_the_same_result(tiny_backbone, data_dir, tmp_path):
    uninterrupted = finish(start(recipe_args(tiny_backbone, data_dir, tmp_path / "whole")))
    assert uninterrupted.returncode == 0, uninterrupted.stderr[-3000:]

    killed = start(recipe_args(tiny_backbone, data_dir, tmp_path / "killed"), STEP_SECONDS="0.3")
    wait_for(lambda: (tmp_path / "killed" / "checkpoint-4" / MANIFEST_NAME).exists(), killed)
    killed.send_signal(signal.SIGKILL)
    finish(killed)
    assert killed.returncode == -signal.SIGKILL
    assert not (tmp_path / "killed" / "eval_results.json").exists() and not (tmp_path / "killed/checkpoint-12").exists()

    resumed = finish(start(recipe_args(tiny_backbone, data_dir, tmp_path / "killed", "--resume_from_checkpoint",
                                       "true")))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    (results, loss), (expected, expected_loss) = final_state(tmp_path / "killed"), final_state(tmp_path / "whole")
    assert loss == expected_loss  # frozen mode: the same batches, contexts and latent draws, bit for bit
    assert results == expected  # accuracy, per user, KL, context swap


@pytest.mark.slow
def test_a_save_that_runs_out_of_space_keeps_the_previous_checkpoint(tiny_backbone, data_dir, tmp_path):
    output_dir = tmp_path / "full"
    run = finish(start(recipe_args(tiny_backbone, data_dir, output_dir), FILE_SIZE_LIMIT_AFTER_FIRST_SAVE="1024"))
    assert run.returncode != 0
    assert "Saving checkpoint-8" in run.stderr and "file-size limit" in run.stderr
    assert f"the previous checkpoint, {output_dir / 'checkpoint-4'}, is intact" in run.stderr
    assert checkpoint_folders(output_dir) == [output_dir / "checkpoint-4"]  # the partial checkpoint-8 was removed
    verify_checkpoint(output_dir / "checkpoint-4")
    assert resolve_resume("true", output_dir) == str(output_dir / "checkpoint-4")


@pytest.mark.slow
def test_a_second_run_on_the_same_output_folder_is_refused(tiny_backbone, data_dir, tmp_path):
    output_dir = tmp_path / "shared"
    go_on = tmp_path / "go-on"
    first = start(recipe_args(tiny_backbone, data_dir, output_dir), WAIT_FOR_FILE=str(go_on))  # trains when told
    wait_for(lambda: (output_dir / LOCK_NAME).exists(), first)
    second = finish(start(recipe_args(tiny_backbone, data_dir, output_dir, "--overwrite_output_dir")))
    assert second.returncode != 0 and f"is in use by another run (pid {first.pid} " in second.stderr
    go_on.touch()
    first = finish(first)
    assert first.returncode == 0, first.stderr[-3000:]
    verify_checkpoint(output_dir / "checkpoint-12")
    assert json.loads((output_dir / "eval_results.json").read_text())["n_eval"] == 40


def fake_checkpoint(folder: Path, step: int, manifest: bool = True) -> Path:
    """A checkpoint's files as the trainer writes them: weights, an optimizer archive, the trainer state."""
    checkpoint = folder / f"checkpoint-{step}"
    checkpoint.mkdir(parents=True)
    save_file({"weight": torch.arange(64, dtype=torch.float32)}, str(checkpoint / "model.safetensors"))
    torch.save({"state": torch.ones(32)}, checkpoint / "optimizer.pt")
    (checkpoint / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    if manifest:
        write_manifest(checkpoint)
    return checkpoint


def truncate(path: Path, keep: int = 40) -> None:
    path.write_bytes(path.read_bytes()[:keep])


@pytest.mark.parametrize("manifest", [True, False])
def test_a_truncated_checkpoint_is_named_and_true_falls_back_to_the_newest_intact_one(tmp_path, manifest, caplog):
    older, newer = fake_checkpoint(tmp_path, 4, manifest), fake_checkpoint(tmp_path, 8, manifest)
    verify_checkpoint(newer)
    truncate(newer / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"checkpoint-8/model\.safetensors: .*(truncated|cut short)"):
        verify_checkpoint(newer)
    with pytest.raises(SystemExit, match=r"checkpoint-8/model\.safetensors"):
        resolve_resume(str(newer), tmp_path)
    assert resolve_resume("true", tmp_path) == str(older)
    assert "checkpoint-8/model.safetensors" in caplog.text  # the damaged one is reported, not skipped silently

    truncate(older / "optimizer.pt")
    with pytest.raises(SystemExit, match=r"no intact checkpoint.*checkpoint-4/optimizer\.pt"):
        resolve_resume("true", tmp_path)
    assert resolve_resume("true", tmp_path, required=False) is None


def test_corrupt_or_unfinished_checkpoints_are_named(tmp_path):
    checkpoint = fake_checkpoint(tmp_path, 4)
    data = bytearray((checkpoint / "model.safetensors").read_bytes())
    data[-1] ^= 0xFF  # same size, other contents: only the manifest can tell
    (checkpoint / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"model\.safetensors: its contents changed"):
        verify_checkpoint(checkpoint)
    unfinished = fake_checkpoint(tmp_path, 8, manifest=False)
    (unfinished / "trainer_state.json").unlink()  # a save killed before its last file
    with pytest.raises(CheckpointError, match=r"checkpoint-8/trainer_state\.json: missing"):
        verify_checkpoint(unfinished)


HOLD_LOCK = """
import sys, time
from vpl_trl.checkpoints import OutputDirLock
with OutputDirLock(sys.argv[1]):
    print("locked", flush=True)
    time.sleep(120)
"""


def test_the_output_folder_lock_refuses_a_second_run_and_dies_with_its_holder(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(SystemExit, match=rf"in use by another run \(pid {holder.pid} "):
            with OutputDirLock(tmp_path):
                pass
    finally:
        holder.kill()
        holder.wait()
    with OutputDirLock(tmp_path) as lock:  # a killed holder leaves no lock behind
        assert str(os.getpid()) in lock.path.read_text()
    assert not lock.path.exists()  # removed on a clean exit
