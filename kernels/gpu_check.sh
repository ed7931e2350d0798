#!/usr/bin/env bash
# One-shot GPU check of the kernels room: the kernel tests on CUDA (compiled Triton, not the interpreter), then the
# benchmark, everything written into $OUT (default ./gpu_check_out). Run from the repository root on a CUDA machine:
#     OUT=/some/dir bash kernels/gpu_check.sh
# About 5.5 minutes at most: tests <= 180 s, benchmark <= 150 s (it stops sweeping when its budget is spent and
# keeps every row measured so far). Plots only where matplotlib is installed; the CSV always.
set -u
OUT="${OUT:-gpu_check_out}"
mkdir -p "$OUT"
unset TRITON_INTERPRET
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
PY="${PYTHON:-python}"
LOG="$OUT/gpu_check.log"

{
  echo "== environment $(date -u +%FT%TZ)"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
  "$PY" -c "import sys, torch, triton; print('python', sys.version.split()[0], 'torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.cuda.is_available())"
} 2>&1 | tee "$LOG"

echo "== kernel tests on CUDA" | tee -a "$LOG"
timeout 180 "$PY" -m pytest -q -p no:cacheprovider tests/kernels --durations=10 --junitxml="$OUT/kernel_tests.xml" 2>&1 | tee -a "$LOG"
TESTS_RC=${PIPESTATUS[0]}
echo "tests exit code: $TESTS_RC" | tee -a "$LOG"

echo "== benchmark" | tee -a "$LOG"
timeout 150 "$PY" -m kernels.bench --quick --budget-s 120 --out "$OUT" 2>&1 | tee -a "$LOG"
BENCH_RC=${PIPESTATUS[0]}
echo "bench exit code: $BENCH_RC" | tee -a "$LOG"

echo "== done: tests $TESTS_RC, bench $BENCH_RC; files in $OUT" | tee -a "$LOG"
ls -l "$OUT" | tee -a "$LOG"
[ "$TESTS_RC" = 0 ] && [ "$BENCH_RC" = 0 ]
