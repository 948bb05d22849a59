"""How much can K of a user's own pairs tell about them? The information ceiling of a simulated population.

    python benchmarks/population_information.py --output_dir DIR
        [--results benchmarks/results/population_information.md] [--populations length,structure,... ...]

For each population (`python -m vpl_trl.data population` defaults, one per attribute set in `--populations`), every
new user's weights are inferred from K of their context pairs by Bayesian logistic regression on the answers' TRUE
attributes, under the population's true prior (the training users' weights: their mean and covariance) and the
labels' true noise (`temperature`); the posterior is Laplace's, whose mean (the mode, found by the model's own
`map_logistic_regression`) decides a pair's sign as the Bayes rule does. Each user's test pairs are scored against
their true preference, as `benchmarks/population.py` scores models.

No learned model can do better from the same K pairs, up to the Laplace approximation and chance: it sees the text
instead of the attributes and has to learn the prior. With the true weights every pair is right (100%); the prior's
mean (K=0) is the best a reward that ignores the user can do with these features. `share closed` is
(accuracy at K - K=0) / (100% - K=0); the same share with noise-free labels (the context labelled by the true
preference) separates the labels' noise from what the pairs cannot show.

Writes `DIR/summary.json` (`{"populations": [{"attributes", "accuracy": {K: A}, "noise_free": {K: A},
"share_closed": {K: F}, "noise_free_share_closed": {K: F}}], "seconds"}`), the results file and a PNG beside it.
It takes seconds.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from vpl_trl.data.format import iter_jsonl  # noqa: E402
from vpl_trl.data.population import (  # noqa: E402
    DEFAULT_ATTRIBUTES,
    Population,
    PopulationConfig,
    build_population,
    dialogue_prompt,
    load_pool,
    parse_attributes,
)
from vpl_trl.evaluation.diagnostics import headless_pyplot  # noqa: E402
from vpl_trl.models.modeling_vpl import map_logistic_regression  # noqa: E402

K_VALUES = (0, 1, 2, 4, 8, 16, 32)
SIX_ATTRIBUTES = "length,structure,formality,specifics,enthusiasm,questions"


def map_weights(differences: np.ndarray, prior_mean: np.ndarray, root: np.ndarray, temperature: float) -> np.ndarray:
    """The posterior mode of w given pairs whose chosen-minus-rejected attributes are `differences` (K, d), under
    P(chosen) = sigmoid(w . difference / temperature) and a N(prior_mean, root root^T) prior (`root`: the prior
    covariance's Cholesky factor): the model's own MAP logistic regression, on w = prior_mean + root z, so that z's
    prior is N(0, I)."""
    offsets = torch.from_numpy(differences @ prior_mean / temperature)[None]
    design = torch.from_numpy(differences @ root / temperature)[None]
    z = map_logistic_regression(offsets, design, torch.ones_like(offsets), precision=1.0)[0].numpy()
    return prior_mean + root @ z


def information_ceiling(data: Path, draws: int, seed: int) -> dict[str, Any]:
    """Accuracy against K of the Bayes rule on the true attributes, for the new users of the population in `data`."""
    population = Population.load(data / "users.json")
    pool = load_pool()
    scores = population.attribute_scores([r["response"] for r in pool])
    answer = {(dialogue_prompt(r["prompt"]), " " + r["response"]): i for i, r in enumerate(pool)}
    temperature = float(population.settings["temperature"])
    training = np.stack([population.weights(u) for u, v in population.users.items() if v["split"] == "train"])
    prior_mean, root = training.mean(axis=0), np.linalg.cholesky(np.cov(training.T))

    def differences(pairs: list[dict[str, Any]]) -> np.ndarray:
        return np.array([scores[answer[(p["prompt"], p["chosen"])]] - scores[answer[(p["prompt"], p["rejected"])]]
                         for p in pairs]).reshape(len(pairs), scores.shape[1])

    users: dict[str, list[dict[str, Any]]] = {}
    for _, row in iter_jsonl(data / "new_users.jsonl"):
        users.setdefault(row["user_id"], []).append(row)
    rng = np.random.default_rng(seed)
    accuracy: dict[str, list[float]] = {str(k): [] for k in K_VALUES}
    noise_free: dict[str, list[float]] = {str(k): [] for k in K_VALUES}
    for user, rows in users.items():
        truth = population.weights(user)
        test = differences(rows)
        context = differences(rows[0]["context"])
        correct_context = context * np.sign(context @ truth)[:, None]  # every pair labelled by the true preference
        for k in K_VALUES:
            for _ in range(draws if 0 < k < len(context) else 1):
                picks = rng.choice(len(context), size=k, replace=False)
                for table, pairs in ((accuracy, context), (noise_free, correct_context)):
                    w = map_weights(pairs[picks], prior_mean, root, temperature)
                    table[str(k)].append(float(np.mean(np.sign(test @ w) == np.sign(test @ truth))))
    result = {"accuracy": {k: float(np.mean(v)) for k, v in accuracy.items()},
              "noise_free": {k: float(np.mean(v)) for k, v in noise_free.items()},
              "users": len(users), "temperature": temperature, "attributes": list(population.attributes)}
    for name in ("accuracy", "noise_free"):
        base = result[name]["0"]
        key = "share_closed" if name == "accuracy" else "noise_free_share_closed"
        result[key] = {k: (a - base) / (1.0 - base) for k, a in result[name].items()}
    return result


def plot(populations: list[dict[str, Any]], path: Path) -> None:
    plt = headless_pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for number, population in enumerate(populations):
        color = f"C{number}"
        ks = [int(k) for k in population["accuracy"]]
        label = f"{len(population['attributes'])} attributes"
        ax.plot(ks, [100 * a for a in population["accuracy"].values()], marker="o", color=color, label=label)
        ax.plot(ks, [100 * a for a in population["noise_free"].values()], marker="o", linestyle="--", color=color,
                label=f"{label}, noise-free context labels")
    ax.set_xscale("symlog", linthresh=1)
    ax.set_xticks(list(K_VALUES), [str(k) for k in K_VALUES])
    ax.set_xlabel("K: the user's own context pairs")
    ax.set_ylabel("new users' accuracy against their true preference (%)")
    ax.set_title("The Bayes rule on the true attributes (100% with the true weights)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def render(summary: dict[str, Any], stem: str) -> str:
    ks = [str(k) for k in K_VALUES]
    lines = [
        "# How much K of a user's own pairs can tell: the information ceiling of the simulated population", "",
        f"`python benchmarks/population_information.py --output_dir DIR`, {summary['seconds']:.0f} s on "
        f"{summary['machine']}. Every new user's weights inferred from K of their context pairs by Bayesian logistic "
        "regression on the answers' TRUE attributes, under the population's true prior (the training users' mean "
        "and covariance) and the labels' true noise; scored on their test pairs against their true preference "
        f"(mean over {summary['draws']} draws of K pairs per user). No model that reads the text can do better from "
        "the same pairs (up to the Laplace approximation and chance). With the true weights every pair is right "
        "(100%); K=0 is the prior's mean, the best a reward that ignores the user can do with these features. "
        "Share closed: (accuracy - K=0) / (100% - K=0).",
        "", "| population | context labels | " + " | ".join(f"K={k}" for k in ks) + " |",
        "|---|---|" + "---|" * len(ks),
    ]
    for population in summary["populations"]:
        name = f"{len(population['attributes'])} attributes ({', '.join(population['attributes'])})"
        for label, key, share in (("noisy (as given)", "accuracy", "share_closed"),
                                  ("noise-free", "noise_free", "noise_free_share_closed")):
            cells = [f"{100 * population[key][k]:.1f}% ({100 * population[share][k]:.0f}%)" for k in ks]
            lines.append(f"| {name} | {label} | " + " | ".join(cells) + " |")
    lines += ["", "Each cell: accuracy (share closed).", "", f"![accuracy against K]({stem}.png)", ""]
    if summary.get("note"):
        lines += [summary["note"], ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output_dir", "--output-dir", required=True)
    parser.add_argument("--results", default=str(ROOT / "benchmarks" / "results" / "population_information.md"))
    parser.add_argument("--populations", nargs="+", default=[",".join(DEFAULT_ATTRIBUTES), SIX_ATTRIBUTES],
                        help="one comma-separated attribute set per population (default: the four and the six)")
    parser.add_argument("--draws", type=int, default=4, help="random draws of K context pairs per user")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--note", default=None, help="a line added to the results file")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    output_dir = Path(args.output_dir)
    populations = []
    for number, attributes in enumerate(args.populations):
        data = output_dir / f"population-{number}"
        build_population(data, PopulationConfig(attributes=parse_attributes(attributes), seed=args.seed))
        populations.append(information_ceiling(data, args.draws, args.seed))
    summary = {"populations": populations, "draws": args.draws, "seed": args.seed, "note": args.note,
               "machine": platform.processor() or platform.machine(), "seconds": time.perf_counter() - start}
    (output_dir / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    results = Path(args.results)
    results.parent.mkdir(parents=True, exist_ok=True)
    plot(populations, results.with_suffix(".png"))
    results.write_text(render(summary, results.stem))
    print(render(summary, results.stem))
    return summary


if __name__ == "__main__":
    main()
