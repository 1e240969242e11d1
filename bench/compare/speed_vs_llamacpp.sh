#!/usr/bin/env bash
# Speed side by side in one run: kvcrunch vs llama.cpp (llama-cpp-python), same GGUF, same
# protocol (pp512 from an empty cache; tg128 after a 512-token context; median of 3 after a
# warm-up), same thread count. Prints both and the ratios. Run on an otherwise idle machine.
#   bash bench/compare/speed_vs_llamacpp.sh [threads]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
T="${1:-2}"
M=models/SmolLM2-135M-Instruct.Q4_1.gguf
BIN="${BUILD_DIR:-build}/kvcrunch"
python3 -c "import llama_cpp" 2>/dev/null || bash bench/compare/install_peers.sh
ours=$("$BIN" bench -m "$M" -t "$T" -p 512 -n 128 --depth 512 -r 3 --json)
tmp=$(mktemp)
python3 bench/compare/llamacpp_speed.py -m "$M" -t "$T" -p 512 -n 128 -d 512 -r 3 --json "$tmp" >/dev/null
theirs=$(cat "$tmp"); rm -f "$tmp"
python3 - "$ours" "$theirs" <<'PY'
import json, sys
o, t = json.loads(sys.argv[1]), json.loads(sys.argv[2])
def g(d, *ks):
    for k in ks:
        if k in d: return d[k]
    raise KeyError(ks)
opp, otg = o["pp_tokens_per_second"], o["tg_tokens_per_second"]
tpp = g(t, "pp512_tps")
ttg = g(t, "tg128_at_d512_tps")
print(f"kvcrunch : pp512 {opp:8.1f} t/s   tg128@d512 {otg:7.1f} t/s   peak RSS {o['peak_rss_bytes']/2**20:.1f} MiB  KV {o['kv_bytes']} B")
print(f"llama.cpp: pp512 {tpp:8.1f} t/s   tg128@d512 {ttg:7.1f} t/s")
print(f"ratio    : pp {opp/tpp:.2f}x (target >= 0.5)   tg {otg/ttg:.2f}x (target >= 1.0)")
print(f"RSS budget: GGUF {o['gguf_bytes']/2**20:.1f} MiB + KV {o['kv_bytes']/2**20:.1f} MiB + 100 MiB = "
      f"{(o['gguf_bytes']+o['kv_bytes'])/2**20+100:.1f} MiB")
PY
