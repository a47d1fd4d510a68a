"""Run the project's CUDA C kernels on the CPU in tests.

The very same .cu files are compiled with g++ against cuda_emulation.h (its top comment says
precisely what is and is not modelled) and launched from Python:

    from tests.cuda_emulation import build, KernelFault, ORDERS
    mod = build([Path("kernels/kl_divergence.cu")], include_dirs=[Path("kernels")])
    mod.kernel_names                   # entry points found, e.g. ["kl_forward", ...]
    mod.signature("kl_forward")        # "PPPqqi": P pointer, q int64, i int32, f float32, d float64
    mod.kernel("kl_forward").cluster_dims  # (8, 1, 1) for __cluster_dims__(8, 1, 1), else (1, 1, 1)
    for order in ORDERS:               # "forward", "reverse", "random" (with seed=...)
        mod.launch("kl_forward", grid=4, block=256, args=[x, y, out, np.int64(n)], order=order)

Arrays are passed as pointers to their data (C-contiguous, modified in place), scalars as numpy
scalars of the parameter's exact type. A failing kernel raises
KernelFault("kernel K block (x,y,z) thread (x,y,z): what"); bad arguments raise TypeError, an
invalid launch configuration ValueError. build(..., sanitize=True) adds AddressSanitizer (its
launches run in a worker process) to find out-of-bounds accesses.

Environment: CXX (default g++), CUDA_HOME (toolkit headers; else found via nvcc or
/usr/local/cuda), CUDA_EMULATION_CACHE (build cache folder; default in the system temp dir),
CUDA_EMULATION_TIMEOUT (seconds per launch, default 60), CUDA_EMULATION_WORKERS (blocks, or
thread block clusters, run at once, default 2: a cluster of K blocks runs on K OS threads that take
turns, see runtime.cpp).

Files: _build.py compiles, _module.py loads and launches, _sanitize.py runs ASan launches in a
worker process, runtime.cpp is the C++ half of the emulator, include/ shadows toolkit headers:
cooperative_groups.h with the thread block and cluster groups, and those of features that cannot
be emulated.
"""

import sys

from ._build import BuildError
from ._module import ORDERS, EmulatedModule, KernelFault, build

__all__ = ["build", "EmulatedModule", "KernelFault", "BuildError", "ORDERS"]

# The package is importable as `tests.cuda_emulation` and, with tests/ on sys.path, as
# `cuda_emulation`. Register this one module object under both names so that classes such as
# KernelFault are the same whichever way a test imports them.
for _name in ("cuda_emulation", "tests.cuda_emulation"):
    sys.modules.setdefault(_name, sys.modules[__name__])
