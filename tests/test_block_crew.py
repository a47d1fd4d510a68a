"""The helper threads of the NumPy backend (backends/block_crew.py): every block done once, by
someone, before a call returns; exceptions reach the caller; calls from several threads at once."""
import sys
import threading
import time

import numpy as np
import pytest

from puzzlelib_cost import KLDivergence
from puzzlelib_cost.backends import numpy_blocks


def test_every_block_is_done_once_before_the_call_returns():
    done = []

    def work(_scratch, n0, _n1, _s0, _s1):
        time.sleep(0.001 * (n0 % 3))   # uneven blocks: both threads take several
        done.append(n0)
        return n0 * n0
    blocks = [(i, i + 1, 0, 1) for i in range(40)]
    for _ in range(3):
        done.clear()
        assert numpy_blocks.run_blocks(work, blocks, 10 ** 9, threads=2) == [i * i for i in range(40)]
        assert sorted(done) == list(range(40))


def test_a_helpers_exception_reaches_the_caller_and_the_crew_goes_on():
    caller = threading.get_ident()
    helper_took_one = threading.Event()

    def work(_scratch, n0, _n1, _s0, _s1):
        if threading.get_ident() != caller:
            helper_took_one.set()
            raise ValueError(f"block {n0} failed on a helper")
        # The caller waits for the helper to take a block (a sleep a block raced it: on a loaded
        # machine the caller could finish all 20 before the helper woke, and nothing was raised).
        helper_took_one.wait(30)
        return n0
    blocks = [(i, i + 1, 0, 1) for i in range(20)]
    with pytest.raises(ValueError, match="failed on a helper"):
        numpy_blocks.run_blocks(work, blocks, 10 ** 9, threads=2)
    ok = numpy_blocks.run_blocks(lambda _s, n0, *_: n0, blocks, 10 ** 9, threads=2)
    assert ok == list(range(20))


def test_calls_from_several_threads_at_once_each_wait_for_their_own_blocks():
    def call(k, out):
        caller = threading.get_ident()

        def work(_scratch, n0, _n1, _s0, _s1):
            time.sleep(0.0002 if threading.get_ident() == caller else 0.003)   # a helper's block ends last
            return (k, n0)
        for _ in range(30):
            out.append(list(numpy_blocks.run_blocks(work, [(i, i + 1, 0, 1) for i in range(8)], 10 ** 9, threads=2)))
    outs = [[] for _ in range(4)]
    threads = [threading.Thread(target=call, args=(k, outs[k])) for k in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for k, out in enumerate(outs):
        assert out == [[(k, i) for i in range(8)]] * 30


def test_calls_from_several_threads_at_once_give_each_its_own_result(monkeypatch):
    monkeypatch.setattr(numpy_blocks, "THREADS", 2)
    rng = np.random.default_rng(3)
    cases = [((2 * rng.standard_normal((512, 1024))).astype(np.float32), rng.integers(0, 1024, 512))
             for _ in range(4)]
    expected = [KLDivergence()(pred, labels) for pred, labels in cases]
    got = [None] * len(cases)

    def call(i):
        for _ in range(5):
            error, grad = KLDivergence()(*cases[i])
            got[i] = (error, grad.tobytes())
    threads = [threading.Thread(target=call, args=(i,)) for i in range(len(cases))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert got == [(error, grad.tobytes()) for error, grad in expected]


def test_one_usable_core_means_one_thread():
    """A process pinned to one core (taskset, a container's cpuset) shares no blocks."""
    import os
    import subprocess
    import sys
    if not hasattr(os, "sched_setaffinity"):
        pytest.skip("no CPU affinity on this OS")
    threads = "from puzzlelib_cost.backends import numpy_blocks; print(numpy_blocks.THREADS)"
    pin = "import os; os.sched_setaffinity(0, {min(os.sched_getaffinity(0))}); "

    def run(code):
        return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert run(pin + threads) == "1"
    if len(os.sched_getaffinity(0)) > 1:
        assert run(threads) == "2"


def _ctrl_c_at_call(k):
    """A tracer raising KeyboardInterrupt at the k-th entry of a Python function on this thread,
    where a real Ctrl-C is checked (a function's start), and the count of entries seen."""
    seen = [0]

    def tracer(frame, event, arg):
        if event == "call":
            seen[0] += 1
            if seen[0] == k:
                sys.settrace(None)
                raise KeyboardInterrupt
        return None
    return tracer, seen


@pytest.mark.parametrize("case", ["crew", "row pool"])
def test_a_ctrl_c_anywhere_in_a_call_leaves_no_lock_held(case, monkeypatch):
    """A Ctrl-C landing inside a Condition's enter (a Python function), after its lock was taken
    and before the with statement held the exit, kept the crew's (or the row pool's) lock for good:
    every other thread's call then waited for ever (a helper's audit).  Here an interrupt at each
    function entry of one call in turn; after each, no lock is held and another thread's call of
    its own cost finishes."""
    from puzzlelib_cost import MSE
    from puzzlelib_cost.backends import block_crew
    from puzzlelib_cost.cpu_kernels import row_pool
    monkeypatch.setattr(numpy_blocks, "THREADS", 2)
    rng = np.random.default_rng(0)
    if case == "crew":   # (MSE's compiled blocks take the crew from 1.5M elements; NumPy's from 512K)
        make, a, b = MSE, *rng.standard_normal((2, 1600, 1000)).astype(np.float32)
    else:
        a = rng.standard_normal((256, 1000)).astype(np.float32)
        b = rng.random((256, 1000)).astype(np.float32)
        make, b = KLDivergence, b / b.sum(axis=1, keepdims=True)
    make()(a, b)   # (the kernels loaded, the crew and the pool made)

    def held():   # (the pool's helper holds its lock a moment on its way to sleep: held means held a second)
        for _ in range(1000):
            crews = [crew._lock._is_owned() for crew in block_crew._crews._values.values()]
            pools = [pool._lock.locked() for pool in row_pool._pool._values.values()]
            if not any(crews) and not any(pools):
                return False
            time.sleep(0.001)
        return True
    tracer, seen = _ctrl_c_at_call(0)
    cost = make()
    sys.settrace(tracer)
    cost(a, b)
    sys.settrace(None)
    assert seen[0] > 10
    for k in range(1, seen[0] + 1):
        tracer, _ = _ctrl_c_at_call(k)
        cost = make()
        sys.settrace(tracer)
        try:
            cost(a, b)
        except KeyboardInterrupt:
            pass
        finally:
            sys.settrace(None)
        assert not held(), f"a lock held after a Ctrl-C at function entry {k}"
        other = threading.Thread(target=lambda: make()(a, b), daemon=True)
        other.start()
        other.join(30)
        assert not other.is_alive(), f"another thread's call hung after a Ctrl-C at function entry {k}"
