#!/usr/bin/env bash
# (Superseded on lent machines by kernels/gpu_run.sh: it fits their 8 files and time limits; this one stays for
# longer runs on a GPU of your own.)
# One-shot GPU check of the kernels room: the kernel tests on CUDA (compiled Triton, not the interpreter), the
# compiled+triton runner's test, the benchmark, the Kernel lab's check and speed at GPU sizes, and end-to-end
# prefill/decode timings, everything written into $OUT (default ./gpu_check_out). Run from the repository root on a
# CUDA machine:
#     OUT=/some/dir bash kernels/gpu_check.sh
# Under 6 minutes in all, each step under its own timeout (a slow step loses its tail, not the others): kernel
# tests <= 110 s, compiled+triton test <= 50 s, benchmark <= 60 s (it stops sweeping when its budget is spent and
# keeps every row measured so far), Kernel lab <= 45 s, end to end eager/triton <= 40 s, end to end
# compiled+triton <= 45 s. Plots only where matplotlib is installed; the CSVs always.
set -u
OUT="${OUT:-gpu_check_out}"
mkdir -p "$OUT"
unset TRITON_INTERPRET
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
PY="${PYTHON:-python3}"  # the lent image has python3 only
LOG="$OUT/gpu_check.log"

{
  echo "== environment $(date -u +%FT%TZ)"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
  "$PY" -c "import sys, torch, triton; print('python', sys.version.split()[0], 'torch', torch.__version__,
             'triton', triton.__version__, 'cuda', torch.cuda.is_available())"
} 2>&1 | tee "$LOG"

echo "== kernel tests on CUDA" | tee -a "$LOG"
timeout 110 "$PY" -m pytest -q -p no:cacheprovider tests/kernels --durations=10 \
  --ignore=tests/kernels/test_compiled_triton.py --junitxml="$OUT/kernel_tests.xml" 2>&1 | tee -a "$LOG"
TESTS_RC=${PIPESTATUS[0]}
echo "tests exit code: $TESTS_RC" | tee -a "$LOG"

echo "== compiled+triton runner (inductor, decode as a CUDA graph) against eager on tiny-llama" | tee -a "$LOG"
timeout 50 "$PY" -m pytest -q -p no:cacheprovider tests/kernels/test_compiled_triton.py --durations=3 \
  --junitxml="$OUT/compiled_triton_tests.xml" 2>&1 | tee -a "$LOG"
CT_RC=${PIPESTATUS[0]}
echo "compiled+triton test exit code: $CT_RC" | tee -a "$LOG"

echo "== benchmark" | tee -a "$LOG"
timeout 60 "$PY" -m kernels.bench --quick --budget-s 45 --out "$OUT" 2>&1 | tee -a "$LOG"
BENCH_RC=${PIPESTATUS[0]}
echo "bench exit code: $BENCH_RC" | tee -a "$LOG"

echo "== Kernel lab at GPU sizes: kernels.check (bf16) for every op, kernels.speed for three" | tee -a "$LOG"
timeout 45 "$PY" - "$OUT" <<'PYEOF' 2>&1 | tee -a "$LOG"
import csv, json, sys
from kernels import check as lab

out = sys.argv[1]
SHAPES = {"rms_norm": (8192, 4096), "layer_norm": (8192, 4096), "rotary": (4, 32, 8, 2048, 128),
          "swiglu": (8192, 8192), "gelu_tanh": (8192, 8192), "attention": (4, 32, 8, 2048, 128),
          "decode_attention": (32, 32, 8, 4096, 128), "cross_entropy": (8192, 32000),
          "linear_cross_entropy": (8192, 2048, 32000)}
checks, bad = {}, []
for op, shape in SHAPES.items():
    checks[op] = lab.check(op, shape, "bfloat16", device="cuda")
    worst = max(checks[op].items(), key=lambda kv: kv[1]["relative_error"])
    bad += [f"{op} {name}" for name, r in checks[op].items() if not r["within_tolerance"]]
    print(f"{op:22s} {str(shape):24s} worst {worst[0]:14s} relative error {worst[1]['relative_error']:.2e}", flush=True)
    json.dump(checks, open(f"{out}/lab_check.json", "w"), indent=1)
with open(f"{out}/lab_speed.csv", "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(["op", "shape", "provider", "mode", "ms"])
    for op in ("rms_norm", "attention", "cross_entropy"):
        for row in lab.speed(op, SHAPES[op], "bfloat16"):
            w.writerow([op, "x".join(map(str, SHAPES[op])), row["provider"], row["mode"], f"{row['ms']:.4f}"])
            print(f"{op:14s} {row['provider']:8s} {row['mode']:20s} {row['ms']:8.3f} ms", flush=True)
        f.flush()
print("outside tolerance:", ", ".join(bad) or "none")
sys.exit(1 if bad else 0)
PYEOF
LAB_RC=${PIPESTATUS[0]}
echo "kernel lab exit code: $LAB_RC" | tee -a "$LOG"

# End to end: a random SmolLM2-135M-shaped model (LAYERS of its 30 layers), bf16, batch 1, prefill 128 + 128 decode
# steps; rows appended to e2e.csv, with the largest logit difference from eager over the prefill and decode steps.
e2e() {
  local seconds="$1" layers="$2"; shift 2
  timeout "$seconds" "$PY" - "$OUT/e2e.csv" "$layers" "$@" <<'PYEOF' 2>&1 | tee -a "$LOG"
import csv, dataclasses, os, sys, time
import torch
from backend import ModelConfig, Transformer
from backend.runners import PREPARABLE
from backend.runners.eager import EagerRunner

path, layers, names = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
torch.manual_seed(0)
config = dataclasses.replace(ModelConfig.from_name("smollm2-135m"), n_layer=layers)
model = Transformer(config).to("cuda", torch.bfloat16).eval()
model.reset_buffers("cuda")
ids = torch.randint(0, model.config.vocab_size, (1, 128), device="cuda")
new = not os.path.exists(path)
for name in names:
    runner = EagerRunner(model) if name == "eager" else PREPARABLE[name](model, None)
    with torch.no_grad():
        for attempt in range(2):                      # the first pass compiles (Triton kernels, torch.compile)
            runner.start(1, 256)
            torch.cuda.synchronize(); t0 = time.perf_counter()
            logits = [runner.forward(ids, 0)]
            torch.cuda.synchronize(); t1 = time.perf_counter()
            for pos in range(128, 256):
                logits.append(runner.forward(logits[-1].argmax(-1, keepdim=True), pos))
            torch.cuda.synchronize(); t2 = time.perf_counter()
        if name == "eager":
            reference = logits
        diff = max((a - b).abs().max().item() for a, b in zip(logits[:8], reference[:8]))
    prefill, decode = 128 / (t1 - t0), 128 / (t2 - t1)
    with open(path, "a", newline="") as f:
        w = csv.writer(f)
        if new:
            w.writerow(["runner", "layers", "prefill_tok_s", "decode_tok_s", "max_logit_diff_vs_eager", "device",
                        "torch"])
            new = False
        w.writerow([runner.name, layers, f"{prefill:.0f}", f"{decode:.1f}", f"{diff:.3g}",
                    torch.cuda.get_device_name(), torch.__version__])
    print(f"{runner.name:16s} {layers:2d} layers  prefill {prefill:8.0f} tok/s   decode {decode:7.1f} tok/s   "
          f"max logit diff vs eager (prefill + 7 steps) {diff:.3g}", flush=True)
PYEOF
  return "${PIPESTATUS[0]}"
}

echo "== end to end: eager and triton, 30 layers" | tee -a "$LOG"
e2e 40 30 eager triton
E2E_RC=$?
echo "end-to-end exit code: $E2E_RC" | tee -a "$LOG"
echo "== end to end: eager and compiled+triton (inductor compile, CUDA graph decode), 8 layers" | tee -a "$LOG"
e2e 45 8 eager compiled+triton
E2E_CT_RC=$?
echo "end-to-end compiled+triton exit code: $E2E_CT_RC" | tee -a "$LOG"

echo "== done: tests $TESTS_RC, compiled+triton test $CT_RC, bench $BENCH_RC, lab $LAB_RC, end to end $E2E_RC /" \
     "$E2E_CT_RC; files in $OUT" | tee -a "$LOG"
ls -l "$OUT" | tee -a "$LOG"
[ "$TESTS_RC" = 0 ] && [ "$CT_RC" = 0 ] && [ "$BENCH_RC" = 0 ] && [ "$LAB_RC" = 0 ]
