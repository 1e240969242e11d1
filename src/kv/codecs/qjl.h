// QJL: 1-bit quantized Johnson–Lindenstrauss sketch of keys (Zandieh, Daliri, Han, arXiv
// 2406.03482; spec-quantization.md §3). KEYS ONLY.
//
// Spec: qjl:m=M   (M sketch bits per key, M % 8 == 0; default 64 = d for SmolLM2)
// Sketch S [M, d]: Haar-orthogonal rows of unit norm in chunks of d rows (orthogonalised JL, §4.1
// of the paper; chunks are independent). Stored per key: h = sign(S k) ∈ {±1}^M, ν = ‖k‖ (fp16).
// Estimator (asymmetric, q unquantized): <q, k> ≈ κ ν <S q, h>, κ = 1/(M·E|u_1|),
// E|u_1| = Γ(d/2)/(√π Γ((d+1)/2)) — exact for rows uniform on S^{d−1} (E_S[κ ν <Sq, h>] = <q, k>);
// (large d: √d·E|u_1| → sqrt(2/π), i.e. the paper's sqrt(π/2)/M for rows rescaled to norm √d).
//
// Format, one token (block_tokens = 1): fp16 ν | M/8 bytes of sign bits (bit i = 1 ⇔ (S k)_i ≥ 0,
// LSB first). Bits per value = (16 + M)/d: M = 64, d = 64 → 1.25; M = 128 → 2.25; M = 256 → 4.25.
// Worked size, 128 tokens × d 64, M = 64: 128 × 10 B = 1,280 B (f16: 16,384 B).
//
// Scoring on packed bits: PrepareQuery = S q (M floats per query row); Score = κ ν Σ_i ±(S q)_i
// (no decode). Decode is the unbiased reconstruction k̂ = κ ν Sᵀ h, so decode-then-dot equals the
// fused Score up to float rounding. Outlier channels (paper §4.1) are not implemented.
// Values: refused at configuration (CodecContext.kind == kValue).
#pragma once

#include <memory>

#include "kv/codec.h"

namespace kvc::kv {
StatusOr<std::unique_ptr<Codec>> MakeQjlCodec(const CodecSpec& spec, const CodecContext& ctx);
}  // namespace kvc::kv
