"""Many users and new users: VPL beside Bradley-Terry, DPL, a LoRe-style low-rank reward and the ground-truth
oracle on the simulated population (`python -m vpl_trl.data population`), all on frozen SmolLM2 embeddings.

    python benchmarks/population.py --output_dir DIR [--results benchmarks/results/population.md]
        [--config recipes/configs/many_users.yaml] [--attributes length,structure,...] [--temperature T]
        [--pairs_per_user N] [--seed S]

It builds the data set (its defaults unless told otherwise), trains VPL with the general many-user configuration
(`recipes/configs/many_users.yaml`, with its choice of settings on pseudo-new users, as the reward recipe makes it;
`--config recipes/configs/population.yaml` for the earlier population-tuned one), Bradley-Terry and both DPL heads
with the same settings and number of updates, the oracle (VPL's decoder given
the true weights) and LoRe (basis and training users' weights; a new user's weights fitted from their pairs),
then evaluates on the NEW users (never seen in training), against their true preference:

- accuracy against K = 1, 2, 4, 8, 16, 32 of each new user's own context pairs (VPL and LoRe; `--draws` random
  draws of K pairs per user), beside the methods that take no context and the oracle, and the share of the
  Bradley-Terry-to-oracle gap that VPL closes (`gap_closed`);
- per-user accuracy at K=16, with the mean over the worst 10% of users;
- how well the posterior mean of `z` predicts the true weights (ridge regression fitted on the training users,
  R^2 on the new ones);
- active against random queries (1, 2, 4, 8, 16 answered pairs chosen from the user's context);
- the time to serve one new user: LoRe's fit against VPL's single encoder pass.

Writes `DIR/summary.json` (`{"new_users": {"label_agreement", "oracle", "btl", "vpl": {K: A}, "lore": {K: A},
"gap_closed": {K: F}, "worst_decile": {"btl", "vpl"}, "z_r2", "active": {"active": {N: A}, "random": {N: A}}},
"seconds"}` and more), the results file and its PNGs (accuracy against K, per-user accuracies, active queries).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from datasets import Dataset
from transformers import set_seed

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from vpl_trl import VPLRewardConfig, VPLRewardTrainer  # noqa: E402
from vpl_trl.baselines import PreferencePairs, fit_low_rank_reward, fit_oracle_reward  # noqa: E402
from vpl_trl.data.format import load_preference_splits  # noqa: E402
from vpl_trl.data.population import Population, PopulationConfig, build_population, parse_attributes  # noqa: E402
from vpl_trl.embedded_model import DEFAULT_MODEL  # noqa: E402
from vpl_trl.evaluation.active_queries import simulate_new_user_queries  # noqa: E402
from vpl_trl.evaluation.diagnostics import headless_pyplot  # noqa: E402
from vpl_trl.evaluation.metrics import (  # noqa: E402
    limit_contexts,
    one_row_per_user,
    predict,
    true_correct,
    worst_fraction_mean,
    z_weight_r2,
)
from vpl_trl.selection import SelectionArguments, select_settings  # noqa: E402
from vpl_trl.text import render_text  # noqa: E402

CONFIG = ROOT / "recipes" / "configs" / "many_users.yaml"
K_VALUES = (1, 2, 4, 8, 16, 32)
QUERY_COUNTS = (1, 2, 4, 8, 16)
SERVE_K = 16  # the K of the per-user accuracies, z's R^2 and the serving times
MODELS = {"vpl": "vae", "btl": "base", "dpl_mean_and_variance": "mean_and_variance", "dpl_categorical": "categorical"}


def load_config(path: Path) -> tuple[dict[str, Any], SelectionArguments]:
    """A recipe configuration's `VPLRewardConfig` settings and its selection on pseudo-new users."""
    settings = {k: v for k, v in yaml.safe_load(path.read_text()).items() if k not in ("dataset", "model_type")}
    names = {f.name for f in dataclasses.fields(SelectionArguments)}
    return ({k: v for k, v in settings.items() if k not in names},
            SelectionArguments(**{k: v for k, v in settings.items() if k in names}))


def reward_config(model_type: str, output_dir: Path, seed: int, settings: dict[str, Any]) -> VPLRewardConfig:
    """The configuration's settings for `model_type`. Baselines see each training pair as many times as VPL does
    (VPL sees it once per context draw), so every model gets the same number of updates."""
    settings = dict(settings)
    if model_type != "vae":
        settings["num_train_epochs"] = settings["num_train_epochs"] * settings.pop("train_context_draws", 1)
    return VPLRewardConfig(output_dir=str(output_dir), model_type=model_type, seed=seed, **settings)


def train_models(train: Dataset, output_dir: Path, seed: int, config: Path = CONFIG
                 ) -> tuple[dict[str, VPLRewardTrainer], dict[str, float], dict[str, Any] | None]:
    """Every model on the training users; VPL with the configuration's selection on pseudo-new users (when on),
    returned as the third item."""
    settings, selection = load_config(config)
    trainers, seconds, chosen = {}, {}, None

    def make_trainer(args: VPLRewardConfig, dataset: Dataset) -> VPLRewardTrainer:
        set_seed(args.seed)  # the heads' initialization
        return VPLRewardTrainer(model=DEFAULT_MODEL, args=args, train_dataset=dataset)

    for name, model_type in MODELS.items():
        start = time.perf_counter()
        args = reward_config(model_type, output_dir / name, seed, settings)
        if model_type == "vae" and selection.enabled:
            chosen = select_settings(args, selection, train, make_trainer, output_dir / name)
            print(f"seed {seed}: selection: {chosen.reason}")
            args = dataclasses.replace(args, **chosen.settings)
        trainer = make_trainer(args, train)
        if model_type == "vae" and chosen is not None:
            chosen.apply(trainer.model)
        trainer.train()
        trainer.save_model(str(output_dir / name))
        trainers[name], seconds[name] = trainer, time.perf_counter() - start
        print(f"seed {seed}: trained {name} in {seconds[name]:.0f} s")
    return trainers, seconds, None if chosen is None else chosen.to_json()


class PoolEmbeddings:
    """The response pool's standardized frozen embeddings (from the VPL trainer's table and cache), by pool id."""

    def __init__(self, trainer: VPLRewardTrainer, rows: list[dict[str, Any]]):
        model = trainer.accelerator.unwrap_model(trainer.model)
        texts = {(r["prompt"], r["response"]): render_text(trainer.processing_class, r["prompt"], r["response"])
                 for r in rows}
        keys = list(texts)
        raw = trainer.inference.embed([texts[k] for k in keys], desc="Embedding the response pool")
        with torch.no_grad():
            self.matrix = model._standardize(raw).float()
        self.row = {key: i for i, key in enumerate(keys)}

    def pairs(self, rows: list[dict[str, Any]], users: dict[str, int] | None = None) -> PreferencePairs:
        """Rows' pairs (`prompt`, `chosen`, `rejected` as in the data set) as rows of `matrix`."""
        return PreferencePairs(
            [self.row[(r["prompt"], r["chosen"])] for r in rows],
            [self.row[(r["prompt"], r["rejected"])] for r in rows],
            [users[r["user_id"]] if users else 0 for r in rows],
        )


def accuracies(margins: np.ndarray, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Accuracy against the true preference and the labels, and each user's accuracy against the truth."""
    truth = true_correct(margins, {"true_margin": [r["true_margin"] for r in rows]})
    users = np.array([r["user_id"] for r in rows])
    per_user = {str(u): float(truth[users == u].mean()) for u in sorted(set(users.tolist()))}
    return {"true": float(truth.mean()), "labels": float((margins > 0).mean()), "per_user": per_user}


def model_margins(trainer: VPLRewardTrainer, dataset: Dataset, name: str) -> np.ndarray:
    predictions = predict(trainer, dataset, name, batch_size=128)
    return np.asarray(predictions["reward_chosen"]) - np.asarray(predictions["reward_rejected"])


def lore_margins(lore, embeddings: PoolEmbeddings, rows: list[dict[str, Any]]) -> tuple[np.ndarray, list[float]]:
    """Each new user's LoRe weights fitted from the pairs of their (limited) context; margins on their rows and
    the seconds each fit took."""
    margins, fit_seconds = np.zeros(len(rows)), []
    by_user: dict[str, list[int]] = {}
    for i, r in enumerate(rows):
        by_user.setdefault(r["user_id"], []).append(i)
    for indices in by_user.values():
        context = embeddings.pairs(rows[indices[0]]["context"])
        start = time.perf_counter()
        weights = lore.fit_user(embeddings.matrix[context.chosen], embeddings.matrix[context.rejected])
        fit_seconds.append(time.perf_counter() - start)
        pairs = embeddings.pairs([rows[i] for i in indices])
        with torch.no_grad():
            margins[indices] = (lore(embeddings.matrix[pairs.chosen], weights)
                                - lore(embeddings.matrix[pairs.rejected], weights)).numpy()
    return margins, fit_seconds


def vpl_serving_seconds(trainer: VPLRewardTrainer, new: Dataset) -> list[float]:
    """Seconds of one encoder pass per new user over SERVE_K context pairs (embeddings given, as for LoRe)."""
    model = trainer.accelerator.unwrap_model(trainer.model).eval()
    seconds = []
    for context in one_row_per_user(new)["context"]:
        context = context[:SERVE_K]
        texts = [[render_text(trainer.processing_class, c["prompt"], c[k]) for c in context]
                 for k in ("chosen", "rejected")]
        chosen, rejected = (trainer.inference.rows(ts)[None] for ts in texts)
        start = time.perf_counter()
        with torch.no_grad():
            model.encode_context(chosen, rejected)
        seconds.append(time.perf_counter() - start)
    return seconds


def evaluate_new_users(trainers, splits, population, embeddings, lore, oracle, draws: int) -> dict[str, Any]:
    new = splits["new_users"]
    rows = new.to_list()
    result: dict[str, Any] = {"users": len({r["user_id"] for r in rows}), "pairs": len(rows)}
    truth_rows = [r["true_margin"] for r in rows]
    result["label_agreement"] = float(np.mean([t > 0 for t in truth_rows if t != 0]))

    without_context = new.remove_columns("context")
    flat = {}
    for name, trainer in trainers.items():
        if name != "vpl":
            flat[name] = accuracies(model_margins(trainer, without_context, f"new-{name}"), rows)
    pairs = embeddings.pairs(rows)
    weights = torch.tensor(np.stack([population.weights(r["user_id"]) for r in rows]), dtype=torch.float32)
    with torch.no_grad():
        oracle_margins = (oracle(embeddings.matrix[pairs.chosen], weights)
                          - oracle(embeddings.matrix[pairs.rejected], weights)).numpy()
    flat["oracle"] = accuracies(oracle_margins, rows)

    curves: dict[str, dict[int, list[dict]]] = {"vpl": {}, "lore": {}}
    lore_seconds: list[float] = []
    for k in K_VALUES:
        for draw in range(1 if k >= max(K_VALUES) else draws):
            limited = limit_contexts(new, k, seed=draw)
            limited_rows = limited.to_list()
            margins = model_margins(trainers["vpl"], limited, f"new-k{k}-d{draw}")
            curves["vpl"].setdefault(k, []).append(accuracies(margins, rows))
            margins, seconds = lore_margins(lore, embeddings, limited_rows)
            curves["lore"].setdefault(k, []).append(accuracies(margins, rows))
            if k == SERVE_K:
                lore_seconds += seconds
    for name in ("vpl", "lore"):
        result[name] = {str(k): float(np.mean([d["true"] for d in runs])) for k, runs in curves[name].items()}
        runs_by_k = curves[name].items()
        result[f"{name}_draw_spread"] = {str(k): float(np.std([d["true"] for d in runs])) for k, runs in runs_by_k}
        result[f"{name}_labels"] = {str(k): float(np.mean([d["labels"] for d in runs])) for k, runs in runs_by_k}
    for name, acc in flat.items():
        result[name] = acc["true"]
        result[f"{name}_labels"] = acc["labels"]
    gap = result["oracle"] - result["btl"]
    result["gap_closed"] = {k: (a - result["btl"]) / gap if gap > 0 else None for k, a in result["vpl"].items()}

    per_user = {name: _mean_per_user(curves[name][SERVE_K]) for name in ("vpl", "lore")}
    per_user.update({name: flat[name]["per_user"] for name in ("btl", "oracle")})
    result["per_user_accuracy"] = per_user
    result["worst_decile"] = {name: worst_fraction_mean(list(values.values())) for name, values in per_user.items()}

    limited = limit_contexts(new, SERVE_K, seed=0)
    result["z_r2"] = z_weight_r2(trainers["vpl"], splits["test"], splits["train"], limited, population, name="z-r2")
    vpl_seconds = vpl_serving_seconds(trainers["vpl"], new)
    result["serve_seconds_per_user"] = {"vpl": float(np.median(vpl_seconds)), "lore": float(np.median(lore_seconds))}

    active = simulate_new_user_queries(trainers["vpl"], new, num_queries=max(QUERY_COUNTS), seed=0)
    result["active"] = {s: {str(n): float(np.mean(active[s]["accuracy"][n])) for n in (0, *QUERY_COUNTS)}
                        for s in ("active", "random")}
    result["active_raw"] = {s: active[s]["accuracy"] for s in ("active", "random")}
    return result


def average(results: list[Any]) -> Any:
    """The mean of every number across results of the same shape (dicts and lists walked, None kept)."""
    first = results[0]
    if isinstance(first, dict):
        return {key: average([r[key] for r in results]) for key in first}
    if isinstance(first, list):
        return [average(list(items)) for items in zip(*results)]
    if isinstance(first, int) and not isinstance(first, bool) and len(set(results)) == 1:
        return first  # a count, the same in every run
    if isinstance(first, (int, float)) and not isinstance(first, bool):
        return float(np.mean(results))
    return first


def spread(results: list[Any]) -> Any:
    """The standard deviation across seeds of every number (dicts walked)."""
    if isinstance(results[0], dict):
        return {key: spread([r[key] for r in results]) for key in results[0]}
    return float(np.std(results))


def _mean_per_user(runs: list[dict]) -> dict[str, float]:
    users = runs[0]["per_user"]
    return {u: float(np.mean([run["per_user"][u] for run in runs])) for u in users}


# ----- plots and the results file -------------------------------------------------------------------------------


def plot_accuracy_vs_k(result: dict[str, Any], path: Path) -> None:
    plt = headless_pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ks = [int(k) for k in result["vpl"]]
    for name, label, color in (("vpl", "VPL", "tab:blue"), ("lore", "LoRe-style", "tab:orange")):
        means = np.array(list(result[name].values()))
        spread = np.array(list(result[f"{name}_draw_spread"].values()))
        ax.errorbar(ks, 100 * means, yerr=100 * spread, marker="o", capsize=3, label=label, color=color)
    for name, label, style, width in (("oracle", "oracle (true weights)", "k--", 1.2),
                                      ("dpl_mean_and_variance", "DPL mean-variance", "g-.", 1.0),
                                      ("dpl_categorical", "DPL categorical", "m-.", 1.0),
                                      ("btl", "Bradley-Terry", "r:", 2.0)):  # last: on top of a DPL line it equals
        ax.axhline(100 * result[name], linestyle=style[1:], color=style[0], label=label, linewidth=width)
    ax.set_xscale("log", base=2)
    ax.set_xticks(ks, [str(k) for k in ks])
    ax.set_xlabel("K: the new user's context pairs")
    ax.set_ylabel("accuracy against the true preference (%)")
    ax.set_title(f"{result['users']} new users, {result['pairs']} held-out pairs")
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_per_user(result: dict[str, Any], path: Path) -> None:
    plt = headless_pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    bins = np.linspace(0, 1, 21)
    for name, label, color in (("btl", "Bradley-Terry", "tab:red"), ("lore", f"LoRe-style, K={SERVE_K}", "tab:orange"),
                               ("vpl", f"VPL, K={SERVE_K}", "tab:blue"), ("oracle", "oracle", "black")):
        values = list(result["per_user_accuracy"][name].values())
        ax.hist(values, bins=bins, histtype="step", linewidth=1.6, color=color,
                label=f"{label} (worst 10%: {100 * result['worst_decile'][name]:.0f}%)")
    ax.set_xlabel("a new user's accuracy against their true preference (mean over seeds)")
    ax.set_ylabel("users")
    ax.yaxis.get_major_locator().set_params(integer=True)
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_active(result: dict[str, Any], path: Path) -> None:
    plt = headless_pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for strategy, color in (("active", "tab:blue"), ("random", "tab:gray")):
        rows = np.asarray(result["active_raw"][strategy])  # (queries + 1, users)
        n = np.arange(len(rows))
        ax.errorbar(n, 100 * rows.mean(1), yerr=100 * rows.std(1) / np.sqrt(rows.shape[1]), marker="o", capsize=3,
                    label=strategy, color=color)
    ax.set_xlabel("pairs answered by the new user")
    ax.set_ylabel("accuracy against the true preference (%)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def pct_spread(value: float, spread_: float | None) -> str:
    return pct(value) if spread_ is None else f"{100 * value:.1f} ± {100 * spread_:.1f}%"


def render_results(summary: dict[str, Any], stem: str) -> str:
    r = summary["new_users"]
    if summary["seeds"] == 1:  # no spread across seeds to show
        r = {**r, "seed_spread": {key: {k: None for k in value} if isinstance(value, dict) else None
                                  for key, value in r["seed_spread"].items()}}
    data = summary["data"]
    ks = list(r["vpl"])
    lines = [
        "# The simulated population: many users, new users", "",
        f"`python benchmarks/population.py --output_dir DIR`, {summary['seconds'] / 60:.1f} min on "
        f"{summary['machine']}. Data: {data['train_users']} training users x {data['pairs_per_user']} pairs, "
        f"{data['new_users']} new users with {data['context_pairs']} context pairs and {data['new_test_pairs']} test "
        f"pairs each; attributes {', '.join(data['attributes'])}; temperature {data['temperature']}; "
        f"seed {data['seed']}. "
        f"Frozen SmolLM2-135M embeddings ({summary.get('embedding', 'mean pooling of the output')}), embedded once. "
        "Models: "
        f"VPL (`{summary.get('config', 'recipes/configs/population.yaml')}`), Bradley-Terry and DPL with the "
        f"same settings and updates, the oracle (the VPL decoder given the true weights), LoRe-style (rank "
        f"{summary['lore_rank']}). Every accuracy is on the new users' held-out pairs against their true preference "
        "unless it says labels.", "",
        "## New users against K", "",
        "| model | " + " | ".join(f"K={k}" for k in ks) + " |",
        "|---|" + "---|" * len(ks),
        "| VPL | " + " | ".join(pct_spread(r["vpl"][k], r["seed_spread"]["vpl"][k]) for k in ks) + " |",
        "| LoRe-style | " + " | ".join(pct_spread(r["lore"][k], r["seed_spread"]["lore"][k]) for k in ks) + " |",
        "| gap closed by VPL | " + " | ".join("-" if r["gap_closed"][k] is None else f"{100 * r['gap_closed'][k]:.0f}%"
                                              for k in ks) + " |",
        "| VPL against labels | " + " | ".join(pct(r["vpl_labels"][k]) for k in ks) + " |",
        "", f"Mean ± std over {summary['seeds']} training seeds of every model; each seed's accuracy is the mean over "
        f"{summary['draws']} random draws of K of each user's context pairs (one at K=32). Gap closed: "
        "(VPL - Bradley-Terry) / (oracle - Bradley-Terry), from the means.", "",
        "| model (no context) | true preference | labels |", "|---|---|---|",
        f"| label agreement (the labels themselves) | {pct(r['label_agreement'])} | - |",
        *(f"| {name} | {pct_spread(r[key], r['seed_spread'].get(key))} | {pct(r[key + '_labels'])} |" for name, key in (
            ("oracle: VPL decoder with the true weights", "oracle"), ("Bradley-Terry", "btl"),
            ("DPL mean-and-variance", "dpl_mean_and_variance"), ("DPL categorical", "dpl_categorical"))),
        "", f"![accuracy against K]({stem}_accuracy_vs_k.png)", "",
        f"## Per-user accuracy (K={SERVE_K})", "",
        "| model | mean | worst 10% of users |", "|---|---|---|",
        *(f"| {name} | {pct(np.mean(list(r['per_user_accuracy'][key].values())))} | {pct(r['worst_decile'][key])} |"
          for name, key in (("VPL", "vpl"), ("LoRe-style", "lore"), ("Bradley-Terry", "btl"), ("oracle", "oracle"))),
        "", f"![per-user accuracy]({stem}_per_user.png)", "",
        "## What z knows, and serving a new user", "",
        f"- R^2 of the true weights from z (posterior mean, K={SERVE_K}; ridge fitted on the training users, scored on "
        f"the new users): {r['z_r2']:.3f}.",
        f"- Serving one new user from {SERVE_K} embedded pairs: VPL's encoder pass "
        f"{1000 * r['serve_seconds_per_user']['vpl']:.2f} ms, "
        f"LoRe's weight fit {1000 * r['serve_seconds_per_user']['lore']:.1f} ms "
        "(medians over users).", "",
        "## Active queries", "",
        "| pairs answered | " + " | ".join(r["active"]["active"]) + " |",
        "|---|" + "---|" * len(r["active"]["active"]),
        *(f"| {s} | " + " | ".join(pct(v) for v in r["active"][s].values()) + " |" for s in ("active", "random")),
        "", "Each new user's candidates are their context pairs; active picks the pair with the most expected "
        "information about z (BALD), random picks at random; the user answers with their (noisy) label.", "",
        f"![active queries]({stem}_active.png)", "",
        "## Training", "",
        "| model | seconds |", "|---|---|",
        *(f"| {name} | {s:.0f} |" for name, s in summary["train_seconds"].items()),
    ]
    chosen = [c for c in summary.get("selection") or [] if c]
    if chosen:
        lines += ["", "## What the configuration chose on pseudo-new users", "",
                  *(f"- seed {n}: {c['reason']}" for n, c in enumerate(chosen)), "",
                  f"{chosen[0]['users']['pseudo_new']} of the training users held out whole; each candidate trained on "
                  f"the other {chosen[0]['users']['training']} ({chosen[0]['seconds']:.0f} s for the whole choice)."]
    if summary.get("note"):
        lines += ["", summary["note"]]
    return "\n".join(lines) + "\n"


def write_results(summary: dict[str, Any], results: Path) -> None:
    """The results file and its PNGs beside it."""
    results.parent.mkdir(parents=True, exist_ok=True)
    new_users = summary["new_users"]
    plot_accuracy_vs_k(new_users, results.parent / f"{results.stem}_accuracy_vs_k.png")
    plot_per_user(new_users, results.parent / f"{results.stem}_per_user.png")
    plot_active(new_users, results.parent / f"{results.stem}_active.png")
    results.write_text(render_results(summary, results.stem))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    defaults = PopulationConfig()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output_dir", "--output-dir", required=True)
    parser.add_argument("--results", default=str(ROOT / "benchmarks" / "results" / "population.md"))
    parser.add_argument("--config", default=str(CONFIG), help="VPL's recipe configuration (baselines use its settings)")
    parser.add_argument("--attributes", "--attributes", default=None, help="comma-separated (default: the data set's)")
    parser.add_argument("--temperature", type=float, default=defaults.temperature)
    parser.add_argument("--pairs_per_user", "--pairs-per-user", type=int, default=defaults.pairs_per_user)
    parser.add_argument("--train_users", "--train-users", type=int, default=defaults.train_users)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--lore_rank", "--lore-rank", type=int, default=8)
    parser.add_argument("--draws", type=int, default=2, help="random context draws per K")
    parser.add_argument("--seeds", type=int, default=3, help="training seeds of every model (results are averaged)")
    parser.add_argument("--note", default=None, help="a line added to the results file")
    parser.add_argument("--replot", action="store_true",
                        help="only rewrite the results file and plots from DIR/summary.json (no training)")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    output_dir = Path(args.output_dir)
    if args.replot:
        summary = json.loads((output_dir / "summary.json").read_text())
        summary["note"] = args.note or summary.get("note")
        write_results(summary, Path(args.results))
        return summary
    torch.manual_seed(args.seed)

    config = dataclasses.replace(defaults, attributes=parse_attributes(args.attributes), temperature=args.temperature,
                                 pairs_per_user=args.pairs_per_user, train_users=args.train_users, seed=args.seed)
    build_population(output_dir / "data", config)
    splits = load_preference_splits(output_dir / "data")
    population = Population.load(output_dir / "data" / "users.json")

    from vpl_trl.data.population import dialogue_prompt, load_pool

    pool_rows = [{"prompt": dialogue_prompt(r["prompt"]), "response": " " + r["response"]} for r in load_pool()]
    train_rows = splits["train"].to_list()
    user_index = {u: i for i, u in enumerate(sorted({r["user_id"] for r in train_rows}))}
    true_weights = torch.tensor(np.stack([population.weights(u) for u in user_index]), dtype=torch.float32)
    per_seed, seconds_per_seed, selections = [], [], []
    for seed in range(args.seed, args.seed + args.seeds):
        trainers, train_seconds, chosen = train_models(splits["train"], output_dir / "models" / f"seed{seed}", seed,
                                                       Path(args.config))
        selections.append(chosen)
        embeddings = PoolEmbeddings(trainers["vpl"], pool_rows)
        train_pairs = embeddings.pairs(train_rows, user_index)
        vpl_config = trainers["vpl"].accelerator.unwrap_model(trainers["vpl"].model).config
        t = time.perf_counter()
        oracle = fit_oracle_reward(embeddings.matrix, train_pairs, true_weights, hidden_dim=vpl_config.hidden_dim,
                                   decoder_type=vpl_config.decoder_type, seed=seed)
        train_seconds["oracle"] = time.perf_counter() - t
        t = time.perf_counter()
        lore = fit_low_rank_reward(embeddings.matrix, train_pairs, len(user_index), rank=args.lore_rank, seed=seed)
        train_seconds["lore"] = time.perf_counter() - t
        per_seed.append(evaluate_new_users(trainers, splits, population, embeddings, lore, oracle, args.draws))
        seconds_per_seed.append(train_seconds)
        print(f"seed {seed}: new users, K=16: VPL {pct(per_seed[-1]['vpl']['16'])}, "
              f"LoRe {pct(per_seed[-1]['lore']['16'])}, Bradley-Terry {pct(per_seed[-1]['btl'])}, "
              f"oracle {pct(per_seed[-1]['oracle'])}")
    new_users = average(per_seed)
    new_users["gap_closed"] = {k: (a - new_users["btl"]) / (new_users["oracle"] - new_users["btl"])
                               for k, a in new_users["vpl"].items()}
    new_users["seed_spread"] = {key: spread([r[key] for r in per_seed]) for key in ("vpl", "lore", "btl", "oracle")}
    new_users["per_seed"] = [{key: r[key] for key in ("vpl", "lore", "btl", "oracle", "gap_closed", "worst_decile",
                                                     "z_r2")} for r in per_seed]
    summary = {
        "new_users": new_users,
        "data": {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(config).items()},
        "config": str(Path(args.config).resolve().relative_to(ROOT)) if Path(args.config).resolve().is_relative_to(ROOT)
        else args.config,
        "selection": selections,
        "embedding": f"{vpl_config.pooling} pooling of the {vpl_config.embedding_layer} layer",
        "lore_rank": args.lore_rank,
        "draws": args.draws,
        "seeds": args.seeds,
        "train_seconds": average(seconds_per_seed),
        "machine": f"{torch.get_num_threads()} threads, {platform.processor() or platform.machine()}",
        "note": args.note,
        "seconds": time.perf_counter() - start,
    }
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    results = Path(args.results)
    write_results(summary, results)
    print(f"new users, K=16, mean of {args.seeds} seeds: VPL {pct(new_users['vpl']['16'])}, "
          f"LoRe {pct(new_users['lore']['16'])}, Bradley-Terry {pct(new_users['btl'])}, "
          f"oracle {pct(new_users['oracle'])}; "
          f"{summary['seconds'] / 60:.1f} min; results in {results}")
    return summary


if __name__ == "__main__":
    main(sys.argv[1:])
