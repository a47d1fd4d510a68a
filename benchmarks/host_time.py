#!/usr/bin/env python3
"""The library's host time a call on its pycuda path, measured without a GPU: the calls run on the
driver stand-in (tests/driver_standin) with its kernels not run, so what is timed is the Python
and the driver calls a call makes, not the CPU emulation of its kernels.

    python3 benchmarks/host_time.py [--calls 300] [--profile NAME]

A small call on a GPU is host-bound (its kernels take microseconds): this is most of its time (and
with device labels, whose check was read back each call until 2026-11-28, the GPU waited for it
too).  The stand-in's driver calls are cheaper than a real driver's (no kernel-mode work), so a
GPU's host adds to these figures; they compare versions of the library on one machine.  Each case: the median over 7 rounds
of --calls calls (after warm-up) of the time a call, queryError=False (as a training step calls),
and the driver calls one call makes.  Needs what the tests' pycuda path needs (a C++ compiler,
nvcc for the cubin; the first run builds pycuda against the stand-in, minutes).
"""
import argparse
import collections
import cProfile
import pstats
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "benchmarks"), str(ROOT / "tests"), str(ROOT)]

from profile_host import seconds_a_call  # noqa: E402  (the same timing as on a GPU's host)


def standin_with_kernels():
    """The stand-in, loaded and bound to pycuda, with the library's cubin registered."""
    import driver_standin
    from cuda_emulation import build
    from puzzlelib_cost.backends.kernel_build import MAIN_SOURCE, cached_cubin
    standin = driver_standin.activate()
    kernels = ROOT / "kernels"
    standin.register_cubin(cached_cubin("sm_90"), build([kernels / MAIN_SOURCE], include_dirs=[kernels]))
    return standin


def cases():
    """name: a call (pycuda arrays from the library's gpuarray, 32 x 10 float32)."""
    import numpy as np
    import puzzlelib_cost
    from puzzlelib_cost import gpuarray
    rng = np.random.default_rng(0)
    pred = gpuarray.to_gpu(rng.standard_normal((32, 10)).astype(np.float32))
    target = gpuarray.to_gpu(rng.random((32, 10)).astype(np.float32))
    labels = gpuarray.to_gpu(rng.integers(0, 10, 32).astype(np.int32))
    t, n, v, length = 150, 32, 29, 40   # (bench_ctc.py's small case)
    logits = gpuarray.to_gpu(rng.standard_normal((t, n, v)).astype(np.float32))
    datalen = gpuarray.to_gpu(np.full(n, t, np.int32))
    sequences = gpuarray.to_gpu(rng.integers(1, v, n * length).astype(np.int32))
    lengths = np.full(n, length, np.int32)
    top = np.argsort(rng.random((32, 10)), axis=1)[:, :4]   # (a teacher's top 4: distinct columns)
    teacher = [gpuarray.to_gpu(top.astype(np.int32)), gpuarray.to_gpu(np.full((32, 4), 0.2, np.float32))]
    kl, mse, ce = puzzlelib_cost.KLDivergence(normTarget=True), puzzlelib_cost.MSE(), puzzlelib_cost.CrossEntropy()
    sparse = puzzlelib_cost.KLDivergence()
    ignoring = puzzlelib_cost.KLDivergence(ignoreLabel=-100)
    padded = gpuarray.to_gpu(np.where(np.arange(32) % 4 == 3, -100, rng.integers(0, 10, 32)).astype(np.int64))
    ctc = puzzlelib_cost.CTC(blank=0)
    return {"KLDivergence 32x10": lambda: kl(pred, target, queryError=False),
            "KLDivergence 32x10, error read": lambda: kl(pred, target),
            "KLDivergence 32x10, sparse teacher": lambda: sparse(pred, teacher, queryError=False),
            "KLDivergence 32x10, ignoreLabel": lambda: ignoring(pred, padded, queryError=False),
            "MSE 32x10": lambda: mse(pred, target, queryError=False),
            "CrossEntropy 32x10, device labels": lambda: ce(pred, labels, queryError=False),
            f"CTC T={t} N={n} V={v} L={length}": lambda: ctc([logits, datalen], [sequences, lengths], queryError=False)}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=300)
    parser.add_argument("--profile", help="a case's name (its start will do): cProfile's top functions of it")
    args = parser.parse_args(argv)
    standin = standin_with_kernels()
    from puzzlelib_cost import active_backend, backends
    backends.forget_cuda()
    if active_backend() != "cuda":
        sys.exit("host_time: the stand-in did not make the CUDA backend usable")
    calls = cases()
    for call in calls.values():   # (with kernels run once: loaded, scalars made, labels' answers real)
        call()
    standin.set_run_kernels(False)
    try:
        measure(standin, calls, args)
    finally:
        standin.set_run_kernels(True)


def measure(standin, calls, args):
    print(f"host time a call on the pycuda path (driver stand-in, kernels not run; median of 7 rounds of "
          f"{args.calls}):")
    for name, call in calls.items():
        seconds = seconds_a_call(call, args.calls, 7)
        standin.clear()
        call()
        driver_calls = collections.Counter(standin.driver_calls())
        print(f"  {name:36s} {seconds * 1e6:7.1f} us   {sum(driver_calls.values())} driver calls: "
              + ", ".join(f"{n} {k}" for k, n in driver_calls.most_common()))
    if args.profile:
        name = next(n for n in calls if n.startswith(args.profile))
        profile = cProfile.Profile()
        profile.enable()
        for _ in range(args.calls):
            calls[name]()
        profile.disable()
        print(f"\n==== {name}")
        pstats.Stats(profile, stream=sys.stdout).sort_stats("tottime").print_stats(25)


if __name__ == "__main__":
    main()
