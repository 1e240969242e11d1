"""Stored KV in `kvcrunch serve` end to end (docs/store.md): the prefix cache, tenant isolation,
named sessions, and (when --redis URL is given) the shared Redis tier between two servers.

    python3 tests/server/test_store.py --bin build/kvcrunch --model models/SmolLM2-135M-Instruct.Q4_1.gguf \
        [--redis redis://127.0.0.1:PORT] [--redis-cli redis-cli]
    (exit 77 when the model is missing; otherwise pytest's exit status)
"""
import glob
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import pytest
import requests

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import test_server as ts  # noqa: E402  (start_server, free_port, helpers)

KEY = ts.KEY
KEY2 = "second-tenant-key"
REDIS = os.environ.get("KVC_REDIS", "")
REDIS_CLI = os.environ.get("KVC_REDIS_CLI", "redis-cli")
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def book_tokens(url, n, offset=0):
    books = sorted(glob.glob(os.path.join(ROOT, "..", "shared", "data", "pg19", "*.txt")))
    text = open(books[0], encoding="utf-8").read()[offset:offset + 40000] if books else \
        ("It was a bright cold day in April, and the clocks were striking thirteen. " * 600)
    ids = requests.post(url + "/tokenize", headers=ts.H(), json={"content": text}).json()["tokens"]
    assert len(ids) >= n
    return ids[:n]


def complete(url, prompt, key=KEY, **extra):
    body = {"prompt": prompt, "max_tokens": 8, "temperature": 0, **extra}
    r = requests.post(url + "/v1/completions", headers=ts.H(key), json=body, timeout=300)
    assert r.status_code == 200, r.text
    j = r.json()
    return j["choices"][0]["text"], j["usage"]["prompt_tokens_details"]["cached_tokens"]


def metric(url, name):
    return ts.metrics(url).get("kvcrunch:" + name, 0)


def start(extra=()):
    return ts.start_server(["--api-key", KEY2, *extra], ctx=2048, kv_allow="q4_0,q8_0,snapkv")


@pytest.fixture(scope="module")
def sdir():
    d = tempfile.mkdtemp(prefix="kvc-sessions-")
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module")
def server(sdir):
    proc, url = start(["--session-dir", sdir, "--prefix-cache", "64MiB"])
    try:
        yield url
    finally:
        ts.stop_server(proc)


def test_prefix_hit_gives_the_same_answer(server):
    ids = book_tokens(server, 1000)
    q0, h0 = metric(server, "prefix_cache_queries_total"), metric(server, "prefix_cache_hits_total")
    a, c1 = complete(server, ids)
    b, c2 = complete(server, ids)
    assert c1 == 0 and c2 == 960  # 15 blocks of 64; the last token is always computed
    assert a == b
    # Another question after the same document: the document's blocks are reused.
    ids2 = ids[:980] + book_tokens(server, 40, offset=50000)
    _, c3 = complete(server, ids2)
    assert c3 == 960
    assert metric(server, "prefix_cache_queries_total") - q0 == 1000 + 1000 + 1020
    assert metric(server, "prefix_cache_hits_total") - h0 == 1920
    assert metric(server, "prefix_cache_entries") >= 15


def test_no_reuse_across_tenants_configurations_or_policies(server):
    ids = book_tokens(server, 400, offset=100000)
    ref, c = complete(server, ids)
    assert c == 0
    assert complete(server, ids)[1] == 384
    # Another API key (tenant), another cache_salt, another codec, an eviction policy: all miss.
    assert complete(server, ids, key=KEY2) == (ref, 0)
    assert complete(server, ids, cache_salt="tenant-a")[1] == 0
    assert complete(server, ids, cache_salt="tenant-a")[1] == 384   # same salt: hit
    assert complete(server, ids, kv={"k": "q4_0", "v": "q4_0"})[1] == 0
    assert complete(server, ids, kv={"k": "q8_0", "v": "q4_0"})[1] == 0
    assert complete(server, ids, kv={"evict": "snapkv:budget=128"})[1] == 0
    assert complete(server, ids, kv={"evict": "snapkv:budget=128"})[1] == 0  # never stored
    # Bad salts are refused with an error object.
    r = requests.post(server + "/v1/completions", headers=ts.H(), json={"prompt": "x", "cache_salt": 7})
    ts.assert_error(r, 400, param="cache_salt")


def test_sessions_continue_and_are_per_tenant(server, sdir):
    msgs = [{"role": "user", "content": "Hello! Please tell me about lighthouses."}]
    sess = {"session": "conv-1", "max_tokens": 12, "temperature": 0}
    r1 = requests.post(server + "/v1/chat/completions", headers=ts.H(), json={"messages": msgs, **sess}).json()
    msgs += [r1["choices"][0]["message"], {"role": "user", "content": "Why are they tall?"}]
    r2 = requests.post(server + "/v1/chat/completions", headers=ts.H(), json={"messages": msgs, **sess}).json()
    cached = r2["usage"]["prompt_tokens_details"]["cached_tokens"]
    assert cached >= r1["usage"]["prompt_tokens"]  # the whole first turn came from the session
    # The same conversation computed from scratch (another salt: no prefix reuse) answers the same.
    r3 = requests.post(server + "/v1/chat/completions", headers=ts.H(),
                       json={"messages": msgs, "max_tokens": 12, "temperature": 0, "cache_salt": "fresh"}).json()
    assert r3["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    assert r3["choices"][0]["message"]["content"] == r2["choices"][0]["message"]["content"]
    # Listed for its tenant only.
    names = [s["name"] for s in requests.get(server + "/v1/sessions", headers=ts.H()).json()["data"]]
    assert "conv-1" in names
    assert requests.get(server + "/v1/sessions", headers=ts.H(KEY2)).json()["data"] == []
    assert requests.get(server + "/v1/sessions/conv-1", headers=ts.H(KEY2)).status_code == 404
    assert requests.get(server + "/v1/sessions").status_code == 401
    info = requests.get(server + "/v1/sessions/conv-1", headers=ts.H()).json()
    assert info["tokens"] > cached and info["bytes"] > 0
    # Download, upload under another name, continue from it.
    raw = requests.get(server + "/v1/sessions/conv-1/kv", headers=ts.H()).content
    assert raw[:8] == b"KVCRUNCH"
    up = requests.put(server + "/v1/sessions/conv-2/kv", headers=ts.H(), data=raw)
    assert up.status_code == 200 and up.json()["tokens"] == info["tokens"]
    bad = bytearray(raw)
    bad[len(bad) // 2] ^= 0x40
    ts.assert_error(requests.put(server + "/v1/sessions/conv-3/kv", headers=ts.H(), data=bytes(bad)), 400)
    ts.assert_error(requests.put(server + "/v1/sessions/conv-3/kv", headers=ts.H(), data=raw[:100]), 400)
    # Another KV configuration for the same session: 409 naming both.
    r = requests.post(server + "/v1/chat/completions", headers=ts.H(),
                      json={"messages": msgs, **sess, "kv": {"k": "q8_0", "v": "q4_0"}})
    ts.assert_error(r, 409, param="session")
    assert "another KV configuration" in r.json()["error"]["message"]
    # Bad names.
    for name in ["../x", "", "a/b", "x" * 200]:
        r = requests.post(server + "/v1/completions", headers=ts.H(), json={"prompt": "hi", "session": name})
        ts.assert_error(r, 400, param="session")
    assert requests.delete(server + "/v1/sessions/conv-2", headers=ts.H()).json()["deleted"] is True
    assert requests.delete(server + "/v1/sessions/conv-2", headers=ts.H()).status_code == 404


def test_corrupt_session_file_is_recomputed(server, sdir):
    msgs = [{"role": "user", "content": "Name three rivers."}]
    body = {"messages": msgs, "max_tokens": 8, "temperature": 0, "session": "corrupt-me"}
    first = requests.post(server + "/v1/chat/completions", headers=ts.H(), json=body).json()
    files = glob.glob(os.path.join(sdir, "*", "corrupt-me.kvc"))
    assert len(files) == 1
    data = bytearray(open(files[0], "rb").read())
    data[len(data) // 3] ^= 0xFF
    open(files[0], "wb").write(bytes(data))
    rej = metric(server, "sessions_rejected_total")
    msgs += [first["choices"][0]["message"], {"role": "user", "content": "And three lakes?"}]
    # (Shorter than one prefix block: nothing else can be reused.)
    r = requests.post(server + "/v1/chat/completions", headers=ts.H(), json={**body, "messages": msgs})
    assert r.status_code == 200
    assert r.json()["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    assert metric(server, "sessions_rejected_total") == rej + 1
    # Overwritten with a good state: the next turn restores it.
    info = requests.get(server + "/v1/sessions/corrupt-me", headers=ts.H()).json()
    assert info["tokens"] > 0


def test_small_prefix_cache_evicts_without_errors(sdir):
    proc, url = start(["--prefix-cache", "4MiB"])  # 2 f16 blocks of 64 tokens (1.47 MiB each)
    try:
        for off in range(0, 5):
            ids = book_tokens(url, 300, offset=off * 30000)
            complete(url, ids)
            complete(url, ids)
        assert metric(url, "prefix_cache_bytes") <= 4 << 20
        assert metric(url, "prefix_cache_evictions_total") > 0
    finally:
        ts.stop_server(proc)


# --- the shared tier (Redis) ---------------------------------------------------------------------

needs_redis = pytest.mark.skipif(not REDIS, reason="no --redis URL given")


def redis_cli(*args):
    host, port = REDIS.split("//")[1].split(":")
    return subprocess.run([REDIS_CLI, "-h", host, "-p", port.split("/")[0], *args],
                          capture_output=True, text=True, timeout=30)


@needs_redis
def test_two_servers_share_prefixes_through_redis():
    redis_cli("FLUSHALL")
    a_proc, a = start(["--kv-store", REDIS])
    b_proc, b = start(["--kv-store", REDIS])
    try:
        ids = book_tokens(a, 1000, offset=200000)
        ans_a, c = complete(a, ids)
        assert c == 0
        time.sleep(1.0)  # blocks are written to Redis by a worker thread
        ans_b, c = complete(b, ids)
        assert c >= 960
        assert ans_b == ans_a
        assert metric(b, "prefix_cache_remote_hits_total") >= 960
        # A value corrupted in Redis (one flipped byte): refused, recomputed, same answer.
        ids2 = book_tokens(a, 600, offset=260000)
        ans2, _ = complete(a, ids2)
        time.sleep(1.0)
        keys = [k for k in redis_cli("--scan", "--pattern", "kvc:v1:*").stdout.split() if k]
        assert keys
        c_proc, c_url = start(["--kv-store", REDIS])
        try:
            for k in keys:
                redis_cli("SETRANGE", k, "300", "\x7f")
            rej = metric(c_url, "kv_store_rejected_total")
            ans3, cached = complete(c_url, ids2)
            assert ans3 == ans2 and cached == 0
            assert metric(c_url, "kv_store_rejected_total") > rej
        finally:
            ts.stop_server(c_proc)
    finally:
        ts.stop_server(a_proc)
        ts.stop_server(b_proc)


if __name__ == "__main__":
    import argparse
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", default=ts.BIN)
    ap.add_argument("--model", default=ts.MODEL)
    ap.add_argument("--redis", default="")
    ap.add_argument("--redis-cli", default="redis-cli")
    args, rest = ap.parse_known_args()
    if not os.path.exists(args.model):
        print(f"model missing: {args.model}")
        sys.exit(77)
    os.environ["KVC_BIN"], os.environ["KVC_MODEL"] = args.bin, args.model
    os.environ["KVC_REDIS"], os.environ["KVC_REDIS_CLI"] = args.redis, args.redis_cli
    ts.BIN, ts.MODEL = args.bin, args.model
    sys.exit(pytest.main([__file__, "-x", "-q", "-p", "no:cacheprovider", *rest]))
