// Predictive KV coding (src/kv/predictive.h, AQUA-KV §3): with a lossless body codec the predictive
// cache attends exactly like a plain one (what the write path subtracts, the read path adds back);
// with a lossy codec the error is the codec's error on the residual (closed loop: it does not grow
// over layers), far below the same codec on the raw vectors when the layers are predictable;
// SolveRidge recovers a known map; truncation keeps working; bad input is refused.
#include <gtest/gtest.h>

#include <unistd.h>

#include <cmath>
#include <filesystem>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "kv/cache.h"
#include "kv/calibration_file.h"
#include "kv/predictive.h"
#include "store/kv_format.h"

namespace kvc::kv {
namespace {

constexpr int kL = 4, kHd = 64, kNh = 4, kNkv = 2, kN = 40;
constexpr int kDk = kNkv * kHd, kDv = kNkv * kHd;

KvShape Shape() {
  KvShape s;
  s.n_layer = kL;
  s.n_head = kNh;
  s.n_head_kv = kNkv;
  s.head_dim = kHd;
  s.rope.theta = 10000.0;
  s.rope.n_rot = kHd;
  return s;
}

// Per layer a random map; layer l's K = A_l [K_{l-1}, V_{l-1}] + b + small noise, V = B_l
// [K_{l-1}, V_{l-1}, K_l] + small noise (so good predictors exist), K_0 random, V_0 = B_0 K_0 + noise.
// The file holds the true maps.
struct World {
  std::vector<std::vector<float>> wk, wv;     // [layer] [in, out]
  std::vector<std::vector<float>> k, v;       // [layer] [n, D]
  std::vector<float> q;                       // [n, n_head, hd]
  std::vector<int64_t> seq;
  explicit World(float noise, uint32_t seed = 3) : wk(kL), wv(kL), k(kL), v(kL) {
    std::mt19937 rng(seed);
    std::normal_distribution<float> nd;
    for (int l = 0; l < kL; ++l) {
      if (l > 0) {
        wk[l].resize(size_t(kDk + kDv + 1) * kDk);
        for (auto& x : wk[l]) x = nd(rng) / std::sqrt(float(kDk + kDv));
      }
      const int in_v = (l == 0 ? 0 : kDk + kDv) + kDk + 1;
      wv[l].resize(size_t(in_v) * kDv);
      for (auto& x : wv[l]) x = nd(rng) / std::sqrt(float(in_v));
    }
    seq.resize(kN);
    std::iota(seq.begin(), seq.end(), 0);
    for (int l = 0; l < kL; ++l) {
      k[l].resize(size_t(kN) * kDk);
      v[l].resize(size_t(kN) * kDv);
      for (int t = 0; t < kN; ++t) {
        // x = [K_{l-1}, V_{l-1}] of token t (empty at layer 0)
        std::vector<double> x;
        if (l > 0) {
          for (int i = 0; i < kDk; ++i) x.push_back(k[l - 1][size_t(t) * kDk + i]);
          for (int i = 0; i < kDv; ++i) x.push_back(v[l - 1][size_t(t) * kDv + i]);
        }
        for (int o = 0; o < kDk; ++o) {
          double a = 0;
          if (l == 0) {
            a = 2.0 * nd(rng);
          } else {
            for (size_t i = 0; i < x.size(); ++i) a += x[i] * wk[l][i * kDk + o];
            a += wk[l][x.size() * kDk + o] + noise * nd(rng);
          }
          k[l][size_t(t) * kDk + o] = float(a);
        }
        for (int i = 0; i < kDk; ++i) x.push_back(k[l][size_t(t) * kDk + i]);
        for (int o = 0; o < kDv; ++o) {
          double a = 0;
          for (size_t i = 0; i < x.size(); ++i) a += x[i] * wv[l][i * kDv + o];
          a += wv[l][x.size() * kDv + o] + noise * nd(rng);
          v[l][size_t(t) * kDv + o] = float(a);
        }
      }
    }
    q.resize(size_t(kN) * kNh * kHd);
    for (auto& x : q) x = 0.3f * nd(rng);
  }
  CalibrationFile File(const KvShape& s) const {
    CalibrationFile f;
    f.meta["kind"] = "kv-predict";
    f.meta["n_layer"] = std::to_string(s.n_layer);
    f.meta["n_head_kv"] = std::to_string(s.n_head_kv);
    f.meta["head_dim"] = std::to_string(s.head_dim);
    f.meta["head_dim_v"] = std::to_string(s.DimV());
    f.meta["model_id"] = "test";
    for (int l = 0; l < kL; ++l) {
      if (l > 0) f.tensors["predict.k.L" + std::to_string(l)] = {{kDk + kDv + 1, kDk}, wk[l]};
      const int in_v = (l == 0 ? 0 : kDk + kDv) + kDk + 1;
      f.tensors["predict.v.L" + std::to_string(l)] = {{in_v, kDv}, wv[l]};
    }
    return f;
  }
};

struct TempFile {
  std::string path;
  explicit TempFile(const CalibrationFile& f, const std::string& tag = "") {
    path = (std::filesystem::temp_directory_path() /
            ("kvc_predict_" + tag + std::to_string(::getpid()) + "_" + std::to_string(counter++)))
               .string();
    EXPECT_TRUE(WriteCalibrationFile(path, f).ok());
  }
  ~TempFile() { std::remove(path.c_str()); }
  static inline int counter = 0;
};

// Writes every layer then attends (a forward pass's order), in two batches: [0, 24) then [24, kN).
std::vector<float> RunAll(KvCache& c, const World& w, std::vector<float>* kdec = nullptr) {
  std::vector<float> out(size_t(kN) * kNh * kHd);
  for (auto [a, b] : {std::pair{0, 24}, std::pair{24, kN}}) {
    for (int l = 0; l < kL; ++l) {
      EXPECT_TRUE(c.Write(l, &w.seq[a], b - a, &w.k[l][size_t(a) * kDk], &w.v[l][size_t(a) * kDv]).ok());
      std::vector<float> o(size_t(b - a) * kNh * kHd);
      c.Attend(l, &w.q[size_t(a) * kNh * kHd], &w.seq[a], b - a, o.data());
      if (l == kL - 1) std::copy(o.begin(), o.end(), out.begin() + size_t(a) * kNh * kHd);
    }
  }
  if (kdec) {  // decoded keys of every layer and head (post-RoPE), for error measurements
    kdec->clear();
    for (int l = 0; l < kL; ++l) {
      for (int h = 0; h < kNkv; ++h) {
        std::vector<float> k(size_t(kN) * kHd);
        c.DecodeKeys(l, h, k.data());
        kdec->insert(kdec->end(), k.begin(), k.end());
      }
    }
  }
  return out;
}

double MaxAbsDiff(const std::vector<float>& a, const std::vector<float>& b) {
  double m = 0;
  for (size_t i = 0; i < a.size(); ++i) m = std::max(m, double(std::fabs(a[i] - b[i])));
  return m;
}

TEST(Predictive, LosslessCodecAttendsLikeAPlainCache) {
  const World w(0.05f);
  TempFile tf(w.File(Shape()));
  for (int sinks : {0, 1, 3}) {
    KvCacheConfig plain;
    plain.k_codec = plain.v_codec = "f32";
    plain.sink_tokens = sinks;
    plain.sink_codec = "f32";
    KvCacheConfig pred = plain;
    pred.predict = tf.path;
    auto a = KvCache::Create(Shape(), plain);
    auto b = KvCache::Create(Shape(), pred);
    ASSERT_TRUE(a.ok() && b.ok()) << b.status().ToString();
    std::vector<float> ka, kb;
    const auto oa = RunAll(**a, w, &ka);
    const auto ob = RunAll(**b, w, &kb);
    EXPECT_LT(MaxAbsDiff(oa, ob), 2e-4) << "sinks " << sinks;
    EXPECT_LT(MaxAbsDiff(ka, kb), 2e-3) << "sinks " << sinks;
    EXPECT_EQ((*a)->Memory().KvBytes(), (*b)->Memory().KvBytes());
  }
}

// A session or stored record of a predictive cache holds residuals against its predictors: its
// fingerprint names the predictor weights, so restoring it with another predictor file is
// refused (same weights under another path: same fingerprint).
TEST(Predictive, FingerprintNamesThePredictor) {
  const World w(0.05f);
  CalibrationFile f = w.File(Shape());
  TempFile a(f), a2(f);
  f.tensors["predict.v.L1"].data[3] += 0.25f;
  TempFile b(f);
  auto fp = [](const std::string& path) {
    KvCacheConfig c;
    c.k_codec = c.v_codec = "turbo3";
    c.predict = path;
    auto cache = KvCache::Create(Shape(), c);
    EXPECT_TRUE(cache.ok()) << cache.status().ToString();
    return store::FingerprintOf(**cache, "").text;
  };
  const std::string fa = fp(a.path), fa2 = fp(a2.path), fb = fp(b.path);
  EXPECT_NE(fa.find("predict_sha256="), std::string::npos) << fa;
  EXPECT_EQ(fa, fa2);
  EXPECT_NE(fa, fb);
}

// Closed loop: each layer's key error is the codec's error on its (small) residual, not the error
// of the raw keys (large), and it does not grow with depth.
TEST(Predictive, LossyCodecErrorIsTheResidualsError) {
  const World w(0.05f);
  TempFile tf(w.File(Shape()));
  KvCacheConfig ref;
  ref.k_codec = ref.v_codec = "f32";
  KvCacheConfig raw;
  raw.k_codec = raw.v_codec = "turbo3";
  KvCacheConfig pred = raw;
  pred.predict = tf.path;
  auto cr = KvCache::Create(Shape(), ref);
  auto cq = KvCache::Create(Shape(), raw);
  auto cp = KvCache::Create(Shape(), pred);
  ASSERT_TRUE(cr.ok() && cq.ok() && cp.ok()) << cp.status().ToString();
  std::vector<float> kr, kq, kp;
  const auto orf = RunAll(**cr, w, &kr);
  const auto oq = RunAll(**cq, w, &kq);
  const auto op = RunAll(**cp, w, &kp);
  const size_t per_layer = size_t(kNkv) * kN * kHd;
  for (int l = 1; l < kL; ++l) {
    double eq = 0, ep = 0, e = 0;
    for (size_t i = l * per_layer; i < (l + 1) * per_layer; ++i) {
      eq += std::pow(kq[i] - kr[i], 2);
      ep += std::pow(kp[i] - kr[i], 2);
      e += std::pow(kr[i], 2);
    }
    // The residual has ~0.05² / 1 of the energy: its 3-bit error is ~20x smaller at least.
    EXPECT_LT(ep * 20, eq) << "layer " << l << " rel err predictive " << ep / e << " raw " << eq / e;
  }
  EXPECT_LT(MaxAbsDiff(op, orf), MaxAbsDiff(oq, orf));
  EXPECT_EQ((*cq)->Memory().KvBytes(), (*cp)->Memory().KvBytes());
  // Reconstruction buffers: kept by DecodeKeys (above), freed after the last layer's Attend.
  EXPECT_GT((*cp)->Memory().scratch, 0u);
  auto c2 = KvCache::Create(Shape(), pred);
  ASSERT_TRUE(c2.ok());
  RunAll(**c2, w);
  EXPECT_EQ((*c2)->Memory().scratch, 0u);
}

TEST(Predictive, TruncateThenContinueEqualsAFreshCache) {
  const World w(0.05f);
  TempFile tf(w.File(Shape()));
  KvCacheConfig cfg;
  cfg.k_codec = cfg.v_codec = "q8_0";
  cfg.predict = tf.path;
  auto a = KvCache::Create(Shape(), cfg);
  ASSERT_TRUE(a.ok()) << a.status().ToString();
  RunAll(**a, w);
  ASSERT_TRUE((*a)->TruncateAfter(23).ok());
  EXPECT_EQ((*a)->n_cells(2, 1), 24);
  // The fresh cache gets tokens 0..23 only; both then take the same 16 further tokens (positions
  // continue at 24 in both).
  auto b = KvCache::Create(Shape(), cfg);
  ASSERT_TRUE(b.ok());
  for (int l = 0; l < kL; ++l) {
    ASSERT_TRUE((*b)->Write(l, w.seq.data(), 24, w.k[l].data(), w.v[l].data()).ok());
  }
  std::vector<int64_t> seq_a(16), seq_b(16);
  std::iota(seq_a.begin(), seq_a.end(), kN);  // a has consumed kN tokens
  std::iota(seq_b.begin(), seq_b.end(), 24);
  for (int l = 0; l < kL; ++l) {
    ASSERT_TRUE((*a)->Write(l, seq_a.data(), 16, &w.k[l][size_t(24) * kDk], &w.v[l][size_t(24) * kDv]).ok());
    ASSERT_TRUE((*b)->Write(l, seq_b.data(), 16, &w.k[l][size_t(24) * kDk], &w.v[l][size_t(24) * kDv]).ok());
    std::vector<float> oa(size_t(16) * kNh * kHd), ob(oa.size());
    (*a)->Attend(l, &w.q[size_t(24) * kNh * kHd], seq_a.data(), 16, oa.data());
    (*b)->Attend(l, &w.q[size_t(24) * kNh * kHd], seq_b.data(), 16, ob.data());
    EXPECT_LT(MaxAbsDiff(oa, ob), 1e-5) << "layer " << l;
  }
}

TEST(Predictive, RefusesWhatItCannotServe) {
  const World w(0.05f);
  const KvShape s = Shape();
  TempFile good(w.File(s));
  auto make = [&](KvCacheConfig c) { return KvCache::Create(s, c); };
  KvCacheConfig c;
  c.k_codec = c.v_codec = "turbo3";
  c.predict = good.path;
  // Window / per-channel block codecs and centring.
  for (const char* codec : {"kivi2", "kvquant3", "turbo3:center=1", "q4_0"}) {
    KvCacheConfig x = c;
    x.k_codec = codec;
    auto r = make(x);
    EXPECT_FALSE(r.ok()) << codec;
    if (!r.ok() && std::string(codec) != "kvquant3") {
      EXPECT_NE(r.status().message().find("predict="), std::string::npos) << r.status().ToString();
    }
  }
  {
    KvCacheConfig x = c;
    x.k_transform = "hadamard";
    EXPECT_FALSE(make(x).ok());
    x = c;
    x.position_mode = PositionMode::kInCache;
    EXPECT_FALSE(make(x).ok());
  }
  // A file for another shape, of another kind, with a NaN, missing a tensor; no file.
  {
    KvShape other = s;
    other.n_layer = kL + 1;
    auto r = KvCache::Create(other, c);
    ASSERT_FALSE(r.ok());
    EXPECT_NE(r.status().message().find("was made for"), std::string::npos) << r.status().ToString();
  }
  {
    CalibrationFile f = w.File(s);
    f.meta["kind"] = "kv-stats";
    TempFile t(f, "kind");
    KvCacheConfig x = c;
    x.predict = t.path;
    auto r = make(x);
    ASSERT_FALSE(r.ok());
    EXPECT_NE(r.status().message().find("kv-predict"), std::string::npos) << r.status().ToString();
  }
  {
    CalibrationFile f = w.File(s);
    f.tensors["predict.v.L2"].data[5] = std::nanf("");
    TempFile t(f, "nan");
    KvCacheConfig x = c;
    x.predict = t.path;
    auto r = make(x);
    ASSERT_FALSE(r.ok());
    EXPECT_NE(r.status().message().find("non-finite"), std::string::npos) << r.status().ToString();
  }
  {
    CalibrationFile f = w.File(s);
    f.tensors["predict.k.L1"].data[7] = 1e30f;  // finite, implausible: predictions would overflow
    TempFile t(f, "huge");
    KvCacheConfig x = c;
    x.predict = t.path;
    auto r = make(x);
    ASSERT_FALSE(r.ok());
    EXPECT_NE(r.status().message().find("implausible"), std::string::npos) << r.status().ToString();
  }
  {
    CalibrationFile f = w.File(s);
    f.tensors.erase("predict.k.L3");
    TempFile t(f, "missing");
    KvCacheConfig x = c;
    x.predict = t.path;
    EXPECT_FALSE(make(x).ok());
    x.predict = "/nonexistent/kvc.predict";
    EXPECT_FALSE(make(x).ok());
  }
  // Eviction and re-labelling: refused without touching the cache; layers out of order refused.
  auto r = make(c);
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  KvCache& cache = **r;
  RunAll(cache, w);
  std::vector<int32_t> keep = {0, 5, 9};
  Status st = cache.Keep(1, 0, keep);
  EXPECT_EQ(st.code(), StatusCode::kFailedPrecondition) << st.ToString();
  EXPECT_EQ(cache.n_cells(1, 0), kN);
  std::vector<int64_t> pos(kN, 0);
  EXPECT_EQ(cache.Relabel(1, 0, pos).code(), StatusCode::kFailedPrecondition);
  const int64_t next = kN;
  st = cache.Write(2, &next, 1, w.k[2].data(), w.v[2].data());
  EXPECT_EQ(st.code(), StatusCode::kFailedPrecondition) << st.ToString();
  EXPECT_EQ(cache.n_cells(2, 0), kN);
}

TEST(Predictive, SolveRidgeRecoversAKnownMap) {
  std::mt19937 rng(5);
  std::normal_distribution<double> nd;
  const int in = 6, out = 3, n = 400;
  std::vector<double> w_true(size_t(in) * out);
  for (auto& x : w_true) x = nd(rng);
  std::vector<double> g(size_t(in) * in, 0.0), c(size_t(in) * out, 0.0);
  for (int t = 0; t < n; ++t) {
    std::vector<double> x(in);
    for (int i = 0; i + 1 < in; ++i) x[i] = nd(rng);
    x[in - 1] = 1.0;
    for (int i = 0; i < in; ++i) {
      for (int j = 0; j < in; ++j) g[size_t(i) * in + j] += x[i] * x[j];
      for (int o = 0; o < out; ++o) {
        double y = 0;
        for (int k = 0; k < in; ++k) y += x[k] * w_true[size_t(k) * out + o];
        c[size_t(i) * out + o] += x[i] * y;
      }
    }
  }
  auto w = SolveRidge(g, c, in, out, 0.0);
  ASSERT_TRUE(w.ok()) << w.status().ToString();
  for (size_t i = 0; i < w_true.size(); ++i) EXPECT_NEAR((*w)[i], w_true[i], 1e-6);
  std::vector<double> zero(size_t(in) * in, 0.0);
  EXPECT_FALSE(SolveRidge(zero, c, in, out, 0.0).ok());
  EXPECT_FALSE(SolveRidge(g, c, in, out + 1, 0.0).ok());
}

}  // namespace
}  // namespace kvc::kv
