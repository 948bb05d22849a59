"""Attaching user contexts: the K labelled pairs from which the encoder infers a user's latent."""

from __future__ import annotations

import random
from collections import defaultdict
from typing import Any

from datasets import Dataset

from .format import PreferenceDataError

CONTEXT_KEYS = ("prompt", "chosen", "rejected")


def _pair(example: dict[str, Any]) -> dict[str, Any]:
    return {"prompt": example.get("prompt") or "", "chosen": example["chosen"], "rejected": example["rejected"]}


def parse_num_context(value: int | str) -> tuple[int, int]:
    """`8` -> (8, 8); `"4-8"` -> (4, 8): K fixed, or drawn uniformly per example."""
    if isinstance(value, int):
        low = high = value
    else:
        text = str(value).strip()
        try:
            low, high = (int(part) for part in text.split("-")) if "-" in text else (int(text), int(text))
        except ValueError:
            raise ValueError(f"num_context must be an integer or a range 'LOW-HIGH', got {value!r}.") from None
    if not 1 <= low <= high:
        raise ValueError(f"num_context must satisfy 1 <= LOW <= HIGH, got {value!r}.")
    return low, high


def attach_contexts(
    dataset: Dataset,
    num_context: int | str,
    seed: int,
    pool: Dataset | None = None,
    name: str = "dataset",
) -> Dataset:
    """Give every example without a `context` K pairs labelled by its user.

    Pairs are drawn from `pool` (by default the dataset itself), never the example itself, and
    deterministically from `seed`. Evaluation sets pass the training set as `pool`.
    """
    if "context" in dataset.column_names and all(c is not None for c in dataset["context"]):
        return dataset
    if "user_id" not in dataset.column_names:
        raise PreferenceDataError(f"{name}: contexts are drawn per user, but the data has no `user_id` column.")
    low, high = parse_num_context(num_context)
    pool_is_self = pool is None
    pool = dataset if pool is None else pool
    by_user: dict[Any, list[int]] = defaultdict(list)
    for index, user in enumerate(pool["user_id"]):
        by_user[user].append(index)
    pool_rows = pool.select_columns([c for c in CONTEXT_KEYS if c in pool.column_names]).to_list()
    existing = dataset["context"] if "context" in dataset.column_names else [None] * len(dataset)

    contexts = []
    for index, (user, given) in enumerate(zip(dataset["user_id"], existing)):
        if given is not None:
            contexts.append(given)
            continue
        rng = random.Random(f"{seed}-{name}-{index}")
        members = by_user.get(user, [])
        excluded = int(pool_is_self)  # the example itself is one of its user's pairs: never its own context
        if len(members) - excluded <= 0:
            raise PreferenceDataError(
                f"{name}, example {index + 1}: user {user!r} has no other labelled pairs to draw a context from; "
                "give this example a `context` or add pairs labelled by this user."
            )
        k = rng.randint(low, high)
        if k <= len(members) - excluded:  # draw K + 1 positions and drop the example's own: O(K), not O(pool)
            picks = [members[j] for j in rng.sample(range(len(members)), min(k + excluded, len(members)))]
            chosen = [i for i in picks if not (excluded and i == index)][:k]
        else:  # fewer pairs than K: draw with replacement
            chosen = rng.choices([i for i in members if not (excluded and i == index)], k=k)
        contexts.append([_pair(pool_rows[i]) for i in chosen])
    if "context" in dataset.column_names:
        dataset = dataset.remove_columns("context")
    return dataset.add_column("context", contexts)
