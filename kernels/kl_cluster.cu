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
//   4. grad is stored; the chunk's error goes into the block's sum, which goes to rank 0 at
//      the end (finish_cluster: one ticket of finish_batch_error a cluster).
// A slot is written again only two exchanges later (exchange e uses buffer e % 2): after the
// cluster.sync of exchange e + 1, which no block passes before every block has finished reading
// the slots of exchange e.  So one cluster.sync per exchange, and a relaxed cluster barrier
// before the blocks exit, as no block may leave while another may still read its shared memory.
//
// Rows longer than a cluster holds (K * THREADS * ELEMS elements) take kl_cluster_stream_*
// below (the same exchanges, the row streamed through the cluster in segments); double inputs
// and GPUs before sm_90 take kl_chunk_* (the host decides: puzzlelib_cost/row_softmax.py).
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

// The row's DivergenceTotals from its K blocks', in rank order: every block gets the same bits.
template <int K, typename A>
__device__ __forceinline__ DivergenceTotals<A> cluster_totals(const DivergenceTotals<A> (&gathered)[K]) {
    DivergenceTotals<A> row = gathered[0];
#pragma unroll
    for (int k = 1; k < K; ++k) row = row + gathered[k];
    return row;
}

// The row's sum of a target of probabilities from its K blocks' sums (ChunkStats::sum_t), in rank
// order (combine_chunk_stats' rescalings, K exponentials a thread, cost 5 SASS instructions an
// element in kl_cluster_*_t128_e32, for maxima that are all 0 here).
template <int K, typename A>
__device__ __forceinline__ A cluster_target_sum(const ChunkStats<A> (&gathered)[K]) {
    A sum = 0;
#pragma unroll
    for (int k = 0; k < K; ++k) sum += gathered[k].sum_t;
    return sum;
}

// The row's (max, sum of exp(x - max)) from its K chunks' statistics, `which` 0: pred's, 1: the
// target's, and this block's factor exp(max_b - max).  Lane l of every warp takes chunk l % K's
// slot (K divides 32), so the K rescalings cost one exponential each in parallel instead of K in
// a row in every thread, and K-lane butterflies (warp_reduce<K>) give every lane of every block
// of the cluster the same bits: each step combines the same two values, in one order or the
// other, and + and max_ give the same result either way.  (The order of the K terms of the sum is
// fixed, though no longer rank order.)  PARALLEL = false: every thread combines the K slots in
// rank order itself, as before (kl_cluster_f32_t256_e32 spilled with the parallel form).
template <int K, bool PARALLEL, typename A>
__device__ __forceinline__ void combine_chunk_stats(const ChunkStats<A> (&chunks)[K], int which, int rank,
                                                    A& max_out, A& sum_out, A& factor_out) {
    if constexpr (!PARALLEL) {
        A m = neg_inf<A>(), s = 0;
#pragma unroll
        for (int k = 0; k < K; ++k) m = max_(m, which ? chunks[k].max_t : chunks[k].max_x);
#pragma unroll
        for (int k = 0; k < K; ++k)
            s += which ? rescale(chunks[k].sum_t, chunks[k].max_t, m) : rescale(chunks[k].sum_x, chunks[k].max_x, m);
        max_out = m, sum_out = s;
        factor_out = exp_((which ? chunks[rank].max_t : chunks[rank].max_x) - m);
        return;
    }
    static_assert(WARP % K == 0, "a warp holds whole groups of K lanes");
    const ChunkStats<A>& chunk = chunks[threadIdx.x % K];
    const A m = which ? chunk.max_t : chunk.max_x, s = which ? chunk.sum_t : chunk.sum_x;
    max_out = warp_reduce<K>(m, Max());
    const A factor = exp_(m - max_out);   // 0 for a chunk of only padding or -inf (m = -inf)
    // (s == 0: an empty chunk adds 0, not 0 * exp(NaN), as rescale)
    sum_out = warp_reduce<K>(s == A(0) ? A(0) : s * factor, Sum());
    factor_out = __shfl_sync(FULL_MASK, factor, rank, K);
}

// The end of a cluster kernel: the batch error with one ticket a cluster.  Each block's thread 0
// hands its error to rank 0 (hand_over_error: into rank 0's slot for it, by distributed shared
// memory); after the exit barrier rank 0 alone adds the K slots in rank order and takes the ticket
// of finish_batch_error, one fence, one atomic and one wait for its answer a cluster (not a
// block); the other blocks leave at the barrier.
//
// The exit barrier is relaxed.  On sm_90 cluster.sync() is MEMBAR.ALL.GPU, then the barrier, in
// every warp, and at the exit that fence waits for every grad store of the warp to be
// acknowledged.  The exit barrier needs no memory order (every read of another block's slots has
// completed, its value used, before its reader arrives: it only keeps shared memory alive), so it
// is the split barrier with a relaxed arrive; the one thing that needs a release, the error handed
// over, has its own fence in thread 0, and kl_cluster_rows hands it over before the grad stores of
// the block's last row, so that fence waits for none of them.  Measured on an H100 at 8192 x
// 32000 (benchmarks/results/2026-11-26-h100-a205773/choices, PLC_TRY_RELAXED_EXIT): float32 70.0
// -> 75.2 % of the copy bandwidth, with normTarget 61.6 -> 71.4 %; bfloat16 37.8 -> 40.2 %, 35.2
// -> 37.3 % (benchmarks/NOTES.md, "One ticket a cluster").  (Relaxing the statistics exchanges'
// barriers too, their slot's writer fenced, measured no faster: they keep cluster.sync().)

// Rank 0's slots for the K blocks' errors.
template <int K>
__device__ __forceinline__ double* cluster_errors() {
    __shared__ double errors[K];
    return errors;
}

// Thread 0 puts this block's error into rank 0's slot for it and releases it (the exit barrier
// does not); the caller has passed a cluster barrier since the launch began (rank 0 has started),
// and rank 0 reads it after the exit barrier.
template <int K>
__device__ __forceinline__ void hand_over_error(cooperative_groups::cluster_group& cluster, int rank,
                                                const double& block_error) {
    if (threadIdx.x == 0) {
        *cluster.map_shared_rank(cluster_errors<K>() + rank, 0) = block_error;
        __threadfence_cluster();
    }
}

// `handed_over`: the block's error is in rank 0's slot already (kl_cluster_rows); `had_rows`: the
// cluster ran a row (and so passed a cluster barrier).
template <int THREADS, int K>
__device__ __forceinline__ void finish_cluster(cooperative_groups::cluster_group& cluster, int rank,
                                               const double& block_error, bool handed_over,
                                               double* __restrict__ block_sums, unsigned* __restrict__ ticket,
                                               double* __restrict__ batch_error, double* __restrict__ accumulator,
                                               double error_scale, bool had_rows) {
    if (!had_rows) cluster.sync();   // (a cluster without rows: rank 0 may not have started)
    if (!handed_over) hand_over_error<K>(cluster, rank, block_error);
    __cluster_barrier_arrive_relaxed();
    __cluster_barrier_wait();   // every block's error is in rank 0's slots
    if (rank != 0) return;
    double cluster_error = 0;
#pragma unroll
    for (int k = 0; k < K; ++k) cluster_error += cluster_errors<K>()[k];
    finish_batch_error<THREADS, K>(cluster_error, block_sums, ticket, batch_error, accumulator, error_scale);
}

// For the "_normt" kernels (NORMT, kl_divergence.cu): block_softmax_stats (kl_divergence.cu) of x
// and of t, with x[k] and t[k] left as exp(x - r_x)
// and exp(t - r_t) times EXP_SCALE (r: the block's maxima, ref_x and ref_t), and split_sum = the
// sum of exp(t - r_t) EXP_SCALE (t - x) over the thread's elements where that exponential is not
// 0 (p = 0 adds nothing, as in kl_element: t = -inf, padding included).
template <typename M, int THREADS, int ELEMS, typename A>
__device__ __forceinline__ void block_softmax_stats_in_place(A (&x)[ELEMS], A (&t)[ELEMS], ChunkStats<A>& mine,
                                                             A& ref_x, A& ref_t, A& split_sum) {
    mine.max_x = group_max<THREADS, ELEMS>(x);
    mine.max_t = group_max<THREADS, ELEMS>(t);
    ref_x = mine.max_x == neg_inf<A>() ? A(0) : mine.max_x;
    ref_t = mine.max_t == neg_inf<A>() ? A(0) : mine.max_t;
    A s_x = 0, s_t = 0, split = 0;
#pragma unroll
    for (int k = 0; k < ELEMS; ++k) {
        const A x_k = x[k] - ref_x, t_k = t[k] - ref_t;
        const A exp_x = M::exp_scaled(x_k), exp_t = M::exp_scaled(t_k);
        if (exp_t != A(0)) split += exp_t * (t_k - x_k);
        s_x += exp_x;
        s_t += exp_t;
        x[k] = exp_x, t[k] = exp_t;
    }
    mine.sum_x = group_reduce<THREADS>(s_x, Sum()) * A(1 / M::EXP_SCALE);
    mine.sum_t = group_reduce<THREADS>(s_t, Sum()) * A(1 / M::EXP_SCALE);
    split_sum = split;
}

// kl_cluster_*_prefetch's and kl_cluster_stream_*'s dynamic shared memory.
extern __shared__ uint4 staging[];

// PREFETCH (kl_cluster_*_prefetch; the library's for bfloat16, row_softmax.PREFETCHED_KERNELS): the
// clusters loop over their rows (the host caps the grid), and each thread copies its vectors of its block's
// chunk of the cluster's NEXT row into shared memory by asynchronous copies while the cluster
// computes this one, as the prefetching row kernels do (kl_divergence.cu, "Prefetched rows"):
// two buffers of pred's and target's vectors, a thread's own slots, its own wait.
template <typename T, int THREADS, int ELEMS, int K, bool PREFETCH = false, bool NORMT = false>
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
    // Keep exp(x - r) (and exp(t - r)) from the block's sums for q (and p), as kl_rows does, for up
    // to 16 elements a thread (32 more registers); 32 elements a thread would spill, and spilled
    // (f32) with kl_element's split norm_target term or the lane-parallel combine too: KEEP
    // chooses those as well.
    constexpr bool KEEP = ELEMS <= 16;
    static_assert(!NORMT || IN_PLACE_FORM<T, KEEP>, "_normt: float and 16-bit clusters of 32 a thread");
    if constexpr (NORMT) {   // (normTarget forward KL alone)
        if (!norm_target || labels || divergence != FORWARD) __trap();
    }
    __shared__ ChunkStats<A> stats_slot[2], stats_gathered[K];
    __shared__ DivergenceTotals<A> s_slot[2], s_gathered[K];   // (reverse KL and JSD)
    __shared__ double block_error;   // the errors of this block's chunks (kept by thread 0)
    if (threadIdx.x == 0) block_error = 0;
    bool handed_over = false;        // (in the block's last row)
    int exchange = 0;
    // PREFETCH: the slots of buffer b, array a (0 pred, 1 target), and the copy of this block's
    // chunk of `row` into buffer b.
    auto slots = [&](int b, int a) { return staging + (b * 2 + a) * C::VECS * THREADS; };
    auto prefetch_row = [&](int64_t row, int b) {
        const C chunk(typename C::InRow{row, rank}, pred, target, grad, n_cols);
        chunk.prefetch(slots(b, 0), pred + row * n_cols, n_cols, neg_inf<A>());
        if (target) chunk.prefetch(slots(b, 1), target + row * n_cols, n_cols, norm_target ? neg_inf<A>() : A(0));
    };
    int buffer = 0;   // PREFETCH: the buffer that holds this row
    if constexpr (PREFETCH) {
        if (blockIdx.x / K < n_rows) prefetch_row(blockIdx.x / K, 0);
        __pipeline_commit();
    }

    // Every block of a cluster runs the same rows, so all reach the same cluster.syncs.
    for (int64_t row = blockIdx.x / K; row < n_rows; row += gridDim.x / K) {
        const C chunk(typename C::InRow{row, rank}, pred, target, grad, n_cols);
        const int64_t offset = row * n_cols;
        A x[ELEMS], t[ELEMS];
        if constexpr (PREFETCH) {   // the next row on its way (an empty group past the last), this row in
            // (one buffer, PLC_TRY_ONE_BUFFER: this row in, then the next on its way; the turn of
            // kl_rows' prefetching rows, kl_divergence.cu, written out again: as one shared helper
            // it changed these kernels' machine code, which was measured as it is)
            const bool next = row + gridDim.x / K < n_rows;
            if constexpr (PREFETCH_BUFFERS == 2) {
                if (next) prefetch_row(row + gridDim.x / K, buffer ^ 1);
                __pipeline_commit();
            }
            __pipeline_wait_prior(PREFETCH_BUFFERS - 1);
            chunk.unstage(slots(buffer, 0), x);
            if (target) chunk.unstage(slots(buffer, 1), t);
            if constexpr (PREFETCH_BUFFERS == 1) {
                if (next) prefetch_row(row + gridDim.x / K, buffer);
                __pipeline_commit();
            }
            buffer ^= PREFETCH_BUFFERS - 1;
        } else {
            chunk.load(pred + offset, n_cols, neg_inf<A>(), x);
            if (target) chunk.load(target + offset, n_cols, norm_target ? neg_inf<A>() : A(0), t);
        }
        scale_by(x, inv_t);
        if (norm_target) scale_by(t, inv_t);

        const int64_t label = labels ? labels[row] : -1;
        const A w = (labels && label < 0) ? A(0) : (weights && label >= 0) ? weights[label] : A(1);
        const bool ignored = ignored_row(labels, label);
        const int label_k = chunk.label_index(label);
        // Label targets, forward KL, 32 elements a thread: x[k] its exponential in place (uniform),
        // as in kl_rows: q a multiply, not a second exponential.
        const bool labels_in_place = !NORMT && !KEEP && labels && divergence == FORWARD;
        // x and t become x - r_x and t - r_t, r the block's max (block_softmax_stats); with KEEP,
        // ex and et their exponentials (times EXP_SCALE), and q = ex * exp(r_x - max_x) /
        // (EXP_SCALE sum_x): a multiply an element where an exponential of x - max_x - log sum_x
        // was taken again (RowStats).
        ChunkStats<A> mine{0, 0, 0, 0};
        A ref_x, ref_t = 0, ex[KEEP ? ELEMS : 1], et[KEEP ? ELEMS : 1];
        // (NORMT: a thread's split sum waits out the exchange in its shared slot, not
        // in a register: so the kernel does not spill on sm_90)
        __shared__ A split_sums[NORMT ? THREADS : 1];
        if constexpr (NORMT) {
            A split_sum;
            block_softmax_stats_in_place<Math, THREADS, ELEMS>(x, t, mine, ref_x, ref_t, split_sum);
            split_sums[threadIdx.x] = split_sum;
        } else if (labels_in_place) {   // (x its own KEEP array)
            block_softmax_stats<Math, THREADS, ELEMS, true>(x, x, mine.max_x, ref_x, mine.sum_x);
        } else {
            block_softmax_stats<Math, THREADS, ELEMS, KEEP>(x, ex, mine.max_x, ref_x, mine.sum_x);
            if (norm_target) block_softmax_stats<Math, THREADS, ELEMS, KEEP>(t, et, mine.max_t, ref_t, mine.sum_t);
        }
        // A target of probabilities: its sum (take_target_sum) in the target's slot.
        const bool summed = !labels && !norm_target && divergence == FORWARD;
        if (summed) mine.sum_t = group_reduce<THREADS>(thread_sum(t), Sum());
        exchange_in_cluster(cluster, stats_slot, stats_gathered, mine, exchange);
        RowStats<A> s{0, 0, 0, 0};
        {
            A max_x, sum_x, factor_x;
            combine_chunk_stats<K, KEEP>(stats_gathered, 0, rank, max_x, sum_x, factor_x);
            s.log_sum_x = (max_x - ref_x) + Math::log(sum_x);
            s.inv_sum_x = factor_x * Math::rcp(sum_x * A(Math::EXP_SCALE));   // (ex: scaled by EXP_SCALE)
        }
        if (norm_target) {
            A max_t, sum_t, factor_t;
            combine_chunk_stats<K, KEEP>(stats_gathered, 1, rank, max_t, sum_t, factor_t);
            s.log_sum_t = (max_t - ref_t) + Math::log(sum_t);
            s.inv_sum_t = factor_t * Math::rcp(sum_t * A(Math::EXP_SCALE));
        }
        // (probabilities: q becomes sum p q, take_target_sum)
        const A target_term = summed ? take_target_sum<Math, KEEP>(s, cluster_target_sum<K>(stats_gathered)) : A(0);
        s.template prepare<Math>();

        A error = 0;   // this thread's terms, summed in A before the chunk's sum in double
        if (labels_in_place) {   // (p - q) w / n, p one-hot; the label's term -log q = log_sum - (x - r_x)
            const A scale = w * inv_n, q_scale = s.inv_sum_x * scale;
#pragma unroll
            for (int k = 0; k < ELEMS; ++k) x[k] = (k == label_k ? scale : A(0)) - x[k] * q_scale;
            if (label_k >= 0) error = s.log_sum_x - (label_logit(pred + offset, label, inv_t) - ref_x);
        } else if constexpr (NORMT) {   // (p - q) / n from the exponentials in x and t (w = 1: no labels)
            const A p_scale = s.inv_sum_t * inv_n, q_scale = s.inv_sum_x * inv_n;
#pragma unroll
            for (int k = 0; k < ELEMS; ++k) x[k] = t[k] * p_scale - x[k] * q_scale;
            error = split_sums[threadIdx.x] * s.inv_sum_t;
        } else if (divergence == FORWARD) {   // (uniform over the launch)
            if (rank == 0 && threadIdx.x == 0) error = target_term;   // (once a row)
#pragma unroll
            for (int k = 0; k < ELEMS; ++k)   // x[k] becomes the gradient
                x[k] = kl_element<Math, KEEP, KEEP>(x[k], t[k], ex[KEEP ? k : 0], et[KEEP ? k : 0],
                                                    k == label_k, labels, norm_target, s, w * inv_n,
                                                    error);
        } else {   // reverse KL or JSD: x[k] becomes q, t[k] g, then the row's S, then grad
            DivergenceSums<A> sums;
#pragma unroll
            for (int k = 0; k < ELEMS; ++k) {
                A q, g;
                divergence_terms<Math>(d, x[k], t[k], k == label_k, labels, norm_target, s, q, g,
                                       error);
                x[k] = q, t[k] = g;
                sums.add(q, g);
            }
            exchange_in_cluster(cluster, s_slot, s_gathered, group_totals<THREADS>(sums), exchange);
            const DivergenceFactors<A> row_sums(cluster_totals<K>(s_gathered));
#pragma unroll
            for (int k = 0; k < ELEMS; ++k) x[k] = row_sums.grad(x[k], t[k], w * inv_n);
        }
        zero_if_ignored(ignored, x, error);
        double chunk_error = group_reduce<THREADS>(double(error) * double(w), Sum());
        // With norm_target (and KEEP: SPLIT), kl_element left out this block's (log_sum_x - log_sum_t) *
        // sum p: that sum is the block's share of the target's mass, exp(r_t - max_t) sum_t,b /
        // sum_t = inv_sum_t * EXP_SCALE * sum_t,b (w = 1 without labels).  The share's rounding (a sum in
        // float over the block: a few units roundoff times log2 of its 4096 terms) multiplies a
        // constant no larger than any of the block's |log p| + |log q| (its log_sum_x =
        // (max_x - r_x) + log sum_x <= -log q of every element of the block, as x - r_x <= 0; the
        // same for t), so it stays inside the terms' own rounding bound.
        if ((KEEP || NORMT) && divergence == FORWARD && !labels && norm_target)
            chunk_error += (double(s.log_sum_x) - double(s.log_sum_t)) *
                           double(s.inv_sum_t * (mine.sum_t * A(Math::EXP_SCALE)));
        if (threadIdx.x == 0) block_error += chunk_error;
        // The block's error goes to rank 0 before its last row's grad stores (finish_cluster).
        handed_over = row + gridDim.x / K >= n_rows;
        if (handed_over) hand_over_error<K>(cluster, rank, block_error);
        if (grad) chunk.store(grad + offset, n_cols, x);
    }
    finish_cluster<THREADS, K>(cluster, rank, block_error, handed_over, block_sums, ticket, batch_error, accumulator,
                               error_scale, blockIdx.x / K < n_rows);
}

// ---------------------------------------------------------------------------------
// kl_cluster_stream_*: rows longer than a cluster holds in registers.  A row's
// chunks (Chunk, CHUNK = THREADS * ELEMS elements) are dealt to the K blocks of its cluster in
// turn, block `rank` taking chunks rank, rank + K, ... (the K blocks read neighbouring chunks at
// the same time): J = chunks / K segments a block, the chunk count rounded up to a multiple of
// K (a chunk past the row's end is padding).  Per row:
//   1. pass 1 streams the block's segments, j = 0 .. J - 1: pred (and the target when
//      norm_target) into each thread's running (max, sum exp(x - max)) (RunningStats), the last
//      segment left in registers;
//   2. the block's statistics go through the cluster's DSMEM exchange, as in kl_cluster_rows;
//   3. pass 2 writes grad segment by segment in reverse, j = J - 1 .. 0: the last segment from
//      registers, the `staged` segments before it from shared memory, where pass 1 left them
//      (as many as the launch's dynamic shared memory holds: the host sizes it), the others
//      read again.  Reverse order puts first the segments read last, the ones most likely
//      still in L2; pass 2's own traffic is marked to leave L2 first (__ldcs for what is read a
//      final time, __stcs for grad), so it does not push out the segments that wait for their
//      second read.
//   Reverse KL and JSD need the row's S = sum q g before any gradient: their pass 2 (in reverse,
//   the same way) adds each segment's q g and error terms, the cluster swaps the blocks' sums
//   (a second exchange), and pass 3 takes the segments once more, forward (segment 0, the last
//   pass 2 took, is still in registers), for grad.
// From DRAM that is 12 B per element in float32 (as kl_cluster_rows) while the segments that
// wait fit on chip and in L2, and kl_chunk_*'s 16 B (norm_target: 20 B; reverse KL and JSD 28 B)
// at worst; the cost model predicts the share that fits (l2_reuse_bytes).
// ---------------------------------------------------------------------------------

// A thread's running softmax statistics over the values it has seen: their max, and their
// sum of exp(v - ref) (times M::EXP_SCALE), ref the max, or 0 while that is -inf (nothing but
// padding or -inf yet: exp(-inf - 0) adds 0 where exp(-inf + inf) would be NaN).  A NaN may be
// dropped from the max, never from the sum (as block_softmax_stats).
template <typename A> struct RunningStats {
    A max = neg_inf<A>(), ref = 0, sum = 0;

    template <typename M, int ELEMS> __device__ __forceinline__ void add(const A (&v)[ELEMS]) {
        A m = max;
#pragma unroll
        for (int k = 0; k < ELEMS; ++k) m = MaxDroppingNan()(m, v[k]);
        const A r = m == neg_inf<A>() ? A(0) : m;
        // (one exact exponential a segment, 1 exactly when r == ref)
        A s = rescale(sum, ref, r);
#pragma unroll
        for (int k = 0; k < ELEMS; ++k) s += M::exp_scaled(v[k] - r);
        max = m, ref = r, sum = s;
    }

    // The block's (max, sum of exp(v - max)) over every thread's values (all threads call it).
    template <typename M, int THREADS> __device__ __forceinline__ void block_total(A& max_out, A& sum_out) const {
        max_out = group_reduce<THREADS>(max, MaxDroppingNan());
        const A r = max_out == neg_inf<A>() ? A(0) : max_out;
        sum_out = group_reduce<THREADS>(rescale(sum, ref, r), Sum()) * A(1 / M::EXP_SCALE);   // (exact)
    }
};

// PREFETCH (kl_cluster_stream_*_prefetch, the library's: row_softmax.PREFETCHED_KERNELS): pass 1
// copies segment j + 1 into shared memory by asynchronous copies while it takes the statistics of
// segment j, as the prefetching row kernels do (kl_divergence.cu, "Prefetched rows"): a segment
// staged for pass 2 straight into its slot, the others into a ring of two slots after the staged
// ones (the host gives the launch room for both).  A ring slot is written two segments after it
// was last read, and a thread reads only the slots it wrote, after its own wait.
// PASS2 (the "_prefetch_pass2" twin of bfloat16's prefetching stream kernel; the library's where a
// block takes four segments of a row or more: row_softmax.pass2_twin): forward KL's pass 2 copies
// the arrays it reads from memory for segment j - 1 (the target without norm_target; pred and the
// target of segments neither staged nor held) into the ring, which pass 1 is done with, while it
// computes segment j, as pass 1 does; the last segment's are copied before the cluster's exchange,
// whose wait they overlap.  One buffer (the ring's two slots of one array, or one slot of two): a
// thread reads its copies of segment j into registers, then issues those of j - 1 into the same
// slots (its own: its accesses to one location keep their program order).  Without it pass 2
// waits for those loads after each segment's store (its loads are issued as the segment starts),
// and without norm_target reads the target only there.  The copies are not marked evict-first as
// pass 2's loads are (__ldcs).  The same values, so the same bits.  Measured on an H200 at
// a0916b1 as the build PLC_TRY_PASS2_PREFETCH (benchmarks/NOTES.md): bfloat16 1024x262144 (4
// segments a block) 42.0 -> 49.8 % of the copy bandwidth, normTarget 44.4 -> 51.5 %; 2048x128256
// (2 segments) 45.0 -> 43.7 %, 45.6 -> 44.4 %; float32's gains were 1-2 points at 8 segments and
// its losses 2-3 at 4: it has no twin.

// Forward KL's target of probabilities read, and summed, in pass 1 (its first grad needs the sum):
// not by the float16 kernel, which spilled with that path (as a build that read the target in pass 1
// in every mode did: PLC_TRY_TARGET_FIRST, measured on no GPU, removed); the host sends float16's
// such rows to the chunked kernels (row_softmax._cuda).
template <typename T> constexpr bool SUMS_TARGET = !std::is_same<T, __half>::value;

template <typename T, int THREADS, int ELEMS, int K, bool PREFETCH = false, bool PASS2 = false>
__device__ __forceinline__ void kl_cluster_stream(const T* __restrict__ pred, const T* __restrict__ target,
                                                  const int64_t* __restrict__ labels,
                                                  const typename ComputeType<T>::type* __restrict__ weights,
                                                  T* __restrict__ grad, double* __restrict__ block_sums,
                                                  unsigned* __restrict__ ticket,
                                                  double* __restrict__ batch_error, double* __restrict__ accumulator,
                                                  double error_scale, double grad_scale, double inv_temperature,
                                                  int64_t n_rows, int64_t n_cols, int norm_target,
                                                  int divergence, double beta, int staged) {
    using C = Chunk<T, THREADS, ELEMS>;
    using A = typename C::A;
    using Math = ElementMath<T>;
    cooperative_groups::cluster_group cluster = cooperative_groups::this_cluster();
    const int rank = int(cluster.block_rank());
    const A inv_n = A(grad_scale);
    const A inv_t = A(inv_temperature);
    const Divergence<A> d(divergence, beta);
    __shared__ ChunkStats<A> stats_slot[2], stats_gathered[K];
    __shared__ DivergenceTotals<A> s_slot[2], s_gathered[K];   // (reverse KL and JSD)
    __shared__ double block_error;   // the errors of this block's rows (kept by thread 0)
    if (threadIdx.x == 0) block_error = 0;
    int exchange = 0;
    // J and, of them, the segments first_staged .. J - 2 that stay in shared memory between the
    // passes (`staged` of them, or fewer: each pred's, and the target's with norm_target, vectors,
    // this thread's alone): a row's, set as it starts (the lambdas below read them).
    int64_t segments = 0, first_staged = 0;
    // Whether pass 1 reads the target: with norm_target, for its statistics; for forward KL's
    // probabilities, to sum them (take_target_sum), which pass 2's first grad needs (SUMS_TARGET).
    const int target_first = int(norm_target || (SUMS_TARGET<T> && target != nullptr && !labels && divergence == FORWARD));
    auto summed = [&] { return SUMS_TARGET<T> && !norm_target && target_first && divergence == FORWARD; };
    const int arrays = target_first ? 2 : 1;
    auto slot = [&](int64_t j, int array) {
        return staging + ((j - first_staged) * arrays + array) * (C::VECS * THREADS);
    };
    // PREFETCH: where pass 1 has segment j of `array` copied: its slot if staged, else ring slot j % 2.
    auto copied_to = [&](int64_t j, int array) {
        return j >= first_staged && j < segments - 1
                   ? slot(j, array)
                   : staging + ((segments - 1 - first_staged + (j & 1)) * arrays + array) * (C::VECS * THREADS);
    };
    // PASS2: where pass 2 has `array` of its next segment copied: the ring's first
    // array-slots (two of one array, or one of two).
    auto pass2_copied_to = [&](int array) {
        return staging + ((segments - 1 - first_staged) * arrays + array) * (C::VECS * THREADS);
    };

    for (int64_t row = blockIdx.x / K; row < n_rows; row += gridDim.x / K) {
        const int64_t offset = row * n_cols;
        auto segment = [&](int64_t j) {
            return C(typename C::InRow{row, j * K + rank}, pred, target, grad, n_cols);
        };
        // A row's vectors start -first slots before it where its head is misaligned (Chunk); one on
        // a 16-byte boundary needs no room for that, so that aligned rows of a multiple of K * SIZE
        // elements (262144, say) take no segment of padding.  The host sizes the launch for the
        // most any row needs (row_softmax.stream_segments); every block of the cluster takes this
        // row, so they agree.
        segments = ((n_cols - segment(0).first + C::SIZE - 1) / C::SIZE + K - 1) / K;
        first_staged = segments - 1 - min(int64_t(staged), segments - 1);
        A x[ELEMS], t[ELEMS];
        RunningStats<A> stats_x, stats_t;
        auto prefetch_segment = [&](int64_t j) {   // (PREFETCH)
            const C chunk = segment(j);
            chunk.prefetch(copied_to(j, 0), pred + offset, n_cols, neg_inf<A>());
            if (target_first)
                chunk.prefetch(copied_to(j, 1), target + offset, n_cols, norm_target ? neg_inf<A>() : A(0));
        };
        // PASS2: the arrays forward KL's pass 2 reads of segment j from memory (pred's of
        // segments neither staged nor held; the target's unless pass 1 kept it), into the ring.
        constexpr bool PASS2_COPIES = PREFETCH && PASS2;
        const bool pass2_copies = PASS2_COPIES && divergence == FORWARD;
        auto pred_from_memory = [&](int64_t j) { return j < first_staged; };
        auto target_from_memory = [&](int64_t j) { return target && (!target_first || j < first_staged); };
        auto prefetch_pass2 = [&](int64_t j) {
            const C chunk = segment(j);
            if (pred_from_memory(j)) chunk.prefetch(pass2_copied_to(0), pred + offset, n_cols, neg_inf<A>());
            if (target_from_memory(j))
                chunk.prefetch(pass2_copied_to(1), target + offset, n_cols, norm_target ? neg_inf<A>() : A(0));
        };
        if constexpr (PREFETCH) {
            prefetch_segment(0);
            __pipeline_commit();
        }
#pragma unroll 1
        for (int64_t j = 0; j < segments; ++j) {   // pass 1
            const C chunk = segment(j);
            if constexpr (PREFETCH) {   // segment j + 1 on its way (an empty group past the last), j in
                if (j + 1 < segments) prefetch_segment(j + 1);
                __pipeline_commit();
                __pipeline_wait_prior(1);
            }
            const bool stage = j >= first_staged && j < segments - 1;
            // Segment j of `array` (0 pred, 1 target) into v, staged for pass 2 where it is kept
            // (PREFETCH: it was copied there, or into the ring), then into the running statistics.
            auto take = [&](const T* values, int array, A (&v)[ELEMS], RunningStats<A>& stats) {
                if constexpr (PREFETCH) {
                    chunk.unstage(copied_to(j, array), v);
                } else {
                    chunk.load(values + offset, n_cols, neg_inf<A>(), v);
                    if (stage) chunk.stage(slot(j, array), v);
                }
                scale_by(v, inv_t);
                stats.template add<Math>(v);
            };
            take(pred, 0, x, stats_x);
            if (norm_target) {
                take(target, 1, t, stats_t);
            } else if (SUMS_TARGET<T> && target_first) {   // (the target kept for pass 2, and summed)
                if constexpr (PREFETCH) {
                    chunk.unstage(copied_to(j, 1), t);
                } else {
                    chunk.load(target + offset, n_cols, A(0), t);
                    if (stage) chunk.stage(slot(j, 1), t);
                }
                stats_t.sum += thread_sum(t);   // (stats_t, the target's softmax statistics, unused here)
            }
        }
        if (pass2_copies) {   // (pass 1 has waited for all of its copies)
            prefetch_pass2(segments - 1);
            __pipeline_commit();
        }
        ChunkStats<A> mine{0, 0, 0, 0};
        stats_x.template block_total<Math, THREADS>(mine.max_x, mine.sum_x);
        if (norm_target) stats_t.template block_total<Math, THREADS>(mine.max_t, mine.sum_t);
        else if (summed()) mine.sum_t = group_reduce<THREADS>(stats_t.sum, Sum());
        exchange_in_cluster(cluster, stats_slot, stats_gathered, mine, exchange);
        RowStats<A> s{0, 0, 0, 0};
        A max_x, max_t = 0, sum, factor;   // (factor: unused, every segment subtracts the row's max)
        combine_chunk_stats<K, true>(stats_gathered, 0, rank, max_x, sum, factor);
        s.log_sum_x = Math::log(sum);
        if (norm_target) {
            combine_chunk_stats<K, true>(stats_gathered, 1, rank, max_t, sum, factor);
            s.log_sum_t = Math::log(sum);
        }
        if (summed()) {   // probabilities: q becomes sum p q (take_target_sum), the row's term into the
                          // block's error at once
            const A term = take_target_sum<Math, false>(s, cluster_target_sum<K>(stats_gathered));
            if (rank == 0 && threadIdx.x == 0) block_error += double(term);
        }
        s.template prepare<Math>();

        const int64_t label = labels ? labels[row] : -1;
        const A w = (labels && label < 0) ? A(0) : (weights && label >= 0) ? weights[label] : A(1);
        const bool ignored = ignored_row(labels, label);
        // With norm_target, the forward divergence's (log_sum_x - log_sum_t) * sum p, sum p = 1
        // (kl_element), from one thread of the cluster.
        double error = (divergence == FORWARD && !labels && norm_target && rank == 0 && threadIdx.x == 0)
                           ? double(s.log_sum_x - s.log_sum_t) : 0.0;
        // Segment j of pred and the target into x and t, divided by T: from shared memory when
        // staged, else from memory (FINAL: its last read there, marked to leave L2 first); what
        // is still in x (keep_x) or t (keep_t) stays.
        // (COPIED: what is not on chip was copied into the ring, PASS2.)
        auto fetch = [&](const C& chunk, int64_t j, bool keep_x, bool keep_t, auto final, auto copied) {
            constexpr bool FINAL = decltype(final)::value, COPIED = decltype(copied)::value;
            const bool staged_here = j >= first_staged && j < segments - 1;
            if (!keep_x) {
                if (staged_here) chunk.unstage(slot(j, 0), x);
                else if (COPIED) chunk.unstage(pass2_copied_to(0), x);
                else chunk.template load<FINAL>(pred + offset, n_cols, neg_inf<A>(), x);
                scale_by(x, inv_t);
            }
            if (target && !keep_t) {
                if (staged_here && target_first) chunk.unstage(slot(j, 1), t);
                else if (COPIED) chunk.unstage(pass2_copied_to(1), t);
                else chunk.template load<FINAL>(target + offset, n_cols, norm_target ? neg_inf<A>() : A(0), t);
                if (norm_target) scale_by(t, inv_t);
            }
        };
        auto add_row_error = [&](double mine) {   // (every thread of the block, once a row)
            const double row_error = group_reduce<THREADS>(mine * double(w), Sum());
            if (threadIdx.x == 0) block_error += row_error;
        };
        if (divergence == FORWARD) {   // (uniform over the launch)
#pragma unroll 1
            for (int64_t j = segments - 1; j >= 0; --j) {   // pass 2, in reverse: the last segment is in x (and t)
                const C chunk = segment(j);
                const bool held = j == segments - 1;
                if constexpr (PASS2_COPIES) {
                    __pipeline_wait_prior(0);   // (this thread's copies of segment j)
                    fetch(chunk, j, held, held && target_first, std::true_type(), std::true_type());
                    if (j > 0) prefetch_pass2(j - 1);   // (into the slots just read)
                    __pipeline_commit();
                } else {
                    fetch(chunk, j, held, held && target_first, std::true_type(), std::false_type());
                }
                const int label_k = chunk.label_index(label);
                A segment_error = 0;
#pragma unroll
                for (int k = 0; k < ELEMS; ++k)   // x[k] becomes the gradient
                    x[k] = kl_element<Math, false>(x[k] - max_x, norm_target ? t[k] - max_t : t[k], A(0), A(0),
                                                   k == label_k, labels, norm_target, s, w * inv_n,
                                                   segment_error);
                zero_if_ignored(ignored, x, segment_error);
                if (grad) chunk.template store<STREAMING>(grad + offset, n_cols, x);
                error += double(segment_error);   // (in double every segment: a row has up to thousands)
            }
        } else {   // reverse KL or JSD: pass 2 sums the row's S (DivergenceSums) and terms, pass 3 writes grad
            // (this thread's light sums in A over its segments, a few hundred terms: in double, with
            // a segment's partial sums beside them, the 16-bit kernels spilled)
            DivergenceSums<A> mine;
#pragma unroll 1
            for (int64_t j = segments - 1; j >= 0; --j) {   // pass 2, in reverse, as the forward one
                const C chunk = segment(j);
                const bool held = j == segments - 1;
                fetch(chunk, j, held, held && target_first, std::false_type(), std::false_type());
                const int label_k = chunk.label_index(label);
                A segment_error = 0;
#pragma unroll
                for (int k = 0; k < ELEMS; ++k) {
                    A q, g;
                    divergence_terms<Math>(d, x[k] - max_x, norm_target ? t[k] - max_t : t[k], k == label_k, labels,
                                           norm_target, s, q, g, segment_error);
                    mine.add(q, g);
                }
                error += double(segment_error);
            }
            exchange_in_cluster(cluster, s_slot, s_gathered, group_totals<THREADS>(mine), exchange);
            // Pass 3 forms S - g as R + (g_h - g), as the other kernels do (DivergenceFactors).  Room
            // for R and g_h both: the row's error is added here, not after pass 3 (its double held
            // through pass 3 spilled the bfloat16 kernel on sm_90), and the scale is taken into q
            // (grad(q, g, scale) spilled the float16 one).  benchmarks/NOTES.md, seventh session.
            add_row_error(ignored ? 0.0 : error);   // an ignored row gives nothing, even for NaN logits
            error = 0;
            const DivergenceFactors<A> factors(cluster_totals<K>(s_gathered));
#pragma unroll 1
            for (int64_t j = 0; j < segments; ++j) {   // pass 3, forward: segment 0 is still in x and t
                const C chunk = segment(j);
                fetch(chunk, j, j == 0, j == 0, std::true_type(), std::false_type());
                const int label_k = chunk.label_index(label);
                A unused = 0;
#pragma unroll
                for (int k = 0; k < ELEMS; ++k) {
                    A q, g;
                    divergence_terms<Math>(d, x[k] - max_x, norm_target ? t[k] - max_t : t[k], k == label_k, labels,
                                           norm_target, s, q, g, unused);
                    x[k] = factors.grad(q * (w * inv_n), g);
                }
                zero_if_ignored(ignored, x, unused);
                if (grad) chunk.template store<STREAMING>(grad + offset, n_cols, x);
            }
        }
        add_row_error(error);   // (forward KL's; 0 after reverse KL's or JSD's, added above)
    }
    finish_cluster<THREADS, K>(cluster, rank, block_error, false, block_sums, ticket, batch_error, accumulator,
                               error_scale, blockIdx.x / K < n_rows);
}

}  // namespace plc

// kl_cluster_<dtype>_t<THREADS>_e<E>: rows of up to CLUSTER * THREADS * E elements (less the
// slack of a misaligned row), with the arguments of kl_rows_*.  At most 128 registers a thread,
// so that 512 threads share an SM: two blocks of 256, or four of 128.  The blocks of 128 serve
// grids of many rows (row_softmax.row_or_cluster): while one block waits at its cluster's
// exchange, three others on its SM have their loads in flight.  _t128_e32 holds the rows
// _t256_e16 does.
#define PLC_KL_CLUSTER(T, NAME, THREADS, E) \
    PLC_KL_CLUSTER_KERNEL(T, THREADS, E, false, false, kl_cluster_##NAME##_t##THREADS##_e##E)
#define PLC_KL_CLUSTER_PREFETCH(T, NAME, THREADS, E) \
    PLC_KL_CLUSTER_KERNEL(T, THREADS, E, true, false, kl_cluster_##NAME##_t##THREADS##_e##E##_prefetch)
#define PLC_KL_CLUSTER_NORMT(T, NAME, THREADS, E) \
    PLC_KL_CLUSTER_KERNEL(T, THREADS, E, false, true, kl_cluster_##NAME##_t##THREADS##_e##E##_normt)
#define PLC_KL_CLUSTER_PREFETCH_NORMT(T, NAME, THREADS, E) \
    PLC_KL_CLUSTER_KERNEL(T, THREADS, E, true, true, kl_cluster_##NAME##_t##THREADS##_e##E##_prefetch_normt)
#define PLC_KL_CLUSTER_KERNEL(T, THREADS, E, PREFETCH, NORMT, KERNEL)                                          \
    extern "C" __global__ void __cluster_dims__(plc::CLUSTER, 1, 1) __launch_bounds__(THREADS, 512 / THREADS) \
        KERNEL(const T* pred, const T* target, const int64_t* labels, const plc::ComputeType<T>::type* weights, \
               T* grad, double* block_sums, unsigned* ticket, double* batch_error, double* accumulator,        \
               double error_scale, double grad_scale, double inv_temperature, int64_t n_rows, int64_t n_cols,   \
               int norm_target, int divergence, double beta) {                                                 \
        PLC_ASSUME_MODE(target, labels, norm_target);                                                        \
        PLC_ASSUME(weights == nullptr);                                                                      \
        PLC_ASSUME(inv_temperature == 1.0);                                                                  \
        PLC_ASSUME(divergence == PLC_COST_MODEL_DIVERGENCE);                                                 \
        plc::kl_cluster_rows<T, THREADS, E, plc::CLUSTER, PREFETCH, NORMT>(pred, target, labels, weights, grad,      \
                                                                  block_sums,                                      \
                                                                  ticket, batch_error, accumulator, error_scale,   \
                                                                  grad_scale, inv_temperature, n_rows, n_cols,     \
                                                                  norm_target, divergence, beta);                  \
    }
#define PLC_KL_CLUSTER_ALL(T, NAME) \
    PLC_KL_CLUSTER(T, NAME, 128, 32) PLC_KL_CLUSTER(T, NAME, 256, 16) PLC_KL_CLUSTER(T, NAME, 256, 32)

// kl_cluster_stream_<dtype>_t<THREADS>_e<E>: rows of any length, a cluster of CLUSTER blocks of
// THREADS per row, E elements a thread per segment: 64 bytes of each array a thread per segment
// in flight, the same for every input type.  The arguments of kl_rows_*, then the number of
// segments a block keeps in its dynamic shared memory (THREADS * E * sizeof(T) bytes each, twice
// that where pass 1 reads the target: norm_target, and forward KL's probabilities).  Blocks of 256 run two to an SM, 128 registers a thread.
#define PLC_KL_CLUSTER_STREAM(T, NAME, THREADS, E) \
    PLC_KL_CLUSTER_STREAM_KERNEL(T, THREADS, E, false, false, kl_cluster_stream_##NAME##_t##THREADS##_e##E)
#define PLC_KL_CLUSTER_STREAM_PREFETCH(T, NAME, THREADS, E) \
    PLC_KL_CLUSTER_STREAM_KERNEL(T, THREADS, E, true, false, kl_cluster_stream_##NAME##_t##THREADS##_e##E##_prefetch)
#define PLC_KL_CLUSTER_STREAM_PREFETCH_PASS2(T, NAME, THREADS, E) \
    PLC_KL_CLUSTER_STREAM_KERNEL(T, THREADS, E, true, true,       \
                                 kl_cluster_stream_##NAME##_t##THREADS##_e##E##_prefetch_pass2)
#define PLC_KL_CLUSTER_STREAM_KERNEL(T, THREADS, E, PREFETCH, PASS2, KERNEL)                                   \
    extern "C" __global__ void __cluster_dims__(plc::CLUSTER, 1, 1) __launch_bounds__(THREADS, 512 / THREADS) \
        KERNEL(                                                                                               \
            const T* pred, const T* target, const int64_t* labels, const plc::ComputeType<T>::type* weights,  \
            T* grad, double* block_sums, unsigned* ticket, double* batch_error, double* accumulator,           \
            double error_scale, double grad_scale, double inv_temperature, int64_t n_rows, int64_t n_cols,    \
            int norm_target, int divergence, double beta, int staged) {                                       \
        PLC_ASSUME_MODE(target, labels, norm_target);                                                         \
        PLC_ASSUME(weights == nullptr);                                                                       \
        PLC_ASSUME(inv_temperature == 1.0);                                                                   \
        PLC_ASSUME(divergence == PLC_COST_MODEL_DIVERGENCE);                                                  \
        plc::kl_cluster_stream<T, THREADS, E, plc::CLUSTER, PREFETCH, PASS2>(                                \
            pred, target, labels, weights, grad, block_sums, ticket, batch_error, accumulator, error_scale,    \
            grad_scale, inv_temperature, n_rows, n_cols, norm_target, divergence, beta, staged);               \
    }
#define PLC_KL_CLUSTER_STREAM_ALL(T, NAME, E) PLC_KL_CLUSTER_STREAM(T, NAME, 256, E)

PLC_KL_CLUSTER_ALL(float, f32) PLC_KL_CLUSTER_STREAM_ALL(float, f32, 16)
PLC_KL_CLUSTER_ALL(__nv_bfloat16, bf16) PLC_KL_CLUSTER_STREAM_ALL(__nv_bfloat16, bf16, 32)
// Prefetching (row_softmax.PREFETCH_KERNELS; it takes PREFETCHED_KERNELS): the many-rows cluster
// kernel and the stream kernels of the benchmark's dtypes.
PLC_KL_CLUSTER_PREFETCH(float, f32, 128, 32) PLC_KL_CLUSTER_PREFETCH(__nv_bfloat16, bf16, 128, 32)
PLC_KL_CLUSTER_STREAM_PREFETCH(float, f32, 256, 16) PLC_KL_CLUSTER_STREAM_PREFETCH(__nv_bfloat16, bf16, 256, 32)
// bfloat16's stream kernel with pass 2 prefetched too (PASS2; row_softmax.PASS2_KERNELS).
PLC_KL_CLUSTER_STREAM_PREFETCH_PASS2(__nv_bfloat16, bf16, 256, 32)
// normTarget forward KL's kernels (NORMT, kl_divergence.cu; row_softmax.NORMT_KERNELS): the float32
// and 16-bit cluster kernels of 32 elements a thread, and bfloat16's prefetching twin of the
// many-rows one.
#define PLC_KL_CLUSTER_NORMT_ALL(T, NAME) PLC_KL_CLUSTER_NORMT(T, NAME, 128, 32) PLC_KL_CLUSTER_NORMT(T, NAME, 256, 32)
PLC_KL_CLUSTER_NORMT_ALL(float, f32)
PLC_KL_CLUSTER_NORMT_ALL(__nv_bfloat16, bf16) PLC_KL_CLUSTER_PREFETCH_NORMT(__nv_bfloat16, bf16, 128, 32)
#ifndef PLC_COST_MODEL
PLC_KL_CLUSTER_ALL(__half, f16) PLC_KL_CLUSTER_STREAM_ALL(__half, f16, 32) PLC_KL_CLUSTER_NORMT_ALL(__half, f16)
#endif

#endif  // __CUDA_ARCH__ >= 900
