"""Numerical behaviour of KLDivergence against the independent float64
reference in tests/reference.py (which never imports the library)."""

import math

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st, HealthCheck
from hypothesis.extra import numpy as hnp

from puzzlelib_cost import Cost, CostError, KLDivergence, gpuarray, active_backend

try:
    from . import reference as ref
except ImportError:  # tests/ is not a package: pytest puts it on sys.path
    import reference as ref

from conftest import ARRAY_KINDS


HYP = settings(max_examples=30, deadline=None,
               suppress_health_check=[HealthCheck.too_slow])


def host(x):
    """Plain float numpy copy of a library array (numpy or GPUArray)."""
    if isinstance(x, gpuarray.GPUArray):
        y = x.get()
        assert type(y) is np.ndarray
        return y
    return np.asarray(x)


def wrap(x, kind):
    return x if kind == "numpy" else gpuarray.to_gpu(np.ascontiguousarray(x))


def rand_target(rng, shape, dtype):
    """A probability distribution per sample (softmax of random logits),
    rounded to dtype; the reference uses the rounded values."""
    return ref.softmax(rng.standard_normal(shape) * 2).astype(dtype)


def check(div, pred, target, dtype, normTarget=False, kind="numpy"):
    """Run div on (pred, target) and compare error, grad and validate with the
    reference; returns (error, grad_host, reference)."""
    r = ref.kl_reference(host(pred), host(target), normTarget=normTarget)
    error, grad = div(pred, target)
    assert type(error) is float
    if kind != "numpy":
        assert isinstance(grad, gpuarray.GPUArray)
        assert (active_backend() == "cuda") == (kind == "pycuda")
    else:
        assert isinstance(grad, np.ndarray) and not isinstance(grad, gpuarray.GPUArray)
    g = host(grad)
    assert g.shape == tuple(pred.shape)
    assert g.dtype == np.dtype(dtype)
    ref.assert_error_close(error, r, dtype)
    ref.assert_grad_close(g, r, dtype)
    val = div.validate(pred, target)
    ref.assert_error_close(float(val), r, dtype, what="validate")
    return error, g, r


# --------------------------------------------------------------------------
# the reference itself (so that a wrong reference cannot hide a wrong library)
# --------------------------------------------------------------------------

def test_reference_closed_forms():
    # uniform q over C classes, one-hot p: KL = log C; grad = (e_k - 1/C)/N
    pred = np.zeros((2, 4))
    target = np.array([[1.0, 0, 0, 0], [0, 0, 1.0, 0]])
    r = ref.kl_reference(pred, target)
    assert r["error"] == pytest.approx(math.log(4), rel=1e-15)
    np.testing.assert_allclose(r["grad"], (target - 0.25) / 2, rtol=0, atol=1e-17)
    # integer labels give the same as the one-hot target
    r2 = ref.kl_reference(pred, np.array([0, 2]))
    assert r2["error"] == r["error"]
    # p = q -> 0
    x = np.array([[0.3, -1.2, 2.0]])
    assert abs(ref.kl_reference(x, ref.softmax(x))["error"]) < 1e-15
    assert ref.kl_reference(x, x, normTarget=True)["error"] == 0.0
    # two-point closed form: p=(a,1-a), q=softmax(0, d)
    a, d = 0.3, 1.7
    q1 = 1 / (1 + math.exp(d))
    kl = a * math.log(a / q1) + (1 - a) * math.log((1 - a) / (1 - q1))
    assert ref.kl_reference(np.array([[0.0, d]]), np.array([[a, 1 - a]]))["error"] == \
        pytest.approx(kl, rel=1e-14)


def test_reference_grad_is_minus_fd_of_reference_error():
    rng = np.random.default_rng(0)
    pred = rng.standard_normal((3, 5))
    target = ref.softmax(rng.standard_normal((3, 5)))
    fd = ref.finite_difference_grad(lambda x: ref.kl_reference(x, target)["error"], pred)
    np.testing.assert_allclose(ref.kl_reference(pred, target)["grad"], -fd, atol=1e-8)


# --------------------------------------------------------------------------
# API basics
# --------------------------------------------------------------------------

def test_exports_and_types():
    assert issubclass(CostError, ValueError)
    assert issubclass(KLDivergence, Cost)
    assert active_backend() in ("cpu", "cuda")


def test_gpuarray_roundtrip():
    x = np.arange(12, dtype=np.float32).reshape(3, 4)
    g = gpuarray.to_gpu(x)
    assert isinstance(g, gpuarray.GPUArray)
    assert g.shape == (3, 4) and g.dtype == np.float32
    y = g.get()
    assert type(y) is np.ndarray
    np.testing.assert_array_equal(y, x)
    y[0, 0] = 100.0  # .get() is a copy
    assert g.get()[0, 0] == 0.0
    x[0, 1] = 55.0  # to_gpu copied its input
    assert g.get()[0, 1] == 1.0
    e = gpuarray.empty((2, 5), dtype=np.float32)
    assert isinstance(e, gpuarray.GPUArray) and e.shape == (2, 5) and e.dtype == np.float32
    z = gpuarray.zeros((2, 3), np.float64)
    assert z.dtype == np.float64
    np.testing.assert_array_equal(z.get(), np.zeros((2, 3)))
    if active_backend() == "cpu":
        assert isinstance(g, np.ndarray)


# --------------------------------------------------------------------------
# PuzzleLib's own unit test
# --------------------------------------------------------------------------

def test_puzzlelib_unittest():
    rng = np.random.default_rng(1234)
    pred = gpuarray.to_gpu(rng.standard_normal((10, 10)).astype(np.float32))
    target = gpuarray.to_gpu(rng.standard_normal((10, 10)).astype(np.float32))

    div = KLDivergence(normTarget=True)
    error, grad = div(pred, target)

    r = ref.kl_reference(pred.get(), target.get(), normTarget=True)
    assert isinstance(grad, gpuarray.GPUArray)
    assert grad.dtype == np.float32 and grad.shape == (10, 10)
    ref.assert_error_close(error, r, np.float32)
    ref.assert_grad_close(grad.get(), r, np.float32)
    # tighter than the generic helper for this well-conditioned case
    assert np.allclose(grad.get(), r["grad"], rtol=1e-5, atol=1e-7)

    val = div.validate(pred, target)
    ref.assert_error_close(float(val), r, np.float32, what="validate")
    assert div.valError == pytest.approx(val, rel=0, abs=0)
    assert div.getValError() == pytest.approx(val, rel=0, abs=0)


# --------------------------------------------------------------------------
# shapes, dtypes, kinds
# --------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ARRAY_KINDS)
@pytest.mark.parametrize("shape", [(1, 1), (1, 7), (4, 7), (16, 100), (3, 1000)])
@pytest.mark.parametrize("normTarget", [False, True])
def test_float32_2d(kind, shape, normTarget):
    rng = np.random.default_rng(hash((shape, normTarget)) % 2 ** 32)
    pred = rng.standard_normal(shape).astype(np.float32) * 3
    if normTarget:
        target = (rng.standard_normal(shape) * 3).astype(np.float32)
    else:
        target = rand_target(rng, shape, np.float32)
    div = KLDivergence(normTarget=normTarget)
    check(div, wrap(pred, kind), wrap(target, kind), np.float32, normTarget, kind)


@pytest.mark.parametrize("kind", ARRAY_KINDS)
@pytest.mark.parametrize("shape", [(2, 3, 4, 5), (5, 1, 3, 3), (1, 4, 1, 1), (3, 2, 8, 8)])
@pytest.mark.parametrize("normTarget", [False, True])
def test_spatial_4d(kind, shape, normTarget):
    rng = np.random.default_rng(7)
    pred = rng.standard_normal(shape).astype(np.float32) * 2
    target = ((rng.standard_normal(shape) * 2).astype(np.float32) if normTarget
              else rand_target(rng, shape, np.float32))
    div = KLDivergence(normTarget=normTarget)
    _, g, r = check(div, wrap(pred, kind), wrap(target, kind), np.float32, normTarget, kind)
    # softmax is over C*H*W per sample, not per pixel over C: the row sums of
    # the grad (sum p - sum q) over all non-batch dims vanish...
    n = shape[0]
    assert np.abs(g.reshape(n, -1).sum(axis=1)).max() < 1e-6
    # ...and for H*W > 1 the answer differs from a per-pixel softmax over C
    # (so the reference comparison above really pins the flattening down)
    if shape[2] * shape[3] > 1 and shape[1] > 1:
        x = pred.astype(np.float64)
        q_over_c = np.exp(x - np.log(np.exp(x).sum(axis=1, keepdims=True)))
        p = ref.softmax(target) if normTarget else target.astype(np.float64)
        assert not np.allclose(g, (p - q_over_c) / n, atol=1e-4)


@pytest.mark.parametrize("shape", [(3, 4, 5), (1, 2, 9), (6, 10, 1)])
def test_3d(shape):
    rng = np.random.default_rng(3)
    pred = rng.standard_normal(shape).astype(np.float32)
    target = rand_target(rng, shape, np.float32)
    check(KLDivergence(), pred, target, np.float32)


@pytest.mark.parametrize("kind", ARRAY_KINDS)
@pytest.mark.parametrize("label_dtype", [np.int32, np.int64])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("maxlabels", [None, 6])
def test_integer_labels(kind, label_dtype, dtype, maxlabels):
    rng = np.random.default_rng(11)
    n, c = 9, 6
    pred = (rng.standard_normal((n, c)) * 2).astype(dtype)
    labels = rng.integers(0, c, size=n).astype(label_dtype)
    labels[0], labels[1] = 0, c - 1  # both ends of the valid range
    div = KLDivergence(maxlabels=maxlabels)
    error, g, r = check(div, wrap(pred, kind), wrap(labels, kind), dtype, kind=kind)
    # independent closed form: cross-entropy -mean log q[label]
    lq = ref.log_softmax(pred)
    ce = -np.mean(lq[np.arange(n), labels])
    assert error == pytest.approx(ce, rel=ref.tolerances(dtype)[0], abs=1e-6)
    onehot = np.eye(c)[labels]
    np.testing.assert_allclose(g, (onehot - np.exp(lq)) / n, rtol=ref.tolerances(dtype)[0],
                               atol=ref.tolerances(dtype)[1] / n)


def test_integer_labels_equal_one_hot_float_target():
    rng = np.random.default_rng(12)
    pred = rng.standard_normal((7, 5)).astype(np.float32)
    labels = rng.integers(0, 5, size=7)
    e1, g1 = KLDivergence()(pred, labels)
    e2, g2 = KLDivergence()(pred, np.eye(5, dtype=np.float32)[labels])
    assert e1 == pytest.approx(e2, rel=1e-6)
    np.testing.assert_allclose(g1, g2, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("shape", [(5, 8), (2, 3, 4), (2, 3, 2, 2), (64, 300)])
@pytest.mark.parametrize("normTarget", [False, True])
def test_float64_tight(shape, normTarget):
    rng = np.random.default_rng(5)
    pred = rng.standard_normal(shape) * 4
    target = rng.standard_normal(shape) * 4 if normTarget else ref.softmax(rng.standard_normal(shape))
    check(KLDivergence(normTarget=normTarget), pred, target, np.float64, normTarget)


@pytest.mark.parametrize("kind", ARRAY_KINDS)
@pytest.mark.parametrize("shape", [(10, 10), (4, 3, 5), (2, 3, 4, 4)])
@pytest.mark.parametrize("normTarget", [False, True])
def test_float16(kind, shape, normTarget):
    # float16: u = 4.9e-4, grad rounded to float16 (~1e-3 relative after a
    # couple of operations); tolerances from reference.tolerances(float16).
    rng = np.random.default_rng(16)
    pred = (rng.standard_normal(shape) * 2).astype(np.float16)
    target = ((rng.standard_normal(shape) * 2).astype(np.float16) if normTarget
              else rand_target(rng, shape, np.float16))
    check(KLDivergence(normTarget=normTarget), wrap(pred, kind), wrap(target, kind),
          np.float16, normTarget, kind)


def test_float16_large_finite_logits_finite_error():
    # logits +-6e4 are finite float16 numbers; their difference (1.2e5)
    # overflows float16, but the log-softmax must still be finite and exact
    # enough: error = 0.5 * 1.2e5 + 0.5*log(0.5) + 0.5*log(0.5) ~ 6e4.
    pred = np.array([[60000.0, -60000.0]], dtype=np.float16)
    target = np.array([[0.5, 0.5]], dtype=np.float16)
    error, grad = KLDivergence()(pred, target)
    r = ref.kl_reference(pred, target)
    assert np.isfinite(error)
    assert error == pytest.approx(r["error"], rel=4e-3)
    np.testing.assert_allclose(grad.astype(np.float64), [[-0.5, 0.5]], atol=1e-3)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_non_contiguous_inputs(dtype):
    rng = np.random.default_rng(21)
    # transposed views: stored (6, 9), used as (9, 6)
    pred_T = rng.standard_normal((6, 9)).astype(dtype).T
    target_T = np.ascontiguousarray(ref.softmax(rng.standard_normal((9, 6))).astype(dtype).T).T
    assert pred_T.shape == target_T.shape == (9, 6)
    assert not pred_T.flags.c_contiguous and not target_T.flags.c_contiguous
    check(KLDivergence(), pred_T, target_T, dtype)

    # strided slices
    pred_s = rng.standard_normal((8, 12)).astype(dtype)[::2, ::3]
    target_s = np.repeat(ref.softmax(rng.standard_normal((4, 4))).astype(dtype), 2, axis=1)[:, ::2]
    assert pred_s.shape == target_s.shape == (4, 4)
    assert not pred_s.flags.c_contiguous and not target_s.flags.c_contiguous
    check(KLDivergence(), pred_s, target_s, dtype)

    # 4-D transposed (N, W, H, C) storage used as (N, C, H, W)
    p4 = rng.standard_normal((2, 5, 4, 3)).astype(dtype).transpose(0, 3, 2, 1)
    t4 = ref.softmax(rng.standard_normal((2, 3, 4, 5))).astype(dtype)
    t4 = np.ascontiguousarray(t4.transpose(0, 3, 2, 1)).transpose(0, 3, 2, 1)
    assert p4.shape == t4.shape == (2, 3, 4, 5)
    assert not p4.flags.c_contiguous and not t4.flags.c_contiguous
    check(KLDivergence(), p4, t4, dtype)

    # normTarget with transposed logits, and strided integer labels
    logits_T = rng.standard_normal((6, 9)).astype(dtype).T
    check(KLDivergence(normTarget=True), pred_T, logits_T, dtype, True)
    labels = (np.arange(36, dtype=np.int64) % 6)[::4]  # (9,), stride 32 bytes
    assert labels.shape == (9,) and labels.strides[0] == 32
    check(KLDivergence(), pred_T, labels, dtype)


def test_query_error_false_returns_grad_only():
    rng = np.random.default_rng(2)
    pred = rng.standard_normal((5, 4)).astype(np.float32)
    target = rand_target(rng, (5, 4), np.float32)
    _, g1 = KLDivergence()(pred, target)
    g2 = KLDivergence()(pred, target, queryError=False)
    assert isinstance(g2, np.ndarray) and not isinstance(g2, tuple)
    assert g2.shape == pred.shape and g2.dtype == np.float32
    np.testing.assert_array_equal(g2, g1)
    gg = KLDivergence()(gpuarray.to_gpu(pred), gpuarray.to_gpu(target), queryError=False)
    assert isinstance(gg, gpuarray.GPUArray)
    # On a GPU the grad is float arithmetic with CUDA's expf/logf (within 2 ulp each, not glibc's
    # correctly rounded ones), a few in a row: the float32 tolerance of reference.tolerances.
    np.testing.assert_allclose(gg.get(), g1, rtol=ref.tolerances(np.float32)[0], atol=1e-7)


@pytest.mark.parametrize("normTarget", [False, True])
def test_inputs_not_modified(normTarget):
    rng = np.random.default_rng(4)
    pred = rng.standard_normal((6, 5)).astype(np.float32)
    target = (rng.standard_normal((6, 5)).astype(np.float32) if normTarget
              else rand_target(rng, (6, 5), np.float32))
    p0, t0 = pred.copy(), target.copy()
    div = KLDivergence(normTarget=normTarget)
    div(pred, target)
    div.validate(pred, target)
    np.testing.assert_array_equal(pred, p0)
    np.testing.assert_array_equal(target, t0)
    gp, gt = gpuarray.to_gpu(pred), gpuarray.to_gpu(target)
    div(gp, gt)
    np.testing.assert_array_equal(gp.get(), p0)
    np.testing.assert_array_equal(gt.get(), t0)


def test_normtarget_equals_normalised_probabilities():
    rng = np.random.default_rng(8)
    pred = rng.standard_normal((6, 7))
    logits = rng.standard_normal((6, 7)) * 3
    e1, g1 = KLDivergence(normTarget=True)(pred, logits)
    e2, g2 = KLDivergence()(pred, ref.softmax(logits))
    assert e1 == pytest.approx(e2, rel=1e-12, abs=1e-14)
    np.testing.assert_allclose(g1, g2, rtol=1e-12, atol=1e-15)
    # normTarget must actually normalise: raw logits used as "probabilities"
    # give a different (finite or NaN) answer than the normalised target
    e3 = KLDivergence()(pred, np.abs(logits))[0]
    assert not e3 == pytest.approx(e1, rel=1e-3)


def test_single_class_is_zero():
    pred = np.array([[3.0], [-2.0], [0.5]], dtype=np.float32)
    target = np.ones((3, 1), dtype=np.float32)
    error, grad = KLDivergence()(pred, target)
    assert abs(error) < 1e-7
    np.testing.assert_allclose(grad, 0.0, atol=1e-8)
    error, grad = KLDivergence()(pred, np.zeros(3, dtype=np.int64))
    assert abs(error) < 1e-7
    np.testing.assert_allclose(grad, 0.0, atol=1e-8)


def test_grad_scaled_by_batch_size():
    # same rows repeated: per-sample error unchanged, grad divided by N
    rng = np.random.default_rng(9)
    row_p = rng.standard_normal((1, 6))
    row_t = ref.softmax(rng.standard_normal((1, 6)))
    e1, g1 = KLDivergence()(row_p, row_t)
    e4, g4 = KLDivergence()(np.repeat(row_p, 4, 0), np.repeat(row_t, 4, 0))
    assert e4 == pytest.approx(e1, rel=1e-12)
    np.testing.assert_allclose(g4, np.repeat(g1, 4, 0) / 4, rtol=1e-12, atol=1e-16)


# --------------------------------------------------------------------------
# properties
# --------------------------------------------------------------------------

@st.composite
def logits_pairs(draw, lo=-30.0, hi=30.0):
    n = draw(st.integers(1, 4))
    c = draw(st.integers(1, 6))
    extra = draw(st.sampled_from([(), (2,), (2, 3)]))
    shape = (n, c) + extra
    el = st.floats(lo, hi, allow_nan=False, allow_infinity=False, width=64)
    pred = draw(hnp.arrays(np.float64, shape, elements=el))
    tlog = draw(hnp.arrays(np.float64, shape, elements=el))
    return pred, tlog


@HYP
@given(logits_pairs(), st.sampled_from([np.float32, np.float64]))
def test_prop_error_nonnegative_and_matches_reference(pair, dtype):
    pred, tlog = pair
    pred = pred.astype(dtype)
    target = ref.softmax(tlog).astype(dtype)
    error, grad = KLDivergence()(pred, target)
    r = ref.kl_reference(pred, target)
    # KL >= 0; a float32 target sums to 1 only within ~D*u, which allows a
    # tiny negative value of that order (covered by error_tol).
    assert error >= -ref.error_tol(r, dtype) - (1e-6 if dtype == np.float32 else 1e-14)
    ref.assert_error_close(error, r, dtype)
    ref.assert_grad_close(grad, r, dtype)


@HYP
@given(logits_pairs())
def test_prop_zero_when_target_is_softmax_of_pred(pair):
    pred, _ = pair
    target = ref.softmax(pred)
    error, grad = KLDivergence()(pred, target)
    n = pred.shape[0]
    # log q agree to ~u*|log q| (|log q| <= 60 here): error ~ 1e-14 at most
    assert abs(error) < 1e-12
    np.testing.assert_allclose(grad, 0.0, atol=1e-13 / n)
    error, grad = KLDivergence(normTarget=True)(pred, pred)
    assert abs(error) < 1e-12
    np.testing.assert_allclose(grad, 0.0, atol=1e-13 / n)


@HYP
@given(logits_pairs(), st.sampled_from([np.float32, np.float64]))
def test_prop_grad_rows_sum_to_zero(pair, dtype):
    pred, tlog = pair
    n = pred.shape[0]
    d = int(np.prod(pred.shape[1:]))
    grad = KLDivergence(normTarget=True)(pred.astype(dtype), tlog.astype(dtype), queryError=False)
    sums = grad.astype(np.float64).reshape(n, -1).sum(axis=1)
    # each element rounded to u*max(p,q)/N, D of them, plus the rounding of p, q
    u = ref.UNIT_ROUNDOFF[np.dtype(dtype)]
    assert np.all(np.abs(sums) <= 8 * d * u / n + 1e-300), sums


@HYP
@given(logits_pairs(-20, 20), st.floats(-100, 100), st.integers(0, 3), st.booleans())
def test_prop_shift_invariance(pair, c, row, normTarget):
    pred, tlog = pair
    row = row % pred.shape[0]
    target = tlog if normTarget else ref.softmax(tlog)
    div = KLDivergence(normTarget=normTarget)
    e1, g1 = div(pred, target)
    shifted = pred.copy()
    shifted[row] += c
    e2, g2 = div(shifted, target)
    # the shift perturbs each logit by <= u*120 ~ 1e-14 absolute
    assert e2 == pytest.approx(e1, rel=1e-10, abs=1e-10)
    np.testing.assert_allclose(g2, g1, rtol=1e-9, atol=1e-12)
    if normTarget:
        t2 = tlog.copy()
        t2[row] -= c
        e3, g3 = div(pred, t2)
        assert e3 == pytest.approx(e1, rel=1e-10, abs=1e-10)
        np.testing.assert_allclose(g3, g1, rtol=1e-9, atol=1e-12)


@settings(max_examples=10, deadline=None)
@given(logits_pairs(-4, 4), st.booleans())
def test_prop_grad_is_minus_finite_difference(pair, normTarget):
    pred, tlog = pair
    if pred.size > 24:
        pred, tlog = pred[:1], tlog[:1]
    target = tlog if normTarget else ref.softmax(tlog)
    div = KLDivergence(normTarget=normTarget)
    grad = div(pred, target, queryError=False)
    fd = ref.finite_difference_grad(lambda x: KLDivergence(normTarget=normTarget)(x, target)[0], pred)
    # central differences in float64: accurate to ~1e-9 (see reference)
    np.testing.assert_allclose(grad, -fd, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("shape", [(3, 4), (2, 2, 3)])
def test_grad_sign_convention_is_negative_gradient(shape):
    # deterministic, explicit: a small step pred + h*grad must DECREASE the error
    rng = np.random.default_rng(31)
    pred = rng.standard_normal(shape)
    target = ref.softmax(rng.standard_normal(shape) * 2)
    div = KLDivergence()
    e0, grad = div(pred, target)
    e1 = KLDivergence()(pred + 0.1 * grad, target)[0]
    assert e1 < e0
    fd = ref.finite_difference_grad(lambda x: KLDivergence()(x, target)[0], pred)
    np.testing.assert_allclose(grad, -fd, rtol=1e-6, atol=1e-8)


def test_grad_is_minus_finite_difference_integer_labels():
    rng = np.random.default_rng(32)
    pred = rng.standard_normal((4, 5))
    labels = np.array([0, 4, 2, 2], dtype=np.int64)
    grad = KLDivergence()(pred, labels, queryError=False)
    fd = ref.finite_difference_grad(lambda x: KLDivergence()(x, labels)[0], pred)
    np.testing.assert_allclose(grad, -fd, rtol=1e-6, atol=1e-8)


# --------------------------------------------------------------------------
# extreme values
# --------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_logit_spread_1e4(dtype):
    rng = np.random.default_rng(40)
    pred = rng.standard_normal((4, 6)).astype(dtype)
    pred[:, 0] += 1e4
    pred[:, 1] -= 1e4
    pred[2, 3] = 5e3
    target = rand_target(rng, (4, 6), dtype)
    error, g, r = check(KLDivergence(), pred, target, dtype)
    assert np.isfinite(error) and error > 1e3
    assert np.all(np.isfinite(g))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_logits_0_and_minus_1000(dtype):
    pred = np.array([[0.0, -1000.0], [-1000.0, 0.0]], dtype=dtype)
    target = np.array([[0.5, 0.5], [0.25, 0.75]], dtype=dtype)
    error, grad = KLDivergence()(pred, target)
    # log q = (0, -1000) up to log1p(e^-1000) = 0
    e0 = 0.5 * math.log(0.5) + 0.5 * (math.log(0.5) + 1000)
    e1 = 0.25 * (math.log(0.25) + 1000) + 0.75 * math.log(0.75)
    assert np.isfinite(error)
    assert error == pytest.approx((e0 + e1) / 2, rel=1e-6 if dtype == np.float32 else 1e-13)
    np.testing.assert_allclose(grad, [[-0.25, 0.25], [0.125, -0.125]], rtol=1e-6, atol=1e-12)


@pytest.mark.parametrize("kind", ARRAY_KINDS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_minus_inf_logit_with_zero_target(kind, dtype):
    pred = np.array([[0.0, -np.inf, 1.0, 2.0], [0.5, 0.1, -0.3, 0.0]], dtype=dtype)
    target = np.array([[0.2, 0.0, 0.3, 0.5], [0.1, 0.2, 0.3, 0.4]], dtype=dtype)
    error, grad = KLDivergence()(wrap(pred, kind), wrap(target, kind))
    g = host(grad)
    r = ref.kl_reference(pred, target)
    assert np.isfinite(error)
    ref.assert_error_close(error, r, dtype)
    assert np.all(np.isfinite(g))
    assert g[0, 1] == 0.0  # (p - q)/N = (0 - 0)/2
    ref.assert_grad_close(g, r, dtype)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_minus_inf_logit_with_positive_target_is_inf(dtype):
    pred = np.array([[0.0, -np.inf, 1.0, 2.0], [0.5, 0.1, -0.3, 0.0]], dtype=dtype)
    target = np.array([[0.2, 0.1, 0.2, 0.5], [0.1, 0.2, 0.3, 0.4]], dtype=dtype)
    div = KLDivergence()
    error, grad = div(pred, target)
    assert error == math.inf
    assert div.validate(pred, target) == math.inf
    # grad = (p - q)/N stays finite: q = 0 at the -inf logit
    r = ref.kl_reference(pred, target)
    assert np.all(np.isfinite(grad))
    assert grad[0, 1] == pytest.approx(0.1 / 2, rel=1e-6)
    ref.assert_grad_close(grad, r, dtype)
    # integer label pointing at the -inf logit
    e2, _ = KLDivergence()(pred, np.array([1, 0]))
    assert e2 == math.inf


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_one_hot_float_targets(dtype):
    rng = np.random.default_rng(41)
    pred = (rng.standard_normal((5, 8)) * 5).astype(dtype)
    labels = np.array([0, 7, 3, 3, 5])
    target = np.eye(8, dtype=dtype)[labels]
    error, g, r = check(KLDivergence(), pred, target, dtype)
    lq = ref.log_softmax(pred)
    assert error == pytest.approx(-lq[np.arange(5), labels].mean(), rel=ref.tolerances(dtype)[0])


def test_tiny_target_probabilities_float32():
    rng = np.random.default_rng(42)
    pred = rng.standard_normal((3, 5)).astype(np.float32)
    target = np.zeros((3, 5), dtype=np.float32)
    target[0] = [1e-38, 1e-38, 1e-30, 1e-20, 0.0]
    target[1] = [1e-40, 1e-45, 0.0, 3e-39, 0.0]  # float32 subnormals
    target[2] = [np.finfo(np.float32).tiny, 1e-44, 1e-38, 0.0, 0.0]
    assert target[1, 0] < np.finfo(np.float32).tiny and target[1, 0] > 0
    target[:, 4] += 1.0 - target.astype(np.float64).sum(axis=1)  # rows sum to 1 (rounded)
    error, g, r = check(KLDivergence(), pred, target, np.float32)
    assert np.isfinite(error) and np.all(np.isfinite(g))


def test_tiny_target_probabilities_float64():
    rng = np.random.default_rng(43)
    pred = rng.standard_normal((2, 4)) * 10
    target = np.array([[1e-300, 5e-324, 1e-200, 0.0], [0.0, 1e-310, 0.0, 0.0]])
    target[:, 3] = 1.0 - target.sum(axis=1)
    error, g, r = check(KLDivergence(), pred, target, np.float64)
    assert np.isfinite(error) and np.all(np.isfinite(g))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_plus_inf_logit_gives_nan(dtype):
    pred = np.array([[0.0, np.inf, 1.0], [0.0, 1.0, 2.0]], dtype=dtype)
    target = np.array([[0.2, 0.3, 0.5], [0.2, 0.3, 0.5]], dtype=dtype)
    error, _ = KLDivergence()(pred, target)
    assert math.isnan(error)
    assert math.isnan(KLDivergence().validate(pred, target))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_all_minus_inf_row_gives_nan(dtype):
    pred = np.array([[-np.inf, -np.inf, -np.inf], [0.0, 1.0, 2.0]], dtype=dtype)
    target = np.array([[0.2, 0.3, 0.5], [0.2, 0.3, 0.5]], dtype=dtype)
    error, _ = KLDivergence()(pred, target)
    assert math.isnan(error)


@pytest.mark.parametrize("kind", ARRAY_KINDS)
@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_nan_in_pred(kind, dtype):
    rng = np.random.default_rng(44)
    pred = rng.standard_normal((3, 2, 3)).astype(dtype)
    pred[1, 1, 2] = np.nan
    target = rand_target(rng, (3, 2, 3), dtype)
    div = KLDivergence()
    error, grad = div(wrap(pred, kind), wrap(target, kind))
    g = host(grad)
    assert math.isnan(error)
    assert math.isnan(div.getError())
    assert np.all(np.isnan(g[1])), "NaN in pred must make that sample's whole grad row NaN"
    # other samples are unaffected
    ok = [0, 2]
    r = ref.kl_reference(pred[ok], target[ok])
    np.testing.assert_allclose(g[ok].astype(np.float64) * 3, r["grad"] * 2,
                               rtol=ref.tolerances(dtype)[0],
                               atol=ref.tolerances(dtype)[1])
    assert math.isnan(div.validate(wrap(pred, kind), wrap(target, kind)))


@pytest.mark.parametrize("normTarget", [False, True])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_nan_in_target(normTarget, dtype):
    rng = np.random.default_rng(45)
    pred = rng.standard_normal((4, 5)).astype(dtype)
    target = (rng.standard_normal((4, 5)).astype(dtype) if normTarget
              else rand_target(rng, (4, 5), dtype))
    target[2, 3] = np.nan
    div = KLDivergence(normTarget=normTarget)
    error, _ = div(pred, target)
    assert math.isnan(error)
    assert math.isnan(div.validate(pred, target))


def test_nan_target_where_pred_is_minus_inf():
    # a NaN target must not be masked out by a p == 0 / q == 0 shortcut
    pred = np.array([[0.0, -np.inf, 1.0]], dtype=np.float32)
    target = np.array([[0.5, np.nan, 0.5]], dtype=np.float32)
    assert math.isnan(KLDivergence()(pred, target)[0])


def test_large_batch_float32():
    rng = np.random.default_rng(46)
    pred = (rng.standard_normal((256, 1000)) * 3).astype(np.float32)
    target = (rng.standard_normal((256, 1000)) * 3).astype(np.float32)
    check(KLDivergence(normTarget=True), pred, target, np.float32, True)
    labels = rng.integers(0, 1000, size=256).astype(np.int32)
    check(KLDivergence(maxlabels=1000), pred, labels, np.float32)


# --------------------------------------------------------------------------
# optional PyTorch oracle
# --------------------------------------------------------------------------

@pytest.mark.parametrize("normTarget", [False, True])
@pytest.mark.parametrize("shape", [(6, 9), (3, 2, 4, 5)])
def test_torch_oracle(normTarget, shape):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(50)
    pred = rng.standard_normal(shape) * 2
    target = rng.standard_normal(shape) * 2 if normTarget else ref.softmax(rng.standard_normal(shape))
    n = shape[0]
    tp = torch.tensor(pred.reshape(n, -1), dtype=torch.float64, requires_grad=True)
    tt = torch.tensor(target.reshape(n, -1), dtype=torch.float64)
    if normTarget:
        tt = torch.softmax(tt, dim=1)
    loss = torch.nn.functional.kl_div(torch.log_softmax(tp, dim=1), tt, reduction="batchmean")
    loss.backward()
    error, grad = KLDivergence(normTarget=normTarget)(pred, target)
    assert error == pytest.approx(loss.item(), rel=1e-11, abs=1e-13)
    np.testing.assert_allclose(grad, -tp.grad.numpy().reshape(shape), rtol=1e-10, atol=1e-14)


def test_torch_oracle_labels():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(51)
    pred = rng.standard_normal((7, 5))
    labels = rng.integers(0, 5, size=7)
    tp = torch.tensor(pred, requires_grad=True)
    loss = torch.nn.functional.cross_entropy(tp, torch.tensor(labels))
    loss.backward()
    error, grad = KLDivergence()(pred, labels)
    assert error == pytest.approx(loss.item(), rel=1e-11)
    np.testing.assert_allclose(grad, -tp.grad.numpy(), rtol=1e-10, atol=1e-14)
