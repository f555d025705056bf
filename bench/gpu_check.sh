#!/usr/bin/env bash
# GPU validation kit (`make gpu-check`), for a machine with a CUDA GPU, its own
# torch and no network: builds against that torch, runs the whole test suite
# (CUDA tests included), compute-sanitizer memcheck and racecheck on small
# CUDA cases, and the GPU benchmark. Results: bench/results/gpu_<device>.json
# and gpu_check_<device>.log (or under $GPU_CHECK_OUT).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${GPU_CHECK_OUT:-bench/results}
export MLELLP_FORCE_CUDA=1
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$($PY -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")}
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
mkdir -p "$OUT"
DEVICE=$($PY -c "import torch; print(torch.cuda.get_device_name().replace(' ', '_'))")
LOG="$OUT/gpu_check_${DEVICE}.log"
status=0
step() { echo "== $*" | tee -a "$LOG"; "$@" 2>&1 | tee -a "$LOG"; local rc=${PIPESTATUS[0]}; [ "$rc" = 0 ] || { echo "== FAILED ($rc): $*" | tee -a "$LOG"; status=1; }; }
: > "$LOG"
step $PY setup.py -q build_ext --inplace
step $PY -m pytest -q -p no:cacheprovider tests
SMALL="tests/test_posterior.py::test_matches_enumeration_float64 tests/test_posterior.py::test_infinite_logits tests/test_posterior.py::test_nan_stays_in_its_bag tests/test_errors.py::test_bad_input_cuda tests/test_second_order.py::test_phi_jvp_matches_enumeration tests/test_second_order.py::test_phi_jvp_edge_cases tests/test_errors.py::test_bad_input_phi_jvp"
step compute-sanitizer --tool memcheck --error-exitcode 1 $PY -m pytest -q -p no:cacheprovider -k cuda $SMALL
step compute-sanitizer --tool racecheck --error-exitcode 1 $PY -m pytest -q -p no:cacheprovider -k cuda tests/test_posterior.py::test_matches_enumeration_float64
step $PY bench/gpu_bench.py --out "$OUT/gpu_${DEVICE}.json"
echo "== gpu-check $([ $status = 0 ] && echo passed || echo FAILED); log: $LOG"
exit $status
