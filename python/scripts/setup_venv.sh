#!/usr/bin/env bash
# Installs the Python package's pinned test environment once (idempotent; a stamp holds the hash
# of the requirements, so a rerun with unchanged pins does nothing):
#   $KVC_PY_VENV      (default ~/.cache/kvcrunch-py-venv):     requirements-hf.txt (torch, newest transformers)
#   $KVC_PY_VENV_TF4  (default ~/.cache/kvcrunch-py-venv-tf4): requirements-kvpress.txt (transformers 4.57,
#                     kvpress), seeing the first venv's packages through a .pth file (torch once).
# Called by scripts/setup.sh. env: PYTHON (python3 >= 3.10).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-python3}"
V1="${KVC_PY_VENV:-$HOME/.cache/kvcrunch-py-venv}"
V2="${KVC_PY_VENV_TF4:-$HOME/.cache/kvcrunch-py-venv-tf4}"
export PIP_DISABLE_PIP_VERSION_CHECK=1

# Debian's python3 needs python3-venv (ensurepip) and python3-dev (Python.h for the extension).
sudo_() { if [[ $(id -u) -eq 0 ]]; then "$@"; else sudo "$@"; fi; }
need=()
"$PY" -c 'import ensurepip' 2>/dev/null || need+=(python3-venv)
"$PY" -c 'import sysconfig, os, sys; sys.exit(not os.path.isfile(os.path.join(sysconfig.get_paths()["include"], "Python.h")))' || need+=(python3-dev)
if (( ${#need[@]} )); then
  echo "setup_venv: apt-get install ${need[*]}"
  DEBIAN_FRONTEND=noninteractive sudo_ apt-get install -y -q --no-install-recommends "${need[@]}"
fi

install() {  # venv requirements
  local v="$1" req="$2" stamp="$1/.kvcrunch-req.sha256" want
  want="$(sha256sum "$req" | cut -d' ' -f1)"
  if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
    echo "setup_venv: $v up to date"
    return
  fi
  [[ -x "$v/bin/python" ]] || "$PY" -m venv "$v"
  echo "setup_venv: pip install -r $req into $v"
  local t0=$SECONDS
  "$v/bin/pip" install -q -r "$req"
  echo "$want" > "$stamp"
  echo "setup_venv: $v installed in $((SECONDS - t0)) s"
}

install "$V1" "$here/requirements-hf.txt"
[[ -x "$V2/bin/python" ]] || "$PY" -m venv "$V2"
site1="$("$V1/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
site2="$("$V2/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
echo "$site1" > "$site2/zz_kvcrunch_base.pth"
install "$V2" "$here/requirements-kvpress.txt"
