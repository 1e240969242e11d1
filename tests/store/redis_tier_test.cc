// RedisTier against real Redis servers (scripts/redis.sh): the ctest fixture's standalone server and
// 3-master cluster, and private servers for the tests that kill, pause or shrink one.
#include "store/redis_tier.h"

#include <gtest/gtest.h>

#include <chrono>
#include <random>
#include <algorithm>
#include <set>
#include <sstream>
#include <thread>

#include "redis_test_util.h"

namespace kvc::store {
namespace {

using namespace kvc::store::testing;  // NOLINT
using Clock = std::chrono::steady_clock;

int64_t MsSince(Clock::time_point t0) {
  return std::chrono::duration_cast<std::chrono::milliseconds>(Clock::now() - t0).count();
}

std::string RandomBytes(size_t n, uint32_t seed) {
  std::mt19937 rng(seed);
  std::string s(n, '\0');
  for (char& c : s) c = static_cast<char>(rng() & 0xff);
  return s;
}

std::string UniqueKey(const std::string& name) {
  static int counter = 0;
  return "kvc-test:" + std::to_string(getpid()) + ":" + name + ":" + std::to_string(counter++);
}

std::unique_ptr<RedisTier> MustCreate(const std::string& url, int64_t ttl = 3600, int timeout_ms = 200,
                                      int retry_ms = 1000, int pool = 4) {
  RedisOptions o;
  o.url = url;
  o.ttl_s = ttl;
  o.timeout_ms = timeout_ms;
  o.retry_ms = retry_ms;
  o.pool_size = pool;
  auto t = RedisTier::Create(o);
  EXPECT_TRUE(t.ok()) << t.status().ToString();
  return t.ok() ? std::move(t).value() : nullptr;
}

#define REQUIRE_FIXTURE()                                                       \
  do {                                                                          \
    if (StandaloneUrl().empty()) GTEST_FAIL() << "KVC_REDIS_FIXTURE not set (run through ctest)"; \
  } while (0)

TEST(RedisTierOptions, BadUrlsAndOptionsAreInvalidArgument) {
  for (const char* url :
       {"", "http://h:1", "redis://", "redis://:1", "redis://h:0", "redis://h:65536", "redis://h:x",
        "redis://h:1/x", "redis://h:1/-1", "redis://a:1,b:2", "redis-cluster://a:1,b:2/3",
        "redis-cluster://", "redis-cluster://a:1,", "redis://u:@h:1", "redis://[::1]:6379",
        "redis://h h:1"}) {
    RedisOptions o;
    o.url = url;
    auto t = RedisTier::Create(o);
    ASSERT_FALSE(t.ok()) << url;
    EXPECT_EQ(t.status().code(), StatusCode::kInvalidArgument) << url;
  }
  RedisOptions o;
  o.url = "redis://127.0.0.1:1";
  for (auto mutate : std::vector<void (*)(RedisOptions&)>{
           [](RedisOptions& x) { x.ttl_s = -1; }, [](RedisOptions& x) { x.timeout_ms = 0; },
           [](RedisOptions& x) { x.retry_ms = -5; }, [](RedisOptions& x) { x.pool_size = 0; }}) {
    RedisOptions b = o;
    mutate(b);
    EXPECT_EQ(RedisTier::Create(b).status().code(), StatusCode::kInvalidArgument);
  }
  for (const char* url : {"redis://localhost", "redis://u:p@127.0.0.1:6380/2", "redis://:pw@h",
                          "redis-cluster://a:1,b:2,c:3", "redis://h:1/"}) {
    o.url = url;
    auto t = RedisTier::Create(o);
    EXPECT_TRUE(t.ok()) << url << " " << t.status().ToString();
  }
}

TEST(RedisTierOptions, KeySlotMatchesRedisCluster) {
  EXPECT_EQ(RedisTier::KeySlot("123456789"), 0x31C3 % 16384);  // CRC16/XMODEM check value
  EXPECT_EQ(RedisTier::KeySlot("foo"), 12182);                 // CLUSTER KEYSLOT foo
  EXPECT_EQ(RedisTier::KeySlot("{user1000}.following"), RedisTier::KeySlot("user1000"));
  EXPECT_EQ(RedisTier::KeySlot("foo{}{bar}"), RedisTier::KeySlot("foo{}{bar}"));
  EXPECT_NE(RedisTier::KeySlot("foo{}{bar}"), RedisTier::KeySlot("bar"));  // empty tag: whole key
  EXPECT_EQ(RedisTier::KeySlot("foo{{bar}}zap"), RedisTier::KeySlot("{bar"));
}

TEST(RedisTierOptions, NothingListeningIsUnavailableFast) {
  // Port 1 on loopback: connection refused. Create succeeds; calls fail with UNAVAILABLE.
  auto t = MustCreate("redis://127.0.0.1:1", 3600, 200, 60000);
  ASSERT_TRUE(t);
  EXPECT_TRUE(t->up());
  auto g = t->Get("k");
  EXPECT_EQ(g.status().code(), StatusCode::kUnavailable);
  EXPECT_FALSE(t->up());
  const auto t0 = Clock::now();
  for (int i = 0; i < 100; ++i) {
    EXPECT_EQ(t->Set("k", "v").code(), StatusCode::kUnavailable);
  }
  EXPECT_LT(MsSince(t0), 100) << "calls while down must fail fast";
  auto s = t->GetStats();
  EXPECT_FALSE(s.up);
  EXPECT_EQ(s.errors, 101);
  EXPECT_NE(s.last_error.find("UNAVAILABLE"), std::string::npos) << s.last_error;
}

TEST(RedisTierStandalone, SetGetBinaryValuesUpTo4MiB) {
  REQUIRE_FIXTURE();
  auto t = MustCreate(StandaloneUrl());
  ASSERT_TRUE(t);
  std::vector<size_t> sizes = {0, 1, 7, 4096, 256 << 10, 1 << 20, 4 << 20};
  int64_t bytes = 0;
  for (size_t i = 0; i < sizes.size(); ++i) {
    std::string v = RandomBytes(sizes[i], 100 + i);
    if (!v.empty()) v[0] = '\0';  // embedded NUL
    const std::string key = UniqueKey("bin") + std::string("\0\r\n", 3);  // binary key too
    ASSERT_TRUE(t->Set(key, v).ok()) << sizes[i];
    auto g = t->Get(key);
    ASSERT_TRUE(g.ok()) << g.status().ToString();
    EXPECT_EQ(*g, v) << sizes[i];
    bytes += static_cast<int64_t>(sizes[i]);
  }
  auto s = t->GetStats();
  EXPECT_TRUE(s.up);
  EXPECT_EQ(s.sets, static_cast<int64_t>(sizes.size()));
  EXPECT_EQ(s.hits, static_cast<int64_t>(sizes.size()));
  EXPECT_EQ(s.bytes_written, bytes);
  EXPECT_EQ(s.bytes_read, bytes);
  EXPECT_EQ(s.errors, 0);
}

TEST(RedisTierStandalone, MissIsNotFoundAndDelRemoves) {
  REQUIRE_FIXTURE();
  auto t = MustCreate(StandaloneUrl());
  ASSERT_TRUE(t);
  const std::string key = UniqueKey("miss");
  EXPECT_EQ(t->Get(key).status().code(), StatusCode::kNotFound);
  ASSERT_TRUE(t->Set(key, "x").ok());
  EXPECT_TRUE(t->Get(key).ok());
  EXPECT_TRUE(t->Del(key).ok());
  EXPECT_TRUE(t->Del(key).ok());  // absent: still OK
  EXPECT_EQ(t->Get(key).status().code(), StatusCode::kNotFound);
  auto s = t->GetStats();
  EXPECT_EQ(s.misses, 2);
  EXPECT_EQ(s.hits, 1);
  EXPECT_EQ(s.errors, 0);
}

TEST(RedisTierStandalone, EveryValueHasTheTtl) {
  REQUIRE_FIXTURE();
  PrivateRedis r;  // redis-cli TTL needs the port
  ASSERT_TRUE(r.ok());
  auto t = MustCreate(r.url(), /*ttl=*/777);
  ASSERT_TRUE(t);
  ASSERT_TRUE(t->Set("ttl-key", "v").ok());
  const int ttl = std::atoi(r.Cli("TTL ttl-key").c_str());
  EXPECT_GE(ttl, 770);
  EXPECT_LE(ttl, 777);
  auto no_ttl = MustCreate(r.url(), /*ttl=*/0);
  ASSERT_TRUE(no_ttl->Set("no-ttl-key", "v").ok());
  EXPECT_EQ(std::atoi(r.Cli("TTL no-ttl-key").c_str()), -1);
  // And it does expire: a 1 s TTL, polled (no fixed sleep).
  auto short_ttl = MustCreate(r.url(), /*ttl=*/1);
  ASSERT_TRUE(short_ttl->Set("short", "v").ok());
  bool gone = false;
  for (int i = 0; i < 50 && !gone; ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
    gone = short_ttl->Get("short").status().code() == StatusCode::kNotFound;
  }
  EXPECT_TRUE(gone);
}

TEST(RedisTierStandalone, AKeyOfAnotherTypeIsInternalNotDown) {
  REQUIRE_FIXTURE();
  auto t = MustCreate(StandaloneUrl());
  ASSERT_TRUE(t);
  const std::string key = UniqueKey("list");
  const std::string port = ReadFile(FixtureDir() + "/standalone/port");
  ASSERT_EQ(Sh("redis-cli -h 127.0.0.1 -p " + port + " LPUSH " + key + " x >/dev/null"), 0);
  auto g = t->Get(key);
  EXPECT_EQ(g.status().code(), StatusCode::kInternal);
  EXPECT_NE(g.status().message().find("WRONGTYPE"), std::string::npos) << g.status().ToString();
  auto m = t->MGet({key});
  EXPECT_EQ(m[0].status().code(), StatusCode::kInternal);
  EXPECT_TRUE(t->up());
  EXPECT_TRUE(t->Set(key, "now a string").ok());  // SET replaces any type
  EXPECT_EQ(*t->Get(key), "now a string");
}

TEST(RedisTierStandalone, MGetKeepsOrderWithHitsAndMisses) {
  REQUIRE_FIXTURE();
  auto t = MustCreate(StandaloneUrl());
  ASSERT_TRUE(t);
  std::vector<std::string> keys;
  for (int i = 0; i < 40; ++i) {
    keys.push_back(UniqueKey("mget"));
    if (i % 3 != 0) {
      ASSERT_TRUE(t->Set(keys.back(), RandomBytes(1000 + i, i)).ok());
    }
  }
  auto r = t->MGet(keys);
  ASSERT_EQ(r.size(), keys.size());
  for (int i = 0; i < 40; ++i) {
    if (i % 3 == 0) {
      EXPECT_EQ(r[i].status().code(), StatusCode::kNotFound) << i;
    } else {
      ASSERT_TRUE(r[i].ok()) << i;
      EXPECT_EQ(*r[i], RandomBytes(1000 + i, i));
    }
  }
  EXPECT_TRUE(t->MGet({}).empty());
}

TEST(RedisTierStandalone, ManyThreadsShareTheSmallPool) {
  REQUIRE_FIXTURE();
  auto t = MustCreate(StandaloneUrl(), 3600, /*timeout_ms=*/5000, 1000, /*pool=*/2);
  ASSERT_TRUE(t);
  const std::string prefix = UniqueKey("mt");
  std::vector<std::thread> th;
  std::atomic<int> bad{0};
  for (int w = 0; w < 8; ++w) {
    th.emplace_back([&, w] {
      for (int i = 0; i < 40; ++i) {
        const std::string k = prefix + ":" + std::to_string(w) + ":" + std::to_string(i);
        const std::string v = RandomBytes(10000 + i, w * 100 + i);
        if (!t->Set(k, v).ok()) ++bad;
        auto g = t->Get(k);
        if (!g.ok() || *g != v) ++bad;
      }
    });
  }
  for (auto& x : th) x.join();
  EXPECT_EQ(bad.load(), 0);
  EXPECT_EQ(t->GetStats().errors, 0);
}

TEST(RedisTierStandalone, RedisKilledIsUnavailableFastThenReconnects) {
  PrivateRedis r;
  ASSERT_TRUE(r.ok());
  auto t = MustCreate(r.url(), 3600, /*timeout_ms=*/200, /*retry_ms=*/300);
  ASSERT_TRUE(t);
  const std::string v = RandomBytes(1 << 20, 7);
  ASSERT_TRUE(t->Set("a", v).ok());
  ASSERT_TRUE(t->Get("a").ok());
  ASSERT_TRUE(r.Kill());
  // Pooled connections are now dead: the first call sees the reset; none may block or crash.
  int64_t worst_ms = 0;
  for (int i = 0; i < 30; ++i) {
    const auto t0 = Clock::now();
    auto g = t->Get("a");
    EXPECT_EQ(g.status().code(), StatusCode::kUnavailable) << g.status().ToString();
    EXPECT_EQ(t->Set("b", v).code(), StatusCode::kUnavailable);
    auto m = t->MGet({"a", "b"});
    for (auto& x : m) EXPECT_EQ(x.status().code(), StatusCode::kUnavailable);
    worst_ms = std::max(worst_ms, MsSince(t0));
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  // Three calls per round, each bounded by timeout_ms (refused connects are immediate).
  EXPECT_LT(worst_ms, 3 * 200 + 300) << "a down Redis blocked a caller";
  EXPECT_FALSE(t->up());
  ASSERT_TRUE(r.Resume());  // same port, empty (no persistence)
  bool back = false;
  const auto t0 = Clock::now();
  while (!back && MsSince(t0) < 5000) {
    back = t->Set("a", v).ok();
    if (!back) std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  ASSERT_TRUE(back) << t->GetStats().last_error;
  auto g = t->Get("a");
  ASSERT_TRUE(g.ok());
  EXPECT_EQ(*g, v);
  EXPECT_TRUE(t->up());
  EXPECT_GE(t->GetStats().reconnects, 1);
}

TEST(RedisTierStandalone, SlowRedisIsUnavailableWithinTheTimeout) {
  PrivateRedis r;
  ASSERT_TRUE(r.ok());
  auto t = MustCreate(r.url(), 3600, /*timeout_ms=*/200, /*retry_ms=*/100);
  ASSERT_TRUE(t);
  ASSERT_TRUE(t->Set("a", "v").ok());
  // CLIENT PAUSE blocks every client's commands for 1.5 s: Redis is up but slow.
  ASSERT_NE(r.Cli("CLIENT PAUSE 1500 ALL").find("OK"), std::string::npos);
  const auto t0 = Clock::now();
  auto g = t->Get("a");
  const int64_t ms = MsSince(t0);
  EXPECT_EQ(g.status().code(), StatusCode::kUnavailable) << g.status().ToString();
  EXPECT_GE(ms, 150);
  EXPECT_LT(ms, 600);
  EXPECT_FALSE(t->up());
  // After the pause, it recovers.
  bool back = false;
  const auto t1 = Clock::now();
  while (!back && MsSince(t1) < 5000) {
    auto x = t->Get("a");
    back = x.ok() && *x == "v";
    if (!back) std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  EXPECT_TRUE(back);
  EXPECT_TRUE(t->up());
}

TEST(RedisTierStandalone, TinyMaxmemoryGivesMissesNotErrors) {
  PrivateRedis r("4mb");  // allkeys-lru (scripts/redis.sh): far below the 40 x 256 KiB written
  ASSERT_TRUE(r.ok());
  auto t = MustCreate(r.url());
  ASSERT_TRUE(t);
  std::vector<std::string> keys;
  for (int i = 0; i < 40; ++i) {
    keys.push_back("lru:" + std::to_string(i));
    ASSERT_TRUE(t->Set(keys.back(), RandomBytes(256 << 10, i)).ok()) << i;
  }
  int hits = 0, misses = 0;
  for (auto& x : t->MGet(keys)) {
    if (x.ok()) {
      ++hits;
    } else {
      EXPECT_EQ(x.status().code(), StatusCode::kNotFound);
      ++misses;
    }
  }
  EXPECT_GT(misses, 20);
  EXPECT_GT(hits, 0);
  EXPECT_EQ(t->GetStats().errors, 0);
  EXPECT_TRUE(t->up());
}

TEST(RedisTierStandalone, NoevictionOomIsResourceExhaustedNotDown) {
  PrivateRedis r("2mb");
  ASSERT_TRUE(r.ok());
  r.Cli("CONFIG SET maxmemory-policy noeviction");
  auto t = MustCreate(r.url());
  ASSERT_TRUE(t);
  Status last;
  for (int i = 0; i < 40 && last.ok(); ++i) last = t->Set("oom:" + std::to_string(i), RandomBytes(256 << 10, i));
  EXPECT_EQ(last.code(), StatusCode::kResourceExhausted) << last.ToString();
  EXPECT_TRUE(t->up());
  EXPECT_TRUE(t->Get("oom:0").ok());
}

// ---------------------------------------------------------------------------------------------
// Cluster

std::string ClusterUrl() {
  auto p = ClusterPorts();
  if (p.size() != 3) return "";
  return "redis-cluster://127.0.0.1:" + std::to_string(p[0]) + ",127.0.0.1:" + std::to_string(p[1]);
}

std::string Cli(int port, const std::string& args) {
  return ShOut("redis-cli -h 127.0.0.1 -p " + std::to_string(port) + " " + args + " 2>&1");
}

std::string Trim(std::string s) {
  while (!s.empty() && (s.back() == '\n' || s.back() == ' ')) s.pop_back();
  return s;
}

TEST(RedisTierCluster, KeysOnAllThreeNodesAndMGetAcrossSlots) {
  REQUIRE_FIXTURE();
  const std::string url = ClusterUrl();
  ASSERT_FALSE(url.empty());
  auto t = MustCreate(url);  // only two seeds: the third node is found by CLUSTER SLOTS
  ASSERT_TRUE(t);
  ASSERT_TRUE(t->cluster());
  const std::string prefix = UniqueKey("cl");
  std::vector<std::string> keys;
  for (int i = 0; i < 60; ++i) {
    keys.push_back(prefix + ":" + std::to_string(i));
    ASSERT_TRUE(t->Set(keys.back(), RandomBytes(5000 + i, i)).ok()) << t->GetStats().last_error;
  }
  EXPECT_EQ(t->num_nodes(), 3);
  // Each node holds some of them (asked on the node itself, without redirects).
  std::set<int> owners;
  for (int port : ClusterPorts()) {
    for (const auto& k : keys) {
      if (Trim(Cli(port, "EXISTS " + k)) == "1") owners.insert(port);
    }
  }
  EXPECT_EQ(owners.size(), 3u);
  for (const auto& k : keys) {
    EXPECT_EQ(std::to_string(RedisTier::KeySlot(k)),
              Trim(Cli(ClusterPorts()[0], "CLUSTER KEYSLOT " + k)));
    break;  // one spot check is enough for the slot function here (unit-tested above)
  }
  std::vector<std::string> ask = keys;
  ask.push_back(prefix + ":absent");
  auto r = t->MGet(ask);
  for (int i = 0; i < 60; ++i) {
    ASSERT_TRUE(r[i].ok()) << i << " " << r[i].status().ToString();
    EXPECT_EQ(*r[i], RandomBytes(5000 + i, i));
  }
  EXPECT_EQ(r[60].status().code(), StatusCode::kNotFound);
  // Hash-tagged keys share a slot (and a node).
  ASSERT_TRUE(t->Set("{" + prefix + "}:a", "1").ok());
  ASSERT_TRUE(t->Set("{" + prefix + "}:b", "2").ok());
  EXPECT_EQ(*t->Get("{" + prefix + "}:b"), "2");
  EXPECT_EQ(t->GetStats().errors, 0);
  EXPECT_TRUE(t->up());
}

TEST(RedisTierCluster, FollowsAskAndMovedWhileASlotIsResharded) {
  REQUIRE_FIXTURE();
  const auto ports = ClusterPorts();
  ASSERT_EQ(ports.size(), 3u);
  auto t = MustCreate(ClusterUrl(), 3600, /*timeout_ms=*/2000);
  ASSERT_TRUE(t);
  const std::string tag = "{" + UniqueKey("reshard") + "}";
  const std::string k1 = tag + ":moved", k2 = tag + ":stays";
  ASSERT_TRUE(t->Set(k1, "value-1").ok());
  ASSERT_TRUE(t->Set(k2, "value-2").ok());
  const int slot = RedisTier::KeySlot(k1);
  int src = -1;
  for (int p : ports) {
    if (Trim(Cli(p, "EXISTS " + k1)) == "1") src = p;
  }
  ASSERT_NE(src, -1);
  const int dst = src == ports[0] ? ports[1] : ports[0];
  const std::string src_id = Trim(Cli(src, "CLUSTER MYID")), dst_id = Trim(Cli(dst, "CLUSTER MYID"));
  const std::string s = std::to_string(slot);
  ASSERT_EQ(Trim(Cli(dst, "CLUSTER SETSLOT " + s + " IMPORTING " + src_id)), "OK");
  ASSERT_EQ(Trim(Cli(src, "CLUSTER SETSLOT " + s + " MIGRATING " + dst_id)), "OK");
  // Move k1 only: while the slot migrates, the source answers ASK for it, serves k2 itself.
  ASSERT_EQ(Trim(Cli(src, "MIGRATE 127.0.0.1 " + std::to_string(dst) + " \"\" 0 5000 KEYS " + k1)), "OK");
  auto g1 = t->Get(k1);
  ASSERT_TRUE(g1.ok()) << g1.status().ToString();
  EXPECT_EQ(*g1, "value-1");
  EXPECT_EQ(*t->Get(k2), "value-2");
  auto m = t->MGet({k2, k1});
  ASSERT_TRUE(m[0].ok() && m[1].ok());
  EXPECT_EQ(*m[1], "value-1");
  // Finish: move k2, give the slot to dst everywhere; the old owner now answers MOVED.
  ASSERT_EQ(Trim(Cli(src, "MIGRATE 127.0.0.1 " + std::to_string(dst) + " \"\" 0 5000 KEYS " + k2)), "OK");
  for (int p : ports) Cli(p, "CLUSTER SETSLOT " + s + " NODE " + dst_id);
  EXPECT_EQ(Trim(Cli(src, "GET " + k2)).substr(0, 5), "MOVED");
  auto g2 = t->Get(k2);
  ASSERT_TRUE(g2.ok()) << g2.status().ToString();
  EXPECT_EQ(*g2, "value-2");
  ASSERT_TRUE(t->Set(k1, "value-1b").ok());
  EXPECT_EQ(Trim(Cli(dst, "GET " + k1)), "value-1b");  // written on the new owner
  auto m2 = t->MGet({k1, k2});
  ASSERT_TRUE(m2[0].ok() && m2[1].ok());
  EXPECT_EQ(*m2[0], "value-1b");
  EXPECT_EQ(t->GetStats().errors, 0) << t->GetStats().last_error;
}

TEST(RedisTierCluster, OneNodeKilledOnlyItsKeysAreUnavailable) {
  // A private cluster: this test kills one of its masters.
  char tmpl[] = "/tmp/kvc-cluster-XXXXXX";
  ASSERT_NE(mkdtemp(tmpl), nullptr);
  const std::string dir = tmpl;
  struct Stop {
    std::string d;
    ~Stop() { Sh("bash " + RedisScript() + " stop " + d); }
  } stop{dir};
  ASSERT_EQ(Sh("bash " + RedisScript() + " start cluster " + dir + " >/dev/null"), 0);
  std::istringstream in(ReadFile(dir + "/ports"));
  std::vector<int> ports;
  for (int p; in >> p;) ports.push_back(p);
  ASSERT_EQ(ports.size(), 3u);
  auto t = MustCreate("redis-cluster://127.0.0.1:" + std::to_string(ports[0]), 3600, 200,
                      /*retry_ms=*/300);
  ASSERT_TRUE(t);
  std::vector<std::string> keys;
  for (int i = 0; i < 30; ++i) {
    keys.push_back("k" + std::to_string(i));
    ASSERT_TRUE(t->Set(keys.back(), "v" + std::to_string(i)).ok());
  }
  std::vector<bool> on_victim;
  for (const auto& k : keys) on_victim.push_back(Trim(Cli(ports[2], "EXISTS " + k)) == "1");
  ASSERT_GT(std::count(on_victim.begin(), on_victim.end(), true), 0);
  ASSERT_EQ(Sh("kill -9 $(cat " + dir + "/redis-" + std::to_string(ports[2]) + ".pid)"), 0);
  for (int round = 0; round < 3; ++round) {
    const auto t0 = Clock::now();
    auto r = t->MGet(keys);
    EXPECT_LT(MsSince(t0), 1000);
    for (size_t i = 0; i < keys.size(); ++i) {
      if (on_victim[i]) {
        EXPECT_EQ(r[i].status().code(), StatusCode::kUnavailable) << keys[i];
      } else {
        ASSERT_TRUE(r[i].ok()) << keys[i] << " " << r[i].status().ToString();
        EXPECT_EQ(*r[i], round == 0 ? "v" + std::to_string(i) : "w");
      }
    }
    for (size_t i = 0; i < keys.size(); ++i) {
      if (!on_victim[i]) {
        EXPECT_TRUE(t->Set(keys[i], "w").ok()) << keys[i];
      }
    }
  }
  EXPECT_FALSE(t->up());
}

TEST(RedisTierCluster, NoSeedReachableIsUnavailable) {
  auto t = MustCreate("redis-cluster://127.0.0.1:1,127.0.0.1:2", 3600, 200, 60000);
  ASSERT_TRUE(t);
  EXPECT_EQ(t->Get("x").status().code(), StatusCode::kUnavailable);
  EXPECT_EQ(t->Set("x", "y").code(), StatusCode::kUnavailable);
  auto m = t->MGet({"a", "b"});
  for (auto& x : m) EXPECT_EQ(x.status().code(), StatusCode::kUnavailable);
  EXPECT_FALSE(t->up());
}

}  // namespace
}  // namespace kvc::store
