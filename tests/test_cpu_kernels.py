"""The compiled CPU blocks' own arithmetic (puzzlelib_cost.cpu_kernels, the `cpu` extra).

Every cost test runs the NumPy backend with and without these blocks (conftest: the places
"numpy" and "numpy-compiled", and the cpu_blocks fixture of test_cpu_path.py) against float64
references; here: vmath's exp, log and log1p against float64, ulp by ulp, over the whole float32
range with its special values, and which blocks the backend actually hands to them.
"""
import tempfile

import numpy as np
import pytest

numba = pytest.importorskip("numba", reason="numba (the cpu extra) is not installed")

from puzzlelib_cost import KLDivergence, SmoothL1, cpu_kernels  # noqa: E402
from puzzlelib_cost.cpu_kernels import kernels, vmath  # noqa: E402

F = np.float32


def _elementwise(function):
    @numba.njit(error_model="numpy", fastmath=kernels.OPTIONS["fastmath"])   # (compiled as in the kernels)
    def apply(x, out):
        for j in range(x.size):
            out[j] = function(x[j])
    return apply


EXP, LOG, LOG1P = _elementwise(vmath.exp32), _elementwise(vmath.log32), _elementwise(vmath.log1p32)


def run(apply, x):
    out = np.empty_like(x)
    apply(x, out)
    return out


def ulps(found, exact):
    """|found - exact| in units of the float32 spacing at exact (the subnormal spacing below the
    normal range), for finite exact values."""
    spacing = np.spacing(np.abs(exact).astype(F)).astype(np.float64)
    return np.abs(found.astype(np.float64) - exact) / spacing


def sweep(low, high, n=400_000, seed=0):
    """float32 values spread over [low, high]: uniform, plus every power of two's neighbourhood."""
    rng = np.random.default_rng(seed)
    return np.unique(rng.uniform(low, high, n).astype(F))


def positive_sweep(n=400_000, seed=1):
    """Positive float32 values log-uniform from the smallest subnormal to the largest finite."""
    rng = np.random.default_rng(seed)
    bits = rng.integers(1, 0x7F7FFFFF, n, dtype=np.int64).astype(np.uint32)
    return np.unique(bits.view(F))


def test_exp_within_2_ulp_over_the_whole_range():
    x = sweep(-103.9, 88.7)
    found = run(EXP, x)
    assert ulps(found, np.exp(x.astype(np.float64))).max() <= 2


def test_exp_of_subnormal_results_and_the_edges():
    x = sweep(-103.9, -87.0)                  # results below the normal range: subnormals
    exact = np.exp(x.astype(np.float64))
    assert ulps(run(EXP, x), exact).max() <= 2
    special = np.array([0, -0.0, np.inf, -np.inf, np.nan, 88.73, 89, -104, -1000, 1e30, -1e30], F)
    with np.errstate(over="ignore"):
        expected = np.exp(special.astype(np.float64)).astype(F)
    np.testing.assert_array_equal(run(EXP, special), expected)


def test_log_within_2_ulp_over_every_positive_float32():
    x = positive_sweep()                      # subnormals included
    assert ulps(run(LOG, x), np.log(x.astype(np.float64))).max() <= 2


def test_log_special_values():
    special = np.array([0, -0.0, 1, np.inf, -np.inf, np.nan, -1, -1e-45], F)
    with np.errstate(divide="ignore", invalid="ignore"):
        expected = np.log(special)
    np.testing.assert_array_equal(run(LOG, special), expected)


def test_log1p_within_3_ulp_and_exact_for_tiny_values():
    x = np.concatenate([sweep(-0.999, 1.0), positive_sweep()[:200_000], -positive_sweep(seed=2)[:100_000]])
    x = x[(x > -1) & np.isfinite(x)]
    exact = np.log1p(x.astype(np.float64))
    assert ulps(run(LOG1P, x), exact).max() <= 3
    tiny = np.array([1e-30, -1e-30, 1e-45, 2.0 ** -25], F)
    np.testing.assert_array_equal(run(LOG1P, tiny), tiny)
    special = np.array([0, np.inf, -1, np.nan], F)
    with np.errstate(divide="ignore"):
        expected = np.log1p(special)
    np.testing.assert_array_equal(run(LOG1P, special), expected)


def test_the_backend_hands_float32_blocks_to_the_kernels(monkeypatch):
    """Which blocks reach the compiled kernels: float32 KLDivergence (forward and reverse) and
    SmoothL1 do; float64 and cpu_kernels.ENABLED = False keep NumPy's blocks."""
    calls = []
    for name in ("kl_rows_probabilities", "divergence_rows_probabilities", "smoothl1_block"):
        original = getattr(kernels, name)
        monkeypatch.setattr(kernels, name, lambda *args, _f=original, _n=name: calls.append(_n) or _f(*args))
    monkeypatch.setattr(cpu_kernels, "ENABLED", True)
    rng = np.random.default_rng(3)
    pred = rng.standard_normal((4, 9)).astype(F)
    target = np.full((4, 9), 1 / 9, F)
    KLDivergence()(pred, target)
    KLDivergence(divergence="reverse")(pred, target)
    SmoothL1()(pred, target)
    expected = ["kl_rows_probabilities", "divergence_rows_probabilities", "smoothl1_block"]
    assert calls == expected
    KLDivergence()(pred.astype(np.float64), target.astype(np.float64))
    monkeypatch.setattr(cpu_kernels, "ENABLED", False)
    KLDivergence()(pred, target)
    SmoothL1()(pred, target)
    assert calls == expected


def test_two_thread_forward_rows_run_on_the_row_pool_and_a_busy_pool_changes_nothing(monkeypatch):
    """Forward KL's compiled rows of two threads go to cpu_kernels.row_pool (labels, logits,
    probabilities); a call that finds the pool busy runs its blocks as before, with the same bits."""
    from puzzlelib_cost.backends import numpy_blocks
    from puzzlelib_cost.cpu_kernels import row_pool
    monkeypatch.setattr(cpu_kernels, "ENABLED", True)
    monkeypatch.setattr(numpy_blocks, "THREADS", 2)
    taken = []
    run = row_pool.RowPool.run
    monkeypatch.setattr(row_pool.RowPool, "run", lambda self, kind, *args: taken.append(kind) or run(self, kind, *args))
    rng = np.random.default_rng(5)
    pred = (2 * rng.standard_normal((300, 1000))).astype(F)
    labels = rng.integers(0, 1000, 300)
    logits = rng.standard_normal((300, 1000)).astype(F)
    probabilities = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    results = [(KLDivergence()(pred, labels)), KLDivergence(normTarget=True)(pred, logits),
               KLDivergence()(pred, probabilities)]
    assert taken == [row_pool.LABELS, row_pool.LOGITS, row_pool.PROBABILITIES]
    pool = row_pool.pool()
    with pool._busy:   # (another thread's call holds the pool)
        again = [KLDivergence()(pred, labels), KLDivergence(normTarget=True)(pred, logits),
                 KLDivergence()(pred, probabilities)]
    assert [(e, g.tobytes()) for e, g in again] == [(e, g.tobytes()) for e, g in results]


def test_the_row_pool_gives_a_one_hot_q_against_itself_zero(monkeypatch):
    """The pool's rows at T = 0.7 with logits 3e9 apart (q one-hot, p = q): E = 0 and grad 0, bit
    for bit what one thread gives.  The pool had loaded its machine code from numba's cache made
    before kernels.py's x / T fence (its own file unchanged): E = inf, every grad NaN."""
    from puzzlelib_cost.backends import numpy_blocks
    from puzzlelib_cost.cpu_kernels import row_pool
    monkeypatch.setattr(cpu_kernels, "ENABLED", True)
    taken = []
    run = row_pool.RowPool.run
    monkeypatch.setattr(row_pool.RowPool, "run", lambda self, kind, *args: taken.append(kind) or run(self, kind, *args))
    big = F(3.001023e9)
    pred = np.tile(np.array([big, 0, -big], F), (30000, 1))
    target = np.tile(np.array([1, 0, 0], F), (30000, 1))
    results = []
    for threads in (2, 1):
        monkeypatch.setattr(numpy_blocks, "THREADS", threads)
        error, grad = KLDivergence(temperature=0.7)(pred, target)
        results.append((error, grad.tobytes()))
        assert error == 0 and not grad.any()
    assert taken == [row_pool.PROBABILITIES] and results[0] == results[1]


@pytest.mark.usefixtures("cpu_blocks")
@pytest.mark.parametrize("norm_target", [False, True])
def test_kl_zero_probabilities_infinite_logits_and_one_hot_rows(norm_target):
    """0 log 0 = 0 (also where the logit is -inf), one-hot rows, a spread of 1e4, against the
    float64 reference of tests/reference.py, with NumPy's blocks and the compiled ones."""
    import reference
    rng = np.random.default_rng(4)
    pred = rng.standard_normal((6, 37)).astype(F)
    p = rng.random((6, 37)) ** 3
    p[:, ::5] = 0
    p[1] = 0
    p[1, 3] = 1                                # one-hot
    pred[2, ::5] = -np.inf                     # -inf logits exactly where p = 0
    pred[3, 0], pred[3, 1] = 5000, -5000
    p /= p.sum(axis=1, keepdims=True)
    with np.errstate(divide="ignore"):
        target = np.log(p).astype(F) if norm_target else p.astype(F)
    error, grad = KLDivergence(normTarget=norm_target)(pred, target)
    ref = reference.kl_reference(pred.astype(np.float64), target.astype(np.float64), normTarget=norm_target)
    assert np.isfinite(error)
    assert error == pytest.approx(ref["error"], rel=1e-5)
    np.testing.assert_allclose(grad, ref["grad"], rtol=1e-5, atol=1e-7)


def _compiled_in(folder, name):
    """The sibling files of cpu_kernels whose functions `name`'s compiled code calls (its imports,
    followed)."""
    import re
    found, todo = set(), [name]
    while todo:
        text = (folder / todo.pop()).read_text()
        names = re.findall(r"^from \.(\w+) import", text, re.M)
        for listed in re.findall(r"^from \. import ([\w, ]+)", text, re.M):
            names += [name.strip() for name in listed.split(",")]
        for module in names:
            dependency = f"{module}.py"
            if dependency not in found and (folder / dependency).exists():
                found.add(dependency)
                todo.append(dependency)
    return found


def test_each_cached_file_names_the_digests_of_the_files_it_compiles_in():
    """numba keys a file's cached machine code to its own text: a cached file must change whenever
    a file it compiles in does, or every process would go on loading the old code from the cache
    (the two-thread rows ran kernels.py's code from before its fence fix: E = inf for 0)."""
    import hashlib
    from pathlib import Path
    from puzzlelib_cost.cpu_kernels import row_pool
    folder = Path(kernels.__file__).parent
    cached = [path.name for path in sorted(folder.glob("*.py")) if "cache=CACHE" in path.read_text()]
    assert cached == ["kernels.py", "row_pool.py"]
    for name, module in [("kernels.py", kernels), ("row_pool.py", row_pool)]:
        want = {dependency: hashlib.sha256((folder / dependency).read_bytes()).hexdigest()[:16]
                for dependency in sorted(_compiled_in(folder, name))}
        assert want and module.COMPILED_IN == want, f"write COMPILED_IN = {want!r} in cpu_kernels/{name}"


def test_an_interrupt_once_the_row_pool_is_taken_lets_it_go(monkeypatch):
    """KeyboardInterrupt at the first line after RowPool.run took its lock: the lock was taken
    before the try that lets it go, and an interrupt there kept it for good (every later pooled call
    then ran alone, slower)."""
    import sys
    from puzzlelib_cost.backends import numpy_blocks
    from puzzlelib_cost.cpu_kernels import row_pool
    monkeypatch.setattr(cpu_kernels, "ENABLED", True)
    monkeypatch.setattr(numpy_blocks, "THREADS", 2)
    pool = row_pool.pool()
    run = row_pool.RowPool.run
    fired = []

    def tracer(frame, event, arg):
        if frame.f_code is not run.__code__:
            return None

        def lines(frame, event, arg):
            if event == "line" and pool._busy.locked() and not fired:
                fired.append(frame.f_lineno)
                raise KeyboardInterrupt
            return lines
        return lines
    rng = np.random.default_rng(2)
    pred = rng.standard_normal((300, 1000)).astype(F)
    labels = rng.integers(0, 1000, 300)
    sys.settrace(tracer)
    try:
        with pytest.raises(KeyboardInterrupt):
            KLDivergence()(pred, labels)
    finally:
        sys.settrace(None)
    assert fired and not pool._busy.locked()
    taken = []
    monkeypatch.setattr(row_pool.RowPool, "run", lambda self, *args: taken.append(run(self, *args)) or taken[-1])
    KLDivergence()(pred, labels)
    assert taken == [True]   # (the pool did the rows, not found busy)


def _run_python(code, **env):
    import os
    import subprocess
    import sys
    from pathlib import Path
    root = Path(__file__).resolve().parents[1]
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, cwd=root,
                            env={**os.environ, "PYTHONPATH": str(root), **env})
    return result


CALLS = """
import numpy as np, puzzlelib_cost as P
from puzzlelib_cost import cpu_kernels
rng = np.random.default_rng(0)
x, t = rng.standard_normal((2, 64, 10)).astype(np.float32)
y = rng.integers(0, 2, (64, 10))
print(repr(P.MSE()(x, t)[0]), repr(P.BCE()(x, y)[0]), repr(P.KLDivergence(normTarget=True)(x, t)[0]),
      repr(P.CrossEntropy()(x, y[:, 0])[0]), cpu_kernels.compiled() is not None, cpu_kernels.CACHE)
"""


def _reference_errors():
    rng = np.random.default_rng(0)
    x, t = rng.standard_normal((2, 64, 10)).astype(np.float64)
    y = rng.integers(0, 2, (64, 10))
    def log_softmax(a):
        return a - a.max(1, keepdims=True) - np.log(np.exp(a - a.max(1, keepdims=True)).sum(1, keepdims=True))
    p = np.exp(log_softmax(t))
    return [0.5 * ((x - t) ** 2).mean(), (np.maximum(x, 0) - x * y + np.log1p(np.exp(-abs(x)))).mean(),
            (p * (log_softmax(t) - log_softmax(x))).sum() / 64, -log_softmax(x)[np.arange(64), y[:, 0]].mean()]


@pytest.mark.parametrize("env,compiled,cache", [
    ({"NUMBA_DISABLE_JIT": "1"}, False, True),                     # (the kernels' intrinsics raised there)
    ({"PUZZLELIB_COST_CPU_KERNELS": " NumPy "}, False, True),       # (taken for numba before)
    ({"PUZZLELIB_COST_NO_CACHE_LOCATOR": "1"}, True, False)])       # (see below)
def test_the_cpu_kernels_settings_give_the_same_errors(env, compiled, cache):
    """NUMBA_DISABLE_JIT=1 and PUZZLELIB_COST_CPU_KERNELS in any case give the NumPy blocks; where
    numba has nowhere to write its cache (a read-only install without a writable home: simulated
    by taking numba's cache locators away), the kernels compile uncached instead of every call
    raising numba's RuntimeError."""
    code = CALLS
    if env.pop("PUZZLELIB_COST_NO_CACHE_LOCATOR", None):
        code = ("import numba.core.caching as caching\n"
                "getattr(caching, 'CacheImpl', getattr(caching, '_CacheImpl', None))._locator_classes = []\n" + code)
    result = _run_python(code, **env)
    assert result.returncode == 0, result.stderr[-2000:]
    *errors, was_compiled, was_cached = result.stdout.split()
    np.testing.assert_allclose([float(e) for e in errors], _reference_errors(), rtol=1e-6)
    assert (was_compiled, was_cached) == (str(compiled), str(cache))


def test_numba_left_half_set_up_falls_back_to_numpys_blocks():
    """A Ctrl-C during numba's import or its first call in a process (its registries' set-up, a
    tenth of a second) left numba half set up: every later call of a cost raised numba's
    AttributeError for the rest of the process (a helper's audit).  Simulated by a set-up that
    fails: the costs run on NumPy's blocks, and a warning says so."""
    setup_fails = ("import numba.core.entrypoints as entrypoints\n"
                   "def broken():\n    raise AttributeError(\"module 'numba' has no attribute 'core'\")\n"
                   "entrypoints.init_all = broken\n")
    result = _run_python(setup_fails + CALLS, NUMBA_CACHE_DIR=tempfile.mkdtemp())   # (nothing cached: set up anew)
    assert result.returncode == 0, result.stderr[-2000:]
    *errors, was_compiled, _ = result.stdout.split()
    np.testing.assert_allclose([float(e) for e in errors], _reference_errors(), rtol=1e-6)
    assert was_compiled == "False" and "numba cannot be used in this process (AttributeError" in result.stderr


def test_a_bad_cpu_kernels_setting_is_a_cost_error():
    result = _run_python(CALLS, PUZZLELIB_COST_CPU_KERNELS="off")
    assert result.returncode != 0 and "CostError: PUZZLELIB_COST_CPU_KERNELS: expected numba or numpy, got 'off'" \
        in result.stderr


def test_a_bad_cpu_kernels_setting_is_refused_among_the_checks(monkeypatch):
    """It was asked first inside the work, by the first block that would run compiled: a Multi's
    float64 child (no compiled block) counted its batch, then its float32 sibling failed, its grad
    let go.  Now every call on the CPU refuses it among its checks, before anything changes."""
    from puzzlelib_cost import MSE, Abs, CostError, Multi, cpu_kernels
    rng = np.random.default_rng(0)
    p, q = rng.standard_normal((2, 4, 5))
    multi = Multi().append(Abs()).append(MSE())
    multi([p, p], [q, q])
    before = [(cost.numOfSamples, cost.getMeanError(), cost.grad) for cost in multi.costs]
    monkeypatch.setattr(cpu_kernels, "_MODE", "numbaa")
    monkeypatch.setattr(cpu_kernels, "_SETTING", "numbaa")
    with pytest.raises(CostError, match="PUZZLELIB_COST_CPU_KERNELS: expected numba or numpy, got 'numbaa'"):
        multi([p, p.astype(np.float32)], [q, q.astype(np.float32)])
    assert [(cost.numOfSamples, cost.getMeanError(), cost.grad) for cost in multi.costs] == before
    with pytest.raises(CostError, match="got 'numbaa'"):
        MSE()(p, q)   # (float64: no compiled block; refused all the same)

