// Packed-KV attention kernels (Highway, runtime dispatch); contracts in cpu/kv_kernels.h.
#ifndef HWY_WANT_AVX3_DL
#define HWY_WANT_AVX3_DL  // every kernel file has the same targets (cpu/targets.h; tests pin each)
#endif
#ifndef KVC_CPU_KV_KERNELS_SHARED_
#define KVC_CPU_KV_KERNELS_SHARED_
#include <algorithm>
#include <cstring>

#include "cpu/kv_kernels.h"
#include "gguf/types.h"
#endif  // KVC_CPU_KV_KERNELS_SHARED_

#undef HWY_TARGET_INCLUDE
#define HWY_TARGET_INCLUDE "cpu/kv_kernels.cc"
// clang-format off
#include "hwy/foreach_target.h"  // IWYU pragma: keep
#include "hwy/highway.h"
// clang-format on

HWY_BEFORE_NAMESPACE();
namespace kvc::cpu::HWY_NAMESPACE {
namespace hn = hwy::HWY_NAMESPACE;

using DF = hn::ScalableTag<float>;
using DI = hn::RebindToSigned<DF>;
using DU = hn::RebindToUnsigned<DF>;
using D8 = hn::Rebind<uint8_t, DF>;

// One fp16 at an unaligned address -> f32 (a hardware conversion on AVX2 and up; exact).
HWY_INLINE float HalfAt(const uint8_t* p) {
#if HWY_TARGET == HWY_SCALAR
  uint16_t h;
  std::memcpy(&h, p, 2);
  return gguf::Fp16ToFp32(h);
#else
  const hn::CappedTag<float, 1> d1;
  const hn::Rebind<hwy::float16_t, decltype(d1)> dh1;
  return hn::GetLane(hn::PromoteTo(d1, hn::LoadU(dh1, reinterpret_cast<const hwy::float16_t*>(p))));
#endif
}

// ---- f32 rows
// Horizontal sums of four vectors at once: two interleave-add levels leave, in every 128-bit
// block, the block's partial sums of a0..a3; the blocks are then added up. About a third of the
// shuffles of four separate SumOfLanes.
HWY_INLINE void Sum4(hn::Vec<DF> a0, hn::Vec<DF> a1, hn::Vec<DF> a2, hn::Vec<DF> a3, float* out) {
#if HWY_TARGET == HWY_SCALAR
  out[0] = hn::GetLane(a0); out[1] = hn::GetLane(a1); out[2] = hn::GetLane(a2); out[3] = hn::GetLane(a3);
#else
  const DF df;
  const hn::Repartition<uint64_t, DF> d64;
  const auto v01 = hn::Add(hn::InterleaveLower(df, a0, a1), hn::InterleaveUpper(df, a0, a1));
  const auto v23 = hn::Add(hn::InterleaveLower(df, a2, a3), hn::InterleaveUpper(df, a2, a3));
  const auto lo = hn::InterleaveLower(d64, hn::BitCast(d64, v01), hn::BitCast(d64, v23));
  const auto hi = hn::InterleaveUpper(d64, hn::BitCast(d64, v01), hn::BitCast(d64, v23));
  const auto v = hn::Add(hn::BitCast(df, lo), hn::BitCast(df, hi));
  HWY_ALIGN float buf[hn::MaxLanes(df)];
  hn::Store(v, df, buf);
  const int kN = int(hn::Lanes(df));
  for (int k = 0; k < 4; ++k) {
    float s = buf[k];
    for (int blk = 4; blk < kN; blk += 4) s += buf[blk + k];
    out[k] = s;
  }
#endif
}

void DotF32RowsImpl(const float* HWY_RESTRICT q, int n_q, const float* HWY_RESTRICT x, int64_t n,
                    int d, float* HWY_RESTRICT out, int64_t ld) {
  const DF df;
  const int kN = int(hn::Lanes(df));
  const int dv = d / kN * kN;
  const bool four = dv == d && kN % 4 == 0;
  for (int r0 = 0; r0 < n_q; r0 += 4) {
    const int nr = std::min(4, n_q - r0);
    const float* qb = q + size_t(r0) * d;
    float* ob = out + size_t(r0) * ld;
    int64_t t = 0;
    if (four) {
      // Four tokens per step: every query load feeds four FMAs, one Sum4 per row.
      for (; t + 4 <= n; t += 4) {
        const float* xt = x + t * d;
        hn::Vec<DF> acc[4][4];
        for (int r = 0; r < nr; ++r) {
          for (int k = 0; k < 4; ++k) acc[r][k] = hn::Zero(df);
        }
        for (int c = 0; c < d; c += kN) {
          const auto x0 = hn::LoadU(df, xt + c), x1 = hn::LoadU(df, xt + d + c);
          const auto x2 = hn::LoadU(df, xt + 2 * d + c), x3 = hn::LoadU(df, xt + 3 * d + c);
          for (int r = 0; r < nr; ++r) {
            const auto qv = hn::LoadU(df, qb + size_t(r) * d + c);
            acc[r][0] = hn::MulAdd(qv, x0, acc[r][0]);
            acc[r][1] = hn::MulAdd(qv, x1, acc[r][1]);
            acc[r][2] = hn::MulAdd(qv, x2, acc[r][2]);
            acc[r][3] = hn::MulAdd(qv, x3, acc[r][3]);
          }
        }
        for (int r = 0; r < nr; ++r) Sum4(acc[r][0], acc[r][1], acc[r][2], acc[r][3], ob + size_t(r) * ld + t);
      }
    }
    for (; t < n; ++t) {
      const float* xt = x + t * d;
      hn::Vec<DF> acc[4];
      for (int r = 0; r < nr; ++r) acc[r] = hn::Zero(df);
      for (int c = 0; c < dv; c += kN) {
        const auto xv = hn::LoadU(df, xt + c);
        for (int r = 0; r < nr; ++r) acc[r] = hn::MulAdd(hn::LoadU(df, qb + size_t(r) * d + c), xv, acc[r]);
      }
      for (int r = 0; r < nr; ++r) {
        float s = hn::GetLane(hn::SumOfLanes(df, acc[r]));
        for (int c = dv; c < d; ++c) s += qb[size_t(r) * d + c] * xt[c];
        ob[size_t(r) * ld + t] = s;
      }
    }
  }
}

void AxpyF32RowsImpl(const float* HWY_RESTRICT p, int64_t ld, int n_q, const float* HWY_RESTRICT x,
                     int64_t n, int d, float* HWY_RESTRICT out) {
  const DF df;
  const int kN = int(hn::Lanes(df));
  const int dv = d / kN * kN;
  for (int r = 0; r < n_q; ++r) {
    const float* pr = p + size_t(r) * ld;
    float* o = out + size_t(r) * d;
    int c = 0;
    // Two vectors of the row at a time: two independent FMA chains.
    for (; c + 2 * kN <= dv; c += 2 * kN) {
      auto a0 = hn::LoadU(df, o + c), a1 = hn::LoadU(df, o + c + kN);
      for (int64_t t = 0; t < n; ++t) {
        const auto w = hn::Set(df, pr[t]);
        a0 = hn::MulAdd(w, hn::LoadU(df, x + t * d + c), a0);
        a1 = hn::MulAdd(w, hn::LoadU(df, x + t * d + c + kN), a1);
      }
      hn::StoreU(a0, df, o + c);
      hn::StoreU(a1, df, o + c + kN);
    }
    for (; c < dv; c += kN) {
      auto a0 = hn::LoadU(df, o + c);
      for (int64_t t = 0; t < n; ++t) a0 = hn::MulAdd(hn::Set(df, pr[t]), hn::LoadU(df, x + t * d + c), a0);
      hn::StoreU(a0, df, o + c);
    }
    for (; c < d; ++c) {
      float s = o[c];
      for (int64_t t = 0; t < n; ++t) s += pr[t] * x[t * d + c];
      o[c] = s;
    }
  }
}

// ---- ggml legacy blocks. kN lanes of float; the 16 packed bytes of a block are processed kN at
// a time (kN <= 16 on every x86 target; larger vectors fall back to the scalar loop).
template <int kHeader, int kKind>  // kKind 0: q4_0, 1: q4_1, 2: q5_0
HWY_INLINE void DecodeLegacyRows(const uint8_t* HWY_RESTRICT rows, int64_t n, int d,
                                 float* HWY_RESTRICT out) {
  const DF df;
  const DI di;
  const DU du;
  const D8 d8;
  const int kN = int(hn::Lanes(df));
  const int nb = d / 32;
  constexpr size_t kBytes = kHeader + 16;
  for (int64_t t = 0; t < n; ++t) {
    const uint8_t* row = rows + size_t(t) * nb * kBytes;
    float* o = out + t * d;
    for (int b = 0; b < nb; ++b) {
      const uint8_t* blk = row + b * kBytes;
      const uint8_t* qs = blk + kHeader;
      float* ob = o + b * 32;
      const float dd = HalfAt(blk);
      const float mm = kKind == 1 ? HalfAt(blk + 2) : 0.f;
      uint32_t qh = 0;
      if (kKind == 2) std::memcpy(&qh, blk + 2, 4);
      if (kN > 16) {
        for (int j = 0; j < 16; ++j) {
          int c0 = qs[j] & 0x0F, c1 = qs[j] >> 4;
          if (kKind == 2) {
            c0 |= int((qh >> j) & 1u) << 4;
            c1 |= int((qh >> (j + 16)) & 1u) << 4;
          }
          if (kKind == 0) { ob[j] = float(c0 - 8) * dd; ob[j + 16] = float(c1 - 8) * dd; }
          if (kKind == 1) { ob[j] = float(c0) * dd + mm; ob[j + 16] = float(c1) * dd + mm; }
          if (kKind == 2) { ob[j] = float(c0 - 16) * dd; ob[j + 16] = float(c1 - 16) * dd; }
        }
        continue;
      }
      const auto vd = hn::Set(df, dd);
      const auto vm = hn::Set(df, mm);
      const auto off = hn::Set(di, kKind == 0 ? 8 : (kKind == 2 ? 16 : 0));
      for (int j = 0; j < 16; j += kN) {
        const auto v = hn::LoadU(d8, qs + j);
        auto lo = hn::PromoteTo(di, hn::And(v, hn::Set(d8, uint8_t(0x0F))));
        auto hi = hn::PromoteTo(di, hn::ShiftRight<4>(v));
        if (kKind == 2) {
          const auto qv = hn::Set(du, qh);
          const auto one = hn::Set(du, 1u);
          const auto h0 = hn::And(qv >> hn::Iota(du, uint32_t(j)), one);
          const auto h1 = hn::And(qv >> hn::Iota(du, uint32_t(j + 16)), one);
          lo = hn::Or(lo, hn::BitCast(di, hn::ShiftLeft<4>(h0)));
          hi = hn::Or(hi, hn::BitCast(di, hn::ShiftLeft<4>(h1)));
        }
        const auto flo = hn::ConvertTo(df, hn::Sub(lo, off));
        const auto fhi = hn::ConvertTo(df, hn::Sub(hi, off));
        if (kKind == 1) {
          hn::StoreU(hn::Add(hn::Mul(flo, vd), vm), df, ob + j);
          hn::StoreU(hn::Add(hn::Mul(fhi, vd), vm), df, ob + j + 16);
        } else {
          hn::StoreU(hn::Mul(flo, vd), df, ob + j);
          hn::StoreU(hn::Mul(fhi, vd), df, ob + j + 16);
        }
      }
    }
  }
}

void DecodeQ4_0RowsImpl(const uint8_t* rows, int64_t n, int d, float* out) {
  DecodeLegacyRows<2, 0>(rows, n, d, out);
}
void DecodeQ4_1RowsImpl(const uint8_t* rows, int64_t n, int d, float* out) {
  DecodeLegacyRows<4, 1>(rows, n, d, out);
}
void DecodeQ5_0RowsImpl(const uint8_t* rows, int64_t n, int d, float* out) {
  DecodeLegacyRows<6, 2>(rows, n, d, out);
}

// ---- E4M3: bits (e,m) placed in an f32 exponent/mantissa with the bias moved from 7 to 127 for
// normals; subnormals (e == 0) are m · 2^-9 exactly. Integer ops only (no denormal operands).
void DecodeE4M3RowsImpl(const uint8_t* HWY_RESTRICT rows, int64_t n, int d, float* HWY_RESTRICT out) {
  const DF df;
  const DU du;
  const D8 d8;
  const int kN = int(hn::Lanes(df));
  const int dv = d / kN * kN;
  const auto m7f = hn::Set(du, 0x7Fu);
  const auto bias = hn::Set(du, 120u << 23);
  const auto sub_scale = hn::Set(df, 1.0f / 512.f);
  for (int64_t t = 0; t < n; ++t) {
    const uint8_t* row = rows + size_t(t) * (d + 2);
    const float s = HalfAt(row);
    const uint8_t* c = row + 2;
    float* o = out + t * d;
    const auto vs = hn::Set(df, s);
    int i = 0;
    for (; i < dv; i += kN) {
      const auto cu = hn::PromoteTo(du, hn::LoadU(d8, c + i));
      const auto em = hn::And(cu, m7f);
      const auto sign = hn::ShiftLeft<24>(hn::AndNot(m7f, cu));
      const auto normal = hn::BitCast(df, hn::Add(hn::ShiftLeft<20>(em), bias));
      const auto subn = hn::Mul(hn::ConvertTo(df, hn::BitCast(DI(), em)), sub_scale);
      const auto is_sub = hn::RebindMask(df, hn::Lt(hn::BitCast(DI(), em), hn::Set(DI(), 8)));
      const auto mag = hn::IfThenElse(is_sub, subn, normal);
      const auto v = hn::BitCast(df, hn::Or(hn::BitCast(du, mag), sign));
      hn::StoreU(hn::Mul(v, vs), df, o + i);
    }
    for (; i < d; ++i) {
      const int em = c[i] & 0x7F;
      float v = (em < 8) ? float(em) / 512.f : [&] {
        const uint32_t bits = (uint32_t(em) << 20) + (120u << 23);
        float f;
        std::memcpy(&f, &bits, 4);
        return f;
      }();
      if (c[i] & 0x80) v = -v;
      o[i] = v * s;
    }
  }
}

// ---- LSB-first b-bit code streams. Eight codes of b <= 4 bits are exactly b bytes, so a vector
// of up to 16 codes comes from two little-endian words of b bytes, broadcast and shifted per lane
// (no gathers: they are slow on these Xeons). Lanes past code n - 1 re-read code n - 1; nothing
// beyond the last code byte is read. b > 4 (or vectors wider than 16 lanes) use a byte gather.
HWY_INLINE uint32_t GroupWord(const uint8_t* bits, int g, int b, int n) {
  const int avail = (n * b + 7) / 8 - g * b;  // bytes of the stream from this group on
  uint32_t w = 0;
  // Bytes past the group's b are never extracted (shifts stay below 8·b), so a 4-byte read is
  // fine wherever 4 bytes of the stream remain.
  if (avail >= 4) {
    std::memcpy(&w, bits + size_t(g) * b, 4);
  } else {
    for (int i = 0; i < avail; ++i) w |= uint32_t(bits[size_t(g) * b + i]) << (8 * i);
  }
  return w;
}
HWY_INLINE hn::Vec<DU> CodesAt(const uint8_t* HWY_RESTRICT bits, int j0, int n, int b) {
  const DU du;
  const DI di;
  const int kN = int(hn::Lanes(du));
  const auto j = hn::BitCast(du, hn::Min(hn::Add(hn::Iota(di, 0), hn::Set(di, j0)), hn::Set(di, n - 1)));
  const auto mask = hn::Set(du, (1u << b) - 1u);
  if (b <= 4 && kN <= 16) {
    const int g0 = j0 >> 3;
    const auto w0 = hn::Set(du, GroupWord(bits, g0, b, n));
    const auto w1 = kN > 8 ? hn::Set(du, GroupWord(bits, g0 + 1, b, n)) : w0;
    const auto second = hn::RebindMask(du, hn::Gt(hn::BitCast(di, hn::ShiftRight<3>(j)), hn::Set(di, g0)));
    const auto w = hn::IfThenElse(second, w1, w0);
    const auto sh = hn::Mul(hn::And(j, hn::Set(du, 7u)), hn::Set(du, uint32_t(b)));
    return hn::And(w >> sh, mask);
  }
  const auto pos = hn::Mul(j, hn::Set(du, uint32_t(b)));
  const auto off = hn::BitCast(di, hn::ShiftRight<3>(pos));
  const auto sh = hn::And(pos, hn::Set(du, 7u));
  const auto w = hn::BitCast(du, hn::GatherOffset(di, reinterpret_cast<const int32_t*>(bits), off));
  return hn::And(w >> sh, mask);
}

template <class F>
HWY_INLINE void ForCodes(const uint8_t* bits, int n, int b, F&& f) {
  const DF df;
  const int kN = int(hn::Lanes(df));
  int j = 0;
  for (; j + kN <= n; j += kN) f(j, CodesAt(bits, j, n, b), kN);
  if (j < n) f(j, CodesAt(bits, j, n, b), n - j);
}

void CodebookRowImpl(const uint8_t* HWY_RESTRICT bits, int n_codes, int b, const float* HWY_RESTRICT cb,
                     float g, float* HWY_RESTRICT out) {
  const DF df;
  const DI di;
  const int kN = int(hn::Lanes(df));
  const auto vg = hn::Set(df, g);
  if ((1 << b) <= kN) {
    // Whole codebook in one register: a lane permute per vector instead of a gather.
    HWY_ALIGN float tab[hn::MaxLanes(df)];
    for (int i = 0; i < kN; ++i) tab[i] = i < (1 << b) ? cb[i] : 0.f;
    const auto vt = hn::Load(df, tab);
    ForCodes(bits, n_codes, b, [&](int j, hn::Vec<DU> c, int cnt) {
      const auto v = hn::Mul(hn::TableLookupLanes(vt, hn::IndicesFromVec(df, hn::BitCast(di, c))), vg);
      if (cnt == kN) hn::StoreU(v, df, out + j);
      else {
        HWY_ALIGN float tmp[hn::MaxLanes(df)];
        hn::Store(v, df, tmp);
        std::copy(tmp, tmp + cnt, out + j);
      }
    });
  } else {
    ForCodes(bits, n_codes, b, [&](int j, hn::Vec<DU> c, int cnt) {
      const auto v = hn::Mul(hn::GatherIndex(df, cb, hn::BitCast(di, c)), vg);
      if (cnt == kN) hn::StoreU(v, df, out + j);
      else {
        HWY_ALIGN float tmp[hn::MaxLanes(df)];
        hn::Store(v, df, tmp);
        std::copy(tmp, tmp + cnt, out + j);
      }
    });
  }
}

void AffineCodesRowImpl(const uint8_t* HWY_RESTRICT bits, int n_codes, int b, float s, float z,
                        float* HWY_RESTRICT out) {
  const DF df;
  const DI di;
  const int kN = int(hn::Lanes(df));
  const auto vs = hn::Set(df, s), vz = hn::Set(df, z);
  ForCodes(bits, n_codes, b, [&](int j, hn::Vec<DU> c, int cnt) {
    const auto v = hn::Add(hn::Mul(hn::ConvertTo(df, hn::BitCast(di, c)), vs), vz);
    if (cnt == kN) hn::StoreU(v, df, out + j);
    else {
      HWY_ALIGN float tmp[hn::MaxLanes(df)];
      hn::Store(v, df, tmp);
      std::copy(tmp, tmp + cnt, out + j);
    }
  });
}

void AxpyCodesImpl(const uint8_t* HWY_RESTRICT bits, int n, int b, float w, float* HWY_RESTRICT acc) {
  const DF df;
  const DI di;
  const int kN = int(hn::Lanes(df));
  const auto vw = hn::Set(df, w);
  ForCodes(bits, n, b, [&](int j, hn::Vec<DU> c, int cnt) {
    const auto cf = hn::ConvertTo(df, hn::BitCast(di, c));
    if (cnt == kN) {
      hn::StoreU(hn::MulAdd(vw, cf, hn::LoadU(df, acc + j)), df, acc + j);
    } else {
      HWY_ALIGN float tmp[hn::MaxLanes(df)];
      hn::Store(cf, df, tmp);
      for (int i = 0; i < cnt; ++i) acc[j + i] += w * tmp[i];
    }
  });
}

// Per-chunk constants of a code stream (lanes j0 .. j0 + kN - 1), hoisted out of row loops.
struct CodeChunk {
  hn::Vec<DU> sh;
  hn::Mask<DU> second;
  int g0;
  bool one_word;  // Lanes · b <= 32: the whole chunk is in group g0's 32-bit word, shifted by
                 // (j − 8·g0) · b (j0 is a multiple of Lanes: for Lanes < 8, e.g. SSE4's 4 or
                 // SCALAR's 1, the chunk may start inside group g0, not at its first code)
};
HWY_INLINE bool FastCodes(int b) { return b <= 4 && hn::Lanes(DF()) <= 16; }
HWY_INLINE CodeChunk PlanChunk(int j0, int n, int b) {
  const DU du;
  const DI di;
  const auto j = hn::BitCast(du, hn::Min(hn::Add(hn::Iota(di, 0), hn::Set(di, j0)), hn::Set(di, n - 1)));
  const bool one = int(hn::Lanes(du)) * b <= 32;
  CodeChunk c{one ? hn::Mul(hn::Sub(j, hn::Set(du, uint32_t(j0 & ~7))), hn::Set(du, uint32_t(b)))
                  : hn::Mul(hn::And(j, hn::Set(du, 7u)), hn::Set(du, uint32_t(b))),
              hn::RebindMask(du, hn::Gt(hn::BitCast(di, hn::ShiftRight<3>(j)), hn::Set(di, j0 >> 3))),
              j0 >> 3, one};
  return c;
}
// FastCodes(b) only.
HWY_INLINE hn::Vec<DU> CodesPlanned(const uint8_t* HWY_RESTRICT bits, const CodeChunk& c, int n, int b) {
  const DU du;
  if (!c.one_word && hn::Lanes(du) > 8 && (n * b + 7) / 8 - c.g0 * b >= 8) {
    // Both groups from one 8-byte read: group g0 + 1 starts b bytes after group g0.
    uint64_t w64;
    std::memcpy(&w64, bits + size_t(c.g0) * b, 8);
    const auto w = hn::IfThenElse(c.second, hn::Set(du, uint32_t(w64 >> (8 * b))), hn::Set(du, uint32_t(w64)));
    return hn::And(w >> c.sh, hn::Set(du, (1u << b) - 1u));
  }
  const auto w0 = hn::Set(du, GroupWord(bits, c.g0, b, n));
  const auto w = c.one_word || hn::Lanes(du) <= 8
                     ? w0
                     : hn::IfThenElse(c.second, hn::Set(du, GroupWord(bits, c.g0 + 1, b, n)), w0);
  return hn::And(w >> c.sh, hn::Set(du, (1u << b) - 1u));
}

void AxpyCodesRowsImpl(const uint8_t* HWY_RESTRICT bits, int n_streams, size_t stride, int n, int b,
                       const float* HWY_RESTRICT w, int n_q, float* HWY_RESTRICT acc) {
  const DF df;
  const DI di;
  const int kN = int(hn::Lanes(df));
  const int nv = (n + kN - 1) / kN;
  if (!FastCodes(b) || nv > 2) {
    for (int r = 0; r < n_q; ++r) {
      for (int c = 0; c < n_streams; ++c) {
        AxpyCodesImpl(bits + size_t(c) * stride, n, b, w[size_t(r) * n_streams + c], acc + size_t(r) * n);
      }
    }
    return;
  }
  // Up to 2 vectors of codes per stream and 4 query rows: accumulators stay in registers across
  // all streams; each stream's codes are unpacked once for all rows.
  CodeChunk plan[2] = {PlanChunk(0, n, b), PlanChunk(nv > 1 ? kN : 0, n, b)};
  for (int r0 = 0; r0 < n_q; r0 += 4) {
    const int nr = std::min(4, n_q - r0);
    hn::Vec<DF> a[4][2];
    HWY_ALIGN float tmp[2 * hn::MaxLanes(df)];
    for (int r = 0; r < nr; ++r) {
      std::fill(tmp, tmp + 2 * kN, 0.f);
      std::copy(acc + size_t(r0 + r) * n, acc + size_t(r0 + r) * n + n, tmp);
      for (int v = 0; v < nv; ++v) a[r][v] = hn::Load(df, tmp + v * kN);
    }
    for (int c = 0; c < n_streams; ++c) {
      const uint8_t* bc = bits + size_t(c) * stride;
      for (int v = 0; v < nv; ++v) {
        const auto cf = hn::ConvertTo(df, hn::BitCast(di, CodesPlanned(bc, plan[v], n, b)));
        for (int r = 0; r < nr; ++r) {
          a[r][v] = hn::MulAdd(hn::Set(df, w[size_t(r0 + r) * n_streams + c]), cf, a[r][v]);
        }
      }
    }
    for (int r = 0; r < nr; ++r) {
      for (int v = 0; v < nv; ++v) hn::Store(a[r][v], df, tmp + v * kN);
      std::copy(tmp, tmp + n, acc + size_t(r0 + r) * n);
    }
  }
}

// Many rows of [.. fp16 g at scale_off .. codes at code_off ..]: out[t * ld + j] = g_t · cb[code].
void CodebookRowsImpl(const uint8_t* HWY_RESTRICT rows, int64_t n_rows, size_t row_bytes,
                      size_t code_off, size_t scale_off, int n_codes, int b,
                      const float* HWY_RESTRICT cb, float* HWY_RESTRICT out, int64_t ld) {
  const DF df;
  const DI di;
  const int kN = int(hn::Lanes(df));
  if (!FastCodes(b) || (1 << b) > kN || n_codes % kN != 0 || n_codes / kN > 8) {
    for (int64_t t = 0; t < n_rows; ++t) {
      const uint8_t* row = rows + size_t(t) * row_bytes;
      CodebookRowImpl(row + code_off, n_codes, b, cb, HalfAt(row + scale_off), out + t * ld);
    }
    return;
  }
  HWY_ALIGN float tab[hn::MaxLanes(df)];
  for (int i = 0; i < kN; ++i) tab[i] = i < (1 << b) ? cb[i] : 0.f;
  const auto vt = hn::Load(df, tab);
  const int nv = n_codes / kN;
  CodeChunk plan[8];
  for (int v = 0; v < nv; ++v) plan[v] = PlanChunk(v * kN, n_codes, b);
  for (int64_t t = 0; t < n_rows; ++t) {
    const uint8_t* row = rows + size_t(t) * row_bytes;
    const auto vg = hn::Set(df, HalfAt(row + scale_off));
    for (int v = 0; v < nv; ++v) {
      const auto c = CodesPlanned(row + code_off, plan[v], n_codes, b);
      hn::StoreU(hn::Mul(hn::TableLookupLanes(vt, hn::IndicesFromVec(df, hn::BitCast(di, c))), vg), df,
                 out + t * ld + v * kN);
    }
  }
}

// Many rows, per-row fp16 scale / offset and per-channel affine (KVQuant):
// out[t · n_codes + j] = ((cb[code_tj] · g_t) · mul_j + add_j) + z_t.
void CodebookAffineRowsImpl(const uint8_t* HWY_RESTRICT rows, int64_t n_rows, size_t row_bytes,
                            size_t code_off, int n_codes, int b, const float* HWY_RESTRICT cb,
                            int64_t g_off, int64_t z_off, const float* HWY_RESTRICT mul,
                            const float* HWY_RESTRICT add, int64_t sparse_off, int n_sparse,
                            float* HWY_RESTRICT out) {
  const DF df;
  const DI di;
  const int kN = int(hn::Lanes(df));
  const bool fast = FastCodes(b) && (1 << b) <= kN && n_codes % kN == 0 && n_codes / kN <= 8;
  HWY_ALIGN float tab[hn::MaxLanes(df)];
  for (int i = 0; i < kN; ++i) tab[i] = i < (1 << b) ? cb[i] : 0.f;
  const auto vt = hn::Load(df, tab);
  const int nv = fast ? n_codes / kN : 0;
  CodeChunk plan[8];
  for (int v = 0; v < nv; ++v) plan[v] = PlanChunk(v * kN, n_codes, b);
  for (int64_t t = 0; t < n_rows; ++t) {
    const uint8_t* row = rows + size_t(t) * row_bytes;
    const float g = g_off >= 0 ? HalfAt(row + g_off) : 1.f;
    const float z = z_off >= 0 ? HalfAt(row + z_off) : 0.f;
    float* o = out + t * n_codes;
    if (!fast) {
      CodebookRowImpl(row + code_off, n_codes, b, cb, g, o);
      for (int j = 0; j < n_codes; ++j) {
        float x = o[j];
        if (mul) x = x * mul[j];
        if (add) x = x + add[j];
        o[j] = x + z;
      }
      for (int i = 0; i < n_sparse; ++i) {
        const uint8_t* sl = row + sparse_off + 3 * i;
        if (sl[0] < n_codes) o[sl[0]] = HalfAt(sl + 1);
      }
      continue;
    }
    const auto vg = hn::Set(df, g), vz = hn::Set(df, z);
    for (int v = 0; v < nv; ++v) {
      const auto c = CodesPlanned(row + code_off, plan[v], n_codes, b);
      auto x = hn::Mul(hn::TableLookupLanes(vt, hn::IndicesFromVec(df, hn::BitCast(di, c))), vg);
      if (mul) x = hn::Mul(x, hn::LoadU(df, mul + v * kN));
      if (add) x = hn::Add(x, hn::LoadU(df, add + v * kN));
      hn::StoreU(hn::Add(x, vz), df, o + v * kN);
    }
    for (int i = 0; i < n_sparse; ++i) {  // (u8 channel, fp16 value) slots; channel >= n: empty
      const uint8_t* sl = row + sparse_off + 3 * i;
      if (sl[0] < n_codes) o[sl[0]] = HalfAt(sl + 1);
    }
  }
}

// Many rows of [n_groups × (fp16 s, fp16 z)][codes]: out[t · n_groups·group + j] = code · s_g + z_g.
void AffineGroupRowsImpl(const uint8_t* HWY_RESTRICT rows, int64_t n_rows, size_t row_bytes,
                         int n_groups, int group, int b, float* HWY_RESTRICT out) {
  const DF df;
  const DI di;
  const int kN = int(hn::Lanes(df));
  const int d = n_groups * group;
  const size_t gb = size_t(group) * b / 8;
  if (!FastCodes(b) || group % kN != 0 || group / kN > 8) {
    for (int64_t t = 0; t < n_rows; ++t) {
      const uint8_t* row = rows + size_t(t) * row_bytes;
      for (int g = 0; g < n_groups; ++g) {
        AffineCodesRowImpl(row + 4 * n_groups + g * gb, group, b, HalfAt(row + 4 * g),
                           HalfAt(row + 4 * g + 2), out + t * d + g * group);
      }
    }
    return;
  }
  const int nv = group / kN;
  CodeChunk plan[8];
  for (int v = 0; v < nv; ++v) plan[v] = PlanChunk(v * kN, group, b);
  for (int64_t t = 0; t < n_rows; ++t) {
    const uint8_t* row = rows + size_t(t) * row_bytes;
    for (int g = 0; g < n_groups; ++g) {
      const uint8_t* codes = row + 4 * n_groups + g * gb;
      const auto vs = hn::Set(df, HalfAt(row + 4 * g)), vz = hn::Set(df, HalfAt(row + 4 * g + 2));
      for (int v = 0; v < nv; ++v) {
        const auto cf = hn::ConvertTo(df, hn::BitCast(di, CodesPlanned(codes, plan[v], group, b)));
        hn::StoreU(hn::Add(hn::Mul(cf, vs), vz), df, out + t * d + g * group + v * kN);
      }
    }
  }
}

// QJL: out[r * ld + t] = kappa · g_t · Σ_i (bit_ti ? sq[r][i] : −sq[r][i]).
void SignDotRowsImpl(const float* HWY_RESTRICT sq, int n_q, int m, const uint8_t* HWY_RESTRICT rows,
                     size_t row_bytes, size_t bits_off, size_t scale_off, float kappa, int64_t n,
                     float* HWY_RESTRICT out, int64_t ld) {
  const DF df;
  const int kN = int(hn::Lanes(df));
  (void)kN;
#if HWY_TARGET != HWY_SCALAR
  if (kN % 8 == 0 && m % kN == 0 && m <= 8192) {
    const int nbytes = m / 8;
    HWY_ALIGN uint8_t buf[4][8192 / 8 + 8] = {};
    for (int r0 = 0; r0 < n_q; r0 += 4) {
      const int nr = std::min(4, n_q - r0);
      const float* qb = sq + size_t(r0) * m;
      float* ob = out + size_t(r0) * ld;
      for (int64_t t = 0; t < n; t += 4) {
        const int nt = int(std::min<int64_t>(4, n - t));
        float g[4] = {0, 0, 0, 0};
        for (int k = 0; k < nt; ++k) {
          const uint8_t* row = rows + size_t(t + k) * row_bytes;
          std::memcpy(buf[k], row + bits_off, nbytes);  // LoadMaskBits may read 8 bytes ahead
          g[k] = kappa * HalfAt(row + scale_off);
        }
        hn::Vec<DF> acc[4][4];
        for (int r = 0; r < nr; ++r) {
          for (int k = 0; k < 4; ++k) acc[r][k] = hn::Zero(df);
        }
        for (int c = 0; c < m; c += kN) {
          hn::Mask<DF> mk[4];
          for (int k = 0; k < 4; ++k) mk[k] = hn::LoadMaskBits(df, buf[k] + c / 8);
          for (int r = 0; r < nr; ++r) {
            const auto v = hn::LoadU(df, qb + size_t(r) * m + c);
            const auto nv = hn::Neg(v);
            for (int k = 0; k < 4; ++k) acc[r][k] = hn::Add(acc[r][k], hn::IfThenElse(mk[k], v, nv));
          }
        }
        for (int r = 0; r < nr; ++r) {
          float s4[4];
          Sum4(acc[r][0], acc[r][1], acc[r][2], acc[r][3], s4);
          for (int k = 0; k < nt; ++k) ob[size_t(r) * ld + t + k] = g[k] * s4[k];
        }
      }
    }
    return;
  }
#endif
  for (int64_t t = 0; t < n; ++t) {
    const uint8_t* row = rows + size_t(t) * row_bytes;
    const float g = kappa * HalfAt(row + scale_off);
    const uint8_t* bits = row + bits_off;
    for (int r = 0; r < n_q; ++r) {
      float acc = 0.f;
      for (int i = 0; i < m; ++i) acc += (bits[i >> 3] >> (i & 7)) & 1 ? sq[size_t(r) * m + i] : -sq[size_t(r) * m + i];
      out[size_t(r) * ld + t] = g * acc;
    }
  }
}

// PolarQuant rows: [nb fp16 radii][46-bit code words per 16-block, LSB-first stream]. Block
// element i = r · T4[(i>>3)&1] · T3[i/8][(i>>2)&1] · T2[i/4][(i>>1)&1] · T1[i/2][i&1] (cos/sin of
// the codebook angles), multiplied in the scalar decoder's order (level 4 first), so bit-identical.
// `readable`: bytes readable from `codes` (past this row's codes when more rows follow).
HWY_INLINE uint64_t PolarWord(const uint8_t* codes, size_t code_bytes, size_t readable, int b) {
  const size_t bit = size_t(b) * 46, byte = bit >> 3;
  uint64_t w = 0;
  if (readable - byte >= 8) {
    std::memcpy(&w, codes + byte, 8);
  } else {
    for (size_t i = 0; byte + i < code_bytes; ++i) w |= uint64_t(codes[byte + i]) << (8 * i);
  }
  return w >> (bit & 7);
}

void PolarRowsImpl(const uint8_t* HWY_RESTRICT rows, int64_t n_rows, size_t row_bytes, int nb,
                   const float* HWY_RESTRICT trig, float* HWY_RESTRICT out) {
  const DF df;
  const DI di;
  const size_t code_bytes = (size_t(nb) * 46 + 7) / 8;
  const int d = nb * 16;
#if HWY_TARGET != HWY_SCALAR
  if (hn::Lanes(df) == 16) {
    const auto lane = hn::Iota(di, 0);
    const auto one = hn::Set(di, 1);
    const auto m1 = hn::RebindMask(df, hn::Eq(hn::And(lane, one), one));
    const auto m4 = hn::RebindMask(df, hn::Eq(hn::And(hn::ShiftRight<3>(lane), one), one));
    const auto sh1 = hn::BitCast(DU(), hn::ShiftLeft<2>(hn::ShiftRight<1>(lane)));           // 4·(i/2)
    const auto sh2 = hn::BitCast(DU(), hn::ShiftLeft<1>(hn::ShiftRight<2>(lane)));           // 2·(i/4)
    const auto sh3 = hn::BitCast(DU(), hn::Add(hn::ShiftLeft<1>(hn::ShiftRight<3>(lane)), hn::Set(di, 8)));
    const auto c1 = hn::LoadU(df, trig), s1 = hn::LoadU(df, trig + 16);
    // Levels 2 and 3 share one register: [cos2 0..3, sin2 0..3, cos3 0..3, sin3 0..3]; the lane's
    // cos/sin choice and level are folded into the index (one permute per level, no blend).
    HWY_ALIGN float t23[16];
    for (int k = 0; k < 4; ++k) {
      t23[k] = trig[32 + k];
      t23[4 + k] = trig[48 + k];
      t23[8 + k] = trig[64 + k];
      t23[12 + k] = trig[80 + k];
    }
    const auto tab23 = hn::Load(df, t23);
    const auto k2 = hn::BitCast(DU(), hn::ShiftLeft<2>(hn::And(hn::ShiftRight<1>(lane), one)));
    const auto k3 = hn::BitCast(DU(), hn::Add(hn::ShiftLeft<2>(hn::And(hn::ShiftRight<2>(lane), one)), hn::Set(di, 8)));
    const auto m15 = hn::Set(DU(), 15u), m3u = hn::Set(DU(), 3u);
    for (int64_t t = 0; t < n_rows; ++t) {
      const uint8_t* row = rows + size_t(t) * row_bytes;
      const uint8_t* codes = row + 2 * nb;
      const size_t readable = t + 1 < n_rows ? code_bytes + 8 : code_bytes;
      for (int b = 0; b < nb; ++b) {
        const uint64_t w = PolarWord(codes, code_bytes, readable, b);
        const auto lo = hn::Set(DU(), uint32_t(w));          // level 1: 8 × 4 bits
        const auto hi = hn::Set(DU(), uint32_t(w >> 32));    // levels 2, 3, 4: 4 × 2, 2 × 2, 1 × 2
        const int i4 = int((w >> 44) & 3);
        const auto f4 = hn::IfThenElse(m4, hn::Set(df, trig[112 + i4]), hn::Set(df, trig[96 + i4]));
        const auto i1 = hn::IndicesFromVec(df, hn::BitCast(di, hn::And(lo >> sh1, m15)));
        const auto i2 = hn::IndicesFromVec(df, hn::BitCast(di, hn::Or(hn::And(hi >> sh2, m3u), k2)));
        const auto i3 = hn::IndicesFromVec(df, hn::BitCast(di, hn::Or(hn::And(hi >> sh3, m3u), k3)));
        const auto f1 = hn::IfThenElse(m1, hn::TableLookupLanes(s1, i1), hn::TableLookupLanes(c1, i1));
        const auto f2 = hn::TableLookupLanes(tab23, i2);
        const auto f3 = hn::TableLookupLanes(tab23, i3);
        const auto r = hn::Set(df, HalfAt(row + 2 * b));
        hn::StoreU(hn::Mul(hn::Mul(hn::Mul(hn::Mul(r, f4), f3), f2), f1), df, out + t * d + b * 16);
      }
    }
    return;
  }
#endif
  (void)df;
  (void)di;
  for (int64_t t = 0; t < n_rows; ++t) {
    const uint8_t* row = rows + size_t(t) * row_bytes;
    const uint8_t* codes = row + 2 * nb;
    for (int b = 0; b < nb; ++b) {
      const uint64_t w = PolarWord(codes, code_bytes, code_bytes, b);
      const float r = HalfAt(row + 2 * b);
      const int i4 = int((w >> 44) & 3);
      for (int i = 0; i < 16; ++i) {
        const int a1 = int((w >> (4 * (i / 2))) & 15), a2 = int((w >> (32 + 2 * (i / 4))) & 3);
        const int a3 = int((w >> (40 + 2 * (i / 8))) & 3);
        const float f4 = trig[(i >> 3 & 1 ? 112 : 96) + i4];
        const float f3 = trig[(i >> 2 & 1 ? 80 : 64) + a3];
        const float f2 = trig[(i >> 1 & 1 ? 48 : 32) + a2];
        const float f1 = trig[(i & 1 ? 16 : 0) + a1];
        out[t * d + b * 16 + i] = r * f4 * f3 * f2 * f1;
      }
    }
  }
}


// ---- PolarQuant attention without a row-major tile: tokens in lanes. A tile of up to kPolarStage
// codes (nb · tokens) is staged per block as 32-bit code halves (bits 0..31: level-1 codes, 32..45:
// levels 2..4) and fp16 radii, 16 tokens per vector; the recursive decode then runs on vectors
// of 16 tokens (same multiplications in the same order as the scalar decode, so every decoded
// value is bit-identical), and the dots / weighted sums consume the decoded values straight from
// registers. Keys: level 1 is folded into the query (per pair j and row, a 16-entry table
// q_2j·cos ψ + q_2j+1·sin ψ over the level-1 angles, one lane permute per pair and row instead of
// two products), scores of 16 tokens accumulate lane-wise. Values: per (block, quarter of a
// block) four element accumulators per query row run over the tile's tokens and are summed across
// lanes once per tile.
constexpr int kPolarStage = 2048;  // codes (nb · tokens) per staged tile

struct PolarStaged {
  HWY_ALIGN uint32_t lo[kPolarStage];
  HWY_ALIGN uint32_t hi[kPolarStage];
  HWY_ALIGN uint16_t rad[kPolarStage];
};

// Stages rows [t0, t0 + m) into st (block b of token tt at b · tt_stride + tt; tokens m..m16 zero).
HWY_INLINE void PolarStage(const uint8_t* HWY_RESTRICT rows, int64_t n_rows, size_t row_bytes, int nb,
                           int64_t t0, int m, int tt_stride, PolarStaged* HWY_RESTRICT st) {
  const size_t code_bytes = (size_t(nb) * 46 + 7) / 8;
  const uint8_t* end = rows + size_t(n_rows) * row_bytes;
  // Rows whose every 8-byte code word read stays inside the rows (all but the last row or so).
  const size_t tail = 2 * size_t(nb) + (size_t(nb - 1) * 46 >> 3) + 8;
  const int64_t left = int64_t(end - rows) - int64_t(tail);  // row start must be <= left
  int fast = m;
  if (left < 0) {
    fast = 0;
  } else {
    fast = int(std::min<int64_t>(m, std::max<int64_t>(0, left / int64_t(row_bytes) + 1 - t0)));
  }
  const uint8_t* row = rows + size_t(t0) * row_bytes;
  for (int tt = 0; tt < fast; ++tt, row += row_bytes) {
    const uint8_t* codes = row + 2 * nb;
    for (int b = 0; b < nb; ++b) {
      const int bit = b * 46;
      uint64_t w;
      std::memcpy(&w, codes + (bit >> 3), 8);
      w >>= (bit & 7);
      uint16_t h;
      std::memcpy(&h, row + 2 * b, 2);
      st->lo[b * tt_stride + tt] = uint32_t(w);
      st->hi[b * tt_stride + tt] = uint32_t(w >> 32) & 0x3FFFu;
      st->rad[b * tt_stride + tt] = h;
    }
  }
  for (int tt = fast; tt < m; ++tt, row += row_bytes) {
    const uint8_t* codes = row + 2 * nb;
    const size_t readable = size_t(end - codes);
    for (int b = 0; b < nb; ++b) {
      const uint64_t w = PolarWord(codes, code_bytes, readable, b);
      st->lo[b * tt_stride + tt] = uint32_t(w);
      st->hi[b * tt_stride + tt] = uint32_t(w >> 32) & 0x3FFFu;
      uint16_t h;
      std::memcpy(&h, row + 2 * b, 2);
      st->rad[b * tt_stride + tt] = h;
    }
  }
  const int m16 = (m + 15) / 16 * 16;
  for (int b = 0; b < nb; ++b) {
    for (int tt = m; tt < m16; ++tt) {
      st->lo[b * tt_stride + tt] = 0;
      st->hi[b * tt_stride + tt] = 0;
      st->rad[b * tt_stride + tt] = 0;
    }
  }
}

#if HWY_TARGET != HWY_SCALAR
struct PolarTabs {
  hn::Vec<DF> c1, s1, c2, s2, c3, s3, c4, s4;
};
HWY_INLINE PolarTabs LoadPolarTabs(const float* trig) {
  const DF df;
  return {hn::LoadU(df, trig),      hn::LoadU(df, trig + 16), hn::LoadU(df, trig + 32),
          hn::LoadU(df, trig + 48), hn::LoadU(df, trig + 64), hn::LoadU(df, trig + 80),
          hn::LoadU(df, trig + 96), hn::LoadU(df, trig + 112)};
}
HWY_INLINE hn::Vec<DF> Tab(hn::Vec<DF> t, hn::Vec<DU> idx) {
  return hn::TableLookupLanes(t, hn::IndicesFromVec(DF(), hn::BitCast(DI(), idx)));
}
HWY_INLINE hn::Vec<DF> Radii16(const uint16_t* p) {
  const DF df;
  const hn::Rebind<hwy::float16_t, DF> dh;
  return hn::PromoteTo(df, hn::Load(dh, reinterpret_cast<const hwy::float16_t*>(p)));
}
#endif

// Fallback (vectors other than 16 floats): decode into a row-major tile, then f32 dots / axpys.
void PolarDotRowsTile(const float* q, int n_q, const uint8_t* rows, int64_t n, size_t row_bytes,
                      int nb, const float* trig, float* out, int64_t ld) {
  const int d = nb * 16;
  std::vector<float> tile(size_t(64) * d);
  for (int64_t t0 = 0; t0 < n; t0 += 64) {
    const int64_t m = std::min<int64_t>(64, n - t0);
    PolarRowsImpl(rows + size_t(t0) * row_bytes, m, row_bytes, nb, trig, tile.data());
    DotF32RowsImpl(q, n_q, tile.data(), m, d, out + t0, ld);
  }
}

void PolarDotRowsImpl(const float* HWY_RESTRICT q, int n_q, const uint8_t* HWY_RESTRICT rows,
                      int64_t n, size_t row_bytes, int nb, const float* HWY_RESTRICT trig,
                      float* HWY_RESTRICT out, int64_t ld) {
#if HWY_TARGET != HWY_SCALAR
  const DF df;
  const DU du;
  if (hn::Lanes(df) == 16 && nb <= kPolarStage / 16) {
    thread_local PolarStaged st;
    const int d = nb * 16;
    const PolarTabs tb = LoadPolarTabs(trig);
    const auto m3 = hn::Set(du, 3u), m15 = hn::Set(du, 15u);
    const int tile = kPolarStage / nb / 16 * 16;
    thread_local std::vector<float> qt;
    qt.resize(size_t(n_q) * nb * 128);
    for (int r = 0; r < n_q; ++r) {
      for (int b = 0; b < nb; ++b) {
        for (int j = 0; j < 8; ++j) {
          const float* qq = q + size_t(r) * d + 16 * b + 2 * j;
          hn::StoreU(hn::MulAdd(hn::Set(df, qq[1]), tb.s1, hn::Mul(hn::Set(df, qq[0]), tb.c1)), df,
                    qt.data() + (size_t(r) * nb + b) * 128 + 16 * j);
        }
      }
    }
    for (int64_t t0 = 0; t0 < n; t0 += tile) {
      const int m = int(std::min<int64_t>(tile, n - t0));
      PolarStage(rows, n, row_bytes, nb, t0, m, tile, &st);
      for (int g = 0; g < m; g += 16) {
        for (int r0 = 0; r0 < n_q; r0 += 4) {
          const int nr = std::min(4, n_q - r0);
          hn::Vec<DF> a0[4], a1[4];
          for (int r = 0; r < 4; ++r) a0[r] = a1[r] = hn::Zero(df);
          for (int b = 0; b < nb; ++b) {
            const auto lo = hn::Load(du, st.lo + b * tile + g);
            const auto hi = hn::Load(du, st.hi + b * tile + g);
            const auto rad = Radii16(st.rad + b * tile + g);
            const auto i4 = hn::ShiftRight<12>(hi);
            hn::Vec<DF> y3[4], y2[8];
            {
              const auto y40 = hn::Mul(rad, Tab(tb.c4, i4)), y41 = hn::Mul(rad, Tab(tb.s4, i4));
              const auto i30 = hn::And(hn::ShiftRight<8>(hi), m3), i31 = hn::ShiftRight<10>(hn::And(hi, hn::Set(du, 0xC00u)));
              y3[0] = hn::Mul(y40, Tab(tb.c3, i30));
              y3[1] = hn::Mul(y40, Tab(tb.s3, i30));
              y3[2] = hn::Mul(y41, Tab(tb.c3, i31));
              y3[3] = hn::Mul(y41, Tab(tb.s3, i31));
            }
            for (int k = 0; k < 4; ++k) {
              const auto i2 = hn::And(hn::ShiftRightSame(hi, 2 * k), m3);
              y2[2 * k] = hn::Mul(y3[k], Tab(tb.c2, i2));
              y2[2 * k + 1] = hn::Mul(y3[k], Tab(tb.s2, i2));
            }
            // Level 1 folded into the query: q_2j·cos ψ + q_2j+1·sin ψ per codebook angle.
            const float* lb = qt.data() + (size_t(r0) * nb + b) * 128;
            for (int j = 0; j < 8; j += 2) {
              const auto i1a = hn::And(hn::ShiftRightSame(lo, 4 * j), m15);
              const auto i1b = hn::And(hn::ShiftRightSame(lo, 4 * j + 4), m15);
              for (int r = 0; r < nr; ++r) {
                const float* l = lb + size_t(r) * nb * 128 + 16 * j;
                a0[r] = hn::MulAdd(y2[j], Tab(hn::LoadU(df, l), i1a), a0[r]);
                a1[r] = hn::MulAdd(y2[j + 1], Tab(hn::LoadU(df, l + 16), i1b), a1[r]);
              }
            }
          }
          const int cnt = std::min(16, m - g);
          for (int r = 0; r < nr; ++r) {
            float* o = out + size_t(r0 + r) * ld + t0 + g;
            const auto s = hn::Add(a0[r], a1[r]);
            if (cnt == 16) {
              hn::StoreU(s, df, o);
            } else {
              HWY_ALIGN float tmp[16];
              hn::Store(s, df, tmp);
              std::copy(tmp, tmp + cnt, o);
            }
          }
        }
      }
    }
    return;
  }
#endif
  PolarDotRowsTile(q, n_q, rows, n, row_bytes, nb, trig, out, ld);
}

void PolarAxpyRowsImpl(const float* HWY_RESTRICT p, int64_t ld, int n_q, const uint8_t* HWY_RESTRICT rows,
                       int64_t n, size_t row_bytes, int nb, const float* HWY_RESTRICT trig,
                       float* HWY_RESTRICT out) {
  const int d = nb * 16;
#if HWY_TARGET != HWY_SCALAR
  const DF df;
  const DU du;
  if (hn::Lanes(df) == 16 && nb <= kPolarStage / 16) {
    thread_local PolarStaged st;
    thread_local std::vector<float> pad;
    const PolarTabs tb = LoadPolarTabs(trig);
    const auto m3 = hn::Set(du, 3u), m15 = hn::Set(du, 15u);
    const int tile = kPolarStage / nb / 16 * 16;
    for (int64_t t0 = 0; t0 < n; t0 += tile) {
      const int m = int(std::min<int64_t>(tile, n - t0));
      const int m16 = (m + 15) / 16 * 16;
      PolarStage(rows, n, row_bytes, nb, t0, m, tile, &st);
      // Weights of the last, partial group of 16 tokens, zero-padded (radius 0 there too).
      const int gl = m / 16 * 16;
      if (gl < m) {
        pad.assign(size_t(n_q) * 16, 0.f);
        for (int r = 0; r < n_q; ++r) std::copy(p + size_t(r) * ld + t0 + gl, p + size_t(r) * ld + t0 + m, &pad[size_t(r) * 16]);
      }
      for (int b = 0; b < nb; ++b) {
        for (int qd = 0; qd < 4; ++qd) {
          const auto t4 = (qd >> 1) ? tb.s4 : tb.c4;
          const auto t3 = (qd & 1) ? tb.s3 : tb.c3;
          const int sh3 = 8 + 2 * (qd >> 1), sh2 = 2 * qd, sh1 = 8 * qd;
          for (int r0 = 0; r0 < n_q; r0 += 4) {
            const int nr = std::min(4, n_q - r0);
            hn::Vec<DF> acc[4][4];
            for (int r = 0; r < 4; ++r) {
              for (int k = 0; k < 4; ++k) acc[r][k] = hn::Zero(df);
            }
            for (int g = 0; g < m16; g += 16) {
              const auto lo = hn::Load(du, st.lo + b * tile + g);
              const auto hi = hn::Load(du, st.hi + b * tile + g);
              const auto rad = Radii16(st.rad + b * tile + g);
              const auto y4 = hn::Mul(rad, Tab(t4, hn::ShiftRight<12>(hi)));
              const auto y3 = hn::Mul(y4, Tab(t3, hn::And(hn::ShiftRightSame(hi, sh3), m3)));
              const auto i2 = hn::And(hn::ShiftRightSame(hi, sh2), m3);
              const auto y2a = hn::Mul(y3, Tab(tb.c2, i2)), y2b = hn::Mul(y3, Tab(tb.s2, i2));
              const auto ia = hn::And(hn::ShiftRightSame(lo, sh1), m15);
              const auto ib = hn::And(hn::ShiftRightSame(lo, sh1 + 4), m15);
              const auto e0 = hn::Mul(y2a, Tab(tb.c1, ia)), e1 = hn::Mul(y2a, Tab(tb.s1, ia));
              const auto e2 = hn::Mul(y2b, Tab(tb.c1, ib)), e3 = hn::Mul(y2b, Tab(tb.s1, ib));
              for (int r = 0; r < nr; ++r) {
                const float* wp = g < gl ? p + size_t(r0 + r) * ld + t0 + g : &pad[size_t(r0 + r) * 16];
                const auto w = hn::LoadU(df, wp);
                acc[r][0] = hn::MulAdd(w, e0, acc[r][0]);
                acc[r][1] = hn::MulAdd(w, e1, acc[r][1]);
                acc[r][2] = hn::MulAdd(w, e2, acc[r][2]);
                acc[r][3] = hn::MulAdd(w, e3, acc[r][3]);
              }
            }
            for (int r = 0; r < nr; ++r) {
              float s4[4];
              Sum4(acc[r][0], acc[r][1], acc[r][2], acc[r][3], s4);
              float* o = out + size_t(r0 + r) * d + 16 * b + 4 * qd;
              for (int k = 0; k < 4; ++k) o[k] += s4[k];
            }
          }
        }
      }
    }
    return;
  }
#endif
  std::vector<float> tile(size_t(64) * d);
  for (int64_t t0 = 0; t0 < n; t0 += 64) {
    const int64_t m = std::min<int64_t>(64, n - t0);
    PolarRowsImpl(rows + size_t(t0) * row_bytes, m, row_bytes, nb, trig, tile.data());
    AxpyF32RowsImpl(p + t0, ld, n_q, tile.data(), m, d, out);
  }
}

// ---- Pre-RoPE codebook keys, 16 tokens per block in lanes (KVQuant keys; contract in the header).
// Per rotated pair (2i, 2i+1) and vector of tokens: decode both channels (broadcast code word,
// per-lane shift, codebook permute, per-channel affine), rotate with the lane cos/sin, and
// accumulate q_r[2i]·y0 + q_r[2i+1]·y1 into each row's vector of token scores — no row tile, no
// horizontal sums. NR query rows per pass and kNV vectors per block are compile-time so the
// accumulators stay in registers.
constexpr int kRopeNV = kRopeBlockTokens / int(hn::MaxLanes(DF())) > 0
                            ? kRopeBlockTokens / int(hn::MaxLanes(DF())) : 1;
struct RopeLanes {
  hn::Vec<DU> sh[kRopeNV];
  hn::Mask<DU> hi[kRopeNV];
};
// cos / sin of pair i for the block's tokens v·kN.. (RopeTrig in the header): lanes of a table, or
// angle addition from the block's first position (row = its interleaved table row) and the
// offsets t·θ_i (offs [2][d/2][16]): cos(p+t) = c·ct − s·st, sin(p+t) = s·ct + c·st.
template <bool kRec>
HWY_INLINE void PairTrig(const float* HWY_RESTRICT tr, int64_t stride, const float* HWY_RESTRICT row,
                         const float* HWY_RESTRICT offs, int half, int i, int v, hn::Vec<DF>* cv,
                         hn::Vec<DF>* sv) {
  const DF df;
  const int kN = int(hn::Lanes(df));
  if (kRec) {
    const auto c = hn::Set(df, row[2 * i]), s = hn::Set(df, row[2 * i + 1]);
    const auto ct = hn::LoadU(df, offs + size_t(i) * kRopeBlockTokens + v * kN);
    const auto st = hn::LoadU(df, offs + size_t(half + i) * kRopeBlockTokens + v * kN);
    *cv = hn::MulSub(c, ct, hn::Mul(s, st));
    *sv = hn::MulAdd(s, ct, hn::Mul(c, st));
  } else {
    *cv = hn::LoadU(df, tr + size_t(i) * stride + v * kN);
    *sv = hn::LoadU(df, tr + size_t(half + i) * stride + v * kN);
  }
}
template <int NR, bool kRec>
HWY_INLINE void RopeDotBlockRows(const float* HWY_RESTRICT qb, int d, const uint8_t* HWY_RESTRICT codes,
                                 int b, bool last_safe, hn::Vec<DF> vt, const RopeLanes& ln,
                                 const float* HWY_RESTRICT mul, const float* HWY_RESTRICT add,
                                 const float* HWY_RESTRICT tr, int64_t stride, const float* HWY_RESTRICT row,
                                 const float* HWY_RESTRICT offs, float* HWY_RESTRICT out, int64_t ld) {
  const DF df;
  const DI di;
  const DU du;
  const int kN = int(hn::Lanes(df));
  const int half = d / 2, wb = 2 * b;
  const auto cmask = hn::Set(du, (1u << b) - 1u);
  hn::Vec<DF> acc[NR][kRopeNV];
  for (int r = 0; r < NR; ++r) {
    for (int v = 0; v < kRopeNV; ++v) acc[r][v] = hn::Zero(df);
  }
  // Channel c's 16 codes: two 32-bit words of 8 codes (bytes [0, b) and [b, 2b) of its stream);
  // bits above a word's 8·b are never extracted, so one 8-byte read serves both (it may cover
  // the next channel's bytes; the block's last stream uses an exact copy unless bytes follow).
  auto words = [&](int c, uint32_t* w0, uint32_t* w1) {
    uint64_t w = 0;
    if (c + 1 < d || last_safe) std::memcpy(&w, codes + size_t(c) * wb, 8);
    else std::memcpy(&w, codes + size_t(c) * wb, size_t(wb));
    *w0 = uint32_t(w);
    *w1 = uint32_t(w >> (8 * b));
  };
  for (int i = 0; i < half; ++i) {
    const int c0 = 2 * i, c1 = 2 * i + 1;
    uint32_t a0, a1, b0, b1;
    words(c0, &a0, &a1);
    words(c1, &b0, &b1);
    const auto m0 = hn::Set(df, mul[c0]), p0 = hn::Set(df, add[c0]);
    const auto m1 = hn::Set(df, mul[c1]), p1 = hn::Set(df, add[c1]);
    for (int v = 0; v < kRopeNV; ++v) {
      const auto k0 = hn::And(hn::Shr(hn::IfThenElse(ln.hi[v], hn::Set(du, a1), hn::Set(du, a0)), ln.sh[v]), cmask);
      const auto k1 = hn::And(hn::Shr(hn::IfThenElse(ln.hi[v], hn::Set(du, b1), hn::Set(du, b0)), ln.sh[v]), cmask);
      const auto x0 = hn::MulAdd(hn::TableLookupLanes(vt, hn::IndicesFromVec(df, hn::BitCast(di, k0))), m0, p0);
      const auto x1 = hn::MulAdd(hn::TableLookupLanes(vt, hn::IndicesFromVec(df, hn::BitCast(di, k1))), m1, p1);
      hn::Vec<DF> cv, sv;
      PairTrig<kRec>(tr, stride, row, offs, half, i, v, &cv, &sv);
      const auto y0 = hn::MulSub(x0, cv, hn::Mul(x1, sv));  // x0 c − x1 s
      const auto y1 = hn::MulAdd(x0, sv, hn::Mul(x1, cv));  // x0 s + x1 c
      for (int r = 0; r < NR; ++r) {
        acc[r][v] = hn::MulAdd(hn::Set(df, qb[size_t(r) * d + c0]), y0, acc[r][v]);
        acc[r][v] = hn::MulAdd(hn::Set(df, qb[size_t(r) * d + c1]), y1, acc[r][v]);
      }
    }
  }
  for (int r = 0; r < NR; ++r) {
    for (int v = 0; v < kRopeNV; ++v) hn::StoreU(acc[r][v], df, out + size_t(r) * ld + v * kN);
  }
}

void CodebookRopeDotBlocksImpl(const float* HWY_RESTRICT q, int n_q, const uint8_t* HWY_RESTRICT blocks,
                               int64_t n_blocks, size_t block_bytes, int d, int b,
                               const float* HWY_RESTRICT cb, const float* HWY_RESTRICT mul,
                               const float* HWY_RESTRICT add, int64_t sparse_off, int n_sparse,
                               const RopeTrig& trig, float* HWY_RESTRICT out, int64_t ld) {
  const DF df;
  const DI di;
  const DU du;
  constexpr int kT = kRopeBlockTokens;
  const int kN = int(hn::Lanes(df));
#if HWY_TARGET == HWY_SCALAR
  const bool ok = false;
#else
  const bool ok = kN >= 4 && kN * kRopeNV == kT && b >= 1 && b <= 4 && (1 << b) <= kN && d % 2 == 0;
#endif
  if (!ok) {
    ref::CodebookRopeDotBlocks(q, n_q, blocks, n_blocks, block_bytes, d, b, cb, mul, add, sparse_off, n_sparse,
                               trig, out, ld);
    return;
  }
  const bool rec = trig.rows != nullptr;
  const int64_t stride = trig.stride;
  HWY_ALIGN float tab[hn::MaxLanes(df)];
  for (int i = 0; i < kN; ++i) tab[i] = i < (1 << b) ? cb[i] : 0.f;
  const auto vt = hn::Load(df, tab);
  RopeLanes ln;
  for (int v = 0; v < kRopeNV; ++v) {
    const auto j = hn::BitCast(du, hn::Iota(di, v * kN));
    ln.sh[v] = hn::Mul(hn::And(j, hn::Set(du, 7u)), hn::Set(du, uint32_t(b)));
    ln.hi[v] = hn::Gt(j, hn::Set(du, 7u));
  }
  // 8 bytes from the last channel's stream stay inside the block when enough bytes follow it.
  const bool last_safe = size_t(d) * 2 * b + 8 - 2 * b <= block_bytes;
  for (int64_t blk = 0; blk < n_blocks; ++blk) {
    const uint8_t* codes = blocks + size_t(blk) * block_bytes;
    const float* tr = rec ? nullptr : trig.lanes + blk * kT;
    const float* row = rec ? trig.rows + size_t(blk) * kT * d : nullptr;
    float* ob = out + blk * kT;
    int r0 = 0;
#define KVC_ROPE_ROWS(NR)                                                                          \
  (rec ? RopeDotBlockRows<NR, true>(q + size_t(r0) * d, d, codes, b, last_safe, vt, ln, mul, add, tr,  \
                                    stride, row, trig.offs, ob + r0 * ld, ld)                       \
       : RopeDotBlockRows<NR, false>(q + size_t(r0) * d, d, codes, b, last_safe, vt, ln, mul, add, tr, \
                                     stride, row, trig.offs, ob + r0 * ld, ld))
    for (; r0 + 4 <= n_q; r0 += 4) KVC_ROPE_ROWS(4);
    switch (n_q - r0) {
      case 3: KVC_ROPE_ROWS(3); break;
      case 2: KVC_ROPE_ROWS(2); break;
      case 1: KVC_ROPE_ROWS(1); break;
      default: break;
    }
#undef KVC_ROPE_ROWS
    // Sparse outliers: replace each dense value's contribution, rotated — δ = v − dense at
    // channel ch of pair i: δ·(q_ch c + q_ch+1 s) for even ch, δ·(q_ch c − q_ch−1 s) for odd.
    const int half = d / 2;
    const uint8_t* sl = codes + sparse_off;
    for (int i = 0; i < n_sparse; ++i) {
      uint16_t at;
      std::memcpy(&at, sl + 4 * i, 2);
      if (at >= kT * d) continue;  // empty slot
      const int t = at / d, ch = at % d;
      uint64_t w = 0;
      std::memcpy(&w, codes + size_t(ch) * 2 * b, size_t(2 * b));
      const uint32_t code = uint32_t(w >> (t * b)) & ((1u << b) - 1u);
      const float dense = hn::GetLane(hn::MulAdd(hn::Set(df, cb[code]), hn::Set(df, mul[ch]), hn::Set(df, add[ch])));
      const float delta = HalfAt(sl + 4 * i + 2) - dense;
      const int pr = ch / 2;
      float c, sn;
      if (rec) {
        const float ct = trig.offs[size_t(pr) * kT + t], st = trig.offs[size_t(half + pr) * kT + t];
        c = row[2 * pr] * ct - row[2 * pr + 1] * st;
        sn = row[2 * pr + 1] * ct + row[2 * pr] * st;
      } else {
        c = tr[size_t(pr) * stride + t];
        sn = tr[size_t(half + pr) * stride + t];
      }
      for (int r = 0; r < n_q; ++r) {
        const float* qr = q + size_t(r) * d;
        ob[size_t(r) * ld + t] += ch % 2 == 0 ? delta * (qr[ch] * c + qr[ch + 1] * sn)
                                              : delta * (qr[ch] * c - qr[ch - 1] * sn);
      }
    }
  }
}

// ---- RoPE (pairs (2i, 2i+1)) over many rows, cos/sin from a table.
// In every vector the table row [c0, s0, c1, s1, ...] lines up with x's pairs: C = DupEven(t),
// S = DupOdd(t); y = x ∘ C + swap(x) ∘ (−S, +S, ...) with the pair swap Reverse2. Products and
// one add per lane, no FMA: y0 = x0·c + (−x1·s), y1 = x1·c + x0·s, bit-identical to the scalar
// x0·c − x1·s and x0·s + x1·c.
void RotatePairsRowsImpl(float* HWY_RESTRICT x, int64_t n, int64_t ld, int n_rot,
                         const float* HWY_RESTRICT table, const int64_t* HWY_RESTRICT pos) {
  const DF df;
  const int kN = int(hn::Lanes(df));
  const int nv = kN >= 2 ? n_rot / kN * kN : 0;
  for (int64_t t = 0; t < n; ++t) {
    float* xt = x + t * ld;
    const float* tr = table + pos[t] * n_rot;
    int c = 0;
#if HWY_TARGET != HWY_SCALAR
    auto rotate = [&](hn::Vec<DF> xv, hn::Vec<DF> tv) {
      const auto cv = hn::DupEven(tv), sv = hn::DupOdd(tv);
      const auto ss = hn::OddEven(sv, hn::Neg(sv));
      return hn::Add(hn::Mul(xv, cv), hn::Mul(hn::Reverse2(df, xv), ss));
    };
    for (; c < nv; c += kN) {
      hn::StoreU(rotate(hn::LoadU(df, xt + c), hn::LoadU(df, tr + c)), df, xt + c);
    }
    if (c < n_rot) {
      // The last pairs through the same vector operations on a zero-padded copy. Not a scalar
      // loop: GCC 12 vectorizes one as a complex multiply with vfmaddsub (FMA) even under
      // -ffp-contract=off, which broke bit-identity with the reference on AVX2.
      HWY_ALIGN float xb[hn::MaxLanes(df)] = {}, tb[hn::MaxLanes(df)] = {};
      std::copy(xt + c, xt + n_rot, xb);
      std::copy(tr + c, tr + n_rot, tb);
      hn::Store(rotate(hn::Load(df, xb), hn::Load(df, tb)), df, xb);
      std::copy(xb, xb + (n_rot - c), xt + c);
      c = n_rot;
    }
#endif
    for (; c + 1 < n_rot; c += 2) {  // HWY_SCALAR (no FMA in that target)
      const float co = tr[c], si = tr[c + 1], x0 = xt[c], x1 = xt[c + 1];
      xt[c] = x0 * co - x1 * si;
      xt[c + 1] = x0 * si + x1 * co;
    }
  }
}

// The target this copy of the file was compiled for (tests check what dispatch picked).
int64_t KvKernelsTargetImpl() { return HWY_TARGET; }

}  // namespace kvc::cpu::HWY_NAMESPACE
HWY_AFTER_NAMESPACE();

#if HWY_ONCE
namespace kvc::cpu {
HWY_EXPORT(KvKernelsTargetImpl);
int64_t KvKernelsCompiledTargets() { return HWY_TARGETS; }
int64_t KvKernelsDispatchedTarget() { return HWY_DYNAMIC_DISPATCH(KvKernelsTargetImpl)(); }
HWY_EXPORT(DotF32RowsImpl);
HWY_EXPORT(AxpyF32RowsImpl);
HWY_EXPORT(DecodeQ4_0RowsImpl);
HWY_EXPORT(DecodeQ4_1RowsImpl);
HWY_EXPORT(DecodeQ5_0RowsImpl);
HWY_EXPORT(DecodeE4M3RowsImpl);
HWY_EXPORT(CodebookRowImpl);
HWY_EXPORT(AffineCodesRowImpl);
HWY_EXPORT(AxpyCodesImpl);
HWY_EXPORT(AxpyCodesRowsImpl);
HWY_EXPORT(CodebookRowsImpl);
HWY_EXPORT(SignDotRowsImpl);
HWY_EXPORT(PolarRowsImpl);
HWY_EXPORT(PolarDotRowsImpl);
HWY_EXPORT(PolarAxpyRowsImpl);
HWY_EXPORT(RotatePairsRowsImpl);
HWY_EXPORT(CodebookAffineRowsImpl);
HWY_EXPORT(CodebookRopeDotBlocksImpl);
void CodebookRopeDotBlocks(const float* q, int n_q, const uint8_t* blocks, int64_t n_blocks,
                           size_t block_bytes, int d, int b, const float* cb, const float* mul,
                           const float* add, int64_t sparse_off, int n_sparse, const RopeTrig& trig,
                           float* out, int64_t ld) {
  HWY_DYNAMIC_DISPATCH(CodebookRopeDotBlocksImpl)(q, n_q, blocks, n_blocks, block_bytes, d, b, cb, mul, add,
                                                  sparse_off, n_sparse, trig, out, ld);
}
void CodebookAffineRows(const uint8_t* rows, int64_t n_rows, size_t row_bytes, size_t code_off,
                        int n_codes, int b, const float* cb, int64_t g_off, int64_t z_off,
                        const float* mul, const float* add, int64_t sparse_off, int n_sparse,
                        float* out) {
  HWY_DYNAMIC_DISPATCH(CodebookAffineRowsImpl)(rows, n_rows, row_bytes, code_off, n_codes, b, cb, g_off,
                                               z_off, mul, add, sparse_off, n_sparse, out);
}
void RotatePairsRows(float* x, int64_t n, int64_t ld, int n_rot, const float* table, const int64_t* pos) {
  HWY_DYNAMIC_DISPATCH(RotatePairsRowsImpl)(x, n, ld, n_rot, table, pos);
}
void PolarDotRows(const float* q, int n_q, const uint8_t* rows, int64_t n, size_t row_bytes, int nb,
                  const float* trig, float* out, int64_t ld) {
  HWY_DYNAMIC_DISPATCH(PolarDotRowsImpl)(q, n_q, rows, n, row_bytes, nb, trig, out, ld);
}
void PolarAxpyRows(const float* p, int64_t ld, int n_q, const uint8_t* rows, int64_t n,
                   size_t row_bytes, int nb, const float* trig, float* out) {
  HWY_DYNAMIC_DISPATCH(PolarAxpyRowsImpl)(p, ld, n_q, rows, n, row_bytes, nb, trig, out);
}
void PolarRows(const uint8_t* rows, int64_t n_rows, size_t row_bytes, int nb, const float* trig,
               float* out) {
  HWY_DYNAMIC_DISPATCH(PolarRowsImpl)(rows, n_rows, row_bytes, nb, trig, out);
}
void SignDotRows(const float* sq, int n_q, int m, const uint8_t* rows, size_t row_bytes,
                 size_t bits_off, size_t scale_off, float kappa, int64_t n, float* out, int64_t ld) {
  HWY_DYNAMIC_DISPATCH(SignDotRowsImpl)(sq, n_q, m, rows, row_bytes, bits_off, scale_off, kappa, n, out, ld);
}
HWY_EXPORT(AffineGroupRowsImpl);
void AxpyCodesRows(const uint8_t* bits, int n_streams, size_t stride, int n, int b, const float* w,
                   int n_q, float* acc) {
  HWY_DYNAMIC_DISPATCH(AxpyCodesRowsImpl)(bits, n_streams, stride, n, b, w, n_q, acc);
}
void CodebookRows(const uint8_t* rows, int64_t n_rows, size_t row_bytes, size_t code_off,
                  size_t scale_off, int n_codes, int b, const float* cb, float* out, int64_t ld) {
  HWY_DYNAMIC_DISPATCH(CodebookRowsImpl)(rows, n_rows, row_bytes, code_off, scale_off, n_codes, b, cb, out, ld);
}
void AffineGroupRows(const uint8_t* rows, int64_t n_rows, size_t row_bytes, int n_groups, int group,
                     int b, float* out) {
  HWY_DYNAMIC_DISPATCH(AffineGroupRowsImpl)(rows, n_rows, row_bytes, n_groups, group, b, out);
}

void DotF32Rows(const float* q, int n_q, const float* x, int64_t n, int d, float* out, int64_t ld) {
  HWY_DYNAMIC_DISPATCH(DotF32RowsImpl)(q, n_q, x, n, d, out, ld);
}
void AxpyF32Rows(const float* p, int64_t ld, int n_q, const float* x, int64_t n, int d, float* out) {
  HWY_DYNAMIC_DISPATCH(AxpyF32RowsImpl)(p, ld, n_q, x, n, d, out);
}
void DecodeQ4_0Rows(const uint8_t* rows, int64_t n, int d, float* out) {
  HWY_DYNAMIC_DISPATCH(DecodeQ4_0RowsImpl)(rows, n, d, out);
}
void DecodeQ4_1Rows(const uint8_t* rows, int64_t n, int d, float* out) {
  HWY_DYNAMIC_DISPATCH(DecodeQ4_1RowsImpl)(rows, n, d, out);
}
void DecodeQ5_0Rows(const uint8_t* rows, int64_t n, int d, float* out) {
  HWY_DYNAMIC_DISPATCH(DecodeQ5_0RowsImpl)(rows, n, d, out);
}
void DecodeE4M3Rows(const uint8_t* rows, int64_t n, int d, float* out) {
  HWY_DYNAMIC_DISPATCH(DecodeE4M3RowsImpl)(rows, n, d, out);
}
void CodebookRow(const uint8_t* bits, int n_codes, int b, const float* cb, float g, float* out) {
  HWY_DYNAMIC_DISPATCH(CodebookRowImpl)(bits, n_codes, b, cb, g, out);
}
void AffineCodesRow(const uint8_t* bits, int n_codes, int b, float s, float z, float* out) {
  HWY_DYNAMIC_DISPATCH(AffineCodesRowImpl)(bits, n_codes, b, s, z, out);
}
void AxpyCodes(const uint8_t* bits, int n, int b, float w, float* acc) {
  HWY_DYNAMIC_DISPATCH(AxpyCodesImpl)(bits, n, b, w, acc);
}

namespace ref {
static uint32_t CodeAt(const uint8_t* bits, int j, int b) {
  uint32_t v = 0;
  for (int i = 0; i < b; ++i) {
    const int pos = j * b + i;
    v |= uint32_t((bits[pos >> 3] >> (pos & 7)) & 1) << i;
  }
  return v;
}
void CodebookRopeDotBlocks(const float* q, int n_q, const uint8_t* blocks, int64_t n_blocks,
                           size_t block_bytes, int d, int b, const float* cb, const float* mul,
                           const float* add, int64_t sparse_off, int n_sparse, const RopeTrig& trig,
                           float* out, int64_t ld) {
  constexpr int kT = kRopeBlockTokens;
  const int half = d / 2;
  std::vector<float> y(d);
  for (int64_t blk = 0; blk < n_blocks; ++blk) {
    const uint8_t* codes = blocks + size_t(blk) * block_bytes;
    for (int t = 0; t < kT; ++t) {
      const int64_t col = blk * kT + t;
      for (int i = 0; i < half; ++i) {
        const int c0 = 2 * i, c1 = 2 * i + 1;
        const float x0 = cb[CodeAt(codes + size_t(c0) * 2 * b, t, b)] * mul[c0] + add[c0];
        const float x1 = cb[CodeAt(codes + size_t(c1) * 2 * b, t, b)] * mul[c1] + add[c1];
        y[c0] = x0;
        y[c1] = x1;
      }
      const uint8_t* sl = codes + sparse_off;
      for (int i = 0; i < n_sparse; ++i) {  // sparse outliers (this token's) replace the dense value
        uint16_t at, h;
        std::memcpy(&at, sl + 4 * i, 2);
        std::memcpy(&h, sl + 4 * i + 2, 2);
        if (at < kT * d && at / d == t) y[at % d] = gguf::Fp16ToFp32(h);
      }
      for (int i = 0; i < half; ++i) {
        float c, s;
        if (trig.rows) {
          const float* row = trig.rows + size_t(blk) * kT * d;
          const double ct = trig.offs[size_t(i) * kT + t], st = trig.offs[size_t(half + i) * kT + t];
          c = float(row[2 * i] * ct - row[2 * i + 1] * st);
          s = float(row[2 * i + 1] * ct + row[2 * i] * st);
        } else {
          c = trig.lanes[size_t(i) * trig.stride + col];
          s = trig.lanes[size_t(half + i) * trig.stride + col];
        }
        const float x0 = y[2 * i], x1 = y[2 * i + 1];
        y[2 * i] = x0 * c - x1 * s;
        y[2 * i + 1] = x0 * s + x1 * c;
      }
      for (int r = 0; r < n_q; ++r) {
        double acc = 0;
        for (int c = 0; c < d; ++c) acc += double(q[size_t(r) * d + c]) * y[c];
        out[size_t(r) * ld + col] = float(acc);
      }
    }
  }
}
void CodebookAffineRows(const uint8_t* rows, int64_t n_rows, size_t row_bytes, size_t code_off,
                        int n_codes, int b, const float* cb, int64_t g_off, int64_t z_off,
                        const float* mul, const float* add, int64_t sparse_off, int n_sparse,
                        float* out) {
  for (int64_t t = 0; t < n_rows; ++t) {
    const uint8_t* row = rows + size_t(t) * row_bytes;
    uint16_t h;
    float g = 1.f, z = 0.f;
    if (g_off >= 0) { std::memcpy(&h, row + g_off, 2); g = gguf::Fp16ToFp32(h); }
    if (z_off >= 0) { std::memcpy(&h, row + z_off, 2); z = gguf::Fp16ToFp32(h); }
    for (int j = 0; j < n_codes; ++j) {
      float x = cb[CodeAt(row + code_off, j, b)] * g;
      if (mul) x = x * mul[j];
      if (add) x = x + add[j];
      out[t * n_codes + j] = x + z;
    }
    for (int i = 0; i < n_sparse; ++i) {
      const uint8_t* sl = row + sparse_off + 3 * i;
      if (sl[0] < n_codes) { std::memcpy(&h, sl + 1, 2); out[t * n_codes + sl[0]] = gguf::Fp16ToFp32(h); }
    }
  }
}
// Not vectorized: GCC 12 turns this loop into a complex multiply with vfmaddsub (fused) where FMA
// is available, even under -ffp-contract=off; the contract is the rounded products, then the add.
#if defined(__GNUC__) && !defined(__clang__)
__attribute__((optimize("no-tree-vectorize")))
#endif
void RotatePairsRows(float* x, int64_t n, int64_t ld, int n_rot, const float* table, const int64_t* pos) {
  for (int64_t t = 0; t < n; ++t) {
    const float* tr = table + pos[t] * n_rot;
    for (int c = 0; c + 1 < n_rot; c += 2) {
      const float x0 = x[t * ld + c], x1 = x[t * ld + c + 1];
      x[t * ld + c] = x0 * tr[c] - x1 * tr[c + 1];
      x[t * ld + c + 1] = x0 * tr[c + 1] + x1 * tr[c];
    }
  }
}
void DotF32Rows(const float* q, int n_q, const float* x, int64_t n, int d, float* out, int64_t ld) {
  for (int64_t t = 0; t < n; ++t) {
    for (int r = 0; r < n_q; ++r) {
      double s = 0;
      for (int c = 0; c < d; ++c) s += double(q[size_t(r) * d + c]) * x[t * d + c];
      out[size_t(r) * ld + t] = float(s);
    }
  }
}
void AxpyF32Rows(const float* p, int64_t ld, int n_q, const float* x, int64_t n, int d, float* out) {
  for (int r = 0; r < n_q; ++r) {
    for (int c = 0; c < d; ++c) {
      double s = out[size_t(r) * d + c];
      for (int64_t t = 0; t < n; ++t) s += double(p[size_t(r) * ld + t]) * x[t * d + c];
      out[size_t(r) * d + c] = float(s);
    }
  }
}
void CodebookRow(const uint8_t* bits, int n_codes, int b, const float* cb, float g, float* out) {
  for (int j = 0; j < n_codes; ++j) out[j] = cb[CodeAt(bits, j, b)] * g;
}
void AffineCodesRow(const uint8_t* bits, int n_codes, int b, float s, float z, float* out) {
  for (int j = 0; j < n_codes; ++j) out[j] = float(CodeAt(bits, j, b)) * s + z;
}
void AxpyCodes(const uint8_t* bits, int n, int b, float w, float* acc) {
  for (int j = 0; j < n; ++j) acc[j] += w * float(CodeAt(bits, j, b));
}
void AxpyCodesRows(const uint8_t* bits, int n_streams, size_t stride, int n, int b, const float* w,
                   int n_q, float* acc) {
  for (int r = 0; r < n_q; ++r) {
    for (int j = 0; j < n; ++j) {
      double s = acc[size_t(r) * n + j];
      for (int c = 0; c < n_streams; ++c) {
        s += double(w[size_t(r) * n_streams + c]) * CodeAt(bits + size_t(c) * stride, j, b);
      }
      acc[size_t(r) * n + j] = float(s);
    }
  }
}
void SignDotRows(const float* sq, int n_q, int m, const uint8_t* rows, size_t row_bytes,
                 size_t bits_off, size_t scale_off, float kappa, int64_t n, float* out, int64_t ld) {
  for (int64_t t = 0; t < n; ++t) {
    const uint8_t* row = rows + size_t(t) * row_bytes;
    uint16_t h;
    std::memcpy(&h, row + scale_off, 2);
    const double g = double(kappa) * gguf::Fp16ToFp32(h);
    for (int r = 0; r < n_q; ++r) {
      double acc = 0;
      for (int i = 0; i < m; ++i) {
        const double v = sq[size_t(r) * m + i];
        acc += (row[bits_off + (i >> 3)] >> (i & 7)) & 1 ? v : -v;
      }
      out[size_t(r) * ld + t] = float(g * acc);
    }
  }
}
void CodebookRows(const uint8_t* rows, int64_t n_rows, size_t row_bytes, size_t code_off,
                  size_t scale_off, int n_codes, int b, const float* cb, float* out, int64_t ld) {
  for (int64_t t = 0; t < n_rows; ++t) {
    const uint8_t* row = rows + size_t(t) * row_bytes;
    uint16_t h;
    std::memcpy(&h, row + scale_off, 2);
    CodebookRow(row + code_off, n_codes, b, cb, gguf::Fp16ToFp32(h), out + t * ld);
  }
}
void AffineGroupRows(const uint8_t* rows, int64_t n_rows, size_t row_bytes, int n_groups, int group,
                     int b, float* out) {
  const size_t gb = size_t(group) * b / 8;
  for (int64_t t = 0; t < n_rows; ++t) {
    const uint8_t* row = rows + size_t(t) * row_bytes;
    for (int g = 0; g < n_groups; ++g) {
      uint16_t sz[2];
      std::memcpy(sz, row + 4 * g, 4);
      AffineCodesRow(row + 4 * n_groups + g * gb, group, b, gguf::Fp16ToFp32(sz[0]),
                     gguf::Fp16ToFp32(sz[1]), out + t * n_groups * group + g * group);
    }
  }
}
void PolarRow(const uint8_t* row, int nb, const float* trig, float* y) {
  const uint8_t* codes = row + 2 * nb;
  for (int b = 0; b < nb; ++b) {
    int idx[15];
    int pos = b * 46;
    for (int i = 0; i < 15; ++i) {
      const int w = i < 8 ? 4 : 2;
      int v = 0;
      for (int k = 0; k < w; ++k, ++pos) v |= ((codes[pos >> 3] >> (pos & 7)) & 1) << k;
      idx[i] = v;
    }
    uint16_t h;
    std::memcpy(&h, row + 2 * b, 2);
    float r[16] = {gguf::Fp16ToFp32(h)};
    int n = 1;
    const int off[4] = {0, 8, 12, 14};
    for (int l = 3; l >= 0; --l) {
      float nr[16];
      for (int j = 0; j < n; ++j) {
        nr[2 * j] = r[j] * trig[2 * l * 16 + idx[off[l] + j]];
        nr[2 * j + 1] = r[j] * trig[(2 * l + 1) * 16 + idx[off[l] + j]];
      }
      n *= 2;
      std::copy(nr, nr + n, r);
    }
    std::copy(r, r + 16, y + 16 * b);
  }
}
void PolarDotRows(const float* q, int n_q, const uint8_t* rows, int64_t n, size_t row_bytes, int nb,
                  const float* trig, float* out, int64_t ld) {
  const int d = nb * 16;
  std::vector<float> y(d);
  for (int64_t t = 0; t < n; ++t) {
    PolarRow(rows + size_t(t) * row_bytes, nb, trig, y.data());
    for (int r = 0; r < n_q; ++r) {
      double s = 0;
      for (int c = 0; c < d; ++c) s += double(q[size_t(r) * d + c]) * y[c];
      out[size_t(r) * ld + t] = float(s);
    }
  }
}
void PolarAxpyRows(const float* p, int64_t ld, int n_q, const uint8_t* rows, int64_t n,
                   size_t row_bytes, int nb, const float* trig, float* out) {
  const int d = nb * 16;
  std::vector<float> y(size_t(n) * d);
  for (int64_t t = 0; t < n; ++t) PolarRow(rows + size_t(t) * row_bytes, nb, trig, &y[size_t(t) * d]);
  AxpyF32Rows(p, ld, n_q, y.data(), n, d, out);
}
}  // namespace ref
}  // namespace kvc::cpu
#endif  // HWY_ONCE
