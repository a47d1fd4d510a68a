"""The device behind the CUDA backend on a real GPU, through pycuda.

It shares the device's primary context (pycuda.autoprimaryctx), so arrays of
PyTorch and CuPy in the same process are used in place, without copies.  Work
goes to the legacy default stream, which orders it with those libraries' default
streams.  Scratch comes from a memory pool: no device allocation per call beyond
the gradient.
"""
import numpy as np

from .kernel_build import cached_cubin


class PycudaDevice:
    max_blocks = 2 ** 31 - 1

    def __init__(self):
        import pycuda.autoprimaryctx as primary   # noqa: F401 (retains and pushes the primary context)
        import pycuda.driver as driver
        import pycuda.gpuarray as gpuarray
        import pycuda.tools

        self._driver, self._gpuarray = driver, gpuarray
        device = driver.Context.get_device()
        major, minor = device.compute_capability()
        self.name = device.name()
        self.arch = f"sm_{major}{minor}"
        self.array_type = gpuarray.GPUArray
        self._pool = pycuda.tools.DeviceMemoryPool()
        self._module = None
        self._functions = {}

    # --- arrays ------------------------------------------------------------------------

    def to_gpu(self, host):
        return self._gpuarray.to_gpu(host, allocator=self._pool.allocate)

    def empty(self, shape, dtype):
        return self._gpuarray.empty(shape, dtype, allocator=self._pool.allocate)

    def zeros(self, shape, dtype):
        return self._gpuarray.zeros(shape, dtype, allocator=self._pool.allocate)

    def pointer(self, info):
        array = info.array
        if info.kind == "pycuda":
            return int(array.gpudata)
        if info.kind == "torch":
            return array.data_ptr()
        return array.__cuda_array_interface__["data"][0]

    def empty_like(self, info):
        """An uninitialised array of pred's kind: torch in, torch out; CuPy in, CuPy out."""
        if info.kind == "torch":
            import torch
            return torch.empty_like(info.array, memory_format=torch.contiguous_format)
        if info.kind == "cupy":
            import cupy
            return cupy.empty_like(info.array)
        return self.empty(info.shape, np.dtype(info.dtype))

    def to_host(self, info):
        if info.kind == "pycuda":
            return info.array.get()
        if info.kind == "torch":
            return info.array.cpu().numpy()
        host = np.empty(info.shape, np.dtype(info.dtype))
        self._driver.memcpy_dtoh(host, self.pointer(info))
        return host

    def upload(self, host):
        return _Buffer(self.to_gpu(np.ascontiguousarray(host)))

    def scratch(self, nbytes):
        return _Buffer(self._pool.allocate(max(int(nbytes), 1)))

    # --- float64 scalars that stay on the device ----------------------------------------

    # Shape (1,) rather than (): every pycuda version handles one-element arrays.
    def new_scalar(self, value):
        return self._gpuarray.to_gpu(np.array([value], dtype=np.float64))

    def read_scalar(self, scalar):
        return float(scalar.get()[0])

    def write_scalar(self, scalar, value):
        scalar.set(np.array([value], dtype=np.float64))

    def scalar_pointer(self, scalar):
        return int(scalar.gpudata)

    # --- kernels ----------------------------------------------------------------------

    def launch(self, name, grid, block, signature, args):
        function = self._functions.get(name)
        if function is None:
            if self._module is None:
                self._module = self._driver.module_from_file(str(cached_cubin(self.arch)))
            function = self._module.get_function(name)
            function.prepare(signature)
            self._functions[name] = function
        function.prepared_call((int(grid), 1), (int(block), 1, 1), *args)


class _Buffer:
    """Device memory that stays alive as long as this object, with its address in .ptr."""
    __slots__ = ("memory", "ptr")

    def __init__(self, memory):
        self.memory = memory
        self.ptr = int(memory.gpudata) if hasattr(memory, "gpudata") else int(memory)
