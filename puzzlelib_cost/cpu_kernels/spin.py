"""A wait that keeps its core awake: spin_while(counters, i, value, spins) reads counters[i] until
it differs from value, at most `spins` times, without the GIL.

The block crew (backends/block_crew.py) waits so for a short while before it sleeps on a
condition variable.  Measured on the 2-core machine (a VM): a thread woken from sleep started its
share of a 0.4 ms call so late that two threads took longer than one; kept spinning between calls,
as OpenMP's threads do, it halves the call.  Each read is an acquire load (a plain load could be
hoisted out of the loop by LLVM, and the loop would never see the change).
"""
import time

import numpy as np
from numba import njit, types
from numba.extending import intrinsic


@intrinsic
def _load_acquire(typingctx, counters, i):
    if not (isinstance(counters, types.Array) and counters.dtype == types.int64 and counters.ndim == 1):
        return None

    def codegen(context, builder, sig, args):
        array = context.make_array(sig.args[0])(context, builder, args[0])
        return builder.load_atomic(builder.gep(array.data, [args[1]]), "acquire", 8)
    return types.int64(counters, types.intp), codegen


@njit(nogil=True, cache=True)
def spin_while(counters, i, value, spins):
    """True as soon as counters[i] != value; False after `spins` reads that all saw value."""
    for _ in range(spins):
        if _load_acquire(counters, i) != value:
            return True
    return False


def spins_per_microsecond():
    """How many reads spin_while makes in a microsecond on this machine (measured, once a process)."""
    still = np.zeros(1, np.int64)
    spin_while(still, 0, 0, 1)   # (compiled or loaded from the cache before timing)
    reads = 1 << 16
    start = time.perf_counter()
    spin_while(still, 0, 0, reads)
    return max(1, int(reads / max((time.perf_counter() - start) * 1e6, 1e-3)))
