#!/usr/bin/env python3
"""Writes the text/JSON/.kvccal seed corpora of tests/fuzz/ (committed; rerun to regenerate):
   corpus/kv_spec_fuzz/       --config strings: every key, codec, transform and policy
   corpus/kvquant_json_fuzz/  small KVQuant calibration JSON files (valid, and a few broken ones)
   corpus/kvccal_fuzz/        small .kvccal files (valid: header + FNV-1a checksum; and broken)
The GGUF seeds (corpus/gguf_fuzz/) come from the unit tests' GGUF writer, see README.md."""
import hashlib, json, os, struct, sys

here = os.path.dirname(os.path.abspath(__file__))

def put(target, name, data):
    d = os.path.join(here, "corpus", target)
    os.makedirs(d, exist_ok=True)
    if isinstance(data, str):
        data = data.encode()
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)

specs = [
    "q8_0", "f16", "f32", "bf16", "fp8", "q4_0", "q4_1:rot=0", "q5_0:rot=1", "kivi2", "kivi4",
    "kivi:bits=2,group=32,residual=128", "turbo3", "turbo:bits=2.5,variant=prod", "turbo4:center=1",
    "polar", "polar:center=1", "kvquant3 sinks=1", "kvquant:bits=4,outliers=2",
    "k=qjl:m=64 v=f16", "k=q8_0 v=q4_0 evict=snapkv:budget=256", "k=f16 v=f16 k@1=turbo3",
    "k=f16 v=f16 k@4=turbo3", "kv@0-1=q8_0 v@1=fp8", "k@0,1=q4_0:rot=0",
    "kt=hadamard k=q4_0 v=q4_0", "vt=hadamard:signs=1 k=f16 v=q8_0",
    "kt=lowrank:file=missing.kvccal,ratio=0.5", "kt=think:file=x.kvccal,ratio=0.4",
    "evict=streaming:sink=4,window=1020 pos=in-cache", "evict=h2o:budget=64", "evict=tova:budget=32",
    "evict=pyramid:budget=48", "evict=knorm:ratio=0.5", "evict=adakv:budget=64",
    "evict=snapkv:ratio=0.75 pos=rerotate", "sinks=4 sink_codec=q8_0 k=kivi2 v=kivi2",
    "name=x q8_0:center=1 sinks=1", "k=fp8:center=1 v=fp8 sinks=1", "q8_0 q4_0", "k=", "sinks=-1",
    "k@=q8_0", "k@3-1=q8_0", "turbo:bits=100", "kivi:group=0",
]
for i, s in enumerate(specs):
    put("kv_spec_fuzz", f"seed{i:02d}", s)

def cb(n):
    return [round(-1.0 + 2.0 * (i + 0.5) / n, 4) for i in range(n)]

def kvq(n_layer, n_head, d):
    t = {"kvquant.shape": [n_layer, n_head, d]}
    for l in range(n_layer):
        t[f"kvquant.k_lo.L{l}"] = [-1.0 - 0.01 * c for c in range(n_head * d)]
        t[f"kvquant.k_hi.L{l}"] = [1.0 + 0.01 * c for c in range(n_head * d)]
        for b in (2, 3, 4):
            t[f"kvquant.k_cb{b}.L{l}"] = cb(1 << b)
            t[f"kvquant.v_cb{b}.L{l}"] = cb(1 << b)
    return {"source": "fuzz seed", "tensors": t}

put("kvquant_json_fuzz", "valid_1x1x64.json", json.dumps(kvq(1, 1, 64)))
put("kvquant_json_fuzz", "valid_2x2x16.json", json.dumps(kvq(2, 2, 16)))
bad = kvq(1, 1, 64)
bad["tensors"]["kvquant.k_cb3.L0"] = [0.5] * 5
put("kvquant_json_fuzz", "short_codebook.json", json.dumps(bad))
big = kvq(1, 1, 8)
big["tensors"]["kvquant.k_hi.L0"] = [1e38] * 8
big["tensors"]["kvquant.v_cb2.L0"] = [-3e38, 0, 1e-45, 3e38]
put("kvquant_json_fuzz", "extreme_values.json", json.dumps(big))
put("kvquant_json_fuzz", "no_tensors.json", '{"source": "x"}')
put("kvquant_json_fuzz", "truncated.json", json.dumps(kvq(1, 1, 8))[:100])

def fnv1a64(b):
    h = 0xcbf29ce484222325
    for x in b:
        h = ((h ^ x) * 0x100000001b3) & 0xFFFFFFFFFFFFFFFF
    return h

def kvccal(meta, tensors, version=1, corrupt=False):
    p = struct.pack("<I", len(meta))
    for k, v in meta.items():
        p += struct.pack("<I", len(k)) + k.encode() + struct.pack("<I", len(v)) + v.encode()
    p += struct.pack("<I", len(tensors))
    for name, (dims, data) in tensors.items():
        p += struct.pack("<I", len(name)) + name.encode() + struct.pack("<I", len(dims))
        p += b"".join(struct.pack("<q", d) for d in dims) + struct.pack(f"<{len(data)}f", *data)
    h = fnv1a64(p) ^ (1 if corrupt else 0)
    return b"KVCCALIB" + struct.pack("<IIQQ", version, 0, len(p), h) + p

meta = {"model_id": "llama/fuzz", "kind": "palu"}
tens = {"palu.basis.K.L0.H0": ([4, 4], [float(i == j) for i in range(4) for j in range(4)]),
        "palu.eig.K.L0.H0": ([4], [4.0, 3.0, 2.0, 1.0]),
        "think.score.L0": ([2, 3, 1], [0.5] * 6)}
put("kvccal_fuzz", "valid.kvccal", kvccal(meta, tens))
put("kvccal_fuzz", "empty.kvccal", kvccal({}, {}))
put("kvccal_fuzz", "bad_checksum.kvccal", kvccal(meta, tens, corrupt=True))
put("kvccal_fuzz", "version2.kvccal", kvccal(meta, tens, version=2))
put("kvccal_fuzz", "truncated.kvccal", kvccal(meta, tens)[:60])
