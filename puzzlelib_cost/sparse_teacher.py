"""KLDivergence against a sparse (top-k) teacher: target = [indices, values], both (N, K).

Per row, the teacher gives K entries: p_k = values (probabilities), or softmax over the K
values / T when norm_target; s = sum_k p_k (1 when norm_target).  q = softmax(pred / T) over
the row's C columns, and R = the student's mass outside the teacher's K columns, summed over
those columns (never 1 - sum: no cancellation when the K columns hold nearly all of it):
    tail="drop"    E_row = sum_k p_k (log p_k - log q[i_k])
    tail="bucket"  E_row adds (1 - s)(log(1 - s) - log R), the teacher's missing mass as one
                   class (nothing when s >= 1)
    grad = -dE/dpred = (p_k - s q) at the teacher's columns and -s q elsewhere (drop, and bucket
           where s >= 1), or (p_k - q) and ((1 - s) / R - 1) q (bucket), all divided by T * N;
           log R and (1 - s) q / R are taken from the other columns' own max and sum.
This module holds the NumPy math and the launch plan of kernels/sparse_kl.cu; the indices are
checked (in range, distinct in each row) by the backend's checked_labels, on the device on a GPU.
"""
import numpy as np

from .backends import numpy_blocks
from .backends.cuda_backend import DTYPE_SUFFIX, ERROR_OUT_SIGNATURE, MAX_BLOCKS

SIGNATURE = "PPPP" + ERROR_OUT_SIGNATURE + "ddqqqi"
THREADS = 512                  # SPARSE_THREADS of kernels/sparse_kl.cu: a block a row at a time, its grid
                               # at most MAX_BLOCKS (a block a row took 8 bytes of scratch a row)
BUCKET_MAX_COLUMNS = 8192 * 32   # SPARSE_BITMAP_WORDS * 32: bucket's shared-memory bitmap on the GPU


def uses_bucket(tail, norm_target, k, n_cols):
    """Whether a call computes the bucket term: tail "bucket", except with norm_target (s = 1) or
    K = C (no column is left for the teacher's missing mass: it has listed every class)."""
    return tail == "bucket" and not norm_target and k < n_cols


def run(backend, pred, indices, values, norm_target, tail, batch_error, accumulator, want_grad, temperature):
    """grad (or None); batch_error = summed row errors (added to the accumulator when given).
    pred and values are ArrayInfo, indices the checked indices (int64, N x K: host ones on the CPU,
    a CheckedLabels on the GPU), tail "drop" or "bucket" (see uses_bucket)."""
    bucket = uses_bucket(tail, norm_target, values.shape[1], pred.shape[1])
    grad_scale = 1.0 / (temperature * pred.shape[0])
    plan = _numpy if backend.name == "cpu" else _cuda
    return plan(backend, pred, indices, values, norm_target, bucket, batch_error, accumulator, want_grad,
                grad_scale, 1.0 / temperature)


def _numpy(backend, pred, indices, values, norm_target, bucket, batch_error, accumulator, want_grad, grad_scale,
           inv_temperature):
    # float32 arithmetic for 16- and 32-bit inputs, float64 for float64, row sums in float64 (as the GPU).
    x = np.asarray(pred.array)
    compute = numpy_blocks.compute_dtype(x.dtype).type
    rows = np.arange(x.shape[0])[:, None]
    with np.errstate(all="ignore"):   # inf/NaN inputs give inf/NaN outputs, by design
        xs = np.multiply(x, inv_temperature, dtype=compute)
        row_max = xs.max(axis=1, keepdims=True)
        rest = xs.copy() if bucket else None   # (the bucket's rest, from the logits before the shift below)
        xs -= row_max
        e = np.exp(xs)
        z = e.sum(axis=1, dtype=np.float64)
        log_q_k = xs[rows, indices] - np.log(z).astype(compute)[:, None]
        v = np.asarray(values.array)
        if norm_target:
            log_p = np.multiply(v, inv_temperature, dtype=compute)
            log_p -= log_p.max(axis=1, keepdims=True)
            log_p -= np.log(np.exp(log_p).sum(axis=1, dtype=np.float64)).astype(compute)[:, None]
            p = np.exp(log_p)
            mass = np.ones(len(x))
        else:
            p = v.astype(compute)
            log_p = np.log(p)
            mass = p.sum(axis=1, dtype=np.float64)
        terms = p * (log_p - log_q_k)
        terms[p == 0] = 0
        row_error = terms.sum(axis=1, dtype=np.float64)
        rest_factor, member_factor = -mass, mass   # drop, and bucket where s >= 1: -s q, p_k - s q
        rest_weight = None
        if bucket:
            # log R from the other columns' own max and sum: relative to the whole row's max,
            # which the teacher's columns often hold, every term underflowed (logits 6 apart
            # at T = 0.05) and left E = inf and a NaN grad for a finite answer.  From the logits
            # before xs's shift by the whole row's max (1e8 beside 0 and 5): after it, their
            # differences were rounded away before the rest's own max was taken.
            rest[rows, indices] = -np.inf
            rest_max = np.maximum(rest.max(axis=1, keepdims=True), np.finfo(compute).min)   # (no other: lowest)
            np.subtract(rest, rest_max, out=rest)
            np.exp(rest, out=rest)
            rest_sum = rest.sum(axis=1, dtype=np.float64)
            log_rest = (rest_max - row_max)[:, 0] + np.log(rest_sum) - np.log(z)
            tail = np.maximum(1 - mass, 0)
            counts = tail > 0
            row_error += np.where(counts, tail * (np.log(tail) - log_rest), 0)
            # the rest's target (1 - s) q / R = (1 - s) exp(v - rest max) / rest sum, never (1 - s) / R
            # times q (inf * 0 where R underflows); its members' p_k - q
            rest_weight = np.where(counts, tail / rest_sum, 0).astype(compute)[:, None]
            rest_factor, member_factor = np.where(counts, -1, -mass), np.where(counts, 1, mass)
        backend.store_error(row_error.sum(), batch_error, accumulator)
        if not want_grad:
            return None
        q = e
        q *= (1 / z).astype(compute)[:, None]
        q_k = q[rows, indices]
        grad = q
        grad *= rest_factor.astype(compute)[:, None]
        if rest_weight is not None:
            grad += rest_weight * rest   # (the members' entries are overwritten below)
        grad[rows, indices] = p - member_factor.astype(compute)[:, None] * q_k
        grad *= compute(grad_scale)
    return backend.output(grad, pred)


def _cuda(backend, pred, indices, values, norm_target, bucket, batch_error, accumulator, want_grad, grad_scale,
          inv_temperature):
    suffix = DTYPE_SUFFIX[pred.dtype]
    n_rows, n_cols = pred.shape
    tail = "bucket" if bucket else "drop"   # (KLDivergence has checked n_cols <= BUCKET_MAX_COLUMNS for bucket)
    with backend.run([pred, values]) as work:
        grad, grad_ptr = work.empty_like(pred) if want_grad else (None, 0)
        index_ptr = work.labels(indices, np.int64)   # (first: a check answered later holds the error below)
        blocks = min(n_rows, MAX_BLOCKS)
        work.launch(f"sparse_kl_{tail}_{suffix}", blocks, THREADS, SIGNATURE,
                    (pred.pointer, index_ptr, values.pointer, grad_ptr,
                     *work.error_out(blocks, batch_error, accumulator), grad_scale, inv_temperature, n_rows, n_cols,
                     values.shape[1], int(norm_target)))
    return grad


def kernel_names():
    return sorted(f"sparse_kl_{tail}_{suffix}" for tail in ("drop", "bucket") for suffix in DTYPE_SUFFIX.values())
