"""KLDivergence's distillation options, temperature and ignoreLabel, on every place (NumPy,
the CUDA kernels in the CPU emulation, pycuda).

    KLDivergence(maxlabels=None, normTarget=False, temperature=1.0, ..., ignoreLabel=None)

q = softmax(pred / T) per sample (all non-batch dims), p = softmax(target / T) with normTarget,
else target (a distribution) or one-hot of integer labels.  Rows whose label == ignoreLabel are
left out: E = sum of the counted rows' KL / N_c, grad = (p - s q) / (T * N_c) on counted rows (s = sum p) and
exactly 0 on ignored ones (the exact -dE/dpred: the 1/T factor, no T^2).

The float64 reference below (kl_ref) is written here, independently of the library and of
tests/reference.py; only the tolerance helpers come from tests/cost_reference.py."""
import math
import numpy as np
import pytest

from puzzlelib_cost import CostError, KLDivergence

import cost_reference as R

F16, F32, F64, BF16 = R.F16, R.F32, R.F64, R.BF16
rng_for, gen, run_and_compare = R.rng_for, R.kl_inputs, R.check_call


# ------------------------------------------------------------------ the float64 reference


def kl_ref(pred, target, T=1.0, normTarget=False, ignoreLabel=None):
    """E, -dE/dpred and the size of the terms whose rounding E carries, in float64, from the
    inputs exactly as given (a 16-bit or float32 input converts to float64 exactly)."""
    pred = np.asarray(pred)
    d = R.softmax_and_target(pred, target, T, normTarget, ignoreLabel)
    z, logq, q, p, logp, counted, t_mag = (d[k] for k in ("z", "log_q", "q", "p", "log_p", "counted", "t_mag"))
    with np.errstate(invalid="ignore"):      # 0 log 0 = 0: p == 0 contributes exactly 0
        terms = np.where(p == 0, 0.0, p * (logp - logq))
        absterms = np.where(p == 0, 0.0, p * (np.abs(logp) + np.abs(logq) + np.abs(z) + 1))
    # rounding of each row: a few u per term, of log q (|z|, the row's max, the log-sum-exp) and
    # of log p (for normTarget the target logits' size as well)
    mag = absterms.sum(axis=1) + np.abs(z).max(axis=1) + t_mag + 1
    rows = terms.sum(axis=1)
    nc = int(counted.sum())
    with np.errstate(invalid="ignore"):   # (s q: the exact -grad where a row of p does not sum to 1)
        grad = np.where(counted[:, None], (p - p.sum(axis=1, keepdims=True) * q) / (T * max(nc, 1)), 0.0)
    error = float(rows[counted].sum() / nc) if nc else 0.0
    scale = float(mag[counted].sum() / nc) if nc else 0.0
    return dict(error=error, grad=grad.reshape(pred.shape), scale=scale, counted=counted, nc=nc,
                rows=rows, val=error)


def with_ignored(rng, labels, ignoreLabel, fraction=0.3):
    """labels with about `fraction` of the rows (at least one, not all) set to ignoreLabel."""
    labels = labels.astype(np.int64)
    n = labels.shape[0]
    k = min(max(1, int(round(fraction * n))), n - 1)
    labels[rng.choice(n, size=k, replace=False)] = ignoreLabel
    return labels


# ------------------------------------------------------------------ the reference itself

def test_reference_closed_forms_with_temperature():
    # uniform q, labels: E = log C at any T; grad = (e_y - 1/C) / (T N)
    r = kl_ref(np.zeros((2, 4)), np.array([1, 3]), T=2.5)
    assert r["error"] == pytest.approx(math.log(4), rel=1e-15)
    np.testing.assert_allclose(r["grad"], (np.eye(4)[[1, 3]] - 0.25) / (2.5 * 2), rtol=0, atol=1e-17)
    # two classes, logits (0, d) at temperature T, target (a, 1 - a)
    a, d, T = 0.3, 1.7, 3.0
    q1 = 1 / (1 + math.exp(d / T))
    kl = a * math.log(a / q1) + (1 - a) * math.log((1 - a) / (1 - q1))
    r = kl_ref(np.array([[0.0, d]]), np.array([[a, 1 - a]]), T=T)
    assert r["error"] == pytest.approx(kl, rel=1e-14)
    np.testing.assert_allclose(r["grad"], [[(a - q1) / T, (q1 - a) / T]], rtol=1e-14)
    # normTarget with the target equal to pred: 0 at any temperature
    x = np.array([[0.3, -1.2, 2.0]])
    assert abs(kl_ref(x, x, T=0.5, normTarget=True)["error"]) < 1e-15
    # ignoreLabel: only the counted rows, divided by their count
    r = kl_ref(np.zeros((3, 4)), np.array([-100, 2, -100]), T=2.0, ignoreLabel=-100)
    assert r["nc"] == 1 and r["error"] == pytest.approx(math.log(4), rel=1e-15)
    np.testing.assert_allclose(r["grad"][1], (np.eye(4)[2] - 0.25) / 2.0, rtol=0, atol=1e-17)
    assert np.all(r["grad"][[0, 2]] == 0)


@pytest.mark.parametrize("case", ["dist", "norm", "labels", "labels_ignored"])
def test_reference_grad_is_minus_fd_of_reference_error(case):
    rng = rng_for("fdref", case)
    kind = "labels" if case.startswith("labels") else case
    pred, target = gen(rng, (4, 5), F64, kind)
    ign = None
    if case == "labels_ignored":
        ign, target = -100, with_ignored(rng, target, -100)
    f = lambda v: kl_ref(v, target, T=2.0, normTarget=kind == "norm", ignoreLabel=ign)["error"]
    fd = R.finite_difference(f, pred, range(pred.size))
    grad = kl_ref(pred, target, T=2.0, normTarget=kind == "norm", ignoreLabel=ign)["grad"]
    np.testing.assert_allclose(grad.reshape(-1), -fd, rtol=0, atol=1e-8)


# ------------------------------------------------------------------ temperature against the reference

TEMPERATURES = [0.5, 2.0, 7.3]
SMALL = [(1, 1), (5, 7), (3, 4, 5), (300, 10)]          # every dtype
BIG = [(64, 300), (2, 17000)]                            # float32 only; 17000: long rows (chunked or cluster kernels, by place)
KINDS = ["dist", "norm", "labels"]
DTYPES = [pytest.param(d, id=str(d)) for d in R.FLOAT_DTYPES]


def _grid():
    for shape in SMALL + BIG:
        for dtype in (R.FLOAT_DTYPES if shape in SMALL else [F32]):
            for kind in KINDS:
                if kind == "labels" and len(shape) != 2:
                    continue
                yield pytest.param(shape, dtype, kind, id=f"{'x'.join(map(str, shape))}-{dtype}-{kind}")


@pytest.mark.parametrize("T", TEMPERATURES, ids=lambda t: f"T{t}")
@pytest.mark.parametrize("shape,dtype,kind", list(_grid()))
def test_temperature_matches_reference(place, shape, dtype, kind, T):
    pred, target = gen(rng_for("temp", shape, str(dtype), kind, T), shape, dtype, kind)
    ref = kl_ref(pred, target, T=T, normTarget=kind == "norm")
    run_and_compare(place, KLDivergence(normTarget=kind == "norm", temperature=T), pred, target, ref, dtype)


# The "_normt" kernels (normTarget forward KL's own, with the exponentials in place:
# row_softmax.NORMT_KERNELS; float32's and the 16-bit dtypes') with a temperature: rows of a warp
# (1000 columns) and of a cluster (20001; on the emulated pre-sm_90 GPU the chunked kernels, which
# have no such twin).
@pytest.mark.parametrize("T", [0.5, 2.0])
@pytest.mark.parametrize("shape", [(9, 1000), (9, 20001)])
@pytest.mark.parametrize("dtype", [d for d in (F32, F16, BF16) if d is not None], ids=str)
def test_temperature_in_the_normtarget_kernels(place, shape, dtype, T):
    pred, target = gen(rng_for("normt", shape, str(dtype), T), shape, dtype, "norm")
    ref = kl_ref(pred, target, T=T, normTarget=True)
    run_and_compare(place, KLDivergence(normTarget=True, temperature=T), pred, target, ref, dtype)


# Shapes through every path of the forward rows: one thread a row (tiled), a warp, a block of 128
# and of 512, and long rows (the chunked kernels on the emulated pre-sm_90 GPU; the cluster's
# register and streamed kernels on the stand-in, sm_90).
UNNORMALISED = [(300, 10), (7, 1000), (5, 4000), (3, 12000), (2, 17000), (2, 70000)]


@pytest.mark.parametrize("T", [1.0, 2.0], ids=lambda t: f"T{t}")
@pytest.mark.parametrize("shape", UNNORMALISED, ids=lambda s: "x".join(map(str, s)))
def test_a_target_whose_rows_do_not_sum_to_1_gets_the_exact_gradient(place, shape, T):
    """grad = (p - s q) / (T N), s = sum p, the -grad of the E reported: a teacher's top 3 kept and
    not renormalised, rows scaled by 0.5 to 1.5, a row of zeros.  PuzzleLib's (p - q) / N (ours
    until 2026-11-27) is that only where s = 1, and torch's gradcheck failed it."""
    rng = rng_for("unnormalised", shape, T)
    pred = rng.standard_normal(shape).astype(F32)
    logits = rng.standard_normal(shape)
    p = np.exp(logits - logits.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    p *= rng.uniform(0.5, 1.5, size=(shape[0], 1))
    top = np.argsort(p[0])[-3:]
    p[0, np.setdiff1d(np.arange(shape[1]), top)] = 0
    p[-1] = 0
    target = p.astype(F32)
    ref = kl_ref(pred, target, T=T)
    run_and_compare(place, KLDivergence(temperature=T), pred, target, ref, F32)


@pytest.mark.parametrize("kind", KINDS)
def test_tiny_temperature_keeps_each_row_max_at_zero(place, kind):
    """|x / T| past 2^31 (T = 1e-10): the largest x / T of a row less the row's max is exactly 0.
    The compiled CPU rows fused x * (1 / T) - max into one multiply-add, which left it a positive
    residual of up to half an ulp of x / T (about 1e3 here): exp overflowed, E was -inf, grad NaN."""
    pred = np.array([[0.3, 2.1, -1.7, 0.9], [-0.4, 1.3, 2.7, 0.1]], np.float32)
    target = {"dist": np.full(pred.shape, 0.25, np.float32), "norm": pred[::-1].copy(),
              "labels": np.array([0, 2])}[kind]
    ref = kl_ref(pred, target, T=1e-10, normTarget=kind == "norm")
    run_and_compare(place, KLDivergence(normTarget=kind == "norm", temperature=1e-10), pred, target, ref, F32)


@pytest.mark.parametrize("C", [3, 7, 5000])
def test_the_largest_temperature_taken_gives_uniform_q_everywhere(place, C):
    """T = 1e45, whose 1 / T is a float32 subnormal: q is uniform on every place, rows the kernels
    pad included (T = 1e46, whose 1 / T is 0 in float32, gave NaN there: -inf padding times 0,
    and is refused)."""
    rng = rng_for("hot", C)
    pred = rng.standard_normal((2, C)).astype(F32)
    target = np.exp(rng.standard_normal((2, C))).astype(F32)
    target /= target.sum(axis=1, keepdims=True)
    ref = kl_ref(pred, target, T=1e45)
    ref["grad"] = ref["grad"].astype(F32).astype(np.float64)   # ((p - q) / (T N) ~ 1e-46: 0 in float32)
    run_and_compare(place, KLDivergence(temperature=1e45), pred, target, ref, F32)


@pytest.mark.parametrize("divergence", ["forward", "reverse", "jsd"])
@pytest.mark.parametrize("kind", KINDS)
def test_a_target_equal_to_the_students_one_hot_q_costs_nothing(place, kind, divergence):
    """Logits 1e8 apart at T = 0.7: q is one-hot in float (e^-1.4e8 = 0), and so is the target,
    so every divergence is 0 and so is the grad.  The compiled CPU rows fused x * (1 / T) - max
    inside log q into one multiply-add, which left log q at the row's max a residual of half an ulp
    of x / T (about 4): E = 5.7, reverse KL and JSD below 0, where NumPy and the GPU give 0."""
    pred = np.array([[1e8, 0.0, -1e8], [-1e8, 0.0, 1e8]], np.float32)
    target = {"dist": np.array([[1, 0, 0], [0, 0, 1]], np.float32), "norm": pred * np.float32(0.3),
              "labels": np.array([0, 2])}[kind]
    if kind == "labels" and divergence == "reverse":
        pytest.skip("reverse KL refuses labels (a one-hot p makes it infinite)")
    cost = KLDivergence(normTarget=kind == "norm", temperature=0.7, divergence=divergence)
    error, grad = cost(place.put(pred), place.put(target))
    assert abs(error) <= 1e-30 and np.abs(place.get(grad)).max() <= 1e-30, (error, place.get(grad))


@pytest.mark.parametrize("kind", KINDS)
def test_temperature_changes_the_result_and_grad_has_the_1_over_T_factor(kind):
    # at T = 2 on pred = 2x (and target logits 2t) q and p equal those at T = 1 on x (t):
    # the same E, and the grad is exactly half of T = 1's (no T^2 scaling)
    pred, target = gen(rng_for("scale", kind), (6, 9), F64, kind)
    norm = kind == "norm"
    e1, g1 = KLDivergence(normTarget=norm)(pred, target)
    t2 = target * 2 if norm else target
    e2, g2 = KLDivergence(normTarget=norm, temperature=2.0)(pred * 2, t2)
    assert e2 == pytest.approx(e1, rel=1e-12)
    np.testing.assert_allclose(g2, g1 / 2, rtol=1e-11, atol=1e-17)
    e3, _ = KLDivergence(normTarget=norm, temperature=2.0)(pred, target)
    assert abs(e3 - e1) > 1e-3 * abs(e1)


# ------------------------------------------------------------------ ignoreLabel

IGNORE_CASES = [pytest.param(-100, 1.0, id="ign-100"), pytest.param(7, 1.0, id="ign7_inside_range"),
                pytest.param(-100, 2.0, id="ign-100-T2"), pytest.param(7, 0.5, id="ign7-T0.5")]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("ign,T", IGNORE_CASES)
def test_ignored_rows_get_zero_grad_and_the_rest_are_normalised_by_counted_rows(place, ign, T, dtype):
    rng = rng_for("ign", ign, T, str(dtype))
    pred, labels = gen(rng, (20, 12), dtype, "labels")
    labels = with_ignored(rng, labels, ign)
    if ign == 7:
        labels[labels == 7] = ign     # (7 is also a class: its every row is ignored)
    ref = kl_ref(pred, labels, T=T, ignoreLabel=ign)
    nc = ref["nc"]
    assert 0 < nc < 20
    cost = KLDivergence(temperature=T, ignoreLabel=ign)
    error, g = run_and_compare(place, cost, pred, labels, ref, dtype, check_val=False)
    ignored = ~ref["counted"]
    assert np.all(g[ignored] == 0), "ignored rows must get an exactly zero grad"
    assert cost.batchsize == nc and cost.numOfSamples == nc
    assert cost.getError() == error


@pytest.mark.parametrize("ign", [-100, 7])
def test_validate_with_ignoreLabel_equals_the_calls_error(place, ign):
    # (the spec defines E; validate returns E for KLDivergence)
    rng = rng_for("val", ign)
    pred, labels = gen(rng, (16, 10), F32, "labels")
    labels = with_ignored(rng, labels, ign)
    ref = kl_ref(pred, labels, T=2.0, ignoreLabel=ign)
    cost = KLDivergence(temperature=2.0, ignoreLabel=ign)
    R.assert_error_close(cost.validate(place.put(pred), place.put(labels)), ref, F32, what="val")


@pytest.mark.parametrize("label_dtype", [np.int8, np.int16, np.int32, np.int64], ids=lambda d: np.dtype(d).name)
def test_ignoreLabel_with_any_signed_label_dtype(place, label_dtype):
    rng = rng_for("ldt", np.dtype(label_dtype).name)
    pred, labels = gen(rng, (9, 6), F32, "labels")
    labels = with_ignored(rng, labels, -100).astype(label_dtype)
    ref = kl_ref(pred, labels, T=2.0, ignoreLabel=-100)
    _, g = run_and_compare(place, KLDivergence(temperature=2.0, ignoreLabel=-100), pred, labels, ref, F32,
                           check_val=False)
    assert np.all(g[~ref["counted"]] == 0)


@pytest.mark.parametrize("label_dtype", [np.uint8, np.uint16, np.uint32, np.uint64], ids=lambda d: np.dtype(d).name)
def test_ignoreLabel_with_unsigned_labels_and_the_dtype_max(place, label_dtype):
    """uint8 labels with 255 as the ignored value (a segmentation mask's padding): the row is
    ignored.  -1 for it had been cast back to the unsigned dtype (255, 65535, ...), so the GPU
    counted it against a zero target, the NumPy blocks raised IndexError and the compiled ones
    read out of bounds."""
    ign = int(np.iinfo(label_dtype).max)
    rng = rng_for("unsigned", np.dtype(label_dtype).name)
    pred, labels = gen(rng, (9, 6), F32, "labels")
    labels = labels.astype(label_dtype)
    labels[[1, 4, 5]] = ign
    ref_labels = labels.astype(np.int64)   # (the reference's own marking of the ignored rows)
    ref_labels[labels == ign] = -1
    ref = kl_ref(pred, ref_labels, T=2.0, ignoreLabel=-1)
    cost = KLDivergence(temperature=2.0, ignoreLabel=ign)
    _, g = run_and_compare(place, cost, pred, labels, ref, F32, check_val=False)
    assert np.all(g[~ref["counted"]] == 0) and cost.batchsize == ref["nc"]


def test_ignored_labels_outside_the_class_range_are_not_range_checked(place):
    pred, labels = gen(rng_for("far"), (5, 4), F64, "labels")
    labels = labels.astype(np.int64)
    labels[[1, 3]] = 1000
    ref = kl_ref(pred, labels, ignoreLabel=1000)
    _, g = run_and_compare(place, KLDivergence(ignoreLabel=1000), pred, labels, ref, F64, check_val=False)
    assert np.all(g[[1, 3]] == 0)


def test_mean_error_weights_each_batch_by_its_counted_rows(place):
    cost, total, count = KLDivergence(temperature=2.0, ignoreLabel=-100), 0.0, 0
    for n, frac in ((8, 0.5), (5, 0.2), (11, 0.7)):
        rng = rng_for("mean", n)
        pred, labels = gen(rng, (n, 6), F64, "labels")
        labels = with_ignored(rng, labels, -100, frac)
        ref = kl_ref(pred, labels, T=2.0, ignoreLabel=-100)
        error, _ = cost(place.put(pred), place.put(labels))
        assert error == pytest.approx(ref["error"], rel=1e-12)
        total, count = total + ref["error"] * ref["nc"], count + ref["nc"]
        assert cost.batchsize == ref["nc"] and cost.numOfSamples == count
        assert cost.getMeanError() == pytest.approx(total / count, rel=1e-12)


@pytest.mark.parametrize("dtype", [F32, F16], ids=str)
def test_all_ignored_batch_gives_zero_error_zero_grad_and_counts_nothing(place, dtype):
    pred = gen(rng_for("allign"), (4, 5), dtype, "labels")[0]
    labels = np.full(4, -100, np.int32)
    cost = KLDivergence(temperature=2.0, ignoreLabel=-100)
    error, grad = cost(place.put(pred), place.put(labels))
    g = place.get(grad)
    assert error == 0.0 and isinstance(error, float)
    assert g.shape == pred.shape and g.dtype == dtype and np.all(g == 0)
    assert cost.batchsize == 0 and cost.numOfSamples == 0
    assert cost.getError() == 0.0
    # after a counted batch, an all-ignored one adds nothing to the mean
    good = np.array([0, 1, -100, 3], np.int32)
    e1, _ = cost(place.put(pred), place.put(good))
    error, grad = cost(place.put(pred), place.put(labels))
    assert error == 0.0 and np.all(place.get(grad) == 0)
    assert cost.batchsize == 0 and cost.numOfSamples == 3 and cost.getError() == 0.0
    assert cost.getMeanError() == pytest.approx(e1, rel=R.error_rtol(dtype))


BAD_CALLS = [
    # (id, cost, target maker(pred), substrings the message must contain)
    ("float_dist_with_ignoreLabel", lambda: KLDivergence(ignoreLabel=-100),
     lambda p: np.full(p.shape, 1.0 / p.shape[1], p.dtype), ["ignoreLabel"]),
    ("float_logits_normTarget_with_ignoreLabel", lambda: KLDivergence(normTarget=True, ignoreLabel=3),
     lambda p: p.copy(), ["ignoreLabel"]),
    ("label_minus1_after_an_ignored_row", lambda: KLDivergence(ignoreLabel=-100),
     lambda p: np.array([3, -100, -1, 12, -100, 0], np.int64), ["-1", "at index 2"]),
    ("label_C_with_ignore_inside_range", lambda: KLDivergence(ignoreLabel=7, temperature=2.0),
     lambda p: np.array([7, 10, 7, -100, 0, 1], np.int32), ["10", "at index 1"]),
    ("label_minus100_not_the_ignoreLabel", lambda: KLDivergence(ignoreLabel=7),
     lambda p: np.array([7, 0, 1, 2, -100, 1], np.int32), ["-100", "at index 4"]),
]


@pytest.mark.parametrize("call", ["call", "validate"])
@pytest.mark.parametrize("bad_id,make,target_for,must", BAD_CALLS, ids=[b[0] for b in BAD_CALLS])
def test_bad_call_raises_cost_error_and_keeps_state(place, bad_id, make, target_for, must, call):
    def check(exc):
        for s in must:
            assert s in str(exc), f"message {str(exc)!r} does not mention {s!r}"

    try:
        cost = make()        # normTarget=True with ignoreLabel may already be refused here
    except CostError as exc:
        return check(exc)
    pred, good = gen(rng_for("bad", bad_id), (6, 10), F32, "labels")
    good[0] = 0              # at least one counted row
    before = None
    if not cost.normTarget:  # (with normTarget and ignoreLabel no call is good)
        _, grad = cost(place.put(pred), place.put(good))
        kept = place.get(grad).copy()
        before = (cost.numOfSamples, cost.batchsize, cost.getError(), cost.getMeanError())
    with pytest.raises(CostError) as info:
        (cost if call == "call" else cost.validate)(place.put(pred), place.put(target_for(pred)))
    check(info.value)
    if before is not None:
        assert (cost.numOfSamples, cost.batchsize, cost.getError(), cost.getMeanError()) == before
        np.testing.assert_array_equal(place.get(grad), kept)


# ------------------------------------------------------------------ finite differences and PyTorch

FD_CASES = [pytest.param("dist", None, id="dist"), pytest.param("norm", None, id="norm"),
            pytest.param("labels", None, id="labels"), pytest.param("labels", -100, id="labels_ign-100"),
            pytest.param("labels", 2, id="labels_ign2")]


@pytest.mark.parametrize("kind,ign", FD_CASES)
def test_grad_is_minus_central_difference_of_error_at_T2(kind, ign):
    rng = rng_for("fd", kind, ign)
    pred, target = gen(rng, (4, 6), F64, kind)
    if ign is not None:
        target = with_ignored(rng, target, ign, 0.5)

    def make():
        return KLDivergence(normTarget=kind == "norm", temperature=2.0, ignoreLabel=ign)
    _, grad = make()(pred, target)
    fd = R.finite_difference(lambda v: make()(v, target)[0], pred, range(pred.size))
    np.testing.assert_allclose(grad.reshape(-1), -fd, rtol=0, atol=1e-7 * np.abs(grad).max())


@pytest.mark.parametrize("shape", [(6, 9), (3, 4, 5), (1, 1)], ids=["6x9", "3x4x5", "1x1"])
@pytest.mark.parametrize("T", TEMPERATURES, ids=lambda t: f"T{t}")
def test_torch_kl_div_oracle_normTarget(T, shape):
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    pred, target = gen(rng_for("torch", shape, T), shape, F64, "norm")
    n = shape[0]
    x = torch.tensor(pred.reshape(n, -1), requires_grad=True)
    t = torch.tensor(target.reshape(n, -1))
    loss = F.kl_div(F.log_softmax(x / T, 1), F.log_softmax(t / T, 1), log_target=True, reduction="batchmean")
    loss.backward()
    error, grad = KLDivergence(normTarget=True, temperature=T)(pred, target)
    assert error == pytest.approx(loss.item(), rel=1e-12, abs=1e-15)
    np.testing.assert_allclose(grad.reshape(n, -1), -x.grad.numpy(), rtol=1e-11, atol=1e-16)


@pytest.mark.parametrize("T", [1.0] + TEMPERATURES, ids=lambda t: f"T{t}")
def test_torch_cross_entropy_ignore_index_oracle(T):
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    rng = rng_for("torch_ce", T)
    pred, labels = gen(rng, (12, 7), F64, "labels")
    labels = with_ignored(rng, labels, -100, 0.4)
    x = torch.tensor(pred, requires_grad=True)
    loss = F.cross_entropy(x / T, torch.tensor(labels), ignore_index=-100, reduction="mean")
    loss.backward()
    error, grad = KLDivergence(temperature=T, ignoreLabel=-100)(pred, labels)
    assert error == pytest.approx(loss.item(), rel=1e-12)
    np.testing.assert_allclose(grad, -x.grad.numpy(), rtol=1e-11, atol=1e-16)


# ------------------------------------------------------------------ determinism of the kernels

@pytest.mark.parametrize("shape", [(300, 37), (2, 17000)], ids=["300x37", "2x17000"])
@pytest.mark.parametrize("case", ["norm_T2", "labels_ign-100_T2"])
def test_bitwise_identical_in_every_thread_order(emulated_in_every_order, case, shape):
    rng = rng_for("det", case, shape)
    if case == "norm_T2":
        pred, target = gen(rng, shape, F32, "norm")
        make = lambda: KLDivergence(normTarget=True, temperature=2.0)
        ref = kl_ref(pred, target, T=2.0, normTarget=True)
    else:
        pred, target = gen(rng, shape, F32, "labels")
        target = with_ignored(rng, target, -100)
        make = lambda: KLDivergence(temperature=2.0, ignoreLabel=-100)
        ref = kl_ref(pred, target, T=2.0, ignoreLabel=-100)

    def once(place):
        cost = make()
        error, grad = cost(place.put(pred), place.put(target))
        return error, place.get(grad).tobytes(), cost.getMeanError()
    results = emulated_in_every_order(once)
    assert all(r == results[0] for r in results[1:]), "results differ between thread orders"
    R.assert_error_close(results[0][0], ref, F32)
    R.assert_grad_close(np.frombuffer(results[0][1], F32).reshape(shape), ref["grad"], F32)


# ------------------------------------------------------------------ the constructor

BAD_ARGS = [
    ("maxlabels", 0), ("maxlabels", -3), ("maxlabels", 5.5), ("maxlabels", "5"), ("maxlabels", True),
    ("normTarget", "False"), ("normTarget", 1), ("normTarget", None), ("normTarget", 0.0),
    ("temperature", 0), ("temperature", 0.0), ("temperature", -1), ("temperature", -0.5),
    ("temperature", math.inf), ("temperature", math.nan), ("temperature", True), ("temperature", "2"),
    ("temperature", None), ("temperature", 1e-320), ("temperature", 1e-300), ("temperature", 2e-39),
    ("temperature", 1e46),
    ("ignoreLabel", 1.5), ("ignoreLabel", True), ("ignoreLabel", "x"), ("ignoreLabel", -100.0),
]


@pytest.mark.parametrize("name,value", BAD_ARGS, ids=[f"{n}={v!r}" for n, v in BAD_ARGS])
def test_constructor_refuses_bad_argument_naming_it(name, value):
    with pytest.raises(CostError, match=name):
        KLDivergence(**{name: value})


GOOD_ARGS = [
    dict(), dict(maxlabels=None), dict(maxlabels=10), dict(normTarget=True), dict(normTarget=False),
    dict(normTarget=np.bool_(True)), dict(normTarget=np.bool_(False)), dict(temperature=2),
    dict(temperature=0.5), dict(temperature=1e-3), dict(temperature=np.float64(7.3)),
    dict(temperature=3e-39), dict(temperature=1e45),
    dict(ignoreLabel=None), dict(ignoreLabel=-100), dict(ignoreLabel=0), dict(ignoreLabel=7),
    dict(maxlabels=10, normTarget=False, temperature=3, ignoreLabel=-1),
]


@pytest.mark.parametrize("kwargs", GOOD_ARGS, ids=[repr(k) for k in GOOD_ARGS])
def test_constructor_accepts_good_arguments(kwargs):
    cost = KLDivergence(**kwargs)
    pred = np.linspace(-1, 1, 20).reshape(2, 10)
    if cost.normTarget:
        error, _ = cost(pred, pred[::-1].copy())
    else:
        error, _ = cost(pred, np.array([1, 2]))
    assert math.isfinite(error)


def test_positional_order_is_maxlabels_normTarget_temperature_divergence_beta_ignoreLabel():
    pred, labels = gen(rng_for("pos"), (6, 5), F64, "labels")
    labels = with_ignored(rng_for("pos2"), labels, 4)
    error, grad = KLDivergence(5, False, 2.0, "forward", 0.5, 4)(pred, labels)
    ref = kl_ref(pred, labels, T=2.0, ignoreLabel=4)
    R.assert_error_close(error, ref, F64)
    R.assert_grad_close(grad, ref["grad"], F64)


# ------------------------------------------------------------------ the defaults change nothing

DEFAULT_SHAPES = [(5, 7), (3, 4, 5), (300, 37), (2, 17000)]


def _defaults_grid():
    for shape in DEFAULT_SHAPES:
        for dtype in (R.FLOAT_DTYPES if np.prod(shape) < 20000 else [F32]):
            for kind in KINDS:
                if kind == "labels" and len(shape) != 2:
                    continue
                yield pytest.param(shape, dtype, kind, id=f"{'x'.join(map(str, shape))}-{dtype}-{kind}")


@pytest.mark.parametrize("shape,dtype,kind", list(_defaults_grid()))
def test_default_temperature_divergence_and_ignoreLabel_are_bit_identical_to_plain_kl(place, shape, dtype, kind):
    pred, target = gen(rng_for("dflt", shape, str(dtype), kind), shape, dtype, kind)
    norm = kind == "norm"
    results = []
    for cost in (KLDivergence(None, norm), KLDivergence(normTarget=norm, temperature=1.0),
                 KLDivergence(normTarget=norm, temperature=1), KLDivergence(normTarget=norm, ignoreLabel=None),
                 KLDivergence(None, norm, 1.0, "forward", 0.5, None),
                 KLDivergence(normTarget=norm, divergence="forward", beta=0.5)):
        dpred, dtarget = place.put(pred), place.put(target)
        error, grad = cost(dpred, dtarget)
        results.append((error, place.get(grad).tobytes(), cost.validate(dpred, dtarget)))
    assert all(r == results[0] for r in results[1:]), "defaults differ from KLDivergence(maxlabels, normTarget)"
