"""Inference overhead against the bare CLIP vision forward, per precision, and throughput.

Overhead: the same 900x900 image content, but a distinct array on every run (so no cache keyed
by image content could stand in for the work). ``model.detect`` in training-free and trained
mode, with the backbone at each of ``--precisions`` (default fp32 and bf16; int8 on the CPU, ``int8:torch`` or
``int8:onnxruntime`` to name its engine, plain ``int8`` for the ``auto`` engine), against the bare
fp32 CLIP vision forward (``CLIPImageProcessor`` + ``CLIPVisionModel``): medians of rounds that
interleave all of them. The text features of a class are computed once and cached, so the
warm-up call pays for them.

    python benchmarks/bench_inference.py [--runs 5] [--batches 1,8,32] [--precisions fp32,bf16,int8:onnxruntime]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np
import torch
from transformers import CLIPImageProcessor, CLIPVisionModel

from kanoclip import KAnoCLIP
from kanoclip.precision import explain_precision

from _common import machine, vit_l_backbone


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


def overhead(
    models: dict[str, KAnoCLIP], bare: CLIPVisionModel, processor: CLIPImageProcessor, base: np.ndarray, runs: int
) -> dict:
    """Interleaved runs of the bare fp32 forward and ``detect`` of each model.

    ``models`` maps ``"mode/precision"`` to a model (they share one backbone); one round runs the
    bare forward, then every model, so machine load hits all alike. Each model computes its text
    features once, in the warm-up.
    """
    images = iter(distinct_images(base, (len(models) + 1) * (runs + 1)))
    with torch.inference_mode():
        bare(**processor(images=next(images), return_tensors="pt"))
    for model in models.values():  # warm-up, which also fills each model's text cache
        model.detect(next(images), "bottle")
    times: dict[str, list[float]] = {"bare": [], **{cell: [] for cell in models}}
    for _ in range(runs):
        image = next(images)
        start = time.perf_counter()
        with torch.inference_mode():
            bare(**processor(images=image, return_tensors="pt"))
        times["bare"].append(time.perf_counter() - start)
        for cell, model in models.items():
            image = next(images)
            start = time.perf_counter()
            model.detect(image, "bottle")
            times[cell].append(time.perf_counter() - start)
    medians = {k: statistics.median(v) for k, v in times.items()}
    return {
        "bare_fp32_s": medians["bare"],
        **{f"{cell}_detect_s": medians[cell] for cell in medians if cell != "bare"},
        **{f"{cell}_ratio_to_bare_fp32": medians[cell] / medians["bare"] for cell in medians if cell != "bare"},
    }


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
    parser.add_argument(
        "--precisions", default="fp32,bf16", help="backbone precisions to time against the bare fp32 forward"
    )
    parser.add_argument("--skip-overhead", action="store_true")
    args = parser.parse_args()

    folder = vit_l_backbone()
    base = np.asarray(np.random.default_rng(0).integers(0, 256, (900, 900, 3)), dtype=np.uint8)
    results: dict = {"machine": machine()}
    shared: dict = {}  # one fp32 backbone in memory for every precision's model (int8: one quantised copy)
    models = {}
    cells = {p: (p.partition(":")[0], p.partition(":")[2] or "auto") for p in args.precisions.split(",")}
    for p, (precision, engine) in cells.items():
        options = dict(device=args.device, precision=precision, int8_engine=engine, backbone_cache=shared)
        models[f"training-free/{p}"] = KAnoCLIP.from_pretrained(backbone=str(folder), **options)
        models[f"trained/{p}"] = KAnoCLIP.for_training(backbone=str(folder), **options).eval()
    model = models[next(m for m in models if m.startswith("trained/"))]  # the full path for throughput
    results["precisions"] = {  # what each requested precision became on this machine, on what, and why
        p: {"in_force": c.resolved, "engine": c.engine, "reason": c.reason or c.engine_reason, "warning": c.warning}
        for p, (precision, engine) in cells.items()
        for c in [explain_precision(precision, torch.device(args.device), engine)]
    }
    if not args.skip_overhead:
        bare = CLIPVisionModel.from_pretrained(folder).eval().to(args.device)
        processor = CLIPImageProcessor.from_pretrained(folder)
        results["overhead"] = overhead(models, bare, processor, base, args.runs)
        del bare
    results["throughput_images_per_s"] = {b: throughput(model, base, int(b)) for b in args.batches.split(",") if b}
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
