// StreamingLLM (Xiao et al., "Efficient Streaming Language Models with Attention Sinks", ICLR 2024,
// §3.2; mit-han-lab/streaming-llm `StartRecentKVCache`). Spec: streaming:sink=S,window=W[,pos=M].
//
// Algorithm: keep the first S tokens (attention sinks) and the W most recent tokens; before n
// tokens are written, evict the oldest non-sink tokens so S + W is never exceeded
// (evict_for_space); middle tokens are gone for good. Positions default to in-cache (§3.2: keys
// cached before RoPE, rotated with slot positions 0..n−1; the query sits at the cache length);
// pos=original keeps gaps (extrapolates past the trained context), pos=rerotate relabels once.
// Budget: absolute only (S + W tokens per layer and KV head). A prompt longer than S + W is
// processed in micro-batches; each batch evicts for space first, so only a batch larger than W
// overflows transiently (trimmed right after it).
// Bytes: no state beyond the cache's cells (16 B/token). Worked example, head_dim 64, f16, S + W =
// 128: K+V = 2·128·64·2 = 32,768 B per (layer, KV head) at any stream length.
#pragma once

#include <memory>

#include "kv/policy.h"

namespace kvc::kv {
StatusOr<std::unique_ptr<EvictionPolicy>> MakeStreamingPolicy(const CodecSpec& spec,
                                                               const KvShape& shape);
}  // namespace kvc::kv
