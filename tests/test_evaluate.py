"""`python -m vpl_trl.evaluate` end to end on tiny trained models: the files it writes, what they hold, and
its refusal to write over earlier results."""

import json

import pytest

from vpl_trl import VPLRewardConfig, VPLRewardTrainer
from vpl_trl.data import build_pets, load_preference_splits
from vpl_trl.evaluation.cli import main


@pytest.fixture(scope="module")
def pets_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pets-eval")
    build_pets(folder, n_train_per_user=100, n_test_per_user=30, seed=0)
    return folder


def train_and_save(backbone, data_dir, folder, model_type, epochs):
    args = VPLRewardConfig(
        output_dir=str(folder), model_type=model_type, latent_dim=8, hidden_dim=64, num_train_epochs=epochs,
        per_device_train_batch_size=16, learning_rate=1e-2, report_to="none", save_strategy="no", pooling="mean",
        num_context="4", disable_tqdm=True, embedding_mode="frozen",
    )
    trainer = VPLRewardTrainer(model=backbone, args=args, train_dataset=load_preference_splits(data_dir)["train"])
    trainer.train()
    trainer.save_model(str(folder))
    return str(folder)


@pytest.fixture(scope="module")
def vae_dir(tiny_backbone, pets_dir, tmp_path_factory):
    return train_and_save(tiny_backbone, pets_dir, tmp_path_factory.mktemp("vae"), "vae", epochs=5)


@pytest.fixture(scope="module")
def base_dir(tiny_backbone, pets_dir, tmp_path_factory):
    return train_and_save(tiny_backbone, pets_dir, tmp_path_factory.mktemp("base"), "base", epochs=1)


QUICK = ["--num_context", "4", "--context_sizes", "1", "4", "--context_draws", "2", "--batch_size", "32"]


def test_vae_report_with_context_curve_latent_diagnostics_and_active_queries(vae_dir, pets_dir, tmp_path):
    out = tmp_path / "eval"
    metrics = main(["--model", vae_dir, "--dataset", str(pets_dir), "--output-dir", str(out), *QUICK,
                    "--active", "--active_users", "1", "--active_queries", "2", "--active_candidates", "8",
                    "--active_samples", "16"])
    written = {p.name for p in out.iterdir()}
    assert written == {"metrics.json", "report.md", "accuracy.png", "accuracy_vs_context.png", "latent_pca.png",
                       "active_queries.png"}
    assert json.loads((out / "metrics.json").read_text())["accuracy"] == metrics["accuracy"]
    assert metrics["n_eval"] == 60 and set(metrics["per_user_breakdown"]) == {"helpful", "harmless"}
    assert metrics["controversial_accuracy"] >= 0.6  # the tiny VPL learned both users (test sentences are new)
    assert metrics["context_swap"]["controversial_accuracy"] <= metrics["controversial_accuracy"] - 0.2
    assert metrics["active_units"] > 0 and metrics["kl"] > 0
    assert set(metrics["probe"]) >= {"trained", "untrained", "chance"}
    assert metrics["probe"]["trained"] > metrics["probe"]["chance"]
    curve = metrics["context_curve"]
    assert curve["k"] == [1, 4] and all(len(row) == 2 for row in curve["accuracy"])
    active = metrics["active_queries"]
    assert active["queries"] == [0, 1, 2] and active["num_simulated_users"] == 2
    assert len(active["active"]["accuracy"]) == 3 and len(active["random"]["accuracy"][0]) == 2
    report = (out / "report.md").read_text()
    for section in ("## Accuracy", "## Latent diagnostics", "untrained encoder", "context swap",
                    "## Accuracy against the number of context pairs", "## Active queries", "latent_pca.png"):
        assert section in report
    for name in ("accuracy.png", "accuracy_vs_context.png", "latent_pca.png", "active_queries.png"):
        assert (out / name).read_bytes()[:4] == b"\x89PNG"


def test_the_recipe_s_test_numbers_are_reproduced(vae_dir, pets_dir, tmp_path):
    """With the training seed and K, the contexts are the ones the recipe drew, hence the same accuracy."""
    from vpl_trl.evaluation.metrics import evaluate_reward_model
    from vpl_trl.models import VPLRewardModel

    splits = load_preference_splits(pets_dir)
    trainer = VPLRewardTrainer(
        model=VPLRewardModel.from_pretrained(vae_dir),
        args=VPLRewardConfig(
            output_dir=str(tmp_path / "t"), report_to="none", num_context="4", seed=42, disable_tqdm=True
        ),
        train_dataset=splits["train"],
    )
    expected = evaluate_reward_model(trainer, splits["test"], name=f"test-{pets_dir}")
    metrics = main(["--model", vae_dir, "--dataset", str(pets_dir), "--output_dir", str(tmp_path / "eval"), *QUICK])
    assert metrics["accuracy"] == expected["accuracy"]
    assert metrics["context_swap"] == expected["context_swap"]


def test_baseline_gets_the_accuracy_tables_only_and_existing_results_are_kept(base_dir, pets_dir, tmp_path):
    out = tmp_path / "eval"
    argv = ["--model", base_dir, "--dataset", str(pets_dir), "--output_dir", str(out), *QUICK]
    metrics = main(argv)
    assert {p.name for p in out.iterdir()} == {"metrics.json", "report.md", "accuracy.png"}
    assert not {"context_curve", "probe", "kl", "context_swap"} & set(metrics)
    assert "no user latent" in (out / "report.md").read_text()

    (out / "metrics.json").write_text("{}")
    with pytest.raises(SystemExit, match="--overwrite"):
        main(argv)
    assert (out / "metrics.json").read_text() == "{}"  # refused before writing anything
    main([*argv, "--overwrite"])
    assert json.loads((out / "metrics.json").read_text())["accuracy"] == metrics["accuracy"]

    with pytest.raises(SystemExit, match="vae"):
        main(["--model", base_dir, "--dataset", str(pets_dir), "--output_dir", str(tmp_path / "active"), "--active"])
