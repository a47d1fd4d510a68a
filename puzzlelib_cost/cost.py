"""Cost: the base class of PuzzleLib's cost functions, with the same names and behaviour.

A call `cost(pred, target)` checks the inputs, computes the gradient and the batch
error, adds the error to an accumulator and counts the samples.  The batch error
and the accumulator are scalars that live where the work was done (device memory
on the GPU): they are read back only when `getError()`, `getMeanError()` or
`queryError=True` asks for them, so a training step with `queryError=False`
never waits for the device.

Subclasses implement the hooks `checkDataShape`, `calcGrad`, `calcError`
(and `checkValDataShape`, `calcVal` for validation).  `checkDataShape` must raise
`CostError` before anything changes: every piece of state is updated only after
the checks have passed.
"""
import contextlib
import inspect
import os
import sys
import threading

import numpy as np

from . import backends, label_checks
from .arrays import shape_of
from .errors import CostError


class _Argument:
    """A constructor argument a library cost keeps as the attribute of its name (Cost._ARGUMENTS):
    set once every argument is (a constructor, or a subclass's before it calls its parent's, sets
    them as it likes), a cost of the class that names it is made with the new value, whose checks
    raise CostError before anything changes, and its checked values are taken.  A descriptor, not
    a __setattr__: every other attribute a call sets (grad, the counters) costs nothing more
    (a __setattr__ took a small call from 20 to 30 us)."""
    def __init__(self, name, owner):
        self.name, self.owner = name, owner
        self.__doc__ = (f"The constructor argument {name!r}; setting it checks the new value as "
                        f"{owner.__name__}() does (CostError, the cost unchanged).")

    def __repr__(self):
        return f"<constructor argument {self.name!r} of {self.owner.__name__}>"

    def __get__(self, cost, cls=None):
        if cost is None:
            return self
        try:
            return cost.__dict__[self.name]
        except KeyError:
            raise AttributeError(f"{type(cost).__name__} object has no attribute {self.name!r}") from None

    def __set__(self, cost, value):
        names = self.owner._ARGUMENTS
        if all(name in cost.__dict__ for name in names):
            checked = self.owner(**{**{name: cost.__dict__[name] for name in names}, self.name: value})
            cost.__dict__.update({name: checked.__dict__[name] for name in names})
        else:
            cost.__dict__[self.name] = value


class Cost:
    """The base class of the costs, with PuzzleLib's interface: `error, grad = cost(pred, target)`
    (or `grad = cost(pred, target, queryError=False)`, no host synchronisation), getError(),
    getMeanError(), validate(), resetAccumulator(); subclasses implement the hooks below.  The
    module's docstring has the protocol."""
    # The constructor arguments a library cost keeps as attributes of their names: each becomes an
    # _Argument (__init_subclass__), checked when set as the constructor checks it (kl.temperature
    # = -1 ran).  PuzzleLib-style subclasses have none.
    _ARGUMENTS = ()
    # The attributes holding a call's arrays of the caller's kind (device arrays on a GPU), which a
    # copy or pickle of a cost that ran on a GPU leaves out (__getstate__): the gradient, and
    # validate's predicted classes (PuzzleLib's mostProb, where a cost keeps them).
    _RESULTS = ("grad", "mostProb")

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        for name in cls.__dict__.get("_ARGUMENTS", ()):
            setattr(cls, name, _Argument(name, cls))

    def __init__(self):
        self.error = None        # last batch's mean error, once read back
        self.valError = None     # last validate() result
        self.grad = None         # last gradient (the NEGATIVE gradient, see KLDivergence)
        self.batchsize = 0       # samples in the last batch
        self.numOfSamples = 0    # samples since the last resetAccumulator()
        self.devErr = None       # device scalar: last batch's summed error
        self.accumErr = None     # device scalar: summed error since the last reset
        self.valDevErr = None    # device scalar: summed error of the last validate() batch
        self.dirty = False       # devErr holds a batch error not yet read into self.error
        self._errorSamples = 0   # the samples of the batch whose error devErr holds (resetAccumulator keeps it)
        self._backend = None     # backend owning devErr and accumErr
        self._lateLabelChecks = []   # _LateLabelCheck: the label checks of earlier calls, not yet read
        self._in_call = threading.RLock()   # held by a call or validate() in progress (_one_call_at_a_time)

    # --- PuzzleLib's public interface -------------------------------------------------

    def __call__(self, pred, target, queryError=True):
        with self._one_call_at_a_time():
            self._answer_label_checks(wait=False)
            hooks = ("checkDataShape", "calcGrad", "updateState")
            saved = None   # (the attributes to put back should this call's answer find a bad label)
            if not queryError:
                answers = self._label_answers(hooks, in_call=False)
            elif self._lastGradKeptAnyway():
                answers, saved = self._label_answers(hooks, in_call=True), dict(self.__dict__)
            else:
                answers = contextlib.nullcontext()
            with answers as late:
                backend = self._checked_backend("checkDataShape", pred, target)
                self._compute(backend, pred, target)
            if late:
                check = _LateLabelCheck(late, self._errorSamples, self)
                if saved is None:
                    self.__dict__.setdefault("_lateLabelChecks", []).append(check)
                else:   # (a wait for the check alone: the work is queued behind it)
                    self._raise_for_bad_labels(late, saved)
                    check.settle(self.__dict__)   # (every label good: the rows its check ignored taken out)
            if queryError:
                return self.getError(), self.grad
            return self.grad

    def _lastGradKeptAnyway(self):
        """Whether the last call's grad stays in memory through this call whatever it does: there is
        none, or another reference holds it (the caller's `error, grad = cost(...)` from the last
        step, say).  Then a call that asks for its error answers its labels' check after its work is
        queued (_label_answers, in_call): its attributes kept, the old grad among them, to be put
        back for a bad label, and the GPU never waits for the host between the check and the work.
        Where only the cost holds it, keeping it would hold two grads in memory through the work:
        the check is answered before the work, as it was (the GPU idle while the host launches)."""
        grad = self.__dict__.get("grad")
        return grad is None or sys.getrefcount(grad) > 3   # (the attribute's, `grad`'s and getrefcount's own)

    def _label_answers(self, hooks, in_call):
        """The answers of the call's checks of device labels: none to wait for before the work.  A
        training step (queryError=False) must not wait for the GPU: its checks are answered later
        (label_checks.answer_later; on the device a bad batch adds nothing, its gradient zeros and
        its batch error NaN), and the cost raises their CostError at its next call or read of its
        error (_answer_label_checks).  validate, which reads its value, reads them in the same
        wait, after its work (in_call: a bad batch leaves its scalars as they were), and raises
        with the cost put back as it was (_raise_for_bad_labels); so does a call that reads its
        error where the last call's grad stays in memory anyway (_lastGradKeptAnyway: to be put
        back, it is kept through the work), else it waits for them before its work.  Only where
        the cost's hooks (`hooks`, and calcError the fused accumulateError) are the library's: a subclass's hooks
        may read the scalars in the call, before the answer, and PuzzleLib-style code expects its
        check's CostError before its hooks run.  Elsewhere the check's answer is waited for before
        the work (None)."""
        cls = type(self)
        if cls.calcError is not accumulateError \
                or not all(getattr(cls, hook).__module__.startswith(__package__ + ".") for hook in hooks):
            return contextlib.nullcontext(None)
        return label_checks.answer_later(nan_for_bad=not in_call)

    def _raise_for_bad_labels(self, answers, saved):
        """The CostError of a bad label among this call's `answers` (read after the call's own wait
        for its result, which they came before), with the cost's attributes put back as they were
        before the call (`saved`; on the device its scalars were left as they were: _label_answers)."""
        error = label_checks.first_bad_label_error(answers)
        if error is not None:
            self.__dict__.clear()
            self.__dict__.update(saved)
            raise error

    def _answer_label_checks(self, wait):
        """The CostError of the first bad label of an earlier call that did not wait for its check
        (_label_answers), with that call undone in the counters (its batch error was never added, its
        gradient was zeros); a good one's ignored rows (KLDivergence's ignoreLabel, counted on the
        device) taken out of them; wait=False reads only the answers that have landed (no waiting).  Only
        the cost whose call it was raises it (a child of a Multi's call answers at once)."""
        checks = self.__dict__.get("_lateLabelChecks")   # (None: a subclass's __init__ skipped Cost's)
        while checks:
            check = checks[0]
            try:
                if not wait and not check.ready():
                    return
            except CostError:   # (unreadable here, in a forked child: said once)
                checks.pop(0)
                raise
            checks.pop(0)
            error = check.settle(self.__dict__)
            if error is not None:
                raise CostError(f"{error} (in an earlier call, which did not ask for its error: on a GPU such a call "
                                f"does not wait for its labels' check, and a bad batch's gradient is all zeros and "
                                f"its error NaN, not counted)") from None

    @contextlib.contextmanager
    def _one_call_at_a_time(self):
        """A cost keeps each call's state on itself (as PuzzleLib's do), so two threads in one
        object's calls at once corrupted it (a checked batch taken by the other call, counters
        rolled back over the other call's): the second is a CostError, before it changes anything.
        (A PuzzleLib-style subclass whose __init__ skips Cost's has no lock, and no guard.)  The
        lock is re-entrant: a Multi holds its children's for the whole of its call
        (Multi._children_held) and calls them on its own thread meanwhile; and a Ctrl-C that lands
        between the lock's acquire and the try below, which would leave it held, leaves it held by
        the interrupted thread alone, which can call again (a notebook's cell run again after an
        interrupt was refused for good).  A call of the object from inside its own call on the same
        thread (a hook that calls the cost again) is refused all the same (_running): the outer call
        returned the inner one's grad."""
        lock = self.__dict__.get("_in_call")
        if lock is not None and not lock.acquire(blocking=False):
            if self.__dict__.get("_call_pid", os.getpid()) != os.getpid():   # (that thread was the parent's)
                raise CostError(f"this {type(self).__name__} object was in a call on another thread when this "
                                f"process was forked: it holds that call's state part way; make a new object here")
            raise CostError(f"this {type(self).__name__} object is in a call on another thread (or a call there was "
                            f"interrupted part way): a cost object keeps the state of one call at a time; give each "
                            f"thread its own")
        try:
            self._call_pid = os.getpid()   # (a forked child finds the lock held by a thread it does not have)
            if self.__dict__.get("_running"):
                raise CostError(f"this {type(self).__name__} object is in a call already, on this thread (one of its "
                                f"hooks called it again): a cost object keeps the state of one call at a time")
            try:
                self._running = True   # (first in the try: an interrupt cannot leave it set)
                yield
            finally:
                self._running = False
        finally:
            if lock is not None:
                lock.release()

    def _compute(self, backend, pred, target):
        """The work of a call whose inputs checkDataShape has accepted (Multi checks all its
        children's inputs first, then computes each); its state put back should it fail
        (_put_back)."""
        before = self._state_before_work()
        try:
            self._bindBackend(backend)
            self.reset()
            self._accumulated = False   # (set by _takeFusedAccumulator when calcGrad's pass adds to accumErr)
            self.grad = self.calcGrad(pred, target)
            self.calcError(pred, target)
            samples = self.getBatchsize(pred)
            self.dirty = True
            self.updateState(samples)   # (inside: an interrupt before it counted no sample)
            self._errorSamples = samples   # (here, not in updateState, which PuzzleLib code overrides)
            self._calls = self.__dict__.get("_calls", 0) + 1   # (_LateLabelCheck.undo)
            self._batch = None   # (left where a subclass's calcGrad does not take it: no reference kept)
        except BaseException:
            self._put_back(before)
            raise
        return self.grad

    def _state_before_work(self):
        """What _put_back restores: the attributes but grad, and the values of devErr and accumErr
        where they are host arrays.  (A cost's call takes it, and a Multi's of its own attributes.)"""
        saved = {name: value for name, value in self.__dict__.items() if name != "grad"}
        return saved, [(array, array.copy()) for array in (saved.get("devErr"), saved.get("accumErr"))
                       if isinstance(array, np.ndarray)]

    def _put_back(self, before):
        """After a call's work failed past its checks (out of memory, an interrupt, a bug): the
        cost's attributes but grad as they were (a half-reset cost answered getError() with None),
        and grad None: the last call's grad is let go before this call's is made, as reset() always
        did, so that a call never holds two (one more grad-sized block a call in the GPU's pool).
        On the CPU devErr and accumErr, 0-d arrays the work updates in place (some costs before
        their grad is made), get their values back too; a GPU's kernels may still add the batch to
        its accumErr."""
        saved, host_scalars = before
        self.__dict__.update(saved)
        for array, value in host_scalars:
            array[...] = value
        self.grad = None
        self._batch = None   # (the checked inputs of this call: no reference kept past it)

    def validate(self, pred, target):
        with self._one_call_at_a_time():
            self._answer_label_checks(wait=False)
            saved = dict(self.__dict__)
            with self._label_answers(("checkValDataShape", "calcVal"), in_call=True) as late:
                backend = self._checked_backend("checkValDataShape", pred, target)
                try:
                    self._bindBackend(backend)
                    self.valError = self.calcVal(pred, target)
                finally:
                    self._batch = None
            if late:
                self._raise_for_bad_labels(late, saved)
            return self.valError

    def _checked_backend(self, hook, pred, target):
        """The backend of a call whose inputs the check hook named `hook` accepts, before the call
        changes anything.  A library cost's check keeps the checked inputs (self._batch), marked
        here with the arrays they were checked on (_CheckedBatch: _takeBatch takes them for those
        arrays only).  Where the hook kept none (a PuzzleLib-style override that checks and does
        not call super()), the library's check runs here, after the hook: it ran inside calcGrad,
        past the point where a CostError leaves grad as it was, and inside a Multi after the
        children before had run.  Where the subclass has a calcGrad (calcVal) of its own, which may
        hand the library other arrays than the call's (labels reshaped, say), a CostError of that
        check is left for the library's work to raise, on the arrays it is handed (_takeBatch).  A
        check that fails half way (a subclass's that raises after its super()'s passed, or an
        interrupt) leaves no reference to the inputs behind."""
        self._batch = None   # (whatever a call before left: the hook's own check decides)
        try:
            checked = getattr(self, hook)(pred, target)
            if self.__dict__.get("_batch") is None:
                library_check, ours_works = _library_check(type(self), hook)
                if library_check is not None:
                    try:
                        checked = library_check(self, pred, target)
                    except CostError:
                        self._batch = None
                        if ours_works:
                            raise
            if self.__dict__.get("_batch") is not None:
                self._batch = _CheckedBatch(self._batch, pred, target)
            return self._backend_for(checked, pred, target)
        except BaseException:
            self._batch = None
            raise

    def getError(self):
        """The last batch's error, also after resetAccumulator() (as in PuzzleLib, which zeroes
        batchsize there but keeps the error: read once, it divided by that zero); None after
        reset() once it was read, as in PuzzleLib.  A CostError for a bad label of an earlier
        call that did not wait for its check (Cost._label_answers)."""
        self._answer_label_checks(wait=True)
        if self.dirty:
            self.error = self._backend.read_scalar(self.devErr) / self._errorSamples
            self.dirty = False
        if self.error is None and self._errorSamples == 0:
            raise CostError("getError(): no batch has been processed")
        return self.error

    def getMeanError(self):
        self._answer_label_checks(wait=True)
        if self.numOfSamples == 0 or self._backend is None:
            raise CostError("getMeanError(): no sample has been counted since the last resetAccumulator() "
                            "(no batch yet, or only rows that ignoreLabel leaves out)")
        return self._backend.read_scalar(self.accumErr) / self.numOfSamples

    def getValError(self):
        return self.valError

    def resetAccumulator(self):
        self.resetDeviceAccumulator()
        self.batchsize = 0
        self.numOfSamples = 0
        self._samplesSince = self.__dict__.get("_samplesSince", 0) + 1   # (_LateLabelCheck.undo)

    def resetDeviceAccumulator(self):
        if self._backend is not None:
            self._backend.write_scalar(self.accumErr, 0.0)

    def reset(self):
        self.error = None
        self.valError = None
        self.grad = None

    def updateState(self, samples):
        self.batchsize = samples
        self.numOfSamples += samples

    @staticmethod
    def _backend_for(checked, pred, target):
        """The backend a check hook returned.  PuzzleLib's hooks return None (they check, and
        PuzzleLib has one backend): then the inputs decide, as backends.for_inputs does (a list
        input, L1Hinge's pair or a sparse teacher, by its arrays), whose whole result is taken too."""
        if checked is None:
            named = {}
            for name, value in (("pred", pred), ("target", target)):
                if isinstance(value, (list, tuple)):
                    named.update({f"{name}[{i}]": part for i, part in enumerate(value)})
                else:
                    named[name] = value
            return backends.for_inputs(named)[0]
        return checked[0] if isinstance(checked, tuple) else checked

    def getBatchsize(self, pred):
        return shape_of(pred)[0]

    # --- hooks for subclasses ---------------------------------------------------------

    def checkDataShape(self, pred, target):
        """Check the inputs of a training call; return the backend that will run it (None, as
        PuzzleLib's hooks return: the one the inputs are on).  Cost's own checks nothing, as
        PuzzleLib's (a subclass that leaves it out runs)."""
        return None

    def checkValDataShape(self, pred, target):
        """Check the inputs of validate(); return the backend that will run it."""
        return self.checkDataShape(pred, target)

    def calcGrad(self, pred, target):
        """Return the gradient and leave the batch's summed error in self.devErr."""
        raise NotImplementedError

    def calcError(self, pred, target):
        """Add the batch's error (self.devErr) to the accumulator (self.accumErr)."""
        raise NotImplementedError

    def calcVal(self, pred, target):
        """Return the validation error (a float) without touching any accumulator."""
        raise NotImplementedError

    # --- the library's costs: their checked inputs, and the error added in calcGrad's pass ----

    def _takeBatch(self, own_check, pred, target):
        """The inputs this call's check accepted, as the library's checkDataShape keeps them
        (self._batch), taken once, where a call checked them on these very arrays.  Where none were,
        own_check checks these now (a CostError inside a call still puts the cost back as it was:
        _compute): a subclass's calcGrad that hands the library other arrays than the call's (a
        target rescaled, labels reshaped: they were computed on the call's, unseen), and hooks
        called by hand, as PuzzleLib code may (checkDataShape on some arrays, then calcVal on
        others, computed on the first; calcGrad alone crashed with an AttributeError).  (A
        subclass's calcGrad that changes the call's arrays in place before super().calcGrad is
        computed on what the check kept: the README asks for new arrays.)"""
        held, self._batch = self.__dict__.get("_batch"), None
        # (a batch kept without its arrays came from a check hook called by hand: checked again)
        batch = held.batch if isinstance(held, _CheckedBatch) and held.pred is pred and held.target is target else None
        if batch is None:
            own_check(self, pred, target)
            batch, self._batch = self._batch, None
        return batch

    def _takeFusedAccumulator(self):
        """accumErr, for calcGrad's kernels to add the batch error to in their own pass, where
        calcError is the library's (accumulateError); None where a subclass overrides calcError, as
        PuzzleLib code does to adjust devErr or to add it itself: that calcError then sees devErr
        before anything was added (the pass had added it already: counted twice, or the adjustment
        left out of getMeanError).  It records which (_accumulated, which accumulateError reads): a call
        takes it once, before its pass."""
        self._accumulated = type(self).calcError is accumulateError
        return self.accumErr if self._accumulated else None

    def __repr__(self):
        """The constructor call with the arguments the object keeps (the attributes named as its
        __init__'s parameters): KLDivergence(maxlabels=None, normTarget=True, temperature=2.0, ...)."""
        parts = []
        for name in list(inspect.signature(type(self).__init__).parameters)[1:]:
            if name in self.__dict__:
                value = self.__dict__[name]
                text = f"<{value.size} values>" if isinstance(value, np.ndarray) else repr(value)
                parts.append(f"{name}={text}")
        return f"{type(self).__name__}({', '.join(parts)})"

    # --- copies and pickles -----------------------------------------------------------

    def __getstate__(self):
        """What copy.copy, copy.deepcopy and pickle take: the cost's state with scalars of its own
        (devErr and accumErr are updated in place by each call: a shallow copy shared them, and
        the copy's batches went into the original's getMeanError) and no checked batch.  A cost
        that ran on a GPU comes back on the CPU's scalars with their values (a sync, as getError
        is), which its next GPU call carries over as any change of backend does; its device
        arrays (_RESULTS) are not kept: a GPU backend neither pickles nor copies."""
        state = dict(self.__dict__)
        state["_batch"] = None
        # The label checks not yet read stay the original's to raise; the copy, which reads the
        # scalars anyway, takes a bad batch out of its counters (label_checks: it added nothing).
        for check in state.pop("_lateLabelChecks", ()):
            check.settle(state)
        state["_lateLabelChecks"] = []
        state.pop("_running", None)   # (a copy made inside a call is not in one)
        if "_in_call" in state:
            state["_in_call"] = None   # (a lock neither pickles nor belongs to a copy: __setstate__ makes one)
        backend = state.get("_backend")
        for name in ("devErr", "accumErr", "valDevErr"):
            if state.get(name) is not None:
                state[name] = np.array(backend.read_scalar(state[name]), np.float64)
        if backend is not None and backend.name != "cpu":
            state["_backend"] = backends.cpu_backend()
            state.update({name: None for name in self._RESULTS if name in state})
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        if "_in_call" in state:
            self._in_call = threading.RLock()

    # --- where the scalars live ------------------------------------------------------

    def _bindBackend(self, backend):
        """Keep devErr and accumErr on the backend that does the work.

        Allocated once per cost (not per call); moving between backends, which
        only happens when a user mixes host and GPU arrays in one cost, carries
        the accumulated values across.
        """
        if backend is self._backend:
            return
        accumulated, last = 0.0, 0.0
        if self._backend is not None:
            try:
                accumulated = self._backend.read_scalar(self.accumErr)
                last = self._backend.read_scalar(self.devErr)
            except CostError as exc:   # (a forked child: the parent's GPU is out of its reach)
                raise CostError(f"this cost object keeps its accumulated error on the {self._backend.name} "
                                f"backend it last ran on, which cannot be read to carry it over to the "
                                f"{backend.name} backend of this call: {exc}.  A new cost object starts "
                                f"afresh") from None
        self.accumErr = backend.new_scalar(accumulated)
        self.devErr = backend.new_scalar(last)
        self.valDevErr = backend.new_scalar(0.0)
        self._backend = backend


class _CheckedBatch:
    """A library check's kept inputs (batch), with the arrays they were checked on."""
    __slots__ = ("batch", "pred", "target")

    def __init__(self, batch, pred, target):
        self.batch, self.pred, self.target = batch, pred, target


def _library_check(cls, hook):
    """(check, ours_works) for a cost of class `cls` whose check hook `hook` kept no inputs: the
    library's check, the hook of that name (else checkDataShape, which checkValDataShape defaults
    to) of the nearest of its classes that is this package's (None for a cost with no class of
    ours but Cost, whose hooks check nothing), and whether the work that takes the inputs (calcGrad;
    calcVal for checkValDataShape) is ours too.  (Not cached: it runs where a hook kept nothing,
    in under a microsecond, and a cache kept classes alive and missed a calcGrad added later.)"""
    below_cost = cls.__mro__[:cls.__mro__.index(Cost)]
    ours = [klass for klass in below_cost
            if klass.__module__ == __package__ or klass.__module__.startswith(__package__ + ".")]
    work = "calcVal" if hook == "checkValDataShape" else "calcGrad"
    ours_works = next((klass for klass in below_cost if work in klass.__dict__), None) in ours
    for name in (hook, "checkDataShape"):
        for klass in ours:
            if name in klass.__dict__:
                return klass.__dict__[name], ours_works
    return None, ours_works


class _LateLabelCheck:
    """The label checks of one call that did not wait for them (Cost._label_answers), with what
    undoing that call in the host counters takes: its samples, the accumulator period they were
    counted in (resetAccumulator starts another), and whether a later call has replaced its batch."""
    __slots__ = ("answers", "samples", "period", "cost_calls")

    def __init__(self, answers, samples, cost):
        self.answers, self.samples = answers, samples
        self.period = cost.__dict__.get("_samplesSince", 0)
        self.cost_calls = cost.__dict__.get("_calls", 0)   # (the call's own, counted by _compute)

    def ready(self):
        return all(answer.ready() for answer in self.answers)

    def settle(self, state):
        """The answers' CostError (waited for), with the call taken out of a cost's attributes (its
        __dict__, or a copy's state: undo); else None, with the rows its check ignored taken out of
        its samples (a training call counted pred's rows: KLDivergence.getBatchsize)."""
        error = label_checks.first_bad_label_error(self.answers)
        if error is not None:
            self.undo(state)
            return error
        ignored = sum(answer.ignored_rows() for answer in self.answers)
        if ignored:
            if state.get("_samplesSince", 0) == self.period:
                state["numOfSamples"] = max(0, state["numOfSamples"] - ignored)
            if state.get("_calls", 0) == self.cost_calls:   # (its batch is the cost's last)
                state["batchsize"] = max(0, state["batchsize"] - ignored)
                state["_errorSamples"] = max(0, state["_errorSamples"] - ignored)
        return None

    def undo(self, state):
        """Take the call out of a cost's attributes (its __dict__, or a copy's state)."""
        if state.get("_samplesSince", 0) == self.period:
            state["numOfSamples"] = max(0, state["numOfSamples"] - self.samples)
        if state.get("_calls", 0) == self.cost_calls:   # (its batch is the cost's last)
            state["dirty"] = False


def accumulateError(self, pred, target):
    """calcError of the library's costs: accumErr += devErr, unless calcGrad's pass has added it
    already (Cost._takeFusedAccumulator).  Reached from a subclass's calcError by super(), it adds
    devErr as the subclass has left it (on a GPU a read of both scalars: a synchronisation, where
    the fused pass has none)."""
    if not self.__dict__.get("_accumulated", False):
        backend = self._backend
        backend.write_scalar(self.accumErr, backend.read_scalar(self.accumErr) + backend.read_scalar(self.devErr))
    self._accumulated = True


def checked_maxlabels(maxlabels):
    """A constructor's `maxlabels` (the number of classes): None or a positive int, else CostError."""
    if maxlabels is not None and (isinstance(maxlabels, bool) or not isinstance(maxlabels, (int, np.integer))
                                  or maxlabels < 1):
        raise CostError(f"maxlabels: expected None or a positive integer, got {maxlabels!r}")
    return None if maxlabels is None else int(maxlabels)
