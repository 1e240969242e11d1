// Rotary position embedding (Su et al., "RoFormer", 2021, eq. 34), as used by Llama-family models.
// Angles are computed in double: pos * theta_i with pos up to millions loses ~0.25 rad in fp32
// (spec-eviction-lowrank-eval.md §0.1), so fp32 angles are never used.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <vector>

namespace kvc::kv {

struct RopeParams {
  double theta = 10000.0;   // rope.freq_base
  int n_rot = 64;           // rotated dims (rope.dimension_count); the rest are left as is
  int rot_offset = 0;       // first rotated dim (MLA's decoupled RoPE key: rotated part at the end)
  bool neox = false;        // false: pairs (2i, 2i+1) (GGUF "llama"); true: pairs (i, i+n_rot/2)
  double freq_scale = 1.0;  // linear scaling: pos * freq_scale
};

class Rope {
 public:
  // table_positions > 0 precomputes cos/sin for positions [0, table_positions) (computed exactly
  // as the direct path: double angle, then rounded to float, so results are bit-identical). The
  // cache uses it for in-cache positions, which re-rotate every cached key at each step.
  explicit Rope(const RopeParams& p, int table_positions = 0);
  const RopeParams& params() const { return p_; }
  // x [n, dim] f32, rotated in place; row r at position pos[r] (any int64, may be negative for
  // relative re-rotation).
  void Apply(float* x, int n, int dim, const int64_t* pos) const;
  // Same with one position for all rows (e.g. n query heads of one token): x [n, dim].
  void ApplySame(float* x, int n, int dim, int64_t pos) const;
  // s[r * ld + j] += <q[r], R(pos[j]) mu> for r < n_q, j < n; q [n_q, dim], mu [dim] f32.
  // Without materialising R(pos) mu: per query row, w_2i = q0·μ0 + q1·μ1 and
  // w_2i+1 = q1·μ0 − q0·μ1 over each rotated pair (i0, i1), so the term is
  // q·μ (unrotated dims) + Σ_i w_2i cos(pos θ_i) + w_2i+1 sin(pos θ_i): a dot product with the
  // cos/sin table row of pos (runs of consecutive positions in one multi-row call). Positions
  // outside the table rotate mu directly. Used for centred post-RoPE keys (Stream::mu_rope).
  void AddDotRotated(const float* q, int n_q, int dim, const float* mu, const int64_t* pos,
                     int64_t n, float* s, int64_t ld) const;
  // For SIMD over tokens (tokens in lanes, cpu::RopeTrig):
  //  - TableRow(pos): the interleaved (cos, sin) row [n_rot/2][2] of a position, or null
  //    outside the table;
  //  - LaneOffsets(): [2][n_rot/2][kLaneBlock] f32, cos then sin of t·θ_i for t < kLaneBlock
  //    (double angles), so a block of consecutive positions p..p+15 gets its cos / sin by angle
  //    addition from row p;
  //  - LaneTrig: cos / sin of any n positions written to *scratch [n_rot, n] (cos(i, t) =
  //    base[i * n + t], sin(i, t) = base[(n_rot/2 + i) * n + t]); returns scratch's data.
  static constexpr int kLaneBlock = 16;
  const float* TableRow(int64_t pos) const {
    return pos >= 0 && pos < table_positions_ ? table_.data() + std::size_t(pos) * p_.n_rot : nullptr;
  }
  const float* LaneOffsets() const { return lane_offs_.data(); }
  const float* LaneTrig(const int64_t* pos, int64_t n, std::vector<float>* scratch) const;

 private:
  void RotateRow(float* x, int64_t pos) const;
  RopeParams p_;
  std::vector<double> inv_freq_;  // [n_rot/2]
  int table_positions_ = 0;
  std::vector<float> table_;      // [table_positions, n_rot/2, 2] (cos, sin)
  std::vector<float> lane_offs_;  // [2, n_rot/2, kLaneBlock] cos, sin of t·θ_i
};

// One immutable Rope per (parameters, table length) for the whole process (thread-safe; tables
// are never freed while the process runs: one per distinct model and context size).
std::shared_ptr<const Rope> SharedRope(const RopeParams& p, int table_positions);

}  // namespace kvc::kv
