"""The label checks the costs share: each names the first bad label and where it is, before any
work starts (labels are always checked, on every backend: README, Errors).

On a GPU the check of device labels runs on the device, and its answer comes back in 48 bytes.
A library cost's call runs inside answer_later(): the answer is not waited for before the work,
whose batch error is committed on the device only where every label was good
(CudaBackend.checked_labels).  A call that reads its error (or validate's value) reads the answer
in the same wait, after its work, and raises there; a call that does not (queryError=False: a
training step, which must not wait for the GPU) leaves it for the cost's next call or read of its
error (LateAnswer, Cost._answer_label_checks), and a bad batch's work leaves a gradient of zeros
and a NaN batch error.  A call that asks for its error reads it after its work is queued where its
last grad stays in memory anyway (Cost._lastGradKeptAnyway), else before.  Elsewhere (a Multi's
children, PuzzleLib-style hooks) the answer is waited for before the work."""
import contextlib
import contextvars

import numpy as np

from .errors import CostError

# The most classes (CrossEntropy, SVM) or vocabulary entries (CTC), and CTC labels in a batch:
# the GPU kernels take labels, their positions and mostProb as int32.
INT32_LIMIT = 2 ** 31 - 1
NONE_FOUND = 2 ** 64 - 1   # the device check's "first bad index" and "first repeat" where none is (labels.cu)


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
    """Raises bad_label_error's CostError."""
    raise bad_label_error(value, where, count, expected, shape, name)


def bad_label_error(value, where, count, expected, shape=None, name="target"):
    """The CostError of check_label_values for `count` bad labels, the first `value` at flat index
    `where` (the CUDA backend's check on the device finds these without the labels on the host)."""
    index = where if shape is None or len(shape) < 2 else tuple(int(i) for i in np.unravel_index(where, shape))
    return CostError(f"{name}: expected {expected}, got {value} at index {index}"
                     + (f" ({count} labels out of range)" if count > 1 else ""))


def check_distinct_rows(columns, name="target"):
    """CostError unless each row of the (N, K) host `columns` holds K distinct values: it names the
    first row with a repeat and the smallest column repeated there."""
    ordered = np.sort(columns, axis=1)
    repeats = ordered[:, 1:] == ordered[:, :-1]
    rows = np.flatnonzero(repeats.any(axis=1))
    if rows.size:
        row = int(rows[0])
        raise repeated_column_error(row, ordered[row, 1:][repeats[row]][0], name)


def repeated_column_error(row, column, name="target"):
    """The CostError of check_distinct_rows (the CUDA backend's check on the device finds the same
    row and column: kernels/labels.cu, check_distinct_columns)."""
    return CostError(f"{name}: expected distinct columns in each row, row {row} repeats {int(column)}")


def answer_error(words, dtype, expected, shape=None, name="target", columns=None):
    """The CostError for the device check's answer `words` (kernels/labels.cu: first bad index, how
    many, the first bad label's bits, blocks done, first repeat, labels ignored), or None where every label was
    good: a label out of range first (as the host checks), then, where `columns` is given (the
    labels are (N, K) column indices whose rows must be distinct), the first repeat."""
    first, count, bits, _, repeat = (int(v) for v in words[:5])
    if count:
        return bad_label_error(label_value(bits, dtype), first, count, expected, shape, name)
    if columns is not None and repeat != NONE_FOUND:
        return repeated_column_error(repeat // columns, repeat % columns, name)
    return None


def label_value(bits, dtype):
    """A label from the check's 64 bits of it (kernels/labels.cu: a signed dtype's value
    sign-extended, an unsigned one's zero-extended), as a value of its dtype."""
    dtype = np.dtype(dtype)
    if dtype.kind == "b":
        return np.uint8(bits)   # (a bool mask's byte)
    value = int(bits) - (1 << 64) if dtype.kind == "i" and bits >= 1 << 63 else int(bits)
    return dtype.type(value)


# The answers of the checks made in the current call that does not wait for them (answer_later),
# else None.  A context variable: each thread (and asyncio task) has its own.
_LATE = contextvars.ContextVar("puzzlelib_cost_late_label_answers", default=None)


class LateAnswers(list):
    """The LateAnswers of a call's checks; nan_for_bad: whether a bad batch's error is made NaN on
    the device (a training step's, which the caller may read before the answer: nn's loss) or left
    as it was (a call that raises before it returns)."""
    def __init__(self, nan_for_bad):
        super().__init__()
        self.nan_for_bad = nan_for_bad


def late_answers():
    """The LateAnswers that collects the current call's answers, or None where checks are answered
    at once (outside answer_later())."""
    return _LATE.get()


@contextlib.contextmanager
def answer_later(nan_for_bad=True):
    """Checks of device labels made inside are not waited for; yields the LateAnswers of them."""
    answers = LateAnswers(nan_for_bad)
    token = _LATE.set(answers)
    try:
        yield answers
    finally:
        _LATE.reset(token)


class LateAnswer:
    """The answer of a label check the host reads after the call (CudaBackend.checked_labels):
    `device_answer` holds the check's words (answer_error) once its copy lands; None where no work
    took the labels (a subclass's call that checked them and launched nothing with them: nothing
    read them, nothing to answer).  The rest is answer_error's."""
    __slots__ = ("device_answer", "dtype", "expected", "shape", "name", "columns")

    def __init__(self, device_answer, dtype, expected, shape, name="target", columns=None):
        self.device_answer, self.dtype, self.expected, self.shape = device_answer, np.dtype(dtype), expected, shape
        self.name, self.columns = name, columns

    def ignored_rows(self):
        """How many labels were the one to ignore (the answer's sixth word: 0 for a check given
        none; waits for the answer where it has not landed yet)."""
        if self.device_answer is None:
            return 0
        return int(self.device_answer.values()[5])

    def ready(self):
        """Whether the answer has reached the host (no waiting)."""
        return self.device_answer is None or self.device_answer.ready()

    def bad_label_error(self):
        """The CostError for the check's first bad label, or None where every label was good (waits
        for the answer where it has not landed yet)."""
        if self.device_answer is None:
            return None
        return answer_error(self.device_answer.values(), self.dtype, self.expected, self.shape, self.name,
                            self.columns)


def first_bad_label_error(answers):
    """The CostError of the first of `answers` (LateAnswers) that found a bad label, else None
    (waits for those that have not landed)."""
    return next((error for error in (answer.bad_label_error() for answer in answers) if error is not None), None)
