"""Accumulator / state behaviour of KLDivergence (PuzzleLib's Cost API):
error, valError, grad, batchsize, numOfSamples, getError, getMeanError,
getValError, validate, resetAccumulator, resetDeviceAccumulator, reset."""

import numpy as np
import pytest

from puzzlelib_cost import Cost, CostError, KLDivergence, gpuarray

try:
    from . import reference as ref
except ImportError:
    import reference as ref

from conftest import ARRAY_KINDS


# float32 inputs vs float64 reference (see reference.tolerances): 1e-5 relative
RTOL = 1e-5


def host(x):
    return x.get() if isinstance(x, gpuarray.GPUArray) else np.asarray(x)


def make_batch(rng, n, shape=(5,), dtype=np.float32, scale=1.0, labels=False):
    """Logits and a target; `scale` spreads the logits so per-sample errors of
    different batches differ a lot (makes the sample-weighted mean differ from
    the mean of batch means)."""
    pred = (rng.standard_normal((n,) + shape) * scale).astype(dtype)
    if labels:
        target = rng.integers(0, shape[0], size=n).astype(np.int64)
    else:
        target = ref.softmax(rng.standard_normal((n,) + shape)).astype(dtype)
    return pred, target


def batch_sum(pred, target, normTarget=False):
    """Float64 reference sum over the batch of per-sample KL."""
    return float(ref.kl_reference(pred, target, normTarget)["per_sample"].sum())


def test_fresh_state():
    div = KLDivergence()
    assert div.error is None
    assert div.valError is None
    assert div.grad is None
    assert div.numOfSamples == 0
    assert div.batchsize == 0
    with pytest.raises(CostError):
        div.getError()
    with pytest.raises(CostError):
        div.getMeanError()


@pytest.mark.parametrize("kind", ARRAY_KINDS)
def test_several_batches_of_different_size(kind):
    rng = np.random.default_rng(0)
    wrap = (lambda x: x) if kind == "numpy" else gpuarray.to_gpu
    div = KLDivergence()
    sizes_scales = [(3, 0.5), (7, 0.2), (1, 8.0), (12, 0.1), (5, 4.0)]
    total_sum, total_n, batch_means = 0.0, 0, []
    for n, scale in sizes_scales:
        pred, target = make_batch(rng, n, scale=scale)
        s = batch_sum(pred, target)
        error, grad = div(wrap(pred), wrap(target))
        total_sum += s
        total_n += n
        batch_means.append(s / n)

        assert div.batchsize == n
        assert div.numOfSamples == total_n
        assert error == pytest.approx(s / n, rel=RTOL)
        assert div.error == error
        assert div.getError() == pytest.approx(s / n, rel=RTOL)
        np.testing.assert_array_equal(host(div.grad), host(grad))
        ref.assert_grad_close(host(div.grad), ref.kl_reference(pred, target), np.float32)
        assert div.getMeanError() == pytest.approx(total_sum / total_n, rel=RTOL)

    # the test distinguishes a sample-weighted mean from a mean of batch means
    assert abs(np.mean(batch_means) - total_sum / total_n) > 0.05 * total_sum / total_n


def test_mixed_shapes_and_label_batches_accumulate():
    rng = np.random.default_rng(1)
    div = KLDivergence()
    b1 = make_batch(rng, 4, shape=(6,), labels=True)
    b2 = make_batch(rng, 2, shape=(6,), scale=3.0)
    b3 = make_batch(rng, 3, shape=(6,), dtype=np.float64, scale=2.0)
    total = 0.0
    for p, t in [b1, b2, b3]:
        div(p, t)
        total += batch_sum(p, t)
    assert div.numOfSamples == 9
    assert div.batchsize == 3
    assert div.getMeanError() == pytest.approx(total / 9, rel=RTOL)


def test_query_error_false_then_get_error():
    rng = np.random.default_rng(2)
    div = KLDivergence()
    p1, t1 = make_batch(rng, 4, scale=2.0)
    p2, t2 = make_batch(rng, 6, scale=0.3)
    g1 = div(p1, t1, queryError=False)
    assert isinstance(g1, np.ndarray) and g1.shape == p1.shape
    assert div.batchsize == 4 and div.numOfSamples == 4
    assert div.getError() == pytest.approx(batch_sum(p1, t1) / 4, rel=RTOL)
    assert div.getMeanError() == pytest.approx(batch_sum(p1, t1) / 4, rel=RTOL)

    # a second batch, again without querying: getError is the NEW batch
    g2 = div(p2, t2, queryError=False)
    assert div.batchsize == 6 and div.numOfSamples == 10
    np.testing.assert_array_equal(host(div.grad), g2)
    assert div.getError() == pytest.approx(batch_sum(p2, t2) / 6, rel=RTOL)
    assert div.getMeanError() == pytest.approx((batch_sum(p1, t1) + batch_sum(p2, t2)) / 10,
                                               rel=RTOL)
    # and a queried batch after unqueried ones
    p3, t3 = make_batch(rng, 2, scale=5.0)
    e3, _ = div(p3, t3)
    assert e3 == pytest.approx(batch_sum(p3, t3) / 2, rel=RTOL)
    assert div.getError() == e3
    assert div.numOfSamples == 12


@pytest.mark.parametrize("kind", ARRAY_KINDS[1:])
def test_query_error_false_gpuarray(kind):
    rng = np.random.default_rng(3)
    div = KLDivergence(normTarget=True)
    p = (rng.standard_normal((5, 2, 3)) * 2).astype(np.float32)
    t = rng.standard_normal((5, 2, 3)).astype(np.float32)
    g = div(gpuarray.to_gpu(p), gpuarray.to_gpu(t), queryError=False)
    assert isinstance(g, gpuarray.GPUArray)
    r = ref.kl_reference(p, t, normTarget=True)
    ref.assert_grad_close(g.get(), r, np.float32)
    ref.assert_error_close(div.getError(), r, np.float32)


def test_reset_accumulator():
    rng = np.random.default_rng(4)
    div = KLDivergence()
    for n in (3, 5):
        div(*make_batch(rng, n, scale=3.0))
    div.resetAccumulator()
    assert div.numOfSamples == 0
    assert div.batchsize == 0
    p, t = make_batch(rng, 4, scale=0.2)
    e, _ = div(p, t)
    assert div.numOfSamples == 4 and div.batchsize == 4
    # only the batch after the reset counts
    assert div.getMeanError() == pytest.approx(batch_sum(p, t) / 4, rel=RTOL)
    assert div.getError() == pytest.approx(e, rel=1e-12)


def test_reset_accumulator_keeps_the_last_batchs_error(place):
    # PuzzleLib's resetAccumulator zeroes batchsize and numOfSamples but keeps error and dirty; a
    # first read after it divided by the zeroed batch size.  Ours raised "no batch has been processed".
    rng = np.random.default_rng(8)
    p, t = make_batch(rng, 6, scale=3.0)
    div = KLDivergence()
    div(place.put(p), place.put(t), queryError=False)   # (not read yet: dirty)
    div.resetAccumulator()
    assert div.batchsize == 0 and div.numOfSamples == 0
    assert div.getError() == pytest.approx(batch_sum(p, t) / 6, rel=RTOL)
    with pytest.raises(CostError, match="no sample has been counted since the last resetAccumulator"):
        div.getMeanError()
    ignored = KLDivergence(ignoreLabel=-1)
    ignored(place.put(p), place.put(np.full(6, -1)))   # (every row ignored: E = 0 by convention)
    ignored.resetAccumulator()
    assert ignored.getError() == 0.0


def test_reset_device_accumulator_zeroes_error_only():
    rng = np.random.default_rng(5)
    div = KLDivergence()
    p1, t1 = make_batch(rng, 3, scale=3.0)
    p2, t2 = make_batch(rng, 5, scale=3.0)
    div(p1, t1)
    e2, _ = div(p2, t2)
    div.resetDeviceAccumulator()
    assert div.numOfSamples == 8
    assert div.batchsize == 5
    # accumulated error is zero, the sample count is kept -> mean 0
    assert div.getMeanError() == 0.0
    # the last batch's error is not the accumulated one and survives
    assert div.getError() == pytest.approx(e2, rel=1e-12)
    p3, t3 = make_batch(rng, 2, scale=0.5)
    div(p3, t3)
    assert div.numOfSamples == 10
    assert div.getMeanError() == pytest.approx(batch_sum(p3, t3) / 10, rel=RTOL)


def test_reset_clears_results_not_accumulators():
    rng = np.random.default_rng(6)
    div = KLDivergence()
    p1, t1 = make_batch(rng, 3, scale=2.0)
    p2, t2 = make_batch(rng, 4, scale=2.0)
    div(p1, t1)
    div(p2, t2)
    div.validate(p1, t1)
    assert div.valError is not None
    mean = div.getMeanError()
    div.reset()
    assert div.error is None
    assert div.valError is None
    assert div.grad is None
    assert div.numOfSamples == 7
    assert div.batchsize == 4
    assert div.getMeanError() == mean


def test_validate_does_not_touch_state():
    rng = np.random.default_rng(7)
    div = KLDivergence()
    p1, t1 = make_batch(rng, 3, scale=2.0)
    p2, t2 = make_batch(rng, 6, scale=1.0)
    e1, g1 = div(p1, t1)
    g1_copy = host(g1).copy()
    err, grad_attr = div.error, div.grad
    n_samples, bs = div.numOfSamples, div.batchsize
    mean, last = div.getMeanError(), div.getError()

    v = div.validate(p2, t2)  # different batch size and data
    assert v == pytest.approx(batch_sum(p2, t2) / 6, rel=RTOL)
    assert div.valError == v
    assert div.getValError() == v

    assert div.numOfSamples == n_samples
    assert div.batchsize == bs
    assert div.getMeanError() == mean
    assert div.getError() == last
    assert div.error == err
    assert div.grad is grad_attr
    np.testing.assert_array_equal(host(div.grad), g1_copy)
    np.testing.assert_array_equal(host(g1), g1_copy)  # returned grad not overwritten

    # a second validate replaces valError
    v2 = div.validate(p1, t1)
    assert v2 == pytest.approx(e1, rel=1e-6)
    assert div.getValError() == v2
    assert div.numOfSamples == n_samples


def test_validate_before_any_batch():
    rng = np.random.default_rng(8)
    div = KLDivergence()
    p, t = make_batch(rng, 4, labels=True)
    v = div.validate(p, t)
    assert v == pytest.approx(batch_sum(p, t) / 4, rel=RTOL)
    assert div.getValError() == v
    assert div.numOfSamples == 0
    assert div.grad is None
    with pytest.raises(CostError):
        div.getError()
    with pytest.raises(CostError):
        div.getMeanError()


@pytest.mark.parametrize("kind", ARRAY_KINDS[1:])
def test_validate_gpuarray_and_normtarget(kind):
    rng = np.random.default_rng(9)
    div = KLDivergence(normTarget=True)
    p = rng.standard_normal((3, 2, 2, 2)).astype(np.float32)
    t = rng.standard_normal((3, 2, 2, 2)).astype(np.float32)
    v = div.validate(gpuarray.to_gpu(p), gpuarray.to_gpu(t))
    r = ref.kl_reference(p, t, normTarget=True)
    ref.assert_error_close(float(v), r, np.float32)
    assert div.getValError() == v


def test_grad_replaced_each_call_and_earlier_grad_kept():
    rng = np.random.default_rng(10)
    div = KLDivergence()
    p1, t1 = make_batch(rng, 4)
    p2, t2 = make_batch(rng, 4)
    _, g1 = div(p1, t1)
    g1_copy = host(g1).copy()
    _, g2 = div(p2, t2)
    ref.assert_grad_close(host(div.grad), ref.kl_reference(p2, t2), np.float32)
    np.testing.assert_array_equal(host(div.grad), host(g2))
    # the grad handed out for batch 1 still holds batch 1's values
    np.testing.assert_array_equal(host(g1), g1_copy)


def test_many_small_batches_mean_is_accurate():
    rng = np.random.default_rng(11)
    div = KLDivergence()
    total, n = 0.0, 0
    for _ in range(200):
        p, t = make_batch(rng, 1, shape=(3,), scale=2.0)
        div(p, t, queryError=False)
        total += batch_sum(p, t)
        n += 1
    assert div.numOfSamples == 200
    # 200 additions: even a float32 accumulator is good to ~200*u = 1.2e-5
    assert div.getMeanError() == pytest.approx(total / n, rel=5e-5)


def test_subclass_keeps_behaviour():
    class MyKL(KLDivergence):
        pass

    rng = np.random.default_rng(12)
    p, t = make_batch(rng, 3)
    div = MyKL()
    assert isinstance(div, Cost)
    e, g = div(p, t)
    assert e == pytest.approx(batch_sum(p, t) / 3, rel=RTOL)
    assert div.numOfSamples == 3
    assert div.getMeanError() == pytest.approx(e, rel=1e-6)


# ---------------------------------------------------------------- copies, pickles, references

@pytest.mark.parametrize("how", ["copy", "deepcopy", "pickle"])
def test_a_copy_keeps_accumulators_of_its_own(place, how):
    """copy.copy shared devErr and accumErr, which each call updates in place: the copy's batch
    went into the original's getError and getMeanError.  A copy (of a cost that ran on the GPU
    too: it comes back on the CPU's scalars, with their values) starts from the original's
    values and goes its own way, on the place it next runs on."""
    import copy
    import pickle
    make = {"copy": copy.copy, "deepcopy": copy.deepcopy, "pickle": lambda c: pickle.loads(pickle.dumps(c))}[how]
    rng = np.random.default_rng(11)
    p1, t1 = make_batch(rng, 3, scale=2.0)
    p2, t2 = make_batch(rng, 5, scale=3.0)
    div = KLDivergence()
    div(place.put(p1), place.put(t1), queryError=False)
    error, mean = div.getError(), div.getMeanError()
    twin = make(div)
    assert twin.getError() == error and twin.getMeanError() == mean and twin.numOfSamples == 3
    e2, _ = twin(place.put(p2), place.put(t2))
    assert div.getError() == error and div.getMeanError() == mean and div.numOfSamples == 3
    assert twin.numOfSamples == 8
    np.testing.assert_allclose(twin.getMeanError(), (3 * error + 5 * e2) / 8, rtol=1e-12)


@pytest.mark.parametrize("name", ["CrossEntropy", "SVM"])
def test_a_copy_of_a_cost_that_ran_on_the_gpu_leaves_its_device_arrays_behind(place, name):
    """grad and mostProb (the costs' _RESULTS) are the caller's arrays: device arrays after a GPU
    call, which a copy leaves out; after a CPU call it keeps them."""
    import copy
    import puzzlelib_cost
    rng = np.random.default_rng(13)
    scores, labels = rng.standard_normal((4, 3)).astype(np.float32), np.array([0, 2, 1, 2], np.int32)
    cost = getattr(puzzlelib_cost, name)()
    cost(place.put(scores), place.put(labels))
    cost.validate(place.put(scores), place.put(labels))
    twin = copy.deepcopy(cost)
    if place.name.startswith("numpy"):
        assert np.array_equal(twin.mostProb, cost.mostProb) and np.array_equal(twin.grad, cost.grad)
    else:
        assert twin.mostProb is None and twin.grad is None
        assert cost.mostProb is not None and cost.grad is not None


def test_a_copy_of_a_multi_copies_its_children(place):
    import copy
    from puzzlelib_cost import MSE, Multi
    rng = np.random.default_rng(12)
    a, b = (rng.standard_normal((2, 3)).astype(np.float32) for _ in range(2))
    multi = Multi().append(MSE()).append(MSE())
    multi([place.put(a), place.put(a)], [place.put(b), place.put(b)])
    means = multi.getMeanError()
    twin = copy.copy(multi)
    twin([place.put(3 * a), place.put(a)], [place.put(b), place.put(b)])
    assert multi.getMeanError() == means and twin.costs is not multi.costs
    assert all(c is not d for c, d in zip(twin.costs, multi.costs))


def test_getError_after_reset_is_None_as_in_PuzzleLib():
    rng = np.random.default_rng(13)
    div = KLDivergence()
    with pytest.raises(CostError, match="no batch has been processed"):
        div.getError()
    div(*make_batch(rng, 3))
    div.reset()
    assert div.getError() is None
    div(*make_batch(rng, 2), queryError=False)
    div.reset()   # (not read yet: the batch's error is still there, as in PuzzleLib)
    assert div.getError() is not None


def test_a_check_that_fails_half_way_keeps_no_reference_to_the_inputs():
    """A subclass's check that raises after its super()'s passed left the checked batch on the
    cost, and with it pred and target, until the next call."""
    import weakref

    class Picky(KLDivergence):
        def checkDataShape(self, pred, target):
            super().checkDataShape(pred, target)
            raise CostError("picky")
    rng = np.random.default_rng(14)
    pred, target = make_batch(rng, 3)
    held = weakref.ref(pred)
    cost = Picky()
    for call in (cost, cost.validate):
        with pytest.raises(CostError, match="picky"):
            call(pred, target)
    del pred
    assert held() is None


def test_kl_getBatchsize_counts_pred_as_in_PuzzleLib():
    rng = np.random.default_rng(15)
    div = KLDivergence()
    assert div.getBatchsize(np.zeros((7, 3), np.float32)) == 7
    div(*make_batch(rng, 4))
    assert div.getBatchsize(np.zeros((7, 3), np.float32)) == 7
    ignoring = KLDivergence(ignoreLabel=-1)   # (with ignoreLabel: the last call's counted rows)
    ignoring(rng.standard_normal((4, 3)).astype(np.float32), np.array([0, -1, 2, -1]))
    assert ignoring.getBatchsize(np.zeros((4, 3), np.float32)) == 2


def test_one_object_in_two_threads_at_once_is_a_cost_error_that_changes_nothing():
    """Two threads in one cost object's calls corrupted it (a checked batch taken by the other
    call: TypeError; counters rolled back over the other call's: 99709 samples of 100000).  The
    second call is refused while the first is in progress, and the first completes as if alone."""
    import threading
    entered, release = threading.Event(), threading.Event()

    class Slow(KLDivergence):
        def checkDataShape(self, pred, target):
            entered.set()
            release.wait(30)
            return super().checkDataShape(pred, target)
    rng = np.random.default_rng(16)
    pred, target = make_batch(rng, 3)
    cost = Slow()
    results = []
    first = threading.Thread(target=lambda: results.append(cost(pred, target)))
    first.start()
    assert entered.wait(30)
    for call in (cost, cost.validate):
        with pytest.raises(CostError, match="in a call on another thread"):
            call(pred, target)
    release.set()
    first.join(30)
    assert len(results) == 1 and cost.numOfSamples == 3
    alone = KLDivergence()
    np.testing.assert_array_equal(results[0][1], alone(pred, target)[1])
    cost(pred, target)   # (free again)
    assert cost.numOfSamples == 6


def test_a_child_of_a_multi_in_a_call_on_another_thread_is_a_cost_error_that_changes_nothing():
    """A Multi's call holds its children's locks: another thread's call of a child while the Multi
    is in its checks is refused (it replaced the inputs the child had been checked on, and the Multi
    computed that child on the other thread's batch: error 61.25, a (5, 3) grad for a (2, 3) pred),
    and a Multi whose child is in another thread's call refuses before it changes anything."""
    import threading
    from puzzlelib_cost import MSE, Multi
    entered, release = threading.Event(), threading.Event()

    class Slow(MSE):
        def checkDataShape(self, pred, target):
            if threading.current_thread().name == "slow":
                entered.set()
                release.wait(30)
            return super().checkDataShape(pred, target)
    first, second = MSE(), Slow()
    multi = Multi().append(first).append(second)
    ones, zeros = np.ones((2, 3), np.float32), np.zeros((2, 3), np.float32)
    other = np.full((5, 3), 7, np.float32)
    results = []
    slow = threading.Thread(target=lambda: results.append(multi([ones, ones], [zeros, zeros])), name="slow")
    slow.start()
    try:
        assert entered.wait(30)   # (the Multi has checked `first`, and is in `second`'s check)
        for call in (first, first.validate, second):
            with pytest.raises(CostError, match="in a call on another thread"):
                call(other, zeros[:1].repeat(5, 0))
    finally:
        release.set()
        slow.join(30)
    (errors, grads), = results
    assert errors == [0.5, 0.5] and grads[0].shape == (2, 3)   # (MSE of ones against zeros: 1/2)
    assert first.numOfSamples == second.numOfSamples == 2

    busy = threading.Thread(target=lambda: second(ones, zeros), name="slow")
    entered.clear(), release.clear()
    busy.start()
    try:
        assert entered.wait(30)
        for call in (multi, multi.validate):
            with pytest.raises(CostError, match="Multi: its child Slow is in a call on another thread"):
                call([other, ones], [other, zeros])
        assert first.numOfSamples == 2 and first.getError() == 0.5 and first.__dict__.get("_batch") is None
    finally:
        release.set()
        busy.join(30)
    assert second.numOfSamples == 4
    assert multi([ones, ones], [zeros, zeros])[0] == [0.5, 0.5]   # (the children free again)


def test_a_multi_whose_child_fails_in_its_work_keeps_its_own_state_and_lets_the_inputs_go():
    """A failure inside a child's work past the checks (out of memory, say): the Multi's own
    attributes are put back and its grad let go, as a cost's are, and no child keeps the inputs it
    had been checked on (the children after the failed one held them until their next call)."""
    from puzzlelib_cost import MSE, Multi

    class Failing(MSE):
        fail = False

        def calcGrad(self, pred, target):
            if self.fail:
                raise MemoryError("out of memory (planted)")
            return super().calcGrad(pred, target)
    failing = Failing()
    multi = Multi().append(MSE()).append(failing).append(MSE())
    ones, zeros = np.ones((2, 3), np.float32), np.zeros((2, 3), np.float32)
    errors, _ = multi([ones] * 3, [zeros] * 3)
    failing.fail = True
    with pytest.raises(MemoryError):
        multi([ones] * 3, [zeros] * 3, queryError=False)
    assert multi.grad is None and multi.error == errors and multi.numOfSamples == 2
    assert all(child.__dict__.get("_batch") is None for child in multi.costs)
    failing.fail = False
    assert multi([ones] * 3, [zeros] * 3)[0] == errors


def test_a_call_cut_short_between_its_lock_and_its_work_leaves_its_thread_free_to_call_again():
    """A Ctrl-C that lands just after a call took its object's lock (or a Multi its children's)
    leaves the lock held: the next call on the same thread, a notebook's cell run again, was
    refused for good ("in a call on another thread").  It goes through (the lock is re-entrant);
    another thread's is refused, and the message says a call may have been interrupted."""
    import threading
    from puzzlelib_cost import MSE, Multi
    ones, zeros = np.ones((2, 3), np.float32), np.zeros((2, 3), np.float32)
    child = MSE()
    multi = Multi().append(child).append(MSE())
    for cost in (child, multi):
        assert cost._in_call.acquire(blocking=False)   # (as an interrupted call leaves it)
    assert child(ones, zeros)[0] == 0.5 and multi([ones, ones], [zeros, zeros])[0] == [0.5, 0.5]
    assert multi.validate([ones, ones], [zeros, zeros]) == [0.5, 0.5]
    refused = []

    def other_thread():
        for call in (lambda: child(ones, zeros), lambda: multi([ones, ones], [zeros, zeros])):
            try:
                call()
            except CostError as exc:
                refused.append(str(exc))
    thread = threading.Thread(target=other_thread)
    thread.start()
    thread.join(30)
    assert len(refused) == 2 and "interrupted" in refused[0], refused


def test_a_nested_multi_on_one_thread_may_share_a_child():
    """A Multi whose calcGrad also runs another Multi over the same head, on the same thread: the
    inner one finds the shared child held by this thread's outer call, and goes through."""
    from puzzlelib_cost import MSE, Multi
    shared = MSE()
    inner = Multi().append(shared)

    class Outer(Multi):
        def calcGrad(self, pred, target):
            grads = super().calcGrad(pred, target)
            inner([pred[0]], [target[0]], queryError=False)
            return grads
    ones, zeros = np.ones((2, 3), np.float32), np.zeros((2, 3), np.float32)
    outer = Outer().append(shared).append(MSE())
    assert outer([ones, ones], [zeros, zeros])[0] == [0.5, 0.5]
    assert inner.getError() == [0.5] and shared.numOfSamples == 4
