"""Losses of VPL and its baselines, and the KL-weight annealing schedule."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def gaussian_kl(mean: torch.Tensor, logvar: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """KL(N(mean, exp(logvar)) || N(0, I)), summed over latent dimensions; averaged over the batch
    (`reduction="mean"`) or one value per row (`"none"`)."""
    kl = 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar).sum(-1)
    return kl.mean() if reduction == "mean" else kl


def bradley_terry_loss(
    rewards_chosen: torch.Tensor, rewards_rejected: torch.Tensor, margin: torch.Tensor | float = 0.0
) -> torch.Tensor:
    """-log sigmoid(r_chosen - r_rejected - margin), as `trl.RewardTrainer` computes it."""
    return -F.logsigmoid(rewards_chosen - rewards_rejected - margin).mean()


def split_mean_std(head: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The mean-and-variance head's (mean, softplus std)."""
    return head[..., 0], F.softplus(head[..., 1]) + 1e-4


def mean_and_variance_loss(
    head_chosen: torch.Tensor, head_rejected: torch.Tensor, margin: torch.Tensor | float = 0.0
) -> torch.Tensor:
    """DPL mean-and-variance: P(chosen) = Phi((mu_c - mu_r - margin) / sqrt(sigma_c^2 + sigma_r^2))."""
    mean_c, std_c = split_mean_std(head_chosen)
    mean_r, std_r = split_mean_std(head_rejected)
    z = (mean_c - mean_r - margin) / torch.sqrt(std_c.pow(2) + std_r.pow(2))
    return -torch.special.log_ndtr(z).mean()


def categorical_chosen_probability(logits_chosen: torch.Tensor, logits_rejected: torch.Tensor) -> torch.Tensor:
    """P(reward_chosen > reward_rejected) for two categorical distributions over the same ordered atoms
    (ties count half)."""
    p_c = logits_chosen.softmax(-1)
    p_r = logits_rejected.softmax(-1)
    cdf_r_below = torch.cumsum(p_r, -1) - p_r  # P(r < atom_i)
    return (p_c * (cdf_r_below + 0.5 * p_r)).sum(-1)


def categorical_loss(
    logits_chosen: torch.Tensor, logits_rejected: torch.Tensor, entropy_coeff: float = 0.1
) -> torch.Tensor:
    """DPL categorical: -log P(chosen) minus `entropy_coeff` times the mean entropy of the two distributions
    (the entropy bonus keeps the distributions from collapsing onto one atom)."""
    prob = categorical_chosen_probability(logits_chosen, logits_rejected).clamp_min(1e-8)
    entropy = torch.cat([logits_chosen, logits_rejected]).softmax(-1)
    entropy = -(entropy * entropy.clamp_min(1e-12).log()).sum(-1).mean()
    return -prob.log().mean() - entropy_coeff * entropy


def head_to_reward(head: torch.Tensor, reward_type: str) -> torch.Tensor:
    """The scalar reward of a head output: the value, the mean, or the expected atom on [0, 1]."""
    if reward_type in ("vae", "base", "mean_and_variance"):
        return head[..., 0]
    atoms = torch.linspace(0.0, 1.0, head.shape[-1], device=head.device, dtype=head.dtype)
    return (head.softmax(-1) * atoms).sum(-1)


def preference_loss(
    head_chosen: torch.Tensor,
    head_rejected: torch.Tensor,
    reward_type: str,
    entropy_coeff: float = 0.1,
    margin: torch.Tensor | None = None,
) -> torch.Tensor:
    """The preference loss of a reward type on its head outputs; `margin` (per pair) is the reward difference the
    chosen response must exceed, as in `trl.RewardTrainer` (the categorical head, on [0, 1], takes none)."""
    margin = 0.0 if margin is None else margin.to(head_chosen.dtype)
    if reward_type in ("vae", "base"):
        return bradley_terry_loss(head_chosen[..., 0], head_rejected[..., 0], margin)
    if reward_type == "mean_and_variance":
        return mean_and_variance_loss(head_chosen, head_rejected, margin)
    if not isinstance(margin, float):
        raise ValueError("a `margin` column is not supported by the categorical reward type.")
    if reward_type == "categorical":
        return categorical_loss(head_chosen, head_rejected, entropy_coeff)
    raise ValueError(f"unknown reward type {reward_type!r}")


def kl_weight_at(step: int, weight: float, schedule: str, period: int, baseline: float) -> float:
    """The annealed KL weight at `step`.

    `constant`: `weight`. `linear`: ramps from `baseline * weight` to `weight` over `period` steps.
    `cyclical`: cyclical cosine, each period rising from `baseline * weight` to `weight` over its first
    half (cosine-shaped) and holding there for the second half.
    """
    if schedule == "constant" or weight == 0.0:
        return weight
    if schedule == "linear":
        ramp = min(1.0, step / max(1, period))
    elif schedule == "cyclical":
        phase = (step % max(1, period)) / max(1, period)
        ramp = 0.5 * (1.0 - math.cos(math.pi * min(1.0, 2.0 * phase)))
    else:
        raise ValueError(f"unknown KL schedule {schedule!r}: expected constant, linear or cyclical.")
    return weight * (baseline + (1.0 - baseline) * ramp)
