#!/usr/bin/env python3
"""CTC (puzzlelib_cost.CTC) against PyTorch's ctc_loss, error and gradient, on one GPU.

    python3 benchmarks/bench_ctc.py --out DIR             # GPU machine (torch with CUDA, pycuda)
    python3 benchmarks/bench_ctc.py --out DIR --dry-run   # tiny sizes on the CPU: checks the script only

For each case (T frames, N sequences, V classes, labels of about L each; datalen = T, label
lengths drawn in [0.75 L, L]) the time of one call that yields the error and the gradient with
respect to the logits:
  ours            CTC(blank=0)([x, datalen], [labels, lengths], queryError=False): x, datalen and
                  labels CUDA torch tensors in place, lengths a host array (PuzzleLib's usage);
                  labels are range-checked on the host, so a call synchronises once
  torch_native    F.ctc_loss(F.log_softmax(x, 2), targets, ..., reduction="sum") / N, backward;
                  targets concatenated int64 on the GPU (PyTorch's own CUDA kernels)
  torch_cudnn     the same with int32 targets and lengths on the CPU, which lets PyTorch take
                  cuDNN's CTC where it accepts the case (blank 0, every input length T, labels
                  of at most 256); otherwise it falls back to its native kernels
Device time from CUDA events (bench_kl.py's timer and measure()); "grad_vs_torch" is
max |ours + torch's grad| / max |torch's grad| (ours is the negative gradient).  Writes
DIR/ctc.json.  Without a GPU it refuses (exit 2) unless --dry-run.
"""
import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench_kl import PLANS, CpuTimer, CudaTimer, err_text, git_commit, measure  # noqa: E402

# (T, N, V, L) on the GPU, and the dry run's stand-ins
GPU_CASES = [(150, 32, 29, 40), (1000, 16, 5000, 100)]
DRY_CASES = [(30, 4, 29, 8), (60, 2, 200, 12)]


def make_inputs(t, n, v, length, seed):
    """Logits (float32), datalen, concatenated labels in [1, V) and lengths, as NumPy arrays."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((t, n, v)).astype(np.float32)
    lengths = rng.integers(max(int(0.75 * length), 1), length + 1, size=n).astype(np.int32)
    labels = rng.integers(1, v, size=int(lengths.sum())).astype(np.int32)
    return x, np.full(n, t, np.int32), labels, lengths


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--dry-run", action="store_true")
    args = parser.parse_args(argv)
    import torch
    import torch.nn.functional as F
    from puzzlelib_cost import CTC
    if not args.dry_run and not torch.cuda.is_available():
        print("bench_ctc.py: no CUDA GPU through torch; use --dry-run on the CPU", file=sys.stderr)
        return 2
    device = "cpu" if args.dry_run else "cuda"
    timer = CpuTimer() if args.dry_run else CudaTimer(torch)
    plan = PLANS["dry" if args.dry_run else "full"]
    name = "CPU (NumPy backend, CPU torch) - DRY RUN, no GPU" if args.dry_run else torch.cuda.get_device_name(0)
    results = {"device": name, "dry_run": args.dry_run, "date": time.strftime("%Y-%m-%d"), "commit": git_commit()[0],
               "timer": timer.method, "cases": []}
    for t, n, v, length in (DRY_CASES if args.dry_run else GPU_CASES):
        x, datalen, labels, lengths = make_inputs(t, n, v, length, seed=t * n)
        xt = torch.from_numpy(x).to(device)
        if args.dry_run:   # the NumPy backend takes NumPy arrays
            ours_in = ([x, datalen], [labels, lengths])
        else:
            ours_in = ([xt, torch.from_numpy(datalen).to(device)], [torch.from_numpy(labels).to(device), lengths])
        cost = CTC(blank=0)
        native = (torch.from_numpy(labels).long().to(device), torch.from_numpy(datalen).long().to(device),
                  torch.from_numpy(lengths).long().to(device))
        cudnn = (torch.from_numpy(labels), torch.from_numpy(datalen), torch.from_numpy(lengths))   # int32, CPU

        def torch_call(targets, keep=None):
            p = xt.detach().requires_grad_()
            loss = F.ctc_loss(F.log_softmax(p, 2), *targets, blank=0, reduction="sum") / n
            loss.backward()
            if keep is not None:
                keep.append((loss.item(), p.grad))
            return p.grad

        impls = {"ours": lambda i: cost(*ours_in, queryError=False),
                 "torch_native": lambda i: torch_call(native), "torch_cudnn": lambda i: torch_call(cudnn)}
        entry = {"T": t, "N": n, "V": v, "L": length, "label_lengths": lengths.tolist(), "dtype": "float32",
                 "impls": {}}
        try:   # agreement first (outside the timing)
            kept = []
            torch_call(native, kept)
            error, grad = cost(*ours_in)
            grad = grad if isinstance(grad, np.ndarray) else grad.cpu().numpy()
            ref_error, ref_grad = kept[0][0], kept[0][1].cpu().numpy()
            entry["error_vs_torch"] = abs(error - ref_error) / abs(ref_error)
            entry["grad_vs_torch"] = float(np.abs(grad + ref_grad).max() / np.abs(ref_grad).max())
        except Exception as exc:
            entry["check_error"] = err_text(exc)
        for impl, fn in impls.items():
            try:
                entry["impls"][impl] = measure(fn, timer, plan)
            except Exception as exc:   # a peer that cannot run here is recorded, not fatal
                entry["impls"][impl] = {"error": err_text(exc)}
        results["cases"].append(entry)
        cells = "  ".join(f"{impl} {f['median_s'] * 1e6:10.1f} us" if "median_s" in f else f"{impl} failed"
                          for impl, f in entry["impls"].items())
        agree = (f"  error {entry['error_vs_torch']:.1e}, grad {entry['grad_vs_torch']:.1e} vs torch"
                 if "grad_vs_torch" in entry else "  (check failed)")
        print(f"CTC T={t:<5d} N={n:<3d} V={v:<5d} L<={length:<4d} {cells}{agree}", flush=True)
    if args.dry_run:
        print("DRY RUN on CPU - not GPU figures")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "ctc.json").write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
