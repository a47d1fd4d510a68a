"""benchmarks/try_choices.py's choices launch the kernels they name, compute the divergence, and
leave the library's choice as they found it: a lent GPU's minute must not time something else.
Run in the CPU emulation of the kernels (tests/cuda_emulation)."""
import json
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import try_choices  # noqa: E402
from cuda_emulation import build  # noqa: E402
from emulated_device import EmuArray, EmulatedDevice  # noqa: E402
from puzzlelib_cost import KLDivergence, backends, row_softmax  # noqa: E402
from puzzlelib_cost.backends.cuda_backend import CudaBackend  # noqa: E402
from puzzlelib_cost.backends.kernel_build import MAIN_SOURCE  # noqa: E402
from reference import kl_reference  # noqa: E402

KERNELS = ROOT / "kernels"


@pytest.fixture(scope="module")
def module():
    return build([KERNELS / MAIN_SOURCE], include_dirs=[KERNELS])


# (shape, choice, the kernels it must launch, a check of the first launch's (grid, arguments))
CASES = [
    # (normTarget's "_normt" twin, float32's since 2026-11-28; "general": the general kernel)
    ((8, 1000), ("default",), ["kl_rows_f32_g32_e32_normt"], lambda grid, args: grid == 2),   # 4 rows a block
    ((8, 1000), ("general",), ["kl_rows_f32_g32_e32"], lambda grid, args: grid == 2),
    ((8, 1000), ("rows", 128, 16), ["kl_rows_f32_g128_e16"], lambda grid, args: grid == 8),
    ((4, 12000), ("cluster", 256, 16), ["kl_cluster_f32_t256_e16"], lambda grid, args: grid == 4 * 8),
    # (the library's prefetching stream kernel: J = 3, 1 segment staged beside the ring of two)
    ((2, 70000), ("stream", 256, 0), ["kl_cluster_stream_f32_t256_e16_prefetch"], lambda grid, args: args[-1] == 0),
    ((2, 70000), ("stream", 256, None), ["kl_cluster_stream_f32_t256_e16_prefetch"], lambda grid, args: args[-1] == 1),
    ((2, 70000), ("chunks",), ["kl_chunk_stats_f32", "kl_chunk_rows_f32", "kl_chunk_grad_f32"],
     lambda grid, args: True),
    ((64, 100), ("grid", 1), ["kl_rows_f32_g16_e8"], lambda grid, args: grid == 4),   # 8 blocks capped to 1 an SM
    ((64, 1000), ("prefetch",), ["kl_rows_f32_g32_e32_prefetch"], lambda grid, args: grid == 16),
    ((64, 1000), ("prefetch", 1), ["kl_rows_f32_g32_e32_prefetch"], lambda grid, args: grid == 4),
    ((12, 20000), ("cluster_prefetch",), ["kl_cluster_f32_t128_e32_prefetch"], lambda grid, args: grid == 12 * 8),
    ((12, 20000), ("cluster_prefetch", 4), ["kl_cluster_f32_t128_e32_prefetch"], lambda grid, args: grid == 2 * 8),
    # (J = 3: 1 segment staged, not 2, beside the prefetch's ring of two)
    ((2, 70000), ("stream_prefetch",), ["kl_cluster_stream_f32_t256_e16_prefetch"], lambda grid, args: args[-1] == 1),
    ((300, 10), ("tile",), ["kl_rows_f32_g1_e16_tile"], lambda grid, args: grid == 3),   # 128 rows a block
    ((8, 1000), ("build", "PLC_TRY_PLANTED"), ["kl_rows_f32_g32_e32_normt"], lambda grid, args: grid == 2),
    # The library's twins, and its kernels without them:
    ((300, 10), ("default",), ["kl_rows_f32_g1_e16_tile"], lambda grid, args: grid == 3),
    ((300, 10), ("plain",), ["kl_rows_f32_g1_e16"], lambda grid, args: grid == 3),
    ((2, 70000), ("default",), ["kl_cluster_stream_f32_t256_e16_prefetch"], lambda grid, args: args[-1] == 1),
    ((2, 70000), ("plain",), ["kl_cluster_stream_f32_t256_e16"], lambda grid, args: args[-1] == 2),
    # One buffer (PLC_TRY_ONE_BUFFER), the cluster kernel's grid at 3 blocks an SM (all 12 rows' clusters
    # on the emulated device's 4 SMs: its cap is an H100's) or 4 (2 clusters).
    ((64, 1000), ("one_buffer",), ["kl_rows_f32_g32_e32_prefetch"], lambda grid, args: grid == 16),
    ((12, 20000), ("one_buffer",), ["kl_cluster_f32_t128_e32_prefetch"], lambda grid, args: grid == 12 * 8),
    ((12, 20000), ("one_buffer", 4), ["kl_cluster_f32_t128_e32_prefetch"], lambda grid, args: grid == 2 * 8),
]


def run_choice(module, choice, shape, dtype=np.float32, sms=None, seed=None):
    """KLDivergence(normTarget=True) on the emulated device (`sms` of them, else its own) under
    `choice`: (each launch's (name, grid, arguments, dynamic shared bytes, the device's defines
    then), the device, pred, target, error, grad)."""
    device = EmulatedDevice(module)
    if sms is not None:
        device.sms = sms
    launched = []
    launch = device.launch

    def spy(name, grid, block, signature, args, shared_bytes=0):
        launched.append((name, grid, args, shared_bytes, device.defines))
        return launch(name, grid, block, signature, args, shared_bytes)
    device.launch = spy
    rng = np.random.default_rng(sum(shape) if seed is None else seed)
    pred = (2 * rng.standard_normal(shape)).astype(dtype)
    target = rng.standard_normal(shape).astype(dtype)
    with backends.substituted_cuda(CudaBackend(device)):
        with try_choices.chosen(choice, device):
            error, grad = KLDivergence(normTarget=True)(EmuArray(pred), EmuArray(target))
    return launched, device, pred, target, error, grad.get().astype(np.float64)


def check_reference(pred, target, error, grad, grad_rtol=1e-5):
    """The float64 reference's error and grad (grad_rtol: the output type's rounding)."""
    ref = kl_reference(pred.astype(np.float64), target.astype(np.float64), normTarget=True)
    assert error == pytest.approx(ref["error"], rel=1e-5)
    np.testing.assert_allclose(grad, ref["grad"], rtol=grad_rtol,
                               atol=grad_rtol * np.abs(ref["p"]).max() / pred.shape[0])


@pytest.mark.parametrize("shape,choice,kernels,first_launch", CASES,
                         ids=[try_choices.choice_label(case[1]) for case in CASES])
def test_a_choice_launches_what_it_names(module, shape, choice, kernels, first_launch):
    library_choice = (row_softmax.row_or_cluster, row_softmax.stream_kernel, row_softmax.stream_staging,
                      row_softmax.prefetches, row_softmax.tiles, row_softmax.PREFETCH_BUFFERS,
                      row_softmax.PREFETCH_CLUSTER_GRID_BLOCKS)
    launched, device, pred, target, error, grad = run_choice(module, choice, shape)
    assert [name for name, *_ in launched] == kernels
    assert first_launch(*launched[0][1:3])
    if choice[0] == "one_buffer":   # (one buffer of pred's and target's 8 vectors a thread, 128 threads)
        assert launched[0][3] == 2 * 8 * 128 * 16
    # The library's own choice is back, and the device as it was.
    assert (row_softmax.row_or_cluster, row_softmax.stream_kernel, row_softmax.stream_staging,
            row_softmax.prefetches, row_softmax.tiles, row_softmax.PREFETCH_BUFFERS,
            row_softmax.PREFETCH_CLUSTER_GRID_BLOCKS) == library_choice
    assert device.clusters is True and device.max_blocks == 2 ** 31 - 1 and device.defines == ()
    check_reference(pred, target, error, grad)


def test_the_experiments_name_choices_it_knows():
    known = {"default", "plain", "rows", "cluster", "stream", "chunks", "grid", "prefetch", "cluster_prefetch", "stream_prefetch",
             "tile", "build", "one_buffer", "pass2_prefetch", "no_pass2", "chunk_same_order", "chunk_evict_first",
             "general",
             "chunk_e32"}
    for _, dtypes, norms, choices in try_choices.EXPERIMENTS:
        assert set(dtypes) <= {"float32", "bfloat16"} and set(norms) <= {False, True}
        assert {choice[0] for choice in choices} <= known
        assert choices[0] == ("default",)   # (each case's grads are compared with the default's)
    # A build choice's defines are ones the kernels test (a misspelt one would time the library again).
    for defines in try_choices.builds():
        for define in defines:
            assert try_choices.in_kernels((define,)), define
    assert not try_choices.in_kernels(("PLC_TRY_GONE",)) and not try_choices.in_kernels(("PLC_TRY_IN_PLAC",))


# (choice, shape, dtype, the SMs of the device, the kernels it must launch): the chunked kernels that
# the library takes for few long rows on an H100 (132 SMs: 2 rows of 70000 are too few for the
# stream kernel).
CHUNKED_F32 = ["kl_chunk_stats_f32", "kl_chunk_rows_f32", "kl_chunk_grad_f32"]
BUILD_CASES = [("chunk_same_order", (2, 70000), "float32", 132, CHUNKED_F32),
               ("chunk_evict_first", (2, 70000), "float32", 132, CHUNKED_F32),
               ("chunk_e32", (2, 70000), "float32", 132, CHUNKED_F32),
               ("chunk_e32", (2, 70000), "bfloat16", 132, [name.replace("f32", "bf16") for name in CHUNKED_F32])]


@pytest.mark.parametrize("choice,shape,dtype,sms,kernels", BUILD_CASES, ids=[f"{c[0]}-{c[4][0]}" for c in BUILD_CASES])
def test_a_build_choice_runs_its_kernels_built_so(module, choice, shape, dtype, sms, kernels):
    """Each build choice times the kernels it was made for, compiled with its defines, and they
    compute the divergence (normTarget)."""
    import ml_dtypes
    as_dtype = np.float32 if dtype == "float32" else ml_dtypes.bfloat16
    chunk_elems = dict(row_softmax.CHUNK_ELEMS)
    launched, device, pred, target, error, grad = run_choice(module, (choice,), shape, as_dtype, sms, seed=5)
    defines = try_choices.BUILT_WITH[choice]
    assert [(name, built_with) for name, *_, built_with in launched] == [(kernel, defines) for kernel in kernels]
    assert device.defines == () and row_softmax.CHUNK_ELEMS == chunk_elems
    if choice == "chunk_e32":   # (rows cut into the build's chunks of 256 x 32: kl_chunk_stats' chunks_per_row)
        assert launched[0][2][6] == -(-shape[1] // (row_softmax.CHUNK_THREADS * 32))
    check_reference(pred, target, error, grad, 1e-5 if dtype == "float32" else 1e-2)   # (grad rounded to bfloat16)


@pytest.mark.parametrize("shape,kernel", [((64, 1000), "kl_rows_bf16_g32_e32_prefetch"),
                                          ((12, 20000), "kl_cluster_bf16_t128_e32_prefetch")])
def test_the_general_choice_times_the_kernels_the_normt_twins_replace(module, shape, kernel):
    """bfloat16 normTarget: the library launches the "_normt" twin of its prefetching row and
    many-rows cluster kernels, "general" the kernel itself (as the library did before 2026-11-28),
    and both compute the divergence; the library's choice is back after."""
    import ml_dtypes
    for choice, launched_name in ((("default",), kernel + "_normt"), (("general",), kernel)):
        launched, _, pred, target, error, grad = run_choice(module, choice, shape, ml_dtypes.bfloat16, 4, seed=5)
        assert [name for name, *_ in launched] == [launched_name], choice
        check_reference(pred, target, error, grad, 1e-2)   # (grad rounded to bfloat16)
    assert row_softmax.in_place("kl_rows_bf16_g32_e32")


def test_the_pass2_choices_time_the_stream_kernel_with_and_without_its_pass2_twin(module):
    """bfloat16's stream kernel at 3 segments a block (2 x 140001): the library launches its
    prefetching twin, "pass2_prefetch" the twin that prefetches pass 2 too; at 4 (2 x 262144) the
    library launches that one, "no_pass2" the other; each computes the divergence."""
    import ml_dtypes
    kernel = "kl_cluster_stream_bf16_t256_e32_prefetch"
    for shape, choice, launched_name in [((2, 140001), ("default",), kernel),
                                         ((2, 140001), ("pass2_prefetch",), kernel + "_pass2"),
                                         ((2, 262144), ("default",), kernel + "_pass2"),
                                         ((2, 262144), ("no_pass2",), kernel)]:
        launched, _, pred, target, error, grad = run_choice(module, choice, shape, ml_dtypes.bfloat16, 2, seed=7)
        assert [name for name, *_ in launched] == [launched_name], (shape, choice)
        check_reference(pred, target, error, grad, 1e-2)   # (grad rounded to bfloat16)


def test_a_choice_it_no_longer_makes_is_refused(module):
    """A choice gone from try_choices ("chunk_prefetch", "in_place": the library's code since
    2026-11-27 and 2026-11-28), or a misspelt one, is refused, not timed as the default under its
    name."""
    device = EmulatedDevice(module)
    for choice in [("chunk_prefetch",), ("chunk_prefetch", 6), ("in_place",), ("defualt",)]:
        with pytest.raises(try_choices.UnknownChoice):
            with try_choices.chosen(choice, device):
                pass
    assert device.defines == () and device.max_blocks == 2 ** 31 - 1


def test_a_build_choice_runs_the_kernels_built_with_its_defines(module):
    device = EmulatedDevice(module)
    with try_choices.chosen(("build", "PLC_TRY_PLANTED"), device):
        assert device.defines == ("PLC_TRY_PLANTED",) and device.module is not module
    assert device.defines == ()


def fake_cubins(monkeypatch, folder, size, fill=bytes):
    """cached_cubin replaced by one that writes `size` bytes a cubin (fill(size)) into
    folder/puzzlelib_cost, as the cache keeps them; the calls it had."""
    from puzzlelib_cost.backends import kernel_build
    asked = []
    (folder / "puzzlelib_cost").mkdir(exist_ok=True)

    def cached_cubin(arch, defines=()):
        asked.append((arch, defines))
        cubin = folder / "puzzlelib_cost" / f"all_costs-{arch}-{len(asked)}.cubin"
        cubin.write_bytes(fill(size))
        return cubin
    monkeypatch.setattr(kernel_build, "cached_cubin", cached_cubin)
    return asked


def test_prebuild_packs_the_library_and_every_build_choice(monkeypatch, tmp_path, capsys):
    """--prebuild packs the cubins a GPU machine is then given (no nvcc there) into one archive,
    which unpacked into a cache folder gives the same files, under the cache's own subfolder, and
    nothing else (a cubin of an earlier commit left in the cache stays out)."""
    import tarfile
    (tmp_path / "puzzlelib_cost").mkdir()
    (tmp_path / "puzzlelib_cost" / "all_costs-sm_90-0123456789abcdef.cubin").write_bytes(b"old")
    asked = fake_cubins(monkeypatch, tmp_path, 1000, fill=lambda n: bytes(range(256)) * (n // 256))
    archive = tmp_path / "carry" / "kcache.tgz"
    assert try_choices.main(["--prebuild", "sm_90", "--archive", str(archive)]) == 0
    assert f"{len(asked)} cubins" in capsys.readouterr().out
    assert sorted(asked) == sorted(("sm_90", defines) for defines in try_choices.builds())
    assert ("sm_90", ()) in asked
    unpacked = tmp_path / "unpacked"
    with tarfile.open(archive) as tar:
        tar.extractall(unpacked, filter="data")
    names = sorted(path.relative_to(unpacked).as_posix() for path in unpacked.rglob("*.cubin"))
    assert names == [f"puzzlelib_cost/all_costs-sm_90-{i + 1}.cubin" for i in range(len(asked))]
    for name in names:
        assert (unpacked / name).read_bytes() == (tmp_path / name).read_bytes()


def test_prebuild_fails_when_the_archive_is_more_than_the_device_tool_carries(monkeypatch, tmp_path, capsys):
    """An archive past the carry limit would not reach the GPU machine, whose nvcc then takes
    minutes of GPU time to build the cubins again."""
    monkeypatch.setattr(try_choices, "CARRY_LIMIT_BYTES", 1000)
    fake_cubins(monkeypatch, tmp_path, 4000, fill=lambda n: np.random.default_rng(0).bytes(n))
    assert try_choices.main(["--prebuild", "sm_90", "--archive", str(tmp_path / "kcache.tgz")]) == 1
    assert "is more than the 0 MiB the device tool carries" in capsys.readouterr().err


def test_the_16_bit_chunks_loop_over_chunks_but_not_in_chunk_e32(module):
    """The library caps the 16-bit chunked kernels' grid at CHUNK_GRID_BLOCKS_PER_SM blocks an SM
    (on 10 SMs, 30 of the 2 rows' 36 chunks: blocks that loop, so that each has a next chunk to
    load), and float32's not; "chunk_e32", whose 16-bit kernels load no chunk ahead, takes the
    whole grid (18 chunks of 256 x 32) and leaves the cap as it found it."""
    import ml_dtypes
    cases = [(("default",), ml_dtypes.bfloat16, "bf16", 30), (("default",), np.float32, "f32", 36),
             (("grid", 2), ml_dtypes.bfloat16, "bf16", 20), (("chunk_e32",), ml_dtypes.bfloat16, "bf16", 18)]
    for choice, dtype, suffix, blocks in cases:
        launched, _, pred, target, error, grad = run_choice(module, choice, (2, 70000), dtype, sms=10, seed=5)
        assert [(name, grid) for name, grid, *_ in launched] == [(f"kl_chunk_stats_{suffix}", blocks),
                                                                  (f"kl_chunk_rows_{suffix}", 2),
                                                                  (f"kl_chunk_grad_{suffix}", blocks)], choice
        assert row_softmax.CHUNK_GRID_BLOCKS_PER_SM == {"f16": 3, "bf16": 3}
        check_reference(pred, target, error, grad, grad_rtol=1e-5 if suffix == "f32" else 1e-2)


def test_best_names_a_choice_only_with_the_default_grad_and_a_clear_lead():
    """The summary's best: a choice whose grad differs (or is NaN: elements it never wrote) is not
    a candidate, and one within WIN_POINTS of the default leaves the default named."""
    def entry(choice, fraction, diff, dtype="float32"):
        return {"shape": [16, 1048576], "dtype": dtype, "norm_target": False, "choice": choice,
                "fraction": fraction, "grad_difference": diff}
    best = try_choices.best_choices
    assert best([entry("default", 0.50, 0.0), entry("plain", 0.505, 0.0)]) == ["16x1048576 float32 probs: default 50%"]
    assert best([entry("default", 0.50, 0.0), entry("fast", 0.60, 1e-3)]) == ["16x1048576 float32 probs: default 50%"]
    assert best([entry("default", 0.50, 0.0), entry("fast", 0.60, float("nan"))]) == \
        ["16x1048576 float32 probs: default 50%"]
    assert best([entry("default", 0.50, 0.0), entry("fast", 0.60, 2e-6)]) == ["16x1048576 float32 probs: fast 60%"]
    assert best([entry("default", 0.30, 0.0, "bfloat16"), entry("fast", 0.40, 4e-3, "bfloat16")]) == \
        ["16x1048576 bfloat16 probs: fast 40%"]


def test_check_prebuilt_counts_the_cubins_the_cache_holds(monkeypatch, tmp_path, capsys):
    """run_on_gpu.sh's line after unpacking .kcarry: which cubins the experiments load are in the
    cache (a stale archive or another nvcc means builds of about 45 s each on the GPU's time)."""
    from puzzlelib_cost.backends import kernel_build
    monkeypatch.setattr(kernel_build, "cubin_path",
                        lambda arch, defines=(), directory=None: tmp_path / f"{arch}-{'-'.join(defines) or 'library'}.cubin")
    monkeypatch.setattr(kernel_build, "cubin_intact", lambda path: path.is_file() and path.read_bytes() == b"whole")
    (tmp_path / "sm_90-library.cubin").write_bytes(b"whole")
    cut_short = sorted(d for d in try_choices.builds() if d)[0]
    (tmp_path / f"sm_90-{'-'.join(cut_short)}.cubin").write_bytes(b"who")   # (counted missing: nvcc builds it again)
    assert try_choices.main(["--check-prebuilt", "sm_90"]) == 0
    out = capsys.readouterr().out
    total = len(try_choices.builds())
    assert "found   sm_90 (the library)" in out and out.count("MISSING") == total - 1
    assert f"prebuilt cubins: 1 of {total} in the cache; nvcc builds the other {total - 1}" in out


def test_cases_time_each_case_once_with_every_experiments_choices():
    """A case named by two experiments runs once, with both experiments' choices and one default
    (each timing of a choice already timed is a lent GPU's time spent twice)."""
    experiments = [((16, 10), ["float32", "bfloat16"], [False], [("default",), ("plain",)]),
                   ((16, 10), ["bfloat16"], [False, True], [("default",), ("tile",), ("plain",)])]
    assert list(try_choices.cases(experiments)) == [
        ((16, 10), "float32", False, [("default",), ("plain",)]),
        ((16, 10), "bfloat16", False, [("default",), ("plain",), ("tile",)]),
        ((16, 10), "bfloat16", True, [("default",), ("tile",), ("plain",)])]
    found = list(try_choices.cases())
    assert len({case[:3] for case in found}) == len(found)
    for *_, choices in found:
        assert choices[0] == ("default",) and len(set(choices)) == len(choices)


def recorded(module, choice, shape, sms=None):
    """try_choices.recorded_launches' keys of KLDivergence(normTarget=True) under `choice` on the
    emulated device, and the kernels the device launched."""
    device = EmulatedDevice(module)
    if sms is not None:
        device.sms = sms
    pred = np.random.default_rng(1).standard_normal(shape).astype(np.float32)
    with backends.substituted_cuda(CudaBackend(device)):
        with try_choices.chosen(choice, device), try_choices.recorded_launches(device) as keys:
            KLDivergence(normTarget=True)(EmuArray(pred), EmuArray(pred[::-1].copy()))
    return keys, device.launches


@pytest.mark.parametrize("shape,choice,same", [
    ((2, 70000), ("stream", 256, None), True),    # (the library's own stream kernel, staging and grid)
    ((2, 70000), ("stream", 256, 0), False),      # (a segment staged less: a scalar argument)
    ((8, 1000), ("plain",), True),                # (float32's rows have no twin to leave out)
    ((300, 10), ("plain",), False),               # (the untiled kernel)
    ((64, 100), ("grid", 1), False),              # (the grid)
    ((64, 1000), ("one_buffer",), False),         # (the kernel from another build, other shared memory)
    ((8, 1000), ("build", "PLC_TRY_PLANTED"), False)])
def test_a_choice_that_launches_what_the_default_did_is_not_timed_again(module, shape, choice, same):
    """main() times a choice only if its launches differ from every choice timed before in the case:
    in kernel, build, grid, block, shared memory or a scalar argument (not in the pointers)."""
    default, names = recorded(module, ("default",), shape)
    keys, chosen_names = recorded(module, choice, shape)
    assert [key[0] for key in default] == names and [key[0] for key in keys] == chosen_names
    assert (keys == default) is same
    again, _ = recorded(module, ("default",), shape)   # (other arrays, so other pointers: the same key)
    assert again == default


class TorchLikeArray(EmuArray):
    """An emulated device array with the few tensor methods try_choices.main() calls."""

    def element_size(self):
        return self.host.dtype.itemsize

    def float(self):
        import torch
        return torch.from_numpy(self.get().astype(np.float32))


def test_main_times_each_distinct_launch_once_and_keeps_its_results_whole(module, tmp_path, monkeypatch, capsys):
    """try_choices.main() as a GPU machine runs it, on the emulated device (torch's CUDA calls made
    no-ops): two experiments of one case make one case; the choices that launch the default's work
    (float32's plain, a grid cap above the default's grid, the default's own rows) are recorded as
    such and not timed; the others are timed, their grads checked; results.json is whole."""
    torch = pytest.importorskip("torch")
    import bench_kl
    import puzzlelib_cost
    device = EmulatedDevice(module)
    device.array_type = TorchLikeArray   # (the grads it makes)

    class Env:
        timer, device_name = bench_kl.CpuTimer(), device.name

        def __init__(self, torch):
            pass

        def make_inputs(self, n, c, dtype, norm, seed):
            rng = np.random.default_rng(seed)
            return (TorchLikeArray((2 * rng.standard_normal((n, c))).astype(np.float32)),
                    TorchLikeArray(rng.standard_normal((n, c)).astype(np.float32)))
    real_empty = torch.empty
    monkeypatch.setattr(bench_kl, "GpuEnv", Env)
    monkeypatch.setattr(puzzlelib_cost, "describe_backend", lambda: device.name)
    monkeypatch.setattr(torch, "empty", lambda n, dtype, device: real_empty(1024, dtype=dtype))
    monkeypatch.setattr(torch, "full_like", lambda array, value: None)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    monkeypatch.setattr(try_choices, "EXPERIMENTS", [
        ((64, 100), ["float32"], [True], [("default",), ("plain",), ("grid", 1)]),
        ((64, 100), ["float32"], [True], [("default",), ("grid", 2), ("rows", 16, 8), ("rows", 32, 8), ("rows", 8, 8)])])
    out = tmp_path / "choices.json"
    with backends.substituted_cuda(CudaBackend(device)):
        assert try_choices.main(["--out", str(out)]) == 0
    results = json.loads(out.read_text())
    entries = results["entries"]
    # what was timed, for the model's comparisons (they skip timings of kernels changed since)
    from puzzlelib_cost.backends.kernel_build import sources_digest
    assert results["kernels_digest"] == sources_digest() and results["commit"] and results["date"].endswith("Z")
    assert [path.name for path in tmp_path.iterdir()] == ["choices.json"]
    assert [(e["choice"], e.get("same_launches_as")) for e in entries] == [
        ("default", None), ("plain", "default"), ("grid(1)", None), ("grid(2)", "default"),
        ("rows(16,8)", "default"), ("rows(32,8)", None), ("rows(8,8)", None)]
    kernels = {"rows(32,8)": "kl_rows_f32_g32_e8", "rows(8,8)": "kl_rows_f32_g8_e8"}
    for e in entries:
        assert ("fraction" in e) == ("same_launches_as" not in e) and "error" not in e
        assert e["kernels"] == [kernels.get(e["choice"], "kl_rows_f32_g16_e8")]
        if "fraction" in e:
            assert e["median_s"] > 0
            # (rows of 100 do not fit 8 threads of 8: the elements it never wrote show as NaN)
            assert e["grad_difference"] < 1e-6 if e["choice"] != "rows(8,8)" else np.isnan(e["grad_difference"])
    assert "best: 64x100 float32 normT:" in capsys.readouterr().out


def test_a_copy_of_the_checkout_compiles_its_own_kernels(tmp_path):
    """kernel_dir() of a checkout's copy run with PYTHONPATH is the copy's kernels/: the editable
    install mapped puzzlelib_cost.kernels to the original checkout, so a clone's --prebuild,
    --check-prebuilt and cost-model predictions quietly used the other kernels."""
    import shutil
    import subprocess
    import puzzlelib_cost
    root = Path(puzzlelib_cost.__file__).resolve().parents[1]
    copy = tmp_path / "checkout"
    shutil.copytree(root / "puzzlelib_cost", copy / "puzzlelib_cost", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(root / "kernels", copy / "kernels", ignore=shutil.ignore_patterns("__pycache__"))
    found = subprocess.run([sys.executable, "-c", "from puzzlelib_cost.backends.kernel_build import kernel_dir; "
                            "print(kernel_dir())"], cwd=tmp_path, env={"PYTHONPATH": str(copy), "PATH": ""},
                           capture_output=True, text=True, check=True).stdout.strip()
    assert Path(found) == copy / "kernels"


def test_build_missing_builds_what_the_cache_lacks_at_once(tmp_path, monkeypatch, capsys):
    """run_on_gpu.sh, after its gate, where the prebuilt archive did not match: the missing cubins
    in parallel (one by one at first use they took about 45 s each inside the timed step)."""
    import threading
    from puzzlelib_cost.backends import kernel_build
    builds = sorted(try_choices.builds())
    have = set(builds[::2])
    monkeypatch.setattr(kernel_build, "cubin_path",
                        lambda arch, defines=(), directory=None: tmp_path / ("here" if defines in have else "gone"))
    monkeypatch.setattr(kernel_build, "cubin_intact", lambda path: path.is_file())
    (tmp_path / "here").write_bytes(b"")
    started, at_once, lock = [], [0, 0], threading.Lock()
    both = threading.Barrier(2, timeout=5)

    def build(arch, defines=()):
        with lock:
            started.append(defines)
            first_two = len(started) <= 2
            at_once[0] += 1
            at_once[1] = max(at_once)
        if first_two:   # (the first two builds in flight together, or a BrokenBarrierError; an odd last alone)
            both.wait()
        with lock:
            at_once[0] -= 1
        return tmp_path / "built"
    monkeypatch.setattr(kernel_build, "cached_cubin", build)
    assert try_choices.build_missing("sm_90", jobs=2) == 0
    missing = [d for d in builds if d not in have]
    assert sorted(started) == missing and at_once[1] == 2
    assert f"built {len(missing)} of the {len(missing)} missing cubins" in capsys.readouterr().out


def test_the_benchmark_shapes_are_one_list():
    """try_choices.py, the cost model and bench_kl.py time and predict the same shapes (each keeps
    its own list so that it imports no other benchmark)."""
    import bench_kl
    import cost_model
    assert try_choices.BENCHMARK_SHAPES == cost_model.SHAPES == bench_kl.SHAPES


def test_the_16_bit_chunk_grid_is_the_kernels_residency():
    """The library caps the 16-bit chunked kernels' grid at row_softmax.CHUNK_GRID_BLOCKS_PER_SM
    blocks an SM: the blocks they declare they fit (__launch_bounds__, PLC_CHUNK16_MIN_BLOCKS of the
    library's build, not PLC_TRY_CHUNK_E32's).  More would leave a wave of blocks waiting for the
    first to finish all their chunks; fewer, SMs' room unused."""
    import re
    source = (ROOT / "kernels" / "kl_divergence.cu").read_text()
    declared = re.search(r"#ifdef PLC_TRY_CHUNK_E32\n(?:#define .*\n)*#else\n(?:#define .*\n)*"
                         r"#define PLC_CHUNK16_MIN_BLOCKS (\d+)\n", source)
    assert declared, "kl_divergence.cu: no PLC_CHUNK16_MIN_BLOCKS in the library's build"
    assert {int(declared.group(1))} == set(row_softmax.CHUNK_GRID_BLOCKS_PER_SM.values())
    assert set(row_softmax.CHUNK_GRID_BLOCKS_PER_SM) == {"f16", "bf16"}


def test_the_prefetch_buffers_are_the_kernels():
    """row_softmax.PREFETCH_BUFFERS, the buffers the host sizes a prefetching kernel's shared memory
    for, is the kernels' PREFETCH_BUFFERS, in the library's build and in PLC_TRY_ONE_BUFFER's
    (whose choice, "one_buffer", sets the host's to 1).  Too few on the host would let the kernels
    write past their shared memory (the emulation's tests would see it); too many waste a block's
    shared memory and, for float32, a block an SM, which no test sees."""
    import re
    from puzzlelib_cost import row_softmax
    source = (ROOT / "kernels" / "kl_divergence.cu").read_text()
    declared = re.search(r"#ifdef PLC_TRY_ONE_BUFFER\nconstexpr int PREFETCH_BUFFERS = (\d+);\n#else\n"
                         r"constexpr int PREFETCH_BUFFERS = (\d+);\n#endif", source)
    assert declared, "kl_divergence.cu: no PREFETCH_BUFFERS for PLC_TRY_ONE_BUFFER and the library's build"
    assert (int(declared.group(1)), int(declared.group(2))) == (1, row_softmax.PREFETCH_BUFFERS)


def test_prebuild_names_cubins_where_the_kit_unpacks_them(monkeypatch, tmp_path):
    """A cubin built in the user's temporary folder (a cache that could not be written) is packed
    as puzzlelib_cost/<name>, where run_on_gpu.sh unpacks and the library looks (it went in as
    puzzlelib_cost-<uid>/<name>: none found on the GPU machine)."""
    import tarfile
    from puzzlelib_cost.backends import kernel_build
    fallback = tmp_path / "puzzlelib_cost-0"
    fallback.mkdir()

    def cached_cubin(arch, defines=()):
        cubin = fallback / f"all_costs-{arch}-{'-'.join(defines) or 'library'}.cubin"
        cubin.write_bytes(b"cubin")
        return cubin
    monkeypatch.setattr(kernel_build, "cached_cubin", cached_cubin)
    archive = tmp_path / "kcache.tgz"
    assert try_choices.main(["--prebuild", "sm_90", "--archive", str(archive)]) == 0
    with tarfile.open(archive) as tar:
        assert {name.split("/")[0] for name in tar.getnames()} == {"puzzlelib_cost"}
