// q8_0: llama.cpp's 8-bit block format applied to each cached K/V vector (ggml Q8_0).
//
// Format (per token, per head): head_dim / 32 blocks along head_dim, each
//   d   : fp16 scale = max|x| / 127 (block absmax)
//   qs  : 32 x int8, q = round(x / d)          reconstruct x̂ = q · d
// 34 bytes / 32 values = 8.5 bits per value. Requires head_dim % 32 == 0 (else UNIMPLEMENTED).
// Worked example, 128 tokens x head_dim 64: 128 · 2 blocks · 34 B = 8,704 B (vs f16 16,384 B).
// Source: ggml quantize_row_q8_0_ref (spec-quantization.md §6.1).
// Fused scoring reads the int8 codes directly: q·k̂ = Σ_blocks d_b · Σ_i q_i · c_i.
#pragma once

#include <memory>

#include "kv/codec.h"

namespace kvc::kv {
StatusOr<std::unique_ptr<Codec>> MakeQ8_0Codec(const CodecSpec& spec, const CodecContext& ctx);
}  // namespace kvc::kv
