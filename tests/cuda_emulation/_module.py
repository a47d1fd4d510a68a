"""build() and EmulatedModule: load an emulated module and launch its kernels from Python."""

from __future__ import annotations

import ctypes
import os
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from ._build import build_shared_object

ORDERS = ("forward", "reverse", "random")
DEFAULT_TIMEOUT = float(os.environ.get("CUDA_EMULATION_TIMEOUT", "60"))

# One character per kernel parameter (see cuda_emulation.h): the numpy scalar type to pass.
SCALAR_TYPES = {"b": np.int8, "B": np.uint8, "h": np.int16, "H": np.uint16, "i": np.int32, "I": np.uint32,
                "q": np.int64, "Q": np.uint64, "f": np.float32, "d": np.float64, "e": np.float16, "?": np.bool_}

_FAULT = re.compile(r"kernel (\S+) block \((\d+),(\d+),(\d+)\) thread \(([\d?]+),([\d?]+),([\d?]+)\): (.*)", re.S)


class KernelFault(Exception):
    """A kernel failed. str() is "kernel NAME block (x,y,z) thread (x,y,z): WHAT"; the parts are
    also attributes (thread is None when no single thread is to blame); `report` holds the full
    AddressSanitizer report for sanitize=True modules."""

    def __init__(self, message: str, report: str | None = None):
        super().__init__(message)
        self.report = report
        match = _FAULT.match(message)
        self.kernel = match.group(1) if match else None
        self.block = tuple(int(v) for v in match.group(2, 3, 4)) if match else None
        thread = match.group(5, 6, 7) if match else ("?",)
        self.thread = None if "?" in thread else tuple(int(v) for v in thread)
        self.what = match.group(8) if match else message


@dataclass(frozen=True)
class KernelInfo:
    index: int
    name: str
    signature: str
    param_names: tuple[str, ...]
    max_threads: int  # from __launch_bounds__, 0 if unknown
    cluster_dims: tuple[int, int, int]  # from __cluster_dims__, (1, 1, 1) without: a grid is a multiple


class Library:
    """The ctypes binding of one module.so (used in this process, or in the ASan worker process)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        lib = self._lib = ctypes.CDLL(str(path))
        for name in ("cuda_emu_kernel_name", "cuda_emu_kernel_signature", "cuda_emu_kernel_param_names"):
            getattr(lib, name).restype = ctypes.c_char_p
        lib.cuda_emu_launch.argtypes = [
            ctypes.c_int, ctypes.POINTER(ctypes.c_uint), ctypes.POINTER(ctypes.c_uint),
            ctypes.POINTER(ctypes.c_uint64), ctypes.c_uint64, ctypes.c_int, ctypes.c_uint64,
            ctypes.c_double, ctypes.c_char_p, ctypes.c_int, ctypes.POINTER(ctypes.c_uint64)]
        lib.cuda_emu_alloc.restype = ctypes.c_void_p
        lib.cuda_emu_alloc.argtypes = [ctypes.c_size_t, ctypes.c_size_t]
        lib.cuda_emu_free.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        lib.cuda_emu_set_asan_report_path.argtypes = [ctypes.c_char_p]
        lib.cuda_emu_kernel_cluster_dims.argtypes = [ctypes.c_int, ctypes.POINTER(ctypes.c_uint)]

    def kernels(self) -> list[tuple]:
        lib = self._lib

        def cluster_dims(i):
            dims = (ctypes.c_uint * 3)()
            lib.cuda_emu_kernel_cluster_dims(i, dims)
            return tuple(dims)

        return [(i, lib.cuda_emu_kernel_name(i).decode(), lib.cuda_emu_kernel_signature(i).decode(),
                 tuple(n for n in lib.cuda_emu_kernel_param_names(i).decode().split(",") if n),
                 lib.cuda_emu_kernel_max_threads(i), cluster_dims(i))
                for i in range(lib.cuda_emu_kernel_count())]

    # Each library keeps the fiber stacks of its last launches (up to 16384 fibers, two memory
    # mappings each): only the KEEP_WORKERS libraries launched last keep theirs, so that a process
    # that loads many modules stays below Linux's 65530 mappings (past them, no thread starts).
    KEEP_WORKERS = 2
    _launched_last: list = []

    def _keep_workers(self) -> None:
        last = Library._launched_last
        if self in last:
            last.remove(self)
        last.append(self)
        while len(last) > Library.KEEP_WORKERS:
            last.pop(0)._lib.cuda_emu_release_workers()

    def launch(self, index: int, grid: tuple, block: tuple, slots: Sequence[int], shared_bytes: int,
               order: int, seed: int, timeout: float) -> tuple[int, str, int]:
        """Run the kernel; returns (0 ok | 1 fault | 2 invalid launch, message, pc offset)."""
        self._keep_workers()
        message = ctypes.create_string_buffer(8192)
        pc = ctypes.c_uint64(0)
        rc = self._lib.cuda_emu_launch(
            index, (ctypes.c_uint * 3)(*grid), (ctypes.c_uint * 3)(*block),
            (ctypes.c_uint64 * max(1, len(slots)))(*slots), shared_bytes, order, seed & (2**64 - 1),
            timeout, message, len(message), ctypes.byref(pc))
        return rc, message.value.decode(errors="replace"), pc.value

    def alloc(self, size: int, phase: int) -> int:
        return self._lib.cuda_emu_alloc(size, phase)

    def free(self, address: int, phase: int) -> None:
        self._lib.cuda_emu_free(address, phase)

    def set_asan_report_path(self, path: str) -> None:
        self._lib.cuda_emu_set_asan_report_path(path.encode())


def source_location(shared_object: Path, pc_offset: int) -> str | None:
    """file:line of a code address in the module, skipping frames inside the emulator itself."""
    try:
        out = subprocess.run(["addr2line", "-e", str(shared_object), "-f", "-C", "-i", hex(pc_offset)],
                             capture_output=True, text=True, timeout=30).stdout.splitlines()
    except (OSError, subprocess.SubprocessError):
        return None
    for function, location in zip(out[0::2], out[1::2]):
        if not location.startswith("??") and not re.search(r"(cuda_emulation\.h|runtime\.cpp):", location):
            return f"{location.split(' (discriminator')[0]} (in {function})"
    return None


def _dim3(value, what: str) -> tuple[int, int, int]:
    dims = (int(value),) if isinstance(value, (int, np.integer)) else tuple(int(v) for v in value)
    if not 1 <= len(dims) <= 3 or any(not 1 <= d < 2**32 for d in dims):
        raise ValueError(f"{what} must be a positive int or a tuple of 1 to 3 positive ints, not {value!r}")
    return dims + (1,) * (3 - len(dims))


class EmulatedModule:
    """The kernels of one build(). launch() runs one in this process (or, for sanitize=True,
    in a worker process with AddressSanitizer) and raises KernelFault when it fails."""

    def __init__(self, path: Path, sanitize: bool, sources: Sequence[Path]):
        self.path, self.sanitize, self.sources = Path(path), sanitize, tuple(sources)
        if sanitize:
            from ._sanitize import SanitizedRunner
            self._runner = SanitizedRunner(self.path)
            table = self._runner.kernel_table
        else:
            self._library = Library(self.path)
            table = self._library.kernels()
        self._kernels = {row[1]: KernelInfo(*row) for row in table}

    def __repr__(self) -> str:
        names = ", ".join(self.kernel_names)
        return f"<EmulatedModule {names}{' (ASan)' if self.sanitize else ''} from {self.path}>"

    @property
    def kernel_names(self) -> list[str]:
        return list(self._kernels)

    def kernel(self, name: str) -> KernelInfo:
        try:
            return self._kernels[name]
        except KeyError:
            raise KeyError(f"no kernel {name!r}; found: {', '.join(self._kernels) or 'none'}") from None

    def signature(self, name: str) -> str:
        """One character per parameter: P pointer, q int64, i int32, f float32, d float64, ..."""
        return self.kernel(name).signature

    def launch(self, name: str, grid, block, args: Sequence, shared_bytes: int = 0, order: str = "forward",
               seed: int = 0, timeout: float | None = None) -> None:
        """Run kernel `name` on grid x block threads. Arrays are passed as pointers to their data
        and modified in place. Raises KernelFault, TypeError (arguments) or ValueError (launch)."""
        kernel = self.kernel(name)
        grid, block = _dim3(grid, "grid"), _dim3(block, "block")
        if order not in ORDERS:
            raise ValueError(f"order must be one of {ORDERS}, not {order!r}")
        slots, arrays = _encode_args(kernel, args)
        if self.sanitize:
            for i, arg in enumerate(args):
                if kernel.signature[i] == "P" and arg is not None and not isinstance(arg, np.ndarray):
                    raise TypeError(f"parameter {i} of {name}: a sanitize=True module runs in a worker "
                                    "process, so pass numpy arrays (or None), not raw addresses")
        timeout = DEFAULT_TIMEOUT if timeout is None else float(timeout)
        request = (kernel.index, grid, block, slots, int(shared_bytes), ORDERS.index(order), int(seed), timeout)
        if self.sanitize:
            rc, message, pc = self._runner.launch(kernel.name, request, arrays)
        else:
            rc, message, pc = self._library.launch(*request)
        if rc == 2:
            raise ValueError(f"invalid launch of {name}: {message}")
        if rc != 0:
            location = source_location(self.path, pc) if pc else None
            raise KernelFault(message + (f" at {location}" if location else ""))


def _encode_args(kernel: KernelInfo, args: Sequence) -> tuple[list[int], list[tuple[int, np.ndarray]]]:
    """Check arguments against the kernel's signature; return the 8-byte argument slots and the
    (parameter index, array) pairs passed as pointers."""
    args = list(args)
    signature, names = kernel.signature, kernel.param_names
    if len(args) != len(signature):
        raise TypeError(f"{kernel.name}({', '.join(names)}) takes {len(signature)} argument(s), got {len(args)}")
    slots, arrays = [], []
    for i, (code, arg) in enumerate(zip(signature, args)):
        where = f"parameter {i} ({names[i] if i < len(names) else '?'}) of {kernel.name}"
        if code == "P":
            if arg is None:
                slots.append(0)
            elif isinstance(arg, np.ndarray):
                if not arg.flags.c_contiguous:
                    raise TypeError(f"{where}: the array must be C-contiguous")
                slots.append(arg.__array_interface__["data"][0])
                arrays.append((i, arg))
            elif isinstance(arg, (int, np.integer)) and not isinstance(arg, (bool, np.bool_)) and 0 <= arg < 2**64:
                slots.append(int(arg))  # a raw address
            else:
                raise TypeError(f"{where} is a pointer: pass a numpy array, None or an address, "
                                f"not {type(arg).__name__}")
        elif code in SCALAR_TYPES:
            expected = np.dtype(SCALAR_TYPES[code])
            if not (isinstance(arg, np.generic) and arg.dtype == expected):
                raise TypeError(f"{where} is {expected.name}: pass np.{expected.name}(...), not "
                                f"{type(arg).__name__} {arg!r}")
            slots.append(int.from_bytes(arg.tobytes(), "little"))
        else:
            raise TypeError(f"{where} has a type that cannot be passed from Python")
    return slots, arrays


_built: dict[tuple, tuple[dict[Path, int], EmulatedModule]] = {}


def _mtime(path: Path) -> int:
    try:
        return path.stat().st_mtime_ns
    except OSError:
        return -1


def build(sources: Sequence[os.PathLike | str], include_dirs: Sequence[os.PathLike | str] = (),
          sanitize: bool = False, defines: Mapping[str, object] | None = None,
          extra_flags: Sequence[str] = ()) -> EmulatedModule:
    """Compile CUDA sources (any paths: copies with planted bugs too) into an EmulatedModule.

    defines become -D flags (value None: defined without a value); extra_flags are appended to
    the compiler command (e.g. ["-O2"]). sanitize=True builds with AddressSanitizer and runs
    launches in a worker process. Results are cached per process and in a folder in the
    system's temporary directory (CUDA_EMULATION_CACHE overrides), keyed by a content hash."""
    source_paths = tuple(Path(s).resolve() for s in sources)
    for path in source_paths:
        if not path.is_file():
            raise FileNotFoundError(path)
    include_paths = tuple(Path(d).resolve() for d in include_dirs)
    defines = dict(defines or {})
    key = (source_paths, include_paths, tuple(sorted((k, str(v)) for k, v in defines.items())),
           bool(sanitize), tuple(extra_flags))
    if key in _built:
        dependencies, module = _built[key]
        if all(_mtime(path) == mtime for path, mtime in dependencies.items()):
            return module
    path, dependency_list = build_shared_object(source_paths, include_paths, defines, bool(sanitize), extra_flags)
    module = EmulatedModule(path, bool(sanitize), source_paths)
    _built[key] = ({p: _mtime(p) for p in dependency_list}, module)
    return module
