"""The frozen CLIP backbone: transformers' ``CLIPModel`` loaded the standard way.

``backbone`` is a Hugging Face hub id (default ``openai/clip-vit-large-patch14-336``) or a
local folder in the Hugging Face layout. A hub id is resolved by :func:`kanoclip.hub.snapshot`:
the local hub cache first, the hub only after a short reachability probe, so that an offline
machine fails in seconds with one clear line instead of after minutes of retries.

:func:`make_random_backbone` writes a randomly initialised CLIP in that same layout (used by
the tests and by the benchmarks, where speed does not depend on the weights' values). Such a
folder is tagged ``kanoclip_random_init`` in its config so that everything built on it can
say that its results are meaningless.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

from kanoclip.errors import ARG, BackboneError, first_line
from kanoclip.hub import is_local_path, snapshot
from kanoclip.modeling.vv_attention import TowerEngine

RANDOM_INIT_KEY = "kanoclip_random_init"
_ALLOW_PATTERNS = ["*.json", "*.safetensors", "*.txt"]
_FIX = (
    "download it once with `hf download {b}` (or `huggingface-cli download {b}`), "
    f"or point {ARG} / KANOCLIP_BACKBONE at a local folder holding it"
)


@dataclass
class Backbone:
    """A loaded backbone: the frozen model, its tokenizer and its preprocessing constants."""

    name: str
    model: CLIPModel
    tokenizer: CLIPTokenizer
    image_size: int
    image_mean: tuple[float, float, float]
    image_std: tuple[float, float, float]
    random_init: bool
    # what runs the vision tower instead of torch (the int8 onnxruntime engine, kanoclip.onnx_vision); None: torch
    tower_engine: TowerEngine | None = None


def resolve_backbone(backbone: str, *, cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Return a local folder holding ``backbone``: itself, its hub-cache snapshot, or a download.

    Args:
        backbone: a hub id (``owner/name``) or a local Hugging Face CLIP folder.
        cache_dir: the Hugging Face hub cache to look in (default: the hub client's).

    Returns:
        The folder. Failures raise :class:`BackboneError` about the ``backbone`` argument.
    """
    local = Path(backbone).expanduser()
    if local.is_dir():
        if not (local / "config.json").is_file():
            raise BackboneError(f"backbone folder {local} has no config.json; it must be a Hugging Face CLIP folder")
        return local
    if local.exists():
        raise BackboneError(
            f"backbone {backbone!r} is a file; point {ARG} at a CLIP folder or a hub id", argument="backbone"
        )
    if is_local_path(backbone):
        raise BackboneError(
            f"backbone folder {backbone!r}: no such folder; check the path given as {ARG} "
            "(a hub id looks like 'owner/name')",
            argument="backbone",
        )
    fix = _FIX.format(b=backbone)
    return snapshot(
        backbone,
        allow_patterns=_ALLOW_PATTERNS,
        error=BackboneError,
        what="backbone",
        fix=fix,
        argument="backbone",
        cache_dir=cache_dir,
    )


def load_backbone(backbone: str, *, device: torch.device | str = "cpu", cache_dir: str | None = None) -> Backbone:
    """Load a frozen CLIP (eval mode, no gradients) with its tokenizer and image constants."""
    folder = resolve_backbone(backbone, cache_dir=cache_dir)
    try:
        model = CLIPModel.from_pretrained(folder)
        tokenizer = CLIPTokenizer.from_pretrained(folder)
        mean, std = _image_constants(folder)
    except (OSError, ValueError) as exc:  # ValueError includes malformed JSON
        raise BackboneError(f"backbone {backbone!r} at {folder} could not be loaded: {first_line(exc)}") from None
    model.requires_grad_(False)
    model.eval()
    model.to(device)
    return Backbone(
        name=backbone,
        model=model,
        tokenizer=tokenizer,
        image_size=int(model.config.vision_config.image_size),
        image_mean=mean,
        image_std=std,
        random_init=bool(getattr(model.config, RANDOM_INIT_KEY, False)),
    )


# OpenAI CLIP's normalisation constants, used when a folder has no preprocessor_config.json.
_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def _image_constants(folder: Path) -> tuple[tuple[float, float, float], tuple[float, float, float]]:
    path = folder / "preprocessor_config.json"
    if not path.is_file():
        return _CLIP_MEAN, _CLIP_STD
    data = json.loads(path.read_text())
    return tuple(data.get("image_mean", _CLIP_MEAN)), tuple(data.get("image_std", _CLIP_STD))  # type: ignore[return-value]


# Architectures for make_random_backbone: (vision width, depth, heads, mlp, patch, size),
# (text width, depth, heads, mlp), projection dim.
ARCHITECTURES: dict[str, dict] = {
    "tiny": {
        "vision": dict(
            hidden_size=64,
            num_hidden_layers=8,
            num_attention_heads=4,
            intermediate_size=128,
            patch_size=14,
            image_size=112,
        ),
        "text": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128),
        "projection_dim": 32,
    },
    "vit-l-14-336": {
        "vision": dict(
            hidden_size=1024,
            num_hidden_layers=24,
            num_attention_heads=16,
            intermediate_size=4096,
            patch_size=14,
            image_size=336,
        ),
        "text": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072),
        "projection_dim": 768,
    },
}


def make_random_backbone(
    out_dir: str | os.PathLike[str], tokenizer_dir: str | os.PathLike[str], *, architecture: str = "tiny", seed: int = 0
) -> Path:
    """Write a randomly initialised CLIP as a Hugging Face folder (model, tokenizer, preprocessor).

    ``tokenizer_dir`` holds a CLIP tokenizer in Hugging Face format (the real BPE vocabulary).
    The result is tagged random so that apps and reports built on it say it is meaningless.
    """
    arch = ARCHITECTURES[architecture]
    tokenizer = CLIPTokenizer.from_pretrained(tokenizer_dir)
    config = CLIPConfig(
        text_config=dict(
            **arch["text"],
            vocab_size=len(tokenizer),
            max_position_embeddings=77,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            hidden_act="quick_gelu",
        ),
        vision_config=dict(**arch["vision"], hidden_act="quick_gelu"),
        projection_dim=arch["projection_dim"],
    )
    setattr(config, RANDOM_INIT_KEY, True)
    torch.manual_seed(seed)
    model = CLIPModel(config)
    out = Path(out_dir)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    size = arch["vision"]["image_size"]
    preprocessor = {
        "image_processor_type": "CLIPImageProcessor",
        "do_resize": True,
        "size": {"shortest_edge": size},
        "do_center_crop": True,
        "crop_size": {"height": size, "width": size},
        "do_normalize": True,
        "image_mean": list(_CLIP_MEAN),
        "image_std": list(_CLIP_STD),
        "do_convert_rgb": True,
        "resample": 3,
    }
    (out / "preprocessor_config.json").write_text(json.dumps(preprocessor, indent=2))
    return out
