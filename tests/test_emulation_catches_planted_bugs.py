"""The emulation catches real kernel bugs: each test plants one in a copy of kernels/ and
shows the harness reports it (a wrong result in some thread order, an AddressSanitizer
report at the faulty line, or a misaligned-access fault naming block and thread)."""
import shutil
from pathlib import Path

import numpy as np
import pytest

import reference
from cuda_emulation import KernelFault, build
from puzzlelib_cost.backends.kernel_build import MAIN_SOURCE

KERNELS = Path(__file__).resolve().parents[1] / "kernels"
# The planted copies are built from the KL family's file alone (the rows kernels they launch):
# a third of the time of all_costs.cu, and these builds are never cached.
KL_SOURCE = "kl_divergence.cu"


def planted(tmp_path, file, old, new):
    """A copy of kernels/ with `old` replaced by `new` in `file` (which must contain it once)."""
    copy = tmp_path / "kernels"
    shutil.copytree(KERNELS, copy)
    source = (copy / file).read_text()
    assert source.count(old) == 1, f"the line to plant the bug in is gone from {file}: {old!r}"
    (copy / file).write_text(source.replace(old, new))
    return copy


def launch_rows(module, pred, target, threads, elems, order, block=None):
    """kl_rows_f32_g<threads>_e<elems> on (pred, target) with normTarget; returns (grad, batch error)."""
    n, c = pred.shape
    grad = np.full_like(pred, np.nan)
    rows_per_block = max(1, 128 // threads)
    blocks = -(-n // rows_per_block)
    block_sums, ticket, error = np.full(blocks, np.nan), np.zeros(1, np.uint32), np.full(1, np.nan)
    module.launch(f"kl_rows_f32_g{threads}_e{elems}", blocks, block or max(threads, 128),
                  [pred, target, None, None, grad, block_sums, ticket, error, None, np.float64(1),
                   np.float64(1 / n), np.float64(1), np.int64(n), np.int64(c), np.int32(1), np.int32(0),
                   np.float64(0.5)],
                  order=order)
    return grad, error[0]


def softmax_inputs(n, c, seed=0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, c)).astype(np.float32), rng.standard_normal((n, c)).astype(np.float32)


def matches_reference(pred, target, grad, error):
    ref = reference.kl_reference(pred.astype(np.float64), target.astype(np.float64), normTarget=True)
    return (np.allclose(grad, ref["grad"], rtol=1e-5, atol=1e-7)
            and np.isclose(error, ref["per_sample"].sum(), rtol=1e-5, atol=1e-6))


def test_the_unplanted_kernels_pass_in_every_order():
    module = build([KERNELS / MAIN_SOURCE], include_dirs=[KERNELS])
    pred, target = softmax_inputs(2, 2000)
    for order in ("forward", "reverse", "random"):
        assert matches_reference(pred, target, *launch_rows(module, pred, target, 128, 16, order))


def test_a_missing_syncthreads_is_caught(tmp_path):
    # Without the barrier between writing and reading the per-warp partials, warps read
    # partials other warps have not written yet: wrong in some thread orders, not all.
    kernels = planted(tmp_path, "common.cuh", "__syncthreads();   // every warp's partial is written", "")
    module = build([kernels / KL_SOURCE], include_dirs=[kernels])
    pred, target = softmax_inputs(2, 2000)
    outcomes = {order: matches_reference(pred, target, *launch_rows(module, pred, target, 128, 16, order))
                for order in ("forward", "reverse", "random")}
    assert not all(outcomes.values()), f"the missing barrier went unnoticed in every order: {outcomes}"


def test_an_off_by_one_tail_is_caught_by_the_address_sanitizer(tmp_path):
    # Element loads that run one past the end of the row: the last row reads past the array.
    kernels = planted(tmp_path, "common.cuh", "out[i] = (col >= 0 && col < cols) ?",
                      "out[i] = (col >= 0 && col <= cols) ?")
    module = build([kernels / KL_SOURCE], include_dirs=[kernels], sanitize=True)
    pred, target = softmax_inputs(3, 37)
    with pytest.raises(KernelFault, match="heap-buffer-overflow") as fault:
        launch_rows(module, pred, target, 8, 8, "forward")
    assert "common.cuh" in str(fault.value)


def test_a_misaligned_vector_load_is_caught(tmp_path):
    # Trusting every row to be 16-byte aligned: with C = 37 most rows are not.
    kernels = planted(tmp_path, "kl_divergence.cu", "const int64_t first = TILE ? 0 : -(aligned ? head : 0);",
                      "const int64_t first = 0; (void)head;")
    module = build([kernels / KL_SOURCE], include_dirs=[kernels])
    pred, target = softmax_inputs(3, 37)
    with pytest.raises(KernelFault, match=r"(?i)misaligned.*block.*thread|block.*thread.*misaligned"):
        launch_rows(module, pred, target, 8, 8, "forward")


def launch_stream(module, pred, target, staged, shared_bytes):
    """kl_cluster_stream_f32_t256_e16 on (pred, target) with normTarget, one cluster a row,
    `staged` segments a block kept in `shared_bytes` of dynamic shared memory; returns (grad,
    batch error)."""
    n, c = pred.shape
    grad = np.full_like(pred, np.nan)
    blocks = 8 * n
    block_sums, ticket, error = np.full(blocks, np.nan), np.zeros(1, np.uint32), np.full(1, np.nan)
    module.launch("kl_cluster_stream_f32_t256_e16", blocks, 256,
                  [pred, target, None, None, grad, block_sums, ticket, error, None, np.float64(1),
                   np.float64(1 / n), np.float64(1), np.int64(n), np.int64(c), np.int32(1), np.int32(0),
                   np.float64(0.5), np.int32(staged)],
                  shared_bytes=shared_bytes)
    return grad, error[0]


def test_the_stream_kernels_staging_stays_inside_its_shared_memory(tmp_path):
    """Under AddressSanitizer, kl_cluster_stream_*'s staged segments use exactly the dynamic shared
    memory the host gives them (2 segments of pred and target, 256 threads x 16 floats each), and
    a launch given one segment too few is reported as an overrun."""
    source = tmp_path / "kl_family.cu"   # (the KL family alone builds in a third of the time)
    source.write_text(f'#include "{KL_SOURCE}"\n#include "kl_cluster.cu"\n')
    module = build([source], include_dirs=[KERNELS], sanitize=True)
    pred, target = softmax_inputs(2, 8 * 4096 * 3 - 3)   # J = 3 segments a block: 2 staged
    segment = 2 * 256 * 16 * 4
    assert matches_reference(pred, target, *launch_stream(module, pred, target, 2, 2 * segment))
    with pytest.raises(KernelFault, match="dynamic shared memory overrun"):
        launch_stream(module, pred, target, 2, segment)
