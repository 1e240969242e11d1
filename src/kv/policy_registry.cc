// The eviction policy registry: one row per policy in src/kv/policies/.
#include <fmt/format.h>

#include "kv/policy.h"
#include "kv/policies/adakv.h"
#include "kv/policies/chain.h"
#include "kv/policies/h2o.h"
#include "kv/policies/knorm.h"
#include "kv/policies/pyramid.h"
#include "kv/policies/snapkv.h"
#include "kv/policies/streaming.h"
#include "kv/policies/tova.h"

namespace kvc::kv {

const std::vector<PolicyInfo>& RegisteredPolicies() {
  static const std::vector<PolicyInfo> kPolicies = {
      {"streaming", "StreamingLLM: S sink tokens + W recent, in-cache positions", MakeStreamingPolicy},
      {"h2o", "H2O: accumulated attention heavy hitters + recent window", MakeH2oPolicy},
      {"snapkv", "SnapKV: observation-window votes, pooled, after prefill", MakeSnapKvPolicy},
      {"pyramid", "PyramidKV: SnapKV scores with a per-layer pyramid budget", MakePyramidPolicy},
      {"tova", "TOVA: last query's attention, layer-shared, every step", MakeTovaPolicy},
      {"knorm", "KNorm: keep the lowest-L2-norm keys", MakeKnormPolicy},
      {"adakv", "Ada-KV: head-adaptive budgets over a base policy's scores", MakeAdaKvPolicy},
  };
  return kPolicies;
}

Status EvictionPolicy::LoadState(const std::vector<int64_t>& state) {
  if (!state.empty()) {
    return InvalidArgument(fmt::format("policy {} keeps no state, but {} values were given", Name(),
                                       state.size()));
  }
  return Status::Ok();
}

StatusOr<std::unique_ptr<EvictionPolicy>> MakePolicy(const std::string& text, const KvShape& shape) {
  if (text.empty() || text == "none") return std::unique_ptr<EvictionPolicy>();
  if (text.find('+') != std::string::npos) return MakeChainPolicy(text, shape);
  auto spec = ParseSpec(text);
  if (!spec.ok()) return spec.status();
  for (const auto& p : RegisteredPolicies()) {
    if (p.name == spec->name) return p.factory(*spec, shape);
  }
  std::string known = "none";
  for (const auto& p : RegisteredPolicies()) known += ", " + p.name;
  return InvalidArgument(fmt::format("unknown eviction policy '{}' (known: {})", text, known));
}

}  // namespace kvc::kv
