#include "kv/codecs/kvquant.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
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

namespace kvc::kv {
namespace {

constexpr uint8_t kEmpty = 255;

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

class KvQuantCodec final : public Codec {
 public:
  KvQuantCodec(int d, int bits, int n_out, bool key, std::vector<float> off, std::vector<float> rng,
               std::vector<float> cb)
      : d_(d), b_(bits), n_out_(n_out), key_(key), off_(std::move(off)), rng_(std::move(rng)),
        cb_(std::move(cb)) {
    for (size_t i = 0; i + 1 < cb_.size(); ++i) thr_.push_back(0.5f * (cb_[i] + cb_[i + 1]));
    head_ = key_ ? 0 : 4;
    code_bytes_ = (size_t(d_) * b_ + 7) / 8;
  }
  std::string Name() const override {
    return fmt::format("kvquant:bits={},outliers={}", b_, n_out_);
  }
  int dim() const override { return d_; }
  size_t BlockBytes() const override { return head_ + code_bytes_ + 3 * size_t(n_out_); }
  bool wants_pre_rope_keys() const override { return key_; }

  void Encode(const float* x, uint8_t* block) override {
    std::vector<float> off(d_), rng(d_);
    std::vector<int> outl;
    if (key_) {
      off = off_;
      rng = rng_;
      // Slots go to the values farthest outside [lo, hi] (normalised units).
      std::vector<std::pair<float, int>> ex;
      for (int c = 0; c < d_; ++c) {
        const float u = std::fabs((x[c] - off[c]) / rng[c]);
        if (u > 1.f) ex.push_back({u, c});
      }
      std::sort(ex.begin(), ex.end(), [](auto& a, auto& b) { return a.first > b.first; });
      for (int i = 0; i < n_out_ && i < int(ex.size()); ++i) outl.push_back(ex[i].second);
    } else {
      float lo, hi;
      TokenRange(x, d_, n_out_, &lo, &hi, &outl);
      const uint16_t oh = Fp32ToFp16Sat(0.5f * (hi + lo));
      const uint16_t rh = Fp32ToFp16Sat(std::max(0.5f * (hi - lo), 1e-6f));
      StoreU16(block, oh);
      StoreU16(block + 2, rh);
      std::fill(off.begin(), off.end(), gguf::Fp16ToFp32(oh));
      std::fill(rng.begin(), rng.end(), std::max(gguf::Fp16ToFp32(rh), 1e-6f));
    }
    BitWriter bw(block + head_);
    for (int c = 0; c < d_; ++c) {
      const float u = std::clamp((x[c] - off[c]) / rng[c], -1.f, 1.f);
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

  // Scalar reference decode (the kernel below is checked against it bit for bit).
  void Decode(const uint8_t* block, float* x) const override {
    float vo = 0, vr = 1;
    if (!key_) {
      vo = gguf::Fp16ToFp32(LoadU16(block));
      vr = gguf::Fp16ToFp32(LoadU16(block + 2));
    }
    uint8_t idx[256];
    UnpackCodes(block + head_, d_, b_, idx);
    for (int c = 0; c < d_; ++c) {
      // The same products as u·rng + off (keys, per channel) / u·rng + off (values, per token).
      x[c] = key_ ? cb_[idx[c]] * rng_[c] + off_[c] : cb_[idx[c]] * vr + vo;
    }
    PatchOutliers(block, x);
  }

  // Many tokens: Highway codebook rows with the per-channel (keys) or per-token (values) affine
  // map and the sparse fp16 outliers (cpu::CodebookAffineRows, same operations as Decode).
  void DecodeBlocks(const uint8_t* blocks, int64_t n_blocks, float* x) const override {
    const int64_t sparse = int64_t(head_ + code_bytes_);
    if (key_) {
      cpu::CodebookAffineRows(blocks, n_blocks, BlockBytes(), head_, d_, b_, cb_.data(), -1, -1,
                              rng_.data(), off_.data(), sparse, n_out_, x);
    } else {
      cpu::CodebookAffineRows(blocks, n_blocks, BlockBytes(), head_, d_, b_, cb_.data(), 2, 0,
                              nullptr, nullptr, sparse, n_out_, x);
    }
  }

  // Values at decode (fused path): decode L1-sized tiles of rows, then one f32 multi-row axpy.
  void AccumulateBlocks(const float* p, int64_t ld, int n_q, const uint8_t* blocks,
                        int64_t n_blocks, float* out) const override {
    cpu::AccumulateViaTile(p, ld, n_q, blocks, BlockBytes(), n_blocks, d_, out,
                           [&](const uint8_t* rows, int64_t m, float* tile) { DecodeBlocks(rows, m, tile); });
  }

  // Keys pre-RoPE are scored by the cache on decoded, rotated chunks; for values (and tests) the
  // per-block scorer below works on the codes directly.
  // Keys: [q∘rng (d), q·off, q (d)]; values (per-token scales): [q (d), Σq, q (d)].
  int PreparedQueryDim() const override { return 2 * d_ + 1; }
  void PrepareQuery(const float* q, int n_q, float* qp) const override {
    for (int r = 0; r < n_q; ++r) {
      const float* qr = q + size_t(r) * d_;
      float* o = qp + size_t(r) * PreparedQueryDim();
      double s = 0;
      for (int c = 0; c < d_; ++c) {
        o[c] = key_ ? qr[c] * rng_[c] : qr[c];
        s += key_ ? double(qr[c]) * off_[c] : qr[c];
        o[d_ + 1 + c] = qr[c];
      }
      o[d_] = float(s);
    }
  }

  void Score(const float* qp, int n_q, const uint8_t* block, float* scores) const override {
    uint8_t idx[256];
    UnpackCodes(block + head_, d_, b_, idx);
    float vo = 0, vr = 1;
    if (!key_) {
      vo = gguf::Fp16ToFp32(LoadU16(block));
      vr = gguf::Fp16ToFp32(LoadU16(block + 2));
    }
    const uint8_t* o = block + head_ + code_bytes_;
    for (int r = 0; r < n_q; ++r) {
      const float* q = qp + size_t(r) * PreparedQueryDim();
      float acc = 0.f;
      for (int c = 0; c < d_; ++c) acc += q[c] * cb_[idx[c]];
      float s = key_ ? acc + q[d_] : vr * acc + vo * q[d_];
      // Sparse correction: replace the dense reconstruction of each outlier channel.
      for (int i = 0; i < n_out_; ++i) {
        const int c = o[3 * i];
        if (c == kEmpty || c >= d_) continue;
        const float dense = key_ ? cb_[idx[c]] * rng_[c] + off_[c] : cb_[idx[c]] * vr + vo;
        s += q[d_ + 1 + c] * (gguf::Fp16ToFp32(LoadU16(o + 3 * i + 1)) - dense);
      }
      scores[r] = s;
    }
  }

 private:
  void PatchOutliers(const uint8_t* block, float* x) const {
    const uint8_t* o = block + head_ + code_bytes_;
    for (int i = 0; i < n_out_; ++i) {
      if (o[3 * i] != kEmpty && o[3 * i] < d_) x[o[3 * i]] = gguf::Fp16ToFp32(LoadU16(o + 3 * i + 1));
    }
  }
  int d_, b_, n_out_;
  bool key_;
  std::vector<float> off_, rng_;  // [d] keys only
  std::vector<float> cb_, thr_;   // [2^b], [2^b − 1]
  int head_;
  size_t code_bytes_;
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
  auto n_out = spec.GetInt("outliers", 1);
  auto calib = spec.GetString("calib", "");
  for (const Status& s : {bits.status(), n_out.status(), calib.status()}) KVC_RETURN_IF_ERROR(s);
  KVC_RETURN_IF_ERROR(spec.CheckAllUsed());
  if (*bits < 2 || *bits > 4) return InvalidArgument(fmt::format("kvquant: bits={} must be 2, 3 or 4", *bits));
  if (*n_out < 0 || *n_out > 8) return InvalidArgument("kvquant: outliers must be in [0, 8]");
  if (ctx.dim > 255 || ctx.dim < 2 * *n_out + 2) {
    return Unimplemented(fmt::format("kvquant needs 2·outliers+2 <= dim <= 255, got {}", ctx.dim));
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
  auto get = [&](const std::string& n, size_t want) -> StatusOr<const std::vector<float>*> {
    auto it = cd->tensors.find(n);
    if (it == cd->tensors.end() || it->second.size() != want) {
      return NotFound(fmt::format("kvquant calibration lacks {} [{}]", n, want));
    }
    return &it->second;
  };
  const bool key = ctx.kind == KvKind::kKey;
  auto cb = get(T(fmt::format("{}_cb{}", key ? "k" : "v", *bits).c_str(), ctx.layer), 1u << *bits);
  if (!cb.ok()) return cb.status();
  std::vector<float> off, rng;
  if (key) {
    const size_t n = size_t(ctx.n_head_kv) * ctx.dim;
    auto lo = get(T("k_lo", ctx.layer), n), hi = get(T("k_hi", ctx.layer), n);
    if (!lo.ok()) return lo.status();
    if (!hi.ok()) return hi.status();
    for (int c = 0; c < ctx.dim; ++c) {
      const float l = (**lo)[size_t(ctx.head) * ctx.dim + c], h = (**hi)[size_t(ctx.head) * ctx.dim + c];
      off.push_back(0.5f * (h + l));
      rng.push_back(std::max(0.5f * (h - l), 1e-6f));
    }
  }
  return std::unique_ptr<Codec>(
      new KvQuantCodec(ctx.dim, *bits, *n_out, key, std::move(off), std::move(rng), **cb));
}

StatusOr<CalibrationData> CalibrateKvQuant(const KvQuantSamples& s, double lo_pct, int n_out) {
  if (s.n_layer <= 0 || s.n_head_kv <= 0 || s.head_dim <= 0 || int(s.k.size()) != s.n_layer ||
      int(s.v.size()) != s.n_layer) {
    return InvalidArgument("CalibrateKvQuant: bad sample shape");
  }
  const int nh = s.n_head_kv, d = s.head_dim, w = nh * d;
  CalibrationData out;
  out.source = s.source;
  out.tensors["kvquant.shape"] = {float(s.n_layer), float(nh), float(d)};
  constexpr size_t kMaxSamples = 400000;
  for (int l = 0; l < s.n_layer; ++l) {
    const auto& K = s.k[l];
    const auto& V = s.v[l];
    const size_t n_tok = K.size() / w;
    if (n_tok < 16 || K.size() != n_tok * w || V.size() != n_tok * w) {
      return InvalidArgument(fmt::format("CalibrateKvQuant: layer {} needs >= 16 tokens", l));
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
      out.tensors[T(fmt::format("k_cb{}", b).c_str(), l)] = KMeans1D(ks, 1 << b, 100);
      out.tensors[T(fmt::format("v_cb{}", b).c_str(), l)] = KMeans1D(vs, 1 << b, 100);
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
  CalibrationData c;
  try {
    nlohmann::json j = nlohmann::json::parse(f);
    c.source = j.value("source", path);
    for (auto& [k, v] : j.at("tensors").items()) c.tensors[k] = v.get<std::vector<float>>();
  } catch (const std::exception& e) {
    return InvalidArgument(fmt::format("calibration file {} is not valid: {}", path, e.what()));
  }
  return c;
}

}  // namespace kvc::kv
