"""Visitors per second through the running app, with batching on and off, at several numbers of concurrent clients.

Starts ``python app.py --no-training`` on 127.0.0.1 (random ViT-L/14@336 weights by default) once
with ``KANOCLIP_BATCH_SIZE=--batch-size`` (batching on) and once with ``KANOCLIP_BATCH_SIZE=1``
(off), each with ``KANOCLIP_CONCURRENCY`` = the largest client count, so that the app's queue
lets every client in. For each client count, that many ``gradio_client`` clients (each its own
session and image) send ``--requests`` ``/detect`` calls each; visitors/s = the calls answered
÷ the wall time, everything included (upload, decoding, the model, drawing the results).
Prints JSON. Timings, never accuracy (random weights).

    python benchmarks/bench_visitors.py --device cuda [--tokenizer DIR] [--clients 1,8,32] [--requests 4]
        [--batch-size 8] [--batching on,off]

``--device cpu --architecture tiny --clients 1,2 --requests 1 --batching on`` runs the same code on
a CPU in under a minute: the test suite uses it so that the script is known to work before a GPU session runs it
(``gpu_check.sh``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from _common import REPO, TOKENIZER, machine, vit_l_backbone, wait_for_app, write_images


def visitors_per_second(url: str, images: list[Path], clients: int, requests: int) -> dict:
    """``clients`` concurrent clients, ``requests`` detections each (after one warm-up call each)."""
    from gradio_client import Client, handle_file

    sessions = [Client(url, verbose=False, download_files=False) for _ in range(clients)]

    def visitor(i: int) -> float:
        client, image = sessions[i], handle_file(str(images[i % len(images)]))
        start = time.perf_counter()
        for _ in range(requests):
            client.predict(image, "bottle", api_name="/detect")
        return (time.perf_counter() - start) / requests

    sessions[0].predict(handle_file(str(images[0])), "bottle", api_name="/detect")  # warm-up: the text cache
    with ThreadPoolExecutor(max_workers=clients) as pool:
        start = time.perf_counter()
        latencies = list(pool.map(visitor, range(clients)))
        seconds = time.perf_counter() - start
    return {
        "visitors_per_s": round(clients * requests / seconds, 2),
        "mean_latency_s": round(sum(latencies) / len(latencies), 3),
        "seconds": round(seconds, 3),
    }


def run_app(folder: Path, tmp: Path, args: argparse.Namespace, batch_size: int, port: int) -> dict:
    """Start the app with ``KANOCLIP_BATCH_SIZE=batch_size`` and measure each client count."""
    clients = [int(c) for c in args.clients.split(",")]
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("KANOCLIP_")},
        "GRADIO_ANALYTICS_ENABLED": "False",
        "HF_HUB_OFFLINE": "1",
        "GRADIO_TEMP_DIR": str(tmp / f"gradio-{batch_size}"),
        "KANOCLIP_DATA_ROOT": str(tmp / "data"),
        "KANOCLIP_CHECKPOINTS_DIR": str(tmp / "checkpoints"),
        "KANOCLIP_KB_DIR": str(tmp / "kb"),
        "KANOCLIP_CONCURRENCY": str(max(clients)),
        "KANOCLIP_BATCH_SIZE": str(batch_size),
        "KANOCLIP_BATCH_WAIT_MS": str(args.wait_ms),
    }
    command = [
        sys.executable, str(REPO / "app.py"), "--backbone", str(folder), "--device", args.device,
        "--host", "127.0.0.1", "--port", str(port), "--no-training",
    ]  # fmt: skip
    server = subprocess.Popen(command, cwd=tmp, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_app(server, port, args.timeout)
        images = write_images(tmp / "images", max(clients), args.image_size)
        url = f"http://127.0.0.1:{port}/"
        return {str(n): visitors_per_second(url, images, n, args.requests) for n in clients}
    finally:
        server.terminate()
        server.wait(30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--architecture", default="vit-l-14-336", help="vit-l-14-336, or tiny (a check of the script)")
    parser.add_argument("--clients", default="1,8,32", help="comma-separated numbers of concurrent clients")
    parser.add_argument("--requests", type=int, default=4, help="detections per client")
    parser.add_argument("--batch-size", type=int, default=8, help="KANOCLIP_BATCH_SIZE with batching on")
    parser.add_argument("--batching", default="on,off", choices=["on,off", "on", "off"], help="which runs")
    parser.add_argument("--wait-ms", type=float, default=5.0, help="KANOCLIP_BATCH_WAIT_MS")
    parser.add_argument("--image-size", type=int, default=336, help="side of the uploaded images, px")
    parser.add_argument("--port", type=int, default=7994)
    parser.add_argument("--timeout", type=float, default=600, help="seconds the app may take to come up")
    parser.add_argument("--tokenizer", type=Path, default=TOKENIZER, help="a CLIP tokenizer folder")
    parser.add_argument("--json-out", type=Path)
    args = parser.parse_args()
    from kanoclip.backbone import make_random_backbone

    with tempfile.TemporaryDirectory(prefix="kanoclip-visitors-") as tmp_dir:
        tmp = Path(tmp_dir)
        if args.architecture == "vit-l-14-336" and args.tokenizer == TOKENIZER:
            folder = vit_l_backbone()  # written once, then reused
        else:
            folder = make_random_backbone(tmp / "backbone", args.tokenizer, architecture=args.architecture)
        result: dict = {
            "machine": machine(),
            "architecture": args.architecture,
            "device": args.device,
            "requests_per_client": args.requests,
        }
        sizes = {"on": args.batch_size, "off": 1}
        for i, mode in enumerate(args.batching.split(",")):
            clients = run_app(folder, tmp, args, sizes[mode], args.port + i)
            result[f"batching_{mode}"] = {"batch_size": sizes[mode], "wait_ms": args.wait_ms, "clients": clients}
    print(json.dumps(result, indent=2))
    print("== visitors/s through the app ==")
    for key in ("batching_on", "batching_off"):
        if key in result:
            rates = ", ".join(f"{n} clients {row['visitors_per_s']}/s" for n, row in result[key]["clients"].items())
            print(f"{key.replace('_', ' ')} (batch size {result[key]['batch_size']}): {rates}")
    if args.json_out:
        args.json_out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
