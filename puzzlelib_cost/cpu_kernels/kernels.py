"""The compiled CPU blocks (see __init__): each replaces one NumPy block function, with its
arguments, and computes what it computes.

A block is walked in chunks of CHUNK elements: a loop writes the chunk's float32 terms to a small
buffer that stays in L1, sum64 adds them in float64.  Loops read at most three arrays each and run
over chunk views from index 0 (measured: numba gives LLVM no no-alias guarantee, and a loop over
four arrays, or from a non-zero start, was not vectorised and ran 4-9x slower).  All are nogil:
the NumPy backend's helper threads run blocks side by side.
"""
import math

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic

from . import CACHE
from .vmath import exp32, log1p32, log32

# numba keys a file's cached machine code to that file's text alone, though the code holds what
# it calls from other files too: with vmath.py or kernels.py changed, a cache kept running their
# old code (the two-thread rows, row_pool's, missed a fence fix in kernels.py and gave E = inf
# where it is 0).  So each cached file names the sha256 (16 hex digits) of every file it
# compiles in, and its own text changes with theirs (tests/test_cpu_kernels.py checks, and says
# what to write here).
COMPILED_IN = {"vmath.py": "7689b6e9d4b45915"}

F = np.float32
CHUNK = 1024
NEG_INF = F(-np.inf)
# error_model="numpy": a division by zero gives inf/NaN instead of raising; cache: the machine
# code is kept beside this file (__pycache__), so later processes skip the compile; fastmath
# "contract" alone: a * b + c may become one fused multiply-add (one rounding instead of two, as
# nvcc does on the GPU), which made the exp-bound rows 20-35 % faster (256 x 1000: labels 0.53 ->
# 0.34-0.38 ms, probabilities 0.84 -> 0.68-0.71 ms); NaN, inf and the order of sums are untouched.
OPTIONS = dict(error_model="numpy", boundscheck=False, nogil=True, cache=CACHE, fastmath={"contract"})


@njit(**OPTIONS)
def ready():
    """1: numba's first call in a process sets up its registries, which a Ctrl-C there leaves half
    set up for the rest of the process (cpu_kernels.compiled calls this first, where a failure
    falls back to NumPy's blocks)."""
    return 1


@intrinsic
def _maxnum(typingctx, a, b):
    """LLVM's maxnum (vectorises, unlike a compare and select); it drops a NaN operand, but a NaN in
    a row still reaches every output through that row's sum of exponentials."""
    if not (a == b and isinstance(a, types.Float)):
        return None

    def codegen(context, builder, sig, args):
        kind = args[0].type
        function = builder.module.declare_intrinsic("llvm.maxnum", [kind], ir.FunctionType(kind, [kind, kind]))
        return builder.call(function, args)
    return a(a, b), codegen


@njit(**dict(OPTIONS, fastmath={"reassoc", "contract"}))
def sum64(terms, n):
    """The float64 sum of terms[:n] (float32 or float64).  'reassoc' lets LLVM vectorise it (several partial
    sums); the order is then fixed by the compiled code, not by the data or the thread count."""
    total = 0.0
    for j in range(n):
        total += np.float64(terms[j])
    return total


# --- KLDivergence's rows (row_softmax._kl_block) -------------------------------------------
# A row arrives here as x / T, each product x * (1 / T) rounded and stored on its own (_scaled),
# or as x itself where T = 1.  Under 'contract', x * inv_t - m in one loop became one fused
# multiply-add: the exact product less the max of the rounded ones left the row's largest value
# a residual of up to half an ulp of x / T, where NumPy and the GPU get exactly 0 (E = -inf once
# |x / T| >= 2^31, and log q at q ~ 1 off by that residual: logits [1e8, 0, -1e8] at T = 0.7 gave
# E = 5.7 against q's own one-hot p).  An arithmetic fence in each loop fixed it at 2.5x the
# time of the probabilities' rows (their log loop no longer vectorised); a stored product costs
# one pass over a row that stays in L1.

@njit(**OPTIONS)
def _scaled(x, inv_t, out):
    """x / T: x itself when T = 1, else out[j] = x[j] * inv_t, each product rounded (stored)."""
    if inv_t == F(1.0):
        return x
    for j in range(x.size):
        out[j] = x[j] * inv_t
    return out


@njit(**OPTIONS)
def _row_max(x):
    m = NEG_INF
    for j in range(x.size):
        m = _maxnum(m, x[j])
    return m


@njit(**OPTIONS)
def _exp_sum(x, m, out):
    """out = exp(x - m) in float32 (x a row of x / T); returns its sum in float64."""
    total = 0.0
    for c0 in range(0, x.size, CHUNK):
        xs, outs = x[c0:c0 + CHUNK], out[c0:c0 + CHUNK]
        for j in range(xs.size):
            outs[j] = exp32(xs[j] - m)
        total += sum64(outs, outs.size)
    return total


@njit(**OPTIONS)
def kl_rows_probabilities(x, p, inv_t, grad_scale, grad, row_error):
    """Rows x (n, C) float32 against probabilities p: row_error[i] = sum p (log p - log q),
    0 where p = 0; grad = (p - s q) * grad_scale, s = sum p (-dE/dx, PuzzleLib's p - q where the
    row sums to 1), q s = exp(x / T - max) (s / z) (grad's rows first hold exp(x / T - max))."""
    terms = np.empty(CHUNK, F)
    scaled = np.empty(x.shape[1], F)
    for r in range(x.shape[0]):
        xr, pr, gr = _scaled(x[r], inv_t, scaled), p[r], grad[r]
        m = _row_max(xr)
        s = _exp_sum(xr, m, gr)
        log_s, q_scale = F(math.log(s)), F(sum64(pr, pr.size) / s)
        error = 0.0
        for c0 in range(0, xr.size, CHUNK):
            xs, ps, gs = xr[c0:c0 + CHUNK], pr[c0:c0 + CHUNK], gr[c0:c0 + CHUNK]
            for j in range(xs.size):
                terms[j] = log32(ps[j]) - ((xs[j] - m) - log_s)   # log p - log q
            for j in range(xs.size):
                pj = ps[j]
                term = pj * terms[j]
                terms[j] = F(0.0) if pj == F(0.0) else term   # 0 log 0 = 0; a NaN p stays NaN
                gs[j] = (pj - gs[j] * q_scale) * grad_scale
            error += sum64(terms, xs.size)
        row_error[r] = error


@njit(**OPTIONS)
def kl_rows_logits(x, t, inv_t, grad_scale, grad, row_error):
    """kl_rows_probabilities for a target of logits (normTarget): p = softmax(t / T)."""
    terms = np.empty(CHUNK, F)
    p = np.empty(x.shape[1], F)
    scaled_x, scaled_t = np.empty(x.shape[1], F), np.empty(x.shape[1], F)
    for r in range(x.shape[0]):
        xr, tr, gr = _scaled(x[r], inv_t, scaled_x), _scaled(t[r], inv_t, scaled_t), grad[r]
        mt = _row_max(tr)
        st = _exp_sum(tr, mt, p)                      # p = exp(t / T - max) for now
        log_st, inv_st = F(math.log(st)), F(1.0 / st)
        m = _row_max(xr)
        s = _exp_sum(xr, m, gr)
        log_s, inv_s = F(math.log(s)), F(1.0 / s)
        error = 0.0
        for c0 in range(0, xr.size, CHUNK):
            xs, ts, gs, ps = xr[c0:c0 + CHUNK], tr[c0:c0 + CHUNK], gr[c0:c0 + CHUNK], p[c0:c0 + CHUNK]
            for j in range(xs.size):
                terms[j] = ((ts[j] - mt) - log_st) - ((xs[j] - m) - log_s)
            for j in range(xs.size):
                pj = ps[j] * inv_st
                term = pj * terms[j]
                terms[j] = F(0.0) if pj == F(0.0) else term
                gs[j] = (pj - gs[j] * inv_s) * grad_scale
            error += sum64(terms, xs.size)
        row_error[r] = error


@njit(**OPTIONS)
def kl_rows_labels(x, labels, w, inv_t, grad_scale, grad, row_error):
    """Rows against one-hot targets, row i weighted by w[i] (a class weight, which multiplies even
    a NaN row's outputs; label -1: an ignored row, whose outputs are exactly 0): row_error =
    w (log sum_c exp(x_c / T - m) - (x[label] / T - m)), m the row's maximum of x / T;
    grad = w (onehot - q) grad_scale."""
    scaled = np.empty(x.shape[1], F)
    for r in range(x.shape[0]):
        gr, wr = grad[r], w[r]
        if labels[r] < 0:
            gr[:] = F(0.0)
            row_error[r] = 0.0
            continue
        xr = _scaled(x[r], inv_t, scaled)
        m = _row_max(xr)
        s = _exp_sum(xr, m, gr)
        scale = F(-wr * grad_scale / s)
        for j in range(gr.size):
            gr[j] = gr[j] * scale
        label = labels[r]
        gr[label] += F(wr * grad_scale)
        row_error[r] = wr * (math.log(s) - np.float64(xr[label] - m))


# --- reverse KL and JSD (row_softmax._divergence_block) -------------------------------------
# Both need the row's S = sum q g before the gradient q (S - g) (row_softmax says why): one pass
# for the terms, S and g (kept in a row buffer), one for the gradient.  The target comes in row
# buffers: log p, and p itself for JSD.  (The first pass's loop spans seven arrays, against the
# three-array rule above; measured, reverse KL still costs what forward KL does an element, and
# JSD 3-11x less than NumPy's block: splitting it is left to try.)

HEAVY_Q = 0.75   # a row's heavy class: q above this (row_softmax.HEAVY_Q; DIVERGENCE_HEAVY_Q in kl_divergence.cu)
REVERSE = 1      # the divergence kinds (row_softmax.REVERSE); every other kind here is JSD (2)


@njit(**OPTIONS)
def _divergence_row(x, p, log_p, kind, beta, grad_scale, q, g):
    """One row x / T of reverse KL (kind REVERSE) or JSD (any other kind, beta) against p and
    log p: returns the row's error and writes grad = q (S - g) * grad_scale into q (g: a row of
    scratch); a zero q adds nothing and gets a zero gradient, a zero p adds no term of its own."""
    m = _row_max(x)
    s_x = _exp_sum(x, m, q)                            # q = exp(x / T - max) for now
    log_s, inv_s = F(math.log(s_x)), F(1.0 / s_x)
    b, one_minus_b, log_b = F(beta), F(1.0 - beta), F(math.log(beta))
    shift = F(math.log(beta) - math.log1p(-beta))      # y = shift + log p - log q = log(beta p / ((1 - beta) q))
    q_shift = F(-(1.0 - beta) * math.log1p(-beta))     # g + q_shift is 0 where p = 0 (row_softmax)
    error = 0.0
    light_qg_sum, light_q_sum = 0.0, 0.0              # S - g_i = R + (g_h - g_i) (row_softmax)
    heavy_g = NEG_INF
    terms = np.empty(CHUNK, F)
    light_qg, light_q = np.empty(CHUNK, F), np.empty(CHUNK, F)
    for c0 in range(0, x.size, CHUNK):
        xs, ps, lps = x[c0:c0 + CHUNK], p[c0:c0 + CHUNK], log_p[c0:c0 + CHUNK]
        qs, gs = q[c0:c0 + CHUNK], g[c0:c0 + CHUNK]
        for j in range(xs.size):
            log_q = (xs[j] - m) - log_s
            qj = qs[j] * inv_s
            qs[j] = qj
            if kind == REVERSE:                           # g = log q - log p
                gj = log_q - lps[j]
                q_term = qj * gj
                p_term = F(0.0)
            else:                                         # g = -(1 - beta) softplus(y)
                y = (lps[j] - log_q) + shift
                tail = log1p32(exp32(-abs(y)))            # softplus(+-y) = max(+-y, 0) + tail
                gj = -one_minus_b * (_maxnum(y, F(0.0)) + tail)
                q_term = qj * (gj + q_shift)
                # beta p log(p / m) = beta p (-softplus(-y) - log beta), finite where q = 0 (y = inf)
                p_term = b * ps[j] * ((min(y, F(0.0)) - tail) - log_b)
                p_term = F(0.0) if ps[j] == F(0.0) else p_term
            gs[j] = gj
            terms[j] = p_term if qj == F(0.0) else q_term + p_term
            heavy = qj > F(HEAVY_Q)
            light_qg[j] = F(0.0) if heavy or qj == F(0.0) else qj * gj
            light_q[j] = F(0.0) if heavy else qj
        error += sum64(terms, xs.size)
        light_qg_sum += sum64(light_qg, xs.size)
        light_q_sum += sum64(light_q, xs.size)
    for j in range(x.size):   # (its own loop: kept in the one above, it stopped that loop's vectors, JSD 8x slower)
        if q[j] > F(HEAVY_Q):
            heavy_g = g[j]
    heavy_g = heavy_g if math.isfinite(heavy_g) else F(0.0)
    r = F(light_qg_sum - np.float64(heavy_g) * light_q_sum)
    for j in range(x.size):
        qj = q[j]
        q[j] = F(0.0) if qj == F(0.0) else qj * (r + (heavy_g - g[j])) * grad_scale
    return error


@njit(**OPTIONS)
def divergence_rows_probabilities(x, p, kind, beta, inv_t, grad_scale, grad, row_error):
    """Reverse KL or JSD of rows x (n, C) against probabilities p (see _divergence_row)."""
    log_p = np.empty(x.shape[1], F)
    g = np.empty(x.shape[1], F)
    scaled = np.empty(x.shape[1], F)
    for r in range(x.shape[0]):
        pr = p[r]
        for j in range(pr.size):
            log_p[j] = log32(pr[j])
        row_error[r] = _divergence_row(_scaled(x[r], inv_t, scaled), pr, log_p, kind, beta, grad_scale, grad[r], g)


@njit(**OPTIONS)
def divergence_rows_logits(x, t, kind, beta, inv_t, grad_scale, grad, row_error):
    """Reverse KL or JSD against p = softmax(t / T) (normTarget)."""
    p = np.empty(x.shape[1], F)
    log_p = np.empty(x.shape[1], F)
    g = np.empty(x.shape[1], F)
    scaled_x, scaled_t = np.empty(x.shape[1], F), np.empty(x.shape[1], F)
    for r in range(x.shape[0]):
        tr = _scaled(t[r], inv_t, scaled_t)
        mt = _row_max(tr)
        log_st = F(math.log(_exp_sum(tr, mt, p)))
        for j in range(tr.size):
            log_p[j] = (tr[j] - mt) - log_st
        for j in range(tr.size):
            p[j] = exp32(log_p[j])
        row_error[r] = _divergence_row(_scaled(x[r], inv_t, scaled_x), p, log_p, kind, beta, grad_scale, grad[r], g)


@njit(**OPTIONS)
def divergence_rows_labels(x, labels, w, kind, beta, inv_t, grad_scale, grad, row_error):
    """JSD against one-hot rows, row i weighted by w[i] (0: an ignored row, whose outputs are
    exactly 0); grad_scale float64."""
    p = np.empty(x.shape[1], F)
    log_p = np.empty(x.shape[1], F)
    g = np.empty(x.shape[1], F)
    scaled = np.empty(x.shape[1], F)
    for r in range(x.shape[0]):
        if w[r] == 0.0:
            grad[r][:] = F(0.0)
            row_error[r] = 0.0
            continue
        p[:] = F(0.0)
        log_p[:] = NEG_INF
        p[labels[r]] = F(1.0)
        log_p[labels[r]] = F(0.0)
        row_error[r] = w[r] * _divergence_row(_scaled(x[r], inv_t, scaled), p, log_p, kind, beta,
                                              F(w[r] * grad_scale), grad[r], g)


# --- elementwise costs (elementwise_costs: MSE, Abs, SmoothL1, BCE's and Hinge's blocks) ------------
# The pair costs take d = a - b and its terms in float64 (a - b of two finite floats can pass
# float32's range, and d^2 does from |d| = 1.8e19) and round the grad, scaled by a float64
# grad_scale, to float32 once: the kernels' WIDE ops (elementwise.cu), and elementwise_costs' wide().
# Each chunk through views of it: indexed as a[c0 + j], the loops ran 9x slower.

@njit(**OPTIONS)
def mse_block(a, b, grad_scale, grad):
    """MSE's terms d^2, d = a - b, summed in float64; grad = -d * grad_scale."""
    terms = np.empty(CHUNK, np.float64)
    total = 0.0
    for c0 in range(0, a.size, CHUNK):
        ac, bc, gc = a[c0:c0 + CHUNK], b[c0:c0 + CHUNK], grad[c0:c0 + CHUNK]
        n = ac.size
        for j in range(n):
            d = np.float64(ac[j]) - np.float64(bc[j])
            terms[j] = d * d
            gc[j] = F(d * -grad_scale)
        total += sum64(terms, n)
    return total


@njit(**OPTIONS)
def abs_block(a, b, grad_scale, grad):
    """Abs's terms |d|, d = a - b, summed in float64; grad = -sign(d) * grad_scale, sign(0) = 0,
    NaN kept."""
    terms = np.empty(CHUNK, np.float64)
    total = 0.0
    for c0 in range(0, a.size, CHUNK):
        ac, bc, gc = a[c0:c0 + CHUNK], b[c0:c0 + CHUNK], grad[c0:c0 + CHUNK]
        n = ac.size
        for j in range(n):
            d = np.float64(ac[j]) - np.float64(bc[j])
            terms[j] = abs(d)
            gc[j] = F(-grad_scale if d > 0.0 else (grad_scale if d < 0.0 else d * 0.0))   # 0 and NaN kept
        total += sum64(terms, n)
    return total


@njit(**OPTIONS)
def smoothl1_block(a, b, grad_scale, grad):
    """SmoothL1's terms c (d - c / 2), c = clip(d, -1, 1), d = a - b, summed in float64;
    grad = -c * grad_scale (a NaN d stays NaN)."""
    terms = np.empty(CHUNK, np.float64)
    total = 0.0
    for c0 in range(0, a.size, CHUNK):
        ac, bc, gc = a[c0:c0 + CHUNK], b[c0:c0 + CHUNK], grad[c0:c0 + CHUNK]
        n = ac.size
        for j in range(n):
            d = np.float64(ac[j]) - np.float64(bc[j])
            c = 1.0 if d > 1.0 else (-1.0 if d < -1.0 else d)
            terms[j] = (d - c * 0.5) * c
            gc[j] = F(c * -grad_scale)
        total += sum64(terms, n)
    return total


@njit(**OPTIONS)
def bce_block(s, y, grad_scale, grad):
    """BCE's terms softplus(z), z = (1 - 2y) s, for logits s and integer labels y, summed in float64;
    grad = (y - sigmoid(s)) * grad_scale, taken as (2y - 1) sigmoid(z) (1 - sigmoid(s) = sigmoid(-s):
    never a difference, which cancelled).  e = exp(-|s|) <= 1 never overflows."""
    terms = np.empty(CHUNK, F)
    total = 0.0
    for c0 in range(0, s.size, CHUNK):
        ss, ys, gs = s[c0:c0 + CHUNK], y[c0:c0 + CHUNK], grad[c0:c0 + CHUNK]
        for j in range(ss.size):                            # (three arrays a loop: see the docstring)
            e = exp32(-abs(ss[j]))
            terms[j] = log1p32(e)
            gs[j] = e
        for j in range(ss.size):                            # softplus(z) = max(z, 0) + log1p(exp(-|z|)), |z| = |s|
            z = (F(1.0) - F(2.0) * F(ys[j])) * ss[j]
            terms[j] += z if z > F(0.0) else F(0.0)
            gs[j] = (F(1.0) if z >= F(0.0) else gs[j]) / (F(1.0) + gs[j])   # sigmoid(z); NaN stays NaN
        for j in range(ss.size):
            gs[j] = (F(2.0) * F(ys[j]) - F(1.0)) * gs[j] * grad_scale
        total += sum64(terms, ss.size)
    return total


@njit(**OPTIONS)
def hinge_block(s, y, grad_scale, grad):
    """Hinge's terms max(0, m), m = 1 - s y for integer labels y in {-1, 0, 1}, summed in float64;
    grad = y * grad_scale where m > 0, else 0; a NaN m gives a NaN term and gradient."""
    terms = np.empty(CHUNK, F)
    total = 0.0
    for c0 in range(0, s.size, CHUNK):
        ss, ys, gs = s[c0:c0 + CHUNK], y[c0:c0 + CHUNK], grad[c0:c0 + CHUNK]
        for j in range(ss.size):
            yj = F(ys[j])
            m = F(1.0) - ss[j] * yj
            terms[j] = F(0.0) if m <= F(0.0) else m                      # (NaN <= 0 is false: NaN kept)
            gs[j] = yj * grad_scale if m > F(0.0) else (F(0.0) if m <= F(0.0) else m)
        total += sum64(terms, ss.size)
    return total


# --- CrossEntropy on spatial scores (cross_entropy._numpy's blocks; kernels/cross_entropy.cu's twin) ---

@njit(**OPTIONS)
def cross_entropy_strided_block(x, labels, w, scale, n0, n1, s0, s1, grad, grad_n0, grad_s0):
    """The block x[n0:n1, :, s0:s1] of float32 scores x (N, C, S) (positions contiguous, classes S
    apart), labels (N, 1, S), class weights w (C,): per position m = max over C, z = sum exp(x - m),
    error w_y (log z - (x_y - m)) summed in float64 (returned); grad[i - grad_n0, c, s - grad_s0]
    = (onehot - exp(x - m) / z) w_y scale.  Whole arrays and bounds rather than a block's view, so
    that numba sees unit strides; positions go CHUNK at a time, a class's run one vectorised loop."""
    m, z, factor = np.empty(CHUNK, F), np.empty(CHUNK, F), np.empty(CHUNK, F)
    total = 0.0
    for i in range(n0, n1):
        gi = i - grad_n0
        for p0 in range(s0, s1, CHUNK):
            k = min(CHUNK, s1 - p0)
            g0 = p0 - grad_s0
            ms, zs, fs = m[:k], z[:k], factor[:k]
            ms[:] = NEG_INF
            for c in range(x.shape[1]):
                xc = x[i, c, p0:p0 + k]
                for j in range(k):
                    ms[j] = _maxnum(ms[j], xc[j])   # (a NaN score reaches z through its exponential)
            zs[:] = F(0.0)
            for c in range(x.shape[1]):
                xc, gc = x[i, c, p0:p0 + k], grad[gi, c, g0:g0 + k]
                for j in range(k):
                    gc[j] = exp32(xc[j] - ms[j])
                for j in range(k):
                    zs[j] += gc[j]
            for j in range(k):   # the label's terms; then every class's factor -w_y scale / z
                y = labels[i, 0, p0 + j]
                w_y = w[y]
                total += np.float64(w_y) * np.float64(log32(zs[j]) - (x[i, y, p0 + j] - ms[j]))
                inv_z = F(1.0) / zs[j]
                ws = w_y * scale
                fs[j] = inv_z * -ws
                zs[j] = (F(1.0) - grad[gi, y, g0 + j] * inv_z) * ws   # the label's gradient, kept in z
            for c in range(x.shape[1]):
                gc = grad[gi, c, g0:g0 + k]
                for j in range(k):
                    gc[j] *= fs[j]
            for j in range(k):
                grad[gi, labels[i, 0, p0 + j], g0 + j] = zs[j]
    return total
