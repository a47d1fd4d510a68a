// KL divergence of softmax(pred) from a target distribution, fused with its gradient.
//
// Per row (sample) of C elements, with q = softmax(pred) and p = target
// (softmax(target) when norm_target, one-hot when labels are given) and w = weights[label]
// when labels and weights are given (CrossEntropy's class weights), 0 for a negative label (a
// row to ignore: the host marks them), else 1:
//     row_error = w * sum_i p_i (log p_i - log q_i)      (0 log 0 = 0)
//     grad_i    = w * (p_i - s q_i) * grad_scale         (the NEGATIVE gradient, PuzzleLib's sign;
//                                                         grad_scale = 1 / (T * rows counted);
//                                                         s = sum_i p_i, 1 but for a target of
//                                                         probabilities: take_target_sum)
// With a temperature T, pred (and target when norm_target) are divided by T as they are loaded
// (multiplied by inv_temperature, only when it is not 1: the default path is unchanged).
// log q is (x - max) - log(sum exp(x - max)), never log(softmax): exact for any finite row.
// divergence = REVERSE or JSD swaps the row's terms (see "Reverse KL and JSD" below): one more
// row reduction before the gradient, on chip in kl_rows (float and 16-bit inputs; double rows
// go to the chunked kernels), and a third pass, kl_chunk_sums_*, between the two chunked ones.
//
// Two paths here, chosen on the host by C (bytes per element in float32 / 16-bit inputs); on sm_90
// and later the rows past a block's registers take the cluster kernels of kl_cluster.cu instead
// (the chunked ones there only for few rows, and for double):
//   kl_rows_*        one pass, the row held in registers by a group of G threads:
//                    read pred and target once, write grad once: 12 / 6 B (labels: 8 / 4 B).
//   kl_chunk_stats_* + kl_chunk_rows_* + kl_chunk_grad_*   rows too long for one block's
//                    registers (C > 16K - 7), split into chunks of CHUNK elements over many
//                    blocks: pass 1 reads pred (and the target for its softmax statistics or,
//                    forward KL's probabilities, its sum) for each chunk's statistics, a small
//                    kernel combines them into each row's, pass 2 re-reads both and writes grad:
//                    20 / 10 B (labels: 12 / 6 B); no N x C temporary.  Reverse KL and JSD
//                    read pred and target once more for S (kl_chunk_sums_*), their pass 1 the
//                    target only with norm_target: 24 B (norm_target: 28 B) in float32.
// Each block adds its rows' (or chunks') errors; the last block of the (last) launch adds the
// blocks' sums in a fixed order into the batch error and the accumulator (finish_batch_error):
// no floating-point atomics and no extra launch, and every call gives bitwise-identical results.
#include "common.cuh"

#include <cuda_pipeline_primitives.h>

#include <type_traits>

namespace plc {

// Threads of a block for the row kernels when a row group is smaller than a block.
constexpr int ROW_BLOCK = 128;

// A row's softmax statistics, for values x already shifted by a reference r_x (their row's max,
// or in kl_cluster_* their block's max): log q = x - log_sum_x and q = exp(x) * inv_sum_x, so
// log_sum_x = (max_x - r_x) + log(sum exp(pred - max_x)) and inv_sum_x = exp(r_x - max_x) / that
// sum (log_sum and 1 / sum when r_x is the row's max); the same for the target's scores when
// norm_target.
// exp_arg_x and exp_arg_t are log_sum_x and log_sum_t made ready for M::exp_minus (prepare).
template <typename A> struct RowStats {
    A log_sum_x, inv_sum_x, log_sum_t, inv_sum_t, exp_arg_x = 0, exp_arg_t = 0;
    template <typename M> __device__ __forceinline__ void prepare() {
        exp_arg_x = M::exp_minus_arg(log_sum_x), exp_arg_t = M::exp_minus_arg(log_sum_t);
    }
};

// Which of a thread's values is in the label's column: k in 0 .. VECS * VEC - 1, for values
// held as VECS vectors of VEC, vector v starting at column base + v * STRIDE; -1 when none is
// (or no label: label < 0).  Callers compare each value's k with it: one 32-bit comparison an
// element, where a 64-bit column and comparison took four (and this costs one register).
template <int VEC, int VECS, int64_t STRIDE>
__device__ __forceinline__ int label_index(int64_t label, int64_t base) {
    static_assert((STRIDE & (STRIDE - 1)) == 0, "a power of 2: shifts, not divisions");
    const int64_t d = label - base;
    if (d < 0) return -1;
    const uint64_t v = uint64_t(d) / STRIDE, i = uint64_t(d) % STRIDE;
    return v < VECS && i < VEC ? int(v) * VEC + int(i) : -1;
}

// The target of one element: p and log p, one-hot for label targets (at_label: the element is
// in the label's column), softmax(t) when norm_target (t is then the target minus its row max;
// et = exp(t) when KEPT), else t.
template <typename M, bool KEPT, typename A>
__device__ __forceinline__ void target_element(A t, A et, bool at_label, const int64_t* labels, int norm_target,
                                               const RowStats<A>& s, A& p, A& log_p) {
    if (labels) {
        p = at_label ? A(1) : A(0);
        log_p = at_label ? A(0) : neg_inf<A>();
    } else if (norm_target) {
        log_p = t - s.log_sum_t;
        p = KEPT ? et * s.inv_sum_t : M::exp(log_p);
    } else {
        p = t;
        log_p = M::log(p);
    }
}

// One element (at_label: in the label's column, see label_index): adds its part of
// p (log p - log q) to `error` and returns the gradient (p - q) * scale (scale = w / n).  x is
// pred minus its reference (RowStats), t the target (see target_element); when KEPT the caller
// also passes ex = exp(x) and et = exp(t) from the row's sums, so that q and p cost a multiply
// each instead of an exponential (unused otherwise).  M: ElementMath of the input type.
//
// With norm_target the element adds only p (t - x): since log p - log q = (t - x) +
// (log_sum_x - log_sum_t), the second part sums over the row to (log_sum_x - log_sum_t) * sum p,
// which the CALLER adds once per row (sum p = 1: kl_rows, kl_chunk_grad) or once per block (its
// share of sum p: kl_cluster_*): two subtractions an element fewer with KEPT; without it, q and p
// are exp(x - log_sum_x) and exp(t - log_sum_t), the subtraction inside the exponential's fma
// for 16-bit inputs (M::exp_minus).  t and x are shifted by their own maxima (or block maxima),
// never raw logits, so nothing cancels that the old form kept: t - x is rounded once, to
// u |t - x| <= u (|log p| + |log q|) (t <= 0 and x <= 0 differ from log p and log q by
// log_sum_t, log_sum_x >= 0), and |log_sum_x - log_sum_t| <= sum p (|log p| + |log q|)
// (log_sum_x <= sum p |log q| as every x <= 0; the same for t), so the error stays a few units
// roundoff of sum p (|log p| + |log q|), the bound the old form had.  0 log 0: p == 0 adds
// nothing (t = -inf, padding included, gives t - x = -inf or NaN there, skipped), x = -inf
// where p > 0 gives +inf, a NaN poisons the sum (p != 0) or the row's constant.
// SPLIT = false keeps the whole p (log p - log q) per element, with norm_target too (the caller
// adds nothing): kl_cluster_*_e32, which spilled with the split form.
template <typename M, bool KEPT, bool SPLIT = true, typename A>
__device__ __forceinline__ A kl_element(A x, A t, A ex, A et, bool at_label, const int64_t* labels,
                                        int norm_target, const RowStats<A>& s, A scale, A& error) {
    if (SPLIT && !labels && norm_target) {
        const A q = KEPT ? ex * s.inv_sum_x : M::exp_minus(x, s.exp_arg_x);
        const A p = KEPT ? et * s.inv_sum_t : M::exp_minus(t, s.exp_arg_t);
        if (p != A(0)) error += p * (t - x);
        return (p - q) * scale;
    }
    const A log_q = x - s.log_sum_x;
    A p, log_p;
    target_element<M, KEPT>(t, et, at_label, labels, norm_target, s, p, log_p);
    if (labels) log_p = 0;   // (only p = 1 is used: the one-hot row's other terms are skipped)
    // p == 0 adds nothing, even where q == 0; a NaN p is != 0 and poisons the sum.
    if (p != A(0)) error += p * (log_p - log_q);
    return (p - (KEPT ? ex * s.inv_sum_x : M::exp(log_q))) * scale;
}

// A target of probabilities whose row sums to sum_p: E's -grad is p - sum_p q (PuzzleLib's p - q
// holds where a row sums to 1).  kl_element's q becomes sum_p q without a register more in its
// loop: with KEPT through inv_sum_x (q is the grad's alone there), else through log_sum_x - log
// sum_p, whose shift d, as rounded, the row's error takes back once: sum p (log p - log q) =
// sum p (log p - (x - log_sum_x')) + d sum_p.  Returns that d sum_p (0 with KEPT), for the caller
// to add once a row.  (sum_p = 0: q and the terms are 0, and so is this.)
template <typename M, bool KEPT, typename A>
__device__ __forceinline__ A take_target_sum(RowStats<A>& s, A sum_p) {
    if constexpr (KEPT) {
        s.inv_sum_x *= sum_p;
        return A(0);
    } else {
        const A shifted = s.log_sum_x - M::log(sum_p);
        const A d = s.log_sum_x - shifted;   // (the shift as applied)
        s.log_sum_x = shifted;
        return sum_p == A(0) ? A(0) : d * sum_p;
    }
}

// ---------------------------------------------------------------------------------
// Reverse KL and JSD.  Both are sums over the row of terms in q and p; with
// g_i = dE_row/dq_i (less a constant, which cancels) and S = sum_i q_i g_i, the softmax gives
// -dE_row/dx_i = q_i (S - g_i) / T.  So each needs one more row reduction (S) before its
// gradient:
//   reverse  E_row = sum q (log q - log p),                     g = log q - log p   (S = E_row)
//   jsd      E_row = beta KL(p || m) + (1 - beta) KL(q || m),    m = beta p + (1 - beta) q,
//            with y = log(beta p / ((1 - beta) q)) = log(beta / (1 - beta)) + log p - log q,
//            g = (1 - beta) log(q / m) + (1 - beta) log(1 - beta) = -(1 - beta) softplus(y),
//            log(p / m) = -log(beta) - softplus(-y) = y - softplus(y) - log(beta),
//            all in log space (no m is formed), one softplus per element.  The constant shift makes g exactly 0 where
//            p = 0: without it, S - g_i for a one-hot or sparse p would be the difference of
//            two nearly equal numbers, losing the gradient's digits to rounding.
// A zero q or p adds nothing (0 log 0 = 0); a zero q gets a zero gradient.
// ---------------------------------------------------------------------------------
enum DivergenceKind { FORWARD = 0, REVERSE = 1, JSD = 2 };

// Made once per thread, before its loop over rows or chunks: the logarithms are in double, and
// the forward divergence, which uses none of this, skips them.
template <typename A> struct Divergence {
    int kind;
    A beta = 0, one_minus_beta = 0, log_beta = 0, log_beta_ratio = 0, q_shift = 0;
    __device__ Divergence(int kind_, double beta_) : kind(kind_) {
        if (kind == FORWARD) return;
        beta = A(beta_), one_minus_beta = A(1.0 - beta_), log_beta = A(log(beta_));
        log_beta_ratio = A(log(beta_) - log1p(-beta_)), q_shift = A(-(1.0 - beta_) * log1p(-beta_));
    }
};

// log(1 + exp(-|y|)): softplus(y) = max(y, 0) + tail and softplus(-y) = max(-y, 0) + tail, both
// without overflow, 0 at -inf and +inf respectively; M: the ElementMath of the input type.
template <typename M, typename A> __device__ __forceinline__ A softplus_tail(A y) {
    return M::log1p(M::exp(-fabs(y)));
}

// One element of reverse KL or JSD: adds its term of E_row to `error` and returns g.
template <typename M, typename A>
__device__ __forceinline__ A divergence_element(const Divergence<A>& d, A log_q, A q, A log_p, A p, A& error) {
    if (d.kind == REVERSE) {
        const A g = log_q - log_p;
        if (q != A(0)) error += q * g;
        return g;
    }
    // y = log(beta p / ((1 - beta) q)); one exponential and one log1p give both logarithms:
    // log(q / m) = -log(1 - beta) - softplus(y) and log(p / m) = -log(beta) - softplus(-y), as
    // max(y, 0) + tail and min(y, 0) - tail: not y - softplus(y), which is inf - inf where q = 0
    // (a -inf logit, y = inf: p's term is then beta p log(1 / beta)).
    // (softplus from p / q instead of exp(y) costs more: the IEEE division's slow path.)
    const A y = d.log_beta_ratio + (log_p - log_q);
    const A tail = softplus_tail<M>(y);
    const A g = -d.one_minus_beta * ((y > A(0) ? y : A(0)) + tail);
    if (p != A(0)) error += d.beta * p * ((y < A(0) ? y : A(0)) - tail - d.log_beta);
    if (q != A(0)) error += q * (d.q_shift + g);
    return g;
}

// The gradient of reverse KL or JSD, q_i (S - g_i), S = sum_j q_j g_j: S - g_i = sum_j q_j (g_j - g_i).
// Formed as S - g_i from a float S it cancelled where one class holds nearly all of q: with
// q = 1 - 8e-8 against a teacher's log p of -200, S and g are about 200 and S - g about 1e-5,
// which ulp(S) and S's rounded sum q (1 + a few ulp, times g) swamped (the grad 58 % off, or 0).
// A class with q > DIVERGENCE_HEAVY_Q is the row's heavy class h (at most one a row, rounded or
// not); the others (light) add q g and q to sums of their own, so that
//     R = S - g_h = light_qg - g_h light_q     (small terms: nothing to cancel against g_h)
// and S - g_i = R + (g_h - g_i) for every i (sum q = 1 taken exact there: its rounding, a few
// ulp, multiplies g_h - g_i, which is all of S - g_i for a light class).  Without a heavy class
// (or with an infinite g_h), g_h = 0 and R = S: S - g_i as before.  The CPU's blocks do the same
// (row_softmax.HEAVY_Q).  Two values a row in the gradient's loop, three sums a thread before.
constexpr float DIVERGENCE_HEAVY_Q = 0.75f;

template <typename A> struct DivergenceSums {   // one thread's sums, in A
    A light_qg = 0, light_q = 0, heavy_g = neg_inf<A>();
    __device__ __forceinline__ void add(A q, A g) {   // (predicated: 3 instructions more than S's q g)
        if (q > A(DIVERGENCE_HEAVY_Q)) heavy_g = g;
        else if (q != A(0)) light_qg += q * g, light_q += q;   // (q = 0: g may be -inf)
    }
};

template <typename A> struct DivergenceTotals {   // a group's (block's, chunk's, row's) sums
    double light_qg, light_q;
    A heavy_g;   // (-inf without a heavy class)
    __device__ __forceinline__ DivergenceTotals operator+(const DivergenceTotals& o) const {
        return {light_qg + o.light_qg, light_q + o.light_q, max_(heavy_g, o.heavy_g)};
    }
};

// A group of G threads' totals, every thread with the same bits.
template <int G, typename A>
__device__ __forceinline__ DivergenceTotals<A> group_totals(const DivergenceTotals<A>& mine) {
    return {group_reduce<G>(mine.light_qg, Sum()), group_reduce<G>(mine.light_q, Sum()),
            group_reduce<G>(mine.heavy_g, Max())};
}
template <int G, typename A> __device__ __forceinline__ DivergenceTotals<A> group_totals(const DivergenceSums<A>& mine) {
    return group_totals<G>(DivergenceTotals<A>{double(mine.light_qg), double(mine.light_q), mine.heavy_g});
}

template <typename A> struct DivergenceFactors {   // a row's R and g_h, as its gradient takes them
    A r, heavy_g;
    __device__ __forceinline__ explicit DivergenceFactors(const DivergenceTotals<A>& row)
        : r(0), heavy_g(isfinite(row.heavy_g) ? row.heavy_g : A(0)) {
        r = A(row.light_qg - double(heavy_g) * row.light_q);
    }
    // The gradient of one element from its q times the row's scale (0 where q = 0): the scale
    // taken into q before, so that the gradient's loop holds two values a row (three spilled
    // kl_rows_f32_g128_e32 on sm_100).
    __device__ __forceinline__ A grad(A q_scaled, A g) const {
        return q_scaled != A(0) ? q_scaled * (r + (heavy_g - g)) : A(0);
    }
    // The same from q and the scale (kl_cluster_f32_t128_e32 spilled on sm_100 with the other).
    __device__ __forceinline__ A grad(A q, A g, A scale) const {
        return q != A(0) ? q * (r + (heavy_g - g)) * scale : A(0);
    }
};

// A row to ignore: a negative label (ignoreLabel's rows; with labels, the group's rows past the
// last).  A class weight of 0 is not one: w multiplies the row's error and gradient, so a NaN
// logit there still gives NaN, as in the spatial kernel (and PyTorch).
__device__ __forceinline__ bool ignored_row(const int64_t* labels, int64_t label) { return labels && label < 0; }

// An ignored row gives exactly nothing, even for NaN logits: its gradient values x and its error
// become 0.
template <int ELEMS, typename A>
__device__ __forceinline__ void zero_if_ignored(bool ignored, A (&x)[ELEMS], A& error) {
    if (ignored) {
#pragma unroll
        for (int k = 0; k < ELEMS; ++k) x[k] = 0;
        error = 0;
    }
}

// The max of one thread's own values before their sum of exponentials: fmax, one instruction
// where max_ takes three (compare, NaN test, select).  It may drop a NaN, which is then caught by
// the sum: exp(NaN - max) is NaN, so the row's (or chunk's) sum, log-sum and every q and log q
// are NaN, as with max_; a thread of NaN and -inf (or padding) only gets -inf, as a row of -inf
// only gets -inf (exp(x - -inf) is NaN there).  The same holds for the reduction over a row's
// threads in group_softmax, whose every thread then takes exp(v - max) of its own values.
template <typename A> __device__ __forceinline__ A max_dropping_nan(A a, A b) { return fmax(a, b); }
struct MaxDroppingNan {
    template <typename A> __device__ __forceinline__ A operator()(A a, A b) const { return max_dropping_nan(a, b); }
};

// The max of the ELEMS values of each of G threads (a block, a warp or a thread's group), every
// thread's own first (max_dropping_nan: a NaN may be dropped, and is then caught by the sum).
template <int G, int ELEMS, typename A> __device__ __forceinline__ A group_max(const A* v) {
    A m = neg_inf<A>();
#pragma unroll
    for (int k = 0; k < ELEMS; ++k) m = MaxDroppingNan()(m, v[k]);
    return group_reduce<G>(m, MaxDroppingNan());
}

// The softmax statistics of a row whose ELEMS values per thread are spread over a group of G
// threads: v[k] becomes v[k] - max (the group max comes first, so every exponent is <= 0; a row
// of -inf or padding only gives NaN, as on the CPU), e[k] = exp(v[k]) * M::EXP_SCALE when KEEP
// and inv_sum = 1 / (EXP_SCALE sum), so that e[k] * inv_sum is q; returns the max.  e may be v
// itself: v[k] then becomes its exponential, in kernels with no room for a second array (KEEP
// false for the others: 32 elements a thread), for label targets, which need no v - max but the
// label's (label_logit).  The
// exponentials, the log-sum and the reciprocal of the sum are M's, the ElementMath of the input
// type, as for q and p (for 16-bit inputs: the log-sum within 2^-21.4 absolute or 3 ulp, which
// moves the error by at most that times sum p = 1, i.e. below 1e-6 of the terms' size sum p
// (|log p| + |log q|) >= log_sum; 1 / sum within 1 ulp, q and p within one more).
template <typename M, int G, int ELEMS, bool KEEP, typename A>
__device__ __forceinline__ A group_softmax(A* v, A* e, A& log_sum_out, A& inv_sum_out) {
    A s = 0;
    const A max_v = group_max<G, ELEMS>(v);
#pragma unroll
    for (int k = 0; k < ELEMS; ++k) {
        v[k] -= max_v;
        const A exp_v = M::exp_scaled(v[k]);   // (EXP_SCALE exp(v[k]), so that e * inv_sum is q)
        if constexpr (KEEP) e[k] = exp_v;
        s += exp_v;
    }
    const A sum = group_reduce<G>(s, Sum());
    log_sum_out = M::log(sum * A(1 / M::EXP_SCALE));   // (an exact scaling: sum >= EXP_SCALE)
    inv_sum_out = M::rcp(sum);
    return max_v;
}

// The label's logit of a row, as the kernels read it (divided by T), for -log q = log_sum - (x - max)
// once x itself is gone (its exponentials in its place: group_softmax, block_softmax_stats): a
// load from L1 or L2, where keeping it as the exponentials were made took a compare and a select
// an element.
template <typename T, typename A>
__device__ __forceinline__ A label_logit(const T* pred_row, int64_t label, A inv_t) {
    const A x = widen(pred_row[label]);
    return inv_t != A(1) ? x * inv_t : x;
}

// The "_normt" kernels (NORMT): forward KL with normTarget in the float32 and 16-bit row kernels of
// groups and cluster kernels of 32 elements a thread (kl_rows, kl_cluster_rows), the library's for that case
// (row_softmax.normt_twin).  These have no registers to keep the exponentials beside x and t (KEEP
// is false), and so took exp(x - log_sum_x) and exp(t - log_sum_t) again for every q and p: four
// exponentials an element where two do.  Once both maxima are known, x[k] and t[k] become their
// exponentials in place (group_softmax_in_place, block_softmax_stats_in_place in kl_cluster.cu),
// and kl_element's split term p (t - x) is summed as they are made, before p's scale inv_sum_t is
// known (split_sum); q and p are then a multiply each, as with KEEP.  A kernel of its own, which
// takes that mode alone (any other call traps): beside the form the other modes need, the
// in-place form spilled on sm_90 (40 B in kl_cluster_bf16_t128_e32_prefetch).  The statistics are
// the general kernels' bit for bit; q, p and the error are rounded as KEEP's are.  Measured on an
// H200 at a0916b1 as the build PLC_TRY_IN_PLACE (benchmarks/NOTES.md), bfloat16 normTarget, % of
// the copy bandwidth: 16384x1000 47.1 -> 56.4, 4096x4000 47.9 -> 51.4, 8192x32000 34.2 -> 38.9;
// grads within one unit in the last place of bfloat16 of the general kernels' (2.9e-4 to 5.2e-4
// of the largest).  float32's (built 2026-11-28, not measured): its full-precision exponential is
// 8 instructions where bfloat16's is 3, so the cost model's count falls further, 49.6 -> 36.8
// SASS an element at 16384x1000 and 61.8 -> 49.3 at 8192x32000 (float32 spilled here once, as the
// PLC_TRY_IN_PLACE build's cluster kernels, before NORMT's constants: no spills now).
template <typename T, bool KEEP> constexpr bool IN_PLACE_FORM = !KEEP && (sizeof(T) == 2 || sizeof(T) == 4);

// group_softmax of t and of x, with t[k] and x[k] left as their exponentials (times EXP_SCALE;
// shifted by their row maxima), and split_sum = the sum of exp(t - max_t) EXP_SCALE (t - x), both
// shifted, over the thread's elements where that exponential is not 0 (p = 0 adds nothing, as in
// kl_element: t = -inf, padding included).  s: the row's log-sums and 1 / sums, as group_softmax's.
// The target goes first, so that its exponentials are there when x's shifted values are: each
// phase holds the other array and its own, as group_softmax does (t - x in one loop, as
// kl_cluster_rows' form takes it, spilled in kl_rows_bf16_g128_e32).  The two sums of the split,
// exp(t) t and exp(t) x, are each rounded as the single one is, within the terms' own bound.
template <typename M, int G, int ELEMS, typename A>
__device__ __forceinline__ void group_softmax_in_place(A (&x)[ELEMS], A (&t)[ELEMS], RowStats<A>& s, A& split_sum) {
    A s_t = 0, split = 0;
    const A max_t = group_max<G, ELEMS>(t);
#pragma unroll
    for (int k = 0; k < ELEMS; ++k) {
        const A t_k = t[k] - max_t, exp_t = M::exp_scaled(t_k);
        if (exp_t != A(0)) split += exp_t * t_k;
        s_t += exp_t;
        t[k] = exp_t;
    }
    const A sum_t = group_reduce<G>(s_t, Sum());
    A s_x = 0;
    const A max_x = group_max<G, ELEMS>(x);
#pragma unroll
    for (int k = 0; k < ELEMS; ++k) {
        const A x_k = x[k] - max_x, exp_x = M::exp_scaled(x_k);
        if (t[k] != A(0)) split -= t[k] * x_k;
        s_x += exp_x;
        x[k] = exp_x;
    }
    const A sum_x = group_reduce<G>(s_x, Sum());
    s.log_sum_x = M::log(sum_x * A(1 / M::EXP_SCALE)), s.inv_sum_x = M::rcp(sum_x);
    s.log_sum_t = M::log(sum_t * A(1 / M::EXP_SCALE)), s.inv_sum_t = M::rcp(sum_t);
    split_sum = split;
}

// The sum of a thread's values (a target of probabilities: padding is 0).
template <int ELEMS, typename A> __device__ __forceinline__ A thread_sum(const A (&v)[ELEMS]) {
    A sum = 0;
#pragma unroll
    for (int k = 0; k < ELEMS; ++k) sum += v[k];
    return sum;
}

// v[k] *= inv_t (pred / T), skipped when inv_t is 1 (a uniform branch); rounded on its own
// (mul_rounded: common.cuh says why).
template <int ELEMS, typename A> __device__ __forceinline__ void scale_by(A (&v)[ELEMS], A inv_t) {
    if (inv_t != A(1)) {
#pragma unroll
        for (int k = 0; k < ELEMS; ++k) v[k] = mul_rounded(v[k], inv_t);
    }
}

// Whether the row kernels of an input type hold reverse KL and JSD: not for double, whose
// row kernels would then spill at 128 registers; the host sends double rows of those to the
// chunked kernels instead (row_softmax.py).
template <typename T> constexpr bool ROW_DIVERGENCES = !std::is_same<T, double>::value;

// ---------------------------------------------------------------------------------
// Prefetched rows (kl_rows_*_prefetch; the library's for bfloat16's g32 and g128: row_softmax.py).
// The row kernels load a row, compute it through long dependent chains, store it, and only then
// load the next one, so an SM's loads stop while its warps compute (measured on an H100:
// benchmarks/NOTES.md).  Prefetching, each thread copies its own vectors of its group's NEXT row
// into shared memory with asynchronous copies (cp.async, sm_80+; a plain copy on older GPUs) while
// it computes this one: two buffers, each holding pred's and target's vectors, slot v of thread t at
// v * THREADS + t.  A thread reads only the slots it wrote, so no barrier is needed: its wait for
// its own copies (__pipeline_wait_prior) orders them.  The buffer a thread fills was last read
// two rows back, and every value read then went into that row's gradient before this copy was
// issued.  Edge vectors and misaligned rows are loaded now, one element at a time, and written to
// their slots: the same values (padding included) that load_vec gives, narrowed exactly to T.
// ---------------------------------------------------------------------------------
extern __shared__ uint4 prefetched[];   // [PREFETCH_BUFFERS][2 arrays (pred, target)][VECS][THREADS]

// PLC_TRY_ONE_BUFFER (a build to measure, benchmarks/try_choices.py's "one_buffer"; not the
// library's): the prefetching row and many-rows cluster kernels keep one buffer, not two, so that
// float32's take 32 KiB a block of 128, not 64 (which left three blocks an SM of an H100, and
// measured slower than the plain kernels).  A thread waits for this row's copies, reads them into
// registers, and only then issues the next row's copies into the same slots: its own, which its
// loads have just read (a thread's accesses to one location keep their program order).  The next
// row's loads still overlap all of this row's compute; only its own read of the slots is not
// covered.  The same values, so the same bits.
#ifdef PLC_TRY_ONE_BUFFER
constexpr int PREFETCH_BUFFERS = 1;
#else
constexpr int PREFETCH_BUFFERS = 2;
#endif

template <typename T, typename A>
__device__ __forceinline__ void prefetch_vec(const T* row, int64_t start, int64_t cols, bool aligned, A pad,
                                             uint4* slot) {
    constexpr int VEC = Vec<T>::size;
    if (PLC_INTERIOR(aligned && start >= 0 && start + VEC <= cols)) {
        __pipeline_memcpy_async(slot, row + start, sizeof(uint4));
    } else {
        A values[VEC];
        load_vec(row, start, cols, aligned, pad, values);
        *slot = pack_vec<T>(values);
    }
}

// ---------------------------------------------------------------------------------
// Tiled rows (kl_rows_*_g1_*_tile, the library's on sm_90+: row_softmax.py).
// A thread a row reads its short row with 16-byte vector loads whose warps span rows of C
// elements: partial vectors at both ends of most rows go one element at a time (in a row of 10
// floats, two of its four vectors; the H100 executed 112 instructions an element there, where the
// cost model counts 63 for whole vectors).  Tiled, the block moves its rows as one contiguous
// stretch of ROW_BLOCK * C elements between global and shared memory, every warp's loads and
// stores whole and in order (16-byte vectors where the stretch starts on a 16-byte boundary, as
// every block's does when the array does, since ROW_BLOCK * itemsize is a multiple of 16), and
// each thread reads its row from there and writes its gradient back in its place (threads C
// elements apart: a gcd(C, 32)-way bank conflict for float, 2-way at C = 10).  The values are the
// row kernel's, so are the results, bit for bit.
// ---------------------------------------------------------------------------------
template <typename T, int COUNT> __device__ __forceinline__ T* row_tile() {
    __shared__ uint4 tile[COUNT * sizeof(T) / sizeof(uint4)];   // (uint4: 16-byte aligned)
    return reinterpret_cast<T*>(tile);
}

// `count` (<= THREADS * ELEMS) elements from `from` to `to`, one of them shared memory, by the
// block's THREADS threads: whole 16-byte vectors, two a thread at a time (both loads issued before
// the stores), where both sides are on 16-byte boundaries, else one element at a time.  (Tried
// and left: a plain strided loop, which nvcc unrolled 16 times for a trip count of at most 4,
// doubling the kernel's code; and holding all of a thread's vectors, or elements, at once, which
// spilled on sm_100.)
template <int THREADS, int ELEMS, typename T>
__device__ __forceinline__ void copy_stretch(T* to, const T* from, int count) {
    constexpr int VEC = Vec<T>::size;
    constexpr int HELD = ELEMS / VEC < 2 ? ELEMS / VEC : 2;
    if (PLC_INTERIOR(((reinterpret_cast<uintptr_t>(from) | reinterpret_cast<uintptr_t>(to)) % 16) == 0)) {
        const int vecs = count / VEC;
#pragma unroll 1
        for (int first = threadIdx.x; first < vecs; first += HELD * THREADS) {
            uint4 held[HELD];
#pragma unroll
            for (int j = 0; j < HELD; ++j)
                if (first + j * THREADS < vecs) held[j] = reinterpret_cast<const uint4*>(from)[first + j * THREADS];
#pragma unroll
            for (int j = 0; j < HELD; ++j)
                if (first + j * THREADS < vecs) reinterpret_cast<uint4*>(to)[first + j * THREADS] = held[j];
        }
        const int tail = vecs * VEC + threadIdx.x;   // (fewer than VEC elements after the last whole vector)
        if (tail < count) to[tail] = from[tail];
    } else {
#pragma unroll 1
        for (int i = threadIdx.x; i < count; i += THREADS) to[i] = from[i];
    }
}

// How kl_rows gets a row's values: its own vector loads (the library's kernels), prefetched a row
// ahead into shared memory ("Prefetched rows"), or from the block's tile ("Tiled rows").
enum RowLoad { VECTORS, PREFETCHED, TILED };

template <typename T, int G, int ELEMS, RowLoad LOAD = VECTORS, bool NORMT = false>
__device__ __forceinline__ void kl_rows(const T* __restrict__ pred, const T* __restrict__ target,
                                        const int64_t* __restrict__ labels,
                                        const typename ComputeType<T>::type* __restrict__ weights,
                                        T* __restrict__ grad, double* __restrict__ block_sums,
                                        unsigned* __restrict__ ticket, double* __restrict__ batch_error,
                                        double* __restrict__ accumulator, double error_scale, double grad_scale,
                                        double inv_temperature, int64_t n_rows, int64_t n_cols, int norm_target,
                                        int divergence, double beta) {
    using A = typename ComputeType<T>::type;
    constexpr int VEC = Vec<T>::size;
    constexpr int VECS = ELEMS / VEC;   // vectors held per thread
    constexpr int ROWS_PER_BLOCK = G < ROW_BLOCK ? ROW_BLOCK / G : 1;
    constexpr int THREADS = G < ROW_BLOCK ? ROW_BLOCK : G;
    // Keep exp(x - max) (and exp(t - max)) from the row's sums for q (and p): a multiply instead
    // of a second exponential per element, for up to 16 elements a thread (32 more registers);
    // a thread holding 32 would run out of registers at 512 threads a block.
    constexpr bool KEEP = ELEMS <= 16;
    // Whether the target's load tests `target` (which the cost model's build knows not to be null)
    // or `target_row` (null exactly when target is): testing target_row kept the loaded registers
    // of the previous row alive in copies (a dozen MOVs a row in kl_rows_bf16_g1_e16), testing
    // target made ptxas spill the 32-element kernels (kl_rows_{bf16,f16}_g512_e32, sm_90).
    constexpr bool LOAD_IF_TARGET = ELEMS <= 16;
    // NORMT: normTarget forward KL alone, in rows of groups (a thread's row of 32, kl_rows_*_g1_e32,
    // spilled: none built)
    static_assert(!NORMT || (IN_PLACE_FORM<T, KEEP> && G > 1), "_normt: float and 16-bit rows of groups of 32 a thread");
    if constexpr (NORMT) {
        if (!norm_target || labels || divergence != FORWARD) __trap();
    }
    using Math = ElementMath<T>;
    static_assert(ELEMS % VEC == 0, "a thread holds whole vectors");
    constexpr bool PREFETCH = LOAD == PREFETCHED, TILE = LOAD == TILED;
    static_assert(!TILE || G == 1, "tiles are of rows of one thread each");

    const int lane = threadIdx.x % G;   // this thread's place in its row group
    const A inv_n = A(grad_scale);      // grad = (p - q) * inv_n: a multiply per element, not a divide
    const A inv_t = A(inv_temperature);
    const Divergence<A> d(divergence, beta);
    // The errors of each group's rows, kept by its lane 0 in shared memory rather than in a
    // register live across the loop (which made ptxas spill on sm_100).
    __shared__ double group_error[ROWS_PER_BLOCK];
    if (lane == 0) group_error[threadIdx.x / G] = 0;

    // PREFETCH: this thread's first slot of buffer b, array a (0 pred, 1 target).
    auto slots = [&](int b, int a) { return prefetched + (b * 2 + a) * VECS * THREADS + threadIdx.x; };
    // PREFETCH: the asynchronous copy of the row of this thread's group in the block's rows from
    // `base` into buffer b (nothing for a row past the last: its values are never used).
    auto prefetch_row = [&](int64_t base, int b) {
        const int64_t row = base + threadIdx.x / G;
        if (row >= n_rows) return;
        const T* pred_row = pred + row * n_cols;
        const T* target_row = target ? target + row * n_cols : nullptr;
        T* grad_row = grad ? grad + row * n_cols : nullptr;
        // (the loop's alignment test below, written out again: a helper shared by the two
        // changed the machine code of the kernels without PREFETCH, which are measured as they are)
        const int head = misalignment(pred_row);
        const bool aligned = (!target_row || misalignment(target_row) == head) &&
                             (!grad_row || misalignment(grad_row) == head) && (G > 1 || n_cols + head <= ELEMS);
        const int64_t first = -(aligned ? head : 0);
#pragma unroll
        for (int v = 0; v < VECS; ++v) {
            const int64_t start = first + (int64_t(v) * G + lane) * VEC;
            prefetch_vec(pred_row, start, n_cols, aligned, neg_inf<A>(), slots(b, 0) + v * THREADS);
            if (target_row) prefetch_vec(target_row, start, n_cols, aligned, norm_target ? neg_inf<A>() : A(0),
                                         slots(b, 1) + v * THREADS);
        }
    };
    if constexpr (PREFETCH) {   // the first row into buffer 0
        prefetch_row(int64_t(blockIdx.x) * ROWS_PER_BLOCK, 0);
        __pipeline_commit();
    }

    // Every group of the block runs the same iterations (groups past the last row run on
    // padding), so that warp shuffles and barriers always see the whole block.
    int buffer = 0;   // PREFETCH: the buffer that holds this row
    for (int64_t base = int64_t(blockIdx.x) * ROWS_PER_BLOCK; base < n_rows;
         base += int64_t(gridDim.x) * ROWS_PER_BLOCK) {
        const int64_t row = base + threadIdx.x / G;
        const bool active = row < n_rows;
        const int64_t cols = active ? n_cols : 0;
        const int64_t offset = active ? row * n_cols : 0;
        const T* pred_row = pred + offset;
        const T* target_row = target ? target + offset : nullptr;
        T* grad_row = grad ? grad + offset : nullptr;

        // Vectors start `head` elements before the row so that they are 16-byte aligned;
        // that needs pred, target and grad rows equally misaligned, and the head's slots free
        // (the host counts them for rows held by several threads; a row of one thread is
        // checked here instead, so that C = 10 in 16-bit fits 16 slots, not 32), else every
        // load is scalar.
        const int head = misalignment(pred_row);
        const bool aligned = (!target_row || misalignment(target_row) == head) &&
                             (!grad_row || misalignment(grad_row) == head) && (G > 1 || cols + head <= ELEMS);
        const int64_t first = TILE ? 0 : -(aligned ? head : 0);   // (a tiled row's values start at column 0)
        auto vec_start = [&](int v) { return first + (int64_t(v) * G + lane) * VEC; };

        A x[ELEMS], t[ELEMS];
        // TILE: the block's rows of pred and of target, their length, and where this thread's row starts.
        T* const tile_x = TILE ? row_tile<T, 2 * ROWS_PER_BLOCK * ELEMS>() : nullptr;
        T* const tile_t = tile_x + ROWS_PER_BLOCK * ELEMS;
        const int stretch = int(min(n_rows - base, int64_t(ROWS_PER_BLOCK)) * n_cols);   // (n_cols <= ELEMS)
        const int mine = int(threadIdx.x * n_cols);
        if constexpr (TILE) {
            __syncthreads();   // the last round's grad has left the tile
            copy_stretch<THREADS, ELEMS>(tile_x, pred + base * n_cols, stretch);
            if (target) copy_stretch<THREADS, ELEMS>(tile_t, target + base * n_cols, stretch);
            __syncthreads();
#pragma unroll
            for (int k = 0; k < ELEMS; ++k) {
                x[k] = k < cols ? widen(tile_x[mine + k]) : neg_inf<A>();
                if (target) t[k] = k < cols ? widen(tile_t[mine + k]) : norm_target ? neg_inf<A>() : A(0);
            }
        } else if constexpr (PREFETCH) {
            // The next row on its way (an empty group past the last), then this row's copies in
            // (one buffer: this row's copies in, then the next row's on their way).
            const int64_t next = base + int64_t(gridDim.x) * ROWS_PER_BLOCK;
            if constexpr (PREFETCH_BUFFERS == 2) {
                prefetch_row(next, buffer ^ 1);
                __pipeline_commit();
            }
            __pipeline_wait_prior(PREFETCH_BUFFERS - 1);
#pragma unroll
            for (int v = 0; v < VECS; ++v) {
                unpack_vec<T>(slots(buffer, 0)[v * THREADS], &x[v * VEC]);
                if (target) unpack_vec<T>(slots(buffer, 1)[v * THREADS], &t[v * VEC]);
            }
            if constexpr (PREFETCH_BUFFERS == 1) {
                prefetch_row(next, buffer);
                __pipeline_commit();
            }
            buffer ^= PREFETCH_BUFFERS - 1;
        } else {
#pragma unroll
            for (int v = 0; v < VECS; ++v) {
                load_vec(pred_row, vec_start(v), cols, aligned, neg_inf<A>(), &x[v * VEC]);
                if (LOAD_IF_TARGET ? target != nullptr : target_row != nullptr) load_vec(target_row, vec_start(v), cols, aligned, norm_target ? neg_inf<A>() : A(0), &t[v * VEC]);
            }
        }
        scale_by(x, inv_t);
        if (norm_target) scale_by(t, inv_t);

        // (NORMT: no labels, as the trap above makes sure; written out so that the compiler
        // carries nothing of them: the prefetching twins spilled on sm_90 otherwise)
        const int64_t label = (!NORMT && labels && active) ? labels[row] : -1;
        const A w = NORMT ? A(1) : (labels && label < 0) ? A(0) : (weights && label >= 0) ? weights[label] : A(1);
        const bool ignored = !NORMT && ignored_row(labels, label);
        const int label_k = NORMT ? -1 : label_index<VEC, VECS, int64_t(G) * VEC>(label, vec_start(0));
        // Label targets, forward KL, 32 elements a thread: x[k] its exponential in place (uniform):
        // q a multiply, not a second exponential.
        const bool labels_in_place = !NORMT && !KEEP && labels && divergence == FORWARD;

        RowStats<A> stats{0, 0, 0, 0};
        A ex[KEEP ? ELEMS : 1], et[KEEP ? ELEMS : 1];
        A split_sum = 0, max_x = 0;
        if constexpr (NORMT) {   // (NORMT: x[k] and t[k] their exponentials)
            group_softmax_in_place<Math, G, ELEMS>(x, t, stats, split_sum);
        } else if (labels_in_place) {
            max_x = group_softmax<Math, G, ELEMS, true>(x, x, stats.log_sum_x, stats.inv_sum_x);   // (x its own KEEP array)
        } else {
            group_softmax<Math, G, ELEMS, KEEP>(x, ex, stats.log_sum_x, stats.inv_sum_x);
            if (norm_target) group_softmax<Math, G, ELEMS, KEEP>(t, et, stats.log_sum_t, stats.inv_sum_t);
        }
        A row_term = 0;   // the row's term of E that one lane adds (norm_target, and probabilities: see below)
        if (!NORMT && !labels && !norm_target && divergence == FORWARD)   // probabilities: q becomes sum p q
            row_term = take_target_sum<Math, KEEP>(stats, group_reduce<G>(thread_sum(t), Sum()));
        stats.template prepare<Math>();

        A error = 0;   // this thread's terms, summed in A before the row's sum in double
        if (labels_in_place) {   // (p - q) w / n, p one-hot; the label's term -log q = log_sum - (x - max)
            const A scale = w * inv_n, q_scale = stats.inv_sum_x * scale;
#pragma unroll
            for (int k = 0; k < ELEMS; ++k) x[k] = (k == label_k ? scale : A(0)) - x[k] * q_scale;
            if (label_k >= 0) error = stats.log_sum_x - (label_logit(pred + row * n_cols, label, inv_t) - max_x);
        } else if constexpr (NORMT) {   // (p - q) / n from the exponentials (w = 1: no labels)
            const A p_scale = stats.inv_sum_t * inv_n, q_scale = stats.inv_sum_x * inv_n;
#pragma unroll
            for (int k = 0; k < ELEMS; ++k) x[k] = t[k] * p_scale - x[k] * q_scale;
            // the split terms, and the row's (log_sum_x - log_sum_t) * sum p from its lane 0
            error = split_sum * stats.inv_sum_t + (lane == 0 ? stats.log_sum_x - stats.log_sum_t : A(0));
        } else if (divergence == FORWARD) {   // (uniform over the launch)
            // With norm_target, the row's (log_sum_x - log_sum_t) * sum p, sum p = 1 (kl_element),
            // from its lane 0; probabilities: take_target_sum's.
            if (!labels && norm_target) row_term = stats.log_sum_x - stats.log_sum_t;
            if (lane == 0) error = row_term;
#pragma unroll
            for (int k = 0; k < ELEMS; ++k)   // x[k] becomes the gradient
                x[k] = kl_element<Math, KEEP>(x[k], t[k], ex[KEEP ? k : 0], et[KEEP ? k : 0],
                                              k == label_k, labels, norm_target, stats,
                                              w * inv_n, error);
        } else if constexpr (ROW_DIVERGENCES<T>) {   // reverse KL or JSD: x[k] becomes q, t[k] g, then S, then grad
            DivergenceSums<A> sums;
#pragma unroll
            for (int k = 0; k < ELEMS; ++k) {
                A p, log_p;
                target_element<Math, KEEP>(t[k], et[KEEP ? k : 0], k == label_k, labels, norm_target, stats, p,
                                           log_p);
                const A log_q = x[k] - stats.log_sum_x;
                x[k] = KEEP ? ex[k] * stats.inv_sum_x : Math::exp(log_q);
                t[k] = divergence_element<Math>(d, log_q, x[k], log_p, p, error);
                sums.add(x[k], t[k]);
                x[k] *= w * inv_n;
            }
            const DivergenceFactors<A> row_sums(group_totals<G>(sums));
#pragma unroll
            for (int k = 0; k < ELEMS; ++k) x[k] = row_sums.grad(x[k], t[k]);
        }
        zero_if_ignored(ignored, x, error);
        if (grad && TILE) {   // (uniform: the barrier is safe)
#pragma unroll
            for (int k = 0; k < ELEMS; ++k)
                if (k < cols) tile_x[mine + k] = narrow<T>(x[k]);
            __syncthreads();
            copy_stretch<THREADS, ELEMS>(grad + base * n_cols, tile_x, stretch);
        } else if (grad) {   // (grad_row is null exactly when grad is)
#pragma unroll
            for (int v = 0; v < VECS; ++v) store_vec(grad_row, vec_start(v), cols, aligned, &x[v * VEC]);
        }
        const double row_error = group_reduce<G>(double(error) * double(w), Sum());
        if (active && lane == 0) group_error[threadIdx.x / G] += row_error;
    }
    __syncthreads();
    const double mine = threadIdx.x < ROWS_PER_BLOCK ? group_error[threadIdx.x] : 0.0;
    finish_batch_error<THREADS>(group_reduce<THREADS>(mine, Sum()), block_sums, ticket, batch_error, accumulator,
                                error_scale);
}

// ---------------------------------------------------------------------------------
// Long rows: chunks of CHUNK = THREADS * ELEMS elements, one block per chunk.
// Chunk c of a row holds the vectors c*CHUNK/VEC ... of the row's aligned vector
// grid (which starts `head` elements before the row), so every chunk's vectors are
// aligned exactly as in kl_rows.  The host gives rows ceil((C + slack) / CHUNK) chunks, the
// slack VEC - 1 where a row may start off a 16-byte boundary, else none (row_softmax.row_slack);
// a chunk past the end of a row is empty.
// ---------------------------------------------------------------------------------
template <typename T, int THREADS, int ELEMS>
struct Chunk {
    using A = typename ComputeType<T>::type;
    static constexpr int VEC = Vec<T>::size;
    static constexpr int VECS = ELEMS / VEC;
    static constexpr int64_t SIZE = int64_t(THREADS) * ELEMS;
    static constexpr int BLOCK_THREADS = THREADS;

    int64_t row, index;       // which row, which chunk of it
    int64_t first;            // position of the row's first vector (<= 0)
    bool aligned;

    // Chunk `index` of row `row`, for callers that know both (no 64-bit division), or the chunk
    // numbered `block` counting along the rows.
    struct InRow { int64_t row, index; };
    __device__ Chunk(int64_t block, int64_t chunks_per_row, const T* pred, const T* target, const T* grad,
                     int64_t n_cols)
        : Chunk(InRow{block / chunks_per_row, block % chunks_per_row}, pred, target, grad, n_cols) {}
    __device__ Chunk(InRow at, const T* pred, const T* target, const T* grad, int64_t n_cols) {
        row = at.row;
        index = at.index;
        const int64_t offset = row * n_cols;
        const int head = misalignment(pred + offset);
        aligned = (!target || misalignment(target + offset) == head) && (!grad || misalignment(grad + offset) == head);
        first = -(aligned ? head : 0);
    }
    __device__ int64_t vec_start(int v) const {
        return first + index * SIZE + (int64_t(v) * THREADS + threadIdx.x) * VEC;
    }
    // Which of this thread's values is in the label's column, or -1 (label_index).
    __device__ int label_index(int64_t label) const {
        return plc::label_index<VEC, VECS, int64_t(THREADS) * VEC>(label, vec_start(0));
    }
    template <bool STREAM = false> __device__ void load(const T* row_ptr, int64_t n_cols, A pad, A* out) const {
#pragma unroll
        for (int v = 0; v < VECS; ++v) load_vec<STREAM>(row_ptr, vec_start(v), n_cols, aligned, pad, &out[v * VEC]);
    }
    // This thread's values of the chunk to and from a block's shared `slot` of VECS * THREADS
    // vectors (a thread's own vectors, THREADS apart: no bank conflicts, no barrier needed).
    __device__ void stage(uint4* slot, const A* in) const {
#pragma unroll
        for (int v = 0; v < VECS; ++v) slot[v * THREADS + threadIdx.x] = pack_vec<T>(&in[v * VEC]);
    }
    __device__ void unstage(const uint4* slot, A* out) const {
#pragma unroll
        for (int v = 0; v < VECS; ++v) unpack_vec<T>(slot[v * THREADS + threadIdx.x], &out[v * VEC]);
    }
    // The chunk's vectors of `row_ptr` straight into `slot`, laid out as stage() does, by
    // asynchronous copies (prefetch_vec: edge vectors loaded now, padded with `pad`): unstage() after
    // this thread's __pipeline_wait_prior for them gives what load() would.
    __device__ void prefetch(uint4* slot, const T* row_ptr, int64_t n_cols, A pad) const {
#pragma unroll
        for (int v = 0; v < VECS; ++v) prefetch_vec(row_ptr, vec_start(v), n_cols, aligned, pad, &slot[v * THREADS + threadIdx.x]);
    }
    // The 16-bit chunked kernels' next chunk (CHUNK_PREFETCH): its vectors of `row_ptr` as raw 16
    // bytes each (whole vectors loaded as such, edge ones as load() reads them, padded with `pad`,
    // and packed, exactly, into T), and unpacked later: what load() gives, its loads issued a turn
    // ahead.
    template <bool STREAM = false> __device__ void load_raw(const T* row_ptr, int64_t n_cols, A pad, uint4* raw) const {
#pragma unroll
        for (int v = 0; v < VECS; ++v) {
            const int64_t start = vec_start(v);
            if (PLC_INTERIOR(aligned && start >= 0 && start + VEC <= n_cols)) {
                const uint4* at = reinterpret_cast<const uint4*>(row_ptr + start);
                raw[v] = STREAM ? __ldcs(at) : *at;
            } else {
                A values[VEC];
                load_vec(row_ptr, start, n_cols, aligned, pad, values);
                raw[v] = pack_vec<T>(values);
            }
        }
    }
    static __device__ void unpack(const uint4* raw, A* out) {
#pragma unroll
        for (int v = 0; v < VECS; ++v) unpack_vec<T>(raw[v], &out[v * VEC]);
    }
    // (Whole vectors with __stwb unless told otherwise: see store_vec.)
    template <StoreKind HOW = WRITE_BACK> __device__ void store(T* row_ptr, int64_t n_cols, const A* in) const {
#pragma unroll
        for (int v = 0; v < VECS; ++v) store_vec<HOW>(row_ptr, vec_start(v), n_cols, aligned, &in[v * VEC]);
    }
};

// The (max, sum of exp(x - max)) of ELEMS values per thread, combined over THREADS threads (a
// block, or a warp: THREADS = WARP), the exponentials by M, the ElementMath of the input type.
// The group's max comes first (as in group_softmax, a NaN may be dropped from it and is then
// caught by the sum), so that every exponent is relative to it, x[k] becomes x[k] - r and
// e[k] = exp(x[k]) * M::EXP_SCALE when KEEP (sum_out is the sum of exp(x[k]), unscaled), where r
// is the group's max, or 0 where that is -inf (a group of only padding or -inf: exp(-inf - 0) = 0
// adds nothing, where exp(-inf + inf) would be NaN; a NaN stays NaN).  (A thread's own max and
// sum, rescaled to the group's, took an exponential and a NaN-propagating max more per thread.)
template <typename M, int THREADS, int ELEMS, bool KEEP = false, typename A>
__device__ __forceinline__ void block_softmax_stats(A* x, A* e, A& max_out, A& ref_out, A& sum_out) {
    A s = 0;
    max_out = group_max<THREADS, ELEMS>(x);
    ref_out = max_out == neg_inf<A>() ? A(0) : max_out;
#pragma unroll
    for (int k = 0; k < ELEMS; ++k) {
        x[k] -= ref_out;
        const A exp_x = M::exp_scaled(x[k]);
        if constexpr (KEEP) e[k] = exp_x;
        s += exp_x;
    }
    sum_out = group_reduce<THREADS>(s, Sum()) * A(1 / M::EXP_SCALE);   // (exact: a power of 2)
}

// The chunked kernels of 16-bit inputs, whose blocks loop over chunks (row_softmax.chunk_grid caps
// their grid at CHUNK_GRID_BLOCKS_PER_SM, PLC_CHUNK16_MIN_BLOCKS below), load the next turn's pred
// and target as raw vectors (8 registers an array at 16 elements a thread) before they compute this
// one, so that a block's loads are in flight while it computes, reduces and stores, as the
// prefetching row kernels' copies are.  Three blocks an SM (80 registers) where float32's ask for
// four.  Until 2026-11-27 a build to measure (PLC_TRY_CHUNK_PREFETCH, try_choices.py's
// "chunk_prefetch"), measured on an H200 at a0916b1, 16x1048576 bfloat16: 82.5 -> 68.0 us
// (normTarget 80.0 -> 61.0 us), the grads the plain kernels' bit for bit (the same values, the
// same arithmetic).  float32 would need 16 registers an array and keeps its plain
// load-then-compute chunks (as double does); so does PLC_TRY_CHUNK_E32 (32 elements a thread,
// measured slower as it is: the next chunk would take 16 registers an array more, beside its
// 128; not tried).
template <typename T, int ELEMS> constexpr bool CHUNK_PREFETCH = sizeof(T) == 2 && ELEMS == 16;

// Which statistics of the target kl_chunk_stats and kl_chunk_rows take (row_softmax.TARGET_*):
// none (labels; reverse KL and JSD on probabilities), its softmax's (norm_target), or the sum of
// forward KL's probabilities (take_target_sum's sum_p: in the slots of the softmax's sum, max_t 0).
enum TargetStats { TARGET_NONE = 0, TARGET_SOFTMAX = 1, TARGET_SUM = 2 };

// The softmax statistics of each warp's part of a chunk, stats[WARPS * block + warp] =
// {max_x, sum_x, max_t, sum_t}: warp reductions alone, no barrier (kl_chunk_rows combines a row's
// parts; a block's max and sum took two barriers and 2.2 SASS instructions an element more
// on sm_90, 3.5 with norm_target).
template <typename T, int THREADS, int ELEMS>
__device__ __forceinline__ void kl_chunk_stats(const T* __restrict__ pred, const T* __restrict__ target,
                                               typename ComputeType<T>::type* __restrict__ stats,
                                               double inv_temperature, int64_t n_rows, int64_t n_cols,
                                               int64_t chunks_per_row, int target_stats) {
    using C = Chunk<T, THREADS, ELEMS>;
    using A = typename C::A;
    const A inv_t = A(inv_temperature);
    const bool norm_target = target_stats == TARGET_SOFTMAX;
    const T* const read_target = target_stats != TARGET_NONE ? target : nullptr;
    // (CHUNK_PREFETCH: the block's next chunk, and its raw vectors, loaded a turn ahead)
    constexpr bool PREFETCH = CHUNK_PREFETCH<T, ELEMS>;
    C next(typename C::InRow{0, 0}, pred, read_target, nullptr, n_cols);
    uint4 next_x[C::VECS], next_t[C::VECS];
    auto load_next = [&](int64_t block) {
        if (block >= n_rows * chunks_per_row) return;
        next = C(block, chunks_per_row, pred, read_target, nullptr, n_cols);
        next.load_raw(pred + next.row * n_cols, n_cols, neg_inf<A>(), next_x);
        if (read_target) next.load_raw(target + next.row * n_cols, n_cols, norm_target ? neg_inf<A>() : A(0), next_t);
    };
    if constexpr (PREFETCH) load_next(blockIdx.x);
    for (int64_t block = blockIdx.x; block < n_rows * chunks_per_row; block += gridDim.x) {
        const C chunk = PREFETCH ? next : C(block, chunks_per_row, pred, read_target, nullptr, n_cols);
        A v[ELEMS], max_x, sum_x, max_t = 0, sum_t = 0, ref;
        uint4 raw_t[C::VECS];
        if constexpr (PREFETCH) {
            C::unpack(next_x, v);
#pragma unroll
            for (int i = 0; i < C::VECS; ++i) raw_t[i] = next_t[i];
            load_next(block + gridDim.x);
        } else {
            chunk.load(pred + chunk.row * n_cols, n_cols, neg_inf<A>(), v);
        }
        scale_by(v, inv_t);
        block_softmax_stats<ElementMath<T>, WARP, ELEMS>(v, v, max_x, ref, sum_x);
        if (read_target) {
            if constexpr (PREFETCH) C::unpack(raw_t, v);
            else chunk.load(target + chunk.row * n_cols, n_cols, norm_target ? neg_inf<A>() : A(0), v);
            if (norm_target) {
                scale_by(v, inv_t);
                block_softmax_stats<ElementMath<T>, WARP, ELEMS>(v, v, max_t, ref, sum_t);
            } else {
                sum_t = warp_reduce<WARP>(thread_sum(v), Sum());
            }
        }
        if (threadIdx.x % WARP == 0) {
            A* out = stats + 4 * (block * (THREADS / WARP) + threadIdx.x / WARP);
            out[0] = max_x, out[1] = sum_x, out[2] = max_t, out[3] = sum_t;
        }
    }
}

// Combines a row's `parts` statistics (kl_chunk_stats': a warp's part of a chunk each), in a fixed
// order, into (max, log sum), with M, the ElementMath of the input type, for the rescalings and the
// log (for 16-bit inputs: each part's sum within 6.6e-7 relative where it matters
// (exp(m - max) >= 2^-48), so the log-sum within 1e-6 absolute, as group_softmax's).  A part's
// max is never NaN (block_softmax_stats: a NaN is in its sum), so the max over parts need not
// look for one either.
template <typename M, int THREADS, typename A>
__device__ __forceinline__ void row_softmax_stats(const A* row_stats, int64_t parts, int which, A& max_out,
                                                  A& log_sum_out) {
    A m = neg_inf<A>();
#pragma unroll 1
    for (int64_t c = threadIdx.x; c < parts; c += THREADS) m = max_dropping_nan(m, row_stats[4 * c + which]);
    max_out = group_reduce<THREADS>(m, MaxDroppingNan());
    A s = 0;
#pragma unroll 1
    for (int64_t c = threadIdx.x; c < parts; c += THREADS) {
        const A part_sum = row_stats[4 * c + which + 1];   // (0 for an empty part, whose max may be -inf: as rescale)
        s += part_sum == A(0) ? A(0) : part_sum * M::exp(row_stats[4 * c + which] - max_out);
    }
    log_sum_out = M::log(group_reduce<THREADS>(s, Sum()));
}

// row_stats[row] = {max_x, log_sum_x, max_t, log_sum_t} of each row, from its chunks' statistics
// (kl_chunk_stats, launched with blocks of the same THREADS: THREADS / WARP parts a chunk), for
// kl_chunk_sums and kl_chunk_grad.  Combined once a row here, where each chunk of those kernels
// combined them again before its arithmetic: a read of its row's chunk statistics, an
// exponential, two block reductions (four with norm_target) and a log a chunk, 7 to 16 SASS
// instructions an element on sm_90, and registers that kept two blocks an SM.
template <typename T, int THREADS>
__device__ __forceinline__ void kl_chunk_rows(const typename ComputeType<T>::type* __restrict__ chunk_stats,
                                              typename ComputeType<T>::type* __restrict__ row_stats,
                                              int64_t n_rows, int64_t chunks_per_row, int target_stats) {
    using A = typename ComputeType<T>::type;
    const int64_t parts = chunks_per_row * (THREADS / WARP);   // a row's statistics
    for (int64_t row = blockIdx.x; row < n_rows; row += gridDim.x) {
        const A* stats = chunk_stats + 4 * row * parts;
        A max_x, log_sum_x, max_t = 0, log_sum_t = 0;   // (TARGET_SUM: log_sum_t's slot holds sum p)
        row_softmax_stats<ElementMath<T>, THREADS>(stats, parts, 0, max_x, log_sum_x);
        if (target_stats == TARGET_SOFTMAX) {
            row_softmax_stats<ElementMath<T>, THREADS>(stats, parts, 2, max_t, log_sum_t);
        } else if (target_stats == TARGET_SUM) {
            A sum = 0;
#pragma unroll 1
            for (int64_t c = threadIdx.x; c < parts; c += THREADS) sum += stats[4 * c + 3];
            log_sum_t = group_reduce<THREADS>(sum, Sum());
        }
        if (threadIdx.x == 0) {
            A* out = row_stats + 4 * row;
            out[0] = max_x, out[1] = log_sum_x, out[2] = max_t, out[3] = log_sum_t;
        }
    }
}

// Each pass over the chunks after kl_chunk_stats starts where the one before it ended
// (kl_chunk_grad from the last chunk after kl_chunk_stats; after kl_chunk_sums, which does so, from
// the first), so that its first reads are of the chunks read last, the likeliest still in L2, as
// the stream kernel's pass 2 does (kl_cluster.cu).  kl_chunk_grad's loads and stores are plain:
// evict-first ones (__ldcs, __stcs: nothing it touches is read again, so that its lines leave L2
// before those of the chunks it has yet to read) measured slower on an H200 at a0916b1, 16x1048576
// float32 110.9 -> 104.4 us plain (42.7 -> 45.4 % of the copy bandwidth), normTarget 103.8 -> 97.9
// us; bfloat16 (before its chunks loaded a turn ahead) 82.5 -> 80.7 and 80.0 -> 79.2 us
// (benchmarks/NOTES.md).  The same grad in either order or access; the batch error adds the same
// chunk errors in another grouping.  PLC_TRY_CHUNK_SAME_ORDER and PLC_TRY_CHUNK_EVICT_FIRST (builds
// to measure, try_choices.py's "chunk_same_order", the library's order before 2026-11-27, and
// "chunk_evict_first", its access before 2026-11-28): every pass from the first chunk;
// kl_chunk_grad's loads and stores evict-first.
#ifdef PLC_TRY_CHUNK_SAME_ORDER
constexpr bool CHUNKS_BACK_AND_FORTH = false;
#else
constexpr bool CHUNKS_BACK_AND_FORTH = true;
#endif
#ifdef PLC_TRY_CHUNK_EVICT_FIRST
constexpr bool CHUNK_GRAD_STREAMS = true;
#else
constexpr bool CHUNK_GRAD_STREAMS = false;
#endif

// The chunk a block takes at its `turn` (the loop's count, 0 .. count - 1, along the grid): the
// turn itself, or counting from the last chunk when `backward`.
__device__ __forceinline__ int64_t chunk_in_order(int64_t turn, int64_t count, bool backward) {
    return backward ? count - 1 - turn : turn;
}

// A chunk's pred and target, divided by T, and its row's softmax statistics from kl_chunk_rows
// (max_x, max_t and the log-sums in s).  The loads are issued first: they are in flight while the
// statistics are read.  (raw_x, raw_t: pred's and the target's vectors loaded already, to unpack:
// the 16-bit kernels', CHUNK_PREFETCH.)
template <bool STREAM = false, typename C, typename T, typename A, int ELEMS>
__device__ __forceinline__ void load_chunk(const C& chunk, const T* pred, const T* target, const A* row_stats,
                                           int64_t n_cols, int norm_target, A inv_t,
                                           A (&x)[ELEMS], A (&t)[ELEMS], RowStats<A>& s, A& max_x, A& max_t,
                                           const uint4* raw_x = nullptr, const uint4* raw_t = nullptr) {
    const int64_t offset = chunk.row * n_cols;
    if (raw_x) C::unpack(raw_x, x);
    else chunk.template load<STREAM>(pred + offset, n_cols, neg_inf<A>(), x);
    if (target && raw_t) C::unpack(raw_t, t);
    else if (target) chunk.template load<STREAM>(target + offset, n_cols, norm_target ? neg_inf<A>() : A(0), t);
    scale_by(x, inv_t);
    if (norm_target) scale_by(t, inv_t);
    const A* row = row_stats + 4 * chunk.row;
    s = RowStats<A>{0, 0, 0, 0};
    max_x = row[0], s.log_sum_x = row[1];
    max_t = norm_target ? row[2] : A(0), s.log_sum_t = norm_target ? row[3] : A(0);
    s.template prepare<ElementMath<T>>();
}

// q and g of one element of reverse KL or JSD in a chunk (x: pred minus the row max, t: the
// target, minus its row max when norm_target), adding its term of E_row to `error`.
template <typename M, typename A>
__device__ __forceinline__ void divergence_terms(const Divergence<A>& d, A x, A t, bool at_label,
                                                 const int64_t* labels, int norm_target, const RowStats<A>& s,
                                                 A& q, A& g, A& error) {
    A p, log_p;
    target_element<M, false>(t, A(0), at_label, labels, norm_target, s, p, log_p);
    const A log_q = x - s.log_sum_x;
    q = M::exp(log_q);
    g = divergence_element<M>(d, log_q, q, log_p, p, error);
}

// Reverse KL and JSD on long rows, between kl_chunk_stats and kl_chunk_grad: each chunk's
// DivergenceTotals (for the row's S - g) and the sum of its error terms, CHUNK_SUMS doubles a chunk.
constexpr int CHUNK_SUMS = 4;
template <typename T, int THREADS, int ELEMS>
__device__ __forceinline__ void kl_chunk_sums(const T* __restrict__ pred, const T* __restrict__ target,
                                              const int64_t* __restrict__ labels,
                                              const typename ComputeType<T>::type* __restrict__ row_stats,
                                              double* __restrict__ sums, double inv_temperature, int64_t n_rows,
                                              int64_t n_cols, int64_t chunks_per_row, int norm_target,
                                              int divergence, double beta) {
    using C = Chunk<T, THREADS, ELEMS>;
    using A = typename C::A;
    const A inv_t = A(inv_temperature);
    const Divergence<A> d(divergence, beta);
    for (int64_t turn = blockIdx.x; turn < n_rows * chunks_per_row; turn += gridDim.x) {
        const int64_t block = chunk_in_order(turn, n_rows * chunks_per_row, CHUNKS_BACK_AND_FORTH);
        const C chunk(block, chunks_per_row, pred, target, nullptr, n_cols);
        A x[ELEMS], t[ELEMS], max_x, max_t;
        RowStats<A> row;
        load_chunk(chunk, pred, target, row_stats, n_cols, norm_target, inv_t, x, t, row, max_x, max_t);
        const int64_t label = labels ? labels[chunk.row] : -1;
        const int label_k = chunk.label_index(label);

        DivergenceSums<A> mine;
        A error = 0;
#pragma unroll
        for (int k = 0; k < ELEMS; ++k) {
            A q, g;
            divergence_terms<ElementMath<T>>(d, x[k] - max_x, norm_target ? t[k] - max_t : t[k],
                                             k == label_k, labels, norm_target, row, q, g, error);
            mine.add(q, g);
        }
        const DivergenceTotals<A> totals = group_totals<THREADS>(mine);
        const double chunk_error = group_reduce<THREADS>(double(error), Sum());
        if (threadIdx.x == 0) {
            double* out = sums + CHUNK_SUMS * block;
            out[0] = totals.light_qg, out[1] = totals.light_q, out[2] = totals.heavy_g, out[3] = chunk_error;
        }
    }
}

// grad of the chunks, and the batch error.
template <typename T, int THREADS, int ELEMS>
__device__ __forceinline__ void kl_chunk_grad(const T* __restrict__ pred, const T* __restrict__ target,
                                              const int64_t* __restrict__ labels,
                                              const typename ComputeType<T>::type* __restrict__ weights,
                                              const typename ComputeType<T>::type* __restrict__ row_stats,
                                              const double* __restrict__ sums, T* __restrict__ grad,
                                              double* __restrict__ block_sums, unsigned* __restrict__ ticket,
                                              double* __restrict__ batch_error, double* __restrict__ accumulator,
                                              double error_scale, double grad_scale, double inv_temperature,
                                              int64_t n_rows, int64_t n_cols, int64_t chunks_per_row,
                                              int norm_target, int divergence, double beta) {
    using C = Chunk<T, THREADS, ELEMS>;
    using A = typename C::A;
    const A inv_n = A(grad_scale);      // grad = (p - q) * inv_n: a multiply per element, not a divide
    const A inv_t = A(inv_temperature);
    const Divergence<A> d(divergence, beta);
    // This thread's share of the errors of the block's chunks, added over the block once, at the
    // end (a block reduction in double a chunk cost 2.6 SASS instructions an element on sm_90).
    double thread_error = 0;
    const int64_t count = n_rows * chunks_per_row;
    const bool backward = CHUNKS_BACK_AND_FORTH && divergence == FORWARD;
    // (CHUNK_PREFETCH: the block's next chunk, and its raw vectors, loaded a turn ahead; the chunk
    // kept, so that its row and index, a 64-bit division, are found once)
    constexpr bool PREFETCH = CHUNK_PREFETCH<T, ELEMS>;
    C next(typename C::InRow{0, 0}, pred, target, grad, n_cols);
    uint4 next_x[C::VECS], next_t[C::VECS];
    auto load_next = [&](int64_t turn) {
        if (turn >= count) return;
        next = C(chunk_in_order(turn, count, backward), chunks_per_row, pred, target, grad, n_cols);
        const int64_t offset = next.row * n_cols;
        next.template load_raw<CHUNK_GRAD_STREAMS>(pred + offset, n_cols, neg_inf<A>(), next_x);
        if (target)
            next.template load_raw<CHUNK_GRAD_STREAMS>(target + offset, n_cols, norm_target ? neg_inf<A>() : A(0),
                                                       next_t);
    };
    if constexpr (PREFETCH) load_next(blockIdx.x);
    for (int64_t turn = blockIdx.x; turn < count; turn += gridDim.x) {
        const int64_t block = chunk_in_order(turn, count, backward);
        const C chunk = PREFETCH ? next : C(block, chunks_per_row, pred, target, grad, n_cols);
        A x[ELEMS], t[ELEMS], max_x, max_t;
        RowStats<A> row;
        if constexpr (PREFETCH) {   // (this chunk's vectors unpacked, then the next one's loads)
            load_chunk(chunk, pred, target, row_stats, n_cols, norm_target, inv_t, x, t, row, max_x, max_t, next_x,
                       next_t);
            load_next(turn + gridDim.x);
        } else {
            load_chunk<CHUNK_GRAD_STREAMS>(chunk, pred, target, row_stats, n_cols, norm_target, inv_t, x, t, row,
                                           max_x, max_t);
        }
        const int64_t offset = chunk.row * n_cols;
        const int64_t label = labels ? labels[chunk.row] : -1;
        const A w = (labels && label < 0) ? A(0) : (weights && label >= 0) ? weights[label] : A(1);
        const bool ignored = ignored_row(labels, label);
        const int label_k = chunk.label_index(label);

        A error = 0;   // this thread's terms, summed in A before the chunk's sum in double
        if (divergence == FORWARD) {   // (uniform over the launch)
            // With norm_target, the row's (log_sum_x - log_sum_t) * sum p, sum p = 1 (kl_element),
            // from thread 0 of its first chunk.
            // Probabilities: q becomes sum p q (take_target_sum; kl_chunk_rows' TARGET_SUM), its
            // row's term from there too.
            A row_term = 0;
            if (!labels && norm_target) row_term = row.log_sum_x - row.log_sum_t;
            else if (target && !labels) row_term = take_target_sum<ElementMath<T>, false>(row, row_stats[4 * chunk.row + 3]);
            if (chunk.index == 0 && threadIdx.x == 0) error = row_term;
#pragma unroll
            for (int k = 0; k < ELEMS; ++k)
                x[k] = kl_element<ElementMath<T>, false>(x[k] - max_x, norm_target ? t[k] - max_t : t[k], A(0),
                                                         A(0), k == label_k, labels, norm_target, row,
                                                         w * inv_n, error);
        } else {   // reverse KL or JSD: the row's totals from kl_chunk_sums, in a fixed order
            const double* row_sums = sums + CHUNK_SUMS * chunk.row * chunks_per_row;
            DivergenceTotals<A> mine{0, 0, neg_inf<A>()};   // (this thread's chunks')
#pragma unroll 1
            for (int64_t c = threadIdx.x; c < chunks_per_row; c += THREADS) {
                const double* in = row_sums + CHUNK_SUMS * c;
                mine = mine + DivergenceTotals<A>{in[0], in[1], A(in[2])};
            }
            const DivergenceFactors<A> row_factors(group_totals<THREADS>(mine));
            A unused = 0;
#pragma unroll
            for (int k = 0; k < ELEMS; ++k) {
                A q, g;
                divergence_terms<ElementMath<T>>(d, x[k] - max_x, norm_target ? t[k] - max_t : t[k],
                                                 k == label_k, labels, norm_target, row, q, g, unused);
                x[k] = row_factors.grad(q * (w * inv_n), g);
            }
        }   // (the chunk's error comes from kl_chunk_sums, below)
        zero_if_ignored(ignored, x, error);
        if (grad) chunk.template store<CHUNK_GRAD_STREAMS ? STREAMING : WRITE_BACK>(grad + offset, n_cols, x);
        if (divergence == FORWARD) thread_error += double(error) * double(w);
        else if (threadIdx.x == 0 && !ignored) thread_error += sums[CHUNK_SUMS * block + 3] * double(w);
    }
    finish_batch_error<THREADS>(group_reduce<THREADS>(thread_error, Sum()), block_sums, ticket, batch_error,
                                accumulator, error_scale);
}

}  // namespace plc

// ---------------------------------------------------------------------------------
// Entry points: one extern "C" name per (dtype, shape class) the host may launch.
// The host's table in puzzlelib_cost/backends/cuda_backend.py must list the same.
// ---------------------------------------------------------------------------------
#define PLC_ROW_BLOCK_THREADS(G) ((G) < plc::ROW_BLOCK ? plc::ROW_BLOCK : (G))
// Blocks an SM must hold at once: 512 threads, so that ptxas has 128 registers a thread and
// neither spills (as it did at the 96 its own heuristic chose for 32 elements a thread) nor
// takes so many that the SM holds too few rows to hide memory latency.
#define PLC_ROW_MIN_BLOCKS(G) (512 / PLC_ROW_BLOCK_THREADS(G))

// The cost model's build (see common.cuh) also fixes the mode, PLC_COST_MODEL_MODE = 0 (target
// probabilities), 1 (normTarget) or 2 (labels), and the divergence, PLC_COST_MODEL_DIVERGENCE
// (plc::DivergenceKind; forward unless given), so that each case's loop is straight-line code.
#ifdef PLC_COST_MODEL
#define PLC_ASSUME(condition) __builtin_assume(condition)
#ifndef PLC_COST_MODEL_DIVERGENCE
#define PLC_COST_MODEL_DIVERGENCE 0
#endif
#else
#define PLC_ASSUME(condition)
#endif
// (the target's statistics the chunked kernels take in that mode: row_softmax.TARGET_*)
#define PLC_COST_MODEL_TARGET_STATS \
    (PLC_COST_MODEL_MODE == 1 ? 1 : PLC_COST_MODEL_MODE == 0 && PLC_COST_MODEL_DIVERGENCE == 0 ? 2 : 0)
#define PLC_ASSUME_MODE(target, labels, norm_target)              \
    PLC_ASSUME(norm_target == (PLC_COST_MODEL_MODE == 1));        \
    PLC_ASSUME((labels != nullptr) == (PLC_COST_MODEL_MODE == 2)); \
    PLC_ASSUME((target != nullptr) == (PLC_COST_MODEL_MODE != 2))

#define PLC_KL_ROWS(T, NAME, G, E) PLC_KL_ROWS_KERNEL(T, G, E, VECTORS, false, kl_rows_##NAME##_g##G##_e##E)
#define PLC_KL_ROWS_PREFETCH(T, NAME, G, E) \
    PLC_KL_ROWS_KERNEL(T, G, E, PREFETCHED, false, kl_rows_##NAME##_g##G##_e##E##_prefetch)
#define PLC_KL_ROWS_TILE(T, NAME, E) PLC_KL_ROWS_KERNEL(T, 1, E, TILED, false, kl_rows_##NAME##_g1_e##E##_tile)
#define PLC_KL_ROWS_NORMT(T, NAME, G, E) \
    PLC_KL_ROWS_KERNEL(T, G, E, VECTORS, true, kl_rows_##NAME##_g##G##_e##E##_normt)
#define PLC_KL_ROWS_PREFETCH_NORMT(T, NAME, G, E) \
    PLC_KL_ROWS_KERNEL(T, G, E, PREFETCHED, true, kl_rows_##NAME##_g##G##_e##E##_prefetch_normt)
// How a "_normt" prefetching row kernel loads its rows: on sm_100 and later, its own vector loads
// (VECTORS) for blocks of 128, whose prefetching body spilled there (12 B at 128 registers;
// nothing on sm_80 and sm_90): the entry point keeps its name and arguments (the host's shared
// memory for the copies goes unused), and runs as the plain kernel's normTarget twin would.
namespace plc {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 1000
constexpr bool SM100_OR_LATER = true;
#else
constexpr bool SM100_OR_LATER = false;
#endif
template <RowLoad LOAD, bool NORMT, int G>
constexpr RowLoad NORMT_LOAD = SM100_OR_LATER && NORMT && LOAD == PREFETCHED && G == 128 ? VECTORS : LOAD;
}  // namespace plc
#define PLC_KL_ROWS_KERNEL(T, G, E, LOAD, NORMT, KERNEL)                                                     \
    extern "C" __global__ void __launch_bounds__(PLC_ROW_BLOCK_THREADS(G), PLC_ROW_MIN_BLOCKS(G))          \
        KERNEL(const T* pred, const T* target, const int64_t* labels,                                      \
                                     const plc::ComputeType<T>::type* weights, T* grad, double* block_sums, \
                                     unsigned* ticket, double* batch_error, double* accumulator,           \
                                     double error_scale, double grad_scale, double inv_temperature,        \
                                     int64_t n_rows, int64_t n_cols, int norm_target, int divergence,      \
                                     double beta) {                                                        \
        PLC_ASSUME_MODE(target, labels, norm_target);                                                      \
        PLC_ASSUME(weights == nullptr);   /* the cost model times KLDivergence */                       \
        PLC_ASSUME(inv_temperature == 1.0);                                                                \
        PLC_ASSUME(divergence == PLC_COST_MODEL_DIVERGENCE);                                               \
        plc::kl_rows<T, G, E, plc::NORMT_LOAD<plc::LOAD, NORMT, G>, NORMT>(pred, target, labels, weights,   \
                                              grad, block_sums, ticket,                                    \
                                              batch_error, accumulator, error_scale, grad_scale,           \
                                              inv_temperature, n_rows, n_cols, norm_target, divergence,    \
                                              beta);                                                       \
    }

// MIN_BLOCKS: the blocks of a chunked kernel an SM must hold at once, so that one block's loads
// are in flight while others compute (each block waits for its chunk's loads, computes, then
// stores): four for float32 (a thousand threads, at most 64 registers each), three for 16-bit
// inputs (whose blocks load their next chunk while they compute this one: CHUNK_PREFETCH) and
// for double (at 64 registers sm_100 spilled).  (ptxas's own choice gave kl_chunk_grad_f32 149
// registers once its statistics came from kl_chunk_rows: one block an SM.)
#define PLC_KL_CHUNKS(T, NAME, THREADS, E, MIN_BLOCKS)                                                           \
    extern "C" __global__ void __launch_bounds__(THREADS, MIN_BLOCKS)                                            \
        kl_chunk_stats_##NAME(const T* pred, const T* target, plc::ComputeType<T>::type* stats,                  \
                              double inv_temperature, int64_t n_rows, int64_t n_cols, int64_t chunks_per_row,    \
                              int target_stats) {                                                                \
        PLC_ASSUME(target_stats == PLC_COST_MODEL_TARGET_STATS);                                                 \
        PLC_ASSUME(inv_temperature == 1.0);                                                                      \
        plc::kl_chunk_stats<T, THREADS, E>(pred, target, stats, inv_temperature, n_rows, n_cols, chunks_per_row, \
                                           target_stats);                                                        \
    }                                                                                                            \
    extern "C" __global__ void __launch_bounds__(THREADS, MIN_BLOCKS)                                            \
        kl_chunk_rows_##NAME(const plc::ComputeType<T>::type* chunk_stats, plc::ComputeType<T>::type* row_stats, \
                             int64_t n_rows, int64_t chunks_per_row, int target_stats) {                         \
        PLC_ASSUME(target_stats == PLC_COST_MODEL_TARGET_STATS);                                                 \
        plc::kl_chunk_rows<T, THREADS>(chunk_stats, row_stats, n_rows, chunks_per_row, target_stats);            \
    }                                                                                                            \
    extern "C" __global__ void __launch_bounds__(THREADS, MIN_BLOCKS)                                            \
        kl_chunk_grad_##NAME(const T* pred, const T* target, const int64_t* labels,                              \
                             const plc::ComputeType<T>::type* weights,                                           \
                             const plc::ComputeType<T>::type* row_stats,                                         \
                             const double* sums, T* grad, double* block_sums, unsigned* ticket,                  \
                             double* batch_error, double* accumulator, double error_scale, double grad_scale,    \
                             double inv_temperature, int64_t n_rows, int64_t n_cols, int64_t chunks_per_row,     \
                             int norm_target, int divergence, double beta) {                                     \
        PLC_ASSUME_MODE(target, labels, norm_target);                                                            \
        PLC_ASSUME(weights == nullptr);                                                                          \
        PLC_ASSUME(inv_temperature == 1.0);                                                                      \
        PLC_ASSUME(divergence == PLC_COST_MODEL_DIVERGENCE);                                                     \
        plc::kl_chunk_grad<T, THREADS, E>(pred, target, labels, weights, row_stats, sums, grad, block_sums,      \
                                          ticket, batch_error, accumulator, error_scale, grad_scale,             \
                                          inv_temperature, n_rows, n_cols, chunks_per_row, norm_target,          \
                                          divergence, beta);                                                     \
    }                                                                                                            \
    extern "C" __global__ void __launch_bounds__(THREADS, MIN_BLOCKS)                                            \
        kl_chunk_sums_##NAME(const T* pred, const T* target, const int64_t* labels,                              \
                             const plc::ComputeType<T>::type* row_stats, double* sums, double inv_temperature,   \
                             int64_t n_rows, int64_t n_cols, int64_t chunks_per_row, int norm_target,            \
                             int divergence, double beta) {                                                      \
        PLC_ASSUME_MODE(target, labels, norm_target);                                                            \
        PLC_ASSUME(inv_temperature == 1.0);                                                                      \
        PLC_ASSUME(divergence == PLC_COST_MODEL_DIVERGENCE);                                                     \
        plc::kl_chunk_sums<T, THREADS, E>(pred, target, labels, row_stats, sums, inv_temperature, n_rows,        \
                                          n_cols, chunks_per_row, norm_target, divergence, beta);                \
    }

// Row kernels for 32- and 16-bit inputs: G threads per row, E elements each; a row of C
// elements fits when C + slack <= G * E (see cuda_backend.row_slack).  Short rows take one
// thread each: no shuffles at all.
#define PLC_KL_ROWS_ALL(T, NAME)                                                          \
    PLC_KL_ROWS(T, NAME, 1, 8) PLC_KL_ROWS(T, NAME, 1, 16)                                 \
    PLC_KL_ROWS(T, NAME, 8, 8) PLC_KL_ROWS(T, NAME, 16, 8)                                 \
    PLC_KL_ROWS(T, NAME, 32, 8) PLC_KL_ROWS(T, NAME, 32, 32)                               \
    PLC_KL_ROWS(T, NAME, 128, 16) PLC_KL_ROWS(T, NAME, 128, 32)                            \
    PLC_KL_ROWS(T, NAME, 512, 16) PLC_KL_ROWS(T, NAME, 512, 32)

// Rows of 17 to 32 elements: four threads for float, one for 16-bit inputs (a float row of 32
// in one thread needs too many registers).
PLC_KL_ROWS_ALL(float, f32) PLC_KL_ROWS(float, f32, 4, 8)
PLC_KL_ROWS_ALL(__nv_bfloat16, bf16) PLC_KL_ROWS(__nv_bfloat16, bf16, 1, 32)
// PLC_TRY_CHUNK_E32 (a build to measure, benchmarks/try_choices.py's "chunk_e32"; not the
// library's): the chunked kernels of float32 and 16-bit inputs take 32 elements a thread, not 16,
// at two blocks an SM (128 registers), not four: half as many chunks, so half the work done once
// a chunk (a row's statistics read, the warps' reductions, the 64-bit chunk index) an element, at
// half the warps to hide latency with.  The host must cut rows into chunks of 256 x 32 elements
// (row_softmax.CHUNK_ELEMS, which the choice sets).
// 16-bit inputs (PLC_CHUNK16_MIN_BLOCKS): three blocks an SM at 16 elements a thread, the registers
// of the next chunk's vectors besides this one's (CHUNK_PREFETCH; row_softmax.CHUNK_GRID_BLOCKS_PER_SM,
// the grid the host caps them at, must be the same); at 32 they do not prefetch, and take float32's.
#ifdef PLC_TRY_CHUNK_E32
#define PLC_CHUNK_E 32
#define PLC_CHUNK_MIN_BLOCKS 2
#define PLC_CHUNK16_MIN_BLOCKS 2
#else
#define PLC_CHUNK_E 16
#define PLC_CHUNK_MIN_BLOCKS 4
#define PLC_CHUNK16_MIN_BLOCKS 3
#endif
PLC_KL_CHUNKS(float, f32, 256, PLC_CHUNK_E, PLC_CHUNK_MIN_BLOCKS)
PLC_KL_CHUNKS(__nv_bfloat16, bf16, 256, PLC_CHUNK_E, PLC_CHUNK16_MIN_BLOCKS)
// Prefetching row kernels (row_softmax.PREFETCH_KERNELS; it takes PREFETCHED_KERNELS), for the
// benchmark's dtypes: a warp a row of up to 1024, a block of 128 a row of up to 4096.  (A thread a
// row of up to 16 lost to the tiled twin on the H100: benchmarks/NOTES.md, "The second loan".)
#define PLC_KL_ROWS_PREFETCH_ALL(T, NAME) \
    PLC_KL_ROWS_PREFETCH(T, NAME, 32, 32) PLC_KL_ROWS_PREFETCH(T, NAME, 128, 32)
PLC_KL_ROWS_PREFETCH_ALL(float, f32)
PLC_KL_ROWS_PREFETCH_ALL(__nv_bfloat16, bf16)
// Tiled row kernels (row_softmax.TILE_KERNELS, the library's): a thread a row of up to 16.
PLC_KL_ROWS_TILE(float, f32, 16) PLC_KL_ROWS_TILE(__nv_bfloat16, bf16, 16)
// normTarget forward KL's kernels (NORMT; row_softmax.NORMT_KERNELS): the float32 and 16-bit row
// kernels of groups of 32 elements a thread, and bfloat16's prefetching twins of them.
#define PLC_KL_ROWS_NORMT_ALL(T, NAME) \
    PLC_KL_ROWS_NORMT(T, NAME, 32, 32) PLC_KL_ROWS_NORMT(T, NAME, 128, 32) PLC_KL_ROWS_NORMT(T, NAME, 512, 32)
PLC_KL_ROWS_NORMT_ALL(float, f32) PLC_KL_ROWS_NORMT_ALL(__nv_bfloat16, bf16)
PLC_KL_ROWS_PREFETCH_NORMT(__nv_bfloat16, bf16, 32, 32) PLC_KL_ROWS_PREFETCH_NORMT(__nv_bfloat16, bf16, 128, 32)

#ifndef PLC_COST_MODEL   // (the cost model covers the benchmark's float32 and bfloat16 only)
PLC_KL_ROWS_ALL(__half, f16) PLC_KL_ROWS(__half, f16, 1, 32) PLC_KL_ROWS_NORMT_ALL(__half, f16)
PLC_KL_CHUNKS(__half, f16, 256, PLC_CHUNK_E, PLC_CHUNK16_MIN_BLOCKS)

// double: half the elements per thread, since each takes two registers.
PLC_KL_ROWS(double, f64, 4, 8) PLC_KL_ROWS(double, f64, 8, 8) PLC_KL_ROWS(double, f64, 16, 8)
PLC_KL_ROWS(double, f64, 32, 8) PLC_KL_ROWS(double, f64, 128, 8) PLC_KL_ROWS(double, f64, 256, 8)
PLC_KL_ROWS(double, f64, 512, 8)
PLC_KL_CHUNKS(double, f64, 256, 8, 3)
#endif
