"""The integer labels' range check on the device (kernels/labels.cu, CudaBackend.checked_labels).

- The kernels in the CPU emulation against a reference written here with Python integers: every
  input dtype (a bool mask as its bytes) x both output dtypes, no bad label, one, many (the first
  index and the count exact, bad labels in different blocks, every thread order), bool bytes other
  than 0 and 1, uint64 above INT64_MAX, negative labels, an empty array; and the distinct
  columns' check of a sparse teacher's indices, in every thread order, at its bitmap's bounds.
- The costs that take integer labels (BCE, Hinge, SVM, L1Hinge, CrossEntropy on rows and
  positions, KLDivergence) on the CUDA backend, emulated and through pycuda: good labels give the
  NumPy backend's results, and the labels never come to the host; a bad label gives the NumPy
  backend's CostError word for word and leaves the cost's state as it was.
"""
import numpy as np
import pytest

from puzzlelib_cost import BCE, SVM, CostError, CrossEntropy, Hinge, KLDivergence, L1Hinge, label_checks
from puzzlelib_cost.backends.cuda_backend import (DISTINCT_MAX_COLUMNS, DISTINCT_SIGNATURE, LABEL_OUT_SUFFIX,
                                                  LABEL_SIGNATURE, LABEL_SUFFIX, LABEL_THREADS, CudaBackend,
                                                  _ignore_bits, label_kernel_names)
from puzzlelib_cost.kernel_index import kernel_names

ORDERS = (("forward", 0), ("reverse", 0), ("random", 1), ("random", 2))
INT64_MAX = 2 ** 63 - 1


def reference(values, low, high, is_bool):
    """(narrowed values, first bad flat index or None, count) with Python's integers: exact."""
    values = [int(v) for v in values]
    if is_bool:
        values = [int(v != 0) for v in values]
    bad = [i for i, v in enumerate(values) if not low <= v < high]
    return values, (bad[0] if bad else None), len(bad)


def launch(module, in_name, labels, out_dtype, low, high, grid=None, order="forward", seed=0, ignore=None):
    """(narrowed, first, count) of check_labels_<in>_<out> on the host array `labels` (the bytes
    of a bool mask as uint8), with `ignore` (None: none) the label value to ignore.  Checked here
    for every launch: a bad label narrowed as `low` (in range for the kernels that read them), an
    ignored one as -1 and counted in found[5], the first bad label's value in found[2] as the host
    decodes it, and every block counted in found[3]."""
    name = f"check_labels_{LABEL_SUFFIX[in_name]}_{LABEL_OUT_SUFFIX[np.dtype(out_dtype).name]}"
    assert module.signature(name) == LABEL_SIGNATURE
    n = labels.size
    narrowed = np.full(max(n, 1), -7, out_dtype)   # (-7: shows an element the kernel did not write)
    found = np.array([2 ** 64 - 1, 0, 0, 0, 2 ** 64 - 1, 0], np.uint64)
    grid = grid or max(1, -(-n // LABEL_THREADS))
    ignore_bits, has_ignore = _ignore_bits(ignore, np.bool_ if in_name == "bool" else labels.dtype)
    module.launch(name, grid, LABEL_THREADS, [labels, narrowed, found, np.int64(n), np.int64(low), np.int64(high),
                                              np.int64(ignore_bits), np.int32(has_ignore)],
                  order=order, seed=seed)
    first = None if int(found[0]) == 2 ** 64 - 1 else int(found[0])
    values = [int(v != 0) if in_name == "bool" else int(v) for v in labels.tolist()]
    ignored = [i for i, v in enumerate(values) if v == ignore]
    bad = [i for i, v in enumerate(values) if (not low <= v < high or v > INT64_MAX) and v != ignore]
    assert [int(narrowed[i]) for i in bad] == [low] * len(bad)
    assert [int(narrowed[i]) for i in ignored] == [-1] * len(ignored) and int(found[5]) == len(ignored)
    assert int(found[3]) == grid and int(found[4]) == 2 ** 64 - 1
    if first is not None:
        value = label_checks.label_value(int(found[2]), labels.dtype if in_name != "bool" else np.bool_)
        assert int(value) == values[first] if in_name != "bool" else int(value) == int(labels[first])
    return narrowed[:n], first, int(found[1])


def labels_of(in_name, values):
    """Host labels of dtype `in_name` holding `values` (a bool mask: those bytes)."""
    if in_name == "bool":
        return np.array(values, np.uint8)
    return np.array(values, dtype=np.dtype(in_name))


def values_for(in_name, n, rng, bad_at=()):
    """n labels in [0, 3) (bool: bytes 0 and 1), and out-of-range ones at bad_at for the check's
    range [0, 3): the dtype's largest value, and its smallest where that is negative."""
    values = rng.integers(0, 2 if in_name == "bool" else 3, n).tolist()
    if in_name != "bool":
        info = np.iinfo(np.dtype(in_name))
        for k, i in enumerate(bad_at):
            values[i] = int(info.min) if k % 2 and info.min < 0 else int(info.max)
    return values


IN_NAMES = list(LABEL_SUFFIX)
OUT_DTYPES = [np.int32, np.int64]


def test_every_label_kernel_is_registered():
    assert set(label_kernel_names()) <= set(kernel_names())
    assert len(label_kernel_names()) == len(LABEL_SUFFIX) * len(LABEL_OUT_SUFFIX) + 4   # (+ distinct, commit, weights)


@pytest.mark.parametrize("out_dtype", OUT_DTYPES, ids=["i32", "i64"])
@pytest.mark.parametrize("in_name", IN_NAMES)
@pytest.mark.parametrize("bad_at", [(), (700,), (3, 260, 700, 1500, 2999)], ids=["none", "one", "many"])
def test_kernel_against_reference_in_every_order(kernel_module, in_name, out_dtype, bad_at):
    """3000 labels over 12 blocks (and over 2 blocks, so that each thread loops): the narrowed
    labels, the first bad index and the count, in every thread order."""
    if in_name == "bool" and bad_at:
        pytest.skip("a bool mask holds no label outside [0, 2)")
    values = values_for(in_name, 3000, np.random.default_rng(len(bad_at)), bad_at)
    expected, first, count = reference(values, 0, 3, in_name == "bool")
    assert count == len(bad_at)
    for grid in (None, 2):
        for order, seed in ORDERS:
            narrowed, got_first, got_count = launch(kernel_module, in_name, labels_of(in_name, values), out_dtype,
                                                    0, 3, grid, order, seed)
            assert (got_first, got_count) == (first, count), (grid, order, seed)
            good = [i for i in range(len(values)) if i not in bad_at]
            assert narrowed[good].tolist() == [expected[i] for i in good]


@pytest.mark.parametrize("out_dtype", OUT_DTYPES, ids=["i32", "i64"])
def test_bool_bytes_other_than_0_and_1_read_as_1(kernel_module, out_dtype):
    values = [0, 1, 2, 255, 128, 0, 7] * 100
    narrowed, first, count = launch(kernel_module, "bool", labels_of("bool", values), out_dtype, 0, 2)
    assert (first, count) == (None, 0)
    assert narrowed.tolist() == [int(v != 0) for v in values]


@pytest.mark.parametrize("low,high", [(0, 2), (-1, 2), (-INT64_MAX - 1, INT64_MAX)])
def test_uint64_above_int64_max_is_bad(kernel_module, low, high):
    """2^63 and 2^64 - 1 are bad for any range the costs ask, a negative low included (as int64
    they would wrap to -2^63 and -1, which (-1, 2) takes)."""
    values = [1, 2 ** 63, 0, 2 ** 64 - 1, 1, 2 ** 63 - 1] * 60
    expected_bad = [i for i, v in enumerate(values) if v > INT64_MAX or not low <= v < high]
    for order, seed in ORDERS:
        _, first, count = launch(kernel_module, "uint64", labels_of("uint64", values), np.int64, low, high,
                                 order=order, seed=seed)
        assert (first, count) == (expected_bad[0], len(expected_bad))


@pytest.mark.parametrize("in_name", ["int8", "int16", "int32", "int64"])
def test_negative_labels(kernel_module, in_name):
    values = [0, 1, -1, 1, 0, -2, 1] * 50   # Hinge's {-1, 0, 1}: -2 is bad, -1 not
    expected, first, count = reference(values, -1, 2, False)
    narrowed, got_first, got_count = launch(kernel_module, in_name, labels_of(in_name, values), np.int32, -1, 2)
    assert (got_first, got_count) == (first, count) == (5, 50)
    assert [v for i, v in enumerate(narrowed.tolist()) if values[i] != -2] == [v for v in expected if v != -2]


def test_bounds_are_half_open(kernel_module):
    """low is in, high is out (an off-by-one at either end shows here)."""
    values = [4, 5, 9, 10, 3]
    _, first, count = launch(kernel_module, "int32", labels_of("int32", values), np.int32, 4, 10)
    assert (first, count) == (3, 2)


@pytest.mark.parametrize("out_dtype", OUT_DTYPES, ids=["i32", "i64"])
@pytest.mark.parametrize("in_name", [name for name in IN_NAMES if name != "bool"])
@pytest.mark.parametrize("where", ["inside", "outside"])
def test_the_label_to_ignore_is_narrowed_to_minus_1_and_counted_in_every_order(kernel_module, in_name, out_dtype,
                                                                               where):
    """KLDivergence's ignoreLabel: a label equal to it is not range-checked but narrowed to -1 and
    counted (found[5]), one inside the range [0, 3) (1: a class) and one outside it (-100, or the
    dtype's largest value but one where it is unsigned), beside bad labels, in every thread order; the
    launch helper checks the narrowed values and the count."""
    info = np.iinfo(np.dtype(in_name))
    ignore = 1 if where == "inside" else (-100 if info.min < 0 else int(info.max) - 1)   # (max: values_for's bad)
    rng = np.random.default_rng(11)
    values = values_for(in_name, 3000, rng, (5, 900, 2999))
    for i in rng.choice(3000, 300, replace=False):
        if i not in (5, 900, 2999):
            values[i] = ignore
    bad = [i for i, v in enumerate(values) if not 0 <= v < 3 and v != ignore]
    for grid in (None, 2):
        for order, seed in ORDERS:
            _, first, count = launch(kernel_module, in_name, labels_of(in_name, values), out_dtype, 0, 3, grid,
                                     order, seed, ignore=ignore)
            assert (first, count) == (bad[0], len(bad))


@pytest.mark.parametrize("in_name,values,ignore", [
    ("int64", [0, -1, 2], 2 ** 64 - 1),   # -1's bits are 2^64 - 1's: not the value
    ("uint8", [0, 156, 2], -100),         # 156 is -100's low byte
    ("int8", [0, -100, 1], 156),          # and the other way
    ("uint64", [0, 2 ** 64 - 1, 1], 2 ** 64 - 1),   # the dtype's largest value: ignored
    ("bool", [0, 7, 1], 1),               # a bool mask's nonzero byte is 1
])
def test_the_label_to_ignore_is_its_value_not_its_bits(kernel_module, in_name, values, ignore):
    narrowed, first, count = launch(kernel_module, in_name, labels_of(in_name, values), np.int64, 0, 2,
                                    ignore=ignore)
    ignored = [v == ignore for v in (values if in_name != "bool" else [int(v != 0) for v in values])]
    assert (first is None) == (ignored[1] or in_name == "bool")
    assert (narrowed[1] == -1) == ignored[1]


def test_empty_labels(kernel_module):
    narrowed, first, count = launch(kernel_module, "int64", np.zeros(0, np.int64), np.int32, 0, 2, grid=1)
    assert (first, count) == (None, 0) and narrowed.size == 0


# --- check_distinct_columns: a sparse teacher's indices distinct in each row -------------------

def distinct_reference(columns, n_cols):
    """row * n_cols + the smallest column repeated in the first row with a repeat, or None."""
    for row, values in enumerate(columns.tolist()):
        repeated = sorted({v for v in values if values.count(v) > 1})
        if repeated:
            return row * n_cols + repeated[0]
    return None


def launch_distinct(module, columns, n_cols, grid, order="forward", seed=0):
    """check_distinct_columns' found[4] on the (N, K) int64 `columns` (None: no repeat); the other
    words of the answer, the range check's, are left as they were."""
    assert module.signature("check_distinct_columns") == DISTINCT_SIGNATURE
    found = np.array([2 ** 64 - 1, 0, 0, 0, 2 ** 64 - 1, 0], np.uint64)
    n_rows, k_cols = columns.shape
    module.launch("check_distinct_columns", grid, LABEL_THREADS,
                  [np.ascontiguousarray(columns, np.int64), found, np.int64(n_rows), np.int64(k_cols), np.int64(n_cols)],
                  order=order, seed=seed)
    assert found[:4].tolist() + found[5:].tolist() == [2 ** 64 - 1, 0, 0, 0, 0]
    return None if int(found[4]) == 2 ** 64 - 1 else int(found[4])


def _distinct_rows(rng, n_rows, k_cols, n_cols):
    return np.stack([rng.choice(n_cols, k_cols, replace=False) for _ in range(n_rows)]).astype(np.int64)


@pytest.mark.parametrize("order,seed", ORDERS)
@pytest.mark.parametrize("case", ["none", "one", "many", "thrice", "late_row"])
def test_distinct_kernel_against_reference_in_every_order(kernel_module, case, order, seed):
    """Rows of 300 columns of 70000 (more than a block's threads, two bitmap words' marks apart
    and alike), 5 blocks for 23 rows: each block's rows after its first must find the bitmap its
    earlier rows cleared, and a repeat found by any thread in any order gives the same minimum."""
    rng = np.random.default_rng(["none", "one", "many", "thrice", "late_row"].index(case))
    n_cols = 70000
    columns = _distinct_rows(rng, 23, 300, n_cols)
    if case == "one":
        columns[6, 290] = columns[6, 3]
    elif case == "many":   # rows 6 and 11, and row 6's smaller repeat found after its larger one
        small, large = sorted(columns[6, :2])
        columns[6, 250], columns[6, 299] = large, small
        columns[11, 0] = columns[11, 1]
    elif case == "thrice":
        columns[9, 100] = columns[9, 200] = columns[9, 7]
    elif case == "late_row":   # the last row of the last block: rows 22 of blocks 0..4 (22 % 5 = 2)
        columns[22, 299] = columns[22, 0]
    want = distinct_reference(columns, n_cols)
    assert (want is None) == (case == "none")
    assert launch_distinct(kernel_module, columns, n_cols, grid=5, order=order, seed=seed) == want


def test_distinct_kernel_at_its_bitmaps_bounds(kernel_module):
    """Columns 0 and DISTINCT_MAX_COLUMNS - 1 (the bitmap's first and last bits) seen, repeated
    and not, in rows of one column (nothing to repeat) and of the row's every column."""
    last = DISTINCT_MAX_COLUMNS - 1
    edges = np.array([[0, last], [last, 0], [last, last], [0, 0]], np.int64)
    assert launch_distinct(kernel_module, edges, DISTINCT_MAX_COLUMNS, grid=2) == 2 * DISTINCT_MAX_COLUMNS + last
    assert launch_distinct(kernel_module, edges[:2], DISTINCT_MAX_COLUMNS, grid=1) is None
    assert launch_distinct(kernel_module, np.zeros((4, 1), np.int64), 1, grid=3) is None
    every = np.stack([np.random.default_rng(i).permutation(40) for i in range(3)])
    assert launch_distinct(kernel_module, every, 40, grid=2) is None


def test_the_distinct_limit_is_the_kernels_bitmaps_bits():
    """DISTINCT_MAX_COLUMNS, past which the CUDA backend checks a row's distinct columns on the
    host, is the bits of check_distinct_columns' shared bitmap: a larger limit would mark columns
    past it."""
    import re
    from pathlib import Path
    source = (Path(label_checks.__file__).parents[1] / "kernels" / "labels.cu").read_text()
    words = int(re.search(r"constexpr int DISTINCT_BITMAP_WORDS = (\d+);", source).group(1))
    assert DISTINCT_MAX_COLUMNS == words * 32


# --- the costs on the CUDA backend ------------------------------------------------------------

def _cases():
    """(id, make the cost, pred shape, labels shape, labels' range [low, high))."""
    return [
        ("BCE", BCE, (6, 5, 7), (6, 5, 7), (0, 2)),
        ("BCE-N1", BCE, (300, 1), (300,), (0, 2)),
        ("Hinge", Hinge, (9, 40), (9, 40), (-1, 2)),
        ("SVM", SVM, (6, 4, 11), (6, 11), (0, 4)),
        ("L1Hinge", L1Hinge, (70, 3), (70,), (0, 2)),
        ("CrossEntropy-rows", CrossEntropy, (50, 7), (50,), (0, 7)),
        ("CrossEntropy-spatial", CrossEntropy, (4, 6, 5, 3), (4, 5, 3), (0, 6)),
        ("KLDivergence", KLDivergence, (40, 9), (40,), (0, 9)),
    ]


CASES = _cases()
LABEL_DTYPES = ["int8", "uint8", "int32", "int64", "uint64", "bool"]


def _inputs(case, dtype, bad_at=(), seed=0):
    _, _, pred_shape, label_shape, (low, high) = case
    rng = np.random.default_rng(seed)
    preds = [rng.standard_normal(pred_shape).astype(np.float32) for _ in range(2 if case[0] == "L1Hinge" else 1)]
    if dtype == "bool":
        labels = rng.integers(0, 2, label_shape).astype(np.uint8)
        labels.reshape(-1)[::3] *= 200   # bytes 0, 1 and 200, viewed as bool
        labels = labels.view(np.bool_)
    else:
        if np.iinfo(np.dtype(dtype)).min == 0:
            low = max(low, 0)
        labels = rng.integers(low, high, label_shape).astype(dtype)
        flat = labels.reshape(-1)
        for k, i in enumerate(bad_at):
            flat[i] = high + k if k % 2 == 0 or np.iinfo(flat.dtype).min == 0 else low - 1 - k
    return (preds if case[0] == "L1Hinge" else preds[0]), labels


def _applies(case, dtype):
    return dtype != "bool" or case[4] == (0, 2)   # a bool mask is taken for {0, 1} only


def _state(cost, place):
    grad = cost.grad
    return dict(error=cost.error, valError=cost.valError, batchsize=cost.batchsize,
                numOfSamples=cost.numOfSamples, grad_id=id(grad), most_prob_id=id(cost.__dict__.get("mostProb")),
                grad=None if grad is None else [np.array(g) for g in place.get(grad)] if isinstance(grad, list)
                else np.array(place.get(grad)),
                mean=cost.getMeanError())


def _same_state(a, b):
    assert {k: v for k, v in a.items() if k != "grad"} == {k: v for k, v in b.items() if k != "grad"}
    np.testing.assert_array_equal(np.asarray(a["grad"]), np.asarray(b["grad"]))


@pytest.fixture
def no_label_copies(monkeypatch):
    """The CUDA backend may not copy the labels to the host."""
    def refuse(self, info):
        raise AssertionError(f"labels of shape {info.shape} copied to the host")
    monkeypatch.setattr(CudaBackend, "labels_to_host", refuse)


@pytest.mark.parametrize("dtype", LABEL_DTYPES)
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_good_labels_give_the_numpy_backends_results(place, case, dtype, no_label_copies):
    if not _applies(case, dtype):
        pytest.skip("bool labels are for {0, 1}")
    pred, labels = _inputs(case, dtype)
    expected_error, expected_grad = case[1]()(pred, labels)
    expected_val = case[1]().validate(pred, labels)
    cost = case[1]()
    error, grad = cost(place.put(pred), place.put(labels))
    assert error == pytest.approx(expected_error, rel=1e-5)
    for got, want in zip(*([place.get(g) for g in grad], expected_grad) if isinstance(grad, list)
                         else ([place.get(grad)], [expected_grad])):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-7)
    assert cost.validate(place.put(pred), place.put(labels)) == pytest.approx(expected_val, rel=1e-5)
    if place.name == "emulated":
        assert any(name.startswith("check_labels_") for name in place.device.launches)


@pytest.mark.parametrize("dtype", [d for d in LABEL_DTYPES if d != "bool"])
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("bad_at", [(0,), (-1,), (1, -1), (2, 5, -3, -1)], ids=["first", "last", "two", "many"])
def test_a_bad_label_gives_the_numpy_message_and_changes_nothing(place, case, dtype, bad_at, no_label_copies):
    """The CostError of the GPU's check is word for word the NumPy backend's (its value, its index
    unravelled in the labels' shape, how many); the cost's state after a good call stays as it was.
    A GPU call that does not ask for its error (queryError=False) does not wait for the check: it
    returns a gradient of zeros, and the next read of the error raises that CostError (with a word
    on the call it came from), the counters without the bad batch."""
    size = int(np.prod(case[3]))
    bad_at = tuple(sorted({i % size for i in bad_at}))
    good_pred, good_labels = _inputs(case, dtype, seed=1)
    pred, labels = _inputs(case, dtype, bad_at)
    with pytest.raises(CostError) as on_numpy:
        case[1]()(pred, labels)
    assert ("labels out of range" in str(on_numpy.value)) == (len(bad_at) > 1)
    check_bad_call(place, case[1](), (good_pred, good_labels), (pred, labels), str(on_numpy.value))


def check_bad_call(place, cost, good, bad, message):
    """After a good call and validate of `good` (pred, target), each call of `bad` raises CostError
    `message` and leaves the cost's state as it was; on a GPU a training call (queryError=False)
    returns zeros, makes its batch error NaN, and its error is raised by the next read of it."""
    cost(*place.put(good))
    cost.validate(*place.put(good))
    before = _state(cost, place)
    late = place.name != "numpy"
    calls = [lambda p, t: cost(p, t), cost.validate] + ([] if late else [lambda p, t: cost(p, t, queryError=False)])
    for call in calls:
        with pytest.raises(CostError) as here:
            call(*place.put(bad))
        assert str(here.value) == message
        _same_state(before, _state(cost, place))
    if late:
        grad = cost(*place.put(bad), queryError=False)
        for g in place.get(grad) if isinstance(grad, list) else [place.get(grad)]:
            assert not np.any(g), "a bad batch's gradient is zeros"
        assert np.isnan(cost._backend.read_scalar(cost.devErr)), "a bad batch's error is NaN (what nn's loss reads)"
        with pytest.raises(CostError) as here:
            cost.getMeanError()
        assert str(here.value).startswith(message + " (in an earlier call")
        assert (cost.numOfSamples, cost.getMeanError()) == (before["numOfSamples"], before["mean"])


def test_a_late_bad_label_raises_at_the_next_call_which_then_changes_nothing(place, no_label_copies):
    """The answer of a training call's check (queryError=False) is read at the cost's next call,
    which raises before it does anything; the calls after go on as usual, and a resetAccumulator()
    between the bad call and its answer keeps the new period's count."""
    if place.name == "numpy":
        pytest.skip("the NumPy backend checks host labels at once")
    rng = np.random.default_rng(3)
    pred = rng.standard_normal((50, 7)).astype(np.float32)
    good, bad = rng.integers(0, 7, 50).astype(np.int32), rng.integers(0, 7, 50).astype(np.int32)
    bad[17] = 9
    cost = CrossEntropy()
    cost(place.put(pred), place.put(good), queryError=False)
    cost(place.put(pred), place.put(bad), queryError=False)
    if place.name == "pycuda":   # (on a GPU the answer lands when the GPU gets there: let it)
        import pycuda.driver
        pycuda.driver.Context.synchronize()
    with pytest.raises(CostError, match=r"got 9 at index 17 \(in an earlier call"):
        cost(place.put(pred), place.put(good), queryError=False)
    assert cost.numOfSamples == 50
    reference = CrossEntropy()
    reference(pred, good)
    assert cost.getMeanError() == pytest.approx(reference.getMeanError(), rel=1e-6)
    error, _ = cost(place.put(pred), place.put(good))
    assert error == pytest.approx(reference.getError(), rel=1e-6) and cost.numOfSamples == 100

    cost.resetAccumulator()
    cost(place.put(pred), place.put(bad), queryError=False)
    cost.resetAccumulator()
    with pytest.raises(CostError, match="got 9 at index 17"):
        cost.getError()
    assert cost.numOfSamples == 0
    cost(place.put(pred), place.put(good), queryError=False)
    assert cost.numOfSamples == 50 and cost.getMeanError() == pytest.approx(reference.getMeanError(), rel=1e-6)


def test_a_subclass_with_its_own_calc_error_is_answered_at_once(place, no_label_copies):
    """A subclass whose calcError is its own may read devErr in the call: its training calls wait
    for the check, as PuzzleLib-style code expects of a CostError."""
    class Halved(CrossEntropy):
        def calcError(self, pred, target):
            self.devErr = self.devErr   # (a hook of its own: PuzzleLib code adjusts devErr here)
            super().calcError(pred, target)
    rng = np.random.default_rng(4)
    pred, labels = rng.standard_normal((20, 5)).astype(np.float32), rng.integers(0, 5, 20).astype(np.int64)
    labels[3] = -1
    with pytest.raises(CostError, match=r"got -1 at index 3$"):
        Halved()(place.put(pred), place.put(labels), queryError=False)


def test_labels_checked_for_one_kernel_are_converted_for_another(place, no_label_copies):
    """CrossEntropy checks 2-D rows' labels as the row kernels' int64 in checkDataShape, and as
    the top-1 kernel's int32 in checkValDataShape: a subclass whose validate checks through
    checkDataShape (as Cost's own checkValDataShape does) hands validate int64 labels, which
    the launch converts on the device (it raised a RuntimeError)."""
    class CheckedOnce(CrossEntropy):
        def checkValDataShape(self, pred, target):
            return self.checkDataShape(pred, target)
    rng = np.random.default_rng(8)
    pred, labels = rng.standard_normal((50, 7)).astype(np.float32), rng.integers(0, 7, 50).astype(np.int16)
    expected = CrossEntropy().validate(pred, labels)
    assert CheckedOnce().validate(place.put(pred), place.put(labels)) == pytest.approx(expected, rel=1e-6)


def test_an_answer_not_landed_is_not_waited_for_by_a_call_and_is_by_get_error():
    """A training step asks whether the answers of earlier calls have landed (an event query) and
    goes on where they have not; getError() waits for them.  (A stand-in answer: on the stand-in and
    in the emulation every answer has landed by the next call.)"""
    from puzzlelib_cost.cost import _LateLabelCheck

    class Pending:
        def __init__(self):
            self.landed, self.waited = False, False

        def ready(self):
            return self.landed

        def bad_label_error(self):
            self.waited = not self.landed
            return CostError("target: expected class labels in [0, 5), got 7 at index 2")

    rng = np.random.default_rng(6)
    pred, labels = rng.standard_normal((8, 5)).astype(np.float32), rng.integers(0, 5, 8)
    cost = CrossEntropy()
    cost(pred, labels, queryError=False)
    answer = Pending()
    cost._lateLabelChecks.append(_LateLabelCheck([answer], 8, cost))
    cost(pred, labels, queryError=False)   # (not landed: no wait, no error)
    assert cost._lateLabelChecks and not answer.waited and cost.numOfSamples == 16
    with pytest.raises(CostError, match=r"got 7 at index 2 \(in an earlier call"):
        cost.getError()
    assert answer.waited and not cost._lateLabelChecks and cost.numOfSamples == 8


# --- a sparse teacher's indices: KLDivergence(target = [indices (N, K), values (N, K)]) ---------

def _sparse_inputs(seed, bad=None, index_dtype=np.int32, n=30, c=50, k=6):
    """pred (n, c) and a teacher's top-k [indices, values] holding 0.9 of its mass; `bad`: indices
    out of range ("range": two, the first at (7, 2)), repeated in a row ("repeat": rows 12 and 25)
    or both (the range first, as the NumPy backend checks them)."""
    rng = np.random.default_rng(seed)
    pred = rng.standard_normal((n, c)).astype(np.float32)
    indices = np.stack([rng.choice(c, k, replace=False) for _ in range(n)]).astype(index_dtype)
    values = (rng.dirichlet(np.ones(k), n) * 0.9).astype(np.float32)
    if bad in ("range", "both"):
        indices[7, 2], indices[20, 0] = c, -3
    if bad in ("repeat", "both"):
        indices[12, 4], indices[25, 0] = indices[12, 1], indices[25, 5]
    return pred, [indices, values]


@pytest.mark.parametrize("sparseTail", ["drop", "bucket"])
@pytest.mark.parametrize("index_dtype", ["uint16", "int32", "int64", "uint64"])
def test_sparse_teacher_indices_are_checked_on_the_device(place, sparseTail, index_dtype, no_label_copies):
    """Good indices of every width give the NumPy backend's results, and never come to the host:
    the range and the rows' distinct columns are checked by kernels."""
    pred, target = _sparse_inputs(5, index_dtype=np.dtype(index_dtype))
    expected_error, expected_grad = KLDivergence(sparseTail=sparseTail)(pred, target)
    cost = KLDivergence(sparseTail=sparseTail)
    error, grad = cost(place.put(pred), place.put(target))
    assert error == pytest.approx(expected_error, rel=1e-5)
    np.testing.assert_allclose(place.get(grad), expected_grad, rtol=1e-4, atol=1e-8)
    cost(place.put(pred), place.put(target), queryError=False)
    assert cost.getMeanError() == pytest.approx(expected_error, rel=1e-5)
    if place.name == "emulated":
        assert {"check_labels_" + LABEL_SUFFIX[index_dtype] + "_i64", "check_distinct_columns"} <= set(
            place.device.launches)


@pytest.mark.parametrize("bad", ["range", "repeat", "both"])
def test_bad_sparse_teacher_indices_give_the_numpy_message_and_change_nothing(place, bad, no_label_copies):
    """As test_a_bad_label_gives_the_numpy_message_and_changes_nothing, for a sparse teacher's
    indices: a repeat in a row is found on the device too, and a training call on a GPU leaves a
    zero gradient and a NaN batch error, and raises at the next read of the error."""
    good_pred, good_target = _sparse_inputs(6)
    pred, target = _sparse_inputs(7, bad)
    with pytest.raises(CostError) as on_numpy:
        KLDivergence()(pred, target)
    assert str(on_numpy.value) == {
        "range": "target indices: expected column indices in [0, 50), got 50 at index (7, 2) (2 labels out of range)",
        "repeat": f"target indices: expected distinct columns in each row, row 12 repeats {target[0][12, 1]}",
        "both": "target indices: expected column indices in [0, 50), got 50 at index (7, 2) (2 labels out of range)",
    }[bad]
    check_bad_call(place, KLDivergence(), (good_pred, good_target), (pred, target), str(on_numpy.value))


def test_sparse_rows_beyond_the_distinct_check_are_checked_on_the_host(place, monkeypatch):
    """Rows of more columns than check_distinct_columns' bitmap holds: the CUDA backend copies the
    indices to the host and checks them there (a synchronisation), with the same messages."""
    from puzzlelib_cost.backends import cuda_backend
    monkeypatch.setattr(cuda_backend, "DISTINCT_MAX_COLUMNS", 40)   # (rows of 50 columns: past it)
    copies = []
    checked_on_the_host = CudaBackend._checked_on_the_host

    def counted(self, info, *args):
        copies.append(info.shape)
        return checked_on_the_host(self, info, *args)
    monkeypatch.setattr(CudaBackend, "_checked_on_the_host", counted)
    pred, target = _sparse_inputs(8)
    expected_error, expected_grad = KLDivergence()(pred, target)
    error, grad = KLDivergence()(place.put(pred), place.put(target))
    assert error == pytest.approx(expected_error, rel=1e-5)
    np.testing.assert_allclose(place.get(grad), expected_grad, rtol=1e-4, atol=1e-8)
    for bad in ("range", "repeat"):
        pred, target = _sparse_inputs(7, bad)
        with pytest.raises(CostError) as on_numpy:
            KLDivergence()(pred, target)
        with pytest.raises(CostError) as here:
            KLDivergence()(place.put(pred), place.put(target), queryError=False)
        assert str(here.value) == str(on_numpy.value)
    assert copies == ([] if place.name == "numpy" else [(30, 6)] * 3)
    if place.name == "emulated":
        assert "check_distinct_columns" not in place.device.launches


# --- KLDivergence's ignoreLabel: the rows left counted on the device -----------------------------

def _ignoring_inputs(seed, n, c=9, ignored=0.3, dtype=np.float32, ignore=-100):
    rng = np.random.default_rng(seed)
    pred = (rng.standard_normal((n, c)) * 2).astype(dtype)
    labels = rng.integers(0, c, n).astype(np.int64)
    labels[rng.random(n) < ignored] = ignore
    return pred, labels


def _counters(cost):
    return cost.batchsize, cost.numOfSamples


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
def test_ignore_label_training_calls_count_the_rows_left_on_the_device(place, dtype, no_label_copies):
    """A training call (queryError=False) with ignoreLabel waits for nothing on a GPU: its labels'
    check counts the ignored rows on the device, whose weights scale each row's grad by
    1 / (T counted) (the grads the NumPy backend gives, counted on the host), and the host's
    counters learn the count at the cost's next call or read of its error (numOfSamples and
    batchsize as the NumPy backend's then, getMeanError and getError too); a batch of ignored
    rows only counts nothing and gives zeros."""
    rtol = 1e-5 if dtype == np.float32 else 1e-12
    cost, expected = KLDivergence(temperature=2.0, ignoreLabel=-100), KLDivergence(temperature=2.0, ignoreLabel=-100)
    for seed, (n, ignored) in enumerate([(40, 0.3), (7, 0.0), (25, 0.8), (6, 1.0), (33, 0.5)]):
        pred, labels = _ignoring_inputs(seed, n, ignored=ignored, dtype=dtype)
        want = expected(pred, labels, queryError=False)
        grad = cost(place.put(pred), place.put(labels), queryError=False)
        np.testing.assert_allclose(place.get(grad), want, rtol=rtol, atol=1e-7 if dtype == np.float32 else 1e-16)
        if ignored == 1.0:
            assert not np.any(place.get(grad))
        assert cost.getError() == pytest.approx(expected.getError(), rel=rtol)
        assert _counters(cost) == _counters(expected)
        assert cost.getMeanError() == pytest.approx(expected.getMeanError(), rel=rtol)
    if place.name == "emulated":
        assert "weights_for_ignored_rows_" + ("f32" if dtype == np.float32 else "f64") in place.device.launches


@pytest.mark.parametrize("n_cols", [5000, 17 * 4096 + 4])
def test_ignore_label_training_calls_on_long_rows(place, n_cols, no_label_copies):
    """The same for the kernels of long rows, whose weights come in other code: the cluster and
    stream kernels (the stand-in's sm_90) and the chunked ones (the emulation's older GPU)."""
    cost, expected = KLDivergence(temperature=0.5, ignoreLabel=-100), KLDivergence(temperature=0.5, ignoreLabel=-100)
    for seed in range(2):
        pred, labels = _ignoring_inputs(seed, 4, c=n_cols, ignored=0.0)
        labels[seed + 1] = -100
        grad = cost(place.put(pred), place.put(labels), queryError=False)
        np.testing.assert_allclose(place.get(grad), expected(pred, labels, queryError=False), rtol=1e-5, atol=1e-9)
    assert cost.getMeanError() == pytest.approx(expected.getMeanError(), rel=1e-5)
    assert _counters(cost) == _counters(expected) == (3, 6)


def test_ignore_label_counts_land_at_the_next_call_across_a_reset(place, no_label_copies):
    """The ignored rows of a training call are taken out of numOfSamples at the cost's next call
    (without a read of the error in between), and out of the period they were counted in only: a
    resetAccumulator() between the call and its answer leaves the new period's count alone."""
    cost = KLDivergence(ignoreLabel=-100)
    first, second = _ignoring_inputs(1, 30, ignored=0.4), _ignoring_inputs(2, 20, ignored=0.25)
    counted = [int(np.count_nonzero(labels != -100)) for _, labels in (first, second)]
    cost(*place.put(first), queryError=False)
    cost(*place.put(second), queryError=False)
    if place.name == "pycuda":   # (the first answer lands when the GPU gets there: let it)
        import pycuda.driver
        pycuda.driver.Context.synchronize()
    cost(*place.put(second), queryError=False)
    cost.getMeanError()
    assert cost.numOfSamples == counted[0] + 2 * counted[1] and cost.batchsize == counted[1]
    cost(*place.put(first), queryError=False)
    cost.resetAccumulator()
    cost(*place.put(second), queryError=False)
    expected = KLDivergence(ignoreLabel=-100)
    expected(*second)
    assert cost.getMeanError() == pytest.approx(expected.getMeanError(), rel=1e-6)
    assert _counters(cost) == (counted[1], counted[1])


def test_a_bad_label_beside_ignored_ones_gives_the_numpy_message_and_changes_nothing(place, no_label_copies):
    good = _ignoring_inputs(3, 30)
    pred, labels = _ignoring_inputs(4, 30)
    labels[[4, 17]] = [9, -3]
    with pytest.raises(CostError) as on_numpy:
        KLDivergence(ignoreLabel=-100)(pred, labels)
    assert str(on_numpy.value) == "target: expected class labels in [0, 9), got 9 at index 4 (2 labels out of range)"
    check_bad_call(place, KLDivergence(ignoreLabel=-100), good, (pred, labels), str(on_numpy.value))


def test_a_copy_made_before_the_answer_counts_the_rows_left(place):
    """Until the answer is read a GPU training call's counters hold pred's rows; a copy (which
    reads the scalars, a synchronisation anyway) reads the answer and holds the rows left."""
    import copy
    cost = KLDivergence(ignoreLabel=-100)
    pred, labels = _ignoring_inputs(5, 30, ignored=0.5)
    cost(place.put(pred), place.put(labels), queryError=False)
    counted = int(np.count_nonzero(labels != -100))
    assert _counters(cost) == ((counted, counted) if place.name == "numpy" else (30, 30))
    copied = copy.deepcopy(cost)
    assert _counters(copied) == (counted, counted)
    assert copied.getMeanError() == pytest.approx(cost.getMeanError(), rel=1e-12)
    assert _counters(cost) == (counted, counted)


# --- a call that asks for its error, its last grad held by the caller --------------------------

@pytest.mark.parametrize("case", ["CrossEntropy", "KLDivergence-ignore", "sparse"])
def test_a_bad_label_with_the_last_grad_held_gives_the_numpy_message_and_changes_nothing(place, case,
                                                                                         no_label_copies):
    """`error, grad = cost(pred, labels)` in a loop holds the last grad while the next call runs: such
    a call answers its labels' check after its work is queued (Cost._lastGradKeptAnyway), and a bad
    label still raises the NumPy backend's CostError with the cost as it was, the grad it held the
    same object with the same values; good calls count their rows at once (ignoreLabel's too)."""
    if case == "sparse":
        make, good, bad = KLDivergence, _sparse_inputs(6), _sparse_inputs(7, "repeat")
    else:
        make = CrossEntropy if case == "CrossEntropy" else lambda: KLDivergence(ignoreLabel=-100)
        good, bad = _ignoring_inputs(3, 30, ignored=0.0 if case == "CrossEntropy" else 0.3), _ignoring_inputs(4, 30)
        bad[1][[4, 17]] = [9, -3]
    with pytest.raises(CostError) as on_numpy:
        make()(*bad)
    expected = make()
    want_error, _ = expected(*good)
    cost = make()
    error, grad = cost(*place.put(good))
    assert error == pytest.approx(want_error, rel=1e-5) and _counters(cost) == _counters(expected)
    held = np.array(place.get(grad))
    before = _state(cost, place)
    assert before["grad_id"] == id(grad)
    with pytest.raises(CostError) as here:
        cost(*place.put(bad))
    assert str(here.value) == str(on_numpy.value)
    _same_state(before, _state(cost, place))
    assert cost.grad is grad
    np.testing.assert_array_equal(place.get(cost.grad), held)
    error, grad = cost(*place.put(good))   # (and on, as usual)
    assert error == pytest.approx(want_error, rel=1e-5) and cost.numOfSamples == 2 * expected.numOfSamples
