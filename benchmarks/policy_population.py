"""One conditioned policy for many users, measured on NEW users' true utility: the simulated population's ground
truth (`vpl_trl.data.population`), not the VPL reward that the policy was trained against.

    python benchmarks/policy_population.py --output_dir DIR [--budget_seconds 900] [--train_users 16]
        [--new_users 16] [--results benchmarks/results/policy_population.md] [--reuse] [-- RECIPE FLAGS]

It builds the population data set (its defaults), trains the VPL reward model (`recipes/configs/population.yaml`)
and a Bradley-Terry reward model with the same settings, then two policies with `recipes/ppo_personalized.py`
and `recipes/configs/ppo_population.yaml`, each for the same wall-time budget on the same training users and
training prompts:

- `conditioned`: one latent-conditioned policy (`z` as a soft prompt) trained by best-of-n distillation against
  the VPL reward;
- `bt_blind`: one user-blind policy (`--mode shared`, best-of-n distillation too) against the Bradley-Terry reward,
  the standard RLHF policy.

Then `--new_users` users never seen in training (neither by the reward model nor by the policy) each bring 16 of
their own labelled pairs; on held-out prompts (and, to tell new users from new prompts apart, on the training
prompts), the conditioned policy serves each one from their `z`, and every answer is scored by each user's TRUE
utility. Compared: the untrained policy, the Bradley-Terry policy, best-of-n
of the untrained policy's samples under the user's VPL reward (personalization at inference time) and the
conditioned policy, with 95% bootstrap intervals over users and samples. Reward hacking: each training round's
candidates, scored by the reward the policy was trained against and by the true utility of the same users
(`*_hacking.png`).

Writes `DIR/summary.json` (`{"new_users": {"utility": {POLICY: {"mean", "ci95", "vpl_reward"}}, "gains": {BASELINE:
{"mean", "ci95", "users_gaining"}}}, "new_users_training_prompts": {...}, "rounds": {POLICY: [{"round", "reward",
"utility"}]}, "training": {...}, "seconds"}`), the results file and its PNGs. `--reuse` keeps the trained models
and the scored answers found in DIR.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from vpl_trl.data.format import load_preference_splits  # noqa: E402
from vpl_trl.data.population import Population, build_population  # noqa: E402
from vpl_trl.embedded_model import DEFAULT_MODEL  # noqa: E402
from vpl_trl.evaluation.diagnostics import headless_pyplot  # noqa: E402
from vpl_trl.inference.generation import GenerationSettings, generate_candidates  # noqa: E402
from vpl_trl.inference.scoring import PersonalizedRewardScorer  # noqa: E402
from vpl_trl.models.causal_lm import load_policy  # noqa: E402
from vpl_trl.policy import PolicyConditioning, draw_context, load_conditioned_policy  # noqa: E402
from vpl_trl.scripts import ppo_personalized  # noqa: E402
from vpl_trl.scripts import train_reward as reward_script  # noqa: E402

REWARD_CONFIG = ROOT / "recipes" / "configs" / "population.yaml"
POLICY_CONFIG = ROOT / "recipes" / "configs" / "ppo_population.yaml"
PAIR_KEYS = ("prompt", "chosen", "rejected")
POLICIES = ("untrained", "bt_blind", "vpl_best_of_n", "conditioned")  # the conditioned policy last
SETTINGS = {"new_users": "held-out prompts", "new_users_training_prompts": "the policies' training prompts"}


def prepare_data(folder: Path, train_prompts: int, test_prompts: int, seed: int) -> tuple[Path, Path, Path]:
    """The population data set and two disjoint prompt files (the policy's training and held-out prompts)."""
    data = folder / "data"
    if not (data / "users.json").exists():
        build_population(data)
    prompts = sorted({row["prompt"] for row in load_preference_splits(data)["train"]})
    random.Random(f"policy-prompts-{seed}").shuffle(prompts)
    files = []
    for name, chosen in (("train", prompts[:train_prompts]),
                         ("test", prompts[train_prompts : train_prompts + test_prompts])):
        path = folder / f"policy_prompts_{name}.jsonl"
        path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in chosen))
        files.append(path)
    return data, files[0], files[1]


def train_reward(data: Path, model_type: str, output_dir: Path, reuse: bool) -> str:
    if not (reuse and (output_dir / "config.json").exists()):
        reward_script.main(["--config", str(REWARD_CONFIG), "--dataset", str(data), "--model_type", model_type,
                            "--output_dir", str(output_dir), "--overwrite_output_dir"])
    return str(output_dir)


def train_policy(flags: list[str], output_dir: Path, reuse: bool) -> dict[str, Any]:
    if not (reuse and (output_dir / "eval_results.json").exists()):
        ppo_personalized.main(["--config", str(POLICY_CONFIG), *flags, "--output_dir", str(output_dir)])
    return json.loads((output_dir / "eval_results.json").read_text())


def new_user_contexts(data: Path, n_users: int, k: int, seed: int) -> dict[str, list[dict]]:
    """`k` of each new user's own context pairs (the first `n_users` new users)."""
    rows = load_preference_splits(data)["new_users"]
    contexts: dict[str, list[dict]] = {}
    rng = random.Random(f"new-user-contexts-{seed}")
    for row in rows:
        user = row["user_id"]
        if user not in contexts and len(contexts) < n_users:
            contexts[user] = draw_context([{k_: p[k_] for k_ in PAIR_KEYS} for p in row["context"]], k, rng)
    return contexts


def evaluate_new_users(folder: Path, data: Path, test_prompts: list[str], vpl: str, contexts: dict[str, list],
                       samples: int, pool: int, settings: GenerationSettings) -> dict[str, Any]:
    """Each new user's answers from every policy, with their true utility and VPL reward."""
    population = Population.load(data)
    scorer = PersonalizedRewardScorer.from_pretrained(vpl, device="cpu")
    latents = {user: scorer.user_latent(context, user_id=user) for user, context in contexts.items()}
    users = list(contexts)
    answers: dict[str, dict[str, list[tuple[str, str]]]] = {}  # policy -> user -> (prompt, answer)

    base, base_tokenizer = load_policy(DEFAULT_MODEL, device="cpu")
    bare = [PolicyConditioning("none").prompt(p, None, True) for p in test_prompts]
    pooled = generate_candidates(base, base_tokenizer, bare, pool, settings, progress="Untrained policy")
    flat = [(p, t) for p, texts in zip(test_prompts, pooled) for t in texts]
    answers["untrained"] = {user: [(p, t) for p, texts in zip(test_prompts, pooled) for t in texts[:samples]]
                            for user in users}
    embedded: dict[tuple[str, str], torch.Tensor] = {}

    def vpl_rewards(pairs: list[tuple[str, str]], user: str) -> list[float]:
        """Each answer's VPL reward under the user's z (each text embedded once for all users and policies)."""
        missing = list(dict.fromkeys(pair for pair in pairs if pair not in embedded))
        if missing:
            rows = scorer.embed_completions([p for p, _ in missing], [t for _, t in missing])
            embedded.update(zip(missing, rows))
        return scorer.rewards(torch.stack([embedded[pair] for pair in pairs]), latents[user])

    # personalization at inference time: for each user and prompt, the best of the untrained pool under their z
    rewards = {user: vpl_rewards(flat, user) for user in users}
    answers["vpl_best_of_n"] = {}
    for user in users:
        best = {}
        for (prompt, text), reward in zip(flat, rewards[user]):
            if prompt not in best or reward > best[prompt][0]:
                best[prompt] = (reward, text)
        answers["vpl_best_of_n"][user] = [(p, best[p][1]) for p in test_prompts for _ in range(samples)]
    del base

    policy, tokenizer, conditioning, _ = load_conditioned_policy(folder / "bt_blind", device="cpu")
    blind = generate_candidates(policy, tokenizer, [conditioning.prompt(p, None, True) for p in test_prompts], samples,
                                settings, progress="Bradley-Terry policy")
    answers["bt_blind"] = {user: [(p, t) for p, texts in zip(test_prompts, blind) for t in texts] for user in users}
    del policy

    policy, tokenizer, conditioning, _ = load_conditioned_policy(folder / "conditioned", device="cpu")
    prompts = [conditioning.prompt(p, None, True) for _ in users for p in test_prompts]
    row_latents = torch.cat([latents[u] for u in users for _ in test_prompts])
    texts = generate_candidates(policy, tokenizer, prompts, samples, settings, latents=row_latents,
                                progress="Conditioned policy")
    answers["conditioned"] = {
        user: [(p, t) for p, ts in zip(test_prompts, texts[i * len(test_prompts) : (i + 1) * len(test_prompts)])
               for t in ts]
        for i, user in enumerate(users)
    }
    del policy

    scored: dict[str, dict[str, dict[str, list[float]]]] = {}
    for name, by_user in answers.items():
        scored[name] = {}
        for user, pairs in by_user.items():
            scored[name][user] = {"utility": population.utility([t for _, t in pairs], user).tolist(),
                                  "vpl_reward": vpl_rewards(pairs, user), "answers": [t for _, t in pairs]}
    return scored


def bootstrap_gain(scored: dict, policy: str, baseline: str, resamples: int = 2000, seed: int = 0
                   ) -> tuple[float, list[float], float]:
    """The mean over users of (policy's mean utility - baseline's), its 95% bootstrap interval (users resampled,
    then each user's samples), and the share of users whose mean utility rose."""
    rng = np.random.default_rng(seed)
    users = list(scored[policy])
    own = [np.asarray(scored[policy][u]["utility"]) for u in users]
    base = [np.asarray(scored[baseline][u]["utility"]) for u in users]
    gains = np.array([o.mean() - b.mean() for o, b in zip(own, base)])
    means = []
    for _ in range(resamples):
        picked = rng.integers(len(users), size=len(users))
        means.append(np.mean([rng.choice(own[i], len(own[i])).mean() - rng.choice(base[i], len(base[i])).mean()
                              for i in picked]))
    low, high = np.quantile(means, [0.025, 0.975])
    return float(gains.mean()), [float(low), float(high)], float((gains > 0).mean())


def round_curves(candidates_file: Path, population: Population) -> list[dict[str, float]]:
    """Per training round: the mean trained-against reward and the mean true utility of the round's candidates
    (each under its own user), on the training users."""
    by_round: dict[int, list[dict]] = defaultdict(list)
    for line in candidates_file.read_text().splitlines():
        record = json.loads(line)
        by_round[record["round"]].append(record)
    curves = []
    for number in sorted(by_round):
        records = by_round[number]
        utility = [float(population.utility([r["completion"]], r["user_id"])[0]) for r in records]
        curves.append({"round": number, "reward": float(np.mean([r["reward"] for r in records])),
                       "utility": float(np.mean(utility)), "candidates": len(records)})
    return curves


def plot_hacking(curves: dict[str, list[dict]], path: Path) -> Path:
    plt = headless_pyplot()
    figure, axes = plt.subplots(1, len(curves), figsize=(4.8 * len(curves), 3.6), constrained_layout=True,
                                sharey=True)
    for axis, (name, points) in zip(np.atleast_1d(axes), curves.items()):
        rounds = [p["round"] for p in points]
        axis.plot(rounds, [p["reward"] for p in points], "o-", label="reward it is trained against")
        axis.plot(rounds, [p["utility"] for p in points], "s--", label="true utility")
        axis.set_xticks(rounds)
        axis.set_xlabel("training round")
        axis.set_title(name)
        axis.legend(loc="upper left", fontsize=8)
    np.atleast_1d(axes)[0].set_ylabel("mean over the round's candidates")
    figure.suptitle("Each round's candidates for the training users: reward against true utility")
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def plot_new_users(summary: dict, path: Path) -> Path:
    plt = headless_pyplot()
    panels = [(key, title) for key, title in SETTINGS.items() if key in summary]
    figure, axes = plt.subplots(1, len(panels), figsize=(6.2 * len(panels), 3.8), constrained_layout=True,
                                sharey=True)
    for axis, (key, title) in zip(np.atleast_1d(axes), panels):
        utility = summary[key]["utility"]
        policies = list(utility)
        means = [utility[p]["mean"] for p in policies]
        errors = np.array([[m - utility[p]["ci95"][0], utility[p]["ci95"][1] - m] for p, m in zip(policies, means)]).T
        axis.bar(policies, means, yerr=errors, capsize=4, color=["0.6", "tab:orange", "tab:purple", "tab:green"])
        axis.axhline(0, color="0.3", linewidth=0.8)
        axis.set_title(f"{summary[key]['users']} new users, {title}")
        axis.tick_params(axis="x", labelrotation=15)
    np.atleast_1d(axes)[0].set_ylabel("mean true utility (95% bootstrap interval)")
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def utility_interval(scored: dict, policy: str, resamples: int = 2000, seed: int = 0) -> list[float]:
    rng = np.random.default_rng(seed)
    values = [np.asarray(v["utility"]) for v in scored[policy].values()]
    means = [np.mean([rng.choice(values[i], len(values[i])).mean() for i in rng.integers(len(values),
                                                                                           size=len(values))])
             for _ in range(resamples)]
    return [float(q) for q in np.quantile(means, [0.025, 0.975])]


def new_user_table(new: dict, title: str) -> list[str]:
    lines = [f"## New users, {title} ({new['users']} users never seen in training, each conditioned on 16 of their "
             f"own pairs; {new['prompts']} prompts x {new['samples']} answers)", "",
             "| policy | mean true utility [95% CI] | mean VPL reward (user's own z) |", "|---|---|---|"]
    for name, value in new["utility"].items():
        lines.append(f"| {name} | {value['mean']:+.3f} [{value['ci95'][0]:+.3f}, {value['ci95'][1]:+.3f}] | "
                     f"{value['vpl_reward']:+.3f} |")
    lines += ["", "| conditioned policy against | mean utility gain [95% CI] | users who gain |", "|---|---|---|"]
    for name, value in new["gains"].items():
        lines.append(f"| {name} | {value['mean']:+.3f} [{value['ci95'][0]:+.3f}, {value['ci95'][1]:+.3f}] | "
                     f"{value['users_gaining']:.0%} |")
    return [*lines, ""]


def render(summary: dict, command: str, stem: str, note: str) -> str:
    lines = [
        "# One conditioned policy for many users: new users' true utility", "",
        f"`{command}`. Population: `python -m vpl_trl.data population` defaults (200 training users, 50 new users, "
        "4 attributes); VPL and Bradley-Terry reward models with `recipes/configs/population.yaml` (frozen SmolLM2); "
        "both policies with `recipes/configs/ppo_population.yaml` for the same wall-time budget on the same "
        f"{summary['train_users']} training users and {summary['train_prompts']} training prompts. Machine: "
        f"{platform.machine()}, {torch.get_num_threads()} threads, no GPU; {time.strftime('%Y-%m-%d')}; "
        f"{summary['seconds'] / 60:.0f} min{' (trained models reused)' if summary['reused'] else ' in all'}.",
        *(["", note] if note else []), "",
    ]
    for key, title in SETTINGS.items():
        if key in summary:
            lines += new_user_table(summary[key], title)
    lines += [f"![new users]({stem}_new_users.png)", "", "## Training", "",
              "| policy | reward | train min | rounds | SFT steps | s/step: generation, scoring, update |",
              "|---|---|---|---|---|---|"]
    for name, run in summary["training"].items():
        per = run["seconds_per_step"]
        lines.append(f"| {name} | {run['reward']} | {run['train_seconds'] / 60:.1f} | {run['rounds']} | "
                     f"{run['steps']} | {per['generation']:.1f}, {per['scoring']:.1f}, {per['update']:.1f} |")
    lines += ["", "## Reward hacking", "",
              "Each training round's candidates (sampled by the policy as the round began, on the training users "
              "and prompts), scored by the reward the policy was trained against and by the same users' true "
              "utility. A reward that rises while the utility stays flat or falls is reward hacking.", "",
              "| policy | round | reward | true utility |", "|---|---|---|---|"]
    for name, points in summary["rounds"].items():
        lines += [f"| {name} | {p['round']} | {p['reward']:+.3f} | {p['utility']:+.3f} |" for p in points]
    lines += ["", f"![reward hacking]({stem}_hacking.png)", ""]
    return "\n".join(lines)


def new_user_summary(scored: dict, users: int, prompts: int, samples: int) -> dict[str, Any]:
    """Each policy's mean true utility and VPL reward over the new users, and the conditioned policy's gains."""
    summary = {
        "users": users, "prompts": prompts, "samples": samples,
        "utility": {name: {"mean": float(np.mean([np.mean(v["utility"]) for v in scored[name].values()])),
                           "ci95": utility_interval(scored, name),
                           "vpl_reward": float(np.mean([np.mean(v["vpl_reward"]) for v in scored[name].values()]))}
                    for name in POLICIES},
        "gains": {},
    }
    for baseline in POLICIES[:-1]:
        mean, interval, share = bootstrap_gain(scored, "conditioned", baseline)
        summary["gains"][baseline] = {"mean": mean, "ci95": interval, "users_gaining": share}
    return summary


def main(argv: list[str] | None = None) -> dict[str, Any]:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output_dir", "--output-dir", default="outputs/policy-population")
    parser.add_argument("--budget_seconds", "--budget-seconds", type=float, default=900,
                        help="Training wall time of each policy (default: 15 min).")
    parser.add_argument("--train_users", "--train-users", type=int, default=16)
    parser.add_argument("--train_prompts", "--train-prompts", type=int, default=4)
    parser.add_argument("--new_users", "--new-users", type=int, default=16)
    parser.add_argument("--test_prompts", "--test-prompts", type=int, default=4)
    parser.add_argument("--samples", type=int, default=4, help="Answers per new user and held-out prompt.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--results", default="benchmarks/results/policy_population.md")
    parser.add_argument("--reuse", action="store_true", help="Reuse trained models in OUTPUT_DIR.")
    parser.add_argument("--note", default="", help="A paragraph on the run's conditions, written under the title.")
    args = parser.parse_args(argv)
    shown = [a for i, a in enumerate(argv) if a != "--note" and (i == 0 or argv[i - 1] != "--note")]
    command = " ".join(["python benchmarks/policy_population.py", *shown, *(["--", *extra] if extra else [])])
    start = time.perf_counter()
    folder = Path(args.output_dir)
    folder.mkdir(parents=True, exist_ok=True)

    data, train_prompts, test_prompts = prepare_data(folder, args.train_prompts, args.test_prompts, args.seed)
    vpl = train_reward(data, "vae", folder / "reward-vpl", args.reuse)
    bt = train_reward(data, "base", folder / "reward-bt", args.reuse)
    users = sorted({row["user_id"] for row in load_preference_splits(data)["train"]})
    users = sorted(random.Random(f"policy-users-{args.seed}").sample(users, args.train_users))
    common = ["--user_contexts", str(data), "--users", *users, "--prompts", str(train_prompts), "--eval_prompts",
              str(test_prompts), "--max_train_seconds", str(args.budget_seconds), "--seed", str(args.seed), *extra]
    runs = {
        "conditioned": train_policy(["--reward_model", vpl, "--mode", "conditioned", "--signal", "bon_sft", *common],
                                    folder / "conditioned", args.reuse),
        "bt_blind": train_policy(["--reward_model", bt, "--mode", "shared", "--signal", "bon_sft", *common],
                                 folder / "bt_blind",
                                 args.reuse),
    }

    contexts = new_user_contexts(data, args.new_users, 16, args.seed)
    recipe = yaml.safe_load(POLICY_CONFIG.read_text())  # the policies' sampling settings in training
    settings = GenerationSettings(max_new_tokens=recipe["max_completion_length"], temperature=recipe["temperature"],
                                  batch_size=16, seed=args.seed)
    population = Population.load(data)
    summary: dict[str, Any] = {"train_users": args.train_users, "train_prompts": args.train_prompts,
                               "reused": args.reuse}
    for key, prompt_file in (("new_users", test_prompts), ("new_users_training_prompts", train_prompts)):
        prompts = [json.loads(line)["prompt"] for line in prompt_file.read_text().splitlines()]
        answers = folder / f"{key}_answers.json"
        if args.reuse and answers.exists():
            scored = json.loads(answers.read_text())
        else:
            scored = evaluate_new_users(folder, data, prompts, vpl, contexts, args.samples, 4 * args.samples,
                                        settings)
            answers.write_text(json.dumps(scored, indent=1))
        summary[key] = new_user_summary(scored, len(contexts), len(prompts), args.samples)
    summary["training"] = {}
    summary["rounds"] = {name: round_curves(folder / name / "round_candidates.jsonl", population) for name in runs}
    for name, results in runs.items():
        run = results["runs"]["all"]
        summary["training"][name] = {
            "reward": "VPL" if name == "conditioned" else "Bradley-Terry", "train_seconds": run["train_seconds"],
            "steps": run["steps"], "rounds": len(run.get("rounds", [])), "seconds_per_step": run["seconds_per_step"],
        }
    summary["seconds"] = time.perf_counter() - start
    (folder / "summary.json").write_text(json.dumps(summary, indent=2))

    results = Path(args.results)
    results.parent.mkdir(parents=True, exist_ok=True)
    plot_hacking(summary["rounds"], results.parent / f"{results.stem}_hacking.png")
    plot_new_users(summary, results.parent / f"{results.stem}_new_users.png")
    results.write_text(render(summary, command, results.stem, args.note))
    print(results.read_text())
    return summary


if __name__ == "__main__":
    main()
