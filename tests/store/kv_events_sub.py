#!/usr/bin/env python3
"""Subscriber for kvcrunch's KV events, decoding them as vLLM's consumers do (msgspec structs of
vllm/distributed/kv_events.py's schema, written out here) and as raw msgpack.

Used by tests/store/kv_events_test.cc (KvEventsPython.*):
  kv_events_sub.py --endpoint E --replay R --topic T --encoding array|map --expect-replayed N
It connects SUB and the replay DEALER, prints "ready", asks for a replay from sequence 0, checks
every replayed batch, then waits for live batches (the test publishes a heartbeat until this exits),
checks that live sequence numbers keep increasing, and prints one JSON line with what it decoded.
Exit status 0 when everything decoded and matched; 1 with a message otherwise.
"""
import argparse
import json
import sys
import time

import msgpack
import msgspec
import zmq


def structs(array_like):
    # vLLM's schema (field order, defaults, tag=True, omit_defaults=True); array_like as requested.
    class KVCacheEvent(msgspec.Struct, array_like=array_like, omit_defaults=True, gc=False, tag=True):
        pass

    class BlockStored(KVCacheEvent):
        block_hashes: list[int | bytes]
        parent_block_hash: int | bytes | None
        token_ids: list[int]
        block_size: int
        lora_id: int | None
        medium: str | None
        lora_name: str | None
        extra_keys: list | None = None
        group_idx: int | None = None

    class BlockRemoved(KVCacheEvent):
        block_hashes: list[int | bytes]
        medium: str | None
        group_idx: int | None = None

    class AllBlocksCleared(KVCacheEvent):
        pass

    class KVEventBatch(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
        ts: float
        events: list[BlockStored | BlockRemoved | AllBlocksCleared]
        data_parallel_rank: int | None = None

    return KVEventBatch


def describe(batch):
    out = []
    for e in batch.events:
        d = {"type": type(e).__name__}
        for f in e.__struct_fields__:
            d[f] = getattr(e, f)
        out.append(d)
    return {"ts": batch.ts, "dp_rank": batch.data_parallel_rank, "events": out}


def check_raw(payload, array_like):
    raw = msgpack.unpackb(payload, raw=False)
    assert isinstance(raw, list) and len(raw) == 3, f"batch is not [ts, events, dp_rank]: {raw!r}"
    assert isinstance(raw[0], float), "ts is not a float"
    for ev in raw[1]:
        if array_like:
            assert isinstance(ev, list) and isinstance(ev[0], str), f"event is not a tagged array: {ev!r}"
        else:
            assert isinstance(ev, dict) and next(iter(ev)) == "type", f"event is not a tagged map: {ev!r}"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--endpoint", required=True)
    ap.add_argument("--replay", required=True)
    ap.add_argument("--topic", default="")
    ap.add_argument("--encoding", choices=["array", "map"], default="array")
    ap.add_argument("--expect-replayed", type=int, required=True)
    ap.add_argument("--live", type=int, default=3, help="live batches to receive")
    a = ap.parse_args()
    array_like = a.encoding == "array"
    dec = msgspec.msgpack.Decoder(type=structs(array_like))

    ctx = zmq.Context()
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, a.topic.encode())
    sub.connect(a.endpoint)
    rep = ctx.socket(zmq.DEALER)
    rep.connect(a.replay)
    print("ready", flush=True)

    result = {"replayed": [], "live_seqs": []}
    rep.send_multipart([b"", (0).to_bytes(8, "big")])
    deadline = time.time() + 10
    while True:
        if not rep.poll(max(1, int((deadline - time.time()) * 1000))):
            print("timeout waiting for the replay", file=sys.stderr)
            return 1
        frames = rep.recv_multipart()
        assert len(frames) == 3 and frames[0] == b"", f"bad replay frames {frames!r}"
        seq = int.from_bytes(frames[1], "big", signed=True)
        if seq == -1:
            assert frames[2] == b"", "end marker with a payload"
            break
        check_raw(frames[2], array_like)
        b = dec.decode(frames[2])
        result["replayed"].append({"seq": seq, **describe(b)})
    # At least the batches published before the subscriber started (the test's live heartbeat may
    # have added more by the time the replay request arrived).
    if len(result["replayed"]) < a.expect_replayed:
        print(f"replayed {len(result['replayed'])} batches, expected >= {a.expect_replayed}", file=sys.stderr)
        return 1
    seqs = [r["seq"] for r in result["replayed"]]
    if seqs != list(range(len(seqs))):
        print(f"replayed sequence numbers {seqs}", file=sys.stderr)
        return 1

    deadline = time.time() + 10
    last = seqs[-1] if seqs else -1
    while len(result["live_seqs"]) < a.live:
        if not sub.poll(max(1, int((deadline - time.time()) * 1000))):
            print("timeout waiting for live batches", file=sys.stderr)
            return 1
        topic, seq_b, payload = sub.recv_multipart()
        assert topic == a.topic.encode(), topic
        assert len(seq_b) == 8
        seq = int.from_bytes(seq_b, "big")
        if seq <= last:
            print(f"live sequence {seq} after {last}", file=sys.stderr)
            return 1
        last = seq
        check_raw(payload, array_like)
        dec.decode(payload)
        result["live_seqs"].append(seq)
    print(json.dumps(result, default=lambda x: x.hex() if isinstance(x, bytes) else str(x)), flush=True)
    sub.close(0)
    rep.close(0)
    ctx.term()
    return 0


if __name__ == "__main__":
    sys.exit(main())
