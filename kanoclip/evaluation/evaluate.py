"""Zero-shot evaluation over datasets, per class and as each dataset's mean (paper Tables 1-2).

``evaluate(model, [(kind, root), ...])`` runs the model over every test image in batches and
scores each class with :func:`~kanoclip.evaluation.metrics.compute_metrics`; a dataset's
``mean`` is the mean over its classes (the papers' convention), each metric over the classes
that have it. ``format_report`` lays the result out as a markdown table.

Evaluation resolution: maps are compared with masks at the model's input size S×S (336 for
ViT-L/14@336px): the model's maps are S×S, and each mask is resized to S×S with
nearest-neighbour. One class is held in memory at a time: its S×S float32 maps and bool
masks, 5·S² bytes per image (0.56 MB at S = 336; MTD's 1 344 images take 760 MB).

Pixel metrics exist for a class when at least one of its images has a mask file; its normal
images then count as all-normal masks. Classes without any mask (HeadCT, Br35H, ...) get
``None`` pixel metrics, shown as ``-``.

Sweeps (``sweep(model, datasets, {"name": {"dotted.path": value}, ...})``): every variant is the
model with some config overrides (:meth:`kanoclip.KAnoCLIP.variant`); they share one backbone
forward per image (each V-V path length among them is computed from that forward), then each
runs its own text side, fusion, maps and metrics. One class's maps are held per variant.

Several processes (``accelerate launch -m kanoclip eval``; ``processes=``, a
:class:`~kanoclip.distributed.Processes`): each class's images are split into one contiguous
part per process; each process predicts its part, and the scores and S×S maps are gathered in
rank order, so that the main process holds the single process's arrays and computes the metrics
as it does. Every process returns the main process's results.

An ``observer`` (``evaluate(..., observer=fn)``, also :func:`sweep`'s) is called on the main
process with each class's :class:`ClassPredictions` (its samples, ground truth, scores, maps and
metrics) while they are held: the report folder (:mod:`kanoclip.evaluation.report`) draws its
figures from them.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kanoclip.config import flatten_overrides
from kanoclip.data import Sample, group_by_class, load_dataset, load_mask
from kanoclip.distributed import Processes
from kanoclip.errors import InputError
from kanoclip.evaluation.metrics import METRIC_KEYS, compute_metrics
from kanoclip.images import load_image

ProgressFn = Callable[[int, int], None]  # (images done, images in all)


@dataclass(frozen=True)
class ClassPredictions:
    """One class as its metrics saw it, handed to an ``observer`` (e.g. the report's figures).

    ``predictions`` and ``metrics`` are keyed by model name (``""`` for :func:`evaluate`, the
    variant names for :func:`sweep`); ``predictions`` holds each model's scores ``(N,)`` and S×S
    maps ``(N, S, S)`` in the order of ``samples``; ``masks`` is None where the class has none.
    """

    dataset: str
    class_name: str
    samples: Sequence[Sample]
    labels: np.ndarray
    masks: np.ndarray | None
    predictions: Mapping[str, tuple[np.ndarray, np.ndarray]]
    metrics: Mapping[str, Mapping[str, Any]]


ClassObserver = Callable[[ClassPredictions], None]

RANDOM_WARNING = "random backbone: figures are plumbing, not accuracy"
_HEADERS = ("image AUROC", "image AP", "image F1-max", "pixel AUROC", "pixel AUPRO", "pixel F1-max")


def predict(
    models: Mapping[str, Any],
    samples: Sequence[Sample],
    *,
    batch_size: int = 16,
    on_batch: Callable[[int], None] | None = None,
    references: Any = None,
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Each model's image scores ``(N,)`` and S×S anomaly maps ``(N, S, S)`` (float32) of ``samples``.

    ``models`` are a model and its variants (they share a backbone, input size and stage
    layers): each batch takes one backbone forward, shared by all of them. No ``samples``
    give empty arrays. ``references`` (a :class:`~kanoclip.references.References`; default each
    model's own) are fused into the maps and scores of their classes.
    """
    first = next(iter(models.values()))
    lengths = sorted({m.model.num_replaced_blocks() for m in models.values()})
    size = first.image_size
    # empty arrays to start from: a process's part of a small class may hold no sample
    results: dict[str, tuple[list, list]] = {
        name: ([np.zeros(0, np.float32)], [np.zeros((0, size, size), np.float32)]) for name in models
    }
    for start in range(0, len(samples), batch_size):
        batch = samples[start : start + batch_size]
        classes = [first.canonical_class(s.class_name)[0] for s in batch]
        pixels = first.pixel_values([load_image(s.image) for s in batch])
        with torch.inference_mode():
            paths = first.model.encode_image_paths(pixels, lengths)
            for name, model in models.items():
                out = model(paths[model.model.num_replaced_blocks()], classes, references=references)
                results[name][0].append(out.score.clamp(0, 1).cpu().numpy())
                results[name][1].append(out.anomaly_map.cpu().numpy())
        if on_batch is not None:
            on_batch(len(batch))
    return {name: (np.concatenate(scores), np.concatenate(maps)) for name, (scores, maps) in results.items()}


def class_ground_truth(samples: Sequence[Sample], size: int) -> tuple[np.ndarray, np.ndarray | None]:
    """Labels ``(N,)`` and, when any sample has a mask file, bool masks ``(N, size, size)``."""
    labels = np.array([s.label for s in samples], dtype=np.int64)
    if not any(s.mask is not None for s in samples):
        return labels, None
    return labels, np.stack([load_mask(s, (size, size)) for s in samples])


def _mean(rows: list[dict[str, Any]]) -> dict[str, float | None]:
    mean: dict[str, float | None] = {}
    for key in METRIC_KEYS:
        values = [row[key] for row in rows if row[key] is not None]
        mean[key] = float(np.mean(values)) if values else None
    return mean


def _unique_key(kind: str, taken: dict[str, Any]) -> str:
    key, n = kind, 2
    while key in taken:
        key, n = f"{kind}#{n}", n + 1
    return key


def evaluate(
    model: Any,
    datasets: Sequence[tuple[str | None, str | Path]],
    *,
    batch_size: int = 16,
    progress: ProgressFn | None = None,
    processes: Processes | None = None,
    observer: ClassObserver | None = None,
) -> dict[str, Any]:
    """Per-class metrics and each dataset's mean, as ``{"datasets": {KIND: {"classes": .., "mean": ..}}}``.

    Args:
        model: the loaded :class:`~kanoclip.KAnoCLIP`.
        datasets: ``(kind, root)`` pairs (kind None: detected).
        batch_size: images per backbone forward (per process).
        progress: called with (images done, images in all) after each batch; with several
            processes the count is estimated from this process's part until each class ends.
        processes: the processes that share the images (None: this one alone).
        observer: called on the main process with each class's :class:`ClassPredictions` once
            its metrics are computed (while its maps are still held).

    Returns:
        Metrics as fractions in [0, 1]; ``None`` where undefined. The same on every process.
    """
    return _evaluate_models(
        {"": model}, datasets, batch_size=batch_size, progress=progress, processes=processes, observer=observer
    )[""]


def sweep(
    model: Any,
    datasets: Sequence[tuple[str | None, str | Path]],
    variants: Mapping[str, Mapping[str, Any]],
    *,
    batch_size: int = 16,
    progress: ProgressFn | None = None,
    processes: Processes | None = None,
    observer: ClassObserver | None = None,
) -> dict[str, Any]:
    """:func:`evaluate` for several config variants of ``model`` on one backbone forward per image.

    Args:
        model: the loaded model (training-free or a checkpoint); the variants' base.
        datasets: ``(kind, root)`` pairs, as for :func:`evaluate`.
        variants: ``{"variant name": {"dotted.path": value, ...}}`` (an empty mapping is the
            base model itself), e.g. ``{"last": {"training_free.stage_weights": [0, 0, 0, 1]}}``.
        batch_size: images per backbone forward.
        progress: called with (images done, images in all) after each batch.
        processes: the processes that share the images, as for :func:`evaluate`.
        observer: as for :func:`evaluate`, with every variant's predictions and metrics.

    Returns:
        ``{"variants": {name: {"overrides": {...}, "datasets": ...}}}``, each like :func:`evaluate`'s.
    """
    if not variants:
        raise InputError('the sweep has no variants; give at least one, e.g. {"base": {}}')
    models = {}
    for name, overrides in variants.items():
        try:
            flat = flatten_overrides(overrides, where=f"sweep variant {name!r}")
        except ValueError as exc:
            raise InputError(str(exc)) from None
        models[name] = model.variant(flat)
    results = _evaluate_models(
        models, datasets, batch_size=batch_size, progress=progress, processes=processes, observer=observer
    )
    return {"variants": {name: {"overrides": flatten_overrides(variants[name]), **results[name]} for name in models}}


def _evaluate_models(
    models: Mapping[str, Any],
    datasets: Sequence[tuple[str | None, str | Path]],
    *,
    batch_size: int,
    progress: ProgressFn | None,
    processes: Processes | None = None,
    observer: ClassObserver | None = None,
) -> dict[str, dict[str, Any]]:
    """:func:`evaluate`'s results for each of ``models`` (a model and its variants)."""
    procs = processes or Processes("cpu", alone=True)
    first = next(iter(models.values()))
    listed = [(kind, load_dataset(kind, root)) for kind, root in datasets]
    total = sum(len(samples) for _, samples in listed)
    done = 0  # images of the classes finished so far (by all processes)

    results: dict[str, dict[str, Any]] = {name: {"datasets": {}} for name in models}
    for kind, samples in listed:
        key = _unique_key(kind or samples[0].dataset, results[next(iter(models))]["datasets"])
        classes: dict[str, dict[str, dict[str, Any]]] = {name: {} for name in models}
        for class_name, group in group_by_class(samples).items():
            counted = 0  # of this process's part

            def on_batch(count: int, before: int = done, size: int = len(group)) -> None:
                nonlocal counted
                counted += count
                if progress is not None:  # the parts differ by one image at most
                    progress(before + min(size, counted * procs.world), total)

            predictions = _gathered(
                procs, predict(models, procs.shard(group), batch_size=batch_size, on_batch=on_batch)
            )
            done += len(group)
            if progress is not None and procs.world > 1:  # one process reported it exactly already
                progress(done, total)
            if not procs.is_main:
                continue
            labels, masks = class_ground_truth(group, first.image_size)
            counts = {"n_normal": int((labels == 0).sum()), "n_anomalous": int((labels == 1).sum())}
            for name, (scores, maps) in predictions.items():
                classes[name][class_name] = {
                    **counts,
                    **compute_metrics(labels, scores, masks, maps if masks is not None else None),
                }
            if observer is not None:
                metrics = {name: classes[name][class_name] for name in models}
                observer(ClassPredictions(key, class_name, group, labels, masks, predictions, metrics))
            del predictions, masks
        if procs.is_main:
            for name in models:
                results[name]["datasets"][key] = {"classes": classes[name], "mean": _mean(list(classes[name].values()))}
    return procs.broadcast(results)


def _gathered(
    procs: Processes, predictions: dict[str, tuple[np.ndarray, np.ndarray]]
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Every process's :func:`predict` results of its part, concatenated in rank order, on the main
    process only (the others get an empty dict: they compute no metrics)."""
    if procs.world == 1:
        return predictions
    parts = procs.gather_to_main([predictions])
    return (
        {name: tuple(np.concatenate([part[name][i] for part in parts]) for i in (0, 1)) for name in predictions}
        if parts
        else {}
    )


def _cell(value: float | None) -> str:
    return "-" if value is None or not math.isfinite(value) else f"{100 * value:.1f}"


def _report_header(title: str, model: Any) -> list[str]:
    mode = f"trained checkpoint `{model.checkpoint_name}`" if model.checkpoint_name else f"{model.mode}"
    lines = [f"# {title}", ""]
    if model.random_backbone:
        lines += [f"> **{RANDOM_WARNING}**", ""]
    return lines + [
        f"- model: {mode}, backbone precision {model.precision}",
        f"- backbone: `{model.backbone_name}`" + (" (randomly initialised)" if model.random_backbone else ""),
        f"- maps and masks compared at {model.image_size}x{model.image_size}; "
        "values in %, `-` where a dataset has no pixel masks",
        "",
    ]


def format_report(results: dict[str, Any], model: Any) -> str:
    """A markdown report: one row per class and a mean row per dataset (values in %)."""
    lines = _report_header("KAnoCLIP evaluation", model)
    lines += [
        "| dataset | class | n_normal | n_anomalous | " + " | ".join(_HEADERS) + " |",
        "|---|---|---:|---:|" + "---:|" * len(_HEADERS),
    ]
    for kind, entry in results["datasets"].items():
        classes = entry["classes"]
        for name, row in classes.items():
            cells = [_cell(row[k]) for k in METRIC_KEYS]
            lines.append(f"| {kind} | {name} | {row['n_normal']} | {row['n_anomalous']} | " + " | ".join(cells) + " |")
        n_normal = sum(row["n_normal"] for row in classes.values())
        n_anomalous = sum(row["n_anomalous"] for row in classes.values())
        cells = [_cell(entry["mean"][k]) for k in METRIC_KEYS]
        lines.append(
            f"| {kind} | **mean** | {n_normal} | {n_anomalous} | " + " | ".join(f"**{c}**" for c in cells) + " |"
        )
    return "\n".join(lines) + "\n"


def format_sweep_report(results: dict[str, Any], model: Any) -> str:
    """A markdown table of a :func:`sweep`: one row per variant and dataset (its mean over classes)."""
    lines = _report_header("KAnoCLIP sweep", model)
    lines += [
        "| variant | dataset | " + " | ".join(_HEADERS) + " | overrides |",
        "|---|---|" + "---:|" * len(_HEADERS) + "---|",
    ]
    for name, entry in results["variants"].items():
        overrides = ", ".join(f"`{k}={json.dumps(v)}`" for k, v in entry["overrides"].items()) or "(base)"
        for kind, dataset in entry["datasets"].items():
            cells = [_cell(dataset["mean"][k]) for k in METRIC_KEYS]
            lines.append(f"| {name} | {kind} | " + " | ".join(cells) + f" | {overrides} |")
    return "\n".join(lines) + "\n"
