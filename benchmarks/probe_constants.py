#!/usr/bin/env python3
"""Measure the cost model's constants on the GPU at hand (benchmarks/cost_model.py, CONSTANTS).

    python3 benchmarks/probe_constants.py --json > probes.json        # on a GPU, with pycuda
    python3 benchmarks/cost_model.py --constants probes.json --json    # predictions from them too
    python3 benchmarks/probe_constants.py --dry-run                    # no GPU: compile, fit made-up times

The model's constants are a datasheet's and guesses; a lent GPU is rare, so the GPU kit
(benchmarks/run_on_gpu.sh, step "probes") measures them in seconds and runs the model with
them beside the benchmark.  Each probe is a kernel of benchmarks/probes.cu, timed with CUDA
events (median of REPEATS runs) behind a spin kernel that keeps the GPU busy while the host
queues the timed launches, so that their times are the GPU's and not the host's:

  copy_bandwidth      cuMemcpyDtoD of COPY_BYTES: bytes read + written a second
  sms                 the device's multiprocessor count
  dram_latency        probe_dependent_loads on a buffer 20x the L2, with 0.5 to 32 KiB of loads in
                      flight an SM; the model's bandwidth is copy_bandwidth x memory_efficiency x
                      min(1, in flight / needed), needed = copy_bandwidth / sms x dram_latency: the
                      knee of that curve, fitted to the measured one (fit_knee)
  launch_gap          probe_empty, LAUNCHES back to back: the time a kernel takes in the queue
  single_sm_bandwidth probe_read_one_sm: one block of 1024 threads, 128 KiB of loads in flight,
                      reading ONE_SM_BYTES just evicted from L2
  final_sum_latency   probe_final_sum against probe_empty on FINAL_SUM_BLOCKS blocks: the last
                      block's sum of the blocks' partial errors (common.cuh's finish_batch_error),
                      less what the model charges for its reads (blocks x 8 / single_sm_bandwidth)
  cluster_exchange    probe_exchange (sm_90+): clusters of 8 blocks of 256, two blocks an SM, doing
                      nothing but kl_cluster_*'s exchange: the time of one round
  l2_reuse_bytes      probe_read: X bytes read forward just after a read that flushes L2, then in
                      reverse (as kl_cluster_stream_*'s pass 2); the second read is faster by the
                      bytes L2 still held (times the difference of the DRAM and L2 times a byte,
                      the latter from L2_READS reads in a row of sizes L2 holds): the most of them
                      over X from a quarter of the L2 to 4x it (reuse_bytes)

Not measured: memory_efficiency (the share of the copy bandwidth our kernels' streams reach: the
benchmark's times against the predictions say it; the dependent loads' top bandwidth, over the
copy's, is in the details as loads_roof_fraction), issue_rate and issue_efficiency (ncu's
instruction counts against the benchmark's times say more), the clock, and the per-SM limits of
registers, threads and shared memory (the datasheet's).  Prints a JSON object:
{"device", "constants": {name: value}, "details": {name: the raw points}}.
"""
import argparse
import json
import math
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SOURCE = ROOT / "benchmarks" / "probes.cu"
KERNELS = ROOT / "kernels"

REPEATS = 7
COPY_BYTES = 1 << 30
LAUNCHES = 200
FINAL_SUM_BLOCKS = 512
SPIN_SECONDS = 0.05                 # the spin before each timed run: the host's queueing must fit in it
SPIN_ROUNDS_MAX = 2 ** 30
LOADS_IN_FLIGHT = [(active, per_sm) for per_sm in (1, 2, 4, 8) for active in (32, 64, 128, 256)
                   if active == 256 or per_sm == 1]   # (threads of a block of 256 that load, blocks an SM)
LOAD_ROUNDS = 256
EXCHANGE_ROUNDS = (100, 1100)
L2_READS = 20
ONE_SM_BYTES = 128 << 20
MIB = 1 << 20
L2_BYTES = None                     # the sizes of the L2 probe are set by this (None: the device's L2)


# ------------------------------------------------------------------------------------------
# From times to constants (no GPU: tests/test_probes.py checks these on made-up times)
# ------------------------------------------------------------------------------------------
def fit_knee(points):
    """(roof, knee) of bandwidth = roof x min(1, x / knee) fitted to points [(x, bandwidth)] (x:
    bytes in flight an SM) in log space, roof the top bandwidth measured, the knee searched on a
    fine geometric grid between the smallest x and twice the largest."""
    roof = max(bw for _, bw in points)
    low, high = min(x for x, _ in points), 2 * max(x for x, _ in points)

    def misfit(knee):
        return sum((math.log(bw) - math.log(roof * min(1.0, x / knee))) ** 2 for x, bw in points)
    grid = [low * (high / low) ** (i / 400) for i in range(401)]
    return roof, min(grid, key=misfit)


def per_unit(small, large):
    """Slope between two (count, seconds) points: the seconds one more unit adds."""
    (n0, t0), (n1, t1) = small, large
    return (t1 - t0) / (n1 - n0)


def reuse_bytes(reads, l2_reads, l2_bytes):
    """Bytes a reverse second read found in L2, most over the sizes: reads = [(X bytes, first
    read's seconds, second read's seconds)], the first always from DRAM (L2 flushed before);
    l2_reads = [(X bytes, seconds of one read)] of sizes L2 holds (each the mean of L2_READS in a
    row).  The DRAM time a byte is the slope of the first reads over the sizes past 2x the L2,
    the L2 time a byte the slope of l2_reads; then a read that found h X bytes in L2 saved
    h X (dram - l2) seconds: h X = (first - second) / (dram - l2)."""
    big = [(x, t1) for x, t1, _ in reads if x >= 2 * l2_bytes]
    if len(big) < 2 or len(l2_reads) < 2:
        raise ValueError("reuse_bytes needs two sizes past 2x the L2, and two sizes read from L2")
    dram = per_unit(min(big), max(big))
    l2 = per_unit(min(l2_reads), max(l2_reads))
    if not dram > l2 > 0:
        raise ValueError(f"L2 ({l2:.3g} s/B) should be faster than DRAM ({dram:.3g} s/B)")
    return max(0.0, max(min(x, (t1 - t2) / (dram - l2)) for x, t1, t2 in reads))


def constants_from(m, sms):
    """The model's constants from the measurements `m` (measure's dict of raw points), to which
    it adds loads_roof_fraction (the dependent loads' top bandwidth over the copy's)."""
    out = {"sms": sms, "copy_bandwidth": m["copy"]["bytes_moved"] / m["copy"]["seconds"]}
    # Each round moves in_flight_per_sm bytes on every SM: bandwidth = sms x in flight x rounds / seconds.
    points = [(p["in_flight_per_sm"], sms * p["in_flight_per_sm"] * p["rounds"] / p["seconds"]) for p in m["loads"]]
    roof, knee = fit_knee(points)
    m["loads_roof_fraction"] = roof / out["copy_bandwidth"]
    out["dram_latency"] = knee * sms / out["copy_bandwidth"]
    out["launch_gap"] = m["empty"]["seconds"] / m["empty"]["launches"]
    out["single_sm_bandwidth"] = m["one_sm"]["bytes"] / m["one_sm"]["seconds"]
    tail = (m["final_sum"]["seconds"] - m["final_sum"]["empty_seconds"]) / m["final_sum"]["launches"]
    out["final_sum_latency"] = max(0.0, tail - m["final_sum"]["blocks"] * 8 / out["single_sm_bandwidth"])
    if m.get("exchange"):
        e = m["exchange"]
        out["cluster_exchange"] = per_unit((e["rounds"][0], e["seconds"][0]), (e["rounds"][1], e["seconds"][1]))
    if m.get("reads"):
        out["l2_reuse_bytes"] = reuse_bytes([(r["bytes"], r["first"], r["second"]) for r in m["reads"]],
                                            [(r["bytes"], r["seconds"] / r["reads"]) for r in m["l2_reads"]],
                                            m["l2_bytes"])
    return out


# ------------------------------------------------------------------------------------------
# On the GPU
# ------------------------------------------------------------------------------------------
def compile_probes(arch, out_dir):
    cubin = Path(out_dir) / f"probes_{arch}.cubin"
    subprocess.run(["nvcc", "-std=c++17", "-O3", "--cubin", f"-arch={arch}", f"-I{KERNELS}", "-o", str(cubin),
                    str(SOURCE)], check=True, capture_output=True, text=True)
    return cubin


def measure(ordinal=0):
    """(SM count, the raw measurements, the device in words) on GPU `ordinal`, in its primary
    context (the library's)."""
    import pycuda.driver as cuda
    cuda.init()
    device = cuda.Device(ordinal)
    context = device.retain_primary_context()
    context.push()
    try:
        return _measure(cuda, device)
    finally:
        cuda.Context.pop()
        context.detach()


def _measure(cuda, device):
    import numpy as np
    attr = cuda.device_attribute
    sms = device.get_attribute(attr.MULTIPROCESSOR_COUNT)
    l2_bytes = L2_BYTES or device.get_attribute(attr.L2_CACHE_SIZE)
    major, minor = device.compute_capability()
    with tempfile.TemporaryDirectory() as tmp:
        module = cuda.module_from_file(str(compile_probes(f"sm_{major}{minor}", tmp)))
    kernel = {name: module.get_function(name) for name in ("probe_spin", "probe_empty", "probe_final_sum",
                                                          "probe_dependent_loads", "probe_read", "probe_read_one_sm")}
    start, end = cuda.Event(), cuda.Event()
    sink = cuda.mem_alloc(1 << 20)
    m = {"spin_seconds": SPIN_SECONDS}   # the raw points; host_queue_seconds must stay below the spin

    # The spin: rounds for SPIN_SECONDS (its time grows linearly with its rounds).
    def spin(rounds):
        kernel["probe_spin"](np.int32(rounds), sink, grid=(1, 1), block=(32, 1, 1))
    spin(1000)   # (the first launch loads the module)
    start.record(); spin(100000); end.record(); end.synchronize()
    spin_rounds = int(min(SPIN_ROUNDS_MAX, 100000 * SPIN_SECONDS / max(end.time_since(start) * 1e-3, 1e-6)))

    def timed(enqueue, marks=1):
        """Median seconds (a tuple of `marks` of them) between the events around enqueue(mark),
        behind the spin; enqueue calls mark() between its parts."""
        events = [cuda.Event() for _ in range(marks + 1)]
        runs = []
        for _ in range(REPEATS):
            spin(spin_rounds)
            events[0].record()
            queued = iter(events[1:])
            began = time.perf_counter()
            enqueue(lambda: next(queued).record())
            m["host_queue_seconds"] = max(m.get("host_queue_seconds", 0.0), time.perf_counter() - began)
            events[-1].synchronize()
            runs.append([b.time_since(a) * 1e-3 for a, b in zip(events, events[1:])])
        medians = [statistics.median(column) for column in zip(*runs)]
        return medians[0] if marks == 1 else tuple(medians)

    def mark_after(f):
        return lambda mark: (f(), mark())

    m["l2_bytes"] = l2_bytes
    src, dst = cuda.mem_alloc(COPY_BYTES), cuda.mem_alloc(COPY_BYTES)
    cuda.memset_d32(src, 1, COPY_BYTES // 4)
    m["copy"] = {"bytes_moved": 2 * COPY_BYTES,
                 "seconds": timed(mark_after(lambda: cuda.memcpy_dtod(dst, src, COPY_BYTES)))}
    dst.free()

    # Loads in flight: a buffer far past the L2, so that every round is a DRAM access.
    n_vectors = 1 << int(math.log2(COPY_BYTES // 16))
    m["loads"] = []
    for active, per_sm in LOADS_IN_FLIGHT:
        blocks = sms * per_sm

        def loads(mark, blocks=blocks, active=active):
            kernel["probe_dependent_loads"](src, np.int64(n_vectors), np.int32(LOAD_ROUNDS), np.uint32(0),
                                            np.int32(active), sink, grid=(blocks, 1), block=(256, 1, 1))
            mark()
        m["loads"].append({"active_threads": active, "blocks_per_sm": per_sm, "in_flight_per_sm": per_sm * active * 16,
                           "rounds": LOAD_ROUNDS, "seconds": timed(loads)})

    def launches(f, count):
        def enqueue(mark):
            for _ in range(count):
                f()
            mark()
        return enqueue
    empty = lambda blocks: lambda: kernel["probe_empty"](grid=(blocks, 1), block=(256, 1, 1))  # noqa: E731
    m["empty"] = {"launches": LAUNCHES, "seconds": timed(launches(empty(1), LAUNCHES))}

    block_sums, ticket, total = cuda.mem_alloc(8 * FINAL_SUM_BLOCKS), cuda.mem_alloc(4), cuda.mem_alloc(8)
    cuda.memset_d32(ticket, 0, 1)
    final = lambda: kernel["probe_final_sum"](block_sums, ticket, total, grid=(FINAL_SUM_BLOCKS, 1),  # noqa: E731
                                              block=(256, 1, 1))
    m["final_sum"] = {"blocks": FINAL_SUM_BLOCKS, "launches": LAUNCHES,
                      "seconds": timed(launches(final, LAUNCHES)),
                      "empty_seconds": timed(launches(empty(FINAL_SUM_BLOCKS), LAUNCHES))}
    got = np.zeros(1, np.float64)
    cuda.memcpy_dtoh(got, total)
    if got[0] != FINAL_SUM_BLOCKS * (FINAL_SUM_BLOCKS - 1) / 2:
        raise RuntimeError(f"probe_final_sum summed {got[0]}, not {FINAL_SUM_BLOCKS * (FINAL_SUM_BLOCKS - 1) / 2}")

    if major >= 9:
        exchange = module.get_function("probe_exchange")
        blocks = 8 * max(1, 2 * sms // 8)
        seconds = [timed(mark_after(lambda r=r: exchange(np.int32(r), sink, grid=(blocks, 1), block=(256, 1, 1))))
                   for r in EXCHANGE_ROUNDS]
        m["exchange"] = {"blocks": blocks, "rounds": list(EXCHANGE_ROUNDS), "seconds": seconds}

    # Reads by the whole grid (blocks of 256, 8 an SM).
    read_blocks = sms * 8
    read = lambda vectors, reverse: kernel["probe_read"](src, np.int64(vectors), np.int32(reverse), sink,  # noqa: E731
                                                           grid=(read_blocks, 1), block=(256, 1, 1))

    # One SM alone, after the whole buffer read forward (which leaves its start out of L2).
    def flush_then_one_sm(mark, vectors=min(ONE_SM_BYTES, COPY_BYTES // 2) // 16):
        read(n_vectors, 0)
        mark()
        kernel["probe_read_one_sm"](src, np.int64(vectors), sink, grid=(1, 1), block=(1024, 1, 1))
        mark()
    m["one_sm"] = {"bytes": min(ONE_SM_BYTES, COPY_BYTES // 2) // 16 * 16,
                   "seconds": timed(flush_then_one_sm, marks=2)[1]}
    # L2's own rate, then X bytes forward after a read of the whole buffer (which leaves none of
    # them in L2), then in reverse.
    m["l2_reads"] = []
    for x in (l2_bytes // 8, l2_bytes // 4):   # L2's own rate: once to bring them in, then L2_READS times
        def warm_then_reads(mark, vectors=x // 16):
            read(vectors, 0)
            mark()
            for _ in range(L2_READS):
                read(vectors, 1)
            mark()
        _, seconds = timed(warm_then_reads, marks=2)
        m["l2_reads"].append({"bytes": x // 16 * 16, "reads": L2_READS, "seconds": seconds})
    m["reads"] = []
    for x in sorted({l2_bytes // 4, l2_bytes // 2, 3 * l2_bytes // 4, l2_bytes, 5 * l2_bytes // 4,
                     3 * l2_bytes // 2, 2 * l2_bytes, 3 * l2_bytes, 4 * l2_bytes}):
        vectors = min(x, COPY_BYTES) // 16

        def flush_then_reads(mark, vectors=vectors):
            read(n_vectors, 0)   # the flush: the whole buffer, 20x the L2
            mark()
            read(vectors, 0)
            mark()
            read(vectors, 1)
            mark()
        _, first, second = timed(flush_then_reads, marks=3)
        m["reads"].append({"bytes": vectors * 16, "first": first, "second": second})
    if m["host_queue_seconds"] > 0.8 * SPIN_SECONDS:
        print(f"probe_constants: the host took {m['host_queue_seconds'] * 1e3:.1f} ms to queue a timed run, near "
              f"the {SPIN_SECONDS * 1e3:.0f} ms spin: the GPU may have waited for it (launch_gap too high)",
              file=sys.stderr)
    return sms, m, f"{device.name()} (sm_{major}{minor}, {sms} SMs, L2 {l2_bytes / MIB:.0f} MiB)"


def dry_run():
    """No GPU: compile the probes for sm_90 and fit made-up measurements of a device with the
    model's own constants (so the fit must give them back)."""
    with tempfile.TemporaryDirectory() as tmp:
        compile_probes("sm_90", tmp)
    sms, bw, latency, l2 = 132, 3.0e12, 700e-9, 50 * MIB
    knee = bw / sms * latency
    m = {"l2_bytes": l2, "copy": {"bytes_moved": 2 * COPY_BYTES, "seconds": 2 * COPY_BYTES / bw},
         "loads": [{"in_flight_per_sm": x, "rounds": 256, "seconds": sms * x * 256 / (0.95 * bw * min(1.0, x / knee))}
                   for x in (512, 1024, 2048, 4096, 8192, 16384, 32768)],
         "empty": {"launches": LAUNCHES, "seconds": LAUNCHES * 2e-6},
         "one_sm": {"bytes": ONE_SM_BYTES, "seconds": ONE_SM_BYTES / 90e9},
         "final_sum": {"blocks": 512, "launches": LAUNCHES, "seconds": LAUNCHES * (2e-6 + 700e-9 + 512 * 8 / 90e9),
                       "empty_seconds": LAUNCHES * 2e-6},
         "exchange": {"rounds": [100, 1100], "seconds": [3e-6 + 100 * 0.5e-6, 3e-6 + 1100 * 0.5e-6]},
         "l2_reads": [{"bytes": x, "reads": L2_READS, "seconds": L2_READS * (3e-6 + x / 8e12)} for x in (6 * MIB, 12 * MIB)],
         "reads": [{"bytes": x, "first": 3e-6 + x / (0.95 * bw),
                    "second": 3e-6 + min(x, 30 * MIB) / 8e12 + max(0, x - 30 * MIB) / (0.95 * bw)}
                   for x in (12 * MIB, 25 * MIB, 50 * MIB, 100 * MIB, 150 * MIB, 200 * MIB)]}
    return sms, m, "DRY RUN: no GPU; made-up times of a device with the model's constants"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", action="store_true", help="print only the JSON object")
    parser.add_argument("--dry-run", action="store_true", help="no GPU: compile the probes, fit made-up times")
    args = parser.parse_args()
    began = time.time()
    sms, measurements, device = dry_run() if args.dry_run else measure()
    result = {"device": device, "constants": constants_from(measurements, sms), "details": measurements,
              "seconds": round(time.time() - began, 1)}
    if args.json:
        print(json.dumps(result, indent=1))
        return
    print(device)
    for name, value in result["constants"].items():
        print(f"  {name:<20} {value:.4g}")
    print(f"({result['seconds']} s)")


if __name__ == "__main__":
    main()
