"""The cubin cache (puzzlelib_cost/backends/kernel_build.py) where the machine is not as expected:
a cubin cut short, a cache that cannot be written, XDG_CACHE_HOME empty or relative, no home, a
killed build's leftovers; and the backend's choice where pycuda cannot be had.  nvcc is replaced
by a copy of a made-up cubin (a real build takes minutes), so these run without a GPU or a compile."""
import os
import shutil
import struct
import tempfile
import time
from pathlib import Path

import pytest

from puzzlelib_cost import backends, describe_backend
from puzzlelib_cost.backends import kernel_build

needs_nvcc = pytest.mark.skipif(shutil.which("nvcc") is None, reason="the cubin's name asks nvcc for its version")


def elf(size=4096):
    """A 64-bit ELF file's bytes whose section headers (4 of 64 bytes) end the file."""
    header = bytearray(64)
    header[:5] = b"\x7fELF\x02"
    offset = size - 4 * 64
    header[0x28:0x30] = struct.pack("<Q", offset)
    header[0x3A:0x3C], header[0x3C:0x3E] = struct.pack("<H", 64), struct.pack("<H", 4)
    return bytes(header) + bytes(size - 64)


@pytest.fixture
def fake_nvcc(tmp_path, monkeypatch):
    """nvcc_command copies a made-up whole cubin to its output; the builds it ran, listed."""
    whole = tmp_path / "whole.cubin"
    whole.write_bytes(elf())
    built = []

    def command(arch, output, extra=(), directory=None):
        built.append(Path(output).parent.parent)
        return ["cp", str(whole), str(output)]
    monkeypatch.setattr(kernel_build, "nvcc_command", command)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    return built


def test_a_cubin_is_intact_only_whole():
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "a.cubin"
        path.write_bytes(elf())
        assert kernel_build.cubin_intact(path)
        for cut in (4095, 3840, 100, 10, 0):
            path.write_bytes(elf()[:cut])
            assert not kernel_build.cubin_intact(path), cut
        assert not kernel_build.cubin_intact(Path(folder) / "missing.cubin")


@needs_nvcc
def test_a_cubin_cut_short_is_built_again(tmp_path, monkeypatch, fake_nvcc):
    """A cubin cut short in the cache (a disk full, a copy, a crash before the data reached the
    disk) was loaded as it was, refused by the driver, and kept: every later process ran on the
    CPU.  It is built again in its place."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    path = kernel_build.cubin_path("sm_90")
    path.parent.mkdir(parents=True)
    path.write_bytes(elf()[:2000])
    assert kernel_build.cached_cubin("sm_90") == path and kernel_build.cubin_intact(path)
    assert fake_nvcc == [tmp_path / "cache" / "puzzlelib_cost"]
    kernel_build.cached_cubin("sm_90")
    assert len(fake_nvcc) == 1   # (a whole one is taken as it is)


@needs_nvcc
@pytest.mark.parametrize("cache", ["a file", "read-only"])
def test_a_cache_that_cannot_be_written_builds_in_the_temporary_folder(tmp_path, monkeypatch, fake_nvcc, cache):
    """XDG_CACHE_HOME naming a file, or a read-only home: the cubin is built under the temporary
    folder, and found there by the next process (the GPU was not usable: NotADirectoryError,
    PermissionError)."""
    if cache == "a file":
        (tmp_path / "cache").write_text("not a folder")
    else:
        (tmp_path / "cache" / "puzzlelib_cost").mkdir(parents=True)
        (tmp_path / "cache" / "puzzlelib_cost").chmod(0o555)
        if os.access(tmp_path / "cache" / "puzzlelib_cost", os.W_OK):
            pytest.skip("this user writes into read-only folders (root)")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    built = kernel_build.cached_cubin("sm_90")
    assert built.parent == Path(tempfile.gettempdir()) / built.parent.name and kernel_build.cubin_intact(built)
    assert kernel_build.cubin_path("sm_90") == built


def test_the_cache_follows_xdg_only_where_it_names_an_absolute_folder(tmp_path, monkeypatch):
    """The XDG spec ignores an empty or relative XDG_CACHE_HOME (an empty one put the cache in
    ./puzzlelib_cost, wherever the process ran); no home at all (a container's user without one)
    leaves the temporary folder (it was a RuntimeError, and no GPU)."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    home = tmp_path / "home" / ".cache" / "puzzlelib_cost"
    for value in ("", "relative/cache"):
        monkeypatch.setenv("XDG_CACHE_HOME", value)
        assert kernel_build.cache_dirs()[0] == home
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert kernel_build.cache_dirs()[0] == tmp_path / "xdg" / "puzzlelib_cost"
    monkeypatch.delenv("XDG_CACHE_HOME")

    def no_home():
        raise RuntimeError("Could not determine home directory.")
    monkeypatch.setattr(Path, "home", staticmethod(no_home))
    assert [folder.parent for folder in kernel_build.cache_dirs()] == [tmp_path / "tmp"]


@needs_nvcc
def test_a_killed_builds_leftovers_go_at_the_next_build(tmp_path, monkeypatch, fake_nvcc):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    folder = tmp_path / "cache" / "puzzlelib_cost"
    old, recent = folder / "tmpold", folder / "tmprecent"
    for leftover in (old, recent):
        leftover.mkdir(parents=True)
        (leftover / "partial.cubin").write_bytes(b"x" * 100)
    hours_ago = time.time() - kernel_build.STALE_BUILD_SECONDS - 60
    os.utime(old, (hours_ago, hours_ago))
    kernel_build.cached_cubin("sm_90")
    assert not old.exists() and recent.exists()   # (a build of another process may be in the recent one)


def test_no_pycuda_is_asked_once_a_process(monkeypatch):
    """Where pycuda cannot be imported, each call tried again: 0.2 ms a gpuarray.to_gpu."""
    from puzzlelib_cost.backends import pycuda_device
    asked = []

    def missing():
        asked.append(1)
        raise ImportError("No module named 'pycuda' (planted)")
    monkeypatch.setattr(pycuda_device, "current_ordinal", missing)
    monkeypatch.delenv(backends.ENV_VAR, raising=False)
    backends.forget_cuda()
    try:
        for _ in range(3):
            assert backends.active_backend() == "cpu"
        assert asked == [1] and "(planted)" in describe_backend()
    finally:
        backends.forget_cuda()


def test_describe_backend_is_one_line(monkeypatch):
    """nvcc's errors, many lines, made describe_backend() many lines."""
    monkeypatch.delenv(backends.ENV_VAR, raising=False)
    monkeypatch.setattr(backends, "_cuda_backend", lambda ordinal=None: (None, "RuntimeError: nvcc failed:\n" + "x\n" * 500))
    line = describe_backend()
    assert "\n" not in line and line.startswith("cpu (NumPy; CUDA not usable: RuntimeError: nvcc failed: x x") and len(line) < 500
