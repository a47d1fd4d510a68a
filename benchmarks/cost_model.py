#!/usr/bin/env python3
"""How fast each kernel path should run on an H100, predicted without a GPU.

    python3 benchmarks/cost_model.py            # a table
    python3 benchmarks/cost_model.py --json     # a list of entries, one per (shape, dtype, normTarget)

For every benchmark shape (benchmarks/bench_kl.py), float32 and bfloat16, with and without
normTarget, it takes the kernels the library launches for that case (the host's own choice,
puzzlelib_cost.row_softmax, the prefetching and tiled twins included) and reads their machine code:

- SASS instructions per element, on the path whole aligned vectors take.  The kernels are
  compiled a second time with PLC_COST_MODEL (kernels/common.cuh) and one mode fixed, which
  drops the edge code: the loop over rows (or chunks) becomes straight-line code, and its
  instructions are what every thread executes per pass of that loop, over the elements one pass
  handles (E per thread, of which a short row fills only part).  kl_cluster_stream_* keeps two
  loops over a row's segments inside its row loop: each is counted per segment
  (stream_loops, stream_time).
- Bytes per element: the 16-byte global loads and stores in that loop (each is a pass over an
  array), times the element size, plus the small words (a block's partial error, written and
  read back by the last block; the label of a row); less what a second read finds in L2 (the
  stream kernel's pass 2, the chunked kernels' later passes: stream_time, chunk_l2_hits).
- Registers per thread (the real build), hence blocks per SM.

and predicts the time as a roofline with a few stated constants (CONSTANTS below, an H100 SXM5):
per kernel the larger of memory time and issue time (their sum when only one block fits on an
SM, whose loads, barriers, arithmetic and stores then cannot overlap), memory time stretched when
too few bytes are in flight to cover DRAM latency, plus a launch gap before each kernel that
waits for another and a DRAM latency before each kernel's first bytes arrive; the last block's
sum of the blocks' partial errors runs at what one SM can pull, after a round trip to L2 and back
(final_sum_latency).  The
predicted fraction is the ideal time (pred and target read once, grad written once, at the copy
bandwidth) over that.  Every constant is a lead to be corrected from measurements: when a GPU
is lent, the benchmark records the measured fraction beside this prediction.

Needs nvcc, and cuobjdump with nvdisasm (the CUDA toolkit's, or NVIDIA's nvidia-cuda-cuobjdump and
nvidia-cuda-nvdisasm wheels, which the test extra installs).  Cubins are cached with the library's
(kernel_build.cached_cubin).
"""
import argparse
import json
import math
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from puzzlelib_cost import row_softmax  # noqa: E402  (the host's kernel choice)
from puzzlelib_cost.backends.kernel_build import cached_cubin  # noqa: E402

SHAPES = [(65536, 10), (16384, 1000), (8192, 32000), (2048, 128256), (1024, 262144), (16, 1048576)]
DTYPES = {"float32": ("f32", 4), "bfloat16": ("bf16", 2)}
ARCH = "sm_90"
MODES = {"probabilities": 0, "normTarget": 1, "labels": 2}   # PLC_COST_MODEL_MODE
DIVERGENCES = row_softmax.DIVERGENCES                          # PLC_COST_MODEL_DIVERGENCE

# An H100 SXM5 80 GB.  Measured on one on 2026-11-26 (benchmarks/results/2026-11-26-h100-007ea3f):
# probe_constants.py gave the copy bandwidth, the latencies, one SM's bandwidth, the exchange and the
# L2 share; ncu the clock; issue_efficiency is fitted to the measured fractions (--fit).  The rest
# are assumptions.
CONSTANTS = {
    "sms": 132,
    "copy_bandwidth": 3.01e12,      # B/s a device-to-device copy reaches (read + write; datasheet 3.35e12)
    "memory_efficiency": 0.95,      # of the copy bandwidth, for 16-byte coalesced streams with enough in flight
    "clock": 1.95e9,                # Hz, as ncu saw it under our kernels
    "issue_rate": 132 * 4 * 32 * 1.95e9,   # thread-instructions/s: 4 schedulers per SM, a warp each per clock
    # Of the issue rate, on the instructions this model counts (a kernel's hot loop): fitted to the
    # H100's measurement of the benchmark shapes (0.7 was assumed before; predictions then ran 1.3
    # to 4.6 times the measured speed).  It stands for what the count leaves out (edge and mode
    # branches, the per-block prologue and ticket: ncu counted 1.25 to 1.76 times as many
    # instructions) and for the warps' waits (ncu: 0.27 to 0.53 instructions a scheduler a cycle;
    # each warp loads a row, then computes it through long dependent chains, then stores it).
    # 0.25 fitted to the first loan's kernels; 0.3 to the second's (the prefetching twins overlap
    # loads with that compute; benchmarks/results/2026-11-26-h100-01f464c/model_fit.txt: the
    # measured fractions 0.65-1.48 times the predicted at try_choices.py's shapes).
    "issue_efficiency": 0.3,
    "dram_latency": 3.24e-7,        # s, loaded: the knee of bandwidth against bytes in flight (probe)
    "launch_gap": 1.81e-6,          # s between dependent kernels on one stream (probe)
    "single_sm_bandwidth": 1.02e11, # B/s one SM can pull from DRAM at most (probe)
    "registers_per_sm": 65536,
    "threads_per_sm": 2048,
    "blocks_per_sm": 32,
    "cluster_exchange": 8.1e-7,     # s a block of kl_cluster_* waits per exchange (cluster.sync + DSMEM reads; probe)
    "shared_per_sm": 233472,        # bytes of shared memory an SM has
    "shared_per_block": 232448,     # the most a block may take (opted in)
    # Of the 50 MiB L2, the bytes that keep kl_cluster_stream_*'s segments for their second read
    # (pass 2's own loads and stores are marked to leave first), as the probe's reverse read found.
    "l2_reuse_bytes": 2.5e7,
    "final_sum_latency": 1.31e-6,   # s from the last block's partial error to its sum's start (probe)
}


def use_constants(path):
    """Replace constants by those a GPU measured: benchmarks/probe_constants.py's JSON (its
    "constants"), or a plain {name: value}.  The issue rate follows a measured SM count."""
    found = json.loads(Path(path).read_text())
    found = found.get("constants", found)
    unknown = sorted(set(found) - set(CONSTANTS))
    if unknown:
        raise ValueError(f"{path}: no such constants: {', '.join(unknown)} (known: {', '.join(CONSTANTS)})")
    CONSTANTS.update({name: float(value) for name, value in found.items()})
    if "issue_rate" not in found:
        CONSTANTS["issue_rate"] = CONSTANTS["sms"] * 4 * 32 * CONSTANTS["clock"]
    CONSTANTS["sms"] = int(CONSTANTS["sms"])


# ------------------------------------------------------------------------------------------
# Machine code
# ------------------------------------------------------------------------------------------
def _nvidia_tool(name):
    """A CUDA tool from PATH, else from NVIDIA's PyPI wheel (nvidia-cuda-<name>); None if neither."""
    found = shutil.which(name)
    if found:
        return found
    try:
        import nvidia
    except ImportError:
        return None
    for base in nvidia.__path__:
        for candidate in sorted(Path(base).glob(f"*/bin/{name}")):
            return str(candidate)
    return None


def cuobjdump():
    """cuobjdump, with the nvdisasm it runs for -sass; FileNotFoundError saying what to install."""
    tools = {name: _nvidia_tool(name) for name in ("cuobjdump", "nvdisasm")}
    missing = [name for name, path in tools.items() if path is None]
    if missing:
        raise FileNotFoundError(f"{' and '.join(missing)}: not on PATH and not installed from PyPI "
                                f"(pip install {' '.join('nvidia-cuda-' + name for name in missing)})")
    return tools["cuobjdump"]


def _run_cuobjdump(*args):
    tool = cuobjdump()   # (FileNotFoundError, saying what to install, before nvdisasm's path is needed)
    env = dict(os.environ, NVDISASM_PATH=str(Path(_nvidia_tool("nvdisasm")).parent))
    return subprocess.run([tool, *args], capture_output=True, text=True, check=True, env=env).stdout


_SASS_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(@!?U?P\w+\s+)?([A-Z0-9_.]+)([^;]*);")


def disassemble(cubin):
    """{kernel name: [(address, opcode, operands)]} of every kernel in the cubin."""
    text = _run_cuobjdump("-sass", str(cubin))
    kernels, current = {}, None
    for line in text.splitlines():
        function = re.match(r"\s*Function : (\S+)", line)
        if function:
            current = kernels.setdefault(function.group(1), [])
            continue
        instruction = _SASS_LINE.search(line)
        if instruction and current is not None:
            current.append((int(instruction.group(1), 16), instruction.group(3), instruction.group(4).strip()))
    return kernels


def registers(cubin):
    text = _run_cuobjdump("-res-usage", str(cubin))
    return {name: int(regs) for name, regs in re.findall(r"Function (\S+):\s*\n\s*REG:(\d+)", text)}


@dataclass(frozen=True)
class Loop:
    """The outermost loop of a kernel (over rows or chunks): what a thread executes per pass."""
    instructions: int
    vector_loads: int    # 16-byte global loads
    vector_stores: int   # 16-byte global stores
    # Cluster barriers waited at (UCGABAR_WAIT: each cluster.sync() of kl_cluster_*'s statistics
    # exchanges, one a pass for forward KL, two for reverse KL and JSD, whose S is exchanged too).
    cluster_waits: int = 0


def _loop_spans(code):
    """(start, end) of every loop: from the target of a backward branch to the branch."""
    return [(int(target, 16), address) for address, opcode, operands in code if opcode.startswith("BRA")
            for target in re.findall(r"0x([0-9a-f]+)", operands) if int(target, 16) < address]


def _loop(code, start, end):
    body = [opcode for address, opcode, _ in code if start <= address <= end]
    # (a prefetching kernel's loads are asynchronous copies into shared memory, LDGSTS)
    return Loop(len(body), sum(bool(re.match(r"LDG\.E\.(\w+\.)?128|LDGSTS\.E\.(\w+\.)*128", op)) for op in body),
                sum(bool(re.match(r"STG\.E\.(\w+\.)?128", op)) for op in body), body.count("UCGABAR_WAIT"))


def main_loop(code):
    """The outermost loop of a kernel: from the target of its farthest backward branch to it."""
    spans = _loop_spans(code)
    if not spans:
        raise ValueError("no loop in the kernel")
    return _loop(code, *min(spans, key=lambda span: span[0] - span[1]))


TILE_HELD = 2   # copy_stretch's HELD (kernels/kl_divergence.cu) for the tiled kernels' 16 elements a thread


def tile_loop(code, elements_per_pass, itemsize, n_cols):
    """kl_rows_*_g1_*_tile's row loop as the plain row kernel's would be: a pass is a row a thread
    (ROW_BLOCK rows a block), whose block copies its rows' stretch of each array between global and
    shared memory in the loops inside (copy_stretch: TILE_HELD vectors a thread a trip).  Their
    bodies are counted once a trip; each one that loads (or stores) 16-byte vectors is a pass over
    an array, charged as the plain kernel's whole-vector loads (or stores) of that array."""
    spans = _loop_spans(code)
    outer = min(spans, key=lambda span: span[0] - span[1])
    inner = [_loop(code, *span) for span in set(spans) if span != outer and outer[0] <= span[0] and span[1] <= outer[1]]
    copies = [loop for loop in inner if loop.vector_loads or loop.vector_stores]
    vectors = elements_per_pass * itemsize / 16                     # a thread's vectors of a row's slots
    trips = math.ceil(row_softmax.ROW_BLOCK * n_cols * itemsize / 16 / (TILE_HELD * row_softmax.ROW_BLOCK))
    instructions = _loop(code, *outer).instructions + (trips - 1) * sum(loop.instructions for loop in copies)
    return Loop(instructions, round(vectors * sum(1 for loop in copies if loop.vector_loads)),
                round(vectors * sum(1 for loop in copies if loop.vector_stores)))


@dataclass(frozen=True)
class StreamLoops:
    """kl_cluster_stream_*'s loops: over rows, and inside it pass 1's over segments (nvcc may
    version it: the longest version is taken), for reverse KL and JSD pass 2's (the row's S),
    and the last pass's (the one that stores)."""
    per_row: int         # instructions of the row loop outside the segment loops
    exchanges: int       # cluster barriers a row waits at (its statistics exchanges)
    first: Loop          # one segment of pass 1
    middle: Loop | None  # one segment of pass 2 of reverse KL and JSD (None: forward)
    last: Loop           # one segment of the pass that writes grad


def stream_loops(code, divergent=False):
    spans = _loop_spans(code)
    outer = min(spans, key=lambda span: span[0] - span[1])
    # The segment loops: the loops inside the row loop that no other loop inside it contains.
    inner = [span for span in spans if span != outer and outer[0] <= span[0] and span[1] <= outer[1]]
    top = sorted(span for span in set(inner)
                 if not any(o != span and o[0] <= span[0] and span[1] <= o[1] for o in inner))
    loops = [_loop(code, *span) for span in top]   # (in code order)
    last = [loop for loop in loops if loop.vector_stores]
    reads = [loop for loop in loops if not loop.vector_stores and loop.vector_loads]
    middle = reads.pop() if divergent and reads else None   # (the reading loop just before the last pass)
    if len(last) != 1 or not reads or (divergent and middle is None):
        raise ValueError(f"kl_cluster_stream_*: expected pass-1 loops{', a pass-2 loop' if divergent else ''} "
                         f"and one storing loop, found {loops}")
    row = _loop(code, *outer)
    per_row = row.instructions - sum(loop.instructions for loop in loops)
    return StreamLoops(per_row, row.cluster_waits, max(reads, key=lambda loop: loop.instructions), middle, last[0])


# ------------------------------------------------------------------------------------------
# Kernels of a case, as the host launches them
# ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Launch:
    name: str
    threads: int          # per block
    blocks: int
    elements_per_pass: int   # per thread, per pass of the main loop
    fill: float           # of those slots, the share that holds elements (short rows, ragged chunks)
    segments: int = 0     # kl_cluster_stream_*: segments a block per row (J), elements_per_pass is per segment
    staged: int = 0       # kl_cluster_stream_*: of those, kept in shared memory between the passes
    shared_bytes: int = 0 # dynamic shared memory a block (the prefetching kernels': a block's residency)


def launches(n, c, suffix, divergence="forward", norm_target=False, clusters=True, labels=False):
    """The kernels of one call, with their grids, as row_softmax would launch them on arrays that
    start on 16-byte boundaries (as the benchmark's do); the chunked passes have kl_chunk_rows
    between them (a block a row, combining the statistics of its chunks' warps: elements_per_pass
    is then their number), and reverse KL and JSD add kl_chunk_sums before the last.
    clusters=False: as on a GPU before sm_90 (the same machine code, counted for sm_90).  A test
    holds these to what row_softmax launches (test_cost_model.py)."""
    slack = row_softmax.row_slack(suffix, c, ())
    rows, cluster = row_softmax.row_or_cluster(suffix, c, slack, n, CONSTANTS["sms"], clusters)
    if rows is not None:
        threads, elems = rows
        blocks = row_softmax.row_grid(n, threads, math.inf)
        name = f"kl_rows_{suffix}_g{threads}_e{elems}"
        twin = row_softmax.row_twin(name, clusters)   # (the library's twin: "_prefetch", "_tile" or "")
        block = max(threads, row_softmax.ROW_BLOCK)
        shared = row_softmax.prefetch_bytes(suffix, block, elems) if twin == "_prefetch" else 0
        normt = row_softmax.normt_twin(name, norm_target, labels, DIVERGENCES[divergence], prefetch=twin == "_prefetch")
        return [Launch(name + twin + normt, block, blocks, elems, c / (threads * elems), shared_bytes=shared)]
    if cluster is not None:
        threads, elems = cluster
        name = f"kl_cluster_{suffix}_t{threads}_e{elems}"
        prefetch, clusters_launched, shared = row_softmax.cluster_plan(name, clusters, suffix, threads, elems, n)
        normt = row_softmax.normt_twin(name, norm_target, labels, DIVERGENCES[divergence], prefetch=prefetch)
        return [Launch(name + ("_prefetch" if prefetch else "") + normt, threads, clusters_launched * row_softmax.CLUSTER,
                       elems, c / (row_softmax.CLUSTER * threads * elems), shared_bytes=shared)]
    stream = (row_softmax.stream_kernel(suffix, n, CONSTANTS["sms"]) if clusters and suffix in row_softmax.STREAM_ELEMS
              else None)
    if stream is not None:
        threads, elems = stream
        name = f"kl_cluster_stream_{suffix}_t{threads}_e{elems}"
        segments = row_softmax.stream_segments(threads, elems, c, slack)
        two_arrays = row_softmax.stream_two_arrays(labels, norm_target, DIVERGENCES[divergence])
        prefetch, staged, shared = row_softmax.stream_plan(name, clusters, suffix, threads, elems, c, slack, two_arrays,
                                                           CONSTANTS["shared_per_sm"], CONSTANTS["shared_per_block"])
        k = row_softmax.CLUSTER
        pass2 = row_softmax.pass2_twin(name, prefetch, segments, labels, DIVERGENCES[divergence])
        return [Launch(name + ("_prefetch" if prefetch else "") + pass2, threads, n * k, elems,
                       c / (segments * k * threads * elems), segments, staged, shared)]
    chunk = row_softmax.CHUNK_THREADS * row_softmax.CHUNK_ELEMS[suffix]
    chunks_per_row = -(-(c + slack) // chunk)
    fill = c / (chunks_per_row * chunk)
    parts = ("stats", "grad") if divergence == "forward" else ("stats", "sums", "grad")
    # (the 16-bit kernels that load a chunk a turn ahead, stats and grad, in a capped grid: chunk_grid)
    grid = {part: n * chunks_per_row if part == "sums"
            else row_softmax.chunk_grid(suffix, n * chunks_per_row, math.inf, CONSTANTS["sms"]) for part in parts}
    chunked = [Launch(f"kl_chunk_{part}_{suffix}", row_softmax.CHUNK_THREADS, grid[part],
                      row_softmax.CHUNK_ELEMS[suffix], fill) for part in parts]
    parts_per_row = chunks_per_row * row_softmax.CHUNK_PARTS
    rows = Launch(f"kl_chunk_rows_{suffix}", row_softmax.CHUNK_THREADS, n, parts_per_row, 1.0)
    return chunked[:1] + [rows] + chunked[1:]


# ------------------------------------------------------------------------------------------
# The prediction
# ------------------------------------------------------------------------------------------
def blocks_per_sm(regs, threads, shared_bytes=0):
    k = CONSTANTS
    per_thread = -(-max(regs, 1) // 8) * 8   # registers are handed out 8 at a time
    # (dynamic shared memory, with the static arrays and the driver's 1 KiB a block besides it)
    by_shared = k["shared_per_sm"] // (shared_bytes + row_softmax.BLOCK_SHARED_RESERVE) if shared_bytes else k["blocks_per_sm"]
    return max(1, min(k["blocks_per_sm"], k["threads_per_sm"] // threads, k["registers_per_sm"] // (per_thread * threads),
                      by_shared))


def kernel_time(launch, loop, regs, itemsize, n_elements, l2_hit_bytes=0.0):
    """(seconds, DRAM bytes, thread-instructions) of one kernel over n_elements elements, of whose
    loads l2_hit_bytes come from L2 (chunk_l2_hits)."""
    k = CONSTANTS
    useful = launch.elements_per_pass * launch.fill           # elements a thread handles per pass
    instructions = n_elements * loop.instructions / useful
    vectors_per_pass = launch.elements_per_pass * itemsize / 16
    array_passes = (loop.vector_loads + loop.vector_stores) / vectors_per_pass
    data_bytes = n_elements * array_passes * itemsize - l2_hit_bytes
    resident = blocks_per_sm(regs, launch.threads, launch.shared_bytes)
    busy = min(resident, math.ceil(launch.blocks / k["sms"]))   # blocks an SM runs at once
    # Little's law: every thread issues its loads of a pass before it needs them.
    in_flight = busy * launch.threads * loop.vector_loads * 16 * min(1.0, launch.fill)
    needed = k["copy_bandwidth"] / k["sms"] * k["dram_latency"]
    bandwidth = k["copy_bandwidth"] * k["memory_efficiency"] * min(1.0, in_flight / needed)
    memory = data_bytes / bandwidth
    issue = instructions / (k["issue_rate"] * k["issue_efficiency"]) * resident / busy
    waves = launch.blocks / (k["sms"] * resident)
    tail = math.ceil(waves) / waves if 1 < waves < 4 else 1.0   # a last partial wave leaves SMs idle
    body = (memory + issue) if busy == 1 else max(memory, issue)
    # A cluster's blocks wait for each other at every exchange; with one block an SM nothing else
    # runs meanwhile, with more another block's loads and arithmetic fill the wait.
    passes = launch.blocks / (k["sms"] * busy)
    body += passes * loop.cluster_waits * k["cluster_exchange"] / busy
    return body * tail, data_bytes, instructions


def stream_time(launch, loops, regs, itemsize, n_rows, n_cols):
    """(seconds, DRAM bytes, thread-instructions) of kl_cluster_stream_*: pass 1 reads each
    segment, pass 2 reads again all but the last (held in registers) and the staged ones (kept in
    shared memory).  That second read comes from L2 while the rows open at once (the clusters
    resident, or all rows if fewer) hold no more of their pass-1 data outside the SMs than
    l2_reuse_bytes; past that, the share that does not fit comes from DRAM (reverse order: the
    hits are the segments read last).  Every segment is charged the instructions of the loops'
    whole bodies, the staging branches included (a slight overcount).

    The segment loops have no barriers: each warp waits for its segment's loads, then computes,
    while other warps' loads are in flight.  So each pass runs at the larger of its issue time and
    its memory time, the bandwidth scaled by the bytes in flight (Little's law) with a warp's
    loads in flight only for the share of its time it waits for them, a DRAM latency against its
    compute (its instructions, issued in turn with the other warps of its scheduler)."""
    k = CONSTANTS
    vectors = launch.elements_per_pass * itemsize / 16            # a thread's vectors per array per segment
    n_elements = n_rows * n_cols
    cluster = row_softmax.CLUSTER
    first_arrays = loops.first.vector_loads / vectors               # pred (and target with norm_target)
    resident = blocks_per_sm(regs, launch.threads, launch.shared_bytes)
    # The share of a row pass 2 reads again: not the last segment (registers), nor the staged ones.
    reread = (launch.segments - 1 - launch.staged) / launch.segments
    open_rows = min(n_rows, k["sms"] * resident // cluster)
    open_bytes = open_rows * n_cols * itemsize * first_arrays * reread
    miss = max(0.0, 1 - k["l2_reuse_bytes"] / open_bytes) if open_bytes else 0.0
    # Each later pass reads from DRAM what pass 1 did not (the target without norm_target: read
    # again by the last pass of reverse KL and JSD), and the misses.
    later = [loop for loop in (loops.middle, loops.last) if loop is not None]
    passes = [(loops.first, n_elements * itemsize * first_arrays)]
    passes += [(loop, n_elements * itemsize * (loop.vector_loads / vectors - first_arrays + loop.vector_stores / vectors
                                               + miss * first_arrays * reread)) for loop in later]
    busy = min(resident, math.ceil(launch.blocks / k["sms"]))
    sms_used = min(k["sms"], math.ceil(launch.blocks / busy))
    needed = k["copy_bandwidth"] / k["sms"] * k["dram_latency"]
    latency_cycles = k["dram_latency"] * k["clock"]
    warps_per_scheduler = busy * launch.threads / 32 / 4
    issue_rate = k["issue_rate"] * k["issue_efficiency"] * sms_used / k["sms"]
    memory, issue, by_pass = [], [], []
    for loop, data in passes:
        count = n_rows * cluster * launch.threads * launch.segments * loop.instructions
        compute_cycles = loop.instructions * warps_per_scheduler / k["issue_efficiency"]
        waiting = latency_cycles / (latency_cycles + compute_cycles)
        in_flight = busy * launch.threads * loop.vector_loads * 16 * waiting
        bandwidth = k["copy_bandwidth"] * k["memory_efficiency"] * min(1.0, in_flight / needed) * sms_used / k["sms"]
        memory.append(data / bandwidth)
        issue.append(count / issue_rate)
        by_pass.append(max(memory[-1], issue[-1]))
    # Per row: the block and cluster reductions around the exchange.
    per_row = n_rows * cluster * launch.threads * loops.per_row
    instructions = per_row + sum(issue) * issue_rate
    # One block an SM: its passes and its reductions follow each other (cluster barriers between
    # them).  Two or more: they drift apart over their rows, one's pass 1 or reductions beside
    # another's pass 2.
    if busy == 1:
        seconds = sum(by_pass) + per_row / issue_rate
    else:
        seconds = max(sum(memory), sum(issue) + per_row / issue_rate)
    seconds += launch.blocks / (k["sms"] * busy) * loops.exchanges * k["cluster_exchange"] / busy
    waves = launch.blocks / (k["sms"] * resident)
    tail = math.ceil(waves) / waves if 1 < waves < 4 else 1.0
    return seconds * tail, sum(data for _, data in passes), instructions


def chunk_l2_hits(read, written, previous_read, back_and_forth, evict_first):
    """Bytes a chunked pass that reads `read` bytes and writes `written` finds in L2, of the arrays
    the pass before it read (previous_read bytes: pred, and the target with norm_target or in
    kl_chunk_sums), which it reads again.  L2 holds the last l2_reuse_bytes (L) of the previous
    pass's data.  A pass that starts where the previous ended (back_and_forth: the library's) reads
    those first, newest first, while its misses push out the oldest: with its own lines evict-first
    (kl_chunk_grad's __ldcs / __stcs in the build PLC_TRY_CHUNK_EVICT_FIRST, the library's before
    2026-11-28, which an H200 measured slower) they go before any of them, so it finds all L; without, it
    reads down from the newest as its new lines (its other reads and its writes) evict up from the
    oldest, new / re-read bytes of them a byte read, and finds L / (1 + new / re-read).  A pass in
    the same order starts on the oldest, gone when the previous pass read more than L, and LRU then
    evicts each line just before it is read: nothing, unless all of it fits."""
    reread = min(read, previous_read)
    if not reread:
        return 0.0
    k = CONSTANTS
    new = read - reread + written
    held = k["l2_reuse_bytes"] if evict_first else k["l2_reuse_bytes"] / (1 + new / reread)
    if not back_and_forth:
        return float(reread) if previous_read <= held else 0.0
    return float(min(reread, held))


def chunk_rows_time(launch, loop, regs, stats_itemsize):
    """(seconds, bytes, thread-instructions) of kl_chunk_rows_*: each block combines a row's
    statistics (launch.elements_per_pass of them, a warp's part of a chunk each, 4 values, just
    written: in L2) into the row's 4, in a chain of a round trip to L2 and the block's reductions;
    its blocks at once (resident on every SM) take their rows side by side."""
    k = CONSTANTS
    rows, parts = launch.blocks, launch.elements_per_pass
    per_row = loop.instructions * math.ceil(parts / launch.threads)   # a thread's, over a row's parts
    instructions = rows * launch.threads * per_row
    data_bytes = rows * (parts + 1) * 4 * stats_itemsize
    waves = math.ceil(rows / (k["sms"] * blocks_per_sm(regs, launch.threads)))
    chain = waves * (k["final_sum_latency"] + per_row / k["clock"])
    return max(chain, data_bytes / k["copy_bandwidth"], instructions / (k["issue_rate"] * k["issue_efficiency"])), \
        data_bytes, instructions


def final_sum_time(blocks):
    """The last block reads the blocks' partial errors: a round trip, then at one SM's pace."""
    k = CONSTANTS
    return k["final_sum_latency"] + blocks * 8 / k["single_sm_bandwidth"]


def predict(n, c, dtype, norm_target, labels=False, source_dir=None, divergence="forward", clusters=True,
            defines=()):
    """The entry of one case; `source_dir`: another copy of kernels/ (a planted change, say);
    divergence: KLDivergence's "forward", "reverse" or "jsd"; clusters=False: the kernels a GPU
    before sm_90 takes; defines: a build to measure's (try_choices.py's PLC_TRY_* builds), whose
    machine code is read instead of the library's."""
    suffix, itemsize = DTYPES[dtype]
    mode = "labels" if labels else "normTarget" if norm_target else "probabilities"
    code, regs = _machine_code(mode, source_dir, divergence, tuple(defines))
    plan = launches(n, c, suffix, divergence, norm_target, clusters, labels)
    elements = n * c
    # A kernel that waits for the previous one starts a launch gap after it ends; the first one
    # starts as soon as the stream gets to it.  Each kernel's first loads wait a DRAM latency
    # before any byte arrives (the memory pipe's fill, which the steady-state roofline leaves out:
    # 0.7 us against 1.3 us of ideal traffic at 65536x10 bfloat16, nothing at the large shapes).
    seconds, data_bytes, instructions, paths = CONSTANTS["launch_gap"] * (len(plan) - 1), 0, 0.0, []
    seconds += CONSTANTS["dram_latency"] * len(plan)
    previous_read = 0.0   # bytes the last chunked pass read (for the next one's L2 hits)
    for launch in plan:
        if launch.segments:
            t, b, i = stream_time(launch, stream_loops(code[launch.name], divergence != "forward"), regs[launch.name],
                                  itemsize, n, c)
        elif launch.name.startswith("kl_chunk_rows_"):
            t, b, i = chunk_rows_time(launch, main_loop(code[launch.name]), regs[launch.name],
                                      row_softmax.COMPUTE_ITEMSIZE[suffix])
        else:
            loop = (tile_loop(code[launch.name], launch.elements_per_pass, itemsize, c) if launch.name.endswith("_tile")
                    else main_loop(code[launch.name]))
            hits = 0.0
            if launch.name.startswith("kl_chunk_"):   # (stats, sums, grad: the passes over the row)
                read, written = (elements * count * 16 / launch.elements_per_pass
                                 for count in (loop.vector_loads, loop.vector_stores))
                hits = chunk_l2_hits(read, written, previous_read, "PLC_TRY_CHUNK_SAME_ORDER" not in defines,
                                     launch.name.startswith("kl_chunk_grad_")
                                     and "PLC_TRY_CHUNK_EVICT_FIRST" in defines)
                previous_read = read
            t, b, i = kernel_time(launch, loop, regs[launch.name], itemsize, elements, hits)
        seconds, data_bytes, instructions = seconds + t, data_bytes + b, instructions + i
        paths.append(launch.name)
    # The partial errors the last block adds: one a block, one a cluster in the cluster kernels.
    blocks = plan[-1].blocks // (row_softmax.CLUSTER if plan[-1].name.startswith("kl_cluster") else 1)
    seconds += final_sum_time(blocks)
    data_bytes += blocks * 8 * 2 + (n * 8 if labels else 0)   # partial errors written and read back; labels
    ideal = elements * itemsize * (2 if labels else 3) / CONSTANTS["copy_bandwidth"]
    return {"path": " + ".join(paths), "shape": [n, c], "dtype": dtype,
            "norm_target": norm_target, "labels": labels, "divergence": divergence,
            "bytes_per_element": round(data_bytes / elements, 3),
            "sass_per_element": round(instructions / elements, 2),
            "registers": {name: regs[name] for name in paths},
            "predicted_seconds": seconds, "predicted_fraction": round(ideal / seconds, 3),
            "floor_fraction": round(ideal / floor_seconds(ideal), 3)}


def floor_seconds(ideal):
    """The model's time of an ideal kernel for a case whose ideal bytes take `ideal` seconds at the
    copy bandwidth: one launch whose first bytes wait a DRAM latency, the ideal bytes at the
    model's memory efficiency, no instruction cost, and the batch error's sum of one partial an SM.
    No kernel can be predicted faster (a test holds every path to it); where it is below the
    issue's 0.85 (the smallest shapes, whose few microseconds of bytes the latencies rival), the
    goal is out of reach by the model's own constants, whatever the kernel."""
    k = CONSTANTS
    return k["dram_latency"] + ideal / k["memory_efficiency"] + final_sum_time(k["sms"])


_CODE = {}


def _machine_code(mode, source_dir=None, divergence="forward", build=()):
    """(SASS of the cost-model build for this mode and divergence, registers of the real build;
    for another source folder, of the cost-model build, which saves a compile), both compiled
    with `build`'s defines too (a build to measure; none: the library's)."""
    key = (mode, str(source_dir), divergence, build)
    if key not in _CODE:
        defines = ("PLC_COST_MODEL", f"PLC_COST_MODEL_MODE={MODES[mode]}")
        if divergence != "forward":   # (the forward build keeps its defines, and its cached cubin)
            defines += (f"PLC_COST_MODEL_DIVERGENCE={DIVERGENCES[divergence]}",)
        probe = cached_cubin(ARCH, defines + build, source_dir)
        _CODE[key] = (disassemble(probe), registers(probe if source_dir else cached_cubin(ARCH, build)))
    return _CODE[key]


def all_predictions():
    return [predict(n, c, dtype, norm) for (n, c) in SHAPES for dtype in DTYPES for norm in (False, True)]


def kernels_changed_since(results):
    """None where a try_choices.py results file was timed on today's kernel sources (its
    kernels_digest), else a line saying it was not: kernels of the same names may have changed."""
    from puzzlelib_cost.backends.kernel_build import sources_digest
    recorded, today = results.get("kernels_digest"), sources_digest()
    if recorded == today:
        return None
    return (f"was timed on kernels {recorded or 'of an unrecorded digest'} (commit {results.get('commit', 'unrecorded')}), "
            f"these are {today}: kernels of the same names may have changed since")


def measured_fractions(path, log=print):
    """{(N, C, dtype, normTarget): fraction of the copy bandwidth} of the library's own choices in
    a benchmarks/try_choices.py results file (its "default" entries), at the benchmark shapes, of
    the kernels the library launches there today: a case timed on other kernels (the chunked path's
    two kernels where it now takes three, say) is left out, as the fit would pair it with another
    path's prediction.  Says so, and whether the kernels' sources changed since the file
    (kernels_digest, which files before 2026-11-27 lack: then kernels of the same names may differ)."""
    results = json.loads(Path(path).read_text())
    changed = kernels_changed_since(results)
    if changed:
        log(f"measured_fractions: {path} {changed}")
    found, left_out = {}, []
    for e in results["entries"]:
        if e.get("choice") == "default" and "fraction" in e and tuple(e["shape"]) in SHAPES:
            case = (*e["shape"], e["dtype"], e["norm_target"])
            if "kernels" in e and set(predict(*case)["path"].split(" + ")) != set(e["kernels"]):
                left_out.append(case)
                continue
            found[case] = e["fraction"]
    if left_out:
        log(f"measured_fractions: left out {len(left_out)} case(s) timed on other kernels than today's: {left_out}")
    return found


def fit_issue_efficiency(measured, candidates=None):
    """(the issue_efficiency whose predictions are nearest the measured fractions, by the mean
    squared log ratio over the cases, [(case, measured, predicted)] with it).  The model counts the
    instructions of a kernel's hot loop, not what a warp waits for; the measured issue rate of our
    kernels (ncu: 0.27 to 0.53 a scheduler a cycle) and the code the count leaves out (edge and
    mode branches, the per-block prologue and ticket) both land in this one constant."""
    candidates = candidates or [round(0.05 * i, 2) for i in range(2, 21)]
    best = None
    saved = CONSTANTS["issue_efficiency"]
    try:
        for value in candidates:
            CONSTANTS["issue_efficiency"] = value
            pairs = [(case, fraction, predict(*case)["predicted_fraction"]) for case, fraction in sorted(measured.items())]
            score = sum(math.log(p / m) ** 2 for _, m, p in pairs) / len(pairs)
            if best is None or score < best[0]:
                best = (score, value, pairs)
    finally:
        CONSTANTS["issue_efficiency"] = saved
    return best[1], best[2]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", action="store_true", help="print the entries as JSON")
    parser.add_argument("--fit", metavar="JSON",
                        help="a benchmarks/try_choices.py results file: print the issue_efficiency that best "
                             "predicts its measured fractions, and each case's measured and predicted fraction")
    parser.add_argument("--constants", metavar="JSON",
                        help="constants a GPU measured (benchmarks/probe_constants.py --json): each entry "
                             "gains predicted_fraction_probed, the prediction with them")
    args = parser.parse_args()
    if args.fit:
        if args.constants:
            use_constants(args.constants)
        value, pairs = fit_issue_efficiency(measured_fractions(args.fit))
        print(f"issue_efficiency {value} (now {CONSTANTS['issue_efficiency']})")
        for (n, c, dtype, norm), measured, predicted in pairs:
            print(f"{n:>6}x{c:<8} {dtype:>8} {'normT' if norm else 'probs':>5}  measured {measured:6.1%}  "
                  f"predicted {predicted:6.1%}  ratio {predicted / measured:5.2f}")
        return
    entries = all_predictions()
    if args.constants:
        use_constants(args.constants)
        for entry, probed in zip(entries, all_predictions()):
            entry["predicted_fraction_probed"] = probed["predicted_fraction"]
    if args.json:
        print(json.dumps(entries, indent=1))
        return
    probed = "probed" if args.constants else ""
    print(f"{'shape':>14} {'dtype':>8} {'normT':>5} {'B/elem':>7} {'SASS/elem':>9} {'predicted':>9} {'floor':>6} "
          f"{probed:>7}  path")
    for e in entries:
        print(f"{'x'.join(map(str, e['shape'])):>14} {e['dtype']:>8} {str(e['norm_target']):>5} "
              f"{e['bytes_per_element']:>7.2f} {e['sass_per_element']:>9.1f} {e['predicted_fraction']:>9.1%} "
              f"{e['floor_fraction']:>6.1%} "
              f"{format(e['predicted_fraction_probed'], '>7.1%') if probed else '':>7}  {e['path']}")
    print(("probed " if probed else "") + "constants: " + ", ".join(f"{k}={v:.3g}" for k, v in CONSTANTS.items()))


if __name__ == "__main__":
    main()
