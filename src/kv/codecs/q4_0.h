// q4_0: llama.cpp's 4-bit symmetric block format applied to each cached K/V vector (ggml Q4_0),
// with a Hadamard rotation in front by default (llama.cpp PR #21038 rotates quantized caches).
//
// Format (per token, per head): head_dim / 32 blocks along head_dim, each 18 bytes:
//   d   : fp16, d = m / -8 where m is the element of largest |x| (signed)
//   qs  : 16 bytes; byte j = code of element j (low nibble) | code of element j+16 (high nibble)
//         code q = min(15, trunc(x / d + 8.5)) in 0..15, reconstruct x̂ = (q - 8) · d
// 18 bytes / 32 values = 4.5 bits per value (the fp16 scale included). Needs head_dim % 32 == 0.
// Worked example, 128 tokens x head_dim 64: 128 · 2 blocks · 18 B = 4,608 B (vs f16 16,384 B).
// Source: ggml quantize_row_q4_0_ref / dequantize_row_q4_0 (spec-quantization.md §6.1).
//
// Spec "q4_0" is an alias of "q4_0:rot=1": the store (cache.cc MakeStream) turns rot=1 into a
// "hadamard" transform on that stream (keys: folded into the query; values: applied once to the
// attention output), so the codec itself always stores plain q4_0. "q4_0:rot=0" = no rotation.
// A codec built directly with MakeCodec ignores rot (it is the store's business).
// Differences from ggml: the fp16 scale saturates at ±65504 (ggml would store inf for |m| > 524k).
//
// Fused kernels work on the packed nibbles: q·k̂ = Σ_b d_b · (Σ_j q_j c_j − 8 Σ_j q_j), and
// out += p·d_b·(c − 8). Namespace q4_0 exposes the scalar references the tests compare against.
#pragma once

#include <cstdint>
#include <memory>

#include "kv/codec.h"

namespace kvc::kv {

StatusOr<std::unique_ptr<Codec>> MakeQ4_0Codec(const CodecSpec& spec, const CodecContext& ctx);

namespace q4_0 {
constexpr int kBlock = 32;
constexpr size_t kBlockBytes = 18;
// x [n] f32 (n % 32 == 0) -> out [n / 32 · 18] bytes. Exactly ggml's reference quantizer.
void QuantizeRowRef(const float* x, int n, uint8_t* out);
// blocks [n / 32 · 18] -> x [n] f32.
void DequantizeRowRef(const uint8_t* blocks, int n, float* x);
// Scalar references: Σ q_i x̂_i, and y += a · x̂ (over n values, n % 32 == 0).
float DotRef(const float* q, const uint8_t* blocks, int n);
void AxpyRef(float a, const uint8_t* blocks, int n, float* y);
// The kernels the codec uses (block-unpacked, vectorizable); must equal the references to
// float rounding.
float Dot(const float* q, const uint8_t* blocks, int n);
void Axpy(float a, const uint8_t* blocks, int n, float* y);
}  // namespace q4_0

}  // namespace kvc::kv
