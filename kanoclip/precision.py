"""Numeric precision: the frozen backbone may run reduced, everything after it runs in fp32.

``precision`` is a public argument (``KAnoCLIP.from_pretrained(precision=...)``, ``--precision``):

* ``"auto"`` (default): bf16 on a CUDA device that supports it, else fp16 on CUDA; fp32 on CPU;
* ``"fp32"``: no autocast;
* ``"bf16"``: bf16 autocast of the backbone's vision forward, on CUDA or on the CPU (where it
  pays on CPUs with native bf16 instructions, e.g. AVX512-BF16 or AMX);
* ``"fp16"``: fp16 autocast, CUDA only.

Only the CLIP vision forward (CLIP-VV, up to and including the stage features' projection) runs
under autocast. Similarities, Bi-CMCI, the maps, the blur, the score and the losses run in fp32:
in bf16 (8 bits of mantissa) a softmax probability near 0.5 moves in steps of 0.0039, so a map
would hold only a few hundred distinct values and pixel AUROC and ``max(M)`` would rank ties.
"""

from __future__ import annotations

import contextlib
from typing import Literal

import torch

from kanoclip.config import PRECISIONS
from kanoclip.errors import InputError

Precision = Literal["auto", "fp32", "bf16", "fp16"]
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_precision(precision: str, device: torch.device) -> Literal["fp32", "bf16", "fp16"]:
    """The precision in force for ``precision`` on ``device`` (``"auto"`` resolved).

    Args:
        precision: one of :data:`PRECISIONS`.
        device: the model's device.

    Returns:
        ``"fp32"``, ``"bf16"`` or ``"fp16"``.

    Raises:
        InputError: an unknown value, or one the device cannot run.
    """
    if precision not in PRECISIONS:
        raise InputError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    cuda = device.type == "cuda"
    if precision == "auto":
        if not cuda:
            return "fp32"
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if precision == "fp16" and not cuda:
        raise InputError(f"precision 'fp16' needs a CUDA device, this model is on {device}; use 'bf16' or 'fp32'")
    if precision == "bf16" and cuda and not torch.cuda.is_bf16_supported():
        raise InputError(f"this GPU ({torch.cuda.get_device_name(device)}) has no bf16 support; use 'fp16' or 'fp32'")
    return precision  # type: ignore[return-value]


def backbone_autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """The autocast context for the backbone's forward at a resolved ``precision``."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=_DTYPES[precision])


def full_precision(device: torch.device) -> contextlib.AbstractContextManager:
    """Autocast off on ``device``'s kind: the fp32 region after the backbone, even under a caller's autocast."""
    return torch.autocast(device.type, enabled=False)
