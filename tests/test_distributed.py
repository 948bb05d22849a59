"""Multi-process training: `accelerate launch` with the shipped DeepSpeed ZeRO-2 and ZeRO-3 configs, two processes on
CPU (DeepSpeed's CPU accelerator, gloo), against a single-process run with the same global batch; saving under
ZeRO-3, reloading the saved folder, and resuming from a DeepSpeed checkpoint."""

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoTokenizer

from vpl_trl import VPLRewardModel
from vpl_trl.distributed import cpu_launch_defaults
from vpl_trl.embeddings import _tokenize
from vpl_trl.scripts import train_reward
from vpl_trl.text import render_text

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "train_reward.py"
POLICY_RECIPE = ROOT / "recipes" / "ppo_personalized.py"
# A 2-process run sums the same per-example gradients in another order than one process (differences ~1e-6 in the
# logged losses); Adam's normalized steps carry such differences into the weights: 1e-4 to 2e-3 seen in the final
# rewards. A wrong save or reload differs by the rewards' own order (about 1).
LOSS_TOLERANCE = 1e-4  # absolute, per logged step
REWARD_TOLERANCE = 5e-3  # absolute, rewards of order 1
# A resumed run replays the same computation (weights, optimizer, scheduler and RNG states restored).
RESUME_TOLERANCE = 1e-6
GLOBAL_BATCH = 8
STEPS = 6  # 48 training pairs (none over --max_length 128): one epoch of 6 full global batches


def recipe_args(backbone: str, data_dir: Path, output_dir: Path, model_type: str, per_device_batch: int) -> list[str]:
    return [
        "--model_name_or_path", backbone,
        "--model_type", model_type,
        "--embedding_mode", "lora",
        "--dataset", "pets",
        "--data_dir", str(data_dir),
        "--max_train_samples", "48",
        "--max_eval_samples", "16",
        "--max_length", "128",
        "--pooling", "mean",
        "--latent_dim", "8",
        "--hidden_dim", "32",
        "--num_context", "4",
        "--learning_rate", "3e-3",
        "--per_device_train_batch_size", str(per_device_batch),
        "--max_steps", str(STEPS),
        "--logging_steps", "1",
        "--save_steps", "3",
        "--report_to", "none",
        "--disable_tqdm", "true",
        "--output_dir", str(output_dir),
        "--overwrite_output_dir",
    ]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("distributed-data")


@pytest.fixture(scope="module")
def launch_env() -> dict:
    env = dict(os.environ)
    env.update(WANDB_MODE="disabled", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    # DeepSpeed compiles its CPU communication op once (~1 min) into $TORCH_EXTENSIONS_DIR: the Makefile's folder, or
    # the default set when vpl_trl was imported at collection, before the session isolated the vpl-trl cache
    # (~/.cache/vpl_trl/torch_extensions). Every launch of the session, and later sessions, reuse that build.
    assert env.get("TORCH_EXTENSIONS_DIR"), "importing vpl_trl sets a default TORCH_EXTENSIONS_DIR"
    return env


def launch(config: str, args: list[str], env: dict, cache: Path, recipe: Path = RECIPE) -> str:
    """`accelerate launch --config_file deepspeed_configs/CONFIG.yaml --num_processes 2 RECIPE ARGS` (default:
    recipes/train_reward.py) from the repository root (the ZeRO-3 configs name their JSON relative to it); returns
    the combined output."""
    command = [
        sys.executable, "-m", "accelerate.commands.launch",
        "--config_file", f"deepspeed_configs/{config}.yaml",
        "--num_processes", "2",
        "--main_process_port", "0",  # a free port: other runs may be using the default one
        str(recipe), *args,
    ]
    run = subprocess.run(
        command, cwd=ROOT, env={**env, "VPL_TRL_CACHE": str(cache)}, capture_output=True, text=True, timeout=420
    )
    output = run.stdout + run.stderr
    assert run.returncode == 0, f"{config} launch failed:\n{output[-6000:]}"
    return output


def logged_losses(output_dir: Path) -> dict[int, float]:
    history = json.loads((output_dir / f"checkpoint-{STEPS}" / "trainer_state.json").read_text())["log_history"]
    steps = [entry["step"] for entry in history if "loss" in entry]
    assert len(steps) == len(set(steps)), f"a step was logged twice: {steps}"
    return {entry["step"]: entry["loss"] for entry in history if "loss" in entry}


def eval_pairs(data_dir: Path, n: int = 8) -> list[dict]:
    rows = (data_dir / "pets" / "test.jsonl").read_text().splitlines()
    return [json.loads(row) for row in rows[:n]]


def context_pairs(data_dir: Path, user: str, k: int = 4) -> list[dict]:
    rows = [json.loads(row) for row in (data_dir / "pets" / "train.jsonl").read_text().splitlines()]
    return [row for row in rows if row["user_id"] == user][:k]


@torch.no_grad()
def saved_rewards(folder: Path, pairs: list[dict], context: list[dict]) -> torch.Tensor:
    """Rewards of the pairs' chosen and rejected responses by the model reloaded from `folder` (given `context`
    as the user's context pairs for a VPL model)."""
    model = VPLRewardModel.from_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(model.config.backbone_name_or_path)
    texts = [render_text(tokenizer, p["prompt"], p[side]) for side in ("chosen", "rejected") for p in pairs]
    encoded = _tokenize(tokenizer, texts, max_length=128)
    inputs = {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}
    if model.config.use_latent:
        for side in ("chosen", "rejected"):
            ctx = _tokenize(tokenizer, [render_text(tokenizer, p["prompt"], p[side]) for p in context], max_length=128)
            inputs[f"context_{side}"] = model.embed(ctx["input_ids"], ctx["attention_mask"], use_adapter=False)[None]
    return model(**inputs).logits.squeeze(-1).float()



@pytest.fixture(scope="module")
def single_process_run(tiny_backbone, data_dir, tmp_path_factory) -> Path:
    """The reference: one process, the whole global batch per step (in this process, as `python recipes/...`)."""
    output_dir = tmp_path_factory.mktemp("single") / "run"
    train_reward.main(recipe_args(tiny_backbone, data_dir, output_dir, "base", GLOBAL_BATCH))
    return output_dir


@pytest.mark.slow
@pytest.mark.parametrize("config", ["zero2", "zero3"])
def test_two_processes_match_a_single_process_run(
    config, single_process_run, tiny_backbone, data_dir, launch_env, tmp_path
):
    output_dir = tmp_path / "run"
    launch(config, recipe_args(tiny_backbone, data_dir, output_dir, "base", GLOBAL_BATCH // 2), launch_env,
           tmp_path / "cache")

    reference, losses = logged_losses(single_process_run), logged_losses(output_dir)
    assert sorted(losses) == list(range(1, STEPS + 1))
    assert losses == pytest.approx(reference, abs=LOSS_TOLERANCE)
    # The loss moved: the comparison covers training, not only the initial model.
    assert max(reference.values()) - min(reference.values()) > 1e-2

    pairs, context = eval_pairs(data_dir), context_pairs(data_dir, "helpful")
    torch.testing.assert_close(
        saved_rewards(output_dir, pairs, context),
        saved_rewards(single_process_run, pairs, context),
        atol=REWARD_TOLERANCE,
        rtol=0,
    )


@pytest.mark.slow
def test_zero3_vpl_run_saves_a_single_process_folder_and_resumes(
    tiny_backbone, data_dir, launch_env, tmp_path
):
    output_dir = tmp_path / "run"
    args = recipe_args(tiny_backbone, data_dir, output_dir, "vae", GLOBAL_BATCH // 2)
    # pets_controversial brings texts first embedded after training starts, when the ZeRO-3 engine holds the backbone.
    output = launch("zero3", args + ["--extra_eval_datasets", "pets_controversial"], launch_env, tmp_path / "cache")

    # Every process embeds the context texts together (the backbone is partitioned); rank 0 alone reports.
    assert len(re.findall(r"Embedding train texts: \d+ sequences in", output)) == 1
    assert output.count("| vae on pets |") == 1

    # The folder a single-process save writes: config and one weights file with the heads and the LoRA adapter.
    reference = tmp_path / "single-process-save"
    VPLRewardModel.from_backbone(
        tiny_backbone, reward_type="vae", latent_dim=8, hidden_dim=32, embedding_mode="lora", pooling="mean"
    ).save_pretrained(reference)
    for folder in (output_dir, output_dir / f"checkpoint-{STEPS}"):
        weights, reference_weights = folder / "model.safetensors", reference / "model.safetensors"
        with safe_open(weights, "pt") as saved, safe_open(reference_weights, "pt") as ref:
            assert set(saved.keys()) == set(ref.keys())
            assert any("lora_B" in key for key in saved.keys()) and any(k.startswith("encoder.") for k in saved.keys())
            for key in ref.keys():
                assert saved.get_slice(key).get_shape() == ref.get_slice(key).get_shape(), key
        config = json.loads((folder / "config.json").read_text())
        assert config["reward_type"] == "vae" and config["embedding_mode"] == "lora"

    pairs, context = eval_pairs(data_dir), context_pairs(data_dir, "harmless")
    uninterrupted_losses = logged_losses(output_dir)
    uninterrupted_rewards = saved_rewards(output_dir, pairs, context)
    results = json.loads((output_dir / "eval_results.json").read_text())
    assert set(results["by_test_set"]) == {"pets", "pets_controversial"}

    # Resume from the step-3 DeepSpeed checkpoint: steps 4-6 replay exactly, and the final model is the same.
    resumed = launch("zero3", args + ["--resume_from_checkpoint", str(output_dir / "checkpoint-3")], launch_env,
                     tmp_path / "cache")
    assert len(re.findall(r"'loss': ", resumed)) == STEPS - 3, "the resumed run trains steps 4-6 only"
    losses = logged_losses(output_dir)
    assert losses == pytest.approx(uninterrupted_losses, abs=RESUME_TOLERANCE)
    torch.testing.assert_close(saved_rewards(output_dir, pairs, context), uninterrupted_rewards, atol=RESUME_TOLERANCE,
                               rtol=0)


ZERO3_BF16_LOAD = """
import json, sys
import deepspeed
from transformers.integrations import HfDeepSpeedConfig
from vpl_trl import VPLRewardModel
from vpl_trl.distributed import is_zero3_partitioned

deepspeed.init_distributed(dist_backend="gloo")
# What `TrainingArguments` sets up under a ZeRO-3 bf16 config: from_pretrained then partitions the backbone in bf16.
ds_config = HfDeepSpeedConfig({"zero_optimization": {"stage": 3}, "bf16": {"enabled": True}, "train_batch_size": 1})
model = VPLRewardModel.from_backbone(sys.argv[1], reward_type="vae", latent_dim=8, hidden_dim=16, embedding_mode="lora")
print(json.dumps({"partitioned": is_zero3_partitioned(model.backbone),
                  "dtypes": sorted({str(p.dtype) for p in model.parameters()})}))
"""


@pytest.mark.slow
def test_zero3_bf16_partition_has_one_dtype(tiny_backbone, launch_env):
    """Under ZeRO-3 in bf16, the encoder, decoder and LoRA adapter take the dtype of the partitioned backbone."""
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    env = {**launch_env, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": "0", "LOCAL_RANK": "0",
           "WORLD_SIZE": "1"}
    run = subprocess.run([sys.executable, "-c", ZERO3_BF16_LOAD, tiny_backbone], env=env, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    loaded = json.loads(run.stdout.strip().splitlines()[-1])
    assert loaded == {"partitioned": True, "dtypes": ["torch.bfloat16"]}


@pytest.mark.slow
@pytest.mark.parametrize("config,signal", [("zero2", "dpo"), ("zero3", "dpo"), ("zero3", "bon_sft")])
def test_conditioned_policy_recipe_under_deepspeed(config, signal, tiny_reward_model, tiny_backbone, launch_env,
                                                   tmp_path):
    """The conditioned recipe (latent soft prompt; DPO, the default, or best-of-n distillation) for 2 steps on 2
    processes: every process generates, trains and evaluates together; the saved policy reloads in one process."""
    from vpl_trl.data import build_pets
    from vpl_trl.policy import conditioned_on, load_conditioned_policy

    data = tmp_path / "pets"
    build_pets(data, n_train_per_user=12, n_test_per_user=4, seed=0)
    output_dir = tmp_path / "policy"
    launch(config, [
        "--reward_model", tiny_reward_model, "--user_contexts", str(data), "--model_name_or_path", tiny_backbone,
        "--mode", "conditioned", "--signal", signal, "--max_steps", "2", "--max_completion_length", "6",
        "--num_context", "3", "--rows_per_user", "4", "--bon_n", "4", "--per_device_train_batch_size", "2",
        "--eval_samples", "2",
        "--report_to", "none", "--save_strategy", "no", "--disable_tqdm", "true", "--output_dir", str(output_dir),
    ], launch_env, tmp_path / "cache", recipe=POLICY_RECIPE)

    results = json.loads((output_dir / "eval_results.json").read_text())
    assert results["signal"] == signal and results["conditioning"]["kind"] == "latent"
    assert results["runs"]["all"]["steps"] == 2
    records = [json.loads(line) for line in (output_dir / "eval_completions.jsonl").read_text().splitlines()]
    # both processes' generations were gathered: every user's policy answered every sample, before and after
    assert len(records) == 2 * 2 * results["eval_prompts"] * results["eval_samples_per_prompt"]
    model, tokenizer, conditioning, _ = load_conditioned_policy(output_dir, device="cpu")
    ids = tokenizer.apply_chat_template(conditioning.prompt("A pet?", None, chat=True), add_generation_prompt=True,
                                        return_tensors="pt", return_dict=True)["input_ids"]
    with torch.no_grad(), conditioned_on(model, torch.ones(1, 8)):
        assert torch.isfinite(model(input_ids=ids).logits).all()


def test_cpu_launch_defaults(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert cpu_launch_defaults() == {}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    assert cpu_launch_defaults() == {"ddp_backend": "gloo"}  # keeps DeepSpeed, on its CPU accelerator
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "false")
    assert cpu_launch_defaults() == {"use_cpu": True}  # DDP: Accelerate's multi-CPU mode
