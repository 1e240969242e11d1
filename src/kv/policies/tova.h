// TOVA, Token Omission Via Attention (Oren et al., "Transformers are Multi-State RNNs", EMNLP 2024,
// §3.3; kvpress TOVAPress). Spec: tova:budget=B|ratio=r[,when=step|prefill].
//
// Algorithm: score_j = attention of the most recent query to key j (AttnStatsRequest.obs_window
// = 1), averaged over all query heads of the layer, so one decision is shared by every KV head
// of a layer. Once a layer holds more than B tokens, drop the lowest-scoring ones (ties: oldest
// first): after the prompt and before every decode write (evict-for-space). No protected window.
// Budget: B absolute tokens per layer (and KV head) or ratio = fraction of the first prompt
// removed. Default when=step.
// Bytes: the cache's cells + 4 B/token of last-query attention. Worked example, B = 128 at f16,
// head_dim 64: K+V 32,768 B + cells 2,560 B per (layer, KV head).
#pragma once

#include <memory>

#include "kv/policy.h"

namespace kvc::kv {
StatusOr<std::unique_ptr<EvictionPolicy>> MakeTovaPolicy(const CodecSpec& spec, const KvShape& shape);
}  // namespace kvc::kv
