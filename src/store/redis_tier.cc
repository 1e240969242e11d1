#include "store/redis_tier.h"

#include <hiredis/hiredis.h>
#include <spdlog/spdlog.h>
#include <sys/time.h>

#include <algorithm>
#include <atomic>
#include <charconv>
#include <chrono>
#include <condition_variable>
#include <map>
#include <mutex>
#include <shared_mutex>
#include <utility>

namespace kvc::store {
namespace {

using Clock = std::chrono::steady_clock;
using Deadline = Clock::time_point;
constexpr int kNumSlots = 16384;
constexpr int kMaxRedirects = 5;

struct Endpoint {
  std::string host;
  int port = 6379;
  std::string Name() const { return host + ":" + std::to_string(port); }
};

struct ParsedUrl {
  bool cluster = false;
  std::vector<Endpoint> seeds;
  std::string user, password;
  bool auth = false;
  int db = 0;
};

bool ParseInt(std::string_view s, int64_t lo, int64_t hi, int64_t* out) {
  if (s.empty()) return false;
  int64_t v = 0;
  auto [p, ec] = std::from_chars(s.data(), s.data() + s.size(), v);
  if (ec != std::errc() || p != s.data() + s.size() || v < lo || v > hi) return false;
  *out = v;
  return true;
}

StatusOr<Endpoint> ParseHostPort(std::string_view s, const std::string& url) {
  Endpoint e;
  const size_t colon = s.rfind(':');
  std::string_view host = s, port;
  if (colon != std::string_view::npos) {
    host = s.substr(0, colon);
    port = s.substr(colon + 1);
  }
  if (host.empty() || host.find_first_of("[]/@ ") != std::string_view::npos ||
      host.find(':') != std::string_view::npos) {
    return InvalidArgument("redis url '" + url + "': bad host '" + std::string(host) +
                           "' (a name or an IPv4 address)");
  }
  e.host = std::string(host);
  if (colon != std::string_view::npos) {
    int64_t p = 0;
    if (!ParseInt(port, 1, 65535, &p)) {
      return InvalidArgument("redis url '" + url + "': bad port '" + std::string(port) + "'");
    }
    e.port = static_cast<int>(p);
  }
  return e;
}

StatusOr<ParsedUrl> ParseUrl(const std::string& url) {
  ParsedUrl u;
  std::string_view rest(url);
  constexpr std::string_view kStandalone = "redis://", kCluster = "redis-cluster://";
  if (rest.substr(0, kStandalone.size()) == kStandalone) {
    rest.remove_prefix(kStandalone.size());
  } else if (rest.substr(0, kCluster.size()) == kCluster) {
    rest.remove_prefix(kCluster.size());
    u.cluster = true;
  } else {
    return InvalidArgument("redis url '" + url +
                           "': expected redis://HOST:PORT[/DB] or redis-cluster://H1:P1,H2:P2,...");
  }
  if (const size_t at = rest.rfind('@'); at != std::string_view::npos) {
    std::string_view cred = rest.substr(0, at);
    rest.remove_prefix(at + 1);
    const size_t colon = cred.find(':');
    if (colon == std::string_view::npos) {
      u.password = std::string(cred);  // "redis://PASSWORD@host": requirepass
    } else {
      u.user = std::string(cred.substr(0, colon));
      u.password = std::string(cred.substr(colon + 1));
    }
    if (u.password.empty()) return InvalidArgument("redis url '" + url + "': empty password");
    u.auth = true;
  }
  if (const size_t slash = rest.find('/'); slash != std::string_view::npos) {
    std::string_view db = rest.substr(slash + 1);
    rest = rest.substr(0, slash);
    int64_t d = 0;
    if (!db.empty()) {
      if (!ParseInt(db, 0, 1 << 20, &d)) {
        return InvalidArgument("redis url '" + url + "': bad db '" + std::string(db) + "'");
      }
      if (u.cluster && d != 0) {
        return InvalidArgument("redis url '" + url + "': Redis Cluster has only db 0");
      }
    }
    u.db = static_cast<int>(d);
  }
  if (rest.empty()) return InvalidArgument("redis url '" + url + "': no host");
  while (true) {
    const size_t comma = rest.find(',');
    std::string_view hp = rest.substr(0, comma);
    auto e = ParseHostPort(hp, url);
    if (!e.ok()) return e.status();
    u.seeds.push_back(*e);
    if (comma == std::string_view::npos) break;
    rest.remove_prefix(comma + 1);
  }
  if (!u.cluster && u.seeds.size() != 1) {
    return InvalidArgument("redis url '" + url + "': one host for redis:// (use redis-cluster://)");
  }
  return u;
}

struct ReplyDeleter {
  void operator()(redisReply* r) const {
    if (r != nullptr) freeReplyObject(r);
  }
};
using ReplyPtr = std::unique_ptr<redisReply, ReplyDeleter>;

int64_t MsLeft(Deadline d) {
  return std::chrono::duration_cast<std::chrono::milliseconds>(d - Clock::now()).count();
}

timeval ToTimeval(int64_t ms) {
  ms = std::max<int64_t>(ms, 1);
  timeval tv;
  tv.tv_sec = ms / 1000;
  tv.tv_usec = (ms % 1000) * 1000;
  return tv;
}

// A parsed "-MOVED 3999 127.0.0.1:6381" / "-ASK 3999 127.0.0.1:6381" error reply.
struct Redirect {
  bool ask = false;
  int slot = -1;
  Endpoint to;
};

// An error reply: UNAVAILABLE for the transient states of a server or cluster (a cluster that lost
// a master without cluster-require-full-coverage no, a node loading its data, a busy script),
// INTERNAL for anything else (e.g. WRONGTYPE: a key of another type under our name).
Status ErrorReply(const char* op, const redisReply* r) {
  const std::string msg(r->str, r->len);
  for (const char* transient : {"CLUSTERDOWN", "TRYAGAIN", "LOADING", "MASTERDOWN", "BUSY"}) {
    if (msg.rfind(transient, 0) == 0) return Unavailable(std::string("redis ") + op + ": " + msg);
  }
  return Internal(std::string("redis ") + op + ": " + msg);
}

bool ParseRedirect(const redisReply* r, Redirect* out) {
  if (r == nullptr || r->type != REDIS_REPLY_ERROR) return false;
  std::string_view s(r->str, r->len);
  if (s.substr(0, 6) == "MOVED ") {
    out->ask = false;
    s.remove_prefix(6);
  } else if (s.substr(0, 4) == "ASK ") {
    out->ask = true;
    s.remove_prefix(4);
  } else {
    return false;
  }
  const size_t sp = s.find(' ');
  if (sp == std::string_view::npos) return false;
  int64_t slot = 0;
  if (!ParseInt(s.substr(0, sp), 0, kNumSlots - 1, &slot)) return false;
  std::string_view hp = s.substr(sp + 1);
  const size_t colon = hp.rfind(':');
  if (colon == std::string_view::npos) return false;
  int64_t port = 0;
  if (!ParseInt(hp.substr(colon + 1), 1, 65535, &port)) return false;
  out->slot = static_cast<int>(slot);
  out->to.host = std::string(hp.substr(0, colon));
  out->to.port = static_cast<int>(port);
  return !out->to.host.empty();
}

}  // namespace

// One Redis server: a bounded pool of connections and its up/down state.
struct Node {
  Endpoint ep;
  std::string name;
  std::mutex mu;
  std::condition_variable cv;
  std::vector<redisContext*> idle;  // connected, ready
  int in_use = 0;                   // handed out (or being connected)
  uint64_t generation = 0;          // bumped when marked down: older connections are dropped
  bool down = false;                // logged state; cleared by a successful connect
  Clock::time_point retry_at{};     // while down and before this: fail fast

  ~Node() {
    for (redisContext* c : idle) redisFree(c);
  }
};

class RedisTier::Impl {
 public:
  Impl(RedisOptions o, ParsedUrl u) : opt_(std::move(o)), url_(std::move(u)) {
    slots_.assign(kNumSlots, -1);
    for (const Endpoint& e : url_.seeds) AddNodeLocked(e);
    if (!url_.cluster) std::fill(slots_.begin(), slots_.end(), 0);
    slots_stale_ = url_.cluster;
  }

  StatusOr<std::string> Get(const std::string& key) {
    const Deadline dl = Clock::now() + std::chrono::milliseconds(opt_.timeout_ms);
    gets_.fetch_add(1, std::memory_order_relaxed);
    const char* argv[] = {"GET", key.data()};
    const size_t lens[] = {3, key.size()};
    auto r = KeyCommand(key, 2, argv, lens, dl);
    if (!r.ok()) return CountError(r.status());
    return GetResult(r->get());
  }

  std::vector<StatusOr<std::string>> MGet(const std::vector<std::string>& keys) {
    const Deadline dl = Clock::now() + std::chrono::milliseconds(opt_.timeout_ms);
    gets_.fetch_add(static_cast<int64_t>(keys.size()), std::memory_order_relaxed);
    std::vector<StatusOr<std::string>> out(keys.size(), Status(Internal("not run")));
    // Group keys by node (standalone: everything on node 0).
    std::map<Node*, std::vector<size_t>> groups;
    for (size_t i = 0; i < keys.size(); ++i) {
      auto n = Route(keys[i], dl);
      if (!n.ok()) {
        out[i] = CountError(n.status());
        continue;
      }
      groups[*n].push_back(i);
    }
    for (auto& [node, idx] : groups) {
      std::vector<std::vector<const char*>> argvs(idx.size());
      std::vector<std::vector<size_t>> lens(idx.size());
      for (size_t j = 0; j < idx.size(); ++j) {
        argvs[j] = {"GET", keys[idx[j]].data()};
        lens[j] = {3, keys[idx[j]].size()};
      }
      std::vector<ReplyPtr> replies;
      Status s = Pipeline(node, argvs, lens, dl, &replies);
      for (size_t j = 0; j < idx.size(); ++j) {
        const size_t i = idx[j];
        if (!s.ok()) {
          out[i] = CountError(s);
          continue;
        }
        Redirect rd;
        if (url_.cluster && ParseRedirect(replies[j].get(), &rd)) {
          // Resharded: this key alone, following the redirect.
          const char* argv[] = {"GET", keys[i].data()};
          const size_t l[] = {3, keys[i].size()};
          auto r = KeyCommand(keys[i], 2, argv, l, dl);
          out[i] = r.ok() ? GetResult(r->get()) : CountError(r.status());
          continue;
        }
        out[i] = GetResult(replies[j].get());
      }
    }
    return out;
  }

  Status Set(const std::string& key, std::string_view value) {
    const Deadline dl = Clock::now() + std::chrono::milliseconds(opt_.timeout_ms);
    const std::string ttl = std::to_string(opt_.ttl_s);
    const char* argv[] = {"SET", key.data(), value.data(), "EX", ttl.data()};
    const size_t lens[] = {3, key.size(), value.size(), 2, ttl.size()};
    auto r = KeyCommand(key, opt_.ttl_s > 0 ? 5 : 3, argv, lens, dl);
    if (!r.ok()) return CountError(r.status());
    const redisReply* rep = r->get();
    if (rep->type == REDIS_REPLY_STATUS) {
      sets_.fetch_add(1, std::memory_order_relaxed);
      bytes_written_.fetch_add(static_cast<int64_t>(value.size()), std::memory_order_relaxed);
      return Status::Ok();
    }
    if (rep->type == REDIS_REPLY_ERROR) {
      std::string msg(rep->str, rep->len);
      if (msg.rfind("OOM", 0) == 0) return CountError(ResourceExhausted("redis SET: " + msg));
      return CountError(ErrorReply("SET", rep));
    }
    return CountError(Internal("redis SET: unexpected reply type " + std::to_string(rep->type)));
  }

  Status Del(const std::string& key) {
    const Deadline dl = Clock::now() + std::chrono::milliseconds(opt_.timeout_ms);
    const char* argv[] = {"DEL", key.data()};
    const size_t lens[] = {3, key.size()};
    auto r = KeyCommand(key, 2, argv, lens, dl);
    if (!r.ok()) return CountError(r.status());
    if (r->get()->type == REDIS_REPLY_ERROR) {
      return CountError(ErrorReply("DEL", r->get()));
    }
    return Status::Ok();
  }

  Stats GetStats() const {
    Stats s;
    s.up = Up();
    s.gets = gets_.load();
    s.hits = hits_.load();
    s.misses = misses_.load();
    s.sets = sets_.load();
    s.errors = errors_.load();
    s.reconnects = reconnects_.load();
    s.bytes_read = bytes_read_.load();
    s.bytes_written = bytes_written_.load();
    std::lock_guard<std::mutex> l(err_mu_);
    s.last_error = last_error_;
    return s;
  }

  bool Up() const {
    std::shared_lock<std::shared_mutex> l(map_mu_);
    for (const auto& n : nodes_) {
      std::lock_guard<std::mutex> nl(n->mu);
      if (n->down) return false;
    }
    return true;
  }

  bool cluster() const { return url_.cluster; }
  int num_nodes() const {
    std::shared_lock<std::shared_mutex> l(map_mu_);
    return static_cast<int>(nodes_.size());
  }

 private:
  StatusOr<std::string> GetResult(const redisReply* r) {
    switch (r->type) {
      case REDIS_REPLY_STRING:
        hits_.fetch_add(1, std::memory_order_relaxed);
        bytes_read_.fetch_add(static_cast<int64_t>(r->len), std::memory_order_relaxed);
        return std::string(r->str, r->len);
      case REDIS_REPLY_NIL:
        misses_.fetch_add(1, std::memory_order_relaxed);
        return NotFound("redis: no such key");
      case REDIS_REPLY_ERROR:
        return CountError(ErrorReply("GET", r));
      default:
        return CountError(Internal("redis GET: unexpected reply type " + std::to_string(r->type)));
    }
  }

  Status CountError(Status s) {
    errors_.fetch_add(1, std::memory_order_relaxed);
    std::lock_guard<std::mutex> l(err_mu_);
    last_error_ = s.ToString();
    return s;
  }

  // Requires map_mu_ held exclusively (or construction).
  int AddNodeLocked(const Endpoint& e) {
    const std::string name = e.Name();
    for (size_t i = 0; i < nodes_.size(); ++i) {
      if (nodes_[i]->name == name) return static_cast<int>(i);
    }
    auto n = std::make_unique<Node>();
    n->ep = e;
    n->name = name;
    nodes_.push_back(std::move(n));
    return static_cast<int>(nodes_.size()) - 1;
  }

  Node* AddNode(const Endpoint& e) {
    std::unique_lock<std::shared_mutex> l(map_mu_);
    return nodes_[AddNodeLocked(e)].get();
  }

  // The node that owns key's slot; refreshes the cluster's slot map when it is unknown or stale.
  StatusOr<Node*> Route(const std::string& key, Deadline dl) {
    const int slot = url_.cluster ? RedisTier::KeySlot(key) : 0;
    {
      std::shared_lock<std::shared_mutex> l(map_mu_);
      if (!slots_stale_ && slots_[slot] >= 0) return nodes_[slots_[slot]].get();
    }
    Status s = RefreshSlots(dl);
    std::shared_lock<std::shared_mutex> l(map_mu_);
    if (slots_[slot] >= 0) return nodes_[slots_[slot]].get();  // stale map still routes
    if (!s.ok()) return s;
    return Unavailable("redis cluster: slot " + std::to_string(slot) + " is not served");
  }

  // CLUSTER SLOTS from the first node that answers. Rate-limited: at most one refresh per 100 ms
  // (other callers use the current map meanwhile).
  Status RefreshSlots(Deadline dl) {
    std::unique_lock<std::mutex> rl(refresh_mu_, std::try_to_lock);
    if (!rl.owns_lock()) return Status::Ok();
    if (Clock::now() - last_refresh_ < std::chrono::milliseconds(100)) return Status::Ok();
    last_refresh_ = Clock::now();
    std::vector<Node*> candidates;
    {
      std::shared_lock<std::shared_mutex> l(map_mu_);
      for (const auto& n : nodes_) candidates.push_back(n.get());
    }
    Status last = Unavailable("redis cluster: no node known");
    for (Node* n : candidates) {
      if (MsLeft(dl) <= 0) break;
      std::vector<std::vector<const char*>> argv = {{"CLUSTER", "SLOTS"}};
      std::vector<std::vector<size_t>> lens = {{7, 5}};
      std::vector<ReplyPtr> rep;
      Status s = Pipeline(n, argv, lens, dl, &rep);
      if (!s.ok()) {
        last = s;
        continue;
      }
      const redisReply* r = rep[0].get();
      if (r->type != REDIS_REPLY_ARRAY) {
        last = Internal("redis CLUSTER SLOTS on " + n->name + ": " +
                        (r->type == REDIS_REPLY_ERROR ? std::string(r->str, r->len)
                                                      : std::string("not an array")));
        continue;
      }
      std::vector<int> slots(kNumSlots, -1);
      std::unique_lock<std::shared_mutex> l(map_mu_);
      for (size_t i = 0; i < r->elements; ++i) {
        const redisReply* e = r->element[i];
        if (e->type != REDIS_REPLY_ARRAY || e->elements < 3 ||
            e->element[0]->type != REDIS_REPLY_INTEGER ||
            e->element[1]->type != REDIS_REPLY_INTEGER ||
            e->element[2]->type != REDIS_REPLY_ARRAY || e->element[2]->elements < 2 ||
            e->element[2]->element[0]->type != REDIS_REPLY_STRING ||
            e->element[2]->element[1]->type != REDIS_REPLY_INTEGER) {
          continue;
        }
        const long long lo = e->element[0]->integer, hi = e->element[1]->integer;
        const redisReply* m = e->element[2];
        Endpoint ep;
        ep.host = std::string(m->element[0]->str, m->element[0]->len);
        if (ep.host.empty()) ep.host = n->ep.host;  // a node that does not know its own address
        ep.port = static_cast<int>(m->element[1]->integer);
        if (lo < 0 || hi >= kNumSlots || lo > hi || ep.port <= 0 || ep.port > 65535) continue;
        const int idx = AddNodeLocked(ep);
        for (long long s2 = lo; s2 <= hi; ++s2) slots[s2] = idx;
      }
      slots_ = std::move(slots);
      slots_stale_ = false;
      return Status::Ok();
    }
    return last;
  }

  // One keyed command, following MOVED (updates the slot map and marks it stale) and ASK (ASKING
  // first, on the same connection).
  StatusOr<ReplyPtr> KeyCommand(const std::string& key, int argc, const char** argv,
                                const size_t* lens, Deadline dl) {
    KVC_ASSIGN_OR_RETURN(Node* node, Route(key, dl));
    bool asking = false;
    for (int hop = 0; hop <= kMaxRedirects; ++hop) {
      std::vector<std::vector<const char*>> argvs;
      std::vector<std::vector<size_t>> lenss;
      if (asking) {
        argvs.push_back({"ASKING"});
        lenss.push_back({6});
      }
      argvs.emplace_back(argv, argv + argc);
      lenss.emplace_back(lens, lens + argc);
      std::vector<ReplyPtr> rep;
      KVC_RETURN_IF_ERROR(Pipeline(node, argvs, lenss, dl, &rep));
      ReplyPtr r = std::move(rep.back());
      Redirect rd;
      if (!url_.cluster || !ParseRedirect(r.get(), &rd)) return r;
      if (rd.ask) {
        node = AddNode(rd.to);
        asking = true;
      } else {
        std::unique_lock<std::shared_mutex> l(map_mu_);
        const int idx = AddNodeLocked(rd.to);
        slots_[rd.slot] = idx;
        slots_stale_ = true;  // the next Route refreshes the whole map
        node = nodes_[idx].get();
        asking = false;
      }
    }
    return Internal("redis cluster: more than " + std::to_string(kMaxRedirects) + " redirects");
  }

  // Sends the commands pipelined on one pooled connection of `node` and reads all replies, within
  // the deadline. An I/O error or timeout drops the connection and marks the node down.
  Status Pipeline(Node* node, const std::vector<std::vector<const char*>>& argvs,
                  const std::vector<std::vector<size_t>>& lens, Deadline dl,
                  std::vector<ReplyPtr>* out) {
    // A deadline spent elsewhere (another node of an MGet, a slot refresh) is not this node's fault:
    // fail the call without marking the node down.
    if (MsLeft(dl) <= 0) {
      return Unavailable("redis " + node->name + ": call deadline (" +
                         std::to_string(opt_.timeout_ms) + " ms) passed before sending");
    }
    uint64_t gen = 0;
    KVC_ASSIGN_OR_RETURN(redisContext * c, Acquire(node, dl, &gen));
    out->clear();
    for (size_t i = 0; i < argvs.size(); ++i) {
      // hiredis 0.14 takes a non-const argv it does not modify.
      if (redisAppendCommandArgv(c, static_cast<int>(argvs[i].size()),
                                 const_cast<const char**>(argvs[i].data()),
                                 lens[i].data()) != REDIS_OK) {
        return Fail(node, c, "append: " + std::string(c->errstr));
      }
    }
    for (size_t i = 0; i < argvs.size(); ++i) {
      const int64_t left = MsLeft(dl);
      if (left <= 0) return Fail(node, c, "timed out after " + std::to_string(opt_.timeout_ms) + " ms");
      redisSetTimeout(c, ToTimeval(left));
      void* reply = nullptr;
      if (redisGetReply(c, &reply) != REDIS_OK || reply == nullptr) {
        const bool timeout = c->err == REDIS_ERR_IO && MsLeft(dl) <= 0;
        return Fail(node, c, timeout ? "timed out after " + std::to_string(opt_.timeout_ms) + " ms"
                                     : std::string(c->errstr[0] ? c->errstr : "connection lost"));
      }
      out->emplace_back(static_cast<redisReply*>(reply));
    }
    Release(node, c, gen);
    return Status::Ok();
  }

  StatusOr<redisContext*> Acquire(Node* n, Deadline dl, uint64_t* gen) {
    std::unique_lock<std::mutex> l(n->mu);
    while (true) {
      if (n->down && Clock::now() < n->retry_at) {
        return Unavailable("redis " + n->name + " is down (retrying after " +
                           std::to_string(opt_.retry_ms) + " ms)");
      }
      if (!n->idle.empty()) {
        redisContext* c = n->idle.back();
        n->idle.pop_back();
        ++n->in_use;
        *gen = n->generation;
        return c;
      }
      if (n->in_use < opt_.pool_size) break;
      if (n->cv.wait_until(l, dl) == std::cv_status::timeout) {
        return Unavailable("redis " + n->name + ": all " + std::to_string(opt_.pool_size) +
                           " connections busy for " + std::to_string(opt_.timeout_ms) + " ms");
      }
    }
    ++n->in_use;
    *gen = n->generation;
    const bool was_down = n->down;
    l.unlock();
    std::string err;
    redisContext* c = Connect(n->ep, dl, &err);
    if (c == nullptr) {
      MarkDown(n, nullptr, "connect: " + err);
      return Unavailable("redis " + n->name + ": connect: " + err);
    }
    if (was_down) {
      l.lock();
      if (n->down) {
        n->down = false;
        reconnects_.fetch_add(1, std::memory_order_relaxed);
        spdlog::info("kv store: redis {} is up again", n->name);
      }
    }
    return c;
  }

  redisContext* Connect(const Endpoint& ep, Deadline dl, std::string* err) {
    const int64_t left = MsLeft(dl);
    if (left <= 0) {
      *err = "timed out";
      return nullptr;
    }
    redisContext* c = redisConnectWithTimeout(ep.host.c_str(), ep.port, ToTimeval(left));
    if (c == nullptr) {
      *err = "out of memory";
      return nullptr;
    }
    if (c->err) {
      *err = c->errstr;
      redisFree(c);
      return nullptr;
    }
    // Keep the reply buffer between replies: hiredis frees it after each reply when more than
    // 16 KiB is unused, and regrowing it for every multi-MiB value cost ~2/3 of GET throughput at
    // 4 MiB (bench/store/run.sh). Memory: one buffer of the largest value per pooled connection.
    c->reader->maxbuf = 0;
    auto run = [&](std::vector<const char*> argv, std::vector<size_t> lens) -> bool {
      const int64_t l = MsLeft(dl);
      if (l <= 0) {
        *err = "timed out";
        return false;
      }
      redisSetTimeout(c, ToTimeval(l));
      ReplyPtr r(static_cast<redisReply*>(
          redisCommandArgv(c, static_cast<int>(argv.size()), argv.data(), lens.data())));
      if (!r) {
        *err = c->errstr[0] ? c->errstr : "connection lost";
        return false;
      }
      if (r->type == REDIS_REPLY_ERROR) {
        *err = std::string(argv[0]) + ": " + std::string(r->str, r->len);
        return false;
      }
      return true;
    };
    bool ok = true;
    if (url_.auth) {
      ok = url_.user.empty()
               ? run({"AUTH", url_.password.c_str()}, {4, url_.password.size()})
               : run({"AUTH", url_.user.c_str(), url_.password.c_str()},
                     {4, url_.user.size(), url_.password.size()});
    }
    if (ok && url_.db != 0) {
      const std::string db = std::to_string(url_.db);
      ok = run({"SELECT", db.c_str()}, {6, db.size()});
    }
    if (!ok) {
      redisFree(c);
      return nullptr;
    }
    return c;
  }

  void Release(Node* n, redisContext* c, uint64_t gen) {
    std::lock_guard<std::mutex> l(n->mu);
    --n->in_use;
    if (gen == n->generation && c->err == 0) {
      n->idle.push_back(c);
    } else {
      redisFree(c);
    }
    n->cv.notify_one();
  }

  Status Fail(Node* n, redisContext* c, const std::string& why) {
    MarkDown(n, c, why);
    return Unavailable("redis " + n->name + ": " + why);
  }

  // Drops `c` (if any) and every idle connection, and fails calls fast for retry_ms.
  void MarkDown(Node* n, redisContext* c, const std::string& why) {
    std::vector<redisContext*> drop;
    {
      std::lock_guard<std::mutex> l(n->mu);
      --n->in_use;
      ++n->generation;
      drop.swap(n->idle);
      n->retry_at = Clock::now() + std::chrono::milliseconds(opt_.retry_ms);
      if (!n->down) {
        n->down = true;
        spdlog::warn("kv store: redis {} is down or slow ({}); serving without it, retrying every "
                     "{} ms",
                     n->name, why, opt_.retry_ms);
      }
      n->cv.notify_all();
    }
    if (c != nullptr) redisFree(c);
    for (redisContext* d : drop) redisFree(d);
    if (url_.cluster) {
      std::unique_lock<std::shared_mutex> l(map_mu_);
      slots_stale_ = true;  // a failover may have moved its slots
    }
  }

  const RedisOptions opt_;
  const ParsedUrl url_;

  mutable std::shared_mutex map_mu_;  // guards nodes_ (append-only), slots_, slots_stale_
  std::vector<std::unique_ptr<Node>> nodes_;
  std::vector<int> slots_;  // slot -> index in nodes_, -1 = unknown
  bool slots_stale_ = false;
  std::mutex refresh_mu_;
  Clock::time_point last_refresh_{};

  std::atomic<int64_t> gets_{0}, hits_{0}, misses_{0}, sets_{0}, errors_{0}, reconnects_{0},
      bytes_read_{0}, bytes_written_{0};
  mutable std::mutex err_mu_;
  std::string last_error_;
};

StatusOr<std::unique_ptr<RedisTier>> RedisTier::Create(const RedisOptions& options) {
  if (options.ttl_s < 0) return InvalidArgument("redis: ttl_s must be >= 0 (0 = no expiry)");
  if (options.timeout_ms <= 0) return InvalidArgument("redis: timeout_ms must be > 0");
  if (options.retry_ms < 0) return InvalidArgument("redis: retry_ms must be >= 0");
  if (options.pool_size < 1 || options.pool_size > 1024) {
    return InvalidArgument("redis: pool_size must be in [1, 1024]");
  }
  auto u = ParseUrl(options.url);
  if (!u.ok()) return u.status();
  return std::unique_ptr<RedisTier>(
      new RedisTier(std::make_unique<Impl>(options, std::move(u).value())));
}

RedisTier::RedisTier(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
RedisTier::~RedisTier() = default;

StatusOr<std::string> RedisTier::Get(const std::string& key) { return impl_->Get(key); }
std::vector<StatusOr<std::string>> RedisTier::MGet(const std::vector<std::string>& keys) {
  return impl_->MGet(keys);
}
Status RedisTier::Set(const std::string& key, std::string_view value) {
  return impl_->Set(key, value);
}
Status RedisTier::Del(const std::string& key) { return impl_->Del(key); }
RedisTier::Stats RedisTier::GetStats() const { return impl_->GetStats(); }
bool RedisTier::up() const { return impl_->Up(); }
bool RedisTier::cluster() const { return impl_->cluster(); }
int RedisTier::num_nodes() const { return impl_->num_nodes(); }

int RedisTier::KeySlot(std::string_view key) {
  // Hash tag: the part between the first '{' and the first '}' after it, if non-empty.
  if (const size_t open = key.find('{'); open != std::string_view::npos) {
    const size_t close = key.find('}', open + 1);
    if (close != std::string_view::npos && close > open + 1) {
      key = key.substr(open + 1, close - open - 1);
    }
  }
  uint16_t crc = 0;  // CRC16-CCITT (XMODEM): poly 0x1021, init 0, no reflection
  for (unsigned char ch : key) {
    crc ^= static_cast<uint16_t>(ch) << 8;
    for (int b = 0; b < 8; ++b) {
      crc = (crc & 0x8000) ? static_cast<uint16_t>((crc << 1) ^ 0x1021)
                           : static_cast<uint16_t>(crc << 1);
    }
  }
  return crc % kNumSlots;
}

}  // namespace kvc::store
