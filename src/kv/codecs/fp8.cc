#include "kv/codecs/fp8.h"

#include <array>
#include <cmath>
#include <cstring>
#include <limits>

#include <fmt/format.h>

#include "cpu/kv_kernels.h"
#include "gguf/types.h"
#include "kv/cache_internal.h"

namespace kvc::kv {
namespace fp8 {

uint8_t FloatToE4M3(float x) {
  if (std::isnan(x)) return 0x7F;
  const uint8_t sign = std::signbit(x) ? 0x80 : 0x00;
  float a = std::fabs(x);
  if (a >= 448.f) return sign | 0x7E;  // saturate (448 = exponent 15, mantissa 6)
  if (a < 0.015625f) {                 // below 2^-6: subnormals, step 2^-9
    const int m = int(std::nearbyint(a * 512.f));  // RNE; m == 8 is the smallest normal
    return sign | uint8_t(m);
  }
  int e;
  const float fr = std::frexp(a, &e);  // a = fr · 2^e, fr in [0.5, 1)
  // a = (1 + mant/8) · 2^(e-1); mant = RNE((2·fr − 1) · 8), exact in float.
  int mant = int(std::nearbyint((2.f * fr - 1.f) * 8.f));
  int exp = e - 1;
  if (mant == 8) {
    mant = 0;
    ++exp;
  }
  const int field = exp + 7;
  if (field > 15 || (field == 15 && mant == 7)) return sign | 0x7E;
  return sign | uint8_t((field << 3) | mant);
}

float E4M3ToFloat(uint8_t c) {
  const float sign = (c & 0x80) ? -1.f : 1.f;
  const int field = (c >> 3) & 0x0F, mant = c & 0x07;
  if (field == 15 && mant == 7) return std::numeric_limits<float>::quiet_NaN();
  if (field == 0) return sign * std::ldexp(float(mant), -9);
  return sign * std::ldexp(1.f + mant / 8.f, field - 7);
}

static const std::array<float, 256>& Table() {
  static const std::array<float, 256> t = [] {
    std::array<float, 256> r{};
    for (int c = 0; c < 256; ++c) r[c] = E4M3ToFloat(uint8_t(c));
    return r;
  }();
  return t;
}

}  // namespace fp8

namespace {

class Fp8Codec final : public Codec {
 public:
  explicit Fp8Codec(int d) : d_(d), lut_(fp8::Table().data()) {}
  std::string Name() const override { return "fp8"; }
  int dim() const override { return d_; }
  size_t BlockBytes() const override { return size_t(d_) + 2; }

  void Encode(const float* x, uint8_t* block) override {
    float amax = 0.f;
    for (int i = 0; i < d_; ++i) amax = std::max(amax, std::fabs(x[i]));
    uint16_t sh = Fp32ToFp16Sat(amax / 448.f);
    float s = gguf::Fp16ToFp32(sh);
    if (amax > 0.f && s * 448.f < amax && sh != 0x7BFF) {
      ++sh;  // round the scale up one fp16 ulp (positive, finite: next representable value)
      s = gguf::Fp16ToFp32(sh);
    }
    if (amax > 0.f && s == 0.f) {
      sh = 0x0001;  // smallest fp16 subnormal: the vector is below 2.7e-5 everywhere
      s = gguf::Fp16ToFp32(sh);
    }
    std::memcpy(block, &sh, 2);
    const float is = s > 0.f ? 1.f / s : 0.f;
    for (int i = 0; i < d_; ++i) block[2 + i] = fp8::FloatToE4M3(x[i] * is);
  }

  // Highway decoder, bit-identical to the table lookup lut_[code] · s (kv_kernels_test checks all
  // 256 codes against fp8::E4M3ToFloat).
  void Decode(const uint8_t* block, float* x) const override { cpu::DecodeE4M3Rows(block, 1, d_, x); }

  // Many tokens (decode attention): SIMD-decoded f32 tiles then SIMD dot / axpy over the query
  // rows; Score / AccumulateWeighted below are the scalar references (codec_blocks_test).
  void ScoreBlocks(const float* qp, int n_q, const uint8_t* blocks, int64_t n_blocks, float* scores,
                   int64_t ld) const override {
    cpu::ScoreViaTile(qp, n_q, blocks, BlockBytes(), n_blocks, d_, scores, ld,
                      [this](const uint8_t* rows, int64_t m, float* x) { cpu::DecodeE4M3Rows(rows, m, d_, x); });
  }
  void AccumulateBlocks(const float* p, int64_t ld, int n_q, const uint8_t* blocks, int64_t n_blocks,
                        float* out) const override {
    cpu::AccumulateViaTile(p, ld, n_q, blocks, BlockBytes(), n_blocks, d_, out,
                           [this](const uint8_t* rows, int64_t m, float* x) { cpu::DecodeE4M3Rows(rows, m, d_, x); });
  }

  void Score(const float* qp, int n_q, const uint8_t* block, float* scores) const override {
    const float s = Scale(block);
    const uint8_t* c = block + 2;
    for (int r = 0; r < n_q; ++r) {
      const float* q = qp + size_t(r) * d_;
      float part[8] = {0, 0, 0, 0, 0, 0, 0, 0};
      int i = 0;
      for (; i + 8 <= d_; i += 8) {
        for (int l = 0; l < 8; ++l) part[l] += q[i + l] * lut_[c[i + l]];
      }
      float acc = 0.f;
      for (; i < d_; ++i) acc += q[i] * lut_[c[i]];
      for (int l = 0; l < 8; ++l) acc += part[l];
      scores[r] = s * acc;
    }
  }

  void AccumulateWeighted(const float* p, int n_q, const uint8_t* block, float* out) const override {
    const float s = Scale(block);
    const uint8_t* c = block + 2;
    for (int r = 0; r < n_q; ++r) {
      const float w = p[r] * s;
      if (w == 0.f) continue;
      float* o = out + size_t(r) * d_;
      for (int i = 0; i < d_; ++i) o[i] += w * lut_[c[i]];
    }
  }

 private:
  static float Scale(const uint8_t* block) {
    uint16_t sh;
    std::memcpy(&sh, block, 2);
    return gguf::Fp16ToFp32(sh);
  }
  int d_;
  const float* lut_;  // [256] E4M3 code -> f32
};

}  // namespace

StatusOr<std::unique_ptr<Codec>> MakeFp8Codec(const CodecSpec& spec, const CodecContext& ctx) {
  KVC_ASSIGN_OR_RETURN(bool rot, spec.GetBool("rot", false));
  (void)rot;  // consumed by the store (a "hadamard" transform), as for q4_0
  KVC_RETURN_IF_ERROR(spec.CheckAllUsed());
  if (ctx.dim <= 0) return InvalidArgument(fmt::format("fp8: bad dimension {}", ctx.dim));
  return std::unique_ptr<Codec>(new Fp8Codec(ctx.dim));
}

}  // namespace kvc::kv
