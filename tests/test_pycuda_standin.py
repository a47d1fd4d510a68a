"""The driver stand-in itself, used through pycuda as any program would: what it models is there.

(The library's path on it is tested in test_pycuda_path.py, test_gpu.py and
test_kernels_emulated.py; this file shows that the stand-in would catch what those rely on it to
catch.)  Skipped on a real GPU.
"""
import ctypes
import threading

import numpy as np
import pytest

from puzzlelib_cost.backends.kernel_build import MAIN_SOURCE, cached_cubin

pytestmark = pytest.mark.pycuda


@pytest.fixture
def driver(standin):
    import pycuda.driver
    context = pycuda.driver.Device(0).retain_primary_context()
    context.push()
    yield pycuda.driver
    pycuda.driver.Context.pop()
    context.detach()


def test_pycuda_sees_two_devices_of_compute_capability_9_0(driver):
    assert driver.Device.count() == 2
    assert [driver.Device(i).compute_capability() for i in range(2)] == [(9, 0), (9, 0)]


def test_pycuda_fresh_memory_is_nan_and_addresses_are_never_reused(driver, standin):
    live = standin.live_allocations(0)
    first = driver.mem_alloc(64)
    host = np.zeros(16, np.float32)
    driver.memcpy_dtoh(host, first)
    assert np.isnan(host).all()
    address = int(first)
    first.free()
    assert standin.live_allocations(0) == live
    second = driver.mem_alloc(64)
    assert int(second) != address and standin.live_allocations(0) == live + 1
    with pytest.raises(driver.Error, match="points into freed device memory"):
        driver.memcpy_dtoh(host, address)


def test_pycuda_copies_past_an_allocation_are_refused(driver):
    memory = driver.mem_alloc(64)
    with pytest.raises(driver.Error, match="is not inside one device allocation"):
        driver.memcpy_htod(int(memory) + 32, np.zeros(16, np.float32))


def test_pycuda_a_kernel_reading_past_its_allocation_hits_the_guard_page(driver):
    # kl_rows told that rows are 16 times longer than the buffers are: it reads into the guard page.
    module = driver.module_from_file(str(cached_cubin("sm_90")))
    kernel = module.get_function("kl_rows_f32_g4_e8").prepare("PPPPPPPPPdddqqiid")
    n, c = 64, 20
    pred, target, grad = (driver.mem_alloc(n * c * 4) for _ in range(3))
    block_sums, ticket, error = driver.mem_alloc(8 * n // 32), driver.mem_alloc(4), driver.mem_alloc(8)
    driver.memset_d32(ticket, 0, 1)
    with pytest.raises(driver.LaunchError, match=r"kl_rows_f32_g4_e8 block \(\d+,0,0\) thread \(\d+,0,0\)"):
        kernel.prepared_call((n // 32, 1), (128, 1, 1), pred, target, 0, 0, grad, block_sums, ticket, error, 0,
                             1.0, 1.0 / n, 1.0, n, 16 * c, 1, 0, 0.5)


def test_pycuda_each_thread_has_its_own_context_stack(driver):
    seen = []
    worker = threading.Thread(target=lambda: seen.append(driver.Context.get_current()))
    worker.start()
    worker.join()
    assert driver.Context.get_current() is not None and seen == [None]


def copy_in(driver, stream, memory):
    driver.memcpy_htod_async(memory, np.ones(16, np.float32), stream)


def copy_out(driver, stream, memory):
    host = driver.pagelocked_empty(16, np.float32)   # (into pageable memory the copy makes the host wait)
    driver.memcpy_dtoh_async(host, memory, stream)
    return host


def hazards_of(standin, driver, steps):
    """The hazards that steps(memory) causes on fresh device memory."""
    memory = driver.mem_alloc(64)
    standin.clear()
    steps(memory)
    hazards = standin.hazards()
    standin.clear()
    return hazards


def test_pycuda_unordered_streams_are_a_hazard_and_an_event_orders_them(driver, standin):
    one, two = driver.Stream(flags=1), driver.Stream(flags=1)
    unordered = hazards_of(standin, driver, lambda memory: (copy_in(driver, one, memory), copy_out(driver, two, memory)))
    assert len(unordered) == 1 and "cuMemcpyDtoHAsync on stream" in unordered[0] and \
        "last written by cuMemcpyHtoDAsync" in unordered[0]

    def with_event(memory):
        copy_in(driver, one, memory)
        done = driver.Event()
        done.record(one)
        two.wait_for_event(done)
        copy_out(driver, two, memory)
    assert hazards_of(standin, driver, with_event) == []

    def with_host_sync(memory):
        copy_in(driver, one, memory)
        one.synchronize()
        copy_out(driver, two, memory)
    assert hazards_of(standin, driver, with_host_sync) == []


def test_pycuda_a_write_after_an_unordered_read_is_a_hazard(driver, standin):
    one, two = driver.Stream(flags=1), driver.Stream(flags=1)

    def steps(memory):
        copy_in(driver, one, memory)
        one.synchronize()
        copy_out(driver, one, memory)
        copy_in(driver, two, memory)
    hazards = hazards_of(standin, driver, steps)
    assert len(hazards) == 1 and "writes device memory" in hazards[0] and "read by cuMemcpyDtoHAsync" in hazards[0]


def test_pycuda_an_async_copy_to_pageable_memory_makes_the_host_wait(driver, standin):
    """As CUDA documents it: cuMemcpyDtoHAsync into pageable memory returns once the copy is done
    (a host wait, which orders what the host does next after it), into page-locked memory it does
    not; cuEventQuery waits for nothing."""
    stream = driver.Stream(flags=1)
    memory = driver.mem_alloc(64)
    copy_in(driver, stream, memory)
    standin.clear()
    driver.memcpy_dtoh_async(np.empty(16, np.float32), memory, stream)
    assert standin.host_waits() == ["cuMemcpyDtoHAsync"]
    standin.clear()
    host = copy_out(driver, stream, memory)
    event = driver.Event()
    event.record(stream)
    assert event.query() and standin.host_waits() == []
    np.testing.assert_array_equal(host, np.ones(16, np.float32))
    host.base.free()


def test_pycuda_the_legacy_stream_orders_blocking_streams_only(driver, standin):
    blocking, non_blocking = driver.Stream(flags=0), driver.Stream(flags=1)
    for first, then, hazards in ((blocking, None, 0), (None, blocking, 0), (non_blocking, None, 1), (None, non_blocking, 1)):
        found = hazards_of(standin, driver, lambda memory: (copy_in(driver, first, memory), copy_out(driver, then, memory)))
        assert len(found) == hazards, (first, then, found)


def test_pycuda_unmodelled_driver_functions_say_so(driver, standin):
    with pytest.raises(driver.Error, match="cuMemAllocPitch_v2 is not modelled by the driver stand-in"):
        driver.mem_alloc_pitch(64, 4, 4)
    assert "cuMemAllocPitch_v2" in standin.unsupported_calls()


# Every block of a cluster of 4 writes the sum of its cluster's block indices, gathered from the
# blocks' shared memory.
CLUSTER_KERNEL = r"""
#include <cooperative_groups.h>
namespace cg = cooperative_groups;

extern "C" __global__ void __cluster_dims__(4, 1, 1) cluster_block_sum(unsigned* out) {
    __shared__ unsigned mine;
    cg::cluster_group cluster = cg::this_cluster();
    if (threadIdx.x == 0) mine = blockIdx.x;
    cluster.sync();
    unsigned total = 0;
    for (unsigned r = 0; r < cluster.num_blocks(); ++r) total += *cluster.map_shared_rank(&mine, r);
    cluster.sync();
    if (threadIdx.x == 0) out[blockIdx.x] = total;
}
"""


def test_pycuda_launches_a_thread_block_cluster_kernel(driver, standin, tmp_path):
    from cuda_emulation import build
    (tmp_path / MAIN_SOURCE).write_text(CLUSTER_KERNEL)
    cubin = cached_cubin("sm_90", directory=tmp_path)   # nvcc's, as for the library's kernels
    standin.register_cubin(cubin, build([tmp_path / MAIN_SOURCE]))
    kernel = driver.module_from_file(str(cubin)).get_function("cluster_block_sum").prepare("P")
    out = driver.mem_alloc(8 * 4)
    kernel.prepared_call((8, 1), (32, 1, 1), out)
    host = np.zeros(8, np.uint32)
    driver.memcpy_dtoh(host, out)
    assert host.tolist() == [0 + 1 + 2 + 3] * 4 + [4 + 5 + 6 + 7] * 4
    with pytest.raises(driver.Error, match=r"invalid cluster size .*cluster_block_sum: grid \(6,1,1\) is not a "
                                           r"multiple of its __cluster_dims__\(4,1,1\)"):
        kernel.prepared_call((6, 1), (32, 1, 1), out)


def test_pycuda_cluster_attributes_of_device_and_function(driver, standin, tmp_path):
    # (pycuda's enums do not name them: asked through the driver API itself)
    from cuda_emulation import build
    (tmp_path / MAIN_SOURCE).write_text(CLUSTER_KERNEL)
    cubin = cached_cubin("sm_90", directory=tmp_path)
    standin.register_cubin(cubin, build([tmp_path / MAIN_SOURCE]))
    cuda = standin._lib
    value, module, function = ctypes.c_int(), ctypes.c_void_p(), ctypes.c_void_p()
    assert cuda.cuDeviceGetAttribute(ctypes.byref(value), 120, 0) == 0 and value.value == 1   # CLUSTER_LAUNCH
    assert cuda.cuModuleLoad(ctypes.byref(module), str(cubin).encode()) == 0
    assert cuda.cuModuleGetFunction(ctypes.byref(function), module, b"cluster_block_sum") == 0
    dims = []
    for attribute in (11, 12, 13):   # CU_FUNC_ATTRIBUTE_REQUIRED_CLUSTER_WIDTH, _HEIGHT, _DEPTH
        assert cuda.cuFuncGetAttribute(ctypes.byref(value), attribute, function) == 0
        dims.append(value.value)
    assert dims == [4, 1, 1]
    assert cuda.cuModuleUnload(module) == 0
