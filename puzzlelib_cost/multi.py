"""Multi: several costs side by side, one per output of a network.

`Multi().append(MSE()).append(CrossEntropy())`; then `errors, grads = multi([p1, p2], [t1, t2])`
gives each cost its own pred and target and returns lists.  It neither weights nor sums the
costs.  Every child's inputs are checked before any child computes, so a bad input changes no
child's state.  (A failure inside a child's work past the checks, out of memory say, leaves that
child as it was but for its grad, let go, and the children before it updated: undoing theirs
would take copies of their device accumulators on every call; so does a bad input that a child
with a calcGrad of its own hands the library in its work, which the library checks then:
Cost._checked_backend.)  A call holds every child's per-call lock, so another thread's call of a
child meanwhile is a CostError, as a call of the Multi itself is.
"""
import contextlib
import copy

from .cost import Cost
from .errors import CostError


class Multi(Cost):
    """Several costs side by side, one per output: `Multi().append(MSE()).append(CrossEntropy())`,
    then `errors, grads = multi([p1, p2], [t1, t2])` (lists; no weights, no sum)."""
    def __init__(self):
        super().__init__()
        self.costs = []
        self._batch = None   # the children's backends, from checkDataShape to calcGrad

    def append(self, cost):
        if not isinstance(cost, Cost) or isinstance(cost, Multi):
            raise CostError(f"append: expected a Cost other than Multi, got {type(cost).__name__}")
        if any(cost is child for child in self.costs):   # one object cannot hold two calls' inputs at once
            raise CostError(f"append: this {type(cost).__name__} is already in the Multi; append a new instance")
        self.costs.append(cost)
        return self

    def __call__(self, pred, target, queryError=True):
        # PuzzleLib's order of hooks, so that a subclass's calcGrad, updateState or getBatchsize
        # (one that weights the children's grads, say) takes part
        with self._one_call_at_a_time(), self._children_held():
            try:
                self._batch = None
                self.checkDataShape(pred, target)   # (every child's checks: a CostError here changes nothing)
                before = self._state_before_work()
                try:
                    self.reset()   # (error, valError and grad, as a cost's call resets them)
                    self.grad = self.calcGrad(pred, target)
                    self.calcError(pred, target)
                    self.updateState(self.getBatchsize(pred))
                    self.dirty = True   # (the children's errors not yet read into self.error, as a cost's)
                except BaseException:
                    self._put_back(before)   # (its own attributes, as a cost's call's)
                    raise
            finally:   # (the inputs of children a failure, or a subclass's calcGrad, left unused)
                self._let_inputs_go()
            if queryError:
                return self.getError(), self.grad
            return self.grad

    @contextlib.contextmanager
    def _children_held(self):
        """Every child's per-call lock, taken without waiting (CostError, nothing changed, where
        another thread's call holds one) and held for the whole of this call, so that another
        thread's call of a child cannot replace the inputs it was checked on before this call
        computes it.  The locks are re-entrant: this thread's calls of the children go through (a
        nested Multi's too)."""
        taken = []
        try:
            for cost in self.costs:
                lock = cost.__dict__.get("_in_call")
                if lock is None:   # (a PuzzleLib-style child whose __init__ skips Cost's: no guard)
                    continue
                if not lock.acquire(blocking=False):
                    raise CostError(f"Multi: its child {type(cost).__name__} is in a call on another thread: a cost "
                                    f"object keeps the state of one call at a time; give each thread its own")
                taken.append(lock)
            yield
        finally:
            for lock in taken:
                lock.release()

    def _let_inputs_go(self):
        """No reference kept to a call's inputs, by the Multi or by a child."""
        self._batch = None
        for cost in self.costs:
            cost._batch = None

    def checkDataShape(self, pred, target):
        """Every child's checks before any child's work; the children's backends are kept for
        calcGrad (and a failure drops the inputs the children that passed were holding)."""
        self._checkLists(pred, target)
        checked = []
        try:
            for i, (cost, p, t) in enumerate(zip(self.costs, pred, target)):
                try:
                    checked.append(cost._checked_backend("checkDataShape", p, t))
                except CostError as exc:
                    raise _named_child_error(i, cost, exc) from exc
        except BaseException:
            self._let_inputs_go()
            raise
        self._batch = checked

    def calcGrad(self, pred, target):
        """Each child's whole call (its reset, grad, error and counters); their grads, a list.  (A
        subclass's checkDataShape that skips super() kept no backends: Multi's checks run here, every
        child's before any child's work.)"""
        checked, self._batch = self.__dict__.get("_batch"), None
        if checked is None:
            Multi.checkDataShape(self, pred, target)
            checked, self._batch = self._batch, None
        return [cost._compute(backend, p, t) for cost, backend, p, t in zip(self.costs, checked, pred, target)]

    def calcError(self, pred, target):
        pass   # (each child's call has added its error to its own accumulator)

    def getBatchsize(self, pred):
        return self.costs[0].batchsize   # (the first child's counted samples, as a call counts them)

    def validate(self, pred, target):
        with self._one_call_at_a_time(), self._children_held():
            try:   # every child's checks before any child's work (a subclass's own, through its hook)
                self.checkValDataShape(pred, target)
            finally:
                self._let_inputs_go()
            # (each child's validate runs its checks again, then computes)
            self.valError = [cost.validate(p, t) for cost, p, t in zip(self.costs, pred, target)]
            return self.valError

    def checkValDataShape(self, pred, target):
        """Every child's validation checks (validate() runs them before any child's work)."""
        self._checkLists(pred, target)
        for i, (cost, p, t) in enumerate(zip(self.costs, pred, target)):
            try:
                cost._checked_backend("checkValDataShape", p, t)
            except CostError as exc:
                raise _named_child_error(i, cost, exc) from exc

    def getError(self):
        """The children's errors, read while dirty and kept in self.error, as PuzzleLib's Multi keeps
        them: None after reset() once read (the list was read from the children again)."""
        if self.dirty:
            self.error = [cost.getError() for cost in self.costs]
            self.dirty = False
        if self.error is None and not any(cost._errorSamples for cost in self.costs):
            raise CostError("getError(): no batch has been processed")
        return self.error

    def getMeanError(self):
        return [cost.getMeanError() for cost in self.costs]

    def resetAccumulator(self):
        for cost in self.costs:
            cost.resetAccumulator()
        self.batchsize = self.numOfSamples = 0

    def resetDeviceAccumulator(self):
        for cost in self.costs:
            cost.resetDeviceAccumulator()

    def __repr__(self):
        return f"Multi(costs={self.costs!r})"

    def __getstate__(self):
        """A copy (copy.copy included) holds copies of the children: they keep the accumulators."""
        state = super().__getstate__()
        state["costs"] = [copy.copy(cost) for cost in self.costs]
        return state

    def _checkLists(self, pred, target):
        if not self.costs:
            raise CostError("Multi: no costs; add them with append(cost)")
        for name, items in (("pred", pred), ("target", target)):
            if not isinstance(items, (list, tuple)) or len(items) != len(self.costs):
                got = f"a list of {len(items)}" if isinstance(items, (list, tuple)) else type(items).__name__
                raise CostError(f"{name}: expected a list of {len(self.costs)} (one per cost), got {got}")


def _named_child_error(index, cost, exc):
    """A child's CostError, prefixed with which child it is (pred[i] and target[i] are its inputs:
    the child's own message says "pred", not which one).  (A try in the loop, not a context
    manager: that cost a microsecond a child a call.)"""
    return CostError(f"Multi's cost {index} ({type(cost).__name__}, given pred[{index}] and target[{index}]): {exc}")

