#include "kv/policies/pyramid.h"

#include <algorithm>
#include <cmath>

#include <fmt/format.h>

namespace kvc::kv {
namespace {

class PyramidPolicy : public SnapKvPolicy {
 public:
  PyramidPolicy(CommonParams p, int kernel, bool max_pool, double beta, int n_layer)
      : SnapKvPolicy(std::move(p), kernel, max_pool), beta_(beta), n_layer_(n_layer) {}
  std::string Name() const override {
    return fmt::format("pyramid:window={},kernel={},beta={}", p_.window, kernel_, beta_);
  }
  // Per-layer (PyramidKV) or per-head (Ada-KV) budgets rise above the mean budget: no cap.
  int64_t MaxCells(int64_t n_prompt, int64_t n_total, int chunk) const override { return n_total; }
  int64_t LayerTarget(int layer, int64_t n, int64_t budget_tokens) const override {
    return PyramidLayerBudget(layer, n_layer_, n, budget_tokens, p_.window, beta_);
  }

 private:
  double beta_;
  int n_layer_;
};

}  // namespace

int64_t PyramidLayerBudget(int layer, int n_layer, int64_t n, int64_t mean_kept, int64_t window,
                           double beta) {
  const double m = double(mean_kept - window);
  if (n_layer < 2 || m <= 0) return mean_kept;
  double lo = m / beta, hi = 2 * m - lo;
  if (hi > double(n - window)) {
    hi = double(n - window);
    lo = 2 * m - hi;
  }
  if (lo < 0 || hi < lo) return mean_kept;
  const double steps = (hi - lo) / double(n_layer - 1);
  return std::min<int64_t>(n, int64_t(std::llround(hi - layer * steps)) + window);
}

StatusOr<std::unique_ptr<EvictionPolicy>> MakePyramidPolicy(const CodecSpec& spec,
                                                             const KvShape& shape) {
  CommonParams p;
  int kernel;
  bool max_pool;
  KVC_RETURN_IF_ERROR(ParseSnapKv(spec, &p, &kernel, &max_pool));
  KVC_ASSIGN_OR_RETURN(double beta, spec.GetDouble("beta", 20));
  KVC_RETURN_IF_ERROR(spec.CheckAllUsed());
  if (!(beta >= 1)) return InvalidArgument(fmt::format("{}: beta must be >= 1", spec.ToString()));
  return std::unique_ptr<EvictionPolicy>(
      new PyramidPolicy(p, kernel, max_pool, beta, shape.n_layer));
}

}  // namespace kvc::kv
