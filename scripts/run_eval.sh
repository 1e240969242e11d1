#!/usr/bin/env bash
# The main job: set-up (idempotent), then `kvcrunch eval` on SmolLM2-135M and WikiText-2 (real
# text from ../shared/data), every registered codec against the f16 cache; writes the table to
# stdout and a markdown report + plot to out/eval/. Extra arguments go to `kvcrunch eval`.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
bash scripts/setup.sh
BUILD_DIR="${BUILD_DIR:-build}"
# -t defaults to every core unless the caller passes its own -t/--threads.
threads=(-t "$(nproc)")
for a in "$@"; do case "$a" in -t|--threads|-t*|--threads=*) threads=();; esac; done
"$BUILD_DIR/kvcrunch" eval "${threads[@]}" --report out/eval "$@"
