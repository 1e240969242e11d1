#!/usr/bin/env bash
# One-shot set-up of a kvcrunch development/CI machine (Debian 12, as root).
#   1. apt packages (only those missing, checked with dpkg -s)
#   2. python packages for the reference tests (tests/reference/requirements.txt)
#   3. the test model (scripts/fetch_model.sh, idempotent, sha256-checked)
#   4. cmake configure + build into build/ (Release, -j$(nproc))
# Safe to rerun: every step is a no-op when already done.
#
# Usage: scripts/setup.sh [--no-build] [--no-model]
#   env: BUILD_DIR (default build), BUILD_TYPE (default Release), PYTHON (python3)
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
do_build=1
do_model=1
for a in "$@"; do
  case "$a" in
    --no-build) do_build=0 ;;
    --no-model) do_model=0 ;;
    -h|--help) sed -n '2,12p' "$0"; exit 0 ;;
    *) echo "setup: unknown option $a" >&2; exit 2 ;;
  esac
done
BUILD_DIR="${BUILD_DIR:-build}"
BUILD_TYPE="${BUILD_TYPE:-Release}"
PY="${PYTHON:-python3}"

APT_PACKAGES=(
  build-essential cmake pkg-config ccache
  libhwy-dev libpcre2-dev libcli11-dev nlohmann-json3-dev libfmt-dev libspdlog-dev
  libcpp-httplib-dev libssl-dev libxxhash-dev
  libopenblas-dev libeigen3-dev liblapacke-dev
  libgtest-dev libgmock-dev libbenchmark-dev
  python3-pip unzip
  redis-server redis-tools libhiredis-dev libzmq3-dev libmsgpack-cxx-dev nginx
)

sudo_() { if [[ $(id -u) -eq 0 ]]; then "$@"; else sudo "$@"; fi; }

# --- 1. apt ------------------------------------------------------------------
missing=()
for p in "${APT_PACKAGES[@]}"; do
  # dpkg -s succeeds for removed-but-not-purged packages too; require "install ok installed".
  st="$(dpkg-query -W -f='${Status}' "$p" 2>/dev/null || true)"
  [[ "$st" == "install ok installed" ]] || missing+=("$p")
done
if (( ${#missing[@]} )); then
  echo "setup: apt-get install ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  sudo_ apt-get update -q
  sudo_ apt-get install -y -q --no-install-recommends "${missing[@]}"
else
  echo "setup: apt packages present"
fi

# --- 2. python ----------------------------------------------------------------
# Debian 12's /usr/bin/python3 is "externally managed" (PEP 668): pip refuses to
# install into it unless told to. These are test-only packages, pinned, so
# installing them system-wide is what we want. The env var is ignored by a pip
# that does not know it.
export PIP_BREAK_SYSTEM_PACKAGES=1
export PIP_DISABLE_PIP_VERSION_CHECK=1
if "$PY" - <<'PYEOF' 2>/dev/null
import sys, re
from importlib.metadata import version
want = {}
for line in open("tests/reference/requirements.txt"):
    line = line.split("#")[0].strip()
    if line:
        n, v = re.split(r"==", line)
        want[n.strip()] = v.strip()
sys.exit(0 if all(version(n) == v for n, v in want.items()) else 1)
PYEOF
then
  echo "setup: python requirements present"
else
  echo "setup: pip install -r tests/reference/requirements.txt"
  "$PY" -m pip install -q -r tests/reference/requirements.txt
fi

# --- 3. model -----------------------------------------------------------------
if (( do_model )); then
  bash scripts/fetch_model.sh
fi

# --- 4. build -----------------------------------------------------------------
if (( do_build )); then
  cmake -S . -B "$BUILD_DIR" -DCMAKE_BUILD_TYPE="$BUILD_TYPE"
  cmake --build "$BUILD_DIR" -j"$(nproc)"
fi
# --- 5. python package environment (python/, docs/python.md) -------------------
# Pinned venvs under ~/.cache, installed once (torch from PyPI, ~6 GB, ~2 min): the newest
# transformers, and transformers 4.57 + kvpress. KVCRUNCH_PYTHON=0 skips (and test.sh's python tests).
if [[ "${KVCRUNCH_PYTHON:-1}" != 0 ]]; then
  PYTHON="$PY" bash python/scripts/setup_venv.sh
fi
echo "setup: done"
