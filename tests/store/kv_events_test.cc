// KvEventPublisher: a real ZMQ SUB / DEALER in the test decodes the stream with msgpack-c, and a
// Python subscriber decodes it with msgspec structs of vLLM's schema (tests/store/kv_events_sub.py).
#include "store/kv_events.h"

#include <gtest/gtest.h>
#include <msgpack.hpp>
#include <zmq.h>

#include <atomic>
#include <chrono>
#include <cstdio>
#include <thread>

#include "redis_test_util.h"

namespace kvc::store {
namespace {

using namespace kvc::store::testing;  // NOLINT

std::string Key32(uint8_t first) {
  std::string k(32, '\0');
  for (int i = 0; i < 32; ++i) k[i] = static_cast<char>(first + i);
  return k;
}

struct Msg {
  std::vector<std::string> frames;
};

bool Recv(void* sock, Msg* m, int timeout_ms) {
  zmq_pollitem_t it{sock, 0, ZMQ_POLLIN, 0};
  if (zmq_poll(&it, 1, timeout_ms) <= 0) return false;
  m->frames.clear();
  while (true) {
    zmq_msg_t z;
    zmq_msg_init(&z);
    if (zmq_msg_recv(&z, sock, 0) < 0) {
      zmq_msg_close(&z);
      return false;
    }
    m->frames.emplace_back(static_cast<const char*>(zmq_msg_data(&z)), zmq_msg_size(&z));
    const bool more = zmq_msg_more(&z);
    zmq_msg_close(&z);
    if (!more) return true;
  }
}

uint64_t Be64(const std::string& s) {
  uint64_t v = 0;
  for (unsigned char c : s) v = (v << 8) | c;
  return v;
}

class Zmq {
 public:
  Zmq() : ctx_(zmq_ctx_new()) {}
  ~Zmq() {
    for (void* s : socks_) zmq_close(s);
    zmq_ctx_term(ctx_);
  }
  void* Socket(int type, const std::string& connect, const std::string& subscribe = "") {
    void* s = zmq_socket(ctx_, type);
    const int zero = 0;
    zmq_setsockopt(s, ZMQ_LINGER, &zero, sizeof(zero));
    if (type == ZMQ_SUB) zmq_setsockopt(s, ZMQ_SUBSCRIBE, subscribe.data(), subscribe.size());
    zmq_connect(s, connect.c_str());
    socks_.push_back(s);
    return s;
  }

 private:
  void* ctx_;
  std::vector<void*> socks_;
};

// Publishes AllBlocksCleared until `sub` sees a message (PUB/SUB slow joiner); returns the next
// sequence number the subscriber will see.
uint64_t Join(KvEventPublisher* p, void* sub) {
  Msg m;
  for (int i = 0; i < 200; ++i) {
    p->AllBlocksCleared();
    p->Flush();
    if (Recv(sub, &m, 20)) {
      while (Recv(sub, &m, 50)) {
      }
      return static_cast<uint64_t>(p->batches_sent());
    }
  }
  ADD_FAILURE() << "subscriber never joined";
  return 0;
}

std::unique_ptr<KvEventPublisher> MustCreate(KvEventOptions o) {
  auto p = KvEventPublisher::Create(o);
  EXPECT_TRUE(p.ok()) << p.status().ToString();
  return p.ok() ? std::move(p).value() : nullptr;
}

KvEventOptions Loopback(const std::string& topic = "kv@pod-a@smollm") {
  KvEventOptions o;
  o.endpoint = "tcp://127.0.0.1:*";
  o.replay_endpoint = "tcp://127.0.0.1:*";
  o.topic = topic;
  return o;
}

TEST(KvEvents, EventBlockHashIsTheLastEightBytesBigEndian) {
  EXPECT_EQ(EventBlockHash(Key32(0)), 0x18191a1b1c1d1e1fLL);
  EXPECT_EQ(EventBlockHash(std::string(32, '\xff')), -1);
  EXPECT_EQ(EventBlockHash(std::string("\x80\0\0\0\0\0\0\0", 8)), INT64_MIN);
  EXPECT_EQ(EventBlockHash("ab"), 0x6162);
  EXPECT_EQ(EventBlockHash(""), 0);
}

TEST(KvEvents, BadOptionsAreClearErrors) {
  KvEventOptions o = Loopback();
  o.buffer_steps = 0;
  EXPECT_EQ(KvEventPublisher::Create(o).status().code(), StatusCode::kInvalidArgument);
  o = Loopback();
  o.dp_rank = -1;
  EXPECT_EQ(KvEventPublisher::Create(o).status().code(), StatusCode::kInvalidArgument);
  o = Loopback();
  o.endpoint = "";
  EXPECT_EQ(KvEventPublisher::Create(o).status().code(), StatusCode::kInvalidArgument);
  o = Loopback();
  o.endpoint = "bogus://*:1";
  EXPECT_EQ(KvEventPublisher::Create(o).status().code(), StatusCode::kInvalidArgument);
  // ZMQ would bind 99999 mod 65536 = 34463 without a word: refused, naming the port.
  o = Loopback();
  o.endpoint = "tcp://*:99999";
  auto big = KvEventPublisher::Create(o);
  ASSERT_FALSE(big.ok()) << (*big)->endpoint();
  EXPECT_EQ(big.status().code(), StatusCode::kInvalidArgument);
  EXPECT_NE(big.status().message().find("99999"), std::string::npos) << big.status().ToString();
  o = Loopback();
  o.replay_endpoint = "tcp://127.0.0.1:65536";
  EXPECT_EQ(KvEventPublisher::Create(o).status().code(), StatusCode::kInvalidArgument);
  o = Loopback();
  o.endpoint = "tcp://*:65535";
  o.dp_rank = 1;  // vLLM's offset takes it to 65536
  EXPECT_EQ(KvEventPublisher::Create(o).status().code(), StatusCode::kInvalidArgument);
  // A port already bound: UNAVAILABLE naming the endpoint.
  auto a = MustCreate(Loopback());
  ASSERT_TRUE(a);
  o = Loopback();
  o.endpoint = a->endpoint();
  o.endpoint.replace(6, 9, "*");  // tcp://127.0.0.1:P -> tcp://*:P (bind)
  auto b = KvEventPublisher::Create(o);
  ASSERT_FALSE(b.ok());
  EXPECT_EQ(b.status().code(), StatusCode::kUnavailable) << b.status().ToString();
  o = Loopback();
  o.replay_endpoint = a->replay_endpoint();
  EXPECT_EQ(KvEventPublisher::Create(o).status().code(), StatusCode::kUnavailable);
}

TEST(KvEvents, DpRankOffsetsTheTcpPortAsVllmDoes) {
  std::string port;
  {
    auto a = MustCreate(Loopback());
    port = a->endpoint().substr(a->endpoint().rfind(':') + 1);
  }
  KvEventOptions o;
  o.endpoint = "tcp://*:" + std::to_string(std::stoi(port) - 2);
  o.dp_rank = 2;
  auto p = KvEventPublisher::Create(o);
  if (!p.ok()) GTEST_SKIP() << "port reused meanwhile: " << p.status().ToString();
  EXPECT_EQ((*p)->endpoint().substr((*p)->endpoint().rfind(':') + 1), port);
  o.endpoint = "tcp://*:x";
  EXPECT_EQ(KvEventPublisher::Create(o).status().code(), StatusCode::kInvalidArgument);
}

TEST(KvEvents, LiveBatchesDecodeAsVllmEventsWithIncreasingSequence) {
  auto p = MustCreate(Loopback());
  ASSERT_TRUE(p);
  Zmq z;
  void* sub = z.Socket(ZMQ_SUB, p->endpoint(), "kv@pod-a@smollm");
  const uint64_t first = Join(p.get(), sub);

  const std::string k0 = Key32(0), k1 = Key32(32), k2 = Key32(64);
  std::vector<int32_t> tokens(32);
  for (int i = 0; i < 32; ++i) tokens[i] = 1000 + i;
  p->BlockStored({k0, k1}, nullptr, tokens, 16, "GPU");
  p->Flush();
  p->BlockStored({k2}, &k1, std::vector<int32_t>(tokens.begin(), tokens.begin() + 16), 16, "");
  p->BlockRemoved({k0, k1}, "GPU");
  p->Flush();
  p->AllBlocksCleared();
  p->Flush();

  // The publisher thread batches whatever is queued when it wakes, so events may share a batch:
  // gather the 4 events from consecutive sequence numbers.
  std::vector<Msg> got;
  std::vector<msgpack::object_handle> handles;
  std::vector<const msgpack::object*> events;
  while (events.size() < 4) {
    Msg m;
    ASSERT_TRUE(Recv(sub, &m, 2000)) << events.size();
    ASSERT_EQ(m.frames.size(), 3u);
    EXPECT_EQ(m.frames[0], "kv@pod-a@smollm");
    ASSERT_EQ(m.frames[1].size(), 8u);
    EXPECT_EQ(Be64(m.frames[1]), first + got.size());
    handles.push_back(msgpack::unpack(m.frames[2].data(), m.frames[2].size()));
    // [ts, [event...], dp_rank]
    const msgpack::object& b = handles.back().get();
    ASSERT_EQ(b.type, msgpack::type::ARRAY);
    ASSERT_EQ(b.via.array.size, 3u);
    EXPECT_EQ(b.via.array.ptr[0].type, msgpack::type::FLOAT64);
    EXPECT_NEAR(b.via.array.ptr[0].as<double>(),
                std::chrono::duration<double>(
                    std::chrono::system_clock::now().time_since_epoch()).count(), 60.0);
    EXPECT_EQ(b.via.array.ptr[2].as<int>(), 0);
    ASSERT_EQ(b.via.array.ptr[1].type, msgpack::type::ARRAY);
    for (uint32_t i = 0; i < b.via.array.ptr[1].via.array.size; ++i) {
      events.push_back(&b.via.array.ptr[1].via.array.ptr[i]);
    }
    got.push_back(std::move(m));
  }
  ASSERT_EQ(events.size(), 4u);
  EXPECT_GE(got.size(), 3u);  // the Flush calls separate at least these
  // ["BlockStored", [h0, h1], nil, tokens, 16, nil, "GPU", nil]
  {
    const msgpack::object& e = *events[0];
    ASSERT_EQ(e.type, msgpack::type::ARRAY);
    ASSERT_EQ(e.via.array.size, 8u);
    EXPECT_EQ(e.via.array.ptr[0].as<std::string>(), "BlockStored");
    EXPECT_EQ(e.via.array.ptr[1].as<std::vector<int64_t>>(),
              (std::vector<int64_t>{EventBlockHash(k0), EventBlockHash(k1)}));
    EXPECT_TRUE(e.via.array.ptr[2].is_nil());
    EXPECT_EQ(e.via.array.ptr[3].as<std::vector<int32_t>>(), tokens);
    EXPECT_EQ(e.via.array.ptr[4].as<int>(), 16);
    EXPECT_TRUE(e.via.array.ptr[5].is_nil());  // lora_id
    EXPECT_EQ(e.via.array.ptr[6].as<std::string>(), "GPU");
    EXPECT_TRUE(e.via.array.ptr[7].is_nil());  // lora_name
  }
  // A stored block with a parent and nil medium, then a removal.
  {
    const msgpack::object& s = *events[1];
    EXPECT_EQ(s.via.array.ptr[0].as<std::string>(), "BlockStored");
    EXPECT_EQ(s.via.array.ptr[2].as<int64_t>(), EventBlockHash(k1));
    EXPECT_TRUE(s.via.array.ptr[6].is_nil());
    const msgpack::object& r = *events[2];
    ASSERT_EQ(r.via.array.size, 3u);
    EXPECT_EQ(r.via.array.ptr[0].as<std::string>(), "BlockRemoved");
    EXPECT_EQ(r.via.array.ptr[1].as<std::vector<int64_t>>().size(), 2u);
    EXPECT_EQ(r.via.array.ptr[2].as<std::string>(), "GPU");
  }
  // ["AllBlocksCleared"]
  {
    const msgpack::object& e = *events[3];
    ASSERT_EQ(e.via.array.size, 1u);
    EXPECT_EQ(e.via.array.ptr[0].as<std::string>(), "AllBlocksCleared");
  }
}

TEST(KvEvents, MapEncodingHasTheTypeKeyFirst) {
  KvEventOptions o = Loopback("");
  o.encoding = KvEventEncoding::kMap;
  o.dp_rank = 0;
  auto p = MustCreate(o);
  ASSERT_TRUE(p);
  Zmq z;
  void* sub = z.Socket(ZMQ_SUB, p->endpoint());
  Join(p.get(), sub);
  const std::string k = Key32(1);
  p->BlockRemoved({k}, "GPU");
  p->Flush();
  Msg m;
  ASSERT_TRUE(Recv(sub, &m, 2000));
  auto oh = msgpack::unpack(m.frames[2].data(), m.frames[2].size());
  const msgpack::object& e = oh.get().via.array.ptr[1].via.array.ptr[0];
  ASSERT_EQ(e.type, msgpack::type::MAP);
  ASSERT_EQ(e.via.map.size, 3u);
  EXPECT_EQ(e.via.map.ptr[0].key.as<std::string>(), "type");
  EXPECT_EQ(e.via.map.ptr[0].val.as<std::string>(), "BlockRemoved");
  EXPECT_EQ(e.via.map.ptr[1].key.as<std::string>(), "block_hashes");
  EXPECT_EQ(e.via.map.ptr[2].key.as<std::string>(), "medium");
}

TEST(KvEvents, ReplayReturnsTheBoundedBufferThenTheEndMarker) {
  KvEventOptions o = Loopback();
  o.buffer_steps = 3;
  auto p = MustCreate(o);
  ASSERT_TRUE(p);
  for (int i = 0; i < 5; ++i) {
    p->BlockRemoved({Key32(static_cast<uint8_t>(i))}, "GPU");
    p->Flush();
  }
  ASSERT_EQ(p->batches_sent(), 5);
  Zmq z;
  void* dealer = z.Socket(ZMQ_DEALER, p->replay_endpoint());
  auto ask = [&](uint64_t start) {
    char be[8];
    for (int i = 7; i >= 0; --i, start >>= 8) be[i] = static_cast<char>(start & 0xff);
    zmq_send(dealer, "", 0, ZMQ_SNDMORE);
    zmq_send(dealer, be, 8, 0);
    std::vector<uint64_t> seqs;
    Msg m;
    while (Recv(dealer, &m, 3000)) {
      EXPECT_EQ(m.frames.size(), 3u);
      EXPECT_TRUE(m.frames[0].empty());
      if (Be64(m.frames[1]) == UINT64_MAX) {
        EXPECT_TRUE(m.frames[2].empty());
        return seqs;
      }
      seqs.push_back(Be64(m.frames[1]));
      auto oh = msgpack::unpack(m.frames[2].data(), m.frames[2].size());
      EXPECT_EQ(oh.get().via.array.ptr[1].via.array.ptr[0].via.array.ptr[0].as<std::string>(),
                "BlockRemoved");
    }
    ADD_FAILURE() << "no end marker";
    return seqs;
  };
  EXPECT_EQ(ask(0), (std::vector<uint64_t>{2, 3, 4}));  // only the last buffer_steps batches
  EXPECT_EQ(ask(4), (std::vector<uint64_t>{4}));
  EXPECT_EQ(ask(5), (std::vector<uint64_t>{}));
  // A malformed request (2 frames instead of 3 at the ROUTER) is ignored, not fatal.
  zmq_send(dealer, "x", 1, 0);
  EXPECT_EQ(ask(3), (std::vector<uint64_t>{3, 4}));
}

TEST(KvEvents, ReplayOfMoreThanTheDefaultHighWaterMark) {
  KvEventOptions o = Loopback();
  o.buffer_steps = 1500;  // > ZMQ's default SNDHWM of 1000 messages
  auto p = MustCreate(o);
  ASSERT_TRUE(p);
  for (int i = 0; i < 1500; ++i) {
    p->AllBlocksCleared();
    p->Flush();
  }
  ASSERT_EQ(p->batches_sent(), 1500);
  Zmq z;
  void* dealer = z.Socket(ZMQ_DEALER, p->replay_endpoint());
  const char zero[8] = {0};
  zmq_send(dealer, "", 0, ZMQ_SNDMORE);
  zmq_send(dealer, zero, 8, 0);
  uint64_t next = 0;
  Msg m;
  while (Recv(dealer, &m, 3000)) {
    ASSERT_EQ(m.frames.size(), 3u);
    if (Be64(m.frames[1]) == UINT64_MAX) break;
    ASSERT_EQ(Be64(m.frames[1]), next);
    ++next;
  }
  EXPECT_EQ(next, 1500u);
}

TEST(KvEvents, ManyEventsFromManyThreadsAllArrive) {
  auto p = MustCreate(Loopback());
  ASSERT_TRUE(p);
  Zmq z;
  void* sub = z.Socket(ZMQ_SUB, p->endpoint(), "");
  Join(p.get(), sub);
  std::vector<std::thread> th;
  for (int t = 0; t < 4; ++t) {
    th.emplace_back([&, t] {
      for (int i = 0; i < 500; ++i) p->BlockRemoved({Key32(static_cast<uint8_t>(t * 50 + i % 50))});
    });
  }
  for (auto& x : th) x.join();
  p->Flush();
  size_t events = 0;
  Msg m;
  while (events < 2000 && Recv(sub, &m, 2000)) {
    auto oh = msgpack::unpack(m.frames[2].data(), m.frames[2].size());
    events += oh.get().via.array.ptr[1].via.array.size;
  }
  EXPECT_EQ(events, 2000u);
  EXPECT_EQ(p->dropped(), 0);
}

// The Python subscriber: replay of what was published before it joined, then live batches.
void RunPythonSubscriber(KvEventEncoding enc) {
  KvEventOptions o = Loopback("kv@pod-b@smollm");
  o.encoding = enc;
  o.dp_rank = 0;
  auto p = MustCreate(o);
  ASSERT_TRUE(p);
  const std::string k0 = Key32(0), k1 = Key32(32);
  std::vector<int32_t> tokens(32);
  for (int i = 0; i < 32; ++i) tokens[i] = 7 * i;
  p->BlockStored({k0, k1}, nullptr, tokens, 16, "GPU");
  p->Flush();
  p->BlockRemoved({k1}, "GPU");
  p->Flush();
  p->AllBlocksCleared();
  p->Flush();
  const std::string cmd = "python3 " + std::string(KVC_SOURCE_DIR) + "/tests/store/kv_events_sub.py" +
                          " --endpoint " + p->endpoint() + " --replay " + p->replay_endpoint() +
                          " --topic kv@pod-b@smollm --expect-replayed 3 --encoding " +
                          (enc == KvEventEncoding::kArray ? "array" : "map") + " 2>&1";
  FILE* f = popen(cmd.c_str(), "r");
  ASSERT_NE(f, nullptr);
  std::atomic<bool> done{false};
  std::thread heartbeat([&] {  // live batches until the subscriber has what it needs
    while (!done) {
      p->BlockRemoved({Key32(9)}, "GPU");
      std::this_thread::sleep_for(std::chrono::milliseconds(30));
    }
  });
  std::string out;
  char buf[4096];
  size_t n;
  while ((n = fread(buf, 1, sizeof(buf), f)) > 0) out.append(buf, n);
  const int rc = pclose(f);
  done = true;
  heartbeat.join();
  ASSERT_EQ(WEXITSTATUS(rc), 0) << out;
  // The decoded replay, as vLLM's msgspec structs see it.
  const std::string h0 = std::to_string(EventBlockHash(k0)), h1 = std::to_string(EventBlockHash(k1));
  EXPECT_NE(out.find("\"type\": \"BlockStored\", \"block_hashes\": [" + h0 + ", " + h1 +
                     "], \"parent_block_hash\": null, \"token_ids\": [0, 7, 14"),
            std::string::npos)
      << out;
  EXPECT_NE(out.find("\"block_size\": 16, \"lora_id\": null, \"medium\": \"GPU\", \"lora_name\": null"),
            std::string::npos)
      << out;
  EXPECT_NE(out.find("{\"type\": \"BlockRemoved\", \"block_hashes\": [" + h1 + "], \"medium\": \"GPU\""),
            std::string::npos)
      << out;
  EXPECT_NE(out.find("{\"type\": \"AllBlocksCleared\"}"), std::string::npos) << out;
  EXPECT_NE(out.find("\"dp_rank\": 0"), std::string::npos) << out;
}

TEST(KvEventsPython, VllmSchemaDecodesArrayEncoding) { RunPythonSubscriber(KvEventEncoding::kArray); }
TEST(KvEventsPython, VllmSchemaDecodesMapEncoding) { RunPythonSubscriber(KvEventEncoding::kMap); }

}  // namespace
}  // namespace kvc::store
