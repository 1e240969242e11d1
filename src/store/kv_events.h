// KvEventPublisher: KV cache events on ZeroMQ in the wire format vLLM emits
// (vllm/distributed/kv_events.py, ZmqEventPublisher), so that KV-aware routers that already consume
// vLLM's stream (NVIDIA Dynamo's KV router via its ZMQ relay, llm-d's kv-cache indexer) can route a
// request to the kvcrunch server that holds its prefix. docs/store.md shows a decoded example.
//
// Wire format (matched to vLLM's msgspec structs and to what Dynamo and llm-d decode):
//   PUB multipart message: [topic bytes, 8-byte big-endian sequence number (0, 1, 2, ...),
//                           msgpack payload]
//   payload = EventBatch as a msgpack array [ts (float64, Unix seconds), [event, ...], dp_rank]
//   event   = a msgspec tagged struct (tag=True, omit_defaults=True): fields with a default that are
//             at it are omitted (extra_keys, group_idx, ...), the others are always present (nil
//             when None). Two encodings, by KvEventOptions::encoding:
//     kArray (default; vLLM's events were array_like=True until recently, and every version of
//     Dynamo's and llm-d's decoders reads it): the tag string first, then the fields in order:
//       ["BlockStored", block_hashes [int64...], parent_block_hash (int64 | nil), token_ids [int...],
//        block_size int, lora_id nil, medium (str | nil), lora_name nil]
//       ["BlockRemoved", block_hashes [int64...], medium (str | nil)]
//       ["AllBlocksCleared"]
//     kMap (current vLLM main, whose KVCacheEvent dropped array_like; Dynamo and recent llm-d read
//     it too): {"type": "BlockStored", "block_hashes": ..., "parent_block_hash": ...,
//       "token_ids": ..., "block_size": ..., "lora_id": nil, "medium": ..., "lora_name": nil},
//       {"type": "BlockRemoved", "block_hashes": ..., "medium": ...}, {"type": "AllBlocksCleared"}
//   Replay (optional ROUTER socket): a client (DEALER/REQ) sends [b"", start_seq as 8-byte
//   big-endian]; it receives [b"", seq, payload] for every buffered batch with seq >= start_seq,
//   then [b"", 8 bytes 0xff (-1), b""]. The buffer keeps the last buffer_steps batches.
//
// Block hashes: vLLM allows int or bytes; Dynamo's decoder accepts only 64-bit integers (signed or
// unsigned) and llm-d accepts integers or bytes (it keeps the LAST 8 bytes, big-endian). kvcrunch's
// block keys are 32-byte SHA-256 chain hashes, so events carry EventBlockHash(key): the last 8 bytes
// of the key read big-endian, as a signed int64 (the type Dynamo documents). The bit pattern equals
// what llm-d derives from the raw bytes, so all consumers agree. A collision needs 2^32 blocks.
//
// Batching: each call queues one event; the publisher thread sends everything queued since its
// last send as one batch (one sequence number), like one vLLM engine step.
//
// Thread-safety: all methods may be called from any thread. BlockStored/BlockRemoved/
// AllBlocksCleared only append to a bounded in-memory queue (max_queue_events) and never block on
// the network; when the queue is full the event is dropped, counted in dropped(), and logged once.
// The ZMQ sockets are used only by the publisher thread. The destructor sends what is queued
// (at most ~1 s), then closes the sockets.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "kvcrunch/status.h"

namespace kvc::store {

// The medium vLLM uses for the cache attention reads from (MEDIUM_GPU); Dynamo maps "GPU" to its
// primary (device) tier. kvcrunch's working KV lives in host memory but plays that role.
inline constexpr const char* kMediumDevice = "GPU";

enum class KvEventEncoding { kArray, kMap };

struct KvEventOptions {
  // PUB endpoint. As vLLM: bound when it contains '*' or "::" or is ipc:// / inproc://, else
  // connected (e.g. to a relay). "tcp://127.0.0.1:*" binds an ephemeral port (see endpoint()).
  std::string endpoint = "tcp://*:5557";
  std::string replay_endpoint;  // ROUTER endpoint, always bound; "" = no replay
  std::string topic = "";       // first frame of every message (llm-d expects "kv@POD@MODEL")
  int buffer_steps = 10000;     // batches kept for replay (>= 1)
  int dp_rank = 0;              // data-parallel rank (>= 0); > 0 adds to tcp ports, as vLLM does
  int max_queue_events = 100000;  // events waiting to be sent (>= 1); more are dropped
  KvEventEncoding encoding = KvEventEncoding::kArray;  // how each event is encoded (see above)
};

// The 64-bit event hash of a block key (see above). Keys shorter than 8 bytes are left-padded with
// zeros. Pure function, thread-safe.
int64_t EventBlockHash(std::string_view block_key);

class KvEventPublisher {
 public:
  // Creates and binds/connects the sockets and starts the publisher thread. INVALID_ARGUMENT for
  // bad options, UNAVAILABLE when an endpoint cannot be bound (e.g. port in use), with zmq's reason.
  static StatusOr<std::unique_ptr<KvEventPublisher>> Create(const KvEventOptions& options);
  ~KvEventPublisher();
  KvEventPublisher(const KvEventPublisher&) = delete;
  KvEventPublisher& operator=(const KvEventPublisher&) = delete;

  // block_hashes: the chain keys of consecutive full blocks (any length; EventBlockHash is applied).
  // parent_hash: the key of the block before the first one, or nullptr for a sequence's first block.
  // token_ids: the tokens of all these blocks (block_size per block). medium: "" = nil.
  void BlockStored(const std::vector<std::string>& block_hashes, const std::string* parent_hash,
                   const std::vector<int32_t>& token_ids, int block_size,
                   const std::string& medium = kMediumDevice);
  void BlockRemoved(const std::vector<std::string>& block_hashes,
                    const std::string& medium = kMediumDevice);
  void AllBlocksCleared();

  // Waits until every event queued before the call has been sent (handed to ZMQ). For tests and
  // shutdown; returns at once if the publisher thread has stopped.
  void Flush();

  // The endpoints actually bound/connected (with the real port for "tcp://...:*").
  const std::string& endpoint() const;
  const std::string& replay_endpoint() const;  // "" when none
  int64_t batches_sent() const;  // = the next sequence number
  int64_t dropped() const;       // events dropped because the queue was full

  class Impl;

 private:
  explicit KvEventPublisher(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace kvc::store
