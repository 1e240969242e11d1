#include "kv/codecs/q8_0.h"

#include <cmath>
#include <cstring>

#include <fmt/format.h>

#include "cpu/ops.h"
#include "gguf/types.h"
#include "kv/cache_internal.h"

namespace kvc::kv {
namespace {

constexpr int kBlock = 32;
constexpr size_t kBlockBytes = 34;

class Q8_0Codec final : public Codec {
 public:
  explicit Q8_0Codec(int d) : d_(d), nb_(d / kBlock) {}
  std::string Name() const override { return "q8_0"; }
  int dim() const override { return d_; }
  size_t BlockBytes() const override { return size_t(nb_) * kBlockBytes; }

  void Encode(const float* x, uint8_t* block) override {
    for (int b = 0; b < nb_; ++b) {
      const float* xb = x + b * kBlock;
      uint8_t* out = block + b * kBlockBytes;
      float amax = 0.f;
      for (int i = 0; i < kBlock; ++i) amax = std::max(amax, std::fabs(xb[i]));
      const float d = amax / 127.f;
      const uint16_t dh = Fp32ToFp16Sat(d);
      // Quantize against the scale as stored, so a saturated scale still gives in-range codes.
      const float ds = gguf::Fp16ToFp32(dh);
      const float id = ds > 0.f ? 1.0f / ds : 0.f;
      std::memcpy(out, &dh, 2);
      auto* qs = reinterpret_cast<int8_t*>(out + 2);
      for (int i = 0; i < kBlock; ++i) {
        const float v = std::round(xb[i] * id);
        qs[i] = int8_t(std::max(-127.f, std::min(127.f, v)));
      }
    }
  }

  void Decode(const uint8_t* block, float* x) const override {
    for (int b = 0; b < nb_; ++b) {
      const uint8_t* in = block + b * kBlockBytes;
      uint16_t dh;
      std::memcpy(&dh, in, 2);
      const float d = gguf::Fp16ToFp32(dh);
      const auto* qs = reinterpret_cast<const int8_t*>(in + 2);
      for (int i = 0; i < kBlock; ++i) x[b * kBlock + i] = d * qs[i];
    }
  }

  void Score(const float* qp, int n_q, const uint8_t* block, float* scores) const override {
    for (int r = 0; r < n_q; ++r) {
      const float* q = qp + size_t(r) * d_;
      float acc = 0.f;
      for (int b = 0; b < nb_; ++b) {
        const uint8_t* in = block + b * kBlockBytes;
        uint16_t dh;
        std::memcpy(&dh, in, 2);
        const auto* qs = reinterpret_cast<const int8_t*>(in + 2);
        float s = 0.f;
        for (int i = 0; i < kBlock; ++i) s += q[b * kBlock + i] * float(qs[i]);
        acc += gguf::Fp16ToFp32(dh) * s;
      }
      scores[r] = acc;
    }
  }

  // Many tokens per call (decode attention): Highway kernels in src/cpu/f16.cc; the per-block
  // Score / AccumulateWeighted above and below are their scalar references (codec contract test).
  void ScoreBlocks(const float* qp, int n_q, const uint8_t* blocks, int64_t n_blocks, float* scores,
                   int64_t ld) const override {
    cpu::DotQ8Rows(qp, n_q, blocks, n_blocks, d_, scores, ld);
  }
  void AccumulateBlocks(const float* p, int64_t ld, int n_q, const uint8_t* blocks, int64_t n_blocks,
                        float* out) const override {
    cpu::AxpyQ8Rows(p, ld, n_q, blocks, n_blocks, d_, out);
  }

  void AccumulateWeighted(const float* p, int n_q, const uint8_t* block, float* out) const override {
    for (int b = 0; b < nb_; ++b) {
      const uint8_t* in = block + b * kBlockBytes;
      uint16_t dh;
      std::memcpy(&dh, in, 2);
      const float d = gguf::Fp16ToFp32(dh);
      const auto* qs = reinterpret_cast<const int8_t*>(in + 2);
      for (int r = 0; r < n_q; ++r) {
        const float w = p[r] * d;
        float* o = out + size_t(r) * d_ + b * kBlock;
        for (int i = 0; i < kBlock; ++i) o[i] += w * float(qs[i]);
      }
    }
  }

 private:
  int d_, nb_;
};

}  // namespace

StatusOr<std::unique_ptr<Codec>> MakeQ8_0Codec(const CodecSpec& spec, const CodecContext& ctx) {
  KVC_RETURN_IF_ERROR(spec.CheckAllUsed());
  if (ctx.dim % kBlock != 0) {
    return Unimplemented(fmt::format("q8_0 needs a dimension divisible by 32, got {}", ctx.dim));
  }
  return std::unique_ptr<Codec>(new Q8_0Codec(ctx.dim));
}

}  // namespace kvc::kv
