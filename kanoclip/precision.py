"""Numeric precision: the frozen backbone may run reduced, everything after it runs in fp32.

``precision`` is a public argument (``KAnoCLIP.from_pretrained(precision=...)``, ``--precision``):

* ``"auto"`` (default): the fastest precision whose speed-up is native on this device:

  - CUDA: bf16 where the GPU has native bf16 (compute capability 8.0 or newer: A10G, A100, H100,
    L4...), else fp16 (a T4, 7.5, would emulate bf16 several times slower);
  - CPU: bf16 only where the CPU has native bf16 instructions (``avx512_bf16`` or ``amx_bf16``
    in ``/proc/cpuinfo``) -- measured there at about half the fp32 time (``docs/performance.md``);
    fp32 on every other CPU (an AVX2-only CPU emulates bf16: measured 6.5x slower than fp32).
    The bf16 choice has the same unmeasured accuracy cost as on a GPU (random weights only).
* ``"fp32"``: no autocast;
* ``"bf16"``: bf16 autocast of the backbone's vision forward, on CUDA or on the CPU;
* ``"fp16"``: fp16 autocast, on CUDA or on the CPU;
* ``"int8"``: CPU only: the vision tower's linear layers (every block's q/k/v/out projections and
  MLP) quantised dynamically, int8 weights per output channel and int8 activations scaled at
  run time, with no calibration. For a CPU with no GPU (a free Space, a factory PC): the matrix
  products run on int8 instructions (VNNI/AMX where the CPU has them, AVX2 otherwise). The patch
  embedding (a convolution), the layer norms, the attention's softmax and the visual projection
  stay fp32, as does the text tower: it runs once per class, its features are cached, and the
  prompts are learned through it, so quantising it would buy little speed and change what
  training sees. Two engines run it (``int8_engine``, :func:`resolve_int8_engine`):

  - ``"torch"``: torch's dynamic int8 kernels on a quantised copy of the tower (:func:`int8_vision_copy`);
  - ``"onnxruntime"``: the tower exported and quantised to an ONNX graph run by onnxruntime's
    MLAS kernels (:mod:`kanoclip.onnx_vision`; the ``[onnx]`` extra), built once and kept on disk;
  - ``"auto"`` (default): onnxruntime on an x86 CPU without VNNI where it is installed (measured
    there: the tower at 0.36x its fp32 time against torch's 0.54x, ``docs/performance.md`` §9),
    torch elsewhere (on an AVX512-VNNI CPU torch's int8 ran ``detect`` at 0.27x, §6; onnxruntime
    was not measured there). Without onnxruntime on such a CPU, ``auto`` runs torch and says in
    one line at load what to install.

  Both keep everything a :class:`~kanoclip.detection.Detection` holds: only the tower's forward
  moves; projections, maps, guidance, references and thresholds stay in torch.

An explicit ``bf16`` or ``fp16`` on hardware without native support for it still runs, and says
so in one line when the model is loaded (the ``kanoclip`` logger; :func:`precision_at_load`):
it is expected to be several times slower there, and the line names what to use instead. The
app shows the same line in its header (:func:`explain_precision`).

Only the CLIP vision forward (CLIP-VV, up to and including the stage features' projection) runs
under autocast or int8. Similarities, Bi-CMCI, the maps, the blur, the score and the losses run in fp32:
in bf16 (8 bits of mantissa) a softmax probability near 0.5 moves in steps of 0.0039, so a map
would hold only a few hundred distinct values and pixel AUROC and ``max(M)`` would rank ties.

**TF32 policy (CUDA).** On GPUs of compute capability 8.0 and newer, cuDNN convolutions (the
maps' Gaussian blur, the patch embedding) may run fp32 inputs on TF32 tensor cores by default
(10 bits of mantissa), and matrix products do if a program allows it. So that "fp32" means IEEE
fp32, loading a model on a CUDA device turns TF32 off for cuBLAS matmuls and cuDNN once
(:func:`keep_fp32_exact`). These are process-wide settings of torch, so they are set once, at
load, under a lock, and never toggled per call (which would race between the threads of a
server). ``KANOCLIP_ALLOW_TF32=1`` leaves torch's settings as they are (faster fp32 on Ampere
and newer, maps then carry TF32 rounding).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import importlib.util
import logging
import os
import platform
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import torch
from torch import nn

from kanoclip.config import INT8_ENGINES, PRECISIONS
from kanoclip.errors import InputError

if TYPE_CHECKING:
    from transformers import CLIPModel

Precision = Literal["auto", "fp32", "bf16", "fp16", "int8"]
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
logger = logging.getLogger("kanoclip")

# /proc/cpuinfo flags that decide the backbone's speed, in the order a machine line names them
CPU_FLAGS = (
    "avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "avx512_fp16",
    "amx_tile", "amx_int8", "amx_bf16", "amx_fp16", "asimd", "bf16", "i8mm",
)  # fmt: skip
# native bf16 where ``auto`` picks it: measured faster than fp32 on an AVX512-BF16 CPU (docs/performance.md);
# AMX CPUs have avx512_bf16 as well
AUTO_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})
NATIVE_BF16_FLAGS = AUTO_BF16_FLAGS | {"bf16"}  # "bf16": Arm's (Graviton 3, Neoverse V1 and newer)
NATIVE_FP16_FLAGS = frozenset({"avx512_fp16", "amx_fp16", "fphp"})
# int8 dot-product instructions: where they are, torch's int8 was measured fast enough (docs/performance.md §6)
VNNI_FLAGS = frozenset({"avx512_vnni", "avx_vnni", "amx_int8"})
ONNX_EXTRA = "pip install 'kanoclip[onnx]'"
TF32_ENV = "KANOCLIP_ALLOW_TF32"


@dataclass(frozen=True)
class CPUFeatures:
    """What this CPU offers the backbone's arithmetic.

    Attributes:
        model: the CPU's model name (``/proc/cpuinfo``'s ``model name``, else ``platform``'s).
        flags: its instruction-set flags as ``/proc/cpuinfo`` spells them (empty where unreadable).
        torch_capability: the vector ISA torch's CPU kernels dispatch to
            (``torch.backends.cpu.get_cpu_capability()``: ``"AVX2"``, ``"AVX512"``, ...).
    """

    model: str
    flags: frozenset[str]
    torch_capability: str

    @property
    def native_bf16(self) -> bool:
        """Whether bf16 matrix products run on bf16 instructions here (else they are emulated)."""
        return bool(self.flags & NATIVE_BF16_FLAGS)

    @property
    def native_fp16(self) -> bool:
        """Whether fp16 matrix products run on fp16 instructions here."""
        return bool(self.flags & NATIVE_FP16_FLAGS)

    def summary(self) -> str:
        """One line: the model, its relevant flags and torch's capability (``AMD EPYC (avx2 fma; torch AVX2)``)."""
        flags = " ".join(f for f in CPU_FLAGS if f in self.flags) or "flags unknown"
        return f"{self.model} ({flags}; torch {self.torch_capability})"


def parse_cpuinfo(text: str) -> tuple[str, frozenset[str]]:
    """The CPU model and the flags of the first processor in a ``/proc/cpuinfo`` text.

    Args:
        text: the file's content (x86: ``model name`` and ``flags``; Arm: ``Features``).

    Returns:
        ``(model, flags)``; an empty model or flag set where the text has none.
    """
    model, flags = "", frozenset()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if key in ("model name", "hardware", "cpu model") and not model:
            model = value.strip()
        elif key in ("flags", "features") and not flags:
            flags = frozenset(value.split())
    return model, flags


@functools.cache
def cpu_features() -> CPUFeatures:
    """This machine's :class:`CPUFeatures`, read once per process (``/proc/cpuinfo``; Linux).

    Returns:
        The features; elsewhere (no ``/proc/cpuinfo``) the flags are empty, so nothing counts as native.
    """
    try:
        model, flags = parse_cpuinfo(Path("/proc/cpuinfo").read_text(errors="replace"))
    except OSError:
        model, flags = "", frozenset()
    return CPUFeatures(
        model=model or platform.processor() or platform.machine() or "unknown CPU",
        flags=flags,
        torch_capability=torch.backends.cpu.get_cpu_capability(),
    )


def cuda_native_bf16(device: torch.device) -> bool:
    """Whether ``device`` (CUDA) runs bf16 natively: compute capability 8.0 or newer (ROCm: torch's own test)."""
    if torch.version.hip:
        return torch.cuda.is_bf16_supported(including_emulation=False)
    return torch.cuda.get_device_capability(device) >= (8, 0)


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
        if cuda:
            return "bf16" if cuda_native_bf16(device) else "fp16"
        return "bf16" if device.type == "cpu" and cpu_features().flags & AUTO_BF16_FLAGS else "fp32"
    if precision == "int8" and device.type != "cpu":
        raise InputError(f"precision 'int8' runs on the CPU only, this model is on {device}; use 'bf16' or 'fp16'")
    if precision == "bf16" and cuda and not torch.cuda.is_bf16_supported():
        raise InputError(f"this GPU ({torch.cuda.get_device_name(device)}) has no bf16 support; use 'fp16' or 'fp32'")
    return precision  # type: ignore[return-value]


def onnxruntime_installed() -> bool:
    """Whether the ``[onnx]`` extra's packages (onnxruntime, onnx, onnxscript) can be imported."""
    return all(importlib.util.find_spec(name) is not None for name in ("onnxruntime", "onnx", "onnxscript"))


def resolve_int8_engine(int8_engine: str) -> tuple[Literal["torch", "onnxruntime"], str]:
    """What runs ``precision="int8"`` on this CPU, and why.

    The rule for ``"auto"``: onnxruntime on an x86 CPU with AVX2 and no VNNI (``avx512_vnni``,
    ``avx_vnni``, ``amx_int8``) when the ``[onnx]`` extra is installed, measured faster than
    torch's int8 there; torch on a CPU with VNNI (measured fast enough there, onnxruntime not
    measured), on other CPUs (neither measured) and where onnxruntime is not installed.

    Args:
        int8_engine: one of :data:`~kanoclip.config.INT8_ENGINES`.

    Returns:
        ``(engine, reason)``: ``"torch"`` or ``"onnxruntime"``, and a short reason for logs and the app.

    Raises:
        InputError: an unknown value, or ``"onnxruntime"`` without the ``[onnx]`` extra.
    """
    if int8_engine not in INT8_ENGINES:
        raise InputError(f"int8_engine must be one of {', '.join(INT8_ENGINES)}, got {int8_engine!r}")
    installed = onnxruntime_installed()
    if int8_engine == "onnxruntime" and not installed:
        raise InputError(
            f"int8_engine 'onnxruntime' needs onnxruntime, onnx and onnxscript, which are not all installed; "
            f"install them with {ONNX_EXTRA}, or use int8_engine 'torch'"
        )
    if int8_engine != "auto":
        return int8_engine, f"chosen with int8_engine {int8_engine}"  # type: ignore[return-value]
    flags = cpu_features().flags
    if flags & VNNI_FLAGS:
        return "torch", "VNNI on this CPU, where torch's int8 was measured fast"
    if "avx2" not in flags:
        return "torch", "neither engine was measured on this CPU"
    if installed:
        return "onnxruntime", "no VNNI on this CPU, where onnxruntime's int8 was measured faster than torch's"
    return "torch", "onnxruntime is not installed"


@dataclass(frozen=True)
class PrecisionChoice:
    """The backbone's precision on a device, and why.

    Attributes:
        requested: what was asked for (``"auto"`` or an explicit precision).
        resolved: what runs (:func:`resolve_precision`).
        engine: what runs it (``"torch autocast"``, ``"onnxruntime int8 (MLAS)"``...).
        hardware: the device in words (the CPU's :meth:`CPUFeatures.summary`, or the GPU's name).
        reason: why ``auto`` chose ``resolved`` (None for an explicit precision).
        warning: one line when ``resolved`` is expected to be slower than fp32 here (or int8 slower
            than it could be), else None.
        int8_engine: for int8, ``"torch"`` or ``"onnxruntime"`` (:func:`resolve_int8_engine`), else None.
        engine_reason: for int8, why that engine, else None.
    """

    requested: str
    resolved: str
    engine: str
    hardware: str
    reason: str | None
    warning: str | None
    int8_engine: Literal["torch", "onnxruntime"] | None = None
    engine_reason: str | None = None


def explain_precision(precision: str, device: torch.device, int8_engine: str = "auto") -> PrecisionChoice:
    """:func:`resolve_precision` with the engine, the hardware and the reason, for logs and the app.

    Args:
        precision: one of :data:`PRECISIONS`.
        device: the model's device.
        int8_engine: what runs int8 (:func:`resolve_int8_engine`; ignored for other precisions).

    Returns:
        The :class:`PrecisionChoice`.

    Raises:
        InputError: as :func:`resolve_precision`.
    """
    resolved = resolve_precision(precision, device)
    if int8_engine not in INT8_ENGINES:  # refused whatever the precision, so a typo never waits for int8
        raise InputError(f"int8_engine must be one of {', '.join(INT8_ENGINES)}, got {int8_engine!r}")
    auto = precision == "auto"
    reason = warning = None
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        hardware = f"{torch.cuda.get_device_name(device)} (compute capability {major}.{minor})"
        native = cuda_native_bf16(device)
        if auto:
            reason = "native bf16 on this GPU" if native else "no native bf16 on this GPU (it would be emulated)"
        elif resolved == "bf16" and not native:
            warning = (
                f"precision 'bf16' on {hardware}: no native bf16, it is emulated and expected to be several "
                "times slower than fp16 here; use precision 'fp16' (or 'auto')"
            )
    elif device.type != "cpu":
        hardware = str(device)
        reason = "no reduced precision measured on this device" if auto else None
    else:
        cpu = cpu_features()
        hardware = cpu.summary()
        if auto:
            reason = (
                "native bf16 on this CPU (measured faster than fp32 on such a CPU)"
                if resolved == "bf16"
                else "no native bf16 on this CPU"
            )
        elif (resolved == "bf16" and not cpu.native_bf16) or (resolved == "fp16" and not cpu.native_fp16):
            warning = (
                f"precision {resolved!r} on this CPU ({hardware}): no native {resolved} instructions, it is "
                "expected to be several times slower than fp32 here; use 'int8' for speed or 'fp32'"
            )
    if resolved != "int8":
        return PrecisionChoice(precision, resolved, "torch" if resolved == "fp32" else "torch autocast", hardware,
                               reason, warning)  # fmt: skip
    int8, engine_reason = resolve_int8_engine(int8_engine)
    if engine_reason == "onnxruntime is not installed":
        warning = (
            "int8 runs on torch's kernels here: onnxruntime is not installed, whose int8 ran the vision tower at "
            f"0.36x its fp32 time against torch's 0.54x on an AVX2 CPU without VNNI; install it with {ONNX_EXTRA}"
        )
    engine = (
        "onnxruntime int8 (MLAS)"
        if int8 == "onnxruntime"
        else f"torch dynamic int8 ({torch.backends.quantized.engine} engine)"
    )
    return PrecisionChoice(precision, resolved, engine, hardware, reason, warning, int8, engine_reason)


_fp32_lock = threading.Lock()
_fp32_kept = False


def keep_fp32_exact() -> bool:
    """Turn TF32 off for cuBLAS matmuls and cuDNN, once per process (the module's TF32 policy).

    Process-wide torch settings, so they are set once under a lock rather than per call.
    torch's legacy flags are used: in torch 2.13 they leave both its legacy and its new
    ``fp32_precision`` getters consistent, while setting only part of the new API makes the
    legacy ``torch.backends.cudnn.allow_tf32`` getter raise.

    Returns:
        Whether the settings were changed by this call (False: already done, or ``KANOCLIP_ALLOW_TF32=1``).
    """
    global _fp32_kept
    if os.environ.get(TF32_ENV, "").strip() in ("1", "true", "yes"):
        return False
    with _fp32_lock:
        if _fp32_kept:
            return False
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        _fp32_kept = True
        return True


def precision_at_load(precision: str, device: torch.device, int8_engine: str = "auto") -> PrecisionChoice:
    """What a model load does about precision: resolve it, warn in one line if slow, keep CUDA's fp32 exact.

    Args:
        precision: one of :data:`PRECISIONS`.
        device: the device the model is loaded on.
        int8_engine: what runs int8 (:func:`resolve_int8_engine`).

    Returns:
        The :class:`PrecisionChoice`; its ``warning``, if any, went to the ``kanoclip`` logger
        (shown on the terminal by Python's default handler when the program configured none).

    Raises:
        InputError: as :func:`resolve_precision`, before anything is loaded.
    """
    choice = explain_precision(precision, device, int8_engine)
    if choice.warning:
        logger.warning(choice.warning)
    if device.type == "cuda":
        keep_fp32_exact()
    return choice


def backbone_autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """The autocast context for the backbone's forward at a resolved ``precision`` (none for int8: it is quantised)."""
    if precision in ("fp32", "int8"):
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=_DTYPES[precision])


def full_precision(device: torch.device) -> contextlib.AbstractContextManager:
    """Autocast off on ``device``'s kind: the fp32 region after the backbone, even under a caller's autocast.

    TF32 is not toggled here: it is process-wide state, which threads serving at once would race
    on; it is turned off once when a model is loaded on CUDA (the module's TF32 policy).
    """
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

    On an AVX2-only CPU (no VNNI) these kernels gain much less: a ViT-L block took 0.55-0.66x its
    fp32 time, whichever torch engine (x86, fbgemm, onednn) or weight granularity, and ``detect`` in
    int8 0.66-0.68x (training-free) and 0.83-0.90x (trained) the bare fp32 forward, short of the
    0.5x goal. onnxruntime's MLAS int8 ran the block at 0.40-0.45x (``docs/performance.md`` §9);
    running the vision tower there with the V-V capture is the measured way on, not done yet.

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
