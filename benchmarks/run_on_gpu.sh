#!/usr/bin/env bash
# The GPU kit: tests, sanitizers, ncu and the benchmark on the lent GPU machine, as one command
# from the repo root (that machine is lent rarely and for minutes, so nothing here may waste it):
#
#     bash benchmarks/run_on_gpu.sh            # PLAN=full: everything below, in one 10-minute command
#     bash benchmarks/run_on_gpu.sh quick      # PLAN=quick: setup, GPU tests, a short benchmark, the model
#     bash benchmarks/run_on_gpu.sh costs      # PLAN=costs: setup, then every cost against PyTorch (bench_costs.py)
#     bash benchmarks/run_on_gpu.sh distill    # PLAN=distill: setup, then bench_kl.py's distillation modes and sparse teachers
#     bash benchmarks/run_on_gpu.sh choices    # PLAN=choices: setup, then benchmarks/try_choices.py (kernel choices to settle)
#     bash benchmarks/run_on_gpu.sh --dry-run  # DRY_RUN=1: the same steps, CPU-sized, on a machine without a GPU
#     GIT_COMMIT=<sha> ...                     # names the commit measured (.git does not travel there)
#
# Steps (the plan picks them; STEPS="setup bench" overrides; each runs whatever happened before it,
# except the gate):
#   setup      pycuda from the shared/device kit (KIT, default ./shared/device, else ../shared/device),
#              the liger_kernel wheel; PYTHONPATH=. for this checkout (the machine has no package index);
#              the cubins prebuilt on a machine without a GPU (.kcarry/kcache.tgz, from try_choices.py
#              --prebuild sm_90; carry .kcarry; KCARRY names another) unpacked into the kernel cache
#              (XDG_CACHE_HOME, else ~/.cache), so that nvcc builds none
#   gate       always, right after setup: `import pycuda.driver` must work and the library's
#              active_backend() must be "cuda", else the run STOPS (exit 3) within seconds: every GPU
#              test would only skip and the benchmark would time the peers alone
#   probes     benchmarks/probe_constants.py: the cost model's constants measured on this GPU (copy
#              bandwidth, DRAM latency under load, launch gap, the last block's sum, the cluster
#              exchange, the bytes L2 keeps for a second read), in about 20 s; the model then predicts
#              with them too (model.json's predicted_fraction_probed); the JSON goes to setup.log
#   tests      the GPU tests: pytest -m pycuda tests (test_gpu.py included) with
#              PUZZLELIB_COST_REQUIRE_GPU=1, so that they fail rather than skip without a GPU
#   memcheck   compute-sanitizer --tool memcheck  on pytest tests/test_gpu.py -x (not the 10000-call test)
#   racecheck  compute-sanitizer --tool racecheck on its kernel-path tests (every shape with normTarget, labels)
#   ncu        ncu --section SpeedOfLight + inst executed and DRAM bytes, on benchmarks/ncu_driver.py
#              (ncu_driver.CASES, normTarget=True: 16384x1000 and 8192x32000 float32 and bfloat16,
#              512x128256 float32, and the plain twins of the two bfloat16 cases)
#   model      benchmarks/cost_model.py --json (COST_MODEL), when it is there, in the background
#              (with --constants from the probes when they ran)
#   bench      benchmarks/bench_kl.py: full when >= 240 s are left (BENCH=auto), else --quick
#   costs      benchmarks/bench_costs.py: every cost, ours (call and torch module) against PyTorch eager
#              and Liger where it has the cost; torch.compile only with COSTS_COMPILE=1 (its compiles
#              take minutes); files costs/costs.log and costs/costs.json
#   distill    benchmarks/bench_kl.py --suite distill,sparse: forward, forward T=2, reverse and JSD on
#              teacher logits (float32, bfloat16) against torch eager/compile and Liger, then the sparse
#              top-k teachers against the dense computation; the cases past 75 % of its time budget are
#              skipped (torch.compile past 60 %) and the sparse ones get the rest; files distill/distill.log,
#              distill/results.json, distill/results.png
#   choices    benchmarks/try_choices.py: the library against the kernel choices still to settle (now
#              the PLC_TRY_ONE_BUFFER, PLC_TRY_PASS2_PREFETCH, PLC_TRY_CHUNK_* and
#              PLC_TRY_IN_PLACE builds, 91 timings (a205773 timed 176 in 32 s): carry
#              .kcarry, made with try_choices.py --prebuild sm_90, or nvcc takes minutes here), each choice's grad checked
#              against the default's; files choices/choices.log and choices/choices.json (cost_model.py --fit
#              reads it)
#   PLAN=full: setup probes tests memcheck racecheck ncu bench model; PLAN=quick: setup probes tests bench model;
#   PLAN=costs: setup costs; PLAN=distill: setup distill; PLAN=choices: setup choices (each its own plan:
#   full's steps already fill the 10 minutes a command may take).
# A dry run installs nothing and needs no GPU: the gate only reports; tests and sanitizers collect
# their tests (no sanitizer), ncu runs the driver on the CPU (ncu --version where ncu exists), the
# benchmark is bench_kl.py --dry-run on one small shape.  It writes the same files.
# Files in $OUT (the device tool's, else benchmarks/results/run-DATE, or /tmp for a dry run),
# at most 8, 1 folder deep, each written as its step goes:
#   summary.txt (a line per step, rewritten after each; at the end the benchmark table, model vs
#   measured, the ncu kernels)  setup.log (setup and gate)  tests.log (tests, memcheck, racecheck)
#   ncu.log  model.json  bench/bench.log  bench/results.json  bench/results.png
# The device tool stops a command after 10 minutes: every step has a time cap, cut to what is left of
# TOTAL_S (570) less RESERVE_S (20) for the summary, so the whole stays under TOTAL_S.  Caps
# (environment): SETUP_S 150, GATE_S 120, PROBES_S 60, TESTS_S 150, SANITIZER_S 90 each, NCU_S 120, MODEL_S 90;
# the benchmark gets what is left.  Exit: 0 all ok, 1 a step failed, 2 usage, 3 stopped at the gate.
set -u
cd "$(dirname "$0")/.." || exit 1
START=$(date +%s)

usage() { sed -n '2,/^set -u$/p' "$0" | sed '$d; s/^# \{0,1\}//'; }
PLAN=${PLAN:-full}
DRY_RUN=${DRY_RUN:-0}
for arg in "$@"; do
    case $arg in
        full | quick | costs | distill | choices) PLAN=$arg ;;
        --dry-run | dry-run) DRY_RUN=1 ;;
        -h | --help) usage; exit 0 ;;
        *) usage >&2; echo "run_on_gpu: unknown argument $arg" >&2; exit 2 ;;
    esac
done
case $PLAN in
    full) PLAN_STEPS="setup probes tests memcheck racecheck ncu bench model" ;;
    quick) PLAN_STEPS="setup probes tests bench model" ;;
    costs) PLAN_STEPS="setup costs" ;;
    distill) PLAN_STEPS="setup distill" ;;
    choices) PLAN_STEPS="setup choices" ;;
    *) echo "run_on_gpu: PLAN must be full, quick, costs, distill or choices, not $PLAN" >&2; exit 2 ;;
esac
[ "$DRY_RUN" = 1 ] && DRY=1 || DRY=0
STEPS=${STEPS:-$PLAN_STEPS}
PY=${PYTHON:-python3}
if [ "$DRY" = 1 ]; then
    OUT=${OUT:-${TMPDIR:-/tmp}/run_on_gpu-dry-$(date -u +%Y%m%d-%H%M%S)}
else
    OUT=${OUT:-$PWD/benchmarks/results/run-$(date -u +%Y%m%d-%H%M%S)}
fi
TOTAL_S=${TOTAL_S:-570}
RESERVE_S=${RESERVE_S:-20}
SETUP_S=${SETUP_S:-150}
GATE_S=${GATE_S:-120}
PROBES_S=${PROBES_S:-60}
TESTS_S=${TESTS_S:-150}
SANITIZER_S=${SANITIZER_S:-90}
NCU_S=${NCU_S:-120}
MODEL_S=${MODEL_S:-90}
BENCH=${BENCH:-auto}
COST_MODEL=${COST_MODEL:-benchmarks/cost_model.py}
KCARRY=${KCARRY:-.kcarry/kcache.tgz}   # the prebuilt cubins (try_choices.py --prebuild), when carried
if [ -z "${KIT:-}" ]; then   # only ./shared travels to the GPU machine; ../shared is this machine's
    KIT=shared/device
    [ -f "$KIT/setup.sh" ] || [ ! -f ../shared/device/setup.sh ] || KIT=../shared/device
fi

# The GPU tests: every test marked pycuda (all of tests/test_gpu.py is).  Under the sanitizers:
# test_gpu.py alone, without the 10000-call memory test (minutes under instrumentation).
GPU_TESTS=(-m pytest -q -p no:cacheprovider -rfEs -m pycuda tests)
SANITIZED_TESTS=(-m pytest -q -p no:cacheprovider -x tests/test_gpu.py -k "not memory_flat")
# racecheck is slower (on an H100 it got through 31 of those 40 tests in its 90 s): the tests of
# the kernel paths alone, not the interop ones, which add no shared-memory code.  First (as they
# come first in the file) the prefetching and tiled twins, whose copies into shared memory and
# barriers are the ones most worth checking, then every shape with normTarget, and the labels.
RACECHECK_TESTS=(-m pytest -q -p no:cacheprovider -x tests/test_gpu.py
                 -k "twin or match_reference_and_cpu and True or labels")
NCU_ARGS=(--clock-control none --nvtx --section SpeedOfLight --metrics "smsp__inst_executed.sum,dram__bytes.sum"
          --kernel-name "regex:^kl_")   # the clocks stay as found (METHOD.md); our kernels only

mkdir -p "$OUT" || exit 1
WORK=$(mktemp -d) || exit 1
trap 'rm -rf "$WORK"' EXIT
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
[ -n "${GIT_COMMIT:-}" ] || GIT_COMMIT=$(git rev-parse HEAD 2>/dev/null) || GIT_COMMIT=""
export GIT_COMMIT

SUMMARY=()
FAILED=0
STATE=running
DEVICE=$(timeout 10 nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1)
now() { date +%s; }
wants() { case " $STEPS " in *" $1 "*) return 0 ;; *) return 1 ;; esac; }
# Seconds a step may take: its cap, cut to what is left of TOTAL_S after the reserve.
cap() {
    local left=$(( START + TOTAL_S - RESERVE_S - $(now) ))
    [ "$1" -lt "$left" ] && echo "$1" || echo "$left"
}
# Runs a command under a time limit; the kill after 5 s more is in RESERVE_S.
# (At least 1 s: `timeout 0` would mean no limit at all.)
limited() { local s=$1; shift; [ "$s" -ge 1 ] || s=1; timeout -k 5 "$s" "$@"; }
# Last line of a log that pytest ends with ("3 passed, 1 skipped in 2.0s"), else "".
pytest_line() { grep -E '(passed|failed|error|skipped|selected|collected|deselected|no tests ran).* in [0-9.]+s' "$1" | tail -1; }

write_summary() {   # summary.txt: the step lines so far; with "final", the tables after them
    {
        echo "================ run_on_gpu $PLAN$([ "$DRY" = 1 ] && echo ' DRY RUN (CPU, no GPU figures)') ($STATE; ${DEVICE:-no GPU seen by nvidia-smi}; $(date -u +%FT%TZ); commit ${GIT_COMMIT:-unknown}; $(( $(now) - START ))s) ================"
        printf '%s\n' "${SUMMARY[@]}"
        echo "files: $(cd "$OUT" && find . -type f | sort | tr '\n' ' ')"
        if [ "${1:-}" = final ]; then
            [ -f "$OUT/bench/bench.log" ] && { echo; awk '/^=====/ { table = 1 } table' "$OUT/bench/bench.log"; }
            [ -f "$OUT/costs/costs.log" ] && { echo; cat "$OUT/costs/costs.log"; }
            [ -f "$OUT/distill/distill.log" ] && { echo; awk '/^=====/ { table = 1 } table' "$OUT/distill/distill.log"; }
            [ -f "$OUT/model.json" ] && { echo; "$PY" benchmarks/kit_report.py pairs "$OUT/model.json" "$OUT/bench/results.json"; }
            [ "$DRY" = 0 ] && [ -f "$OUT/ncu.log" ] && { echo; "$PY" benchmarks/kit_report.py ncu "$OUT/ncu.log"; }
        fi
    } >"$OUT/summary.txt" 2>&1
}
record() {   # step name, exit code (or "skipped"), start time, note
    local status rc=$2
    case $rc in
        0) status=ok ;;
        skipped) status=skipped; rc=- ;;
        124 | 137) status="TIMED OUT"; FAILED=$((FAILED + 1)) ;;
        *) status=FAILED; FAILED=$((FAILED + 1)) ;;
    esac
    SUMMARY+=("$(printf '%-9s %-9s rc=%-3s %4ss  %s' "$1" "$status" "$rc" "$(( $(now) - $3 ))" "$4")")
    write_summary
}
# A step whose cap is used up is not started; it counts as timed out.
no_time() { record "$1" 124 "$(now)" "not run: TOTAL_S=${TOTAL_S}s is used up"; }
finish() {   # final summary; its tables, then the step lines last (the device tool returns the end)
    STATE=${1:-done}
    write_summary final
    echo
    sed -n '/^files:/,$p' "$OUT/summary.txt" | sed 1d | tail -n 80
    echo
    sed -n '1,/^files:/p' "$OUT/summary.txt"
}
step_header() { echo "==== $1 ($(date -u +%TZ)): $2"; }

echo "run_on_gpu: plan $PLAN$([ "$DRY" = 1 ] && echo ' (dry run)'), steps: $STEPS; OUT=$OUT"
write_summary

# --- setup ---------------------------------------------------------------------------------
if wants setup; then
    t=$(now); s=$(cap "$SETUP_S")
    {
        step_header setup "kit $KIT"
        ls -la "$KIT" "$KIT/wheels" 2>&1
        if [ "$DRY" = 1 ]; then
            # A dry run must not install pycuda here: this machine's tests build their own against a stand-in.
            echo "DRY RUN: nothing installed; setup.sh would pip-install pycuda into $PY's environment"
            "$PY" -c "import pycuda; print('pycuda', pycuda.VERSION_TEXT, 'importable')" 2>&1 | tail -1
            rc_pycuda=0
        elif [ -f "$KIT/setup.sh" ]; then
            PYTHON=$PY limited "$s" sh "$KIT/setup.sh"
            rc_pycuda=$?
        else
            echo "no kit: $KIT/setup.sh is missing (copy ../shared/device to ./shared/device before the run; README.md)"
            rc_pycuda=1
        fi
        echo "== prebuilt cubins"
        if [ ! -f "$KCARRY" ]; then
            echo "none ($KCARRY is not here: nvcc builds the kernels at their first use)"
        elif [ "$DRY" = 1 ]; then
            echo "DRY RUN: would unpack $KCARRY into ${XDG_CACHE_HOME:-$HOME/.cache}:"; tar tzf "$KCARRY"
        else
            mkdir -p "${XDG_CACHE_HOME:-$HOME/.cache}" && tar xzvf "$KCARRY" -C "${XDG_CACHE_HOME:-$HOME/.cache}"
        fi
        # Whether they match these kernels and this nvcc (a miss: a build of about 45 s, made in
        # parallel after the gate).  A dry run checks the archive itself, unpacked aside: this
        # machine's cache is not what the GPU machine gets.
        if [ -f "$KCARRY" ] && [ "$DRY" = 1 ]; then
            mkdir -p "$WORK/kcarry" && tar xzf "$KCARRY" -C "$WORK/kcarry"
            PREBUILT=$(XDG_CACHE_HOME="$WORK/kcarry" limited "$(cap 30)" "$PY" benchmarks/try_choices.py --check-prebuilt sm_90 | tail -1)
        else
            PREBUILT=$(limited "$(cap 30)" "$PY" benchmarks/try_choices.py --check-prebuilt sm_90 | tail -1)
        fi
        echo "$PREBUILT"
        echo "== liger_kernel"
        rc_liger=1
        for wheel in "$KIT"/wheels/liger_kernel-*.whl; do
            [ -f "$wheel" ] || continue
            if [ "$DRY" = 1 ]; then echo "DRY RUN: would install $wheel"; rc_liger=0; break; fi
            limited "$(cap 60)" "$PY" -m pip install -q --no-index --no-deps "$wheel" && rc_liger=0 && break
        done
        [ "$rc_liger" = 0 ] || echo "liger_kernel wheel not found or not installed (the liger peer will be skipped)"
        echo "== machine"
        limited "$(cap 20)" nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem --format=csv 2>&1
        limited "$(cap 20)" nvcc --version 2>&1 | tail -1
        for tool in ncu compute-sanitizer; do echo "$tool: $(limited "$(cap 20)" "$tool" --version 2>&1 | tail -1)"; done
        limited "$(cap 60)" "$PY" -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no CUDA')" 2>&1 | tail -1
        echo "$rc_pycuda $rc_liger" >"$WORK/setup.rc"
    } >>"$OUT/setup.log" 2>&1
    read -r rc_pycuda rc_liger <"$WORK/setup.rc"
    note="pycuda: $(grep -m1 -E '^pycuda .* on ' "$OUT/setup.log" || echo 'not installed or not working, see setup.log'); liger_kernel: $([ "$rc_liger" = 0 ] && echo ok || echo missing)"
    [ "$DRY" = 1 ] && note="dry run, nothing installed; kit: $([ -f "$KIT/setup.sh" ] && echo "$KIT" || echo "not found (needed on the GPU machine)")"
    record setup "$rc_pycuda" "$t" "$note; ${PREBUILT:-no prebuilt cubins checked}"
fi

# --- gate: stop now if the library cannot run on the GPU ----------------------------------
# Without it every GPU test skips and bench_kl.py times the peers alone: a lent GPU wasted.
t=$(now)
limited "$(cap "$GATE_S")" "$PY" - >"$WORK/gate.log" 2>&1 <<'PY'
import sys
try:
    import pycuda.driver  # noqa: F401
except Exception as exc:
    print(f"import pycuda.driver failed: {type(exc).__name__}: {exc}".splitlines()[0][:300])
    sys.exit(3)
try:
    import puzzlelib_cost
    backend, description = puzzlelib_cost.active_backend(), puzzlelib_cost.describe_backend()
except Exception as exc:   # PUZZLELIB_COST_BACKEND=cuda where CUDA is not usable raises, saying why
    print(f"active_backend() failed: {type(exc).__name__}: {exc}".splitlines()[0][:300])
    sys.exit(4)
print(f"backend is {backend!r}, not 'cuda': {description}"[:300] if backend != "cuda" else f"backend: {description}")
sys.exit(0 if backend == "cuda" else 4)
PY
rc=$?
{ step_header gate "import pycuda.driver; puzzlelib_cost.active_backend() == 'cuda'"; cat "$WORK/gate.log"; echo "rc=$rc"; } >>"$OUT/setup.log"
gate_note=$(tail -1 "$WORK/gate.log")
[ "$rc" = 124 ] || [ "$rc" = 137 ] && gate_note="no answer within the cap (GATE_S=${GATE_S}s)"
if [ "$DRY" = 1 ]; then
    record gate skipped "$t" "dry run, no GPU required; found: ${gate_note:-nothing printed}"
elif [ "$rc" != 0 ]; then
    record gate "$rc" "$t" "${gate_note:-the check printed nothing (setup.log)}"
    SUMMARY+=("STOPPED at the gate: the library cannot run on this GPU, so no GPU test or benchmark was run (they would skip, or time the peers alone). setup.log says why; DRY_RUN=1 runs the kit without a GPU.")
    finish "STOPPED at the gate"
    exit 3
else
    record gate 0 "$t" "$gate_note"
fi

# --- cubins the prebuilt archive lacks: built now, in parallel, not one by one at first use -----
# (each build is about 45 s of one core; in a step that times builds one after another, eight
# would have taken most of the choices plan's minutes).  Only for the choices step: the others
# load the library's cubin alone (at e87a174 a tests-only call built the six choices' cubins it
# lacked, 105 s, and its tests ran out of time).
if [ "$DRY" != 1 ] && wants choices && ! echo "${PREBUILT:-}" | grep -qE 'prebuilt cubins: ([0-9]+) of \1 '; then
    t=$(now)
    limited "$(cap 240)" "$PY" benchmarks/try_choices.py --build-missing sm_90 >"$WORK/cubins.log" 2>&1
    rc=$?
    { step_header cubins "try_choices.py --build-missing sm_90"; tail -12 "$WORK/cubins.log"; } >>"$OUT/setup.log"
    record cubins "$rc" "$t" "$(grep -m1 -E '^built ' "$WORK/cubins.log" || echo 'see setup.log')"
fi

# --- probes: the cost model's constants on this GPU -----------------------------------------
PROBED=()
if wants probes; then
    t=$(now); s=$(cap "$PROBES_S")
    if [ -f benchmarks/probe_constants.py ]; then
        flags=(--json)
        [ "$DRY" = 1 ] && flags+=(--dry-run)
        limited "$s" "$PY" benchmarks/probe_constants.py "${flags[@]}" >"$WORK/probes.json" 2>"$WORK/probes.err"
        rc=$?
        { step_header probes "$PY benchmarks/probe_constants.py ${flags[*]}"; cat "$WORK/probes.json" "$WORK/probes.err"; echo "rc=$rc"; } >>"$OUT/setup.log"
        note=$("$PY" -c 'import json, sys; c = json.load(open(sys.argv[1]))["constants"]; print(", ".join(f"{k} {v:.3g}" for k, v in c.items()))' "$WORK/probes.json" 2>/dev/null) || { [ "$rc" = 0 ] && rc=1; note="no constants: $(tail -1 "$WORK/probes.err")"; }
        [ "$rc" = 0 ] && PROBED=(--constants "$WORK/probes.json")
        [ "$rc" = 124 ] || [ "$rc" = 137 ] && note="stopped after ${s}s (PROBES_S); see setup.log"
        record probes "$rc" "$t" "$([ "$DRY" = 1 ] && echo 'dry run, made-up times: ')$note"
    else
        record probes skipped "$t" "benchmarks/probe_constants.py is not there"
    fi
fi

# --- model (background: it needs no GPU, so it runs beside the GPU steps) ------------------
MODEL_PID=""
if wants model; then
    t_model=$(now)
    if [ -f "$COST_MODEL" ]; then
        s=$(cap "$MODEL_S")
        ( limited "$s" "$PY" "$COST_MODEL" --json "${PROBED[@]}" >"$OUT/model.json" 2>"$WORK/model.err"; echo "$? $(now)" >"$WORK/model.rc" ) &
        MODEL_PID=$!
    else
        record model skipped "$t_model" "$COST_MODEL is not there (yet): no predictions"
    fi
fi

# --- GPU tests -----------------------------------------------------------------------------
if wants tests; then
    t=$(now); s=$(cap "$TESTS_S")
    if [ "$s" -lt 10 ]; then
        no_time tests
    elif [ "$DRY" = 1 ]; then
        # CPU-sized: the same selection, collected only (running it needs a GPU or the stand-in's build).
        { step_header tests "DRY RUN: $PY ${GPU_TESTS[*]} --collect-only"; limited "$s" "$PY" "${GPU_TESTS[@]}" --collect-only; } >"$WORK/step.log" 2>&1
        rc=$?
        cat "$WORK/step.log" >>"$OUT/tests.log"
        n_gpu=$(grep -c '^tests/test_gpu.py::' "$WORK/step.log")
        [ "$rc" = 0 ] && [ "$n_gpu" = 0 ] && rc=1   # the selection must hold test_gpu.py
        record tests "$rc" "$t" "dry run, collected only: $(pytest_line "$WORK/step.log"), $n_gpu of them in test_gpu.py"
    else
        { step_header tests "PUZZLELIB_COST_REQUIRE_GPU=1 $PY ${GPU_TESTS[*]}"
          PUZZLELIB_COST_REQUIRE_GPU=1 limited "$s" "$PY" "${GPU_TESTS[@]}"; } >"$WORK/step.log" 2>&1
        rc=$?
        cat "$WORK/step.log" >>"$OUT/tests.log"
        note=$(pytest_line "$WORK/step.log")
        [ "$rc" = 124 ] || [ "$rc" = 137 ] && note="stopped after ${s}s (TESTS_S), unfinished; see tests.log"
        record tests "$rc" "$t" "$note"
    fi
fi

# --- compute-sanitizer ---------------------------------------------------------------------
SANITIZER=$(command -v compute-sanitizer || ls /usr/local/cuda/bin/compute-sanitizer 2>/dev/null || echo "")
for tool in memcheck racecheck; do
    wants "$tool" || continue
    t=$(now); s=$(cap "$SANITIZER_S")
    tests=("${SANITIZED_TESTS[@]}")
    [ "$tool" = racecheck ] && tests=("${RACECHECK_TESTS[@]}")
    if [ "$s" -lt 10 ]; then
        no_time "$tool"
    elif [ "$DRY" = 1 ]; then
        { step_header "$tool" "DRY RUN: compute-sanitizer ${SANITIZER:-not found}; $PY ${tests[*]} --collect-only"
          [ -n "$SANITIZER" ] && limited 20 "$SANITIZER" --version
          limited "$s" "$PY" "${tests[@]}" --collect-only; } >"$WORK/step.log" 2>&1
        rc=$?
        cat "$WORK/step.log" >>"$OUT/tests.log"
        record "$tool" "$rc" "$t" "dry run, compute-sanitizer ${SANITIZER:+found}${SANITIZER:-not found}, collected only: $(pytest_line "$WORK/step.log")"
    elif [ -z "$SANITIZER" ]; then
        step_header "$tool" "compute-sanitizer not found" >>"$OUT/tests.log"
        record "$tool" 127 "$t" "compute-sanitizer not found"
    else
        # API errors are the library's own business (it checks every driver call); report memory and races.
        cmd=("$SANITIZER" --tool "$tool" --report-api-errors no --error-exitcode 99 --print-limit 100 "$PY" "${tests[@]}")
        { step_header "$tool" "PUZZLELIB_COST_REQUIRE_GPU=1 ${cmd[*]}"; PUZZLELIB_COST_REQUIRE_GPU=1 limited "$s" "${cmd[@]}"; } >"$WORK/step.log" 2>&1
        rc=$?
        cat "$WORK/step.log" >>"$OUT/tests.log"
        note="$(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY' "$WORK/step.log" | tail -1); $(pytest_line "$WORK/step.log")"
        [ "$rc" = 124 ] || [ "$rc" = 137 ] && note="stopped after ${s}s (SANITIZER_S); $note"
        record "$tool" "$rc" "$t" "$note"
    fi
done

# --- ncu -----------------------------------------------------------------------------------
NCU=$(command -v ncu)
for candidate in /usr/local/cuda/bin/ncu /opt/nvidia/nsight-compute/*/ncu; do
    [ -n "$NCU" ] || [ ! -x "$candidate" ] || NCU=$candidate
done
if wants ncu; then
    t=$(now); s=$(cap "$NCU_S")
    if [ "$s" -lt 10 ]; then
        no_time ncu
    elif [ "$DRY" = 1 ]; then
        { step_header ncu "DRY RUN: ncu ${NCU:-not found}; $PY benchmarks/ncu_driver.py --dry-run (no ncu: no GPU)"
          [ -n "$NCU" ] && limited 20 "$NCU" --version
          limited "$s" "$PY" benchmarks/ncu_driver.py --dry-run; } >>"$OUT/ncu.log" 2>&1
        rc=$?
        if [ -z "$NCU" ] && [ "$rc" = 0 ]; then
            record ncu skipped "$t" "dry run: ncu not found; the driver ran on the CPU"
        else
            record ncu "$rc" "$t" "dry run: ncu ${NCU:+found}${NCU:-not found}; the driver ran on the CPU"
        fi
    elif [ -z "$NCU" ]; then
        step_header ncu "ncu not found" >>"$OUT/ncu.log"
        record ncu 127 "$t" "ncu not found"
    else
        { step_header ncu "$NCU ${NCU_ARGS[*]} $PY benchmarks/ncu_driver.py"
          limited "$s" "$NCU" "${NCU_ARGS[@]}" "$PY" benchmarks/ncu_driver.py; } >>"$OUT/ncu.log" 2>&1
        rc=$?
        note="$(grep -c -E '^\s{1,4}kl_\w+.*\), Context' "$OUT/ncu.log") kernel launches profiled"
        [ "$rc" = 124 ] || [ "$rc" = 137 ] && note="stopped after ${s}s (NCU_S); $note"
        record ncu "$rc" "$t" "$note"
    fi
fi

# --- benchmark -----------------------------------------------------------------------------
if wants bench; then
    t=$(now); s=$(cap 100000)   # what is left
    budget=$(( s - 30 ))        # bench_kl.py's own budget; the rest is for its plot and table
    mode=$BENCH
    [ "$PLAN" = quick ] && [ "$mode" = auto ] && mode=quick
    # (full took 178-192 s of wall time at 007ea3f and 01f464c; bench_kl.py skips the cases past its
    # budget, so 240 s left is enough to start it)
    [ "$mode" = auto ] && { [ "$s" -ge 240 ] && mode=full || mode=quick; }
    flags=(--time-budget "$budget")
    [ "$mode" = quick ] && flags+=(--quick)
    # CPU-sized: one small shape, float32 (both normTarget), against the peers the CPU has.
    [ "$DRY" = 1 ] && { mode=dry; flags=(--dry-run --shapes 16x1000 --dtypes float32); }
    if [ "$budget" -lt 60 ]; then
        record bench 124 "$t" "not run: only ${s}s of TOTAL_S=${TOTAL_S}s left"
    else
        echo "run_on_gpu: bench ($mode, up to ${s}s)"
        mkdir -p "$OUT/bench"
        limited "$s" "$PY" benchmarks/bench_kl.py --out "$OUT/bench" "${flags[@]}" >"$OUT/bench/bench.log" 2>&1
        rc=$?
        record bench "$rc" "$t" "$mode; $(grep -m1 -E '^errors recorded' "$OUT/bench/bench.log" || echo 'no table printed')"
    fi
fi

# --- every cost against PyTorch ------------------------------------------------------------
if wants costs; then
    t=$(now); s=$(cap 100000)   # what is left
    flags=()
    [ "${COSTS_COMPILE:-0}" = 1 ] || flags+=(--no-compile)
    [ "$DRY" = 1 ] && flags=(--dry-run --no-compile --dtypes float32)
    echo "run_on_gpu: costs (up to ${s}s)"
    mkdir -p "$OUT/costs"
    limited "$s" "$PY" benchmarks/bench_costs.py --out "$OUT/costs" "${flags[@]}" >"$OUT/costs/costs.log" 2>&1
    rc=$?
    record costs "$rc" "$t" "$(grep -c ' us (' "$OUT/costs/costs.log") cases timed$([ "$DRY" = 1 ] && echo ' (dry run, on the CPU)')"
fi

# --- distillation modes and sparse teachers (bench_kl.py --suite distill,sparse) ---------------
if wants distill; then
    t=$(now); s=$(cap 100000)   # what is left
    budget=$(( s - 60 ))        # bench_kl.py's own budget; the rest for a case started just before it ends, the plot and table
    flags=(--suite distill,sparse --time-budget "$budget")
    # CPU-sized: one small shape per suite, float32, against the peers the CPU has.
    [ "$DRY" = 1 ] && flags=(--dry-run --suite distill,sparse --distill-shapes 16x1000 --sparse-shapes 8x300 --sparse-k 8 --dtypes float32)
    if [ "$budget" -lt 60 ]; then
        record distill 124 "$t" "not run: only ${s}s of TOTAL_S=${TOTAL_S}s left"
    else
        echo "run_on_gpu: distill (up to ${s}s)"
        mkdir -p "$OUT/distill"
        limited "$s" "$PY" benchmarks/bench_kl.py --out "$OUT/distill" "${flags[@]}" >"$OUT/distill/distill.log" 2>&1
        rc=$?
        record distill "$rc" "$t" "$(grep -c -E '^\[[0-9]+/[0-9]+\] .*(ours [0-9.]+us)' "$OUT/distill/distill.log") cases timed$([ "$DRY" = 1 ] && echo ' (dry run, on the CPU)'); $(grep -m1 -E '^errors recorded' "$OUT/distill/distill.log" || echo 'no table printed')"
    fi
fi

# --- kernel choices to settle (try_choices.py) -----------------------------------------------
if wants choices; then
    t=$(now); s=$(cap 100000)   # what is left
    mkdir -p "$OUT/choices"
    if [ "$DRY" = 1 ]; then   # (timing needs the GPU: a dry run lists the experiments)
        limited "$s" "$PY" benchmarks/try_choices.py --list >"$OUT/choices/choices.log" 2>&1
        rc=$?
        note="$(grep -c 'normTarget=' "$OUT/choices/choices.log") cases listed (dry run: nothing timed)"
    else
        echo "run_on_gpu: choices (up to ${s}s)"
        limited "$s" "$PY" benchmarks/try_choices.py --out "$OUT/choices/choices.json" >"$OUT/choices/choices.log" 2>&1
        rc=$?
        note="$(grep -m1 -E '^best:' "$OUT/choices/choices.log" | cut -c1-400 || true)"
    fi
    record choices "$rc" "$t" "${note:-no result printed (choices/choices.log)}"
fi

# --- model: collect the background run -----------------------------------------------------
if [ -n "$MODEL_PID" ]; then
    wait "$MODEL_PID"
    read -r rc t_end <"$WORK/model.rc" || { rc=1; t_end=$(now); }
    t_model=$(( $(now) - (t_end - t_model) ))   # so that its line shows how long it ran, not how long it waited
    if [ "$rc" = 0 ]; then   # its output must be a JSON list, else it is no use beside the measurements
        check=$("$PY" -c 'import json, sys; v = json.load(open(sys.argv[1])); assert isinstance(v, list), "not a list"; print(len(v), "predictions")' "$OUT/model.json" 2>&1 | tail -1) || rc=1
    else
        check="$(tail -1 "$WORK/model.err")"
        [ -s "$OUT/model.json" ] || rm -f "$OUT/model.json"
    fi
    record model "$rc" "$t_model" "$COST_MODEL --json: $check"
fi

if [ "$FAILED" -gt 0 ]; then finish "done, $FAILED step(s) not ok"; else finish "done"; fi
exit $(( FAILED > 0 ))
