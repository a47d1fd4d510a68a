"""benchmarks/run_on_gpu.sh, the kit for the rarely lent GPU machine, tried on a machine without one.

- Its dry run end to end into a temporary OUT: every step, the files it promises (at most 8, at
  most 2 folders down: what the device tool brings back), model predictions paired with the
  measurements, and nothing installed.
- Its gate: where `import pycuda.driver` fails after setup, or the library's backend is not
  "cuda", it stops within seconds with a clear summary line instead of running GPU tests that
  would all skip and a benchmark of the peers alone.  Both are forced the same way on any machine
  (a pycuda package on PYTHONPATH whose driver module will not import; PUZZLELIB_COST_BACKEND=cpu),
  with a stand-in kit whose setup.sh installs nothing.
- conftest.py's cuda_driver fixture: with PUZZLELIB_COST_REQUIRE_GPU=1 (set by the kit) or
  PUZZLELIB_COST_BACKEND=cuda, pycuda tests fail where no real GPU is usable, rather than skip or
  run on the driver stand-in.
"""
import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "run_on_gpu.sh"
# What the kit writes; results.png only where matplotlib is importable.
PROMISED = {"summary.txt", "setup.log", "tests.log", "ncu.log", "model.json",
            "bench/bench.log", "bench/results.json", "bench/results.png"}
# Variables of the caller that would change what the kit does.
KIT_VARIABLES = ("PLAN", "DRY_RUN", "STEPS", "OUT", "KIT", "KCARRY", "COST_MODEL", "BENCH", "TOTAL_S", "RESERVE_S",
                 "PYTHONPATH", "PUZZLELIB_COST_BACKEND", "PUZZLELIB_COST_REQUIRE_GPU")

pytestmark = pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None,
                                reason="the kit is a bash script and needs coreutils' timeout")


@pytest.fixture
def stand_in_kit(tmp_path):
    """A kit whose setup.sh installs nothing: it leaves a mark and fails, as the real one does
    where pycuda cannot be used."""
    kit = tmp_path / "kit"
    kit.mkdir()
    (kit / "setup.sh").write_text(f'#!/bin/sh\necho "stand-in kit: nothing installed"\n'
                                  f'touch "{tmp_path}/setup-ran"\nexit 1\n')
    return kit


def fake_pycuda(root, driver_source):
    """A pycuda package (for PYTHONPATH) whose driver module holds driver_source."""
    (root / "pycuda").mkdir(parents=True)
    (root / "pycuda" / "__init__.py").write_text("")
    (root / "pycuda" / "driver.py").write_text(driver_source)
    return root


def run_kit(out, *args, **env):
    environ = {k: v for k, v in os.environ.items() if k not in KIT_VARIABLES}
    environ.update(PYTHON=sys.executable, OUT=str(out), **{k: str(v) for k, v in env.items()})
    started = time.monotonic()
    result = subprocess.run(["bash", str(SCRIPT), *args], cwd=REPO, env=environ, capture_output=True,
                            text=True, timeout=300)
    return result, time.monotonic() - started


def files_under(out):
    return {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}


def step_lines(summary):
    """{step: its summary line}: lines that start with a step name and a status."""
    lines = {}
    for line in summary.splitlines():
        parts = line.split()
        if len(parts) > 2 and parts[1] in ("ok", "FAILED", "TIMED", "skipped"):
            lines[parts[0]] = line
    return lines


def test_dry_run_end_to_end_writes_the_promised_files(tmp_path, stand_in_kit):
    model = tmp_path / "cost_model.py"   # a stand-in for benchmarks/cost_model.py, whoever writes it
    # (with the probes' constants, which it must be given: each entry gains the prediction with them)
    model.write_text("import json, sys\nassert sys.argv[1:3] == ['--json', '--constants'], sys.argv\n"
                     "probed = json.load(open(sys.argv[3]))['constants']\n"
                     "assert probed['cluster_exchange'] > 0, probed\nprint(json.dumps(["
                     "{'path': 'rows', 'shape': [16, 1000], 'dtype': 'float32', 'norm_target': True,"
                     " 'bytes_per_element': 12.0, 'sass_per_element': 9.0, 'predicted_fraction': 0.8,"
                     " 'predicted_fraction_probed': 0.7},"
                     "{'path': 'chunks', 'shape': [8192, 32000], 'dtype': 'float32', 'norm_target': True,"
                     " 'bytes_per_element': 20.0, 'sass_per_element': 30.0, 'predicted_fraction': 0.6,"
                     " 'predicted_fraction_probed': 0.5}]))\n")
    out = tmp_path / "out"
    result, seconds = run_kit(out, "--dry-run", KIT=stand_in_kit, COST_MODEL=model)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    files = files_under(out)
    assert files <= PROMISED, files - PROMISED
    assert PROMISED - {"bench/results.png"} <= files, PROMISED - files
    assert len(files) <= 8 and all(len(Path(f).parts) <= 3 for f in files)

    summary = (out / "summary.txt").read_text()
    steps = step_lines(summary)
    assert list(steps) == ["setup", "gate", "probes", "tests", "memcheck", "racecheck", "ncu", "bench", "model"], summary
    for name, line in steps.items():
        assert line.split()[1] in ("ok", "skipped"), line
    assert "dry run, no GPU required" in steps["gate"]
    assert "in test_gpu.py" in steps["tests"] and " 0 of them" not in steps["tests"]
    # racecheck, which may run out of its time, takes the prefetching and tiled twins first.
    racecheck = (out / "tests.log").read_text().split("==== racecheck", 1)[1]
    first = next(line for line in racecheck.splitlines() if "::" in line)
    assert "test_pycuda_twin_kernels_give_the_plain_kernels_bits" in first, first
    assert "DRY RUN" in summary.splitlines()[0]
    # The model's predictions beside the measurements: the measured case pairs, the other does not.
    assert "2 predictions, 2 measured cases, 1 paired" in summary
    assert "meas/probed" in summary and " 70% " in summary
    # ... and beside them the copy of the case's own bytes (cp@sz), which the benchmark timed.
    assert re.search(r"^ +16x1000 +f32 +yes .* \d+%  rows$", summary, re.M), summary
    # The probes' constants (made-up times in a dry run) in their summary line and in setup.log.
    assert "dram_latency 6.9" in steps["probes"] and "made-up times" in steps["probes"]
    assert '"cluster_exchange"' in (out / "setup.log").read_text()
    assert json.loads((out / "model.json").read_text())[0]["shape"] == [16, 1000]
    results = json.loads((out / "bench" / "results.json").read_text())
    assert results["dry_run"] and all(c["impls"]["ours"].get("fraction_of_copy") for c in results["cases"])
    # The step lines end the output (the device tool returns its end); a dry run installs nothing.
    assert result.stdout.rstrip().splitlines()[-1].startswith("files: ")
    assert not (tmp_path / "setup-ran").exists()
    assert seconds < 120


def test_no_pycuda_stops_at_the_gate(tmp_path, stand_in_kit):
    shadow = fake_pycuda(tmp_path / "shadow", 'raise ImportError("planted: no pycuda driver here")\n')
    out = tmp_path / "out"
    result, seconds = run_kit(out, KIT=stand_in_kit, PYTHONPATH=shadow)
    assert result.returncode == 3, result.stdout[-3000:] + result.stderr[-3000:]
    gate = step_lines((out / "summary.txt").read_text())["gate"]
    assert gate.split()[1] == "FAILED" and "import pycuda.driver failed: ImportError: planted" in gate, gate
    assert "STOPPED at the gate" in result.stdout and gate in result.stdout
    assert (tmp_path / "setup-ran").exists()                        # the gate comes after setup
    assert files_under(out) == {"summary.txt", "setup.log"}         # and nothing runs after it
    assert seconds < 60


def test_setup_unpacks_the_prebuilt_cubins_into_the_kernel_cache(tmp_path, stand_in_kit):
    """The cubins try_choices.py --prebuild packed (KCARRY) are in the kernel cache
    (XDG_CACHE_HOME) once setup has run, before the gate: no nvcc on the GPU machine."""
    import tarfile
    cubin = tmp_path / "puzzlelib_cost" / "all_costs-sm_90-0123456789abcdef.cubin"
    cubin.parent.mkdir()
    cubin.write_bytes(b"planted cubin")
    archive = tmp_path / "kcache.tgz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(cubin, arcname="puzzlelib_cost/" + cubin.name)
    shadow = fake_pycuda(tmp_path / "shadow", 'raise ImportError("planted: no pycuda driver here")\n')
    cache = tmp_path / "cache"
    result, _ = run_kit(tmp_path / "out", KIT=stand_in_kit, PYTHONPATH=shadow, KCARRY=archive, XDG_CACHE_HOME=cache)
    assert result.returncode == 3, result.stdout[-3000:] + result.stderr[-3000:]
    assert (cache / "puzzlelib_cost" / cubin.name).read_bytes() == b"planted cubin"


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="the cubins' names digest nvcc's version")
def test_a_dry_run_checks_the_prebuilt_archive_not_this_machines_cache(tmp_path, stand_in_kit, monkeypatch):
    """The archive is what the GPU machine gets: a dry run checked this machine's cache instead,
    which may hold every cubin while the archive is stale (found first on the lent GPU)."""
    import tarfile
    sys.path.insert(0, str(REPO / "benchmarks"))
    import try_choices
    from puzzlelib_cost.backends.kernel_build import cubin_path
    cache = tmp_path / "cache"
    monkeypatch.setenv("XDG_CACHE_HOME", str(cache))
    for defines in try_choices.builds():   # this machine's cache: every cubin (planted)
        path = cubin_path("sm_90", defines)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"planted")
    stale = tmp_path / "stale" / "puzzlelib_cost" / "all_costs-sm_90-0123456789abcdef.cubin"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"a cubin of other kernels")
    archive = tmp_path / "kcache.tgz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(stale, arcname="puzzlelib_cost/" + stale.name)
    out = tmp_path / "out"
    result, _ = run_kit(out, "choices", "--dry-run", KIT=stand_in_kit, KCARRY=archive, XDG_CACHE_HOME=cache)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    setup = step_lines((out / "summary.txt").read_text())["setup"]
    assert f"prebuilt cubins: 0 of {len(try_choices.builds())} in the cache" in setup, setup


def test_a_backend_other_than_cuda_stops_at_the_gate(tmp_path, stand_in_kit):
    importable = fake_pycuda(tmp_path / "importable", "")
    out = tmp_path / "out"
    result, seconds = run_kit(out, "quick", KIT=stand_in_kit, PYTHONPATH=importable, PUZZLELIB_COST_BACKEND="cpu")
    assert result.returncode == 3, result.stdout[-3000:] + result.stderr[-3000:]
    gate = step_lines((out / "summary.txt").read_text())["gate"]
    assert gate.split()[1] == "FAILED", gate
    assert "backend is 'cpu', not 'cuda': cpu (NumPy; pinned by PUZZLELIB_COST_BACKEND=cpu)" in gate
    assert "STOPPED at the gate" in result.stdout and gate in result.stdout
    assert files_under(out) == {"summary.txt", "setup.log"}
    assert seconds < 60


def test_unknown_argument_is_a_usage_error(tmp_path):
    result, _ = run_kit(tmp_path / "out", "--fast")
    assert result.returncode == 2 and "unknown argument --fast" in result.stderr


# ---- conftest.py: pycuda tests fail rather than skip where a GPU is required ----------------

TINY_TEST = """
import pytest

@pytest.mark.pycuda
def test_on_a_cuda_driver(cuda_driver):
    pass
"""
# Makes the driver stand-in unusable, so that without a requirement the fixture skips.
NO_STAND_IN = """
import driver_standin

def _unavailable():
    raise driver_standin.Unavailable("made unavailable by test_gpu_kit.py")

driver_standin.activate = _unavailable
"""


def run_tiny_pycuda_test(tmp_path, **env):
    """pytest on one pycuda-marked test, with tests/conftest.py loaded as a plugin."""
    import driver_standin
    if driver_standin.real_driver_present():
        pytest.skip("a real CUDA driver is installed: the fixture's answer depends on the GPU")
    (tmp_path / "test_tiny.py").write_text(TINY_TEST)
    (tmp_path / "no_stand_in.py").write_text(NO_STAND_IN)
    environ = {k: v for k, v in os.environ.items() if k not in KIT_VARIABLES}
    environ.update(PYTHONPATH=os.pathsep.join([str(tmp_path), str(REPO / "tests"), str(REPO)]), **env)
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "conftest",
                           "-p", "no_stand_in", "--rootdir", str(tmp_path), str(tmp_path / "test_tiny.py")],
                          cwd=tmp_path, env=environ, capture_output=True, text=True, timeout=120)


def test_cuda_driver_skips_without_a_gpu_when_none_is_required(tmp_path):
    result = run_tiny_pycuda_test(tmp_path)
    assert result.returncode == 0 and "1 skipped" in result.stdout, result.stdout + result.stderr


@pytest.mark.parametrize("variable,value", [("PUZZLELIB_COST_REQUIRE_GPU", "1"), ("PUZZLELIB_COST_BACKEND", "cuda")])
def test_cuda_driver_fails_without_a_gpu_where_one_is_required(tmp_path, variable, value):
    result = run_tiny_pycuda_test(tmp_path, **{variable: value})
    assert result.returncode == 1 and "1 error" in result.stdout, result.stdout + result.stderr
    assert f"{variable}={value} requires a real GPU, and none is usable: no CUDA driver" in result.stdout


# ---- benchmarks/kit_report.py: the ncu table of the summary -----------------------------------

NCU_EXCERPT = """==PROF== Connected to process 4242 (/usr/bin/python3.12)
ncu_driver: ours on cuda (NVIDIA H100 80GB HBM3; PUZZLELIB_COST_BACKEND=auto)
==PROF== Profiling "kl_rows_f32_g256_e8" - 0: 0%....50%....100% - 9 passes
==PROF== Disconnected from process 4242
[4242] python3.12@127.0.0.1
  kl_rows_f32_g256_e8 (4096, 1, 1)x(256, 1, 1), Context 1, Stream 7, Device 0, CC 9.0
    Section: Command line profiler metrics
    ----------------------- ----------- ------------
    Metric Name             Metric Unit Metric Value
    ----------------------- ----------- ------------
    dram__bytes.sum               Mbyte       196.61
    smsp__inst_executed.sum        inst    4,567,890
    ----------------------- ----------- ------------

    Section: GPU Speed Of Light Throughput
    ----------------------- ----------- ------------
    Metric Name             Metric Unit Metric Value
    ----------------------- ----------- ------------
    DRAM Frequency                  Ghz         2.62
    Memory Throughput                 %        91.23
    DRAM Throughput                   %        91.23
    Duration                         us        70.14
    ----------------------- ----------- ------------

  kl_sum_errors (1, 1, 1)x(1024, 1, 1), Context 1, Stream 7, Device 0, CC 9.0
    Section: GPU Speed Of Light Throughput
    Duration                         us         3.10
"""


def test_ncu_table_has_a_line_per_kernel(tmp_path):
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import kit_report
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    log = tmp_path / "ncu.log"
    log.write_text(NCU_EXCERPT)
    lines = kit_report.ncu(log)
    assert len(lines) == 4, lines
    assert lines[2].split()[:4] == ["kl_rows_f32_g256_e8", "4096x1x1", "x", "256x1x1"]
    assert "70.14 us" in lines[2] and "91.23 %" in lines[2] and "196.61 Mbyte" in lines[2] and "4,567,890 inst" in lines[2]
    assert lines[3].startswith("kl_sum_errors") and "3.10 us" in lines[3]
    log.write_text("==ERROR== the profiler could not start\n")
    assert "no kernel reports" in kit_report.ncu(log)[0]


def test_bench_costs_dry_run_times_every_cost(tmp_path):
    """benchmarks/bench_costs.py on the CPU: every cost runs, ours and torch eager, and the JSON has them."""
    pytest.importorskip("torch")
    result = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_costs.py"), "--out", str(tmp_path),
                             "--dry-run", "--no-compile", "--dtypes", "float32"],
                            capture_output=True, text=True, timeout=300, cwd=REPO)
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "costs.json").read_text())
    assert isinstance(report["commit"], str)   # (the commit measured, not git_commit()'s pair with its source)
    cases = report["cases"]
    assert {case["cost"] for case in cases} == {"MSE", "Abs", "SmoothL1", "BCE", "Hinge", "SVM", "CrossEntropy",
                                                "CrossEntropy spatial", "KLDivergence"}
    labels = {"BCE", "Hinge", "SVM", "CrossEntropy", "CrossEntropy spatial"}
    for case in cases:
        assert set(case["impls"]) == {"ours", "ours_nn", "torch_eager"} | ({"ours_error"} if case["cost"] in labels
                                                                           else set())
        assert all("median_s" in figures for figures in case["impls"].values()), case


def test_bench_costs_rotates_every_impl_through_its_input_sets(tmp_path, monkeypatch):
    """Each impl's successive calls take the next input set (enough of them that a round is 3x the
    L2: bench_kl.input_sets), so that no impl reads its inputs from the cache; a timer that calls
    each twice sees two different grads, and costs.json says how many sets."""
    torch = pytest.importorskip("torch")
    sys.path.insert(0, str(REPO / "benchmarks"))
    import bench_costs
    import bench_kl
    grads = {}

    def measure(call, timer, plan, keep=1):
        first = torch.as_tensor(call(0)).clone()
        second = torch.as_tensor(call(1)).clone()
        grads.setdefault(len(grads), (first, second, keep))
        return {"median_s": 1e-3}
    monkeypatch.setattr(bench_costs, "measure", measure)
    assert bench_costs.main(["--out", str(tmp_path), "--dry-run", "--no-compile", "--dtypes", "float32"]) == 0
    cases = json.loads((tmp_path / "costs.json").read_text())["cases"]
    assert len(grads) == 3 * len(cases) + 5   # (ours, ours_nn, torch_eager a case; ours_error the 5 with labels)
    for first, second, keep in grads.values():
        assert keep > 1 and not torch.equal(first, second)
    for case in cases:
        assert case["input_sets"] == bench_kl.input_sets(case["ideal_bytes"], 1 << 20) > 1
    assert [path.name for path in tmp_path.iterdir()] == ["costs.json"]


def test_write_json_leaves_the_last_whole_file_when_a_write_is_cut_short(tmp_path, monkeypatch):
    """The kit kills a step at its time limit: a results file being rewritten then must keep the
    results written before (bench_kl.write_json: a file beside it, renamed over it)."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    import bench_kl
    path = tmp_path / "results.json"
    bench_kl.write_json(path, {"entries": [1]})
    assert json.loads(path.read_text()) == {"entries": [1]}
    real = Path.write_text

    def cut_short(self, text, *args, **kwargs):   # (half the text, then the kill)
        real(self, text[:len(text) // 2], *args, **kwargs)
        raise KeyboardInterrupt
    monkeypatch.setattr(Path, "write_text", cut_short)
    with pytest.raises(KeyboardInterrupt):
        bench_kl.write_json(path, {"entries": [1, 2]})
    monkeypatch.undo()
    assert json.loads(path.read_text()) == {"entries": [1]}
    bench_kl.write_json(path, {"entries": [1, 2]})
    assert json.loads(path.read_text()) == {"entries": [1, 2]}


def test_costs_plan_dry_run_times_every_cost(tmp_path, stand_in_kit):
    pytest.importorskip("torch")
    out = tmp_path / "out"
    result, seconds = run_kit(out, "costs", "--dry-run", KIT=stand_in_kit)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert files_under(out) == {"summary.txt", "setup.log", "costs/costs.log", "costs/costs.json"}
    steps = step_lines((out / "summary.txt").read_text())
    assert list(steps) == ["setup", "gate", "costs"] and "9 cases timed" in steps["costs"], steps
    assert seconds < 120


def test_choices_plan_dry_run_lists_the_experiments(tmp_path, stand_in_kit):
    out = tmp_path / "out"
    result, seconds = run_kit(out, "choices", "--dry-run", KIT=stand_in_kit)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert files_under(out) == {"summary.txt", "setup.log", "choices/choices.log"}
    steps = step_lines((out / "summary.txt").read_text())
    assert list(steps) == ["setup", "gate", "choices"] and "cases listed" in steps["choices"], steps
    assert "16384x1000 float32 normTarget=True: default, plain" in (out / "choices/choices.log").read_text()
    assert seconds < 60


def test_bench_ctc_dry_run_times_both_cases(tmp_path):
    """benchmarks/bench_ctc.py on the CPU: both cases run, ours and both torch paths are timed,
    and ours agrees with PyTorch (float32 on both sides: 1e-3 of the largest gradient)."""
    pytest.importorskip("torch")
    result = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_ctc.py"), "--out", str(tmp_path),
                             "--dry-run"], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert result.returncode == 0, result.stderr
    assert "DRY RUN on CPU" in result.stdout
    report = json.loads((tmp_path / "ctc.json").read_text())
    assert report["dry_run"] is True and len(report["cases"]) == 2 and isinstance(report["commit"], str)
    for case in report["cases"]:
        assert set(case["impls"]) == {"ours", "torch_native", "torch_cudnn"}
        assert all("median_s" in figures for figures in case["impls"].values()), case
        assert case["error_vs_torch"] < 1e-5 and case["grad_vs_torch"] < 1e-3, case


def test_bench_kl_distill_and_sparse_dry_run(tmp_path):
    """benchmarks/bench_kl.py --suite distill,sparse: the GPU plan's case list (every mode on the LLM
    shapes, the sparse top-k cases) without a GPU, then a dry run on the CPU that times every mode and
    every sparse variant, ours and the torch peers, and checks their gradients against float64."""
    pytest.importorskip("torch")
    script = [sys.executable, str(REPO / "benchmarks" / "bench_kl.py")]
    listed = subprocess.run(script + ["--list", "--suite", "distill,sparse"], capture_output=True, text=True,
                            timeout=60, cwd=REPO)
    assert listed.returncode == 0, listed.stderr
    cases = [json.loads(line) for line in listed.stdout.splitlines()]
    distill = [c for c in cases if c["suite"] == "distill"]
    sparse = [c for c in cases if c["suite"] == "sparse"]
    shapes = {(c["N"], c["C"]) for c in distill}
    assert {(8, 128256), (4096, 32000), (65536, 10), (16384, 1000), (2048, 128256), (16, 1048576)} <= shapes
    assert len(distill) == len(shapes) * 2 * 4 and all(c["normTarget"] for c in distill)
    assert {(c["mode"], c["divergence"], c["temperature"]) for c in distill} == {
        ("forward", "forward", 1.0), ("forward_t2", "forward", 2.0), ("reverse", "reverse", 1.0), ("jsd", "jsd", 1.0)}
    assert all(c["impls"] == ["ours", "torch_eager", "torch_compile", "liger"] for c in distill)
    assert {(c["C"], c["K"], c["sparseTail"], c["normTarget"], c["dtype"]) for c in sparse} == {
        (cols, k, tail, norm, dtype) for cols in (128256, 32000) for k in (64, 1024) for dtype in ("float32", "bfloat16")
        for tail, norm in (("drop", True), ("drop", False), ("bucket", False))}
    assert all(c["impls"] == ["ours", "ours_dense", "torch_dense"] for c in sparse)
    bad = subprocess.run(script + ["--list", "--suite", "distill", "--modes", "forward,kl"], capture_output=True,
                         text=True, timeout=60, cwd=REPO)
    assert bad.returncode == 2 and "unknown --modes ['kl']" in bad.stderr

    started = time.monotonic()
    result = subprocess.run(script + ["--dry-run", "--suite", "distill,sparse", "--distill-shapes", "16x1000",
                                      "--sparse-shapes", "8x300", "--out", str(tmp_path)],
                            capture_output=True, text=True, timeout=120, cwd=REPO)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "DRY RUN on CPU" in result.stdout and "errors recorded: 0" in result.stdout
    report = json.loads((tmp_path / "results.json").read_text())
    assert report["dry_run"] and report["suites"] == ["distill", "sparse"] and not report["errors"]
    assert set(report["distill"]["modes"]) == {"forward", "forward_t2", "reverse", "jsd"}
    tolerance = {"float32": 1e-4, "bfloat16": 5e-2}   # the torch peers compute in the inputs' dtype
    timed = {}
    for case in report["cases"]:
        key = (case["suite"], case.get("mode") or (case["K"], case["variant"]), case["dtype"])
        timed[key] = case
        for name, entry in case["impls"].items():
            if name in ("torch_compile", "liger"):   # no compiler or Triton on the CPU: skipped, saying why
                assert entry.get("skipped"), (key, name, entry)
                continue
            assert entry.get("median_s") and entry.get("fraction_of_copy"), (key, name, entry)
            if "grad_check" not in entry:
                assert entry["grad_rel_error"] <= tolerance[case["dtype"]], (key, name, entry)
        assert case["impls"]["ours"]["grad_ok"], key
    assert set(timed) == {("distill", mode, dtype) for mode in ("forward", "forward_t2", "reverse", "jsd")
                          for dtype in ("float32", "bfloat16")} | {
        ("sparse", (k, variant), dtype) for k in (8, 64) for variant in ("drop_logits", "drop_probs", "bucket_probs")
        for dtype in ("float32", "bfloat16")}
    assert "grad_check" in timed[("sparse", (8, "bucket_probs"), "float32")]["impls"]["ours_dense"]
    assert "grad_check" not in timed[("sparse", (8, "drop_logits"), "float32")]["impls"]["ours_dense"]
    assert time.monotonic() - started < 60


def test_bench_kl_names_the_commit_it_is_given(monkeypatch):
    """GIT_COMMIT, which the kit sets, names the commit measured, before git's HEAD (a lent GPU
    machine once had a .git older than the working tree sent with it)."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    import bench_kl
    monkeypatch.setenv("GIT_COMMIT", "0123abc")
    assert bench_kl.git_commit() == ("0123abc", "$GIT_COMMIT")
    monkeypatch.delenv("GIT_COMMIT")
    for var in ("COMMIT", "GITHUB_SHA", "CI_COMMIT_SHA"):
        monkeypatch.delenv(var, raising=False)
    assert bench_kl.git_commit()[1] in ("git rev-parse HEAD", "no git repository and no GIT_COMMIT variable")


def test_ncu_driver_profiles_plain_twins_on_request():
    """ncu_driver.py's ':plain' cases run the kernels without their prefetching twins (the question
    the cost model cannot answer, benchmarks/NOTES.md), and leave the library's choice as it was."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import ncu_driver
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    from puzzlelib_cost import row_softmax
    rows, cluster = "kl_rows_bf16_g32_e32", "kl_cluster_bf16_t128_e32"
    assert row_softmax.row_twin(rows, True) == "_prefetch" and row_softmax.prefetching(cluster, True)
    with ncu_driver.twins(True):
        assert row_softmax.row_twin(rows, True) == "" and not row_softmax.prefetching(cluster, True)
    with pytest.raises(RuntimeError), ncu_driver.twins(True):
        raise RuntimeError("a failing call")
    assert row_softmax.row_twin(rows, True) == "_prefetch" and row_softmax.prefetching(cluster, True)
    assert ncu_driver.parse_cases("8192x32000:bfloat16:1:plain,16x10:float32") == [
        ((8192, 32000), "bfloat16", True, True), ((16, 10), "float32", True, False)]
    for bad in ("16x10:bfloat16:plain", "16x10:bfloat16:1:plan", "16x10:bfloat16:1:plain:1"):
        with pytest.raises(argparse.ArgumentTypeError):
            ncu_driver.parse_cases(bad)
    assert sum(plain for *_, plain in ncu_driver.CASES) == 2


def test_bench_kl_dry_run_records_no_errors_for_the_pipelines(tmp_path):
    """The PuzzleLib-style pipeline's torch fallback (no CuPy) returned (grad, error) where the
    timing loop takes the grad: every one of its cases recorded an error."""
    pytest.importorskip("torch")
    result = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_kl.py"), "--out", str(tmp_path),
                             "--dry-run", "--impls", "ours,puzzlelib_style", "--suite", "classic",
                             "--dtypes", "float32"], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert result.returncode == 0, result.stderr
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["cases"] and results["errors"] == []


def test_the_profile_scripts_defaults_name_cases_and_kernels_the_library_has():
    """profile_on_gpu.sh's default CASES parse (ncu_driver.parse_cases), and each kernel of its
    default SOURCE_KERNELS (those ncu's source counters are taken of) is one the library launches
    for one of those cases: a kernel renamed or no longer chosen would leave the loan's profile
    without the source view it was run for."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import cost_model
        import ncu_driver
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    script = (REPO / "benchmarks" / "profile_on_gpu.sh").read_text()
    cases = ncu_driver.parse_cases(re.search(r"^CASES=\$\{CASES:-([^}]+)\}$", script, re.M).group(1))
    kernels = re.search(r"^SOURCE_KERNELS=\$\{SOURCE_KERNELS:-([^}]+)\}$", script, re.M).group(1).split()
    suffix = {"float32": "f32", "bfloat16": "bf16"}
    launched = {launch.name for (n, c), dtype, norm, plain in cases if not plain
                for launch in cost_model.launches(n, c, suffix[dtype], norm_target=norm)}
    assert kernels and set(kernels) <= launched, (kernels, sorted(launched))
