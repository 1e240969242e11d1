// Rotary position embedding (Su et al., "RoFormer", 2021, eq. 34), as used by Llama-family models.
// Angles are computed in double: pos * theta_i with pos up to millions loses ~0.25 rad in fp32
// (spec-eviction-lowrank-eval.md §0.1), so fp32 angles are never used.
#pragma once

#include <cstdint>
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

 private:
  void RotateRow(float* x, int64_t pos) const;
  RopeParams p_;
  std::vector<double> inv_freq_;  // [n_rot/2]
  int table_positions_ = 0;
  std::vector<float> table_;      // [table_positions, n_rot/2, 2] (cos, sin)
};

}  // namespace kvc::kv
