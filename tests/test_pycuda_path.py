"""The library's real pycuda path on the driver stand-in: devices, streams, threads, fork, nvcc,
CUDA graphs, and faults planted in the library or its kernels, each caught.

These need what only the stand-in shows (two devices, stream hazards, which device and stream
each kernel ran on) and skip on a real GPU, where tests/test_gpu.py covers the same ground with
PyTorch and CuPy.  Each test that plants a fault undoes it (monkeypatch, or the stand-in's
registrations) and makes the library look for CUDA again (backends.forget_cuda) afterwards.
"""
import contextlib
import ctypes
import os
import re
import shutil
import sys
import tempfile
import threading

import numpy as np
import pytest

import reference
from conftest import KERNELS
from cuda_emulation import build
from interface_array import InterfaceArray
from puzzlelib_cost import CostError, KLDivergence, active_backend, backends, describe_backend, gpuarray, row_softmax
from puzzlelib_cost.backends import cuda_driver, pycuda_device
from puzzlelib_cost.backends.kernel_build import cached_cubin
from puzzlelib_cost.backends.kernel_build import MAIN_SOURCE

pytestmark = pytest.mark.pycuda


@pytest.fixture(autouse=True)
def fresh_backends(standin):
    """Every test starts and ends with the library looking for CUDA anew (planted faults and
    changed environments do not leak into other tests)."""
    backends.forget_cuda()
    yield
    backends.forget_cuda()


@pytest.fixture
def driver():
    import pycuda.driver
    return pycuda.driver


@pytest.fixture
def context(driver):
    """Device 0's primary context, current for the test (it makes its own pycuda streams)."""
    context = driver.Device(0).retain_primary_context()
    context.push()
    yield context
    driver.Context.pop()
    context.detach()   # (a retained primary context is released by detach(), not by pycuda's destructor)


def inputs(shape=(6, 300), seed=0):
    rng = np.random.default_rng(seed)
    return (3 * rng.standard_normal(shape)).astype(np.float32), (2 * rng.standard_normal(shape)).astype(np.float32)


def check(error, grad, pred, target):
    ref = reference.kl_reference(pred.astype(np.float64), target.astype(np.float64), normTarget=True)
    assert abs(error - ref["error"]) <= 1e-5 * (abs(ref["error"]) + reference.term_magnitude(ref))
    np.testing.assert_allclose(grad, ref["grad"], rtol=1e-5, atol=1e-5 / ref["n"])


def state(div):
    return div.error, div.grad, div.batchsize, div.numOfSamples, div.getMeanError()


def on_device(ordinal, driver, *arrays):
    """pycuda arrays on device `ordinal` (made in its context, as a pycuda user would)."""
    context = driver.Device(ordinal).retain_primary_context()
    context.push()
    try:
        return [gpuarray.to_gpu(a) for a in arrays]
    finally:
        driver.Context.pop()
        context.detach()


def devices_of_launches(standin):
    return {line.split("device=")[1].split()[0] for line in standin.launches()}


# --- devices ------------------------------------------------------------------------------

def test_pycuda_arrays_on_device_1_run_on_device_1(standin, driver):
    pred, target = inputs()
    pred_1, target_1 = on_device(1, driver, pred, target)
    assert cuda_driver.pointer_device(int(pred_1.gpudata)) == 1
    standin.clear()
    error, grad = KLDivergence(normTarget=True)(pred_1, target_1)   # from the main thread: device 0 is current
    assert devices_of_launches(standin) == {"1"}
    assert cuda_driver.pointer_device(int(grad.gpudata)) == 1
    check(error, grad.get(), pred, target)


def test_pycuda_arrays_on_two_devices_are_refused_before_anything_changes(driver):
    pred, target = inputs()
    div = KLDivergence(normTarget=True)
    div(*on_device(0, driver, pred, target))
    before = state(div)
    pred_0, = on_device(0, driver, pred)
    target_1, = on_device(1, driver, target)
    with pytest.raises(CostError, match="the inputs must be on the same GPU, got pred on device 0, "
                                        "target on device 1"):
        div(pred_0, target_1)
    assert state(div) == before


def test_pycuda_one_cost_follows_its_arrays_from_device_to_device(driver):
    pred, target = inputs()
    div = KLDivergence(normTarget=True)
    errors = [div(*on_device(ordinal, driver, pred, target))[0] for ordinal in (0, 1, 0)]
    assert errors[0] == errors[1] == errors[2]
    assert div.getMeanError() == pytest.approx(errors[0], rel=1e-12)   # the accumulator moved along


def test_planted_device_0_context_for_device_1_arrays_is_caught(monkeypatch, driver):
    monkeypatch.setattr(backends, "_cuda_backend_for", lambda infos: backends.get_cuda_backend(0))
    pred_1, target_1 = on_device(1, driver, *inputs())
    with pytest.raises(driver.Error, match="is memory of device 1, but the launch is in a context of device 0"):
        KLDivergence(normTarget=True)(pred_1, target_1)


def test_arrays_of_a_context_of_their_own_are_refused_before_anything_changes(standin, driver, monkeypatch):
    """pycuda.autoinit makes a context of its own.  Its memory is refused with the way out, before
    anything changes, though the kernels could reach it (the stand-in answers DEVICE_POINTER as an
    H200 with driver 580 did): the work, on a stream of the primary context, is not ordered with
    that context's streams.  Memory of no context (the driver's answer 0) goes by reachability."""
    import pycuda.gpuarray
    pred, target = inputs()
    div = KLDivergence(normTarget=True)
    div(*on_device(0, driver, pred, target))
    before = state(div)
    own = driver.Device(0).make_context()
    try:
        arrays = [pycuda.gpuarray.to_gpu(a) for a in (pred, target)]
        with backends.get_cuda_backend(0).device.active():
            assert cuda_driver.reachable_here(int(arrays[0].gpudata))   # (the stand-in's answer, the H200's)
        refused = "pred: its memory belongs to a CUDA context of its own .* unordered with its streams; use " \
                  "pycuda.autoprimaryctx instead of pycuda.autoinit"
        with pytest.raises(CostError, match=refused):
            div(*arrays)
        assert state(div) == before and driver.Context.get_current() == own
        monkeypatch.setattr(cuda_driver, "memory_context", lambda pointer: 0)   # (as the virtual memory API's)
        monkeypatch.setattr(cuda_driver, "reachable_here", lambda pointer: False)
        with pytest.raises(CostError, match=refused):
            div(*arrays)
        assert state(div) == before
        del arrays
    finally:
        driver.Context.pop()
        own.detach()


def test_the_driver_is_asked_only_of_memory_not_from_the_librarys_pools(standin, driver, context, monkeypatch):
    """The library's own arrays (gpuarray.to_gpu's, the grads) are the primary context's by
    construction: the context check (a context push and a driver call, 5-7 us a call) is left
    out for them, and asked of a user's pycuda arrays; their context named, the driver is not
    asked whether the kernels reach them (only memory of no context goes by that)."""
    import pycuda.gpuarray
    asked, reached = [], []
    context_of = cuda_driver.memory_context
    monkeypatch.setattr(cuda_driver, "memory_context", lambda pointer: asked.append(pointer) or context_of(pointer))
    monkeypatch.setattr(cuda_driver, "reachable_here", lambda pointer: reached.append(pointer) or True)
    pred, target = inputs()
    div = KLDivergence(normTarget=True)
    _, grad = div(gpuarray.to_gpu(pred), gpuarray.to_gpu(target))
    div(grad, gpuarray.to_gpu(target))
    assert asked == []
    theirs = [pycuda.gpuarray.to_gpu(a) for a in (pred, target)]
    div(*theirs)
    assert asked == [int(a.gpudata) for a in theirs] and reached == []


def test_pycuda_data_off_its_element_alignment_is_refused(standin, driver, context):
    """A pycuda array over memory 2 bytes into a float32 allocation: the kernels' loads would fault
    (on a GPU, a misaligned address that leaves the context unusable)."""
    import pycuda.gpuarray
    base = pycuda.gpuarray.to_gpu(np.zeros(40, np.float32))   # (zeros compiles a kernel: the stand-in runs ours alone)
    shifted = pycuda.gpuarray.GPUArray((4, 8), np.float32, gpudata=int(base.gpudata) + 2)
    with pytest.raises(CostError, match="pred: expected data aligned to its 4-byte float32 elements, got address"):
        KLDivergence(normTarget=True)(shifted, base[:32].reshape(4, 8))


# --- threads ------------------------------------------------------------------------------

def test_pycuda_call_from_a_second_thread_leaves_no_context_behind(driver):
    pred, target = inputs()
    pred_dev, target_dev = gpuarray.to_gpu(pred), gpuarray.to_gpu(target)
    div, seen = KLDivergence(normTarget=True), {}

    def worker():
        seen["result"] = div(pred_dev, target_dev)
        seen["mean"] = div.getMeanError()
        seen["context after"] = driver.Context.get_current()

    thread = threading.Thread(target=worker)
    thread.start()
    thread.join()
    error, grad = seen["result"]
    check(error, grad.get(), pred, target)
    assert seen["mean"] == error and seen["context after"] is None


def test_pycuda_threads_at_once_share_the_device_and_its_pool():
    pred, target = inputs((4, 2000))
    pred_dev, target_dev = gpuarray.to_gpu(pred), gpuarray.to_gpu(target)
    results = []

    def worker():   # a cost per thread: a Cost, like PuzzleLib's, is not for two threads at once
        div = KLDivergence(normTarget=True)
        for _ in range(3):
            div(pred_dev, target_dev, queryError=False)
        results.append((div.getError(), div.getMeanError(), div.grad))   # (grad.get() needs a context: main thread)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(results) == 4
    for error, mean, grad in results:
        assert error == mean == results[0][0]
        check(error, grad.get(), pred, target)


# --- streams ------------------------------------------------------------------------------

def interface_inputs_on(stream, driver, pred, target):
    """pred and target copied to the device on `stream` (asynchronously), tagged with it."""
    arrays = []
    for host in (pred, target):
        memory = gpuarray.empty(host.shape, host.dtype)
        driver.memcpy_htod_async(memory.gpudata, host, stream)
        arrays.append(InterfaceArray(memory, host.shape, host.dtype, stream=stream.handle))
    return arrays


@pytest.mark.parametrize("non_blocking", [True, False])
def test_pycuda_interface_arrays_on_their_own_stream(driver, context, non_blocking):
    pred, target = inputs((5, 3000))
    stream = driver.Stream(flags=1 if non_blocking else 0)
    div = KLDivergence(normTarget=True)
    grad = div(*interface_inputs_on(stream, driver, pred, target), queryError=False)
    host = grad.get_async(stream=stream)   # the caller's next work, on its stream: must see our grad
    stream.synchronize()
    check(div.getError(), host, pred, target)


def test_pycuda_interface_arrays_on_the_per_thread_default_stream(driver):
    pred, target = inputs()
    arrays = [InterfaceArray(gpuarray.to_gpu(a), a.shape, a.dtype, stream=2) for a in (pred, target)]
    error, grad = KLDivergence(normTarget=True)(*arrays)
    check(error, grad.get(), pred, target)


def test_a_new_costs_scalars_never_take_a_grad_the_callers_stream_still_reads(driver, context):
    """A grad read on the caller's non-blocking stream S and dropped, then a new cost called with
    inputs that name S: its device scalars, written on the legacy stream before the call is
    ordered after S, came from the work's pool, the dropped grad's block among them (the
    stand-in saw the write race S's read).  They have a pool of their own."""
    pred, target = inputs((4, 10))
    stream = driver.Stream(flags=1)
    arrays = interface_inputs_on(stream, driver, pred, target)
    first = KLDivergence(normTarget=True)
    grad = first(*arrays, queryError=False)
    host = grad.get_async(stream=stream)   # the caller's later work on S reads the grad
    grad = first.grad = None               # and drops it
    error, _ = KLDivergence(normTarget=True)(*arrays)
    stream.synchronize()
    check(error, host, pred, target)


def test_pycuda_arrays_are_ordered_with_the_callers_blocking_stream(driver, context):
    """pycuda arrays' stream is the legacy default stream, which CUDA orders with every blocking
    stream (pycuda's drv.Stream() default): pred written on one before the call, and the grad read
    on it after, meet the call's kernels in order (the work stream waited on the legacy stream's
    own work alone: both were hazards)."""
    pred, target = inputs((4, 10))
    pred_dev, target_dev = gpuarray.to_gpu(np.zeros_like(pred)), gpuarray.to_gpu(target)
    stream = driver.Stream()   # blocking
    driver.memcpy_htod_async(pred_dev.gpudata, pred, stream)
    div = KLDivergence(normTarget=True)
    grad = div(pred_dev, target_dev, queryError=False)
    host = grad.get_async(stream=stream)
    stream.synchronize()
    check(div.getError(), host, pred, target)


def test_gpuarray_never_hands_the_user_memory_a_kernel_may_still_write(driver, context):
    """A grad dropped after an unsynchronised call, then gpuarray.empty() written on the user's
    non-blocking stream: from the work's pool, the array took the grad's block while the kernel
    could still be writing it (the stand-in saw the race).  The user's arrays have their own pool."""
    pred, target = inputs((4, 10))
    div = KLDivergence(normTarget=True)
    grad = div(gpuarray.to_gpu(pred), gpuarray.to_gpu(target), queryError=False)
    dropped = int(grad.gpudata)
    grad = div.grad = None
    fresh = gpuarray.empty((4, 10), np.float32)
    assert int(fresh.gpudata) != dropped
    stream = driver.Stream(flags=1)
    driver.memcpy_htod_async(fresh.gpudata, pred, stream)
    stream.synchronize()
    np.testing.assert_array_equal(fresh.get(), pred)


def test_an_input_with_the_cuda_array_interface_alone_is_enough(driver):
    """The interface is all the CUDA Array Interface asks of an object: the batch size came from
    pred.shape, read after the kernels had added the batch to the accumulator, and an object
    without .shape failed there, leaving getMeanError() wrong for good."""
    from puzzlelib_cost import CTC, MSE

    class Bare:
        def __init__(self, array):
            self.array = array

        @property
        def __cuda_array_interface__(self):
            return self.array.__cuda_array_interface__

    pred, target = inputs((4, 10))
    cost = MSE()
    first, _ = cost(gpuarray.to_gpu(pred), gpuarray.to_gpu(target))
    second, grad = cost(Bare(gpuarray.to_gpu(pred[:2])), Bare(gpuarray.to_gpu(2 * target[:2])))
    assert cost.numOfSamples == 6 and cost.getMeanError() == pytest.approx((4 * first + 2 * second) / 6, rel=1e-12)
    np.testing.assert_allclose(grad.get(), (2 * target[:2] - pred[:2]) / pred[:2].size, rtol=1e-6)
    logits = np.random.default_rng(1).standard_normal((5, 3, 4)).astype(np.float32)
    ctc = CTC(0)
    ctc([Bare(gpuarray.to_gpu(logits)), np.array([5, 5, 4])], [np.array([1, 2, 3]), np.array([1, 1, 1])])
    assert ctc.numOfSamples == 3


@pytest.mark.parametrize("stream,message", [(True, "'stream' must be"), (2 ** 64, "'stream' must be"),
                                            (-1, "'stream' must be"), (0xdeadbeef, "not a stream of device 0")])
def test_a_bad_interface_stream_is_a_cost_error(stream, message):
    """True passed as the legacy stream (True == 1), 2^64 and -1 as handles; a handle the driver
    does not know raised its DriverError, not CostError."""
    pred, target = inputs()
    arrays = [InterfaceArray(gpuarray.to_gpu(a), a.shape, a.dtype, stream=stream) for a in (pred, target)]
    with pytest.raises(CostError, match=message):
        KLDivergence(normTarget=True)(*arrays)


def test_interface_stream_0_is_refused():
    pred, target = inputs()
    arrays = [InterfaceArray(gpuarray.to_gpu(a), a.shape, a.dtype, stream=0) for a in (pred, target)]
    with pytest.raises(CostError, match="'stream' must be None, 1 .* got 0"):
        KLDivergence(normTarget=True)(*arrays)


def test_planted_launch_on_the_legacy_stream_is_a_hazard(monkeypatch, standin, driver, context):
    """Without the events that order our stream after the caller's, the stand-in sees our kernels
    read pred and target that the caller's stream wrote with nothing in between."""
    @contextlib.contextmanager
    def unordered_work(device, streams):   # the bug: no events, either way
        with device.active():
            yield

    monkeypatch.setattr(pycuda_device.PycudaDevice, "work", unordered_work)
    pred, target = inputs()
    stream = driver.Stream(flags=1)
    KLDivergence(normTarget=True)(*interface_inputs_on(stream, driver, pred, target), queryError=False)
    hazards = standin.hazards()
    standin.clear()   # (seen: the autouse check would fail the test on them)
    assert any("kernel kl_rows" in h and "reads" in h and "cuMemcpyHtoDAsync" in h for h in hazards), hazards


def test_a_stream_being_captured_is_refused_before_anything_changes(driver, context):
    pred, target = inputs()
    div = KLDivergence(normTarget=True)
    div(gpuarray.to_gpu(pred), gpuarray.to_gpu(target))
    before = state(div)
    stream = driver.Stream(flags=1)
    arrays = [InterfaceArray(gpuarray.to_gpu(a), a.shape, a.dtype, stream=stream.handle) for a in (pred, target)]
    lib = ctypes.CDLL("libcuda.so.1")
    assert lib.cuStreamBeginCapture_v2(ctypes.c_void_p(stream.handle), 0) == 0
    try:
        with pytest.raises(CostError, match="is capturing a CUDA graph"):
            div(*arrays)
    finally:
        graph = ctypes.c_void_p()
        lib.cuStreamEndCapture(ctypes.c_void_p(stream.handle), ctypes.byref(graph))
    assert state(div) == before


# --- memory -------------------------------------------------------------------------------

def test_pycuda_memory_comes_back_to_the_pool(standin):
    pred, target = inputs((8, 70000))   # the chunked path (longer than a cluster holds): the most scratch
    pred_dev, target_dev = gpuarray.to_gpu(pred), gpuarray.to_gpu(target)
    div = KLDivergence(normTarget=True)
    div(pred_dev, target_dev)
    live = standin.live_allocations()
    for _ in range(5):
        div(pred_dev, target_dev)
    assert standin.live_allocations() == live


def test_planted_scratch_freed_before_its_kernel_is_caught(monkeypatch, driver):
    device = backends.get_cuda_backend(0).device
    device._pool.holding = False   # memory given back goes straight to the driver
    allocate = pycuda_device.PycudaDevice.scratch

    def scratch_freed_at_once(self, nbytes):
        buffer = allocate(self, nbytes)
        address = buffer.ptr
        del buffer   # the bug: nothing keeps the scratch alive until its kernels have run
        return pycuda_device._Buffer(address)

    monkeypatch.setattr(pycuda_device.PycudaDevice, "scratch", scratch_freed_at_once)
    with pytest.raises(driver.Error, match=r"kl_rows_f32_g\d+_e\d+(_normt)? parameter 5 \(block_sums\) = 0x[0-9a-f]+ points "
                                           r"into freed device memory"):
        KLDivergence(normTarget=True)(*(gpuarray.to_gpu(a) for a in inputs()))


# --- what is checked at launch -------------------------------------------------------------

def test_planted_prepare_format_of_the_same_size_is_caught(monkeypatch):
    monkeypatch.setitem(row_softmax.SIGNATURES, "kl_rows", "PPPPPPPPPdddiqiid")   # n_rows as int32: the same 128 bytes
    with pytest.raises(TypeError, match=r"prepare\('PPPPPPPPPdddiqiid'\) for kl_rows_f32_g\d+_e\d+(_normt)?, whose C\+\+ "
                                        r"parameters are 'PPPPPPPPPdddqqiid'"):
        KLDivergence(normTarget=True)(*(gpuarray.to_gpu(a) for a in inputs()))


def test_planted_prepare_format_of_another_size_is_refused_by_the_driver(monkeypatch, standin, driver):
    monkeypatch.setattr(standin, "signature", lambda kernel: None)   # the driver's own check alone
    monkeypatch.setitem(row_softmax.SIGNATURES, "kl_rows", "PPPPPPPPPdddqqqid")   # the int32 flag packed as int64
    with pytest.raises(driver.Error, match=r"kl_rows_f32_g\d+_e\d+(_normt)? takes parameters \"PPPPPPPPPdddqqiid\", 128 bytes "
                                           r"packed with native alignment; the launch passes 136 bytes"):
        KLDivergence(normTarget=True)(*(gpuarray.to_gpu(a) for a in inputs()))


def test_planted_missing_syncthreads_is_a_launch_error_naming_block_and_thread(tmp_path, standin, driver):
    # A barrier only the first warp reaches: the others run on to the next one.
    kernels = tmp_path / "kernels"
    shutil.copytree(KERNELS, kernels)
    common = kernels / "common.cuh"
    barrier = "__syncthreads();   // every warp's partial is written"
    assert common.read_text().count(barrier) == 1
    common.write_text(common.read_text().replace(barrier, "if (warp == 0) " + barrier))
    cubin = cached_cubin("sm_90")
    standin.register_cubin(cubin, build([kernels / MAIN_SOURCE], include_dirs=[kernels]))
    try:
        with pytest.raises(driver.LaunchError, match=r"kl_rows_f32_g128_e16 block \(\d+,0,0\) thread \(\d+,0,0\)"):
            KLDivergence(normTarget=True)(*(gpuarray.to_gpu(a) for a in inputs((2, 2000))))
    finally:
        standin.register_cubin(cubin, build([KERNELS / MAIN_SOURCE], include_dirs=[KERNELS]))


# --- the process around it ------------------------------------------------------------------

def outcomes_in_a_forked_child(calls):
    """Each of `calls` ((name, call)) made in a child forked now, in order: "name: ok" (or
    "name: " and what it returned, where not None) or "name: ErrorType: message", reported through
    a pipe (the child leaves whatever happens)."""
    read, write = os.pipe()
    child = os.fork()
    if child == 0:
        try:
            outcome = []
            for name, call in calls:
                try:
                    result = call()
                    outcome.append(f"{name}: {'ok' if result is None else result}")
                except Exception as exc:
                    outcome.append(f"{name}: {type(exc).__name__}: {exc}")
            os.write(write, "\n".join(outcome).encode())
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read) as pipe:
        lines = pipe.read().splitlines()
    os.waitpid(child, 0)
    return lines


def test_pycuda_fork_then_a_call_in_the_child_is_a_cost_error():
    pred, target = inputs()
    pred_dev, target_dev = gpuarray.to_gpu(pred), gpuarray.to_gpu(target)
    div = KLDivergence(normTarget=True)
    div(pred_dev, target_dev)
    lines = outcomes_in_a_forked_child([("old cost", lambda: div(pred_dev, target_dev)),
                                        ("new cost", lambda: KLDivergence(normTarget=True)(pred_dev, target_dev)),
                                        ("host arrays", lambda: KLDivergence(normTarget=True)(pred, target) and None),
                                        ("backend", active_backend)])
    forked = "CostError: .*forked from one that had already initialised CUDA"
    assert re.match("old cost: " + forked, lines[0]) and re.match("new cost: " + forked, lines[1]), lines
    assert lines[2:] == ["host arrays: ok", "backend: cpu"]


def test_pycuda_fork_after_a_training_call_with_labels_says_its_check_cannot_be_read():
    """A training call's label check is read at the cost's next call; in a child forked before
    that, it cannot be (the event is the parent's): the child's next call of the cost says so, once
    (a CostError, not the driver's error); the next says what any cost that ran on the GPU says
    there (its accumulator cannot be carried over)."""
    from puzzlelib_cost import CrossEntropy
    rng = np.random.default_rng(9)
    pred, labels = rng.standard_normal((8, 5)).astype(np.float32), rng.integers(0, 5, 8).astype(np.int32)
    cost = CrossEntropy()
    cost(gpuarray.to_gpu(pred), gpuarray.to_gpu(labels), queryError=False)
    lines = outcomes_in_a_forked_child([(f"call {i}", lambda: cost(pred, labels, queryError=False) and None)
                                        for i in (1, 2)])
    assert re.match("call 1: CostError: a label check of a call made on a GPU before this process was forked",
                    lines[0]), lines
    assert re.match("call 2: CostError: this cost object keeps its accumulated error on the cuda backend",
                    lines[1]), lines


def test_pycuda_without_nvcc_is_reported_and_refused(monkeypatch, tmp_path):
    pred, target = inputs()
    div = KLDivergence(normTarget=True)
    pred_dev, target_dev = gpuarray.to_gpu(pred), gpuarray.to_gpu(target)
    div(pred_dev, target_dev)
    before = state(div)
    bin_without_nvcc = tmp_path / "bin"
    bin_without_nvcc.mkdir()
    for tool in ("g++", "gcc", "readelf", "addr2line"):
        if shutil.which(tool):
            os.symlink(shutil.which(tool), bin_without_nvcc / tool)
    monkeypatch.setenv("PATH", str(bin_without_nvcc))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))   # no cubin compiled earlier
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))   # (nor in the fallback folder)
    backends.forget_cuda()
    assert active_backend() == "cpu"
    assert "nvcc was not found on PATH" in describe_backend()
    with pytest.raises(CostError, match="the CUDA backend is not usable here .*nvcc was not found on PATH"):
        div(pred_dev, target_dev)
    assert state(div) == before


def test_pycuda_with_the_cubin_cached_needs_no_nvcc(monkeypatch, tmp_path):
    """A machine whose cache holds the kernels' cubin (built there before, or carried) runs them
    without nvcc on PATH, as the README says (nvcc's version, part of the cubin's name, was asked
    of nvcc on every process's first use: "nvcc was not found on PATH")."""
    pred, target = inputs()
    expected = KLDivergence(normTarget=True)(gpuarray.to_gpu(pred), gpuarray.to_gpu(target))
    bin_without_nvcc = tmp_path / "bin"
    bin_without_nvcc.mkdir()
    monkeypatch.setenv("PATH", str(bin_without_nvcc))
    backends.forget_cuda()
    assert active_backend() == "cuda", describe_backend()
    error, grad = KLDivergence(normTarget=True)(gpuarray.to_gpu(pred), gpuarray.to_gpu(target))
    assert error == expected[0]
    np.testing.assert_array_equal(grad.get(), expected[1].get())


def test_a_failed_device_start_leaves_no_context_behind(tmp_path):
    """A failure after the device's context was pushed (the module, an allocation: out of memory
    at first use) pops and releases it: the process ran on the CPU, then pycuda aborted it at exit
    ("the context stack was not empty", SIGABRT)."""
    import subprocess
    script = tmp_path / "start.py"
    script.write_text(f"""
import sys
sys.path[:0] = [{str(KERNELS.parent / "tests")!r}, {str(KERNELS.parent)!r}]
import driver_standin
from cuda_emulation import build
standin = driver_standin.activate()
from puzzlelib_cost.backends.kernel_build import cached_cubin
standin.register_cubin(cached_cubin("sm_90"), build([{str(KERNELS / MAIN_SOURCE)!r}], include_dirs=[{str(KERNELS)!r}]))
from puzzlelib_cost.backends import cuda_driver
def out_of_memory(*args):
    raise MemoryError("cuMemAlloc failed: out of memory (planted)")
cuda_driver.new_event = out_of_memory
import pycuda.driver
from puzzlelib_cost import active_backend, describe_backend
assert active_backend() == "cpu" and "out of memory (planted)" in describe_backend(), describe_backend()
assert pycuda.driver.Context.get_current() is None
print("done")
""")
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.strip() == "done", result.stdout + result.stderr
    assert "context stack was not empty" not in result.stderr


def test_threads_first_use_at_once_make_one_device(monkeypatch):
    """Four threads whose first calls come at once get one backend for the device (each made its
    own: four module loads, streams and pools)."""
    made = []

    class Slow(pycuda_device.PycudaDevice):
        def __init__(self, ordinal):
            made.append(ordinal)
            threading.Event().wait(0.2)   # (every thread inside before any is done)
            super().__init__(ordinal)
    monkeypatch.setattr(pycuda_device, "PycudaDevice", Slow)
    start = threading.Barrier(4)
    found = []

    def first_use():
        start.wait()
        found.append(backends.get_cuda_backend(0))
    threads = [threading.Thread(target=first_use) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert len(found) == 4 and len({id(backend) for backend in found}) == 1 and made == [0]


def test_calls_make_the_host_wait_only_to_read_back_what_they_must(standin, driver):
    """No host synchronisation on the training path (README): the stand-in logs every driver call
    that makes the host wait for device work, synchronous copies included (a synchronous
    host-to-device copy synchronises the legacy stream, and with it the library's blocking work
    stream: every call that uploaded drained the GPU's queue, and CTC waited for each of its
    launches; measured on an H200).  After a first call of each (kernels loaded, scalars made):
    KLDivergence, MSE, CrossEntropy's class weights and integer labels on the device, a sparse
    teacher's indices, KLDivergence's labels with ignoreLabel (the rows left counted there), wait
    for nothing (the labels' check is answered in page-locked memory, read
    at the next call: label_checks); CTC waits for its device labels and datalen alone (copied to the host for its
    plan).  A call that asks for its error waits for its labels' check, then for the error;
    validate waits once, for its value: the check's answer, copied before it, is read then."""
    from puzzlelib_cost import CTC, MSE, BCE, CrossEntropy
    rng = np.random.default_rng(4)
    pred, target = inputs()
    t, n, v = 12, 3, 7
    logits = rng.standard_normal((t, n, v)).astype(np.float32)
    labels = rng.integers(1, v, 3 * n).astype(np.int32)
    calls = {
        "KLDivergence": (lambda: KLDivergence(normTarget=True),
                         lambda: (gpuarray.to_gpu(pred), gpuarray.to_gpu(target)), []),
        "MSE": (MSE, lambda: (gpuarray.to_gpu(pred), gpuarray.to_gpu(target)), []),
        "CrossEntropy, weighted": (
            lambda: CrossEntropy(weights=np.linspace(0.5, 2, 300)),
            lambda: (gpuarray.to_gpu(pred), gpuarray.to_gpu(rng.integers(0, 300, 6).astype(np.int64))), []),
        "BCE": (BCE, lambda: (gpuarray.to_gpu(pred), gpuarray.to_gpu(rng.integers(0, 2, pred.shape).astype(np.int8))),
                []),
        "KLDivergence, ignoreLabel": (
            lambda: KLDivergence(ignoreLabel=-100),
            lambda: (gpuarray.to_gpu(pred), gpuarray.to_gpu(np.array([3, -100, 250, -100, 0, 299], np.int64))), []),
        "KLDivergence, sparse teacher": (
            lambda: KLDivergence(sparseTail="bucket"),
            lambda: (gpuarray.to_gpu(pred), [gpuarray.to_gpu(np.argsort(target, axis=1)[:, -5:].astype(np.int32)),
                                             gpuarray.to_gpu(np.sort(target, axis=1)[:, -5:])]), []),
        "CTC": (lambda: CTC(blank=0),
                lambda: ([gpuarray.to_gpu(logits), gpuarray.to_gpu(np.full(n, t, np.int32))],
                         [gpuarray.to_gpu(labels), np.full(n, 3, np.int32)]),
                ["cuMemcpyDtoH", "cuMemcpyDtoH"]),
    }
    for name, (make, arguments, expected) in calls.items():
        cost = make()
        cost(*arguments(), queryError=False)   # (the first call: kernels, scalars)
        given = arguments()
        standin.clear()
        cost(*given, queryError=False)
        assert sorted(standin.host_waits()) == sorted(expected), name
    bce = BCE()
    given = (gpuarray.to_gpu(pred), gpuarray.to_gpu(rng.integers(0, 2, pred.shape).astype(np.int8)))
    bce(*given)
    standin.clear()
    bce(*given)   # (the check's answer waited for before the work, then the error read)
    assert standin.host_waits() == ["cuMemcpyDtoHAsync", "cuStreamSynchronize", "cuMemcpyDtoH"]
    standin.clear()
    bce.validate(*given)   # (the value read: the check's answer, copied before it, has landed)
    assert standin.host_waits() == ["cuMemcpyDtoH"]


def test_a_call_that_reads_its_error_queues_its_work_before_it_waits_where_its_last_grad_is_held(standin, driver):
    """`error, grad = cost(pred, labels)` in a loop holds the last grad through the next call: that
    call queues its check, its kernels and the commit, then waits (for the check's answer, then
    for the error), so the GPU never waits for the host's launches between the check and the work.
    Where only the cost holds its last grad, keeping it for a bad label would hold two: the call
    waits for the check before its work, as before (Cost._lastGradKeptAnyway)."""
    from puzzlelib_cost import CrossEntropy
    pred = gpuarray.to_gpu(inputs()[0])
    labels = gpuarray.to_gpu(np.random.default_rng(2).integers(0, 300, 6).astype(np.int64))
    cost = CrossEntropy()
    error, grad = cost(pred, labels)   # (the first call: kernels, scalars)

    def launches_after_the_first_wait():
        calls, waits = standin.driver_calls(), standin.host_waits()
        first_wait = next(i for i, call in enumerate(calls) if call.removesuffix("_v2") == waits[0])
        return waits, calls[first_wait:].count("cuLaunchKernel")
    standin.clear()
    error, grad = cost(pred, labels)   # (the last grad held by `grad`)
    waits, launches = launches_after_the_first_wait()
    # (the answer's event waited for where it has not landed; on the stand-in it has: asked only)
    assert waits in (["cuEventSynchronize", "cuMemcpyDtoH"], ["cuMemcpyDtoH"]) and launches == 0
    del grad
    standin.clear()
    cost(pred, labels)   # (the last grad held by the cost alone)
    assert launches_after_the_first_wait() == (["cuMemcpyDtoHAsync", "cuStreamSynchronize", "cuMemcpyDtoH"], 1)


def test_a_call_switches_contexts_only_where_another_is_current(standin, driver):
    """A small call is host-bound (its kernels take microseconds, its Python tens of them), and a
    driver call is host time: the stand-in logs every one.  After a first call of each cost, a
    call asks the driver which context is current at most once a work block (one a training call,
    device labels' check included: it runs in the call's block; a call that asks for its error
    waits for the check in a block of its own) and pushes the device's only where
    another is: not in the main thread, which keeps it current, once a block in another thread,
    never again inside a block (the allocations, uploads and launches in it).  pycuda's push and pop where a context
    is current are two driver calls each: a call made 12 of them, CrossEntropy's 28.  The
    library's own arrays are not asked about (their device is their pool's; two
    cuPointerGetAttribute a call before).  A call that raises inside its block leaves no push
    behind."""
    from puzzlelib_cost import MSE, BCE, CrossEntropy
    rng = np.random.default_rng(5)
    pred, target = inputs()
    calls = {
        "KLDivergence": (lambda: KLDivergence(normTarget=True), target, 1),
        "MSE": (MSE, target, 1),
        "CrossEntropy": (CrossEntropy, rng.integers(0, 300, 6).astype(np.int32), 1),
        "BCE": (BCE, rng.integers(0, 2, pred.shape).astype(np.int8), 1),
    }

    def made(call):
        standin.clear()
        call()
        calls_made = standin.driver_calls()
        assert "cuPointerGetAttribute" not in calls_made, calls_made
        return [calls_made.count(name) for name in ("cuCtxGetCurrent", "cuCtxPushCurrent_v2", "cuCtxPopCurrent_v2")]

    def in_a_thread(call):
        seen = {}

        def run():
            try:
                seen["made"] = made(call)
            except CostError as exc:
                seen["raised"] = exc
        thread = threading.Thread(target=run)
        thread.start()
        thread.join()
        if "raised" in seen:
            raise seen["raised"]
        return seen["made"]

    for name, (make, host_target, blocks) in calls.items():
        cost, given = make(), (gpuarray.to_gpu(pred), gpuarray.to_gpu(host_target))
        cost(*given, queryError=False)   # (the first call: kernels, scalars; the device made, its context kept current)
        current = driver.Context.get_current()
        assert made(lambda: cost(*given, queryError=False)) == [blocks, 0, 0], name
        asked, pushed, popped = in_a_thread(lambda: cost(*given, queryError=False))
        assert asked <= blocks and pushed == popped == blocks, name
        assert driver.Context.get_current() == current, name
    bad = CrossEntropy()
    good = (gpuarray.to_gpu(pred), gpuarray.to_gpu(np.zeros(6, np.int32)))
    bad(*good, queryError=False)   # (its scalars made)
    for call_in in (made, in_a_thread):
        with pytest.raises(CostError, match="300"):
            call_in(lambda: bad(gpuarray.to_gpu(pred), gpuarray.to_gpu(np.full(6, 300, np.int32))))
        assert driver.Context.get_current() == current
    assert made(lambda: bad(*good, queryError=False)) == [1, 0, 0]
    assert in_a_thread(lambda: bad(*good, queryError=False))[1:] == [1, 1]
    assert made(lambda: bad(*good)) == [3, 0, 0]   # (the check's block, the call's, the error's read)


def test_host_time_benchmark_runs_on_the_standin_and_leaves_kernels_running(standin, capsys):
    """benchmarks/host_time.py times calls with the stand-in's kernels not run (a launch checked and
    logged, its kernel skipped), and gives them back running, as every other test needs them."""
    sys.path.insert(0, str(KERNELS.parent / "benchmarks"))
    try:
        import host_time
    finally:
        sys.path.remove(str(KERNELS.parent / "benchmarks"))
    host_time.main(["--calls", "3"])
    printed = capsys.readouterr().out
    for name in host_time.cases():
        assert re.search(rf"^  {re.escape(name)} +[0-9.]+ us   \d+ driver calls: ", printed, re.M), printed
    backends.forget_cuda()
    pred, target = inputs()
    div = KLDivergence(normTarget=True)
    error, grad = div(gpuarray.to_gpu(pred), gpuarray.to_gpu(target))
    check(error, grad.get(), pred, target)   # (the kernels ran: a skipped launch left grad unwritten)
