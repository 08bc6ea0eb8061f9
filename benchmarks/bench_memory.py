"""Issue 6.4: peak resident memory of the app serving ViT-L/14@336 on CPU in fp32.

Starts ``python app.py`` on 127.0.0.1 with the random full-size backbone, runs one detection
through the app's API (``gradio_client``), and reads the server process's peak resident set
size (``VmHWM`` in /proc; Linux only). Target: at most 2.5 GB.

    python benchmarks/bench_memory.py [--port 7991]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

from _common import REPO, machine, proc_status, vit_l_backbone, wait_for_app


def peak_rss_bytes(pid: int) -> int:
    return proc_status(pid, "VmHWM")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=7991)
    parser.add_argument("--timeout", type=float, default=600)
    args = parser.parse_args()
    from gradio_client import handle_file

    folder = vit_l_backbone()
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1", "KANOCLIP_DEVICE": "cpu"}
    server = subprocess.Popen(
        [
            sys.executable,
            str(REPO / "app.py"),
            "--backbone",
            str(folder),
            "--host",
            "127.0.0.1",
            "--port",
            str(args.port),
        ],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        client = wait_for_app(server, args.port, args.timeout)
        idle = peak_rss_bytes(server.pid)
        image = REPO / "demo" / "examples" / "bottle_broken_large_000.png"
        start = time.perf_counter()
        client.predict(handle_file(str(image)), "bottle", api_name="/detect")
        first = time.perf_counter() - start
        start = time.perf_counter()
        client.predict(handle_file(str(image)), "bottle", api_name="/detect")
        second = time.perf_counter() - start
        peak = peak_rss_bytes(server.pid)
        print(
            json.dumps(
                {
                    "machine": machine(),
                    "peak_rss_gb_after_start": round(idle / 1e9, 3),
                    "peak_rss_gb_after_two_detections": round(peak / 1e9, 3),
                    "first_detect_s (model load + detect)": round(first, 2),
                    "second_detect_s": round(second, 2),
                },
                indent=2,
            )
        )
    finally:
        server.terminate()
        server.wait(30)


if __name__ == "__main__":
    main()
