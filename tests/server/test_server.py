"""`kvcrunch serve` end to end: a real server process on a loopback port with the real model.

    python3 tests/server/test_server.py --bin build/kvcrunch --model models/SmolLM2-135M-Instruct.Q4_1.gguf
    (exit 77 when the model is missing; otherwise pytest's exit status)

Covers: the OpenAI Python client chatting and completing (streaming and not); every bad input of
issue 12 item 4 with its status and error object; auth; a client that disconnects mid-stream frees
its KV while another request completes; metrics move as requests run; too many connections → 503
while the others complete; SIGTERM stops admitting, lets the running request finish, exits 0.
"""
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest
import requests

BIN = os.environ.get("KVC_BIN", "build/kvcrunch")
MODEL = os.environ.get("KVC_MODEL", "models/SmolLM2-135M-Instruct.Q4_1.gguf")
KEY = "test-key-123"
MAX_CONN = 3
CTX = 512


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(extra=(), max_conn=MAX_CONN, ctx=CTX, kv_allow="q4_0,snapkv"):
    port = free_port()
    cmd = [BIN, "serve", "-m", MODEL, "--host", "127.0.0.1", "--port", str(port), "-c", str(ctx),
           "-t", "2", "--kv-budget", "48MiB", "--max-connections", str(max_conn),
           "--api-key", KEY, "--kv-allow", kv_allow, "--max-body-bytes", "64KiB",
           "--default-max-tokens", "16", *extra]
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited {proc.returncode}: {proc.stdout.read()}")
        try:
            if requests.get(url + "/health", timeout=1).status_code == 200:
                return proc, url
        except requests.RequestException:
            pass
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError("server did not become healthy in 120 s")


def stop_server(proc):
    if proc.poll() is None:
        proc.kill()
        proc.wait(timeout=10)


@pytest.fixture(scope="module")
def server():
    proc, url = start_server()
    try:
        yield url
    finally:
        stop_server(proc)


def H(key=KEY):
    return {"Authorization": f"Bearer {key}"}


def post(url, path, body, key=KEY, **kw):
    data = body if isinstance(body, (bytes, str)) else json.dumps(body)
    return requests.post(url + path, data=data, headers={**H(key), "Content-Type": "application/json"},
                         timeout=kw.pop("timeout", 60), **kw)


def metrics(url):
    text = requests.get(url + "/metrics", headers=H(), timeout=10).text
    out = {}
    for line in text.splitlines():
        if line.startswith("#") or not line.strip():
            continue
        name_labels, value = line.rsplit(" ", 1)
        name = name_labels.split("{", 1)[0]
        labels = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', name_labels))
        labels.pop("model_name", None)
        key = name + ("" if not labels else "{" + ",".join(f"{k}={v}" for k, v in sorted(labels.items())) + "}")
        out[key] = float(value)
    return out


def wait_for(cond, timeout, what):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if cond():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def assert_error(r, status, param=None, code=None):
    assert r.status_code == status, (r.status_code, r.text)
    body = r.json()
    assert set(body) == {"error"}, body
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}, err
    assert isinstance(err["message"], str) and err["message"], err
    if param is not None:
        assert err["param"] == param, err
    if code is not None:
        assert err["code"] == code, err
    return err


def sse_events(resp):
    """Yields decoded JSON objects of a text/event-stream response, then the string [DONE]."""
    for line in resp.iter_lines():
        if not line or line.startswith(b":"):  # blank separators, comments (pings)
            continue
        assert line.startswith(b"data: "), line
        payload = line[len(b"data: "):]
        if payload == b"[DONE]":
            yield "[DONE]"
            return
        yield json.loads(payload)


# --- the OpenAI Python client ----------------------------------------------------------------

def client(url):
    openai = pytest.importorskip("openai")
    return openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=60)


def test_openai_client_chat_and_completion(server):
    c = client(server)
    models = c.models.list()
    model = models.data[0].id
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    r = c.chat.completions.create(model=model, messages=msgs, max_tokens=12, temperature=0)
    text = r.choices[0].message.content
    assert r.object == "chat.completion" and r.choices[0].message.role == "assistant"
    assert text and r.choices[0].finish_reason in ("stop", "length")
    assert r.usage.prompt_tokens > 5 and 1 <= r.usage.completion_tokens <= 12
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    kv = r.model_dump()["kv"]
    assert kv["k"] == "f16" and kv["bytes_peak"] > 0 and kv["k_bits_per_value"] == 16

    # Streaming, with usage: the same greedy text, chunk by chunk, then a usage chunk.
    stream = c.chat.completions.create(model=model, messages=msgs, max_tokens=12, temperature=0,
                                       stream=True, stream_options={"include_usage": True})
    parts, usage, finish, ids = [], None, None, set()
    for chunk in stream:
        ids.add(chunk.id)
        if chunk.choices:
            assert chunk.usage is None
            d = chunk.choices[0].delta
            if d.content:
                parts.append(d.content)
            finish = chunk.choices[0].finish_reason or finish
        else:
            usage = chunk.usage
    assert "".join(parts) == text
    assert finish == r.choices[0].finish_reason
    assert usage is not None and usage.completion_tokens == r.usage.completion_tokens
    assert len(ids) == 1

    # Completions, streaming and not.
    r = c.completions.create(model=model, prompt="The capital of France is", max_tokens=6, temperature=0)
    assert r.object == "text_completion" and r.choices[0].text
    streamed = "".join(ch.choices[0].text for ch in
                       c.completions.create(model=model, prompt="The capital of France is",
                                            max_tokens=6, temperature=0, stream=True) if ch.choices)
    assert streamed == r.choices[0].text
    # Sampling with a seed is reproducible.
    a = c.completions.create(model=model, prompt="Once upon a time", max_tokens=8, temperature=0.9, seed=5)
    b = c.completions.create(model=model, prompt="Once upon a time", max_tokens=8, temperature=0.9, seed=5)
    assert a.choices[0].text == b.choices[0].text


def test_openai_client_kv_extension(server):
    openai = pytest.importorskip("openai")
    c = client(server)
    msgs = [{"role": "user", "content": "Name three colours."}]
    full = c.chat.completions.create(model="m", messages=msgs, max_tokens=8, temperature=0)
    q4 = c.chat.completions.create(model="m", messages=msgs, max_tokens=8, temperature=0,
                                   extra_body={"kv": {"k": "q4_0", "v": "q4_0"}})
    kf, kq = full.model_dump()["kv"], q4.model_dump()["kv"]
    assert kq["k"] == "q4_0" and kq["v"] == "q4_0" and kq["k_bits_per_value"] < 5
    assert 0 < kq["bytes_peak"] < kf["bytes_peak"]
    with pytest.raises(openai.BadRequestError) as e:
        c.chat.completions.create(model="m", messages=msgs, max_tokens=4,
                                  extra_body={"kv": {"k": "turbo3"}})
    assert e.value.status_code == 400 and e.value.code == "kv_not_allowed"


# --- bad input -------------------------------------------------------------------------------

def test_bad_inputs_get_error_objects_and_server_keeps_serving(server):
    chat = lambda **kw: {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, **kw}
    long_prompt = "word " * (CTX + 100)
    cases = [
        # (path, body, status, param, code)
        ("/v1/completions", b'{"prompt": "x", ', 400, None, "invalid_json"),
        ("/v1/completions", b"[1, 2, 3]", 400, None, "invalid_json"),
        ("/v1/completions", b"\xff\xfe", 400, None, "invalid_json"),
        # A number out of double's range was a 500 (nlohmann's out_of_range, not parse_error).
        ("/v1/completions", b'{"prompt": "x", "max_tokens": 1e400}', 400, None, "invalid_json"),
        ("/v1/completions", {"prompt": "x", "max_tokens": "5"}, 400, "max_tokens", None),
        ("/v1/completions", {"prompt": "x", "temperature": "warm"}, 400, "temperature", None),
        ("/v1/completions", {"prompt": "x", "stop": 7}, 400, "stop", None),
        ("/v1/chat/completions", chat(stream="yes"), 400, "stream", None),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": 5}]}, 400,
         "messages[0].content", None),
        ("/v1/completions", {"prompt": ""}, 400, "prompt", None),
        ("/v1/completions", {"prompt": []}, 400, "prompt", None),
        ("/v1/completions", {}, 400, "prompt", None),
        ("/v1/chat/completions", {"messages": []}, 400, "messages", None),
        ("/v1/completions", {"prompt": [1, 10 ** 9]}, 400, "prompt", None),
        ("/v1/completions", {"prompt": long_prompt, "max_tokens": 4}, 400, "prompt",
         "context_length_exceeded"),
        ("/v1/completions", {"prompt": "word " * 100, "max_tokens": CTX - 10}, 400, None,
         "context_length_exceeded"),
        ("/v1/completions", {"prompt": "x", "max_tokens": -1}, 400, "max_tokens", None),
        ("/v1/completions", {"prompt": "x", "max_tokens": 0}, 400, "max_tokens", None),
        ("/v1/completions", {"prompt": "x", "max_tokens": 10 ** 12}, 400, "max_tokens",
         "context_length_exceeded"),
        ("/v1/completions", {"prompt": "x", "kv": {"k": "nosuchcodec"}}, 400, "kv.k", "kv_unknown"),
        ("/v1/completions", {"prompt": "x", "kv": {"v": "turbo3"}}, 400, "kv.v", "kv_not_allowed"),
        ("/v1/completions", {"prompt": "x", "kv": {"evict": "h2o"}}, 400, "kv.evict", "kv_not_allowed"),
        ("/v1/completions", {"prompt": "x", "kv": {"k": "q4_0:bits=banana"}}, 400, None, None),
        ("/v1/completions", {"prompt": "x", "kv": "q4_0"}, 400, "kv", None),
        # More sinks than the context: refused at once (the handler measured a KV plan for 1M
        # sink tokens for minutes, over 1 GB, and SIGTERM could not stop the server).
        ("/v1/completions", {"prompt": "x", "max_tokens": 2, "kv": {"sinks": 1 << 20}}, 400, "kv",
         None),
        ("/v1/completions", {"prompt": "x" * (70 * 1024)}, 413, None, "body_too_large"),
        ("/tokenize", {"content": 3}, 400, "content", None),
        ("/detokenize", {"tokens": [-4]}, 400, "tokens", None),
        ("/v1/nothing", {"prompt": "x"}, 404, None, None),
    ]
    for path, body, status, param, code in cases:
        r = post(server, path, body)
        assert_error(r, status, param, code)
    assert_error(requests.get(server + "/v1/chat/completions", headers=H(), timeout=10), 405)
    assert_error(requests.get(server + "/nowhere", headers=H(), timeout=10), 404)
    assert_error(requests.delete(server + "/v1/models", headers=H(), timeout=10), 405)
    # A chunked body over the limit (no Content-Length) is refused too.
    big = (b"x" * 1024 for _ in range(100))
    r = requests.post(server + "/v1/completions", data=big, headers=H(), timeout=30)
    assert_error(r, 413, code="body_too_large")
    # Unknown fields of any type are extensions: accepted and ignored.
    r = post(server, "/v1/completions", {"prompt": "Hello", "max_tokens": 2, "frobnicate": [1, {"a": None}]})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] >= 1
    # Still serving everyone: health, a chat.
    assert requests.get(server + "/health", timeout=5).status_code == 200
    assert post(server, "/v1/chat/completions", chat()).status_code == 200


def test_tokenize_detokenize(server):
    r = post(server, "/tokenize", {"content": "Hello world"})
    assert r.status_code == 200, r.text
    toks = r.json()["tokens"]
    assert toks and all(isinstance(t, int) for t in toks)
    r = post(server, "/detokenize", {"tokens": toks})
    assert r.status_code == 200 and r.json()["content"] == "Hello world"


def test_auth(server):
    for method, path in [("GET", "/v1/models"), ("GET", "/metrics"), ("POST", "/v1/completions"),
                         ("POST", "/v1/chat/completions"), ("POST", "/tokenize"),
                         ("POST", "/detokenize"), ("GET", "/nowhere")]:
        for headers in [{}, H("wrong-key"), H(KEY + "x"), {"Authorization": KEY},
                        {"Authorization": "Basic " + KEY}]:
            r = requests.request(method, server + path, headers=headers, data=b'{"prompt": "x"}', timeout=10)
            err = assert_error(r, 401, code="invalid_api_key")
            assert err["type"] == "authentication_error"
    assert requests.get(server + "/health", timeout=5).status_code == 200
    assert requests.get(server + "/v1/models", headers=H(), timeout=5).status_code == 200
    assert requests.get(server + "/metrics", headers=H(), timeout=5).status_code == 200
    # A refused request's body is consumed: the next request on the same kept-alive connection
    # is read from its own first byte.
    with requests.Session() as s:
        body = json.dumps({"prompt": "Hello", "max_tokens": 2})
        assert_error(s.post(server + "/v1/completions", data=body, headers=H("wrong"), timeout=10), 401)
        r = s.post(server + "/v1/completions", data=body, headers=H(), timeout=30)
        assert r.status_code == 200, r.text


# --- disconnects, metrics, limits ----------------------------------------------------------------

def long_stream(url, max_tokens=200, **extra):
    body = {"prompt": "Write a long story about a dragon.", "max_tokens": max_tokens,
            "ignore_eos": True, "temperature": 0.7, "stream": True, **extra}
    r = requests.post(url + "/v1/completions", data=json.dumps(body), headers=H(), stream=True, timeout=60)
    assert r.status_code == 200, r.text
    return r


def test_disconnect_mid_stream_frees_kv(server):
    before = metrics(server)
    r = long_stream(server, max_tokens=CTX - 20)
    events = sse_events(r)
    for _ in range(3):  # a few tokens in: it is running and holds KV
        next(events)
    m = metrics(server)
    assert m["kvcrunch:num_requests_running"] >= 1 and m["kvcrunch:kv_cache_bytes_used"] > 0
    # Another request runs beside it and completes after the first client is gone.
    other = {}
    t = threading.Thread(target=lambda: other.setdefault(
        "r", post(server, "/v1/completions", {"prompt": "Hello", "max_tokens": 24, "ignore_eos": True})))
    t.start()
    r.close()  # the client goes away mid-stream (closes the connection: not fully read)
    t0 = time.time()
    t.join(timeout=60)
    assert other["r"].status_code == 200 and other["r"].json()["usage"]["completion_tokens"] == 24
    wait_for(lambda: (lambda m: m["kvcrunch:num_requests_running"] == 0 and
                      m["kvcrunch:kv_cache_bytes_used"] == 0)(metrics(server)), 10, "KV freed")
    after = metrics(server)
    cancelled = 'kvcrunch:request_success_total{finished_reason=cancelled}'
    assert after[cancelled] == before[cancelled] + 1
    assert after["kvcrunch:http_client_disconnects_total"] == before["kvcrunch:http_client_disconnects_total"] + 1
    # It was cancelled, not run to the end: far fewer than CTX - 20 tokens were generated.
    generated = after["kvcrunch:generation_tokens_total"] - before["kvcrunch:generation_tokens_total"]
    assert generated < 24 + (CTX - 20) // 2, generated


def test_disconnect_non_streaming_frees_kv(server):
    before = metrics(server)
    body = json.dumps({"prompt": "Tell me everything.", "max_tokens": CTX - 20, "ignore_eos": True}).encode()
    s = socket.create_connection(("127.0.0.1", int(server.rsplit(":", 1)[1])))
    s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + KEY.encode() +
              b"\r\nContent-Type: application/json\r\nContent-Length: " + str(len(body)).encode() +
              b"\r\n\r\n" + body)
    wait_for(lambda: metrics(server)["kvcrunch:num_requests_running"] >= 1, 20, "the request to run")
    s.close()
    wait_for(lambda: (lambda m: m["kvcrunch:num_requests_running"] == 0 and
                      m["kvcrunch:kv_cache_bytes_used"] == 0)(metrics(server)), 10, "KV freed")
    after = metrics(server)
    cancelled = 'kvcrunch:request_success_total{finished_reason=cancelled}'
    assert after[cancelled] == before[cancelled] + 1


def test_metrics_move(server):
    before = metrics(server)
    for name in ["kvcrunch:num_requests_running", "kvcrunch:num_requests_waiting",
                 "kvcrunch:kv_cache_bytes_used", "kvcrunch:kv_cache_bytes_budget",
                 "kvcrunch:kv_cache_usage_ratio", "kvcrunch:num_preemptions_total",
                 "kvcrunch:time_to_first_token_seconds_count", "kvcrunch:inter_token_latency_seconds_count",
                 "kvcrunch:e2e_request_latency_seconds_count", "kvcrunch:request_queue_time_seconds_count"]:
        assert name in before, name
    assert before["kvcrunch:kv_cache_bytes_budget"] == 48 * 2 ** 20
    r = long_stream(server, max_tokens=40)
    events = sse_events(r)
    # Two tokens in: the engine publishes its gauges at the end of a step, after that step's
    # events, so the step that produced the first token has been counted by now.
    next(events), next(events)
    during = metrics(server)
    assert during["kvcrunch:num_requests_running"] >= 1
    assert during["kvcrunch:kv_cache_bytes_used"] > 0
    assert 0 < during["kvcrunch:kv_cache_usage_ratio"] <= 1
    rest = list(events)
    assert rest[-1] == "[DONE]"
    # The final event precedes the end of its step's bookkeeping by a moment.
    wait_for(lambda: (lambda m: m["kvcrunch:num_requests_running"] == 0 and
                      m["kvcrunch:kv_cache_bytes_used"] == 0)(metrics(server)), 5, "the request to end")
    after = metrics(server)
    assert after["kvcrunch:generation_tokens_total"] >= before["kvcrunch:generation_tokens_total"] + 40
    assert after["kvcrunch:prompt_tokens_total"] > before["kvcrunch:prompt_tokens_total"]
    for h in ["time_to_first_token", "e2e_request_latency", "request_queue_time"]:
        assert after[f"kvcrunch:{h}_seconds_count"] == before[f"kvcrunch:{h}_seconds_count"] + 1
    assert after["kvcrunch:inter_token_latency_seconds_count"] >= before["kvcrunch:inter_token_latency_seconds_count"] + 38
    length = 'kvcrunch:request_success_total{finished_reason=length}'
    assert after[length] == before[length] + 1


def test_too_many_connections(server):
    streams = [long_stream(server, max_tokens=30) for _ in range(MAX_CONN)]
    gens = [sse_events(s) for s in streams]
    for g in gens:
        next(g)
    r = post(server, "/v1/completions", {"prompt": "x", "max_tokens": 2})
    assert_error(r, 503, code="too_many_connections")
    assert r.headers.get("Retry-After") == "1"
    assert requests.get(server + "/health", timeout=5).status_code == 200  # probes still answered
    assert metrics(server)["kvcrunch:requests_refused_total"] >= 1
    for g in gens:  # the admitted ones all complete
        assert list(g)[-1] == "[DONE]"
    wait_for(lambda: post(server, "/v1/completions", {"prompt": "x", "max_tokens": 2}).status_code == 200,
             10, "a slot to free")


def test_idle_connections_do_not_block_others(server):
    # Each open connection holds an HTTP thread while it waits for a request (up to the 5 s
    # keep-alive timeout). 40 idle ones (the pool starts with MAX_CONN + 8 threads) must not delay
    # other clients: the pool grows.
    port = int(server.rsplit(":", 1)[1])
    idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(40)]
    try:
        time.sleep(0.3)
        t0 = time.time()
        assert requests.get(server + "/health", timeout=10).status_code == 200
        assert post(server, "/v1/completions", {"prompt": "Hi", "max_tokens": 2}).status_code == 200
        assert time.time() - t0 < 3, time.time() - t0
    finally:
        for s in idle:
            s.close()


def test_queue_full_is_429_and_waiting_requests_are_served():
    proc, url = start_server(["--max-running", "1", "--max-waiting", "1", "--sse-ping-interval", "0.2"],
                             max_conn=8)
    try:
        a = long_stream(url, max_tokens=CTX - 40)  # running
        a_events = sse_events(a)
        next(a_events), next(a_events)  # two tokens: a's admission is in the published counts
        b = long_stream(url, max_tokens=8)  # waiting: admitted to the queue, 200, no tokens yet
        wait_for(lambda: metrics(url)["kvcrunch:num_requests_waiting"] == 1, 10, "one waiting")
        m = metrics(url)
        assert m["kvcrunch:num_requests_running"] == 1
        err = assert_error(post(url, "/v1/completions", {"prompt": "x", "max_tokens": 2}), 429, code="queue_full")
        assert err["type"] == "rate_limit_error"
        time.sleep(0.6)  # b waits: it gets SSE comments (pings) meanwhile
        a.close()  # the running one goes away: the waiting one runs and completes
        lines = [l for l in b.iter_lines() if l]
        assert lines.count(b": ping") >= 2, lines[:5]
        data = [json.loads(l[6:]) for l in lines if l.startswith(b"data: {")]
        assert lines[-1] == b"data: [DONE]" and data[-1]["choices"][0]["finish_reason"] == "length"
        assert metrics(url)["kvcrunch:requests_refused_total"] >= 1
    finally:
        stop_server(proc)


def test_sigterm_drains_and_exits_0():
    proc, url = start_server(["--shutdown-grace", "60"])
    try:
        r = long_stream(url, max_tokens=CTX - 40)
        events = sse_events(r)
        next(events)
        proc.send_signal(signal.SIGTERM)
        # While the running request finishes, new ones are refused and /health says so.
        wait_for(lambda: requests.get(url + "/health", timeout=2).status_code == 503, 5, "draining")
        assert_error(post(url, "/v1/completions", {"prompt": "x", "max_tokens": 2}, timeout=5), 503)
        # The running request finishes normally.
        rest = list(events)
        assert rest[-1] == "[DONE]" and not any(isinstance(e, dict) and "error" in e for e in rest)
        assert rest[-2]["choices"][0]["finish_reason"] == "length"
        assert proc.wait(timeout=30) == 0
    finally:
        stop_server(proc)


def test_sigterm_past_grace_cancels_and_exits_0():
    proc, url = start_server(["--shutdown-grace", "0.5"])
    try:
        r = long_stream(url, max_tokens=CTX - 40)
        events = sse_events(r)
        next(events)
        t0 = time.time()
        proc.send_signal(signal.SIGTERM)
        rest = list(events)
        # Cancelled by the shutdown: an error frame inside the stream, then [DONE].
        assert rest[-1] == "[DONE]" and "error" in rest[-2], rest[-3:]
        assert rest[-2]["error"]["type"] == "unavailable_error"
        assert proc.wait(timeout=30) == 0
        assert time.time() - t0 < 15
    finally:
        stop_server(proc)


if __name__ == "__main__":
    import argparse
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", default=BIN)
    ap.add_argument("--model", default=MODEL)
    a, rest = ap.parse_known_args()
    if not os.path.exists(a.model):
        print(f"model {a.model} missing: skip")
        sys.exit(77)
    os.environ["KVC_BIN"], os.environ["KVC_MODEL"] = a.bin, a.model
    sys.exit(pytest.main(["-q", "-x", "-p", "no:cacheprovider", __file__, *rest]))
