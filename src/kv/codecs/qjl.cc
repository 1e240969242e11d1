#include "kv/codecs/qjl.h"

#include <cmath>

#include <fmt/format.h>

#include "cpu/kv_kernels.h"
#include "gguf/types.h"
#include "kv/cache_internal.h"
#include "kv/codecs/bitpack.h"
#include "kv/transforms/random_rotation.h"

namespace kvc::kv {
namespace {

class QjlCodec final : public Codec {
 public:
  QjlCodec(int d, int m, uint64_t seed) : d_(d), m_(m), s_(RandomOrthogonalRows(m, d, seed)) {
    const double mean_abs =
        std::exp(std::lgamma(0.5 * d) - std::lgamma(0.5 * (d + 1))) / std::sqrt(M_PI);
    kappa_ = float(1.0 / (m * mean_abs));
  }
  std::string Name() const override { return fmt::format("qjl:m={}", m_); }
  int dim() const override { return d_; }
  size_t BlockBytes() const override { return 2 + size_t(m_) / 8; }
  int PreparedQueryDim() const override { return m_; }
  float kappa() const { return kappa_; }

  void Encode(const float* x, uint8_t* block) override {
    double n2 = 0;
    for (int j = 0; j < d_; ++j) n2 += double(x[j]) * x[j];
    StoreU16(block, Fp32ToFp16Sat(float(std::sqrt(n2))));
    uint8_t* bits = block + 2;
    for (int i = 0; i < m_ / 8; ++i) bits[i] = 0;
    for (int i = 0; i < m_; ++i) {
      const float* row = &s_[size_t(i) * d_];
      float acc = 0.f;
      for (int j = 0; j < d_; ++j) acc += row[j] * x[j];
      if (acc >= 0.f) bits[i >> 3] |= uint8_t(1u << (i & 7));
    }
  }

  void Decode(const uint8_t* block, float* x) const override {
    const float c = kappa_ * gguf::Fp16ToFp32(LoadU16(block));
    const uint8_t* bits = block + 2;
    for (int j = 0; j < d_; ++j) x[j] = 0.f;
    for (int i = 0; i < m_; ++i) {
      const float sg = (bits[i >> 3] >> (i & 7)) & 1 ? c : -c;
      const float* row = &s_[size_t(i) * d_];
      for (int j = 0; j < d_; ++j) x[j] += sg * row[j];
    }
  }

  void PrepareQuery(const float* q, int n_q, float* qp) const override {
    for (int r = 0; r < n_q; ++r) {
      for (int i = 0; i < m_; ++i) {
        const float* row = &s_[size_t(i) * d_];
        float acc = 0.f;
        for (int j = 0; j < d_; ++j) acc += row[j] * q[size_t(r) * d_ + j];
        qp[size_t(r) * m_ + i] = acc;
      }
    }
  }

  // ± accumulate of the sketched query, byte by byte.
  void Score(const float* qp, int n_q, const uint8_t* block, float* scores) const override {
    const float c = kappa_ * gguf::Fp16ToFp32(LoadU16(block));
    const uint8_t* bits = block + 2;
    for (int r = 0; r < n_q; ++r) {
      const float* sq = qp + size_t(r) * m_;
      float acc = 0.f;
      for (int b = 0; b < m_ / 8; ++b) {
        const uint8_t byte = bits[b];
        for (int k = 0; k < 8; ++k) acc += (byte >> k) & 1 ? sq[b * 8 + k] : -sq[b * 8 + k];
      }
      scores[r] = c * acc;
    }
  }

  // Many keys (decode attention): Highway sign-select kernel (cpu::SignDotRows), four keys per
  // step sharing each sketched-query load; Score above is its scalar reference.
  void ScoreBlocks(const float* qp, int n_q, const uint8_t* blocks, int64_t n_blocks, float* scores,
                   int64_t ld) const override {
    cpu::SignDotRows(qp, n_q, m_, blocks, BlockBytes(), 2, 0, kappa_, n_blocks, scores, ld);
  }

 private:
  int d_, m_;
  std::vector<float> s_;  // [m, d] rows unit norm, orthogonal within chunks of d
  float kappa_;
};

}  // namespace

StatusOr<std::unique_ptr<Codec>> MakeQjlCodec(const CodecSpec& spec, const CodecContext& ctx) {
  auto m = spec.GetInt("m", ctx.dim);
  KVC_RETURN_IF_ERROR(m.status());
  KVC_RETURN_IF_ERROR(spec.CheckAllUsed());
  if (ctx.kind == KvKind::kValue) {
    return InvalidArgument("qjl stores keys only; choose a value codec such as kivi2 or q8_0 (-ctv)");
  }
  if (*m < 8 || *m % 8 != 0 || *m > 8192) {
    return InvalidArgument(fmt::format("qjl: m={} must be a multiple of 8 in [8, 8192]", *m));
  }
  if (ctx.dim < 2) return Unimplemented("qjl needs dim >= 2");
  return std::unique_ptr<Codec>(new QjlCodec(ctx.dim, *m, ctx.seed));
}

}  // namespace kvc::kv
