// Shared device helpers for the cost kernels: compute types and conversions,
// 16-byte row loads/stores that stay correct on misaligned rows, and warp/block
// reductions.  Header-only and __device__ only: launches live in host code.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <float.h>
#include <stdint.h>
#include <string.h>

#include <type_traits>

namespace plc {

constexpr unsigned FULL_MASK = 0xffffffffu;
constexpr int WARP = 32;

// ---------------------------------------------------------------------------------
// Types: 16-bit and 32-bit inputs are computed in float, double inputs in double.
// ---------------------------------------------------------------------------------
template <typename T> struct ComputeType { using type = float; };
template <> struct ComputeType<double> { using type = double; };

__device__ __forceinline__ float widen(float v) { return v; }
__device__ __forceinline__ double widen(double v) { return v; }
__device__ __forceinline__ float widen(__half v) { return __half2float(v); }
__device__ __forceinline__ float widen(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> __device__ __forceinline__ T narrow(typename ComputeType<T>::type v);
template <> __device__ __forceinline__ float narrow<float>(float v) { return v; }
template <> __device__ __forceinline__ double narrow<double>(double v) { return v; }
template <> __device__ __forceinline__ __half narrow<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 narrow<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// Full-precision math in either type (no fast-math: subnormal probabilities must keep their logarithms).
__device__ __forceinline__ float exp_(float x) { return expf(x); }
__device__ __forceinline__ double exp_(double x) { return exp(x); }
__device__ __forceinline__ float log_(float x) { return logf(x); }
__device__ __forceinline__ double log_(double x) { return log(x); }
__device__ __forceinline__ float log1p_(float x) { return log1pf(x); }
__device__ __forceinline__ double log1p_(double x) { return log1p(x); }
// 2^x by the hardware's ex2.approx.ftz.f32 alone (one MUFU.EX2): the non-ftz ex2.approx that
// __expf and exp2f compile to wraps it in a compare and two predicated multiplies that make
// subnormal results, three instructions more.  Its callers (FastMath) keep every argument whose
// result they need at or above -126, where nothing is flushed.  Inline PTX cannot run in the
// CPU emulation (tests/cuda_emulation), so there it is exp2f, exact, flushed the same way: the
// emulation checks everything around it (the offset, the scalings), only not the hardware's
// approximation, as for __expf and __logf.
__device__ __forceinline__ float exp2_ftz(float x) {
#ifdef CUDA_EMULATION_ARCH
    const float r = exp2f(x);
    return r < FLT_MIN ? 0.0f : r;
#else
    float r;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(x));
    return r;
#endif
}

// The exponential and logarithm of the per-element work (q, p and log p), by input type.  float
// and double inputs keep the full-precision functions above.  For 16-bit inputs the hardware
// approximations:
// - exp_scaled(x) = 2^24 exp(x) (EXP_SCALE = 2^24) as ex2.approx.ftz of fma(x, log2(e), 24): two
//   instructions.  For x <= 0 (every use: exponents shifted by a max, log q, log p, softplus's)
//   the argument x log2(e) + 24 lies in [-126, 24] wherever 2^24 exp(x) is normal, i.e. wherever
//   exp(x) >= 2^-150 is not 0 in float: a sum of such terms and q = e * (1 / sum of e) or
//   e * 2^-24 (exp) are rounded once each, subnormals included, with the scale exact (a power of
//   2).  The fma's rounding is at most half an ulp of |x log2(e) + 24|: 2^-20 for x log2(e) in
//   [-48, 0], 2^-18 below (where exp(x) < 2^-48), i.e. a relative error of exp(x) of 6.6e-7
//   (2.6e-6 below 2^-48), plus ex2.approx's 2 ulp and log2(e)'s rounding (2^-25 |x log2(e)|);
//   __expf (ex2.approx of x * log2(e) with subnormal fix-ups) was within 2 + 1.17 |x| ulp, 3e-6
//   at |x| = 20: the same order.  Exact range: x < 72 (2^(x log2 e + 24) overflows beyond).
// - log is __logf: lg2.approx times ln 2, within 2^-21.4 absolute on [0.5, 2] and 3 ulp
//   elsewhere, subnormal arguments included (no -ftz anywhere).
// Both stay orders of magnitude inside the rounding of a 16-bit grad (2^-9 relative for bfloat16,
// 2^-12 for float16), and each of the error's terms p (log p - log q) moves by less than 3e-6 of
// itself (through p), the row's log-sum by less than 1e-6 absolute (its sum is dominated by
// terms within 2^-48 of its largest).
// log1p for 16-bit inputs is __logf(1 + x): for x < 2^-24 that is 0 instead of x, an absolute
// error below 6e-8, far inside a 16-bit result's rounding.
// rcp, 1 / x, is __fdividef(1, x) for 16-bit inputs: MUFU.RCP, within 1 ulp where 1 / x is
// normal (|x| < 2^126; it is 0 beyond, where the IEEE quotient would be subnormal), against the
// IEEE division's Newton steps and slow-path branch.
// exp_minus(x, exp_minus_arg(c)) is exp(x - c), c a row's constant (a log-sum >= 0) made ready
// once: exp_(x - c) for float and double; for 16-bit inputs the subtraction goes into the fma of
// exp_scaled: ex2.approx.ftz(fma(x, log2(e), 24 - c log2(e))) * 2^-24, one instruction fewer.
// 24 - c log2(e) is rounded once (an fma), to 2^-20 absolute for c <= 17 (rows of up to 2^24
// elements), so the exponent is off by at most 2^-19 more than exp's: 1.3e-6 relative in all.
template <typename T> struct ElementMath {
    static constexpr float EXP_SCALE = 1.0f;
    template <typename A> static __device__ __forceinline__ A exp(A x) { return exp_(x); }
    template <typename A> static __device__ __forceinline__ A exp_minus_arg(A c) { return c; }
    template <typename A> static __device__ __forceinline__ A exp_minus(A x, A arg) { return exp_(x - arg); }
    template <typename A> static __device__ __forceinline__ A exp_scaled(A x) { return exp_(x); }
    template <typename A> static __device__ __forceinline__ A log(A x) { return log_(x); }
    template <typename A> static __device__ __forceinline__ A log1p(A x) { return log1p_(x); }
    template <typename A> static __device__ __forceinline__ A rcp(A x) { return A(1) / x; }
};
struct FastMath {
    static constexpr float EXP_SCALE = 16777216.0f;   // 2^24
    static __device__ __forceinline__ float exp_scaled(float x) {
        return exp2_ftz(fmaf(x, 1.44269504088896341f, 24.0f));
    }
    static __device__ __forceinline__ float exp(float x) { return exp_scaled(x) * (1.0f / EXP_SCALE); }
    static __device__ __forceinline__ float exp_minus_arg(float c) { return fmaf(-c, 1.44269504088896341f, 24.0f); }
    static __device__ __forceinline__ float exp_minus(float x, float arg) {
        return exp2_ftz(fmaf(x, 1.44269504088896341f, arg)) * (1.0f / EXP_SCALE);
    }
    static __device__ __forceinline__ float log(float x) { return __logf(x); }
    static __device__ __forceinline__ float log1p(float x) { return __logf(1.0f + x); }
    static __device__ __forceinline__ float rcp(float x) { return __fdividef(1.0f, x); }
};
template <> struct ElementMath<__half> : FastMath {};
template <> struct ElementMath<__nv_bfloat16> : FastMath {};

// A max that propagates NaN, as NumPy's does (fmaxf would drop it): a NaN logit must poison
// its row's statistics in every kernel path, not only through the sum of exponentials.
template <typename A> __device__ __forceinline__ A max_(A a, A b) { return (a > b || a != a) ? a : b; }

template <typename A> __device__ __forceinline__ A neg_inf() { return -INFINITY; }

// The lowest finite value: where a running max starts whose sum of exp(x - max) is built one
// value at a time (online_softmax_add).  From -inf, a first value of -inf would add
// exp(-inf - -inf) = exp(NaN); from the lowest finite value it adds exp(-inf) = 0, and any
// other value becomes the max at once.
template <typename A> __device__ __forceinline__ A lowest();
template <> __device__ __forceinline__ float lowest<float>() { return -FLT_MAX; }
template <> __device__ __forceinline__ double lowest<double>() { return -DBL_MAX; }

// s * exp(m - M): a partial sum of exp(x - m) moved to the reference M >= m.
// An empty partial (s == 0, m may be -inf) stays 0 instead of becoming 0 * exp(NaN);
// a NaN partial stays NaN.
template <typename A> __device__ __forceinline__ A rescale(A s, A m, A M) {
    return s == A(0) ? A(0) : s * exp_(m - M);
}

// a * b rounded on its own, never contracted into a later add: x / T as x * (1 / T) before a
// max is subtracted.  Fused into x * inv_t - max, the exact product less the rounded max would
// leave the largest value a positive residual of up to half an ulp of x / T, whose exponential
// overflows once |x / T| >= 2^31 (as the CPU's compiled rows once did: E = -inf, grad NaN).
__device__ __forceinline__ float mul_rounded(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ double mul_rounded(double a, double b) { return __dmul_rn(a, b); }

// One value v into a running max m (started at lowest<A>()) and sum z of exp(x - m): the
// strided rows of cross_entropy.cu and ctc.cu, which see their values one at a time.  -inf
// values add 0 wherever they come (a zero probability), NaN poisons both (max_ keeps it).
template <typename A> __device__ __forceinline__ void online_softmax_add(A& m, A& z, A v) {
    const A m_new = max_(m, v);
    z = rescale(z, m, m_new) + exp_(v - m_new);
    m = m_new;
}

// ---------------------------------------------------------------------------------
// Rows in 16-byte pieces.  A row of `cols` elements is read as vectors of VEC
// elements whose first element sits at position `start` (possibly < 0 or past the
// end: those slots are padding).  When the caller says the row's vectors are
// 16-byte aligned, whole in-row vectors move with one 16-byte access; edge
// vectors and unaligned rows fall back to one element at a time.
// ---------------------------------------------------------------------------------
template <typename T> struct Vec { static constexpr int size = 16 / sizeof(T); };

// benchmarks/cost_model.py compiles the kernels with PLC_COST_MODEL defined to count the
// instructions of the path that whole, aligned vectors take: every vector is taken as such, so
// the edge code drops out of the machine code.  Such a build computes wrong results; it is only
// disassembled.
#ifdef PLC_COST_MODEL
#define PLC_INTERIOR(condition) true
#else
#define PLC_INTERIOR(condition) (condition)
#endif

// How many elements `row` sits past the previous 16-byte boundary.
template <typename T> __device__ __forceinline__ int misalignment(const T* row) {
    return static_cast<int>((reinterpret_cast<uintptr_t>(row) % 16) / sizeof(T));
}

// The VEC values of type T in 16 bytes, widened to A.
template <typename T, typename A> __device__ __forceinline__ void unpack_vec(uint4 raw, A* out) {
    constexpr int VEC = Vec<T>::size;
    if constexpr (std::is_same<T, __nv_bfloat16>::value) {
        // A bfloat16 is the high half of its float: a shift for the low element of each word
        // and a mask for the high one, the same bits as widen() (which takes a byte permute
        // and a shift for the high one): one instruction an element instead of 1.5.
        auto widen_word = [&](int i, unsigned word) {
            out[2 * i] = __uint_as_float(word << 16);
            out[2 * i + 1] = __uint_as_float(word & 0xffff0000u);
        };
        widen_word(0, raw.x), widen_word(1, raw.y), widen_word(2, raw.z), widen_word(3, raw.w);
    } else {
        T vals[VEC];
        memcpy(vals, &raw, sizeof(raw));
#pragma unroll
        for (int i = 0; i < VEC; ++i) out[i] = widen(vals[i]);
    }
}

// VEC values narrowed to T, in 16 bytes (exact for values widened from T).
template <typename T, typename A> __device__ __forceinline__ uint4 pack_vec(const A* in) {
    constexpr int VEC = Vec<T>::size;
    T vals[VEC];
#pragma unroll
    for (int i = 0; i < VEC; ++i) vals[i] = narrow<T>(in[i]);
    uint4 raw;
    memcpy(&raw, vals, sizeof(raw));
    return raw;
}

// STREAM: a load whose data is not read again (__ldcs: first to leave L2), so that data a kernel
// will read a second time stays there (kl_cluster_stream_*).
template <bool STREAM = false, typename T, typename A>
__device__ __forceinline__ void load_vec(const T* row, int64_t start, int64_t cols, bool aligned, A pad, A* out) {
    constexpr int VEC = Vec<T>::size;
    if (PLC_INTERIOR(aligned && start >= 0 && start + VEC <= cols)) {
        const uint4* at = reinterpret_cast<const uint4*>(row + start);
        unpack_vec<T>(STREAM ? __ldcs(at) : *at, out);
    } else {
#pragma unroll
        for (int i = 0; i < VEC; ++i) {
            const int64_t col = start + i;
            out[i] = (col >= 0 && col < cols) ? widen(row[col]) : pad;
        }
    }
}

// How store_vec stores whole vectors.  PLAIN: an ordinary store.  WRITE_BACK: __stwb, a plain,
// write-back store that is always one 16-byte instruction: in kl_cluster_* and kl_chunk_grad_*
// nvcc 13.0 sank grad's multiply into the ordinary store and split it into four 4-byte stores;
// in kl_rows_* the asm would instead cost registers (kl_rows_f32_g512_e32 spilled), so they keep
// the plain store.  STREAMING: __stcs, one instruction too, whose lines are the first to leave L2
// (kl_cluster_stream_*, which needs L2 for data it reads twice).
enum StoreKind { PLAIN, WRITE_BACK, STREAMING };
template <StoreKind HOW = PLAIN, typename T, typename A>
__device__ __forceinline__ void store_vec(T* row, int64_t start, int64_t cols, bool aligned, const A* in) {
    constexpr int VEC = Vec<T>::size;
    if (PLC_INTERIOR(aligned && start >= 0 && start + VEC <= cols)) {
        const uint4 raw = pack_vec<T>(in);
        uint4* at = reinterpret_cast<uint4*>(row + start);
        if constexpr (HOW == WRITE_BACK) __stwb(at, raw);
        else if constexpr (HOW == STREAMING) __stcs(at, raw);
        else *at = raw;
    } else {
#pragma unroll
        for (int i = 0; i < VEC; ++i) {
            const int64_t col = start + i;
            if (col >= 0 && col < cols) row[col] = narrow<T>(in[i]);
        }
    }
}

// ---------------------------------------------------------------------------------
// Reductions over a group of G threads: G <= 32 consecutive lanes of a warp, or,
// when G > 32, the whole block (blockDim.x == G).  Every thread of the block calls
// them the same number of times; each thread gets its group's result.  The order
// of operations is fixed, so results are bitwise reproducible.
// ---------------------------------------------------------------------------------
struct Sum { template <typename A> __device__ __forceinline__ A operator()(A a, A b) const { return a + b; } };
struct Max { template <typename A> __device__ __forceinline__ A operator()(A a, A b) const { return max_(a, b); } };

template <int WIDTH, typename A, typename Op>
__device__ __forceinline__ A warp_reduce(A v, Op op) {
#pragma unroll
    for (int offset = WIDTH / 2; offset > 0; offset /= 2) v = op(v, __shfl_xor_sync(FULL_MASK, v, offset, WIDTH));
    return v;
}

template <int G, typename A, typename Op>
__device__ __forceinline__ A group_reduce(A v, Op op) {
    static_assert(G >= 1 && G <= 1024 && (G & (G - 1)) == 0, "group size must be a power of two <= 1024");
    if constexpr (G <= WARP) {
        return warp_reduce<G>(v, op);
    } else {
        constexpr int WARPS = G / WARP;
        __shared__ A partials[WARPS];
        const int warp = threadIdx.x / WARP, lane = threadIdx.x % WARP;
        v = warp_reduce<WARP>(v, op);
        __syncthreads();   // the previous reduction of this kind has finished reading `partials`
        if (lane == 0) partials[warp] = v;
        __syncthreads();   // every warp's partial is written
        // Each group of WARPS lanes reduces all the partials, so every lane of every warp
        // ends with the block's result without a third barrier.
        return warp_reduce<WARPS>(partials[lane % WARPS], op);
    }
}

// Two reductions of one group at once, sharing group_reduce's two barriers (CTC's occupancies
// of a frame and their blank part: two barriers where two calls took four); each result is the
// bits group_reduce gives it alone (the same operations in the same order).
template <int G, typename A, typename Op>
__device__ __forceinline__ void group_reduce_pair(A& x, A& y, Op op) {
    static_assert(G >= 1 && G <= 1024 && (G & (G - 1)) == 0, "group size must be a power of two <= 1024");
    if constexpr (G <= WARP) {
        x = warp_reduce<G>(x, op);
        y = warp_reduce<G>(y, op);
    } else {
        constexpr int WARPS = G / WARP;
        __shared__ A partials[2][WARPS];
        const int warp = threadIdx.x / WARP, lane = threadIdx.x % WARP;
        x = warp_reduce<WARP>(x, op);
        y = warp_reduce<WARP>(y, op);
        __syncthreads();   // the previous pair reduction has finished reading `partials`
        if (lane == 0) {
            partials[0][warp] = x;
            partials[1][warp] = y;
        }
        __syncthreads();   // every warp's partials are written
        x = warp_reduce<WARPS>(partials[0][lane % WARPS], op);
        y = warp_reduce<WARPS>(partials[1][lane % WARPS], op);
    }
}

// ---------------------------------------------------------------------------------
// The batch error in the same launch.  Each block passes its sum (thread 0's value is
// the one used); the block that finishes last adds the blocks' sums in a fixed order (each
// thread a strided share, then a tree over the threads), so the result is bitwise reproducible without floating-point atomics, and
// writes batch_error = error_scale * that sum (accumulator += it when given); error_scale turns
// a cost's summed terms into its summed per-sample error (1 / D for a mean over D elements).  `ticket` is a zeroed word that
// only one launch uses at a time (one stream per device); the last block re-arms it.  GROUP > 1:
// only the first block of each GROUP in a row passes a sum, that of its group (one a cluster).
// ---------------------------------------------------------------------------------
template <int THREADS, int GROUP = 1>
__device__ __forceinline__ void finish_batch_error(double block_sum, double* __restrict__ block_sums,
                                                   unsigned* __restrict__ ticket, double* __restrict__ batch_error,
                                                   double* __restrict__ accumulator, double error_scale) {
    __shared__ bool last;
    if (threadIdx.x == 0) {
        block_sums[blockIdx.x / GROUP] = block_sum;
        __threadfence();   // this block's sum is visible to every block before its ticket counts
        last = atomicAdd(ticket, 1u) == gridDim.x / GROUP - 1;
    }
    __syncthreads();
    if (last) {   // (the same in every thread of the block: its barriers are safe)
        double sum = 0;
        for (unsigned b = threadIdx.x; b < gridDim.x / GROUP; b += THREADS) sum += __ldcg(&block_sums[b]);   // from L2
        sum = group_reduce<THREADS>(sum, Sum()) * error_scale;
        if (threadIdx.x == 0) {
            *batch_error = sum;
            if (accumulator) *accumulator += sum;
            *ticket = 0;
        }
    }
}

}  // namespace plc
