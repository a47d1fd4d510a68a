"""Independent float64 NumPy references for the costs of puzzlelib_cost (KLDivergence's own is
tests/reference.py; its distillation tests share softmax_and_target below), and the tolerances
and the checked call the cost tests compare with.

Never imports puzzlelib_cost.  Every function takes the inputs as given (a 16-bit or float32
array converts to float64 exactly, so the reference sees the very values the library sees) and
returns a dict:

    error  -- E, the mean error a call reports (Python float)
    grad   -- -dE/dpred, float64, shaped like pred (a list [g1, g2] for L1Hinge)
    val    -- what validate() returns
    scale  -- the size of the terms whose rounding the library's E carries (for the error tolerance)

Notation: N = shape[0], C = shape[1], S = prod(shape[2:]), D = prod(shape[1:]), M = N*D.
"""
import numpy as np

try:
    import ml_dtypes
    BF16 = np.dtype(ml_dtypes.bfloat16)
except ImportError:  # pragma: no cover - ml_dtypes is a test dependency
    BF16 = None

F16, F32, F64 = np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64)
FLOAT_DTYPES = [F32, F64, F16] + ([BF16] if BF16 is not None else [])
INT_DTYPES = [np.int8, np.uint8, np.int16, np.uint16, np.int32, np.uint32, np.int64, np.uint64]


def f64(x):
    return np.asarray(x).astype(np.float64)


def _sign(x):
    """sign with sign(0) = 0 and sign(NaN) = NaN (numpy's)."""
    return np.sign(x)


def _result(error, grad, val=None, scale=None):
    error = float(error)
    return dict(error=error, grad=grad, val=error if val is None else float(val),
                scale=abs(error) if scale is None else float(scale))


# ------------------------------------------------------------------ elementwise costs

def abs_ref(pred, target):
    d = f64(pred) - f64(target)
    m = d.size
    return _result(np.abs(d).sum() / m, -_sign(d) / m)


def mse_ref(pred, target):
    d = f64(pred) - f64(target)
    m = d.size
    return _result((d * d).sum() / (2 * m), -d / m)


def smoothl1_ref(pred, target):
    d = f64(pred) - f64(target)
    m = d.size
    a = np.abs(d)
    inside = a < 1
    with np.errstate(invalid="ignore"):
        terms = np.where(inside, 0.5 * d * d, a - 0.5)
        grad = np.where(inside, -d, -_sign(d)) / m
    grad[np.isnan(d)] = np.nan
    return _result(terms.sum() / m, grad)


def sigmoid(s):
    s = f64(s)
    with np.errstate(over="ignore"):
        e = np.exp(-np.abs(s))           # in (0, 1]: never overflows
        return np.where(s >= 0, 1 / (1 + e), e / (1 + e))


def bce_ref(scores, labels):
    s = f64(scores)
    y = f64(np.asarray(labels).astype(np.int64)).reshape(s.shape)
    m = s.size
    with np.errstate(over="ignore", invalid="ignore"):
        terms = np.maximum(s, 0) - s * y + np.log1p(np.exp(-np.abs(s)))
        wrong = np.where(y == 1, s <= 0, s > 0)
    return _result(terms.sum() / m, (y - sigmoid(s)) / m, val=wrong.mean(),
                   scale=(np.abs(s).sum() + m * np.log(2)) / m if np.all(np.isfinite(s)) else None)


def hinge_ref(scores, labels):
    s = f64(scores)
    y = f64(np.asarray(labels).astype(np.int64))
    n, c = s.shape
    sy = s * y
    with np.errstate(invalid="ignore"):
        terms = np.maximum(0.0, 1 - sy)
        grad = np.where(sy < 1, y, 0.0) / (n * c)
    grad[np.isnan(sy)] = np.nan
    return _result(terms.sum() / (n * c), grad)


def l1hinge_ref(x1, x2, labels):
    shape = np.asarray(x1).shape
    n = shape[0]
    a, b = f64(x1).reshape(n, -1), f64(x2).reshape(n, -1)
    d = a - b
    dim = d.shape[1]
    y = np.asarray(labels).astype(np.int64).reshape(n, 1)
    ad = np.abs(d)
    with np.errstate(invalid="ignore"):
        terms = np.where(y == 1, ad, np.maximum(0.0, 1 - ad))
        g = np.where(y == 1, -_sign(d), np.where(ad < 1, _sign(d), 0.0)) / (n * dim)
        g[np.isnan(d)] = np.nan
        val = ((ad.mean(axis=1) <= 1) != (y[:, 0] == 1)).mean()
    g = g.reshape(shape)
    return _result(terms.sum() / (n * dim), [g, -g], val=val)


# ------------------------------------------------------------------ class-score costs

def _classes_last(scores):
    """(N, C, ...) -> (N*S, C) float64, the rows in the order of labels.ravel()."""
    s = f64(scores)
    return np.moveaxis(s, 1, -1).reshape(-1, s.shape[1])


def _back(rows, shape):
    """Inverse of _classes_last."""
    n, c = shape[0], shape[1]
    return np.moveaxis(rows.reshape((n,) + tuple(shape[2:]) + (c,)), -1, 1)


def top1_error(scores, labels):
    """Error rate of argmax over dim 1 (first max wins, as np.argmax) against the labels."""
    rows = _classes_last(scores)
    lab = np.asarray(labels).astype(np.int64).ravel()
    return float((np.argmax(rows, axis=1) != lab).mean())


def svm_ref(scores, labels, mode="l1"):
    shape = np.asarray(scores).shape
    rows = _classes_last(scores)
    lab = np.asarray(labels).astype(np.int64).ravel()
    r, c = rows.shape                       # r = N*S
    cls = -np.ones_like(rows)
    cls[np.arange(r), lab] = 1.0
    with np.errstate(invalid="ignore"):
        h = np.maximum(0.0, 1 - rows * cls)
        if mode == "l1":
            terms, grad = h, np.where(h > 0, cls, 0.0) / (r * c)
        else:
            terms, grad = h * h, 2 * h * cls / (r * c)
    grad[np.isnan(rows)] = np.nan
    return _result(terms.sum() / (r * c), _back(grad, shape), val=top1_error(scores, labels))


def rng_for(*key):
    """A generator seeded from `key` (any repr-able values): the same data in every process."""
    import zlib
    return np.random.default_rng(zlib.crc32(repr(key).encode()))


def log_softmax_rows(rows):
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        m = rows.max(axis=1, keepdims=True)
        z = rows - m
        return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def ce_ref(scores, labels, weights=None):
    shape = np.asarray(scores).shape
    rows = _classes_last(scores)
    lab = np.asarray(labels).astype(np.int64).ravel()
    r, c = rows.shape
    w = np.ones(c) if weights is None else f64(weights)
    wy = w[lab]
    logp = log_softmax_rows(rows)
    p = np.exp(logp)
    onehot = np.zeros_like(rows)
    onehot[np.arange(r), lab] = 1.0
    with np.errstate(invalid="ignore"):
        lp_y = logp[np.arange(r), lab]
        error = -(wy * lp_y).sum() / r
        grad = wy[:, None] * (onehot - p) / r
        # rounding of lse - s_y: each term is off by ~u * (|s_y| + |max| + log C)
        fin = np.where(np.isfinite(rows), np.abs(rows), 0.0)
        scale = (np.abs(wy) * (fin[np.arange(r), lab] + fin.max(axis=1) + np.log(c) + 1)).sum() / r
    return _result(error, _back(grad, shape), val=top1_error(scores, labels), scale=scale)


# ------------------------------------------------------------------ tolerances

def error_rtol(dtype):
    """Relative tolerance on E (of max(|E|, scale)): float64 sums and few ops -> 1e-12; 16- and
    32-bit inputs are computed in float32 (u = 6e-8, a few ops per term, float64 sums) -> 1e-6;
    16-bit inputs have been rounded before the reference sees them, so only float32 math is left:
    1e-5 leaves room for float32 intermediates the 16-bit kernels may round to."""
    dtype = np.dtype(dtype)
    return {F64: 1e-12, F32: 1e-6}.get(dtype, 1e-5)


def grad_rtol(dtype):
    """Tolerance on grad relative to max |grad|: float64 ~1e-12; float32 ~1e-5; the 16-bit grads
    are rounded to their type at the end (half an ulp: 2^-9 bf16, 2^-12 f16 of an element, and
    float16 subnormals below 6e-5 have an absolute spacing of 6e-8)."""
    dtype = np.dtype(dtype)
    if dtype == F64:
        return 1e-12
    if dtype == F32:
        return 1e-5
    if dtype == F16:
        return 2e-3
    return 1e-2


def assert_error_close(got, ref, dtype, what="error"):
    want = ref["error"] if what == "error" else ref["val"]
    assert isinstance(got, float), f"{what}: expected a Python float, got {type(got).__name__}"
    if np.isnan(want) or np.isinf(want):
        assert got == want or (np.isnan(want) and np.isnan(got)), f"{what}: expected {want}, got {got}"
        return
    tol = error_rtol(dtype) * max(abs(want), ref["scale"]) + 1e-300
    assert abs(got - want) <= tol, (f"{what}: got {got!r}, reference {want!r}, "
                                    f"|diff| {abs(got - want):.3g} > tol {tol:.3g}")


def assert_grad_close(got, want, dtype):
    got = np.asarray(got)
    assert got.shape == want.shape, (got.shape, want.shape)
    assert got.dtype == np.dtype(dtype), (got.dtype, dtype)
    finite = np.isfinite(want)
    big = float(np.abs(want[finite]).max()) if finite.any() else 0.0
    np.testing.assert_allclose(got.astype(np.float64), want, rtol=0,
                               atol=grad_rtol(dtype) * big + 1e-300, equal_nan=True)


def finite_difference(f, x, indices, h=1e-6):
    """Central differences of scalar f at float64 array x, at the given flat indices."""
    x = np.array(x, dtype=np.float64)
    out = []
    for i in indices:
        xp, xm = x.copy(), x.copy()
        xp.flat[i] += h
        xm.flat[i] -= h
        out.append((f(xp) - f(xm)) / (2 * h))
    return np.array(out)


# --- KLDivergence's distributions, its inputs, and one call checked against a reference -------
# (shared by tests/test_distillation.py, test_divergences.py and test_sparse_teacher.py)

def softmax_and_target(pred, target, T=1.0, normTarget=False, ignoreLabel=None):
    """KLDivergence's distributions in float64 from the inputs as given: z = pred / T per sample
    (flattened), q = softmax(z) and log q; the target p and log p: one-hot for integer labels (the
    rows labelled ignoreLabel all 0, and not counted), softmax(target / T) with normTarget (log p a
    log-softmax, finite where p underflows), else target as given; and the target logits' size per
    row (0 unless normTarget), for the tolerances."""
    pred, target = np.asarray(pred), np.asarray(target)
    n = pred.shape[0]
    z = pred.astype(np.float64).reshape(n, -1) / T
    log_q = log_softmax_rows(z)
    counted, t_mag = np.ones(n, bool), np.zeros(n)
    if np.issubdtype(target.dtype, np.integer):
        labels = target.astype(np.int64)
        if ignoreLabel is not None:
            counted = labels != ignoreLabel
        p = np.zeros_like(z)
        p[np.flatnonzero(counted), labels[counted]] = 1.0
        with np.errstate(divide="ignore"):
            log_p = np.log(p)
    elif normTarget:
        tz = target.astype(np.float64).reshape(n, -1) / T
        log_p = log_softmax_rows(tz)
        p = np.exp(log_p)
        t_mag = np.abs(tz).max(axis=1)
    else:
        p = target.astype(np.float64).reshape(n, -1)
        with np.errstate(divide="ignore"):
            log_p = np.log(p)
    return dict(z=z, log_q=log_q, q=np.exp(log_q), p=p, log_p=log_p, counted=counted, t_mag=t_mag)


def kl_inputs(rng, shape, dtype, kind, label_dtype=np.int32):
    """pred (N, ...) of dtype, and a target: 'dist' a distribution per sample rounded to dtype,
    'norm' logits, 'labels' class indices (N,)."""
    pred = (rng.standard_normal(shape) * 3).astype(dtype)
    n = shape[0]
    if kind == "dist":
        t = rng.standard_normal((n, int(np.prod(shape[1:])))) * 2
        target = np.exp(log_softmax_rows(t)).reshape(shape).astype(dtype)
    elif kind == "norm":
        target = (rng.standard_normal(shape) * 3).astype(dtype)
    else:
        target = rng.integers(0, shape[1], size=n).astype(label_dtype)
    return pred, target


def check_call(place, cost, pred, target, ref, dtype, check_val=True):
    """cost(pred, target) on `place` (a conftest Place) against the reference dict: E, grad (of
    pred's array kind) and, with check_val, validate(); returns (E, grad as a NumPy array)."""
    dpred, dtarget = place.put(pred), place.put(target)
    error, grad = cost(dpred, dtarget)
    if place.device is not None:
        assert place.device.launches, "no kernel ran on the emulated device"
    assert type(grad) is type(dpred)
    assert_error_close(error, ref, dtype)
    g = place.get(grad)
    assert_grad_close(g, ref["grad"], dtype)
    if check_val:
        assert_error_close(cost.validate(dpred, dtarget), ref, dtype, what="val")
    return error, g
