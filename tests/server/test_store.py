"""Stored KV in `kvcrunch serve` end to end (docs/store.md): the prefix cache, tenant isolation,
named sessions, the shared Redis tier between servers (standalone, cluster, corrupt values, Redis
killed and restarted, a tiny memory cap), another model file, and KV events in vLLM's format.
Redis servers are started by the test itself (scripts/redis.sh); KVC_NO_REDIS=1 skips those.

    python3 tests/server/test_store.py --bin build/kvcrunch --model models/SmolLM2-135M-Instruct.Q4_1.gguf \
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
# Each test module run starts its own throw-away Redis servers with scripts/redis.sh (loopback,
# free ports, no persistence, LRU cap): a standalone server, a 3-master cluster, and a tiny one.

REDIS_SH = os.path.join(ROOT, "scripts", "redis.sh")


def redis_sh(*args):
    r = subprocess.run(["bash", REDIS_SH, *args], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    return r


@pytest.fixture(scope="module")
def redis():
    if os.environ.get("KVC_NO_REDIS") == "1":
        pytest.skip("KVC_NO_REDIS=1")
    d = tempfile.mkdtemp(prefix="kvc-redis-")
    redis_sh("start", "both", d, "256mb")
    tiny = os.path.join(d, "tiny")
    redis_sh("start", "standalone", tiny, "6mb")
    port = open(os.path.join(d, "standalone", "port")).read().split()[0]
    ports = open(os.path.join(d, "cluster", "ports")).read().split()
    tport = open(os.path.join(tiny, "port")).read().split()[0]
    env = {"dir": d, "url": f"redis://127.0.0.1:{port}", "port": port,
           "cluster": "redis-cluster://" + ",".join(f"127.0.0.1:{p}" for p in ports[:2]),
           "tiny": f"redis://127.0.0.1:{tport}", "tiny_port": tport}
    try:
        yield env
    finally:
        redis_sh("stop", tiny)
        redis_sh("stop", d)


def cli(port, *args):
    return subprocess.run(["redis-cli", "-h", "127.0.0.1", "-p", str(port), *args],
                          capture_output=True, text=True, timeout=30)


def wait_stored(url, n_before, at_least=1, timeout=20):
    ts.wait_for(lambda: metric(url, "kv_store_sets_total") >= n_before + at_least, timeout,
                "blocks written to Redis")


def test_two_servers_share_prefixes_through_redis(redis):
    cli(redis["port"], "FLUSHALL")
    a_proc, a = start(["--kv-store", redis["url"]])
    b_proc, b = start(["--kv-store", redis["url"]])
    try:
        ids = book_tokens(a, 1000, offset=200000)
        s0 = metric(a, "kv_store_sets_total")
        ans_a, c = complete(a, ids)
        assert c == 0
        wait_stored(a, s0, 15)
        ans_b, c = complete(b, ids)
        assert c >= 960
        assert ans_b == ans_a
        assert metric(b, "prefix_cache_remote_hits_total") >= 960
        assert metric(b, "kv_store_up") == 1
        # Another tenant, salt or codec on B: misses in Redis too.
        assert complete(b, ids, key=KEY2)[1] == 0
        assert complete(b, ids, cache_salt="s")[1] == 0
        assert complete(b, ids, kv={"k": "q4_0", "v": "q4_0"})[1] == 0
        # Stored bytes in Redis: the record sizes (header + checksum included).
        keys = [k for k in cli(redis["port"], "--scan", "--pattern", "kvc:v1:*").stdout.split() if k]
        sizes = [int(cli(redis["port"], "STRLEN", k).stdout) for k in keys]
        # Each value is one 64-token record of f16 (23,040 B/token) or q4_0 (6,480) plus < 1 %.
        assert sizes and all(any(64 * c < n < 64 * c * 1.01 for c in (23040, 6480)) for n in sizes), sizes
    finally:
        ts.stop_server(a_proc)
        ts.stop_server(b_proc)


def test_corrupt_value_in_redis_is_a_miss_and_recomputed(redis):
    cli(redis["port"], "FLUSHALL")
    a_proc, a = start(["--kv-store", redis["url"]])
    try:
        ids = book_tokens(a, 600, offset=260000)
        s0 = metric(a, "kv_store_sets_total")
        ans, _ = complete(a, ids)
        wait_stored(a, s0, 9)
    finally:
        ts.stop_server(a_proc)
    keys = [k for k in cli(redis["port"], "--scan", "--pattern", "kvc:v1:*").stdout.split() if k]
    assert len(keys) >= 9
    for k in keys:  # a few bytes overwritten inside each value's payload
        cli(redis["port"], "SETRANGE", k, "5000", "Zq!~")
    c_proc, c_url = start(["--kv-store", redis["url"]])
    try:
        ans2, cached = complete(c_url, ids)
        assert ans2 == ans and cached == 0
        assert metric(c_url, "kv_store_rejected_total") >= 9
    finally:
        ts.stop_server(c_proc)


def test_another_model_file_misses(redis, tmp_path):
    cli(redis["port"], "FLUSHALL")
    other = tmp_path / "other.gguf"
    data = bytearray(open(ts.MODEL, "rb").read())
    data[-1] ^= 1  # a different weights file (the last tensor's data)
    other.write_bytes(bytes(data))
    a_proc, a = start(["--kv-store", redis["url"]])
    saved = ts.MODEL
    try:
        ids = book_tokens(a, 400, offset=300000)
        s0 = metric(a, "kv_store_sets_total")
        complete(a, ids)
        wait_stored(a, s0, 6)
        ts.MODEL = str(other)
        b_proc, b = start(["--kv-store", redis["url"]])
    finally:
        ts.MODEL = saved
    try:
        assert complete(b, ids)[1] == 0
    finally:
        ts.stop_server(a_proc)
        ts.stop_server(b_proc)


def test_redis_down_then_back(redis):
    cli(redis["port"], "FLUSHALL")
    a_proc, a = start(["--kv-store", redis["url"], "--kv-store-timeout-ms", "200"])
    try:
        ids = book_tokens(a, 300, offset=340000)
        complete(a, ids, cache_salt="x1")
        redis_sh("kill", redis["dir"] + "/standalone")
        # Requests keep succeeding (from memory and by computing), and the tier is reported down.
        for i in range(3):
            t0 = time.time()
            txt, _ = complete(a, book_tokens(a, 200, offset=360000 + i * 5000))
            assert time.time() - t0 < 30
        ts.wait_for(lambda: metric(a, "kv_store_up") == 0, 10, "kv_store_up = 0")
        assert complete(a, ids, cache_salt="x1")[1] == 256  # the local copy still serves
        redis_sh("resume", redis["dir"] + "/standalone")
        # Back: new blocks reach Redis again.
        s0 = metric(a, "kv_store_sets_total")
        deadline = time.time() + 30
        while time.time() < deadline and metric(a, "kv_store_sets_total") <= s0:
            complete(a, book_tokens(a, 200, offset=380000 + int(time.time() * 1000) % 100000))
            time.sleep(0.5)
        assert metric(a, "kv_store_sets_total") > s0
        assert metric(a, "kv_store_up") == 1
    finally:
        ts.stop_server(a_proc)


def test_tiny_redis_memory_cap_misses_without_errors(redis):
    a_proc, a = start(["--kv-store", redis["tiny"]])
    b_proc, b = start(["--kv-store", redis["tiny"]])
    try:
        q4 = {"kv": {"k": "q4_0", "v": "q4_0"}}
        prompts = [book_tokens(a, 500, offset=400000 + i * 20000) for i in range(6)]
        for p in prompts:
            complete(a, p, **q4)
        time.sleep(2)
        # 6 prompts x 7 blocks x 418 KB = 17.6 MB through a 6 MB Redis: most are evicted (LRU).
        cached = [complete(b, p, **q4)[1] for p in prompts]
        info = cli(redis["tiny_port"], "INFO", "stats").stdout
        assert int(info.split("evicted_keys:")[1].split()[0]) > 0
        assert min(cached) < 448  # some prefixes were evicted: recomputed, same service
        assert metric(b, "kv_store_up") == 1
    finally:
        ts.stop_server(a_proc)
        ts.stop_server(b_proc)


def test_cluster_shares_prefixes(redis):
    a_proc, a = start(["--kv-store", redis["cluster"]])
    b_proc, b = start(["--kv-store", redis["cluster"]])
    try:
        ids = book_tokens(a, 700, offset=450000)
        s0 = metric(a, "kv_store_sets_total")
        ans, _ = complete(a, ids)
        wait_stored(a, s0, 10)
        ans_b, cached = complete(b, ids)
        assert cached == 640 and ans_b == ans
    finally:
        ts.stop_server(a_proc)
        ts.stop_server(b_proc)


def test_kv_events_in_vllm_format(redis):
    import msgpack
    import zmq
    port = ts.free_port()
    a_proc, a = start(["--kv-events", f"tcp://*:{port}"])  # "*": bind (vLLM's rule)
    ctx = zmq.Context()
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.connect(f"tcp://127.0.0.1:{port}")
    try:
        time.sleep(0.5)  # slow joiner
        ids = book_tokens(a, 200, offset=500000)
        complete(a, ids)
        stored = []
        seqs = []
        deadline = time.time() + 20
        while time.time() < deadline and sum(len(e[1]) for e in stored) < 3:
            if not sub.poll(500):
                continue
            topic, seq, payload = sub.recv_multipart()
            seqs.append(int.from_bytes(seq, "big"))
            ts_, events, rank = msgpack.unpackb(payload, raw=False)
            for e in events:
                if e[0] == "BlockStored":
                    stored.append(e)
        # BlockStored: [tag, block_hashes, parent, token_ids, block_size, lora_id, medium, ...]
        assert stored, "no BlockStored event"
        hashes = [h for e in stored for h in e[1]]
        toks = [t for e in stored for t in e[3]]
        assert len(hashes) == 3 and toks == ids[:192]
        assert all(e[4] == 64 for e in stored)
        assert stored[0][2] is None  # the first block has no parent
        assert seqs == sorted(seqs)
    finally:
        sub.close(0)
        ctx.term()
        ts.stop_server(a_proc)


if __name__ == "__main__":
    import argparse
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", default=ts.BIN)
    ap.add_argument("--model", default=ts.MODEL)
    args, rest = ap.parse_known_args()
    if not os.path.exists(args.model):
        print(f"model missing: {args.model}")
        sys.exit(77)
    os.environ["KVC_BIN"], os.environ["KVC_MODEL"] = args.bin, args.model
    ts.BIN, ts.MODEL = args.bin, args.model
    sys.exit(pytest.main([__file__, "-x", "-q", "-p", "no:cacheprovider", *rest]))


def test_kv_events_removal_never_overtakes_its_store(redis):
    # A small --prefix-cache evicts a block right after storing it. The BlockStored events wait in
    # the store's worker queue (here behind a Redis whose writes are paused: its lookups answer);
    # the BlockRemoved of an eviction used to be published at once, before the BlockStored of the
    # same block, so a router replaying the stream believed the server held blocks it had dropped.
    import msgpack
    import zmq
    cli(redis["port"], "FLUSHALL")
    port = ts.free_port()
    proc, url = start(["--prefix-cache", "3500000",  # 2 f16 records of 64 tokens (1.47 MB each)
                       "--kv-events", f"tcp://*:{port}",
                       "--kv-store", redis["url"],
                       "--kv-store-timeout-ms", "1500"])
    ctx = zmq.Context()
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.connect(f"tcp://127.0.0.1:{port}")
    try:
        time.sleep(0.5)  # slow joiner
        ids = book_tokens(url, 300, offset=540000)
        # GET answers, SET waits past the 1.5 s deadline: the worker sits on the first block's SET
        # while the engine stores (and evicts) the others.
        assert cli(redis["port"], "CLIENT", "PAUSE", "2500", "WRITE").returncode == 0
        complete(url, ids)
        stored = metric(url, "prefix_cache_blocks_stored_total")
        evicted = metric(url, "prefix_cache_evictions_total")
        assert stored == 4 and evicted == 2, (stored, evicted)
        held, seen, order = set(), set(), []
        n_s = n_r = 0
        deadline = time.time() + 20
        while time.time() < deadline and (n_s < stored or n_r < evicted):
            if not sub.poll(500):
                continue
            _, _, payload = sub.recv_multipart()
            for e in msgpack.unpackb(payload, raw=False)[1]:
                if e[0] == "BlockStored":
                    n_s += len(e[1])
                    held |= set(e[1])
                    seen |= set(e[1])
                    order.append(("stored", e[1]))
                elif e[0] == "BlockRemoved":
                    n_r += len(e[1])
                    assert set(e[1]) <= seen, f"BlockRemoved before its BlockStored: {order + [e]}"
                    held -= set(e[1])
                    order.append(("removed", e[1]))
        assert (n_s, n_r) == (stored, evicted), order
        assert len(held) == metric(url, "prefix_cache_entries") == 2, order
    finally:
        sub.close(0)
        ctx.term()
        ts.stop_server(proc)


def test_prefix_cache_smaller_than_a_block_stores_nothing():
    # --prefix-cache 1: no record fits. blocks_stored_total used to count every exported block
    # although none was kept (entries 0, evictions 0), and KV events announced them as stored.
    proc, url = start(["--prefix-cache", "1"])
    try:
        ids = book_tokens(url, 200, offset=560000)
        assert complete(url, ids)[1] == 0
        assert complete(url, ids)[1] == 0
        assert metric(url, "prefix_cache_blocks_stored_total") == 0
        assert metric(url, "prefix_cache_entries") == 0
    finally:
        ts.stop_server(proc)


def test_session_save_failure_is_counted_and_others_still_served():
    # The session directory replaced by a file while serving: the request is still answered, the
    # state is not saved; that used to show nowhere but the log.
    d = tempfile.mkdtemp(prefix="kvc-sessions-gone-")
    proc, url = start(["--session-dir", d])
    try:
        complete(url, "Hello there", session="a")
        assert metric(url, "sessions_saved_total") == 1
        shutil.rmtree(d)
        open(d, "w").close()
        complete(url, "Hello there", session="a")
        assert metric(url, "sessions_saved_total") == 1
        assert metric(url, "sessions_save_errors_total") == 1
        complete(url, "Hello there")  # requests without a session are unaffected
    finally:
        ts.stop_server(proc)
        os.remove(d) if os.path.isfile(d) else shutil.rmtree(d, ignore_errors=True)
