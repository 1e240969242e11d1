// Seeded random orthogonal matrices shared by the rotation-based codecs (TurboQuant, PolarQuant,
// QJL sketches). Haar-distributed: QR of an i.i.d. N(0,1) matrix with the signs of R's diagonal
// folded into Q (Mezzadri 2007), so every row is marginally uniform on S^{d−1} — the property the
// TurboQuant codebooks (§5.1) and the exact QJL constant (§3) rely on. Dense d×d: O(d²) per
// vector (4,096 FMAs at d = 64), negligible next to the model's matmuls at these head dims.
// Deterministic across platforms: own splitmix64 + Box–Muller, no <random> distributions.
#pragma once

#include <cstdint>
#include <vector>

namespace kvc::kv {

// Gaussian stream from a 64-bit seed (splitmix64 + Box–Muller). Deterministic everywhere.
class GaussianRng {
 public:
  explicit GaussianRng(uint64_t seed) : s_(seed) {}
  uint64_t NextU64();
  double Uniform();  // (0, 1)
  double Normal();
 private:
  uint64_t s_;
  bool have_ = false;
  double spare_ = 0;
};

// [rows, d] f32 row-major with orthonormal rows in chunks of d rows (rows > d: independent
// orthogonal blocks stacked, QJL §4.1). Each row is uniform on S^{d−1}.
std::vector<float> RandomOrthogonalRows(int rows, int d, uint64_t seed);

class RandomRotation {
 public:
  RandomRotation() = default;
  RandomRotation(int d, uint64_t seed) : d_(d), m_(RandomOrthogonalRows(d, d, seed)) {}
  int dim() const { return d_; }
  // y [d] = Π x [d].
  void Apply(const float* x, float* y) const;
  // x [d] = Πᵀ y [d].
  void ApplyT(const float* y, float* x) const;
  const float* matrix() const { return m_.data(); }  // [d, d] row-major Π
 private:
  int d_ = 0;
  std::vector<float> m_;  // [d, d]
};

}  // namespace kvc::kv
