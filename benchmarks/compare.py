"""Train and evaluate VPL and its baselines on one dataset with several seeds; write one side-by-side table.

    python benchmarks/compare.py --dataset pets --seeds 0 1 2 \
        --output_dir outputs/compare-pets --results benchmarks/results/compare_pets.md [-- RECIPE FLAGS]

Every run calls the reward recipe's `main` (`vpl_trl.scripts.train_reward`; flags after `--` replace the default
training flags, the good Pets settings on the embedded model) and keeps its `eval_results.json` under
`--output_dir`. The table gives the mean and the spread (standard deviation over seeds, and the range) of the test
accuracy overall, per user, on controversial and agreed pairs, the context-swap accuracy of VPL, and each run's wall
time.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from vpl_trl.scripts import train_reward

MODEL_TYPES = ("vae", "base", "mean_and_variance", "categorical")
DEFAULT_FLAGS = [
    "--latent_dim", "512", "--hidden_dim", "512", "--learning_rate", "3e-4", "--pooling", "mean",
    "--num_train_epochs", "2", "--per_device_train_batch_size", "32",
]


def run_one(model_type: str, seed: int, dataset: str, data_dir: str, output_dir: Path, flags: list[str]) -> dict:
    argv = [
        "--model_type", model_type, "--dataset", dataset, "--data_dir", data_dir, "--seed", str(seed),
        "--output_dir", str(output_dir), "--overwrite_output_dir", "--report_to", "none", "--save_strategy", "no",
        "--disable_tqdm", "true", *flags,
    ]
    start = time.perf_counter()
    results = train_reward.main(argv)
    results["wall_time_s"] = time.perf_counter() - start
    (output_dir / "eval_results.json").write_text(json.dumps(results, indent=2))
    return results


def summarize(values: list[float | None]) -> str:
    """`mean ± std [min-max]` of accuracies in percent (std over seeds; '-' when absent)."""
    values = [100 * v for v in values if v is not None]
    if not values:
        return "-"
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.1f} ± {std:.1f} [{min(values):.1f}-{max(values):.1f}]"


def summarize_seconds(values: list[float]) -> str:
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.0f} ± {std:.0f}"


def comparison_table(runs: dict[str, list[dict]]) -> str:
    """One row per model type: accuracy mean ± std [range] over seeds, per user and per pair type."""
    users = sorted({u for results in runs.values() for r in results for u in r.get("per_user", {})})
    header = ["model", "seeds", "accuracy", *[f"user {u}" for u in users], "controversial", "agreed",
              "controversial, swapped context", "run time (s)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for model_type, results in runs.items():
        cells = [model_type, str(len(results)), summarize([r.get("accuracy") for r in results])]
        cells += [summarize([r.get("per_user", {}).get(u) for r in results]) for u in users]
        cells += [summarize([r.get("controversial_accuracy") for r in results]),
                  summarize([r.get("agreed_accuracy") for r in results]),
                  summarize([(r.get("context_swap") or {}).get("controversial_accuracy") for r in results]),
                  summarize_seconds([r["wall_time_s"] for r in results])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def per_run_table(runs: dict[str, list[dict]], seeds: list[int]) -> str:
    header = ["model", "seed", "accuracy", "controversial", "agreed", "KL", "active units", "run time (s)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for model_type, results in runs.items():
        for seed, r in zip(seeds, results):
            pct = lambda v: "-" if v is None else f"{100 * v:.1f}"  # noqa: E731
            kl = r.get("kl")
            cells = [model_type, str(seed), pct(r.get("accuracy")), pct(r.get("controversial_accuracy")),
                     pct(r.get("agreed_accuracy")), "-" if kl is None else f"{kl:.1f}",
                     str(r.get("active_units", "-")), f"{r['wall_time_s']:.0f}"]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_comparison(runs: dict[str, list[dict]], path: Path, title: str) -> None:
    """Accuracy on all, controversial and agreed pairs per model type: mean over seeds ± std, each seed a dot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    keys = [("accuracy", "all pairs"), ("controversial_accuracy", "controversial"), ("agreed_accuracy", "agreed")]
    fig, ax = plt.subplots(figsize=(2.2 + 1.8 * len(runs), 4))
    width = 0.8 / len(keys)
    for i, (key, label) in enumerate(keys):
        positions = np.arange(len(runs)) + (i - 1) * width
        values = [[100 * r[key] for r in results if r.get(key) is not None] for results in runs.values()]
        means = [np.mean(v) if v else 0.0 for v in values]
        bars = ax.bar(positions, means, width, yerr=[np.std(v) if v else 0.0 for v in values], capsize=3, label=label)
        ax.bar_label(bars, fmt="%.0f", fontsize=8, padding=2)
        for position, seeds in zip(positions, values):
            ax.scatter([position] * len(seeds), seeds, color="black", s=8, zorder=3)
    ax.axhline(50, color="grey", linestyle=":", linewidth=1)
    ax.set_xticks(np.arange(len(runs)), list(runs))
    ax.set_ylim(0, 125)
    ax.set_yticks(range(0, 101, 20))
    ax.set_ylabel("test pairwise accuracy (%)")
    ax.set_title(title, fontsize=10)
    ax.legend(loc="upper center", ncol=len(keys), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict[str, list[dict]]:
    argv = sys.argv[1:] if argv is None else argv
    command = " ".join(argv)
    recipe_flags = DEFAULT_FLAGS
    if "--" in argv:
        split = argv.index("--")
        argv, recipe_flags = argv[:split], argv[split + 1:]
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="pets")
    parser.add_argument("--data_dir", "--data-dir", default="data")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--model_types", "--model-types", nargs="+", default=list(MODEL_TYPES), choices=MODEL_TYPES)
    parser.add_argument("--output_dir", "--output-dir", default="outputs/compare")
    parser.add_argument("--results", help="Markdown file for the table (default: OUTPUT_DIR/compare.md).")
    args = parser.parse_args(argv)

    output_dir = Path(args.output_dir)
    load_at_start = os.getloadavg()[0]
    runs: dict[str, list[dict]] = {}
    for model_type in args.model_types:
        for seed in args.seeds:
            run_dir = output_dir / f"{model_type}-seed{seed}"
            print(f"=== {model_type}, seed {seed} -> {run_dir}", flush=True)
            runs.setdefault(model_type, []).append(
                run_one(model_type, seed, args.dataset, args.data_dir, run_dir, recipe_flags)
            )

    results_path = Path(args.results) if args.results else output_dir / "compare.md"
    results_path.parent.mkdir(parents=True, exist_ok=True)
    plot_path = results_path.with_suffix(".png")
    plot_comparison(runs, plot_path, f"{args.dataset}: mean ± std over seeds {args.seeds} (dots: single seeds)")
    report = "\n".join([
        f"# {args.dataset}: VPL against its baselines ({len(args.seeds)} seeds)",
        "",
        f"Command: `python benchmarks/compare.py {command}`; recipe flags: `{' '.join(recipe_flags)}`.  ",
        f"Machine: {platform.machine()}, {os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads, torch "
        f"{torch.__version__}; load average (1 min) {load_at_start:.1f} at the start, {os.getloadavg()[0]:.1f} at the "
        "end (other work on the same cores slows runs unevenly: compare run times with care).",
        "",
        "Test pairwise accuracy in %: mean ± standard deviation over seeds [min-max]. \"Controversial, swapped "
        "context\": VPL's accuracy on controversial pairs when each example gets another user's context (a model "
        "whose reward uses the latent drops far below 50%). Run time: wall time of the recipe's `main` (model "
        "loading, training on cached embeddings, evaluation).",
        "",
        comparison_table(runs),
        "",
        f"![accuracy by model type]({plot_path.name})",
        "",
        "## Per run",
        "",
        per_run_table(runs, args.seeds),
        "",
    ])
    results_path.write_text(report)
    (output_dir / "compare.json").write_text(json.dumps(runs, indent=2))
    print(report)
    return runs


if __name__ == "__main__":
    main()
