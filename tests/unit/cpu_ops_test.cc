// CPU kernels vs their scalar references (src/cpu/ops.h), once per Highway target this machine
// supports (tests/unit/per_target.h: AVX3_DL / AVX3 / AVX2 / SSE4 / SSSE3 / SCALAR, each pinned
// in turn and named in the test name). No model needed.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <random>
#include <string>
#include <tuple>
#include <vector>

#include "cpu/ops.h"
#include "gguf/types.h"
#include "fp_bounds.h"
#include "per_target.h"

namespace kvc::cpu {
namespace {

using gguf::GgmlType;

struct TypeCase {
  GgmlType type;
  int block_elems;
  size_t block_bytes;
  bool int8_activations;  // MatMul quantizes x to int8 per 32-block for this type
};

const TypeCase kCases[] = {
    {GgmlType::kF32, 1, 4, false},      {GgmlType::kF16, 1, 2, false},
    {GgmlType::kBF16, 1, 2, false},     {GgmlType::kQ4_0, 32, 18, true},
    {GgmlType::kQ4_1, 32, 20, true},    {GgmlType::kQ5_0, 32, 22, true},
    {GgmlType::kQ8_0, 32, 34, true},    {GgmlType::kQ4_K, 256, 144, false},
    {GgmlType::kQ5_K, 256, 176, false}, {GgmlType::kQ6_K, 256, 210, false},
};

// A finite fp16 scale in [2^-8, 2^-6), random mantissa.
uint16_t RandomHalfScale(std::mt19937& rng) {
  return static_cast<uint16_t>((7 << 10) | (rng() & 0x3FF));
}

void PutU16(uint8_t* p, uint16_t v) { std::memcpy(p, &v, 2); }

// Random GGUF bytes for an [n_out, n_in] tensor of `c.type`: random quants, finite scales.
std::vector<uint8_t> RandomTensor(const TypeCase& c, int64_t n_in, int64_t n_out,
                                  std::mt19937& rng) {
  const int64_t n_blocks = n_out * (n_in / c.block_elems);
  std::vector<uint8_t> data(n_blocks * c.block_bytes);
  for (auto& b : data) b = static_cast<uint8_t>(rng());
  std::normal_distribution<float> normal(0.0f, 0.5f);
  for (int64_t i = 0; i < n_blocks; ++i) {
    uint8_t* blk = data.data() + i * c.block_bytes;
    switch (c.type) {
      case GgmlType::kF32: {
        const float v = normal(rng);
        std::memcpy(blk, &v, 4);
        break;
      }
      case GgmlType::kF16:  // sign, exponent 10..17 (2^-5 .. 2^2), random mantissa
        PutU16(blk, static_cast<uint16_t>((rng() & 0x8000) | ((10 + rng() % 8) << 10) |
                                          (rng() & 0x3FF)));
        break;
      case GgmlType::kBF16:  // sign, exponent 122..129, random mantissa
        PutU16(blk,
               static_cast<uint16_t>((rng() & 0x8000) | ((122 + rng() % 8) << 7) | (rng() & 0x7F)));
        break;
      case GgmlType::kQ4_0:
      case GgmlType::kQ5_0:
      case GgmlType::kQ8_0:
        PutU16(blk, RandomHalfScale(rng));
        break;
      case GgmlType::kQ4_1:  // d, then m negative (about -8 d) so rows are centred
        PutU16(blk, RandomHalfScale(rng));
        PutU16(blk + 2, static_cast<uint16_t>(0x8000 | (10 << 10) | (rng() & 0x3FF)));
        break;
      case GgmlType::kQ4_K:
      case GgmlType::kQ5_K:  // d, dmin (6-bit scales multiply these)
        PutU16(blk, static_cast<uint16_t>((3 << 10) | (rng() & 0x3FF)));
        PutU16(blk + 2, static_cast<uint16_t>((2 << 10) | (rng() & 0x3FF)));
        break;
      case GgmlType::kQ6_K:
        PutU16(blk + 208, static_cast<uint16_t>((3 << 10) | (rng() & 0x3FF)));
        break;
      default:
        break;
    }
  }
  return data;
}

// x [n_tokens, n_in] f32: mostly N(0,1), a few outliers, one all-zero 32-block.
std::vector<float> RandomActivations(int64_t n_tokens, int64_t n_in, std::mt19937& rng) {
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<float> x(n_tokens * n_in);
  for (auto& v : x) v = normal(rng);
  for (int64_t t = 0; t < n_tokens; ++t) x[t * n_in + rng() % n_in] *= 20.0f;
  for (int j = 0; j < 32; ++j) x[j] = 0.0f;
  return x;
}

gguf::TensorInfo MakeInfo(const TypeCase& c, int64_t n_in, int64_t n_out,
                          const std::vector<uint8_t>& data) {
  gguf::TensorInfo t;
  t.name = "test.weight";
  t.type_id = static_cast<uint32_t>(c.type);
  t.ne = {n_in, n_out};
  t.n_bytes = data.size();
  t.data = data.data();
  return t;
}

// Checks y [n_tokens, n_out] against ref::MatMul with an error bound derived per output:
//  - int8 activations: each x is replaced by d_x q with |x - d_x q| <= d_x / 2 = amax_b / 254
//    (amax_b = max |x| in its 32-block), so |y - y_ref| <= Σ_j |w_j| amax_b(j) / 254; we allow
//    1% over that for rounding in d_x and the f32 block sums;
//  - always, f32 accumulation: [sum n_in] = (n_in + 2)·2^-24·Σ_j |w_j x_j| (ops.h; any order of
//    the sum, so it also holds on SCALAR, where the sum is n_in deep).
// A kernel that mixes up elements, blocks or rows misses by O(Σ |w x|), far beyond this.
void ExpectMatMulClose(const Weight& w, const float* x, int64_t n_tokens, const float* y,
                       bool int8_activations) {
  const int64_t n_in = w.n_in(), n_out = w.n_out();
  std::vector<float> y_ref(n_tokens * n_out), row(n_in);
  ref::MatMul(w, x, n_tokens, y_ref.data());
  int64_t failures = 0;
  for (int64_t r = 0; r < n_out; ++r) {
    w.DequantizeRow(r, row.data());
    for (int64_t t = 0; t < n_tokens; ++t) {
      const float* xt = x + t * n_in;
      double abs_sum = 0.0, quant_bound = 0.0;
      for (int64_t b = 0; b < n_in; b += 32) {
        double amax = 0.0, wsum = 0.0;
        for (int64_t j = b; j < b + 32 && j < n_in; ++j) {
          amax = std::max(amax, std::fabs(static_cast<double>(xt[j])));
          wsum += std::fabs(row[j]);
          abs_sum += std::fabs(static_cast<double>(row[j]) * xt[j]);
        }
        quant_bound += wsum * amax / 254.0;
      }
      const double tol = test_util::SumBound(n_in, abs_sum) + (int8_activations ? 1.01 * quant_bound : 0.0) + 1e-30;
      const double err = std::fabs(static_cast<double>(y[t * n_out + r]) - y_ref[t * n_out + r]);
      if (!(err <= tol) && failures++ < 5) {
        ADD_FAILURE() << "row " << r << " token " << t << ": y " << y[t * n_out + r] << " ref "
                      << y_ref[t * n_out + r] << " err " << err << " tol " << tol;
      }
    }
  }
  EXPECT_EQ(failures, 0);
}

// (target, weight type): the target pinned as in test_util::PerTarget.
class MatMulTest : public ::testing::TestWithParam<std::tuple<int64_t, TypeCase>> {
 protected:
  void SetUp() override {
    hwy::SetSupportedTargetsForTest(std::get<0>(GetParam()));
    for (const auto& f : KernelTargets()) ASSERT_EQ(f.dispatched, std::get<0>(GetParam())) << f.file;
  }
  void TearDown() override { hwy::SetSupportedTargetsForTest(0); }
};

TEST_P(MatMulTest, MatchesReference) {
  const TypeCase c = std::get<1>(GetParam());
  SetNumThreads(1);  // fast on shared CI cores; threading has its own test below
  std::mt19937 rng(1234 + static_cast<int>(c.type));
  // 40 rows: two full 16-row groups and a padded one. Legacy types also try n_in = 96.
  for (int64_t n_in : {int64_t{512}, int64_t{96}}) {
    if (n_in % c.block_elems != 0) continue;
    const int64_t n_out = 40;
    const std::vector<uint8_t> data = RandomTensor(c, n_in, n_out, rng);
    auto w = PrepareWeight(MakeInfo(c, n_in, n_out, data));
    ASSERT_TRUE(w.ok()) << w.status().ToString();
    EXPECT_EQ((*w)->n_in(), n_in);
    EXPECT_EQ((*w)->n_out(), n_out);
    EXPECT_EQ((*w)->type(), c.type);
    for (int64_t n_tokens : {1, 3, 4, 7, 64}) {
      SCOPED_TRACE("n_in " + std::to_string(n_in) + " n_tokens " + std::to_string(n_tokens));
      const std::vector<float> x = RandomActivations(n_tokens, n_in, rng);
      std::vector<float> y(n_tokens * n_out, NAN);
      MatMul(**w, x.data(), n_tokens, y.data());
      ExpectMatMulClose(**w, x.data(), n_tokens, y.data(), c.int8_activations);
    }
  }
  SetNumThreads(0);
}

std::string CaseName(const ::testing::TestParamInfo<std::tuple<int64_t, TypeCase>>& info) {
  static const char* kNames[] = {"F32",  "F16",  "BF16", "Q4_0", "Q4_1",
                                 "Q5_0", "Q8_0", "Q4_K", "Q5_K", "Q6_K"};
  return std::string(hwy::TargetName(std::get<0>(info.param))) + "_" +
         kNames[info.index % (sizeof(kNames) / sizeof(kNames[0]))];
}

INSTANTIATE_TEST_SUITE_P(Hwy, MatMulTest,
                         ::testing::Combine(::testing::ValuesIn(RunnableTargets()),
                                            ::testing::ValuesIn(kCases)),
                         CaseName);

KVC_PER_TARGET_SUITE(MatMulThreads);

TEST_P(MatMulThreads, CountDoesNotChangeResults) {
  std::mt19937 rng(7);
  const TypeCase c = kCases[4];  // Q4_1
  const int64_t n_in = 256, n_out = 96, n_tokens = 9;
  const std::vector<uint8_t> data = RandomTensor(c, n_in, n_out, rng);
  auto w = PrepareWeight(MakeInfo(c, n_in, n_out, data));
  ASSERT_TRUE(w.ok());
  const std::vector<float> x = RandomActivations(n_tokens, n_in, rng);
  std::vector<float> y1(n_tokens * n_out), y2(n_tokens * n_out);
  SetNumThreads(1);
  MatMul(**w, x.data(), n_tokens, y1.data());
  SetNumThreads(2);
  EXPECT_EQ(NumThreads(), 2);
  MatMul(**w, x.data(), n_tokens, y2.data());
  SetNumThreads(0);
  EXPECT_EQ(y1, y2);  // rows are split across threads, never a row's sum
}

TEST(PrepareWeight, RepackedBytesMatchGgufSize) {
  std::mt19937 rng(3);
  for (const TypeCase& c : {kCases[4], kCases[6]}) {  // Q4_1: 20 B, Q8_0: 34 B per 32 values
    const std::vector<uint8_t> data = RandomTensor(c, 64, 32, rng);
    auto w = PrepareWeight(MakeInfo(c, 64, 32, data));
    ASSERT_TRUE(w.ok());
    EXPECT_EQ((*w)->bytes(), data.size());
  }
}

// Per-row scales folded into a private copy of the weight (load-time key smoothing): every
// dequantized element of row r is s_r times the original within the stated rounding — F32 one f32
// rounding; F16 one fp16 rounding; Q4_0 / Q4_1 / Q5_0 / Q8_0 one fp16 rounding of each block's
// scale (and Q4_1's min): |w' − s·w| <= 2^-11·(|s·d·q| + |s·m|) + 2^-24·|s·w| per element. The
// MatMul through the folded weight equals the scaled MatMul within the same relative bound plus the
// kernel's own contract; other types are refused by name; the mapping is never written.
TEST(PrepareWeight, ScaledRowsAreTheScaledWeight) {
  std::mt19937 rng(11);
  for (const TypeCase& c : kCases) {
    SCOPED_TRACE(std::to_string(int(c.type)));
    const int64_t n_in = 256, n_out = 20;
    const std::vector<uint8_t> data = RandomTensor(c, n_in, n_out, rng);
    const std::vector<uint8_t> before = data;
    std::vector<float> sc(n_out);
    for (int64_t r = 0; r < n_out; ++r) sc[r] = std::exp2(float(int(r % 7) - 3) + 0.37f * float(r % 3));
    auto info = MakeInfo(c, n_in, n_out, data);
    auto w = PrepareWeightScaledRows(info, sc);
    const bool supported = c.type == GgmlType::kF32 || c.type == GgmlType::kF16 ||
                           c.type == GgmlType::kQ4_0 || c.type == GgmlType::kQ4_1 ||
                           c.type == GgmlType::kQ5_0 || c.type == GgmlType::kQ8_0;
    if (!supported) {
      ASSERT_FALSE(w.ok());
      EXPECT_EQ(w.status().code(), StatusCode::kUnimplemented);
      continue;
    }
    ASSERT_TRUE(w.ok()) << w.status().ToString();
    EXPECT_EQ(data, before);  // the source bytes are not modified
    auto plain = PrepareWeight(info);
    ASSERT_TRUE(plain.ok());
    std::vector<float> a(n_in), b(n_in);
    double worst = 0;
    for (int64_t r = 0; r < n_out; ++r) {
      (*plain)->DequantizeRow(r, a.data());
      (*w)->DequantizeRow(r, b.data());
      for (int64_t j = 0; j < n_in; ++j) {
        double bound = std::ldexp(1.0, -24) * std::fabs(double(sc[r]) * a[j]);
        if (c.type == GgmlType::kF16) bound = std::ldexp(1.0, -11) * std::fabs(double(sc[r]) * a[j]) + 1e-30;
        if (c.block_elems == 32) {
          const uint8_t* blk = data.data() + (size_t(r) * (n_in / 32) + j / 32) * c.block_bytes;
          uint16_t dh, mh = 0;
          std::memcpy(&dh, blk, 2);
          if (c.type == GgmlType::kQ4_1) std::memcpy(&mh, blk + 2, 2);
          const double d = gguf::Fp16ToFp32(dh), m = gguf::Fp16ToFp32(mh);
          const double q = d != 0 ? std::fabs((a[j] - m) / d) : 0;  // |code| (after the offset)
          bound += (std::ldexp(1.0, -11) + std::ldexp(1.0, -22)) * (std::fabs(sc[r] * d) * q + std::fabs(sc[r] * m));
        }
        const double err = std::fabs(double(b[j]) - double(sc[r]) * a[j]);
        ASSERT_LE(err, bound) << "row " << r << " j " << j << " w " << a[j] << " s " << sc[r];
        worst = std::max(worst, err / (std::fabs(double(sc[r]) * a[j]) + 1e-30));
      }
    }
    EXPECT_GT(worst, 0.0);  // the scales do round (so the bound above is exercised) ...
    if (c.type != GgmlType::kF32) EXPECT_LT(worst, 0.1);
    // ... and MatMul goes through the folded bytes: y' ≈ s ∘ y.
    const int64_t n_tokens = 3;
    const std::vector<float> x = RandomActivations(n_tokens, n_in, rng);
    std::vector<float> y(n_tokens * n_out), y2(n_tokens * n_out);
    MatMul(**plain, x.data(), n_tokens, y.data());
    MatMul(**w, x.data(), n_tokens, y2.data());
    double num = 0, den = 0;
    for (int64_t t = 0; t < n_tokens; ++t) {
      for (int64_t r = 0; r < n_out; ++r) {
        const double want = double(sc[r]) * y[t * n_out + r];
        num += (y2[t * n_out + r] - want) * (y2[t * n_out + r] - want);
        den += want * want;
      }
    }
    EXPECT_LT(std::sqrt(num / den), 2e-2);
  }
  // Bad scales.
  const TypeCase c = kCases[4];
  const std::vector<uint8_t> data = RandomTensor(c, 64, 4, rng);
  auto info = MakeInfo(c, 64, 4, data);
  EXPECT_FALSE(PrepareWeightScaledRows(info, {1.f, 1.f, 1.f}).ok());             // count
  EXPECT_FALSE(PrepareWeightScaledRows(info, {1.f, NAN, 1.f, 1.f}).ok());        // NaN
  EXPECT_FALSE(PrepareWeightScaledRows(info, {1.f, -2.f, 1.f, 1.f}).ok());       // negative
  EXPECT_FALSE(PrepareWeightScaledRows(info, {1.f, 1e30f, 1.f, 1.f}).ok());      // fp16 overflow
}

TEST(PrepareWeight, UnsupportedTypeIsUnimplementedAndNamesTensor) {
  std::vector<uint8_t> data(84 * 4);
  gguf::TensorInfo t;
  t.name = "blk.0.ffn_up.weight";
  t.type_id = static_cast<uint32_t>(GgmlType::kQ2_K);
  t.ne = {256, 4};
  t.data = data.data();
  auto w = PrepareWeight(t);
  ASSERT_FALSE(w.ok());
  EXPECT_EQ(w.status().code(), StatusCode::kUnimplemented);
  EXPECT_NE(w.status().message().find("blk.0.ffn_up.weight"), std::string::npos);
  EXPECT_NE(w.status().message().find("10"), std::string::npos);  // the type id
}

TEST(PrepareWeight, RowLengthNotMultipleOfBlockIsInvalid) {
  std::vector<uint8_t> data(1000);
  gguf::TensorInfo t;
  t.name = "bad";
  t.type_id = static_cast<uint32_t>(GgmlType::kQ4_1);
  t.ne = {48, 2};
  t.data = data.data();
  auto w = PrepareWeight(t);
  ASSERT_FALSE(w.ok());
  EXPECT_EQ(w.status().code(), StatusCode::kInvalidArgument);
}

std::vector<float> RandomVector(int64_t n, float scale, std::mt19937& rng) {
  std::normal_distribution<float> normal(0.0f, scale);
  std::vector<float> v(n);
  for (auto& x : v) x = normal(rng);
  return v;
}

const int64_t kSizes[] = {1, 7, 16, 33, 576, 1000};

KVC_PER_TARGET_SUITE(Ops);

// f32 elementwise ops, each against the contract stated in cpu/ops.h.
TEST_P(Ops, MatchReferences) {
  std::mt19937 rng(11);
  for (int64_t n : kSizes) {
    SCOPED_TRACE("n " + std::to_string(n));
    const std::vector<float> a = RandomVector(n, 1.0f, rng), b = RandomVector(n, 3.0f, rng);
    {
      // Dot: [sum n] vs the f64 reference (ops.h).
      double abs_sum = 0.0;
      for (int64_t i = 0; i < n; ++i) abs_sum += std::fabs(a[i] * b[i]);
      EXPECT_NEAR(Dot(a.data(), b.data(), n), ref::Dot(a.data(), b.data(), n), test_util::SumBound(n, abs_sum));

      std::vector<float> y1 = b, y2 = b;
      Axpy(0.37f, a.data(), n, y1.data());
      ref::Axpy(0.37f, a.data(), n, y2.data());
      for (int64_t i = 0; i < n; ++i) {  // [fma]
        EXPECT_NEAR(y1[i], y2[i], test_util::FmaBound(std::fabs(0.37 * a[i]), std::fabs(y2[i]))) << i;
      }

      std::vector<float> o1(n), o2(n);
      SwiGlu(b.data(), a.data(), n, o1.data());
      ref::SwiGlu(b.data(), a.data(), n, o2.data());
      for (int64_t i = 0; i < n; ++i) {
        EXPECT_NEAR(o1[i], o2[i], 4e-6f * std::fabs(b[i] * a[i]) + 1e-30f) << i;
      }

      std::vector<float> s1 = b, s2 = b;
      Softmax(s1.data(), n);
      ref::Softmax(s2.data(), n);
      for (int64_t i = 0; i < n; ++i) EXPECT_NEAR(s1[i], s2[i], 4e-6f * s2[i] + 1e-9f) << i;
    }
  }
}

TEST_P(Ops, RmsNormMatchesReference) {
  std::mt19937 rng(12);
  for (int64_t n : kSizes) {
    const int64_t n_rows = 3;
    const std::vector<float> x = RandomVector(n_rows * n, 2.0f, rng),
                             w = RandomVector(n, 1.0f, rng);
    {
      std::vector<float> y1(n_rows * n), y2(n_rows * n);
      RmsNorm(x.data(), w.data(), n_rows, n, 1e-5f, y1.data());
      ref::RmsNorm(x.data(), w.data(), n_rows, n, 1e-5f, y2.data());
      for (int64_t i = 0; i < n_rows * n; ++i) {
        EXPECT_NEAR(y1[i], y2[i], (double(n + 2) / 2 + 4) * test_util::kU * std::fabs(y2[i]))
            << "n " << n << " i " << i;
      }
    }
  }
}

TEST_P(Ops, SoftmaxSumsToOneWithLargeInputs) {
  std::vector<float> x = {1000.0f, 999.0f, -1000.0f, 0.0f, 1000.0f};
  Softmax(x.data(), static_cast<int64_t>(x.size()));
  float sum = 0.0f;
  for (float v : x) {
    EXPECT_TRUE(std::isfinite(v));
    sum += v;
  }
  EXPECT_NEAR(sum, 1.0f, 1e-6f);
  EXPECT_NEAR(x[0], x[4], 1e-7f);
}

}  // namespace
}  // namespace kvc::cpu
