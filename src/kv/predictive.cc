#include "kv/predictive.h"

#include <cblas.h>

#include <cmath>

#include <Eigen/Dense>
#include <fmt/format.h>

namespace kvc::kv {

StatusOr<std::shared_ptr<const KvPredictor>> KvPredictor::FromFile(const CalibrationFile& f,
                                                                   const KvShape& shape,
                                                                   const std::string& path) {
  const std::string kind = f.MetaOr("kind", "");
  if (kind != "kv-predict") {
    return InvalidArgument(fmt::format("predict file '{}' is a '{}' calibration file, not "
                                       "'kv-predict' (make one with: kvcrunch calibrate --method "
                                       "predict -f TEXT -o FILE)", path, kind));
  }
  auto meta_int = [&](const char* key) { return f.MetaOr(key, "?"); };
  const std::string want = fmt::format("{}/{}/{}/{}", shape.n_layer, shape.n_head_kv,
                                       shape.head_dim, shape.DimV());
  const std::string have = fmt::format("{}/{}/{}/{}", meta_int("n_layer"), meta_int("n_head_kv"),
                                       meta_int("head_dim"), meta_int("head_dim_v"));
  if (want != have) {
    return InvalidArgument(fmt::format(
        "predict file '{}' was made for n_layer/n_head_kv/head_dim/head_dim_v {} but this cache "
        "has {}", path, have, want));
  }
  auto p = std::make_shared<KvPredictor>();
  p->n_layer_ = shape.n_layer;
  p->dk_ = shape.n_head_kv * shape.head_dim;
  p->dv_ = shape.n_head_kv * shape.DimV();
  p->wk.resize(shape.n_layer);
  p->wv.resize(shape.n_layer);
  for (int l = 0; l < shape.n_layer; ++l) {
    for (int kv = 0; kv < 2; ++kv) {
      if (kv == 0 && l == 0) continue;
      const std::string name = fmt::format("predict.{}.L{}", kv == 0 ? "k" : "v", l);
      const int64_t in = kv == 0 ? p->dk_ + 1 : (l == 0 ? p->dk_ + 1 : p->dv_ + p->dk_ + 1);
      const int64_t out = kv == 0 ? p->dk_ : p->dv_;
      const CalibrationFile::Tensor* t = f.Find(name);
      if (!t) return InvalidArgument(fmt::format("predict file '{}': tensor {} missing", path, name));
      if (t->dims != std::vector<int64_t>{in, out} || int64_t(t->data.size()) != in * out) {
        return InvalidArgument(fmt::format("predict file '{}': tensor {} is not [{}, {}]", path,
                                           name, in, out));
      }
      for (float x : t->data) {
        if (!std::isfinite(x)) {
          return InvalidArgument(fmt::format("predict file '{}': tensor {} holds a non-finite "
                                             "weight ({})", path, name, x));
        }
      }
      (kv == 0 ? p->wk : p->wv)[l] = t->data;
    }
  }
  return std::shared_ptr<const KvPredictor>(std::move(p));
}

StatusOr<std::shared_ptr<const KvPredictor>> KvPredictor::Load(const std::string& path,
                                                               const KvShape& shape) {
  std::shared_ptr<const CalibrationFile> f;
  KVC_ASSIGN_OR_RETURN(f, LoadCalibrationFileShared(path));
  return FromFile(*f, shape, path);
}

void KvPredictor::PredictK(int l, const float* prev_k, int64_t n, float* out) const {
  const std::vector<float>& w = wk[l];
  // out = prev_k · W[0:dk] + 1 · W[dk]
  for (int64_t i = 0; i < n; ++i) std::copy(&w[size_t(dk_) * dk_], &w[size_t(dk_) * dk_] + dk_, out + i * dk_);
  if (n > 0) {
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, int(n), dk_, dk_, 1.0f, prev_k, dk_,
                w.data(), dk_, 1.0f, out, dk_);
  }
}

void KvPredictor::PredictV(int l, const float* prev_v, const float* k, int64_t n, float* out) const {
  const std::vector<float>& w = wv[l];
  const int off_k = l == 0 ? 0 : dv_;     // rows of W for the keys
  const size_t bias = size_t(off_k + dk_) * dv_;
  for (int64_t i = 0; i < n; ++i) std::copy(&w[bias], &w[bias] + dv_, out + i * dv_);
  if (n == 0) return;
  if (l > 0) {
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, int(n), dv_, dv_, 1.0f, prev_v, dv_,
                w.data(), dv_, 1.0f, out, dv_);
  }
  cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, int(n), dv_, dk_, 1.0f, k, dk_,
              w.data() + size_t(off_k) * dv_, dv_, 1.0f, out, dv_);
}

size_t KvPredictor::ParamBytes() const {
  size_t b = 0;
  for (const auto& w : wk) b += w.size() * sizeof(float);
  for (const auto& w : wv) b += w.size() * sizeof(float);
  return b;
}

StatusOr<std::vector<float>> SolveRidge(const std::vector<double>& g, const std::vector<double>& c,
                                        int in, int out, double lambda) {
  if (in < 1 || out < 1 || g.size() != size_t(in) * in || c.size() != size_t(in) * out) {
    return InvalidArgument("SolveRidge: bad sizes");
  }
  Eigen::MatrixXd G = Eigen::Map<const Eigen::Matrix<double, -1, -1, Eigen::RowMajor>>(g.data(), in, in);
  Eigen::MatrixXd C = Eigen::Map<const Eigen::Matrix<double, -1, -1, Eigen::RowMajor>>(c.data(), in, out);
  double mean_diag = 0;
  for (int i = 0; i + 1 < in; ++i) mean_diag += G(i, i);
  mean_diag = in > 1 ? mean_diag / (in - 1) : 0.0;
  for (int i = 0; i + 1 < in; ++i) G(i, i) += lambda * mean_diag;
  Eigen::LDLT<Eigen::MatrixXd> ldlt(G);
  if (ldlt.info() != Eigen::Success || !ldlt.isPositive()) {
    return InvalidArgument("SolveRidge: the calibration second-moment matrix is singular (too few "
                           "calibration tokens?)");
  }
  Eigen::MatrixXd W = ldlt.solve(C);
  std::vector<float> w(size_t(in) * out);
  for (int i = 0; i < in; ++i) {
    for (int j = 0; j < out; ++j) {
      const double x = W(i, j);
      if (!std::isfinite(x)) return InvalidArgument("SolveRidge: non-finite solution");
      w[size_t(i) * out + j] = float(x);
    }
  }
  return w;
}

}  // namespace kvc::kv
