"""Choosing a reward model's settings on pseudo-new users: training users held out as new users would come.

A fraction of the training users is held out whole (`split_pseudo_new_users`): each brings some of their own pairs as
context, and their other pairs are scored, in folds (`selection_folds`) that each take another part as the context.
Every candidate of a small grid of training settings (for example the KL weight, the epochs, the context draws) is
trained on the other users and scored on the held-out ones at several context sizes K, with the user's latent taken
from the encoder or fitted to their pairs (each of `latent_fit_precisions`, `VPLRewardModel.fit_latent`) and scaled
by each of `latent_scales` (0 is the pooled reward every user starts from, with the residual decoder). At each K a
scale is kept, never smaller at a larger K, the best such table: a user's few pairs move the reward only as far as
that paid on held-out users (at worst, scale 0, not at all); a scale above the smallest must beat it at that K beyond
noise (per-user gains, one-sided 95% bootstrap over the users) without losing more than a point on the worst decile
of users. The candidate and latent fit with the best mean accuracy over the K values are what the final model
(trained on every user) uses, saved with its table of scales as its `latent_scale`: `select_settings` returns them
with every candidate's scores and the reason.

`recipes/train_reward.py` runs it when `--selection_fraction` is above 0 and writes `DIR/selection.json`.
"""

from __future__ import annotations

import itertools
import json
import random
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from datasets import Dataset

from .data.format import PreferenceDataError
from .evaluation.metrics import limit_contexts, worst_fraction_mean
from .models.modeling_vpl import LATENT_DECODERS

SELECTION_FILE = "selection.json"
PREDICTION_BATCH = 128  # pairs per prediction step: the heads are small, the per-step overhead is not
BOOTSTRAP_RESAMPLES = 2000
NO_HARM_CONFIDENCE = 0.95  # one-sided: a scale's gain over the pooled reward must be above 0 at this confidence
WORST_DECILE_SLACK = 0.01  # the worst decile's accuracy a scale may lose against the pooled reward


@dataclass
class SelectionArguments:
    """Selection on pseudo-new users (off when `selection_fraction` is 0)."""

    selection_fraction: float = field(
        default=0.0, metadata={"help": "Share of the training users held out as pseudo-new users to choose the "
                                       "settings on (0: no selection)."}
    )
    selection_grid: str | None = field(
        default=None,
        metadata={"help": "Training settings to choose among, as a mapping of VPLRewardConfig fields to lists of "
                          "values (YAML/JSON, e.g. '{kl_weight: [1e-3, 1e-2]}'); every combination is tried."},
    )
    selection_context_sizes: str = field(
        default="1,4,16", metadata={"help": "Context sizes K at which pseudo-new users are scored (the score is the "
                                            "mean accuracy over them)."}
    )
    selection_latent_scales: str = field(
        default="0,0.5,1", metadata={"help": "Factors of the user's latent to try at inference (0: the pooled "
                                             "reward); the chosen one is saved as the model's latent_scale."}
    )
    selection_latent_fit_precisions: str = field(
        default="0", metadata={"help": "Latent fits to try at inference with each trained candidate: "
                                       "latent_fit_precision values (0: the encoder's mean, no fit); the chosen one "
                                       "is saved with the model."}
    )
    selection_context_pairs: int = field(
        default=16, metadata={"help": "Pairs of each pseudo-new user given as their context (at most half of theirs)."}
    )
    selection_folds: int = field(
        default=2, metadata={"help": "Times each pseudo-new user is scored, each time with another part of their "
                                     "pairs as the context and the rest scored (2: every pair of a user with 32 is "
                                     "scored once, with the other half as context)."}
    )

    def __post_init__(self):
        if not 0.0 <= self.selection_fraction < 1.0:
            raise ValueError(f"selection_fraction must be in [0, 1), got {self.selection_fraction}.")
        if self.selection_context_pairs < 1 or self.selection_folds < 1:
            raise ValueError(f"selection_context_pairs and selection_folds must be >= 1, got "
                             f"{self.selection_context_pairs} and {self.selection_folds}.")
        self.context_sizes = _numbers(self.selection_context_sizes, int, "selection_context_sizes")
        self.latent_scales = _numbers(self.selection_latent_scales, float, "selection_latent_scales")
        self.latent_fit_precisions = _numbers(self.selection_latent_fit_precisions, float,
                                              "selection_latent_fit_precisions")
        if any(k < 1 for k in self.context_sizes) or min(self.latent_scales + self.latent_fit_precisions) < 0:
            raise ValueError("selection_context_sizes must be >= 1, and selection_latent_scales and "
                             "selection_latent_fit_precisions >= 0.")

    @property
    def enabled(self) -> bool:
        return self.selection_fraction > 0

    def grid(self, config_fields: set[str]) -> list[dict[str, Any]]:
        """Every combination of the grid's values (one empty candidate without a grid), in a fixed order."""
        if self.selection_grid is None:
            return [{}]
        grid = self.selection_grid
        if isinstance(grid, str):
            grid = yaml.safe_load(grid)
        if not isinstance(grid, dict) or not grid:
            raise ValueError(f"selection_grid must map settings to lists of values, got {self.selection_grid!r}.")
        unknown = sorted(set(grid) - config_fields)
        if unknown:
            raise ValueError(f"selection_grid: {unknown} are not VPLRewardConfig fields.")
        values = [v if isinstance(v, list) else [v] for v in grid.values()]
        return [dict(zip(grid, combination)) for combination in itertools.product(*values)]


def _admissible(scores: dict[str, dict[str, Any]], scale: str, reference: str, k: str) -> bool:
    """Whether `scale` did no harm at K=`k` against the `reference` scale (the smallest, 0: the pooled reward) on
    the pseudo-new users: its gain in per-user accuracy is above 0 at one-sided 95% confidence (users resampled),
    and its worst decile of users is at most a point below the reference's. A gain within noise keeps the
    reference: a new user's few pairs move the reward only where that measurably paid."""
    if scale == reference:
        return True
    mine, base = scores[scale][k], scores[reference][k]
    if "per_user" not in mine:  # scores of an older selection.json: the mean accuracy decides
        return mine["accuracy"] > base["accuracy"]
    gains = np.asarray(mine["per_user"]) - np.asarray(base["per_user"])
    rng = np.random.default_rng(0)
    means = gains[rng.integers(len(gains), size=(BOOTSTRAP_RESAMPLES, len(gains)))].mean(axis=1)
    return bool(np.quantile(means, 1 - NO_HARM_CONFIDENCE) > 0
                and mine["worst_decile"] >= base["worst_decile"] - WORST_DECILE_SLACK)


def _best_scales(scores: dict[str, dict[str, Any]], context_sizes: list[int]) -> tuple[dict[str, float] | None, float]:
    """The latent scale at each context size, never smaller at a larger K (more of a user's pairs are trusted no
    less) and each doing no harm against the smallest scale (`_admissible`), with the best mean accuracy over the
    context sizes (ties: the smaller scales, nearer the pooled reward), and that mean; a model without a latent has
    one entry, `"-"`."""
    if "-" in scores:
        return None, scores["-"]["score"]
    scales = sorted(scores, key=float)
    ks = [str(k) for k in sorted(context_sizes)]
    allowed = {k: [_admissible(scores, scale, scales[0], k) for scale in scales] for k in ks}
    # best[i]: (total accuracy, scales so far) of the best admissible non-decreasing sequence ending at scales[i]
    # (None: no such sequence)
    best = [(scores[s][ks[0]]["accuracy"], [s]) if allowed[ks[0]][i] else None for i, s in enumerate(scales)]
    for k in ks[1:]:
        running, step = None, []
        for i, scale in enumerate(scales):
            if best[i] is not None and (running is None or best[i][0] > running[0]):
                running = best[i]
            step.append((running[0] + scores[scale][k]["accuracy"], running[1] + [scale])
                        if allowed[k][i] and running is not None else None)
        best = step
    # the first best: ties keep the smaller scales (the smallest scale everywhere is always admissible)
    total, chosen = max((item for item in best if item is not None), key=lambda item: item[0])
    return {k: float(s) for k, s in zip(ks, chosen)}, float(total / len(ks))


def _held_back(scores: dict[str, dict[str, Any]], table: dict[str, float]) -> str:
    """The context sizes where a larger scale than the chosen one scored a higher mean accuracy, with theirs."""
    notes = []
    for k, chosen in table.items():
        larger = [scale for scale in scores if float(scale) > chosen]
        best = max(larger, key=lambda scale: scores[scale][k]["accuracy"], default=None)
        if best is not None and scores[best][k]["accuracy"] > scores[f"{chosen:g}"][k]["accuracy"]:
            notes.append(f"K={k} (scale {best}: {100 * scores[best][k]['accuracy']:.1f}% against "
                         f"{100 * scores[f'{chosen:g}'][k]['accuracy']:.1f}%)")
    return ", ".join(notes)


def _numbers(text: str, kind: type, name: str) -> list:
    try:
        values = [kind(part) for part in str(text).split(",") if part.strip()]
    except ValueError:
        raise ValueError(f"{name} must be comma-separated numbers, got {text!r}.") from None
    if not values:
        raise ValueError(f"{name} is empty.")
    return values


def split_pseudo_new_users(dataset: Dataset, fraction: float, seed: int, context_pairs: int = 16, folds: int = 1
                           ) -> tuple[Dataset, Dataset]:
    """Hold out `fraction` of the users, whole: returns the other users' rows, and the held-out users' rows to
    score. Each held-out user's pairs are shuffled and cut into parts of `context_pairs` (at most half of their
    pairs); in each of `folds` folds (at most as many as there are parts) one part is the user's `context` and
    every other pair of theirs is a row carrying it. With 2 folds a user with twice `context_pairs` pairs has each
    pair scored once: twice the scored pairs, and two contexts, for the noise of one user's accuracy."""
    if "user_id" not in dataset.column_names:
        raise PreferenceDataError("selection holds out users, but the training data has no `user_id` column.")
    users = sorted(set(dataset["user_id"]), key=str)
    held = max(1, round(fraction * len(users)))
    if len(users) - held < 2:
        raise PreferenceDataError(
            f"selection_fraction={fraction} holds out {held} of {len(users)} users, leaving fewer than 2 to train "
            "on: use more users or a smaller fraction."
        )
    held_users = set(random.Random(f"pseudo-new-{seed}").sample(users, held))
    by_user: dict[Any, list[int]] = defaultdict(list)
    for index, user in enumerate(dataset["user_id"]):
        by_user[user].append(index)
    too_few = sorted((u for u in held_users if len(by_user[u]) < 2), key=str)
    if too_few:
        raise PreferenceDataError(f"pseudo-new users need 2 pairs or more (context and test); {too_few[:5]} have 1.")
    keys = [c for c in ("prompt", "chosen", "rejected") if c in dataset.column_names]
    rows, contexts = [], []
    for user in sorted(held_users, key=str):
        indices = list(by_user[user])
        random.Random(f"pseudo-new-{seed}-{user}").shuffle(indices)
        n_context = min(context_pairs, len(indices) // 2)
        for fold in range(min(folds, len(indices) // n_context)):
            part = indices[fold * n_context:(fold + 1) * n_context]
            context = [{k: dataset[i][k] for k in keys} for i in part]
            scored = [i for i in indices if i not in part]
            rows += scored
            contexts += [context] * len(scored)
    pseudo_new = dataset.select(rows)
    if "context" in pseudo_new.column_names:
        pseudo_new = pseudo_new.remove_columns("context")
    train = dataset.filter(lambda user: user not in held_users, input_columns="user_id",
                           desc="Holding out pseudo-new users")
    return train, pseudo_new.add_column("context", contexts)


def score_on_pseudo_new_users(trainer, pseudo_new: Dataset, context_sizes: list[int], latent_scales: list[float],
                              seed: int = 0) -> dict[str, dict[str, Any]]:
    """Accuracy (against the users' labels) and worst-decile user accuracy of a trained `VPLRewardTrainer` on
    pseudo-new users, for each latent scale (models without a latent: one entry, `"-"`) and context size."""
    model = trainer.accelerator.unwrap_model(trainer.model)
    users = np.asarray(pseudo_new["user_id"], dtype=object)
    if not model.config.use_latent:
        latent_scales, context_sizes = [None], [0]
    saved_scale = getattr(model.config, "latent_scale", 1.0)
    # the same K pairs of each user under every scale, embedded and indexed once
    limited = {k: trainer.inference.prepare(limit_contexts(pseudo_new, k, seed=seed) if k
                                            else pseudo_new.remove_columns("context"), f"pseudo-new-k{k}",
                                            keep_in_memory=True)
               for k in context_sizes}
    scores: dict[str, dict[str, Any]] = {}
    try:
        for scale in latent_scales:
            entry: dict[str, Any] = {}
            for k in context_sizes:
                if scale is not None:
                    model.config.latent_scale = scale
                predictions = trainer.predict_preferences(limited[k], batch_size=PREDICTION_BATCH,
                                                          name=f"pseudo-new-k{k}")
                correct = np.asarray(predictions["reward_chosen"]) > np.asarray(predictions["reward_rejected"])
                per_user = [float(correct[users == u].mean()) for u in sorted(set(users.tolist()), key=str)]
                entry[str(k)] = {"accuracy": float(correct.mean()), "worst_decile": worst_fraction_mean(per_user),
                                 "per_user": per_user}
            entry["score"] = float(np.mean([entry[str(k)]["accuracy"] for k in context_sizes]))
            scores["-" if scale is None else f"{scale:g}"] = entry
    finally:
        model.config.latent_scale = saved_scale
    return scores


@dataclass
class SelectionResult:
    settings: dict[str, Any]
    latent_scale: dict[str, float] | None
    candidates: list[dict[str, Any]]
    reason: str
    users: dict[str, int]
    seconds: float
    latent_fit_precision: float = 0.0  # absent from the files of earlier versions, which had no latent fit

    def apply(self, model) -> None:
        """Give a trained model with a latent the chosen inference settings (latent scale table, latent fit)."""
        if self.latent_scale is not None and model.config.use_latent:
            model.config.latent_scale = self.latent_scale
            model.config.latent_fit_precision = self.latent_fit_precision

    def to_json(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def write(self, path: str | Path) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(self.to_json(), indent=2))

    @classmethod
    def read(cls, path: str | Path) -> SelectionResult:
        return cls(**json.loads(Path(path).read_text()))


def select_settings(
    args,
    selection: SelectionArguments,
    train_dataset: Dataset,
    make_trainer: Callable[[Any, Dataset], Any],
    output_dir: str | Path,
) -> SelectionResult:
    """Train every grid candidate (`make_trainer(candidate_args, train_subset)`, a `VPLRewardTrainer`) on the users
    not held out, score it on the pseudo-new users at each latent fit, context size and latent scale, and return the
    best settings and latent fit with their best scale at each context size (a `latent_scale` table by K). Ties keep
    the earlier candidate (the smaller grid values and latent fits as given) and the smaller scale."""
    start = time.perf_counter()
    fits = max(selection.latent_fit_precisions) > 0
    if fits and args.model_type == "vae" and args.decoder_type not in LATENT_DECODERS:
        raise ValueError(f"selection_latent_fit_precisions={selection.selection_latent_fit_precisions!r} fits latents "
                         f"under a decoder linear in them ({' or '.join(LATENT_DECODERS)}), not decoder_type="
                         f"{args.decoder_type!r}: set --decoder_type residual, or selection_latent_fit_precisions 0.")
    train, pseudo_new = split_pseudo_new_users(train_dataset, selection.selection_fraction, args.seed,
                                               selection.selection_context_pairs, selection.selection_folds)
    candidates = []
    for number, settings in enumerate(selection.grid({f.name for f in fields(args)})):
        candidate_args = replace(args, output_dir=str(Path(output_dir) / "selection" / f"candidate-{number}"),
                                 save_strategy="no", report_to=[], **settings)
        trainer = make_trainer(candidate_args, train)
        trainer.train()
        model = trainer.accelerator.unwrap_model(trainer.model)
        # the latent fits are inference settings: scored on the same trained model, not trained again
        for precision in selection.latent_fit_precisions if model.config.use_latent else [0.0]:
            model.config.latent_fit_precision = precision
            scores = score_on_pseudo_new_users(trainer, pseudo_new, selection.context_sizes,
                                               selection.latent_scales, seed=args.seed)
            candidates.append({"settings": settings, "latent_fit_precision": precision, "scores": scores})
    for candidate in candidates:
        candidate["latent_scale"], candidate["score"] = _best_scales(candidate["scores"], selection.context_sizes)
    number = max(range(len(candidates)), key=lambda n: (candidates[n]["score"], -n))
    chosen = candidates[number]
    ks = "/".join(str(k) for k in selection.context_sizes)
    fit = f", latent fit precision {chosen['latent_fit_precision']:g}" if chosen["latent_fit_precision"] else ""
    reason = (f"candidate {number} {chosen['settings'] or '(the given settings)'}{fit} has the best mean accuracy "
              f"over K={ks} on the pseudo-new users: {100 * chosen['score']:.1f}%")
    if chosen["latent_scale"] is not None:
        by_k = ", ".join(f"K={k}: {v:g}" for k, v in chosen["latent_scale"].items())
        reason += f", with the latent scaled by {by_k}"
        if "0" in chosen["scores"]:
            reason += f" (its pooled reward, scale 0: {100 * chosen['scores']['0']['score']:.1f}%)"
        held_back = _held_back(chosen["scores"], chosen["latent_scale"])
        if held_back:
            reason += ("; kept nearer the pooled reward where a larger scale scored higher but its gain was within "
                       "noise, cost the worst-served users, or would have forced a larger scale at a larger K: "
                       f"{held_back}")
    users = {"training": len(set(train["user_id"])), "pseudo_new": len(set(pseudo_new["user_id"])),
             "pseudo_new_pairs": len(pseudo_new), "folds": selection.selection_folds}
    return SelectionResult(settings=chosen["settings"], latent_scale=chosen["latent_scale"],
                           candidates=candidates, reason=reason + ".", users=users,
                           seconds=time.perf_counter() - start, latent_fit_precision=chosen["latent_fit_precision"])
