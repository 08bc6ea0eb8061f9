"""Numeric precision: the frozen backbone may run reduced, everything after it runs in fp32.

``precision`` is a public argument (``KAnoCLIP.from_pretrained(precision=...)``, ``--precision``):

* ``"auto"`` (default): bf16 on a CUDA device that supports it, else fp16 on CUDA; fp32 on CPU;
* ``"fp32"``: no autocast;
* ``"bf16"``: bf16 autocast of the backbone's vision forward, on CUDA or on the CPU (where it
  pays on CPUs with native bf16 instructions, e.g. AVX512-BF16 or AMX);
* ``"fp16"``: fp16 autocast, CUDA only;
* ``"int8"``: CPU only: the vision tower's linear layers (every block's q/k/v/out projections and
  MLP) quantised dynamically, int8 weights per output channel and int8 activations per token,
  scaled at run time, with no calibration (:func:`int8_vision_copy`). For a CPU with no GPU (a
  free Space, a factory PC): the matrix products run on int8 instructions (VNNI/AMX where the CPU
  has them). The patch embedding (a convolution), the layer norms, the attention's softmax and
  the visual projection stay fp32, as does the text tower: it runs once per class, its features
  are cached, and the prompts are learned through it, so quantising it would buy little speed
  and change what training sees.

Only the CLIP vision forward (CLIP-VV, up to and including the stage features' projection) runs
under autocast or int8. Similarities, Bi-CMCI, the maps, the blur, the score and the losses run in fp32:
in bf16 (8 bits of mantissa) a softmax probability near 0.5 moves in steps of 0.0039, so a map
would hold only a few hundred distinct values and pixel AUROC and ``max(M)`` would rank ties.
"""

from __future__ import annotations

import contextlib
import copy
from typing import TYPE_CHECKING, Literal

import torch

from kanoclip.config import PRECISIONS
from kanoclip.errors import InputError

if TYPE_CHECKING:
    from transformers import CLIPModel

Precision = Literal["auto", "fp32", "bf16", "fp16", "int8"]
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_precision(precision: str, device: torch.device) -> Literal["fp32", "bf16", "fp16", "int8"]:
    """The precision in force for ``precision`` on ``device`` (``"auto"`` resolved).

    Args:
        precision: one of :data:`PRECISIONS`.
        device: the model's device.

    Returns:
        ``"fp32"``, ``"bf16"``, ``"fp16"`` or ``"int8"``.

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
    if precision == "int8" and device.type != "cpu":
        raise InputError(f"precision 'int8' runs on the CPU only, this model is on {device}; use 'bf16' or 'fp16'")
    if precision == "bf16" and cuda and not torch.cuda.is_bf16_supported():
        raise InputError(f"this GPU ({torch.cuda.get_device_name(device)}) has no bf16 support; use 'fp16' or 'fp32'")
    return precision  # type: ignore[return-value]


def backbone_autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """The autocast context for the backbone's forward at a resolved ``precision`` (none for int8: it is quantised)."""
    if precision in ("fp32", "int8"):
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=_DTYPES[precision])


def full_precision(device: torch.device) -> contextlib.AbstractContextManager:
    """Autocast off on ``device``'s kind: the fp32 region after the backbone, even under a caller's autocast."""
    return torch.autocast(device.type, enabled=False)


def int8_vision_copy(clip: CLIPModel) -> CLIPModel:
    """A copy of ``clip`` whose vision tower's linear layers are dynamically quantised to int8.

    The copy shares everything but the vision tower with ``clip`` (the text tower, the
    projections), and ``clip`` itself is left as it was, so models that share the fp32 backbone
    never run a quantised one.

    Quantisation is torchao's ``quantize_`` with ``Int8DynamicActivationInt8WeightConfig``:
    PyTorch 2.13's quantization docs and ``torch.ao.quantization``'s deprecation warning say that
    eager-mode ``torch.ao.quantization.quantize_dynamic`` is to be deleted and that its users
    should migrate to torchao's ``quantize_``, where PyTorch maintains quantisation now.

    Args:
        clip: the fp32 backbone, on the CPU.

    Returns:
        The quantised copy (eval mode, no gradients, like the backbone).

    Raises:
        InputError: torchao is not installed.
    """
    try:  # imported here: only int8 needs it, and an install without it runs every other precision
        from torchao.quantization import (
            Int8DynamicActivationInt8WeightConfig,
            quantize_,
        )
    except ImportError:
        raise InputError("precision 'int8' needs the torchao package; install it with `pip install torchao`") from None

    shared = {id(module): module for name, module in clip.named_children() if name != "vision_model"}
    quantized = copy.deepcopy(clip, memo=shared)
    # set_inductor_config=False: nothing here is compiled, so torchao need not change torch's global compiler settings
    quantize_(quantized.vision_model, Int8DynamicActivationInt8WeightConfig(set_inductor_config=False))
    return quantized
