"""KLDivergence against sparse (top-k) teachers, target = [indices (N, K), values (N, K)], on
every place (NumPy, the CUDA kernels in the CPU emulation, pycuda).

    p_k = values (probabilities) or softmax_K(values / T) (normTarget), s = sum_k p_k
    drop    E_row = sum_k p_k (log p_k - log q[i_k])
    bucket  E_row adds (1 - s)(log(1 - s) - log(1 - sum_k q[i_k]))

The float64 reference below takes dE/dq term by term and applies the softmax's Jacobian;
finite differences check it, and a dense computation (the K entries scattered into a full
target) checks the sparse path where the two must agree."""
import numpy as np
import pytest

from puzzlelib_cost import CostError, KLDivergence

import cost_reference as R

F16, F32, F64, BF16 = R.F16, R.F32, R.F64, R.BF16
rng_for, log_softmax = R.rng_for, R.log_softmax_rows


def sparse_ref(pred, indices, values, tail="drop", T=1.0, normTarget=False):
    pred, values = np.asarray(pred), np.asarray(values)
    n, c = pred.shape
    z = pred.astype(np.float64) / T
    log_q = log_softmax(z)
    q = np.exp(log_q)
    rows = np.arange(n)[:, None]
    v = values.astype(np.float64)
    if normTarget:
        log_p = log_softmax(v / T)
        p = np.exp(log_p)
    else:
        p = v
        with np.errstate(divide="ignore"):
            log_p = np.log(p)
    s = p.sum(axis=1)
    terms = np.where(p == 0, 0.0, p * (log_p - log_q[rows, indices]))
    row = terms.sum(axis=1)
    # q_j d/dq_j of the row's error (chain rule through the softmax below): -p_k at the teacher's
    # columns (from -p_k log q[i_k])
    q_dq = np.zeros_like(q)
    q_dq[rows, indices] = -p
    if tail == "bucket" and not normTarget and indices.shape[1] < c:   # (K = C: no column for the tail)
        outside = np.ones_like(q, bool)
        outside[rows, indices] = False
        # log r, r = 1 - sum_k q[i_k] summed directly, in log space (q itself may underflow)
        log_out = np.where(outside, log_q, -np.inf)
        top = np.max(log_out, axis=1, keepdims=True)
        with np.errstate(divide="ignore", invalid="ignore"):
            log_r = (top + np.log(np.exp(log_out - top).sum(axis=1, keepdims=True)))[:, 0]
            t = np.maximum(1 - s, 0)
            row = row + np.where(t > 0, t * (np.log(t) - log_r), 0)
            q_dq -= np.where(outside & (t > 0)[:, None], t[:, None] * np.exp(log_out - log_r[:, None]), 0)   # -t q_j / r
    dz = q_dq - q * q_dq.sum(axis=1, keepdims=True)
    mag = (np.abs(terms) + p * (np.abs(log_q[rows, indices]) + np.abs(z[rows, indices]) + 1)).sum(axis=1)
    mag += np.abs(z).max(axis=1) + 1
    error = float(row.sum() / n)
    return dict(error=error, val=error, grad=-dz / (T * n), scale=float(mag.sum() / n))


def gen(rng, n, c, k, dtype, normTarget, mass=0.9):
    pred = (rng.standard_normal((n, c)) * 3).astype(dtype)
    indices = np.stack([rng.choice(c, size=k, replace=False) for _ in range(n)]).astype(np.int32)
    if normTarget:
        values = (rng.standard_normal((n, k)) * 3).astype(dtype)
    else:   # a teacher's top-k probabilities holding `mass` of its distribution
        values = (np.exp(log_softmax(rng.standard_normal((n, k)) * 2)) * mass).astype(dtype)
    return pred, indices, values


def check(place, cost, pred, indices, values, ref, dtype):
    R.check_call(place, cost, pred, [indices, values], ref, dtype)


# ------------------------------------------------------------------ the reference itself

@pytest.mark.parametrize("tail,normTarget", [("drop", False), ("bucket", False), ("drop", True)])
def test_reference_grad_is_minus_fd_of_reference_error(tail, normTarget):
    pred, indices, values = gen(rng_for("fd", tail, normTarget), 3, 8, 3, F64, normTarget)
    T = 1.3
    ref = sparse_ref(pred, indices, values, tail, T, normTarget)
    fd = R.finite_difference(lambda x: sparse_ref(x, indices, values, tail, T, normTarget)["error"],
                             pred, range(pred.size))
    np.testing.assert_allclose(-fd, ref["grad"].ravel(), atol=1e-8)


# ------------------------------------------------------------------ against the reference, every place

CASES = [(1, 1, 1), (5, 7, 3), (300, 10, 4), (64, 300, 64)]
BIG = [(4, 5000, 1024), (2, 17000, 64)]


def _grid():
    for n, c, k in CASES + BIG:
        for dtype in R.FLOAT_DTYPES if (n, c, k) in CASES else [F32]:
            for tail, norm in (("drop", False), ("bucket", False), ("drop", True)):
                yield pytest.param(n, c, k, dtype, tail, norm, id=f"{n}x{c}k{k}-{dtype}-{tail}{'-norm' if norm else ''}")


@pytest.mark.parametrize("n,c,k,dtype,tail,normTarget", list(_grid()))
def test_matches_reference(place, n, c, k, dtype, tail, normTarget):
    pred, indices, values = gen(rng_for("grid", n, c, k, str(dtype), tail, normTarget), n, c, k, dtype, normTarget)
    T = 2.0 if n % 2 else 1.0
    cost = KLDivergence(normTarget=normTarget, temperature=T, sparseTail=tail)
    check(place, cost, pred, indices, values, sparse_ref(pred, indices, values, tail, T, normTarget), dtype)


def test_more_rows_than_the_grid_has_blocks(place, monkeypatch):
    """The GPU's grid is capped (sparse_teacher.MAX_BLOCKS; a block a row took a term of scratch a
    row): its blocks loop over the rows.  The cap lowered to 3 so that 7 rows take that loop."""
    from puzzlelib_cost import sparse_teacher
    monkeypatch.setattr(sparse_teacher, "MAX_BLOCKS", 3)
    for tail in ("drop", "bucket"):
        pred, indices, values = gen(rng_for("capped", tail), 7, 10, 3, F32, False)
        check(place, KLDivergence(sparseTail=tail), pred, indices, values,
              sparse_ref(pred, indices, values, tail, 1.0, False), F32)


@pytest.mark.parametrize("tail", ["drop", "bucket"])
def test_vocabulary_scale_rows_with_top_64(place, tail):
    pred, indices, values = gen(rng_for("vocab", tail), 2, 128256, 64, F32, False, mass=0.97)
    cost = KLDivergence(temperature=2.0, sparseTail=tail)
    check(place, cost, pred, indices, values, sparse_ref(pred, indices, values, tail, 2.0), F32)


def test_bucket_is_exact_when_the_teacher_holds_nearly_all_the_students_mass(place):
    """R = 1 - sum_k q[i_k] of about 1e-9: summed over the other columns, not as 1 - sum."""
    pred = np.full((1, 50), -20.0, F32)
    pred[0, :3] = [3.0, 2.0, 1.0]
    indices = np.array([[0, 1, 2]], np.int64)
    values = np.array([[0.5, 0.3, 0.1]], F32)
    ref = sparse_ref(pred, indices, values, "bucket")
    check(place, KLDivergence(sparseTail="bucket"), pred, indices, values, ref, F32)


def test_bucket_with_a_full_teacher_mass_and_no_student_mass_outside_is_finite(place):
    """s = 1 exactly and R = 0 in float32 (the other columns' q underflow): no tail term and a
    finite grad, not 0 * inf."""
    pred = np.array([[0.0, 1.0, -200.0, -200.0], [2.0, -1.0, 0.5, -300.0]], F32)
    indices = np.array([[0, 1], [3, 0]], np.int64)
    values = np.array([[0.25, 0.75], [0.5, 0.5]], F32)
    ref = sparse_ref(pred, indices, values, "bucket")
    check(place, KLDivergence(sparseTail="bucket"), pred, indices, values, ref, F32)


def test_bucket_is_exact_when_the_students_mass_outside_underflows_beside_the_rows_max(place):
    """The teacher's columns hold the row's max and the other columns' q underflows in float32
    (x / T 120 and 200 below it), though their mass R is a finite number: E and grad come from
    R's own max and sum.  Summed relative to the whole row's max, R was 0: E = inf, grad NaN."""
    pred = np.array([[8.0, 2.0, 1.0, 0.5], [100.0, -100.0, 3.0, -100.0]], F32)
    indices = np.array([[0, 1], [0, 2]], np.int64)
    values = np.array([[0.7, 0.2], [0.6, 0.3]], F32)
    for T in (0.05, 1.0):
        ref = sparse_ref(pred, indices, values, "bucket", T=T)
        assert np.isfinite(ref["error"]) and np.isfinite(ref["grad"]).all() and ref["error"] > 10
        check(place, KLDivergence(sparseTail="bucket", temperature=T), pred, indices, values, ref, F32)


def test_bucket_keeps_the_rests_own_differences_beside_a_far_larger_max(place):
    """The rest's logits 0, 5 and 4.999 beside a teacher column of 1e8 (and, at T = 0.01, 1e4
    beside 0.1 and 0.2): their differences are exact in float32 on their own, rounded away once
    shifted by the row's max.  The NumPy path took the rest's max after that shift: q of the rest
    1.7e-4 where it is 3.3e-3 (the kernels took it before, and were right)."""
    pred = np.array([[1e8, 0.0, 5.0, 4.999], [100.0, 0.001, 0.002, 0.0]], F32)
    indices = np.array([[0], [0]], np.int64)
    values = np.array([[0.5], [0.6]], F32)
    for T in (1.0, 0.01):
        ref = sparse_ref(pred, indices, values, "bucket", T=T)
        check(place, KLDivergence(sparseTail="bucket", temperature=T), pred, indices, values, ref, F32)


def test_bucket_with_a_teacher_mass_above_one_has_drops_gradient(place):
    """s = 1.2 > 1: bucket adds nothing to E, which is drop's, and so its grad is drop's exact -dE
    (p_k - s q, -s q), not p_k - q and -q."""
    pred = np.array([[1.0, 0.0, -1.0, 0.5], [0.2, 0.1, 0.0, -0.3]], F32)
    indices = np.array([[0, 1], [2, 3]], np.int64)
    values = np.array([[0.8, 0.4], [0.3, 0.6]], F32)   # (s = 1.2 and 0.9: a row of each kind)
    ref = sparse_ref(pred, indices, values, "bucket")
    check(place, KLDivergence(sparseTail="bucket"), pred, indices, values, ref, F32)
    drop = sparse_ref(pred[:1], indices[:1], values[:1], "drop")
    np.testing.assert_allclose(ref["grad"][:1] * 2, drop["grad"], rtol=1e-12)   # (the reference agrees: N = 2 vs 1)


# ------------------------------------------------------------------ against a dense computation

@pytest.mark.parametrize("n,c,k", [(40, 50, 50), (3, 5000, 1024)], ids=["K=C", "top-1024"])
def test_normTarget_drop_equals_dense_kl_of_the_scattered_teacher(place, n, c, k):
    """softmax over the K teacher logits = softmax over a dense row that is -inf elsewhere."""
    pred, indices, values = gen(rng_for("dense", n, c, k), n, c, k, F32, True)
    dense = np.full((n, c), -np.inf, F32)
    dense[np.arange(n)[:, None], indices] = values
    e_dense, g_dense = KLDivergence(normTarget=True, temperature=2.0)(pred, dense)
    e_sparse, g_sparse = KLDivergence(normTarget=True, temperature=2.0)(place.put(pred),
                                                                     [place.put(indices), place.put(values)])
    assert abs(e_sparse - e_dense) <= 1e-6 * max(1.0, abs(e_dense))
    np.testing.assert_allclose(place.get(g_sparse), g_dense, rtol=0, atol=1e-5 * np.abs(g_dense).max())


def test_drop_of_a_full_teacher_equals_dense_kl(place):
    pred, indices, values = gen(rng_for("full"), 30, 12, 12, F64, False, mass=1.0)
    dense = np.zeros((30, 12))
    dense[np.arange(30)[:, None], indices] = values
    e_dense, g_dense = KLDivergence()(pred, dense)
    e_sparse, g_sparse = KLDivergence()(place.put(pred), [place.put(indices), place.put(values)])
    assert abs(e_sparse - e_dense) <= 1e-12
    np.testing.assert_allclose(place.get(g_sparse), g_dense, rtol=0, atol=1e-14)


# ------------------------------------------------------------------ determinism

def test_bitwise_identical_in_every_thread_order(emulated_in_every_order):
    pred, indices, values = gen(rng_for("orders"), 3, 17000, 300, F32, False)

    def run(place):
        out = []
        for tail in ("drop", "bucket"):
            error, grad = KLDivergence(temperature=2.0, sparseTail=tail)(place.put(pred),
                                                                         [place.put(indices), place.put(values)])
            out.append((error, place.get(grad).tobytes()))
        return out
    results = emulated_in_every_order(run)
    assert all(r == results[0] for r in results[1:])


# ------------------------------------------------------------------ bad input

def _bad(kind):
    pred, indices, values = gen(rng_for("bad"), 4, 6, 3, F32, False)
    if kind == "duplicate":
        indices[2, 1] = indices[2, 0]
    elif kind == "out_of_range":
        indices[1, 2] = 6
    elif kind == "negative":
        indices[0, 0] = -1
    elif kind == "k_above_c":
        indices, values = np.zeros((4, 7), np.int32), np.zeros((4, 7), F32)
    elif kind == "k_zero":
        indices, values = np.zeros((4, 0), np.int32), np.zeros((4, 0), F32)
    elif kind == "float_indices":
        indices = indices.astype(F32)
    elif kind == "value_dtype":
        values = values.astype(F64)
    elif kind == "value_shape":
        values = values[:, :2]
    elif kind == "rows":
        indices, values = indices[:3], values[:3]
    elif kind == "pred_3d":
        pred = pred.reshape(4, 3, 2)
    return pred, [indices, values]


BAD = {"duplicate": "distinct",
       "out_of_range": r"^target indices: expected column indices in \[0, 6\), got 6 at index \(1, 2\)$",
       "negative": r"^target indices: expected column indices in \[0, 6\), got -1 at index \(0, 0\)$", "k_above_c": "K <= 6",
       "k_zero": "1 <= K", "float_indices": "integer", "value_dtype": "dtype float32", "value_shape": "shape",
       "rows": r"\(4, K\)", "pred_3d": "2-D pred"}


@pytest.mark.parametrize("kind", sorted(BAD))
def test_bad_sparse_target_raises_cost_error_and_keeps_state(place, kind):
    cost = KLDivergence(sparseTail="bucket")
    good_pred, good_target = _bad("none")
    cost(place.put(good_pred), place.put(good_target))
    before = (cost.error, cost.batchsize, cost.numOfSamples, cost.getMeanError())
    pred, target = _bad(kind)
    with pytest.raises(CostError, match=BAD[kind]):
        cost(place.put(pred), place.put(target))
    assert (cost.error, cost.batchsize, cost.numOfSamples, cost.getMeanError()) == before


@pytest.mark.parametrize("kwargs,must", [(dict(divergence="jsd"), "forward"), (dict(ignoreLabel=-100), "ignoreLabel")])
def test_sparse_target_refused_with_other_modes(kwargs, must):
    pred, target = _bad("none")
    with pytest.raises(CostError, match=must):
        KLDivergence(**kwargs)(pred, target)


def test_a_list_of_three_is_refused():
    pred, target = _bad("none")
    with pytest.raises(CostError, match=r"\[indices, values\]"):
        KLDivergence()(pred, target + [target[1]])


@pytest.mark.parametrize("kwargs", [dict(sparseTail="keep"), dict(sparseTail=None),
                                    dict(sparseTail="bucket", divergence="reverse")], ids=repr)
def test_constructor_refuses_bad_sparseTail(kwargs):
    with pytest.raises(CostError, match="sparseTail"):
        KLDivergence(**kwargs)


def test_bucket_rows_beyond_the_gpu_bitmap_are_refused_on_the_gpu_and_run_on_the_cpu(place):
    """sparseTail='bucket' on the GPU marks the teacher's columns in a 262144-bit shared-memory
    bitmap: a longer row is a CostError there, before anything changes; NumPy has no such limit."""
    pred = np.zeros((1, 262145), F32)
    target = [np.array([[0]], np.int64), np.array([[0.5]], F32)]
    cost = KLDivergence(sparseTail="bucket")
    if place.name == "numpy":
        error, _ = cost(place.put(pred), place.put(target))
        assert np.isfinite(error)
        return
    with pytest.raises(CostError, match="262144"):
        cost(place.put(pred), place.put(target))
    assert (cost.error, cost.batchsize, cost.numOfSamples) == (None, 0, 0)


def test_the_bucket_limit_is_the_gpu_bitmaps_bits():
    """sparse_teacher.BUCKET_MAX_COLUMNS, past which the GPU refuses sparseTail="bucket", is the
    bits of the kernel's shared-memory bitmap of a row's teacher columns (sparse_kl.cu): a larger
    limit would let the kernel mark columns past its bitmap."""
    import re
    from pathlib import Path
    from puzzlelib_cost import sparse_teacher
    source = (Path(sparse_teacher.__file__).parents[1] / "kernels" / "sparse_kl.cu").read_text()
    words = int(re.search(r"constexpr int SPARSE_BITMAP_WORDS = (\d+);", source).group(1))
    assert sparse_teacher.BUCKET_MAX_COLUMNS == words * 32
