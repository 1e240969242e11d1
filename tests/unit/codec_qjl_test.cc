// QJL: bytes, fused ±-accumulate equals decode-then-dot, unbiasedness over seeds, K-only.
#include <gtest/gtest.h>

#include <cmath>
#include <random>

#include "kv/codec.h"
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

std::unique_ptr<Codec> Make(const std::string& spec, uint64_t seed) {
  CodecContext ctx;
  ctx.dim = 64;
  ctx.seed = seed;
  auto c = MakeCodec(spec, ctx);
  EXPECT_TRUE(c.ok()) << c.status().ToString();
  return c.ok() ? std::move(c).value() : nullptr;
}

TEST(Qjl, Bytes) {
  EXPECT_EQ(Make("qjl", 1)->BlockBytes(), 10u);
  EXPECT_DOUBLE_EQ(Make("qjl:m=64", 1)->BitsPerValue(), 1.25);
  EXPECT_DOUBLE_EQ(Make("qjl:m=256", 1)->BitsPerValue(), 4.25);
}

KVC_PER_TARGET_SUITE(QjlSimd);  // once per Highway target (per_target.h)

TEST_P(QjlSimd, FusedEqualsDecode) {
  for (int m : {64, 128, 200}) {
    if (m % 8) continue;
    auto c = Make("qjl:m=" + std::to_string(m), 3);
    auto k = Randn(64, 4), q = Randn(2 * 64, 5);
    std::vector<uint8_t> blk(c->BlockBytes());
    c->Encode(k.data(), blk.data());
    std::vector<float> kh(64), qp(2 * c->PreparedQueryDim()), s(2);
    c->Decode(blk.data(), kh.data());
    c->PrepareQuery(q.data(), 2, qp.data());
    c->Score(qp.data(), 2, blk.data(), s.data());
    for (int r = 0; r < 2; ++r) {
      double ref = 0;
      for (int j = 0; j < 64; ++j) ref += double(q[r * 64 + j]) * kh[j];
      EXPECT_NEAR(s[r], ref, 1e-4 * (1 + std::fabs(ref))) << m;
    }
  }
}

TEST(Qjl, UnbiasedOverSeeds) {
  auto k = Randn(64, 11), q = Randn(64, 12);
  for (int j = 0; j < 64; ++j) k[j] += 0.5f * q[j];  // make <q,k> clearly non-zero
  double ip = 0;
  for (int j = 0; j < 64; ++j) ip += double(q[j]) * k[j];
  const int n = 4000;
  double m1 = 0, m2 = 0;
  for (int t = 0; t < n; ++t) {
    auto c = Make("qjl:m=64", 5000 + t);
    std::vector<uint8_t> blk(c->BlockBytes());
    c->Encode(k.data(), blk.data());
    std::vector<float> qp(64);
    float s;
    c->PrepareQuery(q.data(), 1, qp.data());
    c->Score(qp.data(), 1, blk.data(), &s);
    m1 += s;
    m2 += double(s) * s;
  }
  m1 /= n;
  const double sd = std::sqrt((m2 / n - m1 * m1) / n);
  EXPECT_NEAR(m1, ip, 4 * sd + 2e-3 * std::fabs(ip)) << "mean " << m1 << " vs " << ip;
  // A wrong constant (e.g. the Gaussian sqrt(pi/2)/m with unit rows) would be off by ~8 sd.
  EXPECT_GT(std::fabs(ip), 20 * sd);
}

TEST(Qjl, RefusesValuesAndBadM) {
  CodecContext ctx;
  ctx.dim = 64;
  ctx.kind = KvKind::kValue;
  auto c = MakeCodec("qjl", ctx);
  ASSERT_FALSE(c.ok());
  EXPECT_NE(c.status().message().find("keys only"), std::string::npos);
  ctx.kind = KvKind::kKey;
  EXPECT_FALSE(MakeCodec("qjl:m=60", ctx).ok());
}

}  // namespace
}  // namespace kvc::kv
