"""A device array known only by its __cuda_array_interface__ (v3), as Numba's and JAX's are."""
import numpy as np


class InterfaceArray:
    """`memory`: a pycuda GPUArray holding the data (kept alive here); `offset`: bytes into it;
    `stream`: what the interface reports (None, 1 legacy, 2 per-thread, or a stream handle)."""

    def __init__(self, memory, shape, dtype, stream=None, offset=0):
        self.memory, self.shape, self.dtype = memory, tuple(shape), np.dtype(dtype)
        self.stream, self.offset = stream, offset

    @property
    def __cuda_array_interface__(self):
        return {"shape": self.shape, "typestr": self.dtype.str, "data": (int(self.memory.gpudata) + self.offset, False),
                "version": 3, "strides": None, "stream": self.stream}
