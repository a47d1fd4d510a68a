"""Abs, MSE, SmoothL1, BCE, Hinge and L1Hinge against the float64 references of
tests/cost_reference.py (which never imports the library), PuzzleLib's own unit tests
(Cost/*.py of PuzzleLib 1.0.2, adapted: our grad is always -dE/dpred), finite differences,
PyTorch, extreme and bad inputs, accumulators and bitwise determinism of the kernels."""
import math
import zlib
from dataclasses import dataclass
from typing import Callable

import numpy as np
import pytest

from puzzlelib_cost import BCE, Abs, CostError, Hinge, L1Hinge, MSE, SmoothL1, gpuarray

import cost_reference as R

F16, F32, F64, BF16 = R.F16, R.F32, R.F64, R.BF16


# ------------------------------------------------------------------ inputs per cost

def _away(x, kinks, margin):
    """x with every element within margin of a kink moved 4*margin away from it."""
    x = np.array(x, dtype=np.float64)
    for k in kinks:
        near = np.abs(x - k) < margin
        x[near] = k + np.where(x[near] >= k, 4 * margin, -4 * margin)
    return x


def gen_pair(rng, shape, dtype, scale=2.0, kinks=()):
    """pred, target of a float dtype; pred - target kept 1e-3 away from the kinks (the branch of
    a float32 difference then cannot differ from the float64 reference's)."""
    pred = (rng.standard_normal(shape) * scale).astype(dtype)
    d = _away(rng.standard_normal(shape) * scale, kinks, 1e-3)
    target = (pred.astype(np.float64) - d).astype(dtype)
    flat_p, flat_t = pred.reshape(-1), target.reshape(-1)
    flat_t[::7] = flat_p[::7]                  # exact ties: sign(0) = 0
    return pred, target


def gen_bce(rng, shape, dtype, label_dtype=np.int32):
    scores = (rng.standard_normal(shape) * 3).astype(dtype)
    lshape = (shape[0],) if len(shape) == 2 and shape[1] == 1 else shape
    labels = rng.integers(0, 2, size=lshape).astype(label_dtype)
    scores.reshape(-1)[::11] = 0               # s = 0 counts as "predicted 0" in validate
    return scores, labels


def gen_hinge(rng, shape, dtype, label_dtype=np.int32):
    scores = _away(rng.standard_normal(shape) * 2, (-1.0, 1.0), 1e-3).astype(dtype)
    low = -1 if np.issubdtype(label_dtype, np.signedinteger) else 0
    labels = rng.integers(low, 2, size=shape).astype(label_dtype)
    return scores, labels


def gen_l1hinge(rng, shape, dtype, label_dtype=np.int32):
    """[x1, x2], labels; |d| and each sample's mean |d| kept away from 1 (and ties d = 0 in)."""
    while True:
        x1 = (rng.standard_normal(shape) * 1.5).astype(dtype)
        d = _away(rng.standard_normal(shape) * 1.2, (-1.0, 1.0), 1e-3)
        x2 = (x1.astype(np.float64) - d).astype(dtype)
        x2.reshape(-1)[::9] = x1.reshape(-1)[::9]
        dd = np.abs(x1.astype(np.float64) - x2.astype(np.float64))
        x2[np.abs(dd - 1) < 1e-6] = x1[np.abs(dd - 1) < 1e-6]     # the cast landed on the kink: tie
        dd = np.abs(x1.astype(np.float64) - x2.astype(np.float64)).reshape(shape[0], -1)
        if np.all(np.abs(dd.mean(axis=1) - 1) > 1e-3):
            break
    labels = rng.integers(0, 2, size=shape[0]).astype(label_dtype)
    return [x1, x2], labels


@dataclass
class Case:
    make: Callable
    gen: Callable                  # (rng, shape, dtype) -> (pred, target)
    ref: Callable                  # (pred, target) -> reference dict
    shapes: list                   # for the reference grid
    big: tuple                     # M ~ 70000: several blocks, for the determinism test
    labelled: bool = False


SHAPES = [(1, 1), (3, 5), (7, 13), (2, 3, 5, 7), (4, 1, 9, 11), (6, 3333)]
CASES = {
    "Abs": Case(Abs, lambda r, s, d: gen_pair(r, s, d), R.abs_ref, SHAPES, (70, 1001)),
    "MSE": Case(MSE, lambda r, s, d: gen_pair(r, s, d), R.mse_ref, SHAPES, (70, 1001)),
    "SmoothL1": Case(SmoothL1, lambda r, s, d: gen_pair(r, s, d, 1.5, (-1.0, 1.0)), R.smoothl1_ref,
                     SHAPES, (70, 1001)),
    "BCE": Case(BCE, gen_bce, R.bce_ref, [(1, 1), (9, 1), (5, 7), (3, 2, 5, 7), (4, 1, 6, 9), (6000, 1),
                                          (2, 3, 59, 57)], (70, 1001), True),
    "Hinge": Case(Hinge, gen_hinge, R.hinge_ref, [(1, 1), (20, 4), (7, 13), (1, 37), (50, 397)],
                  (70, 1001), True),
    "L1Hinge": Case(L1Hinge, gen_l1hinge, lambda p, t: R.l1hinge_ref(p[0], p[1], t),
                    [(1, 1), (20, 4), (7, 13), (3, 2, 5, 7), (2, 1, 4, 1), (5, 3999)], (70, 1001), True),
}
NAMES = list(CASES)
GRID = [(n, s) for n in NAMES for s in CASES[n].shapes]
DTYPES = [pytest.param(d, id=str(d)) for d in R.FLOAT_DTYPES]


def rng_for(*key):
    return np.random.default_rng(zlib.crc32(repr(key).encode()))   # the same data in every process


def as_list(x):
    return list(x) if isinstance(x, (list, tuple)) else [x]


def run_and_compare(place, cost, pred, target, ref, dtype, validate=True):
    """One call on place; error, grad (dtype, shape, array kind) and validate against ref."""
    dpred, dtarget = place.put(pred), place.put(target)
    error, grad = cost(dpred, dtarget)
    R.assert_error_close(error, ref, dtype)
    if place.device is not None:
        assert place.device.launches, "no kernel ran on the emulated device"
    for g, p in zip(as_list(grad), as_list(dpred)):
        assert type(g) is type(p), f"grad is a {type(g).__name__}, pred a {type(p).__name__}"
    for g, want in zip(as_list(place.get(grad)), as_list(ref["grad"])):
        R.assert_grad_close(g, want, dtype)
    if validate:
        R.assert_error_close(cost.validate(dpred, dtarget), ref, dtype, what="val")
    return error, grad


# ------------------------------------------------------------------ PuzzleLib's unit tests, adapted

def host(x):
    return [host(a) for a in x] if isinstance(x, list) else (x.get() if hasattr(x, "get") else np.asarray(x))


def randn32(rng, *shape):
    return gpuarray.to_gpu(rng.standard_normal(shape).astype(np.float32))


@pytest.mark.parametrize("cost_cls,formula", [
    (Abs, lambda p, t: np.linalg.norm((t - p).ravel(), ord=1) / t.size),
    (MSE, lambda p, t: np.linalg.norm(t - p) ** 2 / (2.0 * t.size)),
    (SmoothL1, lambda p, t: np.mean((np.abs(p - t) >= 1) * (np.abs(p - t) - 0.5) + (np.abs(p - t) < 1) * (p - t) ** 2 / 2)),
], ids=["Abs", "MSE", "SmoothL1"])
def test_puzzlelib_errorTest_and_valTest(cost_cls, formula):
    rng = np.random.default_rng(1)
    pred, target = randn32(rng, 10, 10), randn32(rng, 10, 10)
    cost = cost_cls()
    cost(pred, target)
    assert np.isclose(cost.error, formula(host(pred), host(target)))
    pred, target = randn32(rng, 10, 10), randn32(rng, 10, 10)
    assert np.isclose(cost_cls().validate(pred, target), formula(host(pred), host(target)))


def test_puzzlelib_smoothl1_grad_with_sign_fixed():
    rng = np.random.default_rng(2)
    pred, target = randn32(rng, 10, 10), randn32(rng, 10, 10)
    cost = SmoothL1()
    cost(pred, target)
    d = host(pred) - host(target)
    puzzlelib_grad = ((np.abs(d) >= 1.0) * np.sign(d) + (np.abs(d) < 1.0) * d) / d.size   # +dE/dpred
    assert np.allclose(-puzzlelib_grad, host(cost.grad))


def test_puzzlelib_bce_errorTest():
    # PuzzleLib passes labels (20, 4, 4) with scores (20, 1, 4, 4): same D, other shape
    rng = np.random.default_rng(3)
    scores = gpuarray.to_gpu(rng.standard_normal((20, 1, 4, 4)).astype(np.float32))
    labels = gpuarray.to_gpu(rng.integers(0, 2, size=(20, 4, 4)).astype(np.int32))
    error, grad = BCE()(scores, labels)
    sig = 1.0 / (1.0 + np.exp(-host(scores)))
    y = host(labels).reshape(sig.shape)
    assert np.allclose((y - sig) / sig.size, host(grad))
    assert np.isclose(-np.sum(y * np.log(sig) + (1 - y) * np.log(1 - sig)) / sig.size, error)


def test_puzzlelib_bce_valTest():
    scores = gpuarray.to_gpu(np.array([[-1.0]] * 500 + [[1.0]] * 500, dtype=np.float32))
    labels = gpuarray.to_gpu(np.array([0] * 490 + [1] * 510, dtype=np.int32))
    error = BCE().validate(scores, labels)
    expected = np.sum(np.equal(host(scores) <= 0.0, host(labels)[:, None]), axis=0) / 1000
    assert np.isclose(error, expected) and np.isclose(error, 0.01)


def test_puzzlelib_hinge_errorValTest():
    rng = np.random.default_rng(4)
    n, c = 20, 4
    scores = randn32(rng, n, c)
    labels = gpuarray.to_gpu((rng.integers(0, 2, size=(n, c)) * 2 - 1).astype(np.int32))
    hinge = Hinge()
    error, grad = hinge(scores, labels)
    s, y = host(scores), host(labels)
    val = s * y
    assert np.allclose(np.where(val < 1, y / n / c, 0.0), host(grad))
    host_error = np.maximum(0, 1 - val).sum() / n / c
    assert np.isclose(host_error, error)
    assert np.isclose(host_error, hinge.validate(scores, labels))


def test_puzzlelib_l1hinge_errorTest_with_sign_fixed():
    rng = np.random.default_rng(5)
    n, size = 20, 4
    x1, x2 = randn32(rng, n, size), randn32(rng, n, size)
    labels = gpuarray.to_gpu(rng.integers(0, 2, size=n).astype(np.int32))
    error, (g1, g2) = L1Hinge()([x1, x2], labels)
    d = host(x1) - host(x2)
    sign = np.where(d > 0, 1.0, -1.0)
    y = host(labels)[:, None] == 1
    pl_g1 = np.where(y, sign, np.where(np.abs(d) < 1, -sign, 0.0)) / n / size     # PuzzleLib: +dE/dx1
    assert np.allclose(-pl_g1, host(g1)) and np.allclose(pl_g1, host(g2))
    assert np.isclose(np.where(y, np.abs(d), np.maximum(0, 1 - np.abs(d))).sum() / n / size, error)


def test_puzzlelib_l1hinge_valTest():
    rng = np.random.default_rng(6)
    n, size = 20, 4
    x1, x2 = randn32(rng, n, size), randn32(rng, n, size)
    labels = gpuarray.to_gpu(rng.integers(0, 2, size=n).astype(np.int32))
    error = L1Hinge().validate([x1, x2], labels)
    dist = np.linalg.norm(host(x1) - host(x2), axis=1, ord=1) / size
    assert np.isclose(np.sum((dist <= 1.0) != host(labels)) / n, error)


@pytest.mark.parametrize("name,pred,labels", [
    ("BCE", np.zeros((20, 1), np.float32), np.array([0, 1, 2] * 6 + [0, 1], np.int32)),
    ("Hinge", np.zeros((20, 4), np.float32), np.tile(np.array([-2, -1, 0, 1, 2], np.int32), 16).reshape(20, 4)),
    ("L1Hinge", [np.zeros((20, 4), np.float32)] * 2, np.tile(np.array([-1, 0, 1, 2], np.int32), 20).reshape(20, 4)),
])
def test_puzzlelib_verifyLabelsTest(name, pred, labels):
    with pytest.raises(CostError) as info:
        CASES[name].make()(pred, labels)
    print("Caught labels verification error: %s" % info.value)


# ------------------------------------------------------------------ the references themselves

def test_reference_closed_forms():
    p, t = np.array([[0.5, -2.0, 3.0, 1.0]]), np.array([[0.0, 0.0, 0.0, 1.0]])
    assert R.abs_ref(p, t)["error"] == 5.5 / 4
    np.testing.assert_array_equal(R.abs_ref(p, t)["grad"], [[-0.25, 0.25, -0.25, 0.0]])
    assert R.smoothl1_ref(p, t)["error"] == (0.125 + 1.5 + 2.5 + 0) / 4
    assert R.bce_ref(np.array([[0.0]]), np.array([1]))["error"] == pytest.approx(math.log(2), rel=1e-15)
    assert R.bce_ref(np.array([[1e4], [-1e4]]), np.array([0, 0]))["error"] == 5e3
    r = R.l1hinge_ref(np.array([[0.25, 3.0]]), np.array([[0.0, 0.0]]), np.array([0]))
    assert r["error"] == 0.75 / 2 and r["val"] == 0.0   # mean |d| = 1.625 > 1: "different", right
    np.testing.assert_array_equal(r["grad"][0], [[0.5, 0.0]])


@pytest.mark.parametrize("name", NAMES)
def test_reference_grad_is_minus_fd_of_reference_error(name):
    case = CASES[name]
    pred, target = case.gen(rng_for(name, "fdref"), (3, 5), F64)
    ref = case.ref(pred, target)
    for k, x in enumerate(as_list(pred)):
        def f(v):
            preds = [v if j == k else y for j, y in enumerate(as_list(pred))]
            return case.ref(preds if isinstance(pred, list) else v, target)["error"]
        fd = R.finite_difference(f, x, range(x.size))
        np.testing.assert_allclose(as_list(ref["grad"])[k].reshape(-1), -fd, atol=1e-8)


# ------------------------------------------------------------------ the grid: place x shape x dtype

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name,shape", GRID, ids=[f"{n}-{'x'.join(map(str, s))}" for n, s in GRID])
def test_matches_reference(place, name, shape, dtype):
    if place.name != "numpy" and np.prod(shape) > 10000 and dtype not in (F32, BF16):
        pytest.skip("large shapes run in the emulation for float32 and bfloat16 only")
    case = CASES[name]
    pred, target = case.gen(rng_for(name, shape, str(dtype)), shape, dtype)
    run_and_compare(place, case.make(), pred, target, case.ref(pred, target), dtype)


@pytest.mark.parametrize("label_dtype", R.INT_DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("name", [n for n in NAMES if CASES[n].labelled])
def test_any_integer_label_dtype(place, name, label_dtype):
    case = CASES[name]
    pred, labels = case.gen(rng_for(name, "labels"), (6, 5), F32, label_dtype=label_dtype)
    run_and_compare(place, case.make(), pred, labels, case.ref(pred, labels), F32)


@pytest.mark.parametrize("name", ["BCE", "L1Hinge"])
def test_bool_labels_are_their_0s_and_1s(place, name):
    """BCE's and L1Hinge's labels are {0, 1}, so a bool mask is a set of labels: each backend
    gives the reference of its 0s and 1s (the same as integer labels)."""
    case = CASES[name]
    pred, labels = case.gen(rng_for(name, "bool"), (6, 5), F32)
    mask = labels.astype(bool)
    assert mask.any() and not mask.all()
    run_and_compare(place, case.make(), pred, mask, case.ref(pred, mask.astype(np.int64)), F32)
    # A mask made by viewing bytes (a 0/255 image mask): its Trues are bytes other than 1.
    viewed = (labels.astype(np.uint8) * np.uint8(255)).view(bool)
    run_and_compare(place, case.make(), pred, viewed, case.ref(pred, mask.astype(np.int64)), F32)


@pytest.mark.parametrize("name", NAMES)
def test_query_error_false_returns_the_same_grad(place, name):
    case = CASES[name]
    pred, target = case.gen(rng_for(name, "q"), (4, 7), F32)
    dpred, dtarget = place.put(pred), place.put(target)
    _, grad = case.make()(dpred, dtarget)
    cost = case.make()
    grad2 = cost(dpred, dtarget, queryError=False)
    assert not isinstance(grad2, tuple)
    for a, b in zip(as_list(place.get(grad)), as_list(place.get(grad2))):
        assert a.tobytes() == b.tobytes()
    assert cost.numOfSamples == 4


@pytest.mark.parametrize("name", NAMES)
def test_mean_error_is_sample_weighted_and_validate_leaves_it(place, name):
    case = CASES[name]
    cost, total, count = case.make(), 0.0, 0
    for n, scale in ((3, 0.3), (5, 1.0), (1, 3.0)):
        pred, target = case.gen(rng_for(name, n), (n, 6), F64)
        pred = [x * scale for x in pred] if isinstance(pred, list) else pred * scale
        error, _ = cost(place.put(pred), place.put(target))
        total, count = total + case.ref(pred, target)["error"] * n, count + n
        assert cost.batchsize == n and cost.numOfSamples == count
        assert cost.getError() == error
        assert cost.getMeanError() == pytest.approx(total / count, rel=1e-12)
    mean = cost.getMeanError()
    cost.validate(place.put(pred), place.put(target))
    assert cost.numOfSamples == count and cost.getMeanError() == mean
    cost.resetAccumulator()
    assert cost.numOfSamples == 0


# ------------------------------------------------------------------ finite differences and PyTorch

@pytest.mark.parametrize("name", NAMES)
def test_grad_is_minus_central_difference_of_error(name):
    case = CASES[name]
    pred, target = case.gen(rng_for(name, "fd"), (4, 9), F64)
    _, grad = case.make()(pred, target)
    for k, x in enumerate(as_list(pred)):
        def f(v):
            preds = [v if j == k else y for j, y in enumerate(as_list(pred))]
            return case.make()(preds if isinstance(pred, list) else v, target)[0]
        idx = [0, 5, 17, 22, 35]
        fd = R.finite_difference(f, x, idx)
        g = as_list(grad)[k].reshape(-1)[idx]
        np.testing.assert_allclose(g, -fd, rtol=0, atol=1e-7 * np.abs(as_list(grad)[k]).max())


def _torch_losses(torch, name, p, t):
    F = torch.nn.functional
    if name == "Abs":
        return F.l1_loss(p[0], t)
    if name == "MSE":
        return F.mse_loss(p[0], t) / 2
    if name == "SmoothL1":
        return F.smooth_l1_loss(p[0], t, beta=1.0)
    if name == "BCE":
        return F.binary_cross_entropy_with_logits(p[0], t.reshape(p[0].shape))
    if name == "Hinge":
        return torch.clamp(1 - p[0] * t, min=0).mean()
    y = t[:, None]
    d = (p[0] - p[1]).reshape(p[0].shape[0], -1).abs()
    return (y * d + (1 - y) * torch.clamp(1 - d, min=0)).mean()


@pytest.mark.parametrize("shape", [(6, 9), (3, 2, 4, 5)])
@pytest.mark.parametrize("name", NAMES)
def test_torch_oracle(name, shape):
    torch = pytest.importorskip("torch")
    if name == "Hinge" and len(shape) > 2:
        pytest.skip("Hinge takes 2-D scores only")
    case = CASES[name]
    pred, target = case.gen(rng_for(name, "torch", shape), shape, F64)
    tp = [torch.tensor(x, requires_grad=True) for x in as_list(pred)]
    loss = _torch_losses(torch, name, tp, torch.tensor(target.astype(np.float64)))
    loss.backward()
    error, grad = case.make()(pred, target)
    assert error == pytest.approx(loss.item(), rel=1e-12, abs=1e-15)
    for g, t in zip(as_list(grad), tp):
        np.testing.assert_allclose(g, -t.grad.numpy(), rtol=1e-12, atol=1e-15)


# ------------------------------------------------------------------ extreme inputs

@pytest.mark.parametrize("dtype", [F32, F64], ids=str)
def test_bce_logits_1e4_are_finite(place, dtype):
    scores = np.array([[1e4], [-1e4], [1e4], [-1e4], [0.0]], dtype)
    labels = np.array([0, 1, 1, 0, 1], np.int64)
    error, grad = run_and_compare(place, BCE(), scores, labels, R.bce_ref(scores, labels), dtype)
    assert error == pytest.approx(2e4 / 5 + math.log(2) / 5, rel=1e-6)
    assert np.all(np.isfinite(place.get(grad)))


@pytest.mark.parametrize("dtype", [F32, F64], ids=str)
def test_bce_grad_of_a_confident_right_logit_keeps_its_digits(place, dtype):
    """y - sigmoid(s) for a logit on y's side is sigmoid(-|s|): small, and exact to the output's
    rounding, never 1 - sigmoid(s) (float32 kept 3 digits at s = 10 and gave 0 from 17 on; float64
    loses digits from about 30).  The reference is sigmoid(-|s|) = e / (1 + e), e = exp(-|s|)."""
    scores = np.array([[10.0], [17.0], [30.0], [-17.0], [-60.0], [0.5]], dtype)
    labels = np.array([1, 1, 1, 0, 0, 1], np.int64)
    e = np.exp(-np.abs(scores[:, 0].astype(np.float64)))
    expected = np.where(labels == 1, 1.0, -1.0) * e / (1 + e) / len(labels)
    _, grad = BCE()(place.put(scores), place.put(labels))
    eps = np.finfo(dtype).eps
    np.testing.assert_allclose(place.get(grad)[:, 0].astype(np.float64), expected, rtol=8 * eps, atol=0)


@pytest.mark.parametrize("dtype", [F32, F64, F16], ids=str)
def test_bce_infinite_logits_take_their_limits(place, dtype):
    # per element: max(s,0) - s*y + log1p(exp(-|s|)) -> 0 where the sign agrees with y, +inf where not;
    # grad (y - sigmoid(s))/M -> 0 or +-1/M
    scores = np.array([[np.inf], [-np.inf], [np.inf], [-np.inf], [0.0]], dtype)
    agree = np.array([1, 0, 1, 0, 1], np.int32)
    dscores = place.put(scores)
    error, grad = BCE()(dscores, place.put(agree))
    assert error == pytest.approx(math.log(2) / 5, rel=1e-6)
    np.testing.assert_allclose(place.get(grad)[:, 0].astype(np.float64), [0, 0, 0, 0, 0.1], rtol=1e-3, atol=0)
    disagree = np.array([0, 1, 1, 0, 1], np.int32)
    error, grad = BCE()(dscores, place.put(disagree))
    assert error == math.inf
    np.testing.assert_allclose(place.get(grad)[:, 0].astype(np.float64), [-0.2, 0.2, 0, 0, 0.1], rtol=1e-3)
    assert BCE().validate(dscores, place.put(disagree)) == pytest.approx(3 / 5, abs=1e-15)


@pytest.mark.parametrize("dtype", [F32, F64], ids=str)
def test_hinge_huge_scores(place, dtype):
    scores = np.array([[1e4, -1e4, 1e30], [-1e30, 0.5, 1e4]], dtype)
    labels = np.array([[1, 1, -1], [-1, 0, -1]], np.int8)
    run_and_compare(place, Hinge(), scores, labels, R.hinge_ref(scores, labels), dtype)


@pytest.mark.parametrize("name", ["mse", "bce"])
def test_float32_terms_whose_sum_overflows_float32(place, name):
    """Terms that fit float32 but whose sum does not (MSE's d^2 = 1e38, BCE's softplus(3e38)): the
    error is their float64 sum, finite, on every backend (a float32 partial sum of a few was inf)."""
    shape = (8, 16)   # (128 elements: the NumPy blocks' folded sum, and several GPU vectors a thread)
    if name == "mse":
        pred, target = np.full(shape, 1e19, F32), np.zeros(shape, F32)
        run_and_compare(place, MSE(), pred, target, R.mse_ref(pred, target), F32)
    else:
        scores, labels = np.full(shape, 3e38, F32), np.zeros(shape, np.int32)
        run_and_compare(place, BCE(), scores, labels, R.bce_ref(scores, labels), F32)


@pytest.mark.parametrize("dtype", [F32, BF16], ids=str)
@pytest.mark.parametrize("name", ["Abs", "MSE", "SmoothL1", "L1Hinge"])
def test_differences_past_floats_range_give_finite_error_and_grad(place, name, dtype):
    """pred - target of two finite values near the top of float32's range (and bfloat16's, the
    same) passes it, and d^2 does from |d| = 1.8e19: E (a float64) and grad (d / M, within range)
    are finite numbers, taken in float64 on every path.  They were inf (float32 differences)."""
    top = 3.3e38
    a = np.array([[top, 1e20, -1.0, 0.5], [2e19, -top, 3.0, -1e-3]]).astype(dtype)
    b = np.array([[-top, -1e20, 1.0, 0.25], [-2e19, top, 3.0, 1e-3]]).astype(dtype)
    if name == "L1Hinge":
        pred, target = [a, b], np.array([1, 0], np.int32)
    else:
        pred, target = a, b
    ref = CASES[name].ref(pred, target)
    assert math.isfinite(ref["error"]) and all(np.isfinite(g).all() for g in as_list(ref["grad"]))
    run_and_compare(place, CASES[name].make(), pred, target, ref, dtype)


@pytest.mark.parametrize("where", ["pred", "target"])
@pytest.mark.parametrize("dtype", [F32, F64, F16], ids=str)
@pytest.mark.parametrize("name", NAMES)
def test_nan_in_gives_nan_error_and_nan_grad_there(place, name, dtype, where):
    case = CASES[name]
    pred, target = case.gen(rng_for(name, "nan"), (3, 8), dtype)
    if where == "target":
        if case.labelled:
            pytest.skip("integer labels hold no NaN")
        target[1, 3] = np.nan
    else:
        for x in as_list(pred)[:1]:
            x[1, 3] = np.nan
    dpred, dtarget = place.put(pred), place.put(target)
    error, grad = case.make()(dpred, dtarget)
    assert math.isnan(error)
    for g, want in zip(as_list(place.get(grad)), as_list(case.ref(pred, target)["grad"])):
        assert np.isnan(g[1, 3]), "the grad where the NaN went in is not NaN"
        R.assert_grad_close(g, want, dtype)


@pytest.mark.parametrize("name", ["Abs", "MSE", "SmoothL1", "Hinge"])
def test_nan_validate_is_nan(place, name):
    case = CASES[name]
    pred, target = case.gen(rng_for(name, "nanval"), (3, 8), F32)
    pred[2, 0] = np.nan
    assert math.isnan(case.make().validate(place.put(pred), place.put(target)))


# ------------------------------------------------------------------ bad inputs

def z(shape, dtype=np.float32):
    return np.zeros(shape, dtype)


def lab(values, dtype=np.int64):
    return np.array(values, dtype)


BAD = [
    # (id, cost name, pred, target, substrings the message must contain)
    ("abs_dtype_mismatch", "Abs", z((3, 4)), z((3, 4), np.float64), ["float32", "float64"]),
    ("abs_shape_mismatch", "Abs", z((3, 4)), z((3, 5)), ["4", "5"]),
    ("abs_batch_mismatch", "Abs", z((3, 4)), z((2, 4)), ["3", "2"]),
    ("abs_int_pred", "Abs", np.zeros((3, 4), np.int32), np.zeros((3, 4), np.int32), ["int32"]),
    ("mse_int_target", "MSE", z((3, 4)), np.zeros((3, 4), np.int64), ["int64"]),
    ("mse_shape_mismatch_4d", "MSE", z((2, 3, 4, 5)), z((2, 3, 5, 4)), []),
    ("smoothl1_dtype_mismatch", "SmoothL1", z((3, 4), np.float16), z((3, 4)), ["float16", "float32"]),
    ("bce_label_2_at_3", "BCE", z((6, 1)), lab([0, 1, 0, 2, 1, 3]), ["2", "at index 3"]),
    ("bce_label_minus1", "BCE", z((6, 1)), lab([0, 1, 0, 1, -1, 1], np.int8), ["-1", "at index 4"]),
    ("bce_float_labels", "BCE", z((6, 1)), z(6), ["integer or bool labels", "float32"]),
    ("bce_labels_wrong_size", "BCE", z((6, 1)), lab([0, 1, 0]), ["6", "3"]),
    ("bce_spatial_labels_wrong_size", "BCE", z((2, 3, 4)), np.zeros((2, 3, 5), np.int32), []),
    ("hinge_label_2", "Hinge", z((3, 4)), lab([[0, 1, -1, 1], [1, 2, 0, 0], [1, 1, 1, 1]]), ["2", "at index (1, 1)"]),
    ("hinge_label_minus2", "Hinge", z((3, 4)), lab([[0, 1, -1, 1], [1, 1, 0, -2], [1, 1, 1, 1]]),
     ["-2", "at index (1, 3)"]),
    ("hinge_3d_pred", "Hinge", z((3, 4, 2)), np.zeros((3, 4, 2), np.int32), ["3"]),
    ("hinge_label_shape", "Hinge", z((3, 4)), np.zeros((3, 5), np.int32), ["4", "5"]),
    ("hinge_float_labels", "Hinge", z((3, 4)), z((3, 4)), ["float32"]),
    # (a bool is 0 or 1: Hinge's -1 has no bool, so a mask is not its labels)
    ("hinge_bool_labels", "Hinge", z((3, 4)), np.ones((3, 4), bool), ["expected integer labels", "bool"]),
    ("l1hinge_one_array", "L1Hinge", z((3, 4)), lab([0, 1, 1]), []),
    ("l1hinge_three_arrays", "L1Hinge", [z((3, 4))] * 3, lab([0, 1, 1]), ["3"]),
    ("l1hinge_shape_mismatch", "L1Hinge", [z((3, 4)), z((3, 5))], lab([0, 1, 1]), ["4", "5"]),
    ("l1hinge_dtype_mismatch", "L1Hinge", [z((3, 4)), z((3, 4), np.float64)], lab([0, 1, 1]),
     ["float32", "float64"]),
    ("l1hinge_label_2_at_3", "L1Hinge", [z((5, 4))] * 2, lab([0, 1, 1, 2, 0]), ["2", "at index 3"]),
    ("l1hinge_labels_per_element", "L1Hinge", [z((3, 4))] * 2, np.zeros((3, 4), np.int32), []),
    ("l1hinge_float_labels", "L1Hinge", [z((3, 4))] * 2, z(3), ["float32"]),
]


def _good_state(place, name):
    case = CASES[name]
    cost = case.make()
    pred, target = case.gen(rng_for(name, "good"), (3, 4), F32)
    cost(place.put(pred), place.put(target))
    return cost, (cost.numOfSamples, cost.batchsize, cost.getError(), cost.getMeanError())


@pytest.mark.parametrize("call", ["call", "validate"])
@pytest.mark.parametrize("bad_id,name,pred,target,must", BAD, ids=[b[0] for b in BAD])
def test_bad_input_raises_cost_error_and_keeps_state(place, bad_id, name, pred, target, must, call):
    cost, before = _good_state(place, name)
    with pytest.raises(CostError) as info:
        if call == "call":
            cost(place.put(pred), place.put(target))
        else:
            cost.validate(place.put(pred), place.put(target))
    msg = str(info.value)
    for s in must:
        assert s in msg, f"message {msg!r} does not mention {s!r}"
    assert (cost.numOfSamples, cost.batchsize, cost.getError(), cost.getMeanError()) == before


# ------------------------------------------------------------------ determinism of the kernels

@pytest.mark.parametrize("name", NAMES)
def test_bitwise_identical_in_every_thread_order(emulated_in_every_order, name):
    case = CASES[name]
    pred, target = case.gen(rng_for(name, "big"), case.big, F32)

    def once(place):
        cost = case.make()
        error, grad = cost(place.put(pred), place.put(target))
        return error, [g.tobytes() for g in as_list(place.get(grad))], cost.validate(place.put(pred),
                                                                                    place.put(target))
    results = emulated_in_every_order(once)
    assert all(r == results[0] for r in results[1:]), "results differ between thread orders"
    R.assert_error_close(results[0][0], case.ref(pred, target), F32)
