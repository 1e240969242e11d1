// RedisTier: a shared, lossy byte store on Redis (or Valkey) for compressed KV blocks, standalone
// or Redis Cluster, through Debian's hiredis 0.14 (RESP2, plaintext; no TLS, no cluster support of
// its own: slots, MOVED and ASK are handled here). docs/store.md says how to run Redis for it.
//
// It is a cache, never a source of truth: every value is written with a TTL (SET ... EX), Redis is
// expected to run with an LRU memory cap and no persistence, so a key can vanish at any time and a
// miss is a normal answer. A down or slow Redis is an error for that call only, bounded in time:
//   - every call returns within about timeout_ms (connect + command share one deadline; hiredis
//     socket timeouts enforce it), and then the node counts as down;
//   - while a node is down, calls to it fail at once with UNAVAILABLE for retry_ms, then the next
//     call tries to reconnect (so a dead Redis costs one timeout per retry_ms, not one per call);
//   - each change of state (up -> down, down -> up) is logged once (spdlog warn / info).
// Nothing here throws or aborts on bad input, bad replies or dropped connections.
//
// Thread-safety: all methods may be called concurrently from any number of threads. Each node has a
// pool of at most pool_size connections; a caller that finds all of them busy waits for one, but
// never past its deadline (then UNAVAILABLE, without marking the node down). The RedisTier must
// outlive every call (destroy it after the threads that use it have stopped).
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "kvcrunch/status.h"

namespace kvc::store {

struct RedisOptions {
  // "redis://[USER:PASSWORD@]HOST[:PORT][/DB]" (port 6379, db 0 by default), or
  // "redis-cluster://[USER:PASSWORD@]H1:P1,H2:P2,..." (seed nodes; the rest are found with
  // CLUSTER SLOTS; db must be 0). "redis://:PASSWORD@HOST" sends AUTH PASSWORD (requirepass);
  // with a user, AUTH USER PASSWORD (ACL). HOST is a name or an IPv4 address; name resolution
  // (getaddrinfo, on each new connection) is not bounded by timeout_ms: prefer an address.
  std::string url;
  int64_t ttl_s = 3600;   // seconds; SET ... EX ttl_s on every value; 0 = no expiry (LRU only)
  int timeout_ms = 200;   // connect + command deadline per call, in milliseconds (> 0)
  int retry_ms = 1000;    // after a failure, fail fast (UNAVAILABLE) this long, then reconnect (>= 0)
  int pool_size = 4;      // connections per node (>= 1)
};

class RedisTier {
 public:
  // Parses and checks the options; INVALID_ARGUMENT for a bad URL or option. Does not contact
  // Redis: a server that is down now is found (and retried) by the calls.
  static StatusOr<std::unique_ptr<RedisTier>> Create(const RedisOptions& options);
  ~RedisTier();
  RedisTier(const RedisTier&) = delete;
  RedisTier& operator=(const RedisTier&) = delete;

  // The value (binary-safe). NOT_FOUND on a miss (absent, expired or evicted), UNAVAILABLE when the
  // node is down, slow (deadline passed), its pool is exhausted for the whole deadline, or it
  // answers a transient error (CLUSTERDOWN, TRYAGAIN, LOADING, MASTERDOWN, BUSY); INTERNAL for any
  // other error reply (e.g. WRONGTYPE: a key of another type).
  StatusOr<std::string> Get(const std::string& key);

  // One result per key, in order, with Get's codes per key. Pipelined: one round trip per node
  // (standalone: one node; cluster: keys grouped by the node owning their slot, so keys may hash to
  // different slots; a key redirected by MOVED/ASK is retried on its new node).
  std::vector<StatusOr<std::string>> MGet(const std::vector<std::string>& keys);

  // SET key value [EX ttl_s]. RESOURCE_EXHAUSTED when Redis refuses it for memory (maxmemory with
  // a noeviction policy: see docs/store.md, use allkeys-lru), UNAVAILABLE as for Get.
  Status Set(const std::string& key, std::string_view value);

  // DEL key; OK whether or not it existed.
  Status Del(const std::string& key);

  struct Stats {
    bool up = false;          // as up()
    int64_t gets = 0;         // keys asked for (Get + MGet)
    int64_t hits = 0;
    int64_t misses = 0;       // NOT_FOUND answers
    int64_t sets = 0;         // successful SETs
    int64_t errors = 0;       // calls/keys answered with any other error
    int64_t reconnects = 0;   // successful connects after a node had been marked down
    int64_t bytes_read = 0;   // value bytes of hits
    int64_t bytes_written = 0;  // value bytes of successful SETs
    std::string last_error;   // the latest error message ("" if none)
  };
  Stats GetStats() const;

  // False from a node's failure (I/O error, refused connection, timeout) until a call reconnects
  // to it; true before the first call (not yet known to be down).
  bool up() const;

  // For tests/metrics: whether this is a cluster tier, and how many nodes it knows.
  bool cluster() const;
  int num_nodes() const;

  // Redis Cluster's key slot: CRC16-CCITT (XMODEM) of the key, or of its hash tag (the bytes
  // between the first '{' and the next '}', when non-empty), mod 16384.
  static int KeySlot(std::string_view key);

  class Impl;

 private:
  explicit RedisTier(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace kvc::store
