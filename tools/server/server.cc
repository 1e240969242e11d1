#include "server.h"

#include <arpa/inet.h>
#include <dirent.h>
#include <fcntl.h>
#include <netdb.h>
#include <poll.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <deque>
#include <mutex>
#include <random>
#include <set>
#include <thread>

#include <fmt/format.h>
#include <httplib.h>
#include <spdlog/spdlog.h>

namespace kvc::server {

namespace {

using Clock = std::chrono::steady_clock;

// Events of one request, from the engine thread (Push never blocks for long: a lock and a
// notify) to the handler thread that writes the response.
class EventQueue {
 public:
  void Push(const engine::Event& e) {
    engine::Event copy;
    copy.id = e.id;
    copy.token = e.token;
    copy.text = e.text;
    copy.finished = e.finished;
    copy.reason = e.reason;
    copy.error = e.error;
    copy.usage = e.usage;
    copy.state = e.state;  // (logits are not copied: the server never returns them)
    {
      std::lock_guard<std::mutex> lk(mu_);
      q_.push_back(std::move(copy));
    }
    cv_.notify_one();
  }
  // Moves every queued event into *out; waits up to `timeout` for the first. False if none.
  bool PopAll(std::vector<engine::Event>* out, double timeout_s) {
    std::unique_lock<std::mutex> lk(mu_);
    cv_.wait_for(lk, std::chrono::duration<double>(timeout_s), [&] { return !q_.empty(); });
    if (q_.empty()) return false;
    while (!q_.empty()) {
      out->push_back(std::move(q_.front()));
      q_.pop_front();
    }
    return true;
  }

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<engine::Event> q_;
};

// The socket of the connection a handler serves. cpp-httplib 0.11.4 gives handlers no access to
// it, so it is found by its address pair (unique among open TCP sockets) among this process's
// descriptors. -1 if not found (then disconnects are seen only when writing).
int FindConnectionSocket(const httplib::Request& req) {
  DIR* d = opendir("/proc/self/fd");
  if (!d) return -1;
  int found = -1;
  while (dirent* e = readdir(d)) {
    char* end = nullptr;
    const long fd = std::strtol(e->d_name, &end, 10);
    if (*end || end == e->d_name) continue;
    struct stat st;
    if (fstat(int(fd), &st) != 0 || !S_ISSOCK(st.st_mode)) continue;
    sockaddr_storage peer{}, local{};
    socklen_t pl = sizeof(peer), ll = sizeof(local);
    if (getpeername(int(fd), reinterpret_cast<sockaddr*>(&peer), &pl) != 0) continue;
    if (getsockname(int(fd), reinterpret_cast<sockaddr*>(&local), &ll) != 0) continue;
    char ph[NI_MAXHOST], pp[NI_MAXSERV], lh[NI_MAXHOST], lp[NI_MAXSERV];
    if (getnameinfo(reinterpret_cast<sockaddr*>(&peer), pl, ph, sizeof(ph), pp, sizeof(pp),
                    NI_NUMERICHOST | NI_NUMERICSERV) != 0 ||
        getnameinfo(reinterpret_cast<sockaddr*>(&local), ll, lh, sizeof(lh), lp, sizeof(lp),
                    NI_NUMERICHOST | NI_NUMERICSERV) != 0) {
      continue;
    }
    if (req.remote_addr == ph && std::to_string(req.remote_port) == pp &&
        req.local_addr == lh && std::to_string(req.local_port) == lp) {
      found = int(fd);
      break;
    }
  }
  closedir(d);
  return found;
}

// True when the peer closed the connection (EOF or error pending on the socket).
bool PeerGone(int fd) {
  if (fd < 0) return false;
  pollfd p{fd, POLLIN | POLLRDHUP, 0};
  if (poll(&p, 1, 0) <= 0) return false;
  if (p.revents & (POLLRDHUP | POLLHUP | POLLERR | POLLNVAL)) return true;
  if (p.revents & POLLIN) {
    char c;
    return recv(fd, &c, 1, MSG_PEEK | MSG_DONTWAIT) == 0;
  }
  return false;
}

std::string RandomId(const char* prefix) {
  thread_local std::mt19937_64 rng(std::random_device{}());
  return fmt::format("{}{:016x}{:08x}", prefix, rng(), uint32_t(rng()));
}

int64_t UnixNow() {
  return std::chrono::duration_cast<std::chrono::seconds>(
             std::chrono::system_clock::now().time_since_epoch())
      .count();
}

// cpp-httplib's task queue, grown on demand: `core` threads at start, one more whenever a
// connection arrives and no thread is idle, up to `max`; beyond that connections wait for a
// thread (httplib 0.11.4's own ThreadPool is fixed-size with an unbounded queue, so a few dozen
// idle kept-alive connections, each holding a thread for the 5 s keep-alive timeout, delayed
// every other client, /health included). Threads are not retired; all are joined at shutdown.
class ElasticPool : public httplib::TaskQueue {
 public:
  ElasticPool(size_t core, size_t max) : max_(std::max(core, max)) {
    std::lock_guard<std::mutex> lk(mu_);
    for (size_t i = 0; i < core; ++i) threads_.emplace_back([this] { Work(); });
  }
  void enqueue(std::function<void()> fn) override {
    {
      std::lock_guard<std::mutex> lk(mu_);
      jobs_.push_back(std::move(fn));
      if (idle_ < jobs_.size() && threads_.size() < max_) {
        threads_.emplace_back([this] { Work(); });
      }
    }
    cv_.notify_one();
  }
  void shutdown() override {
    {
      std::lock_guard<std::mutex> lk(mu_);
      shutdown_ = true;
    }
    cv_.notify_all();
    for (auto& t : threads_) t.join();  // no enqueue after shutdown: the accept loop has ended
  }

 private:
  void Work() {
    for (;;) {
      std::function<void()> fn;
      {
        std::unique_lock<std::mutex> lk(mu_);
        ++idle_;
        cv_.wait(lk, [&] { return shutdown_ || !jobs_.empty(); });
        --idle_;
        if (jobs_.empty()) return;  // shutting down, nothing left
        fn = std::move(jobs_.front());
        jobs_.pop_front();
      }
      fn();
    }
  }
  const size_t max_;
  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<std::function<void()>> jobs_;
  std::vector<std::thread> threads_;
  size_t idle_ = 0;
  bool shutdown_ = false;
};

const char* StatusText(int status) {
  switch (status) {
    case 400: return "bad request (malformed HTTP)";
    case 404: return "not found";
    case 405: return "method not allowed";
    case 413: return "payload too large";
    case 414: return "URI too long";
    case 416: return "range not satisfiable";
    case 500: return "internal server error";
    default: return "error";
  }
}

class Server {
 public:
  Server(engine::Engine& eng, const Tokenizer& tok, const KvPolicy& kv, const ServerOptions& opt,
         KvStore* store)
      : eng_(eng), tok_(tok), kv_(kv), opt_(opt), store_(store), started_(UnixNow()) {}

  bool Bind();    // routes, limits, the listening socket; false if the port cannot be bound
  bool Listen();  // serves until Shutdown stops the listener
  int port() const { return port_; }
  // Drain (see Serve), then stop the listener. Force: skip the grace period.
  void Shutdown(bool force);
  void Force();

 private:
  // One inference slot of max_connections; released when the response is done (for streams:
  // when the content provider is destroyed, after the last frame or the disconnect).
  struct Slot {
    Server* s;
    explicit Slot(Server* srv) : s(srv) {}
    ~Slot() {
      std::lock_guard<std::mutex> lk(s->mu_);
      s->http_.active -= 1;
      s->idle_cv_.notify_all();
    }
  };

  // Auth and limits for every route (the one place). False with `res` filled when the request
  // is refused; for inference routes *slot then holds one of max_connections.
  bool Gate(const httplib::Request& req, httplib::Response& res, bool guarded, bool inference,
            std::shared_ptr<Slot>* slot);
  void Error(httplib::Response& res, const ApiError& e);
  // limit: bytes (0: max_body_bytes).
  bool ReadBody(const httplib::Request& req, httplib::Response& res,
                const httplib::ContentReader& reader, std::string* body, int64_t limit = 0);
  // Reads and drops the body of a refused request (up to max_body_bytes), so that it is not
  // parsed as the next request on a kept-alive connection.
  void Drain(const httplib::Request& req, const httplib::ContentReader& reader);
  // The common start of every JSON POST route: Gate (auth, limits, an inference slot held in
  // *slot), read the body, parse it as a JSON object into *j. false: the response is already set.
  bool BeginJsonPost(const httplib::Request& req, httplib::Response& res,
                     const httplib::ContentReader& reader, std::shared_ptr<Slot>* slot, json* j) {
    if (!Gate(req, res, true, true, slot)) {
      Drain(req, reader);
      return false;
    }
    std::string body;
    if (!ReadBody(req, res, reader, &body)) return false;
    ApiError err;
    if (!ParseJsonObject(body, j, &err)) {
      Error(res, err);
      return false;
    }
    return true;
  }

  void Completion(const httplib::Request& req, httplib::Response& res,
                  const httplib::ContentReader& reader, bool chat);
  void Tokenize(const httplib::Request& req, httplib::Response& res,
                const httplib::ContentReader& reader);
  void Detokenize(const httplib::Request& req, httplib::Response& res,
                  const httplib::ContentReader& reader);
  void Models(httplib::Response& res);
  void Track(engine::RequestId id, bool add);
  // The tenant salt of a request: its API key's digest (when keys are configured) + cache_salt.
  std::string Salt(const httplib::Request& req, const std::string& cache_salt) const;
  void Sessions(const httplib::Request& req, httplib::Response& res, const std::string& method,
                const std::string& name, bool raw, const std::string& body);

  engine::Engine& eng_;
  const Tokenizer& tok_;
  const KvPolicy& kv_;
  const ServerOptions& opt_;
  KvStore* store_;  // may be null
  const int64_t started_;
  httplib::Server svr_;

  std::mutex mu_;                     // guards http_, live_
  std::condition_variable idle_cv_;   // active reached 0
  HttpCounters http_;
  std::set<engine::RequestId> live_;  // submitted, not finished: cancelled on forced shutdown
  std::atomic<bool> draining_{false};
  bool force_ = false;                // guarded by mu_
  int port_ = 0;
};

void Server::Error(httplib::Response& res, const ApiError& e) {
  res.status = e.status;
  res.set_content(Dump(ErrorBody(e)), "application/json");
  if (e.status == 401) res.set_header("WWW-Authenticate", "Bearer");
}

bool Server::Gate(const httplib::Request& req, httplib::Response& res, bool guarded,
                  bool inference, std::shared_ptr<Slot>* slot) {
  if (guarded && !opt_.api_keys.empty() &&
      !KeyMatches(BearerToken(req.get_header_value("Authorization")), opt_.api_keys)) {
    ApiError e;
    e.status = 401;
    e.type = "authentication_error";
    e.code = "invalid_api_key";
    e.message = "missing or invalid API key (send 'Authorization: Bearer <key>')";
    Error(res, e);
    return false;
  }
  if (!inference) return true;
  if (draining_) {
    ApiError e;
    e.status = 503;
    e.type = "unavailable_error";
    e.message = "the server is shutting down";
    Error(res, e);
    return false;
  }
  {
    std::lock_guard<std::mutex> lk(mu_);
    if (http_.active >= opt_.max_connections) {
      http_.refused_connections += 1;
      ApiError e;
      e.status = 503;
      e.type = "unavailable_error";
      e.code = "too_many_connections";
      e.message = fmt::format("the server is serving its limit of {} requests "
                              "(--max-connections); retry later", opt_.max_connections);
      Error(res, e);
      res.set_header("Retry-After", "1");
      return false;
    }
    http_.active += 1;
    http_.active_peak = std::max(http_.active_peak, http_.active);
  }
  *slot = std::make_shared<Slot>(this);
  return true;
}

bool Server::ReadBody(const httplib::Request& req, httplib::Response& res,
                      const httplib::ContentReader& reader, std::string* body, int64_t limit) {
  if (limit <= 0) limit = opt_.max_body_bytes;
  ApiError too_big;
  too_big.status = 413;
  too_big.code = "body_too_large";
  too_big.message = fmt::format("the request body exceeds {} bytes ({})", limit,
                                limit == opt_.max_body_bytes ? "--max-body-bytes" : "--max-session-bytes");
  if (req.has_header("Content-Length")) {
    const std::string v = req.get_header_value("Content-Length");
    char* end = nullptr;
    const unsigned long long n = std::strtoull(v.c_str(), &end, 10);
    if (*end || n > uint64_t(limit)) {
      Error(res, too_big);
      res.set_header("Connection", "close");
      return false;
    }
  }
  bool over = false;
  const bool ok = reader([&](const char* data, size_t n) {
    if (body->size() + n > size_t(limit)) {
      over = true;
      return false;
    }
    body->append(data, n);
    return true;
  });
  if (over) {
    Error(res, too_big);
    res.set_header("Connection", "close");
    return false;
  }
  if (!ok) {
    Error(res, BadRequest("could not read the request body"));
    res.set_header("Connection", "close");
    return false;
  }
  return true;
}

void Server::Drain(const httplib::Request& req, const httplib::ContentReader& reader) {
  if (req.has_header("Content-Length") &&
      req.get_header_value<uint64_t>("Content-Length") > uint64_t(opt_.max_body_bytes)) {
    return;  // too large to read: the connection ends after the response
  }
  size_t n = 0;
  reader([&](const char*, size_t len) {
    n += len;
    return n <= size_t(opt_.max_body_bytes);
  });
}

void Server::Track(engine::RequestId id, bool add) {
  std::lock_guard<std::mutex> lk(mu_);
  if (add) live_.insert(id);
  else live_.erase(id);
}

void Server::Models(httplib::Response& res) {
  const auto& o = eng_.options();
  json model = {{"id", opt_.model_id},
                {"object", "model"},
                {"created", started_},
                {"owned_by", "kvcrunch"},
                {"meta",
                 {{"n_ctx", o.n_ctx},
                  {"n_vocab", opt_.limits.n_vocab},
                  {"kv_budget_bytes", o.kv_budget_bytes},
                  {"kv_default", kv_.defaults().Label()},
                  {"kv_allowed", kv_.AllowedList()}}}};
  res.set_content(Dump(json{{"object", "list"}, {"data", json::array({model})}}),
                  "application/json");
}

void Server::Tokenize(const httplib::Request& req, httplib::Response& res,
                      const httplib::ContentReader& reader) {
  std::shared_ptr<Slot> slot;
  json j;
  if (!BeginJsonPost(req, res, reader, &slot, &j)) return;
  auto c = j.find("content");
  if (c == j.end() || !c->is_string()) {
    return Error(res, BadRequest("'content' must be a string", "content"));
  }
  bool add_special = false, with_pieces = false;
  for (auto [key, dst] : {std::pair{"add_special", &add_special},
                          std::pair{"with_pieces", &with_pieces}}) {
    auto it = j.find(key);
    if (it == j.end() || it->is_null()) continue;
    if (!it->is_boolean()) return Error(res, BadRequest(fmt::format("'{}' must be a boolean", key), key));
    *dst = it->get<bool>();
  }
  auto ids = tok_.Encode(c->get<std::string>(), add_special, /*parse_special=*/true);
  if (!ids.ok()) return Error(res, ErrorFromStatus(ids.status(), "content"));
  json out = json::array();
  for (int32_t id : *ids) {
    if (with_pieces) out.push_back({{"id", id}, {"piece", tok_.TokenToPiece(id)}});
    else out.push_back(id);
  }
  res.set_content(Dump(json{{"tokens", out}}), "application/json");
}

void Server::Detokenize(const httplib::Request& req, httplib::Response& res,
                        const httplib::ContentReader& reader) {
  std::shared_ptr<Slot> slot;
  json j;
  if (!BeginJsonPost(req, res, reader, &slot, &j)) return;
  auto t = j.find("tokens");
  if (t == j.end() || !t->is_array()) {
    return Error(res, BadRequest("'tokens' must be an array of token ids", "tokens"));
  }
  std::vector<int32_t> ids;
  for (const auto& x : *t) {
    if (!x.is_number_integer() || x.get<int64_t>() < 0 ||
        x.get<int64_t>() >= opt_.limits.n_vocab) {
      return Error(res, BadRequest(fmt::format("'tokens' must be integers in [0, {})",
                                               opt_.limits.n_vocab), "tokens"));
    }
    ids.push_back(int32_t(x.get<int64_t>()));
  }
  res.set_content(Dump(json{{"content", tok_.Decode(ids)}}), "application/json");
}

// What a streaming or non-streaming response needs after the handler returned.
struct Job {
  engine::RequestId id = 0;
  std::shared_ptr<EventQueue> q;
  ResponseMeta meta;
  KvRunConfig kv;
  bool include_usage = false;
  bool finished = false;   // the final event arrived
  bool sent_role = false;
  Clock::time_point last_write = Clock::now();
};

void Server::Completion(const httplib::Request& req, httplib::Response& res,
                        const httplib::ContentReader& reader, bool chat) {
  std::shared_ptr<Slot> slot;
  json j;
  if (!BeginJsonPost(req, res, reader, &slot, &j)) return;
  ApiError err;
  CompletionRequest r;
  if (!ParseCompletion(j, chat, opt_.limits, kv_, &r, &err)) return Error(res, err);

  // Tokenize (on this thread: the tokenizer is immutable).
  std::vector<int32_t> ids;
  if (chat) {
    auto text = tok_.ApplyChatTemplate(r.messages, /*add_generation_prompt=*/true);
    if (!text.ok()) return Error(res, ErrorFromStatus(text.status(), "messages"));
    auto t = tok_.Encode(*text, /*add_bos=*/false, /*parse_special=*/true);
    if (!t.ok()) return Error(res, ErrorFromStatus(t.status(), "messages"));
    ids = std::move(*t);
  } else if (r.prompt_is_ids) {
    ids = std::move(r.prompt_ids);
  } else {
    auto t = tok_.Encode(r.prompt, /*add_bos=*/true, /*parse_special=*/true);
    if (!t.ok()) return Error(res, ErrorFromStatus(t.status(), "prompt"));
    ids = std::move(*t);
  }
  if (ids.empty()) {
    return Error(res, BadRequest("the prompt tokenizes to nothing", chat ? "messages" : "prompt"));
  }
  if (!FinishMaxTokens(&r, int64_t(ids.size()), opt_.limits, &err)) return Error(res, err);
  if (!r.seed_given) r.gen.sampling.seed = std::random_device{}() | (uint64_t(std::random_device{}()) << 32);

  auto job = std::make_shared<Job>();
  job->q = std::make_shared<EventQueue>();
  job->meta = {RandomId(chat ? "chatcmpl-" : "cmpl-"), UnixNow(), opt_.model_id, chat};
  job->kv = r.kv;
  job->include_usage = r.include_usage;

  engine::Request er;
  er.prompt = std::move(ids);
  er.gen = r.gen;
  er.kv.cache = r.kv.cache;
  er.kv.evict = r.kv.evict;
  // Stored KV (kvcrunch extensions: "cache_salt" like vLLM's, "session": NAME).
  std::string cache_salt, session;
  for (const char* k : {"cache_salt", "session"}) {
    auto it = j.find(k);
    if (it == j.end() || it->is_null()) continue;
    if (!it->is_string() || it->get<std::string>().empty()) {
      return Error(res, BadRequest(fmt::format("'{}' must be a non-empty string", k), k));
    }
    (std::string(k) == "session" ? session : cache_salt) = it->get<std::string>();
  }
  if (!session.empty() && !store_) {
    return Error(res, BadRequest("sessions are off on this server (start it with --session-dir DIR)",
                                 "session"));
  }
  const std::string salt = store_ ? Salt(req, cache_salt) : "";
  if (store_) {
    store_->PreparePrefix(&er, salt);
    if (!session.empty()) {
      if (Status st = store_->PrepareSession(&er, salt, session); !st.ok()) {
        return Error(res, ErrorFromStatus(st, "session"));
      }
    }
  }
  auto save_session = [store = store_, salt, session](const engine::Event& e) {
    if (!store || session.empty() || !e.state) return;
    if (Status st = store->SaveSession(salt, session, *e.state); !st.ok()) {
      spdlog::error("session {}: not saved: {}", session, st.message());
    }
  };
  // The session file is written on the handler thread (not the engine's), before the response
  // ends, so a client's next turn finds it.
  er.sink = [q = job->q](const engine::Event& e) { q->Push(e); };
  auto id = eng_.Submit(std::move(er));
  if (!id.ok()) {
    return Error(res, ErrorFromStatus(id.status(), id.status().code() == StatusCode::kInvalidArgument &&
                                                           j.contains("kv") ? "kv" : ""));
  }
  job->id = *id;
  Track(job->id, true);

  auto fail_after_submit = [](engine::FinishReason reason, const Status& st) {
    ApiError e;
    if (reason == engine::FinishReason::kCancelled) {
      e.status = 503;
      e.type = "unavailable_error";
      e.message = "the request was cancelled (the server is shutting down)";
    } else {
      e.status = 500;
      e.type = "server_error";
      e.message = st.message().empty() ? "the request failed" : st.message();
    }
    return e;
  };

  if (!r.stream) {
    const int fd = FindConnectionSocket(req);
    std::string text;
    std::vector<engine::Event> evs;
    while (!job->finished) {
      evs.clear();
      job->q->PopAll(&evs, kPollSeconds);
      for (const auto& e : evs) {
        text += e.text;
        if (!e.finished) continue;
        job->finished = true;
        Track(job->id, false);
        save_session(e);
        if (e.reason == engine::FinishReason::kStop || e.reason == engine::FinishReason::kLength) {
          res.set_content(Dump(CompletionJson(job->meta, text, e.reason, e.usage, job->kv)),
                          "application/json");
        } else {
          Error(res, fail_after_submit(e.reason, e.error));
        }
      }
      if (!job->finished && PeerGone(fd)) {
        eng_.Cancel(job->id);
        {
          std::lock_guard<std::mutex> lk(mu_);
          http_.disconnects += 1;
        }
        // Wait for the final (cancelled) event so the request is not left half-tracked.
        for (int i = 0; i < 600 && !job->finished; ++i) {
          evs.clear();
          job->q->PopAll(&evs, kPollSeconds);
          for (const auto& e : evs) job->finished = job->finished || e.finished;
        }
        Track(job->id, false);
        res.status = 499;  // nginx's "client closed request"; nobody reads it
        return;
      }
    }
    return;
  }

  // Streaming: SSE frames written by the content provider on this thread after we return.
  res.set_header("Cache-Control", "no-cache");
  res.set_header("X-Accel-Buffering", "no");
  // Cancels the request if the response ends before the final event (client gone, write
  // failed, server stopped); frees the inference slot.
  struct StreamGuard {
    Server* s;
    std::shared_ptr<Job> job;
    std::shared_ptr<Slot> slot;
    StreamGuard(Server* srv, std::shared_ptr<Job> j, std::shared_ptr<Slot> sl)
        : s(srv), job(std::move(j)), slot(std::move(sl)) {}
    StreamGuard(const StreamGuard&) = delete;  // one owner: its destructor cancels
    ~StreamGuard() {
      if (!job->finished) {
        s->eng_.Cancel(job->id);
        {
          std::lock_guard<std::mutex> lk(s->mu_);
          s->http_.disconnects += 1;
        }
        s->Track(job->id, false);
      }
    }
  };
  auto guard = std::make_shared<StreamGuard>(this, job, slot);
  res.set_chunked_content_provider(
      "text/event-stream",
      [this, job, guard, fail_after_submit, save_session](size_t, httplib::DataSink& sink) {
        std::string out;
        if (job->meta.chat && !job->sent_role) {
          job->sent_role = true;
          out += SseFrame(ChunkJson(job->meta, "", engine::FinishReason::kNone, true,
                                    job->include_usage));
        }
        std::vector<engine::Event> evs;
        job->q->PopAll(&evs, kPollSeconds);
        bool done = false;
        for (const auto& e : evs) {
          if (!e.text.empty()) {
            out += SseFrame(ChunkJson(job->meta, e.text, engine::FinishReason::kNone, false,
                                      job->include_usage));
          }
          if (!e.finished) continue;
          job->finished = true;
          Track(job->id, false);
          save_session(e);
          done = true;
          if (e.reason == engine::FinishReason::kStop ||
              e.reason == engine::FinishReason::kLength) {
            out += SseFrame(ChunkJson(job->meta, "", e.reason, false, job->include_usage));
            if (job->include_usage) out += SseFrame(UsageChunkJson(job->meta, e.usage, job->kv));
          } else {
            // An error after the stream began: an error frame inside the 200 response.
            out += SseFrame(ErrorBody(fail_after_submit(e.reason, e.error)));
          }
          out += SseDone();
        }
        if (out.empty()) {
          // Nothing to send (queued, or a long prefill): a comment now and then for proxies and
          // client read timeouts; otherwise just check that the client is still there.
          const double idle = std::chrono::duration<double>(Clock::now() - job->last_write).count();
          if (opt_.sse_ping_seconds <= 0 || idle < opt_.sse_ping_seconds) return sink.is_writable();
          out = ": ping\n\n";
        }
        if (!sink.write(out.data(), out.size())) return false;
        job->last_write = Clock::now();
        if (done) sink.done();
        return true;
      },
      [guard](bool) {});
}

std::string Server::Salt(const httplib::Request& req, const std::string& cache_salt) const {
  const Digest* key = nullptr;
  if (!opt_.api_keys.empty()) {
    const std::string presented(BearerToken(req.get_header_value("Authorization")));
    for (const Digest& k : opt_.api_keys) {
      if (KeyMatches(presented, {k})) {
        key = &k;
        break;
      }
    }
  }
  return KvStore::TenantSalt(key, cache_salt);
}

// /v1/sessions (GET: list), /v1/sessions/NAME (GET: info, DELETE), /v1/sessions/NAME/kv (GET: the
// record bytes, PUT: upload record bytes). Sessions belong to the API key's tenant.
void Server::Sessions(const httplib::Request& req, httplib::Response& res, const std::string& method,
                      const std::string& name, bool raw, const std::string& body) {
  if (!store_ || !store_->sessions_enabled()) {
    ApiError e = BadRequest("sessions are off on this server (start it with --session-dir DIR)", "");
    e.status = 404;
    return Error(res, e);
  }
  const std::string salt = Salt(req, req.get_param_value("cache_salt"));
  auto info_json = [](const KvStore::SessionInfo& i) {
    return json{{"name", i.name}, {"bytes", i.bytes}, {"tokens", i.tokens}, {"pending", i.pending},
                {"modified", i.modified}, {"kv", i.kv}, {"object", "kvcrunch.session"}};
  };
  if (name.empty()) {
    auto l = store_->ListSessions(salt);
    if (!l.ok()) return Error(res, ErrorFromStatus(l.status(), ""));
    json data = json::array();
    for (const auto& i : *l) data.push_back(info_json(i));
    return res.set_content(Dump(json{{"object", "list"}, {"data", data}}), "application/json");
  }
  Status st;
  if (method == "GET" && raw) {
    auto b = store_->ReadSessionBytes(salt, name);
    if (!b.ok()) st = b.status();
    else return res.set_content(*b, "application/octet-stream");
  } else if (method == "GET") {
    auto i = store_->GetSession(salt, name);
    if (!i.ok()) st = i.status();
    else return res.set_content(Dump(info_json(*i)), "application/json");
  } else if (method == "PUT" && raw) {
    st = store_->PutSessionBytes(salt, name, body);
    if (st.ok()) {
      auto i = store_->GetSession(salt, name);
      if (i.ok()) return res.set_content(Dump(info_json(*i)), "application/json");
      st = i.status();
    }
  } else if (method == "DELETE" && !raw) {
    st = store_->DeleteSession(salt, name);
    if (st.ok()) {
      return res.set_content(Dump(json{{"name", name}, {"deleted", true}}), "application/json");
    }
  } else {
    ApiError e = BadRequest(fmt::format("{} is not supported on this path", method), "");
    e.status = 405;
    return Error(res, e);
  }
  ApiError e = ErrorFromStatus(st, "session");
  if (st.code() == StatusCode::kNotFound) e.status = 404;
  Error(res, e);
}

void Server::Shutdown(bool force) {
  draining_ = true;      // new inference requests: 503; /health: 503
  eng_.Shutdown(false);  // the engine admits nothing new; queued and running requests go on
  std::unique_lock<std::mutex> lk(mu_);
  const auto grace = std::chrono::duration<double>(force ? 0.0 : opt_.shutdown_grace_seconds);
  if (!idle_cv_.wait_for(lk, grace, [&] { return http_.active == 0 || force_; })) {
    spdlog::warn("shutdown: {} requests still running after {:.0f} s: cancelling them",
                 http_.active, opt_.shutdown_grace_seconds);
  }
  if (http_.active > 0) {
    for (auto id : live_) eng_.Cancel(id);
    idle_cv_.wait_for(lk, std::chrono::seconds(10), [&] { return http_.active == 0; });
  }
  lk.unlock();
  svr_.stop();
}

void Server::Force() {
  std::lock_guard<std::mutex> lk(mu_);
  force_ = true;
  idle_cv_.notify_all();
}

bool Server::Bind() {
  // Threads: max_connections inference requests plus spare threads for refusals, probes and
  // metrics, grown on demand up to kMaxHttpThreads for connections that hold a thread without a
  // request (keep-alive, slow clients). Debian's cpp-httplib is a compiled library, so
  // CPPHTTPLIB_THREAD_POOL_COUNT (fixed when it was built: max(8, cores - 1)) is not ours to
  // set: the task queue is replaced here.
  const size_t core = size_t(opt_.max_connections) + kSpareThreads;
  svr_.new_task_queue = [core] { return new ElasticPool(core, kMaxHttpThreads); };
  // cpp-httplib's default socket options add SO_REUSEPORT: a second server on the same port
  // would start and silently share its connections. SO_REUSEADDR only, so a busy port is an error.
  svr_.set_socket_options([](int sock) {
    int yes = 1;
    setsockopt(sock, SOL_SOCKET, SO_REUSEADDR, &yes, sizeof(yes));
  });
  svr_.set_payload_max_length(size_t(std::max(opt_.max_body_bytes, opt_.max_session_bytes)));
  svr_.set_keep_alive_timeout(5);
  svr_.set_read_timeout(30);
  svr_.set_write_timeout(30);

  static const std::set<std::string> kGet = {"/health", "/v1/models", "/metrics"};
  static const std::set<std::string> kPost = {"/v1/completions", "/v1/chat/completions",
                                              "/tokenize", "/detokenize"};
  auto not_found = [this](const httplib::Request& req, httplib::Response& res) {
    const bool other = req.method == "GET" || req.method == "HEAD" ? kPost.count(req.path) > 0
                                                                   : kGet.count(req.path) > 0 ||
                                                                         kPost.count(req.path) > 0;
    ApiError e;
    if (other) {
      e.status = 405;
      e.message = fmt::format("method {} is not allowed on {}", req.method, req.path);
      Error(res, e);
      res.set_header("Allow", kGet.count(req.path) ? "GET" : "POST");
    } else {
      e.status = 404;
      e.code = "not_found";
      e.message = fmt::format("no route {} {} (see docs/serving.md)", req.method, req.path);
      Error(res, e);
    }
  };
  // Methods other than GET/HEAD/POST: refused before routing (no body is read: close after),
  // except PUT and DELETE on /v1/sessions/...
  svr_.set_pre_routing_handler([this, not_found](const httplib::Request& req,
                                                 httplib::Response& res) {
    if (req.method == "GET" || req.method == "HEAD" || req.method == "POST") {
      return httplib::Server::HandlerResponse::Unhandled;
    }
    if ((req.method == "PUT" || req.method == "DELETE") && req.path.rfind("/v1/sessions/", 0) == 0) {
      return httplib::Server::HandlerResponse::Unhandled;
    }
    if (Gate(req, res, true, false, nullptr)) not_found(req, res);
    res.set_header("Connection", "close");
    return httplib::Server::HandlerResponse::Handled;
  });

  svr_.Get("/health", [this](const httplib::Request&, httplib::Response& res) {
    if (draining_) {
      ApiError e;
      e.status = 503;
      e.type = "unavailable_error";
      e.message = "the server is shutting down";
      return Error(res, e);
    }
    res.set_content("{\"status\":\"ok\"}", "application/json");
  });
  svr_.Get("/v1/models", [this](const httplib::Request& req, httplib::Response& res) {
    if (Gate(req, res, true, false, nullptr)) Models(res);
  });
  svr_.Get("/metrics", [this](const httplib::Request& req, httplib::Response& res) {
    if (!Gate(req, res, true, false, nullptr)) return;
    HttpCounters h;
    {
      std::lock_guard<std::mutex> lk(mu_);
      h = http_;
    }
    std::string text = RenderMetrics(eng_.GetStats(), h, opt_.model_id);
    if (store_) text += RenderStoreMetrics(store_->GetCounters(), opt_.model_id);
    res.set_content(text, "text/plain; version=0.0.4; charset=utf-8");
  });
  // Sessions (docs/store.md). Names are checked by the store ([A-Za-z0-9_.-]).
  svr_.Get("/v1/sessions", [this](const httplib::Request& req, httplib::Response& res) {
    if (Gate(req, res, true, false, nullptr)) Sessions(req, res, "GET", "", false, "");
  });
  svr_.Get(R"(/v1/sessions/([^/]+)(/kv)?)", [this](const httplib::Request& req, httplib::Response& res) {
    if (Gate(req, res, true, false, nullptr)) {
      Sessions(req, res, "GET", req.matches[1], req.matches[2].length() > 0, "");
    }
  });
  svr_.Delete(R"(/v1/sessions/([^/]+))", [this](const httplib::Request& req, httplib::Response& res) {
    if (Gate(req, res, true, false, nullptr)) Sessions(req, res, "DELETE", req.matches[1], false, "");
  });
  svr_.Put(R"(/v1/sessions/([^/]+)/kv)", [this](const httplib::Request& req, httplib::Response& res,
                                                const httplib::ContentReader& rd) {
    if (!Gate(req, res, true, false, nullptr)) return Drain(req, rd);
    std::string body;
    if (!ReadBody(req, res, rd, &body, opt_.max_session_bytes)) return;
    Sessions(req, res, "PUT", req.matches[1], true, body);
  });
  svr_.Get(".*", [this, not_found](const httplib::Request& req, httplib::Response& res) {
    if (Gate(req, res, true, false, nullptr)) not_found(req, res);
  });
  using Reader = httplib::ContentReader;
  svr_.Post("/v1/completions", [this](const httplib::Request& req, httplib::Response& res,
                                      const Reader& rd) { Completion(req, res, rd, false); });
  svr_.Post("/v1/chat/completions", [this](const httplib::Request& req, httplib::Response& res,
                                           const Reader& rd) { Completion(req, res, rd, true); });
  svr_.Post("/tokenize", [this](const httplib::Request& req, httplib::Response& res,
                                const Reader& rd) { Tokenize(req, res, rd); });
  svr_.Post("/detokenize", [this](const httplib::Request& req, httplib::Response& res,
                                  const Reader& rd) { Detokenize(req, res, rd); });
  svr_.Post(".*", [this, not_found](const httplib::Request& req, httplib::Response& res,
                                    const Reader& rd) {
    if (!Gate(req, res, true, false, nullptr)) return Drain(req, rd);
    std::string body;
    if (ReadBody(req, res, rd, &body)) not_found(req, res);
  });
  // Statuses set by the library itself (unparsable request line, 413 from the payload limit,
  // 414 URI too long, ...) get an error object too.
  svr_.set_error_handler([](const httplib::Request&, httplib::Response& res) {
    if (!res.body.empty() || res.content_provider_) return;
    ApiError e;
    e.status = res.status;
    e.message = StatusText(res.status);
    if (res.status >= 500) e.type = "server_error";
    res.set_content(Dump(ErrorBody(e)), "application/json");
  });
  svr_.set_exception_handler([](const httplib::Request&, httplib::Response& res,
                                std::exception_ptr ep) {
    ApiError e;
    e.status = 500;
    e.type = "server_error";
    e.message = "internal error";
    try {
      if (ep) std::rethrow_exception(ep);
    } catch (const std::bad_alloc&) {
      e.status = 503;
      e.type = "unavailable_error";
      e.message = "out of memory while serving the request";
    } catch (const std::exception& ex) {
      e.message = std::string("internal error: ") + ex.what();
    } catch (...) {
    }
    res.status = e.status;
    res.set_content(Dump(ErrorBody(e)), "application/json");
  });
  svr_.set_logger([this](const httplib::Request&, const httplib::Response& res) {
    std::lock_guard<std::mutex> lk(mu_);
    http_.responses[res.status] += 1;
  });

  if (opt_.port == 0) {
    port_ = svr_.bind_to_any_port(opt_.host);
    if (port_ < 0) return false;
  } else {
    if (!svr_.bind_to_port(opt_.host, opt_.port)) return false;
    port_ = opt_.port;
  }
  return true;
}

bool Server::Listen() { return svr_.listen_after_bind(); }

}  // namespace

namespace {
// SIGTERM/SIGINT: the handler (any thread; libraries such as OpenBLAS start threads before main,
// so blocking the signals for sigwait cannot cover them) writes the signal number to a pipe that
// Serve's signal thread reads. write() is async-signal-safe.
int g_signal_pipe[2] = {-1, -1};
extern "C" void OnTerminationSignal(int sig) {
  const unsigned char b = static_cast<unsigned char>(sig);
  [[maybe_unused]] ssize_t n = write(g_signal_pipe[1], &b, 1);
}
}  // namespace

void InstallTerminationHandlers() {
  if (g_signal_pipe[0] < 0 && pipe2(g_signal_pipe, O_CLOEXEC | O_NONBLOCK) != 0) {
    std::perror("kvcrunch: pipe");
  }
  struct sigaction sa {};
  sa.sa_handler = OnTerminationSignal;
  sigemptyset(&sa.sa_mask);
  sa.sa_flags = SA_RESTART;
  sigaction(SIGTERM, &sa, nullptr);
  sigaction(SIGINT, &sa, nullptr);
  // A client that disconnects makes a write raise SIGPIPE: the write should fail instead.
  signal(SIGPIPE, SIG_IGN);
}

int Serve(engine::Engine& eng, const Tokenizer& tok, const KvPolicy& kv, const ServerOptions& opt,
          KvStore* store) {
  Server srv(eng, tok, kv, opt, store);
  if (!srv.Bind()) {
    std::fprintf(stderr, "kvcrunch: error: UNAVAILABLE: cannot listen on %s:%d (in use, or not "
                         "an address of this machine)\n", opt.host.c_str(), opt.port);
    return 1;
  }
  eng.Start();
  std::atomic<bool> stop_signals{false};
  std::thread drainer;
  std::thread sig([&] {
    int n = 0;
    while (!stop_signals) {
      pollfd p{g_signal_pipe[0], POLLIN, 0};
      if (poll(&p, 1, 200) <= 0) continue;
      unsigned char b = 0;
      if (read(g_signal_pipe[0], &b, 1) != 1) continue;
      const int s = b;
      if (++n == 1) {
        spdlog::info("{}: stopping admission; running requests may finish for {:.0f} s "
                     "(send it again to cancel them now)", strsignal(s), opt.shutdown_grace_seconds);
        drainer = std::thread([&srv] { srv.Shutdown(false); });
      } else {
        spdlog::info("{} again: cancelling running requests", strsignal(s));
        srv.Force();
      }
    }
  });
  std::printf("kvcrunch: listening on http://%s:%d (model '%s'; %d connections; API key %s)\n",
              opt.host.c_str(), srv.port(), opt.model_id.c_str(), opt.max_connections,
              opt.api_keys.empty() ? "off" : "on");
  std::fflush(stdout);
  const bool ok = srv.Listen();
  stop_signals = true;
  sig.join();
  if (drainer.joinable()) drainer.join();
  eng.Shutdown(true);
  eng.Join();
  spdlog::info("server stopped");
  return ok ? 0 : 1;
}

}  // namespace kvc::server
