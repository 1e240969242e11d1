// The Codec plug-in: how one stream (the keys, or the values, of one layer and one KV head) is
// packed. Chosen separately for K and V (-ctk / -ctv), one instance per (layer, head, K|V), so a
// codec may hold per-head parameters (rotation seed, calibrated thresholds, scales).
//
// A codec encodes *blocks* of `block_tokens()` consecutive tokens (1 for per-token formats such as
// q8_0; a group of tokens for per-channel formats such as KIVI keys). Tokens that are not yet
// encoded wait in the stream's fp16 tail (the "residual window"); the flush rule is generic and
// lives in the store (see FlushCount), parameterised by the codec:
//   - residual_tokens(): R, tokens the tail keeps after a flush (KIVI values: R; others: 0)
//   - flush_quantum():   Q, a multiple of block_tokens(); a flush encodes the largest multiple of Q
//                        available beyond R (KIVI keys: Q = R; per-token codecs: Q = 1).
// So a stream holds [packed blocks][tail], and every token is in exactly one of them, in order.
//
// Nothing special-cases "uncompressed": f32/f16/bf16 are codecs like the others.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "kvcrunch/status.h"

namespace kvc::kv {

class Rope;

enum class KvKind { kKey, kValue };
inline const char* KvKindName(KvKind k) { return k == KvKind::kKey ? "K" : "V"; }

// Parsed "name:key=value,key=value" spec (e.g. "kivi:bits=2,group=32,residual=128").
struct CodecSpec {
  std::string name;
  std::map<std::string, std::string> params;
  std::string ToString() const;
  // Typed access; INVALID_ARGUMENT naming the key when malformed. Marks the key as used.
  StatusOr<int> GetInt(const std::string& key, int dflt) const;
  StatusOr<double> GetDouble(const std::string& key, double dflt) const;
  StatusOr<bool> GetBool(const std::string& key, bool dflt) const;
  StatusOr<std::string> GetString(const std::string& key, const std::string& dflt) const;
  // INVALID_ARGUMENT listing keys that no Get* call asked for (catches typos like "bitz=2").
  Status CheckAllUsed() const;
  mutable std::map<std::string, bool> used_;
};
StatusOr<CodecSpec> ParseSpec(const std::string& text);

// Per-layer calibration a codec may need (KVQuant thresholds/codebooks, fp8 scales...). Opaque
// to the store; owned by the cache config. Keys are codec-defined names.
struct CalibrationData {
  std::map<std::string, std::vector<float>> tensors;
  std::string source;  // where it came from (text file, tokens), for reports
};

// What an instance is built for.
struct CodecContext {
  int layer = 0;
  int n_layer = 1;
  int head = 0;          // KV head index
  int n_head_kv = 1;
  KvKind kind = KvKind::kKey;
  int dim = 64;          // stored vector length (head_dim, or a latent rank after a transform)
  uint64_t seed = 0;     // deterministic per (layer, head, kind); for random rotations/sketches
  const CalibrationData* calib = nullptr;  // may be null
};

class Codec {
 public:
  virtual ~Codec() = default;

  virtual std::string Name() const = 0;        // canonical spec string, e.g. "q8_0" or "kivi:bits=2,..."
  virtual int dim() const = 0;                 // values per token
  virtual int block_tokens() const { return 1; }
  virtual int residual_tokens() const { return 0; }
  virtual int flush_quantum() const { return block_tokens(); }
  virtual size_t BlockBytes() const = 0;       // bytes of one encoded block (block_tokens x dim values)
  // Bits per value including every scale / zero point / norm stored in the block (not the tail).
  double BitsPerValue() const { return 8.0 * BlockBytes() / (double(block_tokens()) * dim()); }
  // True if keys must be stored before RoPE (RoPE then applied when attending; KVQuant).
  virtual bool wants_pre_rope_keys() const { return false; }

  // x [block_tokens, dim] f32 -> block [BlockBytes()]. Must not produce NaN/inf in the block for
  // finite input; non-finite input is rejected earlier by the store.
  virtual void Encode(const float* x, uint8_t* block) = 0;
  // block -> x [block_tokens, dim] f32.
  virtual void Decode(const uint8_t* block, float* x) const = 0;
  // blocks [n_blocks, BlockBytes()] -> x [n_blocks · block_tokens, dim] f32. Default: Decode per
  // block; formats whose blocks are plain arrays (f16) convert them in one call.
  virtual void DecodeBlocks(const uint8_t* blocks, int64_t n_blocks, float* x) const;

  // Fused scoring on packed data. scores [n_q, block_tokens] = q' · decode(block)ᵀ, where
  // q' = PrepareQuery(q) [n_q, PreparedQueryDim()]. The default decodes then dots; codecs that
  // can score without decoding (QJL, TurboQuant, q8_0) override both.
  virtual int PreparedQueryDim() const { return dim(); }
  virtual void PrepareQuery(const float* q, int n_q, float* q_prepared) const;
  virtual void Score(const float* q_prepared, int n_q, const uint8_t* block, float* scores) const;
  // out [n_q, dim] += p [n_q, block_tokens] · decode(block). Default decodes then accumulates.
  virtual void AccumulateWeighted(const float* p, int n_q, const uint8_t* block, float* out) const;

  // Many consecutive blocks at once (what attention calls; one virtual call per segment):
  // scores[r * ld + b * block_tokens + t] for b in [0, n_blocks); blocks [n_blocks, BlockBytes()].
  // Default: Score per block. Per-token formats override for a tight loop.
  virtual void ScoreBlocks(const float* q_prepared, int n_q, const uint8_t* blocks,
                           int64_t n_blocks, float* scores, int64_t ld) const;
  // out [n_q, dim] += Σ_b p[r * ld + b * block_tokens + t] · decode(block b).
  virtual void AccumulateBlocks(const float* p, int64_t ld, int n_q, const uint8_t* blocks,
                                int64_t n_blocks, float* out) const;

  // Pre-RoPE keys (wants_pre_rope_keys) scored on packed blocks with RoPE applied on the fly:
  // out[r * ld + j] = <q[r], R(pos[j]) decode(blocks)_j> for j < n_blocks · block_tokens, q
  // [n_q, dim] post-RoPE query rows (not prepared), pos [n_blocks · block_tokens] RoPE positions.
  // Returns false when the codec does not offer it for this rope (the cache then decodes,
  // rotates and dots in chunks). Tests check it against that path.
  virtual bool ScoreRopeBlocks(const float* q, int n_q, const uint8_t* blocks, int64_t n_blocks,
                               const Rope& rope, const int64_t* pos, float* out, int64_t ld) const {
    return false;
  }
};

using CodecFactory = std::function<StatusOr<std::unique_ptr<Codec>>(const CodecSpec&, const CodecContext&)>;

struct CodecInfo {
  std::string name;                 // registry id
  std::string summary;              // one line for `kvcrunch info` and docs
  std::vector<std::string> aliases_for;  // unused for plain entries
  CodecFactory factory;
  bool in_default_eval = true;      // part of `kvcrunch eval`'s default list
};

// The registry: every codec is one row in codec_registry.cc. Aliases map a short name to a full
// spec ("kivi2" -> "kivi:bits=2,group=32,residual=128").
const std::vector<CodecInfo>& RegisteredCodecs();
const std::map<std::string, std::string>& CodecAliases();
// Expands aliases, parses, builds. INVALID_ARGUMENT for unknown names (listing the known ones)
// or bad parameters; UNIMPLEMENTED if the codec cannot serve this context (e.g. dim % 32 != 0).
StatusOr<std::unique_ptr<Codec>> MakeCodec(const std::string& spec, const CodecContext& ctx);
// Alias expansion only ("q4_0" -> "q4_0:rot=1"); unknown names come back unchanged.
std::string ExpandAlias(const std::string& spec);

}  // namespace kvc::kv
