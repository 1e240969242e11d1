// Positions after eviction (spec §0.1): a kept span attends identically whether it sits at
// positions 0..S−1 or P..P+S−1, in every position mode; TruncateAfter continues positions.
#include <gtest/gtest.h>

#include <cmath>
#include <numeric>
#include <random>
#include <vector>

#include "kv/cache.h"
#include "kv/policies/common.h"
#include "per_target.h"

namespace kvc::kv {
namespace {

KvShape Shape() {
  KvShape s;
  s.n_layer = 1;
  s.n_head = 6;
  s.n_head_kv = 2;
  s.head_dim = 64;
  s.rope.theta = 10000.0;
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

std::unique_ptr<KvCache> Make(PositionMode m) {
  KvCacheConfig cfg;
  cfg.k_codec = cfg.v_codec = "f32";
  cfg.position_mode = m;
  auto c = KvCache::Create(Shape(), cfg);
  EXPECT_TRUE(c.ok()) << c.status().ToString();
  return std::move(c).value();
}

// Writes tokens [from, to) of k/v ([n, n_head_kv, hd]) with seq numbers seq0 + (i - from).
void WriteRange(KvCache& c, const std::vector<float>& k, const std::vector<float>& v, int from,
                int to, int64_t seq0) {
  const auto s = Shape();
  const size_t row = size_t(s.n_head_kv) * s.head_dim;
  std::vector<int64_t> seq(to - from);
  std::iota(seq.begin(), seq.end(), seq0);
  ASSERT_TRUE(c.Write(0, seq.data(), to - from, k.data() + from * row, v.data() + from * row).ok());
}

void KeepAll(KvCache& c, const std::vector<int32_t>& keep) {
  for (int h = 0; h < Shape().n_head_kv; ++h) ASSERT_TRUE(ApplyKeep(c, 0, h, keep).ok());
}

constexpr int kP = 300, kS = 128;

// Cache B: only the S kept tokens, at positions 0..S−1, then the query token at S.
std::vector<float> Baseline(const std::vector<float>& k, const std::vector<float>& v,
                            const std::vector<int>& kept_src, const std::vector<float>& q) {
  const auto s = Shape();
  const size_t row = size_t(s.n_head_kv) * s.head_dim;
  std::vector<float> kk, vv;
  for (int i : kept_src) {
    kk.insert(kk.end(), k.begin() + i * row, k.begin() + (i + 1) * row);
    vv.insert(vv.end(), v.begin() + i * row, v.begin() + (i + 1) * row);
  }
  auto b = Make(PositionMode::kOriginal);
  WriteRange(*b, kk, vv, 0, int(kept_src.size()), 0);
  const int n = int(kept_src.size());
  const int64_t qs = n;
  // Query token's own K/V (last row of k/v).
  const int last = int(k.size() / row) - 1;
  std::vector<float> kq(k.begin() + last * row, k.end()), vq(v.begin() + last * row, v.end());
  EXPECT_TRUE(b->Write(0, &qs, 1, kq.data(), vq.data()).ok());
  std::vector<float> out(size_t(s.n_head) * s.head_dim);
  b->Attend(0, q.data(), &qs, 1, out.data());
  return out;
}

void ExpectNear(const std::vector<float>& a, const std::vector<float>& b, float tol) {
  ASSERT_EQ(a.size(), b.size());
  float worst = 0;
  for (size_t i = 0; i < a.size(); ++i) worst = std::max(worst, std::fabs(a[i] - b[i]));
  EXPECT_LE(worst, tol);
}

struct Case {
  PositionMode mode;
  bool middle;  // evict a middle span (keep 64 first + 64 last) instead of the prefix
};

class EvictedSpan : public ::testing::TestWithParam<Case> {};

TEST_P(EvictedSpan, AttentionIndependentOfAbsolutePosition) {
  const auto s = Shape();
  const Case cs = GetParam();
  const int n = kP + kS + 1;  // + the query token
  const size_t row = size_t(s.n_head_kv) * s.head_dim;
  auto k = Randn(n * row, 1), v = Randn(n * row, 2), q = Randn(size_t(s.n_head) * s.head_dim, 3);
  std::vector<int> kept_src;
  std::vector<int32_t> keep;
  for (int i = 0; i < kP + kS; ++i) {
    const bool kept = cs.middle ? (i < kS / 2 || i >= kP + kS / 2) : i >= kP;
    if (kept) {
      kept_src.push_back(i);
      keep.push_back(int32_t(i));
    }
  }
  ASSERT_EQ(int(keep.size()), kS);
  auto a = Make(cs.mode);
  WriteRange(*a, k, v, 0, kP + kS, 0);
  KeepAll(*a, keep);
  const int64_t qs = kP + kS;
  EXPECT_TRUE(a->Write(0, &qs, 1, k.data() + (n - 1) * row, v.data() + (n - 1) * row).ok());
  std::vector<float> out(size_t(s.n_head) * s.head_dim);
  a->Attend(0, q.data(), &qs, 1, out.data());
  const auto ref = Baseline(k, v, kept_src, q);
  if (cs.mode == PositionMode::kOriginal && cs.middle) {
    // Gaps change relative distances: the outputs must differ (the test can fail).
    float diff = 0;
    for (size_t i = 0; i < out.size(); ++i) diff = std::max(diff, std::fabs(out[i] - ref[i]));
    EXPECT_GT(diff, 1e-4f);
  } else {
    ExpectNear(out, ref, 1e-5f);
  }
  if (cs.mode == PositionMode::kRerotateOnce) {
    // Next token's position counts kept tokens, not consumed ones.
    EXPECT_EQ(a->positions(0, 0).back(), kS);
  }
}

INSTANTIATE_TEST_SUITE_P(Modes, EvictedSpan,
                         ::testing::Values(Case{PositionMode::kOriginal, false},
                                           Case{PositionMode::kOriginal, true},
                                           Case{PositionMode::kInCache, false},
                                           Case{PositionMode::kInCache, true},
                                           Case{PositionMode::kRerotateOnce, false},
                                           Case{PositionMode::kRerotateOnce, true}));

TEST(Positions, TruncateAfterContinuesPositions) {
  const auto s = Shape();
  const size_t row = size_t(s.n_head_kv) * s.head_dim;
  auto k = Randn(20 * row, 4), v = Randn(20 * row, 5);
  auto c = Make(PositionMode::kOriginal);
  WriteRange(*c, k, v, 0, 15, 0);    // context 0..9, question 10..14
  ASSERT_TRUE(c->TruncateAfter(9).ok());
  EXPECT_EQ(c->n_cells(0, 0), 10);
  WriteRange(*c, k, v, 15, 18, 15);  // second question gets seq 15.. but positions 10..
  EXPECT_EQ(c->positions(0, 1)[10], 10);
  EXPECT_EQ(c->positions(0, 1)[12], 12);
  EXPECT_EQ(c->seqs(0, 1)[10], 15);
}

TEST(Positions, TruncateThenAttendEqualsFreshCache) {
  const auto s = Shape();
  const size_t row = size_t(s.n_head_kv) * s.head_dim;
  auto k = Randn(40 * row, 6), v = Randn(40 * row, 7), q = Randn(size_t(s.n_head) * s.head_dim, 8);
  auto a = Make(PositionMode::kOriginal);
  WriteRange(*a, k, v, 0, 30, 0);     // context 0..19 + question A 20..29
  ASSERT_TRUE(a->TruncateAfter(19).ok());
  // Question B = source rows 30..34, consumed as seq 30..34.
  WriteRange(*a, k, v, 30, 35, 30);
  auto b = Make(PositionMode::kOriginal);
  WriteRange(*b, k, v, 0, 20, 0);
  WriteRange(*b, k, v, 30, 35, 20);
  std::vector<float> oa(size_t(s.n_head) * s.head_dim), ob(oa.size());
  const int64_t qa = 34, qb = 24;
  a->Attend(0, q.data(), &qa, 1, oa.data());
  b->Attend(0, q.data(), &qb, 1, ob.data());
  ExpectNear(oa, ob, 1e-6f);
}

}  // namespace
}  // namespace kvc::kv

KVC_PER_TARGET_SUITE(PositionsSimd);  // once per Highway target (per_target.h)

// The cos/sin table (used by caches that store pre-RoPE keys) must give the same bits as the
// direct double-angle path, inside the table, at its edge and beyond it.
TEST_P(PositionsSimd, RopeTableBitIdenticalToDirectPath) {
  for (bool neox : {false, true}) {
    kvc::kv::RopeParams p;
    p.n_rot = 64;
    p.neox = neox;
    p.theta = 100000.0;
    const kvc::kv::Rope direct(p), table(p, 1000);
    std::mt19937 rng(7);
    std::normal_distribution<float> nd;
    const int64_t positions[] = {0, 1, 17, 999, 1000, 1001, 123456789, -5};
    for (int64_t pos : positions) {
      std::vector<float> a(64), b;
      for (float& x : a) x = nd(rng);
      b = a;
      direct.ApplySame(a.data(), 1, 64, pos);
      table.ApplySame(b.data(), 1, 64, pos);
      for (int i = 0; i < 64; ++i) ASSERT_EQ(a[i], b[i]) << "pos " << pos << " dim " << i;
    }
  }
}

// q·R(pos)μ from the cos/sin table (centred post-RoPE keys) equals rotating μ and dotting, for
// both pair layouts, a partial rotation (rot_offset / n_rot < dim), runs of consecutive positions,
// gaps, and positions outside the table.
TEST_P(PositionsSimd, AddDotRotatedEqualsRotateThenDot) {
  std::mt19937 rng(11);
  std::normal_distribution<float> nd;
  for (bool neox : {false, true}) {
    for (int rot_offset : {0, 16}) {
      kvc::kv::RopeParams p;
      p.n_rot = rot_offset ? 32 : 64;
      p.rot_offset = rot_offset;
      p.neox = neox;
      const kvc::kv::Rope rope(p, 1000);
      const int dim = 64, n_q = 3;
      std::vector<float> q(size_t(n_q) * dim), mu(dim);
      for (float& x : q) x = nd(rng);
      for (float& x : mu) x = nd(rng);
      const std::vector<int64_t> pos = {0, 1, 2, 3, 10, 11, 500, 998, 999, 1000, 1001, 5, 123456789, -3};
      const int64_t n = int64_t(pos.size()), ld = n + 2;
      std::vector<float> s(size_t(n_q) * ld, 0.25f), ref(s);
      rope.AddDotRotated(q.data(), n_q, dim, mu.data(), pos.data(), n, s.data(), ld);
      for (int64_t j = 0; j < n; ++j) {
        std::vector<float> m(mu);
        rope.Apply(m.data(), 1, dim, &pos[j]);
        for (int r = 0; r < n_q; ++r) {
          double d = 0;
          for (int c = 0; c < dim; ++c) d += double(q[r * dim + c]) * m[c];
          ref[r * ld + j] += float(d);
        }
      }
      for (size_t i = 0; i < s.size(); ++i) {
        ASSERT_NEAR(s[i], ref[i], 1e-4 * (1 + std::fabs(ref[i]))) << "neox " << neox << " i " << i;
      }
    }
  }
}
