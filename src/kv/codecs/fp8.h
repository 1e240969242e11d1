// fp8: OCP FP8 E4M3 ("E4M3FN": 1 sign, 4 exponent bits with bias 7, 3 mantissa bits, no inf,
// max ±448, 0x7F/0xFF = NaN and never produced) with one fp16 scale per cached vector.
//
// Format (per token, per head), dim + 2 bytes:
//   s     : fp16, s = absmax(x) / 448, rounded *up* to the next fp16 so that |x| / s <= 448
//           (no clipping from rounding the scale); s = 0 for an all-zero vector
//   codes : dim x uint8 E4M3, code = RNE(x / s) saturated to ±448; reconstruct x̂ = e4m3(code) · s
// Bits per value: 8 + 16 / dim (8.25 at head_dim 64, 8.125 at 128).
// Worked example, 128 tokens x head_dim 64: 128 · (64 + 2) B = 8,448 B (vs f16 16,384 B).
// Source: OCP 8-bit Floating Point Specification (OFP8) rev 1.0, E4M3; vLLM fp8 KV cache
// (spec-quantization.md §6.2).
//
// Why a per-vector dynamic scale instead of vLLM's per-layer static scale (default 1.0): no
// calibration is needed, a vector with large outliers cannot saturate (vLLM with s = 1 clips at
// 448 and loses everything below 2^-9 = 0.002 to zero/subnormals), and the cost is 0.25 bit/value
// at head_dim 64. Error per element: relative <= 2^-4 (RNE, 3 mantissa bits) where |x|/s >= 2^-6
// (E4M3 normals); below that (subnormals) absolute <= 2^-10 · s.
// Fused kernels decode codes through a 256-entry table: q·k̂ = s · Σ_i q_i · T[c_i].
#pragma once

#include <cstdint>
#include <memory>

#include "kv/codec.h"

namespace kvc::kv {

StatusOr<std::unique_ptr<Codec>> MakeFp8Codec(const CodecSpec& spec, const CodecContext& ctx);

namespace fp8 {
// Scalar reference conversions (OCP E4M3FN, round to nearest even, saturating to ±448).
uint8_t FloatToE4M3(float x);
float E4M3ToFloat(uint8_t c);   // NaN for 0x7F / 0xFF
}  // namespace fp8

}  // namespace kvc::kv
