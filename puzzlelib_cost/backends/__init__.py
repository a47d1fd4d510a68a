"""Which backend runs a call: NumPy for host arrays, CUDA for device arrays.

Every backend offers the same small interface, and knows no cost:
  name                      "cpu" or "cuda"; each cost family runs its NumPy math on "cpu"
                            and its launch plan on "cuda" (puzzlelib_cost/<family>.py)
  new_scalar(value)         a float64 scalar where the backend works (device memory on the GPU)
  read_scalar(s) / write_scalar(s, value)
  labels_to_host(info)      integer labels as a host array (CTC's checks and plan, which need the
                            values themselves)
  checked_labels(info, low, high, expected, shape, dtype, name="target", distinct_rows=False, ignore=None)
                            integer labels all in [low, high) (and, distinct_rows, (N, K) columns
                            distinct in each row: a sparse teacher's; ignore, a label left out, as
                            -1, and counted), else the CostError naming the first bad one: the host
                            labels on "cpu", a device copy narrowed to dtype (CheckedLabels, checked
                            by kernels) on "cuda"
NumpyBackend adds output/store_error for the NumPy math; CudaBackend adds
run(infos), the context of one call's allocations and launches, and check_streams(infos),
a CostError if the arrays' streams cannot take our work now (CUDA graph capture).

The choice follows the arrays passed in and may be pinned with the environment
variable PUZZLELIB_COST_BACKEND = auto (default) | cpu | cuda.  CUDA arrays run
on the CUDA backend of the GPU that holds them (one per device); pred and
target on different GPUs are refused.
"""
import contextlib
import os
import threading

from ..arrays import describe
from ..cpu_kernels import check_setting as check_cpu_kernels_setting
from ..errors import CostError
from .numpy_backend import NumpyBackend

ENV_VAR = "PUZZLELIB_COST_BACKEND"
_CHOICES = ("auto", "cpu", "cuda")

_numpy_backend = NumpyBackend()
_substitutes = []   # backends that stand in for CUDA (tests: the CPU emulation)
# Per device ordinal: its CUDA backend once made, or why it cannot be; `pid`: the process they
# belong to (a forked child inherits them but cannot use CUDA).
# `no_driver`: why pycuda could not be imported, kept so that each later call does not try again
# (an import that fails costs 0.2 ms a call; a pycuda installed later is seen after a restart).
# `making`: held while a device's backend is made, one a device whatever the threads (a new one
# after a fork: the parent's may have been held by another of its threads).
_cuda = {"backends": {}, "reasons": {}, "pid": os.getpid(), "forked": False, "no_driver": None,
         "making": threading.Lock()}


def cpu_backend():
    """The NumPy backend (one for the process)."""
    return _numpy_backend


def requested():
    choice = os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
    if choice not in _CHOICES:
        raise CostError(f"{ENV_VAR}: expected one of {', '.join(_CHOICES)}, got {choice!r}")
    return choice


def get_cuda_backend(ordinal=None):
    """The CUDA backend of device `ordinal` (default: the current device), made on first use;
    CostError saying why when CUDA is not usable there."""
    if _substitutes:
        return _substitutes[-1]
    backend, reason = _cuda_backend(ordinal)
    if backend is None:
        raise CostError(f"the CUDA backend is not usable here ({reason})")
    return backend


def _cuda_backend(ordinal=None):
    """(the CUDA backend of device `ordinal`, default the current one, made on first use, and
    None) or (None, why CUDA cannot run there)."""
    if _cuda["pid"] != os.getpid():   # a forked child: the parent's CUDA state is not ours
        _cuda["forked"] = bool(_cuda["backends"]) or _cuda["forked"]
        forget_cuda()
    if _cuda["forked"]:
        from .pycuda_device import FORKED
        return None, FORKED
    if _cuda["no_driver"]:
        return None, _cuda["no_driver"]
    try:
        if ordinal is None:
            from .pycuda_device import current_ordinal
            ordinal = current_ordinal()
    except ImportError as exc:   # no pycuda, or one built for another CUDA: not here, in this process
        _cuda["no_driver"] = f"{type(exc).__name__}: {exc}"
        return None, _cuda["no_driver"]
    except Exception as exc:   # no driver, no device
        return None, f"{type(exc).__name__}: {exc}"
    if ordinal not in _cuda["backends"] and ordinal not in _cuda["reasons"]:
        with _cuda["making"]:   # (four threads' first calls at once made four devices: modules, pools, streams)
            if ordinal not in _cuda["backends"] and ordinal not in _cuda["reasons"]:
                try:
                    from .cuda_backend import CudaBackend
                    from .pycuda_device import PycudaDevice
                    _cuda["backends"][ordinal] = CudaBackend(PycudaDevice(ordinal))
                except Exception as exc:   # ImportError, no device, no nvcc, driver errors: "not usable here"
                    _cuda["reasons"][ordinal] = f"{type(exc).__name__}: {exc}"
    return _cuda["backends"].get(ordinal), _cuda["reasons"].get(ordinal)


def forget_cuda():
    """Drop every CUDA backend and every reason CUDA was not usable: the next use looks again.
    (For tests that change what CUDA can do: a driver stand-in loaded, nvcc removed.)"""
    _cuda["backends"].clear()
    _cuda["reasons"].clear()
    _cuda["pid"] = os.getpid()
    _cuda["no_driver"] = None
    _cuda["making"] = threading.Lock()


def cuda_usable():
    choice = requested()
    if choice == "cpu":
        return False
    if _substitutes:
        return True
    backend, reason = _cuda_backend()
    if backend is None and choice == "cuda":
        raise CostError(f"the CUDA backend is not usable here ({reason})")
    return backend is not None


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
    reason = " ".join(_cuda_backend()[1].split())   # (one line: nvcc's errors come in many)
    return f"cpu (NumPy; CUDA not usable: {reason[:400] + ' ...' if len(reason) > 400 else reason})"


def for_arrays(pred, target):
    """(backend, pred_info, target_info) for a call, or CostError."""
    backend, (pred_info, target_info) = for_inputs({"pred": pred, "target": target})
    return backend, pred_info, target_info


def for_inputs(arrays):
    """(backend, [ArrayInfo per array]) for a call on the named arrays {name: array}: all on the
    host, or all CUDA arrays on one GPU, else CostError."""
    infos = {name: describe(array, name) for name, array in arrays.items()}
    places = {info.where for info in infos.values()}
    if len(places) > 1:
        raise CostError("the inputs must all be host arrays or all be CUDA arrays, got "
                        + ", ".join(f"{name} on {info.where} ({info.kind})" for name, info in infos.items()))
    choice = requested()
    if places == {"host"}:
        if choice == "cuda":
            raise CostError(f"{ENV_VAR}=cuda but the inputs are host (numpy) arrays; "
                            f"move them with gpuarray.to_gpu()")
        check_cpu_kernels_setting()
        return _numpy_backend, list(infos.values())
    if choice == "cpu":
        kinds = ", ".join(sorted({info.kind for info in infos.values()}))
        raise CostError(f"{ENV_VAR}=cpu but the inputs are CUDA arrays ({kinds}); "
                        f"the CPU backend takes numpy arrays (use .get() or unset {ENV_VAR})")
    for name, info in infos.items():
        if not info.contiguous:   # the kernels index rows as pred + row * C
            raise CostError(f"{name}: the CUDA backend expects a C-contiguous array, got a strided "
                            f"{info.kind} view of shape {info.shape}; pass a contiguous copy")
    backend = _cuda_backend_for(infos)
    backend.check_streams(list(infos.values()))
    return backend, list(infos.values())


def _cuda_backend_for(infos):
    """The CUDA backend of the GPU holding the arrays {name: ArrayInfo}; CostError if they are on
    two GPUs."""
    if _substitutes:
        return _substitutes[-1]
    if not _cuda["backends"] or _cuda["pid"] != os.getpid():
        get_cuda_backend()   # CUDA usable at all? (else the reason, before any driver call)
    from .cuda_driver import DriverError, current_context, memory_context, pointer_device, reachable_here
    from .pycuda_device import our_pools_device
    devices, found = {}, []   # found: the arrays whose device (and context) the driver is asked
    for name, info in infos.items():
        pool_device = our_pools_device(info.array) if info.kind == "pycuda" else None
        if info.device is not None:   # (PyTorch's and CuPy's arrays: the primary context's)
            devices[name] = info.device
        elif pool_device is not None:   # (the library's own memory: its primary context's, nothing to ask)
            devices[name] = pool_device
        elif info.pointer and info.size:   # (an empty array has no device: none is asked)
            found.append(name)
            try:
                devices[name] = pointer_device(info.pointer)
            except DriverError as exc:
                raise CostError(f"{name}: its data at {info.pointer:#x} is not CUDA device memory ({exc})") from None
    if len(set(devices.values())) > 1:
        raise CostError("the inputs must be on the same GPU, got "
                        + ", ".join(f"{name} on device {device}" for name, device in devices.items()))
    backend = get_cuda_backend(next(iter(devices.values()), None))
    if found:   # (asked in the context the kernels run in: the device's primary one; 5-7 us a call)
        # Another context's memory is refused even where the kernels could reach it (an H200's
        # driver said they could): the work, on a stream of the primary context, is not ordered
        # with that context's streams, so a copy still landing there, or the user's next read of
        # the grad there, would race it.  Memory of no context (0) goes by reachability alone.
        def refused(pointer):
            context = memory_context(pointer)
            return context != primary if context else not reachable_here(pointer)
        with backend.device.active():
            primary = current_context()
            foreign = [name for name in found if refused(infos[name].pointer)]
        if foreign:
            raise CostError(f"{foreign[0]}: its memory belongs to a CUDA context of its own (pycuda.autoinit "
                            f"and Context.make_context() make one), not device {devices[foreign[0]]}'s primary "
                            f"context, in which the kernels run (as PyTorch's and CuPy's), unordered with its "
                            f"streams; use pycuda.autoprimaryctx instead of pycuda.autoinit, or "
                            f"puzzlelib_cost.gpuarray.to_gpu")
    return backend


@contextlib.contextmanager
def substituted_cuda(backend):
    """Run CUDA arrays on `backend` instead of pycuda (the tests' CPU emulation of the kernels)."""
    _substitutes.append(backend)
    try:
        yield backend
    finally:
        _substitutes.remove(backend)
