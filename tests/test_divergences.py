"""KLDivergence's reverse KL and Jensen-Shannon divergence, on every place (NumPy, the CUDA
kernels in the CPU emulation, pycuda).

    KLDivergence(divergence="reverse")       E_row = sum q (log q - log p)
    KLDivergence(divergence="jsd", beta=b)   E_row = b KL(p || m) + (1 - b) KL(q || m),  m = b p + (1 - b) q

q = softmax(pred / T), p the target (softmax(target / T) with normTarget, one-hot for labels
with jsd), E = mean of E_row over the counted rows, grad = -dE/dpred exactly.

The float64 reference here forms m itself and takes dE/dq term by term, unsimplified, then
applies the softmax's Jacobian: independent of the library's log-space formulas.  Finite
differences check the reference; PyTorch (autograd on its own float64 formulas) is a second
oracle.  Tolerances: tests/cost_reference.py (from the float32 arithmetic of the kernels)."""
import numpy as np
import pytest

from puzzlelib_cost import CostError, KLDivergence

import cost_reference as R

F16, F32, F64, BF16 = R.F16, R.F32, R.F64, R.BF16
rng_for, log_softmax, gen, check = R.rng_for, R.log_softmax_rows, R.kl_inputs, R.check_call


def xlogy_ratio(a, b):
    """a log(a / b) with 0 log 0 = 0, elementwise in float64."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(a == 0, 0.0, a * (np.log(a) - np.log(b)))


def divergence_ref(pred, target, divergence, beta=0.5, T=1.0, normTarget=False, ignoreLabel=None):
    """E, grad = -dE/dpred and the size of the rounded terms, in float64."""
    pred = np.asarray(pred)
    d = R.softmax_and_target(pred, target, T, normTarget, ignoreLabel)
    z, log_q, q, p, log_p, counted, t_mag = (d[k] for k in ("z", "log_q", "q", "p", "log_p", "counted", "t_mag"))
    with np.errstate(divide="ignore", invalid="ignore"):
        if divergence == "reverse":
            rows = np.where(q == 0, 0.0, q * (log_q - log_p)).sum(axis=1)
            dq = np.where(q == 0, 0.0, log_q - log_p + 1)            # d/dq of q log q - q log p
            logs = np.abs(log_q) + np.abs(log_p)
        else:
            m = beta * p + (1 - beta) * q
            rows = beta * xlogy_ratio(p, m).sum(axis=1) + (1 - beta) * xlogy_ratio(q, m).sum(axis=1)
            # d/dq_j: beta p log(p/m) gives -beta p (1-beta)/m; (1-beta) q log(q/m) gives
            # (1-beta) (log(q/m) + 1 - q (1-beta)/m)
            dq = (-beta * p * (1 - beta) / m + (1 - beta) * (np.log(q) - np.log(m) + 1 - q * (1 - beta) / m))
            dq = np.where(q == 0, 0.0, dq)
            logs = np.abs(np.log(q)) + np.abs(np.log(m)) + np.where(p == 0, 0, np.abs(np.log(p)))
        logs = np.where(np.isfinite(logs), logs, 0)
    with np.errstate(invalid="ignore"):   # (an infinite error gives a NaN grad)
        # softmax's Jacobian, J = diag(q) - q q^T: dz_i = q_i (dq_i - sum_j q_j dq_j) = -q_i sum_j q_j (dq_j - dq_i),
        # that sum as D_h + (dq_h - dq_i), D_h = sum_j q_j (dq_j - dq_h) at the row's largest q (sum q = 1
        # exactly): q dq - q sum q dq cancelled to ulp(dq) where one q is nearly 1 and left the
        # reference 1e-4 off a grad of 1e-12 there
        h = np.argmax(q, axis=1)[:, None]
        dq_h = np.take_along_axis(dq, h, axis=1)
        d_h = (q * (dq - dq_h)).sum(axis=1, keepdims=True)
        dz = -q * (d_h + (dq_h - dq))
    mag = ((p + q) * (logs + np.abs(z) + 1)).sum(axis=1) + np.abs(z).max(axis=1) + t_mag + 1
    nc = int(counted.sum())
    grad = np.where(counted[:, None], -dz / (T * max(nc, 1)), 0.0)
    error = float(rows[counted].sum() / nc) if nc else 0.0
    scale = float(mag[counted].sum() / nc) if nc else 0.0
    return dict(error=error, grad=grad.reshape(pred.shape), scale=scale, val=error, rows=rows)


# ------------------------------------------------------------------ the reference itself

@pytest.mark.parametrize("divergence,beta", [("reverse", 0.5), ("jsd", 0.5), ("jsd", 0.2)])
@pytest.mark.parametrize("kind", ["dist", "norm", "labels"])
def test_reference_grad_is_minus_fd_of_reference_error(divergence, beta, kind):
    if kind == "labels" and divergence == "reverse":
        pytest.skip("reverse KL against a one-hot target is infinite")
    rng = rng_for("fd-ref", divergence, beta, kind)
    pred, target = gen(rng, (3, 6), F64, kind)
    T = 1.7
    ref = divergence_ref(pred, target, divergence, beta, T, kind == "norm")
    fd = R.finite_difference(lambda x: divergence_ref(x, target, divergence, beta, T, kind == "norm")["error"],
                             pred, range(pred.size))
    np.testing.assert_allclose(-fd, ref["grad"].ravel(), atol=1e-8)


def test_reference_closed_forms():
    # JSD of two disjoint point masses is beta log(1/beta) + (1-beta) log(1/(1-beta)); reverse KL
    # of q from a uniform p is log C - H(q).
    b = 0.3
    big = 60.0   # q = one-hot at class 0 to within exp(-60)
    ref = divergence_ref(np.array([[big, 0.0, 0.0]]), np.array([[0.0, 1.0, 0.0]]), "jsd", b)
    assert abs(ref["error"] - (-b * np.log(b) - (1 - b) * np.log(1 - b))) < 1e-12
    x = np.array([[0.3, -1.0, 2.0, 0.5]])
    q = np.exp(log_softmax(x))
    ref = divergence_ref(x, np.full((1, 4), 0.25), "reverse")
    assert abs(ref["error"] - (np.log(4) + (q * np.log(q)).sum())) < 1e-12


# ------------------------------------------------------------------ against the reference, every place

SMALL = [(1, 1), (5, 7), (3, 4, 5), (300, 10)]
BIG = [(64, 300), (2, 17000)]                  # float32 only; 17000: long rows (chunked or cluster kernels, by place)
MODES = [("reverse", 0.5), ("jsd", 0.5), ("jsd", 0.1)]
DTYPES = [pytest.param(d, id=str(d)) for d in R.FLOAT_DTYPES]


def _grid():
    for shape in SMALL + BIG:
        for dtype in R.FLOAT_DTYPES if shape in SMALL else [F32]:
            for kind in ("dist", "norm", "labels"):
                for divergence, beta in MODES:
                    if kind == "labels" and (divergence == "reverse" or len(shape) != 2):
                        continue
                    if shape in BIG and beta == 0.1:
                        continue
                    yield pytest.param(shape, dtype, kind, divergence, beta,
                                       id=f"{'x'.join(map(str, shape))}-{dtype}-{kind}-{divergence}{beta}")


@pytest.mark.parametrize("shape,dtype,kind,divergence,beta", list(_grid()))
def test_matches_reference(place, shape, dtype, kind, divergence, beta):
    rng = rng_for("grid", shape, str(dtype), kind, divergence, beta)
    pred, target = gen(rng, shape, dtype, kind)
    T = 2.0 if shape[0] % 2 else 1.0   # both the default path and a temperature
    cost = KLDivergence(normTarget=kind == "norm", temperature=T, divergence=divergence, beta=beta)
    check(place, cost, pred, target, divergence_ref(pred, target, divergence, beta, T, kind == "norm"), dtype)


@pytest.mark.parametrize("divergence", ["reverse", "jsd"])
def test_vocabulary_scale_rows(place, divergence):
    """C = 128256 (Llama 3's vocabulary): the chunked kernels over 32 chunks a row."""
    rng = rng_for("vocab", divergence)
    pred, target = gen(rng, (2, 128256), F32, "norm")
    cost = KLDivergence(normTarget=True, temperature=2.0, divergence=divergence, beta=0.4 if divergence == "jsd" else 0.5)
    check(place, cost, pred, target,
          divergence_ref(pred, target, divergence, 0.4 if divergence == "jsd" else 0.5, 2.0, True), F32)


@pytest.mark.parametrize("shape", [(40, 9), (2, 17000)], ids=["40x9", "2x17000"])
def test_jsd_with_ignored_labels(place, shape):
    rng = rng_for("ignored", shape)
    pred, labels = gen(rng, shape, F32, "labels")
    labels = labels.astype(np.int64)
    labels[::3] = -100
    pred[0, :3] = np.nan   # an ignored row's NaN logits give exactly nothing
    cost = KLDivergence(divergence="jsd", beta=0.3, ignoreLabel=-100)
    error, grad = cost(place.put(pred), place.put(labels))
    ref = divergence_ref(np.where(np.isnan(pred), 0, pred), labels, "jsd", 0.3, ignoreLabel=-100)
    R.assert_error_close(error, ref, F32)
    g = place.get(grad)
    assert (g[::3] == 0).all()
    R.assert_grad_close(g, ref["grad"], F32)
    assert cost.batchsize == shape[0] - len(range(0, shape[0], 3))


# ------------------------------------------------------------------ extreme inputs

@pytest.mark.parametrize("divergence", ["reverse", "jsd"])
def test_large_logits_stay_exact(place, divergence):
    """Logits of +-1e4 (q and p with underflowing entries): log space throughout, nothing NaN."""
    pred = np.array([[1e4, -1e4, 0.0, 5.0], [3e3, 3e3 - 2, -7e3, 0.0]], F32)
    target = np.array([[1e4 - 3, -1e4, 2.0, 1e4], [-50.0, 3e3, 3e3, 0.0]], F32)
    cost = KLDivergence(normTarget=True, divergence=divergence, beta=0.5)
    ref = divergence_ref(pred, target, divergence, 0.5, 1.0, True)
    assert np.isfinite(ref["error"])
    check(place, cost, pred, target, ref, F32)


@pytest.mark.parametrize("cols", [3, 2000, 17000, 70000])
@pytest.mark.parametrize("divergence", ["reverse", "jsd"])
def test_a_confident_student_against_a_far_teacher_keeps_its_gradient(place, divergence, cols):
    """The student's class 0 holds q = 1 - 8e-8 (C = 3) or 1 - C e^-30, so that S - g_0 is tiny
    beside g_0 and every grad entry small: reverse KL against a teacher's log p of about -200
    there (S and g_0 about 200, S - g_0 about 1e-5 or less), JSD against a teacher that agrees
    on class 0 but puts e^-5 times more on each other class (g_0 about -0.34, S - g_0 1e-6 or
    less).  Formed as S - g from a float S, reverse KL's grad was 58 % off (CPU) or 0 (GPU) at
    C = 3.  C = 2000: a warp a row; 17000 and 70000: the chunked kernels on the emulated GPU,
    the cluster's register and streamed kernels on the pycuda stand-in (sm_90)."""
    pred = np.zeros((2, cols), F32)
    target = np.zeros((2, cols), F32)
    pred[:, 0] = 17.0 if cols == 3 else 30.0
    if divergence == "reverse":
        target[:, 1] = 200.0
        target[1, 2:] = 100.0   # (row 1: the other classes' g far from g_0 too)
    else:
        target[:, 1:] = -5.0
        target[1, 1] = -2.0
    cost = KLDivergence(normTarget=True, divergence=divergence)
    ref = divergence_ref(pred, target, divergence, 0.5, 1.0, True)
    check(place, cost, pred, target, ref, F32)


def test_the_heavy_class_threshold_is_the_same_on_every_path():
    import re
    from pathlib import Path
    pytest.importorskip("numba")
    from puzzlelib_cost import row_softmax
    from puzzlelib_cost.cpu_kernels import kernels
    source = (Path(row_softmax.__file__).parent.parent / "kernels" / "kl_divergence.cu").read_text()
    cuda = float(re.search(r"constexpr float DIVERGENCE_HEAVY_Q = ([0-9.]+)f;", source).group(1))
    assert row_softmax.HEAVY_Q == kernels.HEAVY_Q == cuda


def test_the_compiled_rows_number_the_divergences_as_the_host_does():
    pytest.importorskip("numba")
    from puzzlelib_cost import row_softmax
    from puzzlelib_cost.cpu_kernels import kernels
    assert kernels.REVERSE == row_softmax.REVERSE


@pytest.mark.parametrize("normTarget", [False, True])
@pytest.mark.parametrize("divergence", ["reverse", "jsd"])
def test_minus_infinite_logits_add_nothing_and_get_a_zero_grad(place, divergence, normTarget):
    """q = 0 exactly (a -inf logit): its terms are 0 log 0 = 0 (JSD keeps p's own term) and its
    gradient 0, not NaN."""
    pred = np.array([[-np.inf, 1.0, 2.0, -np.inf, 0.0], [0.5, -np.inf, -1.0, 3.0, 1.5]], F32)
    target = np.array([[0.1, 0.2, 0.3, 0.15, 0.25], [0.3, 0.1, 0.2, 0.25, 0.15]], F32)
    if normTarget:
        target = np.log(target) + np.float32(1.5)
    beta = 0.3 if divergence == "jsd" else 0.5
    cost = KLDivergence(normTarget=normTarget, divergence=divergence, **({"beta": beta} if divergence == "jsd" else {}))
    ref = divergence_ref(pred, target, divergence, beta, 1.0, normTarget)
    assert np.isfinite(ref["error"]) and np.isfinite(ref["grad"]).all()
    # (the rounding scale from finite logits in their place: |z| = inf would allow anything)
    ref["scale"] = divergence_ref(np.where(np.isinf(pred), np.float32(-30), pred), target, divergence, beta, 1.0,
                                  normTarget)["scale"]
    check(place, cost, pred, target, ref, F32)
    _, grad = cost(place.put(pred), place.put(target))
    assert (place.get(grad)[np.isinf(pred)] == 0).all()


def test_reverse_kl_with_a_zero_target_entry_is_infinite(place):
    pred = np.array([[0.0, 1.0, 2.0]], F32)
    target = np.array([[0.5, 0.5, 0.0]], F32)
    error, _ = KLDivergence(divergence="reverse")(place.put(pred), place.put(target))
    assert error == np.inf


def test_jsd_with_zero_target_entries_is_finite(place):
    pred = np.array([[0.0, 1.0, 2.0], [4.0, -1.0, 0.5]], F32)
    target = np.array([[0.5, 0.5, 0.0], [0.0, 0.0, 1.0]], F32)
    cost = KLDivergence(divergence="jsd", beta=0.7)
    check(place, cost, pred, target, divergence_ref(pred, target, "jsd", 0.7), F32)


def test_jsd_is_symmetric_at_beta_half_and_bounded_by_log2():
    rng = rng_for("sym")
    a, b = rng.standard_normal((2, 50, 30)).astype(F64) * 4
    e_ab, _ = KLDivergence(normTarget=True, divergence="jsd")(a, b)
    e_ba, _ = KLDivergence(normTarget=True, divergence="jsd")(b, a)
    assert abs(e_ab - e_ba) < 1e-12 and 0 < e_ab < np.log(2)


# ------------------------------------------------------------------ PyTorch as a second oracle

@pytest.mark.parametrize("divergence,beta", [("reverse", 0.5), ("jsd", 0.5), ("jsd", 0.25)])
@pytest.mark.parametrize("normTarget", [False, True])
def test_torch_oracle(divergence, beta, normTarget):
    torch = pytest.importorskip("torch")
    rng = rng_for("torch", divergence, beta, normTarget)
    pred, target = gen(rng, (7, 33), F64, "norm" if normTarget else "dist")
    T = 1.5
    x = torch.tensor(pred, requires_grad=True)
    log_q = torch.log_softmax(x / T, dim=1)
    t = torch.tensor(target)
    log_p = torch.log_softmax(t / T, dim=1) if normTarget else torch.log(t)
    if divergence == "reverse":   # kl_div(input, target) = sum target (log target - input)
        loss = torch.nn.functional.kl_div(log_p, log_q, log_target=True, reduction="sum") / 7
    else:
        log_m = torch.logsumexp(torch.stack([log_p + np.log(beta), log_q + np.log(1 - beta)]), dim=0)
        loss = (beta * torch.nn.functional.kl_div(log_m, log_p, log_target=True, reduction="sum")
                + (1 - beta) * torch.nn.functional.kl_div(log_m, log_q, log_target=True, reduction="sum")) / 7
    loss.backward()
    error, grad = KLDivergence(normTarget=normTarget, temperature=T, divergence=divergence, beta=beta)(pred, target)
    assert abs(error - loss.item()) <= 1e-12 * max(1.0, abs(loss.item()))
    np.testing.assert_allclose(grad, -x.grad.numpy(), rtol=0, atol=1e-13)


# ------------------------------------------------------------------ determinism

@pytest.mark.parametrize("divergence", ["reverse", "jsd"])
def test_bitwise_identical_in_every_thread_order(emulated_in_every_order, divergence):
    rng = rng_for("orders", divergence)
    pred, target = gen(rng, (2, 17000), F32, "norm")
    small_pred, small_target = gen(rng, (300, 37), F32, "norm")

    def run(place):
        cost = KLDivergence(normTarget=True, temperature=2.0, divergence=divergence, beta=0.3 if divergence == "jsd" else 0.5)
        out = []
        for p, t in ((pred, target), (small_pred, small_target)):
            error, grad = cost(place.put(p), place.put(t))
            out.append((error, place.get(grad).tobytes()))
        return out
    results = emulated_in_every_order(run)
    assert all(r == results[0] for r in results[1:])


@pytest.mark.parametrize("staging", ["all", "none"])
@pytest.mark.parametrize("kind,divergence,beta", [("norm", "reverse", 0.5), ("norm", "jsd", 0.3),
                                                  ("dist", "jsd", 0.5), ("labels", "jsd", 0.5)],
                         ids=["norm-reverse", "norm-jsd", "dist-jsd", "labels-jsd"])
def test_rows_streamed_by_a_cluster(monkeypatch, emulated_in_every_order, kind, divergence, beta, staging):
    """Reverse KL and JSD in kl_cluster_stream_* (the register cluster kernels taken away, so that
    rows of 3 segments a block reach it): the segments kept in shared memory or read again, the
    row's S swapped in the cluster between passes 2 and 3, a temperature, an ignored row with
    NaN logits; the float64 reference, bitwise the same in every thread order.  "all": the
    library's prefetching twin, as many segments staged as fit; "none": none staged, and no room
    for the twin's ring, so the plain kernel."""
    from puzzlelib_cost import row_softmax
    monkeypatch.setattr(row_softmax, "CLUSTER_KERNELS", {})
    if staging == "none":
        monkeypatch.setattr(row_softmax, "stream_staging", lambda *args, ring=0: None if ring else (0, 0))
    kernel = "kl_cluster_stream_f32_t256_e16" + ("_prefetch" if staging == "all" else "")
    rng = rng_for("stream", kind, divergence)
    pred, target = gen(rng, (3, 17 * 4096 + 4), F32, kind)
    if kind == "labels":
        target = target.astype(np.int64)
        target[1] = -100
        pred[1, :5] = np.nan
    cost_args = dict(normTarget=kind == "norm", temperature=2.0, divergence=divergence, beta=beta)
    if kind == "labels":
        cost_args["ignoreLabel"] = -100

    def run(place):
        error, grad = KLDivergence(**cost_args)(place.put(pred), place.put(target))
        # (labels with ignoreLabel: checked and counted on the device, the weights N / counted, the commit)
        assert place.device.launches == ([kernel] if kind != "labels" else
                                         ["check_labels_i64_i64", "weights_for_ignored_rows_f32", kernel,
                                          "commit_checked_labels"])
        return error, place.get(grad)
    results = emulated_in_every_order(run)
    assert all(r[0] == results[0][0] and np.array_equal(r[1], results[0][1]) for r in results[1:])
    ref = divergence_ref(np.where(np.isnan(pred), 0, pred), target, divergence, beta, 2.0, kind == "norm",
                         ignoreLabel=-100 if kind == "labels" else None)
    R.assert_error_close(results[0][0], ref, F32)
    R.assert_grad_close(results[0][1], ref["grad"], F32)


# ------------------------------------------------------------------ bad arguments and inputs

BAD_ARGS = [dict(divergence="backward"), dict(divergence=None), dict(divergence="JSD"),
            dict(divergence="jsd", beta=0), dict(divergence="jsd", beta=1), dict(divergence="jsd", beta=1.5),
            dict(divergence="jsd", beta=float("nan")), dict(divergence="jsd", beta="0.5"),
            dict(divergence="jsd", beta=True), dict(divergence="reverse", beta=0.3), dict(beta=0.2),
            dict(divergence="reverse", ignoreLabel=-100)]


@pytest.mark.parametrize("kwargs", BAD_ARGS, ids=[repr(k) for k in BAD_ARGS])
def test_constructor_refuses_bad_arguments_naming_them(kwargs):
    with pytest.raises(CostError) as info:
        KLDivergence(**kwargs)
    named = "ignoreLabel" if "ignoreLabel" in kwargs else "beta" if "beta" in kwargs else "divergence"
    assert named in str(info.value)


def test_positional_order_follows_the_documented_signature():
    cost = KLDivergence(None, True, 2.0, "jsd", 0.25)
    assert (cost.normTarget, cost.temperature, cost.divergence, cost.beta) == (True, 2.0, "jsd", 0.25)


def test_reverse_kl_refuses_integer_labels_and_keeps_state(place):
    cost = KLDivergence(divergence="reverse")
    pred, target = gen(rng_for("state"), (4, 5), F32, "dist")
    error, _ = cost(place.put(pred), place.put(target))
    before = (cost.error, cost.batchsize, cost.numOfSamples, cost.getMeanError())
    with pytest.raises(CostError, match="reverse.*labels"):
        cost(place.put(pred), place.put(np.array([0, 1, 2, 3], np.int32)))
    assert (cost.error, cost.batchsize, cost.numOfSamples, cost.getMeanError()) == before
