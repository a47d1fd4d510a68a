"""What an input array is, whichever library made it, without importing that library.

`describe()` turns pred or target into an `ArrayInfo`: where the data lives
("host" or "cuda"), its shape, its dtype as a NumPy-style name ("bfloat16" too),
and whether it is C-contiguous.  Backends decide from that where to run.
"""
from dataclasses import dataclass

import numpy as np

from .errors import CostError

FLOAT_DTYPES = ("float16", "bfloat16", "float32", "float64")
INTEGER_DTYPES = ("int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64")


@dataclass(frozen=True)
class ArrayInfo:
    array: object
    where: str          # "host" or "cuda"
    kind: str           # "numpy", "pycuda", "torch", "cupy", "cuda_array_interface", or a test device's name
    shape: tuple
    dtype: str
    contiguous: bool

    @property
    def size(self):
        return int(np.prod(self.shape, dtype=np.int64))


def describe(array, name):
    """ArrayInfo for a numpy array or a CUDA array; CostError for anything else."""
    if isinstance(array, np.ndarray):
        return ArrayInfo(array, "host", "numpy", tuple(array.shape), array.dtype.name,
                         bool(array.flags.c_contiguous))
    module = type(array).__module__.split(".")[0]
    if module == "torch" and hasattr(array, "is_cuda"):
        if not array.is_cuda:
            raise CostError(f"{name}: expected a numpy array or a CUDA tensor, got a torch tensor on "
                            f"{array.device}; pass tensor.numpy() or move it with .cuda()")
        return ArrayInfo(array, "cuda", "torch", tuple(array.shape), str(array.dtype).replace("torch.", ""),
                         bool(array.is_contiguous()))
    if module == "pycuda" and hasattr(array, "gpudata"):
        return ArrayInfo(array, "cuda", "pycuda", tuple(array.shape), np.dtype(array.dtype).name,
                         bool(array.flags.c_contiguous))
    interface = getattr(array, "__cuda_array_interface__", None)
    if interface is not None:
        shape = tuple(interface["shape"])
        # The array's own dtype when it has one: the interface's typestr cannot name bfloat16.
        own_dtype = getattr(array, "dtype", None)
        dtype = np.dtype(interface["typestr"] if own_dtype is None else own_dtype)
        strides = interface.get("strides")
        contiguous = strides is None or tuple(strides) == _c_strides(shape, dtype.itemsize)
        kind = "cupy" if module == "cupy" else "cuda_array_interface"
        return ArrayInfo(array, "cuda", kind, shape, dtype.name, contiguous)
    raise CostError(f"{name}: expected a numpy array or a CUDA array (pycuda GPUArray, CUDA torch tensor, "
                    f"CuPy array), got {type(array).__name__}")


def _c_strides(shape, itemsize):
    strides, step = [], itemsize
    for extent in reversed(shape):
        strides.append(step)
        step *= extent
    return tuple(reversed(strides))
