// The codec contract, run over EVERY registered codec (RegisteredCodecs(), all authors) for keys
// and values: bytes per block == descriptor, round trip finite, fused Score == decode-then-dot,
// AccumulateWeighted == decode-then-axpy, zeros exact, constant groups exact where the format can
// represent them, outliers / values beyond fp16 range never give NaN/inf, and every (K, V) pair
// either builds a KvCache or is refused with a message. A codec that cannot be built without
// extra input (calibration) must say so in its error; it is then skipped here.
#include <cmath>
#include <cstring>
#include <random>
#include <set>
#include <string>
#include <vector>

#include <gtest/gtest.h>

#include "kv/cache.h"
#include "kv/cache_internal.h"
#include "kv/codec.h"
#include "per_target.h"

namespace kvc::kv {
namespace {

constexpr int kDim = 64;

// Formats that reproduce a group of identical (fp16-representable) values exactly.
const std::set<std::string> kExactConstant = {"f32", "f16", "bf16", "q4_0", "q4_1",
                                              "q5_0", "kivi", "kivi2", "kivi4"};

struct Built {
  std::string name;
  KvKind kind;
  std::unique_ptr<Codec> codec;
};

std::vector<Built> BuildAll(int dim = kDim) {
  std::vector<Built> out;
  for (const auto& info : RegisteredCodecs()) {
    for (KvKind kind : {KvKind::kKey, KvKind::kValue}) {
      CodecContext ctx;
      ctx.dim = dim;
      ctx.kind = kind;
      ctx.n_layer = 2;
      ctx.seed = 77;
      auto c = MakeCodec(info.name, ctx);
      if (!c.ok()) {
        EXPECT_FALSE(c.status().message().empty()) << info.name;
        continue;
      }
      out.push_back({info.name, kind, std::move(c).value()});
    }
  }
  return out;
}

std::string Id(const Built& b) { return b.name + "/" + KvKindName(b.kind); }

std::vector<float> Encoded(Codec& c, const std::vector<float>& x, std::vector<uint8_t>* block) {
  block->assign(c.BlockBytes(), 0);
  c.Encode(x.data(), block->data());
  std::vector<float> y(x.size());
  c.Decode(block->data(), y.data());
  return y;
}

TEST(CodecContract, RegistryHasCodecs) { EXPECT_GE(RegisteredCodecs().size(), 4u); }

TEST(CodecContract, BlockBytesMatchDescriptorAndStayInBounds) {
  for (auto& b : BuildAll()) {
    Codec& c = *b.codec;
    EXPECT_EQ(c.dim(), kDim) << Id(b);
    EXPECT_GT(c.BlockBytes(), 0u) << Id(b);
    EXPECT_EQ(c.flush_quantum() % c.block_tokens(), 0) << Id(b);
    EXPECT_NEAR(c.BitsPerValue() * c.block_tokens() * c.dim() / 8.0, double(c.BlockBytes()), 1e-9);
    // Encode writes inside its block only.
    const size_t bb = c.BlockBytes();
    std::vector<uint8_t> buf(bb + 64, 0xA5);
    std::mt19937 rng(1);
    std::normal_distribution<float> nd;
    std::vector<float> x(size_t(c.block_tokens()) * kDim);
    for (auto& v : x) v = nd(rng);
    c.Encode(x.data(), buf.data());
    for (size_t i = bb; i < buf.size(); ++i) ASSERT_EQ(buf[i], 0xA5) << Id(b) << " byte " << i;
    // Stored bytes through the store equal blocks x BlockBytes.
    Stream s;
    CodecContext ctx;
    ctx.dim = kDim;
    ctx.kind = b.kind;
    ctx.n_layer = 2;
    ctx.seed = 77;
    s.codec = std::move(MakeCodec(b.name, ctx)).value();
    s.dim = s.dim_in = kDim;
    const int n = 3 * std::max(c.flush_quantum(), 1) + c.residual_tokens() + 5;
    std::vector<float> xs(size_t(n) * kDim);
    for (auto& v : xs) v = nd(rng);
    for (int t = 0; t < n; ++t) s.Append(&xs[size_t(t) * kDim], 1);
    EXPECT_EQ(s.n(), n) << Id(b);
    EXPECT_EQ(s.n_packed % c.block_tokens(), 0) << Id(b);
    EXPECT_EQ(s.packed.size(), size_t(s.n_packed / c.block_tokens()) * bb) << Id(b);
  }
}

KVC_PER_TARGET_SUITE(CodecContractSimd);  // once per Highway target (per_target.h)

TEST_P(CodecContractSimd, FusedEqualsDecodeThenDotAndAxpy) {
  for (auto& b : BuildAll()) {
    Codec& c = *b.codec;
    const int bt = c.block_tokens(), nq = 4;
    std::mt19937 rng(3);
    std::normal_distribution<float> nd;
    std::vector<float> x(size_t(bt) * kDim), q(size_t(nq) * kDim), p(size_t(nq) * bt);
    for (auto& v : x) v = nd(rng);
    for (auto& v : q) v = nd(rng);
    for (auto& v : p) v = std::fabs(nd(rng));
    std::vector<uint8_t> block;
    auto y = Encoded(c, x, &block);
    for (float v : y) ASSERT_TRUE(std::isfinite(v)) << Id(b);
    std::vector<float> qp(size_t(nq) * c.PreparedQueryDim());
    c.PrepareQuery(q.data(), nq, qp.data());
    std::vector<float> sc(size_t(nq) * bt);
    c.Score(qp.data(), nq, block.data(), sc.data());
    for (int r = 0; r < nq; ++r) {
      for (int t = 0; t < bt; ++t) {
        double ref = 0, mag = 0;
        for (int i = 0; i < kDim; ++i) {
          ref += double(q[r * kDim + i]) * y[size_t(t) * kDim + i];
          mag += std::fabs(double(q[r * kDim + i]) * y[size_t(t) * kDim + i]);
        }
        EXPECT_NEAR(sc[size_t(r) * bt + t], ref, 1e-4 * mag + 1e-5) << Id(b) << " r " << r;
      }
    }
    std::vector<float> o(size_t(nq) * kDim, 0.5f);
    c.AccumulateWeighted(p.data(), nq, block.data(), o.data());
    for (int r = 0; r < nq; ++r) {
      for (int i = 0; i < kDim; ++i) {
        double ref = 0.5, mag = 0.5;
        for (int t = 0; t < bt; ++t) {
          ref += double(p[size_t(r) * bt + t]) * y[size_t(t) * kDim + i];
          mag += std::fabs(double(p[size_t(r) * bt + t]) * y[size_t(t) * kDim + i]);
        }
        EXPECT_NEAR(o[size_t(r) * kDim + i], ref, 1e-4 * mag) << Id(b);
      }
    }
  }
}

TEST_P(CodecContractSimd, ZerosAndConstants) {
  for (auto& b : BuildAll()) {
    Codec& c = *b.codec;
    std::vector<uint8_t> block;
    std::vector<float> x(size_t(c.block_tokens()) * kDim, 0.f);
    auto y = Encoded(c, x, &block);
    for (float v : y) ASSERT_EQ(v, 0.f) << Id(b) << ": zeros must decode to zeros";
    std::fill(x.begin(), x.end(), 1.5f);
    y = Encoded(c, x, &block);
    for (float v : y) {
      ASSERT_TRUE(std::isfinite(v)) << Id(b);
      if (kExactConstant.count(b.name)) ASSERT_EQ(v, 1.5f) << Id(b);
    }
  }
}

TEST_P(CodecContractSimd, OutliersAndHugeValuesStayFinite) {
  for (auto& b : BuildAll()) {
    Codec& c = *b.codec;
    const int bt = c.block_tokens();
    std::mt19937 rng(5);
    std::uniform_real_distribution<float> u(-1.f, 4.f);
    std::vector<float> x(size_t(bt) * kDim);
    for (auto& v : x) v = u(rng);
    x[7] = -1e5f;
    std::vector<uint8_t> block;
    auto y = Encoded(c, x, &block);
    for (float v : y) ASSERT_TRUE(std::isfinite(v)) << Id(b) << " (-1e5 outlier)";
    std::vector<float> q(kDim, 1.f), sc(bt);
    std::vector<float> qp(c.PreparedQueryDim());
    c.PrepareQuery(q.data(), 1, qp.data());
    c.Score(qp.data(), 1, block.data(), sc.data());
    for (float v : sc) ASSERT_TRUE(std::isfinite(v)) << Id(b);
    for (size_t i = 0; i < x.size(); ++i) x[i] = (i % 2 ? 1.f : -1.f) * (70000.f + 1000.f * (i % 7));
    y = Encoded(c, x, &block);
    for (float v : y) ASSERT_TRUE(std::isfinite(v)) << Id(b) << " (|x| > 65504)";
  }
}

TEST(CodecContract, EveryPairBuildsOrIsRefusedWithAMessage) {
  KvShape s;
  s.n_layer = 2;
  s.n_head = 2;
  s.n_head_kv = 1;
  s.head_dim = kDim;
  s.rope.n_rot = kDim;
  for (const auto& k : RegisteredCodecs()) {
    for (const auto& v : RegisteredCodecs()) {
      KvCacheConfig cfg;
      cfg.k_codec = k.name;
      cfg.v_codec = v.name;
      auto c = KvCache::Create(s, cfg);
      if (!c.ok()) {
        EXPECT_FALSE(c.status().message().empty()) << k.name << " x " << v.name;
        continue;
      }
      // It also attends: a few tokens written, one query, finite output.
      std::vector<float> kx(40 * kDim), vx(40 * kDim), q(2 * kDim, 0.1f), o(2 * kDim);
      std::mt19937 rng(9);
      std::normal_distribution<float> nd;
      for (auto& e : kx) e = nd(rng);
      for (auto& e : vx) e = nd(rng);
      std::vector<int64_t> seq(40);
      for (int i = 0; i < 40; ++i) seq[i] = i;
      ASSERT_TRUE((*c)->Write(0, seq.data(), 40, kx.data(), vx.data()).ok());
      int64_t qs = 39;
      (*c)->Attend(0, q.data(), &qs, 1, o.data());
      for (float e : o) ASSERT_TRUE(std::isfinite(e)) << k.name << " x " << v.name;
    }
  }
}

}  // namespace
}  // namespace kvc::kv
