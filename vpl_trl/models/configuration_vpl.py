"""Configuration of the VPL reward model and its baselines."""

from __future__ import annotations

from transformers import PretrainedConfig

from .backbone import backbone_config_dict

REWARD_TYPES = ("vae", "base", "mean_and_variance", "categorical")
EMBEDDING_MODES = ("frozen", "full", "lora")
POOLINGS = ("last", "mean")
ENCODER_TYPES = ("attention", "difference")
DECODER_TYPES = ("mlp", "bilinear")


class VPLConfig(PretrainedConfig):
    r"""
    Configuration of [`VPLRewardModel`]: a backbone LLM (optionally LoRA-adapted) that embeds a response, a
    user-context encoder that maps K labelled pairs to a Gaussian posterior over a latent `z`, and a decoder
    that maps `[embedding, z]` to a reward.

    Args:
        backbone_name_or_path (`str`): hub id or folder of the backbone LLM (it is not saved with the model).
        backbone_signature (`dict`): architecture facts of the backbone (model type, sizes), checked on reload.
        backbone_config (`dict`, *optional*): the backbone's configuration (`to_dict()`), from which
            `VPLRewardModel(config)` builds it; configurations saved without it use `backbone_name_or_path`'s.
        embedding_dim (`int`): width of the backbone's hidden states.
        reward_type (`str`): `vae` (VPL), `base` (Bradley-Terry), `mean_and_variance` or `categorical` (DPL).
        latent_dim (`int`), hidden_dim (`int`): sizes of the latent and of the encoder/decoder MLPs.
        num_atoms (`int`): atoms of the categorical head, on [0, 1].
        embedding_mode (`str`): `frozen` (backbone frozen, embeddings precomputed), `full` (backbone fine-tuned)
            or `lora` (a LoRA adapter of the backbone trained).
        pooling (`str`): `last` (last non-pad token) or `mean`.
        normalize_latent (`bool`): scale `z` to norm `sqrt(latent_dim)`, as in the reference method.
        encoder_type (`str`): `attention` (the reference: a pair MLP on `[e_chosen, e_rejected]`, self-attention
            over the K pairs, a mean) or `difference` (the mean of a linear map of `e_chosen - e_rejected`).
        decoder_type (`str`): `mlp` (the reference: an MLP on `[embedding, z]`) or `bilinear` (`<MLP(e), W z>`).
        max_sequence_length (`int`, *optional*): tokens of a scored sequence in training (longer ones are
            truncated when embedded, dropped in `lora` mode); scoring truncates there too. Set by the trainer.
        lora_r, lora_alpha, lora_dropout, lora_target_modules: the backbone's LoRA adapter in `lora` mode.
        peft_config (`dict`, *optional*): a full PEFT configuration of the backbone's adapter in `lora` mode (a
            `peft.PeftConfig` or its `to_dict()`); when set, it replaces the `lora_*` fields.
    """

    model_type = "vpl_reward"

    def __init__(
        self,
        backbone_name_or_path: str | None = None,
        backbone_signature: dict | None = None,
        backbone_config: dict | PretrainedConfig | None = None,
        embedding_dim: int = 0,
        reward_type: str = "vae",
        latent_dim: int = 512,
        hidden_dim: int = 512,
        num_atoms: int = 10,
        embedding_mode: str = "frozen",
        pooling: str = "last",
        normalize_latent: bool = True,
        encoder_type: str = "attention",
        decoder_type: str = "mlp",
        max_sequence_length: int | None = 512,
        lora_r: int = 16,
        lora_alpha: int = 32,
        lora_dropout: float = 0.05,
        lora_target_modules: list[str] | str | None = "all-linear",
        peft_config: dict | None = None,
        **kwargs,
    ):
        kwargs.setdefault("num_labels", 1)  # one scalar reward per sequence, as `trl.RewardTrainer` expects
        super().__init__(**kwargs)
        for name, value, allowed in (
            ("reward_type", reward_type, REWARD_TYPES),
            ("embedding_mode", embedding_mode, EMBEDDING_MODES),
            ("pooling", pooling, POOLINGS),
            ("encoder_type", encoder_type, ENCODER_TYPES),
            ("decoder_type", decoder_type, DECODER_TYPES),
        ):
            if value not in allowed:
                raise ValueError(f"VPLConfig.{name} must be one of {allowed}, got {value!r}.")
        self.backbone_name_or_path = backbone_name_or_path
        self.backbone_signature = backbone_signature or {}
        if isinstance(backbone_config, PretrainedConfig):
            backbone_config = backbone_config_dict(backbone_config)
        self.backbone_config = backbone_config
        self.embedding_dim = embedding_dim
        self.reward_type = reward_type
        self.latent_dim = latent_dim
        self.hidden_dim = hidden_dim
        self.num_atoms = num_atoms
        self.embedding_mode = embedding_mode
        self.pooling = pooling
        self.normalize_latent = normalize_latent
        self.encoder_type = encoder_type
        self.decoder_type = decoder_type
        self.max_sequence_length = max_sequence_length
        self.lora_r = lora_r
        self.lora_alpha = lora_alpha
        self.lora_dropout = lora_dropout
        self.lora_target_modules = lora_target_modules
        self.peft_config = peft_config_to_dict(peft_config)

    @property
    def use_latent(self) -> bool:
        return self.reward_type == "vae"

    @property
    def scalar_head(self) -> bool:
        """The head outputs the reward itself, trained on reward differences."""
        return self.reward_type in ("vae", "base")

    @property
    def head_outputs(self) -> int:
        return {"vae": 1, "base": 1, "mean_and_variance": 2, "categorical": self.num_atoms}[self.reward_type]


def peft_config_to_dict(peft_config) -> dict | None:
    """A PEFT configuration as a JSON-ready dict for the backbone: the heads are always trained and saved, so the
    task type and `modules_to_save` (which name a classification head) do not apply."""
    if peft_config is None:
        return None
    config = dict(peft_config if isinstance(peft_config, dict) else peft_config.to_dict())
    config.update(task_type=None, modules_to_save=None)
    return {key: sorted(value) if isinstance(value, set) else value for key, value in config.items()}
