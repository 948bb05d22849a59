"""Configuration of the VPL reward model and its baselines."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

from transformers import PretrainedConfig

from .backbone import DEFAULT_LORA, backbone_config_dict

REWARD_TYPES = ("vae", "base", "mean_and_variance", "categorical")
EMBEDDING_MODES = ("frozen", "full", "lora")
POOLINGS = ("last", "mean")
ENCODER_TYPES = ("attention", "difference", "bayesian")
DECODER_TYPES = ("mlp", "bilinear", "residual")
# LoRA settings of configurations saved before `peft_config` held the adapter's configuration
LEGACY_LORA_FIELDS = {"lora_r": "r", "lora_alpha": "lora_alpha", "lora_dropout": "lora_dropout",
                      "lora_target_modules": "target_modules"}


@dataclass
class VPLArchitecture:
    """The shape of a VPL reward model's heads and embeddings, declared once: [`VPLConfig`] stores these fields, and
    [`VPLRewardConfig`] takes them as flags for the model it builds. (The reward type and the embedding mode are
    declared beside each: the trainer's `model_type` flag is the reward type, a name `PretrainedConfig` reserves,
    and its embedding mode defaults by the trainer's `peft_config`.)"""

    latent_dim: int = field(default=512, metadata={"help": "Size of the user latent z."})
    hidden_dim: int = field(default=512, metadata={"help": "Width of the encoder and decoder MLPs."})
    num_atoms: int = field(default=10, metadata={"help": "Atoms of the categorical head."})
    pooling: str = field(default="last", metadata={"help": "last (non-pad token) or mean.", "choices": list(POOLINGS)})
    embedding_layer: str = field(
        default="last",
        metadata={"help": "The backbone's hidden state that is pooled: last (the default), middle, or a number (0: "
                          "the token embeddings). A frozen SmolLM2's middle layer carries more of a text's surface "
                          "(length, structure, wording) but less of what Pets' users agree on "
                          "(benchmarks/results/embedding_layers.md)."},
    )
    encoder_type: str = field(
        default="attention",
        metadata={"help": "Context encoder: attention (the reference), difference (mean of a linear map of "
                          "e_chosen - e_rejected) or bayesian (each pair's Gaussian evidence multiplied into the "
                          "N(0, I) prior: the posterior narrows and moves away from 0 as pairs accumulate).",
                  "choices": list(ENCODER_TYPES)},
    )
    decoder_type: str = field(
        default="mlp",
        metadata={"help": "Reward decoder: mlp on [e, z] (the reference), bilinear <MLP(e), Wz>, or residual "
                          "r_pooled(e) + <MLP(e), Wz> (z = 0 gives the pooled, Bradley-Terry reward).",
                  "choices": list(DECODER_TYPES)},
    )
    normalize_latent: bool | None = field(
        default=None,
        metadata={"help": "Scale z to norm sqrt(latent_dim), as in the reference method. Default: on, except with "
                          "the residual decoder (whose latent 0, the prior user, then stays the pooled user)."},
    )

    def architecture(self) -> dict:
        """These fields' values, with the defaults that depend on others resolved (`normalize_latent`)."""
        values = {f.name: getattr(self, f.name) for f in fields(VPLArchitecture)}
        if values["normalize_latent"] is None:
            values["normalize_latent"] = values["decoder_type"] != "residual"
        return values


def check_choice(owner: str, name: str, value, allowed) -> None:
    if value not in allowed:
        raise ValueError(f"{owner}.{name} must be one of {tuple(allowed)}, got {value!r}.")


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
        embedding_mode (`str`): `frozen` (backbone frozen, embeddings precomputed), `full` (backbone fine-tuned)
            or `lora` (a LoRA adapter of the backbone trained).
        max_sequence_length (`int`, *optional*): tokens of a scored sequence in training (longer ones are
            truncated when embedded, dropped in `lora` mode); scoring truncates there too. Set by the trainer.
        peft_config (`dict`, *optional*): the PEFT configuration of the backbone's adapter in `lora` mode (a
            `peft.PeftConfig` or its `to_dict()`; default: `models.backbone.DEFAULT_LORA`). Configurations saved
            with `lora_r`, `lora_alpha`, `lora_dropout` and `lora_target_modules` load into it.
        latent_dim, hidden_dim, num_atoms, pooling, embedding_layer, encoder_type, decoder_type, normalize_latent: the
            model's shape, as [`VPLArchitecture`] declares and documents them.
        latent_scale (`float` or `dict`, default 1.0): at inference, a user's latent is their posterior mean times
            this factor: 0 serves the pooled reward (residual decoder), 1 the posterior mean. A dict `{K: factor}`
            gives it per number of context pairs (linear in log K between, constant beyond): `vpl_trl.selection`
            chooses it on held-out users, so that a user's few pairs move the reward only as far as they paid.
        latent_fit_precision (`float`, default 0.0): above 0 (residual and bilinear decoders), a user's latent at
            inference is not the encoder's mean but the latent (as the decoder sees it) that best explains their
            context pairs under the decoder, with a Gaussian prior of this precision around 0, the prior user (a MAP
            fit, `VPLRewardModel.fit_latent`), then times `latent_scale`. The prior keeps a user with few or
            uninformative pairs near the pooled reward; the fit recovers what the one-pass encoder misses
            (`vpl_trl.selection` chooses it on held-out users).
    """

    model_type = "vpl_reward"

    def __init__(
        self,
        backbone_name_or_path: str | None = None,
        backbone_signature: dict | None = None,
        backbone_config: dict | PretrainedConfig | None = None,
        embedding_dim: int = 0,
        reward_type: str = "vae",
        embedding_mode: str = "frozen",
        max_sequence_length: int | None = 512,
        peft_config: dict | None = None,
        latent_scale: float | dict = 1.0,
        latent_fit_precision: float = 0.0,
        **kwargs,
    ):
        given = VPLArchitecture(**{f.name: kwargs.pop(f.name) for f in fields(VPLArchitecture) if f.name in kwargs})
        architecture = VPLArchitecture(**given.architecture())  # with the defaults that depend on others resolved
        legacy_lora = {LEGACY_LORA_FIELDS[name]: kwargs.pop(name) for name in list(LEGACY_LORA_FIELDS)
                       if name in kwargs}
        kwargs.setdefault("num_labels", 1)  # one scalar reward per sequence, as `trl.RewardTrainer` expects
        super().__init__(**kwargs)
        for name, value, allowed in (
            ("reward_type", reward_type, REWARD_TYPES),
            ("embedding_mode", embedding_mode, EMBEDDING_MODES),
            ("pooling", architecture.pooling, POOLINGS),
            ("encoder_type", architecture.encoder_type, ENCODER_TYPES),
            ("decoder_type", architecture.decoder_type, DECODER_TYPES),
        ):
            check_choice("VPLConfig", name, value, allowed)
        self.backbone_name_or_path = backbone_name_or_path
        self.backbone_signature = backbone_signature or {}
        if isinstance(backbone_config, PretrainedConfig):
            backbone_config = backbone_config_dict(backbone_config)
        self.backbone_config = backbone_config
        self.embedding_dim = embedding_dim
        self.reward_type = reward_type
        self.embedding_mode = embedding_mode
        resolve_embedding_layer(architecture.embedding_layer, None)  # fail early on a malformed value
        check_latent_scale(latent_scale)
        for name, value in asdict(architecture).items():
            setattr(self, name, value)
        self.latent_scale = {str(k): float(v) for k, v in latent_scale.items()} if isinstance(latent_scale, dict) \
            else float(latent_scale)
        if not latent_fit_precision >= 0:
            raise ValueError(f"latent_fit_precision must be >= 0 (0: the encoder's mean), got {latent_fit_precision}.")
        self.latent_fit_precision = float(latent_fit_precision)
        self.max_sequence_length = max_sequence_length
        if peft_config is None and legacy_lora:
            peft_config = {**DEFAULT_LORA, **legacy_lora}
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


def check_latent_scale(scale) -> None:
    """A factor >= 0, or a non-empty table of them by a number of context pairs >= 1."""
    table = scale if isinstance(scale, dict) else {"1": scale}
    try:
        valid = bool(table) and all(int(k) >= 1 and float(v) >= 0 for k, v in table.items())
    except (TypeError, ValueError):
        valid = False
    if not valid:
        raise ValueError(f"latent_scale must be a factor >= 0 or a mapping {{K >= 1: factor >= 0}}, got {scale!r}.")


def resolve_embedding_layer(spec: str | int, num_hidden_layers: int | None) -> int | None:
    """The index into a backbone's `hidden_states` (0: token embeddings, `num_hidden_layers`: the output) that
    `embedding_layer` names; None for the last (the output, read without the other layers)."""
    text = str(spec).strip().lower()
    if text == "last":
        return None
    if text == "middle":
        return None if num_hidden_layers is None else num_hidden_layers // 2
    try:
        layer = int(text)
    except ValueError:
        raise ValueError(f"embedding_layer must be last, middle or a layer number, got {spec!r}.") from None
    if num_hidden_layers is None:
        return layer
    if not -num_hidden_layers - 1 <= layer <= num_hidden_layers:
        raise ValueError(f"embedding_layer {layer} is outside the backbone's 0..{num_hidden_layers} hidden states.")
    layer = layer % (num_hidden_layers + 1)
    return None if layer == num_hidden_layers else layer


def peft_config_to_dict(peft_config) -> dict | None:
    """A PEFT configuration as a JSON-ready dict for the backbone: the heads are always trained and saved, so the
    task type and `modules_to_save` (which name a classification head) do not apply."""
    if peft_config is None:
        return None
    config = dict(peft_config if isinstance(peft_config, dict) else peft_config.to_dict())
    config.update(task_type=None, modules_to_save=None)
    return {key: sorted(value) if isinstance(value, set) else value for key, value in config.items()}
