"""PuzzleLib's gpuarray entry points: on the GPU when CUDA is usable, else in host memory.

Code written for PuzzleLib (`gpuarray.to_gpu(x)`, `grad.get()`) runs unchanged:
with a usable CUDA device these are pycuda GPUArrays; without one (or with
PUZZLELIB_COST_BACKEND=cpu) they are HostArrays, NumPy arrays with a `.get()`,
and every cost runs on the NumPy backend.
"""
import numpy as np

from . import backends
from .arrays import native_byte_order


class HostArray(np.ndarray):
    """A host-memory stand-in for a GPU array: a NumPy array with PuzzleLib's `.get()`."""

    def get(self):
        return np.array(self)   # a plain ndarray copy, as GPUArray.get() returns


def _device():
    return backends.get_cuda_backend().device if backends.cuda_usable() else None


def to_gpu(ary):
    device = _device()
    if device is None:
        return np.array(ary).view(HostArray)
    # The kernels read native byte order only (a big-endian GPU array is refused): copy such an
    # array's values, not its bytes, as the host path does (arrays.describe).  And C order: pycuda
    # kept a transposed array's Fortran layout (which the CUDA backend then refused) and failed on
    # a negative stride (OverflowError), where the host path takes any layout.
    # (reshaped: ascontiguousarray makes a 0-d array 1-d, which the host path keeps 0-d)
    host = native_byte_order(np.asarray(ary))
    return device.to_gpu(np.ascontiguousarray(host).reshape(host.shape))


def empty(shape, dtype=np.float32):
    device = _device()
    if device is None:
        return np.empty(shape, dtype).view(HostArray)
    return device.empty(shape, dtype)


def zeros(shape, dtype=np.float32):
    device = _device()
    if device is None:
        return np.zeros(shape, dtype).view(HostArray)
    return device.zeros(shape, dtype)


def __getattr__(name):
    # GPUArray is whichever array type to_gpu() makes here, decided on first use.
    if name == "GPUArray":
        device = _device()
        return HostArray if device is None else device.array_type
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
