// ThinK key-channel pruning: selection by ||Q_c||·||K_c||, exactness when pruned channels carry no
// q·k interaction, fused (FoldQuery) read equals tiled (Reconstruct) read, errors.
#include <gtest/gtest.h>

#include <unistd.h>

#include <cmath>
#include <cstdio>
#include <filesystem>
#include <random>
#include <vector>

#include "kv/cache.h"
#include "kv/calibration_file.h"
#include "kv/transforms/think.h"
#include "per_target.h"

namespace kvc::kv {
namespace {

TEST(Think, SelectByQueryKeyScore) {
  // score = sqrt(q2)·sqrt(k2): channel 0 has big keys but no query energy.
  std::vector<float> q2 = {0, 4, 1, 9, 1, 1}, k2 = {100, 1, 1, 1, 4, 1};
  // scores: 0, 2, 1, 3, 2, 1 -> keep 3: {3, 1, 4} (tie 1 vs 4 both kept), sorted
  EXPECT_EQ(ThinkSelect(q2, k2, 3), (std::vector<int>{1, 3, 4}));
  // ties broken towards the lower channel: keep 2 of scores {3, 2(1), 2(4)} -> {1, 3}
  EXPECT_EQ(ThinkSelect(q2, k2, 2), (std::vector<int>{1, 3}));
  EXPECT_EQ(ThinkSelect(q2, k2, 6).size(), 6u);
}

struct ThinkFile {
  std::string path;
  ThinkFile(int n_layer, int nkv, int d, const std::vector<float>& q2, const std::vector<float>& k2) {
    CalibrationFile f;
    f.meta = {{"kind", "kv-stats"}, {"n_layer", std::to_string(n_layer)},
              {"n_head_kv", std::to_string(nkv)}, {"head_dim", std::to_string(d)},
              {"head_dim_v", std::to_string(d)}};
    for (int l = 0; l < n_layer; ++l) {
      for (int h = 0; h < nkv; ++h) {
        f.tensors[ThinkTensorName("q2", l, h)] = {{d}, q2};
        f.tensors[ThinkTensorName("k2", l, h)] = {{d}, k2};
      }
    }
    path = (std::filesystem::temp_directory_path() /
            ("think." + std::to_string(getpid()) + ".kvccal")).string();
    EXPECT_TRUE(WriteCalibrationFile(path, f).ok());
  }
  ~ThinkFile() { std::remove(path.c_str()); }
};

TEST(Think, CacheExactWhenPrunedChannelsAreSilent) {
  KvShape s;
  s.n_layer = 1;
  s.n_head = 4;
  s.n_head_kv = 2;
  s.head_dim = 64;
  s.rope.theta = 10000.0;
  s.rope.n_rot = 64;
  // Channels >= 40 get a score of 0 (no query energy): ratio 0.375 prunes 24 -> keeps 0..39.
  std::vector<float> q2(64, 1.f), k2(64, 1.f);
  for (int c = 40; c < 64; ++c) q2[c] = 0.f;
  ThinkFile tf(1, 2, 64, q2, k2);
  const int n = 30, hd = 64;
  std::mt19937 rng(3);
  std::normal_distribution<float> nd;
  std::vector<float> k(size_t(n) * 2 * hd), v(k.size()), q(size_t(n) * 4 * hd);
  for (auto& x : k) x = nd(rng);
  for (auto& x : v) x = nd(rng);
  for (auto& x : q) x = nd(rng);
  // Queries silent in channels whose RoPE partners are also >= 40 (pairs (2i, 2i+1) stay inside
  // the pruned range since 40 is even), so post-RoPE q is zero there too.
  for (int i = 0; i < n * 4; ++i)
    for (int c = 40; c < 64; ++c) q[size_t(i) * hd + c] = 0.f;
  KvCacheConfig full, th;
  full.k_codec = full.v_codec = th.k_codec = th.v_codec = "f32";
  th.k_transform = "think:file=" + tf.path + ",ratio=0.375";
  auto cf = KvCache::Create(s, full), ct = KvCache::Create(s, th);
  ASSERT_TRUE(cf.ok() && ct.ok()) << ct.status().ToString();
  std::vector<int64_t> seq(n);
  for (int i = 0; i < n; ++i) seq[i] = i;
  for (auto* c : {cf->get(), ct->get()}) ASSERT_TRUE(c->Write(0, seq.data(), n, k.data(), v.data()).ok());
  // Tiled (prefill, Reconstruct) and fused (single query, FoldQuery) reads.
  std::vector<float> of(size_t(n) * 4 * hd), ot(of.size());
  (*cf)->Attend(0, q.data(), seq.data(), n, of.data());
  (*ct)->Attend(0, q.data(), seq.data(), n, ot.data());
  for (size_t i = 0; i < of.size(); ++i) ASSERT_NEAR(of[i], ot[i], 1e-4) << i;
  for (int t : {5, n - 1}) {
    std::vector<float> df(4 * hd), dt(4 * hd);
    (*cf)->Attend(0, q.data() + size_t(t) * 4 * hd, &seq[t], 1, df.data());
    (*ct)->Attend(0, q.data() + size_t(t) * 4 * hd, &seq[t], 1, dt.data());
    for (int i = 0; i < 4 * hd; ++i) ASSERT_NEAR(df[i], dt[i], 1e-4) << t << " " << i;
  }
  EXPECT_NEAR((*ct)->KBitsPerValue(), 32.0 * 40 / 64, 1e-9);
  EXPECT_LT((*ct)->Memory().KvBytes(), (*cf)->Memory().KvBytes());
}

KVC_PER_TARGET_SUITE(ThinkSimd);  // once per Highway target (per_target.h)

TEST_P(ThinkSimd, FusedEqualsTiledOnGeneralData) {
  // No silent channels: pruning is lossy, but both read paths must agree.
  KvShape s;
  s.n_layer = 1;
  s.n_head = 2;
  s.n_head_kv = 1;
  s.head_dim = 64;
  s.rope.n_rot = 64;
  std::vector<float> q2(64), k2(64);
  for (int c = 0; c < 64; ++c) { q2[c] = 1 + c % 7; k2[c] = 1 + c % 5; }
  ThinkFile tf(1, 1, 64, q2, k2);
  KvCacheConfig th;
  th.k_codec = th.v_codec = "f32";
  th.k_transform = "think:file=" + tf.path + ",ratio=0.5";
  auto ct = KvCache::Create(s, th);
  ASSERT_TRUE(ct.ok());
  const int n = 12;
  std::mt19937 rng(5);
  std::normal_distribution<float> nd;
  std::vector<float> k(size_t(n) * 64), v(k.size()), q(size_t(n) * 2 * 64);
  for (auto& x : k) x = nd(rng);
  for (auto& x : v) x = nd(rng);
  for (auto& x : q) x = nd(rng);
  std::vector<int64_t> seq(n);
  for (int i = 0; i < n; ++i) seq[i] = i;
  ASSERT_TRUE((*ct)->Write(0, seq.data(), n, k.data(), v.data()).ok());
  std::vector<float> tiled(size_t(n) * 2 * 64), fused(2 * 64);
  (*ct)->Attend(0, q.data(), seq.data(), n, tiled.data());  // n_q > 4: tiled
  (*ct)->Attend(0, q.data() + size_t(n - 1) * 128, &seq[n - 1], 1, fused.data());
  for (int i = 0; i < 128; ++i) EXPECT_NEAR(fused[i], tiled[size_t(n - 1) * 128 + i], 1e-5);
}

TEST(Think, Errors) {
  std::vector<float> ones(64, 1.f);
  ThinkFile tf(1, 1, 64, ones, ones);
  CodecContext ctx;
  ctx.n_layer = 1;
  ctx.n_head_kv = 1;
  ctx.dim = 64;
  ctx.kind = KvKind::kValue;
  auto v = MakeTransform("think:file=" + tf.path, ctx);
  EXPECT_EQ(v.status().code(), StatusCode::kInvalidArgument);
  EXPECT_NE(v.status().message().find("key channels only"), std::string::npos);
  ctx.kind = KvKind::kKey;
  EXPECT_FALSE(MakeTransform("think", ctx).ok());
  EXPECT_FALSE(MakeTransform("think:file=" + tf.path + ",ratio=1.0", ctx).ok());
  auto ok = MakeTransform("think:file=" + tf.path + ",ratio=0.4,multiple=32", ctx);
  ASSERT_TRUE(ok.ok()) << ok.status().ToString();
  EXPECT_EQ((*ok)->out_dim(), 64);  // 38 kept -> rounded up to 64
  auto ok2 = MakeTransform("think:file=" + tf.path + ",ratio=0.4", ctx);
  ASSERT_TRUE(ok2.ok());
  EXPECT_EQ((*ok2)->out_dim(), 38);
  ctx.n_layer = 3;
  EXPECT_FALSE(MakeTransform("think:file=" + tf.path, ctx).ok());
}

}  // namespace
}  // namespace kvc::kv
