"""The resumable training state: weights, optimizer (AdamW or Adam) state, RNG state, epoch counter, loss log.

Written at the end of every epoch into ``OUT/training_state/``, never as a pickle:

    state-epoch-0003.safetensors   trainable weights ("model.*"), Adam(W) moments and steps
                                   ("optimizer.<param>.<key>"), torch RNG states ("rng.*")
    state.json                     which file is current, the epoch counter, the run's
                                   settings (checked on resume) and the loss history

The safetensors file of epoch *e* is written first, then ``state.json`` is switched to it
(each write atomic), then older files are deleted: a process killed at any point leaves a
``state.json`` that names a complete file of a finished epoch.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from kanoclip.errors import CheckpointError
from kanoclip.fileio import atomic_write_bytes, atomic_write_json

STATE_DIR = "training_state"
STATE_JSON = "state.json"
STATE_FORMAT = 1


@dataclass
class TrainingState:
    """What a finished epoch leaves for ``--resume``."""

    epoch: int
    weights: dict[str, torch.Tensor]  # trainable_state_dict() keys
    optimizer: dict[str, dict[str, torch.Tensor]]  # param name -> Adam(W) state
    rng: dict[str, torch.Tensor]  # "cpu", and "cuda" (the training GPU's) when training on one
    info: dict[str, Any]  # run settings, history, skipped samples


def state_folder(out: Path) -> Path:
    return Path(out) / STATE_DIR


def has_state(out: Path) -> bool:
    return (state_folder(out) / STATE_JSON).is_file()


def capture_rng(device: torch.device | None = None) -> dict[str, torch.Tensor]:
    """The torch RNG states: the CPU's and, when ``device`` is a GPU, that GPU's only.

    Only the training device's generator is drawn from; asking for every GPU's state would
    create a CUDA context on each of them (memory on GPUs other processes train on).
    """
    rng = {"cpu": torch.get_rng_state()}
    if device is not None and device.type == "cuda":
        rng["cuda"] = torch.cuda.get_rng_state(device)
    return rng


def restore_rng(rng: dict[str, torch.Tensor], device: torch.device | None = None) -> None:
    """Set the states :func:`capture_rng` took (a GPU's only when training on a GPU again).

    A state written before only the training device was kept holds ``cuda.<i>`` for every GPU:
    the one of ``device``'s index is restored.
    """
    torch.set_rng_state(rng["cpu"])
    if device is None or device.type != "cuda":
        return
    index = device.index if device.index is not None else torch.cuda.current_device()
    state = rng.get("cuda", rng.get(f"cuda.{index}"))
    if state is not None:
        torch.cuda.set_rng_state(state, device)


def optimizer_tensors(optimizer: torch.optim.Optimizer, names: list[str]) -> dict[str, dict[str, torch.Tensor]]:
    """The optimizer's per-parameter state keyed by parameter name (``names`` in param order)."""
    state = optimizer.state_dict()["state"]
    return {names[i]: {k: v for k, v in entry.items() if isinstance(v, torch.Tensor)} for i, entry in state.items()}


def load_optimizer_tensors(
    optimizer: torch.optim.Optimizer, names: list[str], tensors: dict[str, dict[str, torch.Tensor]]
) -> None:
    """Put saved per-parameter state back into a freshly built optimizer over the same parameters."""
    unknown = sorted(set(tensors) - set(names))
    if unknown:
        raise CheckpointError(
            f"training state holds optimizer state for unknown parameters ({', '.join(unknown[:3])}); "
            "it belongs to another model"
        )
    current = optimizer.state_dict()
    current["state"] = {i: tensors[name] for i, name in enumerate(names) if name in tensors}
    optimizer.load_state_dict(current)


def save_state(out: Path, state: TrainingState) -> Path:
    """Write one epoch's state (weights, optimizer, RNG, then the JSON that points at them)."""
    folder = state_folder(out)
    name = f"state-epoch-{state.epoch:04d}.safetensors"
    tensors: dict[str, torch.Tensor] = {
        f"model.{k}": v.detach().to("cpu").contiguous() for k, v in state.weights.items()
    }
    for param, entry in state.optimizer.items():
        tensors.update({f"optimizer.{param}.{k}": v.detach().to("cpu").contiguous() for k, v in entry.items()})
    tensors.update({f"rng.{k}": v.contiguous() for k, v in state.rng.items()})
    atomic_write_bytes(folder / name, save_safetensors(tensors))
    atomic_write_json(folder / STATE_JSON, {"format": STATE_FORMAT, "epoch": state.epoch, "file": name, **state.info})
    for old in folder.glob("state-epoch-*.safetensors"):
        if old.name != name:
            old.unlink(missing_ok=True)
    return folder / name


def load_state(out: Path) -> TrainingState | None:
    """The last finished epoch's state, or None when ``out`` has none."""
    folder = state_folder(out)
    path = folder / STATE_JSON
    if not path.is_file():
        return None
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
        if info.get("format") != STATE_FORMAT:
            raise CheckpointError(
                f"{path}: training state format {info.get('format')!r} is not supported (expected {STATE_FORMAT})"
            )
        epoch, name = int(info.pop("epoch")), str(info.pop("file"))
        info.pop("format")
        raw = load_safetensors((folder / name).read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, ValueError, TypeError, OSError, SafetensorError) as exc:
        raise CheckpointError(
            f"{path}: training state cannot be read ({type(exc).__name__}: {exc}); start a new run without --resume"
        ) from None
    weights = {k[len("model.") :]: v for k, v in raw.items() if k.startswith("model.")}
    rng = {k[len("rng.") :]: v for k, v in raw.items() if k.startswith("rng.")}
    optimizer: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in raw.items():
        if key.startswith("optimizer."):
            param, _, field = key[len("optimizer.") :].rpartition(".")
            optimizer.setdefault(param, {})[field] = value
    return TrainingState(epoch=epoch, weights=weights, optimizer=optimizer, rng=rng, info=info)
