// SnapKV (Li et al., "SnapKV: LLM Knows What You are Looking for Before Generation", NeurIPS 2024,
// §4.2 / Listing 1; kvpress SnapKVPress). Spec: snapkv:budget=B|ratio=r,window=W,kernel=K.
//
// Algorithm: the last W prompt queries (observation window) vote: score_j = Σ over those rows of
// softmax attention to key j, mean over the query heads of the GQA group
// (AttnStatsRequest.obs_window = W; src/kv/attention.cc). Scores of the prefix [0, n−W) are
// smoothed by a 1-D average pool (kernel K, zero padding K/2, divide by K: torch avg_pool1d
// count_include_pad); keep the W window tokens plus the top B−W prefix tokens (ties: oldest
// evicted first). Runs once after each prompt (when=prefill); decode tokens are not evicted.
// Budget: B absolute *includes* the window (SnapKV max_capacity_prompt) or ratio = fraction
// removed (kvpress). window=0 protects nothing (one query row still votes).
// Bytes: the cache's cells + 4 B/token of votes. Worked example, B = 128 at f16, head_dim 64:
// K+V 32,768 B + cells 2,560 B per (layer, KV head), whatever the prompt length.
#pragma once

#include <memory>

#include "kv/policies/common.h"

namespace kvc::kv {

class SnapKvPolicy : public ScoredPolicy {
 public:
  SnapKvPolicy(CommonParams p, int kernel, bool max_pool)
      : ScoredPolicy(std::move(p)), kernel_(kernel), max_pool_(max_pool) {}
  std::string Name() const override;
  AttnStatsRequest StatsNeeded() const override;
  void Score(KvCache& cache, int layer, int head, std::vector<float>* s) override;

 protected:
  int kernel_;
  bool max_pool_;
};

// Reads window= (default 32), kernel= (7), pool=avg|max plus the common parameters.
Status ParseSnapKv(const CodecSpec& spec, CommonParams* p, int* kernel, bool* max_pool);
StatusOr<std::unique_ptr<EvictionPolicy>> MakeSnapKvPolicy(const CodecSpec& spec,
                                                            const KvShape& shape);

}  // namespace kvc::kv
