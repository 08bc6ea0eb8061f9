"""Time the six metrics on a synthetic evaluation of realistic size.

Default: 100 anomaly maps of 336x336 (11.3 M pixels, the paper's input size), half
the images anomalous with a few elliptical defects each, maps = smoothed noise plus
a bump on the defects (float32, as a model would give). Prints the time of each pixel
metric alone and of ``compute_metrics`` (all six, one shared sort).

    python benchmarks/bench_metrics.py [--images 100] [--size 336] [--repeat 1]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
from scipy import ndimage

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

from kanoclip.evaluation.metrics import aupro, compute_metrics, pixel_auroc, pixel_f1_max  # noqa: E402


def synthetic(images: int, size: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Labels, scores, masks (bool) and maps (float32) for ``images`` square images."""
    rng = np.random.default_rng(seed)
    labels = (np.arange(images) % 2).astype(np.int64)
    masks = np.zeros((images, size, size), dtype=bool)
    rows, cols = np.mgrid[0:size, 0:size]
    for index in np.flatnonzero(labels):
        for _ in range(rng.integers(1, 4)):
            cy, cx = rng.integers(0, size, 2)
            ry, rx = rng.integers(size // 40 + 1, size // 8 + 2, 2)
            masks[index] |= ((rows - cy) / ry) ** 2 + ((cols - cx) / rx) ** 2 <= 1
    noise = rng.standard_normal(masks.shape).astype(np.float32)
    maps = ndimage.uniform_filter(noise, size=(1, 5, 5)) + 0.4 * masks
    scores = maps.reshape(images, -1).max(axis=1) + rng.normal(0, 0.3, images)
    return labels, scores, masks, maps.astype(np.float32)


def timed(function, *args, **kwargs) -> tuple[object, str]:
    """The value of the call, and its wall-clock and CPU seconds (they differ on a busy machine)."""
    wall, cpu = time.perf_counter(), time.process_time()
    value = function(*args, **kwargs)
    return value, f"{time.perf_counter() - wall:6.2f} s (CPU {time.process_time() - cpu:.2f} s)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=100)
    parser.add_argument("--size", type=int, default=336)
    parser.add_argument("--repeat", type=int, default=1)
    args = parser.parse_args()
    labels, scores, masks, maps = synthetic(args.images, args.size)
    print(
        f"{args.images} maps of {args.size}x{args.size} = {masks.size / 1e6:.1f} M pixels, {masks.mean():.1%} anomalous"
    )
    for name, function in (("pixel_auroc", pixel_auroc), ("pixel_f1_max", pixel_f1_max), ("aupro", aupro)):
        value, seconds = timed(function, masks, maps)
        print(f"  {name:<14} {value:.4f}  {seconds}")
    for _ in range(args.repeat):
        result, seconds = timed(compute_metrics, labels, scores, masks, maps)
        values = "  ".join(f"{key}={value:.4f}" for key, value in result.items() if value is not None)
        print(f"compute_metrics (all six): {seconds}   {values}")


if __name__ == "__main__":
    main()
