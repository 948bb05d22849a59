"""The reward recipe's script (`vpl_trl.scripts.train_reward`, run by `recipes/train_reward.py`) end to end on a tiny
backbone: results file, flags, YAML config, output protection."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from vpl_trl.scripts import train_reward

pytestmark = pytest.mark.slow  # recipe runs (make test-fast skips them)


ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("recipe,flag", [("train_reward", "num_context"), ("ppo_personalized", "user_contexts")])
def test_recipe_files_are_the_scripts_commands(recipe, flag):
    """`recipes/NAME.py` runs `vpl_trl.scripts.NAME`'s parser: every flag, in both spellings."""
    run = subprocess.run([sys.executable, f"recipes/{recipe}.py", "--help"], cwd=ROOT, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert f"--{flag}" in run.stdout and f"--{flag.replace('_', '-')}" in run.stdout and "--output_dir" in run.stdout


def base_args(tiny_backbone, tmp_path, output="run"):
    return [
        "--model_name_or_path", tiny_backbone,
        "--dataset", "pets_controversial",
        "--data_dir", str(tmp_path / "data"),
        "--max_train_samples", "96",
        "--max_eval_samples", "40",
        "--latent_dim", "8",
        "--hidden_dim", "16",
        "--max_steps", "4",
        "--per_device_train_batch_size", "8",
        "--report_to", "none",
        "--save_strategy", "no",
        "--embedding_mode", "frozen",
        "--output-dir", str(tmp_path / output),  # the dashed spelling of --output_dir
    ]


def test_recipe_trains_evaluates_and_writes_results(tiny_backbone, tmp_path, capsys):
    results = train_reward.main(base_args(tiny_backbone, tmp_path) + ["--model_type", "vae",
                                                                      "--extra_eval_datasets", "pets"])
    saved = json.loads((tmp_path / "run" / "eval_results.json").read_text())
    assert saved == json.loads(json.dumps(results))
    assert saved["model_type"] == "vae" and saved["dataset"] == "pets_controversial"
    assert saved["n_eval"] == 40 and set(saved["per_user"]) == {"helpful", "harmless"}
    assert {"kl", "active_units", "accuracy"} <= set(saved)
    assert set(saved["by_test_set"]) == {"pets_controversial", "pets"}
    assert (tmp_path / "run" / "model.safetensors").exists()
    assert "| vae on pets_controversial |" in capsys.readouterr().out


def test_recipe_reads_a_yaml_config_and_refuses_to_overwrite(tiny_backbone, tmp_path):
    config = tmp_path / "recipe.yaml"
    config.write_text("model_type: base\nlearning_rate: 1.0e-3\n")
    results = train_reward.main(base_args(tiny_backbone, tmp_path, "yaml") + ["--config", str(config)])
    assert results["model_type"] == "base" and "kl" not in results
    before = (tmp_path / "yaml" / "eval_results.json").read_bytes()
    with pytest.raises(SystemExit, match="not empty.*--overwrite_output_dir"):
        train_reward.main(base_args(tiny_backbone, tmp_path, "yaml") + ["--model_type", "base"])
    assert (tmp_path / "yaml" / "eval_results.json").read_bytes() == before
    train_reward.main(base_args(tiny_backbone, tmp_path, "yaml") + ["--model_type", "vae", "--overwrite_output_dir"])
    assert json.loads((tmp_path / "yaml" / "eval_results.json").read_text())["model_type"] == "vae"


def test_report_prints_runs_side_by_side(tiny_backbone, tmp_path, capsys):
    from vpl_trl.evaluation.report import main as report

    for model_type in ("vae", "base"):
        train_reward.main(base_args(tiny_backbone, tmp_path, model_type) + ["--model_type", model_type])
    capsys.readouterr()
    report([str(tmp_path / "vae"), str(tmp_path / "base")])
    out = capsys.readouterr().out
    assert "Test set: pets_controversial" in out and "| vae |" in out and "| base |" in out
    with pytest.raises(SystemExit, match="eval_results.json not found"):
        report([str(tmp_path / "missing")])


def test_baselines_train_on_data_without_users_but_vpl_needs_them(tiny_backbone, tmp_path):
    from vpl_trl.data import PreferenceDataError, read_jsonl, write_jsonl
    from vpl_trl.data.pets import build_pets

    build_pets(tmp_path / "pets", n_train_per_user=40, n_test_per_user=10)
    for split in ("train", "test"):
        rows = [
            {k: v for k, v in r.items() if k != "user_id"} for r in read_jsonl(tmp_path / "pets" / f"{split}.jsonl")
        ]
        write_jsonl(rows, tmp_path / "anonymous" / f"{split}.jsonl")
    args = base_args(tiny_backbone, tmp_path, "anon") + ["--dataset", str(tmp_path / "anonymous")]
    assert train_reward.main(args + ["--model_type", "base"])["n_eval"] == 20
    with pytest.raises(PreferenceDataError, match="missing field `user_id`"):
        train_reward.main(args + ["--model_type", "vae", "--overwrite_output_dir"])
