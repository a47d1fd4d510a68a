"""Multi (a list of costs, one pred and one target each) and the spec's examples of every cost.
PuzzleLib's Multi faults fixed: batch size per child from its own pred, children checked all
before any changes, list lengths checked."""
import math
import re
import zlib

import numpy as np
import pytest

from puzzlelib_cost import (BCE, Abs, CostError, CrossEntropy, Hinge, KLDivergence, L1Hinge, MSE, Multi, SVM,
                            SmoothL1, gpuarray)

import cost_reference as R


def host(x):
    return [host(a) for a in x] if isinstance(x, list) else (x.get() if hasattr(x, "get") else np.asarray(x))


def rng_for(*key):
    return np.random.default_rng(zlib.crc32(repr(key).encode()))   # the same data in every process


# ------------------------------------------------------------------ PuzzleLib's unit tests, adapted

def _pair():
    rng = np.random.default_rng(20)
    return (gpuarray.to_gpu(rng.standard_normal((10, 10)).astype(np.float32)),
            gpuarray.to_gpu(rng.standard_normal((10, 10)).astype(np.float32)))


def _host_errors(pred, target):
    p, t = host(pred), host(target)
    return {"MSE": np.linalg.norm(t - p) ** 2 / (2.0 * t.size), "Abs": np.linalg.norm((t - p).ravel(), ord=1) / t.size}


def test_puzzlelib_errorTest():
    pred, target = _pair()
    multi = Multi().append(MSE()).append(Abs())
    errors, grads = multi([pred, pred], [target, target])
    want = _host_errors(pred, target)
    assert np.isclose(multi.error[0], want["MSE"]) and np.isclose(multi.error[1], want["Abs"])   # (PuzzleLib's own)
    assert errors == multi.error == multi.getError() and len(grads) == 2


def test_a_call_resets_error_and_valError_as_a_cost_does():
    # PuzzleLib's __call__ resets error, valError and grad; the list of errors is multi.error once read
    pred, target = _pair()
    multi = Multi().append(MSE()).append(Abs())
    multi.validate([pred, pred], [target, target])
    assert multi.valError is not None
    multi([pred, pred], [target, target], queryError=False)
    assert multi.valError is None and multi.error is None
    assert multi.getError() == multi.error and len(multi.error) == 2


def test_puzzlelib_valTest():
    pred, target = _pair()
    error = Multi().append(Abs()).append(MSE()).validate([pred, pred], [target, target])
    want = _host_errors(pred, target)
    assert isinstance(error, list)
    assert np.isclose(error[0], want["Abs"]) and np.isclose(error[1], want["MSE"])


# ------------------------------------------------------------------ behaviour

def _mixed(rng, n_ce=4, n_pair=3):
    """A CE child (N=n_ce), an L1Hinge child (takes a list; N=n_pair) and an MSE child (N=n_ce+2)."""
    s = rng.standard_normal((n_ce, 5, 2, 3))
    y = rng.integers(0, 5, size=(n_ce, 2, 3)).astype(np.int32)
    x1, x2 = rng.standard_normal((n_pair, 7)), rng.standard_normal((n_pair, 7))
    pl = rng.integers(0, 2, size=n_pair).astype(np.int8)
    p, t = rng.standard_normal((n_ce + 2, 3)), rng.standard_normal((n_ce + 2, 3))
    preds, targets = [s, [x1, x2], p], [y, pl, t]
    refs = [R.ce_ref(s, y), R.l1hinge_ref(x1, x2, pl), R.mse_ref(p, t)]
    return preds, targets, refs, [n_ce, n_pair, n_ce + 2]


def _multi():
    return Multi().append(CrossEntropy()).append(L1Hinge()).append(MSE())


def test_append_returns_self():
    multi = Multi()
    assert multi.append(Abs()) is multi


def test_children_errors_grads_and_own_batch_sizes(place):
    preds, targets, refs, sizes = _mixed(rng_for("mixed"))
    multi = _multi()
    errors, grads = multi(place.put(preds), place.put(targets))
    assert isinstance(errors, list) and len(errors) == 3 and len(grads) == 3
    for error, grad, ref in zip(errors, place.get(grads), refs):
        R.assert_error_close(error, ref, np.float64)
        for g, want in zip(grad if isinstance(grad, list) else [grad], ref["grad"] if isinstance(ref["grad"], list)
                           else [ref["grad"]]):
            R.assert_grad_close(g, want, np.float64)
    assert [c.numOfSamples for c in multi.costs] == sizes
    assert [c.batchsize for c in multi.costs] == sizes
    val = multi.validate(place.put(preds), place.put(targets))
    assert isinstance(val, list) and len(val) == 3
    for v, ref in zip(val, refs):
        R.assert_error_close(v, ref, np.float64, what="val")


def test_query_error_false_returns_the_grads(place):
    preds, targets, _, _ = _mixed(rng_for("q"))
    _, grads = _multi()(place.put(preds), place.put(targets))
    grads2 = _multi()(place.put(preds), place.put(targets), queryError=False)
    assert isinstance(grads2, list) and len(grads2) == 3
    flat = lambda gs: [a for g in gs for a in (g if isinstance(g, list) else [g])]   # noqa: E731
    for a, b in zip(flat(place.get(grads)), flat(place.get(grads2))):
        assert a.tobytes() == b.tobytes()


def test_mean_error_over_two_calls_is_sample_weighted(place):
    multi = _multi()
    totals, counts = [0.0] * 3, [0] * 3
    for k, (n_ce, n_pair) in enumerate(((2, 5), (6, 1))):
        preds, targets, refs, sizes = _mixed(rng_for("mean", k), n_ce, n_pair)
        multi(place.put(preds), place.put(targets))
        for i in range(3):
            totals[i] += refs[i]["error"] * sizes[i]
            counts[i] += sizes[i]
    means = multi.getMeanError()
    assert isinstance(means, list)
    for m, tot, cnt in zip(means, totals, counts):
        assert m == pytest.approx(tot / cnt, rel=1e-12)
    multi.resetAccumulator()
    assert all(c.numOfSamples == 0 for c in multi.costs)


@pytest.mark.parametrize("bad", ["preds_short", "targets_long", "second_child_bad_label", "third_child_bad_shape",
                                 "first_child_bad_shape"])
@pytest.mark.parametrize("call", ["call", "validate"])
def test_bad_input_changes_no_child(place, bad, call):
    preds, targets, _, _ = _mixed(rng_for("bad"))
    multi = _multi()
    multi(place.put(preds), place.put(targets))
    before = [(c.numOfSamples, c.batchsize, c.getMeanError(), c.getError()) for c in multi.costs]
    mean_before = multi.getMeanError()
    preds2, targets2, _, _ = _mixed(rng_for("bad2"), 5, 2)
    if bad == "preds_short":
        preds2 = preds2[:2]
    elif bad == "targets_long":
        targets2 = targets2 + [targets2[0]]
    elif bad == "second_child_bad_label":
        targets2[1] = np.array([0, 3], np.int8)
    elif bad == "third_child_bad_shape":
        targets2[2] = targets2[2][:, :2]
    else:
        preds2[0] = preds2[0].astype(np.float32)[..., 0]
    # (a child's message says which child: its own says "pred" or "target", not which of the lists')
    child = {"second_child_bad_label": 1, "third_child_bad_shape": 2, "first_child_bad_shape": 0}.get(bad)
    names = [type(cost).__name__ for cost in multi.costs]
    with pytest.raises(CostError, match=None if child is None else
                       re.escape(f"Multi's cost {child} ({names[child]}, given pred[{child}] and target[{child}]): ")):
        if call == "call":
            multi(place.put(preds2), place.put(targets2))
        else:
            multi.validate(place.put(preds2), place.put(targets2))
    assert [(c.numOfSamples, c.batchsize, c.getMeanError(), c.getError()) for c in multi.costs] == before
    assert multi.getMeanError() == mean_before


def test_wrong_number_of_costs():
    preds, targets, _, _ = _mixed(rng_for("n"))
    with pytest.raises(CostError):
        Multi().append(CrossEntropy()).append(L1Hinge())(preds, targets)
    with pytest.raises(CostError):
        Multi()(preds, targets)


# ------------------------------------------------------------------ the spec's examples

def test_spec_examples_every_cost_on_small_data():
    rng = np.random.default_rng(30)
    p = rng.standard_normal((4, 3)).astype(np.float32)
    t = rng.standard_normal((4, 3)).astype(np.float32)
    for cost, ref in ((Abs(), R.abs_ref), (MSE(), R.mse_ref), (SmoothL1(), R.smoothl1_ref)):
        error, grad = cost(p, t)
        R.assert_error_close(error, ref(p, t), np.float32)
        R.assert_grad_close(grad, ref(p, t)["grad"], np.float32)

    logits, y01 = rng.standard_normal((4, 1)).astype(np.float32), np.array([0, 1, 1, 0], np.int32)
    error, grad = BCE()(logits, y01)
    R.assert_error_close(error, R.bce_ref(logits, y01), np.float32)
    assert BCE().validate(logits, y01) == R.bce_ref(logits, y01)["val"]

    pm = np.array([[1, -1, 0], [-1, 1, 1], [1, 1, -1], [0, 0, 1]], np.int32)
    R.assert_error_close(Hinge()(p, pm)[0], R.hinge_ref(p, pm), np.float32)

    error, (g1, g2) = L1Hinge()([p, t], y01)
    np.testing.assert_array_equal(g1, -g2)
    R.assert_error_close(error, R.l1hinge_ref(p, t, y01), np.float32)

    scores = rng.standard_normal((4, 3, 2, 2)).astype(np.float32)
    labels = rng.integers(0, 3, size=(4, 2, 2)).astype(np.int64)
    w = np.array([1.0, 2.0, 0.5], np.float32)
    for cost, ref in ((CrossEntropy(maxlabels=3, weights=w), R.ce_ref(scores, labels, w)),
                      (SVM(mode="l1"), R.svm_ref(scores, labels, "l1")), (SVM(mode="l2"), R.svm_ref(scores, labels, "l2"))):
        error, grad = cost(scores, labels)
        R.assert_error_close(error, ref, np.float32)
        R.assert_grad_close(grad, ref["grad"], np.float32)
        assert cost.validate(scores, labels) == ref["val"]

    kl_error, _ = KLDivergence(normTarget=True)(p, t)
    assert math.isfinite(kl_error) and kl_error >= 0

    multi = Multi().append(MSE()).append(CrossEntropy())
    errors, grads = multi([p, scores], [t, labels])
    assert len(errors) == 2 and len(grads) == 2
    assert multi.getMeanError() == pytest.approx(errors, rel=1e-12)


def test_a_multi_inside_a_multi_is_refused():
    with pytest.raises(CostError, match="expected a Cost other than Multi, got Multi"):
        Multi().append(Multi())


@pytest.mark.parametrize("make", [MSE, Abs, SmoothL1, BCE, Hinge])
def test_a_list_pred_to_a_single_input_cost_is_a_cost_error(make):
    x = np.zeros((2, 3), np.float32)
    with pytest.raises(CostError, match="pred: expected a numpy array or a CUDA array .*, got list"):
        make()([x], x)


def test_l1hinge_refuses_a_single_array():
    x = np.zeros((2, 3), np.float32)
    with pytest.raises(CostError, match=r"pred: expected a list of two arrays \[x1, x2\], got ndarray"):
        L1Hinge()(x, np.array([0, 1]))


@pytest.mark.parametrize("make", [CrossEntropy, lambda: SVM("l1")], ids=["ce", "svm"])
def test_most_prob_is_puzzlelibs_attribute_cleared_by_each_call(make):
    scores = np.array([[0.0, 2.0, 1.0], [3.0, 3.0, -1.0]], np.float32)
    labels = np.array([1, 2], np.int32)
    cost = make()
    assert cost.validate(gpuarray.to_gpu(scores), gpuarray.to_gpu(labels)) == 0.5
    assert np.array_equal(cost.mostProb.get(), [1, 0])   # .get() as in PuzzleLib, also without a GPU
    cost(gpuarray.to_gpu(scores), gpuarray.to_gpu(labels))
    assert cost.mostProb is None


def test_the_same_cost_object_twice_is_refused():
    mse = MSE()
    multi = Multi().append(mse)
    with pytest.raises(CostError, match="this MSE is already in the Multi; append a new instance"):
        multi.append(mse)
    assert multi.costs == [mse]


def test_a_subclass_s_hooks_take_part_as_in_puzzlelib():
    """PuzzleLib code weights a Multi's children by overriding calcGrad (and counts with
    updateState): the call went round both, so the override was never called."""
    class Weighted(Multi):
        counted = 0

        def calcGrad(self, pred, target):
            return [g * 0.25 for g in super().calcGrad(pred, target)]

        def updateState(self, samples):
            super().updateState(samples)
            self.counted += samples
    rng = np.random.default_rng(3)
    a, b = (rng.standard_normal((4, 3)).astype(np.float32) for _ in range(2))
    multi = Weighted().append(MSE())
    errors, grads = multi([a], [b])   # (the hooks' order is the same on every backend)
    np.testing.assert_allclose(grads[0], 0.25 * (b - a) / a.size, rtol=1e-6)
    assert multi.counted == 4 and multi.numOfSamples == 4 and multi.batchsize == 4


def test_repr_is_the_constructor_call():
    """repr() was object's default (<...KLDivergence object at 0x...>): a notebook showed nothing
    of a cost's configuration."""
    assert repr(MSE()) == "MSE()"
    assert repr(SVM("l2")) == "SVM(mode='l2')"
    kl = KLDivergence(normTarget=True, temperature=2.0, divergence="jsd", beta=0.3)
    assert repr(kl) == ("KLDivergence(maxlabels=None, normTarget=True, temperature=2.0, divergence='jsd', beta=0.3, "
                        "ignoreLabel=None, sparseTail='drop')")
    assert repr(CrossEntropy(weights=np.ones(3))) == "CrossEntropy(maxlabels=None, weights=<3 values>)"
    assert repr(Multi().append(MSE()).append(Abs())) == "Multi(costs=[MSE(), Abs()])"


def test_every_public_class_documents_its_constructors_arguments():
    """help(KLDivergence) showed nothing of its arguments: five public classes had no docstring."""
    import inspect
    import puzzlelib_cost
    for name in ("Abs", "BCE", "CTC", "Cost", "CrossEntropy", "Hinge", "KLDivergence", "L1Hinge", "MSE",
                 "Multi", "SVM", "SmoothL1"):
        cls = getattr(puzzlelib_cost, name)
        assert cls.__doc__, name
        for argument in list(inspect.signature(cls.__init__).parameters)[1:]:
            assert argument in cls.__doc__, (name, argument)
