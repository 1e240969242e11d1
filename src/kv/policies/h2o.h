// H2O, Heavy-Hitter Oracle (Zhang et al., NeurIPS 2023, Alg. 1; FMInference/H2O real-drop code).
// Spec: h2o:heavy=H,recent=R[,when=step|prefill][,pos=M].
//
// Algorithm: score of a cached token = attention it has received, accumulated over every query
// (prompt rows and decode steps), mean over the query heads of its GQA group
// (AttnStatsRequest.accumulate; src/kv/attention.cc). Keep the R most recent tokens plus the H
// highest-scoring others; evict (ties: oldest first) once the cache exceeds H + R, before each
// decode write (evict-for-space; equals the paper's evict-after-attention since the new token is
// always in the recent set).
// Budget: H and R are fractions of the first prompt's length when < 1 (paper's "20% budget" =
// heavy=0.1,recent=0.1), absolute tokens when >= 1. Default when=step.
// Bytes: the cache's cells + 4 B/token of accumulated score. Worked example, 128 kept tokens ×
// head_dim 64 at f16: K+V 32,768 B + cells 128·20 = 2,560 B per (layer, KV head).
#pragma once

#include <memory>

#include "kv/policy.h"

namespace kvc::kv {
StatusOr<std::unique_ptr<EvictionPolicy>> MakeH2oPolicy(const CodecSpec& spec, const KvShape& shape);
}  // namespace kvc::kv
