// KNorm (Devoto et al., "A Simple and Effective L2 Norm-Based Strategy for KV Cache Compression",
// EMNLP 2024, §3; kvpress KnormPress). Spec: knorm:ratio=r|budget=B[,window=W,sink=S].
//
// Algorithm: score_j = −‖k_j‖₂ per (layer, KV head) on the keys as attention sees them
// (KvCache::DecodeKeys, so a quantized K codec is scored on its decoded keys; RoPE preserves
// norms). Keep the lowest-norm keys. No attention statistics (works with any kernel).
// Runs after each prompt (when=prefill). Unlike the original repo we do not skip layers 0/1
// (kvpress does not either).
// Budget: ratio = fraction removed (kvpress) or B absolute tokens per head.
// Bytes: the cache's cells only. Worked example, ratio 0.5 on 256 tokens, f16, head_dim 64:
// K+V 32,768 B per (layer, KV head).
#pragma once

#include <memory>

#include "kv/policy.h"

namespace kvc::kv {
StatusOr<std::unique_ptr<EvictionPolicy>> MakeKnormPolicy(const CodecSpec& spec, const KvShape& shape);
}  // namespace kvc::kv
