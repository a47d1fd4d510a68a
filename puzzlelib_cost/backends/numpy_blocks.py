"""Blocked NumPy: the CPU costs' shared iteration over cache-sized blocks, their scratch buffers and
the threads that share the blocks.

The CPU computes as the GPU kernels do: float32 arithmetic for 16- and 32-bit inputs (float64 for
float64, see compute_dtype), partial sums in float64, the batch error summed over the blocks'
partial sums in block order.  An array is viewed as (N, C, S) (samples, the dim a softmax or a
class runs over, positions) and cut into blocks of about BLOCK_ELEMENTS elements (grid_blocks);
each block's temporaries are views of its thread's scratch buffers (Scratch), written in place
(out=), so they stay in cache and the peak extra memory of a call is its outputs plus a few blocks.
run_blocks shares the blocks among up to THREADS threads (block_crew; NumPy and the compiled
blocks release the GIL in their loops).
The partition depends only on the shape, and a block is computed the same way whichever thread
takes it, so the result is bitwise the same for any number of threads and on every call.
"""
import itertools
import math
import os

import numpy as np

from . import block_crew

# 512 KB of float32 per buffer: cache-sized, and few enough blocks that NumPy's per-call cost stays small
BLOCK_ELEMENTS = 1 << 17
# Threads that share the blocks (1: the caller's thread alone), by the kind of block:
# THREADS, two, for compute-bound blocks: KLDivergence's exp-bound rows (1.4x faster on the
# 2-core machine measured) and every compiled block (cpu_kernels: they release the GIL
# throughout).  MEMORY_BOUND_THREADS, one, for the blocks of several short, memory-bound NumPy
# calls (the elementwise costs' NumPy blocks, CrossEntropy's spatial and top-1 passes): in three
# runs there the second thread made MSE, Abs, SmoothL1 and spatial CrossEntropy 1.2-2.3x slower,
# and BCE 15 % faster or 25 % slower (README, Performance).  THREADS is one too where the process
# may run on one core only: a helper there would only take turns with the caller.


def _usable_cores():
    """The cores this process may run on (its CPU affinity where the OS tells, else all)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


THREADS = 2 if _usable_cores() > 1 else 1
MEMORY_BOUND_THREADS = 1
# Smaller batches run on the caller's thread: the handoff would cost more than it saves.
PARALLEL_MIN_ELEMENTS = 4 * BLOCK_ELEMENTS
FOLD = 8                            # fold_sum: terms added FOLD at a time in the compute type, then in float64

def compute_dtype(dtype):
    """The arithmetic type for inputs of `dtype`: float64 for float64, else float32 (the kernels' ComputeType)."""
    return np.dtype(np.float64) if np.dtype(dtype) == np.float64 else np.dtype(np.float32)


def grid_blocks(n, c, s, block_elements=None):
    """Blocks (n0, n1, s0, s1) covering an (n, c, s) array, each x[n0:n1, :, s0:s1] of about
    block_elements elements (whole classes c always: a softmax or a class lookup needs them):
    several samples when one sample's c * s elements fit in a block, else one sample's positions
    s0:s1.  Depends only on the shape."""
    block_elements = block_elements or BLOCK_ELEMENTS
    per_sample = c * s
    if per_sample <= block_elements:
        rows = block_elements // per_sample
        return [(r, min(r + rows, n), 0, s) for r in range(0, n, rows)]
    cols = max(1, block_elements // c)
    return [(r, r + 1, j, min(j + cols, s)) for r in range(n) for j in range(0, s, cols)]


def run_blocks(work, blocks, elements, threads, min_elements=None):
    """[work(scratch, *block) for block in blocks], in block order.  With several blocks, at least
    min_elements elements (default PARALLEL_MIN_ELEMENTS; callers of compiled blocks, which hold
    the GIL only to start, pass their own: row_softmax, elementwise_costs) and threads > 1 (the
    kind of block's: THREADS or MEMORY_BOUND_THREADS, read at the call), the caller and
    threads - 1 helpers (block_crew) take the blocks one at a time until none is left; each gets
    its own Scratch for this call."""
    min_elements = PARALLEL_MIN_ELEMENTS if min_elements is None else min_elements
    if threads <= 1 or len(blocks) < 2 or elements < min_elements:
        scratch = Scratch()
        return [work(scratch, *block) for block in blocks]
    results = [None] * len(blocks)
    next_block = itertools.count()   # (its __next__ is atomic under the GIL)
    errors = np.geterr()             # the caller's np.errstate (thread-local in NumPy) holds in the helpers too

    def take_blocks():
        scratch = Scratch()
        with np.errstate(**errors):
            i = next(next_block)
            while i < len(blocks):
                results[i] = work(scratch, *blocks[i])
                i = next(next_block)
    block_crew.crew(threads - 1).run(take_blocks)
    return results


class Scratch:
    """One thread's reusable buffers: buf(key, shape, dtype) is an uninitialised view of the buffer
    named key, grown when a block needs more (the first block of a call is the largest)."""

    def __init__(self):
        self._buffers = {}

    def buf(self, key, shape, dtype):
        dtype = np.dtype(dtype)
        size = math.prod(shape)
        flat = self._buffers.get(key)
        if flat is None or flat.dtype != dtype or flat.size < size:
            flat = self._buffers[key] = np.empty(size, dtype)
        return flat[:size].reshape(shape)

    def zeros(self, shape, dtype):
        """A view of zeros (never written: the constant operand of np.maximum)."""
        dtype = np.dtype(dtype)
        size = math.prod(shape)
        key = ("zeros", dtype)
        flat = self._buffers.get(key)
        if flat is None or flat.size < size:
            flat = self._buffers[key] = np.zeros(size, dtype)
        return flat[:size].reshape(shape)

    def load(self, key, x, dtype):
        """x in dtype: x itself when it already is, else a converted copy in buffer key."""
        if x.dtype == dtype:
            return x
        out = self.buf(key, x.shape, dtype)
        np.copyto(out, x, casting="unsafe")
        return out


def fold_sum(terms):
    """The float64 sum of an array of terms: FOLD consecutive slices added in the terms' own type
    (elementwise, vectorised), then those partial sums in float64 (NumPy's pairwise sum).  For
    float32 terms of one sign the error is at most (FOLD - 1) = 7 roundings of 2^-24 of the sum:
    4.2e-7 relative, within the 1e-6 the tests allow float32 math; float64 terms are summed directly."""
    flat = terms.reshape(-1)
    if flat.dtype == np.float64 or flat.size < 4 * FOLD:
        return float(flat.sum(dtype=np.float64))
    head = flat.size - flat.size % FOLD
    partial = np.add.reduce(flat[:head].reshape(FOLD, -1), axis=0)
    total = float(partial.sum(dtype=np.float64)) + float(flat[head:].sum(dtype=np.float64))
    # FOLD terms near the top of the type's range overflow their partial sum where the float64 sum
    # does not (MSE's d^2 of 1e19, BCE's softplus of 3e38): then every term in float64, as the GPU
    # and the compiled blocks add them.  (Terms that are inf or NaN themselves give the same again.)
    return total if math.isfinite(total) else float(flat.sum(dtype=np.float64))


def sum_in_order(partials):
    """The batch's sum of the blocks' float64 partial sums, one after the other in block order
    (fixed by the shape)."""
    return float(sum(partials, 0.0))


_FLOAT16_SMALLEST_NORMAL = np.float32(2.0 ** -14)
_FLOAT16_UNIT = np.float32(2.0 ** 24)   # 1 / (the float16 subnormals' step, 2^-24)


def store(out, values):
    """out[...] = values, rounded to out's dtype (to nearest, ties to even).  A float16 out takes
    its subnormal results (|v| < 2^-14: a mean's grad over 2^14 elements and more) as the count of
    2^-24 steps, with the sign: NumPy's conversion gives them through the CPU's conversion
    instruction, whose subnormal results take a microcode assist (1.6M MSE grads: 103 ms against
    2.4 ms of normal ones; KLDivergence in float16 45x its float32 time)."""
    if out.dtype != np.float16 or values.dtype not in (np.float32, np.float64):
        np.copyto(out, values, casting="unsafe")
        return
    values = np.asarray(values, np.float32)   # (a float64 value's double rounding: float32 first, as the GPU)
    magnitude = np.abs(values)
    small = magnitude < _FLOAT16_SMALLEST_NORMAL
    if not small.any():
        np.copyto(out, values, casting="unsafe")
        return
    with np.errstate(over="ignore", invalid="ignore"):   # (a float16 inf is an overflow; the normal ones' steps are unused)
        np.copyto(out, np.where(small, np.float32(0), values), casting="unsafe")   # (the normal ones)
        steps = np.rint(np.multiply(magnitude, _FLOAT16_UNIT, out=magnitude), out=magnitude)   # (exact: <= 1024)
        sign = np.right_shift(values.view(np.uint32), 16).astype(np.uint16) & np.uint16(0x8000)
        np.copyto(out.view(np.uint16), sign | steps.astype(np.uint16), where=small)
