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
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from kanoclip.data import Sample, group_by_class, load_dataset, load_mask
from kanoclip.evaluation.metrics import METRIC_KEYS, compute_metrics
from kanoclip.images import load_image

ProgressFn = Callable[[int, int], None]  # (images done, images in all)

RANDOM_WARNING = "random backbone: figures are plumbing, not accuracy"
_HEADERS = ("image AUROC", "image AP", "image F1-max", "pixel AUROC", "pixel AUPRO", "pixel F1-max")


def predict(
    model: Any, samples: Sequence[Sample], *, batch_size: int = 16, on_batch: Callable[[int], None] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Image scores ``(N,)`` and S×S anomaly maps ``(N, S, S)`` (float32) of ``samples``."""
    scores, maps = [], []
    for start in range(0, len(samples), batch_size):
        batch = samples[start : start + batch_size]
        images = [load_image(s.image) for s in batch]
        out, _ = model.infer(images, [model.canonical_class(s.class_name)[0] for s in batch])
        scores.append(out.score.float().clamp(0, 1).cpu().numpy())
        maps.append(out.anomaly_map.float().cpu().numpy())
        if on_batch is not None:
            on_batch(len(batch))
    return np.concatenate(scores), np.concatenate(maps)


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
) -> dict[str, Any]:
    """Per-class metrics and each dataset's mean, as ``{"datasets": {KIND: {"classes": .., "mean": ..}}}``.

    ``datasets`` holds ``(kind, root)`` pairs (kind None: detected). ``progress(done, total)``
    is called after each batch. Metrics are fractions in [0, 1]; ``None`` where undefined.
    """
    listed = [(kind, load_dataset(kind, root)) for kind, root in datasets]
    total = sum(len(samples) for _, samples in listed)
    done = 0

    def on_batch(count: int) -> None:
        nonlocal done
        done += count
        if progress is not None:
            progress(done, total)

    results: dict[str, Any] = {"datasets": {}}
    for kind, samples in listed:
        classes: dict[str, dict[str, Any]] = {}
        for name, group in group_by_class(samples).items():
            scores, maps = predict(model, group, batch_size=batch_size, on_batch=on_batch)
            labels, masks = class_ground_truth(group, model.image_size)
            metrics = compute_metrics(labels, scores, masks, maps if masks is not None else None)
            classes[name] = {"n_normal": int((labels == 0).sum()), "n_anomalous": int((labels == 1).sum()), **metrics}
            del maps, masks
        key = _unique_key(kind or samples[0].dataset, results["datasets"])
        results["datasets"][key] = {"classes": classes, "mean": _mean(list(classes.values()))}
    return results


def _cell(value: float | None) -> str:
    return "-" if value is None or not math.isfinite(value) else f"{100 * value:.1f}"


def format_report(results: dict[str, Any], model: Any) -> str:
    """A markdown report: one row per class and a mean row per dataset (values in %)."""
    mode = f"trained checkpoint `{model.checkpoint_name}`" if model.checkpoint_name else f"{model.mode}"
    lines = ["# KAnoCLIP evaluation", ""]
    if model.random_backbone:
        lines += [f"> **{RANDOM_WARNING}**", ""]
    lines += [
        f"- model: {mode}",
        f"- backbone: `{model.backbone_name}`" + (" (randomly initialised)" if model.random_backbone else ""),
        f"- maps and masks compared at {model.image_size}x{model.image_size}; values in %, `-` where a dataset has no pixel masks",
        "",
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
        lines.append(f"| {kind} | **mean** | {n_normal} | {n_anomalous} | " + " | ".join(f"**{c}**" for c in cells) + " |")
    return "\n".join(lines) + "\n"
