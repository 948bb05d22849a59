"""Personalized policy optimization on Pets: train with `recipes/ppo_personalized.py` in each mode, then write
one results file.

    python benchmarks/policy_pets.py --reward_model outputs/demo/vae-controversial --modes per_user conditioned \
        --output_dir outputs/policy-pets --results benchmarks/results/policy_pets.md [-- RECIPE FLAGS]

Each mode runs the recipe's `main` with `recipes/configs/ppo_pets.yaml` (50 steps per policy; the one conditioned
policy, serving both users, gets `--conditioned_max_steps`, 100; flags after `--` are added), unless
`--reuse` is given and its `eval_results.json` exists. The results file gives, per mode: steps and time, each
user's own reward before and after, the cross-user matrices, whether the matrix after training is diagonal-
dominant (each user's reward is highest on their own policy's answers), how often the answers name each kind of
pet before and after, and an example answer per user; the heatmaps are copied beside it.
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import shutil
import sys
import time
from collections import Counter
from pathlib import Path

import torch
from recipe_loader import load_recipe

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "recipes" / "configs" / "ppo_pets.yaml"
KIND_WORDS = {
    "dog": r"\b(dogs?|pupp(y|ies)|retrievers?|terriers?|beagles?|poodles?|spaniels?)\b",
    "cat": r"\b(cats?|kittens?|kitty|feline)\b",
    "bird": r"\b(birds?|budgies?|canar(y|ies)|parrots?|parakeets?|finch(es)?|cockatiels?)\b",
    "rabbit": r"\b(rabbits?|bunn(y|ies))\b",
}


def kind_rates(records: list[dict]) -> dict[str, float]:
    """The fraction of answers that name each kind of pet."""
    counts = Counter(
        kind for r in records for kind, pattern in KIND_WORDS.items() if re.search(pattern, r["completion"], re.I)
    )
    return {kind: counts[kind] / len(records) for kind in KIND_WORDS}


def diagonal_dominant(matrix: dict[str, dict[str, float]]) -> bool:
    """Whether each user's reward is highest on the answers of the policy for that user."""
    users = list(matrix)
    return all(matrix[u][u] > matrix[v][u] for u in users for v in users if v != u)


def matrix_table(matrix: dict[str, dict[str, float]]) -> list[str]:
    users = list(matrix)
    lines = ["| policy for \\ reward of | " + " | ".join(users) + " |", "|---|" + "---|" * len(users)]
    lines += [f"| {a} | " + " | ".join(f"{matrix[a][b]:+.2f}" for b in users) + " |" for a in users]
    return lines


def run_section(title: str, run_dir: Path, results_dir: Path, stem: str) -> list[str]:
    """The tables of one finished recipe run (completions' details when it wrote `eval_completions.jsonl`)."""
    results = json.loads((run_dir / "eval_results.json").read_text())
    completions = run_dir / "eval_completions.jsonl"
    records = [json.loads(line) for line in completions.read_text().splitlines()] if completions.exists() else []
    users = results["users"]
    steps = sum(run["steps"] for run in results["runs"].values())
    seconds = sum(run["train_seconds"] for run in results["runs"].values())
    png = results_dir / f"{stem}_{re.sub(r'[^a-z0-9]+', '_', title.lower()).strip('_')}_matrix.png"
    shutil.copyfile(run_dir / "eval_matrix.png", png)
    lines = [
        f"## {title}", "",
        f"Run folder `{run_dir}`, mode `{results['mode']}`, reward model `{results['reward_model']}`.", "",
        f"{steps} GRPO steps in {seconds / 60:.1f} min ({seconds / steps:.1f} s/step; "
        + ", ".join(f"{name}: {run['steps']} in {run['train_seconds']:.0f} s" for name, run in results["runs"].items())
        + f"); evaluated on {results['eval_prompts']} held-out prompts x {results['eval_samples_per_prompt']} "
        f"samples per user (prompts held out: {results['eval_prompts_held_out']}"
        + (f", preambles from held-out pairs: {results['eval_preambles_held_out']}"
           if "eval_preambles_held_out" in results else "")
        + ").", "",
        "| user | own reward before | after | gain | margin over the other policy, after |", "|---|---|---|---|---|",
    ]
    margins = results.get("personalization_margin_after", {})
    for user in users:
        own = results["own_reward"][user]
        cells = [own["before"], own["after"], own["gain"], margins.get(user, 0.0)]
        lines.append(f"| {user} | " + " | ".join(f"{value:+.2f}" for value in cells) + " |")
    lines += ["", "Cross-user matrix before training:", "", *matrix_table(results["matrix_before"]), ""]
    lines += ["Cross-user matrix after training:", "", *matrix_table(results["matrix_after"]), ""]
    lines += [f"Diagonal-dominant after training: **{diagonal_dominant(results['matrix_after'])}** "
              f"(before: {diagonal_dominant(results['matrix_before'])}).", ""]
    if not records:
        return lines + [f"![cross-user matrix]({png.name})", ""]
    lines += ["Share of answers naming each kind of pet:", "",
              "| policy for | stage | " + " | ".join(KIND_WORDS) + " |", "|---|---|" + "---|" * len(KIND_WORDS)]
    for user in users:
        for stage in ("before", "after"):
            rates = kind_rates([r for r in records if r["policy_for"] == user and r["stage"] == stage])
            lines.append(f"| {user} | {stage} | " + " | ".join(f"{rates[k]:.0%}" for k in KIND_WORDS) + " |")
    lines += ["", "The best-rewarded answer of each policy after training (reward under its own user):", ""]
    for user in users:
        after = [r for r in records if r["policy_for"] == user and r["stage"] == "after"]
        best = max(after, key=lambda r: r["rewards"][user])
        lines.append(f"- **{user}** ({best['rewards'][user]:+.2f}): {' '.join(best['completion'].split())!r}")
    lines += ["", f"![cross-user matrix]({png.name})", ""]
    return lines


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reward_model", "--reward-model", required=True)
    parser.add_argument("--modes", nargs="*", default=["per_user", "conditioned"], choices=["per_user", "conditioned"])
    parser.add_argument("--output_dir", "--output-dir", default="outputs/policy-pets")
    parser.add_argument("--results", default="benchmarks/results/policy_pets.md")
    parser.add_argument("--conditioned_max_steps", type=int, default=100,
                        help="Steps of the one conditioned policy: the per-user runs' 50 steps times two users.")
    parser.add_argument("--reuse", action="store_true", help="Summarize existing runs instead of training again.")
    parser.add_argument("--also", nargs="*", default=[], metavar="TITLE=DIR",
                        help="Finished recipe runs to summarize too (not trained here), e.g. on another reward model.")
    args = parser.parse_args(argv)

    results_path = Path(args.results)
    results_path.parent.mkdir(parents=True, exist_ok=True)
    lines = [
        "# Personalized policy optimization on Pets", "",
        f"Reward model `{args.reward_model}`; policy: the embedded SmolLM2-135M-Instruct with a LoRA adapter; "
        f"recipe config `{CONFIG.relative_to(ROOT)}`{' plus ' + ' '.join(extra) if extra else ''}. "
        f"Machine: {platform.machine()}, {torch.get_num_threads()} threads, "
        f"{'GPU ' + torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU'}; "
        f"{time.strftime('%Y-%m-%d')}.", "",
    ]
    recipe = None
    for mode in args.modes:
        run_dir = Path(args.output_dir) / mode
        if not (args.reuse and (run_dir / "eval_results.json").exists()):
            recipe = recipe or load_recipe("ppo_personalized")
            steps = ["--max_steps", str(args.conditioned_max_steps)] if mode == "conditioned" else []
            recipe.main(["--config", str(CONFIG), "--reward_model", args.reward_model, "--mode", mode,
                         "--output_dir", str(run_dir), *steps, *extra])
        lines += run_section(f"`{mode}`", run_dir, results_path.parent, results_path.stem)
    for item in args.also:
        title, _, folder = item.rpartition("=")
        lines += run_section(title or folder, Path(folder), results_path.parent, results_path.stem)
    results_path.write_text("\n".join(lines))
    print(f"Wrote {results_path}")


if __name__ == "__main__":
    main()
