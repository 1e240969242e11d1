#include "kv/policies/adakv.h"

#include <algorithm>
#include <cmath>
#include <tuple>

#include <fmt/format.h>

#include "kv/policies/common.h"

namespace kvc::kv {
namespace {

class AdaKvPolicy : public ScoredPolicy {
 public:
  AdaKvPolicy(std::unique_ptr<EvictionPolicy> base, ScoredPolicy* scored, double alpha)
      : ScoredPolicy(scored->params()), base_(std::move(base)), scored_(scored), alpha_(alpha) {}
  std::string Name() const override { return "adakv(" + base_->Name() + ")"; }
  AttnStatsRequest StatsNeeded() const override { return base_->StatsNeeded(); }
  void Score(KvCache& cache, int layer, int head, std::vector<float>* s) override {
    scored_->Score(cache, layer, head, s);
  }
  // Per-layer (PyramidKV) or per-head (Ada-KV) budgets rise above the mean budget: no cap.
  int64_t MaxCells(int64_t n_prompt, int64_t n_total, int chunk) const override { return n_total; }
  int64_t LayerTarget(int layer, int64_t n, int64_t budget) const override {
    return scored_->LayerTarget(layer, n, budget);
  }
  Status CompressLayer(KvCache& cache, int layer, int64_t target) override {
    const int nkv = cache.shape().n_head_kv;
    std::vector<std::vector<float>> sc(nkv);
    std::vector<std::vector<char>> mark(nkv);
    int64_t total_cells = 0;
    for (int h = 0; h < nkv; ++h) total_cells += cache.n_cells(layer, h);
    const int64_t total = target * nkv;
    if (total_cells <= total) return Status::Ok();
    int64_t used = 0;
    const int64_t floor_k = int64_t(std::ceil(alpha_ * double(target)));
    for (int h = 0; h < nkv; ++h) {
      const int64_t n = cache.n_cells(layer, h);
      sc[h].assign(size_t(n), 0.f);
      Score(cache, layer, h, &sc[h]);
      // Protected tokens plus the head's own floor: SelectKeep with the base's sink/window.
      const int64_t prot = std::min(n, p_.window + p_.sink);
      const auto own = SelectKeep(sc[h].data(), n, std::min(n, std::min(target, prot + floor_k)),
                                  p_.sink, p_.window);
      mark[h].assign(size_t(n), 0);
      for (int32_t i : own) mark[h][i] = 1;
      used += int64_t(own.size());
    }
    // Global top across heads for what is left of the layer budget.
    std::vector<std::tuple<float, int32_t, int>> cand;  // (score, index, head)
    for (int h = 0; h < nkv; ++h) {
      for (int64_t i = 0; i < int64_t(sc[h].size()); ++i) {
        if (!mark[h][i]) {
          const float x = std::isnan(sc[h][i]) ? -INFINITY : sc[h][i];
          cand.emplace_back(x, int32_t(i), h);
        }
      }
    }
    const int64_t need = std::clamp<int64_t>(total - used, 0, int64_t(cand.size()));
    std::partial_sort(cand.begin(), cand.begin() + need, cand.end(), [](auto& a, auto& b) {
      if (std::get<0>(a) != std::get<0>(b)) return std::get<0>(a) > std::get<0>(b);
      if (std::get<1>(a) != std::get<1>(b)) return std::get<1>(a) > std::get<1>(b);
      return std::get<2>(a) < std::get<2>(b);
    });
    for (int64_t j = 0; j < need; ++j) mark[std::get<2>(cand[j])][std::get<1>(cand[j])] = 1;
    for (int h = 0; h < nkv; ++h) {
      std::vector<int32_t> keep;
      for (size_t i = 0; i < mark[h].size(); ++i) if (mark[h][i]) keep.push_back(int32_t(i));
      if (keep.size() < mark[h].size()) KVC_RETURN_IF_ERROR(ApplyKeep(cache, layer, h, keep));
    }
    return Status::Ok();
  }

 private:
  std::unique_ptr<EvictionPolicy> base_;
  ScoredPolicy* scored_;
  double alpha_;
};

}  // namespace

StatusOr<std::unique_ptr<EvictionPolicy>> MakeAdaKvPolicy(const CodecSpec& spec,
                                                           const KvShape& shape) {
  KVC_ASSIGN_OR_RETURN(std::string base, spec.GetString("base", "snapkv"));
  KVC_ASSIGN_OR_RETURN(double alpha, spec.GetDouble("alpha", 0.2));
  if (!(alpha >= 0 && alpha <= 1)) {
    return InvalidArgument(fmt::format("{}: alpha (per-head floor, fraction of the head budget) "
                                       "must be in [0, 1]", spec.ToString()));
  }
  if (base != "snapkv" && base != "pyramid" && base != "knorm" && base != "tova") {
    return InvalidArgument(fmt::format("{}: base must be snapkv, pyramid, "
                                       "knorm or tova", spec.ToString()));
  }
  CodecSpec inner = spec;
  inner.name = base;
  inner.params.erase("base");
  inner.params.erase("alpha");
  inner.used_.clear();
  KVC_ASSIGN_OR_RETURN(auto p, MakePolicy(inner.ToString(), shape));
  auto* scored = dynamic_cast<ScoredPolicy*>(p.get());
  if (!scored) {
    return InvalidArgument(fmt::format("{}: base '{}' is not score-based", spec.ToString(), base));
  }
  return std::unique_ptr<EvictionPolicy>(new AdaKvPolicy(std::move(p), scored, alpha));
}

}  // namespace kvc::kv
