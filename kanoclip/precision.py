"""Numeric precision: the frozen backbone may run reduced, everything after it runs in fp32.

``precision`` is a public argument (``KAnoCLIP.from_pretrained(precision=...)``, ``--precision``):

* ``"auto"`` (default): bf16 on a CUDA device that supports it, else fp16 on CUDA; fp32 on CPU;
* ``"fp32"``: no autocast;
* ``"bf16"``: bf16 autocast of the backbone's vision forward, on CUDA or on the CPU (where it
  pays on CPUs with native bf16 instructions, e.g. AVX512-BF16 or AMX);
* ``"fp16"``: fp16 autocast, CUDA only;
* ``"int8"``: CPU only: the vision tower's linear layers (every block's q/k/v/out projections and
  MLP) quantised dynamically, int8 weights per output channel and int8 activations scaled at
  run time, with no calibration (:func:`int8_vision_copy`). For a CPU with no GPU (a
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
import warnings
from typing import TYPE_CHECKING, Literal

import torch
from torch import nn

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
    never run a quantised one. Weights are int8 per output channel; activations are quantised
    per tensor at run time (no calibration).

    The tool is ``torch.ao.quantization.quantize_dynamic``, although PyTorch 2.13's quantization
    docs and its deprecation warning ask eager-mode users to migrate to torchao's ``quantize_``
    (PyTorch's maintained quantisation library, a separate package): tried on this project's
    x86 CPU (AVX512-VNNI) with torchao 0.18, ``Int8DynamicActivationInt8WeightConfig`` ran ViT-L's
    linear layers no faster than fp32 in eager mode (its CPU path is written for torch.compile to
    fuse; eager it runs ``torch._int_mm`` plus conversions), while ``quantize_dynamic``'s x86 (fbgemm)
    kernels ran them 2-4x faster than fp32 (``docs/performance.md``). It needs no extra package. When a
    torch release removes it, this function fails with one line and torchao is the way on.

    Args:
        clip: the fp32 backbone, on the CPU.

    Returns:
        The quantised copy (eval mode, no gradients, like the backbone).

    Raises:
        InputError: this torch has no ``torch.ao.quantization``.
    """
    try:
        from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic
    except ImportError:
        raise InputError(
            f"precision 'int8' needs torch.ao.quantization, which torch {torch.__version__} no longer has; "
            "use precision 'fp32' or 'bf16'"
        ) from None
    shared = {id(module): module for name, module in clip.named_children() if name != "vision_model"}
    quantized = copy.deepcopy(clip, memo=shared)
    with warnings.catch_warnings():
        # its deprecation notices (above) are for this function's author, not for a user of int8
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.filterwarnings("ignore", message=r"torch\.quantize_per_tensor, torch\.quantize_per_channel")
        quantize_dynamic(
            quantized.vision_model, {nn.Linear: per_channel_dynamic_qconfig}, dtype=torch.qint8, inplace=True
        )
    return quantized
