"""How learnable is the simulated population? Linear probes of each attribute from the frozen SmolLM2
embedding, and how far one pooled Bradley-Terry reward sits below the users' own preferences.

    python benchmarks/population_attributes.py [--pool data/population_pool.jsonl.gz]
        [--output benchmarks/results/population_attributes.md]

- Probe R^2: ridge regression from the frozen backbone's embedding of `prompt + answer` (rendered as the
  reward trainer renders it, `--pooling` mean as `recipes/configs/population.yaml`, cached) to each standardized
  attribute, cross-validated
  in 5 folds grouped by prompt (so a probe is scored on answers to prompts it never saw).
- Users: the population is built with its defaults; accuracies are against the new users' true preference
  on their test pairs. In attribute space: the true weights (100% by definition), one pooled Bradley-Terry
  reward (logistic regression on attribute differences, fitted on every training label) and a per-user
  logistic fit from K context pairs. In embedding space: the "oracle" applies the true weights to the
  probes' out-of-fold attribute predictions, and pooled Bradley-Terry is a logistic regression on the
  embedding differences of every training label.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vpl_trl.data.format import read_jsonl  # noqa: E402
from vpl_trl.data.population import (  # noqa: E402
    ATTRIBUTES,
    Population,
    PopulationConfig,
    Standardization,
    build_population,
    dialogue_prompt,
    load_pool,
    parse_attributes,
    raw_attributes,
)

K_VALUES = (1, 2, 4, 8, 16, 32)


def embed_pool(pool: list[dict], pooling: str = "mean", max_length: int = 512, batch_size: int = 16) -> np.ndarray:
    """Frozen SmolLM2 embeddings of each answer after its prompt, as the reward trainer embeds them."""
    from transformers import AutoTokenizer

    from vpl_trl.embedded_model import DEFAULT_MODEL, resolve_model_name_or_path
    from vpl_trl.embeddings import EmbeddingCache, compute_embeddings, default_embedding_cache_dir, embedding_key
    from vpl_trl.models import VPLRewardModel
    from vpl_trl.text import render_text

    model = VPLRewardModel.from_backbone(DEFAULT_MODEL, embedding_mode="frozen", pooling=pooling).eval()
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_name_or_path(DEFAULT_MODEL))
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    texts = [render_text(tokenizer, dialogue_prompt(r["prompt"]), " " + r["response"]) for r in pool]
    cache = EmbeddingCache(default_embedding_cache_dir(model, embedding_key(model.config), max_length))
    return compute_embeddings(model, tokenizer, texts, cache, batch_size=batch_size, max_length=max_length,
                              desc="Embedding the response pool").numpy().astype(np.float64)


def ridge_probe(features: np.ndarray, targets: np.ndarray, groups: np.ndarray, alphas=(1.0, 10.0, 100.0, 1000.0),
                folds: int = 5, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Out-of-fold ridge predictions of each target column (folds grouped by `groups`); returns the best R^2
    per column, its alpha and its out-of-fold predictions."""
    unique = np.random.default_rng(seed).permutation(np.unique(groups))
    fold_of = {g: i % folds for i, g in enumerate(unique)}
    fold = np.array([fold_of[g] for g in groups])
    predictions = np.zeros((len(alphas),) + targets.shape)
    for f in range(folds):
        train, test = fold != f, fold == f
        mean, std = features[train].mean(0), features[train].std(0) + 1e-8
        x_train, x_test = (features[train] - mean) / std, (features[test] - mean) / std
        y_mean = targets[train].mean(0)
        gram = x_train.T @ x_train
        for a, alpha in enumerate(alphas):
            beta = np.linalg.solve(gram + alpha * np.eye(gram.shape[0]), x_train.T @ (targets[train] - y_mean))
            predictions[a, test] = x_test @ beta + y_mean
    sst = ((targets - targets.mean(0)) ** 2).sum(0)
    r2 = 1.0 - ((predictions - targets) ** 2).sum(1) / sst  # (alphas, columns)
    best = r2.argmax(0)
    columns = np.arange(targets.shape[1])
    return r2[best, columns], np.asarray(alphas)[best], predictions[best, :, columns].T


def logistic(features: np.ndarray, labels: np.ndarray, l2: float = 1e-3, steps: int = 200) -> np.ndarray:
    """Weights of a logistic regression without intercept (P(label) = sigmoid(x . w)), fitted with L-BFGS."""
    x = torch.tensor(features, dtype=torch.float64)
    y = torch.tensor(labels, dtype=torch.float64)
    w = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([w], max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(x @ w, y) + l2 * (w ** 2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return w.detach().numpy()


def pair_indices(rows: list[dict], index_of: dict) -> tuple[np.ndarray, np.ndarray]:
    return np.array([index_of[r["chosen_id"]] for r in rows]), np.array([index_of[r["rejected_id"]] for r in rows])


def accuracy(margins: np.ndarray, truth: np.ndarray) -> float:
    """Share of pairs where `margins` has the sign of the true margin (ties count half)."""
    return float(np.mean(np.where(margins == 0, 0.5, np.sign(margins) == np.sign(truth))))


def user_experiments(pool: list[dict], scores: np.ndarray, predicted: np.ndarray, embeddings: np.ndarray,
                     config: PopulationConfig, predicted_seen: np.ndarray | None = None) -> dict:
    with tempfile.TemporaryDirectory() as folder:
        stats = build_population(folder, config, pool=pool)
        train, test, new = (read_jsonl(Path(folder) / f"{s}.jsonl") for s in ("train", "test", "new_users"))
        population = Population.load(Path(folder) / "users.json")
    index_of = {r.get("id", i): i for i, r in enumerate(pool)}
    result = {"label_agreement": stats["new_users"]["label_agreement"],
              "mean_user": stats["new_users"]["mean_user_accuracy"]}
    truth = np.array([r["true_margin"] for r in new])
    new_a, new_b = pair_indices(new, index_of)
    weights = np.stack([population.weights(r["user_id"]) for r in new])

    # attribute space: pooled Bradley-Terry (train labels in random orientation, so no intercept is needed)
    tr_a, tr_b = pair_indices(train, index_of)
    flip = np.random.default_rng(0).random(len(train)) < 0.5
    first, second = np.where(flip, tr_b, tr_a), np.where(flip, tr_a, tr_b)
    labels = (~flip).astype(float)  # 1 when `first` is the chosen answer
    w_bt = logistic(scores[first] - scores[second], labels)
    result["attributes_btl"] = accuracy((scores[new_a] - scores[new_b]) @ w_bt, truth)

    # attribute space: each new user's weights fitted from their first K context pairs
    pool_index = {(dialogue_prompt(r["prompt"]), " " + r["response"]): i for i, r in enumerate(pool)}
    per_k = {}
    for k in K_VALUES:
        correct = []
        for user in dict.fromkeys(r["user_id"] for r in new):
            rows = [r for r in new if r["user_id"] == user]
            context = rows[0]["context"][:k]
            c_a = np.array([pool_index[(p["prompt"], p["chosen"])] for p in context])
            c_b = np.array([pool_index[(p["prompt"], p["rejected"])] for p in context])
            diffs = np.concatenate([scores[c_a] - scores[c_b], scores[c_b] - scores[c_a]])
            w_user = logistic(diffs, np.r_[np.ones(k), np.zeros(k)], l2=0.05)
            r_a, r_b = pair_indices(rows, index_of)
            correct.append(accuracy((scores[r_a] - scores[r_b]) @ w_user,
                                    np.array([r["true_margin"] for r in rows])))
        per_k[str(k)] = float(np.mean(correct))
    result["attributes_per_user_fit"] = per_k

    # embedding space: true weights on the probes' predictions, and pooled Bradley-Terry on embeddings
    result["embedding_oracle"] = accuracy(np.einsum("nd,nd->n", predicted[new_a] - predicted[new_b], weights), truth)
    if predicted_seen is not None:
        result["embedding_oracle_seen_prompts"] = accuracy(
            np.einsum("nd,nd->n", predicted_seen[new_a] - predicted_seen[new_b], weights), truth)
    scale = embeddings.std(0) + 1e-8
    features = (embeddings[first] - embeddings[second]) / scale
    test_a, test_b = pair_indices(test, index_of)
    test_truth = np.array([r["true_margin"] for r in test])
    best = None
    for l2 in (1e-4, 1e-3, 1e-2, 1e-1):
        w = logistic(features, labels, l2=l2)
        held_out = accuracy(((embeddings[test_a] - embeddings[test_b]) / scale) @ w, test_truth)
        if best is None or held_out > best[0]:
            best = (held_out, l2, w)
    result["embedding_btl_l2"] = best[1]
    result["embedding_btl"] = accuracy(((embeddings[new_a] - embeddings[new_b]) / scale) @ best[2], truth)
    result["agreement_by_temperature"] = {}
    for temperature in (0.25, 0.5, 1.0, 2.0):
        with tempfile.TemporaryDirectory() as folder:
            stats = build_population(folder, dataclasses.replace(config, temperature=temperature), pool=pool)
        result["agreement_by_temperature"][temperature] = stats["new_users"]["label_agreement"]
    return result


def correlations(scores: np.ndarray, names: list[str]) -> list[str]:
    corr = np.corrcoef(scores.T)
    lines = ["| | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    lines += [f"| {n} | " + " | ".join(f"{c:+.2f}" for c in row) + " |" for n, row in zip(names, corr)]
    return lines


def report(pool, names, r2, alphas, r2_seen, scores, users, config, seconds, pooling) -> str:
    chosen = set(config.attributes)
    styles = sorted({r["style"] for r in pool})
    lines = [
        "# The simulated population: attributes and their learnability",
        "",
        f"Pool: {len(pool)} answers by the embedded SmolLM2-135M-Instruct to {len({r['prompt'] for r in pool})} "
        f"prompts in {len(styles)} styles ({', '.join(styles)}); `benchmarks/population_attributes.py`, "
        f"{seconds:.0f} s on 2 CPU cores with the pool's embeddings cached (embedding it takes about 3.5 min once).",
        "",
        "## Linear-probe R² of each attribute from the frozen SmolLM2 embedding",
        "",
        f"Ridge regression from the {pooling}-pooled embedding of `Human: prompt\\n\\nAssistant: answer` "
        "(as the reward trainer embeds it) to the standardized attribute; 5-fold cross-validation grouped by prompt "
        "(the probe "
        "never saw the prompt), and, in the last column, by answer (it saw other answers to the same prompts).",
        "",
        "| attribute | R² (new prompts) | ridge alpha | weighed by users | R² (seen prompts) |",
        "|---|---|---|---|---|",
    ]
    lines += [f"| {n} | {v:.3f} | {a:g} | {'yes' if n in chosen else 'no'} | {w:.3f} |"
              for n, v, a, w in zip(names, r2, alphas, r2_seen)]
    lines += ["", "Correlations between the standardized attributes over the pool:", ""]
    lines += correlations(scores, names)
    u = users
    lines += [
        "",
        "## Users: one pooled reward against each user's own preference",
        "",
        f"Attributes: {', '.join(config.attributes)}. "
        f"{config.train_users} training users x {config.pairs_per_user} pairs, {config.new_users} new "
        f"users with {config.context_pairs} context and {config.new_test_pairs} test pairs, temperature "
        f"{config.temperature}, shared scale {config.shared_scale}, spread {config.spread}, seed {config.seed}. "
        "Accuracies on the new users' test pairs against their true preference.",
        "",
        "| | accuracy |",
        "|---|---|",
        f"| label agreement (the labels themselves; the ceiling against labels) | {u['label_agreement']:.1%} |",
        "| true weights (attribute oracle) | 100% |",
        f"| pooled Bradley-Terry on attribute differences | {u['attributes_btl']:.1%} |",
        f"| one reward = the mean training user | {u['mean_user']:.1%} |",
        f"| embedding oracle: true weights on probe-predicted attributes (new prompts) | {u['embedding_oracle']:.1%} |",
        f"| embedding oracle, probes that saw other answers to the prompt | {u['embedding_oracle_seen_prompts']:.1%} |",
        f"| pooled Bradley-Terry on embedding differences (L2 {u['embedding_btl_l2']:g}) | {u['embedding_btl']:.1%} |",
        "",
        f"Gap between the embedding oracle and pooled Bradley-Terry on embeddings: "
        f"{100 * (u['embedding_oracle'] - u['embedding_btl']):.1f} points. The probes here never saw the answers "
        "they score; in the data set the new users' answers also appear in training users' pairs (only the pairs "
        "are disjoint), so a decoder trained on them may do somewhat better than this oracle.",
        "",
        "Each new user's weights fitted by logistic regression on the attribute differences of their first K "
        "context pairs (perfect features; a reference for what K noisy labels can tell):",
        "",
        "| K | " + " | ".join(u["attributes_per_user_fit"]) + " |",
        "|---" * (len(u["attributes_per_user_fit"]) + 1) + "|",
        "| accuracy | " + " | ".join(f"{v:.1%}" for v in u["attributes_per_user_fit"].values()) + " |",
        "",
        "Label noise: label agreement with the true preference (new users) by `--temperature`:",
        "",
        "| temperature | " + " | ".join(f"{t:g}" for t in u["agreement_by_temperature"]) + " |",
        "|---" * (len(u["agreement_by_temperature"]) + 1) + "|",
        "| label agreement | " + " | ".join(f"{v:.1%}" for v in u["agreement_by_temperature"].values()) + " |",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pool", default=None)
    parser.add_argument("--output", default="benchmarks/results/population_attributes.md")
    parser.add_argument("--temperature", type=float, default=PopulationConfig.temperature)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--attributes", default=None, help="attributes users weigh (default: the data set's)")
    parser.add_argument("--pooling", default="mean", choices=["mean", "last"], help="how the embedding pools tokens")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    torch.manual_seed(0)
    pool = load_pool(args.pool)
    names = list(ATTRIBUTES)
    raw = raw_attributes([r["response"] for r in pool], names)
    scores = Standardization.fit(raw).apply(raw)
    embeddings = embed_pool(pool, args.pooling)
    r2, alphas, predicted = ridge_probe(embeddings, scores, np.array([r["prompt"] for r in pool]))
    config = PopulationConfig(temperature=args.temperature, seed=args.seed,
                              attributes=parse_attributes(args.attributes))
    columns = [names.index(n) for n in config.attributes]
    r2_seen, _, predicted_seen = ridge_probe(embeddings, scores, np.arange(len(pool)))
    users = user_experiments(pool, scores[:, columns], predicted[:, columns], embeddings, config,
                             predicted_seen[:, columns])
    text = report(pool, names, r2, alphas, r2_seen, scores, users, config, time.perf_counter() - start, args.pooling)
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
