// Internal layout of KvCache (shared by cache.cc and attention.cc; not a public header).
#pragma once

#include <memory>
#include <vector>

#include "kv/cache.h"
#include "kv/predictive.h"

namespace kvc::kv {

// One stream: the keys or the values of one (layer, KV head, segment).
struct Stream {
  std::unique_ptr<Codec> codec;
  std::unique_ptr<Transform> transform;  // may be null
  int dim_in = 0;    // vector length given to Write (head_dim or DimV)
  int dim = 0;       // stored length (codec dim): transform out_dim or dim_in
  bool pre_rope = false;               // keys stored before RoPE (rotated at attention time)
  // Centering (codec-spec key `center=1`): the stream stores x − μ, μ [dim_in] f32 = mean of the
  // first batch written to it (the sequence's token 0 left out when the batch has more). Exact:
  // attention adds q·μ to every key score of the stream and (Σ p)·μ to the output, and every
  // decode returns x̂ + μ. μ lives where x does (values, pre-RoPE keys).
  //
  // Post-RoPE keys (mu_rope set): μ is kept in the pre-RoPE frame and subtracted as R(pos) μ at each
  // token's RoPE position (μ = mean of R(−pos) x over the first batch). A post-RoPE mean taken
  // over the first batch's positions is wrong later in the sequence: RoPE turns the mean of every
  // pair whose period is longer than that batch but shorter than the context (measured on SmolLM2
  // at -c 4096: centred keys kept 71 % of their energy at positions >= 512 with a post-RoPE μ from
  // positions 1..511, 24 % with the pre-RoPE one; docs/results.md). Scores then add q·R(pos_j) μ per
  // key instead of one q·μ per stream.
  bool center = false;
  std::vector<float> mu;               // empty until the first write
  const Rope* mu_rope = nullptr;       // set: μ is pre-RoPE, applied as R(pos) μ (post-RoPE keys)
  std::vector<uint8_t> packed;         // [n_packed / block_tokens, BlockBytes()]
  int64_t n_packed = 0;                // tokens in packed blocks (multiple of block_tokens)
  std::vector<uint16_t> tail;          // [n_tail, dim] IEEE fp16 (the residual window)
  int64_t n_tail = 0;
  int grow_tokens = 64;
  int64_t limit_tokens = -1;           // reservations never exceed max(limit, needed); -1: none

  int64_t n() const { return n_packed + n_tail; }
  size_t block_bytes() const { return codec->BlockBytes(); }
  int block_tokens() const { return codec->block_tokens(); }
  // Appends y [n, dim] f32 (already transformed / rotated as stored), flushing per codec rule.
  // With defer (window codecs during Write), the new tokens stay in the fp16 tail until Flush():
  // KIVI §3.2 computes attention with the current tokens in full precision, then quantizes.
  void Append(const float* y, int64_t n, bool defer = false);
  // Encodes what the codec's flush rule allows (residual_tokens / flush_quantum).
  void Flush();
  // True for codecs whose tokens wait in the fp16 tail (residual > 0 or a flush quantum > 1:
  // per-channel blocks, KIVI windows); they flush after attention.
  bool has_window() const;
  // All tokens decoded: out [n(), dim] f32 (stored domain, before Reconstruct).
  void DecodeAll(float* out) const;
  // Stored domain -> x domain: Reconstruct (transform) then + μ (centering). y [n, dim] -> x [n, dim_in].
  // pos [n]: the rows' RoPE positions (needed when mu_rope is set; may be null otherwise).
  void ToInput(const float* y, int64_t n, float* x, const int64_t* pos = nullptr) const;
  // Sets μ from x [n, dim_in] if centering and unset (rows with seq 0 skipped when n > 1), then
  // x -= μ in place (x -= R(pos_i) μ with mu_rope; pos [n] required then).
  void Center(float* x, int64_t n, const int64_t* seq, const int64_t* pos = nullptr);
  // out [n, dim_in] = the μ subtracted from each row: R(pos_i) μ (mu_rope) or μ. Needs μ set.
  void MuRows(const int64_t* pos, int64_t n, float* out) const;
  // Drops everything; replaces with y [n, dim].
  void Rebuild(const float* y, int64_t n);
  size_t packed_bytes() const { return packed.capacity(); }
  size_t tail_bytes() const { return tail.capacity() * sizeof(uint16_t); }

 private:
  void EncodeBlocks(const float* x, int64_t n_tokens);  // n_tokens multiple of block_tokens
  void ReservePacked(int64_t tokens);
};

struct Segment {
  Stream k, v;
  int64_t capacity = -1;  // tokens; -1 = unlimited
  int64_t n() const { return k.n(); }
};

// A side tier of one head (MiKV, arXiv 2402.18096 §3; KVSink, arXiv 2508.04257, abstract and Fig. 1): cells that
// live outside the policy-visible cells, each with its own codecs. Attention covers them exactly
// like the main cells (causal mask by seq, RoPE at pos, same softmax); eviction policies never see
// them. Cells are in arrival order, NOT sorted by seq (a cell a policy kept for long may be
// demoted after a newer one), so every reader masks per cell instead of binary-searching.
//   kDemoted : cells an eviction policy dropped (KvCache::Keep) with demote_*_codec set;
//   kPinned  : tokens found as attention sinks by their activations (sink_detect), written here
//              instead of the main cells at sink_codec precision, never evicted or demoted.
struct SideTier {
  Segment seg;                // K and V streams (capacity unlimited)
  std::vector<int64_t> seq;   // [n] causal clock, arrival order
  std::vector<int64_t> pos;   // [n] RoPE position
  int64_t n() const { return int64_t(seq.size()); }
};
enum SideKind { kPinnedTier = 0, kDemotedTier = 1, kNumSideTiers = 2 };

struct HeadCache {
  std::vector<Segment> segs;
  // [kNumSideTiers]; empty when neither demotion nor sink detection is configured.
  std::vector<SideTier> side;
  std::vector<int64_t> seq;   // [n_cells] causal clock
  std::vector<int64_t> pos;   // [n_cells] RoPE position
  std::vector<float> acc;     // [n_cells] accumulated attention (when requested)
  std::vector<float> obs;     // [n_cells] observation-window votes of the last Attend
  int64_t shift = 0;          // pos = seq - shift for new tokens / queries
  int64_t limit_tokens = -1;  // cell reservations never exceed max(limit, needed) (SetStorageLimit)
  int64_t n() const { return int64_t(seq.size()); }
};

// Predictive caches (KvCacheConfig.predict): one layer's reconstructed KV, every cell, all KV heads
// side by side: k [n, n_head_kv·head_dim] pre-RoPE, v [n, n_head_kv·head_dim_v] f32.
struct Recon {
  int layer = -1;
  int64_t n = 0;
  uint64_t gen = 0;
  std::vector<float> k, v;
};

struct KvCache::Impl {
  std::vector<std::vector<HeadCache>> layers;  // [n_layer][n_head_kv]
  std::shared_ptr<const Rope> rope;  // shared by every cache with the same RoPE table (SharedRope)
  std::shared_ptr<const KvPredictor> pred;  // null unless KvCacheConfig.predict
  Recon recon[2];                           // layers l % 2 (l needs l − 1 while it is built)
  uint64_t gen = 1;                         // bumped when cells change other than by appending
  bool truncating = false;                  // TruncateAfter's prefix Keep (allowed when predictive)
};

// The reconstruction of `layer` (every cell), rebuilt from the stored residuals when stale; builds
// layer − 1 first when needed (kv/predictive.h). Not thread-safe: call outside parallel regions.
const Recon& PredictiveRecon(const KvShape& shape, KvCache::Impl& impl, int layer);
// Frees both reconstruction buffers (after the last layer's Attend, and on Clear).
void ReleasePredictiveRecon(KvCache::Impl& impl);
// Decodes one stream fully into the head_dim domain: reconstructs transforms and centring,
// applies RoPE for pre-RoPE keys at rope_pos (null for values). out [s.n(), dim_in] f32.
void DecodeStreamFull(const Stream& s, const Rope* rope, const int64_t* rope_pos, float* out);

// IEEE fp16 conversion with saturation to ±65504 (never produces inf from finite input).
uint16_t Fp32ToFp16Sat(float f);
void Fp16ToFp32Row(const uint16_t* h, int64_t n, float* out);
void Fp32ToFp16SatRow(const float* x, int64_t n, uint16_t* out);

}  // namespace kvc::kv
