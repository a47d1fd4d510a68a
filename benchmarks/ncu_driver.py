"""KLDivergence a few times on the shapes that benchmarks/run_on_gpu.sh profiles with ncu.

    ncu --nvtx ... python3 benchmarks/ncu_driver.py    # a GPU: CUDA torch tensors, as bench_kl.py times ours
    python3 benchmarks/ncu_driver.py --dry-run         # the CPU: small NumPy arrays, NumPy backend (checks the script)

Cases (normTarget=True): 16384x1000 float32 and bfloat16 (a row in one group's registers; bfloat16's
kernel prefetches the next row), 8192x32000 float32 and bfloat16 (a row in a thread-block
cluster's registers, sm_90+; bfloat16's prefetching many-rows kernel, at 49 % of the copy
bandwidth the slowest of the big shapes at 01f464c), 512x128256 float32 (a
row streamed by a cluster, sm_90+: its dram__bytes check the cost model's L2 share, 12 B an
element predicted, 20 if nothing of the second read hit L2), and the plain twins of the two
bfloat16 cases (the kernels without the next row's copies, which the H100 measured at 45 and 37 %
where the prefetching ones reach 65 and 49 %: their warps' stalls side by side say what the
overlap removes, which the cost model cannot; benchmarks/NOTES.md).  Each case makes its inputs (pred = 2 randn, target = randn, as the
benchmark does), then calls KLDivergence --calls times (queryError=False, as timed) inside an
NVTX range named after the case, so that ncu's report (--nvtx) says which case a kernel ran for.
"""
import argparse
import contextlib
import sys

# (shape, dtype, plain: the library's kernel without its prefetching or tiled twin)
CASES = [((16384, 1000), "float32", False), ((16384, 1000), "bfloat16", False), ((8192, 32000), "float32", False),
         ((8192, 32000), "bfloat16", False), ((512, 128256), "float32", False),
         ((16384, 1000), "bfloat16", True), ((8192, 32000), "bfloat16", True)]
DRY_CASES = [((16, 1000), "float32", False), ((16, 1000), "bfloat16", False), ((8, 3200), "float32", False),
             ((8, 3200), "bfloat16", False), ((2, 12826), "float32", False), ((16, 1000), "bfloat16", True)]


@contextlib.contextmanager
def twins(plain):
    """plain: the row and cluster kernels launched without their prefetching or tiled twins for
    the calls inside (as benchmarks/try_choices.py's "plain" choice); else the library's own."""
    from puzzlelib_cost import row_softmax
    saved = row_softmax.prefetches, row_softmax.tiles
    if plain:
        row_softmax.prefetches = row_softmax.tiles = lambda kernel: False
    try:
        yield
    finally:
        row_softmax.prefetches, row_softmax.tiles = saved


def parse_cases(text):
    """'16384x1000:bfloat16:0,8192x32000:bfloat16:1:plain' -> [((16384, 1000), 'bfloat16', False, False),
    ((8192, 32000), 'bfloat16', True, True)]: (shape, dtype, normTarget (default 1), plain)."""
    cases = []
    for item in text.split(","):
        shape, dtype, *rest = item.split(":")
        plain = rest[1:] == ["plain"]
        norm = rest[:1]
        if dtype not in ("float32", "bfloat16") or norm not in ([], ["0"], ["1"]) or len(rest) > 1 + plain:
            raise argparse.ArgumentTypeError(f"expected NxC:float32|bfloat16[:0|1[:plain]], got {item!r}")
        n, c = (int(v) for v in shape.split("x"))
        cases.append(((n, c), dtype, norm != ["0"], plain))
    return cases


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="small NumPy arrays on the CPU")
    parser.add_argument("--calls", type=int, default=3, help="KLDivergence calls per case (default 3)")
    parser.add_argument("--cases", type=parse_cases, default=None,
                        help="NxC:dtype[:normTarget],... instead of the default cases, e.g. 16384x1000:bfloat16:0")
    args = parser.parse_args(argv)

    from puzzlelib_cost import KLDivergence, describe_backend
    print(f"ncu_driver: ours on {describe_backend()}", flush=True)
    if args.dry_run:
        import numpy as np
        try:
            import ml_dtypes
            bfloat16 = np.dtype(ml_dtypes.bfloat16)
        except ImportError:
            bfloat16 = None
        rng = np.random.default_rng(0)
        for (n, c), dtype, plain in DRY_CASES:
            if dtype == "bfloat16" and bfloat16 is None:
                print(f"case {n}x{c} {dtype}: skipped (NumPy has no bfloat16 without ml_dtypes)", flush=True)
                continue
            as_dtype = np.float32 if dtype == "float32" else bfloat16
            pred = (2 * rng.standard_normal((n, c))).astype(as_dtype)
            target = rng.standard_normal((n, c)).astype(as_dtype)
            div = KLDivergence(normTarget=True)
            with twins(plain):
                for _ in range(args.calls):
                    grad = div(pred, target, queryError=False)
            print(f"case {n}x{c} {dtype} normTarget=True{' plain' if plain else ''}: {args.calls} calls on the CPU, "
                  f"grad {grad.dtype}", flush=True)
        return 0

    try:
        import torch
    except ImportError:
        torch = None
    if torch is None or not torch.cuda.is_available():
        print("ncu_driver: no CUDA GPU through torch here; use --dry-run on the CPU", file=sys.stderr)
        return 2
    gen = torch.Generator(device="cuda").manual_seed(0)
    for (n, c), dtype, norm_target, plain in args.cases or [(shape, dtype, True, plain) for shape, dtype, plain in CASES]:
        label = f"{n}x{c} {dtype} normTarget={norm_target}{' plain' if plain else ''}"
        pred = (2 * torch.randn(n, c, device="cuda", generator=gen)).to(getattr(torch, dtype))
        target = torch.randn(n, c, device="cuda", generator=gen)
        target = (target if norm_target else torch.softmax(target, 1)).to(getattr(torch, dtype))
        div = KLDivergence(normTarget=norm_target)
        torch.cuda.synchronize()
        torch.cuda.nvtx.range_push(label)
        with twins(plain):
            for _ in range(args.calls):
                grad = div(pred, target, queryError=False)
        torch.cuda.synchronize()
        torch.cuda.nvtx.range_pop()
        print(f"case {label}: {args.calls} calls, grad {tuple(grad.shape)} {grad.dtype}", flush=True)
        del pred, target, grad
    return 0


if __name__ == "__main__":
    sys.exit(main())
