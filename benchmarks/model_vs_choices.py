#!/usr/bin/env python3
"""Does the cost model order kernel choices as a GPU did?  For each case of try_choices.py results
files, the model predicts every measured choice (the same patches of row_softmax's choice, on a
stand-in device of the model's SMs), and each pair of choices whose measured fractions differ by at least
2 points counts as ordered right or wrong.

    python3 benchmarks/model_vs_choices.py benchmarks/results/2026-11-26-h100-007ea3f/choices/second.json ...

A build choice (one_buffer, pass2_prefetch, build(...): the kernels compiled with PLC_TRY_* defines) is
predicted from that build's machine code.  Choices that the model cannot follow are left out, and
counted by reason: capped grids (grid(K), and any choice that caps the blocks: prefetch(K); the
model takes the library's grid), choices try_choices no longer makes (chunk_prefetch, in_place: the library's
16-bit chunked kernels since 2026-11-27, its "_normt" kernels since 2026-11-28), kernels no longer built (named in the file but gone from
kernels/), and builds whose kernels the model finds no loop in.  A choice timed more than
once in a case (the default, at the head of several experiments) counts once, at its mean.
"""
import collections
import itertools
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import cost_model  # noqa: E402
import try_choices  # noqa: E402
from puzzlelib_cost import row_softmax  # noqa: E402


class H100:
    """What try_choices.chosen() patches on a device, as the model's GPU; a build choice's defines
    (load_kernels) are the ones the model then reads the kernels of."""
    def __init__(self):
        self.clusters, self.max_blocks, self.sms = True, 2 ** 31 - 1, cost_model.CONSTANTS["sms"]
        self.defines = ()

    def load_kernels(self, defines=()):
        previous, self.defines = self.defines, tuple(defines)
        return previous


def parse(label):
    """'rows(32,32)' -> ('rows', 32, 32); 'stream(256,max)' -> ('stream', 256, None);
    'build(PLC_TRY_X)' -> ('build', 'PLC_TRY_X')."""
    if "(" not in label:
        return (label,)
    kind, args = label[:-1].split("(")
    return (kind, *[None if a == "max" else int(a) if a.isdigit() else a for a in args.split(",")])


def main(paths):
    right = total = 0
    dropped = collections.Counter()
    for path in paths:
        cases = {}
        results = json.loads(Path(path).read_text())
        changed = cost_model.kernels_changed_since(results)   # (the names match; the code may not)
        if changed:
            print(f"{path}: {changed}")
        for e in results["entries"]:
            if "fraction" in e:
                cases.setdefault((tuple(e["shape"]), e["dtype"], e["norm_target"]), []).append(e)
        for (shape, dtype, norm), entries in cases.items():
            timed = {}   # choice label -> (measured fractions, predicted fraction)
            for e in entries:
                choice = parse(e["choice"])
                device = H100()
                uncapped = device.max_blocks, row_softmax.PREFETCH_CLUSTER_GRID_BLOCKS
                try:
                    with try_choices.chosen(choice, device):
                        if (device.max_blocks, row_softmax.PREFETCH_CLUSTER_GRID_BLOCKS) != uncapped:
                            dropped["capped grid"] += 1
                            continue
                        if not try_choices.in_kernels(device.defines):
                            dropped["build gone from kernels/"] += 1
                            continue
                        p = cost_model.predict(*shape, dtype, norm, clusters=choice[0] != "chunks",
                                               defines=device.defines)
                except try_choices.UnknownChoice:
                    dropped["choice gone from try_choices"] += 1
                    continue
                except (KeyError, ValueError):   # (a kernel no longer built; a build's kernel with no loop)
                    dropped["kernel gone, or no loop found"] += 1
                    continue
                if set(p["path"].split(" + ")) != set(e["kernels"]):
                    dropped["library's kernels changed since"] += 1
                    continue
                timed.setdefault(e["choice"], ([], p["predicted_fraction"]))[0].append(e["fraction"])
            predicted = [(label, sum(found) / len(found), model) for label, (found, model) in timed.items()]
            for a, b in itertools.combinations(predicted, 2):
                if abs(a[1] - b[1]) < 0.02:
                    continue
                total += 1
                ok = (a[1] > b[1]) == (a[2] > b[2])
                right += ok
                print(f"{shape[0]}x{shape[1]} {dtype} {'normT' if norm else 'probs'}: {a[0]} measured {a[1]:.2f} "
                      f"predicted {a[2]:.2f}, {b[0]} measured {b[1]:.2f} predicted {b[2]:.2f}: "
                      f"{'right' if ok else 'WRONG'}")
    print(f"{right} of {total} pairs ordered as measured; entries left out: "
          + (", ".join(f"{count} {reason}" for reason, count in sorted(dropped.items())) or "none"))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
