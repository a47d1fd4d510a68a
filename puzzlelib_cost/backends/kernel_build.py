"""Where the CUDA sources are, how nvcc compiles them, and the per-machine cache of cubins.

The sources ship with the package (puzzlelib_cost/kernels after `pip install .`;
kernels/ at the top of a source checkout).  A cubin is compiled once per GPU
architecture and source version and cached under $XDG_CACHE_HOME/puzzlelib_cost
(~/.cache/puzzlelib_cost), else, where that cannot be written, in a folder of the
user's under the system's temporary folder; a later process loads it without nvcc.
"""
import contextlib
import functools
import hashlib
import logging
import os
import shutil
import stat
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
# The first use on a machine compiles for minutes, which looked like a hang: it says so, as a
# warning of the library's logger (which Python shows where the program set up no logging; not a
# `warnings` warning, which `-W error` would turn into a failed first call).
log = logging.getLogger("puzzlelib_cost")


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
    """The folders that hold cubins, in the order they are looked in; a cubin is built into the
    first.  The cache: $XDG_CACHE_HOME/puzzlelib_cost where that is an absolute path (as the XDG spec
    asks), else ~/.cache/puzzlelib_cost; read where it cannot be written (a cache made ready for
    the machine) and then followed, for the builds, by the user's own folder under the temporary
    folder (a read-only home; no home at all: a container's user without one).  That folder is
    taken only where it is the user's and no one else's can write to it: another user could
    otherwise leave cubins there under the names ours take."""
    folders = []
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    try:
        folders.append(Path(xdg) / "puzzlelib_cost" if os.path.isabs(xdg) else Path.home() / ".cache" / "puzzlelib_cost")
    except RuntimeError:   # (no HOME, and no passwd entry)
        pass
    if not folders or not _writable(folders[0]):
        private = _private_temporary_folder()
        if private is not None:
            folders.append(private)
    return folders


def _writable(folder):
    """Whether `folder` exists, or can be made, and can be written."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError:
        return False
    return os.access(folder, os.W_OK | os.X_OK)


def _private_temporary_folder():
    """puzzlelib_cost-<uid> in the temporary folder, made for the user alone (0700); None where it is
    not a folder of the user's that only the user can write to, or cannot be made."""
    if not hasattr(os, "getuid"):
        return None
    folder = Path(tempfile.gettempdir()) / f"puzzlelib_cost-{os.getuid()}"
    try:
        folder.mkdir(mode=0o700, exist_ok=True)
        found = os.lstat(folder)
    except OSError:
        return None
    if not stat.S_ISDIR(found.st_mode) or found.st_uid != os.getuid() or found.st_mode & 0o022:
        return None
    return folder


def _nvcc_version():
    """nvcc's version text, or None where nvcc is not on PATH."""
    nvcc = shutil.which("nvcc")
    return None if nvcc is None else _version_of(nvcc)


@functools.lru_cache(maxsize=8)
def _version_of(nvcc):
    """`nvcc --version` of the nvcc at that path, asked once a process (3 ms a run; each look for a
    cubin asks, and cost_model.py looks for dozens)."""
    return subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout


def _cubin_stem(arch, defines, directory):
    """all_costs-<arch>-<digest of the sources and the nvcc flags>: the name of a cubin of these
    kernels, less the digest of the nvcc that built it."""
    extra = tuple(f"-D{define}" for define in defines)
    digest = hashlib.sha256(sources_digest(directory).encode())
    digest.update(" ".join(NVCC_FLAGS + extra).encode())
    return f"all_costs-{arch}-{digest.hexdigest()[:16]}"


def cubin_path(arch, defines=(), directory=None):
    """Where the cache keeps the cubin for `arch` and these kernels (where it would be built, if it
    holds none whole): named by a digest of the sources and the nvcc flags, then one of nvcc's
    version, so that any change of them builds anew.  Without nvcc on PATH, the whole cubin the
    cache holds for these sources and flags (the newest, where several nvcc versions built one):
    a machine that has the cubins needs no nvcc; RuntimeError where it holds none."""
    stem = _cubin_stem(arch, defines, directory)
    folders = cache_dirs()
    version = _nvcc_version()
    if version is None:
        cached = [path for folder in folders for path in folder.glob(stem + "-*.cubin") if cubin_intact(path)]
        if not cached:
            raise RuntimeError("nvcc was not found on PATH; it compiles the CUDA kernels on first use (no cubin "
                               f"of these kernels for {arch} is cached in {' or '.join(map(str, folders))})")
        return max(cached, key=lambda path: path.stat().st_mtime)
    name = f"{stem}-{hashlib.sha256(version.encode()).hexdigest()[:8]}.cubin"
    if not folders:
        raise RuntimeError("no folder for the compiled kernels: no home, and no temporary folder of the user's own")
    return next((folder / name for folder in folders if cubin_intact(folder / name)), folders[-1] / name)


def cubin_cached(arch, defines=(), directory=None):
    """Whether the cache holds the cubin for `arch` and these kernels whole (no build needed)."""
    try:
        return cubin_intact(cubin_path(arch, defines, directory))
    except RuntimeError:   # (no nvcc, and none cached)
        return False


def cached_cubin(arch, defines=(), directory=None):
    """Path of the cubin for `arch`, compiling it on the first use on this machine (and where the
    cache holds it cut short).  `defines` (-D flags) and `directory` (another copy of the kernels)
    serve benchmarks/cost_model.py."""
    directory = Path(directory) if directory else kernel_dir()
    extra = tuple(f"-D{define}" for define in defines)
    name = cubin_path(arch, defines, directory).name
    with _BUILDING_LOCK:
        lock = _BUILDING.setdefault(name, threading.Lock())
    with lock:   # a second thread asking for the same cubin waits for the first one's build, and takes it
        cubin = cubin_path(arch, defines, directory)
        if not cubin_intact(cubin):   # (missing, or cut short: a copy, a disk full, a crash)
            cubin = _build(arch, extra, directory, cubin.name)
    return cubin


def cubin_intact(cubin):
    """Whether `cubin` is a whole 64-bit ELF file: its header, its tables of sections and of program
    segments, and every section's bytes inside it.  (A cubin cut short was loaded as it was,
    refused by the driver, and kept: every later process ran on the CPU.)"""
    try:
        with open(cubin, "rb") as file:
            header = file.read(64)
            size = os.fstat(file.fileno()).st_size
            if len(header) < 64 or header[:6] != b"\x7fELF\x02\x01":   # (64-bit, little-endian)
                return False
            field = lambda at, width: int.from_bytes(header[at:at + width], "little")  # noqa: E731
            sections, section_size, section_count = field(0x28, 8), field(0x3A, 2), field(0x3C, 2)
            segments, segment_size, segment_count = field(0x20, 8), field(0x36, 2), field(0x38, 2)
            if not sections or sections + section_size * section_count > size or \
                    segments + segment_size * segment_count > size or section_size < 64:
                return False
            file.seek(sections)
            table = file.read(section_size * section_count)
    except OSError:
        return False
    for entry in range(section_count):
        at = entry * section_size
        kind = int.from_bytes(table[at + 4:at + 8], "little")
        offset, length = (int.from_bytes(table[at + k:at + k + 8], "little") for k in (0x18, 0x20))
        if kind != 8 and offset + length > size:   # (8: SHT_NOBITS, which takes no bytes of the file)
            return False
    return True


def _build(arch, extra, directory, name):
    """Compile into the first cache folder that can be written (compiled aside, then renamed: safe
    across processes, and a killed build leaves no partial cubin); the cubin's path."""
    if shutil.which("nvcc") is None:
        raise RuntimeError("nvcc was not found on PATH; it compiles the CUDA kernels on first use")
    unwritable = []
    for folder in cache_dirs():
        try:   # (only these mean "this folder cannot be written": the next one is tried)
            folder.mkdir(parents=True, exist_ok=True)
            _remove_stale_builds(folder)
            building = tempfile.TemporaryDirectory(dir=folder)
        except OSError as exc:   # (a read-only home, a cache path that is a file)
            unwritable.append(f"{folder}: {exc}")
            continue
        with building as tmp, _one_build_across_processes(folder / name):
            if cubin_intact(folder / name):   # (another process built it while this one waited)
                return folder / name
            partial = Path(tmp) / name
            log.warning("puzzlelib_cost: compiling the CUDA kernels for %s with nvcc, once on this machine (a few "
                        "minutes); later processes load them from %s", arch, folder)
            started = time.monotonic()
            result = subprocess.run(nvcc_command(arch, partial, extra, directory), capture_output=True, text=True)
            if result.returncode != 0 or not partial.is_file():
                raise RuntimeError(f"nvcc failed for {arch} (exit status {result.returncode}):\n{result.stderr}")
            log.info("puzzlelib_cost: compiled %s in %.0f s", name, time.monotonic() - started)
            with open(partial, "r+b") as written:   # (on disk before the rename: no empty cubin after a crash)
                os.fsync(written.fileno())
            os.replace(partial, folder / name)
        return folder / name
    raise RuntimeError(f"no cache folder for the compiled kernels can be written: {'; '.join(unwritable)}")


@contextlib.contextmanager
def _one_build_across_processes(cubin):
    """An exclusive lock on <cubin>.lock for the build (where the system has fcntl): two processes'
    first uses on an empty cache each compiled for minutes; the second now waits, then takes the
    first's cubin."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    with open(cubin.with_name(cubin.name + ".lock"), "a") as lock:
        try:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.warning("puzzlelib_cost: waiting for another process's compile of %s", cubin.name)
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock.fileno(), fcntl.LOCK_UN)


def _remove_stale_builds(folder):
    """Build folders a killed process left (tempfile's tmp*, older than STALE_BUILD_SECONDS)."""
    for leftover in folder.glob("tmp*"):
        try:
            if leftover.is_dir() and time.time() - leftover.stat().st_mtime > STALE_BUILD_SECONDS:
                shutil.rmtree(leftover, ignore_errors=True)
        except OSError:
            pass


def _forget_locks_in_a_forked_child():
    """A fork while another thread built a cubin left the child waiting for its lock for ever."""
    global _BUILDING_LOCK
    _BUILDING_LOCK = threading.Lock()
    _BUILDING.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_locks_in_a_forked_child)
