// hadamard: a normalized Walsh–Hadamard rotation per head, optionally with seeded random sign
// flips, applied to K and/or V before the codec (QuaRot; llama.cpp PR #21038 rotates Q, K, V of a
// quantized cache by a normalized Hadamard matrix). Spreads a few large channels over all
// channels so per-token block formats (q4_0 ...) get smaller scales.
//
// Map: y = H · D · x with H the d x d Sylvester Hadamard matrix scaled by 1/sqrt(d) (symmetric,
// orthogonal) and D = diag(±1) (all +1 unless signs=1; then drawn from CodecContext.seed, so
// deterministic per layer/head/K|V). R = (H D)ᵀ = D H, so
//   Reconstruct: x = D · H · y      FoldQuery: qf = H · D · q (= Forward; exact, orthogonal)
// Requires a power-of-2 dim (UNIMPLEMENTED otherwise). O(d log d) per vector, no parameters
// stored (ParamBytes = 0: signs regenerate from the seed; d/8 bytes if counted).
// Spec: "hadamard" or "hadamard:signs=1".
#pragma once

#include <memory>

#include "kv/transform.h"

namespace kvc::kv {

StatusOr<std::unique_ptr<Transform>> MakeHadamardTransform(const CodecSpec& spec,
                                                           const CodecContext& ctx);

// In-place normalized fast Walsh–Hadamard transform of x [n] (n a power of 2).
void FastHadamard(float* x, int n);

}  // namespace kvc::kv
