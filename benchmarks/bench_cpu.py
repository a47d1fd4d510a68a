"""The CPU path (NumPy backend) against PyTorch CPU, on the same float32 inputs.

For each shape: the median of >= 15 calls after warm-up of
  ours_1t/2t    KLDivergence(...)(pred, target) on NumPy arrays (error and grad), its row blocks on
                1 and 2 threads (puzzlelib_cost.backends.numpy_blocks.THREADS)
  torch_1t/2t   PyTorch autograd (F.kl_div on log_softmax, or F.cross_entropy for labels),
                forward + backward to pred, with 1 and 2 threads
  closed_1t     the closed form in PyTorch (softmax(pred) - p) / N and the error, no autograd
and the peak extra memory of ours during a call (tracemalloc: NumPy's allocations), as a
multiple of pred's bytes.

Ours runs with the compiled CPU blocks where numba (the `cpu` extra) is installed, else NumPy's
(PUZZLELIB_COST_CPU_KERNELS=numpy forces NumPy's); the header line says which.

The second table (COST_CASES): the other costs, float32, the same way: ours on 1 thread and on
the library's choice with 2 (THREADS = 2 for compiled blocks; NumPy's blocks of these costs keep
numpy_blocks.MEMORY_BOUND_THREADS, 1 as shipped: they measured slower on two) against
PyTorch autograd's forward + backward of the same mean loss at 1 and 2 threads: F.l1_loss,
F.mse_loss / 2, F.smooth_l1_loss, F.binary_cross_entropy_with_logits (its float labels made
before timing; ours takes the int32 labels), F.cross_entropy (int64 labels, both), the SVM's
one-vs-all hinge mean(clamp(1 - s (2 onehot(y) - 1), 0)) (the one-hot inside the timing, as ours
takes labels), Hinge's mean(clamp(1 - s y, 0)) (float labels in {-1, 0, 1}; ours int8), and
KLDivergence(divergence="reverse" / "jsd") against mean over rows of sum q (log q - log p) and
of KL(p || m) / 2 + KL(q || m) / 2 (F.kl_div, m = (p + q) / 2), q = softmax(pred).

Each figure is the median over --rounds rounds (3) of the median of --runs calls (15) after
warm-up; a round times every candidate of a shape in turn (timed_rounds).

Usage: python3 benchmarks/bench_cpu.py [--runs 15] [--rounds 3] [--json FILE] [--only kl|costs]
"""
import argparse
import functools
import json
import statistics
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import puzzlelib_cost  # noqa: E402
from puzzlelib_cost import KLDivergence  # noqa: E402

from puzzlelib_cost.backends import numpy_blocks  # noqa: E402

# (N, C, normTarget, labels)
SHAPES = [(256, 1000, False, False), (64, 32000, False, False), (16, 128256, False, False),
          (1024, 1024, False, False), (64, 32000, True, False), (256, 1000, False, True), (64, 32000, False, True)]


def inputs(n, c, norm, labels, seed=0):
    rng = np.random.default_rng(seed)
    pred = (2 * rng.standard_normal((n, c))).astype(np.float32)
    if labels:
        return pred, rng.integers(0, c, n).astype(np.int64)
    raw = rng.standard_normal((n, c)).astype(np.float32)
    if norm:
        return pred, raw
    e = np.exp(2 * raw - (2 * raw).max(1, keepdims=True))
    return pred, (e / e.sum(1, keepdims=True)).astype(np.float32)


def median_time(fn, runs, warmup=3):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def timed_rounds(candidates, args):
    """{key: seconds} for candidates [(key, threads setting, fn)]: args.rounds rounds, each timing
    every candidate in turn (median_time), and per key the median over the rounds.  Interleaving
    ours and PyTorch's, 1 and 2 threads, gives each the same share of a noisy machine's quiet and
    busy spells (single figures of about a millisecond moved by 30 % on the 2-core VM measured)."""
    times = {key: [] for key, _, _ in candidates}
    for _ in range(args.rounds):
        for key, set_threads_for, fn in candidates:
            set_threads_for()
            times[key].append(median_time(fn, args.runs))
    return {key: statistics.median(values) for key, values in times.items()}


def peak_extra(fn):
    tracemalloc.start()
    tracemalloc.reset_peak()
    fn()
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return peak


def torch_fns(torch, pred, target, norm, labels):
    F = torch.nn.functional
    x, t = torch.from_numpy(pred), torch.from_numpy(target)

    def autograd():
        p = x.detach().requires_grad_()
        if labels:
            loss = F.cross_entropy(p, t)
        else:
            loss = F.kl_div(F.log_softmax(p, 1), F.log_softmax(t, 1) if norm else t, reduction="batchmean",
                            log_target=norm)
        loss.backward()
        return float(loss.detach()), p.grad

    def closed():
        with torch.no_grad():
            log_q = F.log_softmax(x, 1)
            if labels:
                error = -log_q.gather(1, t[:, None]).mean()
                grad = -log_q.exp()
                grad[torch.arange(len(t)), t] += 1
                return float(error), grad / len(t)
            log_p = F.log_softmax(t, 1) if norm else t.log()
            p = log_p.exp() if norm else t
            error = torch.where(p > 0, p * (log_p - log_q), 0).sum() / len(x)
            return float(error), (p - log_q.exp()) / len(x)
    return autograd, closed


# (cost, shape, make) -- make(rng) gives (pred, target): float32 pred, the target as the cost takes it
def _pair(shape):
    def make(rng):
        return (rng.standard_normal(shape).astype(np.float32), (rng.standard_normal(shape)).astype(np.float32))
    return make


def _labels(shape, classes, label_shape=None, dtype=np.int64, scale=1.0):
    def make(rng):
        return ((scale * rng.standard_normal(shape)).astype(np.float32),
                rng.integers(0, classes, label_shape or shape).astype(dtype))
    return make


def _distributions(shape):
    def make(rng):
        return inputs(*shape, False, False, seed=int(rng.integers(1 << 30)))
    return make


COST_CASES = [
    ("MSE", (1024, 1024), _pair((1024, 1024))), ("MSE", (64, 32000), _pair((64, 32000))),
    ("Abs", (1024, 1024), _pair((1024, 1024))), ("Abs", (64, 32000), _pair((64, 32000))),
    ("SmoothL1", (1024, 1024), _pair((1024, 1024))), ("SmoothL1", (64, 32000), _pair((64, 32000))),
    ("BCE", (1024, 1024), _labels((1024, 1024), 2, dtype=np.int32, scale=3.0)),
    ("BCE", (64, 32000), _labels((64, 32000), 2, dtype=np.int32, scale=3.0)),
    ("CrossEntropy", (16, 21, 128, 128), _labels((16, 21, 128, 128), 21, (16, 128, 128), scale=2.0)),
    ("SVM", (256, 1000), _labels((256, 1000), 1000, (256,), scale=1.5)),
    ("Hinge", (1024, 1024), _labels((1024, 1024), 3, dtype=np.int8)),   # (labels 0, 1, 2: shifted to -1, 0, 1)
    ("reverse KL", (256, 1000), _distributions((256, 1000))), ("reverse KL", (64, 32000), _distributions((64, 32000))),
    ("JSD", (256, 1000), _distributions((256, 1000))), ("JSD", (64, 32000), _distributions((64, 32000))),
]


def make_cost(name):
    if name in ("reverse KL", "JSD"):
        return KLDivergence(divergence="reverse" if name == "reverse KL" else "jsd")
    return getattr(puzzlelib_cost, name)()


def torch_cost_fn(torch, name, pred, target):
    F = torch.nn.functional
    x = torch.from_numpy(pred)
    t = torch.from_numpy(target.astype(np.float32) if name in ("BCE", "Hinge") else target)

    def loss(p):
        if name == "MSE":
            return F.mse_loss(p, t) / 2
        if name == "Abs":
            return F.l1_loss(p, t)
        if name == "SmoothL1":
            return F.smooth_l1_loss(p, t, beta=1.0)
        if name == "BCE":
            return F.binary_cross_entropy_with_logits(p, t)
        if name == "CrossEntropy":
            return F.cross_entropy(p, t)
        if name == "Hinge":
            return torch.clamp(1 - p * t, min=0).mean()
        if name in ("reverse KL", "JSD"):   # per-row sums, mean over rows; q = softmax(pred)
            log_q, log_p = F.log_softmax(p, 1), t.log()
            if name == "reverse KL":
                return (log_q.exp() * (log_q - log_p)).sum(1).mean()
            m = 0.5 * (t + log_q.exp())
            return (0.5 * F.kl_div(m.log(), t, reduction="sum") + 0.5 * F.kl_div(m.log(), log_q, reduction="sum",
                                                                               log_target=True)) / p.shape[0]
        cls = 2 * F.one_hot(t, p.shape[1]).to(p.dtype) - 1
        return torch.clamp(1 - p * cls, min=0).mean()

    def autograd():
        p = x.detach().requires_grad_()
        value = loss(p)
        value.backward()
        return float(value.detach()), p.grad
    return autograd


MEMORY_BOUND_DEFAULT = numpy_blocks.MEMORY_BOUND_THREADS


def set_threads(threads):
    """Ours on at most `threads` threads: 1, or the library's own choice with two cores (THREADS = 2
    for the row softmax and the compiled blocks, MEMORY_BOUND_THREADS as it ships)."""
    numpy_blocks.THREADS = threads
    numpy_blocks.MEMORY_BOUND_THREADS = 1 if threads == 1 else MEMORY_BOUND_DEFAULT


def bench_costs(args, torch):
    rows = []
    print(f"\n{'cost':>12} {'shape':>17} {'ours 1t':>8} {'ours 2t':>8} {'torch 1t':>8} {'torch 2t':>8} "
          f"{'1t ratio':>8} {'2t ratio':>8} {'peak x pred':>11}   (ms; ratio = ours / torch autograd)")
    for name, shape, make in COST_CASES:
        pred, target = make(np.random.default_rng(0))
        if name == "Hinge":
            target = (target - 1).astype(np.int8)
        cost = make_cost(name)
        row = {"cost": name, "shape": list(shape)}
        candidates = [(f"ours_{k}t_s", functools.partial(set_threads, k), lambda: cost(pred, target)) for k in (1, 2)]
        if torch is not None:
            autograd = torch_cost_fn(torch, name, pred, target)
            candidates += [(f"torch_{k}t_s", functools.partial(torch.set_num_threads, k), autograd) for k in (1, 2)]
        row.update(timed_rounds(candidates, args))
        row["peak_extra_x_pred"] = peak_extra(lambda: cost(pred, target)) / pred.nbytes
        rows.append(row)
        o1, o2 = row["ours_1t_s"], row["ours_2t_s"]
        t1, t2 = (row.get(k, float("nan")) for k in ("torch_1t_s", "torch_2t_s"))
        print(f"{name:>12} {'x'.join(map(str, shape)):>17} {o1 * 1e3:8.2f} {o2 * 1e3:8.2f} {t1 * 1e3:8.2f} "
              f"{t2 * 1e3:8.2f} {o1 / t1:8.2f} {o2 / t2:8.2f} {row['peak_extra_x_pred']:11.1f}", flush=True)
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=15, help="calls timed a round (their median)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds (each candidate's figure: the median over them)")
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--only", choices=["kl", "costs"], help="one table only")
    args = parser.parse_args(argv)
    try:
        import torch
    except ImportError:
        torch = None
    from puzzlelib_cost import cpu_kernels
    blocks = "compiled (cpu_kernels, numba)" if cpu_kernels.compiled() is not None else "NumPy's"
    print(f"ours: {blocks} CPU blocks")
    results = {"torch": getattr(torch, "__version__", None), "cpu_blocks": blocks}
    if args.only != "costs":
        results["rows"] = bench_kl(args, torch)
    if args.only != "kl":
        results["costs"] = bench_costs(args, torch)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


def bench_kl(args, torch):
    rows = []
    print(f"{'shape':>12} {'normT':>5} {'labels':>6} {'ours 1t':>8} {'ours 2t':>8} {'torch 1t':>8} {'torch 2t':>8} "
          f"{'closed 1t':>9} {'1t ratio':>8} {'2t ratio':>8} {'peak x pred':>11}   (ms; ratio = ours / torch)")
    for n, c, norm, labels in SHAPES:
        pred, target = inputs(n, c, norm, labels)
        cost = KLDivergence(normTarget=norm)
        row = {"shape": [n, c], "norm_target": norm, "labels": labels}
        candidates = [(f"ours_{k}t_s", functools.partial(set_threads, k), lambda: cost(pred, target)) for k in (1, 2)]
        if torch is not None:
            autograd, closed = torch_fns(torch, pred, target, norm, labels)
            candidates += [(f"torch_{k}t_s", functools.partial(torch.set_num_threads, k), autograd) for k in (1, 2)]
            candidates.append(("closed_1t_s", functools.partial(torch.set_num_threads, 1), closed))
        row.update(timed_rounds(candidates, args))
        peak = peak_extra(lambda: cost(pred, target)) / pred.nbytes
        row["peak_extra_x_pred"] = peak
        rows.append(row)
        o1, o2 = row["ours_1t_s"], row["ours_2t_s"]
        t1, t2, cl = (row.get(k, float("nan")) for k in ("torch_1t_s", "torch_2t_s", "closed_1t_s"))
        print(f"{n:>5}x{c:<6} {str(norm):>5} {str(labels):>6} {o1 * 1e3:8.2f} {o2 * 1e3:8.2f} {t1 * 1e3:8.2f} "
              f"{t2 * 1e3:8.2f} {cl * 1e3:9.2f} {o1 / t1:8.2f} {o2 / t2:8.2f} {peak:11.1f}", flush=True)
    return rows


if __name__ == "__main__":
    sys.exit(main())
