#!/usr/bin/env python3
"""Time KLDivergence under kernel choices other than the library's, on one GPU: the choices the
cost model made without a GPU (benchmarks/NOTES.md), settled by measurement.

    python3 benchmarks/try_choices.py --out results.json        # on the GPU machine (torch tensors)
    python3 benchmarks/try_choices.py --list                     # the experiments, no GPU needed
    python3 benchmarks/try_choices.py --prebuild sm_90           # the builds' cubins into the cache, no GPU needed

Each experiment is a case (shape, dtype, normTarget) and a named choice: "default" is the
library's own; the others replace row_softmax's choice for the call (rows G x E, a cluster of
THREADS x E, the cluster stream in blocks of THREADS with at most S segments staged, the
chunked kernels as before sm_90, prefetching or tiled kernels, a smaller grid, or the kernels
built with a PLC_TRY_* define).  A time is the median device time of one call (bench_kl.py's
CudaTimer: CUDA events, a spin kernel ahead of each batch); %copy counts the ideal bytes
against the copy ceiling measured first.  Each choice's grad is compared with the default's
(max |difference| over max |grad|), so a choice that computes something else shows.  A choice that
launches what a choice timed before in its case did (recorded_launches) is not timed again: its
entry names that choice (same_launches_as).
"""
import argparse
import contextlib
import functools
import os
import re
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from puzzlelib_cost import row_softmax  # noqa: E402
from puzzlelib_cost.backends.kernel_build import sources_digest  # noqa: E402

# (N, C), dtypes, normTarget values, choices.  A choice: ("default",), ("plain",): the library's
# kernels without the prefetching and tiled twins it takes (row_softmax.PREFETCHED_KERNELS), its
# kernels as they were before the H100 measured those; ("rows", G, E), ("cluster", THREADS, E),
# ("stream", THREADS, most staged or None), ("chunks",), ("grid", K): the library's kernels in a
# grid of at most K blocks an SM, each looping over its rows, or ("prefetch",) or ("prefetch", K):
# the row kernel prefetching (kl_rows_*_prefetch: the next row copied into shared memory while this
# one is computed), in the library's grid or one of at most K blocks an SM; ("cluster_prefetch",)
# or ("cluster_prefetch", K) the same for the cluster kernel (kl_cluster_*_prefetch, whose clusters
# then loop over rows); ("stream_prefetch",) the stream kernel with pass 1's segments prefetched
# (kl_cluster_stream_*_prefetch); ("tile",) the one-thread row kernel tiled (kl_rows_*_g1_e16_tile:
# the block's rows staged through shared memory); ("build", DEFINE, ...) the library's own choices
# with kernels compiled with those -D defines (a variant of the source: see the PLC_TRY_* macros in
# kernels/); ("one_buffer",) every prefetching row and many-rows cluster twin (float32's too) built
# with PLC_TRY_ONE_BUFFER, one buffer of shared memory, not two (half the bytes a block), or
# ("one_buffer", K) with the prefetching cluster kernel's grid at K blocks an SM, not 3;
# ("pass2_prefetch",) bfloat16's prefetching stream kernel's twin that prefetches pass 2 too
# (forward KL's pass 2 copies the next segment's arrays from memory into the ring while it computes
# this one: "_prefetch_pass2", the library's from row_softmax.PASS2_MIN_SEGMENTS segments a block
# on since 2026-11-28) at every row length, ("no_pass2",) at none; ("chunk_same_order",) the chunked kernels built
# with PLC_TRY_CHUNK_SAME_ORDER, every pass from the first chunk, as the library's were before
# 2026-11-27 (its passes go back and forth so that each starts on the chunks likeliest still in
# L2), ("chunk_evict_first",) with PLC_TRY_CHUNK_EVICT_FIRST, kl_chunk_grad's loads and stores
# evict-first, as the library's were before 2026-11-28 (its plain ones measured faster on an H200:
# the build "chunk_plain_access" at a0916b1);
# ("chunk_e32",) the chunked kernels built with PLC_TRY_CHUNK_E32 (32 elements a thread, two blocks an
# SM, not 16 and four; 16-bit inputs without the next chunk loaded a turn ahead, in the whole grid)
# and rows cut into chunks of that size;
# ("general",) the float32 and 16-bit row (of groups) and cluster kernels of 32 elements a thread for
# normTarget forward KL, not their "_normt" twins (normTarget's exponentials kept in place of x and
# t: two an element, not four; the library's since 2026-11-28, bfloat16's measured on an H200 as the
# build PLC_TRY_IN_PLACE, "in_place", at a0916b1, float32's not measured: row_softmax.NORMT_KERNELS).
BENCHMARK_SHAPES = [(65536, 10), (16384, 1000), (8192, 32000), (2048, 128256), (1024, 262144), (16, 1048576)]
# The defines each choice of these kinds compiles the kernels with.
BUILT_WITH = {"one_buffer": ("PLC_TRY_ONE_BUFFER",),
              "chunk_same_order": ("PLC_TRY_CHUNK_SAME_ORDER",),
              "chunk_evict_first": ("PLC_TRY_CHUNK_EVICT_FIRST",),
              "chunk_e32": ("PLC_TRY_CHUNK_E32",)}
# The elements a thread of PLC_TRY_CHUNK_E32's chunked kernels, which "chunk_e32" cuts rows by.
CHUNK_E32_ELEMS = {"f32": 32, "f16": 32, "bf16": 32}
# To measure: the prefetching twins with one buffer (float32's, at two blocks' shared memory less,
# were slower with two), against the library's choice, its kernels without twins and (float32)
# the two-buffer twins; the stream kernel, now prefetching, against the chunked kernels for few
# long rows (the chunks won at 16x1048576 before: fix 15), and the chunked kernels' second pass
# from the first chunk (the library's before 2026-11-27), and with plain loads and stores, their chunks of 32
# elements a thread, not 16, and their grid capped at 4 or 8 blocks an SM, each block looping
# over chunks (as the row kernels' is: fix 16; float32's chunked kernels hold 4 an SM; the 16-bit
# ones, capped at 3 since they load a chunk a turn ahead, launch the same grid there, not timed again); the
# exponentials in place for
# bfloat16's normTarget in the many-rows cluster kernel (its slowest big case: 49 %) and the row kernels;
# the stream kernel's pass 2 prefetched (pass2_prefetch), where without normTarget it ran slower
# than with it (2048x128256: 71 against 77 %, bfloat16 49 against 63 %, before it read forward KL's
# probabilities in pass 1).
EXPERIMENTS = [
    ((16384, 1000), ["float32", "bfloat16"], [False, True], [("default",), ("plain",), ("prefetch",), ("one_buffer",)]),
    ((4096, 4000), ["float32", "bfloat16"], [True], [("default",), ("plain",), ("prefetch",), ("one_buffer",)]),
    ((8192, 32000), ["float32", "bfloat16"], [False, True], [("default",), ("plain",), ("cluster_prefetch",),
                                                             ("one_buffer",), ("one_buffer", 4)]),
    ((16, 1048576), ["float32", "bfloat16"], [False, True], [("default",), ("stream", 256, None), ("chunk_same_order",),
                                                             ("chunk_evict_first",), ("chunk_e32",),
                                                             ("grid", 4), ("grid", 8)]),
    # (("chunk_prefetch",) and ("chunk_prefetch", 6), PLC_TRY_CHUNK_PREFETCH's 16-bit chunked kernels at 3
    # and 6 blocks an SM, measured on an H200 at a0916b1: faster, and the library's since, at 3:
    # benchmarks/NOTES.md)
    # (PLC_TRY_TARGET_FIRST, the target read in pass 1 in every mode, is gone: the library does so for
    # forward KL's probabilities since 2026-11-27's seventh session, which sums them there)
    # (measured on an H200 at a0916b1 as the build PLC_TRY_PASS2_PREFETCH in float32 and bfloat16; the
    # library's since for bfloat16 at 4 segments a block or more: row_softmax.PASS2_KERNELS)
    ((2048, 128256), ["bfloat16"], [False, True], [("default",), ("pass2_prefetch",)]),
    ((1024, 262144), ["bfloat16"], [False, True], [("default",), ("no_pass2",)]),
    ((16384, 1000), ["float32", "bfloat16"], [True], [("default",), ("general",)]),
    ((4096, 4000), ["float32", "bfloat16"], [True], [("default",), ("general",)]),
    ((8192, 32000), ["float32", "bfloat16"], [True], [("default",), ("general",)]),
]
# Run on the H100 at 01f464c (benchmarks/results/2026-11-26-h100-01f464c/choices): the library's
# choices ("default") against "plain" at every benchmark shape: the twins as measured at a205773.
F01F464C_EXPERIMENTS = [(shape, ["float32", "bfloat16"], [False, True], [("default",), ("plain",)])
                        for shape in BENCHMARK_SHAPES]
# Run on the H100 at a205773 (benchmarks/results/2026-11-26-h100-a205773/choices): at every
# benchmark shape, the default against PLC_TRY_TREE_CHAINS (a thread's max and sums in four
# chains); at 65536x10 prefetch, tile and PLC_TRY_SKIP_PAST_END (vectors wholly past their row
# skipped); at 16384x1000 prefetch, prefetch(3), prefetch(6), SKIP_PAST_END; at 4096x4000 (normTarget)
# prefetch, prefetch(3), SKIP_PAST_END; at 8192x32000 cluster_prefetch, cluster_prefetch(4),
# SKIP_PAST_END and the cluster builds PLC_TRY_CLUSTER_TICKET (one ticket a cluster),
# PLC_TRY_RELAXED_EXIT (that, and a relaxed exit barrier), PLC_TRY_RELAXED_EXCHANGE (the exchanges'
# barriers relaxed) and the last two together; at 2048x128256 stream_prefetch, SKIP_PAST_END and the
# cluster builds; at 1024x262144 stream_prefetch and the cluster builds.  Taken: the twins of
# row_softmax.PREFETCHED_KERNELS and TILE_KERNELS, and PLC_TRY_RELAXED_EXIT, now the library's code
# (kl_cluster.cu's finish_cluster).  No faster (within 1.5 %), and removed from the kernels:
# TREE_CHAINS, SKIP_PAST_END, RELAXED_EXCHANGE (benchmarks/NOTES.md).
EARLIER_EXPERIMENTS = [   # (run on the H100 on 2026-11-26: benchmarks/results/2026-11-26-h100-007ea3f/choices)
    ((16384, 1000), ["float32", "bfloat16"], [True], [("default",), ("grid", 4), ("grid", 8)]),
    ((8192, 32000), ["float32", "bfloat16"], [True], [("default",), ("grid", 4), ("grid", 8)]),
    ((4096, 2000), ["float32", "bfloat16"], [True], [("default",), ("rows", 128, 16)]),
    ((4096, 4000), ["float32", "bfloat16"], [True], [("default",), ("rows", 128, 32)]),
    ((16, 1048576), ["bfloat16"], [True], [("default",), ("stream", 256, None)]),
    ((40, 262144), ["float32"], [True], [("default",), ("chunks",)]),
    ((1024, 262144), ["float32"], [True], [("default",), ("chunks",)]),
    ((65536, 10), ["float32"], [True], [("default",), ("rows", 4, 8), ("rows", 8, 8)]),
    ((65536, 10), ["bfloat16"], [True], [("default",), ("rows", 8, 8)]),
    ((16384, 1000), ["float32", "bfloat16"], [True, False],
     [("default",), ("rows", 32, 32)]),
    ((2048, 12000), ["float32", "bfloat16"], [True], [("default",), ("rows", 512, 32), ("cluster", 256, 16)]),
    ((8192, 32000), ["float32", "bfloat16"], [True], [("default",), ("cluster", 256, 16), ("stream", 256, None),
                                                      ("chunks",)]),
    ((2048, 128256), ["float32", "bfloat16"], [True], [("default",), ("stream", 512, None), ("stream", 256, 0),
                                                       ("chunks",)]),
    ((16, 1048576), ["float32"], [True], [("default",), ("stream", 256, None), ("chunks",)]),
]


def choice_label(choice):
    kind, *args = choice
    return kind if not args else f"{kind}({','.join('max' if a is None else str(a) for a in args)})"


# The kernels each prefetch choice takes the prefetching twins of (row_softmax.PREFETCH_KERNELS).
PREFETCHED = {"prefetch": re.compile("kl_rows_"), "cluster_prefetch": re.compile("kl_cluster_(?!stream_)"),
              "stream_prefetch": re.compile("kl_cluster_stream_")}


class UnknownChoice(ValueError):
    """A choice try_choices does not make (any more): chosen() would otherwise time the default."""


@contextlib.contextmanager
def chosen(choice, device):
    """row_softmax's kernel choice replaced by `choice` for the calls inside."""
    kind, *args = choice
    saved = {name: getattr(row_softmax, name) for name in ("row_or_cluster", "stream_kernel", "stream_staging",
                                                            "prefetches", "tiles", "in_place", "pass2_prefetches",
                                                            "PREFETCH_BUFFERS",
                                                            "PREFETCH_CLUSTER_GRID_BLOCKS",
                                                            "CHUNK_ELEMS", "CHUNK_GRID_BLOCKS_PER_SM")}
    saved_clusters, saved_blocks, saved_defines = device.clusters, device.max_blocks, device.defines
    try:
        if kind == "build" or kind in BUILT_WITH:
            device.load_kernels(tuple(args) if kind == "build" else BUILT_WITH[kind])
        if kind == "rows":
            row_softmax.row_or_cluster = lambda *a, **k: (tuple(args), None)
        elif kind == "cluster":
            row_softmax.row_or_cluster = lambda *a, **k: (None, tuple(args))
        elif kind == "stream":
            threads, most = args
            row_softmax.row_or_cluster = lambda *a, **k: (None, None)
            row_softmax.stream_kernel = lambda suffix, *a: (threads, row_softmax.STREAM_ELEMS[suffix])
            if most is not None:
                row_softmax.stream_staging = functools.partial(saved["stream_staging"], most=most)
        elif kind == "chunks":
            row_softmax.row_or_cluster = lambda *a, **k: (None, None)
            device.clusters = False
        elif kind == "grid":
            device.max_blocks = args[0] * device.sms
        elif kind == "plain":
            row_softmax.prefetches = row_softmax.tiles = lambda kernel: False
        elif kind == "general":
            row_softmax.in_place = lambda kernel: False
        elif kind in ("pass2_prefetch", "no_pass2"):
            row_softmax.pass2_prefetches = lambda kernel, segments: kind == "pass2_prefetch"
        elif kind == "chunk_e32":   # (the build's chunks of 256 threads x 32, a block a chunk: none ahead)
            row_softmax.CHUNK_ELEMS = {**row_softmax.CHUNK_ELEMS, **CHUNK_E32_ELEMS}
            row_softmax.CHUNK_GRID_BLOCKS_PER_SM = {}
        elif kind == "one_buffer":
            row_softmax.PREFETCH_BUFFERS = 1
            row_softmax.prefetches = lambda kernel: not kernel.startswith("kl_cluster_stream_")
            if args:
                row_softmax.PREFETCH_CLUSTER_GRID_BLOCKS = row_softmax.CLUSTER * (args[0] * device.sms // row_softmax.CLUSTER)
        elif kind == "tile":
            row_softmax.tiles = lambda kernel: True
        elif kind in PREFETCHED:
            row_softmax.prefetches = lambda kernel: PREFETCHED[kind].match(kernel) is not None
            if args:
                device.max_blocks = args[0] * device.sms
        elif kind not in ("default", "build") and kind not in BUILT_WITH:
            raise UnknownChoice(f"try_choices: no choice {kind!r} (misspelt, or gone: a results file's"
                                f" chunk_prefetch is the library's code since 2026-11-27, in_place and chunk_plain_access since"
                                f" 2026-11-28)")
        yield
    finally:
        for name, value in saved.items():
            setattr(row_softmax, name, value)
        device.clusters, device.max_blocks = saved_clusters, saved_blocks
        if device.defines != saved_defines:
            device.load_kernels(saved_defines)


def in_kernels(defines):
    """Whether kernels/ still tests each of `defines` (a build to measure's: `#ifdef DEFINE`); a
    misspelt or removed one would compile the library's kernels again."""
    kernels = Path(__file__).resolve().parents[1] / "kernels"
    source = "".join(path.read_text() for path in sorted(kernels.glob("*.cu*")))
    return all(f"#ifdef {define}\n" in source for define in defines)


def builds():
    """The defines of every kernel build the experiments load: () (the library's) and each build choice's."""
    return {()} | {tuple(args) if kind == "build" else BUILT_WITH[kind]
                   for *_, choices in EXPERIMENTS for kind, *args in choices if kind == "build" or kind in BUILT_WITH}


# What the device tool carries to a GPU machine in all (its `carry` paths, the kit in shared/ and the
# tracked files together: /work/.library/device).
CARRY_LIMIT_BYTES = 64 * 2 ** 20
# The prebuilt cubins, gzipped (a cubin of about 9 MB compresses to about 2): run_on_gpu.sh unpacks
# it into the cache before its first step.
CARRY_ARCHIVE = Path(__file__).resolve().parents[1] / ".kcarry" / "kcache.tgz"


def prebuild(arch, archive=CARRY_ARCHIVE):
    """Compile the library's and every build choice's cubin into the cache, and pack those cubins
    into `archive` (for the device call's `carry`; a folder git ignores); return 1 if the archive
    is more than the device tool carries."""
    import tarfile
    from puzzlelib_cost.backends.kernel_build import cached_cubin
    built = []
    for defines in sorted(builds()):
        built.append(Path(cached_cubin(arch, defines)))
        print(f"{arch} {' '.join(defines) or '(the library)'}: {built[-1]}", flush=True)
    archive = Path(archive)
    archive.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(archive, "w:gz") as tar:   # (paths relative to XDG_CACHE_HOME)
        for cubin in built:
            tar.add(cubin, arcname=f"puzzlelib_cost/{cubin.name}")   # (where the kit unpacks them, whatever folder built them)
    size = archive.stat().st_size
    print(f"{archive}: {size / 2 ** 20:.1f} MiB, {len(built)} cubins ({sum(c.stat().st_size for c in built) / 2 ** 20:.1f} "
          f"MiB unpacked); carry {archive.parent.name} with the device call")
    if size > CARRY_LIMIT_BYTES:
        print(f"prebuild: {archive} is more than the {CARRY_LIMIT_BYTES // 2 ** 20} MiB the device tool carries to a "
              "GPU machine", file=sys.stderr)
        return 1
    return 0


def check_prebuilt(arch):
    """Print whether the cache holds each cubin the experiments load (the prebuilt archive, unpacked,
    matches this machine's kernels and nvcc), and a summary line; 0 either way (a miss costs time,
    not results)."""
    from puzzlelib_cost.backends.kernel_build import cubin_cached
    found = 0
    for defines in sorted(builds()):
        here = cubin_cached(arch, defines)
        found += here
        print(f"{'found  ' if here else 'MISSING'} {arch} {' '.join(defines) or '(the library)'}")
    total = len(builds())
    print(f"prebuilt cubins: {found} of {total} in the cache" + ("" if found == total else
          f"; nvcc builds the other {total - found} at first use (about 45 s each): the kernels or nvcc differ "
          "from the prebuild's, or none was carried"))
    return 0


def build_missing(arch, jobs=None):
    """Build, in parallel (one nvcc a core), the cubins of the library and the build choices that the
    cache lacks (run_on_gpu.sh, after its gate, when the prebuilt archive did not match): one by one
    at first use they took about 45 s each inside the step that timed them.  1 if a build failed."""
    from concurrent.futures import ThreadPoolExecutor
    from puzzlelib_cost.backends.kernel_build import cached_cubin, cubin_cached
    missing = [defines for defines in sorted(builds()) if not cubin_cached(arch, defines)]
    failed = 0
    with ThreadPoolExecutor(max_workers=jobs or os.cpu_count() or 1) as pool:
        futures = {pool.submit(cached_cubin, arch, defines): defines for defines in missing}
        for future, defines in futures.items():
            try:
                future.result()
            except RuntimeError as exc:
                failed += 1
                print(f"FAILED {arch} {' '.join(defines) or '(the library)'}: {str(exc)[:400]}")
    print(f"built {len(missing) - failed} of the {len(missing)} missing cubins for {arch} "
          f"({len(builds()) - len(missing)} were in the cache)")
    return 1 if failed else 0


def cases(experiments=None):
    """Each case (shape, dtype, normTarget) of the experiments once, in the order first named, with
    the choices of every experiment that names it, each once: a case two experiments share has its
    default timed once, not twice."""
    merged = {}
    for shape, dtypes, norms, choices in EXPERIMENTS if experiments is None else experiments:
        for dtype in dtypes:
            for norm in norms:
                found = merged.setdefault((shape, dtype, norm), [])
                for choice in choices:
                    if choice not in found:
                        found.append(choice)
    for (shape, dtype, norm), choices in merged.items():
        yield shape, dtype, norm, choices


def launch_key(name, grid, block, signature, args, shared_bytes, defines):
    """What fixes a launch's work, and so its time: the kernel, the build it is from (its -D
    defines), its grid, block and dynamic shared memory, and its scalar arguments (the pointers left
    out: each call's grad is another block)."""
    return (name, tuple(defines), int(grid), int(block), int(shared_bytes),
            tuple(arg for kind, arg in zip(signature, args) if kind != "P"))


@contextlib.contextmanager
def recorded_launches(device):
    """The launch_key of each kernel `device` launches inside, in order, into the list yielded."""
    keys = []
    launch = device.launch

    def spy(name, grid, block, signature, args, shared_bytes=0):
        keys.append(launch_key(name, grid, block, signature, args, shared_bytes, device.defines))
        return launch(name, grid, block, signature, args, shared_bytes)
    device.launch = spy
    try:
        yield keys
    finally:
        device.launch = launch


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", help="results.json")
    parser.add_argument("--list", action="store_true", help="print the experiments and exit")
    parser.add_argument("--prebuild", metavar="ARCH",
                        help="compile, for ARCH (sm_90 for an H100), the kernels of the library and of every build "
                             "choice into the cache (XDG_CACHE_HOME), pack them into .kcarry/kcache.tgz, and exit: on a "
                             "machine without a GPU, so that the GPU machine, given that archive, runs no nvcc")
    parser.add_argument("--archive", default=str(CARRY_ARCHIVE), help="where --prebuild packs the cubins")
    parser.add_argument("--check-prebuilt", metavar="ARCH",
                        help="say which of the library's and the build choices' cubins for ARCH the cache holds "
                             "(after run_on_gpu.sh has unpacked .kcarry): the missing ones nvcc builds at first use")
    parser.add_argument("--build-missing", metavar="ARCH",
                        help="build, in parallel, the cubins of --check-prebuilt's list that the cache lacks, and exit")
    parser.add_argument("--jobs", type=int, default=None, help="--build-missing: nvcc builds at once (default: cores)")
    args = parser.parse_args(argv)
    if args.prebuild:
        return prebuild(args.prebuild, args.archive)
    if args.check_prebuilt:
        return check_prebuilt(args.check_prebuilt)
    if args.build_missing:
        return build_missing(args.build_missing, args.jobs)
    if args.list:
        for shape, dtype, norm, choices in cases():
            print(f"{shape[0]}x{shape[1]} {dtype} normTarget={norm}: " + ", ".join(map(choice_label, choices)))
        return 0

    import torch
    from bench_kl import GpuEnv, git_commit, measure, write_json
    from puzzlelib_cost import KLDivergence, backends, describe_backend
    env = GpuEnv(torch)
    device = backends.get_cuda_backend(0).device
    print(f"try_choices: ours on {describe_backend()}", flush=True)
    src = torch.empty(2 ** 31 // 4, dtype=torch.float32, device="cuda")
    dst = torch.empty_like(src)
    copy = measure(lambda i: dst.copy_(src), env.timer, (5, 20, 50, 0.2))
    ceiling = 2 * src.numel() * 4 / copy["median_s"]
    src = dst = None
    print(f"copy ceiling {ceiling / 1e9:.0f} GB/s", flush=True)
    # (what was timed: the model's comparisons skip timings of kernels changed since)
    results = {"device": env.device_name, "copy_bandwidth": ceiling, "commit": git_commit()[0],
               "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "kernels_digest": sources_digest(),
               "entries": []}
    print(f"{'case':>32} {'choice':>18} {'kernels':>34} {'us':>9} {'%copy':>6} {'grad diff':>9}")
    for (n, c), dtype, norm, choices in cases():
        pred, target = env.make_inputs(n, c, dtype, norm, seed=n + c)
        ideal = n * c * 3 * pred.element_size()
        div = KLDivergence(normTarget=norm)
        reference = None
        timed = {}   # the launches of each choice timed in this case -> its label
        for choice in choices:
            entry = {"shape": [n, c], "dtype": dtype, "norm_target": norm, "choice": choice_label(choice)}
            try:
                with chosen(choice, device):
                    # The grad below lands in the block torch's caching allocator freed last of its
                    # size: NaN first, so that elements a build never writes show (the previous
                    # choice's timed grads had left that block holding the right values).
                    poison = torch.full_like(pred, float("nan"))
                    del poison
                    with recorded_launches(device) as launched:
                        grad = div(pred, target, queryError=False)
                        torch.cuda.synchronize()
                    entry["kernels"] = sorted({key[0] for key in launched})
                    same = timed.get(tuple(launched), entry["choice"])
                    if same == entry["choice"]:
                        timing = measure(lambda i: div(pred, target, queryError=False), env.timer, (5, 20, 200, 0.1))
                        grad = grad.float()
                        if reference is None:
                            reference = grad
                        diff = float((grad - reference).abs().max() / reference.abs().max())   # (NaN: unwritten)
                        entry.update(median_s=timing["median_s"], fraction=ideal / timing["median_s"] / ceiling,
                                     grad_difference=diff)
                        timed[tuple(launched)] = entry["choice"]
                    else:   # (the same work as a choice timed already: the GPU's time goes to the next)
                        entry["same_launches_as"] = same
                print(f"{n:>8}x{c:<8} {dtype:>8} {'normT' if norm else 'probs':>5} {entry['choice']:>18} "
                      f"{','.join(entry['kernels'])[:34]:>34} " + (
                          f"{entry['median_s'] * 1e6:9.1f} {entry['fraction'] * 100:5.1f}% "
                          f"{entry['grad_difference']:9.1e}" if "fraction" in entry else
                          f"launches what {same} did: not timed again"), flush=True)
            except Exception as exc:   # a choice the kernels cannot take: say so, go on
                entry["error"] = f"{type(exc).__name__}: {exc}"[:300]
                print(f"{n:>8}x{c:<8} {dtype:>8} {entry['choice']:>18} ERROR {entry['error'][:120]}", flush=True)
            results["entries"].append(entry)
            if args.out:
                write_json(args.out, results)
        pred = target = grad = reference = None
        torch.cuda.empty_cache()
    print("best:", "; ".join(best_choices(results["entries"])))
    return 0


# A choice's grad within this of the default's (relative to its largest value) counts as the same
# result; a choice must beat the default by WIN_POINTS of the copy bandwidth to be named the best
# (re-timing the same kernels moved by up to a point on the H100).
GRAD_AGREEMENT = {"float32": 1e-5, "bfloat16": 1e-2}
WIN_POINTS = 0.015


def best_choices(entries):
    """Per case, "NxC dtype probs|normT: choice NN%": the fastest choice whose grad agrees with the
    default's, if it beats the default (its first timing) by WIN_POINTS, else the default."""
    cases = {}
    for e in entries:
        if "fraction" in e:
            cases.setdefault((tuple(e["shape"]), e["dtype"], e["norm_target"]), []).append(e)
    lines = []
    for (shape, dtype, norm), found in cases.items():
        agree = [e for e in found if e["grad_difference"] <= GRAD_AGREEMENT.get(dtype, 1e-2)]   # (NaN: never)
        default = next((e for e in found if e["choice"] == "default"), None)
        top = max(agree, key=lambda e: e["fraction"], default=None)
        if default is not None and (top is None or top["fraction"] < default["fraction"] + WIN_POINTS):
            top = default
        if top is not None:
            lines.append(f"{shape[0]}x{shape[1]} {dtype} {'normT' if norm else 'probs'}: {top['choice']} "
                         f"{top['fraction'] * 100:.0f}%")
    return lines


if __name__ == "__main__":
    sys.exit(main())
