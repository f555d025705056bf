"""The GPU kit (`make gpu-check`) runs only on a machine with a GPU, so its parts are checked here
for what can rot without one: the script parses, the candidate kernels still compile against
bag_recursion.h, and the committed GPU results still render."""
import glob
import json
import os
import subprocess
import sys

import pytest
import torch
from torch.utils import cpp_extension

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "bench")


def test_gpu_check_script_parses():
    out = subprocess.run(["bash", "-n", os.path.join(BENCH, "gpu_check.sh")], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


def _toolkit():
    """A CUDA toolkit to build with: CUDA_HOME (as the Makefile sets it) or /usr/local/cuda,
    with nvcc and the runtime library to link."""
    for home in (os.environ.get("CUDA_HOME"), cpp_extension.CUDA_HOME, "/usr/local/cuda"):
        if home and os.path.exists(os.path.join(home, "bin", "nvcc")) and glob.glob(os.path.join(home, "lib*", "libcudart*")):
            return home
    return None


def test_variant_kernels_compile(tmp_path):
    """bench/cuda_variants.cu JIT-builds (for sm_90, no GPU needed); CI (MLELLP_FORCE_CUDA=1) must not skip."""
    toolkit = _toolkit()
    if torch.version.cuda is None or toolkit is None:
        if os.environ.get("MLELLP_FORCE_CUDA") == "1":
            pytest.fail(f"MLELLP_FORCE_CUDA=1 but no CUDA build is possible (torch.version.cuda={torch.version.cuda!r}, "
                        f"CUDA_HOME={cpp_extension.CUDA_HOME!r})")
        pytest.skip("no CUDA toolkit (nvcc) or CPU-only torch")
    env = dict(os.environ, CUDA_HOME=toolkit, TORCH_CUDA_ARCH_LIST="9.0")
    script = ("import sys; sys.path.insert(0, sys.argv[1]); import cuda_variants; "
              "ext = cuda_variants.build(sys.argv[2]); print('built', ext.run_variant.__name__)")
    out = subprocess.run([sys.executable, "-c", script, BENCH, str(tmp_path)], capture_output=True, text=True, env=env, timeout=900)
    assert out.returncode == 0 and "built run_variant" in out.stdout, (out.stdout + out.stderr)[-4000:]


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(BENCH, "results", "gpu_*.json"))))
def test_committed_gpu_results_render(path):
    sys.path.insert(0, BENCH)
    try:
        import gpu_bench
    finally:
        sys.path.remove(BENCH)
    with open(path) as f:
        result = json.load(f)
    table = gpu_bench.markdown(result)
    assert len(result["rows"]) > 0
    assert table.count("\n| ") == len(result["rows"]) + 1  # header and one line a row
    with open(os.path.splitext(path)[0] + ".md") as f:
        assert f.read() == table, "the committed .md is not the table of its .json"
