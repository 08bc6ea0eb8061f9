"""The GPU benchmark script works before a GPU session spends its minutes on it.

CI has no GPU, so ``benchmarks/bench_gpu.py`` runs here on the CPU with the tiny backbone
(``--device cpu --architecture tiny``): the same code path, seconds instead of minutes. Its
timings are meaningless; what is checked is that it finishes, that its JSON and summary hold
every figure, and that its FLOP count is the architecture's.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from kanoclip.precision import parse_cpuinfo

from conftest import REPO, TOKENIZER, require_shared


def vision_flops(width: int, depth: int, mlp: int, patch: int, size: int) -> int:
    """Multiply-adds x 2 of a ViT forward, from its shape: patch embedding, then per block
    Q/K/V/out projections (4·2·T·D²), attention scores and weighted sum (2·2·T²·D), and the MLP (2·2·T·D·M)."""
    patches = (size // patch) ** 2
    tokens = patches + 1
    embed = 2 * patches * width * 3 * patch * patch
    block = 8 * tokens * width**2 + 4 * tokens**2 * width + 4 * tokens * width * mlp
    return embed + depth * block


def test_gpu_benchmark_runs_on_cpu_and_reports_every_figure(tmp_path):
    require_shared(TOKENIZER)
    out = tmp_path / "bench.json"
    command = [
        sys.executable,
        str(REPO / "benchmarks" / "bench_gpu.py"),
        "--tokenizer",
        str(TOKENIZER),
        "--device",
        "cpu",
        "--architecture",
        "tiny",
        "--batches",
        "2,3",
        "--repeats",
        "1",
        "--grid-batch",
        "2",
        "--json-out",
        str(out),
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(out.read_text())

    assert set(result["throughput"]) == {"2", "3"}
    for row in result["throughput"].values():
        for key in ("bare_vision_images_per_s", "model_images_per_s", "detect_batch_images_per_s"):
            assert row[key] > 0, key
        assert row["model_tflops"] == row["model_images_per_s"] * result["flops_per_image"]["model"] / 1e12

    # the counter sees the attention too (it is counted through the math kernel)
    flops = result["flops_per_image"]
    assert flops["bare_vision"] == vision_flops(width=64, depth=8, mlp=128, patch=14, size=112)
    assert flops["model"] > flops["bare_vision"]  # plus the V-V path, projections, Bi-CMCI, maps

    assert set(result["precisions"]) == {"auto", "fp32", "bf16"}
    # auto is bf16 on a CPU with native bf16, fp32 on others (the benchmark runs in its own process,
    # which sees this machine's real CPU flags)
    flags = parse_cpuinfo(Path("/proc/cpuinfo").read_text())[1] if Path("/proc/cpuinfo").is_file() else frozenset()
    auto = "bf16" if flags & {"avx512_bf16", "amx_bf16"} else "fp32"
    assert [row["in_force"] for row in result["precisions"].values()] == [auto, "fp32", "bf16"]
    assert all(v > 0 for row in result["precisions"].values() for k, v in row.items() if k.startswith("detect_batch"))

    summary = done.stdout.split("== summary ==", 1)[1]
    assert "batch 2: bare" in summary and "batch 3: bare" in summary and "detect_batch" in summary
    assert "precision bf16 (bf16): detect_batch" in summary and "with 4 references" in summary
    assert "skipped" in result["onnx_cuda"] and "onnx (CUDA provider):" in summary  # no CUDA provider on a CPU machine
    import torch
    import transformers

    assert result["versions"]["torch"] == torch.__version__  # the versions a GPU figure depends on
    assert result["versions"]["transformers"] == transformers.__version__ and result["versions"]["gpu"] == "none"
    assert done.stdout.startswith(f"versions: torch {torch.__version__}, cuda ")


def test_gpu_benchmark_writes_each_figure_as_it_is_measured(tmp_path):
    """A GPU session's time limit may stop the script: what it measured is on disk already."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        from bench_gpu import Results
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    path = tmp_path / "bench.json"
    results = Results(path)
    results["machine"] = "test"
    assert json.loads(path.read_text()) == {"machine": "test"}
    rows = results["throughput"] = {}
    rows[64] = {"model_images_per_s": 1.0}
    results.save()  # after each row of a nested table
    assert json.loads(path.read_text())["throughput"] == {"64": {"model_images_per_s": 1.0}}
    assert not path.with_name("bench.json.tmp").exists()


def test_video_benchmark_runs_on_the_tiny_architecture_and_reports_every_figure(tmp_path):
    require_shared(TOKENIZER)
    out = tmp_path / "video.json"
    command = [
        sys.executable,
        str(REPO / "benchmarks" / "bench_video.py"),
        *("--architecture", "tiny", "--tokenizer", str(TOKENIZER), "--precisions", "fp32,int8"),
        *("--seconds", "1", "--fps", "5", "--size", "96x64", "--batch", "2", "--live-frames", "2"),
        *("--json-out", str(out)),
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(out.read_text())
    assert result["clip"] == {"size": "96x64", "fps": 5, "frames": 5, "batch": 2}
    assert set(result["precisions"]) == {"fp32", "int8"}
    for row in result["precisions"].values():
        assert row["clip"]["frames"] == 5  # every frame of the 1 s clip was scored
        assert row["clip"]["frames_per_s"] == row["clip"]["frames"] / row["clip"]["seconds"] > 0
        assert row["live"]["frames"] == 2 and row["live"]["frames_per_s"] > 0 and row["live"]["median_latency_ms"] > 0
    assert "tiny int8: clip" in done.stdout


def test_visitors_benchmark_runs_on_cpu_and_reports_each_client_count(tmp_path):
    """``bench_visitors.py`` (gpu_check.sh's visitors/s through the app) on the tiny backbone: the app
    comes up with batching on, 1 and 2 clients are served, and every figure is there."""
    require_shared(TOKENIZER)
    pytest.importorskip("gradio_client")
    from test_app import free_port

    out = tmp_path / "visitors.json"
    command = [
        sys.executable, str(REPO / "benchmarks" / "bench_visitors.py"), "--tokenizer", str(TOKENIZER),
        "--device", "cpu", "--architecture", "tiny", "--clients", "1,2", "--requests", "1", "--batching", "on",
        "--image-size", "64", "--port", str(free_port()), "--json-out", str(out),
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(out.read_text())
    assert result["batching_on"]["batch_size"] == 8 and "batching_off" not in result
    rows = result["batching_on"]["clients"]
    assert set(rows) == {"1", "2"}
    for n, row in rows.items():
        # both figures are rounded (seconds to 3 decimals, the rate to 2): the rate lies between the
        # rates of the rounding interval's two ends, give or take its own rounding
        slowest, fastest = int(n) / (row["seconds"] + 0.0005), int(n) / (row["seconds"] - 0.0005)
        assert slowest - 0.005 <= row["visitors_per_s"] <= fastest + 0.005
        assert row["mean_latency_s"] > 0
    assert "batching on (batch size 8): 1 clients" in done.stdout.split("== visitors/s through the app ==", 1)[1]
