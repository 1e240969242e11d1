// q4_1: llama.cpp's 4-bit asymmetric block format (ggml Q4_1) on each cached K/V vector, with the
// Hadamard rotation on by default ("q4_1" = "q4_1:rot=1"; rotation handled by the store, see q4_0.h).
//
// Format (per token, per head): head_dim / 32 blocks along head_dim, each 20 bytes:
//   d  : fp16, d = (max − min) / 15        m : fp16, m = min
//   qs : 16 bytes, byte j = code(x_j) | code(x_{j+16}) << 4, code = min(15, trunc((x − min)/d + 0.5))
//   reconstruct x̂ = code · d + m
// 20 bytes / 32 values = 5.0 bits per value. Needs head_dim % 32 == 0.
// Worked example, 128 tokens x head_dim 64: 128 · 2 · 20 B = 5,120 B.
// Source: ggml quantize_row_q4_1_ref / dequantize_row_q4_1 (spec-quantization.md §6.1).
// Differences from ggml: d and m saturate at ±65504 in fp16 (ggml would store inf); a block whose
// min is below −65504 then reconstructs with a large but finite error.
// Fused: q·k̂ = Σ_b (d_b Σ_j q_j c_j + m_b Σ_j q_j).
#pragma once

#include <cstdint>
#include <memory>

#include "kv/codec.h"

namespace kvc::kv {

StatusOr<std::unique_ptr<Codec>> MakeQ4_1Codec(const CodecSpec& spec, const CodecContext& ctx);

namespace q4_1 {
constexpr int kBlock = 32;
constexpr size_t kBlockBytes = 20;
void QuantizeRowRef(const float* x, int n, uint8_t* out);        // x [n] -> [n/32 · 20]
void DequantizeRowRef(const uint8_t* blocks, int n, float* x);
float DotRef(const float* q, const uint8_t* blocks, int n);      // scalar references
void AxpyRef(float a, const uint8_t* blocks, int n, float* y);
float Dot(const float* q, const uint8_t* blocks, int n);         // kernels used by the codec
void Axpy(float a, const uint8_t* blocks, int n, float* y);
}  // namespace q4_1

}  // namespace kvc::kv
