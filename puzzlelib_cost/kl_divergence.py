"""KLDivergence: KL(target || softmax(pred)) per sample, averaged over the batch.

Semantics (PuzzleLib's, with a temperature T and ignored rows for distillation):
  q = softmax(pred / T) over all non-batch dimensions of each sample,
  p = target, a distribution per sample (softmax(target / T) when normTarget=True,
      one-hot when target holds integer class labels),
  error = mean over the counted rows of  sum_i p_i (log p_i - log q_i),   0 log 0 = 0,
  grad  = (p - s q) / (T * N_counted), s = sum_i p_i (1 for a distribution: PuzzleLib's p - q)
          (exactly -d error / d pred: the 1/T included, no T^2).
divergence="reverse" takes E_row = sum_i q_i (log q_i - log p_i) instead (a target distribution
only: against a one-hot p it is infinite), divergence="jsd" the Jensen-Shannon divergence
E_row = beta KL(p || m) + (1 - beta) KL(q || m), m = beta p + (1 - beta) q, 0 < beta < 1
(beta weighs the target); grad is their exact -dE/dpred (row_softmax.py has the formulas).
Rows whose integer label is `ignoreLabel` count nowhere: no error, a zero grad, and they are
left out of N_counted, of `batchsize` and of `numOfSamples`.  The defaults (T = 1, forward,
no ignoreLabel) are PuzzleLib's KLDivergence exactly.

grad is the NEGATIVE gradient of the error with respect to pred: PuzzleLib's
optimizers do `w += lr * grad`.  It has pred's shape, dtype and array kind.
"""
import math

import numpy as np

from . import backends, label_checks, row_softmax, sparse_teacher
from .arrays import FLOAT_DTYPES, INTEGER_DTYPES, shape_of
from .cost import Cost, accumulateError, checked_maxlabels
from .errors import CostError


def _described(value):
    """A number as given, and its type where that is not a number's (a 0-d tensor printed as tensor(2.)
    read as a contradiction of 'expected a finite number')."""
    if isinstance(value, (bool, int, float, np.number)):
        return repr(value)
    module = type(value).__module__.split(".")[0]
    return f"a {'' if module == 'builtins' else module + '.'}{type(value).__name__} {value!r}"


class KLDivergence(Cost):
    """KL(target || softmax(pred / T)) per sample, averaged over the batch (PuzzleLib's KLDivergence,
    with distillation's options): `error, grad = cost(pred, target)`, grad = -d error / d pred.

    maxlabels: None, or the number of classes pred.shape[1] must have.  normTarget: the target
    holds logits (p = softmax(target / T)), not a distribution.  temperature: T > 0.
    divergence: "forward" (KL(p || q)), "reverse" (KL(q || p)) or "jsd" (beta weighs the target).
    ignoreLabel: integer labels equal to it count nowhere.  sparseTail: "drop" or "bucket", for a
    sparse teacher target [indices, values].  The module's docstring has the formulas.
    """
    _ARGUMENTS = ("maxlabels", "normTarget", "temperature", "divergence", "beta", "ignoreLabel", "sparseTail")

    def __init__(self, maxlabels=None, normTarget=False, temperature=1.0, divergence="forward", beta=0.5,
                 ignoreLabel=None, sparseTail="drop"):
        super().__init__()
        self.maxlabels = checked_maxlabels(maxlabels)
        if not isinstance(normTarget, (bool, np.bool_)):   # (bool("False") would be True)
            raise CostError(f"normTarget: expected True or False, got {normTarget!r}")
        self.normTarget = bool(normTarget)
        if (isinstance(temperature, (bool, np.bool_)) or not isinstance(temperature, (int, float, np.integer, np.floating))
                or not math.isfinite(temperature) or temperature <= 0):
            raise CostError(f"temperature: expected a finite number > 0 (a Python or NumPy number), got "
                            f"{_described(temperature)}")
        # pred / T is pred * (1 / T) in the inputs' precision (float32 for 16- and 32-bit inputs):
        # 1 / T must be finite (T > 2.9e-39) and not 0 (T < 1.4e45) in float32, or every result of
        # those inputs would be NaN (logits times an infinite 1 / T, or a zero one times the
        # kernels' -inf padding), whatever the logits.  The same range for float64 inputs.
        with np.errstate(over="ignore"):
            inverse = np.float32(1.0 / temperature) if math.isfinite(1.0 / temperature) else np.float32(np.inf)
        if not np.isfinite(inverse) or inverse == 0:
            raise CostError(f"temperature: expected T with 1 / T finite and not 0 in float32 "
                            f"(about 2.9e-39 < T < 1.4e45), got {temperature!r}")
        self.temperature = float(temperature)
        if not isinstance(divergence, str) or divergence not in row_softmax.DIVERGENCES:
            raise CostError(f"divergence: expected one of {', '.join(map(repr, row_softmax.DIVERGENCES))}, "
                            f"got {divergence!r}")
        self.divergence = divergence
        if (isinstance(beta, (bool, np.bool_)) or not isinstance(beta, (int, float, np.integer, np.floating))
                or not 0 < beta < 1):
            raise CostError(f"beta: expected a number strictly between 0 and 1 (JSD's weight of the target), "
                            f"got {_described(beta)}")
        if divergence != "jsd" and beta != 0.5:
            raise CostError(f"beta={beta!r}: it weighs the target in divergence='jsd', not in {divergence!r}")
        self.beta = float(beta)
        if ignoreLabel is not None and (isinstance(ignoreLabel, (bool, np.bool_))
                                        or not isinstance(ignoreLabel, (int, np.integer))):
            raise CostError(f"ignoreLabel: expected None or an integer label, got {ignoreLabel!r}")
        self.ignoreLabel = None if ignoreLabel is None else int(ignoreLabel)
        if self.ignoreLabel is not None and divergence == "reverse":
            raise CostError(f"ignoreLabel={self.ignoreLabel}: it applies to integer labels, against which "
                            f"divergence='reverse' is infinite")
        if self.ignoreLabel is not None and self.normTarget:
            raise CostError(f"ignoreLabel={self.ignoreLabel}: it applies to integer labels, which normTarget=True "
                            f"does not take")
        if not isinstance(sparseTail, str) or sparseTail not in ("drop", "bucket"):
            raise CostError(f"sparseTail: expected 'drop' or 'bucket', got {sparseTail!r}")
        if sparseTail == "bucket" and divergence != "forward":
            raise CostError(f"sparseTail='bucket': sparse teachers take divergence='forward', got {divergence!r}")
        self.sparseTail = sparseTail
        self._counted = 0    # rows of the last batch that count (not ignored; None: on the device alone yet)
        self._batch = None   # the checked inputs of the call in progress

    def checkDataShape(self, pred, target):
        if isinstance(target, (list, tuple)):
            return self._checkSparse(pred, target)
        backend, pred_info, target_info = backends.for_arrays(pred, target)
        labels = None
        if self._checkShapes(pred_info, target_info) == "labels":
            # Labels are range-checked here (on the GPU by a kernel, which leaves them as the row
            # kernels' int64) so that a bad label raises before any kernel or accumulator has run
            # (a training call's on the GPU: at the cost's next call, label_checks).  ignoreLabel's
            # labels are not checked, but marked as label -1 (a row of weight 0) and counted: the
            # rows left are the grad's N (on the GPU, in a training call, counted on the device:
            # the host's counters learn them at the next call, Cost._answer_label_checks).
            limit = label_checks.class_limit(pred_info.shape[1], self.maxlabels)
            labels = backend.checked_labels(target_info, 0, limit, f"class labels in [0, {limit})", None, np.int64,
                                            ignore=self.ignoreLabel)
        elif self.ignoreLabel is not None:
            raise CostError(f"target: ignoreLabel={self.ignoreLabel} needs integer class labels, got a "
                            f"{target_info.dtype} distribution of shape {target_info.shape}")
        self._batch = _Batch(backend, pred_info, target_info, labels)
        return backend

    def getBatchsize(self, pred):
        """pred's rows, as in PuzzleLib; with ignoreLabel, the rows the last call counted (the
        labels, not pred, say which: getBatchsize(pred) only knows pred).  A GPU training call's
        count is on the device: pred's rows until the cost reads its answer (at its next call or
        read of its error), which takes the ignored rows out of batchsize and numOfSamples."""
        return shape_of(pred)[0] if self.ignoreLabel is None or self._counted is None else self._counted

    def getError(self):
        self._answer_label_checks(wait=True)   # (first: a training call's ignored rows are counted there)
        if self.dirty and self._errorSamples == 0:   # the last batch had no row to count: its error is 0
            self.dirty, self.error = False, 0.0
            return 0.0
        return super().getError()

    def _checkSparse(self, pred, target):
        """checkDataShape for a sparse teacher, target = [indices (N, K), values (N, K)]."""
        if len(target) != 2 or not all(hasattr(part, "shape") and hasattr(part, "dtype") for part in target):
            # (labels or a distribution as a Python list were read as a sparse teacher, and the
            # message spoke of indices the user never meant to pass)
            kinds = ", ".join(sorted({type(part).__name__ for part in target})) or "nothing"
            raise CostError(f"target: expected a numpy array or a CUDA array, or a sparse teacher [indices, values] "
                            f"of two arrays; got a {type(target).__name__} of {len(target)} ({kinds})")
        backend, (pred_info, index_info, value_info) = backends.for_inputs(
            {"pred": pred, "target[0] (indices)": target[0], "target[1] (values)": target[1]})
        if self.divergence != "forward":
            raise CostError(f"target: sparse teachers take divergence='forward', not {self.divergence!r}")
        if self.ignoreLabel is not None:
            raise CostError(f"target: ignoreLabel={self.ignoreLabel} needs integer class labels, got a sparse teacher")
        if len(pred_info.shape) != 2:
            raise CostError(f"pred: a sparse teacher needs a 2-D pred (N, C), got shape {pred_info.shape}")
        self._checkShapes(pred_info, pred_info)   # pred on its own: dtype, sizes, maxlabels
        n, c = pred_info.shape
        if index_info.dtype not in INTEGER_DTYPES:
            raise CostError(f"target[0]: expected integer column indices (a list target is a sparse teacher "
                            f"[indices, values]), got {index_info.dtype}")
        if len(index_info.shape) != 2 or index_info.shape[0] != n or not 1 <= index_info.shape[1] <= c:
            raise CostError(f"target[0]: expected indices of shape ({n}, K) with 1 <= K <= {c} (pred has shape "
                            f"{pred_info.shape}), got shape {index_info.shape}")
        if value_info.dtype != pred_info.dtype or value_info.shape != index_info.shape:
            raise CostError(f"target[1]: expected values of dtype {pred_info.dtype} and shape {index_info.shape} "
                            f"(the indices'), got {value_info.dtype} of shape {value_info.shape}")
        if (sparse_teacher.uses_bucket(self.sparseTail, self.normTarget, index_info.shape[1], c)
                and backend.name != "cpu" and c > sparse_teacher.BUCKET_MAX_COLUMNS):
            raise CostError(f"pred: sparseTail='bucket' on the GPU takes rows of up to "
                            f"{sparse_teacher.BUCKET_MAX_COLUMNS} classes, got shape {pred_info.shape}")
        # In range and distinct in each row, checked in their own dtype (a uint64 index >= 2**63 made
        # int64 first would wrap to a negative one, and the message would name that instead), on the
        # GPU by kernels: the indices never come to the host (as the labels of the other costs).
        indices = backend.checked_labels(index_info, 0, c, f"column indices in [0, {c})", tuple(index_info.shape),
                                         np.int64, name="target indices", distinct_rows=True)
        if backend.name == "cpu":
            indices = indices.reshape(index_info.shape).astype(np.int64)
        self._batch = _Batch(backend, pred_info, value_info, None, indices)
        return backend

    def calcGrad(self, pred, target):
        batch = self._takeBatch(KLDivergence.checkDataShape, pred, target)   # (taken: no reference kept past the call)
        self._counted = batch.counted()
        return self._run(batch, self.devErr, self._takeFusedAccumulator(), want_grad=True)

    calcError = accumulateError   # (the fused pass in calcGrad adds devErr to accumErr: see there)

    def calcVal(self, pred, target):
        batch = self._takeBatch(KLDivergence.checkDataShape, pred, target)
        self._run(batch, self.valDevErr, None, want_grad=False)
        error = batch.backend.read_scalar(self.valDevErr)
        counted = batch.counted(wait=True)   # (after the read: a count on the device has landed with it)
        return error / counted if counted else 0.0

    def _run(self, batch, batch_error, accumulator, want_grad):
        """grad (or None) of a checked batch; batch_error = its summed row errors (accumulator += it
        when given).  A sparse teacher's family, else the row softmax's."""
        if batch.indices is not None:
            return sparse_teacher.run(batch.backend, batch.pred, batch.indices, batch.target, self.normTarget,
                                      self.sparseTail, batch_error, accumulator, want_grad, self.temperature)
        return row_softmax.run(batch.backend, batch.pred, batch.target, batch.labels, self.normTarget, weights=None,
                               batch_error=batch_error, accumulator=accumulator, want_grad=want_grad, **self._mode())

    def _mode(self):
        return dict(temperature=self.temperature, divergence=row_softmax.DIVERGENCES[self.divergence], beta=self.beta)

    def _checkShapes(self, pred, target):
        """Raise CostError unless pred/target are a valid pair; return 'labels' for label targets."""
        if len(pred.shape) < 2:
            raise CostError(f"pred: expected shape (N, C, ...) with at least 2 dimensions, got shape {pred.shape}")
        if pred.dtype not in FLOAT_DTYPES:
            raise CostError(f"pred: expected a floating-point dtype ({', '.join(FLOAT_DTYPES)}), got {pred.dtype}")
        if pred.shape[0] == 0:
            raise CostError(f"pred: expected a batch of at least one sample, got shape {pred.shape}")
        if pred.size == 0:
            raise CostError(f"pred: expected at least one class per sample, got shape {pred.shape}")
        if self.maxlabels is not None and pred.shape[1] != self.maxlabels:
            raise CostError(f"pred: expected shape[1] == maxlabels == {self.maxlabels}, got shape {pred.shape}")
        if target.shape[:1] != pred.shape[:1]:
            raise CostError(f"target: expected batch size {pred.shape[0]} (pred has shape {pred.shape}), "
                            f"got shape {target.shape}")
        if target.dtype in INTEGER_DTYPES:
            if len(pred.shape) != 2:
                raise CostError(f"target: integer class labels need a 2-D pred (N, C), got pred of shape {pred.shape}")
            if self.normTarget:
                raise CostError(f"target: integer class labels cannot be used with normTarget=True "
                                f"(got {target.dtype} labels)")
            if self.divergence == "reverse":
                raise CostError(f"target: divergence='reverse' needs a target distribution: against integer "
                                f"class labels (a one-hot p) it is infinite (got {target.dtype} labels)")
            if target.shape != pred.shape[:1]:
                raise CostError(f"target: expected labels of shape ({pred.shape[0]},) or probabilities of shape "
                                f"{pred.shape}, got shape {target.shape}")
            return "labels"
        if target.dtype != pred.dtype:
            raise CostError(f"target: expected dtype {pred.dtype} (pred's) or integer labels, got {target.dtype}")
        if target.shape != pred.shape:
            labels = len(pred.shape) == 2 and tuple(target.shape) == tuple(pred.shape[:1])
            raise CostError(f"target: expected shape {pred.shape} (pred's), got {target.shape}"
                            + (f" (class labels of shape ({pred.shape[0]},) must be integers, not {target.dtype})"
                               if labels else ""))
        return None


class _Batch:
    """The checked inputs of one call: its backend, pred and target (a sparse teacher's values),
    and the checked labels (backend.checked_labels') or a sparse
    teacher's checked indices (backend.checked_labels': int64 (N, K) on the host, a CheckedLabels on
    the GPU; or None)."""
    __slots__ = ("backend", "pred", "target", "labels", "indices")

    def __init__(self, backend, pred, target, labels, indices=None):
        self.backend, self.pred, self.target, self.labels, self.indices = backend, pred, target, labels, indices

    def counted(self, wait=False):
        return row_softmax.counted_rows(self.pred.shape[0], self.labels, wait)
