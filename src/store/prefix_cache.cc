#include "store/prefix_cache.h"

#include <cstring>

namespace kvc::store {

Digest PrefixRoot(const ModelFingerprint& model, const KvFingerprint& kv, int block_tokens,
                  std::string_view tenant_salt) {
  std::string b = "kvcrunch-prefix/1";
  b.append(reinterpret_cast<const char*>(model.digest.data()), 32);
  b.append(reinterpret_cast<const char*>(kv.digest.data()), 32);
  const uint32_t bt = uint32_t(block_tokens);
  b.append(reinterpret_cast<const char*>(&bt), 4);
  const Digest salt = Sha256(tenant_salt);
  b.append(reinterpret_cast<const char*>(salt.data()), 32);
  return Sha256(b);
}

Digest ChainKey(const Digest& parent, const int32_t* tokens, int n) {
  std::string b(reinterpret_cast<const char*>(parent.data()), 32);
  b.append(reinterpret_cast<const char*>(tokens), size_t(n) * sizeof(int32_t));
  return Sha256(b);
}

std::vector<Digest> ChainKeys(const Digest& root, const int32_t* tokens, int64_t n_blocks,
                              int block_tokens) {
  std::vector<Digest> keys;
  keys.reserve(size_t(n_blocks));
  Digest k = root;
  for (int64_t i = 0; i < n_blocks; ++i) {
    k = ChainKey(k, tokens + i * block_tokens, block_tokens);
    keys.push_back(k);
  }
  return keys;
}

std::vector<std::shared_ptr<const Record>> ResolvePrefix(
    size_t m, int block_tokens, const std::function<std::shared_ptr<const Record>(size_t j)>& get) {
  for (size_t top = m; top >= 1; --top) {
    std::vector<std::shared_ptr<const Record>> chain;
    size_t j = top;
    bool ok = true;
    while (j > 0) {
      auto r = get(j);
      if (!r || r->info.t1 != int64_t(j) * block_tokens || r->info.t0 % block_tokens != 0 ||
          r->info.t0 >= r->info.t1) {
        ok = false;
        break;
      }
      chain.push_back(r);
      j = size_t(r->info.t0 / block_tokens);
    }
    if (ok) return {chain.rbegin(), chain.rend()};
  }
  return {};
}

size_t PrefixCache::DigestHash::operator()(const Digest& d) const {
  size_t h;
  std::memcpy(&h, d.data(), sizeof(h));
  return h;
}

bool PrefixCache::Put(const Digest& key, std::shared_ptr<const Record> rec) {
  std::vector<Digest> removed;
  std::function<void(const std::vector<Digest>&)> cb;
  {
    std::lock_guard<std::mutex> lk(mu_);
    const int64_t b = int64_t(rec->bytes);
    if (b > budget_) return false;
    auto it = map_.find(key);
    if (it != map_.end()) {
      bytes_ -= int64_t(it->second->second->bytes);
      lru_.erase(it->second);
      map_.erase(it);
    }
    lru_.emplace_front(key, std::move(rec));
    map_[key] = lru_.begin();
    bytes_ += b;
    stats_.inserts += 1;
    while (bytes_ > budget_ && !lru_.empty()) {
      auto& last = lru_.back();
      bytes_ -= int64_t(last.second->bytes);
      removed.push_back(last.first);
      map_.erase(last.first);
      lru_.pop_back();
      stats_.evictions += 1;
    }
    cb = on_removed_;
  }
  if (!removed.empty() && cb) cb(removed);
  return true;
}

std::shared_ptr<const Record> PrefixCache::Get(const Digest& key) {
  std::lock_guard<std::mutex> lk(mu_);
  auto it = map_.find(key);
  if (it == map_.end()) return nullptr;
  lru_.splice(lru_.begin(), lru_, it->second);
  return it->second->second;
}

bool PrefixCache::Contains(const Digest& key) const {
  std::lock_guard<std::mutex> lk(mu_);
  return map_.count(key) != 0;
}

void PrefixCache::Clear() {
  std::vector<Digest> removed;
  std::function<void(const std::vector<Digest>&)> cb;
  {
    std::lock_guard<std::mutex> lk(mu_);
    for (auto& e : lru_) removed.push_back(e.first);
    lru_.clear();
    map_.clear();
    bytes_ = 0;
    cb = on_removed_;
  }
  if (!removed.empty() && cb) cb(removed);
}

PrefixCacheStats PrefixCache::GetStats() const {
  std::lock_guard<std::mutex> lk(mu_);
  PrefixCacheStats s = stats_;
  s.entries = int64_t(map_.size());
  s.bytes = bytes_;
  s.budget_bytes = budget_;
  return s;
}

void PrefixCache::SetOnRemoved(std::function<void(const std::vector<Digest>&)> f) {
  std::lock_guard<std::mutex> lk(mu_);
  on_removed_ = std::move(f);
}

}  // namespace kvc::store
