// Eviction policies: selection rule with scripted scores, budgets (absolute / ratio, tiny prompts),
// memory bound under a budget, composition, spec errors, determinism across thread counts.
#include <gtest/gtest.h>
#include <omp.h>

#include <numeric>
#include <random>
#include <vector>

#include "kv/cache.h"
#include "kv/policies/common.h"
#include "kv/policies/pyramid.h"
#include "kv/policy.h"

namespace kvc::kv {
namespace {

KvShape Shape(int n_layer = 2) {
  KvShape s;
  s.n_layer = n_layer;
  s.n_head = 6;
  s.n_head_kv = 3;
  s.head_dim = 64;
  s.rope.theta = 100000.0;
  s.rope.n_rot = 64;
  s.rope.neox = true;
  return s;
}

std::vector<float> Randn(size_t n, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> nd(0.f, 1.f);
  std::vector<float> v(n);
  for (auto& x : v) x = nd(rng);
  return v;
}

// Drives a cache the way Session does: BeforeWrite, Write + Attend on every layer, then
// AfterPrefill (n > 1) or AfterStep.
struct Driver {
  KvShape shape;
  std::unique_ptr<KvCache> cache;
  std::unique_ptr<EvictionPolicy> policy;
  int64_t next = 0;
  uint32_t seed = 11;

  static Driver Make(const std::string& spec, const std::string& codec = "f16", int n_layer = 2) {
    Driver d;
    d.shape = Shape(n_layer);
    auto p = MakePolicy(spec, d.shape);
    EXPECT_TRUE(p.ok()) << p.status().ToString();
    d.policy = std::move(p).value();
    KvCacheConfig cfg;
    cfg.k_codec = cfg.v_codec = codec;
    if (d.policy) cfg.position_mode = d.policy->position_mode();
    auto c = KvCache::Create(d.shape, cfg);
    EXPECT_TRUE(c.ok()) << c.status().ToString();
    d.cache = std::move(c).value();
    if (d.policy) d.cache->SetStatsRequest(d.policy->StatsNeeded());
    return d;
  }
  Status Feed(int n) {
    KVC_RETURN_IF_ERROR(Forward(n));
    if (!policy) return Status::Ok();
    return n > 1 ? policy->AfterPrefill(*cache, n) : policy->AfterStep(*cache);
  }
  // BeforeWrite, then Write + Attend on every layer (no AfterPrefill/AfterStep).
  Status Forward(int n) {
    if (policy) KVC_RETURN_IF_ERROR(policy->BeforeWrite(*cache, n));
    const size_t row = size_t(shape.n_head_kv) * shape.head_dim;
    auto k = Randn(n * row, seed++), v = Randn(n * row, seed++);
    auto q = Randn(size_t(n) * shape.n_head * shape.head_dim, seed++);
    std::vector<int64_t> seq(n);
    std::iota(seq.begin(), seq.end(), next);
    std::vector<float> out(size_t(n) * shape.n_head * shape.head_dim);
    for (int l = 0; l < shape.n_layer; ++l) {
      KVC_RETURN_IF_ERROR(cache->Write(l, seq.data(), n, k.data(), v.data()));
      cache->Attend(l, q.data(), seq.data(), n, out.data());
    }
    next += n;
    return Status::Ok();
  }
};

TEST(SelectKeep, TiesEvictOldestAndProtections) {
  const std::vector<float> s = {1, 1, 1, 1, 1, 1};
  EXPECT_EQ(SelectKeep(s.data(), 6, 3, 0, 0), (std::vector<int32_t>{3, 4, 5}));
  const std::vector<float> t = {5, 0, 3, 9, 1, 0};
  EXPECT_EQ(SelectKeep(t.data(), 6, 3, 0, 0), (std::vector<int32_t>{0, 2, 3}));
  // Window 0 protects nothing: the newest (score 0) goes.
  EXPECT_EQ(SelectKeep(t.data(), 6, 2, 0, 0), (std::vector<int32_t>{0, 3}));
  EXPECT_EQ(SelectKeep(t.data(), 6, 3, 0, 1), (std::vector<int32_t>{0, 3, 5}));
  EXPECT_EQ(SelectKeep(t.data(), 6, 3, 1, 1), (std::vector<int32_t>{0, 3, 5}));
  EXPECT_EQ(SelectKeep(t.data(), 6, 3, 2, 1), (std::vector<int32_t>{0, 1, 5}));
  EXPECT_TRUE(SelectKeep(t.data(), 6, 0, 2, 2).empty());
  EXPECT_EQ(SelectKeep(t.data(), 6, 10, 0, 0).size(), 6u);
}

TEST(Budget, TinyPromptsKeepOneUnlessAskedForNone) {
  for (double r : {0.6, 0.95, 1.0}) {
    Budget b;
    b.ratio = r;
    EXPECT_EQ(b.Kept(0), 0);
    for (int n = 1; n <= 3; ++n) {
      if (r == 1.0) EXPECT_EQ(b.Kept(n), 0);
      else EXPECT_GE(b.Kept(n), 1) << "n=" << n << " r=" << r;
      EXPECT_LE(b.Kept(n), n);
    }
  }
  Budget a;
  a.ratio = 0.5;
  EXPECT_EQ(a.Kept(256), 128);
  EXPECT_EQ(a.Kept(7), 3);
}

TEST(Policies, TinyPromptsThroughThePolicy) {
  for (const char* spec : {"knorm:ratio=0.6", "knorm:ratio=0.95", "snapkv:ratio=0.95,window=0",
                           "knorm:ratio=1.0"}) {
    for (int n = 2; n <= 3; ++n) {
      auto d = Driver::Make(spec);
      ASSERT_TRUE(d.Feed(n).ok());
      const bool none = std::string(spec).find("1.0") != std::string::npos;
      for (int h = 0; h < 3; ++h) {
        if (none) EXPECT_EQ(d.cache->n_cells(0, h), 0) << spec;
        else EXPECT_GE(d.cache->n_cells(0, h), 1) << spec;
      }
    }
  }
  auto d = Driver::Make("snapkv:ratio=0.5");
  EXPECT_FALSE(d.policy->AfterPrefill(*d.cache, 0).ok());  // empty prompt is an error
}

TEST(Policies, BudgetLargerThanPromptLeavesLayerUntouched) {
  auto d = Driver::Make("pyramid:budget=1024");
  ASSERT_TRUE(d.Feed(100).ok());
  for (int l = 0; l < 2; ++l) {
    for (int h = 0; h < 3; ++h) EXPECT_EQ(d.cache->n_cells(l, h), 100);
  }
  EXPECT_EQ(d.cache->positions(1, 2).back(), 99);
}

TEST(Policies, H2oScriptedScores) {
  auto d = Driver::Make("h2o:heavy=2,recent=2");
  ASSERT_TRUE(d.Feed(3).ok());  // under budget 4
  EXPECT_EQ(d.cache->n_cells(0, 0), 3);
  // Script the accumulated scores, then one decode step: evict-for-space before writing.
  for (int l = 0; l < 2; ++l) {
    for (int h = 0; h < 3; ++h) d.cache->acc_scores(l, h) = {0.5f, 9.f, 0.1f};
  }
  ASSERT_TRUE(d.Feed(1).ok());  // 4 cells: fits
  for (int l = 0; l < 2; ++l) {
    for (int h = 0; h < 3; ++h) d.cache->acc_scores(l, h) = {0.5f, 9.f, 0.1f, 0.2f};
  }
  ASSERT_TRUE(d.Feed(1).ok());  // must drop one of {0, 1} (2, 3 are recent): seq 0 (0.5 < 9)
  EXPECT_EQ(d.cache->seqs(0, 0), (std::vector<int64_t>{1, 2, 3, 4}));
}

TEST(Policies, MemoryNeverExceedsBudgetBytes) {
  omp_set_num_threads(1);  // 1,000 tiny steps: thread start-up would dominate
  for (const char* spec : {"streaming:sink=4,window=60", "h2o:heavy=32,recent=32", "tova:budget=64",
                           "tova:budget=100", "snapkv:budget=64,when=step"}) {
    for (const char* codec : {"f16", "q8_0"}) {
      auto d = Driver::Make(spec, codec, /*n_layer=*/1);
      const int64_t budget = std::string(spec).find("100") != std::string::npos ? 100 : 64;
      ASSERT_TRUE(d.Feed(16).ok());
      const auto& kc = d.cache->body_codec(0, KvKind::kKey);
      const size_t per_token = size_t(d.shape.n_layer) * d.shape.n_head_kv * 2 * kc.BlockBytes();
      for (int step = 0; step < 1000; ++step) {
        ASSERT_TRUE(d.Feed(1).ok()) << spec;
        const auto mem = d.cache->Memory();
        ASSERT_LE(mem.KvBytes(), per_token * budget) << spec << " " << codec << " step " << step;
        ASSERT_LE(d.cache->n_cells(0, 2), budget);
      }
      EXPECT_EQ(d.cache->n_cells(0, 0), budget) << spec;
    }
  }
  omp_set_num_threads(2);
}

// TOVA (kvpress TOVAPress): one decision per layer from the last query's attention averaged over
// all query heads; every KV head keeps the same cells. Regression: compressing head 0 first made
// the later heads fall back to their own group's scores (3 different kept sets per layer).
TEST(Policies, TovaKeepsOneSetPerLayerFromTheHeadMean) {
  for (const char* spec : {"tova:ratio=0.5,when=prefill,once=1", "tova:budget=40"}) {
    auto d = Driver::Make(spec);
    ASSERT_TRUE(d.Forward(100).ok());
    std::vector<std::vector<int32_t>> want(2);
    for (int l = 0; l < 2; ++l) {
      std::vector<float> mean(100, 0.f);
      for (int h = 0; h < 3; ++h) {
        const auto& obs = d.cache->obs_scores(l, h);
        ASSERT_EQ(obs.size(), 100u);
        for (int i = 0; i < 100; ++i) mean[i] += obs[i] / 3.f;
      }
      want[l] = SelectKeep(mean.data(), 100, std::string(spec).find("40") != std::string::npos ? 40 : 50, 0, 0);
    }
    ASSERT_TRUE(d.policy->AfterPrefill(*d.cache, 100).ok());
    for (int l = 0; l < 2; ++l) {
      std::vector<int64_t> w(want[l].begin(), want[l].end());
      for (int h = 0; h < 3; ++h) EXPECT_EQ(d.cache->seqs(l, h), w) << spec << " layer " << l << " head " << h;
    }
    // Decode steps (step mode evicts for space): the heads stay identical.
    for (int i = 0; i < 5; ++i) ASSERT_TRUE(d.Feed(1).ok());
    for (int l = 0; l < 2; ++l) {
      EXPECT_EQ(d.cache->seqs(l, 1), d.cache->seqs(l, 0)) << spec;
      EXPECT_EQ(d.cache->seqs(l, 2), d.cache->seqs(l, 0)) << spec;
    }
  }
}

TEST(Policies, ComposedHalvesRemoveThreeQuarters) {
  auto d = Driver::Make("knorm:ratio=0.5+snapkv:ratio=0.5,window=8");
  ASSERT_TRUE(d.Feed(256).ok());
  EXPECT_NEAR(RemovedFraction(*d.cache), 0.75, 1e-9);
  EXPECT_EQ(d.cache->n_cells(1, 1), 64);
}

TEST(Policies, OnceCompressesOnlyTheFirstPrompt) {
  auto d = Driver::Make("knorm:ratio=0.5,once=1");
  ASSERT_TRUE(d.Feed(64).ok());
  ASSERT_TRUE(d.Feed(8).ok());
  EXPECT_EQ(d.cache->n_cells(0, 0), 32 + 8);
  auto e = Driver::Make("knorm:ratio=0.5");  // default: every prompt compresses (compounds)
  ASSERT_TRUE(e.Feed(64).ok());
  ASSERT_TRUE(e.Feed(8).ok());
  EXPECT_EQ(e.cache->n_cells(0, 0), 20);
}

TEST(Policies, AdaKvRaggedHeadsFreeBytes) {
  auto full = Driver::Make("");
  ASSERT_TRUE(full.Feed(200).ok());
  auto d = Driver::Make("adakv:base=snapkv,budget=50,window=4");
  ASSERT_TRUE(d.Feed(200).ok());
  for (int l = 0; l < 2; ++l) {
    int64_t total = 0;
    for (int h = 0; h < 3; ++h) {
      total += d.cache->n_cells(l, h);
      EXPECT_GE(d.cache->n_cells(l, h), 4 + 10);  // window + floor ceil(0.2 * 50)
    }
    EXPECT_EQ(total, 150);
  }
  EXPECT_NEAR(double(d.cache->Memory().KvBytes()) / full.cache->Memory().KvBytes(), 0.25, 0.02);
}

TEST(Policies, PyramidScheduleMeanIsBudget) {
  int64_t sum = 0;
  for (int l = 0; l < 30; ++l) {
    const int64_t b = PyramidLayerBudget(l, 30, 4096, 1024, 32, 20);
    if (l > 0) {
      EXPECT_LE(b, PyramidLayerBudget(l - 1, 30, 4096, 1024, 32, 20));
    }
    sum += b;
  }
  EXPECT_NEAR(double(sum) / 30, 1024, 1.0);
  EXPECT_EQ(PyramidLayerBudget(3, 30, 100, 5, 32, 20), 5);  // infeasible: uniform
}

TEST(Policies, DeterministicAcrossRunsAndThreads) {
  std::vector<std::vector<int64_t>> kept;
  for (int threads : {1, 2, 1}) {
    omp_set_num_threads(threads);
    auto d = Driver::Make("h2o:heavy=0.25,recent=0.25");
    EXPECT_TRUE(d.Feed(150).ok());
    for (int i = 0; i < 20; ++i) EXPECT_TRUE(d.Feed(1).ok());
    std::vector<int64_t> all;
    for (int l = 0; l < 2; ++l) {
      for (int h = 0; h < 3; ++h) {
        all.insert(all.end(), d.cache->seqs(l, h).begin(), d.cache->seqs(l, h).end());
      }
    }
    kept.push_back(all);
  }
  omp_set_num_threads(2);
  EXPECT_EQ(kept[0], kept[1]);
  EXPECT_EQ(kept[0], kept[2]);
  EXPECT_EQ(kept[0].size(), size_t(2 * 3 * 74));  // 37 heavy + 37 recent per head
}

TEST(Policies, BadSpecsAreErrors) {
  const auto s = Shape();
  for (const char* bad : {"snapkv", "snapkv:budget=10,ratio=0.5", "snapkv:ratio=1.5",
                          "snapkv:budget=64,kernel=4", "streaming:sink=0,window=0",
                          "h2o:heavy=-1", "knorm:ratio=0.5,bogus=1", "adakv:base=streaming",
                          "tova:budget=8,when=sometimes", "knorm:every=8", "nosuch:budget=1",
                          "knorm:ratio=0.5+", "knorm:ratio=0.5,pos=sideways"}) {
    EXPECT_FALSE(MakePolicy(bad, s).ok()) << bad;
  }
  for (const char* good : {"streaming:sink=4,window=1020", "h2o:heavy=0.1,recent=0.1",
                           "snapkv:budget=1024,window=32,kernel=7", "pyramid:budget=1024",
                           "tova:budget=1024", "knorm:ratio=0.5", "adakv:base=snapkv,budget=256",
                           "knorm:every=64,target=256", "snapkv:ratio=0.5,pos=rerotate"}) {
    auto p = MakePolicy(good, s);
    EXPECT_TRUE(p.ok()) << good << ": " << p.status().ToString();
  }
}

TEST(Policies, RerotateKeepsContiguousPositions) {
  auto d = Driver::Make("knorm:ratio=0.5,pos=rerotate");
  ASSERT_TRUE(d.Feed(64).ok());
  const auto& pos = d.cache->positions(0, 1);
  ASSERT_EQ(pos.size(), 32u);
  for (size_t i = 0; i < pos.size(); ++i) EXPECT_EQ(pos[i], int64_t(i));
  ASSERT_TRUE(d.Feed(1).ok());
  EXPECT_EQ(d.cache->positions(0, 1).back(), 32);  // next token continues at the kept count
}

}  // namespace
}  // namespace kvc::kv
