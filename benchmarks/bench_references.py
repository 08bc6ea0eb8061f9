"""k-shot references on ViT-L/14@336 (random weights): memory of the bank, and detect's time with references.

Memory: the bank's own bytes (fp16, n_stages x k·576 x 768) and the process's resident memory
before and after adding 16 references (also after ``malloc_trim``, which hands back the pages the
allocator keeps from the encoding batches' activations). Time: ``detect`` on a 900x900 image without references
and with 4 (medians of interleaved rounds, one model each, sharing the backbone), in the
training-free mode (the default) and the trained mode.

``--calibrate N`` measures instead the peak resident memory of ``calibrate`` on N images (PNG
files of the input size, 0.33 normal / 0.67 labelled anomalous) against the process's memory just
before it (peak reset through ``/proc/self/clear_refs``), beside what N images' features would take
if they were held: calibrate keeps only scores, so the peak should not grow with N.

    python benchmarks/bench_references.py [--runs 5] [--device cpu]
    python benchmarks/bench_references.py --calibrate 500 [--device cpu]
"""

from __future__ import annotations

import argparse
import ctypes
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from kanoclip import KAnoCLIP

from _common import machine, proc_status, vit_l_backbone
from bench_inference import distinct_images


def rss_mb(trim: bool = False) -> float:
    """Resident memory in MiB; ``trim``: after handing the allocator's free pages back (glibc malloc_trim)."""
    if trim:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    return proc_status("self", "VmRSS") / 2**20


def calibrate_memory(folder: Path, count: int, device: str) -> dict:
    """Peak resident memory of ``calibrate`` on ``count`` images of the input size, read from files."""
    model = KAnoCLIP.from_pretrained(backbone=str(folder), device=device)
    rng = np.random.default_rng(1)
    size = model.image_size
    with tempfile.TemporaryDirectory() as tmp:
        paths = []
        for i in range(count):
            path = Path(tmp) / f"{i:04d}.png"
            Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(path)
            paths.append(str(path))
        labels = [int(i % 3 != 0) for i in range(count)]
        model.calibrate("bottle", paths[:2], [0, 1])  # text features and a first forward, before measuring
        before = rss_mb(trim=True)
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS from here
        start = time.perf_counter()
        model.calibrate("bottle", paths, labels)
        seconds = time.perf_counter() - start
        peak = proc_status("self", "VmHWM") / 2**20
    per_image = sum(s.numel() for s in model.encode_image(model.pixel_values([Image.new("RGB", (size, size))])).stages)
    return {
        "images": count,
        "rss_before_mb": before,
        "peak_growth_mb": peak - before,
        "features_if_held_mb": count * per_image * 4 / 2**20,  # fp32 stage tokens of every image
        "seconds": seconds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--calibrate", type=int, metavar="N", help="measure calibrate's peak memory on N images")
    args = parser.parse_args()
    folder = vit_l_backbone()
    if args.calibrate:
        print(json.dumps({"machine": machine(), "calibrate": calibrate_memory(folder, args.calibrate, args.device)}))
        return
    base = np.asarray(np.random.default_rng(0).integers(0, 256, (900, 900, 3)), dtype=np.uint8)
    images = distinct_images(base, 64)
    shared: dict = {}
    result: dict = {"machine": machine()}

    memory_model = KAnoCLIP.from_pretrained(backbone=str(folder), device=args.device, backbone_cache=shared)
    memory_model.detect(images[63], "bottle")  # the class's text features and a first forward, before measuring
    before = rss_mb(trim=True)
    refs = memory_model.add_references("bottle", images[:16])
    peak_growth = rss_mb() - before
    result["memory_16_references"] = {
        "bank_mb": sum(t.numel() * t.element_size() for t in refs.bank if t is not None) / 2**20,
        "rss_growth_mb": peak_growth,  # includes the encoding batches' activations the allocator still holds
        "rss_growth_after_trim_mb": rss_mb(trim=True) - before,  # what the references keep
        "stages": sum(t is not None for t in refs.bank),  # the stages the mode reads
    }

    cells: dict[str, KAnoCLIP] = {}
    for mode in ("training-free", "trained"):
        for k in (0, 4):
            build = KAnoCLIP.from_pretrained if mode == "training-free" else KAnoCLIP.for_training
            model = build(backbone=str(folder), device=args.device, backbone_cache=shared).eval()
            if k:
                model.add_references("bottle", images[16 : 16 + k])
            cells[f"{mode}/{k} references"] = model
    stream = iter(images[20:])
    for model in cells.values():
        model.detect(next(stream), "bottle")  # warm-up: text features
    times: dict[str, list[float]] = {cell: [] for cell in cells}
    for _ in range(args.runs):
        image = next(stream)
        for cell, model in cells.items():
            start = time.perf_counter()
            model.detect(image, "bottle")
            times[cell].append(time.perf_counter() - start)
    medians = {cell: statistics.median(v) for cell, v in times.items()}
    result["detect_s"] = medians
    result["added_time_4_references"] = {
        mode: medians[f"{mode}/4 references"] / medians[f"{mode}/0 references"] - 1
        for mode in ("training-free", "trained")
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
