// fp8 E4M3 conversions against an exhaustive nearest-value search, and the fp8 codec.
#include <cmath>
#include <limits>
#include <random>
#include <vector>

#include <gtest/gtest.h>

#include "kv/codec.h"
#include "kv/codecs/fp8.h"
#include "per_target.h"

namespace kvc::kv {
namespace {

// Independent reference: nearest of all finite E4M3 values, ties to the even code, saturating.
uint8_t Nearest(float x) {
  const uint8_t sign = std::signbit(x) ? 0x80 : 0;
  const double a = std::fabs(double(x));
  int best = 0;
  double best_err = 1e300;
  for (int c = 0; c < 0x7F; ++c) {  // positive codes 0..126 (127 = NaN)
    const double v = fp8::E4M3ToFloat(uint8_t(c));
    const double err = std::fabs(v - a);
    if (err < best_err || (err == best_err && (c & 1) == 0)) {
      best_err = err;
      best = c;
    }
  }
  return sign | uint8_t(best);
}

TEST(Fp8, DecodeKnownValues) {
  EXPECT_EQ(fp8::E4M3ToFloat(0x7E), 448.f);                 // max finite
  EXPECT_EQ(fp8::E4M3ToFloat(0x38), 1.f);                   // exponent 7 = bias
  EXPECT_EQ(fp8::E4M3ToFloat(0x01), std::ldexp(1.f, -9));   // smallest subnormal
  EXPECT_EQ(fp8::E4M3ToFloat(0x08), std::ldexp(1.f, -6));   // smallest normal
  EXPECT_TRUE(std::isnan(fp8::E4M3ToFloat(0x7F)));
  EXPECT_TRUE(std::isnan(fp8::E4M3ToFloat(0xFF)));
  EXPECT_EQ(fp8::E4M3ToFloat(0xBE), -1.75f);     // sign 1, exponent 7 (= bias), mantissa 6
  EXPECT_EQ(fp8::E4M3ToFloat(0x46), 3.5f);      // exponent 8, mantissa 6
}

TEST(Fp8, EveryCodeRoundTrips) {
  for (int c = 0; c < 256; ++c) {
    if ((c & 0x7F) == 0x7F) continue;
    const float v = fp8::E4M3ToFloat(uint8_t(c));
    const uint8_t back = fp8::FloatToE4M3(v);
    if (v == 0.f) {
      EXPECT_EQ(back & 0x7F, 0);
    } else {
      EXPECT_EQ(back, c) << "code " << c << " value " << v;
    }
  }
}

TEST(Fp8, RoundNearestEvenAndSaturate) {
  EXPECT_EQ(fp8::FloatToE4M3(1.0625f), 0x38);   // tie 1 | 1.125 -> even (1.0)
  EXPECT_EQ(fp8::FloatToE4M3(1.1875f), 0x3A);   // tie 1.125 | 1.25 -> even (1.25)
  EXPECT_EQ(fp8::FloatToE4M3(std::ldexp(1.f, -10)), 0x00);      // tie 0 | 2^-9 -> 0
  EXPECT_EQ(fp8::FloatToE4M3(3 * std::ldexp(1.f, -10)), 0x02);  // tie 1 | 2 subnormal -> 2
  EXPECT_EQ(fp8::FloatToE4M3(1e6f), 0x7E);
  EXPECT_EQ(fp8::FloatToE4M3(-1e6f), 0xFE);
  EXPECT_EQ(fp8::FloatToE4M3(460.f), 0x7E);
  std::mt19937 rng(5);
  std::uniform_real_distribution<float> e(-12.f, 10.f);
  for (int i = 0; i < 20000; ++i) {
    const float x = (i & 1 ? -1.f : 1.f) * std::exp2(e(rng));
    ASSERT_EQ(fp8::FloatToE4M3(x), Nearest(x)) << x;
  }
  // All exact midpoints between neighbouring codes.
  for (int c = 0; c < 0x7E; ++c) {
    const float mid = 0.5f * (fp8::E4M3ToFloat(uint8_t(c)) + fp8::E4M3ToFloat(uint8_t(c + 1)));
    EXPECT_EQ(fp8::FloatToE4M3(mid), Nearest(mid)) << mid;
  }
}

KVC_PER_TARGET_SUITE(Fp8Simd);  // once per Highway target (per_target.h)

TEST_P(Fp8Simd, CodecPerVectorScale) {
  CodecContext ctx;
  ctx.dim = 64;
  auto c = MakeCodec("fp8", ctx);
  ASSERT_TRUE(c.ok());
  EXPECT_EQ((*c)->BlockBytes(), 66u);
  EXPECT_DOUBLE_EQ((*c)->BitsPerValue(), 8.25);
  std::mt19937 rng(9);
  std::normal_distribution<float> nd(0.f, 3.f);
  std::vector<float> x(64), y(64);
  std::vector<uint8_t> b(66);
  for (int rep = 0; rep < 100; ++rep) {
    float amax = 0;
    for (auto& v : x) {
      v = nd(rng);
      amax = std::max(amax, std::fabs(v));
    }
    (*c)->Encode(x.data(), b.data());
    (*c)->Decode(b.data(), y.data());
    for (int i = 0; i < 64; ++i) {
      // Normal range: relative error <= 2^-4; subnormal range: absolute <= half a step.
      const float tol = std::max(std::fabs(x[i]) / 16.f, amax / 448.f * std::ldexp(1.f, -10) * 1.01f);
      EXPECT_LE(std::fabs(x[i] - y[i]), tol * 1.01f) << x[i];
    }
    // The scale rounds up, so the largest element never clips.
    float ymax = 0;
    for (float v : y) ymax = std::max(ymax, std::fabs(v));
    EXPECT_LE(std::fabs(ymax - amax), amax / 16.f);
  }
  ctx.dim = 48;  // any dimension works
  EXPECT_TRUE(MakeCodec("fp8", ctx).ok());
  EXPECT_FALSE(MakeCodec("fp8:scale=3", ctx).ok());
}

}  // namespace
}  // namespace kvc::kv
