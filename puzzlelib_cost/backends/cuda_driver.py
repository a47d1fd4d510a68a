"""The few CUDA driver calls that pycuda does not offer, through ctypes.

pycuda cannot name a stream or event it did not create, so ordering our work
after a caller's stream (PyTorch's current stream, a CuPy stream, the `stream`
of a `__cuda_array_interface__`) and the caller's later work after ours needs
the driver itself: events recorded on and waited for by foreign stream handles,
whether such a stream is being captured into a CUDA graph, on which device a
pointer's memory lives, and whether our context's kernels can reach it.  The library is the one pycuda is linked against (libcuda.so.1).
"""
import ctypes

CU_POINTER_ATTRIBUTE_CONTEXT = 1
CU_POINTER_ATTRIBUTE_DEVICE_POINTER = 3
CU_POINTER_ATTRIBUTE_DEVICE_ORDINAL = 9
CUDA_ERROR_INVALID_VALUE = 1
CU_EVENT_DISABLE_TIMING = 0x2
CU_STREAM_CAPTURE_STATUS_NONE = 0
CU_STREAM_LEGACY = 0x1   # the legacy default stream's handle, as the driver names it

_lib = None


def _driver():
    global _lib
    if _lib is None:
        lib = ctypes.CDLL("libcuda.so.1")
        lib.cuGetErrorName.argtypes = [ctypes.c_int, ctypes.POINTER(ctypes.c_char_p)]
        lib.cuPointerGetAttribute.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_uint64]
        lib.cuEventCreate.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.c_uint]
        lib.cuEventRecord.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
        lib.cuStreamWaitEvent.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_uint]
        lib.cuStreamIsCapturing.argtypes = [ctypes.c_void_p, ctypes.POINTER(ctypes.c_int)]
        lib.cuStreamSynchronize.argtypes = [ctypes.c_void_p]
        lib.cuCtxGetCurrent.argtypes = [ctypes.POINTER(ctypes.c_void_p)]
        _lib = lib
    return _lib


class DriverError(RuntimeError):
    pass


def _check(result, call):
    if result != 0:
        name = ctypes.c_char_p()
        known = _driver().cuGetErrorName(result, ctypes.byref(name)) == 0
        raise DriverError(f"{call} failed: {name.value.decode() if known else 'error %d' % result}")


def pointer_device(pointer):
    """The ordinal of the device whose memory `pointer` points into (DriverError if none)."""
    ordinal = ctypes.c_int()
    _check(_driver().cuPointerGetAttribute(ctypes.byref(ordinal), CU_POINTER_ATTRIBUTE_DEVICE_ORDINAL, pointer),
           "cuPointerGetAttribute")
    return ordinal.value


def memory_context(pointer):
    """The handle of the context whose allocation `pointer` points into, 0 where the driver names
    none (memory of the virtual memory API or of a stream-ordered pool, every context's)."""
    context = ctypes.c_void_p()
    _check(_driver().cuPointerGetAttribute(ctypes.byref(context), CU_POINTER_ATTRIBUTE_CONTEXT, pointer),
           "cuPointerGetAttribute")
    return context.value or 0


def current_context():
    """The handle of the calling thread's current context (0: none)."""
    context = ctypes.c_void_p()
    _check(_driver().cuCtxGetCurrent(ctypes.byref(context)), "cuCtxGetCurrent")
    return context.value or 0


def reachable_here(pointer):
    """Whether kernels of the current context can reach `pointer`'s memory: the driver gives its
    device address for that context, or none (CUDA_ERROR_INVALID_VALUE).  An H200 with driver 580
    gave one for the memory of another context of the same device (pycuda.autoinit's, say), at
    a0916b1: reachable, though the library refuses such memory for its streams' sake (backends)."""
    address = ctypes.c_uint64()
    result = _driver().cuPointerGetAttribute(ctypes.byref(address), CU_POINTER_ATTRIBUTE_DEVICE_POINTER, pointer)
    if result == CUDA_ERROR_INVALID_VALUE:
        return False
    _check(result, "cuPointerGetAttribute")
    return True


def new_event():
    """An event without timing, in the current context; it lives as long as the process."""
    event = ctypes.c_void_p()
    _check(_driver().cuEventCreate(ctypes.byref(event), CU_EVENT_DISABLE_TIMING), "cuEventCreate")
    return event.value


def order_after(waiting_stream, event, recorded_on):
    """Make `waiting_stream`'s later work wait for `recorded_on`'s work so far (stream handles)."""
    _check(_driver().cuEventRecord(event, recorded_on), "cuEventRecord")
    _check(_driver().cuStreamWaitEvent(waiting_stream, event, 0), "cuStreamWaitEvent")


def is_capturing(stream):
    status = ctypes.c_int()
    _check(_driver().cuStreamIsCapturing(stream, ctypes.byref(status)), "cuStreamIsCapturing")
    return status.value != CU_STREAM_CAPTURE_STATUS_NONE


def synchronize(stream):
    _check(_driver().cuStreamSynchronize(stream), "cuStreamSynchronize")
