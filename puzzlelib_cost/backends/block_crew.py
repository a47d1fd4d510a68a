"""The helper threads that share a call's blocks with the caller (numpy_blocks.run_blocks).

crew(helpers) is the process's crew of `helpers` daemon threads.  Crew.run(task) posts the task
(take blocks until none is left), runs it on the caller's thread too, and returns when the caller
and every helper that joined have finished: a helper that wakes after the caller took the last
block stays out and costs the call nothing.  Between calls a helper first spins for
SPIN_MICROSECONDS (cpu_kernels.spin, where numba is installed), then sleeps on a condition
variable; the caller waits for the last blocks the same way.  Measured on the 2-core machine (a
VM), a helper woken from sleep for a 0.4 ms call started so late that two threads took longer
than one; kept awake between calls, as OpenMP's threads are, it halves the call.  Calls from several threads at
once each wait for their own blocks only; the helpers join the latest.
"""
import os
import threading

import numpy as np

from .. import cpu_kernels

# How long a helper stays awake after a call, and the caller waits awake for the last blocks,
# before sleeping: longer than the gap between back-to-back calls (tens of microseconds), short
# enough that an idle process, or a busy machine, loses little to it.
SPIN_MICROSECONDS = 200


class Crew:
    def __init__(self, helpers):
        self._posted = np.zeros(1, np.int64)   # calls posted so far (helpers wait for it to change)
        self._changed = threading.Condition()  # guards _call and the calls' counts; notified on every change
        self._call = None
        spin = cpu_kernels.spin_wait()
        self._spin = spin.spin_while if spin else None
        self._spins = spin.spins_per_microsecond() * SPIN_MICROSECONDS if spin else 0
        for k in range(helpers):
            threading.Thread(target=self._serve, name=f"puzzlelib_cost-{k}", daemon=True).start()

    def run(self, task):
        """task() on the caller's thread and on each helper that joins in time; returns when all of
        them have finished; raises the first exception any of them raised."""
        call = _Call(task)
        with self._changed:
            self._call = call
            self._posted[0] += 1
            self._changed.notify_all()
        call.run()
        with self._changed:
            call.closed = True   # from here on no helper joins this call
        while (active := int(call.active[0])) != 0:
            self._wait_while(call.active, active)
        if call.errors:
            raise call.errors[0]

    def _wait_while(self, counter, value):
        """Until counter[0] != value: spinning (without the GIL) a while, then asleep."""
        if self._spin is not None and self._spin(counter, 0, value, self._spins):
            return
        with self._changed:
            self._changed.wait_for(lambda: counter[0] != value)

    def _serve(self):
        seen = 0
        while True:
            self._wait_while(self._posted, seen)
            with self._changed:
                seen, call = int(self._posted[0]), self._call
                if call.closed:
                    continue
                call.active[0] += 1
            call.run()
            with self._changed:
                call.active[0] -= 1
                self._changed.notify_all()


class _Call:
    """One call's task, its helpers at work (active, an array so that spin_while can read it)
    and the exceptions they raised."""

    def __init__(self, task):
        self.task, self.closed, self.errors = task, False, []
        self.active = np.zeros(1, np.int64)

    def run(self):
        try:
            self.task()
        except BaseException as error:   # (raised by the caller once every helper has finished)
            self.errors.append(error)


_crews = {}
_crews_lock = threading.Lock()


def crew(helpers):
    """The process's crew of `helpers` threads (made on first use)."""
    with _crews_lock:
        if helpers not in _crews:
            _crews[helpers] = Crew(helpers)
        return _crews[helpers]


def _forget_crews_in_child():
    """A forked child has none of its parent's threads: its crews (whose helpers it would wait for
    for ever) are dropped, and made again on first use."""
    global _crews_lock
    _crews.clear()
    _crews_lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_crews_in_child)
