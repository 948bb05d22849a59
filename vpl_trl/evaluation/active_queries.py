"""Active queries: which pair to ask a new user next, to learn their latent `z` with few answers.

The current belief about the user is the encoder's posterior N(mean, exp(logvar)) given the pairs answered
so far (the prior N(0, I) before any answer). Each candidate pair is scored by the expected information its
answer carries about `z` (the BALD criterion): with p_s = P(first preferred | z_s) for posterior samples z_s,

    I(answer; z) = H(mean_s p_s) - mean_s H(p_s),

high when the sampled users disagree on the pair, each of them confidently (a pair whose preferred response
flips across samples). The best pair is asked, the answer joins the user's context, the context is encoded
again, and so on. `simulate_active_queries` runs this for users simulated from a labelled dataset (each
answers with their own label) and compares it with asking pairs at random.
"""

from __future__ import annotations

import random
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from datasets import Dataset

from ..inference.reward_inference import RewardInference
from ..text import render_text

STRATEGIES = ("active", "random")


@dataclass
class PairSet:
    """Preference pairs of one user as embeddings. `chosen`/`rejected` are what the reward model scores (the
    adapted backbone's embeddings in `lora` mode), `context_chosen`/`context_rejected` what the context
    encoder reads (the frozen backbone's); in `frozen` mode they are the same tensors."""

    chosen: torch.Tensor
    rejected: torch.Tensor
    context_chosen: torch.Tensor
    context_rejected: torch.Tensor
    controversial: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.chosen)

    def subset(self, index) -> PairSet:
        index = torch.as_tensor(index, dtype=torch.long)
        pick = lambda t: None if t is None else t[index]  # noqa: E731
        return PairSet(*(pick(t) for t in (self.chosen, self.rejected, self.context_chosen, self.context_rejected,
                                           self.controversial)))


@torch.no_grad()
def posterior(model, context_chosen: torch.Tensor, context_rejected: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and log-variance (1, latent_dim) of q(z | answered pairs), or the prior N(0, I) with no answers."""
    if len(context_chosen) == 0:
        zeros = torch.zeros(1, model.config.latent_dim, device=context_chosen.device)
        return zeros, zeros
    mean, logvar = model.encode_context(context_chosen[None], context_rejected[None])
    return mean.float(), logvar.float()


def sample_latents(
    model, mean: torch.Tensor, logvar: torch.Tensor, num_samples: int, generator: torch.Generator
) -> torch.Tensor:
    """`num_samples` draws of z ~ N(mean, exp(logvar)), as the decoder sees them (normalized)."""
    draws = model.sample_latent(mean.expand(num_samples, -1), logvar.expand(num_samples, -1), generator)
    return model.normalize_latent(draws)


@torch.no_grad()
def preference_probabilities(model, first: torch.Tensor, second: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
    """P(first ≻ second | z) = sigmoid(r(first, z) - r(second, z)) for every pair and latent: (pairs, latents)."""
    n, s = len(first), len(latents)
    # The model pairs row i of `embeddings` with latent i % s: repeat each response s times in a row.
    embeddings = torch.cat([first, second]).repeat_interleave(s, dim=0)
    rewards = model(embeddings=embeddings, latent=latents).logits.float().view(2, n, s)
    return torch.sigmoid(rewards[0] - rewards[1])


def _entropy(p: torch.Tensor) -> torch.Tensor:
    p = p.clamp(1e-7, 1 - 1e-7)
    return -(p * p.log() + (1 - p) * (1 - p).log())


def information_gain(probabilities: torch.Tensor) -> torch.Tensor:
    """BALD: the mutual information between a pair's answer and z, from P(first ≻ second | z_s) (pairs, samples)."""
    return _entropy(probabilities.mean(-1)) - _entropy(probabilities).mean(-1)


def choose_query(
    model,
    candidates: PairSet,
    answered: list[int],
    num_samples: int,
    generator: torch.Generator,
) -> tuple[int, torch.Tensor]:
    """The unanswered candidate with the most expected information about z given the `answered` ones
    (ties broken at random); returns its index and every candidate's score (answered ones at -inf)."""
    mean, logvar = posterior(model, candidates.context_chosen[answered], candidates.context_rejected[answered])
    latents = sample_latents(model, mean, logvar, num_samples, generator)
    scores = information_gain(preference_probabilities(model, candidates.chosen, candidates.rejected, latents))
    scores[answered] = -torch.inf
    best = torch.nonzero(scores >= scores.max() - 1e-9).flatten()
    choice = best[torch.randint(len(best), (1,), generator=generator)].item()
    return int(choice), scores


@torch.no_grad()
def accuracy_given_answers(
    model, candidates: PairSet, answered: list[int], evaluation: PairSet
) -> dict[str, float | None]:
    """Accuracy on `evaluation` with z the posterior mean given the answered candidates (the prior mean, 0,
    with no answers)."""
    mean, _ = posterior(model, candidates.context_chosen[answered], candidates.context_rejected[answered])
    latent = model.normalize_latent(mean)
    rewards = model(embeddings=torch.cat([evaluation.chosen, evaluation.rejected]), latent=latent)
    chosen, rejected = rewards.logits.float().view(2, -1)
    correct = chosen > rejected
    result: dict[str, float | None] = {"accuracy": correct.float().mean().item()}
    if evaluation.controversial is not None:
        mask = evaluation.controversial.bool()
        result["controversial_accuracy"] = correct[mask].float().mean().item() if mask.any() else None
    return result


def run_queries(
    model,
    candidates: PairSet,
    evaluation: PairSet,
    strategy: str,
    num_queries: int,
    num_samples: int = 64,
    seed: int = 0,
) -> dict[str, list]:
    """Ask `num_queries` candidates one at a time (by `strategy`: `active` or `random`), the simulated user
    answering with the candidates' labels; the accuracy on `evaluation` after 0, 1, ... answers, and the
    candidates asked."""
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}.")
    num_queries = min(num_queries, len(candidates))
    generator = torch.Generator().manual_seed(seed)
    picker = random.Random(seed)
    answered: list[int] = []
    history: dict[str, list] = defaultdict(list)
    for step in range(num_queries + 1):
        for key, value in accuracy_given_answers(model, candidates, answered, evaluation).items():
            history[key].append(value)
        if step == num_queries:
            break
        if strategy == "active":
            choice, _ = choose_query(model, candidates, answered, num_samples, generator)
        else:
            choice = picker.choice([i for i in range(len(candidates)) if i not in answered])
        answered.append(choice)
    history["asked"] = answered
    return dict(history)


# ----- simulated users from a labelled dataset ----------------------------------------------------------------


def embed_pairs(inference: RewardInference, rows: list[dict[str, Any]]) -> PairSet:
    """Embeddings of labelled pairs: the frozen backbone's (through the table and its cache) for the encoder, the
    adapted backbone's for scoring in `lora` mode."""
    tokenizer = inference.tokenizer
    chosen = [render_text(tokenizer, r.get("prompt"), r["chosen"]) for r in rows]
    rejected = [render_text(tokenizer, r.get("prompt"), r["rejected"]) for r in rows]
    frozen = inference.embed(chosen + rejected, desc="Embedding query pairs").float()
    context_chosen, context_rejected = frozen[: len(rows)], frozen[len(rows):]
    if inference.model.config.embedding_mode == "lora":
        scored = inference.embed_scored(chosen + rejected, desc="Embedding query pairs").float()
        score_chosen, score_rejected = scored[: len(rows)], scored[len(rows):]
    else:
        score_chosen, score_rejected = context_chosen, context_rejected
    controversial = None
    if all("controversial" in r for r in rows):
        controversial = torch.tensor([bool(r["controversial"]) for r in rows])
    tensors = [t.to(inference.device) for t in (score_chosen, score_rejected, context_chosen, context_rejected)]
    return PairSet(*tensors, controversial=controversial)


def simulate_active_queries(
    predictor,
    dataset: Dataset,
    num_queries: int = 8,
    num_candidates: int = 40,
    users_per_group: int = 10,
    num_samples: int = 64,
    max_evaluation_pairs: int = 200,
    seed: int = 0,
) -> dict[str, Any]:
    """Active against random queries for users simulated from `dataset` (pairs labelled by `user_id`).

    Each simulated user is one of the dataset's users with a random split of that user's pairs into a pool of
    `num_candidates` unlabelled candidates (answered, when asked, with the user's own label) and held-out
    pairs for scoring. Both strategies see the same split. Returns the accuracy after 0..num_queries answers
    per strategy and simulated user, and how often each strategy asked a controversial pair.
    """
    rows = dataset.to_list()
    simulated = []
    for user, indices in sorted(_rows_by_user(dataset).items(), key=lambda item: str(item[0])):
        if len(indices) <= num_candidates:
            raise ValueError(
                f"user {user!r} has {len(indices)} pairs: more than num_candidates={num_candidates} needed."
            )
        for trial in range(users_per_group):
            order = random.Random(f"{seed}-active-{user}-{trial}").sample(indices, len(indices))
            simulated.append((user, [rows[i] for i in order[:num_candidates]],
                              [rows[i] for i in order[num_candidates: num_candidates + max_evaluation_pairs]]))
    return compare_strategies(predictor, simulated, num_queries, num_candidates, num_samples, seed)


def simulate_new_user_queries(
    predictor, dataset: Dataset, num_queries: int = 16, num_samples: int = 64, seed: int = 0
) -> dict[str, Any]:
    """Active against random queries for users who bring their own context (new users, never seen in
    training): the pairs of their context are the candidates (answered, when asked, with the user's label),
    and their rows the held-out pairs, scored against the user's true preference where the data knows it
    (`true_margin`), else against their labels."""
    rows = dataset.to_list()
    simulated = []
    for user, indices in sorted(_rows_by_user(dataset).items(), key=lambda item: str(item[0])):
        context = rows[indices[0]].get("context")
        if not context:
            raise ValueError(f"user {user!r} brings no context: the candidates of their queries come from it.")
        simulated.append((user, list(context), [_as_truly_preferred(rows[i]) for i in indices
                                                if rows[i].get("true_margin", 1) != 0]))
    return compare_strategies(predictor, simulated, num_queries, min(len(c) for _, c, _ in simulated), num_samples,
                              seed)


def _rows_by_user(dataset: Dataset) -> dict[Any, list[int]]:
    by_user: dict[Any, list[int]] = defaultdict(list)
    for index, user in enumerate(dataset["user_id"]):
        by_user[user].append(index)
    return by_user


def _as_truly_preferred(row: dict[str, Any]) -> dict[str, Any]:
    """The row with `chosen` the response the user truly prefers (its label may say otherwise)."""
    if row.get("true_margin", 0) < 0:
        return {**row, "chosen": row["rejected"], "rejected": row["chosen"], "true_margin": -row["true_margin"]}
    return row


def compare_strategies(
    predictor, simulated: list[tuple[Any, list[dict], list[dict]]], num_queries: int, num_candidates: int,
    num_samples: int, seed: int,
) -> dict[str, Any]:
    """Run both strategies for each simulated user `(user, candidate rows, evaluation rows)`, with the model of
    `predictor` (a `VPLRewardTrainer`, or a `RewardInference`)."""
    inference = predictor.inference
    model = inference.model
    if not model.config.use_latent:
        raise ValueError(f"active queries infer a user latent; reward type {model.config.reward_type!r} has none.")
    was_training = model.training
    model.eval()
    result: dict[str, Any] = {
        "queries": list(range(num_queries + 1)),
        "num_candidates": num_candidates,
        "num_samples": num_samples,
        "users": [],
        **{s: defaultdict(list) for s in STRATEGIES},
    }
    asked_controversial: dict[str, list[list[bool]]] = {s: [] for s in STRATEGIES}
    trials: dict[Any, int] = defaultdict(int)
    user_numbers: dict[Any, int] = {}
    for user, candidate_rows, evaluation_rows in simulated:
        user_index = user_numbers.setdefault(user, len(user_numbers))
        trial = trials[user]
        trials[user] += 1
        candidates, evaluation = embed_pairs(inference, candidate_rows), embed_pairs(inference, evaluation_rows)
        result["users"].append(str(user))
        for strategy in STRATEGIES:
            history = run_queries(model, candidates, evaluation, strategy, num_queries, num_samples,
                                  seed=seed * 100_003 + user_index * 1_009 + trial)
            for key in ("accuracy", "controversial_accuracy"):
                if key in history:
                    result[strategy][key].append(history[key])
            if candidates.controversial is not None:
                asked_controversial[strategy].append(candidates.controversial[history["asked"]].tolist())
    model.train(was_training)
    result["num_simulated_users"] = len(result["users"])
    for strategy in STRATEGIES:
        # Stored per query count (rows) and simulated user (columns), as the plots read them.
        result[strategy] = {key: np.asarray(runs, dtype=float).T.tolist() for key, runs in result[strategy].items()
                            if all(v is not None for run in runs for v in run)}
        if asked_controversial[strategy]:
            result[strategy]["asked_controversial"] = (
                np.asarray(asked_controversial[strategy], dtype=float).mean(0).tolist()
            )
    return result


def summarize_active_queries(result: dict[str, Any]) -> list[dict[str, Any]]:
    """Per number of answered queries: mean and std over simulated users of each strategy's accuracy."""
    rows = []
    for step, n in enumerate(result["queries"]):
        row: dict[str, Any] = {"queries": n}
        for strategy in STRATEGIES:
            for key, values in result[strategy].items():
                if key == "asked_controversial":
                    if step < len(values):
                        row[f"{strategy}_asked_controversial"] = values[step]
                    continue
                row[f"{strategy}_{key}_mean"] = float(np.mean(values[step]))
                row[f"{strategy}_{key}_std"] = float(np.std(values[step]))
        rows.append(row)
    return rows
