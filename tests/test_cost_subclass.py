"""Costs written the PuzzleLib way run unchanged: a Cost subclass whose checkDataShape and
checkValDataShape check and return None (PuzzleLib's have one backend to return), a built-in cost
extended with checks of its own, and PuzzleLib's own updateState body in an override.  The
reference is the float64 sum of squares written here."""
import numpy as np
import pytest

from puzzlelib_cost import MSE, Cost, Multi


class HalfSquares(Cost):
    """E = sum (pred - target)^2 / 2 / N, written as a PuzzleLib user would, on the CPU."""

    def checkDataShape(self, pred, target):
        assert pred.shape == target.shape   # (PuzzleLib's checks: asserts, and no return value)

    def checkValDataShape(self, pred, target):
        assert pred.shape == target.shape

    def calcGrad(self, pred, target):
        d = (target - pred).astype(np.float64)
        self.devErr[...] = (d * d).sum() / 2
        return (d / pred.shape[0]).astype(pred.dtype)

    def calcError(self, pred, target):
        self.accumErr[...] += self.devErr

    def calcVal(self, pred, target):
        return float(((target - pred).astype(np.float64) ** 2).sum() / 2 / pred.shape[0])

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
