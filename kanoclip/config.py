"""Configuration: one dataclass per concern, gathered in :class:`KAnoCLIPConfig`.

Every default is the paper's value where the paper gives one (K = 12 context vectors,
α = β = γ = 1, ViT-L/14@336px); elsewhere the choice is documented on the field and
in the README's "Where the paper is ambiguous" section.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from typing import Any, Literal

from kanoclip.errors import CheckpointError

DEFAULT_BACKBONE = "openai/clip-vit-large-patch14-336"
BACKBONE_ENV = "KANOCLIP_BACKBONE"
CONFIG_VERSION = 1


def default_backbone() -> str:
    """The backbone to use when none is given: ``$KANOCLIP_BACKBONE`` or ViT-L/14@336px."""
    return os.environ.get(BACKBONE_ENV) or DEFAULT_BACKBONE


def _check_positive(name: str, value: object) -> None:
    """``ValueError`` naming the field unless ``value`` is a positive finite number."""
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a positive number, got {value!r}")


def _check_choice(name: str, value: object, choices: tuple[str, ...]) -> None:
    """``ValueError`` naming the field unless ``value`` is one of ``choices``."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(repr(c) for c in choices)}, got {value!r}")


@dataclass
class PromptConfig:
    """KnPL prompts (eq. 1): ``[X1..XK][state adjective][class]``."""

    n_ctx: int = 12  # K, the paper's learnable prefix length
    normal_adjectives: tuple[str, ...] = ("normal", "perfect", "flawless", "unblemished")
    abnormal_adjectives: tuple[str, ...] = ("abnormal", "defective", "damaged", "broken")
    ctx_init_std: float = 0.02  # CoOp's initialisation of the context vectors
    # Training-free normal prompts (no learned context yet): one per normal adjective.
    normal_template: str = "a photo of a {adjective} {class_name}."


@dataclass
class VVConfig:
    """CLIP-VV (eq. 4-8): which blocks get the V-V path, and which layers are the stages.

    ``stage_layers=None`` takes layers ``depth * i / 4`` for i = 1..4 (6/12/18/24 on ViT-L/14).
    ``num_replaced_blocks=None`` replaces every block from the first stage's layer on (19 of
    ViT-L/14's 24: layers 6..24), so each of the 4 stages is an output of the V-V path — the
    paper takes all its patch features from it — while no block is replaced whose V-V output
    no stage would read. Each replaced block costs about 0.8% of the backbone's time on ViT-L.
    """

    num_replaced_blocks: int | None = None
    stage_layers: tuple[int, ...] | None = None
    # How the position embeddings are resized for an input size other than the backbone's
    # (e.g. 518, AnomalyCLIP's training size, on a 336 backbone): "bicubic" is transformers'
    # ``interpolate_pos_encoding=True`` (the DINO recipe); "bilinear" is what CLIP Surgery
    # (clip_surgery_model.py, ``F.interpolate(..., mode='bilinear')``) and AnomalyCLIP, built on
    # it, do. The paper does not say; bicubic, the library's, is the default.
    position_interpolation: Literal["bicubic", "bilinear"] = "bicubic"

    def __post_init__(self) -> None:
        if self.num_replaced_blocks is not None and self.num_replaced_blocks < 1:
            raise ValueError(f"VVConfig.num_replaced_blocks must be at least 1 (or None), got {self.num_replaced_blocks}")
        if self.stage_layers is not None:
            self.stage_layers = tuple(self.stage_layers)
            if not self.stage_layers or list(self.stage_layers) != sorted(set(self.stage_layers)) or self.stage_layers[0] < 1:
                raise ValueError(f"VVConfig.stage_layers must be increasing layers from 1 on (or None), got {self.stage_layers}")
        _check_choice("VVConfig.position_interpolation", self.position_interpolation, ("bicubic", "bilinear"))

    def resolve(self, depth: int) -> tuple[int, tuple[int, ...]]:
        """Return (first replaced layer, stage layers), both 1-based, for a given depth."""
        stages = self.stage_layers or tuple(max(1, round(depth * i / 4)) for i in range(1, 5))
        if any(not 1 <= s <= depth for s in stages) or list(stages) != sorted(set(stages)):
            raise ValueError(f"stage_layers must be increasing layers in [1, {depth}], got {stages}")
        n_replaced = self.num_replaced_blocks
        if n_replaced is None:
            n_replaced = depth - stages[0] + 1
        if not 1 <= n_replaced <= depth:
            raise ValueError(f"num_replaced_blocks must be in [1, {depth}], got {n_replaced}")
        return depth - n_replaced + 1, tuple(stages)


@dataclass
class BiCMCIConfig:
    """Bi-CMCI (eq. 9): per-stage fusion width and attention layout."""

    dim: int = 256  # internal width; the stage features are projected to it and back
    num_heads: int = 4
    deform_stride: int = 2  # reference-point grid = patch grid / stride (DAT's downsampling)
    deform_kernel: int = 3  # depthwise kernel of the offset network
    offset_range: float = 2.0  # max offset, in reference-grid cells
    # False: each stage's maps are softmax(cos(Bi-CMCI patches, Bi-CMCI text) / τ), eq. 9 as
    # written. True: CLIP's own patch-text cosine logits (the training-free maps') are added
    # before the softmax, so Bi-CMCI learns a correction to zero-shot CLIP, a residual in the
    # spirit of CLIP-Adapter (our AdapterConfig.ratio) rather than maps from scratch. No public
    # implementation we read does this; it is read at each forward, so it can be switched on a
    # loaded model.
    residual_logits: bool = False

    def __post_init__(self) -> None:
        for name in ("dim", "num_heads", "deform_stride", "deform_kernel"):
            _check_positive(f"BiCMCIConfig.{name}", getattr(self, name))
        if self.dim % self.num_heads:
            raise ValueError(f"BiCMCIConfig.dim must be divisible by num_heads, got dim={self.dim}, num_heads={self.num_heads}")
        _check_positive("BiCMCIConfig.offset_range", self.offset_range)


@dataclass
class AdapterConfig:
    """Conv-Adapter (eq. 11) on the global visual feature."""

    bottleneck: int = 0  # d_bottle; 0 -> feature dim // 4
    # Share of the adapted feature in the output: 1.0 is eq. 11 as written; below 1 keeps
    # a residual to CLIP's own global feature (CLIP-Adapter practice), so an untrained
    # adapter starts from zero-shot CLIP instead of a random projection.
    ratio: float = 0.2

    def __post_init__(self) -> None:
        if self.bottleneck < 0:
            raise ValueError(f"AdapterConfig.bottleneck must be 0 (feature dim // 4) or positive, got {self.bottleneck}")
        if not 0.0 <= self.ratio <= 1.0:
            raise ValueError(f"AdapterConfig.ratio must be in [0, 1], got {self.ratio}")


@dataclass
class LossConfig:
    """Joint loss (eq. 13-15)."""

    alpha: float = 1.0  # L_KD
    beta: float = 1.0  # L_global (BCE)
    gamma: float = 1.0  # L_local (focal + 2 dice)
    focal_gamma: float = 2.0
    # Where L_local (eq. 15) is taken. "mean": once, on the stage mean M^n, M^a of eq. 9 (the
    # maps the model outputs), as eq. 15 is written. "per_stage": AnomalyCLIP's (train.py: a
    # focal and two dice terms on each layer's similarity map, summed over the layers), the sum
    # over the stages of eq. 15 on each stage's maps upsampled to S x S.
    local_loss: Literal["mean", "per_stage"] = "mean"

    def __post_init__(self) -> None:
        for name in ("alpha", "beta", "gamma", "focal_gamma"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ValueError(f"LossConfig.{name} must be a non-negative number, got {value!r}")
        _check_choice("LossConfig.local_loss", self.local_loss, ("mean", "per_stage"))


@dataclass
class ScoringConfig:
    """Maps and scores (eq. 10, 12)."""

    temperature: float = 0.07  # τ of the softmax over [normal, abnormal] similarities
    sigma: float = 4.0  # σ of G_σ, in pixels of the model's input resolution
    threshold: float = 0.5  # det.is_anomalous == (det.score >= threshold)


@dataclass
class KAnoCLIPConfig:
    """Everything that defines a KAnoCLIP model apart from its weights."""

    backbone: str = field(default_factory=default_backbone)
    image_size: int | None = None  # None -> the backbone's native size (336 for ViT-L/14@336)
    prompts: PromptConfig = field(default_factory=PromptConfig)
    vv: VVConfig = field(default_factory=VVConfig)
    bicmci: BiCMCIConfig = field(default_factory=BiCMCIConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    scoring: ScoringConfig = field(default_factory=ScoringConfig)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict, tagged with the config format version."""
        return {"kanoclip_config_version": CONFIG_VERSION, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, source: str = "<dict>") -> KAnoCLIPConfig:
        """Rebuild a config; unknown or missing keys are reported naming ``source``."""
        data = dict(data)
        version = data.pop("kanoclip_config_version", None)
        if version != CONFIG_VERSION:
            raise CheckpointError(
                f"{source}: config version {version!r} is not supported (expected {CONFIG_VERSION})"
            )
        sections = {f.name for f in dataclasses.fields(cls)}
        kwargs: dict[str, Any] = {}
        for key, value in data.items():
            if key not in sections:
                raise CheckpointError(f"{source}: unknown config key {key!r}")
            sub = _SECTIONS.get(key)
            if sub is None:
                kwargs[key] = value
                continue
            try:
                kwargs[key] = sub(**{k: tuple(v) if isinstance(v, list) else v for k, v in value.items()})
            except TypeError as exc:
                raise CheckpointError(f"{source}: bad {key!r} section: {exc}") from None
        return cls(**kwargs)


_SECTIONS: dict[str, type] = {
    "prompts": PromptConfig,
    "vv": VVConfig,
    "bicmci": BiCMCIConfig,
    "adapter": AdapterConfig,
    "loss": LossConfig,
    "scoring": ScoringConfig,
}
