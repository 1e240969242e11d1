// KVQuant: calibration on synthetic activations with outlier channels, bytes, round trip, sparse
// outliers exact, fused score equals decode-then-dot, JSON round trip, missing calibration.
#include <gtest/gtest.h>

#include <cmath>
#include <algorithm>
#include <cstdio>
#include <random>

#include "kv/codec.h"
#include "kv/codecs/bitpack.h"
#include "kv/codecs/kvquant.h"
#include "kv/rope.h"
#include "per_target.h"

namespace kvc::kv {
namespace {

// The word-at-a-time unpacker the codecs decode with equals the bit-by-bit reader.
TEST(BitPack, UnpackCodesEqualsBitReader) {
  std::mt19937 rng(3);
  for (int w = 1; w <= 8; ++w) {
    for (int n : {1, 5, 8, 9, 64, 67}) {
      std::vector<uint8_t> bytes((size_t(n) * w + 7) / 8 + 1);
      std::vector<uint32_t> codes(n);
      BitWriter bw(bytes.data());
      for (int i = 0; i < n; ++i) bw.Put(codes[i] = rng() & ((1u << w) - 1), w);
      std::vector<uint8_t> idx(n, 0xEE);
      UnpackCodes(bytes.data(), n, w, idx.data());
      for (int i = 0; i < n; ++i) ASSERT_EQ(idx[i], codes[i]) << "w=" << w << " n=" << n << " i=" << i;
    }
  }
}

KvQuantSamples Synthetic(int n_tok, uint32_t seed) {
  KvQuantSamples s;
  s.n_layer = 2;
  s.n_head_kv = 2;
  s.head_dim = 64;
  std::mt19937 rng(seed);
  std::normal_distribution<float> nd;
  for (int l = 0; l < 2; ++l) {
    std::vector<float> k(size_t(n_tok) * 2 * 64), v(k.size());
    for (size_t i = 0; i < k.size(); ++i) {
      const int c = int(i % 64);
      k[i] = nd(rng) * (c == 5 ? 20.f : 1.f) + (c == 9 ? 8.f : 0.f);  // outlier channel, offset
      v[i] = nd(rng);
    }
    s.k.push_back(k);
    s.v.push_back(v);
  }
  return s;
}

std::unique_ptr<Codec> Make(const CalibrationData& cd, const std::string& spec, KvKind kind) {
  CodecContext ctx;
  ctx.dim = 64;
  ctx.n_layer = 2;
  ctx.n_head_kv = 2;
  ctx.layer = 1;
  ctx.head = 1;
  ctx.kind = kind;
  ctx.calib = &cd;
  auto c = MakeCodec(spec, ctx);
  EXPECT_TRUE(c.ok()) << c.status().ToString();
  return c.ok() ? std::move(c).value() : nullptr;
}

TEST(KvQuant, CalibrateEncodeDecode) {
  auto cal = CalibrateKvQuant(Synthetic(2000, 1));
  ASSERT_TRUE(cal.ok()) << cal.status().ToString();
  auto test = Synthetic(100, 2);  // held-out vectors
  for (int b = 2; b <= 4; ++b) {
    for (KvKind kind : {KvKind::kKey, KvKind::kValue}) {
      auto c = Make(*cal, "kvquant" + std::to_string(b), kind);
      ASSERT_TRUE(c);
      const bool key = kind == KvKind::kKey;
      EXPECT_EQ(c->wants_pre_rope_keys(), key);
      // Keys: 16 tokens per block, codes channel-major; values: one token per block.
      const int bt = c->block_tokens();
      EXPECT_EQ(bt, key ? 16 : 1);
      // Keys: 16 × 64 codes + 10 slots of 4 bytes (1 % of 1,024 values); values: off, rng,
      // 64 codes, 1 slot of 3 bytes.
      EXPECT_EQ(c->BlockBytes(), key ? size_t(128 * b + 40) : size_t(4 + 8 * b + 3)) << b;
      EXPECT_DOUBLE_EQ(c->BitsPerValue(), b + (key ? 0.3125 : 7.0 / 8.0));
      EXPECT_EQ(c->Name(), "kvquant:bits=" + std::to_string(b) + ",outliers=1,qnorm=1");
      const int n = 96, nb = n / bt;
      std::vector<float> x(size_t(n) * 64);
      for (int t = 0; t < n; ++t) {
        std::copy_n(&(key ? test.k : test.v)[1][size_t(t * 2 + 1) * 64], 64, &x[size_t(t) * 64]);
      }
      std::vector<uint8_t> blocks(size_t(nb) * c->BlockBytes());
      std::vector<float> dec(size_t(n) * 64);
      for (int k = 0; k < nb; ++k) {
        c->Encode(&x[size_t(k) * bt * 64], &blocks[size_t(k) * c->BlockBytes()]);
        c->Decode(&blocks[size_t(k) * c->BlockBytes()], &dec[size_t(k) * bt * 64]);
      }
      double err = 0, tot = 0;
      for (size_t i = 0; i < x.size(); ++i) {
        err += (x[i] - dec[i]) * (x[i] - dec[i]);
        tot += x[i] * x[i];
      }
      // Non-uniform b-bit codes on ~Gaussian data: relative error well below 4^-b·4.
      EXPECT_LT(err / tot, 4.0 * std::pow(4.0, -b)) << "bits " << b << (key ? " K" : " V");
      // Fused score vs decode-then-dot, per block.
      std::vector<float> q(2 * 64);
      for (int j = 0; j < 128; ++j) q[j] = std::sin(0.37f * j + b);
      std::vector<float> qp(2 * c->PreparedQueryDim()), sc(size_t(2) * bt);
      c->PrepareQuery(q.data(), 2, qp.data());
      for (int k = 0; k < nb; ++k) {
        c->Score(qp.data(), 2, &blocks[size_t(k) * c->BlockBytes()], sc.data());
        for (int r = 0; r < 2; ++r) {
          for (int t = 0; t < bt; ++t) {
            double ref = 0;
            for (int j = 0; j < 64; ++j) ref += double(q[r * 64 + j]) * dec[size_t(k * bt + t) * 64 + j];
            EXPECT_NEAR(sc[size_t(r) * bt + t], ref, 1e-3 * (1 + std::fabs(ref)));
          }
        }
      }
      // The many-block decoder equals Decode bit for bit.
      std::vector<float> many(size_t(n) * 64);
      c->DecodeBlocks(blocks.data(), nb, many.data());
      for (size_t i = 0; i < many.size(); ++i) ASSERT_EQ(many[i], dec[i]) << "bits " << b << " i=" << i;
      // Many-block accumulate (the decode path for values) equals decode-then-axpy.
      std::vector<float> p(2 * n);
      for (int t = 0; t < n; ++t) {
        p[t] = std::cos(0.1f * t);
        p[n + t] = 0.01f * t;
      }
      std::vector<float> acc(2 * 64, 0.5f), ref(acc);
      c->AccumulateBlocks(p.data(), n, 2, blocks.data(), nb, acc.data());
      for (int r = 0; r < 2; ++r) {
        for (int t = 0; t < n; ++t) {
          for (int j = 0; j < 64; ++j) ref[r * 64 + j] += p[r * n + t] * dec[size_t(t) * 64 + j];
        }
      }
      for (int i = 0; i < 128; ++i) EXPECT_NEAR(acc[i], ref[i], 1e-3 * (1 + std::fabs(ref[i])));
    }
  }
}

TEST(KvQuant, OutlierSlotIsExact) {
  auto cal = CalibrateKvQuant(Synthetic(2000, 3));
  ASSERT_TRUE(cal.ok());
  auto c = Make(*cal, "kvquant3", KvKind::kKey);
  std::vector<float> x(size_t(16) * 64, 0.1f);
  x[3 * 64 + 17] = 500.f;  // token 3: far outside channel 17's calibrated range
  std::vector<uint8_t> blk(c->BlockBytes());
  std::vector<float> xh(x.size());
  c->Encode(x.data(), blk.data());
  c->Decode(blk.data(), xh.data());
  EXPECT_FLOAT_EQ(xh[3 * 64 + 17], 500.f);
}

// The key block's budget (10 slots at 1 %) goes to the values with the largest clamping error,
// wherever they sit in the block (several in one token, several tokens in one channel); the
// rest beyond the thresholds are clamped to the outermost signpost. A bigger percentage buys more
// slots (and bytes), outliers=0 none.
TEST(KvQuant, KeyOutlierBudgetTakesTheLargestClampingErrors) {
  auto cal = CalibrateKvQuant(Synthetic(2000, 3));
  ASSERT_TRUE(cal.ok());
  auto c = Make(*cal, "kvquant:bits=3,qnorm=0", KvKind::kKey);  // decoded range exactly [lo, hi]
  ASSERT_TRUE(c);
  const auto& lo = cal->tensors.at("kvquant.k_lo.L1");
  const auto& hi = cal->tensors.at("kvquant.k_hi.L1");
  std::vector<float> x(size_t(16) * 64);
  for (int t = 0; t < 16; ++t) {
    for (int ch = 0; ch < 64; ++ch) x[t * 64 + ch] = 0.5f * (lo[64 + ch] + hi[64 + ch]);  // head 1
  }
  // 13 values beyond their channel's hi threshold by 100 + 10·i (i = 0..12): 7 in token 2, the
  // rest in channel 40 of other tokens; the 10 largest (i = 3..12) must be exact.
  std::vector<int> at;
  for (int i = 0; i < 13; ++i) {
    const int pos = i < 7 ? 2 * 64 + 3 * i : i * 64 + 40;
    x[pos] = std::ceil(hi[64 + pos % 64]) + 100.f + 10.f * i;  // an integer: exact in fp16
    at.push_back(pos);
  }
  std::vector<uint8_t> blk(c->BlockBytes());
  std::vector<float> xh(x.size());
  c->Encode(x.data(), blk.data());
  c->Decode(blk.data(), xh.data());
  for (int i = 0; i < 13; ++i) {
    if (i >= 3) {
      EXPECT_EQ(xh[at[i]], x[at[i]]) << i;
    } else {
      EXPECT_LT(xh[at[i]], hi[64 + at[i] % 64] + 1e-3f) << i;  // clamped to within the range
    }
  }
  // More slots with a larger percentage; none with 0.
  auto c2 = Make(*cal, "kvquant:bits=3,outliers=2", KvKind::kKey);
  auto c0 = Make(*cal, "kvquant:bits=3,outliers=0", KvKind::kKey);
  ASSERT_TRUE(c2 && c0);
  EXPECT_EQ(c2->BlockBytes(), size_t(384 + 4 * 20));
  EXPECT_EQ(c0->BlockBytes(), size_t(384));
  EXPECT_DOUBLE_EQ(c0->BitsPerValue(), 3.0);
  std::vector<uint8_t> b2(c2->BlockBytes());
  c2->Encode(x.data(), b2.data());
  c2->Decode(b2.data(), xh.data());
  for (int i = 0; i < 13; ++i) EXPECT_EQ(xh[at[i]], x[at[i]]) << i;
}

// Q-Norm (KVQuant contribution (v)): the stored (scale, shift) give the dequantised calibration values the
// mean and standard deviation of the normalised values, and the codec's decode table is the
// centroids mapped by them (encoding still picks the nearest plain centroid).
TEST(KvQuant, QNormKeepsMeanAndStd) {
  auto s = Synthetic(2000, 7);
  auto cal = CalibrateKvQuant(s);
  ASSERT_TRUE(cal.ok());
  const auto& lo = cal->tensors.at("kvquant.k_lo.L1");
  const auto& hi = cal->tensors.at("kvquant.k_hi.L1");
  for (int b = 2; b <= 4; ++b) {
    const auto& cb = cal->tensors.at("kvquant.k_cb" + std::to_string(b) + ".L1");
    const auto& qn = cal->tensors.at("kvquant.k_qn" + std::to_string(b) + ".L1");
    ASSERT_EQ(qn.size(), 2u);
    double s1 = 0, s2 = 0, q1 = 0, q2 = 0, n = 0;
    for (size_t i = 0; i < s.k[1].size(); ++i) {
      const int ch = int(i % 128);
      const float off = 0.5f * (hi[ch] + lo[ch]), rng = std::max(0.5f * (hi[ch] - lo[ch]), 1e-6f);
      const float u = (s.k[1][i] - off) / rng;
      if (std::fabs(u) > 1.f) continue;
      int best = 0;
      for (int j = 1; j < int(cb.size()); ++j) {
        if (std::fabs(u - cb[j]) < std::fabs(u - cb[best])) best = j;
      }
      const double q = cb[best] * qn[0] + qn[1];
      s1 += u; s2 += double(u) * u; q1 += q; q2 += q * q; n += 1;
    }
    const double mu = s1 / n, mq = q1 / n;
    const double sdu = std::sqrt(s2 / n - mu * mu), sdq = std::sqrt(q2 / n - mq * mq);
    EXPECT_NEAR(mq, mu, 1e-4) << b;
    EXPECT_NEAR(sdq / sdu, 1.0, 1e-4) << b;
    EXPECT_GT(qn[0], 1.f) << b;  // k-means shrinks the spread (Var q = Var u − MSE): Q-Norm widens
  }
  // The codec: with qnorm=1 the key decode is ((cb·scale + shift)·rng + off) where qnorm=0 gives
  // cb·rng + off, same codes.
  auto on = Make(*cal, "kvquant:bits=2,qnorm=1", KvKind::kKey);
  auto off = Make(*cal, "kvquant:bits=2,qnorm=0", KvKind::kKey);
  ASSERT_TRUE(on && off);
  const auto& qn = cal->tensors.at("kvquant.k_qn2.L1");
  std::vector<float> x(size_t(16) * 64);
  for (int t = 0; t < 16; ++t) std::copy_n(&s.k[1][size_t(t * 2 + 1) * 64], 64, &x[size_t(t) * 64]);
  std::vector<uint8_t> b1(on->BlockBytes()), b0(off->BlockBytes());
  on->Encode(x.data(), b1.data());
  off->Encode(x.data(), b0.data());
  EXPECT_EQ(b1, b0);  // same bytes: Q-Norm only changes the decode table
  std::vector<float> d1(x.size()), d0(x.size());
  on->Decode(b1.data(), d1.data());
  off->Decode(b0.data(), d0.data());
  int changed = 0;
  for (int i = 0; i < 16 * 64; ++i) {
    const int ch = 64 + i % 64;
    const float o = 0.5f * (hi[ch] + lo[ch]), r = std::max(0.5f * (hi[ch] - lo[ch]), 1e-6f);
    if (d0[i] == d1[i]) continue;  // a sparse outlier (the same fp16 value in both)
    const float u0 = (d0[i] - o) / r, u1 = (d1[i] - o) / r;
    EXPECT_NEAR(u1, u0 * qn[0] + qn[1], 1e-4f) << i;
    changed += u1 != u0;
  }
  EXPECT_GT(changed, 500);
}

// Bad calibration input is refused with a message, never turned into a codec: non-finite
// samples, another model's shape (layers, heads, head_dim), an older file format, NaN or
// inconsistent tensors, an outlier percentage out of range.
TEST(KvQuant, RefusesBadCalibration) {
  auto s = Synthetic(100, 9);
  s.v[1][77] = std::nanf("");
  auto bad = CalibrateKvQuant(s);
  ASSERT_FALSE(bad.ok());
  EXPECT_NE(bad.status().ToString().find("value sample 77"), std::string::npos) << bad.status().ToString();
  EXPECT_FALSE(CalibrateKvQuant(Synthetic(100, 9), -1.0).ok());
  auto cal = CalibrateKvQuant(Synthetic(100, 9));
  ASSERT_TRUE(cal.ok());
  CodecContext ctx;
  ctx.dim = 64;
  ctx.n_layer = 2;
  ctx.n_head_kv = 2;
  ctx.layer = 1;
  ctx.head = 1;
  ctx.calib = &*cal;
  EXPECT_TRUE(MakeCodec("kvquant3", ctx).ok());
  EXPECT_FALSE(MakeCodec("kvquant:bits=3,outliers=11", ctx).ok());
  EXPECT_FALSE(MakeCodec("kvquant:bits=3,outliers=-2", ctx).ok());
  // Another model's shape, through a file (the discovery path checks the shape).
  const std::string path = ::testing::TempDir() + "/kvq_bad.kvquant.json";
  ASSERT_TRUE(SaveCalibrationJson(*cal, path).ok());
  CodecContext fc = ctx;
  fc.calib = nullptr;
  fc.dim = 128;  // head_dim differs
  EXPECT_FALSE(MakeCodec("kvquant:bits=3,calib=" + path, fc).ok());
  fc.dim = 64;
  fc.n_head_kv = 3;  // KV heads differ
  EXPECT_FALSE(MakeCodec("kvquant:bits=3,calib=" + path, fc).ok());
  std::remove(path.c_str());
  auto edit = [&](const std::string& name, size_t i, float v) {
    CalibrationData c = *cal;
    c.tensors.at(name)[i] = v;
    CodecContext k = ctx;
    k.calib = &c;
    auto r = MakeCodec("kvquant2", k);
    EXPECT_FALSE(r.ok()) << name << "[" << i << "] = " << v;
    return r.ok() ? std::string() : r.status().ToString();
  };
  EXPECT_NE(edit("kvquant.k_lo.L1", 70, std::nanf("")).find("nan"), std::string::npos);
  edit("kvquant.k_lo.L1", 70, 1e30f);    // lo > hi
  edit("kvquant.k_cb2.L1", 0, 5.f);      // not ascending
  edit("kvquant.k_qn2.L1", 0, -1.f);     // Q-Norm scale <= 0
  edit("kvquant.k_qn2.L1", 1, INFINITY);
  CalibrationData old = *cal;  // the format before Q-Norm: no version tensor
  old.tensors.erase("kvquant.version");
  ctx.calib = &old;
  auto r = MakeCodec("kvquant3", ctx);
  ASSERT_FALSE(r.ok());
  EXPECT_NE(r.status().ToString().find("not format 2"), std::string::npos) << r.status().ToString();
}

KVC_PER_TARGET_SUITE(KvQuantSimd);  // once per Highway target (per_target.h)

// Keys at decode: scores with RoPE applied on the packed blocks (tokens in lanes, sparse
// outliers corrected after rotation) equal decode, rotate, dot — at consecutive positions inside
// the RoPE table (cos / sin by angle addition from one table row per block) and at gappy
// positions partly past it (cos / sin written to a scratch).
TEST_P(KvQuantSimd, ScoreRopeBlocksEqualsDecodeRotateDot) {
  auto cal = CalibrateKvQuant(Synthetic(2000, 5));
  ASSERT_TRUE(cal.ok());
  auto test = Synthetic(100, 6);
  RopeParams rp;
  rp.theta = 10000.0;
  rp.n_rot = 64;
  const Rope rope(rp, 8192);
  for (int b = 2; b <= 4; ++b) {
    auto c = Make(*cal, "kvquant" + std::to_string(b), KvKind::kKey);
    ASSERT_TRUE(c);
    const int nb = 5, n = nb * 16, n_q = 5;
    std::vector<float> x(size_t(n) * 64);
    for (int t = 0; t < n; ++t) std::copy_n(&test.k[0][size_t(t) * 64], 64, &x[size_t(t) * 64]);
    x[7 * 64 + 5] = 300.f;  // outliers in both members of a pair (channel 5 odd, 40 even)
    x[20 * 64 + 40] = -250.f;
    for (int i = 0; i < 14; ++i) x[(32 + i) * 64 + (i * 5) % 64] = (i % 2 ? -1.f : 1.f) * (80.f + 9.f * i);  // > budget
    std::vector<uint8_t> blocks(size_t(nb) * c->BlockBytes());
    for (int k = 0; k < nb; ++k) c->Encode(&x[size_t(k) * 16 * 64], &blocks[size_t(k) * c->BlockBytes()]);
    std::vector<float> q(size_t(n_q) * 64);
    for (size_t j = 0; j < q.size(); ++j) q[j] = std::cos(0.23f * j + b);
    std::vector<int64_t> consecutive(n), gappy(n);
    for (int t = 0; t < n; ++t) {
      consecutive[t] = 1000 + t;
      gappy[t] = t < 40 ? 3 * t : 8170 + t;  // gaps, then past the 8192-position table
    }
    for (const auto* pos : {&consecutive, &gappy}) {
      std::vector<float> dec(size_t(n) * 64);
      c->DecodeBlocks(blocks.data(), nb, dec.data());
      rope.Apply(dec.data(), n, 64, pos->data());
      const int64_t ld = n + 3;
      std::vector<float> got(size_t(n_q) * ld, -7.f);
      ASSERT_TRUE(c->ScoreRopeBlocks(q.data(), n_q, blocks.data(), nb, rope, pos->data(), got.data(), ld));
      for (int r = 0; r < n_q; ++r) {
        for (int t = 0; t < n; ++t) {
          double ref = 0, mag = 0;
          for (int j = 0; j < 64; ++j) {
            ref += double(q[r * 64 + j]) * dec[size_t(t) * 64 + j];
            mag += std::fabs(double(q[r * 64 + j]) * dec[size_t(t) * 64 + j]);
          }
          ASSERT_NEAR(got[size_t(r) * ld + t], ref, 1e-5 * mag + 1e-5) << "b=" << b << " r=" << r << " t=" << t;
        }
      }
    }
    RopeParams neox = rp;
    neox.neox = true;
    std::vector<float> out(size_t(n_q) * n);
    EXPECT_FALSE(c->ScoreRopeBlocks(q.data(), n_q, blocks.data(), nb, Rope(neox, 16), consecutive.data(),
                                    out.data(), n));  // unsupported pair order: the cache falls back
  }
}

TEST(KvQuant, JsonRoundTripAndMissing) {
  auto cal = CalibrateKvQuant(Synthetic(100, 4));
  ASSERT_TRUE(cal.ok());
  const std::string path = ::testing::TempDir() + "/kvq_test.kvquant.json";
  ASSERT_TRUE(SaveCalibrationJson(*cal, path).ok());
  auto back = LoadCalibrationJson(path);
  ASSERT_TRUE(back.ok()) << back.status().ToString();
  EXPECT_EQ(back->tensors, cal->tensors);
  CodecContext ctx;
  ctx.dim = 64;
  ctx.n_layer = 2;
  ctx.n_head_kv = 2;
  EXPECT_TRUE(MakeCodec("kvquant:bits=3,calib=" + path, ctx).ok());
  ctx.n_layer = 3;  // shape mismatch
  EXPECT_FALSE(MakeCodec("kvquant:bits=3,calib=" + path, ctx).ok());
  auto miss = MakeCodec("kvquant:bits=3,calib=/nonexistent/x.json", ctx);
  EXPECT_FALSE(miss.ok());
  EXPECT_FALSE(MakeCodec("kvquant:bits=5,calib=" + path, ctx).ok());
  std::remove(path.c_str());
}

}  // namespace
}  // namespace kvc::kv
