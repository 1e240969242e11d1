// GGML tensor types as stored in GGUF files, their block layouts and sizes.
// Layouts follow ggml's reference quantizers (ggml-common.h); our own code, same bytes.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

namespace kvc::gguf {

// Numeric values are the on-disk GGML type ids.
enum class GgmlType : uint32_t {
  kF32 = 0,
  kF16 = 1,
  kQ4_0 = 2,
  kQ4_1 = 3,
  kQ5_0 = 6,
  kQ5_1 = 7,
  kQ8_0 = 8,
  kQ8_1 = 9,
  kQ2_K = 10,
  kQ3_K = 11,
  kQ4_K = 12,
  kQ5_K = 13,
  kQ6_K = 14,
  kQ8_K = 15,
  kBF16 = 30,
};

constexpr int kQK = 32;    // elements per block of the legacy quants (Q4_0, Q4_1, Q8_0, ...)
constexpr int kQK_K = 256; // elements per super-block of the K-quants

// Legacy blocks. d/m are IEEE fp16 bit patterns.
struct BlockQ4_0 { uint16_t d; uint8_t qs[kQK / 2]; };          // 18 B / 32 values
struct BlockQ4_1 { uint16_t d; uint16_t m; uint8_t qs[kQK / 2]; };  // 20 B / 32 values
struct BlockQ5_0 { uint16_t d; uint8_t qh[4]; uint8_t qs[kQK / 2]; };  // 22 B
struct BlockQ5_1 { uint16_t d; uint16_t m; uint8_t qh[4]; uint8_t qs[kQK / 2]; };  // 24 B
struct BlockQ8_0 { uint16_t d; int8_t qs[kQK]; };                // 34 B / 32 values
// K-quants (256-element super-blocks).
struct BlockQ4_K { uint16_t d; uint16_t dmin; uint8_t scales[12]; uint8_t qs[kQK_K / 2]; };  // 144 B
struct BlockQ5_K { uint16_t d; uint16_t dmin; uint8_t scales[12]; uint8_t qh[kQK_K / 8]; uint8_t qs[kQK_K / 2]; };  // 176 B
struct BlockQ6_K { uint8_t ql[kQK_K / 2]; uint8_t qh[kQK_K / 4]; int8_t scales[kQK_K / 16]; uint16_t d; };  // 210 B

static_assert(sizeof(BlockQ4_0) == 18);
static_assert(sizeof(BlockQ4_1) == 20);
static_assert(sizeof(BlockQ5_0) == 22);
static_assert(sizeof(BlockQ5_1) == 24);
static_assert(sizeof(BlockQ8_0) == 34);
static_assert(sizeof(BlockQ4_K) == 144);
static_assert(sizeof(BlockQ5_K) == 176);
static_assert(sizeof(BlockQ6_K) == 210);

struct TypeTraits {
  const char* name;     // "Q4_1"
  int block_elems;      // elements per block (1 for F32/F16/BF16)
  size_t block_bytes;   // bytes per block
  bool supported;       // we can dequantize / multiply it
};

// Traits for a type id; nullptr if the id is unknown to us.
const TypeTraits* GetTypeTraits(uint32_t type_id);
std::string TypeName(uint32_t type_id);

// Dequantize n elements (n a multiple of the type's block_elems) from `src` into f32 `dst`.
// Scalar reference; type must be supported.
void DequantizeRow(GgmlType type, const void* src, float* dst, int64_t n);

// IEEE half / bfloat16 conversions (scalar reference; round-to-nearest-even on the way down).
float Fp16ToFp32(uint16_t h);
uint16_t Fp32ToFp16(float f);
float Bf16ToFp32(uint16_t h);
uint16_t Fp32ToBf16(float f);

}  // namespace kvc::gguf
