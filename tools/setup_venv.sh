#!/usr/bin/env bash
# Create or update the project's virtual environment (<repo>/.venv).
#
#   bash tools/setup_venv.sh                  # idempotent: a no-op when already done
#   FORCE=1 bash tools/setup_venv.sh          # redo the install even if up to date
#   PYTHON=python3.11 VENV=/tmp/venv bash tools/setup_venv.sh
#
# Environment:
#   PYTHON       base interpreter (default: python3). If it can already import torch
#                (a GPU machine with its own CUDA torch), the venv is created with
#                --system-site-packages and that torch (and its torchaudio, if any) is
#                reused, never installed or moved. Otherwise the venv is plain and gets
#                torch==2.13.0 (CPU wheel from /opt/wheels, found through pip's config).
#   VENV         venv directory (default: <repo>/.venv)
#   FORCE=1      ignore the up-to-date stamp
#   SKIP_VERIFY=1  skip the import smoke test at the end
#   VERBOSE=1    show pip's full output
#
# Up-to-date check: a stamp file $VENV/.setup-<hash>, the hash covering this script,
# requirements.txt, requirements-dev.txt and the base interpreter (path, version,
# whether it has torch). Any change there triggers an update in place; a change of
# base interpreter or of the torch mode recreates the venv.
# The package choices are explained in requirements.txt.
set -euo pipefail

log() { printf '[setup_venv] %s\n' "$*" >&2; }
die() { printf '[setup_venv] ERROR: %s\n' "$*" >&2; exit 1; }
TMP=""
trap 'rc=$?; [[ -z $TMP ]] || rm -rf "$TMP"; [[ $rc -eq 0 ]] || printf "[setup_venv] FAILED (exit %s)\n" "$rc" >&2' EXIT

START=$SECONDS
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
SCRIPT="$REPO/tools/setup_venv.sh"
REQ="$REPO/requirements.txt"
REQ_DEV="$REPO/requirements-dev.txt"
PYTHON="${PYTHON:-python3}"
VENV="$(realpath -m "${VENV:-$REPO/.venv}")"

for f in "$SCRIPT" "$REQ" "$REQ_DEV"; do [[ -f $f ]] || die "missing $f"; done
PYTHON_ABS="$(command -v "$PYTHON")" || die "base interpreter '$PYTHON' not found (set PYTHON=...)"

# Cheap facts about the base interpreter (no torch import: find_spec only).
BASE_INFO="$("$PYTHON_ABS" -c '
import importlib.util as u, os, sys
print(os.path.realpath(sys.executable), "%d.%d.%d" % sys.version_info[:3],
      "torch=%s" % (u.find_spec("torch") is not None))')" \
  || die "cannot run base interpreter $PYTHON_ABS"
BASE_VERSION="$(cut -d' ' -f2 <<<"$BASE_INFO")"
[[ $BASE_VERSION == 3.* ]] || die "unexpected Python version '$BASE_VERSION'"

HASH="$(cat "$SCRIPT" "$REQ" "$REQ_DEV" <(echo "$BASE_INFO") | sha256sum | cut -c1-16)"
STAMP="$VENV/.setup-$HASH"
if [[ -z ${FORCE:-} && -f $STAMP && -x $VENV/bin/python ]] && "$VENV/bin/python" -c '' 2>/dev/null; then
  log "up to date: $VENV (stamp $(basename "$STAMP"))"
  exit 0
fi
log "base interpreter: $BASE_INFO"

# ---- 1. torch mode: reuse the base interpreter's torch, or install our own
SYS_TORCH="" SYS_TA=""
if SYS_TORCH="$("$PYTHON_ABS" -W ignore -c 'import sys, torch; sys.stdout.write(torch.__version__)' 2>/dev/null)" \
   && [[ -n $SYS_TORCH ]]; then
  log "base interpreter has torch $SYS_TORCH: venv with --system-site-packages, reusing it"
  if SYS_TA="$("$PYTHON_ABS" -W ignore -c 'import sys, torchaudio; sys.stdout.write(torchaudio.__version__)' 2>/dev/null)" \
     && [[ -n $SYS_TA ]]; then
    log "base interpreter has torchaudio $SYS_TA: reusing it"
  else
    SYS_TA=""
  fi
  WANT_SYS=true
else
  SYS_TORCH=""
  log "base interpreter has no usable torch: plain venv with its own CPU torch"
  WANT_SYS=false
fi

# ---- 2. create the venv (or recreate it when base interpreter / mode changed)
if [[ -e $VENV ]]; then
  recreate=""
  if [[ ! -f $VENV/pyvenv.cfg ]]; then
    die "$VENV exists but is not a venv (no pyvenv.cfg); move it away first"
  elif ! "$VENV/bin/python" -c '' 2>/dev/null; then
    recreate="its python does not run"
  else
    venv_ver="$("$VENV/bin/python" -c 'import sys; print("%d.%d.%d" % sys.version_info[:3])')"
    venv_sys="$(sed -n 's/^include-system-site-packages *= *//p' "$VENV/pyvenv.cfg")"
    venv_home="$(sed -n 's/^home *= *//p' "$VENV/pyvenv.cfg")"
    base_home="$(dirname "$(cut -d' ' -f1 <<<"$BASE_INFO")")"
    if [[ $venv_ver != "$BASE_VERSION" ]]; then
      recreate="it has Python $venv_ver, base is $BASE_VERSION"
    elif [[ $venv_sys != "$WANT_SYS" ]]; then
      recreate="include-system-site-packages is $venv_sys, want $WANT_SYS"
    elif [[ "$(realpath -m "$venv_home")" != "$(realpath -m "$base_home")" ]]; then
      recreate="it was made from $venv_home, base is $base_home"
    fi
  fi
  if [[ -n $recreate ]]; then
    log "recreating $VENV: $recreate"
    rm -rf -- "$VENV"
  else
    log "updating existing venv $VENV"
  fi
fi
if [[ ! -e $VENV ]]; then
  log "creating venv $VENV"
  if $WANT_SYS; then
    "$PYTHON_ABS" -m venv --system-site-packages "$VENV"
  else
    "$PYTHON_ABS" -m venv "$VENV"
  fi
fi
rm -f "$VENV"/.setup-*   # no valid stamp until this run has finished
VPY="$VENV/bin/python"

# ---- 3. split requirements.txt by its markers, write the torch constraint
TMP="$(mktemp -d)"

select_reqs() {  # $1 = main | nodeps
  awk -v want="$1" -v systorch="${SYS_TORCH:+1}" -v systa="${SYS_TA:+1}" '
    { line = $0
      nodeps = (line ~ /#.*\[nodeps\]/); torchdep = (line ~ /#.*\[torch\]/)
      sub(/#.*/, "", line); gsub(/^[ \t]+|[ \t]+$/, "", line)
      if (line == "") next
      if ((want == "nodeps") != nodeps) next
      if (systorch && torchdep) next
      if (systa && tolower(line) ~ /^torchaudio[ =<>~!]/) next
      print line }' "$REQ"
}
select_reqs main >"$TMP/main.txt"
select_reqs nodeps >"$TMP/nodeps.txt"

if [[ -n $SYS_TORCH ]]; then
  echo "torch==$SYS_TORCH" >"$TMP/constraints.txt"
  [[ -z $SYS_TA ]] || echo "torchaudio==$SYS_TA" >>"$TMP/constraints.txt"
else
  TORCH_PIN="$(grep -iE '^torch==' "$TMP/main.txt")" || die "no torch==... line in $REQ"
  echo "$TORCH_PIN" >"$TMP/constraints.txt"
  # The CPU wheel comes from a local directory (pip's find-links, /opt/wheels here).
  # Without it pip would fetch the multi-GB CUDA build from PyPI: say so loudly.
  tv="${TORCH_PIN#*==}"
  if ! "$VPY" -c 'import torch' 2>/dev/null \
     && ! compgen -G "/opt/wheels/torch-${tv}+cpu-*.whl" >/dev/null; then
    log "WARNING: no /opt/wheels/torch-${tv}+cpu-*.whl here: pip may download a CUDA torch from PyPI"
  fi
fi
log "constraints: $(tr '\n' ' ' <"$TMP/constraints.txt")"

pip_run() {
  local q=(-q)
  [[ -z ${VERBOSE:-} ]] || q=()
  # This machine's pip.conf lists extra file:// indexes that lack most projects;
  # pip warns once per project about them: drop those lines, keep everything else.
  { PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1 "$VPY" -m pip "$@" "${q[@]}" --progress-bar off 2>&1; } \
    | { grep -v 'is ignored: it is neither a file nor a directory' || true; }
}

# ---- 4. install
log "pip install: $(wc -l <"$TMP/main.txt") pinned packages from requirements.txt + requirements-dev.txt"
pip_run install -c "$TMP/constraints.txt" -r "$TMP/main.txt" -r "$REQ_DEV"
log "pip install --no-deps: $(tr '\n' ' ' <"$TMP/nodeps.txt")"
pip_run install --no-deps -c "$TMP/constraints.txt" -r "$TMP/nodeps.txt"

# ---- 5. torchaudio: the PyPI build's compiled library is for another (CUDA) torch and
#         fails to load; without lib/*.so torchaudio falls back to pure Python.
TA_DIR="$("$VPY" -c 'import importlib.util as u, os; s = u.find_spec("torchaudio"); print(os.path.dirname(s.origin) if s else "")')"
if [[ -n $TA_DIR && "$(realpath "$TA_DIR")" == "$(realpath "$VENV")"/* ]]; then
  shopt -s nullglob
  sos=("$TA_DIR"/lib/*.so)
  shopt -u nullglob
  if ((${#sos[@]})); then
    log "removing torchaudio's compiled libraries: ${sos[*]##*/}"
    rm -f -- "${sos[@]}"
  fi
fi

# ---- 6. smoke test
if [[ -z ${SKIP_VERIFY:-} ]]; then
  log "verifying imports"
  EXPECT_TORCH="${SYS_TORCH:-$(sed 's/^[^=]*==//' "$TMP/constraints.txt")}" \
  "$VPY" -W ignore - <<'EOF' 2>&1 | { grep -v -e '^\[nltk_data\]' -e "^Failed to import Flash Attention" || true; }
import os, sys
import torch
want = os.environ["EXPECT_TORCH"]
assert torch.__version__.split("+")[0] == want.split("+")[0], (torch.__version__, want)
import numpy, torchaudio
fb = torchaudio.compliance.kaldi.fbank(torch.randn(1, 16000), num_mel_bins=80)
assert fb.shape == (98, 80), fb.shape
from espnet2.asr.encoder.e_branchformer_encoder import EBranchformerEncoder
from espnet2.asr.decoder.transformer_decoder import TransformerDecoder
from espnet2.tasks.s2t import S2TTask
from espnet2.bin.s2t_inference import Speech2Text
from espnet2.asr.encoder.beats_encoder import BeatsEncoder
from espnet.nets.batch_beam_search import BatchBeamSearch
from speechbrain.lobes.models.ECAPA_TDNN import ECAPA_TDNN
with torch.no_grad():
    assert ECAPA_TDNN(80).eval()(torch.randn(1, 200, 80)).shape == (1, 1, 192)
import lang2vec.lang2vec as l2v
assert set(l2v.get_features(["deu", "fra"], "syntax_knn+phonology_knn+inventory_knn")) == {"deu", "fra"}
from resemblyzer import VoiceEncoder
VoiceEncoder("cpu", verbose=False)
import sentencepiece, jiwer, sacrebleu, scipy, matplotlib, av, soundfile, yaml, tqdm, whisper, tiktoken, ctranslate2, faster_whisper
import pytest, pytest_benchmark, setuptools, wheel, pkg_resources, cmake, ninja
import espnet
print("[setup_venv] ok: torch %s, torchaudio %s, espnet %s, numpy %s, python %s"
      % (torch.__version__, torchaudio.__version__, espnet.__version__, numpy.__version__,
         sys.version.split()[0]))
EOF
  for tool in cmake ninja; do
    [[ -x $VENV/bin/$tool ]] || die "$VENV/bin/$tool missing"
    log "$tool: $("$VENV/bin/$tool" --version | head -1)"
  done
fi

{
  echo "base: $BASE_INFO"
  echo "torch: ${SYS_TORCH:+reused from base, }$(cat "$TMP/constraints.txt" | tr '\n' ' ')"
  echo "date: $(date -u +%FT%TZ)"
} >"$STAMP"
log "done in $((SECONDS - START)) s: $VENV ($(du -sh "$VENV" 2>/dev/null | cut -f1))"
