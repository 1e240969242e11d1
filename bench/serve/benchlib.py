"""Pure helpers of the serving benchmark (no network): SSE parsing, Prometheus text parsing,
statistics (vLLM `bench serve` definitions), arrival schedules, prompt sources, KV sizing.

Kept free of aiohttp so the unit tests (test_benchlib.py) run with the standard library only.
"""
from __future__ import annotations

import json
import math
import os
import random
import re
from dataclasses import dataclass, field
from typing import Iterable

# --------------------------------------------------------------------------------------------
# Workloads

@dataclass(frozen=True)
class Workload:
    name: str
    prompt_tokens: int
    output_tokens: int
    concurrency: int
    num_requests: int      # default request count (one run = a few minutes on 2 cores)
    quick_requests: int    # --quick

    @property
    def seq_len(self) -> int:
        return self.prompt_tokens + self.output_tokens


WORKLOADS = {
    # Request counts sized so that one server configuration takes a few minutes on the shared
    # 2-core development machine (llama-server f16 decoded ~40 tok/s in aggregate at 4 slots under
    # load average ~6: 8 decode-heavy requests = 12,000 output tokens took 303 s). README.md has
    # the measured durations; raise --num-requests on a bigger or idle machine.
    "decode-heavy": Workload("decode-heavy", 500, 1500, 32, 16, 8),
    "prefill-heavy": Workload("prefill-heavy", 1000, 128, 32, 32, 16),
}

# --------------------------------------------------------------------------------------------
# KV sizing (SmolLM2-135M: 30 layers, 3 KV heads, head_dim 64)

# bytes per value of llama.cpp cache types: ggml block size / block bytes
GGML_TYPE_BYTES_PER_VALUE = {
    "f32": 4.0, "f16": 2.0, "bf16": 2.0,
    "q8_0": 34 / 32, "q4_0": 18 / 32, "q4_1": 20 / 32, "q5_0": 22 / 32, "q5_1": 24 / 32,
    "iq4_nl": 18 / 32,
}


def kv_bytes_per_token(n_layer: int, n_kv_head: int, head_dim: int, type_k: str, type_v: str) -> float:
    per = n_layer * n_kv_head * head_dim
    return per * GGML_TYPE_BYTES_PER_VALUE[type_k] + per * GGML_TYPE_BYTES_PER_VALUE[type_v]


def llamacpp_sizing(budget_bytes: int, seq_len: int, bpt: float, pad: int = 256) -> dict:
    """Largest context (cells) and slot count that `budget_bytes` of KV holds at `bpt` bytes/token.
    llama.cpp rounds -c up to a multiple of 256, so the context is rounded down to one here (and
    never below one sequence)."""
    ctx = int(budget_bytes // bpt)
    if pad > 1 and ctx >= pad:
        ctx = max(ctx // pad * pad, seq_len)
    slots = ctx // seq_len
    return {"ctx": ctx, "slots": slots, "kv_bytes": int(ctx * bpt), "bytes_per_token": bpt}


# --------------------------------------------------------------------------------------------
# SSE (OpenAI streaming) parsing


class SSEParser:
    """Incremental parser of `text/event-stream`: feed() bytes, get back the `data:` payloads of
    complete events. Comment lines (': ping') and other fields are ignored."""

    def __init__(self) -> None:
        self._buf = b""
        self._data: list[str] = []

    def feed(self, chunk: bytes) -> list[str]:
        self._buf += chunk
        out: list[str] = []
        while True:
            nl = self._buf.find(b"\n")
            if nl < 0:
                break
            line = self._buf[:nl].rstrip(b"\r").decode("utf-8", errors="replace")
            self._buf = self._buf[nl + 1:]
            if line == "":
                if self._data:
                    out.append("\n".join(self._data))
                    self._data = []
            elif line.startswith(":"):
                continue
            elif line.startswith("data:"):
                v = line[5:]
                self._data.append(v[1:] if v.startswith(" ") else v)
        return out

    def flush(self) -> list[str]:
        out = []
        if self._buf.strip():
            out += self.feed(b"\n")
        if self._data:
            out.append("\n".join(self._data))
            self._data = []
        return out


@dataclass
class StreamResult:
    """What one streamed completion produced, client-side."""
    chunk_times: list[float] = field(default_factory=list)  # arrival (s, perf_counter) of chunks with text
    text_len: int = 0
    usage: dict | None = None
    finish_reason: str | None = None
    error: str | None = None          # an error frame inside a 200 stream
    done: bool = False                # saw [DONE]


def consume_event(res: StreamResult, payload: str, t: float) -> None:
    """Apply one SSE `data:` payload to `res` (t = arrival time)."""
    if payload.strip() == "[DONE]":
        res.done = True
        return
    try:
        obj = json.loads(payload)
    except json.JSONDecodeError:
        res.error = res.error or f"bad json: {payload[:80]}"
        return
    if "error" in obj and obj["error"]:
        e = obj["error"]
        res.error = json.dumps(e)[:300] if not isinstance(e, str) else e[:300]
        return
    if obj.get("usage"):
        res.usage = obj["usage"]
    for ch in obj.get("choices") or []:
        txt = ch.get("text")
        if txt is None:  # chat-style delta, if a server sends one
            txt = (ch.get("delta") or {}).get("content")
        if txt:
            res.chunk_times.append(t)
            res.text_len += len(txt)
        if ch.get("finish_reason"):
            res.finish_reason = ch["finish_reason"]

# --------------------------------------------------------------------------------------------
# Prometheus text exposition parsing

_PROM_LINE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+([^\s]+)")


def parse_prometheus(text: str) -> dict[str, float]:
    """name -> value (labels dropped; the last sample of a name wins; histograms not needed)."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = _PROM_LINE.match(line)
        if not m:
            continue
        try:
            out[m.group(1)] = float(m.group(3))
        except ValueError:
            continue
    return out


METRIC_FLAVORS = {
    # running sequences gauge, KV bytes used gauge (None: the server has none), KV budget gauge
    "kvcrunch": ("kvcrunch:num_requests_running", "kvcrunch:kv_cache_bytes_used", "kvcrunch:kv_cache_bytes_budget"),
    "llamacpp": ("llamacpp:requests_processing", None, None),
}

# --------------------------------------------------------------------------------------------
# /proc


def read_proc_status(pid: int) -> dict[str, int]:
    """VmRSS / VmHWM in bytes from /proc/PID/status ({} if the process is gone)."""
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(("VmRSS:", "VmHWM:")):
                    k, v = line.split(":", 1)
                    out[k] = int(v.split()[0]) * 1024
    except OSError:
        pass
    return out

# --------------------------------------------------------------------------------------------
# Statistics


def percentile(xs: list[float], p: float) -> float:
    """numpy's default (linear interpolation) percentile; nan for an empty list."""
    if not xs:
        return float("nan")
    s = sorted(xs)
    if len(s) == 1:
        return s[0]
    k = (len(s) - 1) * p / 100.0
    lo = math.floor(k)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def summarize(xs: list[float]) -> dict:
    if not xs:
        return {"mean": float("nan"), "p50": float("nan"), "p99": float("nan"), "n": 0}
    return {"mean": sum(xs) / len(xs), "p50": percentile(xs, 50), "p99": percentile(xs, 99), "n": len(xs)}


def parse_slo(spec: str | None) -> dict[str, float]:
    """'ttft=10000,tpot=500,e2el=60000' (ms) -> {'ttft': 10000.0, ...}."""
    out: dict[str, float] = {}
    if not spec:
        return out
    for part in spec.replace(":", "=").split(","):
        part = part.strip()
        if not part:
            continue
        k, v = part.split("=", 1)
        k = k.strip().lower()
        if k == "e2e":
            k = "e2el"
        if k not in ("ttft", "tpot", "e2el"):
            raise ValueError(f"unknown SLO metric {k!r} (ttft, tpot, e2el)")
        out[k] = float(v)
    return out


@dataclass
class RequestRecord:
    idx: int
    prompt_tokens_target: int
    prompt_tokens_measured: int   # by /tokenize before the run
    max_tokens: int
    start: float = 0.0            # perf_counter at send
    end: float = 0.0
    ttft: float | None = None     # s
    chunk_times: list[float] = field(default_factory=list)
    usage: dict | None = None
    status: int | None = None     # HTTP status (None: no response)
    outcome: str = "pending"      # ok | http_<code> | stream_error | wrong_length | no_usage | exception:<T> | cancelled
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.outcome == "ok"

    @property
    def output_tokens(self) -> int:
        if self.usage and "completion_tokens" in self.usage:
            return int(self.usage["completion_tokens"])
        return len(self.chunk_times)

    @property
    def prompt_tokens(self) -> int:
        if self.usage and "prompt_tokens" in self.usage:
            return int(self.usage["prompt_tokens"])
        return self.prompt_tokens_measured

    @property
    def e2el(self) -> float:
        return self.end - self.start

    @property
    def tpot(self) -> float | None:
        n = self.output_tokens
        if self.ttft is None or n < 2:
            return None
        return (self.e2el - self.ttft) / (n - 1)

    @property
    def itls(self) -> list[float]:
        c = self.chunk_times
        return [b - a for a, b in zip(c, c[1:])]


def classify(rec: RequestRecord, res: StreamResult, status: int, expect_tokens: int, strict_usage: bool = True) -> str:
    if status != 200:
        return f"http_{status}"
    if res.error:
        return "stream_error"
    if res.usage is None:
        return "no_usage" if strict_usage else ("ok" if len(res.chunk_times) == expect_tokens else "wrong_length")
    if int(res.usage.get("completion_tokens", -1)) != expect_tokens:
        return "wrong_length"
    return "ok"


def aggregate(records: list[RequestRecord], duration_s: float, slo: dict[str, float]) -> dict:
    """vLLM `bench serve` metrics over the completed (ok) requests. Times in ms in the output."""
    ok = [r for r in records if r.ok]
    outcomes: dict[str, int] = {}
    for r in records:
        outcomes[r.outcome] = outcomes.get(r.outcome, 0) + 1
    failed = [r for r in records if not r.ok and r.outcome not in ("cancelled", "pending")]
    http_status: dict[str, int] = {}
    for r in records:
        key = str(r.status) if r.status is not None else "none"
        http_status[key] = http_status.get(key, 0) + 1
    out_tok = sum(r.output_tokens for r in ok)
    in_tok = sum(r.prompt_tokens for r in ok)
    ttft = [r.ttft * 1e3 for r in ok if r.ttft is not None]
    tpot = [r.tpot * 1e3 for r in ok if r.tpot is not None]
    itl = [x * 1e3 for r in ok for x in r.itls]
    e2el = [r.e2el * 1e3 for r in ok]
    good = 0
    for r in ok:
        meets = True
        if "ttft" in slo and (r.ttft is None or r.ttft * 1e3 > slo["ttft"]):
            meets = False
        if "tpot" in slo and (r.tpot is not None and r.tpot * 1e3 > slo["tpot"]):
            meets = False
        if "e2el" in slo and r.e2el * 1e3 > slo["e2el"]:
            meets = False
        good += meets
    d = duration_s if duration_s > 0 else float("nan")
    return {
        "requests": len(records),
        "completed": len(ok),
        "failed": len(failed),
        "failed_429_503": sum(1 for r in failed if r.status in (429, 503)),
        "cancelled_at_cap": outcomes.get("cancelled", 0) + outcomes.get("pending", 0),
        "outcomes": outcomes,
        "http_status": http_status,
        "duration_s": duration_s,
        "request_throughput": len(ok) / d,
        "output_throughput": out_tok / d,
        "total_token_throughput": (in_tok + out_tok) / d,
        "total_input_tokens": in_tok,
        "total_output_tokens": out_tok,
        "slo_ms": slo,
        "goodput_requests": good,
        "request_goodput": good / d,
        "ttft_ms": summarize(ttft),
        "tpot_ms": summarize(tpot),
        "itl_ms": summarize(itl),
        "e2el_ms": summarize(e2el),
    }

# --------------------------------------------------------------------------------------------
# Arrivals


def arrival_offsets(n: int, rate: float, burstiness: float, seed: int) -> list[float]:
    """Send times (s from start) of n requests: gamma inter-arrival gaps with shape `burstiness`
    and mean 1/rate (vLLM: burstiness 1 = Poisson). rate = inf: all at t=0."""
    if math.isinf(rate):
        return [0.0] * n
    if rate <= 0 or burstiness <= 0:
        raise ValueError("rate and burstiness must be > 0")
    rng = random.Random(seed)
    theta = 1.0 / (rate * burstiness)
    t, out = 0.0, []
    for _ in range(n):
        out.append(t)
        t += rng.gammavariate(burstiness, theta)
    return out

# --------------------------------------------------------------------------------------------
# Prompt source: PG-19 style books


def load_books(data_dir: str) -> list[tuple[str, str]]:
    """(name, text) of every .txt under data_dir, sorted by name: BOM and CR removed, Project
    Gutenberg header/footer cut where the START/END markers exist."""
    books = []
    for fn in sorted(os.listdir(data_dir)):
        if not fn.endswith(".txt"):
            continue
        with open(os.path.join(data_dir, fn), encoding="utf-8-sig", errors="replace") as f:
            t = f.read().replace("\r\n", "\n").replace("\r", "\n")
        m = re.search(r"\*\*\* ?START OF (THIS|THE) PROJECT GUTENBERG.*?\*\*\*\n", t)
        if m:
            t = t[m.end():]
        m = re.search(r"\*\*\* ?END OF (THIS|THE) PROJECT GUTENBERG", t)
        if m:
            t = t[:m.start()]
        t = re.sub(r"[ \t]*\n[ \t]*\n+", "\n\n", t)  # collapse runs of blank lines
        books.append((fn, t))
    if not books:
        raise FileNotFoundError(f"no .txt books in {data_dir}")
    return books


def passage_windows(books: list[tuple[str, str]], n: int, window_chars: int, seed: int) -> list[tuple[str, int, str]]:
    """n passages (book, offset, text of window_chars), round-robin over the books, each starting
    at a word boundary. While the books have room the passages are disjoint, so no two prompts
    share a prefix; past that (long soak runs) later laps restart at shifted offsets: passages then
    overlap but still start at different places. The seed shifts where each book's run starts."""
    rng = random.Random(seed)
    stride = window_chars + 65  # a passage may start up to 64 chars late (word boundary)
    out = []
    counts = [0] * len(books)
    starts = []
    for _, t in books:
        usable = len(t) - 64 - window_chars
        if usable < 0:
            raise ValueError(f"a book is shorter than {window_chars + 64} chars")
        need = (n // len(books) + 1) * stride
        slack = usable - need
        starts.append(rng.randrange(0, slack + 1) if slack > 0 else 0)
    for i in range(n):
        bi = i % len(books)
        k = counts[bi]
        counts[bi] += 1
        name, t = books[bi]
        usable = len(t) - 64 - window_chars
        per_lap = usable // stride + 1
        lap, pos = divmod(k, per_lap)
        off = (starts[bi] + pos * stride + lap * 997) % (usable + 1)
        sp = t.find(" ", off)  # start at a word boundary
        sp = off if (sp < 0 or sp - off > 64) else sp + 1
        out.append((name, sp, t[sp:sp + window_chars]))
    return out


def fit_prefix(text: str, target: int, count_tokens, max_iter: int = 24) -> tuple[str, int]:
    """Longest prefix of `text` with at most `target` tokens per `count_tokens` (the server's
    tokenizer), by bisection on the character length. Returns (prefix, its token count)."""
    n_full = count_tokens(text)
    if n_full <= target:
        return text, n_full
    lo, hi = 0, len(text)      # count(lo) <= target < count(hi)
    lo_n = 0
    # first guess proportional to the ratio
    guess = max(1, min(len(text) - 1, int(len(text) * target / n_full)))
    g_n = count_tokens(text[:guess])
    if g_n <= target:
        lo, lo_n = guess, g_n
    else:
        hi = guess
    it = 0
    while hi - lo > 1 and it < max_iter and lo_n != target:
        mid = (lo + hi) // 2
        m_n = count_tokens(text[:mid])
        if m_n <= target:
            lo, lo_n = mid, m_n
        else:
            hi = mid
        it += 1
    return text[:lo], lo_n


def markdown_row(label: str, s: dict, extra: dict) -> str:
    def f(x, nd=1):
        return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:,.{nd}f}"

    def mib(x):
        return "n/a" if x is None else f"{x / 2**20:,.1f}"
    kv = extra.get("peak_kv_bytes")
    kv_s = mib(kv) + ("*" if extra.get("kv_bytes_source") == "computed" else "")
    return (f"| {label} | {s['completed']}/{s['requests']} | {s['failed']} ({s['failed_429_503']}) | "
            f"{f(s['request_throughput'], 3)} | {f(s['output_throughput'])} | {f(s['total_token_throughput'])} | "
            f"{f(s['ttft_ms']['mean'], 0)} / {f(s['ttft_ms']['p50'], 0)} / {f(s['ttft_ms']['p99'], 0)} | "
            f"{f(s['tpot_ms']['mean'])} / {f(s['tpot_ms']['p50'])} / {f(s['tpot_ms']['p99'])} | "
            f"{f(s['itl_ms']['mean'])} / {f(s['itl_ms']['p50'])} / {f(s['itl_ms']['p99'])} | "
            f"{f(s['e2el_ms']['mean'] / 1e3)} / {f(s['e2el_ms']['p50'] / 1e3)} / {f(s['e2el_ms']['p99'] / 1e3)} | "
            f"{f(s['request_goodput'], 3)} | {extra.get('max_running', 'n/a')} | {kv_s} | "
            f"{mib(extra.get('peak_rss_bytes'))} |")


MARKDOWN_HEADER = (
    "| config | completed/sent | failed (429/503) | req/s | out tok/s | total tok/s | "
    "TTFT ms mean/p50/p99 | TPOT ms mean/p50/p99 | ITL ms mean/p50/p99 | E2E s mean/p50/p99 | "
    "goodput req/s | max running | peak KV MiB | peak RSS MiB |\n"
    "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")


def fmt_table(rows: Iterable[str]) -> str:
    return "\n".join([MARKDOWN_HEADER, *rows])
