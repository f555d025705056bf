"""Installing into a user's environment: setup.py's choice of kernels when the
CUDA toolkit and torch disagree, the build record and ``build_info()``, and the
check at import that turns an extension built for another torch into one
ImportError line. (tests/install_check.sh builds and installs the wheel itself.)"""
import glob
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

import mlellp_ext
from mlellp_ext import _extension

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FORCED = os.environ.get("MLELLP_FORCE_CUDA") == "1"


def _setup_module():
    spec = importlib.util.spec_from_file_location("mlellp_setup", os.path.join(ROOT, "setup.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # not __main__: defines the functions, builds nothing
    return module


@pytest.fixture(scope="module")
def setup_py():
    if not os.path.exists(os.path.join(ROOT, "setup.py")):
        pytest.skip("no setup.py beside these tests (an installed package's tests)")
    return _setup_module()


def _record(**changes):
    """A record as setup.py writes it, of an extension built for this process's torch."""
    record = {"torch": torch.__version__, "torch_cuda": torch.version.cuda,
              "cxx11_abi": torch.compiled_with_cxx11_abi(), "cuda_kernels": False, "cuda": None, "cuda_archs": [],
              "no_cuda_reason": "MLELLP_CPU_ONLY=1", "py_limited_api": False}
    record.update(changes)
    return record


# setup.py: which kernels to build


def test_matching_toolkit_builds_cuda(setup_py):
    # Minor versions may differ (torch's cpp_extension warns about that itself).
    assert setup_py.cuda_plan("2.6.0+cu124", "12.4", "12.8", "/cuda", cpu_only=False, force_cuda=False) == (
        True, None, None)
    assert setup_py.cuda_plan("2.6.0+cu124", "12.4", "12.1", "/cuda", cpu_only=False, force_cuda=True)[0]


def test_toolkit_of_another_major_version_builds_cpu_with_a_warning(setup_py):
    build, reason, warning = setup_py.cuda_plan("2.6.0+cu124", "12.4", "13.0", "/usr/local/cuda", cpu_only=False,
                                                force_cuda=False)
    assert not build and reason
    # Both versions, where the toolkit is, and the ways out, in one line.
    for part in ("13.0", "12.4", "/usr/local/cuda", "CUDA_HOME", "CUDA 12.x", "MLELLP_FORCE_CUDA=1",
                 "MLELLP_CPU_ONLY=1"):
        assert part in warning, part
    assert "\n" not in warning
    with pytest.raises(RuntimeError, match=r"MLELLP_FORCE_CUDA=1 but .*CUDA 13\.0.*CUDA 12\.4.*CUDA_HOME"):
        setup_py.cuda_plan("2.6.0+cu124", "12.4", "13.0", "/usr/local/cuda", cpu_only=False, force_cuda=True)


def test_no_cuda_possible(setup_py):
    # CPU kernels without a warning (nothing was found to disagree); an error when forced.
    for torch_cuda, toolkit, why in [(None, "13.0", "has no CUDA"), ("12.4", None, "no CUDA toolkit")]:
        build, reason, warning = setup_py.cuda_plan("2.6.0", torch_cuda, toolkit, None, cpu_only=False,
                                                    force_cuda=False)
        assert (build, warning) == (False, None) and why in reason
        with pytest.raises(RuntimeError, match="MLELLP_FORCE_CUDA=1 but no CUDA build is possible: .*" + why):
            setup_py.cuda_plan("2.6.0", torch_cuda, toolkit, None, cpu_only=False, force_cuda=True)


def test_cpu_only_wins(setup_py):
    assert setup_py.cuda_plan("2.6.0+cu124", "12.4", "12.4", "/cuda", cpu_only=True, force_cuda=False) == (
        False, "MLELLP_CPU_ONLY=1", None)
    assert setup_py.cuda_plan("2.6.0+cu124", "12.4", "13.0", "/cuda", cpu_only=True, force_cuda=True)[0] is False


def test_toolkit_version_from_nvcc(setup_py, tmp_path):
    assert setup_py.toolkit_version(None) is None
    assert setup_py.toolkit_version(str(tmp_path)) is None  # no bin/nvcc
    nvcc = tmp_path / "bin" / "nvcc"
    nvcc.parent.mkdir()
    nvcc.write_text("#!/bin/sh\necho 'nvcc: NVIDIA (R) Cuda compiler driver'\n"
                    "echo 'Cuda compilation tools, release 12.4, V12.4.131'\n")
    nvcc.chmod(0o755)
    assert setup_py.toolkit_version(str(tmp_path)) == "12.4"


def test_py_limited_api_from_torch_2_6(setup_py):
    assert [setup_py.supports_py_limited_api(v) for v in ("2.4.1", "2.5.1+cu124", "2.6.0+cu124", "2.14.1", "3.0.0")
            ] == [False, False, True, True, True]


def test_oldest_torch_is_the_claimed_one():
    """pyproject.toml's torch>=X.Y is the torch that tests/install_check.sh installs."""
    claimed = re.search(r'"torch>=(\d+\.\d+)"', open(os.path.join(ROOT, "pyproject.toml")).read()).group(1)
    pinned = re.search(r"^torch==(\d+\.\d+)\.", open(os.path.join(ROOT, "tests", "requirements-oldest.txt")).read(),
                       re.M).group(1)
    assert pinned == claimed


# The record and build_info()


def test_build_info_tells_what_was_built():
    try:
        info = mlellp_ext.build_info()
    except RuntimeError as err:
        if FORCED:
            raise  # CI builds with setup.py, which records
        pytest.skip(f"extension not built by setup.py here: {err}")
    assert _extension.mismatch(info, torch.__version__, torch.version.cuda, torch.compiled_with_cxx11_abi()) is None
    assert info["torch_cuda"] == torch.version.cuda
    # The dispatcher, not the record, says whether CUDA kernels were registered.
    has_cuda = torch._C._dispatch_has_kernel_for_dispatch_key("mlellp::posterior", "CUDA")
    assert info["cuda_kernels"] == has_cuda
    if has_cuda:
        assert info["cuda_archs"] and info["cuda"].split(".")[0] == torch.version.cuda.split(".")[0]
        assert info["no_cuda_reason"] is None
    else:
        assert info["cuda_archs"] == [] and info["cuda"] is None and info["no_cuda_reason"]
    if FORCED:
        assert info["cuda_kernels"]
    so = os.path.basename(mlellp_ext._C.__file__)
    assert so.endswith(".abi3.so") == info["py_limited_api"], so
    assert info["py_limited_api"] == (tuple(map(int, torch.__version__.split(".")[:2])) >= (2, 6))
    info["torch"] = "0.0"
    assert mlellp_ext.build_info()["torch"] != "0.0"  # a copy


def test_one_extension_beside_the_record():
    # An earlier build under another file name would be imported instead of the new one.
    directory = os.path.dirname(mlellp_ext._C.__file__)
    if os.path.exists(os.path.join(directory, _extension.BUILD_INFO_FILE)):
        assert glob.glob(os.path.join(directory, "_C.*so")) == [mlellp_ext._C.__file__]


def test_record_file_name_shared_with_setup_py(setup_py):
    assert setup_py.BUILD_INFO_FILE == _extension.BUILD_INFO_FILE


# The check at import


def test_mismatch():
    this = torch.__version__
    assert _extension.mismatch(_record(), this, torch.version.cuda, torch.compiled_with_cxx11_abi()) is None
    cpu = _record(torch="2.6.0+cu124", torch_cuda="12.4", cxx11_abi=False)
    assert _extension.mismatch(cpu, "2.6.3", "12.6", False) is None  # patch releases: one ABI
    assert _extension.mismatch(cpu, "2.6.0+cpu", None, False) is None  # CPU kernels only
    assert "torch 2.5.1+cu124 is loaded" in _extension.mismatch(cpu, "2.5.1+cu124", "12.4", False)
    assert "torch 2.10.0 is loaded" in _extension.mismatch(cpu, "2.10.0", "12.4", False)
    assert "ABI" in _extension.mismatch(cpu, "2.6.0", None, True)
    # A nightly's ABI changes from one day to the next.
    nightly = _record(torch="2.7.0.dev20250101+cpu", cxx11_abi=False)
    assert _extension.mismatch(nightly, "2.7.0.dev20250102+cpu", None, False)
    assert _extension.mismatch(nightly, "2.7.0.dev20250101+cpu", None, False) is None
    cuda = _record(torch="2.6.0+cu124", torch_cuda="12.4", cxx11_abi=False, cuda_kernels=True, cuda="12.6",
                   cuda_archs=["9.0"], no_cuda_reason=None)
    assert _extension.mismatch(cuda, "2.6.0+cu126", "12.6", False) is None
    assert "no CUDA" in _extension.mismatch(cuda, "2.6.0+cpu", None, False)
    assert "13.0" in _extension.mismatch(cuda, "2.6.0+cu130", "13.0", False)


def test_error_line():
    record = _record(torch="2.6.0+cu124", torch_cuda="12.4", cxx11_abi=False, cuda_kernels=True, cuda="12.4",
                     cuda_archs=["8.0", "9.0+PTX"])
    line = _extension.error_line(record, _extension.mismatch(record, "2.5.1+cu124", "12.4", False))
    assert "\n" not in line
    for part in ("torch 2.6.0+cu124", "CUDA 12.4", "8.0,9.0+PTX", "torch 2.5.1+cu124 is loaded",
                 "pip install --no-build-isolation"):
        assert part in line, part


def _package_copy(tmp_path, record=None, so_bytes=None):
    """mlellp_ext's Python files in tmp_path, with this build's extension (or a
    file of so_bytes in its place) and the given record beside it."""
    package = tmp_path / "mlellp_ext"
    shutil.copytree(os.path.dirname(mlellp_ext.__file__), package,
                    ignore=shutil.ignore_patterns("*.so", "__pycache__", _extension.BUILD_INFO_FILE))
    so = package / os.path.basename(mlellp_ext._C.__file__)
    if so_bytes is None:
        os.symlink(mlellp_ext._C.__file__, so)
    elif so_bytes is not False:
        so.write_bytes(so_bytes)
    if record is not None:
        (package / _extension.BUILD_INFO_FILE).write_text(json.dumps(record))
    return tmp_path


def _import(path):
    # Without an editable install's finder, which would find the package's own
    # extension where the copy has none.
    code = ("import sys; sys.meta_path[:] = [f for f in sys.meta_path if '__editable__' not in f.__module__]\n"
            "import mlellp_ext; print(mlellp_ext.__file__)")
    return subprocess.run([sys.executable, "-c", code], cwd=path, capture_output=True, text=True, timeout=300)


def test_import_of_an_extension_built_for_another_torch_fails_in_one_line(tmp_path):
    r = _import(_package_copy(tmp_path, _record(torch="2.1.2+cu118")))
    assert r.returncode != 0
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("ImportError: mlellp_ext's compiled extension was built for torch 2.1.2+cu118"), r.stderr
    assert f"torch {torch.__version__} is loaded" in last and "pip install --no-build-isolation" in last
    # One error, not a chain of them.
    assert "During handling" not in r.stderr and r.stderr.count("Error:") == 1, r.stderr
    # This torch's record loads, and warns (once, in one line) when the toolkit's CUDA kept the kernels out.
    ok = _import(_package_copy(tmp_path / "ok", _record(no_cuda_reason="the CUDA toolkit at /x is CUDA 99.0, ...")))
    assert ok.returncode == 0 and ok.stdout.strip() == str(tmp_path / "ok" / "mlellp_ext" / "__init__.py"), ok.stderr
    assert ok.stderr.count("UserWarning: mlellp_ext was built without CUDA kernels (the CUDA toolkit at /x") == 1, \
        ok.stderr


def test_an_extension_that_fails_to_load_fails_in_one_line(tmp_path):
    # What a loader says of a library it cannot use (as of an undefined symbol), in the same line.
    r = _import(_package_copy(tmp_path, so_bytes=b"not a shared library"))
    last = r.stderr.strip().splitlines()[-1]
    assert r.returncode != 0 and re.match(r"ImportError: mlellp_ext's compiled extension failed to load "
                                          r"with torch \S+ \(.*(ELF|too short).*\); rebuild", last), r.stderr
    assert "During handling" not in r.stderr, r.stderr
    r = _import(_package_copy(tmp_path / "none", so_bytes=False))
    assert r.returncode != 0 and "ImportError: mlellp_ext's compiled extension is missing" in r.stderr, r.stderr


def test_missing_cuda_kernels_warning():
    def no_call():
        raise AssertionError("cuda_available called where the answer cannot matter")

    mismatch = _record(no_cuda_reason="the CUDA toolkit at /usr/local is CUDA 13.0, torch 2.6.0+cu124 was built "
                                      "with CUDA 12.4")
    for available in (lambda: True, lambda: False):  # the kernels were wanted, GPU or not
        line = _extension.missing_cuda_warning(mismatch, available)
        assert "CUDA 13.0" in line and "CUDA_HOME" in line and "MLELLP_CPU_ONLY=1" in line and "\n" not in line
    no_toolkit = _record(no_cuda_reason="no CUDA toolkit found (no bin/nvcc under CUDA_HOME=None)")
    assert "no CUDA toolkit" in _extension.missing_cuda_warning(no_toolkit, lambda: True)
    assert _extension.missing_cuda_warning(no_toolkit, lambda: False) is None  # no GPU to miss them on
    for chosen in ("MLELLP_CPU_ONLY=1", "torch 2.6.0+cpu has no CUDA"):
        assert _extension.missing_cuda_warning(_record(no_cuda_reason=chosen), no_call) is None
    built = _record(cuda_kernels=True, cuda="12.4", cuda_archs=["9.0"], no_cuda_reason=None)
    assert _extension.missing_cuda_warning(built, no_call) is None
