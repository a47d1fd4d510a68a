"""The helper threads that share a call's blocks with the caller (numpy_blocks.run_blocks).

crew(helpers) is the process's crew of `helpers` daemon threads.  Crew.run(task) posts the task
(take blocks until none is left), runs it on the caller's thread too, and returns when the caller
and every helper that joined have finished: a helper that wakes after the caller took the last
block stays out and costs the call nothing (a ThreadPoolExecutor's caller waits for its submitted
task to start, on a busy machine a whole time slice).  Calls from several threads at once each
wait for their own blocks only; the helpers join the latest.

Helpers sleep on a condition variable between calls.  Its lock is taken with `with self._lock`,
whose enter and exit are C: a Condition's own are Python functions, where a Ctrl-C landing after
the acquire, before the with statement held the exit, kept the lock for good (every other
thread's call then waited for ever).  Spinning a while instead, as OpenMP's
threads do, was tried: on the 2-core machine measured it did not pay (the helper's wake-up was
not the cost: its call into the block needs the GIL, which the caller holds until its own block
starts), and on a busy machine it made two-thread calls 1.5x slower.
"""
import os
import threading

class Crew:
    def __init__(self, helpers):
        self._lock = threading.RLock()         # guards what follows and the calls' counts
        self._changed = threading.Condition(self._lock)   # notified on every change
        self._posted = 0                       # calls posted so far (helpers wait for it to change)
        self._call = None
        for k in range(helpers):
            threading.Thread(target=self._serve, name=f"puzzlelib_cost-{k}", daemon=True).start()

    def run(self, task):
        """task() on the caller's thread and on each helper that joins in time; returns when all of
        them have finished; raises the first exception any of them raised."""
        call = _Call(task)
        with self._lock:
            self._call = call
            self._posted += 1
            self._changed.notify_all()
        call.run()
        with self._lock:
            call.closed = True   # from here on no helper joins this call
            self._changed.wait_for(lambda: call.active == 0)
        if call.errors:
            raise call.errors[0]

    def _serve(self):
        seen = 0
        while True:
            with self._lock:
                self._changed.wait_for(lambda: self._posted != seen)
                seen, call = self._posted, self._call
                if call.closed:
                    continue
                call.active += 1
            call.run()
            with self._lock:
                call.active -= 1
                self._changed.notify_all()


class _Call:
    """One call's task, the helpers at work on it and the exceptions raised."""

    def __init__(self, task):
        self.task, self.closed, self.active, self.errors = task, False, 0, []

    def run(self):
        try:
            self.task()
        except BaseException as error:   # (raised by the caller once every helper has finished)
            self.errors.append(error)


class PerProcess:
    """make(key), made on first use for each key and kept for the process; forgotten in a forked
    child, which has none of its parent's threads (it would wait for their helpers for ever) and
    makes its own."""

    def __init__(self, make):
        self._make, self._values, self._lock = make, {}, threading.Lock()
        if hasattr(os, "register_at_fork"):
            os.register_at_fork(after_in_child=self._forget)

    def get(self, key):
        with self._lock:
            if key not in self._values:
                self._values[key] = self._make(key)
            return self._values[key]

    def _forget(self):
        self._values, self._lock = {}, threading.Lock()


_crews = PerProcess(Crew)


def crew(helpers):
    """The process's crew of `helpers` threads (made on first use)."""
    return _crews.get(helpers)
