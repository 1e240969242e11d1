// eval / retrieval --config: per-layer codec keys (k@L=, v@L=, kv@L=) fill KvCacheConfig's
// k_codec_layer / v_codec_layer, FitLayerOverrides pads them to n_layer, and bad lists are errors.
#include <gtest/gtest.h>

#include <random>

#include "../../tools/cli/lib/runner.h"
#include "kv/cache.h"

namespace kvc {
namespace {

TEST(RunConfig, PerLayerCodecs) {
  auto c = ParseRunConfig("k=f16 v=q8_0 k@3-5=turbo3 v@0,7=q4_0 kv@9=fp8 sinks=1");
  ASSERT_TRUE(c.ok()) << c.status().ToString();
  EXPECT_EQ(c->cache.k_codec, "f16");
  EXPECT_EQ(c->cache.v_codec, "q8_0");
  ASSERT_TRUE(FitLayerOverrides(&*c, 12).ok());
  ASSERT_EQ(c->cache.k_codec_layer.size(), 12u);
  ASSERT_EQ(c->cache.v_codec_layer.size(), 12u);
  for (int l = 0; l < 12; ++l) {
    EXPECT_EQ(c->cache.k_codec_layer[l], (l >= 3 && l <= 5) ? "turbo3" : l == 9 ? "fp8" : "") << l;
    EXPECT_EQ(c->cache.v_codec_layer[l], (l == 0 || l == 7) ? "q4_0" : l == 9 ? "fp8" : "") << l;
  }
  EXPECT_EQ(c->Label(), "K:f16 V:q8_0 K@3-5:turbo3 K@9:fp8 V@0:q4_0 V@7:q4_0 V@9:fp8 sinks:1");
  // A codec spec with its own parameters after the '='.
  auto t = ParseRunConfig("q8_0 k@4=turbo:bits=3,nc=1,center=1");
  ASSERT_TRUE(t.ok()) << t.status().ToString();
  ASSERT_EQ(t->cache.k_codec_layer.size(), 5u);
  EXPECT_EQ(t->cache.k_codec_layer[4], "turbo:bits=3,nc=1,center=1");
  EXPECT_TRUE(t->cache.v_codec_layer.empty());
}

TEST(RunConfig, PerLayerCodecErrors) {
  for (const char* bad : {"k@=q8_0", "k@x=q8_0", "k@5-3=q8_0", "k@-1=q8_0", "k@1,=q8_0",
                          "q@1=q8_0", "k@1=", "k@1-2=q8_0 k@2=q4_0", "kv@1=q8_0 v@1=q4_0"}) {
    EXPECT_FALSE(ParseRunConfig(bad).ok()) << bad;
  }
  auto c = ParseRunConfig("q8_0 k@30=turbo3");
  ASSERT_TRUE(c.ok());
  EXPECT_FALSE(FitLayerOverrides(&*c, 30).ok());  // layers 0-29 only
  EXPECT_TRUE(FitLayerOverrides(&*c, 31).ok());
}

}  // namespace
}  // namespace kvc

namespace kvc {
namespace {

TEST(RunConfig, DemoteAndSinkDetectKeys) {
  auto c = ParseRunConfig("q8_0 evict=tova:ratio=0.75 demote=turbo2 sink_detect=4 sink_detect_layer=3");
  ASSERT_TRUE(c.ok()) << c.status().ToString();
  EXPECT_EQ(c->cache.demote_k_codec, "turbo2");
  EXPECT_EQ(c->cache.demote_v_codec, "turbo2");
  EXPECT_FLOAT_EQ(c->cache.sink_detect, 4.f);
  EXPECT_EQ(c->cache.sink_detect_layer, 3);
  EXPECT_NE(c->Label().find("demote:turbo2"), std::string::npos) << c->Label();
  auto d = ParseRunConfig("f16 demote_k=turbo:bits=2,center=1 demote_v=q4_0");
  ASSERT_TRUE(d.ok());
  EXPECT_EQ(d->cache.demote_k_codec, "turbo:bits=2,center=1");
  EXPECT_EQ(d->cache.demote_v_codec, "q4_0");
  EXPECT_EQ(ParseRunConfig("f16 sink_detect=0.5").status().code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(ParseRunConfig("f16 sink_detect=x").status().code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(ParseRunConfig("f16 sink_detect_layer=-1").status().code(), StatusCode::kInvalidArgument);
}

TEST(RunConfigPreset, ExpandsAndOverrides) {
  ASSERT_GE(KvPresets().size(), 4u);
  for (const char* name : {"kvc4", "kvc3", "kvc2", "kvc-25"}) {
    const KvPreset* p = nullptr;
    for (const auto& x : KvPresets()) if (x.name == name) p = &x;
    ASSERT_NE(p, nullptr) << name;
    auto direct = ParseRunConfig(p->config);
    auto via = ParseRunConfig(std::string("preset=") + name);
    ASSERT_TRUE(direct.ok() && via.ok()) << name;
    EXPECT_EQ(via->cache.k_codec, direct->cache.k_codec);
    EXPECT_EQ(via->cache.v_codec, direct->cache.v_codec);
    EXPECT_EQ(via->cache.k_transform, direct->cache.k_transform);
    EXPECT_EQ(via->cache.sink_tokens, direct->cache.sink_tokens);
    EXPECT_EQ(via->cache.k_codec_layer, direct->cache.k_codec_layer);
    EXPECT_EQ(via->evict, direct->evict);
    EXPECT_EQ(via->Label(), name);
    EXPECT_FALSE(p->summary.empty());
  }
  // Keys after the preset override it; the label says so.
  auto o = ParseRunConfig("preset=kvc3 sinks=4 v=q8_0");
  ASSERT_TRUE(o.ok()) << o.status().ToString();
  EXPECT_EQ(o->cache.sink_tokens, 4);
  EXPECT_EQ(o->cache.v_codec, "q8_0");
  EXPECT_EQ(o->Label(), "kvc3 sinks=4 v=q8_0");
  auto named = ParseRunConfig("name=mine preset=kvc4");
  ASSERT_TRUE(named.ok());
  EXPECT_EQ(named->Label(), "mine");
  // Errors: unknown name (lists the known ones), given twice.
  auto bad = ParseRunConfig("preset=kvc1");
  ASSERT_FALSE(bad.ok());
  EXPECT_NE(std::string(bad.status().message()).find("kvc3"), std::string::npos);
  EXPECT_FALSE(ParseRunConfig("preset=kvc3 preset=kvc4").ok());
  EXPECT_FALSE(ParseRunConfig("preset=").ok());
}


// Every preset stays inside its class on SmolLM2-135M's KV shape at 4,096 tokens, counting all
// allocated bytes (sinks, fp16 windows and tails, scales, norms) as eval does.
TEST(RunConfigPreset, AllInBitsWithinClassAt4096) {
  kv::KvShape s;
  s.n_layer = 30;
  // One KV head per layer (SmolLM2 has 3): every head is stored alike, so the ratio is the same
  // and the test runs 3x faster.
  s.n_head = 3;
  s.n_head_kv = 1;
  s.head_dim = 64;
  s.rope.theta = 100000.0;
  s.rope.n_rot = 64;
  const int n = 4096;
  std::mt19937 rng(1);
  std::normal_distribution<float> nd;
  std::vector<float> k(size_t(n) * 64), v(k.size());
  for (auto& x : k) x = nd(rng);
  for (auto& x : v) x = nd(rng);
  std::vector<int64_t> seq(n);
  for (int i = 0; i < n; ++i) seq[i] = i;
  for (const auto& p : KvPresets()) {
    auto rc = ParseRunConfig("preset=" + p.name);
    ASSERT_TRUE(rc.ok()) << p.name;
    ASSERT_TRUE(FitLayerOverrides(&*rc, s.n_layer).ok()) << p.name;
    ASSERT_TRUE(rc->evict.empty()) << p.name << ": eviction presets need a byte count with the policy";
    auto cache = kv::KvCache::Create(s, rc->cache);
    ASSERT_TRUE(cache.ok()) << p.name << ": " << cache.status().ToString();
    for (int l = 0; l < s.n_layer; ++l) ASSERT_TRUE((*cache)->Write(l, seq.data(), n, k.data(), v.data()).ok());
    (*cache)->Flush();
    const double f16_bytes = 2.0 * s.n_layer * s.n_head_kv * s.head_dim * 2 * n;
    const double bits = 16.0 * double((*cache)->Memory().KvBytes()) / f16_bytes;
    std::printf("%-7s %.4f bits/value all in (class <= %.2f)\n", p.name.c_str(), bits, p.bits_limit);
    EXPECT_LE(bits, p.bits_limit) << p.name;
  }
}

}  // namespace
}  // namespace kvc
