"""Configuration: one dataclass per concern, gathered in :class:`KAnoCLIPConfig`.

Every default is the paper's value where the paper gives one (K = 12 context vectors,
α = β = γ = 1, ViT-L/14@336px); elsewhere the choice is documented on the field and
in the README's "Where the paper is ambiguous" section.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any

from kanoclip.errors import CheckpointError

DEFAULT_BACKBONE = "openai/clip-vit-large-patch14-336"
BACKBONE_ENV = "KANOCLIP_BACKBONE"
CONFIG_VERSION = 1


def default_backbone() -> str:
    """The backbone to use when none is given: ``$KANOCLIP_BACKBONE`` or ViT-L/14@336px."""
    return os.environ.get(BACKBONE_ENV) or DEFAULT_BACKBONE


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


@dataclass
class AdapterConfig:
    """Conv-Adapter (eq. 11) on the global visual feature."""

    bottleneck: int = 0  # d_bottle; 0 -> feature dim // 4
    # Share of the adapted feature in the output: 1.0 is eq. 11 as written; below 1 keeps
    # a residual to CLIP's own global feature (CLIP-Adapter practice), so an untrained
    # adapter starts from zero-shot CLIP instead of a random projection.
    ratio: float = 0.2


@dataclass
class LossConfig:
    """Joint loss (eq. 13-15)."""

    alpha: float = 1.0  # L_KD
    beta: float = 1.0  # L_global (BCE)
    gamma: float = 1.0  # L_local (focal + 2 dice)
    focal_gamma: float = 2.0


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
