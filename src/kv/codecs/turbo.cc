#include "kv/codecs/turbo.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <numeric>

#include <fmt/format.h>

#include "cpu/kv_kernels.h"
#include "gguf/types.h"
#include "kv/cache_internal.h"
#include "kv/codecs/bitpack.h"
#include "kv/codecs/lloyd_max.h"
#include "kv/codecs/q8_0.h"
#include "kv/transforms/random_rotation.h"

namespace kvc::kv {
namespace {

// E|u_1| for u uniform on S^{d−1}: Γ(d/2) / (√π Γ((d+1)/2)).
double MeanAbsCoord(int d) {
  return std::exp(std::lgamma(0.5 * d) - std::lgamma(0.5 * (d + 1))) / std::sqrt(M_PI);
}

struct Part {
  std::vector<int> ch;            // [n] channels of the original vector
  int n = 0;
  int bm = 0;                     // mse bits (0: prod with 1 total bit -> no mse codes)
  bool prod = false;
  RandomRotation rot;             // Π [n, n]
  std::vector<float> s;           // prod: S [n, n] Haar-orthogonal rows (unit norm)
  std::vector<float> cb, thr;     // [2^bm], [2^bm - 1]
  float kappa = 0;                // QJL constant 1/(n·E|u_1|)
  int header = 0;                 // bytes: 2 (γ) + 2 (ρ, prod)
};

class TurboCodec final : public Codec {
 public:
  // split > 0: two parts (split channels at ceil(bits), the rest at floor(bits)); 0: one part.
  TurboCodec(int d, double bits, bool prod, bool nc, int split, uint64_t seed, std::string name)
      : d_(d), prod_(prod), nc_(nc), name_(std::move(name)) {
    const int lo = int(std::floor(bits)), hi = int(std::ceil(bits));
    std::vector<int> sizes, pbits;
    if (split == 0) { sizes = {d}; pbits = {lo}; }
    else { sizes = {split, d - split}; pbits = {hi, lo}; }
    for (size_t p = 0; p < sizes.size(); ++p) {
      Part pt;
      pt.n = sizes[p];
      pt.prod = prod;
      pt.bm = prod ? pbits[p] - 1 : pbits[p];
      pt.rot = RandomRotation(pt.n, seed ^ (0x1234567ull * (p + 1)));
      if (prod) {
        pt.s = RandomOrthogonalRows(pt.n, pt.n, seed ^ (0xABCDEF01ull * (p + 3)));
        pt.kappa = float(1.0 / (pt.n * MeanAbsCoord(pt.n)));
      }
      if (pt.bm > 0) {
        const auto& lm = SphereCodebook(pt.n, pt.bm);
        pt.cb = lm.centroids;
        pt.thr = lm.thresholds;
      }
      pt.header = prod ? 4 : 2;
      parts_.push_back(std::move(pt));
    }
    // Default split until the first Encode freezes one: leading channels.
    std::vector<int> all(d);
    std::iota(all.begin(), all.end(), 0);
    AssignChannels(all);
    size_t bitsum = 0;
    for (const auto& pt : parts_) {
      header_ += pt.header;
      bitsum += size_t(pt.n) * (pt.bm + (pt.prod ? 1 : 0));
    }
    bytes_ = header_ + (bitsum + 7) / 8;
    frozen_ = parts_.size() == 1;
    // SIMD path: mse parts only (prod keeps the scalar sign loop), codes of every part starting on
    // a byte boundary (d = 64 and the default splits always do).
    fast_ = true;
    size_t bit = 0;
    for (const auto& pt : parts_) {
      fast_ = fast_ && !pt.prod && pt.bm >= 1 && pt.bm <= 8 && bit % 8 == 0;
      narrow_ = narrow_ && pt.bm <= 4;
      bit += size_t(pt.n) * pt.bm;
    }
  }

  std::string Name() const override { return name_; }
  int dim() const override { return d_; }
  size_t BlockBytes() const override { return bytes_; }
  int PreparedQueryDim() const override {
    int s = 0;
    for (const auto& pt : parts_) s += pt.n * (pt.prod ? 2 : 1);
    return s;
  }

  void Encode(const float* x, uint8_t* block) override {
    if (!frozen_) FreezeSplit(x);
    BitWriter bw(block + header_);
    int hoff = 0;
    std::vector<float> xp(d_), y(d_), r(d_), sr(d_);
    for (const auto& pt : parts_) {
      const int n = pt.n;
      double g2 = 0;
      for (int j = 0; j < n; ++j) { xp[j] = x[pt.ch[j]]; g2 += double(xp[j]) * xp[j]; }
      const float gamma = float(std::sqrt(g2));
      pt.rot.Apply(xp.data(), y.data());
      const float inv = gamma > 0 ? 1.0f / gamma : 0.f;
      double yh2 = 0, r2 = 0;
      for (int j = 0; j < n; ++j) {
        y[j] *= inv;
        float yh = 0.f;
        if (pt.bm > 0) {
          const int idx = NearestIndex(pt.thr.data(), int(pt.thr.size()), y[j]);
          bw.Put(uint32_t(idx), pt.bm);
          yh = pt.cb[idx];
        }
        yh2 += double(yh) * yh;
        r[j] = y[j] - yh;
        r2 += double(r[j]) * r[j];
      }
      float gs = gamma;
      if (nc_ && !pt.prod && yh2 > 0) gs = float(gamma / std::sqrt(yh2));
      StoreU16(block + hoff, Fp32ToFp16Sat(gs));
      if (pt.prod) {
        StoreU16(block + hoff + 2, Fp32ToFp16Sat(float(gamma * std::sqrt(r2))));
        for (int i = 0; i < n; ++i) {
          const float* srow = &pt.s[size_t(i) * n];
          float acc = 0.f;
          for (int j = 0; j < n; ++j) acc += srow[j] * r[j];
          bw.Put(acc >= 0.f ? 1u : 0u, 1);
        }
      }
      hoff += pt.header;
    }
  }

  // Rotated-domain reconstruction of part p: yhat [n] = γ c[idx] + ρ κ Sᵀ z.
  void DecodeRotated(const Part& pt, const uint8_t* h, BitReader& br, float* yh) const {
    const int n = pt.n;
    const float g = gguf::Fp16ToFp32(LoadU16(h));
    for (int j = 0; j < n; ++j) yh[j] = pt.bm > 0 ? g * pt.cb[br.Get(pt.bm)] : 0.f;
    if (pt.prod) {
      const float rk = gguf::Fp16ToFp32(LoadU16(h + 2)) * pt.kappa;
      for (int i = 0; i < n; ++i) {
        const float sg = br.Get(1) ? rk : -rk;
        const float* srow = &pt.s[size_t(i) * n];
        for (int j = 0; j < n; ++j) yh[j] += sg * srow[j];
      }
    }
  }

  // Rotated-domain reconstruction of one token, all parts concatenated in PreparedQuery order:
  // y [d] = (γ_0 c_0[idx], γ_1 c_1[idx]) (mse parts only). Reads up to 3 bytes past the block.
  void DecodeRotatedFast(const uint8_t* block, float* y) const {
    size_t bit = 0;
    int hoff = 0, off = 0;
    for (const auto& pt : parts_) {
      const float g = gguf::Fp16ToFp32(LoadU16(block + hoff));
      cpu::CodebookRow(block + header_ + bit / 8, pt.n, pt.bm, pt.cb.data(), g, y + off);
      bit += size_t(pt.n) * pt.bm;
      hoff += pt.header;
      off += pt.n;
    }
  }
  // m consecutive tokens -> y [m, d] rotated; the last token of the array goes through a padded copy.
  void DecodeRotatedRows(const uint8_t* rows, int64_t m, const uint8_t* end, float* y) const {
    if (narrow_) {  // codes of <= 4 bits: many-row kernel, reads nothing past a row's last code byte
      size_t bit = 0;
      int hoff = 0, off = 0;
      for (const auto& pt : parts_) {
        cpu::CodebookRows(rows, m, bytes_, header_ + bit / 8, hoff, pt.n, pt.bm, pt.cb.data(), y + off, d_);
        bit += size_t(pt.n) * pt.bm;
        hoff += pt.header;
        off += pt.n;
      }
      return;
    }
    for (int64_t t = 0; t < m; ++t) {
      const uint8_t* row = rows + size_t(t) * bytes_;
      if (row + bytes_ + 3 > end) {
        uint8_t pad[1024 + 8] = {};
        std::memcpy(pad, row, bytes_);
        DecodeRotatedFast(pad, y + size_t(t) * d_);
      } else {
        DecodeRotatedFast(row, y + size_t(t) * d_);
      }
    }
  }

  // Many tokens (decode attention), mse variants: keys are scored in the rotated domain against the
  // pre-rotated query (SIMD codebook decode into an f32 tile, SIMD dot); values are accumulated in
  // the rotated domain too and rotated back once per query row per call (Πᵀ is linear), instead of
  // once per token. Score / AccumulateWeighted are the scalar references (codec_blocks_test).
  void ScoreBlocks(const float* qp, int n_q, const uint8_t* blocks, int64_t n_blocks, float* scores,
                   int64_t ld) const override {
    if (!fast_) return Codec::ScoreBlocks(qp, n_q, blocks, n_blocks, scores, ld);
    const uint8_t* end = blocks + size_t(n_blocks) * bytes_;
    cpu::ScoreViaTile(qp, n_q, blocks, bytes_, n_blocks, d_, scores, ld,
                      [&](const uint8_t* rows, int64_t m, float* y) { DecodeRotatedRows(rows, m, end, y); });
  }
  void AccumulateBlocks(const float* p, int64_t ld, int n_q, const uint8_t* blocks, int64_t n_blocks,
                        float* out) const override {
    if (!fast_) return Codec::AccumulateBlocks(p, ld, n_q, blocks, n_blocks, out);
    const uint8_t* end = blocks + size_t(n_blocks) * bytes_;
    std::vector<float> acc(size_t(n_q) * d_, 0.f), tmp(d_);
    cpu::AccumulateViaTile(p, ld, n_q, blocks, bytes_, n_blocks, d_, acc.data(),
                           [&](const uint8_t* rows, int64_t m, float* y) { DecodeRotatedRows(rows, m, end, y); });
    for (int r = 0; r < n_q; ++r) {
      int off = 0;
      for (const auto& pt : parts_) {
        pt.rot.ApplyT(&acc[size_t(r) * d_ + off], tmp.data());
        float* o = out + size_t(r) * d_;
        for (int j = 0; j < pt.n; ++j) o[pt.ch[j]] += tmp[j];
        off += pt.n;
      }
    }
  }

  void Decode(const uint8_t* block, float* x) const override {
    if (fast_) {
      float y[512 + 16], xp[512];
      uint8_t pad[1024 + 8] = {};
      std::memcpy(pad, block, bytes_);
      DecodeRotatedFast(pad, y);
      int off = 0;
      for (const auto& pt : parts_) {
        pt.rot.ApplyT(y + off, xp);
        for (int j = 0; j < pt.n; ++j) x[pt.ch[j]] = xp[j];
        off += pt.n;
      }
      return;
    }
    BitReader br(block + header_);
    int hoff = 0;
    std::vector<float> yh(d_), xp(d_);
    for (const auto& pt : parts_) {
      DecodeRotated(pt, block + hoff, br, yh.data());
      pt.rot.ApplyT(yh.data(), xp.data());
      for (int j = 0; j < pt.n; ++j) x[pt.ch[j]] = xp[j];
      hoff += pt.header;
    }
  }

  void PrepareQuery(const float* q, int n_q, float* qp) const override {
    const int pd = PreparedQueryDim();
    std::vector<float> g(d_);
    for (int r = 0; r < n_q; ++r) {
      float* o = qp + size_t(r) * pd;
      for (const auto& pt : parts_) {
        for (int j = 0; j < pt.n; ++j) g[j] = q[size_t(r) * d_ + pt.ch[j]];
        pt.rot.Apply(g.data(), o);
        if (pt.prod) {
          for (int i = 0; i < pt.n; ++i) {
            const float* srow = &pt.s[size_t(i) * pt.n];
            float acc = 0.f;
            for (int j = 0; j < pt.n; ++j) acc += srow[j] * o[j];
            o[pt.n + i] = acc;
          }
        }
        o += pt.n * (pt.prod ? 2 : 1);
      }
    }
  }

  // Packed scoring: codes are read once per block and reused for every query row.
  void Score(const float* qp, int n_q, const uint8_t* block, float* scores) const override {
    const int pd = PreparedQueryDim();
    for (int r = 0; r < n_q; ++r) scores[r] = 0.f;
    BitReader br(block + header_);
    int hoff = 0, qoff = 0;
    uint16_t idx[512];
    for (const auto& pt : parts_) {
      const int n = pt.n;
      const float g = gguf::Fp16ToFp32(LoadU16(block + hoff));
      if (pt.bm > 0) {
        for (int j = 0; j < n; ++j) idx[j] = uint16_t(br.Get(pt.bm));
        for (int r = 0; r < n_q; ++r) {
          const float* q = qp + size_t(r) * pd + qoff;
          float acc = 0.f;
          for (int j = 0; j < n; ++j) acc += q[j] * pt.cb[idx[j]];
          scores[r] += g * acc;
        }
      }
      if (pt.prod) {
        const float rk = gguf::Fp16ToFp32(LoadU16(block + hoff + 2)) * pt.kappa;
        for (int i = 0; i < n; ++i) idx[i] = uint16_t(br.Get(1));
        for (int r = 0; r < n_q; ++r) {
          const float* sq = qp + size_t(r) * pd + qoff + n;
          float acc = 0.f;
          for (int i = 0; i < n; ++i) acc += idx[i] ? sq[i] : -sq[i];
          scores[r] += rk * acc;
        }
      }
      hoff += pt.header;
      qoff += n * (pt.prod ? 2 : 1);
    }
  }

  void AccumulateWeighted(const float* p, int n_q, const uint8_t* block, float* out) const override {
    bool any = false;
    for (int r = 0; r < n_q; ++r) any = any || p[r] != 0.f;
    if (!any) return;
    std::vector<float> x(d_);
    Decode(block, x.data());
    for (int r = 0; r < n_q; ++r) {
      const float w = p[r];
      if (w == 0.f) continue;
      float* o = out + size_t(r) * d_;
      for (int j = 0; j < d_; ++j) o[j] += w * x[j];
    }
  }

  const std::vector<int>& split_channels() const { return parts_[0].ch; }

 private:
  void AssignChannels(const std::vector<int>& order) {
    int k = 0;
    for (auto& pt : parts_) {
      pt.ch.assign(order.begin() + k, order.begin() + k + pt.n);
      std::sort(pt.ch.begin(), pt.ch.end());
      k += pt.n;
    }
  }
  // Highest-energy RoPE pairs (2i, 2i+1) of the first vector go to the high-precision part.
  void FreezeSplit(const float* x) {
    const int np = d_ / 2;
    std::vector<int> pairs(np);
    std::iota(pairs.begin(), pairs.end(), 0);
    std::stable_sort(pairs.begin(), pairs.end(), [&](int a, int b) {
      return x[2 * a] * x[2 * a] + x[2 * a + 1] * x[2 * a + 1] >
             x[2 * b] * x[2 * b] + x[2 * b + 1] * x[2 * b + 1];
    });
    std::vector<int> order;
    for (int pi : pairs) { order.push_back(2 * pi); order.push_back(2 * pi + 1); }
    AssignChannels(order);
    frozen_ = true;
  }

  int d_;
  bool prod_, nc_;
  std::string name_;
  std::vector<Part> parts_;
  int header_ = 0;
  size_t bytes_ = 0;
  bool frozen_ = false;
  bool fast_ = false;
  bool narrow_ = true;
};

}  // namespace

StatusOr<std::unique_ptr<Codec>> MakeTurboCodec(const CodecSpec& spec, const CodecContext& ctx) {
  auto bits = spec.GetDouble("bits", 3.0);
  auto variant = spec.GetString("variant", "mse");
  auto nc = spec.GetBool("nc", false);
  auto split = spec.GetInt("split", -1);
  auto boundary = spec.GetInt("boundary", 0);
  for (const Status& s : {bits.status(), variant.status(), nc.status(), split.status(),
                          boundary.status()}) {
    KVC_RETURN_IF_ERROR(s);
  }
  KVC_RETURN_IF_ERROR(spec.CheckAllUsed());
  const double b = *bits;
  if (*variant != "mse" && *variant != "prod") {
    return InvalidArgument(fmt::format("turbo: variant='{}' must be mse or prod", *variant));
  }
  const bool prod = *variant == "prod";
  if (std::fabs(b * 2 - std::round(b * 2)) > 1e-9 || b < (prod ? 2.0 : 1.0) || b > 8.0) {
    return InvalidArgument(fmt::format(
        "turbo: bits={} must be a multiple of 0.5 in [{}, 8] (e.g. 2, 2.5, 3, 3.5, 4)", b,
        prod ? 2 : 1));
  }
  if (*boundary < 0) return InvalidArgument("turbo: boundary must be >= 0");
  if (ctx.layer < *boundary || ctx.layer >= ctx.n_layer - *boundary) {
    CodecSpec q8;
    q8.name = "q8_0";
    return MakeQ8_0Codec(q8, ctx);
  }
  const bool frac = std::floor(b) != b;
  // Fractional bits always split (default d/2); integral bits split only when asked (split=N:
  // N outlier channels get their own rotation and norm at the same bit width).
  const int n_split = *split >= 0 ? *split : (frac ? ctx.dim / 2 : 0);
  if (ctx.dim < 4 || ctx.dim > 512) {
    return Unimplemented(fmt::format("turbo needs 4 <= dim <= 512, got {}", ctx.dim));
  }
  if ((frac || n_split != 0) && (n_split < 4 || n_split > ctx.dim - 4 || n_split % 2 != 0)) {
    return InvalidArgument(fmt::format(
        "turbo: split={} must be even and in [4, {}] (channels at the higher bit width)", n_split,
        ctx.dim - 4));
  }
  std::string name = fmt::format("turbo:bits={},variant={}", b, *variant);
  if (*nc) name += ",nc=1";
  if (n_split) name += fmt::format(",split={}", n_split);
  if (*boundary) name += fmt::format(",boundary={}", *boundary);
  return std::unique_ptr<Codec>(new TurboCodec(ctx.dim, b, prod, *nc, n_split, ctx.seed, name));
}

}  // namespace kvc::kv
