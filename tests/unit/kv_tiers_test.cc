// Side tiers of the KV cache: demotion (MiKV, arXiv 2402.18096 §3: cells an eviction policy drops
// are re-encoded at low precision instead of deleted) and activation-found sinks (KVSink, arXiv
// 2508.04257: tokens with a stable tiny value norm pinned at the sink codec). Attention over every
// tier against a scalar reference that decodes each tier; bytes; Keep / TruncateAfter / Clear with
// tiers; bad specs.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <random>
#include <vector>

#include "kv/cache.h"
#include "kv/policy.h"
#include "kv/rope.h"

namespace kvc::kv {
namespace {

KvShape Shape(int n_layer = 2) {
  KvShape s;
  s.n_layer = n_layer;
  s.n_head = 6;
  s.n_head_kv = 2;
  s.head_dim = 64;
  s.rope.theta = 10000.0;
  s.rope.n_rot = 64;
  return s;
}

std::vector<float> Randn(size_t n, uint32_t seed, float scale = 1.0f) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> nd(0.f, scale);
  std::vector<float> v(n);
  for (auto& x : v) x = nd(rng);
  return v;
}

// Scalar attention over every tier as DecodeAllTiers returns it (double precision): query rows
// q [n_q, n_head, hd] pre-RoPE at seqs q_seq (RoPE position = seq - shift), causal mask by seq.
std::vector<float> TierReference(const KvCache& c, int layer, const std::vector<float>& q,
                                 const std::vector<int64_t>& q_seq) {
  const KvShape& s = c.shape();
  const int hd = s.head_dim, g = s.n_head / s.n_head_kv, n_q = int(q_seq.size());
  Rope rope(s.rope);
  std::vector<float> out(size_t(n_q) * s.n_head * hd, 0.f);
  for (int kh = 0; kh < s.n_head_kv; ++kh) {
    std::vector<int64_t> seq, pos;
    std::vector<float> k, v;
    c.DecodeAllTiers(layer, kh, &seq, &pos, &k, &v);
    for (int i = 0; i < n_q; ++i) {
      for (int j = 0; j < g; ++j) {
        const int h = kh * g + j;
        std::vector<float> qq(q.begin() + (size_t(i) * s.n_head + h) * hd,
                              q.begin() + (size_t(i) * s.n_head + h + 1) * hd);
        rope.ApplySame(qq.data(), 1, hd, q_seq[i] - c.pos_shift(layer, kh));
        std::vector<double> sc(seq.size(), -1e300);
        double mx = -1e300;
        for (size_t t = 0; t < seq.size(); ++t) {
          if (seq[t] > q_seq[i]) continue;
          double d = 0;
          for (int x = 0; x < hd; ++x) d += double(qq[x]) * k[t * hd + x];
          sc[t] = d / std::sqrt(double(hd));
          mx = std::max(mx, sc[t]);
        }
        double sum = 0;
        for (size_t t = 0; t < seq.size(); ++t) sum += seq[t] > q_seq[i] ? 0 : std::exp(sc[t] - mx);
        for (size_t t = 0; t < seq.size(); ++t) {
          if (seq[t] > q_seq[i]) continue;
          const double p = std::exp(sc[t] - mx) / sum;
          for (int x = 0; x < hd; ++x) out[(size_t(i) * s.n_head + h) * hd + x] += float(p * v[t * hd + x]);
        }
      }
    }
  }
  return out;
}

double MaxAbsDiff(const std::vector<float>& a, const std::vector<float>& b) {
  double m = 0;
  for (size_t i = 0; i < a.size(); ++i) m = std::max(m, double(std::fabs(a[i] - b[i])));
  return m;
}

// Writes tokens [t0, t0+n) to every layer (k, v random; rows of one token per layer differ).
void WriteTokens(KvCache& c, int64_t t0, int n, uint32_t seed, std::vector<int64_t>* seqs = nullptr) {
  const KvShape& s = c.shape();
  std::vector<int64_t> seq(n);
  for (int i = 0; i < n; ++i) seq[i] = t0 + i;
  for (int l = 0; l < s.n_layer; ++l) {
    auto k = Randn(size_t(n) * s.n_head_kv * s.head_dim, seed + 17 * l);
    auto v = Randn(size_t(n) * s.n_head_kv * s.head_dim, seed + 17 * l + 5);
    ASSERT_TRUE(c.Write(l, seq.data(), n, k.data(), v.data()).ok());
  }
  if (seqs) *seqs = seq;
}

// Keeps cells {0, 5, 9, ...} of every head (a scattered set, so the demoted tier is interleaved
// with the kept cells in seq order).
void KeepScattered(KvCache& c) {
  for (int l = 0; l < c.shape().n_layer; ++l) {
    for (int h = 0; h < c.shape().n_head_kv; ++h) {
      std::vector<int32_t> keep;
      for (int32_t i = 0; i < c.n_cells(l, h); ++i) {
        if (i % 5 == 0 || i % 9 == 0 || i + 4 >= c.n_cells(l, h)) keep.push_back(i);
      }
      ASSERT_TRUE(c.Keep(l, h, keep).ok());
    }
  }
}

class TierCodecs : public ::testing::TestWithParam<const char*> {};

// Attention over main + demoted cells equals the scalar reference over the decoded tiers, on the
// fused path (decode: 1 query row) and the tiled path (prefill: 8 rows), with main cells at q8_0
// and demoted ones at the parameter's codec (per-token and block codecs).
TEST_P(TierCodecs, AttentionOverDemotedCellsEqualsScalarReference) {
  KvCacheConfig cfg;
  cfg.k_codec = cfg.v_codec = "q8_0";
  cfg.demote_k_codec = cfg.demote_v_codec = GetParam();
  auto c = KvCache::Create(Shape(), cfg);
  ASSERT_TRUE(c.ok()) << c.status().message();
  KvCache& cache = **c;
  WriteTokens(cache, 0, 100, 1);
  for (int l = 0; l < 2; ++l) {
    std::vector<float> q = Randn(size_t(100) * 6 * 64, 99 + l), out(size_t(100) * 6 * 64);
    std::vector<int64_t> qs(100);
    for (int i = 0; i < 100; ++i) qs[i] = i;
    cache.Attend(l, q.data(), qs.data(), 100, out.data());
  }
  KeepScattered(cache);
  ASSERT_GT(cache.n_demoted(0, 0), 50);
  EXPECT_EQ(cache.n_cells(0, 0) + cache.n_demoted(0, 0), 100);
  // Decode: one row at seq 100 (after writing it).
  WriteTokens(cache, 100, 1, 7);
  for (int l = 0; l < 2; ++l) {
    std::vector<float> q = Randn(size_t(6) * 64, 11 + l), out(size_t(6) * 64);
    std::vector<int64_t> qs = {100};
    cache.Attend(l, q.data(), qs.data(), 1, out.data());
    const auto ref = TierReference(cache, l, q, qs);
    EXPECT_LT(MaxAbsDiff(out, ref), 2e-4) << "decode layer " << l;
  }
  // Prefill: 8 rows at seqs 101..108, tiled path; each row sees only earlier seqs of every tier.
  std::vector<int64_t> qs;
  WriteTokens(cache, 101, 8, 21, &qs);
  for (int l = 0; l < 2; ++l) {
    std::vector<float> q = Randn(size_t(8) * 6 * 64, 31 + l), out(size_t(8) * 6 * 64);
    cache.Attend(l, q.data(), qs.data(), 8, out.data());
    const auto ref = TierReference(cache, l, q, qs);
    EXPECT_LT(MaxAbsDiff(out, ref), 2e-4) << "prefill layer " << l;
  }
}

// The demoted tier's decoded values are the originals at the demote codec's precision: their error
// is bounded and larger than the main codec's (so demotion really re-encodes).
TEST_P(TierCodecs, DemotedCellsKeepSeqPosAndCarryTheCodecError) {
  KvCacheConfig cfg;
  cfg.k_codec = cfg.v_codec = "f16";
  cfg.demote_k_codec = cfg.demote_v_codec = GetParam();
  auto c = KvCache::Create(Shape(1), cfg);
  ASSERT_TRUE(c.ok()) << c.status().message();
  KvCache& cache = **c;
  std::vector<int64_t> seq(64);
  for (int i = 0; i < 64; ++i) seq[i] = i;
  auto k = Randn(64 * 2 * 64, 3), v = Randn(64 * 2 * 64, 4);
  ASSERT_TRUE(cache.Write(0, seq.data(), 64, k.data(), v.data()).ok());
  std::vector<int32_t> keep = {0, 1, 2, 40, 63};
  ASSERT_TRUE(cache.Keep(0, 1, keep).ok());
  EXPECT_EQ(cache.n_cells(0, 1), 5);
  EXPECT_EQ(cache.n_demoted(0, 1), 59);
  EXPECT_EQ(cache.n_demoted(0, 0), 0);  // the other head is untouched
  std::vector<int64_t> s2, p2;
  std::vector<float> kk, vv;
  cache.DecodeAllTiers(0, 1, &s2, &p2, &kk, &vv);
  ASSERT_EQ(s2.size(), 64u);
  double err = 0, norm = 0;
  for (size_t t = 0; t < s2.size(); ++t) {
    EXPECT_EQ(s2[t], p2[t]);  // original positions kept
    if (t < 5) continue;      // main cells (f16)
    for (int x = 0; x < 64; ++x) {
      const double d = vv[t * 64 + x] - v[(size_t(s2[t]) * 2 + 1) * 64 + x];
      err += d * d;
      norm += double(v[(size_t(s2[t]) * 2 + 1) * 64 + x]) * v[(size_t(s2[t]) * 2 + 1) * 64 + x];
    }
  }
  const double rel = std::sqrt(err / norm);
  EXPECT_GT(rel, 1e-3);  // really re-encoded (f16 alone is ~1e-4)
  EXPECT_LT(rel, 0.6);
  std::vector<int64_t> sorted(s2);
  std::sort(sorted.begin(), sorted.end());
  for (int i = 0; i < 64; ++i) EXPECT_EQ(sorted[i], i);  // no token lost
}

INSTANTIATE_TEST_SUITE_P(Demote, TierCodecs,
                         ::testing::Values("turbo2", "q4_0", "kivi:bits=2,group=32,residual=0"));

TEST(KvTiers, DemotionShrinksBytesAndDropWithoutItFreesMore) {
  auto bytes_after_keep = [](const std::string& demote) {
    KvCacheConfig cfg;
    cfg.k_codec = cfg.v_codec = "f16";
    cfg.demote_k_codec = cfg.demote_v_codec = demote;
    auto c = KvCache::Create(Shape(), cfg);
    EXPECT_TRUE(c.ok()) << c.status().message();
    if (!c.ok()) std::abort();
    WriteTokens(**c, 0, 512, 5);
    const size_t full = (*c)->Memory().KvBytes();
    for (int l = 0; l < 2; ++l) {
      for (int h = 0; h < 2; ++h) {
        std::vector<int32_t> keep;
        for (int i = 0; i < 128; ++i) keep.push_back(i * 4);
        EXPECT_TRUE((*c)->Keep(l, h, keep).ok());
      }
    }
    return std::make_pair(full, (*c)->Memory());
  };
  auto [full, demoted] = bytes_after_keep("turbo2");
  auto [full2, dropped] = bytes_after_keep("");
  EXPECT_EQ(full, full2);
  // f16: 512 tokens x 2 heads x 2 layers x 64 x 2 (K, V) x 2 B = 524,288.
  EXPECT_EQ(full, 524288u);
  EXPECT_EQ(demoted.SideCells(), 2 * 2 * 384);
  EXPECT_EQ(demoted.Cells(), 2 * 2 * 128);
  EXPECT_EQ(dropped.SideCells(), 0);
  // 128 f16 tokens (131,072 B) + 384 turbo2 tokens (2.25 b/v: 18 B per vector -> 55,296 B) plus
  // at most one 64-token growth step of each stream.
  EXPECT_GE(demoted.KvBytes(), 131072u + 55296u);
  EXPECT_LT(demoted.KvBytes(), full * 45 / 100);
  EXPECT_LT(dropped.KvBytes(), demoted.KvBytes());
}

TEST(KvTiers, TruncateAfterDropsLaterCellsOfEveryTierAndClearEmptiesThem) {
  KvCacheConfig cfg;
  cfg.k_codec = cfg.v_codec = "q8_0";
  cfg.demote_k_codec = cfg.demote_v_codec = "q4_0";
  auto c = KvCache::Create(Shape(), cfg);
  ASSERT_TRUE(c.ok());
  KvCache& cache = **c;
  WriteTokens(cache, 0, 60, 9);
  KeepScattered(cache);
  const int64_t demoted_before = cache.n_demoted(0, 0);
  ASSERT_TRUE(cache.TruncateAfter(29).ok());
  // Truncation drops (never demotes) and filters the unsorted demoted tier by seq.
  EXPECT_LT(cache.n_demoted(0, 0), demoted_before);
  for (int l = 0; l < 2; ++l) {
    for (int h = 0; h < 2; ++h) {
      for (int64_t s : cache.seqs(l, h)) EXPECT_LE(s, 29);
      for (int64_t s : cache.demoted_seqs(l, h)) EXPECT_LE(s, 29);
      EXPECT_EQ(cache.n_cells(l, h) + cache.n_demoted(l, h), 30);
    }
  }
  // Attention still matches the reference after truncation (positions continue at 30).
  WriteTokens(cache, 60, 1, 3);
  std::vector<float> q = Randn(6 * 64, 8), out(6 * 64);
  std::vector<int64_t> qs = {60};
  cache.Attend(1, q.data(), qs.data(), 1, out.data());
  EXPECT_LT(MaxAbsDiff(out, TierReference(cache, 1, q, qs)), 2e-4);
  cache.Clear();
  EXPECT_EQ(cache.n_demoted(0, 0), 0);
  EXPECT_EQ(cache.Memory().SideCells(), 0);
  EXPECT_EQ(cache.Memory().KvBytes(), 0u);
}

TEST(KvTiers, RelabelKeepsTheDemotedTierAndWriteChecksEveryTier) {
  KvCacheConfig cfg;
  cfg.demote_k_codec = cfg.demote_v_codec = "q8_0";
  auto c = KvCache::Create(Shape(1), cfg);
  ASSERT_TRUE(c.ok());
  KvCache& cache = **c;
  WriteTokens(cache, 0, 20, 1);
  // Keep nothing but the first cell: every later seq lives in the demoted tier only.
  ASSERT_TRUE(cache.Keep(0, 0, {0}).ok());
  ASSERT_TRUE(cache.Keep(0, 1, {0}).ok());
  EXPECT_EQ(cache.n_demoted(0, 0), 19);
  // A write must still come after every cached seq, demoted ones included.
  auto k = Randn(2 * 64, 1), v = Randn(2 * 64, 2);
  const int64_t stale = 10;
  EXPECT_EQ(cache.Write(0, &stale, 1, k.data(), v.data()).code(), StatusCode::kInvalidArgument);
  // Relabel moves main cells only; attention still matches the reference.
  ASSERT_TRUE(cache.Relabel(0, 0, {0}).ok());
  const int64_t next = 20;
  ASSERT_TRUE(cache.Write(0, &next, 1, k.data(), v.data()).ok());
  std::vector<float> q = Randn(6 * 64, 4), out(6 * 64);
  cache.Attend(0, q.data(), &next, 1, out.data());
  EXPECT_LT(MaxAbsDiff(out, TierReference(cache, 0, q, {next})), 2e-4);
}

TEST(KvTiers, BadSpecsAreInvalidArgument) {
  auto code = [](KvCacheConfig cfg) { return KvCache::Create(Shape(), cfg).status().code(); };
  KvCacheConfig a;
  a.demote_k_codec = "turbo2";  // V missing
  EXPECT_EQ(code(a), StatusCode::kInvalidArgument);
  KvCacheConfig b;
  b.demote_k_codec = b.demote_v_codec = "nosuchcodec";
  auto st = KvCache::Create(Shape(), b).status();
  EXPECT_EQ(st.code(), StatusCode::kInvalidArgument);
  EXPECT_NE(std::string(st.message()).find("demoted tier"), std::string::npos) << st.message();
  KvCacheConfig d;
  d.demote_k_codec = d.demote_v_codec = "q4_0";
  d.position_mode = PositionMode::kInCache;
  EXPECT_EQ(code(d), StatusCode::kInvalidArgument);
  KvCacheConfig e;
  e.sink_detect = 0.5f;  // a ratio must be > 1
  EXPECT_EQ(code(e), StatusCode::kInvalidArgument);
  KvCacheConfig f;
  f.sink_detect = 4;
  f.sink_detect_layer = 7;  // the shape has 2 layers
  EXPECT_EQ(code(f), StatusCode::kInvalidArgument);
}

// A scored policy with demotion: the cells it evicts are in the demoted tier, disjoint from the
// kept ones, and together they are every token consumed.
TEST(KvTiers, PolicyEvictionDemotesInsteadOfDropping) {
  const KvShape s = Shape();
  auto pol = MakePolicy("knorm:budget=16", s);
  ASSERT_TRUE(pol.ok()) << pol.status().message();
  KvCacheConfig cfg;
  cfg.demote_k_codec = cfg.demote_v_codec = "turbo2";
  auto c = KvCache::Create(s, cfg);
  ASSERT_TRUE(c.ok());
  KvCache& cache = **c;
  WriteTokens(cache, 0, 64, 12);
  ASSERT_TRUE((*pol)->AfterPrefill(cache, 64).ok());
  for (int l = 0; l < 2; ++l) {
    for (int h = 0; h < 2; ++h) {
      EXPECT_EQ(cache.n_cells(l, h), 16);
      EXPECT_EQ(cache.n_demoted(l, h), 48);
      std::vector<int64_t> all = cache.seqs(l, h);
      const auto d = cache.demoted_seqs(l, h);
      all.insert(all.end(), d.begin(), d.end());
      std::sort(all.begin(), all.end());
      for (int i = 0; i < 64; ++i) EXPECT_EQ(all[i], i);
    }
  }
}

// KVSink detection: tokens whose value vectors are tiny in 3 consecutive layers are pinned (sink
// codec), from the third such layer on; f16 pinned tier == f16 main cells (attention unchanged).
TEST(KvTiers, TinyValueTokensArePinnedAndAttentionIsUnchanged) {
  const KvShape s = Shape(5);
  KvCacheConfig plain;
  KvCacheConfig det;
  det.sink_detect = 4;
  det.sink_detect_layer = 1;
  auto a = KvCache::Create(s, plain);
  auto b = KvCache::Create(s, det);
  ASSERT_TRUE(a.ok() && b.ok());
  const int n = 200;  // several 64-row tiles
  std::vector<int64_t> seq(n);
  for (int i = 0; i < n; ++i) seq[i] = i;
  for (int l = 0; l < s.n_layer; ++l) {
    auto k = Randn(size_t(n) * 2 * 64, 50 + l), v = Randn(size_t(n) * 2 * 64, 70 + l);
    // Token 0 tiny in every layer; token 13 tiny in layers 1, 2 (two layers: not stable);
    // token 21 tiny in layers 1..3.
    for (int x = 0; x < 128; ++x) {
      v[0 * 128 + x] *= 0.05f;
      k[0 * 128 + x] *= 8.f;  // a sink's key draws most of the attention
      if (l == 1 || l == 2) v[13 * 128 + x] *= 0.05f;
      if (l >= 1 && l <= 3) v[21 * 128 + x] *= 0.05f;
    }
    ASSERT_TRUE((*a)->Write(l, seq.data(), n, k.data(), v.data()).ok());
    ASSERT_TRUE((*b)->Write(l, seq.data(), n, k.data(), v.data()).ok());
    auto q = Randn(size_t(n) * 6 * 64, 90 + l);
    std::vector<float> oa(q.size()), ob(q.size());
    (*a)->Attend(l, q.data(), seq.data(), n, oa.data());
    (*b)->Attend(l, q.data(), seq.data(), n, ob.data());
    EXPECT_LT(MaxAbsDiff(oa, ob), 1e-5) << "layer " << l;
  }
  EXPECT_EQ((*b)->sink_seqs(), (std::vector<int64_t>{0, 21}));
  // Layers 1, 2 build the streak; pinned from layer 3 on.
  EXPECT_EQ((*b)->n_pinned(2, 0), 0);
  EXPECT_EQ((*b)->pinned_seqs(3, 0), (std::vector<int64_t>{0, 21}));
  EXPECT_EQ((*b)->n_cells(3, 0), n - 2);
  // Decode: one more token; pinned cells stay attended, and a policy never sees them.
  const int64_t t = n;
  for (int l = 0; l < s.n_layer; ++l) {
    auto k = Randn(2 * 64, 150 + l), v = Randn(2 * 64, 170 + l);
    ASSERT_TRUE((*a)->Write(l, &t, 1, k.data(), v.data()).ok());
    ASSERT_TRUE((*b)->Write(l, &t, 1, k.data(), v.data()).ok());
    auto q = Randn(6 * 64, 190 + l);
    std::vector<float> oa(q.size()), ob(q.size());
    (*a)->Attend(l, q.data(), &t, 1, oa.data());
    (*b)->Attend(l, q.data(), &t, 1, ob.data());
    EXPECT_LT(MaxAbsDiff(oa, ob), 1e-5) << "decode layer " << l;
  }
  (*b)->Clear();
  EXPECT_TRUE((*b)->sink_seqs().empty());
}

}  // namespace
}  // namespace kvc::kv
