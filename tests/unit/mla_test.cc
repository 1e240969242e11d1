// MLA (deepseek2): absorbed attention through the latent KV cache vs the naive decompressed
// reference, on small random-weight GGUF files written here (n_layer 2, n_embd 64, n_head 4,
// kv_lora_rank 32, rope dims 16, qk_nope 32, v_head_dim 32, vocab 64).
#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>
#include <numeric>
#include <random>
#include <string>
#include <unistd.h>
#include <vector>

#include "cpu/ops.h"
#include "gguf_writer.h"
#include "model/mla.h"
#include "model/model.h"

namespace kvc {
namespace {

using gguf::testutil::GgufWriter;

constexpr int kLayers = 2, kEmbd = 64, kHeads = 4, kRank = 32, kRope = 16, kNope = 32, kV = 32,
              kVocab = 64, kFf = 96;

struct Opts {
  int q_lora = 0;           // 0: attn_q.weight
  bool moe = false;         // add an ffn_gate_inp tensor to layer 1
  std::string scaling;      // rope.scaling.type if non-empty
  bool split = false;       // attn_k_b/attn_v_b + key_length_mla (newer llama.cpp conversions)
};

std::string WriteModel(const Opts& o, uint32_t seed) {
  std::mt19937 rng(seed);
  auto mat = [&](int64_t n_in, int64_t n_out) {
    std::normal_distribution<float> nd(0.f, 1.0f / std::sqrt(float(n_in)));
    std::vector<float> w(size_t(n_in * n_out));
    for (auto& x : w) x = nd(rng);
    return w;
  };
  auto norm = [&](int64_t n) {
    std::uniform_real_distribution<float> ud(0.5f, 1.5f);
    std::vector<float> w(n);
    for (auto& x : w) x = ud(rng);
    return w;
  };
  GgufWriter w;
  const std::string p = "deepseek2.";
  w.AddString("general.architecture", "deepseek2").AddString("general.name", "mla-test");
  w.AddUint32(p + "block_count", kLayers).AddUint32(p + "embedding_length", kEmbd);
  w.AddUint32(p + "attention.head_count", kHeads)
      .AddUint32(p + "attention.head_count_kv", o.split ? 1 : kHeads);
  w.AddUint32(p + "feed_forward_length", kFf).AddUint32(p + "context_length", 4096);
  w.AddFloat32(p + "attention.layer_norm_rms_epsilon", 1e-6f);
  w.AddFloat32(p + "rope.freq_base", 10000.f);
  w.AddUint32(p + "attention.kv_lora_rank", kRank);
  if (o.q_lora) w.AddUint32(p + "attention.q_lora_rank", o.q_lora);
  if (o.split) {
    w.AddUint32(p + "attention.key_length", kRank + kRope).AddUint32(p + "attention.value_length", kRank);
    w.AddUint32(p + "attention.key_length_mla", kNope + kRope);
    w.AddUint32(p + "attention.value_length_mla", kV);
  } else {
    w.AddUint32(p + "attention.key_length", kNope + kRope);
    w.AddUint32(p + "attention.value_length", kV);
  }
  w.AddUint32(p + "rope.dimension_count", kRope);
  if (!o.scaling.empty()) w.AddString(p + "rope.scaling.type", o.scaling);
  std::vector<std::string> toks;
  for (int i = 0; i < kVocab; ++i) toks.push_back(std::string(1, char('!' + i)));
  w.AddString("tokenizer.ggml.model", "gpt2").AddStringArray("tokenizer.ggml.tokens", toks);
  w.AddArray<int32_t>("tokenizer.ggml.token_type", std::vector<int32_t>(kVocab, 1));
  w.AddStringArray("tokenizer.ggml.merges", {});
  w.AddTensorF32("token_embd.weight", {kEmbd, kVocab}, mat(1, kEmbd * kVocab));
  for (int l = 0; l < kLayers; ++l) {
    const std::string b = "blk." + std::to_string(l) + ".";
    w.AddTensorF32(b + "attn_norm.weight", {kEmbd}, norm(kEmbd));
    if (o.q_lora) {
      w.AddTensorF32(b + "attn_q_a.weight", {kEmbd, o.q_lora}, mat(kEmbd, o.q_lora));
      w.AddTensorF32(b + "attn_q_a_norm.weight", {o.q_lora}, norm(o.q_lora));
      w.AddTensorF32(b + "attn_q_b.weight", {o.q_lora, kHeads * (kNope + kRope)},
                     mat(o.q_lora, kHeads * (kNope + kRope)));
    } else {
      w.AddTensorF32(b + "attn_q.weight", {kEmbd, kHeads * (kNope + kRope)},
                     mat(kEmbd, kHeads * (kNope + kRope)));
    }
    // Larger scale on the latent path so attention is not uniform.
    auto kva = mat(kEmbd, kRank + kRope);
    for (auto& x : kva) x *= 3;
    w.AddTensorF32(b + "attn_kv_a_mqa.weight", {kEmbd, kRank + kRope}, kva);
    w.AddTensorF32(b + "attn_kv_a_norm.weight", {kRank}, norm(kRank));
    const auto kvb = mat(kRank, kHeads * (kNope + kV));  // [H*(nope+v), R]
    if (!o.split) {
      w.AddTensorF32(b + "attn_kv_b.weight", {kRank, kHeads * (kNope + kV)}, kvb);
    } else {
      // As convert_hf_to_gguf.py: k_b = kv_b[h, :nope, :]ᵀ -> [H, R, nope]; v_b = kv_b[h, nope:, :].
      std::vector<float> kb(size_t(kHeads) * kRank * kNope), vb(size_t(kHeads) * kV * kRank);
      for (int h = 0; h < kHeads; ++h) {
        for (int d = 0; d < kNope + kV; ++d) {
          for (int e = 0; e < kRank; ++e) {
            const float x = kvb[(size_t(h) * (kNope + kV) + d) * kRank + e];
            if (d < kNope) kb[(size_t(h) * kRank + e) * kNope + d] = x;
            else vb[(size_t(h) * kV + d - kNope) * kRank + e] = x;
          }
        }
      }
      w.AddTensorF32(b + "attn_k_b.weight", {kNope, kRank, kHeads}, kb);
      w.AddTensorF32(b + "attn_v_b.weight", {kRank, kV, kHeads}, vb);
    }
    w.AddTensorF32(b + "attn_output.weight", {kHeads * kV, kEmbd}, mat(kHeads * kV, kEmbd));
    w.AddTensorF32(b + "ffn_norm.weight", {kEmbd}, norm(kEmbd));
    w.AddTensorF32(b + "ffn_gate.weight", {kEmbd, kFf}, mat(kEmbd, kFf));
    w.AddTensorF32(b + "ffn_up.weight", {kEmbd, kFf}, mat(kEmbd, kFf));
    w.AddTensorF32(b + "ffn_down.weight", {kFf, kEmbd}, mat(kFf, kEmbd));
    if (o.moe && l == 1) w.AddTensorF32(b + "ffn_gate_inp.weight", {kEmbd, 4}, mat(kEmbd, 4));
  }
  w.AddTensorF32("output_norm.weight", {kEmbd}, norm(kEmbd));
  w.AddTensorF32("output.weight", {kEmbd, kVocab}, mat(kEmbd, kVocab));
  const std::string path = ::testing::TempDir() + "mla_test_" + std::to_string(getpid()) + "_" +
                           std::to_string(seed) + ".gguf";
  EXPECT_TRUE(w.WriteFile(path));
  return path;
}

// Naive full-model forward: per layer the pre-RoPE latents of every kept token, decompressed per
// head at each step (MlaNaiveAttention), no KV cache object involved.
class NaiveModel {
 public:
  explicit NaiveModel(const Model& m) : m_(m), lat_(kLayers), pos_(kLayers) {}
  // logits [n, n_vocab]
  std::vector<float> Eval(const std::vector<int32_t>& toks) {
    const ModelConfig& c = m_.config();
    const MlaConfig& mc = m_.mla()->cfg;
    const int n = int(toks.size()), E = c.n_embd;
    std::vector<float> x(size_t(n) * E), h(x.size()), t(x.size());
    const auto& emb = m_.token_embd();
    for (int i = 0; i < n; ++i) {
      gguf::DequantizeRow(emb.type(), emb.data + size_t(toks[i]) * E * 4, &x[size_t(i) * E], E);
    }
    std::vector<int64_t> qpos(n);
    std::iota(qpos.begin(), qpos.end(), n_past_);
    for (int l = 0; l < kLayers; ++l) {
      const auto& L = m_.layers()[l];
      const MlaLayer& ML = m_.mla()->layers[l];
      cpu::RmsNorm(x.data(), L.attn_norm.data(), n, E, c.rms_eps, h.data());
      std::vector<float> q(size_t(n) * kHeads * mc.KeyLength()), lat(size_t(n) * mc.LatentDim());
      MlaProject(mc, ML, h.data(), n, q.data(), lat.data());
      lat_[l].insert(lat_[l].end(), lat.begin(), lat.end());
      pos_[l].insert(pos_[l].end(), qpos.begin(), qpos.end());
      std::vector<float> o(size_t(n) * kHeads * kV);
      MlaNaiveAttention(mc, ML, c.rope, lat_[l].data(), pos_[l].data(), int(pos_[l].size()),
                        q.data(), qpos.data(), n, o.data());
      cpu::MatMul(*ML.wo, o.data(), n, t.data());
      for (size_t i = 0; i < x.size(); ++i) x[i] += t[i];
      cpu::RmsNorm(x.data(), L.ffn_norm.data(), n, E, c.rms_eps, h.data());
      std::vector<float> g(size_t(n) * c.n_ff), u(g.size());
      cpu::MatMul(*L.w_gate, h.data(), n, g.data());
      cpu::MatMul(*L.w_up, h.data(), n, u.data());
      cpu::SwiGlu(g.data(), u.data(), int64_t(n) * c.n_ff, g.data());
      cpu::MatMul(*L.w_down, g.data(), n, t.data());
      for (size_t i = 0; i < x.size(); ++i) x[i] += t[i];
    }
    n_past_ += n;
    cpu::RmsNorm(x.data(), m_.output_norm().data(), n, E, c.rms_eps, h.data());
    std::vector<float> logits(size_t(n) * c.n_vocab);
    cpu::MatMul(m_.output(), h.data(), n, logits.data());
    return logits;
  }
  void Keep(int l, const std::vector<int32_t>& keep) {
    const int D = m_.mla()->cfg.LatentDim();
    std::vector<float> lat;
    std::vector<int64_t> pos;
    for (int32_t i : keep) {
      lat.insert(lat.end(), lat_[l].begin() + size_t(i) * D, lat_[l].begin() + size_t(i + 1) * D);
      pos.push_back(pos_[l][i]);
    }
    lat_[l] = lat;
    pos_[l] = pos;
  }

 private:
  const Model& m_;
  std::vector<std::vector<float>> lat_;    // [layer][n_kept, LatentDim] pre-RoPE
  std::vector<std::vector<int64_t>> pos_;  // [layer][n_kept]
  int64_t n_past_ = 0;
};

// max |a - b| / max |b|
double RelErr(const std::vector<float>& a, const std::vector<float>& b) {
  double d = 0, m = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    d = std::max(d, double(std::fabs(a[i] - b[i])));
    m = std::max(m, double(std::fabs(b[i])));
  }
  return d / std::max(m, 1e-30);
}

constexpr double kTol = 2e-5;  // f32 cache; float GEMMs vs double reference sums

std::vector<int32_t> RandomTokens(int n, std::mt19937& rng) {
  std::uniform_int_distribution<int> ud(0, kVocab - 1);
  std::vector<int32_t> t(n);
  for (auto& x : t) x = ud(rng);
  return t;
}

void CheckAbsorbedEqualsNaive(int q_lora) {
  const std::string path = WriteModel({q_lora, false, ""}, 7 + q_lora);
  auto m = Model::Load(path);
  ASSERT_TRUE(m.ok()) << m.status().message();
  const Model& model = **m;
  ASSERT_NE(model.mla(), nullptr);
  kv::KvCacheConfig cc;
  cc.k_codec = cc.v_codec = "f32";
  auto s = Session::Create(model, cc, "", Session::Options{4096, 512});
  ASSERT_TRUE(s.ok()) << s.status().message();
  Session& sess = **s;
  NaiveModel naive(model);
  std::mt19937 rng(3);
  // Lengths 1, 17 and 300 (1 + 16 + 283: a single token, a prefill, a long prefill), then
  // decode steps (fused path).
  double worst = 0;
  int64_t total = 0;
  for (int n : {1, 16, 283, 1, 1}) {
    auto toks = RandomTokens(n, rng);
    std::vector<float> got;
    ASSERT_TRUE(sess.Eval(toks, true, &got).ok());
    auto want = naive.Eval(toks);
    total += n;
    const double e = RelErr(got, want);
    worst = std::max(worst, e);
    EXPECT_LT(e, kTol) << "after " << total << " tokens";
    std::printf("MLA rel err after %lld tokens: %.3g\n", (long long)total, e);
  }
  // Eviction on the latent: keep every third token and the last 20, per layer.
  for (int l = 0; l < kLayers; ++l) {
    const int64_t nc = sess.cache().n_cells(l, 0);
    ASSERT_EQ(nc, total);
    std::vector<int32_t> keep;
    for (int32_t i = 0; i < nc; ++i) {
      if (i % 3 == 0 || i >= nc - 20) keep.push_back(i);
    }
    ASSERT_TRUE(sess.cache().Keep(l, 0, keep).ok());
    naive.Keep(l, keep);
  }
  for (int n : {1, 9, 1}) {
    auto toks = RandomTokens(n, rng);
    std::vector<float> got;
    ASSERT_TRUE(sess.Eval(toks, true, &got).ok());
    auto want = naive.Eval(toks);
    const double e = RelErr(got, want);
    EXPECT_LT(e, kTol) << "after eviction, " << n << " tokens";
    std::printf("MLA rel err after eviction + %d tokens: %.3g\n", n, e);
  }
  std::remove(path.c_str());
}

TEST(Mla, AbsorbedEqualsNaiveNoQLora) { CheckAbsorbedEqualsNaive(0); }
TEST(Mla, AbsorbedEqualsNaiveWithQLora) { CheckAbsorbedEqualsNaive(24); }

// The reference must be able to fail: a wrong scale or a missing RoPE is detected.
TEST(Mla, NaiveReferenceDetectsPerturbation) {
  const std::string path = WriteModel({}, 11);
  auto m = Model::Load(path);
  ASSERT_TRUE(m.ok()) << m.status().message();
  const MlaConfig& mc = (*m)->mla()->cfg;
  const MlaLayer& L = (*m)->mla()->layers[0];
  const int n = 40;
  std::mt19937 rng(5);
  std::normal_distribution<float> nd;
  std::vector<float> h(size_t(n) * kEmbd);
  for (auto& x : h) x = nd(rng);
  std::vector<float> q(size_t(n) * kHeads * mc.KeyLength()), lat(size_t(n) * mc.LatentDim());
  MlaProject(mc, L, h.data(), n, q.data(), lat.data());
  std::vector<int64_t> pos(n);
  std::iota(pos.begin(), pos.end(), 0);
  std::vector<float> a(size_t(n) * kHeads * kV), b(a.size());
  MlaNaiveAttention(mc, L, (*m)->config().rope, lat.data(), pos.data(), n, q.data(), pos.data(), n,
                    a.data());
  kv::RopeParams shifted = (*m)->config().rope;
  shifted.theta = 500;  // different RoPE frequencies
  MlaNaiveAttention(mc, L, shifted, lat.data(), pos.data(), n, q.data(), pos.data(), n, b.data());
  EXPECT_GT(RelErr(b, a), 100 * kTol);
  std::remove(path.c_str());
}

TEST(Mla, LatentBytesPerToken) {
  const std::string path = WriteModel({}, 13);
  auto m = Model::Load(path);
  ASSERT_TRUE(m.ok()) << m.status().message();
  const ModelConfig& c = (*m)->config();
  EXPECT_EQ(c.n_head_kv, 1);
  EXPECT_EQ(c.head_dim, kRank + kRope);
  EXPECT_EQ(c.head_dim_v, kRank);
  // f16: K (latent + rope) and the V copy of the latent.
  EXPECT_DOUBLE_EQ(c.KvBytesPerToken(16, 0), double((kRank + kRope) * 2 * kLayers));
  EXPECT_DOUBLE_EQ(c.KvBytesPerToken(0, 16), double(kRank * 2 * kLayers));
  for (const char* codec : {"f16", "f32"}) {
    kv::KvCacheConfig cc;
    cc.k_codec = cc.v_codec = codec;
    const int bytes = std::string(codec) == "f16" ? 2 : 4;
    auto s = Session::Create(**m, cc, "", Session::Options{4096, 512});
    ASSERT_TRUE(s.ok());
    std::mt19937 rng(1);
    const int n = 256;  // a multiple of the cache's grow step: allocation == contents
    ASSERT_TRUE((*s)->Eval(RandomTokens(n, rng), false, nullptr).ok());
    const auto mem = (*s)->cache().Memory();
    size_t k = 0, v = 0;
    for (const auto& L : mem.layers) k += L.k_packed + L.k_tail, v += L.v_packed + L.v_tail;
    EXPECT_EQ(k, size_t(n) * (kRank + kRope) * bytes * kLayers) << codec;
    EXPECT_EQ(v, size_t(n) * kRank * bytes * kLayers) << codec;
  }
  std::remove(path.c_str());
}

// The split attn_k_b/attn_v_b layout of the same weights gives the same logits.
TEST(Mla, SplitKvbLayoutMatches) {
  Opts a, b;
  b.split = true;
  const std::string pa = WriteModel(a, 23), pb = WriteModel(b, 23);
  auto ma = Model::Load(pa);
  auto mb = Model::Load(pb);
  ASSERT_TRUE(ma.ok()) << ma.status().message();
  ASSERT_TRUE(mb.ok()) << mb.status().message();
  EXPECT_TRUE((*mb)->mla()->cfg.split_kv_b);
  EXPECT_EQ((*mb)->mla()->cfg.qk_nope, kNope);
  EXPECT_EQ((*mb)->mla()->cfg.v_head_dim, kV);
  kv::KvCacheConfig cc;
  cc.k_codec = cc.v_codec = "f32";
  auto sa = Session::Create(**ma, cc, "", Session::Options{});
  auto sb = Session::Create(**mb, cc, "", Session::Options{});
  ASSERT_TRUE(sa.ok() && sb.ok());
  std::mt19937 rng(9);
  const auto toks = RandomTokens(33, rng);
  std::vector<float> la, lb;
  ASSERT_TRUE((*sa)->Eval(toks, true, &la).ok());
  ASSERT_TRUE((*sb)->Eval(toks, true, &lb).ok());
  EXPECT_LT(RelErr(lb, la), 1e-6);
  std::remove(pa.c_str());
  std::remove(pb.c_str());
}

TEST(Mla, InfoLinesReportLatentAndMhaBytes) {
  MlaConfig c;
  c.n_head = kHeads;
  c.kv_lora_rank = kRank;
  c.qk_rope = kRope;
  c.qk_nope = kNope;
  c.v_head_dim = kV;
  const std::string s = DescribeMlaKv(c, kLayers, 2);
  const int lat = (kRank + kRope) * 2 * kLayers, vcopy = kRank * 2 * kLayers;
  const int mha = kHeads * (kNope + kRope + kV) * 2 * kLayers;
  EXPECT_NE(s.find("= " + std::to_string(lat) + " B"), std::string::npos) << s;
  EXPECT_NE(s.find("= " + std::to_string(vcopy) + " B"), std::string::npos) << s;
  EXPECT_NE(s.find("stored " + std::to_string(lat + vcopy) + " B"), std::string::npos) << s;
  EXPECT_NE(s.find("= " + std::to_string(mha) + " B/token"), std::string::npos) << s;
}

TEST(Mla, RefusesUnsupported) {
  {
    const std::string path = WriteModel({0, true, ""}, 17);
    auto m = Model::Load(path);
    ASSERT_FALSE(m.ok());
    EXPECT_EQ(m.status().code(), StatusCode::kUnimplemented);
    EXPECT_NE(m.status().message().find("ffn_gate_inp"), std::string::npos) << m.status().message();
    std::remove(path.c_str());
  }
  {
    const std::string path = WriteModel({0, false, "yarn"}, 19);
    auto m = Model::Load(path);
    ASSERT_FALSE(m.ok());
    EXPECT_EQ(m.status().code(), StatusCode::kUnimplemented);
    EXPECT_NE(m.status().message().find("yarn"), std::string::npos) << m.status().message();
    std::remove(path.c_str());
  }
}

}  // namespace
}  // namespace kvc
