"""The helper threads of the NumPy backend (backends/block_crew.py): every block done once, by
someone, before a call returns; exceptions reach the caller; calls from several threads at once."""
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
