"""The CMake build of the same sources loads with torch.ops.load_library."""
import os
import subprocess
import sys

import pytest

LIB = os.path.join(os.path.dirname(__file__), "..", "cmake-build", "libmlellp_ops.so")

SCRIPT = r"""
import sys, torch
torch.ops.load_library(sys.argv[1])
phi, ll = torch.ops.mlellp.posterior(torch.tensor([0.5, -0.5, 1.0]), torch.tensor([0, 3]), torch.tensor([1]))
pmf = torch.ops.mlellp.log_pmf(torch.tensor([0.0, 0.0]), torch.tensor([0, 2]))
assert abs(phi.sum().item() - 1) < 1e-6 and torch.allclose(pmf.exp(), torch.tensor([0.25, 0.5, 0.25]))
# two fair coins, one positive: Cov(h | S = 1) = [[1/4, -1/4], [-1/4, 1/4]]
jvp = torch.ops.mlellp.phi_jvp(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 0.0]), torch.tensor([0, 2]), torch.tensor([1]))
assert torch.allclose(jvp, torch.tensor([0.25, -0.25]))
print("ok")
"""


@pytest.mark.skipif(not os.path.exists(LIB), reason="no CMake build (make test-cpp builds cmake-build/)")
def test_cmake_library_loads():
    # A fresh interpreter: mlellp_ext._C registers the same op names.
    out = subprocess.run([sys.executable, "-c", SCRIPT, LIB], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
