"""Loads the compiled extension ``mlellp_ext._C``, and tells what it was built for.

setup.py records each build in ``_build_info.json`` beside the extension (the
torch, its CUDA, the toolkit and GPU architectures of the CUDA kernels, if
any). The record is checked against the torch of this process before the
extension is loaded: an extension built against another torch release would
otherwise fail with an undefined C++ symbol, or load and crash. Every way the
load can fail ends in one ``ImportError`` line that says what was built, what
is loaded and how to rebuild.
"""
import importlib
import json
import os
import re
import warnings

import torch

BUILD_INFO_FILE = "_build_info.json"  # written by setup.py
REBUILD = ("rebuild it against this torch from mlellp's source folder: "
           "pip install --no-build-isolation --force-reinstall --no-deps .")
_HERE = os.path.dirname(os.path.abspath(__file__))


def read_record(directory=_HERE):
    """setup.py's record of the extension beside it (a dict), or None where the
    extension was built otherwise (an older checkout, the CMake library)."""
    try:
        with open(os.path.join(directory, BUILD_INFO_FILE)) as f:
            return json.load(f)
    except FileNotFoundError:
        return None


def _release(version):
    """The part of a torch version that fixes its C++ ABI: major.minor for a
    release ('2.6.0+cu124' -> '2.6'), the whole version for a pre-release or
    nightly (their ABI changes from one to the next)."""
    public = version.split("+")[0]
    m = re.match(r"(\d+)\.(\d+)(\.\d+)?$", public)
    return f"{m.group(1)}.{m.group(2)}" if m else public


def _major(cuda_version):
    return cuda_version.split(".")[0] if cuda_version else None


def _built_for(record):
    cuda = (f"CUDA {record['cuda']} kernels for sm {','.join(record['cuda_archs'])}" if record["cuda_kernels"]
            else "CPU kernels only")
    return f"torch {record['torch']}, {cuda}"


def mismatch(record, torch_version, torch_cuda, cxx11_abi):
    """Why an extension of this record cannot run with the given torch (a
    phrase), or None where it can. The extension's C++ ABI is that of its torch
    release (major.minor; patch releases keep it) and C++ ABI flag; its CUDA
    kernels need a torch of the same CUDA major version."""
    if _release(record["torch"]) != _release(torch_version):
        return f"torch {torch_version} is loaded"
    if bool(record["cxx11_abi"]) != bool(cxx11_abi):
        return (f"torch {torch_version} is loaded, whose C++ ABI flag (_GLIBCXX_USE_CXX11_ABI="
                f"{int(bool(cxx11_abi))}) differs")
    if record["cuda_kernels"] and torch_cuda is None:
        return f"torch {torch_version} is loaded, which has no CUDA"
    if record["cuda_kernels"] and _major(record["cuda"]) != _major(torch_cuda):
        return f"torch {torch_version} is loaded, built with CUDA {torch_cuda}"
    return None


def error_line(record, problem):
    """The one line an ImportError says: what was built (if recorded), the
    problem with this process's torch, and how to rebuild."""
    built = f"was built for {_built_for(record)}, but " if record else ""
    return f"mlellp_ext's compiled extension {built}{problem}; {REBUILD}"


def load():
    """Checks the record against this process's torch, then imports and returns
    ``mlellp_ext._C`` (which registers ``torch.ops.mlellp.*``)."""
    record = read_record()
    if record is not None:
        problem = mismatch(record, torch.__version__, torch.version.cuda, torch.compiled_with_cxx11_abi())
        if problem:
            raise ImportError(error_line(record, problem))
    try:
        module = importlib.import_module("mlellp_ext._C")
    except ModuleNotFoundError:
        raise ImportError("mlellp_ext's compiled extension is missing (mlellp_ext/_C*.so); build it from "
                          "mlellp's source folder: pip install --no-build-isolation .") from None
    except (ImportError, OSError) as err:
        # An extension without a record, or one whose libraries differ from the
        # record's torch: the loader's own first line says which symbol or library.
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ImportError(error_line(record, f"failed to load with torch {torch.__version__} ({first})")) from None
    warning = missing_cuda_warning(record, torch.cuda.is_available) if record is not None else None
    if warning:
        warnings.warn(warning, stacklevel=2)
    return module


def missing_cuda_warning(record, cuda_available):
    """The warning (one line) for an extension built without CUDA kernels that
    were wanted: the toolkit found was of another CUDA major version than torch's
    (pip hides setup.py's own warning), or none was found on a machine with a
    GPU. None where the kernels are in, or were left out on purpose
    (MLELLP_CPU_ONLY=1, a torch without CUDA). cuda_available: a callable,
    called only when needed."""
    reason = "" if record["cuda_kernels"] else record.get("no_cuda_reason") or ""
    if not (reason.startswith("the CUDA toolkit") or (reason.startswith("no CUDA toolkit") and cuda_available())):
        return None
    return (f"mlellp_ext was built without CUDA kernels ({reason}), so its ops take CPU tensors only; for the "
            "CUDA kernels, rebuild it with CUDA_HOME set to a toolkit of torch's CUDA major version, or with "
            "MLELLP_CPU_ONLY=1 to silence this (docs/development.md: Installing into your own environment)")


def build_info():
    """What the installed extension was built for, as setup.py recorded it.

    A dict: ``torch`` (the version it was compiled against), ``torch_cuda``
    (that torch's CUDA, or None), ``cxx11_abi``, ``cuda_kernels`` (whether the
    CUDA kernels are in), ``cuda`` (the toolkit that compiled them) and
    ``cuda_archs`` (their GPU architectures, e.g. ``["8.0", "9.0+PTX"]``),
    ``no_cuda_reason`` (why not, without them) and ``py_limited_api`` (one
    wheel for every CPython >= 3.10). Raises RuntimeError for an extension that
    setup.py did not build (no record beside it).
    """
    record = read_record()
    if record is None:
        raise RuntimeError(f"no build record ({BUILD_INFO_FILE}) beside mlellp_ext's extension in {_HERE}: it was "
                           "not built by setup.py; pip install --no-build-isolation . records one")
    return dict(record)


# Importing this module loads the extension (mlellp_ext/__init__.py imports it first).
_C = load()
