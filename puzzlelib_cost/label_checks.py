"""The label checks the costs share: each names the first bad label and where it is, before any
work starts (labels are always checked, on every backend: README, Errors)."""
import numpy as np

from .errors import CostError

# The most classes (CrossEntropy, SVM) or vocabulary entries (CTC), and CTC labels in a batch:
# the GPU kernels take labels, their positions and mostProb as int32.
INT32_LIMIT = 2 ** 31 - 1


def check_int32_count(count, name, shape, what="classes", why="the GPU kernels take labels as int32"):
    """CostError for more `what` than int32 holds: the GPU kernels take labels, their positions
    and mostProb as int32 (a label of 2^31 wrapped to -2^31), and CUDA's grid as many blocks."""
    if count > INT32_LIMIT:
        raise CostError(f"{name}: expected at most {INT32_LIMIT} {what} ({why}), got shape {shape}")


def class_limit(num_classes, maxlabels):
    """The end of the class labels' range [0, limit): num_classes, and < maxlabels when set."""
    return num_classes if maxlabels is None else min(num_classes, maxlabels)


def check_labels(labels, num_classes, maxlabels, shape=None):
    """CostError naming the first label outside [0, num_classes) (and < maxlabels when set)."""
    limit = class_limit(num_classes, maxlabels)
    check_label_values(labels, (labels < 0) | (labels >= limit), f"class labels in [0, {limit})", shape)


def check_label_values(labels, bad, expected, shape=None, name="target"):
    """CostError naming the first of the flat host labels where the mask `bad` is set, its index
    (in the user's labels of `shape`, when they have more than one dimension: (n, h, w), not a
    flat position to work out) and how many are bad; `expected` says what labels may be, `name`
    which input they are."""
    bad = np.flatnonzero(bad)
    if bad.size:
        raise_bad_label(labels.flat[int(bad[0])], int(bad[0]), bad.size, expected, shape, name)


def raise_bad_label(value, where, count, expected, shape=None, name="target"):
    """The CostError of check_label_values for `count` bad labels, the first `value` at flat index
    `where` (the CUDA backend's check on the device finds these without the labels on the host)."""
    index = where if shape is None or len(shape) < 2 else tuple(int(i) for i in np.unravel_index(where, shape))
    raise CostError(f"{name}: expected {expected}, got {value} at index {index}"
                    + (f" ({count} labels out of range)" if count > 1 else ""))
