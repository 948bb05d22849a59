"""Evaluating personalized policies: completions per user on held-out prompts, scored by every user's reward.

`matrix[a][b]` is the mean reward under user `b`'s latent of the completions that the policy produced for
user `a` (conditioned on `a`, or `a`'s adapter); its diagonal is each user's own reward. `PolicyEvaluation` computes
its rows, `summarize` the results and `write_results` their files.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import PartialState
from accelerate.utils import gather_object
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ..inference.generation import GenerationSettings, generate_candidates
from ..inference.scoring import PersonalizedRewardScorer
from .conditioning import PolicyConditioning

Matrix = dict[str, dict[str, float]]
# up to this many users, the cross-user matrix is printed and its PNG shows every cell's value; beyond, a figure
# with a cell per user pair would grow with the square of the users (192 users: a 59 MB PNG, 8 minutes to draw)
LABELLED_USERS = 12


def score_completions(
    scorer: PersonalizedRewardScorer, completions: Sequence[tuple[Any, str]], latents: Mapping[str, torch.Tensor]
) -> list[dict[str, Any]]:
    """Each completion with its reward under every user's latent: `{prompt, completion, rewards: {user: r}}`."""
    scores = scorer.score_users([p for p, _ in completions], [t for _, t in completions], latents)
    return [
        {"prompt": prompt, "completion": text, "rewards": {user: rewards[i] for user, rewards in scores.items()}}
        for i, (prompt, text) in enumerate(completions)
    ]


def mean_rewards(records: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """One row of the cross-user matrix: the mean reward of scored completions under each user's latent."""
    return {user: sum(r["rewards"][user] for r in records) / len(records) for user in records[0]["rewards"]}


@dataclass
class PolicyEvaluation:
    """Held-out prompts answered by a policy for each user, and every answer scored by every user's reward.

    The policy for a user sees `prompts` under `conditioning` given the user's `contexts` (their pairs, and for a
    latent-conditioned policy the `z` that the scorer encodes from them); each answer is scored under every user's
    latent in `latents`. `samples` answers per prompt, generated with `settings`.
    """

    scorer: PersonalizedRewardScorer
    latents: Mapping[str, torch.Tensor]
    prompts: Sequence[Any]
    contexts: Mapping[str, Sequence[Mapping[str, Any]]]
    conditioning: PolicyConditioning
    chat: bool
    samples: int
    settings: GenerationSettings

    def policy_inputs(self, user: str) -> tuple[list[Any], torch.Tensor | None]:
        """The prompts the policy for `user` answers, and the latent it is conditioned on (latent conditioning)."""
        context = self.contexts[user]
        prompts = [self.conditioning.prompt(prompt, context, self.chat) for prompt in self.prompts]
        return prompts, self.scorer.user_latent(context) if self.conditioning.uses_latent else None

    def __call__(
        self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, users: Sequence[str], stage: str
    ) -> tuple[Matrix, list[dict[str, Any]]]:
        """Rows of the cross-user matrix for `users`, and every scored completion (tagged with `stage` and the user
        the policy served). Users whose policy inputs coincide share one generation; the generations are shared out
        among the processes, which must all call this together."""
        jobs: dict[str, tuple[list[Any], torch.Tensor | None]] = {}
        key_of = {}
        for user in users:
            prompts, latent = self.policy_inputs(user)
            key = json.dumps([prompts, None if latent is None else latent.tolist()], sort_keys=True, default=str)
            key_of[user] = key
            jobs.setdefault(key, (prompts, latent))
        state = PartialState()
        keys = list(jobs)[state.process_index :: state.num_processes]
        # every user's prompts in one generation call, batched across users (a batch of one user's few sequences
        # is several times slower per sequence on a CPU)
        prompts = [prompt for key in keys for prompt in jobs[key][0]]
        latents = None
        if keys and jobs[keys[0]][1] is not None:
            latents = torch.cat([jobs[key][1].reshape(1, -1).expand(len(jobs[key][0]), -1) for key in keys])
        texts = generate_candidates(model, tokenizer, prompts, self.samples, self.settings, latents=latents,
                                    progress="Evaluation samples") if prompts else []
        completions, spans, size = [], {}, len(self.prompts)
        for number, key in enumerate(keys):
            begin = len(completions)
            answers = texts[number * size : (number + 1) * size]
            completions += [(raw, text) for raw, candidates in zip(self.prompts, answers) for text in candidates]
            spans[key] = (begin, len(completions))
        # all of them scored in one call, the reward head batched across users' completions (one call per user's
        # handful of completions is most of the evaluation's time with many users)
        every = score_completions(self.scorer, completions, self.latents) if completions else []
        mine = {key: every[begin:end] for key, (begin, end) in spans.items()}
        scored = {key: records for part in gather_object([mine]) for key, records in part.items()}
        rows: Matrix = {user: mean_rewards(scored[key_of[user]]) for user in users}
        records = [{"stage": stage, "policy_for": user, **record} for user in users for record in scored[key_of[user]]]
        return rows, records


def margin_interval(
    records: Sequence[Mapping[str, Any]], user: str, stage: str = "after", resamples: int = 2000, seed: int = 0
) -> tuple[float, float]:
    """A 95% bootstrap interval of `user`'s margin: the mean reward, under `user`'s reward, of the completions of the
    policy for `user` minus that of the other users' policies (each side resampled over its completions)."""
    own = torch.tensor([r["rewards"][user] for r in records if r["stage"] == stage and r["policy_for"] == user])
    other = torch.tensor([r["rewards"][user] for r in records if r["stage"] == stage and r["policy_for"] != user])
    generator = torch.Generator().manual_seed(seed)
    own_means = own[torch.randint(len(own), (resamples, len(own)), generator=generator)].mean(dim=1)
    other_means = other[torch.randint(len(other), (resamples, len(other)), generator=generator)].mean(dim=1)
    low, high = torch.quantile(own_means - other_means, torch.tensor([0.025, 0.975], dtype=own_means.dtype))
    return float(low), float(high)


def summarize(
    before: Matrix, after: Matrix, completions: Sequence[Mapping[str, Any]] = (), **extra: Any
) -> dict[str, Any]:
    """Own-reward before/after per user, both matrices, and how much more each policy suits its own user (with a
    95% bootstrap interval over the scored `completions`, when given)."""
    users = list(after)
    results: dict[str, Any] = dict(extra)
    results["users"] = users
    results["own_reward"] = {
        u: {"before": before[u][u], "after": after[u][u], "gain": after[u][u] - before[u][u]} for u in users
    }
    results["matrix_before"] = before
    results["matrix_after"] = after
    if len(users) > 1:
        results["personalization_margin_after"] = {
            u: after[u][u] - sum(after[v][u] for v in users if v != u) / (len(users) - 1) for u in users
        }
        if completions:
            results["personalization_margin_ci95_after"] = {u: margin_interval(completions, u) for u in users}
    return results


def format_results(results: Mapping[str, Any]) -> str:
    """A table of each user's own reward before and after, then the cross-user matrix after training (up to
    `LABELLED_USERS` users)."""
    users = results["users"]
    margins = results.get("personalization_margin_after", {})
    intervals = results.get("personalization_margin_ci95_after", {})
    lines = [
        "| user | reward before | reward after | gain | margin after | margin 95% CI |",
        "|---|---|---|---|---|---|",
    ]
    for user in users:
        own = results["own_reward"][user]
        margin = f"{margins[user]:+.4f}" if user in margins else "-"
        interval = "[{:+.2f}, {:+.2f}]".format(*intervals[user]) if user in intervals else "-"
        lines.append(
            f"| {user} | {own['before']:+.4f} | {own['after']:+.4f} | {own['gain']:+.4f} | {margin} | {interval} |"
        )
    if len(users) > LABELLED_USERS:
        lines += ["", f"The cross-user matrix of the {len(users)} users is in eval_results.json and eval_matrix.png."]
        return "\n".join(lines)
    lines += ["", "Cross-user rewards after training (rows: policy for user; columns: reward of user)", ""]
    lines.append("| policy for \\ reward of | " + " | ".join(users) + " |")
    lines.append("|---|" + "---|" * len(users))
    for row_user in users:
        cells = " | ".join(f"{results['matrix_after'][row_user][u]:+.4f}" for u in users)
        lines.append(f"| {row_user} | {cells} |")
    return "\n".join(lines)


def plot_matrices(results: Mapping[str, Any], path: str | Path) -> Path:
    """A heatmap PNG of the cross-user matrix before and after training: every cell's value and every user's name
    up to `LABELLED_USERS` users; beyond, the heatmaps alone in a figure of bounded size, a few users named."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    users = results["users"]
    panels = [("before training", results["matrix_before"]), ("after training", results["matrix_after"])]
    values = [[[m[a][b] for b in users] for a in users] for _, m in panels]
    low = min(v for grid in values for row in grid for v in row)
    high = max(v for grid in values for row in grid for v in row)
    labelled = len(users) <= LABELLED_USERS
    size = 1.2 + 0.9 * min(len(users), LABELLED_USERS)
    ticks = range(0, len(users), 1 if labelled else -(-len(users) // LABELLED_USERS))
    figure, axes = plt.subplots(1, 2, figsize=(2 * size + 1.5, size), constrained_layout=True)
    for axis, (title, _), grid in zip(axes, panels, values):
        image = axis.imshow(grid, cmap="viridis", vmin=low, vmax=high)
        axis.set_title(title if labelled else f"{title} ({len(users)} users)")
        axis.set_xticks(ticks, [users[i] for i in ticks], rotation=45, ha="right")
        axis.set_yticks(ticks, [users[i] for i in ticks])
        axis.set_xlabel("reward of user")
        axis.set_ylabel("policy for user")
        if labelled:
            for i, row in enumerate(grid):
                for j, value in enumerate(row):
                    axis.text(
                        j, i, f"{value:.2f}", ha="center", va="center", color="w" if value < (low + high) / 2 else "k"
                    )
    figure.colorbar(image, ax=list(axes), shrink=0.8, label="mean reward")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def write_results(
    results: Mapping[str, Any], output_dir: str | Path, completions: Sequence[Mapping[str, Any]] = ()
) -> dict[str, Path]:
    """`eval_results.json` in `output_dir`, and when `results` hold an evaluation (its cross-user matrices),
    `eval_matrix.png` and `eval_completions.jsonl` (every scored completion)."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    json_path = output_dir / "eval_results.json"
    json_path.write_text(json.dumps(results, indent=2, default=str))
    if "matrix_after" not in results:
        return {"json": json_path}
    completions_path = output_dir / "eval_completions.jsonl"
    with open(completions_path, "w", encoding="utf-8") as handle:
        for record in completions:
            handle.write(json.dumps(record, default=str) + "\n")
    png_path = plot_matrices(results, output_dir / "eval_matrix.png")
    return {"json": json_path, "png": png_path, "completions": completions_path}
