"""Launching sanitize=True modules: AddressSanitizer in a worker process.

An ASan-instrumented shared object only loads into a process that starts with libasan
(LD_PRELOAD), and an ASan report ends that process. So the parent keeps one worker Python
process per sanitized module and sends it each launch: the arguments' 8-byte slots and a copy of
every array passed by pointer. The worker copies each array into its own exactly-sized heap
allocation (with the parent's address modulo 64, so alignment is the same), launches, and sends
the arrays back; the parent copies them into the original arrays. When the worker dies, the
parent reads the report that runtime.cpp wrote (prefixed with the CUDA block and thread),
raises KernelFault, and starts a new worker for the next launch.
"""

from __future__ import annotations

import ctypes
import os
import pickle
import re
import select
import shutil
import subprocess
import sys
import tempfile
import weakref
from pathlib import Path

import numpy as np

from ._build import compiler
from ._module import KernelFault, Library

_GRACE_SECONDS = 30  # beyond the launch's own timeout, before the worker is killed


def _shutdown(process: subprocess.Popen | None, folder: str) -> None:
    if process is not None and process.poll() is None:
        process.kill()
        process.wait()
    shutil.rmtree(folder, ignore_errors=True)


class SanitizedRunner:
    def __init__(self, shared_object: Path):
        self.shared_object = shared_object
        self._folder = tempfile.mkdtemp(prefix="cuda_emulation_asan_")
        self._process: subprocess.Popen | None = None
        self._finalizer = weakref.finalize(self, _shutdown, None, self._folder)
        self.kernel_table = self._start()

    # -- worker process -----------------------------------------------------------------------
    def _start(self) -> list[tuple]:
        libasan = subprocess.run([compiler(), "-print-file-name=libasan.so"], capture_output=True,
                                 text=True, check=True).stdout.strip()
        env = dict(os.environ)
        env["LD_PRELOAD"] = " ".join(filter(None, [libasan, env.get("LD_PRELOAD")]))
        env["ASAN_OPTIONS"] = ":".join(filter(None, [
            "detect_leaks=0", "halt_on_error=1", "abort_on_error=0", "symbolize=1",
            f"log_path={self._folder}/asan", env.get("ASAN_OPTIONS")]))
        to_child_r, to_child_w = os.pipe()
        from_child_r, from_child_w = os.pipe()
        package_parent = str(Path(__file__).resolve().parent.parent)
        boot = (f"import sys; sys.path.insert(0, {package_parent!r}); "
                "from cuda_emulation._sanitize import worker_main; worker_main()")
        self._report = os.path.join(self._folder, "report.txt")
        arguments = [str(self.shared_object), self._report, str(to_child_r), str(from_child_w)]
        self._process = subprocess.Popen([sys.executable, "-c", boot, *arguments], env=env,
                                         pass_fds=(to_child_r, from_child_w))
        os.close(to_child_r)
        os.close(from_child_w)
        self._to_child = os.fdopen(to_child_w, "wb")
        self._from_child = os.fdopen(from_child_r, "rb")
        self._finalizer.detach()
        self._finalizer = weakref.finalize(self, _shutdown, self._process, self._folder)
        reply = self._receive(timeout=120)
        if reply is None:
            raise RuntimeError(f"the AddressSanitizer worker did not start:\n{self._read_report()}")
        return reply

    def _receive(self, timeout: float):
        """The worker's next reply, or None if it died (or did not answer within `timeout`)."""
        ready, _, _ = select.select([self._from_child], [], [], timeout)
        try:
            if ready:
                return pickle.load(self._from_child)
        except (EOFError, pickle.UnpicklingError):
            pass
        if self._process.poll() is None:
            self._process.kill()
        self._process.wait()
        self._process = None
        for pipe in (self._to_child, self._from_child):
            try:
                pipe.close()
            except OSError:
                pass
        return None

    def _read_report(self) -> str:
        """The report runtime.cpp wrote (or else ASan's own log), removing all of them."""
        paths = [Path(self._report)] + sorted(Path(self._folder).glob("asan.*"))
        texts = [p.read_text(errors="replace") for p in paths if p.exists()]
        for p in paths:
            p.unlink(missing_ok=True)
        return texts[0] if texts else ""

    # -- launches -----------------------------------------------------------------------------
    def launch(self, kernel_name: str, request: tuple, arrays: list[tuple[int, np.ndarray]]) -> tuple:
        """Like Library.launch, in the worker; `arrays` are the (parameter, array) pairs."""
        timeout = request[-1]
        regions = _regions(arrays)
        if self._process is None or self._process.poll() is not None:
            self._start()
        payload = [(start % 64, ctypes.string_at(start, end - start), members)
                   for start, end, members in regions]
        pickle.dump(("launch", request, payload), self._to_child)
        self._to_child.flush()
        reply = self._receive(timeout + _GRACE_SECONDS)
        if reply is None:
            report = self._read_report()
            raise KernelFault(_describe_report(report, kernel_name) if report else
                              f"kernel {kernel_name} block (?,?,?) thread (?,?,?): the AddressSanitizer "
                              "worker process died or hung without a report", report=report or None)
        rc, message, pc, results = reply
        for (start, end, _), data in zip(regions, results):
            ctypes.memmove(start, data, end - start)
        return rc, message, pc


def _regions(arrays: list[tuple[int, np.ndarray]]) -> list[tuple[int, int, list[tuple[int, int]]]]:
    """Group the arrays' memory into disjoint regions (start, end, [(parameter, offset)]): arrays
    that overlap (the same array twice, a view of another) must stay overlapped in the worker."""
    spans = sorted((a.__array_interface__["data"][0], a.nbytes, i) for i, a in arrays)
    regions: list[list] = []
    for start, size, parameter in spans:
        if regions and start < regions[-1][1]:
            regions[-1][1] = max(regions[-1][1], start + size)
        else:
            regions.append([start, start + size, []])
        regions[-1][2].append((parameter, start - regions[-1][0]))
    return [tuple(r) for r in regions]


def _describe_report(report: str, kernel_name: str) -> str:
    """One line from an ASan report: the CUDA thread, the error, the access, the kernel line."""
    context = re.search(r"cuda_emulation: (kernel \S+ block \(.*?\) thread \(.*?\))", report)
    prefix = context.group(1) if context else f"kernel {kernel_name} block (?,?,?) thread (?,?,?)"
    error = re.search(r"ERROR: AddressSanitizer: (.*?)(?: at pc | \(pc |\n)", report)
    access = re.search(r"^((?:READ|WRITE) of size \d+ at 0x[0-9a-f]+)", report, flags=re.M)
    frame = None
    for match in re.finditer(r"^\s+#\d+ 0x[0-9a-f]+ in (.+?) (/\S+:\d+)", report, flags=re.M):
        if not re.search(r"(cuda_emulation\.h|runtime\.cpp|libsanitizer|/sanitizer_)", match.group(2)):
            frame = match
            break
    where = re.search(r"^(0x[0-9a-f]+ is located .*?)$", report, flags=re.M)
    shared = re.search(r"cuda_emulation: (dynamic shared memory overrun: .*)", report)
    text = f"{prefix}: AddressSanitizer: {error.group(1) if error else 'error'}"
    if shared:
        text = f"{prefix}: {shared.group(1)} (AddressSanitizer: {error.group(1) if error else 'error'})"
    if access:
        text += f"; {access.group(1)}"
    if frame:
        text += f" at {frame.group(2)} (in {frame.group(1)})"
    if where and not shared:
        text += f"; {where.group(1)}"
    return text


def worker_main() -> None:
    """The worker process: load the module, announce its kernels, then serve launches."""
    shared_object, report_path, fd_in, fd_out = sys.argv[1:5]
    library = Library(Path(shared_object))
    library.set_asan_report_path(report_path)
    requests, replies = os.fdopen(int(fd_in), "rb"), os.fdopen(int(fd_out), "wb")

    def reply(value) -> None:
        pickle.dump(value, replies)
        replies.flush()

    reply(library.kernels())
    while True:
        try:
            _, request, payload = pickle.load(requests)
        except EOFError:
            return
        index, grid, block, slots, shared_bytes, order, seed, timeout = request
        slots = list(slots)
        buffers = []
        for phase, data, members in payload:
            address = library.alloc(len(data), phase)
            ctypes.memmove(address, data, len(data))
            buffers.append((address, phase, len(data)))
            for parameter, offset in members:
                slots[parameter] = address + offset
        rc, message, pc = library.launch(index, grid, block, slots, shared_bytes, order, seed, timeout)
        results = [ctypes.string_at(address, size) for address, _, size in buffers]
        for address, phase, _ in buffers:
            library.free(address, phase)
        reply((rc, message, pc, results))
