// engine::KvPlan is an upper bound of what a KvCache allocates (Memory().TotalBytes()), for every
// registered codec and alias, with sinks, while tokens arrive as a prefill chunk and then one by
// one (and with a policy's statistics arrays).
#include <gtest/gtest.h>

#include <random>

#include "engine/kv_plan.h"
#include "kv/codec.h"

namespace kvc::engine {
namespace {

kv::KvShape Shape() {
  kv::KvShape s;
  s.n_layer = 2;
  s.n_head = 4;
  s.n_head_kv = 2;
  s.head_dim = 64;
  s.rope.n_rot = 64;
  s.rope.theta = 10000;
  return s;
}

void CheckBound(const std::string& codec, int sinks, const kv::AttnStatsRequest& stats) {
  SCOPED_TRACE(codec + " sinks=" + std::to_string(sinks));
  const kv::KvShape shape = Shape();
  kv::KvCacheConfig cfg;
  cfg.k_codec = cfg.v_codec = codec;
  cfg.sink_tokens = sinks;
  auto plan = KvPlan::Measure(shape, cfg, stats);
  if (!plan.ok() && plan.status().message().find("key") != std::string::npos) {
    cfg.v_codec = "f16";  // key-only codecs (QJL) pair with f16 values
    plan = KvPlan::Measure(shape, cfg, stats);
  }
  if (!plan.ok()) {
    // Codecs that need calibration data (KVQuant) cannot be built without it.
    ASSERT_NE(plan.status().message().find("calibration"), std::string::npos)
        << plan.status().ToString();
    return;
  }
  auto cache = kv::KvCache::Create(shape, cfg);
  ASSERT_TRUE(cache.ok());
  (*cache)->SetStatsRequest(stats);
  EXPECT_LE(int64_t((*cache)->Memory().TotalBytes()), (*plan)->Bytes(0));
  std::mt19937 rng(7);
  std::normal_distribution<float> nd;
  std::vector<float> k, v, q(size_t(shape.n_head) * 64), out(q.size());
  for (auto& x : q) x = nd(rng);
  int64_t n = 0;
  auto write = [&](int m) {
    k.resize(size_t(m) * shape.n_head_kv * 64);
    v.resize(k.size());
    for (auto& x : k) x = nd(rng);
    for (auto& x : v) x = nd(rng);
    std::vector<int64_t> seq(static_cast<size_t>(m));
    for (int i = 0; i < m; ++i) seq[size_t(i)] = n + i;
    for (int l = 0; l < shape.n_layer; ++l) {
      ASSERT_TRUE((*cache)->Write(l, seq.data(), m, k.data(), v.data()).ok());
      if (stats.accumulate || stats.obs_window > 0) {  // allocates the statistics arrays
        (*cache)->Attend(l, q.data(), &seq.back(), 1, out.data());
      } else {
        (*cache)->FlushLayer(l);
      }
    }
    n += m;
    ASSERT_LE(int64_t((*cache)->Memory().TotalBytes()), (*plan)->Bytes(n)) << "at " << n << " cells";
  };
  write(37);
  write(50);
  for (int i = 0; i < 260; ++i) write(1);
  EXPECT_GT((*plan)->BytesPerToken(), 0);
}

TEST(KvPlan, UpperBoundForEveryCodec) {
  for (const auto& c : kv::RegisteredCodecs()) CheckBound(c.name, 0, {});
  for (const auto& [alias, spec] : kv::CodecAliases()) CheckBound(alias, 0, {});
}

TEST(KvPlan, UpperBoundWithSinksAndStatistics) {
  kv::AttnStatsRequest stats;
  stats.accumulate = true;
  stats.obs_window = 8;
  for (const char* c : {"f16", "q4_0", "kivi2", "turbo3", "kivi:bits=4,group=32,residual=200"}) {
    CheckBound(c, 4, stats);
  }
}

}  // namespace
}  // namespace kvc::engine
