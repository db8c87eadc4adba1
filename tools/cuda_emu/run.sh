#!/usr/bin/env bash
# Runs the kernels of csrc/cuda/*.cu on the CPU and compares them with ATen references, on a
# machine without a GPU or nvcc (see README.md in this directory). Each .cu is rewritten by
# rewrite.py into build/cuda_emu/, each test_*.cpp here is compiled with g++ against the torch
# of $PYTHON and run; the last line sums up. Exits non-zero on any failure.
#
# Usage: tools/cuda_emu/run.sh            (PYTHON=... CXX=... to override)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT"
PYTHON="${PYTHON:-$ROOT/.venv/bin/python}"
CXX="${CXX:-g++}"
EMU=tools/cuda_emu
BUILD=build/cuda_emu
mkdir -p "$BUILD"

for cu in csrc/cuda/*.cu; do
  "$PYTHON" "$EMU/rewrite.py" "$cu" "$BUILD/$(basename "$cu" .cu).cpp"
done

mapfile -t TORCH_INCLUDES < <("$PYTHON" -c \
  'import torch.utils.cpp_extension as c; print("\n".join(c.include_paths()))')
TORCH_LIB="$("$PYTHON" -c 'import torch.utils.cpp_extension as c; print(c.library_paths()[0])')"
CXX11_ABI="$("$PYTHON" -c 'import torch; print(int(torch._C._GLIBCXX_USE_CXX11_ABI))')"

# emu.h comes before everything; $EMU/include before torch's, so that its c10/cuda stand-ins
# replace torch's (which need the CUDA runtime). -O1: the runs take longer than compiling.
FLAGS=(-std=c++20 -O1 -D_GLIBCXX_USE_CXX11_ABI="$CXX11_ABI" -include "$EMU/include/emu.h"
       -I "$EMU/include" -I "$EMU" -I "$BUILD" -I csrc)
for dir in "${TORCH_INCLUDES[@]}"; do FLAGS+=(-isystem "$dir"); done
LIBS=(-L "$TORCH_LIB" -Wl,-rpath,"$TORCH_LIB" -ltorch -ltorch_cpu -lc10)

# One job per test, compile then run; the emulator is single-threaded, so jobs use the cores.
tests=("$EMU"/test_*.cpp)
pids=()
for src in "${tests[@]}"; do
  name="$(basename "$src" .cpp)"
  ( "$CXX" "${FLAGS[@]}" "$src" -o "$BUILD/$name" "${LIBS[@]}" &&
    OMP_NUM_THREADS=1 "$BUILD/$name" ) >"$BUILD/$name.log" 2>&1 &
  pids+=($!)
done

passed=0
failed=0
for i in "${!tests[@]}"; do
  name="$(basename "${tests[$i]}" .cpp)"
  if wait "${pids[$i]}"; then status=0; else status=$?; fi
  cat "$BUILD/$name.log"
  # A test ends with "<name>: P passed, F failed" and exits non-zero exactly when F > 0;
  # anything else is a build error or a crash.
  if [[ "$(tail -n 1 "$BUILD/$name.log")" =~ ^[a-z_]+:\ ([0-9]+)\ passed,\ ([0-9]+)\ failed$ ]] &&
     (( (status == 0) == (BASH_REMATCH[2] == 0) )); then
    passed=$((passed + BASH_REMATCH[1]))
    failed=$((failed + BASH_REMATCH[2]))
  else
    echo "$name: did not build or did not finish (exit $status)"
    failed=$((failed + 1))
  fi
done
echo "emulated CUDA kernels: $passed passed, $failed failed"
[[ $failed -eq 0 ]]
