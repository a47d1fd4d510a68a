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


# Thread block clusters (sm_90): each block sums its slice of x in shared memory, then every block
# adds up the K partial sums, in rank order, through distributed shared memory.
CLUSTER_SAMPLES = r"""
#include <cstdint>
#include <cooperative_groups.h>
namespace cg = cooperative_groups;

#define THREADS 64
namespace sample { constexpr int kCluster = 4; }

template <bool kFirstSync, bool kLastSync, bool kSplitLast = false>
__device__ void cluster_sum(const float* x, float* out, int64_t slice) {
    __shared__ float partial[THREADS];
    cg::cluster_group cluster = cg::this_cluster();
    float acc = 0.0f;
    for (int64_t i = threadIdx.x; i < slice; i += blockDim.x) acc += x[blockIdx.x * slice + i];
    partial[threadIdx.x] = acc;
    for (int s = THREADS / 2; s > 0; s >>= 1) {
        __syncthreads();
        if (threadIdx.x < s) partial[threadIdx.x] += partial[threadIdx.x + s];
    }
    if (kFirstSync) cluster.sync();  // BUG when kFirstSync is false: reads partials not yet written
    float total = 0.0f;
    for (unsigned r = 0; r < cluster.num_blocks(); ++r) total += *cluster.map_shared_rank(&partial[0], r);
    if (kLastSync && kSplitLast) {  // the split barrier, as the barrier before exit may be
        __cluster_barrier_arrive_relaxed();
        __cluster_barrier_wait();
    } else if (kLastSync) {
        cluster.sync();  // BUG when kLastSync is false: a block exits while others read it
    }
    if (threadIdx.x == 0) out[blockIdx.x] = total;
}

#define CLUSTER_SUM(name, dims, first, last)                                                   \
    extern "C" __global__ void __cluster_dims__(dims) __launch_bounds__(THREADS)              \
    name(const float* x, float* out, int64_t slice) { cluster_sum<first, last>(x, out, slice); }
CLUSTER_SUM(cluster_sum_2, 2, true, true)
CLUSTER_SUM(cluster_sum_4, sample::kCluster, true, true)
CLUSTER_SUM(cluster_sum_8, (1 << 3), true, true)
CLUSTER_SUM(cluster_sum_without_first_sync, 4, false, true)
CLUSTER_SUM(cluster_sum_without_last_sync, 4, true, false)
extern "C" __global__ void __cluster_dims__(4) __launch_bounds__(THREADS)
cluster_sum_split_last_sync(const float* x, float* out, int64_t slice) { cluster_sum<true, true, true>(x, out, slice); }

// The split barrier misused, by thread 0 of each block (`how`): 0 arrives twice, 1 waits without
// arriving, 2 arrives then calls cluster.sync(), 3 arrives and exits without waiting.
extern "C" __global__ void __cluster_dims__(2) split_barrier_misuse(int how) {
    if (threadIdx.x == 0) {
        if (how != 1) __cluster_barrier_arrive();
        if (how == 0) __cluster_barrier_arrive();
        if (how == 2) cg::this_cluster().sync();
        if (how == 3) return;
        __cluster_barrier_wait();
    }
}

// One value per thread: what the cluster and the block say about this thread.
extern "C" __global__ void __cluster_dims__(2, 2, 1) cluster_coordinates(unsigned* out) {
    __shared__ int here;
    cg::cluster_group cluster = cg::this_cluster();
    cg::thread_block block = cg::this_thread_block();
    const dim3 index = cluster.block_index(), dims = cluster.dim_blocks();
    const unsigned block_id = blockIdx.x + gridDim.x * (blockIdx.y + gridDim.y * blockIdx.z);
    unsigned* o = out + 13 * (block_id * block.size() + block.thread_rank());
    const unsigned other = (cluster.block_rank() + 1) % cluster.num_blocks();
    o[0] = cluster.block_rank(); o[1] = cluster.num_blocks();
    o[2] = index.x; o[3] = index.y; o[4] = index.z; o[5] = dims.x; o[6] = dims.y; o[7] = dims.z;
    o[8] = cluster.thread_rank(); o[9] = cluster.num_threads();
    o[10] = cluster.query_shared_rank(cluster.map_shared_rank(&here, other));
    o[11] = block.thread_rank(); o[12] = block.size();
    block.sync();
}

// Without __cluster_dims__: a cluster of one block; cluster.sync() is a barrier over the block.
extern "C" __global__ void no_cluster_dims(unsigned* out) {
    __shared__ unsigned mine;
    cg::cluster_group cluster = cg::this_cluster();
    if (threadIdx.x == 0) mine = blockIdx.x;
    cluster.sync();
    out[2 * blockIdx.x] = cluster.num_blocks() * 100 + cluster.block_rank();
    out[2 * blockIdx.x + 1] = *cluster.map_shared_rank(&mine, 0);
}

extern "C" __global__ void __cluster_dims__(4, 1, 1) pass_to_next_rank(float* out) {
    __shared__ float received;
    cg::cluster_group cluster = cg::this_cluster();
    const unsigned next = (cluster.block_rank() + 1) % cluster.num_blocks();
    // BUG: no cluster.sync() first, so the next block may not have started
    if (threadIdx.x == 0) *cluster.map_shared_rank(&received, next) = float(cluster.block_rank());
    cluster.sync();
    if (threadIdx.x == 0) out[blockIdx.x] = received;
}

extern "C" __global__ void __cluster_dims__(4, 1, 1) rank_out_of_range(float* out) {
    __shared__ float value;
    cg::cluster_group cluster = cg::this_cluster();
    value = 1.0f;
    cluster.sync();
    out[blockIdx.x] = *cluster.map_shared_rank(&value, cluster.block_rank() + 1);  // BUG: rank 4 of 4
    cluster.sync();
}

extern "C" __global__ void __cluster_dims__(2, 1, 1) map_global_memory(float* out) {
    cg::cluster_group cluster = cg::this_cluster();
    cluster.sync();
    *cluster.map_shared_rank(out, 1) = 1.0f;  // BUG: not shared memory
}

extern "C" __global__ void __cluster_dims__(4, 1, 1) block_leaves_its_cluster(float* out) {
    cg::cluster_group cluster = cg::this_cluster();
    if (cluster.block_rank() == 2) return;  // BUG: the other blocks wait at cluster.sync()
    cluster.sync();
    out[blockIdx.x] = 1.0f;
}

extern "C" __global__ void __cluster_dims__(2, 1, 1) some_threads_skip_cluster_sync(float* out) {
    cg::cluster_group cluster = cg::this_cluster();
    if (threadIdx.x < 32) cluster.sync();  // BUG: threads 32.. of each block never arrive
    out[blockIdx.x * blockDim.x + threadIdx.x] = 1.0f;
}

extern "C" __global__ void __cluster_dims__(2, 1, 1) trap_while_the_cluster_waits(float* out) {
    cg::cluster_group cluster = cg::this_cluster();
    if (cluster.block_rank() == 1 && threadIdx.x == 5) __trap();
    cluster.sync();
}

extern "C" __global__ void __cluster_dims__(2, 1, 1) spin_while_the_cluster_waits(volatile int* flag) {
    cg::cluster_group cluster = cg::this_cluster();
    if (cluster.block_rank() == 1) while (*flag == 0) {}  // BUG: nothing sets the flag
    cluster.sync();
}
"""

ASYNC_SAMPLES = r"""
#include <cstdint>
#include <cuda_pipeline_primitives.h>

#define THREADS 64

// Doubles `tiles` tiles of THREADS float4s, one block, each thread its own float4 of every tile,
// staged through shared memory by asynchronous copies: tile i + 1 is copied while tile i is read.
// Correct for NBUF = 2 and PRIOR = 1.
template <int NBUF, int PRIOR>
__device__ void doubled_tiles(const float4* src, float4* dst, int tiles) {
    __shared__ float4 buffer[NBUF][THREADS];
    const int t = threadIdx.x;
    __pipeline_memcpy_async(&buffer[0][t], &src[t], sizeof(float4));
    __pipeline_commit();
    for (int i = 0; i < tiles; ++i) {
        if (i + 1 < tiles)  // BUG when NBUF is 1: the copy of tile i + 1 lands on tile i
            __pipeline_memcpy_async(&buffer[(i + 1) % NBUF][t], &src[(i + 1) * THREADS + t], sizeof(float4));
        __pipeline_commit();
        __pipeline_wait_prior(PRIOR);  // BUG when PRIOR is 2: tile i's group may not have landed
        const float4 v = buffer[i % NBUF][t];
        dst[i * THREADS + t] = make_float4(2 * v.x, 2 * v.y, 2 * v.z, 2 * v.w);
    }
}
extern "C" __global__ void doubled_tiles_ok(const float4* src, float4* dst, int tiles) {
    doubled_tiles<2, 1>(src, dst, tiles);
}
extern "C" __global__ void doubled_tiles_one_buffer(const float4* src, float4* dst, int tiles) {
    doubled_tiles<1, 1>(src, dst, tiles);
}
extern "C" __global__ void doubled_tiles_no_wait(const float4* src, float4* dst, int tiles) {
    doubled_tiles<2, 2>(src, dst, tiles);
}

// Copies of `size` bytes with `zfill` zeros at their end, one per thread, at byte offset `skew`.
extern "C" __global__ void async_copy_bytes(const unsigned char* src, unsigned char* dst, int size, int zfill,
                                            int skew, int to_global) {
    __shared__ __align__(16) unsigned char staged[THREADS * 16 + 16];
    unsigned char* to = to_global ? dst : &staged[threadIdx.x * size + skew];
    __pipeline_memcpy_async(to, src + threadIdx.x * size, size, zfill);
    __pipeline_commit();
    __pipeline_wait_prior(0);
    for (int b = 0; b < size; ++b) dst[threadIdx.x * size + b] = staged[threadIdx.x * size + b];
}
"""


def written(tmp_path_factory, name, text) -> Path:
    """A fresh file `name` holding `text`."""
    path = tmp_path_factory.mktemp("cuda_samples") / name
    path.write_text(text)
    return path


@pytest.fixture(scope="module")
def samples(tmp_path_factory) -> Path:
    return written(tmp_path_factory, "samples.cu", SAMPLES)


@pytest.fixture(scope="module")
def mod(samples):
    return build([samples])


@pytest.fixture(scope="module")
def asan_mod(samples):
    return build([samples], sanitize=True)


@pytest.fixture(scope="module")
def cluster_samples(tmp_path_factory) -> Path:
    return written(tmp_path_factory, "clusters.cu", CLUSTER_SAMPLES)


@pytest.fixture(scope="module")
def cluster_mod(cluster_samples):
    return build([cluster_samples])


@pytest.fixture(scope="module")
def async_mod(tmp_path_factory):
    return build([written(tmp_path_factory, "async_copies.cu", ASYNC_SAMPLES)])


def line_of(text: str, source: str = SAMPLES) -> int:
    """Line number in samples.cu (or another source) of the first line containing `text`."""
    return next(n for n, line in enumerate(source.splitlines(), start=1) if text in line)


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
        mod.launch("spin_forever", 1, 2, [np.zeros(1, np.int32)], timeout=2.0)


def test_the_process_survives_faults(mod):
    for _ in range(3):
        with pytest.raises(KernelFault):
            mod.launch("shuffle_mask_mismatch", 1, 32, [np.zeros(32, np.float32)])
        with pytest.raises(KernelFault):
            mod.launch("wild_write", 1, 32, [np.zeros(32, np.float32)])
    x = np.ones(1000, np.float32)
    assert block_sums(mod, "block_sum_ok", x, 2, "random").sum() == 1000


# --------------------------------------------------------------------------------------------
# Thread block clusters
# --------------------------------------------------------------------------------------------
SLICE = 100  # elements per block in cluster_sum


def cluster_sums(mod, name: str, x: np.ndarray, order: str, seed: int = 0) -> np.ndarray:
    out = np.zeros(x.size // SLICE, np.float32)
    mod.launch(name, out.size, 64, [x, out, np.int64(SLICE)], order=order, seed=seed)
    return out


def expected_cluster_sums(x: np.ndarray, k: int) -> np.ndarray:
    """Every block of a cluster gets the sum of the cluster's slices, added in rank order."""
    partial = x.reshape(-1, SLICE).sum(axis=1, dtype=np.float32).reshape(-1, k)
    total = np.zeros(partial.shape[0], np.float32)
    for r in range(k):
        total += partial[:, r]
    return np.repeat(total, k)


def test_cluster_dims_are_found(cluster_mod):
    assert cluster_mod.kernel("cluster_sum_2").cluster_dims == (2, 1, 1)
    assert cluster_mod.kernel("cluster_sum_4").cluster_dims == (4, 1, 1)    # a namespace's constexpr
    assert cluster_mod.kernel("cluster_sum_8").cluster_dims == (8, 1, 1)    # (1 << 3)
    assert cluster_mod.kernel("cluster_sum_8").max_threads == 64
    assert cluster_mod.kernel("cluster_coordinates").cluster_dims == (2, 2, 1)
    assert cluster_mod.kernel("no_cluster_dims").cluster_dims == (1, 1, 1)


@pytest.mark.parametrize("k", [2, 4, 8])
@pytest.mark.parametrize("order, seed", [("forward", 0), ("reverse", 0), ("random", 1), ("random", 2),
                                         ("random", 3)])
def test_cluster_sum_is_exact_in_every_order(cluster_mod, k, order, seed):
    # Three clusters: more blocks than the workers (two teams of k) that run them.
    x = (np.arange(3 * k * SLICE) % 13).astype(np.float32)
    np.testing.assert_array_equal(cluster_sums(cluster_mod, f"cluster_sum_{k}", x, order, seed),
                                  expected_cluster_sums(x, k))


def test_cluster_sum_under_asan(cluster_samples):
    mod = build([cluster_samples], sanitize=True)
    x = (np.arange(2 * 4 * SLICE) % 13).astype(np.float32)
    for order in ORDERS:
        np.testing.assert_array_equal(cluster_sums(mod, "cluster_sum_4", x, order, seed=1),
                                      expected_cluster_sums(x, 4))
    with pytest.raises(KernelFault, match="rank 4 is out of range"):
        mod.launch("rank_out_of_range", 4, 32, [np.zeros(4, np.float32)])


def test_cluster_and_thread_block_coordinates(cluster_mod):
    grid, threads = (4, 2, 2), 32
    out = np.zeros((4 * 2 * 2, threads, 13), np.uint32)
    cluster_mod.launch("cluster_coordinates", grid, threads, [out], order="random", seed=5)
    for bz in range(2):
        for by in range(2):
            for bx in range(4):
                rank = bx % 2 + 2 * (by % 2)
                for t in range(threads):
                    expected = [rank, 4, bx % 2, by % 2, 0, 2, 2, 1, rank * threads + t, 4 * threads,
                                (rank + 1) % 4, t, threads]
                    np.testing.assert_array_equal(out[bx + 4 * (by + 2 * bz), t], expected)


def test_a_kernel_without_cluster_dims_is_a_cluster_of_one_block(cluster_mod):
    out = np.zeros(6, np.uint32)
    cluster_mod.launch("no_cluster_dims", 3, 64, [out])
    np.testing.assert_array_equal(out, [100, 0, 100, 1, 100, 2])


def test_grid_not_a_multiple_of_the_cluster_is_an_invalid_launch(cluster_mod):
    x = np.ones(6 * SLICE, np.float32)
    with pytest.raises(ValueError, match=r"grid \(6,1,1\) is not a multiple of the cluster dimensions "
                                         r"__cluster_dims__\(4,1,1\) of cluster_sum_4"):
        cluster_sums(cluster_mod, "cluster_sum_4", x, "forward")
    with pytest.raises(ValueError, match=r"grid \(4,3,1\) is not a multiple"):
        cluster_mod.launch("cluster_coordinates", (4, 3, 1), 32, [np.zeros(4 * 3 * 32 * 13, np.uint32)])


@pytest.mark.parametrize("order", ORDERS)
def test_missing_cluster_sync_before_remote_reads_gives_a_wrong_result(cluster_mod, order):
    """The blocks of a cluster take turns: the first to run reads the partial sums of blocks that
    have not started (0xFF: NaN), whatever the order."""
    x = np.ones(8 * SLICE, np.float32)
    sums = cluster_sums(cluster_mod, "cluster_sum_without_first_sync", x, order, seed=7)
    assert np.isnan(sums).any()
    np.testing.assert_array_equal(cluster_sums(cluster_mod, "cluster_sum_4", x, order, seed=7), 4 * SLICE)


@pytest.mark.parametrize("order", ORDERS)
def test_missing_cluster_sync_before_exit_gives_a_wrong_result(cluster_mod, order):
    """A block that exits has its shared memory poisoned while the others still read it."""
    x = np.ones(8 * SLICE, np.float32)
    assert np.isnan(cluster_sums(cluster_mod, "cluster_sum_without_last_sync", x, order, seed=7)).any()


@pytest.mark.parametrize("order, seed", [("forward", 0), ("reverse", 0), ("random", 1), ("random", 2)])
def test_split_barrier_before_exit_keeps_the_blocks_alive(cluster_mod, order, seed):
    """__cluster_barrier_arrive_relaxed() then __cluster_barrier_wait() is a cluster barrier, as
    cluster.sync() is (cluster_sum_without_last_sync shows what leaving it out gives)."""
    x = (np.arange(3 * 4 * SLICE) % 13).astype(np.float32)
    np.testing.assert_array_equal(cluster_sums(cluster_mod, "cluster_sum_split_last_sync", x, order, seed),
                                  expected_cluster_sums(x, 4))


@pytest.mark.parametrize("how, message", [
    (0, r"__cluster_barrier_arrive at .*: this thread arrived at .* and has not waited since"),
    (1, r"__cluster_barrier_wait at .* without an arrive"),
    (2, r"cluster.sync\(\) at .* after arriving at the split cluster barrier"),
    (3, r"exited after arriving at the split cluster barrier"),
])
def test_split_barrier_misuse_is_a_kernel_fault(cluster_mod, how, message):
    with pytest.raises(KernelFault, match=message):
        cluster_mod.launch("split_barrier_misuse", 2, 32, [np.int32(how)])


def test_only_the_modules_launched_last_keep_their_fiber_stacks(cluster_samples, monkeypatch):
    """A module keeps a fiber stack (two memory mappings) for every thread its last launches ran;
    past the two modules launched last, a module's are freed, so that a process that loads many
    modules (the tests load a dozen) stays below Linux's 65530 mappings, past which no thread
    starts.  A third module's launch leaves the count of mappings about where it was.

    One cluster per launch, so that one worker runs it and every module holds the same 512 fibers
    (with two clusters, one worker or two could run them: 512 or 1024 fibers, which made the count
    depend on the workers' timing)."""
    modules = [build([cluster_samples], defines={f"CUDA_EMU_TEST_COPY_{i}": None}) for i in range(3)]
    monkeypatch.setattr(type(modules[0]._library), "_launched_last", [])
    x = np.ones(8 * SLICE, np.float32)

    def mappings():
        return len(Path("/proc/self/maps").read_text().splitlines())
    for module in modules[:2]:
        cluster_sums(module, "cluster_sum_8", x, "forward")   # 1 cluster of 8 blocks of 64: 512 fibers
    before = mappings()
    cluster_sums(modules[2], "cluster_sum_8", x, "forward")
    assert mappings() - before < 512   # (1024 more if the first module kept its fibers)


@pytest.mark.parametrize("order", ORDERS)
def test_remote_write_before_the_block_started_is_lost(cluster_mod, order):
    out = np.zeros(4, np.float32)
    cluster_mod.launch("pass_to_next_rank", 4, 32, [out], order=order, seed=7)
    assert np.isnan(out).any(), out


@pytest.mark.parametrize("order", ORDERS)
def test_map_shared_rank_out_of_range(cluster_mod, order):
    with pytest.raises(KernelFault, match=r"map_shared_rank\(0x[0-9a-f]+, 4\) at .*clusters.cu:"
                                          rf"{line_of('BUG: rank 4 of 4', CLUSTER_SAMPLES)}: rank 4 is out "
                                          r"of range: the cluster has 4 block\(s\)") as error:
        cluster_mod.launch("rank_out_of_range", 4, 32, [np.zeros(4, np.float32)], order=order)
    assert error.value.block == (3, 0, 0) and error.value.thread is not None


def test_map_shared_rank_of_global_memory(cluster_mod):
    with pytest.raises(KernelFault, match="is not an address in this block's shared memory"):
        cluster_mod.launch("map_global_memory", 2, 32, [np.zeros(2, np.float32)])


@pytest.mark.parametrize("order", ORDERS)
def test_block_exiting_while_its_cluster_waits_is_a_deadlock(cluster_mod, order):
    with pytest.raises(KernelFault, match=r"deadlock: this block exited without reaching cluster.sync\(\), "
                                          r"where 3 other block\(s\) of its cluster wait") as error:
        cluster_mod.launch("block_leaves_its_cluster", 4, 32, [np.zeros(4, np.float32)], order=order)
    assert error.value.block == (2, 0, 0)


@pytest.mark.parametrize("order", ORDERS)
def test_cluster_sync_reached_by_some_threads_of_a_block_is_a_deadlock(cluster_mod, order):
    with pytest.raises(KernelFault, match=r"deadlock: this thread exited without reaching cluster.sync\(\) "
                                          rf"at .*clusters.cu:{line_of('threads 32..', CLUSTER_SAMPLES)}, "
                                          r"where 32 threads of its block wait") as error:
        cluster_mod.launch("some_threads_skip_cluster_sync", 2, 64, [np.zeros(128, np.float32)], order=order)
    assert error.value.thread[0] >= 32


def test_fault_and_timeout_while_the_cluster_waits_end_the_launch(cluster_mod):
    for order in ("forward", "reverse"):
        with pytest.raises(KernelFault, match=r"__trap\(\) called") as error:
            cluster_mod.launch("trap_while_the_cluster_waits", 4, 32, [np.zeros(1, np.float32)], order=order)
        assert error.value.thread == (5, 0, 0) and error.value.block[0] % 2 == 1
        with pytest.raises(KernelFault, match="timed out") as error:
            cluster_mod.launch("spin_while_the_cluster_waits", 2, 32, [np.zeros(1, np.int32)], order=order,
                               timeout=2.0)   # (0.3 s: a starved worker's block 1 had not started)
        assert error.value.block == (1, 0, 0)
    x = np.ones(8 * SLICE, np.float32)  # the workers are fine afterwards
    np.testing.assert_array_equal(cluster_sums(cluster_mod, "cluster_sum_8", x, "random", seed=1), 8 * SLICE)


# --------------------------------------------------------------------------------------------
# Asynchronous copies (cuda_pipeline_primitives.h)
# --------------------------------------------------------------------------------------------
ASYNC_THREADS = 64


def doubles_the_tiles(async_mod, name: str, order: str, seed: int = 1, tiles: int = 5) -> bool:
    """Whether kernel `name` (one of the doubled_tiles_*) computed dst = 2 src."""
    src = np.random.default_rng(3).random(tiles * ASYNC_THREADS * 4, dtype=np.float32)
    dst = np.zeros_like(src)
    async_mod.launch(name, 1, ASYNC_THREADS, [src, dst, np.int32(tiles)], order=order, seed=seed)
    return bool(np.array_equal(dst, 2 * src))


@pytest.mark.parametrize("order", ORDERS)
def test_double_buffered_async_copies_are_right_in_every_order(async_mod, order):
    assert doubles_the_tiles(async_mod, "doubled_tiles_ok", order)


def test_reading_before_the_wait_sees_the_old_bytes_in_the_forward_order(async_mod):
    """Forward lands a copy only at its thread's wait: tile i read before it lands is the 0xFF
    (NaN) fill or tile i - 2.  Reverse lands it at issue and hides the bug."""
    right = {order: doubles_the_tiles(async_mod, "doubled_tiles_no_wait", order) for order in ("forward", "reverse")}
    assert right == {"forward": False, "reverse": True}


def test_a_copy_into_the_buffer_still_to_be_read_overwrites_it_in_the_reverse_order(async_mod):
    """Reverse lands a copy at issue: with one buffer, tile i + 1 replaces tile i before it is
    read.  Forward lands it at the wait for its group and hides the bug."""
    right = {order: doubles_the_tiles(async_mod, "doubled_tiles_one_buffer", order) for order in ("forward", "reverse")}
    assert right == {"forward": True, "reverse": False}


def test_random_order_lands_copies_at_both_ends(async_mod):
    """With some seed, "random" catches each bug that one of the fixed orders hides."""
    for name in ("doubled_tiles_one_buffer", "doubled_tiles_no_wait"):
        assert not all(doubles_the_tiles(async_mod, name, "random", seed=seed) for seed in range(8)), name


@pytest.mark.parametrize("size, zfill", [(4, 0), (8, 3), (16, 0), (16, 16)])
def test_async_copy_sizes_and_zero_fill(async_mod, size, zfill):
    src = np.arange(1, ASYNC_THREADS * size + 1, dtype=np.uint8)
    dst = np.zeros_like(src)
    async_mod.launch("async_copy_bytes", 1, ASYNC_THREADS, [src, dst, np.int32(size), np.int32(zfill), np.int32(0),
                                                            np.int32(0)])
    expected = src.reshape(ASYNC_THREADS, size).copy()
    expected[:, size - zfill:] = 0
    np.testing.assert_array_equal(dst.reshape(ASYNC_THREADS, size), expected)


@pytest.mark.parametrize("size, zfill, skew, to_global, message", [
    (12, 0, 0, 0, "12 bytes; an asynchronous copy moves 4, 8 or 16"),
    (8, 9, 0, 0, "zfill 9 is more than the 8 bytes"),
    (16, 0, 4, 0, "misaligned"),
    (16, 0, 0, 1, "not in this block's shared memory"),
])
def test_bad_async_copies_are_kernel_faults(async_mod, size, zfill, skew, to_global, message):
    src = np.zeros(ASYNC_THREADS * 16 + 16, np.uint8)
    dst = np.zeros_like(src)
    with pytest.raises(KernelFault, match=message):
        async_mod.launch("async_copy_bytes", 1, ASYNC_THREADS, [src, dst, np.int32(size), np.int32(zfill),
                                                                np.int32(skew), np.int32(to_global)])


# --------------------------------------------------------------------------------------------
# What cannot be emulated fails at build time
# --------------------------------------------------------------------------------------------
CG = '#include <cooperative_groups.h>\nnamespace cg = cooperative_groups;\n'


@pytest.mark.parametrize("code, message", [
    ('extern "C" __global__ void k(int* p) { asm volatile("trap;"); }', "inline PTX"),
    (CG + 'extern "C" __global__ void k(int* p) { cg::this_grid().sync(); }', r"this_grid\(\).*not modelled"),
    (CG + 'extern "C" __global__ void __cluster_dims__(2) k(int* p) { cg::this_cluster().barrier_arrive(); }',
     r"barrier_arrive\(\).*not modelled"),
    (CG + 'extern "C" __global__ void k(int* p) { auto t = cg::tiled_partition<32>(cg::this_thread_block()); }',
     "tiled_partition is not modelled"),
    ('#include <cooperative_groups/reduce.h>\n', "cooperative_groups/reduce.h is not modelled"),
    ('#include <cuda_pipeline.h>\n', "cuda::pipeline is not modelled"),
    ('extern "C" __global__ void __cluster_dims__(32, 1, 1) k(int* p) {}', "at most 16 blocks"),
])
def test_unsupported_features_fail_to_build(tmp_path, code, message):
    source = tmp_path / "unsupported.cu"
    source.write_text(code)
    with pytest.raises(BuildError, match=message):
        build([source])
