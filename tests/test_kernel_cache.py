"""The cubin cache (puzzlelib_cost/backends/kernel_build.py) where the machine is not as expected:
a cubin cut short, a cache that cannot be written, XDG_CACHE_HOME empty or relative, no home, a
killed build's leftovers; and the backend's choice where pycuda cannot be had.  nvcc is replaced
by a copy of a made-up cubin (a real build takes minutes), so these run without a GPU or a compile."""
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from puzzlelib_cost import backends, describe_backend
from puzzlelib_cost.backends import kernel_build

needs_nvcc = pytest.mark.skipif(shutil.which("nvcc") is None, reason="the cubin's name asks nvcc for its version")


@pytest.fixture(scope="module")
def small_cubin(tmp_path_factory):
    """A real cubin of one small kernel (nvcc, about a second), as a stand-in for the library's."""
    if shutil.which("nvcc") is None:
        pytest.skip("needs nvcc")
    folder = tmp_path_factory.mktemp("small")
    (folder / "small.cu").write_text('extern "C" __global__ void twice(float* x) { x[threadIdx.x] *= 2; }\n')
    subprocess.run(["nvcc", "--cubin", "-arch=sm_90", "-o", str(folder / "small.cubin"), str(folder / "small.cu")],
                   check=True, capture_output=True)
    return (folder / "small.cubin").read_bytes()


@pytest.fixture
def fake_nvcc(tmp_path, monkeypatch, small_cubin):
    """nvcc_command copies the small cubin to its output; the folders it built into, listed."""
    whole = tmp_path / "whole.cubin"
    whole.write_bytes(small_cubin)
    built = []

    def command(arch, output, extra=(), directory=None):
        built.append(Path(output).parent.parent)
        return ["cp", str(whole), str(output)]
    monkeypatch.setattr(kernel_build, "nvcc_command", command)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    return built


def test_a_cubin_is_intact_only_whole(tmp_path, small_cubin):
    """Every cut of a real cubin is seen (nvcc ends a cubin with its program segments' table, past
    the sections: a check of the section table alone took a cubin one byte short as whole)."""
    path = tmp_path / "a.cubin"
    path.write_bytes(small_cubin)
    assert kernel_build.cubin_intact(path)
    for cut in sorted({len(small_cubin) - 1, len(small_cubin) - 57, len(small_cubin) // 2, 64, 63, 10, 0}
                      | set(range(64, len(small_cubin), max(1, len(small_cubin) // 97)))):
        path.write_bytes(small_cubin[:cut])
        assert not kernel_build.cubin_intact(path), cut
    assert not kernel_build.cubin_intact(tmp_path / "missing.cubin")


@needs_nvcc
def test_a_cubin_cut_short_is_built_again(tmp_path, monkeypatch, fake_nvcc):
    """A cubin cut short in the cache (a disk full, a copy, a crash before the data reached the
    disk) was loaded as it was, refused by the driver, and kept: every later process ran on the
    CPU.  It is built again in its place."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    path = kernel_build.cubin_path("sm_90")   # (its folder made by the look for it)
    path.write_bytes(b"\x7fELF\x02\x01" + bytes(2000))
    assert kernel_build.cached_cubin("sm_90") == path and kernel_build.cubin_intact(path)
    assert fake_nvcc == [tmp_path / "cache" / "puzzlelib_cost"]
    kernel_build.cached_cubin("sm_90")
    assert len(fake_nvcc) == 1   # (a whole one is taken as it is)


@needs_nvcc
@pytest.mark.parametrize("cache", ["a file", "read-only"])
def test_a_cache_that_cannot_be_written_builds_in_the_users_temporary_folder(tmp_path, monkeypatch, fake_nvcc, cache):
    """XDG_CACHE_HOME naming a file, or a read-only home: the cubin is built in the user's own folder
    under the temporary folder (0700), and found there by the next process (the GPU was not usable:
    NotADirectoryError, PermissionError)."""
    if cache == "a file":
        (tmp_path / "cache").write_text("not a folder")
    else:
        (tmp_path / "cache" / "puzzlelib_cost").mkdir(parents=True)
        (tmp_path / "cache" / "puzzlelib_cost").chmod(0o555)
        if os.access(tmp_path / "cache" / "puzzlelib_cost", os.W_OK):
            pytest.skip("this user writes into read-only folders (root)")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    built = kernel_build.cached_cubin("sm_90")
    assert built.parent == tmp_path / "tmp" / f"puzzlelib_cost-{os.getuid()}" and kernel_build.cubin_intact(built)
    assert built.parent.stat().st_mode & 0o777 == 0o700
    assert kernel_build.cubin_path("sm_90") == built


@pytest.mark.skipif(not hasattr(os, "getuid") or os.getuid() != 0, reason="makes a folder another user's (root)")
def test_a_temporary_folder_another_user_could_write_is_not_taken(tmp_path, monkeypatch):
    """The fallback folder's name can be foreseen: one another user made first (or made writable to
    others) could hold cubins under the names ours take; it is left out, whatever it holds."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "a file"))
    (tmp_path / "a file").write_text("not a folder")
    private = tmp_path / f"puzzlelib_cost-{os.getuid()}"
    private.mkdir()
    os.chown(private, 65534, 65534)
    assert private not in kernel_build.cache_dirs()
    os.chown(private, 0, 0)
    private.chmod(0o777)
    assert private not in kernel_build.cache_dirs()
    private.chmod(0o700)
    assert private in kernel_build.cache_dirs()


def test_the_temporary_folder_is_looked_in_only_where_the_cache_cannot_be_written(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert kernel_build.cache_dirs() == [tmp_path / "cache" / "puzzlelib_cost"]


def test_without_nvcc_the_newest_whole_cubin_is_taken(tmp_path, monkeypatch, small_cubin):
    """A machine without nvcc takes the cubin of these kernels that the cache holds whole (of
    several nvcc versions', the newest): a newer one cut short is passed over."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv("PATH", str(tmp_path / "no-nvcc"))
    folder = tmp_path / "cache" / "puzzlelib_cost"
    folder.mkdir(parents=True)
    stem = kernel_build._cubin_stem("sm_90", (), None)
    whole, newer_cut, newest_other = folder / f"{stem}-00000001.cubin", folder / f"{stem}-00000002.cubin", \
        folder / "all_costs-sm_90-0123456789abcdef-00000003.cubin"
    for path, data in ((whole, small_cubin), (newer_cut, small_cubin[:-1]), (newest_other, small_cubin)):
        path.write_bytes(data)
    for age, path in enumerate((newest_other, newer_cut, whole)):
        os.utime(path, (1e9 - age * 1000, 1e9 - age * 1000))
    assert kernel_build.cubin_path("sm_90") == whole
    whole.unlink()
    with pytest.raises(RuntimeError, match="nvcc was not found on PATH"):
        kernel_build.cubin_path("sm_90")


def test_the_cache_follows_xdg_only_where_it_names_an_absolute_folder(tmp_path, monkeypatch):
    """The XDG spec ignores an empty or relative XDG_CACHE_HOME (an empty one put the cache in
    ./puzzlelib_cost, wherever the process ran); no home at all (a container's user without one)
    leaves the temporary folder (it was a RuntimeError, and no GPU)."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
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
    folder.mkdir(parents=True)
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


@needs_nvcc
def test_two_processes_first_use_build_once(tmp_path, small_cubin):
    """Two processes' first uses on an empty cache each compiled for minutes; the second waits for
    the first's build and takes its cubin."""
    import sys
    (tmp_path / "whole.cubin").write_bytes(small_cubin)
    (tmp_path / "tmp").mkdir()
    script = tmp_path / "first_use.py"
    script.write_text(f"""
import sys, tempfile, time
sys.path.insert(0, {str(Path(kernel_build.__file__).parents[2])!r})
from puzzlelib_cost.backends import kernel_build
tempfile.tempdir = {str(tmp_path / "tmp")!r}
def slow_nvcc(arch, output, extra=(), directory=None):
    with open({str(tmp_path / "builds")!r}, "a") as log:
        log.write("built\\n")
    return ["sh", "-c", "sleep 1; cp {tmp_path / 'whole.cubin'} " + str(output)]
kernel_build.nvcc_command = slow_nvcc
print(kernel_build.cached_cubin("sm_90"))
""")
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache")}
    runs = [subprocess.Popen([sys.executable, str(script)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True) for _ in range(2)]
    outputs = [run.communicate(timeout=120) for run in runs]
    paths = {out.strip() for out, _ in outputs}
    assert len(paths) == 1 and kernel_build.cubin_intact(Path(paths.pop()))
    assert (tmp_path / "builds").read_text() == "built\n"
    said = "".join(err for _, err in outputs)   # (Python's own handler: the scripts set up no logging)
    assert said.count("compiling the CUDA kernels for sm_90") == 1, said


@needs_nvcc
def test_the_first_use_says_it_compiles(tmp_path, monkeypatch, fake_nvcc, caplog):
    """The first use on a machine compiles for minutes, which looked like a hang: a warning of the
    library's logger says so (and where the cubin goes); a use that finds the cubin says nothing."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    with caplog.at_level("INFO", logger="puzzlelib_cost"):
        kernel_build.cached_cubin("sm_90")
    said = [(record.levelname, record.getMessage()) for record in caplog.records]
    assert said[0] == ("WARNING", "puzzlelib_cost: compiling the CUDA kernels for sm_90 with nvcc, once on this "
                       f"machine (a few minutes); later processes load them from {tmp_path / 'cache' / 'puzzlelib_cost'}")
    assert len(said) == 2 and said[1][0] == "INFO" and said[1][1].startswith("puzzlelib_cost: compiled all_costs-sm_90-")
    caplog.clear()
    kernel_build.cached_cubin("sm_90")
    assert caplog.records == []
