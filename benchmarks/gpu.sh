#!/usr/bin/env bash
# The GPU benchmark set (docs/performance.md) in one command, each stage under a time limit:
#   bash benchmarks/gpu.sh OUT_DIR            # full set, ~7 min on one H100/H200
#   bash benchmarks/gpu.sh OUT_DIR --smoke    # seconds per stage: checks the CUDA paths run
# Writes step_time_gpu.json, authors_baseline_gpu.json, loader_gpu.json,
# step_time_gpu_compile.json and gpu_bench.log (every stage's output, the profiles too) into
# OUT_DIR. PYTHON picks the interpreter (default: python), DEVICE the device (default: cuda),
# STAGES the stages (default: step_time profile authors_baseline loader step_time_compile).
# A stage that fails or times out is logged and the next one still runs; the exit status is
# the number of failed stages.
set -u
out=${1:?usage: benchmarks/gpu.sh OUT_DIR [--smoke]}
smoke=${2:-}
py=${PYTHON:-python}
device=${DEVICE:-cuda}
mkdir -p "$out" && out=$(cd "$out" && pwd) || exit 1  # relative to the caller, not the repo
cd "$(dirname "$0")/.." || exit 1
log="$out/gpu_bench.log"
export PYTHONUNBUFFERED=1
failed=0

stage() {  # stage NAME LIMIT_S ARGS...
    local name=$1 limit=$2 t0=$SECONDS rc
    shift 2
    echo "== $name (limit ${limit} s): $*" | tee -a "$log"
    timeout "$limit" "$py" "$@" >>"$log" 2>&1
    rc=$?
    echo "== $name: exit $rc after $((SECONDS - t0)) s" | tee -a "$log"
    [ "$rc" -eq 0 ] || failed=$((failed + 1))
}

{ nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv
  "$py" -c "import torch, timm; print('torch', torch.__version__, 'timm', timm.__version__, torch.cuda.get_device_name())"
  nproc; } >>"$log" 2>&1

if [ "$smoke" = "--smoke" ]; then
    stage step_time 120 benchmarks/step_time.py --device "$device" --smoke --compile --fused --out "$out/step_time_gpu.json"
    stage authors_baseline 120 benchmarks/authors_baseline.py --device "$device" --smoke --out "$out/authors_baseline_gpu.json"
    stage loader 120 benchmarks/loader.py --device "$device" --smoke --out "$out/loader_gpu.json"
else
    for name in ${STAGES:-step_time profile authors_baseline loader step_time_compile}; do
        case $name in
        step_time) stage step_time 180 benchmarks/step_time.py --device "$device" --fused \
            --out "$out/step_time_gpu.json" ;;
        profile) for kind in ce soft soft_fused; do
                stage "profile_$kind" 40 benchmarks/step_time.py --device "$device" --profile "resnet50:$kind"
            done ;;
        authors_baseline) stage authors_baseline 150 benchmarks/authors_baseline.py --device "$device" \
            --train 256 --val 128 --batch 32 --out "$out/authors_baseline_gpu.json" ;;
        loader) stage loader 100 benchmarks/loader.py --device "$device" --patients 200 --batch-size 64 \
            --out "$out/loader_gpu.json" ;;
        step_time_compile) stage step_time_compile 150 benchmarks/step_time.py --device "$device" \
            --compile --only resnet50 --out "$out/step_time_gpu_compile.json" ;;
        *) echo "unknown stage: $name" | tee -a "$log"; failed=$((failed + 1)) ;;
        esac
    done
fi
grep -E "^(==|[a-z_0-9]+ +[0-9]+px|resnet50 224px|wrote)|cache_speedup|load_share|train_step_s|epoch_load_s" "$log"
exit "$failed"
