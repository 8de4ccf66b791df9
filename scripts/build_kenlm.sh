#!/usr/bin/env bash
# Build KenLM's estimator and tools (lmplz, build_binary, query) into a venv.
#
#   scripts/build_kenlm.sh [VENV]          # VENV defaults to /work/main/.venv
#
# Why: `pip install kenlm` builds only the Python query module; the
# difficulty stage also needs KenLM's own estimator (lmplz) and Debian has no
# KenLM package. So we build the three tools from the kenlm source package,
# at the version installed in the venv (or 0.3.0).
#
# Idempotent: exits at once when the three binaries are already in $VENV/bin.
# Installs Debian build dependencies with apt-get only when one is missing
# (needs root then). Environment knobs: KENLM_VERSION, KENLM_JOBS (make -j),
# KENLM_BUILD_DIR (kept between runs, so a failed build resumes quickly).
set -euo pipefail

VENV="${1:-/work/main/.venv}"
BIN="$VENV/bin"
TOOLS=(lmplz build_binary query)
APT_DEPS=(build-essential cmake libboost-program-options-dev libboost-system-dev
          libboost-thread-dev libboost-test-dev zlib1g-dev libbz2-dev liblzma-dev)

log() { echo "[build_kenlm] $*" >&2; }

all_built() {
  local t
  for t in "${TOOLS[@]}"; do [[ -x "$BIN/$t" ]] || return 1; done
}

install_apt_deps() {
  local missing=() p
  for p in "${APT_DEPS[@]}"; do
    dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
  done
  [[ ${#missing[@]} -eq 0 ]] && return 0
  log "installing Debian build deps: ${missing[*]}"
  local sudo=""
  [[ $(id -u) -ne 0 ]] && sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}"
}

kenlm_version() {
  # Prefer the version pip installed (the query module), so both sides match.
  if [[ -n "${KENLM_VERSION:-}" ]]; then echo "$KENLM_VERSION"; return; fi
  local v
  v=$("$BIN/python" -m pip show kenlm 2>/dev/null | awk '/^Version:/{print $2}') || true
  echo "${v:-0.3.0}"
}

fetch_source() {  # $1 = version, $2 = work dir; prints the unpacked source dir
  local version="$1" work="$2" sdist src
  src=$(find "$work" -maxdepth 2 -name CMakeLists.txt -path "*kenlm*" -printf '%h\n' 2>/dev/null | head -n1)
  if [[ -n "$src" ]]; then echo "$src"; return; fi
  # --no-binary kenlm, not :all:, which would also build pip's build
  # dependencies (cmake, setuptools) from source: many minutes.
  "$BIN/python" -m pip download --quiet --no-deps --no-binary kenlm \
      --dest "$work/sdist" "kenlm==$version" >&2
  sdist=$(ls "$work"/sdist/kenlm-*.tar.gz | head -n1)
  tar -xzf "$sdist" -C "$work"
  find "$work" -maxdepth 2 -name CMakeLists.txt -path "*kenlm*" -printf '%h\n' | head -n1
}

build_tools() {  # $1 = source dir
  local build="$1/build"
  mkdir -p "$build"
  # KENLM_MAX_ORDER stays at its default (6); orders above it need a rebuild.
  local log="$build/build.log"
  # Compiler warnings are many and harmless: keep them in a log, show its tail on failure.
  if ! { cmake -S "$1" -B "$build" -DCMAKE_BUILD_TYPE=Release \
         && make -C "$build" -j"${KENLM_JOBS:-2}" "${TOOLS[@]}"; } >"$log" 2>&1; then
    tail -n 40 "$log" >&2
    log "build failed; full log in $log"
    exit 1
  fi
  local t
  for t in "${TOOLS[@]}"; do
    install -m 0755 "$build/bin/$t" "$BIN/$t"
  done
}

main() {
  [[ -x "$BIN/python" ]] || { log "no python at $BIN/python: is VENV=$VENV a venv?"; exit 2; }
  if all_built; then
    log "lmplz, build_binary and query already in $BIN: nothing to do"
    exit 0
  fi
  install_apt_deps
  local version work src start=$SECONDS
  version=$(kenlm_version)
  work="${KENLM_BUILD_DIR:-${TMPDIR:-/tmp}/kenlm-build-$version}"
  mkdir -p "$work"
  log "building kenlm $version tools in $work"
  src=$(fetch_source "$version" "$work")
  [[ -n "$src" ]] || { log "kenlm source package has no CMakeLists.txt"; exit 1; }
  build_tools "$src"
  log "installed ${TOOLS[*]} into $BIN in $((SECONDS - start)) s"
}

main
