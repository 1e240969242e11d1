#include "store/kv_format.h"

#include <fcntl.h>
#include <openssl/sha.h>
#include <sys/stat.h>
#include <unistd.h>
#include <xxhash.h>

#include <algorithm>
#include <array>
#include <cerrno>
#include <climits>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <map>
#include <mutex>
#include <sstream>

#include <fmt/format.h>

#include "kv/cache_internal.h"

namespace kvc::store {

namespace {

constexpr char kMagic[8] = {'K', 'V', 'C', 'R', 'U', 'N', 'C', 'H'};
// Bounds a reader accepts before allocating (a corrupt count must not allocate gigabytes).
constexpr uint64_t kMaxCount = uint64_t(1) << 31;

class Writer {
 public:
  std::string out;
  template <typename T>
  void Put(T v) {
    out.append(reinterpret_cast<const char*>(&v), sizeof(T));
  }
  void Bytes(const void* p, size_t n) {
    if (n > 0) out.append(static_cast<const char*>(p), n);  // (an empty vector's data() may be null)
  }
  // LEB128 (unsigned) and zigzag LEB128 (signed): counts and positions take 1-3 bytes.
  void Var(uint64_t v) {
    while (v >= 0x80) {
      out.push_back(char(uint8_t(v) | 0x80));
      v >>= 7;
    }
    out.push_back(char(uint8_t(v)));
  }
  void SVar(int64_t v) { Var((uint64_t(v) << 1) ^ uint64_t(v >> 63)); }
  void Str(const std::string& s) {
    Put<uint32_t>(uint32_t(s.size()));
    Bytes(s.data(), s.size());
  }
  template <typename T>
  void Vec(const std::vector<T>& v) {
    Var(uint64_t(v.size()));
    Bytes(v.data(), v.size() * sizeof(T));
  }
};

class Reader {
 public:
  Reader(std::string_view b, size_t pos) : b_(b), pos_(pos) {}
  bool ok() const { return ok_; }
  const std::string& error() const { return err_; }
  size_t pos() const { return pos_; }
  template <typename T>
  T Get(const char* what) {
    T v{};
    if (!Need(sizeof(T), what)) return v;
    std::memcpy(&v, b_.data() + pos_, sizeof(T));
    pos_ += sizeof(T);
    return v;
  }
  std::string Str(const char* what) {
    const uint32_t n = Get<uint32_t>(what);
    if (!Need(n, what)) return {};
    std::string s(b_.data() + pos_, n);
    pos_ += n;
    return s;
  }
  uint64_t Var(const char* what) {
    uint64_t v = 0;
    for (int shift = 0; shift < 64; shift += 7) {
      const uint8_t b = Get<uint8_t>(what);
      if (!ok_) return 0;
      v |= uint64_t(b & 0x7f) << shift;
      if (!(b & 0x80)) return v;
    }
    Fail(fmt::format("{}: malformed variable-length integer (offset {})", what, pos_));
    return 0;
  }
  int64_t SVar(const char* what) {
    const uint64_t u = Var(what);
    return int64_t(u >> 1) ^ -int64_t(u & 1);
  }
  template <typename T>
  std::vector<T> Vec(const char* what) {
    const uint64_t n = Var(what);
    if (!ok_) return {};
    if (n > kMaxCount || n * sizeof(T) > b_.size() - pos_) {
      Fail(fmt::format("{}: count {} runs past the end of the record", what, n));
      return {};
    }
    std::vector<T> v(n);
    if (n > 0) std::memcpy(v.data(), b_.data() + pos_, n * sizeof(T));
    pos_ += n * sizeof(T);
    return v;
  }
  void Raw(void* dst, size_t n, const char* what) {
    if (!Need(n, what) || n == 0) return;
    std::memcpy(dst, b_.data() + pos_, n);
    pos_ += n;
  }
  std::string Blob(const char* what) {
    const uint64_t n = Var(what);
    if (!ok_) return {};
    if (n > b_.size() - pos_) {
      Fail(fmt::format("{}: {} bytes run past the end of the record", what, n));
      return {};
    }
    std::string s(b_.data() + pos_, n);
    pos_ += n;
    return s;
  }
  void Fail(std::string m) {
    if (ok_) err_ = std::move(m);
    ok_ = false;
  }

 private:
  bool Need(size_t n, const char* what) {
    if (!ok_) return false;
    if (n > b_.size() - pos_) {
      Fail(fmt::format("truncated while reading {} (offset {})", what, pos_));
      return false;
    }
    return true;
  }
  std::string_view b_;
  size_t pos_;
  bool ok_ = true;
  std::string err_;
};

}  // namespace

// The parsed payload.
struct Record::State {
  struct StreamState {
    int64_t n_packed_begin = 0, n_packed_end = 0, n_begin = 0, n_end = 0;
    int64_t limit_tokens = -1;
    std::vector<float> mu;
    std::string packed;           // packed blocks for tokens [n_packed_begin, n_packed_end)
    uint32_t dim = 0;
    std::vector<uint16_t> tail;   // [rows, dim] fp16 for tokens [max(n_packed_end, n_begin), n_end)
  };
  struct HeadState {
    int64_t shift = 0, limit_tokens = -1;
    std::vector<int64_t> seq, pos;  // empty when cells_identity
    std::vector<float> acc;
    std::vector<StreamState> streams;  // [n_seg * 2]: seg0 K, seg0 V, seg1 K, ...
  };
  bool cells_identity = false;
  uint32_t n_layer = 0, n_head_kv = 0, n_seg = 0;
  std::vector<HeadState> heads;  // [n_layer * n_head_kv]
  std::vector<int64_t> policy_state;
};

std::string DigestHex(const Digest& d) {
  std::string s;
  for (uint8_t b : d) s += fmt::format("{:02x}", b);
  return s;
}

Digest Sha256(std::string_view bytes) {
  Digest d{};
  SHA256(reinterpret_cast<const unsigned char*>(bytes.data()), bytes.size(), d.data());
  return d;
}

KvFingerprint FingerprintOf(const kv::KvCache& cache, const std::string& policy_name,
                            const std::string& extra) {
  const auto& impl = cache.impl();
  const auto& cfg = cache.config();
  std::string t = fmt::format("kvcrunch-format={} pos={} sinks={} seed={:x}", kFormatVersion,
                              kv::PositionModeName(cfg.position_mode), cfg.sink_tokens, cfg.seed);
  // Per layer: head 0's streams (every head of a layer is built from the same specs).
  for (size_t l = 0; l < impl.layers.size(); ++l) {
    const auto& hc = impl.layers[l][0];
    t += fmt::format("\nL{}", l);
    for (size_t s = 0; s < hc.segs.size(); ++s) {
      for (const kv::Stream* st : {&hc.segs[s].k, &hc.segs[s].v}) {
        t += fmt::format(" {}{}={}", st == &hc.segs[s].k ? "K" : "V", s, st->codec->Name());
        if (st->transform) t += "|t=" + st->transform->Name();
        if (st->center) t += "|center";
        if (st->pre_rope) t += "|pre_rope";
      }
      if (hc.segs[s].capacity >= 0) t += fmt::format(" cap{}={}", s, hc.segs[s].capacity);
    }
  }
  if (cfg.calib) {
    std::string c;
    for (const auto& [name, v] : cfg.calib->tensors) {
      c += name;
      c.push_back('\0');
      c.append(reinterpret_cast<const char*>(v.data()), v.size() * sizeof(float));
    }
    t += "\ncalib_sha256=" + DigestHex(Sha256(c));
  }
  if (impl.pred) {
    // Stored rows of a predictive cache are residuals against these predictors: a session saved
    // with one predictor file must not be restored with another (it would decode to garbage).
    std::string c;
    for (const auto* ws : {&impl.pred->wk, &impl.pred->wv}) {
      for (const auto& w : *ws) {
        c.append(reinterpret_cast<const char*>(w.data()), w.size() * sizeof(float));
        c.push_back('\0');
      }
    }
    t += "\npredict_sha256=" + DigestHex(Sha256(c));
  }
  t += "\npolicy=" + (policy_name.empty() ? std::string("none") : policy_name);
  if (!extra.empty()) t += "\n" + extra;
  KvFingerprint fp;
  fp.text = t;
  fp.digest = Sha256(t);
  return fp;
}

namespace {

// Shared writer of both kinds. marks: per-stream (n_packed, n) at t0 (null: zeros). identity:
// cells are not stored.
std::string Encode(RecordKind kind, const kv::KvCache& cache, const kv::EvictionPolicy* policy,
                   const ModelFingerprint& model, const KvFingerprint& kvfp, const Digest& key,
                   int64_t t0, int64_t t1, int64_t n_consumed, const std::vector<int32_t>& tokens,
                   const std::vector<int32_t>& pending, bool identity,
                   const std::vector<std::array<int64_t, 4>>* ranges) {
  Writer w;
  w.Bytes(kMagic, 8);
  w.Put<uint32_t>(kFormatVersion);
  w.Put<uint32_t>(uint32_t(kind));
  w.Put<uint64_t>(0);  // record bytes, patched below
  w.Bytes(model.digest.data(), 32);
  w.Bytes(kvfp.digest.data(), 32);
  w.Bytes(key.data(), 32);
  w.Put<uint64_t>(0);
  // Payload.
  const bool seq = kind == RecordKind::kSequence;
  w.Str(seq ? model.text : "");
  w.Str(seq ? kvfp.text : "");
  w.Str(seq && policy ? policy->Name() : "");
  w.SVar(t0);
  w.SVar(t1);
  w.SVar(n_consumed);
  w.Vec(tokens);
  w.Vec(pending);
  w.Vec(policy ? policy->SaveState() : std::vector<int64_t>{});
  w.Put<uint8_t>(identity ? 1 : 0);
  const auto& impl = cache.impl();
  const uint32_t n_layer = uint32_t(impl.layers.size());
  const uint32_t n_head_kv = uint32_t(impl.layers[0].size());
  const uint32_t n_seg = uint32_t(impl.layers[0][0].segs.size());
  w.Var(n_layer);
  w.Var(n_head_kv);
  w.Var(n_seg);
  size_t mi = 0;
  for (const auto& layer : impl.layers) {
    for (const auto& hc : layer) {
      w.SVar(hc.shift);
      w.SVar(hc.limit_tokens);
      if (!identity) {
        w.Vec(hc.seq);
        w.Vec(hc.pos);
        w.Vec(hc.acc);
      }
      for (const auto& sg : hc.segs) {
        for (const kv::Stream* st : {&sg.k, &sg.v}) {
          // Stream-token ranges: packed [pb, pe), tokens [nb, ne); the whole stream by default.
          const std::array<int64_t, 4> rg =
              ranges ? (*ranges)[mi] : std::array<int64_t, 4>{0, st->n_packed, 0, st->n()};
          ++mi;
          const int64_t pb = rg[0], pe = rg[1], nb = rg[2], ne = rg[3];
          w.SVar(pb);
          w.SVar(pe);
          w.SVar(nb);
          w.SVar(ne);
          w.SVar(st->limit_tokens);
          w.Vec(st->mu);
          const int bt = st->block_tokens();
          const size_t bb = st->block_bytes();
          const size_t off = size_t(pb / bt) * bb;
          const size_t len = size_t((pe - pb) / bt) * bb;
          w.Var(len);
          if (len > 0) w.Bytes(st->packed.data() + off, len);
          // Tail rows of the range's own tokens still in the tail at ne (exact cuts only: a cut
          // before n() has pe == ne, no rows).
          const int64_t tail_begin = std::max(pe, nb);
          const int64_t rows = ne - tail_begin;
          w.Var(uint64_t(st->dim));
          w.Var(uint64_t(rows));
          if (rows > 0) {  // (pointer arithmetic only into a tail that holds those rows)
            w.Bytes(st->tail.data() + size_t(tail_begin - st->n_packed) * st->dim,
                    size_t(rows) * st->dim * sizeof(uint16_t));
          }
        }
      }
    }
  }
  const uint64_t total = w.out.size() + kTrailerBytes;
  std::memcpy(w.out.data() + 16, &total, 8);
  const uint64_t h = XXH3_64bits(w.out.data(), w.out.size());
  w.Put<uint64_t>(h);
  return std::move(w.out);
}

// The record layout holds the main cells and segments only. A cache with side tiers (demoted cells,
// demote=; activation-found sinks, sink_detect=; kv/cache_internal.h SideTier) would lose them and
// be restored silently wrong, so it is refused both ways until the format carries them.
Status RefuseSideTiers(const kv::KvCache& cache, const char* what) {
  // Predictive caches (predict=) store residuals that only mean something with the same predictor
  // file and every layer's cells; the record does not carry the predictor's identity yet.
  if (!cache.config().predict.empty()) {
    return FailedPrecondition(fmt::format(
        "{} a predictive KV cache (predict=, presets kvc4 / kvc3 / kvc2) is not supported: the "
        "stored-KV format does not record the predictor file yet (use the -serve presets or other "
        "codecs with --session / the prefix cache)", what));
  }
  if (!cache.has_side_tiers()) return Status::Ok();
  return FailedPrecondition(fmt::format(
      "{} a KV cache with demotion (demote=) or activation-found sinks (sink_detect=) is not "
      "supported: the stored-KV format has no place for their side tiers yet", what));
}

}  // namespace

StatusOr<std::string> EncodeSequence(const kv::KvCache& cache, const kv::EvictionPolicy* policy,
                                     const ModelFingerprint& model, const KvFingerprint& kv,
                                     const std::vector<int32_t>& tokens,
                                     const std::vector<int32_t>& pending) {
  KVC_RETURN_IF_ERROR(RefuseSideTiers(cache, "saving"));
  if (int64_t(tokens.size()) != cache.n_consumed()) {
    return InvalidArgument(fmt::format("{} token ids given for a cache that consumed {}",
                                       tokens.size(), cache.n_consumed()));
  }
  // Cells that are the token indices (no eviction) are not stored.
  bool identity = true;
  const int64_t n = cache.n_consumed();
  for (const auto& layer : cache.impl().layers) {
    for (const auto& hc : layer) {
      if (hc.n() != n || hc.shift != 0 || !hc.acc.empty()) identity = false;
      for (int64_t i = 0; identity && i < hc.n(); ++i) {
        if (hc.seq[size_t(i)] != i || hc.pos[size_t(i)] != i) identity = false;
      }
    }
  }
  return Encode(RecordKind::kSequence, cache, policy, model, kv, Digest{}, 0,
                int64_t(tokens.size()), cache.n_consumed(), tokens, pending, identity, nullptr);
}

bool BlockExporter::WindowFree(const kv::KvCache& cache) {
  for (const auto& layer : cache.impl().layers) {
    for (const auto& hc : layer) {
      for (const auto& sg : hc.segs) {
        for (const kv::Stream* st : {&sg.k, &sg.v}) {
          if (st->has_window() || st->block_tokens() != 1) return false;
        }
      }
    }
  }
  return true;
}

bool BlockExporter::StartAt(const kv::KvCache& cache, int block_tokens) {
  const int64_t t = cache.n_consumed();
  marks_.clear();
  if (WindowFree(cache)) {
    t1_ = t / block_tokens * block_tokens;
    return true;
  }
  if (t % block_tokens != 0) return false;
  for (const auto& layer : cache.impl().layers) {
    for (const auto& hc : layer) {
      for (const auto& sg : hc.segs) {
        for (const kv::Stream* st : {&sg.k, &sg.v}) marks_.push_back({st->n_packed, st->n()});
      }
    }
  }
  t1_ = t;
  return true;
}

StatusOr<std::string> BlockExporter::Next(const kv::KvCache& cache, int64_t t1,
                                          const ModelFingerprint& model, const KvFingerprint& kv,
                                          const Digest& key, const std::vector<int32_t>& tokens) {
  KVC_RETURN_IF_ERROR(RefuseSideTiers(cache, "exporting blocks of"));
  const int64_t t0 = t1_;
  if (t1 <= t0 || t1 > cache.n_consumed() || t1 - t0 != int64_t(tokens.size())) {
    return InvalidArgument(fmt::format("block [{}, {}) of a cache with {} tokens given {} ids", t0,
                                       t1, cache.n_consumed(), tokens.size()));
  }
  const bool window_free = WindowFree(cache);
  if (!window_free && t1 != cache.n_consumed()) {
    return FailedPrecondition("a cache with a window can only be cut at its current length");
  }
  const auto& impl = cache.impl();
  const int64_t n_now = cache.n_consumed();
  std::vector<std::array<int64_t, 4>> ranges;
  std::vector<Mark> next;
  size_t mi = 0;
  for (const auto& layer : impl.layers) {
    for (const auto& hc : layer) {
      // Identity cells: seq = pos = index, no shift (no eviction happened).
      if (hc.n() != n_now || hc.shift != 0 ||
          (n_now > 0 && (hc.seq.back() != n_now - 1 || hc.pos.back() != n_now - 1))) {
        return FailedPrecondition("the cache's cells are not its token indices (eviction or "
                                  "relabelling): blocks are not shareable from here");
      }
      int64_t seg_start = 0;  // first token index of the segment
      for (const auto& sg : hc.segs) {
        const int64_t seg_end = sg.capacity >= 0 ? seg_start + sg.capacity : INT64_MAX;
        for (const kv::Stream* st : {&sg.k, &sg.v}) {
          if (!st->mu.empty() || st->center) {
            return FailedPrecondition("centred streams depend on the first prefill chunk: blocks "
                                      "are not shareable");
          }
          if (window_free) {
            const int64_t b = std::clamp(t0, seg_start, seg_end) - seg_start;
            const int64_t e = std::clamp(t1, seg_start, seg_end) - seg_start;
            ranges.push_back({b, e, b, e});
          } else {
            const Mark m = mi < marks_.size() ? marks_[mi] : Mark{};
            if (st->n_packed < m.n_packed || st->n() < m.n) {
              return FailedPrecondition("a stream shrank: blocks are not shareable from here");
            }
            ranges.push_back({m.n_packed, st->n_packed, m.n, st->n()});
            next.push_back({st->n_packed, st->n()});
          }
          ++mi;
        }
        seg_start = seg_end;
      }
    }
  }
  // The record's n_consumed is t1 (the state it rebuilds), not the cache's current count.
  std::string out = Encode(RecordKind::kBlock, cache, nullptr, model, kv, key, t0, t1, t1, tokens,
                           {}, /*identity=*/true, &ranges);
  if (!window_free) marks_ = std::move(next);
  t1_ = t1;
  return out;
}

Status WriteFileAtomic(const std::string& path, std::string_view bytes) {
  const std::string tmp = fmt::format("{}.tmp.{}", path, ::getpid());
  const int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) return Internal(fmt::format("cannot create {}: {}", tmp, std::strerror(errno)));
  size_t done = 0;
  while (done < bytes.size()) {
    const ssize_t n = ::write(fd, bytes.data() + done, bytes.size() - done);
    if (n < 0) {
      if (errno == EINTR) continue;
      const int e = errno;
      ::close(fd);
      ::unlink(tmp.c_str());
      return Internal(fmt::format("cannot write {}: {}", tmp, std::strerror(e)));
    }
    done += size_t(n);
  }
  if (::fsync(fd) != 0 || ::close(fd) != 0) {
    ::unlink(tmp.c_str());
    return Internal(fmt::format("cannot flush {}: {}", tmp, std::strerror(errno)));
  }
  if (::rename(tmp.c_str(), path.c_str()) != 0) {
    const int e = errno;
    ::unlink(tmp.c_str());
    return Internal(fmt::format("cannot rename {} to {}: {}", tmp, path, std::strerror(e)));
  }
  return Status::Ok();
}

StatusOr<std::string> ReadFile(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  if (!f) return NotFound(fmt::format("cannot open {}", path));
  std::stringstream ss;
  ss << f.rdbuf();
  if (f.bad()) return Internal(fmt::format("cannot read {}", path));
  return ss.str();
}

StatusOr<Record> DecodeRecord(std::string_view b) {
  if (b.size() < kHeaderBytes + kTrailerBytes) {
    return DataLoss(fmt::format("KV record of {} bytes is shorter than its header and checksum "
                                "({} bytes): truncated",
                                b.size(), kHeaderBytes + kTrailerBytes));
  }
  if (std::memcmp(b.data(), kMagic, 8) != 0) {
    return DataLoss("not a kvcrunch KV record (bad magic; expected \"KVCRUNCH\")");
  }
  uint32_t version = 0, kind = 0;
  uint64_t total = 0;
  std::memcpy(&version, b.data() + 8, 4);
  std::memcpy(&kind, b.data() + 12, 4);
  std::memcpy(&total, b.data() + 16, 8);
  if (total != b.size()) {
    return DataLoss(fmt::format("KV record says {} bytes but {} were read: truncated or padded",
                                total, b.size()));
  }
  uint64_t want = 0;
  std::memcpy(&want, b.data() + b.size() - 8, 8);
  if (XXH3_64bits(b.data(), b.size() - 8) != want) {
    return DataLoss("KV record checksum mismatch: the bytes are corrupt");
  }
  if (version != kFormatVersion) {
    return FailedPrecondition(fmt::format(
        "KV record has format version {}; this kvcrunch reads version {}", version, kFormatVersion));
  }
  if (kind != uint32_t(RecordKind::kSequence) && kind != uint32_t(RecordKind::kBlock)) {
    return DataLoss(fmt::format("KV record of unknown kind {}", kind));
  }
  Record r;
  r.bytes = b.size();
  r.info.kind = RecordKind(kind);
  std::memcpy(r.info.model.data(), b.data() + 24, 32);
  std::memcpy(r.info.kv.data(), b.data() + 56, 32);
  std::memcpy(r.info.key.data(), b.data() + 88, 32);
  auto st = std::make_shared<Record::State>();
  Reader rd(b.substr(0, b.size() - kTrailerBytes), kHeaderBytes);
  r.info.model_text = rd.Str("model description");
  r.info.kv_text = rd.Str("KV configuration");
  r.info.policy_name = rd.Str("policy name");
  r.info.t0 = rd.SVar("t0");
  r.info.t1 = rd.SVar("t1");
  r.info.n_consumed = rd.SVar("n_consumed");
  r.info.tokens = rd.Vec<int32_t>("tokens");
  r.info.pending = rd.Vec<int32_t>("pending tokens");
  st->policy_state = rd.Vec<int64_t>("policy state");
  st->cells_identity = rd.Get<uint8_t>("cells flag") != 0;
  st->n_layer = uint32_t(std::min<uint64_t>(rd.Var("n_layer"), UINT32_MAX));
  st->n_head_kv = uint32_t(std::min<uint64_t>(rd.Var("n_head_kv"), UINT32_MAX));
  st->n_seg = uint32_t(std::min<uint64_t>(rd.Var("segments"), UINT32_MAX));
  if (!rd.ok()) return DataLoss("KV record: " + rd.error());
  if (r.info.t0 < 0 || r.info.t1 < r.info.t0 || r.info.tokens.size() != size_t(r.info.t1 - r.info.t0) ||
      r.info.n_consumed < r.info.t1) {
    return DataLoss(fmt::format("KV record: inconsistent token range [{}, {}) with {} ids, {} consumed",
                                r.info.t0, r.info.t1, r.info.tokens.size(), r.info.n_consumed));
  }
  if (st->n_layer == 0 || st->n_layer > 4096 || st->n_head_kv == 0 || st->n_head_kv > 4096 ||
      st->n_seg == 0 || st->n_seg > 2) {
    return DataLoss(fmt::format("KV record: implausible shape n_layer={} n_head_kv={} segments={}",
                                st->n_layer, st->n_head_kv, st->n_seg));
  }
  st->heads.resize(size_t(st->n_layer) * st->n_head_kv);
  for (auto& h : st->heads) {
    h.shift = rd.SVar("shift");
    h.limit_tokens = rd.SVar("limit");
    if (!st->cells_identity) {
      h.seq = rd.Vec<int64_t>("cell seq");
      h.pos = rd.Vec<int64_t>("cell pos");
      h.acc = rd.Vec<float>("cell scores");
    }
    h.streams.resize(size_t(st->n_seg) * 2);
    for (auto& s : h.streams) {
      s.n_packed_begin = rd.SVar("packed begin");
      s.n_packed_end = rd.SVar("packed end");
      s.n_begin = rd.SVar("stream begin");
      s.n_end = rd.SVar("stream end");
      s.limit_tokens = rd.SVar("stream limit");
      s.mu = rd.Vec<float>("centring mean");
      s.packed = rd.Blob("packed blocks");
      s.dim = uint32_t(std::min<uint64_t>(rd.Var("dim"), UINT32_MAX));
      const uint64_t rows = rd.Var("tail rows");
      if (!rd.ok()) return DataLoss("KV record: " + rd.error());
      if (s.dim == 0 || s.dim > 65536 || rows > kMaxCount) {
        return DataLoss(fmt::format("KV record: implausible stream dim {} / tail rows {}", s.dim, rows));
      }
      if (s.n_packed_begin < 0 || s.n_packed_end < s.n_packed_begin || s.n_begin < 0 ||
          s.n_end < s.n_begin || s.n_packed_end > s.n_end || s.n_packed_begin > s.n_begin ||
          int64_t(rows) != s.n_end - std::max(s.n_packed_end, s.n_begin)) {
        return DataLoss(fmt::format(
            "KV record: inconsistent stream counts (packed {}..{}, tokens {}..{}, tail rows {})",
            s.n_packed_begin, s.n_packed_end, s.n_begin, s.n_end, rows));
      }
      // Read rows * dim fp16 values through a counted vector.
      const uint64_t n_vals = rows * s.dim;
      if (n_vals * 2 > b.size()) return DataLoss("KV record: tail runs past the end");
      s.tail.resize(n_vals);
      rd.Raw(s.tail.data(), n_vals * 2, "tail rows");
    }
    if (!rd.ok()) return DataLoss("KV record: " + rd.error());
  }
  if (rd.pos() != b.size() - kTrailerBytes) {
    return DataLoss(fmt::format("KV record: {} unexpected bytes after the payload",
                                b.size() - kTrailerBytes - rd.pos()));
  }
  r.state = st;
  return r;
}

Status CheckMatches(const Record& r, const ModelFingerprint& model, const KvFingerprint& kv,
                    const Digest* key) {
  if (r.info.model != model.digest) {
    return FailedPrecondition(fmt::format(
        "the saved KV was computed with another model{}; this model is: {}",
        r.info.model_text.empty() ? "" : " (" + r.info.model_text + ")", model.text));
  }
  if (r.info.kv != kv.digest) {
    return FailedPrecondition(fmt::format(
        "the saved KV uses another KV configuration{}; this run uses:\n{}",
        r.info.kv_text.empty() ? "" : ":\n" + r.info.kv_text + "\n", kv.text));
  }
  if (key && r.info.key != *key) {
    return FailedPrecondition("the KV block is stored under another key");
  }
  return Status::Ok();
}

namespace {

// Checks a record's shape and counts against the cache and appends its state. `first` states
// that the cache is fresh (t0 must be 0).
Status ApplyOne(const Record& r, kv::KvCache* cache) {
  KVC_RETURN_IF_ERROR(RefuseSideTiers(*cache, "restoring into"));
  const Record::State& st = *r.state;
  auto& impl = cache->impl();
  if (st.n_layer != impl.layers.size() || st.n_head_kv != impl.layers[0].size() ||
      st.n_seg != impl.layers[0][0].segs.size()) {
    return InvalidArgument(fmt::format(
        "KV record shape n_layer={} n_head_kv={} segments={} does not match the cache ({}, {}, {})",
        st.n_layer, st.n_head_kv, st.n_seg, impl.layers.size(), impl.layers[0].size(),
        impl.layers[0][0].segs.size()));
  }
  if (cache->n_consumed() != r.info.t0) {
    return InvalidArgument(fmt::format("KV block starts at token {} but the cache holds {}",
                                       r.info.t0, cache->n_consumed()));
  }
  // Validate everything first.
  size_t hi = 0;
  for (auto& layer : impl.layers) {
    for (auto& hc : layer) {
      const auto& h = st.heads[hi++];
      int64_t n_cells = 0;
      if (st.cells_identity) {
        n_cells = r.info.t1;
        if (hc.n() != r.info.t0) return InvalidArgument("KV block applied out of order");
      } else {
        if (h.seq.size() != h.pos.size() || (!h.acc.empty() && h.acc.size() != h.seq.size()) ||
            hc.n() != 0) {
          return DataLoss("KV record: cell arrays disagree");
        }
        n_cells = int64_t(h.seq.size());
      }
      int64_t sum = 0;
      for (size_t s = 0; s < hc.segs.size(); ++s) {
        for (int kvk = 0; kvk < 2; ++kvk) {
          const kv::Stream& cs = kvk == 0 ? hc.segs[s].k : hc.segs[s].v;
          const auto& rs = h.streams[s * 2 + kvk];
          if (rs.dim != uint32_t(cs.dim)) {
            return InvalidArgument(fmt::format("KV record stream dim {} != the codec's {}", rs.dim, cs.dim));
          }
          if (cs.n_packed != rs.n_packed_begin || cs.n() != rs.n_begin) {
            return InvalidArgument("KV record does not continue the cache's streams");
          }
          const int bt = cs.block_tokens();
          if (rs.n_packed_begin % bt != 0 || rs.n_packed_end % bt != 0 ||
              rs.packed.size() != size_t((rs.n_packed_end - rs.n_packed_begin) / bt) * cs.block_bytes()) {
            return DataLoss(fmt::format(
                "KV record: {} packed bytes for tokens {}..{} do not match the codec {} ({} tokens, "
                "{} bytes per block)",
                rs.packed.size(), rs.n_packed_begin, rs.n_packed_end, cs.codec->Name(), bt,
                cs.block_bytes()));
          }
          if (!rs.mu.empty() && (!cs.center || rs.mu.size() != size_t(cs.dim_in))) {
            return DataLoss("KV record: a centring mean for a stream that is not centred");
          }
          if (kvk == 0) sum += rs.n_end;
          if (kvk == 1 && rs.n_end != h.streams[s * 2].n_end) {
            return DataLoss("KV record: K and V token counts differ");
          }
        }
      }
      if (sum != n_cells) {
        return DataLoss(fmt::format("KV record: segments hold {} tokens but the head has {} cells",
                                    sum, n_cells));
      }
      for (float v : h.acc) {
        if (!std::isfinite(v)) return DataLoss("KV record: non-finite attention statistics");
      }
      // Cells: causal clock strictly increasing below n_consumed, positions >= 0 and bounded
      // (attention indexes RoPE tables by them), a shift no larger than the clock.
      for (size_t i = 0; i < h.seq.size(); ++i) {
        if (h.seq[i] < 0 || h.seq[i] >= r.info.n_consumed || (i > 0 && h.seq[i] <= h.seq[i - 1]) ||
            h.pos[i] < 0 || h.pos[i] > (int64_t(1) << 40)) {
          return DataLoss(fmt::format("KV record: cell {} has seq {} / pos {} out of order or range",
                                      i, h.seq[i], h.pos[i]));
        }
      }
      if (h.shift < 0 || h.shift > r.info.n_consumed || h.limit_tokens < -1) {
        return DataLoss(fmt::format("KV record: RoPE shift {} / storage limit {} out of range",
                                    h.shift, h.limit_tokens));
      }
      for (const auto& rs : h.streams) {
        if (rs.limit_tokens < -1) return DataLoss("KV record: stream storage limit out of range");
        for (float v : rs.mu) {
          if (!std::isfinite(v)) return DataLoss("KV record: non-finite centring mean");
        }
      }
    }
  }
  // Then apply.
  hi = 0;
  for (auto& layer : impl.layers) {
    for (auto& hc : layer) {
      const auto& h = st.heads[hi++];
      hc.shift = h.shift;
      hc.limit_tokens = h.limit_tokens;
      if (st.cells_identity) {
        for (int64_t t = r.info.t0; t < r.info.t1; ++t) {
          hc.seq.push_back(t);
          hc.pos.push_back(t);
        }
      } else {
        hc.seq = h.seq;
        hc.pos = h.pos;
        hc.acc = h.acc;
      }
      for (size_t s = 0; s < hc.segs.size(); ++s) {
        for (int kvk = 0; kvk < 2; ++kvk) {
          kv::Stream& cs = kvk == 0 ? hc.segs[s].k : hc.segs[s].v;
          const auto& rs = h.streams[s * 2 + kvk];
          cs.limit_tokens = rs.limit_tokens;
          if (!rs.mu.empty()) cs.mu = rs.mu;
          cs.packed.insert(cs.packed.end(), rs.packed.begin(), rs.packed.end());
          // The old tail held tokens [n_packed_begin, n_begin); the first (n_packed_end -
          // n_packed_begin) of them (or all) are now packed.
          const int64_t drop = std::min(rs.n_packed_end - rs.n_packed_begin, cs.n_tail);
          cs.tail.erase(cs.tail.begin(), cs.tail.begin() + size_t(drop) * cs.dim);
          cs.tail.insert(cs.tail.end(), rs.tail.begin(), rs.tail.end());
          cs.n_packed = rs.n_packed_end;
          cs.n_tail = int64_t(cs.tail.size()) / cs.dim;
          if (cs.n() != rs.n_end) {
            return DataLoss(fmt::format("KV record: the rebuilt stream holds {} tokens, expected {}",
                                        cs.n(), rs.n_end));
          }
        }
      }
    }
  }
  cache->set_n_consumed(r.info.n_consumed);
  return Status::Ok();
}

}  // namespace

Status ApplySequence(const Record& r, kv::KvCache* cache, kv::EvictionPolicy* policy) {
  if (r.info.kind != RecordKind::kSequence) return InvalidArgument("not a sequence record");
  if (cache->n_consumed() != 0) return InvalidArgument("restore needs an empty cache");
  const std::string pname = policy ? policy->Name() : "";
  if (pname != r.info.policy_name) {
    return FailedPrecondition(fmt::format("the saved KV was made with eviction policy '{}', this run "
                                          "uses '{}'",
                                          r.info.policy_name.empty() ? "none" : r.info.policy_name,
                                          pname.empty() ? "none" : pname));
  }
  KVC_RETURN_IF_ERROR(ApplyOne(r, cache));
  if (policy) KVC_RETURN_IF_ERROR(policy->LoadState(r.state->policy_state));
  return Status::Ok();
}

Status ApplyBlocks(const std::vector<std::shared_ptr<const Record>>& blocks, kv::KvCache* cache) {
  for (const auto& b : blocks) {
    if (b->info.kind != RecordKind::kBlock) return InvalidArgument("not a block record");
    KVC_RETURN_IF_ERROR(ApplyOne(*b, cache));
  }
  return Status::Ok();
}

}  // namespace kvc::store
