#!/usr/bin/env bash
# Perplexity side by side in one run: kvcrunch vs llama.cpp (llama-cpp-python), same GGUF, same
# text, same protocol (llama-perplexity's: chunks of C tokens from an empty cache, second half
# scored), same -c / --chunks / KV cache types / threads. For each KV type it runs
#   ours  : $BIN perplexity -m M -f F -c C --chunks N -t T -b C -ctk SPEC -ctv SPEC --json
#   theirs: python3 bench/compare/llamacpp_perplexity.py -m M -f F -c C --chunks N -t T \
#             -ctk TYPE -ctv TYPE [--no-attn-rot] --json PATH
# and prints one markdown table: ppl each side (llama.cpp's +/- standard error), difference %,
# each side's delta vs its own f16, and the paired standard error of llama.cpp's delta (from its
# per-token NLLs: se of mean(nll_type - nll_f16), times ppl) as the noise scale of a delta.
# Both sides evaluate one chunk per batch (-b C; n_batch = n_ubatch = C); ours is batch-invariant.
#
# Rotation: llama.cpp (PR #21038, in what llama-cpp-python 0.3.36 vendors) Hadamard-rotates any
# quantized K/V cache whose head dim is a multiple of 64 -- q8_0 AND q4_0 here (head dim 64).
# Its kill switch LLAMA_ATTN_ROT_DISABLE=1 (--no-attn-rot) gives plain ggml blocks. Ours: q4_0 is
# rotated by default (q4_0 = q4_0:rot=1), q8_0 is not (q8_0:rot=1 rotates). Rows pair like with
# like: rotated with rotated, plain with plain. The llama.cpp JSON records what its context really
# used (n_ctx/n_batch/n_ubatch, flash_attn, K/V types, attn_rot_k/v from its own log); the table
# refuses a row whose llama.cpp context does not match (n_ubatch < C, no flash attention, wrong
# cache type or rotation).
#
#   bash bench/compare/ppl_side_by_side.sh [-c 4096] [--chunks 2] [-t 1] [--out DIR] [--reuse]
#   bash bench/compare/ppl_side_by_side.sh --table-only --out DIR      # re-print from the JSONs
# BUILD_DIR (default build) picks the kvcrunch binary. Run on an otherwise idle machine if you
# also care about the tokens/s in the JSONs; the perplexities do not depend on load.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
C=4096; N=2; T=1; OUT=""; REUSE=0; TABLE_ONLY=0
M=models/SmolLM2-135M-Instruct.Q4_1.gguf
F=../shared/data/wikitext-2-raw/wiki.test.raw
while (( $# )); do
  case "$1" in
    -c) C="$2"; shift ;;
    --chunks) N="$2"; shift ;;
    -t) T="$2"; shift ;;
    -m) M="$2"; shift ;;
    -f) F="$2"; shift ;;
    --out) OUT="$2"; shift ;;
    --reuse) REUSE=1 ;;
    --table-only) TABLE_ONLY=1 ;;
    *) echo "usage: $0 [-c C] [--chunks N] [-t T] [-m GGUF] [-f TEXT] [--out DIR] [--reuse] [--table-only]" >&2; exit 2 ;;
  esac
  shift
done
OUT="${OUT:-out/ppl_side_by_side/c${C}_n${N}}"
BIN="${BUILD_DIR:-build}/kvcrunch"
export OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-PASSIVE}"
mkdir -p "$OUT"

# name | our spec | llama.cpp type | llama.cpp extra flag
ROWS=(
  "f16|f16|f16|"
  "q8_0 rotated|q8_0:rot=1|q8_0|"
  "q8_0 plain|q8_0|q8_0|--no-attn-rot"
  "q4_0 rotated|q4_0|q4_0|"
  "q4_0 plain|q4_0:rot=0|q4_0|--no-attn-rot"
)
slug() { echo "$1" | tr ' :=' '___'; }

if (( ! TABLE_ONLY )); then
  [[ -x "$BIN" ]] || { echo "no $BIN (set BUILD_DIR)" >&2; exit 1; }
  python3 -c "import llama_cpp" 2>/dev/null || bash bench/compare/install_peers.sh --only llama
  {
    echo "date: $(date -u +%FT%TZ)"
    echo "cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ //'), $(nproc) cores"
    echo "uptime before: $(uptime)"
    echo "kvcrunch: $BIN (git $(git rev-parse --short HEAD 2>/dev/null || echo ?))"
    echo "llama-cpp-python: $(python3 -c 'import llama_cpp; print(llama_cpp.__version__)')"
    echo "command: bash bench/compare/ppl_side_by_side.sh -c $C --chunks $N -t $T"
  } > "$OUT/machine.txt"
  for row in "${ROWS[@]}"; do
    IFS='|' read -r name ours theirs flag <<<"$row"
    s=$(slug "$name")
    if (( ! REUSE )) || [[ ! -s "$OUT/ours_$s.json" ]]; then
      echo "[$(date +%T)] kvcrunch  $name: -ctk $ours -ctv $ours" >&2
      "$BIN" perplexity -m "$M" -f "$F" -c "$C" --chunks "$N" -t "$T" \
        -b "$C" -ctk "$ours" -ctv "$ours" --json > "$OUT/ours_$s.json" 2> "$OUT/ours_$s.log"
    fi
    if (( ! REUSE )) || [[ ! -s "$OUT/llamacpp_$s.json" ]]; then
      echo "[$(date +%T)] llama.cpp $name: -ctk $theirs -ctv $theirs $flag" >&2
      # shellcheck disable=SC2086
      python3 bench/compare/llamacpp_perplexity.py -m "$M" -f "$F" -c "$C" --chunks "$N" \
        -t "$T" -ctk "$theirs" -ctv "$theirs" $flag --json "$OUT/llamacpp_$s.json" \
        > "$OUT/llamacpp_$s.log" 2>&1
    fi
  done
  echo "uptime after: $(uptime)" >> "$OUT/machine.txt"
fi

python3 - "$OUT" "$C" "${ROWS[@]}" <<'PY'
import json, math, os, sys
out, C, rows = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
def slug(n): return n.replace(" ", "_").replace(":", "_").replace("=", "_")
def load(p):
    with open(p) as f: return json.load(f)
R = []
for row in rows:
    name, ours, theirs, flag = row.split("|")
    o = load(os.path.join(out, f"ours_{slug(name)}.json"))
    t = load(os.path.join(out, f"llamacpp_{slug(name)}.json"))
    L = t.get("llama_log", {})
    want_rot = 0 if (flag or theirs in ("f16", "f32", "bf16")) else 1
    bad = []
    if L.get("api_n_ctx", 0) < C: bad.append(f"n_ctx {L.get('api_n_ctx')}")
    if L.get("api_n_ubatch", 0) < C:  # several ubatches per chunk: still exact, but not the plan
        bad.append(f"n_ubatch {L.get('api_n_ubatch')} < {C}")
    if L.get("flash_attn") != "enabled": bad.append(f"flash_attn {L.get('flash_attn')}")
    if L.get("kv_cache_k") != theirs or L.get("kv_cache_v") != theirs:
        bad.append(f"cache K={L.get('kv_cache_k')} V={L.get('kv_cache_v')}")
    if L.get("attn_rot_k") != want_rot or L.get("attn_rot_v") != want_rot:
        bad.append(f"attn_rot k={L.get('attn_rot_k')} v={L.get('attn_rot_v')}")
    if o["n_tokens"] != t["n_scored"]: bad.append(f"scored {o['n_tokens']} vs {t['n_scored']}")
    R.append(dict(name=name, ours=ours, theirs=theirs + (" LLAMA_ATTN_ROT_DISABLE=1" if flag else ""),
                  po=o["ppl"], pt=t["ppl"], se=t["ppl_se"], cache=o.get("cache", ""),
                  n=o["n_tokens"], chunks=t["n_chunks"], nll=t.get("nll_per_token"), bad=bad))
f16 = R[0]
print(f"{R[0]['chunks']} chunks x {C} tokens, {R[0]['n']} scored tokens per row; "
      f"llama.cpp +/- = its standard error of ppl.\n")
print("| KV cache | ours (spec) | ours ppl | llama.cpp (type) | llama.cpp ppl | ours vs llama.cpp | "
      "ours Δ vs own f16 | llama.cpp Δ vs own f16 |")
print("|---|---|---|---|---|---|---|---|")
for r in R:
    d = 100 * (r["po"] / r["pt"] - 1)
    do = 100 * (r["po"] / f16["po"] - 1)
    dt = 100 * (r["pt"] / f16["pt"] - 1)
    z = "" if r is f16 else f"{do:+.2f} %"
    zt = "" if r is f16 else f"{dt:+.2f} %"
    if r is not f16 and r["nll"] and f16["nll"] and len(r["nll"]) == len(f16["nll"]):
        dd = [a - b for a, b in zip(r["nll"], f16["nll"])]
        m = sum(dd) / len(dd)
        var = sum((x - m) ** 2 for x in dd) / (len(dd) - 1)
        zt += f" ± {100 * math.exp(m) * math.sqrt(var / len(dd)):.2f}"
    print(f"| {r['name']} | `{r['ours']}` | {r['po']:.4f} | `{r['theirs']}` | "
          f"{r['pt']:.4f} ± {r['se']:.4f} | {d:+.2f} % | {z or '0'} | {zt or '0'} |")
for r in R:
    if r["bad"]:
        print(f"\nWARNING {r['name']}: llama.cpp context not as intended: {'; '.join(r['bad'])}")
PY
