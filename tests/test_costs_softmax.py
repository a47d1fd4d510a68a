"""CrossEntropy and SVM (class scores (N, C, ...) with class-index labels (N, ...)) against the
float64 references of tests/cost_reference.py, PuzzleLib's own unit tests (adapted: our grad is
the exact -dE/dscores, divided by N*S for spatial input and weighted by w_y), finite differences,
PyTorch, extreme and bad inputs, accumulators and bitwise determinism of the kernels."""
import math
import zlib

import numpy as np
import pytest

from puzzlelib_cost import SVM, CostError, CrossEntropy, gpuarray

import cost_reference as R

F16, F32, F64, BF16 = R.F16, R.F32, R.F64, R.BF16


def host(x):
    return x.get() if hasattr(x, "get") else np.asarray(x)


def rng_for(*key):
    return np.random.default_rng(zlib.crc32(repr(key).encode()))   # the same data in every process


def gen_scores(rng, shape, dtype, label_dtype=np.int32, scale=3.0, margin=False):
    """Scores and labels (N,) + shape[2:]; with margin, |s| kept 1e-3 away from 1 (SVM's kinks)."""
    s = rng.standard_normal(shape) * scale
    if margin:
        for k in (-1.0, 1.0):
            near = np.abs(s - k) < 1e-3
            s[near] += 4e-3
    labels = rng.integers(0, shape[1], size=(shape[0],) + tuple(shape[2:])).astype(label_dtype)
    return s.astype(dtype), labels


def weights_for(rng, c, dtype):
    """Positive class weights, exactly representable in the 16-bit types for 16-bit scores."""
    if dtype in (F16, BF16):
        return (rng.integers(1, 17, size=c) / 8.0).astype(np.float32)
    return (rng.random(c) + 0.25).astype(np.float64 if dtype == F64 else np.float32)


def run_and_compare(place, cost, scores, labels, ref, dtype):
    dscores, dlabels = place.put(scores), place.put(labels)
    error, grad = cost(dscores, dlabels)
    R.assert_error_close(error, ref, dtype)
    if place.device is not None:
        assert place.device.launches, "no kernel ran on the emulated device"
    assert type(grad) is type(dscores)
    R.assert_grad_close(place.get(grad), ref["grad"], dtype)
    R.assert_error_close(cost.validate(dscores, dlabels), ref, dtype, what="val")
    return error, grad


# scores shapes: 2-D, 4-D spatial, sizes not multiples of 4/8, size-1 dims, M up to ~20000
# Every kernel path: 2-D rows (kl_rows) and rows longer than one block holds (17000: kl_chunk_* in the
# emulated place, kl_cluster_* through the stand-in, see conftest.place);
# spatial C <= 8, <= 32 and > 32 (cross_entropy_strided c8, c32, c0).
SHAPES = [(1, 1), (5, 7), (1, 10), (4, 3, 5, 6), (2, 5, 1, 9), (3, 1, 4, 4), (2, 13, 3), (300, 37),
          (3, 11, 23, 25), (2, 40, 3, 5), (2, 17000)]
DTYPES = [pytest.param(d, id=str(d)) for d in R.FLOAT_DTYPES]
IDS = ["x".join(map(str, s)) for s in SHAPES]


def _skip_big_off_numpy(place, shape, dtype):
    if place.name != "numpy" and np.prod(shape) > 10000 and dtype not in (F32, BF16):
        pytest.skip("large shapes run in the emulation for float32 and bfloat16 only")


# ------------------------------------------------------------------ PuzzleLib's unit tests, adapted

def test_puzzlelib_ce_errorTest_grad_divided_by_N_times_S():
    rng = np.random.default_rng(10)
    scores = gpuarray.to_gpu(rng.standard_normal((20, 10, 3)).astype(np.float32))
    labels = gpuarray.to_gpu(rng.integers(0, 10, size=(20, 3)).astype(np.int32))
    error, grad = CrossEntropy()(scores, labels)
    s, y = host(scores), host(labels)
    smax = np.exp(s - s.max(axis=1, keepdims=True))
    smax /= smax.sum(axis=1, keepdims=True)
    onehot = np.moveaxis(np.eye(10)[y], -1, 1)
    puzzlelib_grad = (onehot - smax) / 20                  # PuzzleLib divides by N only
    assert np.allclose(puzzlelib_grad / 3, host(grad))     # ours: exact -dE/ds, / (N*S)
    rows = np.moveaxis(smax, 1, -1).reshape(-1, 10)
    assert np.isclose(-np.log(rows[np.arange(60), y.ravel()]).sum() / 60, error)


def test_puzzlelib_wceErrorTest_with_w_y():
    rng = np.random.default_rng(11)
    scores = gpuarray.to_gpu(rng.standard_normal((20, 10, 3)).astype(np.float32))
    labels = gpuarray.to_gpu(rng.integers(0, 10, size=(20, 3)).astype(np.int32))
    weights = rng.random(10).astype(np.float32)
    weights /= weights.sum()
    error, grad = CrossEntropy(weights=weights)(scores, labels)
    s, y = host(scores), host(labels)
    smax = np.exp(s - s.max(axis=1, keepdims=True))
    smax /= smax.sum(axis=1, keepdims=True)
    onehot = np.moveaxis(np.eye(10)[y], -1, 1)
    wy = weights[y][:, None, :]                            # PuzzleLib uses w_c: not the gradient
    assert np.allclose(wy * (onehot - smax) / 60, host(grad), atol=1e-7)
    rows = np.moveaxis(smax, 1, -1).reshape(-1, 10)
    assert np.isclose(-(weights[y.ravel()] * np.log(rows[np.arange(60), y.ravel()])).sum() / 60, error)


def _puzzlelib_val_data():
    scores = np.array([[0.1, 0.0, 0.0, -1.0]] * 150 + [[-0.2, 1.0, 0.0, 0.5]] * 150 +
                      [[0.0, -1.0, 2.0, 1.5]] * 300 + [[0.0, 0.0, -6.0, 1.0]] * 400, dtype=np.float32)
    labels = np.array([0] * 100 + [1] * 200 + [2] * 300 + [3] * 400, dtype=np.int32)
    return scores.reshape(1000, 4, 1), labels.reshape(1000, 1)


# (wce: PuzzleLib's wceValTest, 10 weights for these 4 classes: validate leaves the weights out)
@pytest.mark.parametrize("make", [CrossEntropy, lambda: CrossEntropy(weights=np.random.default_rng(0).random(10)
                                                                     .astype(np.float32)),
                                  SVM], ids=["ce", "wce", "svm"])
def test_puzzlelib_valTest(make):
    scores, labels = _puzzlelib_val_data()
    cost = make()
    error = cost.validate(gpuarray.to_gpu(scores), gpuarray.to_gpu(labels))
    assert np.allclose(np.argmax(scores, axis=1), host(cost.mostProb))
    assert error == pytest.approx(0.05, abs=1e-12)         # rows 100..149: predicted 0, label 1


@pytest.mark.parametrize("mode", ["l1", "l2"])
def test_puzzlelib_svm_test(mode):
    rng = np.random.default_rng(12)
    n, size = 20, 4
    scores = gpuarray.to_gpu(rng.standard_normal((n, size)).astype(np.float32))
    labels = gpuarray.to_gpu(rng.integers(0, size, size=n).astype(np.int32))
    svm = SVM(mode=mode)
    error, grad = svm(scores, labels)
    s, y = host(scores), host(labels)
    cls = 2 * (np.arange(size)[None, :] == y[:, None]) - 1
    err = np.maximum(0.0, 1.0 - s * cls)
    if mode == "l1":
        host_grad, host_error = np.where(s * cls < 1, cls, 0) / n / size, err.sum() / n / size
    else:
        host_grad, host_error = 2.0 * cls * err / n / size, (err ** 2).sum() / n / size
    assert np.allclose(host_grad, host(grad))
    assert np.isclose(host_error, error)
    svm.validate(scores, labels)
    assert np.allclose(np.argmax(s, axis=1), host(svm.mostProb))


@pytest.mark.parametrize("make", [CrossEntropy, SVM], ids=["ce", "svm"])
def test_puzzlelib_verifyLabelsTest(make):
    scores = np.zeros((20, 10), np.float32)
    labels = np.arange(20, dtype=np.int32) % 11          # has a 10: out of range for 10 classes
    with pytest.raises(CostError) as info:
        make()(gpuarray.to_gpu(scores), gpuarray.to_gpu(labels))
    print("Caught labels verification error: %s" % info.value)


# ------------------------------------------------------------------ references and the grid

def test_reference_closed_forms():
    r = R.ce_ref(np.zeros((2, 4)), np.array([1, 3]))
    assert r["error"] == pytest.approx(math.log(4), rel=1e-15)
    np.testing.assert_allclose(r["grad"], (np.eye(4)[[1, 3]] - 0.25) / 2, atol=1e-17)
    r = R.ce_ref(np.zeros((2, 4)), np.array([1, 3]), weights=np.array([1.0, 2.0, 3.0, 0.5]))
    assert r["error"] == pytest.approx(2.5 * math.log(4) / 2, rel=1e-15)    # not divided by sum w
    r = R.svm_ref(np.array([[2.0, 0.5, -3.0]]), np.array([0]), "l2")
    assert r["error"] == 1.5 ** 2 / 3
    np.testing.assert_allclose(r["grad"], [[0.0, -1.0, 0.0]])
    assert R.top1_error(np.array([[1.0, 1.0, 0.0]]), np.array([1])) == 1.0  # first max wins


@pytest.mark.parametrize("which", ["ce", "wce", "svm_l1", "svm_l2"])
def test_reference_grad_is_minus_fd_of_reference_error(which):
    s, y = gen_scores(rng_for(which, "fdref"), (2, 3, 2, 2), F64, scale=2.0, margin=True)
    w = np.array([0.5, 1.0, 2.0]) if which == "wce" else None
    f = (lambda v: R.ce_ref(v, y, w)) if which in ("ce", "wce") else (lambda v: R.svm_ref(v, y, which[-2:]))
    fd = R.finite_difference(lambda v: f(v)["error"], s, range(s.size))
    np.testing.assert_allclose(f(s)["grad"].reshape(-1), -fd, atol=1e-8)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=IDS)
@pytest.mark.parametrize("weighted", [False, True], ids=["ce", "wce"])
def test_cross_entropy_matches_reference(place, shape, dtype, weighted):
    _skip_big_off_numpy(place, shape, dtype)
    rng = rng_for("ce", shape, str(dtype), weighted)
    scores, labels = gen_scores(rng, shape, dtype)
    w = weights_for(rng, shape[1], dtype) if weighted else None
    run_and_compare(place, CrossEntropy(weights=w), scores, labels, R.ce_ref(scores, labels, w), dtype)


@pytest.mark.parametrize("wdtype", [np.float16, np.float32, np.float64], ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("dtype", [F32, F64], ids=str)
def test_cross_entropy_weights_of_any_float_dtype(place, dtype, wdtype):
    scores, labels = gen_scores(rng_for("wdtype"), (5, 6, 3), dtype)
    w = np.array([0.5, 1.0, 2.0, 0.25, 1.5, 3.0], wdtype)
    run_and_compare(place, CrossEntropy(weights=w), scores, labels, R.ce_ref(scores, labels, w), dtype)


@pytest.mark.parametrize("shape", [(3, 4), (3, 4, 1)], ids=["rows", "spatial"])
def test_class_weights_are_taken_in_the_compute_type_on_every_path(place, shape):
    """float32 scores take their class weights in float32, as the README says, on every path: a
    weight of 1e39 is inf there, so E is inf (2-D rows on the NumPy path took them in float64:
    finite E, where the kernels and the spatial path gave inf), and 1e-50 is 0."""
    scores, _ = gen_scores(rng_for("weights in f32", shape), shape, F32)
    labels = np.array([0, 1, 2]).reshape((3,) + shape[2:]).astype(np.int32)
    error, grad = CrossEntropy(weights=np.array([1.0, 1e39, 1e-50, 1.0]))(place.put(scores), place.put(labels))
    g = place.get(grad)
    assert error == math.inf
    assert not np.isfinite(g[1]).any() and (g[2] == 0).all() and np.isfinite(g[0]).all()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=IDS)
@pytest.mark.parametrize("mode", ["l1", "l2"])
def test_svm_matches_reference(place, shape, dtype, mode):
    _skip_big_off_numpy(place, shape, dtype)
    scores, labels = gen_scores(rng_for("svm", shape, str(dtype)), shape, dtype, scale=1.5, margin=True)
    run_and_compare(place, SVM(mode=mode), scores, labels, R.svm_ref(scores, labels, mode), dtype)


@pytest.mark.parametrize("label_dtype", R.INT_DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("make,ref", [(CrossEntropy, R.ce_ref), (SVM, R.svm_ref)], ids=["ce", "svm"])
def test_any_integer_label_dtype(place, make, ref, label_dtype):
    scores, labels = gen_scores(rng_for("labels"), (3, 7, 2, 3), F32, label_dtype=label_dtype, margin=True)
    run_and_compare(place, make(), scores, labels, ref(scores, labels), F32)


@pytest.mark.parametrize("dtype", [F16, BF16], ids=str)
def test_argmax_ties_first_max_wins(place, dtype):
    scores = np.array([[1.0, 2.0, 2.0, 0.0], [3.0, 3.0, 3.0, 3.0], [0.0, 0.0, 1.0, 1.0]], dtype)
    labels = np.array([2, 0, 3], np.int32)
    for cost in (CrossEntropy(), SVM()):
        assert cost.validate(place.put(scores), place.put(labels)) == pytest.approx(2 / 3, abs=1e-15)


def test_most_prob_of_a_matrix_pred_has_the_labels_shape():
    # (it was viewed as pred's type: an np.matrix, which cannot be 1-D, made it (1, N))
    scores = np.random.default_rng(4).standard_normal((4, 5)).astype(F32)
    labels = np.array([0, 1, 2, 3], np.int32)
    for cost in (CrossEntropy(), SVM()):
        cost.validate(np.asmatrix(scores), labels)
        assert type(cost.mostProb) is np.ndarray and cost.mostProb.shape == labels.shape
        assert np.array_equal(cost.mostProb, np.argmax(scores, axis=1))


@pytest.mark.parametrize("make", [CrossEntropy, SVM, lambda: SVM("l2")], ids=["ce", "svm_l1", "svm_l2"])
def test_mean_error_is_sample_weighted_and_validate_leaves_it(place, make):
    cost, total, count = make(), 0.0, 0
    ref = R.ce_ref if isinstance(cost, CrossEntropy) else (lambda s, y: R.svm_ref(s, y, cost.mode))
    for n, scale in ((3, 0.3), (5, 2.0), (1, 6.0)):
        s, y = gen_scores(rng_for("acc", n), (n, 4, 3), F64, scale=scale)
        error, _ = cost(place.put(s), place.put(y))
        total, count = total + ref(s, y)["error"] * n, count + n
        assert cost.batchsize == n and cost.numOfSamples == count and cost.getError() == error
        assert cost.getMeanError() == pytest.approx(total / count, rel=1e-12)
    mean = cost.getMeanError()
    cost.validate(place.put(s), place.put(y))
    assert cost.numOfSamples == count and cost.getMeanError() == mean
    grad = cost(place.put(s), place.put(y), queryError=False)
    assert not isinstance(grad, tuple) and cost.numOfSamples == count + 1


# ------------------------------------------------------------------ finite differences and PyTorch

@pytest.mark.parametrize("make", [CrossEntropy, lambda: CrossEntropy(weights=np.array([0.5, 1.0, 2.0, 0.25])),
                                  SVM, lambda: SVM("l2")], ids=["ce", "wce", "svm_l1", "svm_l2"])
def test_grad_is_minus_central_difference_of_error(make):
    s, y = gen_scores(rng_for("fd"), (3, 4, 2, 5), F64, scale=2.0, margin=True)
    _, grad = make()(s, y)
    idx = [0, 7, 19, 33, 58, 119]
    fd = R.finite_difference(lambda v: make()(v, y)[0], s, idx)
    np.testing.assert_allclose(grad.reshape(-1)[idx], -fd, rtol=0, atol=1e-7 * np.abs(grad).max())


@pytest.mark.parametrize("shape", [(6, 9), (3, 5, 4, 7), (2, 4, 6)], ids=["2d", "4d", "3d"])
@pytest.mark.parametrize("which", ["ce", "wce", "svm_l1", "svm_l2"])
def test_torch_oracle(which, shape):
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    s, y = gen_scores(rng_for("torch", which, shape), shape, F64, margin=True)
    n, c, spatial = shape[0], shape[1], int(np.prod(shape[2:]))
    ts, ty = torch.tensor(s, requires_grad=True), torch.tensor(y.astype(np.int64))
    if which in ("ce", "wce"):
        w = rng_for("w").random(c) + 0.25 if which == "wce" else None
        loss = F.cross_entropy(ts, ty, weight=None if w is None else torch.tensor(w), reduction="sum") / (n * spatial)
        cost = CrossEntropy(weights=w)
    else:
        cls = 2 * F.one_hot(ty, c).movedim(-1, 1).double() - 1
        h = torch.clamp(1 - ts * cls, min=0)
        loss = (h if which == "svm_l1" else h * h).mean()
        cost = SVM(mode=which[-2:])
    loss.backward()
    error, grad = cost(s, y)
    assert error == pytest.approx(loss.item(), rel=1e-12)
    np.testing.assert_allclose(grad, -ts.grad.numpy(), rtol=1e-11, atol=1e-16)


# ------------------------------------------------------------------ extreme inputs

@pytest.mark.parametrize("dtype", [F32, F64], ids=str)
def test_ce_logits_1e4_finite(place, dtype):
    scores = np.array([[1e4, -1e4, 0.0], [1e4, -1e4, 0.0], [-1e4, 1e4, 1e4], [0.0, 0.0, -1e4]], dtype)
    labels = np.array([0, 1, 2, 2], np.int32)
    error, grad = run_and_compare(place, CrossEntropy(), scores, labels, R.ce_ref(scores, labels), dtype)
    assert math.isfinite(error) and np.all(np.isfinite(place.get(grad)))


@pytest.mark.parametrize("dtype", [F32, F64, F16], ids=str)
def test_ce_minus_inf_logit(place, dtype):
    scores = np.array([[0.0, -np.inf, 1.0, 2.0], [0.5, 0.1, -0.3, -np.inf]], dtype)
    labels = np.array([2, 3], np.int32)
    dscores, dlabels = place.put(scores), place.put(labels)
    error, grad = CrossEntropy()(dscores, dlabels)
    g = place.get(grad)
    assert g[0, 1] == 0 and math.isfinite(g[0].astype(np.float64).sum())  # -inf at another class: p = 0
    assert error == math.inf                                               # -inf at the label: -log 0
    scores[1, 3] = 0
    run_and_compare(place, CrossEntropy(), scores, labels, R.ce_ref(scores, labels), dtype)


@pytest.mark.parametrize("dtype", [F32, F64, F16], ids=str)
@pytest.mark.parametrize("classes", [3, 20, 40])   # cross_entropy_strided's c8, c32 and c0 kernels
def test_ce_spatial_minus_inf_first_class(place, dtype, classes):
    """-inf as the first class a position's running max sees (and as its last class): a zero
    probability there, as in 2-D rows, not exp(-inf - -inf) = NaN through the whole position."""
    scores, labels = gen_scores(rng_for("spatial -inf", classes), (3, classes, 2, 3), dtype)
    scores[:, 0] = -np.inf
    scores[1, classes - 1, 0, 1] = -np.inf
    labels = np.where(labels == 0, 1, labels).astype(np.int32)   # (not at a -inf class: a finite error)
    labels[1, 0, 1] = min(labels[1, 0, 1], classes - 2)
    error, grad = run_and_compare(place, CrossEntropy(), scores, labels, R.ce_ref(scores, labels), dtype)
    assert math.isfinite(error) and np.all(place.get(grad)[:, 0] == 0)


@pytest.mark.parametrize("shape", [(3, 4), (3, 17000), (3, 4, 2)])   # rows, long rows, spatial
def test_ce_class_weight_0_multiplies_and_keeps_nan(place, shape):
    """A class weight of 0 multiplies its rows' error and grad (0 for finite logits) but is not an
    ignored row: a NaN logit there, or -inf at its label (0 * inf), still gives a NaN error, in 2-D
    rows as at spatial positions (and in PyTorch)."""
    scores, _ = gen_scores(rng_for("weight 0", shape), shape, F32)
    labels = np.zeros((3,) + shape[2:], np.int32) + np.array([2, 2, 1]).reshape((3,) + (1,) * len(shape[2:]))
    w = np.ones(shape[1], np.float32)
    w[2] = 0
    run_and_compare(place, CrossEntropy(weights=w), scores, labels, R.ce_ref(scores, labels, w), F32)
    nan_scores = scores.copy()
    nan_scores[1, 0] = np.nan
    error, grad = CrossEntropy(weights=w)(place.put(nan_scores), place.put(labels))
    g = place.get(grad)
    assert math.isnan(error) and np.isnan(g[1]).all() and np.isfinite(np.delete(g, 1, axis=0)).all()
    inf_scores = scores.copy()
    inf_scores[0, 2] = -np.inf
    assert math.isnan(CrossEntropy(weights=w)(place.put(inf_scores), place.put(labels))[0])


@pytest.mark.parametrize("mode", ["l1", "l2"])
def test_svm_huge_scores(place, mode):
    scores = np.array([[1e4, -1e4, 0.0], [-1e4, 1e4, 1e4]], np.float32)
    labels = np.array([0, 0], np.int32)
    run_and_compare(place, SVM(mode), scores, labels, R.svm_ref(scores, labels, mode), F32)


@pytest.mark.parametrize("dtype", [F32, BF16], ids=str)
def test_svm_l2_hinges_past_floats_square_root_range_are_finite(place, dtype):
    """SVM l2's h^2 passes float32's range from h = 1.8e19, and 2 h from h = 1.7e38: E (a float64)
    and grad (2 h / M) are finite numbers, taken in float64 on every path (E was inf everywhere,
    and the kernels' grad too, where 2 h came before the 1/M)."""
    scores = np.array([[1.0, 2e38, 0.0], [-3e19, 5.0, 1e20]]).astype(dtype)
    labels = np.array([0, 0], np.int32)
    ref = R.svm_ref(scores, labels, "l2")
    assert math.isfinite(ref["error"]) and np.isfinite(ref["grad"]).all()
    run_and_compare(place, SVM("l2"), scores, labels, ref, dtype)


@pytest.mark.parametrize("dtype", [F32, F64, F16], ids=str)
@pytest.mark.parametrize("make,ref", [(CrossEntropy, R.ce_ref), (SVM, R.svm_ref),
                                      (lambda: SVM("l2"), lambda s, y: R.svm_ref(s, y, "l2"))],
                         ids=["ce", "svm_l1", "svm_l2"])
def test_nan_in_gives_nan_error_and_nan_grad(place, make, ref, dtype):
    scores, labels = gen_scores(rng_for("nan"), (3, 4, 2, 3), dtype, margin=True)
    scores[1, 2, 0, 1] = np.nan
    error, grad = make()(place.put(scores), place.put(labels))
    g = place.get(grad)
    assert math.isnan(error) and np.isnan(g[1, 2, 0, 1])
    R.assert_grad_close(g, ref(scores, labels)["grad"], dtype)   # CE: that pixel's C entries NaN, rest exact


# ------------------------------------------------------------------ bad inputs

def z(shape, dtype=np.float32):
    return np.zeros(shape, dtype)


def lab(values, dtype=np.int64):
    return np.array(values, dtype)


BAD = [
    # (id, constructor, scores, labels, substrings the message must contain)
    ("label_C_at_3", lambda: CrossEntropy(), z((6, 5)), lab([0, 1, 4, 5, 0, 9]), ["5", "at index 3"]),
    ("label_minus1_at_2", lambda: CrossEntropy(), z((6, 5)), lab([0, 1, -1, 5, 0, 9], np.int16), ["-1", "at index 2"]),
    ("uint8_label_255", lambda: CrossEntropy(), z((4, 10)), lab([1, 255, 0, 0], np.uint8), ["255", "at index 1"]),
    ("spatial_label_out", lambda: CrossEntropy(), z((2, 3, 2, 2)), lab([[[0, 1], [2, 3]], [[0, 0], [0, 0]]]),
     ["3", "at index (0, 1, 1)"]),   # (the place in the labels' own shape, not a flat position)
    ("spatial_label_second_image", lambda: CrossEntropy(), z((2, 3, 2, 4)),
     lab([[[0] * 4, [0] * 4], [[0] * 4, [0, 0, 0, -1]]], np.int8), ["-1", "at index (1, 1, 3)"]),
    ("uint64_label_huge", lambda: CrossEntropy(), z((4, 3)), lab([0, 2, 2 ** 64 - 1, 1], np.uint64),
     ["18446744073709551615", "at index 2"]),
    ("int64_label_2pow40", lambda: SVM(), z((4, 3)), lab([0, 2 ** 40, 1, 1]), [str(2 ** 40), "at index 1"]),
    ("float_labels", lambda: CrossEntropy(), z((4, 3)), z(4), ["float32"]),
    ("labels_ndim", lambda: CrossEntropy(), z((4, 3, 5)), lab([0, 1, 2, 0]), []),
    ("labels_spatial_shape", lambda: CrossEntropy(), z((4, 3, 5)), np.zeros((4, 6), np.int32), ["5", "6"]),
    ("labels_batch", lambda: CrossEntropy(), z((4, 3)), lab([0, 1, 2]), ["4", "3"]),
    ("scores_1d", lambda: CrossEntropy(), z(4), lab([0, 1, 2, 0]), []),
    ("int_scores", lambda: CrossEntropy(), np.zeros((4, 3), np.int32), lab([0, 1, 2, 0]), ["int32"]),
    ("weights_short", lambda: CrossEntropy(weights=np.ones(4, np.float32)), z((4, 5)), lab([0, 1, 2, 0]), ["4", "5"]),
    ("weights_2d", lambda: CrossEntropy(weights=np.ones((1, 5), np.float32)), z((4, 5)), lab([0, 1, 2, 0]), []),
    ("weights_int", lambda: CrossEntropy(weights=np.ones(5, np.int32)), z((4, 5)), lab([0, 1, 2, 0]), []),
    ("maxlabels_mismatch", lambda: CrossEntropy(maxlabels=4), z((4, 5)), lab([0, 1, 2, 0]), ["4", "5"]),
    ("maxlabels_float", lambda: CrossEntropy(maxlabels=5.5), z((4, 5)), lab([0, 1, 2, 0]), ["5.5"]),
    ("maxlabels_str", lambda: CrossEntropy(maxlabels="5"), z((4, 5)), lab([0, 1, 2, 0]), []),
    ("svm_label_C_at_3", lambda: SVM(), z((6, 5)), lab([0, 1, 4, 5, 0, 1]), ["5", "at index 3"]),
    ("svm_label_negative", lambda: SVM("l2"), z((6, 5)), lab([0, 1, 4, 0, -7, 1], np.int8), ["-7", "at index 4"]),
    ("svm_float_labels", lambda: SVM(), z((4, 3)), z(4, np.float64), ["float64"]),
    ("svm_labels_shape", lambda: SVM(), z((4, 3, 2, 2)), np.zeros((4, 2, 3), np.int32), []),
    ("svm_mode_unknown", lambda: SVM(mode="l3"), z((4, 3)), lab([0, 1, 2, 0]), ["l3"]),
    ("svm_int_scores", lambda: SVM(), np.zeros((4, 3), np.int64), lab([0, 1, 2, 0]), ["int64"]),
]


@pytest.mark.parametrize("call", ["call", "validate"])
@pytest.mark.parametrize("bad_id,make,scores,labels,must", BAD, ids=[b[0] for b in BAD])
def test_bad_input_raises_cost_error_and_keeps_state(place, bad_id, make, scores, labels, must, call):
    def check(exc):
        for s in must:
            assert s in str(exc), f"message {str(exc)!r} does not mention {s!r}"

    try:
        cost = make()                # a bad constructor argument may be refused here already
    except CostError as exc:
        return check(exc)
    if bad_id == "weights_short" and call == "validate":   # (validate leaves the weights out: PuzzleLib's wceValTest)
        return
    before = None
    good_s, good_y = gen_scores(rng_for(bad_id), scores.shape if scores.ndim > 1 else (4, 3), np.float32)
    try:
        cost(place.put(good_s), place.put(good_y))      # a good call first: state to keep
        before = (cost.numOfSamples, cost.batchsize, cost.getError(), cost.getMeanError())
    except CostError:
        pass                         # the constructor's argument does not fit this shape at all
    with pytest.raises(CostError) as info:
        if call == "call":
            cost(place.put(scores), place.put(labels))
        else:
            cost.validate(place.put(scores), place.put(labels))
    check(info.value)
    if before is not None:
        assert (cost.numOfSamples, cost.batchsize, cost.getError(), cost.getMeanError()) == before


def test_bad_second_call_after_good_keeps_handed_out_grad(place):
    s, y = gen_scores(rng_for("keep"), (4, 5), F32)
    cost = CrossEntropy()
    _, grad = cost(place.put(s), place.put(y))
    kept = place.get(grad).copy()
    y[2] = 7
    with pytest.raises(CostError, match="at index 2"):
        cost(place.put(s), place.put(y))
    np.testing.assert_array_equal(place.get(grad), kept)


# ------------------------------------------------------------------ determinism of the kernels

@pytest.mark.parametrize("shape", [(3, 5, 40, 40), (300, 37)], ids=["spatial", "2d"])
@pytest.mark.parametrize("which", ["ce", "wce", "svm_l1", "svm_l2"])
def test_bitwise_identical_in_every_thread_order(emulated_in_every_order, which, shape):
    scores, labels = gen_scores(rng_for("det", which, shape), shape, F32, margin=True)
    w = weights_for(rng_for("w"), shape[1], F32) if which == "wce" else None

    def make():
        return CrossEntropy(weights=w) if which in ("ce", "wce") else SVM(mode=which[-2:])

    def once(place):
        cost = make()
        error, grad = cost(place.put(scores), place.put(labels))
        return error, place.get(grad).tobytes(), cost.validate(place.put(scores), place.put(labels))
    results = emulated_in_every_order(once)
    assert all(r == results[0] for r in results[1:]), "results differ between thread orders"
    ref = R.ce_ref(scores, labels, w) if which in ("ce", "wce") else R.svm_ref(scores, labels, which[-2:])
    R.assert_error_close(results[0][0], ref, F32)


def test_class_weights_go_to_the_device_once(kernel_module):
    """CrossEntropy's weights are copied to the device on first use, not on every call (2-D rows
    and spatial positions share the copy); the results stay the same."""
    from emulated_device import EmuArray, EmulatedDevice
    from puzzlelib_cost import backends
    from puzzlelib_cost.backends.cuda_backend import CudaBackend
    device = EmulatedDevice(kernel_module)
    uploads, upload = [], device.upload
    device.upload = lambda host: uploads.append(np.array(host)) or upload(host)
    weights = np.array([0.5, 1.0, 2.0, 3.0])
    cost, results = CrossEntropy(weights=weights), []
    with backends.substituted_cuda(CudaBackend(device)):
        for shape in [(5, 4), (5, 4), (2, 4, 3), (2, 4, 3)]:
            scores, labels = gen_scores(rng_for("weights once", shape), shape, F32)
            error, grad = cost(EmuArray(scores), EmuArray(labels))
            results.append((error, grad.get().tobytes()))
    float_uploads = [u for u in uploads if u.dtype.kind == "f"]
    assert len(float_uploads) == 1 and np.array_equal(float_uploads[0], weights.astype(np.float32))
    assert results[0] == results[1] and results[2] == results[3]


@pytest.mark.parametrize("shape", [(5, 4), (3, 4, 2)], ids=["rows", "spatial"])
def test_arguments_set_as_attributes_take_effect_on_every_path(place, shape):
    """svm.mode = "l2" kept l1's kernel on the GPU paths (its name was fixed at construction), and
    ce.weights = new is the next call's on every path (the GPU's copy of the old ones is not reused)."""
    scores, labels = gen_scores(rng_for("attributes", shape), shape, F32, margin=True)
    svm = SVM()
    svm(place.put(scores), place.put(labels))
    svm.mode = "l2"
    run_and_compare(place, svm, scores, labels, R.svm_ref(scores, labels, "l2"), F32)
    ce = CrossEntropy(weights=[1.0, 2.0, 3.0, 4.0])
    ce(place.put(scores), place.put(labels))
    ce.weights = [4.0, 0.5, 1.0, 2.0]
    run_and_compare(place, ce, scores, labels, R.ce_ref(scores, labels, np.array([4.0, 0.5, 1.0, 2.0])), F32)
