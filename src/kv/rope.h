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
  // s[r * ld + j] += <q[r], R(pos[j]) mu> for r < n_q, j < n; q [n_q, dim], mu [dim] f32.
  // Without materialising R(pos) mu: per query row, w_2i = q0·μ0 + q1·μ1 and
  // w_2i+1 = q1·μ0 − q0·μ1 over each rotated pair (i0, i1), so the term is
  // q·μ (unrotated dims) + Σ_i w_2i cos(pos θ_i) + w_2i+1 sin(pos θ_i): a dot product with the
  // cos/sin table row of pos (runs of consecutive positions in one multi-row call). Positions
  // outside the table rotate mu directly. Used for centred post-RoPE keys (Stream::mu_rope).
  void AddDotRotated(const float* q, int n_q, int dim, const float* mu, const int64_t* pos,
                     int64_t n, float* s, int64_t ld) const;
  // cos / sin of every rotated pair at n token positions, laid out for SIMD over tokens (tokens
  // in lanes): cos(i, t) = base[i * stride + t], sin(i, t) = base[(n_rot/2 + i) * stride + t]
  // for pair i < n_rot/2, t < n. Consecutive positions inside one tile of the transposed table
  // (n <= LaneRun(pos[0])) point into it (no work); anything else is written to *scratch
  // ([n_rot, n]) and returned.
  const float* LaneTrig(const int64_t* pos, int64_t n, std::vector<float>* scratch,
                        int64_t* stride) const;
  // How many consecutive positions from p0 one LaneTrig call can serve without a copy (>= 17
  // inside the table, 0 outside). The transposed table is tiled (kLaneTile positions per tile,
  // each row kLaneTile + 16 long, overlapping the next tile) so that the 2·32 rows a block of
  // tokens reads are 576 bytes apart, not a table length: rows a power of two apart fell into
  // the same L1 sets and cost a TLB walk each.
  int64_t LaneRun(int64_t p0) const;
  static constexpr int kLaneTile = 128;

 private:
  void RotateRow(float* x, int64_t pos) const;
  RopeParams p_;
  std::vector<double> inv_freq_;  // [n_rot/2]
  int table_positions_ = 0;
  std::vector<float> table_;      // [table_positions, n_rot/2, 2] (cos, sin)
  // [tiles][n_rot][kLaneTile + 16]: per tile, cos rows then sin rows of positions
  // [tile·kLaneTile, tile·kLaneTile + kLaneTile + 16)
  std::vector<float> lane_;
};

}  // namespace kvc::kv
