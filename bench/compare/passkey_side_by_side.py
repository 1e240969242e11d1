#!/usr/bin/env python3
"""kvcrunch vs kvpress passkey, same prompts, same ratios: runs our side and prints the table.

  run   : dumps the prompts once (kvcrunch retrieval --dump-prompts), then runs kvcrunch's policies
          at every ratio with the question kept out of compression (--question-apart, once=1),
          one kvcrunch process per length (StreamingLLM's window is absolute: kept - 4 sinks).
  table : reads our JSON(s) + kvpress_passkey.py's JSON and prints a markdown table per ratio:
          accuracy (all trials, and where the full cache succeeds) and mean KV bytes after the
          context was compressed.

  python3 bench/compare/passkey_side_by_side.py run --bin build-h2/kvcrunch -m MODEL \
      --lengths 1024 --seeds 2 --ratios 0.25,0.5,0.75,0.9 --out out/kvpress
  $KVPRESS_VENV/bin/python bench/compare/kvpress_passkey.py -m MODEL \
      --prompts out/kvpress/prompts.json --json out/kvpress/kvpress.json
  python3 bench/compare/passkey_side_by_side.py table --ours out/kvpress/ours_*.json \
      --theirs out/kvpress/kvpress.json
"""
import argparse
import glob
import json
import math
import os
import subprocess
import sys


def our_configs(ratio, n_ctx):
    kept = int(math.floor(n_ctx * (1 - ratio)))
    half = (1 - ratio) / 2
    return {
        "snapkv": f"evict=snapkv:ratio={ratio},once=1",
        "pyramid": f"evict=pyramid:ratio={ratio},once=1",
        "adakv": f"evict=adakv:base=snapkv,ratio={ratio},once=1",
        "knorm": f"evict=knorm:ratio={ratio},once=1",
        "tova": f"evict=tova:ratio={ratio},when=prefill,once=1",
        "h2o": f"evict=h2o:heavy={half:g},recent={half:g}",
        "streaming": f"evict=streaming:sink=4,window={max(1, kept - 4)}",
    }


def cmd_run(a):
    os.makedirs(a.out, exist_ok=True)
    base = [a.bin, "retrieval", "-m", a.model, "-t", str(a.threads), "--task", "passkey",
            "--seeds", str(a.seeds), "--depths", a.depths]
    prompts = os.path.join(a.out, "prompts.json")
    subprocess.run(base + ["--lengths", a.lengths, "--dump-prompts", prompts], check=True)
    P = json.load(open(prompts))
    ratios = [float(r) for r in a.ratios.split(",")]
    policies = a.policies.split(",")
    for L in [int(x) for x in a.lengths.split(",")]:
        n_ctx = min(t["n_context"] for t in P["trials"] if t["length"] == L)
        # one kvcrunch process (and JSON file) per (length, ratio): partial runs stay usable
        groups = [] if a.no_full else [("full", ["full"])]
        for r in ratios:
            c = our_configs(r, n_ctx)
            groups.append((f"r{r:g}", [c[p] for p in policies]))
        for tag, cfgs in groups:
            args = base + ["--lengths", str(L), "--question-apart", "--json"]
            for c in cfgs:
                args += ["--config", c]
            path = os.path.join(a.out, f"ours_{L}_{tag}{a.suffix}.json")
            print(" ".join(args), "  >", path, file=sys.stderr, flush=True)
            with open(path + ".tmp", "w") as f:
                subprocess.run(args, check=True, stdout=f)
            os.replace(path + ".tmp", path)


def policy_of(cfg):
    if cfg == "full":
        return "full", 0.0
    spec = cfg.split("evict=", 1)[1]
    name = spec.split(":", 1)[0]
    kv = dict(x.split("=", 1) for x in spec.split(":", 1)[1].split(",") if "=" in x)
    if "ratio" in kv:
        return name, float(kv["ratio"])
    if name == "h2o":
        return name, round(1 - float(kv["heavy"]) - float(kv["recent"]), 4)
    return name, None  # streaming: filled in from the rows' removed fraction


def key(r):
    return (r["length"], r["depth"], r["seed"])


def cmd_table(a):
    ours = {}  # (name, ratio) -> rows
    for pat in a.ours:
        for path in glob.glob(pat):
            j = json.load(open(path))
            for c in j["configs"]:
                if "rows" not in c:
                    continue
                name, ratio = policy_of(c["config"])
                if ratio is None:  # streaming: nearest grid ratio
                    rem = sum(r["removed_after_context"] for r in c["rows"]) / len(c["rows"])
                    ratio = min(a.grid, key=lambda g: abs(g - rem))
                ours.setdefault((name, ratio), []).extend(c["rows"])
    theirs = {}
    if a.theirs:
        for path in a.theirs:
            j = json.load(open(path))
            for res in j["results"]:
                theirs.setdefault((res["press"], res["ratio"]), []).extend(res["rows"])
    full_ok = {key(r) for r in ours.get(("full", 0.0), []) if r["correct"]}
    their_full_ok = {key(r) for r in theirs.get(("full", 0.0), []) if r["correct"]}

    def summ(rows, ok_set, bytes_key):
        n = len(rows)
        acc = sum(r["correct"] for r in rows)
        gated = [r for r in rows if key(r) in ok_set]
        g = sum(r["correct"] for r in gated)
        b = sum(r[bytes_key] for r in rows) / max(1, n)
        return f"{acc}/{n}", f"{g}/{len(gated)}", b

    lines = []
    ratios = sorted({r for (_, r) in list(ours) + list(theirs)})
    for ratio in ratios:
        lines.append(f"\n#### ratio {ratio} (fraction removed)\n")
        lines.append("| side | method | accuracy (all) | where our full cache succeeds | where their full cache succeeds | mean KV bytes after context |")
        lines.append("|---|---|---|---|---|---|")
        for (name, r), rows in sorted(ours.items()):
            if r != ratio:
                continue
            kb = "kv_bytes_after_context" if "kv_bytes_after_context" in rows[0] else "kv_bytes_after_prompt"
            acc, g, b = summ(rows, full_ok, kb)
            _, g2, _ = summ(rows, their_full_ok, kb)
            lines.append(f"| kvcrunch (f16) | {name} | {acc} | {g} | {g2} | {b:,.0f} |")
        for (name, r), rows in sorted(theirs.items()):
            if r != ratio:
                continue
            acc, g, b = summ(rows, full_ok, "kv_tensor_bytes")
            _, g2, _ = summ(rows, their_full_ok, "kv_tensor_bytes")
            lines.append(f"| kvpress (fp32) | {name} | {acc} | {g} | {g2} | {b:,.0f} (f16-equiv {b / 2:,.0f}) |")
    both_ok = full_ok & their_full_ok
    lines.append("\n#### best per ratio (gated: trials where both full caches succeed, n = %d)\n" % len(both_ok))
    lines.append("| ratio | best kvcrunch | acc (all) | acc (gated) | KV bytes | best kvpress | acc (all) | acc (gated) | KV bytes (fp32; f16-equiv) | ours >= theirs |")
    lines.append("|---|---|---|---|---|---|---|---|---|---|")

    def best(d, ratio, kb):
        cands = []
        for (name, r), rows in d.items():
            if r != ratio or name == "full":
                continue
            g = sum(x["correct"] for x in rows if key(x) in both_ok)
            al = sum(x["correct"] for x in rows)
            b = sum(x.get(kb, x.get("kv_bytes_after_prompt", 0)) for x in rows) / len(rows)
            cands.append((g, al, -b, name, len(rows)))
        return max(cands) if cands else None

    for ratio in ratios:
        if ratio == 0.0:
            continue
        o = best(ours, ratio, "kv_bytes_after_context")
        t = best(theirs, ratio, "kv_tensor_bytes")
        if not o or not t:
            continue
        lines.append(f"| {ratio} | {o[3]} | {o[1]}/{o[4]} | {o[0]}/{len(both_ok)} | {-o[2]:,.0f} | {t[3]} | "
                     f"{t[1]}/{t[4]} | {t[0]}/{len(both_ok)} | {-t[2]:,.0f}; {-t[2] / 2:,.0f} | "
                     f"{'yes' if o[0] >= t[0] else 'NO'} |")
    print("\n".join(lines))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--bin", default="build-h2/kvcrunch")
    r.add_argument("-m", "--model", default="models/SmolLM2-135M-Instruct.Q4_1.gguf")
    r.add_argument("--lengths", default="1024")
    r.add_argument("--depths", default="0,0.25,0.5,0.75,1")
    r.add_argument("--seeds", type=int, default=2)
    r.add_argument("--ratios", default="0.25,0.5,0.75,0.9")
    r.add_argument("--policies", default="snapkv,streaming,tova,knorm,h2o,pyramid,adakv")
    r.add_argument("--no-full", action="store_true")
    r.add_argument("--threads", type=int, default=1)
    r.add_argument("--suffix", default="")
    r.add_argument("--out", default="out/kvpress")
    t = sub.add_parser("table")
    t.add_argument("--ours", nargs="+", required=True)
    t.add_argument("--theirs", nargs="*")
    t.add_argument("--grid", default=[0.25, 0.5, 0.75, 0.9], type=lambda s: [float(x) for x in s.split(",")])
    a = ap.parse_args()
    cmd_run(a) if a.cmd == "run" else cmd_table(a)


if __name__ == "__main__":
    main()
