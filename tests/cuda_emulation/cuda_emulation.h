// cuda_emulation.h -- compile CUDA C kernels with g++ and run them on the CPU, for tests.
//
// The Python side (tests/cuda_emulation/__init__.py) generates a translation unit per kernel source:
//     #include "cuda_emulation.h"
//     #include "/abs/path/kernels/foo.cu"
//     <one registration line per __global__ function found in foo.cu>
// and links it with runtime.cpp into a shared object that Python loads with ctypes.
// Kernel sources stay plain CUDA: this header supplies everything nvcc would.
//
// WHAT IT MODELS
//  * A launch: blocks run one at a time on each of a few worker OS threads. Every CUDA thread of a
//    block is a fiber with its own stack (256 KiB, guard page below) on that worker. A fiber runs
//    until it reaches a synchronisation point (__syncthreads*, a warp shuffle/vote/__syncwarp,
//    cluster.sync()) or returns; then the scheduler resumes another ready fiber, chosen by the
//    launch's order: "forward" (lowest linear thread id first), "reverse" (highest first) or
//    "random" (seeded). Blocks (clusters) are taken in the same order. A block's (cluster's)
//    schedule is deterministic for an order and seed.
//  * Thread block clusters (sm_90): `__cluster_dims__(x, y, z)` on a kernel (at most 16 blocks;
//    a grid that is not a multiple of it is an invalid launch) and, from <cooperative_groups.h>,
//    this_cluster() with sync(), block_rank(), num_blocks(), block_index(), dim_blocks(),
//    thread_rank(), thread_index(), num_threads()/size(), dim_threads(), map_shared_rank(),
//    query_shared_rank(); this_thread_block() with sync(), thread_rank(), size()/num_threads(),
//    group_index(), thread_index(), dim_threads(); the __cluster* intrinsics of sm_90_rt.h. A
//    kernel without __cluster_dims__ is a cluster of one block. The blocks of a cluster are
//    resident together (each on its own worker OS thread, so each has its own shared memory) and
//    take turns, deterministically: one block runs until all its threads wait at cluster.sync()
//    or have exited, then the next one in the launch's order (lowest rank first for "forward",
//    highest for "reverse", seeded for "random"); a block starts only when it first gets a turn.
//    So a distributed shared memory access that is not ordered by cluster.sync() sees a block
//    that has not started or has exited, whose shared memory is all 0xFF (NaN): it is filled when
//    a block starts (a remote write before then is lost) and again when it exits (a remote read
//    after then reads garbage). Errors: map_shared_rank() of a rank out of range or of an address
//    outside the block's shared memory, cluster.sync() not reached by every thread of a block or
//    by every block of the cluster (a block that exits while others wait), and spinning on a
//    flag another block of the cluster sets (the launch times out: blocks do not run at once).
//  * The split cluster barrier of sm_90_rt.h: __cluster_barrier_arrive() or _arrive_relaxed(),
//    then __cluster_barrier_wait(). A thread joins the barrier at its wait, so code between the
//    two runs before the barrier here (exact for an arrive followed at once by its wait, its use
//    in kernels/; a race of that code with another block's code after its wait goes unseen). The
//    relaxed arrive's lack of memory order is not modelled either: memory here is sequentially
//    consistent, so a missing fence before it shows nothing. Errors: a second arrive before the
//    wait, a wait without an arrive, cluster.sync() or exit between an arrive and its wait.
//  * threadIdx, blockIdx, blockDim, gridDim (x, y, z), warpSize = 32. A warp is 32 consecutive
//    linear thread ids (x fastest), as on hardware.
//  * __syncthreads, __syncthreads_count/_and/_or: every thread of the block must arrive at the
//    same call site (file:line; two barriers on one line count as one). A thread that returns
//    while others wait (early return before a barrier), threads waiting at different
//    __syncthreads calls, or any other wait that can never complete is an error, never a hang.
//  * __shfl_sync, __shfl_up_sync, __shfl_down_sync, __shfl_xor_sync (any trivially copyable type
//    of up to 8 bytes, PTX width/segment rules), __ballot_sync, __any_sync, __all_sync,
//    __syncwarp: the lanes named in the mask rendezvous. Errors: a mask without the calling lane,
//    naming lanes that exited or do not exist (partial last warp), lanes of one warp using
//    overlapping but different masks, or different operations. Reading a lane outside the mask
//    yields all-ones bits (NaN for floating point): undefined on hardware. __activemask() is the
//    warp's lanes that have not exited.
//  * __shared__ variables (in kernels, __device__ functions and templates, at namespace scope)
//    and `extern __shared__` dynamic shared memory (all names alias one buffer, up to 227 KiB).
//    Shared memory is per block and filled with 0xFF bytes (NaN) before every block, so reading
//    it before writing shows. Writes past the launch's dynamic shared size are reported.
//  * Vector types (float4, uint4, int2, double2, ... make_*, dim3): this header defines them
//    instead of the toolkit's vector_types.h, so that a copy from or to memory checks the type's
//    natural alignment (16 bytes for float4): misaligned accesses are errors with their address.
//  * Atomics (atomicAdd/Sub/Exch/Min/Max/Inc/Dec/And/Or/Xor/CAS and _block/_system; really
//    atomic across blocks, misaligned addresses reported), __threadfence*, __ldg and cache-hint
//    loads/stores, common math and bit intrinsics (host libm: results may differ from CUDA's in
//    the last ulp; no FMA contraction, no flush-to-zero; __expf etc. are exact), __half,
//    __nv_bfloat16 and fp8 types from the CUDA toolkit's own host code. __CUDACC__ and
//    __CUDA_ARCH__ (900) are defined.
//  * Asynchronous copies into shared memory through the primitives of <cuda_pipeline_primitives.h>:
//    __pipeline_memcpy_async (4, 8 or 16 bytes with zfill, both addresses aligned to the size, the
//    destination in the block's shared memory), __pipeline_commit and __pipeline_wait_prior. A
//    copy lands at the latest moment the hardware allows in the "forward" order (when its thread
//    waits for its group: so a read before the wait sees the old bytes), at the earliest in
//    "reverse" (when it is issued: so a copy into a buffer still to be read overwrites it), and at
//    one of the two, chosen by the seed, in "random". A copy never waited for never lands.
//  * assert(), __trap(), segmentation faults, stack overflow, integer division by zero and
//    endless loops (launch timeout) inside a kernel become errors naming block and thread;
//    the calling process survives. Out-of-bounds global memory accesses are found by the
//    sanitize=True build (AddressSanitizer), which also covers dynamic shared memory.
//
// WHAT IT DOES NOT MODEL
//  * Cooperative groups other than this_thread_block() and this_cluster() (grid-wide sync,
//    tiles, coalesced groups, reduce, memcpy_async), cluster_group's split barrier
//    (barrier_arrive/barrier_wait), inline PTX (asm), TMA, cuda::pipeline and __pipeline_arrive_on,
//    tensor-core instructions (wmma/mma): they fail to compile, with a message where this header
//    can tell. Clusters sized at launch time (cudaLaunchKernelEx) are not modelled; cluster
//    occupancy limits (a cluster that would not fit on a GPC) and the opt-in that clusters of
//    more than 8 blocks need on a GPU are not checked.
//  * Interleavings inside a slice: a fiber runs from one synchronisation point to the next
//    without preemption, so races are found only when some order exposes them. Lock-step warp
//    execution without __syncwarp ("warp-synchronous" code) is not modelled either, as on Volta+.
//  * The memory model (weak ordering, caches, volatile visibility), timing, occupancy, register
//    and shared-memory capacity limits (other than 1024 threads, __launch_bounds__ and the
//    dynamic shared size), bank conflicts.
//  * Overruns of static __shared__ arrays. Without sanitize=True, out-of-bounds accesses to
//    global memory are not detected (a wild write may corrupt the test process) and neither are
//    reads past the dynamic shared size.
//  * Host-side CUDA API (cudaMalloc, streams, <<<>>>): launches come from Python.
//  * Kernels must be non-template functions at global namespace scope (extern "C" entry points)
//    whose parameters are pointers or scalars; namespace-scope __shared__ variables of the same
//    name in two sources of one build clash at link time. Linux x86-64 only.
#pragma once

// ---------------------------------------------------------------------------------------------
// 1. Standard headers nvcc makes available implicitly.
// ---------------------------------------------------------------------------------------------
#include <algorithm>
#include <cassert>
#include <cfloat>
#include <climits>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <math.h>
#include <new>
#include <type_traits>
#include <utility>

// ---------------------------------------------------------------------------------------------
// 2. Runtime interface: what the inline code below needs from runtime.cpp.
// ---------------------------------------------------------------------------------------------
namespace cuda_emu {

// A source location, taken from the caller through default arguments (like std::source_location).
// (g++ 12 has no __builtin_COLUMN: two calls on one line are one site.)
struct Site {
    const char* file;
    int line;
    static constexpr Site here(const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
        return Site{file, line};
    }
};

// Ends the calling CUDA thread with an error (printf-style message); the launch fails with it.
[[noreturn]] void fault(const char* format, ...) __attribute__((format(printf, 1, 2)));
// Reports a misaligned vector or atomic access (out of line, so the common path stays cheap).
[[noreturn]] void misaligned_access(const void* address, std::size_t alignment, const char* type,
                                    const char* access, Site site);

inline void check_aligned(const void* address, std::size_t alignment, const char* type,
                          const char* access, Site site) {
    if (reinterpret_cast<std::uintptr_t>(address) % alignment != 0)
        misaligned_access(address, alignment, type, access, site);
}

// Barriers and warp operations. They may switch to other fibers before returning.
int block_barrier(int predicate, Site site);  // returns how many threads passed a true predicate
enum class WarpOp { ShflIdx, ShflUp, ShflDown, ShflXor, Ballot, Any, All, SyncWarp };
std::uint64_t warp_op(WarpOp op, unsigned mask, std::uint64_t value, int lane_arg, int width,
                      Site site);
unsigned active_mask();

// Thread block clusters: the barrier over every thread of every block of the cluster, and the
// address of the same shared memory location in the block of rank `rank` of the cluster.
void cluster_barrier(Site site);
void cluster_barrier_arrive(Site site);   // the split barrier: __cluster_barrier_arrive(_relaxed)
void cluster_barrier_wait(Site site);     // and __cluster_barrier_wait
void* map_shared_rank(const void* address, long long rank, Site site);
unsigned query_shared_rank(const void* address, Site site);

// Asynchronous copies (cuda_pipeline_primitives.h): a copy of `size` bytes of which the last
// `zfill` are zeros, the commit of the copies issued since the last one as a group, and the wait
// until at most `prior` committed groups are outstanding.
void async_copy(void* dst, const void* src, std::size_t size, std::size_t zfill, Site site);
void async_commit();
void async_wait_prior(std::size_t prior);

template <class T> std::uint64_t to_bits(const T& value) {
    static_assert(sizeof(T) <= 8 && std::is_trivially_copyable<T>::value,
                  "warp shuffles move trivially copyable values of up to 8 bytes");
    std::uint64_t bits = 0;
    std::memcpy(&bits, &value, sizeof(T));
    return bits;
}
template <class T> T from_bits(std::uint64_t bits) {
    T value;
    std::memcpy(static_cast<void*>(&value), &bits, sizeof(T));
    return value;
}

}  // namespace cuda_emu

// ---------------------------------------------------------------------------------------------
// 3. Vector types (float4, uint4, ... and make_*, dim3) whose copies check alignment, in place of
//    the toolkit's vector_types.h: `float4 v = *reinterpret_cast<const float4*>(p);` checks p
//    (copy constructor) and `*reinterpret_cast<float4*>(q) = v;` checks q (assignment).
// ---------------------------------------------------------------------------------------------
#define CUDA_EMU_VECTOR_COPY_CHECKS(V)                                                           \
    V() = default;                                                                               \
    V(const V& other, ::cuda_emu::Site site = ::cuda_emu::Site::here()) {                        \
        ::cuda_emu::check_aligned(&other, alignof(V), #V, "load from", site);                    \
        std::memcpy(static_cast<void*>(this), &other, sizeof(V));                                \
    }                                                                                            \
    V& operator=(const V& other) {                                                               \
        ::cuda_emu::check_aligned(this, alignof(V), #V, "store to", ::cuda_emu::Site{nullptr, 0}); \
        ::cuda_emu::check_aligned(&other, alignof(V), #V, "load from", ::cuda_emu::Site{nullptr, 0}); \
        std::memcpy(static_cast<void*>(this), &other, sizeof(V));                                \
        return *this;                                                                            \
    }

#define CUDA_EMU_VECTOR1(V, T, A)                                                              \
    struct alignas(A) V {                                                                      \
        using value_type = T;                                                                  \
        value_type x;                                                                          \
        CUDA_EMU_VECTOR_COPY_CHECKS(V)                                                         \
        constexpr V(value_type x_) : x(x_) {}                                                  \
    };                                                                                         \
    inline V make_##V(T x) { return V(x); }
#define CUDA_EMU_VECTOR2(V, T, A)                                                              \
    struct alignas(A) V {                                                                      \
        using value_type = T;                                                                  \
        value_type x, y;                                                                       \
        CUDA_EMU_VECTOR_COPY_CHECKS(V)                                                         \
        constexpr V(value_type x_, value_type y_ = value_type()) : x(x_), y(y_) {}             \
    };                                                                                         \
    inline V make_##V(T x, T y) { return V(x, y); }
#define CUDA_EMU_VECTOR3(V, T, A)                                                              \
    struct alignas(A) V {                                                                      \
        using value_type = T;                                                                  \
        value_type x, y, z;                                                                    \
        CUDA_EMU_VECTOR_COPY_CHECKS(V)                                                         \
        constexpr V(value_type x_, value_type y_ = value_type(), value_type z_ = value_type()) \
            : x(x_), y(y_), z(z_) {}                                                           \
    };                                                                                         \
    inline V make_##V(T x, T y, T z) { return V(x, y, z); }
#define CUDA_EMU_VECTOR4(V, T, A)                                                              \
    struct alignas(A) V {                                                                      \
        using value_type = T;                                                                  \
        value_type x, y, z, w;                                                                 \
        CUDA_EMU_VECTOR_COPY_CHECKS(V)                                                         \
        constexpr V(value_type x_, value_type y_ = value_type(), value_type z_ = value_type(), \
                    value_type w_ = value_type())                                              \
            : x(x_), y(y_), z(z_), w(w_) {}                                                    \
    };                                                                                         \
    inline V make_##V(T x, T y, T z, T w) { return V(x, y, z, w); }

// The alignments of CUDA's vector_types.h: N*sizeof(T) for 1, 2 and 4 lanes (at most 16),
// sizeof(T) for 3 lanes; the 32-byte types come in _16a and _32a flavours.
#define CUDA_EMU_VECTOR_FAMILY(prefix, T)                                                     \
    CUDA_EMU_VECTOR1(prefix##1, T, sizeof(T))                                                  \
    CUDA_EMU_VECTOR2(prefix##2, T, 2 * sizeof(T))                                              \
    CUDA_EMU_VECTOR3(prefix##3, T, sizeof(T))                                                  \
    CUDA_EMU_VECTOR4(prefix##4, T, (4 * sizeof(T) < 16 ? 4 * sizeof(T) : 16))
CUDA_EMU_VECTOR_FAMILY(char, signed char)
CUDA_EMU_VECTOR_FAMILY(uchar, unsigned char)
CUDA_EMU_VECTOR_FAMILY(short, short)
CUDA_EMU_VECTOR_FAMILY(ushort, unsigned short)
CUDA_EMU_VECTOR_FAMILY(int, int)
CUDA_EMU_VECTOR_FAMILY(uint, unsigned int)
CUDA_EMU_VECTOR_FAMILY(long, long)
CUDA_EMU_VECTOR_FAMILY(ulong, unsigned long)
CUDA_EMU_VECTOR_FAMILY(longlong, long long)
CUDA_EMU_VECTOR_FAMILY(ulonglong, unsigned long long)
CUDA_EMU_VECTOR_FAMILY(float, float)
CUDA_EMU_VECTOR_FAMILY(double, double)
CUDA_EMU_VECTOR4(long4_16a, long, 16)
CUDA_EMU_VECTOR4(long4_32a, long, 32)
CUDA_EMU_VECTOR4(ulong4_16a, unsigned long, 16)
CUDA_EMU_VECTOR4(ulong4_32a, unsigned long, 32)
CUDA_EMU_VECTOR4(double4_16a, double, 16)
CUDA_EMU_VECTOR4(double4_32a, double, 32)
CUDA_EMU_VECTOR4(longlong4_16a, long long, 16)
CUDA_EMU_VECTOR4(longlong4_32a, long long, 32)
CUDA_EMU_VECTOR4(ulonglong4_16a, unsigned long long, 16)
CUDA_EMU_VECTOR4(ulonglong4_32a, unsigned long long, 32)

struct dim3 {
    unsigned int x, y, z;
    constexpr dim3(unsigned int vx = 1, unsigned int vy = 1, unsigned int vz = 1) : x(vx), y(vy), z(vz) {}
    constexpr dim3(const uint3& v) : x(v.x), y(v.y), z(v.z) {}
    operator uint3() const { return uint3(x, y, z); }
};

// ---------------------------------------------------------------------------------------------
// 4. The CUDA toolkit's host implementations of __half, __nv_bfloat16 and the fp8 types. Its own
//    vector_types.h and vector_functions.h are skipped (section 3 replaces them). These must
//    come before __CUDA_ARCH__ is defined below, else they take their device (PTX) paths.
// ---------------------------------------------------------------------------------------------
#define __CUDA_INCLUDE_COMPILER_INTERNAL_HEADERS__  // (as vector_types.h does around this include)
#include <crt/host_defines.h>  // what vector_types.h would have included: __host__ etc.
#undef __CUDA_INCLUDE_COMPILER_INTERNAL_HEADERS__
#define __VECTOR_TYPES_H__
#define __VECTOR_FUNCTIONS_H__
#ifndef __NV_SILENCE_DEPRECATION_BEGIN  // (defined by vector_types.h, used by cuda_fp8.hpp)
#define __NV_SILENCE_DEPRECATION_BEGIN
#define __NV_SILENCE_DEPRECATION_END
#endif
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#if __has_include(<cuda_fp8.h>)
#include <cuda_fp8.h>
#endif

// ---------------------------------------------------------------------------------------------
// 5. Execution-space keywords. In the scan pass (-DCUDA_EMULATION_SCAN, preprocessing only)
//    __global__, __launch_bounds__ and __cluster_dims__ leave markers that the Python side uses to
//    find kernels (it passes __cluster_dims__'s expressions to the kernel's registration).
// ---------------------------------------------------------------------------------------------
#undef __global__
#undef __device__
#undef __host__
#undef __shared__
#undef __constant__
#undef __managed__
#undef __launch_bounds__
#undef __forceinline__
#undef __noinline__
#undef __grid_constant__
#undef __maxnreg__
#undef __cluster_dims__
#ifdef CUDA_EMULATION_SCAN
#define __global__ CUDA_EMULATION_KERNEL
#define __launch_bounds__(...) CUDA_EMULATION_LAUNCH_BOUNDS(__VA_ARGS__)
#define __cluster_dims__(...) CUDA_EMULATION_CLUSTER_DIMS(__VA_ARGS__)
#else
#define __global__
#define __launch_bounds__(...)
#define __cluster_dims__(...)
#endif
#define __device__
#define __host__
// One copy per worker OS thread = per block in flight. `used` keeps g++ from folding reads of a
// never-written array to zero (the runtime fills shared memory with 0xFF behind its back);
// g++ warns that `used` is ignored on `extern __shared__` declarations, hence the pragma.
#define __shared__ thread_local __attribute__((used))
#pragma GCC diagnostic ignored "-Wattributes"
#define __constant__
#define __managed__
#define __grid_constant__
#define __forceinline__ inline __attribute__((always_inline))
#define __noinline__ __attribute__((noinline))
#define __maxnreg__(n)
// nvcc's own macros, so kernels take their device code paths. Change the architecture with
// build(defines={"CUDA_EMULATION_ARCH": "800"}), or "0" to leave __CUDA_ARCH__ undefined.
#ifndef __CUDACC__
#define __CUDACC__ 1
#endif
#ifndef CUDA_EMULATION_ARCH
#define CUDA_EMULATION_ARCH 900
#endif
#if CUDA_EMULATION_ARCH > 0
#define __CUDA_ARCH__ CUDA_EMULATION_ARCH
#endif

// ---------------------------------------------------------------------------------------------
// 6. Built-in variables. The runtime points `current_thread` at the running fiber's view.
//    (It is the runtime's only thread-local variable: see "shared memory" in runtime.cpp.)
// ---------------------------------------------------------------------------------------------
namespace cuda_emu {
struct ThreadView {
    uint3 thread_idx, block_idx;
    dim3 block_dim, grid_dim;
    dim3 cluster_dim;  // __cluster_dims__, (1,1,1) without
};
extern __thread ThreadView* current_thread;
}  // namespace cuda_emu

#define threadIdx (::cuda_emu::current_thread->thread_idx)
#define blockIdx (::cuda_emu::current_thread->block_idx)
#define blockDim (::cuda_emu::current_thread->block_dim)
#define gridDim (::cuda_emu::current_thread->grid_dim)
constexpr int warpSize = 32;

// ---------------------------------------------------------------------------------------------
// 7. Synchronisation and warp-level primitives.
// ---------------------------------------------------------------------------------------------
inline void __syncthreads(cuda_emu::Site site = cuda_emu::Site::here()) {
    cuda_emu::block_barrier(0, site);
}
inline int __syncthreads_count(int predicate, cuda_emu::Site site = cuda_emu::Site::here()) {
    return cuda_emu::block_barrier(predicate != 0, site);
}
inline int __syncthreads_and(int predicate, cuda_emu::Site site = cuda_emu::Site::here()) {
    return cuda_emu::block_barrier(predicate != 0, site) == int(blockDim.x * blockDim.y * blockDim.z);
}
inline int __syncthreads_or(int predicate, cuda_emu::Site site = cuda_emu::Site::here()) {
    return cuda_emu::block_barrier(predicate != 0, site) > 0;
}
inline void __syncwarp(unsigned mask = 0xffffffffu, cuda_emu::Site site = cuda_emu::Site::here()) {
    cuda_emu::warp_op(cuda_emu::WarpOp::SyncWarp, mask, 0, 0, warpSize, site);
}
inline unsigned __activemask() { return cuda_emu::active_mask(); }

template <class T>
T __shfl_sync(unsigned mask, T var, int srcLane, int width = warpSize,
              cuda_emu::Site site = cuda_emu::Site::here()) {
    return cuda_emu::from_bits<T>(cuda_emu::warp_op(cuda_emu::WarpOp::ShflIdx, mask,
                                                    cuda_emu::to_bits(var), srcLane, width, site));
}
template <class T>
T __shfl_up_sync(unsigned mask, T var, unsigned delta, int width = warpSize,
                 cuda_emu::Site site = cuda_emu::Site::here()) {
    return cuda_emu::from_bits<T>(cuda_emu::warp_op(cuda_emu::WarpOp::ShflUp, mask,
                                                    cuda_emu::to_bits(var), int(delta), width, site));
}
template <class T>
T __shfl_down_sync(unsigned mask, T var, unsigned delta, int width = warpSize,
                   cuda_emu::Site site = cuda_emu::Site::here()) {
    return cuda_emu::from_bits<T>(cuda_emu::warp_op(cuda_emu::WarpOp::ShflDown, mask,
                                                    cuda_emu::to_bits(var), int(delta), width, site));
}
template <class T>
T __shfl_xor_sync(unsigned mask, T var, int laneMask, int width = warpSize,
                  cuda_emu::Site site = cuda_emu::Site::here()) {
    return cuda_emu::from_bits<T>(cuda_emu::warp_op(cuda_emu::WarpOp::ShflXor, mask,
                                                    cuda_emu::to_bits(var), laneMask, width, site));
}
inline unsigned __ballot_sync(unsigned mask, int predicate,
                              cuda_emu::Site site = cuda_emu::Site::here()) {
    return unsigned(cuda_emu::warp_op(cuda_emu::WarpOp::Ballot, mask, predicate != 0, 0, warpSize, site));
}
inline int __any_sync(unsigned mask, int predicate, cuda_emu::Site site = cuda_emu::Site::here()) {
    return int(cuda_emu::warp_op(cuda_emu::WarpOp::Any, mask, predicate != 0, 0, warpSize, site));
}
inline int __all_sync(unsigned mask, int predicate, cuda_emu::Site site = cuda_emu::Site::here()) {
    return int(cuda_emu::warp_op(cuda_emu::WarpOp::All, mask, predicate != 0, 0, warpSize, site));
}

// Memory fences: the emulator has no weak memory ordering; a full fence is more than enough.
inline void __threadfence() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
inline void __threadfence_block() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
inline void __threadfence_system() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }

// Thread block clusters: the intrinsics of the toolkit's sm_90_rt.h (<cooperative_groups.h>,
// tests/cuda_emulation/include, is built on them, as CUDA's is). A cluster's blocks are
// consecutive in x, then y, then z; the rank counts them x fastest.
inline dim3 __clusterDim() { return ::cuda_emu::current_thread->cluster_dim; }
inline dim3 __clusterRelativeBlockIdx() {
    const dim3 c = __clusterDim();
    return dim3(blockIdx.x % c.x, blockIdx.y % c.y, blockIdx.z % c.z);
}
inline unsigned __clusterRelativeBlockRank() {
    const dim3 c = __clusterDim(), b = __clusterRelativeBlockIdx();
    return b.x + c.x * (b.y + c.y * b.z);
}
inline unsigned __clusterSizeInBlocks() {
    const dim3 c = __clusterDim();
    return c.x * c.y * c.z;
}
inline dim3 __clusterIdx() {
    const dim3 c = __clusterDim();
    return dim3(blockIdx.x / c.x, blockIdx.y / c.y, blockIdx.z / c.z);
}
inline dim3 __clusterGridDimInClusters() {
    const dim3 c = __clusterDim();
    return dim3(gridDim.x / c.x, gridDim.y / c.y, gridDim.z / c.z);
}
inline void* __cluster_map_shared_rank(const void* ptr, unsigned target_block_rank,
                                       cuda_emu::Site site = cuda_emu::Site::here()) {
    return cuda_emu::map_shared_rank(ptr, target_block_rank, site);
}
inline unsigned __cluster_query_shared_rank(const void* ptr, cuda_emu::Site site = cuda_emu::Site::here()) {
    return cuda_emu::query_shared_rank(ptr, site);
}
inline void __threadfence_cluster() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
// The split barrier (arrive, then wait): a thread joins the barrier at its wait (see the top of
// this file for what that leaves out).
inline void __cluster_barrier_arrive(cuda_emu::Site site = cuda_emu::Site::here()) {
    cuda_emu::cluster_barrier_arrive(site);
}
inline void __cluster_barrier_arrive_relaxed(cuda_emu::Site site = cuda_emu::Site::here()) {
    cuda_emu::cluster_barrier_arrive(site);
}
inline void __cluster_barrier_wait(cuda_emu::Site site = cuda_emu::Site::here()) {
    cuda_emu::cluster_barrier_wait(site);
}
#define CUDA_EMU_NOT_MODELLED(what) __attribute__((error("cuda_emulation: " what " is not modelled")))

// ---------------------------------------------------------------------------------------------
// 8. Atomics: a compare-and-swap loop on the value's bits, so every type and operation takes
//    the same path. The second parameter is non-deduced, as CUDA's overloads convert it.
// ---------------------------------------------------------------------------------------------
namespace cuda_emu {
template <class T> struct same_type { using type = T; };
template <class T> using no_deduce = typename same_type<T>::type;

template <class T, class Update>
T atomic_update(T* address, Update update, Site site) {
    static_assert(sizeof(T) == 2 || sizeof(T) == 4 || sizeof(T) == 8, "atomics on 2, 4 or 8 bytes");
    using Bits = std::conditional_t<sizeof(T) == 2, std::uint16_t,
                                    std::conditional_t<sizeof(T) == 4, std::uint32_t, std::uint64_t>>;
    check_aligned(address, sizeof(T), "atomic", "read-modify-write of", site);
    Bits* bits = reinterpret_cast<Bits*>(address);
    Bits expected = __atomic_load_n(bits, __ATOMIC_RELAXED);
    for (;;) {
        T old_value, new_value;
        std::memcpy(static_cast<void*>(&old_value), &expected, sizeof(T));
        new_value = update(old_value);
        Bits desired;
        std::memcpy(&desired, &new_value, sizeof(T));
        if (__atomic_compare_exchange_n(bits, &expected, desired, false, __ATOMIC_SEQ_CST,
                                        __ATOMIC_RELAXED))
            return old_value;
    }
}
}  // namespace cuda_emu

#define CUDA_EMU_ATOMIC(name, expression)                                                     \
    template <class T>                                                                        \
    T name(T* address, cuda_emu::no_deduce<T> val, cuda_emu::Site site = cuda_emu::Site::here()) { \
        return cuda_emu::atomic_update(address, [&](T old) -> T { return expression; }, site); \
    }                                                                                         \
    /* the scoped variants are the same here */                                               \
    template <class T, class... Rest>                                                         \
    T name##_block(T* address, Rest... rest) { return name(address, rest...); }               \
    template <class T, class... Rest>                                                         \
    T name##_system(T* address, Rest... rest) { return name(address, rest...); }
CUDA_EMU_ATOMIC(atomicAdd, T(old + val))
CUDA_EMU_ATOMIC(atomicSub, T(old - val))
CUDA_EMU_ATOMIC(atomicExch, val)
CUDA_EMU_ATOMIC(atomicMin, (val < old ? val : old))
CUDA_EMU_ATOMIC(atomicMax, (val > old ? val : old))
CUDA_EMU_ATOMIC(atomicAnd, T(old & val))
CUDA_EMU_ATOMIC(atomicOr, T(old | val))
CUDA_EMU_ATOMIC(atomicXor, T(old ^ val))
CUDA_EMU_ATOMIC(atomicInc, T(old >= val ? 0 : old + 1))
CUDA_EMU_ATOMIC(atomicDec, T((old == 0 || old > val) ? val : old - 1))
template <class T>
T atomicCAS(T* address, cuda_emu::no_deduce<T> compare, cuda_emu::no_deduce<T> val,
            cuda_emu::Site site = cuda_emu::Site::here()) {
    return cuda_emu::atomic_update(address, [&](T old) -> T { return old == compare ? val : old; }, site);
}

// ---------------------------------------------------------------------------------------------
// 9. Loads and stores with cache hints, math and bit intrinsics nvcc provides.
// ---------------------------------------------------------------------------------------------
template <class T> T __ldg(const T* p) { return *p; }
template <class T> T __ldca(const T* p) { return *p; }
template <class T> T __ldcg(const T* p) { return *p; }
template <class T> T __ldcs(const T* p) { return *p; }
template <class T> T __ldlu(const T* p) { return *p; }
template <class T> T __ldcv(const T* p) { return *p; }
template <class T> void __stwb(T* p, T v) { *p = v; }
template <class T> void __stcg(T* p, T v) { *p = v; }
template <class T> void __stcs(T* p, T v) { *p = v; }
template <class T> void __stwt(T* p, T v) { *p = v; }

// CUDA's global min/max overloads (math_functions.hpp).
inline int min(int a, int b) { return a < b ? a : b; }
inline unsigned min(unsigned a, unsigned b) { return a < b ? a : b; }
inline unsigned min(int a, unsigned b) { return min(unsigned(a), b); }
inline unsigned min(unsigned a, int b) { return min(a, unsigned(b)); }
inline long min(long a, long b) { return a < b ? a : b; }
inline unsigned long min(unsigned long a, unsigned long b) { return a < b ? a : b; }
inline long long min(long long a, long long b) { return a < b ? a : b; }
inline unsigned long long min(unsigned long long a, unsigned long long b) { return a < b ? a : b; }
inline float min(float a, float b) { return fminf(a, b); }
inline double min(double a, double b) { return fmin(a, b); }
inline double min(float a, double b) { return fmin(a, b); }
inline double min(double a, float b) { return fmin(a, b); }
inline int max(int a, int b) { return a > b ? a : b; }
inline unsigned max(unsigned a, unsigned b) { return a > b ? a : b; }
inline unsigned max(int a, unsigned b) { return max(unsigned(a), b); }
inline unsigned max(unsigned a, int b) { return max(a, unsigned(b)); }
inline long max(long a, long b) { return a > b ? a : b; }
inline unsigned long max(unsigned long a, unsigned long b) { return a > b ? a : b; }
inline long long max(long long a, long long b) { return a > b ? a : b; }
inline unsigned long long max(unsigned long long a, unsigned long long b) { return a > b ? a : b; }
inline float max(float a, float b) { return fmaxf(a, b); }
inline double max(double a, double b) { return fmax(a, b); }
inline double max(float a, double b) { return fmax(a, b); }
inline double max(double a, float b) { return fmax(a, b); }

// Fast-math and rounding-mode intrinsics: the exact host function (round-to-nearest only).
inline float __expf(float x) { return expf(x); }
inline float __exp10f(float x) { return powf(10.0f, x); }
inline float __logf(float x) { return logf(x); }
inline float __log2f(float x) { return log2f(x); }
inline float __log10f(float x) { return log10f(x); }
inline float __powf(float x, float y) { return powf(x, y); }
inline float __sinf(float x) { return sinf(x); }
inline float __cosf(float x) { return cosf(x); }
inline float __tanf(float x) { return tanf(x); }
inline void __sincosf(float x, float* s, float* c) { *s = sinf(x); *c = cosf(x); }
inline float __fdividef(float x, float y) { return x / y; }
inline float fdividef(float x, float y) { return x / y; }
inline float __saturatef(float x) { return x != x ? 0.0f : fminf(fmaxf(x, 0.0f), 1.0f); }
inline float rsqrtf(float x) { return 1.0f / sqrtf(x); }
inline double rsqrt(double x) { return 1.0 / sqrt(x); }
inline float rcbrtf(float x) { return 1.0f / cbrtf(x); }
inline float exp10f(float x) { return powf(10.0f, x); }
inline float __frcp_rn(float x) { return 1.0f / x; }
inline float __frsqrt_rn(float x) { return 1.0f / sqrtf(x); }
inline float __fsqrt_rn(float x) { return sqrtf(x); }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __fmaf_rn(float a, float b, float c) { return fmaf(a, b, c); }
inline double __dadd_rn(double a, double b) { return a + b; }
inline double __dsub_rn(double a, double b) { return a - b; }
inline double __dmul_rn(double a, double b) { return a * b; }
inline double __ddiv_rn(double a, double b) { return a / b; }
inline double __fma_rn(double a, double b, double c) { return fma(a, b, c); }
inline double __drcp_rn(double x) { return 1.0 / x; }
inline double __dsqrt_rn(double x) { return sqrt(x); }
inline int __float2int_rn(float x) { return int(nearbyintf(x)); }
inline int __float2int_rz(float x) { return int(x); }
inline int __float2int_rd(float x) { return int(floorf(x)); }
inline int __float2int_ru(float x) { return int(ceilf(x)); }
inline unsigned __float2uint_rn(float x) { return unsigned(nearbyintf(x)); }
inline long long __float2ll_rn(float x) { return (long long)nearbyintf(x); }
inline long long __double2ll_rn(double x) { return (long long)nearbyint(x); }
inline int __double2int_rn(double x) { return int(nearbyint(x)); }
inline float __int2float_rn(int x) { return float(x); }
inline float __uint2float_rn(unsigned x) { return float(x); }
inline float __ll2float_rn(long long x) { return float(x); }
inline double __ll2double_rn(long long x) { return double(x); }
inline float __double2float_rn(double x) { return float(x); }

// Reinterpreting bits.
inline int __float_as_int(float x) { return cuda_emu::from_bits<int>(cuda_emu::to_bits(x)); }
inline unsigned __float_as_uint(float x) { return cuda_emu::from_bits<unsigned>(cuda_emu::to_bits(x)); }
inline float __int_as_float(int x) { return cuda_emu::from_bits<float>(cuda_emu::to_bits(x)); }
inline float __uint_as_float(unsigned x) { return cuda_emu::from_bits<float>(cuda_emu::to_bits(x)); }
inline long long __double_as_longlong(double x) {
    return cuda_emu::from_bits<long long>(cuda_emu::to_bits(x));
}
inline double __longlong_as_double(long long x) {
    return cuda_emu::from_bits<double>(cuda_emu::to_bits(x));
}
inline int __double2hiint(double x) { return int(std::uint64_t(__double_as_longlong(x)) >> 32); }
inline int __double2loint(double x) { return int(std::uint32_t(__double_as_longlong(x))); }
inline double __hiloint2double(int hi, int lo) {
    return __longlong_as_double((long long)((std::uint64_t(unsigned(hi)) << 32) | unsigned(lo)));
}

// Integer and bit intrinsics.
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __popcll(unsigned long long x) { return __builtin_popcountll(x); }
inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz(unsigned(x)); }
inline int __clzll(long long x) { return x == 0 ? 64 : __builtin_clzll((unsigned long long)x); }
inline int __ffs(int x) { return __builtin_ffs(x); }
inline int __ffsll(long long x) { return __builtin_ffsll(x); }
inline unsigned __brev(unsigned x) {
    unsigned r = 0;
    for (int i = 0; i < 32; ++i) r |= ((x >> i) & 1u) << (31 - i);
    return r;
}
inline unsigned long long __brevll(unsigned long long x) {
    return (static_cast<unsigned long long>(__brev(unsigned(x))) << 32) | __brev(unsigned(x >> 32));
}
inline int __mul24(int a, int b) { return int((long long)(a << 8 >> 8) * (b << 8 >> 8)); }
inline unsigned __umul24(unsigned a, unsigned b) { return (a & 0xffffffu) * (b & 0xffffffu); }
inline int __mulhi(int a, int b) { return int(((long long)a * b) >> 32); }
inline unsigned __umulhi(unsigned a, unsigned b) { return unsigned(((unsigned long long)a * b) >> 32); }
inline long long __mul64hi(long long a, long long b) { return (long long)(((__int128)a * b) >> 64); }
inline unsigned long long __umul64hi(unsigned long long a, unsigned long long b) {
    return (unsigned long long)(((unsigned __int128)a * b) >> 64);
}

// Miscellaneous.
inline long long clock64() { return (long long)__builtin_ia32_rdtsc(); }
inline void __nanosleep(unsigned) {}
[[noreturn]] inline void __trap() { cuda_emu::fault("__trap() called"); }
[[noreturn]] inline void __brkpt() { cuda_emu::fault("__brkpt() called"); }

// ---------------------------------------------------------------------------------------------
// 10. Features that cannot be emulated fail at compile time with a clear message.
//    (Toolkit headers for them are shadowed by files in tests/cuda_emulation/include/.)
// ---------------------------------------------------------------------------------------------
#define asm _Pragma("GCC error \"cuda_emulation: inline PTX (asm) cannot be emulated\"") __asm__

// ---------------------------------------------------------------------------------------------
// 11. Kernel registration. For every kernel the generated code adds
//        static const int cuda_emu_registered_N = cuda_emu::register_kernel("name", &name, "a,b", 256,
//                                                                            cuda_emu::cluster_shape<8, 1, 1>());
//     which records a type-erased invoker and a signature string: one character per parameter,
//     P pointer, b/B int8/uint8, h/H int16/uint16, i/I int32/uint32, q/Q int64/uint64,
//     f float, d double, e __half, ? bool, x anything else (cannot be launched from Python);
//     and an access string of the same length: r for a pointer to const (the kernel only reads
//     through it), w for any other pointer, - for a scalar (the driver stand-in uses it to tell
//     reads from writes when it checks streams). cluster_shape<>() checks __cluster_dims__ (its
//     expressions, evaluated here by the compiler) as nvcc does; ClusterShape{} is a kernel without.
// ---------------------------------------------------------------------------------------------
namespace cuda_emu {
using ArgSlot = std::uint64_t;  // every argument travels as 8 bytes (little-endian, zero-extended)
using Invoker = void (*)(void (*kernel)(), const ArgSlot* args);

struct ClusterShape {
    unsigned x = 0, y = 0, z = 0;  // all 0: no __cluster_dims__
};
template <long long X, long long Y, long long Z> constexpr ClusterShape cluster_shape() {
    static_assert(X >= 1 && Y >= 1 && Z >= 1, "__cluster_dims__: every dimension must be at least 1");
    static_assert(X * Y * Z <= 16, "__cluster_dims__: a cluster has at most 16 blocks");
    return ClusterShape{unsigned(X), unsigned(Y), unsigned(Z)};
}

int register_kernel_erased(const char* name, void (*kernel)(), Invoker invoke, const char* signature,
                           const char* access, const char* param_names, int max_threads,
                           ClusterShape cluster);

template <class T> constexpr char access_code() {
    if constexpr (std::is_pointer<T>::value)
        return std::is_const<typename std::remove_pointer<T>::type>::value ? 'r' : 'w';
    return '-';
}

template <class T> constexpr char signature_code() {
    if (std::is_pointer<T>::value) return 'P';
    if (std::is_same<T, bool>::value) return '?';
    if (std::is_same<T, float>::value) return 'f';
    if (std::is_same<T, double>::value) return 'd';
    if (std::is_same<T, __half>::value) return 'e';
    if (std::is_integral<T>::value) {
        const bool is_signed = std::is_signed<T>::value;
        switch (sizeof(T)) {
            case 1: return is_signed ? 'b' : 'B';
            case 2: return is_signed ? 'h' : 'H';
            case 4: return is_signed ? 'i' : 'I';
            case 8: return is_signed ? 'q' : 'Q';
        }
    }
    return 'x';
}

template <class T> T from_slot(ArgSlot slot) {
    if constexpr (std::is_pointer<T>::value) {
        return reinterpret_cast<T>(static_cast<std::uintptr_t>(slot));
    } else if constexpr (signature_code<T>() != 'x') {
        return from_bits<T>(slot);
    } else {  // (Python refuses to launch such a kernel; this keeps the module compiling)
        fault("a kernel parameter of this type cannot be passed from Python");
    }
}

template <class... Params, std::size_t... I>
void invoke_kernel(void (*kernel)(), const ArgSlot* args, std::index_sequence<I...>) {
    reinterpret_cast<void (*)(Params...)>(kernel)(from_slot<Params>(args[I])...);
}

template <class... Params>
int register_kernel(const char* name, void (*kernel)(Params...), const char* param_names,
                    int max_threads, ClusterShape cluster) {
    static const char signature[] = {signature_code<Params>()..., '\0'};
    static const char access[] = {access_code<Params>()..., '\0'};
    Invoker invoke = [](void (*erased)(), const ArgSlot* args) {
        invoke_kernel<Params...>(erased, args, std::index_sequence_for<Params...>{});
    };
    return register_kernel_erased(name, reinterpret_cast<void (*)()>(kernel), invoke, signature,
                                  access, param_names, max_threads, cluster);
}
}  // namespace cuda_emu
