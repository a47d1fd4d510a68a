"""Where the CUDA sources are, how nvcc compiles them, and the per-machine cache of cubins.

The sources ship with the package (puzzlelib_cost/kernels after `pip install .`;
kernels/ at the top of a source checkout).  A cubin is compiled once per GPU
architecture and source version and cached under ~/.cache/puzzlelib_cost, so a
second process loads it without running nvcc.
"""
import hashlib
import os
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

MAIN_SOURCE = "all_costs.cu"   # includes every family's .cu
NVCC_FLAGS = ("-std=c++17", "-O3", "--cubin")   # no fast math: subnormal probabilities keep their logarithms
_BUILDING = {}                  # cubin path -> the lock its build holds (one build per cubin in a process)
_BUILDING_LOCK = threading.Lock()


def kernel_dir():
    """The kernels of the package imported: kernels/ beside it in a source checkout, first (an
    editable install maps puzzlelib_cost.kernels to the checkout it was made from, so a clone run
    with PYTHONPATH compiled, predicted and prebuilt the other checkout's kernels), else the
    installed puzzlelib_cost/kernels."""
    beside = Path(__file__).resolve().parents[2] / "kernels"
    if (beside / MAIN_SOURCE).is_file():
        return beside
    from .. import kernels
    return Path(kernels.__file__).parent


def nvcc_command(arch, output, extra=(), directory=None):
    """The nvcc command line that compiles every kernel of `directory` (default: the library's)
    for `arch` (e.g. "sm_90") into `output`."""
    directory = Path(directory) if directory else kernel_dir()
    return ["nvcc", *NVCC_FLAGS, f"-arch={arch}", f"-I{directory}", *extra,
            "-o", str(output), str(directory / MAIN_SOURCE)]


def sources_digest(directory=None):
    """A digest of the kernels' sources (every .cu and .cuh of `directory`, default the library's):
    what a timing recorded beside it was timed on (benchmarks/try_choices.py's results)."""
    directory = Path(directory) if directory else kernel_dir()
    digest = hashlib.sha256()
    for path in sorted(directory.glob("*.cu*")):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


def cubin_path(arch, defines=(), directory=None):
    """Where the cache keeps the cubin for `arch` and these kernels: named by a digest of the
    sources, the nvcc flags and nvcc's version, so that any change of them builds anew."""
    if shutil.which("nvcc") is None:
        raise RuntimeError("nvcc was not found on PATH; it compiles the CUDA kernels on first use")
    extra = tuple(f"-D{define}" for define in defines)
    digest = hashlib.sha256(sources_digest(directory).encode())
    digest.update(" ".join(NVCC_FLAGS + extra).encode())
    digest.update(subprocess.run(["nvcc", "--version"], capture_output=True, text=True).stdout.encode())
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "puzzlelib_cost"
    return cache / f"all_costs-{arch}-{digest.hexdigest()[:16]}.cubin"


def cached_cubin(arch, defines=(), directory=None):
    """Path of the cubin for `arch`, compiling it on the first use on this machine.  `defines`
    (-D flags) and `directory` (another copy of the kernels) serve benchmarks/cost_model.py."""
    directory = Path(directory) if directory else kernel_dir()
    extra = tuple(f"-D{define}" for define in defines)
    cubin = cubin_path(arch, defines, directory)
    cache = cubin.parent
    with _BUILDING_LOCK:
        lock = _BUILDING.setdefault(cubin, threading.Lock())
    with lock:   # a second thread asking for the same cubin waits for the first one's build
        if not cubin.exists():
            cache.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=cache) as tmp:   # compile aside, then rename: safe across processes
                partial = Path(tmp) / cubin.name
                result = subprocess.run(nvcc_command(arch, partial, extra, directory), capture_output=True, text=True)
                if result.returncode != 0:
                    raise RuntimeError(f"nvcc failed for {arch}:\n{result.stderr}")
                os.replace(partial, cubin)
    return cubin
