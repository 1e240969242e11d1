#include "kv/codecs/lloyd_max.h"

#include <algorithm>
#include <cmath>
#include <map>
#include <mutex>
#include <utility>

#include "util/check.h"

namespace kvc::kv {
namespace {

// Prefix integrals of f and x·f on a uniform grid, normalised so that F(b) = 1.
struct Tab {
  double a, h;
  int n;
  std::vector<double> F, G;  // [n]
  double Interp(const std::vector<double>& v, double t) const {
    double u = (t - a) / h;
    if (u <= 0) return v.front();
    if (u >= n - 1) return v.back();
    const int i = int(u);
    const double fr = u - i;
    return v[i] + fr * (v[i + 1] - v[i]);
  }
};

}  // namespace

LloydMaxResult SolveLloydMax(const std::function<double(double)>& density, double a, double b,
                             int levels, int n_grid, double tol, int max_iter) {
  KVC_CHECK(levels >= 1 && b > a && n_grid >= 3);
  Tab t;
  t.a = a;
  t.n = n_grid;
  t.h = (b - a) / (n_grid - 1);
  t.F.assign(n_grid, 0.0);
  t.G.assign(n_grid, 0.0);
  double ex2 = 0;  // ∫ x² f (unnormalised)
  double fp = density(a), xp = a;
  for (int i = 1; i < n_grid; ++i) {
    const double x = a + i * t.h, f = density(x);
    t.F[i] = t.F[i - 1] + 0.5 * t.h * (fp + f);
    t.G[i] = t.G[i - 1] + 0.5 * t.h * (xp * fp + x * f);
    ex2 += 0.5 * t.h * (xp * xp * fp + x * x * f);
    fp = f;
    xp = x;
  }
  const double z = t.F.back();
  KVC_CHECK(z > 0);
  for (int i = 0; i < n_grid; ++i) {
    t.F[i] /= z;
    t.G[i] /= z;
  }
  ex2 /= z;
  // Init: centroids at the quantiles (k + 1/2) / K.
  std::vector<double> c(levels);
  for (int k = 0; k < levels; ++k) {
    const double target = (k + 0.5) / levels;
    const int i = int(std::lower_bound(t.F.begin(), t.F.end(), target) - t.F.begin());
    c[k] = a + std::min(i, n_grid - 1) * t.h;
  }
  LloydMaxResult r;
  std::vector<double> w(levels);
  for (r.iterations = 0; r.iterations < max_iter; ++r.iterations) {
    double moved = 0;
    double lo = a, Flo = 0, Glo = 0;
    for (int k = 0; k < levels; ++k) {
      const double hi = k + 1 < levels ? 0.5 * (c[k] + c[k + 1]) : b;
      const double Fhi = k + 1 < levels ? t.Interp(t.F, hi) : 1.0;
      const double Ghi = k + 1 < levels ? t.Interp(t.G, hi) : t.G.back();
      const double wk = Fhi - Flo;
      const double nc = wk > 1e-300 ? (Ghi - Glo) / wk : 0.5 * (lo + hi);
      w[k] = wk;
      moved = std::max(moved, std::fabs(nc - c[k]));
      c[k] = nc;
      lo = hi;
      Flo = Fhi;
      Glo = Ghi;
    }
    if (moved < tol) break;
  }
  double sum = 0;
  for (int k = 0; k < levels; ++k) sum += c[k] * c[k] * w[k];
  r.mse = ex2 - sum;
  r.centroids.assign(c.begin(), c.end());
  for (int k = 0; k + 1 < levels; ++k) r.thresholds.push_back(float(0.5 * (c[k] + c[k + 1])));
  return r;
}

const LloydMaxResult& SphereCodebook(int d, int bits) {
  KVC_CHECK(d >= 3 && bits >= 1 && bits <= 8);
  static std::mutex mu;
  static std::map<std::pair<int, int>, LloydMaxResult> cache;
  std::lock_guard<std::mutex> lock(mu);
  auto it = cache.find({d, bits});
  if (it != cache.end()) return it->second;
  const double e = 0.5 * (d - 3);
  auto f = [e](double x) {
    const double u = 1.0 - x * x;
    return u <= 0 ? 0.0 : std::exp(e * std::log(u));
  };
  // The density is negligible beyond ~12 standard deviations (σ = 1/√d): solve on that support
  // (finer grid where the mass is); fall back to [−1, 1] for small d.
  const double lim = std::min(1.0, 12.0 / std::sqrt(double(d)));
  auto res = SolveLloydMax(f, -lim, lim, 1 << bits);
  return cache.emplace(std::make_pair(d, bits), std::move(res)).first->second;
}

std::vector<float> KMeans1D(std::vector<float> s, int k, int iters) {
  KVC_CHECK(k >= 1);
  std::vector<float> c(k, 0.f);
  if (s.empty()) return c;
  std::sort(s.begin(), s.end());
  const size_t n = s.size();
  std::vector<double> pre(n + 1, 0.0);
  for (size_t i = 0; i < n; ++i) pre[i + 1] = pre[i] + s[i];
  for (int j = 0; j < k; ++j) c[j] = s[std::min(n - 1, size_t((j + 0.5) / k * n))];
  for (int it = 0; it < iters; ++it) {
    // Cells are contiguous ranges of the sorted samples between threshold midpoints.
    size_t start = 0;
    bool changed = false;
    for (int j = 0; j < k; ++j) {
      size_t end = n;
      if (j + 1 < k) {
        const float thr = 0.5f * (c[j] + c[j + 1]);
        end = size_t(std::upper_bound(s.begin() + start, s.end(), thr) - s.begin());
      }
      if (end > start) {
        const float nc = float((pre[end] - pre[start]) / double(end - start));
        changed = changed || nc != c[j];
        c[j] = nc;
      }
      start = end;
    }
    std::sort(c.begin(), c.end());
    if (!changed) break;
  }
  return c;
}

}  // namespace kvc::kv
