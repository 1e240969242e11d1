#!/usr/bin/env bash
# Soak test (by hand, not in CI): one server configuration, 64 closed-loop clients for a bounded
# 10 minutes; the server's RSS is sampled every few seconds. Reports whether RSS stays flat
# (mean of the first minute vs the last minute) and any failed requests.
#
# Usage: bash bench/serve/soak.sh [--config llama-f16|llama-q4_0|kvcrunch-LABEL] [--minutes 10]
#          [--clients 64] [--workload prefill-heavy] [--num-requests 1500] [--tolerance-pct 5]
#          [--out DIR]
# The budget and server command lines are run.sh's (same KVCRUNCH_CMD / KVCRUNCH_CONFIGS).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

config=llama-f16; minutes=10; clients=64; wl=prefill-heavy; nreq=1500; tol=5
out="$ROOT/out/serve-soak/$(date -u +%Y%m%dT%H%M%SZ)"
while (( $# )); do
  case "$1" in
    --config) config="$2"; shift ;; --minutes) minutes="$2"; shift ;; --clients) clients="$2"; shift ;;
    --workload) wl="$2"; shift ;; --num-requests) nreq="$2"; shift ;; --tolerance-pct) tol="$2"; shift ;;
    --out) out="$2"; shift ;;
    -h|--help) sed -n 2,10p "$0"; exit 0 ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
  shift
done
setup_venv
mkdir -p "$out"
# run.sh does the sizing and launching; a soak is one run.sh configuration with other load flags
bash "$SERVE_DIR/run.sh" --workload "$wl" --configs "$config" --out "$out" \
  --concurrency "$clients" --num-requests "$nreq" --max-duration "$(( minutes * 60 ))" >/dev/null
json="$out/$wl.$config.json"
[[ -f "$json" ]] || { echo "no result ($json); see $out" >&2; exit 1; }
"$PY" - "$json" "$tol" <<'EOF'
import json, sys
r = json.load(open(sys.argv[1])); tol = float(sys.argv[2])
s, x = r["summary"], r["extra"]
f = x.get("rss_flatness")
print(f"soak {r['label']}: {s['duration_s']:.0f} s, {s['completed']} completed, {s['failed']} failed "
      f"(outcomes {s['outcomes']}), {x['max_in_flight_client']} client requests in flight at most")
if f:
    flat = abs(f["growth_pct"]) <= tol
    print(f"RSS: first {f['window_s']:.0f} s mean {f['first_mean_bytes']/2**20:.1f} MiB, last {f['window_s']:.0f} s "
          f"mean {f['last_mean_bytes']/2**20:.1f} MiB ({f['growth_pct']:+.2f} %), max {f['max_bytes']/2**20:.1f} MiB, "
          f"VmHWM {(x['peak_rss_bytes'] or 0)/2**20:.1f} MiB over {f['samples']} samples -> "
          f"{'FLAT' if flat else 'NOT FLAT'} (tolerance {tol} %)")
else:
    print("RSS: too few samples")
sys.exit(0 if (s["failed"] == 0 and f and abs(f["growth_pct"]) <= tol) else 1)
EOF
