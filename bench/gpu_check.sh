#!/usr/bin/env bash
# GPU validation kit (`make gpu-check`), for a machine with a CUDA GPU, its own
# torch and no network. It must fit one short loan (about 8 minutes, build
# included), so the steps run most important first, each with a time limit,
# and a run cut short still brings back what matters most:
#   1. build the extension against that torch, for that GPU only;
#   2. the essential CUDA tests (pytest -k cuda -m "not slow": every op on the
#      device against the CPU, in under 2 minutes; 60 s a test at most, so a
#      stall fails with its name);
#   3. compute-sanitizer memcheck on bench/sanitizer_cases.py (without torch's
#      caching allocator, so that every allocation has its exact bounds);
#   4. bench/gpu_summary.py: every op's instances/s, its ratio to the same op
#      on this machine's CPU threads and its fraction of copy bandwidth, in one
#      run (gpu_summary_<device>.json, with the figures the GPU issue asks for);
#   5. the candidate small-bag kernels against the shipped one (bench/cuda_variants.py);
#   6. the rest: initcheck, racecheck and synccheck, bench/gpu_bench.py, the
#      input pipeline (bench/augment.py), the epoch time (bench/epoch_time.py,
#      bf16), the slow CUDA tests, and the rest of the test suite (training and
#      the CLI then run on the GPU).
# Results under bench/results (or $GPU_CHECK_OUT): gpu_check_<device>.log,
# gpu_summary_<device>.json, gpu_<device>.{json,md}, cuda_variants_<device>.json.
# Wheels of missing test dependencies (expecttest, pytest-timeout), if any, are
# taken from .whl/ (no network there).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${GPU_CHECK_OUT:-bench/results}
export MLELLP_FORCE_CUDA=1 PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # the in-place build, for scripts run from bench/
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
export PATH="$CUDA_HOME/bin:$PATH"
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$($PY -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")}
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
mkdir -p "$OUT"
DEVICE=$($PY -c "import torch; print(torch.cuda.get_device_name().replace(' ', '_'))")
LOG="$OUT/gpu_check_${DEVICE}.log"
: > "$LOG"
status=0
if compgen -G ".whl/*.whl" > /dev/null; then
  SITE=$(mktemp -d)
  if $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" .whl/*.whl 2>&1 | tee -a "$LOG"; then
    export PYTHONPATH="$SITE:$PYTHONPATH"
  else
    echo "== FAILED: installing the wheels in .whl/" | tee -a "$LOG"; status=1
  fi
fi
# step SECONDS CMD...: runs CMD with a time limit, logs it, records a failure.
step() {
  local limit=$1; shift
  local t0=$SECONDS
  echo "== $*" | tee -a "$LOG"
  timeout -k 10 "$limit" "$@" 2>&1 | tee -a "$LOG"
  local rc=${PIPESTATUS[0]}
  echo "== rc=$rc after $((SECONDS - t0)) s" | tee -a "$LOG"
  [ "$rc" = 0 ] || { echo "== FAILED ($rc$([ "$rc" = 124 ] && echo ', time limit')): $*" | tee -a "$LOG"; status=1; }
}
XDIST=$($PY -c "import xdist" 2>/dev/null && echo "-n 8" || echo "")
XDIST_ALL=$($PY -c "import xdist" 2>/dev/null && echo "-n $(nproc)" || echo "")
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader; $PY -c "import torch, sys; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'python', sys.version.split()[0])"; } 2>&1 | tee -a "$LOG"
{ echo "CC=${CC:-} CXX=${CXX:-}"; which -a gcc g++ c++ 2>/dev/null; ${CXX:-c++} --version | head -1
  $PY -c "import torch; print(torch.__config__.show().splitlines()[1])"; } 2>&1 | tee -a "$LOG"
# A C++ error must come back as a Python exception. On one machine, an extension
# built with its default toolchain (a GCC wrapper named by CC/CXX; cause not
# established) crashed instead, and the system GCC's build did not: then try the
# other compilers on the machine, from a clean build.
raises_cleanly() {
  timeout -k 10 120 $PY -X faulthandler -c "
import torch, mlellp_ext
for dev in ('cpu', 'cuda'):
    try:
        torch.ops.mlellp.log_pmf(torch.ones(2, device=dev), torch.tensor([0, 5], device=dev))
    except ValueError as err:
        print(dev, 'raises cleanly:', str(err).splitlines()[0])
    else:
        raise SystemExit('no error raised on ' + dev)" 2>&1 | tail -8 | tee -a "$LOG"
  local rc=${PIPESTATUS[0]}
  echo "== raises cleanly: rc=$rc" | tee -a "$LOG"
  return "$rc"
}
step 300 $PY setup.py -q build_ext --inplace
if ! raises_cleanly; then
  echo "== a C++ error did not come back as a ValueError; trying other compilers" | tee -a "$LOG"
  status_before=$status
  default_cxx=$(realpath "$(command -v "${CXX:-c++}")" 2>/dev/null)
  for pair in /usr/bin/gcc:/usr/bin/g++ /usr/bin/gcc-13:/usr/bin/g++-13 /usr/bin/gcc-12:/usr/bin/g++-12 /usr/bin/gcc-14:/usr/bin/g++-14; do
    [ -x "${pair%%:*}" ] && [ -x "${pair#*:}" ] || continue
    [ "$(realpath "${pair#*:}")" != "$default_cxx" ] || continue  # the build that just failed
    rm -rf build mlellp_ext/_C*.so
    CC=${pair%%:*} CXX=${pair#*:} step 420 $PY setup.py -q build_ext --inplace
    if raises_cleanly; then
      status=$status_before  # a compiler that failed to build before this one is not a failure of the check
      echo "== built with $pair" | tee -a "$LOG"; built=1
      export CC=${pair%%:*} CXX=${pair#*:}  # for the JIT build of bench/cuda_variants.cu too
      break
    fi
  done
  if [ -z "${built:-}" ]; then  # none helped: back to the default build, the error tests will show the crash
    rm -rf build mlellp_ext/_C*.so
    step 420 $PY setup.py -q build_ext --inplace
  fi
fi
TIMEOUT=$($PY -c "import pytest_timeout" 2>/dev/null && echo "--timeout" || echo "")
per_test() { [ -n "$TIMEOUT" ] && echo "$TIMEOUT $1"; }  # pytest-timeout's limit, where it is installed
step 150 $PY -m pytest -q -rfE -p no:cacheprovider $XDIST $(per_test 60) -k cuda -m "not slow" tests
SAN="compute-sanitizer --error-exitcode 1 --print-limit 20"
PYTORCH_NO_CUDA_MEMORY_CACHING=1 step 150 $SAN --tool memcheck --leak-check no $PY bench/sanitizer_cases.py
step 150 $PY bench/gpu_summary.py --out "$OUT/gpu_summary_${DEVICE}.json"
step 120 $PY bench/cuda_variants.py --out "$OUT/cuda_variants_${DEVICE}.json"
# ---- the rest, as far as the loan goes
PYTORCH_NO_CUDA_MEMORY_CACHING=1 step 240 $SAN --tool initcheck $PY bench/sanitizer_cases.py
step 180 $SAN --tool racecheck $PY bench/sanitizer_cases.py --wide-only
step 180 $SAN --tool synccheck $PY bench/sanitizer_cases.py --wide-only
step 300 $PY bench/gpu_bench.py --out "$OUT/gpu_${DEVICE}.json"
step 120 $PY bench/augment.py --device cuda --out "$OUT"
step 420 $PY bench/epoch_time.py --device cuda --amp bf16 --epochs 3 --methods mle,supervised,dllp --out "$OUT"
step 300 $PY -m pytest -q -rfE -p no:cacheprovider $XDIST_ALL $(per_test 240) -k cuda -m slow tests
# (the variants were just built and run: their compile test is for machines without a GPU)
step 240 $PY -m pytest -q -rfE -p no:cacheprovider $XDIST_ALL $(per_test 120) -k "not cuda" tests \
  --deselect tests/test_gpu_kit.py::test_variant_kernels_compile
echo "== gpu-check $([ $status = 0 ] && echo passed || echo FAILED); log: $LOG"
exit $status
