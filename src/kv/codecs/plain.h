// Plain per-token float formats: f32, f16, bf16. Same interface as every other codec.
//
// Format (per token, per head, d = head_dim): d values, no metadata.
//   f32 : 4 B/value, 32 bits/value.   Worked example, 128 tokens x d=64: 128*64*4 = 32,768 B.
//   f16 : IEEE binary16, 2 B/value, 16 bits/value (finite values beyond ±65504 saturate to
//         ±65504 rather than overflowing to inf).           128 x 64: 16,384 B.
//   bf16: bfloat16 (round to nearest even), 16 bits/value.  128 x 64: 16,384 B.
#pragma once

#include <memory>

#include "kv/codec.h"

namespace kvc::kv {
StatusOr<std::unique_ptr<Codec>> MakeF32Codec(const CodecSpec& spec, const CodecContext& ctx);
StatusOr<std::unique_ptr<Codec>> MakeF16Codec(const CodecSpec& spec, const CodecContext& ctx);
StatusOr<std::unique_ptr<Codec>> MakeBf16Codec(const CodecSpec& spec, const CodecContext& ctx);
}  // namespace kvc::kv
