#include "kv_store.h"

#include <sys/stat.h>

#include <filesystem>

#include <fmt/format.h>
#include <spdlog/spdlog.h>

#include "kv/policy.h"
#include "model/model.h"
#include "store/kv_events.h"
#include "store/redis_tier.h"

namespace kvc::server {

namespace fs = std::filesystem;

namespace {

class RedisRemote : public RemoteTier {
 public:
  explicit RedisRemote(std::unique_ptr<store::RedisTier> t, std::string url)
      : t_(std::move(t)), url_(std::move(url)) {}
  std::vector<StatusOr<std::string>> MGet(const std::vector<std::string>& keys) override {
    return t_->MGet(keys);
  }
  Status Set(const std::string& key, std::string_view value) override { return t_->Set(key, value); }
  bool up() const override { return t_->up(); }
  std::string Describe() const override { return url_; }

 private:
  std::unique_ptr<store::RedisTier> t_;
  std::string url_;
};

std::vector<std::string> AsStrings(const std::vector<store::Digest>& keys) {
  std::vector<std::string> out;
  out.reserve(keys.size());
  for (const auto& k : keys) out.emplace_back(reinterpret_cast<const char*>(k.data()), k.size());
  return out;
}

class Publisher : public EventSink {
 public:
  explicit Publisher(std::unique_ptr<store::KvEventPublisher> p) : p_(std::move(p)) {}
  void Stored(const std::vector<store::Digest>& keys, const store::Digest* parent,
              const std::vector<int32_t>& tokens, int block_tokens) override {
    std::string par;
    if (parent) par.assign(reinterpret_cast<const char*>(parent->data()), parent->size());
    p_->BlockStored(AsStrings(keys), parent ? &par : nullptr, tokens, block_tokens);
  }
  void Removed(const std::vector<store::Digest>& keys) override { p_->BlockRemoved(AsStrings(keys)); }
  void Cleared() override { p_->AllBlocksCleared(); }

 private:
  std::unique_ptr<store::KvEventPublisher> p_;
};

}  // namespace

StatusOr<std::unique_ptr<RemoteTier>> MakeRedisRemote(const std::string& url, int64_t ttl_s,
                                                      int timeout_ms) {
  store::RedisOptions o;
  o.url = url;
  o.ttl_s = ttl_s;
  o.timeout_ms = timeout_ms;
  KVC_ASSIGN_OR_RETURN(auto t, store::RedisTier::Create(o));
  return std::unique_ptr<RemoteTier>(new RedisRemote(std::move(t), url));
}

StatusOr<std::unique_ptr<EventSink>> MakeEventPublisher(const std::string& endpoint,
                                                        const std::string& replay,
                                                        const std::string& topic) {
  store::KvEventOptions o;
  o.endpoint = endpoint;
  o.replay_endpoint = replay;
  o.topic = topic;
  KVC_ASSIGN_OR_RETURN(auto p, store::KvEventPublisher::Create(o));
  spdlog::info("KV events: publishing on {}{}", p->endpoint(),
               p->replay_endpoint().empty() ? "" : ", replay on " + p->replay_endpoint());
  return std::unique_ptr<EventSink>(new Publisher(std::move(p)));
}

KvStore::KvStore(const Model& model, StoreOptions opt) : model_(model), opt_(std::move(opt)) {
  if (opt_.prefix_cache_bytes > 0) local_ = std::make_unique<store::PrefixCache>(opt_.prefix_cache_bytes);
  if (local_ && opt_.events) {
    // Through the worker's queue, behind the BlockStored events still waiting there: published
    // directly, an eviction overtook the store of the same block (a router then believed the
    // server held a block it had dropped).
    local_->SetOnRemoved([this](const std::vector<store::Digest>& keys) {
      std::lock_guard<std::mutex> lk(mu_);
      Pending p;
      p.announce = false;
      p.removed = keys;
      queue_.push_back(std::move(p));  // not capped: a removal is 32 B a key, and never dropped
      cv_.notify_all();
    });
  }
  counters_.remote_configured = opt_.remote != nullptr;
  if (prefix_enabled()) worker_ = std::thread([this] { Work(); });
}

KvStore::~KvStore() {
  {
    std::lock_guard<std::mutex> lk(mu_);
    stop_ = true;
    cv_.notify_all();
  }
  if (worker_.joinable()) worker_.join();
}

std::string KvStore::TenantSalt(const store::Digest* api_key, const std::string& cache_salt) {
  std::string s = api_key ? store::DigestHex(*api_key) : std::string();
  s.push_back('\x1f');
  s += cache_salt;
  return s;
}

const store::KvFingerprint& KvStore::KvFp(const engine::KvSettings& kv) {
  const std::string label = fmt::format("{} calib={}", kv.Label(), static_cast<const void*>(kv.cache.calib));
  std::lock_guard<std::mutex> lk(mu_);
  auto it = fps_.find(label);
  if (it != fps_.end()) return it->second;
  store::KvFingerprint fp;
  // A probe cache (nothing written) gives the canonical codec specs. Errors leave the fingerprint
  // empty: Submit then refuses the request with the configuration error.
  auto probe = kv::KvCache::Create(model_.kv_shape(), kv.cache);
  if (probe.ok()) fp = store::FingerprintOf(**probe, "");
  return fps_.emplace(label, fp).first->second;
}

std::string KvStore::RemoteKey(const store::Digest& key) const {
  return "kvc:v1:" + store::DigestHex(key);
}

void KvStore::PreparePrefix(engine::Request* r, const std::string& salt) {
  if (!prefix_enabled() || !r->kv.evict.empty()) return;
  const store::KvFingerprint& kvfp = KvFp(r->kv);
  if (kvfp.text.empty()) return;
  const store::ModelFingerprint& mfp = store::FingerprintOf(model_);
  const int B = opt_.block_tokens;
  const store::Digest root = store::PrefixRoot(mfp, kvfp, B, salt);
  const int64_t n = int64_t(r->prompt.size());
  const int64_t m = (n - 1) / B;  // blocks that leave >= 1 token to compute
  std::vector<store::Digest> keys = store::ChainKeys(root, r->prompt.data(), m, B);
  std::vector<std::shared_ptr<const store::Record>> found(size_t(m) + 1);  // [j]: record ending at block j
  std::vector<bool> from_remote(size_t(m) + 1, false);
  if (local_) {
    for (int64_t j = 1; j <= m; ++j) found[size_t(j)] = local_->Get(keys[size_t(j) - 1]);
  }
  auto resolve = [&] {
    return store::ResolvePrefix(size_t(m), B, [&](size_t j) { return found[j]; });
  };
  std::vector<std::shared_ptr<const store::Record>> chain = resolve();
  const int64_t local_t = chain.empty() ? 0 : chain.back()->info.t1;
  // Called even while the tier is down: it fails fast then, and reconnects after its retry delay.
  if (opt_.remote && local_t < m * B) {
    std::vector<std::string> rkeys;
    std::vector<int64_t> js;
    for (int64_t j = 1; j <= m; ++j) {
      if (!found[size_t(j)]) {
        rkeys.push_back(RemoteKey(keys[size_t(j) - 1]));
        js.push_back(j);
      }
    }
    auto vals = opt_.remote->MGet(rkeys);
    int64_t gets = 0, bytes = 0, errors = 0, rejected = 0;
    for (size_t i = 0; i < vals.size() && i < js.size(); ++i) {
      if (!vals[i].ok()) {
        if (vals[i].status().code() != StatusCode::kNotFound) ++errors;
        continue;
      }
      ++gets;
      bytes += int64_t(vals[i]->size());
      auto rec = store::DecodeRecord(*vals[i]);
      Status st = rec.ok() ? store::CheckMatches(*rec, mfp, kvfp, &keys[size_t(js[i]) - 1]) : rec.status();
      if (st.ok() && rec->info.kind != store::RecordKind::kBlock) st = DataLoss("not a block record");
      if (!st.ok()) {
        ++rejected;
        spdlog::warn("kv store: value {} refused ({}); recomputing", rkeys[i], st.message());
        continue;
      }
      auto p = std::make_shared<const store::Record>(std::move(*rec));
      found[size_t(js[i])] = p;
      from_remote[size_t(js[i])] = true;
      if (local_) local_->Put(keys[size_t(js[i]) - 1], p);
    }
    {
      std::lock_guard<std::mutex> lk(mu_);
      counters_.remote_gets += gets;
      counters_.remote_get_bytes += bytes;
      counters_.remote_errors += errors;
      counters_.remote_rejected += rejected;
    }
    if (gets > 0) chain = resolve();
  }
  int64_t hit = 0, remote_hit = 0;
  for (const auto& rec : chain) {
    hit = rec->info.t1;
    if (from_remote[size_t(rec->info.t1 / B)]) remote_hit += rec->info.t1 - rec->info.t0;
  }
  {
    std::lock_guard<std::mutex> lk(mu_);
    counters_.queries_tokens += n;
    counters_.hit_tokens += hit;
    counters_.remote_hit_tokens += remote_hit;
    counters_.local_hit_tokens += hit - remote_hit;
  }
  r->restore_blocks = std::move(chain);
  // Export the blocks computed from here on.
  r->export_block_tokens = B;
  r->prefix_root = root;
  r->on_block = [this](engine::Request::BlockOut b) {
    // On the engine thread: the local copy at once (a decode is a copy of the record, ~0.1 ms per
    // 64 q4_0 tokens), so the very next request finds it; Redis and events on the worker thread.
    const store::Digest key = b.keys.back();
    bool held = false;
    if (local_ && !local_->Contains(key)) {
      auto rec = store::DecodeRecord(b.record);
      if (!rec.ok()) {
        spdlog::error("kv store: an exported block does not decode: {}", rec.status().message());
        return;
      }
      // A record larger than the whole budget is not kept: not counted as stored, not announced.
      held = local_->Put(key, std::make_shared<const store::Record>(std::move(*rec)));
      if (held) {
        std::lock_guard<std::mutex> lk(mu_);
        counters_.blocks_stored += 1;
      }
    } else if (local_) {
      return;  // another request stored it already (and sent it on)
    }
    if (!opt_.remote && !(opt_.events && held)) return;
    std::lock_guard<std::mutex> lk(mu_);
    if (queue_.size() >= opt_.max_pending_writes) {
      counters_.writes_dropped += 1;
      return;
    }
    Pending p;
    p.block = std::move(b);
    p.announce = held;
    queue_.push_back(std::move(p));
    cv_.notify_all();
  };
}

void KvStore::Work() {
  for (;;) {
    Pending p;
    {
      std::unique_lock<std::mutex> lk(mu_);
      busy_ = false;
      idle_cv_.notify_all();
      cv_.wait(lk, [&] { return stop_ || !queue_.empty(); });
      if (queue_.empty()) return;  // stop_ and nothing left
      p = std::move(queue_.front());
      queue_.pop_front();
      busy_ = true;
    }
    if (!p.removed.empty()) {
      if (opt_.events) opt_.events->Removed(p.removed);
      continue;
    }
    const engine::Request::BlockOut& b = p.block;
    if (opt_.events && p.announce) {
      opt_.events->Stored(b.keys, b.t0 == 0 ? nullptr : &b.parent, b.tokens, opt_.block_tokens);
    }
    if (opt_.remote) {
      Status st = opt_.remote->Set(RemoteKey(b.keys.back()), b.record);
      std::lock_guard<std::mutex> lk(mu_);
      if (st.ok()) {
        counters_.remote_sets += 1;
        counters_.remote_set_bytes += int64_t(b.record.size());
      } else {
        counters_.remote_errors += 1;
      }
    }
  }
}

void KvStore::WaitIdle() {
  std::unique_lock<std::mutex> lk(mu_);
  idle_cv_.wait(lk, [&] { return queue_.empty() && !busy_; });
}

StoreCounters KvStore::GetCounters() const {
  std::lock_guard<std::mutex> lk(mu_);
  StoreCounters c = counters_;
  if (local_) c.local = local_->GetStats();
  c.remote_up = opt_.remote && opt_.remote->up();
  return c;
}

// --- sessions ---

Status KvStore::ValidSessionName(const std::string& name) {
  if (name.empty() || name.size() > 128) {
    return InvalidArgument("session names have 1 to 128 characters");
  }
  for (char c : name) {
    if (!(std::isalnum(static_cast<unsigned char>(c)) || c == '_' || c == '-' || c == '.')) {
      return InvalidArgument(fmt::format("session name '{}': use letters, digits, '_', '-', '.'", name));
    }
  }
  if (name == "." || name == "..") return InvalidArgument("session name '.' or '..' is not allowed");
  return Status::Ok();
}

std::string KvStore::SessionPath(const std::string& salt, const std::string& name) const {
  const std::string tenant = store::DigestHex(store::Sha256(salt)).substr(0, 24);
  return (fs::path(opt_.session_dir) / tenant / (name + ".kvc")).string();
}

Status KvStore::PrepareSession(engine::Request* r, const std::string& salt, const std::string& name) {
  if (!sessions_enabled()) {
    return InvalidArgument("sessions are off on this server (start it with --session-dir DIR)");
  }
  KVC_RETURN_IF_ERROR(ValidSessionName(name));
  r->save_state = true;
  const std::string path = SessionPath(salt, name);
  std::error_code ec;
  if (!fs::exists(path, ec)) return Status::Ok();
  auto bytes = store::ReadFile(path);
  if (!bytes.ok()) return Status::Ok();
  auto rec = store::DecodeRecord(*bytes);
  if (!rec.ok() || rec->info.kind != store::RecordKind::kSequence) {
    spdlog::warn("session {}: saved KV refused ({}); recomputing and overwriting", name,
                 rec.ok() ? "not a session record" : rec.status().message());
    std::lock_guard<std::mutex> lk(mu_);
    counters_.sessions_rejected += 1;
    return Status::Ok();
  }
  // The KV configuration with the request's eviction policy (sessions keep policies' state).
  kv::KvCacheConfig cfg = r->kv.cache;
  auto policy = kv::MakePolicy(r->kv.evict, model_.kv_shape());
  if (!policy.ok()) return policy.status();
  if (*policy && !cfg.position_mode_set && cfg.position_mode == kv::PositionMode::kOriginal) {
    cfg.position_mode = (*policy)->position_mode();
  }
  auto probe = kv::KvCache::Create(model_.kv_shape(), cfg);
  if (!probe.ok()) return probe.status();
  const store::KvFingerprint fp = store::FingerprintOf(**probe, *policy ? (*policy)->Name() : "");
  if (Status st = store::CheckMatches(*rec, store::FingerprintOf(model_), fp); !st.ok()) {
    std::lock_guard<std::mutex> lk(mu_);
    counters_.sessions_rejected += 1;
    return Status(st.code(), fmt::format("session '{}': {}", name, st.message()));
  }
  const auto& tk = rec->info.tokens;
  if (int64_t(tk.size()) < int64_t(r->prompt.size()) &&
      std::equal(tk.begin(), tk.end(), r->prompt.begin())) {
    r->restore_sequence = std::make_shared<const store::Record>(std::move(*rec));
    r->restore_blocks.clear();
    std::lock_guard<std::mutex> lk(mu_);
    counters_.sessions_restored += 1;
  }
  return Status::Ok();
}

Status KvStore::SaveSession(const std::string& salt, const std::string& name, const std::string& state) {
  const Status st = [&]() -> Status {
    KVC_RETURN_IF_ERROR(ValidSessionName(name));
    const std::string path = SessionPath(salt, name);
    std::error_code ec;
    fs::create_directories(fs::path(path).parent_path(), ec);
    if (ec) return Internal(fmt::format("cannot create {}: {}", fs::path(path).parent_path().string(), ec.message()));
    return store::WriteFileAtomic(path, state);
  }();
  std::lock_guard<std::mutex> lk(mu_);
  // A failed save (session dir gone, full disk) is only logged: the response has already been
  // answered 200; the counter makes it visible on /metrics.
  (st.ok() ? counters_.sessions_saved : counters_.sessions_save_errors) += 1;
  return st;
}

StatusOr<KvStore::SessionInfo> KvStore::GetSession(const std::string& salt, const std::string& name) {
  if (!sessions_enabled()) return InvalidArgument("sessions are off on this server (--session-dir)");
  KVC_RETURN_IF_ERROR(ValidSessionName(name));
  const std::string path = SessionPath(salt, name);
  auto bytes = store::ReadFile(path);
  if (!bytes.ok()) return NotFound(fmt::format("no session named '{}'", name));
  SessionInfo info;
  info.name = name;
  info.bytes = int64_t(bytes->size());
  std::error_code ec;
  auto t = fs::last_write_time(path, ec);
  if (!ec) {
    info.modified = std::chrono::duration_cast<std::chrono::seconds>(
                        std::chrono::file_clock::to_sys(t).time_since_epoch()).count();
  }
  auto rec = store::DecodeRecord(*bytes);
  if (!rec.ok()) return Status(rec.status().code(), fmt::format("session '{}': {}", name, rec.status().message()));
  info.tokens = int64_t(rec->info.tokens.size());
  info.pending = int64_t(rec->info.pending.size());
  info.kv = rec->info.kv_text;
  return info;
}

StatusOr<std::vector<KvStore::SessionInfo>> KvStore::ListSessions(const std::string& salt) {
  if (!sessions_enabled()) return InvalidArgument("sessions are off on this server (--session-dir)");
  std::vector<SessionInfo> out;
  const fs::path dir = fs::path(SessionPath(salt, "x")).parent_path();
  std::error_code ec;
  if (!fs::exists(dir, ec)) return out;
  for (const auto& e : fs::directory_iterator(dir, ec)) {
    if (e.path().extension() != ".kvc") continue;
    const std::string name = e.path().stem().string();
    auto info = GetSession(salt, name);
    if (info.ok()) {
      out.push_back(std::move(*info));
    } else {
      SessionInfo bad;
      bad.name = name;
      bad.kv = "unreadable: " + info.status().message();
      out.push_back(bad);
    }
  }
  std::sort(out.begin(), out.end(), [](auto& a, auto& b) { return a.name < b.name; });
  return out;
}

StatusOr<std::string> KvStore::ReadSessionBytes(const std::string& salt, const std::string& name) {
  if (!sessions_enabled()) return InvalidArgument("sessions are off on this server (--session-dir)");
  KVC_RETURN_IF_ERROR(ValidSessionName(name));
  auto bytes = store::ReadFile(SessionPath(salt, name));
  if (!bytes.ok()) return NotFound(fmt::format("no session named '{}'", name));
  return bytes;
}

Status KvStore::PutSessionBytes(const std::string& salt, const std::string& name, std::string bytes) {
  if (!sessions_enabled()) return InvalidArgument("sessions are off on this server (--session-dir)");
  KVC_RETURN_IF_ERROR(ValidSessionName(name));
  auto rec = store::DecodeRecord(bytes);
  if (!rec.ok()) return rec.status();
  if (rec->info.kind != store::RecordKind::kSequence) {
    return InvalidArgument("the upload is a prefix-cache block, not a session");
  }
  if (rec->info.model != store::FingerprintOf(model_).digest) {
    return FailedPrecondition(fmt::format("the session was saved with another model ({}); this "
                                          "server runs {}",
                                          rec->info.model_text, store::FingerprintOf(model_).text));
  }
  return SaveSession(salt, name, bytes);
}

Status KvStore::DeleteSession(const std::string& salt, const std::string& name) {
  if (!sessions_enabled()) return InvalidArgument("sessions are off on this server (--session-dir)");
  KVC_RETURN_IF_ERROR(ValidSessionName(name));
  std::error_code ec;
  if (!fs::remove(SessionPath(salt, name), ec)) return NotFound(fmt::format("no session named '{}'", name));
  return Status::Ok();
}

}  // namespace kvc::server
