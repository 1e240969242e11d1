#!/usr/bin/env bash
# Builds the Python package from source into the pinned venvs (python/scripts/setup_venv.sh) and
# runs python/tests: all of them under the newest transformers, and the transformers/kvpress
# tests again under transformers 4.57 + kvpress. Needs build/kvcrunch (the CLI comparisons and
# the server client test) and the test model. About 4 min to build cold on 2 cores (a rebuild
# is incremental: python/build/), 6-8 min of tests.
#   env: BUILD_DIR (default build), KVC_PY_VENV, KVC_PY_VENV_TF4, PYTEST_ARGS
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$repo"
V1="${KVC_PY_VENV:-$HOME/.cache/kvcrunch-py-venv}"
V2="${KVC_PY_VENV_TF4:-$HOME/.cache/kvcrunch-py-venv-tf4}"
export KVCRUNCH_BIN="${KVCRUNCH_BIN:-$repo/${BUILD_DIR:-build}/kvcrunch}"
export OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-PASSIVE}"
t0=$SECONDS
echo "== python: pip install ./python"
"$V1/bin/pip" install -q --no-build-isolation ./python
echo "   built in $((SECONDS - t0)) s"
cd python/tests  # not python/: the source tree's kvcrunch/ has no _core and must not shadow the install
echo "== python: tests, transformers $("$V1/bin/python" -c 'import transformers; print(transformers.__version__)')"
"$V1/bin/python" -m pytest -q -p no:cacheprovider ${PYTEST_ARGS:-} .
echo "== python: transformers/kvpress tests, transformers $("$V2/bin/python" -c 'import transformers; print(transformers.__version__)')"
"$V2/bin/python" -m pytest -q -p no:cacheprovider ${PYTEST_ARGS:-} test_hf.py test_kvpress.py
echo "== python: passed in $((SECONDS - t0)) s"
