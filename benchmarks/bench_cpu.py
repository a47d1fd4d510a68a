"""The CPU path (NumPy backend) against PyTorch CPU, on the same float32 inputs.

For each shape: the median of >= 15 calls after warm-up of
  ours_1t/2t    KLDivergence(...)(pred, target) on NumPy arrays (error and grad), its row blocks on
                1 and 2 threads (puzzlelib_cost.row_softmax.THREADS)
  torch_1t/2t   PyTorch autograd (F.kl_div on log_softmax, or F.cross_entropy for labels),
                forward + backward to pred, with 1 and 2 threads
  closed_1t     the closed form in PyTorch (softmax(pred) - p) / N and the error, no autograd
and the peak extra memory of ours during a call (tracemalloc: NumPy's allocations), as a
multiple of pred's bytes.  Usage: python3 benchmarks/bench_cpu.py [--runs 15] [--json FILE]
"""
import argparse
import json
import statistics
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from puzzlelib_cost import KLDivergence, row_softmax  # noqa: E402

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


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=15)
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)
    try:
        import torch
    except ImportError:
        torch = None
    rows = []
    print(f"{'shape':>12} {'normT':>5} {'labels':>6} {'ours 1t':>8} {'ours 2t':>8} {'torch 1t':>8} {'torch 2t':>8} "
          f"{'closed 1t':>9} {'1t ratio':>8} {'2t ratio':>8} {'peak x pred':>11}   (ms; ratio = ours / torch)")
    for n, c, norm, labels in SHAPES:
        pred, target = inputs(n, c, norm, labels)
        cost = KLDivergence(normTarget=norm)
        row = {"shape": [n, c], "norm_target": norm, "labels": labels}
        for threads in (1, 2):
            row_softmax.THREADS = threads
            row[f"ours_{threads}t_s"] = median_time(lambda: cost(pred, target), args.runs)
        peak = peak_extra(lambda: cost(pred, target)) / pred.nbytes
        row["peak_extra_x_pred"] = peak
        if torch is not None:
            autograd, closed = torch_fns(torch, pred, target, norm, labels)
            for threads in (1, 2):
                torch.set_num_threads(threads)
                row[f"torch_{threads}t_s"] = median_time(autograd, args.runs)
            torch.set_num_threads(1)
            row["closed_1t_s"] = median_time(closed, args.runs)
        rows.append(row)
        o1, o2 = row["ours_1t_s"], row["ours_2t_s"]
        t1, t2, cl = (row.get(k, float("nan")) for k in ("torch_1t_s", "torch_2t_s", "closed_1t_s"))
        print(f"{n:>5}x{c:<6} {str(norm):>5} {str(labels):>6} {o1 * 1e3:8.2f} {o2 * 1e3:8.2f} {t1 * 1e3:8.2f} "
              f"{t2 * 1e3:8.2f} {cl * 1e3:9.2f} {o1 / t1:8.2f} {o2 / t2:8.2f} {peak:11.1f}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"torch": getattr(torch, "__version__", None), "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
