#include "kv/policies/snapkv.h"

#include <algorithm>
#include <cmath>

#include <fmt/format.h>

namespace kvc::kv {

std::string SnapKvPolicy::Name() const {
  return fmt::format("snapkv:window={},kernel={}", p_.window, kernel_);
}

AttnStatsRequest SnapKvPolicy::StatsNeeded() const {
  AttnStatsRequest r;
  r.obs_window = int(std::max<int64_t>(p_.window, 1));
  return r;
}

void SnapKvPolicy::Score(KvCache& cache, int layer, int head, std::vector<float>* s) {
  const auto& obs = cache.obs_scores(layer, head);
  const int64_t n = int64_t(s->size());
  // Cells written after the last voting Attend (none after a prompt) count as most important.
  std::vector<float> raw(size_t(n), INFINITY);
  for (int64_t i = 0; i < n && i < int64_t(obs.size()); ++i) raw[i] = obs[i];
  const int64_t body = std::max<int64_t>(0, n - p_.window);
  const int half = kernel_ / 2;
  for (int64_t i = 0; i < n; ++i) {
    if (i >= body || kernel_ <= 1) { (*s)[i] = raw[i]; continue; }
    float acc = max_pool_ ? -INFINITY : 0.f;
    for (int64_t j = i - half; j <= i + half; ++j) {
      const float x = (j >= 0 && j < body) ? raw[j] : 0.f;
      if (max_pool_) acc = std::max(acc, (j >= 0 && j < body) ? x : -INFINITY);
      else acc += x;
    }
    (*s)[i] = max_pool_ ? acc : acc / float(kernel_);
  }
}

Status ParseSnapKv(const CodecSpec& spec, CommonParams* p, int* kernel, bool* max_pool) {
  KVC_ASSIGN_OR_RETURN(int window, spec.GetInt("window", 32));
  KVC_ASSIGN_OR_RETURN(*kernel, spec.GetInt("kernel", 7));
  KVC_ASSIGN_OR_RETURN(std::string pool, spec.GetString("pool", "avg"));
  if (window < 0 || *kernel < 1 || (*kernel % 2) == 0) {
    return InvalidArgument(fmt::format("{}: need window >= 0 and an odd kernel >= 1",
                                       spec.ToString()));
  }
  if (pool != "avg" && pool != "max") {
    return InvalidArgument(fmt::format("{}: pool must be avg or max", spec.ToString()));
  }
  *max_pool = pool == "max";
  KVC_RETURN_IF_ERROR(ParseCommon(spec, When::kPrefill, p));
  p->window = window;
  return Status::Ok();
}

StatusOr<std::unique_ptr<EvictionPolicy>> MakeSnapKvPolicy(const CodecSpec& spec, const KvShape&) {
  CommonParams p;
  int kernel;
  bool max_pool;
  KVC_RETURN_IF_ERROR(ParseSnapKv(spec, &p, &kernel, &max_pool));
  KVC_RETURN_IF_ERROR(spec.CheckAllUsed());
  return std::unique_ptr<EvictionPolicy>(new SnapKvPolicy(p, kernel, max_pool));
}

}  // namespace kvc::kv
