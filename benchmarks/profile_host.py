#!/usr/bin/env python3
"""Where the host's time goes in one call, on a GPU: cProfile over repeated calls of a small case
of each path that measured host-bound (the H200 run at a0916b1: CTC at T=150, N=32 took 1.28 ms a
call, its host queueing time equal to its device time; the nn modules 2-6x the plain call).

    python3 benchmarks/profile_host.py --out DIR          # GPU machine (torch with CUDA, pycuda)
    python3 benchmarks/profile_host.py --out DIR --cpu    # the same cases on CPU tensors (the NumPy backend)

For each case: the wall time a call (median of 5 rounds of --calls calls, after warm-up, each
round ended by a device synchronisation), then the profile's top functions by cumulative time.
Writes DIR/profile_host.txt.  A measurement of the host, not of the kernels.
"""
import argparse
import cProfile
import io
import pstats
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def cases(torch, device):
    """name: a function making one call (error and grad, as a training step asks for them)."""
    import puzzlelib_cost
    import puzzlelib_cost.nn as pnn
    gen = torch.Generator(device="cpu").manual_seed(0)
    pred = torch.randn(32, 10, generator=gen).to(device)
    target = torch.randn(32, 10, generator=gen).to(device)
    leaf = pred.clone().requires_grad_()
    t, n, v, length = 150, 32, 29, 40
    logits = torch.randn(t, n, v, generator=gen).to(device)
    datalen = torch.full((n,), t, dtype=torch.int32).to(device)
    labels = torch.randint(1, v, (n * length,), generator=gen, dtype=torch.int32).to(device)
    lengths = torch.full((n,), length, dtype=torch.int32).numpy()
    if device == "cpu":   # (the library's own calls take NumPy arrays on the CPU; the module, tensors)
        pred_l, target_l, logits_l, datalen_l, labels_l = (x.numpy() for x in (pred, target, logits, datalen, labels))
    else:
        pred_l, target_l, logits_l, datalen_l, labels_l = pred, target, logits, datalen, labels
    kl, mse, ctc, module = puzzlelib_cost.KLDivergence(normTarget=True), puzzlelib_cost.MSE(), \
        puzzlelib_cost.CTC(blank=0), pnn.MSE()

    def nn_step():
        leaf.grad = None
        module(leaf, target).backward()
    return {"KLDivergence 32x10": lambda: kl(pred_l, target_l, queryError=False),
            "MSE 32x10": lambda: mse(pred_l, target_l, queryError=False),
            "nn.MSE 32x10 forward+backward": nn_step,
            f"CTC T={t} N={n} V={v} L={length}": lambda: ctc([logits_l, datalen_l], [labels_l, lengths],
                                                              queryError=False)}


def seconds_a_call(call, calls, rounds, sync=lambda: None, warmup=20):
    """The wall time a call of `call`: the median over `rounds` rounds of `calls` calls, after
    `warmup` calls, each round ended by sync() (a device synchronisation, so that a round counts
    the work its calls queued)."""
    for _ in range(warmup):
        call()
    sync()
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(calls):
            call()
        sync()
        times.append((time.perf_counter() - start) / calls)
    return statistics.median(times)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--cpu", action="store_true", help="CPU tensors (no GPU needed)")
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args(argv)
    import torch
    device = "cpu" if args.cpu else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        print("profile_host: no CUDA device (pass --cpu to profile the CPU path)", file=sys.stderr)
        return 2
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    report = io.StringIO()
    for name, call in cases(torch, device).items():
        seconds = seconds_a_call(call, args.calls, 5, sync)
        profile = cProfile.Profile()
        profile.enable()
        for _ in range(args.calls):
            call()
        sync()
        profile.disable()
        text = io.StringIO()
        pstats.Stats(profile, stream=text).sort_stats("cumulative").print_stats(args.top)
        line = f"==== {name} on {device}: {seconds * 1e6:.1f} us a call (median of 5 rounds of {args.calls})"
        print(line, flush=True)
        report.write(line + "\n" + text.getvalue() + "\n")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "profile_host.txt").write_text(report.getvalue())
    return 0


if __name__ == "__main__":
    sys.exit(main())
