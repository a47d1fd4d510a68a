"""The row-softmax family: KL(p || softmax(pred)) per row, fused with its gradient.

KLDivergence and CrossEntropy (2-D scores) are both this one computation on rows
of C elements, q = softmax(pred row):
    row error = w * sum_i p_i (log p_i - log q_i)     (0 log 0 = 0)
    grad_i    = w * (p_i - s q_i) / (T * N_counted)   (the NEGATIVE gradient; s = sum_i p_i, 1 but
                                                     for a target of probabilities that sums to s)
with q = softmax(pred / T) for a temperature T, p the target distribution,
softmax(target / T) (norm_target), or one-hot at the row's label; w = weights[label]
for weighted labels, 0 for a row whose label is negative (the caller marks the rows to
ignore so), else 1; N_counted the rows not ignored.  This module holds
the NumPy math and the launch plan of kernels/kl_divergence.cu and kernels/kl_cluster.cu.

Kernels (chosen by C, and on sm_90+ by the number of rows: see row_or_cluster, stream_kernel):
  kl_rows_<dtype>_g<G>_e<E>   one pass, a row held in registers by G threads, E elements each
  kl_cluster_<dtype>_t<THREADS>_e<E>   (sm_90+) rows too long for one block: one pass, a row held in
                              the registers of a cluster of CLUSTER blocks (kernels/kl_cluster.cu)
  kl_cluster_stream_<dtype>_t<THREADS>_e<E>   (sm_90+) longer rows: a cluster streams the row in
                              segments for its statistics, then takes them again in reverse
                              from registers, shared memory or (mostly) L2 (reverse KL and JSD:
                              twice, the row's S between)
  kl_chunk_stats_<dtype> + kl_chunk_rows_<dtype> + kl_chunk_grad_<dtype>   longer rows otherwise
                              (double, older GPUs, too few rows to give every SM two blocks of the
                              stream kernel): chunks over many blocks, each chunk's softmax
                              statistics first, combined into each row's, then the gradient
                              (reverse KL and JSD: kl_chunk_sums, each chunk's part of S, between)
"""
import functools

import numpy as np

from . import cpu_kernels
from .backends import numpy_blocks
from .backends.cuda_backend import COMPUTE_DTYPE, COMPUTE_ITEMSIZE, DTYPE_SUFFIX, ERROR_OUT_SIGNATURE, ITEMSIZE, vec_width


# The divergence of each row, as the kernels number it.
FORWARD, REVERSE, JSD = 0, 1, 2
DIVERGENCES = {"forward": FORWARD, "reverse": REVERSE, "jsd": JSD}


def run(backend, pred, target, labels, norm_target, weights, batch_error, accumulator, want_grad,
        temperature=1.0, divergence=FORWARD, beta=0.5):
    """One fused pass: returns grad (or None); batch_error = summed row errors, added to the
    accumulator when one is given.  pred/target are ArrayInfo; labels the checked labels (host
    labels, where a negative label marks a row to ignore, or on the GPU a CheckedLabels; then
    target is ignored) or None; weights a host
    float array (C,) used with labels, or None; temperature T > 0 divides pred (and the target's
    logits when norm_target); divergence FORWARD, REVERSE or JSD (with beta, see
    kl_divergence.py)."""
    counted = counted_rows(pred.shape[0], labels)
    if counted is None:   # (known on the device alone: its weights scale by N / counted, _cuda)
        counted = pred.shape[0]
    grad_scale = 1.0 / (temperature * counted) if counted else 0.0
    plan = _numpy if backend.name == "cpu" else _cuda
    return plan(backend, pred, target, labels, norm_target, weights, batch_error, accumulator, want_grad,
                grad_scale, 1.0 / temperature, _Divergence(divergence, beta))


class _Divergence:
    """Which divergence (FORWARD, REVERSE or JSD) and JSD's beta, as the kernels take them."""
    __slots__ = ("kind", "beta")

    def __init__(self, kind, beta):
        self.kind, self.beta = kind, float(beta)


def counted_rows(n_rows, labels, wait=False):
    """Rows that count: all of them, or with labels those not marked ignored (label -1): with host
    labels counted here, with labels checked on the device as their check counted them.  Where only
    the device knows yet (a training call's ignoreLabel, answered later: CudaBackend.checked_labels)
    None, or with `wait` the answer's count (waited for)."""
    if isinstance(labels, np.ndarray):
        return int(np.count_nonzero(labels >= 0))
    ignored = getattr(labels, "ignored", 0)   # (None: a CheckedLabels whose count is on the device)
    if ignored is None:
        if not wait:
            return None
        ignored = labels.answer.ignored_rows()
    return n_rows - ignored


# --- NumPy -----------------------------------------------------------------------------
# The CPU computes as the GPU does: float32 arithmetic for 16- and 32-bit inputs (float64 for
# float64), each row's sums in float64, the batch error summed over the rows' errors in a fixed
# order.  Rows go in cache-sized blocks shared by a small thread pool (backends/numpy_blocks.py):
# the temporaries are block-sized, so the peak extra memory stays near grad's own size, and as
# every block is computed the same way whoever computes it, the result does not depend on the
# number of threads.


def _numpy(backend, pred, target, labels, norm_target, weights, batch_error, accumulator, want_grad, grad_scale,
           inv_temperature, divergence):
    n = pred.shape[0]
    x = np.asarray(pred.array).reshape(n, -1)
    c = x.shape[1]
    compute = numpy_blocks.compute_dtype(x.dtype).type
    t = None if labels is not None else np.asarray(target.array).reshape(n, -1)
    w = None
    if labels is not None:   # row weights: 0 for ignored rows (label -1), else 1 or the class weight
        w = np.where(labels >= 0, 1.0, 0.0)
        if weights is not None:   # (in the compute type, as the kernels and the spatial path take them)
            w[labels >= 0] = np.asarray(weights).astype(compute)[labels[labels >= 0]]
    # grad straight into pred's dtype when that is the compute type, else through one float32 copy
    grad = np.empty((n, c), compute) if want_grad else None
    row_error = np.empty(n)
    row_block = _kl_block if divergence.kind == FORWARD else functools.partial(_divergence_block, divergence)
    kernels = cpu_kernels.compiled()   # the fused float32 rows of the `cpu` extra, where they apply
    min_parallel = None
    # (reverse KL's and JSD's NumPy blocks hold about ten block-sized temporaries: quarter blocks
    # keep a call's peak extra memory within 4x pred's bytes)
    block_elements = numpy_blocks.BLOCK_ELEMENTS // 4 if divergence.kind != FORWARD else None
    compiled_rows = kernels and x.dtype == np.float32 and (t is None or t.dtype == np.float32)
    if compiled_rows:
        row_block = functools.partial(_kl_block_compiled, kernels, divergence)
        block_elements = None
        # two blocks already pay for a second thread, except with labels (an exponential an element
        # and no logarithm: at 256 x 1000 the handoff cost more than the half it took over)
        min_parallel = None if labels is not None else 0

    if (compiled_rows and divergence.kind == FORWARD
            and _rows_on_the_pool(x, t, labels, w, norm_target, inv_temperature, grad_scale, grad, row_error)):
        backend.store_error(row_error.sum(), batch_error, accumulator)
        return backend.output(grad, pred) if want_grad else None

    def block(r0, r1):
        row_block(x[r0:r1], None if t is None else t[r0:r1], None if labels is None else labels[r0:r1],
                  None if w is None else w[r0:r1], norm_target, inv_temperature, compute, grad_scale,
                  None if grad is None else grad[r0:r1], row_error[r0:r1])
    numpy_blocks.run_blocks(lambda _scratch, r0, r1, _s0, _s1: block(r0, r1),
                            numpy_blocks.grid_blocks(n, c, 1, block_elements), n * c, numpy_blocks.THREADS, min_parallel)
    backend.store_error(row_error.sum(), batch_error, accumulator)
    return backend.output(grad, pred) if want_grad else None


def _kl_block(x, t, labels, w, norm_target, inv_temperature, compute, grad_scale, grad, row_error):
    """Rows x (and their target t, or labels) of one block: row_error[i] = the row's error (times
    its weight), grad = (p - s q) * w * grad_scale in the compute type (s = sum p)."""
    with np.errstate(all="ignore"):   # inf/NaN inputs give inf/NaN outputs, by design
        xs = np.multiply(x, inv_temperature, dtype=compute) if inv_temperature != 1 else x.astype(compute)
        xs -= xs.max(axis=1, keepdims=True)   # x - max: every exponent <= 0
        e = np.exp(xs)
        z = e.sum(axis=1, dtype=np.float64)
        lse = np.log(z)                        # log q = xs - lse, q = e / z
        if labels is not None:
            # ignored rows (label -1) give exactly nothing, even for NaN logits; a class weight of 0
            # multiplies its row's error and grad (a NaN logit there still gives NaN)
            kept = np.flatnonzero(labels >= 0)
            row_error[...] = 0.0
            row_error[kept] = w[kept] * (lse[kept] - xs[kept, labels[kept]])
            if grad is not None:               # w (onehot - e / z) * grad_scale: one multiply, then the ones
                np.multiply(e, (-w * grad_scale / z).astype(compute)[:, None], out=grad)
                grad[kept, labels[kept]] += (w[kept] * grad_scale).astype(compute)
                grad[labels < 0] = 0
            return
        q = e   # (q = e / z, or e (s / z) = s q for a target that sums to s: below)
        if norm_target:   # p = softmax(t / T); sum p (log p - log q) = sum p (ts - xs) + (lse - lse_t) sum p
            ts = np.multiply(t, inv_temperature, dtype=compute) if inv_temperature != 1 else t.astype(compute)
            ts -= ts.max(axis=1, keepdims=True)
            p = np.exp(ts)
            zt = p.sum(axis=1, dtype=np.float64)
            p *= (1.0 / zt).astype(compute)[:, None]
            ts -= xs
            ts *= p
            ts[p == 0] = 0   # p = 0 adds exactly 0, also where t or x is -inf
            row_error[...] = ts.sum(axis=1, dtype=np.float64) + (lse - np.log(zt)) * p.sum(axis=1, dtype=np.float64)
            q *= (1.0 / z).astype(compute)[:, None]
        else:             # p = t; p == 0 adds exactly 0 (0 log 0 = 0, also where q = 0); a NaN p stays NaN
            p = t.astype(compute, copy=False)
            terms = np.log(p)
            terms -= xs
            terms *= p
            terms[p == 0] = 0
            p_sum = p.sum(axis=1, dtype=np.float64)
            row_error[...] = terms.sum(axis=1, dtype=np.float64) + lse * p_sum
            # -dE/dx = p - s q: PuzzleLib's p - q only where the row sums to s = 1
            q *= (p_sum / z).astype(compute)[:, None]
        if grad is not None:
            np.subtract(p, q, out=grad)
            grad *= compute(grad_scale)


# Elements from which the compiled forward rows take the row pool's second thread: two of its blocks.
POOL_MIN_ELEMENTS = 1 << 16


def _rows_on_the_pool(x, t, labels, w, norm_target, inv_temperature, grad_scale, grad, row_error):
    """The forward divergence's compiled rows on two threads without the GIL (cpu_kernels.row_pool),
    for calls of at least POOL_MIN_ELEMENTS with THREADS > 1 and C-contiguous rows; False when
    not taken (then the blocks run as usual: the same bits)."""
    if numpy_blocks.THREADS < 2 or x.size < POOL_MIN_ELEMENTS or not x.flags.c_contiguous:
        return False
    if t is not None and not t.flags.c_contiguous:
        return False
    from .cpu_kernels import row_pool
    if labels is not None:
        kind, t = row_pool.LABELS, np.ascontiguousarray(labels, np.int64)
    else:
        kind = row_pool.LOGITS if norm_target else row_pool.PROBABILITIES
    grad = np.empty(x.shape, np.float32) if grad is None else grad   # (the kernels keep exp(x - max) there)
    return row_pool.pool().run(kind, x, t, w, grad, row_error, inv_temperature, grad_scale)


def _kl_block_compiled(kernels, divergence, x, t, labels, w, norm_target, inv_temperature, compute, grad_scale,
                       grad, row_error):
    """_kl_block or _divergence_block by cpu_kernels (float32 rows): fused loops a row instead of a
    NumPy call per step."""
    grad = np.empty(x.shape, np.float32) if grad is None else grad   # (the kernels keep exp(x - max) there)
    inv_t = np.float32(inv_temperature)
    if divergence.kind != FORWARD:
        kind, beta = divergence.kind, divergence.beta
        if labels is not None:
            kernels.divergence_rows_labels(x, labels, w, kind, beta, inv_t, np.float64(grad_scale), grad, row_error)
        elif norm_target:
            kernels.divergence_rows_logits(x, t, kind, beta, inv_t, np.float32(grad_scale), grad, row_error)
        else:
            kernels.divergence_rows_probabilities(x, t, kind, beta, inv_t, np.float32(grad_scale), grad, row_error)
    elif labels is not None:
        kernels.kl_rows_labels(x, labels, w, inv_t, np.float64(grad_scale), grad, row_error)
    elif norm_target:
        kernels.kl_rows_logits(x, t, inv_t, np.float32(grad_scale), grad, row_error)
    else:
        kernels.kl_rows_probabilities(x, t, inv_t, np.float32(grad_scale), grad, row_error)


# A class with q above this is a row's heavy class (at most one a row, rounded or not); the
# gradient's S - g_i is summed without it (DivergenceFactors in kernels/kl_divergence.cu).
HEAVY_Q = 0.75
CHUNK_SUMS = 4   # doubles a chunk that kl_chunk_sums writes for reverse KL and JSD (kl_divergence.cu)


def _divergence_block(divergence, x, t, labels, w, norm_target, inv_temperature, compute, grad_scale, grad,
                      row_error):
    """_kl_block for reverse KL and JSD.  Both are sums over the row of terms in log q and log p;
    with g_i = dE_row/dq_i (less a constant, which cancels) and S = sum_i q_i g_i, the softmax
    gives -dE_row/dx_i = q_i (S - g_i) / T:
        reverse  E_row = sum q (log q - log p),                  g = log q - log p      (S = E_row)
        jsd      E_row = beta KL(p || m) + (1 - beta) KL(q || m),  m = beta p + (1 - beta) q,
                 with y = log(beta / (1 - beta)) + log p - log q,
                 g = (1 - beta) log(q / m) + (1 - beta) log(1 - beta) = -(1 - beta) softplus(y),
                 log(p / m) = -log(beta) - softplus(-y) = y - softplus(y) - log(beta),
    in log space (no m is formed, one softplus an element); the shift makes g exactly 0 where p = 0, so that S - g keeps
    its digits for one-hot and sparse p (kernels/kl_divergence.cu says the same).  A zero q or p
    adds nothing (0 log 0 = 0) and a zero q gets a zero grad."""
    with np.errstate(all="ignore"):
        xs = np.multiply(x, inv_temperature, dtype=compute) if inv_temperature != 1 else x.astype(compute)
        xs -= xs.max(axis=1, keepdims=True)
        log_q = xs
        log_q -= np.log(np.exp(xs).sum(axis=1, dtype=np.float64)).astype(compute)[:, None]
        q = np.exp(log_q)
        if labels is not None:   # one-hot p (JSD only: reverse KL against a one-hot p is infinite)
            p = np.zeros_like(q)
            kept = np.flatnonzero(w != 0)
            p[kept, labels[kept]] = 1
            log_p = np.log(p)
        elif norm_target:
            log_p = np.multiply(t, inv_temperature, dtype=compute) if inv_temperature != 1 else t.astype(compute)
            log_p -= log_p.max(axis=1, keepdims=True)
            log_p -= np.log(np.exp(log_p).sum(axis=1, dtype=np.float64)).astype(compute)[:, None]
            p = np.exp(log_p)
        else:
            p = t.astype(compute, copy=False)
            log_p = np.log(p)
        if divergence.kind == REVERSE:
            g = log_q - log_p
            terms = q * g
        else:
            b = divergence.beta
            y = log_p - log_q                                  # y = log(beta p / ((1 - beta) q))
            y += compute(np.log(b) - np.log1p(-b))
            softplus_y = np.logaddexp(compute(0), y)
            g = softplus_y * -compute(1 - b)                   # g = -(1 - beta) softplus(y)
            # beta p log(p / m) = beta p (-softplus(-y) - log beta): not y - softplus(y), which is
            # inf - inf where q = 0 (a -inf logit: y = inf)
            p_terms = np.logaddexp(compute(0), -y)
            p_terms += compute(np.log(b))
            np.negative(p_terms, out=p_terms)
            p_terms *= compute(b)
            p_terms *= p
            p_terms[p == 0] = 0
            terms = q * (g + compute(-(1 - b) * np.log1p(-b)))
        terms[q == 0] = 0
        error = terms.sum(axis=1, dtype=np.float64)
        if divergence.kind != REVERSE:
            error += p_terms.sum(axis=1, dtype=np.float64)
        weight = np.ones(len(x)) if w is None else w
        row_error[...] = np.where(weight != 0, error * weight, 0.0)
        if grad is not None:
            # S - g_i = R + (g_h - g_i), R = S - g_h from the light classes' sums, g_h the heavy class's
            # g (0 without one): S - g_i from a float S cancelled where one class holds nearly all of q
            # (DivergenceFactors in kernels/kl_divergence.cu says how)
            heavy = q > compute(HEAVY_Q)
            light_terms = np.multiply(q, g, out=grad)   # (grad's buffer, free until below)
            light_terms[(q == 0) | heavy] = 0
            light_qg = light_terms.sum(axis=1, dtype=np.float64)
            light_terms[...] = q
            light_terms[heavy] = 0
            light_q = light_terms.sum(axis=1, dtype=np.float64)
            heavy_g = np.zeros(len(q), compute)
            heavy_g[heavy.any(axis=1)] = g[heavy]   # (one a row at most, in row order)
            heavy_g[~np.isfinite(heavy_g)] = 0
            r = (light_qg - heavy_g.astype(np.float64) * light_q).astype(compute)
            np.subtract(heavy_g[:, None], g, out=grad)
            grad += r[:, None]
            grad *= q
            grad[q == 0] = 0
            grad *= (weight * grad_scale).astype(compute)[:, None]
            grad[weight == 0] = 0


# --- CUDA ------------------------------------------------------------------------------

# The kl_rows_<dtype>_g<G>_e<E> kernels, smallest first: G threads hold a row, E elements
# each.  A row of C elements fits when C + slack <= G * E: the slack is VEC - 1 slots (VEC =
# elements per 16 bytes) for a row that may start off a 16-byte boundary, none when every row
# starts on one (all arrays 16-byte aligned and C * itemsize a multiple of 16).
# Rows of up to 16 elements (32 for 16-bit inputs; a float row of 32 in one thread would need
# too many registers) take one thread each: no shuffles.  Longer rows: as few threads a row as
# hold it at 32 elements a thread (16 up to 2048), since a row's reductions cost each thread the
# same however few elements it holds.  Rows of up to 1024 take a warp, whose reductions are
# shuffles alone; a block of 128 takes up to 4096.  Measured on an H100 (benchmarks/NOTES.md,
# fix 14), with normTarget, of the copy bandwidth: 16384x1000 float32 60 -> 79 % (warp of 32
# against block of 128 with 8 a thread), bfloat16 34 -> 40 %; 4096x2000 58 -> 63 % and 30 -> 31 %
# (128 x 16 against 256 x 8); 4096x4000 71 -> 79 % and 33 -> 40 % (128 x 32 against 256 x 16).
_LONGER = [(8, 8), (16, 8), (32, 8), (32, 32), (128, 16), (128, 32), (512, 16), (512, 32)]
ROW_KERNELS = {"f32": [(1, 8), (1, 16), (4, 8)] + _LONGER, "f16": [(1, 8), (1, 16), (1, 32)] + _LONGER,
               "bf16": [(1, 8), (1, 16), (1, 32)] + _LONGER,
               "f64": [(4, 8), (8, 8), (16, 8), (32, 8), (128, 8), (256, 8), (512, 8)]}
ROW_BLOCK = 128                      # block size when a row group is smaller than that
# kl_rows_* launch at most this many blocks, each looping over its rows: fewer blocks to start
# and fewer last-block tickets (a fence each).  8 an SM of an H100's 132, no fewer than it holds
# at once (our row kernels take 72 to 128 registers: 4 to 7 blocks of 128); a number, not a
# multiple of the device's SMs, so that the blocks' partial errors, and the batch error's bits,
# are the same on every GPU.  Measured on an H100 at 16384x1000 with normTarget
# (kl_rows_*_g32_e32), of the copy bandwidth: bfloat16 40 -> 45 % (47 % at 4 an SM), float32
# 79 -> 81 % (NOTES.md, fix 16).  (The cluster kernels lost with such a cap: 8192x32000 float32
# 62 -> 59 % at 8 an SM, 47 % at 4.)
ROW_GRID_BLOCKS = 8 * 132
# The kl_cluster_<dtype>_t<THREADS>_e<E> kernels (not for double), smallest first: a row of C
# elements fits when C + slack <= CLUSTER * THREADS * E.  Blocks of 256, two an SM, for rows
# longer than a block of 512 holds.
CLUSTER = 8
CLUSTER_THREADS_AN_SM = 512          # every cluster kernel's __launch_bounds__(THREADS, 512 / THREADS)
CLUSTER_KERNELS = {suffix: [(256, 16), (256, 32)] for suffix in ("f32", "f16", "bf16")}
# Blocks of 128, four an SM, for grids of many rows (many_rows): while one block waits at its
# cluster's exchange, three others on its SM keep their loads in flight (measured on an H100 at
# 8192x32000: float32 62 % of the copy bandwidth against 54 % in blocks of 256, bfloat16 35 against
# 26 %).  Rows that a row kernel holds stay there: clusters of 128 for them measured slower than
# a block of 512 a row (2048x12000: float32 42 against 64 %; NOTES.md fix 13, reverted).
CLUSTER_MANY_ROWS_KERNELS = [(128, 32)]
CLUSTER_MANY_ROWS_WAVES = 4
# kl_cluster_stream_<dtype>_t<THREADS>_e<E> (sm_90+): rows longer than that, any
# length, streamed by a cluster of CLUSTER blocks of THREADS in segments of THREADS * E elements a
# block (stream_kernel).
STREAM_ELEMS = {"f32": 16, "f16": 32, "bf16": 32}
STREAM_THREADS = 256
# Bytes of an SM's shared memory a block takes besides its dynamic shared memory: its static
# arrays (at most 1664 in the kernels that take dynamic shared memory, sm_90 and sm_100) and the
# 1 KiB the driver reserves a block.  A test holds it to the cubins (test_cost_model.py): it was
# 2048 until 2026-11-27, which left float32's rows of 262144 with labels, reverse KL or JSD one
# block an SM (7 segments of 16 KiB: 117376 bytes a block, two of them past the H100's 233472).
BLOCK_SHARED_RESERVE = 3072
# kl_chunk_stats' and kl_chunk_rows' last argument: which statistics of the target (TargetStats in
# kernels/kl_divergence.cu).
TARGET_NONE, TARGET_SOFTMAX, TARGET_SUM = 0, 1, 2
# Prefetching twins, kernel + "_prefetch", of the benchmark's dtypes: the same kernel, with each
# thread's vectors of what it computes next copied into shared memory (asynchronously on sm_80+)
# while it computes the present (kernels/kl_divergence.cu, "Prefetched rows"), where the H100
# showed loads and compute taking turns.  The library takes those an H100 measured faster than the
# kernels they twin (PREFETCHED_KERNELS); try_choices.py measures the others.
#   kl_rows_*_g<G>_e<E>_prefetch   the group's next row, in two buffers of pred's and target's vectors
#   kl_cluster_*_t128_e32_prefetch   the same for the many-rows cluster kernel, whose clusters then
#                              loop over rows in a grid of at most PREFETCH_CLUSTER_GRID_BLOCKS: 3
#                              blocks an SM of an H100 (float32's 64 KiB of shared memory a block
#                              allow no more), a fixed number, so that the batch error's bits are
#                              the same on every GPU
#   kl_cluster_stream_*_prefetch   pass 1's next segment, staged ones into their slots, the others
#                              into a ring of two segments besides them (stream_staging's `ring`)
PREFETCH_DTYPES = ("f32", "bf16")
PREFETCH_ROW_KERNELS = [(32, 32), (128, 32)]   # (a thread a row: the tiled twin won)
PREFETCH_KERNELS = frozenset(
    [f"kl_rows_{suffix}_g{threads}_e{elems}" for suffix in PREFETCH_DTYPES for threads, elems in PREFETCH_ROW_KERNELS]
    + [f"kl_cluster_{suffix}_t128_e32" for suffix in PREFETCH_DTYPES]
    + [f"kl_cluster_stream_{suffix}_t{STREAM_THREADS}_e{STREAM_ELEMS[suffix]}" for suffix in PREFETCH_DTYPES])
PREFETCH_CLUSTER_GRID_BLOCKS = CLUSTER * (3 * 132 // CLUSTER)
# The prefetching stream kernels whose pass 2 prefetches too (kernel + "_prefetch_pass2"; PASS2 in
# kernels/kl_cluster.cu), and the segments a block must take of a row (stream_segments) for the
# library to launch it: forward KL's pass 2 copies the segments it reads again from memory into
# the ring while it computes the one before.  Measured on an H200 at a0916b1 as the build
# PLC_TRY_PASS2_PREFETCH, % of the copy bandwidth (probabilities, normTarget): bfloat16 at 4
# segments a block (1024x262144) 42.0 -> 49.8, 44.4 -> 51.5; at 2 (2048x128256) 45.0 -> 43.7,
# 45.6 -> 44.4; float32 at 8 +1.4 and +1.9 points, at 4 -1.7 and -3.0 (no twin).  Labels were not
# measured: they keep the plain twin.
PASS2_KERNELS = frozenset([f"kl_cluster_stream_bf16_t{STREAM_THREADS}_e{STREAM_ELEMS['bf16']}"])
PASS2_MIN_SEGMENTS = 4
# Buffers of a prefetching row or cluster kernel (kernels/kl_divergence.cu, PREFETCH_BUFFERS): two;
# one in the kernels built with PLC_TRY_ONE_BUFFER, a build to measure (try_choices.py's "one_buffer").
PREFETCH_BUFFERS = 2
# Tiled twins, kernel + "_tile", of the one-thread row kernel of the benchmark's dtypes
# (kernels/kl_divergence.cu, "Tiled rows"): the block's rows move between global and shared memory
# as one contiguous stretch, in whole 16-byte vectors, where a thread's own vector loads break
# into single elements at the ends of most short rows (the H100 executed 112 instructions an
# element at 65536x10 float32, where the cost model counts 63 for whole vectors).  The library
# takes them (tiles).
TILE_KERNELS = frozenset(f"kl_rows_{suffix}_g1_e16" for suffix in PREFETCH_DTYPES)
# The twins the library launches in their kernels' place: those an H100 measured faster, in % of
# the copy bandwidth (benchmarks/results/2026-11-26-h100-a205773/choices; probabilities, then
# normTarget):
#   kl_rows_bf16_g32_e32, _g128_e32 prefetching   16384x1000 43 -> 62 %, 45 -> 65 %; 4096x4000 44 -> 62 %
#   kl_cluster_bf16_t128_e32 prefetching          8192x32000 38 -> 61 %, 35 -> 50 %
#   kl_cluster_stream_* prefetching               2048x128256 float32 67 -> 68 %, 72 -> 74 %, bfloat16
#                                                 40 -> 46 %, 41 -> 60 %; 1024x262144 float32 68 -> 70 %,
#                                                 60 -> 66 %, bfloat16 40 -> 47 %, 38 -> 47 %
#   kl_rows_*_g1_e16 tiled (TILE_KERNELS)         65536x10 float32 22 -> 25 %, 23 -> 27 %, bfloat16 10 -> 14 %
# Not taken: float32's prefetching row and cluster kernels, measured slower (16384x1000 73 -> 60 %,
# 8192x32000 70 -> 44 %: their 64 KiB of shared memory a block leave three blocks an SM), and
# bfloat16's one-thread row kernel, the same prefetching (10 %) and faster tiled.
PREFETCHED_KERNELS = frozenset(["kl_rows_bf16_g32_e32", "kl_rows_bf16_g128_e32", "kl_cluster_bf16_t128_e32",
                                "kl_cluster_stream_f32_t256_e16", "kl_cluster_stream_bf16_t256_e32"])
# normTarget forward KL's kernels, kernel (+ "_prefetch") + "_normt": the float32 and 16-bit row
# kernels of groups and cluster kernels of 32 elements a thread, built for that mode alone, with the
# exponentials of pred and target kept in place of their values, q and p then a multiply each where
# the general kernels, with no registers left to keep them, took both exponentials again (kernels/
# kl_divergence.cu, "_normt").  Measured on an H200 at a0916b1 as try_choices.py's "in_place",
# bfloat16, % of the copy bandwidth: 16384x1000 47.1 -> 56.4, 4096x4000 47.9 -> 51.4, 8192x32000
# 34.2 -> 38.9 (grads within a unit in bfloat16's last place of the general kernels').  float32's
# since 2026-11-28, not measured: the cost model counts 26 % fewer instructions at 16384x1000, 20 %
# at 8192x32000 (its full-precision exponentials are 8 instructions each); try_choices.py's
# "general" times the general kernels in their place.  On every GPU (not only sm_90 and later, as
# the twins that use its copy engines): it only takes fewer instructions.
NORMT_KERNELS = frozenset(
    [f"kl_rows_{suffix}_g{threads}_e32" for suffix in ("f32", "bf16", "f16") for threads in (32, 128, 512)]
    + [f"kl_cluster_{suffix}_t{threads}_e32" for suffix in ("f32", "bf16", "f16") for threads in (128, 256)])
CHUNK_THREADS = 256                  # kl_chunk_*: one block of CHUNK_THREADS per chunk of a long row
CHUNK_ELEMS = {"f32": 16, "f16": 16, "bf16": 16, "f64": 8}
CHUNK_PARTS = CHUNK_THREADS // 32    # kl_chunk_stats' statistics a chunk: one a warp
# The blocks an SM that the grid of the 16-bit chunked kernels which load a chunk a turn ahead
# (kl_chunk_stats and kl_chunk_grad: kl_divergence.cu's CHUNK_PREFETCH) is capped at, so that
# each block loops over chunks and has a next one to load: the blocks an SM they are built to fit
# (PLC_CHUNK16_MIN_BLOCKS).  Measured on an H200 at a0916b1 (benchmarks/NOTES.md), 16x1048576
# bfloat16: 82.5 -> 68.0 us, normTarget 80.0 -> 61.0 us; at 6 blocks an SM 69.5 and 64.0 us.
# float32 and double (plain chunks, a block a chunk) take their whole grid.
CHUNK_GRID_BLOCKS_PER_SM = {"f16": 3, "bf16": 3}

# Parameter types of each kernel family, as pycuda's prepared calls spell them.
SIGNATURES = {"kl_rows": "PPPPP" + ERROR_OUT_SIGNATURE + "ddqqiid", "kl_cluster": "PPPPP" + ERROR_OUT_SIGNATURE + "ddqqiid",
              "kl_cluster_stream": "PPPPP" + ERROR_OUT_SIGNATURE + "ddqqiidi",
              "kl_chunk_stats": "PPPdqqqi", "kl_chunk_rows": "PPqqi",
              "kl_chunk_sums": "PPPPPdqqqiid", "kl_chunk_grad": "PPPPPPP" + ERROR_OUT_SIGNATURE + "ddqqqiid"}


def row_slack(suffix, n_cols, pointers):
    """Slots a row may need before its first element: none when every row of every array starts
    on a 16-byte boundary, else up to VEC - 1 (the kernels start vectors that far before the row)."""
    aligned = (n_cols * ITEMSIZE[suffix]) % 16 == 0 and all(p % 16 == 0 for p in pointers if p)
    return 0 if aligned else vec_width(suffix) - 1


def row_kernel(suffix, n_cols, slack):
    """(G, E) of the smallest row kernel that holds a row of n_cols, or None for the longer paths.
    A row of one thread (G = 1) needs no slack: a thread whose misaligned row leaves too few slots
    for the head reads it one element at a time (a few rows; twice the slots for all would
    halve the kernel's speed on short 16-bit rows)."""
    for threads, elems in ROW_KERNELS[suffix]:
        if n_cols + (slack if threads > 1 else 0) <= threads * elems:
            return threads, elems
    return None


def prefetches(kernel):
    """Whether the library launches `kernel`'s prefetching twin (kernel + "_prefetch", one of
    PREFETCH_KERNELS) in its place: those of PREFETCHED_KERNELS.  (A hook: benchmarks/try_choices.py
    and ncu_driver.py replace it to time the other choice.)"""
    return kernel in PREFETCHED_KERNELS


def prefetching(kernel, clusters):
    """Whether `kernel` has a prefetching twin and the library takes it: on sm_90 and later
    (clusters), where they were measured; before, the row kernels' copies would not even be
    asynchronous on sm_75."""
    return clusters and kernel in PREFETCH_KERNELS and prefetches(kernel)


def tiles(kernel):
    """Whether the library launches `kernel`'s tiled twin (kernel + "_tile", one of TILE_KERNELS)
    in its place: each, as the H100 measured them faster (PREFETCHED_KERNELS's comment).  (A hook:
    benchmarks/try_choices.py and ncu_driver.py replace it to time the other choice.)"""
    return True


def row_twin(kernel, clusters):
    """The twin the library launches in row kernel `kernel`'s place: "_prefetch", "_tile" or ""
    (itself); a twin only on sm_90 and later (clusters), where they were measured."""
    if prefetching(kernel, clusters):
        return "_prefetch"
    return "_tile" if clusters and kernel in TILE_KERNELS and tiles(kernel) else ""


def in_place(kernel):
    """Whether the library launches `kernel`'s normTarget twin (kernel + "_normt", one of
    NORMT_KERNELS) for normTarget forward KL: each.  (A hook: benchmarks/try_choices.py replaces
    it to time the general kernels.)"""
    return True


def normt_twin(kernel, norm_target, labels, divergence_kind, prefetch=False):
    """"_normt" where the library launches `kernel`'s normTarget twin: forward KL with normTarget
    and no labels, on one of NORMT_KERNELS; else "".  For its prefetching twin (prefetch), only
    where that has one (kernel + "_prefetch_normt": the library's prefetching twins, bfloat16's;
    float32's, which try_choices.py times, have none and run their general form)."""
    applies = norm_target and not labels and divergence_kind == FORWARD and kernel in NORMT_KERNELS \
        and (not prefetch or kernel in PREFETCHED_KERNELS)
    return "_normt" if applies and in_place(kernel) else ""


def pass2_prefetches(kernel, segments):
    """Whether the library launches `kernel`'s twin that prefetches pass 2 too (kernel +
    "_prefetch_pass2", where pass2_twin finds one) for rows of `segments` a block: from
    PASS2_MIN_SEGMENTS on.  (A hook: benchmarks/try_choices.py replaces it to time the other
    choice.)"""
    return segments >= PASS2_MIN_SEGMENTS


def pass2_twin(kernel, prefetch, segments, labels, divergence_kind):
    """"_pass2" where the library launches the prefetching stream kernel's pass-2 twin: forward KL
    on target distributions (no labels), one of PASS2_KERNELS, rows of enough segments a block."""
    applies = prefetch and not labels and divergence_kind == FORWARD and kernel in PASS2_KERNELS
    return "_pass2" if applies and pass2_prefetches(kernel, segments) else ""


def prefetch_bytes(suffix, block_threads, elems):
    """The dynamic shared memory of a prefetching kernel (kl_rows_*_prefetch, kl_cluster_*_prefetch)
    whose blocks of block_threads hold E elements a thread: PREFETCH_BUFFERS buffers of pred's and
    target's vectors, E / VEC of each thread."""
    return PREFETCH_BUFFERS * 2 * (elems // vec_width(suffix)) * block_threads * 16


def row_grid(n_rows, threads, max_blocks):
    """Blocks of kl_rows_*_g<threads>_*: ROW_BLOCK // threads rows a block (one for a group of
    ROW_BLOCK or more), at most ROW_GRID_BLOCKS and max_blocks, each block looping over its rows."""
    rows_per_block = ROW_BLOCK // threads if threads < ROW_BLOCK else 1
    return min(-(-n_rows // rows_per_block), max_blocks, ROW_GRID_BLOCKS)


def chunk_grid(suffix, count, max_blocks, sms):
    """Blocks of kl_chunk_stats_* and kl_chunk_grad_* for `count` chunks: a block a chunk, at most
    max_blocks and, for the 16-bit kernels that load their next chunk a turn ahead,
    CHUNK_GRID_BLOCKS_PER_SM a streaming multiprocessor (each block looping over its chunks)."""
    per_sm = CHUNK_GRID_BLOCKS_PER_SM.get(suffix)
    return min(count, max_blocks, per_sm * sms if per_sm else count)


def many_rows(n_rows, sms):
    """Whether the grid of a cluster kernel (CLUSTER blocks a row) fills every SM's four blocks of
    128 CLUSTER_MANY_ROWS_WAVES times over: 264 rows or more on 132 SMs.  With fewer, the last
    partial wave of the larger clusters of 128 costs more than the exchanges' waits they save."""
    blocks_per_sm = CLUSTER_THREADS_AN_SM // CLUSTER_MANY_ROWS_KERNELS[0][0]
    return n_rows * CLUSTER >= CLUSTER_MANY_ROWS_WAVES * blocks_per_sm * sms


def cluster_kernel(suffix, n_cols, slack, n_rows, sms):
    """(THREADS, E) of the smallest cluster kernel that holds a row of n_cols, or None: of blocks
    of 128 for many rows (NOTES fix 12, measured on an H100 at 8192x32000: float32 54 -> 62 % of
    the copy bandwidth, bfloat16 26 -> 35 %), else of 256."""
    kernels = CLUSTER_KERNELS.get(suffix, [])
    if kernels and many_rows(n_rows, sms):
        kernels = CLUSTER_MANY_ROWS_KERNELS + kernels
    for threads, elems in kernels:
        if n_cols + slack <= CLUSTER * threads * elems:
            return threads, elems
    return None


def row_or_cluster(suffix, n_cols, slack, n_rows, sms, clusters, rows_allowed=True):
    """(the row kernel's (G, E), the cluster kernel's (THREADS, E)): one of them, or neither for
    the longer paths.  clusters: the GPU has thread-block clusters (sm_90+).  A row kernel holds
    the row if one does (rows_allowed), else a cluster kernel if one does and the GPU has them."""
    rows = row_kernel(suffix, n_cols, slack) if rows_allowed else None
    if rows is not None or not clusters:
        return rows, None
    return None, cluster_kernel(suffix, n_cols, slack, n_rows, sms)


def stream_kernel(suffix, n_rows, sms):
    """(THREADS, E) of the kl_cluster_stream_* kernel, blocks of 256, two an SM, where its grid
    (CLUSTER blocks a row) gives every SM two blocks; else None: the chunked kernels, whose grid
    of chunks fills the GPU, take fewer rows.  Measured on an H100 at 16x1048576 float32: the
    chunks 47 % of the copy bandwidth, the stream in blocks of 256 42 %, in blocks of 512 (one an
    SM, the earlier choice) 36 % (benchmarks/NOTES.md, fix 15)."""
    return (STREAM_THREADS, STREAM_ELEMS[suffix]) if n_rows * CLUSTER >= 2 * sms else None


def sums_target(labels, norm_target, kind):
    """Whether the kernels sum each row's target: forward KL's probabilities, whose sum s the grad
    p - s q needs before its first store."""
    return not labels and not norm_target and kind == FORWARD


def stream_two_arrays(labels, norm_target, kind):
    """Whether the stream kernel's pass 1 reads the target beside pred, and so stages and prefetches
    two arrays a segment: for the statistics of its softmax (norm_target), or for its sum."""
    return norm_target or sums_target(labels, norm_target, kind)


def stream_segments(threads, elems, n_cols, slack):
    """J: the most segments a block of kl_cluster_stream_* takes of a row (as the kernel counts
    them, a row at a time: its row's slots before its first element, at most `slack`, row_slack)."""
    chunks = -(-(n_cols + slack) // (threads * elems))
    return -(-chunks // CLUSTER)


def stream_staging(suffix, threads, elems, n_cols, slack, two_arrays, shared_per_sm, shared_per_block, ring=0,
                   most=None):
    """(segments a block of kl_cluster_stream_* keeps in shared memory between its passes, the
    dynamic shared memory they take): as many of the J - 1 segments read twice as fit the
    block's share of an SM (CLUSTER_THREADS_AN_SM // threads blocks an SM), and at most `most`
    (try_choices.py's and the tests' fewer), after `ring` more segments (the prefetching kernel's
    two, included in the bytes); None where those do not fit.  two_arrays: a segment is pred's
    and the target's (else pred's alone)."""
    segment_bytes = threads * elems * ITEMSIZE[suffix] * (2 if two_arrays else 1)
    blocks_per_sm = CLUSTER_THREADS_AN_SM // threads
    share = min(shared_per_block, shared_per_sm // blocks_per_sm) - BLOCK_SHARED_RESERVE - ring * segment_bytes
    if share < 0:
        return None
    staged = max(0, min(stream_segments(threads, elems, n_cols, slack) - 1, share // segment_bytes))
    if most is not None:
        staged = min(staged, most)
    return staged, (staged + ring) * segment_bytes


def stream_plan(kernel, clusters, suffix, threads, elems, n_cols, slack, two_arrays, shared_per_sm, shared_per_block):
    """(whether kl_cluster_stream_* `kernel` prefetches, segments staged, dynamic shared memory):
    the prefetching twin where the library takes it and its ring of two segments fits beside at
    least none staged, else the kernel itself.  two_arrays: a segment is pred's and the target's."""
    shared = (suffix, threads, elems, n_cols, slack, two_arrays, shared_per_sm, shared_per_block)
    ring = stream_staging(*shared, ring=2) if prefetching(kernel, clusters) else None
    return (True, *ring) if ring is not None else (False, *stream_staging(*shared))


def cluster_plan(kernel, clusters, suffix, threads, elems, max_clusters):
    """(whether kl_cluster_* `kernel` prefetches, the most clusters launched, dynamic shared
    memory): the prefetching twin, whose clusters loop over rows in a grid of at most
    PREFETCH_CLUSTER_GRID_BLOCKS, where the library takes it, else the kernel itself."""
    if not prefetching(kernel, clusters):
        return False, max_clusters, 0
    return True, min(max_clusters, PREFETCH_CLUSTER_GRID_BLOCKS // CLUSTER), prefetch_bytes(suffix, threads, elems)


class _Call:
    """What every kernel of one call takes: the launcher (`work`), the dtype's suffix and shape,
    the arrays' pointers, where the error goes, and the scalars."""
    __slots__ = ("work", "suffix", "n_rows", "n_cols", "inputs", "grad_ptr", "mode", "batch_error", "accumulator",
                 "grad_scale", "inv_temperature")

    def __init__(self, work, suffix, pred, inputs, grad_ptr, batch_error, accumulator, grad_scale, inv_temperature,
                 mode):
        self.work, self.suffix = work, suffix
        self.n_rows = pred.shape[0]
        self.n_cols = pred.size // self.n_rows
        self.inputs = inputs            # the pointers of pred, target, labels and weights (0: none)
        self.grad_ptr = grad_ptr
        self.mode = mode                # (normTarget as 0 or 1, the divergence's kind, beta)
        self.batch_error, self.accumulator = batch_error, accumulator
        self.grad_scale, self.inv_temperature = grad_scale, inv_temperature

    def one_pass_arguments(self, blocks):
        """The arguments of the one-pass kernels (kl_rows_*, kl_cluster_*) before their own."""
        return (*self.inputs, self.grad_ptr, *self.work.error_out(blocks, self.batch_error, self.accumulator),
                self.grad_scale, self.inv_temperature, self.n_rows, self.n_cols, *self.mode)


def _cuda(backend, pred, target, labels, norm_target, weights, batch_error, accumulator, want_grad, grad_scale,
          inv_temperature, divergence):
    suffix = DTYPE_SUFFIX[pred.dtype]
    with backend.run([pred, target]) as work:
        grad, grad_ptr = work.empty_like(pred) if want_grad else (None, 0)
        label_ptr = work.labels(labels, np.int64) if labels is not None else 0
        weight_ptr = work.constant(weights, COMPUTE_DTYPE[suffix]) if weights is not None else 0
        if labels is not None and counted_rows(pred.shape[0], labels) is None:   # (weights=None: KLDivergence's)
            weight_ptr = work.weights_for_ignored_rows(labels, pred.shape[0], pred.size // pred.shape[0],
                                                       COMPUTE_DTYPE[suffix])
        target_ptr = 0 if labels is not None else target.pointer
        call = _Call(work, suffix, pred, (pred.pointer, target_ptr, label_ptr, weight_ptr), grad_ptr, batch_error,
                     accumulator, grad_scale, inv_temperature, (int(norm_target), divergence.kind, divergence.beta))
        slack = row_slack(suffix, call.n_cols, (pred.pointer, target_ptr, grad_ptr))
        # (double rows of reverse KL and JSD take the chunked kernels: see ROW_DIVERGENCES in the .cu)
        rows, cluster = row_or_cluster(suffix, call.n_cols, slack, call.n_rows, work.sms, work.clusters,
                                       rows_allowed=not (suffix == "f64" and divergence.kind != FORWARD))
        # Longer rows: streamed by a cluster (kl_cluster_stream_*) where there are rows enough.
        # (float16's stream kernel does not sum the target: SUMS_TARGET in kernels/kl_cluster.cu; the chunks do)
        summed = sums_target(labels is not None, norm_target, divergence.kind)
        stream = (stream_kernel(suffix, call.n_rows, work.sms)
                  if rows is None and cluster is None and work.clusters and suffix in STREAM_ELEMS
                  and not (summed and suffix == "f16") else None)
        twin_mode = (norm_target, labels is not None, divergence.kind)   # (what the twins apply to)
        if rows is not None:
            _launch_rows(call, *rows, twin_mode)
        elif cluster is not None:
            _launch_cluster(call, *cluster, twin_mode)
        elif stream is not None:
            _launch_stream(call, *stream, slack, stream_two_arrays(labels is not None, norm_target, divergence.kind),
                           twin_mode)
        else:
            target_stats = TARGET_SOFTMAX if norm_target else TARGET_SUM if summed else TARGET_NONE
            _launch_chunks(call, slack, target_stats, row_sums=divergence.kind != FORWARD)
    return grad


def _launch_rows(call, threads, elems, twin_mode):
    """kl_rows_*: G = threads a row, several rows a block of ROW_BLOCK when G is smaller.  twin_mode:
    (norm_target, labels given, divergence kind), for normt_twin."""
    work = call.work
    blocks = row_grid(call.n_rows, threads, work.max_blocks)
    name = f"kl_rows_{call.suffix}_g{threads}_e{elems}"
    twin = row_twin(name, work.clusters)
    block_threads = max(threads, ROW_BLOCK)
    work.launch(name + twin + normt_twin(name, *twin_mode, prefetch=twin == "_prefetch"), blocks, block_threads,
                SIGNATURES["kl_rows"],
                call.one_pass_arguments(blocks),
                prefetch_bytes(call.suffix, block_threads, elems) if twin == "_prefetch" else 0)


def _launch_cluster(call, threads, elems, twin_mode):
    """kl_cluster_*: a cluster of CLUSTER blocks holds a row (the grid a multiple of CLUSTER).
    twin_mode: (norm_target, labels given, divergence kind), for normt_twin."""
    work = call.work
    name = f"kl_cluster_{call.suffix}_t{threads}_e{elems}"
    prefetch, max_clusters, shared_bytes = cluster_plan(name, work.clusters, call.suffix, threads, elems,
                                                        work.max_blocks // CLUSTER)
    blocks = CLUSTER * max(1, min(call.n_rows, max_clusters))
    work.launch(name + ("_prefetch" if prefetch else "") + normt_twin(name, *twin_mode, prefetch=prefetch), blocks,
                threads, SIGNATURES["kl_cluster"], call.one_pass_arguments(blocks), shared_bytes)


def _launch_stream(call, threads, elems, slack, two_arrays, twin_mode):
    """kl_cluster_stream_*: a cluster streams a row, with dynamic shared memory for the segments a
    block keeps between its passes (and the two segments the prefetch copies into, where they fit).
    two_arrays: a staged segment is pred's and the target's; twin_mode: (norm_target, labels
    given, divergence kind), for pass2_twin."""
    work = call.work
    name = f"kl_cluster_stream_{call.suffix}_t{threads}_e{elems}"
    prefetch, staged, shared_bytes = stream_plan(name, work.clusters, call.suffix, threads, elems, call.n_cols,
                                                 slack, two_arrays, work.shared_per_sm, work.shared_per_block)
    blocks = CLUSTER * max(1, min(call.n_rows, work.max_blocks // CLUSTER))
    pass2 = pass2_twin(name, prefetch, stream_segments(threads, elems, call.n_cols, slack), *twin_mode[1:])
    work.launch(name + ("_prefetch" if prefetch else "") + pass2, blocks, threads, SIGNATURES["kl_cluster_stream"],
                (*call.one_pass_arguments(blocks), staged), shared_bytes)


def _launch_chunks(call, slack, target_stats, row_sums):
    """kl_chunk_*: a long row in chunks of CHUNK_THREADS * CHUNK_ELEMS over many blocks.  Each
    chunk's statistics (kl_chunk_stats; the target's too: its softmax's or its sum, target_stats),
    combined into its row's (kl_chunk_rows), then, with row_sums (reverse KL and JSD), each
    chunk's part of the row's S (kl_chunk_sums), then the grad and error (kl_chunk_grad)."""
    work, suffix, n_rows, n_cols = call.work, call.suffix, call.n_rows, call.n_cols
    pred_ptr, target_ptr, label_ptr, _ = call.inputs
    chunks_per_row = -(-(n_cols + slack) // (CHUNK_THREADS * CHUNK_ELEMS[suffix]))
    count = n_rows * chunks_per_row
    blocks = chunk_grid(suffix, count, work.max_blocks, work.sms)
    # Four statistics a chunk's warp, then four a row (combined from its chunks'): one scratch.
    stats_bytes = 4 * COMPUTE_ITEMSIZE[suffix]
    chunk_stats = work.scratch(stats_bytes * (count * CHUNK_PARTS + n_rows))
    stats = chunk_stats + stats_bytes * count * CHUNK_PARTS
    work.launch(f"kl_chunk_stats_{suffix}", blocks, CHUNK_THREADS, SIGNATURES["kl_chunk_stats"],
                (pred_ptr, target_ptr, chunk_stats, call.inv_temperature, n_rows, n_cols, chunks_per_row,
                 target_stats))
    work.launch(f"kl_chunk_rows_{suffix}", min(n_rows, work.max_blocks), CHUNK_THREADS,
                SIGNATURES["kl_chunk_rows"], (chunk_stats, stats, n_rows, chunks_per_row, target_stats))
    sums = 0
    if row_sums:
        sums = work.scratch(CHUNK_SUMS * 8 * count)
        # (kl_chunk_sums loads no chunk ahead: a block a chunk, as before)
        work.launch(f"kl_chunk_sums_{suffix}", min(count, work.max_blocks), CHUNK_THREADS,
                    SIGNATURES["kl_chunk_sums"], (pred_ptr, target_ptr, label_ptr, stats, sums, call.inv_temperature,
                                                  n_rows, n_cols, chunks_per_row, *call.mode))
    work.launch(f"kl_chunk_grad_{suffix}", blocks, CHUNK_THREADS, SIGNATURES["kl_chunk_grad"],
                (*call.inputs, stats, sums, call.grad_ptr,
                 *work.error_out(blocks, call.batch_error, call.accumulator),
                 call.grad_scale, call.inv_temperature, n_rows, n_cols, chunks_per_row, *call.mode))


def kernel_names(clusters=True):
    """Every kernel of this family that the plan can launch (clusters: on sm_90 and later)."""
    names = set()
    for suffix, kernels in ROW_KERNELS.items():
        names.update(f"kl_rows_{suffix}_g{threads}_e{elems}" for threads, elems in kernels)
        names.update(f"kl_chunk_{part}_{suffix}" for part in ("stats", "rows", "sums", "grad"))
    if clusters:
        names.update(f"kl_cluster_{suffix}_t{threads}_e{elems}" for suffix, kernels in CLUSTER_KERNELS.items()
                     for threads, elems in kernels + CLUSTER_MANY_ROWS_KERNELS)
        names.update(f"kl_cluster_stream_{suffix}_t{STREAM_THREADS}_e{elems}" for suffix, elems in STREAM_ELEMS.items())
    names.update(kernel + "_prefetch" for kernel in PREFETCH_KERNELS if kernel in names)
    names.update(kernel + "_tile" for kernel in TILE_KERNELS if kernel in names)
    names.update(kernel + "_normt" for kernel in NORMT_KERNELS if kernel in names)
    names.update(kernel + "_prefetch_normt" for kernel in NORMT_KERNELS & PREFETCHED_KERNELS if kernel in names)
    names.update(kernel + "_prefetch_pass2" for kernel in PASS2_KERNELS if kernel in names)
    return sorted(names)
