#!/usr/bin/env python3
"""Does the cost model order kernel choices as a GPU did?  For each case of try_choices.py results
files, the model predicts every measured choice (the same patches of row_softmax's choice, on a
stand-in device of the model's SMs), and each pair of choices whose measured fractions differ by at least
2 points counts as ordered right or wrong.

    python3 benchmarks/model_vs_choices.py benchmarks/results/2026-11-26-h100-007ea3f/choices/second.json ...

A build choice (one_buffer, in_place, build(...): the kernels compiled with PLC_TRY_* defines) is
predicted from that build's machine code.  Choices that the model cannot follow are left out:
capped grids (the model takes the library's grid), kernels no longer built (named in the file but
gone from kernels/), and builds whose kernels the model finds no loop in.
"""
import itertools
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import cost_model  # noqa: E402
import try_choices  # noqa: E402


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
    for path in paths:
        cases = {}
        for e in json.loads(Path(path).read_text())["entries"]:
            if "fraction" in e:
                cases.setdefault((tuple(e["shape"]), e["dtype"], e["norm_target"]), []).append(e)
        for (shape, dtype, norm), entries in cases.items():
            predicted = []
            for e in entries:
                choice = parse(e["choice"])
                if choice[0] == "grid":
                    continue
                device = H100()
                try:
                    with try_choices.chosen(choice, device):
                        if not try_choices.in_kernels(device.defines):
                            continue   # (a build no longer in the kernels: measured on code gone since)
                        p = cost_model.predict(*shape, dtype, norm, clusters=choice[0] != "chunks",
                                               defines=device.defines)
                except (KeyError, ValueError):   # (a kernel no longer built; a build's kernel with no loop)
                    continue
                if set(p["path"].split(" + ")) != set(e["kernels"]):
                    continue   # (the library's choice has changed since the measurement)
                predicted.append((e["choice"], e["fraction"], p["predicted_fraction"]))
            for a, b in itertools.combinations(predicted, 2):
                if abs(a[1] - b[1]) < 0.02:
                    continue
                total += 1
                ok = (a[1] > b[1]) == (a[2] > b[2])
                right += ok
                print(f"{shape[0]}x{shape[1]} {dtype} {'normT' if norm else 'probs'}: {a[0]} measured {a[1]:.2f} "
                      f"predicted {a[2]:.2f}, {b[0]} measured {b[1]:.2f} predicted {b[2]:.2f}: "
                      f"{'right' if ok else 'WRONG'}")
    print(f"{right} of {total} pairs ordered as measured")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
