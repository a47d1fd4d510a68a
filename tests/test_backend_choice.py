"""Which backend a call runs on, and the errors when the arrays and the pinned backend disagree."""
import numpy as np
import pytest

from emulated_device import EmuArray
from puzzlelib_cost import CostError, KLDivergence, active_backend, backends, describe_backend, gpuarray


@pytest.fixture
def pinned(monkeypatch):
    def pin(choice):
        monkeypatch.setenv(backends.ENV_VAR, choice)
    return pin


def pair():
    rng = np.random.default_rng(0)
    return rng.standard_normal((4, 6)).astype(np.float32), np.full((4, 6), 1 / 6, np.float32)


def test_cpu_pin_makes_host_arrays_and_reports_itself(pinned):
    pinned("cpu")
    assert active_backend() == "cpu"
    assert "pinned by PUZZLELIB_COST_BACKEND=cpu" in describe_backend()
    array = gpuarray.to_gpu(np.ones(3, np.float32))
    assert isinstance(array, gpuarray.GPUArray) and np.array_equal(array.get(), np.ones(3))


def test_a_cuda_array_with_the_cpu_backend_is_refused(pinned):
    pinned("cpu")
    pred, target = pair()
    div = KLDivergence()
    with pytest.raises(CostError, match="PUZZLELIB_COST_BACKEND=cpu but the inputs are CUDA arrays"):
        div(EmuArray(pred), EmuArray(target))
    assert div.numOfSamples == 0 and div.grad is None


def test_host_arrays_with_the_cuda_backend_pinned_are_refused(pinned):
    pinned("cuda")
    pred, target = pair()
    with pytest.raises(CostError, match="PUZZLELIB_COST_BACKEND=cuda but the inputs are host"):
        KLDivergence()(pred, target)


def test_mixed_host_and_cuda_arrays_are_refused():
    pred, target = pair()
    with pytest.raises(CostError, match="must all be host arrays or all be CUDA arrays"):
        KLDivergence()(pred, EmuArray(target))


def test_an_unknown_pin_is_refused(pinned):
    pinned("tpu")
    with pytest.raises(CostError, match="expected one of auto, cpu, cuda, got 'tpu'"):
        active_backend()


def test_cuda_arrays_without_a_usable_cuda_backend_say_why():
    if active_backend() == "cuda":
        pytest.skip("a GPU is usable here")
    pred, target = pair()
    with pytest.raises(CostError, match="the CUDA backend is not usable here"):
        KLDivergence()(EmuArray(pred), EmuArray(target))
