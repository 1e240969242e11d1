#include "kv/codecs/polar.h"

#include <cmath>
#include <mutex>

#include <fmt/format.h>

#include "cpu/kv_kernels.h"
#include "gguf/types.h"
#include "kv/cache_internal.h"
#include "kv/codecs/bitpack.h"
#include "kv/codecs/lloyd_max.h"
#include "kv/transforms/random_rotation.h"

namespace kvc::kv {
namespace {

constexpr int kBlock = 16;
constexpr int kLevelBits[4] = {4, 2, 2, 2};
constexpr int kBlockCodeBits = 8 * 4 + 4 * 2 + 2 * 2 + 1 * 2;  // 46

// Codebooks per level: [0] uniform on [0, 2π) (16 centroids), [1..3] Lloyd–Max on [0, π/2].
struct PolarBooks {
  std::vector<float> cb[4], thr[4];
};

const PolarBooks& Books() {
  static std::once_flag once;
  static PolarBooks b;
  std::call_once(once, [] {
    for (int k = 0; k < 16; ++k) b.cb[0].push_back(float((k + 0.5) * 2 * M_PI / 16));
    for (int l = 1; l < 4; ++l) {
      const double e = double((1 << l) - 1);  // level l+1: sin^(2^l − 1)(2ψ)
      auto f = [e](double psi) {
        const double s = std::sin(2 * psi);
        return s <= 0 ? 0.0 : std::pow(s, e);
      };
      const auto r = SolveLloydMax(f, 0.0, M_PI / 2, 4, 200001);
      b.cb[l] = r.centroids;
      b.thr[l] = r.thresholds;
    }
  });
  return b;
}

class PolarCodec final : public Codec {
 public:
  PolarCodec(int d, uint64_t seed) : d_(d), nb_(d / kBlock), rot_(d, seed), books_(Books()) {
    // cos / sin of every codebook angle, as float like the scalar decode computes them.
    trig_.assign(8 * 16, 0.f);
    for (int l = 0; l < 4; ++l) {
      for (size_t k = 0; k < books_.cb[l].size(); ++k) {
        const float psi = books_.cb[l][k];
        trig_[2 * l * 16 + k] = std::cos(psi);
        trig_[(2 * l + 1) * 16 + k] = std::sin(psi);
      }
    }
  }
  std::string Name() const override { return "polar"; }
  int dim() const override { return d_; }
  size_t BlockBytes() const override { return 2 * size_t(nb_) + (size_t(nb_) * kBlockCodeBits + 7) / 8; }

  void Encode(const float* x, uint8_t* block) override {
    std::vector<float> y(d_);
    rot_.Apply(x, y.data());
    BitWriter bw(block + 2 * nb_);
    for (int b = 0; b < nb_; ++b) {
      const float* u = &y[b * kBlock];
      float r[kBlock];
      int n = kBlock;
      for (int i = 0; i < n; ++i) r[i] = u[i];
      for (int l = 0; l < 4; ++l) {
        for (int j = 0; j < n / 2; ++j) {
          const float a = r[2 * j], c = r[2 * j + 1];
          float psi = std::atan2(c, a);
          int idx;
          if (l == 0) {
            if (psi < 0) psi += float(2 * M_PI);
            idx = int(psi / float(2 * M_PI / 16));
            idx = idx < 0 ? 0 : (idx > 15 ? 15 : idx);
          } else {
            idx = NearestIndex(books_.thr[l].data(), 3, psi);
          }
          bw.Put(uint32_t(idx), kLevelBits[l]);
          r[j] = std::sqrt(a * a + c * c);
        }
        n /= 2;
      }
      StoreU16(block + 2 * b, Fp32ToFp16Sat(r[0]));
    }
  }

  // Rotated-domain reconstruction y [d].
  void DecodeRotated(const uint8_t* block, float* y) const {
    BitReader br(block + 2 * nb_);
    for (int b = 0; b < nb_; ++b) {
      uint8_t idx[15];
      for (int i = 0; i < 15; ++i) idx[i] = uint8_t(br.Get(i < 8 ? 4 : 2));
      // idx layout: level1 [0..8), level2 [8..12), level3 [12..14), level4 [14].
      float r[kBlock];
      r[0] = gguf::Fp16ToFp32(LoadU16(block + 2 * b));
      int n = 1;
      static constexpr int kOff[4] = {0, 8, 12, 14};
      for (int l = 3; l >= 0; --l) {
        float nr[kBlock];
        for (int j = 0; j < n; ++j) {
          const float psi = books_.cb[l][idx[kOff[l] + j]];
          nr[2 * j] = r[j] * std::cos(psi);
          nr[2 * j + 1] = r[j] * std::sin(psi);
        }
        n *= 2;
        for (int j = 0; j < n; ++j) r[j] = nr[j];
      }
      for (int i = 0; i < kBlock; ++i) y[b * kBlock + i] = r[i];
    }
  }

  void Decode(const uint8_t* block, float* x) const override {
    std::vector<float> y(d_);
    DecodeRotated(block, y.data());
    rot_.ApplyT(y.data(), x);
  }

  void PrepareQuery(const float* q, int n_q, float* qp) const override {
    for (int r = 0; r < n_q; ++r) rot_.Apply(q + size_t(r) * d_, qp + size_t(r) * d_);
  }

  void Score(const float* qp, int n_q, const uint8_t* block, float* scores) const override {
    float y[1024];
    DecodeRotated(block, y);
    for (int r = 0; r < n_q; ++r) {
      const float* q = qp + size_t(r) * d_;
      float acc = 0.f;
      for (int j = 0; j < d_; ++j) acc += q[j] * y[j];
      scores[r] = acc;
    }
  }

  // Many tokens (decode attention): Highway kernels with 16 tokens per vector (cpu::PolarDotRows /
  // PolarAxpyRows: the recursive decode from cos/sin tables, no trigonometry, no row-major tile),
  // scored against the pre-rotated query; values accumulated in the rotated domain and rotated
  // back once per query row per call. Score above and the default AccumulateWeighted (decode, then
  // axpy) are the references (codec_blocks_test).
  void ScoreBlocks(const float* qp, int n_q, const uint8_t* blocks, int64_t n_blocks, float* scores,
                   int64_t ld) const override {
    cpu::PolarDotRows(qp, n_q, blocks, n_blocks, BlockBytes(), nb_, trig_.data(), scores, ld);
  }
  void AccumulateBlocks(const float* p, int64_t ld, int n_q, const uint8_t* blocks, int64_t n_blocks,
                        float* out) const override {
    std::vector<float> acc(size_t(n_q) * d_, 0.f), x(d_);
    cpu::PolarAxpyRows(p, ld, n_q, blocks, n_blocks, BlockBytes(), nb_, trig_.data(), acc.data());
    for (int r = 0; r < n_q; ++r) {
      rot_.ApplyT(&acc[size_t(r) * d_], x.data());
      for (int j = 0; j < d_; ++j) out[size_t(r) * d_ + j] += x[j];
    }
  }

 private:
  int d_, nb_;
  RandomRotation rot_;
  const PolarBooks& books_;
  std::vector<float> trig_;  // [8][16] cos/sin per level (see cpu::PolarRows)
};

}  // namespace

StatusOr<std::unique_ptr<Codec>> MakePolarCodec(const CodecSpec& spec, const CodecContext& ctx) {
  auto seed = spec.GetInt("seed", 42);
  KVC_RETURN_IF_ERROR(seed.status());
  KVC_RETURN_IF_ERROR(spec.CheckAllUsed());
  if (ctx.dim % kBlock != 0 || ctx.dim > 1024) {
    return Unimplemented(fmt::format(
        "polar needs a dimension divisible by 16 (blocks of 16 coordinates) and <= 1024, got {}",
        ctx.dim));
  }
  return std::unique_ptr<Codec>(new PolarCodec(ctx.dim, uint64_t(*seed) * 0x9E3779B97F4A7C15ull));
}

}  // namespace kvc::kv
