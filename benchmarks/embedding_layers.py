"""Which frozen embedding carries the population's attributes best? Layers and poolings of SmolLM2-135M compared
on the simulated six-attribute population, without the trainer.

    python benchmarks/embedding_layers.py --output_dir DIR [--results benchmarks/results/embedding_layers.md]
        [--cache_dir /tmp/emb_cache] [--seeds 2] [--only NAME,...] [--note TEXT] [--replot]

Today `VPLRewardModel.embed` (frozen mode, `pooling: mean`) is the mean over tokens of the LAST layer's hidden
state (after the final norm). This benchmark embeds the response pool (`data/population_pool.jsonl.gz`, 792
answers) ONCE with `output_hidden_states=True`, rendered and tokenized exactly as the trainer does
(`render_text`, EOS appended, right padding, 512 tokens, batch 16, fp32), and keeps every layer's token mean,
last-token state and token mean of the final-norm-applied state in a .npy cache (`--cache_dir`). Variants are
built from them: intermediate layers, the average or concatenation of several layers, mean + last token.

For every variant:
- attribute probes: ridge regression from the embedding (standardized in each fold) to each standardized
  attribute (length, structure, formality, specifics, enthusiasm, questions), 5-fold cross-validated over the
  792 answers, grouped by prompt (the probe never saw the prompt; as `benchmarks/population_attributes.py`),
  the best of a few ridge alphas per attribute; R^2 per attribute and their mean (also with folds by answer);
- population accuracy: the six-attribute population is built once (`PopulationConfig` defaults otherwise); each
  variant's embeddings are standardized per dimension by the training texts' statistics (as the trainer
  does), then the oracle (`fit_oracle_reward`: VPL's bilinear decoder, hidden 256, given the true weights),
  LoRe (`fit_low_rank_reward`, rank 8; new users' weights fitted from K=16 of their context pairs, 2 random
  draws) and a pooled linear Bradley-Terry reward (`fit_bradley_terry` on a linear head) are fitted on the
  training users' pairs as `benchmarks/population.py` fits them, and scored on the NEW users' held-out pairs
  against their true preference (mean over `--seeds` fitting seeds).

Writes `DIR/summary.json` (`{"variants": {name: {"dim", "probe_r2": {attr: R2}, "probe_r2_mean",
"probe_r2_mean_seen_prompts", "oracle", "lore_k16", "btl_linear", ...}}, "layer_curve", "best", ...}`) and the
results file; `--replot` only rewrites the results file from DIR/summary.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from population_attributes import ridge_probe  # noqa: E402

from vpl_trl.baselines import PreferencePairs, fit_low_rank_reward, fit_oracle_reward  # noqa: E402
from vpl_trl.baselines.pairs import fit_bradley_terry  # noqa: E402
from vpl_trl.data.format import load_preference_splits  # noqa: E402
from vpl_trl.data.population import (  # noqa: E402
    Population,
    PopulationConfig,
    Standardization,
    build_population,
    dialogue_prompt,
    load_pool,
    raw_attributes,
)
from vpl_trl.embedded_model import DEFAULT_MODEL, resolve_model_name_or_path  # noqa: E402
from vpl_trl.evaluation.metrics import limit_contexts, true_correct  # noqa: E402
from vpl_trl.text import render_text  # noqa: E402

SIX = ("length", "structure", "formality", "specifics", "enthusiasm", "questions")
ALPHAS = (1.0, 10.0, 100.0, 1000.0, 10000.0)
HIDDEN_DIM, DECODER = 256, "bilinear"  # recipes/configs/population.yaml
LORE_RANK, LORE_K, LORE_DRAWS = 8, 16, 2  # benchmarks/population.py's defaults
MAX_LENGTH, BATCH = 512, 16
BASELINE = "mean L30"
# "clearly better": both margins must be met to recommend a new frozen default
MIN_R2_GAIN, MIN_ORACLE_GAIN = 0.03, 0.01


# ----- embedding the pool once, every layer ---------------------------------------------------------------------


def pool_texts(tokenizer, pool: list[dict]) -> list[str]:
    """The pool's answers after their prompts, as the trainer renders them (the data set's prompt and response)."""
    return [render_text(tokenizer, dialogue_prompt(r["prompt"]), " " + r["response"]) for r in pool]


@torch.no_grad()
def embed_all_layers(texts: list[str], cache_dir: Path) -> tuple[dict[str, np.ndarray], float | None, bool]:
    """(N, layers + 1, d) arrays: `mean` (token mean of each hidden state; index 0 is the token embeddings, the
    last is the final-normed output the model pools today), `last` (the last token's, the appended EOS) and
    `normed_mean` (token mean of the backbone's final norm applied to each layer's state). Cached as .npy.
    Also returns the seconds the embedding took when it was computed (None if unknown) and whether it came from
    the cache."""
    from transformers import AutoTokenizer

    from vpl_trl.embeddings import _tokenize
    from vpl_trl.models.backbone import load_backbone

    key = hashlib.sha256("\0".join([DEFAULT_MODEL, str(MAX_LENGTH), "fp32", *texts]).encode()).hexdigest()[:16]
    paths = {name: cache_dir / f"pool-{key}-{name}.npy" for name in ("mean", "last", "normed_mean")}
    timing = cache_dir / f"pool-{key}-seconds.json"
    if all(p.exists() for p in paths.values()):
        print(f"embeddings from the cache {cache_dir} ({key})")
        seconds = json.loads(timing.read_text())["seconds"] if timing.exists() else None
        return {name: np.load(p) for name, p in paths.items()}, seconds, True
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_name_or_path(DEFAULT_MODEL))
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token  # as the trainer sets it
    backbone = load_backbone(DEFAULT_MODEL, dtype=torch.float32).eval()
    norm = backbone.norm
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))  # as `compute_embeddings` batches
    out = {name: np.zeros((len(texts), backbone.config.num_hidden_layers + 1, backbone.config.hidden_size),
                          dtype=np.float32) for name in paths}
    start = time.perf_counter()
    for begin in range(0, len(order), BATCH):
        rows = order[begin:begin + BATCH]
        encoded = _tokenize(tokenizer, [texts[i] for i in rows], MAX_LENGTH)
        mask = encoded["attention_mask"]
        hidden = backbone(input_ids=encoded["input_ids"], attention_mask=mask, use_cache=False,
                          output_hidden_states=True).hidden_states
        weights = mask.float().unsqueeze(-1)
        last = mask.sum(-1).clamp_min(1) - 1
        batch = torch.arange(len(rows))
        for layer, h in enumerate(hidden):
            out["mean"][rows, layer] = ((h * weights).sum(1) / weights.sum(1).clamp_min(1.0)).numpy()
            out["last"][rows, layer] = h[batch, last].numpy()
            normed = h if layer == len(hidden) - 1 else norm(h)  # the last one is already normed
            out["normed_mean"][rows, layer] = ((normed * weights).sum(1) / weights.sum(1).clamp_min(1.0)).numpy()
        if begin // BATCH % 10 == 0:
            print(f"embedded {begin + len(rows)}/{len(texts)} ({time.perf_counter() - start:.0f} s)", flush=True)
    cache_dir.mkdir(parents=True, exist_ok=True)
    seconds = time.perf_counter() - start
    for name, path in paths.items():
        np.save(path, out[name])
    timing.write_text(json.dumps({"seconds": seconds}))
    return out, seconds, False


def variants(states: dict[str, np.ndarray], extra_layers: tuple[int, ...] = ()) -> dict[str, tuple[str, np.ndarray]]:
    """name -> (definition, (N, d) matrix)."""
    mean, last, normed = states["mean"], states["last"], states["normed_mean"]
    top = mean.shape[1] - 1
    result = {
        BASELINE: ("token mean of the last layer (final-normed output): today's default", mean[:, top]),
        "last-token L30": ("the last token's (EOS) final-normed output", last[:, top]),
    }
    result["mean L0"] = ("token mean of hidden_states[0]: the input token embeddings (a bag of tokens)", mean[:, 0])
    for layer in sorted({2, 5, 10, 15, 20, 25, *extra_layers} - {0, top}):
        result[f"mean L{layer}"] = (f"token mean of hidden_states[{layer}] (raw residual stream)", mean[:, layer])
    result["normed mean L15"] = ("token mean of final_norm(hidden_states[15])", normed[:, 15])
    result["avg(L15, L30)"] = ("average of the raw token means of hidden_states[15] and [30] (L15 dominates: its "
                               "scale is ~50x)", (mean[:, 15] + mean[:, top]) / 2)
    result["avg normed(L15, L30)"] = ("average of the token means of final_norm(hidden_states[15]) and the output",
                                      (normed[:, 15] + normed[:, top]) / 2)
    result["avg normed L0-30"] = ("average over all hidden states of the token means of final_norm(hidden_states[l])",
                                  normed.mean(1))
    result["concat(L15, L30)"] = ("concatenation of the token means of hidden_states[15] and [30]",
                                  np.concatenate([mean[:, 15], mean[:, top]], 1))
    result["concat(L2, L30)"] = ("concatenation of the token means of hidden_states[2] and [30]",
                                 np.concatenate([mean[:, 2], mean[:, top]], 1))
    result["concat(L10, L20, L30)"] = ("concatenation of the token means of hidden_states[10], [20] and [30]",
                                       np.concatenate([mean[:, 10], mean[:, 20], mean[:, top]], 1))
    result["concat(mean, last) L30"] = ("concatenation of the output's token mean and its last token",
                                        np.concatenate([mean[:, top], last[:, top]], 1))
    return result


# ----- probes -------------------------------------------------------------------------------------------------


def probes(features: np.ndarray, scores: np.ndarray, prompts: np.ndarray) -> dict[str, Any]:
    r2, alphas, _ = ridge_probe(features.astype(np.float64), scores, prompts, alphas=ALPHAS)
    r2_seen, _, _ = ridge_probe(features.astype(np.float64), scores, np.arange(len(scores)), alphas=ALPHAS)
    return {"probe_r2": dict(zip(SIX, map(float, r2))), "probe_alpha": dict(zip(SIX, map(float, alphas))),
            "probe_r2_mean": float(r2.mean()), "probe_r2_mean_seen_prompts": float(r2_seen.mean())}


# ----- population accuracy --------------------------------------------------------------------------------------


class PopulationData:
    """The six-attribute population built once: splits, true weights, pairs as rows of the pool."""

    def __init__(self, folder: Path, pool: list[dict]):
        self.config = PopulationConfig(attributes=SIX)
        build_population(folder, self.config)
        splits = load_preference_splits(folder)
        self.population = Population.load(folder / "users.json")
        self.row = {(dialogue_prompt(r["prompt"]), " " + r["response"]): i for i, r in enumerate(pool)}
        self.train = splits["train"].to_list()
        self.new = splits["new_users"]
        self.new_rows = self.new.to_list()
        self.user_index = {u: i for i, u in enumerate(sorted({r["user_id"] for r in self.train}))}
        self.train_pairs = self.pairs(self.train, self.user_index)
        self.true_weights = torch.tensor(np.stack([self.population.weights(u) for u in self.user_index]),
                                         dtype=torch.float32)
        # the trainer standardizes by every embedded training text
        self.train_texts = sorted({self.row[(r["prompt"], r[k])] for r in self.train for k in ("chosen", "rejected")})
        self.limited = {draw: limit_contexts(self.new, LORE_K, seed=draw).to_list() for draw in range(LORE_DRAWS)}
        self.label_agreement = float(np.mean([r["true_margin"] > 0 for r in self.new_rows if r["true_margin"] != 0]))

    def pairs(self, rows: list[dict], users: dict[str, int] | None = None) -> PreferencePairs:
        return PreferencePairs([self.row[(r["prompt"], r["chosen"])] for r in rows],
                               [self.row[(r["prompt"], r["rejected"])] for r in rows],
                               [users[r["user_id"]] if users else 0 for r in rows])

    def accuracy(self, margins: np.ndarray) -> float:
        return float(true_correct(margins, {"true_margin": [r["true_margin"] for r in self.new_rows]}).mean())

    def standardize(self, matrix: np.ndarray) -> torch.Tensor:
        """As `VPLRewardModel.fit_embedding_statistics` and `_standardize`."""
        x = torch.tensor(matrix, dtype=torch.float32)
        sample = x[torch.tensor(self.train_texts)]
        return (x - sample.mean(0)) / sample.std(0).clamp_min(1e-3)


def margins_of(reward: Callable, embeddings: torch.Tensor, pairs: PreferencePairs, weights) -> np.ndarray:
    with torch.no_grad():
        return (reward(embeddings[pairs.chosen], weights) - reward(embeddings[pairs.rejected], weights)).numpy()


def population_accuracy(data: PopulationData, matrix: np.ndarray, seed: int) -> dict[str, Any]:
    x = data.standardize(matrix)
    result, seconds = {}, {}
    new_pairs = data.pairs(data.new_rows)
    new_weights = torch.tensor(np.stack([data.population.weights(r["user_id"]) for r in data.new_rows]),
                               dtype=torch.float32)
    t = time.perf_counter()
    oracle = fit_oracle_reward(x, data.train_pairs, data.true_weights, hidden_dim=HIDDEN_DIM, decoder_type=DECODER,
                               seed=seed)
    seconds["oracle"] = time.perf_counter() - t
    result["oracle"] = data.accuracy(margins_of(oracle, x, new_pairs, new_weights))

    t = time.perf_counter()
    lore = fit_low_rank_reward(x, data.train_pairs, len(data.user_index), rank=LORE_RANK, seed=seed)
    draws = []
    for rows in data.limited.values():  # as `benchmarks.population.lore_margins`
        margins = np.zeros(len(rows))
        by_user: dict[str, list[int]] = {}
        for i, r in enumerate(rows):
            by_user.setdefault(r["user_id"], []).append(i)
        for indices in by_user.values():
            context = data.pairs(rows[indices[0]]["context"])
            weights = lore.fit_user(x[context.chosen], x[context.rejected])
            margins[indices] = margins_of(lore, x, data.pairs([rows[i] for i in indices]), weights)
        draws.append(data.accuracy(margins))
    seconds["lore"] = time.perf_counter() - t
    result["lore_k16"] = float(np.mean(draws))

    t = time.perf_counter()
    torch.manual_seed(seed)
    head = torch.nn.Linear(x.shape[1], 1, bias=False)
    torch.nn.init.zeros_(head.weight)
    pairs = data.train_pairs
    fit_bradley_terry(lambda b: head(x[pairs.chosen[b]] - x[pairs.rejected[b]]).squeeze(-1), head.parameters(),
                      len(pairs), 3000, learning_rate=3e-3, seed=seed)
    seconds["btl_linear"] = time.perf_counter() - t
    result["btl_linear"] = data.accuracy(margins_of(lambda e, _: head(e).squeeze(-1), x, new_pairs, None))
    result["seconds"] = seconds
    return result


# ----- the results file -----------------------------------------------------------------------------------------


def pct(value: float) -> str:
    return f"{100 * value:.1f}%"


def embedding_time(summary: dict[str, Any]) -> str:
    seconds = summary.get("embed_seconds")
    said = f"{seconds / 60:.1f} min" if seconds else "time unknown"
    if summary.get("embed_cached"):
        return f" with the pool's embeddings read from the cache (embedding them with every hidden state: {said})"
    return f", of which embedding the pool with every hidden state {said} (cached for reruns)"


def render(summary: dict[str, Any]) -> str:
    v = summary["variants"]
    base = v[BASELINE]
    seeds = summary["seeds"]

    def acc(entry, key):
        spread = entry.get(f"{key}_spread")
        return pct(entry[key]) + (f" ± {100 * spread:.1f}" if seeds > 1 and spread is not None else "")

    lines = [
        "# Frozen embeddings: layers and poolings of SmolLM2-135M on the six-attribute population", "",
        f"`python benchmarks/embedding_layers.py --output_dir DIR`, {summary['seconds'] / 60:.1f} min on "
        f"{summary['machine']}{embedding_time(summary)}. Pool: 792 answers; population: attributes " + ", ".join(SIX) +
        f", `PopulationConfig` defaults otherwise ({summary['data']['train_users']} training users x "
        f"{summary['data']['pairs_per_user']} pairs, {summary['data']['new_users']} new users, temperature "
        f"{summary['data']['temperature']}, seed {summary['data']['seed']}; the new users' labels agree with their "
        f"true preference on {pct(summary['label_agreement'])} of pairs).", "",
        "- **Probe R²**: ridge from the embedding to each standardized attribute, 5-fold CV over the 792 answers "
        f"grouped by prompt (the probe never saw the prompt), best alpha of {', '.join(f'{a:g}' for a in ALPHAS)} "
        "per attribute; `seen` = folds by answer.",
        "- **Accuracy**: new users' held-out pairs against their true preference; embeddings standardized per "
        "dimension by the training texts (as the model does). Oracle: VPL's bilinear decoder (hidden 256) given the "
        f"true weights; LoRe: rank {LORE_RANK}, a new user's weights from K={LORE_K} context pairs (mean of "
        f"{LORE_DRAWS} draws); BT: one pooled linear Bradley-Terry reward. Mean ± std over {seeds} fitting "
        "seeds (the same data).", "",
        "| variant | dim | mean R² | " + " | ".join(SIX) + " | mean R² (seen) | oracle | LoRe K=16 | BT (linear) |",
        "|---|---|---|" + "---|" * len(SIX) + "---|---|---|---|",
    ]
    for name, e in v.items():
        lines.append(f"| {name} | {e['dim']} | **{e['probe_r2_mean']:.3f}** | "
                     + " | ".join(f"{e['probe_r2'][a]:.3f}" for a in SIX)
                     + f" | {e['probe_r2_mean_seen_prompts']:.3f} | {acc(e, 'oracle')} | {acc(e, 'lore_k16')} | "
                     f"{acc(e, 'btl_linear')} |")
    lines += ["", "Definitions:", ""]
    lines += [f"- `{name}`: {e['definition']}." for name, e in v.items()]
    best = summary["best"]
    lines += [
        "", "## Best", "",
        f"- Highest mean probe R²: `{best['probe']}`, {v[best['probe']]['probe_r2_mean']:.3f} against "
        f"{base['probe_r2_mean']:.3f} for `{BASELINE}` "
        f"({v[best['probe']]['probe_r2_mean'] - base['probe_r2_mean']:+.3f}).",
        f"- Highest oracle accuracy: `{best['oracle']}`, {pct(v[best['oracle']]['oracle'])} against "
        f"{pct(base['oracle'])} ({100 * (v[best['oracle']]['oracle'] - base['oracle']):+.1f} points).",
        f"- Highest LoRe K=16 accuracy: `{best['lore_k16']}`, {pct(v[best['lore_k16']]['lore_k16'])} against "
        f"{pct(base['lore_k16'])} ({100 * (v[best['lore_k16']]['lore_k16'] - base['lore_k16']):+.1f} points).",
        f"- Clearly better than `{BASELINE}` on both (probe R² +{MIN_R2_GAIN:g} and oracle +{100 * MIN_ORACLE_GAIN:g} "
        "points or more): " + (", ".join(f"`{n}`" for n in best["clearly_better"]) or "none") + ".",
        "", "## Probe R² by layer", "",
        "Mean over the six attributes (folds by prompt) of the token mean, the last token and the token mean of "
        "the final-normed state of each hidden state (0: token embeddings; 30: the output, already normed).", "",
        "| layer | " + " | ".join(str(layer) for layer in summary["layer_curve"]["layers"]) + " |",
        "|---|" + "---|" * len(summary["layer_curve"]["layers"]),
    ]
    for kind in ("mean", "last", "normed_mean"):
        lines.append(f"| {kind} | " + " | ".join(f"{r:.2f}" for r in summary["layer_curve"][kind]) + " |")
    if summary.get("note"):
        lines += ["", summary["note"]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output_dir", "--output-dir", required=True)
    parser.add_argument("--results", default=str(ROOT / "benchmarks" / "results" / "embedding_layers.md"))
    parser.add_argument("--cache_dir", "--cache-dir", default="/tmp/emb_cache")
    parser.add_argument("--seeds", type=int, default=2, help="fitting seeds of the oracle, LoRe and BT")
    parser.add_argument("--only", default=None, help="comma-separated variant names (default: all)")
    parser.add_argument("--note", default=None, help="a paragraph added to the results file")
    parser.add_argument("--replot", action="store_true",
                        help="only rewrite the results file from DIR/summary.json (with --note, if given)")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    if args.replot:
        summary = json.loads((output_dir / "summary.json").read_text())
        summary["note"] = args.note or summary.get("note")
        (output_dir / "summary.json").write_text(json.dumps(summary, indent=1))
        Path(args.results).write_text(render(summary))
        return summary

    from transformers import AutoTokenizer

    pool = load_pool()
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_name_or_path(DEFAULT_MODEL))
    states, embed_seconds, embed_cached = embed_all_layers(pool_texts(tokenizer, pool), Path(args.cache_dir))
    scores = Standardization.fit(raw := raw_attributes([r["response"] for r in pool], list(SIX))).apply(raw)
    prompts = np.array([r["prompt"] for r in pool])

    curve = {"layers": list(range(states["mean"].shape[1]))}
    for kind in ("mean", "last", "normed_mean"):
        curve[kind] = [probes(states[kind][:, layer], scores, prompts)["probe_r2_mean"] for layer in curve["layers"]]
        print(kind, " ".join(f"{r:.2f}" for r in curve[kind]), flush=True)
    best_layer = int(np.argmax(curve["mean"]))

    with tempfile.TemporaryDirectory() as folder:
        data = PopulationData(Path(folder) / "data", pool)
    results: dict[str, Any] = {}
    chosen = variants(states, extra_layers=(best_layer,))
    if args.only:
        chosen = {k: v for k, v in chosen.items() if k in args.only.split(",") or k == BASELINE}
    for name, (definition, matrix) in chosen.items():
        t = time.perf_counter()
        entry = {"definition": definition, "dim": int(matrix.shape[1]), **probes(matrix, scores, prompts)}
        runs = [population_accuracy(data, matrix, seed) for seed in range(args.seeds)]
        for key in ("oracle", "lore_k16", "btl_linear"):
            entry[key] = float(np.mean([r[key] for r in runs]))
            entry[f"{key}_spread"] = float(np.std([r[key] for r in runs]))
            entry[f"{key}_per_seed"] = [r[key] for r in runs]
        entry["fit_seconds"] = {k: float(np.mean([r["seconds"][k] for r in runs])) for k in runs[0]["seconds"]}
        results[name] = entry
        print(f"{name} (dim {entry['dim']}): probe R2 {entry['probe_r2_mean']:.3f}, oracle {pct(entry['oracle'])}, "
              f"LoRe K=16 {pct(entry['lore_k16'])}, BT {pct(entry['btl_linear'])} ({time.perf_counter() - t:.0f} s)",
              flush=True)
        (output_dir / "partial.json").write_text(json.dumps(results, indent=1))

    base = results[BASELINE]
    clearly = [n for n, e in results.items() if n != BASELINE
               and e["probe_r2_mean"] - base["probe_r2_mean"] >= MIN_R2_GAIN
               and e["oracle"] - base["oracle"] >= MIN_ORACLE_GAIN]
    summary = {
        "variants": results,
        "layer_curve": curve,
        "best": {"probe": max(results, key=lambda n: results[n]["probe_r2_mean"]),
                 "oracle": max(results, key=lambda n: results[n]["oracle"]),
                 "lore_k16": max(results, key=lambda n: results[n]["lore_k16"]),
                 "clearly_better": sorted(clearly, key=lambda n: -results[n]["oracle"])},
        "data": {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(data.config).items()},
        "label_agreement": data.label_agreement,
        "seeds": args.seeds,
        "embed_seconds": embed_seconds,
        "embed_cached": embed_cached,
        "machine": f"{torch.get_num_threads()} thread(s), {platform.processor() or platform.machine()}",
        "note": args.note,
        "seconds": time.perf_counter() - start,
    }
    (output_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    Path(args.results).parent.mkdir(parents=True, exist_ok=True)
    Path(args.results).write_text(render(summary))
    print(render(summary))
    return summary


if __name__ == "__main__":
    main(sys.argv[1:])
