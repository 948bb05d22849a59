"""Latent diagnostics of a VPL reward model and the evaluation plots.

Does the latent `z` carry the user? A cross-validated linear probe of the user from `z`, always set beside
the same probe on an *untrained* encoder (contexts drawn from different users' pools are told apart even by
random weights, so the trained probe alone proves little), and a 2-D PCA map of the users' `z`. The direct
test that the reward uses `z` is the context swap (`vpl_trl.evaluation.swap_contexts`).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..models.modeling_vpl import UserContextEncoder


def linear_probe_accuracy(
    features: Any, labels: Sequence[Any], folds: int = 5, seed: int = 0, l2: float = 0.1, max_iter: int = 100
) -> float:
    """Cross-validated accuracy of a multinomial logistic regression predicting `labels` from `features`.

    Folds are stratified by label; features are standardized with each training fold's statistics; the
    L2-penalized loss is minimized by L-BFGS from zero weights (a convex problem, so the result is
    deterministic). Chance is the majority label's frequency. The problem is small, so it runs on one thread
    (several threads only add synchronization overhead, which is large on a busy machine).
    """
    with single_thread():
        return _cross_validated_probe(features, labels, folds, seed, l2, max_iter)


@contextmanager
def single_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _cross_validated_probe(
    features: Any, labels: Sequence[Any], folds: int, seed: int, l2: float, max_iter: int
) -> float:
    x = torch.as_tensor(np.asarray(features, dtype=np.float32))
    classes, y = np.unique(np.asarray(labels), return_inverse=True)
    if len(classes) < 2:
        raise ValueError("a probe needs at least two distinct labels.")
    if x.ndim != 2 or len(x) != len(y):
        raise ValueError(f"features must be (N, d) with N = {len(y)} labels, got shape {tuple(x.shape)}.")
    rng = np.random.default_rng(seed)
    fold_of = np.empty(len(y), dtype=int)
    for label in range(len(classes)):
        members = rng.permutation(np.flatnonzero(y == label))
        fold_of[members] = np.arange(len(members)) % folds
    y = torch.as_tensor(y)
    correct = 0
    for fold in range(folds):
        test = torch.as_tensor(fold_of == fold)
        if not test.any() or test.all():
            continue
        x_train, y_train = x[~test], y[~test]
        mean, std = x_train.mean(0), x_train.std(0).clamp_min(1e-6)
        x_train = (x_train - mean) / std
        weight = torch.zeros(x.shape[1], len(classes), requires_grad=True)
        bias = torch.zeros(len(classes), requires_grad=True)
        optimizer = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe")

        def closure():
            optimizer.zero_grad()
            loss = F.cross_entropy(x_train @ weight + bias, y_train) + 0.5 * l2 * weight.pow(2).sum()
            loss.backward()
            return loss

        optimizer.step(closure)
        with torch.no_grad():
            predicted = (((x[test] - mean) / std) @ weight + bias).argmax(-1)
        correct += int((predicted == y[test]).sum())
    return correct / len(y)


def chance_accuracy(labels: Sequence[Any]) -> float:
    """The accuracy of always predicting the most frequent label."""
    _, counts = np.unique(np.asarray(labels), return_counts=True)
    return float(counts.max() / counts.sum())


@contextmanager
def untrained_encoder(model, seed: int = 0) -> Iterator[Any]:
    """Temporarily give `model` a freshly initialized context encoder of the same size (PyTorch's default
    initialization, as a new model's heads get), for the untrained-encoder reference of the probe."""
    config = model.config
    trained = model.encoder
    parameter = next(trained.parameters())
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        fresh = UserContextEncoder(config.embedding_dim, config.hidden_dim, config.latent_dim)
    model.encoder = fresh.to(device=parameter.device, dtype=parameter.dtype)
    try:
        yield model
    finally:
        model.encoder = trained


def pca_2d(features: Any) -> tuple[np.ndarray, list[float]]:
    """The first two principal components of `features` (N, d) and the fraction of variance each explains."""
    x = np.asarray(features, dtype=np.float64)
    x = x - x.mean(0)
    _, singular, vt = np.linalg.svd(x, full_matrices=False)
    total = float((singular**2).sum()) or 1.0
    components = vt[:2]
    coords = x @ components.T
    if coords.shape[1] < 2:
        coords = np.pad(coords, ((0, 0), (0, 2 - coords.shape[1])))
    return coords, [float(s**2 / total) for s in singular[:2]]


def latent_diagnostics(
    model, latent_means: Any, untrained_latent_means: Any, users: Sequence[Any], folds: int = 5, seed: int = 0
) -> dict[str, Any]:
    """The probe of the user from `z` for the trained and an untrained encoder, and both PCA maps."""
    result: dict[str, Any] = {"probe": {"folds": folds, "chance": chance_accuracy(users), "n": len(users)}, "pca": {}}
    for name, means in (("trained", latent_means), ("untrained", untrained_latent_means)):
        z = model.normalize_latent(torch.as_tensor(np.asarray(means, dtype=np.float32))).numpy()
        result["probe"][name] = linear_probe_accuracy(z, users, folds=folds, seed=seed)
        coords, explained = pca_2d(z)
        result["pca"][name] = {"coords": coords.tolist(), "explained_variance": explained}
    result["pca"]["users"] = [str(u) for u in users]
    return result


# ----- plots ----------------------------------------------------------------------------------------------------


def latent_weight_r2(train_latents: Any, train_weights: Any, new_latents: Any, new_weights: Any,
                     alphas: Sequence[float] = (0.01, 0.1, 1.0, 10.0, 100.0)) -> float:
    """How well z predicts a simulated user's true weights: ridge regression from the latent means to the
    weights, fitted on the training users (its penalty chosen by leave-one-out error there), R^2 on new users
    (averaged over the weights' dimensions)."""
    x, y = np.asarray(train_latents, dtype=np.float64), np.asarray(train_weights, dtype=np.float64)
    x_new, y_new = np.asarray(new_latents, dtype=np.float64), np.asarray(new_weights, dtype=np.float64)
    if len(x) != len(y) or len(x_new) != len(y_new) or len(x) < 2:
        raise ValueError("latent_weight_r2 needs matching latents and weights for two or more training users.")
    mean, scale = x.mean(0), x.std(0) + 1e-8
    x, x_new = (x - mean) / scale, (x_new - mean) / scale
    y_mean = y.mean(0)
    best = None
    for alpha in alphas:
        # leave-one-out residuals of ridge regression: e_i / (1 - h_ii)
        gram_inverse = np.linalg.inv(x.T @ x + alpha * np.eye(x.shape[1]))
        beta = gram_inverse @ x.T @ (y - y_mean)
        leverage = np.einsum("ij,jk,ik->i", x, gram_inverse, x)
        loo = (((y - y_mean - x @ beta) / (1 - leverage)[:, None]) ** 2).sum()
        if best is None or loo < best[0]:
            best = (loo, beta)
    predicted = x_new @ best[1] + y_mean
    r2 = 1 - ((y_new - predicted) ** 2).sum(0) / ((y_new - y_new.mean(0)) ** 2).sum(0).clip(1e-12)
    return float(r2.mean())


def headless_pyplot():
    """matplotlib's pyplot on the Agg backend (PNG files, no display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


MAX_USER_BARS = 12  # more users than this are plotted and reported as a distribution


def plot_accuracy(metrics: dict[str, Any], breakdown: dict[str, dict[str, Any]], path: str | Path, title: str) -> None:
    """Bars of accuracy overall and per user, split into controversial and agreed pairs where known."""
    plt = headless_pyplot()
    many = len(breakdown) > MAX_USER_BARS
    groups = {"all users": {k: metrics.get(k) for k in ("accuracy", "controversial_accuracy", "agreed_accuracy")}}
    if not many:
        groups.update({f"user {u}": row for u, row in breakdown.items()})
    series = [("accuracy", "all pairs"), ("controversial_accuracy", "controversial"), ("agreed_accuracy", "agreed")]
    series = [(key, label) for key, label in series if any(g.get(key) is not None for g in groups.values())]
    if many:  # one bar per user would not fit: the per-user accuracies as a histogram beside the overall bars
        fig, (ax, hist) = plt.subplots(1, 2, figsize=(9, 3.8), gridspec_kw={"width_ratios": [1, 2]})
        hist.hist([100 * row["accuracy"] for row in breakdown.values()], bins=np.linspace(0, 100, 21))
        hist.set_xlabel("a user's pairwise accuracy (%)")
        hist.set_ylabel("users")
        hist.set_title(f"{len(breakdown)} users")
    else:
        fig, ax = plt.subplots(figsize=(1.8 + 1.6 * len(groups), 3.8))
    width = 0.8 / len(series)
    for i, (key, label) in enumerate(series):
        values = [100 * (g.get(key) or 0.0) for g in groups.values()]
        positions = np.arange(len(groups)) + (i - (len(series) - 1) / 2) * width
        bars = ax.bar(positions, values, width, label=label)
        ax.bar_label(bars, fmt="%.0f", fontsize=8)
    ax.axhline(50, color="grey", linestyle=":", linewidth=1)
    ax.set_xticks(np.arange(len(groups)), list(groups))
    ax.set_ylim(0, 125)
    ax.set_yticks(range(0, 101, 20))
    ax.set_ylabel("pairwise accuracy (%)")
    ax.set_title(title)
    ax.legend(loc="upper center", ncol=len(series), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _mean_std(rows: list[list[float]]) -> tuple[np.ndarray, np.ndarray]:
    values = 100 * np.asarray(rows, dtype=float)
    return values.mean(1), values.std(1)


def plot_context_curve(curve: dict[str, Any], path: str | Path, title: str, trained_k: int | None = None) -> None:
    """Accuracy against the number of context pairs K (log2 axis), mean ± std over context draws."""
    plt = headless_pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    k = np.asarray(curve["k"])
    for key, label in (("accuracy", "all pairs (labels)" if "true_accuracy" in curve else "all pairs"),
                       ("controversial_accuracy", "controversial pairs"),
                       ("true_accuracy", "against the true preference")):
        if curve.get(key) is None or any(row is None for row in curve[key]):
            continue
        mean, std = _mean_std(curve[key])
        ax.errorbar(k, mean, yerr=std, marker="o", capsize=3, label=label)
        ax.fill_between(k, mean - std, mean + std, alpha=0.15)
    if trained_k:
        ax.axvline(trained_k, color="grey", linestyle="--", linewidth=1, label=f"K used in evaluation ({trained_k})")
    ax.axhline(50, color="grey", linestyle=":", linewidth=1)
    ax.set_xscale("log", base=2)
    ax.set_xticks(k, [str(v) for v in k])
    ax.set_xlabel("context pairs K (new draws of each user's pairs)")
    ax.set_ylabel("pairwise accuracy (%)")
    ax.set_ylim(0, 105)
    ax.set_title(f"{title}\n(mean ± std over {curve['draws']} context draws)", fontsize=10)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_latent_map(diagnostics: dict[str, Any], path: str | Path, title: str) -> None:
    """The users' latents in 2-D (PCA), coloured by user: trained encoder beside an untrained one."""
    plt = headless_pyplot()
    users = np.asarray(diagnostics["pca"]["users"])
    names = sorted(set(users.tolist()))
    colours = plt.get_cmap("tab10")
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.4))
    for ax, name in zip(axes, ("trained", "untrained")):
        coords = np.asarray(diagnostics["pca"][name]["coords"])
        explained = diagnostics["pca"][name]["explained_variance"]
        for i, user in enumerate(names):
            mine = users == user
            ax.scatter(coords[mine, 0], coords[mine, 1], s=10, alpha=0.6, color=colours(i % 10), label=user)
        probe = diagnostics["probe"][name]
        ax.set_title(f"{name} encoder: probe accuracy {100 * probe:.0f}%", fontsize=10)
        ax.set_xlabel(f"PC1 ({100 * explained[0]:.0f}% of variance)")
        ax.set_ylabel(f"PC2 ({100 * explained[1]:.0f}% of variance)" if len(explained) > 1 else "PC2")
    axes[0].legend(title="user", fontsize=8, markerscale=2)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_active_queries(result: dict[str, Any], path: str | Path, title: str) -> None:
    """Accuracy on a new user's held-out pairs against the number of answered queries, active vs random."""
    plt = headless_pyplot()
    keys = [("accuracy", "all held-out pairs"), ("controversial_accuracy", "controversial held-out pairs")]
    keys = [(key, label) for key, label in keys if result["active"].get(key) is not None]
    fig, axes = plt.subplots(1, len(keys), figsize=(5.2 * len(keys), 3.8), squeeze=False)
    queries = np.asarray(result["queries"])
    for ax, (key, label) in zip(axes[0], keys):
        # Random first, dashed, and the two strategies shifted apart a little, so neither hides the other.
        for strategy, marker, style, shift in (("random", "s", "--", 0.08), ("active", "o", "-", -0.08)):
            mean, std = _mean_std(result[strategy][key])
            sem = std / np.sqrt(len(result[strategy][key][0]))
            ax.errorbar(queries + shift, mean, yerr=sem, marker=marker, linestyle=style, capsize=3, label=strategy)
            ax.fill_between(queries + shift, np.clip(mean - sem, 0, 100), np.clip(mean + sem, 0, 100), alpha=0.12)
        ax.axhline(50, color="grey", linestyle=":", linewidth=1)
        ax.set_xticks(queries)
        ax.set_xlabel("answered queries")
        ax.set_ylabel("pairwise accuracy (%)")
        ax.set_ylim(0, 105)
        ax.set_title(label, fontsize=10)
        ax.legend(loc="lower right", fontsize=8)
    fig.suptitle(f"{title}: mean ± standard error over {result['num_simulated_users']} simulated users", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
