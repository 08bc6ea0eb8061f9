"""A long run of the app in bounded memory (issue 12 §2): 2,000 detections, each of a new class.

``python app.py`` runs as a subprocess on the tiny random CLIP, and gradio_client sends it
2,000 ``/detect`` calls. Every call names a class no earlier call named (so it misses the
model's per-class text cache and fills a new entry) and uploads an image whose bytes no other
call sends (so every upload and every result is a new file in Gradio's cache). The server's
resident memory (``VmRSS``) and open file descriptors are read from /proc after a warm-up that
fills the model's class caches and at the end: a cache or a file handle kept per request would
show as growth over the remaining 1,700 calls. Linux only (it needs /proc).
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

gradio_client = pytest.importorskip("gradio_client")
from gradio_client import Client, handle_file  # noqa: E402
from test_app import free_port  # noqa: E402

from kanoclip.config import CacheConfig  # noqa: E402

from conftest import REPO  # noqa: E402

CALLS = 2000
WARMUP = 300  # more than the model's 256 cached classes: after it, every class cache is full
STEP = 100  # calls between two readings of the server's memory
CLIENTS = 2  # the app's default concurrency: one request is drawn while the other is computed
IMAGE_SIDE = 48
MAX_RSS_GROWTH_MB = 50.0
# A finished request's sockets may still be open for a moment (keep-alive connections of each
# client, the server's side of an event stream closing), so a reading can be off by a few; a
# descriptor kept per request would add hundreds over the run.
FD_SLACK = 5


def class_name(i: int) -> str:
    return f"widget {i}"


def write_images(folder: Path, count: int) -> list[Path]:
    """``count`` PNGs of random pixels (seeded by their index): no two share their bytes."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        pixels = np.random.default_rng(i).integers(0, 256, (IMAGE_SIDE, IMAGE_SIDE, 3), dtype=np.uint8)
        path = folder / f"{i:04d}.png"
        Image.fromarray(pixels).save(path)
        paths.append(path)
    return paths


def resident_mb(pid: int) -> float:
    """The process's resident set size (``VmRSS``), in MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024 / 1e6
    raise AssertionError(f"no VmRSS in /proc/{pid}/status")


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


@dataclass
class Server:
    process: subprocess.Popen
    url: str
    output: Path

    def tail(self) -> str:
        return self.output.read_text(errors="replace")[-2000:]


@contextlib.contextmanager
def serve(tmp_path: Path, backbone: Path) -> Iterator[Server]:
    """``python app.py`` on the tiny backbone, offline, every folder it writes under ``tmp_path``.

    (``test_app.app_py`` starts it the same way but does not give the server's process id.)
    """
    port = free_port()
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("KANOCLIP_")},
        "GRADIO_ANALYTICS_ENABLED": "False",
        "HF_HUB_OFFLINE": "1",
        "HF_HOME": str(tmp_path / "hf"),
        "GRADIO_TEMP_DIR": str(tmp_path / "gradio"),  # uploads and results: 20,000 files
        "KANOCLIP_DATA_ROOT": str(tmp_path / "data"),
        "KANOCLIP_CHECKPOINTS_DIR": str(tmp_path / "checkpoints"),
        "KANOCLIP_KB_DIR": str(tmp_path / "kb"),
    }
    command = [
        sys.executable,
        str(REPO / "app.py"),
        "--backbone",
        str(backbone),
        "--device",
        "cpu",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--no-training",
    ]
    output = tmp_path / "app-output.txt"
    with open(output, "wb") as sink:
        process = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=sink, stderr=subprocess.STDOUT)
    server = Server(process=process, url=f"http://127.0.0.1:{port}/", output=output)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert process.poll() is None and time.monotonic() < deadline, f"app.py did not come up: {server.tail()}"
            try:
                Client(server.url, verbose=False, download_files=False)
                break
            except Exception:  # noqa: BLE001 - not listening yet
                time.sleep(0.5)
        yield server
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()


def detect_all(clients: list[Client], images: list[Path], calls: range) -> None:
    """``/detect`` on image i with class i for every i in ``calls``, shared among the clients."""

    def run(client: Client, indices: range) -> None:
        for i in indices:
            summary, score, *_ = client.predict(handle_file(str(images[i])), class_name(i), api_name="/detect")
            assert f"`{class_name(i)}`" in summary and 0.0 <= score <= 1.0, (i, summary, score)

    with ThreadPoolExecutor(len(clients)) as pool:
        for done in [pool.submit(run, client, calls[k :: len(clients)]) for k, client in enumerate(clients)]:
            done.result()


@pytest.mark.slow
def test_2000_detections_of_new_classes_keep_memory_and_open_files_bounded(tiny_backbone: Path, tmp_path: Path) -> None:
    if not Path("/proc/self/status").is_file():
        pytest.skip("reads the server's memory and open files from /proc (Linux); /proc is absent here")
    assert WARMUP > CacheConfig().max_classes  # the warm-up fills the class caches to their bound
    images = write_images(tmp_path / "images", CALLS)
    assert len({p.read_bytes() for p in images}) == CALLS

    with serve(tmp_path, tiny_backbone) as server:
        pid = server.process.pid
        clients = [Client(server.url, verbose=False, download_files=False) for _ in range(CLIENTS)]
        start_rss, start_fds = resident_mb(pid), open_fds(pid)
        rss = []  # MB after every STEP calls
        began = time.perf_counter()
        for first in range(0, CALLS, STEP):
            detect_all(clients, images, range(first, first + STEP))
            rss.append(resident_mb(pid))
            if first + STEP == WARMUP:
                warm_rss, warm_fds = rss[-1], open_fds(pid)
        seconds = time.perf_counter() - began
        end_rss, end_fds = rss[-1], open_fds(pid)
        assert server.process.poll() is None, server.tail()

    readings = (
        f"{CALLS} calls in {seconds:.0f} s; RSS {start_rss:.0f} MB at start, {warm_rss:.0f} MB after {WARMUP}, "
        f"{end_rss:.0f} MB at the end (every {STEP}: {', '.join(f'{r:.0f}' for r in rss)}); "
        f"open fds {start_fds} / {warm_fds} / {end_fds}"
    )
    print(readings)
    assert end_rss - warm_rss < MAX_RSS_GROWTH_MB, readings
    assert end_fds <= warm_fds + FD_SLACK, readings
