// PyramidKV (Cai et al., "PyramidKV: Dynamic KV Cache Compression based on Pyramidal Information
// Funneling", 2024, §3.3; layer schedule as in kvpress PyramidKVPress.get_layer_budget, itself
// from KVCache-Factory pyramidkv_utils.py). Spec: pyramid:budget=B|ratio=r,window=W,kernel=K,beta=20.
//
// Algorithm: SnapKV scoring per layer (snapkv.h) with a per-layer budget that falls linearly from
// the first to the last layer. With K the mean kept tokens per head (B, or floor(n·(1−r))),
// m = K − W, min = m/β, max = 2m − min (if max > n − W: max = n − W, min = 2m − max), layer l of
// L keeps round(max − l·(max − min)/(L − 1)) + W, so the mean over layers is K. Falls back to K
// for every layer when the schedule is infeasible (m <= 0, min < 0, L = 1). Note: kvpress
// measures K without the window (K_kvpress = W + n(1 − r)); we keep the mean at the stated budget
// for both budget forms.
// Bytes: as SnapKV, with per-layer kept counts; worked example B = 128, 30 layers, f16, head_dim
// 64: mean K+V 32,768 B per (layer, KV head).
#pragma once

#include <memory>

#include "kv/policies/snapkv.h"

namespace kvc::kv {
int64_t PyramidLayerBudget(int layer, int n_layer, int64_t n, int64_t mean_kept, int64_t window,
                           double beta);
StatusOr<std::unique_ptr<EvictionPolicy>> MakePyramidPolicy(const CodecSpec& spec,
                                                             const KvShape& shape);
}  // namespace kvc::kv
