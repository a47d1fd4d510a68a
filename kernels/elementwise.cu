// Elementwise costs fused with their gradient: one pass reads pred (and target, or an integer
// label) once and writes grad once; each block adds its terms in double and the last block sums
// the blocks' sums in a fixed order (finish_batch_error): no atomics on floats, bitwise
// reproducible.
//
// One scaffold, `elementwise`, and one small Op per cost.  Op::term(a, b, label, i, geometry, g)
// returns the element's error term and sets g to the element's NEGATIVE gradient before the
// grad_scale factor (1 / M, the mean over the batch's elements).  error_scale (passed through to
// finish_batch_error) turns the sum of terms into the summed per-sample error.
// NaN in gives NaN out: every max/step below keeps a NaN (NumPy's maximum does the same).
// WIDE ops take their differences in double for 16- and 32-bit inputs: a - b of two finite floats
// (or bfloats) can pass float's range, and d^2 does from |d| = 1.8e19 (E and grad were inf where
// both are finite numbers); the grad is scaled in double and rounded to float once.
// The NumPy twins of these ops are in puzzlelib_cost/elementwise_costs.py; keep them in step.
#include "common.cuh"

namespace plc {

constexpr int ELEMENTWISE_THREADS = 256;

// The batch's layout, for ops that find their label from the element's index.
struct Geometry {
    int64_t size;      // M: elements of pred
    int64_t row;       // D: elements per sample
    int64_t classes;   // C: shape[1]
    int64_t inner;     // S: prod(shape[2:])
};

template <typename A> __device__ __forceinline__ A sign_(A d) {   // sign(0) = 0, sign(NaN) = NaN
    return d > A(0) ? A(1) : d < A(0) ? A(-1) : d == A(0) ? A(0) : d;
}
template <typename A> __device__ __forceinline__ A relu_(A m) { return m > A(0) ? m : (m == m ? A(0) : m); }
// v where m > 0, 0 where m <= 0, NaN where m is NaN.
template <typename A> __device__ __forceinline__ A step_(A m, A v) { return m > A(0) ? v : (m == m ? A(0) : m); }
// log(1 + exp(z)) without overflow, exact for large |z|.
template <typename A> __device__ __forceinline__ A softplus_(A z) {
    return max_(z, A(0)) + log1p(exp_(-fabs(z)));
}

// --- pred against a float target of the same shape -----------------------------------------
struct Abs {        // |d|, -sign(d)
    static constexpr bool PAIR = true, LABELS = false, WIDE = true;
    template <typename A> static __device__ __forceinline__ A term(A a, A b, int32_t, int64_t, const Geometry&, A& g) {
        const A d = a - b;
        g = -sign_(d);
        return fabs(d);
    }
};
struct MSE {        // d^2 (error_scale carries the 1/2), -d
    static constexpr bool PAIR = true, LABELS = false, WIDE = true;
    template <typename A> static __device__ __forceinline__ A term(A a, A b, int32_t, int64_t, const Geometry&, A& g) {
        const A d = a - b;
        g = -d;
        return d * d;
    }
};
struct SmoothL1 {   // Huber with threshold 1: d^2 / 2 inside, |d| - 1/2 outside
    static constexpr bool PAIR = true, LABELS = false, WIDE = true;
    template <typename A> static __device__ __forceinline__ A term(A a, A b, int32_t, int64_t, const Geometry&, A& g) {
        const A d = a - b, ad = fabs(d);
        const bool inside = ad < A(1);
        g = inside ? -d : -sign_(d);
        return inside ? A(0.5) * d * d : ad - A(0.5);
    }
};

// --- pred against integer labels --------------------------------------------------------------
// logits s, labels y in {0, 1}: softplus(z), z = (1 - 2y) s (-s or s); y - sigmoid(s) as
// (2y - 1) sigmoid(z), since 1 - sigmoid(s) = sigmoid(-s): taken from exp(-|s|) <= 1 directly,
// never as a difference (1 - 0.9999546 kept 3 digits at s = 10, and gave 0 from s = 17 on).
struct BCE {
    static constexpr bool PAIR = false, LABELS = true, WIDE = false;
    static __device__ __forceinline__ int64_t label_index(int64_t i, const Geometry&) { return i; }
    template <typename A> static __device__ __forceinline__ A term(A s, A, int32_t y, int64_t, const Geometry&, A& g) {
        const A z = y ? -s : s;
        const A e = exp_(-fabs(s));   // sigmoid from exp(-|z|) <= 1: never overflows
        const A sigmoid_z = z >= A(0) ? A(1) / (A(1) + e) : (z < A(0) ? e / (A(1) + e) : z);   // (NaN kept)
        g = y ? sigmoid_z : -sigmoid_z;
        return softplus_(z);
    }
};
struct BCERate {    // the error rate: y == 1 ? s <= 0 : s > 0 (validate only)
    static constexpr bool PAIR = false, LABELS = true, WIDE = false;
    static __device__ __forceinline__ int64_t label_index(int64_t i, const Geometry&) { return i; }
    template <typename A> static __device__ __forceinline__ A term(A s, A, int32_t y, int64_t, const Geometry&, A& g) {
        g = A(0);
        return (y ? s <= A(0) : s > A(0)) ? A(1) : A(0);
    }
};
struct Hinge {      // y in {-1, 0, 1}: max(0, 1 - s y); y where s y < 1
    static constexpr bool PAIR = false, LABELS = true, WIDE = false;
    static __device__ __forceinline__ int64_t label_index(int64_t i, const Geometry&) { return i; }
    template <typename A> static __device__ __forceinline__ A term(A s, A, int32_t y, int64_t, const Geometry&, A& g) {
        const A m = A(1) - s * A(y);
        g = step_(m, A(y));
        return relu_(m);
    }
};
template <bool SQUARED>
struct SVM {        // one-vs-all: cls = +1 at the label's class, -1 elsewhere; h = max(0, 1 - s cls)
    static constexpr bool PAIR = false, LABELS = true, WIDE = SQUARED;   // (h^2 and 2 h: wide)
    // pred (N, C, S), labels (N, S): the label of element (n, c, s) is labels[n * S + s].
    static __device__ __forceinline__ int64_t label_index(int64_t i, const Geometry& g) {
        return (i / g.row) * g.inner + i % g.inner;
    }
    template <typename A> static __device__ __forceinline__ A term(A s, A, int32_t y, int64_t i, const Geometry& geo,
                                                                  A& g) {
        const A cls = (i / geo.inner) % geo.classes == y ? A(1) : A(-1);
        const A m = A(1) - s * cls;
        g = step_(m, SQUARED ? A(2) * m * cls : cls);
        return SQUARED ? step_(m, m * m) : relu_(m);
    }
};

// --- a pair of inputs against a label per sample: L1Hinge -----------------------------------
struct L1Hinge {    // d = x1 - x2; y = 1 (same): |d|; y = 0: max(0, 1 - |d|).  grad of x1; x2 gets -grad
    static constexpr bool PAIR = true, LABELS = true, WIDE = true;
    static __device__ __forceinline__ int64_t label_index(int64_t i, const Geometry& g) { return i / g.row; }
    template <typename A> static __device__ __forceinline__ A term(A a, A b, int32_t y, int64_t, const Geometry&, A& g) {
        const A d = a - b, ad = fabs(d);
        if (y) {
            g = -sign_(d);
            return ad;
        }
        g = step_(A(1) - ad, sign_(d));
        return relu_(A(1) - ad);
    }
};

template <typename T, typename Op>
__device__ __forceinline__ void elementwise(const T* __restrict__ a, const T* __restrict__ b,
                                            const int32_t* __restrict__ labels, T* __restrict__ grad,
                                            T* __restrict__ grad2, double* __restrict__ block_sums,
                                            unsigned* __restrict__ ticket, double* __restrict__ batch_error,
                                            double* __restrict__ accumulator, double error_scale, const Geometry g,
                                            double grad_scale_) {
    using A = typename ComputeType<T>::type;
    using W = typename std::conditional<Op::WIDE, double, A>::type;   // the op's arithmetic
    constexpr int VEC = Vec<T>::size;
    const W grad_scale = W(grad_scale_);
    // The arrays start on 16-byte boundaries (fresh allocations do): whole vectors move in one
    // access; otherwise one element at a time.
    auto on16 = [](const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; };
    const bool aligned = on16(a) && (!Op::PAIR || on16(b)) && (!grad || on16(grad)) && (!grad2 || on16(grad2));
    const int64_t vectors = (g.size + VEC - 1) / VEC;

    // This thread's terms, each added in double as it comes: terms near the top of float's range
    // (MSE's d^2, BCE's softplus of a logit of 3e38) overflowed a float partial sum of a vector's
    // VEC terms, and large terms swallowed small ones there (|d| of 1e8 and 1).
    double sum = 0;
    for (int64_t v = int64_t(blockIdx.x) * ELEMENTWISE_THREADS + threadIdx.x; v < vectors;
         v += int64_t(gridDim.x) * ELEMENTWISE_THREADS) {
        const int64_t start = v * VEC;
        A x[VEC], y[VEC], out[VEC];
        load_vec(a, start, g.size, aligned, A(0), x);
        if (Op::PAIR) load_vec(b, start, g.size, aligned, A(0), y);
#pragma unroll
        for (int k = 0; k < VEC; ++k) {
            const int64_t i = start + k;
            out[k] = 0;
            if (i < g.size) {
                int32_t label = 0;
                if constexpr (Op::LABELS) label = labels[Op::label_index(i, g)];
                W grad_k;
                sum += double(Op::term(W(x[k]), Op::PAIR ? W(y[k]) : W(0), label, i, g, grad_k));
                out[k] = A(grad_k * grad_scale);
            }
        }
        if (grad) store_vec(grad, start, g.size, aligned, out);
        if (grad2) {   // L1Hinge: x2's gradient is -grad
#pragma unroll
            for (int k = 0; k < VEC; ++k) out[k] = -out[k];
            store_vec(grad2, start, g.size, aligned, out);
        }
    }
    finish_batch_error<ELEMENTWISE_THREADS>(group_reduce<ELEMENTWISE_THREADS>(sum, Sum()), block_sums, ticket,
                                            batch_error, accumulator, error_scale);
}

// L1Hinge's validation: per sample, the pair is predicted "same" when mean |x1 - x2| <= 1; adds 1
// for each sample where that differs from its label.  One thread per sample, D in order.
template <typename T>
__device__ __forceinline__ void l1hinge_rate(const T* __restrict__ a, const T* __restrict__ b,
                                             const int32_t* __restrict__ labels, double* __restrict__ block_sums,
                                             unsigned* __restrict__ ticket, double* __restrict__ batch_error,
                                             double* __restrict__ accumulator, double error_scale, int64_t n,
                                             int64_t row) {
    double sum = 0;
    for (int64_t r = int64_t(blockIdx.x) * ELEMENTWISE_THREADS + threadIdx.x; r < n;
         r += int64_t(gridDim.x) * ELEMENTWISE_THREADS) {
        double distance = 0;
        // (Not unrolled: ptxas spilled the unrolled loop's 64-bit addresses on sm_80.)
#pragma unroll 1
        for (int64_t j = 0; j < row; ++j) distance += fabs(double(widen(a[r * row + j])) - double(widen(b[r * row + j])));
        sum += ((distance / double(row) <= 1.0) != (labels[r] != 0)) ? 1.0 : 0.0;
    }
    finish_batch_error<ELEMENTWISE_THREADS>(group_reduce<ELEMENTWISE_THREADS>(sum, Sum()), block_sums, ticket,
                                            batch_error, accumulator, error_scale);
}

}  // namespace plc

// Entry points: elementwise_<op>_<dtype>, all with the same parameters (the host's table is
// puzzlelib_cost/elementwise_costs.py), and l1hinge_rate_<dtype>.
#define PLC_ELEMENTWISE(OP, NAME, T, SUFFIX)                                                                   \
    extern "C" __global__ void __launch_bounds__(plc::ELEMENTWISE_THREADS, 1)                                     \
        elementwise_##NAME##_##SUFFIX(const T* a, const T* b, const int32_t* labels, T* grad, T* grad2,         \
                                      double* block_sums, unsigned* ticket, double* batch_error,              \
                                      double* accumulator, double error_scale, int64_t size, int64_t row,     \
                                      int64_t classes, int64_t inner, double grad_scale) {                    \
        plc::elementwise<T, OP>(a, b, labels, grad, grad2, block_sums, ticket, batch_error, accumulator,      \
                                error_scale, plc::Geometry{size, row, classes, inner}, grad_scale);          \
    }

#define PLC_ELEMENTWISE_ALL(T, SUFFIX)                                                                         \
    PLC_ELEMENTWISE(plc::Abs, abs, T, SUFFIX) PLC_ELEMENTWISE(plc::MSE, mse, T, SUFFIX)                        \
    PLC_ELEMENTWISE(plc::SmoothL1, smoothl1, T, SUFFIX) PLC_ELEMENTWISE(plc::BCE, bce, T, SUFFIX)              \
    PLC_ELEMENTWISE(plc::BCERate, bce_rate, T, SUFFIX) PLC_ELEMENTWISE(plc::Hinge, hinge, T, SUFFIX)           \
    PLC_ELEMENTWISE(plc::SVM<false>, svm_l1, T, SUFFIX) PLC_ELEMENTWISE(plc::SVM<true>, svm_l2, T, SUFFIX)     \
    PLC_ELEMENTWISE(plc::L1Hinge, l1hinge, T, SUFFIX)                                                          \
    extern "C" __global__ void __launch_bounds__(plc::ELEMENTWISE_THREADS, 1)                                     \
        l1hinge_rate_##SUFFIX(const T* a, const T* b, const int32_t* labels, double* block_sums,               \
                              unsigned* ticket, double* batch_error, double* accumulator, double error_scale, \
                              int64_t n, int64_t row) {                                                       \
        plc::l1hinge_rate<T>(a, b, labels, block_sums, ticket, batch_error, accumulator, error_scale, n, row); \
    }

#ifndef PLC_COST_MODEL   // (the cost model times the KL kernels only)
PLC_ELEMENTWISE_ALL(float, f32)
PLC_ELEMENTWISE_ALL(double, f64)
PLC_ELEMENTWISE_ALL(__half, f16)
PLC_ELEMENTWISE_ALL(__nv_bfloat16, bf16)
#endif
