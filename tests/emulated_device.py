"""A stand-in for PycudaDevice that runs kernels/*.cu in the CPU emulation.

"Device memory" is host memory behind a __cuda_array_interface__, so the library
treats these arrays as CUDA arrays and sends them down its real CUDA path:
kernel choice, scratch sizes, argument marshalling and launches are the ones a
GPU sees; only the last step, running the kernel, is emulated.  Outputs and
scratch are poisoned (NaN) before each use so that an element a kernel forgets
to write shows up as a mismatch.
"""
import contextlib
import ctypes
from pathlib import Path

import numpy as np


class EmuArray:
    """A device array of the emulated GPU."""

    def __init__(self, host):
        self.host = host

    shape = property(lambda self: self.host.shape)
    dtype = property(lambda self: self.host.dtype)
    nbytes = property(lambda self: self.host.nbytes)

    @property
    def __cuda_array_interface__(self):
        contiguous = self.host.flags.c_contiguous
        return {"shape": self.host.shape, "typestr": self.host.dtype.str, "version": 3,
                "data": (self.host.ctypes.data, False), "strides": None if contiguous else self.host.strides}

    def get(self):
        return np.array(self.host)


class _Buffer:
    def __init__(self, host):
        self.host = host
        self.ptr = host.ctypes.data


def emulated_build(defines=()):
    """The emulation of the library's kernels, or with `defines` (a PLC_TRY_* build to measure,
    benchmarks/try_choices.py, which times KLDivergence alone) of the KL family's: kl_divergence.cu
    and kl_cluster.cu, built in two thirds of the time of all the families."""
    from cuda_emulation import build
    from puzzlelib_cost.backends.kernel_build import MAIN_SOURCE
    kernels = Path(__file__).resolve().parents[1] / "kernels"
    source = Path(__file__).resolve().parent / "kl_family.cu" if defines else kernels / MAIN_SOURCE
    return build([source], include_dirs=[kernels], defines=dict.fromkeys(defines))


class EmulatedDevice:
    name = "CPU emulation of kernels/all_costs.cu"
    array_type = EmuArray

    def __init__(self, module, order="forward", seed=0, max_blocks=2 ** 31 - 1, clusters=True):
        self.module, self.order, self.seed, self.max_blocks = module, order, seed, max_blocks
        self.defines = ()   # of the kernels in `module` as the tests build it (load_kernels)
        self.sms, self.shared_per_sm, self.shared_per_block = 4, 233472, 232448   # (as the driver stand-in's)
        self.clusters = clusters   # as on sm_90+ (the emulation's default architecture); False: as before
        self.launches = []   # names of the kernels launched, in order
        self._ticket = np.zeros(1, np.uint32)   # the kernels' last-block ticket, as PycudaDevice keeps one
        self.ticket = self._ticket.ctypes.data

    def load_kernels(self, defines=()):
        """As PycudaDevice.load_kernels: the emulation of the kernels compiled with these defines
        (of the KL family alone for a build to measure: emulated_build)."""
        self.module = emulated_build(defines)
        previous, self.defines = self.defines, tuple(defines)
        return previous

    def to_gpu(self, host):
        return self.array_type(np.array(host))

    def empty(self, shape, dtype):
        return self.array_type(_poisoned(shape, dtype))

    def output(self, shape, dtype):
        return self.empty(shape, dtype)

    def zeros(self, shape, dtype):
        return self.array_type(np.zeros(shape, dtype))

    def check_streams(self, streams):
        pass   # one implicit stream: launches run in order, at once

    @contextlib.contextmanager
    def work(self, streams):
        yield

    def empty_like(self, info):
        return self.array_type(_poisoned(info.shape, info.array.dtype))

    def to_host(self, info):
        return np.array(info.array.host)

    def upload(self, host):
        return _Buffer(np.array(host, order="C"))   # (a copy, as a device's: a kernel's writes stay its own)

    def read(self, pointer, dtype, count):
        dtype = np.dtype(dtype)
        return np.frombuffer((ctypes.c_char * (count * dtype.itemsize)).from_address(pointer), dtype).copy()

    def scratch(self, nbytes):
        return _Buffer(np.full(max(nbytes, 1), 0xFF, np.uint8))   # all-ones bytes read as NaN

    def answer_later(self, pointer, words):
        """As PycudaDevice.answer_later: here every launch has run by the time it returns."""
        return _LandedCopy(self.read(pointer, np.uint64, words))

    def new_scalar(self, value):
        return np.array(value, dtype=np.float64)

    def read_scalar(self, scalar):
        return float(scalar)

    def write_scalar(self, scalar, value):
        scalar[...] = value

    def scalar_pointer(self, scalar):
        return scalar.ctypes.data

    def launch(self, name, grid, block, signature, args, shared_bytes=0):
        actual = self.module.signature(name)
        if actual != signature:
            raise AssertionError(f"{name}: the backend passes {signature!r}, the kernel takes {actual!r}")
        if shared_bytes > self.shared_per_block:
            raise AssertionError(f"{name}: {shared_bytes} bytes of dynamic shared memory, past {self.shared_per_block}")
        scalar = {"q": np.int64, "i": np.int32, "d": np.float64, "P": np.uintp}
        typed = [scalar[kind](a) for kind, a in zip(signature, args)]
        self.launches.append(name)
        self.module.launch(name, grid, block, typed, shared_bytes=shared_bytes, order=self.order, seed=self.seed)


class _LandedCopy:
    def __init__(self, values):
        self._values = values

    def ready(self):
        return True

    def values(self):
        return self._values


def _poisoned(shape, dtype):
    out = np.empty(shape, dtype)
    out.view(np.uint8)[...] = 0xFF   # NaN in every float format
    return out
