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

# The main job: demo corpus -> ~8 min of training (localGP + speaker context) -> beam-search decode of
# the test split -> $(OUT)/demo/report.md, report.json, masks.png. espeak-ng (German synthesis) is
# installed (root) or unpacked without root by tools/ensure_espeak.sh, which prints its directory.
demo: build
	PATH="$$(bash tools/ensure_espeak.sh):$$PATH" $(PY) -m localgp demo --out $(OUT)/demo

# pytest-benchmark suites (not part of `make test`): the fused ops, the encoder, the decoder.
bench: build
	mkdir -p $(OUT)
	$(PY) -m pytest -q benchmarks/bench_ops.py --benchmark-json=$(OUT)/bench_ops.json
	$(PY) benchmarks/report_ops.py $(OUT)/bench_ops.json
	$(PY) -m pytest -q benchmarks/bench_encoder.py --benchmark-json=$(OUT)/bench_encoder.json
	$(PY) -m pytest -q benchmarks/bench_decoder.py --benchmark-json=$(OUT)/bench_decoder.json

# Compile-checks every csrc/**/*.cu with nvcc for sm_80 and sm_90; needs no GPU.
cuda-check: setup
	PYTHON=$(PY) bash tools/check_cuda.sh

# Runs the CUDA kernels on the CPU (an emulator) against ATen; needs no GPU or nvcc.
cuda-emu: build
	PYTHON=$(PY) bash tools/cuda_emu/run.sh

clean:
	rm -rf build localgp/_C*.so $(OUT)
