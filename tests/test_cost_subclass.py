"""Costs written the PuzzleLib way run unchanged: a Cost subclass whose checkDataShape and
checkValDataShape check and return None (PuzzleLib's have one backend to return), a built-in cost
extended with checks of its own, and PuzzleLib's own updateState body in an override.  The
reference is the float64 sum of squares written here."""
import numpy as np
import pytest

from puzzlelib_cost import MSE, Cost, Multi


class Unchecked(Cost):
    """E = sum (pred - target)^2 / 2 / N, written as a PuzzleLib user would, on the CPU, and without
    checkDataShape (PuzzleLib's is a no-op)."""

    def calcGrad(self, pred, target):
        d = (target - pred).astype(np.float64)
        self.devErr[...] = (d * d).sum() / 2
        return (d / pred.shape[0]).astype(pred.dtype)

    def calcError(self, pred, target):
        self.accumErr[...] += self.devErr

    def calcVal(self, pred, target):
        return float(((target - pred).astype(np.float64) ** 2).sum() / 2 / pred.shape[0])


class HalfSquares(Unchecked):
    """The same with PuzzleLib's checks and its updateState."""

    def checkDataShape(self, pred, target):
        assert pred.shape == target.shape   # (PuzzleLib's checks: asserts, and no return value)

    def checkValDataShape(self, pred, target):
        assert pred.shape == target.shape

    def updateState(self, samples):   # PuzzleLib's Cost.updateState, verbatim
        self.batchsize = samples
        self.numOfSamples += samples


class CheckedMSE(MSE):
    """A built-in cost with a check of its own, PuzzleLib style: super()'s checks, then no return."""

    def checkDataShape(self, pred, target):
        super().checkDataShape(pred, target)
        if pred.shape[0] > 100:
            raise ValueError("too big")


def batches():
    rng = np.random.default_rng(4)
    return [(rng.standard_normal((n, 3)).astype(np.float32), rng.standard_normal((n, 3)).astype(np.float32))
            for n in (4, 2, 5)]


def half_squares(pred, target):
    return ((target.astype(np.float64) - pred) ** 2).sum() / 2


@pytest.mark.parametrize("make,scale", [(HalfSquares, 1.0), (CheckedMSE, None)], ids=["Cost", "MSE"])
def test_a_puzzlelib_style_cost_trains_and_validates(make, scale):
    """checkDataShape returning None: the inputs decide the backend (it was taken as the backend:
    TypeError or AttributeError); updateState overridden: getError divided by a count only the
    base updateState set (ZeroDivisionError after the work had run)."""
    cost = make()
    pred, target = batches()[0]
    expected_val = half_squares(pred, target) / (pred.shape[0] if scale else pred.size)
    assert cost.validate(pred, target) == pytest.approx(expected_val, rel=1e-6)   # (before any training call)
    total = samples = 0
    for pred, target in batches():
        error, grad = cost(pred, target)
        per = pred.shape[0] if scale else pred.size   # (HalfSquares / N; MSE / M)
        assert error == pytest.approx(half_squares(pred, target) / per, rel=1e-6)
        np.testing.assert_allclose(grad, (target.astype(np.float64) - pred) / per, rtol=1e-6)
        total, samples = total + half_squares(pred, target) / (1 if scale else 3), samples + pred.shape[0]
        assert cost.getMeanError() == pytest.approx(total / samples, rel=1e-6)
    assert cost.validate(*batches()[0]) == pytest.approx(expected_val, rel=1e-6)   # (and after)
    assert cost.numOfSamples == 11 and cost.getMeanError() == pytest.approx(total / samples, rel=1e-6)


def test_multi_of_puzzlelib_style_costs():
    multi = Multi().append(HalfSquares()).append(CheckedMSE())
    (p1, t1), (p2, t2) = batches()[:2]
    errors, grads = multi([p1, p2], [t1, t2])
    assert errors == pytest.approx([half_squares(p1, t1) / 4, half_squares(p2, t2) / p2.size], rel=1e-6)


def test_a_cost_without_checkDataShape_runs():
    # (Cost's hook raised NotImplementedError, for validate too)
    cost = Unchecked()
    pred, target = batches()[0]
    error, _ = cost(pred, target)
    assert error == pytest.approx(half_squares(pred, target) / pred.shape[0], rel=1e-6)
    assert cost.validate(pred, target) == pytest.approx(half_squares(pred, target) / pred.shape[0], rel=1e-6)


def _loose(base):
    class Loose(base):
        """PuzzleLib's own MSE.checkDataShape body: a check, no super(), no return."""
        def checkDataShape(self, pred, target):
            assert len(pred.shape) >= 1
    return Loose


def test_a_check_that_skips_super_still_gets_the_librarys_check_and_results(place):
    # (the library's checkDataShape keeps the checked inputs for calcGrad: an override that skipped
    # super() crashed with AttributeError (MSE) or TypeError (CrossEntropy))
    from puzzlelib_cost import CostError, CrossEntropy, KLDivergence
    rng = np.random.default_rng(7)
    pred = rng.standard_normal((6, 5)).astype(np.float32)
    target = rng.standard_normal((6, 5)).astype(np.float32)
    labels = rng.integers(0, 5, 6)
    probs = np.exp(target) / np.exp(target).sum(axis=1, keepdims=True)
    for base, t in ((MSE, target), (CrossEntropy, labels), (KLDivergence, probs)):
        loose, plain = _loose(base)(), base()
        got, want = loose(place.put(pred), place.put(t)), plain(place.put(pred), place.put(t))
        assert got[0] == want[0]
        np.testing.assert_array_equal(place.get(got[1]), place.get(want[1]))
        assert loose.validate(place.put(pred), place.put(t)) == plain.validate(place.put(pred), place.put(t))
        assert loose.getMeanError() == plain.getMeanError()
        with pytest.raises(CostError):   # (the library's checks still run, and leave the cost as it was)
            loose(place.put(pred), place.put(t[:3]))
        assert loose.numOfSamples == 6 and loose.getMeanError() == plain.getMeanError()


class CountedMSE(MSE):
    """calcError overridden, PuzzleLib style, around the library's: sees the batch error before it is
    added to the accumulator, and may adjust it."""
    def calcError(self, pred, target):
        self.seen.append(self._backend.read_scalar(self.devErr))
        super().calcError(pred, target)


def test_an_overridden_calcError_is_where_the_error_is_accumulated(place):
    # (the library's costs added devErr to accumErr in calcGrad's fused pass: a calcError that added
    # it again counted it twice, and one that adjusted devErr first was left out of getMeanError)
    from puzzlelib_cost import CrossEntropy
    cost = CountedMSE()
    cost.seen = []
    total = samples = 0
    for pred, target in batches():
        error, _ = cost(place.put(pred), place.put(target))
        total, samples = total + half_squares(pred, target) / 3, samples + pred.shape[0]
        assert cost.seen[-1] == pytest.approx(half_squares(pred, target) / 3, rel=1e-6)
        assert cost.getMeanError() == pytest.approx(total / samples, rel=1e-6)

    class SelfAccumulating(CrossEntropy):   # PuzzleLib's CrossEntropy.calcError body, verbatim
        def calcError(self, scores, labels):
            self.accumErr += self.devErr
    if place.name != "numpy":
        return   # (that body adds device scalars with its own arithmetic: on the CPU's here)
    ce = SelfAccumulating()
    pred = batches()[0][0]
    labels = np.array([0, 1, 2, 0])
    ce(pred, labels), ce(pred, labels)
    assert ce.getMeanError() == pytest.approx(ce.getError(), rel=1e-12)

    class Penalised(MSE):
        def calcError(self, pred, target):
            self.devErr += 0.5 * pred.shape[0]
            super().calcError(pred, target)
    penalised = Penalised()
    error, _ = penalised(*batches()[0])
    assert penalised.getMeanError() == pytest.approx(error, rel=1e-12)
    assert error == pytest.approx(MSE()(*batches()[0])[0] + 0.5, rel=1e-6)


def test_multi_getError_is_None_after_reset_once_read_and_a_call_leaves_it_dirty():
    from puzzlelib_cost import Abs
    (p, t), = batches()[:1]
    multi = Multi().append(MSE()).append(Abs())
    errors, _ = multi([p, p], [t, t])
    multi.reset()
    assert multi.getError() is None   # (the list was read from the children again)
    multi([p, p], [t, t], queryError=False)
    assert multi.dirty
    assert multi.getError() == pytest.approx(errors, rel=1e-12) and not multi.dirty


def _skipping_super_cases():
    from puzzlelib_cost import CrossEntropy, KLDivergence
    rng = np.random.default_rng(8)
    pred = rng.standard_normal((6, 5)).astype(np.float32)
    target = rng.standard_normal((6, 5)).astype(np.float32)
    probs = (np.exp(target) / np.exp(target).sum(axis=1, keepdims=True)).astype(np.float32)
    labels = rng.integers(0, 5, 6)
    bad_labels = labels.copy()
    bad_labels[3] = 7
    return pred, [(MSE, target, target[:3]), (CrossEntropy, labels, bad_labels), (KLDivergence, probs, probs[:, :4])]


def test_a_check_that_skips_super_refuses_bad_input_before_the_call_changes_anything(place):
    """The library's own check runs where the hook's would have: before the call's work, so a bad
    input leaves the last call's grad too (it ran late, in calcGrad, where _compute's clean-up let
    the grad go: None)."""
    from puzzlelib_cost import CostError
    pred, cases = _skipping_super_cases()
    for base, good, bad in cases:
        loose = _loose(base)()
        error, grad = loose(place.put(pred), place.put(good))
        for call in (loose, lambda p, t: loose(p, t, queryError=False)):
            with pytest.raises(CostError):
                call(place.put(pred), place.put(bad))
            assert loose.grad is grad, base.__name__
            assert (loose.getError(), loose.numOfSamples, loose.batchsize) == (error, 6, 6), base.__name__
        with pytest.raises(CostError):
            loose.validate(place.put(pred), place.put(bad))
        assert loose.__dict__.get("_batch") is None


def test_a_multi_checks_every_child_that_skips_super_before_any_child_computes(place):
    """Multi's promise (every child's inputs checked before any child computes) holds for children
    whose check skips super(): the first child's counters, error and grad stay as they were, the
    Multi's errors and grads too, and no child holds the failed call's inputs."""
    from puzzlelib_cost import CostError
    pred, cases = _skipping_super_cases()
    multi = Multi()
    for base, _, _ in cases:
        multi.append(_loose(base)())
    goods, bads = [good for _, good, _ in cases], [bad for _, _, bad in cases]
    for broken in range(1, len(cases)):
        errors, grads = multi([place.put(pred)] * 3, [place.put(t) for t in goods])
        counted = [(child.numOfSamples, child.getError(), child.grad) for child in multi.costs]
        targets = goods[:broken] + [bads[broken]] + goods[broken + 1:]
        with pytest.raises(CostError):
            multi([place.put(pred)] * 3, [place.put(t) for t in targets])
        assert [(child.numOfSamples, child.getError(), child.grad) for child in multi.costs] == counted
        assert multi.getError() == errors and multi.grad is grads
        assert all(child.__dict__.get("_batch") is None for child in multi.costs)
        with pytest.raises(CostError):
            multi.validate([place.put(pred)] * 3, [place.put(t) for t in targets])
        assert all(child.__dict__.get("_batch") is None for child in multi.costs)


def test_a_subclass_whose_calcGrad_hands_the_library_other_arrays_is_computed_on_those(place):
    """A subclass's calcGrad that adapts the call's inputs before super().calcGrad (a target
    rescaled, labels reshaped) gets the library's work, and its checks, on the arrays it hands
    over, whether its check hook calls super() or not (the checks kept for the call's own arrays
    were taken: MSE against the unscaled target; labels of shape (N, 1) refused)."""
    from puzzlelib_cost import CrossEntropy
    rng = np.random.default_rng(9)
    pred = rng.standard_normal((4, 3)).astype(np.float32)
    target = rng.standard_normal((4, 3)).astype(np.float32)
    labels = rng.integers(0, 3, (4, 1))

    def halving(check_calls_super):
        class HalfTarget(MSE):
            def checkDataShape(self, p, t):
                if check_calls_super:
                    return super().checkDataShape(p, t)
                assert p.shape == t.shape

            def calcGrad(self, p, t):
                return super().calcGrad(p, place.put(place.get(t) * np.float32(0.5)))
        return HalfTarget()

    class FlatLabels(CrossEntropy):
        def checkDataShape(self, p, t):
            assert p.shape[0] == t.shape[0]

        def calcGrad(self, p, t):
            return super().calcGrad(p, place.put(place.get(t).reshape(-1)))
    expected = ((target * np.float32(0.5)).astype(np.float64) - pred) ** 2 / 2
    for cost in (halving(True), halving(False)):
        error, grad = cost(place.put(pred), place.put(target))
        assert error == pytest.approx(expected.sum() / pred.size, rel=1e-6)
        assert cost.__dict__.get("_batch") is None
    logits = pred.astype(np.float64)
    log_q = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    error, _ = FlatLabels()(place.put(pred), place.put(labels))
    assert error == pytest.approx(-log_q[np.arange(4), labels[:, 0]].mean(), rel=1e-6)


def test_a_batch_a_call_left_is_never_another_calls(place):
    """A subclass with a calcGrad of its own (the library's calcVal kept) leaves the checked inputs
    behind it no more: a later validate() on other arrays computed on the training call's."""
    class OwnGrad(MSE):
        def checkDataShape(self, p, t):
            assert p.shape == t.shape

        def calcGrad(self, p, t):
            self._backend.write_scalar(self.devErr, 0.0)
            return t
    ones, zeros = np.ones((2, 3), np.float32), np.zeros((2, 3), np.float32)
    cost = OwnGrad()
    cost(place.put(ones * 4), place.put(zeros))
    assert cost.__dict__.get("_batch") is None
    assert cost.validate(place.put(zeros), place.put(zeros)) == 0.0


def test_a_multi_subclass_whose_check_skips_super_or_adds_one_of_its_own():
    """A Multi subclass whose checkDataShape skips super() still gets every child's checks before
    any child computes (it crashed with AttributeError: _batch); one whose check raises after
    super()'s leaves no child holding the refused call's inputs (the next call computed a child
    on them)."""
    from puzzlelib_cost import CostError
    ones, zeros = np.ones((2, 3), np.float32), np.zeros((2, 3), np.float32)

    class Loose(Multi):
        def checkDataShape(self, pred, target):
            assert len(pred) == len(target)

    class SameBatch(Multi):
        def checkDataShape(self, pred, target):
            super().checkDataShape(pred, target)
            if len({p.shape[0] for p in pred}) > 1:
                raise CostError("outputs of different batch sizes")
    loose = Loose().append(MSE()).append(_loose(MSE)())
    assert loose([ones, ones], [zeros, zeros])[0] == [0.5, 0.5]
    with pytest.raises(CostError):
        loose([ones, ones], [zeros, zeros[:1]])
    assert [child.numOfSamples for child in loose.costs] == [2, 2]
    same = SameBatch().append(_loose(MSE)()).append(MSE())
    with pytest.raises(CostError, match="batch sizes"):
        same([np.full((3, 3), 5, np.float32), ones], [np.zeros((3, 3), np.float32), zeros])
    assert all(child.__dict__.get("_batch") is None for child in same.costs)
    assert same([zeros, zeros], [zeros, zeros])[0] == [0.0, 0.0]


def test_a_hook_that_calls_its_own_cost_again_is_refused_and_changes_nothing():
    """The per-call lock is re-entrant on its thread (a Multi's hold, a Ctrl-C's leftover), but a
    call of a cost from inside its own call is a CostError (the outer call returned the inner
    one's grad, with the two batches' samples counted); a copy made inside a call is not in one."""
    import copy
    from puzzlelib_cost import CostError
    rng = np.random.default_rng(10)
    pred, target = rng.standard_normal((4, 3)).astype(np.float32), rng.standard_normal((4, 3)).astype(np.float32)
    copies = []

    class Recursive(MSE):
        again = False

        def calcError(self, p, t):
            super().calcError(p, t)
            copies.append(copy.copy(self))
            if self.again:
                self(p[:2], t[:2])
    cost = Recursive()
    error, grad = cost(pred, target)
    cost.again = True
    with pytest.raises(CostError, match="in a call already, on this thread"):
        cost(pred, target)
    assert cost.grad is None and cost.numOfSamples == 4 and cost.getError() == error
    cost.again = False
    assert cost(pred, target)[0] == error and cost.numOfSamples == 8
    assert copies[0](pred, target)[0] == error   # (the copy made inside a call)


def test_hooks_called_by_hand_check_the_arrays_they_are_given():
    """PuzzleLib code may call a cost's hooks itself: checkDataShape on one batch, then calcVal or
    calcGrad on another was computed on the first (the batch its check kept)."""
    from puzzlelib_cost import CrossEntropy
    rng = np.random.default_rng(11)
    p1, p2 = (rng.standard_normal((4, 3)).astype(np.float32) for _ in range(2))
    l1, l2 = rng.integers(0, 3, 4), rng.integers(0, 3, 4)
    cost = CrossEntropy()
    cost.checkDataShape(p1, l1)
    expected = CrossEntropy().validate(p2, l2)
    cost._bindBackend(cost._backend_for(None, p2, l2))
    assert cost.calcVal(p2, l2) == expected


def test_a_multi_subclass_that_computes_some_children_leaves_no_inputs_with_the_others():
    """A Multi subclass's calcGrad that computes only some of its children (a head switched off):
    the others, checked but not computed, keep no reference to the call's inputs."""
    class FirstOnly(Multi):
        def calcGrad(self, pred, target):
            return [self.costs[0]._compute(self._batch[0], pred[0], target[0]), None]
    ones, zeros = np.ones((2, 3), np.float32), np.zeros((2, 3), np.float32)
    multi = FirstOnly().append(MSE()).append(MSE())
    multi([ones, ones], [zeros, zeros], queryError=False)
    assert all(child.__dict__.get("_batch") is None for child in multi.costs)


def test_a_multi_subclasss_validation_check_runs_in_validate():
    """Multi.validate runs the Multi's checkValDataShape hook (a subclass's own check was passed
    over), before any child's work."""
    from puzzlelib_cost import CostError
    ones, zeros = np.ones((2, 3), np.float32), np.zeros((2, 3), np.float32)

    class SameBatch(Multi):
        def checkValDataShape(self, pred, target):
            super().checkValDataShape(pred, target)
            if len({p.shape[0] for p in pred}) > 1:
                raise CostError("outputs of different batch sizes")
    multi = SameBatch().append(MSE()).append(MSE())
    assert multi.validate([ones, ones], [zeros, zeros]) == [0.5, 0.5]
    with pytest.raises(CostError, match="batch sizes"):
        multi.validate([ones, ones[:1]], [zeros, zeros[:1]])
    assert multi.valError == [0.5, 0.5] and all(child.__dict__.get("_batch") is None for child in multi.costs)
    with pytest.raises(CostError, match="expected a list of 2"):
        multi.validate([ones], [zeros])
