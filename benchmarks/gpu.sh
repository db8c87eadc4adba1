#!/usr/bin/env bash
# The GPU benchmark in one go, on a machine with a CUDA GPU, its own CUDA torch, nvcc, cmake,
# ninja and pytest, and no network (the project's GPU machines: torch 2.11 + CUDA 13, Python 3.12):
#
#   bash benchmarks/gpu.sh OUTDIR
#
# 1. installs the wheels of `bash benchmarks/gpu_wheels.sh` (WHEELS, default wheels/) that its
#    Python lacks, into that Python (PYTHON, default python3; a package it has is never moved);
# 2. builds the op library with its CUDA kernels (LOCALGP_CUDA=1: fails loudly if it cannot);
# 3. runs the CUDA tests (pytest -m requires_cuda, on the test files that have them), then the op
#    tests again under compute-sanitizer's memcheck, racecheck and synccheck (OUTDIR/sanitizer/,
#    one report per tool; a finding fails the step), and benchmarks/compaction.py (bytes and time
#    of one layer's compaction and scatters) -> OUTDIR/compaction.json/.md;
# 4. the matrix: presets base/small/medium, bf16, batch 1 and 8, keep 1.0/0.7/0.5/0.3, 30 s,
#    part encoder (batch 1 and 8), part decode (batch 1 and 32, 50 steps of beam 5):
#    `localgp bench` -> OUTDIR/bench_<part>_<preset>_b<batch>.json/.csv;
# 5. `localgp profile` of the medium encoder, batch 8, keep 1.0 and 0.5 -> OUTDIR/profile/, and of the
#    medium decode, batch 32 -> OUTDIR/profile_decode/ (profile.txt/json, profile_<mode>.png, traces),
#    and benchmarks/decode_modules.py there (which modules skipping saves on, and the best step);
#    Whisper base's encoder (its shapes, random weights, noise clips: the weights are not carried)
#    in bf16 at batch 1 and 8 and in fp16 at batch 8, beside openai-whisper's own (float32), and its
#    profile -> OUTDIR/profile_whisper/;
# 6. OUTDIR/results.md: every row in one Markdown table, headed by date, device and revision
#    (for benchmarks/RESULTS.md); OUTDIR/log.txt: everything printed.
#
# Budget: BUDGET_S seconds in all (default 450, so the whole run stays under 8 minutes); each step
# runs under `timeout` with what is left (the tests at most TESTS_S, default 150). A step that
# fails or runs out of time is reported and the next one runs; the exit status is 1 if any did.
# Rows name the git revision; where the tree has no .git, set LOCALGP_REVISION=<commit>.
# Through the device tool (which brings back at most 8 files from $OUT): carry ["wheels"], run
#   LOCALGP_REVISION=<commit> bash benchmarks/gpu.sh /tmp/gpu; tar czf $OUT/gpu.tgz -C /tmp gpu
set -uo pipefail

[[ $# -eq 1 ]] || { echo "usage: bash benchmarks/gpu.sh OUTDIR" >&2; exit 2; }
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="$(realpath -m "$1")"
PY="${PYTHON:-python3}"
WHEELS="$(realpath -m "${WHEELS:-$REPO/wheels}")"
BUDGET_S="${BUDGET_S:-450}"
TESTS_S="${TESTS_S:-150}"
DEADLINE=$((SECONDS + BUDGET_S))
export PYTHONUNBUFFERED=1 LOCALGP_CUDA=1
mkdir -p "$OUT/profile"
LOG="$OUT/log.txt"
: >"$LOG"
FAILED=()
cd "$REPO" || exit 1

say() { printf '[gpu.sh %3ds] %s\n' "$SECONDS" "$*" | tee -a "$LOG" >&2; }

# step NAME CAP_S CMD...: CMD under timeout min(CAP_S, budget left); a failure is recorded, not fatal.
step() {
  local name=$1 cap=$2 left
  shift 2
  left=$((DEADLINE - SECONDS))
  if ((left < 10)); then
    say "$name: SKIPPED, the budget of ${BUDGET_S} s is spent"
    FAILED+=("$name (budget)")
    return 1
  fi
  ((left < cap)) || left=$cap
  say "$name (at most ${left} s)"
  timeout "$left" "$@" 2>&1 | tee -a "$LOG"
  local rc=${PIPESTATUS[0]}
  if ((rc != 0)); then
    say "$name: FAILED (exit $rc$( ((rc == 124)) && echo ', out of time'))"
    FAILED+=("$name")
    return 1
  fi
}

fatal() { say "FATAL: $*"; exit 1; }

# ---- 0. what we run on
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee -a "$LOG"
"$PY" -c 'import sys, torch; print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda,
"gpu", torch.cuda.is_available() and torch.cuda.get_device_name())' 2>&1 | tee -a "$LOG"
"$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' || fatal "$PY's torch sees no CUDA GPU"
if [[ -z ${LOCALGP_REVISION:-} ]] && ! git -C "$REPO" rev-parse HEAD >/dev/null 2>&1; then
  say "WARNING: no .git here and LOCALGP_REVISION unset: rows will say revision 'unknown'"
fi

# ---- 1. the carried wheels the Python lacks
[[ -d $WHEELS ]] || fatal "no $WHEELS: run 'bash benchmarks/gpu_wheels.sh' on a machine with network and bring it along"
mapfile -t NEED < <("$PY" - "$WHEELS" <<'EOF'
import importlib.metadata as md, pathlib, re, sys
from packaging.version import Version

for wheel in sorted(pathlib.Path(sys.argv[1]).glob("*.whl")):
    name = re.sub(r"[-_.]+", "-", wheel.name.split("-")[0]).lower()
    try:
        have = md.version(name)
    except md.PackageNotFoundError:
        print(wheel)
        continue
    # pyproject.toml's licence field needs setuptools >= 77.0.3 to build localgp; others: keep the image's
    if name == "setuptools" and Version(have) < Version("77.0.3"):
        print(wheel)
    else:
        print(f"keeping the installed {name} {have}", file=sys.stderr)
EOF
)
if ((${#NEED[@]})); then
  step "install ${#NEED[@]} carried wheels" 120 "$PY" -m pip install -q --no-index --no-deps --no-cache-dir "${NEED[@]}" \
    || fatal "the wheels did not install"
fi

# ---- 2. the op library with CUDA kernels, against this machine's torch
step "build (LOCALGP_CUDA=1)" 300 "$PY" -m pip install --no-build-isolation --no-deps --no-index -e . \
  || fatal "the CUDA build failed"
"$PY" -c 'import espnet2.tasks.s2t, whisper, localgp.bench, localgp.ops as o, sys; sys.exit(0 if o.has_cuda_kernels() else 1)' \
  2>&1 | grep -v -e '^\[nltk_data\]' -e 'Flash Attention' | tee -a "$LOG"
((PIPESTATUS[0] == 0)) || fatal "localgp (with its CUDA kernels) or ESPnet does not import"

# ---- 3. CUDA tests: only files with CUDA tests are collected (others import packages not carried)
mapfile -t CUDA_TESTS < <(grep -lE 'requires_cuda|DEVICES' tests/test_*.py)
step "CUDA tests (${CUDA_TESTS[*]})" "$TESTS_S" "$PY" -m pytest -q -m requires_cuda -p no:cacheprovider "${CUDA_TESTS[@]}"
SANITIZER="$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -n 1)"
if [[ -n $SANITIZER ]]; then
  mkdir -p "$OUT/sanitizer"
  for tool in memcheck racecheck synccheck; do
    # The op tests only (the kernels are ours; the rest is torch's); --error-exitcode makes a finding fail.
    step "compute-sanitizer $tool" 90 "$SANITIZER" --tool "$tool" --error-exitcode 1 --log-file "$OUT/sanitizer/$tool.txt" \
      "$PY" -m pytest -q -x -m requires_cuda -p no:cacheprovider tests/test_ops.py -k "not varlen"
  done
else
  say "compute-sanitizer not found: sanitizer runs skipped"
  FAILED+=("compute-sanitizer (missing)")
fi
step "compaction traffic and time" 90 "$PY" benchmarks/compaction.py --device cuda --json "$OUT/compaction.json" \
  --markdown "$OUT/compaction.md"

# ---- 4. + 5. the matrix, the profile
bench() {  # PART PRESET BATCH [more flags]
  local name="bench_$1_$2_b$3"
  step "$name" 240 "$PY" -m localgp bench --part "$1" --preset "$2" --batch "$3" --dtype bfloat16 --device cuda \
    --seconds 30 --keep 1.0,0.7,0.5,0.3 --json "$OUT/$name.json" --csv "$OUT/$name.csv" "${@:4}"
}
for preset in base small medium; do
  for batch in 1 8; do bench encoder "$preset" "$batch"; done
done
step "profile encoder medium b8" 120 "$PY" -m localgp profile --part encoder --preset medium --batch 8 --dtype bfloat16 \
  --device cuda --keep 1.0,0.5 --out "$OUT/profile"
# decode: 50 steps of beam 5; ESPnet's search (one utterance after another) only at batch 1, where it
# takes seconds a call; at batch 32 the rows are this decoder's alone.
for preset in base small medium; do
  bench decode "$preset" 1 --keep 1.0,0.5 --tokens 50 --repeats 3
  bench decode "$preset" 32 --keep 1.0,0.7,0.5,0.3 --tokens 50 --repeats 3 --providers dense,masked,compact
done
step "profile decode medium b32" 120 "$PY" -m localgp profile --part decode --preset medium --batch 32 --dtype bfloat16 \
  --device cuda --keep 0.5 --tokens 50 --out "$OUT/profile_decode"
step "decode modules medium b32" 90 "$PY" benchmarks/decode_modules.py --preset medium --batch 32 --dtype bfloat16 \
  --device cuda --tokens 30 --keep 0.5 --repeats 30 --json "$OUT/profile_decode/modules.json"
# Whisper base: its weights (300 MB) cannot be carried (64 MiB), so base's shapes with random
# weights on noise clips: encoder timing, beside openai-whisper's own encoder on the same weights.
# bf16 at batch 1 and 8, fp16 at batch 8 (issue 22: both half precisions in dense, masked and compact;
# the CUDA tests above check them against float32 in every execution)
for run in bfloat16:1 bfloat16:8 float16:8; do
  dtype=${run%:*} batch=${run#*:}
  name="bench_encoder_whisper-base_${dtype}_b$batch"
  step "$name" 240 "$PY" -m localgp bench --backbone whisper-base --weights random \
    --audio noise --seconds 5 --part encoder --batch "$batch" --dtype "$dtype" --device cuda --keep 1.0,0.7,0.5,0.3 \
    --json "$OUT/$name.json" --csv "$OUT/$name.csv"
done
step "profile encoder whisper-base b8" 120 "$PY" -m localgp profile --backbone whisper-base --weights random \
  --audio noise --seconds 5 --part encoder --batch 8 --dtype bfloat16 --device cuda --keep 1.0,0.5 \
  --out "$OUT/profile_whisper"

# ---- 6. one table
"$PY" - "$OUT" <<'EOF' 2>&1 | tee -a "$LOG"
import json, pathlib, sys
from localgp.bench import markdown

out = pathlib.Path(sys.argv[1])
rows = [r for f in sorted(out.glob("bench_*.json")) for r in json.loads(f.read_text())]
if rows:
    head = rows[0]
    text = (f"{head['date'][:10]}, {head['device_name']}, torch {head['torch']} (CUDA {head['cuda']}), "
            f"revision {head['revision']}; median of {head['repeats']} after {head['warmup']} warm-up, "
            f"masks forced at random\n\n" + markdown(rows))
    (out / "results.md").write_text(text)
    print(text)
EOF

if ((${#FAILED[@]})); then
  say "done in ${SECONDS} s; FAILED: ${FAILED[*]}"
  exit 1
fi
say "done in ${SECONDS} s; all steps passed; results in $OUT"
