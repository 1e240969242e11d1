// fp16 KV kernels (Highway, runtime dispatch): conversion, multi-row dot products and weighted
// accumulation over fp16 rows, used by the f16 codec's fused attention path and the fp16 tails.
// Scalar references: ref::F16ToF32 / ref::DotF16Rows / ref::AxpyF16Rows (tests/unit/cpu_f16_test.cc).
#ifndef HWY_WANT_AVX3_DL
#define HWY_WANT_AVX3_DL  // every kernel file has the same targets (cpu/targets.h; tests pin each)
#endif
#ifndef KVC_CPU_F16_SHARED_
#define KVC_CPU_F16_SHARED_
#include <algorithm>
#include <cstring>

#include "cpu/ops.h"
#include "gguf/types.h"
#endif  // KVC_CPU_F16_SHARED_

#undef HWY_TARGET_INCLUDE
#define HWY_TARGET_INCLUDE "cpu/f16.cc"
// clang-format off
#include "hwy/foreach_target.h"  // IWYU pragma: keep
#include "hwy/highway.h"
// clang-format on

HWY_BEFORE_NAMESPACE();
namespace kvc::cpu::HWY_NAMESPACE {
namespace hn = hwy::HWY_NAMESPACE;

using DF = hn::ScalableTag<float>;
using DH = hn::Rebind<hwy::float16_t, DF>;

HWY_INLINE hn::Vec<DF> LoadH(const uint16_t* p) {
  return hn::PromoteTo(DF(), hn::LoadU(DH(), reinterpret_cast<const hwy::float16_t*>(p)));
}

void F16ToF32Impl(const uint16_t* HWY_RESTRICT h, int64_t n, float* HWY_RESTRICT out) {
  const DF df;
  const int64_t kN = hn::Lanes(df);
  int64_t i = 0;
  for (; i + kN <= n; i += kN) hn::StoreU(LoadH(h + i), df, out + i);
  for (; i < n; ++i) out[i] = gguf::Fp16ToFp32(h[i]);
}

// The last d mod Lanes channels of a row, zero-padded to one vector (low-rank and ThinK streams
// have d = 38, 49, 8, ...: the tail is one more vector step instead of a scalar loop).
constexpr int kMaxF32Lanes = HWY_MAX_BYTES / 4;  // >= Lanes(DF) on every target
HWY_INLINE hn::Vec<DF> LoadHTail(const uint16_t* p, int n_tail) {
  alignas(64) uint16_t buf[kMaxF32Lanes] = {};
  std::memcpy(buf, p, size_t(n_tail) * 2);
  return LoadH(buf);
}

// out[r * ld + t] = <q[r], k[t]>: q [n_q, d] f32, k [n, d] fp16. Any d, any n_q.
void DotF16RowsImpl(const float* HWY_RESTRICT q, int n_q, const uint16_t* HWY_RESTRICT k, int64_t n,
                    int d, float* HWY_RESTRICT out, int64_t ld) {
  constexpr int kMaxRows = 16;
  if (n_q > kMaxRows) {
    for (int r0 = 0; r0 < n_q; r0 += kMaxRows) {
      DotF16RowsImpl(q + size_t(r0) * d, std::min(kMaxRows, n_q - r0), k, n, d,
                     out + size_t(r0) * ld, ld);
    }
    return;
  }
  const DF df;
  const int kN = int(hn::Lanes(df));
  const int n_tail = d % kN, d_vec = d - n_tail;
  // Query tails, zero-padded once per call.
  alignas(64) float q_tail[kMaxRows * kMaxF32Lanes];
  if (n_tail > 0) {
    std::memset(q_tail, 0, sizeof(q_tail));
    for (int r = 0; r < n_q; ++r) {
      std::memcpy(q_tail + r * kN, q + size_t(r) * d + d_vec, size_t(n_tail) * 4);
    }
  }
  // Rows t < n_full_load can load a whole vector at their tail without leaving the n rows.
  const int64_t n_full_load = n * d >= d_vec + kN ? (n * d - d_vec - kN) / d + 1 : 0;
  for (int64_t t = 0; t < n; ++t) {
    const uint16_t* kt = k + t * d;
    hn::Vec<DF> acc[kMaxRows];
    for (int r = 0; r < n_q; ++r) acc[r] = hn::Zero(df);
    for (int c = 0; c < d_vec; c += kN) {
      const auto kv = LoadH(kt + c);
      for (int r = 0; r < n_q; ++r) acc[r] = hn::MulAdd(hn::LoadU(df, q + size_t(r) * d + c), kv, acc[r]);
    }
    if (n_tail > 0) {
      // A full vector from the tail runs into the next row (finite fp16: the cache refuses
      // non-finite input), which the zero-padded query lanes cancel; the last rows, where that
      // would read past the rows, copy the tail instead.
      const auto kv = t < n_full_load ? LoadH(kt + d_vec) : LoadHTail(kt + d_vec, n_tail);
      for (int r = 0; r < n_q; ++r) acc[r] = hn::MulAdd(hn::Load(df, q_tail + r * kN), kv, acc[r]);
    }
    for (int r = 0; r < n_q; ++r) out[size_t(r) * ld + t] = hn::GetLane(hn::SumOfLanes(df, acc[r]));
  }
}

// out[r] [d] += Σ_t p[r * ld + t] · v[t]: v [n, d] fp16. Any d (zero-padded tail vector).
void AxpyF16RowsImpl(const float* HWY_RESTRICT p, int64_t ld, int n_q, const uint16_t* HWY_RESTRICT v,
                     int64_t n, int d, float* HWY_RESTRICT out) {
  const DF df;
  const int kN = int(hn::Lanes(df));
  const int n_tail = d % kN, d_vec = d - n_tail;
  const int64_t n_full_load = n * d >= d_vec + kN ? (n * d - d_vec - kN) / d + 1 : 0;
  for (int r = 0; r < n_q; ++r) {
    float* o = out + size_t(r) * d;
    const float* pr = p + size_t(r) * ld;
    for (int c = 0; c < d_vec; c += kN) {
      auto acc = hn::LoadU(df, o + c);
      for (int64_t t = 0; t < n; ++t) acc = hn::MulAdd(hn::Set(df, pr[t]), LoadH(v + t * d + c), acc);
      hn::StoreU(acc, df, o + c);
    }
    if (n_tail > 0) {
      // As in DotF16Rows: whole vectors into the next row while they stay inside the n rows; the
      // extra lanes only reach accumulator lanes that are never stored.
      auto acc = hn::Zero(df);
      int64_t t = 0;
      for (; t < n_full_load; ++t) acc = hn::MulAdd(hn::Set(df, pr[t]), LoadH(v + t * d + d_vec), acc);
      for (; t < n; ++t) {
        acc = hn::MulAdd(hn::Set(df, pr[t]), LoadHTail(v + t * d + d_vec, n_tail), acc);
      }
      alignas(64) float tail[kMaxF32Lanes];
      hn::Store(acc, df, tail);
      for (int c = 0; c < n_tail; ++c) o[d_vec + c] += tail[c];
    }
  }
}

// q8_0 rows (ggml block: fp16 d + 32 int8, 34 bytes; d_blocks per row):
// out[r * ld + t] = Σ_b d_tb · <q[r][32b..], c_tb>.
HWY_INLINE hn::Vec<DF> LoadI8(const int8_t* p) {
  using DI = hn::Rebind<int32_t, DF>;
  using D8 = hn::Rebind<int8_t, DF>;
  return hn::ConvertTo(DF(), hn::PromoteTo(DI(), hn::LoadU(D8(), p)));
}

void DotQ8RowsImpl(const float* HWY_RESTRICT q, int n_q, const uint8_t* HWY_RESTRICT rows_,
                   int64_t n, int d, float* HWY_RESTRICT out, int64_t ld) {
  const DF df;
  const int kN = int(hn::Lanes(df));
  const int nb = d / 32;
  const size_t row_bytes = size_t(nb) * 34;
  for (int64_t t = 0; t < n; ++t) {
    const uint8_t* row = rows_ + t * row_bytes;
    for (int r = 0; r < n_q; ++r) {
      const float* qr = q + size_t(r) * d;
      float acc = 0.f;
      for (int b = 0; b < nb; ++b) {
        const uint8_t* blk = row + b * 34;
        uint16_t dh;
        std::memcpy(&dh, blk, 2);
        const auto* c = reinterpret_cast<const int8_t*>(blk + 2);
        auto s = hn::Zero(df);
        for (int i = 0; i < 32; i += kN) s = hn::MulAdd(hn::LoadU(df, qr + b * 32 + i), LoadI8(c + i), s);
        acc += gguf::Fp16ToFp32(dh) * hn::GetLane(hn::SumOfLanes(df, s));
      }
      out[size_t(r) * ld + t] = acc;
    }
  }
}

// out[r] [d] += Σ_t p[r * ld + t] · decode(row t).
void AxpyQ8RowsImpl(const float* HWY_RESTRICT p, int64_t ld, int n_q, const uint8_t* HWY_RESTRICT rows_,
                    int64_t n, int d, float* HWY_RESTRICT out) {
  const DF df;
  const int kN = int(hn::Lanes(df));
  const int nb = d / 32;
  const size_t row_bytes = size_t(nb) * 34;
  for (int64_t t = 0; t < n; ++t) {
    const uint8_t* row = rows_ + t * row_bytes;
    for (int b = 0; b < nb; ++b) {
      const uint8_t* blk = row + b * 34;
      uint16_t dh;
      std::memcpy(&dh, blk, 2);
      const float dd = gguf::Fp16ToFp32(dh);
      const auto* c = reinterpret_cast<const int8_t*>(blk + 2);
      for (int r = 0; r < n_q; ++r) {
        const float w = p[size_t(r) * ld + t] * dd;
        if (w == 0.f) continue;
        const auto wv = hn::Set(df, w);
        float* o = out + size_t(r) * d + b * 32;
        for (int i = 0; i < 32; i += kN) {
          hn::StoreU(hn::MulAdd(wv, LoadI8(c + i), hn::LoadU(df, o + i)), df, o + i);
        }
      }
    }
  }
}

// The target this copy of the file was compiled for (tests check what dispatch picked).
int64_t F16TargetImpl() { return HWY_TARGET; }

}  // namespace kvc::cpu::HWY_NAMESPACE
HWY_AFTER_NAMESPACE();

#if HWY_ONCE
namespace kvc::cpu {
HWY_EXPORT(F16TargetImpl);
int64_t F16CompiledTargets() { return HWY_TARGETS; }
int64_t F16DispatchedTarget() { return HWY_DYNAMIC_DISPATCH(F16TargetImpl)(); }
HWY_EXPORT(F16ToF32Impl);
HWY_EXPORT(DotF16RowsImpl);
HWY_EXPORT(AxpyF16RowsImpl);
HWY_EXPORT(DotQ8RowsImpl);
HWY_EXPORT(AxpyQ8RowsImpl);

void DotQ8Rows(const float* q, int n_q, const uint8_t* rows, int64_t n, int d, float* out, int64_t ld) {
  HWY_DYNAMIC_DISPATCH(DotQ8RowsImpl)(q, n_q, rows, n, d, out, ld);
}
void AxpyQ8Rows(const float* p, int64_t ld, int n_q, const uint8_t* rows, int64_t n, int d, float* out) {
  HWY_DYNAMIC_DISPATCH(AxpyQ8RowsImpl)(p, ld, n_q, rows, n, d, out);
}

void F16ToF32(const uint16_t* h, int64_t n, float* out) {
  HWY_DYNAMIC_DISPATCH(F16ToF32Impl)(h, n, out);
}
void DotF16Rows(const float* q, int n_q, const uint16_t* k, int64_t n, int d, float* out, int64_t ld) {
  HWY_DYNAMIC_DISPATCH(DotF16RowsImpl)(q, n_q, k, n, d, out, ld);
}
void AxpyF16Rows(const float* p, int64_t ld, int n_q, const uint16_t* v, int64_t n, int d, float* out) {
  HWY_DYNAMIC_DISPATCH(AxpyF16RowsImpl)(p, ld, n_q, v, n, d, out);
}

namespace ref {
void F16ToF32(const uint16_t* h, int64_t n, float* out) {
  for (int64_t i = 0; i < n; ++i) out[i] = gguf::Fp16ToFp32(h[i]);
}
void DotF16Rows(const float* q, int n_q, const uint16_t* k, int64_t n, int d, float* out, int64_t ld) {
  for (int64_t t = 0; t < n; ++t) {
    for (int r = 0; r < n_q; ++r) {
      double s = 0;
      for (int c = 0; c < d; ++c) s += double(q[size_t(r) * d + c]) * gguf::Fp16ToFp32(k[t * d + c]);
      out[size_t(r) * ld + t] = float(s);
    }
  }
}
void AxpyF16Rows(const float* p, int64_t ld, int n_q, const uint16_t* v, int64_t n, int d, float* out) {
  for (int r = 0; r < n_q; ++r) {
    for (int c = 0; c < d; ++c) {
      double s = out[size_t(r) * d + c];
      for (int64_t t = 0; t < n; ++t) s += double(p[size_t(r) * ld + t]) * gguf::Fp16ToFp32(v[t * d + c]);
      out[size_t(r) * d + c] = float(s);
    }
  }
}
}  // namespace ref
}  // namespace kvc::cpu
#endif  // HWY_ONCE
