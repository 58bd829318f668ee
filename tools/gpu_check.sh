#!/usr/bin/env bash
# One-shot GPU check for a lent GPU machine (see cuda_ops/README.md "GPU testing"): rebuilds the op
# library there if the carried one does not load, runs the GPU tests, then the CUDA benchmark.
# Usage (repo root, with build/cuda_ops and cuda_ops/third_party present):
#   OUT=/some/dir bash tools/gpu_check.sh [--quick]
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT="${OUT:-/tmp/eqc-gpu}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,temperature.gpu,utilization.gpu --format=csv \
  | tee "$OUT/gpu.txt"
if ! "$PY" -c "import ctypes; ctypes.CDLL('build/cuda_ops/libeqc_ops_cuda.so')" 2>"$OUT/load.err"; then
  echo "carried libeqc_ops_cuda.so does not load here ($(head -c 200 "$OUT/load.err")); rebuilding"
  bash cuda_ops/build.sh || exit 1
fi
(cd tests && timeout 240 "$PY" -m pytest -q -m gpu --noconftest -p no:cacheprovider test_cuda_kernel_gpu.py \
  2>&1 | tee "$OUT/gpu_tests.log")
timeout "${BENCH_TIMEOUT:-330}" "$PY" tools/bench_cuda_gemm.py --out-dir "$OUT" "$@" 2>&1 | tee "$OUT/bench.log"
