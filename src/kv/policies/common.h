// Shared machinery of the token-eviction policies (spec-eviction-lowrank-eval.md §0).
//
// Algorithm (one statement for all score-based policies): for each (layer, KV head) with n cells
// and a keep target k < n, keep (1) the first `sink` cells, (2) the last `window` cells, (3) the
// highest-scoring remaining cells until k are kept; ties evict the oldest (lower cell index)
// first, so the kept set is a pure function of the scores (independent of thread count). Kept
// indices stay ascending (temporal order). If k < sink + window, recency wins over sinks.
//
// Budgets (both conventions, §0):
//   budget=N : absolute tokens kept per (layer, KV head) (SnapKV/PyramidKV max_capacity_prompt,
//              includes the protected window);
//   ratio=r  : kvpress compression_ratio, the fraction *removed*: kept = floor(n·(1−r)); a
//              non-empty head keeps at least one token unless r = 1 (asked for none).
// When (when=/every=/target=):
//   when=prefill   one shot after each prompt (SnapKV, PyramidKV, KNorm, kvpress presses);
//   when=step      after the prompt and before every decode write once over budget (H2O, TOVA):
//                  evict-for-space, so a head never holds more than the budget after the prompt;
//   every=R,target=T  every R decode steps, down to T tokens (kvpress DecodingPress).
// once=1: only the first prompt is compressed (ratio= otherwise compounds: each multi-token
// prompt removes r of the cells present then). Positions (pos=original|in-cache|rerotate, §0.1): original leaves gaps; in-cache is the
// cache's PositionMode::kInCache (pre-RoPE keys rotated with slot positions); rerotate relabels
// the kept keys to 0..k−1 once per eviction (KvCache::Relabel) and sets pos_shift so the next
// token's position is k.
//
// Memory: an eviction policy stores no per-token state of its own; the cache's cell bookkeeping
// is 16 B/token (seq + pos, int64) plus 4 B/token per requested statistic (acc, obs). Worked
// example, 128 tokens × head_dim 64 at f16 kept out of 512: K+V = 2·128·64·2 = 32,768 B per
// head (vs 131,072 B full), cells 128·(16+4) = 2,560 B.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "kv/cache.h"
#include "kv/policy.h"

namespace kvc::kv {

struct Budget {
  int64_t tokens = -1;  // absolute (per layer and KV head); -1 = use ratio
  double ratio = -1;    // fraction removed; -1 = use tokens
  bool set() const { return tokens >= 0 || ratio >= 0; }
  // Tokens kept out of n.
  int64_t Kept(int64_t n) const;
};

enum class When { kPrefill, kStep, kEvery };

// Parameters every score-based policy accepts.
struct CommonParams {
  Budget budget;
  When when = When::kPrefill;
  int every = 0;           // kEvery: interval in decode steps
  int64_t target = -1;     // kEvery: tokens kept after each compression
  int64_t sink = 0;        // first cells always kept
  int64_t window = 0;      // last cells always kept
  PositionMode pos = PositionMode::kOriginal;
  bool pos_given = false;
  bool once = false;       // compress only the first prompt (context reuse: later questions
                           // are not compressed); default: every multi-token prompt
};

// Reads budget=/ratio=/compression_ratio=/when=/every=/target=/sink=/pos= (window is read by
// the policy itself since its default differs). INVALID_ARGUMENT with the spec named.
Status ParseCommon(const CodecSpec& spec, When default_when, CommonParams* p);

// Kept cell indices (ascending): see the algorithm above. scores [n]; higher = keep.
std::vector<int32_t> SelectKeep(const float* scores, int64_t n, int64_t k, int64_t sink,
                                int64_t window);

// Keeps `keep` in (layer, head) and restores the position invariant of the cache's mode
// (rerotate: relabel to 0..k−1 and shift so the next token sits at k).
Status ApplyKeep(KvCache& cache, int layer, int head, const std::vector<int32_t>& keep);

// 1 − Σ cells / (n_consumed · n_layer · n_head_kv): fraction of consumed tokens' cells removed.
double RemovedFraction(const KvCache& cache);

// Base of the score-based policies.
class ScoredPolicy : public EvictionPolicy {
 public:
  explicit ScoredPolicy(CommonParams p) : p_(std::move(p)) {}
  PositionMode position_mode() const override { return p_.pos; }
  Status BeforeWrite(KvCache& cache, int n_incoming) override;
  Status AfterPrefill(KvCache& cache, int n_prompt) override;
  Status AfterStep(KvCache& cache) override;
  // when=step keeps each head at its budget before every write (evict-for-space): with an absolute
  // budget B and chunks of at most B tokens a head never holds more than B cells (a larger chunk
  // fills up to the whole prompt until AfterPrefill); a ratio budget is fixed at the first prompt,
  // so a head never holds more than that prompt. Other modes: no bound (they hold the prompt, and
  // every generated token).
  int64_t MaxCells(int64_t n_prompt, int64_t n_total, int chunk) const override;
  const CommonParams& params() const { return p_; }
  std::vector<int64_t> SaveState() const override { return {fixed_budget_, steps_, prompts_}; }
  Status LoadState(const std::vector<int64_t>& state) override;

  // scores [n_cells] of (layer, head); higher = more important. Non-const: may cache.
  virtual void Score(KvCache& cache, int layer, int head, std::vector<float>* scores) = 0;
  // Keep target of `layer` for a head holding n cells, given the resolved per-head budget
  // (uniform by default; PyramidKV overrides).
  virtual int64_t LayerTarget(int layer, int64_t n, int64_t budget_tokens) const;
  // Compresses one layer so each head holds <= target cells (AdaKV overrides: cross-head).
  virtual Status CompressLayer(KvCache& cache, int layer, int64_t target);

 protected:
  // Compresses every layer to its target; `reserve` tokens are subtracted (evict-for-space).
  Status CompressAll(KvCache& cache, int64_t reserve, bool use_target);
  // Per-head budget resolved against the first prompt (ratio budgets in step mode).
  int64_t ResolvedBudget(int64_t n) const;

  CommonParams p_;
  int64_t fixed_budget_ = -1;  // step mode: tokens per head, fixed at the first prompt
  int64_t steps_ = 0;
  int64_t prompts_ = 0;
};

}  // namespace kvc::kv
