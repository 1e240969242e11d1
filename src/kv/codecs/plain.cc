#include "kv/codecs/plain.h"

#include <cstring>

#include "cpu/ops.h"
#include "gguf/types.h"
#include "kv/cache_internal.h"

namespace kvc::kv {
namespace {

class F32Codec final : public Codec {
 public:
  explicit F32Codec(int d) : d_(d) {}
  std::string Name() const override { return "f32"; }
  int dim() const override { return d_; }
  size_t BlockBytes() const override { return size_t(d_) * 4; }
  void Encode(const float* x, uint8_t* block) override { std::memcpy(block, x, BlockBytes()); }
  void Decode(const uint8_t* block, float* x) const override { std::memcpy(x, block, BlockBytes()); }
  void Score(const float* qp, int n_q, const uint8_t* block, float* scores) const override {
    const float* k = reinterpret_cast<const float*>(block);
    for (int r = 0; r < n_q; ++r) scores[r] = cpu::Dot(qp + size_t(r) * d_, k, d_);
  }
  void AccumulateWeighted(const float* p, int n_q, const uint8_t* block, float* out) const override {
    const float* v = reinterpret_cast<const float*>(block);
    for (int r = 0; r < n_q; ++r) cpu::Axpy(p[r], v, d_, out + size_t(r) * d_);
  }

 private:
  int d_;
};

class F16Codec final : public Codec {
 public:
  F16Codec(int d, bool bf16) : d_(d), bf16_(bf16) {}
  std::string Name() const override { return bf16_ ? "bf16" : "f16"; }
  int dim() const override { return d_; }
  size_t BlockBytes() const override { return size_t(d_) * 2; }
  void Encode(const float* x, uint8_t* block) override {
    auto* h = reinterpret_cast<uint16_t*>(block);
    if (bf16_) {
      for (int i = 0; i < d_; ++i) h[i] = gguf::Fp32ToBf16(x[i]);
    } else {
      Fp32ToFp16SatRow(x, d_, h);
    }
  }
  void ScoreBlocks(const float* qp, int n_q, const uint8_t* blocks, int64_t n_blocks,
                   float* scores, int64_t ld) const override {
    if (bf16_) return Codec::ScoreBlocks(qp, n_q, blocks, n_blocks, scores, ld);
    cpu::DotF16Rows(qp, n_q, reinterpret_cast<const uint16_t*>(blocks), n_blocks, d_, scores, ld);
  }
  void AccumulateBlocks(const float* p, int64_t ld, int n_q, const uint8_t* blocks,
                        int64_t n_blocks, float* out) const override {
    if (bf16_) return Codec::AccumulateBlocks(p, ld, n_q, blocks, n_blocks, out);
    cpu::AxpyF16Rows(p, ld, n_q, reinterpret_cast<const uint16_t*>(blocks), n_blocks, d_, out);
  }
  void DecodeBlocks(const uint8_t* blocks, int64_t n_blocks, float* x) const override {
    if (bf16_) return Codec::DecodeBlocks(blocks, n_blocks, x);
    Fp16ToFp32Row(reinterpret_cast<const uint16_t*>(blocks), n_blocks * d_, x);  // one array
  }
  void Decode(const uint8_t* block, float* x) const override {
    const auto* h = reinterpret_cast<const uint16_t*>(block);
    if (bf16_) {
      for (int i = 0; i < d_; ++i) x[i] = gguf::Bf16ToFp32(h[i]);
    } else {
      Fp16ToFp32Row(h, d_, x);
    }
  }

 private:
  int d_;
  bool bf16_;
};

}  // namespace

StatusOr<std::unique_ptr<Codec>> MakeF32Codec(const CodecSpec& spec, const CodecContext& ctx) {
  KVC_RETURN_IF_ERROR(spec.CheckAllUsed());
  return std::unique_ptr<Codec>(new F32Codec(ctx.dim));
}
StatusOr<std::unique_ptr<Codec>> MakeF16Codec(const CodecSpec& spec, const CodecContext& ctx) {
  KVC_RETURN_IF_ERROR(spec.CheckAllUsed());
  return std::unique_ptr<Codec>(new F16Codec(ctx.dim, false));
}
StatusOr<std::unique_ptr<Codec>> MakeBf16Codec(const CodecSpec& spec, const CodecContext& ctx) {
  KVC_RETURN_IF_ERROR(spec.CheckAllUsed());
  return std::unique_ptr<Codec>(new F16Codec(ctx.dim, true));
}

}  // namespace kvc::kv
