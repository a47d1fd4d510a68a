#!/usr/bin/env bash
# A second, shorter GPU command beside run_on_gpu.sh: ncu's detail on a few kernels (why they run
# under the bandwidth the cost model predicts: occupancy, warp stall reasons, the most stalled
# instructions), after the GPU tests named in PROFILE_TESTS and an optional bench_kl.py shape.
#
#     bash benchmarks/profile_on_gpu.sh                      # the default cases below
#     CASES=16384x1000:float32:1 bash benchmarks/profile_on_gpu.sh
#     XDG_CACHE_HOME=$PWD/.kcache ...                        # cubins built here, carried (saves nvcc time there)
#
# Environment: CASES (ncu_driver.py --cases), PROFILE_TESTS (a pytest -k expression, empty: none),
# BENCH_SHAPES (bench_kl.py --shapes for ours in float32, empty: none), SOURCE_KERNELS (kernels whose
# per-instruction stall samples go to source-<kernel>.csv), TOTAL_S (default 330).
# Files in $OUT (default /tmp/profile_on_gpu): setup.log tests.log bench/ ncu_run.log ncu_detail.log source-*.csv.
set -u
cd "$(dirname "$0")/.." || exit 1
START=$(date +%s)
OUT=${OUT:-/tmp/profile_on_gpu}
TOTAL_S=${TOTAL_S:-330}
KIT=${KIT:-shared/device}
# (The first loan profiled the plain kernels; the defaults now are the prefetching kernels the second
# took for bfloat16, the slowest of which, 8192x32000 normTarget at 49 %, no ncu has seen yet.)
CASES=${CASES:-16384x1000:bfloat16:1,16384x1000:bfloat16:1:plain,8192x32000:bfloat16:1,8192x32000:bfloat16:1:plain,8192x32000:bfloat16:0,2048x128256:bfloat16:0,16x1048576:bfloat16:1,16384x1000:float32:1}
PROFILE_TESTS=${PROFILE_TESTS-}
BENCH_SHAPES=${BENCH_SHAPES-}
SOURCE_KERNELS=${SOURCE_KERNELS:-kl_rows_bf16_g32_e32_prefetch_normt kl_cluster_bf16_t128_e32_prefetch_normt}
SECTIONS=(SpeedOfLight LaunchStats Occupancy WarpStateStats SchedulerStats MemoryWorkloadAnalysis SourceCounters)
left() { echo $(( TOTAL_S - ($(date +%s) - START) )); }
mkdir -p "$OUT" || exit 1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1

sh "$KIT/setup.sh" >"$OUT/setup.log" 2>&1 || { echo "setup failed:"; tail -5 "$OUT/setup.log"; exit 3; }
tail -1 "$OUT/setup.log"
if [ -n "$PROFILE_TESTS" ]; then
    PUZZLELIB_COST_REQUIRE_GPU=1 timeout -k 5 90 python3 -m pytest -q -p no:cacheprovider -rfE -m pycuda \
        tests/test_gpu.py tests/test_kernels_emulated.py -k "$PROFILE_TESTS" >"$OUT/tests.log" 2>&1
    echo "tests (rc=$?): $(tail -1 "$OUT/tests.log")"
fi
if [ -n "$BENCH_SHAPES" ]; then
    timeout -k 5 90 python3 benchmarks/bench_kl.py --out "$OUT/bench" --shapes "$BENCH_SHAPES" --dtypes float32 \
        --impls ours,torch_eager >"$OUT/bench.log" 2>&1
    echo "bench (rc=$?):"; grep -E '^ *[0-9]+x[0-9]+ ' "$OUT/bench.log"
fi
NCU=$(command -v ncu || ls /usr/local/cuda/bin/ncu 2>/dev/null)
[ -n "$NCU" ] || { echo "ncu not found"; exit 1; }
args=(--clock-control none --nvtx --kernel-name "regex:^kl_" --print-details all --import-source no)
for section in "${SECTIONS[@]}"; do args+=(--section "$section"); done
# (With --export ncu prints nothing of the kernels: the text comes from the report, read back.)
timeout -k 5 $(( $(left) - 30 )) "$NCU" "${args[@]}" --export "$OUT/detail" --force-overwrite \
    python3 benchmarks/ncu_driver.py --calls 1 --cases "$CASES" >"$OUT/ncu_run.log" 2>&1
echo "ncu (rc=$?): $(tail -1 "$OUT/ncu_run.log")"
timeout -k 5 20 "$NCU" --import "$OUT/detail.ncu-rep" --page details --print-details all >"$OUT/ncu_detail.log" 2>&1
echo "$(grep -c -E '^ +kl_\w+ \(' "$OUT/ncu_detail.log") kernels in ncu_detail.log"
for kernel in $SOURCE_KERNELS; do
    timeout -k 5 20 "$NCU" --import "$OUT/detail.ncu-rep" --kernel-name "$kernel" --launch-count 1 --page source \
        --print-source sass --csv >"$OUT/source-$kernel.csv" 2>&1
done
rm -f "$OUT/detail.ncu-rep"   # (too large to bring back; the text and the CSVs hold what is read)
# The short story last: per kernel, duration, DRAM throughput, occupancy and the top stall reasons.
grep -E '^ +kl_\w+ \(|Duration|DRAM Throughput|Achieved Occupancy|Theoretical Occupancy|Registers Per Thread|Warp Cycles Per Issued|Issued Warp Per Scheduler|No Eligible' "$OUT/ncu_detail.log"
echo "profile_on_gpu: $(( $(date +%s) - START )) s"
