"""Issue 6.1 and 6.2: inference overhead against the bare CLIP vision forward, and throughput.

Overhead: the same 900x900 image content, but a distinct array on every run (so no cache keyed
by image content could stand in for the work), fp32 on CPU. ``model.detect`` against the bare
CLIP vision forward (``CLIPImageProcessor`` + ``CLIPVisionModel``), medians of interleaved runs,
in training-free and trained mode. The text features of a class are computed once and cached, so
the warm-up call pays for them.

    python benchmarks/bench_inference.py [--runs 5] [--batches 1,8,32] [--device cpu]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np
import torch
from transformers import CLIPImageProcessor, CLIPVisionModel

from _common import machine, vit_l_backbone
from kanoclip import KAnoCLIP


def distinct_images(base: np.ndarray, n: int, seed: int = 0) -> list[np.ndarray]:
    """``n`` arrays with the same content up to one flipped pixel value each (all distinct)."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        image = base.copy()
        y, x = rng.integers(0, base.shape[0]), rng.integers(0, base.shape[1])
        image[y, x] = (image[y, x].astype(np.int64) + 1 + i) % 256
        out.append(image)
    return out


def overhead(model: KAnoCLIP, bare: CLIPVisionModel, processor: CLIPImageProcessor, base: np.ndarray, runs: int) -> dict:
    images = iter(distinct_images(base, 2 * runs + 4))
    model.detect(next(images), "bottle")  # warm-up (also fills the text-feature cache)
    with torch.inference_mode():
        bare(**processor(images=next(images), return_tensors="pt"))
    ours, theirs = [], []
    for _ in range(runs):  # interleaved, so load on the machine hits both alike
        image = next(images)
        start = time.perf_counter()
        with torch.inference_mode():
            bare(**processor(images=image, return_tensors="pt"))
        theirs.append(time.perf_counter() - start)
        image = next(images)
        start = time.perf_counter()
        model.detect(image, "bottle")
        ours.append(time.perf_counter() - start)
    detect_s, bare_s = statistics.median(ours), statistics.median(theirs)
    return {"detect_s": detect_s, "bare_s": bare_s, "ratio": detect_s / bare_s}


def throughput(model: KAnoCLIP, base: np.ndarray, batch: int, repeats: int = 2) -> float:
    images = distinct_images(base, batch * (repeats + 1), seed=batch)
    model.detect_batch(images[:batch], "bottle")  # warm-up
    start = time.perf_counter()
    for r in range(1, repeats + 1):
        model.detect_batch(images[r * batch : (r + 1) * batch], "bottle")
    return batch * repeats / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--batches", default="1,8,32")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--skip-overhead", action="store_true")
    args = parser.parse_args()

    folder = vit_l_backbone()
    base = np.asarray(np.random.default_rng(0).integers(0, 256, (900, 900, 3)), dtype=np.uint8)
    results: dict = {"machine": machine()}
    model = KAnoCLIP.from_pretrained(backbone=str(folder), device=args.device)
    if not args.skip_overhead:
        bare = CLIPVisionModel.from_pretrained(folder).eval().to(args.device)
        processor = CLIPImageProcessor.from_pretrained(folder)
        results["overhead_training_free"] = overhead(model, bare, processor, base, args.runs)
        model.trained = True
        model.clear_text_cache()
        results["overhead_trained"] = overhead(model, bare, processor, base, args.runs)
        del bare
    results["throughput_images_per_s"] = {b: throughput(model, base, int(b)) for b in args.batches.split(",")}
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
