# Sourced by run.sh and soak.sh: venv set-up, server start/stop (loopback only), KV sizing.
# shellcheck shell=bash

SERVE_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$SERVE_DIR/../.." && pwd)"
MODEL="${MODEL:-$ROOT/models/SmolLM2-135M-Instruct.Q4_1.gguf}"
THREADS="${THREADS:-2}"
SERVE_BENCH_VENV="${SERVE_BENCH_VENV:-$HOME/.cache/kvcrunch-serve-bench-venv}"
PEERS_DIR="${PEERS_DIR:-$HOME/.cache/kvcrunch-peers}"
LLAMA_BIN_DIR="${LLAMA_BIN_DIR:-$PEERS_DIR/llama-server/bin}"
KVCRUNCH_BIN="${KVCRUNCH_BIN:-$ROOT/${BUILD_DIR:-build}/kvcrunch}"
HEALTH_TIMEOUT_S="${HEALTH_TIMEOUT_S:-180}"
# Extra llama-server flags for every llama row. Default "--cache-ram 0": llama-server's host-RAM
# prompt cache (default 8192 MiB) would copy each finished slot's KV into RAM for reuse; this
# benchmark's prompts never repeat, so it cannot help, but it would grow the RSS we compare.
# LLAMA_EXTRA_ARGS= (empty) gives llama-server's defaults.
LLAMA_EXTRA_ARGS="${LLAMA_EXTRA_ARGS---cache-ram 0}"

# OpenMP workers sleep at barriers instead of spinning (as scripts/test.sh does): on a machine
# whose cores are shared, spinning llama-server decoded 5.6 tok/s instead of 62 (one sequence,
# load average ~5 on 2 cores). Applies to every server the benchmark starts; override by setting it.
export OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-PASSIVE}"

# SmolLM2-135M: 30 layers x 3 KV heads x head_dim 64
N_LAYER=30; N_KV_HEAD=3; HEAD_DIM=64

PY=""
setup_venv() {
  # Pinned client deps (requirements.txt) in their own venv; idempotent.
  local vpy="$SERVE_BENCH_VENV/bin/python"
  if [[ -x "$vpy" ]] && "$vpy" -c 'import importlib.metadata as m, sys; sys.exit(m.version("aiohttp") != "3.14.5")' 2>/dev/null; then
    PY="$vpy"; return 0
  fi
  echo "setting up $SERVE_BENCH_VENV (pinned aiohttp)" >&2
  python3 -m venv "$SERVE_BENCH_VENV"
  "$vpy" -m pip install -q --disable-pip-version-check -r "$SERVE_DIR/requirements.txt" >&2
  PY="$vpy"
}

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()'
}

SERVER_PID=""
stop_server() {
  [[ -n "$SERVER_PID" ]] || return 0
  if kill -0 "$SERVER_PID" 2>/dev/null; then
    kill -TERM "$SERVER_PID" 2>/dev/null || true
    local i
    for i in $(seq 1 50); do kill -0 "$SERVER_PID" 2>/dev/null || break; sleep 0.2; done
    kill -0 "$SERVER_PID" 2>/dev/null && kill -KILL "$SERVER_PID" 2>/dev/null || true
  fi
  wait "$SERVER_PID" 2>/dev/null || true
  SERVER_PID=""
}
trap 'stop_server' EXIT
trap 'stop_server; exit 130' INT TERM

# start_server LOG CMD... : starts CMD in the background (its own PID is the server), waits for
# GET /health == 200 on $PORT (bounded by HEALTH_TIMEOUT_S). Returns 1 if it died or timed out.
start_server() {
  local log="$1"; shift
  echo "\$ $*" >"$log"
  "$@" >>"$log" 2>&1 &
  SERVER_PID=$!
  local t0=$SECONDS
  while (( SECONDS - t0 < HEALTH_TIMEOUT_S )); do
    if ! kill -0 "$SERVER_PID" 2>/dev/null; then
      wait "$SERVER_PID" 2>/dev/null; local rc=$?
      echo "server exited (rc $rc) before /health was ok; last lines of $log:" >&2
      tail -n 25 "$log" >&2
      SERVER_PID=""
      return 1
    fi
    if [[ "$(curl -s -o /dev/null -w '%{http_code}' --max-time 2 "http://127.0.0.1:$PORT/health")" == "200" ]]; then
      return 0
    fi
    sleep 0.5
  done
  echo "server not healthy after ${HEALTH_TIMEOUT_S} s (log: $log)" >&2
  stop_server
  return 1
}

# kv_sizing BUDGET SEQ_LEN TYPE -> "ctx slots bytes bytes_per_token"
kv_sizing() {
  python3 - "$@" "$N_LAYER" "$N_KV_HEAD" "$HEAD_DIM" <<'EOF'
import os, sys
sys.path.insert(0, os.environ["SERVE_DIR"])
import benchlib as bl
budget, seq, typ, nl, nh, hd = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], *map(int, sys.argv[4:7])
bpt = bl.kv_bytes_per_token(nl, nh, hd, typ, typ)
s = bl.llamacpp_sizing(budget, seq, bpt)
print(s["ctx"], s["slots"], s["kv_bytes"], int(bpt) if bpt == int(bpt) else bpt)
EOF
}
export SERVE_DIR
