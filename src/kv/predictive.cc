#include "kv/predictive.h"

#include <cblas.h>

#include <cmath>
#include <cstdlib>

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
      const int64_t in = kv == 0 ? p->InK(l) : p->InV(l);
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
        // A least-squares fit on activations of O(10) gives weights of O(10) (SmolLM2: |w| <= 13);
        // 1e6 means a corrupt or hand-edited file, and predictions would overflow to garbage.
        if (std::fabs(x) > 1e6f) {
          return InvalidArgument(fmt::format("predict file '{}': tensor {} holds an implausible "
                                             "weight {} (|w| > 1e6); recalibrate", path, name, x));
        }
      }
      (kv == 0 ? p->wk : p->wv)[l] = t->data;
    }
  }
  return std::shared_ptr<const KvPredictor>(std::move(p));
}

StatusOr<std::shared_ptr<const KvPredictor>> KvPredictor::Load(const std::string& path_in,
                                                               const KvShape& shape) {
  std::string path = path_in;
  if (path == "auto") {
    const char* env = std::getenv("KVC_PREDICT_AUTO");
    if (!env || !*env) {
      return InvalidArgument("predict=auto: no predictor file was prepared for this model (the "
                             "kvcrunch commands make <model>.predict.kvc on first use; a library "
                             "caller sets KVC_PREDICT_AUTO or gives predict=FILE)");
    }
    path = env;
  }
  std::shared_ptr<const CalibrationFile> f;
  KVC_ASSIGN_OR_RETURN(f, LoadCalibrationFileShared(path));
  return FromFile(*f, shape, path);
}

// out = Σ_blocks x_b · W[rows of b] + bias row, one GEMM per input block (no concatenation).
static void Affine(const std::vector<float>& w, int out_dim, const float* const* x, const int* dims,
                   int n_blocks, int64_t n, float* out) {
  int row = 0;
  for (int b = 0; b < n_blocks; ++b) row += dims[b];
  for (int64_t i = 0; i < n; ++i) std::copy(&w[size_t(row) * out_dim], &w[size_t(row) * out_dim] + out_dim, out + i * out_dim);
  if (n == 0) return;
  row = 0;
  for (int b = 0; b < n_blocks; ++b) {
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, int(n), out_dim, dims[b], 1.0f, x[b],
                dims[b], w.data() + size_t(row) * out_dim, out_dim, 1.0f, out, out_dim);
    row += dims[b];
  }
}

void KvPredictor::PredictK(int l, const float* prev_k, const float* prev_v, int64_t n, float* out) const {
  const float* x[2] = {prev_k, prev_v};
  const int dims[2] = {dk_, dv_};
  Affine(wk[l], dk_, x, dims, 2, n, out);
}

void KvPredictor::PredictV(int l, const float* prev_k, const float* prev_v, const float* k, int64_t n,
                           float* out) const {
  if (l == 0) {
    const float* x[1] = {k};
    const int dims[1] = {dk_};
    Affine(wv[0], dv_, x, dims, 1, n, out);
    return;
  }
  const float* x[3] = {prev_k, prev_v, k};
  const int dims[3] = {dk_, dv_, dk_};
  Affine(wv[l], dv_, x, dims, 3, n, out);
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
  const Eigen::VectorXd dg = ldlt.vectorD();
  if (ldlt.info() != Eigen::Success || !ldlt.isPositive() || !(dg.maxCoeff() > 0) ||
      dg.minCoeff() <= 1e-12 * dg.maxCoeff()) {
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
