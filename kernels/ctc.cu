// CTC (connectionist temporal classification): data (T, N, V) time-major, sequence b has
// frames[b] valid frames and L labels l_1..l_L (never the blank).  Its extended label l' has
// S = 2L + 1 states, the blank at even s and l_{(s+1)/2} at odd s.  With log y_t(k) the
// log-softmax of frame t (log of the data itself when normalized):
//     alpha_t(s) = lse(alpha_{t-1}(s), alpha_{t-1}(s-1), [alpha_{t-1}(s-2)]) + log y_t(l'_s)
//     beta_t(s)  = lse over s' in {s, s+1, [s+2]} of beta_{t+1}(s') + log y_{t+1}(l'_s')
//                  (beta excludes frame t's own emission, so alpha_t(s) + beta_t(s) is the log
//                  mass of the paths through state s at frame t, with no division by y)
//     [s-2 -> s] only where l'_s is not the blank and differs from l'_{s-2}
//     log P = lse(alpha_{T-1}(S-1), alpha_{T-1}(S-2)),  nll = -log P
//     gamma_t(k) = sum over the states s with l'_s = k of exp(alpha_t(s) + beta_t(s) - log P),
//                  computed as the frame's exp(alpha_t + beta_t) over their sum over s (which is P)
//     grad_t(k)  = (gamma_t(k) - y_t(k)) * grad_scale        (the NEGATIVE gradient with respect
//                                                           to the logits, grad_scale = 1 / N)
// Three launches (the host's plan: puzzlelib_cost/ctc.py):
//   ctc_lse_*          log-sum-exp of every valid frame (one warp per frame), so the log-softmax
//                      is computed once; skipped when the data are already probabilities;
//   ctc_alpha_beta_*   one block per sequence walks time forward (alpha) and backward (beta), the
//                      S states spread over the threads; per frame it gathers gamma for the blank
//                      and for each distinct label (the host groups the label positions by label),
//                      always in the same order, so there are no atomics and the sums are
//                      bitwise reproducible; the block's nll goes to finish_batch_error;
//   ctc_grad_*         one block per frame row writes the whole grad row from y and those gammas
//                      (V can be large: this pass runs over all T N rows in parallel).
// Precision: log-space values in the compute type would lose their digits to the growing
// magnitude of alpha (-t log V: -8500 after 1000 frames of a 5000-word vocabulary, where a float
// has 0.001 of resolution).  So every row is stored relative to an offset: the maximum of the
// previous row is subtracted at each step.  alpha's offsets are summed in double, per sequence,
// for log P; beta's need no sum: each frame's occupancies are normalised by their own sum, in
// which any offset cancels.  The stored values stay within a few units of 0, and so does
// alpha_t + beta_t less the frame's maximum.  The maximum of a row is published per warp in
// shared memory and read after the step's barrier, so normalising costs no extra barrier.
#include "common.cuh"

namespace plc {

constexpr int CTC_THREADS = 128;            // threads of a sequence's block (states in a strided loop)
constexpr int CTC_WARPS = CTC_THREADS / WARP;
constexpr int CTC_SHARED_STATES = 1024;     // rows of up to this many states live in shared memory
constexpr int CTC_ROW_THREADS = 128;        // threads per frame row (ctc_lse_* uses a warp per row)
constexpr int CTC_SEQ_FIELDS = 7;           // per sequence, int64 (see the host's plan):
enum CtcSeq { LABEL_OFF, LENGTH, FRAMES, TABLE_OFF, GAMMA_OFF, SEG_FIRST, SEG_COUNT };

// log(e^a + e^b + e^c); all -inf gives -inf (not NaN), a NaN gives NaN.
template <typename A> __device__ __forceinline__ A lse3(A a, A b, A c) {
    const A m = max_(a, max_(b, c));
    if (m == neg_inf<A>()) return m;
    return m + log_(exp_(a - m) + exp_(b - m) + exp_(c - m));
}

// Frame t's log-probability of class k of sequence b: (x - max) - log z, with the row's max and
// log z apart (ctc_lse), as the other softmax costs take it.  (x - (max + log z)) would round
// log z away at the logits' magnitude: at logits of 1e8 a frame of two equal classes gave
// log y = 0, not -log 2.)
template <typename T, typename A>
__device__ __forceinline__ A ctc_log_prob(const T* __restrict__ data, const A* __restrict__ lse, int64_t t, int64_t b,
                                          int64_t n, int64_t v, int32_t k, bool normalized) {
    const int64_t row = t * n + b;
    const A x = widen(data[row * v + k]);
    return normalized ? log_(x) : (x - lse[2 * row]) - lse[2 * row + 1];
}

// Every thread's `local` maximum -> slot[warp] (the warp's maximum), for row_offset() after the
// next barrier.  Every thread of the block calls it.
template <typename A> __device__ __forceinline__ void publish_max(A* slot, A local) {
    local = warp_reduce<WARP>(local, Max());
    if (threadIdx.x % WARP == 0) slot[threadIdx.x / WARP] = local;
}

// The offset to subtract from the next row: the published row's maximum (warps in a fixed
// order); 0 when the whole row is -inf (nothing reachable: keeps -inf instead of NaN).
template <typename A> __device__ __forceinline__ A row_offset(const A* slot) {
    A m = slot[0];
#pragma unroll
    for (int w = 1; w < CTC_WARPS; ++w) m = max_(m, slot[w]);
    return m == neg_inf<A>() ? A(0) : m;
}

// One block per sequence.  CAP > 0: the working rows (alpha, then beta + emission, and two rows
// of per-state masses: alpha_t + beta_t, then their exponentials, the occupancies before the
// frame's normalisation) in shared memory, for S <= CAP; CAP = 0: the same rows in global scratch
// (`rows`, 4 S per sequence), for any S.  `table` keeps every alpha row of the sequence (frames
// x S); each thread reads back only the states it wrote, so it needs no barrier.
template <typename T, int CAP>
__device__ __forceinline__ void ctc_alpha_beta(
        const T* __restrict__ data, const typename ComputeType<T>::type* __restrict__ lse,
        const int32_t* __restrict__ labels, const int64_t* __restrict__ seqs, const int32_t* __restrict__ segments,
        const int32_t* __restrict__ order, typename ComputeType<T>::type* __restrict__ table,
        typename ComputeType<T>::type* __restrict__ gamma,
        typename ComputeType<T>::type* rows, int32_t* __restrict__ status, double* __restrict__ block_sums,
        unsigned* __restrict__ ticket, double* __restrict__ batch_error, double* __restrict__ accumulator,
        double error_scale, int64_t n, int64_t v, int32_t blank, int32_t normalized, int32_t zero_infinity,
        int32_t want_grad) {
    using A = typename ComputeType<T>::type;
    const int64_t b = blockIdx.x;
    const int64_t* seq = seqs + b * CTC_SEQ_FIELDS;
    const int32_t* lab = labels + seq[LABEL_OFF];
    const int64_t length = seq[LENGTH], frames = seq[FRAMES], states = 2 * length + 1;
    A* tab = table + seq[TABLE_OFF];
    const bool norm = normalized != 0;

    // (Rows in global memory are written and read by different threads of the block between
    // barriers: they must not be read through the non-coherent path, hence no const/__restrict__.)
    A *row0, *row1, *gam0, *gam1;   // (selected by the frame's parity: no dynamically indexed arrays)
    if constexpr (CAP > 0) {
        if (states > CAP) __trap();   // the host picks the global-memory kernel for longer labels
        __shared__ A shared_rows[4][CAP];
        row0 = shared_rows[0], row1 = shared_rows[1], gam0 = shared_rows[2], gam1 = shared_rows[3];
    } else {
        row0 = rows + 4 * (2 * seq[LABEL_OFF] + b);   // after the earlier sequences' 4 S each
        row1 = row0 + states, gam0 = row0 + 2 * states, gam1 = row0 + 3 * states;
    }
    __shared__ A row_max[2][CTC_WARPS];

    auto label_of = [&](int64_t s) -> int32_t { return (s & 1) ? lab[s >> 1] : blank; };
    // The transition s-2 -> s: into a label state whose label differs from the previous label.
    auto skip_into = [&](int64_t s) -> bool { return (s & 1) && s >= 3 && lab[s >> 1] != lab[(s >> 1) - 1]; };

    double log_p;
    if (frames == 0) {
        log_p = length == 0 ? 0.0 : -INFINITY;   // the empty alignment, or none
    } else {
        // ---- alpha, t = 0: the blank or the first label.
        A local = neg_inf<A>();
        for (int64_t s = threadIdx.x; s < states; s += CTC_THREADS) {
            const A a = s < 2 ? ctc_log_prob(data, lse, 0, b, n, v, label_of(s), norm) : neg_inf<A>();
            row0[s] = a;
            tab[s] = a;
            local = max_(local, a);
        }
        publish_max(row_max[0], local);
        double total = 0;   // the sum of the offsets subtracted so far: alpha_t = stored + total
        __syncthreads();
        for (int64_t t = 1; t < frames; ++t) {
            const A* prev = (t & 1) ? row0 : row1;
            A* cur = (t & 1) ? row1 : row0;
            const A c = row_offset(row_max[(t - 1) & 1]);
            total += double(c);
            local = neg_inf<A>();
            for (int64_t s = threadIdx.x; s < states; s += CTC_THREADS) {
                const A a = lse3(prev[s], s >= 1 ? prev[s - 1] : neg_inf<A>(),
                                 skip_into(s) ? prev[s - 2] : neg_inf<A>())
                            - c + ctc_log_prob(data, lse, t, b, n, v, label_of(s), norm);
                cur[s] = a;
                tab[t * states + s] = a;
                local = max_(local, a);
            }
            publish_max(row_max[t & 1], local);
            __syncthreads();
        }
        // (From the table, which no thread overwrites, rather than the working row that the
        // backward pass reuses at once.)
        const A* last = tab + (frames - 1) * states;
        log_p = total + double(lse3(last[states - 1], states >= 2 ? last[states - 2] : neg_inf<A>(), neg_inf<A>()));
    }

    // An infinite nll has no gradient (NaN; 0 under zero_infinity); nor has a NaN one (a NaN or
    // +inf logit in a frame): NaN in every valid frame of the sequence, not the finite -y / N its
    // other entries would get, while the error says NaN.
    const bool infinite = log_p == -INFINITY, undefined = isnan(log_p);
    double nll = -log_p;
    if (infinite && zero_infinity) nll = 0;
    if (threadIdx.x == 0) status[b] = infinite && zero_infinity ? 1 : infinite || undefined ? 2 : 0;

    if (want_grad && !infinite && !undefined && frames > 0) {   // (the same branch in every thread of the block)
        const int64_t segs = seq[SEG_COUNT];
        const int32_t* seg = segments + 3 * seq[SEG_FIRST];
        A* gamma_row = gamma + seq[GAMMA_OFF];
        for (int64_t t = frames - 1; t >= 0; --t) {
            const A* next = (t & 1) ? row0 : row1;
            A* cur = (t & 1) ? row1 : row0;
            A* g = (t & 1) ? gam1 : gam0;
            const A d = t < frames - 1 ? row_offset(row_max[(t + 1) & 1]) : A(0);   // (beta stored less d)
            // A state's mass alpha_t + beta_t, less the offsets subtracted, into g[s] (each thread
            // reads back only its own states before the barriers below).  The frame's occupancies
            // are its masses normalised to sum to 1 (sum_s alpha_t(s) beta_t(s) = P at every frame):
            // exact, and unlike exp(alpha + beta - log P) it keeps the rounding of alpha and beta,
            // which grows with the logits' magnitude, out of the exponent (gamma passed 1 from
            // logits of 1e5, and overflowed to inf at 1e10).
            A local = neg_inf<A>(), local_mass = neg_inf<A>();
            for (int64_t s = threadIdx.x; s < states; s += CTC_THREADS) {
                A beta;
                if (t == frames - 1) {
                    beta = s >= states - 2 ? A(0) : neg_inf<A>();
                } else {
                    beta = lse3(next[s], s + 1 < states ? next[s + 1] : neg_inf<A>(),
                                s + 2 < states && skip_into(s + 2) ? next[s + 2] : neg_inf<A>()) - d;
                }
                g[s] = tab[t * states + s] + beta;
                local_mass = max_(local_mass, g[s]);
                const A emitted = beta + ctc_log_prob(data, lse, t, b, n, v, label_of(s), norm);
                cur[s] = emitted;   // what frame t - 1 reads
                local = max_(local, emitted);
            }
            publish_max(row_max[t & 1], local);
            A most = group_reduce<CTC_THREADS>(local_mass, Max());   // (its barriers publish cur and row_max)
            most = most == neg_inf<A>() ? A(0) : most;
            A blank_part = 0, all_part = 0;
            for (int64_t s = threadIdx.x; s < states; s += CTC_THREADS) {
                const A occupancy = exp_(g[s] - most);
                if (s & 1) {
                    g[s] = occupancy;
                } else {
                    blank_part += occupancy;
                }
                all_part += occupancy;
            }
            // The sums in a fixed order, both in one reduction, whose barriers also publish g.
            group_reduce_pair<CTC_THREADS>(all_part, blank_part, Sum());
            const A occupied = all_part > A(0) ? all_part : A(1), blank_gamma = blank_part;
            A* out = gamma_row + t * (segs + 1);
            if (threadIdx.x == 0) out[0] = blank_gamma / occupied;
            // Each distinct label's gamma: its positions in increasing order (from the host).
            // g is double-buffered: frame t - 1 writes the other row, and frame t - 2 writes
            // this one only after frame t - 1's barriers, when these reads are done.
            for (int64_t j = threadIdx.x; j < segs; j += CTC_THREADS) {
                const int32_t* sj = seg + 3 * j;
                A sum = 0;
                for (int32_t i = sj[0]; i < sj[1]; ++i) sum += g[2 * int64_t(order[i]) + 1];
                out[1 + j] = sum / occupied;
            }
        }
    }
    finish_batch_error<CTC_THREADS>(nll, block_sums, ticket, batch_error, accumulator, error_scale);
}

// Each valid frame row's (max, log z) (t < frames[b]), z the sum of exp(x - max), into
// lse[2r], lse[2r + 1]: one warp per row.
template <typename T>
__device__ __forceinline__ void ctc_lse(const T* __restrict__ data, const int64_t* __restrict__ seqs,
                                        typename ComputeType<T>::type* __restrict__ lse, int64_t t_max, int64_t n,
                                        int64_t v) {
    using A = typename ComputeType<T>::type;
    constexpr int ROWS = CTC_ROW_THREADS / WARP;
    const int lane = threadIdx.x % WARP;
    for (int64_t first = int64_t(blockIdx.x) * ROWS; first < t_max * n; first += int64_t(gridDim.x) * ROWS) {
        const int64_t r = first + threadIdx.x / WARP;
        // (Rows past the end or past their sequence's frames are skipped by the whole warp.)
        if (r < t_max * n && r / n < seqs[(r % n) * CTC_SEQ_FIELDS + FRAMES]) {
            const T* x = data + r * v;
            A m = lowest<A>(), z = 0;   // (a lane with no value keeps z = 0: it adds nothing below)
            for (int64_t k = lane; k < v; k += WARP) online_softmax_add(m, z, A(widen(x[k])));
            const A row_m = warp_reduce<WARP>(m, Max());
            z = warp_reduce<WARP>(rescale(z, m, row_m), Sum());
            if (lane == 0) {
                lse[2 * r] = row_m;
                lse[2 * r + 1] = log_(z);
            }
        }
    }
}

// grad rows: (gamma - y) * grad_scale for t < frames[b]; 0 past the frames and for a sequence
// whose nll is +inf under zero_infinity (status 1); NaN for such a sequence otherwise, and for
// one whose nll is NaN (status 2, as PyTorch's ctc_loss: an infinite error has no gradient).
template <typename T>
__device__ __forceinline__ void ctc_grad(const T* __restrict__ data,
                                         const typename ComputeType<T>::type* __restrict__ lse,
                                         const int64_t* __restrict__ seqs, const int32_t* __restrict__ segments,
                                         const int32_t* __restrict__ status,
                                         const typename ComputeType<T>::type* __restrict__ gamma, T* __restrict__ grad,
                                         int64_t t_max, int64_t n, int64_t v, int32_t blank, int32_t normalized,
                                         double grad_scale_) {
    using A = typename ComputeType<T>::type;
    const A grad_scale = A(grad_scale_);
    for (int64_t r = blockIdx.x; r < t_max * n; r += gridDim.x) {   // (r is the same in the whole block)
        const int64_t t = r / n, b = r % n;
        const int64_t* seq = seqs + b * CTC_SEQ_FIELDS;
        const T* x = data + r * v;
        T* out = grad + r * v;
        if (t >= seq[FRAMES] || status[b] != 0) {
            const A fill = t >= seq[FRAMES] || status[b] == 1 ? A(0) : A(NAN);
            for (int64_t k = threadIdx.x; k < v; k += CTC_ROW_THREADS) out[k] = narrow<T>(fill);
            continue;
        }
        const A row_m = normalized ? A(0) : lse[2 * r], log_z = normalized ? A(0) : lse[2 * r + 1];
        auto prob = [&](int64_t k) -> A { return normalized ? widen(x[k]) : exp_((widen(x[k]) - row_m) - log_z); };
        const int64_t segs = seq[SEG_COUNT];
        const A* gam = gamma + seq[GAMMA_OFF] + t * (segs + 1);
        for (int64_t k = threadIdx.x; k < v; k += CTC_ROW_THREADS)
            out[k] = narrow<T>(((k == blank ? gam[0] : A(0)) - prob(k)) * grad_scale);
        __syncthreads();   // the label entries below overwrite entries the loop above wrote
        const int32_t* seg = segments + 3 * seq[SEG_FIRST];
        for (int64_t j = threadIdx.x; j < segs; j += CTC_ROW_THREADS) {
            const int32_t k = seg[3 * j + 2];
            out[k] = narrow<T>((gam[1 + j] - prob(k)) * grad_scale);
        }
        __syncthreads();   // (the next row's first loop must not pass a thread still in this one's)
    }
}

}  // namespace plc

// Entry points (the host's table: puzzlelib_cost/ctc.py).
#define PLC_CTC_ALPHA_BETA(T, SUFFIX, NAME, CAP)                                                                 \
    extern "C" __global__ void __launch_bounds__(plc::CTC_THREADS, 1)                                               \
        ctc_alpha_beta_##SUFFIX##_##NAME(const T* data, const plc::ComputeType<T>::type* lse, const int32_t* labels, \
                                         const int64_t* seqs, const int32_t* segments, const int32_t* order,     \
                                         plc::ComputeType<T>::type* table,                                      \
                                         plc::ComputeType<T>::type* gamma, plc::ComputeType<T>::type* rows,      \
                                         int32_t* status, double* block_sums, unsigned* ticket,                  \
                                         double* batch_error, double* accumulator, double error_scale,           \
                                         int64_t n, int64_t v, int32_t blank, int32_t normalized,                \
                                         int32_t zero_infinity, int32_t want_grad) {                              \
        plc::ctc_alpha_beta<T, CAP>(data, lse, labels, seqs, segments, order, table, gamma, rows, status,          \
                                    block_sums, ticket, batch_error, accumulator, error_scale, n, v, blank,     \
                                    normalized, zero_infinity, want_grad);                                      \
    }
#define PLC_CTC_ALL(T, SUFFIX)                                                                                   \
    PLC_CTC_ALPHA_BETA(T, SUFFIX, shared, plc::CTC_SHARED_STATES)                                                \
    PLC_CTC_ALPHA_BETA(T, SUFFIX, global, 0)                                                                     \
    extern "C" __global__ void __launch_bounds__(plc::CTC_ROW_THREADS, 1)                                           \
        ctc_lse_##SUFFIX(const T* data, const int64_t* seqs, plc::ComputeType<T>::type* lse, int64_t t_max,      \
                         int64_t n, int64_t v) {                                                                 \
        plc::ctc_lse<T>(data, seqs, lse, t_max, n, v);                                                           \
    }                                                                                                            \
    extern "C" __global__ void __launch_bounds__(plc::CTC_ROW_THREADS, 1)                                           \
        ctc_grad_##SUFFIX(const T* data, const plc::ComputeType<T>::type* lse, const int64_t* seqs,              \
                          const int32_t* segments, const int32_t* status, const plc::ComputeType<T>::type* gamma, \
                          T* grad, int64_t t_max, int64_t n, int64_t v, int32_t blank, int32_t normalized,       \
                          double grad_scale) {                                                                   \
        plc::ctc_grad<T>(data, lse, seqs, segments, status, gamma, grad, t_max, n, v, blank, normalized,         \
                         grad_scale);                                                                            \
    }

#ifndef PLC_COST_MODEL   // (the cost model times the KL kernels only)
PLC_CTC_ALL(float, f32)
PLC_CTC_ALL(double, f64)
PLC_CTC_ALL(__half, f16)
PLC_CTC_ALL(__nv_bfloat16, bf16)
#endif
