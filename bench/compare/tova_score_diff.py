#!/usr/bin/env python3
"""TOVA, kvcrunch vs kvpress TOVAPress, per layer, on the same passkey trials (issue 4 debugging).

Run with the kvpress venv. For each selected trial it prefills the context once in transformers
(eager attention, float32 = the GGUF dequantized), and per layer takes TOVAPress.score (mean over
the 9 query heads of the last context query's attention row; the last token padded with max + 1)
and its kept set (topk). If --ours is given (kvcrunch's KVC_TOVA_DUMP JSON lines: one line per
compressed layer, trials in --prompts order), it compares per layer:
  pearson / spearman of the two score vectors over cells 0..n-2 (kvpress never scores the last);
  overlap of the kept sets (|A ∩ B| / k);
  whether the needle's tokens (" The pass key is K. Remember it. K is the pass key.") are kept.
Then it answers the question with kvpress's pipeline from several caches built from the same
float32 prefill, to separate selection from numerics:
  kvpress      TOVAPress's own kept set
  ours_sets    our kept set per layer (from --ours) gathered from the float32 cache
  per_head_bug the selection rule kvcrunch had before the fix: KV head 0 keeps the top-k of the
               9-head mean, heads 1 and 2 the top-k of their own 3-head GQA group's mean
               (ties evict the older cell, the last token not protected)

  KVC_TOVA_DUMP=out/h1/dump.jsonl build-h1/kvcrunch retrieval --task passkey --question-apart \
      --seeds 2 --depths 0,0.25 --lengths 1024 -t 1 --json --config evict=tova:ratio=0.5,when=prefill,once=1
  HF_HUB_OFFLINE=1 $VENV/bin/python bench/compare/tova_score_diff.py -m MODEL \
      --prompts out/kvpress/prompts.json --depths 0,0.25 --ratio 0.5 --ours out/h1/dump.jsonl
"""
import argparse
import json
import os
import sys
import time


def rank(x):
    import numpy as np
    r = np.empty(len(x))
    r[np.argsort(x, kind="stable")] = np.arange(len(x))
    return r


def needle_span(tok, ids, key):
    """Token indices covering ' The pass key is K. Remember it. K is the pass key.'"""
    text = ""
    starts = []
    for i in ids:
        starts.append(len(text))
        text += tok.decode([i])
    needle = f" The pass key is {key}. Remember it. {key} is the pass key."
    at = text.find(needle)
    if at < 0:
        needle = needle.strip()
        at = text.find(needle)
    end = at + len(needle)
    return [i for i, s in enumerate(starts) if at <= s < end or (s < at < s + len(tok.decode([ids[i]])))]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-m", "--model", default="models/SmolLM2-135M-Instruct.Q4_1.gguf")
    ap.add_argument("--prompts", required=True)
    ap.add_argument("--lengths", default="1024")
    ap.add_argument("--depths", default="0,0.25")
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--ratio", type=float, default=0.5, help="--ours must be dumped at this ratio")
    ap.add_argument("--extra-ratios", default="", help="answer per_head_bug / kvpress at these too")
    ap.add_argument("--ours", default="", help="KVC_TOVA_DUMP file of the same trials, same order")
    ap.add_argument("--json", default="")
    a = ap.parse_args()

    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache
    import kvpress
    from kvpress.pipeline import KVPressTextGenerationPipeline
    from kvpress.utils import compute_n_kept

    torch.set_num_threads(1)
    d, f = os.path.dirname(os.path.abspath(a.model)), os.path.basename(a.model)
    t0 = time.time()
    tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32, attn_implementation="eager")
    model.eval()
    pipe = KVPressTextGenerationPipeline(model=model, tokenizer=tok, device="cpu")
    for layer in model.model.layers:
        layer.self_attn.rotary_emb = model.model.rotary_emb
    attn_layers = [layer.self_attn for layer in model.model.layers]
    n_layer = len(attn_layers)
    nkv, nh = model.config.num_key_value_heads, model.config.num_attention_heads
    g = nh // nkv
    print(f"loaded in {time.time() - t0:.0f}s", file=sys.stderr, flush=True)

    P = json.load(open(a.prompts))
    L = {int(x) for x in a.lengths.split(",")}
    D = {float(x) for x in a.depths.split(",")}
    S = {int(x) for x in a.seeds.split(",")}
    trials = [t for t in P["trials"] if t["length"] in L and t["depth"] in D and t["seed"] in S]
    ours = [json.loads(l) for l in open(a.ours)] if a.ours else []
    if ours:
        assert len(ours) == n_layer * len(trials), (len(ours), n_layer, len(trials))
    ratios = [a.ratio] + [float(x) for x in a.extra_ratios.split(",") if x]

    report = []
    for ti, t in enumerate(trials):
        ctx = torch.tensor([t["context_ids"]], dtype=torch.long)
        q = torch.tensor([t["question_ids"]], dtype=torch.long)
        n = ctx.shape[1]
        needle = needle_span(tok, t["context_ids"], t["key"])
        rows = []  # per layer: last-query attention [nh, n]
        presses = {r: kvpress.TOVAPress(compression_ratio=r) for r in ratios}
        kv_kept = {r: [] for r in ratios}
        tova_scores = []

        def hook(module, args, kwargs, output):
            attn = output[1]  # [1, nh, n, n]
            rows.append(attn[0, :, -1, :].clone())
            layer = kwargs["past_key_values"].layers[module.layer_idx]
            s = presses[ratios[0]].score(module, kwargs["hidden_states"], layer.keys, layer.values, attn, kwargs)
            tova_scores.append(s[0, 0].clone())
            for r, p in presses.items():
                k, v = p.compress(module, kwargs["hidden_states"], layer.keys, layer.values, attn, kwargs)
                kv_kept[r].append((k, v))
            return output

        hs = [m.register_forward_hook(hook, with_kwargs=True) for m in attn_layers]
        t1 = time.time()
        try:
            full = DynamicCache()
            with torch.inference_mode():
                model.model(input_ids=ctx, past_key_values=full)
        finally:
            for h in hs:
                h.remove()
        full_kv = [(l.keys, l.values) for l in full.layers]
        print(f"trial depth {t['depth']} seed {t['seed']}: prefill {time.time() - t1:.0f}s, needle tokens "
              f"{needle[0]}..{needle[-1]}", file=sys.stderr, flush=True)

        def gather(per_head_idx):
            """per_head_idx[layer] = [nkv lists of cell indices] -> DynamicCache from the full one."""
            c = DynamicCache()
            for l, (k, v) in enumerate(full_kv):
                kk = [k[:, h:h + 1, idx] for h, idx in enumerate(per_head_idx[l])]
                vv = [v[:, h:h + 1, idx] for h, idx in enumerate(per_head_idx[l])]
                c.update(torch.cat(kk, 1).contiguous(), torch.cat(vv, 1).contiguous(), l)
            return c

        def answer(cache):
            with torch.inference_mode():
                s = pipe.generate_answer(question_ids=q, cache=cache, context_length=n, max_new_tokens=8)
            return s, s.lstrip(" ").startswith(t["expected"])

        def topk_old(score, k):
            # kvcrunch SelectKeep: higher first, ties keep the newer; window 0, sink 0.
            order = sorted(range(len(score)), key=lambda i: (-score[i], -i))
            return sorted(order[:k])

        res = {"depth": t["depth"], "seed": t["seed"], "key": t["key"], "n": n,
               "needle_tokens": [needle[0], needle[-1]], "answers": {}}
        for r in ratios:
            k = compute_n_kept(n, r)
            # kvpress's own selection
            ans, ok = answer(DynamicCache_from(kv_kept[r]))
            res["answers"][f"kvpress@{r}"] = [ans, ok]
            # the old kvcrunch rule
            old = []
            for l in range(n_layer):
                row = rows[l].double().numpy()  # [nh, n], includes the last token's self weight
                mean9 = row.mean(0)
                heads = [topk_old(mean9, k)]
                for h in range(1, nkv):
                    heads.append(topk_old(row[h * g:(h + 1) * g].mean(0), k))
                old.append([torch.tensor(x) for x in heads])
            ans, ok = answer(gather(old))
            res["answers"][f"per_head_bug@{r}"] = [ans, ok]
            nk = [sum(1 for i in needle if i in set(x[hh].tolist())) for x in old for hh in range(nkv)]
            res.setdefault("per_head_bug_needle_kept_frac", {})[str(r)] = float(np.mean(nk)) / len(needle)
        if ours:
            mine = ours[ti * n_layer:(ti + 1) * n_layer]
            k = compute_n_kept(n, a.ratio)
            per_layer = []
            for l in range(n_layer):
                o = mine[l]
                assert o["layer"] == l and len(o["score"]) == n and o["seq"] == list(range(n)), l
                so = np.array(o["score"][:-1], dtype=np.float64)
                st = tova_scores[l][:-1].double().numpy()
                kt = set(torch.topk(tova_scores[l], k).indices.tolist())
                ko = set(o["keep"])
                per_layer.append({
                    "layer": l,
                    "pearson": float(np.corrcoef(so, st)[0, 1]),
                    "spearman": float(np.corrcoef(rank(so), rank(st))[0, 1]),
                    "max_abs_diff": float(np.abs(so - st).max()),
                    "overlap": len(kt & ko) / k,
                    "needle_kept_ours": sum(i in ko for i in needle),
                    "needle_kept_kvpress": sum(i in kt for i in needle),
                })
            res["layers"] = per_layer
            ans, ok = answer(gather([[torch.tensor(sorted(m["keep"]))] * nkv for m in mine]))
            res["answers"][f"kvpress_with_our_sets@{a.ratio}"] = [ans, ok]
            pl = per_layer
            print(f"  pearson min/median {min(x['pearson'] for x in pl):.4f}/{np.median([x['pearson'] for x in pl]):.4f}, "
                  f"spearman min/median {min(x['spearman'] for x in pl):.4f}/{np.median([x['spearman'] for x in pl]):.4f}, "
                  f"overlap min/mean {min(x['overlap'] for x in pl):.3f}/{np.mean([x['overlap'] for x in pl]):.3f}, "
                  f"needle kept (of {len(needle)}) ours/kvpress per layer: "
                  f"{[x['needle_kept_ours'] for x in pl]} / {[x['needle_kept_kvpress'] for x in pl]}",
                  file=sys.stderr, flush=True)
        print("  answers: " + ", ".join(f"{kk}={vv[1]} {vv[0]!r}" for kk, vv in res["answers"].items()),
              file=sys.stderr, flush=True)
        report.append(res)
        if a.json:
            json.dump({"ratio": a.ratio, "trials": report}, open(a.json, "w"), indent=1)


def DynamicCache_from(kv):
    from transformers import DynamicCache
    c = DynamicCache()
    for i, (k, v) in enumerate(kv):
        c.update(k, v, i)
    return c


if __name__ == "__main__":
    main()
