"""One GPU behind the CUDA backend, through pycuda.

A PycudaDevice owns what the library keeps per GPU: the device's primary
context (shared with PyTorch and CuPy, so their arrays are used in place), the
loaded kernels, a memory pool and a work stream.

- Any thread: every operation pushes the context and pops it after
  (`active()`), so nothing depends on which thread made the device.  In the
  main thread, where no context is current, the primary context is also made
  current for good, as pycuda.autoprimaryctx does, so that the user's own pycuda
  calls there (`grad.get()`) work; it is popped at exit.  (Leaving a context
  pushed in another thread would abort the process when that thread ends.)
- Streams: kernels run on the device's work stream, a blocking stream, which
  the legacy default stream orders implicitly both ways.  A caller on another
  stream (PyTorch's current stream, a CuPy stream, the `stream` of a CUDA array
  interface) is bridged with events: our work waits for the caller's work so
  far, and the caller's later work waits for ours (`work()`).
- Memory: three pools per device (`_Pool`; `_start` says why): the work's
  (scratch, gradients, labels), the cost objects' device scalars, and gpuarray's
  arrays for the user.  None knows streams, and none needs to: every kernel of
  ours runs on the work stream, so memory given back after one call's launches
  is reused only by later work of that stream, and a user's block only after that
  stream has finished (a gradient the caller used on a non-blocking stream of
  its own, unnamed by the next call's inputs, must be kept until that work is done: as with
  any caching allocator; README, Stream).  Giving a block back makes no driver call,
  so arrays may be dropped in any thread.  (pycuda's DeviceMemoryPool needs a
  current context whenever it starts holding blocks again: a gradient dropped in
  a thread with no context would abort the process.)
- fork(): a child process cannot use the parent's CUDA state; every operation
  there raises CostError.
"""
import atexit
import collections
import contextlib
import functools
import os
import threading

import numpy as np

from ..errors import CostError
from . import cuda_driver
from .kernel_build import cached_cubin

FORKED = ("this process was forked from one that had already initialised CUDA, and CUDA cannot be used "
          "after fork(); start worker processes with multiprocessing's 'spawn' method")


def current_ordinal():
    """The device of the context current in this thread (pycuda's convention), else 0."""
    import pycuda.driver as driver
    driver.init()
    if driver.Context.get_current() is None:
        return 0
    device = driver.Context.get_device()
    return next(i for i in range(driver.Device.count()) if driver.Device(i) == device)


class PycudaDevice:
    max_blocks = 2 ** 31 - 1

    def __init__(self, ordinal):
        import pycuda.driver as driver
        import pycuda.gpuarray as gpuarray

        driver.init()
        device = driver.Device(ordinal)
        major, minor = device.compute_capability()
        self.name, self.ordinal = f"{device.name()}, device {ordinal}", ordinal
        self.arch = f"sm_{major}{minor}"
        self.clusters = major >= 9        # thread-block clusters: kernels/kl_cluster.cu is built for sm_90+
        self.sms = device.get_attribute(driver.device_attribute.MULTIPROCESSOR_COUNT)
        # Shared memory an SM has, and the most a block may take (once its kernel opts in).
        self.shared_per_sm = device.get_attribute(driver.device_attribute.MAX_SHARED_MEMORY_PER_MULTIPROCESSOR)
        self.shared_per_block = device.get_attribute(driver.device_attribute.MAX_SHARED_MEMORY_PER_BLOCK_OPTIN)
        cubin = cached_cubin(self.arch)   # no nvcc: fails here, while the backend is being chosen
        self.defines = ()                 # of the kernels loaded (load_kernels)
        self._driver, self._gpuarray = driver, gpuarray
        self.array_type = gpuarray.GPUArray
        self._pid = os.getpid()
        self._lock = threading.RLock()    # one call at a time per device: the bridging events are shared
        self._context = device.retain_primary_context()
        self._context_handle = getattr(self._context, "handle", None)   # (None: pushed every time)
        self._thread_state = threading.local()   # this thread's active() blocks open, and whether they pushed (_Active)
        self._kept_current = threading.current_thread() is threading.main_thread() and \
            driver.Context.get_current() is None
        if self._kept_current:
            self._context.push()
        try:
            self._start(driver, cubin)
        except BaseException:   # (the context left on the stack aborted the process at exit, and kept its memory)
            self._release()
            raise
        self._functions = {}
        atexit.register(self._release)

    def _start(self, driver, cubin):
        """The device's module, stream, pools, events and ticket, in its context."""
        with self.active():
            try:
                self._module = driver.module_from_file(str(cubin))
            except driver.Error as exc:   # (a whole cubin: an nvcc newer than the driver, say)
                raise RuntimeError(f"the CUDA driver refuses the kernels {cubin}: {exc}") from exc
            self._stream = driver.Stream()                    # flags 0: blocking
            # Three pools, so that no block moves between users whose streams are not ordered:
            # the work's (scratch, grads and other outputs: reused only by later work, which is
            # ordered after the work that freed them), the cost objects' device scalars (written on
            # the legacy stream when a cost first meets this device, before its call is ordered
            # after the caller's streams: from the work's pool, a dropped grad the caller's stream
            # still read could take that write), and gpuarray's arrays for the user (from the
            # work's pool, a dropped grad's block, a kernel still writing it, went to an array the
            # user then wrote on a stream of their own).  A user's block comes back when the user
            # drops it, maybe while the work still reads it (cost(gpuarray.to_gpu(x), ...) with
            # queryError=False): it is handed out again only after the work stream has finished,
            # as pycuda's own cuMemFree waits (to_gpu's copy from pageable memory waits anyway).
            self._pool, self._scalar_pool = _Pool(driver, self.ordinal), _Pool(driver, self.ordinal)
            self._user_pool = _Pool(driver, self.ordinal, before_reuse=self._stream.synchronize)
            self._caller_done, self._work_done = cuda_driver.new_event(), cuda_driver.new_event()
            # The kernels' ticket for "which block finishes last" (kernels/common.cuh: finish_batch_error):
            # one zeroed word, re-armed by every launch that uses it.
            self._ticket = self._pool.allocate(4)
            driver.memset_d32(int(self._ticket), 0, 1)
            self.ticket = int(self._ticket)
            self._answers = _AnswerRows(driver)   # page-locked rows for answer_later()

    def load_kernels(self, defines=()):
        """Launch, from now on, the kernels compiled with these -D defines: a variant of the source
        that benchmarks/try_choices.py measures ("build" choices); () is the library's own.  Returns
        the defines of the kernels loaded before, to load them back."""
        cubin = cached_cubin(self.arch, tuple(defines))
        with self._lock, self.active():
            module = self._driver.module_from_file(str(cubin))
            previous, self.defines = self.defines, tuple(defines)
            self._module, self._functions = module, {}
        return previous

    def _release(self):
        """At exit, and where the start failed: the memory of the pools made goes back to the driver,
        then the primary context, in order (a failure to free cannot keep the context)."""
        if os.getpid() == self._pid:
            with contextlib.suppress(Exception), self.active():
                for pool in (self.__dict__.get(name) for name in ("_pool", "_scalar_pool", "_user_pool", "_answers")):
                    if pool is not None:
                        pool.release()
            if self._kept_current:
                self._driver.Context.pop()
            self._context.detach()

    def active(self):
        """This device's context, current in the calling thread for the duration: `with
        device.active():`.  Pushed by a thread's outermost block only, and only where another
        context is current: inside a block of this device in the same thread (a call's
        allocations and launches inside its work()), or where the context is current already
        (the main thread keeps it so), a push and a pop would be host time for nothing.  (pycuda
        keeps one context on the driver's stack: its push and pop are two driver calls each
        where a context is current; a cost call made 6 pushes and pops, CrossEntropy's 14.)"""
        if os.getpid() != self._pid:
            raise CostError(FORKED)
        return _Active(self)

    # --- streams ------------------------------------------------------------------------

    def check_streams(self, streams):
        """CostError if a caller's stream is not a stream of this device's context, or is being
        captured into a CUDA graph (the legacy stream cannot be captured; asked while another stream
        is, the driver would answer with an error)."""
        callers = [stream for stream in _foreign(streams) if stream != cuda_driver.CU_STREAM_LEGACY]
        if not callers:
            return
        with self.active():
            for stream in callers:
                try:
                    capturing = cuda_driver.is_capturing(stream)
                except cuda_driver.DriverError as exc:
                    raise CostError(f"the input arrays' stream {stream:#x} is not a stream of device "
                                    f"{self.ordinal}'s context, where the arrays are ({exc})") from None
                if capturing:
                    raise CostError(f"the input arrays' stream {stream:#x} is capturing a CUDA graph; a cost call "
                                    f"allocates scratch and cannot be captured: call it outside the capture")

    @contextlib.contextmanager
    def work(self, streams):
        """Launch on the work stream, ordered after the callers' `streams` and before their later work."""
        callers = _foreign(streams)
        with self._lock, self.active():
            work = self._stream.handle
            for stream in callers:
                cuda_driver.order_after(work, self._caller_done, recorded_on=stream)
            yield
            for stream in callers:
                cuda_driver.order_after(stream, self._work_done, recorded_on=work)

    # --- arrays ------------------------------------------------------------------------

    # The user's arrays (the gpuarray module): memory of their own pool.

    def to_gpu(self, host):
        with self.active():
            return self._gpuarray.to_gpu(host, allocator=self._user_pool.allocate)

    def empty(self, shape, dtype):
        with self.active():
            return self._gpuarray.empty(shape, dtype, allocator=self._user_pool.allocate)

    def zeros(self, shape, dtype):
        with self.active():
            array = self._gpuarray.empty(shape, dtype, allocator=self._user_pool.allocate)
            if array.nbytes:   # (gpuarray.zeros would compile a fill kernel with nvcc at run time)
                self._driver.memset_d8(array.gpudata, 0, array.nbytes)
            return array

    # The work's: outputs (grad, mostProb) and uploads, from the work's pool.

    def output(self, shape, dtype):
        with self.active():
            return self._gpuarray.empty(shape, dtype, allocator=self._pool.allocate)

    def empty_like(self, info):
        """An uninitialised array of pred's kind: torch in, torch out; CuPy in, CuPy out."""
        if info.kind == "torch":
            import torch
            return torch.empty_like(info.array, memory_format=torch.contiguous_format)
        if info.kind == "cupy":
            import cupy
            with info.array.device:
                return cupy.empty_like(info.array)
        return self.output(info.shape, np.dtype(info.dtype))

    def to_host(self, info):
        """A host copy of a CUDA array, after its producer's stream has finished writing it."""
        if info.kind == "torch":
            return info.array.cpu().numpy()
        if info.kind == "cupy":
            import cupy
            return cupy.asnumpy(info.array)
        with self.active():
            if info.stream is not None:
                cuda_driver.synchronize(info.stream)
            host = np.empty(info.shape, np.dtype(info.dtype))
            if host.nbytes:
                self._driver.memcpy_dtoh(host, info.pointer)
            return host

    def read(self, pointer, dtype, count):
        """`count` values of `dtype` at the device address `pointer`, copied on the work stream (so
        after the work so far, and what it was ordered after) and synchronised: call inside work()."""
        host = np.empty(count, np.dtype(dtype))
        with self.active():
            self._driver.memcpy_dtoh_async(host, pointer, self._stream)
            self._stream.synchronize()
        return host

    def answer_later(self, pointer, words):
        """`words` uint64s at the device address `pointer`, copied on the work stream (after the work
        so far) into page-locked host memory, which does not make the host wait; the _LateCopy's
        ready() asks the copy's event whether they have landed, values() waits for them.  Call
        inside work().  (A label check's answer, read by the cost at its next call: label_checks.)"""
        if words > _AnswerRows.WORDS:
            raise ValueError(f"answer_later: a row holds {_AnswerRows.WORDS} words, not {words}")
        with self._lock, self.active():
            row = self._answers.take()
            self._driver.memcpy_dtoh_async(row.host[:words], pointer, self._stream)
            row.event.record(self._stream)
            return _LateCopy(self._answers, row, words)

    def upload(self, host):
        """A device copy of a host array, copied on the work stream: call inside work().  For
        pageable memory (the families pass NumPy arrays they made; never page-locked ones, which
        would have to outlive the copy) CUDA documents the asynchronous copy as staged before the
        call returns, with no device synchronisation.  (gpuarray.to_gpu's synchronous copy on the
        legacy stream waited for every kernel queued on the blocking work stream: each call that
        uploaded drained the GPU's queue, and CTC, uploading between its launches, waited for each
        launch; measured on an H200 at e87a174: CTC at T=150, N=32 1.2 ms a call, host-bound.)"""
        host = np.ascontiguousarray(host)
        with self.active():
            buffer = _Buffer(self._pool.allocate(max(host.nbytes, 1)))
            if host.nbytes:
                self._driver.memcpy_htod_async(buffer.ptr, host, self._stream)
            return buffer

    def scratch(self, nbytes):
        with self.active():
            return _Buffer(self._pool.allocate(int(nbytes)))

    # --- float64 scalars that stay on the device ----------------------------------------

    # Shape (1,) rather than (): every pycuda version handles one-element arrays.
    def new_scalar(self, value):
        with self.active():
            return self._gpuarray.to_gpu(np.array([value], dtype=np.float64), allocator=self._scalar_pool.allocate)

    def read_scalar(self, scalar):
        with self.active():
            return float(scalar.get()[0])

    def write_scalar(self, scalar, value):
        with self.active():
            scalar.set(np.array([value], dtype=np.float64))

    def scalar_pointer(self, scalar):
        return int(scalar.gpudata)

    # --- kernels ----------------------------------------------------------------------

    def launch(self, name, grid, block, signature, args, shared_bytes=0):
        """Launch kernel `name` on the work stream, with `shared_bytes` of dynamic shared memory;
        call inside work()."""
        function = self._functions.get(name)
        if function is None:
            function = self._module.get_function(name)
            function.prepare(signature)
            # The driver's default limit on dynamic shared memory is 48 KiB less the kernel's static
            # shared memory (a launch past it fails with "invalid argument"), not 48 KiB.
            static = function.get_attribute(self._driver.function_attribute.SHARED_SIZE_BYTES)
            function.dynamic_shared_limit = (48 << 10) - static
            self._functions[name] = function
        if shared_bytes > function.dynamic_shared_limit:   # (opting in once per size asked)
            function.set_attribute(self._driver.function_attribute.MAX_DYNAMIC_SHARED_SIZE_BYTES, shared_bytes)
            function.dynamic_shared_limit = shared_bytes
        function.prepared_async_call((int(grid), 1), (int(block), 1, 1), self._stream, *args, shared_size=shared_bytes)


def _foreign(streams):
    """The distinct caller streams to order the work with, the legacy default stream (None: pycuda
    arrays, torch's default stream, an interface's None or 1) as CU_STREAM_LEGACY.  Our blocking
    work stream meets the legacy stream's own work by the implicit barrier, but not the caller's
    blocking streams' (pycuda's drv.Stream() default), which legacy work would: an event recorded
    on the legacy stream, after that barrier, carries them."""
    return sorted({cuda_driver.CU_STREAM_LEGACY if stream is None else stream for stream in streams})


class _Pool:
    """Device memory kept for reuse, in bins of rounded sizes (at most 1/8 wasted).

    `allocate()` returns a block, which pycuda arrays take as their memory;
    when the last reference to it goes, its memory goes back to its bin.
    `holding = False` frees it to the driver at once instead (tests use that to
    show memory freed too early)."""

    def __init__(self, driver, ordinal, before_reuse=None):
        self._driver = driver
        self.ordinal = ordinal   # the device whose primary context the memory is of
        self._block = _block_class(driver.PointerHolderBase)
        self._bins = collections.defaultdict(list)
        self._lock = threading.RLock()   # (re-entrant: a block collected by the GC inside allocate() gives back)
        self._before_reuse = before_reuse   # called (context current) before a block given back goes out again
        self.holding = True

    @staticmethod
    def bin_size(nbytes):
        if nbytes <= 512:
            return 512
        step = 1 << (int(nbytes - 1).bit_length() - 4)   # 8 bins per power of two
        return -(-nbytes // step) * step

    def allocate(self, nbytes):
        size = self.bin_size(nbytes)
        with self._lock:
            bin_ = self._bins[size]
            memory = bin_.pop() if bin_ else None
        if memory is None:
            memory = self._driver.mem_alloc(size)   # (the caller has the context current)
        elif self._before_reuse is not None:
            self._before_reuse()
        return self._block(self, memory, size)

    def give_back(self, memory, size):
        if self.holding:
            with self._lock:
                self._bins[size].append(memory)
        else:
            memory.free()

    def release(self):
        with self._lock:
            for bin_ in self._bins.values():
                for memory in bin_:
                    memory.free()
            self._bins.clear()


def our_pools_device(array):
    """The device whose pools hold a pycuda array's memory (gpuarray.to_gpu's arrays, the grads),
    memory of its primary context, which that context's kernels reach by construction; None for
    other memory.  What the driver is not asked about such an array (its device, its context)."""
    block = getattr(array, "gpudata", None)
    return block.pool.ordinal if getattr(type(block), "FROM_OUR_POOLS", False) else None


@functools.lru_cache(maxsize=None)
def _block_class(pointer_holder_base):
    """_Block derives from pycuda's PointerHolderBase, what pycuda arrays take as memory: made
    once pycuda is imported."""

    class _Block(pointer_holder_base):
        """A pooled piece of device memory; back to its pool when the last reference goes."""
        FROM_OUR_POOLS = True   # (memory of a device's primary context: our_pools_device)

        def __init__(self, pool, memory, size):
            super().__init__()
            self.pool, self.memory, self.size, self.ptr = pool, memory, size, int(memory)

        def get_pointer(self):
            return self.ptr

        def __int__(self):
            return self.ptr

        def __del__(self):
            self.pool.give_back(self.memory, self.size)

    return _Block


class _Active:
    """PycudaDevice.active()'s context manager (a class, not a generator: a call enters it a dozen
    times).  The thread's outermost block asks pycuda and the driver which context is current and
    pushes the device's unless both name it; the block that pushed it pops it."""
    __slots__ = ("device",)

    def __init__(self, device):
        self.device = device

    def __enter__(self):
        device = self.device
        state = device._thread_state
        depth = getattr(state, "depth", 0)
        if not depth:
            # Current for both pycuda (its own stack: its allocations refuse to run where that is
            # empty, as after a detach that left the driver's current context behind) and the
            # driver (which other libraries' cuCtxSetCurrent change behind pycuda's back).
            current = device._driver.Context.get_current()
            state.pushed = not (current is not None and current.handle == device._context_handle
                                and cuda_driver.current_context() == device._context_handle)
            if state.pushed:
                device._context.push()
        state.depth = depth + 1

    def __exit__(self, *exc):
        state = self.device._thread_state
        state.depth -= 1
        if not state.depth and state.pushed:
            self.device._driver.Context.pop()


class _AnswerRow:
    __slots__ = ("host", "event")

    def __init__(self, host, event):
        self.host, self.event = host, event


class _AnswerRows:
    """Rows of WORDS uint64s of page-locked host memory, each with an event, for answer_later(): a
    copy into pageable memory makes the host wait for it (CUDA stages it), one into page-locked
    memory does not.  Made ROWS at a time, as needed, and kept for reuse (a row goes back when its
    _LateCopy is read or dropped; its next copy is queued on the same stream, after the last)."""
    ROWS = 64
    WORDS = 8   # (a label check's answer is 6: cuda_backend.LABEL_ANSWER_WORDS; a row is 64 bytes)

    def __init__(self, driver):
        self._driver = driver
        self._free, self._blocks = [], []
        self._lock = threading.Lock()

    def take(self):
        with self._lock:
            if not self._free:
                block = self._driver.pagelocked_empty((self.ROWS, self.WORDS), np.uint64)
                self._blocks.append(block)
                self._free.extend(_AnswerRow(block[i], self._driver.Event(self._driver.event_flags.DISABLE_TIMING))
                                  for i in range(self.ROWS))
            return self._free.pop()

    def give_back(self, row):
        with self._lock:
            self._free.append(row)

    def release(self):
        with self._lock:
            self._free.clear()
            for block in self._blocks:
                block.base.free()
            self._blocks.clear()


class _LateCopy:
    """answer_later()'s copy: ready() without waiting, values() (a host array of its words) waiting
    for it where it has not landed.  CostError in a process forked after it was made (its event is
    the parent's: CUDA cannot be used after fork())."""
    __slots__ = ("_rows", "_row", "_words", "_values", "_landed", "_pid")

    def __init__(self, rows, row, words):
        self._rows, self._row, self._words, self._values, self._landed = rows, row, words, None, False
        self._pid = os.getpid()

    def ready(self):
        if not self._landed:
            if os.getpid() != self._pid:
                raise CostError(f"a label check of a call made on a GPU before this process was forked cannot be "
                                f"read here: {FORKED}")
            self._landed = self._row.event.query()
        return self._landed

    def values(self):
        if self._values is None:
            if not self.ready():   # (read after a wait for later work, it has landed: no second wait)
                self._row.event.synchronize()
                self._landed = True
            self._values = self._row.host[:self._words].copy()
            self._rows.give_back(self._row)
            self._row = None
        return self._values

    def __del__(self):
        if self._row is not None and os.getpid() == self._pid:
            self._rows.give_back(self._row)


class _Buffer:
    """Device memory that stays alive as long as this object, with its address in .ptr."""
    __slots__ = ("memory", "ptr")

    def __init__(self, memory):
        self.memory = memory
        self.ptr = int(memory.gpudata) if hasattr(memory, "gpudata") else int(memory)
