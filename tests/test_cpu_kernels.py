"""The compiled CPU blocks' own arithmetic (puzzlelib_cost.cpu_kernels, the `cpu` extra).

Every cost test runs the NumPy backend with and without these blocks (conftest: the places
"numpy" and "numpy-compiled", and the cpu_blocks fixture of test_cpu_path.py) against float64
references; here: vmath's exp, log and log1p against float64, ulp by ulp, over the whole float32
range with its special values, and which blocks the backend actually hands to them.
"""
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
        for module in re.findall(r"^from \.(\w+) import|^from \. import (\w+)", text, re.M):
            dependency = f"{module[0] or module[1]}.py"
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
    cached = [path.name for path in sorted(folder.glob("*.py")) if "cache=True" in path.read_text()]
    assert cached == ["kernels.py", "row_pool.py"]
    for name, module in [("kernels.py", kernels), ("row_pool.py", row_pool)]:
        want = {dependency: hashlib.sha256((folder / dependency).read_bytes()).hexdigest()[:16]
                for dependency in sorted(_compiled_in(folder, name))}
        assert want and module.COMPILED_IN == want, f"write COMPILED_IN = {want!r} in cpu_kernels/{name}"
