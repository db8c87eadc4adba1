#!/usr/bin/env bash
# Compile-check every csrc/**/*.cu with nvcc for sm_80 and sm_90 (+ PTX of compute_90), without a GPU and against
# the CPU torch wheel. Objects go to a temporary directory and are thrown away.
#
# The CPU wheel lacks two headers that a CUDA build of torch generates
# (c10/cuda/impl/cuda_cmake_macros.h, ATen/cuda/CUDAConfig.h); tools/cuda_standin/ holds
# stand-ins for them. It goes on the path with -isystem, which is searched after every -I
# directory (torch's included), so it can only supply files that torch lacks. Only this
# script uses it: the real build (setup.py + CMakeLists.txt on a CUDA machine) never sees it.
#
# No extra pip packages are needed: nvcc 13 ships cub/thrust/libcu++ under include/cccl,
# and the kernels use none of them anyway.
#
# Usage: tools/check_cuda.sh            (PYTHON=... NVCC=... to override)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PYTHON="${PYTHON:-$ROOT/.venv/bin/python}"
NVCC="${NVCC:-$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)}"

if [[ ! -x "$NVCC" ]]; then
  echo "check_cuda: nvcc not found (set NVCC=...)" >&2
  exit 2
fi

mapfile -t TORCH_INCLUDES < <("$PYTHON" -c \
  'import torch.utils.cpp_extension as c; print("\n".join(c.include_paths()))')
PY_INCLUDE="$("$PYTHON" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')"
CXX11_ABI="$("$PYTHON" -c 'import torch; print(int(torch._C._GLIBCXX_USE_CXX11_ABI))')"

INCLUDE_FLAGS=()
for dir in "${TORCH_INCLUDES[@]}"; do INCLUDE_FLAGS+=(-I "$dir"); done
INCLUDE_FLAGS+=(-I "$PY_INCLUDE" -I "$ROOT/csrc" -isystem "$ROOT/tools/cuda_standin")

FLAGS=(
  # What CMakeLists.txt uses for the real build: C++20, -O3, --expt-relaxed-constexpr, and
  # (unlike torch.utils.cpp_extension) no -D__CUDA_NO_HALF_OPERATORS__ & co.
  -std=c++20
  -O3
  -Xcompiler -fPIC
  --expt-relaxed-constexpr
  -D_GLIBCXX_USE_CXX11_ABI="$CXX11_ABI"
  -DLOCALGP_WITH_CUDA
  -gencode arch=compute_80,code=sm_80
  -gencode arch=compute_90,code=sm_90
  -gencode arch=compute_90,code=compute_90  # the PTX of setup.py's default "8.0;9.0+PTX"
  --threads 2
)

TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT

mapfile -t SOURCES < <(find csrc -name '*.cu' | sort)
if [[ ${#SOURCES[@]} -eq 0 ]]; then
  echo "check_cuda: no .cu files under csrc/" >&2
  exit 1
fi

# All files at once (each nvcc also builds its two architectures in parallel).
pids=()
for src in "${SOURCES[@]}"; do
  name="$(echo "$src" | tr '/' '_')"
  "$NVCC" "${FLAGS[@]}" "${INCLUDE_FLAGS[@]}" -c "$src" -o "$TMP/$name.o" \
    >"$TMP/$name.log" 2>&1 &
  pids+=($!)
done

status=0
for i in "${!SOURCES[@]}"; do
  src="${SOURCES[$i]}"
  name="$(echo "$src" | tr '/' '_')"
  if wait "${pids[$i]}"; then
    echo "ok $src (sm_80, sm_90)"
    # Warnings in our own files (torch's headers are not ours to fix).
    grep -E "^($ROOT/)?csrc/.*warning" "$TMP/$name.log" || true
  else
    echo "FAILED $src" >&2
    cat "$TMP/$name.log" >&2
    status=1
  fi
done
exit $status
