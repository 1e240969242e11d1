"""Stored-KV benchmark (docs/store.md): time to first token with a cached prefix vs without, and
bytes stored per token, per KV codec, through real `kvcrunch serve` processes.

    python3 bench/store/bench_store.py --bin build/kvcrunch --model models/SmolLM2-135M-Instruct.Q4_1.gguf \
        [--redis redis://127.0.0.1:6390] [--prefix 2000] [--reps 3] [--codecs f16,q8_0,q4_0,kivi2,turbo3] \
        [--json out.json]

Per codec and repetition a fresh prefix (a different slice of a PG-19 book) of --prefix tokens plus
a 16-token question is sent three times, streamed, and the time to the first SSE token is taken:
  cold   : server A, nothing cached (the whole prompt computed)
  local  : server A again with a different question (the prefix's blocks from A's memory)
  remote : server B (with --redis), never saw the prefix: its blocks come from Redis
Medians over --reps, and the ratios cold/local, cold/remote (targets: >= 20x, >= 10x).
Bytes: the local cache's bytes per cached token (/metrics) and Redis's own accounting
(MEMORY USAGE per key) next to the codec's KV bytes per token (the cache's bits per value).
"""
import argparse
import glob
import json
import os
import socket
import statistics
import subprocess
import sys
import time

import requests

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(args, extra):
    port = free_port()
    cmd = [args.bin, "serve", "-m", args.model, "--port", str(port), "-c", str(args.prefix + 256),
           "-t", str(args.threads), "--kv-allow", "any", "--prefix-cache", "1GiB", "--kv-budget", "2GiB",
           *extra]
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        if p.poll() is not None:
            raise RuntimeError("server exited: " + p.stderr.read())
        try:
            if requests.get(url + "/health", timeout=1).status_code == 200:
                return p, url
        except requests.RequestException:
            pass
        time.sleep(0.2)
    raise RuntimeError("server not healthy")


def metrics(url):
    out = {}
    for line in requests.get(url + "/metrics").text.splitlines():
        if line.startswith("kvcrunch:") and "{" in line:
            name = line.split("{")[0][len("kvcrunch:"):]
            out[name] = float(line.rsplit(" ", 1)[1])
    return out


def ttft(url, ids, codec):
    body = {"prompt": ids, "max_tokens": 1, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}, "kv": {"k": codec, "v": codec}}
    t0 = time.perf_counter()
    first = None
    cached = None
    with requests.post(url + "/v1/completions", json=body, stream=True, timeout=600) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith(b"data: ") or line == b"data: [DONE]":
                continue
            j = json.loads(line[6:])
            if first is None and j.get("choices") and j["choices"][0].get("text") is not None:
                first = time.perf_counter() - t0
            if j.get("usage"):
                cached = j["usage"]["prompt_tokens_details"]["cached_tokens"]
    return first, cached


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", default="build/kvcrunch")
    ap.add_argument("--model", default="models/SmolLM2-135M-Instruct.Q4_1.gguf")
    ap.add_argument("--redis", default="")
    ap.add_argument("--redis-cli", default="redis-cli")
    ap.add_argument("--prefix", type=int, default=2000)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--codecs", default="f16,q8_0,q4_0,kivi2,turbo3")
    ap.add_argument("--json", default="")
    args = ap.parse_args()
    book = sorted(glob.glob(os.path.join(ROOT, "..", "shared", "data", "pg19", "*.txt")))[1]
    text = open(book, encoding="utf-8").read()
    extra = ["--kv-store", args.redis] if args.redis else []
    a_proc, a = start(args, extra)
    b_proc, b = start(args, extra) if args.redis else (None, None)
    rows = []
    try:
        toks = requests.post(a + "/tokenize", json={"content": text[:2_000_000]}).json()["tokens"]
        q1 = requests.post(a + "/tokenize", json={"content": " Question: who speaks first here?"}).json()["tokens"]
        q2 = requests.post(a + "/tokenize", json={"content": " Question: where does it happen?"}).json()["tokens"]
        off = 0
        for codec in args.codecs.split(","):
            res = {"cold": [], "local": [], "remote": []}
            cached = {"local": [], "remote": []}
            m0 = metrics(a)
            for rep in range(args.reps):
                prefix = toks[off:off + args.prefix]
                off += args.prefix
                t, _ = ttft(a, prefix + q1, codec)
                res["cold"].append(t)
                t, c = ttft(a, prefix + q2, codec)
                res["local"].append(t)
                cached["local"].append(c)
                if b:
                    time.sleep(0.5)  # the worker thread writes A's blocks to Redis
                    t, c = ttft(b, prefix + q2, codec)
                    res["remote"].append(t)
                    cached["remote"].append(c)
            m1 = metrics(a)
            stored = m1.get("prefix_cache_bytes", 0) - m0.get("prefix_cache_bytes", 0)
            # Blocks stored cover the prefix's full blocks plus whatever q1/q2 completed.
            tokens = (m1.get("prefix_cache_blocks_stored_total", 0) - m0.get("prefix_cache_blocks_stored_total", 0))
            row = {"codec": codec, "prefix_tokens": args.prefix,
                   "ttft_cold_s": statistics.median(res["cold"]),
                   "ttft_local_s": statistics.median(res["local"]),
                   "cached_local": cached["local"],
                   "stored_bytes": stored, "stored_records": tokens}
            row["speedup_local"] = row["ttft_cold_s"] / row["ttft_local_s"]
            if b:
                row["ttft_remote_s"] = statistics.median(res["remote"])
                row["cached_remote"] = cached["remote"]
                row["speedup_remote"] = row["ttft_cold_s"] / row["ttft_remote_s"]
            rows.append(row)
            print(json.dumps(row), flush=True)
    finally:
        for p in (a_proc, b_proc):
            if p:
                p.kill()
    print()
    print("| codec | TTFT cold | TTFT local hit | × | TTFT Redis hit | × |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        rem = (f"{r['ttft_remote_s'] * 1000:.0f} ms | {r['speedup_remote']:.1f}×" if "ttft_remote_s" in r
               else "– | –")
        print(f"| {r['codec']} | {r['ttft_cold_s'] * 1000:.0f} ms | {r['ttft_local_s'] * 1000:.0f} ms | "
              f"{r['speedup_local']:.1f}× | {rem} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": os.uname().nodename, "cpu": open("/proc/cpuinfo").read().split("model name")[1].split("\n")[0].strip(": "),
                       "args": vars(args), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    sys.exit(main())
