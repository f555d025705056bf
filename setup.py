"""Build of the mlellp_ext._C extension (torch.utils.cpp_extension).

CUDA sources are built when torch has CUDA and nvcc is found (CUDA_HOME);
MLELLP_FORCE_CUDA=1 makes a missing CUDA build an error, MLELLP_CPU_ONLY=1
skips it. Target GPUs default to sm_75..sm_90 (TORCH_CUDA_ARCH_LIST overrides).
Install with `pip install --no-build-isolation -e .` so it builds against the
torch already installed.
"""
import glob
import os
import shutil

import torch
from setuptools import find_packages, setup
from torch.utils import cpp_extension

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_ARCHS = "7.5;8.0;8.6;8.9;9.0+PTX"


def _cuda_available_for_build():
    nvcc = None
    if cpp_extension.CUDA_HOME is not None:
        candidate = os.path.join(cpp_extension.CUDA_HOME, "bin", "nvcc")
        nvcc = candidate if os.path.exists(candidate) else None
    nvcc = nvcc or shutil.which("nvcc")
    return torch.version.cuda is not None and nvcc is not None


def _build_cuda():
    if os.environ.get("MLELLP_CPU_ONLY") == "1":
        return False
    available = _cuda_available_for_build()
    if os.environ.get("MLELLP_FORCE_CUDA") == "1" and not available:
        raise RuntimeError(
            "MLELLP_FORCE_CUDA=1 but no CUDA build is possible: "
            f"torch.version.cuda={torch.version.cuda!r}, CUDA_HOME={cpp_extension.CUDA_HOME!r} "
            "(set CUDA_HOME to the toolkit holding bin/nvcc)"
        )
    return available


def _extension():
    rel = lambda paths: sorted(os.path.relpath(p, ROOT) for p in paths)  # noqa: E731
    sources = rel(glob.glob(os.path.join(ROOT, "csrc", "*.cpp")))
    sources += rel(glob.glob(os.path.join(ROOT, "csrc", "ops", "*.cpp")))
    sources += rel(glob.glob(os.path.join(ROOT, "csrc", "ops", "cpu", "*.cpp")))
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
    if _build_cuda():
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_ARCHS)
        sources += rel(glob.glob(os.path.join(ROOT, "csrc", "ops", "cuda", "*.cu")))
        return cpp_extension.CUDAExtension(
            "mlellp_ext._C",
            sources,
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "-lineinfo", "-fmad=false"]},
            extra_link_args=link_flags,
        )
    return cpp_extension.CppExtension("mlellp_ext._C", sources, extra_compile_args={"cxx": cxx_flags},
                                      extra_link_args=link_flags)


setup(
    name="mlellp",
    packages=find_packages(include=["mlellp_ext", "mlellp_ext.*"]),
    ext_modules=[_extension()],
    cmdclass={"build_ext": cpp_extension.BuildExtension},
)
