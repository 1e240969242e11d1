// TurboQuant (Zandieh, Daliri, Hadian, Mirrokni, arXiv 2504.19874; spec-quantization.md §5):
// random rotation + Lloyd–Max scalar codebooks for the coordinate density of a uniform point on
// S^{d−1}, one norm per vector; optional 1-bit QJL residual for unbiased inner products.
//
// Spec: turbo:bits=B,variant=mse|prod,nc=0|1,split=N,boundary=L
//   bits    2 | 2.5 | 3 | 3.5 | 4 (mse also 1). Fractional B = outlier-channel split: `split`
//           channels (default d/2, chosen as RoPE pairs (2i, 2i+1)) at ceil(B) bits and the rest
//           at floor(B) bits, two independent instances (own rotation, own norms) in the ORIGINAL
//           basis (§5.3). The split set is chosen per (layer, head, K|V) at the first Encode from
//           that vector's RoPE-pair energies |x_2i|² + |x_2i+1|² (RoPE-invariant) and then frozen
//           for the life of the codec (64 bits of per-head state, not per token).
//   variant mse : Algorithm 1. prod: Algorithm 2 = (b−1)-bit mse + 1-bit QJL of the residual
//           r = y − ỹ with a Haar-orthogonal d×d sketch S (unit rows), estimator constant
//           1/(d·E|u_1|), E|u_1| = Γ(d/2)/(√π Γ((d+1)/2)) (exact for rows uniform on the sphere).
//   nc      (mse only) norm correction: store γ/‖ỹ‖ instead of γ so ‖x̂‖ = ‖x‖ (vLLM "NC").
//           Integral bits with split=N: N outlier channels (pairs) get their own rotation and
//           norm at the same width (+16 bits/vector), so outliers no longer set the norm of the rest.
//   boundary first and last L layers use q8_0 instead (vLLM keeps boundary layers unquantized).
//
// Format, one token (block_tokens = 1), per part p (1 part, or 2 for fractional bits):
//   header : fp16 γ_p = ‖x_p‖ (or γ_p/‖ỹ_p‖ with nc) ; prod: + fp16 ρ_p = γ_p·‖r_p‖
//   codes  : LSB-first bit stream: part 0 indices (n_0 × b_0 bits), part 0 signs (prod: n_0 bits),
//            part 1 indices, part 1 signs; padded to a byte.
// Reconstruction (part p, channels C_p, rotation Π_p): x̂_{C_p} = Π_pᵀ(γ_p c[idx] + ρ_p κ S_pᵀ z).
// Bits per value (d = 64): mse b → b + 0.25 (3-bit: 2 + 24 = 26 B); prod b → b + 0.5;
//   2.5 mse → 3.0, 2.5 prod → 3.5, 3.5 mse → 4.0 (spec §0.1 table).
// Worked size, 128 tokens × d 64: turbo3 (mse) 128 × 26 B = 3,328 B (f16: 16,384 B);
//   turbo2.5 (32@3b + 32@2b + 2 norms) 128 × 24 B = 3,072 B.
//
// Attention on packed data (§5.3): PrepareQuery rotates q once per part (q' = Π q; prod also
// S q'); Score = γ Σ_j q'_j c[idx_j] + ρ κ Σ_i (S q')_i z_i — no inverse rotation per token.
// AccumulateWeighted (values) must return the original basis: it decodes the token once (one
// Πᵀ, O(d²)) and adds p·x̂ to every query row; see docs/quantization-advanced.md for the cost and
// the seam hook that would defer Πᵀ to once per query.
#pragma once

#include <memory>

#include "kv/codec.h"

namespace kvc::kv {
StatusOr<std::unique_ptr<Codec>> MakeTurboCodec(const CodecSpec& spec, const CodecContext& ctx);
}  // namespace kvc::kv
