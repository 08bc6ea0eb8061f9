"""Issue 18's "done when": threads sharing one model each get what the same detect gets alone.

On the tiny random CLIP with real MVTec-AD bottle test images (from ../shared): one model per
mode with ``--references`` normal references of ``bottle``, ``--threads`` threads released
together run ``--detects`` detections per round (the images in turn), for ``--rounds`` rounds.
Every result is compared with the same detect run alone: the map within 1e-5 and the score
within 1e-6 (fp32). Prints JSON: per mode, the results compared, how many differed and the
largest gaps; exits 1 when any differed. (Before the fix: 197 of 288 differed, map gap 0.146.)

    python benchmarks/check_threads.py [--threads 4] [--detects 24] [--rounds 6] [--references 2]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch

from _common import REPO, TOKENIZER, machine

BOTTLE = Path(os.environ.get("KANOCLIP_SHARED_DIR", REPO.parent / "shared")) / "data" / "mvtec_ad" / "bottle" / "test"
MAP_TOLERANCE, SCORE_TOLERANCE = 1e-5, 1e-6


def check_mode(model, images: list[Path], threads: int, detects: int, rounds: int) -> dict:
    """Compare every threaded detect of ``model`` with its lone result."""
    alone = {image: model.detect(image, "bottle") for image in images}
    map_gaps: list[float] = []
    score_gaps: list[float] = []
    lock = threading.Lock()
    for _ in range(rounds):
        barrier = threading.Barrier(threads)

        def work(start: int) -> None:
            barrier.wait()
            for i in range(start, detects, threads):
                image = images[i % len(images)]
                got, want = model.detect(image, "bottle"), alone[image]
                with lock:
                    map_gaps.append(float(np.abs(got.anomaly_map - want.anomaly_map).max()))
                    score_gaps.append(abs(got.score - want.score))

        workers = [threading.Thread(target=work, args=(t,)) for t in range(threads)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
    differed = sum(m > MAP_TOLERANCE or s > SCORE_TOLERANCE for m, s in zip(map_gaps, score_gaps))
    return {
        "results": len(map_gaps),
        "differed": differed,
        "max_map_gap": max(map_gaps),
        "max_score_gap": max(score_gaps),
        "reference_count": alone[images[0]].reference_count,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=4)
    parser.add_argument("--detects", type=int, default=24, help="detections per round")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--references", type=int, default=2, help="normal references of bottle added to each model")
    parser.add_argument("--images", type=int, default=8, help="distinct test images")
    args = parser.parse_args()
    if not BOTTLE.is_dir() or not TOKENIZER.is_dir():
        raise SystemExit(f"needs the MVTec-AD bottle images at {BOTTLE} and a tokenizer at {TOKENIZER}")
    from kanoclip import KAnoCLIP
    from kanoclip.backbone import make_random_backbone

    tests = sorted(
        p for kind in ("broken_large", "broken_small", "contamination") for p in (BOTTLE / kind).glob("*.png")
    )
    good = sorted((BOTTLE / "good").glob("*.png"))
    images = (tests[:: max(1, len(tests) // args.images)] + good)[: args.images]
    report = {"machine": machine(), **vars(args)}
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="kanoclip-threads-") as tmp:
        folder = make_random_backbone(Path(tmp) / "tiny", TOKENIZER, architecture="tiny", seed=0)
        cache: dict = {}
        torch.manual_seed(0)
        models = {
            "training-free": KAnoCLIP.from_pretrained(backbone=str(folder), device="cpu", backbone_cache=cache),
            "trained": KAnoCLIP.for_training(backbone=str(folder), device="cpu", backbone_cache=cache).eval(),
        }
        for mode, model in models.items():
            model.add_references("bottle", good[-args.references :])
            report[mode] = check_mode(model, images, args.threads, args.detects, args.rounds)
    report["seconds"] = round(time.perf_counter() - start, 1)
    print(json.dumps(report, indent=2))
    sys.exit(1 if any(report[mode]["differed"] for mode in models) else 0)


if __name__ == "__main__":
    main()
