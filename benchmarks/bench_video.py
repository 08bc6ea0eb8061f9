"""Video speed: frames per second of a recorded clip and of the live (webcam) path, per precision.

The clip is synthetic (a bright square moving over a gradient, ``--size`` at ``--fps`` for
``--seconds``), written with PyAV. For each precision of ``--precisions`` (default fp32 and, on
the CPU, int8) it measures:

* ``clip``: :func:`kanoclip.video.detect_video` end to end — decoding, ``detect_batch`` in batches
  of ``--batch``, the overlay drawn and encoded to H.264 — as scored frames per second of wall time;
* ``live``: the Live tab's work per webcam frame without the HTTP round trip — one ``detect`` and
  the overlay of one frame at a time — as frames per second and the median latency.

Random weights at the real architecture (speed does not depend on their values): timings, never
accuracy. ``--architecture tiny`` runs the same code in seconds (the test suite's smoke test).

    python benchmarks/bench_video.py [--architecture vit-l-14-336] [--device cpu] [--precisions fp32,int8]
        [--seconds 2] [--fps 8] [--size 640x360] [--batch 8] [--live-frames 8] [--json-out FILE]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import av
import numpy as np

from kanoclip import KAnoCLIP
from kanoclip.video import VideoConfig, detect_video
from kanoclip.viz import overlay_with_colorbar

from _common import TOKENIZER, machine, vit_l_backbone


def synthetic_clip(path: Path, width: int, height: int, fps: int, seconds: float) -> int:
    """Write an H.264 clip of a square moving over a gradient; returns its frame count."""
    frames = max(1, round(fps * seconds))
    ramp = np.linspace(40, 200, width, dtype=np.float32)[None, :, None]
    base = np.broadcast_to(ramp, (height, width, 3)).astype(np.uint8)
    side = max(8, min(width, height) // 6)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for i in range(frames):
            image = base.copy()
            x = int((width - side) * i / max(frames - 1, 1))
            image[height // 3 : height // 3 + side, x : x + side] = (255, 255, 40)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")))
        container.mux(stream.encode(None))
    return frames


def clip_rate(model: KAnoCLIP, clip: Path, batch: int, overlay: Path) -> dict:
    """Scored frames per second of the whole clip path (decode, detect_batch, overlay, encode)."""
    detect_video(model, clip, "bottle", config=VideoConfig(batch_size=batch, max_seconds=0.5))  # warm-up: 0.5 s
    start = time.perf_counter()
    result = detect_video(model, clip, "bottle", config=VideoConfig(batch_size=batch, max_seconds=1e6), overlay=overlay)
    seconds = time.perf_counter() - start
    return {"frames": len(result.frames), "seconds": seconds, "frames_per_s": len(result.frames) / seconds}


def live_rate(model: KAnoCLIP, clip: Path, frames: int) -> dict:
    """Frames per second and median latency of one frame at a time (detect + overlay), as the Live tab does."""
    with av.open(str(clip)) as container:
        images = [frame.to_image() for _, frame in zip(range(frames + 1), container.decode(video=0))]
    overlay_with_colorbar(images[0], model.detect(images[0], "bottle").anomaly_map)  # warm-up
    latencies = []
    for image in images[1:]:
        start = time.perf_counter()
        overlay_with_colorbar(image, model.detect(image, "bottle").anomaly_map)
        latencies.append(time.perf_counter() - start)
    return {
        "frames": len(latencies),
        "frames_per_s": len(latencies) / sum(latencies),
        "median_latency_ms": statistics.median(latencies) * 1000,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--architecture", default="vit-l-14-336", help="vit-l-14-336 (default) or tiny (smoke tests)")
    parser.add_argument("--tokenizer", type=Path, default=TOKENIZER, help="a CLIP tokenizer folder")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precisions", default=None, help="comma-separated (default: fp32,int8 on the CPU, else bf16)")
    parser.add_argument("--seconds", type=float, default=2.0, help="clip length")
    parser.add_argument("--fps", type=int, default=8, help="clip frame rate")
    parser.add_argument("--size", default="640x360", help="clip WIDTHxHEIGHT (720p: 1280x720)")
    parser.add_argument("--batch", type=int, default=8, help="frames per detect_batch call")
    parser.add_argument("--live-frames", type=int, default=8, help="frames of the live measurement (0: skip)")
    parser.add_argument("--json-out", type=Path, help="also write the result here")
    args = parser.parse_args()
    width, height = (int(v) for v in args.size.lower().split("x"))
    default = "fp32,int8" if args.device == "cpu" else "bf16"
    precisions = (args.precisions or default).split(",")

    with tempfile.TemporaryDirectory() as tmp:
        if args.architecture == "vit-l-14-336" and args.tokenizer == TOKENIZER:
            backbone = vit_l_backbone()  # written once to the benchmarks' cache, then reused
        else:
            from kanoclip.backbone import make_random_backbone

            backbone = make_random_backbone(Path(tmp) / "backbone", args.tokenizer, architecture=args.architecture)
        clip = Path(tmp) / "clip.mp4"
        frames = synthetic_clip(clip, width, height, args.fps, args.seconds)
        result: dict = {
            "machine": machine(),
            "architecture": args.architecture,
            "device": args.device,
            "clip": {"size": f"{width}x{height}", "fps": args.fps, "frames": frames, "batch": args.batch},
            "precisions": {},
        }
        for precision in precisions:
            model = KAnoCLIP.from_pretrained(backbone=str(backbone), device=args.device, precision=precision)
            row = {"clip": clip_rate(model, clip, args.batch, Path(tmp) / f"overlay-{precision}.mp4")}
            if args.live_frames > 0:
                row["live"] = live_rate(model, clip, min(args.live_frames, frames - 1))
            result["precisions"][precision] = row
            del model
    print(json.dumps(result, indent=2))
    if args.json_out:
        args.json_out.write_text(json.dumps(result, indent=2))
    for precision, row in result["precisions"].items():
        live = row.get("live")
        text = f", live {live['frames_per_s']:.2f} frames/s ({live['median_latency_ms']:.0f} ms)" if live else ""
        print(f"{args.architecture} {precision}: clip {row['clip']['frames_per_s']:.2f} frames/s{text}")


if __name__ == "__main__":
    main()
