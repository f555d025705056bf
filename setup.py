"""Build of the mlellp_ext._C extension (torch.utils.cpp_extension).

Install with `pip install --no-build-isolation .` (`-e .` for development), so
that it builds against the torch already installed; `pip wheel
--no-build-isolation --no-deps .` makes a wheel for that torch.

CUDA kernels are built when torch has CUDA and the CUDA toolkit (CUDA_HOME's
nvcc) has torch's CUDA major version; otherwise the CPU kernels only, with a
warning when a toolkit of another major version was found. MLELLP_FORCE_CUDA=1
makes a build without CUDA kernels an error, MLELLP_CPU_ONLY=1 skips them.
Target GPUs default to sm_75..sm_90 (TORCH_CUDA_ARCH_LIST overrides). With
torch >= 2.6 the extension uses Python's limited API: one wheel serves every
CPython >= 3.10 (for that torch). What was built is recorded beside the
extension (_build_info.json), which `import mlellp_ext` checks against the
torch it runs with.
"""
import glob
import json
import os
import re
import subprocess
import sys

DEFAULT_ARCHS = "7.5;8.0;8.6;8.9;9.0+PTX"
# requires-python >= 3.10: the wheel's tag and the limited API's version.
PY_LIMITED_API_TAG, PY_LIMITED_API_HEX = "cp310", "0x030A0000"
BUILD_INFO_FILE = "_build_info.json"  # read by mlellp_ext/_extension.py


def cuda_major(version):
    """The major version of a CUDA version string ('12.4' -> 12), or None."""
    m = re.match(r"\s*(\d+)", version or "")
    return int(m.group(1)) if m else None


def cuda_plan(torch_version, torch_cuda, toolkit_cuda, cuda_home, cpu_only, force_cuda):
    """Whether to build the CUDA kernels: (True, None, None), or (False, reason,
    warning) where warning (None if the choice was the user's or the only one)
    tells what was found and the ways out. Raises RuntimeError when
    MLELLP_FORCE_CUDA=1 asks for CUDA kernels that cannot be built."""
    if cpu_only:
        return False, "MLELLP_CPU_ONLY=1", None
    if torch_cuda is None:
        reason = f"torch {torch_version} has no CUDA"
    elif toolkit_cuda is None:
        reason = f"no CUDA toolkit found (no bin/nvcc under CUDA_HOME={cuda_home})"
    elif cuda_major(toolkit_cuda) != cuda_major(torch_cuda):
        reason = (f"the CUDA toolkit at {cuda_home} is CUDA {toolkit_cuda}, torch {torch_version} "
                  f"was built with CUDA {torch_cuda}")
        if force_cuda:
            raise RuntimeError(
                f"MLELLP_FORCE_CUDA=1 but {reason}, and their major versions must match: set CUDA_HOME "
                f"to a CUDA {cuda_major(torch_cuda)}.x toolkit, or install a torch built for CUDA "
                f"{cuda_major(toolkit_cuda)}.x")
        warning = (f"mlellp: building the CPU kernels only: {reason} (the major versions must match). "
                   f"For the CUDA kernels, set CUDA_HOME to a CUDA {cuda_major(torch_cuda)}.x toolkit "
                   f"or install a torch built for CUDA {cuda_major(toolkit_cuda)}.x; MLELLP_FORCE_CUDA=1 "
                   "makes this an error, MLELLP_CPU_ONLY=1 silences it.")
        return False, reason, warning
    else:
        return True, None, None
    if force_cuda:
        raise RuntimeError(f"MLELLP_FORCE_CUDA=1 but no CUDA build is possible: {reason} "
                           "(set CUDA_HOME to the toolkit holding bin/nvcc)")
    return False, reason, None


def supports_py_limited_api(torch_version):
    """torch >= 2.6's cpp_extension builds without libtorch_python under
    Py_LIMITED_API; the extension uses no Python API but PyModule_Create."""
    m = re.match(r"(\d+)\.(\d+)", torch_version)
    return tuple(map(int, m.groups())) >= (2, 6)


def toolkit_version(cuda_home):
    """The CUDA version of CUDA_HOME's nvcc ('13.0'), or None without one."""
    nvcc = os.path.join(cuda_home, "bin", "nvcc") if cuda_home else None
    if nvcc is None or not os.path.exists(nvcc):
        return None
    out = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout
    m = re.search(r"release (\d+\.\d+)", out)
    return m.group(1) if m else None


def main():
    import torch
    from setuptools import find_packages, setup
    from torch.utils import cpp_extension

    root = os.path.dirname(os.path.abspath(__file__))
    cuda_home = cpp_extension.CUDA_HOME
    toolkit = toolkit_version(cuda_home) if torch.version.cuda else None
    build_cuda, reason, warning = cuda_plan(
        torch.__version__, torch.version.cuda, toolkit, cuda_home,
        cpu_only=os.environ.get("MLELLP_CPU_ONLY") == "1", force_cuda=os.environ.get("MLELLP_FORCE_CUDA") == "1")
    if warning:
        print(f"WARNING: {warning}", file=sys.stderr, flush=True)

    rel = lambda paths: sorted(os.path.relpath(p, root) for p in paths)  # noqa: E731
    sources = rel(glob.glob(os.path.join(root, "csrc", "*.cpp")))
    sources += rel(glob.glob(os.path.join(root, "csrc", "ops", "*.cpp")))
    sources += rel(glob.glob(os.path.join(root, "csrc", "ops", "cpu", "*.cpp")))
    # No a*b+c contraction: the CPU's SIMD lanes stay bitwise equal to the per-bag path,
    # and (-fmad=false) the device runs the header's arithmetic as the host does.
    # -fno-trapping-math (values unchanged) lets the vectoriser compute both sides of
    # a ?: choice, which augment_image.h's per-pixel loops need.
    cxx_flags = ["-O3", "-ffp-contract=off", "-fno-trapping-math"]
    # at::parallel_for is inline OpenMP code: without -fopenmp it compiles to
    # a serial loop in this extension. Torch loads its libgomp first, so the
    # extension shares torch's OpenMP runtime and thread count.
    cxx_flags.append("-fopenmp")
    link_flags = ["-fopenmp"]
    limited_api = supports_py_limited_api(torch.__version__)
    if limited_api and not hasattr(cpp_extension, "min_supported_cpython"):
        # torch 2.6 links without libtorch_python but leaves Py_LIMITED_API to the
        # extension (later releases define it themselves, as 3.10).
        cxx_flags.append(f"-DPy_LIMITED_API={PY_LIMITED_API_HEX}")
    if build_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_ARCHS)
        sources += rel(glob.glob(os.path.join(root, "csrc", "ops", "cuda", "*.cu")))
        extension = cpp_extension.CUDAExtension(
            "mlellp_ext._C", sources, py_limited_api=limited_api,
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "-lineinfo", "-fmad=false"]},
            extra_link_args=link_flags)
    else:
        extension = cpp_extension.CppExtension("mlellp_ext._C", sources, py_limited_api=limited_api,
                                               extra_compile_args={"cxx": cxx_flags}, extra_link_args=link_flags)

    record = {
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cxx11_abi": bool(torch.compiled_with_cxx11_abi()),
        "cuda_kernels": build_cuda,
        "cuda": toolkit if build_cuda else None,
        "cuda_archs": os.environ["TORCH_CUDA_ARCH_LIST"].replace(" ", ";").split(";") if build_cuda else [],
        "no_cuda_reason": reason,
        "py_limited_api": limited_api,
    }

    class BuildExtension(cpp_extension.BuildExtension):
        """Writes the record beside the extension, and removes an earlier build
        under another file name (_C.cpython-*.so would be imported before _C.abi3.so)."""

        def run(self):
            super().run()
            for ext in self.extensions:
                for built in {self.get_ext_fullpath(ext.name), os.path.join(self.build_lib, self.get_ext_filename(
                        ext.name))}:
                    directory, name = os.path.split(built)
                    if not os.path.exists(built):
                        continue
                    for old in glob.glob(os.path.join(directory, ext.name.rsplit(".", 1)[-1] + ".*.so")):
                        if os.path.basename(old) != name:
                            os.remove(old)
                    with open(os.path.join(directory, BUILD_INFO_FILE), "w") as f:
                        json.dump(record, f, indent=1)

    setup(
        packages=find_packages(include=["mlellp_ext", "mlellp_ext.*"]),
        ext_modules=[extension],
        cmdclass={"build_ext": BuildExtension},
        options={"bdist_wheel": {"py_limited_api": PY_LIMITED_API_TAG}} if limited_api else {},
    )


# pip and python setup.py run this file as __main__; the tests import it for cuda_plan.
if __name__ == "__main__":
    main()
