"""Training KAnoCLIP's prompts, Bi-CMCI and Conv-Adapter with the joint loss (paper §2.5, eq. 13).

The CLIP backbone is frozen: only ``model.trainable_modules()`` are optimised (AdamW, constant
learning rate). Each batch's loss is ``α·L_KD + β·L_global + γ·L_local``: ``L_KD`` pulls the
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
training runs through :class:`accelerate.Accelerator` with DDP (gloo on CPU, NCCL on GPU).
``batch_size`` is per process; each step's global batch is split among the processes and the
gradients averaged. Only the main process writes files and reports progress.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from kanoclip.config import KAnoCLIPConfig
from kanoclip.data import Sample, load_dataset, load_mask, parse_data_arg
from kanoclip.errors import DatasetError, ImageError, InputError, KAnoCLIPError
from kanoclip.fileio import atomic_write_json
from kanoclip.images import load_image
from kanoclip.losses import kd_loss, total_loss
from kanoclip.model import KAnoCLIP, resolve_device
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
# Settings that change the sample order or the model: a resumed run must use the same ones.
_RESUME_KEYS = {
    "data": "--data",
    "n_samples": "the number of samples listed",
    "seed": "--seed",
    "batch_size": "--batch-size",
    "image_size": "--image-size",
    "backbone": "--backbone",
    "max_samples": "--max-samples",
    "kb_sha256": "the knowledge base (--kb)",
}


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


# ----------------------------------------------------------------------------- processes


class _Processes:
    """One process, or several under torchrun / accelerate launch (through ``accelerate``)."""

    def __init__(self, device: str) -> None:
        self.accelerator = None
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            from accelerate import Accelerator

            cpu = device == "cpu" or (device == "auto" and not torch.cuda.is_available())
            self.accelerator = Accelerator(cpu=cpu)
            self.device = self.accelerator.device
            self.rank, self.world = self.accelerator.process_index, self.accelerator.num_processes
        else:
            self.device = resolve_device(device)
            self.rank, self.world = 0, 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.accelerator is not None:
            self.accelerator.wait_for_everyone()

    def gather(self, items: list) -> list:
        """Every process's ``items``, concatenated (in rank order)."""
        if self.accelerator is None:
            return list(items)
        from accelerate.utils import gather_object

        return list(gather_object(list(items)))

    def mean(self, values: dict[str, float]) -> dict[str, float]:
        if self.accelerator is None:
            return values
        tensor = torch.tensor([values[k] for k in LOSS_TERMS], dtype=torch.float64, device=self.device)
        reduced = self.accelerator.reduce(tensor, reduction="mean")
        return {k: float(v) for k, v in zip(LOSS_TERMS, reduced.tolist())}

    def wrap(self, model: KAnoCLIP) -> torch.nn.Module:
        if self.accelerator is None:
            return model
        # Depthwise-conv gradients come in another memory layout than DDP's buckets: harmless, and
        # warned about once per process on every run.
        warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
        return self.accelerator.prepare_model(model)


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
    """List the samples of every ``--data`` spec, with their classes and pixel-GT flags."""
    if not data:
        raise InputError("no training data; pass --data KIND=PATH (e.g. --data mvtec=/data/mvtec_ad)")
    if max_samples is not None and max_samples < 1:
        raise InputError(f"--max-samples must be at least 1, got {max_samples}")
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


def _bad_sample_error(bad: list[tuple[str, str]]) -> DatasetError:
    path, reason = bad[0]
    more = f" (and {len(bad) - 1} more unreadable samples)" if len(bad) > 1 else ""
    return DatasetError(
        f"unreadable training sample {path}: {reason}{more}; fix or remove it, "
        "or train without it with --on-bad-sample skip (on_bad_sample='skip')"
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


def _loss_terms(model: KAnoCLIP, net: torch.nn.Module, batches: _Batches, indices: list[int]) -> dict[str, torch.Tensor]:
    visual, classes, labels, masks, has_mask = batches.batch(indices)
    out = net(visual, classes)
    kd = kd_loss(model.knowledge_features(out.classes), out.prompts.abnormal, out.prompts.normal)
    return total_loss(
        model.config.loss, kd=kd, score=out.score, label=labels, normal=out.normal, abnormal=out.abnormal, mask=masks, has_mask=has_mask
    )


def _kb_digest(model: KAnoCLIP) -> str:
    text = json.dumps(model.knowledge.to_dict(), sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _check_resumable(saved: dict[str, Any], run: dict[str, Any], out: Path) -> None:
    for key, label in _RESUME_KEYS.items():
        if saved.get(key) != run.get(key):
            was, now = (str(v)[:12] + "..." if key == "kb_sha256" else repr(v) for v in (saved.get(key), run.get(key)))
            raise InputError(
                f"cannot resume {out}: {label} differs from the interrupted run's (was {was}, now {now}); "
                "rerun with the original options, or start a new run in another --out folder"
            )


def _build_model(config: TrainConfig, device: torch.device) -> KAnoCLIP:
    model_config = KAnoCLIPConfig(image_size=config.image_size)
    return KAnoCLIP.from_pretrained(backbone=config.backbone, device=device, kb=config.kb, config=model_config)


def _validate(config: TrainConfig) -> Path:
    if config.epochs < 1 or config.batch_size < 1:
        raise InputError(f"epochs and batch size must be at least 1, got epochs={config.epochs}, batch size={config.batch_size}")
    if not (config.lr > 0 and math.isfinite(config.lr)):
        raise InputError(f"the learning rate must be a positive number, got {config.lr}")
    if config.on_bad_sample not in ("stop", "skip"):
        raise InputError(f"on_bad_sample must be 'stop' or 'skip', got {config.on_bad_sample!r}")
    out = Path(config.out).expanduser()
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out} is a file; pass a folder for the checkpoint")
    if has_state(out) and not config.resume:
        raise InputError(f"{out} already holds a training run; pass --resume (resume=True) to continue it, or choose another --out folder")
    return out


def train(
    config: TrainConfig,
    *,
    progress: ProgressFn | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> TrainResult:
    """Train the prompts, Bi-CMCI and Conv-Adapter; write a checkpoint at ``config.out`` each epoch.

    ``progress`` receives a :class:`TrainProgress` after each step (main process only);
    ``should_stop()`` is polled before each step: when it returns True, training stops and
    the result is ``cancelled`` (the checkpoint of the last finished epoch stays).
    """
    out = _validate(config)
    existed = out.exists()
    procs = _Processes(config.device)
    report: ProgressFn = progress if (progress is not None and procs.is_main) else (lambda _p: None)
    with torch.random.fork_rng(devices=[]):  # the caller's global RNG state is left alone
        torch.manual_seed(config.seed)
        model = _build_model(config, procs.device)
        trainset = load_training_set(config.data, model, config.max_samples)
        run = {
            "data": trainset.specs,
            "n_samples": len(trainset.samples),
            "seed": config.seed,
            "batch_size": config.batch_size,
            "image_size": model.image_size,
            "backbone": model.backbone_name,
            "max_samples": config.max_samples,
            "kb_sha256": _kb_digest(model),
        }
        state = load_state(out) if config.resume else None
        if state is not None:
            _check_resumable(state.info.get("run", {}), run, out)
        cache = FeatureCache(out / CACHE_DIR) if config.feature_cache else None
        try:
            return _run(config, out, procs, model, trainset, run, state, cache, report, should_stop)
        finally:
            if cache is not None:
                cache.clear(delete_files=procs.is_main)
            if procs.is_main and not existed and out.is_dir() and not any(out.iterdir()):
                out.rmdir()  # cancelled or failed before the first checkpoint: leave no empty folder


def _run(
    config: TrainConfig,
    out: Path,
    procs: _Processes,
    model: KAnoCLIP,
    trainset: _TrainSet,
    run: dict[str, Any],
    state: TrainingState | None,
    cache: FeatureCache | None,
    report: ProgressFn,
    should_stop: Callable[[], bool] | None,
) -> TrainResult:
    stop = should_stop or (lambda: False)
    loss_curve = out / LOSS_CURVE_NAME
    model.trained = True
    params = [(f"{m}.{n}", p) for m, module in model.trainable_modules().items() for n, p in module.named_parameters() if p.requires_grad]
    names = [n for n, _ in params]
    optimizer = torch.optim.AdamW([p for _, p in params], lr=config.lr)
    history: list[dict[str, float]] = []
    start = 0
    if state is not None:
        model.load_trainable_state_dict(state.weights, source=str(out / STATE_DIR))
        load_optimizer_tensors(optimizer, names, state.optimizer)
        restore_rng(state.rng)
        history, start = list(state.info.get("history", [])), state.epoch
        report(TrainProgress(0, config.epochs, 0, 0, {}, f"resuming {out} after epoch {start}"))

    # Preparation: decode every image once (and cache its frozen features), find unreadable ones.
    batches = _Batches(model, trainset, cache)
    if cache is not None and procs.is_main:
        cache.clear()  # features left by a killed run
    procs.barrier()
    size = config.batch_size
    chunks = [list(range(k, min(k + size, len(trainset.samples)))) for k in range(0, len(trainset.samples), size)]
    mine = chunks[procs.rank :: procs.world]
    what = "encoding the frozen features of the training images" if cache is not None else "checking the training images"
    bad_local: list[tuple[int, str, str]] = []
    model.eval()
    for j, chunk in enumerate(mine):
        if stop():
            return TrainResult(out, history, loss_curve, [], cancelled=True)
        bad_local += batches.check(chunk, to_disk=procs.world > 1)
        report(TrainProgress(0, config.epochs, j + 1, len(mine), {}, what))
    bad = sorted(procs.gather(bad_local))
    procs.barrier()
    if cache is not None and procs.world > 1:
        cache.scan_disk()
    skipped = [(path, reason) for _, path, reason in bad]
    if bad and config.on_bad_sample == "stop":
        raise _bad_sample_error(skipped)
    for path, reason in skipped:
        report(TrainProgress(0, config.epochs, 0, 0, {}, f"skipped unreadable sample {path}: {reason}"))
    usable = sorted(set(range(len(trainset.samples))) - {i for i, _, _ in bad})
    if not usable:
        raise DatasetError("no readable training sample is left; check the --data folders")

    meta = {
        "datasets": trainset.names,  # kinds, folder names and counts; full paths stay in history.json
        "image_size": model.image_size,
        "batch_size": config.batch_size,
        "lr": config.lr,
        "seed": config.seed,
        "processes": procs.world,
        "n_train_samples": len(usable),
        "n_skipped": len(skipped),
    }

    def write_outputs(epoch: int) -> None:
        model.save_pretrained(out, metadata={**meta, "epochs": epoch})
        atomic_write_json(out / HISTORY_NAME, {"history": history, "skipped": [list(s) for s in skipped], "run": run})
        save_png(plot_loss_curves(history), loss_curve)

    if state is not None and procs.is_main:
        write_outputs(start)  # repairs outputs a kill may have left half-updated
    net = procs.wrap(model)
    net.train()
    global_batch = size * procs.world
    for epoch in range(start + 1, config.epochs + 1):
        order = [usable[i] for i in _epoch_order(len(usable), config.seed, epoch, procs.world)]
        steps = math.ceil(len(order) / global_batch)
        sums = dict.fromkeys(LOSS_TERMS, 0.0)
        for step in range(steps):
            if stop():
                return TrainResult(out, history, loss_curve, skipped, cancelled=True)
            indices = order[step * global_batch : (step + 1) * global_batch][procs.rank :: procs.world]
            terms = _loss_terms(model, net, batches, indices)
            optimizer.zero_grad(set_to_none=True)
            terms["total"].backward()
            optimizer.step()
            for key in LOSS_TERMS:
                sums[key] += float(terms[key].detach())
            running = {k: v / (step + 1) for k, v in sums.items()}
            report(TrainProgress(epoch, config.epochs, step + 1, steps, running))
        losses = procs.mean({k: v / steps for k, v in sums.items()})
        history.append({"epoch": epoch, **losses})
        if procs.is_main:
            info = {"run": run, "epochs": config.epochs, "lr": config.lr, "history": history, "skipped": [list(s) for s in skipped]}
            weights = model.trainable_state_dict()
            save_state(out, TrainingState(epoch, weights, optimizer_tensors(optimizer, names), capture_rng(), info))
            write_outputs(epoch)
        procs.barrier()
        report(TrainProgress(epoch, config.epochs, steps, steps, losses, f"epoch {epoch} done, checkpoint written to {out}"))
    if config.push_to_hub and procs.is_main:
        url = push_checkpoint(out, config.push_to_hub)
        report(TrainProgress(config.epochs, config.epochs, 0, 0, history[-1] if history else {}, f"pushed to {url}"))
    return TrainResult(out, history, loss_curve, skipped, cancelled=False)


def push_checkpoint(out: Path, repo_id: str) -> str:
    """Upload the checkpoint files only (not the training state nor the loss log) to the hub."""
    import shutil
    import tempfile

    from kanoclip.checkpoint import CONFIG_NAME, KB_NAME, WEIGHTS_NAME, push_to_hub
    from kanoclip.errors import CheckpointError, first_line

    with tempfile.TemporaryDirectory(prefix="kanoclip-push-") as tmp:
        for name in (CONFIG_NAME, WEIGHTS_NAME, KB_NAME):
            shutil.copy2(out / name, Path(tmp) / name)
        try:
            return push_to_hub(tmp, repo_id)
        except KAnoCLIPError:
            raise
        except Exception as exc:  # noqa: BLE001 - any hub failure is reported in one line
            raise CheckpointError(
                f"pushing {out} to the hub repo {repo_id!r} failed ({type(exc).__name__}: {first_line(exc)}); "
                f"the checkpoint is saved, push it later with `hf upload {repo_id} {out}` or rerun with --resume --push-to-hub"
            ) from None
