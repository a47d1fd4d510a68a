import os
import subprocess
import sys
from pathlib import Path

import pytest

# Tests import their helpers (reference, emulated_device, cuda_emulation, driver_standin) by plain name.
sys.path.insert(0, str(Path(__file__).parent))

# The tests start nvcc from several threads at once (the compile test's two builders, the stand-in's
# cubin, the emulation's objects).  One fresh-clone CI run (bff74e3) saw every start of the compile
# test's builders fail with "OSError: [Errno 14] Bad address: 'nvcc'", and its rerun pass.  CPython
# 3.11 starts a child with vfork, which shares the parent's memory with the child until exec while
# the parent's other threads run on; the subprocess docs name this switch to fork instead
# ("Disabling use of vfork() or posix_spawn()").  A guess, not shown: the flake did not recur in
# 600 threaded starts here, and fork costs a few milliseconds a start.
subprocess._USE_VFORK = False

KERNELS = Path(__file__).resolve().parents[1] / "kernels"

# Where the API tests put their arrays: numpy arrays; puzzlelib_cost.gpuarray arrays (host arrays
# while no CUDA is usable); and gpuarray arrays once pycuda runs (a GPU or the driver stand-in).
ARRAY_KINDS = ["numpy", "gpuarray", pytest.param("pycuda", marks=pytest.mark.pycuda)]


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "pycuda: runs through pycuda on a CUDA driver: the real one where a GPU is usable, else the "
                   "driver stand-in (tests/driver_standin) with the kernels in the CPU emulation; runs last")


_STANDIN_CUBIN = []   # [the thread building the stand-in's cubin], see start_standin_cubin


def start_standin_cubin():
    """Where the pycuda tests will run on the driver stand-in (no CUDA driver, nvcc present), start
    nvcc's sm_90 build of the kernels for it now, in the background: about a minute on a cold
    cache, which then overlaps the CPU tests that run first (mostly on one core) instead of
    holding up the pycuda tests at the end.  cuda_driver() waits for it."""
    import shutil
    import threading
    import driver_standin
    if shutil.which("nvcc") is None or driver_standin.real_driver_present() or gpu_required():
        return

    def build():
        from puzzlelib_cost.backends.kernel_build import cached_cubin
        try:
            cached_cubin("sm_90")
        except RuntimeError:
            pass   # (cuda_driver() compiles again and reports it)
    _STANDIN_CUBIN.append(threading.Thread(target=build, name="stand-in cubin", daemon=True))
    _STANDIN_CUBIN[0].start()


@pytest.hookimpl(trylast=True)   # (after -k and -m have deselected)
def pytest_collection_modifyitems(items):
    # Once loaded, the stand-in stays pycuda's driver for the rest of the process, and the library
    # then finds a "GPU": every test that expects none must run before the first pycuda test.
    items.sort(key=lambda item: item.get_closest_marker("pycuda") is not None)
    # The long nvcc builds start now, in the background, beside the tests that run first.
    if items and items[-1].get_closest_marker("pycuda") is not None:
        start_standin_cubin()
    compile_tests = [item for item in items if getattr(item, "module", None) is not None
                     and item.module.__name__.endswith("test_kernel_compile")]
    if compile_tests:
        compile_tests[0].module.start_builds()


def gpu_required():
    """What demands a real GPU for the pycuda tests (they then fail without one, not skip), or None:
    PUZZLELIB_COST_BACKEND=cuda, or PUZZLELIB_COST_REQUIRE_GPU=1, which benchmarks/run_on_gpu.sh
    sets instead because the library obeys the first (it refuses the host arrays that the tests
    compare with) while the second pins nothing."""
    if os.environ.get("PUZZLELIB_COST_BACKEND", "").strip().lower() == "cuda":
        return "PUZZLELIB_COST_BACKEND=cuda"
    if os.environ.get("PUZZLELIB_COST_REQUIRE_GPU", "").strip() == "1":
        return "PUZZLELIB_COST_REQUIRE_GPU=1"
    return None


def _no_real_gpu(reason):
    """Skip, or fail where gpu_required() says a real GPU must be there."""
    required = gpu_required()
    if required:
        pytest.fail(f"{required} requires a real GPU, and none is usable: {reason}", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def cuda_driver():
    """"gpu" where a real GPU is usable, else the loaded driver stand-in with the library's kernels
    registered (the cubin nvcc makes for the stand-in's sm_90, run as their CPU emulation); with
    gpu_required(), no stand-in: a failure."""
    import driver_standin
    from cuda_emulation import build
    from puzzlelib_cost import CostError, backends
    from puzzlelib_cost.backends.kernel_build import MAIN_SOURCE, cached_cubin

    if driver_standin.real_driver_present():
        try:
            usable = backends.active_backend() == "cuda"
            why = backends.describe_backend()
        except CostError as exc:   # PUZZLELIB_COST_BACKEND=cuda and CUDA not usable: it says why
            usable, why = False, str(exc)
        if not usable:
            _no_real_gpu(f"a CUDA driver is installed but the library cannot use it: {why}")
        return "gpu"
    if gpu_required():
        _no_real_gpu("no CUDA driver is installed here (the driver stand-in is no GPU)")
    try:
        # The stand-in first: where there is none, the test skips without waiting for the cubin's
        # build that start_standin_cubin began (minutes on a cold cache).
        standin = driver_standin.activate()
        for thread in _STANDIN_CUBIN:
            thread.join()
        cubin = cached_cubin("sm_90")
    except (driver_standin.Unavailable, RuntimeError) as exc:
        pytest.skip(f"no GPU, and the driver stand-in is not usable: {exc}")
    standin.register_cubin(cubin, build([KERNELS / MAIN_SOURCE], include_dirs=[KERNELS]))
    backends.forget_cuda()   # CUDA was not usable when earlier tests asked
    return standin


@pytest.fixture
def standin(cuda_driver):
    """The driver stand-in (skips on a real GPU: the test needs what only the stand-in can show)."""
    if cuda_driver == "gpu":
        pytest.skip("needs the driver stand-in, which runs only where no real CUDA driver is installed")
    return cuda_driver


@pytest.fixture(autouse=True)
def _no_stream_hazards(request):
    """pycuda tests on the stand-in: fail on any stream hazard the test caused."""
    if request.node.get_closest_marker("pycuda") is None:
        yield
        return
    driver = request.getfixturevalue("cuda_driver")
    if driver == "gpu":
        yield
        return
    driver.clear()
    yield
    hazards = driver.hazards()
    assert not hazards, "stream hazards:\n" + "\n".join(hazards)


@pytest.fixture(scope="session")
def kernel_module():
    """Every kernel of the library (kernels/all_costs.cu) built for the CPU emulation."""
    from cuda_emulation import build
    from puzzlelib_cost.backends.kernel_build import MAIN_SOURCE
    return build([KERNELS / MAIN_SOURCE], include_dirs=[KERNELS])


class Place:
    """Where a cost test runs: `put(host_array)` makes the array the backend takes (a list or
    tuple is put element by element), `get(result)` brings a result back as a numpy array (a
    list element by element).  `name` is "numpy", "emulated" or "pycuda"; `device` the
    EmulatedDevice on "emulated" (its `launches` name the kernels run), else None."""

    def __init__(self, name, put, device=None):
        self.name, self._put, self.device = name, put, device

    def put(self, array):
        if isinstance(array, (list, tuple)):
            return [self.put(a) for a in array]
        return self._put(array)

    def get(self, array):
        import numpy as np
        if isinstance(array, (list, tuple)):
            return [self.get(a) for a in array]
        return np.asarray(array.get() if hasattr(array, "get") else array)


def use_cpu_kernels(monkeypatch, compiled):
    """The NumPy backend with its compiled blocks (puzzlelib_cost.cpu_kernels, the `cpu` extra) or
    with NumPy's alone; skips the compiled case where numba is not installed."""
    from puzzlelib_cost import cpu_kernels
    monkeypatch.setattr(cpu_kernels, "ENABLED", compiled)
    if compiled and cpu_kernels.compiled() is None:
        pytest.skip("numba (the cpu extra) is not installed: the compiled CPU blocks are not tested")


@pytest.fixture(params=["numpy", "compiled"])
def cpu_blocks(request, monkeypatch):
    """Each CPU test with NumPy's blocks and with the compiled ones (cpu_kernels)."""
    use_cpu_kernels(monkeypatch, request.param == "compiled")
    return request.param


@pytest.fixture(params=["numpy", "numpy-compiled", "emulated", pytest.param("pycuda", marks=pytest.mark.pycuda)])
def place(request, monkeypatch):
    """Each cost test on the NumPy backend, on the CUDA backend with the kernels in the CPU
    emulation, and through pycuda (a real GPU, else the driver stand-in); the NumPy backend twice:
    with NumPy's blocks alone and with the compiled ones (cpu_kernels, where numba is installed).  The emulated place is
    a GPU before sm_90 (no thread-block clusters: long rows take the chunked kernels); the
    stand-in reports sm_90 (long rows of up to 64K elements take the cluster kernels), so each
    long-row test reaches both paths."""
    import numpy as np
    from puzzlelib_cost import backends
    if request.param.startswith("numpy"):
        use_cpu_kernels(monkeypatch, request.param == "numpy-compiled")
        yield Place("numpy", np.array)
    elif request.param == "emulated":
        from emulated_device import EmuArray, EmulatedDevice
        from puzzlelib_cost.backends.cuda_backend import CudaBackend
        device = EmulatedDevice(request.getfixturevalue("kernel_module"), clusters=False)
        with backends.substituted_cuda(CudaBackend(device)):
            yield Place("emulated", lambda a: EmuArray(np.array(a)), device)
    else:
        request.getfixturevalue("cuda_driver")
        from puzzlelib_cost import gpuarray
        yield Place("pycuda", lambda a: gpuarray.to_gpu(np.ascontiguousarray(a)))


@pytest.fixture
def emulated_in_every_order(kernel_module):
    """emulated_in_every_order(fn): runs fn(place) once per thread order of the CPU emulation
    (forward, reverse, two random seeds) and returns the list of its results."""
    import numpy as np
    from emulated_device import EmuArray, EmulatedDevice
    from puzzlelib_cost import backends
    from puzzlelib_cost.backends.cuda_backend import CudaBackend

    def run(fn):
        results = []
        for order, seed in (("forward", 0), ("reverse", 0), ("random", 1), ("random", 2)):
            device = EmulatedDevice(kernel_module, order=order, seed=seed)
            with backends.substituted_cuda(CudaBackend(device)):
                results.append(fn(Place("emulated", lambda a: EmuArray(np.array(a)), device)))
        return results
    return run
