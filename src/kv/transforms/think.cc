#include "kv/transforms/think.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <numeric>

#include <fmt/format.h>

#include "kv/calibration_file.h"

namespace kvc::kv {

namespace {

class ChannelSelect final : public Transform {
 public:
  ChannelSelect(std::vector<int> idx, int dim, std::string name)
      : idx_(std::move(idx)), dim_(dim), name_(std::move(name)) {}
  std::string Name() const override { return name_; }
  int in_dim() const override { return dim_; }
  int out_dim() const override { return int(idx_.size()); }
  size_t ParamBytes() const override { return idx_.capacity() * sizeof(int); }
  // y [n, T] = x [n, dim][:, idx]
  void Forward(const float* x, int n, float* y) const override {
    const int t = out_dim();
    for (int r = 0; r < n; ++r) {
      for (int j = 0; j < t; ++j) y[size_t(r) * t + j] = x[size_t(r) * dim_ + idx_[j]];
    }
  }
  // x [n, dim] = scatter(y [n, T]) with zeros elsewhere
  void Reconstruct(const float* y, int n, float* x) const override {
    const int t = out_dim();
    std::fill(x, x + size_t(n) * dim_, 0.f);
    for (int r = 0; r < n; ++r) {
      for (int j = 0; j < t; ++j) x[size_t(r) * dim_ + idx_[j]] = y[size_t(r) * t + j];
    }
  }
  void FoldQuery(const float* q, int n, float* qf) const override { Forward(q, n, qf); }

 private:
  std::vector<int> idx_;  // [T] kept channels, ascending
  int dim_;
  std::string name_;
};

}  // namespace

std::string ThinkTensorName(const char* what, int layer, int head) {
  return fmt::format("think.{}.{}.{}", what, layer, head);
}

std::vector<int> ThinkSelect(const std::vector<float>& q2, const std::vector<float>& k2, int keep) {
  const int d = int(q2.size());
  std::vector<int> order(d);
  std::iota(order.begin(), order.end(), 0);
  std::vector<double> score(d);
  for (int c = 0; c < d; ++c) score[c] = std::sqrt(std::max(0.0, double(q2[c]))) *
                                         std::sqrt(std::max(0.0, double(k2[c])));
  std::stable_sort(order.begin(), order.end(), [&](int a, int b) { return score[a] > score[b]; });
  order.resize(std::clamp(keep, 0, d));
  std::sort(order.begin(), order.end());
  return order;
}

std::unique_ptr<Transform> MakeChannelSelect(std::vector<int> idx, int dim, std::string name) {
  return std::make_unique<ChannelSelect>(std::move(idx), dim, std::move(name));
}

StatusOr<std::unique_ptr<Transform>> MakeThinkTransform(const CodecSpec& spec,
                                                        const CodecContext& ctx) {
  if (ctx.kind != KvKind::kKey) {
    return InvalidArgument("think prunes key channels only: use it as kt=think:... (not vt=)");
  }
  std::string path;
  double ratio;
  int multiple;
  KVC_ASSIGN_OR_RETURN(path, spec.GetString("file", ""));
  KVC_ASSIGN_OR_RETURN(ratio, spec.GetDouble("ratio", 0.4));
  KVC_ASSIGN_OR_RETURN(multiple, spec.GetInt("multiple", 1));
  KVC_RETURN_IF_ERROR(spec.CheckAllUsed());
  if (path.empty()) {
    return InvalidArgument("think needs a calibration file: think:file=PATH[,ratio=0.4] (create "
                           "one with `kvcrunch calibrate`)");
  }
  if (!(ratio >= 0 && ratio < 1)) {
    return InvalidArgument(fmt::format("think: ratio {} must be in [0, 1) (fraction of key "
                                       "channels pruned)", ratio));
  }
  if (multiple < 1 || ctx.dim % multiple != 0) {
    return InvalidArgument(fmt::format("think: multiple={} must divide head_dim {}", multiple,
                                       ctx.dim));
  }
  std::shared_ptr<const CalibrationFile> f;
  KVC_ASSIGN_OR_RETURN(f, LoadCalibrationFileShared(path));
  if (std::atoi(f->MetaOr("n_layer", "0").c_str()) != ctx.n_layer ||
      std::atoi(f->MetaOr("n_head_kv", "0").c_str()) != ctx.n_head_kv ||
      std::atoi(f->MetaOr("head_dim", "0").c_str()) != ctx.dim) {
    return InvalidArgument(fmt::format("calibration file '{}' (model '{}') does not match this "
                                       "cache's shape: calibrate for this model", path,
                                       f->MetaOr("model_id", "?")));
  }
  const CalibrationFile::Tensor *q2, *k2;
  KVC_ASSIGN_OR_RETURN(q2, f->Get(ThinkTensorName("q2", ctx.layer, ctx.head), ctx.dim));
  KVC_ASSIGN_OR_RETURN(k2, f->Get(ThinkTensorName("k2", ctx.layer, ctx.head), ctx.dim));
  int keep = ctx.dim - int(std::lround(ratio * ctx.dim));
  keep = std::min(ctx.dim, (std::max(keep, 1) + multiple - 1) / multiple * multiple);
  auto idx = ThinkSelect(q2->data, k2->data, keep);
  return MakeChannelSelect(std::move(idx), ctx.dim,
                           fmt::format("think:ratio={},kept={}", ratio, keep));
}

}  // namespace kvc::kv
