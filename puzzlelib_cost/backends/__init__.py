"""Which backend runs a call: NumPy for host arrays, CUDA for device arrays.

Every backend offers the same small interface:
  name                      "cpu" or "cuda"
  new_scalar(value)         a float64 scalar where the backend works (device memory on the GPU)
  read_scalar(s) / write_scalar(s, value)
  labels_to_host(info)      integer labels as a host array (for their range check)
  kl_divergence(pred, target, labels, norm_target, batch_error, accumulator, want_grad)
                            one fused pass: grad (or None), batch_error = summed KL,
                            accumulator += batch_error when an accumulator is given;
                            pred/target are ArrayInfo, labels the checked host labels or None.

The choice follows the arrays passed in and may be pinned with the environment
variable PUZZLELIB_COST_BACKEND = auto (default) | cpu | cuda.
"""
import contextlib
import os

import numpy as np

from ..arrays import describe
from ..errors import CostError
from .numpy_backend import NumpyBackend

ENV_VAR = "PUZZLELIB_COST_BACKEND"
_CHOICES = ("auto", "cpu", "cuda")

_numpy_backend = NumpyBackend()
_cuda = {"backend": None, "reason": None}   # the CUDA backend once made, or why it cannot be
_substitutes = []                           # backends that stand in for CUDA (tests: the CPU emulation)


def requested():
    choice = os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
    if choice not in _CHOICES:
        raise CostError(f"{ENV_VAR}: expected one of {', '.join(_CHOICES)}, got {choice!r}")
    return choice


def get_cuda_backend():
    """The CUDA backend, made on first use; CostError saying why when CUDA is not usable."""
    if _substitutes:
        return _substitutes[-1]
    if _cuda["backend"] is None and _cuda["reason"] is None:
        try:
            from .cuda_backend import CudaBackend
            from .pycuda_device import PycudaDevice
            _cuda["backend"] = CudaBackend(PycudaDevice())
        except Exception as exc:   # ImportError, no device, driver errors: all mean "not usable here"
            _cuda["reason"] = f"{type(exc).__name__}: {exc}"
    if _cuda["backend"] is None:
        raise CostError(f"the CUDA backend is not usable here ({_cuda['reason']})")
    return _cuda["backend"]


def cuda_usable():
    if requested() == "cpu":
        return False
    try:
        get_cuda_backend()
        return True
    except CostError:
        if requested() == "cuda":
            raise
        return False


def active_backend():
    """The backend that gpuarray arrays, and so PuzzleLib-style code, run on: "cuda" or "cpu"."""
    return "cuda" if cuda_usable() else "cpu"


def describe_backend():
    """One line for humans: the active backend and, on the CPU, why not CUDA."""
    choice = requested()
    if active_backend() == "cuda":
        return f"cuda ({get_cuda_backend().device.name}; {ENV_VAR}={choice})"
    if choice == "cpu":
        return f"cpu (NumPy; pinned by {ENV_VAR}=cpu)"
    return f"cpu (NumPy; CUDA not usable: {_cuda['reason']})"


def for_arrays(pred, target):
    """(backend, pred_info, target_info) for a call, or CostError."""
    pred_info, target_info = describe(pred, "pred"), describe(target, "target")
    if pred_info.where != target_info.where:
        raise CostError(f"pred and target must both be host arrays or both be CUDA arrays, got pred on "
                        f"{pred_info.where} ({pred_info.kind}) and target on {target_info.where} ({target_info.kind})")
    choice = requested()
    if pred_info.where == "host":
        if choice == "cuda":
            raise CostError(f"{ENV_VAR}=cuda but pred and target are host (numpy) arrays; "
                            f"move them with gpuarray.to_gpu()")
        return _numpy_backend, pred_info, target_info
    if choice == "cpu":
        raise CostError(f"{ENV_VAR}=cpu but pred and target are CUDA arrays ({pred_info.kind}); "
                        f"the CPU backend takes numpy arrays (use .get() or unset {ENV_VAR})")
    for info in (pred_info, target_info):
        if not info.contiguous:   # the kernels index rows as pred + row * C
            name = "pred" if info is pred_info else "target"
            raise CostError(f"{name}: the CUDA backend expects a C-contiguous array, got a strided "
                            f"{info.kind} view of shape {info.shape}; pass a contiguous copy")
    return get_cuda_backend(), pred_info, target_info


def check_labels(labels, num_classes, maxlabels):
    """CostError naming the first label outside [0, num_classes) (and < maxlabels when set)."""
    limit = num_classes if maxlabels is None else min(num_classes, maxlabels)
    bad = np.flatnonzero((labels < 0) | (labels >= limit))
    if bad.size:
        where = int(bad[0])
        raise CostError(f"target: expected class labels in [0, {limit}), got {labels[where]} at index {where}"
                        + (f" ({bad.size} labels out of range)" if bad.size > 1 else ""))


@contextlib.contextmanager
def substituted_cuda(backend):
    """Run CUDA arrays on `backend` instead of pycuda (the tests' CPU emulation of the kernels)."""
    _substitutes.append(backend)
    try:
        yield backend
    finally:
        _substitutes.remove(backend)
