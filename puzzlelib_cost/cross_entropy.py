"""CrossEntropy: softmax over dim 1 of the scores, negative log-likelihood of the labels.

    scores (N, C, ...) logits, labels (N, ...) class indices, S = prod(shape[2:]), w = weights
    E    = -sum over the N S positions of w_y log softmax(scores)_y / (N S)   (not divided by sum w)
    grad = w_y (onehot(y) - softmax(scores)) / (N S)                           (= -dE/dscores)
    validate() = the top-1 error rate over the N S positions (weights ignored); it leaves the
                 predicted classes, int32 (N, ...), in mostProb (PuzzleLib's attribute)

CUDA: 2-D scores run the row kernels of the row-softmax family (KL against a one-hot target,
with the class weights); spatial scores run kernels/cross_entropy.cu, one thread per position.
NumPy: 2-D scores run the row-softmax family's NumPy twin the same way; spatial scores and the
top-1 rate run here as cross_entropy.cu does (float32 arithmetic for 16- and 32-bit scores, each
position's error and the sums in float64), by blocks of backends/numpy_blocks.py: a block is some
samples' (C, S) slabs or one sample's (C, s0:s1), so the softmax over C runs down the block's
rows, vectorised along the positions.
"""
import numpy as np

from . import backends, cpu_kernels, label_checks, row_softmax
from .backends import numpy_blocks
from .arrays import FLOAT_DTYPES, INTEGER_DTYPES, dtype_name
from .backends.cuda_backend import COMPUTE_DTYPE, DTYPE_SUFFIX, ERROR_OUT_SIGNATURE, MAX_BLOCKS
from .cost import Cost, accumulateError, checked_maxlabels
from .errors import CostError
from .gpuarray import HostArray

THREADS = 256                 # STRIDED_THREADS of kernels/cross_entropy.cu
CLASSES_IN_REGISTERS = (8, 32)   # cross_entropy_strided_<dtype>_c<CMAX>; c0 takes any C
STRIDED_SIGNATURE = "PPPP" + ERROR_OUT_SIGNATURE + "qqqd"
TOP1_SIGNATURE = "PPP" + ERROR_OUT_SIGNATURE + "qqq"


class CrossEntropy(Cost):
    """Softmax over dim 1 of the scores and the negative log-likelihood of integer labels,
    averaged over the N S positions: `error, grad = cost(scores, labels)`, grad = -dE/dscores.

    maxlabels: None, or the number of classes scores.shape[1] must have.  weights: None, or a
    1-D float array of C class weights (E is not divided by their sum).  validate() returns the
    top-1 error rate and leaves the predicted classes in mostProb.  The module's docstring has
    the formulas.
    """
    _ARGUMENTS = ("maxlabels", "weights")

    def __init__(self, maxlabels=None, weights=None):
        super().__init__()
        self.maxlabels = checked_maxlabels(maxlabels)
        host = None
        if weights is not None:
            try:
                host = weights.get() if hasattr(weights, "get") else np.asarray(weights)
            except (TypeError, ValueError, RuntimeError) as exc:   # (a bfloat16 or CUDA torch tensor, ...)
                raise CostError(f"weights: expected a 1-D float array of one weight per class, got a "
                                f"{type(weights).__name__} NumPy cannot read ({exc})") from None
            # (bfloat16, an ml_dtypes type, has dtype.kind "V": recognised by name, as pred's dtype is)
            if host.ndim != 1 or (host.dtype.kind != "f" and dtype_name(host.dtype) not in FLOAT_DTYPES):
                raise CostError(f"weights: expected a 1-D float array of one weight per class, got "
                                f"{host.dtype} of shape {host.shape}")
            # float64 (exact for every float16, bfloat16 and float32 weight); both backends convert
            # these to their compute type (float32 for 16- and 32-bit scores).  Read-only: they
            # change by `ce.weights = new` (checked), so the GPU's copy of them is found by identity,
            # not by hashing them every call (0.5 ms at 128K classes).
            host = host.astype(np.float64)
            host.flags.writeable = False
        self.weights = host
        self._batch = None
        self.mostProb = None   # validate(): the predicted classes

    def __setstate__(self, state):
        super().__setstate__(state)
        if isinstance(self.__dict__.get("weights"), np.ndarray):   # (a copy's: read-only, as the constructor's)
            self.weights.flags.writeable = False

    def reset(self):
        super().reset()
        self.mostProb = None

    def checkDataShape(self, pred, target):
        return self._checkInputs(pred, target, weighted=True)

    def checkValDataShape(self, pred, target):
        # validate's top-1 error rate leaves the weights out, so their length is not its business
        # (PuzzleLib's own wceValTest validates 4 classes with 10 weights)
        return self._checkInputs(pred, target, weighted=False)

    def _checkInputs(self, pred, target, weighted):
        backend, (scores, labels) = backends.for_inputs({"pred": pred, "target": target})
        if len(scores.shape) < 2:
            raise CostError(f"pred: expected scores of shape (N, C, ...), got shape {scores.shape}")
        if scores.dtype not in FLOAT_DTYPES:
            raise CostError(f"pred: expected a floating-point dtype ({', '.join(FLOAT_DTYPES)}), got {scores.dtype}")
        if scores.size == 0:
            raise CostError(f"pred: expected a non-empty array, got shape {scores.shape}")
        classes = scores.shape[1]
        label_checks.check_int32_count(classes, "pred", scores.shape)
        if self.maxlabels is not None and classes != self.maxlabels:
            raise CostError(f"pred: expected shape[1] == maxlabels == {self.maxlabels}, got shape {scores.shape}")
        if weighted and self.weights is not None and self.weights.shape != (classes,):
            raise CostError(f"weights: expected shape ({classes},) (one per class of pred {scores.shape}), "
                            f"got shape {self.weights.shape}")
        if labels.dtype not in INTEGER_DTYPES:
            raise CostError(f"target: expected integer class labels, got dtype {labels.dtype}")
        expected = scores.shape[:1] + scores.shape[2:]
        if tuple(labels.shape) != expected:
            raise CostError(f"target: expected labels of shape {expected} (pred has shape {scores.shape}), "
                            f"got shape {labels.shape}")
        # The kernels' label dtype: int64 for the row kernels of 2-D scores' calls, int32 for the
        # strided kernels and validate's top-1 kernel (the NumPy math takes the host labels as int64).
        rows = weighted and scores.size == scores.shape[0] * classes
        checked = backend.checked_labels(labels, 0, classes, f"class labels in [0, {classes})", tuple(labels.shape),
                                         np.int64 if rows else np.int32)
        self._batch = (backend, scores, labels, checked.astype(np.int64) if backend.name == "cpu" else checked)
        return backend

    def calcGrad(self, pred, target):
        backend, scores, labels, checked = self._takeBatch(CrossEntropy.checkDataShape, pred, target)
        return run(backend, scores, labels, checked, self.weights, self.devErr, self._takeFusedAccumulator(),
                   want_grad=True)

    calcError = accumulateError   # (the fused pass in calcGrad adds devErr to accumErr: see there)

    def calcVal(self, pred, target):
        backend, scores, labels, checked = self._takeBatch(CrossEntropy.checkValDataShape, pred, target)
        error, self.mostProb = top1_error_rate(backend, scores, labels, checked, self.valDevErr)
        return error


def run(backend, scores, labels, checked_labels, weights, batch_error, accumulator, want_grad):
    """Fused error and gradient; batch_error = the summed per-sample error (-sum w log q / S).
    checked_labels: the check's labels (host int64 on the CPU, a CheckedLabels on the GPU)."""
    n, classes = scores.shape[:2]
    inner = scores.size // (n * classes)
    if inner == 1:   # rows: KL against the one-hot target, the row kernels' label path (and its NumPy twin)
        return row_softmax.run(backend, scores, labels, checked_labels, False, weights, batch_error, accumulator,
                               want_grad)
    if backend.name == "cpu":
        return _numpy(backend, scores, checked_labels, weights, batch_error, accumulator, want_grad)
    suffix = DTYPE_SUFFIX[scores.dtype]
    cmax = next((c for c in CLASSES_IN_REGISTERS if classes <= c), 0)
    positions = n * inner
    blocks = min(-(-positions // THREADS), MAX_BLOCKS)
    with backend.run([scores, labels]) as work:
        grad, grad_ptr = work.empty_like(scores) if want_grad else (None, 0)
        weight_ptr = work.constant(weights, COMPUTE_DTYPE[suffix]) if weights is not None else 0
        work.launch(f"cross_entropy_strided_{suffix}_c{cmax}", blocks, THREADS, STRIDED_SIGNATURE,
                    (scores.pointer, work.labels(checked_labels, np.int32), weight_ptr, grad_ptr,
                     *work.error_out(blocks, batch_error, accumulator, 1.0 / inner),
                     positions, classes, inner, 1.0 / positions))
    return grad


def _numpy(backend, scores, checked_labels, weights, batch_error, accumulator, want_grad):
    """cross_entropy_strided's twin, a block of positions at a time: per position m = max over C,
    z = sum exp(x - m) (compute type), error w_y (log z - (x_y - m)) added in float64, grad =
    (onehot - exp(x - m) / z) w_y / (N S) (-e (w_y scale / z) everywhere, the label's entry then
    set to (1 - e_y / z) w_y scale)."""
    n, classes = scores.shape[:2]
    inner = scores.size // (n * classes)
    x = np.ascontiguousarray(np.asarray(scores.array)).reshape(n, classes, inner)
    y = checked_labels.reshape(n, 1, inner)
    compute = numpy_blocks.compute_dtype(x.dtype)
    w = None if weights is None else np.asarray(weights).astype(compute)   # the kernels' weights: compute type
    grad = np.empty(x.shape, x.dtype) if want_grad else None
    direct = x.dtype == compute
    scale = compute.type(1.0 / (n * inner))

    kernels = cpu_kernels.compiled() if x.dtype == np.float32 else None   # the `cpu` extra's fused block
    w_compiled = np.ones(classes, np.float32) if w is None else w

    def work_compiled(scratch, n0, n1, s0, s1):
        if grad is not None:
            return kernels.cross_entropy_strided_block(x, y, w_compiled, scale, n0, n1, s0, s1, grad, 0, 0)
        g = scratch.buf("grad", (n1 - n0, classes, s1 - s0), np.float32)
        return kernels.cross_entropy_strided_block(x, y, w_compiled, scale, n0, n1, s0, s1, g, n0, s0)

    def work(scratch, n0, n1, s0, s1):
        part = (slice(n0, n1), slice(None), slice(s0, s1))
        label = y[part].astype(np.intp)
        pos = label.shape
        # the label entries' flat indices, in x and grad (contiguous (n, C, S)) and in a block buffer
        # (bn, C, bs): one np.take / np.put each (put_along_axis costs 3x as much)
        offsets = np.arange(n0, n1, dtype=np.int64)[:, None, None] * classes   # (int32 on NumPy 1's Windows)
        at_x = ((offsets + label) * inner + np.arange(s0, s1)).reshape(-1)
        at_block = ((offsets - n0 * classes + label) * (s1 - s0) + np.arange(s1 - s0)).reshape(-1)
        xb = scratch.load("x", x[part], compute)
        m = np.max(xb, axis=1, keepdims=True, out=scratch.buf("m", pos, compute))   # NaN-propagating
        e = np.subtract(xb, m, out=scratch.buf("e", xb.shape, compute))
        np.exp(e, out=e)
        z = np.sum(e, axis=1, keepdims=True, out=scratch.buf("z", pos, compute))
        x_y = np.take(x.reshape(-1), at_x).astype(compute, copy=False).reshape(pos)
        np.subtract(x_y, m, out=x_y)
        error = np.subtract(np.log(z), x_y, out=x_y)                                  # -log q_y
        w_y = None if w is None else w[label]
        total = float(error.sum(dtype=np.float64)) if w_y is None \
            else float(np.multiply(w_y, error, dtype=np.float64).sum())
        if grad is not None:
            g = grad[part] if direct else scratch.buf("grad", xb.shape, compute)
            ws = scale if w_y is None else np.multiply(w_y, scale, out=w_y)            # w_y scale
            inv_z = np.divide(1, z, out=z)
            e_y = np.take(e.reshape(-1), at_block).reshape(pos)
            np.multiply(e, np.multiply(inv_z, -ws, out=m), out=g)
            g_y = np.multiply(np.subtract(1, np.multiply(e_y, inv_z, out=e_y), out=e_y), ws, out=e_y)
            if direct:
                np.put(grad.reshape(-1), at_x, g_y)
            else:
                np.put(g.reshape(-1), at_block, g_y)
                numpy_blocks.store(grad[part], g)
        return total
    with np.errstate(all="ignore"):   # inf/NaN inputs give inf/NaN outputs, by design
        blocks = numpy_blocks.grid_blocks(n, classes, inner)
        if kernels is not None:   # (compiled blocks release the GIL throughout: two threads pay)
            partials = numpy_blocks.run_blocks(work_compiled, blocks, x.size, numpy_blocks.THREADS)
        else:
            partials = numpy_blocks.run_blocks(work, blocks, x.size, numpy_blocks.MEMORY_BOUND_THREADS)
    backend.store_error(numpy_blocks.sum_in_order(partials) / inner, batch_error, accumulator)
    return backend.output(grad, scores) if want_grad else None


def top1_error_rate(backend, scores, labels, checked_labels, batch_error):
    """(the fraction of the N S positions whose first maximal class is not the label, those
    classes as an int32 array of the labels' shape where the work ran): CrossEntropy's and SVM's
    validate and mostProb."""
    n, classes = scores.shape[:2]
    inner = scores.size // (n * classes)
    if backend.name == "cpu":   # by blocks (np.argmax over a middle axis copies its input: a block's)
        x = np.asarray(scores.array).reshape(n, classes, inner)
        y = checked_labels.reshape(n, inner)
        compute = numpy_blocks.compute_dtype(x.dtype)
        most_prob = np.empty((n, inner), np.int32)

        def work(scratch, n0, n1, s0, s1):
            best = np.argmax(scratch.load("x", x[n0:n1, :, s0:s1], compute), axis=1)   # the first maximum; NaN wins
            most_prob[n0:n1, s0:s1] = best
            return np.count_nonzero(best != y[n0:n1, s0:s1])
        blocks = numpy_blocks.grid_blocks(n, classes, inner)
        # (integers: exact in any order)
        errors = sum(numpy_blocks.run_blocks(work, blocks, x.size, numpy_blocks.MEMORY_BOUND_THREADS))
        backend.store_error(errors / inner, batch_error, None)
        most_prob = most_prob.reshape(labels.shape)
        if isinstance(scores.array, HostArray):   # (it has .get(); an np.matrix view could not be 1-D)
            most_prob = most_prob.view(HostArray)
    else:
        suffix = DTYPE_SUFFIX[scores.dtype]
        blocks = min(-(-(n * inner) // THREADS), MAX_BLOCKS)
        with backend.run([scores, labels]) as work:
            most_prob, most_prob_ptr = work.empty(labels.shape, np.int32)
            work.launch(f"top1_errors_{suffix}", blocks, THREADS, TOP1_SIGNATURE,
                        (scores.pointer, work.labels(checked_labels, np.int32), most_prob_ptr,
                         *work.error_out(blocks, batch_error, None, 1.0 / inner), n * inner, classes, inner))
    return backend.read_scalar(batch_error) / n, most_prob


def kernel_names():
    suffixes = DTYPE_SUFFIX.values()
    return sorted([f"cross_entropy_strided_{s}_c{c}" for s in suffixes for c in (*CLASSES_IN_REGISTERS, 0)]
                  + [f"top1_errors_{s}" for s in suffixes])
