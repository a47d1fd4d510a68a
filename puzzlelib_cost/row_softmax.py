"""The row-softmax family: KL(p || softmax(pred)) per row, fused with its gradient.

KLDivergence and CrossEntropy (2-D scores) are both this one computation on rows
of C elements, q = softmax(pred row):
    row error = w * sum_i p_i (log p_i - log q_i)     (0 log 0 = 0)
    grad_i    = w * (p_i - q_i) / (T * N_counted)     (the NEGATIVE gradient)
with q = softmax(pred / T) for a temperature T, p the target distribution,
softmax(target / T) (norm_target), or one-hot at the row's label; w = weights[label]
for weighted labels, 0 for a row whose label is negative (the caller marks the rows to
ignore so), else 1; N_counted the rows not ignored.  This module holds
the NumPy math and the launch plan of kernels/kl_divergence.cu.

Kernels (chosen by C, see row_kernel):
  kl_rows_<dtype>_g<G>_e<E>   one pass, a row held in registers by G threads, E elements each
  kl_chunk_stats_<dtype> + kl_chunk_grad_<dtype>   rows too long for one block: chunks over
                              many blocks, softmax statistics first, then the gradient
"""
import numpy as np

from .backends.cuda_backend import COMPUTE_DTYPE, COMPUTE_ITEMSIZE, DTYPE_SUFFIX, ERROR_OUT_SIGNATURE, ITEMSIZE, vec_width


def run(backend, pred, target, labels, norm_target, weights, batch_error, accumulator, want_grad,
        temperature=1.0):
    """One fused pass: returns grad (or None); batch_error = summed row errors, added to the
    accumulator when one is given.  pred/target are ArrayInfo; labels the checked host labels
    (then target is ignored; a negative label marks a row to ignore) or None; weights a host
    float array (C,) used with labels, or None; temperature T > 0 divides pred (and the target's
    logits when norm_target)."""
    counted = pred.shape[0] if labels is None else int((labels >= 0).sum())
    grad_scale = 1.0 / (temperature * counted) if counted else 0.0
    plan = _numpy if backend.name == "cpu" else _cuda
    return plan(backend, pred, target, labels, norm_target, weights, batch_error, accumulator, want_grad,
                grad_scale, 1.0 / temperature)


# --- NumPy -----------------------------------------------------------------------------

def log_softmax(x):
    """Row-wise log-softmax of a 2-D float64 array, exact for any finite row."""
    shifted = x - x.max(axis=1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))


def _numpy(backend, pred, target, labels, norm_target, weights, batch_error, accumulator, want_grad, grad_scale,
           inv_temperature):
    x = backend.float64(pred)
    if inv_temperature != 1:
        x = x * inv_temperature
    with np.errstate(all="ignore"):   # inf/NaN inputs give inf/NaN outputs, by design
        log_q = log_softmax(x)
        if labels is not None:
            return _numpy_labels(backend, pred, log_q, labels, weights, batch_error, accumulator, want_grad,
                                 grad_scale)
        if norm_target:
            log_p = log_softmax(backend.float64(target) * inv_temperature)
            p = np.exp(log_p)
        else:
            p = backend.float64(target)
            log_p = np.log(p)
        # p == 0 contributes exactly 0 (0 log 0 = 0, and 0 * log q = 0 even where q = 0);
        # written as p == 0 rather than p > 0 so that a NaN p stays NaN.
        terms = np.where(p == 0, 0.0, p * (log_p - log_q))
        backend.store_error(terms.sum(), batch_error, accumulator)
        return backend.output((p - np.exp(log_q)) * grad_scale, pred) if want_grad else None


def _numpy_labels(backend, pred, log_q, labels, weights, batch_error, accumulator, want_grad, grad_scale):
    """One-hot targets without building them: a row's error is -w log q[label], its grad
    w (onehot - q) * grad_scale; rows of weight 0 (ignored: label -1, or a class weight of 0)
    give exactly nothing, even for NaN logits."""
    rows = np.flatnonzero(labels >= 0)
    w = np.zeros(len(labels))
    w[rows] = 1.0 if weights is None else np.asarray(weights, np.float64)[labels[rows]]
    kept = rows[w[rows] != 0]
    backend.store_error(-(w[kept] * log_q[kept, labels[kept]]).sum(), batch_error, accumulator)
    if not want_grad:
        return None
    grad = np.exp(log_q, out=log_q)
    np.negative(grad, out=grad)
    grad[kept, labels[kept]] += 1.0
    grad *= (w * grad_scale)[:, None]
    grad[w == 0] = 0.0
    return backend.output(grad, pred)


# --- CUDA ------------------------------------------------------------------------------

# The kl_rows_<dtype>_g<G>_e<E> kernels, smallest first: G threads hold a row, E elements
# each.  A row of C elements fits when C + slack <= G * E: the slack is VEC - 1 slots (VEC =
# elements per 16 bytes) for a row that may start off a 16-byte boundary, none when every row
# starts on one (all arrays 16-byte aligned and C * itemsize a multiple of 16).
# Rows of up to 16 elements (32 for 16-bit inputs; a float row of 32 in one thread would need
# too many registers) take one thread each: no shuffles.
_LONGER = [(8, 8), (16, 8), (32, 8), (128, 8), (256, 8), (256, 16), (512, 16), (512, 32)]
ROW_KERNELS = {"f32": [(1, 8), (1, 16), (4, 8)] + _LONGER, "f16": [(1, 8), (1, 16), (1, 32)] + _LONGER,
               "bf16": [(1, 8), (1, 16), (1, 32)] + _LONGER,
               "f64": [(4, 8), (8, 8), (16, 8), (32, 8), (128, 8), (256, 8), (512, 8)]}
ROW_BLOCK = 128                      # block size when a row group is smaller than that
CHUNK_THREADS = 256                  # kl_chunk_*: one block of CHUNK_THREADS per chunk of a long row
CHUNK_ELEMS = {"f32": 16, "f16": 16, "bf16": 16, "f64": 8}

# Parameter types of each kernel family, as pycuda's prepared calls spell them.
SIGNATURES = {"kl_rows": "PPPPP" + ERROR_OUT_SIGNATURE + "ddqqi", "kl_chunk_stats": "PPPdqqqi",
              "kl_chunk_grad": "PPPPPP" + ERROR_OUT_SIGNATURE + "ddqqqi"}


def row_slack(suffix, n_cols, pointers):
    """Slots a row may need before its first element: none when every row of every array starts
    on a 16-byte boundary, else up to VEC - 1 (the kernels start vectors that far before the row)."""
    aligned = (n_cols * ITEMSIZE[suffix]) % 16 == 0 and all(p % 16 == 0 for p in pointers if p)
    return 0 if aligned else vec_width(suffix) - 1


def row_kernel(suffix, n_cols, slack):
    """(G, E) of the smallest row kernel that holds a row of n_cols, or None for the chunked path."""
    for threads, elems in ROW_KERNELS[suffix]:
        if n_cols + slack <= threads * elems:
            return threads, elems
    return None


def _cuda(backend, pred, target, labels, norm_target, weights, batch_error, accumulator, want_grad, grad_scale,
          inv_temperature):
    suffix = DTYPE_SUFFIX[pred.dtype]
    n_rows = pred.shape[0]
    n_cols = pred.size // n_rows
    grad = None
    with backend.run([pred, target]) as work:
        grad, grad_ptr = work.empty_like(pred) if want_grad else (None, 0)
        label_ptr = work.upload(labels, np.int64) if labels is not None else 0
        weight_ptr = work.upload(weights, COMPUTE_DTYPE[suffix]) if weights is not None else 0
        target_ptr = 0 if labels is not None else target.pointer
        slack = row_slack(suffix, n_cols, (pred.pointer, target_ptr, grad_ptr))
        rows = row_kernel(suffix, n_cols, slack)
        inputs = (pred.pointer, target_ptr, label_ptr, weight_ptr)
        if rows is not None:
            threads, elems = rows
            rows_per_block = ROW_BLOCK // threads if threads < ROW_BLOCK else 1
            blocks = min(-(-n_rows // rows_per_block), work.max_blocks)
            work.launch(f"kl_rows_{suffix}_g{threads}_e{elems}", blocks, max(threads, ROW_BLOCK), SIGNATURES["kl_rows"],
                        (*inputs, grad_ptr, *work.error_out(blocks, batch_error, accumulator), grad_scale,
                         inv_temperature, n_rows, n_cols, int(norm_target)))
        else:
            chunks_per_row = -(-(n_cols + slack) // (CHUNK_THREADS * CHUNK_ELEMS[suffix]))
            count = n_rows * chunks_per_row
            blocks = min(count, work.max_blocks)
            stats = work.scratch(4 * COMPUTE_ITEMSIZE[suffix] * count)
            work.launch(f"kl_chunk_stats_{suffix}", blocks, CHUNK_THREADS, SIGNATURES["kl_chunk_stats"],
                        (pred.pointer, target_ptr, stats, inv_temperature, n_rows, n_cols, chunks_per_row,
                         int(norm_target)))
            work.launch(f"kl_chunk_grad_{suffix}", blocks, CHUNK_THREADS, SIGNATURES["kl_chunk_grad"],
                        (*inputs, stats, grad_ptr, *work.error_out(blocks, batch_error, accumulator), grad_scale,
                         inv_temperature, n_rows, n_cols, chunks_per_row, int(norm_target)))
    return grad


def kernel_names():
    """Every kernel of this family that the plan can launch."""
    names = set()
    for suffix, kernels in ROW_KERNELS.items():
        names.update(f"kl_rows_{suffix}_g{threads}_e{elems}" for threads, elems in kernels)
        names.update({f"kl_chunk_stats_{suffix}", f"kl_chunk_grad_{suffix}"})
    return sorted(names)
