"""The NumPy backend's KLDivergence: the same bits with 1 and 2 threads and on repeated calls, and
its peak extra memory within 4x pred's bytes (tracemalloc sees NumPy's allocations)."""
import tracemalloc

import numpy as np
import pytest

from puzzlelib_cost import KLDivergence, row_softmax

SHAPES = [(64, 32000), (1024, 1024), (3, 200000)]   # several blocks each, so that both threads work


def inputs(shape, kind, seed=0):
    rng = np.random.default_rng(seed)
    pred = (2 * rng.standard_normal(shape)).astype(np.float32)
    if kind == "labels":
        return pred, rng.integers(0, shape[1], shape[0])
    target = rng.standard_normal(shape).astype(np.float32)
    if kind == "probabilities":
        target = np.exp(target - target.max(1, keepdims=True))
        target /= target.sum(1, keepdims=True)
        target[:, ::7] = 0   # exact zeros: 0 log 0
    return pred, target


@pytest.mark.parametrize("kind", ["probabilities", "normTarget", "labels"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_bitwise_identical_with_one_and_two_threads_and_on_repeated_calls(monkeypatch, shape, kind):
    pred, target = inputs(shape, kind)
    results = []
    for threads in (1, 2, 2):
        monkeypatch.setattr(row_softmax, "THREADS", threads)
        error, grad = KLDivergence(normTarget=kind == "normTarget", temperature=1.5)(pred, target)
        results.append((error, grad.tobytes()))
    assert results[0] == results[1] == results[2]


@pytest.mark.parametrize("kind", ["probabilities", "normTarget", "labels"])
def test_peak_extra_memory_within_four_times_pred(kind):
    pred, target = inputs((64, 32000), kind)
    cost = KLDivergence(normTarget=kind == "normTarget")
    cost(pred, target)   # (the pool's threads and the cost's scalars exist from here on)
    tracemalloc.start()
    try:
        cost(pred, target)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak <= 4 * pred.nbytes, f"{peak / pred.nbytes:.1f}x pred's bytes"
