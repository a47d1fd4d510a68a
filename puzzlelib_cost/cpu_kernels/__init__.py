"""Compiled CPU kernels, an optional extra (`pip install "puzzlelib_cost[cpu]"`: numba).

The NumPy backend cuts every cost into cache-sized blocks (backends/numpy_blocks.py) and runs a
few NumPy calls a block, one pass over the block per operation.  With numba installed, the
hottest blocks run one fused, vectorised loop instead (this package mirrors kernels/ for the
GPU): KLDivergence's rows (forward, reverse and JSD) and 2-D CrossEntropy with them, CrossEntropy
on spatial scores, MSE, Abs, SmoothL1, BCE and Hinge, for float32 inputs (the elementwise costs also for
16-bit ones, which their blocks convert first).  They compute as the NumPy blocks do (float32 arithmetic, float64 sums, the same blocks
in the same order), so results stay bitwise the same for any number of threads, and agree with
the NumPy path to float32 rounding; exp and log are vmath's, within 2 ulp.  numba compiles them
on first use and caches the machine code beside this package.

PUZZLELIB_COST_CPU_KERNELS=numpy (or `cpu_kernels.ENABLED = False`) keeps the NumPy blocks, as
does numba's NUMBA_DISABLE_JIT=1 (the kernels' intrinsics have no pure-Python form).  Where numba
has nowhere to write its cache (a read-only install, no writable home or NUMBA_CACHE_DIR), the
kernels are compiled in each process instead.
"""
import logging
import os

from ..errors import CostError

_SETTING = os.environ.get("PUZZLELIB_COST_CPU_KERNELS", "")
_MODE = _SETTING.strip().lower() or "numba"
ENABLED = _MODE != "numpy"
CACHE = True     # numba's on-disk cache of the machine code (kernels.OPTIONS, row_pool.OPTIONS)
_compiled = []   # [module or None], filled on first use


def check_setting():
    """CostError for a PUZZLELIB_COST_CPU_KERNELS other than numba or numpy: asked by the choice of
    the CPU backend, among a call's checks (asked first inside the work, a call failed part way,
    a Multi's children before it counted)."""
    if _MODE not in ("numba", "numpy"):
        raise CostError(f"PUZZLELIB_COST_CPU_KERNELS: expected numba or numpy, got {_SETTING!r}")


def compiled():
    """The module of compiled kernels (cpu_kernels.kernels), or None: numba is not installed or
    its JIT is disabled, or the kernels are switched off."""
    global CACHE
    check_setting()
    if not ENABLED:
        return None
    if not _compiled:
        try:
            import numba
            if numba.config.DISABLE_JIT:
                raise ImportError("NUMBA_DISABLE_JIT")
            try:
                from . import kernels
            except RuntimeError:   # numba: "cannot cache function ...: no locator available"
                CACHE = False
                from . import kernels
            kernels.ready()   # (numba's first call: its registries set up here, where a failure is caught)
        except ImportError:   # numba (the `cpu` extra) is not installed, or its JIT is off
            kernels = None
        except Exception as exc:   # numba half set up: a Ctrl-C during its import or first call broke every later call
            logging.getLogger("puzzlelib_cost").warning(
                "puzzlelib_cost: numba cannot be used in this process (%s: %s; a Ctrl-C while it was being "
                "imported or set up leaves it half set up): NumPy's blocks run instead, with the same results to "
                "float32 rounding; restart the process for the compiled ones", type(exc).__name__, exc)
            kernels = None
        _compiled.append(kernels)
    return _compiled[0]
