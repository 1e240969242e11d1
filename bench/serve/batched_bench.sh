#!/usr/bin/env bash
# Batched-decode scaling of llama.cpp (llama-batched-bench, built by
# bench/compare/build_llama_server.sh): B independent sequences, each a 512-token prompt
# (decoded in one batch) then 128 generated tokens, decoded together one token per sequence
# per step. Prints llama.cpp's own rows and the scaling ratio S_TG(B)/S_TG(1) against the
# issue's target: aggregate decode tokens/s at 16 sequences >= 3x the single-sequence rate.
#
# Usage: bash bench/serve/batched_bench.sh [--types f16,q4_0] [--npl 1,2,4,8,16] [--npp 512]
#          [--ntg 128] [--out DIR]
# (kvcrunch's side of this measurement belongs to the batched engine; not here yet.)
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

types=f16,q4_0; npl=1,2,4,8,16; npp=512; ntg=128
out="$ROOT/out/serve-batched/$(date -u +%Y%m%dT%H%M%SZ)"
while (( $# )); do
  case "$1" in
    --types) types="$2"; shift ;; --npl) npl="$2"; shift ;; --npp) npp="$2"; shift ;;
    --ntg) ntg="$2"; shift ;; --out) out="$2"; shift ;;
    -h|--help) sed -n 2,10p "$0"; exit 0 ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
  shift
done
bb="$LLAMA_BIN_DIR/llama-batched-bench"
[[ -x "$bb" ]] || { echo "no $bb (bash bench/compare/install_peers.sh --only llama-server)" >&2; exit 1; }
[[ -f "$MODEL" ]] || { echo "no model at $MODEL" >&2; exit 1; }
mkdir -p "$out"
max_pl=$(tr , '\n' <<<"$npl" | sort -n | tail -1)
ctx=$(( max_pl * (npp + ntg) ))

IFS=, read -r -a type_list <<<"$types"
for t in "${type_list[@]}"; do
  cmd=("$bb" -m "$MODEL" -c "$ctx" -b 2048 -ub 512 -npp "$npp" -ntg "$ntg" -npl "$npl"
       -fa on -ctk "$t" -ctv "$t" -t "$THREADS" --output-format jsonl)
  echo "\$ ${cmd[*]}" | tee "$out/$t.cmd" >&2
  # bounded: 20 minutes per cache type at most
  timeout 1200 "${cmd[@]}" >"$out/$t.jsonl" 2>"$out/$t.log" || {
    echo "llama-batched-bench failed for $t (log: $out/$t.log)" >&2; tail -n 20 "$out/$t.log" >&2; exit 1; }
done

python3 - "$out" "${type_list[@]}" <<'EOF'
import json, os, sys
out, types = sys.argv[1], sys.argv[2:]
print(f"| cache | B | N_KV | S_PP t/s | S_TG t/s | S_TG / S_TG(B=1) | S t/s |")
print("| --- | --- | --- | --- | --- | --- | --- |")
verdicts = []
for t in types:
    rows = []
    for path in (os.path.join(out, f"{t}.jsonl"), os.path.join(out, f"{t}.log")):
        for line in open(path):
            line = line.strip()
            if line.startswith("{") and '"speed_tg"' in line:
                rows.append(json.loads(line))
        if rows:
            break
    base = next((r["speed_tg"] for r in rows if r["pl"] == 1), None)
    for r in rows:
        ratio = r["speed_tg"] / base if base else float("nan")
        print(f"| {t} | {r['pl']} | {r['n_kv']} | {r['speed_pp']:.1f} | {r['speed_tg']:.1f} | {ratio:.2f}x | {r['speed']:.1f} |")
    r16 = next((r for r in rows if r["pl"] == 16), None)
    if r16 and base:
        x = r16["speed_tg"] / base
        verdicts.append(f"{t}: S_TG at B=16 = {x:.2f}x B=1 ({'meets' if x >= 3 else 'below'} the 3x target)")
print()
for v in verdicts:
    print("- " + v)
EOF
echo "raw output: $out" >&2
