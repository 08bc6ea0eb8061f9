"""Training KAnoCLIP's prompts, Bi-CMCI and Conv-Adapter with the joint loss (paper §2.5, eq. 13).

The CLIP backbone is frozen: only ``model.model.trainable_modules()`` are optimised (AdamW by
default, or Adam; constant learning rate). Each batch's loss is ``α·L_KD + β·L_global + γ·L_local``: ``L_KD`` pulls the
learned abnormal prompts towards the knowledge base's descriptions of the batch's classes,
``L_global`` is the BCE of the image score, ``L_local`` the focal + Dice losses of the maps
against the masks resized to the model's S×S (nearest). Samples without pixel ground truth
(e.g. HeadCT, or any class none of whose anomalous images has a mask) train ``L_global``
only; normal images of a class with masks count as all-normal masks.

Reproducibility: the model is initialised from ``seed``; epoch *e* visits the samples in a
permutation drawn from a generator seeded with ``(seed, e)``; every epoch ends with the
checkpoint and a resumable state (:mod:`~kanoclip.training.state`). A run killed at any point
and rerun with ``resume=True`` redoes the unfinished epoch from that state and ends with the
same weights as an uninterrupted run (on the same machine and device).

Several processes: launched by ``torchrun`` or ``accelerate launch`` (``WORLD_SIZE > 1``),
training runs through :class:`accelerate.Accelerator` with DDP (gloo on CPU, NCCL on GPU;
:class:`kanoclip.distributed.Processes`).
``batch_size`` is per process; each step's global batch is split among the processes and the
gradients averaged. Only the main process writes files and reports progress.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import math
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from kanoclip.config import KAnoCLIPConfig
from kanoclip.data import Sample, load_dataset, load_mask, parse_data_arg
from kanoclip.detector import KAnoCLIP
from kanoclip.distributed import Processes
from kanoclip.errors import CheckpointError, DatasetError, ImageError, InputError, KAnoCLIPError
from kanoclip.fileio import atomic_write_json
from kanoclip.images import load_image
from kanoclip.training.feature_cache import CACHE_DIR, FeatureCache
from kanoclip.training.state import (
    STATE_DIR,
    TrainingState,
    capture_rng,
    has_state,
    load_optimizer_tensors,
    load_state,
    optimizer_tensors,
    restore_rng,
    save_state,
)
from kanoclip.viz import plot_loss_curves, save_png

HISTORY_NAME = "history.json"
LOSS_CURVE_NAME = "loss_curve.png"
LOSS_TERMS = ("total", "kd", "global", "local")
OPTIMIZERS = ("adamw", "adam")


def api_name(option: str, value: object = None) -> str:
    """How the library names a :class:`TrainConfig` option: ``seed``, or with a value ``resume=True``."""
    return option if value is None else f"{option}={value!r}"


class WordedError(KAnoCLIPError):
    """A user error whose message names :class:`TrainConfig` options, worded for its caller.

    ``words(name)`` builds the message from a naming of the options (``name(option)`` or
    ``name(option, value)``); ``str(error)`` uses :func:`api_name`, and :meth:`reworded` gives
    the same error for another caller (the CLI names its flags).
    """

    def __init__(self, words: Callable[[Callable[..., str]], str], name: Callable[..., str] = api_name) -> None:
        self.words = words
        super().__init__(words(name))

    def reworded(self, name: Callable[..., str]) -> WordedError:
        return type(self)(self.words, name)


class OptionError(WordedError, InputError):
    """An invalid :class:`TrainConfig` value, or a resume with other settings."""


class DataError(WordedError, DatasetError):
    """Unreadable training samples (``on_bad_sample="stop"``), or none readable at all."""


class PushError(WordedError, CheckpointError):
    """Pushing the trained checkpoint to the hub failed."""


# Settings that change the sample order or the model: a resumed run must use the same ones.
# Each is worded from the option names. The optimizer keys were added later: a state written
# before them used the defaults of that time; one without "model" is not checked for it.
_RESUME_KEYS: dict[str, Callable[[Callable[..., str]], str]] = {
    "data": lambda name: name("data"),
    "n_samples": lambda name: "the number of samples listed",
    "seed": lambda name: name("seed"),
    "batch_size": lambda name: name("batch_size"),
    "image_size": lambda name: name("image_size"),
    "backbone": lambda name: name("backbone"),
    "max_samples": lambda name: name("max_samples"),
    "kb_sha256": lambda name: f"the knowledge base ({name('kb')})",
    "optimizer": lambda name: name("optimizer"),
    "betas": lambda name: name("betas"),
    "model": lambda name: "the model setting",  # the dotted field follows; the CLI has no flag for it
}
_RESUME_DEFAULTS: dict[str, Any] = {"optimizer": "adamw", "betas": [0.9, 0.999]}
_UNRECORDED = ("model",)  # not checked against a state written before it was recorded


@dataclass
class TrainConfig:
    """Options of :func:`train` (the ``kanoclip train`` flags)."""

    data: list[str]  # "kind=PATH" or "PATH" specs
    out: Path  # checkpoint folder
    epochs: int = 10
    batch_size: int = 8  # per process
    lr: float = 1e-3
    image_size: int | None = None  # None: the backbone's native size
    seed: int = 0
    kb: str | None = None  # knowledge-base file (None: the built-in one)
    backbone: str | None = None  # None: $KANOCLIP_BACKBONE or ViT-L/14@336px
    device: str = "auto"
    resume: bool = False
    feature_cache: bool = True
    on_bad_sample: Literal["stop", "skip"] = "stop"  # an unreadable sample is reported either way
    max_samples: int | None = None  # for quick runs: an evenly spaced subset of this size
    push_to_hub: str | None = None  # repo id
    # "adamw" (torch's defaults, weight decay 0.01) is our choice, the paper naming none;
    # "adam" with betas (0.5, 0.999) is how AnomalyCLIP trains its prompts (train.py:
    # torch.optim.Adam(..., betas=(0.5, 0.999))), the recipe KAnoCLIP's protocol follows.
    optimizer: Literal["adamw", "adam"] = "adamw"
    betas: tuple[float, float] = (0.9, 0.999)  # Adam(W)'s moment decay rates, each in [0, 1)
    # The model's own settings (e.g. LossConfig.local_loss, BiCMCIConfig.residual_logits,
    # VVConfig.position_interpolation); saved in the checkpoint. None: the defaults. ``backbone``
    # and ``image_size`` above, when given, take precedence over the ones in it.
    model: KAnoCLIPConfig | None = None
    precision: str = "auto"  # the backbone's (kanoclip.precision); maps and losses are fp32
    int8_engine: str = "auto"  # what runs precision "int8" (kanoclip.precision.resolve_int8_engine)
    # How often (in steps) the progress's running loss means are refreshed: reading them waits
    # for the device, so not at every step (also at each epoch's first and last step).
    log_every: int = 10
    # torch.use_deterministic_algorithms(True, warn_only=True) for the run: on a GPU, the atomics
    # of grid_sample's, interpolate's and SDPA's backward make runs differ in the last digits
    # otherwise (docs/training.md "Determinism"); costs speed, so off by default.
    deterministic: bool = False


@dataclass
class TrainProgress:
    """One progress report: a training step (``epoch >= 1``) or a preparation step (``epoch == 0``)."""

    epoch: int
    epochs: int
    step: int
    steps: int
    losses: dict[str, float]  # running means of the epoch's loss terms so far
    message: str = ""


@dataclass
class TrainResult:
    checkpoint: Path  # holds a checkpoint once at least one epoch has finished
    history: list[dict[str, float]]  # one dict per finished epoch: "epoch" and each loss term's mean
    loss_curve: Path
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (image path, reason)
    cancelled: bool = False


ProgressFn = Callable[[TrainProgress], None]


# ----------------------------------------------------------------------------- data


@dataclass
class _TrainSet:
    samples: list[Sample]
    classes: list[str]  # canonical class name of each sample
    has_mask: list[bool]  # whether the sample has a pixel ground truth (trains L_local)
    specs: list[str]  # "kind=absolute path" of each dataset
    names: list[str]  # for the checkpoint metadata, e.g. "mvtec: bottle (83 images)"


def _spread(count: int, keep: int) -> list[int]:
    """``keep`` evenly spaced indices of ``range(count)`` (all of them when keep >= count)."""
    if keep >= count:
        return list(range(count))
    return sorted({(i * count) // keep for i in range(keep)})


def load_training_set(data: list[str], model: KAnoCLIP, max_samples: int | None = None) -> _TrainSet:
    """List the samples of every ``data`` spec, with their classes and pixel-GT flags."""
    if not data:
        raise OptionError(
            lambda name: f"no training data; pass {name('data', ['mvtec=/data/mvtec_ad'])} (KIND=PATH specs)"
        )
    if max_samples is not None and max_samples < 1:
        raise OptionError(lambda name: f"{name('max_samples')} must be at least 1, got {max_samples}")
    samples: list[Sample] = []
    has_mask: list[bool] = []
    specs, names = [], []
    for spec in data:
        kind, root = parse_data_arg(spec)
        listed = load_dataset(kind, root)
        with_gt = {s.class_name for s in listed if s.mask is not None}
        samples += listed
        has_mask += [s.mask is not None or (s.label == 0 and s.class_name in with_gt) for s in listed]
        specs.append(f"{kind}={Path(root).resolve()}")
        names.append(f"{kind}: {Path(root).resolve().name} ({len(listed)} images)")
    keep = _spread(len(samples), max_samples or len(samples))
    samples, has_mask = [samples[i] for i in keep], [has_mask[i] for i in keep]
    classes = [model.canonical_class(s.class_name)[0] for s in samples]
    return _TrainSet(samples, classes, has_mask, specs, names)


def _epoch_order(count: int, seed: int, epoch: int, world: int) -> list[int]:
    """The epoch's permutation of ``range(count)``, padded (by wrapping) to a multiple of ``world``."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(count, generator=generator).tolist()
    pad = (-len(order)) % world
    return order + order[:pad]


def _bad_sample_error(bad: list[tuple[str, str]]) -> DataError:
    path, reason = bad[0]
    more = f" (and {len(bad) - 1} more unreadable samples)" if len(bad) > 1 else ""
    return DataError(
        lambda name: (
            f"unreadable training sample {path}: {reason}{more}; fix or remove it, "
            f"or train without it with {name('on_bad_sample', 'skip')}"
        )
    )


def _reason(path: Path, exc: KAnoCLIPError) -> str:
    text = str(exc)
    prefix = f"{path}: "
    return text[len(prefix) :] if text.startswith(prefix) else text


class _Batches:
    """Features, labels and masks of training batches (from the cache, or encoded each time)."""

    def __init__(self, model: KAnoCLIP, trainset: _TrainSet, cache: FeatureCache | None) -> None:
        self.model = model
        self.set = trainset
        self.cache = cache
        self.size = (model.image_size, model.image_size)
        self.masks: dict[int, np.ndarray] = {}  # packed bits, S*S per sample with a mask file

    def check(self, indices: list[int], *, to_disk: bool) -> list[tuple[int, str, str]]:
        """Decode a chunk's images and masks (encoding them into the cache); the unreadable ones."""
        bad, images, good = [], [], []
        for i in indices:
            sample = self.set.samples[i]
            try:
                image = load_image(sample.image)
                if sample.mask is not None:
                    self._mask(i)
            except (ImageError, DatasetError) as exc:
                bad.append((i, str(sample.image), _reason(sample.image, exc)))
                continue
            images.append(image)
            good.append(i)
        if self.cache is not None and good:
            self.cache.put(good, self._encode(images), to_disk=to_disk)
        return bad

    def _encode(self, images: list) -> Any:
        return self.model.encode_image(self.model.pixel_values(images))

    def _mask(self, i: int) -> np.ndarray:
        packed = self.masks.get(i)
        if packed is None:
            packed = np.packbits(load_mask(self.set.samples[i], self.size))
            self.masks[i] = packed
        return np.unpackbits(packed, count=self.size[0] * self.size[1]).reshape(self.size)

    def batch(self, indices: list[int]) -> tuple[Any, list[str], torch.Tensor, torch.Tensor, torch.Tensor]:
        device = self.model.device
        if self.cache is not None:
            visual = self.cache.get(indices, device)
        else:
            visual = self._encode([load_image(self.set.samples[i].image) for i in indices])
        zeros = np.zeros(self.size, dtype=np.uint8)
        masks = np.stack([self._mask(i) if self.set.has_mask[i] else zeros for i in indices])
        return (
            visual,
            [self.set.classes[i] for i in indices],
            torch.tensor([float(self.set.samples[i].label) for i in indices], device=device),
            torch.from_numpy(masks).to(device=device, dtype=torch.float32),
            torch.tensor([self.set.has_mask[i] for i in indices], device=device),
        )


# ----------------------------------------------------------------------------- training


def _loss_terms(
    model: KAnoCLIP, net: torch.nn.Module, batches: _Batches, indices: list[int]
) -> dict[str, torch.Tensor]:
    visual, classes, labels, masks, has_mask = batches.batch(indices)
    out = net(visual, classes)
    return model.model.losses(out, model.knowledge_features(out.classes), label=labels, mask=masks, has_mask=has_mask)


def _kb_digest(model: KAnoCLIP) -> str:
    text = json.dumps(model.knowledge.to_dict(), sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _check_resumable(saved: dict[str, Any], run: dict[str, Any], out: Path) -> None:
    for key, label in _RESUME_KEYS.items():
        if key in _UNRECORDED and key not in saved:
            continue
        before, now = saved.get(key, _RESUME_DEFAULTS.get(key)), run.get(key)
        if before == now:
            continue
        where = ""
        if isinstance(before, dict) and isinstance(now, dict):  # the model settings: name the field
            path, before, now = _first_difference(before, now)
            where = f" {path}"
        was, now = (str(v)[:12] + "..." if key == "kb_sha256" else repr(v) for v in (before, now))
        raise OptionError(
            lambda name, label=label, where=where, was=was, now=now: (
                f"cannot resume {out}: {label(name)}{where} differs from "
                f"the interrupted run's (was {was}, now {now}); rerun with the original options, "
                "or start a new run in another "
                f"{name('out')} folder"
            )
        )


def _first_difference(a: dict[str, Any], b: dict[str, Any], prefix: str = "") -> tuple[str, Any, Any]:
    """The first dotted key (sorted) whose values differ in two nested dicts, and the two values."""
    for key in sorted(set(a) | set(b)):
        x, y = a.get(key), b.get(key)
        if x != y:
            if isinstance(x, dict) and isinstance(y, dict):
                return _first_difference(x, y, f"{prefix}{key}.")
            return f"{prefix}{key}", x, y
    return prefix.rstrip("."), a, b


def _build_model(config: TrainConfig, device: torch.device) -> KAnoCLIP:
    model_config = (
        copy.deepcopy(config.model) if config.model is not None else KAnoCLIPConfig()
    )  # the caller's stays as given
    if config.image_size is not None:
        model_config.image_size = config.image_size
    return KAnoCLIP.for_training(
        backbone=config.backbone,
        device=device,
        kb=config.kb,
        config=model_config,
        precision=config.precision,
        int8_engine=config.int8_engine,
    )


def _model_settings(model: KAnoCLIP) -> dict[str, Any]:
    """The model config's sections (prompts, vv, bicmci, ...), without what other resume keys hold."""
    return {k: v for k, v in model.config.to_dict().items() if k not in ("backbone", "image_size")}


def _validate(config: TrainConfig) -> Path:
    if config.epochs < 1 or config.batch_size < 1:
        raise OptionError(
            lambda name: (
                f"{name('epochs')} and {name('batch_size')} must be at least 1, "
                f"got {config.epochs} and {config.batch_size}"
            )
        )
    if not (config.lr > 0 and math.isfinite(config.lr)):
        raise OptionError(lambda name: f"{name('lr')} (the learning rate) must be a positive number, got {config.lr}")
    if config.on_bad_sample not in ("stop", "skip"):
        raise OptionError(
            lambda name: f"{name('on_bad_sample')} must be 'stop' or 'skip', got {config.on_bad_sample!r}"
        )
    if config.optimizer not in OPTIMIZERS:
        raise OptionError(lambda name: f"{name('optimizer')} must be 'adamw' or 'adam', got {config.optimizer!r}")
    betas = tuple(config.betas) if isinstance(config.betas, (tuple, list)) else ()
    if len(betas) != 2 or not all(isinstance(b, (int, float)) and 0 <= b < 1 for b in betas):
        raise OptionError(
            lambda name: f"{name('betas')} must be two numbers in [0, 1), e.g. (0.9, 0.999), got {config.betas!r}"
        )
    if not isinstance(config.log_every, int) or config.log_every < 1:
        raise OptionError(
            lambda name: f"{name('log_every')} must be a whole number of steps >= 1, got {config.log_every!r}"
        )
    out = Path(config.out).expanduser()
    if out.exists() and not out.is_dir():
        raise OptionError(lambda name: f"{name('out')} {out} is a file; pass a folder for the checkpoint")
    if has_state(out) and not config.resume:
        raise OptionError(
            lambda name: (
                f"{out} already holds a training run; pass {name('resume', True)} to continue it, "
                f"or choose another {name('out')} folder"
            )
        )
    return out


@dataclass
class _Run:
    """One training run: its settings, processes, model and data, and what it has done so far."""

    config: TrainConfig
    out: Path
    procs: Processes
    model: KAnoCLIP
    trainset: _TrainSet
    info: dict[str, Any]  # the settings a resume must match (``_RESUME_KEYS``)
    state: TrainingState | None  # what ``resume=True`` continues from
    cache: FeatureCache | None
    report: ProgressFn
    stop: Callable[[], bool]
    history: list[dict[str, float]] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    usable: list[int] = field(default_factory=list)  # indices of the readable samples
    meta: dict[str, Any] = field(default_factory=dict)  # the checkpoint's training metadata

    @property
    def loss_curve(self) -> Path:
        return self.out / LOSS_CURVE_NAME

    def result(self, *, cancelled: bool) -> TrainResult:
        return TrainResult(self.out, self.history, self.loss_curve, self.skipped, cancelled=cancelled)

    def progress(
        self, epoch: int, step: int = 0, steps: int = 0, losses: dict[str, float] | None = None, message: str = ""
    ) -> None:
        self.report(TrainProgress(epoch, self.config.epochs, step, steps, losses or {}, message))


def train(
    config: TrainConfig,
    *,
    progress: ProgressFn | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> TrainResult:
    """Train the prompts, Bi-CMCI and Conv-Adapter; write a checkpoint at ``config.out`` each epoch.

    Args:
        config: the run's options; invalid ones raise :class:`OptionError` naming the field.
        progress: receives a :class:`TrainProgress` after each step (main process only).
        should_stop: polled before each step; when it returns True, training stops and the
            result is ``cancelled`` (the checkpoint of the last finished epoch stays).

    Returns:
        The checkpoint folder, the per-epoch loss history, the loss curve and the skipped samples.
    """
    out = _validate(config)
    existed = out.exists()
    procs = Processes(config.device)
    report: ProgressFn = progress if (progress is not None and procs.is_main) else (lambda _p: None)
    # the caller's global RNG state and determinism setting are left alone
    with torch.random.fork_rng(devices=[]), deterministic_algorithms(config.deterministic):
        torch.manual_seed(config.seed)
        model = _build_model(config, procs.device)
        trainset = load_training_set(config.data, model, config.max_samples)
        info = _run_info(config, model, trainset)
        state = load_state(out) if config.resume else None
        if state is not None:
            _check_resumable(state.info.get("run", {}), info, out)
        cache = FeatureCache(out / CACHE_DIR) if config.feature_cache else None
        run = _Run(config, out, procs, model, trainset, info, state, cache, report, should_stop or (lambda: False))
        try:
            return _train(run)
        finally:
            if cache is not None:
                cache.clear(delete_files=procs.is_main)
            if procs.is_main and not existed and out.is_dir() and not any(out.iterdir()):
                out.rmdir()  # cancelled or failed before the first checkpoint: leave no empty folder


@contextlib.contextmanager
def deterministic_algorithms(enabled: bool) -> Iterator[None]:
    """``torch.use_deterministic_algorithms(True, warn_only=True)`` inside (when ``enabled``), restored after.

    warn_only: an op without a deterministic implementation warns instead of stopping the run.
    cuBLAS needs ``CUBLAS_WORKSPACE_CONFIG=:4096:8`` set before CUDA starts to be deterministic;
    it is set here when missing, which is in time unless the process used CUDA before.
    """
    if not enabled:
        yield
        return
    before = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    benchmark = torch.backends.cudnn.benchmark
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = False
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])
        torch.backends.cudnn.benchmark = benchmark


def _run_info(config: TrainConfig, model: KAnoCLIP, trainset: _TrainSet) -> dict[str, Any]:
    """The settings a resumed run must share with the interrupted one (JSON-ready)."""
    return {
        "data": trainset.specs,
        "n_samples": len(trainset.samples),
        "seed": config.seed,
        "batch_size": config.batch_size,
        "image_size": model.image_size,
        "backbone": model.backbone_name,
        "max_samples": config.max_samples,
        "kb_sha256": _kb_digest(model),
        "optimizer": config.optimizer,
        "betas": [float(b) for b in config.betas],
        "model": json.loads(json.dumps(_model_settings(model))),  # as history.json will hold it (lists)
    }


def _train(run: _Run) -> TrainResult:
    """Resume, prepare the samples, then train epoch by epoch, each ending with a checkpoint."""
    model, procs = run.model, run.procs
    params = [
        (f"{m}.{n}", p)
        for m, module in model.model.trainable_modules().items()
        for n, p in module.named_parameters()
        if p.requires_grad
    ]
    names = [n for n, _ in params]
    optimizer = _optimizer(run.config, [p for _, p in params])
    start = _resume(run, optimizer, names)
    batches = _Batches(model, run.trainset, run.cache)
    if not _prepare(run, batches):
        return run.result(cancelled=True)
    if run.state is not None and procs.is_main:
        _write_outputs(run, start)  # repairs outputs a kill may have left half-updated
    net = procs.wrap(model)
    net.train()
    for epoch in range(start + 1, run.config.epochs + 1):
        steps = _train_epoch(run, net, optimizer, batches, epoch)
        if steps is None:
            return run.result(cancelled=True)
        _write_checkpoint(run, optimizer, names, epoch, steps)
    if run.config.push_to_hub and procs.is_main:
        url = push_checkpoint(run.out, run.config.push_to_hub)
        run.progress(run.config.epochs, losses=run.history[-1] if run.history else {}, message=f"pushed to {url}")
    return run.result(cancelled=False)


def _optimizer(config: TrainConfig, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    """AdamW or Adam over the trainable parameters, at ``config.lr`` with ``config.betas``."""
    optimizer_class = torch.optim.AdamW if config.optimizer == "adamw" else torch.optim.Adam
    return optimizer_class(params, lr=config.lr, betas=tuple(config.betas))


def _resume(run: _Run, optimizer: torch.optim.Optimizer, names: list[str]) -> int:
    """Load the interrupted run's weights, optimizer moments, RNG and history; the epochs done."""
    if run.state is None:
        return 0
    run.model.load_trainable_state_dict(run.state.weights, source=str(run.out / STATE_DIR))
    load_optimizer_tensors(optimizer, names, run.state.optimizer)
    restore_rng(run.state.rng, run.procs.device)
    run.history = list(run.state.info.get("history", []))
    run.progress(0, message=f"resuming {run.out} after epoch {run.state.epoch}")
    return run.state.epoch


def _prepare(run: _Run, batches: _Batches) -> bool:
    """Decode every image once (caching its frozen features) and set the usable samples.

    Unreadable samples stop the run or are skipped (``on_bad_sample``); False if cancelled.
    """
    bad = _check_samples(run, batches)
    if bad is None:
        return False
    run.skipped = [(path, reason) for _, path, reason in bad]
    if bad and run.config.on_bad_sample == "stop":
        raise _bad_sample_error(run.skipped)
    for path, reason in run.skipped:
        run.progress(0, message=f"skipped unreadable sample {path}: {reason}")
    run.usable = sorted(set(range(len(run.trainset.samples))) - {i for i, _, _ in bad})
    if not run.usable:
        raise DataError(lambda name: f"no readable training sample is left; check the {name('data')} folders")
    run.meta = {
        "datasets": run.trainset.names,  # kinds, folder names and counts; full paths stay in history.json
        "image_size": run.model.image_size,
        "batch_size": run.config.batch_size,
        "lr": run.config.lr,
        "optimizer": run.config.optimizer,
        "betas": [float(b) for b in run.config.betas],
        "seed": run.config.seed,
        "processes": run.procs.world,
        "n_train_samples": len(run.usable),
        "n_skipped": len(run.skipped),
    }
    return True


def _check_samples(run: _Run, batches: _Batches) -> list[tuple[int, str, str]] | None:
    """Every process decodes its share of the chunks; all unreadable samples, or None if cancelled."""
    procs, cache, size = run.procs, run.cache, run.config.batch_size
    if cache is not None and procs.is_main:
        cache.clear()  # features left by a killed run
    procs.barrier()
    count = len(run.trainset.samples)
    chunks = [list(range(k, min(k + size, count))) for k in range(0, count, size)]
    mine = chunks[procs.rank :: procs.world]
    what = (
        "encoding the frozen features of the training images" if cache is not None else "checking the training images"
    )
    bad_local: list[tuple[int, str, str]] = []
    run.model.eval()
    for j, chunk in enumerate(mine):
        if run.stop():
            return None
        bad_local += batches.check(chunk, to_disk=procs.world > 1)
        run.progress(0, j + 1, len(mine), message=what)
    bad = sorted(procs.gather(bad_local))
    procs.barrier()
    if cache is not None and procs.world > 1:
        cache.scan_disk()
    return bad


def _train_epoch(
    run: _Run, net: torch.nn.Module, optimizer: torch.optim.Optimizer, batches: _Batches, epoch: int
) -> int | None:
    """One epoch over the usable samples, its mean loss terms (over processes) added to the
    history; the number of steps, or None if cancelled."""
    procs = run.procs
    global_batch = run.config.batch_size * procs.world
    order = [run.usable[i] for i in _epoch_order(len(run.usable), run.config.seed, epoch, procs.world)]
    steps = math.ceil(len(order) / global_batch)
    # the terms' sums stay on the device (float64, as Python's floats were): reading them waits
    # for the device, so only the main process reads them, every ``log_every`` steps
    sums = torch.zeros(len(LOSS_TERMS), dtype=torch.float64, device=procs.device)
    means: dict[str, float] = {}
    for step in range(steps):
        if run.stop():
            return None
        indices = order[step * global_batch : (step + 1) * global_batch][procs.rank :: procs.world]
        terms = _loss_terms(run.model, net, batches, indices)
        optimizer.zero_grad(set_to_none=True)
        terms["total"].backward()
        optimizer.step()
        sums += torch.stack([terms[key].detach() for key in LOSS_TERMS]).double()
        if procs.is_main and (step == 0 or (step + 1) % run.config.log_every == 0 or step + 1 == steps):
            means = dict(zip(LOSS_TERMS, (sums / (step + 1)).tolist()))
        run.progress(epoch, step + 1, steps, means)
    run.history.append({"epoch": epoch, **procs.mean(dict(zip(LOSS_TERMS, (sums / steps).tolist())))})
    return steps


def _write_checkpoint(run: _Run, optimizer: torch.optim.Optimizer, names: list[str], epoch: int, steps: int) -> None:
    """After an epoch: the resumable state, then the checkpoint and logs (main process); all wait."""
    if run.procs.is_main:
        config = run.config
        skipped = [list(s) for s in run.skipped]
        info = {"run": run.info, "epochs": config.epochs, "lr": config.lr, "history": run.history, "skipped": skipped}
        weights = run.model.model.trainable_state_dict()
        save_state(
            run.out,
            TrainingState(epoch, weights, optimizer_tensors(optimizer, names), capture_rng(run.procs.device), info),
        )
        _write_outputs(run, epoch)
    run.procs.barrier()
    losses = {k: v for k, v in run.history[-1].items() if k != "epoch"}
    run.progress(epoch, steps, steps, losses, f"epoch {epoch} done, checkpoint written to {run.out}")


def _write_outputs(run: _Run, epoch: int) -> None:
    """The checkpoint (with the run's metadata), ``history.json`` and the loss curve."""
    run.model.save_pretrained(run.out, metadata={**run.meta, "epochs": epoch})
    log = {"history": run.history, "skipped": [list(s) for s in run.skipped], "run": run.info}
    atomic_write_json(run.out / HISTORY_NAME, log)
    save_png(plot_loss_curves(run.history), run.loss_curve)


def push_checkpoint(out: Path, repo_id: str) -> str:
    """Upload the checkpoint files only (not the training state nor the loss log) to the hub."""
    import shutil
    import tempfile

    from kanoclip.checkpoint import CONFIG_NAME, KB_NAME, WEIGHTS_NAME, push_to_hub
    from kanoclip.errors import first_line

    with tempfile.TemporaryDirectory(prefix="kanoclip-push-") as tmp:
        for name in (CONFIG_NAME, WEIGHTS_NAME, KB_NAME):
            shutil.copy2(out / name, Path(tmp) / name)
        try:
            return push_to_hub(tmp, repo_id)
        except KAnoCLIPError:
            raise
        except Exception as exc:  # noqa: BLE001 - any hub failure is reported in one line
            failure = f"{type(exc).__name__}: {first_line(exc)}"
            raise PushError(
                lambda name: (
                    f"pushing {out} to the hub repo {repo_id!r} failed ({failure}); the checkpoint is saved, push it "
                    f"later with `hf upload {repo_id} {out}` "
                    f"or rerun with {name('resume', True)} {name('push_to_hub', repo_id)}"
                )
            ) from None
