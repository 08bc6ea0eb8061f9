"""Issue 6.3: time per training epoch with and without the frozen-feature cache (ViT-L/14@336).

Generates a dataset in the generic ``folder`` layout (normal / anomalous images with masks; the
images' content is irrelevant to speed), then times ``kanoclip.training.train`` epoch by epoch
from its progress reports: with the cache, epoch 1 fills it and later epochs reuse it; without
it every epoch runs the backbone again. MVTec-AD's test split has 1,725 images; on a 2-core CPU
an epoch over all of them takes hours, so ``--images`` picks a subset and the figures are also
given per image. To check that the per-image figure holds for 1,725 images, where the cache
outgrows its 4 GiB memory budget and spills to disk, it also times reading cached features of
that many images (ViT-L sizes) from memory and from disk.

    python benchmarks/bench_training.py [--images 48] [--epochs 3] [--batch-size 8] [--device cpu] [--skip-epochs]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from kanoclip.training import TrainConfig, TrainProgress, train

from _common import machine, vit_l_backbone


def make_dataset(root: Path, n: int, size: int = 400) -> Path:
    """``n`` images, half anomalous with a painted square and its mask."""
    rng = np.random.default_rng(0)
    for sub in ("normal", "anomalous", "masks"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    for i in range(n):
        image = rng.integers(60, 200, (size, size, 3), dtype=np.uint8)
        if i % 2:
            y, x = rng.integers(0, size - 60, 2)
            image[y : y + 60, x : x + 60] = (250, 20, 20)
            mask = np.zeros((size, size), np.uint8)
            mask[y : y + 60, x : x + 60] = 255
            Image.fromarray(image).save(root / "anomalous" / f"{i:04d}.png")
            Image.fromarray(mask).save(root / "masks" / f"{i:04d}.png")
        else:
            Image.fromarray(image).save(root / "normal" / f"{i:04d}.png")
    return root


def epoch_times(
    data: Path, out: Path, backbone: Path, epochs: int, batch: int, cache: bool, device: str
) -> list[float]:
    marks: dict[int, float] = {}

    def progress(p: TrainProgress) -> None:
        if p.epoch >= 1 and p.epoch not in marks:
            marks[p.epoch] = time.perf_counter()  # first step of the epoch done

    start = time.perf_counter()
    train(
        TrainConfig(
            data=[f"folder={data}"],
            out=out,
            epochs=epochs,
            batch_size=batch,
            backbone=str(backbone),
            device=device,
            feature_cache=cache,
        ),
        progress=progress,
    )
    end = time.perf_counter()
    # epoch e spans from the end of epoch e-1's last step to the end of its own last step;
    # approximate the boundaries by the first-step marks (one step's time moves between epochs)
    bounds = [start] + [marks[e] for e in sorted(marks)[1:]] + [end]
    return [b - a for a, b in zip(bounds, bounds[1:])]


def cache_read_ms(images: int, batch: int, folder: Path) -> dict:
    """Milliseconds per image to read a batch of cached ViT-L/14@336 features from memory and
    from disk, with ``images`` images cached under the default memory budget (the rest spill)."""
    import torch

    from kanoclip.modeling.vv_attention import VisualFeatures
    from kanoclip.training.feature_cache import FeatureCache

    cache = FeatureCache(folder)
    for start in range(0, images, batch):
        indices = list(range(start, min(start + batch, images)))
        n = len(indices)  # random values: reading speed does not depend on them
        cache.put(indices, VisualFeatures(torch.randn(n, 768), [torch.randn(n, 576, 768) for _ in range(4)], (24, 24)))
    # equal chunks fill the memory budget first, then every later chunk spills to disk
    in_memory, on_disk = list(range(images - cache.on_disk)), list(range(images - cache.on_disk, images))

    def per_image(indices: list[int]) -> float | None:
        if not indices:
            return None
        batches = [indices[k : k + batch] for k in range(0, len(indices), batch)]
        start = time.perf_counter()
        for chunk in batches:
            cache.get(chunk)
        return 1e3 * (time.perf_counter() - start) / len(indices)

    result = {
        "images": images,
        "in_memory": len(in_memory),
        "on_disk": len(on_disk),
        "memory_ms_per_image": per_image(in_memory),
        "disk_ms_per_image": per_image(on_disk),
    }
    cache.clear()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=48)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--cache-read-images",
        type=int,
        default=1725,
        help="also time reading this many cached images' features (0: skip)",
    )
    parser.add_argument("--skip-epochs", action="store_true", help="only the cache-read figures")
    args = parser.parse_args()
    if args.cache_read_images:
        with tempfile.TemporaryDirectory() as tmp:
            reads = cache_read_ms(args.cache_read_images, args.batch_size, Path(tmp))
        print(json.dumps({"machine": machine(), "feature_cache_reads": reads}, indent=2))
    if args.skip_epochs:
        return
    backbone = vit_l_backbone()
    with tempfile.TemporaryDirectory() as tmp:
        data = make_dataset(Path(tmp) / "generated", args.images)
        cached = epoch_times(data, Path(tmp) / "cached", backbone, args.epochs, args.batch_size, True, args.device)
        uncached = epoch_times(data, Path(tmp) / "uncached", backbone, 2, args.batch_size, False, args.device)
    later = cached[1:]
    print(
        json.dumps(
            {
                "machine": machine(),
                "images": args.images,
                "with_cache_epoch_s": cached,
                "without_cache_epoch_s": uncached,
                "speedup_of_cached_epochs": (sum(uncached) / len(uncached)) / (sum(later) / len(later)),
                "per_image_s": {
                    "uncached": sum(uncached) / len(uncached) / args.images,
                    "cached": sum(later) / len(later) / args.images,
                },
                "extrapolated_1725_images_epoch_s": {
                    "uncached": sum(uncached) / len(uncached) / args.images * 1725,
                    "cached": sum(later) / len(later) / args.images * 1725,
                },
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
