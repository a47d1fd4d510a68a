"""The NumPy backend's KLDivergence: the same bits with 1 and 2 threads and on repeated calls, and
its peak extra memory within 4x pred's bytes (tracemalloc sees NumPy's allocations)."""
import os
import signal
import time
import tracemalloc

import numpy as np
import pytest

# Every test here with NumPy's blocks and with the compiled ones (conftest.cpu_blocks).
pytestmark = pytest.mark.usefixtures("cpu_blocks")

from puzzlelib_cost import KLDivergence
from puzzlelib_cost.backends import block_crew, numpy_blocks

SHAPES = [(64, 32000), (1024, 1024), (3, 200000)]   # several blocks each, so that both threads work


def inputs(shape, kind, seed=0):
    rng = np.random.default_rng(seed)
    pred = (2 * rng.standard_normal(shape)).astype(np.float32)
    if kind == "labels":
        return pred, rng.integers(0, shape[1], shape[0])
    target = rng.standard_normal(shape).astype(np.float32)
    if kind == "probabilities":
        target = np.exp(target - target.max(1, keepdims=True))
        target /= target.sum(1, keepdims=True)
        target[:, ::7] = 0   # exact zeros: 0 log 0
    return pred, target


@pytest.mark.parametrize("kind", ["probabilities", "normTarget", "labels"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_bitwise_identical_with_one_and_two_threads_and_on_repeated_calls(monkeypatch, shape, kind):
    pred, target = inputs(shape, kind)
    results = []
    for threads in (1, 2, 2):
        monkeypatch.setattr(numpy_blocks, "THREADS", threads)
        error, grad = KLDivergence(normTarget=kind == "normTarget", temperature=1.5)(pred, target)
        results.append((error, grad.tobytes()))
    assert results[0] == results[1] == results[2]


@pytest.mark.parametrize("divergence", ["forward", "reverse", "jsd"])
@pytest.mark.parametrize("kind", ["probabilities", "normTarget", "labels"])
@pytest.mark.parametrize("shape", [(64, 32000), (256, 1000)], ids=lambda s: "x".join(map(str, s)))
def test_peak_extra_memory_within_four_times_pred(shape, kind, divergence):
    if kind == "labels" and divergence == "reverse":
        pytest.skip("reverse KL against a one-hot target is infinite (refused)")
    pred, target = inputs(shape, kind)
    peak = peak_extra_bytes(KLDivergence(normTarget=kind == "normTarget", divergence=divergence), pred, target)
    assert peak <= 4 * pred.nbytes, f"{peak / pred.nbytes:.1f}x pred's bytes"


@pytest.mark.skipif(not hasattr(os, "fork"), reason="os.fork is POSIX only")
def test_a_forked_child_computes_on_two_threads_of_its_own(monkeypatch):
    """A child forked after a two-thread call (a DataLoader worker) has none of its parent's helper
    threads (whose locks a fork may also catch held): it makes its own and gets the same result."""
    monkeypatch.setattr(numpy_blocks, "THREADS", 2)
    pred, target = inputs((1024, 1024), "labels")
    error, grad = KLDivergence()(pred, target)
    parents = [block_crew.crew(1)] + ([row_pool_module().pool()] if row_pool_module() else [])
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:   # the child: report what it computes (or die trying) and leave at once
        status = 1
        try:
            child_error, child_grad = KLDivergence()(pred, target)
            same = (child_error, child_grad.tobytes()) == (error, grad.tobytes())
            own = [block_crew.crew(1)] + ([row_pool_module().pool()] if row_pool_module() else [])
            os.write(write, (b"same" if same else b"differ") + (b" own" if all(
                mine is not theirs for mine, theirs in zip(own, parents)) else b" parent's"))
            status = 0
        finally:
            os._exit(status)
    os.close(write)
    deadline = time.monotonic() + 60
    while os.waitpid(pid, os.WNOHANG) == (0, 0):
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            pytest.fail("the forked child's call did not finish in 60 s")
        time.sleep(0.01)
    assert os.read(read, 32) == b"same own"


def test_an_object_another_thread_was_calling_at_the_fork_says_so_in_the_child():
    """In a forked child, an object whose call another thread of the parent was making holds that
    call's state part way, and a lock no thread of the child will release: refused for good, with
    a message that says why (it said "in a call on another thread", a thread the child lacks)."""
    import threading
    from puzzlelib_cost import CostError
    pred, target = inputs((8, 10), "labels")
    cost = KLDivergence()
    in_call, done = threading.Event(), threading.Event()

    def call_held():   # (a call that stays in progress until the fork is made)
        with cost._one_call_at_a_time():
            in_call.set()
            done.wait(60)
    holder = threading.Thread(target=call_held, daemon=True)
    holder.start()
    in_call.wait(60)
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        status = 1
        try:
            try:
                cost(pred, target)
                os.write(write, b"ran")
            except CostError as exc:
                os.write(write, str(exc).encode()[:300])
            status = 0
        finally:
            os._exit(status)
    os.close(write)
    os.waitpid(pid, 0)
    said = os.read(read, 400).decode()
    done.set()
    holder.join(60)
    assert "was in a call on another thread when this process was forked" in said, said
    cost(pred, target)   # (the parent's object is free again)


def row_pool_module():
    """cpu_kernels.row_pool, or None without numba."""
    try:
        from puzzlelib_cost.cpu_kernels import row_pool as module
    except ImportError:
        return None
    return module


def peak_extra_bytes(cost, pred, target):
    """NumPy's peak allocation (tracemalloc) during a second call: the pool's threads and the
    cost's scalars exist from the first one on."""
    cost(pred, target)
    tracemalloc.start()
    try:
        cost(pred, target)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


# ------------------------------------------------------------------ the other costs (backends/numpy_blocks.py)

import puzzlelib_cost  # noqa: E402
from puzzlelib_cost import BCE, MSE, SVM, CrossEntropy, Hinge, L1Hinge, elementwise_costs  # noqa: E402


def cost_inputs(name, dtype=np.float32, seed=1):
    """(make cost, pred, target) with at least numpy_blocks.PARALLEL_MIN_ELEMENTS elements and several
    blocks (so that two threads share them); CE spatial both ways: samples per block and a sample
    cut into blocks."""
    rng = np.random.default_rng(seed)

    def floats(*shape, scale=2.0):
        return (scale * rng.standard_normal(shape)).astype(dtype)
    if name in ("Abs", "MSE", "SmoothL1"):
        return getattr(puzzlelib_cost, name), floats(64, 9000), floats(64, 9000, scale=1.0)
    if name == "BCE":
        return BCE, floats(64, 9000), rng.integers(0, 2, (64, 9000)).astype(np.int32)
    if name == "Hinge":
        return Hinge, floats(64, 9000), rng.integers(-1, 2, (64, 9000)).astype(np.int8)
    if name in ("SVM_l1", "SVM_l2"):
        return (lambda: SVM(name[-2:])), floats(600, 1000, scale=1.5), rng.integers(0, 1000, 600)
    if name == "L1Hinge":
        return L1Hinge, [floats(300, 2000, scale=1.0), floats(300, 2000, scale=1.0)], rng.integers(0, 2, 300)
    if name == "CE_cut":        # one sample's 21 x 6400 > a block: samples cut into blocks of positions
        return CrossEntropy, floats(4, 21, 80, 80), rng.integers(0, 21, (4, 80, 80))
    if name == "CE_weighted":   # samples of 5 x 3000 elements: many per block
        w = rng.random(5) + 0.25
        return (lambda: CrossEntropy(weights=w)), floats(40, 5, 60, 50), rng.integers(0, 5, (40, 60, 50))
    raise KeyError(name)


COSTS = ["Abs", "MSE", "SmoothL1", "BCE", "Hinge", "SVM_l1", "SVM_l2", "L1Hinge", "CE_cut", "CE_weighted"]


def _grads(grad):
    return b"".join(g.tobytes() for g in (grad if isinstance(grad, list) else [grad]))


@pytest.mark.parametrize("dtype", [np.float32, np.float16], ids=["float32", "float16"])
@pytest.mark.parametrize("name", COSTS)
def test_costs_bitwise_identical_with_one_and_two_threads_and_on_repeated_calls(monkeypatch, name, dtype):
    make, pred, target = cost_inputs(name, dtype)
    pooled = []
    crew = block_crew.crew
    monkeypatch.setattr(block_crew, "crew", lambda helpers: pooled.append(helpers) or crew(helpers))
    results = []
    monkeypatch.setattr(elementwise_costs, "MEMORY_BOUND_PARALLEL_MIN", 0)   # (two threads even for these blocks)
    for threads in (1, 2, 2):   # (these costs run on MEMORY_BOUND_THREADS = 1 by default: the pool is tested here)
        monkeypatch.setattr(numpy_blocks, "MEMORY_BOUND_THREADS", threads)
        monkeypatch.setattr(numpy_blocks, "THREADS", threads)   # (compiled blocks use THREADS)
        cost = make()
        error, grad = cost(pred, target)
        val = cost.validate(pred, target)
        most = getattr(cost, "mostProb", None)
        results.append((error, _grads(grad), val, None if most is None else most.tobytes()))
    assert results[0] == results[1] == results[2]
    assert pooled, "the two-thread calls did not use the helper threads"


@pytest.mark.parametrize("name", COSTS)
def test_costs_peak_extra_memory_within_four_times_pred(name):
    make, pred, target = cost_inputs(name)
    peak = peak_extra_bytes(make(), pred, target)
    nbytes = (pred[0] if isinstance(pred, list) else pred).nbytes
    # L1Hinge returns two gradients (x1's and x2's), 2x pred[0]'s bytes of output by itself
    assert peak <= 4 * nbytes, f"{peak / nbytes:.1f}x pred's bytes"


# The costs that take their differences and terms in float64 for 16- and 32-bit inputs
# (elementwise_costs' wide(), the kernels' WIDE ops): a - b of finite floats can pass float32's range.
WIDE = {"Abs", "MSE", "SmoothL1", "SVM_l2", "L1Hinge"}


@pytest.mark.parametrize("name", COSTS)
def test_costs_compute_float32_for_float32_and_float64_for_float64(name):
    """The error of float32 inputs carries float32 rounding (|relative difference| from the same
    inputs computed in float64 between 1e-12 and the tests' 1e-6: float64 math on these ~6e5 terms
    would differ by ~1e-15), but for the WIDE costs, whose terms are float64 for every input;
    and that of their float64 copies does not (against a float64 reference of the same values)."""
    make, pred, target = cost_inputs(name, np.float32)
    as64 = [p.astype(np.float64) for p in pred] if isinstance(pred, list) else pred.astype(np.float64)
    t64 = target.astype(np.float64) if target.dtype.kind == "f" else target
    e32, g32 = make()(pred, target)
    e64, g64 = make()(as64, t64)
    assert _grads(g32) and all(g.dtype == np.float32 for g in (g32 if isinstance(g32, list) else [g32]))
    if name in WIDE:
        assert abs(e32 - e64) <= 1e-13 * abs(e64), (e32, e64)
    else:
        assert 1e-12 < abs(e32 - e64) / abs(e64) < 1e-6, (e32, e64)
    with numpy_blocks_threads(1):
        e64_again, _ = make()(as64, t64)
    assert abs(e64_again - e64) <= 1e-13 * abs(e64)


class numpy_blocks_threads:
    def __init__(self, threads):
        self.threads, self.saved = threads, (numpy_blocks.THREADS, numpy_blocks.MEMORY_BOUND_THREADS)

    def __enter__(self):
        numpy_blocks.THREADS = numpy_blocks.MEMORY_BOUND_THREADS = self.threads

    def __exit__(self, *exc):
        numpy_blocks.THREADS, numpy_blocks.MEMORY_BOUND_THREADS = self.saved


def test_mse_terms_of_float32_inputs_are_float64():
    """(1 + 2^-23)^2 = 1 + 2^-22 + 2^-46, exact in float64 (1 + 2^-22 in float32): MSE's terms are
    float64 for float32 inputs too, as the kernels' WIDE ops take them."""
    d = 1 + 2.0 ** -23
    e32, _ = MSE()(np.array([[d]], np.float32), np.zeros((1, 1), np.float32))
    e64, _ = MSE()(np.array([[d]], np.float64), np.zeros((1, 1), np.float64))
    assert e32 == e64 == (1 + 2.0 ** -22 + 2.0 ** -46) / 2


# ------------------------------------------------------------------ inputs in non-native byte order

def _softmax64(x, axis):
    e = np.exp(x - x.max(axis, keepdims=True))
    return e / e.sum(axis, keepdims=True)


def _byte_order_case(name):
    """(make cost, pred, target, (E, grad) in float64 from the formulas of README's table), the
    arrays native: the test swaps their byte order."""
    rng = np.random.default_rng(7)
    s = rng.standard_normal((6, 7)).astype(np.float32)
    x = s.astype(np.float64)
    n, m = s.shape[0], s.size
    if name == "BCE":
        y = rng.integers(0, 2, s.shape).astype(np.int32)
        e = np.maximum(x, 0) - x * y + np.log1p(np.exp(-np.abs(x)))
        return BCE, s, y, (e.sum() / m, (y - 1 / (1 + np.exp(-x))) / m)
    if name == "Hinge":
        y = rng.integers(-1, 2, s.shape).astype(np.int16)
        return Hinge, s, y, (np.maximum(0, 1 - x * y).sum() / m, y * (x * y < 1) / m)
    if name in ("KL_labels", "CE_labels"):
        y = rng.integers(0, 7, n).astype(np.int64 if name == "KL_labels" else np.uint32)
        q, onehot = _softmax64(x, 1), np.eye(7)[y]
        return (KLDivergence if name == "KL_labels" else CrossEntropy), s, y, \
            (-np.log(q[np.arange(n), y]).sum() / n, (onehot - q) / n)
    if name == "CE_spatial":
        s = rng.standard_normal((3, 4, 5)).astype(np.float32)
        x, y = s.astype(np.float64), rng.integers(0, 4, (3, 5))
        q, onehot = _softmax64(x, 1), np.moveaxis(np.eye(4)[y], -1, 1)
        return CrossEntropy, s, y, (-(onehot * np.log(q)).sum() / 15, (onehot - q) / 15)
    if name == "KL_probabilities":
        t = _softmax64(rng.standard_normal(s.shape), 1).astype(np.float32)
        p, q = t.astype(np.float64), _softmax64(x, 1)
        return KLDivergence, s, t, ((p * (np.log(p) - np.log(q))).sum() / n, (p - p.sum(1, keepdims=True) * q) / n)
    if name == "MSE":
        t = rng.standard_normal(s.shape).astype(np.float32)
        d = x - t
        return MSE, s, t, ((d * d).sum() / (2 * m), -d / m)
    raise KeyError(name)


def _swapped(a):
    """a with the same values in the other byte order ('>f4' on x86)."""
    swapped = a.astype(a.dtype.newbyteorder("S"))
    assert not swapped.dtype.isnative
    return swapped


@pytest.mark.parametrize("swap", ["target", "pred and target"])
@pytest.mark.parametrize("name", ["BCE", "Hinge", "KL_labels", "CE_labels", "CE_spatial", "KL_probabilities", "MSE"])
def test_inputs_in_the_other_byte_order_give_the_results_of_native_ones(name, swap):
    """Big-endian labels crashed the compiled blocks (numba's TypingError, not a result) and left the
    cost half-reset (getError() None); big-endian floats took other paths than native ones.  Now:
    the formulas' values, the same bits as for the native arrays, and the batch counted."""
    make, pred, target, (want_error, want_grad) = _byte_order_case(name)
    cost = make()
    native_error, native_grad = cost(pred, target)
    error, grad = cost(_swapped(pred) if swap == "pred and target" else pred, _swapped(target))
    assert error == pytest.approx(want_error, rel=1e-5)
    np.testing.assert_allclose(np.asarray(grad, np.float64), want_grad, rtol=1e-4, atol=1e-7)
    assert grad.dtype.name == "float32" and grad.shape == pred.shape
    assert (error, np.asarray(grad, np.float32).tobytes()) == (native_error, native_grad.tobytes())
    assert cost.numOfSamples == 2 * pred.shape[0] and cost.getError() == error
    assert cost.getMeanError() == pytest.approx(want_error, rel=1e-5)


# ------------------------------------------------------------------ L1Hinge: no NumPy warnings escape

INF = np.inf


@pytest.mark.parametrize("x1, x2, label, want_rate, want_error", [
    # d = x1 - x2 = [inf - inf, 0] = [NaN, 0]: mean |d| <= 1 is false, so "not the same"; E is NaN
    (np.array([[INF, 1]], np.float32), np.array([[INF, 1]], np.float32), 0, 0.0, np.nan),
    (np.array([[INF, 1]], np.float32), np.array([[INF, 1]], np.float32), 1, 1.0, np.nan),
    # d = [+-1e308 - -+1e308] overflows to [inf, -inf]: |d| = inf, "not the same"; y = 0: max(0, 1 - inf) = 0
    (np.array([[1e308, -1e308]]), np.array([[-1e308, 1e308]]), 0, 0.0, 0.0),
    (np.array([[1e308, -1e308]]), np.array([[-1e308, 1e308]]), 1, 1.0, INF),
])
def test_l1hinge_takes_infinite_and_overflowing_differences_without_warnings(x1, x2, label, want_rate, want_error):
    """validate()'s distances ran outside np.errstate: "invalid value encountered in subtract" for
    inf - inf, "overflow encountered in subtract" for float64 +-1e308."""
    import warnings
    y = np.array([label])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rate = L1Hinge().validate([x1, x2], y)
        error, _ = L1Hinge()([x1, x2], y)
    assert rate == want_rate
    np.testing.assert_equal(error, want_error)


# ------------------------------------------------------------------ CrossEntropy: 16-bit float weights

@pytest.mark.parametrize("spatial", [False, True], ids=["2d", "spatial"])
@pytest.mark.parametrize("weight_dtype", ["float16", "bfloat16"])
def test_cross_entropy_takes_16_bit_float_weights(weight_dtype, spatial):
    """bfloat16 weights were refused as "not a float array" (ml_dtypes' dtype.kind is "V"); 16-bit
    weights are taken as float32 ones are: E = -sum w_y log q_y / (N S), grad = w_y (onehot - q) / (N S)."""
    dtype = np.dtype(pytest.importorskip("ml_dtypes").bfloat16) if weight_dtype == "bfloat16" else np.dtype(np.float16)
    w = np.array([0.5, 2.0, 1.25, 0.75])   # exact in float16 and bfloat16
    rng = np.random.default_rng(11)
    shape, label_shape = ((5, 4, 3), (5, 3)) if spatial else ((5, 4), (5,))
    x = rng.standard_normal(shape).astype(np.float32)
    y = rng.integers(0, 4, label_shape)
    q = _softmax64(x.astype(np.float64), 1)
    onehot = np.moveaxis(np.eye(4)[y], -1, 1)
    w_y = np.expand_dims(w[y], 1)
    positions = y.size
    want_error = -(w_y * onehot * np.log(q)).sum() / positions
    want_grad = w_y * (onehot - q) / positions
    error, grad = CrossEntropy(weights=w.astype(dtype))(x, y)
    assert error == pytest.approx(want_error, rel=1e-5)
    np.testing.assert_allclose(grad, want_grad, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("source", [np.float32, np.float64])
def test_float16_outputs_are_rounded_as_numpy_rounds_them_and_subnormals_quickly(source):
    """numpy_blocks.store gives a float16 output its subnormal results (|v| < 2^-14: a mean's grad
    over 2^14 elements or more) as counts of 2^-24 steps, because NumPy's conversion of them took
    a microcode assist (40x its normal time).  Every float32 pattern from 2^-31 to 2^-13 (a step of 37),
    both signs, and the edges: the bits of NumPy's own conversion (float64 through float32, as
    the library rounds a wide grad)."""
    patterns = np.arange(0x30000000, 0x39000000, 37, dtype=np.uint32).view(np.float32)
    edges = np.array([0, np.inf, np.nan, 65504, 65520, 1e-45, 2.0 ** -14, 2.0 ** -24, 2.0 ** -25, 3 * 2.0 ** -26,
                      1023.5 * 2.0 ** -24, 1024 * 2.0 ** -24 * (1 - 2.0 ** -24)], np.float32)
    values = np.concatenate([patterns, -patterns, edges, -edges]).astype(source)
    out = np.empty(values.shape, np.float16)
    numpy_blocks.store(out, values)
    with np.errstate(over="ignore"):
        want = values.astype(np.float32).astype(np.float16)
    same = (out.view(np.uint16) == want.view(np.uint16)) | (np.isnan(out) & np.isnan(want))
    assert same.all(), values[~same][:5]
    strided = np.empty((values.size, 2), np.float16)[:, 0]   # (a block's view of a bigger output)
    numpy_blocks.store(strided, values)
    assert ((strided.view(np.uint16) == out.view(np.uint16)) | (np.isnan(strided) & np.isnan(out))).all()
