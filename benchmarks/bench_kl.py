#!/usr/bin/env python3
"""Benchmark of puzzlelib_cost.KLDivergence against its peers, on one GPU.

    python benchmarks/bench_kl.py --out DIR            # the full run (GPU machine, ~5 minutes)
    python benchmarks/bench_kl.py --quick --out DIR    # 3 shapes, fewer repetitions
    python benchmarks/bench_kl.py --dry-run --out DIR  # tiny sizes on the CPU: checks the script, not the speed
    python benchmarks/bench_kl.py --suite distill,sparse --out DIR   # distillation modes, sparse teachers
    python benchmarks/bench_kl.py --suite all --list   # the plan's cases as JSON lines; runs nothing

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

--suite picks what is timed (default classic, the above; comma-separated, or all):

  classic   the cases above: probabilities and normTarget, forward KL at T = 1
  distill   distillation modes, all with normTarget=True on teacher logits (--modes narrows):
              forward     KLDivergence(normTarget=True)
              forward_t2  KLDivergence(normTarget=True, temperature=2)
              reverse     KLDivergence(normTarget=True, divergence="reverse")
              jsd         KLDivergence(normTarget=True, divergence="jsd", beta=0.5)
            over the classic shapes plus the LLM shapes 8x128256 and 4096x32000, against
              torch_eager    log_softmax(pred / T), log_softmax(target / T), the mode's formula,
                             autograd backward to pred
              torch_compile  the same function under torch.compile
              liger          log_softmax outputs (computed in the timed call) fed to Liger-Kernel:
                             LigerKLDIVLoss(log_target=True) for forward and forward_t2 (Liger has
                             no temperature: T is applied before its log_softmax), LigerJSD(beta)
                             for jsd, LigerJSD(beta=1), its reverse-KL endpoint, for reverse
                             (LigerKLDIVLoss's backward gives no gradient to its target, so it
                             cannot train a student on KL(q || p))
  sparse    a top-k teacher, target = [indices (N, K), values (N, K)], K = 64 and 1024, C = 128256
            and 32000, variants drop_logits (normTarget=True, sparseTail="drop"), drop_probs and
            bucket_probs (top-k probabilities of a full teacher, sparseTail "drop" / "bucket"), against
              ours_dense     KLDivergence on the teacher scattered into a full row (-inf logits with
                             normTarget, zero probabilities otherwise)
              torch_dense    PyTorch eager on the same dense row: the sparse loss written densely
                             (the tail bucket through a column mask), autograd backward
            Bandwidth counts the sparse ideal bytes (pred read, grad written, the K entries) for
            every impl, so a dense impl's fraction of copy is an effective one.
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
QUICK_SHAPES = [(65536, 10), (16384, 1000), (2048, 128256)]   # small rows, one fused pass, rows streamed by a cluster
DRY_SHAPES = [(64, 10), (16, 1000), (4, 3000)]
DTYPES = ["float32", "bfloat16"]
OVERHEAD_SHAPE = (32, 10)
IMPLS = ["ours", "torch_eager", "torch_compile", "liger", "puzzlelib_style", "ours_dense", "torch_dense"]
CLASSIC_IMPLS = ["ours", "torch_eager", "torch_compile", "liger", "puzzlelib_style"]
SHORT = {"ours": "ours", "torch_eager": "eager", "torch_compile": "compile", "liger": "liger",
         "puzzlelib_style": "puzzlelib", "ours_dense": "ours_dense", "torch_dense": "torch_dense"}

# The distillation suite: every mode on teacher logits (normTarget=True).
SUITES = ["classic", "distill", "sparse"]
MODES = {   # name: (divergence, temperature, beta)
    "forward": ("forward", 1.0, 0.5),
    "forward_t2": ("forward", 2.0, 0.5),
    "reverse": ("reverse", 1.0, 0.5),
    "jsd": ("jsd", 1.0, 0.5),
}
DISTILL_IMPLS = ["ours", "torch_eager", "torch_compile", "liger"]
LLM_SHAPES = [(4096, 32000), (8, 128256)]
# LLM shapes first, so that a run cut short by its time budget has measured them.
DISTILL_SHAPES = LLM_SHAPES + [s for s in SHAPES if s not in LLM_SHAPES]
QUICK_DISTILL_SHAPES = LLM_SHAPES + [(2048, 128256)]
DRY_DISTILL_SHAPES = [(16, 1000), (4, 3000)]
# The sparse top-k suite: (N, C) shapes x K x variants; a variant is (sparseTail, normTarget).
SPARSE_IMPLS = ["ours", "ours_dense", "torch_dense"]
SPARSE_SHAPES = [(2048, 128256), (4096, 32000)]
SPARSE_KS = [64, 1024]
DRY_SPARSE_SHAPES = [(16, 1000), (8, 300)]
DRY_SPARSE_KS = [8, 64]
SPARSE_VARIANTS = {"drop_logits": ("drop", True), "drop_probs": ("drop", False), "bucket_probs": ("bucket", False)}
SPARSE_SHARE = 0.25   # of the time budget kept for the sparse cases when other suites run before them

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

def input_sets(bytes_per_set, l2_bytes):
    """How many input sets a case rotates through: enough that one round of them (each call's
    inputs and output) is 3x the L2, so that repeated runs read from DRAM, not the cache; 1 for the
    large shapes, at most 64."""
    if bytes_per_set >= 2 * l2_bytes:
        return 1
    return int(min(max(math.ceil(3 * l2_bytes / bytes_per_set), 1), 64))


class Case:
    """One (N, C, dtype, normTarget) and, beyond the classic suite, a distillation mode or a sparse
    teacher: its input sets, made once and shared by every impl.

    mode: None (classic) or a MODES name; sparse: None or (K, variant) with variant a SPARSE_VARIANTS name.
    """

    def __init__(self, env, n, c, dtype, norm, seed, mode=None, sparse=None):
        self.env, self.n, self.c, self.dtype, self.norm = env, n, c, dtype, norm
        self.mode, self.sparse = mode, sparse
        self.suite = "sparse" if sparse else "distill" if mode else "classic"
        self.divergence, self.temperature, self.beta = MODES[mode] if mode else ("forward", 1.0, 0.5)
        self.itemsize = 4 if dtype == "float32" else 2
        if sparse:
            self.k, self.variant = sparse
            self.tail = SPARSE_VARIANTS[self.variant][0]
            # pred read once, grad written once, the K teacher entries (int64 index + value) read once
            self.ideal_bytes = 2 * n * c * self.itemsize + n * self.k * (8 + self.itemsize)
        else:
            self.ideal_bytes = 3 * n * c * self.itemsize
        self.n_sets = input_sets(3 * n * c * self.itemsize, env.l2_bytes)
        if sparse:
            self.sets = [env.make_sparse_inputs(n, c, self.k, dtype, norm, seed + k) for k in range(self.n_sets)]
        else:
            self.sets = [env.make_inputs(n, c, dtype, norm, seed + k) for k in range(self.n_sets)]
        self._reference = None

    def reference(self):
        """The positive gradient d(mean E)/d(pred) of set 0, in float64."""
        if self._reference is None:
            if self.sparse:
                pred, _, _, dense, member = self.sets[0]
                self._reference = self.env.sparse_reference(pred, dense, member, self.norm, self.tail)
            elif self.mode:
                self._reference = self.env.mode_reference(*self.sets[0], self.temperature, self.divergence,
                                                          self.beta)
            else:
                self._reference = self.env.reference(*self.sets[0], self.norm)
        return self._reference

    def ours_kwargs(self):
        """KLDivergence's arguments beyond normTarget (none in the classic suite)."""
        if self.sparse:
            return {"sparseTail": self.tail}
        if self.mode:
            return {"temperature": self.temperature, "divergence": self.divergence, "beta": self.beta}
        return {}

    def describe(self):
        return case_keys(self.n, self.c, self.dtype, self.norm, self.mode, self.sparse)

    def free(self):
        self.sets, self._reference = None, None
        self.__dict__.pop("torch_sets", None)


def case_keys(n, c, dtype, norm, mode=None, sparse=None):
    """The keys that name a case in results.json."""
    out = {"suite": "sparse" if sparse else "distill" if mode else "classic",
           "N": n, "C": c, "dtype": dtype, "normTarget": norm}
    if mode:
        divergence, temperature, beta = MODES[mode]
        out.update(mode=mode, divergence=divergence, temperature=temperature, beta=beta)
    if sparse:
        k, variant = sparse
        out.update(K=k, variant=variant, sparseTail=SPARSE_VARIANTS[variant][0])
    return out


def case_label(record):
    """A short name of a case record (or of Case.describe())."""
    base = f"{record['N']}x{record['C']} {record['dtype']}"
    if record.get("suite") == "sparse":
        return f"{base} sparse K={record['K']} {record['variant']}"
    if record.get("suite") == "distill":
        return f"{base} {record['mode']}"
    return f"{base} normTarget={record['normTarget']}"


def ours_bytes_per_element(case):
    """Bytes per element ours' sparse-teacher kernels move (an estimate, not measured): pred read
    twice (the second likely from L2), grad written, plus the K entries of a row.  (Dense cases
    have none here: cost_model.predict gives theirs from the kernels the library launches.)"""
    return round(3 * case.itemsize + case.k * (8 + case.itemsize) / case.c, 3)


# The float64 references, written once for NumPy arrays and torch tensors alike (ops adapts).
class NumpyOps:
    exp, log, logaddexp, where = staticmethod(np.exp), staticmethod(np.log), staticmethod(np.logaddexp), \
        staticmethod(np.where)

    @staticmethod
    def rowsum(a):
        return a.sum(axis=1, keepdims=True)

    @staticmethod
    def rowmax(a):
        return a.max(axis=1, keepdims=True)


class TorchOps:
    def __init__(self, torch):
        self.exp, self.log, self.logaddexp, self.where = torch.exp, torch.log, torch.logaddexp, torch.where

    @staticmethod
    def rowsum(a):
        return a.sum(dim=1, keepdim=True)

    @staticmethod
    def rowmax(a):
        return a.amax(dim=1, keepdim=True)


def log_softmax(ops, a):
    a = a - ops.rowmax(a)
    return a - ops.log(ops.rowsum(ops.exp(a)))


def mode_gradient(ops, x, t, temperature, divergence, beta):
    """d(mean E)/d(pred) for q = softmax(x / T), p = softmax(t / T) (normTarget), in x's precision.

    With g = dE_row/dq: forward g - (the softmax Jacobian) gives q - p; reverse g = log q - log p (+ 1);
    jsd g = (1 - beta)(log q - log m), m = beta p + (1 - beta) q; then q (g - sum q g), all / (T N).
    """
    log_q = log_softmax(ops, x / temperature)
    log_p = log_softmax(ops, t / temperature)
    q = ops.exp(log_q)
    if divergence == "forward":
        grad = q - ops.exp(log_p)
    else:
        if divergence == "reverse":
            h = log_q - log_p
        else:
            h = (1 - beta) * (log_q - ops.logaddexp(log_p + math.log(beta), log_q + math.log1p(-beta)))
        grad = q * (h - ops.rowsum(q * h))
    return grad / (temperature * x.shape[0])


def sparse_gradient(ops, x, dense, member, norm, tail):
    """d(mean E)/d(pred) of the sparse loss from its dense form: dense holds the teacher's logits
    (-inf off the top k) with normTarget, else its probabilities (0 off the top k); member marks the k."""
    q = ops.exp(log_softmax(ops, x))
    if norm:
        p, s = ops.exp(log_softmax(ops, dense)), 1.0
    else:
        p = dense
        s = ops.rowsum(p)
    if tail == "bucket" and not norm:
        rest = ops.rowsum(ops.where(member, 0 * q, q))   # the student's mass off the teacher's columns
        missing = 1 - s
        missing = missing * (missing > 0)
        grad = ops.where(member, q - p, q * (1 - missing / rest))
    else:
        grad = s * q - p
    return grad / x.shape[0]


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
        self.clusters = props.major >= 9
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

    def make_sparse_inputs(self, n, c, k, dtype, norm, seed):
        """(pred, indices, values, dense, member): a teacher's top k of a full row of logits, as its
        logits (norm) or its probabilities; dense is the same teacher scattered into a full row
        (-inf logits or 0 probabilities elsewhere); member marks the k columns."""
        torch = self.torch
        gen = torch.Generator(device=self.device).manual_seed(seed)
        pred = (2 * torch.randn(n, c, device=self.device, generator=gen)).to(self.torch_dtype(dtype))
        logits = 2 * torch.randn(n, c, device=self.device, generator=gen)
        top, indices = logits.topk(k, dim=1)
        if norm:
            values = top
            dense = torch.full_like(logits, float("-inf")).scatter_(1, indices, top)
        else:
            values = torch.softmax(logits, dim=1).gather(1, indices)
            dense = torch.zeros_like(logits).scatter_(1, indices, values)
        del logits, top
        member = torch.zeros(n, c, dtype=torch.bool, device=self.device).scatter_(1, indices, True)
        dt = self.torch_dtype(dtype)
        return pred, indices.contiguous(), values.to(dt).contiguous(), dense.to(dt), member

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

    def mode_reference(self, pred, target, temperature, divergence, beta):
        with self.torch.no_grad():
            return mode_gradient(TorchOps(self.torch), pred.double(), target.double(), temperature, divergence, beta)

    def sparse_reference(self, pred, dense, member, norm, tail):
        with self.torch.no_grad():
            return sparse_gradient(TorchOps(self.torch), pred.double(), dense.double(), member, norm, tail)

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

    def copy_bandwidth(self, nbytes, plan, sets=1):
        """(bytes per copy, measure()'s figures, how): copies of nbytes, rotating over `sets`
        pairs of buffers (as a case rotates its input sets, so that small copies come from DRAM)."""
        torch = self.torch
        while True:
            try:
                src = [torch.ones(nbytes // 4, dtype=torch.float32, device=self.device) for _ in range(sets)]
                dst = [torch.empty_like(s) for s in src]
                break
            except torch.cuda.OutOfMemoryError:
                nbytes //= 2
        result = measure(lambda i: dst[i % sets].copy_(src[i % sets]), self.timer, plan)
        src = dst = None   # (the buffers go before the next case allocates)
        self.free_memory()
        return nbytes, result, "torch dst.copy_(src), device to device"


class DryEnv:
    """A dry run on the CPU: NumPy inputs for ours (the NumPy backend), torch CPU tensors for peers."""
    dry_run = True

    def __init__(self, torch):
        self.torch = torch
        self.device_name = f"CPU ({platform.machine()}, {os.cpu_count()} cores) - DRY RUN, no GPU"
        self.sm_count = 1
        self.clusters = False
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

    def make_sparse_inputs(self, n, c, k, dtype, norm, seed):
        """As GpuEnv.make_sparse_inputs, in NumPy (dtype as make_inputs gives it)."""
        rng = np.random.default_rng(seed)
        pred = (2 * rng.standard_normal((n, c))).astype(np.float32)
        logits = 2 * rng.standard_normal((n, c))
        indices = np.argsort(-logits, axis=1, kind="stable")[:, :k].astype(np.int64)
        if norm:
            values = np.take_along_axis(logits, indices, 1)
            dense = np.full((n, c), -np.inf)
        else:
            probs = np.exp(logits - logits.max(axis=1, keepdims=True))
            probs /= probs.sum(axis=1, keepdims=True)
            values = np.take_along_axis(probs, indices, 1)
            dense = np.zeros((n, c))
        np.put_along_axis(dense, indices, values, 1)
        member = np.zeros((n, c), bool)
        np.put_along_axis(member, indices, True, 1)
        floats = [a.astype(np.float32) for a in (pred, values, dense)]
        if dtype == "bfloat16":
            if self.bfloat16 is not None:
                floats = [a.astype(self.bfloat16) for a in floats]
            elif self.torch is not None:
                floats = [self.torch.from_numpy(a).bfloat16() for a in floats]
            else:
                raise Skip("bfloat16 needs ml_dtypes or torch in a dry run")
        pred, values, dense = floats
        return pred, indices, values, dense, member

    def ours_inputs(self, case, k):
        arrays = case.sets[k]
        if not isinstance(arrays[0], np.ndarray):
            raise Skip("NumPy has no bfloat16 here (install ml_dtypes)")
        return arrays

    def torch_inputs(self, case, k):
        if self.torch is None:
            raise Skip("torch is not installed")
        arrays = case.sets[k]
        if not isinstance(arrays[0], np.ndarray):
            return arrays
        cache = case.__dict__.setdefault("torch_sets", {})   # made once per case, shared by the peers
        if k not in cache:
            def to_torch(a):
                if a.dtype == bool or a.dtype.kind in "iu":
                    return self.torch.from_numpy(a)
                return self.torch.from_numpy(np.asarray(a, np.float32)).to(getattr(self.torch, case.dtype))
            cache[k] = tuple(to_torch(a) for a in arrays)
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

    def mode_reference(self, pred, target, temperature, divergence, beta):
        return mode_gradient(NumpyOps, self._numpy64(pred), self._numpy64(target), temperature, divergence, beta)

    def sparse_reference(self, pred, dense, member, norm, tail):
        with np.errstate(invalid="ignore", divide="ignore"):
            return sparse_gradient(NumpyOps, self._numpy64(pred), self._numpy64(dense), np.asarray(member), norm, tail)

    def rel_error(self, grad, sign, ref):
        g = self._numpy64(grad).reshape(ref.shape) * sign
        return float(np.abs(g - ref).max() / np.abs(ref).max())

    def free_memory(self):
        pass   # tiny arrays, freed by reference counting; a gc.collect() per impl would cost ~0.1 s with torch loaded

    def copy_bandwidth(self, nbytes, plan, sets=1):
        src = [np.ones(nbytes // 4, np.float32) for _ in range(sets)]
        dst = [np.empty_like(s) for s in src]
        result = measure(lambda i: np.copyto(dst[i % sets], src[i % sets]), self.timer, plan)
        return nbytes, result, "NumPy np.copyto on the host (dry run)"


# ------------------------------------------------------------------------------------------
# The implementations.  Each `prepare_*(env, case)` returns (fn, sign, info): fn(i) runs one
# call on input set i % n_sets and returns its gradient; sign * grad is the positive
# gradient d(mean KL)/d(pred); info is a dict recorded with the figures.
# ------------------------------------------------------------------------------------------

def prepare_ours(env, case):
    from puzzlelib_cost import KLDivergence
    sets = [env.ours_inputs(case, k) for k in range(case.n_sets)]
    div = KLDivergence(normTarget=case.norm, **case.ours_kwargs())

    if case.sparse:
        def fn(i):
            pred, indices, values = sets[i % len(sets)][:3]
            return div(pred, [indices, values], queryError=False)
        return fn, -1.0, {"variant": f"sparse target [indices, values], K={case.k}, sparseTail={case.tail!r}; every "
                                     "call copies the indices to the host and checks them (a synchronisation, timed)"}

    def fn(i):
        pred, target = sets[i % len(sets)]
        return div(pred, target, queryError=False)
    return fn, -1.0, {}   # PuzzleLib's sign: grad is the NEGATIVE gradient


def prepare_ours_dense(env, case):
    """Sparse suite: KLDivergence on the teacher scattered into a full row (the dense computation)."""
    if not case.sparse:
        raise Skip("ours_dense is the dense comparison of the sparse suite")
    from puzzlelib_cost import KLDivergence
    sets = [env.ours_inputs(case, k) for k in range(case.n_sets)]
    div = KLDivergence(normTarget=case.norm)

    def fn(i):
        pred, _, _, dense, _ = sets[i % len(sets)]
        return div(pred, dense, queryError=False)
    info = {"variant": "KLDivergence(normTarget=True) on -inf logits off the top k: the same loss"
            if case.norm else "KLDivergence() on 0 probabilities off the top k"}
    if not case.norm:   # not the sparse loss's gradient: no accuracy check against its reference
        info["grad_check"] = ("not compared: PuzzleLib's dense grad is (p - q)/N, which assumes sum(p) = 1; the "
                              "sparse loss's exact gradient is (p - s q)/N" +
                              (" plus the tail bucket's term" if case.tail == "bucket" else ""))
    return fn, -1.0, info


def torch_forward(norm):
    """The peers' loss: mean KL(p || softmax(pred)) over the batch, as PyTorch users write it."""
    import torch.nn.functional as F

    def forward(pred, target):
        log_q = F.log_softmax(pred, dim=1)
        if norm:
            return F.kl_div(log_q, F.log_softmax(target, dim=1), reduction="batchmean", log_target=True)
        return F.kl_div(log_q, target, reduction="batchmean")
    return forward


def torch_distill_forward(divergence, temperature, beta):
    """The distillation suite's loss as PyTorch users write it: log_softmax of student and teacher
    logits at temperature T, then the mode's formula, mean over the rows (no T^2 factor, like ours)."""
    import torch
    import torch.nn.functional as F
    log_beta, log_rest = math.log(beta), math.log1p(-beta)

    def forward(pred, target):
        if temperature != 1.0:
            pred, target = pred / temperature, target / temperature
        log_q = F.log_softmax(pred, dim=1)
        log_p = F.log_softmax(target, dim=1)
        if divergence == "forward":
            return F.kl_div(log_q, log_p, reduction="batchmean", log_target=True)
        if divergence == "reverse":
            return (log_q.exp() * (log_q - log_p)).sum() / pred.shape[0]
        log_m = torch.logaddexp(log_p + log_beta, log_q + log_rest)
        return (beta * (log_p.exp() * (log_p - log_m)).sum()
                + (1 - beta) * (log_q.exp() * (log_q - log_m)).sum()) / pred.shape[0]
    return forward


def torch_case_forward(case):
    if case.mode:
        return torch_distill_forward(case.divergence, case.temperature, case.beta)
    return torch_forward(case.norm)


def _autograd_fn(env, case, forward, pick=(0, 1)):
    """fn(i): forward on leaf copies of the inputs (sharing memory), gradient of pred back.
    pick: which of the set's arrays forward takes (the first is pred)."""
    torch = env.torch
    if torch is None:
        raise Skip("torch is not installed")
    sets = [env.torch_inputs(case, k) for k in range(case.n_sets)]
    leaves = [(s[pick[0]].detach().requires_grad_(), *(s[j] for j in pick[1:])) for s in sets]

    def fn(i):
        pred, *rest = leaves[i % len(leaves)]
        loss = forward(pred, *rest)
        return torch.autograd.grad(loss, pred)[0]
    return fn


def prepare_torch_eager(env, case):
    if env.torch is None:
        raise Skip("torch is not installed")
    if case.sparse:
        raise Skip("the sparse suite's torch peer is torch_dense")
    return _autograd_fn(env, case, torch_case_forward(case)), 1.0, {}


def prepare_torch_compile(env, case):
    if env.torch is None:
        raise Skip("torch is not installed")
    if case.sparse:
        raise Skip("not timed in the sparse suite")
    if env.dry_run:
        raise Skip("not run in a dry run (compiling takes minutes on a small CPU)")
    torch = env.torch
    torch._dynamo.reset()   # one fresh compilation per case: static shapes, no recompile limit
    compiled = torch.compile(torch_case_forward(case), dynamic=False)
    fn = _autograd_fn(env, case, compiled)
    t0 = time.perf_counter()
    fn(0)                   # compiles the forward and the backward graphs
    env.timer.sync()
    return fn, 1.0, {"compile_s": round(time.perf_counter() - t0, 2)}


def torch_sparse_dense_forward(norm, tail):
    """The sparse loss written densely: the teacher scattered into a full row (dense), member its k columns."""
    import torch
    import torch.nn.functional as F
    bucket = tail == "bucket" and not norm

    def forward(pred, dense, member):
        log_q = F.log_softmax(pred, dim=1)
        p = F.softmax(dense, dim=1) if norm else dense
        loss = F.kl_div(log_q, p, reduction="batchmean")   # xlogy(p, p) - p log q: 0 where p = 0
        if bucket:
            missing = (1 - p.sum(dim=1, dtype=torch.float32)).clamp_min(0)
            log_rest = torch.logsumexp(log_q.masked_fill(member, float("-inf")), dim=1)
            loss = loss + (torch.xlogy(missing, missing) - missing * log_rest).sum() / pred.shape[0]
        return loss
    return forward


def prepare_torch_dense(env, case):
    if not case.sparse:
        raise Skip("torch_dense is the dense comparison of the sparse suite")
    if env.torch is None:
        raise Skip("torch is not installed")
    return _autograd_fn(env, case, torch_sparse_dense_forward(case.norm, case.tail), pick=(0, 3, 4)), 1.0, {}


_LIGER = {}


def liger_loss_class(name="LigerKLDIVLoss"):
    """Liger-Kernel's module `name` (LigerKLDIVLoss or LigerJSD), imported on first use, or None
    (then _LIGER["reason"] says why)."""
    if name not in _LIGER:
        try:
            import liger_kernel.transformers as liger
            _LIGER[name], _LIGER["reason"] = getattr(liger, name), None
        except Exception as exc:   # ImportError, or triton failing to load
            _LIGER[name], _LIGER["reason"] = None, f"liger_kernel not importable ({err_text(exc)})"
    return _LIGER[name]


# Liger's beta against ours (read from liger_kernel/ops/jsd.py and transformers/jsd.py, 0.8.5):
# LigerJSD(beta)(log_q, log_p) takes the student's log-probs first (X = log Q) and the teacher's
# second (Y = log P) and computes beta * KL(P || M) + (1 - beta) * KL(Q || M), M = beta P + (1 - beta) Q
# (dX = (1 - beta) Q (X - log M)).  Ours: beta KL(p || m) + (1 - beta) KL(q || m), m = beta p + (1 - beta) q,
# p the teacher, q the student: the same formula, so Liger's beta = our beta for 0 < beta < 1.  At the
# endpoints Liger switches formulas: beta = 0 is forward KL(P || Q), beta = 1 reverse KL(Q || P) (ours:
# divergence="forward" / "reverse"; our beta must lie strictly inside (0, 1)).  Liger versions before the
# endpoint branches (the beta support of PR #290) assert 0 < beta < 1, and then the reverse peer is skipped.
def prepare_liger(env, case):
    if env.torch is None:
        raise Skip("torch is not installed")
    if case.sparse:
        raise Skip("Liger-Kernel has no sparse (top-k) teacher")
    if env.dry_run:
        raise Skip("Liger-Kernel's Triton kernels need a CUDA GPU")
    import torch.nn.functional as F
    if case.mode:
        return _prepare_liger_distill(env, case)
    cls = liger_loss_class()
    if cls is None:
        raise Skip(_LIGER["reason"])
    loss_fn = cls(reduction="batchmean", log_target=case.norm)

    def forward(pred, target):
        log_q = F.log_softmax(pred, dim=1)
        return loss_fn(log_q, F.log_softmax(target, dim=1) if case.norm else target)
    return _autograd_fn(env, case, forward), 1.0, {}


def _prepare_liger_distill(env, case):
    """Liger takes log-probs: log_softmax(pred / T) and log_softmax(target / T) run inside the timed call."""
    import torch.nn.functional as F
    temperature = case.temperature
    if case.divergence == "forward":
        cls = liger_loss_class("LigerKLDIVLoss")
        if cls is None:
            raise Skip(_LIGER["reason"])
        loss_fn = cls(reduction="batchmean", log_target=True)
        variant = "LigerKLDIVLoss(reduction='batchmean', log_target=True)(log_softmax(pred/T), log_softmax(target/T))"
    else:
        cls = liger_loss_class("LigerJSD")
        if cls is None:
            raise Skip(_LIGER["reason"])
        beta = 1.0 if case.divergence == "reverse" else case.beta   # the same beta as ours (see above)
        try:
            loss_fn = cls(beta=beta)
        except Exception as exc:   # an older Liger asserting 0 < beta < 1
            raise Skip(f"LigerJSD(beta={beta}) refused: {err_text(exc)}")
        variant = (f"LigerJSD(beta={beta})(log_softmax(pred), log_softmax(target))" +
                   (": Liger's reverse-KL endpoint (LigerKLDIVLoss's backward gives its target no gradient)"
                    if case.divergence == "reverse" else ""))

    def forward(pred, target):
        if temperature != 1.0:
            pred, target = pred / temperature, target / temperature
        return loss_fn(F.log_softmax(pred, dim=1), F.log_softmax(target, dim=1))
    return _autograd_fn(env, case, forward), 1.0, {"variant": variant}


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
    if case.mode or case.sparse:
        raise Skip("PuzzleLib had forward KL at T = 1 only (the classic suite)")
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
            # (the error, computed and dropped: the pipeline's second stage, timed)
            torch.where(p > 0, p * (torch.log(p) - torch.log(q)), 0).sum(dtype=torch.float32)
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
           "liger": prepare_liger, "puzzlelib_style": prepare_puzzlelib_style, "ours_dense": prepare_ours_dense,
           "torch_dense": prepare_torch_dense}
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
    "ours_dense": "sparse suite: puzzlelib_cost.KLDivergence(normTarget) on the teacher scattered into a full row "
                  "(-inf logits off the top k with normTarget: the same loss; 0 probabilities otherwise: the "
                  "dense loss a user computes today), scattered outside the timing",
    "torch_dense": "sparse suite: PyTorch eager on the same full row: log_softmax(pred), F.kl_div against the "
                   "dense teacher (softmax of the -inf logits with normTarget), plus the tail bucket "
                   "(1 - s)(log(1 - s) - logsumexp of log q off the teacher's columns) for bucket; autograd "
                   "backward to pred",
}
DISTILL_DESCRIPTIONS = {
    "ours": "puzzlelib_cost.KLDivergence(normTarget=True, temperature, divergence, beta)(pred, target, "
            "queryError=False); sparse suite: target = [indices, values] with sparseTail",
    "torch_eager": "PyTorch eager: log_softmax(pred / T), log_softmax(target / T), then the mode's formula "
                   "(forward: F.kl_div(log_target=True, batchmean); reverse: sum q (log q - log p) / N; jsd: "
                   "log m = logaddexp(log p + log beta, log q + log(1 - beta)), beta KL(p||m) + (1 - beta) KL(q||m)); "
                   "torch.autograd.grad to pred",
    "torch_compile": "the torch_eager function of the mode under torch.compile(dynamic=False), compiled once per "
                     "case outside the timing",
    "liger": "Liger-Kernel on log-probs: log_softmax(pred / T) and log_softmax(target / T) are computed in the "
             "timed call (Liger takes log-probs and has no temperature); forward, forward_t2: LigerKLDIVLoss("
             "reduction='batchmean', log_target=True); jsd: LigerJSD(beta) (same beta as ours: weight of the "
             "teacher); reverse: LigerJSD(beta=1), its reverse-KL endpoint (LigerKLDIVLoss's backward gives its "
             "target no gradient). Their backwards call torch.equal on grad_output (a host synchronisation)",
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


def write_json(path, data):
    """`data` as JSON at `path`, whole or not at all: written beside it, then renamed over it.  The
    GPU kit kills a step at its time limit, and a file it had half rewritten would lose every
    result measured before (the rename is atomic on one file system)."""
    path = Path(path)
    part = path.with_name(path.name + ".part")
    part.write_text(json.dumps(data, indent=1, default=str))
    os.replace(part, path)


def git_commit():
    """The commit measured: GIT_COMMIT (or its kin) when set, as the GPU kit sets it, else git's
    HEAD.  (On a lent GPU machine a .git can arrive older than the working tree sent with it: at
    01f464c git said a205773 with uncommitted changes.)"""
    for var in ("GIT_COMMIT", "COMMIT", "GITHUB_SHA", "CI_COMMIT_SHA"):
        if os.environ.get(var):
            return os.environ[var], f"${var}"
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10)
        if out.returncode == 0 and out.stdout.strip():
            dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                                   capture_output=True, text=True, timeout=10).stdout.strip()
            return out.stdout.strip() + ("+uncommitted-changes" if dirty else ""), "git rev-parse HEAD"
    except Exception:
        pass
    return "unknown", "no git repository and no GIT_COMMIT variable"


def run_case(env, case, impls, plan, results, deadline):
    """Time every impl on one case; returns the case's record (errors recorded, never raised)."""
    record = {**case.describe(), "ideal_bytes": case.ideal_bytes, "input_sets": case.n_sets, "impls": {}}
    if case.suite == "sparse":
        record["ours_bytes_per_element_model"] = ours_bytes_per_element(case)
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
            if "grad_check" not in info:
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
            results["errors"].append({"where": f"{case_label(record)} {name}",
                                      "error": entry["error"], "traceback": traceback.format_exc()[-2000:]})
        finally:
            fn = None
            env.free_memory()
    if case.suite == "classic" and results["copy"].get("GBps"):
        # A copy of the case's ideal bytes (half read, half written), from DRAM as the case's
        # inputs are: what any kernel of this size can reach, fixed costs included.
        try:
            nbytes, figures, _ = env.copy_bandwidth(case.ideal_bytes // 2 // 16 * 16, plan, sets=case.n_sets)
            gbps = 2 * nbytes / figures["median_s"] / 1e9
            record["copy_same_bytes"] = {"bytes_moved": 2 * nbytes, "median_s": figures["median_s"], "GBps": gbps,
                                         "fraction_of_copy": gbps / results["copy"]["GBps"]}
        except Exception as exc:
            record["copy_same_bytes"] = {"error": err_text(exc)}
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
    parser.add_argument("--out", help="folder for results.json and results.png (required unless --list)")
    parser.add_argument("--list", action="store_true",
                        help="print the plan's cases as JSON lines and exit (no GPU, nothing timed)")
    parser.add_argument("--dry-run", action="store_true", help="tiny sizes on the CPU (checks the script only)")
    parser.add_argument("--quick", action="store_true", help="3 shapes and fewer repetitions (short GPU slot)")
    parser.add_argument("--shapes", help="override the shapes, e.g. 1024x262144,16x1048576")
    parser.add_argument("--dtypes", default=",".join(DTYPES), help="comma-separated, from float32,bfloat16")
    parser.add_argument("--impls", default=",".join(IMPLS), help="comma-separated subset of " + ",".join(IMPLS)
                        + " (each suite times those of them it has)")
    parser.add_argument("--suite", default="classic",
                        help="comma-separated, from " + ",".join(SUITES) + ", or all (default classic)")
    parser.add_argument("--modes", default=",".join(MODES),
                        help="distill suite: comma-separated subset of " + ",".join(MODES))
    parser.add_argument("--distill-shapes", help="distill suite's shapes (default: --shapes when given, else "
                        "the LLM shapes 4096x32000, 8x128256, then the classic ones)")
    parser.add_argument("--sparse-shapes", help="sparse suite's NxC shapes (default 2048x128256,4096x32000)")
    parser.add_argument("--sparse-k", help="sparse suite's K values (default 64,1024)")
    parser.add_argument("--sparse-variants", default=",".join(SPARSE_VARIANTS),
                        help="sparse suite: comma-separated subset of " + ",".join(SPARSE_VARIANTS))
    parser.add_argument("--time-budget", type=float, default=None,
                        help="seconds; past 80%% of it torch.compile is skipped, past it whole cases are "
                             "(default 300 full, 150 quick, none in a dry run; when the sparse suite runs after "
                             "another, the others stop at 75%% and torch.compile at 60%%)")
    args = parser.parse_args(argv)
    suites = list(SUITES) if args.suite.strip() == "all" else [v for v in args.suite.split(",") if v]
    unknown = set(suites) - set(SUITES)
    if unknown or not suites:
        parser.error(f"unknown --suite {sorted(unknown)}; expected some of {SUITES} or all")
    suites.sort(key=SUITES.index)
    modes = [m for m in args.modes.split(",") if m]
    if set(modes) - set(MODES) or not modes:
        parser.error(f"unknown --modes {sorted(set(modes) - set(MODES))}; expected some of {list(MODES)}")
    variants = [v for v in args.sparse_variants.split(",") if v]
    if set(variants) - set(SPARSE_VARIANTS) or not variants:
        parser.error(f"unknown --sparse-variants {sorted(set(variants) - set(SPARSE_VARIANTS))}; "
                     f"expected some of {list(SPARSE_VARIANTS)}")

    def shape_list(text, option):
        try:
            shapes = [tuple(int(v) for v in item.split("x")) for item in text.split(",") if item]
            if not shapes or any(len(shape) != 2 or min(shape) < 1 for shape in shapes):
                raise ValueError
            return shapes
        except ValueError:
            parser.error(f"{option}: expected NxC[,NxC...], got {text!r}")
    try:
        sparse_ks = [int(k) for k in args.sparse_k.split(",") if k] if args.sparse_k else None
    except ValueError:
        parser.error(f"--sparse-k: expected integers, got {args.sparse_k!r}")
    started = time.perf_counter()
    mode = "dry" if args.dry_run else "quick" if args.quick else "full"
    plan = PLANS[mode]
    budget = args.time_budget or {"full": 300.0, "quick": 150.0, "dry": 1e9}[mode]
    end_of_cases, end_of_compiles = started + budget, started + 0.8 * budget
    # The sparse cases come last and have no compile: when other suites run before them, those
    # stop at 75 % of the budget (torch.compile at 60 %), so that the sparse ones get their share.
    end_of_dense = started + (1 - SPARSE_SHARE) * budget if "sparse" in suites and len(suites) > 1 else end_of_cases
    if end_of_dense < end_of_cases:
        end_of_compiles = started + 0.8 * (1 - SPARSE_SHARE) * budget
    chosen = [name for name in args.impls.split(",") if name]
    unknown = set(chosen) - set(IMPLS)
    if unknown:
        parser.error(f"unknown --impls {sorted(unknown)}")
    if "ours" not in chosen:
        chosen.insert(0, "ours")   # speed-ups are relative to ours
    # Each suite's impls, ours first (IMPLS order within CLASSIC_IMPLS is unchanged).
    impls = [name for name in CLASSIC_IMPLS if name in chosen]
    distill_impls = [name for name in DISTILL_IMPLS if name in chosen]
    sparse_impls = [name for name in SPARSE_IMPLS if name in chosen]
    shapes = (shape_list(args.shapes, "--shapes") if args.shapes
              else DRY_SHAPES if args.dry_run else QUICK_SHAPES if args.quick else SHAPES)
    distill_shapes = (shape_list(args.distill_shapes, "--distill-shapes") if args.distill_shapes
                      else shapes if args.shapes
                      else DRY_DISTILL_SHAPES if args.dry_run else QUICK_DISTILL_SHAPES if args.quick else DISTILL_SHAPES)
    sparse_shapes = (shape_list(args.sparse_shapes, "--sparse-shapes") if args.sparse_shapes
                     else DRY_SPARSE_SHAPES if args.dry_run else SPARSE_SHAPES)
    sparse_ks = sparse_ks or (DRY_SPARSE_KS if args.dry_run else SPARSE_KS)
    dtypes = [d for d in args.dtypes.split(",") if d]
    if set(dtypes) - set(DTYPES) or not dtypes:
        parser.error(f"unknown --dtypes {sorted(set(dtypes) - set(DTYPES))}; expected some of {DTYPES}")

    # The cases: (n, c, dtype, norm, mode, sparse, impls, deadline, seed)
    todo = []
    if "classic" in suites:
        todo += [(n, c, dtype, norm, None, None, impls, end_of_dense, 1000 * index) for index, (n, c, dtype, norm)
                 in enumerate((n, c, dtype, norm) for (n, c) in shapes for dtype in dtypes for norm in (False, True))]
    if "distill" in suites:
        todo += [(n, c, dtype, True, m, None, distill_impls, end_of_dense, 0) for (n, c) in distill_shapes
                 for dtype in dtypes for m in modes]
    if "sparse" in suites:
        todo += [(n, c, dtype, SPARSE_VARIANTS[v][1], None, (k, v), sparse_impls, end_of_cases, 0)
                 for (n, c) in sparse_shapes for k in sparse_ks for dtype in dtypes for v in variants]
    if args.list:   # the case list of this plan, one JSON line a case; nothing is run
        for n, c, dtype, norm, case_mode, sparse, case_impls, _, _ in todo:
            print(json.dumps({**case_keys(n, c, dtype, norm, case_mode, sparse), "impls": case_impls}))
        return 0
    if not args.out:
        parser.error("--out is required (except with --list)")
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)

    try:
        import torch
    except ImportError:
        torch = None
    if args.dry_run:
        if torch is not None:   # tiny tensors: one thread, else a busy machine's thread wake-ups cost ms per op
            torch.set_num_threads(1)
        env = DryEnv(torch)
    else:
        if torch is None or not torch.cuda.is_available():
            print("bench_kl.py: no CUDA GPU through torch here (torch %s); this benchmark measures GPUs only. "
                  "Use --dry-run to check the script on the CPU." % ("missing" if torch is None else torch.__version__),
                  file=sys.stderr)
            return 2
        env = GpuEnv(torch)

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
        "suites": suites,
        "copy": {}, "overhead": {}, "cases": [], "errors": [],
    }
    if "distill" in suites:
        results["distill"] = {
            "modes": {name: dict(zip(("divergence", "temperature", "beta"), MODES[name])) for name in modes},
            "normTarget": True, "shapes": [list(shape) for shape in distill_shapes],
            "impls": {name: DISTILL_DESCRIPTIONS[name] for name in distill_impls},
            "errors_and_grads": "E = mean over rows of the mode's divergence at temperature T (no T^2 factor); "
                                "grad_rel_error: max |grad - float64 reference| / max |reference| of dE/dpred",
            "bandwidth": "ideal bytes = 3 * N * C * itemsize, as the classic suite; what ours' kernels move is "
                         "cost_model.py's predict(N, C, dtype, normTarget, divergence=...)['bytes_per_element'] "
                         "(a model figure)",
        }
    if "sparse" in suites:
        results["sparse"] = {
            "shapes": [list(shape) for shape in sparse_shapes], "K": sparse_ks,
            "variants": {name: {"sparseTail": tail, "normTarget": norm}
                         for name, (tail, norm) in SPARSE_VARIANTS.items() if name in variants},
            "impls": {name: DISTILL_DESCRIPTIONS["ours"] if name == "ours" else DESCRIPTIONS[name]
                      for name in sparse_impls},
            "teacher": "the top K of a full row of 2 * randn logits: values = those logits (normTarget) or the "
                       "full softmax's probabilities there (sum s < 1)",
            "bandwidth": "ideal bytes = 2 * N * C * itemsize + N * K * (8 + itemsize) (pred read, grad written, "
                         "the K int64 indices and values read), the same count for every impl, dense ones too",
        }
    json_path = out_dir / "results.json"

    def save():
        results["wall_s"] = round(time.perf_counter() - started, 1)
        write_json(json_path, results)

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

    # 2. The Python overhead of a small call (the classic impls).
    if "classic" in suites:
        results["overhead"] = overhead(env, impls, OVERHEAD_CALLS[mode], results, end_of_compiles)
        save()

    # 3. The cases.
    for index, (n, c, dtype, norm, case_mode, sparse, case_impls, deadline, seed) in enumerate(todo):
        keys = case_keys(n, c, dtype, norm, case_mode, sparse)
        seed = seed or 1000 * index
        label = f"[{index + 1}/{len(todo)}] {case_label(keys)}"
        if sparse and sparse[0] > c:
            results["cases"].append({**keys, "skipped": f"K={sparse[0]} > C={c}"})
            print(f"{label}: skipped (K > C)", flush=True)
            continue
        if time.perf_counter() > deadline:
            results["cases"].append({**keys, "skipped": "time budget spent"})
            print(f"{label}: skipped (time budget spent)", flush=True)
            continue
        case = None
        try:
            case = Case(env, n, c, dtype, norm, seed=seed, mode=case_mode, sparse=sparse)
            record = run_case(env, case, case_impls, plan, results, end_of_compiles)
        except Skip as exc:
            record = {**keys, "skipped": str(exc)}
        except Exception as exc:   # making the inputs failed (out of memory, say)
            record = {**keys, "error": err_text(exc)}
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
    pct = "%host" if dry else "%copy"
    lines.append(f"cp@sz: a copy of the case's ideal bytes (half read, half written) as a {pct} too: what a kernel "
                 "of that size can reach (classic cases)")
    bad = []
    sections = [("classic", "", peers,
                 lambda case: f"{('yes' if case['normTarget'] else 'no'):>5}", f"{'normT':>5}")]
    if results.get("distill"):
        sections.append(("distill", "distillation modes, normTarget=True on logits (forward_t2: T = 2; jsd: "
                         "beta = 0.5; liger fed log_softmax outputs, timed)", list(results["distill"]["impls"])[1:],
                         lambda case: f"{case['mode']:>10}", f"{'mode':>10}"))
    if results.get("sparse"):
        sections.append(("sparse", "sparse top-k teacher vs the same teacher dense; GB/s and %s count the sparse "
                         "ideal bytes for every impl" % pct, list(results["sparse"]["impls"])[1:],
                         lambda case: f"{case['K']:>5} {case['variant']:>12}", f"{'K':>5} {'variant':>12}"))
    for suite, title, suite_peers, key_of, key_head in sections:
        cases = [c for c in results["cases"] if c.get("suite", "classic") == suite]
        if not cases:
            continue
        lines.append("")
        if title:
            lines.append(f"{suite}: {title}")
        head = f"{'N x C':>14} {'dtype':>8} {key_head} | {'ours us':>9} {'GB/s':>7} {pct:>6} {'cp@sz':>6} |"
        width = max([9] + [len(SHORT[p]) for p in suite_peers])
        head += "".join(f" {SHORT[p]:>{width}}" for p in suite_peers) + "  (speed-up of ours: peer time / ours time)"
        lines.append(head)
        lines.append("-" * len(head))
        for case in cases:
            key = f"{case['N']:>6}x{case['C']:<7} {('f32' if case['dtype'] == 'float32' else 'bf16'):>8} " \
                  f"{key_of(case)} |"
            if "impls" not in case:
                lines.append(f"{key} {case.get('skipped') or 'ERROR: ' + str(case.get('error'))}")
                continue
            ours = case["impls"].get("ours", {})
            size_copy = case.get("copy_same_bytes", {}).get("fraction_of_copy")
            size_copy = f"{100 * size_copy:.0f}%" if size_copy else "-"
            if ours.get("median_s"):
                frac = ours.get("fraction_of_copy")
                row = f"{key} {ours['median_s'] * 1e6:>9.1f} {ours['GBps']:>7.{0 if ours['GBps'] >= 100 else 2}f} " \
                      f"{(f'{100 * frac:.0f}%' if frac else '-'):>6} {size_copy:>6} |"
                if not ours.get("grad_ok", True):
                    bad.append(f"{case_label(case)}: ours' grad off by {ours['grad_rel_error']:.2e} of max |grad|")
            else:
                row = f"{key} {cell_time(ours):>9} {'':>7} {'':>6} {size_copy:>6} |"
            row += "".join(f" {cell_speedup(case['impls'].get(p, {})):>{width}}" for p in suite_peers)
            lines.append(row)
    lines.append("")
    over = results.get("overhead", {})
    if over.get("impls"):
        cells = []
        for name, entry in over["impls"].items():
            cells.append(f"{SHORT[name]} {entry['us_per_call']:.1f}" if entry.get("us_per_call")
                         else f"{SHORT[name]} {'skipped' if 'skipped' in entry else 'err'}")
        lines.append(f"host us per call, {over['shape'][0]}x{over['shape'][1]} float32: " + " | ".join(cells))
    all_peers = list(dict.fromkeys(peers + [p for _, _, sp, _, _ in sections[1:] for p in sp]))
    for name in all_peers:
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
        impls = list(dict.fromkeys(list(results["impls"]) + list(results.get("distill", {}).get("impls", {}))
                                   + list(results.get("sparse", {}).get("impls", {}))))
        dtypes = sorted({c["dtype"] for c in results["cases"]}, key=DTYPES.index)
        most = max([len([c for c in results["cases"] if c["dtype"] == d]) for d in dtypes] + [1])
        fig, axes = plt.subplots(len(dtypes), 1, figsize=(max(13, 0.3 * most), 4.2 * max(len(dtypes), 1)),
                                 squeeze=False)
        width = 0.8 / len(impls)
        for ax, dtype in zip(axes[:, 0], dtypes):
            cases = [c for c in results["cases"] if c["dtype"] == dtype]
            for k, name in enumerate(impls):
                values = [c.get("impls", {}).get(name, {}).get("fraction_of_copy") or 0 for c in cases]
                ax.bar([i + (k - (len(impls) - 1) / 2) * width for i in range(len(cases))],
                       [100 * v for v in values], width, label=name)
            ax.set_xticks(range(len(cases)))
            ax.set_xticklabels([f"{c['N']}x{c['C']}\n" + (f"K={c['K']} {c['variant']}" if c.get("suite") == "sparse"
                                                            else c["mode"] if c.get("suite") == "distill"
                                                            else "normT" if c["normTarget"] else "probs")
                                for c in cases], fontsize=8 if len(cases) <= 24 else 5, rotation=0 if len(cases) <= 24 else 90)
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
