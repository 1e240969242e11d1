#!/usr/bin/env bash
# Install the peer runtimes that bench/compare/ measures kvcrunch against.
#
# llama.cpp, through llama-cpp-python from PyPI: the sdist vendors llama.cpp and
# builds it from source with CMake (scikit-build-core). On 2 cores this takes
# several minutes; progress goes to $LOG (default /tmp/kvcrunch_install_peers.log).
#
# NVIDIA kvpress (PyPI) with torch + transformers, for kvpress_passkey.py: installed into its own
# virtual environment ($KVPRESS_VENV, default ~/.cache/kvcrunch-kvpress-venv) because kvpress 0.5.5
# needs transformers < 5.3 and the system Python may carry a newer one. torch from PyPI pulls its
# CUDA wheels (~4 GB download, ~7 GB on disk); it runs on the CPU here.
#
# llama.cpp's HTTP server (llama-server, plus llama-batched-bench) for bench/serve/: built by
# build_llama_server.sh from the same pinned sdist's vendored llama.cpp into
# ~/.cache/kvcrunch-peers/llama-server/bin (only with --only llama-server; the default run below
# does not build it).
#
# Idempotent: does nothing for a peer whose pinned version is already importable.
# Usage: bash bench/compare/install_peers.sh [--force] [--only llama|kvpress|llama-server]
set -euo pipefail

KVPRESS_VERSION="${KVPRESS_VERSION:-0.5.5}"
TORCH_VERSION="${TORCH_VERSION:-2.9.1}"
TRANSFORMERS_VERSION="${TRANSFORMERS_VERSION:-5.2.0}"
KVPRESS_VENV="${KVPRESS_VENV:-$HOME/.cache/kvcrunch-kvpress-venv}"

LLAMA_CPP_PYTHON_VERSION="${LLAMA_CPP_PYTHON_VERSION:-0.3.36}"
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
LOG="${LOG:-${TMPDIR:-/tmp}/kvcrunch_install_peers.log}"
PY="${PYTHON:-python3}"

force=0
only=""
reinstall=()
while (( $# )); do
  case "$1" in
    --force) force=1; reinstall=(--force-reinstall --no-deps) ;;
    --only) only="$2"; shift ;;
    *) echo "usage: $0 [--force] [--only llama|kvpress|llama-server]" >&2; exit 2 ;;
  esac
  shift
done

install_kvpress() {
  local vpy="$KVPRESS_VENV/bin/python"
  if [[ $force -eq 0 && -x "$vpy" ]] && "$vpy" -c "
import importlib.metadata as m, sys
want = {'kvpress': '$KVPRESS_VERSION', 'torch': '$TORCH_VERSION', 'transformers': '$TRANSFORMERS_VERSION'}
sys.exit(any(not m.version(k).startswith(v) for k, v in want.items()))" 2>/dev/null; then
    echo "kvpress $KVPRESS_VERSION (torch $TORCH_VERSION, transformers $TRANSFORMERS_VERSION) already in $KVPRESS_VENV"
    return 0
  fi
  echo "installing kvpress==$KVPRESS_VERSION torch==$TORCH_VERSION transformers==$TRANSFORMERS_VERSION into $KVPRESS_VENV, log: $LOG"
  "$PY" -m venv "$KVPRESS_VENV"
  PIP_BREAK_SYSTEM_PACKAGES=1 "$vpy" -m pip install --no-cache-dir \
    "torch==$TORCH_VERSION" "transformers==$TRANSFORMERS_VERSION" "kvpress==$KVPRESS_VERSION" \
    "accelerate==1.12.0" "gguf==0.19.0" "numpy==2.3.5" >>"$LOG" 2>&1 || {
    echo "kvpress install failed; last lines of $LOG:" >&2
    tail -n 40 "$LOG" >&2
    return 1
  }
  "$vpy" -c 'import torch, transformers, kvpress; print("kvpress ready: torch", torch.__version__, "transformers", transformers.__version__)'
}

if [[ "$only" == "kvpress" ]]; then install_kvpress; exit $?; fi
if [[ "$only" == "llama-server" ]]; then
  LLAMA_CPP_PYTHON_VERSION="$LLAMA_CPP_PYTHON_VERSION" exec bash "$here/build_llama_server.sh" \
    $( (( force )) && echo --force )
fi
if [[ -z "$only" ]]; then install_kvpress || echo "kvpress install failed; going on with llama.cpp" >&2; fi

installed="$("$PY" -c 'import llama_cpp; print(llama_cpp.__version__)' 2>/dev/null || true)"
if [[ $force -eq 0 && "$installed" == "$LLAMA_CPP_PYTHON_VERSION" ]]; then
  echo "llama-cpp-python $installed already installed"
  exit 0
fi

# Toolchain needed for the source build (Debian 12). OpenMP comes with gcc (libgomp).
if [[ $(id -u) -eq 0 ]] && command -v dpkg >/dev/null; then
  missing=()
  for p in build-essential cmake git; do
    dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
  done
  if (( ${#missing[@]} )); then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q
    apt-get install -y -q --no-install-recommends "${missing[@]}"
  fi
fi

# CPU build tuned for this machine:
#   GGML_NATIVE=ON   -march=native (AVX2/AVX-512/VNNI kernels as the CPU supports)
#   GGML_OPENMP=ON   OpenMP thread pool (llama.cpp's default, fastest on CPU)
#   LLAVA_BUILD=OFF / LLAMA_BUILD_* OFF: skip multimodal + examples, halves build time
# Note: on this project's machines (Xeon with AMX, sandboxed) ggml's AMX matmul
# path segfaults (SIGSEGV in ggml_backend_amx_mul_mat on the first decode).
# The bench scripts therefore load the model with use_extra_bufts = false
# (no AMX / repack buffers); see bench/compare/README.md.
export CMAKE_ARGS="${CMAKE_ARGS:--DGGML_NATIVE=ON -DGGML_OPENMP=ON -DGGML_CPU=ON -DGGML_BLAS=OFF -DLLAVA_BUILD=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF -DCMAKE_BUILD_TYPE=Release}"
export CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}"
export FORCE_CMAKE=1

echo "building llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION (CMAKE_ARGS=$CMAKE_ARGS), log: $LOG"
"$PY" -m pip install --no-cache-dir --no-binary llama-cpp-python -v "${reinstall[@]}" \
  "llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION" >"$LOG" 2>&1 || {
  echo "llama-cpp-python build failed; last lines of $LOG:" >&2
  tail -n 40 "$LOG" >&2
  exit 1
}
"$PY" -c 'import llama_cpp; print("llama-cpp-python", llama_cpp.__version__, "installed")'
