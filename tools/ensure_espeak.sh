#!/usr/bin/env bash
# Makes sure espeak-ng, which synthesizes the German part of the demo corpus, can run, and prints
# the directory holding an `espeak-ng` command that works (stdout carries nothing else):
#
#   PATH="$(bash tools/ensure_espeak.sh):$PATH" .venv/bin/python -m localgp prepare demo
#
#   bash tools/ensure_espeak.sh [--prefix DIR] [--no-install]
#
#   --prefix DIR   where a copy without root goes (default <repo>/data/espeak-ng, git-ignored)
#   --no-install   never install system packages, even as root (take step 3 instead of step 2)
#
# In order, the first that gives an espeak-ng which synthesizes German:
#   1. `espeak-ng` on PATH, or a copy made earlier by step 3 in DIR;
#   2. as root, or with sudo that needs no password: apt-get install -y espeak-ng (after
#      apt-get update when the package lists lack it);
#   3. without root: `apt-get download` espeak-ng, its data and libraries, and the packages they
#      need that are not installed (as apt would resolve them), unpacked with `dpkg -x` into DIR (installs nothing, as the
#      demo corpus does with its sources), and a wrapper DIR/bin/espeak-ng that sets
#      LD_LIBRARY_PATH and ESPEAK_DATA_PATH;
#   4. otherwise exit 1, saying which command to run.
set -euo pipefail

log() { printf '[ensure_espeak] %s\n' "$*" >&2; }
# apt's own output (60 lines of unpacking) goes to a temporary file, its end shown where apt fails
APT_LOG="$(mktemp -t ensure_espeak-apt.XXXXXX)"
trap 'rm -f -- "$APT_LOG"' EXIT
quietly() {
  "$@" >"$APT_LOG" 2>&1 && return 0
  log "'$*' failed; the end of its output:"
  tail -n 15 "$APT_LOG" >&2
  return 1
}
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PREFIX="$REPO/data/espeak-ng"
INSTALL=1
while (($#)); do
  case $1 in
    --prefix) [[ $# -ge 2 ]] || { log "--prefix needs a directory"; exit 2; }; PREFIX="$2"; shift 2 ;;
    --no-install) INSTALL=0; shift ;;
    -h|--help) sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) log "unknown argument '$1' (usage: ensure_espeak.sh [--prefix DIR] [--no-install])"; exit 2 ;;
  esac
done
PREFIX="$(realpath -m "$PREFIX")"
# The packages themselves are always unpacked (the system may have none of them); their
# dependencies only where missing.
CORE=(espeak-ng libespeak-ng1 espeak-ng-data libpcaudio0 libsonic0)

# Does this espeak-ng command synthesize German? (prepare_demo uses the de+<variant> voices.)
works() {
  local tmp ok=1
  tmp="$(mktemp -d)"
  if "$1" -v de+m1 -w "$tmp/t.wav" "Hallo Welt" >/dev/null 2>&1 && [[ -s $tmp/t.wav ]]; then ok=0; fi
  rm -rf -- "$tmp"
  return $ok
}

fail() {
  log "ERROR: $*"
  log "install it as root:   sudo apt-get install -y espeak-ng   (Debian/Ubuntu)"
  log "or skip the German part: localgp prepare demo --german-sentences 0"
  exit 1
}

# ---- 1. already there
if cmd="$(command -v espeak-ng)" && works "$cmd"; then
  log "using $cmd"
  dirname "$cmd"
  exit 0
fi
if [[ -x $PREFIX/bin/espeak-ng ]] && works "$PREFIX/bin/espeak-ng"; then
  log "using the unpacked copy $PREFIX/bin/espeak-ng"
  echo "$PREFIX/bin"
  exit 0
fi
command -v apt-get >/dev/null && command -v dpkg >/dev/null \
  || fail "espeak-ng is not on PATH and this is not a Debian-based system (no apt-get/dpkg) to get it from"

# ---- 2. install as root
SUDO=()
if ((INSTALL)) && { ((EUID == 0)) || { command -v sudo >/dev/null && sudo -n true 2>/dev/null && SUDO=(sudo -n); }; }; then
  apt_install() { quietly "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -q espeak-ng; }
  log "installing espeak-ng, which speaks the demo corpus's German sentences, with apt-get${SUDO:+ (sudo)}"
  if apt_install || { log "retrying after apt-get update"; quietly "${SUDO[@]}" apt-get update -q && apt_install; }; then
    if cmd="$(command -v espeak-ng)" && works "$cmd"; then
      log "installed $cmd ($(grep -o '[0-9]* newly installed' "$APT_LOG" | tail -n 1 || true) packages: espeak-ng, its voices and libraries)"
      dirname "$cmd"
      exit 0
    fi
  fi
  log "apt-get install did not give a working espeak-ng; unpacking a copy without installing instead"
fi

# ---- 3. unpack without root
# apt's own resolver, simulated (no root needed), names the packages missing here; an installed
# package it would upgrade is left alone (a second libc in LD_LIBRARY_PATH would break things).
simulated="$(apt-get -s -q --no-install-recommends install espeak-ng 2>&1)" \
  || fail "apt-get cannot resolve espeak-ng (run 'apt-get update' as root first?): $(tail -1 <<<"$simulated")"
mapfile -t missing < <(awk '/^Inst / && $3 !~ /^\[/ {print $2}' <<<"$simulated")
wanted=("${CORE[@]}")
for pkg in "${missing[@]}"; do
  [[ " ${CORE[*]} " == *" $pkg "* ]] || wanted+=("$pkg")
done
log "unpacking espeak-ng, which speaks the demo corpus's German sentences, and the $((${#wanted[@]} - 1)) packages it needs into $PREFIX (no root: nothing installed)"
debs="$(mktemp -d)"
trap 'rm -rf -- "$debs" "$APT_LOG"' EXIT
(cd "$debs" && quietly apt-get download "${wanted[@]}") || fail "'apt-get download ${wanted[*]}' failed (offline?)"
rm -rf -- "$PREFIX/root"
mkdir -p "$PREFIX/root" "$PREFIX/bin"
for deb in "$debs"/*.deb; do dpkg -x "$deb" "$PREFIX/root"; done

phontab="$(find "$PREFIX/root" -path '*/espeak-ng-data/phontab' -print -quit)"
binary="$PREFIX/root/usr/bin/espeak-ng"
[[ -n $phontab && -x $binary ]] || fail "the unpacked packages lack usr/bin/espeak-ng or espeak-ng-data"
# Every unpacked directory with a shared library: libpulse, for one, finds libpulsecommon in a
# subdirectory through an absolute RUNPATH that points at the system, not at this copy.
libs="$(find "$PREFIX/root" -name '*.so*' \( -type f -o -type l \) -printf '%h\n' | sort -u | paste -sd:)"
cat >"$PREFIX/bin/espeak-ng" <<EOF
#!/bin/sh
# espeak-ng unpacked from Debian packages by tools/ensure_espeak.sh; nothing was installed.
export LD_LIBRARY_PATH='$libs'"\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}"
export ESPEAK_DATA_PATH='$(dirname "$(dirname "$phontab")")'
exec '$binary' "\$@"
EOF
chmod +x "$PREFIX/bin/espeak-ng"
works "$PREFIX/bin/espeak-ng" \
  || fail "the unpacked espeak-ng in $PREFIX does not run: $("$PREFIX/bin/espeak-ng" --version 2>&1 | tail -1)"
log "ready: $PREFIX/bin/espeak-ng"
echo "$PREFIX/bin"
