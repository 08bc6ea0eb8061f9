"""The host (CPU) side of ``detect_batch`` per image: everything but the model's forward.

On a GPU this work runs on the CPU before and after each forward, so it caps ``detect_batch``
at ``1000 / total_ms`` images per second whatever the chip (issue 6.2 asks for 1,000/s). It is
measured with the tiny random backbone run at 336 px, so images, maps and copies have
ViT-L/14@336's sizes, and with the forward replaced by its own precomputed output:

* ``load_image``: decoding the inputs (336x336 uint8 arrays, as in bench_gpu.py);
* ``pixel_values``: resizing, stacking and normalising the batch (on the CPU here; on a GPU the
  normalisation runs on the device);
* ``after_forward``: the rest of ``detect_batch`` (copies of scores and maps, maps at the
  input's size, guidance ranking, the results).

    python benchmarks/bench_host.py [--batch 128] [--runs 5]
"""

from __future__ import annotations

import argparse
import json
import tempfile

import numpy as np

from _common import TOKENIZER, machine, median_seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    from kanoclip import KAnoCLIP
    from kanoclip.backbone import make_random_backbone
    from kanoclip.config import KAnoCLIPConfig
    from kanoclip.images import load_image

    with tempfile.TemporaryDirectory() as tmp:
        folder = make_random_backbone(tmp, TOKENIZER, architecture="tiny")
        model = KAnoCLIP.for_training(config=KAnoCLIPConfig(backbone=str(folder), image_size=336), device="cpu").eval()
    arrays = [np.random.default_rng(i).integers(0, 256, (336, 336, 3), dtype=np.uint8) for i in range(args.batch)]
    images = [load_image(a) for a in arrays]
    computed = model.infer(images, ["bottle"] * args.batch)
    model.infer = lambda *a, **k: computed  # the forward's own output, so only the host's work is timed

    per_image = {
        "load_image": median_seconds(lambda: [load_image(a) for a in arrays], args.runs),
        "pixel_values": median_seconds(lambda: model.pixel_values(images), args.runs),
        "after_forward": median_seconds(lambda: model.detect_batch(images, "bottle"), args.runs),
    }
    ms = {k: 1e3 * v / args.batch for k, v in per_image.items()}
    ms["total"] = sum(ms.values())
    result = {"machine": machine(), "batch": args.batch, "ms_per_image": ms, "images_per_s_ceiling": 1e3 / ms["total"]}
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
