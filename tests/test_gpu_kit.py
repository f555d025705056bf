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


def test_gpu_check_runs_the_most_important_first():
    """A loan may end at any step: build, essential CUDA tests, memcheck, the summary
    benchmark and the variants come before everything else."""
    with open(os.path.join(BENCH, "gpu_check.sh")) as f:
        steps = [line for line in f if line.startswith("step ") or line.startswith("PYTORCH_NO_CUDA_MEMORY_CACHING=1 step")]
    order = ["setup.py -q build_ext", '-k cuda -m "not slow"', "--tool memcheck", "bench/gpu_summary.py",
             "bench/cuda_variants.py"]
    found = [next(i for i, line in enumerate(steps) if key in line) for key in order]
    assert found == sorted(found) and found[-1] == len(order) - 1, steps


def test_gpu_summary_dry_run_on_the_cpu(tmp_path):
    """bench/gpu_summary.py covers every op and writes each row's rates and ratios (here with
    the CPU standing in for the GPU, at a tiny scale)."""
    out = tmp_path / "summary.json"
    run = subprocess.run([sys.executable, os.path.join(BENCH, "gpu_summary.py"), "--device", "cpu", "--scale", "0.0005",
                          "--out", str(out)], capture_output=True, text=True, timeout=600,
                         env=dict(os.environ, PYTHONPATH=ROOT))
    assert run.returncode == 0, run.stdout + run.stderr
    with open(out) as f:
        result = json.load(f)
    ops = {row["case"].split(",")[0] for row in result["rows"]}
    assert ops == {"posterior", "posterior_weighted", "log_pmf", "phi_jvp", "posterior_multiclass", "augment_images"}
    for row in result["rows"]:
        for key in ("instances_per_s", "cpu_instances_per_s", "ratio_to_cpu_threads", "fraction_of_copy_bandwidth"):
            assert row[key] > 0, (row["case"], key)
    asked = [row for row in result["rows"] if "asked" in row]
    assert len(asked) == 3 and all(isinstance(row["meets"], bool) for row in asked)


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
