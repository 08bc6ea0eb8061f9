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
    assert [row["in_force"] for row in result["precisions"].values()] == [
        "fp32",
        "fp32",
        "bf16",
    ]  # auto is fp32 on a CPU
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
