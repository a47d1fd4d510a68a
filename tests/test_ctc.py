"""CTC against a float64 NumPy reference written here (log-space alpha/beta, sequence by sequence),
brute-force enumeration of every alignment on tiny cases, finite differences, PyTorch's
ctc_loss (CPU, float64, as the second oracle), PuzzleLib's own CTC tests (adapted: grad / N),
bad inputs, accumulators and bitwise determinism of the kernels in every emulated thread order.

Conventions checked: E = sum_b nll_b / N; grad = -dE/dlogits = (gamma - y) / N for t < datalen[b]
and 0 after; with normalized=True the data are probabilities and grad is -dE/du for the logits u
with data = softmax(u) (PyTorch's gradient with respect to log_probs has the same meaning).
"""
import itertools
import math
import zlib

import numpy as np
import pytest

from puzzlelib_cost import CTC, CostError, ctc as ctc_module

import cost_reference as R

try:
    import torch
    import torch.nn.functional as F
except ImportError:   # pragma: no cover - torch is a test extra
    torch = None
needs_torch = pytest.mark.skipif(torch is None, reason="PyTorch is not installed (pip install '.[torch]'); "
                                                       "it is the second oracle")

F16, F32, F64, BF16 = R.F16, R.F32, R.F64, R.BF16
COMPUTE_EPS = {F64: 2.0 ** -52}          # float32 arithmetic for every other input dtype
OUTPUT_ROUNDING = {F16: 2.0 ** -11, BF16: 2.0 ** -8}


def rng_for(*key):
    return np.random.default_rng(zlib.crc32(repr(key).encode()))   # the same data in every process


# ------------------------------------------------------------------ the float64 reference

def reference(x, datalen, labels, lengths, blank, normalized=False):
    """(nll per sequence, -d(sum nll / N)/d logits) in float64.  The textbook recursions of Graves
    et al. (2006) in log space, one sequence at a time: alpha and beta both include frame t's
    emission, so the posterior of state s is alpha beta / (y P).  A sequence whose P is 0 gets
    nll = inf and a NaN gradient (the caller applies zeroInfinity)."""
    x = np.asarray(x).astype(np.float64)
    t_max, n, vocab = x.shape
    with np.errstate(divide="ignore", invalid="ignore"):
        if normalized:
            log_y = np.log(x)
        else:
            shifted = x - x.max(axis=2, keepdims=True)
            log_y = shifted - np.log(np.exp(shifted).sum(axis=2, keepdims=True))
        y = x if normalized else np.exp(log_y)
        nll = np.zeros(n)
        grad = np.zeros_like(x)
        start = 0
        for b in range(n):
            seq = [int(v) for v in labels[start:start + lengths[b]]]
            start += lengths[b]
            frames = int(datalen[b])
            ext = np.array([blank] + [v for label in seq for v in (label, blank)])
            size = len(ext)
            if frames == 0:
                nll[b] = 0.0 if not seq else math.inf
                continue
            lp = log_y[:frames, b][:, ext]
            skip = np.zeros(size, bool)
            skip[2:] = (ext[2:] != blank) & (ext[2:] != ext[:-2])
            alpha = np.full((frames, size), -np.inf)
            alpha[0, :2] = lp[0, :2]
            for t in range(1, frames):
                a = alpha[t - 1].copy()
                a[1:] = np.logaddexp(a[1:], alpha[t - 1, :-1])
                a[2:] = np.where(skip[2:], np.logaddexp(a[2:], alpha[t - 1, :-2]), a[2:])
                alpha[t] = a + lp[t]
            log_p = np.logaddexp.reduce(alpha[frames - 1, -2:])
            nll[b] = -log_p
            if log_p == -np.inf:
                grad[:frames, b] = np.nan
                continue
            beta = np.full((frames, size), -np.inf)
            beta[frames - 1, -2:] = lp[frames - 1, -2:]
            for t in range(frames - 2, -1, -1):
                c = beta[t + 1].copy()
                c[:-1] = np.logaddexp(c[:-1], beta[t + 1, 1:])
                c[:-2] = np.where(skip[2:], np.logaddexp(c[:-2], beta[t + 1, 2:]), c[:-2])
                beta[t] = c + lp[t]
            posterior = np.exp(alpha + beta - lp - log_p)
            posterior[~np.isfinite(lp)] = 0
            gamma = np.zeros((frames, vocab))
            np.add.at(gamma, (np.arange(frames)[:, None], ext[None, :]), posterior)
            grad[:frames, b] = gamma - y[:frames, b]
    return nll, grad / n


def brute_force(x, datalen, labels, lengths, blank, normalized=False):
    """The same as reference() by enumerating all V^T paths (tiny cases only)."""
    x = np.asarray(x).astype(np.float64)
    t_max, n, vocab = x.shape
    y = x if normalized else np.exp(x) / np.exp(x).sum(axis=2, keepdims=True)
    nll, grad = np.zeros(n), np.zeros_like(x)
    start = 0
    for b in range(n):
        seq = tuple(int(v) for v in labels[start:start + lengths[b]])
        start += lengths[b]
        frames = int(datalen[b])
        total, gamma = 0.0, np.zeros((frames, vocab))
        for path in itertools.product(range(vocab), repeat=frames):
            collapsed = tuple(k for i, k in enumerate(path) if k != blank and (i == 0 or path[i - 1] != k))
            if collapsed == seq:
                p = np.prod([y[t, b, k] for t, k in enumerate(path)])
                total += p
                gamma[np.arange(frames), list(path)] += p
        nll[b] = -math.log(total) if total > 0 else math.inf
        grad[:frames, b] = gamma / total - y[:frames, b] if total > 0 else np.nan
    return nll, grad / n


# ------------------------------------------------------------------ cases and comparisons

def make_case(key, t_max, n, vocab, lengths, datalen=None, blank=0, scale=2.0, label_dtype=np.int32):
    """Logits (float64) and int arrays; datalen (when None) random but feasible: at least the
    labels plus one frame per repeated neighbour."""
    rng = rng_for(key)
    x = rng.standard_normal((t_max, n, vocab)) * scale
    lengths = np.asarray(lengths, np.int64)
    symbols = np.array([k for k in range(vocab) if k != blank])
    labels = symbols[rng.integers(0, len(symbols), size=int(lengths.sum()))]
    if datalen is None:
        need, start = [], 0
        for length in lengths:
            seq = labels[start:start + length]
            start += length
            need.append(length + int(np.sum(seq[1:] == seq[:-1])))
        datalen = [rng.integers(k, t_max + 1) for k in need]
    return x, np.asarray(datalen, np.int32), labels.astype(label_dtype), lengths.astype(np.int32)


def tolerances(dtype, t_max, n, nll_max, logits=0.0):
    """(relative tolerance of E, absolute tolerance of grad) from the arithmetic.  The library's
    log-space values stay within a few units of 0 (rows relative to the previous row's maximum):
    ~8 ulp of its compute type per frame, reaching each gamma (<= 1) linearly in the worst case;
    plus 2 ulp per frame of `logits`, the largest distance of a logit below its frame's maximum,
    where that is large (log y = (x - max) - log z is rounded to the ulp of x - max; never to
    the ulp of x itself: a constant added to every logit changes nothing).  The reference's own values grow to nll_max in magnitude: ~4
    float64 ulp of that per frame.  grad is gamma / N."""
    eps = COMPUTE_EPS.get(np.dtype(dtype), 2.0 ** -23)
    return (1e-12 if eps < 1e-10 else 1e-5), ((8 + 2 * logits) * eps + 4 * 2.0 ** -52 * nll_max) * t_max / n


def check(place, error, grad, ref_nll, ref_grad, dtype, zero_infinity=False, logits=0.0):
    t_max, n = ref_grad.shape[:2]
    finite = ref_nll[np.isfinite(ref_nll)]
    rtol, atol = tolerances(dtype, t_max, n, float(np.abs(finite).max(initial=0.0)), logits)
    nll = np.where(np.isinf(ref_nll) & zero_infinity, 0.0, ref_nll)
    expected = nll.sum() / n
    if np.isfinite(expected):
        assert error == pytest.approx(expected, rel=rtol, abs=1e-300)
    else:
        assert error == expected
    got = place.get(grad)
    assert got.dtype == np.dtype(dtype) and got.shape == ref_grad.shape
    got = got.astype(np.float64)
    want = ref_grad.copy()
    if zero_infinity:
        want[:, np.isinf(ref_nll)] = 0
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    rounding = OUTPUT_ROUNDING.get(np.dtype(dtype), 0.0)
    ok = np.isnan(want) | (np.abs(got - want) <= atol + rounding * np.abs(want))
    assert ok.all(), f"grad: worst |diff| {np.nanmax(np.abs(got - want)):.3g} (tolerance {atol:.3g})"


def call(place, cost, x, datalen, labels, lengths, dtype):
    data = x.astype(dtype)
    return cost(place.put([data, datalen]), place.put([labels, lengths]))


CASES = {   # name: (T, N, V, lengths, datalen or None, blank)
    "small": (8, 3, 5, [2, 0, 3], None, 0),
    "repeats": (12, 4, 3, [4, 5, 0, 3], None, 0),        # labels from {1, 2}: many a-a neighbours
    "blank_last": (10, 2, 6, [3, 4], None, 5),
    "short_frames": (9, 4, 4, [2, 0, 0, 1], [9, 0, 4, 1], 1),   # datalen 0 with an empty target: nll 0
    "medium": (40, 5, 20, [15, 0, 7, 1, 12], None, 0),
}


@pytest.mark.parametrize("dtype", [F32, F64], ids=str)
@pytest.mark.parametrize("name", list(CASES))
def test_against_reference(place, name, dtype):
    t_max, n, vocab, lengths, datalen, blank = CASES[name]
    x, datalen, labels, lengths = make_case(name, t_max, n, vocab, lengths, datalen, blank)
    x = x.astype(dtype)
    error, grad = call(place, CTC(blank, vocabsize=vocab), x, datalen, labels, lengths, dtype)
    check(place, error, grad, *reference(x, datalen, labels, lengths, blank), dtype)


@needs_torch
@pytest.mark.parametrize("dtype", [F32, F64], ids=str)
@pytest.mark.parametrize("name", ["small", "repeats", "short_frames", "medium"])
def test_against_torch(place, name, dtype):
    """PyTorch (float64, CPU): ctc_loss(log_softmax(x), reduction='sum') / N and -x.grad."""
    t_max, n, vocab, lengths, datalen, blank = CASES[name]
    x, datalen, labels, lengths = make_case(name, t_max, n, vocab, lengths, datalen, blank)
    x = x.astype(dtype)
    logits = torch.tensor(x.astype(np.float64), requires_grad=True)
    loss = F.ctc_loss(F.log_softmax(logits, 2), torch.tensor(labels.astype(np.int64)),
                      torch.tensor(datalen.astype(np.int64)), torch.tensor(lengths.astype(np.int64)), blank=blank,
                      reduction="none")
    loss.sum().div(n).backward()
    error, grad = call(place, CTC(blank), x, datalen, labels, lengths, dtype)
    check(place, error, grad, loss.detach().numpy(), -logits.grad.numpy(), dtype)


@pytest.mark.parametrize("normalized", [False, True])
def test_brute_force_on_tiny_cases(place, normalized):
    """Every alignment enumerated (repeated labels included: a skip rule that let a-a through
    would count paths that collapse to one a)."""
    x, datalen, labels, lengths = make_case("tiny", 5, 3, 3, [2, 2, 0], [5, 4, 3], 0)
    labels[:4] = [1, 2, 1, 1]                            # the second sequence repeats its label
    if normalized:
        x = np.exp(x) / np.exp(x).sum(axis=2, keepdims=True)
    ref_nll, ref_grad = brute_force(x, datalen, labels, lengths, 0, normalized)
    own_nll, own_grad = reference(x, datalen, labels, lengths, 0, normalized)
    np.testing.assert_allclose(own_nll, ref_nll, rtol=1e-13)   # (the reference itself)
    np.testing.assert_allclose(own_grad, ref_grad, atol=1e-14)
    error, grad = call(place, CTC(0, normalized=normalized), x, datalen, labels, lengths, F64)
    check(place, error, grad, ref_nll, ref_grad, F64)


def test_finite_differences(place):
    """grad = -dE/d logits, and (normalized=True) -dE/du for data = softmax(u), by central differences."""
    x, datalen, labels, lengths = make_case("fd", 3, 2, 3, [1, 2], [3, 3], 0)
    h = 1e-6

    def error(logits, normalized):
        data = np.exp(logits) / np.exp(logits).sum(axis=2, keepdims=True) if normalized else logits
        return call(place, CTC(0, normalized=normalized), data, datalen, labels, lengths, F64)

    for normalized in (False, True):
        _, grad = error(x, normalized)
        numeric = np.zeros_like(x)
        for index in np.ndindex(*x.shape):
            step = np.zeros_like(x)
            step[index] = h
            numeric[index] = -(error(x + step, normalized)[0] - error(x - step, normalized)[0]) / (2 * h)
        np.testing.assert_allclose(place.get(grad), numeric, atol=1e-8)


@pytest.mark.parametrize("dtype", [F32, F64], ids=str)
def test_long_labels_in_global_memory(place, dtype):
    """A label of length 700 (PuzzleLib crashes from 640 on): 1401 states, more than shared memory
    holds, so the kernels keep their rows in global memory."""
    if place.name == "pycuda" and dtype == F64:
        pytest.skip("one dtype through pycuda suffices: the emulated place runs both")
    x, datalen, labels, lengths = make_case("long", 730, 2, 4, [700, 5], [730, 12], 0)
    steps = rng_for("long steps").integers(1, 3, size=700)   # no label equals its neighbour: 700 frames suffice
    labels[:700] = np.cumsum(steps) % 3 + 1
    x = x.astype(dtype)
    error, grad = call(place, CTC(0), x, datalen, labels, lengths, dtype)
    if place.device is not None:
        assert f"ctc_alpha_beta_{'f32' if dtype == F32 else 'f64'}_global" in place.device.launches
    check(place, error, grad, *reference(x, datalen, labels, lengths, 0), dtype)


@pytest.mark.parametrize("dtype", [F16, BF16], ids=str)
def test_16_bit_inputs(place, dtype):
    """float32 arithmetic on the 16-bit values; grad rounded once to the input dtype."""
    x, datalen, labels, lengths = make_case("16-bit", 20, 3, 7, [5, 0, 6], None, 0)
    x = x.astype(dtype)
    error, grad = call(place, CTC(0), x, datalen, labels, lengths, dtype)
    check(place, error, grad, *reference(x, datalen, labels, lengths, 0), dtype)


def test_large_logits_stay_exact(place):
    """Logits a thousand apart: softmax underflows to 0 for most classes (PuzzleLib takes its log
    and reports inf); the log-softmax keeps the error finite and exact."""
    x, datalen, labels, lengths = make_case("large", 6, 2, 4, [2, 1], [6, 6], 0, scale=1000.0)
    error, grad = call(place, CTC(0), x, datalen, labels, lengths, F32)
    ref_nll, ref_grad = reference(x.astype(F32), datalen, labels, lengths, 0)
    assert np.isfinite(ref_nll).all() and ref_nll.sum() > 1000
    check(place, error, grad, ref_nll, ref_grad, F32, logits=float(np.ptp(x, axis=2).max()))


@pytest.mark.parametrize("dtype", [F32, F64], ids=str)
@pytest.mark.parametrize("offset", [1e4, 1e8, 1e15])
def test_a_constant_added_to_every_logit_changes_nothing(place, dtype, offset):
    """Softmax is blind to a constant added to a frame's logits, and so is CTC: logits of 1e8 once
    gave a negative nll (log z rounded away at their magnitude: x - (max + log z)).  The reference
    takes the same rounded logits."""
    x, datalen, labels, lengths = make_case("offset", 20, 2, 5, [3, 2], [20, 12], 0)
    x = (x.astype(dtype) + offset).astype(dtype)
    error, grad = call(place, CTC(0), x, datalen, labels, lengths, dtype)
    ref_nll, ref_grad = reference(x, datalen, labels, lengths, 0)
    assert np.isfinite(ref_nll).all() and (ref_nll > 0).all()
    check(place, error, grad, ref_nll, ref_grad, dtype, logits=float(np.ptp(x.astype(np.float64), axis=2).max()))


@pytest.mark.parametrize("spread", [1e5, 1e10, 1e30])
def test_the_grad_stays_a_difference_of_probabilities_at_any_spread(place, spread):
    """gamma_t(k) is a probability: each frame's gammas sum to 1, as y's do, so grad = (gamma - y) / N
    is at most 1/N in magnitude and each frame's grad sums to 0.  Dividing exp(alpha + beta) by P
    put the rounding of alpha and beta (about the logits' spread times float32's epsilon) into the
    exponent: |grad| passed 1/N from a spread of 1e5 and was +inf from 1e10, for finite logits.
    (How far gamma itself is from the exact one at such spreads is float32's limit: README, CTC.)"""
    x, datalen, labels, lengths = make_case("spread", 8, 3, 5, [3, 2, 1], [8, 6, 4], 0)
    x = (x / np.abs(x).max() * spread).astype(F32)
    error, grad = call(place, CTC(0), x, datalen, labels, lengths, F32)
    got = place.get(grad).astype(np.float64)
    n, eps = x.shape[1], 2.0 ** -23
    assert np.isfinite(error) and np.isfinite(got).all()
    assert np.abs(got).max() <= (1 + 8 * eps) / n
    assert np.abs(got.sum(axis=2)).max() <= 8 * x.shape[2] * eps / n


def test_logits_at_the_float_range_stay_exact(place):
    """A blank at -3e38 and the other classes at +3e38: x - max overflows to -inf for the blank,
    whose probability is 0 (e^-6e38), and the other four share the frame: nll = -log of the
    number of labellings of 4^T (torch's float64 ctc_loss agrees)."""
    t_max, vocab = 6, 5
    x = np.full((t_max, 1, vocab), 3e38, F32)
    x[:, :, 0] = -3e38
    datalen, labels, lengths = np.array([t_max]), np.array([1, 2]), np.array([2])
    error, grad = call(place, CTC(0), x, datalen, labels, lengths, F32)
    ref_nll, ref_grad = reference(x, datalen, labels, lengths, 0)
    assert ref_nll[0] == pytest.approx(-np.log(5 / 4 ** t_max), rel=1e-12)   # (5 labellings: 1 1..1 2..2)
    check(place, error, grad, ref_nll, ref_grad, F32)


def test_shared_memory_kernel_refuses_what_it_cannot_hold(place, monkeypatch):
    """The host sends labels of more than 511 (2 L + 1 > 1024 states) to the global-memory kernel;
    were the shared-memory one launched instead, it stops (a trap) rather than overrun its rows."""
    if place.name != "emulated":
        pytest.skip("launches a kernel the library never launches: the emulation reports the trap")
    from cuda_emulation import KernelFault
    monkeypatch.setattr(ctc_module, "SHARED_STATES", 10 ** 6)
    x, datalen, labels, lengths = make_case("trap", 520, 1, 3, [515], [520], 0)
    with pytest.raises(KernelFault, match="ctc_alpha_beta_f32_shared"):
        call(place, CTC(0), x, datalen, labels, lengths, F32)


# ------------------------------------------------------------------ normalized=True

@needs_torch
def test_normalized_matches_torch_log_probs(place):
    """normalized=True: data are probabilities.  PyTorch's ctc_loss on log(data) has the same error,
    and its gradient with respect to log_probs is (data - gamma) / N here (the gradient for the
    logits that produced the probabilities): exactly -grad."""
    x, datalen, labels, lengths = make_case("normalized", 15, 3, 6, [4, 2, 0], None, 5)
    probs = np.exp(x) / np.exp(x).sum(axis=2, keepdims=True)
    log_probs = torch.tensor(np.log(probs), requires_grad=True)
    loss = F.ctc_loss(log_probs, torch.tensor(labels.astype(np.int64)), torch.tensor(datalen.astype(np.int64)),
                      torch.tensor(lengths.astype(np.int64)), blank=5, reduction="none")
    loss.sum().div(3).backward()
    error, grad = call(place, CTC(5, normalized=True), probs, datalen, labels, lengths, F64)
    check(place, error, grad, loss.detach().numpy(), -log_probs.grad.numpy(), F64)
    # and the same as the unnormalized cost on the logits
    error2, grad2 = call(place, CTC(5), x, datalen, labels, lengths, F64)
    assert error2 == pytest.approx(error, rel=1e-12)
    np.testing.assert_allclose(place.get(grad2), place.get(grad), atol=1e-12)


# ------------------------------------------------------------------ infeasible alignments

@pytest.mark.parametrize("zero_infinity", [False, True])
def test_infeasible_alignment(place, zero_infinity):
    """Sequence 0 needs 4 frames (labels 1 1 2: a blank between the repeats) and has 3: nll = inf.
    zeroInfinity=False: E = inf and NaN grad in its valid frames (PyTorch's behaviour);
    True: it counts 0 and its grad is 0.  The other sequence is unaffected."""
    x, _, _, _ = make_case("infeasible", 5, 2, 4, [0, 0], [5, 5], 0)
    labels, lengths, datalen = np.array([1, 1, 2, 3], np.int32), np.array([3, 1], np.int32), np.array([3, 5], np.int32)
    ref_nll, ref_grad = reference(x, datalen, labels, lengths, 0)
    assert np.isinf(ref_nll[0]) and np.isfinite(ref_nll[1])
    error, grad = call(place, CTC(0, zeroInfinity=zero_infinity), x, datalen, labels, lengths, F64)
    check(place, error, grad, ref_nll, ref_grad, F64, zero_infinity=zero_infinity)
    g = place.get(grad)
    assert (g[3:, 0] == 0).all()                          # past datalen: 0 in both modes
    if torch is not None:
        logits = torch.tensor(x, requires_grad=True)
        loss = F.ctc_loss(F.log_softmax(logits, 2), torch.tensor(labels.astype(np.int64)),
                          torch.tensor(datalen.astype(np.int64)), torch.tensor(lengths.astype(np.int64)), blank=0,
                          reduction="sum", zero_infinity=zero_infinity) / 2
        loss.backward()
        assert error == pytest.approx(loss.item(), rel=1e-12) or (math.isinf(error) and math.isinf(loss.item()))
        np.testing.assert_allclose(g, -logits.grad.numpy(), atol=1e-12)   # NaN where torch has NaN


def test_empty_targets_everywhere(place):
    """Every target empty (labels.size == 0): nll = -sum_t log y_t(blank)."""
    x, datalen, labels, lengths = make_case("empty", 6, 3, 4, [0, 0, 0], [6, 2, 0], 2)
    assert labels.size == 0
    error, grad = call(place, CTC(2), x, datalen, labels, lengths, F64)
    log_y = x - np.log(np.exp(x).sum(axis=2, keepdims=True))
    expected = -sum(log_y[:datalen[b], b, 2].sum() for b in range(3)) / 3
    assert error == pytest.approx(expected, rel=1e-13)
    check(place, error, grad, *reference(x, datalen, labels, lengths, 2), F64)


@pytest.mark.parametrize("masked", [0, 4])
def test_minus_inf_logits_are_zero_probabilities(place, masked):
    """A class masked with -inf logits in every frame (the first one a frame's running max sees, or
    the last, a lane of its own): a zero probability, so E and grad are exact elsewhere and grad is
    0 there, not exp(-inf - -inf) = NaN through every frame."""
    blank = 4 if masked == 0 else 0   # (a masked blank leaves no alignment for repeated labels)
    x, datalen, labels, lengths = make_case(("masked", masked), 6, 2, 5, [2, 1], [6, 5], blank)
    labels[:] = [1, 2, 3]
    x[:, :, masked] = -np.inf
    error, grad = call(place, CTC(blank), x, datalen, labels, lengths, F32)
    check(place, error, grad, *reference(x, datalen, labels, lengths, blank), F32)
    assert math.isfinite(error) and np.all(place.get(grad)[:, :, masked] == 0)


@pytest.mark.parametrize("zero_infinity", [False, True])
@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_nan_in_nan_out(place, bad, zero_infinity):
    """A NaN or +inf logit: E is NaN, and so is its sequence's grad in every valid frame (as
    PyTorch's; zeroInfinity zeroes an infinite nll, not a NaN one), never the finite -y / N its
    other entries would be; the other sequence is exact."""
    x, datalen, labels, lengths = make_case("nan", 6, 2, 5, [2, 1], [5, 6], 0)
    labels[:2] = [1, 2]
    x[2, 0, 4] = bad
    error, grad = call(place, CTC(0, zeroInfinity=zero_infinity), x, datalen, labels, lengths, F32)
    g = place.get(grad)
    assert math.isnan(error)
    assert np.isnan(g[:5, 0]).all() and (g[5, 0] == 0).all()   # (frame 5 is past the sequence's 5)
    ref_nll, ref_grad = reference(x[:, 1:], datalen[1:], labels[2:], lengths[1:], 0)
    np.testing.assert_allclose(g[:, 1].astype(np.float64), ref_grad[:, 0] / 2, atol=1e-6)


# ------------------------------------------------------------------ PuzzleLib's own tests, adapted

def test_puzzlelib_smallTest(place):
    host_data = np.array([[[0.1, 0.6, 0.1, 0.1, 0.1]], [[0.1, 0.1, 0.6, 0.1, 0.1]]], dtype=np.float32)
    data, datalen = place.put(host_data), place.put(np.array([2], dtype=np.int32))
    labels, lengths = place.put(np.array([1, 2], dtype=np.int32)), np.array([2], dtype=np.int32)   # lengths on the host
    error, grad = CTC(blank=4, vocabsize=5, normalized=True)([data, datalen], [labels, lengths])
    assert np.isclose(math.exp(-error), host_data[0, 0, 1] * host_data[1, 0, 2])


MEDIUM_DATA = np.array([   # PuzzleLib's mediumTest: TensorFlow's ctc_loss test case, probabilities
    [[0.633766, 0.221185, 0.0917319, 0.0129757, 0.0142857, 0.0260553],
     [0.30176, 0.28562, 0.0831517, 0.0862751, 0.0816851, 0.161508]],
    [[0.111121, 0.588392, 0.278779, 0.0055756, 0.00569609, 0.010436],
     [0.24082, 0.397533, 0.0557226, 0.0546814, 0.0557528, 0.19549]],
    [[0.0357786, 0.633813, 0.321418, 0.00249248, 0.00272882, 0.0037688],
     [0.230246, 0.450868, 0.0389607, 0.038309, 0.0391602, 0.202456]],
    [[0.0663296, 0.643849, 0.280111, 0.00283995, 0.0035545, 0.00331533],
     [0.280884, 0.429522, 0.0326593, 0.0339046, 0.0326856, 0.190345]],
    [[0.458235, 0.396634, 0.123377, 0.00648837, 0.00903441, 0.00623107],
     [0.423286, 0.315517, 0.0338439, 0.0393744, 0.0339315, 0.154046]]], dtype=np.float32)
MEDIUM_GRAD = -np.array([   # TensorFlow's gradient with respect to the logits: y - gamma
    [[-0.366234, 0.221185, 0.0917319, 0.0129757, 0.0142857, 0.0260553],
     [-0.69824, 0.28562, 0.0831517, 0.0862751, 0.0816851, 0.161508]],
    [[0.111121, -0.411608, 0.278779, 0.0055756, 0.00569609, 0.010436],
     [0.24082, -0.602467, 0.0557226, 0.0546814, 0.0557528, 0.19549]],
    [[0.0357786, 0.633813, -0.678582, 0.00249248, 0.00272882, 0.0037688],
     [0.230246, 0.450868, 0.0389607, 0.038309, 0.0391602, -0.797544]],
    [[0.0663296, -0.356151, 0.280111, 0.00283995, 0.0035545, 0.00331533],
     [0.280884, -0.570478, 0.0326593, 0.0339046, 0.0326856, 0.190345]],
    [[-0.541765, 0.396634, 0.123377, 0.00648837, 0.00903441, 0.00623107],
     [-0.576714, 0.315517, 0.0338439, 0.0393744, 0.0339315, 0.154046]]], dtype=np.float32)


def test_puzzlelib_mediumTest(place):
    """The data are inline in PuzzleLib's test (no data files needed).  Adapted: PuzzleLib's grad
    is the gradient of the summed nll; ours is that of E = the mean, so MEDIUM_GRAD / N."""
    data, datalen = place.put(MEDIUM_DATA), place.put(np.array([5, 5], dtype=np.int32))
    labels = place.put(np.array([0, 1, 2, 1, 0, 0, 1, 1, 0], dtype=np.int32))
    lengths = np.array([5, 4], dtype=np.int32)
    error, grad = CTC(vocabsize=6, blank=5, normalized=True)([data, datalen], [labels, lengths])
    d = MEDIUM_DATA
    score = [-math.log(d[0, 0, 0] * d[1, 0, 1] * d[2, 0, 2] * d[3, 0, 1] * d[4, 0, 0]), 5.42262]
    assert np.isclose(np.mean(score), error)
    assert np.allclose(MEDIUM_GRAD / 2, place.get(grad))
    assert not np.allclose(MEDIUM_GRAD, place.get(grad))   # (PuzzleLib's scale, N = 2 times ours)


def test_puzzlelib_randomTest(place):
    """PuzzleLib's randomTest: T=20, N=3, V=6, blank 0, label lengths in [T/4, T/2), against its host
    implementation (here the float64 reference of this file), hostError / N; grad / N."""
    rng = rng_for("randomTest")
    times, batchsize, vocabsize = 20, 3, 6
    host_data = rng.standard_normal((times, batchsize, vocabsize)).astype(np.float32)
    host_datalen = np.array([times] * batchsize, dtype=np.int32)
    lengths = rng.integers(times // 4, times // 2, size=batchsize).astype(np.int32)
    host_labels = rng.integers(1, vocabsize, size=int(lengths.sum())).astype(np.int32)
    ctc = CTC(blank=0, vocabsize=vocabsize)
    error, grad = ctc(place.put([host_data, host_datalen]), [place.put(host_labels), lengths])
    nll, ref_grad = reference(host_data, host_datalen, host_labels, lengths, 0)
    host_error, host_grad = nll.sum(), ref_grad * batchsize   # PuzzleLib's: the summed nll and its gradient
    assert np.isclose(host_error / batchsize, error)
    assert np.allclose(host_grad / batchsize, place.get(grad), atol=1e-5)


# ------------------------------------------------------------------ state, accumulators, determinism

def test_accumulators_and_validate(place):
    x, datalen, labels, lengths = make_case("accumulate", 10, 3, 5, [3, 1, 2], None, 0)
    x2, datalen2, labels2, lengths2 = make_case("accumulate 2", 10, 2, 5, [2, 4], None, 0)
    ref1 = reference(x, datalen, labels, lengths, 0)[0].sum()
    ref2 = reference(x2, datalen2, labels2, lengths2, 0)[0].sum()
    cost = CTC(0)
    e1, _ = call(place, cost, x, datalen, labels, lengths, F64)
    e2, _ = call(place, cost, x2, datalen2, labels2, lengths2, F64)
    assert (e1, e2) == (pytest.approx(ref1 / 3, rel=1e-12), pytest.approx(ref2 / 2, rel=1e-12))
    assert cost.batchsize == 2 and cost.numOfSamples == 5
    assert cost.getMeanError() == pytest.approx((ref1 + ref2) / 5, rel=1e-12)
    val = cost.validate(place.put([x, datalen]), place.put([labels, lengths]))
    assert val == pytest.approx(ref1 / 3, rel=1e-12) and cost.getValError() == val
    assert cost.getMeanError() == pytest.approx((ref1 + ref2) / 5, rel=1e-12)   # validate leaves it alone
    assert cost.getError() == pytest.approx(ref2 / 2, rel=1e-12) and cost.numOfSamples == 5


def test_host_integer_arrays_with_device_data(place):
    """datalen, labels and lengths may be host arrays whatever the data are (PuzzleLib passes
    lengths on the host); the result is the same."""
    x, datalen, labels, lengths = make_case("host ints", 8, 2, 5, [3, 2], None, 0)
    e1, g1 = CTC(0)(place.put([x, datalen]), place.put([labels, lengths]))
    e2, g2 = CTC(0)([place.put(x), datalen], [labels, lengths])
    assert e1 == e2 and np.array_equal(place.get(g1), place.get(g2))


def test_bitwise_deterministic_in_every_thread_order(emulated_in_every_order, monkeypatch):
    """The same bits in every thread order of the emulation, on repeated calls, and with the rows in
    shared or in global memory (the same arithmetic in the same order)."""
    x, datalen, labels, lengths = make_case("determinism", 30, 4, 6, [10, 0, 13, 4], None, 0)

    def run(place):
        out = []
        for _ in range(2):
            error, grad = call(place, CTC(0), x, datalen, labels, lengths, F32)
            out.append((error, place.get(grad).tobytes()))
        return out

    results = emulated_in_every_order(run)
    monkeypatch.setattr(ctc_module, "SHARED_STATES", 0)   # every sequence takes the global-memory kernel
    results += emulated_in_every_order(run)
    flat = [r for pair in results for r in pair]
    assert all(r == flat[0] for r in flat)
    assert np.isfinite(flat[0][0])


# ------------------------------------------------------------------ bad inputs

def good_inputs(n=2, t_max=6, vocab=5):
    x, datalen, labels, lengths = make_case("good", t_max, n, vocab, [2, 1], [6, 4], 0)
    return x.astype(np.float32), datalen, labels, lengths


def _bad_cases():
    x, datalen, labels, lengths = good_inputs()
    cases = {
        "pred not a list": (x, [labels, lengths]),
        "pred of three": ([x, datalen, datalen], [labels, lengths]),
        "target not a list": ([x, datalen], labels),
        "data 2-D": ([x[0], datalen], [labels, lengths]),
        "data integer": ([x.astype(np.int32), datalen], [labels, lengths]),
        "data empty": ([x[:0], datalen], [labels, lengths]),
        "datalen float": ([x, datalen.astype(np.float32)], [labels, lengths]),
        "datalen wrong shape": ([x, datalen[:1]], [labels, lengths]),
        "datalen > T": ([x, np.array([7, 4], np.int32)], [labels, lengths]),
        "datalen < 0": ([x, np.array([6, -1], np.int32)], [labels, lengths]),
        "lengths wrong shape": ([x, datalen], [labels, np.array([3], np.int32)]),
        "lengths negative": ([x, datalen], [labels, np.array([4, -1], np.int32)]),
        "lengths sum": ([x, datalen], [labels, np.array([2, 2], np.int32)]),
        "lengths float": ([x, datalen], [labels, lengths.astype(np.float64)]),
        "labels 2-D": ([x, datalen], [labels.reshape(1, 3), lengths]),
        "labels float": ([x, datalen], [labels.astype(np.float32), lengths]),
        "label is blank": ([x, datalen], [np.array([1, 0, 2], np.int32), lengths]),
        "label >= V": ([x, datalen], [np.array([1, 5, 2], np.int32), lengths]),
        "label < 0": ([x, datalen], [np.array([1, -2, 2], np.int32), lengths]),
        "not an array": ([x.tolist(), datalen], [labels, lengths]),
    }
    return cases


BAD = _bad_cases()


@pytest.mark.parametrize("name", list(BAD))
def test_bad_input_raises_before_any_state_changes(place, name):
    x, datalen, labels, lengths = good_inputs()
    cost = CTC(0, vocabsize=5)
    error, grad = cost(place.put([x, datalen]), place.put([labels, lengths]))
    before = (cost.error, cost.grad, cost.batchsize, cost.numOfSamples, cost.getMeanError())
    pred, target = BAD[name]
    pred = [pred[0], place.put(pred[1])] if name == "not an array" else place.put(pred)   # (a Python list as data)
    target = place.put(target)
    with pytest.raises(CostError):
        cost(pred, target)
    assert (cost.error, cost.grad, cost.batchsize, cost.numOfSamples, cost.getMeanError()) == before


def test_vocabsize_and_blank_checked_against_data(place):
    x, datalen, labels, lengths = good_inputs()
    with pytest.raises(CostError, match="vocabsize"):
        CTC(0, vocabsize=6)(place.put([x, datalen]), place.put([labels, lengths]))
    with pytest.raises(CostError, match="blank"):
        CTC(5)(place.put([x, datalen]), place.put([labels, lengths]))


@pytest.mark.parametrize("kwargs", [dict(blank=-1), dict(blank=1.0), dict(blank=True), dict(blank="0"),
                                    dict(blank=5, vocabsize=5), dict(blank=0, vocabsize=0),
                                    dict(blank=0, vocabsize=2.0), dict(blank=0, normalized="False"),
                                    dict(blank=0, normalized=1), dict(blank=0, zeroInfinity=None)], ids=repr)
def test_constructor_arguments(kwargs):
    with pytest.raises(CostError):
        CTC(**kwargs)


def test_any_integer_dtypes():
    x, datalen, labels, lengths = good_inputs()
    expected = CTC(0)([x, datalen], [labels, lengths])[0]
    for dtype in R.INT_DTYPES:
        assert CTC(0)([x, datalen.astype(dtype)], [labels.astype(dtype), lengths.astype(dtype)])[0] == expected
