#!/usr/bin/env python3
"""Benchmark of puzzlelib_cost.KLDivergence against its peers, on one GPU.

    python benchmarks/bench_kl.py --out DIR            # the full run (GPU machine, ~5 minutes)
    python benchmarks/bench_kl.py --quick --out DIR    # 3 shapes, fewer repetitions
    python benchmarks/bench_kl.py --dry-run --out DIR  # tiny sizes on the CPU: checks the script, not the speed

Writes DIR/results.json and DIR/results.png (when matplotlib is importable) and prints a
short table last.  What is measured, for every (N, C), dtype and normTarget:

  ours             KLDivergence(normTarget)(pred, target, queryError=False) on CUDA torch tensors
  torch_eager      log_softmax + F.kl_div(batchmean) forward, autograd backward to pred
  torch_compile    the same function under torch.compile (compiled once, outside the timing)
  liger            log_softmax + Liger-Kernel's LigerKLDIVLoss, forward + backward to pred
  puzzlelib_style  PuzzleLib's own pipeline: a softmax written to memory (of target too with
                   normTarget), then PuzzleLib's klDivergence reduction kernel (CuPy RawKernel)

Times are device times from CUDA events around each call, median of many runs after a
warm-up; bandwidth counts the ideal bytes (pred and target read once, grad written once)
and is compared with a large device-to-device copy measured in the same run.  A failure in
one case is recorded in results.json and the run goes on.
"""
import argparse
import datetime
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))   # measure this checkout's code, installed or not

SHAPES = [(65536, 10), (16384, 1000), (8192, 32000), (2048, 128256), (1024, 262144), (16, 1048576)]
QUICK_SHAPES = [(65536, 10), (16384, 1000), (2048, 128256)]   # small rows, one fused pass, two passes
DRY_SHAPES = [(64, 10), (16, 1000), (4, 3000)]
DTYPES = ["float32", "bfloat16"]
OVERHEAD_SHAPE = (32, 10)
IMPLS = ["ours", "torch_eager", "torch_compile", "liger", "puzzlelib_style"]
PEERS = IMPLS[1:]
SHORT = {"ours": "ours", "torch_eager": "eager", "torch_compile": "compile", "liger": "liger",
         "puzzlelib_style": "puzzlelib"}

# Repetitions: (warm-up runs, fewest timed runs, most timed runs, timed work aimed at per case and impl)
PLANS = {"full": (5, 20, 500, 0.10), "quick": (3, 10, 200, 0.03), "dry": (2, 5, 50, 0.02)}
OVERHEAD_CALLS = {"full": 2000, "quick": 500, "dry": 200}
COPY_BYTES = {"gpu": 2 << 30, "dry": 64 << 20}
BATCH = 25                    # timed runs queued behind one spin kernel (keeps the launch queue short)
L2_FALLBACK = 50 * 10 ** 6    # bytes, when torch does not report the L2 size
CHECK_TOL = {"float32": 1e-4, "bfloat16": 1e-2}   # ours' grad vs float64, relative to max |grad|


class Skip(Exception):
    """An implementation that cannot run here; its message is recorded as the reason."""


def err_text(exc):
    return f"{type(exc).__name__}: {str(exc).strip()}"[:600]


# ------------------------------------------------------------------------------------------
# Timers: CUDA events on the GPU, time.perf_counter in a dry run
# ------------------------------------------------------------------------------------------

class CudaTimer:
    """Device time of each call from a pair of CUDA events around it.

    Before each batch of runs a spin kernel (torch.cuda._sleep) is queued that lasts longer
    than the host needs to queue the batch, so the GPU then runs the calls back to back and
    each pair of events measures the call's kernels, not the host's launch latency (the
    overhead section measures that).  Where torch has no _sleep the events are recorded
    plainly and small calls include launch gaps (results.json says which).
    """
    def __init__(self, torch):
        self.torch = torch
        self.cycles_per_s = None
        try:
            for _ in range(2):   # the second measurement, once the clocks are up
                start, end = self._events()
                start.record()
                torch.cuda._sleep(20_000_000)
                end.record()
                end.synchronize()
                self.cycles_per_s = 20_000_000 / (start.elapsed_time(end) / 1e3)
        except Exception:
            self.cycles_per_s = None
        self.method = ("CUDA events around each call; a spin kernel queued ahead of every %d runs keeps the "
                       "host ahead of the GPU, so a time is the device time of the call's kernels" % BATCH
                       if self.cycles_per_s else
                       "CUDA events around each call (no torch.cuda._sleep: small calls include launch gaps)")

    def _events(self):
        event = self.torch.cuda.Event
        return event(enable_timing=True), event(enable_timing=True)

    def sync(self):
        self.torch.cuda.synchronize()

    def run_times(self, fn, runs, host_s):
        """Seconds of each of `runs` calls fn(0), fn(1), ...; host_s: host time to queue one call."""
        times, done = [], 0
        while done < runs:
            n = min(BATCH, runs - done)
            pairs = [self._events() for _ in range(n)]
            if self.cycles_per_s:
                cover = min(1.5 * n * host_s + 2e-4, 0.5)
                self.torch.cuda._sleep(int(cover * self.cycles_per_s))
            for k, (start, end) in enumerate(pairs):
                start.record()
                fn(done + k)
                end.record()
            self.torch.cuda.synchronize()
            times += [start.elapsed_time(end) / 1e3 for start, end in pairs]
            done += n
        return times


class CpuTimer:
    method = "host wall clock (time.perf_counter) around each call (dry run on the CPU)"

    def sync(self):
        pass

    def run_times(self, fn, runs, host_s):
        times = []
        for i in range(runs):
            t0 = time.perf_counter()
            fn(i)
            times.append(time.perf_counter() - t0)
        return times


def measure(call, timer, plan, keep=1):
    """Warm up, size the number of runs to the plan, time them; a dict of figures in seconds.

    The last `keep` outputs stay alive, so that with rotated input sets each call also writes
    its output to fresh memory rather than to the block the allocator just freed (in L2).
    """
    warmup, min_runs, max_runs, target_s = plan
    outputs = [None] * keep

    def fn(i):
        outputs[i % keep] = call(i)
    for i in range(warmup):
        fn(i)
    timer.sync()
    t0 = time.perf_counter()
    for i in range(3):
        fn(i)
    host_s = (time.perf_counter() - t0) / 3      # host time to queue one call
    timer.sync()
    estimate = statistics.median(timer.run_times(fn, 3, host_s))
    runs = int(min(max(math.ceil(target_s / max(estimate, 1e-7)), min_runs), max_runs))
    times = sorted(timer.run_times(fn, runs, host_s))
    outputs.clear()
    return {"median_s": statistics.median(times), "min_s": times[0],
            "p90_s": times[min(len(times) - 1, int(0.9 * len(times)))], "runs": runs, "warmup": warmup,
            "host_queue_us": host_s * 1e6}


# ------------------------------------------------------------------------------------------
# Inputs and the float64 reference
# ------------------------------------------------------------------------------------------

class Case:
    """One (N, C, dtype, normTarget): its input sets, made once and shared by every impl."""

    def __init__(self, env, n, c, dtype, norm, seed):
        self.env, self.n, self.c, self.dtype, self.norm = env, n, c, dtype, norm
        self.itemsize = 4 if dtype == "float32" else 2
        self.ideal_bytes = 3 * n * c * self.itemsize
        # Enough input sets that one round of them (pred, target, grad each) is 3x the L2,
        # so that repeated runs read from DRAM, not the cache; 1 for the large shapes.
        per_set = 3 * n * c * self.itemsize
        self.n_sets = int(min(max(math.ceil(3 * env.l2_bytes / per_set), 1), 64)) if per_set < 2 * env.l2_bytes else 1
        self.sets = [env.make_inputs(n, c, dtype, norm, seed + k) for k in range(self.n_sets)]
        self._reference = None

    def reference(self):
        """The positive gradient (softmax(pred) - p) / N of set 0, in float64."""
        if self._reference is None:
            self._reference = self.env.reference(*self.sets[0], self.norm)
        return self._reference

    def free(self):
        self.sets, self._reference = None, None
        self.__dict__.pop("torch_sets", None)


class GpuEnv:
    """torch CUDA tensors in and out; CUDA-event timing."""
    dry_run = False
    device = "cuda"

    def __init__(self, torch):
        self.torch = torch
        torch.cuda.init()
        torch.empty(1, device="cuda")
        props = torch.cuda.get_device_properties(0)
        self.device_name = torch.cuda.get_device_name(0)
        self.sm_count = props.multi_processor_count
        self.l2_bytes = int(getattr(props, "L2_cache_size", 0) or L2_FALLBACK)
        self.total_memory = props.total_memory
        self.timer = CudaTimer(torch)

    def torch_dtype(self, dtype):
        return getattr(self.torch, dtype)

    def make_inputs(self, n, c, dtype, norm, seed):
        torch = self.torch
        gen = torch.Generator(device=self.device).manual_seed(seed)
        pred = (2 * torch.randn(n, c, device=self.device, generator=gen)).to(self.torch_dtype(dtype))
        raw = torch.randn(n, c, device=self.device, generator=gen)
        target = raw if norm else torch.softmax(2 * raw, dim=1)
        return pred, target.to(self.torch_dtype(dtype))

    def ours_inputs(self, case, k):
        return case.sets[k]

    def torch_inputs(self, case, k):
        return case.sets[k]

    def reference(self, pred, target, norm):
        torch = self.torch
        x = pred.double()
        q = torch.softmax(x, dim=1)
        del x
        p = torch.softmax(target.double(), dim=1) if norm else target.double()
        return (q - p) / pred.shape[0]

    def rel_error(self, grad, sign, ref):
        """max |sign * grad - ref| / max |ref|."""
        diff = (grad.double().reshape(ref.shape) * sign - ref).abs_().max()
        return float(diff / ref.abs().max())

    def free_memory(self):
        """Give cached blocks back between cases; never raises (after a CUDA error it cannot)."""
        import gc
        gc.collect()
        try:
            self.torch.cuda.synchronize()
            self.torch.cuda.empty_cache()
        except Exception:
            pass

    def copy_bandwidth(self, nbytes, plan):
        torch = self.torch
        while True:
            try:
                src = torch.ones(nbytes // 4, dtype=torch.float32, device=self.device)
                dst = torch.empty_like(src)
                break
            except torch.cuda.OutOfMemoryError:
                nbytes //= 2
        result = measure(lambda i: dst.copy_(src), self.timer, plan)
        del src, dst
        self.free_memory()
        return nbytes, result, "torch dst.copy_(src), device to device"


class DryEnv:
    """A dry run on the CPU: NumPy inputs for ours (the NumPy backend), torch CPU tensors for peers."""
    dry_run = True

    def __init__(self, torch):
        self.torch = torch
        self.device_name = f"CPU ({platform.machine()}, {os.cpu_count()} cores) - DRY RUN, no GPU"
        self.sm_count = 1
        self.l2_bytes = 1 << 20
        self.timer = CpuTimer()
        try:
            import ml_dtypes
            self.bfloat16 = np.dtype(ml_dtypes.bfloat16)
        except ImportError:
            self.bfloat16 = None

    def make_inputs(self, n, c, dtype, norm, seed):
        rng = np.random.default_rng(seed)
        pred = (2 * rng.standard_normal((n, c))).astype(np.float32)
        raw = rng.standard_normal((n, c))
        if not norm:
            raw = np.exp(2 * raw - (2 * raw).max(axis=1, keepdims=True))
            raw /= raw.sum(axis=1, keepdims=True)
        target = raw.astype(np.float32)
        if dtype == "bfloat16":   # the float32 values rounded to bfloat16, for every impl alike
            if self.bfloat16 is not None:
                return pred.astype(self.bfloat16), target.astype(self.bfloat16)
            if self.torch is None:
                raise Skip("bfloat16 needs ml_dtypes or torch in a dry run")
            to_bf16 = lambda a: self.torch.from_numpy(a).bfloat16()
            return to_bf16(pred), to_bf16(target)
        return pred, target

    def ours_inputs(self, case, k):
        pred, target = case.sets[k]
        if not isinstance(pred, np.ndarray):
            raise Skip("NumPy has no bfloat16 here (install ml_dtypes)")
        return pred, target

    def torch_inputs(self, case, k):
        if self.torch is None:
            raise Skip("torch is not installed")
        pred, target = case.sets[k]
        if not isinstance(pred, np.ndarray):
            return pred, target
        cache = case.__dict__.setdefault("torch_sets", {})   # made once per case, shared by the peers
        if k not in cache:
            to_torch = lambda a: self.torch.from_numpy(np.asarray(a, np.float32)).to(getattr(self.torch, case.dtype))
            cache[k] = to_torch(pred), to_torch(target)
        return cache[k]

    def _numpy64(self, a):
        if isinstance(a, np.ndarray):
            return a.astype(np.float64)
        return a.detach().double().numpy()

    def reference(self, pred, target, norm):
        x, t = self._numpy64(pred), self._numpy64(target)
        q = np.exp(x - x.max(axis=1, keepdims=True))
        q /= q.sum(axis=1, keepdims=True)
        if norm:
            t = np.exp(t - t.max(axis=1, keepdims=True))
            t /= t.sum(axis=1, keepdims=True)
        return (q - t) / x.shape[0]

    def rel_error(self, grad, sign, ref):
        g = self._numpy64(grad).reshape(ref.shape) * sign
        return float(np.abs(g - ref).max() / np.abs(ref).max())

    def free_memory(self):
        import gc
        gc.collect()

    def copy_bandwidth(self, nbytes, plan):
        src = np.ones(nbytes // 4, np.float32)
        dst = np.empty_like(src)
        result = measure(lambda i: np.copyto(dst, src), self.timer, plan)
        return nbytes, result, "NumPy np.copyto on the host (dry run)"


# ------------------------------------------------------------------------------------------
# The implementations.  Each `prepare_*(env, case)` returns (fn, sign, info): fn(i) runs one
# call on input set i % n_sets and returns its gradient; sign * grad is the positive
# gradient d(mean KL)/d(pred); info is a dict recorded with the figures.
# ------------------------------------------------------------------------------------------

def prepare_ours(env, case):
    from puzzlelib_cost import KLDivergence
    sets = [env.ours_inputs(case, k) for k in range(case.n_sets)]
    div = KLDivergence(normTarget=case.norm)

    def fn(i):
        pred, target = sets[i % len(sets)]
        return div(pred, target, queryError=False)
    return fn, -1.0, {}   # PuzzleLib's sign: grad is the NEGATIVE gradient


def torch_forward(norm):
    """The peers' loss: mean KL(p || softmax(pred)) over the batch, as PyTorch users write it."""
    import torch.nn.functional as F

    def forward(pred, target):
        log_q = F.log_softmax(pred, dim=1)
        if norm:
            return F.kl_div(log_q, F.log_softmax(target, dim=1), reduction="batchmean", log_target=True)
        return F.kl_div(log_q, target, reduction="batchmean")
    return forward


def _autograd_fn(env, case, forward):
    """fn(i): forward on leaf copies of the inputs (sharing memory), gradient of pred back."""
    torch = env.torch
    if torch is None:
        raise Skip("torch is not installed")
    sets = [env.torch_inputs(case, k) for k in range(case.n_sets)]
    leaves = [(pred.detach().requires_grad_(), target) for pred, target in sets]

    def fn(i):
        pred, target = leaves[i % len(leaves)]
        loss = forward(pred, target)
        return torch.autograd.grad(loss, pred)[0]
    return fn


def prepare_torch_eager(env, case):
    if env.torch is None:
        raise Skip("torch is not installed")
    return _autograd_fn(env, case, torch_forward(case.norm)), 1.0, {}


def prepare_torch_compile(env, case):
    if env.torch is None:
        raise Skip("torch is not installed")
    if env.dry_run:
        raise Skip("not run in a dry run (compiling takes minutes on a small CPU)")
    torch = env.torch
    torch._dynamo.reset()   # one fresh compilation per case: static shapes, no recompile limit
    compiled = torch.compile(torch_forward(case.norm), dynamic=False)
    fn = _autograd_fn(env, case, compiled)
    t0 = time.perf_counter()
    fn(0)                   # compiles the forward and the backward graphs
    env.timer.sync()
    return fn, 1.0, {"compile_s": round(time.perf_counter() - t0, 2)}


_LIGER = {}


def liger_loss_class():
    if "cls" not in _LIGER:
        try:
            from liger_kernel.transformers import LigerKLDIVLoss
            _LIGER["cls"], _LIGER["reason"] = LigerKLDIVLoss, None
        except Exception as exc:   # ImportError, or triton failing to load
            _LIGER["cls"], _LIGER["reason"] = None, f"liger_kernel not importable ({err_text(exc)})"
    return _LIGER["cls"]


def prepare_liger(env, case):
    if env.torch is None:
        raise Skip("torch is not installed")
    if env.dry_run:
        raise Skip("Liger-Kernel's Triton kernels need a CUDA GPU")
    cls = liger_loss_class()
    if cls is None:
        raise Skip(_LIGER["reason"])
    import torch.nn.functional as F
    loss_fn = cls(reduction="batchmean", log_target=case.norm)

    def forward(pred, target):
        log_q = F.log_softmax(pred, dim=1)
        return loss_fn(log_q, F.log_softmax(target, dim=1) if case.norm else target)
    return _autograd_fn(env, case, forward), 1.0, {}


# PuzzleLib's KLDivergence.calcGrad: softmaxNd(pred) (cuDNN) written to memory, softmaxNd(target)
# too with normTarget, then the ReductionKernel "klDivergence" of PuzzleLib/Cuda/Kernels/Costs.py:
#     map:    grad[i] = (y[i] - x[i]) * gradnorm,  y[i] > 0 ? y[i] * (log(y[i]) - log(x[i])) : 0
#     reduce: a + b in float32, per block, then the blocks' partial sums in a second kernel.
# x is softmax(pred), y the target; grad = (p - q) / N, the same NEGATIVE gradient as ours.
# bfloat16 is handled as raw 16-bit words (no header needed by NVRTC); PuzzleLib had float32 only.
PUZZLELIB_REDUCTION = r"""
#define BLOCK 512
typedef unsigned short bf16_t;
__device__ __forceinline__ float load(const float* p, long long i) { return p[i]; }
__device__ __forceinline__ float load(const bf16_t* p, long long i) { return __uint_as_float(((unsigned)p[i]) << 16); }
__device__ __forceinline__ void store(float* p, long long i, float v) { p[i] = v; }
__device__ __forceinline__ void store(bf16_t* p, long long i, float v) {
    unsigned u = __float_as_uint(v);
    u += 0x7fffu + ((u >> 16) & 1u);   // round to nearest even (finite values)
    p[i] = (bf16_t)(u >> 16);
}

template <typename T>
__device__ void kl_divergence(const T* x, const T* y, T* grad, float gradnorm, long long n, float* partial) {
    __shared__ float sdata[BLOCK];
    float acc = 0.0f;
    for (long long i = (long long)blockIdx.x * BLOCK + threadIdx.x; i < n; i += (long long)gridDim.x * BLOCK) {
        float xi = load(x, i), yi = load(y, i);
        store(grad, i, (yi - xi) * gradnorm);
        acc += yi > 0.0f ? yi * (logf(yi) - logf(xi)) : 0.0f;
    }
    sdata[threadIdx.x] = acc;
    __syncthreads();
    for (int s = BLOCK / 2; s > 0; s >>= 1) {
        if (threadIdx.x < s) sdata[threadIdx.x] += sdata[threadIdx.x + s];
        __syncthreads();
    }
    if (threadIdx.x == 0) partial[blockIdx.x] = sdata[0];
}

extern "C" __global__ void kl_divergence_f32(const float* x, const float* y, float* grad, float gradnorm,
                                             long long n, float* partial) {
    kl_divergence<float>(x, y, grad, gradnorm, n, partial);
}
extern "C" __global__ void kl_divergence_bf16(const bf16_t* x, const bf16_t* y, bf16_t* grad, float gradnorm,
                                              long long n, float* partial) {
    kl_divergence<bf16_t>(x, y, grad, gradnorm, n, partial);
}
extern "C" __global__ void sum_partials(const float* partial, int count, float* error) {
    __shared__ float sdata[BLOCK];
    float acc = 0.0f;
    for (int i = threadIdx.x; i < count; i += BLOCK) acc += partial[i];
    sdata[threadIdx.x] = acc;
    __syncthreads();
    for (int s = BLOCK / 2; s > 0; s >>= 1) {
        if (threadIdx.x < s) sdata[threadIdx.x] += sdata[threadIdx.x + s];
        __syncthreads();
    }
    if (threadIdx.x == 0) *error = sdata[0];
}
"""
_CUPY = {}


def cupy_reduction():
    """(cupy, kernels) or (None, why not)."""
    if "module" not in _CUPY:
        try:
            import cupy
            module = cupy.RawModule(code=PUZZLELIB_REDUCTION)
            kernels = {name: module.get_function(name) for name in
                       ("kl_divergence_f32", "kl_divergence_bf16", "sum_partials")}
            _CUPY["module"], _CUPY["cupy"], _CUPY["reason"] = kernels, cupy, None
        except Exception as exc:
            _CUPY["module"], _CUPY["cupy"], _CUPY["reason"] = None, None, err_text(exc)
    return _CUPY["cupy"], _CUPY["module"] or _CUPY["reason"]


def prepare_puzzlelib_style(env, case):
    torch = env.torch
    if torch is None:
        return _puzzlelib_numpy(env, case)
    sets = [env.torch_inputs(case, k) for k in range(case.n_sets)]
    gradnorm = 1.0 / case.n
    cupy, kernels = (None, "dry run") if env.dry_run else cupy_reduction()

    if cupy is None:   # the same two stages with torch ops (labelled as such in the results)
        def fn(i):
            pred, target = sets[i % len(sets)]
            q = torch.softmax(pred, dim=1)
            p = torch.softmax(target, dim=1) if case.norm else target
            grad = (p - q) * gradnorm
            error = torch.where(p > 0, p * (torch.log(p) - torch.log(q)), 0).sum(dtype=torch.float32)
            return grad
        return fn, -1.0, {"variant": "torch-ops: torch.softmax, then torch elementwise ops and a sum "
                                     f"(CuPy not usable: {kernels})"}

    kernel = kernels["kl_divergence_f32" if case.dtype == "float32" else "kl_divergence_bf16"]
    sum_partials = kernels["sum_partials"]
    cp_dtype = cupy.float32 if case.dtype == "float32" else cupy.uint16   # bfloat16 as raw words
    size = case.n * case.c
    blocks = int(min(-(-size // 512), 4 * env.sm_count))   # one full wave of 512-thread blocks
    partial = torch.empty(blocks, dtype=torch.float32, device=env.device)
    error = torch.zeros(1, dtype=torch.float32, device=env.device)
    torch_stream = torch.cuda.current_stream().cuda_stream   # 0: the legacy default stream, as ours uses
    stream = cupy.cuda.Stream.null if torch_stream == 0 else cupy.cuda.ExternalStream(torch_stream)

    def as_cupy(t):   # the tensor's memory as a CuPy array, no copy
        memory = cupy.cuda.UnownedMemory(t.data_ptr(), t.numel() * t.element_size(), t)
        return cupy.ndarray((t.numel(),), cp_dtype, cupy.cuda.MemoryPointer(memory, 0))

    partial_cp = cupy.ndarray((blocks,), cupy.float32, cupy.cuda.MemoryPointer(
        cupy.cuda.UnownedMemory(partial.data_ptr(), 4 * blocks, partial), 0))
    error_cp = cupy.ndarray((1,), cupy.float32, cupy.cuda.MemoryPointer(
        cupy.cuda.UnownedMemory(error.data_ptr(), 4, error), 0))

    def fn(i):
        pred, target = sets[i % len(sets)]
        q = torch.softmax(pred, dim=1)                                   # softmaxNd(pred)
        p = torch.softmax(target, dim=1) if case.norm else target        # softmaxNd(target)
        grad = torch.empty_like(pred)
        with stream:
            kernel((blocks,), (512,), (as_cupy(q), as_cupy(p), as_cupy(grad), np.float32(gradnorm),
                                       np.int64(size), partial_cp))
            sum_partials((1,), (512,), (partial_cp, np.int32(blocks), error_cp))
        return grad
    return fn, -1.0, {"variant": "softmax: torch.softmax written to memory (stands in for PuzzleLib's cuDNN "
                                 "softmaxNd); reduction: PuzzleLib's klDivergence ReductionKernel as a CuPy "
                                 "RawKernel (512-thread blocks, float32 sum, second kernel for the partials)"}


def _puzzlelib_numpy(env, case):
    sets = [env.ours_inputs(case, k) for k in range(case.n_sets)]
    gradnorm = np.float32(1.0 / case.n)

    def softmax(a):
        e = np.exp(a - a.max(axis=1, keepdims=True))
        return e / e.sum(axis=1, keepdims=True)

    def fn(i):
        pred, target = sets[i % len(sets)]
        q = softmax(pred.astype(np.float32))
        p = softmax(target.astype(np.float32)) if case.norm else target.astype(np.float32)
        with np.errstate(all="ignore"):
            np.where(p > 0, p * (np.log(p) - np.log(q)), 0).sum(dtype=np.float32)
        return ((p - q) * gradnorm).astype(pred.dtype)
    return fn, -1.0, {"variant": "numpy: softmax, then elementwise ops and a sum (dry run without torch)"}


PREPARE = {"ours": prepare_ours, "torch_eager": prepare_torch_eager, "torch_compile": prepare_torch_compile,
           "liger": prepare_liger, "puzzlelib_style": prepare_puzzlelib_style}
DESCRIPTIONS = {
    "ours": "puzzlelib_cost.KLDivergence(normTarget)(pred, target, queryError=False); hand-written CUDA "
            "kernels through pycuda (NumPy backend in a dry run)",
    "torch_eager": "PyTorch eager: log_softmax(pred); target probs, or log_softmax(target) with log_target=True "
                   "when normTarget; F.kl_div(reduction='batchmean'); torch.autograd.grad to pred (forward + "
                   "backward; its grad is the positive gradient, which does not matter for the time)",
    "torch_compile": "the torch_eager function under torch.compile(dynamic=False), compiled once per case "
                     "outside the timing; forward + backward",
    "liger": "log_softmax(pred) (and of target with normTarget) fed to Liger-Kernel's LigerKLDIVLoss("
             "reduction='batchmean'); forward + backward to pred. Its backward calls torch.equal on grad_output, "
             "a host synchronisation, so its times include the gap after it",
    "puzzlelib_style": "PuzzleLib's pipeline: softmax(pred) (and softmax(target) with normTarget) written to "
                       "memory, then PuzzleLib's klDivergence reduction kernel reads them, writes grad and sums "
                       "the error",
}


# ------------------------------------------------------------------------------------------
# The run
# ------------------------------------------------------------------------------------------

def versions(torch):
    found = {"python": platform.python_version(), "numpy": np.__version__}
    if torch is not None:
        found["torch"] = torch.__version__
        found["torch_cuda"] = getattr(torch.version, "cuda", None)
    for name, attr in (("cupy", "__version__"), ("pycuda", "VERSION_TEXT"), ("triton", "__version__")):
        try:
            found[name] = getattr(__import__(name), attr)
        except Exception as exc:
            found[name] = f"not importable ({type(exc).__name__})"
    try:
        from importlib.metadata import version
        found["liger_kernel"] = version("liger_kernel")
    except Exception:
        found["liger_kernel"] = "not installed"
    try:
        import puzzlelib_cost
        found["puzzlelib_cost"] = f"{puzzlelib_cost.__version__} ({Path(puzzlelib_cost.__file__).parent})"
    except Exception as exc:
        found["puzzlelib_cost"] = f"not importable ({err_text(exc)})"
    return found


def git_commit():
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10)
        if out.returncode == 0 and out.stdout.strip():
            dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                                   capture_output=True, text=True, timeout=10).stdout.strip()
            return out.stdout.strip() + ("+uncommitted-changes" if dirty else ""), "git rev-parse HEAD"
    except Exception:
        pass
    for var in ("GIT_COMMIT", "COMMIT", "GITHUB_SHA", "CI_COMMIT_SHA"):
        if os.environ.get(var):
            return os.environ[var], f"${var}"
    return "unknown", "no git repository and no GIT_COMMIT variable"


def run_case(env, case, impls, plan, results, deadline):
    """Time every impl on one case; returns the case's record (errors recorded, never raised)."""
    record = {"N": case.n, "C": case.c, "dtype": case.dtype, "normTarget": case.norm,
              "ideal_bytes": case.ideal_bytes, "input_sets": case.n_sets, "impls": {}}
    for name in impls:
        entry = record["impls"].setdefault(name, {})
        if name == "torch_compile" and time.perf_counter() > deadline:
            entry["skipped"] = "time budget spent (compiling is the slowest step)"
            continue
        fn = None
        try:
            fn, sign, info = PREPARE[name](env, case)
            entry.update(info)
            grad = fn(0)
            env.timer.sync()
            entry["grad_rel_error"] = env.rel_error(grad, sign, case.reference())
            del grad
            entry.update(measure(fn, env.timer, plan, keep=case.n_sets))
            entry["GBps"] = case.ideal_bytes / entry["median_s"] / 1e9
            if results["copy"].get("GBps"):
                entry["fraction_of_copy"] = entry["GBps"] / results["copy"]["GBps"]
        except Skip as exc:
            entry["skipped"] = str(exc)
        except Exception as exc:
            entry["error"] = err_text(exc)
            results["errors"].append({"where": f"{case.n}x{case.c} {case.dtype} normTarget={case.norm} {name}",
                                      "error": entry["error"], "traceback": traceback.format_exc()[-2000:]})
        finally:
            fn = None
            env.free_memory()
    ours = record["impls"].get("ours", {})
    if ours.get("median_s"):
        tol = CHECK_TOL[case.dtype]
        ours["grad_ok"] = ours["grad_rel_error"] <= tol
        for name in impls[1:]:
            if record["impls"][name].get("median_s"):
                record["impls"][name]["speedup_of_ours"] = record["impls"][name]["median_s"] / ours["median_s"]
    return record


def overhead(env, impls, calls, results, deadline):
    """Host microseconds per call on a tiny case: the Python (and launch) cost of a call."""
    n, c = OVERHEAD_SHAPE
    out = {"shape": [n, c], "dtype": "float32", "normTarget": False, "calls": calls,
           "method": "host wall time of `calls` back-to-back calls, synchronised once at the end", "impls": {}}
    case = Case(env, n, c, "float32", False, seed=999)
    for name in impls:
        entry = out["impls"].setdefault(name, {})
        if name == "torch_compile" and time.perf_counter() > deadline:
            entry["skipped"] = "time budget spent"
            continue
        try:
            fn, _, info = PREPARE[name](env, case)
            for i in range(20):
                fn(i)
            env.timer.sync()
            t0 = time.perf_counter()
            for i in range(calls):
                fn(i)
            env.timer.sync()
            entry["us_per_call"] = (time.perf_counter() - t0) / calls * 1e6
        except Skip as exc:
            entry["skipped"] = str(exc)
        except Exception as exc:
            entry["error"] = err_text(exc)
            results["errors"].append({"where": f"overhead {name}", "error": entry["error"],
                                      "traceback": traceback.format_exc()[-2000:]})
        env.free_memory()
    case.free()
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="folder for results.json and results.png")
    parser.add_argument("--dry-run", action="store_true", help="tiny sizes on the CPU (checks the script only)")
    parser.add_argument("--quick", action="store_true", help="3 shapes and fewer repetitions (short GPU slot)")
    parser.add_argument("--shapes", help="override the shapes, e.g. 1024x262144,16x1048576")
    parser.add_argument("--dtypes", default=",".join(DTYPES), help="comma-separated, from float32,bfloat16")
    parser.add_argument("--impls", default=",".join(IMPLS), help="comma-separated subset of " + ",".join(IMPLS))
    parser.add_argument("--time-budget", type=float, default=None,
                        help="seconds; past 80%% of it torch.compile is skipped, past it whole cases are "
                             "(default 300 full, 150 quick, none in a dry run)")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    mode = "dry" if args.dry_run else "quick" if args.quick else "full"
    plan = PLANS[mode]
    budget = args.time_budget or {"full": 300.0, "quick": 150.0, "dry": 1e9}[mode]
    end_of_cases, end_of_compiles = started + budget, started + 0.8 * budget
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)

    try:
        import torch
    except ImportError:
        torch = None
    if args.dry_run:
        env = DryEnv(torch)
    else:
        if torch is None or not torch.cuda.is_available():
            print("bench_kl.py: no CUDA GPU through torch here (torch %s); this benchmark measures GPUs only. "
                  "Use --dry-run to check the script on the CPU." % ("missing" if torch is None else torch.__version__),
                  file=sys.stderr)
            return 2
        env = GpuEnv(torch)

    impls = [name for name in args.impls.split(",") if name]
    unknown = set(impls) - set(IMPLS)
    if unknown:
        parser.error(f"unknown --impls {sorted(unknown)}")
    if "ours" not in impls:
        impls.insert(0, "ours")   # speed-ups are relative to ours
    impls.sort(key=IMPLS.index)
    shapes = ([tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")] if args.shapes
              else DRY_SHAPES if args.dry_run else QUICK_SHAPES if args.quick else SHAPES)
    dtypes = [d for d in args.dtypes.split(",") if d]

    from puzzlelib_cost import describe_backend
    try:
        backend = describe_backend()
    except Exception as exc:
        backend = f"describe_backend() failed: {err_text(exc)}"
    commit, commit_source = git_commit()
    results = {
        "dry_run": env.dry_run, "mode": mode,
        "note": ("DRY RUN on CPU - not GPU figures: tiny sizes through the NumPy backend and the peers "
                 "available on the CPU, timed with time.perf_counter") if env.dry_run else None,
        "device": env.device_name, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "git_commit": commit, "git_commit_source": commit_source, "versions": versions(torch),
        "ours_backend": backend, "l2_bytes": env.l2_bytes,
        "timing": {"method": env.timer.method, "statistic": "median of the timed runs",
                   "warmup": plan[0], "min_runs": plan[1], "max_runs": plan[2], "target_timed_s": plan[3],
                   "input_sets": "rotated when the inputs fit in L2: enough sets that one round is 3x the L2"},
        "bandwidth": "ideal bytes / median time; ideal bytes = 3 * N * C * itemsize (pred and target read once, "
                     "grad written once), the same count for every impl",
        "speedup": "speedup_of_ours = peer median time / ours median time (> 1: ours is faster)",
        "impls": {name: DESCRIPTIONS[name] for name in impls},
        "copy": {}, "overhead": {}, "cases": [], "errors": [],
    }
    json_path = out_dir / "results.json"

    def save():
        results["wall_s"] = round(time.perf_counter() - started, 1)
        json_path.write_text(json.dumps(results, indent=1, default=str))

    print(f"bench_kl: {'DRY RUN on CPU - not GPU figures; ' if env.dry_run else ''}{env.device_name}; "
          f"ours: {backend}", flush=True)

    # 1. The ceiling: a large copy, bytes read + written per second.
    try:
        nbytes, figures, how = env.copy_bandwidth(COPY_BYTES["dry" if env.dry_run else "gpu"],
                                                   (plan[0], max(plan[1], 20), plan[2], plan[3]))
        results["copy"] = {"buffer_bytes": nbytes, "bytes_moved": 2 * nbytes, "how": how, **figures,
                           "GBps": 2 * nbytes / figures["median_s"] / 1e9}
        print(f"copy: {results['copy']['GBps']:.0f} GB/s ({how})", flush=True)
    except Exception as exc:
        results["copy"] = {"error": err_text(exc)}
        results["errors"].append({"where": "copy bandwidth", "error": err_text(exc)})
    save()

    # 2. The Python overhead of a small call.
    results["overhead"] = overhead(env, impls, OVERHEAD_CALLS[mode], results, end_of_compiles)
    save()

    # 3. The cases.
    todo = [(n, c, dtype, norm) for (n, c) in shapes for dtype in dtypes for norm in (False, True)]
    for index, (n, c, dtype, norm) in enumerate(todo):
        label = f"[{index + 1}/{len(todo)}] {n}x{c} {dtype} normTarget={norm}"
        if time.perf_counter() > end_of_cases:
            results["cases"].append({"N": n, "C": c, "dtype": dtype, "normTarget": norm,
                                     "skipped": "time budget spent"})
            print(f"{label}: skipped (time budget spent)", flush=True)
            continue
        case = None
        try:
            case = Case(env, n, c, dtype, norm, seed=1000 * index)
            record = run_case(env, case, impls, plan, results, end_of_compiles)
        except Skip as exc:
            record = {"N": n, "C": c, "dtype": dtype, "normTarget": norm, "skipped": str(exc)}
        except Exception as exc:   # making the inputs failed (out of memory, say)
            record = {"N": n, "C": c, "dtype": dtype, "normTarget": norm, "error": err_text(exc)}
            results["errors"].append({"where": label, "error": err_text(exc),
                                      "traceback": traceback.format_exc()[-2000:]})
        finally:
            if case is not None:
                case.free()
            case = None
            env.free_memory()
        results["cases"].append(record)
        save()
        print(f"{label}: " + ", ".join(f"{SHORT[k]} {cell_time(v)}" for k, v in record.get("impls", {}).items()),
              flush=True)

    save()
    plot(results, out_dir / "results.png")
    save()
    print_table(results)
    return 0


# ------------------------------------------------------------------------------------------
# Reporting
# ------------------------------------------------------------------------------------------

def cell_time(entry):
    if entry.get("median_s"):
        return f"{entry['median_s'] * 1e6:.1f}us"
    return "skipped" if "skipped" in entry else "ERROR" if "error" in entry else "-"


def cell_speedup(entry):
    if entry.get("speedup_of_ours"):
        return f"{entry['speedup_of_ours']:.2f}x"
    if "error" in entry:
        return "err"
    return "-"


def print_table(results):
    dry = results["dry_run"]
    impls = list(results["impls"])
    peers = [p for p in impls if p != "ours"]
    bar = "=" * 100
    lines = [bar]
    if dry:
        lines += ["DRY RUN on CPU — not GPU figures (tiny sizes, NumPy backend, host timers; checks the script only)",
                  bar]
    v = results["versions"]
    lines.append(f"device: {results['device']}   date: {results['date']}   commit: {results['git_commit']}")
    lines.append(f"torch {v.get('torch', '-')}   cupy {v.get('cupy')}   pycuda {v.get('pycuda')}   "
                 f"triton {v.get('triton')}   liger_kernel {v.get('liger_kernel')}")
    lines.append(f"ours: {results['ours_backend']}")
    copy = results["copy"]
    where = "host memcpy" if dry else "copy ceiling"
    if copy.get("GBps"):
        lines.append(f"{where}: {copy['GBps']:.0f} GB/s  ({copy['how']}, {copy['buffer_bytes'] / 2 ** 30:.2f} GiB, "
                     f"read + written, median of {copy['runs']})")
    else:
        lines.append(f"{where}: not measured ({copy.get('error')})")
    lines.append(f"timing: {results['timing']['method']}; median of >= {results['timing']['min_runs']} runs "
                 f"after {results['timing']['warmup']} warm-up")
    lines.append("")
    pct = "%host" if dry else "%copy"
    head = f"{'N x C':>14} {'dtype':>8} {'normT':>5} | {'ours us':>9} {'GB/s':>7} {pct:>6} |"
    head += "".join(f" {SHORT[p]:>9}" for p in peers) + "  (speed-up of ours: peer time / ours time)"
    lines.append(head)
    lines.append("-" * len(head))
    bad = []
    for case in results["cases"]:
        key = f"{case['N']:>6}x{case['C']:<7} {('f32' if case['dtype'] == 'float32' else 'bf16'):>8} " \
              f"{('yes' if case['normTarget'] else 'no'):>5} |"
        if "impls" not in case:
            lines.append(f"{key} {case.get('skipped') or 'ERROR: ' + str(case.get('error'))}")
            continue
        ours = case["impls"].get("ours", {})
        if ours.get("median_s"):
            frac = ours.get("fraction_of_copy")
            row = f"{key} {ours['median_s'] * 1e6:>9.1f} {ours['GBps']:>7.{0 if ours['GBps'] >= 100 else 2}f} " \
                  f"{(f'{100 * frac:.0f}%' if frac else '-'):>6} |"
            if not ours.get("grad_ok", True):
                bad.append(f"{case['N']}x{case['C']} {case['dtype']} normTarget={case['normTarget']}: "
                           f"ours' grad off by {ours['grad_rel_error']:.2e} of max |grad|")
        else:
            row = f"{key} {cell_time(ours):>9} {'':>7} {'':>6} |"
        row += "".join(f" {cell_speedup(case['impls'].get(p, {})):>9}" for p in peers)
        lines.append(row)
    lines.append("")
    over = results.get("overhead", {})
    if over.get("impls"):
        cells = []
        for name, entry in over["impls"].items():
            cells.append(f"{SHORT[name]} {entry['us_per_call']:.1f}" if entry.get("us_per_call")
                         else f"{SHORT[name]} {'skipped' if 'skipped' in entry else 'err'}")
        lines.append(f"host us per call, {over['shape'][0]}x{over['shape'][1]} float32: " + " | ".join(cells))
    for name in peers:
        reasons = {e.get("skipped") for c in results["cases"] for e in [c.get("impls", {}).get(name, {})]
                   if e.get("skipped")}
        if reasons:
            lines.append(f"{name} skipped: " + "; ".join(sorted(reasons)))
    variant = next((c["impls"]["puzzlelib_style"].get("variant") for c in results["cases"]
                    if "puzzlelib_style" in c.get("impls", {}) and c["impls"]["puzzlelib_style"].get("variant")), None)
    if variant:
        lines.append(f"puzzlelib_style: {variant.split(';')[0] if dry else variant}")
    for line in bad:
        lines.append("CHECK FAILED: " + line)
    lines.append(f"errors recorded: {len(results['errors'])}" + (" (see results.json \"errors\")" if results["errors"] else "")
                 + f"   wall: {results.get('wall_s', 0):.0f} s")
    if dry:
        lines += [bar, "DRY RUN on CPU — not GPU figures", bar]
    else:
        lines.append(bar)
    print("\n".join(lines), flush=True)


def plot(results, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception as exc:
        print(f"results.png not written: matplotlib is not importable ({type(exc).__name__})", flush=True)
        return
    try:
        impls = list(results["impls"])
        dtypes = sorted({c["dtype"] for c in results["cases"]}, key=DTYPES.index)
        fig, axes = plt.subplots(len(dtypes), 1, figsize=(13, 4.2 * max(len(dtypes), 1)), squeeze=False)
        width = 0.8 / len(impls)
        for ax, dtype in zip(axes[:, 0], dtypes):
            cases = [c for c in results["cases"] if c["dtype"] == dtype]
            for k, name in enumerate(impls):
                values = [c.get("impls", {}).get(name, {}).get("fraction_of_copy") or 0 for c in cases]
                ax.bar([i + (k - (len(impls) - 1) / 2) * width for i in range(len(cases))],
                       [100 * v for v in values], width, label=name)
            ax.set_xticks(range(len(cases)))
            ax.set_xticklabels([f"{c['N']}x{c['C']}\n{'normT' if c['normTarget'] else 'probs'}" for c in cases],
                               fontsize=8)
            ax.set_ylabel("% of copy bandwidth (ideal bytes)" if not results["dry_run"] else "% of host memcpy")
            ax.set_title(f"{dtype}")
            ax.axhline(100, color="gray", lw=0.8, ls="--")
            ax.legend(fontsize=8, ncol=len(impls))
        title = f"KLDivergence forward+backward, {results['device']}, {results['date'][:10]}, " \
                f"commit {str(results['git_commit'])[:12]}"
        if results["dry_run"]:
            title = "DRY RUN on CPU - not GPU figures\n" + title
        fig.suptitle(title, fontsize=10)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        print(f"wrote {path}", flush=True)
    except Exception as exc:
        print(f"results.png not written: {err_text(exc)}", flush=True)
        results["errors"].append({"where": "plot", "error": err_text(exc)})


if __name__ == "__main__":
    sys.exit(main())
