"""Two threads on one call of KLDivergence's compiled rows, without the GIL.

The NumPy backend's helper threads (backends/block_crew.py) start each block from Python: a
helper must take the GIL, which the caller holds until its own block starts, and on the 2-core
machine measured that hand-off cost what a second thread saves on calls under a millisecond
(256 x 1000 labels: 0.35 ms on one thread).  Here the helper waits inside compiled code and takes
row blocks from a shared counter, as OpenMP's threads do: the caller posts a job (the arrays'
addresses in the int64 `job`, 1 / T and grad_scale in a float64 `scalars` array), both take blocks with an atomic counter, the caller closes
the job and waits until no helper is inside it.  Measured: 0.35 -> 0.23-0.26 ms (PyTorch
autograd on two threads 0.45-0.50); with the other core busy, 0.34-0.43 -> 0.41-0.50.

The helper spins for SPIN_MICROSECONDS after a job (a back-to-back call finds it awake), then
sleeps on a condition variable.  Rows are independent (each row's error and gradient are
computed by one thread, whatever the blocks), so results are bitwise those of one thread.  One
call at a time: a call that finds the pool busy (another thread's) is told so, and runs its rows
alone.  A forked child drops its parent's pool (whose thread it does not have).

Joining is a handshake on two sequentially consistent counters: a helper adds itself to ACTIVE,
then reads STATE; the caller sets STATE = CLOSED, then waits for ACTIVE == 0.  Either the caller
sees the helper (and waits for it), or the helper sees the job closed (and leaves): no helper
reads a job's arrays after its caller has returned.
"""
import threading
import time

import numpy as np
from llvmlite import ir
from numba import carray, njit, types
from numba.extending import intrinsic

from . import CACHE, kernels
from ..backends import block_crew

SPIN_MICROSECONDS = 200
# Row blocks of about BLOCK_ELEMENTS: small enough that the two threads end together.
BLOCK_ELEMENTS = 1 << 15

# The job: int64 slots (addresses as integers; JOB_SLOTS leaves two spare); its two float64
# scalars travel in an array of their own.
GEN, STATE, ACTIVE, NEXT, KIND, N, C, ROWS, BLOCKS, X, T, W, GRAD, ERROR = range(14)
JOB_SLOTS = 16
OPEN, CLOSED = 1, 2
LABELS, PROBABILITIES, LOGITS = 0, 1, 2


def _slot(context, builder, sig, args):
    array = context.make_array(sig.args[0])(context, builder, args[0])
    return builder.gep(array.data, [args[1]])


@intrinsic
def _load(typingctx, job, i):
    def codegen(context, builder, sig, args):
        return builder.load_atomic(_slot(context, builder, sig, args), "seq_cst", 8)
    return types.int64(job, types.intp), codegen


@intrinsic
def _store(typingctx, job, i, value):
    def codegen(context, builder, sig, args):
        builder.store_atomic(args[2], _slot(context, builder, sig, args), "seq_cst", 8)
        return context.get_dummy_value()
    return types.void(job, types.intp, types.int64), codegen


@intrinsic
def _add(typingctx, job, i, value):
    """Adds value to job[i]; returns the old value."""
    def codegen(context, builder, sig, args):
        return builder.atomic_rmw("add", _slot(context, builder, sig, args), args[2], "seq_cst")
    return types.int64(job, types.intp, types.int64), codegen


def _pointer_intrinsic(numba_type, llvm_type):
    @intrinsic
    def to_pointer(typingctx, address):
        def codegen(context, builder, sig, args):
            return builder.inttoptr(args[0], ir.PointerType(llvm_type))
        return types.CPointer(numba_type)(types.int64), codegen
    return to_pointer


_f32 = _pointer_intrinsic(types.float32, ir.FloatType())
_f64 = _pointer_intrinsic(types.float64, ir.DoubleType())
_i64 = _pointer_intrinsic(types.int64, ir.IntType(64))

# The digests of the files compiled into this one's cached machine code (why: kernels.py's COMPILED_IN).
COMPILED_IN = {"kernels.py": "f1636ba019fe9896", "vmath.py": "7689b6e9d4b45915"}
OPTIONS = dict(nogil=True, cache=CACHE, error_model="numpy", boundscheck=False)


@njit(**OPTIONS)
def _take_blocks(job, scalars):
    """Computes row blocks of the posted job until none is left."""
    n, c, rows, blocks, kind = job[N], job[C], job[ROWS], job[BLOCKS], job[KIND]
    x, grad = carray(_f32(job[X]), (n, c)), carray(_f32(job[GRAD]), (n, c))
    row_error = carray(_f64(job[ERROR]), (n,))
    inv_t, grad_scale = np.float32(scalars[0]), scalars[1]
    while True:
        i = _add(job, NEXT, 1)
        if i >= blocks:
            return
        r0, r1 = i * rows, min(i * rows + rows, n)
        if kind == LABELS:
            labels, w = carray(_i64(job[T]), (n,)), carray(_f64(job[W]), (n,))
            kernels.kl_rows_labels(x[r0:r1], labels[r0:r1], w[r0:r1], inv_t, grad_scale, grad[r0:r1],
                                   row_error[r0:r1])
        else:
            t = carray(_f32(job[T]), (n, c))
            if kind == LOGITS:
                kernels.kl_rows_logits(x[r0:r1], t[r0:r1], inv_t, np.float32(grad_scale), grad[r0:r1], row_error[r0:r1])
            else:
                kernels.kl_rows_probabilities(x[r0:r1], t[r0:r1], inv_t, np.float32(grad_scale), grad[r0:r1],
                                              row_error[r0:r1])


@njit(**OPTIONS)
def _serve(job, scalars, seen, spins):
    """The helper: waits (spinning, at most `spins` reads) for a job newer than `seen`, joins it
    if it is still open, and returns its generation; -1 if none came."""
    for _ in range(spins):
        gen = _load(job, GEN)
        if gen != seen:
            _add(job, ACTIVE, 1)
            if _load(job, STATE) == OPEN:
                _take_blocks(job, scalars)
            _add(job, ACTIVE, -1)
            return gen
    return -1


@njit(**OPTIONS)
def _post_and_work(job, scalars):
    """The caller: opens the job (its slots already written), takes blocks, closes it and waits
    until no helper is inside."""
    _store(job, STATE, OPEN)
    _add(job, GEN, 1)
    _take_blocks(job, scalars)
    _store(job, STATE, CLOSED)
    while _load(job, ACTIVE) != 0:
        pass


def _spins_per_microsecond():
    still = np.zeros(JOB_SLOTS, np.int64)
    scalars = np.zeros(2)
    _serve(still, scalars, 0, 1)   # (compiled or loaded from the cache before timing)
    reads = 1 << 16
    start = time.perf_counter()
    _serve(still, scalars, 0, reads)
    return max(1, int(reads / max((time.perf_counter() - start) * 1e6, 1e-3)))


class RowPool:
    def __init__(self):
        self._job = np.zeros(JOB_SLOTS, np.int64)
        self._scalars = np.zeros(2)
        self._busy = threading.Lock()
        # (taken as `with self._lock`, C, not the Condition's Python enter and exit: a Ctrl-C
        # between its acquire and the with statement holding the exit kept it for good, and every
        # other thread's call waited for ever: block_crew says more)
        self._lock = threading.Lock()
        self._posted = threading.Condition(self._lock)
        self._spins = _spins_per_microsecond() * SPIN_MICROSECONDS
        threading.Thread(target=self._help, name="puzzlelib_cost-rows", daemon=True).start()

    def run(self, kind, x, t, w, grad, row_error, inv_t, grad_scale):
        """kernels.kl_rows_<kind>(x, t (labels for LABELS), w, ...) over all rows on this thread and
        the helper; False (nothing done) when the pool is busy with another thread's call."""
        busy = False   # (taken inside the try: an interrupt right after the acquire kept it for good)
        try:
            busy = self._busy.acquire(blocking=False)
            if not busy:
                return False
            n, c = x.shape
            job = self._job
            job[KIND], job[N], job[C] = kind, n, c
            job[ROWS] = max(1, BLOCK_ELEMENTS // c)
            job[BLOCKS], job[NEXT] = -(-n // job[ROWS]), 0
            job[X], job[T], job[GRAD], job[ERROR] = (a.ctypes.data for a in (x, t, grad, row_error))
            job[W] = 0 if w is None else w.ctypes.data
            self._scalars[0], self._scalars[1] = inv_t, grad_scale
            with self._lock:
                self._posted.notify_all()   # (wakes a sleeping helper; it joins if still in time)
            _post_and_work(job, self._scalars)
            return True
        finally:
            if busy:
                self._busy.release()

    def _help(self):
        seen = 0
        while True:
            gen = _serve(self._job, self._scalars, seen, self._spins)
            if gen >= 0:
                seen = gen
                continue
            with self._lock:
                self._posted.wait()
            seen = int(self._job[GEN]) - 1   # (a job posted since: join it)


_pool = block_crew.PerProcess(lambda _key: RowPool())


def pool():
    """The process's RowPool (made on first use; a forked child makes its own)."""
    return _pool.get(None)
