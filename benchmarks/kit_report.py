"""Small tables for the summary of benchmarks/run_on_gpu.sh; each tolerates missing or odd input.

    python3 benchmarks/kit_report.py pairs MODEL_JSON RESULTS_JSON   # predicted vs measured % of copy
    python3 benchmarks/kit_report.py ncu NCU_LOG                      # one line per kernel ncu profiled

pairs: MODEL_JSON is what `benchmarks/cost_model.py --json` prints, a list of entries with keys
path, shape, dtype, norm_target, bytes_per_element, sass_per_element, predicted_fraction
(a fraction of the copy ceiling), and predicted_fraction_probed where the model also ran with the
constants probed on the GPU (cost_model.py --constants); RESULTS_JSON is bench_kl.py's
results.json, whose cases carry impls.ours.fraction_of_copy (and copy_same_bytes.fraction_of_copy,
a copy of the case's ideal bytes: column cp@sz).  Rows pair them by (shape, dtype, norm_target).
ncu: NCU_LOG is ncu's text report (--section SpeedOfLight --metrics smsp__inst_executed.sum,
dram__bytes.sum); each kernel's duration, memory throughput and those two metrics.
"""
import json
import re
import sys

DTYPE_NAMES = {"float32": "float32", "f32": "float32", "fp32": "float32", "float": "float32",
               "bfloat16": "bfloat16", "bf16": "bfloat16", "float16": "float16", "f16": "float16",
               "half": "float16", "fp16": "float16", "float64": "float64", "f64": "float64"}
SHORT_DTYPE = {"float32": "f32", "bfloat16": "bf16", "float16": "f16", "float64": "f64"}


def shape_key(shape):
    """(N, C) from [N, C], (N, C) or "NxC"; None when it is neither."""
    if isinstance(shape, str):
        parts = re.split(r"\s*[x,×]\s*", shape.strip("()[] "))
    else:
        parts = list(shape) if isinstance(shape, (list, tuple)) else []
    try:
        return tuple(int(p) for p in parts) if len(parts) == 2 else None
    except (TypeError, ValueError):
        return None


def bool_key(value):
    return value if isinstance(value, bool) else str(value).strip().lower() in ("1", "true", "yes")


def case_key(shape, dtype, norm):
    return shape_key(shape), DTYPE_NAMES.get(str(dtype).lower(), str(dtype).lower()), bool_key(norm)


def fmt(value, spec):
    try:
        return format(float(value), spec)
    except (TypeError, ValueError):
        return "-"


def fraction_or_none(value):
    """A fraction from JSON, or None where it is missing or not a number."""
    return value if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def pct(fraction):
    return "-" if fraction is None else f"{100 * fraction:.0f}%"


def pairs(model_path, results_path):
    try:
        with open(model_path) as f:
            model = json.load(f)
    except (OSError, ValueError) as exc:
        return [f"model vs measured: no model predictions ({model_path}: {exc})"]
    if not isinstance(model, list):
        return [f"model vs measured: {model_path} is not a JSON list; nothing to pair"]
    try:
        with open(results_path) as f:
            results = json.load(f)
    except (OSError, ValueError) as exc:
        results = {"cases": []}
        missing = f" (no measurements: {results_path}: {exc})"
    else:
        missing = ""
    measured, size_copy = {}, {}
    for case in results.get("cases", []):
        key = case_key((case.get("N"), case.get("C")), case.get("dtype"), case.get("normTarget"))
        fraction = case.get("impls", {}).get("ours", {}).get("fraction_of_copy")
        if fraction is not None:
            measured[key] = fraction
        copied = fraction_or_none(case.get("copy_same_bytes", {}).get("fraction_of_copy"))
        if copied is not None:
            size_copy[key] = copied
    title = "model vs measured: ours as % of the copy ceiling, predicted by benchmarks/cost_model.py" + missing
    if results.get("dry_run"):
        title += " (DRY RUN: measured on the CPU against a host memcpy, not comparable)"
    probed = any(isinstance(e, dict) and "predicted_fraction_probed" in e for e in model)
    lines = [title,
             f"{'N x C':>14} {'dtype':>5} {'normT':>5} {'B/elem':>7} {'SASS/el':>8} "
             f"{'predicted':>9} {'measured':>9} {'meas/pred':>9}" + (f" {'probed':>7} {'meas/probed':>11}" if probed else "")
             + f" {'cp@sz':>6}  path"]
    matched = 0
    for entry in model:
        if not isinstance(entry, dict) or entry.get("labels"):   # the benchmark has no label cases
            continue
        key = case_key(entry.get("shape"), entry.get("dtype"), entry.get("norm_target"))
        got = measured.get(key)
        matched += got is not None
        predicted = fraction_or_none(entry.get("predicted_fraction"))
        ratio = got / predicted if got is not None and predicted else None
        shape = "x".join(map(str, key[0])) if key[0] else str(entry.get("shape"))
        extra = ""
        if probed:
            with_probed = fraction_or_none(entry.get("predicted_fraction_probed"))
            probed_ratio = got / with_probed if got is not None and with_probed else None
            extra = f" {pct(with_probed):>7} {fmt(probed_ratio, '.2f'):>11}"
        lines.append(f"{shape:>14} {SHORT_DTYPE.get(key[1], key[1]):>5} {('yes' if key[2] else 'no'):>5} "
                     f"{fmt(entry.get('bytes_per_element'), '.1f'):>7} {fmt(entry.get('sass_per_element'), '.1f'):>8} "
                     f"{pct(predicted):>9} {pct(got):>9} {fmt(ratio, '.2f'):>9}{extra} {pct(size_copy.get(key)):>6}  "
                     f"{entry.get('path', '-')}")
    lines.append(f"{len(model)} predictions, {len(measured)} measured cases, {matched} paired")
    return lines


KERNEL = re.compile(r"^\s{1,4}(\S[^(]*?)\s*(?:\(.*?\))?\s*\((\d+), (\d+), (\d+)\)x\((\d+), (\d+), (\d+)\), Context")
METRIC = re.compile(r"^\s+(Duration|Memory Throughput|DRAM Throughput|dram__bytes\.sum|smsp__inst_executed\.sum)"
                    r"\s+(\S+)\s+([\d.,]+)\s*$")
COLUMNS = {"Duration": "duration", "Memory Throughput": "memory SOL", "DRAM Throughput": "DRAM SOL",
           "dram__bytes.sum": "DRAM bytes", "smsp__inst_executed.sum": "warp inst executed"}


def ncu(log_path):
    try:
        with open(log_path, errors="replace") as f:
            text = f.read().splitlines()
    except OSError as exc:
        return [f"ncu: no report ({exc})"]
    kernels = []
    for line in text:
        match = KERNEL.match(line)
        if match:
            name, grid, block = match.group(1), match.group(2, 3, 4), match.group(5, 6, 7)
            kernels.append({"name": name, "launch": f"{'x'.join(grid)} x {'x'.join(block)}"})
            continue
        match = METRIC.match(line)
        if match and kernels:
            kernels[-1][match.group(1)] = f"{match.group(3)} {match.group(2)}"
    if not kernels:
        return ["ncu: no kernel reports found in the log (see ncu.log)"]
    lines = ["ncu (one line per profiled kernel, in launch order; ncu.log has the NVTX case of each):",
             f"{'kernel':<28} {'grid x block':>22} " + " ".join(f"{c:>18}" for c in COLUMNS.values())]
    for k in kernels:
        lines.append(f"{k['name'][:28]:<28} {k['launch']:>22} " + " ".join(f"{k.get(c, '-'):>18}" for c in COLUMNS))
    return lines


def main(argv):
    if len(argv) == 3 and argv[0] == "pairs":
        print("\n".join(pairs(argv[1], argv[2])))
    elif len(argv) == 2 and argv[0] == "ncu":
        print("\n".join(ncu(argv[1])))
    else:
        print(__doc__.split("\n\n")[1], file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
