"""CTC: connectionist temporal classification (Graves et al., 2006), PuzzleLib's inputs.

    pred   = [data, datalen]     data (T, N, V) float, time-major: logits (probabilities with
                                 normalized=True); datalen (N,) integer, the valid frames of each
                                 sequence, in [0, T]
    target = [labels, lengths]   labels: every sequence's labels concatenated, 1-D integer, each in
                                 [0, V) and not the blank; lengths (N,) integer >= 0, summing to
                                 labels.size
    E    = sum_b nll_b / N,   nll_b = -log P(labels_b | the first datalen[b] frames of sequence b)
    grad = (gamma - y) / N    for t < datalen[b], 0 for t >= datalen[b]

y_t(k) is softmax(data[t, b]) (the data as given with normalized=True) and gamma_t(k) the posterior
probability that frame t emits k (the occupation of the extended-label states s with l'_s = k).
grad is the NEGATIVE gradient: -dE/d data for logits; with normalized=True it is, as in PuzzleLib,
-dE/du for the logits u that produced the probabilities (data = softmax(u)), not -dE/d data.
An infeasible sequence (fewer frames than its labels need, or a zero probability on every path)
has nll = +inf: E = +inf and that sequence's grad NaN (frames < datalen), as PyTorch's ctc_loss;
with zeroInfinity=True its nll counts as 0 and its grad is 0 (PyTorch's zero_infinity).
validate() returns E and touches no accumulator.

Both backends compute the same way: the log-softmax once per frame, then the alpha and beta
recursions in log space (log-sum-exp) in float32 for 16- and 32-bit data (float64 for float64),
each row stored relative to the previous row's maximum (alpha's offsets summed in float64 per
sequence, for log P), so that neither alpha's growing magnitude nor an underflowing probability
costs digits; each frame's state occupancies exp(alpha + beta) over their sum (which is P: exact,
any offset cancels, and the rounding of alpha and beta stays out of the exponent, so gamma stays
in [0, 1]); nll in float64, summed over the batch in float64 in a fixed order.  Deterministic:
no atomics.
CUDA: kernels/ctc.cu (three launches; its top comment has the recursions).
"""
import numpy as np

from . import backends, label_checks
from .arrays import FLOAT_DTYPES, INTEGER_DTYPES, describe, shape_of
from .backends import numpy_blocks
from .backends.cuda_backend import COMPUTE_ITEMSIZE, DTYPE_SUFFIX, ERROR_OUT_SIGNATURE
from .cost import Cost, accumulateError
from .errors import CostError

THREADS = 128            # CTC_THREADS of kernels/ctc.cu: one block per sequence
ROW_THREADS = 128        # CTC_ROW_THREADS: ctc_lse_* (a warp per frame) and ctc_grad_* (a block per frame)
SHARED_STATES = 1024     # CTC_SHARED_STATES: longest extended label (2 L + 1) kept in shared memory
SEQ_FIELDS = 7           # CTC_SEQ_FIELDS: the int64 plan of one sequence (see _Plan.seqs)
MAX_BLOCKS = 4096        # cap of the row kernels' grids (they sum nothing: any cap gives the same result)
ALPHA_BETA_SIGNATURE = "P" * 10 + ERROR_OUT_SIGNATURE + "qqiiii"
LSE_SIGNATURE = "PPPqqq"
GRAD_SIGNATURE = "P" * 7 + "qqqiid"


def _checked_flag(value, name):
    if not isinstance(value, (bool, np.bool_)):   # (bool("False") would be True)
        raise CostError(f"{name}: expected True or False, got {value!r}")
    return bool(value)


def _is_int(value):
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


class CTC(Cost):
    """Connectionist temporal classification with PuzzleLib's inputs: `error, grad =
    cost([data, datalen], [labels, lengths])`, data (T, N, V) time-major logits, grad =
    -dE/d data, E = sum of the sequences' negative log-likelihoods / N.

    blank: the blank's index in [0, V).  vocabsize: None, or V.  normalized: data holds
    probabilities (the grad is PuzzleLib's, with respect to the logits that made them).
    zeroInfinity: an infeasible sequence counts 0 (and its grad 0) instead of +inf.  The
    module's docstring has the rest.
    """
    _ARGUMENTS = ("blank", "vocabsize", "normalized", "zeroInfinity")

    def __init__(self, blank, vocabsize=None, normalized=False, zeroInfinity=False):
        super().__init__()
        if not _is_int(blank) or blank < 0:
            raise CostError(f"blank: expected a non-negative integer (the blank's index), got {blank!r}")
        if vocabsize is not None and (not _is_int(vocabsize) or vocabsize < 1):
            raise CostError(f"vocabsize: expected None or a positive integer, got {vocabsize!r}")
        if vocabsize is not None and blank >= vocabsize:   # (PuzzleLib let blank == vocabsize pass)
            raise CostError(f"blank: expected an index in [0, vocabsize) = [0, {vocabsize}), got {blank}")
        self.blank = int(blank)
        self.vocabsize = None if vocabsize is None else int(vocabsize)
        self.normalized = _checked_flag(normalized, "normalized")
        self.zeroInfinity = _checked_flag(zeroInfinity, "zeroInfinity")
        self._batch = None

    def checkDataShape(self, pred, target):
        self._batch = self._checked(pred, target)   # (set only once every check has passed)
        return self._batch.backend

    def getBatchsize(self, pred):
        return shape_of(pred[0])[1]

    def calcGrad(self, pred, target):
        batch = self._takeBatch(CTC.checkDataShape, pred, target)   # (taken: no reference kept past the call)
        return run(batch, self.blank, self.normalized, self.zeroInfinity, self.devErr, self._takeFusedAccumulator(),
                   want_grad=True)

    calcError = accumulateError   # (the pass in calcGrad adds devErr to accumErr: see there)

    def calcVal(self, pred, target):
        batch = self._takeBatch(CTC.checkDataShape, pred, target)
        run(batch, self.blank, self.normalized, self.zeroInfinity, self.valDevErr, None, want_grad=False)
        return batch.backend.read_scalar(self.valDevErr) / batch.data.shape[1]

    # --- checks: everything before any state changes ------------------------------------

    def _checked(self, pred, target):
        for name, value in (("pred", pred), ("target", target)):
            if not isinstance(value, (list, tuple)) or len(value) != 2:
                what = "[data, datalen]" if name == "pred" else "[labels, lengths]"
                got = f"a {type(value).__name__} of {len(value)}" if isinstance(value, (list, tuple)) \
                    else type(value).__name__
                raise CostError(f"{name}: expected a list of two arrays {what}, got {got}")
        arrays = {"pred[0] (data)": pred[0], "pred[1] (datalen)": pred[1],
                  "target[0] (labels)": target[0], "target[1] (lengths)": target[1]}
        # data decides the backend; the integer arrays may also be host arrays with CUDA data
        # (PuzzleLib passes `lengths` as a host array), since they are read on the host anyway.
        on_device = {name: a for name, a in arrays.items() if name == "pred[0] (data)" or not isinstance(a, np.ndarray)}
        backend, infos = backends.for_inputs(on_device)
        infos = dict(zip(on_device, infos))
        for name, a in arrays.items():
            if name not in infos:
                infos[name] = describe(a, name)
        data, datalen = infos["pred[0] (data)"], infos["pred[1] (datalen)"]
        labels, lengths = infos["target[0] (labels)"], infos["target[1] (lengths)"]

        if len(data.shape) != 3:
            raise CostError(f"pred[0] (data): expected shape (T, N, V), time-major, got shape {data.shape}")
        if data.dtype not in FLOAT_DTYPES:
            raise CostError(f"pred[0] (data): expected a floating-point dtype ({', '.join(FLOAT_DTYPES)}), "
                            f"got {data.dtype}")
        if data.size == 0:
            raise CostError(f"pred[0] (data): expected a non-empty array (T, N, V >= 1), got shape {data.shape}")
        frames, n, vocab = data.shape
        label_checks.check_int32_count(vocab, "pred[0] (data)", data.shape, "classes (V)")
        label_checks.check_int32_count(n, "pred[0] (data)", data.shape, "sequences (N)",
                                       "the GPU kernel gives each a block")   # (past CUDA's grid: a driver error mid-call)
        if self.vocabsize is not None and vocab != self.vocabsize:
            raise CostError(f"pred[0] (data): expected shape[2] == vocabsize == {self.vocabsize}, "
                            f"got shape {data.shape}")
        if self.blank >= vocab:
            raise CostError(f"blank: expected an index in [0, V) = [0, {vocab}) (data has shape {data.shape}), "
                            f"got {self.blank}")
        for info, name, shape in ((datalen, "pred[1] (datalen)", (n,)), (lengths, "target[1] (lengths)", (n,))):
            if info.dtype not in INTEGER_DTYPES:
                raise CostError(f"{name}: expected an integer dtype, got {info.dtype}")
            if tuple(info.shape) != shape:
                raise CostError(f"{name}: expected shape {shape} (one per sequence; data has shape {data.shape}), "
                                f"got shape {info.shape}")
        if labels.dtype not in INTEGER_DTYPES:
            raise CostError(f"target[0] (labels): expected an integer dtype, got {labels.dtype}")
        if len(labels.shape) != 1:
            raise CostError(f"target[0] (labels): expected a 1-D array of every sequence's labels concatenated, "
                            f"got shape {labels.shape}")
        label_checks.check_int32_count(labels.shape[0], "target[0] (labels)", labels.shape, "labels in a batch")

        host_datalen = _to_host(backend, datalen)
        bad = np.flatnonzero((host_datalen < 0) | (host_datalen > frames))
        if bad.size:
            raise CostError(f"pred[1] (datalen): expected frame counts in [0, T] = [0, {frames}], got "
                            f"{host_datalen[bad[0]]} at index {bad[0]}")
        host_lengths = _to_host(backend, lengths)
        bad = np.flatnonzero((host_lengths < 0) | (host_lengths > labels.shape[0]))   # (no int64 overflow below)
        if bad.size:
            raise CostError(f"target[1] (lengths): expected lengths in [0, labels.size] = [0, {labels.shape[0]}], "
                            f"got {host_lengths[bad[0]]} at index {bad[0]}")
        host_lengths = host_lengths.astype(np.int64)
        total = int(host_lengths.sum())
        if total != labels.shape[0]:
            raise CostError(f"target[1] (lengths): expected lengths summing to labels.size = {labels.shape[0]}, "
                            f"got a sum of {total}")
        host_labels = _to_host(backend, labels)
        bad = (host_labels < 0) | (host_labels >= vocab) | (host_labels == self.blank)
        label_checks.check_label_values(host_labels, bad,
                                        f"labels in [0, V) = [0, {vocab}) other than the blank {self.blank}",
                                        name="target[0] (labels)")
        return _Batch(backend, data, [i for i in infos.values() if i.where == "cuda" and i is not data],
                      host_datalen.astype(np.int64), host_labels.astype(np.int64), host_lengths)


class _Batch:
    """The checked inputs of one call: the backend, data's ArrayInfo, the other CUDA arrays (the
    work is ordered after their streams too), and the integer arrays on the host as int64."""
    __slots__ = ("backend", "data", "device_infos", "datalen", "labels", "lengths")

    def __init__(self, backend, data, device_infos, datalen, labels, lengths):
        self.backend, self.data, self.device_infos = backend, data, device_infos
        self.datalen, self.labels, self.lengths = datalen, labels, lengths


def _to_host(backend, info):
    host = np.asarray(info.array) if info.where == "host" else np.asarray(backend.labels_to_host(info))
    return host.reshape(-1) if host.ndim == 0 else host


def _exclusive_cumsum(values):
    out = np.zeros(len(values), np.int64)
    np.cumsum(values[:-1], out=out[1:])
    return out


class _Plan:
    """Where each sequence's pieces sit in the flat arrays both backends use.

    labels of sequence b: labels[label_off[b] : label_off[b] + length[b]].  Its distinct labels
    are its segments: segment j covers order[start_j : end_j], the positions (within the
    sequence) of label_j in increasing order, so that gamma_t(label_j) is the sum of the odd
    states 2 i + 1 for those positions i, always added in that order."""

    def __init__(self, labels, lengths, frames, vocab):
        n = len(lengths)
        self.label_off = _exclusive_cumsum(lengths)
        seq_of = np.repeat(np.arange(n, dtype=np.int64), lengths)
        keys = seq_of * vocab + labels
        order = np.argsort(keys, kind="stable")              # by (sequence, label, position)
        sorted_keys = keys[order]
        starts = np.flatnonzero(np.r_[True, sorted_keys[1:] != sorted_keys[:-1]]) if order.size else \
            np.zeros(0, np.int64)
        ends = np.r_[starts[1:], order.size].astype(np.int64) if order.size else starts
        self.order = order - self.label_off[seq_of[order]]   # positions within each sequence
        self.segments = np.stack([starts, ends, labels[order[starts]]], axis=1).astype(np.int64)
        self.seg_count = np.bincount(seq_of[order[starts]], minlength=n).astype(np.int64)
        self.seg_first = _exclusive_cumsum(self.seg_count)
        states = 2 * lengths + 1
        self.states = states
        self.table_off = _exclusive_cumsum(frames * states)
        self.gamma_off = _exclusive_cumsum(frames * (self.seg_count + 1))
        self.sizes = {"table": int((frames * states).sum()),
                      "gamma": int((frames * (self.seg_count + 1)).sum()), "rows": int(4 * states.sum())}

    def seqs(self, lengths, frames):
        """The (N, SEQ_FIELDS) int64 table of kernels/ctc.cu's enum CtcSeq."""
        return np.stack([self.label_off, lengths, frames, self.table_off, self.gamma_off,
                         self.seg_first, self.seg_count], axis=1).astype(np.int64)


def run(batch, blank, normalized, zero_infinity, batch_error, accumulator, want_grad):
    """grad (or None), with batch_error = sum_b nll_b (accumulator += it when given)."""
    backend, data = batch.backend, batch.data
    if backend.name == "cpu":
        nll, grad = numpy_ctc(np.asarray(data.array), batch.datalen, batch.labels, batch.lengths, blank, normalized,
                              zero_infinity, want_grad)
        backend.store_error(float(np.sum(nll)), batch_error, accumulator)
        return None if grad is None else backend.output(grad, data)

    frames_max, n, vocab = data.shape
    suffix = DTYPE_SUFFIX[data.dtype]
    itemsize = COMPUTE_ITEMSIZE[suffix]
    plan = _Plan(batch.labels, batch.lengths, batch.datalen, vocab)
    storage = "shared" if int(plan.states.max()) <= SHARED_STATES else "global"

    rows_per_block = ROW_THREADS // 32
    lse_blocks = min(-(-(frames_max * n) // rows_per_block), MAX_BLOCKS)
    with backend.run([data] + batch.device_infos) as work:
        # The plan in one upload, the scratch in one block (each a copy or an allocation, and on the
        # host's side of a small call its time: 4 and 5 of them were 20 driver calls a call).
        seqs, segments, labels, order = _packed_upload(work, [
            (plan.seqs(batch.lengths, batch.datalen), np.int64), (plan.segments, np.int32),
            (batch.labels, np.int32), (plan.order, np.int32)])
        lse, status, gamma, table, rows = _carved_scratch(work, [
            None if normalized else 2 * frames_max * n * itemsize,   # (a row's max and log z)
            n * 4, plan.sizes["gamma"] * itemsize if want_grad else None, plan.sizes["table"] * itemsize,
            plan.sizes["rows"] * itemsize if storage == "global" else None])
        if not normalized:
            work.launch(f"ctc_lse_{suffix}", lse_blocks, ROW_THREADS, LSE_SIGNATURE,
                        (data.pointer, seqs, lse, frames_max, n, vocab))
        work.launch(f"ctc_alpha_beta_{suffix}_{storage}", n, THREADS, ALPHA_BETA_SIGNATURE,
                    (data.pointer, lse, labels, seqs, segments, order, table, gamma, rows, status,
                     *work.error_out(n, batch_error, accumulator, 1.0),
                     n, vocab, blank, int(normalized), int(zero_infinity), int(want_grad)))
        if not want_grad:
            return None
        grad, grad_ptr = work.empty_like(data)
        work.launch(f"ctc_grad_{suffix}", min(frames_max * n, MAX_BLOCKS), ROW_THREADS, GRAD_SIGNATURE,
                    (data.pointer, lse, seqs, segments, status, gamma, grad_ptr, frames_max, n, vocab, blank,
                     int(normalized), 1.0 / n))
    return grad


PIECE_ALIGN = 256   # where each piece of a packed upload or carved scratch starts (cudaMalloc's alignment)


def _piece_starts(sizes):
    """Each piece's start in bytes, aligned to PIECE_ALIGN, then the total."""
    starts = [0]
    for size in sizes:
        starts.append(starts[-1] + -(-size // PIECE_ALIGN) * PIECE_ALIGN)
    return starts


def _packed_upload(work, parts):
    """Device pointers to each (host array, dtype) of `parts`, all uploaded in one copy (an empty
    one takes a byte: it has an address all the same)."""
    arrays = [np.ascontiguousarray(array, dtype=dtype).reshape(-1) for array, dtype in parts]
    starts = _piece_starts([max(array.nbytes, 1) for array in arrays])
    host = np.zeros(starts[-1], np.uint8)
    for array, start in zip(arrays, starts):
        host[start:start + array.nbytes] = array.view(np.uint8)
    base = work.upload(host, np.uint8)
    return [base + start for start in starts[:-1]]


def _carved_scratch(work, sizes):
    """Pointers to scratch pieces of `sizes` bytes (each at least 8; None: no piece, pointer 0),
    carved from one allocation."""
    present = [max(size, 8) if size is not None else 0 for size in sizes]
    starts = _piece_starts(present)
    base = work.scratch(max(starts[-1], 8))
    return [base + start if size is not None else 0 for size, start in zip(sizes, starts)]


# --- the NumPy math: the kernels' recursions, vectorised over the batch --------------------

def _lse3(a, b, c):
    """log(e^a + e^b + e^c) elementwise; all -inf gives -inf, a NaN gives NaN (as lse3 in ctc.cu)."""
    m = np.maximum(np.maximum(a, b), c)
    out = m + np.log(np.exp(a - m) + np.exp(b - m) + np.exp(c - m))
    return np.where(m == -np.inf, m, out)


def _row_offset(row):
    """The maximum of each row (NaN-propagating); 0 where the whole row is -inf."""
    m = row.max(axis=1)
    return np.where(m == -np.inf, np.zeros_like(m), m)


def numpy_ctc(x, frames, labels, lengths, blank, normalized, zero_infinity, want_grad):
    """(nll per sequence, float64; grad in x's dtype or None).  Float32 arithmetic for 16- and
    32-bit x, float64 for float64; alpha's row offsets and nll in float64."""
    dtype = x.dtype
    compute = np.float64 if dtype == np.float64 else np.float32
    t_max, n, vocab = x.shape
    neg = compute(-np.inf)
    with np.errstate(all="ignore"):   # inf/NaN inputs give inf/NaN outputs, by design
        x = x.astype(compute)
        if normalized:
            log_y, y = np.log(x), x
        else:   # the log-softmax, once: (x - max) - log z, not x - (max + log z), which rounds log z
            # away at the logits' magnitude (as ctc_log_prob in ctc.cu)
            shifted = x - x.max(axis=2, keepdims=True)
            log_y = shifted - np.log(np.exp(shifted).sum(axis=2, keepdims=True))
            y = np.exp(log_y)

        states = 2 * lengths + 1
        s_max = int(states.max())
        s = np.arange(s_max)
        valid = s[None, :] < states[:, None]
        ext = np.full((n, s_max), blank, np.int64)   # the extended labels, padded with blanks
        seq_of = np.repeat(np.arange(n), lengths)
        position = np.arange(labels.size) - _exclusive_cumsum(lengths)[seq_of]
        ext[seq_of, 2 * position + 1] = labels
        skip = valid & (s % 2 == 1) & (s >= 3)          # s-2 -> s allowed
        skip[:, 3:] &= ext[:, 3:] != ext[:, 1:-2]
        emit = np.take_along_axis(log_y, np.broadcast_to(ext[None], (t_max, n, s_max)), axis=2)
        emit = np.where(valid[None], emit, neg)          # padding states are never reachable

        def shifted(row, by, allowed=None):
            """row moved `by` states right (by > 0: from s - by) or left (by < 0: from s + |by|), -inf filled."""
            out = np.full_like(row, neg)
            if by > 0:
                out[:, by:] = row[:, :-by]
            else:
                out[:, :by] = row[:, -by:]
            return out if allowed is None else np.where(allowed, out, neg)

        # alpha: table[t] = alpha_t less the offsets subtracted so far (total: their sum, per sequence,
        # which stops growing past the sequence's frames)
        table = np.full((t_max, n, s_max), neg, compute)
        row = np.where(s[None, :] < 2, emit[0], neg)
        table[0] = row
        total = np.zeros(n)
        for t in range(1, int(frames.max(initial=0))):
            active = t < frames
            c = _row_offset(row)
            new = _lse3(row, shifted(row, 1), shifted(row, 2, skip)) - c[:, None] + emit[t]
            row = np.where(active[:, None], new, row)
            total = np.where(active, total + c.astype(np.float64), total)
            table[t] = row
        log_p = np.where(lengths == 0, 0.0, -np.inf)     # no frames: the empty alignment, or none
        for b in np.flatnonzero(frames > 0):
            last = table[frames[b] - 1, b]
            end = _lse3(last[states[b] - 1], last[states[b] - 2] if states[b] >= 2 else neg, neg)
            log_p[b] = total[b] + float(end)
        infinite = log_p == -np.inf
        nll = np.where(infinite & zero_infinity, 0.0, -log_p)
        if not want_grad:
            return nll, None

        # beta (without frame t's emission) and the state occupancies gamma_t(s), each frame's
        # normalised to sum to 1: sum_s alpha_t(s) beta_t(s) = P at every frame, so dividing by the
        # frame's own sum is exact, and unlike dividing by P it keeps the rounding of alpha and beta
        # (which grows with the logits' magnitude) out of the exponent: exp(alpha + beta - log P)
        # overflowed to inf at logits of 1e10, and passed 1 from 1e5
        occupancy = np.zeros((t_max, n, s_max), compute)
        occupied = np.zeros((t_max, n), compute)          # each frame's sum of exp(alpha + beta - its max)
        skip_from = np.zeros_like(skip)
        skip_from[:, :-2] = skip[:, 2:]                  # s -> s+2 allowed
        last_two = valid & (s[None, :] >= states[:, None] - 2)
        emitted = np.full((n, s_max), neg, compute)      # beta_{t+1} + emission, stored relative
        for t in range(int(frames.max(initial=0)) - 1, -1, -1):
            first = t == frames - 1
            d = _row_offset(emitted)
            beta = _lse3(emitted, shifted(emitted, -1), shifted(emitted, -2, skip_from)) - d[:, None]
            beta = np.where(first[:, None], np.where(last_two, compute(0), neg), beta)
            mass = table[t] + beta                       # alpha_t + beta_t less the offsets subtracted
            occupancy[t] = np.where((t < frames)[:, None], np.exp(mass - _row_offset(mass)[:, None]), 0)
            occupied[t] = occupancy[t].sum(axis=1)
            emitted = np.where((t < frames)[:, None], beta + emit[t], neg)

        gamma = np.zeros((t_max, n, vocab), compute)
        gamma[:, :, blank] = occupancy[:, :, 0::2].sum(axis=2)   # (padding states hold 0)
        plan = _Plan(labels, lengths, frames, vocab)
        for b in range(n):
            first, count = plan.seg_first[b], plan.seg_count[b]
            if count:
                seg = plan.segments[first:first + count]
                odd = occupancy[:, b, 1::2][:, plan.order[seg[0, 0]:seg[-1, 1]]]   # the sequence's positions, grouped
                gamma[:, b, seg[:, 2]] = np.add.reduceat(odd, seg[:, 0] - seg[0, 0], axis=1)
        gamma /= np.where(occupied > 0, occupied, compute(1))[..., None]   # (0: past the frames, no alignment)
        grad = (gamma - y) * compute(1.0 / n)
        t_index = np.arange(t_max)[:, None]
        grad = np.where(t_index[..., None] < frames[None, :, None], grad, compute(0))
        # An infinite nll: 0 (zeroInfinity) or no gradient (NaN); a NaN nll (a NaN or +inf logit):
        # NaN, in every valid frame of the sequence (as ctc_alpha_beta's status in ctc.cu).
        zeroed = infinite & zero_infinity
        undefined = (infinite | np.isnan(log_p)) & ~zeroed
        for rows, fill in ((zeroed, compute(0)), (undefined, compute(np.nan))):
            grad[:, rows] = np.where(t_index < frames[None, rows], fill, 0)[..., None]
    out = np.empty(grad.shape, dtype)
    numpy_blocks.store(out, grad)
    return nll, out


def kernel_names():
    suffixes = DTYPE_SUFFIX.values()
    return sorted([f"ctc_alpha_beta_{s}_{m}" for s in suffixes for m in ("shared", "global")]
                  + [f"ctc_lse_{s}" for s in suffixes] + [f"ctc_grad_{s}" for s in suffixes])
