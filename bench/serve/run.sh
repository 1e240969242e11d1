#!/usr/bin/env bash
# Serving benchmark runner: for each workload and server configuration, start the server on a
# free loopback port with the same KV byte budget, wait for /health, drive it with loadgen.py,
# stop it, and print one markdown table (one row per configuration). See README.md.
#
# Usage: bash bench/serve/run.sh [--workload decode-heavy|prefill-heavy|both] [--quick]
#          [--num-requests N] [--concurrency N] [--request-rate R [--burstiness B]]
#          [--configs llama-f16,llama-q4_0,kvcrunch-f16,...] [--slo ttft=MS,tpot=MS]
#          [--max-duration S] [--out DIR]
#
# Budget: 4 sequences of the workload at f16 = 4 x (prompt + output) x 23,040 B (SmolLM2-135M).
#   llama-f16   llama-server -np 4 -c 4*seq_len, -ctk/-ctv f16
#   llama-q4_0  same bytes at 6,480 B/token: -c floor(budget/6480) rounded down to 256 (llama.cpp
#               pads -c up to 256), -np floor(c/seq_len)
#   kvcrunch-*  $KVCRUNCH_CMD with {BUDGET} = the same bytes (rows skipped, with a note, while
#               $KVCRUNCH_BIN has no `serve` subcommand)
# Environment: MODEL, THREADS (2), LLAMA_BIN_DIR, KVCRUNCH_BIN, KVCRUNCH_CMD, KVCRUNCH_CONFIGS,
#   LLAMA_EXTRA_ARGS, SERVE_BENCH_VENV, PG19_DIR.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

# ---- kvcrunch configurations: the lead adds rows here (label|flags) -----------------------------
# {BIN} {MODEL} {PORT} {BUDGET} {THREADS} {FLAGS} are substituted; one line per configuration.
default_kvcrunch_cmd='{BIN} serve -m {MODEL} --host 127.0.0.1 --port {PORT} --kv-budget {BUDGET} -t {THREADS} {FLAGS}'
KVCRUNCH_CMD="${KVCRUNCH_CMD:-$default_kvcrunch_cmd}"
# q4_0: 4.5 bits/value. tova:budget=512,when=step keeps 512 tokens per head from the prompt on
# (evict-for-space before each write): ~25 % of a decode-heavy sequence's 2,000 tokens, at 4 bits.
KVCRUNCH_CONFIGS="${KVCRUNCH_CONFIGS:-kvcrunch-f16|-ctk f16 -ctv f16
kvcrunch-q4_0|-ctk q4_0 -ctv q4_0
kvcrunch-q4_0+tova512|-ctk q4_0 -ctv q4_0 --kv-evict tova:budget=512,when=step}"

workloads=(decode-heavy)
quick=0
configs=""
out="$ROOT/out/serve/$(date -u +%Y%m%dT%H%M%SZ)"
lg_args=()
while (( $# )); do
  case "$1" in
    --workload) case "$2" in both) workloads=(decode-heavy prefill-heavy) ;; *) workloads=("$2") ;; esac; shift ;;
    --quick) quick=1; lg_args+=(--quick) ;;
    --configs) configs="$2"; shift ;;
    --out) out="$2"; shift ;;
    --num-requests|--concurrency|--request-rate|--burstiness|--max-concurrency|--slo|--max-duration|--seed)
      lg_args+=("$1" "$2"); shift ;;
    -h|--help) sed -n 2,20p "$0"; exit 0 ;;
    *) echo "unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done

[[ -f "$MODEL" ]] || { echo "no model at $MODEL (mkdir -p models && ln -sf /work/main/models/SmolLM2-135M-Instruct.Q4_1.gguf models/, or scripts/fetch_model.sh)" >&2; exit 1; }
setup_venv
mkdir -p "$out"

all_kv_labels=$(printf '%s\n' "$KVCRUNCH_CONFIGS" | cut -d'|' -f1 | paste -sd, -)
[[ -n "$configs" ]] || configs="llama-f16,llama-q4_0,$all_kv_labels"
IFS=, read -r -a config_list <<<"$configs"

have_llama=0; [[ -x "$LLAMA_BIN_DIR/llama-server" ]] && have_llama=1
have_kvc=0; [[ -x "$KVCRUNCH_BIN" ]] && "$KVCRUNCH_BIN" serve --help >/dev/null 2>&1 && have_kvc=1

seq_len_of() { "$PY" -c "import sys; sys.path.insert(0, '$SERVE_DIR'); import benchlib as b; w=b.WORKLOADS['$1']; print(w.prompt_tokens, w.output_tokens)"; }

notes=()
tables=()
for wl in "${workloads[@]}"; do
  read -r ptok otok < <(seq_len_of "$wl")
  seq=$(( ptok + otok ))
  budget=$(( 4 * seq * 23040 ))
  rows=()
  notes+=("**$wl** ($ptok prompt + $otok output tokens; seq_len $seq): KV budget = 4 x $seq x 23,040 B = $budget B ($(python3 -c "print(f'{$budget/2**20:.2f}')") MiB)")
  for cfg in "${config_list[@]}"; do
    PORT=$(free_port)
    label="$cfg"
    log="$out/$wl.$cfg.server.log"
    json="$out/$wl.$cfg.json"
    flavor=""; static_kv=(); cmd=()
    case "$cfg" in
      llama-*)
        typ="${cfg#llama-}"
        if (( ! have_llama )); then notes+=("$wl/$cfg: skipped, no $LLAMA_BIN_DIR/llama-server (bash bench/compare/install_peers.sh --only llama-server)"); continue; fi
        if [[ "$typ" == f16 ]]; then ctx=$(( 4 * seq )); slots=4; bytes=$(( ctx * 23040 )); bpt=23040
        else read -r ctx slots bytes bpt < <(kv_sizing "$budget" "$seq" "$typ"); fi
        # shellcheck disable=SC2206
        cmd=("$LLAMA_BIN_DIR/llama-server" -m "$MODEL" --host 127.0.0.1 --port "$PORT" -fa on --kv-unified
             -np "$slots" -c "$ctx" -ctk "$typ" -ctv "$typ" --metrics -t "$THREADS" $LLAMA_EXTRA_ARGS)
        flavor=llamacpp; static_kv=(--static-kv-bytes "$bytes")
        label="$cfg (-np $slots -c $ctx)"
        notes+=("$wl/$cfg: -np $slots -c $ctx, $bpt B/token -> $bytes B of KV (computed; llama.cpp exports no KV series)")
        ;;
      kvcrunch-*)
        flags=$(printf '%s\n' "$KVCRUNCH_CONFIGS" | awk -F'|' -v l="$cfg" '$1 == l {print $2}')
        if [[ -z "$flags" ]] && ! printf '%s\n' "$KVCRUNCH_CONFIGS" | grep -q "^$cfg|"; then
          notes+=("$wl/$cfg: unknown kvcrunch configuration (KVCRUNCH_CONFIGS)"); continue; fi
        c="$KVCRUNCH_CMD"
        c="${c//\{BIN\}/$KVCRUNCH_BIN}"; c="${c//\{MODEL\}/$MODEL}"; c="${c//\{PORT\}/$PORT}"
        c="${c//\{BUDGET\}/$budget}"; c="${c//\{THREADS\}/$THREADS}"; c="${c//\{FLAGS\}/$flags}"
        if (( ! have_kvc )); then notes+=("$wl/$cfg: waits for \`kvcrunch serve\` ($KVCRUNCH_BIN has no serve subcommand): would run \`$c\`"); continue; fi
        read -r -a cmd <<<"$c"
        flavor=kvcrunch
        ;;
      *) notes+=("$wl/$cfg: unknown configuration"); continue ;;
    esac
    echo "== $wl / $label on 127.0.0.1:$PORT" >&2
    if ! start_server "$log" "${cmd[@]}"; then
      rows+=("| $label | server failed to start (see $log) | | | | | | | | | | | | |"); continue
    fi
    if [[ "$flavor" == llamacpp ]]; then
      # Cells allocated: llama.cpp rounds -c up to a multiple of 256. With --kv-unified the log's
      # n_ctx_slot is the whole pool unless it exceeds the model's training context (8,192 here),
      # where the slot is capped (and llama_context warns "n_ctx_seq (N) > n_ctx_train"), so
      # n_ctx_slot is used only when it is at least -c.
      cells=$(( (ctx + 255) / 256 * 256 ))
      logged=$(grep -m1 -o 'n_ctx_slot = [0-9]*' "$log" | grep -o '[0-9]*$' || true)
      seqlog=$(grep -m1 -o 'n_ctx_seq ([0-9]*)' "$log" | grep -o '[0-9]*' || true)
      src="-c $ctx rounded up to 256"
      if [[ -n "$seqlog" ]] && (( seqlog >= ctx )); then cells=$seqlog; src="log: n_ctx_seq"
      elif [[ -n "$logged" ]] && (( logged >= ctx )); then cells=$logged; src="log: n_ctx_slot"; fi
      bytes=$(python3 -c "print(int($cells * $bpt))")
      static_kv=(--static-kv-bytes "$bytes")
      notes+=("$wl/$cfg: llama-server allocated $cells cells ($src) = $bytes B of KV at $bpt B/token")
    fi
    set +e
    "$PY" "$SERVE_DIR/loadgen.py" --base-url "http://127.0.0.1:$PORT" --workload "$wl" --label "$label" \
      --metrics-flavor "$flavor" --server-pid "$SERVER_PID" "${static_kv[@]}" --json "$json" "${lg_args[@]}" \
      >"$out/$wl.$cfg.row.md" 2> >(tee "$out/$wl.$cfg.loadgen.log" >&2)
    rc=$?
    set -e
    alive=1; kill -0 "$SERVER_PID" 2>/dev/null || alive=0
    stop_server
    if (( rc == 0 )); then rows+=("$(cat "$out/$wl.$cfg.row.md")")
    else rows+=("| $label | loadgen failed (rc $rc; server alive: $alive; see $out/$wl.$cfg.loadgen.log) | | | | | | | | | | | | |"); fi
    (( alive )) || notes+=("$wl/$cfg: the server died during the run (see $log)")
  done
  tables+=("### $wl"$'\n\n'"$("$PY" -c "import sys; sys.path.insert(0, '$SERVE_DIR'); import benchlib as b; print(b.MARKDOWN_HEADER)")"$'\n'"$(printf '%s\n' "${rows[@]}")")
done

{
  echo "## Serving benchmark ($(date -u +%FT%TZ); $(lscpu | sed -n 's/^Model name: *//p' | head -1), $(nproc) cores, load $(cut -d' ' -f1-3 /proc/loadavg))"
  echo
  printf '%s\n\n' "${tables[@]}"
  echo "Peak KV MiB marked * is computed from -c and the cache type (llama.cpp exports no KV series); unmarked values are the server's kv_cache_bytes_used gauge."
  echo
  for n in "${notes[@]}"; do echo "- $n"; done
  echo
  echo "Per-run JSON, loadgen and server logs: $out"
} | tee "$out/table.md"
