#include "kv/rope.h"

#include <map>
#include <mutex>
#include <tuple>

#include <algorithm>
#include <cmath>

#include "cpu/kv_kernels.h"

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
  lane_offs_.resize(size_t(p_.n_rot) * kLaneBlock);
  for (int i = 0; i < half; ++i) {
    for (int t = 0; t < kLaneBlock; ++t) {
      const double a = double(t) * p_.freq_scale * inv_freq_[i];
      lane_offs_[size_t(i) * kLaneBlock + t] = float(std::cos(a));
      lane_offs_[size_t(half + i) * kLaneBlock + t] = float(std::sin(a));
    }
  }
}

const float* Rope::LaneTrig(const int64_t* pos, int64_t n, std::vector<float>* scratch) const {
  const int half = p_.n_rot / 2;
  scratch->resize(size_t(p_.n_rot) * n);
  float* o = scratch->data();
  for (int64_t t = 0; t < n; ++t) {
    const bool in = pos[t] >= 0 && pos[t] < table_positions_;
    const double pp = double(pos[t]) * p_.freq_scale;
    for (int i = 0; i < half; ++i) {
      float c, s;
      if (in) {
        c = table_[(size_t(pos[t]) * half + i) * 2];
        s = table_[(size_t(pos[t]) * half + i) * 2 + 1];
      } else {
        const double a = pp * inv_freq_[i];
        c = float(std::cos(a));
        s = float(std::sin(a));
      }
      o[size_t(i) * n + t] = c;
      o[size_t(half + i) * n + t] = s;
    }
  }
  return o;
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
  int r = 0;
  while (r < n) {
    if (p_.neox || pos[r] < 0 || pos[r] >= table_positions_) {
      RotateRow(x + int64_t(r) * dim, pos[r]);
      ++r;
      continue;
    }
    int e = r + 1;  // run of rows inside the table: one SIMD call (same results as RotateRow)
    while (e < n && pos[e] >= 0 && pos[e] < table_positions_) ++e;
    cpu::RotatePairsRows(x + int64_t(r) * dim + p_.rot_offset, e - r, dim, p_.n_rot, table_.data(),
                         pos + r);
    r = e;
  }
}

void Rope::ApplySame(float* x, int n, int dim, int64_t pos) const {
  for (int r = 0; r < n; ++r) RotateRow(x + int64_t(r) * dim, pos);
}

void Rope::AddDotRotated(const float* q, int n_q, int dim, const float* mu, const int64_t* pos,
                         int64_t n, float* s, int64_t ld) const {
  if (n <= 0 || n_q <= 0) return;
  const int half = p_.n_rot / 2;
  std::vector<float> w(size_t(n_q) * p_.n_rot), base(n_q, 0.f);
  for (int r = 0; r < n_q; ++r) {
    const float* qr = q + size_t(r) * dim;
    float b = 0.f;  // unrotated dims: plain q·μ
    for (int d = 0; d < dim; ++d) {
      if (d < p_.rot_offset || d >= p_.rot_offset + p_.n_rot) b += qr[d] * mu[d];
    }
    base[r] = b;
    const float* qo = qr + p_.rot_offset;
    const float* mo = mu + p_.rot_offset;
    for (int i = 0; i < half; ++i) {
      const int i0 = p_.neox ? i : 2 * i;
      const int i1 = p_.neox ? i + half : 2 * i + 1;
      w[size_t(r) * p_.n_rot + 2 * i] = qo[i0] * mo[i0] + qo[i1] * mo[i1];
      w[size_t(r) * p_.n_rot + 2 * i + 1] = qo[i1] * mo[i0] - qo[i0] * mo[i1];
    }
  }
  std::vector<float> tmp;
  int64_t j = 0;
  while (j < n) {
    if (pos[j] >= 0 && pos[j] < table_positions_) {
      int64_t e = j + 1;  // run of consecutive positions inside the table
      while (e < n && pos[e] == pos[e - 1] + 1 && pos[e] < table_positions_) ++e;
      tmp.resize(size_t(n_q) * (e - j));
      cpu::DotF32Rows(w.data(), n_q, table_.data() + size_t(pos[j]) * p_.n_rot, e - j, p_.n_rot,
                      tmp.data(), e - j);
      for (int r = 0; r < n_q; ++r) {
        for (int64_t t = j; t < e; ++t) s[r * ld + t] += base[r] + tmp[size_t(r) * (e - j) + t - j];
      }
      j = e;
      continue;
    }
    const double pp = double(pos[j]) * p_.freq_scale;
    for (int r = 0; r < n_q; ++r) {
      const float* wr = w.data() + size_t(r) * p_.n_rot;
      float acc = base[r];
      for (int i = 0; i < half; ++i) {
        const double a = pp * inv_freq_[i];
        acc += wr[2 * i] * float(std::cos(a)) + wr[2 * i + 1] * float(std::sin(a));
      }
      s[r * ld + j] += acc;
    }
    ++j;
  }
}

std::shared_ptr<const Rope> SharedRope(const RopeParams& p, int table_positions) {
  static std::mutex mu;
  static std::map<std::tuple<double, int, int, bool, double, int>, std::shared_ptr<const Rope>> ropes;
  const auto key = std::make_tuple(p.theta, p.n_rot, p.rot_offset, p.neox, p.freq_scale, table_positions);
  std::lock_guard<std::mutex> lk(mu);
  auto it = ropes.find(key);
  if (it != ropes.end()) return it->second;
  auto r = std::make_shared<const Rope>(p, table_positions);
  ropes.emplace(key, r);
  return r;
}

}  // namespace kvc::kv
