// Multi-head latent attention (DeepSeek-V2, Liu et al. 2024, §2.1; spec-eviction-lowrank-eval.md §8)
// for the GGUF `deepseek2` architecture (llama.cpp naming), with a latent-only KV cache.
//
// Per layer, token hidden state h [n_embd] (after attn_norm):
//   q        = W_q h                  or  W_q_b RMSNorm(W_q_a h)         [n_head, qk_nope + qk_rope]
//   [c ; kr] = W_kv_a_mqa h                                              [kv_lora_rank + qk_rope]
//   c_kv     = RMSNorm(c) · attn_kv_a_norm                               [kv_lora_rank]
//   W_kv_b   : kv_lora_rank -> n_head · (qk_nope + v_head_dim); per head i its first qk_nope rows
//              are W_UK,i [qk_nope, kv_lora_rank], the next v_head_dim rows W_UV,i [v, kv_lora_rank].
// Naive attention (reference): k_i = [W_UK,i c_kv ; RoPE(kr)], v_i = W_UV,i c_kv, standard softmax
// attention with scale 1/sqrt(qk_nope + qk_rope), o = W_O [o_1 .. o_n_head].
// Absorbed attention (what runs): q_i^abs = [W_UK,iᵀ q_nope,i ; q_rope,i]  (kv_lora_rank + qk_rope),
// scores q_i^abs · [c_kv ; RoPE(kr)], then o_i = W_UV,i (Σ_j p_ij c_kv,j). Identical in exact
// arithmetic; this is MQA with one shared latent "KV head" and n_head query heads.
//
// Cache (through the generic KvCache seam): n_head_kv = 1, K = [c_kv ; kr] (head_dim =
// kv_lora_rank + qk_rope, RoPE on dims [kv_lora_rank, +qk_rope) only: RopeParams.rot_offset),
// V = c_kv (head_dim_v = kv_lora_rank). V duplicates the first kv_lora_rank dims of K: the seam has
// no "V = prefix of K" option, so a V stream is stored (reported separately in Memory()).
// Latent bytes per token (K only) = (kv_lora_rank + qk_rope) · bytes · n_layer; with the V copy,
// + kv_lora_rank · bytes · n_layer.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "cpu/ops.h"
#include "gguf/gguf.h"
#include "kv/cache.h"
#include "kvcrunch/status.h"

namespace kvc {

struct MlaConfig {
  int n_head = 0;
  int n_embd = 0;
  int kv_lora_rank = 0;  // d_c
  int q_lora_rank = 0;   // d_c' (0: plain W_q)
  int qk_nope = 0;       // d_h (no-RoPE part of a query/key head)
  int qk_rope = 0;       // d_h^R (decoupled RoPE part; rope.dimension_count)
  int v_head_dim = 0;
  float rms_eps = 1e-6f;
  bool split_kv_b = false;  // attn_k_b/attn_v_b tensors (attention.key_length_mla) not attn_kv_b
  int KeyLength() const { return qk_nope + qk_rope; }
  int LatentDim() const { return kv_lora_rank + qk_rope; }  // cached K dim per token and layer
  float Scale() const;                                       // 1/sqrt(qk_nope + qk_rope)
};

struct MlaLayer {
  std::unique_ptr<cpu::Weight> wq;             // [n_embd -> n_head*(qk_nope+qk_rope)] (no q lora)
  std::unique_ptr<cpu::Weight> wq_a, wq_b;     // [n_embd -> q_lora_rank], [q_lora_rank -> ...]
  std::vector<float> q_a_norm;                 // [q_lora_rank]
  std::unique_ptr<cpu::Weight> wkv_a;          // [n_embd -> kv_lora_rank + qk_rope]
  std::vector<float> kv_a_norm;                // [kv_lora_rank]
  std::vector<float> wkv_b;                    // [n_head*(qk_nope+v_head_dim), kv_lora_rank] f32
                                               // (built from attn_k_b/attn_v_b if split)
  std::unique_ptr<cpu::Weight> wo;             // [n_head*v_head_dim -> n_embd]
  size_t bytes() const;
};

struct MlaWeights {
  MlaConfig cfg;
  std::vector<MlaLayer> layers;
  size_t bytes() const;
};

// Reads deepseek2 MLA hyper-parameters (prefix "deepseek2."). n_head / n_embd / rms_eps come from
// the caller. Both layouts: attn_kv_b.weight, or attn_k_b/attn_v_b with attention.key_length_mla /
// value_length_mla (key_length/value_length are then the latent's MQA sizes). UNIMPLEMENTED for
// YaRN or other rope scaling and MoE (expert_count > 0 with MoE layers present);
// INVALID_ARGUMENT for inconsistent sizes.
StatusOr<MlaConfig> LoadMlaConfig(const gguf::GgufFile& f, int n_layer, int n_embd, int n_head,
                                  float rms_eps);
// Loads blk.<layer>.attn_* MLA tensors; NOT_FOUND / INVALID_ARGUMENT naming the tensor;
// UNIMPLEMENTED if the layer has MoE tensors (ffn_gate_inp / ffn_*_exps / ffn_*_shexp).
StatusOr<MlaLayer> LoadMlaLayer(const gguf::GgufFile& f, const MlaConfig& c, int layer);

// Lines for `kvcrunch info`: latent bytes per token (K = latent + rope), the V copy, and the
// equivalent multi-head attention cache (n_head · (key_length + value_length) per layer), at
// `bytes` per value.
std::string DescribeMlaKv(const MlaConfig& c, int n_layer, double bytes);

// KV shape of the latent cache (see the header comment). theta from rope.freq_base.
kv::KvShape MlaKvShape(const MlaConfig& c, int n_layer, double rope_theta);

// Absorbed MLA attention of one layer through the cache: h [n, n_embd] (normed hidden states),
// seq [n] token seq numbers; writes the latent of the n tokens, attends, out [n, n_embd]
// (after W_O). Errors from KvCache::Write (non-finite activations).
Status MlaAttention(const MlaWeights& w, int layer, kv::KvCache& cache, const float* h,
                    const int64_t* seq, int n, float* out);

// Reference: the same layer computed the naive way (decompressed per-head K/V, standard attention)
// from the given latents. lat [n_ctx, LatentDim()] pre-RoPE latents of tokens at positions
// pos [n_ctx]; q [n_q, n_head, KeyLength()] pre-RoPE queries at q_pos [n_q] attending to the keys
// with pos <= q_pos; out [n_q, n_head*v_head_dim] (before W_O). For tests.
void MlaNaiveAttention(const MlaConfig& c, const MlaLayer& L, const kv::RopeParams& rope,
                       const float* lat, const int64_t* pos, int n_ctx, const float* q,
                       const int64_t* q_pos, int n_q, float* out);
// Query and latent projections used by both paths: q [n, n_head, KeyLength()],
// lat [n, LatentDim()] = [RMSNorm(c) ; kr] (pre-RoPE).
void MlaProject(const MlaConfig& c, const MlaLayer& L, const float* h, int n, float* q, float* lat);

}  // namespace kvc
