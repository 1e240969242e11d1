#include "kv/transforms/smooth.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>

#include <fmt/format.h>

#include "kv/calibration_file.h"
#include "kv/transforms/hadamard.h"

namespace kvc::kv {

std::string SmoothTensorName(const char* what, int layer, int head) {
  return fmt::format("smooth.{}.{}.{}", what, layer, head);
}

std::vector<int> RopePartners(const RopeParams& p, int head_dim) {
  std::vector<int> partner(head_dim);
  for (int c = 0; c < head_dim; ++c) partner[c] = c;
  const int n_rot = std::min(p.n_rot, head_dim - p.rot_offset);
  if (n_rot < 2) return partner;
  const int half = n_rot / 2;
  for (int i = 0; i < half; ++i) {
    const int a = p.rot_offset + (p.neox ? i : 2 * i);
    const int b = p.rot_offset + (p.neox ? i + half : 2 * i + 1);
    partner[a] = b;
    partner[b] = a;
  }
  return partner;
}

void PairAmplitudes(const float* x, const std::vector<int>& partner, float* out) {
  const int d = int(partner.size());
  for (int c = 0; c < d; ++c) {
    const int o = partner[c];
    out[c] = o == c ? std::fabs(x[c])
                    : float(std::sqrt(0.5 * (double(x[c]) * x[c] + double(x[o]) * x[o])));
  }
}

std::vector<float> SmoothScales(const std::vector<float>& a_k, const std::vector<float>& a_q,
                                double alpha) {
  const int d = int(a_k.size());
  double mk = 0, mq = 0;
  for (int c = 0; c < d; ++c) {
    mk = std::max(mk, double(a_k[c]));
    mq = std::max(mq, double(a_q[c]));
  }
  std::vector<double> ls(d);
  double mean_log = 0;
  for (int c = 0; c < d; ++c) {
    const double k = std::max(double(a_k[c]), 1e-6 * mk + 1e-30);
    const double q = std::max(double(a_q[c]), 1e-6 * mq + 1e-30);
    ls[c] = alpha * std::log(k) - (1.0 - alpha) * std::log(q);
    mean_log += ls[c] / d;
  }
  std::vector<float> s(d);
  for (int c = 0; c < d; ++c) s[c] = float(std::exp(ls[c] - mean_log));
  return s;
}

namespace {

class SmoothTransform final : public Transform {
 public:
  SmoothTransform(std::vector<float> s, bool rot, std::string name)
      : d_(int(s.size())), rot_(rot), s_(std::move(s)), inv_(d_), name_(std::move(name)) {
    for (int c = 0; c < d_; ++c) inv_[c] = 1.0f / s_[c];
  }
  std::string Name() const override { return name_; }
  int in_dim() const override { return d_; }
  int out_dim() const override { return d_; }
  size_t ParamBytes() const override { return (s_.capacity() + inv_.capacity()) * sizeof(float); }

  // y [n, d] = H? · (x / s)
  void Forward(const float* x, int n, float* y) const override { Scale(x, n, inv_.data(), y); }
  // x [n, d] = s · H? · y
  void Reconstruct(const float* y, int n, float* x) const override {
    for (int t = 0; t < n; ++t) {
      float* xt = x + size_t(t) * d_;
      if (xt != y + size_t(t) * d_) std::memcpy(xt, y + size_t(t) * d_, d_ * sizeof(float));
      if (rot_) FastHadamard(xt, d_);
      for (int c = 0; c < d_; ++c) xt[c] *= s_[c];
    }
  }
  // qf [n, d] = H? · (s · q)
  void FoldQuery(const float* q, int n, float* qf) const override { Scale(q, n, s_.data(), qf); }

 private:
  void Scale(const float* x, int n, const float* m, float* y) const {
    for (int t = 0; t < n; ++t) {
      const float* xt = x + size_t(t) * d_;
      float* yt = y + size_t(t) * d_;
      for (int c = 0; c < d_; ++c) yt[c] = xt[c] * m[c];
      if (rot_) FastHadamard(yt, d_);
    }
  }
  int d_;
  bool rot_;
  std::vector<float> s_, inv_;  // [d] scales and their reciprocals
  std::string name_;
};

}  // namespace

std::unique_ptr<Transform> MakeSmoothFromScales(std::vector<float> s, bool rot, std::string name) {
  return std::make_unique<SmoothTransform>(std::move(s), rot, std::move(name));
}

StatusOr<std::unique_ptr<Transform>> MakeSmoothTransform(const CodecSpec& spec,
                                                         const CodecContext& ctx) {
  if (ctx.kind != KvKind::kKey) {
    return InvalidArgument("smooth scales key channels only (the query takes the inverse): use "
                           "kt=smooth:file=... (not vt=)");
  }
  std::string path, stat;
  double alpha;
  bool rot;
  KVC_ASSIGN_OR_RETURN(path, spec.GetString("file", ""));
  KVC_ASSIGN_OR_RETURN(alpha, spec.GetDouble("alpha", 0.5));
  KVC_ASSIGN_OR_RETURN(stat, spec.GetString("stat", "max"));
  KVC_ASSIGN_OR_RETURN(rot, spec.GetBool("rot", false));
  KVC_RETURN_IF_ERROR(spec.CheckAllUsed());
  if (path.empty()) {
    return InvalidArgument("smooth needs a calibration file: smooth:file=PATH[,alpha=0.5] (create "
                           "one with `kvcrunch calibrate --method smooth -f BOOK -o PATH`)");
  }
  if (!(alpha >= 0 && alpha <= 1)) {
    return InvalidArgument(fmt::format("smooth: alpha {} must be in [0, 1]", alpha));
  }
  if (stat != "max" && stat != "rms") {
    return InvalidArgument(fmt::format("smooth: stat '{}' unknown (max, rms)", stat));
  }
  if (rot && (ctx.dim <= 0 || (ctx.dim & (ctx.dim - 1)) != 0)) {
    return Unimplemented(fmt::format("smooth: rot=1 needs a power-of-2 head dimension, got {}",
                                     ctx.dim));
  }
  std::vector<float> s;
  KVC_ASSIGN_OR_RETURN(s, LoadSmoothScales(path, alpha, stat, ctx.n_layer, ctx.n_head_kv, ctx.dim,
                                           ctx.layer, ctx.head));
  return MakeSmoothFromScales(std::move(s), rot,
                              fmt::format("smooth:alpha={},stat={}{}", alpha, stat,
                                          rot ? ",rot=1" : ""));
}

StatusOr<std::vector<float>> LoadSmoothScales(const std::string& path, double alpha,
                                              const std::string& stat, int n_layer, int n_head_kv,
                                              int head_dim, int layer, int head) {
  if (!(alpha >= 0 && alpha <= 1)) {
    return InvalidArgument(fmt::format("smooth: alpha {} must be in [0, 1]", alpha));
  }
  if (stat != "max" && stat != "rms") {
    return InvalidArgument(fmt::format("smooth: stat '{}' unknown (max, rms)", stat));
  }
  std::shared_ptr<const CalibrationFile> f;
  KVC_ASSIGN_OR_RETURN(f, LoadCalibrationFileShared(path));
  if (std::atoi(f->MetaOr("n_layer", "0").c_str()) != n_layer ||
      std::atoi(f->MetaOr("n_head_kv", "0").c_str()) != n_head_kv ||
      std::atoi(f->MetaOr("head_dim", "0").c_str()) != head_dim) {
    return InvalidArgument(fmt::format(
        "calibration file '{}' (model '{}', n_layer {} n_head_kv {} head_dim {}) does not match "
        "this model (n_layer {} n_head_kv {} head_dim {}): calibrate for this model", path,
        f->MetaOr("model_id", "?"), f->MetaOr("n_layer", "?"), f->MetaOr("n_head_kv", "?"),
        f->MetaOr("head_dim", "?"), n_layer, n_head_kv, head_dim));
  }
  const std::string kname = SmoothTensorName(stat == "max" ? "kmax" : "krms", layer, head);
  const std::string qname = SmoothTensorName(stat == "max" ? "qmax" : "qrms", layer, head);
  if (!f->Find(kname) || !f->Find(qname)) {
    return NotFound(fmt::format("calibration file '{}' has no smoothing statistics ('{}'); make "
                                "one with `kvcrunch calibrate --method smooth -f BOOK -o PATH`",
                                path, kname));
  }
  const CalibrationFile::Tensor *tk, *tq;
  KVC_ASSIGN_OR_RETURN(tk, f->Get(kname, head_dim));
  KVC_ASSIGN_OR_RETURN(tq, f->Get(qname, head_dim));
  for (const auto* t : {tk, tq}) {
    for (int c = 0; c < head_dim; ++c) {
      const float x = t->data[c];
      if (!std::isfinite(x) || x < 0) {
        return InvalidArgument(fmt::format("calibration file '{}': tensor '{}' channel {} is {} "
                                           "(statistics must be finite and >= 0); re-run "
                                           "`kvcrunch calibrate --method smooth`", path,
                                           t == tk ? kname : qname, c, x));
      }
    }
  }
  return SmoothScales(tk->data, tq->data, alpha);
}

}  // namespace kvc::kv
