"""Configuration: one dataclass per concern, gathered in :class:`KAnoCLIPConfig`.

Every default is the paper's value where the paper gives one (K = 12 context vectors,
α = β = γ = 1, ViT-L/14@336px); elsewhere the choice is documented on the field and
in the README's "Where the paper is ambiguous" section.
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from kanoclip.errors import CheckpointError

DEFAULT_BACKBONE = "openai/clip-vit-large-patch14-336"
PRECISIONS = ("auto", "fp32", "bf16", "fp16", "int8")  # the backbone's precision (kanoclip.precision)
INT8_ENGINES = ("auto", "torch", "onnxruntime")  # what runs int8 (kanoclip.precision.resolve_int8_engine)
BACKBONE_ENV = "KANOCLIP_BACKBONE"
CONFIG_VERSION = 2
# Version 1 had ``prompts.normal_template`` (the old training-free normal prompt), now replaced by
# the ``training_free`` section; a version-1 config loads with that key dropped.
_OLD_KEYS = {1: {"prompts": ("normal_template",)}}


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

    def __post_init__(self) -> None:
        if self.n_ctx < 1:
            raise ValueError(f"prompts.n_ctx must be >= 1, got {self.n_ctx}")
        for name in ("normal_adjectives", "abnormal_adjectives"):
            words = tuple(getattr(self, name))
            setattr(self, name, words)
            if not words or not all(isinstance(w, str) and w.strip() for w in words):
                raise ValueError(f"prompts.{name} must be a non-empty list of words, got {words}")
        if not self.ctx_init_std > 0:
            raise ValueError(f"prompts.ctx_init_std must be > 0, got {self.ctx_init_std}")


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
    # The trained mode's image-level feature (eq. 12's global feature): "vv" is the paper's S_l[0],
    # the V-V path's CLS token after its last stage (§2.3: "S_l[0] ... for image-level detection");
    # "original" is the original path's CLS, CLIP's own image feature. A checkpoint saved before
    # this field existed was trained with "original" and loads with it (KAnoCLIPConfig.from_dict).
    image_token: Literal["vv", "original"] = "vv"

    def __post_init__(self) -> None:
        _check_choice("vv.image_token", self.image_token, ("vv", "original"))
        if self.num_replaced_blocks is not None and self.num_replaced_blocks < 1:
            raise ValueError(f"vv.num_replaced_blocks must be at least 1 (or None), got {self.num_replaced_blocks}")
        if self.stage_layers is not None:
            self.stage_layers = tuple(self.stage_layers)
            if (
                not self.stage_layers
                or list(self.stage_layers) != sorted(set(self.stage_layers))
                or self.stage_layers[0] < 1
            ):
                raise ValueError(
                    f"vv.stage_layers must be increasing layers from 1 on (or None), got {self.stage_layers}"
                )
        _check_choice("vv.position_interpolation", self.position_interpolation, ("bicubic", "bilinear"))

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
            _check_positive(f"bicmci.{name}", getattr(self, name))
        if self.dim % self.num_heads:
            raise ValueError(
                f"bicmci.dim must be divisible by num_heads, got dim={self.dim}, num_heads={self.num_heads}"
            )
        _check_positive("bicmci.offset_range", self.offset_range)


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
            raise ValueError(f"adapter.bottleneck must be 0 (feature dim // 4) or positive, got {self.bottleneck}")
        if not 0.0 <= self.ratio <= 1.0:
            raise ValueError(f"adapter.ratio must be in [0, 1], got {self.ratio}")


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
                raise ValueError(f"loss.{name} must be a non-negative number, got {value!r}")
        _check_choice("loss.local_loss", self.local_loss, ("mean", "per_stage"))


@dataclass
class ScoringConfig:
    """Maps and scores (eq. 10, 12)."""

    temperature: float = 0.07  # τ of the softmax over [normal, abnormal] similarities
    sigma: float = 4.0  # σ of G_σ, in pixels of the model's input resolution
    threshold: float = 0.5  # det.is_anomalous == (det.score >= threshold)

    def __post_init__(self) -> None:
        if not self.temperature > 0:
            raise ValueError(f"scoring.temperature must be > 0, got {self.temperature}")
        if not self.sigma >= 0:
            raise ValueError(f"scoring.sigma must be >= 0 (0: no smoothing), got {self.sigma}")
        if not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"scoring.threshold must be in [0, 1] (scores are), got {self.threshold}")


@dataclass
class CacheConfig:
    """Bounds of the model's per-class caches (a public app may be sent any number of class names)."""

    max_classes: int = 256  # classes whose text features (and description features) are kept, LRU

    def __post_init__(self) -> None:
        if self.max_classes < 1:
            raise ValueError(f"cache.max_classes must be >= 1, got {self.max_classes}")


@dataclass
class ReferenceConfig:
    """k-shot normal references (:mod:`kanoclip.references`; not in the paper)."""

    weight: float = 0.5  # λ, the reference map's share of the fused map and score (WinCLIP+'s mean)
    margin: float = 0.02  # added to the largest normal score for a threshold from normal images only
    max_per_class: int = 64  # 64 x 576 patches x 4 stages x 768 x 2 bytes = 226 MB at ViT-L/14@336
    chunk: int = 8192  # reference patches compared at a time in the nearest-neighbour search

    def __post_init__(self) -> None:
        if not 0.0 <= self.weight <= 1.0:
            raise ValueError(f"references.weight must be in [0, 1], got {self.weight}")
        if not 0.0 <= self.margin < 1.0:
            raise ValueError(f"references.margin must be in [0, 1), got {self.margin}")
        if self.max_per_class < 1 or self.chunk < 1:
            raise ValueError(
                f"references.max_per_class and references.chunk must be >= 1, got {self.max_per_class}, {self.chunk}"
            )


# The training-free state ensemble, written for kanoclip after WinCLIP's compositional prompt
# ensemble (state words x templates; Jeong et al., CVPR 2023, §3.2): both states share every
# template, so the difference between the two directions is the state alone.
NORMAL_STATES = (
    "{}",
    "normal {}",
    "flawless {}",
    "intact {}",
    "pristine {}",
    "{} without defects",
    "{} in perfect condition",
)
ABNORMAL_STATES = (
    "abnormal {}",
    "defective {}",
    "damaged {}",
    "broken {}",
    "{} with a defect",
    "{} with damage",
    "{} with a flaw",
)
STATE_TEMPLATES = (
    "a photo of a {}.",
    "a close-up photo of the {}.",
    "a cropped photo of a {}.",
    "a bright photo of the {}.",
    "a dark photo of a {}.",
    "a blurry photo of the {}.",
    "a low-resolution photo of a {}.",
    "an inspection photo of a {}.",
    "a photo of the {} on a production line.",
    "a photo of a {} for quality control.",
)


@dataclass
class TrainingFreeConfig:
    """The training-free mode (no checkpoint; not in the paper, which always trains).

    Defaults follow the published training-free methods, not the trained paper model:

    * ``num_replaced_blocks = 6``: CLIP Surgery (Li et al., arXiv:2304.05653; its released
      ``clip_surgery_model.py`` applies the V-V surgery to the last 6 blocks) reads its
      training-free maps off the V-V path's last layer.
    * ``stage_weights = (0, 0, 0, 1)``: only the last stage. Without training, nothing aligns a
      shallow layer's tokens with text once they pass the final layer norm and projection:
      WinCLIP (CVPR 2023) uses the final layer only, and the methods that read layers 6/12/18
      (APRIL-GAN, AnomalyCLIP) first train a projection or prompts for them.
    * a symmetric ensemble, ``templates`` x ``normal_states`` / ``abnormal_states``: WinCLIP's
      compositional ensemble gives 91.8 image / 85.1 pixel AUROC zero-shot on MVTec-AD against
      71.5 / 38.2 for CLIP-AC's two fixed prompts (KAnoCLIP paper, Table 1).
    * ``use_descriptions = True``: the knowledge base's descriptions of the class (the paper's
      knowledge, §2.2.1) join the abnormal ensemble as further members, one vote each.

    Every field can be changed for an ablation (``kanoclip eval --set`` / ``--sweep``).
    """

    stage_weights: tuple[float, ...] = (0.0, 0.0, 0.0, 1.0)  # one per stage, >= 0, normalised to sum 1
    num_replaced_blocks: int = 6  # V-V blocks in this mode (the trained mode uses ``vv``)
    templates: tuple[str, ...] = STATE_TEMPLATES  # each with one ``{}`` for the state phrase
    normal_states: tuple[str, ...] = NORMAL_STATES  # each with one ``{}`` for the class name
    abnormal_states: tuple[str, ...] = ABNORMAL_STATES
    use_descriptions: bool = True  # knowledge-base descriptions join the abnormal ensemble
    # The image-level feature without training: the original path's CLS, which CLIP Surgery keeps for
    # classification as the one aligned with the text ("vv": the V-V path's CLS, as vv.image_token)
    image_token: Literal["vv", "original"] = "original"

    def __post_init__(self) -> None:
        self.stage_weights = tuple(float(w) for w in self.stage_weights)
        if (
            not self.stage_weights
            or any(not math.isfinite(w) or w < 0 for w in self.stage_weights)
            or sum(self.stage_weights) <= 0
        ):
            raise ValueError(
                "training_free.stage_weights must be non-negative numbers with a positive sum, "
                f"got {self.stage_weights}"
            )
        if self.num_replaced_blocks < 1:
            raise ValueError(f"training_free.num_replaced_blocks must be >= 1, got {self.num_replaced_blocks}")
        _check_choice("training_free.image_token", self.image_token, ("vv", "original"))
        for name in ("templates", "normal_states", "abnormal_states"):
            values = tuple(getattr(self, name))
            setattr(self, name, values)
            bad = [v for v in values if not isinstance(v, str) or v.count("{}") != 1]
            if not values or bad:
                raise ValueError(
                    f"training_free.{name} must be a non-empty list of texts with one '{{}}' each, got {bad or values}"
                )


@dataclass
class KAnoCLIPConfig:
    """Everything that defines a KAnoCLIP model apart from its weights."""

    backbone: str = DEFAULT_BACKBONE  # KAnoCLIP.from_pretrained reads $KANOCLIP_BACKBONE, once, before this
    image_size: int | None = None  # None -> the backbone's native size (336 for ViT-L/14@336)
    prompts: PromptConfig = field(default_factory=PromptConfig)
    vv: VVConfig = field(default_factory=VVConfig)
    bicmci: BiCMCIConfig = field(default_factory=BiCMCIConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    scoring: ScoringConfig = field(default_factory=ScoringConfig)
    training_free: TrainingFreeConfig = field(default_factory=TrainingFreeConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    references: ReferenceConfig = field(default_factory=ReferenceConfig)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict, tagged with the config format version."""
        return {"kanoclip_config_version": CONFIG_VERSION, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, source: str = "<dict>") -> KAnoCLIPConfig:
        """Rebuild a config; unknown keys and invalid values are reported naming ``source``.

        Missing keys take their defaults, so a checkpoint written before a field existed loads.
        """
        data = dict(data)
        version = data.pop("kanoclip_config_version", None)
        if version not in (*_OLD_KEYS, CONFIG_VERSION):
            raise CheckpointError(f"{source}: config version {version!r} is not supported (expected {CONFIG_VERSION})")
        sections = {f.name for f in dataclasses.fields(cls)}
        kwargs: dict[str, Any] = {}
        for key, value in data.items():
            if key not in sections:
                raise CheckpointError(f"{source}: unknown config key {key!r}")
            sub = _SECTIONS.get(key)
            if sub is None:
                kwargs[key] = value
                continue
            dropped = _OLD_KEYS.get(version, {}).get(key, ())
            fields = {k: tuple(v) if isinstance(v, list) else v for k, v in value.items() if k not in dropped}
            if key == "vv" and "image_token" not in fields:  # saved before the field: trained with CLIP's own CLS
                fields["image_token"] = "original"
            try:
                kwargs[key] = sub(**fields)
            except (TypeError, ValueError) as exc:
                raise CheckpointError(f"{source}: bad {key!r} section: {exc}") from None
        return cls(**kwargs)


def parse_assignment(text: str) -> tuple[str, str]:
    """``"training_free.stage_weights=0,0,0,1"`` -> ``("training_free.stage_weights", "0,0,0,1")``."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise ValueError(
            f"expected KEY=VALUE with a dotted KEY such as training_free.stage_weights=0,0,0,1, got {text!r}"
        )
    return key.strip(), value.strip()


def flatten_overrides(data: Any, *, where: str = "the overrides") -> dict[str, Any]:
    """Nested sections and dotted keys alike as dotted keys, for :func:`with_overrides`.

    ``{"training_free": {"stage_weights": [0, 0, 0, 1]}, "scoring.sigma": 2}`` ->
    ``{"training_free.stage_weights": [0, 0, 0, 1], "scoring.sigma": 2}``. A whole config as a
    checkpoint's ``config.json`` holds it is accepted too (its version tag is dropped).

    Raises:
        ValueError: ``data`` is not a JSON object (``where`` names it).
    """
    if not isinstance(data, Mapping):
        raise ValueError(f"{where} must be a JSON object of config keys, got {type(data).__name__}")
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if key == "kanoclip_config_version":
            continue
        if key in _SECTIONS and isinstance(value, Mapping):
            flat.update({f"{key}.{name}": v for name, v in value.items()})
        else:
            flat[key] = value
    return flat


def with_overrides(config: KAnoCLIPConfig, overrides: Mapping[str, Any]) -> KAnoCLIPConfig:
    """A copy of ``config`` with dotted-path overrides applied and validated.

    Keys are ``section.field`` (``scoring.sigma``) or a top-level field (``image_size``).
    Values are typed (from JSON or Python) or text (from a command line): text is read as JSON
    when it parses (``4``, ``true``, ``[0, 1]``, ``"x"``), a comma-separated list for tuple
    fields (``0,0,0,1``), else as the text itself. Each value is checked against the field's
    type and then by the section's own validation.

    Raises:
        ValueError: one line naming the key and what is wrong with it.
    """
    nested: dict[str | None, dict[str, Any]] = {}
    for key, value in overrides.items():
        section, _, name = key.rpartition(".")
        owner = _SECTIONS.get(section) if section else KAnoCLIPConfig
        if owner is None or "." in section:
            raise ValueError(f"unknown config section in {key!r}; sections: {', '.join(_SECTIONS)}")
        hints = typing.get_type_hints(owner)
        if name not in hints or name in _SECTIONS:
            known = ", ".join(n for n in hints if n not in _SECTIONS)
            raise ValueError(f"unknown config key {key!r}; {section or 'top-level'} keys: {known}")
        nested.setdefault(section or None, {})[name] = _coerce(value, hints[name], key)
    top = nested.pop(None, {})
    try:
        sections = {name: dataclasses.replace(getattr(config, name), **fields) for name, fields in nested.items()}
    except (TypeError, ValueError) as exc:
        raise ValueError(str(exc)) from None
    return dataclasses.replace(config, **top, **sections)


def _coerce(value: Any, hint: Any, key: str) -> Any:
    """``value`` converted to the type ``hint`` of the field ``key`` (see :func:`with_overrides`)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if isinstance(value, str) and hint is not str:
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            if origin is tuple:
                value = [_coerce(part.strip(), args[0], key) for part in value.split(",")]
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            value = [value]
        return tuple(_coerce(v, args[0], key) for v in value)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        return _coerce(value, next(a for a in args if a is not type(None)), key)
    if origin is typing.Literal:
        if value not in args:
            raise ValueError(f"{key} must be one of {', '.join(map(repr, args))}, got {value!r}")
        return value
    ok = {
        bool: isinstance(value, bool),
        int: isinstance(value, int) and not isinstance(value, bool),
        float: isinstance(value, (int, float)) and not isinstance(value, bool),
        str: isinstance(value, str),
    }.get(hint, True)
    if not ok:
        raise ValueError(f"{key} must be {getattr(hint, '__name__', hint)}, got {value!r}")
    return float(value) if hint is float else value


_SECTIONS: dict[str, type] = {
    "prompts": PromptConfig,
    "vv": VVConfig,
    "bicmci": BiCMCIConfig,
    "adapter": AdapterConfig,
    "loss": LossConfig,
    "scoring": ScoringConfig,
    "training_free": TrainingFreeConfig,
    "cache": CacheConfig,
    "references": ReferenceConfig,
}
