// PolarQuant: 3.875 bits/value, round trip, radius preserved, fused equals decode-then-dot.
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

std::unique_ptr<Codec> Make() {
  CodecContext ctx;
  ctx.dim = 64;
  auto c = MakeCodec("polar", ctx);
  EXPECT_TRUE(c.ok()) << c.status().ToString();
  return std::move(c).value();
}

TEST(Polar, Bytes) {
  auto c = Make();
  EXPECT_EQ(c->BlockBytes(), 31u);
  EXPECT_DOUBLE_EQ(c->BitsPerValue(), 3.875);
  CodecContext ctx;
  ctx.dim = 72;
  EXPECT_EQ(MakeCodec("polar", ctx).status().code(), StatusCode::kUnimplemented);
}

KVC_PER_TARGET_SUITE(PolarSimd);  // once per Highway target (per_target.h)

TEST_P(PolarSimd, RoundTripAndFused) {
  auto c = Make();
  double err = 0, tot = 0;
  for (uint32_t t = 0; t < 200; ++t) {
    auto x = Randn(64, t);
    x[3] *= 20.f;  // an outlier channel: the preconditioner spreads it
    std::vector<uint8_t> blk(c->BlockBytes());
    std::vector<float> xh(64);
    c->Encode(x.data(), blk.data());
    c->Decode(blk.data(), xh.data());
    double nx = 0, nh = 0;
    for (int j = 0; j < 64; ++j) {
      err += (x[j] - xh[j]) * (x[j] - xh[j]);
      tot += x[j] * x[j];
      nx += x[j] * x[j];
      nh += xh[j] * xh[j];
    }
    EXPECT_NEAR(std::sqrt(nh), std::sqrt(nx), 2e-3 * std::sqrt(nx));  // radii exact up to fp16
    auto q = Randn(2 * 64, 1000 + t);
    std::vector<float> qp(2 * 64), s(2);
    c->PrepareQuery(q.data(), 2, qp.data());
    c->Score(qp.data(), 2, blk.data(), s.data());
    for (int r = 0; r < 2; ++r) {
      double ref = 0;
      for (int j = 0; j < 64; ++j) ref += double(q[r * 64 + j]) * xh[j];
      EXPECT_NEAR(s[r], ref, 1e-4 * (1 + std::fabs(ref)));
    }
  }
  // ~3.9-bit angle quantization: relative MSE a few percent (a broken level would give ~1).
  EXPECT_LT(err / tot, 0.05);
  EXPECT_GT(err / tot, 1e-4);
}

}  // namespace
}  // namespace kvc::kv
