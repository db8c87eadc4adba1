# `make test` and `make demo` each work on a fresh clone: they create .venv, install the pinned
# dependencies (tools/setup_venv.sh), build the op library, then run.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
OUT ?= out

.PHONY: setup build test demo bench cuda-check cuda-emu clean

setup:
	PYTHON=$(PYTHON) bash tools/setup_venv.sh

# CMake + Ninja under build/ keep rebuilds incremental; LOCALGP_CUDA=auto|0|1 picks CUDA.
build: setup
	$(PY) -m pip install --no-build-isolation --no-deps -e . -q

test: build
	$(PY) -m pytest -q tests

# The main job. Until `localgp demo` exists it is the fused-ops benchmark.
demo: bench

# pytest-benchmark suites (not part of `make test`): the fused ops, then the encoder.
bench: build
	mkdir -p $(OUT)
	$(PY) -m pytest -q benchmarks/bench_ops.py --benchmark-json=$(OUT)/bench_ops.json
	$(PY) benchmarks/report_ops.py $(OUT)/bench_ops.json
	$(PY) -m pytest -q benchmarks/bench_encoder.py --benchmark-json=$(OUT)/bench_encoder.json

# Compile-checks every csrc/**/*.cu with nvcc for sm_80 and sm_90; needs no GPU.
cuda-check: setup
	PYTHON=$(PY) bash tools/check_cuda.sh

# Runs the CUDA kernels on the CPU (an emulator) against ATen; needs no GPU or nvcc.
cuda-emu: build
	PYTHON=$(PY) bash tools/cuda_emu/run.sh

clean:
	rm -rf build localgp/_C*.so $(OUT)
