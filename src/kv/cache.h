// KvCache: the one owner of a sequence's K/V memory (DESIGN.md "The KV cache seam").
//
// Structure, per layer and per KV head (so per-head lengths may differ: ragged storage):
//   cells      : bookkeeping per cached token, in temporal order: seq (index of the token in the
//                stream of consumed tokens; the causal clock), pos (its RoPE position; equals seq
//                unless positions were re-labelled), and attention statistics when requested.
//   segments   : 1..2 segments (an optional "sink" segment holding the first `sink_tokens` tokens
//                with its own codecs, then the body). Each segment holds a K stream and a V stream;
//                a stream is [packed blocks][fp16 tail] with the codec's flush rule (codec.h).
//   transforms : optional per-stream linear map (rotation, low-rank latent) before the codec.
// RoPE is owned here: callers pass *pre-RoPE* q and k with token seq numbers; the cache rotates
// them according to the position mode (original positions with gaps, in-cache positions, or
// re-rotated-once positions) and whether keys are stored before or after RoPE.
//
// Attention (Attend) reads only from the cache: every query attends to the cells whose seq is
// <= its own seq, through the configured codecs (packed scoring where the codec offers it).
// Exactness across segments/blocks/tail: all scores of a row are computed into one buffer and
// normalised once (equivalent to the log-sum-exp merge of per-segment partial softmaxes).
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <unordered_map>
#include <vector>

#include "kv/codec.h"
#include "kv/rope.h"
#include "kv/transform.h"
#include "kvcrunch/status.h"

namespace kvc::kv {

struct KvShape {
  int n_layer = 0;
  int n_head = 0;       // query heads
  int n_head_kv = 0;    // KV heads (GQA group size = n_head / n_head_kv)
  int head_dim = 0;     // K dim per head (MLA: kv_lora_rank + rope dims)
  int head_dim_v = 0;   // V dim per head (0: same as head_dim)
  float attn_scale = 0; // softmax scale; 0: 1/sqrt(head_dim)
  RopeParams rope;
  int DimV() const { return head_dim_v > 0 ? head_dim_v : head_dim; }
};

enum class PositionMode {
  kOriginal,      // RoPE position = token index; eviction leaves gaps (default)
  kInCache,       // RoPE position = slot index in the cache (StreamingLLM §3.2); keys stored pre-RoPE
  kRerotateOnce,  // after an eviction, kept keys are re-rotated to contiguous positions once
};
const char* PositionModeName(PositionMode m);
StatusOr<PositionMode> ParsePositionMode(const std::string& s);

struct KvCacheConfig {
  std::string k_codec = "f16";             // spec strings (codec.h); aliases allowed
  std::string v_codec = "f16";
  std::vector<std::string> k_codec_layer;  // optional per-layer override ("" = default), [n_layer]
  std::vector<std::string> v_codec_layer;
  std::string k_transform;                 // "" = none; e.g. "hadamard", "lowrank:..."
  std::string v_transform;
  int sink_tokens = 0;                     // first tokens kept in their own segment ...
  std::string sink_codec = "f16";          // ... with this codec (K and V)
  // Demotion (MiKV, "No Token Left Behind", arXiv 2402.18096 §3): "" = off. When set, cells an
  // eviction policy drops through Keep() are re-encoded with these codecs into the head's demoted
  // tier instead of being deleted; attention still covers them. K and V given separately (config
  // keys demote=, demote_k=, demote_v=). Needs position_mode original.
  std::string demote_k_codec;
  std::string demote_v_codec;
  // Activation-found sinks (KVSink, arXiv 2508.04257): 0 = off. Otherwise a token whose value
  // norm (all KV heads) is below the layer's median / sink_detect in 3 consecutive layers >=
  // sink_detect_layer is written to the pinned tier of that and every later layer at sink_codec
  // precision and is never evicted or demoted. See DetectSinks (cache.cc) for the rule and its
  // evidence. Also public: sink_seqs() lists the tokens found.
  float sink_detect = 0;
  int sink_detect_layer = 2;
  PositionMode position_mode = PositionMode::kOriginal;
  // true: position_mode was given explicitly (--kv-positions / pos=) and wins over the eviction
  // policy's default (StreamingLLM: in-cache), even when it is kOriginal.
  bool position_mode_set = false;
  const CalibrationData* calib = nullptr;  // shared by all codec/transform instances; may be null
  uint64_t seed = 0x6b76637275ull;
  int grow_tokens = 64;                    // storage grows in steps of this many tokens
  // Predictive coding (AQUA-KV, kv/predictive.h): path of a `calibrate --method predict` file;
  // "" = off. Each layer's K and V are stored as residuals against linear predictions from the
  // previous layer's reconstructed KV (and V from the same layer's keys); keys are kept pre-RoPE.
  // Needs per-token body codecs without an fp16 window, no transforms, no centring, original
  // positions, and no eviction (Keep / Relabel answer FAILED_PRECONDITION): cells stay aligned
  // across layers. Attention reconstructs every cell of a layer per call (one [n, D] GEMM per
  // predictor): exact, but decode costs O(n · D²) per layer instead of O(n · D).
  std::string predict;
  // Positions the RoPE cos/sin table covers when keys are stored before RoPE (or centred after
  // it): max(8192, this), at most 262,144 (256 bytes per position at head_dim 64). Positions past
  // the table are rotated with cos / sin computed per key and step (slow). Session sets n_ctx.
  int64_t rope_table_positions = 0;
};

// Statistics the attention kernel gathers for eviction policies (opt-in; zero cost when off).
struct AttnStatsRequest {
  bool accumulate = false;  // cells.acc += attention prob, mean over the GQA group's query heads
  int obs_window = 0;       // cells.obs = Σ over the last obs_window query rows of one Attend
                            // call (mean over the group's heads); recomputed per call
};

// Bytes as allocated (vector capacities), not formulas.
struct MemoryReport {
  struct Layer {
    size_t k_packed = 0, v_packed = 0;  // encoded blocks
    size_t k_tail = 0, v_tail = 0;      // fp16 residual windows
    size_t cells = 0;                   // bookkeeping
    size_t transform = 0;               // projection parameters
    int64_t n_cells = 0;                // Σ over heads
    // Side tiers (demoted / pinned cells) are included in the byte fields above; their cells are
    // counted here and not in n_cells (n_cells stays what policies see).
    int64_t n_side_cells = 0;
  };
  std::vector<Layer> layers;
  // Working buffers a cache keeps between calls, outside the KV bytes: the predictive cache's
  // reconstruction of the last two layers ([n, D_k + D_v] f32 each; freed after the last layer's
  // Attend). 0 for every other configuration.
  size_t scratch = 0;
  size_t KvBytes() const;       // packed + tail, all layers (what K/V values occupy)
  size_t TotalBytes() const;    // everything
  size_t PackedBytes() const;
  size_t TailBytes() const;
  int64_t Cells() const;
  int64_t SideCells() const;
};

// Optional observer of the raw vectors the cache receives (calibration tools: Palu bases, ThinK
// channel scores). Called synchronously; zero cost when none is set.
class KvObserver {
 public:
  virtual ~KvObserver() = default;
  // Same arguments as KvCache::Write after validation: k pre-RoPE [n, n_head_kv, head_dim],
  // v [n, n_head_kv, DimV()].
  virtual void OnWrite(int layer, const int64_t* seq, int n, const float* k, const float* v) {}
  // Same arguments as KvCache::Attend: q pre-RoPE [n_q, n_head, head_dim].
  virtual void OnQuery(int layer, const int64_t* q_seq, int n_q, const float* q) {}
};

class KvCache {
 public:
  // Builds every codec/transform instance now; incompatible choices are an error here, never
  // mid-decode (INVALID_ARGUMENT / UNIMPLEMENTED with a message naming layer, K/V and codec).
  static StatusOr<std::unique_ptr<KvCache>> Create(const KvShape& shape, const KvCacheConfig& cfg);
  ~KvCache();

  const KvShape& shape() const { return shape_; }
  const KvCacheConfig& config() const { return cfg_; }

  // Appends n tokens to `layer`: seq [n] strictly increasing and > every cached seq;
  // k [n, n_head_kv, head_dim] f32 pre-RoPE; v [n, n_head_kv, DimV()] f32.
  // INVALID_ARGUMENT on NaN/inf input (naming layer and seq); the cache is unchanged then.
  Status Write(int layer, const int64_t* seq, int n, const float* k, const float* v);

  // Codecs whose tokens wait in the fp16 tail (residual_tokens() > 0 or flush_quantum() > 1:
  // KIVI windows, per-channel blocks) keep the tokens of the current Write in fp16 until the
  // layer's Attend has run, then apply their flush rule (KIVI §3.2: attention first, then
  // quantize). Within one batched Attend each query reads every such token exactly as a
  // token-by-token stream would have (quantized iff already flushed when the query's own token
  // arrived), so batched prefill == streaming decode. Per-token codecs encode on Write, so the
  // current tokens already attend through the codec.
  //
  // q [n_q, n_head, head_dim] f32 pre-RoPE, q_seq [n_q]; out [n_q, n_head, DimV()] f32.
  // Gathers statistics per the current request; flushes the layer's window codecs at the end.
  void Attend(int layer, const float* q, const int64_t* q_seq, int n_q, float* out);

  void SetStatsRequest(const AttnStatsRequest& r) { stats_ = r; }
  // Not owned; null to remove.
  void SetObserver(KvObserver* o) { observer_ = o; }
  const AttnStatsRequest& stats_request() const { return stats_; }

  // --- bookkeeping (per layer, KV head) ---
  int64_t n_cells(int layer, int head) const;
  const std::vector<int64_t>& seqs(int layer, int head) const;
  const std::vector<int64_t>& positions(int layer, int head) const;
  std::vector<float>& acc_scores(int layer, int head);        // [n_cells], accumulate=true
  const std::vector<float>& obs_scores(int layer, int head) const;  // [n_cells], obs_window>0
  // Number of tokens written to layer 0 so far (tokens consumed), independent of eviction.
  int64_t n_consumed() const { return n_consumed_; }

  // Decoded keys as attention sees them before the query fold: k [n_cells, head_dim] f32
  // (post-RoPE at the cells' current positions). For policies (key norms) and tests.
  void DecodeKeys(int layer, int head, float* k) const;
  void DecodeValues(int layer, int head, float* v) const;  // v [n_cells, DimV()]

  // Keeps only cells `keep` (sorted ascending, unique, indices into the current cells) of one
  // head. Per-token formats move packed rows; block formats re-encode the kept tokens (documented
  // re-quantization). Frees memory (storage shrinks to the next grow step).
  // With demotion configured (demote_*_codec), the cells not kept are decoded from their current
  // codec and re-encoded into the head's demoted tier (appended: per-token codecs add rows, block
  // codecs fill blocks through their fp16 tail) instead of being deleted; they keep seq and pos.
  Status Keep(int layer, int head, const std::vector<int32_t>& keep);
  // Side tiers (demoted and pinned cells; see cache_internal.h SideTier): counts and seqs
  // (arrival order, not sorted) of one head.
  bool has_side_tiers() const { return demotes() || cfg_.sink_detect > 0; }
  bool demotes() const { return !cfg_.demote_k_codec.empty(); }
  int64_t n_demoted(int layer, int head) const;
  int64_t n_pinned(int layer, int head) const;
  std::vector<int64_t> demoted_seqs(int layer, int head) const;
  std::vector<int64_t> pinned_seqs(int layer, int head) const;
  // Tokens found as sinks so far (sink_detect), sorted.
  const std::vector<int64_t>& sink_seqs() const { return sink_seqs_; }
  // Every cell of a head as attention reads it: main cells, then pinned, then demoted.
  // seq/pos [n_all]; k [n_all, head_dim] post-RoPE at pos; v [n_all, DimV()]. For tests and tools.
  void DecodeAllTiers(int layer, int head, std::vector<int64_t>* seq, std::vector<int64_t>* pos,
                      std::vector<float>* k, std::vector<float>* v) const;
  // Re-labels RoPE positions of all cells of one head (new_pos [n_cells]); keys stored after RoPE
  // are re-rotated by the position delta (decode, rotate, re-encode).
  Status Relabel(int layer, int head, const std::vector<int64_t>& new_pos);
  // RoPE position offset for new tokens and queries of a head: pos = seq - shift. Set by
  // re-rotate-once eviction; 0 otherwise.
  int64_t pos_shift(int layer, int head) const;
  void set_pos_shift(int layer, int head, int64_t shift);

  // Storage reservation limit per (layer, head) stream in tokens (-1: none, the default).
  // Growth never reserves beyond max(limit, tokens needed), so while a head holds <= limit
  // tokens its allocated bytes are <= limit tokens' bytes (block rounding aside). Eviction
  // policies set it to their budget so Memory() never exceeds the budget's bytes.
  void SetStorageLimit(int64_t tokens);
  // Drops every cell with seq > last_seq (all layers and heads; sorted per head, so this keeps a
  // prefix) and shifts RoPE positions of tokens written later (pos_shift += n_consumed() -
  // (last_seq + 1)) so they continue at last_seq + 1 as if the dropped tokens were never
  // consumed. Context reuse: compress a context once, then answer several questions from it.
  // n_consumed() is unchanged (it is the causal clock; new tokens must still get seq >= it).
  Status TruncateAfter(int64_t last_seq);
  // Applies pending flushes (window codecs) now: one layer, or all layers.
  void FlushLayer(int layer);
  void Flush();
  void Clear();  // drops every cell, frees storage
  MemoryReport Memory() const;
  // Bits per value of the body codecs (from descriptors), K and V, averaged over layers.
  double KBitsPerValue() const;
  double VBitsPerValue() const;
  std::string Describe() const;  // codecs/transforms in use, one line
  const Codec& body_codec(int layer, KvKind kind) const;  // head 0's instance

  struct Impl;  // internal (cache.cc / attention.cc)
  // Raw state, for the stored-KV format only (src/store/kv_format.h reads and rebuilds it; it
  // verifies every count against the codecs before writing into a freshly created cache).
  Impl& impl() { return *impl_; }
  const Impl& impl() const { return *impl_; }
  void set_n_consumed(int64_t n) { n_consumed_ = n; }

 private:
  KvCache() = default;
  Status WritePredictive(int layer, const int64_t* seq, int n, const float* k, const float* v);
  // Keep() without demotion when demote is false (TruncateAfter: dropped tokens never existed).
  Status KeepCells(int layer, int head, const std::vector<int32_t>& keep, bool demote);
  // KVSink detection on one layer's write batch (k pre-RoPE [n, n_head_kv, head_dim]): adds the
  // seqs found to sink_seqs_.
  void DetectSinks(int layer, const int64_t* seq, int n, const float* k, const float* v);
  std::vector<int64_t> sink_seqs_;  // sorted: tokens found as sinks (KVSink), all layers
  std::vector<float> sink_ref_;     // [n_layer] median ||v|| of the last batch >= 16 tokens
  std::unordered_map<int64_t, int> sink_streak_;  // seq -> consecutive low-||v|| layers
  KvShape shape_;
  KvCacheConfig cfg_;
  AttnStatsRequest stats_;
  KvObserver* observer_ = nullptr;
  int64_t n_consumed_ = 0;
  std::unique_ptr<Impl> impl_;
};

}  // namespace kvc::kv
