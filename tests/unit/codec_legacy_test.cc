// q4_0 / q4_1 / q5_0 (ggml reference quantizers), their fused kernels vs the scalar references,
// and the Hadamard rotation transform (+ rot=1 default wiring in the store).
#include <cmath>
#include <random>
#include <vector>

#include <gtest/gtest.h>

#include "gguf/types.h"
#include "kv/cache.h"
#include "kv/codecs/q4_0.h"
#include "kv/codecs/q4_1.h"
#include "kv/codecs/q5_0.h"
#include "kv/transforms/hadamard.h"
#include "per_target.h"

namespace kvc::kv {
namespace {

std::vector<float> RandomVec(int n, uint32_t seed, float scale = 1.f) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> nd(0.f, scale);
  std::vector<float> v(n);
  for (auto& x : v) x = nd(rng);
  return v;
}

TEST(Q4_0, GgmlRoundingAndClamp) {
  // m = 8 (largest |x|, positive) -> d = -1. ggml: q = min(15, trunc(x/d + 8.5)).
  std::vector<float> x(32, 0.f);
  x[0] = 8.f;    // x/d = -8 -> code 0 -> x̂ = (0-8)·(-1) = 8 (exact)
  x[1] = -0.5f;  // x/d = 0.5 -> trunc(9.0) = 9 -> x̂ = -1 (half rounds up in code space)
  x[2] = -8.f;   // x/d = 8 -> 16 -> clamped to 15 -> x̂ = -7
  x[17] = 2.25f; // x/d = -2.25 -> trunc(6.25) = 6 -> x̂ = 2
  std::vector<uint8_t> b(q4_0::kBlockBytes);
  q4_0::QuantizeRowRef(x.data(), 32, b.data());
  EXPECT_EQ(gguf::Fp16ToFp32(uint16_t(b[0] | (b[1] << 8))), -1.f);
  EXPECT_EQ(b[2 + 0] & 0x0F, 0);
  EXPECT_EQ(b[2 + 1] & 0x0F, 9);
  EXPECT_EQ(b[2 + 2] & 0x0F, 15);
  EXPECT_EQ(b[2 + 1] >> 4, 6);  // element 17 is the high nibble of byte 1
  std::vector<float> y(32);
  q4_0::DequantizeRowRef(b.data(), 32, y.data());
  EXPECT_EQ(y[0], 8.f);
  EXPECT_EQ(y[1], -1.f);
  EXPECT_EQ(y[2], -7.f);
  EXPECT_EQ(y[17], 2.f);
  EXPECT_EQ(y[5], 0.f);  // 0 -> code 8 -> 0
}

TEST(Q4_1, GgmlAffine) {
  std::vector<float> x(32);
  for (int i = 0; i < 32; ++i) x[i] = float(i % 16);  // min 0, max 15 -> d = 1, exact codes
  std::vector<uint8_t> b(q4_1::kBlockBytes);
  q4_1::QuantizeRowRef(x.data(), 32, b.data());
  std::vector<float> y(32);
  q4_1::DequantizeRowRef(b.data(), 32, y.data());
  for (int i = 0; i < 32; ++i) EXPECT_EQ(y[i], x[i]) << i;
  x[3] = 2.5f;  // (2.5 - 0)/1 + 0.5 = 3.0 -> 3 (ggml rounds half up)
  q4_1::QuantizeRowRef(x.data(), 32, b.data());
  q4_1::DequantizeRowRef(b.data(), 32, y.data());
  EXPECT_EQ(y[3], 3.f);
}

TEST(Q5_0, GgmlHighBits) {
  std::vector<float> x(32);
  for (int i = 0; i < 32; ++i) x[i] = float(i - 16);  // m = -16 -> d = 1, codes = i
  std::vector<uint8_t> b(q5_0::kBlockBytes);
  q5_0::QuantizeRowRef(x.data(), 32, b.data());
  uint32_t qh = b[2] | (b[3] << 8) | (b[4] << 16) | (uint32_t(b[5]) << 24);
  for (int j = 0; j < 32; ++j) EXPECT_EQ((qh >> j) & 1u, uint32_t(j >= 16)) << j;
  std::vector<float> y(32);
  q5_0::DequantizeRowRef(b.data(), 32, y.data());
  for (int i = 0; i < 32; ++i) EXPECT_EQ(y[i], x[i]) << i;
}

template <typename Q, typename D, typename DR, typename A, typename AR, typename DQ>
void CheckKernels(Q quant, D dot, DR dot_ref, A axpy, AR axpy_ref, DQ deq, size_t bb, float bound) {
  for (int n : {32, 64, 128}) {
    for (uint32_t seed = 1; seed < 20; ++seed) {
      auto x = RandomVec(n, seed, 2.f);
      auto q = RandomVec(n, seed + 100);
      std::vector<uint8_t> b(n / 32 * bb);
      quant(x.data(), n, b.data());
      std::vector<float> xh(n);
      deq(b.data(), n, xh.data());
      double ref = 0, mag = 0;
      for (int i = 0; i < n; ++i) {
        ref += double(q[i]) * xh[i];
        mag += std::fabs(q[i] * xh[i]);
        EXPECT_LE(std::fabs(x[i] - xh[i]), bound * 8.f) << "n " << n << " i " << i;
      }
      EXPECT_NEAR(dot_ref(q.data(), b.data(), n), ref, 1e-5 * mag + 1e-6);
      EXPECT_NEAR(dot(q.data(), b.data(), n), ref, 1e-5 * mag + 1e-6);
      std::vector<float> y1(n, 0.5f), y2(n, 0.5f), y3(n, 0.5f);
      axpy(0.75f, b.data(), n, y1.data());
      axpy_ref(0.75f, b.data(), n, y2.data());
      for (int i = 0; i < n; ++i) y3[i] += 0.75f * xh[i];
      for (int i = 0; i < n; ++i) {
        EXPECT_NEAR(y1[i], y3[i], 1e-5 * (std::fabs(y3[i]) + 1));
        EXPECT_NEAR(y2[i], y3[i], 1e-5 * (std::fabs(y3[i]) + 1));
      }
    }
  }
}

KVC_PER_TARGET_SUITE(LegacySimd);  // once per Highway target (per_target.h)

TEST_P(LegacySimd, FusedKernelsEqualScalarReferenceAndDecode) {
  // bound: error <= d (one step) with |d| <= absmax/8 (q4_0); 8·bound = generous absmax of N(0,2).
  CheckKernels(q4_0::QuantizeRowRef, q4_0::Dot, q4_0::DotRef, q4_0::Axpy, q4_0::AxpyRef,
               q4_0::DequantizeRowRef, q4_0::kBlockBytes, 10.f / 8);
  CheckKernels(q4_1::QuantizeRowRef, q4_1::Dot, q4_1::DotRef, q4_1::Axpy, q4_1::AxpyRef,
               q4_1::DequantizeRowRef, q4_1::kBlockBytes, 20.f / 15 / 2);
  CheckKernels(q5_0::QuantizeRowRef, q5_0::Dot, q5_0::DotRef, q5_0::Axpy, q5_0::AxpyRef,
               q5_0::DequantizeRowRef, q5_0::kBlockBytes, 10.f / 16);
}

TEST(Legacy, RoundTripErrorWithinOneStep) {
  for (uint32_t seed = 0; seed < 50; ++seed) {
    auto x = RandomVec(32, seed);
    float amax = 0;
    for (float v : x) amax = std::max(amax, std::fabs(v));
    std::vector<uint8_t> b(22);
    std::vector<float> y(32);
    q4_0::QuantizeRowRef(x.data(), 32, b.data());
    q4_0::DequantizeRowRef(b.data(), 32, y.data());
    for (int i = 0; i < 32; ++i) EXPECT_LE(std::fabs(x[i] - y[i]), amax / 8 * 1.001f);
    q5_0::QuantizeRowRef(x.data(), 32, b.data());
    q5_0::DequantizeRowRef(b.data(), 32, y.data());
    for (int i = 0; i < 32; ++i) EXPECT_LE(std::fabs(x[i] - y[i]), amax / 16 * 1.001f);
  }
}

TEST(Hadamard, OrthogonalAndFoldExact) {
  for (bool signs : {false, true}) {
    CodecContext ctx;
    ctx.dim = 64;
    ctx.seed = 1234;
    auto t = MakeTransform(signs ? "hadamard:signs=1" : "hadamard", ctx);
    ASSERT_TRUE(t.ok()) << t.status().message();
    auto x = RandomVec(64 * 3, 7), q = RandomVec(64 * 3, 8);
    std::vector<float> y(64 * 3), xr(64 * 3), qf(64 * 3);
    (*t)->Forward(x.data(), 3, y.data());
    (*t)->Reconstruct(y.data(), 3, xr.data());
    (*t)->FoldQuery(q.data(), 3, qf.data());
    for (int r = 0; r < 3; ++r) {
      double n0 = 0, n1 = 0, d0 = 0, d1 = 0;
      for (int i = 0; i < 64; ++i) {
        EXPECT_NEAR(xr[r * 64 + i], x[r * 64 + i], 1e-5);
        n0 += x[r * 64 + i] * x[r * 64 + i];
        n1 += y[r * 64 + i] * y[r * 64 + i];
        d0 += q[r * 64 + i] * x[r * 64 + i];
        d1 += qf[r * 64 + i] * y[r * 64 + i];
      }
      EXPECT_NEAR(n0, n1, 1e-4 * n0);
      EXPECT_NEAR(d0, d1, 1e-4 * std::sqrt(n0) * 8);
    }
  }
  // One-hot -> a flat vector ±1/sqrt(d): the rotation spreads an outlier channel.
  std::vector<float> e(64, 0.f), h(64);
  e[5] = 1.f;
  CodecContext ctx;
  ctx.dim = 64;
  auto t = MakeTransform("hadamard", ctx);
  (*t)->Forward(e.data(), 1, h.data());
  for (float v : h) EXPECT_NEAR(std::fabs(v), 0.125f, 1e-6);
}

TEST(Hadamard, RefusesNonPowerOfTwo) {
  CodecContext ctx;
  ctx.dim = 96;
  auto t = MakeTransform("hadamard", ctx);
  ASSERT_FALSE(t.ok());
  EXPECT_NE(t.status().message().find("power-of-2"), std::string::npos);
}

KvShape Shape(int hd) {
  KvShape s;
  s.n_layer = 1;
  s.n_head = 2;
  s.n_head_kv = 1;
  s.head_dim = hd;
  s.rope.n_rot = hd;
  return s;
}

// Attention output error of a cache vs the f32 cache, on keys/values with outlier channels.
double AttnError(const std::string& codec, int n = 48) {
  KvShape s = Shape(64);
  KvCacheConfig c32, cq;
  c32.k_codec = c32.v_codec = "f32";
  cq.k_codec = cq.v_codec = codec;
  auto a = KvCache::Create(s, c32);
  auto b = KvCache::Create(s, cq);
  EXPECT_TRUE(b.ok()) << b.status().message();
  auto k = RandomVec(n * 64, 3), v = RandomVec(n * 64, 4), q = RandomVec(2 * 64, 5);
  for (int t = 0; t < n; ++t) {
    k[t * 64 + 7] += 20.f;  // a fixed outlier channel, as in real keys
    v[t * 64 + 40] -= 12.f;
  }
  std::vector<int64_t> seq(n);
  for (int i = 0; i < n; ++i) seq[i] = i;
  EXPECT_TRUE((*a)->Write(0, seq.data(), n, k.data(), v.data()).ok());
  EXPECT_TRUE((*b)->Write(0, seq.data(), n, k.data(), v.data()).ok());
  int64_t qs = n - 1;
  std::vector<float> oa(2 * 64), ob(2 * 64);
  (*a)->Attend(0, q.data(), &qs, 1, oa.data());
  (*b)->Attend(0, q.data(), &qs, 1, ob.data());
  double e = 0;
  for (int i = 0; i < 128; ++i) e += (oa[i] - ob[i]) * (oa[i] - ob[i]);
  return std::sqrt(e);
}

TEST(Rotation, DefaultOnForFourBitAndHelpsOutliers) {
  KvShape s = Shape(64);
  for (const char* name : {"q4_0", "q4_1", "q5_0"}) {
    KvCacheConfig c;
    c.k_codec = c.v_codec = name;
    auto cache = KvCache::Create(s, c);
    ASSERT_TRUE(cache.ok()) << cache.status().message();
    EXPECT_NE((*cache)->Describe().find("hadamard"), std::string::npos) << (*cache)->Describe();
    c.k_codec = c.v_codec = std::string(name) + ":rot=0";
    auto plain = KvCache::Create(s, c);
    ASSERT_TRUE(plain.ok());
    EXPECT_EQ((*plain)->Describe().find("hadamard"), std::string::npos) << (*plain)->Describe();
  }
  const double rot = AttnError("q4_0"), norot = AttnError("q4_0:rot=0");
  EXPECT_LT(rot, norot) << "rotation should reduce q4_0 error with outlier channels";
  // An explicit rot=1 on a non-power-of-2 dim is refused; the implied default is skipped.
  KvCacheConfig c;
  c.k_codec = c.v_codec = "q4_0";
  EXPECT_TRUE(KvCache::Create(Shape(96), c).ok());
  c.k_codec = c.v_codec = "q4_0:rot=1";
  EXPECT_FALSE(KvCache::Create(Shape(96), c).ok());
  c.k_codec = c.v_codec = "q4_0:rot=maybe";
  EXPECT_FALSE(KvCache::Create(s, c).ok());
}

}  // namespace
}  // namespace kvc::kv
