"""A LoRe-style personalized reward (Bose et al., 2025, "Personalizing LLMs via Low-Rank Reward Modeling").

A basis of `rank` linear reward heads on frozen response embeddings is shared by all users; each user weighs
the heads with weights on the simplex: r_u(e) = w_u . (B e). Basis and training users' weights are learned
together (Bradley-Terry); a new user's weights are fitted from their few labelled pairs with the basis fixed.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .pairs import PreferencePairs, fit_bradley_terry


class LowRankReward(nn.Module):
    """`rank` shared linear heads (`basis`) and one simplex weight vector per training user (softmax of
    `user_logits`)."""

    def __init__(self, embedding_dim: int, rank: int, num_users: int, seed: int = 0):
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.basis = nn.Linear(embedding_dim, rank, bias=False)
        with torch.no_grad():
            self.basis.weight.copy_(torch.randn(rank, embedding_dim, generator=generator) / embedding_dim ** 0.5)
        # Small random logits so that users start apart and the heads specialize.
        self.user_logits = nn.Parameter(0.1 * torch.randn(num_users, rank, generator=generator))

    @property
    def rank(self) -> int:
        return self.basis.out_features

    def user_weights(self, users: torch.Tensor | None = None) -> torch.Tensor:
        logits = self.user_logits if users is None else self.user_logits[users]
        return logits.softmax(-1)

    def forward(self, embeddings: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Rewards (n,) of `embeddings` (n, d) under simplex `weights`, (rank,) or one row per embedding."""
        return (self.basis(embeddings) * weights).sum(-1)

    @torch.enable_grad()
    def fit_user(self, chosen: torch.Tensor, rejected: torch.Tensor, l2: float = 1e-2, max_iter: int = 100
                 ) -> torch.Tensor:
        """A new user's simplex weights from their labelled pairs (embeddings of the chosen and rejected
        responses), the basis fixed: L-BFGS on the Bradley-Terry loss, with a small L2 penalty on the logits so
        that separable answers keep them finite. No pairs give uniform weights."""
        logits = torch.zeros(self.rank, requires_grad=True)
        if len(chosen) == 0:
            return logits.detach().softmax(-1)
        with torch.no_grad():
            differences = self.basis(chosen) - self.basis(rejected)
        optimizer = torch.optim.LBFGS([logits], max_iter=max_iter, line_search_fn="strong_wolfe")

        def closure():
            optimizer.zero_grad()
            loss = -F.logsigmoid(differences @ logits.softmax(-1)).mean() + l2 * (logits ** 2).sum()
            loss.backward()
            return loss

        optimizer.step(closure)
        return logits.detach().softmax(-1)


def fit_low_rank_reward(
    embeddings: torch.Tensor,
    pairs: PreferencePairs,
    num_users: int,
    rank: int = 8,
    steps: int = 3000,
    learning_rate: float = 3e-3,
    seed: int = 0,
) -> LowRankReward:
    """Learn the basis and the training users' weights from their labelled pairs (`embeddings`: one row per
    response, standardized)."""
    torch.manual_seed(seed)
    model = LowRankReward(embeddings.shape[1], rank, num_users, seed=seed)

    def margin(batch: torch.Tensor) -> torch.Tensor:
        weights = model.user_weights(pairs.user[batch])
        return model(embeddings[pairs.chosen[batch]], weights) - model(embeddings[pairs.rejected[batch]], weights)

    fit_bradley_terry(margin, model.parameters(), len(pairs), steps, learning_rate=learning_rate, seed=seed,
                      desc=f"LoRe (rank {rank})")
    return model.eval()
