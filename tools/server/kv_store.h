// The server's stored KV (docs/store.md): the prefix cache, the shared tier (Redis) and named
// sessions, between the HTTP layer and the engine. It never touches the model: it fills a request's
// restore_blocks / restore_sequence before Submit and takes the blocks and states the engine
// exports.
//
// Prefix cache: the prompt's full blocks (block_tokens each, at most n_prompt - 1 tokens: one
// token is always computed for its logits) are looked up by chain key (store/prefix_cache.h),
// locally first, then in the shared tier (one pipelined MGET for the keys not held locally). Every
// record read from the tier is verified (checksum, model, KV configuration, key) before use; a
// corrupt or mismatched value counts as a miss and is recomputed. Blocks the engine exports are
// stored locally at once (on the engine thread: a copy), then a worker thread writes them to the
// tier (SET with a TTL) and publishes KV events; the engine thread never waits for Redis.
// Only requests without an eviction policy use and feed the prefix cache: a policy changes the
// cells (the KV of a block then depends on tokens after it). Centred codecs (center=1) neither:
// their mean comes from the first prefill chunk.
//
// Tenants: keys chain from a root that hashes the tenant salt = the digest of the request's API
// key (none: "") and its optional `cache_salt`; a request never sees KV of another salt.
//
// Sessions: `"session": "NAME"` on a completion restores NAME's saved KV when its tokens are a
// prefix of the prompt, and saves the state at the end. Files: <dir>/<tenant>/<NAME>.kvc
// (kSequence records, written atomically); a corrupt file is a miss (logged, recomputed,
// overwritten); a file for another model or KV configuration is an error (409) that names both.
#pragma once

#include <atomic>
#include <condition_variable>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "engine/engine.h"
#include "store/kv_format.h"
#include "store/prefix_cache.h"

namespace kvc::server {

// The shared tier as the store uses it (implemented over store::RedisTier).
class RemoteTier {
 public:
  virtual ~RemoteTier() = default;
  // One result per key: the value, NOT_FOUND, or UNAVAILABLE (down / slow).
  virtual std::vector<StatusOr<std::string>> MGet(const std::vector<std::string>& keys) = 0;
  virtual Status Set(const std::string& key, std::string_view value) = 0;
  virtual bool up() const = 0;
  virtual std::string Describe() const = 0;  // for /metrics labels and logs
};

// KV events (implemented over store::KvEventPublisher; vLLM's format).
class EventSink {
 public:
  virtual ~EventSink() = default;
  virtual void Stored(const std::vector<store::Digest>& keys, const store::Digest* parent,
                      const std::vector<int32_t>& tokens, int block_tokens) = 0;
  virtual void Removed(const std::vector<store::Digest>& keys) = 0;
  virtual void Cleared() = 0;
};

// Adapters over the library's Redis client and event publisher (src/store/).
StatusOr<std::unique_ptr<RemoteTier>> MakeRedisRemote(const std::string& url, int64_t ttl_s,
                                                      int timeout_ms);
// endpoint: ZMQ PUB endpoint ("tcp://*:5557"); replay: ROUTER endpoint ("" = none); topic: first
// frame of every message (llm-d expects "kv@POD@MODEL").
StatusOr<std::unique_ptr<EventSink>> MakeEventPublisher(const std::string& endpoint,
                                                        const std::string& replay,
                                                        const std::string& topic);

struct StoreOptions {
  int block_tokens = 64;              // --prefix-block
  int64_t prefix_cache_bytes = 0;     // --prefix-cache (0: no local prefix cache)
  std::string session_dir;            // --session-dir ("": sessions off)
  std::unique_ptr<RemoteTier> remote; // --kv-store (null: none)
  std::unique_ptr<EventSink> events;  // --kv-events (null: none)
  size_t max_pending_writes = 256;    // exported blocks queued for the worker; beyond: dropped
};

struct StoreCounters {
  int64_t queries_tokens = 0;    // prompt tokens looked up (vLLM prefix_cache_queries)
  int64_t hit_tokens = 0;        // of which found (vLLM prefix_cache_hits)
  int64_t local_hit_tokens = 0, remote_hit_tokens = 0;
  int64_t blocks_stored = 0;     // records put in the local cache
  int64_t remote_gets = 0, remote_get_bytes = 0, remote_sets = 0, remote_set_bytes = 0;
  int64_t remote_errors = 0;     // UNAVAILABLE answers (down, slow)
  int64_t remote_rejected = 0;   // values that failed verification (corrupt, other model/config/key)
  int64_t writes_dropped = 0;    // blocks not stored because the worker queue was full
  int64_t sessions_restored = 0, sessions_saved = 0, sessions_rejected = 0;
  int64_t sessions_save_errors = 0;  // states not written (logged; the response was already 200)
  store::PrefixCacheStats local;
  bool remote_configured = false, remote_up = false;
};

class KvStore {
 public:
  KvStore(const Model& model, StoreOptions opt);
  ~KvStore();  // finishes queued writes, stops the worker

  bool prefix_enabled() const { return local_ != nullptr || opt_.remote != nullptr; }
  bool sessions_enabled() const { return !opt_.session_dir.empty(); }
  int block_tokens() const { return opt_.block_tokens; }

  // Tenant salt from the API key's digest (may be null) and the request's cache_salt.
  static std::string TenantSalt(const store::Digest* api_key, const std::string& cache_salt);

  // Prefix cache for a request about to be submitted: fills restore_blocks with the longest
  // verified cached prefix and sets up block export. No-op for requests with an eviction policy
  // or when the prefix cache is off.
  void PreparePrefix(engine::Request* r, const std::string& salt);

  // Sessions. Validates NAME ([A-Za-z0-9_.-], 1..128 chars; INVALID_ARGUMENT).
  static Status ValidSessionName(const std::string& name);
  // Restores NAME into r->restore_sequence when its tokens prefix the prompt (and sets
  // r->save_state). FAILED_PRECONDITION when NAME was saved with another model or KV
  // configuration. A missing or corrupt file is not an error (corrupt: logged, counted).
  Status PrepareSession(engine::Request* r, const std::string& salt, const std::string& name);
  // Saves an engine state (Event::state) as NAME.
  Status SaveSession(const std::string& salt, const std::string& name, const std::string& state);
  struct SessionInfo {
    std::string name;
    int64_t bytes = 0, tokens = 0, pending = 0;
    int64_t modified = 0;  // unix seconds
    std::string kv;        // the KV configuration description
  };
  StatusOr<std::vector<SessionInfo>> ListSessions(const std::string& salt);
  StatusOr<SessionInfo> GetSession(const std::string& salt, const std::string& name);
  StatusOr<std::string> ReadSessionBytes(const std::string& salt, const std::string& name);
  // Stores uploaded record bytes as NAME after verifying them (checksum, a sequence record, this
  // model): DATA_LOSS / FAILED_PRECONDITION otherwise.
  Status PutSessionBytes(const std::string& salt, const std::string& name, std::string bytes);
  Status DeleteSession(const std::string& salt, const std::string& name);

  StoreCounters GetCounters() const;
  void WaitIdle();  // tests and benchmarks: until queued writes are done

 private:
  struct Pending {
    engine::Request::BlockOut block;
    // Events go out in queue order: a BlockRemoved queued behind the BlockStored of the same key
    // (an eviction right after the store), never before it.
    bool announce = true;               // BlockStored for block (false: not held locally)
    std::vector<store::Digest> removed;  // non-empty: a BlockRemoved only
  };
  const store::KvFingerprint& KvFp(const engine::KvSettings& kv);
  std::string SessionPath(const std::string& salt, const std::string& name) const;
  std::string RemoteKey(const store::Digest& key) const;
  void Work();

  const Model& model_;
  StoreOptions opt_;
  std::unique_ptr<store::PrefixCache> local_;
  mutable std::mutex mu_;  // counters_, fps_, queue_
  std::condition_variable cv_, idle_cv_;
  StoreCounters counters_;
  std::map<std::string, store::KvFingerprint> fps_;
  std::deque<Pending> queue_;
  bool busy_ = false, stop_ = false;
  std::thread worker_;
};

}  // namespace kvc::server
