#include "kv/rope.h"

#include <algorithm>
#include <cmath>

namespace kvc::kv {

Rope::Rope(const RopeParams& p, int table_positions) : p_(p) {
  const int half = p_.n_rot / 2;
  inv_freq_.resize(half);
  for (int i = 0; i < half; ++i) inv_freq_[i] = std::pow(p_.theta, -2.0 * i / p_.n_rot);
  table_positions_ = std::max(0, table_positions);
  table_.resize(size_t(table_positions_) * half * 2);
  for (int64_t pos = 0; pos < table_positions_; ++pos) {
    const double pp = double(pos) * p_.freq_scale;
    float* t = table_.data() + size_t(pos) * half * 2;
    for (int i = 0; i < half; ++i) {
      const double a = pp * inv_freq_[i];
      t[2 * i] = float(std::cos(a));
      t[2 * i + 1] = float(std::sin(a));
    }
  }
}

void Rope::RotateRow(float* x, int64_t pos) const {
  const int half = p_.n_rot / 2;
  float* r = x + p_.rot_offset;
  if (pos >= 0 && pos < table_positions_) {
    const float* t = table_.data() + size_t(pos) * half * 2;
    for (int i = 0; i < half; ++i) {
      const float c = t[2 * i], s = t[2 * i + 1];
      const int i0 = p_.neox ? i : 2 * i;
      const int i1 = p_.neox ? i + half : 2 * i + 1;
      const float x0 = r[i0], x1 = r[i1];
      r[i0] = x0 * c - x1 * s;
      r[i1] = x0 * s + x1 * c;
    }
    return;
  }
  const double p = double(pos) * p_.freq_scale;
  for (int i = 0; i < half; ++i) {
    const double a = p * inv_freq_[i];
    const float c = float(std::cos(a)), s = float(std::sin(a));
    const int i0 = p_.neox ? i : 2 * i;
    const int i1 = p_.neox ? i + half : 2 * i + 1;
    const float x0 = r[i0], x1 = r[i1];
    r[i0] = x0 * c - x1 * s;
    r[i1] = x0 * s + x1 * c;
  }
}

void Rope::Apply(float* x, int n, int dim, const int64_t* pos) const {
  for (int r = 0; r < n; ++r) RotateRow(x + int64_t(r) * dim, pos[r]);
}

void Rope::ApplySame(float* x, int n, int dim, int64_t pos) const {
  for (int r = 0; r < n; ++r) RotateRow(x + int64_t(r) * dim, pos);
}

}  // namespace kvc::kv
