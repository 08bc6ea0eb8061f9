"""Checkpoints: a folder (or hub repo) with a config, the trainable weights and the knowledge base.

    config.json            KAnoCLIPConfig + training metadata (format-versioned)
    model.safetensors      the trainable weights only (prompts, Bi-CMCI, Conv-Adapter)
    knowledge_base.json    the knowledge base the prompts were trained with
    README.md              a generated model card (when pushed to the hub)

Only safetensors and JSON are ever read. Pickle-based files (``.pt``, ``.pth``, ``.bin``,
``.pkl``, ``.ckpt``) are refused: unpickling can run arbitrary code. Every write is atomic.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from kanoclip.config import KAnoCLIPConfig
from kanoclip.errors import ARG, CheckpointError
from kanoclip.fileio import atomic_write_bytes, atomic_write_json, atomic_write_text
from kanoclip.hub import is_local_path, snapshot

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
KB_NAME = "knowledge_base.json"
PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".pkl", ".pickle", ".ckpt")
_HUB_FILES = ["*.json", "*.safetensors", "*.md"]
_PICKLE_WHY = "kanoclip reads only safetensors, because loading a pickle can run arbitrary code"


@dataclass
class CheckpointFiles:
    """A checkpoint read from disk: its folder, config, metadata and trainable tensors."""

    folder: Path
    config: KAnoCLIPConfig
    metadata: dict[str, Any]
    state_dict: dict[str, torch.Tensor]


def resolve_checkpoint(checkpoint: str | os.PathLike[str], *, cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """A local checkpoint folder for a folder path or a hub repo id (cache first, then downloaded).

    Args:
        checkpoint: a checkpoint folder, or a hub repo id ``owner/name``.
        cache_dir: the Hugging Face hub cache to look in (default: the hub client's).

    Returns:
        The folder. A local path that does not exist (``./x``, ``/abs/x``, ``~/x``, or
        ``owner/name`` where ``owner/`` is a folder here) is reported as "no such folder",
        never as a hub repo to download. Failures raise :class:`CheckpointError`.
    """
    path = Path(checkpoint).expanduser()
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise CheckpointError(f"checkpoint {path} is a pickle file; {_PICKLE_WHY}")
    if path.is_file():
        raise CheckpointError(
            f"checkpoint {path} is a file; pass the checkpoint folder (holding {CONFIG_NAME} and {WEIGHTS_NAME})"
        )
    if path.is_dir():
        return path
    if is_local_path(str(checkpoint)):
        raise CheckpointError(
            f"checkpoint folder {str(checkpoint)!r}: no such folder; check the path given as {ARG} "
            "(a hub id looks like 'user/name')",
            argument="checkpoint",
        )
    fix = f"check the name, or download it once with `hf download {checkpoint}` and pass the folder as {ARG}"
    return snapshot(
        str(checkpoint),
        allow_patterns=_HUB_FILES,
        error=CheckpointError,
        what="checkpoint",
        fix=fix,
        argument="checkpoint",
        cache_dir=cache_dir,
    )


def read_checkpoint(
    checkpoint: str | os.PathLike[str], *, cache_dir: str | os.PathLike[str] | None = None
) -> CheckpointFiles:
    """Read and validate a checkpoint's config and weights (never a pickle; no NaN/Inf)."""
    folder = resolve_checkpoint(checkpoint, cache_dir=cache_dir)
    config_path = folder / CONFIG_NAME
    weights_path = folder / WEIGHTS_NAME
    if not weights_path.is_file():
        pickles = sorted(p.name for p in folder.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES)
        if pickles:
            raise CheckpointError(
                f"checkpoint {folder} holds only pickle weights ({', '.join(pickles)}); {_PICKLE_WHY}"
            )
        raise CheckpointError(f"checkpoint {folder} has no {WEIGHTS_NAME}; is it a kanoclip checkpoint folder?")
    if not config_path.is_file():
        raise CheckpointError(f"checkpoint {folder} has no {CONFIG_NAME}")
    try:
        raw = json.loads(config_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{config_path}: invalid JSON ({exc})") from None
    if not isinstance(raw, dict) or "model" not in raw:
        raise CheckpointError(f"{config_path}: not a kanoclip checkpoint config (no 'model' section)")
    config = KAnoCLIPConfig.from_dict(raw["model"], source=str(config_path))
    try:
        state = load_safetensors(weights_path.read_bytes())
    except (SafetensorError, ValueError, OSError) as exc:
        raise CheckpointError(f"{weights_path}: not a valid safetensors file ({exc})") from None
    for name, tensor in state.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise CheckpointError(
                f"{weights_path}: weight {name!r} holds NaN or infinite values; the training diverged"
            )
    return CheckpointFiles(folder=folder, config=config, metadata=raw.get("metadata", {}), state_dict=state)


def write_checkpoint(
    folder: str | os.PathLike[str],
    config: KAnoCLIPConfig,
    state_dict: dict[str, torch.Tensor],
    knowledge: dict[str, Any],
    metadata: dict[str, Any] | None = None,
) -> Path:
    """Write a checkpoint folder atomically, file by file (weights first, config last)."""
    folder = Path(folder)
    tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in state_dict.items()}
    atomic_write_bytes(folder / WEIGHTS_NAME, save_safetensors(tensors))
    atomic_write_json(folder / KB_NAME, knowledge)
    atomic_write_json(folder / CONFIG_NAME, {"model": config.to_dict(), "metadata": metadata or {}})
    return folder


def model_card(config: KAnoCLIPConfig, metadata: dict[str, Any]) -> str:
    """A Hugging Face model card stating backbone, training data, epochs and metrics."""
    from huggingface_hub import ModelCard, ModelCardData

    data = ModelCardData(
        library_name="kanoclip", tags=["anomaly-detection", "zero-shot", "clip", "kanoclip"], base_model=config.backbone
    )
    metrics = metadata.get("metrics") or {}
    lines = [
        "---",
        data.to_yaml(),
        "---",
        "",
        "# KAnoCLIP checkpoint",
        "",
        "Trainable parts of a KAnoCLIP model (learned prompts, Bi-CMCI, Conv-Adapter) for the frozen "
        f"backbone `{config.backbone}`. Load it with `KAnoCLIP.from_pretrained(checkpoint=...)`.",
        "",
        f"- Backbone: `{config.backbone}`"
        + (" (randomly initialised: results are meaningless)" if metadata.get("random_backbone") else ""),
        f"- Training data: {', '.join(metadata.get('datasets', [])) or 'not recorded'}",
        f"- Epochs: {metadata.get('epochs', 'not recorded')}",
        f"- Image size: {metadata.get('image_size', 'backbone default')}",
        "",
        "## Metrics",
        "",
    ]
    if metrics:
        lines += ["| metric | value |", "|---|---|"] + [f"| {k} | {_fmt(v)} |" for k, v in metrics.items()]
    else:
        lines.append("No evaluation was recorded with this checkpoint.")
    return str(ModelCard("\n".join(lines) + "\n"))


def _fmt(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) and math.isfinite(value) else str(value)


def push_to_hub(
    folder: str | os.PathLike[str], repo_id: str, *, private: bool = False, token: str | None = None
) -> str:
    """Upload a checkpoint folder (with a generated model card) to the Hugging Face Hub."""
    from huggingface_hub import HfApi

    files = read_checkpoint(folder)
    atomic_write_text(files.folder / "README.md", model_card(files.config, files.metadata))
    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True)
    # the checkpoint's own files only: a training folder also holds state, logs and caches
    api.upload_folder(
        repo_id=repo_id, folder_path=str(files.folder), allow_patterns=[CONFIG_NAME, WEIGHTS_NAME, KB_NAME, "README.md"]
    )
    return f"https://huggingface.co/{repo_id}"
