"""What an input array is, whichever library made it, without importing that library.

`describe()` turns pred or target into an `ArrayInfo`: where the data lives
("host" or "cuda"), its shape, its dtype as a NumPy-style name ("bfloat16" too),
whether it is C-contiguous, and for CUDA arrays the address of its data, its
device when the array says (PyTorch, CuPy) and the stream its producer works on.
Backends decide from that where to run.

Streams follow the CUDA array interface v3: None means the legacy default
stream (or "nothing to wait for"), 2 the per-thread default stream, any other
number a stream handle.
"""
import math
from dataclasses import dataclass

import numpy as np

from .errors import CostError

FLOAT_DTYPES = ("float16", "bfloat16", "float32", "float64")
INTEGER_DTYPES = ("int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64")


@dataclass(frozen=True)
class ArrayInfo:
    array: object
    where: str          # "host" or "cuda"
    kind: str           # "numpy", "pycuda", "torch", "cupy", "cuda_array_interface", or a test device's name
    shape: tuple
    dtype: str
    contiguous: bool
    pointer: int = 0          # address of the data (CUDA arrays)
    device: object = None     # device ordinal where the array names it (torch, CuPy), else None: the backend asks the driver
    stream: object = None     # the producer's stream handle; None: the legacy default stream

    @property
    def size(self):
        return math.prod(self.shape)


_dtype_names = {}


def dtype_name(dtype):
    """dtype.name, remembered: NumPy builds it in Python (about 5 us, a tenth of a small call)."""
    name = _dtype_names.get(dtype)
    if name is None:
        name = _dtype_names[dtype] = dtype.name
    return name


def describe(array, name):
    """ArrayInfo for a numpy array or a CUDA array; CostError for anything else.  A host array in
    non-native byte order ('>f4', '>i8' on x86) is described as a native copy of itself."""
    if isinstance(array, np.ndarray):
        if isinstance(array, np.ma.MaskedArray):   # (its masked values would count as any other)
            raise CostError(f"{name}: expected a numpy array, got a masked array, whose mask the cost would "
                            "ignore; pass array.filled(value) or array.data")
        if not array.dtype.isnative:
            # The compiled CPU blocks (numba) cannot type a non-native array (they raised numba's
            # TypingError), and dtype == np.float32 is false for '>f4', which sent such input down
            # other code paths than its native twin.  Converted once here, where every input of a
            # call is described, every path and backend sees the same native values.
            array = native_byte_order(array)
        return ArrayInfo(array, "host", "numpy", tuple(array.shape), dtype_name(array.dtype),
                         bool(array.flags.c_contiguous))
    module = type(array).__module__.split(".")[0]
    if module == "torch" and hasattr(array, "is_cuda"):
        if not array.is_cuda:
            raise CostError(f"{name}: expected a numpy array or a CUDA tensor, got a torch tensor on "
                            f"{array.device}; pass tensor.numpy() or move it with .cuda()")
        import torch
        stream = torch.cuda.current_stream(array.device).cuda_stream   # 0: the legacy default stream
        return ArrayInfo(array, "cuda", "torch", tuple(array.shape), str(array.dtype).replace("torch.", ""),
                         bool(array.is_contiguous()), array.data_ptr(), array.device.index, stream or None)
    if module == "pycuda" and hasattr(array, "gpudata"):
        return _aligned(ArrayInfo(array, "cuda", "pycuda", tuple(array.shape), _device_dtype_name(array.dtype, name),
                                  bool(array.flags.c_contiguous), int(array.gpudata) if array.size else 0),
                        array.dtype.itemsize, name)
    interface = getattr(array, "__cuda_array_interface__", None)
    if interface is not None:
        shape, dtype, pointer, strides = _interface_layout(interface, getattr(array, "dtype", None), name)
        contiguous = strides is None or _c_contiguous(shape, strides, dtype.itemsize)
        kind = "cupy" if module == "cupy" else "cuda_array_interface"
        device = array.device.id if kind == "cupy" else None
        return _aligned(ArrayInfo(array, "cuda", kind, shape, _device_dtype_name(dtype, name), contiguous,
                                  pointer, device, _interface_stream(interface, name)), dtype.itemsize, name)
    raise CostError(f"{name}: expected a numpy array or a CUDA array (pycuda GPUArray, CUDA torch tensor, "
                    f"CuPy array), got {type(array).__name__}")


def shape_of(array):
    """An input's shape: its .shape, or, for an object with __cuda_array_interface__ alone (all
    the interface asks of it), the interface's."""
    shape = getattr(array, "shape", None)
    return tuple(shape) if shape is not None else tuple(array.__cuda_array_interface__["shape"])


def native_byte_order(array):
    """A host array's values in the machine's byte order (the array itself when they are)."""
    return array if array.dtype.isnative else array.astype(array.dtype.newbyteorder("="))


def _device_dtype_name(dtype, name):
    """The dtype name of a CUDA array; CostError for a non-native byte order, which the kernels
    would read as native (and the host copies of labels too: dtype_name drops the byte order)."""
    dtype = np.dtype(dtype)
    if not dtype.isnative:
        raise CostError(f"{name}: expected a CUDA array in native byte order, got dtype {dtype.str!r} "
                        f"({dtype_name(dtype)} in the other byte order); convert it on the host first")
    return dtype_name(dtype)


def _interface_layout(interface, own_dtype, name):
    """(shape, dtype, data pointer, strides or None) of a __cuda_array_interface__, each checked:
    the kernels take them as they are (a shape of floats failed inside pycuda after the call had
    begun; a negative one counted negative samples; no typestr read float32 memory as float64; a
    pointer of 0 faulted in a kernel).  The array's own dtype, where it has one, is its dtype:
    the interface's typestr cannot name bfloat16."""
    def refuse(what, value):
        raise CostError(f"{name}: __cuda_array_interface__ {what}, got {value!r}")
    if not isinstance(interface, dict):
        refuse("must be a dict", type(interface).__name__)
    shape = interface.get("shape")
    if not isinstance(shape, (tuple, list)) or not all(_is_int(extent) and extent >= 0 for extent in shape):
        refuse("'shape' must be a tuple of non-negative integers", shape)
    shape = tuple(int(extent) for extent in shape)
    try:   # (an own dtype NumPy does not know, a torch subclass's say: the typestr says it)
        dtype = np.dtype(own_dtype) if own_dtype is not None else None
    except TypeError:
        dtype = None
    if dtype is None:
        typestr = interface.get("typestr")
        try:
            if not isinstance(typestr, str):
                raise TypeError
            dtype = np.dtype(typestr)
        except TypeError:
            refuse("'typestr' must be a type string such as '<f4'", typestr)
    data = interface.get("data")
    well_formed = isinstance(data, (tuple, list)) and len(data) == 2
    pointer = (data[0] or 0) if well_formed else None   # (a null pointer may be given as None)
    if not _is_int(pointer) or not 0 <= pointer < 2 ** 64:
        refuse("'data' must be (pointer, read_only)", data)
    pointer = int(pointer)
    if pointer == 0 and math.prod(shape):
        refuse(f"'data' points nowhere (0) for {math.prod(shape)} elements", data)
    strides = interface.get("strides")
    if strides is not None and (not isinstance(strides, (tuple, list)) or len(strides) != len(shape)
                                or not all(_is_int(stride) for stride in strides)):
        refuse(f"'strides' must be None or {len(shape)} integers (one per dimension of 'shape')", strides)
    if interface.get("mask") is not None:   # (as a masked numpy array is refused: its masked values would count)
        refuse("'mask' must be None (the cost would count the masked values)", interface["mask"])
    if not _is_int(interface.get("version", 0)):
        refuse("'version' must be an integer", interface.get("version"))
    return shape, dtype, pointer, strides


def _is_int(value):
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _aligned(info, itemsize, name):
    """info, where its data starts on a multiple of its itemsize; else CostError: the kernels load
    whole elements (and 16-byte vectors from the first aligned one), and a misaligned load is a
    fault that leaves the device's context unusable for the rest of the process."""
    if info.pointer % itemsize:
        raise CostError(f"{name}: expected data aligned to its "
                        f"{itemsize}-byte {info.dtype} elements, got address {info.pointer:#x}")
    return info


def _interface_stream(interface, name):
    """The stream of a __cuda_array_interface__ (v3): None for the legacy default stream or none given."""
    stream = interface.get("stream") if interface.get("version", 0) >= 3 else None
    if stream is None:
        return None
    # (bool before == 1: True == 1; a handle is a pointer, below 2^64)
    if isinstance(stream, bool) or not isinstance(stream, int) or not 0 < stream < 2 ** 64:
        raise CostError(f"{name}: __cuda_array_interface__ 'stream' must be None, 1 (legacy default stream), "
                        f"2 (per-thread default stream) or a stream handle, got {stream!r}")
    return None if stream == 1 else stream


def _c_contiguous(shape, strides, itemsize):
    """Whether an array of `shape` with these byte strides is C-contiguous, as NumPy, CuPy and
    torch decide it: the stride of a dimension of extent 1 (never stepped) and any stride of an
    empty array do not count."""
    if 0 in shape:
        return True
    return all(extent == 1 or stride == expected
               for extent, stride, expected in zip(shape, strides, _c_strides(shape, itemsize)))


def _c_strides(shape, itemsize):
    strides, step = [], itemsize
    for extent in reversed(shape):
        strides.append(step)
        step *= extent
    return tuple(reversed(strides))
