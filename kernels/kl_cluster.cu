// KL divergence (and reverse KL, JSD) of long rows in one read, on sm_90 and later: the third
// path of the family in kl_divergence.cu, whose element math and chunk layout it reuses.
//
// kl_chunk_* read a long row twice (statistics, then gradient) through a global scratch of
// per-chunk statistics: 16 B per element in float32.  Here the K chunks of a row are the K
// blocks of a thread-block cluster, each holding its chunk in registers; the blocks swap their
// chunk statistics through distributed shared memory (DSMEM) instead, so pred and target are
// read once and grad written once: 12 B per element in float32 (6 B for 16-bit inputs), as in
// kl_rows, whatever normTarget or the divergence.  Per row:
//   1. every block loads its chunk and computes the chunk's (max, sum exp(x - max)), and the
//      target's when norm_target, into its slot;
//   2. cluster.sync(); threads 0..K-1 copy one rank's slot each into the block's `gathered`;
//      every thread combines the K slots in rank order, so every block of the cluster gets the
//      same row statistics, bit for bit;
//   3. reverse KL and JSD swap each chunk's sum of q g the same way for the row's S;
//   4. grad is stored; the chunk's error goes into the block's sum (finish_batch_error).
// A slot is written again only two exchanges later (exchange e uses buffer e % 2): after the
// cluster.sync of exchange e + 1, which no block passes before every block has finished reading
// the slots of exchange e.  So one cluster.sync per exchange, and one before the blocks exit,
// as no block may leave while another may still read its shared memory.
//
// Rows longer than a cluster holds (K * THREADS * ELEMS elements), double inputs and GPUs
// before sm_90 take kl_chunk_* (the host decides: puzzlelib_cost/row_softmax.py).
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
#include <cooperative_groups.h>

namespace plc {

// Blocks per cluster: 8, the largest cluster every sm_90+ GPU must launch (larger ones need an
// opt-in attribute that pycuda's launch does not set).
constexpr int CLUSTER = 8;

// One chunk's softmax statistics: its max and sum of exp(x - max) (and the target's).
template <typename A> struct ChunkStats { A max_x, sum_x, max_t, sum_t; };

// Puts `mine` in this block's slot of this exchange, then copies the K blocks' slots, in rank
// order, into `gathered` (every thread may read it on return).
template <int K, typename S>
__device__ __forceinline__ void exchange_in_cluster(cooperative_groups::cluster_group& cluster, S (&slot)[2],
                                                    S (&gathered)[K], const S& mine, int& exchange) {
    S* own = &slot[exchange & 1];
    ++exchange;
    if (threadIdx.x == 0) *own = mine;
    cluster.sync();   // every block's slot is written
    if (threadIdx.x < K) gathered[threadIdx.x] = *cluster.map_shared_rank(own, threadIdx.x);
    __syncthreads();  // `gathered` is complete
}

// The row's (max, log sum) from its K chunks' statistics, in rank order; `which` 0: pred's, 1:
// the target's.
template <int K, typename A>
__device__ __forceinline__ void combine_chunk_stats(const ChunkStats<A> (&chunks)[K], int which, A& max_out,
                                                    A& log_sum_out) {
    A m = neg_inf<A>(), s = 0;
#pragma unroll
    for (int k = 0; k < K; ++k) m = max_(m, which ? chunks[k].max_t : chunks[k].max_x);
#pragma unroll
    for (int k = 0; k < K; ++k)
        s += which ? rescale(chunks[k].sum_t, chunks[k].max_t, m) : rescale(chunks[k].sum_x, chunks[k].max_x, m);
    max_out = m;
    log_sum_out = log_(s);
}

template <typename T, int THREADS, int ELEMS, int K>
__device__ __forceinline__ void kl_cluster_rows(const T* __restrict__ pred, const T* __restrict__ target,
                                                const int64_t* __restrict__ labels,
                                                const typename ComputeType<T>::type* __restrict__ weights,
                                                T* __restrict__ grad, double* __restrict__ block_sums,
                                                unsigned* __restrict__ ticket, double* __restrict__ batch_error,
                                                double* __restrict__ accumulator, double error_scale,
                                                double grad_scale, double inv_temperature, int64_t n_rows,
                                                int64_t n_cols, int norm_target, int divergence, double beta) {
    static_assert(ROW_DIVERGENCES<T>, "double rows take the chunked kernels");
    using C = Chunk<T, THREADS, ELEMS>;
    using A = typename C::A;
    using Math = ElementMath<T>;
    cooperative_groups::cluster_group cluster = cooperative_groups::this_cluster();
    const int rank = int(cluster.block_rank());
    const A inv_n = A(grad_scale);
    const A inv_t = A(inv_temperature);
    const Divergence<A> d(divergence, beta);
    __shared__ ChunkStats<A> stats_slot[2], stats_gathered[K];
    __shared__ double s_slot[2], s_gathered[K];
    __shared__ double block_error;   // the errors of this block's chunks (kept by thread 0)
    if (threadIdx.x == 0) block_error = 0;
    int exchange = 0;

    // Every block of a cluster runs the same rows, so all reach the same cluster.syncs.
    for (int64_t row = blockIdx.x / K; row < n_rows; row += gridDim.x / K) {
        const C chunk(row * K + rank, K, pred, target, grad, n_cols);
        const int64_t offset = row * n_cols;
        A x[ELEMS], t[ELEMS];
        chunk.load(pred + offset, n_cols, neg_inf<A>(), x);
        if (target) chunk.load(target + offset, n_cols, norm_target ? neg_inf<A>() : A(0), t);
        scale_by(x, inv_t);
        if (norm_target) scale_by(t, inv_t);

        ChunkStats<A> mine{0, 0, 0, 0};
        block_softmax_stats<Math, THREADS, ELEMS>(x, mine.max_x, mine.sum_x);
        if (norm_target) block_softmax_stats<Math, THREADS, ELEMS>(t, mine.max_t, mine.sum_t);
        exchange_in_cluster(cluster, stats_slot, stats_gathered, mine, exchange);
        RowStats<A> s{0, 0, 0, 0};
        A max_x, max_t = 0;
        combine_chunk_stats(stats_gathered, 0, max_x, s.log_sum_x);
        if (norm_target) combine_chunk_stats(stats_gathered, 1, max_t, s.log_sum_t);

        const int64_t label = labels ? labels[row] : -1;
        const A w = (labels && label < 0) ? A(0) : (weights && label >= 0) ? weights[label] : A(1);
        A error = 0;   // this thread's terms, summed in A before the chunk's sum in double
        if (divergence == FORWARD) {   // (uniform over the launch)
#pragma unroll
            for (int k = 0; k < ELEMS; ++k)   // x[k] becomes the gradient
                x[k] = kl_element<Math, false>(x[k] - max_x, norm_target ? t[k] - max_t : t[k], A(0), A(0),
                                               chunk.vec_start(k / C::VEC) + k % C::VEC, label, labels,
                                               norm_target, s, w * inv_n, error);
        } else {   // reverse KL or JSD: x[k] becomes q, t[k] g, then the row's S, then grad
            A sum_qg = 0;
#pragma unroll
            for (int k = 0; k < ELEMS; ++k) {
                A q, g;
                divergence_terms<Math>(d, x[k] - max_x, norm_target ? t[k] - max_t : t[k],
                                       chunk.vec_start(k / C::VEC) + k % C::VEC, label, labels, norm_target, s, q,
                                       g, error);
                x[k] = q, t[k] = g;
                if (q != A(0)) sum_qg += q * g;
            }
            exchange_in_cluster(cluster, s_slot, s_gathered, group_reduce<THREADS>(double(sum_qg), Sum()), exchange);
            double row_s = 0;
#pragma unroll
            for (int k = 0; k < K; ++k) row_s += s_gathered[k];
#pragma unroll
            for (int k = 0; k < ELEMS; ++k) x[k] = divergence_grad(x[k], t[k], A(row_s), w * inv_n);
        }
        if (w == A(0)) {   // an ignored row (or a class weight of 0): exactly nothing, even for NaN logits
#pragma unroll
            for (int k = 0; k < ELEMS; ++k) x[k] = 0;
            error = 0;
        }
        if (grad) chunk.store(grad + offset, n_cols, x);
        const double chunk_error = group_reduce<THREADS>(double(error) * double(w), Sum());
        if (threadIdx.x == 0) block_error += chunk_error;
    }
    cluster.sync();   // no block leaves while another may still read its slots
    finish_batch_error<THREADS>(threadIdx.x == 0 ? block_error : 0.0, block_sums, ticket, batch_error, accumulator,
                                error_scale);
}

}  // namespace plc

// kl_cluster_<dtype>_t<THREADS>_e<E>: rows of up to CLUSTER * THREADS * E elements (less the
// slack of a misaligned row), with the arguments of kl_rows_*.  Blocks of 256 threads may share
// an SM with another (128 registers each); blocks of 512 have an SM each.
#define PLC_KL_CLUSTER(T, NAME, THREADS, E)                                                                  \
    extern "C" __global__ void __cluster_dims__(plc::CLUSTER, 1, 1) __launch_bounds__(THREADS, 512 / THREADS) \
        kl_cluster_##NAME##_t##THREADS##_e##E(const T* pred, const T* target, const int64_t* labels,          \
                                              const plc::ComputeType<T>::type* weights, T* grad,             \
                                              double* block_sums, unsigned* ticket, double* batch_error,     \
                                              double* accumulator, double error_scale, double grad_scale,    \
                                              double inv_temperature, int64_t n_rows, int64_t n_cols,        \
                                              int norm_target, int divergence, double beta) {                \
        PLC_ASSUME_MODE(target, labels, norm_target);                                                        \
        PLC_ASSUME(weights == nullptr);                                                                      \
        PLC_ASSUME(inv_temperature == 1.0);                                                                  \
        PLC_ASSUME(divergence == PLC_COST_MODEL_DIVERGENCE);                                                 \
        plc::kl_cluster_rows<T, THREADS, E, plc::CLUSTER>(pred, target, labels, weights, grad, block_sums,    \
                                                          ticket, batch_error, accumulator, error_scale,     \
                                                          grad_scale, inv_temperature, n_rows, n_cols,       \
                                                          norm_target, divergence, beta);                    \
    }
#define PLC_KL_CLUSTER_ALL(T, NAME) \
    PLC_KL_CLUSTER(T, NAME, 256, 16) PLC_KL_CLUSTER(T, NAME, 256, 32)

PLC_KL_CLUSTER_ALL(float, f32)
PLC_KL_CLUSTER_ALL(__nv_bfloat16, bf16)
#ifndef PLC_COST_MODEL
PLC_KL_CLUSTER_ALL(__half, f16)
#endif

#endif  // __CUDA_ARCH__ >= 900
