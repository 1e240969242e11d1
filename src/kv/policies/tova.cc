#include "kv/policies/tova.h"

#include <cmath>

#include <fmt/format.h>

#include "kv/policies/common.h"

namespace kvc::kv {
namespace {

class TovaPolicy : public ScoredPolicy {
 public:
  explicit TovaPolicy(CommonParams p) : ScoredPolicy(std::move(p)) {}
  std::string Name() const override { return "tova"; }
  AttnStatsRequest StatsNeeded() const override {
    AttnStatsRequest r;
    r.obs_window = 1;
    return r;
  }
  void Score(KvCache& cache, int layer, int head, std::vector<float>* s) override {
    const int64_t n = int64_t(s->size());
    const int nkv = cache.shape().n_head_kv;
    bool shared = true;
    for (int h = 0; h < nkv; ++h) shared = shared && cache.n_cells(layer, h) == n;
    std::fill(s->begin(), s->end(), 0.f);
    int used = 0;
    for (int h = 0; h < nkv; ++h) {
      if (!shared && h != head) continue;
      const auto& obs = cache.obs_scores(layer, h);
      for (int64_t i = 0; i < n; ++i) (*s)[i] += i < int64_t(obs.size()) ? obs[i] : INFINITY;
      ++used;
    }
    for (auto& x : *s) x /= float(used);
  }
};

}  // namespace

StatusOr<std::unique_ptr<EvictionPolicy>> MakeTovaPolicy(const CodecSpec& spec, const KvShape&) {
  CommonParams p;
  KVC_RETURN_IF_ERROR(ParseCommon(spec, When::kStep, &p));
  KVC_ASSIGN_OR_RETURN(int window, spec.GetInt("window", 0));
  KVC_RETURN_IF_ERROR(spec.CheckAllUsed());
  if (window < 0) return InvalidArgument(fmt::format("{}: window must be >= 0", spec.ToString()));
  p.window = window;
  return std::unique_ptr<EvictionPolicy>(new TovaPolicy(p));
}

}  // namespace kvc::kv
