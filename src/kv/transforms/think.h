// think: ThinK query-driven key-channel pruning (Xu et al., "ThinK: Thinner Key Cache by
// Query-Driven Pruning", ICLR'25, §3 eq. 5; spec §9).
//
// Algorithm. Per (layer, KV head) score every key channel c by the query-key interaction
//   score_c = ||Q[:, c]||₂ · ||K[:, c]||₂
// over post-RoPE calibration queries (all query heads of the GQA group, stacked) and keys, and keep
// the T = head_dim − round(ratio · head_dim) highest-scoring channels (ties: lower channel index).
// Scores come from calibration text (`kvcrunch calibrate`), not from each prompt's last 32 queries
// as in the paper: a Transform is fixed when the cache is built, so the selection is static per
// (layer, head) and costs nothing at run time (docs/lowrank.md discusses the difference).
//   store      y = x[idx]            (post-RoPE keys, idx = the kept channels, ascending)
//   scoring    <q, x̂> = <q[idx], y>  (FoldQuery selects the same channels: exact for the kept
//                                     channels; the pruned channels' contribution is dropped)
//   decode     x̂ = scatter(y) with zeros in pruned channels (Reconstruct)
// Keys only (pruning value channels would remove output dimensions): vt=think is refused.
// Re-rotation (pos=rerotate) of a pruned key is lossy where a RoPE pair is split.
//
// Spec: think:file=CALIB[,ratio=R][,multiple=M]; ratio = fraction of channels *pruned*
// (paper's λ; default 0.4); kept count rounded up to a multiple of M (default 1; 32 for q8_0/q4_0).
// Bits per value: codec bits · T / head_dim (f16, ratio 0.4 → T = 38 of 64: 9.5 bits/value).
// Worked size example, 128 tokens x head_dim 64, ratio 0.4, f16: 128 · 38 · 2 B = 9,728 B per head
// (vs 16,384 B), plus the index list (38 · 4 B) per (layer, head).
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "kv/transform.h"

namespace kvc::kv {

// Calibration tensors (sums of squares over calibration tokens, post-RoPE):
//   think.q2.{l}.{h} [head_dim]  Σ over the group's query heads and tokens of q_c²
//   think.k2.{l}.{h} [head_dim]  Σ over tokens of k_c²
std::string ThinkTensorName(const char* what, int layer, int head);

// Kept channel indices (ascending) from per-channel sums of squares.
std::vector<int> ThinkSelect(const std::vector<float>& q2, const std::vector<float>& k2, int keep);

std::unique_ptr<Transform> MakeChannelSelect(std::vector<int> idx, int dim, std::string name);

StatusOr<std::unique_ptr<Transform>> MakeThinkTransform(const CodecSpec& spec,
                                                        const CodecContext& ctx);

}  // namespace kvc::kv
