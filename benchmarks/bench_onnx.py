"""onnxruntime against torch on the CPU, on ViT-L/14@336 (random weights), and onnxruntime's int8.

Exports the trained-mode model (the full path: learned prompts, Bi-CMCI, adapter) for one class
with :func:`kanoclip.onnx.export_onnx`, quantises the export with onnxruntime's
``quantize_dynamic`` (int8 weights, activations quantised per call), then times
``KAnoCLIP.detect`` (torch, fp32) against ``OnnxDetector.detect`` on the fp32 and the int8 graph:
medians of rounds that interleave the three, on distinct 900x900 arrays, every engine with the
same number of threads. Fidelity: the int8 graph's maps against the fp32 graph's (Pearson r,
per image, then the median and the minimum) and the score's largest difference, on real images
of ../shared; and the fp32 graph against torch. Random weights: the timings are real, the
fidelity is that of quantising this network, not an accuracy.

The export (~1.2 GB) and its int8 copy go to ``--out`` (default /tmp/kanoclip-onnx-bench).

    python benchmarks/bench_onnx.py [--runs 5] [--threads N] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from kanoclip import KAnoCLIP
from kanoclip.onnx import OnnxDetector, export_onnx, sidecar_path

from _common import TOKENIZER, machine, vit_l_backbone
from bench_inference import distinct_images

CLASS = "bottle"


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a.ravel(), b.ravel())[0, 1])


def main() -> None:
    import onnxruntime as ort
    from onnxruntime.quantization import QuantType, quantize_dynamic

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument(
        "--threads",
        type=int,
        default=os.cpu_count() or 1,
        help="threads of torch and of onnxruntime (default: all cores)",
    )
    parser.add_argument("--fidelity-images", type=int, default=4, help="real images for the int8 fidelity")
    parser.add_argument("--out", type=Path, default=Path("/tmp/kanoclip-onnx-bench"))
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = KAnoCLIP.for_training(backbone=str(vit_l_backbone()), device="cpu", precision="fp32").eval()
    results: dict = {"machine": machine(), "threads": args.threads, "mode": model.mode}

    args.out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    fp32_path = export_onnx(model, [CLASS], args.out / "model.onnx")
    results["export_s"] = time.perf_counter() - start
    int8_path = args.out / "model.int8.onnx"
    start = time.perf_counter()
    quantize_dynamic(fp32_path, int8_path, weight_type=QuantType.QInt8)
    results["quantize_s"] = time.perf_counter() - start
    shutil.copyfile(sidecar_path(fp32_path), sidecar_path(int8_path))  # same classes, sizes and mode
    results["file_mb"] = {p.name: p.stat().st_size / 1e6 for p in (fp32_path, int8_path)}

    options = ort.SessionOptions()
    options.intra_op_num_threads = args.threads
    engines = {
        "torch_fp32": model.detect,
        "onnxruntime_fp32": OnnxDetector(fp32_path, session_options=options).detect,
        "onnxruntime_int8": OnnxDetector(int8_path, session_options=options).detect,
    }

    base = np.asarray(np.random.default_rng(0).integers(0, 256, (900, 900, 3)), dtype=np.uint8)
    images = iter(distinct_images(base, len(engines) * (args.runs + 1)))
    for detect in engines.values():  # warm-up (the torch model computes its text features here)
        detect(next(images), CLASS)
    times: dict[str, list[float]] = {name: [] for name in engines}
    for _ in range(args.runs):
        for name, detect in engines.items():
            image = next(images)
            start = time.perf_counter()
            detect(image, CLASS)
            times[name].append(time.perf_counter() - start)
    medians = {name: statistics.median(t) for name, t in times.items()}
    results["detect_s"] = medians
    results["speedup_vs_torch_fp32"] = {
        name: medians["torch_fp32"] / m for name, m in medians.items() if name != "torch_fp32"
    }

    real = sorted((TOKENIZER.parent / "data" / "mvtec_ad" / "bottle" / "test").rglob("*.png"))[::7][
        : args.fidelity_images
    ]
    if real:
        torch_dets = model.detect_batch(real, CLASS)
        fp32_dets = OnnxDetector(fp32_path).detect_batch(real, CLASS)
        int8_dets = OnnxDetector(int8_path).detect_batch(real, CLASS)
        r = [pearson(q.anomaly_map, f.anomaly_map) for q, f in zip(int8_dets, fp32_dets)]
        results["fidelity"] = {
            "images": len(real),
            "int8_vs_fp32_map_pearson_median": statistics.median(r),
            "int8_vs_fp32_map_pearson_min": min(r),
            "int8_vs_fp32_score_max_abs_diff": max(abs(q.score - f.score) for q, f in zip(int8_dets, fp32_dets)),
            "fp32_vs_torch_map_max_abs_diff": max(
                float(np.abs(f.anomaly_map - t.anomaly_map).max()) for f, t in zip(fp32_dets, torch_dets)
            ),
            "fp32_vs_torch_score_max_abs_diff": max(abs(f.score - t.score) for f, t in zip(fp32_dets, torch_dets)),
        }
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
