#!/usr/bin/env bash
# The test command (README, .ci/run): set-up (idempotent), build, then
#   1. unit tests (no model; seconds)            ctest -L unit
#   1b. redis tests (ctest -L redis): src/store against throw-away Redis servers (scripts/redis.sh)
#   2. model tests (real SmolLM2 GGUF)           ctest -L model, which includes the forward pass
#      vs the independent numpy reference (tests/reference/check_forward.py), the CLI
#      bad-input cases (tests/cli/bad_input_test.sh) and `kvcrunch serve` end to end
#      (tests/server/test_server.py: a real server on a loopback port, the OpenAI client)
#   3. the Python package (python/scripts/test.sh; KVCRUNCH_PYTHON=0 skips)
# Exit status is non-zero if anything fails.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
# OpenMP threads sleep instead of spinning at barriers: spinning collapses throughput when the
# cores are shared (tests run in parallel; see tools/cli/main.cc). Override by setting it.
export OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-PASSIVE}"
bash scripts/setup.sh
BUILD_DIR="${BUILD_DIR:-build}"
jobs=$(nproc)
echo "== unit tests"
ctest --test-dir "$BUILD_DIR" -L unit --output-on-failure -j "$jobs" --timeout 300
echo "== redis tests (KV store tier + KV events; real Redis servers started by the ctest fixture)"
ctest --test-dir "$BUILD_DIR" -L redis --output-on-failure -j "$jobs" --timeout 300
echo "== model tests"
ctest --test-dir "$BUILD_DIR" -L model --output-on-failure --timeout 1200
# Python package (python/, docs/python.md): built from source, tested under two transformers versions.
if [[ "${KVCRUNCH_PYTHON:-1}" != 0 ]]; then
  echo "== python package"
  BUILD_DIR="$BUILD_DIR" bash python/scripts/test.sh
fi
