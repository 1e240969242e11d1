#include "kv/codecs/legacy_block.h"

#include <fmt/format.h>

#include "cpu/kv_kernels.h"

namespace kvc::kv {
namespace {

constexpr int kBlock = 32;

class LegacyBlockCodec final : public Codec {
 public:
  LegacyBlockCodec(const LegacyBlockFormat& f, int d) : f_(f), d_(d) {}
  std::string Name() const override { return f_.name; }
  int dim() const override { return d_; }
  size_t BlockBytes() const override { return size_t(d_ / kBlock) * f_.block_bytes; }
  void Encode(const float* x, uint8_t* block) override { f_.quantize(x, d_, block); }
  void Decode(const uint8_t* block, float* x) const override { f_.decode_rows(block, 1, d_, x); }
  void Score(const float* qp, int n_q, const uint8_t* block, float* scores) const override {
    for (int r = 0; r < n_q; ++r) scores[r] = f_.dot(qp + size_t(r) * d_, block, d_);
  }
  void AccumulateWeighted(const float* p, int n_q, const uint8_t* block, float* out) const override {
    for (int r = 0; r < n_q; ++r) {
      if (p[r] != 0.f) f_.axpy(p[r], block, d_, out + size_t(r) * d_);
    }
  }
  void ScoreBlocks(const float* qp, int n_q, const uint8_t* blocks, int64_t n_blocks, float* scores,
                   int64_t ld) const override {
    cpu::ScoreViaTile(qp, n_q, blocks, BlockBytes(), n_blocks, d_, scores, ld,
                      [this](const uint8_t* rows, int64_t m, float* x) { f_.decode_rows(rows, m, d_, x); });
  }
  void AccumulateBlocks(const float* p, int64_t ld, int n_q, const uint8_t* blocks, int64_t n_blocks,
                        float* out) const override {
    cpu::AccumulateViaTile(p, ld, n_q, blocks, BlockBytes(), n_blocks, d_, out,
                           [this](const uint8_t* rows, int64_t m, float* x) { f_.decode_rows(rows, m, d_, x); });
  }

 private:
  LegacyBlockFormat f_;
  int d_;
};

}  // namespace

StatusOr<std::unique_ptr<Codec>> MakeLegacyBlockCodec(const LegacyBlockFormat& f,
                                                      const CodecSpec& spec, const CodecContext& ctx) {
  KVC_ASSIGN_OR_RETURN(bool rot, spec.GetBool("rot", false));
  (void)rot;  // consumed by the store (a "hadamard" transform); see q4_0.h
  KVC_RETURN_IF_ERROR(spec.CheckAllUsed());
  if (ctx.dim % kBlock != 0) {
    return Unimplemented(fmt::format(
        "{} needs a dimension divisible by 32, got {} (use f16, or q8_0 where it fits)", f.name,
        ctx.dim));
  }
  return std::unique_ptr<Codec>(new LegacyBlockCodec(f, ctx.dim));
}

}  // namespace kvc::kv
