"""KLDivergence: KL(target || softmax(pred)) per sample, averaged over the batch.

Semantics (PuzzleLib's):
  q = softmax(pred) over all non-batch dimensions of each sample,
  p = target, a distribution per sample (softmax(target) when normTarget=True,
      one-hot when target holds integer class labels),
  error = mean over the batch of  sum_i p_i (log p_i - log q_i),   0 log 0 = 0,
  grad  = (p - q) / N.

grad is the NEGATIVE gradient of the error with respect to pred: PuzzleLib's
optimizers do `w += lr * grad`.  It has pred's shape, dtype and array kind.
"""
from . import backends, row_softmax
from .arrays import FLOAT_DTYPES, INTEGER_DTYPES
from .cost import Cost, checked_maxlabels
from .errors import CostError


class KLDivergence(Cost):
    def __init__(self, maxlabels=None, normTarget=False):
        super().__init__()
        self.maxlabels = checked_maxlabels(maxlabels)
        self.normTarget = bool(normTarget)
        self._batch = None   # the checked inputs of the call in progress

    def checkDataShape(self, pred, target):
        backend, pred_info, target_info = backends.for_arrays(pred, target)
        labels = None
        if self._checkShapes(pred_info, target_info) == "labels":
            # Labels are range-checked on the host (one small copy from the GPU) so that a bad
            # label raises here, before any kernel or accumulator has run.
            labels = backend.labels_to_host(target_info)
            backends.check_labels(labels, pred_info.shape[1], self.maxlabels)
        self._batch = _Batch(backend, pred_info, target_info, labels)
        return backend

    def calcGrad(self, pred, target):
        batch, self._batch = self._batch, None   # hold no reference to the inputs past the call
        return row_softmax.run(batch.backend, batch.pred, batch.target, batch.labels, self.normTarget, None,
                               self.devErr, self.accumErr, want_grad=True)

    def calcError(self, pred, target):
        pass   # the fused pass in calcGrad has already added devErr to accumErr

    def calcVal(self, pred, target):
        batch, self._batch = self._batch, None
        row_softmax.run(batch.backend, batch.pred, batch.target, batch.labels, self.normTarget, None,
                        self.valDevErr, None, want_grad=False)
        return batch.backend.read_scalar(self.valDevErr) / batch.pred.shape[0]

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
            if target.shape != pred.shape[:1]:
                raise CostError(f"target: expected labels of shape ({pred.shape[0]},) or probabilities of shape "
                                f"{pred.shape}, got shape {target.shape}")
            return "labels"
        if target.dtype != pred.dtype:
            raise CostError(f"target: expected dtype {pred.dtype} (pred's) or integer labels, got {target.dtype}")
        if target.shape != pred.shape:
            raise CostError(f"target: expected shape {pred.shape} (pred's), got {target.shape}")
        return None


class _Batch:
    """The checked inputs of one call: its backend, pred and target, and host labels (or None)."""
    __slots__ = ("backend", "pred", "target", "labels")

    def __init__(self, backend, pred, target, labels):
        self.backend, self.pred, self.target, self.labels = backend, pred, target, labels
