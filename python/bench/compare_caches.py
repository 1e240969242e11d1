"""Side by side through transformers on SmolLM2 (the real GGUF): DynamicCache, QuantizedCache
(quanto int4/int2), kvpress presses, and kvcrunch.hf.Cache with its codecs and eviction.

Protocol (the same for every row): chunks of --n-ctx tokens of WikiText-2 test; the first half is
the context, prefilled in one forward (a press compresses it there); the second half is fed one
token at a time (teacher forcing) with explicit positions, and every next-token distribution of
that half is scored: NLL -> ppl, KL divergence against DynamicCache's distribution at the same
token. So every row's numbers come from tokens that attended to the compressed/quantized cache
(a single-forward perplexity would not: QuantizedCache returns exact K/V for the step that fills it).
Bytes: what the cache holds after the chunk, measured from its storage (kvcrunch: allocated bytes
of the C++ store; transformers: tensor storage; quanto: packed data + scales + shifts + residual).
Speed: median wall ms per decode step (a shared 2-core machine: read ratios, not absolutes).

Run (transformers 4.57 venv with kvpress and optimum-quanto):
  ~/.cache/kvcrunch-py-venv-tf4/bin/python python/bench/compare_caches.py --chunks 2 --out docs/python-results
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time

# OpenMP threads that spin at barriers collapse throughput on shared cores (tools/cli/main.cc):
# 789 ms per decode step here with the default, 79 ms with PASSIVE. Set before torch loads libgomp.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
import torch  # noqa: E402

import kvcrunch  # noqa: E402
import kvcrunch.hf  # noqa: E402
from transformers import AutoModelForCausalLM, DynamicCache  # noqa: E402

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))


def make_configs(names):
    from transformers import QuantizedCache
    try:
        import kvpress
        from kvcrunch.kvpress import PolicyPress
    except ImportError:
        kvpress = None

    def dyn(cfg):
        try:
            return DynamicCache(config=cfg)
        except TypeError:
            return DynamicCache()

    rows = {
        "DynamicCache": (lambda c: dyn(c), None),
        "QuantizedCache quanto int4": (lambda c: QuantizedCache(backend="quanto", config=c, nbits=4), None),
        "QuantizedCache quanto int2": (lambda c: QuantizedCache(backend="quanto", config=c, nbits=2), None),
        "kvcrunch f16": (lambda c: kvcrunch.hf.Cache(c, k="f16", v="f16"), None),
        "kvcrunch q8_0": (lambda c: kvcrunch.hf.Cache(c, k="q8_0", v="q8_0"), None),
        "kvcrunch q4_0": (lambda c: kvcrunch.hf.Cache(c, k="q4_0", v="q4_0"), None),
        "kvcrunch kivi4": (lambda c: kvcrunch.hf.Cache(c, k="kivi4", v="kivi4"), None),
        "kvcrunch kivi2": (lambda c: kvcrunch.hf.Cache(c, k="kivi2", v="kivi2"), None),
        "kvcrunch turbo3": (lambda c: kvcrunch.hf.Cache(c, k="turbo3", v="turbo3"), None),
        "kvcrunch turbo4": (lambda c: kvcrunch.hf.Cache(c, k="turbo4", v="turbo4"), None),
        "kvcrunch kivi4 sinks=4": (lambda c: kvcrunch.hf.Cache(c, k="kivi4", v="kivi4", sinks=4), None),
        "kvcrunch q8_0 + streaming:sink=4,window=124": (
            lambda c: kvcrunch.hf.Cache(c, k="q8_0", v="q8_0", evict="streaming:sink=4,window=124"), None),
    }
    if kvpress is not None:
        for r in (0.5, 0.75):
            pct = int(r * 100)
            rows[f"kvpress SnapKV {pct}% (DynamicCache)"] = (lambda c: dyn(c), kvpress.SnapKVPress(r, window_size=32))
            rows[f"kvpress ExpectedAttention {pct}% (DynamicCache)"] = (lambda c: dyn(c), kvpress.ExpectedAttentionPress(r))
            rows[f"kvpress Knorm {pct}% (DynamicCache)"] = (lambda c: dyn(c), kvpress.KnormPress(r))
            rows[f"kvpress SnapKV {pct}% on kvcrunch q4_0"] = (
                lambda c: kvcrunch.hf.Cache(c, k="q4_0", v="q4_0"), kvpress.SnapKVPress(r, window_size=32))
            rows[f"kvpress ExpectedAttention {pct}% on kvcrunch q4_0"] = (
                lambda c: kvcrunch.hf.Cache(c, k="q4_0", v="q4_0"), kvpress.ExpectedAttentionPress(r))
            for codec in ("kivi4", "turbo4"):
                rows[f"kvpress ExpectedAttention {pct}% on kvcrunch {codec}"] = (
                    lambda c, codec=codec: kvcrunch.hf.Cache(c, k=codec, v=codec), kvpress.ExpectedAttentionPress(r))
            rows[f"kvcrunch snapkv {pct}% (PolicyPress) on kvcrunch q8_0"] = (
                lambda c: kvcrunch.hf.Cache(c, k="q8_0", v="q8_0"), PolicyPress("snapkv", compression_ratio=r))
    if names:
        missing = [n for n in names if n not in rows]
        if missing:
            sys.exit(f"unknown rows {missing}; known: {list(rows)}")
        rows = {n: rows[n] for n in names}
    return rows


def run_chunk(model, toks, make_cache, press, n_ctx):
    cfg = model.config
    cache = make_cache(cfg)
    half = n_ctx // 2
    ids = torch.tensor([toks[:half]])
    lps, times = [], []
    with torch.no_grad():
        if press is not None:
            with press(model):
                out = model(ids, past_key_values=cache, use_cache=True)
        else:
            out = model(ids, past_key_values=cache, use_cache=True)
        lps.append(torch.log_softmax(out.logits[0, -1].float(), -1))
        for pos in range(half, n_ctx - 1):
            t0 = time.perf_counter()
            out = model(torch.tensor([[toks[pos]]]), past_key_values=cache, use_cache=True,
                        position_ids=torch.tensor([[pos]]), cache_position=torch.tensor([pos]))
            times.append(time.perf_counter() - t0)
            lps.append(torch.log_softmax(out.logits[0, -1].float(), -1))
    lp = torch.stack(lps)  # [half, n_vocab]: predicts toks[half:n_ctx]
    target = torch.tensor(toks[half:n_ctx])
    nll = -lp.gather(1, target[:, None])[:, 0]
    return lp, nll, kvcrunch.hf.cache_bytes(cache), times


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=os.path.join(REPO, "models", "SmolLM2-135M-Instruct.Q4_1.gguf"))
    ap.add_argument("--n-ctx", type=int, default=512)
    ap.add_argument("--chunks", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rows", nargs="*", default=None, help="subset of row names")
    ap.add_argument("--out", default=None, help="directory for results.json and results.md")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    d, f = os.path.split(a.model)
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f)
    model.eval()
    km = kvcrunch.Model(a.model)
    with open(kvcrunch._core.default_text_path(), encoding="utf-8") as fh:
        toks = km.tokenize(fh.read())
    rows = make_configs(a.rows)
    names = list(rows)
    if names[0] != "DynamicCache":
        names.insert(0, "DynamicCache")
        rows = {"DynamicCache": make_configs(["DynamicCache"])["DynamicCache"], **rows}
    acc = {n: {"nll": [], "kld": [], "bytes": [], "ms": []} for n in names}
    for ch in range(a.chunks):
        chunk = toks[ch * a.n_ctx:(ch + 1) * a.n_ctx]
        base_lp = None
        for n in names:
            mk, press = rows[n]
            lp, nll, nbytes, times = run_chunk(model, chunk, mk, press, a.n_ctx)
            if base_lp is None:
                base_lp = lp
            kld = (base_lp.exp() * (base_lp - lp)).sum(-1)
            acc[n]["nll"] += nll.tolist()
            acc[n]["kld"] += kld.tolist()
            acc[n]["bytes"].append(nbytes)
            acc[n]["ms"] += [t * 1000 for t in times]
            print(f"chunk {ch + 1}/{a.chunks} {n}: ppl {math.exp(nll.mean()):.4f} KLD {kld.mean():.5f} "
                  f"bytes {nbytes} {statistics.median(times) * 1000:.1f} ms/step", file=sys.stderr, flush=True)
    base_nll = statistics.fmean(acc["DynamicCache"]["nll"])
    base_bytes = statistics.fmean(acc["DynamicCache"]["bytes"])
    f16_bytes = statistics.fmean(acc["kvcrunch f16"]["bytes"]) if "kvcrunch f16" in acc else None
    results = []
    for n in names:
        nll = statistics.fmean(acc[n]["nll"])
        diffs = [x - y for x, y in zip(acc[n]["nll"], acc["DynamicCache"]["nll"])]
        se = statistics.pstdev(diffs) / math.sqrt(len(diffs)) if len(diffs) > 1 else 0
        results.append({
            "method": n, "ppl": math.exp(nll), "dppl_pct": 100 * (math.exp(nll - base_nll) - 1),
            "dppl_se_pct": 100 * math.exp(nll - base_nll) * se,
            "kld_mean": statistics.fmean(acc[n]["kld"]), "bytes": statistics.fmean(acc[n]["bytes"]),
            "bytes_vs_dynamic": statistics.fmean(acc[n]["bytes"]) / base_bytes,
            "bytes_vs_f16": statistics.fmean(acc[n]["bytes"]) / f16_bytes if f16_bytes else None,
            "ms_per_step": statistics.median(acc[n]["ms"]),
        })
    meta = {"model": a.model, "n_ctx": a.n_ctx, "chunks": a.chunks, "scored_tokens": len(acc["DynamicCache"]["nll"]),
            "transformers": __import__("transformers").__version__, "torch": torch.__version__,
            "threads": a.threads, "model_dtype": str(model.dtype)}
    lines = ["| method | ppl | Δppl % (± se) | KLD | bytes held | vs DynamicCache | vs f16 | ms/step |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        vf16 = f"{r['bytes_vs_f16']:.3f}" if r["bytes_vs_f16"] is not None else "-"
        lines.append(f"| {r['method']} | {r['ppl']:.4f} | {r['dppl_pct']:+.2f} (± {r['dppl_se_pct']:.2f}) | "
                     f"{r['kld_mean']:.5f} | {r['bytes']:,.0f} | {r['bytes_vs_dynamic']:.3f} | {vf16} | {r['ms_per_step']:.1f} |")
    table = "\n".join(lines)
    print(json.dumps(meta))
    print(table)
    if a.out:
        os.makedirs(a.out, exist_ok=True)
        with open(os.path.join(a.out, "results.json"), "w") as fh:
            json.dump({"meta": meta, "rows": results}, fh, indent=2)
        with open(os.path.join(a.out, "results.md"), "w") as fh:
            fh.write(f"{json.dumps(meta)}\n\n{table}\n")


if __name__ == "__main__":
    main()
