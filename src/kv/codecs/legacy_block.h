// Shared Codec shell for the llama.cpp per-token block formats (q4_0, q4_1, q5_0): each format
// supplies its row functions (blocks of 32 along head_dim); this adapts them to the Codec
// interface and builds instances with the common checks. The formats themselves are documented
// in their own headers.
#pragma once

#include <memory>
#include <string>

#include "kv/codec.h"

namespace kvc::kv {

struct LegacyBlockFormat {
  const char* name;      // "q4_0"
  size_t block_bytes;    // bytes per 32 values
  void (*quantize)(const float* x, int n, uint8_t* out);            // x [n] -> blocks
  void (*dequantize)(const uint8_t* blocks, int n, float* x);       // blocks -> x [n]
  float (*dot)(const float* q, const uint8_t* blocks, int n);       // <q, decode(blocks)>
  void (*axpy)(float a, const uint8_t* blocks, int n, float* y);    // y += a · decode(blocks)
  // Highway row decoder (cpu/kv_kernels.h): rows [n_rows, dim / 32 · block_bytes] -> [n_rows, dim].
  // Used by Decode and by ScoreBlocks / AccumulateBlocks (decode a small f32 tile, then SIMD dot /
  // axpy over all query rows); Score / AccumulateWeighted (dot / axpy above) stay the per-block
  // references they are tested against.
  void (*decode_rows)(const uint8_t* rows, int64_t n_rows, int dim, float* x);
};

// Consumes `rot` (turned into a "hadamard" transform by the store), rejects unknown parameters,
// UNIMPLEMENTED when ctx.dim % 32 != 0.
StatusOr<std::unique_ptr<Codec>> MakeLegacyBlockCodec(const LegacyBlockFormat& f,
                                                      const CodecSpec& spec, const CodecContext& ctx);

}  // namespace kvc::kv
