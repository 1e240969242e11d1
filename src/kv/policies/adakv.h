// Ada-KV head-adaptive budgets (Feng et al., "Ada-KV: Optimizing KV Cache Eviction by Adaptive
// Budget Allocation", NeurIPS 2025, Alg. 1; kvpress AdaKVPress). Spec:
// adakv:base=snapkv|pyramid|knorm|tova,alpha=0.2,<the base's parameters>.
//
// Algorithm: per layer, with b the base's per-head target and H KV heads, the layer keeps H·b
// tokens in total: each head first keeps its protected tokens (window/sinks) and its own top
// ceil(α·b) tokens (safeguard floor); the rest of the layer budget goes to the globally highest
// base scores across heads (ties: older token evicted first, then the higher head). Heads end up
// with different lengths; KvCache stores heads raggedly, so the evicted bytes are really freed
// (kvpress only masks). Scores must be comparable across heads (attention mass: SnapKV/Pyramid/
// TOVA; KNorm's −‖k‖ works but mixes head scales).
// Budget: the base's (absolute per-head mean, or ratio removed).
// Bytes: as the base, with the same layer total. Worked example, b = 128, 3 KV heads, f16, head_dim
// 64: 3·32,768 = 98,304 B per layer, split unevenly across heads.
#pragma once

#include <memory>

#include "kv/policy.h"

namespace kvc::kv {
StatusOr<std::unique_ptr<EvictionPolicy>> MakeAdaKvPolicy(const CodecSpec& spec, const KvShape& shape);
}  // namespace kvc::kv
