// KVQuant: calibration on synthetic activations with outlier channels, bytes, round trip, sparse
// outliers exact, fused score equals decode-then-dot, JSON round trip, missing calibration.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>
#include <random>

#include "kv/codec.h"
#include "kv/codecs/bitpack.h"
#include "kv/codecs/kvquant.h"

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
      EXPECT_EQ(c->BlockBytes(), size_t((key ? 0 : 4) + 8 * b + 3)) << b;
      double err = 0, tot = 0;
      for (int t = 0; t < 100; ++t) {
        const float* x = &(key ? test.k : test.v)[1][size_t(t * 2 + 1) * 64];
        std::vector<uint8_t> blk(c->BlockBytes());
        std::vector<float> xh(64);
        c->Encode(x, blk.data());
        c->Decode(blk.data(), xh.data());
        for (int j = 0; j < 64; ++j) {
          err += (x[j] - xh[j]) * (x[j] - xh[j]);
          tot += x[j] * x[j];
        }
        // Fused vs decode-then-dot.
        std::vector<float> q(2 * 64);
        for (int j = 0; j < 128; ++j) q[j] = std::sin(0.37f * j + t);
        std::vector<float> qp(2 * c->PreparedQueryDim()), s(2);
        c->PrepareQuery(q.data(), 2, qp.data());
        c->Score(qp.data(), 2, blk.data(), s.data());
        for (int r = 0; r < 2; ++r) {
          double ref = 0;
          for (int j = 0; j < 64; ++j) ref += double(q[r * 64 + j]) * xh[j];
          EXPECT_NEAR(s[r], ref, 1e-3 * (1 + std::fabs(ref)));
        }
      }
      // Non-uniform b-bit codes on ~Gaussian data: relative error well below 4^-b·4.
      EXPECT_LT(err / tot, 4.0 * std::pow(4.0, -b)) << "bits " << b << (key ? " K" : " V");
      // Many-block accumulate (the decode path for values) equals decode-then-axpy.
      const int n = 100;
      std::vector<uint8_t> blocks(size_t(n) * c->BlockBytes());
      std::vector<float> dec(size_t(n) * 64), p(2 * n);
      for (int t = 0; t < n; ++t) {
        c->Encode(&(key ? test.k : test.v)[1][size_t(t * 2 + 1) * 64], &blocks[t * c->BlockBytes()]);
        c->Decode(&blocks[t * c->BlockBytes()], &dec[size_t(t) * 64]);
        p[t] = std::cos(0.1f * t);
        p[n + t] = 0.01f * t;
      }
      // The many-row decoder (Highway, sparse outliers in the kernel) equals Decode bit for bit.
      std::vector<float> many(size_t(n) * 64);
      c->DecodeBlocks(blocks.data(), n, many.data());
      for (size_t i = 0; i < many.size(); ++i) ASSERT_EQ(many[i], dec[i]) << "bits " << b << " i=" << i;
      std::vector<float> acc(2 * 64, 0.5f), ref(acc);
      c->AccumulateBlocks(p.data(), n, 2, blocks.data(), n, acc.data());
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
  std::vector<float> x(64, 0.1f);
  x[17] = 500.f;  // far outside channel 17's calibrated range
  std::vector<uint8_t> blk(c->BlockBytes());
  std::vector<float> xh(64);
  c->Encode(x.data(), blk.data());
  c->Decode(blk.data(), xh.data());
  EXPECT_FLOAT_EQ(xh[17], 500.f);
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
