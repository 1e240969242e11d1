// Every registered codec: the many-block calls attention uses (ScoreBlocks / AccumulateBlocks:
// Highway kernels for f16, q8_0, q4_0/q4_1/q5_0, fp8, KIVI, TurboQuant-mse) equal the per-block
// Score / AccumulateWeighted scalar references (and DecodeBlocks equals Decode), for block counts 1, 5, 67 and 130 (the SIMD tile
// holds 64 tokens at head_dim 64, so 67 and 130 have partial tiles) and 1, 3, 5 query rows.
// Tolerance: scores 1e-4 · (1 + |ref|), accumulated outputs 1e-3 · (1 + |ref|).
#include <gtest/gtest.h>

#include <cmath>
#include <random>
#include <utility>
#include <vector>

#include "kv/codec.h"
#include "per_target.h"

namespace kvc::kv {
namespace {

KVC_PER_TARGET_SUITE(CodecBlocks);  // once per Highway target (per_target.h)

TEST_P(CodecBlocks, ManyBlockCallsEqualPerBlockReferences) {
  std::mt19937 rng(3);
  std::normal_distribution<float> nd;
  for (const auto& info : RegisteredCodecs()) {
   for (const auto [n_q, nb] : {std::pair{3, 5}, std::pair{1, 1}, std::pair{5, 67}, std::pair{3, 130}}) {
    for (KvKind kind : {KvKind::kKey, KvKind::kValue}) {
      CodecContext ctx;
      ctx.dim = 64;
      ctx.kind = kind;
      ctx.seed = 11;
      auto made = MakeCodec(info.name, ctx);
      if (!made.ok()) continue;  // e.g. K-only codecs as V, codecs needing calibration
      Codec& c = **made;
      const int bt = c.block_tokens(), d = c.dim();
      const int64_t n = int64_t(nb) * bt, ld = n + 3;
      std::vector<float> x(size_t(n) * d);
      for (auto& v : x) v = nd(rng);
      std::vector<uint8_t> blocks(size_t(nb) * c.BlockBytes());
      for (int b = 0; b < nb; ++b) c.Encode(&x[size_t(b) * bt * d], &blocks[size_t(b) * c.BlockBytes()]);
      std::vector<float> q(size_t(n_q) * d), qp(size_t(n_q) * c.PreparedQueryDim());
      for (auto& v : q) v = nd(rng);
      c.PrepareQuery(q.data(), n_q, qp.data());
      std::vector<float> many(size_t(n_q) * ld, 0.f), one(size_t(n_q) * bt);
      c.ScoreBlocks(qp.data(), n_q, blocks.data(), nb, many.data(), ld);
      // DecodeBlocks (the many-block decoder tiles and pre-RoPE keys use) equals per-block Decode.
      std::vector<float> dec_many(size_t(n) * d), dec_one(size_t(bt) * d);
      c.DecodeBlocks(blocks.data(), nb, dec_many.data());
      for (int b = 0; b < nb; ++b) {
        c.Decode(&blocks[size_t(b) * c.BlockBytes()], dec_one.data());
        for (size_t i = 0; i < dec_one.size(); ++i) {
          ASSERT_EQ(dec_many[size_t(b) * bt * d + i], dec_one[i]) << info.name << " block " << b;
        }
      }
      std::vector<float> p(size_t(n_q) * ld, 0.f);
      for (int b = 0; b < nb; ++b) {
        c.Score(qp.data(), n_q, &blocks[size_t(b) * c.BlockBytes()], one.data());
        for (int r = 0; r < n_q; ++r) {
          for (int t = 0; t < bt; ++t) {
            const float ref = one[size_t(r) * bt + t];
            EXPECT_NEAR(many[size_t(r) * ld + b * bt + t], ref, 1e-4 * (1 + std::fabs(ref)))
                << info.name << " " << KvKindName(kind);
            p[size_t(r) * ld + b * bt + t] = std::fabs(ref) / 10;
          }
        }
      }
      std::vector<float> acc_many(size_t(n_q) * d, 0.25f), acc_ref(acc_many);
      c.AccumulateBlocks(p.data(), ld, n_q, blocks.data(), nb, acc_many.data());
      std::vector<float> pb(size_t(n_q) * bt);
      for (int b = 0; b < nb; ++b) {
        for (int r = 0; r < n_q; ++r) {
          for (int t = 0; t < bt; ++t) pb[size_t(r) * bt + t] = p[size_t(r) * ld + b * bt + t];
        }
        c.AccumulateWeighted(pb.data(), n_q, &blocks[size_t(b) * c.BlockBytes()], acc_ref.data());
      }
      for (size_t i = 0; i < acc_ref.size(); ++i) {
        EXPECT_NEAR(acc_many[i], acc_ref[i], 1e-3 * (1 + std::fabs(acc_ref[i])))
            << info.name << " " << KvKindName(kind) << " nb=" << nb;
      }
    }
   }
  }
}

}  // namespace
}  // namespace kvc::kv
