"""KLDivergence through pycuda on a CUDA driver: pycuda arrays, generic __cuda_array_interface__
objects, and on a real GPU also PyTorch tensors and CuPy arrays.

Every test here is marked `pycuda`: where a GPU is usable it runs on it, and where none is (CI)
on the driver stand-in of tests/driver_standin, whose launches run the kernels' CPU emulation;
heavy loops are scaled down there.  Tests of PyTorch and CuPy need the real thing and skip on
the stand-in.  Oracles: the float64 reference of tests/reference.py, the NumPy backend, and
PyTorch's F.kl_div.
"""
import threading

import numpy as np
import pytest

import reference
from interface_array import InterfaceArray
from puzzlelib_cost import CostError, KLDivergence, gpuarray

pytestmark = pytest.mark.pycuda

# (33 rows of 70000: the stream kernel on an H100, whose 132 SMs give fewer rows to the chunks.)
SHAPES = [(1, 1), (3, 2), (5, 3), (7, 4), (9, 5), (64, 10), (33, 1000), (4, 16381), (3, 16389), (2, 128256),
          (33, 70000), (1, 1048576), (3, 4, 5, 6)]


@pytest.fixture(autouse=True)
def driver(cuda_driver):
    """"gpu" on a real GPU, else the driver stand-in (see conftest.py)."""
    return cuda_driver


@pytest.fixture
def real_gpu(driver):
    if driver != "gpu":
        pytest.skip("needs a real GPU (PyTorch and CuPy do not run on the driver stand-in)")


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


# (First in the file: benchmarks/run_on_gpu.sh's racecheck, which may run out of time, takes these
# first, the kernels with the most shared-memory traffic.)
# (the twin, which kernel it twins, its shape on a real GPU, on the stand-in): the prefetching row
# kernels of 1000 and 4000 columns, the many-rows cluster kernel (264 rows or more on 132 SMs,
# 8 on the stand-in's 4) and the stream kernel, each on a grid of 2 blocks (2 clusters) so that
# they loop over rows; the tiled row kernel of 10 columns (rounds of 128 rows, the last partial).
TWINS = [("_prefetch", "rows", (33, 1000), (9, 1000)),
         ("_prefetch", "rows", (9, 4000), (5, 4000)), ("_prefetch", "cluster", (300, 20000), (9, 20000)),
         ("_prefetch", "stream", (33, 70000), (3, 70000)), ("_tile", "rows", (300, 10), (300, 10))]
TWIN_CHOICES = {"_prefetch": "prefetches", "_tile": "tiles"}   # (the row_softmax function choosing each)


@pytest.mark.parametrize("norm_target", [False, True])
@pytest.mark.parametrize("twin,which,gpu_shape,standin_shape", TWINS,
                         ids=[f"{w}-{g[1]}{t}" for t, w, g, _ in TWINS])
def test_pycuda_twin_kernels_give_the_plain_kernels_bits(driver, monkeypatch, twin, which, gpu_shape, standin_shape,
                                                         norm_target):
    """The prefetching and tiled twins of kernels (row_softmax.prefetches and tiles: those the
    library takes and the others) compute what the plain ones do from the same values, so their results must be the
    same bits; and the float64 reference's.  On a GPU this also runs their asynchronous copies and
    shared-memory tiles on the hardware (and under the kit's memcheck)."""
    from puzzlelib_cost import backends, row_softmax
    shape = gpu_shape if driver == "gpu" else standin_shape
    pred, target = (gpuarray.to_gpu(a) for a in inputs(shape, norm_target, seed=shape[1]))
    device = backends.get_cuda_backend(0).device
    monkeypatch.setattr(device, "max_blocks", 2 if which == "rows" else 16, raising=False)
    div = KLDivergence(normTarget=norm_target)
    # (float32's prefetching twins, which the library does not launch, have no "_normt" form: the
    # plain kernels' general form is theirs)
    monkeypatch.setattr(row_softmax, "in_place", lambda kernel: twin != "_prefetch")
    monkeypatch.setattr(row_softmax, TWIN_CHOICES[twin], lambda kernel: False)
    plain_error, plain_grad = div(pred, target)
    monkeypatch.setattr(row_softmax, TWIN_CHOICES[twin], lambda kernel: True)
    if driver != "gpu":
        driver.clear()
    error, grad = div(pred, target)
    if driver != "gpu":   # (the stand-in records its launches)
        launched = [line.split()[0] for line in driver.launches()]
        kernel = {"rows": "kl_rows_f32_", "cluster": "kl_cluster_f32_", "stream": "kl_cluster_stream_f32_"}[which]
        assert len(launched) == 1 and launched[0].startswith(kernel) and launched[0].endswith(twin), launched
    assert error == plain_error and np.array_equal(grad.get(), plain_grad.get())
    check(error, grad.get(), pred.get(), target.get(), norm_target)


# (its shape on a real GPU, on the stand-in): the row kernels of a warp (prefetching, in bfloat16)
# and of 128 threads, the many-rows cluster kernel (prefetching, in bfloat16) and the few-rows one.
NORMT_SHAPES = [((33, 1000), (5, 1000)), ((9, 4000), (3, 4000)), ((300, 20000), (9, 20000)), ((2, 40000), (2, 40000))]


@pytest.mark.parametrize("dtype_name", ["float32", "bfloat16", "float16"])
@pytest.mark.parametrize("gpu_shape,standin_shape", NORMT_SHAPES, ids=[str(g) for g, _ in NORMT_SHAPES])
def test_pycuda_normt_kernels_agree_with_the_general_ones(driver, monkeypatch, dtype_name, gpu_shape, standin_shape):
    """normTarget forward KL launches the "_normt" twins (the exponentials kept in place of the
    logits; on a GPU the 16-bit dtypes' hardware ex2 and asynchronous copies too): the float64
    reference's results, and the general kernels' grad within one unit in the last place of the
    output type at the largest |grad| (q and p each rounded once either way; float32's, whose
    output rounding does not hide the exponentials' own, within 12 units of float32 at the largest
    p or q, over n: expf within 2 ulp there, the kept exponential within 2 ulp, times 1 / sum
    rounded, then the product, for each of q and p), its error within float arithmetic of the
    terms."""
    import ml_dtypes
    from puzzlelib_cost import row_softmax
    dtype = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}[dtype_name]
    shape = gpu_shape if driver == "gpu" else standin_shape
    pred, target = (a.astype(dtype) for a in inputs(shape, True, seed=shape[1] + 3))
    pred_dev, target_dev = gpuarray.to_gpu(pred), gpuarray.to_gpu(target)
    if driver != "gpu":
        driver.clear()
    error, grad = KLDivergence(normTarget=True)(pred_dev, target_dev)
    if driver != "gpu":   # (the stand-in records its launches)
        launched = [line.split()[0] for line in driver.launches()]
        assert len(launched) == 1 and launched[0].endswith("_normt"), launched
    monkeypatch.setattr(row_softmax, "in_place", lambda kernel: False)
    general_error, general_grad = KLDivergence(normTarget=True)(pred_dev, target_dev)
    grad, general_grad = grad.get().astype(np.float64), general_grad.get().astype(np.float64)
    rtol = {"float32": 1e-5, "bfloat16": 1e-2, "float16": 2e-3}[dtype_name]
    check(error, grad, pred.astype(np.float64), target.astype(np.float64), True, rtol=rtol)
    eps = float(ml_dtypes.finfo(dtype).eps)
    ref = reference.kl_reference(pred.astype(np.float64), target.astype(np.float64), normTarget=True)
    if dtype_name == "float32":
        atol = 12 * eps * max(np.abs(ref["p"]).max(), np.abs(ref["q"]).max()) / ref["n"]
    else:
        atol = eps * np.abs(general_grad).max()
    np.testing.assert_allclose(grad, general_grad, rtol=0, atol=atol)
    assert abs(error - general_error) <= 1e-5 * (abs(ref["error"]) + reference.term_magnitude(ref))


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
def test_pycuda_labels(cols):
    rng = np.random.default_rng(cols)
    pred = rng.standard_normal((6, cols)).astype(np.float32)
    labels = rng.integers(0, cols, 6)
    error, grad = KLDivergence()(gpuarray.to_gpu(pred), gpuarray.to_gpu(labels))
    check(error, grad.get(), pred, labels, False)
    labels[4] = cols
    with pytest.raises(CostError, match=f"got {cols} at index 4"):
        KLDivergence()(gpuarray.to_gpu(pred), gpuarray.to_gpu(labels))


@pytest.mark.parametrize("cols", [5, 3000, 40000])
def test_pycuda_extreme_values_as_on_the_cpu(cols):
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
def test_pycuda_bitwise_deterministic_over_repeated_calls(driver, cols):
    calls = 100 if driver == "gpu" else 10
    pred, target = (gpuarray.to_gpu(a) for a in inputs((8, cols), True, seed=2))
    div = KLDivergence(normTarget=True)
    first_error, first_grad = div(pred, target)
    first_grad = first_grad.get()
    for _ in range(calls - 1):
        error, grad = div(pred, target)
        assert error == first_error and np.array_equal(grad.get(), first_grad)


def test_pycuda_device_memory_flat_over_many_calls(driver):
    import pycuda.driver as cuda
    calls, shape = (10000, (64, 40000)) if driver == "gpu" else (500, (64, 1000))
    pred, target = (gpuarray.to_gpu(a) for a in inputs(shape, True, seed=3))
    div = KLDivergence(normTarget=True)
    for _ in range(10):
        grad = div(pred, target, queryError=False)
    cuda.Context.synchronize()
    free_before = cuda.mem_get_info()[0]
    live_before = None if driver == "gpu" else driver.live_allocations()
    for _ in range(calls):
        grad = div(pred, target, queryError=False)
    cuda.Context.synchronize()
    del grad
    assert abs(cuda.mem_get_info()[0] - free_before) <= pred.nbytes * 2
    if live_before is not None:
        assert driver.live_allocations() == live_before


@pytest.mark.parametrize("norm_target", [False, True])
def test_pycuda_interface_arrays_in_pycuda_arrays_out(norm_target):
    pred, target = inputs((6, 700), norm_target, seed=4)
    pred_dev, target_dev = gpuarray.to_gpu(pred), gpuarray.to_gpu(target)
    error, grad = KLDivergence(normTarget=norm_target)(InterfaceArray(pred_dev, pred.shape, pred.dtype),
                                                       InterfaceArray(target_dev, target.shape, target.dtype, stream=1))
    assert isinstance(grad, gpuarray.GPUArray)
    check(error, grad.get(), pred, target, norm_target)


def test_pycuda_call_from_another_thread():
    pred, target = inputs((16, 1000), True, seed=5)
    pred_dev, target_dev = gpuarray.to_gpu(pred), gpuarray.to_gpu(target)
    div, results = KLDivergence(normTarget=True), []
    worker = threading.Thread(target=lambda: results.append(div(pred_dev, target_dev)))
    worker.start()
    worker.join()
    error, grad = results[0]
    check(error, grad.get(), pred, target, True)


@pytest.mark.parametrize("dtype,rtol", [("float32", 1e-5), ("float16", 2e-3), ("bfloat16", 1e-2),
                                        ("float64", 1e-11)])
@pytest.mark.parametrize("norm_target", [False, True])
@pytest.mark.parametrize("shape", [(64, 10), (16, 1000), (2, 40000)])
def test_torch_tensors_against_f_kl_div(real_gpu, dtype, rtol, norm_target, shape):
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


def test_torch_side_stream_is_followed(real_gpu):
    """Under `with torch.cuda.stream(s)`, pred and target are written on s after a long sleep:
    our kernels must wait for them, and work queued on s after the call must see our grad."""
    torch = pytest.importorskip("torch")
    pred_np, target_np = inputs((64, 4000), True, seed=6)
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        torch.cuda._sleep(200_000_000)                    # ~0.1 s of GPU time before the inputs exist
        pred = torch.tensor(pred_np).to("cuda", non_blocking=True) * 1.0
        target = torch.tensor(target_np).to("cuda", non_blocking=True) * 1.0
        error, grad = KLDivergence(normTarget=True)(pred, target)
        seen = grad.clone()                               # queued on s, after our kernels
    side.synchronize()
    check(error, seen.cpu().numpy(), pred_np, target_np, True)


def test_torch_on_the_second_gpu(real_gpu):
    torch = pytest.importorskip("torch")
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    pred_np, target_np = inputs((16, 1000), True, seed=7)
    pred, target = torch.tensor(pred_np, device="cuda:1"), torch.tensor(target_np, device="cuda:1")
    error, grad = KLDivergence(normTarget=True)(pred, target)
    assert grad.device == pred.device
    check(error, grad.cpu().numpy(), pred_np, target_np, True)
    with pytest.raises(CostError, match="same GPU"):
        KLDivergence(normTarget=True)(pred, target.to("cuda:0"))


def test_torch_from_another_thread(real_gpu):
    torch = pytest.importorskip("torch")
    pred_np, target_np = inputs((16, 1000), True, seed=8)
    pred, target = torch.tensor(pred_np, device="cuda"), torch.tensor(target_np, device="cuda")
    results = []
    worker = threading.Thread(target=lambda: results.append(KLDivergence(normTarget=True)(pred, target)))
    worker.start()
    worker.join()
    check(results[0][0], results[0][1].cpu().numpy(), pred_np, target_np, True)


def test_cupy_arrays_in_and_out(real_gpu):
    cupy = pytest.importorskip("cupy")
    pred, target = inputs((16, 1000), True, seed=5)
    error, grad = KLDivergence(normTarget=True)(cupy.asarray(pred), cupy.asarray(target))
    assert isinstance(grad, cupy.ndarray)
    check(error, cupy.asnumpy(grad), pred, target, True)


def test_cupy_stream_is_followed(real_gpu):
    cupy = pytest.importorskip("cupy")
    pred_np, target_np = inputs((64, 4000), True, seed=9)
    stream = cupy.cuda.Stream(non_blocking=True)
    with stream:
        pred, target = cupy.asarray(pred_np) * 1.0, cupy.asarray(target_np) * 1.0
        error, grad = KLDivergence(normTarget=True)(pred, target)
        seen = grad.copy()
    stream.synchronize()
    check(error, cupy.asnumpy(seen), pred_np, target_np, True)


# The child process of the test below (a fault there, were the driver's answer wrong, would end
# that process and leave this one's context usable): the driver's answer for memory of a context
# made by the user, and what the library then does with it, as JSON.
CONTEXT_CHILD = """
import json, sys
sys.path[:0] = [{tests!r}, {root!r}]
import pycuda.driver as drv
import pycuda.gpuarray
from test_gpu import inputs, check
from puzzlelib_cost import CostError, KLDivergence, backends
from puzzlelib_cost.backends import cuda_driver
drv.init()
pred, target = inputs((4, 10), True)
backend = backends.get_cuda_backend(0)   # (the primary context, made first, as an earlier call would)
own = drv.Device(0).make_context()
arrays = [pycuda.gpuarray.to_gpu(a) for a in (pred, target)]
with backend.device.active():
    reachable = cuda_driver.reachable_here(int(arrays[0].gpudata))
try:
    error, grad = KLDivergence(normTarget=True)(*arrays)
    grad = grad.get()
    drv.Context.synchronize()
    check(error, grad, pred, target, True)
    outcome = "ran, and matched the reference"
except CostError as exc:
    outcome = "CostError: " + str(exc)
print(json.dumps({{"reachable": reachable, "outcome": outcome}}))
del arrays
drv.Context.pop()
"""


def test_pycuda_arrays_of_a_context_of_their_own_are_refused(real_gpu):
    """Arrays of a context the user made (pycuda.autoinit's, make_context's) are refused, whatever
    the driver answers to "their address in the primary context" (DEVICE_POINTER; an H200 with
    driver 580 answered with one at a0916b1): the work is not ordered with that context's
    streams.  The answer is printed for the record.  In a child process, under whatever tool
    runs this one (compute-sanitizer follows children), so that a launch, were the refusal
    missed, faults that process alone.  (The stand-in's side is test_pycuda_path.py's.)"""
    import json
    import os
    import subprocess
    import sys
    tests = os.path.dirname(os.path.abspath(__file__))
    script = CONTEXT_CHILD.format(tests=tests, root=os.path.dirname(tests))
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    answer = json.loads(done.stdout.strip().splitlines()[-1])
    print("the driver's answer for another context's memory:", answer)
    assert answer["outcome"].startswith("CostError: pred: its memory belongs to a CUDA context of its own"), answer
