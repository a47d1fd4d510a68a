"""The GPU kit's probes of the cost model's constants (benchmarks/probes.cu, probe_constants.py).

Without a GPU: the probe kernels run in the CPU emulation and must compute what they claim (so
no load or exchange of theirs is dead code), they compile for sm_80 and sm_90 without spills,
the fits turn times made up from known constants back into those constants, and the cost model
takes the constants a run measured (--constants).
"""
import json
import math
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import probe_constants  # noqa: E402

if shutil.which("nvcc") is None:
    pytest.skip("nvcc is not on PATH", allow_module_level=True)

MIB = 1 << 20


@pytest.fixture(scope="module")
def probes():
    from cuda_emulation import build
    return build([ROOT / "benchmarks" / "probes.cu"], include_dirs=[ROOT / "kernels"])


# --- the kernels, in the emulation ---------------------------------------------------------
@pytest.mark.parametrize("order", ["forward", "random"])
def test_final_sum_adds_every_block(probes, order):
    blocks = 37
    block_sums, ticket, total = np.zeros(blocks), np.zeros(1, np.uint32), np.zeros(1)
    for _ in range(2):   # the last block re-arms the ticket
        probes.launch("probe_final_sum", grid=blocks, block=256, args=[block_sums, ticket, total], order=order)
        assert total[0] == blocks * (blocks - 1) / 2
        assert ticket[0] == 0


def words_read(data, indices):
    """Sum (mod 2^32) of the four words of each 16-byte vector at `indices`."""
    return int(data.reshape(-1, 4)[indices].astype(np.uint64).sum() % 2 ** 32)


@pytest.mark.parametrize("active", [32, 256])
def test_dependent_loads_read_what_they_should(probes, active):
    """Thread t of block b reads vector (b * 256 + t + r * stride) mod n in round r, the first
    `active` threads of each block only."""
    rng = np.random.default_rng(1)
    n_vectors, blocks, rounds = 1 << 12, 3, 7
    data = rng.integers(0, 2 ** 32, size=4 * n_vectors, dtype=np.uint32)
    out = np.zeros(blocks, np.uint32)
    probes.launch("probe_dependent_loads", grid=blocks, block=256,
                  args=[data, np.int64(n_vectors), np.int32(rounds), np.uint32(0), np.int32(active), out])
    stride = blocks * 256
    for b in range(blocks):
        first = b * 256 + np.arange(active)
        indices = np.concatenate([(first + r * stride) % n_vectors for r in range(rounds)])
        assert out[b] == words_read(data, indices), b


@pytest.mark.parametrize("reverse", [0, 1])
def test_read_takes_every_vector_once(probes, reverse):
    rng = np.random.default_rng(2)
    n_vectors, blocks = 5000, 3   # (not a multiple of a pass: the last pass is ragged)
    data = rng.integers(0, 2 ** 32, size=4 * n_vectors, dtype=np.uint32)
    out = np.zeros(blocks, np.uint32)
    probes.launch("probe_read", grid=blocks, block=256, args=[data, np.int64(n_vectors), np.int32(reverse), out])
    assert int(out.astype(np.uint64).sum() % 2 ** 32) == words_read(data, np.arange(n_vectors))
    threads = blocks * 256   # block 1 alone: its threads' vectors, 4 passes of the grid at a time
    mine = np.array([k for base in range(0, n_vectors, 4 * threads) for u in range(4)
                     for k in range(base + u * threads + 256, base + u * threads + 512) if k < n_vectors])
    assert out[1] == words_read(data, n_vectors - 1 - mine if reverse else mine)


def test_one_sm_read_takes_every_vector_once(probes):
    rng = np.random.default_rng(3)
    n_vectors = 9000   # (past two passes of 1024 x 8, ragged)
    data = rng.integers(0, 2 ** 32, size=4 * n_vectors, dtype=np.uint32)
    out = np.zeros(1, np.uint32)
    probes.launch("probe_read_one_sm", grid=1, block=1024, args=[data, np.int64(n_vectors), out], order="random")
    assert out[0] == words_read(data, np.arange(n_vectors))


@pytest.mark.parametrize("order", ["forward", "reverse", "random"])
def test_exchange_gathers_every_rank_every_round(probes, order):
    rounds, blocks = 5, 16
    out = np.zeros(blocks, np.float32)
    probes.launch("probe_exchange", grid=blocks, block=256, args=[np.int32(rounds), out], order=order)
    # Round r: ranks 0..7 put rank + r, so every block adds 28 + 8 r.
    assert out.tolist() == [float(sum(28 + 8 * r for r in range(rounds)))] * blocks


def test_spin_computes_its_chain(probes):
    out = np.zeros(1, np.float32)
    probes.launch("probe_spin", grid=1, block=32, args=[np.int32(50), out])
    v = np.float32(0)
    for _ in range(50):
        v = np.float32(np.float32(v * np.float32(0.999)) + np.float32(1))   # (fmaf rounds once: close enough)
    assert out[0] == pytest.approx(float(v), rel=1e-6)


@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_probes_compile_without_spills(tmp_path, arch):
    result = subprocess.run(["nvcc", "-std=c++17", "-O3", "--cubin", f"-arch={arch}", f"-I{ROOT / 'kernels'}",
                             "-Xptxas", "-v", "-o", str(tmp_path / "p.cubin"), str(ROOT / "benchmarks" / "probes.cu")],
                            capture_output=True, text=True, check=True)
    functions = re.findall(r"Compiling entry function '(\w+)'", result.stderr)
    assert set(functions) >= {"probe_spin", "probe_empty", "probe_final_sum", "probe_dependent_loads", "probe_read",
                              "probe_read_one_sm"}
    assert ("probe_exchange" in functions) == (arch == "sm_90")
    assert re.findall(r"(\d+) bytes spill stores", result.stderr) == ["0"] * len(functions)


# --- from times to constants ---------------------------------------------------------------
def made_up_measurements(c):
    """Times a device with constants `c` would give, written from the model's formulas."""
    knee = c["copy_bandwidth"] / c["sms"] * c["dram_latency"]
    roof = c["memory_efficiency"] * c["copy_bandwidth"]
    overhead, l2_rate = 4e-6, 1 / 9e12
    dram_rate = 1 / roof
    kept = c["l2_reuse_bytes"]
    return {
        "l2_bytes": 50 * MIB,
        "copy": {"bytes_moved": 2 << 30, "seconds": (2 << 30) / c["copy_bandwidth"]},
        "loads": [{"in_flight_per_sm": x, "rounds": 100, "seconds": c["sms"] * x * 100 / (roof * min(1.0, x / knee))}
                  for x in (512, 1024, 2048, 4096, 8192, 16384, 32768)],
        "empty": {"launches": 200, "seconds": 200 * c["launch_gap"]},
        "one_sm": {"bytes": 128 * MIB, "seconds": 128 * MIB / c["single_sm_bandwidth"]},
        "final_sum": {"blocks": 512, "launches": 200, "empty_seconds": 200 * c["launch_gap"],
                      "seconds": 200 * (c["launch_gap"] + c["final_sum_latency"] + 512 * 8 / c["single_sm_bandwidth"])},
        "exchange": {"rounds": [100, 1100], "seconds": [overhead + r * c["cluster_exchange"] for r in (100, 1100)]},
        "l2_reads": [{"bytes": x, "reads": 20, "seconds": 20 * (overhead + x * l2_rate)} for x in (6 * MIB, 12 * MIB)],
        "reads": [{"bytes": x, "first": overhead + x * dram_rate,
                   "second": overhead + min(x, kept) * l2_rate + max(0, x - kept) * dram_rate}
                  for x in (12 * MIB, 25 * MIB, 37 * MIB, 50 * MIB, 75 * MIB, 100 * MIB, 150 * MIB, 200 * MIB)],
    }


def test_the_fits_give_back_the_constants_the_times_came_from():
    import cost_model
    c = dict(cost_model.CONSTANTS, dram_latency=450e-9, launch_gap=1.3e-6, final_sum_latency=350e-9,
             single_sm_bandwidth=55e9,
             cluster_exchange=0.2e-6, l2_reuse_bytes=22 * MIB, memory_efficiency=0.9, copy_bandwidth=3.1e12)
    found = probe_constants.constants_from(made_up_measurements(c), c["sms"])
    for name in ("sms", "copy_bandwidth", "launch_gap", "single_sm_bandwidth", "final_sum_latency",
                 "cluster_exchange", "l2_reuse_bytes"):
        assert found[name] == pytest.approx(c[name], rel=1e-9), name
    assert found["dram_latency"] == pytest.approx(c["dram_latency"], rel=0.01)   # (the knee's grid)


def test_reuse_bytes_needs_two_sizes_past_the_l2_and_l2_faster_than_dram():
    reads = [(100 * MIB, 1e-4, 1e-4), (200 * MIB, 2e-4, 2e-4)]
    with pytest.raises(ValueError, match="two sizes"):
        probe_constants.reuse_bytes(reads[:1], [(6 * MIB, 1e-6), (12 * MIB, 2e-6)], 50 * MIB)
    with pytest.raises(ValueError, match="faster than DRAM"):
        probe_constants.reuse_bytes(reads, [(6 * MIB, 1e-6), (12 * MIB, 1e-5)], 50 * MIB)


def test_dry_run_prints_the_constants():
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "probe_constants.py"), "--dry-run", "--json"],
                            capture_output=True, text=True, check=True)
    found = json.loads(result.stdout)
    assert found["device"].startswith("DRY RUN")
    assert math.isclose(found["constants"]["cluster_exchange"], 0.5e-6, rel_tol=1e-9)


# --- the cost model with measured constants ------------------------------------------------
def test_cost_model_takes_measured_constants(tmp_path, monkeypatch):
    import cost_model
    monkeypatch.setattr(cost_model, "CONSTANTS", dict(cost_model.CONSTANTS))
    base = cost_model.predict(65536, 10, "float32", False)["predicted_seconds"]
    before = cost_model.CONSTANTS["final_sum_latency"]
    probes_json = tmp_path / "probes.json"
    probes_json.write_text(json.dumps({"constants": {"final_sum_latency": 2e-6, "sms": 132}}))
    cost_model.use_constants(probes_json)
    slower = cost_model.predict(65536, 10, "float32", False)["predicted_seconds"]
    assert slower == pytest.approx(base + 2e-6 - before, rel=1e-9)
    probes_json.write_text(json.dumps({"constants": {"dram_latancy": 1e-6}}))
    with pytest.raises(ValueError, match="dram_latancy"):
        cost_model.use_constants(probes_json)


# --- the whole measurement through pycuda, on the driver stand-in --------------------------
@pytest.mark.pycuda
def test_measure_runs_through_pycuda(standin, monkeypatch, tmp_path):
    """probe_constants.measure() as on a lent GPU, CPU-sized (its times mean nothing here): every
    pycuda call, launch and event it makes works, and its final sum checks out."""
    from cuda_emulation import build
    cubin = probe_constants.compile_probes("sm_90", tmp_path)
    standin.register_cubin(cubin, build([ROOT / "benchmarks" / "probes.cu"], include_dirs=[ROOT / "kernels"]))
    monkeypatch.setattr(probe_constants, "compile_probes", lambda arch, out_dir: cubin)
    for name, value in {"COPY_BYTES": 1 << 16, "L2_BYTES": 1 << 13, "REPEATS": 1, "LAUNCHES": 2,
                        "FINAL_SUM_BLOCKS": 20, "LOAD_ROUNDS": 2, "EXCHANGE_ROUNDS": (1, 2), "L2_READS": 2,
                        "SPIN_SECONDS": 1e-3, "SPIN_ROUNDS_MAX": 10}.items():
        monkeypatch.setattr(probe_constants, name, value)
    standin.clear()
    sms, m, device = probe_constants.measure()
    assert sms == 4 and "sm_90, 4 SMs" in device
    assert m["l2_bytes"] == 1 << 13 and m["copy"]["bytes_moved"] == 2 << 16
    assert [(p["active_threads"], p["blocks_per_sm"]) for p in m["loads"]] == probe_constants.LOADS_IN_FLIGHT
    assert m["exchange"]["rounds"] == [1, 2] and m["exchange"]["blocks"] == 8
    assert [r["bytes"] for r in m["l2_reads"]] == [1 << 10, 1 << 11]
    assert [r["bytes"] for r in m["reads"]][-1] == 4 << 13
    launched = [line.split()[0] for line in standin.launches()]
    exchanges, l2_reads, reads = 2, 2, len(m["reads"])
    assert launched.count("probe_exchange") == exchanges
    assert launched.count("probe_read") == l2_reads * (1 + 2) + reads * 3 + 1   # (+ the flush before one SM's)
    assert launched.count("probe_read_one_sm") == 1
    assert launched.count("probe_final_sum") == 2 and launched.count("probe_dependent_loads") == len(m["loads"])


def test_the_exchange_probe_has_the_stream_kernels_shape():
    """probe_exchange times the exchange the cost model charges kl_cluster_*'s blocks
    (cluster_exchange): in clusters of row_softmax.CLUSTER blocks, two an SM of
    CLUSTER_THREADS_AN_SM / 2 threads, as kl_cluster_stream_*_t256_* runs."""
    from puzzlelib_cost import row_softmax
    source = (Path(probe_constants.__file__).parent / "probes.cu").read_text()
    dims = re.search(r"__cluster_dims__\((\d+), 1, 1\) __launch_bounds__\((\d+), (\d+)\)\s+probe_exchange", source)
    assert dims, "probes.cu: probe_exchange's cluster and launch bounds not found"
    cluster, threads, per_sm = map(int, dims.groups())
    assert (cluster, threads * per_sm) == (row_softmax.CLUSTER, row_softmax.CLUSTER_THREADS_AN_SM)
    assert f"gathered[{cluster}]" in source and f"threadIdx.x < {cluster}" in source   # (its body's copy)
