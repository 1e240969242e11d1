// The Transform plug-in: a linear map applied to each K (or V) vector of one (layer, KV head)
// before the codec stores it, with its reconstruction folded into the query / output side where
// that is exact:
//   store:  y = Forward(x)            x [in_dim], y [out_dim]   (out_dim < in_dim: low-rank latent)
//   keys:   <q, R y> = <Rᵀ q, y>      (FoldQuery), valid when keys are stored after RoPE
//   values: Σ_t p_t R y_t = R Σ_t p_t y_t   (Reconstruct applied once to the attention output)
// A transform that must act before RoPE (low-rank keys, Palu §3) sets pre_rope(): keys are then
// stored pre-RoPE, reconstructed per token and rotated at attention time.
// Examples: Hadamard rotation (QuaRot / llama.cpp PR #21038; orthogonal, R = Hᵀ), Palu-style
// low-rank projections (src/kv/transforms/).
#pragma once

#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "kv/codec.h"

namespace kvc::kv {

class Transform {
 public:
  virtual ~Transform() = default;
  virtual std::string Name() const = 0;
  virtual int in_dim() const = 0;
  virtual int out_dim() const = 0;
  virtual bool pre_rope() const { return false; }
  // Bytes of parameters this instance holds (projection matrices), for memory reports.
  virtual size_t ParamBytes() const { return 0; }
  // y [n, out_dim] = Forward(x [n, in_dim]).
  virtual void Forward(const float* x, int n, float* y) const = 0;
  // x̂ [n, in_dim] = R · y [n, out_dim].
  virtual void Reconstruct(const float* y, int n, float* x) const = 0;
  // qf [n, out_dim] = Rᵀ q [n, in_dim].
  virtual void FoldQuery(const float* q, int n, float* qf) const = 0;
};

using TransformFactory =
    std::function<StatusOr<std::unique_ptr<Transform>>(const CodecSpec&, const CodecContext&)>;
struct TransformInfo {
  std::string name;
  std::string summary;
  TransformFactory factory;
};
const std::vector<TransformInfo>& RegisteredTransforms();
// ctx.dim is the input dim (head_dim). INVALID_ARGUMENT for unknown names / bad params.
StatusOr<std::unique_ptr<Transform>> MakeTransform(const std::string& spec, const CodecContext& ctx);

}  // namespace kvc::kv
