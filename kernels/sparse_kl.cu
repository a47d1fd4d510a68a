// Forward KL of softmax(pred / T) from a sparse (top-k) teacher, fused with its gradient.
//
// Per row: K teacher entries (indices[k], values[k]): p_k = values (probabilities), or
// softmax_K(values / T) when norm_target, and s = sum_k p_k (1 when norm_target).  With
// q = softmax(pred / T) over the row's C columns and R = 1 - sum_k q[indices[k]] the student's
// mass outside the teacher's entries (summed over those columns themselves, not as 1 - sum:
// no cancellation when the teacher's entries hold nearly all of it):
//     drop    E_row = sum_k p_k (log p_k - log q[i_k])
//     bucket  E_row adds (1 - s)(log(1 - s) - log R)      (the teacher's missing mass as one class)
//     grad    = (target - q) * grad_scale, the target being p_k at the teacher's columns and, for
//               the others, 0 (drop; the members' q is then scaled by s) or (1 - s) q / R (bucket)
// with grad_scale = 1 / (T * N).  Exactly: drop's grad is p_k - s q at members and -s q elsewhere,
// and so is bucket's where s >= 1 (it adds nothing to E there).  Bucket keeps the other columns'
// own running (max, sum): R relative to the whole row's max, which the teacher's columns often
// hold, underflowed (logits 6 apart at T = 0.05: E = inf and a NaN grad for a finite answer), so
// log R = rest max + log(rest sum) - log z, and (1 - s) q / R = (1 - s) exp(v - rest max) / rest sum.
//
// One block per row: pred is read once for the softmax statistics and once more for grad
// (usually from L2, the row having just been read), the K entries once, grad written once.
// For bucket the block marks the teacher's columns in a shared-memory bitmap, so R is summed
// over the other columns in the same read.  Members' grads are written last, over the
// dense value, after a barrier.  The batch error: finish_batch_error (common.cuh).
#include "common.cuh"

namespace plc {

constexpr int SPARSE_THREADS = 512;
// bucket: one bit per column in shared memory, 32 KB: rows of up to 262144 columns.
constexpr int SPARSE_BITMAP_WORDS = 8192;

template <typename T, bool BUCKET>
__device__ __forceinline__ void sparse_kl(const T* __restrict__ pred, const int64_t* __restrict__ indices,
                                          const T* __restrict__ values, T* __restrict__ grad,
                                          double* __restrict__ block_sums, unsigned* __restrict__ ticket,
                                          double* __restrict__ batch_error, double* __restrict__ accumulator,
                                          double error_scale, double grad_scale, double inv_temperature,
                                          int64_t n_rows, int64_t n_cols, int64_t k_cols, int norm_target) {
    using A = typename ComputeType<T>::type;
    constexpr int THREADS = SPARSE_THREADS;
    const A inv_t = A(inv_temperature);
    const A scale = A(grad_scale);
    __shared__ unsigned member[BUCKET ? SPARSE_BITMAP_WORDS : 1];
    double block_error = 0;   // thread 0's sum of its block's rows
    for (int64_t row = blockIdx.x; row < n_rows; row += gridDim.x) {
        const T* x = pred + row * n_cols;
        const int64_t* idx = indices + row * k_cols;
        const T* val = values + row * k_cols;
        if constexpr (BUCKET) {
            for (int64_t w = threadIdx.x; w < (n_cols + 31) / 32; w += THREADS) member[w] = 0;
            __syncthreads();
            for (int64_t k = threadIdx.x; k < k_cols; k += THREADS) atomicOr(&member[idx[k] / 32], 1u << (idx[k] % 32));
            __syncthreads();
        }
        // Online (max, sum of exp(v - max)) of v = x / T per thread, and for bucket the same over
        // the non-members on their own.
        A m = neg_inf<A>(), s = 0, m_rest = lowest<A>(), s_rest = 0;
        for (int64_t j = threadIdx.x; j < n_cols; j += THREADS) {
            const A v = mul_rounded(widen(x[j]), inv_t);
            if (v == neg_inf<A>()) continue;   // exp(-inf) adds nothing (and -inf - -inf would be NaN)
            if (v > m) {
                s = s * exp_(m - v) + A(1);
                m = v;
            } else {   // (a NaN v lands here and poisons s, as it should)
                s += exp_(v - m);
            }
            if (BUCKET && !((member[j / 32] >> (j % 32)) & 1u)) online_softmax_add(m_rest, s_rest, v);
        }
        const A row_max = group_reduce<THREADS>(m, Max());
        const A log_z = log_(group_reduce<THREADS>(rescale(s, m, row_max), Sum()));
        A rest_max = 0, rest_sum = 0;
        if constexpr (BUCKET) {
            rest_max = group_reduce<THREADS>(m_rest, Max());   // (lowest<A>() where no other column counts)
            rest_sum = group_reduce<THREADS>(rescale(s_rest, m_rest, rest_max), Sum());
        }

        // The teacher: p_k and log p_k, then the error terms and s.
        A v_max = 0, v_log_sum = 0;
        if (norm_target) {
            A vm = neg_inf<A>();
            for (int64_t k = threadIdx.x; k < k_cols; k += THREADS) vm = max_(vm, mul_rounded(widen(val[k]), inv_t));
            v_max = group_reduce<THREADS>(vm, Max());
            A vs = 0;
            for (int64_t k = threadIdx.x; k < k_cols; k += THREADS) vs += exp_(mul_rounded(widen(val[k]), inv_t) - v_max);
            v_log_sum = log_(group_reduce<THREADS>(vs, Sum()));
        }
        auto teacher = [&](int64_t k, A& log_p) {
            if (norm_target) {
                log_p = mul_rounded(widen(val[k]), inv_t) - v_max - v_log_sum;
                return exp_(log_p);
            }
            const A p = widen(val[k]);
            log_p = log_(p);
            return p;
        };
        A error = 0, mass = 0;
        for (int64_t k = threadIdx.x; k < k_cols; k += THREADS) {
            A log_p;
            const A p = teacher(k, log_p);
            const A log_q = mul_rounded(widen(x[idx[k]]), inv_t) - row_max - log_z;
            if (p != A(0)) error += p * (log_p - log_q);   // 0 log 0 = 0; a NaN p poisons the sum
            mass += p;
        }
        double row_error = group_reduce<THREADS>(double(error), Sum());
        const A teacher_mass = norm_target ? A(1) : A(group_reduce<THREADS>(double(mass), Sum()));
        // drop, and bucket where s >= 1: -s q off the teacher's columns, p_k - s q on them
        A rest_factor = -teacher_mass, member_factor = teacher_mass, rest_weight = 0;
        if (BUCKET && !norm_target) {
            const A tail = max_(A(1) - teacher_mass, A(0));
            if (tail > A(0)) {
                const A log_rest = (rest_max - row_max) + log_(rest_sum) - log_z;
                row_error += double(tail * (log_(tail) - log_rest));
                rest_weight = tail / rest_sum;   // (1 - s) q / R = rest_weight * exp(v - rest_max)
                rest_factor = A(-1);
                member_factor = A(1);
            }
        }
        if (grad) {
            T* g = grad + row * n_cols;
            for (int64_t j = threadIdx.x; j < n_cols; j += THREADS) {
                const A v = mul_rounded(widen(x[j]), inv_t);
                // (the members' entries, overwritten below, may take an inf here: never read)
                const A to = BUCKET && rest_weight != A(0) ? rest_weight * exp_(v - rest_max) : A(0);
                g[j] = narrow<T>((to + exp_(v - row_max - log_z) * rest_factor) * scale);
            }
            __syncthreads();   // the dense values are written before the teacher's columns overwrite them
            for (int64_t k = threadIdx.x; k < k_cols; k += THREADS) {
                A log_p;
                const A p = teacher(k, log_p);
                const A q = exp_(mul_rounded(widen(x[idx[k]]), inv_t) - row_max - log_z);
                g[idx[k]] = narrow<T>((p - member_factor * q) * scale);
            }
        }
        __syncthreads();   // (the bitmap and the reductions' shared memory are reused by the next row)
        if (threadIdx.x == 0) block_error += row_error;
    }
    finish_batch_error<THREADS>(block_error, block_sums, ticket, batch_error, accumulator, error_scale);
}

}  // namespace plc

#define PLC_SPARSE_KL(T, NAME, BUCKET, TAIL)                                                                     \
    extern "C" __global__ void __launch_bounds__(plc::SPARSE_THREADS, 1)                                         \
        sparse_kl_##TAIL##_##NAME(const T* pred, const int64_t* indices, const T* values, T* grad,               \
                                  double* block_sums, unsigned* ticket, double* batch_error, double* accumulator, \
                                  double error_scale, double grad_scale, double inv_temperature, int64_t n_rows,  \
                                  int64_t n_cols, int64_t k_cols, int norm_target) {                             \
        plc::sparse_kl<T, BUCKET>(pred, indices, values, grad, block_sums, ticket, batch_error, accumulator,      \
                                  error_scale, grad_scale, inv_temperature, n_rows, n_cols, k_cols, norm_target); \
    }
#define PLC_SPARSE_KL_BOTH(T, NAME) PLC_SPARSE_KL(T, NAME, false, drop) PLC_SPARSE_KL(T, NAME, true, bucket)

#ifndef PLC_COST_MODEL
PLC_SPARSE_KL_BOTH(float, f32)
PLC_SPARSE_KL_BOTH(__nv_bfloat16, bf16)
PLC_SPARSE_KL_BOTH(__half, f16)
PLC_SPARSE_KL_BOTH(double, f64)
#endif
