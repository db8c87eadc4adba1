#!/usr/bin/env bash
# Downloads, on a machine with network, the wheels that benchmarks/gpu.sh installs on a GPU
# machine without network: ESPnet and the pure-Python packages its S2T import chain needs that a
# CUDA image with its own torch lacks (this project's GPU image, as listed in 2026-11: it has
# torch, numpy, scipy, numba, scikit-learn, sentencepiece, einops, h5py, PyYAML, matplotlib,
# pytest-benchmark, cmake, ninja). Versions are the ones requirements*.txt pin.
#
#   bash benchmarks/gpu_wheels.sh [DIR]        # DIR defaults to wheels/ (git-ignored), ~11 MB
#
# Then bring DIR along with the working tree (the device tool: carry ["wheels"]) and run
# `bash benchmarks/gpu.sh OUTDIR`, which installs only those the GPU's Python lacks.
# Environment: PYTHON (a Python with pip; default .venv/bin/python), GPU_PYTHON (the GPU
# machine's Python version, default 3.12).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DIR="$(realpath -m "${1:-$REPO/wheels}")"
PYTHON="${PYTHON:-$REPO/.venv/bin/python}"
GPU_PYTHON="${GPU_PYTHON:-3.12}"
ABI="cp${GPU_PYTHON/./}"

# What `import localgp.bench` + building an OWSM model imports that the image lacks (found with
# sys.modules after the import, against the image's package list).
NAMES=(
  espnet espnet_tts_frontend ConfigArgParse typeguard humanfriendly torch-complex kaldiio
  hydra-core omegaconf antlr4-python3-runtime
  librosa soundfile cffi pycparser pooch platformdirs decorator
  g2p-en nltk inflect jaconv jamo Unidecode defusedxml
  openai-whisper tiktoken more-itertools regex  # the Whisper backbone (its weights stay behind: random there)
  setuptools  # gpu.sh installs it only where the image's is older than pyproject.toml needs (77.0.3)
)
# Published as a source distribution only: built here (pure Python, a py3-none-any wheel).
SDIST_ONLY=(antlr4-python3-runtime openai-whisper)

log() { printf '[gpu_wheels] %s\n' "$*" >&2; }
die() { printf '[gpu_wheels] ERROR: %s\n' "$*" >&2; exit 1; }

pin_of() {  # NAME -> NAME==VERSION from requirements*.txt (names compared as pip does)
  local pattern
  pattern="$(sed 's/[-_.]/[-_.]/g' <<<"$1")"
  grep -ihE "^${pattern}==" "$REPO/requirements.txt" "$REPO/requirements-dev.txt" | head -1 | sed 's/[[:space:]].*//' \
    || true
}

quiet_pip() {  # pip, without the warnings this machine's pip.conf raises for every project
  { PIP_DISABLE_PIP_VERSION_CHECK=1 "$PYTHON" -m pip "$@" 2>&1; } \
    | { grep -v -e 'is ignored: it is neither a file nor a directory' -e '^Looking in' || true; }
  return "${PIPESTATUS[0]}"
}

mkdir -p "$DIR"
for name in "${NAMES[@]}"; do
  pin="$(pin_of "$name")"
  [[ -n $pin ]] || die "$name is not pinned in requirements.txt or requirements-dev.txt"
  if [[ " ${SDIST_ONLY[*]} " == *" $name "* ]]; then
    log "building $pin (source only on PyPI)"
    quiet_pip wheel -q --no-deps --no-binary :all: -w "$DIR" "$pin" || die "could not build a wheel of $pin"
  else
    log "downloading $pin"
    quiet_pip download -q --no-deps --only-binary=:all: --python-version "$GPU_PYTHON" --implementation cp \
      --abi "$ABI" --abi abi3 --abi none --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
      --platform manylinux2014_x86_64 --platform any -d "$DIR" "$pin" || die "no wheel of $pin for Python $GPU_PYTHON"
  fi
done
count="$(find "$DIR" -maxdepth 1 -name '*.whl' | wc -l)"
((count == ${#NAMES[@]})) || die "$DIR holds $count wheels, expected ${#NAMES[@]} (one version of each: remove stale ones)"
log "done: $count wheels, $(du -sh "$DIR" | cut -f1), in $DIR"
