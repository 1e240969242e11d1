#!/usr/bin/env python3
"""llama.cpp CPU speed through llama-cpp-python, comparable to llama-bench:

  pp: prompt processing of --n-prompt tokens (default 512) in one batch from an
      empty cache  -> tokens/s  (llama-bench "pp512")
  tg: decode of --n-gen tokens (default 128) one at a time, after a --depth
      token context (default 512) is already in the cache -> tokens/s
      (llama-bench "tg128 @ d512")
Token ids are fixed pseudo-random ids (seeded), not sampled, so nothing but
llama_decode is timed. Each measurement is repeated --reps times (first run is
a warm-up and discarded); the median is reported.

Usage:
  python3 bench/compare/llamacpp_speed.py -m models/SmolLM2-135M-Instruct.Q4_1.gguf -t 2 [--json [PATH]]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from llamacpp_perplexity import GGML_TYPES, cpu_model, make_llama  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("-m", "--model", required=True)
    ap.add_argument("-t", "--threads", type=int, default=2)
    ap.add_argument("-p", "--n-prompt", type=int, default=512)
    ap.add_argument("-n", "--n-gen", type=int, default=128)
    ap.add_argument("-d", "--depth", type=int, default=512)
    ap.add_argument("-r", "--reps", type=int, default=3)
    ap.add_argument("-ctk", "--cache-type-k", default="f16", choices=sorted(GGML_TYPES))
    ap.add_argument("-ctv", "--cache-type-v", default="f16", choices=sorted(GGML_TYPES))
    ap.add_argument("--no-flash-attn", action="store_true")
    ap.add_argument("--extra-bufts", action="store_true",
                    help="allow ggml's AMX/repack weight buffers (AMX crashes on our machines)")
    ap.add_argument("--json", nargs="?", const="-", metavar="PATH")
    a = ap.parse_args(argv)

    n_ctx = max(a.n_prompt, a.depth + a.n_gen)
    llm = make_llama(a.model, n_ctx, a.threads, a.cache_type_k, a.cache_type_v,
                     not a.no_flash_attn, logits_all=False, n_batch=max(a.n_prompt, a.depth),
                     extra_bufts=a.extra_bufts)
    rng = np.random.default_rng(0)
    n_vocab = llm.n_vocab()
    prompt = [int(x) for x in rng.integers(100, n_vocab, a.n_prompt)]
    ctx = [int(x) for x in rng.integers(100, n_vocab, a.depth)]
    gen = [int(x) for x in rng.integers(100, n_vocab, a.n_gen)]

    pp, tg = [], []
    for rep in range(a.reps + 1):
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(prompt)
        dt = time.perf_counter() - t0
        if rep:
            pp.append(a.n_prompt / dt)
    for rep in range(a.reps + 1):
        llm.reset()
        llm.eval(ctx)
        t0 = time.perf_counter()
        for tok in gen:
            llm.eval([tok])
        dt = time.perf_counter() - t0
        if rep:
            tg.append(a.n_gen / dt)
    import llama_cpp
    r = {"model": os.path.basename(a.model), "threads": a.threads, "cpu": cpu_model(),
         "cache_type_k": a.cache_type_k, "cache_type_v": a.cache_type_v,
         "flash_attn": not a.no_flash_attn, "llama_cpp_python": llama_cpp.__version__,
         f"pp{a.n_prompt}_tps": statistics.median(pp), "pp_runs": pp,
         f"tg{a.n_gen}_at_d{a.depth}_tps": statistics.median(tg), "tg_runs": tg}
    print(f"pp{a.n_prompt}: {statistics.median(pp):.1f} tokens/s   "
          f"tg{a.n_gen} @ depth {a.depth}: {statistics.median(tg):.1f} tokens/s   "
          f"({a.threads} threads, K={a.cache_type_k} V={a.cache_type_v})")
    if a.json:
        s = json.dumps(r, indent=1)
        if a.json == "-":
            print(s)
        else:
            with open(a.json, "w") as f:
                f.write(s + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
