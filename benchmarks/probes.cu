// Probes of the cost model's constants (benchmarks/cost_model.py, CONSTANTS), for a lent GPU:
// benchmarks/probe_constants.py launches them and turns their times into the constants.  Not
// part of the library; kernels/common.cuh is included for the batch error's last-block sum,
// the very code the library's kernels end with.
//
// Every probe writes a result that depends on all its work (so no load or exchange can be
// optimised away), and tests/test_probes.py checks those results in the CPU emulation.
#include "common.cuh"

// probe_spin: `rounds` dependent multiply-adds a thread; one thread's result to out[0].  A
// kernel of a chosen length: launched first, it keeps the GPU busy while the host queues the
// kernels timed after it, so that their times are the GPU's and not the host's launch rate.
extern "C" __global__ void probe_spin(int rounds, float* __restrict__ out) {
    float v = float(threadIdx.x);
    for (int r = 0; r < rounds; ++r) v = fmaf(v, 0.999f, 1.0f);
    if (blockIdx.x == 0 && threadIdx.x == 0) out[0] = v;
}

// probe_empty: nothing; its time back to back is the gap between dependent kernels.
extern "C" __global__ void probe_empty() {}

// probe_final_sum: each block passes its index as its sum to finish_batch_error, whose last
// block writes the total (gridDim.x (gridDim.x - 1) / 2) to *batch_error.  Against probe_empty
// on the same grid, its time is the tail the last block's sum adds to every kernel.
extern "C" __global__ void probe_final_sum(double* __restrict__ block_sums, unsigned* __restrict__ ticket,
                                           double* __restrict__ batch_error) {
    plc::finish_batch_error<256>(double(blockIdx.x), block_sums, ticket, batch_error, nullptr, 1.0);
}

// probe_dependent_loads: each of the first `active` threads of a block of 256 issues one 16-byte
// load at a time, the next address
// depending on the value loaded (through `zero`, 0 at run time but unknown to the compiler), for
// `rounds` rounds over `data` (n_vectors 16-byte vectors, a power of 2; a warp's loads are
// coalesced, and the wrap-around a mask, not a division on the dependent chain).  So
// every SM has exactly blocks-per-SM x active x 16 bytes in flight, and the bandwidth this
// reaches gives the latency under that load (Little's law).  Sum of everything read: out[block].
extern "C" __global__ void probe_dependent_loads(const uint4* __restrict__ data, long long n_vectors, int rounds,
                                                 unsigned zero, int active, unsigned* __restrict__ out) {
    const long long stride = (long long)gridDim.x * blockDim.x;
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    unsigned sum = 0;
    for (int r = 0; r < (int(threadIdx.x) < active ? rounds : 0); ++r) {
        const uint4 v = __ldcg(&data[i & (n_vectors - 1)]);   // (L2, not L1: every round is a new line)
        sum += v.x + v.y + v.z + v.w;
        i += stride + (long long)(v.x * zero);
    }
    const unsigned total = plc::group_reduce<256>(sum, plc::Sum());
    if (threadIdx.x == 0) out[blockIdx.x] = total;
}

// read_once: the grid reads data[0 .. n_vectors) once, forward (reverse = 0) or from the end
// (as pass 2 of kl_cluster_stream_* does), UNROLL independent 16-byte loads a thread in flight.
// Sum of everything read: out[block].
template <int THREADS, int UNROLL>
__device__ __forceinline__ void read_once(const uint4* __restrict__ data, long long n_vectors, int reverse,
                                          unsigned* __restrict__ out) {
    const long long threads = (long long)gridDim.x * THREADS;
    const long long first = (long long)blockIdx.x * THREADS + threadIdx.x;
    unsigned sum = 0;
    for (long long base = 0; base < n_vectors; base += UNROLL * threads) {
        uint4 v[UNROLL];
#pragma unroll
        for (int u = 0; u < UNROLL; ++u) {
            const long long k = base + u * threads + first;
            v[u] = k < n_vectors ? __ldcg(&data[reverse ? n_vectors - 1 - k : k]) : make_uint4(0, 0, 0, 0);
        }
#pragma unroll
        for (int u = 0; u < UNROLL; ++u) sum += v[u].x + v[u].y + v[u].z + v[u].w;
    }
    const unsigned total = plc::group_reduce<THREADS>(sum, plc::Sum());
    if (threadIdx.x == 0) out[blockIdx.x] = total;
}

// probe_read: blocks of 256, 4 loads a thread in flight.  Timed right after a forward read of
// the same bytes, a reverse read shows how much of them L2 still held.
extern "C" __global__ void __launch_bounds__(256) probe_read(const uint4* __restrict__ data, long long n_vectors,
                                                           int reverse, unsigned* __restrict__ out) {
    read_once<256, 4>(data, n_vectors, reverse, out);
}

// probe_read_one_sm: one block of 1024, 8 loads a thread in flight (128 KiB: more than one SM
// needs to cover the DRAM latency at its most), launched alone: what a single SM can pull.
extern "C" __global__ void __launch_bounds__(1024) probe_read_one_sm(const uint4* __restrict__ data,
                                                                    long long n_vectors, unsigned* __restrict__ out) {
    read_once<1024, 8>(data, n_vectors, 0, out);
}

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
#include <cooperative_groups.h>

// probe_exchange: `rounds` exchanges of kl_cluster_rows's kind (kernels/kl_cluster.cu,
// exchange_in_cluster) and nothing else: each block writes a slot (two alternating buffers),
// cluster.sync(), threads 0..7 copy the 8 blocks' slots through DSMEM, __syncthreads(), every
// thread adds them.  Blocks of 256, two an SM as kl_cluster_*_t256_*.  Its time per round is
// the wait a block has at each exchange.  out[block] = sum over rounds of the 8 slots, each
// block's slot in round r being rank + r: 8 r + 28 a round.
extern "C" __global__ void __cluster_dims__(8, 1, 1) __launch_bounds__(256, 2)
    probe_exchange(int rounds, float* __restrict__ out) {
    namespace cg = cooperative_groups;
    cg::cluster_group cluster = cg::this_cluster();
    __shared__ float slot[2], gathered[8];
    const int rank = int(cluster.block_rank());
    float total = 0;
    for (int r = 0; r < rounds; ++r) {
        float* own = &slot[r & 1];
        if (threadIdx.x == 0) *own = float(rank + r);
        cluster.sync();
        if (threadIdx.x < 8) gathered[threadIdx.x] = *cluster.map_shared_rank(own, threadIdx.x);
        __syncthreads();
#pragma unroll
        for (int k = 0; k < 8; ++k) total += gathered[k];
    }
    cluster.sync();   // no block leaves while another may still read its slots
    if (threadIdx.x == 0) out[blockIdx.x] = total;
}
#endif
