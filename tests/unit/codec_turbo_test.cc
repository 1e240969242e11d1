// TurboQuant: bytes from the descriptor, distortion vs the Lloyd–Max table, fused scoring vs
// decode-then-dot, unbiasedness of the prod variant over seeds, spec errors.
#include <gtest/gtest.h>

#include <cmath>
#include <random>

#include "kv/codec.h"
#include "kv/codecs/lloyd_max.h"
#include "per_target.h"

namespace kvc::kv {
namespace {

std::vector<float> Randn(size_t n, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> nd;
  std::vector<float> v(n);
  for (auto& x : v) x = nd(rng);
  return v;
}

std::unique_ptr<Codec> Make(const std::string& spec, uint64_t seed = 1, int layer = 3,
                            KvKind kind = KvKind::kKey) {
  CodecContext ctx;
  ctx.dim = 64;
  ctx.seed = seed;
  ctx.layer = layer;
  ctx.n_layer = 30;
  ctx.kind = kind;
  auto c = MakeCodec(spec, ctx);
  EXPECT_TRUE(c.ok()) << spec << ": " << c.status().ToString();
  return c.ok() ? std::move(c).value() : nullptr;
}

// Fused Score and AccumulateWeighted agree with decode-then-dot / decode-then-axpy.
void CheckFused(Codec& c, uint32_t seed) {
  const int d = c.dim(), nq = 3;
  auto x = Randn(d, seed);
  std::vector<uint8_t> blk(c.BlockBytes());
  c.Encode(x.data(), blk.data());
  std::vector<float> xh(d);
  c.Decode(blk.data(), xh.data());
  auto q = Randn(size_t(nq) * d, seed + 1);
  std::vector<float> qp(size_t(nq) * c.PreparedQueryDim()), s(nq);
  c.PrepareQuery(q.data(), nq, qp.data());
  c.Score(qp.data(), nq, blk.data(), s.data());
  std::vector<float> p = {0.5f, -0.25f, 0.f}, out(size_t(nq) * d, 0.f);
  c.AccumulateWeighted(p.data(), nq, blk.data(), out.data());
  for (int r = 0; r < nq; ++r) {
    double ref = 0;
    for (int j = 0; j < d; ++j) ref += double(q[r * d + j]) * xh[j];
    EXPECT_NEAR(s[r], ref, 1e-4 * (1 + std::fabs(ref))) << c.Name() << " row " << r;
    for (int j = 0; j < d; ++j) EXPECT_NEAR(out[r * d + j], p[r] * xh[j], 1e-5) << c.Name();
  }
}

TEST(Turbo, BytesMatchFormat) {
  struct Case { const char* spec; size_t bytes; double bpv; };
  const Case cases[] = {
      {"turbo2", 2 + 16, 2.25},         {"turbo3", 2 + 24, 3.25},        {"turbo4", 2 + 32, 4.25},
      {"turbo2.5", 4 + 20, 3.0},        {"turbo3.5", 4 + 28, 4.0},
      {"turbo:bits=3,variant=prod", 4 + 24, 3.5},
      {"turbo:bits=2.5,variant=prod", 8 + 20, 3.5},
      {"turbo:bits=4,split=8", 4 + 32, 4.5},
  };
  for (const auto& cs : cases) {
    auto c = Make(cs.spec);
    ASSERT_TRUE(c);
    EXPECT_EQ(c->BlockBytes(), cs.bytes) << cs.spec;
    EXPECT_DOUBLE_EQ(c->BitsPerValue(), cs.bpv) << cs.spec;
  }
}

TEST(Turbo, DistortionMatchesTable) {
  // Unit vectors: E‖x − x̂‖² ≈ d·C(f_d, b) (fp16 norm adds ~1e-7).
  for (int b = 2; b <= 4; ++b) {
    double err = 0;
    const int n = 400;
    for (int t = 0; t < n; ++t) {
      auto c = Make("turbo:bits=" + std::to_string(b), 100 + t);
      auto x = Randn(64, t);
      double nn = 0;
      for (float v : x) nn += v * v;
      for (auto& v : x) v /= float(std::sqrt(nn));
      std::vector<uint8_t> blk(c->BlockBytes());
      std::vector<float> xh(64);
      c->Encode(x.data(), blk.data());
      c->Decode(blk.data(), xh.data());
      for (int j = 0; j < 64; ++j) err += (x[j] - xh[j]) * (x[j] - xh[j]);
    }
    const double want = 64 * SphereCodebook(64, b).mse;
    EXPECT_NEAR(err / n, want, 0.15 * want) << "bits " << b;
  }
}

KVC_PER_TARGET_SUITE(TurboSimd);  // once per Highway target (per_target.h)

TEST_P(TurboSimd, FusedEqualsDecode) {
  for (const char* spec : {"turbo2", "turbo2.5", "turbo3", "turbo3.5", "turbo4",
                           "turbo:bits=2,variant=prod", "turbo:bits=3,variant=prod",
                           "turbo:bits=2.5,variant=prod", "turbo:bits=4,variant=mse,nc=1",
                           "turbo:bits=3,split=8"}) {
    auto c = Make(spec);
    ASSERT_TRUE(c);
    for (uint32_t s = 0; s < 4; ++s) CheckFused(*c, 10 + s);
  }
}

TEST(Turbo, ProdIsUnbiasedMseShrinks) {
  // Mean over independent rotations/sketches of the fused score ≈ <q, k> for prod; mse at 2 bits
  // shrinks inner products by ≈ (1 − D_mse) = 0.885 (spec §5.2).
  auto k = Randn(64, 1), q = Randn(64, 2);
  for (int j = 0; j < 64; ++j) k[j] += 0.5f * q[j];  // <q, k> clearly non-zero
  double ip = 0;
  for (int j = 0; j < 64; ++j) ip += double(q[j]) * k[j];
  const int n = 1500;
  double mp = 0, mp2 = 0, mm = 0;
  for (int t = 0; t < n; ++t) {
    for (int v = 0; v < 2; ++v) {
      auto c = Make(v ? "turbo:bits=2,variant=mse" : "turbo:bits=2,variant=prod", 1000 + t);
      std::vector<uint8_t> blk(c->BlockBytes());
      c->Encode(k.data(), blk.data());
      std::vector<float> qp(c->PreparedQueryDim());
      float s;
      c->PrepareQuery(q.data(), 1, qp.data());
      c->Score(qp.data(), 1, blk.data(), &s);
      if (v) mm += s; else { mp += s; mp2 += double(s) * s; }
    }
  }
  mp /= n;
  mm /= n;
  const double sd = std::sqrt((mp2 / n - mp * mp) / n);
  EXPECT_NEAR(mp, ip, 4 * sd + 1e-3 * std::fabs(ip)) << "prod mean " << mp << " vs " << ip;
  EXPECT_NEAR(mm / ip, 1 - 64 * SphereCodebook(64, 2).mse, 0.03) << mm << " " << ip << " " << mp;
}

TEST(Turbo, SplitIsFrozenAtFirstEncodeOnRopePairs) {
  auto c = Make("turbo2.5");
  std::vector<float> x(64, 0.01f);
  x[10] = 30.f;  // pair (10, 11) must land in the 3-bit part and be reconstructed well
  std::vector<uint8_t> blk(c->BlockBytes());
  c->Encode(x.data(), blk.data());
  std::vector<float> xh(64);
  c->Decode(blk.data(), xh.data());
  EXPECT_NEAR(xh[10], 30.f, 1.0f);
  // A second vector with a different outlier uses the frozen split: still decodes consistently.
  auto y = Randn(64, 5);
  c->Encode(y.data(), blk.data());
  CheckFused(*c, 77);
}

TEST(Turbo, ZeroVector) {
  auto c = Make("turbo:bits=3,variant=prod");
  std::vector<float> x(64, 0.f), xh(64, 1.f);
  std::vector<uint8_t> blk(c->BlockBytes());
  c->Encode(x.data(), blk.data());
  c->Decode(blk.data(), xh.data());
  for (float v : xh) EXPECT_EQ(v, 0.f);
}

TEST(Turbo, BoundaryLayersUseQ8) {
  auto c0 = Make("turbo:bits=3,boundary=2", 1, 0);
  auto c1 = Make("turbo:bits=3,boundary=2", 1, 29);
  auto c2 = Make("turbo:bits=3,boundary=2", 1, 5);
  EXPECT_EQ(c0->Name(), "q8_0");
  EXPECT_EQ(c1->Name(), "q8_0");
  EXPECT_NE(c2->Name(), "q8_0");
}

TEST(Turbo, BadSpecs) {
  CodecContext ctx;
  ctx.dim = 64;
  for (const char* s : {"turbo:bits=2.3", "turbo:bits=9", "turbo:variant=foo", "turbo:bitz=3",
                        "turbo:bits=1,variant=prod", "turbo:bits=2.5,split=3"}) {
    auto c = MakeCodec(s, ctx);
    EXPECT_FALSE(c.ok()) << s;
    if (!c.ok()) EXPECT_EQ(c.status().code(), StatusCode::kInvalidArgument) << s;
  }
}

}  // namespace
}  // namespace kvc::kv
