#!/usr/bin/env bash
# Build llama.cpp's own HTTP server (llama-server) and llama-batched-bench as the serving peer
# for bench/serve/. The llama.cpp source is the copy vendored in the llama-cpp-python sdist
# that install_peers.sh pins (same llama.cpp as the bench/compare/ peer rows), fetched with
#   pip download --no-deps --no-binary :all: llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION
# and built with CMake into a cache directory outside the repository (never committed):
#   $PEERS_DIR/src/llama_cpp_python-<ver>/vendor/llama.cpp   unpacked source
#   $PEERS_DIR/llama-server/build                              CMake build tree
#   $PEERS_DIR/llama-server/bin/{llama-server,llama-batched-bench}
# PEERS_DIR defaults to ~/.cache/kvcrunch-peers.
#
# Idempotent: when bin/ holds both binaries and the stamp file matches the version and CMake
# flags, it only prints the paths. --force rebuilds. About 15 minutes on 2 idle cores; runs
# under nice; the build log is $LOG (default /tmp/kvcrunch_build_llama_server.log).
#
# CMake flags: GGML_NATIVE=ON (-march=native), server + tools on, examples/tests off,
# no OpenSSL, no web UI download (LLAMA_USE_PREBUILT_UI=OFF fetches nothing from the network;
# the server's HTML UI is empty — the API is all we need). LLAMA_CURL no longer exists in
# this llama.cpp (deprecated option; downloads go through its own HTTP client, unused here).
#
# Usage: bash bench/compare/build_llama_server.sh [--force]
# Prints the bin directory on the last line of stdout.
set -euo pipefail

LLAMA_CPP_PYTHON_VERSION="${LLAMA_CPP_PYTHON_VERSION:-0.3.36}"
PEERS_DIR="${PEERS_DIR:-$HOME/.cache/kvcrunch-peers}"
LOG="${LOG:-${TMPDIR:-/tmp}/kvcrunch_build_llama_server.log}"
PY="${PYTHON:-python3}"
JOBS="${JOBS:-$(nproc)}"

force=0
while (( $# )); do
  case "$1" in
    --force) force=1 ;;
    -h|--help) sed -n 2,21p "$0"; exit 0 ;;
    *) echo "usage: $0 [--force]" >&2; exit 2 ;;
  esac
  shift
done

CMAKE_FLAGS=(
  -DCMAKE_BUILD_TYPE=Release
  -DGGML_NATIVE=ON -DGGML_OPENMP=ON -DGGML_CPU=ON -DGGML_BLAS=OFF
  -DLLAMA_BUILD_SERVER=ON -DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_COMMON=ON
  -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_APP=OFF
  -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF
  -DBUILD_SHARED_LIBS=OFF
)
TARGETS=(llama-server llama-batched-bench)

src_root="$PEERS_DIR/src"
src="$src_root/llama_cpp_python-$LLAMA_CPP_PYTHON_VERSION/vendor/llama.cpp"
out="$PEERS_DIR/llama-server"
build="$out/build"
bin="$out/bin"
stamp="$out/stamp"
want_stamp="llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION ${CMAKE_FLAGS[*]}"

if [[ $force -eq 0 && -x "$bin/llama-server" && -x "$bin/llama-batched-bench" && -f "$stamp" \
      && "$(cat "$stamp")" == "$want_stamp" ]]; then
  echo "llama-server (llama-cpp-python $LLAMA_CPP_PYTHON_VERSION's llama.cpp) already built" >&2
  echo "$bin"
  exit 0
fi

if [[ $(id -u) -eq 0 ]] && command -v dpkg >/dev/null; then
  missing=()
  for p in build-essential cmake; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
  if (( ${#missing[@]} )); then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q && apt-get install -y -q --no-install-recommends "${missing[@]}"
  fi
fi

mkdir -p "$src_root" "$out"
if [[ ! -f "$src/CMakeLists.txt" ]]; then
  sdist="$src_root/llama_cpp_python-$LLAMA_CPP_PYTHON_VERSION.tar.gz"
  if [[ ! -f "$sdist" ]]; then
    echo "downloading the llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION sdist" >&2
    "$PY" -m pip download --no-deps --no-binary :all: -d "$src_root" \
      "llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION" >>"$LOG" 2>&1
  fi
  tar -xzf "$sdist" -C "$src_root"
fi
[[ -f "$src/CMakeLists.txt" ]] || { echo "no llama.cpp source at $src" >&2; exit 1; }

echo "building ${TARGETS[*]} from $src into $build (log: $LOG)" >&2
start=$(date +%s)
{
  echo "== $(date -u) cmake ${CMAKE_FLAGS[*]}"
  nice -n 10 cmake -S "$src" -B "$build" "${CMAKE_FLAGS[@]}"
  nice -n 10 cmake --build "$build" --target "${TARGETS[@]}" -j "$JOBS"
} >>"$LOG" 2>&1 || { echo "llama-server build failed; last lines of $LOG:" >&2; tail -n 40 "$LOG" >&2; exit 1; }

mkdir -p "$bin"
for t in "${TARGETS[@]}"; do
  f="$(find "$build" -type f -name "$t" -perm -u+x | head -n 1)"
  [[ -n "$f" ]] || { echo "built, but $t not found under $build" >&2; exit 1; }
  cp -f "$f" "$bin/$t"
done
echo "$want_stamp" >"$stamp"
echo "built in $(( $(date +%s) - start )) s: $bin/llama-server, $bin/llama-batched-bench" >&2
echo "$bin"
