// Integer labels range-checked on the device (README, How the GPU path works): one pass reads the
// labels in their own dtype, writes them narrowed to the dtype the cost's kernels take (int32 for
// the elementwise and strided cross-entropy kernels, int64 for the row kernels), and records the
// first bad flat index, how many are bad and the first bad label, so that the host reads back 48
// bytes, not the labels.
//
// found[0] = the smallest flat index of a label outside [low, high) (UINT64_MAX: none), by
// atomicMin; found[1] = how many, by atomicAdd; found[2] = the label at found[0] (its value as a
// signed 64-bit integer's bits, an unsigned dtype's zero-extended), written by the block that
// finishes last (found[3] counts the blocks done); found[4] is check_distinct_columns' (below),
// found[5] the labels ignored (ignoreLabel's, below).  Integer atomics only, so the result does not
// depend on the order the threads run in.  The host sets found to {UINT64_MAX, 0, 0, 0, UINT64_MAX, 0} before the
// launch.  A bad label is narrowed as `low`, so that the kernels given these labels read in
// bounds whatever the host does with the answer (a training call reads it later: below).
//
// check_distinct_columns: a sparse teacher's column indices, checked (and narrowed to int64) as
// labels above, must also be distinct within each row: found[4] = the smallest row * n_cols + column
// of a column repeated in its row (UINT64_MAX: none), so the first such row and its smallest
// repeated column, whatever order the threads run in.
//
// commit_checked_labels: the end of a call whose answer the host reads later, see there.
// The host side is CudaBackend.checked_labels (puzzlelib_cost/backends/cuda_backend.py).
#include "common.cuh"

namespace plc {

constexpr int LABEL_THREADS = 256;

// A label as a signed 64-bit value, and whether it fits one.  Every dtype but uint64 does; a uint64
// above INT64_MAX is out of every range the costs ask (high <= INT64_MAX), and must not wrap to a
// negative number that a negative low would let through.  BOOL: the byte of a bool mask, any
// nonzero byte read as 1 (as NumPy's astype(np.uint8) of a bool array does: a mask made by viewing
// other bytes, 0/255 say, holds bytes other than 0 and 1).
template <typename In, bool BOOL> __device__ __forceinline__ bool as_int64(In v, int64_t& out) {
    if constexpr (BOOL) {
        out = v != In(0);
        return true;
    } else {
        if constexpr (std::is_same<In, unsigned long long>::value) {
            if (v > (unsigned long long)(INT64_MAX)) return false;
        }
        out = int64_t(v);
        return true;
    }
}

template <typename In> __device__ __forceinline__ unsigned long long label_bits(In v) {
    if constexpr (std::is_signed<In>::value) return (unsigned long long)(long long)(v);   // sign-extended
    else return (unsigned long long)(v);                                                // zero-extended
}

// ignore_bits, where has_ignore: a label whose bits (label_bits; a bool mask's 0 or 1) are these is
// ignored (KLDivergence's ignoreLabel, as the host gives it in the labels' dtype): narrowed to -1,
// not range-checked, counted in found[5].
template <typename In, typename Out, bool BOOL>
__device__ __forceinline__ void check_labels(const In* __restrict__ labels, Out* __restrict__ narrowed,
                                             unsigned long long* __restrict__ found, int64_t n, int64_t low,
                                             int64_t high, unsigned long long ignore_bits, int has_ignore) {
    // A thread's indices only grow along the grid-stride loop, so its first bad one is its smallest.
    unsigned long long first = ~0ull, bad = 0, ignored = 0;
    for (int64_t i = int64_t(blockIdx.x) * LABEL_THREADS + threadIdx.x; i < n; i += int64_t(gridDim.x) * LABEL_THREADS) {
        const In raw = labels[i];
        int64_t v = 0;   // (0 for a uint64 that fits no int64)
        const bool fits = as_int64<In, BOOL>(raw, v);
        if (has_ignore && (BOOL ? (unsigned long long)(v) : label_bits(raw)) == ignore_bits) {
            ++ignored;
            v = -1;
        } else if (!fits || v < low || v >= high) {
            if (bad == 0) first = (unsigned long long)(i);
            ++bad;
            v = low;   // (in range for the kernels that read them; the host raises, now or later)
        }
        narrowed[i] = Out(v);
    }
    if (bad) {   // (rare: one pair of atomics per thread that saw a bad label)
        atomicMin(&found[0], first);
        atomicAdd(&found[1], bad);
    }
    if (ignored) atomicAdd(&found[5], ignored);
    // The block that finishes last reads the first bad label (every block's atomics are done by
    // then: each thread's fence orders its atomics before its block's ticket).
    __shared__ bool last;
    __threadfence();
    __syncthreads();
    if (threadIdx.x == 0) last = atomicAdd(&found[3], 1ull) == gridDim.x - 1;
    __syncthreads();
    if (last && threadIdx.x == 0) {
        const unsigned long long count = atomicAdd(&found[1], 0ull), where = atomicAdd(&found[0], 0ull);
        if (count) found[2] = label_bits(labels[where]);
    }
}

// Each row of k_cols columns (the check above narrowed every one into [0, n_cols): a bad one is
// the low end, 0, and the host raises on the range first) marks its columns in a shared bitmap; an
// atomicOr that finds its bit set is a repeat.  Of a column held m >= 2 times in a row, m - 1 of its
// atomicOrs find the bit set whatever their order, so every repeated column is seen and the
// minimum is the same in every order.  A row clears only its own bits after it: the bitmap is
// zeroed once a block, not once a row (4008 words a row at 128256 columns; the row has k_cols).
constexpr int DISTINCT_BITMAP_WORDS = 8192;   // rows of up to 262144 columns (32 KB of shared memory)

__device__ __forceinline__ void check_distinct_columns(const int64_t* __restrict__ columns,
                                                       unsigned long long* __restrict__ found, int64_t n_rows,
                                                       int64_t k_cols, int64_t n_cols) {
    __shared__ unsigned seen[DISTINCT_BITMAP_WORDS];
    for (int64_t w = threadIdx.x; w < (n_cols + 31) / 32; w += LABEL_THREADS) seen[w] = 0;
    __syncthreads();
    unsigned long long first = ~0ull;
    for (int64_t row = blockIdx.x; row < n_rows; row += gridDim.x) {
        const int64_t* c = columns + row * k_cols;
        for (int64_t k = threadIdx.x; k < k_cols; k += LABEL_THREADS) {
            const int64_t v = c[k];
            const unsigned bit = 1u << (v % 32);
            if (atomicOr(&seen[v / 32], bit) & bit) first = min(first, (unsigned long long)(row * n_cols + v));
        }
        __syncthreads();   // (every mark of the row made before any is cleared)
        for (int64_t k = threadIdx.x; k < k_cols; k += LABEL_THREADS) seen[c[k] / 32] = 0;
        __syncthreads();
    }
    if (first != ~0ull) atomicMin(&found[4], first);
}

// The end of a call whose labels' answer the host reads later (a call that does not ask for its
// error: CudaBackend.checked_labels, _Work.finish): the call's kernels left their batch error in
// `held` instead of the cost's scalars.  With every label good, batch_error = *held and
// accumulator += *held (as finish_batch_error would have written them: the same bits); with a bad
// one, the accumulator stays as it was, batch_error too (or becomes NaN where nan_for_bad: a
// training step's, which nn's loss reads before the host raises: no stale error) and the call's
// `output` (its gradient) is zeroed, so that a bad batch adds nothing until the host raises its
// CostError.  held = 0: an output alone.  Every block reads found[1] and found[4] once; only with a
// bad label do they loop.  unscale (null: none): the rows' weight that weights_for_ignored_rows
// wrote, which the kernels multiplied every row's error by: the error committed is *held divided
// by it (0 where every row was ignored).
__device__ __forceinline__ void commit_checked_labels(const unsigned long long* __restrict__ found,
                                                      const double* __restrict__ held,
                                                      double* __restrict__ batch_error,
                                                      double* __restrict__ accumulator,
                                                      unsigned char* __restrict__ output, int64_t output_bytes,
                                                      int nan_for_bad, const double* __restrict__ unscale) {
    if (found[1] == 0 && found[4] == ~0ull) {
        if (held && blockIdx.x == 0 && threadIdx.x == 0) {
            double error = *held;
            if (unscale) error = *unscale != 0.0 ? error / *unscale : 0.0;
            *batch_error = error;
            if (accumulator) *accumulator += error;
        }
        return;
    }
    if (nan_for_bad && held && blockIdx.x == 0 && threadIdx.x == 0)
        *batch_error = __longlong_as_double(0x7ff8000000000000ll);
    for (int64_t i = int64_t(blockIdx.x) * LABEL_THREADS + threadIdx.x; i < output_bytes;
         i += int64_t(gridDim.x) * LABEL_THREADS)
        output[i] = 0;   // (bytes: any dtype, any size; this runs only for a bad batch)
}

// The rows' weight of a call whose ignored rows the host learns only later (KLDivergence's
// ignoreLabel in a training call): its kernels are launched with grad_scale 1 / (T N) and these
// class weights, every one N / counted (counted = N - found[5], the rows not ignored; 0 where none
// is), so that a row's grad is scaled by 1 / (T counted) as the host's count would have; `scale`
// gets the weight as the kernels read it, for commit_checked_labels to take it out of the error.
template <typename A>
__device__ __forceinline__ void weights_for_ignored_rows(const unsigned long long* __restrict__ found,
                                                         A* __restrict__ weights, double* __restrict__ scale,
                                                         int64_t n_cols, int64_t n_rows) {
    const int64_t counted = n_rows - int64_t(found[5]);
    const A w = counted > 0 ? A(double(n_rows) / double(counted)) : A(0);
    for (int64_t i = int64_t(blockIdx.x) * LABEL_THREADS + threadIdx.x; i < n_cols;
         i += int64_t(gridDim.x) * LABEL_THREADS)
        weights[i] = w;
    if (blockIdx.x == 0 && threadIdx.x == 0) *scale = double(w);
}

}  // namespace plc

// Entry points: check_labels_<in>_<out>, all with the same parameters.
#define PLC_CHECK_LABELS(IN, IN_SUFFIX, BOOL, OUT, OUT_SUFFIX)                                                  \
    extern "C" __global__ void __launch_bounds__(plc::LABEL_THREADS)                                         \
        check_labels_##IN_SUFFIX##_##OUT_SUFFIX(const IN* labels, OUT* narrowed, unsigned long long* found,   \
                                               int64_t n, int64_t low, int64_t high, int64_t ignore_bits,     \
                                               int has_ignore) {                                              \
        plc::check_labels<IN, OUT, BOOL>(labels, narrowed, found, n, low, high,                               \
                                         (unsigned long long)(ignore_bits), has_ignore);                      \
    }
#define PLC_CHECK_LABELS_TO(IN, IN_SUFFIX, BOOL) \
    PLC_CHECK_LABELS(IN, IN_SUFFIX, BOOL, int32_t, i32) PLC_CHECK_LABELS(IN, IN_SUFFIX, BOOL, int64_t, i64)

extern "C" __global__ void __launch_bounds__(plc::LABEL_THREADS)
    commit_checked_labels(const unsigned long long* found, const double* held, double* batch_error,
                          double* accumulator, unsigned char* output, int64_t output_bytes, int nan_for_bad,
                          const double* unscale) {
    plc::commit_checked_labels(found, held, batch_error, accumulator, output, output_bytes, nan_for_bad, unscale);
}

#ifndef PLC_COST_MODEL   // (the cost model times the KL kernels only)
#define PLC_WEIGHTS_FOR_IGNORED_ROWS(A, SUFFIX)                                                                  \
    extern "C" __global__ void __launch_bounds__(plc::LABEL_THREADS)                                         \
        weights_for_ignored_rows_##SUFFIX(const unsigned long long* found, A* weights, double* scale,         \
                                          int64_t n_cols, int64_t n_rows) {                                   \
        plc::weights_for_ignored_rows<A>(found, weights, scale, n_cols, n_rows);                              \
    }
PLC_WEIGHTS_FOR_IGNORED_ROWS(float, f32)
PLC_WEIGHTS_FOR_IGNORED_ROWS(double, f64)
extern "C" __global__ void __launch_bounds__(plc::LABEL_THREADS)
    check_distinct_columns(const int64_t* columns, unsigned long long* found, int64_t n_rows, int64_t k_cols,
                           int64_t n_cols) {
    plc::check_distinct_columns(columns, found, n_rows, k_cols, n_cols);
}
PLC_CHECK_LABELS_TO(int8_t, i8, false)
PLC_CHECK_LABELS_TO(int16_t, i16, false)
PLC_CHECK_LABELS_TO(int32_t, i32, false)
PLC_CHECK_LABELS_TO(long long, i64, false)
PLC_CHECK_LABELS_TO(uint8_t, u8, false)
PLC_CHECK_LABELS_TO(uint16_t, u16, false)
PLC_CHECK_LABELS_TO(uint32_t, u32, false)
PLC_CHECK_LABELS_TO(unsigned long long, u64, false)
PLC_CHECK_LABELS_TO(uint8_t, bool, true)
#endif
