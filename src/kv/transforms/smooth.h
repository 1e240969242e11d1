// smooth: static per-channel key smoothing, folded exactly into the query side.
//
// Papers: QServe (Lin et al., "QServe: W4A8KV4 Quantization and System Co-design for Efficient
// LLM Serving", arXiv 2405.04532, section "SmoothAttention": divide K by a per-channel λ, multiply
// Q by λ, folded into the K / Q projections; λ_c = max|K_c|^α with α = 0.5; RoPE-paired channels
// share λ so the scale commutes with RoPE — also spelled out by Ascend msModelSlim "KVSmooth"),
// and MiKV (Yang et al., "No Token Left Behind: Reliable KV Cache Compression via
// Importance-Aware Mixed Precision Quantization", 2024, its per-channel query/key "balancer" from
// max|Q_c| and max|K_c|). Both are summarised in ../shared/docs/ref-lowbit-eviction.md §2. The
// scale formula is SmoothQuant's (Xiao et al., ICML'23, §4: s_j = max|X_j|^α / max|W_j|^(1−α))
// with the keys in the role of the activations and the queries in the role of the weights.
//
// Map (per layer and KV head, keys only, post-RoPE or pre-RoPE alike):
//   store       y = D⁻¹ x          D = diag(s), s [head_dim] f32 > 0
//   FoldQuery   q' = D q           ⇒ <q', y> = <q, x> exactly (up to fp32 rounding)
//   Reconstruct x̂ = D ŷ
// With rot=1 a normalized Walsh–Hadamard rotation H (symmetric, orthogonal) follows the scaling:
// y = H D⁻¹ x, q' = H D q, x̂ = D H ŷ, so a codec's default rotation (q4_0 ... "rot=1") is kept
// when smoothing is put in front of it (kvcache.cc ApplyRotParam adds rot=1 here).
// Because s is equal on both channels of every RoPE pair, D commutes with RoPE's 2×2 rotations:
// the same scales are exact on keys stored before RoPE. This transform applies them per vector (d
// multiplies per key and per query row); `--kv-smooth FILE` (ModelLoadOptions::kv_smooth,
// model.h) folds the same scales into W_q / W_k at load time instead (QServe), with no per-token
// cost, using LoadSmoothScales below.
//
// Scales, from calibration statistics per channel c (RoPE pairs combined: a pair's amplitude is
// its norm / √2, so both channels carry the same number; an unrotated channel uses |x|):
//   a_K,c = max over calibration tokens (stat=max, default) or RMS (stat=rms) of the key amplitude
//   a_Q,c = the same over the GQA group's query heads
//   s_c   = a_K,c^α / a_Q,c^(1−α)   (α = 0.5 default: MiKV's balancer; α = 1 flattens the keys)
//   then s /= geometric_mean(s)     (overall scale is irrelevant to attention; keeps f16 in range)
// Amplitudes below 1e-6 × the head's largest are raised to that floor (no infinite scales).
//
// Calibration tensors (written by `kvcrunch calibrate --method smooth`, token 0 of each chunk
// left out — the attention sink's key is an outlier of its own, kept in fp16 by sinks=1):
//   smooth.kmax.{l}.{h}, smooth.krms.{l}.{h}, smooth.qmax.{l}.{h}, smooth.qrms.{l}.{h}  [head_dim]
// Spec: smooth:file=CALIB[,alpha=0.5][,stat=max|rms][,rot=0|1]. Keys only (kt=smooth:...).
// Bits per value: unchanged (no stored parameters per token; ParamBytes = 2·head_dim·4 B per head).
// Errors: missing file / tensors (NOT_FOUND naming the tensor and the command that makes it), a
// file for another shape (INVALID_ARGUMENT naming its model), NaN / Inf / negative statistics
// (INVALID_ARGUMENT naming tensor and channel), vt=smooth, alpha outside [0, 1].
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "kv/rope.h"
#include "kv/transform.h"

namespace kvc::kv {

// "smooth.{what}.{layer}.{head}", what = kmax | krms | qmax | qrms.
std::string SmoothTensorName(const char* what, int layer, int head);

// partner[c] = the other channel of c's RoPE pair, or c itself for an unrotated channel.
std::vector<int> RopePartners(const RopeParams& p, int head_dim);

// Per-channel amplitudes of one vector x [head_dim] with pairs combined (see above): out [head_dim].
void PairAmplitudes(const float* x, const std::vector<int>& partner, float* out);

// s [d] from amplitudes (a_k, a_q [d], ≥ 0, finite) and α; geometric mean 1.
std::vector<float> SmoothScales(const std::vector<float>& a_k, const std::vector<float>& a_q,
                                double alpha);

// The transform from explicit scales (tests; MakeSmoothTransform builds it from a file).
std::unique_ptr<Transform> MakeSmoothFromScales(std::vector<float> s, bool rot, std::string name);

// The scales s [head_dim] of one (layer, KV head) from a `kvcrunch calibrate --method smooth`
// file: the checks and errors listed above (another shape, missing / non-finite statistics, α
// outside [0, 1], unknown stat). Shared by the transform and the load-time fold (model.cc).
StatusOr<std::vector<float>> LoadSmoothScales(const std::string& path, double alpha,
                                              const std::string& stat, int n_layer, int n_head_kv,
                                              int head_dim, int layer, int head);

StatusOr<std::unique_ptr<Transform>> MakeSmoothTransform(const CodecSpec& spec,
                                                         const CodecContext& ctx);

}  // namespace kvc::kv
