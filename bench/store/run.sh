#!/usr/bin/env bash
# RedisTier GET/SET throughput on loopback next to redis-benchmark, same Redis, same value sizes,
# same client count and key space, in one run. Starts its own Redis (scripts/redis.sh: no
# persistence, allkeys-lru) and stops it at the end.
#
#   bench/store/run.sh [BUILD_DIR]        env: SIZES ("262144 1048576 4194304"), CLIENTS (4),
#                                              OPS (per client, 200), KEYS (64), MAXMEMORY (2gb)
# Output: one table, GB/s = value bytes / s / 1e9 (request overhead not counted on either side).
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
build="${1:-$repo/build}"
bench="$build/store_bench"
[[ -x "$bench" ]] || { echo "run.sh: $bench missing (cmake --build $build --target store_bench)" >&2; exit 1; }
command -v redis-benchmark >/dev/null || { echo "run.sh: redis-benchmark missing (apt-get install redis-tools)" >&2; exit 1; }
SIZES="${SIZES:-262144 1048576 4194304}"
CLIENTS="${CLIENTS:-4}"
OPS="${OPS:-200}"
KEYS="${KEYS:-64}"
dir="$(mktemp -d /tmp/kvc-store-bench-XXXXXX)"
trap 'bash "$repo/scripts/redis.sh" stop "$dir" >/dev/null 2>&1 || true' EXIT
bash "$repo/scripts/redis.sh" start standalone "$dir" "${MAXMEMORY:-2gb}" >/dev/null
port="$(cat "$dir/port")"
echo "redis-server $(redis-server --version | sed -n 's/.*v=\([^ ]*\).*/\1/p') on 127.0.0.1:$port, $(nproc) cores," \
     "$CLIENTS clients, $OPS ops/client, $KEYS keys"
printf '%-9s %-4s %14s %14s %12s %12s %7s\n' size op "redis-bench/s" "RedisTier/s" "redis GB/s" "tier GB/s" ratio
for size in $SIZES; do
  n=$((OPS * CLIENTS))
  # redis-benchmark: -r KEYS random keys, -d value size; SET first so GET reads real values.
  rb="$(redis-benchmark -h 127.0.0.1 -p "$port" -c "$CLIENTS" -n "$n" -r "$KEYS" -d "$size" -t set,get -q 2>/dev/null \
        | tr '\r' '\n' | grep -E '^(SET|GET):' | sed -E 's/^(SET|GET): ([0-9.]+) requests per second.*/\1 \2/')"
  tb="$("$bench" --url "redis://127.0.0.1:$port" --size "$size" --threads "$CLIENTS" --ops "$OPS" --keys "$KEYS")"
  for op in SET GET; do
    r="$(awk -v op=$op '$1==op {print $2}' <<<"$rb")"
    t="$(awk -v op=$op '$1==op {print $6}' <<<"$tb")"
    awk -v s="$size" -v op="$op" -v r="${r:-0}" -v t="${t:-0}" 'BEGIN {
      rg = r * s / 1e9; tg = t * s / 1e9;
      printf "%-9s %-4s %14.1f %14.1f %12.3f %12.3f %7.2f\n", s, op, r, t, rg, tg, (rg > 0 ? tg / rg : 0) }'
  done
  redis-cli -h 127.0.0.1 -p "$port" flushall >/dev/null
done
