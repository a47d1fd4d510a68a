"""Independent float64 NumPy reference for KLDivergence.

This module never imports ``puzzlelib_cost``: every number the tests compare the
library against is computed here, in float64, from the exact values of the
inputs (a float16/float32 input converts to float64 exactly, so the only
differences left are the library's own rounding).

Definitions (per sample ``n``, all non-batch dims flattened):

* ``log q = log_softmax(pred[n])`` computed with max subtraction, so a finite
  logit never gives ``log q = -inf`` even where ``q`` underflows to 0;
* ``p = target[n]`` (a distribution), ``softmax(target[n])`` when
  ``normTarget``, or ``one_hot(label[n])`` for integer class-index targets;
* ``KL(p || q) = sum_i p_i (log p_i - log q_i)`` with ``0 * log 0 = 0``;
* mean error = ``sum_n KL_n / N``; grad = ``(p - s q) / N`` with ``s = sum_i p_i``
  (the NEGATIVE gradient of the mean error w.r.t. pred: PuzzleLib's ``(p - q) / N``
  where a row of p sums to 1).
"""

import numpy as np

# Unit roundoffs (half an ulp of 1.0) of the float types the library accepts.
UNIT_ROUNDOFF = {
    np.dtype(np.float16): 2.0 ** -11,   # ~4.9e-4
    np.dtype(np.float32): 2.0 ** -24,   # ~6.0e-8
    np.dtype(np.float64): 2.0 ** -53,   # ~1.1e-16
}


def as_2d(x):
    """(N, ...) -> (N, prod(...)) float64 copy."""
    x = np.asarray(x)
    return np.array(x, dtype=np.float64).reshape(x.shape[0], -1)


def log_softmax(x2d):
    """Row-wise log-softmax in float64 via max subtraction.

    A row containing NaN or +inf, or a row that is all -inf, gives NaN
    (inf - inf and NaN propagate through the max); a single -inf entry gives
    log q = -inf there and is otherwise harmless.
    """
    x = np.asarray(x2d, dtype=np.float64)
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        m = np.max(x, axis=1, keepdims=True)
        z = x - m
        lse = np.log(np.sum(np.exp(z), axis=1, keepdims=True))
        return z - lse


def softmax(x):
    """Softmax over all non-batch dims of x (float64), same shape as x."""
    x = np.asarray(x)
    return np.exp(log_softmax(as_2d(x))).reshape(x.shape)


def target_distribution(target, pred_shape, normTarget=False):
    """Return (p, log p), both float64 of shape (N, D)."""
    t = np.asarray(target)
    n = pred_shape[0]
    if np.issubdtype(t.dtype, np.integer):
        c = int(np.prod(pred_shape[1:]))
        p = np.zeros((n, c), dtype=np.float64)
        p[np.arange(n), t.astype(np.int64)] = 1.0
        with np.errstate(divide="ignore"):
            logp = np.log(p)
        return p, logp
    if normTarget:
        logp = log_softmax(as_2d(t))
        return np.exp(logp), logp
    p = as_2d(t)
    with np.errstate(divide="ignore", invalid="ignore"):
        logp = np.log(p)
    return p, logp


def kl_reference(pred, target, normTarget=False):
    """Float64 reference. Returns a dict with

    error      -- mean over samples of KL(p||q) (Python float)
    per_sample -- (N,) per-sample KL
    grad       -- (p - s q) / N reshaped like pred, float64 (s: each row's sum of p)
    p, q, logp, logq -- (N, D) float64
    """
    pred = np.asarray(pred)
    n = pred.shape[0]
    logq = log_softmax(as_2d(pred))
    q = np.exp(logq)
    p, logp = target_distribution(target, pred.shape, normTarget)
    with np.errstate(invalid="ignore", over="ignore"):
        # 0 * log 0 = 0; p == 0 is False for NaN p, so NaN propagates.
        terms = np.where(p == 0, 0.0, p * (logp - logq))
        per_sample = terms.sum(axis=1)
        error = float(per_sample.sum() / n)
        grad = ((p - p.sum(axis=1, keepdims=True) * q) / n).reshape(pred.shape)
    return dict(error=error, per_sample=per_sample, grad=grad,
                p=p, q=q, logp=logp, logq=logq, n=n)


def term_magnitude(ref):
    """(sum |p log p| + sum |p log q| + sum p) / N over the finite terms.

    The absolute rounding error of the mean error is a few unit roundoffs
    times this: each term p*(log p - log q) is computed from log p and log q
    whose absolute errors are ~u*|log p|, ~u*|log q| plus ~u from the
    log-sum-exp (the sum of exp(z) >= 1 is rounded, log of it is off by ~u),
    and the final sum adds ~u per term.
    """
    p, logp, logq = ref["p"], ref["logp"], ref["logq"]
    with np.errstate(invalid="ignore", over="ignore"):
        a = np.where(p > 0, np.abs(p * logp), 0.0)
        b = np.where(p > 0, np.abs(p * logq), 0.0)
    tot = np.nansum(a[np.isfinite(a)]) + np.nansum(b[np.isfinite(b)]) + np.nansum(np.abs(p))
    return float(tot / ref["n"])


def tolerances(dtype):
    """(rtol, abs_factor) for comparing a library result in ``dtype`` with
    the float64 reference.

    float64: u = 1.1e-16; a handful of operations per element and sums over
        a few hundred elements stay far below 1e-12 relative.
    float32: u = 6e-8; exp/log/sub each add ~u relative, so results agree to
        ~1e-6 relative of the magnitude of the terms involved; rtol 1e-5
        gives a 10x margin on the element-wise relative error.
    float16: u = 4.9e-4; the grad is rounded to float16 at the end (~5e-4
        relative) and intermediate values may be float16 too, so ~4u.
    """
    dtype = np.dtype(dtype)
    if dtype == np.float64:
        return 1e-11, 1e-12
    if dtype == np.float32:
        return 1e-5, 1e-6
    if dtype == np.float16:
        return 4e-3, 4e-3
    raise ValueError(dtype)


def error_tol(ref, dtype):
    """Absolute tolerance for the mean error (see term_magnitude)."""
    rtol, fac = tolerances(dtype)
    return rtol * abs(ref["error"]) + fac * term_magnitude(ref) if np.isfinite(ref["error"]) else 0.0


def grad_atol(ref, dtype):
    """Absolute tolerance for the grad: an element is (p - q)/N where the
    absolute error of q is ~u*max(p, q) (q = exp(log q), and q*|log q| <= 1/e
    bounds the propagated log error), so atol ~ u_eff * max(p, q) / N."""
    _, fac = tolerances(dtype)
    with np.errstate(invalid="ignore"):
        m = np.nanmax(np.maximum(np.abs(ref["p"]), np.abs(ref["q"])))
    return fac * float(m) / ref["n"]


def assert_error_close(err, ref, dtype, what="error"):
    expected = ref["error"]
    if np.isnan(expected):
        assert np.isnan(err), "%s: expected NaN, got %r" % (what, err)
        return
    if np.isinf(expected):
        assert err == expected, "%s: expected %r, got %r" % (what, expected, err)
        return
    tol = error_tol(ref, dtype)
    assert np.isfinite(err), "%s: expected finite %r, got %r" % (what, expected, err)
    assert abs(err - expected) <= tol, (
        "%s: got %.17g, reference %.17g, |diff| %.3g > tol %.3g"
        % (what, err, expected, abs(err - expected), tol))


def assert_grad_close(grad, ref, dtype):
    grad = np.asarray(grad)
    expected = ref["grad"]
    assert grad.shape == expected.shape, (grad.shape, expected.shape)
    rtol, _ = tolerances(dtype)
    atol = grad_atol(ref, dtype)
    np.testing.assert_allclose(grad.astype(np.float64), expected, rtol=rtol, atol=atol,
                               equal_nan=True)


def finite_difference_grad(f, x, h=1e-5):
    """Central differences of scalar f at float64 array x (same shape as x).

    Truncation error ~h^2/6 * |f'''| ~ 1e-11 for these O(1) smooth functions,
    rounding error ~u*|f|/h ~ 1e-11: the result is good to ~1e-9 absolute.
    """
    x = np.array(x, dtype=np.float64)
    g = np.zeros_like(x)
    flat = x.reshape(-1)
    gflat = g.reshape(-1)
    for i in range(flat.size):
        old = flat[i]
        flat[i] = old + h
        fp = f(x.copy())
        flat[i] = old - h
        fm = f(x.copy())
        flat[i] = old
        gflat[i] = (fp - fm) / (2 * h)
    return g
