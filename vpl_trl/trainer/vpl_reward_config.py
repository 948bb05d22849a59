"""Configuration of `VPLRewardTrainer`."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from trl import RewardConfig

from ..distributed import configure_torch_extensions_dir
from ..models.configuration_vpl import EMBEDDING_MODES, REWARD_TYPES, VPLArchitecture


@dataclass
class VPLRewardConfig(VPLArchitecture, RewardConfig):
    r"""
    [`~trl.RewardConfig`] plus the settings of variational preference learning. The model's fields are used when the
    trainer builds the model from a backbone; a model passed in keeps its own.

    > The model (when the trainer builds it)

    model_type (`str`, defaults to `"vae"`): the reward model's type (`VPLConfig.reward_type`): `vae` (VPL),
        `base` (Bradley-Terry), `mean_and_variance`, `categorical` (distributional preference learning).
    embedding_mode (`str`, *optional*): `frozen` precomputes every embedding once and trains only the encoder and
        decoder (the fast path on CPU, chosen explicitly); `full` fine-tunes the backbone with them, and `lora`
        trains a LoRA adapter of the backbone (the trainer's `peft_config`, else `models.backbone.DEFAULT_LORA`).
        Default, as in `trl.RewardTrainer`: `lora` when the trainer is given a `peft_config`, else `full`; frozen
        or full mode with a `peft_config` is refused.
    latent_dim, hidden_dim, num_atoms, pooling, embedding_layer, encoder_type, decoder_type, normalize_latent: the
        model's shape, declared once in [`VPLArchitecture`] (and stored by `VPLConfig`).

    > Training

    kl_weight (`float`, default 1e-4): the weight of KL(q(z|context) || N(0, I)) after annealing.
    kl_schedule (`str`, default `"cyclical"`): `constant`, `linear` or `cyclical` (cyclical cosine).
    kl_anneal_steps (`int`, default 10000): the ramp length (`linear`) or the period (`cyclical`).
    kl_anneal_baseline (`float`, default 0.1): the annealed weight starts at `baseline * kl_weight`.
    num_context (`str`, default `"8"`): context pairs per example, fixed (`"8"`) or a range (`"2-8"`).
    train_context_draws (`int`, default 1): copies of each training pair, each with its own context draw: more
        contexts per user for the encoder to learn from, as the reference's duplicates.
    context_dropout (`float`, default 0.0): the share of training examples whose user gets the prior mean latent
        (0) instead of their context's: with the residual decoder, those examples train the pooled reward every user
        starts from, as a Bradley-Terry model.
    pooled_loss_weight (`float`, default 0.0): with the residual decoder, the weight of a Bradley-Terry loss on its
        pooled reward alone for every training example (not only the dropped-out ones), so that the reward of a
        user without context is a Bradley-Terry model of all the pairs, not what is left of them beside the users'
        deviations. Models without a latent ignore it, as they do `context_dropout`.
    pooled_reward (`str`, default `"joint"`): with the residual decoder, what its pooled reward (the prior user's) is
        in the trained model. `joint`: the one trained with the users' deviations (`context_dropout`,
        `pooled_loss_weight`). `bradley_terry`: after training, it is replaced by a Bradley-Terry model (`model_type
        base`) trained on the same pairs and settings with as many updates (`num_train_epochs` times
        `train_context_draws` epochs), the deviations staying as trained: a user whose latent is 0 (no context, or a
        selection scale of 0) gets exactly the reward that Bradley-Terry training gives. Else the folder or hub id of
        a trained `base` model on the same backbone and embedding, which replaces it the same way. Needs
        `embedding_mode frozen`; models without a latent ignore it.
    entropy_coeff (`float`, default 0.1): the categorical head's entropy bonus.
    embedding_batch_size (`int`, default 16): batch size of embedding precomputation.
    embedding_cache_dir (`str`, optional): where embeddings are cached (default: the vpl-trl cache).
    """

    model_type: str = field(
        default="vae", metadata={"help": "vae (VPL), base (Bradley-Terry), mean_and_variance or categorical (DPL).",
                                 "choices": list(REWARD_TYPES)}
    )
    kl_weight: float = field(default=1e-4, metadata={"help": "Weight of the KL term after annealing."})
    kl_schedule: str = field(
        default="cyclical", metadata={"help": "KL annealing: constant, linear or cyclical.",
                                      "choices": ["constant", "linear", "cyclical"]}
    )
    kl_anneal_steps: int = field(default=10000, metadata={"help": "Ramp length (linear) or period (cyclical)."})
    kl_anneal_baseline: float = field(default=0.1, metadata={"help": "Annealing starts at baseline * kl_weight."})
    num_context: str = field(default="8", metadata={"help": "Context pairs per example: '8' or a range '2-8'."})
    train_context_draws: int = field(
        default=1, metadata={"help": "Copies of each training pair, each with its own draw of context pairs (the "
                                     "reference's duplicates with resampled contexts)."}
    )
    context_dropout: float = field(
        default=0.0, metadata={"help": "Share of training examples scored as the prior mean user (z = 0), which "
                                       "trains the residual decoder's pooled reward."}
    )
    pooled_loss_weight: float = field(
        default=0.0, metadata={"help": "Residual decoder: weight of a Bradley-Terry loss on the pooled reward alone "
                                       "for every training example."}
    )
    pooled_reward: str = field(
        default="joint",
        metadata={"help": "Residual decoder's pooled reward once trained: joint (the one trained with the "
                          "deviations), bradley_terry (replaced by a Bradley-Terry model trained with as many "
                          "updates) or a trained base model's folder or hub id (replaced by it)."},
    )
    embedding_mode: str | None = field(
        default=None,
        metadata={"help": "frozen (precomputed embeddings, heads trained), full (backbone fine-tuned) or lora (a "
                          "LoRA adapter trained); default: lora with a peft_config, else full.",
                  "choices": list(EMBEDDING_MODES)},
    )
    entropy_coeff: float = field(default=0.1, metadata={"help": "Entropy bonus of the categorical head."})
    embedding_batch_size: int = field(default=16, metadata={"help": "Batch size of embedding precomputation."})
    embedding_cache_dir: str | None = field(default=None, metadata={"help": "Embedding cache folder."})

    # Defaults that differ from RewardConfig's
    learning_rate: float = field(default=3e-4, metadata={"help": "The initial learning rate for AdamW."})
    gradient_checkpointing: bool = field(
        default=False, metadata={"help": "Checkpoint the backbone's activations (lora mode)."}
    )
    bf16: bool | None = field(
        default=None, metadata={"help": "bf16 mixed precision; defaults to True only on a bf16-capable GPU."}
    )
    lr_scheduler_type: str = field(default="cosine", metadata={"help": "The scheduler type to use."})
    warmup_steps: float = field(
        default=0.03, metadata={"help": "Linear warm-up steps, or a fraction of all steps when below 1."}
    )
    max_length: int | None = field(default=512, metadata={"help": "Maximum tokens of a scored sequence."})

    def model_config_kwargs(self, peft_config=None) -> dict:
        """The `VPLConfig` fields this configuration (and the trainer's `peft_config`) set, for a new model."""
        mode = self.embedding_mode or ("lora" if peft_config is not None else "full")
        if peft_config is not None and mode != "lora":
            raise ValueError(
                f"a peft_config trains a LoRA adapter of the backbone, but embedding_mode={mode!r}: set "
                "embedding_mode='lora' (or leave it unset) to train the adapter, or pass no peft_config."
            )
        kwargs = {"reward_type": self.model_type, "embedding_mode": mode, **self.architecture()}
        return kwargs if peft_config is None else {**kwargs, "peft_config": peft_config}

    def __post_init__(self):
        if self.bf16 is None:
            self.bf16 = bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported()) and not self.fp16
        configure_torch_extensions_dir()  # before TrainingArguments' set-up, where DeepSpeed builds its ops
        super().__post_init__()
        from ..data.context import parse_num_context

        parse_num_context(self.num_context)  # fail early on a malformed value
        if self.kl_weight < 0:
            raise ValueError(f"kl_weight must be >= 0, got {self.kl_weight}.")
        if not 0.0 <= self.context_dropout < 1.0:
            raise ValueError(f"context_dropout must be in [0, 1), got {self.context_dropout}.")
        if self.pooled_loss_weight < 0:
            raise ValueError(f"pooled_loss_weight must be >= 0, got {self.pooled_loss_weight}.")
        if not str(self.pooled_reward).strip():
            raise ValueError("pooled_reward must be joint, bradley_terry or a trained base model's folder or hub id.")
        if self.train_context_draws < 1:
            raise ValueError(f"train_context_draws must be >= 1, got {self.train_context_draws}.")
