#!/usr/bin/env bash
# Everything GPU-related in one run (< 5 minutes on an H200), one summary at the end: throughput,
# FLOPs, each precision (auto, fp32, bf16) with and without references, and the ONNX export under
# onnxruntime's CUDA provider where it is installed.
# On the device machine: carry the tokenizer in an ignored folder, e.g.
#   mkdir -p .bench && cp -r ../shared/clip_tokenizer .bench/   (and run with carry [".bench"])
#   bash benchmarks/gpu_check.sh .bench/clip_tokenizer
# The JSON result is written to $OUT/gpu_bench.json (or /tmp), rewritten as each figure is measured:
# a run cut short by its time limit keeps what it reached.
set -uo pipefail
cd "$(dirname "$0")/.."
TOKENIZER="${1:-.bench/clip_tokenizer}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
OUT_DIR="${OUT:-/tmp}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT_DIR/gpu.txt"
python3 benchmarks/bench_gpu.py --versions | tee "$OUT_DIR/versions.txt"  # also in the JSON
timeout 240 python3 benchmarks/bench_gpu.py --tokenizer "$TOKENIZER" --json-out "$OUT_DIR/gpu_bench.json"
status=$?
# The issue asks whether any CLIP weights exist on that machine: large safetensors or hub caches
# (after the benchmark, whose random backbone lived in a temporary folder now gone).
timeout 45 find / -xdev \( -name '*.safetensors' -size +100M -o -type d -name 'models--*clip*' \) 2>/dev/null >"$OUT_DIR/weights.txt"
[ $? -eq 124 ] && cut=" (the 45 s search was cut short)" || cut=""
echo "CLIP weights on disk${cut}: $(head -20 "$OUT_DIR/weights.txt" | tr '\n' ' ')"
[ -s "$OUT_DIR/weights.txt" ] || echo "  none found"
exit $status
