"""Shared by the benchmarks: the full-size random ViT-L/14@336 backbone and timing helpers.

Speed does not depend on the weights' values, so every benchmark runs the real architecture
with random weights. Its figures are timings, never accuracy.
"""

from __future__ import annotations

import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
TOKENIZER = Path(os.environ.get("KANOCLIP_SHARED_DIR", REPO.parent / "shared")) / "clip_tokenizer"
CACHE = Path(os.environ.get("KANOCLIP_BENCH_CACHE", Path.home() / ".cache" / "kanoclip-bench"))


def vit_l_backbone() -> Path:
    """A random ViT-L/14@336 CLIP folder (written once, ~1.7 GB, then reused)."""
    from kanoclip.backbone import make_random_backbone

    folder = CACHE / "vit-l-14-336-random"
    if not (folder / "model.safetensors").is_file():
        if not TOKENIZER.is_dir():
            raise SystemExit(f"needs a CLIP tokenizer folder at {TOKENIZER} (set KANOCLIP_SHARED_DIR)")
        make_random_backbone(folder, TOKENIZER, architecture="vit-l-14-336", seed=0)
    return folder


def write_images(folder: Path, count: int, side: int) -> list[Path]:
    """``count`` PNGs of ``side``-pixel random images, seeded by their index: no two share their bytes."""
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        pixels = np.random.default_rng(i).integers(0, 256, (side, side, 3), dtype=np.uint8)
        paths.append(folder / f"{i:04d}.png")
        Image.fromarray(pixels).save(paths[-1])
    return paths


def median_seconds(fn: Callable[[], object], runs: int, warmup: int = 1) -> float:
    """Median wall time of ``fn`` over ``runs`` calls after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def machine() -> str:
    """One line describing where the figures were taken: host, CPU model and its relevant flags, torch, GPU, date.

    The CPU's flags (AVX2, AVX-512, VNNI, AVX512-BF16, AMX) decide how fast bf16 and int8 run,
    so a figure without them cannot be compared (``kanoclip.precision.cpu_features``).
    """
    from kanoclip.precision import cpu_features

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (
        f"{platform.node()} | {cpu_features().summary()} | {os.cpu_count()} CPUs | "
        f"torch {torch.__version__} ({torch.get_num_threads()} threads) | {device} | "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}"
    )


def proc_status(pid: int | str, key: str) -> int:
    """A ``/proc/PID/status`` field in bytes (``"VmRSS"``, ``"VmHWM"``; Linux only)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{key}:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {key} in /proc/{pid}/status")


def wait_for_app(server: subprocess.Popen, port: int, timeout: float, **client_options: object):
    """A ``gradio_client.Client`` of the app ``server`` runs on 127.0.0.1:``port``, once it answers."""
    from gradio_client import Client

    deadline = time.monotonic() + timeout
    while True:
        if server.poll() is not None or time.monotonic() > deadline:
            raise SystemExit("the app did not come up")
        try:
            return Client(f"http://127.0.0.1:{port}/", verbose=False, **client_options)
        except Exception:  # noqa: BLE001 - not listening yet
            time.sleep(2)
