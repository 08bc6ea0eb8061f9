"""Image- and pixel-level anomaly detection metrics.

Image level: AUROC, average precision and the best F1 over thresholds. Pixel level
(masks and maps of shape ``(N, H, W)``): AUROC, best F1, and AUPRO, the area under the
per-region-overlap curve up to a false-positive rate of 0.3, divided by 0.3.

The curves come from scikit-learn (``roc_auc_score``, ``average_precision_score``,
``roc_curve``, ``precision_recall_curve``). Pixel metrics sort the ~10^7 pixels once
and hand the sorted arrays to scikit-learn, whose own (stable) sort then runs in
linear time; pixel AUROC and pixel F1-max share one ``roc_curve`` pass and AUPRO makes
a second, weighted one. All six metrics on 100 maps of 336x336 take a few seconds
(``benchmarks/bench_metrics.py``).

AUPRO is computed exactly, at every distinct score: a pixel of a ground-truth region
``r`` (8-connected, per image) weighs ``1 / |r|`` and a normal pixel weighs 1, so the
weighted ROC curve's true-positive rate is the mean per-region overlap (PRO) and its
false-positive rate is the usual pixel FPR.

The public functions raise :class:`~kanoclip.errors.InputError` for bad inputs and for
inputs with one class only; :func:`compute_metrics` returns ``None`` for the latter.
"""

from __future__ import annotations

from functools import cached_property
from typing import Any

import numpy as np
from scipy import ndimage
from sklearn.metrics import (
    auc,
    average_precision_score,
    precision_recall_curve,
    roc_auc_score,
    roc_curve,
)

from kanoclip.errors import InputError

METRIC_KEYS = ("image_auroc", "image_ap", "image_f1_max", "pixel_auroc", "pixel_aupro", "pixel_f1_max")
DEFAULT_FPR_LIMIT = 0.3

# 8-connectivity inside each image, none across images of the (N, H, W) stack.
_REGION_STRUCTURE = np.zeros((3, 3, 3), dtype=bool)
_REGION_STRUCTURE[1] = True


# ------------------------------------------------------------------ input checks


def _binary(values: Any, what: str, ndim: int) -> np.ndarray:
    """``values`` as a bool array of ``ndim`` dimensions; only 0/1 or False/True allowed."""
    array = np.asarray(values)
    if array.ndim != ndim:
        raise InputError(f"{what} must have {ndim} dimension(s), got shape {array.shape}")
    if array.dtype == bool:
        return array
    if array.dtype.kind not in "biuf" or not np.isin(array, (0, 1)).all():
        raise InputError(f"{what} must hold only 0/1 (or False/True); binarize them first")
    return array.astype(bool)


def _real(values: Any, what: str, shape: tuple[int, ...]) -> np.ndarray:
    """``values`` as a finite float array of ``shape`` (float32 and float64 kept as they are)."""
    array = np.asarray(values)
    if array.dtype.kind not in "biuf":
        raise InputError(f"{what} must be numbers, got dtype {array.dtype}")
    if array.dtype == np.float16:
        array = array.astype(np.float32)  # exact
    elif array.dtype.kind != "f":
        array = array.astype(np.float64)
    if array.shape != shape:
        raise InputError(
            f"{what} has shape {array.shape} but the ground truth has {shape}; pass one score per label/pixel"
        )
    bad = int(np.count_nonzero(~np.isfinite(array)))
    if bad:
        raise InputError(f"{what} holds {bad} NaN or infinite value(s); fix the model output before scoring")
    return array


def _image_inputs(labels: Any, scores: Any) -> tuple[np.ndarray, np.ndarray]:
    y = _binary(labels, "labels", 1)
    if y.size == 0:
        raise InputError("labels is empty; score at least one normal and one anomalous image")
    return y, _real(scores, "scores", y.shape)


def _pixel_inputs(masks: Any, maps: Any) -> tuple[np.ndarray, np.ndarray]:
    m = np.asarray(masks)
    if m.ndim == 2:  # a single image
        m, maps = m[None], np.asarray(maps)[None]
    m = _binary(m, "masks", 3)
    return m, _real(maps, "maps", m.shape)


def _has_both(y: np.ndarray) -> bool:
    return bool(y.any()) and not bool(y.all())


def _require_both(y: np.ndarray, metric: str, unit: str) -> None:
    if not _has_both(y):
        which = "anomalous" if y.all() else "normal"
        raise InputError(
            f"{metric} needs both normal and anomalous {unit}s, got only {which} ones ({y.size}); "
            "evaluate on data with both (compute_metrics returns None here)"
        )


# ------------------------------------------------------------------ image level


def _f1_max(y: np.ndarray, s: np.ndarray) -> float:
    """Best F1 over all thresholds of the precision-recall curve."""
    precision, recall, _ = precision_recall_curve(y, s)
    total = precision + recall
    f1 = np.divide(2 * precision * recall, total, out=np.zeros_like(total), where=total > 0)
    return float(f1.max())


def image_auroc(labels: Any, scores: Any) -> float:
    """Area under the ROC curve of image scores (labels: 1 = anomalous)."""
    y, s = _image_inputs(labels, scores)
    _require_both(y, "image AUROC", "image")
    return float(roc_auc_score(y, s))


def image_ap(labels: Any, scores: Any) -> float:
    """Average precision of image scores (anomalous is the positive class)."""
    y, s = _image_inputs(labels, scores)
    _require_both(y, "image AP", "image")
    return float(average_precision_score(y, s))


def f1_max(labels: Any, scores: Any) -> float:
    """The best F1 of ``scores >= t`` over every threshold ``t``."""
    y, s = _image_inputs(labels, scores)
    _require_both(y, "image F1-max", "image")
    return _f1_max(y, s)


# ------------------------------------------------------------------ pixel level


class _RankedPixels:
    """All pixels sorted once by score (ascending), shared by the pixel metrics.

    Normal and anomalous pixels are sorted apart (the normal ones by value only, which
    is cheaper than an argsort) and merged by a stable sort, which finds the two
    ascending runs and merges them in linear time. scikit-learn's own stable sort of
    the already sorted scores is then linear too.
    """

    def __init__(self, masks: np.ndarray, maps: np.ndarray) -> None:
        self.masks = masks
        flat = maps.ravel()
        self.anomalous = np.flatnonzero(masks)  # flat indices of anomalous pixels
        anomalous_scores = flat[self.anomalous]
        self.anomalous_order = np.argsort(anomalous_scores)
        normal = np.sort(flat[~masks.ravel()])
        merged = np.concatenate([normal, anomalous_scores[self.anomalous_order]])
        order = np.argsort(merged, kind="stable")
        self.scores = merged[order]
        # uint8 rather than bool: scikit-learn's repeated np.unique is faster on it.
        self.labels = (order >= normal.size).view(np.uint8)

    @cached_property
    def _roc(self) -> tuple[np.ndarray, np.ndarray]:
        """FPR and TPR at every distinct score (no point dropped), from one scikit-learn pass."""
        fpr, tpr, _ = roc_curve(self.labels, self.scores, drop_intermediate=False)
        return fpr, tpr

    def auroc(self) -> float:
        fpr, tpr = self._roc
        return float(auc(fpr, tpr))

    def f1_max(self) -> float:
        """Best F1 from the ROC pass's counts: ``F1 = 2 TP / (TP + FP + P)``.

        The same thresholds and values as ``precision_recall_curve`` (the tests check
        this), without a third pass over the pixels.
        """
        fpr, tpr = self._roc
        positives = float(np.count_nonzero(self.labels))
        true_pos = tpr * positives
        false_pos = fpr * (self.labels.size - positives)
        return float(np.max(2 * true_pos / (true_pos + false_pos + positives)))

    def pro_curve(self, num_thresholds: int | None) -> tuple[np.ndarray, np.ndarray]:
        """FPR and PRO, ascending from (0, 0): at every distinct score, or on ``num_thresholds`` thresholds."""
        regions, _ = ndimage.label(self.masks, structure=_REGION_STRUCTURE)
        region_of = regions.ravel()[self.anomalous[self.anomalous_order]]  # in score order
        sizes = np.bincount(region_of)
        weights = np.ones(self.scores.size)  # a normal pixel weighs 1 ...
        weights[self.labels.view(bool)] = 1.0 / sizes[region_of]  # ... one of region r 1/|r|
        fpr, pro, thresholds = roc_curve(
            self.labels, self.scores, sample_weight=weights, drop_intermediate=num_thresholds is None
        )
        if num_thresholds is not None:
            fpr, pro = _on_grid(fpr, pro, thresholds, self.scores, num_thresholds)
        return fpr, pro

    def aupro(self, fpr_limit: float, num_thresholds: int | None) -> float:
        fpr, pro = self.pro_curve(num_thresholds)
        return _partial_area(fpr, pro, fpr_limit) / fpr_limit


def _on_grid(
    fpr: np.ndarray, pro: np.ndarray, thresholds: np.ndarray, scores: np.ndarray, count: int
) -> tuple[np.ndarray, np.ndarray]:
    """The curve at ``count`` evenly spaced thresholds from the highest score to the lowest.

    ``thresholds`` descend (the first is +inf, the (0, 0) point); at a grid value ``t``
    the state is that of the last curve threshold ``>= t``. The (0, 0) point is kept.
    """
    grid = np.linspace(scores[-1], scores[0], count)
    index = np.searchsorted(-thresholds, -grid, side="right") - 1
    return np.r_[0.0, fpr[index]], np.r_[0.0, pro[index]]


def _cut(x: np.ndarray, y: np.ndarray, limit: float) -> tuple[np.ndarray, np.ndarray]:
    """The curve ``y(x)`` for ``x`` in ``[0, limit]``; ``x`` ascends from 0.

    The curve is cut at ``limit`` by linear interpolation on the segment crossing it.
    """
    end = int(np.searchsorted(x, limit, side="right"))  # x[:end] <= limit
    xs, ys = x[:end], y[:end]
    if end < len(x) and xs[-1] < limit:
        x0, x1, y0, y1 = x[end - 1], x[end], y[end - 1], y[end]
        xs = np.append(xs, limit)
        ys = np.append(ys, y0 + (y1 - y0) * (limit - x0) / (x1 - x0))
    return xs, ys


def _partial_area(x: np.ndarray, y: np.ndarray, limit: float) -> float:
    """Trapezoidal area under ``y(x)`` for ``x`` in ``[0, limit]`` (:func:`_cut`)."""
    xs, ys = _cut(x, y, limit)
    return float(np.trapezoid(ys, xs))


def _check_fpr_limit(fpr_limit: float) -> float:
    if not 0 < fpr_limit <= 1:
        raise InputError(f"fpr_limit must be in (0, 1], got {fpr_limit}; the usual value is 0.3")
    return float(fpr_limit)


def _check_num_thresholds(num_thresholds: int | None) -> int | None:
    if num_thresholds is not None and (int(num_thresholds) != num_thresholds or num_thresholds < 2):
        raise InputError(f"num_thresholds must be an integer >= 2 or None (exact), got {num_thresholds!r}")
    return None if num_thresholds is None else int(num_thresholds)


def _ranked(masks: Any, maps: Any, metric: str) -> _RankedPixels:
    m, s = _pixel_inputs(masks, maps)
    _require_both(m, metric, "pixel")
    return _RankedPixels(m, s)


def pixel_auroc(masks: Any, maps: Any) -> float:
    """Area under the ROC curve of all pixels (masks: bool ``(N, H, W)``, maps: float)."""
    return _ranked(masks, maps, "pixel AUROC").auroc()


def pixel_f1_max(masks: Any, maps: Any) -> float:
    """The best pixel F1 of ``maps >= t`` over every threshold ``t``."""
    return _ranked(masks, maps, "pixel F1-max").f1_max()


def aupro(
    masks: Any,
    maps: Any,
    fpr_limit: float = DEFAULT_FPR_LIMIT,
    num_thresholds: int | None = None,
) -> float:
    """Area under the per-region-overlap curve for FPR in ``[0, fpr_limit]``, over ``fpr_limit``.

    Regions are the 8-connected components of each image's mask; PRO at a threshold is
    the mean over all regions of the fraction of the region scored ``>=`` it, and FPR
    the fraction of normal pixels scored ``>=`` it. ``num_thresholds=None`` evaluates
    every distinct score (exact); an integer evaluates that many evenly spaced
    thresholds between the highest and lowest score, as many published scripts do.
    """
    limit = _check_fpr_limit(fpr_limit)
    count = _check_num_thresholds(num_thresholds)
    return _ranked(masks, maps, "AUPRO").aupro(limit, count)


def pro_curve(masks: Any, maps: Any, fpr_limit: float = DEFAULT_FPR_LIMIT) -> tuple[np.ndarray, np.ndarray]:
    """The per-region-overlap curve that :func:`aupro` integrates, up to ``fpr_limit``.

    Returns:
        ``(fpr, pro)``, ascending from (0, 0), at every distinct score, the last point cut at
        ``fpr_limit``: ``np.trapezoid(pro, fpr) / fpr_limit`` is the exact AUPRO.
    """
    limit = _check_fpr_limit(fpr_limit)
    fpr, pro = _ranked(masks, maps, "the PRO curve").pro_curve(None)
    return _cut(fpr, pro, limit)


# ------------------------------------------------------------------ everything


def compute_metrics(
    labels: Any,
    scores: Any,
    masks: Any | None = None,
    maps: Any | None = None,
    *,
    fpr_limit: float = DEFAULT_FPR_LIMIT,
) -> dict[str, float | None]:
    """All six metrics, keyed by :data:`METRIC_KEYS`.

    Pixel metrics are None when ``masks`` is None (a dataset without pixel ground
    truth); a metric whose inputs hold one class only (no anomalous image, no
    anomalous pixel) is None rather than an error. ``masks`` and ``maps`` are
    ``(N, H, W)``, one per label.
    """
    y, s = _image_inputs(labels, scores)
    limit = _check_fpr_limit(fpr_limit)
    result: dict[str, float | None] = dict.fromkeys(METRIC_KEYS)
    if _has_both(y):
        result["image_auroc"] = float(roc_auc_score(y, s))
        result["image_ap"] = float(average_precision_score(y, s))
        result["image_f1_max"] = _f1_max(y, s)
    if masks is None:
        return result
    if maps is None:
        raise InputError("pixel metrics need anomaly maps with the masks; pass maps, or masks=None")
    m, p = _pixel_inputs(masks, maps)
    if len(m) != len(y):
        raise InputError(f"got {len(m)} masks for {len(y)} labels; pass one mask and map per image")
    if _has_both(m):
        ranked = _RankedPixels(m, p)
        result["pixel_auroc"] = ranked.auroc()
        result["pixel_aupro"] = ranked.aupro(limit, None)
        result["pixel_f1_max"] = ranked.f1_max()
    return result
