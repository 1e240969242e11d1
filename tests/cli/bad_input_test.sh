#!/usr/bin/env bash
# Bad input through the CLI: every case must exit non-zero with a message on stderr naming the
# problem, and never crash (no signal exit: 128+N) or hang (timeout).
#   tests/cli/bad_input_test.sh path/to/kvcrunch path/to/model.gguf
set -u
BIN="$1"; MODEL="$2"
[ -f "$MODEL" ] || { echo "model missing: skip"; exit 77; }
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
head -c 1000000 "$MODEL" > "$tmp/trunc.gguf"
python3 - "$MODEL" "$tmp/corrupt.gguf" <<'PY'
import sys
b = bytearray(open(sys.argv[1], "rb").read(200000))
b[8:16] = (2**40).to_bytes(8, "little")      # absurd tensor count
open(sys.argv[2], "wb").write(b)
PY
printf 'not a gguf file at all\n' > "$tmp/notgguf.gguf"
: > "$tmp/empty.txt"
printf '\xff\xfe abc' > "$tmp/bad.txt"
python3 - "$MODEL" "$tmp/arch.gguf" <<'PY'
import sys
b = open(sys.argv[1], "rb").read()
i = b.find(b"llama", 0, 4096)                  # general.architecture value
open(sys.argv[2], "wb").write(b[:i] + b"xxxxx" + b[i + 5:])
PY
long=$(python3 -c "print('word ' * 400)")
pass=0; fail=0
check() {  # check "expected message fragment" cmd...
  local want="$1"; shift
  local out rc
  out=$(timeout 120 "$@" 2>&1 >/dev/null); rc=$?
  if [ $rc -eq 0 ] || [ $rc -ge 124 ]; then
    echo "FAIL (rc=$rc): $*"; echo "   $out" | head -3; fail=$((fail+1)); return
  fi
  if ! grep -qi -- "$want" <<<"$out"; then
    echo "FAIL (message lacks '$want'): $*"; echo "   $out" | head -3; fail=$((fail+1)); return
  fi
  pass=$((pass+1))
}
check "cannot open"       "$BIN" info -m /nonexistent.gguf
check "DATA_LOSS"         "$BIN" info -m "$tmp/trunc.gguf"
check "DATA_LOSS"         "$BIN" info -m "$tmp/corrupt.gguf"
check "DATA_LOSS"         "$BIN" info -m "$tmp/notgguf.gguf"
check "architecture"      "$BIN" info -m "$tmp/arch.gguf"
check "empty"             "$BIN" perplexity -m "$MODEL" -f "$tmp/empty.txt"
check "UTF-8"             "$BIN" perplexity -m "$MODEL" -f "$tmp/bad.txt" -c 16
check "context size"      "$BIN" generate -m "$MODEL" -c 16 -p "$long" -n 1
check "unknown cache type" "$BIN" generate -m "$MODEL" -p hi -n 1 -ctk q3_wat
check "unknown parameter" "$BIN" generate -m "$MODEL" -p hi -n 1 -ctk q8_0:foo=1
check "keys only"         "$BIN" generate -m "$MODEL" -p hi -n 1 -ctv qjl
check "unknown eviction"  "$BIN" generate -m "$MODEL" -p hi -n 1 --kv-evict nosuch
check "-n must"           "$BIN" generate -m "$MODEL" -p hi -n -1
check "top-p"             "$BIN" generate -m "$MODEL" -p hi -n 1 --top-p 2
check "token id"          "$BIN" logits -m "$MODEL" --tokens 99999999 --out "$tmp/l.bin"
check "empty prompt"      "$BIN" generate -m "$MODEL" -p "" -n 1
check "threads"           "$BIN" info -m "$MODEL" -t 0
# Directories where files are expected, requests too large to allocate, outputs that cannot be
# written: refused up front (these used to abort, allocate until killed, or fail after the run).
check "is a directory"    "$BIN" generate -m "$MODEL" -p hi -n 1 --kv-lowrank "$tmp"
check "is a directory"    "$BIN" logits -m "$MODEL" --tokens 1,2 --out "$tmp/l.bin" --kv-transform-k "think:file=$tmp,ratio=0.4"
check "is a directory"    "$BIN" perplexity -m "$MODEL" -f "$tmp"
check "at most"           "$BIN" bench -m "$MODEL" -p 8 -n 2 --depth 100000000
check "trained context"   "$BIN" retrieval -m "$MODEL" --task passkey --lengths 100000000
check "report"            "$BIN" eval -m "$MODEL" -c 64 --chunks 1 --config q8_0 --report /proc/kvcrunch-nope
check "is a directory"    "$BIN" calibrate -m "$MODEL" -f "$tmp/bad.txt" -o "$tmp"
check "excludes"          "$BIN" generate -m "$MODEL" -p hi --tokens 1,2 -n 1
check "requires --kv-sinks" "$BIN" generate -m "$MODEL" -p hi -n 1 --kv-sink-codec q8_0
check "given twice"       "$BIN" eval -m "$MODEL" -c 64 --chunks 1 --config "k=q8_0 k=q4_0"
check "no value"          "$BIN" eval -m "$MODEL" -c 64 --chunks 1 --config "evict="
check "model has 30 layers" "$BIN" eval -m "$MODEL" -c 64 --chunks 1 --config "q8_0 k@30=q4_0"
check "bad layer list"    "$BIN" eval -m "$MODEL" -c 64 --chunks 1 --config "q8_0 k@3-x=q4_0"
check "not found"         "$BIN" generate -m "$MODEL" -p hi -n 1 --kv-transform-k "think:file=$tmp/none.kvccal,ratio=0.4"
check "cannot follow a K transform" "$BIN" generate -m "$MODEL" -p hi -n 1 -ctk kvquant4 --kv-transform-k hadamard
check "calibrated on the raw keys" "$BIN" generate -m "$MODEL" -p hi -n 1 -ctk kvquant4:center=1
# KV config files (calibrate --method bits): missing, malformed, NaN (null), another model's
# shape, a budget no candidate mix meets, no budget, a bad candidate.
printf '{"format": "kvcrunch-kv-config", "version": 1, "config": "q8_0"' > "$tmp/trunc.kvcfg.json"
cfg() { printf '{"format": "kvcrunch-kv-config", "version": 1, "config": "k=q8_0 v=q8_0 sinks=1", "model": {"n_layer": %s, "n_head_kv": 3, "head_dim": 64, "head_dim_v": 64}, "all_in_bits": %s, "all_in_ctx": 4096}' "$1" "$2"; }
cfg 24 8.5 > "$tmp/shape.kvcfg.json"
cfg 30 null > "$tmp/nan.kvcfg.json"
cfg 30 8.5 > "$tmp/good.kvcfg.json"
check "not found"         "$BIN" eval -m "$MODEL" -c 64 --chunks 1 --config "config=$tmp/none.json"
check "not valid JSON"    "$BIN" generate -m "$MODEL" -p hi -n 1 --kv-config "$tmp/trunc.kvcfg.json"
check "non-finite"        "$BIN" generate -m "$MODEL" -p hi -n 1 --kv-config "$tmp/nan.kvcfg.json"
check "made for a model"  "$BIN" generate -m "$MODEL" -p hi -n 1 --kv-config "$tmp/shape.kvcfg.json"
check "made for a model"  "$BIN" eval -m "$MODEL" -c 64 --chunks 1 --config "file=$tmp/shape.kvcfg.json"
check "excludes"          "$BIN" generate -m "$MODEL" -p hi -n 1 --kv-config "$tmp/good.kvcfg.json" -ctk q4_0
check "needs --budget"    "$BIN" calibrate -m "$MODEL" --method bits -o "$tmp/o.json"
check "cheapest mix"      "$BIN" calibrate -m "$MODEL" --method bits --budget 0.5 -o "$tmp/o.json"
check "candidate"         "$BIN" calibrate -m "$MODEL" --method bits --budget 3 --candidates "k=nosuch" -o "$tmp/o.json"
check "--candidates"      "$BIN" calibrate -m "$MODEL" --method bits --budget 3 --candidates "q8_0" -o "$tmp/o.json"
check "not measured there" "$BIN" calibrate -m "$MODEL" --method bits --budget 3 --candidates "k=q4_0" -o "$tmp/o.json" \
  --reuse "$(dirname "$0")/../../docs/eval-c4096/bits/bits-3.25.json"
# `serve` refuses bad settings before it listens (a server that starts would hit the timeout).
check "api-key is empty"  "$BIN" serve -m "$MODEL" --port 0 --api-key ""
check "holds no key"      "$BIN" serve -m "$MODEL" --port 0 --api-key-file "$tmp/empty.txt"
check "kv-allow"          "$BIN" serve -m "$MODEL" --port 0 --kv-allow q4_0,nosuch
check "kv-budget"         "$BIN" serve -m "$MODEL" --port 0 --kv-budget 12parsecs
check "unknown cache type" "$BIN" serve -m "$MODEL" --port 0 -ctk q3_wat
check "unknown eviction"  "$BIN" serve -m "$MODEL" --port 0 --kv-evict nosuch
check "cannot listen"     "$BIN" serve -m "$MODEL" --host 203.0.113.7 --port 0
# More sinks than the context: refused at once (measuring its KV plan took minutes before listening).
check "exceeds the context" "$BIN" serve -m "$MODEL" --port 0 -c 512 --kv-sinks 1048576
# Session files (generate --session): corrupt, truncated, another codec, not a session, a
# directory, no prompt and nothing pending. Each refused with the file named, the file untouched.
"$BIN" generate -m "$MODEL" -p "Hello there" -n 2 -ctk q4_0 -ctv q4_0 --session "$tmp/s.kvc" >/dev/null 2>&1
python3 - "$tmp" <<'PY'
import sys
d = sys.argv[1]
b = bytearray(open(d + "/s.kvc", "rb").read())
open(d + "/trunc.kvc", "wb").write(b[: len(b) // 2])
b[len(b) // 2] ^= 1
open(d + "/flip.kvc", "wb").write(b)
PY
check "truncated"          "$BIN" generate -m "$MODEL" -p x -n 1 -ctk q4_0 -ctv q4_0 --session "$tmp/trunc.kvc"
check "checksum mismatch"  "$BIN" generate -m "$MODEL" -p x -n 1 -ctk q4_0 -ctv q4_0 --session "$tmp/flip.kvc"
check "another KV configuration" "$BIN" generate -m "$MODEL" -p x -n 1 -ctk q8_0 --session "$tmp/s.kvc"
python3 -c "print('not a session ' * 40)" > "$tmp/text.kvc"
check "not a kvcrunch KV record" "$BIN" generate -m "$MODEL" -p x -n 1 --session "$tmp/text.kvc"
check "s.kvc"              "$BIN" generate -m "$MODEL" -p x -n 1 --session "$tmp/s.kvc"
"$BIN" generate -m "$MODEL" -p "Hi" -n 0 --session "$tmp/s0.kvc" >/dev/null 2>&1
check "no pending token"   "$BIN" generate -m "$MODEL" -n 1 --session "$tmp/s0.kvc"
# A directory, or a path under a missing directory / a file: refused before generating.
check "is a directory"     "$BIN" generate -m "$MODEL" -p x -n 1 --session "$tmp"
check "is not a directory" "$BIN" generate -m "$MODEL" -p x -n 1 --session "$tmp/nodir/s.kvc"
check "is not a directory" "$BIN" generate -m "$MODEL" -p x -n 1 --session "$tmp/s.kvc/s.kvc"
# KV presets and key smoothing (issue 15): unknown preset, a preset mixed with the flags it sets,
# smoothing on values, a smoothing file made for another model, one with a NaN statistic.
check "unknown KV preset"  "$BIN" generate -m "$MODEL" -p hi -n 1 --kv-preset kvc1
check "excludes"           "$BIN" generate -m "$MODEL" -p hi -n 1 --kv-preset kvc3 -ctk q8_0
check "unknown KV preset"  "$BIN" eval -m "$MODEL" -c 64 --chunks 1 --config "preset=nope"
printf 'It is a truth universally acknowledged, that a single man in possession of a good fortune, must be in want of a wife. %.0s' $(seq 1 20) > "$tmp/cal.txt"
"$BIN" calibrate -m "$MODEL" --method smooth -f "$tmp/cal.txt" -c 64 --max-tokens 128 -o "$tmp/s.kvcal" >/dev/null 2>&1
python3 - "$tmp" <<'PY'
import struct, sys
d = sys.argv[1]
b = open(d + "/s.kvcal", "rb").read()
def fnv(data):
    h = 0xcbf29ce484222325
    for x in data:
        h = ((h ^ x) * 0x100000001b3) & 0xFFFFFFFFFFFFFFFF
    return h
p = b[32:]; o = 0
def u32():
    global o; v = struct.unpack_from("<I", p, o)[0]; o += 4; return v
def s():
    n = u32(); global o; v = p[o:o + n]; o += n; return v
meta = [(s(), s()) for _ in range(u32())]
tensors = []
for _ in range(u32()):
    name = s(); nd = u32(); dims = struct.unpack_from("<%dq" % nd, p, o); o += 8 * nd
    n = 1
    for x in dims: n *= x
    data = list(struct.unpack_from("<%df" % n, p, o)); o += 4 * n
    tensors.append((name, dims, data))
def write(path, meta, tensors):
    out = struct.pack("<I", len(meta))
    for k, v in meta: out += struct.pack("<I", len(k)) + k + struct.pack("<I", len(v)) + v
    out += struct.pack("<I", len(tensors))
    for name, dims, data in tensors:
        out += struct.pack("<I", len(name)) + name + struct.pack("<I", len(dims))
        out += struct.pack("<%dq" % len(dims), *dims) + struct.pack("<%df" % len(data), *data)
    open(path, "wb").write(b"KVCCALIB" + struct.pack("<IIQQ", 1, 0, len(out), fnv(out)) + out)
write(d + "/other.kvcal", [(k, v.replace(b"name=", b"name=Other") if k == b"model_id" else v) for k, v in meta], tensors)
bad = [(n, dm, ([float("nan")] + dt[1:]) if n == b"smooth.kmax.3.1" else dt) for n, dm, dt in tensors]
write(d + "/nan.kvcal", meta, bad)
PY
check "different model"    "$BIN" generate -m "$MODEL" -p hi -n 1 --kv-transform-k "smooth:file=$tmp/other.kvcal"
check "channel 0 is nan"   "$BIN" generate -m "$MODEL" -p hi -n 1 --kv-transform-k "smooth:file=$tmp/nan.kvcal"
check "key channels only"  "$BIN" generate -m "$MODEL" -p hi -n 1 --kv-transform-v "smooth:file=$tmp/s.kvcal"
# Beyond the trained context is a warning, not an error.
out=$(timeout 300 "$BIN" generate -m "$MODEL" -c 9000 -p hi -n 1 2>&1); rc=$?
if [ $rc -eq 0 ] && grep -q "exceeds the model's trained context" <<<"$out"; then pass=$((pass+1));
else echo "FAIL: -c 9000 should warn and run (rc=$rc)"; echo "   $out" | head -3; fail=$((fail+1)); fi
# A truncated predictor file beside the model (an interrupted copy): predict=auto says to delete it.
ln -s "$(readlink -f "$MODEL")" "$tmp/pm.gguf"
printf 'KVCCALIB\001\000\000\000\000\000\000\000\377\377\000\000\000\000\000\000' > "$tmp/pm.predict.kvc"
check "delete it to recalibrate" "$BIN" generate -m "$tmp/pm.gguf" --kv-preset kvc3 -p hi -n 1
# retrieval prepares predict=auto like eval does (it used to refuse presets kvc4/kvc3/kvc2 with
# "no predictor file was prepared"); only when the predictor file exists (else it takes minutes).
if [ -f "${MODEL%.gguf}.predict.kvc" ]; then
  out=$(timeout 300 "$BIN" retrieval -m "$MODEL" --task passkey --config preset=kvc4 --lengths 128 --seeds 1 2>&1); rc=$?
  if [ $rc -eq 0 ] && grep -q "accuracy=" <<<"$out"; then pass=$((pass+1));
  else echo "FAIL: retrieval with preset=kvc4 (rc=$rc)"; echo "   $out" | head -3; fail=$((fail+1)); fi
fi
echo "$pass passed, $fail failed"
[ $fail -eq 0 ]
