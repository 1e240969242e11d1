// The prefix cache (vLLM's automatic prefix caching, SGLang's radix cache, LMCache's chunk keys):
// the KV of full token blocks, reused by later requests whose prompts start with the same tokens.
//
// Keys chain (vLLM docs/design/prefix_caching.md, LMCache token_database.py):
//   root    = SHA-256("kvcrunch-prefix/1" | model digest | KV-configuration digest | block_tokens |
//                     SHA-256(tenant salt))
//   key_i   = SHA-256(key_{i-1} | token ids of block i as int32 little-endian)     (key_0 = root)
// so a block's key names every token before it, the model file, the complete KV configuration
// (kv_format.h FingerprintOf) and the tenant: KV is never reused across tenants, models or KV
// settings. The server derives the tenant salt from the API key and the request's `cache_salt`.
//
// Values are kBlock records (kv_format.h), verified before they are stored here. A record covers
// tokens [t0, t1) with t1 a multiple of block_tokens and is stored under the key of its *last*
// block; window-free caches make one record per block, caches with a window one record per cut
// (kv_format.h BlockExporter). Resolve() chains records back to token 0.
//
// PrefixCache is an LRU within a byte budget of its own (bytes = encoded record sizes); thread-safe.
#pragma once

#include <cstdint>
#include <functional>
#include <list>
#include <memory>
#include <mutex>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

#include "store/kv_format.h"

namespace kvc::store {

Digest PrefixRoot(const ModelFingerprint& model, const KvFingerprint& kv, int block_tokens,
                  std::string_view tenant_salt);
Digest ChainKey(const Digest& parent, const int32_t* tokens, int n);
// Keys of the first n_blocks full blocks of tokens [n_blocks * block_tokens].
std::vector<Digest> ChainKeys(const Digest& root, const int32_t* tokens, int64_t n_blocks,
                              int block_tokens);

// Longest cached prefix: keys [m] are the chain keys of blocks 1..m (keys[j-1] ends at token
// j * block_tokens); get(j) returns the verified record stored under keys[j-1] or null. Returns
// the records covering [0, t) in order for the largest t reachable, or empty.
std::vector<std::shared_ptr<const Record>> ResolvePrefix(
    size_t m, int block_tokens, const std::function<std::shared_ptr<const Record>(size_t j)>& get);

struct PrefixCacheStats {
  int64_t entries = 0, bytes = 0, budget_bytes = 0;
  int64_t inserts = 0, evictions = 0;
};

class PrefixCache {
 public:
  explicit PrefixCache(int64_t budget_bytes) : budget_(budget_bytes) {}
  // Stores a verified record under key (replacing one with the same key). Records larger than the
  // budget are not stored (false). Evicts least recently used entries until the bytes fit.
  bool Put(const Digest& key, std::shared_ptr<const Record> rec);
  // The record under key (and marks it used), or null.
  std::shared_ptr<const Record> Get(const Digest& key);
  bool Contains(const Digest& key) const;
  void Clear();
  PrefixCacheStats GetStats() const;
  // Called (outside the lock) with the keys that left the cache by eviction or Clear (KV events).
  void SetOnRemoved(std::function<void(const std::vector<Digest>&)> f);

 private:
  struct DigestHash {
    size_t operator()(const Digest& d) const;
  };
  using Lru = std::list<std::pair<Digest, std::shared_ptr<const Record>>>;
  mutable std::mutex mu_;
  int64_t budget_;
  int64_t bytes_ = 0;
  PrefixCacheStats stats_;
  Lru lru_;  // most recently used first
  std::unordered_map<Digest, Lru::iterator, DigestHash> map_;
  std::function<void(const std::vector<Digest>&)> on_removed_;
};

}  // namespace kvc::store
