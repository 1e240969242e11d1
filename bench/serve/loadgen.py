#!/usr/bin/env python3
"""Load generator for OpenAI-compatible completion servers (kvcrunch serve, llama-server),
after `vllm bench serve` and llama.cpp's scripts/server-bench.py. Loopback only.

* closed loop (default): --concurrency N clients, each sends its next request when its previous
  one finished; or open loop: --request-rate R (req/s) with gamma(--burstiness) inter-arrival
  gaps (1 = Poisson), optionally capped by --max-concurrency.
* prompts: disjoint passages of the books in --data-dir (PG-19 style), cut to --prompt-tokens
  with the server's own tokenizer (POST /tokenize {"content": text} -> {"tokens": [...]}), sent
  as text to POST /v1/completions with max_tokens, ignore_eos, temperature 0, stream, and
  stream_options.include_usage; output length verified from the final usage chunk.
* bounded: --num-requests and --max-duration (wall clock; requests still running then are
  cancelled and reported as cancelled, not as failures).
* side channels: GET /metrics every --scrape-interval s (max running sequences, peak KV bytes),
  /proc/PID/status of --server-pid (RSS samples, VmHWM).

Prints one markdown row; --json PATH writes everything (per-request records included).
Needs aiohttp (bench/serve/requirements.txt; run.sh sets up a venv).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import sys
import time

import aiohttp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchlib as bl  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_DATA = os.path.normpath(os.path.join(HERE, "..", "..", "..", "shared", "data", "pg19"))


def check_loopback(url: str) -> None:
    from urllib.parse import urlparse
    host = urlparse(url).hostname
    if host not in ("127.0.0.1", "localhost", "::1"):
        raise SystemExit(f"refusing non-loopback server {url!r}: this benchmark is loopback only")


async def tokenize_count(session: aiohttp.ClientSession, base: str, text: str) -> int:
    async with session.post(f"{base}/tokenize", json={"content": text}) as r:
        if r.status != 200:
            raise RuntimeError(f"/tokenize -> HTTP {r.status}: {(await r.text())[:200]}")
        return len((await r.json())["tokens"])


async def build_prompts(session, base, n, target, data_dir, seed, log) -> list[dict]:
    books = bl.load_books(data_dir)
    window = max(256, target * 8)  # English prose here: ~4-5 chars/token; 8 leaves margin
    passages = bl.passage_windows(books, n, window, seed)
    out = []
    t0 = time.perf_counter()
    sem = asyncio.Semaphore(4)

    async def one(i, name, off, text):
        cache: dict[int, int] = {}

        async def count(s: str) -> int:
            if len(s) not in cache:
                cache[len(s)] = await tokenize_count(session, base, s)
            return cache[len(s)]
        # bisection needs sequential calls; run the awaitables one by one
        n_full = await count(text)
        if n_full < target:
            raise RuntimeError(f"passage {name}@{off} has only {n_full} tokens < {target}")
        lo, hi, lo_n = 0, len(text), 0
        guess = max(1, min(len(text) - 1, int(len(text) * target / n_full)))
        g = await count(text[:guess])
        if g <= target:
            lo, lo_n = guess, g
        else:
            hi = guess
        it = 0
        while hi - lo > 1 and lo_n != target and it < 24:
            mid = (lo + hi) // 2
            m = await count(text[:mid])
            if m <= target:
                lo, lo_n = mid, m
            else:
                hi = mid
            it += 1
        return {"idx": i, "book": name, "offset": off, "prompt": text[:lo], "tokens": lo_n}

    async def guarded(*a):
        async with sem:
            return await one(*a)
    out = await asyncio.gather(*(guarded(i, *p) for i, p in enumerate(passages)))
    toks = [p["tokens"] for p in out]
    log(f"prepared {n} prompts in {time.perf_counter() - t0:.1f} s: tokens min {min(toks)} "
        f"max {max(toks)} (target {target}), from {len(books)} books")
    return out


async def stream_completion(session, base, model, prompt, max_tokens, rec: bl.RequestRecord,
                            extra_body: dict) -> None:
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}
    if model:
        body["model"] = model
    body.update(extra_body)
    res = bl.StreamResult()
    parser = bl.SSEParser()
    rec.start = time.perf_counter()
    try:
        async with session.post(f"{base}/v1/completions", json=body) as r:
            rec.status = r.status
            if r.status != 200:
                rec.error = (await r.text())[:300]
                rec.end = time.perf_counter()
                rec.outcome = f"http_{r.status}"
                return
            async for chunk in r.content.iter_any():
                t = time.perf_counter()
                for payload in parser.feed(chunk):
                    bl.consume_event(res, payload, t)
            t = time.perf_counter()
            for payload in parser.flush():
                bl.consume_event(res, payload, t)
        rec.end = time.perf_counter()
        rec.chunk_times = res.chunk_times
        rec.ttft = (res.chunk_times[0] - rec.start) if res.chunk_times else None
        rec.usage = res.usage
        rec.error = res.error
        rec.outcome = bl.classify(rec, res, rec.status, max_tokens)
    except asyncio.CancelledError:
        rec.end = time.perf_counter()
        rec.chunk_times = res.chunk_times
        rec.outcome = "cancelled"
        raise
    except Exception as e:  # connection reset, timeout, ...
        rec.end = time.perf_counter()
        rec.chunk_times = res.chunk_times
        rec.outcome = f"exception:{type(e).__name__}"
        rec.error = str(e)[:300]


class Scraper:
    """Polls /metrics and /proc/PID/status until stopped (bounded by the run's own bound)."""

    def __init__(self, session, base, flavor, pid, interval):
        self.session, self.base, self.pid, self.interval = session, base, pid, interval
        self.running_name, self.kv_name, self.budget_name = bl.METRIC_FLAVORS.get(flavor, (None, None, None))
        self.max_running = None
        self.peak_kv = None
        self.kv_budget = None
        self.samples: list[dict] = []
        self.metrics_errors = 0
        self._stop = asyncio.Event()

    async def run(self, t0):
        while not self._stop.is_set():
            s = {"t": round(time.perf_counter() - t0, 3)}
            if self.running_name:
                try:
                    async with self.session.get(f"{self.base}/metrics",
                                                timeout=aiohttp.ClientTimeout(total=5)) as r:
                        if r.status == 200:
                            m = bl.parse_prometheus(await r.text())
                            if self.running_name in m:
                                s["running"] = m[self.running_name]
                                self.max_running = max(self.max_running or 0, int(m[self.running_name]))
                            if self.kv_name and self.kv_name in m:
                                s["kv_bytes"] = m[self.kv_name]
                                self.peak_kv = max(self.peak_kv or 0, int(m[self.kv_name]))
                            if self.budget_name and self.budget_name in m:
                                self.kv_budget = int(m[self.budget_name])
                        else:
                            self.metrics_errors += 1
                except Exception:
                    self.metrics_errors += 1
            if self.pid:
                st = bl.read_proc_status(self.pid)
                if "VmRSS" in st:
                    s["rss"] = st["VmRSS"]
            self.samples.append(s)
            try:
                await asyncio.wait_for(self._stop.wait(), timeout=self.interval)
            except asyncio.TimeoutError:
                pass

    def stop(self):
        self._stop.set()


def rss_flatness(samples: list[dict], window_s: float = 60.0) -> dict | None:
    pts = [(s["t"], s["rss"]) for s in samples if "rss" in s]
    if len(pts) < 4:
        return None
    t_end = pts[-1][0]
    if t_end < 2 * window_s:
        window_s = t_end / 3
    first = [r for t, r in pts if t <= pts[0][0] + window_s]
    last = [r for t, r in pts if t >= t_end - window_s]
    f, l = sum(first) / len(first), sum(last) / len(last)
    return {"window_s": window_s, "first_mean_bytes": f, "last_mean_bytes": l,
            "growth_pct": 100.0 * (l - f) / f if f else float("nan"),
            "max_bytes": max(r for _, r in pts), "samples": len(pts)}


async def main_async(a) -> dict:
    log = (lambda m: print(f"[loadgen {a.label}] {m}", file=sys.stderr, flush=True))
    base = a.base_url.rstrip("/")
    check_loopback(base)
    slo = bl.parse_slo(a.slo)
    extra_body = json.loads(a.extra_body) if a.extra_body else {}
    # One TCP connection per request (loopback, cheap): reusing pooled keep-alive connections raced
    # with the server closing idle ones ("Can not write request body", 1 of 73 requests in a
    # 64-client soak against llama-server), a client artefact counted as a server failure.
    conn = aiohttp.TCPConnector(limit=0, force_close=True)
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=30, sock_read=a.request_timeout)
    async with aiohttp.ClientSession(connector=conn, timeout=timeout) as session:
        prompts = await build_prompts(session, base, a.num_requests, a.prompt_tokens, a.data_dir, a.seed, log)

        # one short warm-up request (not counted): endpoint works, usage chunk arrives
        warm = bl.RequestRecord(-1, 16, 0, 4)
        await stream_completion(session, base, a.model, "Once upon a time", 4, warm, extra_body)
        if warm.outcome != "ok":
            log(f"warm-up request: {warm.outcome} {warm.error or ''} usage={warm.usage}")
            if warm.outcome.startswith(("http_", "exception")):
                raise SystemExit("server does not answer /v1/completions; stopping")

        records = [bl.RequestRecord(p["idx"], a.prompt_tokens, p["tokens"], a.output_tokens) for p in prompts]
        scraper = Scraper(session, base, a.metrics_flavor, a.server_pid, a.scrape_interval)
        t0 = time.perf_counter()
        scrape_task = asyncio.create_task(scraper.run(t0))
        deadline = t0 + a.max_duration
        in_flight = 0
        max_in_flight = 0

        async def do(i):
            nonlocal in_flight, max_in_flight
            in_flight += 1
            max_in_flight = max(max_in_flight, in_flight)
            try:
                await stream_completion(session, base, a.model, prompts[i]["prompt"], a.output_tokens,
                                        records[i], extra_body)
            finally:
                in_flight -= 1

        tasks: list[asyncio.Task] = []
        if math.isinf(a.request_rate):
            mode = f"closed loop, {a.concurrency} clients"
            next_i = 0

            async def client():
                nonlocal next_i
                while next_i < len(records) and time.perf_counter() < deadline:
                    i = next_i
                    next_i += 1
                    await do(i)
            tasks = [asyncio.create_task(client()) for _ in range(min(a.concurrency, len(records)))]
        else:
            mode = f"open loop, {a.request_rate} req/s, burstiness {a.burstiness}" + (
                f", max concurrency {a.max_concurrency}" if a.max_concurrency else "")
            offsets = bl.arrival_offsets(len(records), a.request_rate, a.burstiness, a.seed)
            sem = asyncio.Semaphore(a.max_concurrency) if a.max_concurrency else None

            async def arrival(i):
                if sem:
                    async with sem:
                        if time.perf_counter() < deadline:
                            await do(i)
                else:
                    await do(i)

            async def dispatcher():
                sub = []
                for i, off in enumerate(offsets):
                    wait = t0 + off - time.perf_counter()
                    if t0 + off >= deadline:
                        break
                    if wait > 0:
                        await asyncio.sleep(wait)
                    sub.append(asyncio.create_task(arrival(i)))
                try:
                    await asyncio.gather(*sub)
                except asyncio.CancelledError:
                    for s in sub:
                        s.cancel()
                    await asyncio.gather(*sub, return_exceptions=True)
                    raise
            tasks = [asyncio.create_task(dispatcher())]
        log(f"running {len(records)} requests ({a.prompt_tokens} prompt + {a.output_tokens} output tokens), "
            f"{mode}, wall-clock cap {a.max_duration:.0f} s")

        done, pending = await asyncio.wait(tasks, timeout=max(0.0, deadline - time.perf_counter()))
        capped = bool(pending)
        for t in pending:
            t.cancel()
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)
        ends = [r.end for r in records if r.outcome != "pending"]
        t_end = time.perf_counter() if capped else (max(ends) if ends else time.perf_counter())
        duration = t_end - t0
        scraper.stop()
        await scrape_task
        st = bl.read_proc_status(a.server_pid) if a.server_pid else {}

    for t in tasks:
        if not t.cancelled() and t.exception():
            raise t.exception()
    summary = bl.aggregate(records, duration, slo)
    extra = {
        "max_running": scraper.max_running,
        "max_in_flight_client": max_in_flight,
        "peak_kv_bytes": scraper.peak_kv if scraper.peak_kv is not None else a.static_kv_bytes,
        "kv_bytes_source": ("metrics" if scraper.peak_kv is not None
                            else ("computed" if a.static_kv_bytes is not None else None)),
        "kv_budget_bytes_metric": scraper.kv_budget,
        "peak_rss_bytes": st.get("VmHWM"),
        "final_rss_bytes": st.get("VmRSS"),
        "metrics_errors": scraper.metrics_errors,
        "capped_by_duration": capped,
        "mode": mode,
        "rss_flatness": rss_flatness(scraper.samples),
    }
    row = bl.markdown_row(a.label, summary, extra)
    result = {
        "label": a.label, "base_url": base, "workload": a.workload, "args": vars(a),
        "summary": summary, "extra": extra, "markdown_row": row,
        "warmup": {"outcome": warm.outcome, "usage": warm.usage},
        "samples": scraper.samples,
        "requests": [{"idx": r.idx, "book": prompts[r.idx]["book"], "offset": prompts[r.idx]["offset"],
                      "prompt_tokens_measured": r.prompt_tokens_measured, "usage": r.usage,
                      "status": r.status, "outcome": r.outcome, "error": r.error,
                      "start_s": round(r.start - t0, 4) if r.start else None,
                      "ttft_ms": r.ttft * 1e3 if r.ttft is not None else None,
                      "e2el_ms": (r.end - r.start) * 1e3 if r.start else None,
                      "n_chunks": len(r.chunk_times)} for r in records],
    }
    log(f"done in {duration:.1f} s: {summary['completed']} ok, {summary['failed']} failed, "
        f"outcomes {summary['outcomes']}")
    return result


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base-url", default="http://127.0.0.1:8080")
    p.add_argument("--workload", choices=sorted(bl.WORKLOADS), default="decode-heavy")
    p.add_argument("--num-requests", type=int, help="default: the workload's (see benchlib.WORKLOADS)")
    p.add_argument("--quick", action="store_true", help="the workload's reduced request count")
    p.add_argument("--concurrency", type=int, help="closed-loop clients (default: the workload's, 32)")
    p.add_argument("--request-rate", type=float, default=float("inf"),
                   help="open loop: mean arrivals per second (default inf = closed loop)")
    p.add_argument("--burstiness", type=float, default=1.0, help="gamma shape of inter-arrival gaps (1 = Poisson)")
    p.add_argument("--max-concurrency", type=int, default=0, help="open loop: cap on requests in flight")
    p.add_argument("--max-duration", type=float, default=900.0, help="wall-clock cap of the load phase (s)")
    p.add_argument("--request-timeout", type=float, default=600.0, help="max seconds without a byte from the server")
    p.add_argument("--prompt-tokens", type=int)
    p.add_argument("--output-tokens", type=int)
    p.add_argument("--slo", default="ttft=10000,tpot=500", help="goodput SLO in ms, e.g. ttft=10000,tpot=500,e2el=60000")
    p.add_argument("--metrics-flavor", choices=["kvcrunch", "llamacpp", "none"], default="none")
    p.add_argument("--server-pid", type=int, default=0)
    p.add_argument("--static-kv-bytes", type=int, help="KV bytes to report when the server exports none (computed)")
    p.add_argument("--scrape-interval", type=float, default=0.5)
    p.add_argument("--model", default="", help="'model' field of the requests (optional for these servers)")
    p.add_argument("--extra-body", default="", help="JSON merged into every request body")
    p.add_argument("--data-dir", default=os.environ.get("PG19_DIR", DEFAULT_DATA))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--label", default="server")
    p.add_argument("--json", help="write the full result here")
    a = p.parse_args(argv)
    w = bl.WORKLOADS[a.workload]
    if a.num_requests is None:
        a.num_requests = w.quick_requests if a.quick else w.num_requests
    a.concurrency = a.concurrency or w.concurrency
    a.prompt_tokens = a.prompt_tokens or w.prompt_tokens
    a.output_tokens = a.output_tokens or w.output_tokens
    if a.num_requests < 1 or a.num_requests > 100000:
        p.error("--num-requests must be in 1..100000")
    if not (0 < a.max_duration <= 86400):
        p.error("--max-duration must be in (0, 86400]")
    return a


def main(argv=None) -> int:
    a = parse_args(argv)
    res = asyncio.run(main_async(a))
    if a.json:
        os.makedirs(os.path.dirname(os.path.abspath(a.json)), exist_ok=True)
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1, default=lambda o: None if isinstance(o, float) and math.isnan(o) else str(o))
    print(res["markdown_row"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
