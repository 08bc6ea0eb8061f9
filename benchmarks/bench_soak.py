"""Issue 12 §2: the app's memory and open files over a long run of new classes, ViT-L/14@336 on CPU.

Starts ``python app.py --no-training`` on 127.0.0.1 with the random full-size backbone and sends
``--calls`` detections through its API (``gradio_client``), each naming a class no earlier call
named (a miss of the model's per-class text cache) with a 48x48 image whose bytes no other call
sends. It reads the server's resident memory (``VmRSS``) and open file descriptors from /proc
(Linux only) after start, after ``--warmup`` calls and at the end, and prints JSON.
``tests/test_app_soak.py`` runs the same procedure with the tiny backbone and 2,000 calls; here a
detection costs ~3 s on a 2-core CPU, so the default is 300. The model keeps up to 256 classes
(``config.cache.max_classes``): within the first 256 calls its class caches are still filling.

    python benchmarks/bench_soak.py [--calls 300] [--warmup 100] [--port 7992]

``--architecture tiny`` runs the same on the tiny random CLIP in seconds (a check of the script).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import REPO, TOKENIZER, machine, proc_status, vit_l_backbone, wait_for_app, write_images

IMAGE_SIDE = 48


def resident_mb(pid: int) -> float:
    """The process's resident set size (``VmRSS``), in MB."""
    return proc_status(pid, "VmRSS") / 1e6


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=300)
    parser.add_argument("--warmup", type=int, default=100, help="calls before the second reading")
    parser.add_argument("--port", type=int, default=7992)
    parser.add_argument("--timeout", type=float, default=600, help="seconds the app may take to come up")
    parser.add_argument(
        "--architecture", default="vit-l-14-336", help="vit-l-14-336 (the issue's) or tiny (a check of the script)"
    )
    args = parser.parse_args()
    if not 0 < args.warmup < args.calls:
        raise SystemExit(f"--warmup must be between 1 and --calls - 1 ({args.calls - 1}), got {args.warmup}")
    if not Path("/proc/self/status").is_file():
        raise SystemExit("reads the server's memory and open files from /proc (Linux); /proc is absent here")
    from gradio_client import handle_file

    from kanoclip.backbone import make_random_backbone

    with tempfile.TemporaryDirectory(prefix="kanoclip-soak-") as tmp_dir:
        tmp = Path(tmp_dir)
        if args.architecture == "vit-l-14-336":
            folder = vit_l_backbone()
        else:
            folder = make_random_backbone(tmp / "backbone", TOKENIZER, architecture=args.architecture)
        (tmp / "images").mkdir()
        images = write_images(tmp / "images", args.calls, IMAGE_SIDE)
        env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("KANOCLIP_")},
            "GRADIO_ANALYTICS_ENABLED": "False",
            "HF_HUB_OFFLINE": "1",
            "GRADIO_TEMP_DIR": str(tmp / "gradio"),  # uploads and results, deleted with the folder
            "KANOCLIP_DATA_ROOT": str(tmp / "data"),
            "KANOCLIP_CHECKPOINTS_DIR": str(tmp / "checkpoints"),
            "KANOCLIP_KB_DIR": str(tmp / "kb"),
        }
        command = [
            sys.executable,
            str(REPO / "app.py"),
            "--backbone",
            str(folder),
            "--device",
            "cpu",
            "--host",
            "127.0.0.1",
            "--port",
            str(args.port),
            "--no-training",
        ]
        server = subprocess.Popen(command, cwd=tmp, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            client = wait_for_app(server, args.port, args.timeout, download_files=False)
            readings = {"after_start": (resident_mb(server.pid), open_fds(server.pid))}
            start = time.perf_counter()
            for i in range(args.calls):
                client.predict(handle_file(str(images[i])), f"widget {i}", api_name="/detect")
                if i + 1 == args.warmup:
                    readings["after_warmup"] = (resident_mb(server.pid), open_fds(server.pid))
            seconds = time.perf_counter() - start
            readings["end"] = (resident_mb(server.pid), open_fds(server.pid))
        finally:
            server.terminate()
            server.wait(30)
    (rss_start, fds_start), (rss_warm, fds_warm), (rss_end, fds_end) = readings.values()
    print(
        json.dumps(
            {
                "machine": machine(),
                "architecture": args.architecture,
                "calls": args.calls,
                "warmup_calls": args.warmup,
                "rss_mb_after_start": round(rss_start, 1),
                "rss_mb_after_warmup": round(rss_warm, 1),
                "rss_mb_end": round(rss_end, 1),
                "rss_growth_mb_after_warmup": round(rss_end - rss_warm, 1),
                "open_fds_after_start": fds_start,
                "open_fds_after_warmup": fds_warm,
                "open_fds_end": fds_end,
                "seconds": round(seconds, 1),
                "seconds_per_call": round(seconds / args.calls, 3),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
