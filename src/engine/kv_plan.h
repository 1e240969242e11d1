// The KV bytes a sequence will hold, per KV configuration, measured rather than computed from
// bits-per-value formulas. Engine admission and growth checks use it; the budget itself is checked
// against what the caches report (KvCache::Memory()).
//
// Measure: a probe KvCache of the configuration (no eviction policy) is written token block by
// token block with random Gaussian K/V [n, n_head_kv, head_dim] f32, each layer flushed after its
// write as Attend would (one query row attends at each measuring point, so policy statistics are
// allocated too), to n1 = 4·grow_tokens and n2 = 8·grow_tokens cells per head (at least
// past the sink segment and the codecs' fp16 windows); bytes(n) = base + per_step · ceil(n / step)
// with step = grow_tokens is fitted through the two points; below n1, where fp16 windows can hold
// more than the line, the bound also covers the bytes measured at every step up to the next. Storage grows in steps of grow_tokens
// tokens (packed blocks, fp16 windows of at most r + q tokens, cell bookkeeping), so the fit is an
// upper bound of Memory().TotalBytes() for a head set holding n cells at a step boundary, for
// every n >= 0 (tested for every registered codec, with decode and prefill-chunk growth:
// engine_unit_test.cc).
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

#include "kv/cache.h"
#include "kvcrunch/status.h"

namespace kvc::engine {

class KvPlan {
 public:
  // Errors from KvCache::Create for a bad configuration.
  // stats: what the sequence's eviction policy asks the attention kernel to gather (its per-cell
  // score arrays are part of the measured bytes).
  static StatusOr<std::unique_ptr<KvPlan>> Measure(const kv::KvShape& shape,
                                                   const kv::KvCacheConfig& cfg,
                                                   const kv::AttnStatsRequest& stats = {});
  // Upper bound of the bytes a cache of this configuration holds with n_cells cells per head.
  int64_t Bytes(int64_t n_cells) const;
  // Average bytes per token at large n (per_step / step): for capacity reports.
  double BytesPerToken() const { return double(per_step_) / double(step_); }
  int64_t base_bytes() const { return base_; }
  double k_bits_per_value() const { return k_bits_; }
  double v_bits_per_value() const { return v_bits_; }
  std::string describe() const { return describe_; }

 private:
  KvPlan() = default;
  int64_t base_ = 0, per_step_ = 0, step_ = 64;
  int64_t window_ = 0;             // largest fp16 window (r + q tokens) of the body codecs
  std::vector<int64_t> measured_;  // [n2 / step] bytes after each step of the probe
  double k_bits_ = 0, v_bits_ = 0;
  std::string describe_;
};

}  // namespace kvc::engine
