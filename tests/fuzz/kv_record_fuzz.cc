// libFuzzer target for the stored-KV record format (src/store/kv_format.h), two ways per input:
//  1. the input itself as a record: DecodeRecord (almost every input stops at the checksum), then,
//     if it decodes, ApplySequence / ApplyBlocks into a fresh small cache and one Attend;
//  2. structure-aware: a small cache (codec, token count, sinks, block export chosen by the first
//     bytes) is filled with finite data and encoded, the rest of the input flips bytes of the
//     payload, and the checksum is recomputed, so the parser and the checks behind the checksum
//     see the mutations; whatever decodes and applies is attended through.
// Errors must carry a message; anything that applies must be attendable without a sanitizer report.
#include <xxhash.h>

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "fuzz_util.h"
#include "kv/cache.h"
#include "store/kv_format.h"

namespace {

using namespace kvc;

const char* kCodecs[] = {"f16", "q4_0", "kivi2", "turbo3"};

kv::KvShape Shape() {
  kv::KvShape s;
  s.n_layer = 2;
  s.n_head = 2;
  s.n_head_kv = 1;
  s.head_dim = 32;
  s.rope.n_rot = 32;
  return s;
}

std::unique_ptr<kv::KvCache> Fresh(int codec, int sinks) {
  kv::KvCacheConfig cfg;
  cfg.k_codec = cfg.v_codec = kCodecs[codec];
  cfg.sink_tokens = sinks;
  cfg.rope_table_positions = 256;
  auto c = kv::KvCache::Create(Shape(), cfg);
  fuzz::Require(c.ok(), "small cache builds");
  return std::move(c).value();
}

void AttendOnce(kv::KvCache& c) {
  const kv::KvShape s = Shape();
  std::vector<float> q = fuzz::Wave(size_t(s.n_head) * s.head_dim, 1.f);
  std::vector<float> out(size_t(s.n_head) * s.head_dim);
  const int64_t seq = c.n_consumed();
  std::vector<float> k = fuzz::Wave(size_t(s.n_head_kv) * s.head_dim, 0.5f);
  for (int l = 0; l < s.n_layer; ++l) {
    if (!c.Write(l, &seq, 1, k.data(), k.data()).ok()) return;
    c.Attend(l, q.data(), &seq, 1, out.data());
  }
}

void TryApply(const std::string& bytes, int codec, int sinks) {
  auto r = store::DecodeRecord(bytes);
  if (!r.ok()) {
    fuzz::Require(!r.status().message().empty(), "decode error without a message");
    return;
  }
  auto cache = Fresh(codec, sinks);
  Status st;
  if (r->info.kind == store::RecordKind::kSequence) {
    st = store::ApplySequence(*r, cache.get(), nullptr);
  } else {
    st = store::ApplyBlocks({std::make_shared<const store::Record>(*r)}, cache.get());
  }
  if (!st.ok()) {
    fuzz::Require(!st.message().empty(), "apply error without a message");
    return;
  }
  AttendOnce(*cache);
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size < 4) return 0;
  const int codec = data[0] % 4;
  const int n = 1 + data[1] % 80;
  const int sinks = (data[2] & 1) ? 2 : 0;
  const bool blocks = (data[2] & 2) != 0;
  // 1. The raw input.
  TryApply(std::string(reinterpret_cast<const char*>(data), size), codec, sinks);
  // 2. A valid record, mutated behind the checksum.
  auto cache = Fresh(codec, sinks);
  const kv::KvShape s = Shape();
  std::vector<int64_t> seq(static_cast<size_t>(n));
  for (int i = 0; i < n; ++i) seq[size_t(i)] = i;
  std::vector<float> x = fuzz::Wave(size_t(n) * s.n_head_kv * s.head_dim, 1.f + data[3] % 7);
  for (int l = 0; l < s.n_layer; ++l) {
    fuzz::Require(cache->Write(l, seq.data(), n, x.data(), x.data()).ok(), "write");
    std::vector<float> q = fuzz::Wave(size_t(n) * s.n_head * s.head_dim, 1.f);
    std::vector<float> out(size_t(n) * s.n_head * s.head_dim);
    cache->Attend(l, q.data(), seq.data(), n, out.data());
  }
  std::vector<int32_t> toks(size_t(n), 7);
  store::ModelFingerprint mfp;
  const store::KvFingerprint kfp = store::FingerprintOf(*cache, "");
  std::string rec;
  if (blocks) {
    store::BlockExporter ex;
    auto r = ex.Next(*cache, n, mfp, kfp, store::Digest{}, toks);
    if (!r.ok()) return 0;
    rec = std::move(*r);
  } else {
    auto r = store::EncodeSequence(*cache, nullptr, mfp, kfp, toks, {});
    fuzz::Require(r.ok(), "encode");
    rec = std::move(*r);
  }
  const size_t payload = rec.size() - store::kHeaderBytes - store::kTrailerBytes;
  for (size_t i = 4; i + 1 < size; i += 2) {
    const size_t at = store::kHeaderBytes + (size_t(data[i]) * 257 + i * 31) % payload;
    rec[at] = char(uint8_t(rec[at]) ^ (data[i + 1] | 1));
  }
  const uint64_t h = XXH3_64bits(rec.data(), rec.size() - store::kTrailerBytes);
  std::memcpy(rec.data() + rec.size() - store::kTrailerBytes, &h, 8);
  TryApply(rec, codec, sinks);
  return 0;
}
