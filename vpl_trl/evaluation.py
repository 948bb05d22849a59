"""Preference accuracy of a trained reward model: overall, per user, on controversial and agreed pairs,
with latent diagnostics, and the context-swap test (is the reward really using the user's latent?)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from datasets import Dataset

from .data.context import attach_contexts
from .trainer.vpl_reward_trainer import count_active_units


def preference_metrics(predictions: dict[str, Any]) -> dict[str, Any]:
    """Accuracy overall, per user, and on controversial/agreed pairs from `predict_preferences` output."""
    correct = np.asarray(predictions["reward_chosen"]) > np.asarray(predictions["reward_rejected"])
    metrics: dict[str, Any] = {"accuracy": float(correct.mean()) if len(correct) else float("nan"), "n_eval": len(correct)}
    if "user_id" in predictions:
        users = np.asarray(predictions["user_id"])
        metrics["per_user"] = {str(u): float(correct[users == u].mean()) for u in sorted(set(users.tolist()))}
    if "controversial" in predictions:
        controversial = np.asarray(predictions["controversial"], dtype=bool)
        for name, mask in (("controversial_accuracy", controversial), ("agreed_accuracy", ~controversial)):
            metrics[name] = float(correct[mask].mean()) if mask.any() else None
        if "user_id" in predictions:
            metrics["per_user_controversial"] = {
                str(u): float(correct[(users == u) & controversial].mean())
                for u in sorted(set(users.tolist()))
                if ((users == u) & controversial).any()
            }
    if "latent_mean" in predictions:
        metrics["kl"] = float(np.mean(predictions["kl"]))
        metrics["active_units"] = count_active_units(_as_tensor(predictions["latent_mean"]))
    return metrics


def _as_tensor(rows):
    import torch

    return torch.tensor(np.asarray(rows, dtype=np.float32))


def swap_contexts(dataset: Dataset, pool: Dataset, num_context: int | str, seed: int) -> Dataset:
    """Give every example a context drawn from ANOTHER user's pairs (users taken in a cycle).

    A reward model that uses the latent loses accuracy on controversial pairs when contexts are swapped;
    one that ignores the user does not.
    """
    users = sorted(set(pool["user_id"]))
    if len(users) < 2:
        raise ValueError("the context swap needs at least two users in the training pool.")
    other = {u: users[(i + 1) % len(users)] for i, u in enumerate(users)}
    back = {v: k for k, v in other.items()}
    if "context" in dataset.column_names:
        dataset = dataset.remove_columns("context")
    # Label each example with the other user, draw that user's context, then restore the example's own user.
    relabeled = dataset.map(lambda e: {"user_id": other[e["user_id"]]})
    relabeled = attach_contexts(relabeled, num_context, seed, pool=pool, name="context-swap")
    return relabeled.map(lambda e: {"user_id": back[e["user_id"]]})


def evaluate_reward_model(
    trainer, dataset: Dataset, name: str = "test", context_swap: bool = True, predictions: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Metrics of the trainer's model on `dataset` (from `predictions` of `trainer.predict_preferences` when the
    caller has them); for VPL models also the accuracy with swapped contexts."""
    metrics = preference_metrics(predictions if predictions is not None else trainer.predict_preferences(dataset, name=name))
    pool = getattr(trainer, "_context_pool", None)
    if context_swap and trainer.model.config.use_latent and pool is not None and len(set(pool["user_id"])) > 1:
        swapped = swap_contexts(dataset, pool, trainer.args.num_context, trainer.args.seed)
        swap_metrics = preference_metrics(trainer.predict_preferences(swapped, name=f"{name}-context-swap"))
        metrics["context_swap"] = {
            key: swap_metrics.get(key) for key in ("accuracy", "per_user", "controversial_accuracy", "agreed_accuracy")
        }
    return metrics


def format_table(results: dict[str, dict[str, Any]]) -> str:
    """A markdown table of several runs' metrics: one row per run, accuracy per user and pair type."""
    users = sorted({u for r in results.values() for u in r.get("per_user", {})})
    header = ["run", "accuracy", *[f"user {u}" for u in users], "controversial", "agreed", "ctx swap (contr.)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for run, metrics in results.items():
        swap = (metrics.get("context_swap") or {}).get("controversial_accuracy")
        cells = [run, format_percent(metrics.get("accuracy"))]
        cells += [format_percent(metrics.get("per_user", {}).get(u)) for u in users]
        cells += [format_percent(metrics.get(key)) for key in ("controversial_accuracy", "agreed_accuracy")]
        cells.append(format_percent(swap))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def format_percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def per_user_breakdown(predictions: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Each user's accuracy overall, on controversial and on agreed pairs, with the number of pairs."""
    if "user_id" not in predictions:
        return {}
    correct = np.asarray(predictions["reward_chosen"]) > np.asarray(predictions["reward_rejected"])
    users = np.asarray(predictions["user_id"])
    controversial = np.asarray(predictions["controversial"], dtype=bool) if "controversial" in predictions else None
    breakdown = {}
    for user in sorted(set(users.tolist())):
        mine = users == user
        row: dict[str, Any] = {"accuracy": float(correct[mine].mean()), "n": int(mine.sum())}
        if controversial is not None:
            for name, mask in (("controversial_accuracy", mine & controversial), ("agreed_accuracy", mine & ~controversial)):
                row[name] = float(correct[mask].mean()) if mask.any() else None
        breakdown[str(user)] = row
    return breakdown


def default_context_sizes(pool: Dataset, max_context: int = 32) -> list[int]:
    """1, 2, 4, 8, ... up to the smallest user's number of pairs in `pool` (and at most `max_context`)."""
    counts = Counter(pool["user_id"])
    largest = min(min(counts.values()), max_context)
    sizes = [1]
    while sizes[-1] * 2 <= largest:
        sizes.append(sizes[-1] * 2)
    if sizes[-1] < largest:
        sizes.append(largest)
    return sizes


def context_size_curve(
    predict: Callable[..., dict[str, Any]],
    dataset: Dataset,
    pool: Dataset,
    context_sizes: Sequence[int],
    draws: int = 5,
    seed: int = 0,
) -> dict[str, Any]:
    """Accuracy against the number K of context pairs: for each K, `draws` fresh draws of every example's
    context from its user's pairs in `pool`, each scored by `predict(dataset, name=...)` (e.g. the trainer's
    `predict_preferences`). Returns, per K, the accuracy of each draw overall and on controversial pairs."""
    if "context" in dataset.column_names:
        dataset = dataset.remove_columns("context")
    curve: dict[str, Any] = {"k": list(context_sizes), "draws": draws, "accuracy": [], "controversial_accuracy": []}
    for k in context_sizes:
        overall, controversial = [], []
        for draw in range(draws):
            name = f"context-curve-k{k}-draw{draw}"
            with_context = attach_contexts(dataset, k, seed, pool=pool, name=name)
            metrics = preference_metrics(predict(with_context, name=name))
            overall.append(metrics["accuracy"])
            controversial.append(metrics.get("controversial_accuracy"))
        curve["accuracy"].append(overall)
        curve["controversial_accuracy"].append(controversial if all(c is not None for c in controversial) else None)
    return curve
