"""VPL reward model: backbone LLM embedding, user-context encoder (Gaussian posterior over `z`), reward decoder."""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from transformers import PreTrainedModel
from transformers.utils import ModelOutput

from ..losses import gaussian_kl, head_to_reward
from .backbone import (
    adapter_disabled,
    backbone_config_dict,
    backbone_signature,
    build_backbone,
    disable_checkpointing,
    enable_checkpointing,
    inject_lora_adapter,
    keep_4bit_layers_differentiable,
    load_backbone,
    local_model_folder,
    match_backbone_dtype,
)
from .configuration_vpl import VPLConfig, resolve_embedding_layer

WEIGHTS_NAME = "model.safetensors"


def _mlp(in_dim: int, hidden_dim: int, out_dim: int, out_bias: bool = True) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(in_dim, hidden_dim),
        nn.LeakyReLU(0.2),
        nn.Linear(hidden_dim, hidden_dim),
        nn.LeakyReLU(0.2),
        nn.Linear(hidden_dim, out_dim, bias=out_bias),
    )


class UserContextEncoder(nn.Module):
    """Maps K context pairs `(e_chosen, e_rejected)` to the mean and log-variance of q(z | context).

    A pair MLP on `[e_chosen, e_rejected]`, single-head self-attention over the K pairs (padded pairs
    masked out), a masked mean, then linear heads for the mean and the log-variance.
    """

    def __init__(self, embedding_dim: int, hidden_dim: int, latent_dim: int):
        super().__init__()
        self.pair_encoder = _mlp(2 * embedding_dim, hidden_dim, latent_dim)
        self.query = nn.Linear(latent_dim, latent_dim)
        self.key = nn.Linear(latent_dim, latent_dim)
        self.value = nn.Linear(latent_dim, latent_dim)
        self.mean_head = nn.Linear(latent_dim, latent_dim)
        self.logvar_head = nn.Linear(latent_dim, latent_dim)

    def forward(
        self, chosen: torch.Tensor, rejected: torch.Tensor, mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        mask = _check_context(chosen, rejected, mask)
        pairs = self.pair_encoder(torch.cat([chosen, rejected], dim=-1))
        scores = self.query(pairs) @ self.key(pairs).transpose(1, 2) / math.sqrt(pairs.shape[-1])
        scores = scores.masked_fill(~mask[:, None, :], torch.finfo(scores.dtype).min)
        attended = scores.softmax(-1) @ self.value(pairs)
        weights = mask.to(attended.dtype).unsqueeze(-1)
        pooled = (attended * weights).sum(1) / weights.sum(1)
        # The log-variance is clamped to [-1, 1] as in the reference method; the mean is left free, since a
        # clamped mean saturates and stops the encoder's gradient (z is normalized downstream anyway).
        return self.mean_head(pooled), self.logvar_head(pooled).clamp(-1, 1)


class DifferenceContextEncoder(nn.Module):
    """Maps K context pairs to q(z | context) through the mean over the pairs of a linear map of
    `e_chosen - e_rejected`: the statistic a linear preference model's posterior rests on. It has far fewer
    ways to overfit the training users than the attention encoder, so it carries over to new users better
    when there are few training users (benchmarks/results/population.md)."""

    def __init__(self, embedding_dim: int, hidden_dim: int, latent_dim: int):
        super().__init__()
        self.pair_encoder = nn.Linear(embedding_dim, hidden_dim)
        self.mean_head = nn.Linear(hidden_dim, latent_dim)
        self.logvar_head = nn.Linear(hidden_dim, latent_dim)

    def forward(
        self, chosen: torch.Tensor, rejected: torch.Tensor, mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        mask = _check_context(chosen, rejected, mask)
        weights = mask.to(chosen.dtype).unsqueeze(-1)
        pooled = (self.pair_encoder(chosen - rejected) * weights).sum(1) / weights.sum(1)
        return self.mean_head(pooled), self.logvar_head(pooled).clamp(-1, 1)


class BayesianContextEncoder(nn.Module):
    """q(z | context) as the product of the N(0, I) prior and one Gaussian factor per context pair: pair i says
    `z ~ N(m_i, 1 / p_i)`, with `m_i` a linear map of `h_i = A (e_chosen - e_rejected)` (odd in the pair) and the
    precision `p_i = softplus(B |h_i|) >= 0` (the same for the pair read either way round). The posterior precision is
    `1 + sum_i p_i` and its mean `sum_i p_i m_i / (1 + sum_i p_i)`: with few or uninformative pairs the mean stays
    near 0, the prior user, and the variance near 1; every informative pair narrows it and moves it away. (A mean
    over pairs, as the other encoders take, is as confident after one pair as after thirty-two.)"""

    def __init__(self, embedding_dim: int, hidden_dim: int, latent_dim: int):
        super().__init__()
        # No biases on the way to the mean: a pair read the other way round says the opposite (m_i(-d) = -m_i(d)).
        self.pair_encoder = nn.Linear(embedding_dim, hidden_dim, bias=False)
        self.mean_head = nn.Linear(hidden_dim, latent_dim, bias=False)
        self.precision_head = nn.Linear(hidden_dim, latent_dim)

    def forward(
        self, chosen: torch.Tensor, rejected: torch.Tensor, mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        mask = _check_context(chosen, rejected, mask)
        pairs = self.pair_encoder(chosen - rejected)
        precision = F.softplus(self.precision_head(pairs.abs())) * mask.to(pairs.dtype).unsqueeze(-1)
        total = 1.0 + precision.sum(1)
        mean = (precision * self.mean_head(pairs)).sum(1) / total
        return mean, -torch.log(total)


def map_logistic_regression(
    offsets: torch.Tensor, design: torch.Tensor, weights: torch.Tensor, precision: float, max_iter: int = 50
) -> torch.Tensor:
    """Each user's `z` (users, dim) that maximizes the Bradley-Terry likelihood of their pairs, whose margins are
    `offsets + design @ z` (`offsets` (users, pairs), `design` (users, pairs, dim), pairs weighted by `weights`),
    plus a N(0, I / `precision`) prior: a Bayesian (MAP) logistic regression per user, with one optimum, solved by
    Newton's method from z = 0."""
    users, dim = design.shape[0], design.shape[-1]
    eye = torch.eye(dim, device=design.device)

    def loss(z: torch.Tensor) -> torch.Tensor:  # per user
        margins = offsets + (design @ z.unsqueeze(-1)).squeeze(-1)
        return -(F.logsigmoid(margins) * weights).sum(-1) + 0.5 * precision * z.pow(2).sum(-1)

    latent = torch.zeros(users, dim, device=design.device, dtype=design.dtype)
    current = loss(latent)
    for _ in range(max_iter):
        p = torch.sigmoid(offsets + (design @ latent.unsqueeze(-1)).squeeze(-1))
        gradient = -(design * ((1 - p) * weights).unsqueeze(-1)).sum(1) + precision * latent
        hessian = design.transpose(1, 2) @ (design * (p * (1 - p) * weights).unsqueeze(-1)) + precision * eye
        step = torch.linalg.solve(hessian, gradient.unsqueeze(-1)).squeeze(-1)
        # halve a user's step while it would raise their loss (Newton can overshoot far from the optimum)
        size = torch.ones(users, 1, device=design.device, dtype=design.dtype)
        for _ in range(20):
            trial = loss(latent - size * step)
            worse = trial > current + 1e-7
            if not worse.any():
                break
            size = torch.where(worse.unsqueeze(-1), size / 2, size)
        latent = latent - size * step
        current = loss(latent)
        if (size * step).abs().max() < 1e-6:
            break
    return latent


def _check_context(chosen: torch.Tensor, rejected: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """The context mask (all pairs when None), after checking the shapes."""
    if chosen.dim() != 3 or chosen.shape != rejected.shape:
        raise ValueError(
            "context embeddings must have shape (batch, K, embedding_dim) for both chosen and rejected, "
            f"got {tuple(chosen.shape)} and {tuple(rejected.shape)}."
        )
    if mask is None:
        mask = torch.ones(chosen.shape[:2], dtype=torch.bool, device=chosen.device)
    mask = mask.bool()
    if not mask.any(-1).all():
        raise ValueError("every example needs at least one context pair (context_mask has an all-zero row).")
    return mask


class BilinearRewardDecoder(nn.Module):
    """r(e, z) = <MLP(e), W z> / sqrt(hidden): the user's latent weighs features of the response, as a user's
    weights weigh a response's attributes. An MLP on `[e, z]` has to learn that product from data."""

    def __init__(self, embedding_dim: int, latent_dim: int, hidden_dim: int):
        super().__init__()
        self.response = _mlp(embedding_dim, hidden_dim, hidden_dim)
        self.user = nn.Linear(latent_dim, hidden_dim)

    def forward(self, embeddings: torch.Tensor, latent: torch.Tensor) -> torch.Tensor:
        products = self.response(embeddings) * self.user(latent)
        return products.sum(-1, keepdim=True) / math.sqrt(products.shape[-1])

    def linear_in_latent(self, embeddings: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The reward as `offset + slope @ z`: `offset` (N,), `slope` (N, latent_dim)."""
        response = self.response(embeddings) / math.sqrt(self.user.out_features)
        return response @ self.user.bias, response @ self.user.weight


class ResidualRewardDecoder(nn.Module):
    """r(e, z) = r_pooled(e) + <MLP(e), W z> / sqrt(hidden): the pooled reward every user shares, plus the user's
    deviation from it, which is exactly 0 at z = 0 (W has no bias). A user the encoder knows nothing about (the
    prior mean) gets the pooled reward, which the trainer's `context_dropout` trains as a Bradley-Terry model."""

    def __init__(self, embedding_dim: int, latent_dim: int, hidden_dim: int):
        super().__init__()
        self.pooled = _mlp(embedding_dim, hidden_dim, 1, out_bias=False)
        self.response = _mlp(embedding_dim, hidden_dim, hidden_dim)
        self.user = nn.Linear(latent_dim, hidden_dim, bias=False)

    def forward(self, embeddings: torch.Tensor, latent: torch.Tensor) -> torch.Tensor:
        return self.with_pooled(embeddings, latent)[0]

    def with_pooled(self, embeddings: torch.Tensor, latent: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The user's reward and the pooled reward it deviates from."""
        products = self.response(embeddings) * self.user(latent)
        pooled = self.pooled(embeddings)
        return pooled + products.sum(-1, keepdim=True) / math.sqrt(products.shape[-1]), pooled

    def linear_in_latent(self, embeddings: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The reward as `offset + slope @ z`: the pooled reward (N,) and the slope (N, latent_dim)."""
        response = self.response(embeddings) / math.sqrt(self.user.out_features)
        return self.pooled(embeddings)[:, 0], response @ self.user.weight


ENCODERS = {"attention": UserContextEncoder, "difference": DifferenceContextEncoder, "bayesian": BayesianContextEncoder}
LATENT_DECODERS = {"bilinear": BilinearRewardDecoder, "residual": ResidualRewardDecoder}


@dataclass
class VPLRewardOutput(ModelOutput):
    """`logits`: the scalar reward per sequence, shape (N, 1). `head`: the raw head output (N, head_outputs).
    `pooled`: the residual decoder's pooled reward (the prior user's, z = 0), (N, 1). `kl`: KL(q(z|context) ||
    N(0, I)) averaged over users. `latent_mean`, `latent_logvar`, `latent`: per user."""

    logits: torch.Tensor | None = None
    head: torch.Tensor | None = None
    pooled: torch.Tensor | None = None
    kl: torch.Tensor | None = None
    latent_mean: torch.Tensor | None = None
    latent_logvar: torch.Tensor | None = None
    latent: torch.Tensor | None = None


def latent_scale_at(scale: float | dict, num_pairs: torch.Tensor | int | None, users: int) -> torch.Tensor:
    """The factor of each of `users` latents: `scale` itself, or from a table `{K: factor}` (chosen on held-out
    users) at each user's number of context pairs, linear in log K between the table's K and constant beyond."""
    if not isinstance(scale, dict):
        return torch.full((users, 1), float(scale))
    if num_pairs is None:
        raise ValueError("a latent_scale given per number of context pairs needs the number of pairs.")
    points = sorted((math.log2(int(k)), float(v)) for k, v in scale.items())
    where = torch.log2(torch.as_tensor(num_pairs, dtype=torch.float32).cpu().clamp_min(1).reshape(-1))
    x = torch.tensor([p[0] for p in points])
    y = torch.tensor([p[1] for p in points])
    where = where.clamp(x[0], x[-1]).expand(users) if where.numel() == 1 else where.clamp(x[0], x[-1])
    if len(points) == 1:
        return y.expand(users).reshape(-1, 1).clone()
    upper = torch.searchsorted(x, where, right=True).clamp(1, len(points) - 1)
    weight = (where - x[upper - 1]) / (x[upper] - x[upper - 1])
    return (y[upper - 1] + weight * (y[upper] - y[upper - 1])).reshape(-1, 1)


def _current_key(key: str) -> str:
    """A weight's name in this version: the backbone was `backbone` (its adapter in a PEFT wrapper) before."""
    for old in ("backbone.base_model.model.", "backbone."):
        if key.startswith(old):
            return "model." + key[len(old):]
    return key


class VPLRewardModel(PreTrainedModel):
    """r(x, z): a backbone LLM's response embedding, concatenated with a user latent `z` inferred from the
    user's context pairs, through an MLP decoder. The `base`, `mean_and_variance` and `categorical` reward
    types drop the latent (baselines).

    `forward` takes either token ids (`input_ids`, `attention_mask`) or precomputed `embeddings`, and
    either context-pair embeddings (`context_chosen`, `context_rejected`, optional `context_mask`) or
    a given `latent`. Users' latents are repeated over the rows of `embeddings`, so a batch laid out as
    TRL lays it out (all chosen, then all rejected) pairs each row with its user.

    `VPLRewardModel(config)` builds the backbone from `config.backbone_config` with fresh weights;
    `from_backbone` and `from_pretrained` load pretrained ones.
    """

    config_class = VPLConfig
    base_model_prefix = "vpl"
    supports_gradient_checkpointing = True
    accepts_loss_kwargs = False  # the trainer computes the loss from the rewards

    def __init__(self, config: VPLConfig, backbone: PreTrainedModel | None = None):
        super().__init__(config)
        if config.use_latent:
            self.encoder = ENCODERS[config.encoder_type](config.embedding_dim, config.hidden_dim, config.latent_dim)
        if config.use_latent and config.decoder_type in LATENT_DECODERS:
            self.decoder = LATENT_DECODERS[config.decoder_type](config.embedding_dim, config.latent_dim,
                                                                config.hidden_dim)
        else:
            decoder_in = config.embedding_dim + (config.latent_dim if config.use_latent else 0)
            # A scalar reward trained on differences (Bradley-Terry) has no use for a bias, which would never learn.
            self.decoder = _mlp(decoder_in, config.hidden_dim, config.head_outputs, out_bias=not config.scalar_head)
        # LLM hidden states share a large common offset; the heads see them standardized per dimension with
        # statistics fitted once on the training texts (`fit_embedding_statistics`) and saved with the heads.
        self.register_buffer("embedding_mean", torch.zeros(config.embedding_dim))
        self.register_buffer("embedding_scale", torch.ones(config.embedding_dim))
        # Initialize only the heads: the backbone, attached afterwards, keeps its own weights.
        self.post_init()
        if backbone is None:
            backbone = build_backbone(config.backbone_config, config.backbone_name_or_path)
        self._attach_backbone(backbone)

    def _init_weights(self, module: nn.Module) -> None:
        # The heads keep PyTorch's default initialization.
        pass

    def _attach_backbone(self, backbone: PreTrainedModel) -> None:
        signature = backbone_signature(backbone.config)
        expected = self.config.backbone_signature
        if expected and expected != signature:
            raise ValueError(
                f"This VPL model was trained on a backbone with {expected}, but the backbone given has {signature}: "
                "load it with the backbone it was trained on."
            )
        self.config.backbone_signature = signature
        self.config.backbone_config = backbone_config_dict(backbone.config)
        resolve_embedding_layer(self.config.embedding_layer, backbone.config.num_hidden_layers)  # fail early
        # A bitsandbytes-quantized backbone: flag the whole model as TRL and Trainer test it (QLoRA handling).
        self.is_loaded_in_4bit = bool(getattr(backbone, "is_loaded_in_4bit", False))
        self.is_loaded_in_8bit = bool(getattr(backbone, "is_loaded_in_8bit", False))
        keep_4bit_layers_differentiable(backbone)
        if self.config.embedding_mode == "lora":
            backbone = inject_lora_adapter(backbone, self.config)
        elif self.config.embedding_mode == "frozen":
            backbone.requires_grad_(False)
        self.model = backbone  # named as transformers' task models name theirs

    @property
    def backbone(self) -> PreTrainedModel:
        """The backbone LLM (with its LoRA adapter layers in `lora` mode)."""
        return self.model

    @property
    def is_quantized_backbone(self) -> bool:
        return self.is_loaded_in_4bit or self.is_loaded_in_8bit

    @classmethod
    def from_backbone(
        cls,
        backbone_name_or_path: str | PreTrainedModel,
        dtype: torch.dtype | None = None,
        backbone_kwargs: dict | None = None,
        **config_kwargs,
    ) -> VPLRewardModel:
        """A new (untrained) VPL model on a pretrained backbone given by hub id, folder or model object;
        `backbone_kwargs` go to the backbone's `from_pretrained` (e.g. `quantization_config`)."""
        if isinstance(backbone_name_or_path, PreTrainedModel):
            backbone = backbone_name_or_path
            name = backbone.config.name_or_path
        else:
            name = backbone_name_or_path
            backbone = load_backbone(name, dtype=dtype or torch.float32, **(backbone_kwargs or {}))
        config = VPLConfig(backbone_name_or_path=name, embedding_dim=backbone.config.hidden_size, **config_kwargs)
        model = cls(config, backbone=backbone)
        return match_backbone_dtype(model, model.model, model.is_quantized_backbone)

    # ----- the backbone's token embeddings (e.g. for `trl.clone_chat_template`) ----------------------------

    def get_input_embeddings(self) -> nn.Module:
        return self.model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.model.set_input_embeddings(value)

    def resize_token_embeddings(self, *args, **kwargs) -> nn.Embedding:
        """Resize the backbone's vocabulary (its signature, checked on reload, follows)."""
        embeddings = self.model.resize_token_embeddings(*args, **kwargs)
        self.vocab_size = embeddings.weight.shape[0]
        self.config.backbone_signature = backbone_signature(self.model.config)
        self.config.backbone_config = backbone_config_dict(self.model.config)
        return embeddings

    # ----- embeddings -------------------------------------------------------------------------------------

    def embed(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, use_adapter: bool = True) -> torch.Tensor:
        """Pooled hidden state (`config.embedding_layer`, by default the last) of each (right-padded) sequence.
        `use_adapter=False` embeds with the backbone without its LoRA adapter, as context pairs are embedded."""
        if not use_adapter and self.config.embedding_mode == "lora":
            with adapter_disabled(self.model):
                return self.embed(input_ids, attention_mask, use_adapter=True)
        layer = resolve_embedding_layer(getattr(self.config, "embedding_layer", "last"),
                                        self.config.backbone_config.get("num_hidden_layers")
                                        if self.config.backbone_config else None)
        output = self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False,
                            output_hidden_states=layer is not None)
        hidden = output.last_hidden_state if layer is None else output.hidden_states[layer]
        if self.config.pooling == "mean":
            weights = attention_mask.to(hidden.dtype).unsqueeze(-1)
            return (hidden * weights).sum(1) / weights.sum(1).clamp_min(1.0)
        last = attention_mask.sum(-1).clamp_min(1) - 1
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]

    @torch.no_grad()
    def fit_embedding_statistics(self, embeddings: torch.Tensor) -> None:
        """Set the per-dimension standardization of embeddings from a sample of them (N, d)."""
        embeddings = embeddings.float()
        self.embedding_mean.copy_(embeddings.mean(0))
        self.embedding_scale.copy_(
            embeddings.std(0).clamp_min(1e-3) if len(embeddings) > 1 else torch.ones_like(self.embedding_scale)
        )

    def _standardize(self, embeddings: torch.Tensor) -> torch.Tensor:
        dtype = next(self.decoder.parameters()).dtype
        return ((embeddings.float() - self.embedding_mean.float()) / self.embedding_scale.float()).to(dtype)

    # ----- latent -----------------------------------------------------------------------------------------

    def encode_context(
        self, context_chosen: torch.Tensor, context_rejected: torch.Tensor, context_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Posterior mean and log-variance of each user's latent from their context-pair embeddings."""
        if not self.config.use_latent:
            raise ValueError(f"reward type {self.config.reward_type!r} has no user latent.")
        return self.encoder(self._standardize(context_chosen), self._standardize(context_rejected), context_mask)

    def sample_latent(
        self, mean: torch.Tensor, logvar: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """A reparameterized draw z = mean + eps * exp(logvar / 2), eps ~ N(0, I), one per row (not normalized)."""
        if generator is None:
            noise = torch.randn_like(mean)
        else:
            noise = torch.randn(mean.shape, generator=generator, device=generator.device).to(mean)
        return mean + noise * torch.exp(0.5 * logvar)

    def normalize_latent(self, z: torch.Tensor) -> torch.Tensor:
        """`z` as the decoder sees it: scaled to norm sqrt(latent_dim) when `config.normalize_latent`."""
        if not self.config.normalize_latent:
            return z
        return F.normalize(z, p=2, dim=-1) * math.sqrt(z.shape[-1])

    def latent_from_posterior(
        self, mean: torch.Tensor, logvar: torch.Tensor, num_pairs: torch.Tensor | int | None = None
    ) -> torch.Tensor:
        """A posterior draw in training; in evaluation the posterior mean, times `config.latent_scale` at the user's
        number of context pairs (`num_pairs`, one per user or one for all). Normalized (before the scale) when
        `config.normalize_latent`."""
        if self.training:
            return self.normalize_latent(self.sample_latent(mean, logvar))
        scale = latent_scale_at(getattr(self.config, "latent_scale", 1.0), num_pairs, mean.shape[0])
        return self.normalize_latent(mean) * scale.to(mean)

    def user_latent(
        self, context_chosen: torch.Tensor, context_rejected: torch.Tensor, context_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Each user's latent as the decoder sees it, with the posterior mean and log-variance: a posterior draw in
        training; in evaluation the posterior mean, or with `config.latent_fit_precision` above 0 the MAP fit to the
        context pairs (`fit_latent`), times `config.latent_scale` at the user's number of pairs."""
        mean, logvar = self.encode_context(context_chosen, context_rejected, context_mask)
        num_pairs = context_chosen.shape[1] if context_mask is None else context_mask.sum(-1)
        precision = getattr(self.config, "latent_fit_precision", 0.0)
        if self.training or not precision:
            return self.latent_from_posterior(mean, logvar, num_pairs), mean, logvar
        scale = latent_scale_at(getattr(self.config, "latent_scale", 1.0), num_pairs, mean.shape[0])
        fitted = self.fit_latent(context_chosen, context_rejected, context_mask).to(mean)
        return fitted * scale.to(fitted), mean, logvar

    @torch.no_grad()
    def fit_latent(
        self,
        context_chosen: torch.Tensor,
        context_rejected: torch.Tensor,
        context_mask: torch.Tensor | None = None,
        max_iter: int = 50,
    ) -> torch.Tensor:
        """The latent of each user (as the decoder sees it) that maximizes the Bradley-Terry likelihood of their
        context pairs under the decoder plus a N(0, I / `config.latent_fit_precision`) prior. The residual and
        bilinear decoders are linear in the latent, so this is a Bayesian (MAP) logistic regression per user, with
        one optimum: solved by Newton's method from the prior user, each user on their own."""
        precision = float(getattr(self.config, "latent_fit_precision", 0.0))
        if precision <= 0:
            raise ValueError(f"fit_latent needs config.latent_fit_precision > 0, got {precision}.")
        if not hasattr(self.decoder, "linear_in_latent"):
            raise ValueError(
                f"latent_fit_precision needs a decoder linear in the latent (residual or bilinear), not "
                f"decoder_type={self.config.decoder_type!r}."
            )
        mask = _check_context(context_chosen, context_rejected, context_mask)
        users, pairs, dim = context_chosen.shape
        both = self._standardize(torch.cat([context_chosen, context_rejected]).reshape(2 * users * pairs, dim))
        offset, slope = (t.float() for t in self.decoder.linear_in_latent(both))
        # each pair's margin is offsets + design @ z
        offsets = (offset[: users * pairs] - offset[users * pairs:]).view(users, pairs)
        design = (slope[: users * pairs] - slope[users * pairs:]).view(users, pairs, -1)
        return map_logistic_regression(offsets, design, mask.float(), precision, max_iter).to(context_chosen.dtype)

    def prior_latent(self, n: int = 1) -> torch.Tensor:
        """The prior mean user's latent (zeros)."""
        param = next(self.decoder.parameters())
        return torch.zeros(n, self.config.latent_dim, device=param.device, dtype=param.dtype)

    # ----- forward ----------------------------------------------------------------------------------------

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        embeddings: torch.Tensor | None = None,
        context_chosen: torch.Tensor | None = None,
        context_rejected: torch.Tensor | None = None,
        context_mask: torch.Tensor | None = None,
        latent: torch.Tensor | None = None,
        latent_dropout: torch.Tensor | None = None,
        return_dict: bool | None = None,
        use_cache: bool | None = None,
        num_items_in_batch: int | torch.Tensor | None = None,
        **kwargs,
    ) -> VPLRewardOutput:
        """Rewards (`logits`), and for `vae` models the user latents and the KL term of the loss. `latent_dropout`
        (bool, one per user) gives those users the prior mean latent (0) instead of their posterior's: the trainer's
        context dropout. `return_dict`, `use_cache` and `num_items_in_batch`, which `Trainer` and TRL pass to models,
        change nothing."""
        if kwargs:
            raise TypeError(
                f"VPLRewardModel.forward got unexpected argument(s) {sorted(kwargs)}: it takes input_ids and "
                "attention_mask or embeddings, and context_chosen, context_rejected, context_mask or latent."
            )
        if embeddings is None:
            if input_ids is None:
                raise ValueError("forward needs `input_ids` (and `attention_mask`) or precomputed `embeddings`.")
            if attention_mask is None:
                attention_mask = torch.ones_like(input_ids)
            embeddings = self.embed(input_ids, attention_mask)
        embeddings = self._standardize(embeddings)
        output = VPLRewardOutput()
        if self.config.use_latent:
            if latent is None:
                if context_chosen is None or context_rejected is None:
                    raise ValueError(
                        "a `vae` reward model needs the user's context pairs (`context_chosen`, `context_rejected`) "
                        "or a `latent`."
                    )
                latent, mean, logvar = self.user_latent(context_chosen, context_rejected, context_mask)
                output.kl, output.latent_mean, output.latent_logvar = gaussian_kl(mean, logvar), mean, logvar
            latent = latent.to(embeddings.dtype)
            if latent_dropout is not None:
                latent = latent.masked_fill(latent_dropout.to(latent.device).bool().view(-1, 1), 0.0)
            if embeddings.shape[0] % latent.shape[0]:
                raise ValueError(
                    f"{embeddings.shape[0]} sequences cannot be paired with {latent.shape[0]} user latents: "
                    "the number of sequences must be a multiple of the number of users."
                )
            output.latent = latent
            latent = latent.repeat(embeddings.shape[0] // latent.shape[0], 1)
        output.head, output.pooled = self._decode(embeddings, latent if self.config.use_latent else None)
        output.logits = head_to_reward(output.head, self.config.reward_type).unsqueeze(-1)
        return output

    def _decode(self, embeddings: torch.Tensor, latent: torch.Tensor | None
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The head's output on standardized embeddings, each row with its row of `latent` (None for models
        without a latent), and the residual decoder's pooled reward (else None)."""
        if latent is None:
            return self.decoder(embeddings), None
        if isinstance(self.decoder, ResidualRewardDecoder):
            return self.decoder.with_pooled(embeddings, latent)
        if self.config.decoder_type in LATENT_DECODERS:
            return self.decoder(embeddings, latent), None
        return self.decoder(torch.cat([embeddings, latent], dim=-1)), None

    # ----- gradient checkpointing (the backbone's; a frozen backbone runs without gradients) ----------------

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict | None = None, **kwargs) -> None:
        if self.config.embedding_mode != "frozen":
            enable_checkpointing(self.model, gradient_checkpointing_kwargs, **kwargs)

    def gradient_checkpointing_disable(self) -> None:
        if self.config.embedding_mode != "frozen":
            disable_checkpointing(self.model)

    # ----- saving and loading: config, heads, and what was trained of the backbone -----------------------

    def trainable_state_dict(self, state_dict: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """The weights a checkpoint holds: the encoder and decoder, and the backbone's LoRA adapter (`lora` mode)
        or all of the fine-tuned backbone (`full` mode); a frozen backbone's weights are left out."""
        state_dict = self.state_dict() if state_dict is None else state_dict
        full = self.config.embedding_mode == "full"
        return {
            key: value.detach().contiguous().cpu()
            for key, value in state_dict.items()
            if full or not key.startswith("model.") or "lora_" in key
        }

    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        state_dict: dict[str, torch.Tensor] | None = None,
        is_main_process: bool = True,
        **kwargs,
    ) -> None:
        if not is_main_process:
            return
        save_directory = Path(save_directory)
        save_directory.mkdir(parents=True, exist_ok=True)
        self.config.save_pretrained(save_directory)
        save_file(self.trainable_state_dict(state_dict), save_directory / WEIGHTS_NAME, metadata={"format": "pt"})

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike,
        backbone: PreTrainedModel | str | None = None,
        dtype: torch.dtype | None = None,
        **kwargs,
    ) -> VPLRewardModel:
        """Load a saved VPL model; its backbone is loaded from `config.backbone_name_or_path` unless `backbone`
        (a model or a hub id/folder) is given, and must match the backbone the model was trained on."""
        folder = local_model_folder(pretrained_model_name_or_path)
        config_file = folder / "config.json"
        if not config_file.exists():
            raise FileNotFoundError(f"{folder}: no config.json; is this a saved VPL reward model?")
        if json.loads(config_file.read_text()).get("model_type") != VPLConfig.model_type:
            raise ValueError(f"{config_file}: not a VPL reward model (model_type must be {VPLConfig.model_type!r}).")
        config = VPLConfig.from_pretrained(folder, **kwargs)
        if backbone is None or isinstance(backbone, str):
            backbone = load_backbone(backbone or config.backbone_name_or_path, dtype=dtype or torch.float32)
        vocab_size = config.backbone_signature.get("vocab_size")
        if (
            config.embedding_mode == "full"
            and vocab_size
            and backbone.get_input_embeddings().num_embeddings != vocab_size
        ):
            backbone.resize_token_embeddings(vocab_size)  # the vocabulary was resized in training (chat template)
        model = cls(config, backbone=backbone)
        model = match_backbone_dtype(model, model.model, model.is_quantized_backbone)
        model.load_trained_weights(folder / WEIGHTS_NAME)
        model.eval()
        return model

    def load_trained_weights(self, path: str | os.PathLike) -> None:
        """Load the heads and adapter saved by `save_pretrained`, with a clear error on any mismatch."""
        saved = {_current_key(key): value for key, value in load_file(str(path)).items()}
        expected = self.trainable_state_dict()
        last_bias = f"decoder.{len(self.decoder) - 1}.bias" if isinstance(self.decoder, nn.Sequential) else None
        if last_bias and last_bias not in expected:
            saved.pop(last_bias, None)  # saved before scalar heads dropped their (never trained) bias
        missing = sorted(set(expected) - set(saved))
        unexpected = sorted(set(saved) - set(expected))
        mismatched = [k for k in expected if k in saved and saved[k].shape != expected[k].shape]
        if missing or unexpected or mismatched:
            raise ValueError(
                f"{path} does not fit this model (another backbone, reward type or size?): "
                f"missing {missing[:5]}, unexpected {unexpected[:5]}, shape mismatch {mismatched[:5]}."
            )
        self.load_state_dict(saved, strict=False)
