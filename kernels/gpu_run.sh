#!/usr/bin/env bash
# One prepared command for a lent GPU machine (the kernels room): installs nothing, runs python3 (what the lent
# image promises; it has no `python`), puts a hard `timeout` on every step and brings back at most 8 files.
# From the repository root:
#     OUT=/some/dir bash kernels/gpu_run.sh
# Steps and their limits (each hard: SIGINT at the limit, KILL 5 s later):
#   env              25 s   nvidia-smi, python3 / torch / triton versions, which optional tools exist
#   kernel tests    160 s   tests/kernels on CUDA in parallel (pytest -n with xdist, else 4 background shards),
#                           120 s per test where pytest-timeout exists; beside them, in the background, the
#                           compiled+triton test (inductor, CUDA-graph decode). SIGINT lets pytest still write
#                           its XML for what finished.
#   probes          130 s   three side by side: tests/kernels/gpu_probe.py's kernel probes (autocast, CUDA-graph
#                           capture/replay, GPU-size tiles, shared-memory edges, int32 offsets and grid limits,
#                           each in a child process), its teacher-forced end-to-end probe (eager vs triton vs
#                           compiled+triton under inference_mode), and compute-sanitizer memcheck over a few
#                           kernels (if it is on the PATH)
#   benchmark        50 s   python3 -m kernels.bench --quick (keeps every row measured before its budget ends)
#   packing          35 s   merged XML, merged probe records, summary, tarball
# Worst case 25 + 165 + 135 + 55 + 35 = 415 s: under 7 minutes even when every step runs into its limit.
# Files in $OUT: summary.txt (what ran, passed, failed, timed out and was skipped, and why), tests.xml (every
# pytest XML merged), run.log (every step's output), probe.json, bench.csv, rest.tar.gz (per-step logs, shard
# XMLs, plots, sanitizer output). Without CUDA, or with GPU_RUN_DRY=1, it skips the GPU steps, says so in
# summary.txt, and still writes every file (the CPU test tests/kernels/test_gpu_run_script.py dry-runs it).
set -u
OUT="${OUT:-gpu_run_out}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
WORK="$(mktemp -d)"
REST="$WORK/rest"
STATUS="$WORK/status"
mkdir -p "$REST" "$STATUS"
unset TRITON_INTERPRET
# the repository on the path of every python3 (the probe's children import kernels and backend); one Triton cache
# for every step, so the probes reuse what the tests compiled
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRITON_CACHE_DIR="$WORK/triton_cache"
export PYTHONPATH="$(pwd)${PYTHONPATH:+:$PYTHONPATH}"
PY=python3
LOG="$OUT/run.log"
: >"$LOG"
START=$SECONDS

say() { echo "$*" | tee -a "$LOG"; }

# step NAME LIMIT_S CMD...: run CMD under a hard timeout (SIGINT first, so pytest writes its XML; KILL 5 s later),
# its output into rest/NAME.log; its status line into status/NAME
step() {
  local name="$1" limit="$2" t0=$SECONDS rc
  shift 2
  timeout -s INT -k 5 "$limit" "$@" >"$REST/$name.log" 2>&1
  rc=$?
  local took=$((SECONDS - t0)) state
  case "$rc" in
    0) state="ok" ;;
    124 | 130 | 137) state="TIMEOUT (stopped at its ${limit} s limit)" ;;
    *) state="FAIL (exit $rc)" ;;
  esac
  printf '%-16s %-40s %4d s (limit %d s)\n' "$name" "$state" "$took" "$limit" >"$STATUS/$name"
  return "$rc"
}

skip() {  # skip NAME WHY
  printf '%-16s %-40s\n' "$1" "SKIPPED: $2" >"$STATUS/$1"
}

say "== gpu_run.sh $(date -u +%FT%TZ) in $(pwd)"
{
  timeout 10 nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1
  timeout 15 $PY -c "import importlib.util as u, sys, torch, triton; cuda = torch.cuda.is_available(); \
    print('python', sys.version.split()[0], 'torch', torch.__version__, 'triton', triton.__version__, 'cuda', cuda); \
    have = [int(bool(u.find_spec(m))) for m in ('xdist', 'pytest_timeout')]; \
    open(sys.argv[1], 'w').write(' '.join(map(str, [int(cuda), *have])))" "$WORK/found" 2>&1
} | tee -a "$LOG" >"$WORK/env.txt"
read -r CUDA HAVE_XDIST HAVE_TIMEOUT <"$WORK/found" 2>/dev/null || { CUDA=0; HAVE_XDIST=0; HAVE_TIMEOUT=0; }
DRY_WHY=""
[ "$CUDA" = 1 ] || DRY_WHY="no CUDA device (torch.cuda.is_available() is False)"
[ "${GPU_RUN_DRY:-0}" = 1 ] && DRY_WHY="GPU_RUN_DRY=1 (a dry run)${DRY_WHY:+; $DRY_WHY}"
SANITIZER="$(command -v compute-sanitizer || true)"
say "mode: ${DRY_WHY:+dry run: }${DRY_WHY:-GPU}; xdist $HAVE_XDIST, pytest-timeout $HAVE_TIMEOUT," \
    "compute-sanitizer ${SANITIZER:-absent}"

PER_TEST=()
[ "$HAVE_TIMEOUT" = 1 ] && PER_TEST=(--timeout 120)
PYTEST=($PY -m pytest -q -p no:cacheprovider -rfE "${PER_TEST[@]}")
KERNEL_TESTS=(tests/kernels --ignore=tests/kernels/test_compiled_triton.py
              --ignore=tests/kernels/test_gpu_run_script.py --ignore=tests/kernels/test_gpu_compile.py)

kernel_tests() {
  if [ "$HAVE_XDIST" = 1 ]; then
    step kernel_tests 160 "${PYTEST[@]}" -n 12 --dist load "${KERNEL_TESTS[@]}" --junitxml="$REST/kernel_tests.xml"
    return
  fi
  # no xdist: the test files dealt round-robin into 4 shards, each its own pytest in the background
  local files=(tests/kernels/test_*.py) shard i
  for shard in 0 1 2 3; do
    local mine=()
    for i in "${!files[@]}"; do
      case "${files[$i]}" in *test_compiled_triton.py | *test_gpu_run_script.py | *test_gpu_compile.py) continue ;; esac
      [ $((i % 4)) = "$shard" ] && mine+=("${files[$i]}")
    done
    [ "${#mine[@]}" = 0 ] || step "kernel_tests_$shard" 160 "${PYTEST[@]}" "${mine[@]}" \
      --junitxml="$REST/kernel_tests_$shard.xml" &
  done
  wait
}

if [ -n "$DRY_WHY" ]; then
  skip kernel_tests "$DRY_WHY"
  skip compiled_triton "$DRY_WHY"
else
  say "== kernel tests on CUDA and, beside them, the compiled+triton test (<= 160 s)"
  kernel_tests &
  step compiled_triton 160 "${PYTEST[@]}" tests/kernels/test_compiled_triton.py \
    --junitxml="$REST/compiled_triton.xml" &
  wait
fi

say "== probes, the end-to-end probe and compute-sanitizer memcheck side by side (<= 130 s)"
HAS_CUDA="$([ -n "$DRY_WHY" ] && echo 0 || echo 1)"
step probes 130 $PY tests/kernels/gpu_probe.py "$REST/probe_kernels.json" --budget-s 120 --cuda "$HAS_CUDA" \
  --only autocast,cuda_graph,gpu_tiles,shared_memory,int32_offsets,grid_limits &
step probe_e2e 130 $PY tests/kernels/gpu_probe.py "$REST/probe_e2e.json" --budget-s 120 --cuda "$HAS_CUDA" \
  --only end_to_end &
if [ -n "$DRY_WHY" ]; then
  skip sanitizer "$DRY_WHY"
elif [ -z "$SANITIZER" ]; then
  skip sanitizer "compute-sanitizer is not on the PATH"
else
  step sanitizer 130 "$SANITIZER" --tool memcheck --error-exitcode 9 --print-limit 20 \
    $PY tests/kernels/gpu_probe.py --child sanitizer_kernels &
fi
wait

if [ -n "$DRY_WHY" ]; then
  skip benchmark "$DRY_WHY"
else
  say "== benchmark (<= 50 s)"
  step benchmark 50 $PY -m kernels.bench --quick --budget-s 35 --out "$REST/bench"
fi

# --- pack: at most 8 files in $OUT ---
for f in "$REST"/*.log; do
  [ -e "$f" ] || continue
  { echo "== $(basename "$f" .log)"; tail -c 20000 "$f"; } >>"$LOG"
done
if [ -f "$REST/bench/kernels_bench.csv" ]; then
  cp "$REST/bench/kernels_bench.csv" "$OUT/bench.csv"
else
  echo "op,provider,mode,metric,x,p20,p50,p80,device,torch,triton" >"$OUT/bench.csv"  # kernels.bench.HEADER
fi
timeout 10 $PY -c "
import json, sys
records = []
for path in sys.argv[2:]:
    try:
        records += json.load(open(path))
    except (OSError, ValueError) as e:
        records.append({'name': path.rsplit('/', 1)[-1], 'status': 'crash', 'why': f'no records: {e}'})
json.dump(records, open(sys.argv[1], 'w'), indent=1)
" "$OUT/probe.json" "$REST/probe_kernels.json" "$REST/probe_e2e.json" 2>>"$LOG" || echo "[]" >"$OUT/probe.json"
TESTS_LINE="$(timeout 15 $PY - "$REST" "$OUT/tests.xml" "$DRY_WHY" <<'PYEOF' 2>&1
import glob, sys
import xml.etree.ElementTree as ET

rest, out, dry = sys.argv[1], sys.argv[2], sys.argv[3]
merged = ET.Element("testsuites")
totals = dict(tests=0, failures=0, errors=0, skipped=0)
for path in sorted(glob.glob(f"{rest}/*.xml")):
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as e:
        print(f"unreadable {path}: {e}")
        continue
    for suite in ([root] if root.tag == "testsuite" else list(root)):
        suite.set("name", path.rsplit("/", 1)[-1])
        merged.append(suite)
        for key in totals:
            totals[key] += int(suite.get(key, 0))
merged.set("name", f"skipped: {dry}" if dry else "kernels on CUDA")
ET.ElementTree(merged).write(out, encoding="utf-8", xml_declaration=True)
passed = totals["tests"] - totals["failures"] - totals["errors"] - totals["skipped"]
print(f"tests.xml: {passed} passed, {totals['failures']} failed, {totals['errors']} errors, "
      f"{totals['skipped']} skipped" + (f" (no tests run: {dry})" if dry else ""))
PYEOF
)"
{
  echo "gpu_run.sh $(date -u +%FT%TZ), $((SECONDS - START)) s"
  echo "mode: ${DRY_WHY:+dry run: }${DRY_WHY:-GPU}"
  cat "$WORK/env.txt"
  echo
  cat "$STATUS"/* 2>/dev/null
  echo
  echo "$TESTS_LINE"
  timeout 10 $PY -c "
import json, sys
records = json.load(open(sys.argv[1]))
for r in records:
    print(f\"probe {r['name']:14s} {r['status']:8s} {r.get('why', '')}\")
" "$OUT/probe.json" 2>&1
  grep -h "^FAILED\|^ERROR" "$REST"/*.log 2>/dev/null | head -40
  SKIPPED="$(grep -l "SKIPPED" "$STATUS"/* 2>/dev/null | xargs -r -n1 basename | tr '\n' ' ')"
  echo "skipped steps: ${SKIPPED:-none}"
} >"$OUT/summary.txt"
cp "$OUT/summary.txt" "$REST/summary.txt"
tar czf "$OUT/rest.tar.gz" -C "$WORK" rest 2>>"$LOG"
# anything else that landed in $OUT goes into a second tarball rather than past the 8 files that come back
EXTRA=$(find "$OUT" -mindepth 1 -maxdepth 1 ! -name summary.txt ! -name tests.xml ! -name run.log \
        ! -name probe.json ! -name bench.csv ! -name rest.tar.gz ! -name extra.tar.gz)
if [ -n "$EXTRA" ]; then
  tar czf "$OUT/extra.tar.gz" -C "$OUT" $(for f in $EXTRA; do basename "$f"; done) && rm -rf $EXTRA
fi
cat "$OUT/summary.txt"
grep -q "FAIL\|TIMEOUT" "$STATUS"/* 2>/dev/null
RC=$((1 - $?))   # 1 when any step failed or timed out
rm -rf "$WORK"
exit "$RC"
