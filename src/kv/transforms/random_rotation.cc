#include "kv/transforms/random_rotation.h"

#include <Eigen/Dense>
#include <cmath>

#include "util/check.h"

namespace kvc::kv {

uint64_t GaussianRng::NextU64() {
  uint64_t z = (s_ += 0x9E3779B97F4A7C15ull);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

double GaussianRng::Uniform() { return (double(NextU64() >> 11) + 0.5) * (1.0 / 9007199254740992.0); }

double GaussianRng::Normal() {
  if (have_) {
    have_ = false;
    return spare_;
  }
  const double u1 = Uniform(), u2 = Uniform();
  const double r = std::sqrt(-2.0 * std::log(u1)), th = 2.0 * M_PI * u2;
  spare_ = r * std::sin(th);
  have_ = true;
  return r * std::cos(th);
}

std::vector<float> RandomOrthogonalRows(int rows, int d, uint64_t seed) {
  KVC_CHECK(rows > 0 && d > 0);
  GaussianRng rng(seed);
  std::vector<float> out(size_t(rows) * d);
  for (int r0 = 0; r0 < rows; r0 += d) {
    Eigen::MatrixXd g(d, d);
    for (int i = 0; i < d; ++i)
      for (int j = 0; j < d; ++j) g(i, j) = rng.Normal();
    Eigen::HouseholderQR<Eigen::MatrixXd> qr(g);
    Eigen::MatrixXd q = qr.householderQ();
    const Eigen::MatrixXd rr = qr.matrixQR().triangularView<Eigen::Upper>();
    for (int j = 0; j < d; ++j) {
      if (rr(j, j) < 0) q.col(j) = -q.col(j);  // Haar: Q · diag(sign(R_jj))
    }
    // Rows of Qᵀ (= columns of Q) are orthonormal.
    for (int i = 0; i < d && r0 + i < rows; ++i)
      for (int j = 0; j < d; ++j) out[size_t(r0 + i) * d + j] = float(q(j, i));
  }
  return out;
}

void RandomRotation::Apply(const float* x, float* y) const {
  for (int i = 0; i < d_; ++i) {
    const float* row = &m_[size_t(i) * d_];
    float s = 0.f;
    for (int j = 0; j < d_; ++j) s += row[j] * x[j];
    y[i] = s;
  }
}

void RandomRotation::ApplyT(const float* y, float* x) const {
  for (int j = 0; j < d_; ++j) x[j] = 0.f;
  for (int i = 0; i < d_; ++i) {
    const float* row = &m_[size_t(i) * d_];
    const float yi = y[i];
    for (int j = 0; j < d_; ++j) x[j] += yi * row[j];
  }
}

}  // namespace kvc::kv
