"""What importing the host's package does to the process before torch is imported."""

import subprocess
import sys

import pytest

SEES_LIBSTDCXX = "import ctypes; ctypes.CDLL(None)._ZSt9terminatev"


@pytest.mark.skipif(sys.platform != "linux", reason="the workaround is for Linux images")
def test_importing_the_scheduler_makes_libstdcxx_global_before_torch_loads():
    """The H100 image's llama.cpp crashed next to torch unless this had happened."""
    alone = subprocess.run([sys.executable, "-c", SEES_LIBSTDCXX], capture_output=True)
    assert alone.returncode != 0, "a bare interpreter does not see libstdc++ globally"
    code = f"import scheduler, sys; assert 'torch' not in sys.modules; {SEES_LIBSTDCXX}"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True).returncode == 0
