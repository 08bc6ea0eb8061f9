#!/usr/bin/env bash
# Everything GPU-related in one run (< 5 minutes on an H200), one summary at the end.
# On the device machine: carry the tokenizer in an ignored folder, e.g.
#   mkdir -p .bench && cp -r ../shared/clip_tokenizer .bench/   (and run with carry [".bench"])
#   bash benchmarks/gpu_check.sh .bench/clip_tokenizer
set -uo pipefail
cd "$(dirname "$0")/.."
TOKENIZER="${1:-.bench/clip_tokenizer}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
OUT_DIR="${OUT:-/tmp}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT_DIR/gpu.txt"
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
timeout 270 python3 benchmarks/bench_gpu.py --tokenizer "$TOKENIZER" | tee "$OUT_DIR/gpu_bench.json"
status=${PIPESTATUS[0]}
echo "== summary =="
python3 - "$OUT_DIR/gpu_bench.json" <<'PY'
import json, sys
try:
    r = json.load(open(sys.argv[1]))
except Exception as exc:
    print("no benchmark result:", exc); sys.exit(0)
print(r["machine"])
print("CLIP weights on disk:", r["clip_weights_on_disk"] or "none found")
for batch, row in r["throughput"].items():
    print(f"batch {batch}: bare {row['bare_vision_images_per_s']:.0f}/s, model {row['model_images_per_s']:.0f}/s, "
          f"detect_batch {row['detect_batch_images_per_s']:.0f}/s, peak {row['peak_gpu_memory_gb']:.1f} GB")
PY
exit $status
