"""On a GPU: images per second with the backbone in bf16 at batch 64-256 on ViT-L/14@336.

Three figures per batch size: the bare CLIP vision forward (reference), the model alone
(``encode_image`` + ``forward`` on ready tensors: what the GPU can do) and the full
``detect_batch`` on 336x336 uint8 arrays (decoding, preprocessing, maps at the input's size and
guidance included). Also the FLOPs per image of the bare forward and of the model (counted with
``torch.utils.flop_counter``), the share of the chip's bf16 peak the model reaches and the peak
GPU memory. Target: at least 1,000 images/s. (``gpu_check.sh`` runs this, then looks for CLIP
weights on the machine's disk.)

    python benchmarks/bench_gpu.py --tokenizer DIR [--batches 64,128,256] [--json-out FILE]
    python benchmarks/bench_gpu.py --versions     # the library versions and the GPU, nothing else

The JSON file is rewritten each time a figure is measured, so a run cut short by a time limit
keeps every figure it reached.

``--device cpu --architecture tiny`` runs the same code on a CPU in seconds: the test suite
uses it so that the script is known to work before a GPU session spends time on it.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from _common import machine

# NVIDIA's H200 datasheet: 989 TFLOPS dense BF16 (1,979 with sparsity).
H200_BF16_DENSE_TFLOPS = 989.0


class Results(dict):
    """The figures measured so far, written to ``path`` (when given) whenever one is added."""

    def __init__(self, path: Path | None) -> None:
        super().__init__()
        self.path = path

    def __setitem__(self, key: str, value: object) -> None:
        super().__setitem__(key, value)
        self.save()

    def save(self) -> None:
        """Write the file (through a temporary one: a kill while writing leaves the previous one)."""
        if self.path is None:
            return
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(self, indent=2))
        os.replace(tmp, self.path)


def versions() -> dict[str, str]:
    """The versions a GPU result depends on: torch and its CUDA, the GPU, and the libraries."""
    from importlib.metadata import PackageNotFoundError, version

    found = {"torch": torch.__version__, "cuda": torch.version.cuda or "none (a CPU build)"}
    found["gpu"] = torch.cuda.get_device_name() if torch.cuda.is_available() else "none"
    for package in ("transformers", "huggingface_hub", "accelerate", "gradio", "onnxruntime", "onnxruntime-gpu"):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            found[package] = "not installed"
    return found


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], repeats: int, device: torch.device) -> float:
    """Mean seconds per call of ``fn`` after one warm-up call."""
    fn()
    sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    sync(device)
    return (time.perf_counter() - start) / repeats


def model_forward(model, pixels: torch.Tensor) -> None:
    """The model alone on ready tensors: CLIP-VV, text (cached), Bi-CMCI, adapter, maps, score."""
    with torch.inference_mode():  # the backbone at model.precision, the rest in fp32
        model(model.encode_image(pixels), ["bottle"] * pixels.shape[0])


def bare_forward(model, pixels: torch.Tensor) -> None:
    """The plain CLIP vision forward, for reference, under the same autocast as the model's backbone."""
    from kanoclip.precision import backbone_autocast

    with torch.inference_mode(), backbone_autocast(model.precision, model.device):
        model.model.clip.vision_model(pixel_values=pixels)


def flops_per_image(fn: Callable[[torch.Tensor], None], pixels: torch.Tensor) -> float:
    """FLOPs of ``fn`` on one image, after a warm-up call (which fills the per-class text cache,
    so the count is what every further image costs); attention through the math kernel, so that
    the counter sees it."""
    fn(pixels[:1])
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        fn(pixels[:1])
    return float(counter.get_total_flops())


def precision_grid(
    models: dict[str, object], batch: int, size: int, repeats: int, device: torch.device, grid: dict, save: Callable
) -> None:
    """``detect_batch`` images/s of each precision's model (trained mode), without references and with 4 of the
    class, into ``grid`` (``save()`` after each figure)."""
    images = [
        np.random.default_rng(1000 + i).integers(0, 256, (size, size, 3), dtype=np.uint8) for i in range(batch + 4)
    ]
    for precision, model in models.items():
        row = grid[precision] = {"in_force": model.precision}
        for k in (0, 4):
            if k:
                model.add_references("bottle", images[batch:])
            rate = batch / timed(lambda m=model: m.detect_batch(images[:batch], "bottle"), max(1, repeats // 2), device)
            row[f"detect_batch_images_per_s_{k}_references"] = rate
            save()


def onnx_cuda(model, batch: int, size: int, repeats: int) -> dict:
    """The ONNX export under onnxruntime's CUDA provider, where it is installed: images/s of the graph."""
    try:
        import onnxruntime as ort
    except ImportError:
        return {"skipped": "onnxruntime is not installed (pip install 'kanoclip[onnx]', or onnxruntime-gpu)"}
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return {
            "skipped": f"onnxruntime has no CUDA provider here (providers: {', '.join(ort.get_available_providers())})"
        }
    from kanoclip.onnx import export_onnx

    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        path = export_onnx(model, ["bottle"], Path(tmp) / "model.onnx")
        export_s = time.perf_counter() - start
        session = ort.InferenceSession(str(path), providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
        feeds = {"pixel_values": np.random.default_rng(0).standard_normal((batch, 3, size, size), dtype=np.float32),
                 "class_index": np.zeros(batch, dtype=np.int64)}  # fmt: skip
        seconds = timed(lambda: session.run(None, feeds), repeats, torch.device("cpu"))  # run() returns host arrays
    return {"export_s": export_s, "images_per_s": batch / seconds, "providers": session.get_providers()}


def summary(result: dict) -> str:
    """The lines gpu_check.sh prints at the end."""
    flops = result["flops_per_image"]
    lines = [
        result["machine"],
        f"FLOPs per image: bare vision {flops['bare_vision'] / 1e12:.3f} T, model {flops['model'] / 1e12:.3f} T",
    ]
    for batch, row in result["throughput"].items():
        lines.append(
            f"batch {batch}: bare {row['bare_vision_images_per_s']:.1f}/s, model {row['model_images_per_s']:.1f}/s "
            f"({row['model_tflops']:.0f} TFLOPS), detect_batch {row['detect_batch_images_per_s']:.1f}/s, "
            f"peak {row['peak_gpu_memory_gb']:.1f} GB"
        )
    for precision, row in result["precisions"].items():
        lines.append(
            f"precision {precision} ({row['in_force']}): "
            f"detect_batch {row['detect_batch_images_per_s_0_references']:.1f}/s, "
            f"with 4 references {row['detect_batch_images_per_s_4_references']:.1f}/s"
        )
    onnx = result["onnx_cuda"]
    lines.append(f"onnx (CUDA provider): {onnx['skipped']}" if "skipped" in onnx else
                 f"onnx (CUDA provider): {onnx['images_per_s']:.1f}/s at batch, "
                 f"export {onnx['export_s']:.0f} s")  # fmt: skip
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokenizer", help="a CLIP tokenizer folder (../shared/clip_tokenizer)")
    parser.add_argument("--versions", action="store_true", help="print the library versions and the GPU, then stop")
    parser.add_argument("--batches", default="64,128,256")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cuda")
    parser.add_argument(
        "--architecture", default="vit-l-14-336", help="vit-l-14-336 (the issue's) or tiny (smoke tests)"
    )
    parser.add_argument("--json-out", type=Path, help="also write the result here")
    parser.add_argument("--grid-batch", type=int, default=64, help="batch of the precision x references grid")
    args = parser.parse_args()
    found = versions()
    print("versions:", ", ".join(f"{k} {v}" for k, v in found.items()), flush=True)
    if args.versions:
        return
    if not args.tokenizer:
        parser.error("--tokenizer is required")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device (pass --device cpu for a smoke run)")
    from kanoclip import KAnoCLIP
    from kanoclip.backbone import make_random_backbone

    result = Results(args.json_out)
    result.update(machine=machine(), versions=found, architecture=args.architecture, device=str(device))
    result.save()
    with tempfile.TemporaryDirectory() as tmp:
        folder = make_random_backbone(tmp, args.tokenizer, architecture=args.architecture)
        shared: dict = {}  # one backbone in memory for every model below
        model = KAnoCLIP.for_training(
            backbone=str(folder), device=device, backbone_cache=shared
        ).eval()  # the full path
        grid_models = {
            p: KAnoCLIP.for_training(backbone=str(folder), device=device, precision=p, backbone_cache=shared).eval()
            for p in ("auto", "fp32", "bf16")
        }
    size = model.image_size
    probe = torch.randn(1, 3, size, size, device=device)
    result["flops_per_image"] = {
        "bare_vision": flops_per_image(lambda p: bare_forward(model, p), probe),
        "model": flops_per_image(lambda p: model_forward(model, p), probe),
    }
    rows = result["throughput"] = {}
    for batch in (int(b) for b in args.batches.split(",")):
        pixels = torch.randn(batch, 3, size, size, device=device)
        images = [np.random.default_rng(i).integers(0, 256, (size, size, 3), dtype=np.uint8) for i in range(batch)]
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        model_rate = batch / timed(lambda p=pixels: model_forward(model, p), args.repeats, device)
        rows[batch] = {
            "bare_vision_images_per_s": batch / timed(lambda p=pixels: bare_forward(model, p), args.repeats, device),
            "model_images_per_s": model_rate,
            "model_tflops": model_rate * result["flops_per_image"]["model"] / 1e12,
            "detect_batch_images_per_s": batch
            / timed(lambda x=images: model.detect_batch(x, "bottle"), max(1, args.repeats // 2), device),
            "peak_gpu_memory_gb": torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else 0.0,
        }
        rows[batch]["share_of_h200_bf16_peak"] = rows[batch]["model_tflops"] / H200_BF16_DENSE_TFLOPS
        result.save()
    result["precisions"] = {}
    precision_grid(grid_models, args.grid_batch, size, args.repeats, device, result["precisions"], result.save)
    result["onnx_cuda"] = onnx_cuda(grid_models["fp32"], args.grid_batch, size, args.repeats)
    print(json.dumps(result, indent=2))
    print("== summary ==")
    print(summary(result))


if __name__ == "__main__":
    main()
