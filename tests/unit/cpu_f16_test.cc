// fp16 KV kernels (src/cpu/f16.cc) against their scalar references, once per Highway target
// (tests/unit/per_target.h).
#include <gtest/gtest.h>

#include <cmath>
#include <random>
#include <vector>

#include "cpu/ops.h"
#include "gguf/types.h"
#include "fp_bounds.h"
#include "per_target.h"

namespace kvc::cpu {
namespace {

std::vector<uint16_t> RandomHalf(size_t n, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> nd(0.f, 2.f);
  std::vector<uint16_t> h(n);
  for (auto& x : h) x = gguf::Fp32ToFp16(nd(rng));
  return h;
}

KVC_PER_TARGET_SUITE(CpuF16);

TEST_P(CpuF16, ConversionMatchesScalar) {
  for (int n : {1, 7, 16, 64, 100}) {
    auto h = RandomHalf(n, n);
    std::vector<float> a(n), b(n);
    F16ToF32(h.data(), n, a.data());
    ref::F16ToF32(h.data(), n, b.data());
    for (int i = 0; i < n; ++i) EXPECT_EQ(a[i], b[i]);
  }
}

TEST_P(CpuF16, DotAndAxpyRowsMatchScalar) {
  std::mt19937 rng(5);
  std::normal_distribution<float> nd;
  // d not a multiple of the vector width (38 = ThinK 40 % of 64, 49 = a ragged low-rank rank) and
  // more than 16 query rows take the vector path with a scalar tail / row chunks.
  for (int d : {64, 48, 38, 49, 17}) {
    for (int n_q : {1, 3, 9, 20}) {
      const int n = 37;
      auto k = RandomHalf(size_t(n) * d, d + n_q);
      std::vector<float> q(size_t(n_q) * d);
      for (auto& x : q) x = nd(rng);
      const int64_t ld = n + 5;
      std::vector<float> a(size_t(n_q) * ld, -1.f), b(a);
      DotF16Rows(q.data(), n_q, k.data(), n, d, a.data(), ld);
      ref::DotF16Rows(q.data(), n_q, k.data(), n, d, b.data(), ld);
      for (int r = 0; r < n_q; ++r) {
        for (int t = 0; t < n; ++t) {  // [sum d] (ops.h)
          double mag = 0;
          for (int c = 0; c < d; ++c) mag += std::fabs(double(q[r * d + c]) * gguf::Fp16ToFp32(k[size_t(t) * d + c]));
          EXPECT_NEAR(a[r * ld + t], b[r * ld + t], test_util::SumBound(d, mag)) << d << " " << n_q;
        }
        EXPECT_EQ(a[r * ld + n], -1.f);  // stride respected: padding untouched
      }
      std::vector<float> oa(size_t(n_q) * d, 0.5f), ob(oa);
      AxpyF16Rows(a.data(), ld, n_q, k.data(), n, d, oa.data());
      ref::AxpyF16Rows(a.data(), ld, n_q, k.data(), n, d, ob.data());
      for (int r = 0; r < n_q; ++r) {  // [sum n + 1] (ops.h)
        for (int c = 0; c < d; ++c) {
          double mag = 0.5;
          for (int t = 0; t < n; ++t) mag += std::fabs(double(a[r * ld + t]) * gguf::Fp16ToFp32(k[size_t(t) * d + c]));
          EXPECT_NEAR(oa[r * d + c], ob[r * d + c], test_util::SumBound(n + 1, mag)) << d << " " << n_q;
        }
      }
    }
  }
}

}  // namespace
}  // namespace kvc::cpu
