# mlellp: `make run` (main job) and `make test` set everything up themselves.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# nvcc for the CUDA kernels: CUDA_HOME if set, else /usr/local/cuda if present.
CUDA_HOME ?= $(patsubst %/bin/nvcc,%,$(wildcard /usr/local/cuda/bin/nvcc))
export CUDA_HOME
export MAX_JOBS ?= $(shell nproc)
CSRC := $(shell find csrc -type f) setup.py pyproject.toml
CMAKE_BUILD := cmake-build

.PHONY: run test test-python test-cpp test-install bench gpu-check gpu-test clean

$(VENV)/.deps: requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip setuptools wheel
	$(PIP) install -q -r requirements.txt
	touch $@

# The extension, built against the venv's torch (no build isolation).
$(VENV)/.built: $(VENV)/.deps $(CSRC)
	$(PIP) install -q --no-build-isolation --no-deps -e .
	$(PY) -c "import mlellp_ext, torch; print('built:', torch.ops.mlellp.posterior)"
	touch $@

run: $(VENV)/.built
	$(PY) -m mlellp_ext.app.demo

test: test-install test-cpp test-python

test-python: $(VENV)/.built
	$(PY) -m pytest -q tests

# The same sources through CMake against libtorch, and the C++ test under CTest.
test-cpp: $(VENV)/.built
	TORCH_CUDA_ARCH_LIST="$${TORCH_CUDA_ARCH_LIST:-7.5;8.0;8.6;8.9;9.0}" cmake -S . -B $(CMAKE_BUILD) -DCMAKE_BUILD_TYPE=Release \
	  -DCMAKE_PREFIX_PATH="$$($(PY) -c 'import torch; print(torch.utils.cmake_prefix_path)')" \
	  $(if $(CUDA_HOME),-DCUDA_TOOLKIT_ROOT_DIR=$(CUDA_HOME)) > $(CMAKE_BUILD).log || (cat $(CMAKE_BUILD).log; exit 1)
	cmake --build $(CMAKE_BUILD) -j $(MAX_JOBS)
	ctest --test-dir $(CMAKE_BUILD) --output-on-failure

# The wheel as a user builds it, installed into a fresh venv with the oldest torch
# pyproject.toml claims (CPU kernels): README's quick starts and smoke tests there.
# First in `make test`, so that the full suite's summary closes the output.
test-install:
	PYTHON=$(PYTHON) bash tests/install_check.sh

bench: $(VENV)/.built
	$(PY) -m pytest -q bench/test_bench_posterior.py -p no:cacheprovider --benchmark-json bench/results/posterior_cpu.json
	$(PY) bench/report.py bench/results/posterior_cpu.json --out bench/results/posterior_cpu.md
	$(PY) -m pytest -q bench/test_bench_second_order.py -p no:cacheprovider --benchmark-json bench/results/phi_jvp_cpu.json
	$(PY) bench/report.py bench/results/phi_jvp_cpu.json --out bench/results/phi_jvp_cpu.md
	$(PY) bench/large_bags.py --out bench/results
	$(PY) bench/multiclass.py --out bench/results
	$(PY) bench/weighted.py --out bench/results
	$(PY) bench/sklearn_fit.py --out bench/results

# For a machine with a GPU and its own torch (no network): see bench/gpu_check.sh.
gpu-check:
	bash bench/gpu_check.sh

# The whole CUDA test list on such a machine (after gpu-check's build), each test
# limited to 5 minutes so that a stall names itself.
gpu-test:
	python3 -m pytest -q -rfE -p no:cacheprovider --timeout 300 -k cuda tests

clean:
	rm -rf build $(CMAKE_BUILD) $(CMAKE_BUILD).log *.egg-info mlellp_ext/*.so mlellp_ext/_build_info.json
