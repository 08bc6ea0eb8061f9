#!/usr/bin/env bash
# Everything GPU-related in one run (< 5 minutes on an H200, plus the visitors/s block's few minutes),
# one summary at the end: throughput, FLOPs, each precision (auto, fp32, bf16) with and without
# references, the ONNX export under onnxruntime's CUDA provider where it is installed, and visitors/s
# through the app with batching on and off.
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
# ---- video (issue 23): a 30 s 720p clip at 30 frames/s end to end (decode, detect_batch of 32,
# overlay, H.264 encode) and the live path (one frame at a time: detect + overlay), bf16 on the GPU.
timeout 240 python3 benchmarks/bench_video.py --tokenizer "$TOKENIZER" --device cuda --precisions bf16 \
  --seconds 30 --fps 30 --size 1280x720 --batch 32 --live-frames 100 --json-out "$OUT_DIR/video_bench.json" \
  | tail -n 1 || status=1
# ---- end video
# ---- visitors/s through the app (issue 18; thr18) ------------------------------------------------
# The running app (python app.py, ViT-L/14@336 random weights, on the GPU) at 1, 8 and 32 concurrent
# gradio_client clients, with batching on (KANOCLIP_BATCH_SIZE=8) and off (1). JSON: $OUT/visitors.json.
timeout 420 python3 benchmarks/bench_visitors.py --device cuda --tokenizer "$TOKENIZER" --clients 1,8,32 \
  --requests 4 --json-out "$OUT_DIR/visitors.json" | tail -4
visitors_status=${PIPESTATUS[0]}
[ "$visitors_status" -eq 0 ] || { echo "visitors benchmark failed ($visitors_status)"; status=$visitors_status; }
# ---- end of the visitors/s block -----------------------------------------------------------------
# The issue asks whether any CLIP weights exist on that machine: large safetensors or hub caches
# (after the benchmark, whose random backbone lived in a temporary folder now gone).
timeout 45 find / -xdev \( -name '*.safetensors' -size +100M -o -type d -name 'models--*clip*' \) 2>/dev/null >"$OUT_DIR/weights.txt"
[ $? -eq 124 ] && cut=" (the 45 s search was cut short)" || cut=""
echo "CLIP weights on disk${cut}: $(head -20 "$OUT_DIR/weights.txt" | tr '\n' ' ')"
[ -s "$OUT_DIR/weights.txt" ] || echo "  none found"
exit $status
