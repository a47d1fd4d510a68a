"""The CUDA backend: choose the kernel for the row length, size the scratch, launch.

It knows the kernels of kernels/kl_divergence.cu but not pycuda: allocation,
pointers, streams and launches go through a `device` (PycudaDevice on a GPU; the
tests' CPU emulation of the same .cu files stands in for it without one).  All
of one call's device work happens inside `device.work(streams)`, which orders it
after the callers' streams and their later work after it.
"""
import numpy as np

from ..arrays import describe

DTYPE_SUFFIX = {"float32": "f32", "float16": "f16", "bfloat16": "bf16", "float64": "f64"}
COMPUTE_ITEMSIZE = {"f32": 4, "f16": 4, "bf16": 4, "f64": 8}   # float arithmetic for 16/32-bit inputs
ITEMSIZE = {"f32": 4, "f16": 2, "bf16": 2, "f64": 8}

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
SIGNATURES = {"kl_rows": "PPPPPPPPqqi", "kl_chunk_stats": "PPPqqqi", "kl_chunk_grad": "PPPPPPPPPqqqi"}


def vec_width(suffix):
    return 16 // ITEMSIZE[suffix]


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


class CudaBackend:
    name = "cuda"

    def __init__(self, device):
        self.device = device

    def new_scalar(self, value=0.0):
        return self.device.new_scalar(value)

    def read_scalar(self, scalar):
        return self.device.read_scalar(scalar)

    def write_scalar(self, scalar, value):
        self.device.write_scalar(scalar, value)

    def labels_to_host(self, info):
        return self.device.to_host(info)

    def check_streams(self, infos):
        self.device.check_streams([info.stream for info in infos])

    def kl_divergence(self, pred, target, labels, norm_target, batch_error, accumulator, want_grad):
        device, suffix = self.device, DTYPE_SUFFIX[pred.dtype]
        n_rows = pred.shape[0]
        n_cols = pred.size // n_rows
        with device.work([pred.stream, target.stream]):
            grad = device.empty_like(pred) if want_grad else None
            label_buffer = device.upload(labels.astype(np.int64, copy=False)) if labels is not None else None
            pointers = (pred.pointer, 0 if labels is not None else target.pointer,
                        label_buffer.ptr if label_buffer else 0, describe(grad, "grad").pointer if want_grad else 0)
            # The last block of the last launch writes the batch error (and adds it to the accumulator).
            error_out = (device.ticket, device.scalar_pointer(batch_error),
                         device.scalar_pointer(accumulator) if accumulator is not None else 0)
            slack = row_slack(suffix, n_cols, pointers)
            rows = row_kernel(suffix, n_cols, slack)
            if rows is not None:
                self._rows(suffix, rows, pointers, error_out, n_rows, n_cols, norm_target)
            else:
                self._chunks(suffix, slack, pointers, error_out, n_rows, n_cols, norm_target)
        return grad

    def _rows(self, suffix, kernel, pointers, error_out, n_rows, n_cols, norm_target):
        threads, elems = kernel
        rows_per_block = ROW_BLOCK // threads if threads < ROW_BLOCK else 1
        blocks = min(-(-n_rows // rows_per_block), self.device.max_blocks)
        block_sums = self.device.scratch(8 * blocks)
        self.device.launch(f"kl_rows_{suffix}_g{threads}_e{elems}", blocks, max(threads, ROW_BLOCK),
                           SIGNATURES["kl_rows"],
                           (*pointers, block_sums.ptr, *error_out, n_rows, n_cols, int(norm_target)))

    def _chunks(self, suffix, slack, pointers, error_out, n_rows, n_cols, norm_target):
        pred, target, labels, grad = pointers
        chunks_per_row = -(-(n_cols + slack) // (CHUNK_THREADS * CHUNK_ELEMS[suffix]))
        count = n_rows * chunks_per_row
        blocks = min(count, self.device.max_blocks)
        stats = self.device.scratch(4 * COMPUTE_ITEMSIZE[suffix] * count)
        block_sums = self.device.scratch(8 * blocks)
        self.device.launch(f"kl_chunk_stats_{suffix}", blocks, CHUNK_THREADS, SIGNATURES["kl_chunk_stats"],
                           (pred, target, stats.ptr, n_rows, n_cols, chunks_per_row, int(norm_target)))
        self.device.launch(f"kl_chunk_grad_{suffix}", blocks, CHUNK_THREADS, SIGNATURES["kl_chunk_grad"],
                           (pred, target, labels, stats.ptr, grad, block_sums.ptr, *error_out, n_rows, n_cols,
                            chunks_per_row, int(norm_target)))


def kernel_names():
    """Every kernel this backend can launch (the compile and emulation tests check each exists)."""
    names = set()
    for suffix, kernels in ROW_KERNELS.items():
        names.update(f"kl_rows_{suffix}_g{threads}_e{elems}" for threads, elems in kernels)
        names.update({f"kl_chunk_stats_{suffix}", f"kl_chunk_grad_{suffix}"})
    return sorted(names)
