"""Every kernel the library launches compiles with nvcc, warning-free and without spills.

Targets: sm_75 and sm_100 (the oldest and newest the CUDA 13 toolkit offers), sm_80
and sm_90 (the GPUs we measure on).  Spills would turn the register-resident rows of
kl_rows_* into local-memory traffic, so ptxas's report is read, not just its exit code.
"""
import re
import shutil
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from puzzlelib_cost.kernel_index import kernel_names
from puzzlelib_cost.backends.kernel_build import nvcc_command

ARCHS = ("sm_75", "sm_80", "sm_90", "sm_100")
pytestmark = pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not on PATH (CI machines have it)")


_BUILDS = []   # [(output folder, {arch: future of its nvcc run})], once per process


def start_builds():
    """Start the four nvcc builds (two at a time; a minute or more each on a cold machine) in the
    background.  conftest calls this right after collection when these tests are selected, so
    the builds overlap the tests before them instead of holding up these."""
    if _BUILDS or shutil.which("nvcc") is None:
        return
    out = Path(tempfile.mkdtemp(prefix="puzzlelib_cost-cubins-"))

    def compile_for(arch):
        command = nvcc_command(arch, out / f"{arch}.cubin",
                               extra=("-Werror", "all-warnings", "-Xptxas", "-v,-warn-spills,-warn-lmem-usage"))
        return subprocess.run(command, capture_output=True, text=True)
    pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="nvcc")
    _BUILDS.append((out, {arch: pool.submit(compile_for, arch) for arch in ARCHS}))
    pool.shutdown(wait=False)


@pytest.fixture(scope="module")
def reports():
    """ptxas -v output per architecture (the builds start_builds began)."""
    start_builds()
    out, futures = _BUILDS[0]
    try:
        return {arch: future.result() for arch, future in futures.items()}
    finally:
        shutil.rmtree(out, ignore_errors=True)


def entry_functions(ptxas_output):
    """{kernel: (spill store bytes, spill load bytes)} from `ptxas -v`."""
    spills, current = {}, None
    for line in ptxas_output.splitlines():
        entry = re.search(r"Compiling entry function '(\w+)'", line)
        if entry:
            current = entry.group(1)
        found = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if found and current:
            spills[current] = (int(found.group(1)), int(found.group(2)))
            current = None
    return spills


@pytest.mark.parametrize("arch", ARCHS)
def test_compiles_without_warnings(reports, arch):
    result = reports[arch]
    assert result.returncode == 0, result.stderr
    assert "warning" not in result.stderr.lower(), result.stderr


@pytest.mark.parametrize("arch", ARCHS)
def test_every_launched_kernel_is_built_without_spills(reports, arch):
    spills = entry_functions(reports[arch].stderr)
    missing = sorted(set(kernel_names(arch)) - set(spills))
    assert not missing, f"kernels the backend launches but nvcc did not build for {arch}: {missing}"
    spilling = {name: bytes_ for name, bytes_ in spills.items() if bytes_ != (0, 0)}
    assert not spilling, f"register spills on {arch}: {spilling}"


@pytest.mark.parametrize("arch", ["sm_75", "sm_80"])
def test_cluster_kernels_are_left_out_before_sm_90(reports, arch):
    """Thread-block clusters need sm_90: kernels/kl_cluster.cu must build nothing for older GPUs
    (whose plan never picks those kernels), rather than fail the whole module."""
    built = set(entry_functions(reports[arch].stderr))
    assert not {name for name in built if name.startswith("kl_cluster_")}
    assert set(kernel_names("sm_90")) - set(kernel_names(arch)) == {n for n in kernel_names("sm_90") if n.startswith("kl_cluster_")}
