// PolarQuant (Han, Kacham, Karbasi, Mirrokni, Zandieh, arXiv 2502.02617; spec-quantization.md §4):
// random preconditioning, then a recursive polar transform on blocks of 16 coordinates, 4 levels,
// angles quantized with fixed codebooks from their known distributions, one fp16 radius per block.
//
// Spec: polar (no parameters; optional seed=N for the shared preconditioner, default 42).
// Preconditioner Π: one Haar rotation [d, d] shared by all layers/heads (the paper's S).
// Per 16-coordinate block u of y = Π x:
//   level 1: 8 angles ψ = atan2(u_2j+1, u_2j) ∈ [0, 2π), 4 bits, uniform codebook (k + ½)·2π/16
//   level ℓ = 2,3,4: 4/2/1 angles ψ = atan2(r_2j+1, r_2j) ∈ [0, π/2] on the previous radii,
//            2 bits each, Lloyd–Max codebook for density ∝ sin^(2^(ℓ−1) − 1)(2ψ)
//   radius : fp16 ‖u‖
// 8·4 + 4·2 + 2·2 + 1·2 + 16 = 62 bits / 16 values = 3.875 bits/value (d % 16 == 0).
// Format, one token: d/16 fp16 radii, then the angle codes (LSB-first bit stream, block by block,
// level 1..4), padded to a byte. d = 64: 8 B radii + 23 B codes = 31 B = 3.875 bits/value.
// Worked size, 128 tokens × d 64: 128 × 31 B = 3,968 B (f16: 16,384 B).
// Fused Score: q' = Π q once per query; per token the block is rebuilt in the rotated domain
// (radius × products of cos/sin) and dotted with q' — no Πᵀ per token for keys.
#pragma once

#include <memory>

#include "kv/codec.h"

namespace kvc::kv {
StatusOr<std::unique_ptr<Codec>> MakePolarCodec(const CodecSpec& spec, const CodecContext& ctx);
}  // namespace kvc::kv
