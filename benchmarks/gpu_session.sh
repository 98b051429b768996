#!/usr/bin/env bash
# One device call for a GPU session (the device machine has torch and Triton but not attnc):
#   1. the kernel test suite on the GPU (ATTNC_GPU_TESTS=1), every variant included;
#   2. benchmarks/kernels.py: every case against SDPA and FlexAttention, with the A/B of every
#      kernel variant (neighborhood loops, pointer vs tensor-descriptor K/V) at the tuned tiles;
#   3. the pipeline lowering check.
# Results land in $OUT (or benchmarks/results when OUT is unset); logs beside them.
#   usage (from the repo root): bash benchmarks/gpu_session.sh [tests|bench|pipeline ...]
# A device call is capped at 10 minutes: run `tests` in one call and `bench pipeline` in another
# (CASES="na2d,na1d" limits the benchmark to those cases).
set -uo pipefail
R=$(pwd)
OUT=${OUT:-$R/benchmarks/results}
mkdir -p "$OUT" /tmp/attnc-pkg/attnc
cp -r "$R"/attnc/* /tmp/attnc-pkg/attnc/
for d in kernels passes cli; do rm -rf "/tmp/attnc-pkg/attnc/$d"; cp -r "$R/$d" "/tmp/attnc-pkg/attnc/$d"; done
export PYTHONPATH=/tmp/attnc-pkg:$R ATTNC_CACHE_DIR=/tmp/attnc-cache
steps=${*:-tests bench pipeline}
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,temperature.gpu --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" \
    | tee -a "$OUT/gpu.txt"
for s in $steps; do
  case $s in
    tests)  # pinned tiles keep compiles few; -n spreads them over the CPU cores
      (cd /tmp && ATTNC_GPU_TESTS=1 ATTNC_PIN_CONFIG="BLOCK_M=64,BLOCK_N=32,num_warps=4,num_stages=2" \
        timeout 280 python3 -m pytest "$R/tests/kernels" -q -x -n 12 --rootdir="$R" -p no:cacheprovider \
        2>&1 | tail -25 | tee "$OUT/gpu_tests.log") ;;
    bench)
      (cd /tmp && timeout 420 python3 "$R/benchmarks/kernels.py" ${CASES:+--cases "$CASES"} 2>&1 \
        | tail -40 | tee "$OUT/bench.log")
      [ "$OUT" != "$R/benchmarks/results" ] && cp "$R"/benchmarks/results/kernels-nvidia*.json "$OUT/" 2>/dev/null ;;
    pipeline)
      (cd /tmp && timeout 200 python3 "$R/benchmarks/gpu_pipeline_check.py" 2>&1 | tail -15 \
        | tee "$OUT/pipeline.log")
      [ "$OUT" != "$R/benchmarks/results" ] && cp "$R"/benchmarks/results/gpu_pipeline-*.json "$OUT/" 2>/dev/null ;;
  esac
done
exit 0
