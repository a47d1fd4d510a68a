"""Where the CUDA sources are, how nvcc compiles them, and the per-machine cache of cubins.

The sources ship with the package (puzzlelib_cost/kernels after `pip install .`;
kernels/ at the top of a source checkout).  A cubin is compiled once per GPU
architecture and source version and cached under $XDG_CACHE_HOME/puzzlelib_cost
(~/.cache/puzzlelib_cost), else, where that cannot be written, in a folder of the
user's under the system's temporary folder; a later process loads it without nvcc.
"""
import hashlib
import os
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path

MAIN_SOURCE = "all_costs.cu"   # includes every family's .cu
NVCC_FLAGS = ("-std=c++17", "-O3", "--cubin")   # no fast math: subnormal probabilities keep their logarithms
_BUILDING = {}                  # cubin name -> the lock its build holds (one build per cubin in a process)
_BUILDING_LOCK = threading.Lock()
STALE_BUILD_SECONDS = 3600      # a build folder left this long ago was a killed process's: removed


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


def cache_dirs():
    """The folders that may hold cubins, in the order they are looked in and built into: the
    cache ($XDG_CACHE_HOME/puzzlelib_cost where that is an absolute path, as the XDG spec asks, else
    ~/.cache/puzzlelib_cost), then the user's folder under the temporary folder, for a home that
    cannot be written (or found: a container's user without one)."""
    folders = []
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    if os.path.isabs(xdg):
        folders.append(Path(xdg) / "puzzlelib_cost")
    else:
        try:
            folders.append(Path.home() / ".cache" / "puzzlelib_cost")
        except RuntimeError:   # (no HOME, and no passwd entry)
            pass
    user = os.getuid() if hasattr(os, "getuid") else os.environ.get("USERNAME", "user")
    folders.append(Path(tempfile.gettempdir()) / f"puzzlelib_cost-{user}")
    return folders


def _nvcc_version():
    """nvcc's version text, or None where nvcc is not on PATH."""
    if shutil.which("nvcc") is None:
        return None
    return subprocess.run(["nvcc", "--version"], capture_output=True, text=True).stdout


def _cubin_stem(arch, defines, directory):
    """all_costs-<arch>-<digest of the sources and the nvcc flags>: the name of a cubin of these
    kernels, less the digest of the nvcc that built it."""
    extra = tuple(f"-D{define}" for define in defines)
    digest = hashlib.sha256(sources_digest(directory).encode())
    digest.update(" ".join(NVCC_FLAGS + extra).encode())
    return f"all_costs-{arch}-{digest.hexdigest()[:16]}"


def cubin_path(arch, defines=(), directory=None):
    """Where the cache keeps the cubin for `arch` and these kernels (where it would be built, if it
    holds none): named by a digest of the sources and the nvcc flags, then one of nvcc's version,
    so that any change of them builds anew.  Without nvcc on PATH, the cubin the cache holds for
    these sources and flags (the newest, where several nvcc versions built one): a machine that
    has the cubins needs no nvcc; RuntimeError where it holds none."""
    stem = _cubin_stem(arch, defines, directory)
    version = _nvcc_version()
    if version is None:
        cached = [path for folder in cache_dirs() for path in folder.glob(stem + "-*.cubin")]
        if not cached:
            raise RuntimeError("nvcc was not found on PATH; it compiles the CUDA kernels on first use (no cubin "
                               f"of these kernels for {arch} is cached in {' or '.join(map(str, cache_dirs()))})")
        return max(cached, key=lambda path: path.stat().st_mtime)
    name = f"{stem}-{hashlib.sha256(version.encode()).hexdigest()[:8]}.cubin"
    folders = cache_dirs()
    return next((folder / name for folder in folders if (folder / name).exists()), folders[0] / name)


def cached_cubin(arch, defines=(), directory=None, rebuild=False):
    """Path of the cubin for `arch`, compiling it on the first use on this machine (rebuild: again,
    in place of one the driver would not load).  `defines` (-D flags) and `directory` (another copy
    of the kernels) serve benchmarks/cost_model.py."""
    directory = Path(directory) if directory else kernel_dir()
    extra = tuple(f"-D{define}" for define in defines)
    cubin = cubin_path(arch, defines, directory)
    with _BUILDING_LOCK:
        lock = _BUILDING.setdefault(cubin.name, threading.Lock())
    with lock:   # a second thread asking for the same cubin waits for the first one's build
        if rebuild or not cubin_intact(cubin):   # (missing, or cut short: a copy, a disk full, a crash)
            cubin = _build(arch, extra, directory, cubin.name)
    return cubin


def cubin_intact(cubin):
    """Whether `cubin` is a whole 64-bit ELF file: its section headers, which ELF keeps at its end,
    inside it.  (A cubin cut short was loaded as it was, refused by the driver, and kept: every later
    process ran on the CPU.)"""
    try:
        with open(cubin, "rb") as file:
            header = file.read(64)
            size = os.fstat(file.fileno()).st_size
    except OSError:
        return False
    if len(header) < 64 or header[:5] != b"\x7fELF\x02":
        return False
    offset = int.from_bytes(header[0x28:0x30], "little")
    entry_size, entries = int.from_bytes(header[0x3A:0x3C], "little"), int.from_bytes(header[0x3C:0x3E], "little")
    return 0 < offset and offset + entry_size * entries <= size


def _build(arch, extra, directory, name):
    """Compile into the first cache folder that can be written (compiled aside, then renamed: safe
    across processes, and a killed build leaves no partial cubin); the cubin's path."""
    if shutil.which("nvcc") is None:
        raise RuntimeError(f"nvcc was not found on PATH; it compiles the CUDA kernels on first use (the cached {name} "
                           "is cut short)")
    unwritable = []
    for folder in cache_dirs():
        try:
            folder.mkdir(parents=True, exist_ok=True)
            _remove_stale_builds(folder)
            with tempfile.TemporaryDirectory(dir=folder) as tmp:
                partial = Path(tmp) / name
                result = subprocess.run(nvcc_command(arch, partial, extra, directory), capture_output=True, text=True)
                if result.returncode != 0:
                    raise RuntimeError(f"nvcc failed for {arch}:\n{result.stderr}")
                with open(partial, "rb") as written:   # (on disk before the rename: no empty cubin after a crash)
                    os.fsync(written.fileno())
                os.replace(partial, folder / name)
            return folder / name
        except OSError as exc:   # (a read-only home, a cache path that is a file)
            unwritable.append(f"{folder}: {exc}")
    raise RuntimeError(f"no cache folder for the compiled kernels can be written: {'; '.join(unwritable)}")


def _remove_stale_builds(folder):
    """Build folders a killed process left (tempfile's tmp*, older than STALE_BUILD_SECONDS)."""
    for leftover in folder.glob("tmp*"):
        try:
            if leftover.is_dir() and time.time() - leftover.stat().st_mtime > STALE_BUILD_SECONDS:
                shutil.rmtree(leftover, ignore_errors=True)
        except OSError:
            pass
