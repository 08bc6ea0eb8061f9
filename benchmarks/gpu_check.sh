#!/usr/bin/env bash
# Everything GPU-related in one run (< 5 minutes on an H200), one summary at the end.
# On the device machine: carry the tokenizer in an ignored folder, e.g.
#   mkdir -p .bench && cp -r ../shared/clip_tokenizer .bench/   (and run with carry [".bench"])
#   bash benchmarks/gpu_check.sh .bench/clip_tokenizer
# The JSON result is written to $OUT/gpu_bench.json (or /tmp).
set -uo pipefail
cd "$(dirname "$0")/.."
TOKENIZER="${1:-.bench/clip_tokenizer}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
OUT_DIR="${OUT:-/tmp}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT_DIR/gpu.txt"
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
timeout 270 python3 benchmarks/bench_gpu.py --tokenizer "$TOKENIZER" --scan-disk --json-out "$OUT_DIR/gpu_bench.json"
