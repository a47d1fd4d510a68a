"""Every cost of the Cost module against PyTorch eager and torch.compile, on the same inputs.

For each case, the time of one call that gives the gradient with respect to pred:
  ours           grad = cost(pred, target, queryError=False) on CUDA torch tensors in place (a
                 training step: no host wait)
  ours_error     error, grad = cost(pred, target), for the costs that take labels: the error read
                 (a host wait), the labels' check answered after the work is queued (the timer
                 keeps the last grads, as a loop's `grad` does: Cost._lastGradKeptAnyway)
  torch_eager    the same loss written with torch.nn.functional, forward + autograd backward
  torch_compile  that function under torch.compile
  ours_nn        puzzlelib_cost.nn's module of the cost, forward + backward (torch tensors)
  liger          Liger-Kernel's module where it has one (CrossEntropy, KLDivergence), when installed
Device time from CUDA events (median after warm-up; bench_kl.py's timer and measure()), each
impl rotating through the same input sets (bench_kl.input_sets: a round of them 3x the L2, so
that the inputs come from DRAM, not the cache); ideal bytes (inputs read once, grad written once,
labels at 4 bytes, as int32: what ours uploads, but 8 for CrossEntropy's 2-D rows) over the time,
as a fraction of the measured
device-to-device copy bandwidth.  DIR/costs.json is rewritten after each case.  --dry-run runs tiny sizes on the
CPU (NumPy backend, CPU torch) to check the script.  Usage:
    python3 benchmarks/bench_costs.py --out DIR [--dry-run] [--dtypes float32,bfloat16]
"""
import argparse
import sys
import time
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench_kl import (COPY_BYTES, PLANS, DryEnv, GpuEnv, err_text, git_commit, input_sets, measure,  # noqa: E402
                      write_json)

# name: (shape on the GPU, shape in a dry run, target kind)
LABEL_KINDS = ("class", "binary", "sign")   # (the target kinds of the costs that take integer labels)
CASES = {
    "MSE": ((4096, 16384), (64, 100), "pair"), "Abs": ((4096, 16384), (64, 100), "pair"),
    "SmoothL1": ((4096, 16384), (64, 100), "pair"), "BCE": ((4096, 16384), (64, 100), "binary"),
    "Hinge": ((4096, 16384), (64, 100), "sign"), "SVM": ((16384, 1000), (64, 10), "class"),
    "CrossEntropy": ((16384, 1000), (64, 10), "class"), "CrossEntropy spatial": ((16, 21, 512, 512), (2, 5, 8, 8), "class"),
    "KLDivergence": ((16384, 1000), (64, 10), "logits"),
}


def torch_loss(name, F, torch):
    """The peer's loss(pred, target) for a cost, with our normalisation."""
    def svm(s, y):
        cls = 2 * F.one_hot(y, s.shape[1]).to(s.dtype) - 1
        return torch.clamp(1 - s * cls, min=0).sum() / s.numel()
    return {"MSE": lambda p, t: 0.5 * F.mse_loss(p, t), "Abs": F.l1_loss, "SmoothL1": F.smooth_l1_loss,
            "BCE": F.binary_cross_entropy_with_logits,
            "Hinge": lambda s, y: torch.clamp(1 - s * y, min=0).mean(), "SVM": svm,
            "CrossEntropy": F.cross_entropy, "CrossEntropy spatial": F.cross_entropy,
            "KLDivergence": lambda p, t: F.kl_div(F.log_softmax(p, 1), F.log_softmax(t, 1), reduction="batchmean",
                                                  log_target=True)}[name]


def liger_loss(name):
    """Liger-Kernel's module for the cost, or None (not installed, or no such module)."""
    try:
        from liger_kernel.transformers import LigerCrossEntropyLoss, LigerKLDIVLoss
    except ImportError:
        return None
    if name == "CrossEntropy":
        return LigerCrossEntropyLoss()
    if name == "KLDivergence":
        kl = LigerKLDIVLoss(reduction="batchmean", log_target=True)
        import torch.nn.functional as F
        return lambda p, t: kl(F.log_softmax(p, 1), F.log_softmax(t, 1))
    return None


def make_case(torch, device, name, shape, kind, dtype, seed):
    gen = torch.Generator(device=device).manual_seed(seed)
    pred = torch.randn(*shape, device=device, generator=gen).to(dtype)
    if kind in ("pair", "logits"):
        target = torch.randn(*shape, device=device, generator=gen).to(dtype)
        return pred, target, target
    if kind == "binary":
        labels = torch.randint(0, 2, shape, device=device, generator=gen, dtype=torch.int32)
        return pred, labels, labels.to(dtype)
    if kind == "sign":
        labels = (2 * torch.randint(0, 2, shape, device=device, generator=gen, dtype=torch.int32) - 1)
        return pred, labels, labels.to(dtype)
    labels = torch.randint(0, shape[1], shape[:1] + shape[2:], device=device, generator=gen, dtype=torch.int32)
    return pred, labels, labels.long()


def ideal_bytes(pred, target):
    """pred read and grad written once, plus the target once, or its labels at 4 bytes (int32: the
    least a kernel can read them as; ours uploads int64 for CrossEntropy's 2-D rows)."""
    target_bytes = target.numel() * (target.element_size() if target.dtype == pred.dtype else 4)
    return 2 * pred.numel() * pred.element_size() + target_bytes


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--dry-run", action="store_true")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile (its compiles take minutes)")
    args = parser.parse_args(argv)
    import torch
    import torch.nn.functional as F
    import puzzlelib_cost
    import puzzlelib_cost.nn as pnn
    mode = "dry" if args.dry_run else "full"
    if not args.dry_run and not torch.cuda.is_available():
        print("bench_costs.py: no CUDA GPU through torch; use --dry-run on the CPU", file=sys.stderr)
        return 2
    env = DryEnv(torch) if args.dry_run else GpuEnv(torch)
    device = "cpu" if args.dry_run else "cuda"
    plan = PLANS[mode]
    copy_bytes, copy, copy_how = env.copy_bandwidth(COPY_BYTES["dry" if args.dry_run else "gpu"], plan)
    copy_bw = 2 * copy_bytes / copy["median_s"]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = {"device": env.device_name, "date": time.strftime("%Y-%m-%d"), "commit": git_commit()[0],
               "copy_bandwidth_Bps": copy_bw, "copy_method": copy_how, "timer": env.timer.method, "cases": []}
    for name, (gpu_shape, dry_shape, kind) in CASES.items():
        for dtype_name in args.dtypes.split(","):
            dtype = getattr(torch, dtype_name)
            if args.dry_run and dtype_name == "bfloat16":
                continue   # (NumPy's bfloat16 comes from ml_dtypes; the dry run checks the script only)
            shape = gpu_shape if not args.dry_run else dry_shape
            first = make_case(torch, device, name, shape, kind, dtype, 0)
            n_sets = input_sets(ideal_bytes(first[0], first[1]), env.l2_bytes)
            # (pred, our target, torch's target) of each set
            sets = [first] + [make_case(torch, device, name, shape, kind, dtype, k) for k in range(1, n_sets)]
            cost = getattr(puzzlelib_cost, name.split()[0])(**({"normTarget": True} if kind == "logits" else {}))
            module = getattr(pnn, name.split()[0])(**({"normTarget": True} if kind == "logits" else {}))
            ours_in = [(pred, target) if not args.dry_run else (pred.numpy(), target.numpy())
                       for pred, target, _ in sets]
            loss_fn = torch_loss(name, F, torch)

            def eager(i, fn=loss_fn, ours_target=False):
                pred, target, torch_target = sets[i % n_sets]
                p = pred.detach().requires_grad_()
                fn(p, target if ours_target else torch_target).backward()
                return p.grad
            impls = {"ours": lambda i: cost(*ours_in[i % n_sets], queryError=False),
                     "ours_nn": lambda i: eager(i, module, ours_target=True),   # (our labels: integers, as the cost takes)
                     "torch_eager": eager}
            if kind in LABEL_KINDS:
                asking = getattr(puzzlelib_cost, name.split()[0])()   # (its own: its grads held by the timer)
                impls["ours_error"] = lambda i: asking(*ours_in[i % n_sets])[1]
            if not args.no_compile:
                compiled = torch.compile(loss_fn)
                impls["torch_compile"] = lambda i: eager(i, compiled)
            liger = liger_loss(name) if not args.dry_run else None
            if liger is not None:
                impls["liger"] = lambda i: eager(i, liger)
            pred, ours_target = first[:2]
            entry = {"cost": name, "shape": list(pred.shape), "dtype": dtype_name,
                     "ideal_bytes": ideal_bytes(pred, ours_target), "input_sets": n_sets, "impls": {}}
            for impl, fn in impls.items():
                try:
                    figures = measure(fn, env.timer, plan, keep=n_sets)
                    figures["fraction_of_copy"] = entry["ideal_bytes"] / figures["median_s"] / copy_bw
                    entry["impls"][impl] = figures
                except Exception as exc:   # a peer that cannot run here is recorded, not fatal
                    entry["impls"][impl] = {"error": err_text(exc)}
            results["cases"].append(entry)
            cells = "  ".join(f"{impl} {f['median_s'] * 1e6:9.1f} us ({f['fraction_of_copy']:.0%})" if "median_s" in f
                              else f"{impl} failed" for impl, f in entry["impls"].items())
            print(f"{name:22s} {'x'.join(map(str, pred.shape)):>16s} {dtype_name:9s} {cells}", flush=True)
            write_json(out / "costs.json", results)   # (what is measured survives the kit's time limit)
            sets = ours_in = first = pred = ours_target = None
    return 0


if __name__ == "__main__":
    sys.exit(main())
