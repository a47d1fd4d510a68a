"""The elementwise costs: Abs, MSE, SmoothL1, BCE, Hinge, SVM and L1Hinge.

Each is a sum of per-element terms, computed with its gradient in one pass
(kernels/elementwise.cu on the GPU; `terms` below, in float64, on the CPU):

    cost        pred        target                 error E                      grad = -dE/dpred
    Abs         (N, ...)    float, same shape      sum |d| / M                  -sign(d) / M
    MSE         (N, ...)    float, same shape      sum d^2 / 2M                 -d / M
    SmoothL1    (N, ...)    float, same shape      sum huber(d) / M             -d / M or -sign(d) / M
    BCE         (N, ...)    {0, 1}, same shape     sum softplus(y ? -s : s) / M (y - sigmoid(s)) / M
                (N, 1, ...) {0, 1}, (N, ...)
    Hinge       (N, C)      {-1, 0, 1}, same       sum max(0, 1 - s y) / M      y / M where s y < 1
    SVM         (N, C, ...) class (N, ...)         sum h (l1) or h^2 (l2) / M   -dE/ds, h = max(0, 1 - s cls)
    L1Hinge     [x1, x2]    {0, 1} per sample (N,) y ? |d| : max(0, 1 - |d|), /M  [g, -g], g = -dE/dx1

d = pred - target (x1 - x2), M = pred's size, sign(0) = 0.  Each class holds its checks, its
NumPy terms (the twin of its Op in kernels/elementwise.cu) and its kernel's name; the
ElementwiseCost scaffold holds the call and both backends' launches.
"""
import numpy as np

from . import backends, cross_entropy
from .arrays import FLOAT_DTYPES, INTEGER_DTYPES
from .backends.cuda_backend import DTYPE_SUFFIX, ERROR_OUT_SIGNATURE, vec_width
from .cost import Cost
from .errors import CostError

THREADS = 256          # ELEMENTWISE_THREADS of kernels/elementwise.cu
MAX_BLOCKS = 4096      # a fixed cap (not the device's): the block partition, and so the sum order, is the same everywhere
SIGNATURE = "PPPPP" + ERROR_OUT_SIGNATURE + "qqqqd"
RATE_SIGNATURE = "PPP" + ERROR_OUT_SIGNATURE + "qq"


class ElementwiseCost(Cost):
    """The call of every elementwise cost.  A subclass sets `kernel` and implements
    checkInputs(pred_infos, target_info) -> labels (host array) or None, and terms()."""
    kernel = None
    validate_kernel = None   # None: validate returns the error E itself
    takes_pair = False       # pred is a list [x1, x2] (L1Hinge)

    def checkDataShape(self, pred, target):
        if isinstance(pred, (list, tuple)) != self.takes_pair:
            expected = "a list of two arrays [x1, x2]" if self.takes_pair else "an array"
            raise CostError(f"pred: expected {expected}, got {type(pred).__name__}")
        preds = list(pred) if isinstance(pred, (list, tuple)) else [pred]
        names = [f"pred[{i}]" for i in range(len(preds))] if isinstance(pred, (list, tuple)) else ["pred"]
        backend, infos = backends.for_inputs({**dict(zip(names, preds)), "target": target})
        labels = self.checkInputs(infos[:-1], infos[-1], backend)
        self._batch = (backend, infos[:-1], infos[-1], labels)
        return backend

    def calcGrad(self, pred, target):
        backend, preds, target, labels = self._batch
        self._batch = None
        return self._run(backend, self.kernel, preds, target, labels, self.devErr, self.accumErr, want_grad=True)

    def calcError(self, pred, target):
        pass   # the fused pass in calcGrad has already added devErr to accumErr

    def calcVal(self, pred, target):
        backend, preds, target, labels = self._batch
        self._batch = None
        self._run(backend, self.validate_kernel or self.kernel, preds, target, labels, self.valDevErr, None,
                  want_grad=False)
        return backend.read_scalar(self.valDevErr) / preds[0].shape[0]

    def getBatchsize(self, pred):
        return (pred[0] if isinstance(pred, (list, tuple)) else pred).shape[0]

    # --- hooks ------------------------------------------------------------------------

    def checkInputs(self, preds, target, backend):
        raise NotImplementedError

    def geometry(self, pred):
        """(M, D, C, S) of pred's shape: size, per sample, shape[1], prod(shape[2:])."""
        shape = pred.shape
        size = int(np.prod(shape, dtype=np.int64))
        row = size // shape[0]
        classes = shape[1] if len(shape) > 1 else 1
        return size, row, classes, row // classes

    def scales(self, kernel, pred):
        """(grad_scale, error_scale): grad = scale * per-element -gradient; summed per-sample error =
        error_scale * (sum of terms).  Default: the mean over the M elements."""
        size, row, _, _ = self.geometry(pred)
        return 1.0 / size, 1.0 / row

    # --- both backends -----------------------------------------------------------------

    def _run(self, backend, kernel, preds, target, labels, batch_error, accumulator, want_grad):
        grad_scale, error_scale = self.scales(kernel, preds[0])
        if backend.name == "cpu":
            second = preds[1] if len(preds) > 1 else target if labels is None else None   # x2, or a float target
            a = np.asarray(preds[0].array, np.float64)
            b = None if second is None else np.asarray(second.array, np.float64)
            with np.errstate(all="ignore"):   # inf/NaN inputs give inf/NaN outputs, by design
                terms, grad = self.terms(kernel, a, b, labels)
                backend.store_error(terms.sum() * error_scale, batch_error, accumulator)
                if not want_grad:
                    return None
                grad = grad * grad_scale
            grads = [backend.output(grad, preds[0])] + [backend.output(-grad, p) for p in preds[1:]]
            return grads if len(preds) > 1 else grads[0]
        return self._cuda(backend, kernel, preds, target, labels, batch_error, accumulator, want_grad,
                          grad_scale, error_scale)

    def _cuda(self, backend, kernel, preds, target, labels, batch_error, accumulator, want_grad, grad_scale,
              error_scale):
        suffix = DTYPE_SUFFIX[preds[0].dtype]
        size, row, classes, inner = self.geometry(preds[0])
        with backend.run([*preds, target]) as work:
            grads = [work.empty_like(p) for p in preds] if want_grad else []
            label_ptr = work.upload(labels, np.int32) if labels is not None else 0
            b_ptr = preds[1].pointer if len(preds) > 1 else (target.pointer if labels is None else 0)
            vectors = -(-size // vec_width(suffix))
            blocks = min(-(-vectors // THREADS), MAX_BLOCKS)
            grad_ptrs = [ptr for _, ptr in grads] + [0] * (2 - len(grads))
            work.launch(f"elementwise_{kernel}_{suffix}", blocks, THREADS, SIGNATURE,
                        (preds[0].pointer, b_ptr, label_ptr, *grad_ptrs,
                         *work.error_out(blocks, batch_error, accumulator, error_scale),
                         size, row, classes, inner, grad_scale))
        if not want_grad:
            return None
        return [g for g, _ in grads] if len(grads) > 1 else grads[0][0]

    # --- shared checks -----------------------------------------------------------------

    @staticmethod
    def checkFloat(info, name="pred", min_dims=1):
        if len(info.shape) < min_dims:
            raise CostError(f"{name}: expected at least {min_dims} dimension(s), got shape {info.shape}")
        if info.dtype not in FLOAT_DTYPES:
            raise CostError(f"{name}: expected a floating-point dtype ({', '.join(FLOAT_DTYPES)}), got {info.dtype}")
        if info.size == 0:
            raise CostError(f"{name}: expected a non-empty array, got shape {info.shape}")

    @staticmethod
    def checkLabels(info, backend, shape, allowed, what):
        """The host copy of integer labels of `shape` whose values are all in `allowed` (a set,
        or a (low, high) half-open range); CostError naming the first bad value and its index."""
        if info.dtype not in INTEGER_DTYPES:
            raise CostError(f"target: expected integer labels ({what}), got dtype {info.dtype}")
        if tuple(info.shape) != tuple(shape):
            raise CostError(f"target: expected labels of shape {tuple(shape)}, got shape {info.shape}")
        labels = np.asarray(backend.labels_to_host(info)).reshape(-1)
        bad = ((labels < allowed[0]) | (labels >= allowed[1])) if isinstance(allowed, tuple) \
            else ~np.isin(labels, sorted(allowed))
        backends.check_label_values(labels, bad, what)
        return labels.astype(np.int64)


def _sign(d):
    return np.where(np.isnan(d), d, np.sign(d))


def _step(m, v):
    """v where m > 0, 0 where m <= 0, NaN where m is NaN."""
    return np.where(m > 0, v, np.where(np.isnan(m), m, 0.0))


class _PairCost(ElementwiseCost):
    """pred and a float target of the same shape and dtype."""

    def checkInputs(self, preds, target, backend):
        pred, = preds
        self.checkFloat(pred)
        if target.dtype != pred.dtype:
            raise CostError(f"target: expected dtype {pred.dtype} (pred's), got {target.dtype}")
        if target.shape != pred.shape:
            raise CostError(f"target: expected shape {pred.shape} (pred's), got {target.shape}")
        return None


class Abs(_PairCost):
    """E = sum |pred - target| / M; grad = -sign(pred - target) / M, with sign(0) = 0."""
    kernel = "abs"

    def terms(self, kernel, a, b, labels):
        return np.abs(a - b), -_sign(a - b)


class MSE(_PairCost):
    """E = sum (pred - target)^2 / 2M; grad = (target - pred) / M."""
    kernel = "mse"

    def terms(self, kernel, a, b, labels):
        return (a - b) ** 2, b - a

    def scales(self, kernel, pred):
        grad_scale, error_scale = super().scales(kernel, pred)
        return grad_scale, error_scale / 2


class SmoothL1(_PairCost):
    """Huber with threshold 1: d^2 / 2 where |d| < 1, else |d| - 1/2, over M; grad = -dE/dpred."""
    kernel = "smoothl1"

    def terms(self, kernel, a, b, labels):
        d = a - b
        inside = np.abs(d) < 1
        return np.where(inside, 0.5 * d * d, np.abs(d) - 0.5), np.where(inside, -d, -_sign(d))


class BCE(ElementwiseCost):
    """Binary cross-entropy on logits s with labels y in {0, 1}, stable for any s:
    E = mean over M of max(s, 0) - s y + log(1 + exp(-|s|)); grad = (y - sigmoid(s)) / M.
    validate() returns the error rate: y == 1 ? s <= 0 : s > 0, over M."""
    kernel, validate_kernel = "bce", "bce_rate"

    def checkInputs(self, preds, target, backend):
        pred, = preds
        self.checkFloat(pred)
        # PuzzleLib's shapes: labels like pred, or without pred's dim 1 when it is 1 ((N, 1) -> (N,),
        # (N, 1, H, W) -> (N, H, W)).
        squeezed = pred.shape[:1] + pred.shape[2:]
        shape = squeezed if len(pred.shape) >= 2 and pred.shape[1] == 1 and target.shape == squeezed else pred.shape
        return self.checkLabels(target, backend, shape, {0, 1}, "labels in {0, 1}")

    def terms(self, kernel, s, b, y):
        y = y.reshape(s.shape)
        if kernel == "bce_rate":
            return np.where(y == 1, s <= 0, s > 0).astype(np.float64), None
        softplus = lambda z: np.maximum(z, 0) + np.log1p(np.exp(-np.abs(z)))   # noqa: E731
        e = np.exp(-np.abs(s))
        sigmoid = np.where(s >= 0, 1 / (1 + e), e / (1 + e))
        return softplus(np.where(y == 1, -s, s)), y - sigmoid


class Hinge(ElementwiseCost):
    """pred (N, C), labels in {-1, 0, 1} of the same shape: E = sum max(0, 1 - s y) / (N C);
    grad = y / (N C) where s y < 1 (a label 0 adds 1 / C per sample and no gradient)."""
    kernel = "hinge"

    def checkInputs(self, preds, target, backend):
        pred, = preds
        self.checkFloat(pred, min_dims=2)
        if len(pred.shape) != 2:
            raise CostError(f"pred: expected a 2-D array (N, C), got shape {pred.shape}")
        return self.checkLabels(target, backend, pred.shape, {-1, 0, 1}, "labels in {-1, 0, 1}")

    def terms(self, kernel, s, b, y):
        m = 1 - s * y.reshape(s.shape)
        return np.maximum(m, 0), _step(m, y.reshape(s.shape).astype(np.float64))


class SVM(ElementwiseCost):
    """One-vs-all multiclass hinge: scores (N, C, ...), class labels (N, ...); cls = +1 at the
    label's class, -1 elsewhere, h = max(0, 1 - s cls); E = sum h (mode "l1") or h^2 ("l2")
    over N S C; grad = -dE/ds.  validate() returns the top-1 error rate over N S and leaves the
    predicted classes in mostProb."""

    def __init__(self, mode="l1"):
        super().__init__()
        if mode not in ("l1", "l2"):
            raise CostError(f"mode: expected 'l1' or 'l2', got {mode!r}")
        self.mode = mode
        self.kernel = "svm_" + mode
        self.mostProb = None   # validate(): the predicted classes

    def reset(self):
        super().reset()
        self.mostProb = None

    def checkInputs(self, preds, target, backend):
        pred, = preds
        self.checkFloat(pred, min_dims=2)
        shape = pred.shape[:1] + pred.shape[2:]
        return self.checkLabels(target, backend, shape, (0, pred.shape[1]), f"class labels in [0, {pred.shape[1]})")

    def terms(self, kernel, s, b, y):
        n, c = s.shape[:2]
        s3 = s.reshape(n, c, -1)
        cls = np.where(np.arange(c)[None, :, None] == y.reshape(n, 1, -1), 1.0, -1.0)
        m = 1 - s3 * cls
        if self.mode == "l1":
            return np.maximum(m, 0), _step(m, cls).reshape(s.shape)
        return _step(m, m * m), _step(m, 2 * m * cls).reshape(s.shape)

    def calcVal(self, pred, target):
        backend, preds, target, labels = self._batch
        self._batch = None
        error, self.mostProb = cross_entropy.top1_error_rate(backend, preds[0], target, labels, self.valDevErr)
        return error


class L1Hinge(ElementwiseCost):
    """Siamese pairs: pred = [x1, x2], each (N, D); labels (N,) in {0, 1}, 1 meaning "same".
    Per element, d = x1 - x2: y ? |d| : max(0, 1 - |d|), over N D.  grad = [g, -g] with
    g = -dE/dx1.  validate() returns the error rate over N of (mean |d| <= 1) != y."""
    kernel = "l1hinge"
    takes_pair = True

    def checkInputs(self, preds, target, backend):
        if len(preds) != 2:
            raise CostError(f"pred: expected a list of two arrays [x1, x2], got {len(preds)} array(s)")
        x1, x2 = preds
        self.checkFloat(x1, "pred[0]", min_dims=2)
        if x2.dtype != x1.dtype or x2.shape != x1.shape:
            raise CostError(f"pred[1]: expected shape {x1.shape} and dtype {x1.dtype} (pred[0]'s), "
                            f"got shape {x2.shape} and dtype {x2.dtype}")
        return self.checkLabels(target, backend, x1.shape[:1], {0, 1}, "labels in {0, 1}")

    def terms(self, kernel, a, b, y):
        d = (a - b).reshape(a.shape[0], -1)
        ad = np.abs(d)
        same = (y == 1)[:, None]
        terms = np.where(same, ad, np.maximum(1 - ad, 0))
        grad = np.where(same, -_sign(d), _step(1 - ad, _sign(d)))
        return terms, grad.reshape(a.shape)

    def calcVal(self, pred, target):
        """The error rate: a row reduction (mean |d| per sample), not an elementwise sum."""
        backend, (x1, x2), target, labels = self._batch
        self._batch = None
        n = x1.shape[0]
        if backend.name == "cpu":
            d = np.asarray(x1.array, np.float64).reshape(n, -1) - np.asarray(x2.array, np.float64).reshape(n, -1)
            backend.store_error(((np.abs(d).mean(axis=1) <= 1) != (labels == 1)).sum(), self.valDevErr, None)
        else:
            blocks = min(-(-n // THREADS), MAX_BLOCKS)
            with backend.run([x1, x2, target]) as work:
                work.launch(f"l1hinge_rate_{DTYPE_SUFFIX[x1.dtype]}", blocks, THREADS, RATE_SIGNATURE,
                            (x1.pointer, x2.pointer, work.upload(labels, np.int32),
                             *work.error_out(blocks, self.valDevErr, None), n, x1.size // n))
        return backend.read_scalar(self.valDevErr) / n


def kernel_names():
    ops = ("abs", "mse", "smoothl1", "bce", "bce_rate", "hinge", "svm_l1", "svm_l2", "l1hinge")
    return sorted([f"elementwise_{op}_{s}" for op in ops for s in DTYPE_SUFFIX.values()]
                  + [f"l1hinge_rate_{s}" for s in DTYPE_SUFFIX.values()])
