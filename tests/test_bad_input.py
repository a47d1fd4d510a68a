"""Every bad input raises CostError (a ValueError) whose message names what was
expected and what was given, and leaves ALL state exactly as before:
error, valError, grad (attribute and the arrays handed out earlier),
batchsize, numOfSamples, getError(), getMeanError(), getValError()."""

import numpy as np
import pytest

from puzzlelib_cost import CostError, CrossEntropy, KLDivergence, gpuarray

try:
    from . import reference as ref
except ImportError:
    import reference as ref

from conftest import ARRAY_KINDS


def host(x):
    return x.get() if isinstance(x, gpuarray.GPUArray) else np.asarray(x)


F32, F64 = np.float32, np.float64


def z(shape, dtype=F32):
    return np.zeros(shape, dtype=dtype)


def probs(shape, dtype=F32):
    return ref.softmax(np.random.default_rng(0).standard_normal(shape)).astype(dtype)


def labels_with(n, value, index):
    lab = np.zeros(n, dtype=np.int64)
    lab[index] = value
    return lab


# (id, constructor kwargs, pred, target, substrings the message must contain;
#  each substring entry may be a tuple of alternatives)
CASES = [
    ("batch_mismatch", {}, z((5, 4)), probs((7, 4)), ["5", "7"]),
    ("batch_mismatch_labels", {}, z((5, 4)), np.zeros(7, np.int64), ["5", "7"]),
    ("batch_mismatch_4d", {}, z((2, 3, 4, 4)), probs((3, 3, 4, 4)), []),
    ("feature_mismatch", {}, z((3, 4)), probs((3, 6)), ["4", "6"]),
    ("feature_mismatch_4d", {}, z((2, 3, 4, 4)), probs((2, 3, 4, 5)), []),
    ("feature_same_size_other_shape", {}, z((3, 2, 6)), probs((3, 6, 2)), []),
    ("feature_flat_vs_3d", {}, z((3, 12)), probs((3, 3, 4)), []),
    ("target_ndim_more", {}, z((3, 4)), probs((3, 4, 1)), []),
    ("float_target_1d", {}, z((3, 4)), np.zeros(3, F32), ["must be integers, not float32"]),
    ("pred_1d", {}, z((5,)), probs((5, 1))[:, 0].copy(), []),
    ("pred_1d_labels", {}, z((5,)), np.zeros(5, np.int64), []),
    ("pred_0d", {}, np.array(1.0, F32), np.array(1.0, F32), []),
    ("int_pred", {}, np.zeros((3, 4), np.int32), np.zeros((3, 4), np.int32), [("int",)]),
    ("int_pred_float_target", {}, np.zeros((3, 4), np.int64), probs((3, 4)), [("int",)]),
    ("int_pred_labels", {}, np.zeros((3, 4), np.int64), np.zeros(3, np.int64), [("int",)]),
    ("bool_pred", {}, np.zeros((3, 4), bool), np.zeros((3, 4), bool), [("bool",)]),
    ("complex_pred", {}, np.zeros((3, 4), np.complex64), np.zeros((3, 4), np.complex64),
     [("complex",)]),
    ("complex_target", {}, z((3, 4)), probs((3, 4)).astype(np.complex64), [("complex",)]),
    ("f32_pred_f64_target", {}, z((3, 4)), probs((3, 4), F64), ["float32", "float64"]),
    ("f64_pred_f32_target", {}, z((3, 4), F64), probs((3, 4), F32), ["float32", "float64"]),
    ("f16_pred_f32_target", {}, z((3, 4), np.float16), probs((3, 4), F32),
     ["float16", "float32"]),
    ("int_target_same_shape", {}, z((3, 4)), np.zeros((3, 4), np.int64), []),
    ("bool_target_same_shape", {}, z((3, 4)), np.zeros((3, 4), bool), []),
    ("maxlabels_mismatch", {"maxlabels": 5}, z((3, 4)), probs((3, 4)), ["5", "4"]),
    ("maxlabels_mismatch_labels", {"maxlabels": 5}, z((3, 4)), np.zeros(3, np.int64),
     ["5", "4"]),
    ("maxlabels_mismatch_bigger", {"maxlabels": 3}, z((3, 4)), np.zeros(3, np.int64), []),
    ("label_too_big", {}, z((8, 5)), labels_with(8, 11, 6), ["11", "6"]),
    ("label_equal_C", {}, z((8, 5)), labels_with(8, 5, 3), ["5", "3"]),
    ("label_too_big_int32", {}, z((8, 5)), labels_with(8, 9, 7).astype(np.int32), ["9", "7"]),
    ("label_too_big_maxlabels", {"maxlabels": 5}, z((8, 5)), labels_with(8, 5, 2), ["5"]),
    ("label_negative", {}, z((8, 5)), labels_with(8, -3, 1), ["-3"]),
    ("label_minus_one", {}, z((8, 5)), labels_with(8, -1, 4), ["-1"]),
    ("label_huge", {}, z((4, 5)), labels_with(4, 2 ** 40, 0), []),
    ("labels_shape_N1", {}, z((8, 5)), np.zeros((8, 1), np.int64), []),
    ("labels_too_many", {}, z((8, 5)), np.zeros(9, np.int64), []),
    ("labels_0d", {}, z((1, 5)), np.array(0, np.int64), []),
    ("empty_batch", {}, z((0, 4)), z((0, 4)), []),
    ("empty_batch_labels", {}, z((0, 4)), np.zeros(0, np.int64), []),
    ("empty_batch_4d", {}, z((0, 3, 2, 2)), z((0, 3, 2, 2)), []),
    ("zero_classes", {}, z((3, 0)), z((3, 0)), []),
    ("zero_classes_labels", {}, z((3, 0)), np.zeros(3, np.int64), []),
    ("zero_size_spatial", {}, z((2, 3, 0, 4)), z((2, 3, 0, 4)), []),
    ("pred_list", {}, [[0.0, 1.0], [1.0, 0.0]], probs((2, 2)), [("list",)]),
    ("target_list", {}, z((2, 2)), [[0.5, 0.5], [0.5, 0.5]], [("list",)]),
    ("pred_scalar", {}, 1.0, probs((2, 2)), [("float",)]),
    ("target_scalar", {}, z((2, 2)), 0.5, [("float",)]),
    ("pred_none", {}, None, probs((2, 2)), [("None",)]),
    ("target_none", {}, z((2, 2)), None, [("None",)]),
    ("pred_string", {}, "abc", probs((2, 2)), [("str",)]),
    # (a list or tuple target is a sparse teacher [indices, values]: labels or rows as Python
    # sequences were read as one, and the message spoke of indices the user never passed)
    ("target_python_labels", {}, z((2, 3)), [0, 2], ["expected a numpy array", "list of 2", "int"]),
    ("target_python_labels_3", {}, z((3, 3)), [0, 2, 1], ["expected a numpy array", "list of 3"]),
    ("target_tuple_of_rows", {}, z((2, 3)), (probs((3,)), probs((3,))), ["sparse teacher", "float32"]),
    ("labels_normtarget", {"normTarget": True}, z((4, 5)), np.zeros(4, np.int64), []),
    ("labels_normtarget_int32", {"normTarget": True}, z((4, 5)), np.zeros(4, np.int32), []),
    ("labels_4d_pred", {}, z((2, 3, 4, 4)), np.zeros(2, np.int64), []),
    ("labels_3d_pred", {}, z((2, 3, 4)), np.zeros(2, np.int64), []),
    ("labels_4d_pred_full_shape", {}, z((2, 3, 4, 4)), np.zeros((2, 4, 4), np.int64), []),
]

IDS = [c[0] for c in CASES]


def snapshot(div, handed_out):
    """Everything observable; handed_out are grads returned earlier."""
    def call(f):
        try:
            return ("ok", f())
        except CostError:
            return ("CostError",)

    return dict(
        error=div.error,
        valError=div.valError,
        grad=None if div.grad is None else host(div.grad).copy(),
        grad_type=type(div.grad),
        batchsize=div.batchsize,
        numOfSamples=div.numOfSamples,
        getError=call(div.getError),
        getMeanError=call(div.getMeanError),
        handed_out=[host(g).copy() for g in handed_out],
    )


def assert_same(before, after):
    for key in ("error", "valError", "batchsize", "numOfSamples", "getError",
                "getMeanError", "grad_type"):
        assert before[key] == after[key], "%s changed: %r -> %r" % (key, before[key], after[key])
    if before["grad"] is None:
        assert after["grad"] is None
    else:
        assert after["grad"] is not None
        assert after["grad"].dtype == before["grad"].dtype
        np.testing.assert_array_equal(after["grad"], before["grad"])
    for a, b in zip(before["handed_out"], after["handed_out"]):
        np.testing.assert_array_equal(a, b)


def used_div(kwargs, rng_seed=0):
    """A KLDivergence with non-trivial state: two training batches and one
    validation batch of a shape that is valid for the constructor kwargs."""
    div = KLDivergence(**kwargs)
    rng = np.random.default_rng(rng_seed)
    c = kwargs.get("maxlabels") or 5
    handed = []
    for n in (3, 2):
        pred = rng.standard_normal((n, c)).astype(F32)
        if kwargs.get("normTarget"):
            target = rng.standard_normal((n, c)).astype(F32)
        else:
            target = ref.softmax(rng.standard_normal((n, c))).astype(F32)
        _, g = div(pred, target)
        handed.append(g)
    div.validate(pred, target)
    assert div.valError is not None and div.numOfSamples == 5
    return div, handed


def check_message(exc, must):
    msg = str(exc)
    assert msg, "CostError without a message"
    for item in must:
        alts = item if isinstance(item, tuple) else (item,)
        assert any(a in msg for a in alts), "message %r does not mention any of %r" % (msg, alts)


@pytest.mark.parametrize("name,kwargs,pred,target,must", CASES, ids=IDS)
@pytest.mark.parametrize("query", [True, False])
def test_call_rejects_and_keeps_state(name, kwargs, pred, target, must, query):
    div, handed = used_div(kwargs)
    before = snapshot(div, handed)
    with pytest.raises(CostError) as info:
        div(pred, target, queryError=query)
    assert isinstance(info.value, ValueError)
    check_message(info.value, must)
    assert_same(before, snapshot(div, handed))


@pytest.mark.parametrize("name,kwargs,pred,target,must", CASES, ids=IDS)
def test_validate_rejects_and_keeps_state(name, kwargs, pred, target, must):
    div, handed = used_div(kwargs)
    before = snapshot(div, handed)
    with pytest.raises(CostError) as info:
        div.validate(pred, target)
    check_message(info.value, must)
    assert_same(before, snapshot(div, handed))
    assert div.getValError() == before["valError"]


@pytest.mark.parametrize("name,kwargs,pred,target,must", CASES, ids=IDS)
def test_fresh_object_rejects_and_stays_fresh(name, kwargs, pred, target, must):
    div = KLDivergence(**kwargs)
    before = snapshot(div, [])
    with pytest.raises(CostError):
        div(pred, target)
    with pytest.raises(CostError):
        div.validate(pred, target)
    after = snapshot(div, [])
    assert_same(before, after)
    assert after["getError"] == ("CostError",)
    assert after["getMeanError"] == ("CostError",)


GPU_CASES = [
    ("batch_mismatch", {}, z((5, 4)), probs((7, 4))),
    ("feature_mismatch", {}, z((3, 4)), probs((3, 6))),
    ("f32_pred_f64_target", {}, z((3, 4)), probs((3, 4), F64)),
    ("int_pred", {}, np.zeros((3, 4), np.int32), np.zeros((3, 4), np.int32)),
    ("label_too_big", {}, z((8, 5)), labels_with(8, 11, 6)),
    ("label_negative", {}, z((8, 5)), labels_with(8, -3, 1)),
    ("labels_4d_pred", {}, z((2, 3, 4, 4)), np.zeros(2, np.int64)),
    ("labels_normtarget", {"normTarget": True}, z((4, 5)), np.zeros(4, np.int64)),
    ("maxlabels_mismatch", {"maxlabels": 5}, z((3, 4)), probs((3, 4))),
    ("empty_batch", {}, z((0, 4)), z((0, 4))),
    ("zero_classes", {}, z((3, 0)), z((3, 0))),
    ("pred_1d", {}, z((5,)), z((5,))),
]


@pytest.mark.parametrize("kind", ARRAY_KINDS[1:])
@pytest.mark.parametrize("name,kwargs,pred,target", GPU_CASES, ids=[c[0] for c in GPU_CASES])
def test_gpuarray_inputs_rejected_and_keep_state(name, kwargs, pred, target, kind):
    div, handed = used_div(kwargs)
    before = snapshot(div, handed)
    with pytest.raises(CostError):
        div(gpuarray.to_gpu(pred), gpuarray.to_gpu(target))
    with pytest.raises(CostError):
        div.validate(gpuarray.to_gpu(pred), gpuarray.to_gpu(target))
    assert_same(before, snapshot(div, handed))


def test_constructor_maxlabels_ok_and_good_call_after_bad_one():
    # a rejected call does not poison the object: the next good call
    # accumulates exactly as if the bad call never happened
    rng = np.random.default_rng(3)
    div = KLDivergence(maxlabels=5)
    p1 = rng.standard_normal((3, 5)).astype(F32)
    l1 = np.array([0, 4, 2])
    e1, _ = div(p1, l1)
    with pytest.raises(CostError):
        div(p1, np.array([0, 5, 2]))
    with pytest.raises(CostError):
        div(rng.standard_normal((3, 4)).astype(F32), l1)
    p2 = rng.standard_normal((2, 5)).astype(F32)
    l2 = np.array([1, 3])
    e2, _ = div(p2, l2)
    assert div.numOfSamples == 5 and div.batchsize == 2
    s1 = ref.kl_reference(p1, l1)["per_sample"].sum()
    s2 = ref.kl_reference(p2, l2)["per_sample"].sum()
    assert div.getMeanError() == pytest.approx((s1 + s2) / 5, rel=1e-5)
    assert e2 == pytest.approx(s2 / 2, rel=1e-5)


def test_label_error_message_names_first_offending_position():
    # the message names the offending value and its index
    div = KLDivergence()
    lab = np.array([0, 1, 2, 3, 1, 2, 1, 0, 2, 1, 0, 17, 1], dtype=np.int64)
    with pytest.raises(CostError) as info:
        div(z((13, 4)), lab)
    assert "17" in str(info.value) and "11" in str(info.value)


def test_nan_and_inf_are_not_bad_input():
    # non-finite values are data, not shape/type errors: no CostError
    div = KLDivergence()
    pred = np.array([[np.nan, 0.0], [0.0, -np.inf]], dtype=F32)
    target = np.array([[0.5, 0.5], [1.0, 0.0]], dtype=F32)
    error, grad = div(pred, target)
    assert np.isnan(error)
    assert div.numOfSamples == 2


def test_sparse_teacher_index_beyond_int64_is_reported_as_given():
    # a uint64 index of 2**63 + 1 was converted to int64 before its check and reported as -2**63 + 1
    indices = np.array([[0, 2 ** 63 + 1], [1, 2], [3, 4]], np.uint64)
    div, handed = used_div({})
    before = snapshot(div, handed)
    with pytest.raises(CostError) as info:
        div(z((3, 5)), [indices, np.full((3, 2), 0.3, F32)])
    check_message(info.value, ["[0, 5)", "9223372036854775809"])
    assert "-9223372036854775807" not in str(info.value)
    assert_same(before, snapshot(div, handed))


class _CudaInterfaceArray:
    """An object that says it is a CUDA array (never dereferenced: refused before any device work)."""

    def __init__(self, shape, typestr, strides=None):
        self.__cuda_array_interface__ = {"shape": shape, "typestr": typestr, "data": (0x1000, False),
                                         "strides": strides, "version": 3}


@pytest.mark.pycuda   # (the stand-in, once loaded, stays: conftest runs these tests last)
@pytest.mark.parametrize("layout", ["transposed", "reversed"])
def test_gpuarray_to_gpu_takes_any_layout_as_the_host_path_does(cuda_driver, layout):
    # pycuda kept a transposed array's Fortran order (then refused by the CUDA backend as a strided
    # view the user never made) and failed on a negative stride (OverflowError, not a CostError)
    from puzzlelib_cost import MSE
    rng = np.random.default_rng(0)
    a = rng.standard_normal((8, 6)).astype(F32)
    view = a.T if layout == "transposed" else a[::-2]
    target = rng.standard_normal(view.shape).astype(F32)
    on_gpu = gpuarray.to_gpu(view)
    assert np.array_equal(on_gpu.get(), view)
    error, grad = MSE()(on_gpu, gpuarray.to_gpu(target))
    d = view.astype(F64) - target
    assert error == pytest.approx((d * d).sum() / (2 * d.size), rel=1e-6)
    assert np.allclose(grad.get(), -d / d.size, rtol=1e-6, atol=0)


@pytest.mark.pycuda
def test_gpuarray_to_gpu_keeps_a_0_d_array_0_d_as_the_host_path_does(cuda_driver):
    # (ascontiguousarray made it 1-d: a cost refused the host array and ran on its GPU copy)
    from puzzlelib_cost import MSE
    on_gpu = gpuarray.to_gpu(np.array(2.0, F32))
    assert on_gpu.shape == () and on_gpu.get() == 2.0
    with pytest.raises(CostError, match="at least 1 dimension"):
        MSE()(on_gpu, gpuarray.to_gpu(np.array(1.0, F32)))


@pytest.mark.parametrize("typestr", [">f4", ">i8"])
def test_cuda_array_in_non_native_byte_order_is_refused(typestr):
    # the kernels (and the host copy of labels) read a CUDA array's bytes as native: a big-endian
    # one was described as plain float32/int64 and would give wrong values
    div, handed = used_div({})
    before = snapshot(div, handed)
    with pytest.raises(CostError) as info:
        div(_CudaInterfaceArray((3, 4), typestr), _CudaInterfaceArray((3, 4), typestr))
    check_message(info.value, ["pred", "native byte order", typestr])
    assert_same(before, snapshot(div, handed))


class _RawInterface:
    """An object whose __cuda_array_interface__ is whatever it is given."""

    def __init__(self, interface):
        self.__cuda_array_interface__ = interface


_GOOD_INTERFACE = {"shape": (3, 4), "typestr": "<f4", "data": (0x1000, False), "strides": None, "version": 3}


@pytest.mark.parametrize("change,message", [
    ({"shape": None}, "'shape' must be a tuple of non-negative integers, got None"),
    ({"shape": (-3, -4)}, "got (-3, -4)"),             # (counted -3 samples)
    ({"shape": (3.0, 4.0)}, "got (3.0, 4.0)"),          # (failed inside pycuda, past the checks)
    ({"shape": (True, 4)}, "got (True, 4)"),
    ({"typestr": None}, "'typestr' must be a type string"),   # (np.dtype(None): float32 read as float64)
    ({"typestr": "zz"}, "got 'zz'"),
    ({"data": None}, "'data' must be (pointer, read_only), got None"),
    ({"data": (4096.0, False)}, "'data' must be (pointer, read_only)"),
    ({"data": (0, False)}, "'data' points nowhere (0) for 12 elements"),   # (a kernel's fault)
    ({"data": (0x1001, False)}, "expected data aligned to its 4-byte float32 elements, got address 0x1001"),
    ({"strides": (16,)}, "'strides' must be None or 2 integers"),   # (zip dropped the second)
    ({"mask": object()}, "'mask' must be None"),                    # (as a masked numpy array)
    ({"version": "3"}, "'version' must be an integer, got '3'"),
    (None, "must be a dict, got 'list'"),
])
def test_a_malformed_cuda_array_interface_is_a_cost_error(change, message):
    """Every field of the interface is checked before use: a missing one raised KeyError, a wrong
    type TypeError, and some were taken as they were (a negative shape counted negative samples,
    no typestr read float32 memory as float64, a misaligned or null pointer faulted in a kernel:
    on a GPU, an error that leaves the context unusable)."""
    interface = [1, 2] if change is None else {key: value for key, value in {**_GOOD_INTERFACE, **change}.items()
                                               if key != "shape" or value is not None}
    div, handed = used_div({})
    before = snapshot(div, handed)
    with pytest.raises(CostError) as info:
        div(_RawInterface(interface), _CudaInterfaceArray((3, 4), "<f4"))
    check_message(info.value, ["pred: ", message])
    assert_same(before, snapshot(div, handed))


def test_an_own_dtype_numpy_does_not_know_leaves_the_typestr_to_say():
    """An interface array whose .dtype NumPy cannot read (a torch subclass's, say) was refused as
    a bad typestr, which was fine: the typestr gives the dtype."""
    from puzzlelib_cost.arrays import describe

    class OwnDtype(_RawInterface):
        dtype = object()
    info = describe(OwnDtype(dict(_GOOD_INTERFACE)), "pred")
    assert info.dtype == "float32" and info.shape == (3, 4) and info.pointer == 0x1000


def test_a_failure_inside_the_computation_leaves_the_state_as_it_was(monkeypatch):
    # Past the checks, the work can still fail (out of memory; numba's TypingError on big-endian
    # labels did): reset() had cleared error and grad, so getError() answered None afterwards.
    from puzzlelib_cost import row_softmax
    div, handed = used_div({})
    before = snapshot(div, handed)
    pred, target = z((4, 5)), probs((4, 5))

    def out_of_memory(*args, **kwargs):
        raise MemoryError("no memory for grad")
    with monkeypatch.context() as patch:
        patch.setattr(row_softmax, "run", out_of_memory)
        with pytest.raises(MemoryError):
            div(pred, target)
    after = snapshot(div, handed)
    assert after["grad"] is None   # (let go before the failed call's own: never two grads at once)
    assert_same({**before, "grad": None, "grad_type": type(None)}, after)
    assert div.getError() == before["getError"][1]
    # and the next call counts as if the failed one had not been made: 3 + 2 samples, then these 4
    error, _ = div(pred, target)
    assert div.numOfSamples == 9 and div.batchsize == 4
    assert error == pytest.approx(ref.kl_reference(pred, target)["error"], rel=1e-5, abs=1e-7)
    assert div.getMeanError() == pytest.approx((5 * before["getMeanError"][1] + 4 * error) / 9, rel=1e-12)


def test_a_failure_after_the_error_is_stored_puts_the_error_back(monkeypatch):
    """The elementwise costs store the batch error (devErr, and accumErr in place) before they
    make their grad: a failure there left getError() and getMeanError() holding the failed batch
    (an Abs of 5s after one of 1s: mean error 6, not 1)."""
    from puzzlelib_cost import Abs
    from puzzlelib_cost.backends import numpy_backend
    cost = Abs()
    pred, target = np.ones((2, 2), F32), np.zeros((2, 2), F32)
    cost(pred, target)

    def out_of_memory(*args, **kwargs):
        raise MemoryError("no memory for grad")
    with monkeypatch.context() as patch:
        patch.setattr(numpy_backend.NumpyBackend, "output", staticmethod(out_of_memory))
        with pytest.raises(MemoryError):
            cost(5 * pred, target)
    assert cost.getError() == 1.0 and cost.getMeanError() == 1.0 and cost.numOfSamples == 2
    error, _ = cost(3 * pred, target)
    assert error == 3.0 and cost.getMeanError() == 2.0


def test_an_interrupt_before_the_batch_is_counted_puts_the_error_back(monkeypatch):
    """A KeyboardInterrupt once the work was done but before updateState counted the batch left
    the batch's error in the accumulator and not its samples in numOfSamples: getMeanError()
    wrong from then on (1.48 for 0.99 in an audit's run)."""
    from puzzlelib_cost import MSE
    cost = MSE()
    pred, target = np.ones((2, 2), F32), np.zeros((2, 2), F32)
    cost(pred, target)
    update = type(cost).updateState

    def interrupted(self, samples):
        raise KeyboardInterrupt
    with monkeypatch.context() as patch:
        patch.setattr(type(cost), "updateState", interrupted)
        with pytest.raises(KeyboardInterrupt):
            cost(5 * pred, target)
    assert type(cost).updateState is update
    assert cost.getError() == 0.5 and cost.getMeanError() == 0.5 and cost.numOfSamples == 2
    cost(3 * pred, target)
    assert cost.getMeanError() == pytest.approx((0.5 + 4.5) / 2, rel=1e-12)


def _huge(shape, dtype=np.float16):
    """An array of `shape` over one element (stride 0): the checks read shapes, not memory."""
    return np.lib.stride_tricks.as_strided(np.zeros(1, dtype), shape=shape, strides=(0,) * len(shape))


@pytest.mark.parametrize("name", ["CrossEntropy", "CrossEntropy spatial", "SVM", "CTC vocabulary", "CTC labels",
                                  "CTC sequences"])
def test_more_classes_or_labels_than_int32_holds_are_refused(name):
    """The GPU kernels take labels, their positions and mostProb as int32: a label of 2^31 wrapped
    to -2^31 (CTC's grad then wrote 4 GB before its array; an audit's reading of the kernels).  And
    CTC gives each sequence a block: 2^31 of them passed every check, then failed the launch."""
    from puzzlelib_cost import CTC, SVM
    big = 2 ** 31
    call = {"CrossEntropy": lambda: CrossEntropy()(_huge((1, big)), np.zeros(1, np.int64)),
            "CrossEntropy spatial": lambda: CrossEntropy()(_huge((1, big, 2)), np.zeros((1, 2), np.int64)),
            "SVM": lambda: SVM()(_huge((1, big)), np.zeros(1, np.int64)),
            "CTC vocabulary": lambda: CTC(0)([_huge((1, 1, big)), np.array([1])], [np.array([1]), np.array([1])]),
            "CTC labels": lambda: CTC(0)([np.zeros((1, 1, 3), F32), np.array([1])],
                                         [_huge((big,), np.int32), np.array([big])]),
            "CTC sequences": lambda: CTC(0)([_huge((1, big, 1), np.float16), _huge((big,), np.int64)],
                                            [np.zeros(0, np.int64), _huge((big,), np.int64)])}[name]
    with pytest.raises(CostError, match="at most 2147483647"):
        call()


def test_a_masked_array_is_refused_not_its_mask_ignored():
    """MSE of a masked array counted its masked values as any others (E = 2500.25 for [1, 100]
    with the 100 masked) and handed back an unmasked MaskedArray grad."""
    from puzzlelib_cost import MSE
    masked = np.ma.array([[1.0, 100.0]], mask=[[False, True]], dtype=F32)
    for pred, target in [(masked, np.zeros((1, 2), F32)), (np.zeros((1, 2), F32), masked)]:
        with pytest.raises(CostError) as info:
            MSE()(pred, target)
        check_message(info.value, ["masked array", "filled"])


def test_weights_numpy_cannot_read_raise_cost_error():
    # a bfloat16 torch tensor: np.asarray raised torch's TypeError out of the constructor
    torch = pytest.importorskip("torch")
    with pytest.raises(CostError) as info:
        CrossEntropy(weights=torch.ones(4, dtype=torch.bfloat16))
    check_message(info.value, ["weights", "1-D float array", "Tensor"])
    assert CrossEntropy(weights=torch.ones(4, dtype=torch.float32)).weights.tolist() == [1.0] * 4


@pytest.mark.parametrize("shape,strides,contiguous", [
    ((4, 1), (4, 8), True), ((4, 1), (4, 0), True), ((1, 5), (0, 4), True), ((0, 3), (4, 4), True),
    ((3, 4), (16, 4), True), ((3, 4), (32, 4), False), ((3, 4), (4, 12), False), ((4, 2), (8, 0), False)])
def test_cuda_interface_strides_of_extent_1_do_not_count(shape, strides, contiguous):
    # as NumPy, CuPy and torch decide it: (4, 1) with strides (4, 8) was refused as a strided view
    from puzzlelib_cost import arrays
    info = arrays.describe(_CudaInterfaceArray(shape, "<f4", strides), "pred")
    assert info.contiguous is contiguous


def test_cost_whose_accumulators_are_out_of_reach_says_why():
    # A forked child calling, on host arrays, a cost object its parent ran on the GPU: reading the
    # GPU's accumulators (to carry them to the CPU backend) raised the bare "process was forked"
    # message, as if the call's own arrays were the problem.
    from puzzlelib_cost import MSE
    from puzzlelib_cost.backends.pycuda_device import FORKED

    class ForkedAway:
        name = "cuda"

        def read_scalar(self, scalar):
            raise CostError(FORKED)

    cost, x = MSE(), np.ones((2, 3), np.float32)
    cost(x, 0 * x)
    gone = cost._backend = ForkedAway()
    with pytest.raises(CostError) as info:
        cost(x, 0 * x)
    check_message(info.value, ["accumulated error", "cuda backend", "cpu backend", "forked", "new cost object"])
    assert cost._backend is gone and cost.numOfSamples == 2 and cost.batchsize == 2


def test_constructor_arguments_set_as_attributes_are_checked_as_the_constructor_checks_them():
    """kl.temperature = -1 ran (a NaN-free, wrong error), kl.normTarget = "False" was taken as True,
    svm.mode = "l3" ran as l1, and svm.mode = "l2" was ignored (its kernel stayed l1's)."""
    from puzzlelib_cost import CTC, SVM
    rng = np.random.default_rng(3)
    pred, target = rng.standard_normal((3, 5)).astype(np.float32), rng.standard_normal((3, 5)).astype(np.float32)
    kl = KLDivergence(normTarget=True)
    for name, bad in (("temperature", -1.0), ("normTarget", "False"), ("divergence", "kl"), ("beta", 0.3),
                      ("ignoreLabel", 1.5), ("maxlabels", 0), ("sparseTail", "keep")):
        with pytest.raises(CostError, match=name):
            setattr(kl, name, bad)
    assert repr(kl) == repr(KLDivergence(normTarget=True))   # nothing changed
    kl.temperature = 2
    assert kl.temperature == 2.0 and type(kl.temperature) is float
    def log_softmax(v):
        v = v.astype(np.float64) / 2
        return v - v.max(1, keepdims=True) - np.log(np.exp(v - v.max(1, keepdims=True)).sum(1, keepdims=True))
    want = np.sum(np.exp(log_softmax(target)) * (log_softmax(target) - log_softmax(pred))) / 3
    assert kl(pred, target)[0] == pytest.approx(want, rel=1e-6)
    scores, labels = rng.standard_normal((4, 3)).astype(np.float32), np.array([0, 2, 1, 2], np.int32)
    svm = SVM()
    with pytest.raises(CostError, match="mode"):
        svm.mode = "l3"
    svm.mode = "l2"
    sign = np.where(np.arange(3) == labels[:, None], 1.0, -1.0)
    assert svm(scores, labels)[0] == pytest.approx(
        np.sum(np.maximum(0, 1 - scores.astype(np.float64) * sign) ** 2) / scores.size, rel=1e-6)
    ce = CrossEntropy(weights=[1.0, 2.0, 3.0])
    with pytest.raises(CostError, match="weights"):
        ce.weights = [[1.0]]
    with pytest.raises(ValueError):   # (its kept copy: `ce.weights = new` changes them, checked)
        ce.weights[0] = 5.0
    ce.weights = [3.0, 1.0, 1.0]
    assert ce.weights.dtype == np.float64 and ce.weights.tolist() == [3.0, 1.0, 1.0]
    with pytest.raises(CostError, match="blank"):
        CTC(blank=0, vocabsize=4).blank = 4


def test_a_temperature_that_is_not_a_number_names_its_type():
    """A 0-d tensor's 'tensor(2.)' read as a contradiction of 'expected a finite number'."""
    with pytest.raises(CostError, match=r"temperature: expected a finite number > 0 .* got a numpy.ndarray array\(\[2\.\]\)"):
        KLDivergence(temperature=np.array([2.0]))
    with pytest.raises(CostError, match=r"beta: .* got a str '0.2'"):
        KLDivergence(divergence="jsd", beta="0.2")
    with pytest.raises(CostError, match=r"got -1.0$"):
        KLDivergence(temperature=-1.0)


def test_subclasses_may_set_arguments_before_their_parents_constructor_and_their_own_kernel():
    """Cost.__setattr__'s check took a subclass's attribute set before KLDivergence.__init__ for a
    change of a made cost (KeyError); SVM's kernel became a property without a setter."""
    from puzzlelib_cost import SVM

    class Annealed(KLDivergence):
        def __init__(self, temperature):
            self.temperature = temperature   # (PuzzleLib-style code sets its attributes first)
            super().__init__(temperature=temperature)
    annealed = Annealed(2.0)
    annealed.temperature = 3
    assert annealed.temperature == 3.0
    with pytest.raises(CostError, match="temperature"):
        annealed.temperature = 0

    class Squared(SVM):
        def __init__(self):
            super().__init__()
            self.kernel = "svm_l2"
    assert Squared().kernel == "svm_l2" and SVM("l2").kernel == "svm_l2" and SVM().kernel == "svm_l1"


def test_a_copied_cost_keeps_its_weights_read_only():
    import copy
    import pickle
    ce = CrossEntropy(weights=[1.0, 2.0])
    for twin in (copy.deepcopy(ce), pickle.loads(pickle.dumps(ce))):
        assert not twin.weights.flags.writeable and twin.weights.tolist() == [1.0, 2.0]


def test_every_cost_names_its_constructor_arguments():
    """_ARGUMENTS is where a cost's arguments are checked when set, and what nn's modules pass on
    and expose: a constructor argument left out of it would be neither."""
    import inspect
    import puzzlelib_cost
    for name in ("Abs", "BCE", "CTC", "CrossEntropy", "Hinge", "KLDivergence", "L1Hinge", "MSE", "SVM", "SmoothL1",
                 "Multi"):
        cost = getattr(puzzlelib_cost, name)
        assert set(cost._ARGUMENTS) == set(inspect.signature(cost).parameters), name
