// The stored-KV format (DESIGN.md "Stored KV is a format, not a memory dump"; docs/store.md gives
// the byte layout with a worked size example per codec).
//
// One *record* holds the compressed KV of a token range [t0, t1) of one sequence, exactly as the
// cache holds it: per layer and KV head the cells (positions), and per segment and stream (K, V)
// the packed code blocks and the fp16 tail rows, plus what a restore needs to continue exactly
// (RoPE shift, centring means, storage limit, the eviction policy's own state). Two kinds:
//   - kSequence: the whole state of a sequence after t1 tokens (t0 = 0): session files, the
//     server's saved sessions. Carries the token ids, the pending tokens (sampled, not yet fed),
//     and the model and KV-configuration descriptions for error messages.
//   - kBlock: the state *added* by tokens [t0, t1) (a prefix-cache block): the packed blocks the
//     codec produced in that range and the fp16 tail rows of the range's own tokens still in the
//     tail at t1. Applying blocks 0..j in order to an empty cache rebuilds the exact state after
//     t1 of block j, for every codec (window codecs included: a block carries the fp16 rows the
//     window still holds; docs/store.md counts them). Only for caches without an eviction policy
//     (cells are then the identity: seq = pos = token index, not stored).
//
// Layout (little-endian):
//   [0, 128)   header: magic "KVCRUNCH", u32 format version, u32 kind, u64 record bytes,
//              model digest[32], KV-configuration digest[32], block key[32] (kBlock; zeros
//              otherwise), u64 reserved
//   [128, n-8) payload (kind-specific, every count checked against the codecs on read)
//   [n-8, n)   XXH3-64 of bytes [0, n-8)
// Reading verifies the checksum first, then magic, version, kind, digests and every count; a
// record that fails is refused with a message and nothing attends through it. The checksum
// detects corruption (bit rot, truncation, a value under the wrong key), not an adversary:
// tenants are separated by keys (prefix_cache.h), not by the checksum.
#pragma once

#include <array>
#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "kv/cache.h"
#include "kv/policy.h"
#include "kvcrunch/status.h"

namespace kvc {
class Model;
}

namespace kvc::store {

constexpr uint32_t kFormatVersion = 1;
constexpr size_t kHeaderBytes = 128;
constexpr size_t kTrailerBytes = 8;

using Digest = std::array<uint8_t, 32>;  // SHA-256
std::string DigestHex(const Digest& d);
Digest Sha256(std::string_view bytes);

enum class RecordKind : uint32_t { kSequence = 1, kBlock = 2 };

// What the KV depends on in the model: architecture, shapes, RoPE, tokenizer size and a checksum
// of every byte of the GGUF file (XXH3-128, Model::file_checksum: computed once per Model).
struct ModelFingerprint {
  std::string text;  // e.g. "llama n_layer=30 n_head=9 n_head_kv=3 head_dim=64 ... file_xxh128=..."
  Digest digest{};   // SHA-256 of text
};
ModelFingerprint FingerprintOf(const Model& model);

// What the KV depends on in the configuration: per layer the codecs' canonical specs (aliases
// expanded, every parameter), transforms, centring, sink segment and codec, position mode, seed,
// a digest of the calibration tensors, the eviction policy's canonical name, plus `extra`
// (the engine adds its prefill chunk: centring means depend on the first chunk).
struct KvFingerprint {
  std::string text;
  Digest digest{};
};
KvFingerprint FingerprintOf(const kv::KvCache& cache, const std::string& policy_name,
                            const std::string& extra = "");

// Header fields of a verified record.
struct RecordInfo {
  RecordKind kind = RecordKind::kSequence;
  Digest model{}, kv{}, key{};
  int64_t t0 = 0, t1 = 0;       // token range
  int64_t n_consumed = 0;       // the cache's causal clock after t1
  std::vector<int32_t> tokens;  // [t1 - t0] token ids of the range
  std::vector<int32_t> pending; // kSequence: sampled tokens not yet in the cache (may be empty)
  std::string model_text, kv_text, policy_name;  // kSequence only
};

// A decoded, verified record: header fields plus the parsed state (opaque; Apply* use it).
struct Record {
  RecordInfo info;
  struct State;
  std::shared_ptr<const State> state;
  size_t bytes = 0;  // size of the encoded record
};

// --- writing ---
// The whole sequence: tokens [n_consumed] the cache consumed (in order), pending tokens, the
// policy (may be null) whose state is saved with it.
StatusOr<std::string> EncodeSequence(const kv::KvCache& cache, const kv::EvictionPolicy* policy,
                                     const ModelFingerprint& model, const KvFingerprint& kv,
                                     const std::vector<int32_t>& tokens,
                                     const std::vector<int32_t>& pending);

// Cuts a sequence's blocks (kBlock records), in order, from its cache (one exporter per sequence).
// Window-free caches (every stream encodes each token on write: no fp16 tail, one-token blocks)
// hold block [t0, t1) unchanged later, so any t1 <= n_consumed() can be cut after the fact (a
// prefill chunk of 256 tokens yields four 64-token blocks). Caches with a window (KIVI residuals,
// per-channel key blocks) change those tokens' storage as later tokens arrive: their blocks can only
// be cut when t1 == n_consumed(), i.e. when a prefill chunk or a decode step ends on a multiple of
// the block size; one record then spans from the previous cut (several blocks; docs/store.md).
class BlockExporter {
 public:
  static bool WindowFree(const kv::KvCache& cache);
  // Next record: tokens [t0, t1) with t0 = the previous t1 (0 at first); `tokens` are those
  // t1 - t0 ids; `key` the chain key of the record's last block (prefix_cache.h).
  // FAILED_PRECONDITION (nothing exported; stop exporting this sequence) when the cells are not
  // the token indices (an eviction policy dropped or relabelled tokens), a stream is centred, or
  // the cache has a window and t1 != n_consumed().
  StatusOr<std::string> Next(const kv::KvCache& cache, int64_t t1, const ModelFingerprint& model,
                             const KvFingerprint& kv, const Digest& key,
                             const std::vector<int32_t>& tokens);
  int64_t t1() const { return t1_; }
  // Continues from a cache rebuilt from stored KV, t = n_consumed(): the next record starts at
  // t rounded down to block_tokens (window-free caches can cut back there), or at t when that is a
  // block boundary. False (do not export) for a cache with a window and t not on a boundary.
  bool StartAt(const kv::KvCache& cache, int block_tokens);

 private:
  struct Mark {
    int64_t n_packed = 0, n = 0;
  };
  std::vector<Mark> marks_;  // per stream at t1_ (caches with a window)
  int64_t t1_ = 0;
};

// Atomic file write: a temporary file in the same directory, fsync, rename.
Status WriteFileAtomic(const std::string& path, std::string_view bytes);
StatusOr<std::string> ReadFile(const std::string& path);

// --- reading ---
// Verifies checksum, magic, version and every count, and parses. DATA_LOSS for corrupt or
// truncated bytes (the message says what failed), FAILED_PRECONDITION for a newer format version.
// Does not compare digests (see CheckMatches).
StatusOr<Record> DecodeRecord(std::string_view bytes);
// FAILED_PRECONDITION naming both sides when the record was made with another model or another
// KV configuration (or, for blocks, is stored under another key).
Status CheckMatches(const Record& r, const ModelFingerprint& model, const KvFingerprint& kv,
                    const Digest* key = nullptr);

// Rebuilds state into a *fresh* cache (KvCache::Create with the same configuration; nothing
// written yet): a kSequence record, or consecutive kBlock records starting at t0 = 0. Every count
// is checked against the cache's codecs before anything is written; INVALID_ARGUMENT /
// DATA_LOSS otherwise (the cache is then in an unspecified state: discard it).
// policy: receives the saved policy state (kSequence); must have the saved Name().
Status ApplySequence(const Record& r, kv::KvCache* cache, kv::EvictionPolicy* policy);
Status ApplyBlocks(const std::vector<std::shared_ptr<const Record>>& blocks, kv::KvCache* cache);

}  // namespace kvc::store
