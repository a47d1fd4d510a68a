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
# each.  A row of C elements fits when C + VEC - 1 <= G * E (VEC = elements per 16 bytes).
_ROWS_16_32 = [(4, 8), (8, 8), (16, 8), (32, 8), (128, 8), (256, 8), (256, 16), (512, 16), (512, 32)]
ROW_KERNELS = {"f32": _ROWS_16_32, "f16": _ROWS_16_32, "bf16": _ROWS_16_32,
               "f64": [(4, 8), (8, 8), (16, 8), (32, 8), (128, 8), (256, 8), (512, 8)]}
ROW_BLOCK = 128                      # block size when a row group is smaller than that
CHUNK_THREADS = 256                  # kl_chunk_*: one block of CHUNK_THREADS per chunk of a long row
CHUNK_ELEMS = {"f32": 16, "f16": 16, "bf16": 16, "f64": 8}
SUM_THREADS = 1024                   # kl_sum_errors: one block

# Parameter types of each kernel family, as pycuda's prepared calls spell them.
SIGNATURES = {"kl_rows": "PPPPPqqi", "kl_chunk_stats": "PPPqqqi", "kl_chunk_grad": "PPPPPPqqqi",
              "kl_sum_errors": "PqPP"}


def vec_width(suffix):
    return 16 // ITEMSIZE[suffix]


def row_kernel(suffix, n_cols):
    """(G, E) of the smallest row kernel that holds a row of n_cols, or None for the chunked path."""
    for threads, elems in ROW_KERNELS[suffix]:
        if n_cols + vec_width(suffix) - 1 <= threads * elems:
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
            rows = row_kernel(suffix, n_cols)
            if rows is not None:
                partials, count = self._rows(suffix, rows, pointers, n_rows, n_cols, norm_target)
            else:
                partials, count = self._chunks(suffix, pointers, n_rows, n_cols, norm_target)
            device.launch("kl_sum_errors", 1, SUM_THREADS, SIGNATURES["kl_sum_errors"],
                          (partials.ptr, count, device.scalar_pointer(batch_error),
                           device.scalar_pointer(accumulator) if accumulator is not None else 0))
        return grad

    def _rows(self, suffix, kernel, pointers, n_rows, n_cols, norm_target):
        threads, elems = kernel
        rows_per_block = ROW_BLOCK // threads if threads < ROW_BLOCK else 1
        blocks = min(-(-n_rows // rows_per_block), self.device.max_blocks)
        row_error = self.device.scratch(8 * n_rows)
        self.device.launch(f"kl_rows_{suffix}_g{threads}_e{elems}", blocks, max(threads, ROW_BLOCK),
                           SIGNATURES["kl_rows"], (*pointers, row_error.ptr, n_rows, n_cols, int(norm_target)))
        return row_error, n_rows

    def _chunks(self, suffix, pointers, n_rows, n_cols, norm_target):
        pred, target, labels, grad = pointers
        chunk = CHUNK_THREADS * CHUNK_ELEMS[suffix]
        chunks_per_row = -(-(n_cols + vec_width(suffix) - 1) // chunk)
        count = n_rows * chunks_per_row
        blocks = min(count, self.device.max_blocks)
        stats = self.device.scratch(4 * COMPUTE_ITEMSIZE[suffix] * count)
        chunk_error = self.device.scratch(8 * count)
        self.device.launch(f"kl_chunk_stats_{suffix}", blocks, CHUNK_THREADS, SIGNATURES["kl_chunk_stats"],
                           (pred, target, stats.ptr, n_rows, n_cols, chunks_per_row, int(norm_target)))
        self.device.launch(f"kl_chunk_grad_{suffix}", blocks, CHUNK_THREADS, SIGNATURES["kl_chunk_grad"],
                           (pred, target, labels, stats.ptr, grad, chunk_error.ptr, n_rows, n_cols,
                            chunks_per_row, int(norm_target)))
        return chunk_error, count


def kernel_names():
    """Every kernel this backend can launch (the compile and emulation tests check each exists)."""
    names = {"kl_sum_errors"}
    for suffix, kernels in ROW_KERNELS.items():
        names.update(f"kl_rows_{suffix}_g{threads}_e{elems}" for threads, elems in kernels)
        names.update({f"kl_chunk_stats_{suffix}", f"kl_chunk_grad_{suffix}"})
    return sorted(names)
