"""Active query selection on a constructed case: one candidate pair reveals the user, the others do not."""

import math
from types import SimpleNamespace

import pytest
import torch

from vpl_trl.evaluation.active_queries import (
    PairSet,
    choose_query,
    information_gain,
    posterior,
    preference_probabilities,
    run_queries,
    sample_latents,
)
from vpl_trl.models import VPLRewardModel


class ContestedAxisModel(torch.nn.Module):
    """r(e, z) = 5 (e[0] z[0] + e[1]): every user agrees along the second embedding coordinate, and along the
    first prefers the sign of z[0]. The encoder reads z[0] off the answered pairs' first coordinate."""

    def __init__(self):
        super().__init__()
        self.config = SimpleNamespace(use_latent=True, latent_dim=2, normalize_latent=True, reward_type="vae")
        self.scale = torch.nn.Parameter(torch.tensor(5.0))

    sample_latent = VPLRewardModel.sample_latent  # the model's own sampling and normalization
    normalize_latent = VPLRewardModel.normalize_latent

    def encode_context(self, chosen, rejected, mask=None):
        evidence = (chosen - rejected)[..., 0].sum(-1)
        mean = torch.stack([3 * evidence, torch.zeros_like(evidence)], dim=-1)
        return mean, torch.full_like(mean, -1.0)

    def forward(self, embeddings, latent):
        z = latent.repeat(len(embeddings) // len(latent), 1)
        return SimpleNamespace(logits=(self.scale * (embeddings[:, 0] * z[:, 0] + embeddings[:, 1]))[:, None])


CONTESTED = 3  # the index of the one informative candidate


def pairs(user_sign: float, n: int, contested_at: set[int]) -> PairSet:
    """Pairs labelled by a user whose z[0] has `user_sign`: contested pairs along the first coordinate."""
    chosen, rejected = torch.zeros(n, 2), torch.zeros(n, 2)
    for i in range(n):
        if i in contested_at:
            chosen[i, 0], rejected[i, 0] = user_sign, -user_sign
        else:
            chosen[i, 1], rejected[i, 1] = 1.0, -1.0
    controversial = torch.tensor([i in contested_at for i in range(n)])
    return PairSet(chosen, rejected, chosen, rejected, controversial)


def test_information_gain_is_high_only_where_sampled_users_disagree():
    probabilities = torch.tensor([
        [0.99, 0.01, 0.99, 0.01],  # confident answers that flip with z: about log 2 nats
        [0.9, 0.9, 0.9, 0.9],  # the same answer for every z: nothing to learn
        [0.5, 0.5, 0.5, 0.5],  # a coin flip for every z: the answer is noise
    ])
    gain = information_gain(probabilities)
    assert gain[0] == pytest.approx(math.log(2), abs=0.06)
    assert gain[1] == pytest.approx(0, abs=1e-6) and gain[2] == pytest.approx(0, abs=1e-6)


def test_no_answers_means_the_prior_and_samples_are_normalized():
    model = ContestedAxisModel()
    mean, logvar = posterior(model, torch.zeros(0, 2), torch.zeros(0, 2))
    assert torch.equal(mean, torch.zeros(1, 2)) and torch.equal(logvar, torch.zeros(1, 2))
    latents = sample_latents(model, mean, logvar, 100, torch.Generator().manual_seed(0))
    assert torch.allclose(latents.norm(dim=-1), torch.full((100,), math.sqrt(2)))
    assert 0.3 < (latents[:, 0] > 0).float().mean() < 0.7  # the prior does not know the user's side


def test_preference_probabilities_pair_each_candidate_with_each_latent():
    model = ContestedAxisModel()
    first, second = torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([[-1.0, 0.0], [0.0, -1.0]])
    latents = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0]])
    p = preference_probabilities(model, first, second, latents)
    assert p.shape == (2, 3)
    assert torch.allclose(p[0], torch.sigmoid(torch.tensor([10.0, -10.0, 0.0])))
    assert torch.allclose(p[1], torch.sigmoid(torch.tensor([10.0, 10.0, 10.0])))


def test_the_informative_pair_is_asked_first_and_then_nothing_is_left_to_learn():
    model = ContestedAxisModel()
    candidates = pairs(+1.0, 6, contested_at={CONTESTED})
    choice, scores = choose_query(model, candidates, [], num_samples=64, generator=torch.Generator().manual_seed(0))
    assert choice == CONTESTED
    assert scores[CONTESTED] > 0.5 and scores[torch.arange(6) != CONTESTED].max() < 1e-3
    # Once it is answered the posterior knows the user's side: the contested pair is excluded, the rest uninformative.
    _, scores = choose_query(model, candidates, [CONTESTED], num_samples=64, generator=torch.Generator().manual_seed(0))
    assert scores[CONTESTED] == -torch.inf and scores[torch.arange(6) != CONTESTED].max() < 1e-3


@pytest.mark.parametrize("user_sign", [1.0, -1.0])
def test_active_queries_learn_the_user_from_one_answer_where_random_ones_mostly_do_not(user_sign):
    model = ContestedAxisModel()
    candidates = pairs(user_sign, 6, contested_at={CONTESTED})
    evaluation = pairs(user_sign, 10, contested_at=set(range(5)))  # half contested, half agreed
    active = run_queries(model, candidates, evaluation, "active", num_queries=2, seed=0)
    assert active["asked"][0] == CONTESTED
    assert active["accuracy"] == [0.5, 1.0, 1.0]  # the prior mean gets only the agreed pairs right
    assert active["controversial_accuracy"] == [0.0, 1.0, 1.0]
    after_one = [
        run_queries(model, candidates, evaluation, "random", num_queries=1, seed=s)["accuracy"][1] for s in range(30)
    ]
    assert set(after_one) == {0.5, 1.0}  # right only when the random pick happens to be the contested pair
    assert sum(after_one) / len(after_one) < 0.75


def test_unknown_strategy_is_refused():
    model = ContestedAxisModel()
    with pytest.raises(ValueError, match="strategy"):
        run_queries(model, pairs(1.0, 3, {0}), pairs(1.0, 3, {0}), "greedy", num_queries=1)
