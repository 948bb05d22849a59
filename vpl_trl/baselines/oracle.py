"""The ground-truth oracle of a simulated population: VPL's reward decoder given each user's true weights
instead of the latent `z` inferred from their context. On the same frozen embeddings, it is the ceiling of
any method that infers a user latent."""

from __future__ import annotations

import torch
import torch.nn as nn

from ..models.modeling_vpl import LATENT_DECODERS, _mlp
from .pairs import PreferencePairs, fit_bradley_terry


class OracleReward(nn.Module):
    """r(e, w): the `decoder_type` decoder of a VPL model (`mlp` on `[e, w]`, `bilinear` or `residual`) on
    standardized embeddings and a user's true weight vector `w`."""

    def __init__(self, embedding_dim: int, num_weights: int, hidden_dim: int = 256, decoder_type: str = "bilinear"):
        super().__init__()
        self.decoder_type = decoder_type
        if decoder_type in LATENT_DECODERS:
            self.decoder = LATENT_DECODERS[decoder_type](embedding_dim, num_weights, hidden_dim)
        elif decoder_type == "mlp":
            self.decoder = _mlp(embedding_dim + num_weights, hidden_dim, 1, out_bias=False)
        else:
            raise ValueError(f"decoder_type must be 'mlp', 'bilinear' or 'residual', got {decoder_type!r}.")

    def forward(self, embeddings: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Rewards (n,) of `embeddings` (n, d) for users with `weights` (n, num_weights)."""
        if self.decoder_type in LATENT_DECODERS:
            return self.decoder(embeddings, weights).squeeze(-1)
        return self.decoder(torch.cat([embeddings, weights], dim=-1)).squeeze(-1)


def fit_oracle_reward(
    embeddings: torch.Tensor,
    pairs: PreferencePairs,
    user_weights: torch.Tensor,
    hidden_dim: int = 256,
    decoder_type: str = "bilinear",
    steps: int = 3000,
    learning_rate: float = 1e-3,
    seed: int = 0,
) -> OracleReward:
    """Train the oracle on the training users' labelled pairs, each user given their true weights
    (`user_weights`: one row per user index of `pairs.user`)."""
    torch.manual_seed(seed)
    model = OracleReward(embeddings.shape[1], user_weights.shape[1], hidden_dim, decoder_type)
    weights = user_weights.float()

    def margin(batch: torch.Tensor) -> torch.Tensor:
        w = weights[pairs.user[batch]]
        return model(embeddings[pairs.chosen[batch]], w) - model(embeddings[pairs.rejected[batch]], w)

    fit_bradley_terry(margin, model.parameters(), len(pairs), steps, learning_rate=learning_rate, seed=seed,
                      desc=f"oracle ({decoder_type} decoder, true weights)")
    return model.eval()
