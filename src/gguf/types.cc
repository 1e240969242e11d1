// GGML type traits, half/bfloat16 conversions and the scalar reference dequantizers.
//
// The dequantizers follow the block definitions in the GGUF/ggml documentation and reproduce the
// reference results bit for bit: every element is computed with the same float operations in the
// same order (no fused multiply-add; see the pragmas below).
#include "gguf/types.h"

#include <bit>
#include <cstring>

#include "util/check.h"

// Bit-exactness with the reference needs separate rounding of multiply and add.
#if defined(__clang__)
#pragma clang fp contract(off)
#elif defined(__GNUC__)
#pragma GCC optimize("fp-contract=off")
#endif

namespace kvc::gguf {
namespace {

static_assert(std::endian::native == std::endian::little, "GGUF data is little-endian");

constexpr size_t kNumTypeIds = 40;

// Indexed by type id. Unknown / removed ids have a null name. Sizes of the types we do not read
// are listed so that error messages can name them; only `supported` ones are ever dequantized.
constexpr TypeTraits kTraits[kNumTypeIds] = {
    /* 0*/ {"F32", 1, 4, true},
    /* 1*/ {"F16", 1, 2, true},
    /* 2*/ {"Q4_0", kQK, sizeof(BlockQ4_0), true},
    /* 3*/ {"Q4_1", kQK, sizeof(BlockQ4_1), true},
    /* 4*/ {nullptr, 0, 0, false},  // Q4_2, removed from the format
    /* 5*/ {nullptr, 0, 0, false},  // Q4_3, removed
    /* 6*/ {"Q5_0", kQK, sizeof(BlockQ5_0), true},
    /* 7*/ {"Q5_1", kQK, sizeof(BlockQ5_1), true},
    /* 8*/ {"Q8_0", kQK, sizeof(BlockQ8_0), true},
    /* 9*/ {"Q8_1", kQK, 36, false},
    /*10*/ {"Q2_K", kQK_K, 84, false},
    /*11*/ {"Q3_K", kQK_K, 110, false},
    /*12*/ {"Q4_K", kQK_K, sizeof(BlockQ4_K), true},
    /*13*/ {"Q5_K", kQK_K, sizeof(BlockQ5_K), true},
    /*14*/ {"Q6_K", kQK_K, sizeof(BlockQ6_K), true},
    /*15*/ {"Q8_K", kQK_K, 292, false},
    /*16*/ {"IQ2_XXS", kQK_K, 66, false},
    /*17*/ {"IQ2_XS", kQK_K, 74, false},
    /*18*/ {"IQ3_XXS", kQK_K, 98, false},
    /*19*/ {"IQ1_S", kQK_K, 50, false},
    /*20*/ {"IQ4_NL", kQK, 18, false},
    /*21*/ {"IQ3_S", kQK_K, 110, false},
    /*22*/ {"IQ2_S", kQK_K, 82, false},
    /*23*/ {"IQ4_XS", kQK_K, 136, false},
    /*24*/ {"I8", 1, 1, false},
    /*25*/ {"I16", 1, 2, false},
    /*26*/ {"I32", 1, 4, false},
    /*27*/ {"I64", 1, 8, false},
    /*28*/ {"F64", 1, 8, false},
    /*29*/ {"IQ1_M", kQK_K, 56, false},
    /*30*/ {"BF16", 1, 2, true},
    /*31*/ {nullptr, 0, 0, false},  // Q4_0_4_4, removed
    /*32*/ {nullptr, 0, 0, false},  // Q4_0_4_8, removed
    /*33*/ {nullptr, 0, 0, false},  // Q4_0_8_8, removed
    /*34*/ {"TQ1_0", kQK_K, 54, false},
    /*35*/ {"TQ2_0", kQK_K, 66, false},
    /*36*/ {nullptr, 0, 0, false},  // IQ4_NL_4_4, removed
    /*37*/ {nullptr, 0, 0, false},  // IQ4_NL_4_8, removed
    /*38*/ {nullptr, 0, 0, false},  // IQ4_NL_8_8, removed
    /*39*/ {"MXFP4", kQK, 17, false},
};

// Blocks may sit at any byte address (general.alignment can be 1, buffers can be unaligned), so
// each block is copied out before its 16-bit fields are read.
template <typename Block>
Block LoadBlock(const void* src, int64_t b) {
  Block blk;
  std::memcpy(&blk, static_cast<const uint8_t*>(src) + b * sizeof(Block), sizeof(Block));
  return blk;
}

// --- legacy 32-element blocks ------------------------------------------------------------------

// Q4_0: x = d * (q - 8); low nibbles are elements 0..15, high nibbles 16..31.
void DequantizeQ4_0(const void* src, float* dst, int64_t n_blocks) {
  for (int64_t b = 0; b < n_blocks; ++b) {
    const BlockQ4_0 blk = LoadBlock<BlockQ4_0>(src, b);
    const float d = Fp16ToFp32(blk.d);
    float* y = dst + b * kQK;  // [32] f32
    for (int j = 0; j < kQK / 2; ++j) {
      const int x0 = (blk.qs[j] & 0x0F) - 8;
      const int x1 = (blk.qs[j] >> 4) - 8;
      y[j] = x0 * d;
      y[j + kQK / 2] = x1 * d;
    }
  }
}

// Q4_1: x = d * q + m.
void DequantizeQ4_1(const void* src, float* dst, int64_t n_blocks) {
  for (int64_t b = 0; b < n_blocks; ++b) {
    const BlockQ4_1 blk = LoadBlock<BlockQ4_1>(src, b);
    const float d = Fp16ToFp32(blk.d);
    const float m = Fp16ToFp32(blk.m);
    float* y = dst + b * kQK;  // [32] f32
    for (int j = 0; j < kQK / 2; ++j) {
      const int x0 = blk.qs[j] & 0x0F;
      const int x1 = blk.qs[j] >> 4;
      y[j] = x0 * d + m;
      y[j + kQK / 2] = x1 * d + m;
    }
  }
}

// Q5_0 / Q5_1: the fifth bit of element j is bit j of the little-endian u32 qh.
inline uint32_t LoadQh(const uint8_t qh[4]) {
  uint32_t v;
  std::memcpy(&v, qh, sizeof(v));
  return v;
}

// Q5_0: x = d * (q - 16).
void DequantizeQ5_0(const void* src, float* dst, int64_t n_blocks) {
  for (int64_t b = 0; b < n_blocks; ++b) {
    const BlockQ5_0 blk = LoadBlock<BlockQ5_0>(src, b);
    const float d = Fp16ToFp32(blk.d);
    const uint32_t qh = LoadQh(blk.qh);
    float* y = dst + b * kQK;  // [32] f32
    for (int j = 0; j < kQK / 2; ++j) {
      const int h0 = static_cast<int>((qh >> j) & 1u) << 4;
      const int h1 = static_cast<int>((qh >> (j + 16)) & 1u) << 4;
      const int x0 = ((blk.qs[j] & 0x0F) | h0) - 16;
      const int x1 = ((blk.qs[j] >> 4) | h1) - 16;
      y[j] = x0 * d;
      y[j + kQK / 2] = x1 * d;
    }
  }
}

// Q5_1: x = d * q + m.
void DequantizeQ5_1(const void* src, float* dst, int64_t n_blocks) {
  for (int64_t b = 0; b < n_blocks; ++b) {
    const BlockQ5_1 blk = LoadBlock<BlockQ5_1>(src, b);
    const float d = Fp16ToFp32(blk.d);
    const float m = Fp16ToFp32(blk.m);
    const uint32_t qh = LoadQh(blk.qh);
    float* y = dst + b * kQK;  // [32] f32
    for (int j = 0; j < kQK / 2; ++j) {
      const int h0 = static_cast<int>((qh >> j) & 1u) << 4;
      const int h1 = static_cast<int>((qh >> (j + 16)) & 1u) << 4;
      const int x0 = (blk.qs[j] & 0x0F) | h0;
      const int x1 = (blk.qs[j] >> 4) | h1;
      y[j] = x0 * d + m;
      y[j + kQK / 2] = x1 * d + m;
    }
  }
}

// Q8_0: x = d * q.
void DequantizeQ8_0(const void* src, float* dst, int64_t n_blocks) {
  for (int64_t b = 0; b < n_blocks; ++b) {
    const BlockQ8_0 blk = LoadBlock<BlockQ8_0>(src, b);
    const float d = Fp16ToFp32(blk.d);
    float* y = dst + b * kQK;  // [32] f32
    for (int j = 0; j < kQK; ++j) y[j] = blk.qs[j] * d;
  }
}

// --- K-quants (256-element super-blocks of 8 sub-blocks of 32) ---------------------------------

// The 12 scale bytes of Q4_K / Q5_K pack eight 6-bit scales and eight 6-bit mins:
//   bytes 0..3:  low 6 bits = scale[0..3], top 2 bits = scale[4..7] bits 4..5
//   bytes 4..7:  low 6 bits = min[0..3],   top 2 bits = min[4..7] bits 4..5
//   bytes 8..11: low nibble = scale[4..7] bits 0..3, high nibble = min[4..7] bits 0..3
inline void ScaleMinK4(int j, const uint8_t* q, uint8_t* scale, uint8_t* min) {
  if (j < 4) {
    *scale = q[j] & 63;
    *min = q[j + 4] & 63;
  } else {
    *scale = (q[j + 4] & 0x0F) | ((q[j - 4] >> 6) << 4);
    *min = (q[j + 4] >> 4) | ((q[j] >> 6) << 4);
  }
}

// Q4_K: x = (d * scale[s]) * q - (dmin * min[s]) for sub-block s.
void DequantizeQ4_K(const void* src, float* dst, int64_t n_blocks) {
  for (int64_t b = 0; b < n_blocks; ++b) {
    const BlockQ4_K blk = LoadBlock<BlockQ4_K>(src, b);
    const float d = Fp16ToFp32(blk.d);
    const float dmin = Fp16ToFp32(blk.dmin);
    const uint8_t* q = blk.qs;
    float* y = dst + b * kQK_K;  // [256] f32
    for (int j = 0, is = 0; j < kQK_K; j += 64, is += 2, q += 32) {
      uint8_t sc, m;
      ScaleMinK4(is, blk.scales, &sc, &m);
      const float d1 = d * sc, m1 = dmin * m;
      ScaleMinK4(is + 1, blk.scales, &sc, &m);
      const float d2 = d * sc, m2 = dmin * m;
      for (int l = 0; l < 32; ++l) *y++ = d1 * (q[l] & 0x0F) - m1;
      for (int l = 0; l < 32; ++l) *y++ = d2 * (q[l] >> 4) - m2;
    }
  }
}

// Q5_K: as Q4_K with a fifth bit per element from qh (bit pair 2i, 2i+1 for the 64-chunk i).
void DequantizeQ5_K(const void* src, float* dst, int64_t n_blocks) {
  for (int64_t b = 0; b < n_blocks; ++b) {
    const BlockQ5_K blk = LoadBlock<BlockQ5_K>(src, b);
    const float d = Fp16ToFp32(blk.d);
    const float dmin = Fp16ToFp32(blk.dmin);
    const uint8_t* ql = blk.qs;
    const uint8_t* qh = blk.qh;
    float* y = dst + b * kQK_K;  // [256] f32
    uint8_t u1 = 1, u2 = 2;
    for (int j = 0, is = 0; j < kQK_K; j += 64, is += 2, ql += 32) {
      uint8_t sc, m;
      ScaleMinK4(is, blk.scales, &sc, &m);
      const float d1 = d * sc, m1 = dmin * m;
      ScaleMinK4(is + 1, blk.scales, &sc, &m);
      const float d2 = d * sc, m2 = dmin * m;
      for (int l = 0; l < 32; ++l) *y++ = d1 * ((ql[l] & 0x0F) + ((qh[l] & u1) ? 16 : 0)) - m1;
      for (int l = 0; l < 32; ++l) *y++ = d2 * ((ql[l] >> 4) + ((qh[l] & u2) ? 16 : 0)) - m2;
      u1 = static_cast<uint8_t>(u1 << 2);
      u2 = static_cast<uint8_t>(u2 << 2);
    }
  }
}

// Q6_K: x = (d * scale[s]) * (q - 32), q = 4 low bits from ql | 2 high bits from qh; 16 int8
// scales, one per 16 elements.
void DequantizeQ6_K(const void* src, float* dst, int64_t n_blocks) {
  for (int64_t b = 0; b < n_blocks; ++b) {
    const BlockQ6_K blk = LoadBlock<BlockQ6_K>(src, b);
    const float d = Fp16ToFp32(blk.d);
    const uint8_t* ql = blk.ql;
    const uint8_t* qh = blk.qh;
    const int8_t* sc = blk.scales;
    float* y = dst + b * kQK_K;  // [256] f32
    for (int n = 0; n < kQK_K; n += 128, y += 128, ql += 64, qh += 32, sc += 8) {
      for (int l = 0; l < 32; ++l) {
        const int is = l / 16;
        const int q1 = ((ql[l] & 0x0F) | (((qh[l] >> 0) & 3) << 4)) - 32;
        const int q2 = ((ql[l + 32] & 0x0F) | (((qh[l] >> 2) & 3) << 4)) - 32;
        const int q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) - 32;
        const int q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) - 32;
        y[l + 0] = d * sc[is + 0] * q1;
        y[l + 32] = d * sc[is + 2] * q2;
        y[l + 64] = d * sc[is + 4] * q3;
        y[l + 96] = d * sc[is + 6] * q4;
      }
    }
  }
}

}  // namespace

const TypeTraits* GetTypeTraits(uint32_t type_id) {
  if (type_id >= kNumTypeIds || kTraits[type_id].name == nullptr) return nullptr;
  return &kTraits[type_id];
}

std::string TypeName(uint32_t type_id) {
  const TypeTraits* t = GetTypeTraits(type_id);
  return t != nullptr ? t->name : "unknown type " + std::to_string(type_id);
}

void DequantizeRow(GgmlType type, const void* src, float* dst, int64_t n) {
  const TypeTraits* traits = GetTypeTraits(static_cast<uint32_t>(type));
  KVC_CHECK(traits != nullptr && traits->supported);
  KVC_CHECK_EQ(n % traits->block_elems, 0);
  const int64_t n_blocks = n / traits->block_elems;
  switch (type) {
    case GgmlType::kF32:
      std::memcpy(dst, src, static_cast<size_t>(n) * sizeof(float));
      return;
    case GgmlType::kF16:
    case GgmlType::kBF16: {
      const auto* h = static_cast<const uint8_t*>(src);  // [n] u16, possibly unaligned
      for (int64_t i = 0; i < n; ++i) {
        uint16_t v;
        std::memcpy(&v, h + 2 * i, sizeof(v));
        dst[i] = type == GgmlType::kF16 ? Fp16ToFp32(v) : Bf16ToFp32(v);
      }
      return;
    }
    case GgmlType::kQ4_0:
      return DequantizeQ4_0(src, dst, n_blocks);
    case GgmlType::kQ4_1:
      return DequantizeQ4_1(src, dst, n_blocks);
    case GgmlType::kQ5_0:
      return DequantizeQ5_0(src, dst, n_blocks);
    case GgmlType::kQ5_1:
      return DequantizeQ5_1(src, dst, n_blocks);
    case GgmlType::kQ8_0:
      return DequantizeQ8_0(src, dst, n_blocks);
    case GgmlType::kQ4_K:
      return DequantizeQ4_K(src, dst, n_blocks);
    case GgmlType::kQ5_K:
      return DequantizeQ5_K(src, dst, n_blocks);
    case GgmlType::kQ6_K:
      return DequantizeQ6_K(src, dst, n_blocks);
    default:
      KVC_CHECK(false && "unsupported type");
  }
}

// --- half / bfloat16 ---------------------------------------------------------------------------

float Fp16ToFp32(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000) << 16;
  const uint32_t exp = (h >> 10) & 0x1F;
  uint32_t mant = h & 0x3FF;
  uint32_t bits;
  if (exp == 0x1F) {  // inf / nan: keep the payload
    bits = sign | 0x7F800000u | (mant << 13);
  } else if (exp != 0) {  // normal
    bits = sign | ((exp + 112) << 23) | (mant << 13);
  } else if (mant == 0) {  // signed zero
    bits = sign;
  } else {        // subnormal: value = mant * 2^-24, renormalise
    int e = 113;  // exponent of 2^-14 in f32 bias, minus the shifts below
    while ((mant & 0x400) == 0) {
      mant <<= 1;
      --e;
    }
    bits = sign | (static_cast<uint32_t>(e) << 23) | ((mant & 0x3FF) << 13);
  }
  return std::bit_cast<float>(bits);
}

uint16_t Fp32ToFp16(float f) {
  const uint32_t x = std::bit_cast<uint32_t>(f);
  const uint16_t sign = static_cast<uint16_t>((x >> 16) & 0x8000);
  const uint32_t abs = x & 0x7FFFFFFFu;
  if (abs > 0x7F800000u) {  // nan: quiet, keep the top payload bits
    return static_cast<uint16_t>(sign | 0x7E00 | ((abs >> 13) & 0x3FF));
  }
  if (abs >= 0x47800000u) return sign | 0x7C00;  // >= 65536 (or inf): inf
  if (abs >= 0x38800000u) {                      // normal half range (>= 2^-14)
    // Re-bias the exponent and round the 13 dropped bits to nearest even; a carry out of the
    // mantissa correctly bumps the exponent (up to inf at 65520).
    const uint32_t rebias = abs - (112u << 23);
    const uint32_t rounded = rebias + 0xFFF + ((rebias >> 13) & 1);
    const uint32_t h = rounded >> 13;
    return static_cast<uint16_t>(sign | (h >= 0x7C00 ? 0x7C00 : h));
  }
  if (abs < 0x33000000u) return sign;  // < 2^-25: rounds to zero (2^-25 itself ties to even 0)
  // Subnormal half: value = m * 2^-24 with m in [0, 1024]. Shift the full 24-bit significand.
  const uint32_t e = abs >> 23;                      // 102..112
  const uint32_t sig = (abs & 0x7FFFFF) | 0x800000;  // 24-bit significand
  const uint32_t shift = 126 - e;                    // 14..24
  uint32_t m = sig >> shift;
  const uint32_t rem = sig & ((1u << shift) - 1);
  const uint32_t half = 1u << (shift - 1);
  if (rem > half || (rem == half && (m & 1))) ++m;  // may carry into the smallest normal: fine
  return static_cast<uint16_t>(sign | m);
}

float Bf16ToFp32(uint16_t h) { return std::bit_cast<float>(static_cast<uint32_t>(h) << 16); }

uint16_t Fp32ToBf16(float f) {
  const uint32_t x = std::bit_cast<uint32_t>(f);
  if ((x & 0x7FFFFFFFu) > 0x7F800000u) return static_cast<uint16_t>((x >> 16) | 0x40);  // quiet nan
  return static_cast<uint16_t>((x + 0x7FFF + ((x >> 16) & 1)) >> 16);  // round to nearest even
}

}  // namespace kvc::gguf
