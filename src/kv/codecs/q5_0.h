// q5_0: llama.cpp's 5-bit symmetric block format (ggml Q5_0) on each cached K/V vector, with the
// Hadamard rotation on by default ("q5_0" = "q5_0:rot=1"; rotation handled by the store, see q4_0.h).
//
// Format (per token, per head): head_dim / 32 blocks along head_dim, each 22 bytes:
//   d  : fp16, d = m / −16, m = the element of largest |x| (signed)
//   qh : 4 bytes (uint32 LE): bit j = bit 4 of code j (j = 0..31)
//   qs : 16 bytes, byte j = low 4 bits of code j | low 4 bits of code j+16 << 4
//   code = min(31, trunc(x / d + 16.5)), reconstruct x̂ = (code − 16) · d
// 22 bytes / 32 values = 5.5 bits per value. Needs head_dim % 32 == 0.
// Worked example, 128 tokens x head_dim 64: 128 · 2 · 22 B = 5,632 B.
// Source: ggml quantize_row_q5_0_ref / dequantize_row_q5_0 (spec-quantization.md §6.1).
// Differences from ggml: fp16 scale saturates at ±65504.
#pragma once

#include <cstdint>
#include <memory>

#include "kv/codec.h"

namespace kvc::kv {

StatusOr<std::unique_ptr<Codec>> MakeQ5_0Codec(const CodecSpec& spec, const CodecContext& ctx);

namespace q5_0 {
constexpr int kBlock = 32;
constexpr size_t kBlockBytes = 22;
void QuantizeRowRef(const float* x, int n, uint8_t* out);        // x [n] -> [n/32 · 22]
void DequantizeRowRef(const uint8_t* blocks, int n, float* x);
float DotRef(const float* q, const uint8_t* blocks, int n);      // scalar references
void AxpyRef(float a, const uint8_t* blocks, int n, float* y);
float Dot(const float* q, const uint8_t* blocks, int n);         // kernels used by the codec
void Axpy(float a, const uint8_t* blocks, int n, float* y);
}  // namespace q5_0

}  // namespace kvc::kv
