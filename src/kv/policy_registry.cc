// The eviction policy registry: one row per policy in src/kv/policies/.
#include <fmt/format.h>

#include "kv/policy.h"

namespace kvc::kv {

const std::vector<PolicyInfo>& RegisteredPolicies() {
  static const std::vector<PolicyInfo> kPolicies = {};
  return kPolicies;
}

StatusOr<std::unique_ptr<EvictionPolicy>> MakePolicy(const std::string& text, const KvShape& shape) {
  if (text.empty() || text == "none") return std::unique_ptr<EvictionPolicy>();
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
