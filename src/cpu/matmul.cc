// Weight preparation and MatMul (y = x · Wᵀ) for the CPU backend.
//
// Integer path (Q4_0, Q4_1, Q5_0, Q8_0): weights are repacked at load into groups of kRows = 16
// output rows, block-major inside a group, so one SIMD lane (i32) accumulates one output row:
//   nibble format (Q4_0, Q4_1), per group and 32-element block, 320 B:
//     qs [4 chunks][16 rows][4 bytes] u8: chunk c, row i, byte t holds element 8c+t of row i in
//        the low nibble and element 8c+4+t in the high nibble (unsigned 0..15);
//     d [16] f16, m [16] f16: w = d*q + m (Q4_0 becomes m = -8 d, exact in f16).
//   byte format (Q8_0, Q5_0), 544 B: qs [8 chunks][16 rows][4 bytes] i8 (chunk c holds elements
//     4c..4c+3), then d [16] f16 (Q5_0 stores q - 16 as i8).
// Bytes per row and block equal the GGUF ones (20 / 34); rows are padded to a multiple of 16.
// Activations are quantized per 32-block to i8 (d_x = max|x| / 127, s_x = d_x * sum(q_x)); a block
// contributes d_w d_x Σ q_w q_x + m_w s_x. The 4 activation bytes of a chunk are broadcast to all
// lanes and multiplied with 4 bytes of each of 16 rows (VNNI vpdpbusd on AVX3_DL; maddubs on
// AVX2/AVX3; portable shifts elsewhere). Prefill tiles 4 tokens × 16 rows so each weight block
// is unpacked once per 4 tokens. OpenMP splits the row groups statically.
//
// Float path (F32, F16, BF16, Q4_K, Q5_K, Q6_K): each row is dequantized to f32 (SIMD for F16 /
// BF16, scalar for K-quants) and dotted with every token in f32.
#ifndef HWY_WANT_AVX3_DL
#define HWY_WANT_AVX3_DL  // compile the VNNI target too (Highway 1.0 omits it by default)
#endif

#ifndef KVC_CPU_MATMUL_SHARED_
#define KVC_CPU_MATMUL_SHARED_
#include <omp.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <string>
#include <vector>

#include <fmt/format.h>

#include "cpu/ops.h"
#include "hwy/aligned_allocator.h"
#include "hwy/cache_control.h"
#include "util/check.h"

namespace kvc::cpu {
namespace internal {
// The GGUF reader's scalar conversions / dequantizers are the one implementation.
inline float HalfToFloat(uint16_t h) { return gguf::Fp16ToFp32(h); }
inline uint16_t FloatToHalf(float f) { return gguf::Fp32ToFp16(f); }
inline void DequantizeRowScalar(gguf::GgmlType type, const void* src, float* dst, int64_t n) {
  gguf::DequantizeRow(type, src, dst, n);
}
}  // namespace internal
namespace mm {
constexpr int kRows = 16;                            // output rows per packed group
constexpr int kTile = 4;                             // tokens per prefill micro-kernel
constexpr size_t kNibbleBlockBytes = 256 + 32 + 32;  // per group and block
constexpr size_t kByteBlockBytes = 512 + 32;
}  // namespace mm
}  // namespace kvc::cpu
#endif  // KVC_CPU_MATMUL_SHARED_

#undef HWY_TARGET_INCLUDE
#define HWY_TARGET_INCLUDE "cpu/matmul.cc"
#include "hwy/foreach_target.h"  // IWYU pragma: keep
#include "hwy/highway.h"

HWY_BEFORE_NAMESPACE();
namespace kvc::cpu::HWY_NAMESPACE {
namespace hn = hwy::HWY_NAMESPACE;

#if HWY_TARGET == HWY_SCALAR
// Scalar fallback of the kernel below (same packed layout and arithmetic, no xor trick).
template <int kT, bool kNibble>
void GroupKernel(const uint8_t* HWY_RESTRICT g, int64_t n_blocks, const int8_t* HWY_RESTRICT q,
                 int64_t n_in, const float* HWY_RESTRICT dx, const float* HWY_RESTRICT sx,
                 float* HWY_RESTRICT out) {
  constexpr size_t kBlockBytes = kNibble ? mm::kNibbleBlockBytes : mm::kByteBlockBytes;
  for (int t = 0; t < kT; ++t) {
    for (int i = 0; i < mm::kRows; ++i) {
      float acc = 0.0f;
      for (int64_t b = 0; b < n_blocks; ++b) {
        const uint8_t* blk = g + b * kBlockBytes;
        const int8_t* qb = q + t * n_in + b * gguf::kQK;
        int32_t sum = 0;
        uint16_t dh, mh = 0;
        if constexpr (kNibble) {
          for (int c = 0; c < 4; ++c) {
            for (int k = 0; k < 4; ++k) {
              const uint8_t v = blk[c * 64 + 4 * i + k];
              sum += (v & 0xF) * qb[8 * c + k] + (v >> 4) * qb[8 * c + 4 + k];
            }
          }
          std::memcpy(&dh, blk + 256 + 2 * i, 2);
          std::memcpy(&mh, blk + 288 + 2 * i, 2);
        } else {
          for (int c = 0; c < 8; ++c) {
            for (int k = 0; k < 4; ++k) {
              sum += static_cast<int8_t>(blk[c * 64 + 4 * i + k]) * qb[4 * c + k];
            }
          }
          std::memcpy(&dh, blk + 512 + 2 * i, 2);
        }
        const int64_t bt = t * n_blocks + b;
        acc += internal::HalfToFloat(dh) * dx[bt] * static_cast<float>(sum);
        if constexpr (kNibble) acc += internal::HalfToFloat(mh) * sx[bt];
      }
      out[t * mm::kRows + i] = acc;
    }
  }
}
#else
using DI = hn::CappedTag<int32_t, mm::kRows>;  // one lane per output row
using VI = hn::Vec<DI>;
using VU8 = hn::Vec<hn::Repartition<uint8_t, DI>>;
using VI8 = hn::Vec<hn::Repartition<int8_t, DI>>;

HWY_INLINE int32_t Load4(const int8_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return v;
}

// Portable: acc[i] += Σ_k a[4i+k] * b[4i+k]; a's bytes unsigned (kSignedA false) or signed.
template <bool kSignedA>
HWY_INLINE VI DotQuadPortable(VI acc, hn::Vec<hn::Repartition<uint8_t, DI>> a, VI8 b) {
  const DI di;
  const VI ai = hn::BitCast(di, a);
  const VI bi = hn::BitCast(di, b);
  const VI mask = hn::Set(di, 0xFF);
  VI a0, a1, a2, a3;
  if (kSignedA) {
    a0 = hn::ShiftRight<24>(hn::ShiftLeft<24>(ai));
    a1 = hn::ShiftRight<24>(hn::ShiftLeft<16>(ai));
    a2 = hn::ShiftRight<24>(hn::ShiftLeft<8>(ai));
    a3 = hn::ShiftRight<24>(ai);
  } else {
    a0 = hn::And(ai, mask);
    a1 = hn::And(hn::ShiftRight<8>(ai), mask);
    a2 = hn::And(hn::ShiftRight<16>(ai), mask);
    a3 = hn::BitCast(di, hn::ShiftRight<24>(hn::BitCast(hn::RebindToUnsigned<DI>(), ai)));
  }
  acc = hn::Add(acc, hn::Mul(a0, hn::ShiftRight<24>(hn::ShiftLeft<24>(bi))));
  acc = hn::Add(acc, hn::Mul(a1, hn::ShiftRight<24>(hn::ShiftLeft<16>(bi))));
  acc = hn::Add(acc, hn::Mul(a2, hn::ShiftRight<24>(hn::ShiftLeft<8>(bi))));
  return hn::Add(acc, hn::Mul(a3, hn::ShiftRight<24>(bi)));
}

#if HWY_TARGET == HWY_AVX3_DL
// acc += u8 a · i8 b per 4-byte group. Inline asm: Highway 1.0's AVX3_DL target attribute lacks
// "avx512vnni" (so the intrinsic cannot inline), but AVX3_DL dispatch requires the CPU feature.
HWY_INLINE __m512i Vpdpbusd(__m512i acc, __m512i a, __m512i b) {
  asm("vpdpbusd %[b], %[a], %[acc]" : [acc] "+v"(acc) : [a] "v"(a), [b] "v"(b));
  return acc;
}
#endif

// acc[i] += Σ_k a[4i+k] * b[4i+k], a unsigned bytes (nibbles, < 128), b signed bytes.
HWY_INLINE VI DotU8I8(VI acc, VU8 a, VI8 b) {
#if HWY_TARGET == HWY_AVX3_DL
  return VI{Vpdpbusd(acc.raw, a.raw, b.raw)};
#elif HWY_TARGET == HWY_AVX3
  const __m512i p = _mm512_maddubs_epi16(a.raw, b.raw);  // no saturation: |15·127·2| < 2^15
  return hn::Add(acc, VI{_mm512_madd_epi16(p, _mm512_set1_epi16(1))});
#elif HWY_TARGET == HWY_AVX2
  const __m256i p = _mm256_maddubs_epi16(a.raw, b.raw);
  return hn::Add(acc, VI{_mm256_madd_epi16(p, _mm256_set1_epi16(1))});
#else
  return DotQuadPortable<false>(acc, a, b);
#endif
}

// Signed weights (byte format). On AVX3_DL: returns Σ (a + 128) b; the caller subtracts
// 128 Σ b through the block-sum term. Elsewhere the exact Σ a b.
constexpr bool kByteXor = HWY_TARGET == HWY_AVX3_DL;
HWY_INLINE VI DotI8I8(VI acc, VI8 a, VI8 b) {
#if HWY_TARGET == HWY_AVX3_DL
  const __m512i au = _mm512_xor_si512(a.raw, _mm512_set1_epi8(static_cast<char>(0x80)));
  return VI{Vpdpbusd(acc.raw, au, b.raw)};
#else
  return DotQuadPortable<true>(acc, hn::BitCast(hn::Repartition<uint8_t, DI>(), a), b);
#endif
}

template <int kSplit>
HWY_INLINE VI SumSplit(const VI (&a)[kSplit]) {
  if constexpr (kSplit == 1) return a[0];
  if constexpr (kSplit == 2) return hn::Add(a[0], a[1]);
  if constexpr (kSplit == 4) return hn::Add(hn::Add(a[0], a[1]), hn::Add(a[2], a[3]));
}

// AVX3_DL: vpdpbusd has no 16-bit saturation, so high nibbles can stay in place (x16).
constexpr bool kHiMask = HWY_TARGET == HWY_AVX3_DL;

// Exact block sum: lo parts + (16 hi parts) / 16 when kHiMask.
template <int kSplit, int kSplitH>
HWY_INLINE VI BlockSum(const VI (&a)[kSplit], const VI (&h)[kSplitH]) {
  if constexpr (kHiMask) return hn::Add(SumSplit(a), hn::ShiftRight<4>(SumSplit(h)));
  return SumSplit(a);
}

// One group of 16 rows times kT tokens: out [kT, 16] f32.
// g: the group's packed blocks; q [kT rows of stride n_in] i8; dx, sx [kT rows of stride
// n_blocks] f32 (per-block activation scale and scale * sum of q).
template <int kT, bool kNibble>
HWY_INLINE void GroupKernel(const uint8_t* HWY_RESTRICT g, int64_t n_blocks,
                            const int8_t* HWY_RESTRICT q, int64_t n_in,
                            const float* HWY_RESTRICT dx, const float* HWY_RESTRICT sx,
                            float* HWY_RESTRICT out) {
  const DI di;
  const hn::Rebind<float, DI> df;
  const hn::Rebind<hwy::float16_t, DI> dh;
  const hn::Repartition<uint8_t, DI> du8;
  const hn::Repartition<int8_t, DI> di8;
  const hn::Repartition<uint16_t, DI> du16;
  using VF = hn::Vec<decltype(df)>;
  constexpr size_t kN = hn::MaxLanes(di);
  constexpr int kV = mm::kRows / kN;  // vectors per 16 rows
  constexpr size_t kBlockBytes = kNibble ? mm::kNibbleBlockBytes : mm::kByteBlockBytes;
  constexpr size_t kQsBytes = kNibble ? 256 : 512;
  constexpr bool kMinTerm = kNibble || kByteXor;
  constexpr size_t kPrefetchBytes = 8 * kBlockBytes;  // a few blocks ahead, one line per block
  VF acc[kT][kV];
  for (int t = 0; t < kT; ++t) {
    for (int v = 0; v < kV; ++v) acc[t][v] = hn::Zero(df);
  }
  const VU8 low4 = hn::Set(du8, 0x0F);
  for (int64_t b = 0; b < n_blocks; ++b) {
    const uint8_t* blk = g + b * kBlockBytes;
    const int8_t* qb = q + b * gguf::kQK;
    // Few tokens: split each row's block sum over kSplit independent accumulators so the
    // vpdpbusd chain (latency 5) does not serialize decode.
    constexpr int kSplit = kT >= 4 ? 1 : (kT >= 2 ? 2 : 4);
    VI ai[kT][kV][kSplit];
    constexpr int kSplitH = kT >= 4 ? 1 : 2;
    VI ah[kT][kV][kSplitH];  // kHiMask only: Σ 16 hi q_x, a multiple of 16
    for (int t = 0; t < kT; ++t) {
      for (int v = 0; v < kV; ++v) {
        for (int k = 0; k < kSplit; ++k) ai[t][v][k] = hn::Zero(di);
        for (int k = 0; k < kSplitH; ++k) ah[t][v][k] = hn::Zero(di);
      }
    }
    if (kT == 1) hwy::Prefetch(blk + kPrefetchBytes);  // per-core bandwidth is the decode limit
    if constexpr (kNibble) {
      for (int c = 0; c < 4; ++c) {
        for (int v = 0; v < kV; ++v) {
          const VU8 raw = hn::LoadU(du8, blk + c * 64 + v * kN * 4);
          const VU8 lo = hn::And(raw, low4);
          // kHiMask: 16 * high nibble (no shift on the busy port; summed apart, >> 4 later).
          const VU8 hi =
              kHiMask ? hn::And(raw, hn::Set(du8, 0xF0))
                      : hn::And(hn::BitCast(du8, hn::ShiftRight<4>(hn::BitCast(du16, raw))), low4);
          for (int t = 0; t < kT; ++t) {
            const int8_t* qt = qb + t * n_in + 8 * c;
            VI& a = ai[t][v][c % kSplit];
            a = DotU8I8(a, lo, hn::BitCast(di8, hn::Set(di, Load4(qt))));
            VI& h = kHiMask ? ah[t][v][c % kSplitH] : a;
            h = DotU8I8(h, hi, hn::BitCast(di8, hn::Set(di, Load4(qt + 4))));
          }
        }
      }
    } else {
      for (int c = 0; c < 8; ++c) {
        for (int v = 0; v < kV; ++v) {
          const VI8 raw =
              hn::LoadU(di8, reinterpret_cast<const int8_t*>(blk) + c * 64 + v * kN * 4);
          for (int t = 0; t < kT; ++t) {
            const int8_t* qt = qb + t * n_in + 4 * c;
            VI& a = ai[t][v][c % kSplit];
            a = DotI8I8(a, raw, hn::BitCast(di8, hn::Set(di, Load4(qt))));
          }
        }
      }
    }
    const auto* scales = reinterpret_cast<const hwy::float16_t*>(blk + kQsBytes);
    for (int v = 0; v < kV; ++v) {
      const VF dw = hn::PromoteTo(df, hn::LoadU(dh, scales + v * kN));
      VF mw = hn::Zero(df);
      if constexpr (kNibble) {
        mw = hn::PromoteTo(df, hn::LoadU(dh, scales + mm::kRows + v * kN));
      } else if constexpr (kByteXor) {
        mw = hn::Mul(dw, hn::Set(df, -128.0f));
      }
      for (int t = 0; t < kT; ++t) {
        const int64_t bt = t * n_blocks + b;
        const VF scale = hn::Mul(dw, hn::Set(df, dx[bt]));
        acc[t][v] = hn::MulAdd(hn::ConvertTo(df, BlockSum(ai[t][v], ah[t][v])), scale, acc[t][v]);
        if constexpr (kMinTerm) acc[t][v] = hn::MulAdd(mw, hn::Set(df, sx[bt]), acc[t][v]);
      }
    }
  }
  for (int t = 0; t < kT; ++t) {
    for (int v = 0; v < kV; ++v) hn::StoreU(acc[t][v], df, out + t * mm::kRows + v * kN);
  }
}

#endif  // HWY_TARGET == HWY_SCALAR

template <bool kNibble>
void MatMulPackedT(const uint8_t* packed, int64_t n_groups, int64_t n_blocks, int64_t n_out,
                   const int8_t* q, const float* dx, const float* sx, int64_t n_tokens, float* y,
                   int n_threads) {
  const int64_t n_in = n_blocks * gguf::kQK;
  const size_t group_bytes = n_blocks * (kNibble ? mm::kNibbleBlockBytes : mm::kByteBlockBytes);
#pragma omp parallel for schedule(static) num_threads(n_threads)
  for (int64_t g = 0; g < n_groups; ++g) {
    HWY_ALIGN float out[mm::kTile * mm::kRows];
    const uint8_t* gp = packed + g * group_bytes;
    const int64_t row0 = g * mm::kRows;
    const int64_t rows = std::min<int64_t>(mm::kRows, n_out - row0);
    for (int64_t t0 = 0; t0 < n_tokens; t0 += mm::kTile) {
      const int kt = static_cast<int>(std::min<int64_t>(mm::kTile, n_tokens - t0));
      const int8_t* qt = q + t0 * n_in;
      const float* dxt = dx + t0 * n_blocks;
      const float* sxt = sx + t0 * n_blocks;
      switch (kt) {
        case 4:
          GroupKernel<4, kNibble>(gp, n_blocks, qt, n_in, dxt, sxt, out);
          break;
        case 3:
          GroupKernel<3, kNibble>(gp, n_blocks, qt, n_in, dxt, sxt, out);
          break;
        case 2:
          GroupKernel<2, kNibble>(gp, n_blocks, qt, n_in, dxt, sxt, out);
          break;
        default:
          GroupKernel<1, kNibble>(gp, n_blocks, qt, n_in, dxt, sxt, out);
          break;
      }
      for (int t = 0; t < kt; ++t) {
        std::memcpy(y + (t0 + t) * n_out + row0, out + t * mm::kRows, rows * sizeof(float));
      }
    }
  }
}

// packed: groups of 16 rows (format above); q [n_tokens, n_blocks*32] i8; dx, sx
// [n_tokens, n_blocks] f32; y [n_tokens, n_out] f32.
void MatMulPacked(const uint8_t* packed, bool nibble, int64_t n_groups, int64_t n_blocks,
                  int64_t n_out, const int8_t* q, const float* dx, const float* sx,
                  int64_t n_tokens, float* y, int n_threads) {
  if (nibble) {
    MatMulPackedT<true>(packed, n_groups, n_blocks, n_out, q, dx, sx, n_tokens, y, n_threads);
  } else {
    MatMulPackedT<false>(packed, n_groups, n_blocks, n_out, q, dx, sx, n_tokens, y, n_threads);
  }
}

// Per 32-block int8 quantization. x [n_tokens, n_in] f32 -> q [n_tokens, n_in] i8,
// dx [n_tokens, n_in/32] f32 (max|x|/127), sx [n_tokens, n_in/32] f32 (dx * Σ q).
void QuantizeActivations(const float* x, int64_t n_tokens, int64_t n_in, int8_t* q, float* dx,
                         float* sx, int n_threads) {
  const hn::CappedTag<float, gguf::kQK> df;
  const hn::Rebind<int32_t, decltype(df)> di;
  const hn::Rebind<int8_t, decltype(df)> di8;
  const size_t kN = hn::Lanes(df);
  const int64_t n_blocks = n_in / gguf::kQK;
  const int64_t total = n_tokens * n_blocks;
#pragma omp parallel for schedule(static) num_threads(n_threads) if (total >= 1024)
  for (int64_t i = 0; i < total; ++i) {
    const float* xb = x + i * gguf::kQK;  // blocks are contiguous across tokens
    auto amax = hn::Zero(df);
    for (size_t j = 0; j < gguf::kQK; j += kN) amax = hn::Max(amax, hn::Abs(hn::LoadU(df, xb + j)));
    const float m = hn::GetLane(hn::MaxOfLanes(df, amax));
    const float d = m / 127.0f;
    const auto inv = hn::Set(df, m > 0.0f ? 127.0f / m : 0.0f);
    auto sum = hn::Zero(di);
    for (size_t j = 0; j < gguf::kQK; j += kN) {
      const auto qi = hn::NearestInt(hn::Mul(hn::LoadU(df, xb + j), inv));
      sum = hn::Add(sum, qi);
      hn::StoreU(hn::DemoteTo(di8, qi), di8, q + i * gguf::kQK + j);
    }
    dx[i] = d;
    sx[i] = d * static_cast<float>(hn::GetLane(hn::SumOfLanes(di, sum)));
  }
}

// f32 dot product of a [n] and b [n].
HWY_INLINE float DotF32(const float* HWY_RESTRICT a, const float* HWY_RESTRICT b, int64_t n) {
  const hn::ScalableTag<float> df;
  const int64_t kN = hn::Lanes(df);
  auto s0 = hn::Zero(df), s1 = hn::Zero(df);
  int64_t i = 0;
  for (; i + 2 * kN <= n; i += 2 * kN) {
    s0 = hn::MulAdd(hn::LoadU(df, a + i), hn::LoadU(df, b + i), s0);
    s1 = hn::MulAdd(hn::LoadU(df, a + i + kN), hn::LoadU(df, b + i + kN), s1);
  }
  for (; i + kN <= n; i += kN) s0 = hn::MulAdd(hn::LoadU(df, a + i), hn::LoadU(df, b + i), s0);
  float s = hn::GetLane(hn::SumOfLanes(df, hn::Add(s0, s1)));
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}

// 16-bit floats [n] (f16 or bf16 bits) -> f32 [n].
void WidenRow(bool bf16, const uint16_t* src, float* dst, int64_t n) {
  const hn::ScalableTag<float> df;
  const hn::Rebind<hwy::float16_t, decltype(df)> dh;
  const hn::Rebind<uint16_t, decltype(df)> du16;
  const hn::RebindToUnsigned<decltype(df)> du32;
  const int64_t kN = hn::Lanes(df);
  int64_t i = 0;
  for (; i + kN <= n; i += kN) {
    if (bf16) {
      const auto w = hn::PromoteTo(du32, hn::LoadU(du16, src + i));
      hn::StoreU(hn::BitCast(df, hn::ShiftLeft<16>(w)), df, dst + i);
    } else {
      hn::StoreU(hn::PromoteTo(df, hn::LoadU(dh, reinterpret_cast<const hwy::float16_t*>(src) + i)),
                 df, dst + i);
    }
  }
  if (i < n) {
    internal::DequantizeRowScalar(bf16 ? gguf::GgmlType::kBF16 : gguf::GgmlType::kF16, src + i,
                                  dst + i, n - i);
  }
}

// Float path. src: n_out rows of row_bytes each in `type`; x [n_tokens, n_in] f32;
// y [n_tokens, n_out] f32.
void MatMulFloat(gguf::GgmlType type, const uint8_t* src, size_t row_bytes, int64_t n_in,
                 int64_t n_out, const float* x, int64_t n_tokens, float* y, int n_threads) {
#pragma omp parallel num_threads(n_threads)
  {
    hwy::AlignedFreeUniquePtr<float[]> row = hwy::AllocateAligned<float>(n_in);
#pragma omp for schedule(static)
    for (int64_t r = 0; r < n_out; ++r) {
      const uint8_t* s = src + r * row_bytes;
      const float* w = row.get();
      if (type == gguf::GgmlType::kF32 && reinterpret_cast<uintptr_t>(s) % alignof(float) == 0) {
        w = reinterpret_cast<const float*>(s);
      } else if (type == gguf::GgmlType::kF16 || type == gguf::GgmlType::kBF16) {
        WidenRow(type == gguf::GgmlType::kBF16, reinterpret_cast<const uint16_t*>(s), row.get(),
                 n_in);
      } else {
        internal::DequantizeRowScalar(type, s, row.get(), n_in);
      }
      for (int64_t t = 0; t < n_tokens; ++t) y[t * n_out + r] = DotF32(w, x + t * n_in, n_in);
    }
  }
}

// The target this copy of the file was compiled for (tests check what dispatch picked).
int64_t MatMulTargetImpl() { return HWY_TARGET; }

}  // namespace kvc::cpu::HWY_NAMESPACE
HWY_AFTER_NAMESPACE();

#if HWY_ONCE
namespace kvc::cpu {
HWY_EXPORT(MatMulTargetImpl);
int64_t MatMulCompiledTargets() { return HWY_TARGETS; }
int64_t MatMulDispatchedTarget() { return HWY_DYNAMIC_DISPATCH(MatMulTargetImpl)(); }
HWY_EXPORT(MatMulPacked);
HWY_EXPORT(QuantizeActivations);
HWY_EXPORT(MatMulFloat);

namespace {

using gguf::GgmlType;

std::atomic<int> g_num_threads{0};  // 0: OpenMP default

enum class Format { kNibble, kByte, kFloat };

struct TypeInfo {
  const char* name;
  int block_elems;
  size_t block_bytes;
  Format format;
};

// nullptr if MatMul has no kernel for the type.
const TypeInfo* Info(GgmlType type) {
  static const TypeInfo kF32{"F32", 1, 4, Format::kFloat}, kF16{"F16", 1, 2, Format::kFloat},
      kBF16{"BF16", 1, 2, Format::kFloat}, kQ4_0{"Q4_0", 32, 18, Format::kNibble},
      kQ4_1{"Q4_1", 32, 20, Format::kNibble}, kQ5_0{"Q5_0", 32, 22, Format::kByte},
      kQ8_0{"Q8_0", 32, 34, Format::kByte}, kQ4_K{"Q4_K", 256, 144, Format::kFloat},
      kQ5_K{"Q5_K", 256, 176, Format::kFloat}, kQ6_K{"Q6_K", 256, 210, Format::kFloat};
  switch (type) {
    case GgmlType::kF32:
      return &kF32;
    case GgmlType::kF16:
      return &kF16;
    case GgmlType::kBF16:
      return &kBF16;
    case GgmlType::kQ4_0:
      return &kQ4_0;
    case GgmlType::kQ4_1:
      return &kQ4_1;
    case GgmlType::kQ5_0:
      return &kQ5_0;
    case GgmlType::kQ8_0:
      return &kQ8_0;
    case GgmlType::kQ4_K:
      return &kQ4_K;
    case GgmlType::kQ5_K:
      return &kQ5_K;
    case GgmlType::kQ6_K:
      return &kQ6_K;
    default:
      return nullptr;
  }
}

// Element e (0..31) of a Q4_0 / Q4_1 block's nibbles qs [16] u8.
inline uint8_t Nibble(const uint8_t* qs, int e) {
  return e < 16 ? (qs[e] & 0xF) : (qs[e - 16] >> 4);
}

class CpuWeight final : public Weight {
 public:
  // owned: a private copy of the GGUF bytes that src points into (PrepareWeightScaledRows), or null.
  CpuWeight(GgmlType type, const TypeInfo& info, int64_t n_in, int64_t n_out, const uint8_t* src,
            std::unique_ptr<uint8_t[]> owned = nullptr, size_t owned_bytes = 0)
      : owned_(std::move(owned)),
        owned_bytes_(owned_bytes),
        type_(type),
        format_(info.format),
        n_in_(n_in),
        n_out_(n_out),
        src_(src),
        row_bytes_(n_in / info.block_elems * info.block_bytes) {
    if (format_ == Format::kFloat) return;
    n_blocks_ = n_in / gguf::kQK;
    n_groups_ = (n_out + mm::kRows - 1) / mm::kRows;
    const size_t block_bytes =
        format_ == Format::kNibble ? mm::kNibbleBlockBytes : mm::kByteBlockBytes;
    packed_bytes_ = n_groups_ * n_blocks_ * block_bytes;
    packed_ = hwy::AllocateAligned<uint8_t>(packed_bytes_);
    std::memset(packed_.get(), 0, packed_bytes_);  // padding rows: zero quants and scales
#pragma omp parallel for schedule(static)
    for (int64_t g = 0; g < n_groups_; ++g) {
      for (int64_t b = 0; b < n_blocks_; ++b) {
        uint8_t* dst = packed_.get() + (g * n_blocks_ + b) * block_bytes;
        for (int i = 0; i < mm::kRows && g * mm::kRows + i < n_out_; ++i) {
          const uint8_t* blk = src_ + (g * mm::kRows + i) * row_bytes_ + b * info.block_bytes;
          PackBlock(blk, i, dst);
        }
      }
    }
  }

  int64_t n_in() const override { return n_in_; }
  int64_t n_out() const override { return n_out_; }
  GgmlType type() const override { return type_; }
  size_t bytes() const override { return packed_bytes_ + owned_bytes_; }
  void DequantizeRow(int64_t r, float* dst) const override {  // dst [n_in] f32
    KVC_CHECK(r >= 0 && r < n_out_);
    internal::DequantizeRowScalar(type_, src_ + r * row_bytes_, dst, n_in_);
  }

  void Multiply(const float* x, int64_t n_tokens, float* y) const;

 private:
  // One GGUF block of row i (0..15) of a group into the packed group block dst.
  void PackBlock(const uint8_t* blk, int i, uint8_t* dst) const {
    uint16_t d;
    std::memcpy(&d, blk, 2);
    auto* scales = reinterpret_cast<uint16_t*>(dst + (format_ == Format::kNibble ? 256 : 512));
    scales[i] = d;
    if (format_ == Format::kNibble) {
      const bool q4_1 = type_ == GgmlType::kQ4_1;
      const uint8_t* qs = blk + (q4_1 ? 4 : 2);
      if (q4_1) {
        std::memcpy(&scales[mm::kRows + i], blk + 2, 2);
      } else {
        scales[mm::kRows + i] = internal::FloatToHalf(-8.0f * internal::HalfToFloat(d));
      }
      for (int c = 0; c < 4; ++c) {
        for (int t = 0; t < 4; ++t) {
          dst[c * 64 + 4 * i + t] = Nibble(qs, 8 * c + t) | (Nibble(qs, 8 * c + 4 + t) << 4);
        }
      }
    } else {
      int8_t v[gguf::kQK];
      if (type_ == GgmlType::kQ8_0) {
        std::memcpy(v, blk + 2, gguf::kQK);
      } else {  // Q5_0: d, qh[4], qs[16]
        uint32_t qh;
        std::memcpy(&qh, blk + 2, 4);
        const uint8_t* qs = blk + 6;
        for (int j = 0; j < 16; ++j) {
          v[j] = static_cast<int8_t>(((qs[j] & 0xF) | (((qh >> j) << 4) & 0x10)) - 16);
          v[j + 16] = static_cast<int8_t>(((qs[j] >> 4) | ((qh >> (j + 12)) & 0x10)) - 16);
        }
      }
      for (int c = 0; c < 8; ++c) std::memcpy(dst + c * 64 + 4 * i, v + 4 * c, 4);
    }
  }

  std::unique_ptr<uint8_t[]> owned_;  // [n_out, row_bytes_] when the bytes are a scaled copy
  size_t owned_bytes_ = 0;
  GgmlType type_;
  Format format_;
  int64_t n_in_, n_out_;
  const uint8_t* src_;  // [n_out, row_bytes_] GGUF bytes in the mapping or owned_ (DequantizeRow, float path)
  size_t row_bytes_;
  int64_t n_blocks_ = 0, n_groups_ = 0;
  hwy::AlignedFreeUniquePtr<uint8_t[]> packed_;  // [n_groups, n_blocks, block bytes]; see top
  size_t packed_bytes_ = 0;
};

void CpuWeight::Multiply(const float* x, int64_t n_tokens, float* y) const {
  const int n_threads = NumThreads();
  if (format_ == Format::kFloat) {
    HWY_DYNAMIC_DISPATCH(MatMulFloat)
    (type_, src_, row_bytes_, n_in_, n_out_, x, n_tokens, y, n_threads);
    return;
  }
  // Scratch for the quantized activations, reused across calls on the same thread.
  thread_local hwy::AlignedFreeUniquePtr<int8_t[]> q;
  thread_local hwy::AlignedFreeUniquePtr<float[]> scales;
  thread_local size_t q_cap = 0, s_cap = 0;
  const size_t nq = n_tokens * n_in_, ns = 2 * n_tokens * n_blocks_;
  if (q_cap < nq) {
    q = hwy::AllocateAligned<int8_t>(nq);
    q_cap = nq;
  }
  if (s_cap < ns) {
    scales = hwy::AllocateAligned<float>(ns);
    s_cap = ns;
  }
  float* dx = scales.get();                         // [n_tokens, n_blocks]
  float* sx = scales.get() + n_tokens * n_blocks_;  // [n_tokens, n_blocks]
  HWY_DYNAMIC_DISPATCH(QuantizeActivations)(x, n_tokens, n_in_, q.get(), dx, sx, n_threads);
  HWY_DYNAMIC_DISPATCH(MatMulPacked)
  (packed_.get(), format_ == Format::kNibble, n_groups_, n_blocks_, n_out_, q.get(), dx, sx,
   n_tokens, y, n_threads);
}

}  // namespace

StatusOr<std::unique_ptr<Weight>> PrepareWeight(const gguf::TensorInfo& t) {
  const TypeInfo* info = Info(t.type());
  if (info == nullptr) {
    return Unimplemented("tensor '" + t.name + "': no CPU MatMul kernel for type id " +
                         std::to_string(t.type_id) +
                         " (supported: F32 F16 BF16 Q4_0 Q4_1 Q5_0 Q8_0 Q4_K Q5_K Q6_K)");
  }
  if (t.ne.empty() || t.data == nullptr) {
    return InvalidArgument("tensor '" + t.name + "': no dims or no data");
  }
  const int64_t n_in = t.ne[0];
  int64_t n_out = 1;
  for (size_t i = 1; i < t.ne.size(); ++i) n_out *= t.ne[i];
  if (n_in <= 0 || n_out <= 0 || n_in % info->block_elems != 0) {
    return InvalidArgument("tensor '" + t.name + "' (" + info->name + "): row length " +
                           std::to_string(n_in) + " is not a positive multiple of " +
                           std::to_string(info->block_elems));
  }
  const uint64_t need =
      static_cast<uint64_t>(n_out) * (n_in / info->block_elems) * info->block_bytes;
  if (t.n_bytes != 0 && t.n_bytes < need) {
    return InvalidArgument("tensor '" + t.name + "' (" + info->name + "): " +
                           std::to_string(t.n_bytes) + " bytes, need " + std::to_string(need));
  }
  return std::unique_ptr<Weight>(new CpuWeight(t.type(), *info, n_in, n_out, t.data));
}

StatusOr<std::unique_ptr<Weight>> PrepareWeightScaledRows(const gguf::TensorInfo& t,
                                                          const std::vector<float>& row_scale) {
  // Validates the tensor exactly as PrepareWeight does (and refuses what it refuses).
  KVC_ASSIGN_OR_RETURN(auto plain, PrepareWeight(t));
  const TypeInfo* info = Info(t.type());
  const int64_t n_in = plain->n_in(), n_out = plain->n_out();
  plain.reset();
  if (int64_t(row_scale.size()) != n_out) {
    return InvalidArgument(fmt::format("tensor '{}': {} row scales for {} rows", t.name,
                                       row_scale.size(), n_out));
  }
  for (float sc : row_scale) {
    if (!std::isfinite(sc) || !(sc > 0.f)) {
      return InvalidArgument(fmt::format("tensor '{}': row scale {} (must be finite and > 0)", t.name, sc));
    }
  }
  const GgmlType ty = t.type();
  const bool scaled_header = ty == GgmlType::kQ4_0 || ty == GgmlType::kQ4_1 ||
                             ty == GgmlType::kQ5_0 || ty == GgmlType::kQ8_0;
  if (!scaled_header && ty != GgmlType::kF32 && ty != GgmlType::kF16) {
    return Unimplemented(fmt::format(
        "tensor '{}' ({}): folding per-row scales is implemented for F32, F16, Q4_0, Q4_1, Q5_0 "
        "and Q8_0 (a block's fp16 scale, and Q4_1's min, times the row's scale); use the cache "
        "transform (kt=smooth:file=...) for this model", t.name, info->name));
  }
  const size_t row_bytes = size_t(n_in / info->block_elems) * info->block_bytes;
  const size_t n_bytes = row_bytes * size_t(n_out);
  std::unique_ptr<uint8_t[]> buf(new uint8_t[n_bytes]);
  std::memcpy(buf.get(), t.data, n_bytes);
  for (int64_t r = 0; r < n_out; ++r) {
    uint8_t* row = buf.get() + size_t(r) * row_bytes;
    const float sc = row_scale[r];
    if (ty == GgmlType::kF32) {
      for (int64_t j = 0; j < n_in; ++j) {
        float v;
        std::memcpy(&v, row + 4 * j, 4);
        v *= sc;
        std::memcpy(row + 4 * j, &v, 4);
      }
      continue;
    }
    // F16: every element; quantized blocks: the fp16 scale d at byte 0 (and Q4_1's min m at 2).
    const int64_t n_half = ty == GgmlType::kF16 ? n_in : n_in / info->block_elems;
    const size_t step = ty == GgmlType::kF16 ? 2 : info->block_bytes;
    for (int64_t j = 0; j < n_half; ++j) {
      for (int k = 0; k < (ty == GgmlType::kQ4_1 ? 2 : 1); ++k) {
        uint8_t* p = row + size_t(j) * step + 2 * k;
        uint16_t h;
        std::memcpy(&h, p, 2);
        const float v = internal::HalfToFloat(h) * sc;
        if (!(std::fabs(v) <= 65504.f)) {
          return InvalidArgument(fmt::format("tensor '{}' row {}: a scaled fp16 value {} overflows "
                                             "fp16; the smoothing scales are too large for this weight",
                                             t.name, r, v));
        }
        h = internal::FloatToHalf(v);
        std::memcpy(p, &h, 2);
      }
    }
  }
  const uint8_t* src = buf.get();
  return std::unique_ptr<Weight>(new CpuWeight(ty, *info, n_in, n_out, src, std::move(buf), n_bytes));
}

void MatMul(const Weight& w, const float* x, int64_t n_tokens, float* y) {
  const auto* cw = dynamic_cast<const CpuWeight*>(&w);
  KVC_CHECK(cw != nullptr);  // weights come from PrepareWeight
  if (n_tokens <= 0) return;
  cw->Multiply(x, n_tokens, y);
}

void SetNumThreads(int n) {
  g_num_threads.store(n > 0 ? n : 0);
  // Every other OpenMP region (attention, codecs) follows the same count.
  if (n > 0) omp_set_num_threads(n);
}

int NumThreads() {
  const int n = g_num_threads.load();
  return n > 0 ? n : omp_get_max_threads();
}

}  // namespace kvc::cpu
#endif  // HWY_ONCE
