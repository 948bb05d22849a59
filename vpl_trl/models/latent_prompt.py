"""Conditioning a policy on a user's latent `z`: a small trained module maps `z` to a few soft-prompt vectors.

The policy's prompt starts with `num_tokens` placeholder tokens (`LATENT_TOKEN`, added to the tokenizer). The
input embedding layer is wrapped by `LatentConditionedEmbedding`, which puts the soft-prompt vectors of each
row's user at that row's placeholders: sequence lengths, attention masks and generation stay exactly as TRL's
trainers and `generate` build them, and only the latents of the current batch must be set around each call:

    with conditioned_on(model, latents):  # (batch, latent_dim), or (1, latent_dim) for every row
        model.generate(**batch)

`z` is the VPL reward model's posterior mean over the user's pairs. The module trains with the LoRA adapter and
is saved beside it (`latent_prompt.safetensors`).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ..distributed import gathered_parameters

LATENT_TOKEN = "<|user_latent|>"
WEIGHTS_NAME = "latent_prompt.safetensors"
# the soft prompt starts as the embeddings of this text's first tokens (a sensible prefix before training)
INIT_TEXT = " The user's preferences follow. Please answer as this user prefers, every time."


class LatentPrompt(nn.Module):
    """`z` (latent_dim) -> `num_tokens` vectors of the policy's embedding size: an MLP whose output starts at
    `init_embeddings` and moves with `z` at a tenth of the embeddings' scale."""

    def __init__(self, latent_dim: int, hidden_size: int, num_tokens: int, init_embeddings: torch.Tensor | None = None):
        super().__init__()
        self.latent_dim, self.hidden_size, self.num_tokens = latent_dim, hidden_size, num_tokens
        mlp_dim = max(64, min(4 * latent_dim, 1024))
        self.net = nn.Sequential(
            nn.Linear(latent_dim, mlp_dim), nn.Tanh(), nn.Linear(mlp_dim, num_tokens * hidden_size)
        )
        if init_embeddings is not None:
            scale = float(init_embeddings.float().std())
            with torch.no_grad():
                self.net[2].weight.normal_(0.0, 0.1 * scale)
                self.net[2].bias.copy_(init_embeddings.reshape(-1))

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        if latents.dim() != 2 or latents.size(1) != self.latent_dim:
            raise ValueError(f"expected latents of shape (batch, {self.latent_dim}), got {tuple(latents.shape)}.")
        return self.net(latents).view(latents.size(0), self.num_tokens, self.hidden_size)


class LatentConditionedEmbedding(nn.Module):
    """The policy's input embedding, with each row's `LATENT_TOKEN` placeholders replaced by its user's soft
    prompt. Rows must hold exactly `num_tokens` placeholders, or none (then the batch is embedded as usual)."""

    def __init__(self, embedding: nn.Embedding, prompt: LatentPrompt, token_id: int):
        super().__init__()
        self.embedding, self.prompt, self.token_id = embedding, prompt, token_id
        self.latents: torch.Tensor | None = None

    @property
    def weight(self) -> torch.Tensor:  # tied output embeddings and `resize_token_embeddings` read it
        return self.embedding.weight

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        mask = input_ids == self.token_id
        # the placeholder may lie past the vocabulary: it is never looked up
        embeds = self.embedding(input_ids.masked_fill(mask, 0))
        if not bool(mask.any()):
            return embeds
        if self.latents is None:
            raise RuntimeError(
                f"the prompt holds {LATENT_TOKEN} placeholders but no user latent is set: call the model inside "
                "`vpl_trl.policy.conditioned_on(model, latents)`."
            )
        counts = mask.sum(dim=1)
        if bool((counts != self.prompt.num_tokens).any()):
            raise ValueError(
                f"each prompt must hold {self.prompt.num_tokens} {LATENT_TOKEN} placeholders; got {counts.tolist()}."
            )
        latents = self.latents.to(device=embeds.device, dtype=self.prompt.net[0].weight.dtype)
        if latents.size(0) == 1:
            latents = latents.expand(input_ids.size(0), -1)
        if latents.size(0) != input_ids.size(0):
            raise ValueError(f"{latents.size(0)} latents for a batch of {input_ids.size(0)} rows.")
        soft = self.prompt(latents).to(embeds.dtype)
        return embeds.masked_scatter(mask.unsqueeze(-1), soft)


def find_latent_embedding(model: nn.Module) -> LatentConditionedEmbedding | None:
    """The latent-conditioned input embedding inside `model` (a PEFT or DeepSpeed wrapper too), if any."""
    return next((m for m in model.modules() if isinstance(m, LatentConditionedEmbedding)), None)


@contextlib.contextmanager
def conditioned_on(model: nn.Module, latents: torch.Tensor | None) -> Iterator[None]:
    """Set the users' latents (one row per batch row, or one for all) for the calls inside; a no-op for a
    policy without latent conditioning."""
    layer = find_latent_embedding(model)
    if layer is None or latents is None:
        yield
        return
    previous, layer.latents = layer.latents, latents
    try:
        yield
    finally:
        layer.latents = previous


def add_latent_token(tokenizer: PreTrainedTokenizerBase) -> int:
    """Add the placeholder token to the tokenizer (once) and return its id."""
    if LATENT_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_tokens([LATENT_TOKEN], special_tokens=True)
    return tokenizer.convert_tokens_to_ids(LATENT_TOKEN)


def add_latent_prompt(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, latent_dim: int, num_tokens: int
) -> LatentConditionedEmbedding:
    """Wrap `model`'s input embedding with a new `LatentPrompt` (initialized from `INIT_TEXT`'s embeddings) and add
    the placeholder token to `tokenizer`. Call before wrapping the model with PEFT; the module stays trainable."""
    token_id = add_latent_token(tokenizer)
    embedding = model.get_input_embeddings()
    init_ids = tokenizer(INIT_TEXT, add_special_tokens=False)["input_ids"]
    init_ids = (init_ids * num_tokens)[:num_tokens]
    with gathered_parameters(embedding), torch.no_grad():
        init = embedding.weight[torch.tensor(init_ids, device=embedding.weight.device)].detach().float().cpu()
    prompt = LatentPrompt(latent_dim, init.size(-1), num_tokens, init).to(embedding.weight.device)
    layer = LatentConditionedEmbedding(embedding, prompt, token_id)
    model.set_input_embeddings(layer)
    return layer


def latent_prompt_trainable(model: nn.Module) -> None:
    """PEFT freezes every non-adapter weight when it wraps a model: the soft-prompt module trains with the adapter."""
    layer = find_latent_embedding(model)
    if layer is not None:
        layer.prompt.requires_grad_(True)


def save_latent_prompt(model: nn.Module, folder: str | os.PathLike, write: bool = True) -> Path | None:
    """Write the soft-prompt module's weights to `folder/latent_prompt.safetensors` (None without one). Under ZeRO-3
    every process must call it (the weights are gathered); only those with `write` write."""
    layer = find_latent_embedding(model)
    if layer is None:
        return None
    with _gathered_for_reading(layer.prompt):
        state = {k: v.detach().float().cpu().clone().contiguous() for k, v in layer.prompt.state_dict().items()}
    path = Path(folder) / WEIGHTS_NAME
    if write:
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file(state, str(path))
    return path


def _gathered_for_reading(module: nn.Module):
    """The full ZeRO-3 partitioned weights of `module` inside (engine-managed ones too: a forward would gather them,
    reading them does not); every process must enter it together."""
    partitioned = [param for param in module.parameters() if hasattr(param, "ds_id")]
    if not partitioned:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(partitioned)


def load_latent_prompt_weights(model: nn.Module, folder: str | os.PathLike) -> bool:
    """Load `folder/latent_prompt.safetensors` into `model`'s soft-prompt module; False for a policy without one.
    A latent-conditioned policy's folder must hold the weights."""
    layer = find_latent_embedding(model)
    if layer is None:
        return False
    path = Path(folder) / WEIGHTS_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no soft-prompt weights for this latent-conditioned policy.")
    state = load_file(str(path))
    with torch.no_grad():
        for name, tensor in layer.prompt.state_dict().items():
            tensor.copy_(state[name].to(tensor.dtype))
    return True


def load_latent_prompt(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    folder: str | os.PathLike,
    latent_dim: int,
    num_tokens: int,
) -> LatentConditionedEmbedding:
    """Install a soft-prompt module on `model` with the weights saved in `folder`."""
    path = Path(folder) / WEIGHTS_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no soft-prompt weights; was this policy trained with latent conditioning?")
    layer = add_latent_prompt(model, tokenizer, latent_dim, num_tokens)
    layer.prompt.load_state_dict(load_file(str(path)))
    return layer
