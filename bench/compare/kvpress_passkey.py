#!/usr/bin/env python3
"""Passkey retrieval with NVIDIA kvpress presses on the same model and the same prompts as kvcrunch.

The prompts come from `kvcrunch retrieval --task passkey ... --dump-prompts FILE` (token ids of the
context and of the question for every trial, plus the expected key), so both runtimes see exactly
the same token ids: nothing is re-tokenized here.

Protocol = kvpress's KVPressTextGenerationPipeline._forward: the context is prefilled through
`model.model` inside `with press(model)` (the press compresses every layer's cache right after that
layer's attention), then the question + a greedy answer go through the pipeline's own
`generate_answer` (question positions start at the *original* context length; the question is not
compressed). Scoring = kvcrunch's: the answer with leading spaces removed starts with the key.

KV bytes, measured after the context is compressed and before the question:
  tensor_bytes   sum over layers of keys/values .numel() * .element_size()  (what the cache holds)
  storage_bytes  sum of the distinct underlying storages' nbytes (a view of a bigger tensor would
                 keep the whole storage alive; this catches it)
  masked         kvpress presses that mask instead of gathering (AdaKV) keep every token's tensor.
Torch on CPU has no allocator statistics; VmHWM (peak RSS of the process) is reported per run.

Usage (see bench/compare/README.md and docs/kvpress.md):
  build-h2/kvcrunch -m MODEL retrieval --task passkey --lengths 1024 --seeds 2 --dump-prompts p.json
  $VENV/bin/python bench/compare/kvpress_passkey.py -m MODEL --prompts p.json \
      --ratios 0.25,0.5,0.75,0.9 --json out.json
"""
import argparse
import json
import os
import sys
import time


def vm(field):
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def cache_bytes(cache):
    tensor = 0
    storages = {}
    tokens = []
    for layer in cache.layers:
        for t in (layer.keys, layer.values):
            if t is None or t.numel() == 0:
                continue
            tensor += t.numel() * t.element_size()
            st = t.untyped_storage()
            storages[st.data_ptr()] = st.nbytes()
        if layer.keys is not None and layer.keys.dim() == 4:
            tokens.append(int(layer.keys.shape[2]))
    return tensor, sum(storages.values()), tokens


def make_presses(names, ratio):
    import kvpress

    out = {}
    for name in names:
        if name == "full":
            continue
        if name == "AdaKVPress":
            out[name] = kvpress.AdaKVPress(kvpress.SnapKVPress(compression_ratio=ratio))
        elif name == "PyramidKVPress":
            out[name] = kvpress.PyramidKVPress(compression_ratio=ratio)
        else:
            out[name] = getattr(kvpress, name)(compression_ratio=ratio)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-m", "--model", required=True, help="GGUF file (transformers loads it with gguf_file=)")
    ap.add_argument("--prompts", required=True, help="JSON from kvcrunch retrieval --dump-prompts")
    ap.add_argument("--ratios", default="0.25,0.5,0.75,0.9", help="kvpress compression_ratio (fraction removed)")
    ap.add_argument("--presses", default="SnapKVPress,StreamingLLMPress,TOVAPress,KnormPress,"
                    "ExpectedAttentionPress,ObservedAttentionPress,PyramidKVPress",
                    help="kvpress class names (AdaKVPress needs sdpa attention and only masks)")
    ap.add_argument("--no-full", action="store_true", help="skip the uncompressed baseline")
    ap.add_argument("--lengths", default="", help="only these trial lengths (comma list)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--max-trials", type=int, default=0, help="only the first N trials (smoke test)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--max-new-tokens", type=int, default=8)
    ap.add_argument("--json", default="", help="write all results here")
    ap.add_argument("--mode", default="shared", choices=["shared", "pipeline"],
                    help="shared: one prefill per trial, every press compresses each layer in one hook "
                         "(identical caches, see --verify); pipeline: one prefill per press (slow)")
    ap.add_argument("--verify", type=int, default=0,
                    help="for the first N trials, rerun the first presses through kvpress's own hooks "
                         "and check the caches are identical")
    a = ap.parse_args()

    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache
    import kvpress
    from kvpress.pipeline import KVPressTextGenerationPipeline

    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    d = os.path.dirname(os.path.abspath(a.model))
    f = os.path.basename(a.model)
    dtype = getattr(torch, a.dtype)
    t0 = time.time()
    tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
    # eager attention: ObservedAttentionPress needs the attention weights; the other presses
    # compute what they need from the hidden states / keys.
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=dtype, attn_implementation="eager")
    model.eval()
    pipe = KVPressTextGenerationPipeline(model=model, tokenizer=tok, device="cpu")
    print(f"loaded {f} in {time.time() - t0:.1f}s: {model.config.num_hidden_layers} layers, "
          f"{model.config.num_key_value_heads} KV heads, dtype {dtype}", file=sys.stderr)

    P = json.load(open(a.prompts))
    trials = P["trials"]
    if a.lengths:
        keep = {int(x) for x in a.lengths.split(",")}
        trials = [t for t in trials if t["length"] in keep]
    if a.max_trials:
        trials = trials[:a.max_trials]
    ratios = [float(r) for r in a.ratios.split(",") if r]
    names = [n for n in a.presses.split(",") if n]
    verified = []
    runs = [] if a.no_full else [("full", 0.0, None)]
    for r in ratios:
        for n, p in make_presses(names, r).items():
            runs.append((n, r, p))

    for _, _, p in runs:
        if p is not None:
            p.post_init_from_model(model)
    for layer in model.model.layers:  # what BasePress.__call__ sets up before hooking
        layer.self_attn.rotary_emb = model.model.rotary_emb
    attn_layers = [layer.self_attn for layer in model.model.layers]

    def run_press(press, ctx):
        """kvpress's own path: press(model) hooks during the context prefill."""
        cache = DynamicCache()
        with press(model) if press is not None else _null():
            model.model(input_ids=ctx, past_key_values=cache)
        return [(l.keys, l.values) for l in cache.layers]

    def shared_prefill(ctx, presses):
        """One full prefill; after each layer's attention every press compresses that layer's
        keys/values exactly as its own forward_hook would (same module, hidden_states, keys,
        values, attention weights and kwargs). A kvpress prefill hook never changes the layer's
        output, so every press sees the same inputs it would see alone; --verify checks this."""
        kept = {name: [] for name, _ in presses}

        def hook(module, args, kwargs, output):
            layer = kwargs["past_key_values"].layers[module.layer_idx]
            for name, press in presses:
                k, v = press.compress(module, kwargs["hidden_states"], layer.keys, layer.values,
                                      output[1], kwargs)
                kept[name].append((k, v))
            return output

        hs = [m.register_forward_hook(hook, with_kwargs=True) for m in attn_layers]
        try:
            full = DynamicCache()
            model.model(input_ids=ctx, past_key_values=full)
        finally:
            for h in hs:
                h.remove()
        kept["full"] = [(l.keys, l.values) for l in full.layers]
        return kept

    def to_cache(kv):
        c = DynamicCache()
        for i, (k, v) in enumerate(kv):
            c.update(k, v, i)
        return c

    results = {(name, ratio): {"press": name, "ratio": ratio, "n": 0, "ok": 0, "rows": [],
                               "press_repr": repr(p) if p is not None else "none"}
               for name, ratio, p in runs}
    presses = [(f"{name}@{ratio}", p) for name, ratio, p in runs if p is not None]
    tstart = time.time()
    for ti, t in enumerate(trials):
        ctx = torch.tensor([t["context_ids"]], dtype=torch.long)
        q = torch.tensor([t["question_ids"]], dtype=torch.long)
        t1 = time.time()
        with torch.inference_mode():
            if a.mode == "shared":
                kept = shared_prefill(ctx, presses)
            else:
                kept = {f"{n}@{r}" if p is not None else "full": run_press(p, ctx) for n, r, p in runs}
            if a.verify and ti < a.verify:
                for n, r, p in runs[:4]:
                    if p is None:
                        continue
                    own = run_press(p, ctx)
                    same = all(torch.equal(k1, k2) and torch.equal(v1, v2)
                               for (k1, v1), (k2, v2) in zip(own, kept[f"{n}@{r}"]))
                    verified.append({"trial": ti, "press": n, "ratio": r, "identical_cache": same})
                    print(f"verify {n} r={r}: kvpress's own hook path gives an identical cache: {same}",
                          file=sys.stderr, flush=True)
            t2 = time.time()
            for name, ratio, p in runs:
                kv = kept["full" if p is None else f"{name}@{ratio}"]
                cache = to_cache(kv)
                tb, sb, toks = cache_bytes(cache)
                note = None
                try:
                    ans = pipe.generate_answer(question_ids=q, cache=cache, context_length=ctx.shape[1],
                                               max_new_tokens=a.max_new_tokens)
                except RuntimeError as e:
                    # Layers of different lengths (PyramidKVPress) break transformers' eager causal
                    # mask for the multi-token question; retry the answer with sdpa attention.
                    note = f"eager failed ({str(e)[:80]}); answered with sdpa"
                    cache = to_cache(kv)
                    model.set_attn_implementation("sdpa")
                    try:
                        ans = pipe.generate_answer(question_ids=q, cache=cache, context_length=ctx.shape[1],
                                                   max_new_tokens=a.max_new_tokens)
                    except RuntimeError as e2:
                        ans, note = "", f"eager and sdpa failed: {str(e2)[:120]}"
                    finally:
                        model.set_attn_implementation("eager")
                hit = ans.lstrip(" ").startswith(t["expected"])
                R = results[(name, ratio)]
                R["n"] += 1
                R["ok"] += hit
                R["rows"].append({"length": t["length"], "depth": t["depth"], "seed": t["seed"],
                                  "key": t["key"], "n_context": len(t["context_ids"]), "output": ans,
                                  "correct": bool(hit), "kv_tensor_bytes": tb, "kv_storage_bytes": sb,
                                  "tokens_per_layer_min": min(toks), "tokens_per_layer_max": max(toks),
                                  **({"note": note} if note else {})})
                del cache
        del kept
        print(f"trial {ti + 1}/{len(trials)} (len {t['length']}, depth {t['depth']}, seed {t['seed']}): "
              f"prefill {t2 - t1:.1f}s, {len(runs)} answers {time.time() - t2:.1f}s", file=sys.stderr, flush=True)
        for R in results.values():
            R["accuracy"] = R["ok"] / R["n"]
        if a.json:  # keep partial results
            _write(a, P, list(results.values()), model, dtype, verified, time.time() - tstart)
    for R in results.values():
        mb = sum(r["kv_tensor_bytes"] for r in R["rows"]) / max(1, R["n"])
        print(f"{R['press']:<24} r={R['ratio']:<5} acc={R['accuracy']:.3f} n={R['n']} "
              f"kv_tensor_bytes(mean)={mb:,.0f}", file=sys.stderr)


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *x):
        return False


def _write(a, P, results, model, dtype, verified, seconds):
    import torch
    import transformers
    import kvpress

    try:
        from importlib.metadata import version
        kv_ver = version("kvpress")
    except Exception:
        kv_ver = getattr(kvpress, "__version__", "?")
    out = {"model": os.path.abspath(a.model), "prompts": os.path.abspath(a.prompts),
           "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                        "kvpress": kv_ver, "python": sys.version.split()[0]},
           "dtype": str(dtype), "threads": a.threads, "attn_implementation": "eager",
           "protocol": "kvpress pipeline: press(model) over model.model(context), then "
                       "pipeline.generate_answer(question) at positions from the original context length",
           "mode": a.mode, "verified": verified, "seconds": seconds,
           "results": results}
    with open(a.json, "w") as f:
        json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
