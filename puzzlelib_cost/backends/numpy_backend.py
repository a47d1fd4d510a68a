"""The NumPy backend: host arrays and float64 scalars.

It knows no cost: each cost family holds its own NumPy math (computing as its kernels do:
float32 arithmetic with float64 sums for 16- and 32-bit inputs, numpy_blocks.compute_dtype)
and uses this backend for its scalars and for returning outputs of the caller's array kind.  The tests check every backend
against their own float64 references, never against this one.
"""
import numpy as np

from .. import label_checks
from . import numpy_blocks


def _the_cpu_backend():
    from . import cpu_backend
    return cpu_backend()


class NumpyBackend:
    name = "cpu"

    def __reduce__(self):   # (copies and pickles of a cost keep the one CPU backend)
        return _the_cpu_backend, ()

    def new_scalar(self, value=0.0):
        return np.array(value, dtype=np.float64)

    def read_scalar(self, scalar):
        return float(scalar)

    def write_scalar(self, scalar, value):
        scalar[...] = value

    def labels_to_host(self, info):
        return np.asarray(info.array)

    def checked_labels(self, info, low, high, expected, shape, dtype, name="target", distinct_rows=False,
                       ignore=None):
        """The host labels `info`, flat, in their own dtype (a bool mask as uint8: a cast, not a view,
        so that bytes other than 0 and 1 read as 1), all in [low, high); else a CostError naming the
        first bad value and its index (in `shape`; `name` the input they are).  distinct_rows: `info`
        is (N, K) column indices, each row's distinct too.  ignore: a label value that is not
        checked; the labels come back as int64 with -1 for it (a row to ignore).  `dtype`, the CUDA
        kernels', is not needed here: the NumPy blocks convert the labels a block at a time."""
        labels = np.asarray(info.array).reshape(-1)
        if labels.dtype == bool:
            labels = labels.astype(np.uint8)
        if ignore is not None:
            ignored = labels == ignore
            kept = np.where(ignored, low, labels)
            label_checks.check_label_values(labels, (kept < low) | (kept >= high), expected, shape, name)
            # (int64 first: in an unsigned dtype the -1 became 255, 65535, ... and the row counted)
            return np.where(ignored, -1, labels.astype(np.int64))
        label_checks.check_label_values(labels, (labels < low) | (labels >= high), expected, shape, name)
        if distinct_rows:
            label_checks.check_distinct_rows(labels.reshape(info.shape), name)
        return labels

    @staticmethod
    def output(values, like):
        """`values` in the dtype, shape and array type of the input `like` (an ArrayInfo):
        a HostArray in gives a HostArray (with .get()) out; rounded by numpy_blocks.store (float16's
        subnormals without the CPU's slow conversion of them)."""
        values = np.asarray(values)
        if values.dtype != like.array.dtype:
            out = np.empty(values.shape, like.array.dtype)
            numpy_blocks.store(out, values)
            values = out
        return values.reshape(like.shape).view(type(like.array))

    @staticmethod
    def store_error(total, batch_error, accumulator):
        """batch_error = total; accumulator += it when given."""
        batch_error[...] = total
        if accumulator is not None:
            accumulator += batch_error
