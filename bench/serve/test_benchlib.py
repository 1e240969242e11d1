"""Unit tests of the serving benchmark's parsing and statistics (stdlib unittest; the end-to-end
test needs aiohttp and is skipped without it).

    python3 -m unittest bench/serve/test_benchlib.py        # or: python3 -m pytest bench/serve

The fake server below exists ONLY for this test of the client's bookkeeping; the benchmark
itself never runs against it.
"""
import json
import math
import os
import random
import sys
import tempfile
import threading
import unittest
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchlib as bl  # noqa: E402


class TestSSE(unittest.TestCase):
    def test_split_across_chunks_and_comments(self):
        p = bl.SSEParser()
        got = p.feed(b': ping\n\ndata: {"a"')
        self.assertEqual(got, [])
        got = p.feed(b': 1}\n\r\ndata: [DONE]\n')
        self.assertEqual(got, ['{"a": 1}'])
        self.assertEqual(p.feed(b"\n"), ["[DONE]"])

    def test_consume(self):
        r = bl.StreamResult()
        bl.consume_event(r, json.dumps({"choices": [{"text": "Hi", "finish_reason": None}]}), 1.0)
        bl.consume_event(r, json.dumps({"choices": [{"text": "", "finish_reason": "length"}]}), 2.0)
        bl.consume_event(r, json.dumps({"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 2}}), 3.0)
        bl.consume_event(r, "[DONE]", 4.0)
        self.assertEqual(r.chunk_times, [1.0])
        self.assertEqual(r.finish_reason, "length")
        self.assertEqual(r.usage["completion_tokens"], 2)
        self.assertTrue(r.done)
        e = bl.StreamResult()
        bl.consume_event(e, json.dumps({"error": {"message": "Context size has been exceeded.", "code": 500}}), 1.0)
        self.assertIn("exceeded", e.error)


class TestStats(unittest.TestCase):
    def test_percentile_matches_numpy_linear(self):
        xs = [1, 2, 3, 4, 10]
        self.assertAlmostEqual(bl.percentile(xs, 50), 3.0)
        self.assertAlmostEqual(bl.percentile(xs, 99), 4 + 6 * 0.96)
        self.assertAlmostEqual(bl.percentile([5.0], 99), 5.0)
        self.assertTrue(math.isnan(bl.percentile([], 50)))

    def _rec(self, i, start, ttft, gaps, n_out, status=200, outcome="ok"):
        r = bl.RequestRecord(i, 10, 10, n_out)
        r.start = start
        t = start + ttft
        r.chunk_times = [t]
        for g in gaps:
            t += g
            r.chunk_times.append(t)
        r.end = t
        r.ttft = ttft
        r.usage = {"prompt_tokens": 10, "completion_tokens": n_out}
        r.status, r.outcome = status, outcome
        return r

    def test_aggregate_definitions(self):
        a = self._rec(0, 0.0, 0.5, [0.1, 0.1, 0.1], 4)      # e2e 0.8, tpot 0.1
        b = self._rec(1, 0.0, 2.0, [0.3, 0.3, 0.3], 4)      # e2e 2.9, tpot 0.3
        c = bl.RequestRecord(2, 10, 10, 4)
        c.status, c.outcome = 503, "http_503"
        d = bl.RequestRecord(3, 10, 10, 4)
        d.status, d.outcome = 200, "wrong_length"
        s = bl.aggregate([a, b, c, d], duration_s=4.0, slo={"ttft": 1000, "tpot": 500})
        self.assertEqual(s["completed"], 2)
        self.assertEqual(s["failed"], 2)
        self.assertEqual(s["failed_429_503"], 1)
        self.assertEqual(s["http_status"], {"200": 3, "503": 1})
        self.assertAlmostEqual(s["request_throughput"], 0.5)
        self.assertAlmostEqual(s["output_throughput"], 2.0)
        self.assertAlmostEqual(s["total_token_throughput"], 7.0)
        self.assertAlmostEqual(s["ttft_ms"]["mean"], 1250)
        self.assertAlmostEqual(s["tpot_ms"]["mean"], 200)
        self.assertAlmostEqual(s["itl_ms"]["mean"], 200)
        self.assertAlmostEqual(s["itl_ms"]["p50"], 200)
        self.assertAlmostEqual(s["e2el_ms"]["mean"], 1850)
        self.assertEqual(s["goodput_requests"], 1)           # b misses ttft
        self.assertAlmostEqual(s["request_goodput"], 0.25)

    def test_classify(self):
        rec = bl.RequestRecord(0, 1, 1, 5)
        r = bl.StreamResult(usage={"completion_tokens": 5})
        self.assertEqual(bl.classify(rec, r, 200, 5), "ok")
        self.assertEqual(bl.classify(rec, r, 200, 6), "wrong_length")
        self.assertEqual(bl.classify(rec, r, 429, 5), "http_429")
        self.assertEqual(bl.classify(rec, bl.StreamResult(), 200, 5), "no_usage")
        self.assertEqual(bl.classify(rec, bl.StreamResult(error="x"), 200, 5), "stream_error")

    def test_slo_and_prometheus(self):
        self.assertEqual(bl.parse_slo("ttft=10000,tpot:500,e2e=9"), {"ttft": 10000.0, "tpot": 500.0, "e2el": 9.0})
        with self.assertRaises(ValueError):
            bl.parse_slo("foo=1")
        m = bl.parse_prometheus("# HELP x\n# TYPE x gauge\nllamacpp:requests_processing 3\n"
                                'kvcrunch:kv_cache_bytes_used{codec="f16"} 1.5e+06\nbad line\n')
        self.assertEqual(m["llamacpp:requests_processing"], 3.0)
        self.assertEqual(m["kvcrunch:kv_cache_bytes_used"], 1.5e6)

    def test_arrivals(self):
        self.assertEqual(bl.arrival_offsets(3, float("inf"), 1.0, 0), [0.0, 0.0, 0.0])
        offs = bl.arrival_offsets(4000, 2.0, 1.0, 1)
        gaps = [b - a for a, b in zip(offs, offs[1:])]
        mean = sum(gaps) / len(gaps)
        self.assertAlmostEqual(mean, 0.5, delta=0.03)
        var = sum((g - mean) ** 2 for g in gaps) / len(gaps)
        self.assertAlmostEqual(var / mean ** 2, 1.0, delta=0.1)   # exponential: CV^2 = 1
        offs = bl.arrival_offsets(4000, 2.0, 4.0, 1)              # burstiness 4: CV^2 = 1/4
        gaps = [b - a for a, b in zip(offs, offs[1:])]
        mean = sum(gaps) / len(gaps)
        var = sum((g - mean) ** 2 for g in gaps) / len(gaps)
        self.assertAlmostEqual(var / mean ** 2, 0.25, delta=0.04)

    def test_kv_sizing(self):
        f16 = bl.kv_bytes_per_token(30, 3, 64, "f16", "f16")
        q4 = bl.kv_bytes_per_token(30, 3, 64, "q4_0", "q4_0")
        self.assertEqual(f16, 23040)
        self.assertEqual(q4, 6480)
        budget = 4 * 2000 * 23040
        s = bl.llamacpp_sizing(budget, 2000, q4)
        self.assertEqual(s["ctx"], 28416)   # 28444 rounded down to 256
        self.assertEqual(s["slots"], 14)
        self.assertLessEqual(s["kv_bytes"], budget)


class TestPrompts(unittest.TestCase):
    def test_passages_disjoint_and_fit(self):
        with tempfile.TemporaryDirectory() as d:
            rng = random.Random(0)
            words = ["alpha", "beta", "gamma", "delta", "epsilon"]
            for k in range(2):
                with open(os.path.join(d, f"b{k}.txt"), "w", encoding="utf-8") as f:
                    f.write("\ufeff*** START OF THE PROJECT GUTENBERG EBOOK X ***\r\n")
                    f.write(" ".join(rng.choice(words) for _ in range(5000)))
                    f.write("\r\n*** END OF THE PROJECT GUTENBERG EBOOK X ***\r\nlicense")
            books = bl.load_books(d)
            self.assertFalse(any("GUTENBERG" in t or "\r" in t or "license" in t for _, t in books))
            ps = bl.passage_windows(books, 6, 400, seed=3)
            spans = {}
            for name, off, text in ps:
                self.assertEqual(len(text), 400)
                for o in spans.get(name, []):
                    self.assertTrue(off >= o + 400 or off + 400 <= o)
                spans.setdefault(name, []).append(off)
            count = lambda s: len(s.split())  # a whitespace "tokenizer"
            pre, n = bl.fit_prefix(ps[0][2], 30, count)
            self.assertEqual(n, 30)
            self.assertEqual(count(pre), 30)


# ---------------------------------------------------------------------------------------------
# End to end against a fake server (test only)

class _Fake(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    running = 0
    lock = threading.Lock()
    short_by = 0  # send this many fewer tokens than asked (to test wrong_length)

    def log_message(self, *a):
        pass

    def _json(self, code, obj):
        b = json.dumps(obj).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(b)))
        self.end_headers()
        self.wfile.write(b)

    def do_GET(self):
        if self.path == "/metrics":
            b = f"# TYPE kvcrunch:num_requests_running gauge\nkvcrunch:num_requests_running {_Fake.running}\n" \
                f"kvcrunch:kv_cache_bytes_used {_Fake.running * 1000}\nkvcrunch:kv_cache_bytes_budget 99999\n"
            b = b.encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(b)))
            self.end_headers()
            self.wfile.write(b)
        else:
            self._json(200, {"status": "ok"})

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if self.path == "/tokenize":
            return self._json(200, {"tokens": list(range(len(body["content"].split())))})
        assert self.path == "/v1/completions" and body["stream"] and body["ignore_eos"]
        n = body["max_tokens"] - _Fake.short_by
        with _Fake.lock:
            _Fake.running += 1
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Connection", "close")
        self.end_headers()
        import time
        for i in range(n):
            time.sleep(0.002)
            self.wfile.write(f'data: {json.dumps({"choices": [{"text": " w", "index": 0}]})}\n\n'.encode())
            self.wfile.flush()
        usage = {"prompt_tokens": len(body["prompt"].split()), "completion_tokens": n}
        self.wfile.write(f'data: {json.dumps({"choices": [], "usage": usage})}\n\ndata: [DONE]\n\n'.encode())
        self.wfile.flush()
        with _Fake.lock:
            _Fake.running -= 1
        self.close_connection = True


try:
    import aiohttp  # noqa: F401
    HAVE_AIOHTTP = True
except ImportError:
    HAVE_AIOHTTP = False


@unittest.skipUnless(HAVE_AIOHTTP, "aiohttp not installed (bench/serve/requirements.txt)")
class TestEndToEndFake(unittest.TestCase):
    def setUp(self):
        self.srv = ThreadingHTTPServer(("127.0.0.1", 0), _Fake)
        self.th = threading.Thread(target=self.srv.serve_forever, daemon=True)
        self.th.start()
        self.tmp = tempfile.TemporaryDirectory()
        rng = random.Random(1)
        for k in range(2):
            with open(os.path.join(self.tmp.name, f"b{k}.txt"), "w") as f:
                f.write(" ".join(rng.choice(["a", "bb", "ccc"]) for _ in range(20000)))

    def tearDown(self):
        self.srv.shutdown()
        self.srv.server_close()
        self.tmp.cleanup()
        _Fake.short_by = 0

    def _run(self, *extra):
        import asyncio
        import loadgen
        url = f"http://127.0.0.1:{self.srv.server_address[1]}"
        a = loadgen.parse_args(["--base-url", url, "--num-requests", "6", "--concurrency", "3",
                                "--prompt-tokens", "40", "--output-tokens", "12", "--data-dir", self.tmp.name,
                                "--metrics-flavor", "kvcrunch", "--server-pid", str(os.getpid()),
                                "--scrape-interval", "0.01", "--max-duration", "60", *extra])
        return asyncio.run(loadgen.main_async(a))

    def test_closed_loop(self):
        r = self._run()
        s = r["summary"]
        self.assertEqual((s["completed"], s["failed"]), (6, 0))
        self.assertEqual(s["total_output_tokens"], 72)
        self.assertEqual(s["total_input_tokens"], 240)
        self.assertEqual(s["itl_ms"]["n"], 6 * 11)
        self.assertLessEqual(r["extra"]["max_in_flight_client"], 3)
        self.assertEqual(r["extra"]["kv_bytes_source"], "metrics")
        self.assertEqual(r["extra"]["kv_budget_bytes_metric"], 99999)
        self.assertGreater(r["extra"]["peak_rss_bytes"], 0)
        self.assertTrue(all(q["prompt_tokens_measured"] == 40 for q in r["requests"]))
        self.assertEqual(len({(q["book"], q["offset"]) for q in r["requests"]}), 6)

    def test_open_loop_and_wrong_length(self):
        _Fake.short_by = 1
        r = self._run("--request-rate", "50", "--burstiness", "1")
        s = r["summary"]
        self.assertEqual(s["completed"], 0)
        self.assertEqual(s["outcomes"], {"wrong_length": 6})
        self.assertIn("open loop", r["extra"]["mode"])

    def test_refuses_non_loopback(self):
        import loadgen
        with self.assertRaises(SystemExit):
            loadgen.check_loopback("http://10.0.0.1:8080")


if __name__ == "__main__":
    unittest.main()
