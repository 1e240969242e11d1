#include "store/kv_events.h"

#ifndef MSGPACK_NO_BOOST
#define MSGPACK_NO_BOOST
#endif
#include <msgpack.hpp>
#include <spdlog/spdlog.h>
#include <zmq.h>

#include <algorithm>
#include <atomic>
#include <charconv>
#include <chrono>
#include <cstring>
#include <condition_variable>
#include <deque>
#include <mutex>
#include <optional>
#include <thread>
#include <utility>
#include <variant>

namespace kvc::store {
namespace {

struct StoredEv {
  std::vector<int64_t> hashes;
  std::optional<int64_t> parent;
  std::vector<int32_t> tokens;
  int block_size = 0;
  std::string medium;
};
struct RemovedEv {
  std::vector<int64_t> hashes;
  std::string medium;
};
struct ClearedEv {};
using Event = std::variant<StoredEv, RemovedEv, ClearedEv>;

std::vector<int64_t> EventHashes(const std::vector<std::string>& keys) {
  std::vector<int64_t> h;
  h.reserve(keys.size());
  for (const std::string& k : keys) h.push_back(EventBlockHash(k));
  return h;
}

using Packer = msgpack::packer<msgpack::sbuffer>;

void PackStrOrNil(Packer& p, const std::string& s) {
  if (s.empty()) {
    p.pack_nil();
  } else {
    p.pack(s);
  }
}

// One event as msgspec encodes a tag=True (+ array_like=True for kArray) struct (see the header).
void PackEvent(Packer& p, const Event& ev, KvEventEncoding enc) {
  const bool map = enc == KvEventEncoding::kMap;
  // A field: its name first when map-encoded.
  auto key = [&](const char* name) {
    if (map) p.pack(std::string(name));
  };
  auto tag = [&](const char* t, uint32_t n_fields) {
    if (map) {
      p.pack_map(n_fields + 1);
      p.pack(std::string("type"));
    } else {
      p.pack_array(n_fields + 1);
    }
    p.pack(std::string(t));
  };
  if (const auto* s = std::get_if<StoredEv>(&ev)) {
    tag("BlockStored", 7);
    key("block_hashes");
    p.pack(s->hashes);
    key("parent_block_hash");
    if (s->parent) {
      p.pack(*s->parent);
    } else {
      p.pack_nil();
    }
    key("token_ids");
    p.pack(s->tokens);
    key("block_size");
    p.pack(s->block_size);
    key("lora_id");
    p.pack_nil();
    key("medium");
    PackStrOrNil(p, s->medium);
    key("lora_name");
    p.pack_nil();
  } else if (const auto* r = std::get_if<RemovedEv>(&ev)) {
    tag("BlockRemoved", 2);
    key("block_hashes");
    p.pack(r->hashes);
    key("medium");
    PackStrOrNil(p, r->medium);
  } else {
    tag("AllBlocksCleared", 0);
  }
}

// vLLM's offset_endpoint_port: dp rank r > 0 adds r to a tcp port, appends "_dp<r>" to inproc.
StatusOr<std::string> OffsetEndpoint(const std::string& ep, int dp_rank) {
  if (ep.empty() || dp_rank == 0) return ep;
  if (ep.find("inproc") != std::string::npos) return ep + "_dp" + std::to_string(dp_rank);
  if (ep.find("tcp") != std::string::npos) {
    const size_t colon = ep.rfind(':');
    if (colon == std::string::npos) return ep;
    int port = 0;
    const char* b = ep.data() + colon + 1;
    const char* e = ep.data() + ep.size();
    auto [p, ec] = std::from_chars(b, e, port);
    if (ec != std::errc() || p != e || b == e) {
      return InvalidArgument("kv events: endpoint '" + ep + "' needs a numeric port with dp_rank > 0");
    }
    return ep.substr(0, colon + 1) + std::to_string(port + dp_rank);
  }
  return InvalidArgument("kv events: endpoint '" + ep + "' must be tcp:// or inproc:// with dp_rank > 0");
}

// ZMQ takes a tcp port modulo 65536 ("tcp://*:99999" binds 34463) and says nothing: refuse a
// numeric port outside 0..65535 (after the dp-rank offset) with the endpoint named.
Status CheckTcpPort(const std::string& ep) {
  if (ep.rfind("tcp://", 0) != 0) return Status::Ok();
  const size_t colon = ep.rfind(':');
  if (colon == std::string::npos || colon < 6) return Status::Ok();  // no port: ZMQ's own error
  const std::string_view port(ep.data() + colon + 1, ep.size() - colon - 1);
  if (port.empty() || port == "*") return Status::Ok();
  long v = 0;
  auto [p, ec] = std::from_chars(port.data(), port.data() + port.size(), v);
  if (ec == std::errc() && p == port.data() + port.size() && v >= 0 && v <= 65535) return Status::Ok();
  if (ec != std::errc::result_out_of_range && (ec != std::errc() || p != port.data() + port.size())) {
    return Status::Ok();  // not a number (a service name?): ZMQ's own error
  }
  return InvalidArgument("kv events: endpoint '" + ep + "': port " + std::string(port) +
                         " is outside 0..65535");
}

std::string LastEndpoint(void* sock) {
  char buf[256];
  size_t len = sizeof(buf);
  if (zmq_getsockopt(sock, ZMQ_LAST_ENDPOINT, buf, &len) != 0 || len == 0) return "";
  return std::string(buf, strnlen(buf, len));
}

void Put64BE(uint64_t v, char out[8]) {
  for (int i = 7; i >= 0; --i) {
    out[i] = static_cast<char>(v & 0xff);
    v >>= 8;
  }
}

}  // namespace

int64_t EventBlockHash(std::string_view key) {
  uint64_t v = 0;
  const size_t n = std::min<size_t>(key.size(), 8);
  for (size_t i = key.size() - n; i < key.size(); ++i) {
    v = (v << 8) | static_cast<unsigned char>(key[i]);
  }
  return static_cast<int64_t>(v);
}

class KvEventPublisher::Impl {
 public:
  ~Impl() {
    {
      std::lock_guard<std::mutex> l(mu_);
      stop_ = true;
    }
    cv_.notify_all();
    if (thread_.joinable()) thread_.join();
    if (pub_ != nullptr) zmq_close(pub_);
    if (replay_ != nullptr) zmq_close(replay_);
    if (ctx_ != nullptr) zmq_ctx_term(ctx_);
  }

  Status Init(const KvEventOptions& o) {
    opt_ = o;
    ctx_ = zmq_ctx_new();
    if (ctx_ == nullptr) return Internal("kv events: zmq_ctx_new failed");
    KVC_ASSIGN_OR_RETURN(std::string ep, OffsetEndpoint(o.endpoint, o.dp_rank));
    KVC_ASSIGN_OR_RETURN(std::string rep, OffsetEndpoint(o.replay_endpoint, o.dp_rank));
    KVC_RETURN_IF_ERROR(CheckTcpPort(ep));
    KVC_RETURN_IF_ERROR(CheckTcpPort(rep));
    pub_ = zmq_socket(ctx_, ZMQ_PUB);
    if (pub_ == nullptr) return Internal(std::string("kv events: zmq_socket: ") + zmq_strerror(zmq_errno()));
    const int hwm = 100000, linger = 1000;
    zmq_setsockopt(pub_, ZMQ_SNDHWM, &hwm, sizeof(hwm));
    zmq_setsockopt(pub_, ZMQ_LINGER, &linger, sizeof(linger));
    const bool bind = ep.find('*') != std::string::npos || ep.find("::") != std::string::npos ||
                      ep.rfind("ipc://", 0) == 0 || ep.rfind("inproc://", 0) == 0;
    if ((bind ? zmq_bind(pub_, ep.c_str()) : zmq_connect(pub_, ep.c_str())) != 0) {
      const int e = zmq_errno();
      const std::string msg = std::string("kv events: ") + (bind ? "bind" : "connect") + " '" + ep +
                              "': " + zmq_strerror(e);
      return e == EINVAL || e == EPROTONOSUPPORT ? InvalidArgument(msg) : Unavailable(msg);
    }
    endpoint_ = bind ? LastEndpoint(pub_) : ep;
    if (!rep.empty()) {
      replay_ = zmq_socket(ctx_, ZMQ_ROUTER);
      if (replay_ == nullptr) return Internal("kv events: zmq_socket(ROUTER) failed");
      const int zero = 0;
      zmq_setsockopt(replay_, ZMQ_LINGER, &zero, sizeof(zero));
      // A replay sends up to buffer_steps + 1 messages at once; the default high-water mark (1000)
      // would silently drop the rest.
      const int replay_hwm = o.buffer_steps + 16;
      zmq_setsockopt(replay_, ZMQ_SNDHWM, &replay_hwm, sizeof(replay_hwm));
      if (zmq_bind(replay_, rep.c_str()) != 0) {
        const int e = zmq_errno();
        const std::string msg = "kv events: bind replay '" + rep + "': " + zmq_strerror(e);
        return e == EINVAL || e == EPROTONOSUPPORT ? InvalidArgument(msg) : Unavailable(msg);
      }
      replay_endpoint_ = LastEndpoint(replay_);
    }
    topic_ = o.topic;
    thread_ = std::thread([this] { Run(); });
    return Status::Ok();
  }

  void Enqueue(Event ev) {
    {
      std::lock_guard<std::mutex> l(mu_);
      if (stop_) return;
      if (static_cast<int64_t>(queue_.size()) >= opt_.max_queue_events) {
        if (dropped_.fetch_add(1) == 0) {
          spdlog::warn("kv events: queue full ({} events); dropping events (subscribers will see a "
                       "gap and should resync)",
                       opt_.max_queue_events);
        }
        return;
      }
      queue_.push_back(std::move(ev));
      ++enqueued_;
    }
    cv_.notify_all();
  }

  void Flush() {
    std::unique_lock<std::mutex> l(mu_);
    const int64_t target = enqueued_;
    done_cv_.wait(l, [&] { return sent_events_ >= target || exited_; });
  }

  const std::string& endpoint() const { return endpoint_; }
  const std::string& replay_endpoint() const { return replay_endpoint_; }
  int64_t batches_sent() const { return seq_.load(); }
  int64_t dropped() const { return dropped_.load(); }

 private:
  void Run() {
    std::unique_lock<std::mutex> l(mu_);
    while (true) {
      cv_.wait_for(l, std::chrono::milliseconds(replay_ ? 20 : 200),
                   [&] { return stop_ || !queue_.empty(); });
      std::deque<Event> batch;
      batch.swap(queue_);
      const bool stopping = stop_;
      l.unlock();
      if (replay_ != nullptr) ServeReplay();
      if (!batch.empty()) Send(batch);
      l.lock();
      sent_events_ += static_cast<int64_t>(batch.size());
      done_cv_.notify_all();
      if (stopping && queue_.empty()) break;
    }
    exited_ = true;
    done_cv_.notify_all();
  }

  void Send(const std::deque<Event>& events) {
    msgpack::sbuffer buf;
    Packer p(buf);
    p.pack_array(3);
    const double ts =
        std::chrono::duration<double>(std::chrono::system_clock::now().time_since_epoch()).count();
    p.pack_double(ts);
    p.pack_array(static_cast<uint32_t>(events.size()));
    for (const Event& e : events) PackEvent(p, e, opt_.encoding);
    p.pack(opt_.dp_rank);
    const uint64_t seq = static_cast<uint64_t>(seq_.load());
    char seq_be[8];
    Put64BE(seq, seq_be);
    // ZMQ_DONTWAIT: a PUB socket never blocks (it drops at the HWM), but be explicit.
    if (zmq_send(pub_, topic_.data(), topic_.size(), ZMQ_SNDMORE | ZMQ_DONTWAIT) < 0 ||
        zmq_send(pub_, seq_be, 8, ZMQ_SNDMORE | ZMQ_DONTWAIT) < 0 ||
        zmq_send(pub_, buf.data(), buf.size(), ZMQ_DONTWAIT) < 0) {
      if (!send_error_logged_) {
        spdlog::warn("kv events: send failed: {}", zmq_strerror(zmq_errno()));
        send_error_logged_ = true;
      }
    }
    // The batch keeps its sequence number and stays replayable even if the live send failed.
    buffer_.emplace_back(seq, std::string(buf.data(), buf.size()));
    while (static_cast<int>(buffer_.size()) > opt_.buffer_steps) buffer_.pop_front();
    seq_.fetch_add(1);
  }

  // Answers every pending replay request: [identity, "", start_seq BE8].
  void ServeReplay() {
    while (true) {
      zmq_pollitem_t item{replay_, 0, ZMQ_POLLIN, 0};
      if (zmq_poll(&item, 1, 0) <= 0 || !(item.revents & ZMQ_POLLIN)) return;
      std::vector<std::string> frames;
      while (true) {
        zmq_msg_t m;
        zmq_msg_init(&m);
        if (zmq_msg_recv(&m, replay_, ZMQ_DONTWAIT) < 0) {
          zmq_msg_close(&m);
          break;
        }
        frames.emplace_back(static_cast<const char*>(zmq_msg_data(&m)), zmq_msg_size(&m));
        const bool more = zmq_msg_more(&m);
        zmq_msg_close(&m);
        if (!more) break;
      }
      if (frames.size() != 3 || frames[2].size() != 8) {
        spdlog::warn("kv events: ignoring a malformed replay request ({} frames)", frames.size());
        continue;
      }
      uint64_t start = 0;
      for (unsigned char c : frames[2]) start = (start << 8) | c;
      const std::string& id = frames[0];
      auto send = [&](const char* seq, const std::string& payload) {
        zmq_send(replay_, id.data(), id.size(), ZMQ_SNDMORE | ZMQ_DONTWAIT);
        zmq_send(replay_, "", 0, ZMQ_SNDMORE | ZMQ_DONTWAIT);
        zmq_send(replay_, seq, 8, ZMQ_SNDMORE | ZMQ_DONTWAIT);
        zmq_send(replay_, payload.data(), payload.size(), ZMQ_DONTWAIT);
      };
      for (const auto& [seq, payload] : buffer_) {
        if (seq < start) continue;
        char be[8];
        Put64BE(seq, be);
        send(be, payload);
      }
      const char end[8] = {'\xff', '\xff', '\xff', '\xff', '\xff', '\xff', '\xff', '\xff'};
      send(end, std::string());
    }
  }

  KvEventOptions opt_;
  void* ctx_ = nullptr;
  void* pub_ = nullptr;
  void* replay_ = nullptr;
  std::string endpoint_, replay_endpoint_, topic_;
  std::thread thread_;

  std::mutex mu_;  // guards queue_, stop_, enqueued_, sent_events_, exited_
  std::condition_variable cv_, done_cv_;
  std::deque<Event> queue_;
  bool stop_ = false, exited_ = false;
  int64_t enqueued_ = 0, sent_events_ = 0;

  // Publisher thread only.
  std::deque<std::pair<uint64_t, std::string>> buffer_;
  bool send_error_logged_ = false;

  std::atomic<int64_t> seq_{0}, dropped_{0};
};

StatusOr<std::unique_ptr<KvEventPublisher>> KvEventPublisher::Create(const KvEventOptions& o) {
  if (o.endpoint.empty()) return InvalidArgument("kv events: empty endpoint");
  if (o.buffer_steps < 1) return InvalidArgument("kv events: buffer_steps must be >= 1");
  if (o.dp_rank < 0) return InvalidArgument("kv events: dp_rank must be >= 0");
  if (o.max_queue_events < 1) return InvalidArgument("kv events: max_queue_events must be >= 1");
  auto impl = std::make_unique<Impl>();
  KVC_RETURN_IF_ERROR(impl->Init(o));
  return std::unique_ptr<KvEventPublisher>(new KvEventPublisher(std::move(impl)));
}

KvEventPublisher::KvEventPublisher(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
KvEventPublisher::~KvEventPublisher() = default;

void KvEventPublisher::BlockStored(const std::vector<std::string>& block_hashes,
                                   const std::string* parent_hash,
                                   const std::vector<int32_t>& token_ids, int block_size,
                                   const std::string& medium) {
  StoredEv e;
  e.hashes = EventHashes(block_hashes);
  if (parent_hash != nullptr) e.parent = EventBlockHash(*parent_hash);
  e.tokens = token_ids;
  e.block_size = block_size;
  e.medium = medium;
  impl_->Enqueue(std::move(e));
}

void KvEventPublisher::BlockRemoved(const std::vector<std::string>& block_hashes,
                                    const std::string& medium) {
  impl_->Enqueue(RemovedEv{EventHashes(block_hashes), medium});
}

void KvEventPublisher::AllBlocksCleared() { impl_->Enqueue(ClearedEv{}); }
void KvEventPublisher::Flush() { impl_->Flush(); }
const std::string& KvEventPublisher::endpoint() const { return impl_->endpoint(); }
const std::string& KvEventPublisher::replay_endpoint() const { return impl_->replay_endpoint(); }
int64_t KvEventPublisher::batches_sent() const { return impl_->batches_sent(); }
int64_t KvEventPublisher::dropped() const { return impl_->dropped(); }

}  // namespace kvc::store
