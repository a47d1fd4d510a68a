"""Every cost, and its torch module, on a real GPU with PyTorch CUDA tensors (and CuPy arrays),
against the same cost on CPU tensors (the NumPy backend, itself checked against independent
formulas in test_costs_*.py and test_nn.py).  These skip without a real GPU: the driver stand-in
runs pycuda arrays only (test_costs_* cover those there)."""
import numpy as np
import pytest

import puzzlelib_cost
from test_nn import CASES, WEIGHTS, as_pred, inputs, leaves

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.pycuda

# float32 GPU arithmetic against the NumPy backend's float64: ~1e-6 relative; 16-bit grads round
# to the dtype (2^-8 relative for bfloat16).
RTOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 1e-2}


@pytest.fixture
def real_gpu(cuda_driver):
    if cuda_driver != "gpu":
        pytest.skip("needs a real GPU (PyTorch and CuPy do not run on the driver stand-in)")


def cuda(x):
    return [t.cuda() for t in x] if isinstance(x, list) else x.cuda()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name", list(CASES))
def test_module_on_cuda_tensors_matches_cpu(real_gpu, name, dtype):
    make, _, kind = CASES[name]
    pred, target = inputs(kind, dtype, seed=11)
    on_cpu, on_gpu = leaves(pred), [p.cuda().detach().requires_grad_() for p in leaves(pred)]
    cpu_loss = make()(as_pred(on_cpu), target)
    gpu_loss = make()(as_pred(on_gpu), target.cuda())
    cpu_loss.backward()
    gpu_loss.backward()
    assert gpu_loss.device.type == "cuda" and gpu_loss.dtype == cpu_loss.dtype
    assert float(gpu_loss.detach()) == pytest.approx(float(cpu_loss.detach()), rel=RTOL[dtype], abs=1e-12)
    for g, c in zip(on_gpu, on_cpu):
        scale = float(c.grad.abs().max()) or 1.0
        assert float((g.grad.cpu().double() - c.grad.double()).abs().max()) <= RTOL[dtype] * scale


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64], ids=str)
def test_the_modules_grad_scaling_on_cuda_is_the_wide_product_rounded_once(real_gpu, dtype):
    """nn's backward scales the library's grad by -dL/dE in one pass on CUDA (out= in the grad's
    dtype, the product taken in float32; float64 for float64): bit for bit the product widened,
    multiplied and narrowed in three, at a GradScaler's 65536 and at 0.3 (not bfloat16's 0.30078)."""
    from puzzlelib_cost.nn import _scaled
    gen = torch.Generator().manual_seed(3)
    grad = torch.randn(257, 33, generator=gen, dtype=torch.float64).to(dtype).cuda()
    wide = torch.promote_types(dtype, torch.float32)
    for incoming in (65536.0, 0.3, -1.7):
        grad_output = torch.tensor(incoming, dtype=wide, device="cuda")
        expected = (grad.to(wide) * (-grad_output)).to(dtype)
        assert torch.equal(_scaled(grad, grad_output), expected), incoming


# The library's cost of each case of test_nn.CASES, with its constructor arguments.
LIBRARY_COSTS = {"MSE": ("MSE", {}), "Abs": ("Abs", {}), "SmoothL1": ("SmoothL1", {}), "BCE": ("BCE", {}),
                 "Hinge": ("Hinge", {}), "SVM-l1": ("SVM", {"mode": "l1"}), "SVM-l2": ("SVM", {"mode": "l2"}),
                 "CrossEntropy": ("CrossEntropy", {}),
                 "CrossEntropy-weighted": ("CrossEntropy", {"weights": np.array(WEIGHTS)}),
                 "KLDivergence": ("KLDivergence", {"normTarget": True}), "L1Hinge": ("L1Hinge", {})}


@pytest.mark.parametrize("name", list(CASES))
def test_cost_on_cupy_arrays_matches_cpu(real_gpu, name):
    cupy = pytest.importorskip("cupy")
    cls, kwargs = LIBRARY_COSTS[name]
    cost = getattr(puzzlelib_cost, cls)
    pred, target = inputs(CASES[name][2], torch.float32, seed=12)
    host = [p.numpy() for p in pred] if isinstance(pred, list) else pred.numpy()
    cpu_error, cpu_grad = cost(**kwargs)(host, target.numpy())
    device = [cupy.asarray(p) for p in host] if isinstance(host, list) else cupy.asarray(host)
    gpu_error, gpu_grad = cost(**kwargs)(device, cupy.asarray(target.numpy()))
    assert gpu_error == pytest.approx(cpu_error, rel=1e-5)
    for g, c in zip(*(x if isinstance(x, list) else [x] for x in (gpu_grad, cpu_grad))):
        assert isinstance(g, cupy.ndarray)
        np.testing.assert_allclose(cupy.asnumpy(g), c, rtol=1e-5, atol=1e-5 * np.abs(c).max())
