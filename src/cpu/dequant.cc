// Scalar dequantization of GGUF rows, private to the CPU kernels (the oracle side of
// ref::MatMul and the slow path of MatMul for types without an integer kernel).
// Layouts and formulas follow ggml's reference dequantizers (block structs in gguf/types.h).
#include <cstdint>
#include <cstring>

#include "gguf/types.h"

namespace kvc::cpu::internal {

using gguf::GgmlType;

// IEEE binary16 bits -> f32 (handles subnormals, inf, nan).
float HalfToFloat(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000) << 16;
  uint32_t exp = (h >> 10) & 0x1F;
  uint32_t mant = h & 0x3FF;
  uint32_t bits;
  if (exp == 0) {
    if (mant == 0) {
      bits = sign;
    } else {  // subnormal: normalize
      exp = 127 - 15 + 1;
      while ((mant & 0x400) == 0) {
        mant <<= 1;
        --exp;
      }
      mant &= 0x3FF;
      bits = sign | (exp << 23) | (mant << 13);
    }
  } else if (exp == 31) {
    bits = sign | 0x7F800000u | (mant << 13);
  } else {
    bits = sign | ((exp + 127 - 15) << 23) | (mant << 13);
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

// f32 -> IEEE binary16 bits, round to nearest even; overflow -> inf.
uint16_t FloatToHalf(float f) {
  uint32_t x;
  std::memcpy(&x, &f, 4);
  const uint16_t sign = static_cast<uint16_t>((x >> 16) & 0x8000);
  const uint32_t abs = x & 0x7FFFFFFF;
  if (abs >= 0x7F800000) return sign | 0x7C00 | (abs > 0x7F800000 ? 0x200 : 0);  // inf / nan
  if (abs >= 0x477FF000) return sign | 0x7C00;  // rounds to >= 65520: overflow
  if (abs < 0x38800000) {                       // below the smallest normal half: subnormal
    if (abs < 0x33000000) return sign;          // < half of the smallest subnormal
    const uint32_t e = abs >> 23;
    const uint32_t m = (abs & 0x7FFFFF) | 0x800000;
    const uint32_t shift = 126 - e;  // 14 + (113 - e)
    uint32_t r = m >> shift;
    const uint32_t rem = m & ((1u << shift) - 1);
    const uint32_t half = 1u << (shift - 1);
    if (rem > half || (rem == half && (r & 1))) ++r;
    return sign | static_cast<uint16_t>(r);
  }
  uint32_t r = abs - (112u << 23);  // rebias exponent
  const uint32_t rem = r & 0x1FFF;
  r >>= 13;
  if (rem > 0x1000 || (rem == 0x1000 && (r & 1))) ++r;
  return sign | static_cast<uint16_t>(r);
}

float BfloatToFloat(uint16_t h) {
  const uint32_t bits = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

namespace {

// K-quant 6-bit scale / min for sub-block j of a Q4_K / Q5_K super-block.
void ScaleMinK4(int j, const uint8_t* q, uint8_t* d, uint8_t* m) {
  if (j < 4) {
    *d = q[j] & 63;
    *m = q[j + 4] & 63;
  } else {
    *d = (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4);
    *m = (q[j + 4] >> 4) | ((q[j] >> 6) << 4);
  }
}

}  // namespace

// True for the types DequantizeRowScalar handles.
bool CanDequantize(GgmlType type) {
  switch (type) {
    case GgmlType::kF32:
    case GgmlType::kF16:
    case GgmlType::kBF16:
    case GgmlType::kQ4_0:
    case GgmlType::kQ4_1:
    case GgmlType::kQ5_0:
    case GgmlType::kQ8_0:
    case GgmlType::kQ4_K:
    case GgmlType::kQ5_K:
    case GgmlType::kQ6_K:
      return true;
    default:
      return false;
  }
}

// src: one row of n elements in `type`'s GGUF encoding; dst [n] f32. n is a multiple of the
// type's block size; type satisfies CanDequantize.
void DequantizeRowScalar(GgmlType type, const void* src, float* dst, int64_t n) {
  const auto* bytes = static_cast<const uint8_t*>(src);
  switch (type) {
    case GgmlType::kF32:
      std::memcpy(dst, src, n * sizeof(float));
      return;
    case GgmlType::kF16:
    case GgmlType::kBF16:
      for (int64_t i = 0; i < n; ++i) {
        uint16_t h;
        std::memcpy(&h, bytes + 2 * i, 2);
        dst[i] = type == GgmlType::kF16 ? HalfToFloat(h) : BfloatToFloat(h);
      }
      return;
    case GgmlType::kQ4_0:
    case GgmlType::kQ4_1: {
      const bool has_min = type == GgmlType::kQ4_1;
      const size_t bsize = has_min ? sizeof(gguf::BlockQ4_1) : sizeof(gguf::BlockQ4_0);
      for (int64_t b = 0; b < n / gguf::kQK; ++b) {
        const uint8_t* blk = bytes + b * bsize;
        uint16_t dh, mh = 0;
        std::memcpy(&dh, blk, 2);
        if (has_min) std::memcpy(&mh, blk + 2, 2);
        const uint8_t* qs = blk + (has_min ? 4 : 2);
        const float d = HalfToFloat(dh);
        const float m = has_min ? HalfToFloat(mh) : 0.0f;
        const int offset = has_min ? 0 : 8;
        float* y = dst + b * gguf::kQK;
        for (int j = 0; j < 16; ++j) {
          const int x0 = (qs[j] & 0xF) - offset;
          const int x1 = (qs[j] >> 4) - offset;
          y[j] = has_min ? x0 * d + m : x0 * d;
          y[j + 16] = has_min ? x1 * d + m : x1 * d;
        }
      }
      return;
    }
    case GgmlType::kQ5_0: {
      const auto* blocks = static_cast<const gguf::BlockQ5_0*>(src);
      for (int64_t b = 0; b < n / gguf::kQK; ++b) {
        const float d = HalfToFloat(blocks[b].d);
        uint32_t qh;
        std::memcpy(&qh, blocks[b].qh, 4);
        float* y = dst + b * gguf::kQK;
        for (int j = 0; j < 16; ++j) {
          const uint8_t xh0 = ((qh >> j) << 4) & 0x10;
          const uint8_t xh1 = (qh >> (j + 12)) & 0x10;
          y[j] = (((blocks[b].qs[j] & 0x0F) | xh0) - 16) * d;
          y[j + 16] = (((blocks[b].qs[j] >> 4) | xh1) - 16) * d;
        }
      }
      return;
    }
    case GgmlType::kQ8_0: {
      const auto* blocks = static_cast<const gguf::BlockQ8_0*>(src);
      for (int64_t b = 0; b < n / gguf::kQK; ++b) {
        const float d = HalfToFloat(blocks[b].d);
        for (int j = 0; j < gguf::kQK; ++j) dst[b * gguf::kQK + j] = blocks[b].qs[j] * d;
      }
      return;
    }
    case GgmlType::kQ4_K:
    case GgmlType::kQ5_K: {
      const bool q5 = type == GgmlType::kQ5_K;
      const size_t bsize = q5 ? sizeof(gguf::BlockQ5_K) : sizeof(gguf::BlockQ4_K);
      for (int64_t b = 0; b < n / gguf::kQK_K; ++b) {
        const uint8_t* blk = bytes + b * bsize;
        uint16_t dh, mh;
        std::memcpy(&dh, blk, 2);
        std::memcpy(&mh, blk + 2, 2);
        const float d = HalfToFloat(dh);
        const float dmin = HalfToFloat(mh);
        const uint8_t* scales = blk + 4;
        const uint8_t* qh = blk + 16;  // Q5_K only
        const uint8_t* ql = blk + 16 + (q5 ? gguf::kQK_K / 8 : 0);
        float* y = dst + b * gguf::kQK_K;
        uint8_t u1 = 1, u2 = 2;
        for (int j = 0, is = 0; j < gguf::kQK_K; j += 64, is += 2) {
          uint8_t sc, m;
          ScaleMinK4(is, scales, &sc, &m);
          const float d1 = d * sc, m1 = dmin * m;
          ScaleMinK4(is + 1, scales, &sc, &m);
          const float d2 = d * sc, m2 = dmin * m;
          for (int l = 0; l < 32; ++l) {
            const int h1 = q5 && (qh[l] & u1) ? 16 : 0;
            const int h2 = q5 && (qh[l] & u2) ? 16 : 0;
            y[j + l] = d1 * ((ql[l] & 0xF) + h1) - m1;
            y[j + l + 32] = d2 * ((ql[l] >> 4) + h2) - m2;
          }
          ql += 32;
          u1 <<= 2;
          u2 <<= 2;
        }
      }
      return;
    }
    case GgmlType::kQ6_K: {
      const auto* blocks = static_cast<const gguf::BlockQ6_K*>(src);
      for (int64_t b = 0; b < n / gguf::kQK_K; ++b) {
        const float d = HalfToFloat(blocks[b].d);
        const uint8_t* ql = blocks[b].ql;
        const uint8_t* qh = blocks[b].qh;
        const int8_t* sc = blocks[b].scales;
        float* y = dst + b * gguf::kQK_K;
        for (int n128 = 0; n128 < gguf::kQK_K; n128 += 128) {
          for (int l = 0; l < 32; ++l) {
            const int is = l / 16;
            const int q1 = ((ql[l] & 0xF) | (((qh[l] >> 0) & 3) << 4)) - 32;
            const int q2 = ((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) - 32;
            const int q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) - 32;
            const int q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) - 32;
            y[l] = d * sc[is] * q1;
            y[l + 32] = d * sc[is + 2] * q2;
            y[l + 64] = d * sc[is + 4] * q3;
            y[l + 96] = d * sc[is + 6] * q4;
          }
          y += 128;
          ql += 64;
          qh += 32;
          sc += 8;
        }
      }
      return;
    }
    default:
      return;  // unreachable for CanDequantize types
  }
}

}  // namespace kvc::cpu::internal
