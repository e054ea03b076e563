#!/usr/bin/env bash
# The outcome measurements of docs/evaluation.md on the quickstart pair, in one script:
# the embedded SmolLM2-135M-Instruct (teacher, served) and its 24-layer subset (student).
#
#     bash examples/outcome_metrics.sh [OUT_DIR]        # about 45 minutes on 2 CPU cores
#
# Needs `make install` (and one `opd quickstart`, which builds the student); runs offline.
# Not run in CI (too long); these are the commands the numbers in docs/evaluation.md came from.
set -euo pipefail
OUT=${1:-runs/outcome}
OPD=${OPD:-.venv/bin/opd}
PORT=${PORT:-8123}
export HF_HUB_OFFLINE=1 VLLM_CPU_KVCACHE_SPACE=1
CACHE=${OPD_CACHE_DIR:-$HOME/.cache/opd}
KEEP24=$CACHE/students/SmolLM2-135M-Instruct-keep24
TEACHER_DIR=$(.venv/bin/python -c "from opd.modeling.embedded import embedded_model_dir; print(embedded_model_dir())")
[ -d "$KEEP24" ] || .venv/bin/python -c "
from opd.client.train.student import build_layer_subset_student
build_layer_subset_student('$TEACHER_DIR', '$KEEP24', 24)"
mkdir -p "$OUT"

OPD_DTYPE=float32 OPD_LOG_LEVEL=warning $OPD serve --port "$PORT" > "$OUT/serve.log" 2>&1 &
SERVE=$!
trap 'kill $SERVE' EXIT
URL=http://127.0.0.1:$PORT
until curl -sf "$URL/readyz" >/dev/null; do sleep 2; done
T=task:multiplication:eval

# 1. the task: student, the teacher's weights (student-side engine) and the teacher service
$OPD eval --data $T --verifier numeric --student "$KEEP24" --student "$TEACHER_DIR" \
  --teacher teacher="$URL" --rollout-engine vllm --max-tokens 32 --out-dir "$OUT/eval-before"

# 2. a short OPD run on the train half, accuracy every 10 steps
$OPD train --student "$KEEP24" --teacher-url "$URL" --prompts task:multiplication:train \
  --eval-set $T --eval-limit 60 --eval-every 10 --eval-verifier numeric \
  --eval-max-new-tokens 32 --max-steps 40 --objective sampled --prompts-per-step 4 \
  --n-rollouts 4 --max-new-tokens 32 --lr 2e-5 --warmup-steps 2 --rollout-engine vllm \
  --checkpoint-every 1000 --depth-bucket 16 --run-dir "$OUT/opd-mul"

# 3. before / after / teacher from outside the trainer, with the gap recovery rate
$OPD eval --data $T --verifier numeric --student "$KEEP24" --student "$OUT/opd-mul" \
  --teacher teacher="$URL" --rollout-engine vllm --max-tokens 32 --out-dir "$OUT/eval-after"

# 4. the probe's reward AUROC and depth curve, after and before training
for S in "$OUT/opd-mul/checkpoints/step_40/model" "$KEEP24"; do
  NAME=$([ "$S" = "$KEEP24" ] && echo before || echo after)
  $OPD probe --student "$S" --teacher teacher="$URL" --prompts $T --answer-field answer \
    --verifier numeric --num-prompts 60 --n-rollouts 4 --max-new-tokens 32 \
    --rollout-engine vllm --depth --depth-prefix 0 --depth-prefix 4 --depth-prefix 8 \
    --depth-prefix 16 --depth-samples 1 --depth-temperature 0 --depth-rollouts 40 \
    --depth-bucket 16 --out-dir "$OUT/probe-$NAME"
done
$OPD report "$OUT/opd-mul"
$OPD report "$OUT/probe-after"
