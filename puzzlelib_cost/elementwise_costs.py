"""The elementwise costs: Abs, MSE, SmoothL1, BCE, Hinge, SVM and L1Hinge.

Each is a sum of per-element terms, computed with its gradient in one pass
(kernels/elementwise.cu on the GPU; each class's `block` below on the CPU):

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
NumPy block (the twin of its Op in kernels/elementwise.cu) and its kernel's name; the
ElementwiseCost scaffold holds the call and both backends' launches.

The CPU computes as the kernels do (backends/numpy_blocks.py): float32 arithmetic for 16- and
32-bit inputs, float64 for float64, the terms summed in float64 per block of about 2^17 elements
(numpy_blocks.fold_sum) and the blocks' sums in block order; the temporaries are a thread's
block-sized scratch buffers, written in place, and the blocks are shared by
numpy_blocks.MEMORY_BOUND_THREADS threads (1 by default) with the same bits for any number
of them.  The branches of the kernels' ops are arithmetic here (clip for sign and Huber, a
multiply by a 0/1 mask for step, a scatter at the label for SVM), which gives the same values:
NumPy's where/copyto(where=) cost 5 ns an element.
"""
import math

import numpy as np

from . import backends, cpu_kernels, cross_entropy, label_checks
from .arrays import FLOAT_DTYPES, INTEGER_DTYPES, shape_of
from .backends import numpy_blocks
from .backends.cuda_backend import DTYPE_SUFFIX, ERROR_OUT_SIGNATURE, MAX_BLOCKS, vec_width
from .cost import Cost, accumulateError
from .errors import CostError

THREADS = 256          # ELEMENTWISE_THREADS of kernels/elementwise.cu
SIGNATURE = "PPPPP" + ERROR_OUT_SIGNATURE + "qqqqd"
RATE_SIGNATURE = "PPP" + ERROR_OUT_SIGNATURE + "qq"


# The elements from which a memory-bound compiled block (memory_bound) shares a call with a
# second thread, instead of run_blocks' 4 blocks: on the 2-core machine measured, a second thread
# made MSE's and SmoothL1's 1024 x 1024 calls (about 1 ms) slower as often as faster, and their
# 64 x 32000 calls (2M elements) faster.
MEMORY_BOUND_PARALLEL_MIN = 12 * numpy_blocks.BLOCK_ELEMENTS


class ElementwiseCost(Cost):
    """The call of every elementwise cost.  A subclass sets `kernel` and implements
    checkInputs(preds, target, backend) -> labels (checkLabels') or None, preds and target being
    ArrayInfos, and block() (the NumPy
    math); grid() and label_grid() say how the CPU cuts pred and the labels into blocks."""
    kernel = None
    validate_kernel = None   # None: validate returns the error E itself
    takes_pair = False       # pred is a list [x1, x2] (L1Hinge)

    def checkDataShape(self, pred, target):
        if isinstance(pred, (list, tuple)) != self.takes_pair:
            expected = ("a list of two arrays [x1, x2]" if self.takes_pair
                        else "a numpy array or a CUDA array (pycuda GPUArray, CUDA torch tensor, CuPy array)")
            raise CostError(f"pred: expected {expected}, got {type(pred).__name__}")
        preds = list(pred) if isinstance(pred, (list, tuple)) else [pred]
        names = [f"pred[{i}]" for i in range(len(preds))] if isinstance(pred, (list, tuple)) else ["pred"]
        backend, infos = backends.for_inputs({**dict(zip(names, preds)), "target": target})
        labels = self.checkInputs(infos[:-1], infos[-1], backend)
        self._batch = (backend, infos[:-1], infos[-1], labels)
        return backend

    def calcGrad(self, pred, target):
        backend, preds, target, labels = self._takeBatch(ElementwiseCost.checkDataShape, pred, target)
        return self._run(backend, self.kernel, preds, target, labels, self.devErr, self._takeFusedAccumulator(),
                         want_grad=True)

    calcError = accumulateError   # (the fused pass in calcGrad adds devErr to accumErr: see there)

    def calcVal(self, pred, target):
        backend, preds, target, labels = self._takeBatch(ElementwiseCost.checkDataShape, pred, target)
        self._run(backend, self.validate_kernel or self.kernel, preds, target, labels, self.valDevErr, None,
                  want_grad=False)
        return backend.read_scalar(self.valDevErr) / preds[0].shape[0]

    def getBatchsize(self, pred):
        return shape_of(pred[0] if isinstance(pred, (list, tuple)) else pred)[0]

    # --- hooks ------------------------------------------------------------------------

    def checkInputs(self, preds, target, backend):
        raise NotImplementedError

    def geometry(self, pred):
        """(M, D, C, S) of pred's shape: size, per sample, shape[1], prod(shape[2:])."""
        shape = pred.shape
        size = math.prod(shape)
        row = size // shape[0]
        classes = shape[1] if len(shape) > 1 else 1
        return size, row, classes, row // classes

    def scales(self, pred):
        """(grad_scale, error_scale): grad = scale * per-element -gradient; summed per-sample error =
        error_scale * (sum of terms).  Default: the mean over the M elements."""
        size, row, _, _ = self.geometry(pred)
        return 1.0 / size, 1.0 / row

    def grid(self, shape):
        """pred's shape as the (N, C, S) that the CPU's blocks cut (numpy_blocks.grid_blocks); the
        elementwise costs need no structure: one flat run of M elements."""
        return 1, 1, math.prod(shape)

    def label_grid(self, labels, grid):
        """The labels as an array that a block [n0:n1, :, s0:s1] of the grid slices (see _numpy)."""
        return labels.reshape(grid)

    def block(self, kernel, scratch, a, b, y, grad, grad_scale):
        """One block of pred (a) and of the float target or x2 (b), or of the labels (y), a and b in
        the compute type: writes the block's gradient (grad_scale included) into grad unless it is
        None, returns the float64 sum of the block's terms."""
        raise NotImplementedError

    # The cpu_kernels function (the `cpu` extra) that replaces block() for `kernel` on float32
    # blocks, if any: compiled(a, b or the labels, grad_scale, grad) -> the float64 sum of the terms.
    compiled_name = None
    # Whether the compiled block moves memory more than it computes (under a nanosecond an
    # element): then a second thread waits for MEMORY_BOUND_PARALLEL_MIN elements.
    memory_bound = False

    def wide(self, kernel):
        """Whether `kernel` takes its differences and terms in float64 for 16- and 32-bit inputs, as
        the kernels' WIDE ops do (elementwise.cu): a - b of two finite floats can pass float32's
        range, and d^2 does from |d| = 1.8e19; the grad is scaled in float64 and rounded to float32
        once (then to a 16-bit grad's dtype, as the kernels narrow it)."""
        return False

    def compiled_block(self, kernel, compute):
        """The compiled block for `kernel` on blocks of the compute type `compute` (float32 only:
        a wide op's block does its own float64 arithmetic), or None (then block() runs)."""
        if kernel != self.kernel or self.compiled_name is None or compute != np.float32:
            return None
        kernels = cpu_kernels.compiled()
        return getattr(kernels, self.compiled_name) if kernels else None

    # --- both backends -----------------------------------------------------------------

    def _run(self, backend, kernel, preds, target, labels, batch_error, accumulator, want_grad):
        grad_scale, error_scale = self.scales(preds[0])
        if backend.name == "cpu":
            return self._numpy(backend, kernel, preds, target, labels, batch_error, accumulator, want_grad,
                               grad_scale, error_scale)
        return self._cuda(backend, kernel, preds, target, labels, batch_error, accumulator, want_grad,
                          grad_scale, error_scale)

    def _numpy(self, backend, kernel, preds, target, labels, batch_error, accumulator, want_grad, grad_scale,
               error_scale):
        """The CPU pass: blocks of the grid, each block's terms and gradient by block(); grad is
        written block by block into an array of pred's dtype (through a float32 scratch block for
        16-bit inputs); L1Hinge's x2 gets -grad."""
        second = preds[1] if len(preds) > 1 else target if labels is None else None   # x2, or a float target
        grid = self.grid(preds[0].shape)
        a = np.asarray(preds[0].array).reshape(grid)
        b = None if second is None else np.asarray(second.array).reshape(grid)
        y = None if labels is None else self.label_grid(labels, grid)
        narrow = numpy_blocks.compute_dtype(a.dtype)   # float32 for 16- and 32-bit inputs
        compiled = self.compiled_block(kernel, narrow)
        wide = self.wide(kernel)
        # (a compiled block takes float32 blocks and does its own float64 arithmetic where wide)
        compute = np.dtype(np.float64) if wide and compiled is None else narrow
        direct = a.dtype == compute                   # grad computed straight into the output
        grads = [np.empty(grid, a.dtype) for _ in preds] if want_grad else []
        scale = np.float64(grad_scale) if wide else compute.type(grad_scale)

        def work(scratch, n0, n1, s0, s1):
            part = (slice(n0, n1), slice(None), slice(s0, s1))
            ab = scratch.load("a", a[part], compute)
            bb = None if b is None else scratch.load("b", b[part], compute)
            yb = None if y is None else y[part] if y.shape[2] > 1 else y[n0:n1]
            grad = None
            if grads:
                grad = grads[0][part] if direct else scratch.buf("grad", ab.shape, compute)
            if compiled is None:
                total = self.block(kernel, scratch, ab, bb, yb, grad, scale)
            else:   # (the compiled kernels need a gradient buffer, and take the labels as they are)
                out = scratch.buf("grad", ab.shape, compute) if grad is None else grad
                total = compiled(ab.reshape(-1), (yb if bb is None else bb).reshape(-1), scale, out.reshape(-1))
            if grads and grad.dtype != narrow and a.dtype != narrow:   # a 16-bit input's wide grad:
                rounded = scratch.buf("grad32", grad.shape, narrow)        # to float32 first, as the kernels
                np.copyto(rounded, grad, casting="unsafe")
                grad = rounded
            if grads and not direct:
                numpy_blocks.store(grads[0][part], grad)
            if len(grads) > 1:
                np.negative(grad, out=grads[1][part], casting="unsafe")
            return total
        with np.errstate(all="ignore"):   # inf/NaN inputs give inf/NaN outputs, by design
            # (a wide op's float64 blocks of half the elements: the scratch stays as many bytes)
            blocks = numpy_blocks.grid_blocks(*grid, numpy_blocks.BLOCK_ELEMENTS // 2 if compute != narrow else None)
            # (compiled blocks release the GIL for all their work: two threads pay there, not for NumPy's)
            threads = numpy_blocks.THREADS if compiled is not None else numpy_blocks.MEMORY_BOUND_THREADS
            partials = numpy_blocks.run_blocks(work, blocks, a.size, threads,
                                               MEMORY_BOUND_PARALLEL_MIN if compiled and self.memory_bound else None)
        backend.store_error(numpy_blocks.sum_in_order(partials) * error_scale, batch_error, accumulator)
        if not want_grad:
            return None
        outs = [backend.output(g, p) for g, p in zip(grads, preds)]
        return outs if len(outs) > 1 else outs[0]

    def _cuda(self, backend, kernel, preds, target, labels, batch_error, accumulator, want_grad, grad_scale,
              error_scale):
        suffix = DTYPE_SUFFIX[preds[0].dtype]
        size, row, classes, inner = self.geometry(preds[0])
        with backend.run([*preds, target]) as work:
            grads = [work.empty_like(p) for p in preds] if want_grad else []
            label_ptr = work.labels(labels, np.int32) if labels is not None else 0
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
    def checkLabels(info, backend, shape, low, high, what):
        """Integer labels of `shape` whose values are all in [low, high), checked by the backend:
        the host labels on the CPU, in their own integer dtype (the NumPy blocks convert a block at
        a time), a device copy narrowed to the kernels' int32 on the GPU; CostError naming the
        first bad value and its index.  Where the labels are {0, 1} (BCE, L1Hinge), a bool mask is
        taken too, as its 0s and 1s (any nonzero byte as 1)."""
        binary = (low, high) == (0, 2)
        if info.dtype not in INTEGER_DTYPES and not (binary and info.dtype == "bool"):
            raise CostError(f"target: expected {'integer or bool' if binary else 'integer'} labels ({what}), "
                            f"got dtype {info.dtype}")
        if tuple(info.shape) != tuple(shape):
            raise CostError(f"target: expected labels of shape {tuple(shape)}, got shape {info.shape}")
        return backend.checked_labels(info, low, high, what, tuple(info.shape), np.int32)


# --- NumPy helpers of the blocks: the kernels' sign_, relu_ and step_ without branches ----------

_HUGE = {np.dtype(np.float32): np.float32(2.0 ** 100), np.dtype(np.float64): np.float64(2.0 ** 600)}


def _scaled_sign(d, scale, out, negate=False):
    """out = sign(d) * scale (-sign(d) * scale with negate) for a scale > 0, bitwise: (d * H) * H is
    +-inf or beyond 1 for every nonzero d (subnormals too: H^2 = 2^200 / 2^1200) and keeps 0 and
    NaN; clip makes it +-scale.  (np.sign costs 5x a multiply in NumPy.)"""
    np.multiply(d, -_HUGE[d.dtype] if negate else _HUGE[d.dtype], out=out)
    np.multiply(out, _HUGE[d.dtype], out=out)
    return np.clip(out, -scale, scale, out=out)


def _relu(m, scratch, out):
    """out = max(m, 0), NaN kept (np.maximum against an array: the scalar form is 3x slower)."""
    return np.maximum(m, scratch.zeros(m.shape, m.dtype), out=out)


def _step(m, v, scratch, out):
    """out = v where m > 0, else 0, for finite v: v times the mask m > 0.  Where m is NaN that
    gives 0 where the kernels' step_ gives NaN; _nan_where(m) puts those back."""
    mask = np.greater(m, 0, out=scratch.buf("mask", m.shape, bool))
    return np.multiply(v, mask, out=out)


def _nan_where(m, out):
    """out = NaN where m is NaN (the rare fix-up of _step; called only when a block's terms
    summed to NaN, which they do exactly when some m is NaN: the terms are >= 0, +inf or NaN)."""
    nan = np.isnan(m)
    if nan.any():
        np.copyto(out, np.broadcast_to(np.asarray(np.nan, out.dtype), out.shape), where=np.broadcast_to(nan, out.shape))
    return out


class _PairCost(ElementwiseCost):
    """pred and a float target of the same shape and dtype."""

    def wide(self, kernel):
        return True

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
    compiled_name = "abs_block"
    memory_bound = True

    def block(self, kernel, scratch, a, b, y, grad, grad_scale):
        d = np.subtract(a, b, out=scratch.buf("d", a.shape, a.dtype))
        if grad is not None:
            _scaled_sign(d, grad_scale, grad, negate=True)   # -sign(d) * scale
        return numpy_blocks.fold_sum(np.absolute(d, out=d))


class MSE(_PairCost):
    """E = sum (pred - target)^2 / 2M; grad = (target - pred) / M."""
    kernel = "mse"
    compiled_name = "mse_block"
    memory_bound = True

    def block(self, kernel, scratch, a, b, y, grad, grad_scale):
        d = np.subtract(a, b, out=scratch.buf("d", a.shape, a.dtype))
        if grad is not None:
            np.multiply(d, -grad_scale, out=grad)       # (-d) * scale
        return numpy_blocks.fold_sum(np.multiply(d, d, out=d))

    def scales(self, pred):
        grad_scale, error_scale = super().scales(pred)
        return grad_scale, error_scale / 2


class SmoothL1(_PairCost):
    """Huber with threshold 1: d^2 / 2 where |d| < 1, else |d| - 1/2, over M; grad = -dE/dpred."""
    kernel = "smoothl1"
    compiled_name = "smoothl1_block"
    memory_bound = True

    def block(self, kernel, scratch, a, b, y, grad, grad_scale):
        # c = clip(d, -1, 1) is d inside and sign(d) outside: grad = -c * scale, and c (d - c/2) is
        # d (d/2) inside (d - d/2 = d/2 exact: one rounding, as the kernel's (0.5 d) d) and
        # sign(d) (d - sign(d)/2) = |d| - 0.5 outside (+-1 factors exact): the kernel's values.
        d = np.subtract(a, b, out=scratch.buf("d", a.shape, a.dtype))
        c = np.clip(d, -1, 1, out=scratch.buf("c", a.shape, a.dtype))
        if grad is not None:
            np.multiply(c, -grad_scale, out=grad)
        t = np.multiply(c, 0.5, out=scratch.buf("t", a.shape, a.dtype))
        np.subtract(d, t, out=t)
        return numpy_blocks.fold_sum(np.multiply(t, c, out=t))


class BCE(ElementwiseCost):
    """Binary cross-entropy on logits s with labels y in {0, 1}, stable for any s:
    E = mean over M of max(s, 0) - s y + log(1 + exp(-|s|)); grad = (y - sigmoid(s)) / M, taken as
    (2y - 1) sigmoid((1 - 2y) s) / M: 1 - sigmoid(s) never as a difference.
    validate() returns the error rate: y == 1 ? s <= 0 : s > 0, over M."""
    kernel, validate_kernel = "bce", "bce_rate"
    compiled_name = "bce_block"

    def checkInputs(self, preds, target, backend):
        pred, = preds
        self.checkFloat(pred)
        # PuzzleLib's shapes: labels like pred, or without pred's dim 1 when it is 1 ((N, 1) -> (N,),
        # (N, 1, H, W) -> (N, H, W)).
        squeezed = pred.shape[:1] + pred.shape[2:]
        shape = squeezed if len(pred.shape) >= 2 and pred.shape[1] == 1 and target.shape == squeezed else pred.shape
        return self.checkLabels(target, backend, shape, 0, 2, "labels in {0, 1}")

    def block(self, kernel, scratch, s, b, y, grad, grad_scale):
        if kernel == "bce_rate":   # y == 1 ? s <= 0 : s > 0 (a NaN s counts in neither)
            one = np.equal(y, 1, out=scratch.buf("one", s.shape, bool))
            low = np.less_equal(s, 0, out=scratch.buf("low", s.shape, bool))
            high = np.greater(s, 0, out=scratch.buf("high", s.shape, bool))
            np.logical_and(one, low, out=low)
            np.logical_not(one, out=one)
            np.logical_and(one, high, out=high)
            return float(np.count_nonzero(low) + np.count_nonzero(high))
        yf = scratch.load("y", y, s.dtype)
        e = np.absolute(s, out=scratch.buf("e", s.shape, s.dtype))
        np.negative(e, out=e)
        np.exp(e, out=e)                                # e = exp(-|s|) <= 1: never overflows
        u = np.add(e, 1, out=scratch.buf("u", s.shape, s.dtype))
        t = scratch.buf("t", s.shape, s.dtype)
        z = scratch.buf("z", s.shape, s.dtype)
        if grad is not None:
            # y - sigmoid(s) as (2y - 1) sigmoid(z), z = (1 - 2y) s: 1 - sigmoid(s) = sigmoid(-s) from e
            # directly, never as a difference (which cancelled: 0 from s = 17 on for y = 1).
            # sigmoid(z) = (z >= 0 ? 1 : e) / (1 + e), the numerator max(e, z >= 0) (e <= 1; NaN kept).
            np.divide(1, u, out=t)
            np.multiply(yf, 2, out=grad)
            np.subtract(grad, 1, out=grad)                  # 2y - 1
            np.multiply(grad, s, out=z)                     # -z
            np.less_equal(z, 0, out=z)                      # z >= 0
            np.maximum(e, z, out=z)
            np.multiply(z, t, out=z)                        # sigmoid(z)
            np.multiply(grad, z, out=grad)
            np.multiply(grad, grad_scale, out=grad)
        # log1p(e) = log(u) + (e - (u - 1)) / u, u = fl(1 + e): u - 1 and e - (u - 1) are exact, so
        # this corrects log(u) by the rounding of 1 + e to within a few ulp of log1p (NumPy's float32
        # log1p is a scalar loop, 40x slower than log).  e < 2^-24: u = 1 and it gives e.
        np.subtract(u, 1, out=t)
        np.subtract(e, t, out=t)
        np.divide(t, u, out=t)
        np.log(u, out=u)
        np.add(u, t, out=u)
        np.multiply(yf, -2, out=z)                      # z = (1 - 2y) s: -s where y = 1, s where y = 0
        np.add(z, 1, out=z)
        np.multiply(z, s, out=z)
        _relu(z, scratch, z)                            # softplus(z) = max(z, 0) + log1p(exp(-|z|))
        return numpy_blocks.fold_sum(np.add(z, u, out=z))


class Hinge(ElementwiseCost):
    """pred (N, C), labels in {-1, 0, 1} of the same shape: E = sum max(0, 1 - s y) / (N C);
    grad = y / (N C) where s y < 1 (a label 0 adds 1 / C per sample and no gradient)."""
    kernel = "hinge"
    compiled_name = "hinge_block"
    memory_bound = True

    def checkInputs(self, preds, target, backend):
        pred, = preds
        self.checkFloat(pred, min_dims=2)
        if len(pred.shape) != 2:
            raise CostError(f"pred: expected a 2-D array (N, C), got shape {pred.shape}")
        return self.checkLabels(target, backend, pred.shape, -1, 2, "labels in {-1, 0, 1}")

    def block(self, kernel, scratch, s, b, y, grad, grad_scale):
        yf = scratch.load("y", y, s.dtype)
        m = np.multiply(s, yf, out=scratch.buf("m", s.shape, s.dtype))
        np.subtract(1, m, out=m)                        # m = 1 - s y
        if grad is not None:
            _step(m, yf, scratch, grad)
            np.multiply(grad, grad_scale, out=grad)
        total = numpy_blocks.fold_sum(_relu(m, scratch, scratch.buf("t", s.shape, s.dtype)))
        if grad is not None and np.isnan(total):
            _nan_where(m, grad)
        return total


class SVM(ElementwiseCost):
    """One-vs-all multiclass hinge: scores (N, C, ...), class labels (N, ...); cls = +1 at the
    label's class, -1 elsewhere, h = max(0, 1 - s cls); E = sum h (mode "l1") or h^2 ("l2")
    over N S C; grad = -dE/ds.  validate() returns the top-1 error rate over N S and leaves the
    predicted classes in mostProb."""

    _ARGUMENTS = ("mode",)

    def __init__(self, mode="l1"):
        super().__init__()
        if mode not in ("l1", "l2"):
            raise CostError(f"mode: expected 'l1' or 'l2', got {mode!r}")
        self.mode = mode
        self.mostProb = None   # validate(): the predicted classes

    @property
    def kernel(self):   # (from mode, so that svm.mode = "l2" takes the l2 kernel; unless a subclass sets its own)
        return self.__dict__.get("_kernel") or "svm_" + self.mode

    @kernel.setter
    def kernel(self, name):
        self.__dict__["_kernel"] = name

    def reset(self):
        super().reset()
        self.mostProb = None

    def wide(self, kernel):
        return kernel == "svm_l2"   # (h^2, and 2 h before the scale)

    def checkInputs(self, preds, target, backend):
        pred, = preds
        self.checkFloat(pred, min_dims=2)
        label_checks.check_int32_count(pred.shape[1], "pred", pred.shape)
        shape = pred.shape[:1] + pred.shape[2:]
        return self.checkLabels(target, backend, shape, 0, pred.shape[1], f"class labels in [0, {pred.shape[1]})")

    def grid(self, shape):
        return shape[0], shape[1], math.prod(shape[2:])   # (N, C, S): a label per (n, s)

    def label_grid(self, labels, grid):
        return labels.reshape(grid[0], 1, grid[2])

    def block(self, kernel, scratch, s, b, y, grad, grad_scale):
        # cls = -1 but at the label: m = 1 + s everywhere first, then the label's m = 1 - s_y and
        # its gradient put there (1/C of the elements, gathered and scattered).
        label = y.astype(np.intp)
        m = np.add(s, 1, out=scratch.buf("m", s.shape, s.dtype))
        m_y = np.subtract(1, np.take_along_axis(s, label, axis=1))
        np.put_along_axis(m, label, m_y, axis=1)
        if self.mode == "l1":   # h = max(0, m); grad = step(m, cls) * scale
            if grad is not None:
                _step(m, np.asarray(-grad_scale), scratch, grad)
                np.put_along_axis(grad, label, (m_y > 0) * grad_scale, axis=1)
            total = numpy_blocks.fold_sum(_relu(m, scratch, scratch.buf("t", s.shape, s.dtype)))
            if grad is not None and np.isnan(total):
                _nan_where(m, grad)
            return total
        # l2: h^2 = max(0, m)^2; grad = step(m, 2 m cls) * scale = max(0, m) (+-2 scale) (2 scale exact)
        r = _relu(m, scratch, m)
        if grad is not None:
            np.multiply(r, -2 * grad_scale, out=grad)
            np.put_along_axis(grad, label, np.take_along_axis(r, label, axis=1) * (2 * grad_scale), axis=1)
        return numpy_blocks.fold_sum(np.multiply(r, r, out=r))

    def calcVal(self, pred, target):
        backend, preds, target, labels = self._takeBatch(ElementwiseCost.checkDataShape, pred, target)
        error, self.mostProb = cross_entropy.top1_error_rate(backend, preds[0], target, labels, self.valDevErr)
        return error


class L1Hinge(ElementwiseCost):
    """Siamese pairs: pred = [x1, x2], each (N, D); labels (N,) in {0, 1}, 1 meaning "same".
    Per element, d = x1 - x2: y ? |d| : max(0, 1 - |d|), over N D.  grad = [g, -g] with
    g = -dE/dx1.  validate() returns the error rate over N of (mean |d| <= 1) != y."""
    kernel = "l1hinge"
    takes_pair = True

    def wide(self, kernel):
        return kernel == self.kernel

    def checkInputs(self, preds, target, backend):
        if len(preds) != 2:
            raise CostError(f"pred: expected a list of two arrays [x1, x2], got {len(preds)} array(s)")
        x1, x2 = preds
        self.checkFloat(x1, "pred[0]", min_dims=2)
        if x2.dtype != x1.dtype or x2.shape != x1.shape:
            raise CostError(f"pred[1]: expected shape {x1.shape} and dtype {x1.dtype} (pred[0]'s), "
                            f"got shape {x2.shape} and dtype {x2.dtype}")
        return self.checkLabels(target, backend, x1.shape[:1], 0, 2, "labels in {0, 1}")

    def grid(self, shape):
        return shape[0], 1, math.prod(shape[1:])   # (N, 1, D): a label per sample

    def label_grid(self, labels, grid):
        return labels.reshape(grid[0], 1, 1)

    def block(self, kernel, scratch, a, b, y, grad, grad_scale):
        # y = 1: |d|, grad -sign(d); y = 0: max(0, 1 - |d|), grad sign(d) where |d| < 1 (1 - |d| > 0
        # exactly when |d| < 1).  The label is a row's: both forms, then the same rows' copied in.
        same = np.broadcast_to(y == 1, a.shape)
        d = np.subtract(a, b, out=scratch.buf("d", a.shape, a.dtype))
        ad = np.absolute(d, out=scratch.buf("ad", a.shape, a.dtype))
        if grad is not None:
            f = np.less(ad, 1, out=scratch.buf("f", a.shape, a.dtype))   # the diff rows' 0/1 factor
            np.copyto(f, -1, where=same)
            _scaled_sign(d, grad_scale, grad)                              # sign(d) * scale (NaN kept)
            np.multiply(grad, f, out=grad)
        t = np.subtract(1, ad, out=d)
        _relu(t, scratch, t)
        np.copyto(t, ad, where=same)
        return numpy_blocks.fold_sum(t)

    def calcVal(self, pred, target):
        """The error rate: a row reduction (mean |d| per sample), not an elementwise sum."""
        backend, (x1, x2), target, labels = self._takeBatch(ElementwiseCost.checkDataShape, pred, target)
        n = x1.shape[0]
        if backend.name == "cpu":   # as the kernel: |x1 - x2| and each sample's sum in float64, by blocks
            grid = self.grid(x1.shape)
            a, b = np.asarray(x1.array).reshape(grid), np.asarray(x2.array).reshape(grid)

            def work(scratch, n0, n1, s0, s1):
                part = (slice(n0, n1), slice(None), slice(s0, s1))
                d = np.subtract(a[part], b[part], out=scratch.buf("d", a[part].shape, np.float64), dtype=np.float64)
                return np.absolute(d, out=d).sum(axis=(1, 2))
            blocks = numpy_blocks.grid_blocks(*grid)
            distance = np.zeros(n)
            # inf - inf (NaN) and overflowing differences (+-inf) are data, as in _numpy: no warnings
            with np.errstate(all="ignore"):
                for (n0, n1, _, _), sums in zip(blocks, numpy_blocks.run_blocks(work, blocks, a.size,
                                                                               numpy_blocks.MEMORY_BOUND_THREADS)):
                    distance[n0:n1] += sums   # (a sample cut into several blocks: its parts in order)
                backend.store_error(((distance / grid[2] <= 1) != (labels == 1)).sum(), self.valDevErr, None)
        else:
            blocks = min(-(-n // THREADS), MAX_BLOCKS)
            with backend.run([x1, x2, target]) as work:
                work.launch(f"l1hinge_rate_{DTYPE_SUFFIX[x1.dtype]}", blocks, THREADS, RATE_SIGNATURE,
                            (x1.pointer, x2.pointer, work.labels(labels, np.int32),
                             *work.error_out(blocks, self.valDevErr, None), n, x1.size // n))
        return backend.read_scalar(self.valDevErr) / n


def kernel_names():
    ops = ("abs", "mse", "smoothl1", "bce", "bce_rate", "hinge", "svm_l1", "svm_l2", "l1hinge")
    return sorted([f"elementwise_{op}_{s}" for op in ops for s in DTYPE_SUFFIX.values()]
                  + [f"l1hinge_rate_{s}" for s in DTYPE_SUFFIX.values()])
