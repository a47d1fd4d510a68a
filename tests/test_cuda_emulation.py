"""Self-tests of the CUDA emulation harness (tests/cuda_emulation).

Small sample kernels, written to a temporary folder, show that the harness computes correct
results in every thread order and reports the bugs it is meant to catch. Each bug is marked
"BUG:" in the kernel source below.
"""

from __future__ import annotations

import importlib
import re
import sys
from pathlib import Path

import numpy as np
import pytest

try:
    from tests.cuda_emulation import ORDERS, BuildError, KernelFault, build
except ModuleNotFoundError:  # tests/ itself on sys.path
    from cuda_emulation import ORDERS, BuildError, KernelFault, build

SAMPLES = r"""
#include <cstdint>
#include <cassert>
#include <cuda_fp16.h>
#include <cuda_bf16.h>

#define BLOCK 256

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset, 32);
    return v;
}

// Sum over the block: each warp adds up with shuffles, then warp 0 adds the warps' partials.
template <bool kSync>
__device__ float block_sum(float v) {
    __shared__ float partial[32];
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    v = warp_sum(v);
    if (lane == 0) partial[warp] = v;
    if (kSync) __syncthreads();  // BUG when kSync is false: partials read before all are written
    v = threadIdx.x < blockDim.x / 32 ? partial[lane] : 0.0f;
    if (warp == 0) v = warp_sum(v);
    return v;
}

// Two entry points from one macro, as kernels/*.cu may do.
#define DEFINE_BLOCK_SUM(name, sync)                                                      \
    extern "C" __global__ void __launch_bounds__(BLOCK)                                  \
    name(const float* __restrict__ x, float* __restrict__ block_sums, int64_t n) {       \
        float acc = 0.0f;                                                                 \
        for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n;          \
             i += (int64_t)gridDim.x * blockDim.x)                                        \
            acc += x[i];                                                                  \
        acc = block_sum<sync>(acc);                                                       \
        if (threadIdx.x == 0) block_sums[blockIdx.x] = acc;                              \
    }
DEFINE_BLOCK_SUM(block_sum_ok, true)
DEFINE_BLOCK_SUM(block_sum_missing_sync, false)

// Copies n floats: four at a time through float4 (needs 16-byte aligned pointers), then the tail.
extern "C" __global__ void copy_vec4(const float* __restrict__ src, float* __restrict__ dst, int64_t n) {
    const int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x, n4 = n / 4;
    if (i < n4) {
        const float4 v = *reinterpret_cast<const float4*>(src + 4 * i);  // LOAD
        *reinterpret_cast<float4*>(dst + 4 * i) = v;                      // STORE
    }
    if (i < n - 4 * n4) dst[4 * n4 + i] = src[4 * n4 + i];
}

extern "C" __global__ void scale_off_by_one(const float* __restrict__ x, float* __restrict__ y, int64_t n) {
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i <= n; i += (int64_t)gridDim.x * blockDim.x)
        y[i] = 2.0f * x[i];  // BUG: off by one, i <= n
}

extern "C" __global__ void reverse_each_block(float* data, int64_t n) {
    __shared__ float tile[BLOCK];
    const int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
    if (i >= n) return;  // BUG: the tail block's last threads never reach the barrier
    tile[threadIdx.x] = data[i];
    __syncthreads();
    data[i] = tile[blockDim.x - 1 - threadIdx.x];
}

extern "C" __global__ void shuffle_mask_mismatch(float* data) {
    const unsigned mask = threadIdx.x % 32 == 3 ? 0x0000ffffu : 0xffffffffu;  // BUG: lanes disagree
    data[threadIdx.x] = __shfl_down_sync(mask, data[threadIdx.x], 1);
}

extern "C" __global__ void shuffle_after_exit(float* data) {
    if (threadIdx.x % 32 == 31) return;  // BUG: lane 31 is named in the mask below
    data[threadIdx.x] = __shfl_xor_sync(0xffffffffu, data[threadIdx.x], 1);
}

// Reverses each block's part of data in dynamic shared memory: needs blockDim.x floats of it.
extern "C" __global__ void reverse_in_dynamic_shared(float* data) {
    extern __shared__ float buffer[];
    const int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
    buffer[threadIdx.x] = data[i];
    __syncthreads();
    data[i] = buffer[blockDim.x - 1 - threadIdx.x];
}

extern "C" __global__ void barrier_divergence(float* data) {
    if (threadIdx.x < 32) {
        __syncthreads();
    } else {
        __syncthreads();  // BUG: not the barrier the first warp waits at
    }
    data[threadIdx.x] = 1.0f;
}

extern "C" __global__ void read_shared_before_write(float* out) {
    __shared__ float never_written[BLOCK];
    out[threadIdx.x] = never_written[threadIdx.x];  // BUG: uninitialised shared memory
}

extern "C" __global__ void half_and_bfloat(const __half* h, const __nv_bfloat16* b, float* sum,
                                           __half* h_out, __nv_bfloat16* b_out, int64_t n) {
    const int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
    if (i >= n) return;
    const float s = __half2float(h[i]) + __bfloat162float(b[i]);
    sum[i] = s;
    h_out[i] = __float2half_rn(s);
    b_out[i] = __float2bfloat16_rn(s);
}

// Source lanes of the four shuffles for a given width, recorded by lane id.
extern "C" __global__ void shuffle_table(int* out, int width) {
    const int lane = threadIdx.x % 32, v = lane;
    out[4 * threadIdx.x + 0] = __shfl_sync(0xffffffffu, v, lane + 3, width);
    out[4 * threadIdx.x + 1] = __shfl_up_sync(0xffffffffu, v, 3, width);
    out[4 * threadIdx.x + 2] = __shfl_down_sync(0xffffffffu, v, 3, width);
    out[4 * threadIdx.x + 3] = __shfl_xor_sync(0xffffffffu, v, 5, width);
}

extern "C" __global__ void thread_coordinates(int* out) {
    const int t = threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
    const int b = blockIdx.x + gridDim.x * (blockIdx.y + gridDim.y * blockIdx.z);
    int* o = out + 6 * (b * blockDim.x * blockDim.y * blockDim.z + t);
    o[0] = threadIdx.x; o[1] = threadIdx.y; o[2] = threadIdx.z;
    o[3] = blockIdx.x; o[4] = blockIdx.y; o[5] = blockIdx.z;
}

extern "C" __global__ void count_with_atomics(unsigned* counter, float* total) {
    atomicAdd(counter, 1u);
    atomicAdd(total, 0.5f);
    __syncthreads();
}

extern "C" __global__ void wild_write(float* data) {
    if (threadIdx.x == 7) data[1ll << 40] = 1.0f;  // BUG: far out of bounds
}

extern "C" __global__ void failing_assert(int limit) { assert(threadIdx.x < limit); }

extern "C" __global__ void spin_forever(volatile int* flag) {
    while (*flag == 0) {}  // BUG: nothing ever sets the flag
}

template <typename T>
__global__ void template_kernel(T* data) { data[threadIdx.x] = T(1); }  // not an entry point
"""


@pytest.fixture(scope="module")
def samples(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("cuda_samples") / "samples.cu"
    path.write_text(SAMPLES)
    return path


@pytest.fixture(scope="module")
def mod(samples):
    return build([samples])


@pytest.fixture(scope="module")
def asan_mod(samples):
    return build([samples], sanitize=True)


def line_of(text: str) -> int:
    """Line number in samples.cu of the first line containing `text`."""
    return next(n for n, line in enumerate(SAMPLES.splitlines(), start=1) if text in line)


def block_sums(mod, name: str, x: np.ndarray, blocks: int, order: str) -> np.ndarray:
    out = np.zeros(blocks, np.float32)
    mod.launch(name, blocks, 256, [x, out, np.int64(x.size)], order=order, seed=1)
    return out


# --------------------------------------------------------------------------------------------
# Discovery, signatures and argument checks
# --------------------------------------------------------------------------------------------
def test_entry_points_found_after_preprocessing(mod):
    names = set(mod.kernel_names)
    assert {"block_sum_ok", "block_sum_missing_sync", "copy_vec4", "half_and_bfloat"} <= names
    assert "template_kernel" not in names
    assert mod.signature("block_sum_ok") == "PPq"
    assert mod.signature("shuffle_table") == "Pi"
    assert mod.kernel("block_sum_ok").param_names == ("x", "block_sums", "n")
    assert mod.kernel("block_sum_ok").max_threads == 256


def test_arguments_are_checked_against_the_signature(mod):
    x, out = np.ones(10, np.float32), np.zeros(1, np.float32)
    with pytest.raises(TypeError, match="takes 3 argument"):
        mod.launch("block_sum_ok", 1, 256, [x, out])
    with pytest.raises(TypeError, match=r"parameter 2 \(n\) of block_sum_ok is int64"):
        mod.launch("block_sum_ok", 1, 256, [x, out, 10])
    with pytest.raises(TypeError, match=r"parameter 2 \(n\).*int64"):
        mod.launch("block_sum_ok", 1, 256, [x, out, np.int32(10)])
    with pytest.raises(TypeError, match=r"parameter 0 \(x\).*pointer"):
        mod.launch("block_sum_ok", 1, 256, [1.5, out, np.int64(10)])
    with pytest.raises(ValueError, match=r"__launch_bounds__\(256\)"):
        mod.launch("block_sum_ok", 1, 512, [x, out, np.int64(10)])
    with pytest.raises(ValueError, match="order"):
        mod.launch("block_sum_ok", 1, 256, [x, out, np.int64(10)], order="sideways")


def test_both_import_paths_give_the_same_package():
    tests_dir = str(Path(__file__).resolve().parent)
    sys.path.insert(0, tests_dir)
    try:
        assert importlib.import_module("cuda_emulation").KernelFault is KernelFault
    finally:
        sys.path.remove(tests_dir)


# --------------------------------------------------------------------------------------------
# Correct kernels give correct results in every order
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("order", ORDERS)
def test_block_sum_is_correct_in_every_order(mod, order):
    x = np.random.default_rng(0).random(5000, dtype=np.float32)
    sums = block_sums(mod, "block_sum_ok", x, 3, order)
    np.testing.assert_allclose(sums.sum(), x.sum(), rtol=1e-5)


@pytest.mark.parametrize("order", ORDERS)
def test_vectorised_copy_is_correct_in_every_order(mod, order):
    src = np.arange(1003, dtype=np.float32)
    dst = np.zeros_like(src)
    mod.launch("copy_vec4", 2, 128, [src, dst, np.int64(src.size)], order=order)
    np.testing.assert_array_equal(dst, src)


@pytest.mark.parametrize("width", [32, 16, 8])
def test_shuffles_follow_cuda_semantics(mod, width):
    out = np.zeros((64, 4), np.int32)
    mod.launch("shuffle_table", 1, 64, [out, np.int32(width)])
    lane = np.arange(64) % 32
    start = lane // width * width
    xor_source = lane ^ 5
    expected = np.stack([
        start + (lane + 3) % width,                                       # __shfl_sync
        np.where(lane - start >= 3, lane - 3, lane),                      # __shfl_up_sync
        np.where(lane - start + 3 < width, lane + 3, lane),               # __shfl_down_sync
        np.where(xor_source < start + width, xor_source, lane),           # __shfl_xor_sync
    ], axis=1)
    np.testing.assert_array_equal(out, expected)


def test_thread_and_block_coordinates_in_3d(mod):
    grid, block = (2, 3, 1), (4, 2, 3)
    out = np.full((6 * 24, 6), -1, np.int32)
    mod.launch("thread_coordinates", grid, block, [out])
    expected = [(tx, ty, tz, bx, by, bz) for bz in range(1) for by in range(3) for bx in range(2)
                for tz in range(3) for ty in range(2) for tx in range(4)]
    np.testing.assert_array_equal(out, np.array(expected))


def test_atomics_from_many_blocks(mod):
    counter, total = np.zeros(1, np.uint32), np.zeros(1, np.float32)
    mod.launch("count_with_atomics", 16, 64, [counter, total], order="random")
    assert counter[0] == 16 * 64 and total[0] == 16 * 64 * 0.5


def test_half_and_bfloat16_conversions(mod):
    n = 100
    h = np.linspace(-3, 3, n).astype(np.float16)
    b_values = np.linspace(-100, 100, n).astype(np.float32)
    b = (b_values.view(np.uint32) >> 16).astype(np.uint16)  # exactly representable in bf16
    sums, h_out, b_out = np.zeros(n, np.float32), np.zeros(n, np.float16), np.zeros(n, np.uint16)
    mod.launch("half_and_bfloat", 1, 128, [h, b, sums, h_out, b_out, np.int64(n)])
    expected = h.astype(np.float32) + (b.astype(np.uint32) << 16).view(np.float32)
    np.testing.assert_array_equal(sums, expected)
    np.testing.assert_array_equal(h_out, expected.astype(np.float16))
    bits = expected.view(np.uint32)  # float -> bfloat16, round to nearest even
    rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
    np.testing.assert_array_equal(b_out, rounded)


def test_dynamic_shared_memory_of_the_right_size(mod):
    data = np.arange(256, dtype=np.float32)
    mod.launch("reverse_in_dynamic_shared", 2, 128, [data], shared_bytes=128 * 4)
    np.testing.assert_array_equal(data, np.concatenate([np.arange(127, -1, -1), np.arange(255, 127, -1)]))


# --------------------------------------------------------------------------------------------
# Bugs that are caught
# --------------------------------------------------------------------------------------------
def test_missing_syncthreads_gives_a_wrong_result_in_the_forward_order(mod):
    """Forward runs warp 0 (lowest thread ids) first: it reads the other warps' partial sums
    before they are written (still NaN-poisoned). Reverse runs warp 0 last and hides the race."""
    x = np.random.default_rng(1).random(4096, dtype=np.float32)
    correct = {order: bool(np.allclose(block_sums(mod, "block_sum_missing_sync", x, 4, order).sum(), x.sum(),
                                       rtol=1e-5)) for order in ORDERS}
    assert correct["forward"] is False and correct["reverse"] is True, correct


def test_uninitialised_shared_memory_reads_nan(mod):
    out = np.zeros(256, np.float32)
    mod.launch("read_shared_before_write", 1, 256, [out])
    assert np.isnan(out).all()


def test_off_by_one_tail_loop_is_a_heap_buffer_overflow_under_asan(asan_mod):
    x = np.arange(1000, dtype=np.float32)
    y = np.zeros_like(x)
    with pytest.raises(KernelFault) as error:
        asan_mod.launch("scale_off_by_one", 2, 256, [x, y, np.int64(x.size)])
    message = str(error.value)
    assert "heap-buffer-overflow" in message
    assert f"samples.cu:{line_of('BUG: off by one')}" in message
    assert error.value.kernel == "scale_off_by_one" and error.value.thread is not None
    assert "AddressSanitizer" in error.value.report
    # The sanitized worker process is restarted; arrays come back from it.
    asan_mod.launch("scale_off_by_one", 2, 256, [x, y, np.int64(x.size - 1)])
    np.testing.assert_array_equal(y[:-1], 2 * x[:-1])


def test_dynamic_shared_overrun_under_asan(asan_mod):
    data = np.arange(128, dtype=np.float32)
    with pytest.raises(KernelFault, match=r"dynamic shared memory overrun: byte 508 .*shared_bytes=508"):
        asan_mod.launch("reverse_in_dynamic_shared", 1, 128, [data], shared_bytes=127 * 4)


def test_misaligned_float4_load_names_block_thread_and_address(mod):
    buffer = np.zeros(1025, np.float32)
    src = buffer[1:]  # 4 bytes past a 16-byte boundary
    dst = np.zeros(1024, np.float32)
    with pytest.raises(KernelFault) as error:
        mod.launch("copy_vec4", 4, 64, [src, dst, np.int64(1024)])
    fault = error.value
    assert fault.kernel == "copy_vec4" and fault.block == (0, 0, 0) and fault.thread == (0, 0, 0)
    assert "misaligned float4 load" in fault.what
    address = int(re.search(r"address (0x[0-9a-f]+)", fault.what).group(1), 16)
    assert address == src.ctypes.data
    assert f"samples.cu:{line_of('// LOAD')}" in fault.what


def test_misaligned_float4_store_names_the_line(mod):
    src, dst = np.zeros(1024, np.float32), np.zeros(1026, np.float32)
    with pytest.raises(KernelFault, match=rf"misaligned float4 store .*samples.cu:{line_of('// STORE')}"):
        mod.launch("copy_vec4", 4, 64, [src, dst[2:], np.int64(1024)])


@pytest.mark.parametrize("order", ORDERS)
def test_early_return_before_barrier_is_a_deadlock(mod, order):
    data = np.zeros(300, np.float32)
    with pytest.raises(KernelFault, match="deadlock: this thread exited without reaching __syncthreads") as error:
        mod.launch("reverse_each_block", 2, 256, [data, np.int64(300)], order=order)
    assert error.value.block == (1, 0, 0) and error.value.thread[0] >= 300 - 256


@pytest.mark.parametrize("order", ["forward", "reverse"])
def test_mismatched_shuffle_mask(mod, order):
    with pytest.raises(KernelFault, match="shuffle mask mismatch: __shfl_down_sync") as error:
        mod.launch("shuffle_mask_mismatch", 1, 32, [np.zeros(32, np.float32)], order=order)
    assert error.value.thread == (3, 0, 0)


@pytest.mark.parametrize("order", ["forward", "reverse"])
def test_shuffle_naming_an_exited_lane(mod, order):
    with pytest.raises(KernelFault, match=r"lane 31 \(thread \(31,0,0\)\).*exited"):
        mod.launch("shuffle_after_exit", 1, 32, [np.zeros(32, np.float32)], order=order)


def test_dynamic_shared_overrun(mod):
    data = np.arange(128, dtype=np.float32)
    with pytest.raises(KernelFault, match=r"dynamic shared memory overrun: byte 508 .*shared_bytes=508") as error:
        mod.launch("reverse_in_dynamic_shared", 1, 128, [data], shared_bytes=127 * 4)
    assert error.value.thread == (127, 0, 0)


def test_barrier_divergence(mod):
    with pytest.raises(KernelFault, match=rf"barrier divergence.*samples.cu:{line_of('BUG: not the barrier')}"):
        mod.launch("barrier_divergence", 1, 64, [np.zeros(64, np.float32)])


def test_segfault_assert_and_endless_loop_become_kernel_faults(mod):
    with pytest.raises(KernelFault, match=r"SIGSEGV.*samples.cu:\d+") as error:
        mod.launch("wild_write", 1, 32, [np.zeros(32, np.float32)])
    assert error.value.thread == (7, 0, 0)
    with pytest.raises(KernelFault, match=r"assertion `threadIdx.x < limit' failed") as error:
        mod.launch("failing_assert", 1, 8, [np.int32(5)])
    assert error.value.thread == (5, 0, 0)
    with pytest.raises(KernelFault, match="timed out"):
        mod.launch("spin_forever", 1, 2, [np.zeros(1, np.int32)], timeout=0.3)


def test_the_process_survives_faults(mod):
    for _ in range(3):
        with pytest.raises(KernelFault):
            mod.launch("shuffle_mask_mismatch", 1, 32, [np.zeros(32, np.float32)])
        with pytest.raises(KernelFault):
            mod.launch("wild_write", 1, 32, [np.zeros(32, np.float32)])
    x = np.ones(1000, np.float32)
    assert block_sums(mod, "block_sum_ok", x, 2, "random").sum() == 1000


# --------------------------------------------------------------------------------------------
# What cannot be emulated fails at build time
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("code, message", [
    ('extern "C" __global__ void k(int* p) { asm volatile("trap;"); }', "inline PTX"),
    ('#include <cooperative_groups.h>\nextern "C" __global__ void k(int* p) {}', "cooperative groups"),
])
def test_unsupported_features_fail_to_build(tmp_path, code, message):
    source = tmp_path / "unsupported.cu"
    source.write_text(code)
    with pytest.raises(BuildError, match=message):
        build([source])
