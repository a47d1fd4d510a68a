// CrossEntropy on spatial scores (N, C, S) (S = H W ... > 1), and the top-1 error rate of
// CrossEntropy and SVM.  The softmax runs over dim 1, a strided row: C values S elements apart.
// One thread takes one (n, s) position and neighbouring threads neighbouring positions, so each
// of a thread's C loads is coalesced with its warp's.  (2-D scores, S = 1, go to the row kernels
// of kl_divergence.cu: CE with labels is KL against a one-hot target.)
//
// Per position, with q = softmax over C and the label y:
//     error term = w_y (log sum exp(x - max) - (x_y - max))      = -w_y log q_y
//     grad_c     = w_y (1[c = y] - q_c) * grad_scale              (the NEGATIVE gradient, 1 / (N S))
// CMAX > 0: rows of up to CMAX classes stay in registers, so pred is read once (4 / 2 B per
// element, plus 4 B per position for the label) and grad written once.  CMAX = 0: any C, pred
// read twice (statistics, then gradient; the second read of a block's rows mostly hits L1/L2).
#include "common.cuh"

namespace plc {

constexpr int STRIDED_THREADS = 256;

template <typename T, int CMAX>
__device__ __forceinline__ void cross_entropy_strided(
        const T* __restrict__ scores, const int32_t* __restrict__ labels,
        const typename ComputeType<T>::type* __restrict__ weights, T* __restrict__ grad,
        double* __restrict__ block_sums, unsigned* __restrict__ ticket, double* __restrict__ batch_error,
        double* __restrict__ accumulator, double error_scale, int64_t positions, int64_t classes, int64_t inner,
        double grad_scale_) {
    using A = typename ComputeType<T>::type;
    const A grad_scale = A(grad_scale_);
    double sum = 0;
    for (int64_t pos = int64_t(blockIdx.x) * STRIDED_THREADS + threadIdx.x; pos < positions;
         pos += int64_t(gridDim.x) * STRIDED_THREADS) {
        const int64_t offset = (pos / inner) * classes * inner + pos % inner;
        const T* x = scores + offset;
        const int32_t y = labels[pos];
        const A w = weights ? weights[y] : A(1);

        // Running max and sum of exp(x - max) over the classes (NaN-propagating max, as NumPy).
        A kept[CMAX > 0 ? CMAX : 1];
        A m = lowest<A>(), z = 0;
        auto add = [&](A v) { online_softmax_add(m, z, v); };
        if constexpr (CMAX > 0) {
#pragma unroll
            for (int c = 0; c < CMAX; ++c) {
                if (c < classes) {
                    kept[c] = widen(x[c * inner]);
                    add(kept[c]);
                }
            }
        } else {
            for (int64_t c = 0; c < classes; ++c) add(widen(x[c * inner]));
        }
        const A log_z = log_(z), inv_z = A(1) / z;
        A x_y;
        if constexpr (CMAX > 0) {
            x_y = 0;
#pragma unroll
            for (int c = 0; c < CMAX; ++c) x_y = c == y ? kept[c] : x_y;   // (a register, not a local array)
        } else {
            x_y = widen(x[y * inner]);
        }
        sum += double(w) * double(log_z - (x_y - m));

        if (grad) {
            T* g = grad + offset;
            const A scale = w * grad_scale;
            auto gradient = [&](int64_t c, A v) {
                g[c * inner] = narrow<T>(((c == y ? A(1) : A(0)) - exp_(v - m) * inv_z) * scale);
            };
            if constexpr (CMAX > 0) {
#pragma unroll
                for (int c = 0; c < CMAX; ++c)
                    if (c < classes) gradient(c, kept[c]);
            } else {
                for (int64_t c = 0; c < classes; ++c) gradient(c, widen(x[c * inner]));
            }
        }
    }
    finish_batch_error<STRIDED_THREADS>(group_reduce<STRIDED_THREADS>(sum, Sum()), block_sums, ticket, batch_error,
                                        accumulator, error_scale);
}

// Top-1 errors over dim 1 (CrossEntropy's and SVM's validate): adds 1 per position whose first
// maximal class (NaN counting as maximal, as numpy.argmax) is not its label, and writes that class
// to most_prob[position] (PuzzleLib's mostProb).
template <typename T>
__device__ __forceinline__ void top1_errors(const T* __restrict__ scores, const int32_t* __restrict__ labels,
                                            int32_t* __restrict__ most_prob, double* __restrict__ block_sums, unsigned* __restrict__ ticket,
                                            double* __restrict__ batch_error, double* __restrict__ accumulator,
                                            double error_scale, int64_t positions, int64_t classes, int64_t inner) {
    using A = typename ComputeType<T>::type;
    double sum = 0;
    for (int64_t pos = int64_t(blockIdx.x) * STRIDED_THREADS + threadIdx.x; pos < positions;
         pos += int64_t(gridDim.x) * STRIDED_THREADS) {
        const T* x = scores + (pos / inner) * classes * inner + pos % inner;
        A best = widen(x[0]);
        int64_t arg = 0;
        for (int64_t c = 1; c < classes; ++c) {
            const A v = widen(x[c * inner]);
            if (v > best || (v != v && best == best)) best = v, arg = c;
        }
        most_prob[pos] = int32_t(arg);
        sum += arg != labels[pos] ? 1.0 : 0.0;
    }
    finish_batch_error<STRIDED_THREADS>(group_reduce<STRIDED_THREADS>(sum, Sum()), block_sums, ticket, batch_error,
                                        accumulator, error_scale);
}

}  // namespace plc

// Entry points (the host's table: puzzlelib_cost/cross_entropy.py).
#define PLC_CE_STRIDED(T, SUFFIX, CMAX)                                                                          \
    extern "C" __global__ void __launch_bounds__(plc::STRIDED_THREADS, 1)                                           \
        cross_entropy_strided_##SUFFIX##_c##CMAX(const T* scores, const int32_t* labels,                         \
                                                 const plc::ComputeType<T>::type* weights, T* grad,              \
                                                 double* block_sums, unsigned* ticket, double* batch_error,      \
                                                 double* accumulator, double error_scale, int64_t positions,     \
                                                 int64_t classes, int64_t inner, double grad_scale) {            \
        plc::cross_entropy_strided<T, CMAX>(scores, labels, weights, grad, block_sums, ticket, batch_error,      \
                                            accumulator, error_scale, positions, classes, inner, grad_scale);    \
    }
#define PLC_STRIDED_ALL(T, SUFFIX)                                                                               \
    PLC_CE_STRIDED(T, SUFFIX, 8) PLC_CE_STRIDED(T, SUFFIX, 32) PLC_CE_STRIDED(T, SUFFIX, 0)                      \
    extern "C" __global__ void __launch_bounds__(plc::STRIDED_THREADS, 1)                                           \
        top1_errors_##SUFFIX(const T* scores, const int32_t* labels, int32_t* most_prob, double* block_sums,    \
                             unsigned* ticket,                                                                   \
                             double* batch_error, double* accumulator, double error_scale, int64_t positions,   \
                             int64_t classes, int64_t inner) {                                                   \
        plc::top1_errors<T>(scores, labels, most_prob, block_sums, ticket, batch_error, accumulator, error_scale, \
                            positions, classes, inner);                                                          \
    }

#ifndef PLC_COST_MODEL   // (the cost model times the KL kernels only)
PLC_STRIDED_ALL(float, f32)
PLC_STRIDED_ALL(double, f64)
PLC_STRIDED_ALL(__half, f16)
PLC_STRIDED_ALL(__nv_bfloat16, bf16)
#endif
