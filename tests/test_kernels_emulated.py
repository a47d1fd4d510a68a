"""The CUDA path, end to end, with kernels/kl_divergence.cu run in the CPU emulation.

KLDivergence -> CudaBackend (kernel choice, scratch, launches) -> the real .cu source
compiled with g++ against tests/cuda_emulation, by two routes (the `run` fixture):
"emulated", the backend on tests/emulated_device.py (which can pick the thread order
of every launch), and "pycuda", the backend on PycudaDevice and real pycuda over a
CUDA driver (the driver stand-in of tests/driver_standin where there is no GPU, whose
launches run the same emulation; the GPU itself where there is one).  Every kernel the backend can launch
is reached: each row kernel at its largest row (an unaligned head included) and the
cluster path (sm_90+) and the chunked path for long rows; C of 1, 2, 3, the vector width and one more; rows that
start off 16-byte boundaries; both normTarget settings, labels; float32, float16,
bfloat16 and float64.  Results are compared with the float64 reference of
tests/reference.py and must be bitwise identical in every thread order.
"""
import functools
import sys
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

import reference
from cuda_emulation import KernelFault, build
from emulated_device import EmuArray, EmulatedDevice, emulated_build
from puzzlelib_cost import CostError, KLDivergence, backends, row_softmax
from puzzlelib_cost.backends.cuda_backend import DTYPE_SUFFIX, ITEMSIZE, CudaBackend, vec_width
from puzzlelib_cost.kernel_index import kernel_names
from puzzlelib_cost.row_softmax import (CHUNK_ELEMS, CHUNK_THREADS, CLUSTER, CLUSTER_KERNELS, CLUSTER_MANY_ROWS_KERNELS,
                                       CLUSTER_MANY_ROWS_WAVES, ROW_KERNELS, STREAM_ELEMS, row_kernel)
from puzzlelib_cost.backends.kernel_build import MAIN_SOURCE

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import try_choices  # noqa: E402  (a build to measure's chunks)

KERNELS = Path(__file__).resolve().parents[1] / "kernels"
EMULATED_SMS = 4   # the SMs the emulated device and the driver stand-in report
DTYPES = {"float32": np.float32, "float16": np.float16, "bfloat16": ml_dtypes.bfloat16, "float64": np.float64}

# Rounding of the grad relative to the float64 reference: float arithmetic (a few units of
# 6e-8) then one rounding to the output type, whose unit roundoff dominates for 16-bit types.
GRAD_RTOL = {"float32": 1e-5, "float16": 2e-3, "bfloat16": 1e-2, "float64": 1e-11}
# Error: float arithmetic per term for every input type but float64 (the kernels compute in
# float), relative to the size of the terms (reference.term_magnitude).
ERROR_RTOL = {"float32": 1e-5, "float16": 1e-5, "bfloat16": 1e-5, "float64": 1e-11}


def cost_kernels(launches):
    """The launches less the integer labels' check (check_labels_*, before a cost's kernels on labels,
    and commit_checked_labels after them where the answer is read after the work is queued:
    tests/test_label_check.py tests them)."""
    return [name for name in launches if not name.startswith("check_labels_") and name != "commit_checked_labels"]


@pytest.fixture(scope="session")
def module():
    return build([KERNELS / MAIN_SOURCE], include_dirs=[KERNELS])


@pytest.fixture(params=["emulated", pytest.param("pycuda", marks=pytest.mark.pycuda)])
def run(request, module):
    """run(pred, target, norm_target=False, order="forward", max_blocks=None, clusters=True) runs
    KLDivergence on host arrays moved to the device (clusters=False: as on a GPU without
    thread-block clusters); returns (error, grad as a float64 host array, names of the kernels
    launched; None where they cannot be known: on a real GPU)."""
    if request.param == "emulated":
        def run_emulated(pred, target, norm_target=False, order="forward", max_blocks=None, clusters=True):
            device = EmulatedDevice(module, order=order, max_blocks=max_blocks or 2 ** 31 - 1, clusters=clusters)
            with backends.substituted_cuda(CudaBackend(device)):
                error, grad = call_cost(EmuArray(pred), EmuArray(target), norm_target, EmuArray)
            return error, grad, cost_kernels(device.launches)
        return run_emulated

    driver = request.getfixturevalue("cuda_driver")
    from puzzlelib_cost import gpuarray

    def run_pycuda(pred, target, norm_target=False, order="forward", max_blocks=None, clusters=True):
        device = backends.get_cuda_backend(0).device
        if driver != "gpu":
            driver.set_launch_order(order, seed=1)
            driver.clear()
        if max_blocks:
            device.max_blocks = max_blocks
        saved_clusters = device.clusters
        device.clusters = clusters and saved_clusters
        try:
            error, grad = call_cost(on_device(gpuarray, pred), on_device(gpuarray, target), norm_target,
                                    gpuarray.GPUArray)
        finally:
            device.__dict__.pop("max_blocks", None)
            device.clusters = saved_clusters
            if driver != "gpu":
                driver.set_launch_order("forward")
        launches = None if driver == "gpu" else cost_kernels(line.split()[0] for line in driver.launches())
        return error, grad, launches
    return run_pycuda


def call_cost(pred, target, norm_target, array_type, divergence="forward"):
    """(error, grad as a float64 host array); grad must be an array_type of pred's dtype and shape."""
    error, grad = KLDivergence(normTarget=norm_target, divergence=divergence)(pred, target)
    assert isinstance(grad, array_type) and grad.dtype == pred.dtype and grad.shape == pred.shape
    return error, grad.get().astype(np.float64)


def on_device(gpuarray, host):
    """A pycuda copy of `host`; a view at the same byte offset into a device copy of its base when
    `host` is a view starting inside a bigger buffer (rows off 16-byte boundaries)."""
    base = host.base if isinstance(host.base, np.ndarray) else None
    if base is None or not host.flags.c_contiguous or not base.flags.c_contiguous:
        return gpuarray.to_gpu(np.ascontiguousarray(host))
    start = (host.ctypes.data - base.ctypes.data) // host.itemsize
    return gpuarray.to_gpu(base.reshape(-1))[start:start + host.size].reshape(host.shape)


def inputs(shape, dtype, norm_target, seed=0, labels=False):
    rng = np.random.default_rng(seed)
    pred = (3 * rng.standard_normal(shape)).astype(dtype)
    if labels:
        return pred, rng.integers(0, shape[1], size=shape[0])
    if norm_target:
        return pred, (2 * rng.standard_normal(shape)).astype(dtype)
    p = rng.random(shape) ** 3   # skewed, with a few near-zero probabilities
    p /= p.reshape(shape[0], -1).sum(axis=1).reshape((-1,) + (1,) * (len(shape) - 1))
    return pred, p.astype(dtype)


def check(error, grad, pred, target, norm_target, dtype_name):
    # The reference sees exactly the values the kernels read (inputs already rounded to dtype).
    ref = reference.kl_reference(pred.astype(np.float64),
                                 target if target.dtype.kind in "iu" else target.astype(np.float64),
                                 normTarget=norm_target)
    tol = ERROR_RTOL[dtype_name] * (abs(ref["error"]) + reference.term_magnitude(ref))
    assert abs(error - ref["error"]) <= tol, (error, ref["error"], tol)
    atol = GRAD_RTOL[dtype_name] * np.abs(ref["p"]).max() / ref["n"]
    np.testing.assert_allclose(grad, ref["grad"], rtol=GRAD_RTOL[dtype_name], atol=atol)


def row_cases():
    """(dtype, C) reaching every row kernel at its largest row, as a row that may start off a
    16-byte boundary (C * itemsize not a multiple of 16: VEC - 1 slots of slack) and as rows that
    all start on one (exact fit), plus small and odd C."""
    cases = []
    for name, suffix in DTYPE_SUFFIX.items():
        vec = vec_width(suffix)
        for threads, elems in ROW_KERNELS[suffix]:
            cases += [(name, threads * elems - vec + 1), (name, threads * elems)]
            if threads == 1:   # a thread a row, no slack: most rows' heads leave too few slots
                cases.append((name, elems - 1))
        cases += [(name, c) for c in (1, 2, 3, vec, vec + 1)]
    return sorted(set(cases))


def expected_row_kernel(suffix, cols):
    """What the host must choose: the test's arrays start on 16-byte boundaries (NumPy's and
    pycuda's allocations do), so the rows do when C * itemsize is a multiple of 16."""
    slack = 0 if (cols * ITEMSIZE[suffix]) % 16 == 0 else vec_width(suffix) - 1
    return row_kernel(suffix, cols, slack)


def taken(kernel, clusters=True, norm_target=False):
    """The kernel the library launches in `kernel`'s place: on sm_90+ its tiled twin (TILE_KERNELS)
    or its prefetching twin (PREFETCHED_KERNELS; the stream kernel's where its ring fits, as in
    these tests), else itself; for normTarget forward KL (norm_target) the "_normt" twin of that,
    on every GPU (NORMT_KERNELS)."""
    normt = "_normt" if norm_target and kernel in row_softmax.NORMT_KERNELS else ""
    if not clusters:
        return kernel + normt
    return kernel + ("_tile" if kernel in row_softmax.TILE_KERNELS else
                     "_prefetch" if kernel in row_softmax.PREFETCHED_KERNELS else "") + normt


@pytest.mark.parametrize("dtype_name,cols,kernel", [("bfloat16", 1000, "kl_rows_bf16_g32_e32"),
                                                    ("float32", 10, "kl_rows_f32_g1_e16"),
                                                    ("bfloat16", 10, "kl_rows_bf16_g1_e16")])
def test_no_twin_before_sm_90(run, dtype_name, cols, kernel):
    """The twins were measured on an H100 only: before sm_90 the row kernels are the plain ones
    (the prefetching one's copies would not even be asynchronous on sm_75), on sm_90+ the twins."""
    pred, target = inputs((5, cols), DTYPES[dtype_name], True, seed=cols + 7)
    for clusters in (False, True):
        error, grad, launches = run(pred, target, True, clusters=clusters)
        assert launches in (None, [taken(kernel, clusters, True)])
        assert taken(kernel, clusters, True) != taken(kernel, not clusters, True)
        check(error, grad, pred, target, True, dtype_name)


@pytest.mark.parametrize("norm_target", [False, True])
@pytest.mark.parametrize("dtype_name,cols", row_cases())
def test_every_row_kernel(run, dtype_name, cols, norm_target):
    # Odd N and (for most C) rows that are not multiples of 16 bytes: rows start misaligned.
    pred, target = inputs((3, cols), DTYPES[dtype_name], norm_target, seed=cols)
    error, grad, launches = run(pred, target, norm_target)
    threads, elems = expected_row_kernel(DTYPE_SUFFIX[dtype_name], cols)
    assert launches in (None, [taken(f"kl_rows_{DTYPE_SUFFIX[dtype_name]}_g{threads}_e{elems}", norm_target=norm_target)])
    check(error, grad, pred, target, norm_target, dtype_name)


@pytest.mark.parametrize("dtype_name", list(DTYPES))
@pytest.mark.parametrize("norm_target", [False, True])
@pytest.mark.parametrize("clusters", [True, False], ids=["sm90", "before-sm90"])
def test_long_rows_take_the_cluster_or_chunked_path(run, dtype_name, norm_target, clusters):
    """Rows longer than one block holds: one cluster of CLUSTER blocks per row on sm_90+ (not
    for double), else the chunked kernels."""
    suffix = DTYPE_SUFFIX[dtype_name]
    chunk = CHUNK_THREADS * CHUNK_ELEMS[suffix]
    cols = max(t * e for t, e in ROW_KERNELS[suffix]) + chunk + 3   # several chunks, a ragged last one
    pred, target = inputs((2, cols), DTYPES[dtype_name], norm_target, seed=1)
    error, grad, launches = run(pred, target, norm_target, clusters=clusters)
    chunked = [f"kl_chunk_stats_{suffix}", f"kl_chunk_rows_{suffix}", f"kl_chunk_grad_{suffix}"]
    expected = [f"kl_cluster_{suffix}_t256_e16"] if clusters and suffix != "f64" else chunked
    assert launches in (None, expected)
    check(error, grad, pred, target, norm_target, dtype_name)


@pytest.mark.parametrize("dtype_name", ["float32", "bfloat16"])
@pytest.mark.parametrize("threads,elems", CLUSTER_KERNELS["f32"] + CLUSTER_MANY_ROWS_KERNELS)
@pytest.mark.parametrize("fit", ["exact", "unaligned"])
def test_every_cluster_kernel_at_its_largest_row(run, dtype_name, threads, elems, fit):
    """Each cluster kernel with its last slot used: a row of CLUSTER * THREADS * E elements on
    16-byte boundaries, or as long as fits with a misaligned row's slack (C * itemsize not a
    multiple of 16); one row more than that takes the next kernel.  2 rows, or for the kernel of
    many rows (blocks of 128) as few as take them on the device's 4 SMs."""
    suffix = DTYPE_SUFFIX[dtype_name]
    capacity = CLUSTER * threads * elems
    cols = capacity if fit == "exact" else capacity - vec_width(suffix) + 1
    many_rows = (threads, elems) in CLUSTER_MANY_ROWS_KERNELS
    n_rows = CLUSTER_MANY_ROWS_WAVES * 4 * EMULATED_SMS // CLUSTER if many_rows else 2
    pred, target = inputs((n_rows, cols), DTYPES[dtype_name], True, seed=11)
    error, grad, launches = run(pred, target, True)
    assert launches in (None, [taken(f"kl_cluster_{suffix}_t{threads}_e{elems}", norm_target=True)])
    check(error, grad, pred, target, True, dtype_name)


@pytest.mark.parametrize("dtype_name", list(DTYPES))
@pytest.mark.parametrize("clusters", [True, False], ids=["sm90", "before-sm90"])
def test_rows_longer_than_a_cluster_holds(run, dtype_name, clusters):
    """Past the largest cluster kernel's row: streamed by a cluster on sm_90+ (not for double),
    else the chunked kernels."""
    suffix = DTYPE_SUFFIX[dtype_name]
    cols = CLUSTER * max(t * e for t, e in CLUSTER_KERNELS["f32"]) + 5
    pred, target = inputs((2, cols), DTYPES[dtype_name], True, seed=12)
    error, grad, launches = run(pred, target, True, clusters=clusters)
    expected = ([taken(f"kl_cluster_stream_{suffix}_t256_e{STREAM_ELEMS[suffix]}")] if clusters and suffix != "f64"
                else [f"kl_chunk_stats_{suffix}", f"kl_chunk_rows_{suffix}", f"kl_chunk_grad_{suffix}"])
    assert launches in (None, expected)
    check(error, grad, pred, target, True, dtype_name)


@pytest.fixture(params=[(256, None), (256, 0), (256, 1)], ids=["t256", "t256-nothing-staged", "t256-one-staged"])
def streamed(request, monkeypatch):
    """Every row longer than one block holds goes to kl_cluster_stream_* (no register cluster
    kernels), however few the rows, so that rows the emulation runs quickly reach its
    segments, padding chunks and row ends; each block keeps in shared memory as many segments
    as fit (all of these rows' but the last), or at most 0 or 1 (the rest read again from
    memory).  Returns the name of the kernel the library takes for a dtype: float32's and
    bfloat16's prefetching twin (with its ring of two segments besides those), float16's plain one."""
    threads, most_staged = request.param
    monkeypatch.setattr(row_softmax, "CLUSTER_KERNELS", {})
    monkeypatch.setattr(row_softmax, "stream_kernel", lambda suffix, *shape_and_device: (threads, STREAM_ELEMS[suffix]))
    if most_staged is not None:
        monkeypatch.setattr(row_softmax, "stream_staging", functools.partial(row_softmax.stream_staging,
                                                                             most=most_staged))

    def kernel(dtype_name):
        suffix = DTYPE_SUFFIX[dtype_name]
        name = f"kl_cluster_stream_{suffix}_t{threads}_e{STREAM_ELEMS[suffix]}"
        return name + ("_prefetch" if name in row_softmax.PREFETCH_KERNELS and row_softmax.prefetches(name) else "")
    return kernel


# Rows of J = 1, 2 and 3 segments a block (padding chunks at the end of each) for float32 in
# blocks of 256 (fewer segments for 16-bit types), one starting off 16-byte
# boundaries (an odd C).
STREAM_COLS = [16385, 9 * 4096 + 3, 17 * 4096 + 4]


@pytest.mark.parametrize("norm_target", [False, True])
@pytest.mark.parametrize("dtype_name", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("cols", STREAM_COLS)
def test_stream_kernel(run, streamed, cols, dtype_name, norm_target):
    pred, target = inputs((3, cols), DTYPES[dtype_name], norm_target, seed=cols % 97)
    error, grad, launches = run(pred, target, norm_target)
    expected = [streamed(dtype_name)]
    if dtype_name == "float16" and not norm_target:   # (float16's stream kernel does not sum forward KL's
        expected = [f"kl_chunk_{part}_f16" for part in ("stats", "rows", "grad")]   # probabilities: the chunks do)
    assert launches in (None, expected)
    check(error, grad, pred, target, norm_target, dtype_name)


@pytest.mark.parametrize("dtype_name", ["float32", "bfloat16"])
def test_stream_kernel_labels(run, streamed, dtype_name):
    pred, labels = inputs((3, STREAM_COLS[1]), DTYPES[dtype_name], False, seed=13, labels=True)
    error, grad, launches = run(pred, labels)
    assert launches in (None, [streamed(dtype_name)])
    check(error, grad, pred, labels, False, dtype_name)


@pytest.mark.parametrize("shifted", [False, True], ids=["on-boundaries", "one-element-off"])
@pytest.mark.parametrize("dtype_name", ["float32", "bfloat16"])
def test_stream_kernel_rows_of_whole_segments(module, streamed, dtype_name, shifted):
    """Rows of exactly 2 segments a block (2 * CLUSTER * 256 * E elements), with grad (__call__) and
    without (validate).  On 16-byte boundaries the host plans J = 2 (stream_segments with no
    slack), as the kernel counts them (which the results cannot show: a segment of padding adds
    nothing).  pred and target one element off: the host
    plans for a slot of slack, J = 3; without grad the rows' vectors start a slot before them, so
    the kernel must take J = 3 for them (as aligned rows, J = 2, it would lose each row's last
    element, made its largest logit); with grad (a fresh array, on boundaries) it reads them element by element from
    their start, J = 2."""
    suffix = DTYPE_SUFFIX[dtype_name]
    elems = STREAM_ELEMS[suffix]
    cols = 2 * CLUSTER * 256 * elems
    pred, target = inputs((3, cols), DTYPES[dtype_name], True, seed=17)
    # Each row's last element its largest logit, in pred and target: a row cut short shows.
    pred[:, -1], target[:, -1] = pred.max() + 8, target.max() + 8
    if shifted:
        pred, target = off_boundary(pred), off_boundary(target)
    slack = row_softmax.vec_width(suffix) - 1 if shifted else 0
    assert row_softmax.stream_segments(256, elems, cols, slack) == (3 if shifted else 2)
    device = EmulatedDevice(module)
    with backends.substituted_cuda(CudaBackend(device)):
        error, grad = call_cost(EmuArray(pred), EmuArray(target), True, EmuArray)
        val_error = KLDivergence(normTarget=True).validate(EmuArray(pred), EmuArray(target))
    assert device.launches == [streamed(dtype_name)] * 2
    check(error, grad, pred, target, True, dtype_name)
    ref = reference.kl_reference(pred.astype(np.float64), target.astype(np.float64), normTarget=True)
    assert abs(val_error - ref["error"]) <= ERROR_RTOL[dtype_name] * (abs(ref["error"]) + reference.term_magnitude(ref))


@pytest.mark.parametrize("divergence", ["reverse", "jsd"])
def test_stream_kernel_rows_of_whole_segments_other_divergences(module, streamed, divergence):
    """Reverse KL and JSD take the row's J segments three times (pass 2's S, pass 3's grad): rows
    of exactly 2 segments a block, pred and target one element off, no grad (validate: J = 3),
    give the error of the same values on 16-byte boundaries (J = 2) but for the rounding of their
    regrouped sums; each row's last element its largest logit, as above."""
    cols = 2 * CLUSTER * 256 * STREAM_ELEMS["f32"]
    pred, target = inputs((3, cols), np.float32, True, seed=19)
    pred[:, -1], target[:, -1] = pred.max() + 8, target.max() + 8
    device = EmulatedDevice(module)
    with backends.substituted_cuda(CudaBackend(device)):
        cost = KLDivergence(normTarget=True, divergence=divergence)
        on_boundaries = cost.validate(EmuArray(pred), EmuArray(target))
        off_boundaries = cost.validate(EmuArray(off_boundary(pred)), EmuArray(off_boundary(target)))
    assert device.launches == [streamed("float32")] * 2
    assert off_boundaries == pytest.approx(on_boundaries, rel=1e-5)


def test_stream_kernel_grid_stride_and_thread_orders(run, streamed):
    """More rows than clusters (the grid is one cluster), bitwise the same in every thread order."""
    pred, target = inputs((3, STREAM_COLS[2]), np.float32, True, seed=14)
    results = [run(pred, target, True, order=order, max_blocks=CLUSTER)[:2] for order in ("forward", "reverse", "random")]
    for error, grad in results[1:]:
        assert error == results[0][0]
        assert np.array_equal(grad, results[0][1])
    check(*results[0], pred, target, True, "float32")


def test_stream_kernel_with_48_kib_staged(run, monkeypatch):
    """Three staged segments of float32 in blocks of 256 take exactly 48 KiB of dynamic shared
    memory.  With the kernel's static shared memory that is past the driver's default limit
    (48 KiB less the static bytes), so the launch must raise the limit first: on an H100,
    2048x128256 float32 failed with "cuLaunchKernel failed: invalid argument" when it did not
    (benchmarks/results/2026-11-26-h100-007ea3f).  The stand-in reads the static bytes from the
    cubin and refuses such a launch as the GPU did.  (The plain kernel: its prefetching twin,
    the library's for float32, takes 80 KiB here, its ring of two segments besides the three.)"""
    monkeypatch.setattr(row_softmax, "prefetches", lambda kernel: False)
    cols = 25 * 4096 + 1   # J = 4 segments a block, 3 of them staged
    assert row_softmax.stream_staging("f32", 256, 16, cols, 3, False, 233472, 232448) == (3, 48 << 10)
    pred, target = inputs((3, cols), np.float32, False, seed=15)
    error, grad, launches = run(pred, target, False)
    assert launches in (None, ["kl_cluster_stream_f32_t256_e16"])
    check(error, grad, pred, target, False, "float32")


def test_stream_staging():
    """A block keeps as many of its J - 1 twice-read segments as its share of an SM's shared
    memory holds: half of it for blocks of 256 (two an SM)."""
    h100 = {"shared_per_sm": 233472, "shared_per_block": 232448}
    # float32, 256 threads: 16 KiB a segment of pred, 32 KiB with the target; 111 KiB a block
    # (half an SM, less row_softmax.BLOCK_SHARED_RESERVE).
    assert row_softmax.stream_staging("f32", 256, 16, 128256, 3, False, **h100) == (3, 3 * 16384)   # J = 4
    assert row_softmax.stream_staging("f32", 256, 16, 262144, 3, False, **h100) == (6, 6 * 16384)   # J = 9
    assert row_softmax.stream_staging("f32", 256, 16, 262144, 3, True, **h100) == (3, 3 * 32768)
    # bfloat16: 16 KiB a segment of pred too.
    assert row_softmax.stream_staging("bf16", 256, 32, 1048576, 7, False, **h100) == (6, 6 * 16384)  # J = 17
    assert row_softmax.stream_staging("f32", 256, 16, 20000, 3, True, **h100) == (0, 0)             # J = 1
    # Rows on 16-byte boundaries (no slack) of a multiple of a cluster's segment take no segment
    # of padding: J = 8, 6 of the 7 twice-read ones staged (with slack J = 9, 6 of 8), and bfloat16's
    # rows of 262144 J = 4, with normTarget 3 staged of 3 (with slack 3 of 4).
    assert row_softmax.stream_segments(256, 16, 262144, 0) == 8
    assert row_softmax.stream_segments(256, 16, 262144, 3) == 9
    assert row_softmax.stream_staging("f32", 256, 16, 262144, 0, False, **h100) == (6, 6 * 16384)
    assert row_softmax.stream_segments(256, 32, 262144, 0) == 4
    assert row_softmax.stream_segments(256, 32, 262144, 7) == 5
    assert row_softmax.stream_staging("bf16", 256, 32, 262144, 0, True, **h100) == (3, 3 * 32768)


@pytest.mark.parametrize("dtype_name", ["float32", "bfloat16"])
@pytest.mark.parametrize("cols,mode", [(STREAM_COLS[0], "normTarget"), (STREAM_COLS[1], "probabilities"),
                                       (STREAM_COLS[2], "normTarget"), (STREAM_COLS[2], "labels"),
                                       (5 * CLUSTER * 4096 + 3, "normTarget")])
def test_stream_kernel_prefetch(run, monkeypatch, dtype_name, cols, mode):
    """kl_cluster_stream_*_prefetch (pass 1 copies each segment in while it takes the statistics
    of the one before, staged segments straight into their slots, the others into a ring of two)
    gives the stream kernel's bits in every thread order: rows of 1 to 6 segments a block (float32
    with normTarget at 6: segments 0 to 3 in the ring, 4 staged, 5 in the ring), 3 rows on one
    cluster (so that it loops over rows), as many segments staged as fit beside the ring."""
    suffix = DTYPE_SUFFIX[dtype_name]
    norm_target = mode == "normTarget"
    monkeypatch.setattr(row_softmax, "CLUSTER_KERNELS", {})
    monkeypatch.setattr(row_softmax, "stream_kernel", lambda suffix, *shape_and_device: (256, STREAM_ELEMS[suffix]))
    pred, target = inputs((3, cols), DTYPES[dtype_name], norm_target, seed=cols % 89, labels=mode == "labels")
    check_twin(run, monkeypatch, pred, target, norm_target, dtype_name,
                           f"kl_cluster_stream_{suffix}_t256_e{STREAM_ELEMS[suffix]}", max_blocks=CLUSTER)


def prefetch_normt(kernel, norm_target, monkeypatch):
    """The "_normt" of `kernel`'s prefetching twin for normTarget forward KL: bfloat16's twins have
    one (NORMT_KERNELS and PREFETCHED_KERNELS: the library's); float32's, which the library does not
    launch, run the general form, and the plain kernel is made to as well (row_softmax.in_place)."""
    if not (norm_target and kernel in row_softmax.NORMT_KERNELS):
        return ""
    if kernel in row_softmax.PREFETCHED_KERNELS:
        return "_normt"
    monkeypatch.setattr(row_softmax, "in_place", lambda name: False)
    return ""


# The twins of a kernel (kernel + suffix) and the row_softmax function that chooses each.
TWIN_CHOICES = {"_prefetch": "prefetches", "_tile": "tiles"}


def check_twin(run, monkeypatch, pred, target, norm_target, dtype_name, kernel, max_blocks, twin="_prefetch"):
    """`kernel`'s prefetching twin (row_softmax.PREFETCH_KERNELS), or its tiled one (twin="_tile":
    TILE_KERNELS), gives `kernel`'s bits in every thread order (the emulation lands each
    asynchronous copy at its wait in "forward", at its issue in "reverse"), on a grid of at most
    max_blocks, and the reference's results."""
    # (normTarget on a kernel of row_softmax.NORMT_KERNELS: its "_normt" twin, and the twin's where
    # that has one: bfloat16's prefetching twins; float32's run the general form, as the plain
    # kernel then does: prefetch_normt)
    normt = prefetch_normt(kernel, norm_target, monkeypatch) if twin == "_prefetch" else \
        "_normt" if norm_target and kernel in row_softmax.NORMT_KERNELS else ""
    for choice in TWIN_CHOICES.values():   # (the plain kernel: neither twin)
        monkeypatch.setattr(row_softmax, choice, lambda name: False)
    plain = run(pred, target, norm_target, max_blocks=max_blocks)
    assert plain[2] in (None, [kernel + normt])
    monkeypatch.setattr(row_softmax, TWIN_CHOICES[twin], lambda name: name == kernel)
    for order in ("forward", "reverse", "random"):
        error, grad, launches = run(pred, target, norm_target, order=order, max_blocks=max_blocks)
        assert launches in (None, [kernel + twin + normt])
        assert error == plain[0] and np.array_equal(grad, plain[1]), order
    check(error, grad, pred, target, norm_target, dtype_name)


def test_stream_prefetch_staging():
    """The prefetching stream kernel keeps two segments fewer staged where its share of an SM
    limits them (6 -> 4, 3 -> 1; not at J = 4), for its ring, whose bytes the launch's include;
    none where the ring alone does not fit."""
    h100 = {"shared_per_sm": 233472, "shared_per_block": 232448}
    assert row_softmax.stream_staging("f32", 256, 16, 262144, 3, False, **h100, ring=2) == (4, 6 * 16384)   # J = 9
    assert row_softmax.stream_staging("f32", 256, 16, 262144, 3, True, **h100, ring=2) == (1, 3 * 32768)
    assert row_softmax.stream_staging("f32", 256, 16, 128256, 3, False, **h100, ring=2) == (3, 5 * 16384)  # J = 4
    assert row_softmax.stream_staging("f32", 256, 16, 262144, 3, True, shared_per_sm=2 * 65536,
                                      shared_per_block=65536, ring=2) is None
    # At most `most` staged (try_choices.py's and these tests' fewer): the ring's bytes stay.
    assert row_softmax.stream_staging("f32", 256, 16, 262144, 3, False, **h100, ring=2, most=1) == (1, 3 * 16384)
    assert row_softmax.stream_staging("f32", 256, 16, 262144, 3, False, **h100, most=0) == (0, 0)
    assert row_softmax.stream_staging("f32", 256, 16, 128256, 3, False, **h100, most=9) == (3, 3 * 16384)


def test_cluster_kernel_choice():
    """The row kernels as far as they go; then, where the grid fills every SM's four blocks of 128
    four times over (264 rows on 132 SMs), clusters of blocks of 128 for rows up to CLUSTER *
    4096, else of 256.  Before sm_90: rows only."""
    choose = row_softmax.row_or_cluster
    assert choose("f32", 32000, 0, 264, 132, True) == (None, (128, 32))
    assert choose("bf16", 32000, 0, 263, 132, True) == (None, (256, 16))
    assert choose("f16", 32768, 0, 8, 4, True) == (None, (128, 32))
    assert choose("f16", 32768, 7, 8, 4, True) == (None, (256, 32))
    assert choose("f32", 65536, 0, 10 ** 6, 132, True) == (None, (256, 32))
    assert choose("f32", 65537, 0, 10 ** 6, 132, True) == (None, None)
    assert choose("f64", 32000, 0, 10 ** 6, 132, True) == (None, None)
    # Rows a row kernel holds stay there, however many (fix 13 reverted: measured slower).
    assert choose("f32", 8192, 0, 10 ** 6, 132, True) == ((512, 16), None)
    assert choose("bf16", 16000, 0, 10 ** 6, 132, True) == ((512, 32), None)
    assert choose("f32", 1000, 0, 10 ** 6, 132, True) == ((32, 32), None)   # (a warp a row: fix 14)
    assert choose("f32", 8192, 0, 10 ** 6, 132, False) == ((512, 16), None)
    assert choose("f64", 4096, 0, 10 ** 6, 132, True) == ((512, 8), None)   # (no cluster kernels for double)
    assert choose("f32", 4096, 0, 10 ** 6, 132, True) == ((128, 32), None)
    assert choose("f32", 2048, 0, 10 ** 6, 132, True) == ((128, 16), None)
    assert choose("f64", 4096, 0, 10 ** 6, 132, True, rows_allowed=False) == (None, None)   # (reverse KL, JSD)


def test_stream_kernel_choice():
    """Blocks of 256 while the grid (CLUSTER blocks a row) gives every SM two, else none: the
    chunked kernels take fewer rows (fix 15)."""
    assert row_softmax.stream_kernel("f32", 33, 132) == (256, 16)
    assert row_softmax.stream_kernel("bf16", 32, 132) is None
    assert row_softmax.stream_kernel("f16", 1, 4) == (256, 32)
    assert row_softmax.stream_kernel("f16", 1, 5) is None


@pytest.mark.parametrize("dtype_name", ["float32", "bfloat16"])
def test_few_long_rows_take_the_chunked_kernels(run, monkeypatch, dtype_name):
    """Too few rows to give every SM two blocks of the stream kernel: the chunked kernels, as
    before sm_90.  (The devices here have 4 SMs, which one row's cluster of 8 fills: the choice
    is asked as for 8 SMs.)"""
    choose = row_softmax.stream_kernel
    monkeypatch.setattr(row_softmax, "stream_kernel", lambda suffix, n_rows, sms: choose(suffix, n_rows, 2 * sms))
    suffix = DTYPE_SUFFIX[dtype_name]
    cols = CLUSTER * max(t * e for t, e in CLUSTER_KERNELS["f32"]) + 5   # (longer than a cluster holds)
    pred, target = inputs((1, cols), DTYPES[dtype_name], True, seed=16)
    error, grad, launches = run(pred, target, True)
    assert launches in (None, [f"kl_chunk_stats_{suffix}", f"kl_chunk_rows_{suffix}", f"kl_chunk_grad_{suffix}"])
    check(error, grad, pred, target, True, dtype_name)


@pytest.mark.parametrize("norm_target", [False, True])
@pytest.mark.parametrize("dtype_name", ["float16", "bfloat16"])
@pytest.mark.parametrize("cols", [37, 1000, 20000])
def test_16_bit_inputs_with_subnormal_probabilities(run, dtype_name, cols, norm_target):
    """16-bit inputs take the hardware exp and log on a GPU (kernels/common.cuh, ElementMath):
    wide logits, probabilities that are subnormal in the input type, and exact zeros must still
    agree with the float64 reference to the dtype's tolerance."""
    dtype = DTYPES[dtype_name]
    rng = np.random.default_rng(cols)
    pred = (8 * rng.standard_normal((4, cols))).astype(dtype)
    if norm_target:
        target = (8 * rng.standard_normal((4, cols))).astype(dtype)
    else:
        tiny = float(ml_dtypes.finfo(dtype).smallest_subnormal)
        target = rng.random((4, cols)) ** 4
        target[:, ::7] = 0.0
        target /= target.sum(axis=1, keepdims=True)
        target[:, 1::7] = 3 * tiny                       # subnormal in the input type
        target = target.astype(dtype)
        assert (target[:, 1::7].astype(np.float64) == 3 * tiny).all()
    error, grad, _ = run(pred, target, norm_target)
    check(error, grad, pred, target, norm_target, dtype_name)


def test_vocabulary_scale_rows(run):
    pred, target = inputs((2, 128256), np.float32, True, seed=2)
    error, grad, _ = run(pred, target, True)
    check(error, grad, pred, target, True, "float32")


def prefetch_cases():
    """(dtype, G, E, C, mode) reaching every prefetching row kernel at its largest row, aligned (exact
    fit) and possibly not, and at a short row, with probabilities, normTarget or labels."""
    cases = []
    for name in ("float32", "bfloat16"):
        suffix = DTYPE_SUFFIX[name]
        assert suffix in row_softmax.PREFETCH_DTYPES
        for threads, elems in row_softmax.PREFETCH_ROW_KERNELS:
            largest = threads * elems
            for cols, mode in [(largest, "normTarget"), (largest - vec_width(suffix) + 1 if threads > 1 else elems - 3,
                                                          "probabilities"), (largest // 2 + 1, "labels")]:
                cases.append((name, threads, elems, cols, mode))
    return cases


@pytest.mark.parametrize("dtype_name,threads,elems,cols,mode", prefetch_cases())
def test_prefetch_row_kernels(run, monkeypatch, dtype_name, threads, elems, cols, mode):
    """The prefetching row kernels (asynchronous copies of each group's next row, two buffers) give
    the row kernel's bits in every thread order, with a grid of 2 blocks so that every block loops
    over rows and its last round has groups past the last row."""
    suffix = DTYPE_SUFFIX[dtype_name]
    rows_per_round = 2 * (row_softmax.ROW_BLOCK // threads if threads < row_softmax.ROW_BLOCK else 1)
    shape = (3 * rows_per_round + 1, cols)
    norm_target = mode == "normTarget"
    pred, target = inputs(shape, DTYPES[dtype_name], norm_target, seed=cols, labels=mode == "labels")
    assert expected_row_kernel(suffix, cols) == (threads, elems)
    check_twin(run, monkeypatch, pred, target, norm_target, dtype_name,
                           f"kl_rows_{suffix}_g{threads}_e{elems}", max_blocks=2)


def off_boundary(host):
    """A copy of `host` that starts one element past a 16-byte boundary: a view into a bigger
    buffer (on_device keeps its offset on the device)."""
    buffer = np.zeros(host.size + 16, host.dtype)
    start = (-buffer.ctypes.data % 16) // host.itemsize + 1
    view = buffer[start:start + host.size].reshape(host.shape)
    view[...] = host
    return view


@pytest.mark.parametrize("dtype_name", ["float32", "bfloat16"])
@pytest.mark.parametrize("cols,mode,shifted", [(16, "normTarget", None), (10, "probabilities", None),
                                               (10, "normTarget", "pred"), (11, "probabilities", "target"),
                                               (13, "labels", None), (9, "labels", "pred")])
def test_tile_row_kernels(run, monkeypatch, dtype_name, cols, mode, shifted):
    """The tiled row kernels (a block's rows staged through shared memory as one stretch) give the
    row kernel's bits in every thread order: rows of up to 16, arrays on 16-byte boundaries (the
    stretches move in vectors) or pred's or target's one element off (one element at a time), on
    2 blocks that loop over 128 rows a round, the last round one row."""
    suffix = DTYPE_SUFFIX[dtype_name]
    norm_target = mode == "normTarget"
    pred, target = inputs((3 * 2 * row_softmax.ROW_BLOCK + 1, cols), DTYPES[dtype_name], norm_target, seed=cols,
                          labels=mode == "labels")
    if shifted == "pred":
        pred = off_boundary(pred)
    elif shifted == "target":
        target = off_boundary(target)
    assert f"kl_rows_{suffix}_g1_e16" in row_softmax.TILE_KERNELS
    check_twin(run, monkeypatch, pred, target, norm_target, dtype_name, f"kl_rows_{suffix}_g1_e16", max_blocks=2,
               twin="_tile")


@pytest.mark.parametrize("dtype_name", ["float32", "bfloat16"])
@pytest.mark.parametrize("cols,mode", [(CLUSTER * 128 * 32, "normTarget"), (20001, "probabilities"),
                                       (16500, "labels")])
def test_prefetch_cluster_kernels(run, monkeypatch, dtype_name, cols, mode):
    """kl_cluster_*_t128_e32_prefetch (the next row's chunk copied into shared memory while the
    cluster computes this one) gives the cluster kernel's bits in every thread order: 9 rows
    (many for the emulated 4 SMs) on 2 clusters, which loop over 5 and 4 rows."""
    suffix = DTYPE_SUFFIX[dtype_name]
    norm_target = mode == "normTarget"
    pred, target = inputs((9, cols), DTYPES[dtype_name], norm_target, seed=cols, labels=mode == "labels")
    check_twin(run, monkeypatch, pred, target, norm_target, dtype_name, f"kl_cluster_{suffix}_t128_e32",
                           max_blocks=2 * CLUSTER)


@pytest.mark.parametrize("dtype_name", list(DTYPES))
@pytest.mark.parametrize("cols", [1, 10, 1000, 20000])
def test_labels(run, cols, dtype_name):
    pred, labels = inputs((5, cols), DTYPES[dtype_name], False, seed=3, labels=True)
    error, grad, _ = run(pred, labels)
    check(error, grad, pred, labels, False, dtype_name)


@pytest.mark.parametrize("cols", [7, 1001, 20001])
def test_rows_off_16_byte_boundaries(run, cols):
    """pred and target views starting 4 and 8 bytes into their buffers: no vector path is safe."""
    rng = np.random.default_rng(4)
    pred_buffer = rng.standard_normal(3 * cols + 1).astype(np.float32)
    target_buffer = rng.standard_normal(3 * cols + 2).astype(np.float32)
    pred, target = pred_buffer[1:].reshape(3, cols), target_buffer[2:].reshape(3, cols)
    error, grad, _ = run(pred, target, True)
    check(error, grad, pred, target, True, "float32")


def test_spatial_shapes(run):
    pred, target = inputs((3, 4, 5, 7), np.float32, False, seed=5)
    error, grad, _ = run(pred, target)
    check(error, grad.reshape(pred.shape), pred, target, False, "float32")


@pytest.mark.parametrize("cols,clusters", [(37, True), (20000, True), (20000, False)])
def test_grid_stride_loops(run, cols, clusters):
    """More rows (or chunks) than blocks: each block loops (a cluster's blocks, over rows: the
    grid is one cluster)."""
    pred, target = inputs((70, cols) if cols < 1000 else (3, cols), np.float32, True, seed=6)
    error, grad, launches = run(pred, target, True, max_blocks=CLUSTER if cols > 1000 and clusters else 2,
                                clusters=clusters)
    assert launches is None or launches[0].startswith("kl_cluster_" if cols > 1000 and clusters else "kl_")
    check(error, grad, pred, target, True, "float32")


@pytest.mark.parametrize("rows,cols", [(4, 300), (4, 20000), (8, 20000), (8, 5000)])
def test_bitwise_identical_in_every_thread_order(run, rows, cols):
    """(Rows of 20000: in kl_cluster_f32_t256_e16, or, 8 of them, _t128_e32; rows of 5000 in
    kl_rows_f32_g512_e16.)"""
    pred, target = inputs((rows, cols), np.float32, True, seed=7)
    results = [run(pred, target, True, order=order)[:2] for order in ("forward", "reverse", "random")]
    for error, grad in results[1:]:
        assert error == results[0][0]
        assert np.array_equal(grad, results[0][1])


@pytest.mark.parametrize("norm_target", [False, True])
@pytest.mark.parametrize("cols,stream", [(5, False), (3000, False), (20000, False), (20000, True)])
def test_extreme_values_match_the_cpu_backend(run, monkeypatch, cols, stream, norm_target):
    """Row by row, the GPU path gives what the CPU backend gives: a spread of 1e4, -inf logits
    with p = 0 and p > 0, NaN in pred and in target, a +inf logit, an all -inf row,
    probabilities of 1e-38 and one-hot rows (C = 20000: the 9 rows in kl_cluster_f32_t128_e32, fewer
    in _t256_e16; stream: in kl_cluster_stream_*)."""
    if stream:
        monkeypatch.setattr(row_softmax, "CLUSTER_KERNELS", {})
    rng = np.random.default_rng(8)
    pred = rng.standard_normal((9, cols)).astype(np.float32)
    target = rng.random((9, cols)).astype(np.float32)
    pred[0, 0], pred[0, -1] = 5000.0, -5000.0
    pred[1, 0], target[1, 0] = -np.inf, 0.0
    pred[2, -1] = -np.inf                      # p > 0 there: +inf error
    pred[3, cols // 2] = np.nan
    target[4] = 1e-38
    target[4, 0] = 1.0
    target[5] = 0.0
    target[5, -1] = 1.0
    pred[6, cols // 3] = np.inf
    pred[7] = -np.inf
    target /= target.sum(axis=1, keepdims=True)
    target[8, cols // 2] = np.nan
    if norm_target:                            # scores: large spreads and -inf in the target too
        with np.errstate(divide="ignore"):
            target = np.log(target)
    finite_rows = [0, 1, 4, 5]
    for rows in (range(9), finite_rows, [2]):
        rows = list(rows)
        error, grad, _ = run(pred[rows], target[rows], norm_target)
        cpu_error, cpu_grad = KLDivergence(normTarget=norm_target)(pred[rows], target[rows])
        np.testing.assert_allclose(grad, cpu_grad.astype(np.float64), rtol=1e-5, atol=1e-7 / len(rows),
                                   equal_nan=True)
        assert np.isnan(grad).any(axis=1).tolist() == np.isnan(cpu_grad).any(axis=1).tolist()
        if np.isfinite(cpu_error):
            assert error == pytest.approx(cpu_error, rel=1e-5)
        else:
            assert error == cpu_error or (np.isnan(error) and np.isnan(cpu_error))
    assert run(pred[[2]], target[[2]], norm_target)[0] == np.inf   # p > 0 where q = 0
    check(*run(pred[finite_rows], target[finite_rows], norm_target)[:2], pred[finite_rows],
          target[finite_rows], norm_target, "float32")


def test_validate_and_accumulators_stay_on_the_device(module):
    device = EmulatedDevice(module)
    with backends.substituted_cuda(CudaBackend(device)):
        div = KLDivergence(normTarget=True)
        batches = [inputs((n, 40), np.float32, True, seed=n) for n in (2, 5, 3)]
        for pred, target in batches:
            div(EmuArray(pred), EmuArray(target), queryError=False)
        assert isinstance(div.accumErr, np.ndarray)   # the emulated device's scalar, not a float
        refs = [reference.kl_reference(p.astype(np.float64), t.astype(np.float64), True) for p, t in batches]
        total = sum(r["error"] * r["n"] for r in refs)
        assert div.getMeanError() == pytest.approx(total / 10, rel=1e-6)
        assert div.getError() == pytest.approx(refs[-1]["error"], rel=1e-6)
        val = div.validate(EmuArray(batches[0][0]), EmuArray(batches[0][1]))
        assert val == pytest.approx(refs[0]["error"], rel=1e-6)
        assert div.getMeanError() == pytest.approx(total / 10, rel=1e-6)


def test_non_contiguous_device_arrays_are_refused(module):
    pred, target = inputs((6, 8), np.float32, True)
    with backends.substituted_cuda(CudaBackend(EmulatedDevice(module))):
        div = KLDivergence(normTarget=True)
        error, grad = div(EmuArray(pred), EmuArray(target))
        with pytest.raises(CostError, match="pred: the CUDA backend expects a C-contiguous array"):
            div(EmuArray(pred.T.copy().T), EmuArray(target))
        with pytest.raises(CostError, match="target: the CUDA backend expects a C-contiguous array"):
            div(EmuArray(pred), EmuArray(target[:, ::-1]))
        # Refused before anything changed.
        assert div.grad is grad and div.getError() == error and div.numOfSamples == 6


def test_bad_labels_raise_before_any_kernel_runs_where_the_last_grad_is_held_by_the_cost_alone(module):
    """(Elsewhere, a first call or one whose caller holds the last grad, the check is read after the
    work is queued: Cost._lastGradKeptAnyway, test_label_check.py.)"""
    device = EmulatedDevice(module)
    pred, labels = inputs((4, 10), np.float32, False, labels=True)
    good = labels.copy()
    labels[2] = 10
    with backends.substituted_cuda(CudaBackend(device)):
        cost = KLDivergence()
        cost(EmuArray(pred), EmuArray(good))
        device.launches.clear()
        with pytest.raises(CostError, match="got 10 at index 2"):
            cost(EmuArray(pred), EmuArray(labels))
    assert device.launches == ["check_labels_i64_i64"]   # (the check itself, on the device)


def test_every_launchable_kernel_is_in_the_module(module):
    assert set(kernel_names()) <= set(module.kernel_names)


def test_the_row_kernels_batch_error_is_the_same_on_every_gpu(module):
    """The row kernels' grid is capped at a fixed number of blocks (ROW_GRID_BLOCKS), not a
    multiple of the device's SMs, so a grid past the cap is the same on a GPU of 4 SMs and one of
    132: the same blocks' partial errors, added in the same order, give the same bits (fix 16)."""
    pred, target = inputs((9 * row_softmax.ROW_GRID_BLOCKS, 100), np.float32, True, seed=17)   # 8 rows a block
    results, grids = [], []
    for sms in (4, 132):
        device = EmulatedDevice(module)
        device.sms = sms
        launch = device.launch
        device.launch = lambda name, grid, *args, **kwargs: (grids.append((sms, name, grid)),
                                                             launch(name, grid, *args, **kwargs))[1]
        with backends.substituted_cuda(CudaBackend(device)):
            results.append(call_cost(EmuArray(pred), EmuArray(target), True, EmuArray))
    assert grids == [(4, "kl_rows_f32_g16_e8", row_softmax.ROW_GRID_BLOCKS),
                     (132, "kl_rows_f32_g16_e8", row_softmax.ROW_GRID_BLOCKS)]
    assert results[0][0] == results[1][0]
    assert np.array_equal(results[0][1], results[1][1])
    check(*results[0], pred, target, True, "float32")


def run_on(module, pred, target, norm_target, order, max_blocks, clusters, divergence="forward"):
    """(error, grad, the kernels launched) of KLDivergence on the emulated device running `module`."""
    device = EmulatedDevice(module, order=order, max_blocks=max_blocks or 2 ** 31 - 1, clusters=clusters)
    with backends.substituted_cuda(CudaBackend(device)):
        error, grad = call_cost(EmuArray(pred), EmuArray(target), norm_target, EmuArray, divergence)
    return error, grad, " ".join(cost_kernels(device.launches))


def assert_same_bits_in_every_order(build, expected, kernels, pred, target, norm_target, max_blocks, clusters,
                                    divergence="forward"):
    """`build` (an emulated PLC_TRY_* build) launches `kernels` and gives `expected`'s (error, grad)
    bit for bit in every thread order (the emulation lands an asynchronous copy at its wait, at its
    issue, or at random between); NaN grads only where `expected` has them."""
    for order in ("forward", "reverse", "random"):
        error, grad, launched = run_on(build, pred, target, norm_target, order, max_blocks, clusters, divergence)
        assert launched == kernels
        assert error == expected[0] and np.array_equal(grad, expected[1], equal_nan=True), order


@pytest.fixture(scope="module")
def one_buffer_module():
    return emulated_build(("PLC_TRY_ONE_BUFFER",))


# (shape, max_blocks, the plain kernel): each prefetching twin of the rows and many-rows clusters,
# its blocks (or clusters) looping over rows, so that each slot is read and filled again.
ONE_BUFFER_CASES = [((5, 1000), 1, "kl_rows_{s}_g32_e32"),
                    ((3, 4000), 1, "kl_rows_{s}_g128_e32"), ((9, 20001), 2 * CLUSTER, "kl_cluster_{s}_t128_e32")]


@pytest.mark.parametrize("dtype_name", ["float32", "bfloat16"])
@pytest.mark.parametrize("mode", ["normTarget", "probabilities", "labels"])
@pytest.mark.parametrize("shape,max_blocks,kernel", ONE_BUFFER_CASES, ids=[str(c[0]) for c in ONE_BUFFER_CASES])
def test_prefetching_with_one_buffer_gives_the_plain_kernels_bits(module, one_buffer_module, monkeypatch, dtype_name,
                                                                  mode, shape, max_blocks, kernel):
    """The prefetching twins built with PLC_TRY_ONE_BUFFER (one buffer of shared memory, the next
    row's copies issued once this row's are read: try_choices.py's "one_buffer"), launched with
    half the shared memory, give the plain kernels' bits in every thread order (the emulation lands
    a copy at its wait, at its issue, or at random between), and the reference's results."""
    suffix = DTYPE_SUFFIX[dtype_name]
    norm_target = mode == "normTarget"
    pred, target = inputs(shape, DTYPES[dtype_name], norm_target, seed=shape[1] + 5, labels=mode == "labels")
    monkeypatch.setattr(row_softmax, "tiles", lambda name: False)
    monkeypatch.setattr(row_softmax, "prefetches", lambda name: False)
    # (bfloat16 normTarget: the "_normt" twins, prefetching or not; float32's general form)
    normt = prefetch_normt(kernel.format(s=suffix), norm_target, monkeypatch)
    plain_error, plain_grad, launched = run_on(module, pred, target, norm_target, "forward", max_blocks, True)
    assert launched == kernel.format(s=suffix) + normt
    monkeypatch.setattr(row_softmax, "prefetches", lambda name: True)
    monkeypatch.setattr(row_softmax, "PREFETCH_BUFFERS", 1)
    assert_same_bits_in_every_order(one_buffer_module, (plain_error, plain_grad),
                                    kernel.format(s=suffix) + "_prefetch" + normt, pred, target, norm_target,
                                    max_blocks, True)
    check(plain_error, plain_grad, pred, target, norm_target, dtype_name)


@pytest.mark.parametrize("mode,divergence", [("probabilities", "forward"), ("normTarget", "forward"),
                                             ("labels", "forward"), ("normTarget", "reverse")])
@pytest.mark.parametrize("most_staged", [None, 0, 1])
def test_pass2_twin_gives_the_same_bits(module, monkeypatch, mode, divergence, most_staged):
    """bfloat16's prefetching stream kernel's "_pass2" twin (forward KL's pass 2 copies the next
    segment's arrays from memory into the ring while it computes this one, the last segment's
    before the exchange) gives the prefetching kernel's bits in every thread order (the emulation
    lands each copy at its wait, at its issue, or at random between), with as many segments staged
    as fit, none or one (pass 2 then copies pred too), and the reference's.  Labels and reverse KL,
    whose pass 2 the twin leaves alone and which the library does not launch it for, too.  3 rows
    of 3 segments a block on one cluster, which loops over them (the library takes the twin from 4:
    forced here)."""
    norm_target = mode == "normTarget"
    pred, target = inputs((3, 140001), DTYPES["bfloat16"], norm_target, seed=73, labels=mode == "labels")
    if most_staged is not None:
        monkeypatch.setattr(row_softmax, "stream_staging", functools.partial(row_softmax.stream_staging,
                                                                             most=most_staged))
    kernel = f"kl_cluster_stream_bf16_t256_e{STREAM_ELEMS['bf16']}_prefetch"
    library = run_on(module, pred, target, norm_target, "forward", CLUSTER, True, divergence)
    assert library[2] == kernel   # (3 segments a block: fewer than row_softmax.PASS2_MIN_SEGMENTS)
    monkeypatch.setattr(row_softmax, "pass2_twin", lambda kernel, prefetch, *args: "_pass2")
    assert_same_bits_in_every_order(module, library, kernel + "_pass2", pred, target, norm_target, CLUSTER, True,
                                    divergence)
    if divergence == "forward":
        check(library[0], library[1], pred, target, norm_target, "bfloat16")


@pytest.mark.parametrize("mode,divergence,cols,twin", [
    ("probabilities", "forward", 4 * CLUSTER * 8192, "_pass2"), ("normTarget", "forward", 4 * CLUSTER * 8192, "_pass2"),
    ("probabilities", "forward", 3 * CLUSTER * 8192, ""), ("labels", "forward", 4 * CLUSTER * 8192, ""),
    ("normTarget", "reverse", 4 * CLUSTER * 8192, "")])
def test_the_library_takes_the_pass2_twin_from_four_segments_a_block(module, mode, divergence, cols, twin):
    """bfloat16 forward KL on target distributions takes the "_pass2" twin at 4 segments a block
    (1024x262144's: measured faster on an H200), not at 3, nor for labels or reverse KL (not
    measured), and gives the reference's results."""
    norm_target = mode in ("normTarget",) or divergence == "reverse"
    pred, target = inputs((2, cols), DTYPES["bfloat16"], norm_target, seed=cols % 97, labels=mode == "labels")
    error, grad, launched = run_on(module, pred, target, norm_target, "forward", CLUSTER, True, divergence)
    assert launched == f"kl_cluster_stream_bf16_t256_e{STREAM_ELEMS['bf16']}_prefetch" + twin
    if divergence == "forward":
        check(error, grad, pred, target, norm_target, "bfloat16")


# (divergence, mode): reverse KL and JSD take target distributions, not labels.
CHUNK_ORDER_CASES = [("forward", "probabilities"), ("forward", "normTarget"), ("forward", "labels"),
                     ("reverse", "probabilities"), ("reverse", "normTarget"), ("jsd", "probabilities"),
                     ("jsd", "normTarget")]


def run_with_grids(module, pred, target, norm_target, order, max_blocks, divergence):
    """(error, grad, [(kernel, grid), ...]) of KLDivergence on the emulated device (4 SMs, no clusters)."""
    device = EmulatedDevice(module, order=order, max_blocks=max_blocks or 2 ** 31 - 1, clusters=False)
    grids, launch = [], device.launch
    device.launch = lambda name, grid, *args, **kwargs: (grids.append((name, grid)), launch(name, grid, *args,
                                                                                              **kwargs))[1]
    with backends.substituted_cuda(CudaBackend(device)):
        error, grad = call_cost(EmuArray(pred), EmuArray(target), norm_target, EmuArray, divergence)
    return error, grad, grids


@pytest.mark.parametrize("dtype_name", ["bfloat16", "float16"])
@pytest.mark.parametrize("divergence,mode", CHUNK_ORDER_CASES)
def test_16_bit_chunks_loaded_a_turn_ahead_give_the_same_grad_on_any_grid(module, monkeypatch, dtype_name, mode,
                                                                          divergence):
    """The library's 16-bit chunked kernels (kl_chunk_stats and kl_chunk_grad load each block's next
    chunk's vectors before they compute this one: kl_divergence.cu's CHUNK_PREFETCH, in a grid
    capped at row_softmax.CHUNK_GRID_BLOCKS_PER_SM blocks an SM) give the same grad bit for bit on
    the library's grid (the emulated device's 4 SMs: 12 blocks for 15 chunks, three of which loop),
    on 2 blocks (each looping over 7 or 8 chunks) and uncapped (a block a chunk: none loaded ahead),
    in every thread order, the same error but for the grouping of a block's chunk errors, and the
    float64 reference's results.  (Until 2026-11-27 a build to measure, PLC_TRY_CHUNK_PREFETCH,
    tested against the plain kernels it replaced: the same bits.)  3 rows of 5 chunks, one
    starting off a 16-byte boundary (odd C: edge vectors packed)."""
    suffix = DTYPE_SUFFIX[dtype_name]
    norm_target = mode == "normTarget"
    pred, target = inputs((3, 20001), DTYPES[dtype_name], norm_target, seed=97, labels=mode == "labels")
    monkeypatch.setattr(row_softmax, "CHUNK_GRID_BLOCKS_PER_SM", {})
    uncapped = run_with_grids(module, pred, target, norm_target, "forward", None, divergence)
    grad_kernels = [f"kl_chunk_{part}_{suffix}" for part in ("stats", "grad")]
    assert [grid for name, grid in uncapped[2] if name in grad_kernels] == [15, 15]
    monkeypatch.undo()
    sms = EmulatedDevice(module).sms
    for max_blocks, blocks in [(None, row_softmax.CHUNK_GRID_BLOCKS_PER_SM[suffix] * sms), (2, 2)]:
        assert blocks < 15
        for order in ("forward", "reverse", "random"):
            error, grad, grids = run_with_grids(module, pred, target, norm_target, order, max_blocks, divergence)
            assert [name for name, _ in grids] == [name for name, _ in uncapped[2]]
            assert [grid for name, grid in grids if name in grad_kernels] == [blocks, blocks]
            assert np.array_equal(grad, uncapped[1], equal_nan=True), (max_blocks, order)
            # (float16's reverse KL of target probabilities overflows: inf error, NaN grads, the same)
            assert error == uncapped[0] or error == pytest.approx(uncapped[0], rel=1e-13, abs=1e-15) or \
                (np.isnan(error) and np.isnan(uncapped[0])), (max_blocks, order)
    if divergence == "forward":
        check(uncapped[0], uncapped[1], pred, target, norm_target, dtype_name)


@pytest.fixture(scope="module")
def chunk_same_order_module():
    return emulated_build(try_choices.BUILT_WITH["chunk_same_order"])


@pytest.mark.parametrize("dtype_name", ["float32", "bfloat16", "float64"])
@pytest.mark.parametrize("divergence,mode", CHUNK_ORDER_CASES)
def test_chunks_taken_back_and_forth_give_the_same_grad(module, chunk_same_order_module, dtype_name, mode,
                                                        divergence):
    """The library's chunked kernels (each pass after kl_chunk_stats starts from the chunk the one
    before it ended on; kl_chunk_grad's loads and stores evict-first) give the grad of the same
    kernels built to take every pass from the first chunk with plain loads and stores (try_choices.py's
    "chunk_same_order", the library's before) bit for bit, and its error but for the grouping of the
    chunks' errors; the same bits in every thread order, and the reference's results.  3 rows of 5
    chunks (float64: 10) on 2 blocks, which loop."""
    norm_target = mode == "normTarget"
    pred, target = inputs((3, 20001), DTYPES[dtype_name], norm_target, seed=83, labels=mode == "labels")
    same_order_error, same_order_grad, launched = run_on(chunk_same_order_module, pred, target, norm_target,
                                                         "forward", 2, False, divergence)
    assert launched.startswith("kl_chunk_stats_") and launched.split()[-1].startswith("kl_chunk_grad_")
    errors = set()
    for order in ("forward", "reverse", "random"):
        error, grad, _ = run_on(module, pred, target, norm_target, order, 2, False, divergence)
        assert np.array_equal(grad, same_order_grad), order
        errors.add(error)
    assert len(errors) == 1
    error = errors.pop()
    # (the same chunk errors, in doubles, added in another grouping)
    assert error == pytest.approx(same_order_error, rel=1e-13, abs=1e-15)
    if divergence == "forward":
        check(error, same_order_grad, pred, target, norm_target, dtype_name)


@pytest.fixture(scope="module")
def chunk_e32_module():
    return emulated_build(("PLC_TRY_CHUNK_E32",))


@pytest.mark.parametrize("dtype_name", ["float32", "bfloat16", "float16"])
@pytest.mark.parametrize("mode", ["probabilities", "normTarget", "labels"])
def test_chunks_of_32_elements_a_thread_give_the_reference(monkeypatch, chunk_e32_module, dtype_name, mode):
    """The chunked kernels built with PLC_TRY_CHUNK_E32 (32 elements a thread: try_choices.py's
    "chunk_e32"), given rows cut into chunks of 256 x 32 as that choice cuts them: the same bits
    in every thread order, and the float64 reference's results (forward KL, which the choice
    times).  3 rows of 3 chunks, the last ragged, on 2 blocks, which loop."""
    norm_target = mode == "normTarget"
    monkeypatch.setattr(row_softmax, "CHUNK_ELEMS", {**row_softmax.CHUNK_ELEMS, **try_choices.CHUNK_E32_ELEMS})
    pred, target = inputs((3, 20001), DTYPES[dtype_name], norm_target, seed=89, labels=mode == "labels")
    results = [run_on(chunk_e32_module, pred, target, norm_target, order, 2, False)
               for order in ("forward", "reverse", "random")]
    suffix = DTYPE_SUFFIX[dtype_name]
    assert results[0][2] == f"kl_chunk_stats_{suffix} kl_chunk_rows_{suffix} kl_chunk_grad_{suffix}"
    for error, grad, _ in results[1:]:
        assert error == results[0][0] and np.array_equal(grad, results[0][1])
    check(results[0][0], results[0][1], pred, target, norm_target, dtype_name)


def general_kernels(monkeypatch):
    """The library launches its general row and cluster kernels for normTarget forward KL, not their
    "_normt" twins (row_softmax.in_place: try_choices.py's "general")."""
    monkeypatch.setattr(row_softmax, "in_place", lambda kernel: False)


# (dtype, shape, max_blocks, the kernel): each "_normt" kernel, normTarget forward KL's own (the
# float32 and 16-bit row kernels of groups of 32 elements a thread, bfloat16's prefetching twins
# too, blocks looping over rows; the cluster kernels, as many rows (clusters of blocks of 128,
# looping over rows; bfloat16's prefetching twin too) and few).
NORMT_CASES = [("float32", (9, 1000), 1, "kl_rows_f32_g32_e32"),
               ("float32", (3, 4000), 1, "kl_rows_f32_g128_e32"),
               ("float32", (2, 16001), 1, "kl_rows_f32_g512_e32"),
               ("float32", (9, 20001), 2 * CLUSTER, "kl_cluster_f32_t128_e32"),
               ("float32", (2, 40001), None, "kl_cluster_f32_t256_e32"),
               ("bfloat16", (9, 1000), 1, "kl_rows_bf16_g32_e32"),
               ("bfloat16", (9, 1000), 1, "kl_rows_bf16_g32_e32_prefetch"),
               ("bfloat16", (3, 4000), 1, "kl_rows_bf16_g128_e32"),
               ("bfloat16", (3, 4000), 1, "kl_rows_bf16_g128_e32_prefetch"),
               ("float16", (5, 1000), 1, "kl_rows_f16_g32_e32"),
               ("float16", (3, 4000), 1, "kl_rows_f16_g128_e32"),
               ("bfloat16", (2, 16001), 1, "kl_rows_bf16_g512_e32"),
               ("float16", (2, 16001), 1, "kl_rows_f16_g512_e32"),
               ("bfloat16", (9, 20001), 2 * CLUSTER, "kl_cluster_bf16_t128_e32"),
               ("bfloat16", (9, 20001), 2 * CLUSTER, "kl_cluster_bf16_t128_e32_prefetch"),
               ("float16", (9, 20001), 2 * CLUSTER, "kl_cluster_f16_t128_e32"),
               ("bfloat16", (2, 40001), None, "kl_cluster_bf16_t256_e32"),
               ("float16", (2, 40001), None, "kl_cluster_f16_t256_e32")]


@pytest.mark.parametrize("dtype_name,shape,max_blocks,name", NORMT_CASES, ids=[c[3] for c in NORMT_CASES])
def test_normt_kernels_give_the_references_results(module, monkeypatch, dtype_name, shape, max_blocks, name):
    """Each "_normt" kernel (normTarget's x and t made their exponentials in place, the split term
    summed as they are made) gives the same bits in every thread order, the float64 reference's
    results, and the general kernel's within the rounding of q and p (not its bits: q and p are a
    multiply here, an exponential there)."""
    monkeypatch.setattr(row_softmax, "prefetches", lambda kernel: name.endswith("_prefetch"))
    pred, target = inputs(shape, DTYPES[dtype_name], True, seed=shape[1] + 11)
    error, grad, launched = run_on(module, pred, target, True, "forward", max_blocks, True)
    assert launched == name + "_normt"
    for order in ("reverse", "random"):
        other = run_on(module, pred, target, True, order, max_blocks, True)
        assert other[0] == error and np.array_equal(other[1], grad), order
    check(error, grad, pred, target, True, dtype_name)
    with monkeypatch.context() as general:
        general_kernels(general)
        general_error, general_grad, launched = run_on(module, pred, target, True, "forward", max_blocks, True)
    assert launched == name
    # Against the general kernel: each grad value within one unit in the last place of the output
    # type at the largest |grad| (q and p agree to float rounding, then each is rounded once to the
    # output), the error within float arithmetic of the terms.
    eps = float(ml_dtypes.finfo(DTYPES[dtype_name]).eps)
    np.testing.assert_allclose(grad, general_grad, rtol=0, atol=eps * np.abs(general_grad).max())
    assert error == pytest.approx(general_error, rel=ERROR_RTOL[dtype_name])


# (shape, max_blocks, the kernel the library takes for bfloat16 normTarget: its prefetching twins')
NORMT_LIBRARY_CASES = [((9, 1000), 1, "kl_rows_bf16_g32_e32_prefetch_normt"),
                       ((9, 20001), 2 * CLUSTER, "kl_cluster_bf16_t128_e32_prefetch_normt")]


@pytest.mark.parametrize("special", ["target -inf", "pred -inf", "NaN"])
@pytest.mark.parametrize("shape,max_blocks,name", NORMT_LIBRARY_CASES, ids=[c[2] for c in NORMT_LIBRARY_CASES])
def test_normt_kernels_keep_the_general_kernels_special_values(module, monkeypatch, special, shape, max_blocks, name):
    """p = 0 (a target logit of -inf) adds nothing; a pred of -inf where p > 0 makes the error
    +inf; a NaN poisons the error and its row's grad: as the general kernels (bfloat16's
    prefetching row and many-rows cluster kernels)."""
    pred, target = inputs(shape, DTYPES["bfloat16"], True, seed=29)
    array = target if special == "target -inf" else pred
    array[2, ::7] = np.nan if special == "NaN" else -np.inf
    error, grad, launched = run_on(module, pred, target, True, "forward", max_blocks, True)
    assert launched == name
    with monkeypatch.context() as general:
        general_kernels(general)
        general_error, general_grad, _ = run_on(module, pred, target, True, "forward", max_blocks, True)
    assert {"target -inf": np.isfinite, "pred -inf": np.isposinf, "NaN": np.isnan}[special](general_error)
    if np.isfinite(general_error):
        assert error == pytest.approx(general_error, rel=ERROR_RTOL["bfloat16"])
    else:
        assert error == general_error or (np.isnan(error) and np.isnan(general_error))
    assert np.array_equal(np.isnan(grad), np.isnan(general_grad))
    finite = np.isfinite(general_grad)
    eps = float(ml_dtypes.finfo(ml_dtypes.bfloat16).eps)
    np.testing.assert_allclose(grad[finite], general_grad[finite], rtol=0, atol=eps * np.abs(general_grad[finite]).max())


@pytest.mark.parametrize("mode", ["probabilities", "labels", "reverse"])
@pytest.mark.parametrize("shape,max_blocks,name", NORMT_LIBRARY_CASES, ids=[c[2] for c in NORMT_LIBRARY_CASES])
def test_normt_kernels_refuse_what_they_do_not_compute(module, monkeypatch, mode, shape, max_blocks, name):
    """A "_normt" kernel computes normTarget forward KL alone: another mode traps (a fault, not a
    wrong answer), should the host ever launch one for it (the host's choice forced here)."""
    monkeypatch.setattr(row_softmax, "normt_twin", lambda *args, **kwargs: "_normt")
    norm_target = mode == "reverse"
    pred, target = inputs(shape, DTYPES["bfloat16"], norm_target, seed=3, labels=mode == "labels")
    with pytest.raises(KernelFault, match="__trap"):
        run_on(module, pred, target, norm_target, "forward", max_blocks, True,
               divergence="reverse" if mode == "reverse" else "forward")


# (shape, max_blocks, the kernel): the cluster kernels looping over rows (2 clusters for 9 rows;
# the stream kernel's one for 3), and 9 clusters for 9 rows, each with its own ticket.
CLUSTER_CASES = [((9, 20001), 2 * CLUSTER, "kl_cluster_{s}_t128_e32"),
                 ((3, 70001), CLUSTER, "kl_cluster_stream_{s}_t256_e{e}"),
                 ((9, 20001), None, "kl_cluster_{s}_t128_e32")]


@pytest.mark.parametrize("dtype_name", ["float32", "bfloat16"])
@pytest.mark.parametrize("mode", ["normTarget", "probabilities", "labels"])
@pytest.mark.parametrize("shape,max_blocks,kernel", CLUSTER_CASES, ids=[f"{c[0]}-{c[1]}" for c in CLUSTER_CASES])
def test_one_ticket_a_cluster_gives_the_same_bits_in_every_order(module, dtype_name, mode, shape, max_blocks,
                                                                 kernel):
    """The cluster kernels' batch error, each block's error handed to its cluster's rank 0 (the
    kl_cluster_rows ones before their last row's grad), which alone takes a ticket after a relaxed
    exit barrier (kl_cluster.cu's finish_cluster), is the same in every thread order, as the grad
    is, and the reference's within float32 or bfloat16 rounding (twins left out: plain kernels)."""
    suffix = DTYPE_SUFFIX[dtype_name]
    norm_target = mode == "normTarget"
    pred, target = inputs(shape, DTYPES[dtype_name], norm_target, seed=shape[1] + 2, labels=mode == "labels")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(row_softmax, "prefetches", lambda kernel: False)
        results = [run_on(module, pred, target, norm_target, order, max_blocks, True)
                   for order in ("forward", "reverse", "random")]
    name = kernel.format(s=suffix, e=STREAM_ELEMS[suffix])
    for error, grad, launched in results:   # (bfloat16 normTarget: the "_normt" twin, whose ticket is the same)
        assert launched == name + ("_normt" if norm_target and name in row_softmax.NORMT_KERNELS else "")
        assert error == results[0][0] and np.array_equal(grad, results[0][1])
    check(error, grad, pred, target, norm_target, dtype_name)


@pytest.mark.parametrize("dtype_name", ["float32", "bfloat16"])
@pytest.mark.parametrize("shape,kernel", [((9, 20001), "kl_cluster_{s}_t128_e32"),
                                          ((3, 70001), "kl_cluster_stream_{s}_t256_e{e}")])
def test_a_cluster_without_rows_takes_its_ticket_for_nothing(module, monkeypatch, dtype_name, shape, kernel):
    """With one cluster more than there are rows (the host never launches that: the kernels must
    still be right), the cluster kernels give the same bits as in their grid: the empty cluster
    adds a 0 (its blocks pass a barrier before they hand it to rank 0, which may not have
    started)."""
    monkeypatch.setattr(row_softmax, "prefetches", lambda kernel: False)
    suffix = DTYPE_SUFFIX[dtype_name]
    pred, target = inputs(shape, DTYPES[dtype_name], True, seed=shape[1] + 3)
    results = []
    for extra, order in ((0, "forward"), (CLUSTER, "forward"), (CLUSTER, "reverse")):
        device = EmulatedDevice(module, order=order)
        launch = device.launch
        device.launch = lambda name, grid, *args, **kwargs: launch(name, grid + extra, *args, **kwargs)
        with backends.substituted_cuda(CudaBackend(device)):
            results.append(call_cost(EmuArray(pred), EmuArray(target), True, EmuArray))
        name = kernel.format(s=suffix, e=STREAM_ELEMS[suffix])   # (bfloat16's cluster: its "_normt" twin)
        assert device.launches == [name + ("_normt" if name in row_softmax.NORMT_KERNELS else "")]
    for error, grad in results[1:]:
        assert error == results[0][0] and np.array_equal(grad, results[0][1])
    check(*results[0], pred, target, True, dtype_name)


@pytest.mark.pycuda
def test_pycuda_device_loads_a_build_and_back(standin, monkeypatch, tmp_path):
    """PycudaDevice.load_kernels (try_choices.py's "build" choice on a GPU) launches the kernels of
    the build it loads, and the library's again once those are loaded back: on the stand-in, which
    runs a cubin as the emulation registered for it.  The build's emulation here pads the columns past
    the row end with 0, not -inf (planted), so that its results show whose kernels ran."""
    import shutil
    from puzzlelib_cost import gpuarray
    from puzzlelib_cost.backends import pycuda_device
    from puzzlelib_cost.backends.kernel_build import cached_cubin
    planted = tmp_path / "kernels"
    shutil.copytree(KERNELS, planted)
    common = planted / "common.cuh"
    padding = "out[i] = (col >= 0 && col < cols) ? widen(row[col]) : pad;"
    assert common.read_text().count(padding) == 1
    common.write_text(common.read_text().replace(padding, padding.replace(": pad", ": A(0)")))
    module = build([planted / "kl_divergence.cu"], include_dirs=[planted], defines={"PLC_TRY_PLANTED": None})
    # The library's cubin with bytes after its end (the stand-in keys a cubin by its bytes) stands
    # for the build's: no nvcc build of it here.
    variant = tmp_path / "planted.cubin"
    variant.write_bytes(cached_cubin("sm_90").read_bytes() + bytes(16))
    standin.register_cubin(variant, module)
    monkeypatch.setattr(pycuda_device, "cached_cubin",
                        lambda arch, defines=(): variant if defines else cached_cubin(arch))
    device = backends.get_cuda_backend(0).device
    pred, target = inputs((5, 1000), np.float32, True, seed=5)

    def divergence():
        return call_cost(on_device(gpuarray, pred), on_device(gpuarray, target), True, gpuarray.GPUArray)
    plain = divergence()
    try:
        assert device.load_kernels(("PLC_TRY_PLANTED",)) == ()
        standin.clear()
        built = divergence()
        assert [line.split()[0] for line in standin.launches()] == ["kl_rows_f32_g32_e32_normt"]
    finally:
        assert device.load_kernels(()) == ("PLC_TRY_PLANTED",)
    assert device.defines == ()
    assert built[0] != plain[0]   # (the planted padding: the build's kernels ran)
    again = divergence()
    assert again[0] == plain[0] and np.array_equal(again[1], plain[1])
