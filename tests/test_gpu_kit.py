"""tests/conftest.py's cuda_driver fixture where a real GPU is required: with
PUZZLELIB_COST_REQUIRE_GPU=1 or PUZZLELIB_COST_BACKEND=cuda, pycuda tests fail where no real GPU is
usable, rather than skip or run on the driver stand-in.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
KIT_VARIABLES = ("PYTHONPATH", "PUZZLELIB_COST_BACKEND", "PUZZLELIB_COST_REQUIRE_GPU")


# ---- conftest.py: pycuda tests fail rather than skip where a GPU is required ----------------

TINY_TEST = """
import pytest

@pytest.mark.pycuda
def test_on_a_cuda_driver(cuda_driver):
    pass
"""
# Makes the driver stand-in unusable, so that without a requirement the fixture skips.
NO_STAND_IN = """
import driver_standin

def _unavailable():
    raise driver_standin.Unavailable("made unavailable by test_gpu_kit.py")

driver_standin.activate = _unavailable
"""


def run_tiny_pycuda_test(tmp_path, **env):
    """pytest on one pycuda-marked test, with tests/conftest.py loaded as a plugin."""
    import driver_standin
    if driver_standin.real_driver_present():
        pytest.skip("a real CUDA driver is installed: the fixture's answer depends on the GPU")
    (tmp_path / "test_tiny.py").write_text(TINY_TEST)
    (tmp_path / "no_stand_in.py").write_text(NO_STAND_IN)
    environ = {k: v for k, v in os.environ.items() if k not in KIT_VARIABLES}
    environ.update(PYTHONPATH=os.pathsep.join([str(tmp_path), str(REPO / "tests"), str(REPO)]), **env)
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "conftest",
                           "-p", "no_stand_in", "--rootdir", str(tmp_path), str(tmp_path / "test_tiny.py")],
                          cwd=tmp_path, env=environ, capture_output=True, text=True, timeout=120)


def test_cuda_driver_skips_without_a_gpu_when_none_is_required(tmp_path):
    result = run_tiny_pycuda_test(tmp_path)
    assert result.returncode == 0 and "1 skipped" in result.stdout, result.stdout + result.stderr


@pytest.mark.parametrize("variable,value", [("PUZZLELIB_COST_REQUIRE_GPU", "1"), ("PUZZLELIB_COST_BACKEND", "cuda")])
def test_cuda_driver_fails_without_a_gpu_where_one_is_required(tmp_path, variable, value):
    result = run_tiny_pycuda_test(tmp_path, **{variable: value})
    assert result.returncode == 1 and "1 error" in result.stdout, result.stdout + result.stderr
    assert f"{variable}={value} requires a real GPU, and none is usable: no CUDA driver" in result.stdout
