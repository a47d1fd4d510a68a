#!/usr/bin/env bash
# Tests, sanitizers and the benchmark on the lent GPU machine, as one command from the repo root:
#
#     bash benchmarks/run_on_gpu.sh                 # GIT_COMMIT=<sha> in front names the commit measured
#
# Steps, each run whatever happened before it:
#   setup      pycuda from the shared/device kit (../shared or ./shared), the liger_kernel wheel,
#              PYTHONPATH=. for this checkout (no pip install: the machine has no package index)
#   tests      python3 -m pytest -q tests
#   memcheck   compute-sanitizer --tool memcheck  on python3 -m pytest -q tests/test_gpu.py -x
#   racecheck  compute-sanitizer --tool racecheck on the same
#   bench      python3 benchmarks/bench_kl.py --out $OUT/bench (full, or --quick when time is short)
# Files ($OUT of the device tool, else benchmarks/results/run-DATE), 7 in all, 1 folder deep:
#   tests.log memcheck.log racecheck.log summary.txt (steps, bench table, setup log)
#   bench/bench.log bench/results.json bench/results.png
# The device tool stops a command after 10 minutes, so every step has a time cap and the benchmark
# gets what is left of TOTAL_S.  Knobs (environment): TOTAL_S (570), TESTS_S (150), SANITIZER_S (90
# each), BENCH (auto | full | quick; auto: full when >= 330 s are left), STEPS (default
# "setup tests memcheck racecheck bench"; e.g. STEPS="setup bench" for the benchmark alone).
set -u
cd "$(dirname "$0")/.." || exit 1
START=$(date +%s)
PY=${PYTHON:-python3}
OUT=${OUT:-$PWD/benchmarks/results/run-$(date -u +%Y%m%d-%H%M%S)}
TOTAL_S=${TOTAL_S:-570}
TESTS_S=${TESTS_S:-150}
SANITIZER_S=${SANITIZER_S:-90}
BENCH=${BENCH:-auto}
STEPS=${STEPS:-setup tests memcheck racecheck bench}
# Under the sanitizers: the 10000-call memory test is left out (minutes under instrumentation).
SANITIZED_TESTS=(-m pytest -q tests/test_gpu.py -x -p no:cacheprovider -k "not memory_flat")
mkdir -p "$OUT/bench"
SETUP_LOG=$(mktemp)
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
[ -n "${GIT_COMMIT:-}" ] || GIT_COMMIT=$(git rev-parse HEAD 2>/dev/null) || GIT_COMMIT=""
export GIT_COMMIT

SUMMARY=()
FAILED=0
now() { date +%s; }
record() {   # step name, exit code, start time, note
    local status=ok
    [ "$2" = 0 ] || { status=FAILED; FAILED=$((FAILED + 1)); }
    [ "$2" = 124 ] && status="TIMED OUT"
    SUMMARY+=("$(printf '%-9s %-9s rc=%-3s %4ss  %s' "$1" "$status" "$2" "$(( $(now) - $3 ))" "$4")")
}
wants() { case " $STEPS " in *" $1 "*) return 0 ;; *) return 1 ;; esac; }
echo "run_on_gpu: OUT=$OUT, steps: $STEPS"

# --- setup ---------------------------------------------------------------------------------
if wants setup; then
    t=$(now)
    {
        echo "== where the kit is: ls .. ."; ls .. .
        echo "== pycuda"
        sh ../shared/device/setup.sh || sh shared/device/setup.sh
        rc_pycuda=$?
        echo "== liger_kernel"
        rc_liger=1
        for wheel in ../shared/device/wheels/liger_kernel-*.whl shared/device/wheels/liger_kernel-*.whl; do
            [ -f "$wheel" ] || continue
            "$PY" -m pip install -q --no-index --no-deps "$wheel" && rc_liger=0 && break
        done
        [ "$rc_liger" = 0 ] || echo "liger_kernel wheel not found or not installed"
        echo "== machine"
        nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem --format=csv 2>&1
        nvcc --version 2>&1 | tail -1
        "$PY" -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, torch.cuda.get_device_name(0))" 2>&1
    } >"$SETUP_LOG" 2>&1
    note="pycuda: $(grep -m1 '^pycuda ' "$SETUP_LOG" || echo 'not usable, see setup log in summary.txt'); liger_kernel: $([ "$rc_liger" = 0 ] && echo installed || echo missing)"
    record setup "$rc_pycuda" "$t" "$note"
fi

# --- tests ---------------------------------------------------------------------------------
if wants tests; then
    t=$(now)
    timeout -k 10 "$TESTS_S" "$PY" -m pytest -q tests -p no:cacheprovider 2>&1 | tee "$OUT/tests.log"
    rc=${PIPESTATUS[0]}
    note=$(grep -E ' in [0-9.]+s' "$OUT/tests.log" | tail -1)
    [ "$rc" = 124 ] && note="stopped after ${TESTS_S}s (TESTS_S), unfinished; see tests.log"
    record tests "$rc" "$t" "$note"
fi

# --- compute-sanitizer ---------------------------------------------------------------------
SANITIZER=$(command -v compute-sanitizer || ls /usr/local/cuda/bin/compute-sanitizer 2>/dev/null || echo "")
for tool in memcheck racecheck; do
    wants "$tool" || continue
    t=$(now)
    if [ -z "$SANITIZER" ]; then
        echo "compute-sanitizer not found" >"$OUT/$tool.log"
        record "$tool" 127 "$t" "compute-sanitizer not found"
        continue
    fi
    echo "run_on_gpu: $tool (log in $OUT/$tool.log)"
    timeout -k 10 "$SANITIZER_S" "$SANITIZER" --tool "$tool" --error-exitcode 99 --print-limit 100 \
        "$PY" "${SANITIZED_TESTS[@]}" >"$OUT/$tool.log" 2>&1
    rc=$?
    note="$(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY' "$OUT/$tool.log" | tail -1); $(grep -E ' in [0-9.]+s' "$OUT/$tool.log" | tail -1)"
    [ "$rc" = 124 ] && note="stopped after ${SANITIZER_S}s (SANITIZER_S); $note"
    record "$tool" "$rc" "$t" "$note"
done

# --- benchmark -----------------------------------------------------------------------------
if wants bench; then
    t=$(now)
    left=$(( TOTAL_S - (t - START) ))
    budget=$(( left - 45 ))
    mode=$BENCH
    [ "$mode" = auto ] && { [ "$left" -ge 330 ] && mode=full || mode=quick; }
    flag=""; [ "$mode" = quick ] && flag="--quick"
    if [ "$budget" -lt 60 ]; then
        record bench 124 "$t" "not run: only ${left}s of TOTAL_S=${TOTAL_S}s left"
    else
        echo "run_on_gpu: bench ($mode, time budget ${budget}s)"
        timeout -k 10 $(( budget + 30 )) "$PY" benchmarks/bench_kl.py --out "$OUT/bench" $flag \
            --time-budget "$budget" 2>&1 | tee "$OUT/bench/bench.log"
        rc=${PIPESTATUS[0]}
        record bench "$rc" "$t" "$mode; $(grep -m1 -E '^errors recorded' "$OUT/bench/bench.log" || echo 'no table printed')"
    fi
fi

# --- summary -------------------------------------------------------------------------------
{
    echo "================ run_on_gpu summary ($(date -u +%FT%TZ), commit ${GIT_COMMIT:-unknown}, $(( $(now) - START ))s) ================"
    printf '%s\n' "${SUMMARY[@]}"
    echo "files: $(cd "$OUT" && find . -type f | sort | tr '\n' ' ')"
    if [ -f "$OUT/bench/bench.log" ]; then
        echo
        awk '/^=====/ { table = 1 } table' "$OUT/bench/bench.log"
    fi
    echo
    echo "---------------- setup log ----------------"
    cat "$SETUP_LOG" 2>/dev/null
} >"$OUT/summary.txt"
rm -f "$SETUP_LOG"
# The benchmark's table, then the step lines last, so that they end the output the device tool returns.
echo
awk '/^=====/ { table = 1 } table' "$OUT/bench/bench.log" 2>/dev/null | tail -n 60
echo
sed -n '1,/^files:/p' "$OUT/summary.txt"
exit $(( FAILED > 0 ))
