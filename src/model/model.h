// Llama-family model loaded from GGUF: llama, mistral, qwen2 (q/k/v bias), smollm (llama arch).
// Forward pass: RMSNorm (Zhang & Sennrich 2019), RoPE (owned by the KV cache, kv/rope.h),
// grouped-query attention (Ainslie et al. 2023) through the KV cache, SwiGLU FFN (Shazeer 2020),
// tied or separate output projection.
#pragma once

#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "cpu/ops.h"
#include "gguf/gguf.h"
#include "kv/cache.h"
#include "kv/policy.h"
#include "kvcrunch/status.h"
#include "model/forward.h"
#include "model/mla.h"
#include "tokenizer/tokenizer.h"

namespace kvc {

struct ModelConfig {
  std::string arch;        // general.architecture
  std::string name;        // general.name
  int n_layer = 0;
  int n_embd = 0;
  int n_head = 0;
  int n_head_kv = 0;
  int head_dim = 0;        // K dim per KV head (deepseek2: kv_lora_rank + rope dims, 1 latent head)
  int head_dim_v = 0;      // V dim per KV head (0: head_dim)
  float attn_scale = 0;    // softmax scale (0: 1/sqrt(head_dim))
  int n_ff = 0;
  int n_vocab = 0;
  int64_t n_ctx_train = 0;
  float rms_eps = 1e-5f;
  kv::RopeParams rope;
  bool qkv_bias = false;
  bool tied_output = false;
  // KV bytes per token for a codec's bits/value: n_layer · n_head_kv · (head_dim · k_bits +
  // DimV · v_bits) / 8 (= 2 · n_layer · n_head_kv · head_dim · bits / 8 when K and V match).
  double KvBytesPerToken(double k_bits, double v_bits) const;
};

// Load-time options.
struct ModelLoadOptions {
  // Static key smoothing folded into the projections (QServe "SmoothAttention", arXiv 2405.04532;
  // MiKV's query/key balancer): a `kvcrunch calibrate --method smooth` file ("" = none). Per
  // layer and KV head the scales s (kv/transforms/smooth.h: equal on both channels of every RoPE
  // pair, so they commute with RoPE) divide W_k's rows (and bk) and multiply the rows of W_q (and
  // bq) of that head's query group: q'·k' = q·k exactly in real arithmetic, nothing per token, and
  // any K codec then sees the smoothed keys. Rounding: cpu::PrepareWeightScaledRows (Q4_1: each
  // 32-block's fp16 scale and min rounded once, relative 2^-11). Same statistics, α and stat as
  // the cache transform kt=smooth:file=F,alpha=A,stat=S.
  std::string kv_smooth;
  double kv_smooth_alpha = 0.5;
  std::string kv_smooth_stat = "max";  // max | rms
};

class Model {
 public:
  // NOT_FOUND / DATA_LOSS from the reader; UNIMPLEMENTED for an unknown architecture;
  // NOT_FOUND naming a missing tensor; INVALID_ARGUMENT for a tensor of the wrong shape.
  // With opt.kv_smooth: the smooth file's errors (another model's shape: INVALID_ARGUMENT),
  // UNIMPLEMENTED for MLA models and for weight types the fold does not handle.
  static StatusOr<std::unique_ptr<Model>> Load(const std::string& path);
  static StatusOr<std::unique_ptr<Model>> Load(const std::string& path, const ModelLoadOptions& opt);
  // "" or e.g. "smooth:file=F,alpha=0.5,stat=max,xxh=<file checksum>" (part of the stored-KV
  // fingerprint: folded keys differ from plain ones).
  const std::string& kv_smooth_desc() const { return kv_smooth_desc_; }
  // "arch=… name=… n_layer=… … w0=<FNV-1a of blk.0's raw K projection bytes>": the model_id that
  // calibration files record (tools/cli/lib/calibrate.h ModelIdentity) and that --kv-smooth checks.
  std::string Identity() const;
  const ModelConfig& config() const { return cfg_; }
  const Tokenizer& tokenizer() const { return *tokenizer_; }
  const gguf::GgufFile& file() const { return *file_; }
  kv::KvShape kv_shape() const;
  size_t weight_bytes() const;  // bytes of prepared weights (repacked copies + mapped tensors)
  // XXH3-128 of every byte of the GGUF file as 32 hex digits; computed once (~30 ms per 100 MB),
  // thread-safe. The stored-KV formats put it in their model fingerprint (src/store/kv_format.h).
  const std::string& file_checksum() const;

  struct Layer {
    std::vector<float> attn_norm, ffn_norm;           // [n_embd]
    std::unique_ptr<cpu::Weight> wq, wk, wv, wo;      // [n_head*hd, n_embd], ...
    std::vector<float> bq, bk, bv;                    // qwen2 biases (empty otherwise)
    std::unique_ptr<cpu::Weight> w_gate, w_up, w_down;
  };
  const std::vector<Layer>& layers() const { return layers_; }
  const cpu::Weight& output() const { return *output_; }
  const std::vector<float>& output_norm() const { return output_norm_; }
  const gguf::TensorInfo& token_embd() const { return *token_embd_; }
  // deepseek2: multi-head latent attention weights (Layer::wq..wo are null then); else null.
  const MlaWeights* mla() const { return mla_.get(); }

 private:
  Model() = default;
  mutable std::once_flag checksum_once_;
  mutable std::string file_checksum_;
  ModelConfig cfg_;
  std::string kv_smooth_desc_;
  std::unique_ptr<gguf::GgufFile> file_;
  std::unique_ptr<Tokenizer> tokenizer_;
  const gguf::TensorInfo* token_embd_ = nullptr;
  std::vector<Layer> layers_;
  std::vector<float> output_norm_;
  std::unique_ptr<cpu::Weight> output_;
  std::unique_ptr<MlaWeights> mla_;
};

// One sequence being evaluated: the model, its KV cache and an optional eviction policy.
class Session {
 public:
  struct Options {
    int64_t n_ctx = 2048;   // tokens the sequence may hold without eviction
    int n_batch = 512;      // micro-batch (ubatch) size for prompt processing
  };
  // The cache config's position mode is overridden by the policy's when a policy is given.
  static StatusOr<std::unique_ptr<Session>> Create(const Model& model, kv::KvCacheConfig cache_cfg,
                                                   const std::string& evict_spec, Options opt);

  // Feeds tokens (ids in [0, n_vocab)) after those already consumed. logits: if non-null,
  // resized to [n_out, n_vocab] f32 where n_out = tokens.size() if all_logits else 1 (last).
  // Errors: INVALID_ARGUMENT (empty, bad id, non-finite activations), OUT_OF_RANGE (context full
  // without an eviction policy).
  Status Eval(const std::vector<int32_t>& tokens, bool all_logits, std::vector<float>* logits);
  void Reset();
  int64_t n_past() const { return n_past_; }
  kv::KvCache& cache() { return *cache_; }
  const kv::KvCache& cache() const { return *cache_; }
  const kv::EvictionPolicy* policy() const { return policy_.get(); }
  const Model& model() const { return model_; }
  const Options& options() const { return opt_; }
  // For restore (src/store/session_file.h): the policy whose state is reloaded, and the token
  // count after the cache was rebuilt.
  kv::EvictionPolicy* mutable_policy() { return policy_.get(); }
  void set_n_past(int64_t n) { n_past_ = n; }

 private:
  Session(const Model& m) : model_(m) {}
  Status Forward(const int32_t* tokens, int n, bool all_logits, float* logits);
  const Model& model_;
  Options opt_;
  std::unique_ptr<kv::KvCache> cache_;
  std::unique_ptr<kv::EvictionPolicy> policy_;
  int64_t n_past_ = 0;
  ForwardScratch scratch_;  // activations of the last batch
};

}  // namespace kvc
