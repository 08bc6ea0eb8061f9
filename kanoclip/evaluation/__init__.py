"""Evaluation: image- and pixel-level anomaly detection metrics."""

from kanoclip.evaluation.metrics import (
    METRIC_KEYS,
    aupro,
    compute_metrics,
    f1_max,
    image_ap,
    image_auroc,
    pixel_auroc,
    pixel_f1_max,
    pro_curve,
)

__all__ = [
    "METRIC_KEYS",
    "aupro",
    "compute_metrics",
    "f1_max",
    "image_ap",
    "image_auroc",
    "pixel_auroc",
    "pixel_f1_max",
    "pro_curve",
]
