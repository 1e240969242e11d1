// The KV seam: attention through the cache against a direct reference, segment merge exactness,
// fused vs tiled reads, eviction bookkeeping, bad input.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

#include "kv/cache.h"
#include "kv/codecs/kvquant.h"
#include "kv/rope.h"
#include "per_target.h"

namespace kvc::kv {
namespace {

KvShape SmallShape() {
  KvShape s;
  s.n_layer = 2;
  s.n_head = 6;
  s.n_head_kv = 2;
  s.head_dim = 64;
  s.rope.theta = 10000.0;
  s.rope.n_rot = 64;
  return s;
}

std::vector<float> Randn(size_t n, uint32_t seed, float scale = 1.0f) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> nd(0.f, scale);
  std::vector<float> v(n);
  for (auto& x : v) x = nd(rng);
  return v;
}

// Direct causal GQA attention over every token written (double precision), RoPE by seq.
std::vector<float> Reference(const KvShape& s, const std::vector<float>& q, const std::vector<float>& k,
                             const std::vector<float>& v, int n_q, int n_kv, int q_offset) {
  const int hd = s.head_dim, g = s.n_head / s.n_head_kv;
  Rope rope(s.rope);
  std::vector<float> kr(k);
  for (int t = 0; t < n_kv; ++t) {
    rope.ApplySame(&kr[size_t(t) * s.n_head_kv * hd], s.n_head_kv, hd, t);
  }
  std::vector<float> out(size_t(n_q) * s.n_head * hd, 0.f);
  for (int i = 0; i < n_q; ++i) {
    const int qs = q_offset + i;
    for (int h = 0; h < s.n_head; ++h) {
      std::vector<float> qq(q.begin() + (size_t(i) * s.n_head + h) * hd,
                            q.begin() + (size_t(i) * s.n_head + h + 1) * hd);
      rope.ApplySame(qq.data(), 1, hd, qs);
      const int kh = h / g;
      std::vector<double> sc(qs + 1);
      double mx = -1e300;
      for (int t = 0; t <= qs; ++t) {
        double d = 0;
        for (int c = 0; c < hd; ++c) d += double(qq[c]) * kr[(size_t(t) * s.n_head_kv + kh) * hd + c];
        sc[t] = d / std::sqrt(double(hd));
        mx = std::max(mx, sc[t]);
      }
      double sum = 0;
      for (auto& x : sc) sum += (x = std::exp(x - mx));
      for (int t = 0; t <= qs; ++t) {
        for (int c = 0; c < hd; ++c) {
          out[(size_t(i) * s.n_head + h) * hd + c] +=
              float(sc[t] / sum * v[(size_t(t) * s.n_head_kv + kh) * hd + c]);
        }
      }
    }
  }
  return out;
}

struct Stream {
  std::vector<float> k, v, q;
};

Stream MakeStream(const KvShape& s, int n, uint32_t seed) {
  Stream st;
  st.k = Randn(size_t(n) * s.n_head_kv * s.head_dim, seed);
  st.v = Randn(size_t(n) * s.n_head_kv * s.head_dim, seed + 1);
  st.q = Randn(size_t(n) * s.n_head * s.head_dim, seed + 2);
  return st;
}

// Writes tokens [0, n_prefill) as one batch, then single tokens up to n; returns outputs of all
// queries [n, n_head, hd] for layer 0.
std::vector<float> RunCache(KvCache& c, const KvShape& s, const Stream& st, int n, int n_prefill) {
  const int hd = s.head_dim;
  std::vector<float> out(size_t(n) * s.n_head * hd);
  int done = 0;
  while (done < n) {
    const int nb = done == 0 ? n_prefill : 1;
    std::vector<int64_t> seq(nb);
    for (int i = 0; i < nb; ++i) seq[i] = done + i;
    for (int l = 0; l < s.n_layer; ++l) {
      EXPECT_TRUE(c.Write(l, seq.data(), nb, &st.k[size_t(done) * s.n_head_kv * hd],
                          &st.v[size_t(done) * s.n_head_kv * hd]).ok());
    }
    c.Attend(0, &st.q[size_t(done) * s.n_head * hd], seq.data(), nb, &out[size_t(done) * s.n_head * hd]);
    done += nb;
  }
  return out;
}

double MaxAbsDiff(const std::vector<float>& a, const std::vector<float>& b) {
  double m = 0;
  for (size_t i = 0; i < a.size(); ++i) m = std::max(m, double(std::fabs(a[i] - b[i])));
  return m;
}

KVC_PER_TARGET_SUITE(KvCacheSimd);  // once per Highway target (per_target.h)

TEST_P(KvCacheSimd, F32MatchesReferencePrefillAndDecode) {
  const KvShape s = SmallShape();
  const int n = 45;
  Stream st = MakeStream(s, n, 7);
  KvCacheConfig cfg;
  cfg.k_codec = cfg.v_codec = "f32";
  auto c = KvCache::Create(s, cfg);
  ASSERT_TRUE(c.ok()) << c.status().ToString();
  auto out = RunCache(**c, s, st, n, 37);  // tiled path for the prefill, fused for the steps
  auto ref = Reference(s, st.q, st.k, st.v, n, n, 0);
  EXPECT_LT(MaxAbsDiff(out, ref), 2e-5);
}

// A window codec (KIVI) prefilled in one batch must attend exactly as the same tokens streamed
// one at a time (write, attend, flush), so perplexity measures what decoding sees.
TEST_P(KvCacheSimd, WindowCodecBatchedPrefillEqualsStreaming) {
  const KvShape s = SmallShape();
  const int n = 100;
  Stream st = MakeStream(s, n, 21);
  for (const char* spec : {"kivi:bits=2,group=32,residual=32", "kivi:bits=4,group=32,residual=64"}) {
    KvCacheConfig cfg;
    cfg.k_codec = cfg.v_codec = spec;
    auto batched = KvCache::Create(s, cfg);
    auto streamed = KvCache::Create(s, cfg);
    ASSERT_TRUE(batched.ok() && streamed.ok()) << spec;
    auto ob = RunCache(**batched, s, st, n, n);  // one Write + one Attend of 100 queries
    auto os = RunCache(**streamed, s, st, n, 1);  // 100 x (Write 1, Attend 1)
    EXPECT_LT(MaxAbsDiff(ob, os), 2e-5) << spec;
    // And it is not simply the f16 answer: the quantized past is really read.
    KvCacheConfig f16;
    auto full = KvCache::Create(s, f16);
    auto of = RunCache(**full, s, st, n, n);
    EXPECT_GT(MaxAbsDiff(ob, of), 1e-3) << spec;
  }
}

TEST_P(KvCacheSimd, SinkSegmentMergesExactly) {
  const KvShape s = SmallShape();
  const int n = 40;
  Stream st = MakeStream(s, n, 11);
  KvCacheConfig one, two;
  one.k_codec = one.v_codec = "f32";
  two = one;
  two.sink_tokens = 4;
  two.sink_codec = "f32";
  auto a = KvCache::Create(s, one);
  auto b = KvCache::Create(s, two);
  ASSERT_TRUE(a.ok() && b.ok());
  auto oa = RunCache(**a, s, st, n, 9);
  auto ob = RunCache(**b, s, st, n, 9);
  EXPECT_LT(MaxAbsDiff(oa, ob), 1e-6);
  EXPECT_EQ((*b)->n_cells(0, 0), n);
  // The sink segment holds exactly its 4 tokens (no 64-token growth step); the body 36 -> 64.
  const size_t per_token = size_t(s.head_dim) * 4 * 2;  // f32 K + V of one head
  EXPECT_EQ((*b)->Memory().KvBytes(), size_t(s.n_layer) * s.n_head_kv * (4 + 64) * per_token);
}

TEST_P(KvCacheSimd, FusedEqualsTiledForQ8) {
  const KvShape s = SmallShape();
  const int n = 33;
  Stream st = MakeStream(s, n, 3);
  KvCacheConfig cfg;
  cfg.k_codec = cfg.v_codec = "q8_0";
  auto c = KvCache::Create(s, cfg);
  ASSERT_TRUE(c.ok());
  std::vector<int64_t> seq(n);
  for (int i = 0; i < n; ++i) seq[i] = i;
  for (int l = 0; l < s.n_layer; ++l) ASSERT_TRUE((*c)->Write(l, seq.data(), n, st.k.data(), st.v.data()).ok());
  const int hd = s.head_dim, rowsz = s.n_head * hd;
  std::vector<float> tiled(size_t(n) * rowsz), fused(rowsz);
  (*c)->Attend(0, st.q.data(), seq.data(), n, tiled.data());            // n_q > 4: tiled
  (*c)->Attend(0, &st.q[size_t(n - 1) * rowsz], &seq[n - 1], 1, fused.data());  // fused
  std::vector<float> last(tiled.end() - rowsz, tiled.end());
  EXPECT_LT(MaxAbsDiff(last, fused), 1e-5);
  // And q8_0 stays close to the exact answer.
  auto ref = Reference(s, st.q, st.k, st.v, n, n, 0);
  EXPECT_LT(MaxAbsDiff(tiled, ref), 0.05);
}

// Keys stored before RoPE (in-cache positions, KVQuant) are decoded, rotated and scored in
// chunks of ~128 tokens at decode (n_q <= 4), and through one decoded tile + GEMM for a batch:
// both must give the same attention. 300 tokens = two full chunks and a partial one; block
// codecs (KIVI: 32-token blocks + fp16 tail), a sink segment, centring, KVQuant's sparse
// outliers, and a multi-token decode (n_q = 3).
TEST_P(KvCacheSimd, PreRopeKeysChunkedDecodeEqualsTiled) {
  const KvShape s = SmallShape();
  const int n = 300, hd = s.head_dim, rowsz = s.n_head * hd;
  Stream st = MakeStream(s, n, 41);
  KvQuantSamples ks;
  ks.n_layer = s.n_layer;
  ks.n_head_kv = s.n_head_kv;
  ks.head_dim = hd;
  for (int l = 0; l < s.n_layer; ++l) {
    ks.k.push_back(Randn(size_t(256) * s.n_head_kv * hd, 50 + l));
    ks.v.push_back(Randn(size_t(256) * s.n_head_kv * hd, 60 + l));
  }
  auto calib = CalibrateKvQuant(ks);
  ASSERT_TRUE(calib.ok()) << calib.status().ToString();
  struct Case { const char* k; int sinks; PositionMode pos; };
  for (const Case& cs : {Case{"f32", 0, PositionMode::kInCache}, Case{"f16", 4, PositionMode::kInCache},
                         Case{"q8_0:center=1", 0, PositionMode::kInCache},
                         Case{"kivi:bits=4,group=32,residual=32", 0, PositionMode::kInCache},
                         Case{"kvquant4", 0, PositionMode::kOriginal},
                         Case{"kvquant2", 4, PositionMode::kOriginal}}) {
    KvCacheConfig cfg;
    cfg.k_codec = cs.k;
    cfg.v_codec = "f32";
    cfg.sink_tokens = cs.sinks;
    cfg.position_mode = cs.pos;
    cfg.position_mode_set = true;
    cfg.calib = &*calib;
    auto c = KvCache::Create(s, cfg);
    ASSERT_TRUE(c.ok()) << cs.k << ": " << c.status().ToString();
    std::vector<int64_t> seq(n);
    for (int i = 0; i < n; ++i) seq[i] = i;
    for (int l = 0; l < s.n_layer; ++l) {
      ASSERT_TRUE((*c)->Write(l, seq.data(), n, st.k.data(), st.v.data()).ok());
    }
    (*c)->Flush();
    std::vector<float> tiled(size_t(n) * rowsz);
    (*c)->Attend(0, st.q.data(), seq.data(), n, tiled.data());  // tiled
    for (int nq : {1, 3}) {  // chunked (KIVI's fp16 tail sends n_q = 3 to the tiled path)
      std::vector<float> fused(size_t(nq) * rowsz);
      (*c)->Attend(0, &st.q[size_t(n - nq) * rowsz], &seq[n - nq], nq, fused.data());
      const std::vector<float> last(tiled.end() - nq * rowsz, tiled.end());
      EXPECT_LT(MaxAbsDiff(last, fused), 2e-5) << cs.k << " sinks " << cs.sinks << " n_q " << nq;
    }
  }
  // After eviction (gaps in the kept positions: the codec's scratch cos/sin path; KVQuant's
  // 16-token key blocks are re-encoded around the holes) the two paths still agree.
  KvCacheConfig cfg;
  cfg.k_codec = "kvquant4";
  cfg.v_codec = "kvquant4";
  cfg.calib = &*calib;
  auto c = KvCache::Create(s, cfg);
  ASSERT_TRUE(c.ok()) << c.status().ToString();
  std::vector<int64_t> seq(n);
  for (int i = 0; i < n; ++i) seq[i] = i;
  for (int l = 0; l < s.n_layer; ++l) ASSERT_TRUE((*c)->Write(l, seq.data(), n, st.k.data(), st.v.data()).ok());
  (*c)->Flush();
  std::vector<int32_t> keep;
  for (int i = 0; i < n; ++i) {
    if (i % 3 == 0 || i >= n - 37) keep.push_back(i);
  }
  for (int h = 0; h < s.n_head_kv; ++h) ASSERT_TRUE((*c)->Keep(0, h, keep).ok());
  std::vector<float> tiled(size_t(5) * rowsz), fused(rowsz);
  (*c)->Attend(0, &st.q[size_t(n - 5) * rowsz], &seq[n - 5], 5, tiled.data());
  (*c)->Attend(0, &st.q[size_t(n - 1) * rowsz], &seq[n - 1], 1, fused.data());
  const std::vector<float> last(tiled.end() - rowsz, tiled.end());
  EXPECT_LT(MaxAbsDiff(last, fused), 2e-5) << "kvquant4 after Keep";
}

// KVQuant keys: a K transform or centring in front of them is refused at configuration (their
// calibration is per channel of the raw pre-RoPE keys), and the fp16 tail their 16-token blocks
// need reserves one block's worth of tokens, not a whole 64-token growth step.
TEST(KvCache, KvQuantKeysRefuseTransformsAndReserveOneBlockOfTail) {
  const KvShape s = SmallShape();
  KvQuantSamples ks;
  ks.n_layer = s.n_layer;
  ks.n_head_kv = s.n_head_kv;
  ks.head_dim = s.head_dim;
  for (int l = 0; l < s.n_layer; ++l) {
    ks.k.push_back(Randn(size_t(256) * s.n_head_kv * s.head_dim, 70 + l));
    ks.v.push_back(Randn(size_t(256) * s.n_head_kv * s.head_dim, 80 + l));
  }
  auto calib = CalibrateKvQuant(ks);
  ASSERT_TRUE(calib.ok());
  KvCacheConfig cfg;
  cfg.calib = &*calib;
  cfg.k_codec = "kvquant4";
  cfg.k_transform = "hadamard";
  auto bad = KvCache::Create(s, cfg);
  ASSERT_FALSE(bad.ok());
  EXPECT_NE(std::string(bad.status().message()).find("cannot follow a K transform"), std::string::npos);
  cfg.k_transform = "";
  cfg.k_codec = "kvquant4:center=1";
  EXPECT_FALSE(KvCache::Create(s, cfg).ok());
  cfg.k_codec = "q4_0";  // rot=1 by default: a Hadamard transform, fine for other codecs
  cfg.v_codec = "kvquant4:center=1";  // values: per-token online ranges, centring allowed
  EXPECT_TRUE(KvCache::Create(s, cfg).ok());

  cfg.k_codec = "kvquant4";
  cfg.v_codec = "f16";
  auto c = KvCache::Create(s, cfg);
  ASSERT_TRUE(c.ok()) << c.status().ToString();
  Stream st = MakeStream(s, 20, 5);
  for (int t = 0; t < 20; ++t) {  // 16 tokens make a block; 4 wait in the tail
    const int64_t seq = t;
    for (int l = 0; l < s.n_layer; ++l) {
      ASSERT_TRUE((*c)->Write(l, &seq, 1, &st.k[size_t(t) * s.n_head_kv * s.head_dim],
                              &st.v[size_t(t) * s.n_head_kv * s.head_dim]).ok());
    }
    (*c)->Flush();
  }
  const auto mem = (*c)->Memory();
  EXPECT_LE(mem.layers[0].k_tail, size_t(s.n_head_kv) * 16 * s.head_dim * 2);
  EXPECT_GT(mem.layers[0].k_tail, 0u);
}

// Centering (codec key center=1): the cache stores x − μ and adds q·μ / (Σp)·μ back, so with a
// lossless codec the output equals the reference, through every read path: tiled prefill, fused
// decode, a sink segment with its own μ, a transform in front (Hadamard), pre-RoPE keys.
// Keys carry a large common offset, as SmolLM2's keys do (59% of their energy is the mean).
TEST_P(KvCacheSimd, CenteringIsExactOnEveryPath) {
  const KvShape s = SmallShape();
  const int n = 45;
  Stream st = MakeStream(s, n, 31);
  const std::vector<float> off_k = Randn(s.head_dim, 99, 6.0f), off_v = Randn(s.head_dim, 98, 2.0f);
  for (size_t i = 0; i < st.k.size(); ++i) st.k[i] += off_k[i % s.head_dim];
  for (size_t i = 0; i < st.v.size(); ++i) st.v[i] += off_v[i % s.head_dim];
  const auto ref = Reference(s, st.q, st.k, st.v, n, n, 0);
  struct Case { const char* spec; int sinks; PositionMode pos; };
  for (const Case& cs : {Case{"f32:center=1", 0, PositionMode::kOriginal},
                         Case{"f32:center=1", 4, PositionMode::kOriginal},
                         Case{"f32:center=1,rot=1", 0, PositionMode::kOriginal},
                         Case{"f32:center=1", 0, PositionMode::kInCache}}) {
    KvCacheConfig cfg;
    cfg.k_codec = cfg.v_codec = cs.spec;
    cfg.sink_tokens = cs.sinks;
    cfg.sink_codec = "f32";
    cfg.position_mode = cs.pos;
    auto c = KvCache::Create(s, cfg);
    ASSERT_TRUE(c.ok()) << c.status().ToString();
    EXPECT_NE((*c)->Describe().find("Kcenter"), std::string::npos);
    auto out = RunCache(**c, s, st, n, 37);
    EXPECT_LT(MaxAbsDiff(out, ref), 1e-4) << cs.spec << " sinks " << cs.sinks;
    // Decoded keys are the originals (knorm and other policies see x, not x − μ).
    std::vector<float> keys(size_t(n) * s.head_dim);
    (*c)->DecodeKeys(1, 0, keys.data());
    Rope rope(s.rope);
    std::vector<float> k0(st.k.begin(), st.k.begin() + s.head_dim);  // token 0, head 0
    rope.ApplySame(k0.data(), 1, s.head_dim, 0);
    for (int d = 0; d < s.head_dim; ++d) EXPECT_NEAR(keys[d], k0[d], 1e-4) << cs.spec;
  }
  // The point of it: a lossy per-vector codec loses much less once the offset is removed.
  auto err = [&](const char* spec) {
    KvCacheConfig cfg;
    cfg.k_codec = cfg.v_codec = spec;
    auto c = KvCache::Create(s, cfg);
    EXPECT_TRUE(c.ok()) << spec;
    const auto out = RunCache(**c, s, st, n, 37);
    double se = 0;
    for (size_t i = 0; i < out.size(); ++i) se += (out[i] - ref[i]) * (out[i] - ref[i]);
    return std::sqrt(se / out.size());
  };
  // (rms output error on this data: q4_0 0.218 -> 0.118, turbo4 0.236 -> 0.132, q8_0 0.0127 -> 0.0070)
  // (nsn2.5, NSNQuant's Shift: see codec_nsn_test.cc)
  for (const char* spec : {"q4_0", "turbo4", "q8_0", "nsn2.5"}) {
    const double plain = err(spec), centered = err((std::string(spec) + ":center=1").c_str());
    EXPECT_LT(centered, 0.7 * plain) << spec << " " << plain << " vs centered " << centered;
  }
  // Lossy codecs: the fused decode path (packed scores + q·μ, packed accumulate + (Σp)·μ) must
  // give what the tiled path gives (decode the same blocks, + μ, GEMM): TurboQuant scores keys in
  // its rotated domain against the rotated query (split variant: two parts, split frozen on the
  // centred first token; nc), q4_0 behind its Hadamard transform; with and without a sink segment.
  for (const char* spec : {"turbo4:center=1", "turbo3:center=1", "turbo:bits=2.5,center=1",
                           "turbo:bits=4,nc=1,center=1", "turbo:bits=4,split=8,center=1",
                           "q4_0:center=1", "nsn2.5:center=1", "nsn3:center=1",
                           "nsn:bits=2,dim=2,nc=0,center=1"}) {
    for (int sinks : {0, 4}) {
      KvCacheConfig cfg;
      cfg.k_codec = cfg.v_codec = spec;
      cfg.sink_tokens = sinks;
      auto c = KvCache::Create(s, cfg);
      ASSERT_TRUE(c.ok()) << spec << ": " << c.status().ToString();
      std::vector<int64_t> seq(n);
      for (int i = 0; i < n; ++i) seq[i] = i;
      for (int l = 0; l < s.n_layer; ++l) {
        ASSERT_TRUE((*c)->Write(l, seq.data(), n, st.k.data(), st.v.data()).ok());
      }
      const int rowsz = s.n_head * s.head_dim;
      std::vector<float> tiled(size_t(n) * rowsz), fused(rowsz);
      (*c)->Attend(0, st.q.data(), seq.data(), n, tiled.data());                     // n_q > 4: tiled
      (*c)->Attend(0, &st.q[size_t(n - 1) * rowsz], &seq[n - 1], 1, fused.data());  // fused
      const std::vector<float> last(tiled.end() - rowsz, tiled.end());
      EXPECT_LT(MaxAbsDiff(last, fused), 1e-4) << spec << " sinks " << sinks;
    }
  }
  // Window codecs: tokens still in the fp16 window are read through the pending path of a
  // batched prefill; with a residual longer than the sequence nothing is quantized, so the
  // centered cache must give the reference answer up to fp16 rounding (μ added back there too).
  {
    KvCacheConfig cfg;
    cfg.k_codec = cfg.v_codec = "kivi:bits=2,group=32,residual=128,center=1";
    auto c = KvCache::Create(s, cfg);
    ASSERT_TRUE(c.ok()) << c.status().ToString();
    EXPECT_LT(MaxAbsDiff(RunCache(**c, s, st, n, n), ref), 2e-2);
  }
  KvCacheConfig bad;
  bad.k_codec = "q8_0:center=maybe";
  EXPECT_FALSE(KvCache::Create(s, bad).ok());
}

// Centred post-RoPE keys: μ is taken in the pre-RoPE frame and subtracted as R(pos) μ, so it
// stays right at positions far past the first batch. Keys here are a fixed pre-RoPE offset plus
// noise (as SmolLM2's keys are); a post-RoPE mean of the first 64 positions is wrong for every
// pair whose RoPE period lies between 64 and 1,024 tokens, and centred keys at positions >= 512
// then had more energy than raw ones (turbo4 squared error at positions >= 512, centred / raw:
// 9,510 / 8,999 with the post-RoPE μ; with the pre-RoPE μ only the noise is left: 299 / 8,999).
TEST(KvCache, CenteringFollowsRopeOverLongContexts) {
  const KvShape s = SmallShape();
  const int n = 1024, b = 64, hd = s.head_dim, nkv = s.n_head_kv;
  std::vector<float> k = Randn(size_t(n) * nkv * hd, 7), v = Randn(size_t(n) * nkv * hd, 8);
  const std::vector<float> off = Randn(size_t(nkv) * hd, 9, 5.0f);
  for (size_t i = 0; i < k.size(); ++i) k[i] += off[i % (size_t(nkv) * hd)];
  std::vector<int64_t> seq(n);
  for (int i = 0; i < n; ++i) seq[i] = i;
  // True post-RoPE keys of head 0.
  Rope rope(s.rope);
  std::vector<float> kr(size_t(n) * hd);
  for (int t = 0; t < n; ++t) std::copy_n(&k[size_t(t) * nkv * hd], hd, &kr[size_t(t) * hd]);
  rope.Apply(kr.data(), n, hd, seq.data());
  auto late_err = [&](const char* spec) {
    KvCacheConfig cfg;
    cfg.k_codec = cfg.v_codec = spec;
    auto c = KvCache::Create(s, cfg);
    EXPECT_TRUE(c.ok()) << spec;
    for (int i = 0; i < n; i += b) EXPECT_TRUE((*c)->Write(0, &seq[i], b, &k[size_t(i) * nkv * hd], &v[size_t(i) * nkv * hd]).ok());
    std::vector<float> got(size_t(n) * hd);
    (*c)->DecodeKeys(0, 0, got.data());
    double e = 0;
    for (size_t i = size_t(512) * hd; i < got.size(); ++i) e += (got[i] - kr[i]) * (got[i] - kr[i]);
    return e;
  };
  EXPECT_LT(late_err("f32:center=1"), 1e-6);
  const double raw = late_err("turbo4"), centred = late_err("turbo4:center=1");
  EXPECT_LT(centred, 0.1 * raw) << "raw " << raw << " centred " << centred;
  std::printf("turbo4 squared key error at positions >= 512: raw %.1f, centred %.1f\n", raw, centred);
  // Relabel (positions shifted, keys re-rotated) keeps the centred stream exact.
  KvCacheConfig cfg;
  cfg.k_codec = cfg.v_codec = "f32:center=1";
  auto c = KvCache::Create(s, cfg);
  ASSERT_TRUE(c.ok());
  for (int i = 0; i < n; i += b) ASSERT_TRUE((*c)->Write(0, &seq[i], b, &k[size_t(i) * nkv * hd], &v[size_t(i) * nkv * hd]).ok());
  std::vector<int64_t> moved(n);
  for (int i = 0; i < n; ++i) moved[i] = i / 2;
  ASSERT_TRUE((*c)->Relabel(0, 0, moved).ok());
  std::vector<float> want(size_t(n) * hd), got(size_t(n) * hd);
  for (int t = 0; t < n; ++t) std::copy_n(&k[size_t(t) * nkv * hd], hd, &want[size_t(t) * hd]);
  rope.Apply(want.data(), n, hd, moved.data());
  (*c)->DecodeKeys(0, 0, got.data());
  double m = 0;
  for (size_t i = 0; i < got.size(); ++i) m = std::max(m, double(std::fabs(got[i] - want[i])));
  EXPECT_LT(m, 1e-3);
}

TEST(KvCache, F16HalvesBytesOfF32AndGrowsInSteps) {
  const KvShape s = SmallShape();
  KvCacheConfig a, b;
  a.k_codec = a.v_codec = "f32";
  b.k_codec = b.v_codec = "f16";
  auto ca = KvCache::Create(s, a);
  auto cb = KvCache::Create(s, b);
  Stream st = MakeStream(s, 64, 5);
  std::vector<int64_t> seq(64);
  for (int i = 0; i < 64; ++i) seq[i] = i;
  for (int l = 0; l < s.n_layer; ++l) {
    ASSERT_TRUE((*ca)->Write(l, seq.data(), 64, st.k.data(), st.v.data()).ok());
    ASSERT_TRUE((*cb)->Write(l, seq.data(), 64, st.k.data(), st.v.data()).ok());
  }
  const size_t expect_f16 = size_t(2) * s.n_layer * s.n_head_kv * 64 * s.head_dim * 2;
  EXPECT_EQ((*cb)->Memory().KvBytes(), expect_f16);
  EXPECT_EQ((*ca)->Memory().KvBytes(), 2 * expect_f16);
  EXPECT_DOUBLE_EQ((*cb)->KBitsPerValue(), 16.0);
}

TEST(KvCache, KeepDropsCellsAndFreesBytes) {
  const KvShape s = SmallShape();
  KvCacheConfig cfg;
  cfg.k_codec = cfg.v_codec = "f32";
  cfg.grow_tokens = 16;
  auto c = KvCache::Create(s, cfg);
  const int n = 64;
  Stream st = MakeStream(s, n, 9);
  std::vector<int64_t> seq(n);
  for (int i = 0; i < n; ++i) seq[i] = i;
  for (int l = 0; l < s.n_layer; ++l) ASSERT_TRUE((*c)->Write(l, seq.data(), n, st.k.data(), st.v.data()).ok());
  std::vector<float> before(size_t(n) * s.head_dim);
  (*c)->DecodeKeys(0, 1, before.data());
  const size_t bytes0 = (*c)->Memory().KvBytes();
  std::vector<int32_t> keep;
  for (int i = 0; i < n; i += 4) keep.push_back(i);  // keep 16 of 64
  ASSERT_TRUE((*c)->Keep(0, 1, keep).ok());
  EXPECT_EQ((*c)->n_cells(0, 1), 16);
  EXPECT_EQ((*c)->n_cells(0, 0), n);  // ragged: other heads untouched
  EXPECT_EQ((*c)->seqs(0, 1)[3], 12);
  std::vector<float> after(size_t(16) * s.head_dim);
  (*c)->DecodeKeys(0, 1, after.data());
  for (int j = 0; j < 16; ++j) {
    for (int d = 0; d < s.head_dim; ++d) {
      EXPECT_EQ(after[size_t(j) * s.head_dim + d], before[size_t(keep[j]) * s.head_dim + d]);
    }
  }
  const size_t freed = bytes0 - (*c)->Memory().KvBytes();
  EXPECT_EQ(freed, size_t(48) * s.head_dim * 4 * 2);  // 48 tokens x (K + V) f32 of one head
  EXPECT_FALSE((*c)->Keep(0, 1, {3, 2}).ok());
  EXPECT_FALSE((*c)->Keep(0, 1, {99}).ok());
}

TEST(KvCache, NonFiniteInputIsAnErrorAndChangesNothing) {
  const KvShape s = SmallShape();
  KvCacheConfig cfg;
  auto c = KvCache::Create(s, cfg);
  Stream st = MakeStream(s, 4, 1);
  st.k[70] = std::nanf("");
  std::vector<int64_t> seq = {0, 1, 2, 3};
  Status r = (*c)->Write(0, seq.data(), 4, st.k.data(), st.v.data());
  EXPECT_FALSE(r.ok());
  EXPECT_NE(r.message().find("non-finite"), std::string::npos);
  EXPECT_EQ((*c)->n_cells(0, 0), 0);
  st.k[70] = 0.f;
  st.v[3] = INFINITY;
  EXPECT_FALSE((*c)->Write(0, seq.data(), 4, st.k.data(), st.v.data()).ok());
  EXPECT_EQ((*c)->Memory().KvBytes(), 0u);
}

TEST(KvCache, UnknownCodecIsAConfigurationError) {
  KvCacheConfig cfg;
  cfg.k_codec = "q3_wat";
  auto c = KvCache::Create(SmallShape(), cfg);
  ASSERT_FALSE(c.ok());
  EXPECT_NE(c.status().message().find("unknown cache type"), std::string::npos);
  cfg.k_codec = "q8_0:bits=3";
  c = KvCache::Create(SmallShape(), cfg);
  ASSERT_FALSE(c.ok());
  EXPECT_NE(c.status().message().find("unknown parameter"), std::string::npos);
  // The message names the spec as written (the alias, not its expansion), and each known name
  // once.
  cfg.k_codec = "turbo4:center=2";
  c = KvCache::Create(SmallShape(), cfg);
  ASSERT_FALSE(c.ok());
  EXPECT_NE(c.status().message().find("K codec 'turbo4:center=2'"), std::string::npos)
      << c.status().message();
  cfg.k_codec = "q3_wat";
  c = KvCache::Create(SmallShape(), cfg);
  const std::string msg(c.status().message());
  EXPECT_EQ(msg.find("kivi2"), msg.rfind("kivi2")) << msg;
  // A bad sink codec is reported as the sink segment's, not as the K codec.
  cfg.k_codec = "f16";
  cfg.sink_tokens = 4;
  cfg.sink_codec = "q3_wat";
  c = KvCache::Create(SmallShape(), cfg);
  ASSERT_FALSE(c.ok());
  EXPECT_NE(c.status().message().find("sink segment"), std::string::npos) << c.status().message();
}

TEST(KvCache, Fp16SaturatesInsteadOfInf) {
  const KvShape s = SmallShape();
  KvCacheConfig cfg;
  auto c = KvCache::Create(s, cfg);
  std::vector<float> k(size_t(s.n_head_kv) * s.head_dim, 1e6f), v(k.size(), -1e6f);
  int64_t seq = 0;
  ASSERT_TRUE((*c)->Write(0, &seq, 1, k.data(), v.data()).ok());
  std::vector<float> dk(s.head_dim), dv(s.head_dim);
  (*c)->DecodeValues(0, 0, dv.data());
  for (float x : dv) EXPECT_EQ(x, -65504.f);
}

TEST(Rope, DoubleAnglesStayExactAtMillionsOfTokens) {
  RopeParams p;
  p.theta = 100000;
  p.n_rot = 64;
  Rope r(p);
  // Rotating by P then by -P is the identity; fp32 angles would drift at P ~ 4e6.
  std::vector<float> x = Randn(64, 2), y = x;
  int64_t big = 4'000'000, neg = -4'000'000;
  r.Apply(y.data(), 1, 64, &big);
  r.Apply(y.data(), 1, 64, &neg);
  EXPECT_LT(MaxAbsDiff(x, y), 1e-5);
  // Relative property: <R(a)q, R(b)k> depends on b - a only.
  std::vector<float> q = Randn(64, 3), k = Randn(64, 4);
  auto dot_at = [&](int64_t a, int64_t b) {
    std::vector<float> qq = q, kk = k;
    r.Apply(qq.data(), 1, 64, &a);
    r.Apply(kk.data(), 1, 64, &b);
    double d = 0;
    for (int i = 0; i < 64; ++i) d += double(qq[i]) * kk[i];
    return d;
  };
  EXPECT_NEAR(dot_at(10, 3), dot_at(3'000'010, 3'000'003), 2e-4);
}

}  // namespace
}  // namespace kvc::kv
