#include "kv/transforms/hadamard.h"

#include <cmath>
#include <cstring>
#include <vector>

#include <fmt/format.h>

namespace kvc::kv {

void FastHadamard(float* x, int n) {
  for (int h = 1; h < n; h *= 2) {
    for (int i = 0; i < n; i += 2 * h) {
      for (int j = i; j < i + h; ++j) {
        const float a = x[j], b = x[j + h];
        x[j] = a + b;
        x[j + h] = a - b;
      }
    }
  }
  const float s = 1.0f / std::sqrt(float(n));
  for (int i = 0; i < n; ++i) x[i] *= s;
}

namespace {

class HadamardTransform final : public Transform {
 public:
  HadamardTransform(int d, bool signs, uint64_t seed) : d_(d), signs_(signs), flip_(d, 1.f) {
    if (signs) {
      uint64_t s = seed ^ 0x68616461ull;  // splitmix64
      for (int i = 0; i < d; ++i) {
        s += 0x9E3779B97F4A7C15ull;
        uint64_t z = s;
        z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
        z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
        z ^= z >> 31;
        flip_[i] = (z & 1) ? -1.f : 1.f;
      }
    }
  }
  std::string Name() const override { return signs_ ? "hadamard:signs=1" : "hadamard"; }
  int in_dim() const override { return d_; }
  int out_dim() const override { return d_; }

  void Forward(const float* x, int n, float* y) const override {
    for (int t = 0; t < n; ++t) {
      float* yt = y + size_t(t) * d_;
      const float* xt = x + size_t(t) * d_;
      for (int i = 0; i < d_; ++i) yt[i] = xt[i] * flip_[i];
      FastHadamard(yt, d_);
    }
  }
  void Reconstruct(const float* y, int n, float* x) const override {
    for (int t = 0; t < n; ++t) {
      float* xt = x + size_t(t) * d_;
      std::memcpy(xt, y + size_t(t) * d_, d_ * sizeof(float));
      FastHadamard(xt, d_);
      for (int i = 0; i < d_; ++i) xt[i] *= flip_[i];
    }
  }
  void FoldQuery(const float* q, int n, float* qf) const override { Forward(q, n, qf); }

 private:
  int d_;
  bool signs_;
  std::vector<float> flip_;  // [d] ±1
};

}  // namespace

StatusOr<std::unique_ptr<Transform>> MakeHadamardTransform(const CodecSpec& spec,
                                                           const CodecContext& ctx) {
  KVC_ASSIGN_OR_RETURN(bool signs, spec.GetBool("signs", false));
  KVC_RETURN_IF_ERROR(spec.CheckAllUsed());
  if (ctx.dim <= 0 || (ctx.dim & (ctx.dim - 1)) != 0) {
    return Unimplemented(fmt::format(
        "hadamard needs a power-of-2 head dimension, got {} (use rot=0 / no kt/vt transform)",
        ctx.dim));
  }
  return std::unique_ptr<Transform>(new HadamardTransform(ctx.dim, signs, ctx.seed));
}

}  // namespace kvc::kv
