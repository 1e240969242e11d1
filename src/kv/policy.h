// The EvictionPolicy plug-in: decides which cells of each (layer, KV head) to keep.
// The session calls the hooks; the policy plans and applies through KvCache::Keep / Relabel
// (planning has no side effects on the cache until Keep is called).
//
// Budgets accept absolute token counts or kvpress's compression_ratio (fraction removed,
// kept = floor(n · (1 − r))). Per-head ragged budgets are natural: each head's cells are
// independent in storage (KvCache), so uneven budgets free real bytes.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "kv/cache.h"
#include "kv/codec.h"

namespace kvc::kv {

class EvictionPolicy {
 public:
  virtual ~EvictionPolicy() = default;
  virtual std::string Name() const = 0;
  // Statistics the attention kernel must gather for this policy (zero cost if none).
  virtual AttnStatsRequest StatsNeeded() const { return {}; }
  // Position handling the policy requires (StreamingLLM: in-cache); the session configures the
  // cache with it.
  virtual PositionMode position_mode() const { return PositionMode::kOriginal; }
  // Before n_incoming tokens are written (evict-for-space, so a budget is never exceeded).
  virtual Status BeforeWrite(KvCache& cache, int n_incoming) { return Status::Ok(); }
  // After a prompt (all layers written and attended). n_prompt = tokens of this prompt.
  virtual Status AfterPrefill(KvCache& cache, int n_prompt) { return Status::Ok(); }
  // After each single-token decode step.
  virtual Status AfterStep(KvCache& cache) { return Status::Ok(); }
  // Upper bound of the cells one (layer, KV head) holds at any step boundary of a sequence whose
  // prompt has n_prompt tokens, fed in micro-batches of at most `chunk` tokens, once n_total tokens
  // (prompt + generated) have been consumed. The engine reserves KV bytes for this many cells.
  // Default: no bound below n_total (a policy that only compresses the prompt still holds the
  // whole prompt until AfterPrefill, and every generated token).
  virtual int64_t MaxCells(int64_t n_prompt, int64_t n_total, int chunk) const { return n_total; }
  // The policy's own state outside the cache (budgets fixed at the first prompt, step counters),
  // for save / restore (src/store/kv_format.h). LoadState gets what SaveState returned from a
  // policy with the same Name(); INVALID_ARGUMENT when the count does not match.
  virtual std::vector<int64_t> SaveState() const { return {}; }
  virtual Status LoadState(const std::vector<int64_t>& state);
};

using PolicyFactory =
    std::function<StatusOr<std::unique_ptr<EvictionPolicy>>(const CodecSpec&, const KvShape&)>;
struct PolicyInfo {
  std::string name;
  std::string summary;
  PolicyFactory factory;
};
const std::vector<PolicyInfo>& RegisteredPolicies();
// "" or "none" -> nullptr policy (full cache). INVALID_ARGUMENT for unknown names / bad params.
StatusOr<std::unique_ptr<EvictionPolicy>> MakePolicy(const std::string& spec, const KvShape& shape);

}  // namespace kvc::kv
