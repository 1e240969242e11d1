#!/usr/bin/env bash
# The sanitized suite (.ci/run runs it after scripts/test.sh): builds the unit tests and the CLI
# with AddressSanitizer + LeakSanitizer + UndefinedBehaviorSanitizer into build-asan/ (tests and
# CLI only, no benchmarks; -O1), then runs
#   1. every unit test (ctest -L unit), every Highway target as in scripts/test.sh;
#   2. a model smoke: one `kvcrunch perplexity -c 128 --chunks 1 -b 32` per codec family (plain
#      fp, q8_0, the ggml 4/5-bit blocks with their Hadamard rotation, fp8, KIVI, TurboQuant, QJL,
#      PolarQuant, KVQuant) plus one eviction policy and one K transform; batches of 32 tokens so
#      that KIVI's windows flush and the policy evicts between batches (a whole-chunk batch
#      attends uncompressed).
# Any sanitizer report aborts the process (halt_on_error / abort_on_error), so it fails.
# Leak reports from third-party libraries only are suppressed in tests/sanitize/lsan.supp.
# Needs the model (scripts/setup.sh fetches it) and ../shared/data for the smoke.
#   env: ASAN_BUILD_DIR (default build-asan), SMOKE=0 to skip the model smoke
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
BUILD_DIR="${ASAN_BUILD_DIR:-build-asan}"
jobs=$(nproc)
export OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-PASSIVE}"
export ASAN_OPTIONS="detect_leaks=1:abort_on_error=1:halt_on_error=1:detect_stack_use_after_return=1:check_initialization_order=1:strict_init_order=1"
export UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1"
export LSAN_OPTIONS="suppressions=$repo/tests/sanitize/lsan.supp:print_suppressions=0"

mkdir -p "$BUILD_DIR"
cmake -S . -B "$BUILD_DIR" -DCMAKE_BUILD_TYPE=Release -DCMAKE_CXX_FLAGS_RELEASE="-O1 -g1" \
  -DKVCRUNCH_SANITIZE=ON -DKVCRUNCH_BENCH=OFF -DKVCRUNCH_TESTS=ON > "$BUILD_DIR/configure.log" 2>&1 ||
  { cat "$BUILD_DIR/configure.log"; exit 1; }
cmake --build "$BUILD_DIR" -j"$jobs" --target kvc_unit_tests kvcrunch

echo "== sanitized unit tests (ASan + LSan + UBSan)"
# Left out here (run in the plain unit suite): the all-in-bits check of every preset encodes
# 4,096 tokens x 30 layers per preset, and the VQ presets' brute-force search takes ~3 min under ASan.
ctest --test-dir "$BUILD_DIR" -L unit --output-on-failure -j "$jobs" --timeout 900 \
  -E '^RunConfigPreset\.AllInBitsWithinClassAt4096$'


if [[ "${SMOKE:-1}" == 0 ]]; then exit 0; fi
model=models/SmolLM2-135M-Instruct.Q4_1.gguf
text=../shared/data/wikitext-2-raw/wiki.test.raw
[[ -f "$model" && -f "$text" ]] || { echo "sanitize: $model or $text missing" >&2; exit 1; }
echo "== sanitized model smoke: perplexity -c 128 --chunks 1 -b 32 per codec family"
smoke=(
  "-ctk f16 -ctv f16"
  "-ctk bf16 -ctv f32"
  "-ctk q8_0 -ctv q8_0"
  "-ctk q4_0 -ctv q4_1"
  "-ctk q5_0 -ctv q5_0:rot=0"
  "-ctk fp8 -ctv fp8"
  "-ctk kivi:bits=2,group=32,residual=32 -ctv kivi:bits=4,group=32,residual=32"
  "-ctk turbo3 -ctv turbo:bits=4,variant=prod"
  "-ctk qjl -ctv f16"
  "-ctk polar -ctv polar"
  "-ctk kvquant3 -ctv kvquant4 --kv-sinks 1"
  "-ctk q8_0 -ctv q8_0 --kv-transform-k hadamard --kv-evict streaming:sink=4,window=60"
)
for s in "${smoke[@]}"; do
  # shellcheck disable=SC2086
  out=$("$BUILD_DIR/kvcrunch" perplexity -m "$model" -f "$text" -c 128 --chunks 1 -b 32 -t 2 $s 2>&1) ||
    { echo "$out"; echo "sanitize: FAILED: perplexity $s" >&2; exit 1; }
  echo "  $s: $(grep -o 'ppl = [0-9.]*' <<<"$out")"
done
echo "sanitize: no sanitizer reports"
