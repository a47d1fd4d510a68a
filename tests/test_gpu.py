"""KLDivergence on a real GPU: pycuda, PyTorch and CuPy arrays in and out.

Skipped, with the reason, where no GPU is usable (no pycuda, no device, or
PUZZLELIB_COST_BACKEND=cpu); CI has no GPU, so these run on the lent GPU machine
(benchmarks/run_on_gpu.sh).  Oracles: the float64 reference of tests/reference.py,
the NumPy backend, and PyTorch's F.kl_div where torch is installed.
"""
import numpy as np
import pytest

import reference
from puzzlelib_cost import CostError, KLDivergence, backends, gpuarray


def _gpu_reason():
    try:
        if backends.active_backend() == "cuda":
            return None
    except CostError as exc:
        return str(exc)
    return f"no usable GPU: {backends.describe_backend()}"


pytestmark = pytest.mark.skipif(_gpu_reason() is not None, reason=str(_gpu_reason()))

SHAPES = [(1, 1), (3, 2), (5, 3), (7, 4), (9, 5), (64, 10), (33, 1000), (4, 16381), (3, 16389), (2, 128256),
          (1, 1048576), (3, 4, 5, 6)]


def inputs(shape, norm_target, seed=0):
    rng = np.random.default_rng(seed)
    pred = (3 * rng.standard_normal(shape)).astype(np.float32)
    if norm_target:
        return pred, (2 * rng.standard_normal(shape)).astype(np.float32)
    p = rng.random(shape) ** 3
    p /= p.reshape(shape[0], -1).sum(axis=1).reshape((-1,) + (1,) * (len(shape) - 1))
    return pred, p.astype(np.float32)


def check(error, grad, pred, target, norm_target, rtol=1e-5):
    ref = reference.kl_reference(pred.astype(np.float64), target.astype(np.float64) if target.dtype.kind == "f"
                                 else target, normTarget=norm_target)
    assert abs(error - ref["error"]) <= rtol * (abs(ref["error"]) + reference.term_magnitude(ref))
    np.testing.assert_allclose(np.asarray(grad, np.float64), ref["grad"], rtol=rtol,
                               atol=rtol * np.abs(ref["p"]).max() / ref["n"])


@pytest.mark.parametrize("norm_target", [False, True])
@pytest.mark.parametrize("shape", SHAPES)
def test_pycuda_arrays_match_reference_and_cpu(shape, norm_target):
    pred, target = inputs(shape, norm_target, seed=sum(shape))
    div = KLDivergence(normTarget=norm_target)
    error, grad = div(gpuarray.to_gpu(pred), gpuarray.to_gpu(target))
    assert isinstance(grad, gpuarray.GPUArray) and grad.shape == pred.shape and grad.dtype == np.float32
    check(error, grad.get(), pred, target, norm_target)
    cpu_error, cpu_grad = KLDivergence(normTarget=norm_target)(pred, target)
    assert error == pytest.approx(cpu_error, rel=1e-5, abs=1e-6)
    assert div.validate(gpuarray.to_gpu(pred), gpuarray.to_gpu(target)) == pytest.approx(error, rel=1e-12)


@pytest.mark.parametrize("cols", [10, 1000, 40000])
def test_labels_on_the_gpu(cols):
    rng = np.random.default_rng(cols)
    pred = rng.standard_normal((6, cols)).astype(np.float32)
    labels = rng.integers(0, cols, 6)
    error, grad = KLDivergence()(gpuarray.to_gpu(pred), gpuarray.to_gpu(labels))
    check(error, grad.get(), pred, labels, False)
    labels[4] = cols
    with pytest.raises(CostError, match=f"got {cols} at index 4"):
        KLDivergence()(gpuarray.to_gpu(pred), gpuarray.to_gpu(labels))


@pytest.mark.parametrize("cols", [5, 3000, 40000])
def test_extreme_values_as_on_the_cpu(cols):
    rng = np.random.default_rng(1)
    pred = rng.standard_normal((5, cols)).astype(np.float32)
    target = rng.random((5, cols)).astype(np.float32)
    pred[0, 0], pred[0, -1] = 5000.0, -5000.0
    pred[1, 0], target[1, 0] = -np.inf, 0.0
    pred[2, -1] = -np.inf
    pred[3, 0] = np.nan
    target[4] = 1e-38
    target[4, 0] = 1.0
    target /= target.sum(axis=1, keepdims=True)
    gpu_error, gpu_grad = KLDivergence()(gpuarray.to_gpu(pred), gpuarray.to_gpu(target))
    cpu_error, cpu_grad = KLDivergence()(pred, target)
    assert np.isnan(gpu_error) and np.isnan(cpu_error)
    np.testing.assert_allclose(gpu_grad.get(), cpu_grad, rtol=1e-5, atol=1e-7, equal_nan=True)


@pytest.mark.parametrize("cols", [1000, 262144])
def test_bitwise_deterministic_over_100_calls(cols):
    pred, target = (gpuarray.to_gpu(a) for a in inputs((8, cols), True, seed=2))
    div = KLDivergence(normTarget=True)
    first_error, first_grad = div(pred, target)
    first_grad = first_grad.get()
    for _ in range(99):
        error, grad = div(pred, target)
        assert error == first_error and np.array_equal(grad.get(), first_grad)


def test_device_memory_flat_over_10000_calls():
    import pycuda.driver as driver
    pred, target = (gpuarray.to_gpu(a) for a in inputs((64, 40000), True, seed=3))
    div = KLDivergence(normTarget=True)
    for _ in range(10):
        grad = div(pred, target, queryError=False)
    driver.Context.synchronize()
    free_before = driver.mem_get_info()[0]
    for _ in range(10000):
        grad = div(pred, target, queryError=False)
    driver.Context.synchronize()
    del grad
    assert abs(driver.mem_get_info()[0] - free_before) <= 64 * 40000 * 4 * 2


@pytest.mark.parametrize("dtype,rtol", [("float32", 1e-5), ("float16", 2e-3), ("bfloat16", 1e-2),
                                        ("float64", 1e-11)])
@pytest.mark.parametrize("norm_target", [False, True])
@pytest.mark.parametrize("shape", [(64, 10), (16, 1000), (2, 40000)])
def test_torch_tensors_against_f_kl_div(dtype, rtol, norm_target, shape):
    torch = pytest.importorskip("torch")
    import torch.nn.functional as F
    pred_np, target_np = inputs(shape, norm_target, seed=4)
    pred = torch.tensor(pred_np, device="cuda").to(getattr(torch, dtype))
    target = torch.tensor(target_np, device="cuda").to(getattr(torch, dtype))
    error, grad = KLDivergence(normTarget=norm_target)(pred, target)
    assert isinstance(grad, torch.Tensor) and grad.is_cuda and grad.dtype == pred.dtype
    # PyTorch's oracle in float64 on the same (rounded) inputs; its gradient is the positive one.
    x = pred.double().requires_grad_()
    t = target.double()
    loss = F.kl_div(F.log_softmax(x, 1), F.log_softmax(t, 1) if norm_target else t, reduction="batchmean",
                    log_target=norm_target)
    loss.backward()
    assert error == pytest.approx(loss.item(), rel=max(rtol, 1e-5), abs=1e-6)
    torch.testing.assert_close(grad.double(), -x.grad, rtol=rtol, atol=rtol / shape[0])


def test_cupy_arrays_in_and_out():
    cupy = pytest.importorskip("cupy")
    pred, target = inputs((16, 1000), True, seed=5)
    error, grad = KLDivergence(normTarget=True)(cupy.asarray(pred), cupy.asarray(target))
    assert isinstance(grad, cupy.ndarray)
    check(error, cupy.asnumpy(grad), pred, target, True)
