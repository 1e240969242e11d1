#!/usr/bin/env bash
# The fuzzers (.ci/run runs this after scripts/sanitize.sh): builds the libFuzzer targets with
# clang (ASan + UBSan, coverage-instrumented) into build-fuzz/ and runs each for FUZZ_SECONDS
# (default 60) from its committed seed corpus tests/fuzz/corpus/<target>/:
#   gguf_fuzz          GGUF reader (src/gguf)
#   kv_spec_fuzz       --config strings and every codec / transform / policy spec, built into a cache
#   kvquant_json_fuzz  KVQuant calibration JSON, built into kvquant codecs
#   kvccal_fuzz        the binary .kvccal calibration file (Palu / ThinK)
#   kv_record_fuzz     stored-KV records (sessions, prefix blocks): raw, and mutated behind a
#                      recomputed checksum, applied into a cache and attended through
# New inputs go to build-fuzz/corpus/<target>/ (not the repository). A crash, sanitizer report,
# leak, timeout (>10 s per input) or out-of-memory (>2 GiB) fails: the input is saved as
# build-fuzz/artifacts/<target>-crash-<sha1>; fix the bug and add the input to the corpus as a
# regression case. Installs clang, libFuzzer and clang's OpenMP from Debian when missing.
#   env: FUZZ_SECONDS (60), FUZZ_TARGETS (all four), FUZZ_BUILD_DIR (build-fuzz)
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
BUILD_DIR="${FUZZ_BUILD_DIR:-build-fuzz}"
seconds="${FUZZ_SECONDS:-60}"
read -r -a targets <<<"${FUZZ_TARGETS:-gguf_fuzz kv_spec_fuzz kvquant_json_fuzz kvccal_fuzz kv_record_fuzz}"

sudo_() { if [[ $(id -u) -eq 0 ]]; then "$@"; else sudo "$@"; fi; }
# Debian 12: libFuzzer is in libclang-rt-14-dev, clang's OpenMP runtime in libomp-14-dev.
missing=()
for p in clang-14 libclang-rt-14-dev libomp-14-dev; do
  st="$(dpkg-query -W -f='${Status}' "$p" 2>/dev/null || true)"
  [[ "$st" == "install ok installed" ]] || missing+=("$p")
done
if (( ${#missing[@]} )); then
  echo "fuzz: apt-get install ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  sudo_ apt-get update -q
  sudo_ apt-get install -y -q --no-install-recommends "${missing[@]}"
fi
CC="$(command -v clang-14 || command -v clang)"
CXX="$(command -v clang++-14 || command -v clang++)"

if [[ ! -f "$BUILD_DIR/CMakeCache.txt" ]]; then
  mkdir -p "$BUILD_DIR"
  CC="$CC" CXX="$CXX" cmake -S . -B "$BUILD_DIR" -DCMAKE_BUILD_TYPE=Release \
    -DCMAKE_CXX_FLAGS_RELEASE="-O1" -DKVCRUNCH_FUZZ=ON -DKVCRUNCH_TESTS=OFF -DKVCRUNCH_BENCH=OFF \
    > "$BUILD_DIR/configure.log" 2>&1 || { cat "$BUILD_DIR/configure.log"; exit 1; }
fi
cmake --build "$BUILD_DIR" -j"$(nproc)" --target "${targets[@]}"

export ASAN_OPTIONS="detect_leaks=1:abort_on_error=1"
export UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1"
export OMP_NUM_THREADS=1
mkdir -p "$BUILD_DIR/artifacts"
status=0
for t in "${targets[@]}"; do
  seeds="tests/fuzz/corpus/$t"
  [[ -d "$seeds" ]] || { echo "fuzz: no seed corpus $seeds" >&2; exit 1; }
  mkdir -p "$BUILD_DIR/corpus/$t"
  echo "== fuzz $t for ${seconds}s ($(ls "$seeds" | wc -l) seeds)"
  log="$BUILD_DIR/$t.log"
  if "$BUILD_DIR/$t" -max_total_time="$seconds" -rss_limit_mb=2048 -timeout=10 \
       -artifact_prefix="$BUILD_DIR/artifacts/$t-" -print_final_stats=1 \
       "$BUILD_DIR/corpus/$t" "$seeds" > "$log" 2>&1; then
    echo "   $(grep -E 'stat::number_of_executed_units' "$log" | awk '{print $2}') executions," \
         "$(ls "$BUILD_DIR/corpus/$t" | wc -l) new corpus entries, no crash"
  else
    status=1
    echo "fuzz: $t FAILED; last lines of $log:" >&2
    tail -40 "$log" >&2
  fi
done
exit $status
