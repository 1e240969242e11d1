// KIVI: layouts, quantizer error bound, constant groups, fused kernels, and the residual windows
// (spec-quantization.md §1, §7.8: window lengths for n = R−1, R, R+1).
#include <cmath>
#include <random>
#include <vector>

#include <gtest/gtest.h>

#include "kv/cache_internal.h"
#include "kv/codec.h"
#include "per_target.h"

namespace kvc::kv {
namespace {

std::unique_ptr<Codec> Make(const std::string& spec, KvKind kind, int dim = 64) {
  CodecContext ctx;
  ctx.dim = dim;
  ctx.kind = kind;
  auto c = MakeCodec(spec, ctx);
  EXPECT_TRUE(c.ok()) << spec << ": " << c.status().message();
  return c.ok() ? std::move(c).value() : nullptr;
}

std::vector<float> RandomVec(size_t n, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> nd(0.f, 1.f);
  std::vector<float> v(n);
  for (auto& x : v) x = nd(rng);
  return v;
}

TEST(Kivi, DescriptorsAndBits) {
  auto k2 = Make("kivi2", KvKind::kKey), v2 = Make("kivi2", KvKind::kValue);
  auto k4 = Make("kivi4", KvKind::kKey), v4 = Make("kivi4", KvKind::kValue);
  EXPECT_EQ(k2->block_tokens(), 32);
  EXPECT_EQ(k2->residual_tokens(), 0);
  EXPECT_EQ(k2->flush_quantum(), 128);
  EXPECT_EQ(v2->block_tokens(), 1);
  EXPECT_EQ(v2->residual_tokens(), 128);
  EXPECT_EQ(v2->flush_quantum(), 1);
  EXPECT_EQ(k2->BlockBytes(), 64u * 4 + 64 * 32 * 2 / 8);
  EXPECT_EQ(v2->BlockBytes(), 2u * 4 + 64 * 2 / 8);
  EXPECT_DOUBLE_EQ(k2->BitsPerValue(), 3.0);
  EXPECT_DOUBLE_EQ(v2->BitsPerValue(), 3.0);
  EXPECT_DOUBLE_EQ(k4->BitsPerValue(), 5.0);
  EXPECT_DOUBLE_EQ(v4->BitsPerValue(), 5.0);
  EXPECT_EQ(Make("kivi:bits=2,group=32,residual=16", KvKind::kKey)->flush_quantum(), 32);
  EXPECT_EQ(Make("kivi:bits=2,group=32,residual=40", KvKind::kKey)->flush_quantum(), 64);
  EXPECT_EQ(Make("kivi:bits=2,group=32,residual=0", KvKind::kKey)->flush_quantum(), 32);
  CodecContext ctx;
  ctx.dim = 64;
  ctx.kind = KvKind::kValue;
  EXPECT_FALSE(MakeCodec("kivi:bits=3", ctx).ok());
  EXPECT_FALSE(MakeCodec("kivi:bitz=2", ctx).ok());
  ctx.dim = 48;
  auto bad = MakeCodec("kivi:group=32", ctx);
  ASSERT_FALSE(bad.ok());
  EXPECT_NE(bad.status().message().find("divide"), std::string::npos);
}

KVC_PER_TARGET_SUITE(KiviSimd);  // once per Highway target (per_target.h)

TEST_P(KiviSimd, ErrorWithinHalfStepAndFusedEqualsDecode) {
  for (const char* spec : {"kivi2", "kivi4"}) {
    for (KvKind kind : {KvKind::kKey, KvKind::kValue}) {
      auto c = Make(spec, kind);
      const int bt = c->block_tokens(), d = 64, levels = std::string(spec) == "kivi2" ? 3 : 15;
      auto x = RandomVec(size_t(bt) * d, 11);
      for (int t = 0; t < bt; ++t) x[t * d + 3] += 9.f;  // outlier channel
      std::vector<uint8_t> b(c->BlockBytes());
      c->Encode(x.data(), b.data());
      std::vector<float> y(x.size());
      c->Decode(b.data(), y.data());
      // Per group: |x - x̂| <= s/2 (+ fp16 rounding of s and z).
      const bool per_channel = kind == KvKind::kKey;
      const int n_groups = per_channel ? d : d / 32, gsz = 32;
      for (int gi = 0; gi < n_groups; ++gi) {
        float mn = 1e30f, mx = -1e30f;
        for (int i = 0; i < gsz; ++i) {
          const float v = per_channel ? x[i * d + gi] : x[gi * 32 + i];
          mn = std::min(mn, v);
          mx = std::max(mx, v);
        }
        const float s = (mx - mn) / levels;
        for (int i = 0; i < gsz; ++i) {
          const size_t idx = per_channel ? size_t(i) * d + gi : size_t(gi) * 32 + i;
          EXPECT_LE(std::fabs(x[idx] - y[idx]), s * 0.5f + 4e-3f * (std::fabs(mn) + std::fabs(mx)))
              << spec << " kind " << int(kind) << " group " << gi;
        }
      }
      const int nq = 3;
      auto q = RandomVec(size_t(nq) * d, 12);
      std::vector<float> sc(size_t(nq) * bt);
      c->Score(q.data(), nq, b.data(), sc.data());
      for (int r = 0; r < nq; ++r) {
        for (int t = 0; t < bt; ++t) {
          double ref = 0, mag = 0;
          for (int i = 0; i < d; ++i) {
            ref += double(q[r * d + i]) * y[t * d + i];
            mag += std::fabs(q[r * d + i] * y[t * d + i]);
          }
          EXPECT_NEAR(sc[r * bt + t], ref, 1e-5 * mag + 1e-6);
        }
      }
      auto p = RandomVec(size_t(nq) * bt, 13);
      std::vector<float> o(size_t(nq) * d, 0.25f);
      c->AccumulateWeighted(p.data(), nq, b.data(), o.data());
      for (int r = 0; r < nq; ++r) {
        for (int i = 0; i < d; ++i) {
          double ref = 0.25, mag = 0.25;
          for (int t = 0; t < bt; ++t) {
            ref += double(p[r * bt + t]) * y[t * d + i];
            mag += std::fabs(p[r * bt + t] * y[t * d + i]);
          }
          EXPECT_NEAR(o[r * d + i], ref, 1e-5 * mag);
        }
      }
    }
  }
}

TEST(Kivi, ConstantGroupGuard) {
  for (KvKind kind : {KvKind::kKey, KvKind::kValue}) {
    auto c = Make("kivi2", kind);
    std::vector<float> x(size_t(c->block_tokens()) * 64, -2.75f), y(x.size());
    std::vector<uint8_t> b(c->BlockBytes());
    c->Encode(x.data(), b.data());
    c->Decode(b.data(), y.data());
    for (size_t i = 0; i < x.size(); ++i) ASSERT_EQ(y[i], -2.75f);
  }
}

// Residual windows through the store's generic flush rule (Stream::Append).
Stream MakeStreamFor(const std::string& spec, KvKind kind) {
  Stream s;
  s.codec = Make(spec, kind);
  s.dim = s.dim_in = 64;
  return s;
}

TEST(Kivi, WindowLengths) {
  const int R = 128;
  for (int n : {R - 1, R, R + 1, 2 * R + 5}) {
    Stream k = MakeStreamFor("kivi2", KvKind::kKey), v = MakeStreamFor("kivi2", KvKind::kValue);
    auto x = RandomVec(size_t(n) * 64, 1);
    for (int t = 0; t < n; ++t) {  // one token at a time, as in decode
      k.Append(&x[size_t(t) * 64], 1);
      v.Append(&x[size_t(t) * 64], 1);
    }
    EXPECT_EQ(k.n_tail, n % R) << n;            // keys: 0..R-1, quantized R at a time
    EXPECT_EQ(k.n_packed, n - n % R) << n;
    EXPECT_EQ(v.n_tail, std::min(n, R)) << n;   // values: FIFO of exactly R
    EXPECT_EQ(v.n_packed, std::max(0, n - R)) << n;
    EXPECT_EQ(k.packed.size(), size_t(k.n_packed / 32) * k.codec->BlockBytes());
    EXPECT_EQ(v.packed.size(), size_t(v.n_packed) * v.codec->BlockBytes());
  }
}

TEST(Kivi, PrefillBatchDoesNotKeepTailCapacity) {
  // 520 tokens in one Append (a prefill batch) pass through the fp16 tail; afterwards the tail
  // must only keep room for its window (keys < 128, values 128), rounded to grow_tokens (64).
  Stream k = MakeStreamFor("kivi2", KvKind::kKey), v = MakeStreamFor("kivi2", KvKind::kValue);
  auto x = RandomVec(size_t(520) * 64, 4);
  k.Append(x.data(), 520);
  v.Append(x.data(), 520);
  EXPECT_EQ(k.n_tail, 520 % 128);
  EXPECT_EQ(v.n_tail, 128);
  EXPECT_LE(k.tail_bytes(), size_t(128) * 64 * 2);
  EXPECT_LE(v.tail_bytes(), size_t(192) * 64 * 2);
}

}  // namespace
}  // namespace kvc::kv
