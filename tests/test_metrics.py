"""Metrics: agreement with scikit-learn, brute-force F1, a slow AUPRO reference, properties."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import ndimage
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score

from kanoclip.errors import InputError
from kanoclip.evaluation import (
    METRIC_KEYS,
    aupro,
    compute_metrics,
    f1_max,
    image_ap,
    image_auroc,
    pixel_auroc,
    pixel_f1_max,
)
from kanoclip.evaluation.metrics import pro_curve

# ------------------------------------------------------------------ references


def brute_f1_max(labels: np.ndarray, scores: np.ndarray) -> float:
    """Best F1 of ``scores >= t`` over every distinct score ``t``, by a plain loop."""
    labels = np.asarray(labels, bool)
    best = 0.0
    for t in np.unique(scores):
        predicted = scores >= t
        tp = np.sum(predicted & labels)
        fp = np.sum(predicted & ~labels)
        fn = np.sum(~predicted & labels)
        best = max(best, 2 * tp / (2 * tp + fp + fn))
    return best


def reference_aupro(masks: np.ndarray, maps: np.ndarray, limit: float = 0.3, thresholds=None) -> float:
    """AUPRO the slow, obvious way: loop thresholds, per-region overlap, FPR, trapezoids."""
    regions = []
    for index in range(len(masks)):
        labelled, count = ndimage.label(masks[index], structure=np.ones((3, 3)))
        regions += [(index, labelled == r) for r in range(1, count + 1)]
    normal = ~masks
    if thresholds is None:
        thresholds = np.unique(maps)[::-1]  # every distinct score, highest first
    points = [(0.0, 0.0)]
    for t in thresholds:
        predicted = maps >= t
        fpr = np.sum(predicted & normal) / np.sum(normal)
        pro = np.mean([np.sum(predicted[i] & region) / np.sum(region) for i, region in regions])
        points.append((fpr, pro))
    area = 0.0
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        if x0 >= limit:
            break
        if x1 > limit:  # cut the segment at the limit
            y1 = y0 + (y1 - y0) * (limit - x0) / (x1 - x0)
            x1 = limit
        area += (x1 - x0) * (y0 + y1) / 2
    return area / limit


def random_pixels(seed: int, n: int = 3, size: int = 12, levels: int | None = None):
    """Masks with a few blobs (some images normal) and maps correlated with them."""
    rng = np.random.default_rng(seed)
    masks = np.zeros((n, size, size), bool)
    for index in range(n - 1):  # the last image stays normal
        for _ in range(rng.integers(1, 4)):
            y, x = rng.integers(0, size - 2, 2)
            h, w = rng.integers(1, 4, 2)
            masks[index, y : y + h, x : x + w] = True
    maps = rng.random(masks.shape) + 0.6 * masks
    if levels is not None:  # coarse values: many ties
        maps = np.round(maps * levels) / levels
    return masks, maps


# ------------------------------------------------------------------ image level


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("ties", [False, True])
def test_image_metrics_agree_with_sklearn(seed: int, ties: bool) -> None:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, 60)
    labels[:2] = [0, 1]
    scores = rng.random(60) + 0.3 * labels
    if ties:
        scores = np.round(scores * 4)
    assert image_auroc(labels, scores) == pytest.approx(roc_auc_score(labels, scores), abs=1e-6)
    assert image_ap(labels, scores) == pytest.approx(average_precision_score(labels, scores), abs=1e-6)
    assert f1_max(labels, scores) == pytest.approx(brute_f1_max(labels, scores), abs=1e-9)


def test_image_metrics_edge_cases() -> None:
    assert image_auroc([0, 1], [0.2, 0.8]) == 1.0
    assert image_auroc([0, 1], [0.8, 0.2]) == 0.0
    assert image_auroc([0, 1, 0, 1], [0.5] * 4) == 0.5  # all tied
    assert f1_max([0, 1, 1], [1, 1, 1]) == pytest.approx(0.8)  # one threshold, everything positive
    assert image_ap([True, False, True], np.array([3, 1, 2], np.int64)) == 1.0  # bool labels, int scores


def test_one_class_or_bad_input_raises() -> None:
    for function in (image_auroc, image_ap, f1_max):
        with pytest.raises(InputError, match="both normal and anomalous"):
            function([1, 1, 1], [0.1, 0.2, 0.3])
    with pytest.raises(InputError, match="shape"):
        image_auroc([0, 1], [0.1, 0.2, 0.3])
    with pytest.raises(InputError, match="NaN"):
        image_auroc([0, 1], [0.1, float("nan")])
    with pytest.raises(InputError, match="0/1"):
        image_auroc([0, 2], [0.1, 0.2])
    with pytest.raises(InputError, match="empty"):
        image_auroc([], [])


# ------------------------------------------------------------------ pixel level


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_pixel_auroc_and_f1_agree_with_sklearn(seed: int, dtype: type) -> None:
    masks, maps = random_pixels(seed, n=4, size=16, levels=20 if seed % 2 else None)
    maps = maps.astype(dtype)
    y, s = masks.ravel(), maps.ravel()
    assert pixel_auroc(masks, maps) == pytest.approx(roc_auc_score(y, s), abs=1e-6)
    precision, recall, _ = precision_recall_curve(y, s)
    sk_f1 = np.max(2 * precision * recall / np.maximum(precision + recall, 1e-300))
    assert pixel_f1_max(masks, maps) == pytest.approx(sk_f1, abs=1e-9)
    assert pixel_f1_max(masks, maps) == pytest.approx(brute_f1_max(y, s), abs=1e-9)


@pytest.mark.parametrize("seed", range(6))
def test_aupro_matches_slow_reference(seed: int) -> None:
    masks, maps = random_pixels(seed, levels=10 if seed % 2 else None)
    expected = reference_aupro(masks, maps)
    assert aupro(masks, maps) == pytest.approx(expected, abs=1e-9)
    assert aupro(masks, maps.astype(np.float32)) == pytest.approx(expected, abs=1e-3)
    for limit in (0.05, 1.0):
        assert aupro(masks, maps, fpr_limit=limit) == pytest.approx(reference_aupro(masks, maps, limit), abs=1e-9)


@pytest.mark.parametrize("seed", range(3))
def test_pro_curve_is_the_curve_aupro_integrates(seed: int) -> None:
    masks, maps = random_pixels(seed, levels=10 if seed % 2 else None)
    limit = 0.3
    fpr, pro = pro_curve(masks, maps, limit)
    assert fpr[0] == 0.0 and pro[0] == 0.0 and fpr[-1] == pytest.approx(limit) and np.all(np.diff(fpr) >= 0)
    assert np.trapezoid(pro, fpr) / limit == pytest.approx(reference_aupro(masks, maps, limit), abs=1e-9)
    # each point below the limit is (FPR, mean region overlap) of the map thresholded at some score
    normal = ~masks
    regions = []
    for index in range(len(masks)):
        labelled, count = ndimage.label(masks[index], structure=np.ones((3, 3)))
        regions += [(index, labelled == r) for r in range(1, count + 1)]
    points = []
    for t in np.unique(maps):
        predicted = maps >= t
        overlap = np.mean([np.sum(predicted[i] & region) / np.sum(region) for i, region in regions])
        points.append((np.sum(predicted & normal) / np.sum(normal), overlap))
    points = np.array(points)
    for x, y in zip(fpr[1:-1], pro[1:-1]):
        assert np.min(np.abs(points - (x, y)).max(axis=1)) < 1e-12, (x, y)


@pytest.mark.parametrize("count", [2, 7, 50])
def test_aupro_on_a_threshold_grid_matches_reference(count: int) -> None:
    masks, maps = random_pixels(11)
    grid = np.linspace(maps.max(), maps.min(), count)
    expected = reference_aupro(masks, maps, thresholds=grid)
    assert aupro(masks, maps, num_thresholds=count) == pytest.approx(expected, abs=1e-9)
    # with many thresholds the grid approaches the exact value
    assert aupro(masks, maps, num_thresholds=4000) == pytest.approx(aupro(masks, maps), abs=2e-3)


def test_aupro_counts_regions_not_pixels() -> None:
    masks = np.zeros((1, 10, 10), bool)
    masks[0, 0:6, 0:6] = True  # a big region, found
    masks[0, 8, 8] = True  # a one-pixel region, missed
    maps = np.where(masks, 1.0, 0.2)
    maps[0, 8, 8] = 0.1  # below every normal pixel: it enters only at FPR 1
    maps[0, 9, 0] = 0.5
    # PRO is 0.5 (one region of two) from FPR 0 until FPR 1: the normalised area is 0.5.
    assert aupro(masks, maps) == pytest.approx(0.5)
    assert aupro(masks, maps) == pytest.approx(reference_aupro(masks, maps))
    assert pixel_auroc(masks, maps) < 1.0
    diagonal = np.zeros((1, 4, 4), bool)
    diagonal[0, [0, 1], [0, 1]] = True  # 8-connected: one region
    assert aupro(diagonal, diagonal * 1.0) == 1.0


def test_perfect_and_reversed_maps() -> None:
    masks, _ = random_pixels(3)
    perfect = masks.astype(float)
    assert pixel_auroc(masks, perfect) == 1.0
    assert pixel_f1_max(masks, perfect) == 1.0
    assert aupro(masks, perfect) == pytest.approx(1.0)
    assert aupro(masks, -perfect) == pytest.approx(0.0)
    assert pixel_auroc(masks[0], perfect[0]) == 1.0  # a single (H, W) image
    assert pixel_auroc(masks.astype(np.uint8), perfect.astype(np.float16)) == 1.0


def test_pixel_input_errors() -> None:
    masks, maps = random_pixels(0)
    with pytest.raises(InputError, match="shape"):
        pixel_auroc(masks, maps[:, :5])
    with pytest.raises(InputError, match="both normal and anomalous"):
        aupro(np.zeros_like(masks), maps)
    with pytest.raises(InputError, match="fpr_limit"):
        aupro(masks, maps, fpr_limit=0)
    with pytest.raises(InputError, match="num_thresholds"):
        aupro(masks, maps, num_thresholds=1)
    with pytest.raises(InputError, match="infinite"):
        pixel_f1_max(masks, np.where(masks, np.inf, 0.0))


# ------------------------------------------------------------------ compute_metrics


def test_compute_metrics_all_keys_and_values() -> None:
    masks, maps = random_pixels(5, n=4)
    labels = masks.reshape(4, -1).any(axis=1).astype(int)
    scores = maps.reshape(4, -1).max(axis=1)
    result = compute_metrics(labels, scores, masks, maps)
    assert tuple(result) == METRIC_KEYS
    assert result["image_auroc"] == pytest.approx(roc_auc_score(labels, scores))
    assert result["image_ap"] == pytest.approx(average_precision_score(labels, scores))
    assert result["image_f1_max"] == pytest.approx(brute_f1_max(labels, scores))
    assert result["pixel_auroc"] == pytest.approx(roc_auc_score(masks.ravel(), maps.ravel()))
    assert result["pixel_aupro"] == pytest.approx(reference_aupro(masks, maps))
    assert result["pixel_f1_max"] == pytest.approx(brute_f1_max(masks.ravel(), maps.ravel()))
    assert all(isinstance(v, float) for v in result.values())


def test_compute_metrics_degenerate_cases_give_none() -> None:
    image_only = compute_metrics([0, 1, 1], [0.1, 0.5, 0.9])
    assert image_only["image_auroc"] == 1.0
    assert [image_only[k] for k in ("pixel_auroc", "pixel_aupro", "pixel_f1_max")] == [None] * 3
    masks, maps = random_pixels(1)
    one_class = compute_metrics([1, 1, 1], [0.1, 0.2, 0.3], masks, maps)
    assert [one_class[k] for k in ("image_auroc", "image_ap", "image_f1_max")] == [None] * 3
    assert one_class["pixel_aupro"] is not None
    no_defect_pixels = compute_metrics([0, 1, 0], [0.1, 0.2, 0.3], np.zeros_like(masks), maps)
    assert no_defect_pixels["pixel_auroc"] is None and no_defect_pixels["image_auroc"] == 0.5
    assert compute_metrics([0, 1, 0], [0.1, 0.2, 0.3], None, maps)["pixel_auroc"] is None
    with pytest.raises(InputError, match="maps"):
        compute_metrics([0, 1, 0], [0.1, 0.2, 0.3], masks, None)
    with pytest.raises(InputError, match="masks for"):
        compute_metrics([0, 1], [0.1, 0.2], masks, maps)


# ------------------------------------------------------------------ properties


scores_and_labels = st.integers(2, 40).flatmap(
    lambda n: st.tuples(
        st.lists(st.integers(0, 1), min_size=n, max_size=n).filter(lambda y: 0 < sum(y) < n),
        st.lists(st.integers(-50, 50), min_size=n, max_size=n),  # small integers: many ties
    )
)


@settings(max_examples=60, deadline=None, database=None)
@given(scores_and_labels)
def test_auroc_properties(data: tuple[list[int], list[int]]) -> None:
    labels, scores = np.array(data[0]), np.array(data[1], dtype=np.float64)
    value = image_auroc(labels, scores)
    assert 0.0 <= value <= 1.0
    assert value == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    assert image_auroc(labels, -scores) == pytest.approx(1.0 - value, abs=1e-9)
    for monotone in (scores**3 + 2 * scores, np.exp(scores / 10)):  # strictly increasing, exact here
        assert image_auroc(labels, monotone) == pytest.approx(value, abs=1e-9)
        assert f1_max(labels, monotone) == pytest.approx(f1_max(labels, scores), abs=1e-9)
    assert 0.0 <= f1_max(labels, scores) <= 1.0 and 0.0 <= image_ap(labels, scores) <= 1.0


@settings(max_examples=25, deadline=None, database=None)
@given(st.integers(0, 10_000), st.floats(0.05, 1.0))
def test_aupro_properties(seed: int, limit: float) -> None:
    masks, maps = random_pixels(seed, n=2, size=8, levels=5 if seed % 3 == 0 else None)
    value = aupro(masks, maps, fpr_limit=limit)
    assert 0.0 <= value <= 1.0 + 1e-12
    assert aupro(masks, np.exp(maps) * 3 - 1, fpr_limit=limit) == pytest.approx(value, abs=1e-9)
    assert value == pytest.approx(reference_aupro(masks, maps, limit), abs=1e-9)
