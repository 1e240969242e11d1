#!/usr/bin/env bash
# Throw-away Redis servers for tests and benchmarks: loopback only, free ports, a temporary
# directory, no persistence, an LRU memory cap (the settings docs/store.md recommends for a KV tier).
#
#   scripts/redis.sh start standalone DIR [MAXMEMORY]   one server; its port goes to DIR/port
#   scripts/redis.sh start cluster DIR [MAXMEMORY]      3 masters (no replicas); DIR/ports "P1 P2 P3"
#   scripts/redis.sh start both DIR [MAXMEMORY]         DIR/standalone/ and DIR/cluster/ (ctest fixture)
#   scripts/redis.sh stop DIR                           shuts down every server started under DIR,
#                                                       removes DIR (no-op if absent)
#   scripts/redis.sh kill DIR                           SIGKILL the servers under DIR, keep DIR
#                                                       (tests: "Redis died"); restart with `resume`
#   scripts/redis.sh resume DIR                         restart killed standalone server, same port
# MAXMEMORY defaults to 256mb (per server). Needs redis-server and redis-cli (Debian: redis-server).
# Exit status: 0 on success; 1 with a message when a server does not come up within ~10 s.
set -euo pipefail

die() { echo "redis.sh: $*" >&2; exit 1; }
command -v redis-server >/dev/null || die "redis-server not found (apt-get install redis-server)"
command -v redis-cli >/dev/null || die "redis-cli not found (apt-get install redis-tools)"

# N free loopback ports whose cluster-bus port (+10000) is free too, from the kernel (bind port 0).
free_ports() {
  python3 - "$1" <<'PY'
import socket, sys
n, out, held = int(sys.argv[1]), [], []
while len(out) < n:
    s = socket.socket(); s.bind(("127.0.0.1", 0)); p = s.getsockname()[1]; held.append(s)
    if p + 10000 > 65535 or p in out:
        continue
    try:
        b = socket.socket(); b.bind(("127.0.0.1", p + 10000)); b.close()
    except OSError:
        continue
    out.append(p)
print(" ".join(map(str, out)))
PY
}

wait_ping() {  # port
  for _ in $(seq 100); do
    [[ "$(redis-cli -h 127.0.0.1 -p "$1" ping 2>/dev/null)" == PONG ]] && return 0
    sleep 0.1
  done
  return 1
}

# start_server DIR PORT MAXMEMORY [extra args...]
start_server() {
  local dir=$1 port=$2 mem=$3
  shift 3
  redis-server --port "$port" --bind 127.0.0.1 --protected-mode yes --dir "$dir" \
    --daemonize yes --pidfile "$dir/redis-$port.pid" --logfile "$dir/redis-$port.log" \
    --save '' --appendonly no --maxmemory "$mem" --maxmemory-policy allkeys-lru "$@" \
    || die "redis-server on port $port failed to start"
  wait_ping "$port" || { tail -5 "$dir/redis-$port.log" >&2 || true; die "port $port: no PONG"; }
  echo "$port $mem $*" >> "$dir/servers"
}

start_standalone() {
  local dir=$1 mem=${2:-256mb}
  mkdir -p "$dir"
  local port
  port=$(free_ports 1)
  start_server "$dir" "$port" "$mem"
  echo "$port" > "$dir/port"
  echo "redis.sh: standalone on 127.0.0.1:$port ($dir)"
}

start_cluster() {
  local dir=$1 mem=${2:-256mb}
  mkdir -p "$dir"
  local ports p addrs=()
  ports=$(free_ports 3)
  for p in $ports; do
    start_server "$dir" "$p" "$mem" --cluster-enabled yes --cluster-config-file "nodes-$p.conf" \
      --cluster-node-timeout 5000 --cluster-require-full-coverage no
    addrs+=("127.0.0.1:$p")
  done
  redis-cli --cluster create "${addrs[@]}" --cluster-replicas 0 --cluster-yes > "$dir/create.log" 2>&1 \
    || { cat "$dir/create.log" >&2; die "redis-cli --cluster create failed"; }
  for p in $ports; do
    local ok=0
    for _ in $(seq 100); do
      if redis-cli -h 127.0.0.1 -p "$p" cluster info 2>/dev/null | grep -q 'cluster_state:ok'; then
        ok=1; break
      fi
      sleep 0.1
    done
    (( ok )) || die "cluster node $p not ok"
  done
  echo "$ports" > "$dir/ports"
  echo "redis.sh: cluster on 127.0.0.1 ports $ports ($dir)"
}

stop_dir() {
  local dir=$1 f pid
  [[ -d "$dir" ]] || return 0
  while IFS= read -r f; do
    pid=$(cat "$f" 2>/dev/null || true)
    [[ -n "$pid" ]] && kill -TERM "$pid" 2>/dev/null || true
  done < <(find "$dir" -name 'redis-*.pid')
  # Wait (<= 5 s) for them to exit, then SIGKILL what is left.
  for _ in $(seq 50); do
    local alive=0
    while IFS= read -r f; do
      pid=$(cat "$f" 2>/dev/null || true)
      [[ -n "$pid" ]] && kill -0 "$pid" 2>/dev/null && alive=1
    done < <(find "$dir" -name 'redis-*.pid')
    (( alive )) || break
    sleep 0.1
  done
  while IFS= read -r f; do
    pid=$(cat "$f" 2>/dev/null || true)
    [[ -n "$pid" ]] && kill -KILL "$pid" 2>/dev/null || true
  done < <(find "$dir" -name 'redis-*.pid')
}

cmd=${1:-}
case "$cmd" in
  start)
    kind=${2:-}; dir=${3:-}; mem=${4:-256mb}
    [[ -n "$dir" ]] || die "usage: redis.sh start standalone|cluster|both DIR [MAXMEMORY]"
    case "$kind" in
      standalone) start_standalone "$dir" "$mem" ;;
      cluster) start_cluster "$dir" "$mem" ;;
      both)
        stop_dir "$dir"; rm -rf "$dir"
        start_standalone "$dir/standalone" "$mem"
        start_cluster "$dir/cluster" "$mem" ;;
      *) die "unknown kind '$kind' (standalone|cluster|both)" ;;
    esac ;;
  stop)
    dir=${2:-}; [[ -n "$dir" ]] || die "usage: redis.sh stop DIR"
    stop_dir "$dir"; rm -rf "$dir" ;;
  kill)
    dir=${2:-}; [[ -n "$dir" ]] || die "usage: redis.sh kill DIR"
    while IFS= read -r f; do
      pid=$(cat "$f" 2>/dev/null || true)
      [[ -n "$pid" ]] && kill -KILL "$pid" 2>/dev/null || true
      rm -f "$f"
    done < <(find "$dir" -name 'redis-*.pid')
    sleep 0.1 ;;
  resume)
    dir=${2:-}; [[ -f "$dir/servers" ]] || die "usage: redis.sh resume DIR (a standalone dir)"
    read -r port mem < <(head -1 "$dir/servers")
    mv "$dir/servers" "$dir/servers.old"
    start_server "$dir" "$port" "$mem" ;;
  *) die "usage: redis.sh start|stop|kill|resume ... (see the header)" ;;
esac
