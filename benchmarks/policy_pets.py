"""Personalized policy optimization on Pets: one policy per user against one conditioned policy for every user,
each trained for the same wall-time budget; one results file and `summary.json`.

    python benchmarks/policy_pets.py --output_dir DIR [--full] [--budget_seconds 1200] [--reward_model DIR]
        [--results benchmarks/results/policy_pets.md] [-- RECIPE FLAGS]

Without `--reward_model`, it first trains the VPL reward model on Pets controversial (`pets_demo.yaml`, frozen
SmolLM2). Then each mode runs `recipes/ppo_personalized.py` with `recipes/configs/ppo_pets.yaml` and
`--max_train_seconds BUDGET` (both users together): `per_user` (GRPO, one adapter per user) and the recipe's
default conditioned mode (latent conditioning, DPO on reward-ranked pairs). `--full` adds the other conditioned
combinations (text conditioning; best-of-n distillation; GRPO), on the same budget. A finished mode is
reused with `--reuse`.

`DIR/summary.json`: `{"modes": {NAME: {"default", "train_seconds", "seconds_per_step", "users": {USER:
{"own_before", "own_after", "margin", "margin_ci95"}}}}, "seconds"}`, where `margin` is the user's own reward minus
the other user's policy's reward under this user's reward, after training, with its 95% bootstrap interval over
the evaluation samples. The results file adds the matrices, the learning curves (`*_curves.png`), the share of
answers naming each kind of pet and each policy's best answer.
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

from vpl_trl.scripts import ppo_personalized, train_reward

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "recipes" / "configs" / "ppo_pets.yaml"
REWARD_CONFIG = ROOT / "recipes" / "configs" / "pets_demo.yaml"
# name: (recipe flags, whether it is the recipe's default conditioned mode)
MODES = {
    "per_user": (["--mode", "per_user", "--signal", "grpo"], False),
    "conditioned_latent_dpo": (["--mode", "conditioned", "--conditioning", "latent", "--signal", "dpo"], True),
}
FULL_MODES = {
    "conditioned_latent_bon_sft": (["--mode", "conditioned", "--conditioning", "latent", "--signal", "bon_sft"], False),
    "conditioned_text_bon_sft": (["--mode", "conditioned", "--conditioning", "text", "--signal", "bon_sft"], False),
    "conditioned_latent_grpo": (["--mode", "conditioned", "--conditioning", "latent", "--signal", "grpo"], False),
    "conditioned_text_grpo": (["--mode", "conditioned", "--conditioning", "text", "--signal", "grpo"], False),
    "conditioned_text_dpo": (["--mode", "conditioned", "--conditioning", "text", "--signal", "dpo"], False),
}
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


def matrix_table(matrix: dict[str, dict[str, float]]) -> list[str]:
    users = list(matrix)
    lines = ["| policy for \\ reward of | " + " | ".join(users) + " |", "|---|" + "---|" * len(users)]
    lines += [f"| {a} | " + " | ".join(f"{matrix[a][b]:+.2f}" for b in users) + " |" for a in users]
    return lines


def mode_summary(results: dict, default: bool) -> dict:
    runs = results["runs"].values()
    steps = sum(run["steps"] for run in runs)
    seconds = {key: sum(run["seconds"][key] for run in runs) for key in ("generation", "scoring", "update")}
    margins, intervals = results["personalization_margin_after"], results["personalization_margin_ci95_after"]
    return {
        "default": default,
        "signal": results["signal"],
        "conditioning": results["conditioning"]["kind"],
        "train_seconds": results["train_seconds"],
        "steps": steps,
        "seconds_per_step": {key: value / max(steps, 1) for key, value in seconds.items()},
        "users": {
            user: {"own_before": own["before"], "own_after": own["after"], "gain": own["gain"],
                   "margin": margins[user], "margin_ci95": list(intervals[user])}
            for user, own in results["own_reward"].items()
        },
    }


def curves(results: dict) -> dict[str, list[tuple[float, float]]]:
    """Each user's on-policy reward against training seconds."""
    points: dict[str, list[tuple[float, float]]] = {}
    for run in results["runs"].values():
        per_step = run["train_seconds"] / max(run["steps"], 1)
        for point in run.get("curve", []):
            seconds = point.get("seconds", point["step"] * per_step)
            for key, value in point.items():
                if key.startswith("reward/"):
                    points.setdefault(key.removeprefix("reward/"), []).append((seconds, value))
    return points


def plot_curves(all_results: dict[str, dict], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    users = sorted({u for results in all_results.values() for u in results["users"]})
    figure, axes = plt.subplots(1, len(users), figsize=(5.5 * len(users), 4), constrained_layout=True, squeeze=False)
    for axis, user in zip(axes[0], users):
        for name, results in all_results.items():
            xs_ys = sorted(curves(results).get(user, []))
            if xs_ys:
                axis.plot([x / 60 for x, _ in xs_ys], [y for _, y in xs_ys], marker=".", label=name)
        axis.set_title(f"{user}: VPL reward of the policy's own samples")
        axis.set_xlabel("training minutes")
        axis.set_ylabel(f"reward under {user}'s z")
        axis.legend(fontsize=7)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def mode_section(name: str, run_dir: Path, summary: dict, results_dir: Path, stem: str) -> list[str]:
    results = json.loads((run_dir / "eval_results.json").read_text())
    records = [json.loads(line) for line in (run_dir / "eval_completions.jsonl").read_text().splitlines()]
    users = results["users"]
    png = results_dir / f"{stem}_{name}_matrix.png"
    shutil.copyfile(run_dir / "eval_matrix.png", png)
    per_step = summary["seconds_per_step"]
    lines = [
        f"## `{name}`{' (the recipe default)' if summary['default'] else ''}", "",
        f"Signal `{results['signal']}`, conditioning `{results['conditioning']['kind']}`; {summary['steps']} steps "
        f"in {summary['train_seconds'] / 60:.1f} min of training (" + ", ".join(
            f"{run_name}: {run['steps']} steps in {run['train_seconds']:.0f} s"
            for run_name, run in results["runs"].items()
        ) + f"). Per step: generation {per_step['generation']:.1f} s, reward scoring {per_step['scoring']:.1f} s, "
        f"update {per_step['update']:.1f} s. Evaluated on {results['eval_prompts']} held-out prompts x "
        f"{results['eval_samples_per_prompt']} samples per user"
        + (", each user conditioned on pairs from the test split (as a new user)"
           if results.get("eval_contexts_held_out")
           else "") + ".", "",
        "| user | own reward before | after | gain | margin after | margin 95% CI |", "|---|---|---|---|---|---|",
    ]
    for user, values in summary["users"].items():
        low, high = values["margin_ci95"]
        lines.append(f"| {user} | {values['own_before']:+.2f} | {values['own_after']:+.2f} | {values['gain']:+.2f} | "
                     f"{values['margin']:+.2f} | [{low:+.2f}, {high:+.2f}] |")
    lines += ["", "Cross-user matrix after training:", "", *matrix_table(results["matrix_after"]), ""]
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
    return lines + ["", f"![cross-user matrix]({png.name})", ""]


def comparison_table(summary: dict) -> list[str]:
    lines = ["| mode | default | train min | " + " | ".join(
        f"{u} gain | {u} margin [95% CI]" for u in next(iter(summary.values()))["users"]) + " |"]
    lines.append("|---|---|---|" + "---|---|" * len(next(iter(summary.values()))["users"]))
    for name, mode in summary.items():
        cells = []
        for values in mode["users"].values():
            low, high = values["margin_ci95"]
            cells += [f"{values['gain']:+.2f}", f"{values['margin']:+.2f} [{low:+.2f}, {high:+.2f}]"]
        lines.append(f"| `{name}` | {'yes' if mode['default'] else ''} | {mode['train_seconds'] / 60:.1f} | "
                     + " | ".join(cells) + " |")
    return lines


def train_reward_model(folder: Path) -> str:
    if not (folder / "config.json").exists():
        train_reward.main(["--config", str(REWARD_CONFIG), "--model_type", "vae", "--dataset", "pets_controversial",
                           "--output_dir", str(folder), "--overwrite_output_dir"])
    return str(folder)


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output_dir", "--output-dir", default="outputs/policy-pets")
    parser.add_argument("--reward_model", "--reward-model", default=None,
                        help="A trained Pets-controversial VPL reward model (default: train one into OUTPUT_DIR).")
    parser.add_argument("--budget_seconds", "--budget-seconds", type=float, default=1200,
                        help="Training wall time of each mode, both users together (default: 20 min).")
    parser.add_argument("--full", action="store_true", help="Also the other conditioning/signal combinations.")
    parser.add_argument("--modes", nargs="*", default=None, help="Only these modes.")
    parser.add_argument("--results", default="benchmarks/results/policy_pets.md")
    parser.add_argument("--reuse", action="store_true", help="Summarize finished modes instead of training again.")
    parser.add_argument("--note", default="", help="A paragraph on the run's conditions, written under the title.")
    args = parser.parse_args(argv)
    shown = [a for i, a in enumerate(argv) if a != "--note" and (i == 0 or argv[i - 1] != "--note")]
    command = " ".join(["python benchmarks/policy_pets.py", *shown, *(["--", *extra] if extra else [])])

    start = time.perf_counter()
    output_dir = Path(args.output_dir)
    reward_model = args.reward_model or train_reward_model(output_dir / "reward-vae-controversial")
    modes = {**MODES, **(FULL_MODES if args.full else {})}
    if args.modes:
        modes = {name: modes[name] for name in args.modes}
    results_path = Path(args.results)
    results_path.parent.mkdir(parents=True, exist_ok=True)
    all_results, summary, trained = {}, {}, False
    for name, (flags, default) in modes.items():
        run_dir = output_dir / name
        if not (args.reuse and (run_dir / "eval_results.json").exists()):
            trained = True
            ppo_personalized.main(["--config", str(CONFIG), "--reward_model", reward_model, *flags, "--max_steps",
                                   "100000", "--max_train_seconds", str(args.budget_seconds), "--output_dir",
                                   str(run_dir), *extra])
        all_results[name] = json.loads((run_dir / "eval_results.json").read_text())
        summary[name] = mode_summary(all_results[name], default)
    seconds = time.perf_counter() - start
    (output_dir / "summary.json").write_text(json.dumps({"modes": summary, "seconds": seconds}, indent=2))

    curve_png = plot_curves(all_results, results_path.parent / f"{results_path.stem}_curves.png")
    lines = [
        "# Personalized policy optimization on Pets", "",
        f"`{command}` ({f'{seconds / 60:.0f} min in all' if trained else 'summarizing finished runs'}). "
        f"Reward model `{reward_model}` "
        f"(VPL on Pets controversial, frozen SmolLM2); policy: the embedded SmolLM2-135M-Instruct with a LoRA adapter; "
        f"recipe config `{CONFIG.relative_to(ROOT)}`{' plus ' + ' '.join(extra) if extra else ''}; each mode trains "
        f"for {args.budget_seconds / 60:.0f} min of wall time, both users together. Machine: {platform.machine()}, "
        f"{torch.get_num_threads()} threads, "
        f"{'GPU ' + torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU'}; "
        f"{time.strftime('%Y-%m-%d')}.",
        *(["", args.note] if args.note else []),
        "", "`margin`: the user's own reward minus the other user's policy's reward under this user's reward, after "
        "training, with a 95% bootstrap interval over the evaluation samples.", "",
        *comparison_table(summary), "", f"![learning curves]({curve_png.name})", "",
    ]
    for name in modes:
        lines += mode_section(name, output_dir / name, summary[name], results_path.parent, results_path.stem)
    results_path.write_text("\n".join(lines))
    print("\n".join(comparison_table(summary)))
    print(f"Wrote {output_dir / 'summary.json'} and {results_path}")


if __name__ == "__main__":
    main()
