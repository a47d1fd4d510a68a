"""The CUDA backend: memory, scalars and launches on one GPU, for any cost.

It knows no cost: each cost family's launch plan (puzzlelib_cost/<family>.py)
picks its kernels and scratch and launches through `launch`.  Allocation,
pointers, streams and launches go through a `device` (PycudaDevice on a GPU; the
tests' CPU emulation of the same .cu files stands in for it without one).  All
of one call's device work happens inside `run(infos)`, which orders it after
the callers' streams and their later work after it.
"""
import contextlib
import itertools

import numpy as np

from .. import label_checks
from ..arrays import describe

DTYPE_SUFFIX = {"float32": "f32", "float16": "f16", "bfloat16": "bf16", "float64": "f64"}
ITEMSIZE = {"f32": 4, "f16": 2, "bf16": 2, "f64": 8}
COMPUTE_ITEMSIZE = {"f32": 4, "f16": 4, "bf16": 4, "f64": 8}   # float arithmetic for 16/32-bit inputs
COMPUTE_DTYPE = {"f32": np.float32, "f16": np.float32, "bf16": np.float32, "f64": np.float64}

# The arguments every kernel ends its error with (see finish_batch_error in kernels/common.cuh):
# block_sums, ticket, batch_error, accumulator as pointers, then error_scale.
ERROR_OUT_SIGNATURE = "PPPPd"
# The grid cap of the kernels whose blocks loop over their work (elementwise, strided and sparse
# ones): fixed, not the device's, so that the blocks' partition, and so the order of the error's
# sum, is the same on every GPU, and their scratch (a sum a block) is bounded.
MAX_BLOCKS = 4096
CONSTANTS_KEPT = 16   # device copies of small constant arrays kept per device (see _Work.constant)

# The labels' range check on the device (kernels/labels.cu): check_labels_<in>_<out> reads labels of
# a dtype of LABEL_SUFFIX (a bool mask as its bytes) and writes them as LABEL_OUT_SUFFIX's dtype.
LABEL_THREADS = 256   # LABEL_THREADS of kernels/labels.cu
LABEL_SIGNATURE = "PPPqqqqi"   # labels, narrowed, found, n, low, high, ignore_bits, has_ignore
LABEL_SUFFIX = {"int8": "i8", "int16": "i16", "int32": "i32", "int64": "i64", "uint8": "u8", "uint16": "u16",
                "uint32": "u32", "uint64": "u64", "bool": "bool"}
LABEL_OUT_SUFFIX = {"int32": "i32", "int64": "i64"}
NO_BAD_LABEL = label_checks.NONE_FOUND   # the kernels' "first bad index" before any is found
# The check's answer, 6 words: first bad index, how many, the first bad label's bits, blocks done,
# check_distinct_columns' first repeat (row * columns + column) for a sparse teacher's indices, and
# how many labels were the one to ignore (KLDivergence's ignoreLabel).
LABEL_ANSWER_START = np.array([NO_BAD_LABEL, 0, 0, 0, NO_BAD_LABEL, 0], np.uint64)
LABEL_ANSWER_WORDS = len(LABEL_ANSWER_START)
LABEL_ANSWER_START.flags.writeable = False   # (uploaded: a device's copy is the kernel's to write)
COMMIT_SIGNATURE = "PPPPPqiP"   # commit_checked_labels: found, held, batch_error, accumulator, output, bytes,
                                # nan_for_bad, unscale
WEIGHTS_SIGNATURE = "PPPqq"   # weights_for_ignored_rows_<f32|f64>: found, weights, scale, columns, rows
COMMIT_BLOCKS = 1024          # its grid's cap (its blocks loop only for a bad batch)
DISTINCT_SIGNATURE = "PPqqq"   # check_distinct_columns: columns, found, rows, columns a row, columns
DISTINCT_MAX_COLUMNS = 8192 * 32   # DISTINCT_BITMAP_WORDS * 32: its shared bitmap's bits (longer rows:
                                   # checked on the host, CudaBackend.checked_labels)


def label_kernel_names():
    return sorted([f"check_labels_{i}_{o}" for i in LABEL_SUFFIX.values() for o in LABEL_OUT_SUFFIX.values()]
                  + ["check_distinct_columns", "commit_checked_labels", "weights_for_ignored_rows_f32",
                     "weights_for_ignored_rows_f64"])


def _launch_label_check(launch, labels, in_dtype, count, out_dtype, out, found, low, high, ignore=None):
    """check_labels_<in>_<out> over `count` labels at `labels`, narrowed into `out`, the first bad
    index and the count of bad ones into `found`, labels equal to `ignore` (None: none) narrowed to
    -1 and counted there too (`launch`: a device's or a work's)."""
    launch(f"check_labels_{LABEL_SUFFIX[np.dtype(in_dtype).name]}_{LABEL_OUT_SUFFIX[np.dtype(out_dtype).name]}",
           min(-(-count // LABEL_THREADS), MAX_BLOCKS), LABEL_THREADS, LABEL_SIGNATURE,
           (labels, out, found, count, int(low), int(high), *_ignore_bits(ignore, in_dtype)))


def _ignore_bits(ignore, dtype):
    """(ignore_bits as an int64, has_ignore) of check_labels for the label value `ignore` in labels of
    `dtype`: its bits as the kernel reads a label's (a signed dtype's sign-extended, an unsigned one's
    zero-extended, a bool's 0 or 1); none where no label of the dtype can equal it (-100 in uint8)."""
    dtype = np.dtype(dtype)
    if ignore is None:
        return 0, 0
    low, high = (0, 1) if dtype.kind == "b" else (int(np.iinfo(dtype).min), int(np.iinfo(dtype).max))
    if not low <= ignore <= high:
        return 0, 0
    bits = int(ignore) & (2 ** 64 - 1)
    return bits - 2 ** 64 if bits >= 2 ** 63 else bits, 1


def _launch_distinct_check(launch, columns, rows, found, n_cols):
    """check_distinct_columns over the checked int64 `columns` of `rows` (N, K): a block a row, the
    first repeat into found[4] (`launch`: a device's or a work's)."""
    n_rows, k_cols = rows
    if n_rows and k_cols > 1:
        launch("check_distinct_columns", min(n_rows, MAX_BLOCKS), LABEL_THREADS, DISTINCT_SIGNATURE,
               (columns, found, n_rows, k_cols, int(n_cols)))


def vec_width(suffix):
    """Elements per 16-byte vector."""
    return 16 // ITEMSIZE[suffix]


class CudaBackend:
    name = "cuda"

    def __init__(self, device):
        self.device = device
        self._constants = {}   # small host arrays (class weights) on the device: key -> (array kept, buffer)

    # --- scalars and host copies --------------------------------------------------------

    def new_scalar(self, value=0.0):
        return self.device.new_scalar(value)

    def read_scalar(self, scalar):
        return self.device.read_scalar(scalar)

    def write_scalar(self, scalar, value):
        self.device.write_scalar(scalar, value)

    def labels_to_host(self, info):
        return self.device.to_host(info)

    def checked_labels(self, info, low, high, expected, shape, dtype, name="target", distinct_rows=False,
                       ignore=None):
        """The integer (or bool) labels of the CUDA array `info`, all in [low, high), as a CheckedLabels:
        a device copy narrowed to `dtype` (int32 or int64) for the launch that reads them; else a
        CostError naming the first bad value and its index (in `shape`), as label_checks says it
        (`name`: the input they are).  distinct_rows: `info` is (N, K) column indices in [0, high)
        (a sparse teacher's), each row's distinct too, checked by check_distinct_columns after the
        range (rows of more than DISTINCT_MAX_COLUMNS columns: on the host, a synchronisation).
        ignore: a label value that is not checked, narrowed to -1 (a row to ignore) and counted:
        CheckedLabels.ignored, None where the count is on the device alone (answered later).

        One pass of check_labels_* on the work stream, after the labels' producer, then one small
        host synchronisation to read back its answer (first bad index, count, first bad label): the
        labels themselves never come to the host (a copy as large as them, and another one back,
        took 411 ms of BCE's 4096 x 16384 on an H200).

        Inside label_checks.answer_later() nothing is waited for, and nothing launched yet: the
        check runs in the work that takes these labels, first (_Work.labels: no work block of its
        own, whose stream ordering took four driver calls), its answer copied to the host behind
        it, for the cost to read after the work (label_checks.LateAnswer), and that work keeps its
        batch error aside until commit_checked_labels has seen the answer on the device
        (_Work.finish): a bad batch leaves the accumulator as it was, the batch error as it was or
        NaN (LateAnswers.nan_for_bad) and a gradient of zeros."""
        out = np.dtype(dtype)
        rows = tuple(info.shape) if distinct_rows else None
        if rows is not None and high > DISTINCT_MAX_COLUMNS:
            return self._checked_on_the_host(info, low, high, expected, shape, out, name)
        late = label_checks.late_answers()
        if late is not None:
            answer = label_checks.LateAnswer(None, info.dtype, expected, shape, name, high if rows else None)
            late.append(answer)
            return CheckedLabels(None, out, info.size, nan_for_bad=late.nan_for_bad,
                                 check=(info.pointer, info.dtype, low, high, rows, ignore), answer=answer,
                                 ignored=None if ignore is not None else 0)
        with self.device.work([info.stream]):
            # (from the work's pool, and held by the CheckedLabels until the launch that reads it is
            # queued: a block goes out again only to later work of the same stream)
            narrowed = self.device.scratch(max(info.size, 1) * out.itemsize)
            ignored = 0
            if info.size:
                found = self.device.upload(LABEL_ANSWER_START)
                _launch_label_check(self.device.launch, info.pointer, info.dtype, info.size, out, narrowed.ptr,
                                    found.ptr, low, high, ignore)
                if rows:
                    _launch_distinct_check(self.device.launch, narrowed.ptr, rows, found.ptr, high)
                words = self.device.read(found.ptr, np.uint64, LABEL_ANSWER_WORDS)
                error = label_checks.answer_error(words, info.dtype, expected, shape, name, high if rows else None)
                if error is not None:
                    raise error
                ignored = int(words[5])
        return CheckedLabels(narrowed, out, info.size, ignored=ignored)

    def _checked_on_the_host(self, info, low, high, expected, shape, out, name):
        """checked_labels' distinct rows beyond check_distinct_columns' bitmap: copied to the host
        (a synchronisation), checked there as the NumPy backend does, uploaded as `out`."""
        host = np.asarray(self.device.to_host(info))
        label_checks.check_label_values(host, (host < low) | (host >= high), expected, shape, name)
        label_checks.check_distinct_rows(host, name)
        with self.device.work([info.stream]):
            return CheckedLabels(self.device.upload(np.ascontiguousarray(host, dtype=out)), out, info.size, ignored=0)

    def check_streams(self, infos):
        self.device.check_streams([info.stream for info in infos])

    # --- one call's work ----------------------------------------------------------------

    @contextlib.contextmanager
    def run(self, infos):
        """`with backend.run(infos) as work:` one cost call's allocations and launches, ordered
        after the streams of the input arrays `infos` (and the callers' later work after them)."""
        with self.device.work([info.stream for info in infos]):
            work = _Work(self.device, self._constants)
            yield work
            work.finish()


class _Work:
    """The allocations and launches of one call.  Uploads and scratch stay referenced until the
    call's work is queued; the device's pool hands them out again only in stream order."""

    def __init__(self, device, constants):
        self.device = device
        self.max_blocks = device.max_blocks
        self.clusters = device.clusters   # whether kernels with thread-block clusters run (sm_90+)
        self.sms = device.sms             # streaming multiprocessors
        self.shared_per_sm, self.shared_per_block = device.shared_per_sm, device.shared_per_block   # bytes
        self._constants = constants
        self._buffers = []
        # Labels whose check the host reads later (CheckedLabels.found): until finish() commits the
        # work by the answer on the device, the batch errors the launches write are held aside
        # (error_out) and the outputs made are remembered, to be zeroed for a bad batch.
        self._found, self._nan_for_bad = None, False
        self._unscale = 0        # weights_for_ignored_rows' weight, which finish() takes out of the error
        self._held_errors = []   # (held, batch_error, accumulator) pointers
        self._outputs = []       # (pointer, bytes)

    def empty_like(self, info):
        """(an uninitialised array of info's kind, shape and dtype, its device pointer)."""
        return self._output(self.device.empty_like(info))

    def empty(self, shape, dtype):
        """(an uninitialised pycuda-style device array, its device pointer)."""
        return self._output(self.device.output(shape, np.dtype(dtype)))

    def _output(self, array):
        """(array, its pointer), remembered for finish() (pycuda, torch, CuPy and the emulation's
        arrays all say their nbytes; a bfloat16 dtype may be no NumPy dtype here)."""
        pointer = _pointer(array)
        self._outputs.append((pointer, int(array.nbytes)))
        return array, pointer

    def upload(self, host, dtype):
        """Pointer to a device copy of the host array `host` converted to `dtype`."""
        self._buffers.append(self.device.upload(np.ascontiguousarray(host, dtype=dtype)))
        return self._buffers[-1].ptr

    def labels(self, labels, dtype):
        """Pointer to checked labels (a CheckedLabels: CudaBackend.checked_labels) as the kernel's
        `dtype` on the device, narrowed by the check."""
        if labels.check is not None:   # (a check answered later: run here, before the launch that reads them)
            labels.launch_check(self.device)
        self._buffers.append(labels.buffer)   # (held until the launch is queued, as the uploads)
        if labels.found is not None and self._found is None:
            if self._held_errors:
                raise RuntimeError("a family's launch asked for its batch error before its labels: "
                                   "_Work.labels must come first, so that the error is held for the answer")
            self._found, self._nan_for_bad = labels.found, labels.nan_for_bad
            self._buffers.append(labels.found)
        out = np.dtype(dtype)
        if labels.dtype == out:
            return labels.buffer.ptr
        # Checked for another kernel of the family (a subclass's validate checking them through
        # checkDataShape, say): converted on the device by the check's kernel over every int64, its
        # answer unread (they are in range already).
        converted = self.scratch(max(labels.size, 1) * out.itemsize)
        if labels.size:
            _launch_label_check(self.launch, labels.buffer.ptr, labels.dtype, labels.size, out, converted,
                                self.upload(LABEL_ANSWER_START, np.uint64), -2 ** 63, 2 ** 63 - 1)
        return converted

    def weights_for_ignored_rows(self, labels, n_rows, n_cols, dtype):
        """Pointer to n_cols class weights of `dtype` (float32 or float64), each N / counted on the
        device (kernels/labels.cu), for labels whose ignored rows the host learns only later
        (CheckedLabels.ignored None; taken by labels() first): the kernels, launched with grad_scale
        1 / (T N), scale each row's grad by 1 / (T counted) with them, and finish() takes the weight
        out of the batch error."""
        if labels.found is None or labels.ignored is not None:
            raise RuntimeError("weights_for_ignored_rows: for labels whose ignored rows are counted on the device, "
                               "after _Work.labels")
        weights = self.scratch(max(n_cols, 1) * np.dtype(dtype).itemsize)
        self._unscale = self.scratch(8)
        self.launch(f"weights_for_ignored_rows_{'f64' if np.dtype(dtype) == np.float64 else 'f32'}",
                    max(1, min(-(-n_cols // LABEL_THREADS), COMMIT_BLOCKS)), LABEL_THREADS, WEIGHTS_SIGNATURE,
                    (labels.found.ptr, weights, self._unscale, n_cols, n_rows))
        return weights

    def constant(self, host, dtype):
        """Pointer to a device copy of a small host array that stays the same from call to call
        (CrossEntropy's class weights): copied on its first use only, not on every call.  A
        read-only array (the weights a cost keeps) is found by identity, kept alive by its entry
        so that its id is not reused; another by its bytes (hashing 128K weights took 0.5 ms)."""
        kept = host if isinstance(host, np.ndarray) and not host.flags.writeable else None
        if kept is not None:
            key = (id(host), np.dtype(dtype).str)
        else:
            host = np.ascontiguousarray(host, dtype=dtype)
            key = (host.dtype.str, host.tobytes())
        if key not in self._constants:
            if len(self._constants) >= CONSTANTS_KEPT:
                self._constants.pop(next(iter(self._constants)))   # the oldest
            self._constants[key] = (kept, self.device.upload(np.ascontiguousarray(host, dtype=dtype)))
        return self._constants[key][1].ptr

    def scratch(self, nbytes):
        """Pointer to `nbytes` of uninitialised device memory."""
        self._buffers.append(self.device.scratch(nbytes))
        return self._buffers[-1].ptr

    def error_out(self, blocks, batch_error, accumulator, scale=1.0):
        """The ERROR_OUT_SIGNATURE arguments of a launch of `blocks` blocks whose last block writes
        batch_error = scale * (the blocks' sums added in a fixed order) and adds that to
        `accumulator` when one is given.  With labels whose answer the host reads later (labels),
        the launch writes a held scratch scalar instead, committed by finish()."""
        batch_error = self.device.scalar_pointer(batch_error)
        accumulator = self.device.scalar_pointer(accumulator) if accumulator is not None else 0
        if self._found is not None:
            held = self.scratch(8)
            self._held_errors.append((held, batch_error, accumulator))
            batch_error, accumulator = held, 0
        return self.scratch(8 * blocks), self.device.ticket, batch_error, accumulator, float(scale)

    def finish(self):
        """After the call's launches (CudaBackend.run): with labels whose answer the host reads
        later, commit_checked_labels commits each held batch error or, for a bad batch, leaves it
        (or makes it NaN) and zeroes each output instead (kernels/labels.cu)."""
        if self._found is None:
            return
        # (one launch a held error and an output, paired as they came: a family's call makes one of
        # each, L1Hinge's two outputs; 0 for what the shorter list lacks)
        outputs = [(pointer, nbytes) for pointer, nbytes in self._outputs if nbytes]
        for held_error, output in itertools.zip_longest(self._held_errors, outputs):
            held, batch_error, accumulator = held_error or (0, 0, 0)
            pointer, nbytes = output or (0, 0)
            self.launch("commit_checked_labels", max(1, min(-(-nbytes // LABEL_THREADS), COMMIT_BLOCKS)),
                        LABEL_THREADS, COMMIT_SIGNATURE,
                        (self._found.ptr, held, batch_error, accumulator, pointer, nbytes, int(self._nan_for_bad),
                         self._unscale if held else 0))

    def launch(self, name, grid, block, signature, args, shared_bytes=0):
        self.device.launch(name, grid, block, signature, args, shared_bytes)


def _pointer(array):
    """The device address of an output the work made: pycuda's and torch's asked directly
    (describe() computed a pycuda array's flags, a tenth of a small call's host time), others'
    through describe()."""
    if hasattr(array, "gpudata"):
        return int(array.gpudata) if array.size else 0
    if hasattr(array, "data_ptr"):
        return array.data_ptr()
    return describe(array, "output").pointer


class CheckedLabels:
    """Integer labels checked on the device (CudaBackend.checked_labels), narrowed to `dtype`, in a
    buffer of the work's pool; a family's launch takes them with _Work.labels.  `found`: the check's
    answer on the device, where the host reads it later, and what a bad batch's error becomes
    (CudaBackend.checked_labels); `check`, (labels' pointer, dtype, low, high), until the work
    that takes them runs the check (launch_check), which makes the buffer and fills `answer`'s copy:
    (labels' pointer, dtype, low, high, (N, K) rows whose columns must be distinct or None, the label
    to ignore or None).  `ignored`: how many labels were the one to ignore, None where only the
    device knows (answered later: _Work.weights_for_ignored_rows)."""
    __slots__ = ("buffer", "dtype", "size", "found", "nan_for_bad", "check", "answer", "ignored")

    def __init__(self, buffer, dtype, size, found=None, nan_for_bad=False, check=None, answer=None, ignored=0):
        self.buffer, self.dtype, self.size, self.found = buffer, np.dtype(dtype), size, found
        self.nan_for_bad, self.check, self.answer, self.ignored = nan_for_bad, check, answer, ignored

    def launch_check(self, device):
        """check_labels_* into this buffer and a fresh answer, its answer's copy behind it (inside
        the work that takes the labels: their producers' streams are ordered before it)."""
        pointer, in_dtype, low, high, rows, ignore = self.check
        self.check = None
        # (from the work's pool: held by the CheckedLabels, and the work, until its launch is queued)
        self.buffer = device.scratch(max(self.size, 1) * self.dtype.itemsize)
        self.found = device.upload(LABEL_ANSWER_START)
        if self.size:
            _launch_label_check(device.launch, pointer, in_dtype, self.size, self.dtype, self.buffer.ptr,
                                self.found.ptr, low, high, ignore)
            if rows:
                _launch_distinct_check(device.launch, self.buffer.ptr, rows, self.found.ptr, high)
        self.answer.device_answer = device.answer_later(self.found.ptr, LABEL_ANSWER_WORDS)
