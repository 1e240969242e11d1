// Elementwise / reduction kernels (Highway, runtime dispatch) and the scalar references that the
// tests compare every CPU kernel against (including ref::MatMul).
#ifndef HWY_WANT_AVX3_DL
#define HWY_WANT_AVX3_DL  // same target set as matmul.cc (tests pin targets)
#endif

#ifndef KVC_CPU_OPS_SHARED_
#define KVC_CPU_OPS_SHARED_
#include "cpu/ops.h"

#include <algorithm>
#include <cmath>
#include <vector>
#endif  // KVC_CPU_OPS_SHARED_

#undef HWY_TARGET_INCLUDE
#define HWY_TARGET_INCLUDE "cpu/ops.cc"
// clang-format off
#include "hwy/foreach_target.h"  // IWYU pragma: keep
#include "hwy/highway.h"
#include "hwy/contrib/math/math-inl.h"
// clang-format on

HWY_BEFORE_NAMESPACE();
namespace kvc::cpu::HWY_NAMESPACE {
namespace hn = hwy::HWY_NAMESPACE;

using DF = hn::ScalableTag<float>;

// a, b [n] f32.
float DotImpl(const float* HWY_RESTRICT a, const float* HWY_RESTRICT b, int64_t n) {
  const DF df;
  const int64_t kN = hn::Lanes(df);
  auto s0 = hn::Zero(df), s1 = hn::Zero(df), s2 = hn::Zero(df), s3 = hn::Zero(df);
  int64_t i = 0;
  for (; i + 4 * kN <= n; i += 4 * kN) {
    s0 = hn::MulAdd(hn::LoadU(df, a + i), hn::LoadU(df, b + i), s0);
    s1 = hn::MulAdd(hn::LoadU(df, a + i + kN), hn::LoadU(df, b + i + kN), s1);
    s2 = hn::MulAdd(hn::LoadU(df, a + i + 2 * kN), hn::LoadU(df, b + i + 2 * kN), s2);
    s3 = hn::MulAdd(hn::LoadU(df, a + i + 3 * kN), hn::LoadU(df, b + i + 3 * kN), s3);
  }
  for (; i + kN <= n; i += kN) s0 = hn::MulAdd(hn::LoadU(df, a + i), hn::LoadU(df, b + i), s0);
  float s = hn::GetLane(hn::SumOfLanes(df, hn::Add(hn::Add(s0, s1), hn::Add(s2, s3))));
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}

// x [n] f32; y [n] f32 += a * x.
void AxpyImpl(float a, const float* HWY_RESTRICT x, int64_t n, float* HWY_RESTRICT y) {
  const DF df;
  const int64_t kN = hn::Lanes(df);
  const auto va = hn::Set(df, a);
  int64_t i = 0;
  for (; i + kN <= n; i += kN) {
    hn::StoreU(hn::MulAdd(va, hn::LoadU(df, x + i), hn::LoadU(df, y + i)), df, y + i);
  }
  for (; i < n; ++i) y[i] += a * x[i];
}

// x, y [n_rows, n] f32; w [n] f32.
void RmsNormImpl(const float* HWY_RESTRICT x, const float* HWY_RESTRICT w, int64_t n_rows,
                 int64_t n, float eps, float* HWY_RESTRICT y) {
  const DF df;
  const int64_t kN = hn::Lanes(df);
  for (int64_t r = 0; r < n_rows; ++r) {
    const float* xr = x + r * n;
    float* yr = y + r * n;
    const float ss = DotImpl(xr, xr, n);
    const float scale = 1.0f / std::sqrt(ss / static_cast<float>(n) + eps);
    const auto vs = hn::Set(df, scale);
    int64_t i = 0;
    for (; i + kN <= n; i += kN) {
      hn::StoreU(hn::Mul(hn::Mul(hn::LoadU(df, xr + i), vs), hn::LoadU(df, w + i)), df, yr + i);
    }
    for (; i < n; ++i) yr[i] = xr[i] * scale * w[i];
  }
}

// gate, up, out [n] f32: out = gate * sigmoid(gate) * up.
void SwiGluImpl(const float* HWY_RESTRICT gate, const float* HWY_RESTRICT up, int64_t n,
                float* HWY_RESTRICT out) {
  const DF df;
  const int64_t kN = hn::Lanes(df);
  const auto one = hn::Set(df, 1.0f);
  int64_t i = 0;
  for (; i + kN <= n; i += kN) {
    const auto g = hn::LoadU(df, gate + i);
    const auto e = hn::Exp(df, hn::Neg(g));
    hn::StoreU(hn::Mul(hn::Div(g, hn::Add(one, e)), hn::LoadU(df, up + i)), df, out + i);
  }
  for (; i < n; ++i) out[i] = gate[i] / (1.0f + std::exp(-gate[i])) * up[i];
}

// x [n] f32, in place.
void SoftmaxImpl(float* HWY_RESTRICT x, int64_t n) {
  if (n <= 0) return;
  const DF df;
  const int64_t kN = hn::Lanes(df);
  float mx = x[0];
  int64_t i = 0;
  if (n >= kN) {
    auto vm = hn::LoadU(df, x);
    for (i = kN; i + kN <= n; i += kN) vm = hn::Max(vm, hn::LoadU(df, x + i));
    mx = hn::GetLane(hn::MaxOfLanes(df, vm));
  }
  for (; i < n; ++i) mx = std::max(mx, x[i]);
  const auto vmx = hn::Set(df, mx);
  auto vs = hn::Zero(df);
  for (i = 0; i + kN <= n; i += kN) {
    const auto e = hn::Exp(df, hn::Sub(hn::LoadU(df, x + i), vmx));
    vs = hn::Add(vs, e);
    hn::StoreU(e, df, x + i);
  }
  float sum = hn::GetLane(hn::SumOfLanes(df, vs));
  for (; i < n; ++i) {
    x[i] = std::exp(x[i] - mx);
    sum += x[i];
  }
  const auto inv = hn::Set(df, 1.0f / sum);
  for (i = 0; i + kN <= n; i += kN) hn::StoreU(hn::Mul(hn::LoadU(df, x + i), inv), df, x + i);
  for (; i < n; ++i) x[i] *= 1.0f / sum;
}

// The target this copy of the file was compiled for (tests check what dispatch picked).
int64_t OpsTargetImpl() { return HWY_TARGET; }

}  // namespace kvc::cpu::HWY_NAMESPACE
HWY_AFTER_NAMESPACE();

#if HWY_ONCE
namespace kvc::cpu {
HWY_EXPORT(OpsTargetImpl);
int64_t OpsCompiledTargets() { return HWY_TARGETS; }
int64_t OpsDispatchedTarget() { return HWY_DYNAMIC_DISPATCH(OpsTargetImpl)(); }
HWY_EXPORT(DotImpl);
HWY_EXPORT(AxpyImpl);
HWY_EXPORT(RmsNormImpl);
HWY_EXPORT(SwiGluImpl);
HWY_EXPORT(SoftmaxImpl);

void RmsNorm(const float* x, const float* w, int64_t n_rows, int64_t n, float eps, float* y) {
  HWY_DYNAMIC_DISPATCH(RmsNormImpl)(x, w, n_rows, n, eps, y);
}
void SwiGlu(const float* gate, const float* up, int64_t n, float* out) {
  HWY_DYNAMIC_DISPATCH(SwiGluImpl)(gate, up, n, out);
}
float Dot(const float* a, const float* b, int64_t n) {
  return HWY_DYNAMIC_DISPATCH(DotImpl)(a, b, n);
}
void Axpy(float a, const float* x, int64_t n, float* y) {
  HWY_DYNAMIC_DISPATCH(AxpyImpl)(a, x, n, y);
}
void Softmax(float* x, int64_t n) { HWY_DYNAMIC_DISPATCH(SoftmaxImpl)(x, n); }

namespace ref {

// x [n_tokens, n_in] f32 · rows of w dequantized by w.DequantizeRow, summed in f64;
// y [n_tokens, n_out] f32.
void MatMul(const Weight& w, const float* x, int64_t n_tokens, float* y) {
  const int64_t n_in = w.n_in(), n_out = w.n_out();
  std::vector<float> row(n_in);  // [n_in] f32
  for (int64_t r = 0; r < n_out; ++r) {
    w.DequantizeRow(r, row.data());
    for (int64_t t = 0; t < n_tokens; ++t) {
      double s = 0.0;
      for (int64_t i = 0; i < n_in; ++i) s += static_cast<double>(row[i]) * x[t * n_in + i];
      y[t * n_out + r] = static_cast<float>(s);
    }
  }
}

void RmsNorm(const float* x, const float* w, int64_t n_rows, int64_t n, float eps, float* y) {
  for (int64_t r = 0; r < n_rows; ++r) {
    double ss = 0.0;
    for (int64_t i = 0; i < n; ++i) ss += static_cast<double>(x[r * n + i]) * x[r * n + i];
    const double scale = 1.0 / std::sqrt(ss / static_cast<double>(n) + eps);
    for (int64_t i = 0; i < n; ++i) y[r * n + i] = static_cast<float>(x[r * n + i] * scale * w[i]);
  }
}

void SwiGlu(const float* gate, const float* up, int64_t n, float* out) {
  for (int64_t i = 0; i < n; ++i) {
    const double g = gate[i];
    out[i] = static_cast<float>(g / (1.0 + std::exp(-g)) * up[i]);
  }
}

float Dot(const float* a, const float* b, int64_t n) {
  double s = 0.0;
  for (int64_t i = 0; i < n; ++i) s += static_cast<double>(a[i]) * b[i];
  return static_cast<float>(s);
}

void Axpy(float a, const float* x, int64_t n, float* y) {
  for (int64_t i = 0; i < n; ++i) y[i] = static_cast<float>(y[i] + static_cast<double>(a) * x[i]);
}

void Softmax(float* x, int64_t n) {
  if (n <= 0) return;
  double mx = x[0];
  for (int64_t i = 1; i < n; ++i) mx = std::max<double>(mx, x[i]);
  double sum = 0.0;
  std::vector<double> e(n);
  for (int64_t i = 0; i < n; ++i) sum += e[i] = std::exp(x[i] - mx);
  for (int64_t i = 0; i < n; ++i) x[i] = static_cast<float>(e[i] / sum);
}

}  // namespace ref
}  // namespace kvc::cpu
#endif  // HWY_ONCE
