"""One conditioned policy for many users, measured on NEW users and NEW prompts by their true utility: the simulated
population's ground truth (`vpl_trl.data.population`), not the VPL reward that the policy was trained against.

    python benchmarks/policy_population.py --output_dir DIR [--budget_seconds 840]
        [--train_users 192] [--train_prompts 32] [--new_users 128] [--test_prompts 16]
        [--policies conditioned bt_blind [text]] [--results benchmarks/results/policy_population.md] [--reuse]
        [--score_final_round] [--generation_timings] [--latent_guidance_scale 2] [-- RECIPE FLAGS]

It builds the population data set (its defaults, with `--new_users` new users), trains the VPL reward model
(`recipes/configs/population.yaml`) and a Bradley-Terry reward model with the same settings, then each policy
of `--policies` with `recipes/ppo_personalized.py` and `recipes/configs/ppo_population.yaml` (reward-ranked DPO: an
offline first round that ranks the shipped answer pool under each training user's reward, with no generation, then
online rounds), for the same wall-time budget on the same training users and training prompts (the pool's); a
round starts only if it fits whole in the budget. The recipe's own evaluation of the training users is skipped
(`--eval_samples 0`): this benchmark evaluates every policy on the new users itself.

- `conditioned`: one latent-conditioned policy (`z` as a soft prompt) against the VPL reward; it answers the new
  users guided by their latent (`--latent_guidance_scale`, default 2: each token pushed away from what the policy
  writes for the null latent, `vpl_trl.inference.latent_guidance`);
- `text`: one text-conditioned policy (two of the user's pairs in its prompt) against the VPL reward;
- `bt_blind`: one user-blind policy (`--mode shared`) against the Bradley-Terry reward, the standard RLHF policy.

With `--score_final_round`, each policy's samples for the training users are scored once more after training
(the learning curve's last point).

Then `--new_users` users never seen in training (neither by the reward model nor by the policy) each bring 16 of
their own labelled pairs, and answer held-out prompts that no policy trained on (`recipes/prompts/
population_heldout.jsonl`, written for this benchmark, then the pool's prompts left out of training); every answer
is scored by the user's TRUE utility. Also served: the untrained policy and, personalization at inference time,
the best of `--best_of` untrained answers under the user's VPL reward (`best_of_16`) and, with a Bradley-Terry
reward, under it (`best_of_16_bt`, the same answer for every user): what the personalized reward itself adds over
the pooled one, apart from what a policy learns from it. Every trained policy, user-blind ones too,
samples `--samples` answers per new user and prompt. Gains are means over users with 95% bootstrap intervals over
users. Reward hacking: each training round's candidates (the first round's: the pool's answers), scored by the
reward the policy was trained against and by the same users' true utility.

Writes `DIR/summary.json` (`{"new_users_heldout_prompts": {"users", "prompts", "vs_untrained", "vs_bt_blind",
"best_of_16_vs_untrained", "best_of_16_vs_best_of_16_bt", "users_gaining", "utility": {POLICY: ...},
"gains": {POLICY: {BASELINE: ...}}},
"personalization": {POLICY: ...}, "hacking": {POLICY: {"reward": [...], "utility": [...]}}, "training": {...},
"generation": {...}, "seconds"}`),
the results file and its PNGs. `--reuse` keeps the trained models and the scored answers found in DIR (the
latent-conditioned policy answers again when they were written under another `--latent_guidance_scale`).
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
from vpl_trl.data.population import (  # noqa: E402
    Population,
    PopulationConfig,
    build_population,
    dialogue_prompt,
    load_pool,
)
from vpl_trl.embedded_model import DEFAULT_MODEL  # noqa: E402
from vpl_trl.evaluation.diagnostics import headless_pyplot  # noqa: E402
from vpl_trl.inference.generation import GenerationSettings, generate_candidates  # noqa: E402
from vpl_trl.inference.scoring import PersonalizedRewardScorer  # noqa: E402
from vpl_trl.models.causal_lm import load_policy  # noqa: E402
from vpl_trl.policy import PolicyConditioning, draw_context, load_conditioned_policy  # noqa: E402
from vpl_trl.precision import cpu_has_native_bf16  # noqa: E402
from vpl_trl.scripts import ppo_personalized  # noqa: E402
from vpl_trl.scripts import train_reward as reward_script  # noqa: E402

REWARD_CONFIG = ROOT / "recipes" / "configs" / "population.yaml"
POLICY_CONFIG = ROOT / "recipes" / "configs" / "ppo_population.yaml"
HELD_OUT_PROMPTS = ROOT / "recipes" / "prompts" / "population_heldout.jsonl"
POOL = ROOT / "data" / "population_pool.jsonl.gz"
PAIR_KEYS = ("prompt", "chosen", "rejected")
# each trained policy: its reward model and recipe flags
TRAINED = {
    "conditioned": ("vpl", ["--mode", "conditioned", "--conditioning", "latent"]),
    "text": ("vpl", ["--mode", "conditioned", "--conditioning", "text", "--preamble_pairs", "2"]),
    # a user-blind reward rates every answer alike for every user: no contrast between users to pair on, and
    # shared candidates would give every user of a prompt the same pairs; its own 4 samples give two pairs (its
    # consensus pairs are its best against worst: every user ranks alike)
    "bt_blind": ("bt", ["--mode", "shared", "--contrast_pairs", "0", "--offline_contrast_pairs", "0",
                        "--share_online_candidates", "false", "--bon_n", "4", "--bon_keep", "2"]),
}
COLORS = {"untrained": "0.6", "best_of_16": "tab:purple", "best_of_16_bt": "tab:pink", "bt_blind": "tab:orange",
          "text": "tab:blue", "conditioned": "tab:green"}


def prepare_data(folder: Path, train_prompts: int, test_prompts: int, new_users: int, seed: int
                 ) -> tuple[Path, Path, Path]:
    """The population data set (its defaults, with at least `new_users` new users), the policies' training prompts
    (`train_prompts` of the pool's, drawn by `seed`) and held-out prompts (the shipped held-out file's, then the
    pool's prompts left out of training)."""
    data = folder / "data"
    config = PopulationConfig(new_users=max(PopulationConfig.new_users, new_users))  # the default, or more
    # the users' weights are drawn in order and each user's pairs from their own seed, new users last: more new
    # users leave the training users' data, and so the reward models, as they were
    if not (data / "users.json").exists() or Population.load(data).settings.get("new_users", 0) < config.new_users:
        build_population(data, config)
    prompts = sorted({dialogue_prompt(row["prompt"]) for row in load_pool(POOL)})
    random.Random(f"policy-prompts-{seed}").shuffle(prompts)
    if train_prompts > len(prompts):
        raise SystemExit(f"error: --train_prompts {train_prompts}: the pool has {len(prompts)} prompts.")
    held_out = [json.loads(line)["prompt"] for line in HELD_OUT_PROMPTS.read_text().splitlines() if line.strip()]
    held_out += prompts[train_prompts:]
    if test_prompts > len(held_out):
        raise SystemExit(f"error: --test_prompts {test_prompts}: {len(held_out)} held-out prompts are available.")
    files = []
    for name, chosen in (("train", prompts[:train_prompts]), ("test", held_out[:test_prompts])):
        path = folder / f"policy_prompts_{name}.jsonl"
        path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in chosen))
        files.append(path)
    return data, files[0], files[1]


def train_reward(data: Path, model_type: str, output_dir: Path, reuse: bool) -> str:
    if not (reuse and (output_dir / "config.json").exists()):
        reward_script.main(["--config", str(REWARD_CONFIG), "--dataset", str(data), "--model_type", model_type,
                            "--output_dir", str(output_dir), "--overwrite_output_dir"])
    return str(output_dir)


def train_in_bf16_on_cpu() -> bool:
    """Train the policies in bf16 on a CPU that computes it natively (twice as fast as fp32 there)."""
    return not torch.cuda.is_available() and cpu_has_native_bf16()


def train_policy(flags: list[str], output_dir: Path, reuse: bool) -> dict[str, Any]:
    if not (reuse and (output_dir / "eval_results.json").exists()):
        ppo_personalized.main(["--config", str(POLICY_CONFIG), "--offline_pool", str(POOL), *flags,
                               "--output_dir", str(output_dir)])
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
    if len(contexts) < n_users:
        raise SystemExit(f"error: --new_users {n_users}: the data has {len(contexts)} new users.")
    return contexts


def per_user(texts: list[list[str]], users: list[str], prompts: list[str]) -> dict[str, list[tuple[str, str]]]:
    """Generations for every (user, prompt), user-major, as each user's (prompt, answer) pairs."""
    size = len(prompts)
    return {user: [(p, t) for p, answers in zip(prompts, texts[i * size : (i + 1) * size]) for t in answers]
            for i, user in enumerate(users)}


def best_per_prompt(flat: list[tuple[str, str]], rewards: list[float], prompts: list[str]) -> list[tuple[str, str]]:
    """The highest-reward answer to each prompt among `flat`'s (prompt, answer) pairs."""
    best: dict[str, tuple[float, str]] = {}
    for (prompt, text), reward in zip(flat, rewards):
        if prompt not in best or reward > best[prompt][0]:
            best[prompt] = (reward, text)
    return [(p, best[p][1]) for p in prompts]


def answer_new_users(folder: Path, prompts: list[str], scorer: PersonalizedRewardScorer, contexts: dict[str, list],
                     policies: list[str], samples: int, best_of: int, settings: GenerationSettings,
                     pooled_scorer: PersonalizedRewardScorer | None = None
                     ) -> dict[str, dict[str, list[tuple[str, str]]]]:
    """Each new user's answers from every policy: {policy: {user: [(prompt, answer)]}}. Each policy's answers for
    every user and prompt come from one batched generation call. With `pooled_scorer` (the Bradley-Terry reward),
    also `best_of_16_bt`: the same untrained answers picked by it, the same for every user, so that what the
    personalized reward adds at selection is measured apart from what a policy learns from it."""
    users = list(contexts)
    latents = {user: scorer.user_latent(context, user_id=user) for user, context in contexts.items()}
    answers: dict[str, dict[str, list[tuple[str, str]]]] = {}

    base, base_tokenizer = load_policy(DEFAULT_MODEL, device="cpu")
    bare = [PolicyConditioning("none").prompt(p, None, True) for p in prompts]
    pooled = generate_candidates(base, base_tokenizer, bare, best_of, settings, progress="Untrained policy")
    answers["untrained"] = {user: [(p, t) for p, texts in zip(prompts, pooled) for t in texts] for user in users}
    flat = answers["untrained"][users[0]]
    embedded = scorer.embed_completions([p for p, _ in flat], [t for _, t in flat])
    # personalization at inference time: per prompt, the best untrained answer under the user's z
    answers["best_of_16"] = {user: best_per_prompt(flat, scorer.rewards(embedded, latents[user]), prompts)
                             for user in users}
    if pooled_scorer is not None:
        picked = best_per_prompt(flat, pooled_scorer.score([p for p, _ in flat], [t for _, t in flat]), prompts)
        answers["best_of_16_bt"] = {user: picked for user in users}
    del base

    for name in policies:
        answers[name] = policy_answers(folder / name, prompts, contexts, latents, samples, settings, name)
    return answers


def policy_answers(folder: Path, prompts: list[str], contexts: dict[str, list], latents: dict[str, torch.Tensor],
                   samples: int, settings: GenerationSettings, name: str) -> dict[str, list[tuple[str, str]]]:
    """A trained policy's answers to every new user and prompt, in one batched generation call. A user-blind
    policy (which ignores the context) also samples anew for each user: as many draws as a conditioned policy, so
    that its mean is not a handful of answers shared by every user."""
    users = list(contexts)
    policy, tokenizer, conditioning, _ = load_conditioned_policy(folder, device="cpu")
    rows = [conditioning.prompt(p, contexts[u], True) for u in users for p in prompts]
    row_latents = torch.cat([latents[u] for u in users for _ in prompts]) if conditioning.uses_latent else None
    texts = generate_candidates(policy, tokenizer, rows, samples, settings, latents=row_latents, progress=name)
    return per_user(texts, users, prompts)


def score_answers(answers: dict, population: Population, scorer: PersonalizedRewardScorer,
                  contexts: dict[str, list]) -> dict[str, dict[str, dict[str, list]]]:
    """Every answer's true utility and VPL reward under its user: {policy: {user: {utility, vpl_reward, answers}}}
    (each distinct text embedded once)."""
    latents = {user: scorer.user_latent(context, user_id=user) for user, context in contexts.items()}
    distinct = list(dict.fromkeys(pair for by_user in answers.values() for pairs in by_user.values() for pair in pairs))
    rows = scorer.embed_completions([p for p, _ in distinct], [t for _, t in distinct])
    embedded = dict(zip(distinct, rows))
    scored: dict[str, dict[str, dict[str, list]]] = {}
    for name, by_user in answers.items():
        scored[name] = {}
        for user, pairs in by_user.items():
            rewards = scorer.rewards(torch.stack([embedded[pair] for pair in pairs]), latents[user])
            scored[name][user] = {"utility": population.utility([t for _, t in pairs], user).tolist(),
                                  "vpl_reward": [float(r) for r in rewards], "answers": [t for _, t in pairs]}
    return scored


def bootstrap_gain(scored: dict, policy: str, baseline: str, resamples: int = 2000, seed: int = 0
                   ) -> dict[str, Any]:
    """The mean over users of (policy's mean utility - baseline's), its 95% bootstrap interval over users, and the
    share of users whose mean utility rose. Users are resampled, not their answers again: a user's gain already
    carries the sampling noise of their answers, which a second stage would count twice."""
    users = list(scored[policy])
    gains = np.array([np.mean(scored[policy][u]["utility"]) - np.mean(scored[baseline][u]["utility"]) for u in users])
    return {"mean": float(gains.mean()), "ci95": _bootstrap_over_users(gains, resamples, seed),
            "users_gaining": float((gains > 0).mean())}


def utility_interval(scored: dict, policy: str, resamples: int = 2000, seed: int = 0) -> list[float]:
    """The 95% bootstrap interval over users of a policy's mean true utility."""
    return _bootstrap_over_users(np.array([np.mean(v["utility"]) for v in scored[policy].values()]), resamples, seed)


def _bootstrap_over_users(values: np.ndarray, resamples: int, seed: int) -> list[float]:
    rng = np.random.default_rng(seed)
    means = values[rng.integers(len(values), size=(resamples, len(values)))].mean(axis=1)
    return [float(q) for q in np.quantile(means, [0.025, 0.975])]


def new_user_summary(scored: dict, users: int, prompts: int, samples: int, best_of: int) -> dict[str, Any]:
    """Each policy's mean true utility and VPL reward over the new users, every trained policy's gains over the
    baselines, and the headline comparisons (the latent-conditioned policy's, when it was trained)."""
    names = list(scored)
    summary: dict[str, Any] = {
        "users": users, "prompts": prompts, "samples": samples, "best_of": best_of,
        "utility": {name: {"mean": float(np.mean([np.mean(v["utility"]) for v in scored[name].values()])),
                           "ci95": utility_interval(scored, name),
                           "vpl_reward": float(np.mean([np.mean(v["vpl_reward"]) for v in scored[name].values()]))}
                    for name in names},
        "gains": {name: {baseline: bootstrap_gain(scored, name, baseline) for baseline in names if baseline != name}
                  for name in names if name in TRAINED or name.startswith("best_of_16")},
    }
    summary["best_of_16_vs_untrained"] = _interval(summary["gains"]["best_of_16"]["untrained"])
    if "best_of_16_bt" in scored:  # what the personalized reward adds over the pooled one, picking the same answers
        summary["best_of_16_vs_best_of_16_bt"] = _interval(summary["gains"]["best_of_16"]["best_of_16_bt"])
    if "conditioned" in scored:
        mine = summary["gains"]["conditioned"]
        summary["vs_untrained"] = _interval(mine["untrained"])
        if "bt_blind" in mine:
            summary["vs_bt_blind"] = _interval(mine["bt_blind"])
        summary["users_gaining"] = mine["untrained"]["users_gaining"]
    return summary


def personalization(scored: dict, population: Population) -> dict[str, dict[str, float]]:
    """How much each policy's answers are each user's own: the mean over users of their true utility for the
    answers written for them minus for the answers written for the other new users (the same prompts), with the
    share of users for whom it is positive. About 0 for a user-blind policy (its draws for each user differ only by
    chance); the answers' counterpart of the reward model's context swap."""
    result = {}
    for name, by_user in scored.items():
        users = list(by_user)
        scores = {u: population.attribute_scores(by_user[u]["answers"]) for u in users}
        gaps = []
        for user in users:
            weights = population.weights(user)
            own = float(np.mean(scores[user] @ weights))
            others = [float(np.mean(scores[other] @ weights)) for other in users if other != user]
            gaps.append(own - float(np.mean(others)))
        # the untrained policy's answers are the same for every user: gaps of 0 up to rounding, not positive
        result[name] = {"mean": float(np.mean(gaps)), "users_positive": float(np.mean(np.asarray(gaps) > 1e-9))}
    return result


def _interval(gain: dict[str, Any]) -> dict[str, Any]:
    return {"mean": gain["mean"], "ci95": gain["ci95"]}


def round_curves(candidates_file: Path, population: Population) -> dict[str, list[float]]:
    """Per training round: the mean trained-against reward and the mean true utility of the round's candidates
    (each under its own user), on the training users; round 0 is the offline pool's."""
    by_round: dict[int, list[dict]] = defaultdict(list)
    for line in candidates_file.read_text().splitlines():
        record = json.loads(line)
        by_round[record["round"]].append(record)
    curves: dict[str, list] = {"reward": [], "utility": [], "candidates": [], "round": []}
    for number in sorted(by_round):
        records = by_round[number]
        utility = [float(population.utility([r["completion"]], r["user_id"])[0]) for r in records]
        curves["reward"].append(float(np.mean([r["reward"] for r in records])))
        curves["utility"].append(float(np.mean(utility)))
        curves["candidates"].append(len(records))
        curves["round"].append("trained" if records[0].get("final") else ("0 (pool)" if number == 0 else number))
    return curves


def generation_levers(prompts: list[str], sequences: int = 64) -> list[dict[str, Any]]:
    """Seconds per sampled answer of the untrained policy on this machine: batch size, answer length and bf16
    (where the CPU has it)."""
    model, tokenizer = load_policy(DEFAULT_MODEL, device="cpu")
    bare = [PolicyConditioning("none").prompt(p, None, True) for p in prompts]
    per_prompt = max(1, sequences // len(bare))
    cases = [("float32", 16, 64), ("float32", 64, 64), ("float32", 64, 48), ("float32", 64, 96)]
    if cpu_has_native_bf16():
        cases.append(("bfloat16", 64, 64))
    rows = []
    for dtype, batch, tokens in cases:
        model = model.to(getattr(torch, dtype))
        settings = GenerationSettings(max_new_tokens=tokens, temperature=0.9, batch_size=batch, seed=0)
        start = time.perf_counter()
        generate_candidates(model, tokenizer, bare, per_prompt, settings)
        rows.append({"dtype": dtype, "batch_size": batch, "max_new_tokens": tokens,
                     "seconds_per_answer": (time.perf_counter() - start) / (per_prompt * len(bare))})
    return rows


def plot_hacking(curves: dict[str, dict], path: Path) -> Path:
    plt = headless_pyplot()
    figure, axes = plt.subplots(1, len(curves), figsize=(4.8 * len(curves), 3.6), constrained_layout=True,
                                sharey=True)
    for axis, (name, points) in zip(np.atleast_1d(axes), curves.items()):
        rounds = list(range(len(points["reward"])))
        axis.plot(rounds, points["reward"], "o-", label="reward it is trained against")
        axis.plot(rounds, points["utility"], "s--", label="true utility")
        labels = points.get("round", rounds)
        axis.set_xticks(rounds, ["pool" if str(r).startswith("0") else str(r) for r in labels])
        axis.set_xlabel("training round (0: the offline pool; trained: after training)")
        axis.set_title(name)
        axis.legend(loc="upper left", fontsize=8)
    np.atleast_1d(axes)[0].set_ylabel("mean over the round's candidates")
    figure.suptitle("Each round's candidates for the training users: reward against true utility")
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def plot_new_users(new: dict, path: Path) -> Path:
    plt = headless_pyplot()
    figure, axis = plt.subplots(figsize=(7.5, 3.8), constrained_layout=True)
    utility = new["utility"]
    names = list(utility)
    means = [utility[p]["mean"] for p in names]
    errors = np.array([[m - utility[p]["ci95"][0], utility[p]["ci95"][1] - m] for p, m in zip(names, means)]).T
    axis.bar(names, means, yerr=errors, capsize=4, color=[COLORS.get(p, "0.4") for p in names])
    axis.axhline(0, color="0.3", linewidth=0.8)
    axis.set_title(f"{new['users']} new users, {new['prompts']} held-out prompts")
    axis.set_ylabel("mean true utility (95% bootstrap interval)")
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def render(summary: dict, command: str, stem: str, note: str) -> str:
    new, guidance = summary["new_users_heldout_prompts"], summary["latent_guidance_scale"]
    lines = [
        "# One conditioned policy for many users: new users on held-out prompts, by true utility", "",
        f"`{command}`. Population: `python -m vpl_trl.data population` defaults (200 training users, "
        f"{summary['population_new_users']} new users, 4 attributes); VPL and Bradley-Terry reward "
        "models with `recipes/configs/population.yaml` (frozen SmolLM2); every policy with "
        "`recipes/configs/ppo_population.yaml` (reward-ranked DPO, the first round ranked from the "
        f"shipped answer pool) for at most {summary['budget_seconds'] / 60:.0f} min of training each (a round "
        "starts only if it fits whole), on the same "
        f"{summary['train_users']} training users and {summary['train_prompts']} training prompts; the "
        f"latent-conditioned policy answers with latent guidance scale {guidance:g}{' (none)' if guidance == 1 else ''}"
        ". Machine: "
        f"{platform.machine()}, {torch.get_num_threads()} threads, no GPU; {time.strftime('%Y-%m-%d')}; "
        f"{summary['seconds'] / 60:.0f} min{' (trained models reused)' if summary['reused'] else ' in all'}.",
        *(["", note] if note else []), "",
        f"## New users, held-out prompts ({new['users']} users never seen in training, each conditioned on 16 of "
        f"their own pairs; {new['prompts']} prompts no policy trained on; {new['samples']} "
        f"answer{'s' if new['samples'] != 1 else ''} per prompt, the untrained policy {new['best_of']})", "",
        "| policy | mean true utility [95% CI] | mean VPL reward (user's own z) |", "|---|---|---|",
    ]
    for name, value in new["utility"].items():
        lines.append(f"| {name} | {value['mean']:+.3f} [{value['ci95'][0]:+.3f}, {value['ci95'][1]:+.3f}] | "
                     f"{value['vpl_reward']:+.3f} |")
    lines += ["", "| policy | against | mean utility gain [95% CI] | users who gain |", "|---|---|---|---|"]
    for name, against in new["gains"].items():
        for baseline, value in against.items():
            lines.append(f"| {name} | {baseline} | {value['mean']:+.3f} [{value['ci95'][0]:+.3f}, "
                         f"{value['ci95'][1]:+.3f}] | {value['users_gaining']:.0%} |")
    lines += ["", "Personalization: each new user's true utility for the answers written for them minus for those "
              "written for the other new users (same prompts); about 0 for a user-blind policy, whose draws differ by "
              "chance only.", "",
              "| policy | own answers minus the others' | users for whom positive |", "|---|---|---|"]
    for name, value in summary.get("personalization", {}).items():
        if name != "untrained":
            lines.append(f"| {name} | {value['mean']:+.3f} | {value['users_positive']:.0%} |")
    lines += ["", f"![new users]({stem}_new_users.png)", "", "## Training", "",
              "| policy | reward | train min | rounds | DPO steps | seconds in generation, scoring, updates |",
              "|---|---|---|---|---|---|"]
    for name, run in summary["training"].items():
        spent = run["seconds_spent"]
        lines.append(f"| {name} | {run['reward']} | {run['train_seconds'] / 60:.1f} | {run['rounds']} | "
                     f"{run['steps']} | {spent['generation']:.0f}, {spent['scoring']:.0f}, {spent['update']:.0f} |")
    lines += ["", "## Reward hacking", "",
              "Each training round's candidates on the training users and prompts (round 0: the pool's answers, "
              "ranked offline; later rounds: the policy's samples as the round began; trained: its samples after "
              "training), scored by the reward the "
              "policy was trained against and by the same users' true utility. A reward that rises while the "
              "utility stays flat or falls is reward hacking.", "",
              "| policy | round | candidates | reward | true utility |", "|---|---|---|---|---|"]
    for name, curve in summary["hacking"].items():
        labels = curve.get("round", ["0 (pool)", *range(1, len(curve["reward"]))])
        lines += [f"| {name} | {labels[i]} | {curve['candidates'][i]} | {reward:+.3f} | "
                  f"{curve['utility'][i]:+.3f} |" for i, reward in enumerate(curve["reward"])]
    lines += ["", f"![reward hacking]({stem}_hacking.png)", ""]
    if summary.get("generation"):
        lines += ["## Generation on this machine (the untrained policy)", "",
                  "| dtype | batch | max new tokens | seconds per answer |", "|---|---|---|---|"]
        lines += [f"| {row['dtype']} | {row['batch_size']} | {row['max_new_tokens']} | "
                  f"{row['seconds_per_answer']:.3f} |" for row in summary["generation"]]
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output_dir", "--output-dir", default="outputs/policy-population")
    parser.add_argument("--budget_seconds", "--budget-seconds", type=float, default=840,
                        help="Training wall time of each policy (default: 14 min); a round starts only if it "
                             "fits whole.")
    parser.add_argument("--score_final_round", "--score-final-round", action="store_true",
                        help="Score each policy's samples for the training users once more after training (the "
                             "learning curve's last point; about 3 minutes per policy).")
    parser.add_argument("--policies", nargs="+", default=["conditioned", "bt_blind"], choices=list(TRAINED))
    parser.add_argument("--train_users", "--train-users", type=int, default=192)
    parser.add_argument("--train_prompts", "--train-prompts", type=int, default=32)
    parser.add_argument("--new_users", "--new-users", type=int, default=128)
    parser.add_argument("--test_prompts", "--test-prompts", type=int, default=16)
    parser.add_argument("--samples", type=int, default=1,
                        help="Answers per new user and held-out prompt. Users differ far more in what a policy "
                             "gains them than their answers vary: more users narrow the intervals more than more "
                             "answers each.")
    parser.add_argument("--best_of", "--best-of", type=int, default=16,
                        help="Untrained answers per held-out prompt that each new user's VPL reward picks from.")
    parser.add_argument("--latent_guidance_scale", "--latent-guidance-scale", type=float, default=2.0,
                        help="The latent-conditioned policy's guidance by each new user's latent when it answers "
                             "them (vpl_trl.inference.latent_guidance; 1: none).")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--results", default="benchmarks/results/policy_population.md")
    parser.add_argument("--reuse", action="store_true", help="Reuse trained models and scored answers in OUTPUT_DIR.")
    parser.add_argument("--generation_timings", "--generation-timings", action="store_true",
                        help="Also time the untrained policy's generation settings (about 2 minutes).")
    parser.add_argument("--note", default="", help="A paragraph on the run's conditions, written under the title.")
    args = parser.parse_args(argv)
    shown = [a for i, a in enumerate(argv) if a != "--note" and (i == 0 or argv[i - 1] != "--note")]
    command = " ".join(["python benchmarks/policy_population.py", *shown, *(["--", *extra] if extra else [])])
    start = time.perf_counter()
    folder = Path(args.output_dir)
    folder.mkdir(parents=True, exist_ok=True)

    data, train_prompts, test_prompts = prepare_data(folder, args.train_prompts, args.test_prompts, args.new_users,
                                                        args.seed)
    rewards = {"vpl": train_reward(data, "vae", folder / "reward-vpl", args.reuse)}
    if any(TRAINED[name][0] == "bt" for name in args.policies):
        rewards["bt"] = train_reward(data, "base", folder / "reward-bt", args.reuse)
    users = sorted({row["user_id"] for row in load_preference_splits(data)["train"]})
    users = sorted(random.Random(f"policy-users-{args.seed}").sample(users, args.train_users))
    common = ["--user_contexts", str(data), "--users", *users, "--prompts", str(train_prompts), "--eval_prompts",
              str(test_prompts), "--max_train_seconds", str(args.budget_seconds), "--seed", str(args.seed),
              "--score_final_round", str(args.score_final_round), "--eval_samples", "0",
              *(["--use_cpu", "true", "--bf16", "true"] if train_in_bf16_on_cpu() else []), *extra]
    runs = {}
    for name in args.policies:
        reward, flags = TRAINED[name]
        runs[name] = train_policy(["--reward_model", rewards[reward], *flags, *common], folder / name, args.reuse)

    recipe = yaml.safe_load(POLICY_CONFIG.read_text())  # the policies' sampling settings in training
    settings = GenerationSettings(max_new_tokens=recipe["max_completion_length"], temperature=recipe["temperature"],
                                  batch_size=recipe["eval_batch_size"], seed=args.seed,
                                  latent_guidance_scale=args.latent_guidance_scale)
    population = Population.load(data)
    prompts = [json.loads(line)["prompt"] for line in test_prompts.read_text().splitlines()]
    contexts = new_user_contexts(data, args.new_users, 16, args.seed)
    answers_file, guidance_file = folder / "new_users_answers.json", folder / "new_users_guidance.json"
    guidance, answered = args.latent_guidance_scale, True
    if args.reuse and answers_file.exists():
        scored = json.loads(answers_file.read_text())
        used = json.loads(guidance_file.read_text())["latent_guidance_scale"] if guidance_file.exists() else 1.0
        answered = used != guidance and "conditioned" in args.policies
        if answered:  # answers written under another guidance scale: the latent-conditioned policy answers again
            scorer = PersonalizedRewardScorer.from_pretrained(rewards["vpl"], device="cpu")
            latents = {user: scorer.user_latent(context, user_id=user) for user, context in contexts.items()}
            answers = {"conditioned": policy_answers(folder / "conditioned", prompts, contexts, latents, args.samples,
                                                     settings, "conditioned")}
            scored.update(score_answers(answers, population, scorer, contexts))
        else:
            guidance = used  # the scale the reused answers were written under
    else:
        scorer = PersonalizedRewardScorer.from_pretrained(rewards["vpl"], device="cpu")
        pooled = PersonalizedRewardScorer.from_pretrained(rewards["bt"], device="cpu") if "bt" in rewards else None
        answers = answer_new_users(folder, prompts, scorer, contexts, args.policies, args.samples, args.best_of,
                                   settings, pooled)
        scored = score_answers(answers, population, scorer, contexts)
    if answered:
        answers_file.write_text(json.dumps(scored, indent=1))
        guidance_file.write_text(json.dumps({"latent_guidance_scale": guidance}))
    summary: dict[str, Any] = {
        "new_users_heldout_prompts": new_user_summary(scored, len(contexts), len(prompts), args.samples,
                                                      args.best_of),
        "personalization": personalization(scored, population),
        "hacking": {name: round_curves(folder / name / "round_candidates.jsonl", population) for name in runs},
        "training": {},
        "population_new_users": population.settings["new_users"],
        "train_users": args.train_users, "train_prompts": args.train_prompts,
        "budget_seconds": args.budget_seconds, "reused": args.reuse,
        "latent_guidance_scale": guidance,
    }
    for name, results in runs.items():
        run = results["runs"]["all"]
        summary["training"][name] = {
            "reward": "VPL" if TRAINED[name][0] == "vpl" else "Bradley-Terry", "train_seconds": run["train_seconds"],
            "steps": run["steps"], "rounds": len(run.get("rounds", [])), "seconds_spent": run["seconds"],
        }
    if args.generation_timings:
        summary["generation"] = generation_levers(prompts)
    summary["seconds"] = time.perf_counter() - start
    (folder / "summary.json").write_text(json.dumps(summary, indent=2))

    results = Path(args.results)
    results.parent.mkdir(parents=True, exist_ok=True)
    plot_hacking(summary["hacking"], results.parent / f"{results.stem}_hacking.png")
    plot_new_users(summary["new_users_heldout_prompts"], results.parent / f"{results.stem}_new_users.png")
    results.write_text(render(summary, command, results.stem, args.note))
    print(results.read_text())
    return summary


if __name__ == "__main__":
    main()
