#include "kv/codecs/kvquant.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <mutex>
#include <sstream>

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "cpu/kv_kernels.h"
#include "gguf/types.h"
#include "kv/cache_internal.h"
#include "kv/codecs/bitpack.h"
#include "kv/codecs/lloyd_max.h"
#include "kv/rope.h"

namespace kvc::kv {
namespace {

constexpr uint8_t kEmpty = 255;       // value slot: no channel
constexpr uint16_t kEmptyAt = 0xFFFF;  // key slot: no position

constexpr int kCalibVersion = 2;  // 2: outlier_pct, Q-Norm constants (k_qn / v_qn)

std::string T(const char* what, int layer) { return fmt::format("kvquant.{}.L{}", what, layer); }

// Per-token value range with `n_out` values removed (those farthest from the median).
// x [d]; returns lo, hi and the removed channels (ascending distance order).
void TokenRange(const float* x, int d, int n_out, float* lo, float* hi, std::vector<int>* out) {
  std::vector<float> s(x, x + d);
  std::nth_element(s.begin(), s.begin() + d / 2, s.end());
  const float med = s[d / 2];
  std::vector<int> idx(d);
  for (int i = 0; i < d; ++i) idx[i] = i;
  std::partial_sort(idx.begin(), idx.begin() + n_out, idx.end(), [&](int a, int b) {
    return std::fabs(x[a] - med) > std::fabs(x[b] - med);
  });
  out->assign(idx.begin(), idx.begin() + n_out);
  float l = INFINITY, h = -INFINITY;
  for (int i = n_out; i < d; ++i) { l = std::min(l, x[idx[i]]); h = std::max(h, x[idx[i]]); }
  if (!(l <= h)) l = h = 0.f;
  *lo = l;
  *hi = h;
}

// K / V codes of one layer's calibration: the nearest-signpost thresholds come from the k-means
// centroids `cb`; the decode table is cb·scale + shift (Q-Norm, the paper's contribution (v);
// scale 1, shift 0 when off) — the reference code rounds to the plain centroids and applies Q-Norm after.
class KvQuantCodec final : public Codec {
 public:
  KvQuantCodec(int d, int bits, int n_out, double pct, bool qnorm, bool key, std::vector<float> off,
               std::vector<float> rng, const std::vector<float>& cb, float qn_scale, float qn_shift)
      : d_(d), b_(bits), n_out_(n_out), pct_(pct), qnorm_(qnorm), key_(key), off_(std::move(off)),
        rng_(std::move(rng)) {
    for (size_t i = 0; i + 1 < cb.size(); ++i) thr_.push_back(0.5f * (cb[i] + cb[i + 1]));
    for (float c : cb) cb_.push_back(qnorm_ ? c * qn_scale + qn_shift : c);
    head_ = key_ ? 0 : 4;
    code_bytes_ = (size_t(d_) * b_ + 7) / 8;
    tokens_ = key_ ? cpu::kRopeBlockTokens : 1;
  }
  std::string Name() const override {
    return fmt::format("kvquant:bits={},outliers={:g},qnorm={}", b_, pct_, qnorm_ ? 1 : 0);
  }
  int dim() const override { return d_; }
  int block_tokens() const override { return tokens_; }
  // Keys: 16 tokens × d·b/8 code bytes + 4 per block outlier slot; values: 4 + d·b/8 + 3 per slot.
  size_t BlockBytes() const override {
    return key_ ? KeyCodeBytes() + 4 * size_t(n_out_) : head_ + code_bytes_ + 3 * size_t(n_out_);
  }
  bool wants_pre_rope_keys() const override { return key_; }

  void Encode(const float* x, uint8_t* block) override {
    if (!key_) {
      EncodeValue(x, block);
      return;
    }
    // Static per-channel thresholds, nearest signpost of the clamped normalised value; the
    // block's n_out slots go to the values with the largest clamping error |x − clamp(x)|
    // (ties: lower position first) — the rest of those beyond the thresholds are clamped.
    const int n = tokens_ * d_;
    std::vector<uint8_t> idx(n);
    std::vector<std::pair<float, int>> ex;
    for (int i = 0; i < n; ++i) {
      const int c = i % d_;
      const float u = (x[i] - off_[c]) / rng_[c];
      if (std::fabs(u) > 1.f) ex.push_back({(std::fabs(u) - 1.f) * rng_[c], i});
      idx[i] = uint8_t(NearestIndex(thr_.data(), int(thr_.size()), std::clamp(u, -1.f, 1.f)));
    }
    const size_t keep = std::min(ex.size(), size_t(n_out_));
    std::partial_sort(ex.begin(), ex.begin() + keep, ex.end(), [](const auto& a, const auto& b) {
      return a.first != b.first ? a.first > b.first : a.second < b.second;
    });
    uint8_t* o = block + KeyCodeBytes();
    for (int i = 0; i < n_out_; ++i) {
      const bool used = size_t(i) < keep;
      StoreU16(o + 4 * i, used ? uint16_t(ex[i].second) : kEmptyAt);
      StoreU16(o + 4 * i + 2, used ? Fp32ToFp16Sat(x[ex[i].second]) : 0);
    }
    for (int c = 0; c < d_; ++c) {
      uint64_t w = 0;
      for (int t = 0; t < tokens_; ++t) w |= uint64_t(idx[size_t(t) * d_ + c]) << (t * b_);
      std::memcpy(block + size_t(c) * 2 * b_, &w, size_t(2 * b_));
    }
  }

  // Scalar reference decode (the kernels are checked against it).
  void Decode(const uint8_t* block, float* x) const override {
    if (key_) {
      const uint32_t mask = (1u << b_) - 1u;
      for (int c = 0; c < d_; ++c) {
        const uint64_t w = ChannelCodes(block, c);
        for (int t = 0; t < tokens_; ++t) {
          x[size_t(t) * d_ + c] = cb_[uint32_t(w >> (t * b_)) & mask] * rng_[c] + off_[c];
        }
      }
      const uint8_t* o = block + KeyCodeBytes();
      for (int i = 0; i < n_out_; ++i) {
        const uint16_t at = LoadU16(o + 4 * i);
        if (at < tokens_ * d_) x[at] = gguf::Fp16ToFp32(LoadU16(o + 4 * i + 2));
      }
      return;
    }
    const float vo = gguf::Fp16ToFp32(LoadU16(block)), vr = gguf::Fp16ToFp32(LoadU16(block + 2));
    uint8_t idx[256];
    UnpackCodes(block + head_, d_, b_, idx);
    for (int c = 0; c < d_; ++c) x[c] = cb_[idx[c]] * vr + vo;
    PatchOutliers(block + head_ + code_bytes_, x);
  }

  // Values, many tokens: Highway codebook rows with the per-token affine map and the sparse fp16
  // outliers (cpu::CodebookAffineRows, same operations as Decode). Keys: Decode per block (the
  // prefill's tiled path; at decode keys are scored by ScoreRopeBlocks without decoding).
  void DecodeBlocks(const uint8_t* blocks, int64_t n_blocks, float* x) const override {
    if (key_) {
      Codec::DecodeBlocks(blocks, n_blocks, x);
      return;
    }
    cpu::CodebookAffineRows(blocks, n_blocks, BlockBytes(), head_, d_, b_, cb_.data(), 2, 0, nullptr,
                            nullptr, int64_t(head_ + code_bytes_), n_out_, x);
  }

  // Values at decode (fused path): decode L1-sized tiles of rows, then one f32 multi-row axpy.
  void AccumulateBlocks(const float* p, int64_t ld, int n_q, const uint8_t* blocks,
                        int64_t n_blocks, float* out) const override {
    if (key_) {
      Codec::AccumulateBlocks(p, ld, n_q, blocks, n_blocks, out);
      return;
    }
    cpu::AccumulateViaTile(p, ld, n_q, blocks, BlockBytes(), n_blocks, d_, out,
                           [&](const uint8_t* rows, int64_t m, float* tile) { DecodeBlocks(rows, m, tile); });
  }

  // Keys at decode (the cache's pre-RoPE path): tokens in lanes, RoPE on the fly, sparse outliers
  // as rotated corrections (cpu::CodebookRopeDotBlocks). Needs GGUF-order pairs (2i, 2i+1) over
  // the whole head.
  bool ScoreRopeBlocks(const float* q, int n_q, const uint8_t* blocks, int64_t n_blocks,
                       const Rope& rope, const int64_t* pos, float* out, int64_t ld) const override {
    const RopeParams& rp = rope.params();
    if (!key_ || rp.neox || rp.n_rot != d_ || rp.rot_offset != 0 || b_ > 4) return false;
    if (n_blocks <= 0) return true;
    static_assert(Rope::kLaneBlock == cpu::kRopeBlockTokens, "one block of lanes per key block");
    thread_local std::vector<float> scratch;
    const size_t bb = BlockBytes();
    const int T = tokens_;
    // Runs of blocks at consecutive positions inside the RoPE table take cos / sin by angle
    // addition from one table row per block; other blocks (gaps after eviction, positions past
    // the table) get their cos / sin written to a small scratch.
    auto consecutive = [&](int64_t k, int64_t p0) {
      for (int t = 0; t < T; ++t) {
        if (pos[k * T + t] != p0 + t) return false;
      }
      return rope.TableRow(p0 + T - 1) != nullptr;
    };
    for (int64_t k = 0; k < n_blocks;) {
      cpu::RopeTrig trig;
      const int64_t p0 = pos[k * T];
      int64_t e = k;
      while (e < n_blocks && rope.TableRow(p0 + (e - k) * T) && consecutive(e, p0 + (e - k) * T)) ++e;
      if (e > k) {
        trig.rows = rope.TableRow(p0);
        trig.offs = rope.LaneOffsets();
      } else {
        e = k + 1;
        trig.lanes = rope.LaneTrig(pos + k * T, T, &scratch);
        trig.stride = T;
      }
      cpu::CodebookRopeDotBlocks(q, n_q, blocks + size_t(k) * bb, e - k, bb, d_, b_, cb_.data(), rng_.data(),
                                 off_.data(), int64_t(KeyCodeBytes()), n_out_, trig, out + k * T, ld);
      k = e;
    }
    return true;
  }

  // Values (per-token scales), fused scoring on the codes: [q (d), Σq, q (d)]. Keys use the
  // defaults (decode, then dot), which only tests call: the cache scores pre-RoPE keys above.
  int PreparedQueryDim() const override { return key_ ? d_ : 2 * d_ + 1; }
  void PrepareQuery(const float* q, int n_q, float* qp) const override {
    if (key_) {
      Codec::PrepareQuery(q, n_q, qp);
      return;
    }
    for (int r = 0; r < n_q; ++r) {
      const float* qr = q + size_t(r) * d_;
      float* o = qp + size_t(r) * PreparedQueryDim();
      double s = 0;
      for (int c = 0; c < d_; ++c) {
        o[c] = qr[c];
        s += qr[c];
        o[d_ + 1 + c] = qr[c];
      }
      o[d_] = float(s);
    }
  }

  void Score(const float* qp, int n_q, const uint8_t* block, float* scores) const override {
    if (key_) {
      Codec::Score(qp, n_q, block, scores);
      return;
    }
    uint8_t idx[256];
    UnpackCodes(block + head_, d_, b_, idx);
    const float vo = gguf::Fp16ToFp32(LoadU16(block)), vr = gguf::Fp16ToFp32(LoadU16(block + 2));
    const uint8_t* o = block + head_ + code_bytes_;
    for (int r = 0; r < n_q; ++r) {
      const float* q = qp + size_t(r) * PreparedQueryDim();
      float acc = 0.f;
      for (int c = 0; c < d_; ++c) acc += q[c] * cb_[idx[c]];
      float s = vr * acc + vo * q[d_];
      // Sparse correction: replace the dense reconstruction of each outlier channel.
      for (int i = 0; i < n_out_; ++i) {
        const int c = o[3 * i];
        if (c == kEmpty || c >= d_) continue;
        const float dense = cb_[idx[c]] * vr + vo;
        s += q[d_ + 1 + c] * (gguf::Fp16ToFp32(LoadU16(o + 3 * i + 1)) - dense);
      }
      scores[r] = s;
    }
  }

 private:
  size_t KeyCodeBytes() const { return size_t(d_) * 2 * b_; }
  // Key block: channel c's 16 codes, token t at bits [t·b, t·b + b) (its LSB-first 2b-byte stream).
  uint64_t ChannelCodes(const uint8_t* block, int c) const {
    uint64_t w = 0;
    std::memcpy(&w, block + size_t(c) * 2 * b_, size_t(2 * b_));
    return w;
  }
  void EncodeValue(const float* x, uint8_t* block) const {
    float lo, hi;
    std::vector<int> outl;
    TokenRange(x, d_, n_out_, &lo, &hi, &outl);
    const uint16_t oh = Fp32ToFp16Sat(0.5f * (hi + lo));
    const uint16_t rh = Fp32ToFp16Sat(std::max(0.5f * (hi - lo), 1e-6f));
    StoreU16(block, oh);
    StoreU16(block + 2, rh);
    const float off = gguf::Fp16ToFp32(oh), rng = std::max(gguf::Fp16ToFp32(rh), 1e-6f);
    BitWriter bw(block + head_);
    for (int c = 0; c < d_; ++c) {
      const float u = std::clamp((x[c] - off) / rng, -1.f, 1.f);
      bw.Put(uint32_t(NearestIndex(thr_.data(), int(thr_.size()), u)), b_);
    }
    uint8_t* o = block + head_ + code_bytes_;
    for (int i = 0; i < n_out_; ++i) {
      if (i < int(outl.size())) {
        o[3 * i] = uint8_t(outl[i]);
        StoreU16(o + 3 * i + 1, Fp32ToFp16Sat(x[outl[i]]));
      } else {
        o[3 * i] = kEmpty;
        StoreU16(o + 3 * i + 1, 0);
      }
    }
  }
  // slots [n_out × {u8 channel, fp16 value}] of one token -> x [d]
  void PatchOutliers(const uint8_t* o, float* x) const {
    for (int i = 0; i < n_out_; ++i) {
      if (o[3 * i] != kEmpty && o[3 * i] < d_) x[o[3 * i]] = gguf::Fp16ToFp32(LoadU16(o + 3 * i + 1));
    }
  }
  int d_, b_, n_out_;  // n_out_: slots per key block (16 tokens) or per value vector
  double pct_;         // the spec's outlier percentage (for Name())
  bool qnorm_;
  bool key_;
  std::vector<float> off_, rng_;  // [d] keys only
  std::vector<float> cb_, thr_;   // [2^b] decode table (Q-Norm applied), [2^b − 1] from the raw centroids
  int head_;
  size_t code_bytes_;
  int tokens_;                    // block_tokens: 16 (keys, channel-major codes) or 1 (values)
};

// Calibration files are loaded once per path and shared (the codec keeps copies of its slice).
StatusOr<std::shared_ptr<const CalibrationData>> LoadCached(const std::string& path) {
  static std::mutex mu;
  static std::map<std::string, std::shared_ptr<const CalibrationData>> cache;
  std::lock_guard<std::mutex> lock(mu);
  auto it = cache.find(path);
  if (it != cache.end()) return it->second;
  auto c = LoadCalibrationJson(path);
  if (!c.ok()) return c.status();
  auto p = std::make_shared<const CalibrationData>(std::move(c).value());
  cache[path] = p;
  return p;
}

bool ShapeMatches(const CalibrationData& c, const CodecContext& ctx) {
  auto it = c.tensors.find("kvquant.shape");
  return it != c.tensors.end() && it->second.size() == 3 && int(it->second[0]) == ctx.n_layer &&
         int(it->second[1]) == ctx.n_head_kv && int(it->second[2]) == ctx.dim;
}

StatusOr<std::shared_ptr<const CalibrationData>> FindCalibration(const std::string& param,
                                                                 const CodecContext& ctx) {
  std::string path = param;
  if (path.empty()) {
    if (const char* e = std::getenv("KVC_KVQUANT_CALIB")) path = e;
  }
  if (path.empty()) {
    std::error_code ec;
    std::vector<std::string> hits;
    for (const char* dir : {"models", "../models", "../../models"}) {
      for (auto& ent : std::filesystem::directory_iterator(dir, ec)) {
        const std::string p = ent.path().string();
        if (p.ends_with(".kvquant.json")) {
          auto c = LoadCached(p);
          if (c.ok() && ShapeMatches(**c, ctx)) hits.push_back(p);
        }
      }
      if (!hits.empty()) break;
    }
    if (hits.size() > 1) {
      return InvalidArgument(fmt::format(
          "kvquant: several calibration files match this model's shape ({} and {}); pick one "
          "with kvquant:calib=PATH", hits[0], hits[1]));
    }
    if (hits.empty()) {
      return NotFound(
          "kvquant needs a calibration file (per-channel key thresholds, codebooks) and none "
          "was found: create models/<model>.kvquant.json with the model test "
          "`kvc_model_tests --gtest_filter=KvQuantModel.*` (calibrates on PG-19, disjoint from "
          "the WikiText eval text), or pass kvquant:calib=PATH / env KVC_KVQUANT_CALIB");
    }
    path = hits[0];
  }
  auto c = LoadCached(path);
  if (!c.ok()) return c.status();
  if (!ShapeMatches(**c, ctx)) {
    return InvalidArgument(fmt::format(
        "kvquant: calibration file {} was made for a different shape (need n_layer {} n_head_kv "
        "{} head_dim {})", path, ctx.n_layer, ctx.n_head_kv, ctx.dim));
  }
  return c;
}

}  // namespace

StatusOr<std::unique_ptr<Codec>> MakeKvQuantCodec(const CodecSpec& spec, const CodecContext& ctx) {
  auto bits = spec.GetInt("bits", 3);
  auto pct = spec.GetDouble("outliers", -1.0);  // −1: the calibration's percentage
  auto calib = spec.GetString("calib", "");
  for (const Status& s : {bits.status(), pct.status(), calib.status()}) KVC_RETURN_IF_ERROR(s);
  if (*bits < 2 || *bits > 4) return InvalidArgument(fmt::format("kvquant: bits={} must be 2, 3 or 4", *bits));
  // The paper applies Q-Norm at 2 bits; on SmolLM2 it helped at every width (-c 4096: 4-bit
  // +1.46 → +0.96 %, 3-bit +6.04 → +4.89 %, 2-bit +39.8 → +34.6 %), so it is on by default.
  auto qnorm = spec.GetBool("qnorm", true);
  KVC_RETURN_IF_ERROR(qnorm.status());
  KVC_RETURN_IF_ERROR(spec.CheckAllUsed());
  if (*pct != -1.0 && !(*pct >= 0.0 && *pct <= 10.0)) {
    return InvalidArgument(fmt::format("kvquant: outliers={} is a percentage of values in [0, 10]", *pct));
  }
  if (ctx.dim > 255 || ctx.dim < 8) {
    return Unimplemented(fmt::format("kvquant needs 8 <= dim <= 255, got {}", ctx.dim));
  }
  std::shared_ptr<const CalibrationData> owned;
  const CalibrationData* cd = nullptr;
  if (ctx.calib && ctx.calib->tensors.count("kvquant.shape")) {
    cd = ctx.calib;
  } else {
    auto f = FindCalibration(*calib, ctx);
    if (!f.ok()) return f.status();
    owned = *f;
    cd = owned.get();
  }
  if (!IsCurrentKvQuantCalibration(*cd)) {
    return FailedPrecondition(fmt::format(
        "kvquant: calibration ({}) is not format {} (the per-channel thresholds at a recorded "
        "outlier percentage and the Q-Norm constants are missing); delete the file so `kvcrunch "
        "eval` recreates it, or recalibrate with the model test KvQuantModel.*", cd->source,
        kCalibVersion));
  }
  auto get = [&](const std::string& n, size_t want) -> StatusOr<const std::vector<float>*> {
    auto it = cd->tensors.find(n);
    if (it == cd->tensors.end() || it->second.size() != want) {
      return NotFound(fmt::format("kvquant calibration lacks {} [{}]", n, want));
    }
    for (float v : it->second) {
      if (!std::isfinite(v)) return InvalidArgument(fmt::format("kvquant calibration: {} holds {}", n, v));
    }
    return &it->second;
  };
  const bool key = ctx.kind == KvKind::kKey;
  const char* kv = key ? "k" : "v";
  auto cal_pct = get("kvquant.outlier_pct", 1);
  if (!cal_pct.ok()) return cal_pct.status();
  const double p = *pct == -1.0 ? double((**cal_pct)[0]) : *pct;
  // Slots: keys per 16-token block (round(p% of 16·d): 10 at 1 %, d 64), values per vector
  // (round(p% of d): 1 at 1 %, d 64 — 1.56 %, the smallest non-zero per-vector budget).
  const int n_out = key ? int(std::lround(p / 100.0 * cpu::kRopeBlockTokens * ctx.dim))
                        : int(std::lround(p / 100.0 * ctx.dim));
  if (!key && n_out > ctx.dim / 4) {
    return InvalidArgument(fmt::format("kvquant: outliers={} leaves too few values per vector", p));
  }
  auto cb = get(T(fmt::format("{}_cb{}", kv, *bits).c_str(), ctx.layer), 1u << *bits);
  if (!cb.ok()) return cb.status();
  for (size_t i = 0; i + 1 < (*cb)->size(); ++i) {
    if (!((**cb)[i] <= (**cb)[i + 1])) {
      return InvalidArgument(fmt::format("kvquant calibration: codebook {}_cb{} of layer {} is not ascending",
                                         kv, *bits, ctx.layer));
    }
  }
  float qs = 1.f, qo = 0.f;
  if (*qnorm) {
    auto qn = get(T(fmt::format("{}_qn{}", kv, *bits).c_str(), ctx.layer), 2);
    if (!qn.ok()) return qn.status();
    qs = (**qn)[0];
    qo = (**qn)[1];
    if (!(qs > 0.f)) return InvalidArgument(fmt::format("kvquant calibration: Q-Norm scale {} <= 0", qs));
  }
  std::vector<float> off, rng;
  if (key) {
    const size_t n = size_t(ctx.n_head_kv) * ctx.dim;
    auto lo = get(T("k_lo", ctx.layer), n), hi = get(T("k_hi", ctx.layer), n);
    if (!lo.ok()) return lo.status();
    if (!hi.ok()) return hi.status();
    for (int c = 0; c < ctx.dim; ++c) {
      const float l = (**lo)[size_t(ctx.head) * ctx.dim + c], h = (**hi)[size_t(ctx.head) * ctx.dim + c];
      if (!(l <= h)) {
        return InvalidArgument(fmt::format("kvquant calibration: layer {} head {} channel {}: lo {} > hi {}",
                                           ctx.layer, ctx.head, c, l, h));
      }
      off.push_back(0.5f * (h + l));
      rng.push_back(std::max(0.5f * (h - l), 1e-6f));
    }
  }
  return std::unique_ptr<Codec>(new KvQuantCodec(ctx.dim, *bits, n_out, p, *qnorm, key, std::move(off),
                                                 std::move(rng), **cb, qs, qo));
}

namespace {
// Q-Norm (KVQuant contribution (v)): on the normalised, non-outlier calibration values u, the affine map
// (scale, shift) that gives the dequantised values cb[nearest(u)] the mean and standard deviation
// of u: scale = σ_u / σ_q, shift = μ_u − μ_q · scale.
std::vector<float> QNorm(const std::vector<float>& u, const std::vector<float>& cb) {
  std::vector<float> thr;
  for (size_t i = 0; i + 1 < cb.size(); ++i) thr.push_back(0.5f * (cb[i] + cb[i + 1]));
  double s1 = 0, s2 = 0, q1 = 0, q2 = 0;
  for (float x : u) {
    const double q = cb[NearestIndex(thr.data(), int(thr.size()), x)];
    s1 += x;
    s2 += double(x) * x;
    q1 += q;
    q2 += q * q;
  }
  const double n = double(std::max<size_t>(u.size(), 1));
  const double mu = s1 / n, mq = q1 / n;
  const double sd_u = std::sqrt(std::max(0.0, s2 / n - mu * mu));
  const double sd_q = std::sqrt(std::max(0.0, q2 / n - mq * mq));
  const double scale = sd_q > 0 && sd_u > 0 ? sd_u / sd_q : 1.0;
  return {float(scale), float(mu - mq * scale)};
}
}  // namespace

bool IsCurrentKvQuantCalibration(const CalibrationData& c) {
  auto it = c.tensors.find("kvquant.version");
  return it != c.tensors.end() && it->second.size() == 1 && it->second[0] == float(kCalibVersion);
}

StatusOr<CalibrationData> CalibrateKvQuant(const KvQuantSamples& s, double outlier_pct) {
  if (s.n_layer <= 0 || s.n_head_kv <= 0 || s.head_dim <= 0 || int(s.k.size()) != s.n_layer ||
      int(s.v.size()) != s.n_layer) {
    return InvalidArgument("CalibrateKvQuant: bad sample shape");
  }
  if (!(outlier_pct >= 0.0 && outlier_pct <= 10.0)) {
    return InvalidArgument(fmt::format("CalibrateKvQuant: outlier percentage {} not in [0, 10]", outlier_pct));
  }
  const int nh = s.n_head_kv, d = s.head_dim, w = nh * d;
  const double lo_pct = outlier_pct / 2.0;                           // per side
  const int n_out = int(std::lround(outlier_pct / 100.0 * d));        // value slots per vector
  if (n_out > d / 4) return InvalidArgument("CalibrateKvQuant: outlier percentage too large for head_dim");
  CalibrationData out;
  out.source = s.source;
  out.tensors["kvquant.shape"] = {float(s.n_layer), float(nh), float(d)};
  out.tensors["kvquant.version"] = {float(kCalibVersion)};
  out.tensors["kvquant.outlier_pct"] = {float(outlier_pct)};
  constexpr size_t kMaxSamples = 400000;
  for (int l = 0; l < s.n_layer; ++l) {
    const auto& K = s.k[l];
    const auto& V = s.v[l];
    const size_t n_tok = K.size() / w;
    if (n_tok < 16 || K.size() != n_tok * w || V.size() != n_tok * w) {
      return InvalidArgument(fmt::format("CalibrateKvQuant: layer {} needs >= 16 tokens", l));
    }
    for (const auto* a : {&K, &V}) {
      for (size_t i = 0; i < a->size(); ++i) {
        if (!std::isfinite((*a)[i])) {
          return InvalidArgument(fmt::format("CalibrateKvQuant: layer {} {} sample {} is {}", l,
                                             a == &K ? "key" : "value", i, (*a)[i]));
        }
      }
    }
    std::vector<float> lo(w), hi(w), col(n_tok);
    for (int c = 0; c < w; ++c) {
      for (size_t t = 0; t < n_tok; ++t) col[t] = K[t * w + c];
      const size_t il = size_t(lo_pct / 100.0 * (n_tok - 1));
      const size_t ih = n_tok - 1 - il;
      std::nth_element(col.begin(), col.begin() + il, col.end());
      lo[c] = col[il];
      std::nth_element(col.begin(), col.begin() + ih, col.end());
      hi[c] = col[ih];
    }
    // Normalised non-outlier samples (strided subsample) for the k-means.
    std::vector<float> ks, vs;
    const size_t stride = std::max<size_t>(1, n_tok * w / kMaxSamples);
    for (size_t i = 0; i < n_tok * w; i += stride) {
      const int c = int(i % w);
      const float off = 0.5f * (hi[c] + lo[c]), rng = std::max(0.5f * (hi[c] - lo[c]), 1e-6f);
      const float u = (K[i] - off) / rng;
      if (std::fabs(u) <= 1.f) ks.push_back(u);
    }
    const size_t tstride = std::max<size_t>(1, n_tok * nh / (kMaxSamples / d));
    std::vector<int> outl;
    for (size_t th = 0; th < n_tok * nh; th += tstride) {
      const float* x = &V[th * d];
      float vl, vh;
      TokenRange(x, d, n_out, &vl, &vh, &outl);
      const float off = 0.5f * (vh + vl), rng = std::max(0.5f * (vh - vl), 1e-6f);
      for (int c = 0; c < d; ++c) {
        if (std::find(outl.begin(), outl.end(), c) == outl.end()) vs.push_back((x[c] - off) / rng);
      }
    }
    out.tensors[T("k_lo", l)] = lo;
    out.tensors[T("k_hi", l)] = hi;
    for (int b = 2; b <= 4; ++b) {
      auto kc = KMeans1D(ks, 1 << b, 100), vc = KMeans1D(vs, 1 << b, 100);
      out.tensors[T(fmt::format("k_qn{}", b).c_str(), l)] = QNorm(ks, kc);
      out.tensors[T(fmt::format("v_qn{}", b).c_str(), l)] = QNorm(vs, vc);
      out.tensors[T(fmt::format("k_cb{}", b).c_str(), l)] = std::move(kc);
      out.tensors[T(fmt::format("v_cb{}", b).c_str(), l)] = std::move(vc);
    }
  }
  return out;
}

Status SaveCalibrationJson(const CalibrationData& c, const std::string& path) {
  nlohmann::json j;
  j["source"] = c.source;
  j["tensors"] = nlohmann::json::object();
  for (const auto& [k, v] : c.tensors) j["tensors"][k] = v;
  const std::string tmp = path + ".tmp";
  {
    std::ofstream f(tmp, std::ios::binary | std::ios::trunc);
    if (!f) return InvalidArgument(fmt::format("cannot write {}", tmp));
    f << j.dump();
    if (!f.good()) return InvalidArgument(fmt::format("write failed: {}", tmp));
  }
  std::error_code ec;
  std::filesystem::rename(tmp, path, ec);
  if (ec) return InvalidArgument(fmt::format("cannot rename {} -> {}: {}", tmp, path, ec.message()));
  return Status::Ok();
}

StatusOr<CalibrationData> LoadCalibrationJson(const std::string& path) {
  std::error_code ec;
  if (std::filesystem::is_directory(path, ec)) {
    return InvalidArgument(fmt::format("calibration file {} is a directory", path));
  }
  std::ifstream f(path, std::ios::binary);
  if (!f) return NotFound(fmt::format("calibration file {} not found", path));
  const std::string text((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
  return ParseCalibrationJson(text, path);
}

StatusOr<CalibrationData> ParseCalibrationJson(const std::string& text, const std::string& path) {
  CalibrationData c;
  try {
    nlohmann::json j = nlohmann::json::parse(text);
    c.source = j.value("source", path);
    for (auto& [k, v] : j.at("tensors").items()) c.tensors[k] = v.get<std::vector<float>>();
  } catch (const std::exception& e) {
    return InvalidArgument(fmt::format("calibration file {} is not valid: {}", path, e.what()));
  }
  return c;
}

}  // namespace kvc::kv
