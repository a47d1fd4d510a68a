"""Every kernel path held to its budget of SASS instructions and bytes per element.

benchmarks/cost_model.py reads both from the compiled kernels (see its docstring); a change
that adds instructions to a hot loop, or a pass over an array, fails here in CI instead of on a
GPU months later.  The budgets are today's figures plus 2 %: a change that lowers a figure
lowers its budget in the same commit (benchmarks/NOTES.md keeps the history).
"""
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

if shutil.which("nvcc") is None:
    pytest.skip("nvcc is not on PATH", allow_module_level=True)
cost_model = pytest.importorskip("cost_model")
try:
    cost_model.cuobjdump()
except FileNotFoundError as exc:
    pytest.skip(str(exc), allow_module_level=True)

# A shape per path: short rows (a thread a row, some slots empty), rows of a warp (32 elements a
# thread), rows held by a whole block of 512, long rows in a thread-block cluster (blocks of 256,
# or of 128 for many rows), rows longer than a cluster holds streamed by a cluster (blocks of 256,
# two an SM; the longest overflow L2), and in chunks (before sm_90, few rows on sm_90; reverse KL
# and JSD).
PATHS = {"small rows": (65536, 10), "rows, a warp a row": (16384, 1000), "rows, g512": (2048, 12000),
         "clusters": (256, 32000), "clusters, many rows": (8192, 32000), "stream": (2048, 128256),
         "stream, long rows": (1024, 262144), "chunks": (2048, 128256)}
BEFORE_SM_90 = ("chunks",)
HEADROOM = 1.02

# (path, dtype, mode): (SASS instructions per element, bytes per element), as measured by the model.
# The labels paths grew by 2-4 when ignored rows (KLDivergence's ignoreLabel) got an exact zero
# grad: a branch that zeroes the row, counted here although it runs only for ignored rows.
# Fix 8 (benchmarks/NOTES.md: fewer instructions an element in the forward-KL paths) lowered every
# figure below; its table keeps the ones before.
# Since the H100's second loan the library launches twins on some paths (row_softmax.PREFETCHED_KERNELS
# and TILE_KERNELS; NOTES.md, "The second loan"), and these budgets are theirs: the prefetching
# kernels' asynchronous copies and reads back from shared memory add 2-3 instructions an element
# (rows, a warp a row, bfloat16: 24.99, 28.16, 21.28, 33.41, 57.89 before; clusters, many rows,
# bfloat16: 32.54, 43.14, 28.9, 45.6, 69.38), the stream kernels' up to 3 with normTarget and 1-3
# fewer without (stream: 68.76, 62.29, 44.15, 37.09, 42.57, 32.16, 82.97, 62.07, 184.26, 96.11;
# long rows: 72.74, 64.46, 45.74, 41.89, 47.43, 36.22, with normTarget 13.555 bytes: the ring of
# two segments leaves fewer staged), and the tiled one-thread rows 20-31 more, counted on whole
# vectors (82.5, 63.3, 44.6, 39.0, 40.1, 32.6 for the plain kernel, which the H100 executed at 112
# an element at 65536x10 float32, its partial vectors one element at a time).
BUDGETS = {
    # Forward KL's target of probabilities ("probabilities") since 2026-11-27's seventh session: the
    # grad is p - s q, s the row's sum of p (take_target_sum in kl_divergence.cu), where it was p - q:
    # a sum an element, one more row reduction and exchange; the stream kernel reads the target in
    # pass 1, the chunked kernels in their statistics pass too (+4 B an element in float32).  Before:
    # rows (warp) 56.64 / 28.16, g512 77.95 / 36.14, small rows 108.4 / 66.1, clusters 62.46 / 35.14,
    # many rows 62.56 / 35.78, stream 67.66 / 34.99, long rows 63.54 / 31.77, chunks 64.96 / 35.84
    # SASS an element (float32 / bfloat16) and 15.941 / 7.941 B an element for the chunks.  (The
    # clusters' sum of their blocks' sums first went through combine_chunk_stats' rescalings, 0.9 to
    # 4.3 more: clusters 66.75 / 39.94, many rows 69.54 / 42.43.)
    ("small rows", "float32", "probabilities"): (110.0, 12.012),
    ("small rows", "float32", "normTarget"): (89.3, 12.012),
    ("small rows", "float32", "labels"): (65.1, 8.812),   # 48.9 before a one-thread row checked its head
    # bfloat16 rows of 10 in 16 slots instead of 32 (a one-thread row needs no slack): 106.0,
    # 143.3 and 98.6 before.
    ("small rows", "bfloat16", "probabilities"): (67.8, 6.013),
    ("small rows", "bfloat16", "normTarget"): (70.8, 6.013),
    ("small rows", "bfloat16", "labels"): (55.2, 4.812),
    ("rows, a warp a row", "float32", "probabilities"): (58.5, 12.001),   # 67.58 / 12.016 in blocks of 128, 8 a thread
    # float32 normTarget since 2026-11-28 (fourteenth session): the "_normt" twins too (below for
    # bfloat16; float32's full-precision exponentials are 8 instructions each): rows of a warp 49.6,
    # g512 69.76 and many-rows clusters 61.82 before.
    ("rows, a warp a row", "float32", "normTarget"): (36.77, 12.001),   # 66.56 / 12.016 in blocks of 128, 8 a thread
    # Labels in the row kernels of 32 elements a thread: x becomes its exponential in place, so q is
    # a multiply, not a second exponential (30.85, 23.33 and, g512, 42.67, 29.78 before).
    ("rows, a warp a row", "float32", "labels"): (21.63, 8.009),   # 45.82 / 8.024 in blocks of 128, 8 a thread
    ("rows, a warp a row", "bfloat16", "probabilities"): (29.89, 6.001),   # 39.17 / 6.016 in blocks of 128, 8 a thread
    # bfloat16 normTarget since 2026-11-28: the "_normt" twins (row_softmax.NORMT_KERNELS: the
    # exponentials kept in place of x and t, q and p a multiply each, not a second exponential):
    # rows of a warp 31.26, g512 41.39 and many-rows clusters 46.11 before.
    ("rows, a warp a row", "bfloat16", "normTarget"): (27.2, 6.001),   # 47.74 / 6.016 in blocks of 128, 8 a thread
    ("rows, a warp a row", "bfloat16", "labels"): (17.98, 4.009),   # 35.07 / 4.024 in blocks of 128, 8 a thread
    ("rows, g512", "float32", "probabilities"): (81.02, 12.001),
    ("rows, g512", "float32", "normTarget"): (52.61, 12.001),   # (the "_normt" twin: above)
    ("rows, g512", "float32", "labels"): (30.68, 8.002),
    ("rows, g512", "bfloat16", "probabilities"): (38.95, 6.001),
    ("rows, g512", "bfloat16", "normTarget"): (37.63, 6.001),   # (the "_normt" twin: above)
    ("rows, g512", "bfloat16", "labels"): (23.68, 4.002),
    # (Fix 13 took these rows on sm_90 to clusters of 8 blocks of 128, with more instructions an
    # element; measured slower on an H100, it was reverted: NOTES.md.)
    # The chunked kernels take each row's statistics from kl_chunk_rows, where every chunk combined
    # its row's chunk statistics again (78.63, 83.54, 54.36, 47.71, 62.21, 44.77 before, and
    # reverse KL and JSD 119.82, 98.68, 221.32, 132.41 below; then 69.81, 68.1, 45.93, 40.7, 49.85,
    # 38.02 and 90.33, 75.47, 190.8, 109.38), and since kl_chunk_stats' statistics are a warp's,
    # not a block's, and kl_chunk_grad adds its error over the block once, not a chunk (the
    # statistics read back, eight a chunk, add 0.036 bytes).  bfloat16 normTarget was 88.97 before
    # its grad stores became __stwb.  Since kl_chunk_grad (kl_chunk_sums for reverse KL and JSD)
    # starts from the chunk the pass before it ended on, its first reads find the model's L2 share
    # (chunk_l2_hits: 25 MB, 0.095 bytes an element at 2048x128256), at 0.06 to 1.0 more
    # instructions an element (the chunk counted down; 64.9, 61.88, 41.14, 35.78, 43.7, 32.97 and
    # 86.16, 70.72, 187.01, 104.63 before, bytes 16, 20, 12, 8, 10, 6, 28, 14 and 0.036).
    # Since 2026-11-28 kl_chunk_grad's loads and stores are plain, not evict-first (measured faster
    # on an H200): the model finds fewer of its reads in L2 (+0.03 bytes an element) and counts
    # -0.8 to +0.3 instructions (70.4, 61.95, 41.77, 47.04, 49.96, 37.06 and, below, 103.98, 94.86,
    # 203.94, 128.01 before; bytes 19.941, 11.941, 9.937, 5.937, 27.846, 13.842).
    ("chunks", "float32", "probabilities"): (70.4, 19.973),
    ("chunks", "float32", "normTarget"): (62.27, 19.973),
    ("chunks", "float32", "labels"): (41.52, 11.989),
    # Since 2026-11-27's twelfth session the 16-bit kl_chunk_stats and kl_chunk_grad load each
    # block's next chunk a turn ahead (CHUNK_PREFETCH, in a grid of 3 blocks an SM that they loop
    # over): the raw vectors copied aside before the next loads land in them, and the next chunk's
    # row and addresses, 3.3 to 6.8 more instructions an element (41.16, 43.83, 33.8 before, and
    # reverse KL and JSD 88.54, 121.18 below; bytes 9.941, 5.941, 13.846: fewer blocks' partial
    # errors read back).  A measured gain the model cannot see (it models no overlap of a block's loads with
    # its compute, and charges the capped grid fewer bytes in flight): on an H200 at a0916b1,
    # 16x1048576 bfloat16 82.5 -> 68.0 us, normTarget 80.0 -> 61.0 us (NOTES.md).
    ("chunks", "bfloat16", "probabilities"): (46.34, 9.969),
    ("chunks", "bfloat16", "normTarget"): (49.26, 9.969),
    ("chunks", "bfloat16", "labels"): (36.74, 5.985),
    # KLDivergence(normTarget=True, divergence="reverse" or "jsd"): one more row reduction on chip
    # in the row kernels, a third pass (kl_chunk_sums) on long rows; JSD adds a softplus an element,
    # full-precision for float32 (hence issue-bound: 67-74 % of the copy bandwidth predicted).
    # JSD's budgets were still those from before its softplus became min(y, 0) - log1p(e^-|y|)
    # (one log1p where there were two softplus): 162.6, 90.2, 166.3, 88.7, 300.2, 156.2.
    # Since 2026-11-27 the grad's S - g is R + (g_h - g) (DivergenceFactors, kl_divergence.cu: S - g
    # from a float S lost a confident row's grad): light sums of q g and q, the heavy class's g,
    # three row reductions where S was one, and two adds an element where one was.  Before, in the
    # order rows f32, bf16 (reverse, jsd), clusters, many rows, chunks, stream: 47.81, 35.87, 109.54,
    # 59.84; 65.66, 50.3, 128.06, 73.09; 59.1, 48.99, 121.66, 72.51; 87.18, 71.42, 187.46, 105.21;
    # 81.95, 61.4, 180.97, 94.29 (the chunks' and clusters' rise is mostly the block reductions).
    ("rows, a warp a row", "float32", "reverse"): (53.47, 12.001),   # 68.1 / 12.016 in blocks of 128, 8 a thread
    ("rows, a warp a row", "bfloat16", "reverse"): (41.76, 6.001),   # 53.63 / 6.016 in blocks of 128, 8 a thread
    ("rows, a warp a row", "float32", "jsd"): (112.99, 12.001),   # 123.39 / 12.016 in blocks of 128, 8 a thread
    ("rows, a warp a row", "bfloat16", "jsd"): (64.16, 6.001),   # 80.38 / 6.016 in blocks of 128, 8 a thread
    # The cluster kernels' relaxed exit (NOTES.md, "The second loan": measured faster, 8192x32000
    # float32 +5 and +10 points): kl_cluster_rows hands the block's error to rank 0 inside its row
    # loop, in a branch that runs in the last row only but is counted here every pass, +0.4 to +1.9
    # an element in forward KL (61.76, 54.4, 38.78, 33.22, 40.9, 30.85 and, in blocks of 128, 62.18,
    # 61.47, 37.92, 31.74, 42.82, 28.51 before); reverse KL and JSD came out 0.4 to 4.3 lower.
    ("clusters", "float32", "probabilities"): (65.6, 12.004),
    ("clusters", "float32", "normTarget"): (55.04, 12.004),
    ("clusters", "float32", "labels"): (39.04, 8.004),
    ("clusters", "bfloat16", "probabilities"): (39.04, 6.004),
    ("clusters", "bfloat16", "normTarget"): (41.73, 6.004),
    ("clusters", "bfloat16", "labels"): (32.13, 4.004),
    ("clusters", "float32", "reverse"): (76.35, 12.001),
    ("clusters", "bfloat16", "reverse"): (62.27, 6.0),
    ("clusters", "float32", "jsd"): (139.71, 12.001),
    ("clusters", "bfloat16", "jsd"): (87.55, 6.0),
    # The same rows in blocks of 128 threads, four an SM (fix 12): 32 elements a thread, so no
    # exponential is kept between the passes over them (normTarget: 7 more instructions an element).
    ("clusters, many rows", "float32", "probabilities"): (65.47, 12.004),
    ("clusters, many rows", "float32", "normTarget"): (49.34, 12.004),   # (the "_normt" twin: above)
    # (labels: x its exponential in place, as in the row kernels; 38.34 and 31.46 before, and the
    # "clusters" float32 labels 39.81, whose label is now read before the statistics)
    ("clusters, many rows", "float32", "labels"): (29.34, 8.004),
    ("clusters, many rows", "bfloat16", "probabilities"): (38.14, 6.0),
    ("clusters, many rows", "bfloat16", "normTarget"): (40.45, 6.0),   # (the "_normt" twin: above)
    ("clusters, many rows", "bfloat16", "labels"): (26.21, 4.0),
    ("clusters, many rows", "float32", "reverse"): (68.06, 12.001),
    ("clusters, many rows", "bfloat16", "reverse"): (58.91, 6.0),
    ("clusters, many rows", "float32", "jsd"): (128.8, 12.001),
    ("clusters, many rows", "bfloat16", "jsd"): (81.79, 6.0),
    # Rows longer than a cluster holds, streamed by a cluster (fix 9, benchmarks/NOTES.md): pass 2
    # takes segments from registers, shared memory or L2 (bytes: DRAM's, with the model's L2
    # share; 16 rows of 1048576 keep more waiting than shared memory and that share hold).
    ("stream", "float32", "probabilities"): (71.78, 12.0),
    ("stream", "float32", "normTarget"): (65.47, 12.0),
    ("stream", "float32", "labels"): (43.78, 8.0),
    ("stream", "bfloat16", "probabilities"): (40.8, 6.0),
    ("stream", "bfloat16", "normTarget"): (45.54, 6.0),
    ("stream", "bfloat16", "labels"): (30.79, 4.0),
    # Rows of 262144: the twice-read segments overflow shared memory and the model's L2 share with
    # normTarget (15.3 B an element with the 25 MB the H100's probe found and the prefetching
    # kernel's ring; 13.6 without the ring, 12.8 with the 31.5 MB assumed before).  (16 rows of 1048576, the earlier "stream, few rows", now take the chunked
    # kernels: measured faster, fix 15.)  Rows on 16-byte boundaries of a multiple of a cluster's
    # segment (262144) take no segment of padding since 2026-11-27 (J = 8 in float32, 4 in
    # bfloat16, where the slack of a misaligned head made 9 and 5): 71.25, 67.3, 44.87, 38.95,
    # 50.25, 33.95 before, bytes with normTarget 15.332 (one segment fewer read again).  The row's
    # J, counted as each row starts, adds 0.1 to 0.7 an element at 2048x128256 (the "stream" ones
    # were 67.62, 65.23, 43.64, 34.73, 45.27, 30.63 and reverse KL and JSD 60.71, 93.68).
    # (Forward KL's probabilities are staged as two arrays too, the target summed in pass 1: the
    # model had them as one, 12.0 B, until test_the_model_times_the_launches_the_library_makes.)
    ("stream, long rows", "float32", "probabilities"): (66.87, 15.11),
    ("stream, long rows", "float32", "normTarget"): (60.28, 15.11),
    ("stream, long rows", "float32", "labels"): (40.17, 8.0),
    # bfloat16 rows of 4 segments a block and more since 2026-11-28: the "_prefetch_pass2" twin
    # (row_softmax.PASS2_KERNELS), whose pass 2 copies its next segment in while it computes this
    # one: 1.5 more instructions an element (36.74, 41.03 before) that an H200 measured 7-8 points
    # faster (the model sees the instructions, not the overlap: NOTES.md).
    ("stream, long rows", "bfloat16", "probabilities"): (38.27, 6.0),
    ("stream, long rows", "bfloat16", "normTarget"): (41.52, 6.0),
    ("stream, long rows", "bfloat16", "labels"): (27.67, 4.0),
    # Reverse KL and JSD on the stream path: the row's S between a second and a third pass, each
    # computing q and g (JSD issue-bound, its softplus twice an element).  Since 2026-11-27's
    # seventh session pass 3 forms S - g as R + (g_h - g), as every other kernel does, and the
    # row's error is added before it (88.08, 68.71, 187.42, 100.44 before; labels 43.72, 30.75,
    # 40.11, 27.64 before, the error's sum now a call shared by the two branches).
    ("stream", "float32", "reverse"): (89.37, 12.0),
    ("stream", "bfloat16", "reverse"): (70.08, 6.0),
    ("stream", "float32", "jsd"): (188.68, 12.0),
    ("stream", "bfloat16", "jsd"): (102.23, 6.0),
    ("chunks", "float32", "reverse"): (104.17, 27.877),
    ("chunks", "bfloat16", "reverse"): (94.03, 13.873),   # (the next chunk a turn ahead: above)
    ("chunks", "float32", "jsd"): (204.26, 27.877),
    ("chunks", "bfloat16", "jsd"): (127.18, 13.873),
}


def entry(path, dtype, mode, source_dir=None):
    """mode: the target ("probabilities", "normTarget", "labels"), or a divergence other than
    forward ("reverse", "jsd") against teacher logits (normTarget)."""
    n, c = PATHS[path]
    divergence = mode if mode in ("reverse", "jsd") else "forward"
    return cost_model.predict(n, c, dtype, mode in ("normTarget", "reverse", "jsd"), mode == "labels",
                              source_dir=source_dir, divergence=divergence, clusters=path not in BEFORE_SM_90)


def over_budget(found, path, dtype, mode):
    sass, data = BUDGETS[(path, dtype, mode)]
    problems = []
    if found["sass_per_element"] > sass * HEADROOM:
        problems.append(f"{found['sass_per_element']} SASS instructions per element > budget {sass}")
    if found["bytes_per_element"] > data * HEADROOM:
        problems.append(f"{found['bytes_per_element']} bytes per element > budget {data}")
    return problems


@pytest.mark.parametrize("path,dtype,mode", sorted(BUDGETS))
def test_path_within_its_budget(path, dtype, mode):
    found = entry(path, dtype, mode)
    assert not over_budget(found, path, dtype, mode), f"{found['path']}: {over_budget(found, path, dtype, mode)}"


def test_every_benchmark_case_has_a_prediction():
    entries = cost_model.all_predictions()
    assert len(entries) == len(cost_model.SHAPES) * 2 * 2
    for e in entries:
        assert set(e) >= {"path", "shape", "dtype", "norm_target", "bytes_per_element", "sass_per_element",
                          "predicted_fraction"}
        assert 0 < e["predicted_fraction"] <= e["floor_fraction"] <= 1, e   # (no kernel beats an ideal one)


def planted_kernels(tmp_path, plants):
    """A copy of kernels/ with, for each (file name, line, planted) of `plants`, the line
    `planted` before `line` (there once)."""
    kernels = tmp_path / "kernels"
    shutil.copytree(ROOT / "kernels", kernels)
    for name, line, planted in plants:
        source = (kernels / name).read_text()
        assert source.count(line) == 1
        (kernels / name).write_text(source.replace(line, planted + line))
    return kernels


# Three bugs in three kernels, planted in one copy of the sources (one build for all three: each
# build of the kernels takes a minute of CI).  Each must break its own path's budget.
PLANTS = {
    # An extra loop in the row kernel.
    "rows, a warp a row": ("kl_divergence.cu",
                           "        const double row_error = group_reduce<G>(double(error) * double(w), Sum());\n",
                           "        for (int k = 0; k < ELEMS; ++k) error += exp_(x[k]);   // planted: an extra loop\n"),
    # The cluster path's point is one read of the row: reading pred again for the gradient (as
    # the chunked path does) must show as bytes over budget.
    "clusters": ("kl_cluster.cu", "        zero_if_ignored(ignored, x, error);\n",
                 "        chunk.load(pred + offset, n_cols, neg_inf<A>(), x);   // planted: a second read\n"),
    # kl_cluster_stream_* reads the target in pass 1 (for normTarget's statistics, and since
    # 2026-11-27's seventh session the sum of forward KL's probabilities): taking its softmax's
    # statistics there too adds instructions.
    "stream, long rows": ("kl_cluster.cu", "            take(pred, 0, x, stats_x);\n",
                         "            if (target) take(target, 1, t, stats_x);   // planted: a read for probabilities too\n"),
}


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    return planted_kernels(tmp_path_factory.mktemp("planted"), PLANTS.values())


def test_an_extra_loop_in_the_row_kernel_breaks_its_budget(planted):
    found = entry("rows, a warp a row", "float32", "probabilities", source_dir=planted)
    assert over_budget(found, "rows, a warp a row", "float32", "probabilities")


def test_a_second_read_in_the_cluster_kernel_breaks_its_byte_budget(planted):
    found = entry("clusters", "float32", "probabilities", source_dir=planted)
    assert any("bytes per element" in problem for problem in over_budget(found, "clusters", "float32", "probabilities"))


def test_a_target_read_in_the_stream_kernels_first_pass_breaks_its_budgets(planted):
    found = entry("stream, long rows", "float32", "probabilities", source_dir=planted)
    problems = over_budget(found, "stream, long rows", "float32", "probabilities")
    # (Its DRAM bytes grow only where the open rows overflow L2: 16 rows of 1048576 in blocks of
    # 512 did, before those rows went to the chunked kernels; the cluster plant guards bytes.)
    assert any("SASS" in problem for problem in problems), problems


def test_the_planted_build_keeps_the_untouched_paths_within_budget(planted):
    """The plants are in kl_rows, kl_cluster_rows and kl_cluster_stream; the chunked kernels,
    which none of them touches, keep their budget in the same build (so the three tests above see
    their own plants, not a build over budget everywhere)."""
    found = entry("chunks", "float32", "probabilities", source_dir=planted)
    assert not over_budget(found, "chunks", "float32", "probabilities"), found


def test_a_chunked_second_pass_finds_l2_only_where_it_starts_on_the_last_chunks():
    """chunk_l2_hits: a pass that reads 128 MB (pred again and the target) and writes 64 MB (grad)
    after one that read 64 MB (pred) finds the model's L2 share L going back with its own lines
    evict-first, L / 3 going back without (its new lines push out the oldest at twice the pace it
    reads down from the newest), nothing in the same order; data that fits L2 is found in any
    order, never more than the pass reads again; a pass with nothing to read again finds nothing."""
    held = cost_model.CONSTANTS["l2_reuse_bytes"]
    assert 8e6 < held < 64e6   # (the cases below need the share between the two sizes)
    hits = cost_model.chunk_l2_hits
    assert hits(128e6, 64e6, 64e6, back_and_forth=True, evict_first=True) == held
    assert hits(128e6, 64e6, 64e6, back_and_forth=True, evict_first=False) == pytest.approx(held / 3)
    assert hits(128e6, 64e6, 64e6, back_and_forth=False, evict_first=True) == 0
    for back_and_forth in (True, False):
        assert hits(16e6, 8e6, 8e6, back_and_forth, evict_first=False) == 8e6
        assert hits(4e6, 4e6, 8e6, back_and_forth, evict_first=True) == 4e6
    assert hits(128e6, 64e6, 0, back_and_forth=True, evict_first=True) == 0


def test_the_chunked_path_for_few_long_rows_reads_its_l2_share_once_less():
    """16 rows of 1048576 bfloat16 on an H100 (the chunked kernels): pred and the target read twice
    (the target's sum in the statistics pass, for the grad's p - s q), less the model's L2 share the
    grad pass finds, plus the chunks' statistics.  Its loads and stores plain (the library's since
    2026-11-28), its own new lines push out the oldest of that share as it reads it: 2 bytes
    written for 4 read again an element, so it finds 1 / (1 + 2/4) of it."""
    found = cost_model.predict(16, 1048576, "bfloat16", False)
    assert found["path"].startswith("kl_chunk_stats_bf16")
    elements = 16 * 1048576
    ideal_second_read = 4 * 2 + 2 - cost_model.CONSTANTS["l2_reuse_bytes"] / (1 + 2 / 4) / elements
    assert ideal_second_read < found["bytes_per_element"] < ideal_second_read + 0.05


def test_the_fit_finds_the_issue_efficiency_that_made_the_fractions(monkeypatch):
    """cost_model.py --fit: fractions made at a known issue_efficiency give that value back, and
    the constant in use is left as it was."""
    monkeypatch.setattr(cost_model, "CONSTANTS", dict(cost_model.CONSTANTS))
    cases = [(16384, 1000, "bfloat16", True), (8192, 32000, "bfloat16", False), (2048, 128256, "float32", True)]
    cost_model.CONSTANTS["issue_efficiency"] = 0.45
    measured = {case: cost_model.predict(*case)["predicted_fraction"] for case in cases}
    cost_model.CONSTANTS["issue_efficiency"] = 0.7
    value, pairs = cost_model.fit_issue_efficiency(measured)
    assert value == 0.45
    assert cost_model.CONSTANTS["issue_efficiency"] == 0.7
    assert [case for case, _, _ in pairs] == sorted(cases)


@pytest.mark.parametrize("arch", ["sm_90", "sm_100"])
def test_the_shared_memory_reserve_covers_each_blocks_static_arrays(arch):
    """row_softmax.BLOCK_SHARED_RESERVE, which the stream kernel's staging and the model's
    residency leave a block besides its dynamic shared memory, holds the static shared memory of
    every kernel that takes dynamic shared memory (the prefetching and stream kernels), and the
    1 KiB the driver reserves a block.  (At 2048 it did not: the stream kernels' 1664 static bytes
    made two blocks of 7 staged segments too many for an SM.)"""
    import re
    from puzzlelib_cost import row_softmax
    from puzzlelib_cost.backends.kernel_build import cached_cubin
    text = cost_model._run_cuobjdump("-res-usage", str(cached_cubin(arch)))
    static = {name: int(size) for name, size in re.findall(r"Function (\S+):\s*\n\s*REG:\d+ STACK:\d+ SHARED:(\d+)", text)}
    dynamic = [name for name in static if name.endswith("_prefetch") or name.startswith("kl_cluster_stream_")]
    assert len(dynamic) >= 9, sorted(static)
    largest = max(dynamic, key=static.get)
    assert static[largest] + 1024 <= row_softmax.BLOCK_SHARED_RESERVE, f"{largest}: {static[largest]} static bytes"


def test_the_models_copies_of_kernel_constants_are_the_kernels():
    """Figures the model takes from the kernels' source: a tiled block's vectors a thread a trip
    (copy_stretch's HELD, the smaller of a thread's vectors, 4 of float32 and 2 of bfloat16 in 16
    elements, and its cap), and the cluster kernels' blocks an SM (__launch_bounds__(THREADS,
    512 / THREADS)), which the host's staging and the model's residency take as
    CLUSTER_THREADS_AN_SM."""
    import re
    from puzzlelib_cost import row_softmax
    rows = (ROOT / "kernels" / "kl_divergence.cu").read_text()
    held = re.search(r"constexpr int HELD = ELEMS / VEC < (\d+) \? ELEMS / VEC : (\d+);", rows)
    assert held and held.group(1) == held.group(2)
    assert [min(16 // vec, int(held.group(2))) for vec in (4, 8)] == [cost_model.TILE_HELD] * 2
    clusters = (ROOT / "kernels" / "kl_cluster.cu").read_text()
    bounds = set(re.findall(r"__launch_bounds__\(THREADS, (\d+) / THREADS\)", clusters))
    assert bounds == {str(row_softmax.CLUSTER_THREADS_AN_SM)}


@pytest.mark.parametrize("divergence,exchanges", [("forward", 1), ("reverse", 2), ("jsd", 2)])
def test_the_model_reads_the_cluster_kernels_exchanges_from_their_machine_code(divergence, exchanges):
    """The model charges cluster_exchange for each cluster barrier a pass of kl_cluster_* waits at
    (UCGABAR_WAIT in its row loop), read from the machine code, not a copy of the kernels' count:
    the statistics a row, and for reverse KL and JSD its S as well (exchange_in_cluster)."""
    code, _ = cost_model._machine_code("normTarget", divergence=divergence)
    for name in ("kl_cluster_f32_t128_e32", "kl_cluster_bf16_t128_e32_prefetch"):
        assert cost_model.main_loop(code[name]).cluster_waits == exchanges, name
    for name in ("kl_cluster_stream_f32_t256_e16_prefetch", "kl_cluster_stream_bf16_t256_e32_prefetch"):
        assert cost_model.stream_loops(code[name], divergence != "forward").exchanges == exchanges, name
    assert cost_model.main_loop(code["kl_rows_f32_g32_e32"]).cluster_waits == 0


def test_the_model_times_the_twins_the_library_launches():
    """The model follows the library's choice of twins (row_softmax.PREFETCHED_KERNELS,
    TILE_KERNELS): their names, the prefetching cluster kernel's capped grid, and the residency
    that a prefetching block's shared memory leaves (float32's 64 KiB: three blocks an SM)."""
    from puzzlelib_cost import row_softmax
    assert [launch.name for launch in cost_model.launches(65536, 10, "f32")] == ["kl_rows_f32_g1_e16_tile"]
    assert [launch.name for launch in cost_model.launches(16384, 1000, "bf16")] == ["kl_rows_bf16_g32_e32_prefetch"]
    assert [launch.name for launch in cost_model.launches(16384, 1000, "f32")] == ["kl_rows_f32_g32_e32"]
    (cluster,) = cost_model.launches(8192, 32000, "bf16")
    assert cluster.name == "kl_cluster_bf16_t128_e32_prefetch"
    assert cluster.blocks == row_softmax.PREFETCH_CLUSTER_GRID_BLOCKS and cluster.shared_bytes == 32768
    assert cost_model.launches(2048, 128256, "f32")[0].name == "kl_cluster_stream_f32_t256_e16_prefetch"
    assert cost_model.launches(16384, 1000, "bf16", clusters=False)[0].name == "kl_rows_bf16_g32_e32"
    assert cost_model.blocks_per_sm(64, 128, row_softmax.prefetch_bytes("f32", 128, 32)) == 3


class _RecordingWork:
    """A CUDA backend's `work` with the model's H100 (and a pycuda device's grid limit) that records
    each launch instead of making it."""

    def __init__(self, clusters):
        k = cost_model.CONSTANTS
        self.sms, self.clusters, self.max_blocks = k["sms"], clusters, 2 ** 31 - 1
        self.shared_per_sm, self.shared_per_block = k["shared_per_sm"], k["shared_per_block"]
        self.launched, self._next = [], 1 << 24

    def _pointer(self):
        self._next += 1 << 28   # (16-byte aligned, as the benchmark's arrays are)
        return self._next

    def empty_like(self, info):
        return None, self._pointer()

    def upload(self, array, dtype):
        return self._pointer()

    def labels(self, labels, dtype):   # (host labels, as _Work.labels takes them: uploaded)
        return self.upload(labels, dtype)

    def constant(self, array, dtype):
        return self._pointer()

    def scratch(self, nbytes):
        return self._pointer()

    def error_out(self, blocks, batch_error, accumulator):
        return 0, 0

    def launch(self, name, blocks, threads, signature, arguments, shared_bytes=0):
        self.launched.append((name, blocks, threads, shared_bytes, arguments))


def _library_launches(n, c, suffix, mode, divergence, clusters):
    import contextlib
    import types
    from puzzlelib_cost import row_softmax
    dtype = {"f32": "float32", "bf16": "bfloat16"}[suffix]
    work = _RecordingWork(clusters)

    class Backend:
        name = "cuda"

        @contextlib.contextmanager
        def run(self, infos):
            yield work

    def array(pointer):
        return types.SimpleNamespace(shape=(n, c), dtype=dtype, size=n * c, pointer=pointer)

    labels = np.arange(n) % c if mode == "labels" else None
    row_softmax.run(Backend(), array(work._pointer()), array(work._pointer()), labels, mode == "normTarget", None,
                    None, None, True, divergence=row_softmax.DIVERGENCES[divergence])
    return work.launched


CASES = [(shape, suffix, mode, divergence, clusters) for shape in cost_model.SHAPES for suffix in ("f32", "bf16")
         for mode in ("probabilities", "normTarget", "labels") for divergence in ("forward", "reverse", "jsd")
         for clusters in (True, False) if mode != "labels" or divergence == "forward"]


@pytest.mark.parametrize("shape,suffix,mode,divergence,clusters", CASES)
def test_the_model_times_the_launches_the_library_makes(shape, suffix, mode, divergence, clusters):
    """cost_model.launches repeats row_softmax's plan in the model's terms: for every benchmark
    case, the same kernels with the same grids, blocks and shared memory, and a stream kernel's
    staged segments (its last argument).  (It once staged forward KL's probabilities as one array
    where the library stages pred's and the target's: 3 to 5 segments a row where the library
    keeps 1.)"""
    n, c = shape
    launched = _library_launches(n, c, suffix, mode, divergence, clusters)
    modelled = cost_model.launches(n, c, suffix, divergence, mode == "normTarget", clusters, mode == "labels")
    assert [(name, blocks, threads, shared) for name, blocks, threads, shared, _ in launched] == \
        [(launch.name, launch.blocks, launch.threads, launch.shared_bytes) for launch in modelled]
    for (name, *_, arguments), launch in zip(launched, modelled):
        if launch.segments:
            assert arguments[-1] == launch.staged, f"{name}: the library stages {arguments[-1]} segments"


def test_a_builds_machine_code_is_its_cost_model_build(monkeypatch):
    """predict(defines=...) reads a build to measure's kernels: the cost-model build compiled with
    those defines too, and the registers of the real build with them; without defines, the same
    cubins as before (their cache keys unchanged)."""
    built = []

    def cached_cubin(arch, defines=(), directory=None):
        built.append((arch, tuple(defines), directory))
        return f"cubin{len(built)}"
    monkeypatch.setattr(cost_model, "cached_cubin", cached_cubin)
    monkeypatch.setattr(cost_model, "disassemble", lambda cubin: {"kernels of": cubin})
    monkeypatch.setattr(cost_model, "registers", lambda cubin: {"registers of": cubin})
    monkeypatch.setattr(cost_model, "_CODE", {})
    arch, mode = cost_model.ARCH, f"PLC_COST_MODEL_MODE={cost_model.MODES['normTarget']}"
    assert cost_model._machine_code("normTarget") == ({"kernels of": "cubin1"}, {"registers of": "cubin2"})
    assert built == [(arch, ("PLC_COST_MODEL", mode), None), (arch, (), None)]
    built.clear()
    assert cost_model._machine_code("normTarget", build=("PLC_TRY_ONE_BUFFER",)) == ({"kernels of": "cubin1"},
                                                                                    {"registers of": "cubin2"})
    assert built == [(arch, ("PLC_COST_MODEL", mode, "PLC_TRY_ONE_BUFFER"), None),
                     (arch, ("PLC_TRY_ONE_BUFFER",), None)]


def test_model_vs_choices_predicts_a_build_choice_from_its_build(tmp_path, monkeypatch, capsys):
    """benchmarks/model_vs_choices.py predicts each measured choice with the kernels it ran: a build
    choice (here one_buffer) with its build's defines, the library's with none, and counts their pair
    as ordered as measured or not; a build whose define the kernels no longer test is left out."""
    import json
    import model_vs_choices
    import try_choices
    asked = []

    def predict(n, c, dtype, norm_target, clusters=True, defines=()):
        asked.append(tuple(defines))
        return {"path": "kl_cluster_bf16_t128_e32_prefetch", "predicted_fraction": 0.6 if defines else 0.5}
    monkeypatch.setattr(model_vs_choices.cost_model, "predict", predict)
    case = {"shape": [8192, 32000], "dtype": "bfloat16", "norm_target": True,
            "kernels": ["kl_cluster_bf16_t128_e32_prefetch"]}
    results = {"entries": [dict(case, choice="default", fraction=0.49), dict(case, choice="one_buffer", fraction=0.56),
                           dict(case, choice="build(PLC_TRY_GONE)", fraction=0.3)]}
    path = tmp_path / "choices.json"
    path.write_text(json.dumps(results))
    assert model_vs_choices.main([str(path)]) == 0
    assert asked == [(), try_choices.BUILT_WITH["one_buffer"]]
    assert "1 of 1 pairs ordered as measured" in capsys.readouterr().out


def test_the_fit_leaves_out_timings_of_other_kernels_and_says_when_the_sources_changed(tmp_path, monkeypatch):
    """A case timed on kernels other than the ones the library launches there today (the chunks'
    two kernels where they now take three) paired with today's prediction misled --fit (the kit
    audit: a prediction/measurement ratio of 1.73); a file timed on other sources says so."""
    import json
    from puzzlelib_cost.backends.kernel_build import sources_digest
    monkeypatch.setattr(cost_model, "predict", lambda n, c, dtype, norm: {"path": "kl_a + kl_b + kl_c"})
    same = {"shape": [16384, 1000], "dtype": "float32", "norm_target": False, "kernels": ["kl_a", "kl_b", "kl_c"]}
    other = dict(same, norm_target=True, kernels=["kl_a", "kl_c"])
    for digest, changed in ((sources_digest(), False), ("0123456789abcdef", True)):
        path = tmp_path / "choices.json"
        path.write_text(json.dumps({"kernels_digest": digest, "entries": [dict(same, choice="default", fraction=0.7),
                                                                           dict(other, choice="default", fraction=0.5)]}))
        said = []
        assert cost_model.measured_fractions(path, log=said.append) == {(16384, 1000, "float32", False): 0.7}
        assert any("left out 1 case" in line for line in said)
        assert any("may have changed since" in line for line in said) == changed


def test_model_vs_choices_counts_a_repeated_choice_once_and_leaves_out_capped_grids(tmp_path, monkeypatch, capsys):
    """A default timed twice in a case is one choice (at its mean), not two pairs with each other
    choice; a choice that caps the grid (cluster_prefetch(4)), which the model does not follow, is
    left out and counted so."""
    import json
    import model_vs_choices

    def predict(n, c, dtype, norm_target, clusters=True, defines=()):
        return {"path": "kl_cluster_bf16_t128_e32_prefetch", "predicted_fraction": 0.6 if defines else 0.5}
    monkeypatch.setattr(model_vs_choices.cost_model, "predict", predict)
    case = {"shape": [8192, 32000], "dtype": "bfloat16", "norm_target": True,
            "kernels": ["kl_cluster_bf16_t128_e32_prefetch"]}
    results = {"entries": [dict(case, choice="default", fraction=0.49), dict(case, choice="one_buffer", fraction=0.56),
                           dict(case, choice="default", fraction=0.51),
                           dict(case, choice="cluster_prefetch(4)", fraction=0.40)]}
    path = tmp_path / "choices.json"
    path.write_text(json.dumps(results))
    assert model_vs_choices.main([str(path)]) == 0
    out = capsys.readouterr().out
    assert "default measured 0.50" in out and "1 of 1 pairs ordered as measured" in out and "1 capped grid" in out
