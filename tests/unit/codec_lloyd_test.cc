// Lloyd–Max codebooks against the spec's table (spec-quantization.md §5.1, our own numerical
// solution, independently recomputed here), plus the 1-D k-means used by KVQuant calibration.
#include <gtest/gtest.h>

#include <cmath>
#include <random>

#include "kv/codecs/lloyd_max.h"

namespace kvc::kv {
namespace {

// Positive half of the table, multiplied by √d.
void ExpectPositiveHalf(int d, int bits, std::vector<double> want, double tol) {
  const auto& r = SphereCodebook(d, bits);
  const int k = 1 << bits;
  ASSERT_EQ(int(r.centroids.size()), k);
  for (size_t i = 0; i < want.size(); ++i) {
    EXPECT_NEAR(r.centroids[k / 2 + i] * std::sqrt(double(d)), want[i], tol)
        << "d=" << d << " b=" << bits << " i=" << i;
    // Symmetric codebook.
    EXPECT_NEAR(r.centroids[k / 2 + i], -r.centroids[k / 2 - 1 - i], 1e-6);
  }
}

TEST(LloydMax, SphereTableD64) {
  ExpectPositiveHalf(64, 1, {0.8010}, 2e-4);
  ExpectPositiveHalf(64, 2, {0.4521, 1.5000}, 2e-4);
  ExpectPositiveHalf(64, 3, {0.2438, 0.7507, 1.3293, 2.1113}, 2e-4);
  ExpectPositiveHalf(64, 4, {0.1274, 0.3847, 0.6505, 0.9319, 1.2394, 1.5909, 2.0233, 2.6464}, 3e-4);
}

TEST(LloydMax, SphereTableD128) {
  ExpectPositiveHalf(128, 1, {0.7994}, 2e-4);
  ExpectPositiveHalf(128, 2, {0.4525, 1.5052}, 2e-4);
  ExpectPositiveHalf(128, 3, {0.2444, 0.7533, 1.3366, 2.1315}, 2e-4);
}

TEST(LloydMax, GaussianLimit) {
  // Large d: f_d → N(0, 1/d); b=1 centroid → sqrt(2/π) = 0.7979, b=2 → 0.4528, 1.5104.
  ExpectPositiveHalf(8192, 1, {0.7979}, 3e-4);
  ExpectPositiveHalf(8192, 2, {0.4528, 1.5104}, 5e-4);
}

TEST(LloydMax, DistortionTable) {
  const double want64[4] = {0.3584, 0.1145, 0.0334, 0.0091};
  const double want128[4] = {0.3609, 0.1160, 0.0340, 0.0093};
  for (int b = 1; b <= 4; ++b) {
    EXPECT_NEAR(64 * SphereCodebook(64, b).mse, want64[b - 1], 2e-4) << b;
    EXPECT_NEAR(128 * SphereCodebook(128, b).mse, want128[b - 1], 2e-4) << b;
  }
}

TEST(LloydMax, DistortionMatchesMonteCarlo) {
  // Independent check of the solver: quantize coordinates of uniform points on S^{63}.
  const int d = 64, b = 2;
  const auto& cb = SphereCodebook(d, b);
  std::mt19937 rng(7);
  std::normal_distribution<double> nd;
  double err = 0;
  const int n = 20000;
  for (int t = 0; t < n; ++t) {
    std::vector<double> x(d);
    double nn = 0;
    for (auto& v : x) { v = nd(rng); nn += v * v; }
    for (auto& v : x) {
      v /= std::sqrt(nn);
      const int i = NearestIndex(cb.thresholds.data(), int(cb.thresholds.size()), float(v));
      err += (v - cb.centroids[i]) * (v - cb.centroids[i]);
    }
  }
  EXPECT_NEAR(err / n, d * cb.mse, 0.004);
}

TEST(LloydMax, UniformDensityGivesUniformCells) {
  const auto r = SolveLloydMax([](double) { return 1.0; }, 0.0, 1.0, 4, 10001);
  for (int k = 0; k < 4; ++k) EXPECT_NEAR(r.centroids[k], (k + 0.5) / 4, 1e-6);
  EXPECT_NEAR(r.mse, 1.0 / (12 * 16), 1e-6);
}

TEST(KMeans1D, FindsClusters) {
  std::mt19937 rng(3);
  std::normal_distribution<float> a(-2.f, 0.1f), b(3.f, 0.1f);
  std::vector<float> s;
  for (int i = 0; i < 500; ++i) { s.push_back(a(rng)); s.push_back(b(rng)); }
  const auto c = KMeans1D(s, 2);
  EXPECT_NEAR(c[0], -2.f, 0.05f);
  EXPECT_NEAR(c[1], 3.f, 0.05f);
}

}  // namespace
}  // namespace kvc::kv
