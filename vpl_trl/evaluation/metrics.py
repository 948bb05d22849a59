"""Preference accuracy of a trained reward model: overall, per user, on controversial and agreed pairs,
against the users' true preference where the data knows it (simulated populations), with latent diagnostics,
and the context-swap test (is the reward really using the user's latent?)."""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from datasets import Dataset

from ..data.context import attach_contexts
from ..trainer.vpl_reward_trainer import count_active_units
from .diagnostics import latent_weight_r2

WORST_FRACTION = 0.1  # the worst-served users reported beside the mean


def _controversy(predictions: dict[str, Any]) -> tuple[np.ndarray, np.ndarray] | None:
    """(controversial, known) masks; a pair whose `controversial` is null is unknown, neither kind."""
    if "controversial" not in predictions:
        return None
    values = list(predictions["controversial"])
    known = np.array([v is not None for v in values], dtype=bool)
    return np.array([bool(v) for v in values], dtype=bool) & known, known


def preference_metrics(predictions: dict[str, Any]) -> dict[str, Any]:
    """Accuracy overall, per user, and on controversial/agreed pairs from `predict_preferences` output; with a
    `true_margin` (the user's true utility difference, chosen minus rejected), also the accuracy against the
    true preference (`true_accuracy`; `accuracy` is always against the labels)."""
    margins = np.asarray(predictions["reward_chosen"]) - np.asarray(predictions["reward_rejected"])
    correct = margins > 0
    metrics: dict[str, Any] = {
        "accuracy": float(correct.mean()) if len(correct) else float("nan"),
        "n_eval": len(correct),
    }
    users = np.asarray(predictions["user_id"]) if "user_id" in predictions else None
    if users is not None:
        metrics["per_user"] = {str(u): float(correct[users == u].mean()) for u in sorted(set(users.tolist()))}
    truly_correct = true_correct(margins, predictions)
    if truly_correct is not None:
        metrics["true_accuracy"] = float(truly_correct.mean())
        if users is not None:
            per_user = [float(truly_correct[users == u].mean()) for u in sorted(set(users.tolist()))]
            metrics["true_accuracy_worst_decile"] = worst_fraction_mean(per_user)
    controversy = _controversy(predictions)
    if controversy is not None:
        controversial, known = controversy
        for name, mask in (("controversial_accuracy", controversial), ("agreed_accuracy", known & ~controversial)):
            metrics[name] = float(correct[mask].mean()) if mask.any() else None
        metrics["controversy_unknown"] = int((~known).sum())
        if users is not None:
            metrics["per_user_controversial"] = {
                str(u): float(correct[(users == u) & controversial].mean())
                for u in sorted(set(users.tolist()))
                if ((users == u) & controversial).any()
            }
    if "latent_mean" in predictions:
        metrics["kl"] = float(np.mean(predictions["kl"]))
        metrics["active_units"] = count_active_units(_as_tensor(predictions["latent_mean"]))
    return metrics


def true_correct(margins: np.ndarray, predictions: dict[str, Any]) -> np.ndarray | None:
    """1 where a predicted margin has the sign of the true one, 0 where not, 0.5 on a true tie; None without
    `true_margin`."""
    if "true_margin" not in predictions:
        return None
    truth = np.sign(np.asarray(predictions["true_margin"], dtype=float))
    return np.where(truth == 0, 0.5, (np.sign(margins) == truth).astype(float))


def worst_fraction_mean(values: Sequence[float], fraction: float = WORST_FRACTION) -> float | None:
    """Mean of the lowest `fraction` of `values` (at least one): the worst-served users' accuracy."""
    if not len(values):
        return None
    ordered = np.sort(np.asarray(values, dtype=float))
    return float(ordered[: max(1, int(round(fraction * len(ordered))))].mean())


def _as_tensor(rows):
    import torch

    return torch.tensor(np.asarray(rows, dtype=np.float32))


def own_contexts(dataset: Dataset) -> dict[Any, list[dict[str, Any]]]:
    """Each user's own context, for users whose rows bring one (new users, absent from the training pool)."""
    if "context" not in dataset.column_names:
        return {}
    contexts: dict[Any, list[dict[str, Any]]] = {}
    for user, context in zip(dataset["user_id"], dataset["context"]):
        if context:
            contexts.setdefault(user, context)
    return contexts


def limit_contexts(dataset: Dataset, k: int, seed: int | None = None) -> Dataset:
    """Keep K pairs of each row's own context: its first K (any prefix of a user's context is a valid context),
    or with `seed` K drawn at random, the same K for all of a user's rows."""
    if "context" not in dataset.column_names:
        return dataset

    def pick(user: Any, context: list | None) -> list | None:
        if not context or len(context) <= k:
            return context
        if seed is None:
            return context[:k]
        chosen = sorted(random.Random(f"{seed}-{user}-{k}").sample(range(len(context)), k))
        return [context[i] for i in chosen]

    contexts = [pick(u, c) for u, c in zip(dataset["user_id"], dataset["context"])]
    return dataset.remove_columns("context").add_column("context", contexts)


def swap_contexts(dataset: Dataset, pool: Dataset | None, num_context: int | str, seed: int) -> Dataset:
    """Give every example the context of ANOTHER user, drawn at random among the training pool's users and
    the users who bring their own context (new users).

    A reward model that uses the latent loses accuracy on controversial pairs when contexts are swapped;
    one that ignores the user does not. A context from the pool has `num_context` pairs; a user's own
    context is used as it is.
    """
    own = own_contexts(dataset)
    pool_users = set(pool["user_id"]) if pool is not None else set()
    users = sorted(pool_users | set(own), key=str)
    if len(users) < 2:
        raise ValueError("the context swap needs at least two users (in the training pool or bringing contexts).")
    rng = random.Random(f"{seed}-context-swap")
    other = []
    for user in dataset["user_id"]:
        pick = rng.choice(users)
        while pick == user:
            pick = rng.choice(users)
        other.append(pick)
    # Label each example with the other user, give it that user's context, then restore the example's own user.
    contexts = [own.get(o) if o in own and o not in pool_users else None for o in other]
    relabeled = dataset.remove_columns([c for c in ("context", "user_id") if c in dataset.column_names])
    relabeled = relabeled.add_column("user_id", other).add_column("context", contexts)
    if any(c is None for c in contexts):
        relabeled = attach_contexts(relabeled, num_context, seed, pool=pool, name="context-swap")
    return relabeled.remove_columns("user_id").add_column("user_id", list(dataset["user_id"]))


def predict(predictor, dataset: Dataset, name: str, batch_size: int | None = None) -> dict[str, Any]:
    """`predictor.predict_preferences` (a `VPLRewardTrainer`'s, or a `RewardInference`'s for a saved model), with the
    rows' `true_margin` when the data knows the true preference."""
    predictions = predictor.predict_preferences(dataset, batch_size=batch_size, name=name)
    if "true_margin" in dataset.column_names:
        predictions["true_margin"] = list(dataset["true_margin"])
    return predictions


def evaluate_reward_model(
    predictor, dataset: Dataset, name: str = "test", context_swap: bool = True,
    predictions: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Metrics of a reward model on `dataset`, predicted by `predictor` (a `VPLRewardTrainer`, or a `RewardInference`
    for a saved model; from `predictions` of `predict` when the caller has them); for VPL models also the accuracy
    with swapped contexts (another user's, drawn at random)."""
    metrics = preference_metrics(predictions if predictions is not None else predict(predictor, dataset, name))
    inference = predictor.inference
    pool = inference.context_pool
    users = (set(pool["user_id"]) if pool is not None else set()) | set(own_contexts(dataset))
    if context_swap and inference.uses_latent and len(users) > 1:
        swapped = swap_contexts(dataset, pool, inference.num_context, inference.seed)
        swap_metrics = preference_metrics(predict(predictor, swapped, f"{name}-context-swap"))
        metrics["context_swap"] = {
            key: swap_metrics.get(key)
            for key in ("accuracy", "true_accuracy", "per_user", "controversial_accuracy", "agreed_accuracy")
            if key in swap_metrics
        }
    return metrics


def one_row_per_user(dataset: Dataset) -> Dataset:
    """The first row of each user, users in the order they first appear."""
    first: dict[Any, int] = {}
    for index, user in enumerate(dataset["user_id"]):
        first.setdefault(user, index)
    return dataset.select(list(first.values()))


def z_weight_r2(predictor, train_users: Dataset, pool: Dataset, new_users: Dataset, population, seed: int = 0,
                name: str = "z") -> float:
    """R^2 of simulated users' true weights (`population.weights(user)`) from their posterior mean of z, by
    `diagnostics.latent_weight_r2`: fitted on the users of `train_users`, each given a context of as many of
    their `pool` pairs as the new users bring, and scored on the users of `new_users`, each with their own
    context."""
    new_first = one_row_per_user(new_users)
    train_first = one_row_per_user(train_users)
    if "context" in train_first.column_names:
        train_first = train_first.remove_columns("context")
    train_first = attach_contexts(train_first, len(new_first[0]["context"]), seed, pool=pool, name=f"{name}-train")
    latents, weights = {}, {}
    for split, users in (("train", train_first), ("new", new_first)):
        latents[split] = predictor.predict_preferences(users, name=f"{name}-{split}")["latent_mean"]
        weights[split] = [population.weights(u) for u in users["user_id"]]
    return latent_weight_r2(latents["train"], weights["train"], latents["new"], weights["new"])


def format_table(results: dict[str, dict[str, Any]], max_user_columns: int = 12) -> str:
    """A markdown table of several runs' metrics: one row per run, accuracy per user (for more than
    `max_user_columns` users, the worst 10% of users instead) and pair type, and against the true preference
    where the data knows it."""
    users = sorted({u for r in results.values() for u in r.get("per_user", {})})
    many = len(users) > max_user_columns
    truth = any("true_accuracy" in r for r in results.values())
    user_columns = ["worst 10% of users"] if many else [f"user {u}" for u in users]
    header = ["run", "accuracy", *user_columns, "controversial", "agreed", "ctx swap (contr.)"]
    header += ["true preference", "ctx swap (true)"] if truth else []
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for run, metrics in results.items():
        swap = metrics.get("context_swap") or {}
        per_user = metrics.get("per_user", {})
        cells = [run, format_percent(metrics.get("accuracy"))]
        if many:
            cells.append(format_percent(worst_fraction_mean(list(per_user.values())) if per_user else None))
        else:
            cells += [format_percent(per_user.get(u)) for u in users]
        cells += [format_percent(metrics.get(key)) for key in ("controversial_accuracy", "agreed_accuracy")]
        cells.append(format_percent(swap.get("controversial_accuracy")))
        if truth:
            cells += [format_percent(metrics.get("true_accuracy")), format_percent(swap.get("true_accuracy"))]
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
            for name, mask in (
                ("controversial_accuracy", mine & controversial),
                ("agreed_accuracy", mine & ~controversial),
            ):
                row[name] = float(correct[mask].mean()) if mask.any() else None
        breakdown[str(user)] = row
    return breakdown


def default_context_sizes(pool: Dataset, max_context: int = 32) -> list[int]:
    """1, 2, 4, 8, ... up to the smallest user's number of pairs in `pool` (and at most `max_context`)."""
    return context_sizes_up_to(min(Counter(pool["user_id"]).values()), max_context)


def context_sizes_up_to(largest: int, max_context: int = 32) -> list[int]:
    """1, 2, 4, ... up to `largest` (and at most `max_context`), with that largest K itself last."""
    largest = min(largest, max_context)
    sizes = [1]
    while sizes[-1] * 2 <= largest:
        sizes.append(sizes[-1] * 2)
    return sizes + ([largest] if sizes[-1] < largest else [])


def context_size_curve(
    predict: Callable[..., dict[str, Any]],
    dataset: Dataset,
    pool: Dataset | None,
    context_sizes: Sequence[int],
    draws: int = 5,
    seed: int = 0,
) -> dict[str, Any]:
    """Accuracy against the number K of context pairs: for each K, `draws` fresh draws of every example's
    context, each scored by `predict(dataset, name=...)` (e.g. `partial(metrics.predict, trainer)`). Users
    who bring their own context (new users) get K of its pairs, the same K for all their rows; the others K of
    their pairs in `pool`. Returns, per K, the accuracy of each draw overall, on controversial pairs and, where
    the data knows it, against the true preference (with the mean of the worst decile of users)."""
    brings_own = bool(own_contexts(dataset))
    if "context" in dataset.column_names and not brings_own:
        dataset = dataset.remove_columns("context")
    keys = ("accuracy", "controversial_accuracy", "true_accuracy", "true_accuracy_worst_decile")
    curve: dict[str, Any] = {"k": list(context_sizes), "draws": draws, **{key: [] for key in keys}}
    for k in context_sizes:
        per_draw: dict[str, list] = {key: [] for key in keys}
        for draw in range(draws):
            name = f"context-curve-k{k}-draw{draw}"
            if brings_own:
                with_context = limit_contexts(dataset, k, seed=seed * 1_000 + draw)
            else:
                with_context = attach_contexts(dataset, k, seed, pool=pool, name=name)
            metrics = preference_metrics(predict(with_context, name=name))
            for key in keys:
                per_draw[key].append(metrics.get(key))
        for key in keys:
            values = per_draw[key]
            curve[key].append(values if all(v is not None for v in values) else None)
    for key in keys[2:]:
        if all(v is None for v in curve[key]):
            del curve[key]
    return curve
