#!/usr/bin/env bash
# One-shot GPU check of the kernels room: the kernel tests on CUDA (compiled Triton, not the interpreter), then the
# benchmark, everything written into $OUT (default ./gpu_check_out). Run from the repository root on a CUDA machine:
#     OUT=/some/dir bash kernels/gpu_check.sh
# About 5.5 minutes at most: tests <= 150 s, benchmark <= 120 s (it stops sweeping when its budget is spent and
# keeps every row measured so far), end-to-end decode <= 60 s. Plots only where matplotlib is installed; the CSV
# always.
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
  "$PY" -c "import sys, torch, triton; print('python', sys.version.split()[0], 'torch', torch.__version__,
             'triton', triton.__version__, 'cuda', torch.cuda.is_available())"
} 2>&1 | tee "$LOG"

echo "== kernel tests on CUDA" | tee -a "$LOG"
timeout 150 "$PY" -m pytest -q -p no:cacheprovider tests/kernels --durations=10 \
  --junitxml="$OUT/kernel_tests.xml" 2>&1 | tee -a "$LOG"
TESTS_RC=${PIPESTATUS[0]}
echo "tests exit code: $TESTS_RC" | tee -a "$LOG"

echo "== benchmark" | tee -a "$LOG"
timeout 120 "$PY" -m kernels.bench --quick --budget-s 95 --out "$OUT" 2>&1 | tee -a "$LOG"
BENCH_RC=${PIPESTATUS[0]}
echo "bench exit code: $BENCH_RC" | tee -a "$LOG"

echo "== end to end: random SmolLM2-135M-shaped model, bf16, batch 1, prefill 128 + 128 decode steps" | tee -a "$LOG"
timeout 60 "$PY" - "$OUT/e2e.csv" <<'PYEOF' 2>&1 | tee -a "$LOG"
import csv, sys, time
import torch
from backend import ModelConfig, Transformer
from backend.runners.eager import EagerRunner
from backend.runners.triton import TritonRunner

torch.manual_seed(0)
model = Transformer(ModelConfig.from_name("smollm2-135m")).to("cuda", torch.bfloat16).eval()
model.reset_buffers("cuda")
ids = torch.randint(0, model.config.vocab_size, (1, 128), device="cuda")
rows = []
for runner in (EagerRunner(model), TritonRunner(model)):
    with torch.no_grad():
        for attempt in range(2):                      # the first pass compiles the Triton kernels
            runner.start(1, 256)
            torch.cuda.synchronize(); t0 = time.perf_counter()
            logits = runner.forward(ids, 0)
            torch.cuda.synchronize(); t1 = time.perf_counter()
            token = logits.argmax(-1, keepdim=True)
            for pos in range(128, 256):
                token = runner.forward(token, pos).argmax(-1, keepdim=True)
            torch.cuda.synchronize(); t2 = time.perf_counter()
    prefill, decode = 128 / (t1 - t0), 128 / (t2 - t1)
    rows.append([runner.name, f"{prefill:.0f}", f"{decode:.1f}", torch.cuda.get_device_name(), torch.__version__])
    print(f"{runner.name:8s} prefill {prefill:8.0f} tok/s   decode {decode:7.1f} tok/s", flush=True)
with open(sys.argv[1], "w", newline="") as f:
    csv.writer(f).writerows([["runner", "prefill_tok_s", "decode_tok_s", "device", "torch"], *rows])
PYEOF
E2E_RC=${PIPESTATUS[0]}
echo "end-to-end exit code: $E2E_RC" | tee -a "$LOG"

echo "== done: tests $TESTS_RC, bench $BENCH_RC, end to end $E2E_RC; files in $OUT" | tee -a "$LOG"
ls -l "$OUT" | tee -a "$LOG"
[ "$TESTS_RC" = 0 ] && [ "$BENCH_RC" = 0 ]
