#!/usr/bin/env python3
"""llama.cpp perplexity (llama-perplexity's protocol) through llama-cpp-python.

Mirrors tools/perplexity/perplexity.cpp, perplexity() (default, ppl_stride 0):
  * tokens = tokenize(whole file, add_special=True): a BOS is prepended only if
    the vocab says add_bos (SmolLM2: tokenizer.ggml.add_bos_token = False -> none);
    special tokens are not parsed (parse_special = false).
  * n_chunk = min(--chunks, len(tokens) // n_ctx); chunk c = tokens[c*n_ctx:(c+1)*n_ctx],
    evaluated from an empty KV cache; if add_bos, its first token is *replaced*
    by BOS for the evaluation (not inserted).
  * first = n_ctx/2; the logits at positions i = first .. n_ctx-2 score token i+1:
    NLL_i = -log_softmax(logits_i)[tok_{i+1}], i.e. n_ctx/2 - 1 scored tokens per
    chunk (255 at -c 512). ppl = exp(sum NLL / count), accumulated in double.
  * the file must hold >= 2*n_ctx tokens.
llama-perplexity batches n_batch/n_ctx chunks as parallel sequences (default
n_batch 2048 -> 4 seqs); here each chunk is one sequence evaluated with
n_batch = n_ubatch = n_ctx. The math is the same (sequences never see each other).

KV rotation: llama.cpp PR #21038 (in the llama.cpp that llama-cpp-python 0.3.36 vendors) rotates
Q/K/V by a Walsh-Hadamard matrix whenever the K (resp. V) cache type is quantized and the head
dim is a multiple of 64 (attn_rot_k / attn_rot_v; SmolLM2: head dim 64 -> on for q8_0 AND q4_0).
--no-attn-rot sets LLAMA_ATTN_ROT_DISABLE=1 (its kill switch) for plain ggml blocks. The script
captures llama.cpp's own log and reports what the context really used (n_ctx, n_batch, n_ubatch,
flash attention, K/V cache types, attn_rot_k/v) in the JSON ("llama_log") and on stderr.

Usage:
  python3 bench/compare/llamacpp_perplexity.py -m models/SmolLM2-135M-Instruct.Q4_1.gguf \
      -f /work/shared/data/wikitext-2-raw/wiki.test.raw -c 512 [--chunks N] \
      [--cache-type-k f16|q8_0|q4_0] [--cache-type-v ...] [--threads 2] [--no-attn-rot] [--json [PATH]]
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import sys
import time

import numpy as np

# GGML type ids (ggml.h enum ggml_type) for the KV cache.
GGML_TYPES = {"f32": 0, "f16": 1, "q4_0": 2, "q4_1": 3, "q5_0": 6, "q5_1": 7, "q8_0": 8,
              "bf16": 30}


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


_LOG_LINES: list[str] = []
_LOG_CB = None  # keep the ctypes callback alive


def capture_llama_log() -> None:
    """Route llama.cpp's log into _LOG_LINES (instead of llama-cpp-python's verbose-gated print)."""
    global _LOG_CB
    if _LOG_CB is not None:
        return
    import ctypes
    import llama_cpp
    import llama_cpp._logger  # noqa: F401  (installs its callback first; ours replaces it)
    buf = []

    @llama_cpp.llama_log_callback
    def _cb(level, text, user_data):
        t = text.decode("utf-8", "replace")
        buf.append(t)
        if t.endswith("\n"):
            _LOG_LINES.append("".join(buf).rstrip("\n"))
            buf.clear()
    _LOG_CB = _cb
    llama_cpp.llama_log_set(_LOG_CB, ctypes.c_void_p(0))


def parse_llama_log(lines: list[str]) -> dict:
    """What the context really used, from llama.cpp's own log lines."""
    out: dict = {}
    pats = {
        "n_ctx": r"llama_context: n_ctx\s+=\s+(\d+)",
        "n_batch": r"llama_context: n_batch\s+=\s+(\d+)",
        "n_ubatch": r"llama_context: n_ubatch\s+=\s+(\d+)",
        "flash_attn": r"llama_context: flash_attn\s+=\s+(\S+)",
        "n_ctx_train": r"n_ctx_train\s+=\s+(\d+)",
        "attn_rot_k": r"attn_rot_k = (\d+)",
        "attn_rot_v": r"attn_rot_v = (\d+)",
        "kv_cache_k": r"llama_kv_cache: size = .*K \((\w+)\)",
        "kv_cache_v": r"llama_kv_cache: size = .*V \((\w+)\)",
        "kv_cache_size": r"llama_kv_cache: size = (.*)",
        "attn_rot_disabled_warning": r"(attention rotation force disabled)",
    }
    for k, pat in pats.items():
        for ln in lines:
            m = re.search(pat, ln)
            if m:
                v = m.group(1)
                out[k] = int(v) if v.isdigit() else v.strip()
                break
    return out


def make_llama(model: str, n_ctx: int, threads: int, type_k: str, type_v: str,
               flash_attn: bool, logits_all: bool, n_batch: int | None = None,
               extra_bufts: bool = False):
    """extra_bufts=False loads weights without ggml's "extra" CPU buffer types
    (AMX, repack): on this project's machines (Xeon with AMX, sandboxed) the AMX
    matmul segfaults on the first decode. Q4_1 has no repack kernel anyway; the
    Q8_0 output matrix loses its repacked gemv (small effect)."""
    try:
        import llama_cpp
        import llama_cpp.llama_cpp as _lc
        from llama_cpp import Llama
    except ImportError as e:
        raise SystemExit(f"llama-cpp-python missing ({e}); run bench/compare/install_peers.sh")
    if not extra_bufts and not getattr(_lc, "_kvcrunch_patched", False):
        _orig = _lc.llama_model_default_params

        def _params():
            p = _orig()
            p.use_extra_bufts = False
            return p
        # Llama.__init__ calls llama_cpp.llama_model_default_params(); no kwarg exposes it.
        _lc.llama_model_default_params = _params
        llama_cpp.llama_model_default_params = _params
        _lc._kvcrunch_patched = True
    if type_v not in ("f16", "f32", "bf16") and not flash_attn:
        raise SystemExit("a quantized V cache needs flash attention (drop --no-flash-attn)")
    nb = n_batch or n_ctx
    return Llama(model_path=model, n_ctx=n_ctx, n_batch=nb, n_ubatch=nb,
                 n_threads=threads, n_threads_batch=threads, logits_all=logits_all,
                 type_k=GGML_TYPES[type_k], type_v=GGML_TYPES[type_v],
                 flash_attn=flash_attn, n_gpu_layers=0, verbose=False)


def log_softmax_at(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Per row: log_softmax(logits[r])[targets[r]], in float64 (as perplexity.cpp)."""
    lg = logits.astype(np.float64)
    mx = lg.max(axis=1, keepdims=True)
    lse = np.log(np.exp(lg - mx).sum(axis=1)) + mx[:, 0]
    return lg[np.arange(lg.shape[0]), targets] - lse


def perplexity(llm, tokens: list[int], n_ctx: int, n_chunks: int, add_bos: bool, bos: int,
               progress: bool = True) -> dict:
    n_chunk_max = len(tokens) // n_ctx
    n_chunk = n_chunk_max if n_chunks < 0 else min(n_chunks, n_chunk_max)
    first = n_ctx // 2
    nll = nll2 = 0.0
    count = 0
    t_eval = 0.0
    ppl_per_chunk = []
    nll_tokens = []
    for c in range(n_chunk):
        chunk = list(tokens[c * n_ctx:(c + 1) * n_ctx])
        if add_bos:
            chunk[0] = bos
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(chunk)
        t_eval += time.perf_counter() - t0
        logits = np.asarray(llm.scores[first:n_ctx - 1])  # positions first .. n_ctx-2
        targets = np.asarray(tokens[c * n_ctx + first + 1:(c + 1) * n_ctx])  # original tokens
        lp = log_softmax_at(logits, targets)
        nll_tokens.extend((-lp).tolist())
        nll += float(-lp.sum())
        nll2 += float((lp * lp).sum())
        count += n_ctx - first - 1
        ppl_per_chunk.append(math.exp(nll / count))
        if progress:
            print(f"[{c + 1}]{ppl_per_chunk[-1]:.4f},", end="", file=sys.stderr, flush=True)
    if progress:
        print(file=sys.stderr)
    av = nll / count
    var = nll2 / count - av * av
    se = math.sqrt(var / (count - 1)) if var > 0 and count > 1 else float("nan")
    return {"ppl": math.exp(av), "ppl_se": math.exp(av) * se, "nll": av, "n_chunks": n_chunk,
            "n_scored": count, "eval_seconds": t_eval,
            "tokens_per_second": n_chunk * n_ctx / t_eval if t_eval > 0 else float("nan"),
            "ppl_per_chunk": ppl_per_chunk, "nll_per_token": nll_tokens}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="llama.cpp perplexity via llama-cpp-python")
    ap.add_argument("-m", "--model", required=True)
    ap.add_argument("-f", "--file", required=True, help="text file (e.g. wiki.test.raw)")
    ap.add_argument("-c", "--ctx-size", type=int, default=512)
    ap.add_argument("--chunks", type=int, default=-1, help="max chunks (-1: whole file)")
    ap.add_argument("-ctk", "--cache-type-k", default="f16", choices=sorted(GGML_TYPES))
    ap.add_argument("-ctv", "--cache-type-v", default="f16", choices=sorted(GGML_TYPES))
    ap.add_argument("-t", "--threads", type=int, default=2)
    ap.add_argument("--no-flash-attn", action="store_true",
                    help="disable flash attention (llama-perplexity's default 'auto' "
                         "enables it on CPU; quantized V requires it)")
    ap.add_argument("--no-attn-rot", action="store_true",
                    help="set LLAMA_ATTN_ROT_DISABLE=1: no Hadamard rotation of a quantized "
                         "K/V cache (llama.cpp rotates by default since PR #21038)")
    ap.add_argument("--extra-bufts", action="store_true",
                    help="allow ggml's AMX/repack weight buffers (AMX crashes on our machines)")
    ap.add_argument("--json", nargs="?", const="-", metavar="PATH",
                    help="write results as JSON to PATH (or stdout when no PATH)")
    ap.add_argument("-q", "--quiet", action="store_true")
    a = ap.parse_args(argv)
    if a.ctx_size < 4 or a.ctx_size % 2:
        ap.error("-c must be even and >= 4")

    if a.no_attn_rot:
        os.environ["LLAMA_ATTN_ROT_DISABLE"] = "1"  # read by llama_kv_cache's constructor
    capture_llama_log()
    llm = make_llama(a.model, a.ctx_size, a.threads, a.cache_type_k, a.cache_type_v,
                     not a.no_flash_attn, logits_all=True, extra_bufts=a.extra_bufts)
    import llama_cpp
    info = parse_llama_log(_LOG_LINES)
    info.update({"api_n_ctx": int(llama_cpp.llama_n_ctx(llm.ctx)),
                 "api_n_batch": int(llama_cpp.llama_n_batch(llm.ctx)),
                 "api_n_ubatch": int(llama_cpp.llama_n_ubatch(llm.ctx)),
                 "LLAMA_ATTN_ROT_DISABLE": os.environ.get("LLAMA_ATTN_ROT_DISABLE")})
    if not a.quiet:
        print("llama.cpp context: " + ", ".join(f"{k}={v}" for k, v in info.items()), file=sys.stderr)
    if info["api_n_ctx"] < a.ctx_size:
        print(f"llama.cpp gave n_ctx {info['api_n_ctx']} < {a.ctx_size}", file=sys.stderr)
        return 1
    vocab = llama_cpp.llama_model_get_vocab(llm.model)
    add_bos = bool(llama_cpp.llama_vocab_get_add_bos(vocab))
    bos = int(llama_cpp.llama_vocab_bos(vocab))

    with open(a.file, "rb") as f:
        text = f.read()
    t0 = time.perf_counter()
    tokens = llm.tokenize(text, add_bos=True, special=False)  # add_bos -> add_special
    t_tok = time.perf_counter() - t0
    if len(tokens) < 2 * a.ctx_size:
        print(f"need at least {2 * a.ctx_size} tokens, file has {len(tokens)}", file=sys.stderr)
        return 1
    if not a.quiet:
        print(f"tokenized {len(tokens)} tokens in {t_tok:.2f}s (add_bos={add_bos}); "
              f"{len(tokens) // a.ctx_size} chunks available", file=sys.stderr)

    r = perplexity(llm, tokens, a.ctx_size, a.chunks, add_bos, bos, progress=not a.quiet)
    r.update({"model": os.path.basename(a.model), "file": a.file, "n_ctx": a.ctx_size,
              "n_tokens_file": len(tokens), "add_bos": add_bos,
              "cache_type_k": a.cache_type_k, "cache_type_v": a.cache_type_v,
              "flash_attn": not a.no_flash_attn, "threads": a.threads, "cpu": cpu_model(),
              "attn_rot_disabled": a.no_attn_rot, "llama_log": info,
              "llama_cpp_python": llama_cpp.__version__})
    print(f"ppl = {r['ppl']:.4f} +/- {r['ppl_se']:.4f}  ({r['n_chunks']} chunks x {a.ctx_size}, "
          f"{r['n_scored']} scored tokens, K={a.cache_type_k} V={a.cache_type_v}); "
          f"eval {r['tokens_per_second']:.1f} tokens/s on {a.threads} threads")
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
