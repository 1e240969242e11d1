// Lloyd–Max scalar quantizer solver: the codebook c_1 < ... < c_K minimising E[(X − Q(X))²] for a
// 1-D density on [a, b] (continuous 1-D k-means). Thresholds are midpoints of adjacent centroids;
// each centroid is the conditional mean of its cell (Lloyd 1982; Max 1960).
//
// Numerics: the density is tabulated once on a fine grid (n_grid points, Simpson-free trapezoid
// prefix integrals of f and x·f, linearly interpolated inside a grid cell), so one Lloyd
// iteration costs O(K log n_grid); iterate until the centroids move < tol.
//
// Used by TurboQuant (coordinate density of a uniform point on S^{d−1}, spec-quantization.md
// §5.1), PolarQuant (angle densities, §4) and the tests against the spec's table.
#pragma once

#include <functional>
#include <vector>

namespace kvc::kv {

struct LloydMaxResult {
  std::vector<float> centroids;   // [K] ascending
  std::vector<float> thresholds;  // [K-1] midpoints
  double mse = 0;                 // E[(X − Q(X))²] under the density
  int iterations = 0;
};

// density: unnormalised, non-negative on [a, b] (log-domain not needed for |f| in float range).
LloydMaxResult SolveLloydMax(const std::function<double(double)>& density, double a, double b,
                             int levels, int n_grid = 400001, double tol = 1e-12,
                             int max_iter = 20000);

// f_d(x) ∝ (1 − x²)^((d−3)/2) on [−1, 1]: the coordinate density of a uniform point on S^{d−1}
// (d >= 3). Cached per (d, bits); thread-safe. bits in 1..8.
const LloydMaxResult& SphereCodebook(int d, int bits);

// Index of the nearest centroid (thresholds ascending, size K-1): binary search.
inline int NearestIndex(const float* thresholds, int n_thr, float v) {
  int lo = 0, hi = n_thr;  // answer in [0, n_thr]
  while (lo < hi) {
    const int mid = (lo + hi) >> 1;
    if (v > thresholds[mid]) lo = mid + 1; else hi = mid;
  }
  return lo;
}

// 1-D k-means on samples (weights optional, may be empty): K centroids ascending, initialised at
// quantiles, `iters` Lloyd steps. For KVQuant's calibrated non-uniform codebooks.
std::vector<float> KMeans1D(std::vector<float> samples, int k, int iters = 50);

}  // namespace kvc::kv
