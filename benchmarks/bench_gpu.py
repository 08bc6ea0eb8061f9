"""Issue 6.2 on a GPU: images per second with bf16 autocast at batch 64-256 on ViT-L/14@336.

Two figures per batch size: the model alone (``encode_image`` + ``forward`` on ready tensors:
what the GPU can do) and the full ``detect_batch`` on 336x336 uint8 arrays (decoding,
preprocessing, maps at the input's size and guidance included). Also the bare CLIP vision
forward for reference, the peak GPU memory, and whether any CLIP weights exist on the disk.
Target: at least 1,000 images/s (the backbone costs about 0.4 TFLOP per image).

    python benchmarks/bench_gpu.py --tokenizer DIR [--batches 64,128,256]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import tempfile
import time

import numpy as np
import torch

from _common import machine


def timed(fn, repeats: int) -> float:
    fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats


def model_forward(model, pixels: torch.Tensor) -> None:
    """The model alone on ready tensors: CLIP-VV, text (cached), Bi-CMCI, adapter, maps, score."""
    with torch.inference_mode(), model._autocast():
        model(model.encode_image(pixels), ["bottle"] * pixels.shape[0])


def bare_forward(model, pixels: torch.Tensor) -> None:
    """The plain CLIP vision forward, for reference."""
    with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16):
        model.clip.vision_model(pixel_values=pixels)


def weights_on_disk() -> list[str]:
    """Large safetensors files or hub caches of CLIP anywhere on the disk (the issue asks)."""
    cmd = "find / -xdev \\( -name '*.safetensors' -size +100M -o -type d -name 'models--*clip*' \\) 2>/dev/null | head -20"
    return [line for line in subprocess.run(["bash", "-c", cmd], capture_output=True, text=True).stdout.splitlines() if line]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokenizer", required=True, help="a CLIP tokenizer folder (../shared/clip_tokenizer)")
    parser.add_argument("--batches", default="64,128,256")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device")
    from kanoclip import KAnoCLIP
    from kanoclip.backbone import make_random_backbone

    result: dict = {"machine": machine(), "clip_weights_on_disk": weights_on_disk()}
    with tempfile.TemporaryDirectory() as tmp:
        folder = make_random_backbone(tmp, args.tokenizer, architecture="vit-l-14-336")
        model = KAnoCLIP.from_pretrained(backbone=str(folder), device="cuda")
    model.trained = True  # the full path: learned prompts, Bi-CMCI, adapter
    rows = {}
    for batch in (int(b) for b in args.batches.split(",")):
        pixels = torch.randn(batch, 3, 336, 336, device="cuda")
        images = [np.random.default_rng(i).integers(0, 256, (336, 336, 3), dtype=np.uint8) for i in range(batch)]
        torch.cuda.reset_peak_memory_stats()
        rows[batch] = {
            "bare_vision_images_per_s": batch / timed(lambda p=pixels: bare_forward(model, p), args.repeats),
            "model_images_per_s": batch / timed(lambda p=pixels: model_forward(model, p), args.repeats),
            "detect_batch_images_per_s": batch / timed(lambda x=images: model.detect_batch(x, "bottle"), max(1, args.repeats // 2)),
            "peak_gpu_memory_gb": torch.cuda.max_memory_allocated() / 1e9,
        }
    result["throughput"] = rows
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
