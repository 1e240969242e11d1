// Palu-style low-rank transform: the eigenbasis claim (= whitened SVD), Eckart–Young optimality,
// rank allocation, exact attention through the cache on low-rank data, errors.
#include <gtest/gtest.h>

#include <unistd.h>

#include <Eigen/Dense>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <map>
#include <random>
#include <vector>

#include "kv/cache.h"
#include "kv/calibration_file.h"
#include "kv/transforms/lowrank.h"

namespace kvc::kv {
namespace {

Eigen::MatrixXd RandMat(int r, int c, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<double> nd;
  Eigen::MatrixXd m(r, c);
  for (int i = 0; i < r; ++i)
    for (int j = 0; j < c; ++j) m(i, j) = nd(rng);
  return m;
}

// Top-r eigenvectors of XᵀX as columns [d, r].
Eigen::MatrixXd TopEig(const Eigen::MatrixXd& x, int r) {
  Eigen::SelfAdjointEigenSolver<Eigen::MatrixXd> es(x.transpose() * x);
  const int d = int(x.cols());
  Eigen::MatrixXd v(d, r);
  for (int j = 0; j < r; ++j) v.col(j) = es.eigenvectors().col(d - 1 - j);
  return v;
}

TEST(LowRank, EigenbasisEqualsWhitenedSvd) {
  // K = A W; SVD-LLM/Palu: S Sᵀ = AᵀA, SVD(Sᵀ W) = U Σ Vᵀ, K ≈ A S⁻ᵀ U_r Σ_r V_rᵀ.
  const int n = 300, dm = 24, d = 8, r = 3;
  Eigen::MatrixXd a = RandMat(n, dm, 1), w = RandMat(dm, d, 2);
  a.col(3) *= 5.0;  // anisotropic activations so whitening matters
  const Eigen::MatrixXd k = a * w;
  Eigen::LLT<Eigen::MatrixXd> llt(a.transpose() * a);
  const Eigen::MatrixXd s = llt.matrixL();
  Eigen::JacobiSVD<Eigen::MatrixXd> svd(s.transpose() * w, Eigen::ComputeThinU | Eigen::ComputeThinV);
  const Eigen::MatrixXd ur = svd.matrixU().leftCols(r), vr = svd.matrixV().leftCols(r);
  const Eigen::MatrixXd sig = svd.singularValues().head(r).asDiagonal();
  const Eigen::MatrixXd whitened =
      a * s.transpose().triangularView<Eigen::Upper>().solve(ur * sig) * vr.transpose();
  const Eigen::MatrixXd p = TopEig(k, r);
  const Eigen::MatrixXd ours = k * p * p.transpose();
  EXPECT_LT((whitened - ours).norm() / k.norm(), 1e-9);
  // Same subspace.
  EXPECT_LT((p * p.transpose() - vr * vr.transpose()).norm(), 1e-9);
  // And a plain (unwhitened) SVD of W is generally worse on the activations.
  Eigen::JacobiSVD<Eigen::MatrixXd> plain(w, Eigen::ComputeThinV);
  const Eigen::MatrixXd pv = plain.matrixV().leftCols(r);
  EXPECT_GE((k - k * pv * pv.transpose()).norm(), (k - ours).norm() - 1e-12);
}

TEST(LowRank, EckartYoungBeatsRandomSubspaces) {
  const int n = 400, d = 16, r = 5;
  Eigen::MatrixXd x = RandMat(n, d, 3) * RandMat(d, d, 4);
  const Eigen::MatrixXd p = TopEig(x, r);
  const double best = (x - x * p * p.transpose()).squaredNorm();
  Eigen::SelfAdjointEigenSolver<Eigen::MatrixXd> es(x.transpose() * x);
  double discarded = 0;
  for (int i = 0; i < d - r; ++i) discarded += es.eigenvalues()(i);
  EXPECT_NEAR(best, discarded, 1e-6 * discarded);
  for (uint32_t seed = 10; seed < 20; ++seed) {
    Eigen::HouseholderQR<Eigen::MatrixXd> qr(RandMat(d, r, seed));
    const Eigen::MatrixXd q = qr.householderQ() * Eigen::MatrixXd::Identity(d, r);
    EXPECT_GE((x - x * q * q.transpose()).squaredNorm(), best);
  }
}

// A calibration file for shape (n_layer, n_head_kv, d) from per-stream sample matrices.
struct Fixture {
  int n_layer = 2, n_head_kv = 2, d = 64;
  std::string path;
  std::map<std::string, CalibrationFile::Tensor> extra;  // merged into the file
  // data[kind][l*nkv+h]: [n, d] samples
  void Write(const std::vector<Eigen::MatrixXd> (&data)[2]) {
    CalibrationFile f;
    f.meta = {{"kind", "kv-stats"}, {"n_layer", std::to_string(n_layer)},
              {"n_head_kv", std::to_string(n_head_kv)}, {"head_dim", std::to_string(d)},
              {"head_dim_v", std::to_string(d)}, {"ratio", "0.5"}, {"model_id", "test"}};
    for (int kind = 0; kind < 2; ++kind) {
      const KvKind kk = kind == 0 ? KvKind::kKey : KvKind::kValue;
      for (int l = 0; l < n_layer; ++l) {
        for (int h = 0; h < n_head_kv; ++h) {
          const Eigen::MatrixXd& x = data[kind][l * n_head_kv + h];
          Eigen::SelfAdjointEigenSolver<Eigen::MatrixXd> es(x.transpose() * x / double(x.rows()));
          CalibrationFile::Tensor b, e;
          b.dims = {d, d};
          e.dims = {d};
          for (int j = 0; j < d; ++j) {
            e.data.push_back(float(std::max(0.0, es.eigenvalues()(d - 1 - j))));
            for (int i = 0; i < d; ++i) b.data.push_back(float(es.eigenvectors()(i, d - 1 - j)));
          }
          f.tensors[PaluTensorName("basis", kk, l, h)] = b;
          f.tensors[PaluTensorName("eig", kk, l, h)] = e;
        }
      }
    }
    for (const auto& [k, t] : extra) f.tensors[k] = t;
    path = (std::filesystem::temp_directory_path() /
            ("lowrank." + std::to_string(getpid()) + "." + std::to_string(counter++) + ".kvccal"))
               .string();
    ASSERT_TRUE(WriteCalibrationFile(path, f).ok());
  }
  ~Fixture() {
    if (!path.empty()) std::remove(path.c_str());
  }
  static inline int counter = 0;
};

KvShape Shape(const Fixture& fx) {
  KvShape s;
  s.n_layer = fx.n_layer;
  s.n_head = 3 * fx.n_head_kv;
  s.n_head_kv = fx.n_head_kv;
  s.head_dim = fx.d;
  s.rope.theta = 10000.0;
  s.rope.n_rot = fx.d;
  return s;
}

// Low-rank data: rows = z [n, rank] · Bᵀ, B [d, rank] random per stream.
std::vector<Eigen::MatrixXd> Bases(int n_streams, int d, int rank, uint32_t seed) {
  std::vector<Eigen::MatrixXd> b;
  for (int i = 0; i < n_streams; ++i) b.push_back(RandMat(d, rank, seed + i));
  return b;
}

TEST(LowRank, CacheAttentionExactOnLowRankData) {
  Fixture fx;
  const int rank = 16, ns = fx.n_layer * fx.n_head_kv;
  auto bk = Bases(ns, fx.d, rank, 100), bv = Bases(ns, fx.d, rank, 200);
  std::vector<Eigen::MatrixXd> calib[2];
  for (int i = 0; i < ns; ++i) {
    calib[0].push_back(RandMat(200, rank, 300 + i) * bk[i].transpose());
    calib[1].push_back(RandMat(200, rank, 400 + i) * bv[i].transpose());
  }
  fx.Write(calib);
  const KvShape s = Shape(fx);
  // Fresh tokens from the same subspaces.
  const int n = 40, nkv = s.n_head_kv, hd = s.head_dim;
  std::vector<float> k(size_t(n) * nkv * hd), v(k.size()), q(size_t(n) * s.n_head * hd);
  std::mt19937 rng(7);
  std::normal_distribution<float> nd;
  for (auto& x : q) x = nd(rng);
  for (const bool keys_too : {true, false}) {
    KvCacheConfig full, lr;
    full.k_codec = full.v_codec = lr.k_codec = lr.v_codec = "f32";
    if (keys_too) lr.k_transform = "lowrank:file=" + fx.path + ",ratio=0.25";
    lr.v_transform = "lowrank:file=" + fx.path + ",ratio=0.25,rot=1";
    auto cf = KvCache::Create(s, full);
    auto cl = KvCache::Create(s, lr);
    ASSERT_TRUE(cf.ok()) << cf.status().ToString();
    ASSERT_TRUE(cl.ok()) << cl.status().ToString();
    for (int l = 0; l < s.n_layer; ++l) {
      for (int i = 0; i < n; ++i) {
        for (int h = 0; h < nkv; ++h) {
          Eigen::VectorXd zk = RandMat(rank, 1, 1000 + i * 7 + h), zv = RandMat(rank, 1, 5000 + i * 7 + h);
          Eigen::VectorXd xk = bk[l * nkv + h] * zk, xv = bv[l * nkv + h] * zv;
          for (int c = 0; c < hd; ++c) {
            k[(size_t(i) * nkv + h) * hd + c] = float(xk(c) * 0.3);
            v[(size_t(i) * nkv + h) * hd + c] = float(xv(c));
          }
        }
      }
      std::vector<int64_t> seq(n);
      for (int i = 0; i < n; ++i) seq[i] = i;
      // Prefill n-1 tokens (tiled path), then one decode step (fused V path when K is plain).
      for (auto* c : {cf->get(), cl->get()}) {
        ASSERT_TRUE(c->Write(l, seq.data(), n - 1, k.data(), v.data()).ok());
        ASSERT_TRUE(c->Write(l, seq.data() + n - 1, 1, k.data() + size_t(n - 1) * nkv * hd,
                             v.data() + size_t(n - 1) * nkv * hd).ok());
      }
      std::vector<float> of(size_t(n) * s.n_head * hd), ol(of.size());
      (*cf)->Attend(l, q.data(), seq.data(), n, of.data());
      (*cl)->Attend(l, q.data(), seq.data(), n, ol.data());
      std::vector<float> df(size_t(s.n_head) * hd), dl(df.size());
      (*cf)->Attend(l, q.data() + size_t(n - 1) * s.n_head * hd, seq.data() + n - 1, 1, df.data());
      (*cl)->Attend(l, q.data() + size_t(n - 1) * s.n_head * hd, seq.data() + n - 1, 1, dl.data());
      double err = 0, ref = 0;
      for (size_t i = 0; i < of.size(); ++i) {
        err = std::max(err, double(std::fabs(of[i] - ol[i])));
        ref = std::max(ref, double(std::fabs(of[i])));
      }
      for (size_t i = 0; i < df.size(); ++i) err = std::max(err, double(std::fabs(df[i] - dl[i])));
      EXPECT_LT(err, 2e-4 * std::max(1.0, ref)) << "layer " << l << " keys_too " << keys_too;
    }
    // Memory: latent is rank 16 of 64 for every transformed stream.
    const auto mf = (*cf)->Memory(), ml = (*cl)->Memory();
    const double ratio = double(ml.KvBytes()) / mf.KvBytes();
    EXPECT_NEAR(ratio, keys_too ? 0.25 : (1 + 0.25) / 2, 0.02);
    EXPECT_GT(ml.layers[0].transform, 0u);
    EXPECT_NEAR((*cl)->VBitsPerValue(), 32 * 0.25, 1e-9);
  }
}

TEST(LowRank, TruncationErrorMatchesDiscardedEnergy) {
  // Full-rank data: the stored-then-reconstructed values lose exactly the discarded eigen-energy.
  Fixture fx;
  fx.n_layer = 1;
  fx.n_head_kv = 1;
  Eigen::MatrixXd x = RandMat(500, fx.d, 9) * RandMat(fx.d, fx.d, 10);
  std::vector<Eigen::MatrixXd> calib[2] = {{x}, {x}};
  fx.Write(calib);
  CodecContext ctx;
  ctx.n_layer = 1;
  ctx.n_head_kv = 1;
  ctx.dim = fx.d;
  ctx.kind = KvKind::kValue;
  auto t = MakeTransform("lowrank:file=" + fx.path + ",ratio=0.5", ctx);
  ASSERT_TRUE(t.ok()) << t.status().ToString();
  EXPECT_EQ((*t)->out_dim(), 32);
  EXPECT_FALSE((*t)->pre_rope());
  std::vector<float> xs(size_t(x.rows()) * fx.d), y(size_t(x.rows()) * 32), xr(xs.size());
  for (int i = 0; i < x.rows(); ++i)
    for (int c = 0; c < fx.d; ++c) xs[size_t(i) * fx.d + c] = float(x(i, c));
  (*t)->Forward(xs.data(), int(x.rows()), y.data());
  (*t)->Reconstruct(y.data(), int(x.rows()), xr.data());
  double err = 0;
  for (size_t i = 0; i < xs.size(); ++i) err += double(xs[i] - xr[i]) * (xs[i] - xr[i]);
  Eigen::SelfAdjointEigenSolver<Eigen::MatrixXd> es(x.transpose() * x);
  double discarded = 0;
  for (int i = 0; i < 32; ++i) discarded += es.eigenvalues()(i);
  EXPECT_NEAR(err, discarded, 1e-3 * discarded);
  ctx.kind = KvKind::kKey;
  auto tk = MakeTransform("lowrank:file=" + fx.path, ctx);
  ASSERT_TRUE(tk.ok());
  EXPECT_TRUE((*tk)->pre_rope());
}

TEST(LowRank, AwareBasisMinimisesWeightedError) {
  Fixture fx;
  fx.n_layer = 1;
  fx.n_head_kv = 1;
  const int d = fx.d, n = 600;
  Eigen::MatrixXd x = RandMat(n, d, 21) * RandMat(d, d, 22);
  Eigen::MatrixXd m = RandMat(d, d, 23);
  m.col(5) *= 20.0;  // the consumer amplifies some directions
  const Eigen::MatrixXd gram = m.transpose() * m;
  CalibrationFile::Tensor g, q2;
  g.dims = {d, d};
  for (int i = 0; i < d; ++i)
    for (int j = 0; j < d; ++j) g.data.push_back(float(gram(i, j)));
  q2.dims = {d};
  for (int i = 0; i < d; ++i) q2.data.push_back(float(1 + (i % 9) * (i % 9)));
  fx.extra[PaluTensorName("wo_gram", KvKind::kValue, 0, 0)] = g;
  fx.extra["think.q2.0.0"] = q2;
  std::vector<Eigen::MatrixXd> calib[2] = {{x}, {x}};
  fx.Write(calib);
  std::vector<float> xs(size_t(n) * d);
  for (int i = 0; i < n; ++i)
    for (int c = 0; c < d; ++c) xs[size_t(i) * d + c] = float(x(i, c));
  for (auto kind : {KvKind::kKey, KvKind::kValue}) {
    Eigen::MatrixXd metric = kind == KvKind::kValue ? gram : Eigen::MatrixXd(Eigen::VectorXd(
        Eigen::Map<Eigen::VectorXf>(q2.data.data(), d).cast<double>()).asDiagonal());
    CodecContext ctx;
    ctx.n_layer = 1;
    ctx.n_head_kv = 1;
    ctx.dim = d;
    ctx.kind = kind;
    auto werr = [&](const std::string& spec) {
      auto t = MakeTransform(spec, ctx);
      EXPECT_TRUE(t.ok()) << t.status().ToString();
      const int r = (*t)->out_dim();
      std::vector<float> y(size_t(n) * r), xr(xs.size());
      (*t)->Forward(xs.data(), n, y.data());
      (*t)->Reconstruct(y.data(), n, xr.data());
      double e = 0;
      for (int i = 0; i < n; ++i) {
        Eigen::VectorXd diff(d);
        for (int c = 0; c < d; ++c) diff(c) = double(xs[size_t(i) * d + c]) - xr[size_t(i) * d + c];
        e += diff.dot(metric * diff);
      }
      return e;
    };
    const std::string base = "lowrank:file=" + fx.path;
    const double plain = werr(base + ",ratio=0.25"), aware = werr(base + ",ratio=0.25,aware=1");
    EXPECT_LT(aware, 0.9 * plain) << KvKindName(kind);
    double ref = 0;
    for (int i = 0; i < n; ++i) ref += x.row(i) * metric * x.row(i).transpose();
    EXPECT_LT(werr(base + ",ratio=1,aware=1"), 1e-6 * ref);  // full rank: exact
    EXPECT_LT(werr(base + ",ratio=0.25,aware=1,rot=1"), aware * 1.0001);  // rotation is free
  }
}

TEST(LowRank, RankAllocation) {
  Fixture fx;
  fx.n_layer = 2;
  fx.n_head_kv = 1;
  // Stream 0: energy in 8 dims; stream 1: flat spectrum.
  Eigen::MatrixXd low = RandMat(400, 8, 1) * RandMat(8, fx.d, 2);
  low += 1e-3 * RandMat(400, fx.d, 3);
  Eigen::MatrixXd flat = RandMat(400, fx.d, 4);
  std::vector<Eigen::MatrixXd> calib[2] = {{low, flat}, {low, flat}};
  fx.Write(calib);
  auto f = ReadCalibrationFile(fx.path);
  ASSERT_TRUE(f.ok());
  auto uni = PaluRanks(*f, KvKind::kKey, 2, 1, fx.d, 0.3, "uniform", 1);
  ASSERT_TRUE(uni.ok());
  EXPECT_EQ(*uni, (std::vector<int>{19, 19}));
  auto var = PaluRanks(*f, KvKind::kKey, 2, 1, fx.d, 0.3, "var", 1);
  ASSERT_TRUE(var.ok());
  EXPECT_EQ((*var)[0] + (*var)[1], 38);
  EXPECT_LE((*var)[0], 10);  // the low-rank stream needs ~8
  auto mul = PaluRanks(*f, KvKind::kKey, 2, 1, fx.d, 0.3, "var", 16);
  ASSERT_TRUE(mul.ok());
  for (int r : *mul) EXPECT_EQ(r % 16, 0);
  EXPECT_FALSE(PaluRanks(*f, KvKind::kKey, 2, 1, fx.d, 0.0, "uniform", 1).ok());
  EXPECT_FALSE(PaluRanks(*f, KvKind::kKey, 2, 1, fx.d, 0.5, "fisher", 1).ok());
  EXPECT_FALSE(PaluRanks(*f, KvKind::kKey, 2, 1, fx.d, 0.5, "uniform", 7).ok());
}

TEST(LowRank, GlobalAllocationSharesOneBudgetAcrossKAndV) {
  Fixture fx;
  fx.n_layer = 2;
  fx.n_head_kv = 1;
  // Keys: energy in ~8 dims; values: flat spectrum. One budget for both: keys get less.
  Eigen::MatrixXd low = RandMat(400, 8, 1) * RandMat(8, fx.d, 2);
  low += 1e-3 * RandMat(400, fx.d, 3);
  Eigen::MatrixXd flat = RandMat(400, fx.d, 4);
  std::vector<Eigen::MatrixXd> calib[2] = {{low, low}, {flat, flat}};
  fx.Write(calib);
  auto f = ReadCalibrationFile(fx.path);
  ASSERT_TRUE(f.ok());
  auto rk = PaluRanks(*f, KvKind::kKey, 2, 1, fx.d, 0.5, "global", 1);
  auto rv = PaluRanks(*f, KvKind::kValue, 2, 1, fx.d, 0.5, "global", 1);
  ASSERT_TRUE(rk.ok() && rv.ok());
  EXPECT_EQ((*rk)[0] + (*rk)[1] + (*rv)[0] + (*rv)[1], 2 * 2 * 32);  // the total budget
  EXPECT_LE((*rk)[0], 12);
  EXPECT_LE((*rk)[1], 12);
  EXPECT_GE((*rv)[0], 50);
  // Cached result equals a recomputation.
  auto rk2 = PaluRanks(*f, KvKind::kKey, 2, 1, fx.d, 0.5, "global", 1);
  EXPECT_EQ(*rk, *rk2);
  // The transforms use these ranks.
  CodecContext ctx;
  ctx.n_layer = 2;
  ctx.n_head_kv = 1;
  ctx.dim = fx.d;
  ctx.kind = KvKind::kValue;
  auto t = MakeTransform("lowrank:file=" + fx.path + ",ratio=0.5,alloc=global", ctx);
  ASSERT_TRUE(t.ok()) << t.status().ToString();
  EXPECT_EQ((*t)->out_dim(), (*rv)[0]);
}

TEST(LowRank, AwareKeysUseTheQueryMetric) {
  // palu.k.qmetric (a full matrix, incl. cross-channel terms) is the metric for keys when present.
  Fixture fx;
  fx.n_layer = 1;
  fx.n_head_kv = 1;
  const int d = fx.d, n = 600;
  Eigen::MatrixXd x = RandMat(n, d, 31) * RandMat(d, d, 32);
  Eigen::MatrixXd m = RandMat(d, d, 33);
  m.row(7) *= 30.0;
  const Eigen::MatrixXd metric = m.transpose() * m;
  CalibrationFile::Tensor g, q2;
  g.dims = {d, d};
  for (int i = 0; i < d; ++i)
    for (int j = 0; j < d; ++j) g.data.push_back(float(metric(i, j)));
  q2.dims = {d};
  q2.data.assign(d, 1.0f);  // would give the plain basis
  fx.extra[PaluTensorName("qmetric", KvKind::kKey, 0, 0)] = g;
  fx.extra["think.q2.0.0"] = q2;
  std::vector<Eigen::MatrixXd> calib[2] = {{x}, {x}};
  fx.Write(calib);
  std::vector<float> xs(size_t(n) * d);
  for (int i = 0; i < n; ++i)
    for (int c = 0; c < d; ++c) xs[size_t(i) * d + c] = float(x(i, c));
  CodecContext ctx;
  ctx.n_layer = 1;
  ctx.n_head_kv = 1;
  ctx.dim = d;
  ctx.kind = KvKind::kKey;
  auto werr = [&](const std::string& spec) {
    auto t = MakeTransform(spec, ctx);
    EXPECT_TRUE(t.ok()) << t.status().ToString();
    const int r = (*t)->out_dim();
    std::vector<float> y(size_t(n) * r), xr(xs.size());
    (*t)->Forward(xs.data(), n, y.data());
    (*t)->Reconstruct(y.data(), n, xr.data());
    double e = 0;
    for (int i = 0; i < n; ++i) {
      Eigen::VectorXd diff(d);
      for (int c = 0; c < d; ++c) diff(c) = double(xs[size_t(i) * d + c]) - xr[size_t(i) * d + c];
      e += diff.dot(metric * diff);
    }
    return e;
  };
  const std::string base = "lowrank:file=" + fx.path + ",ratio=0.25";
  EXPECT_LT(werr(base + ",aware=1"), 0.9 * werr(base));
}

TEST(LowRank, ClearErrors) {
  CodecContext ctx;
  ctx.n_layer = 1;
  ctx.n_head_kv = 1;
  ctx.dim = 64;
  auto e = MakeTransform("lowrank", ctx);
  EXPECT_EQ(e.status().code(), StatusCode::kInvalidArgument);
  EXPECT_NE(e.status().message().find("calibrate"), std::string::npos);
  EXPECT_EQ(MakeTransform("lowrank:file=/nonexistent.kvccal", ctx).status().code(),
            StatusCode::kNotFound);
  Fixture fx;  // 2 layers, 2 heads
  Eigen::MatrixXd x = RandMat(100, 64, 1);
  std::vector<Eigen::MatrixXd> calib[2] = {{x, x, x, x}, {x, x, x, x}};
  fx.Write(calib);
  auto wrong = MakeTransform("lowrank:file=" + fx.path, ctx);  // shape mismatch
  EXPECT_EQ(wrong.status().code(), StatusCode::kInvalidArgument);
  EXPECT_NE(wrong.status().message().find("calibrate for this model"), std::string::npos);
  ctx.n_layer = 2;
  ctx.n_head_kv = 2;
  EXPECT_TRUE(MakeTransform("lowrank:file=" + fx.path, ctx).ok());
  EXPECT_FALSE(MakeTransform("lowrank:file=" + fx.path + ",ratoi=0.5", ctx).ok());  // typo
  EXPECT_FALSE(MakeTransform("lowrank:file=" + fx.path + ",ratio=0.3,rot=1", ctx).ok());  // r=19
}

}  // namespace
}  // namespace kvc::kv
