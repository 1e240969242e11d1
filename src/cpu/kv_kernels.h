// Highway (runtime-dispatched) kernels for attention over packed KV codecs: row decoders that
// turn many packed tokens into f32 rows in a small L1 tile, and the f32 multi-row dot / axpy the
// tile is then fed to. Codecs use them in ScoreBlocks / AccumulateBlocks (many tokens per call);
// their per-block Score / AccumulateWeighted stay the scalar references, and
// tests/unit/kv_kernels_test.cc checks every kernel against a scalar reference on every Highway
// target the machine runs (cpu/targets.h).
//
// Numeric contracts (asserted by the tests on every target; u = 2^-24, the f32 unit roundoff).
// The whole of kvc_cpu and kvc_kv is compiled with -ffp-contract=off (CMakeLists.txt), so the
// compiler fuses nothing on its own: a kernel fuses a multiply and an add only where it calls
// MulAdd, and the references compute exactly what they say.
//   [exact]  bit-identical to the reference: the same f32 operations in the same order on every
//            target (decoders: table lookups, integer bit moves, one product or product-then-add
//            per value, no FMA, no reassociation).
//   [sum n]  a sum of n products in f32, in lane order and with FMA where the kernel says so, vs
//            a reference summing in double: |simd - ref| <= (n + 2)·u·Σ|terms| — the bound of
//            any evaluation order of n terms (Higham's γ_n, first order) plus the reference's
//            final rounding; lane counts (1..16) only change which order, not the bound.
//   [fma]    one product fused into an add (MulAdd) where the reference rounds the product
//            first: |simd - ref| <= 2u·(|w·x| + |ref|).
// All row decoders: rows [n, row_bytes] in, out [n, d] f32, [exact] vs the codec's scalar Decode
// unless noted.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

namespace kvc::cpu {

// out[r * ld + t] = <q[r], x[t]>: q [n_q, d], x [n, d] f32 (any n_q, any d). [sum d] (FMA lanes).
void DotF32Rows(const float* q, int n_q, const float* x, int64_t n, int d, float* out, int64_t ld);
// out[r] [d] += Σ_t p[r * ld + t] · x[t]: x [n, d] f32. [sum n + 1] (the n products and out).
void AxpyF32Rows(const float* p, int64_t ld, int n_q, const float* x, int64_t n, int d, float* out);

// ggml q4_0 / q4_1 / q5_0 rows: d / 32 blocks of 18 / 20 / 22 bytes per row (d % 32 == 0).
// [exact]: (q − 8)·d, q·d + m (product, then add), (q − 16)·d, as the codecs' DequantizeRowRef.
void DecodeQ4_0Rows(const uint8_t* rows, int64_t n, int d, float* out);
void DecodeQ4_1Rows(const uint8_t* rows, int64_t n, int d, float* out);
void DecodeQ5_0Rows(const uint8_t* rows, int64_t n, int d, float* out);

// fp8 codec rows: fp16 scale s then d E4M3 codes (row_bytes = d + 2); x = e4m3(code) · s.
// Code 0x7F / 0xFF (NaN, never written by the encoder) decodes to ±480 instead of NaN. [exact]
void DecodeE4M3Rows(const uint8_t* rows, int64_t n, int d, float* out);

// Codebook rows: out[j] = g · cb[code_j] for j < n_codes, where code_j is the b-bit field at bit
// j·b of `bits` (LSB first, 1 <= b <= 8, cb has 2^b entries). b <= 4 reads nothing past the last
// code byte; b > 4 (a byte gather) may read up to 3 bytes beyond the
// last code byte: callers pad. [exact]
void CodebookRow(const uint8_t* bits, int n_codes, int b, const float* cb, float g, float* out);
// Affine code groups: out[j] = code_j · s + z over n_codes codes (same stream and padding rules).
// [exact] (product, then add).
void AffineCodesRow(const uint8_t* bits, int n_codes, int b, float s, float z, float* out);
// acc[t] += w · code_t over n codes (same stream and padding rules). [fma] (whole vectors fused,
// the last partial vector not).
void AxpyCodes(const uint8_t* bits, int n, int b, float w, float* acc);
// acc[r][t] += Σ_c w[r][c] · code_{c,t} for r < n_q: n_streams streams of n codes each, stream c
// at bits + c · stride bytes; w [n_q, n_streams], acc [n_q, n]. (KIVI keys: one stream per
// channel, codes along the group's tokens, w = q ∘ s.) [sum n_streams + 1] (the streams' products
// and acc, FMA chain in stream order).
void AxpyCodesRows(const uint8_t* bits, int n_streams, size_t stride, int n, int b, const float* w,
                   int n_q, float* acc);
// Many rows (row t at rows + t · row_bytes) with an fp16 scale g at scale_off and a code stream at
// code_off: out[t · ld + j] = g_t · cb[code_j], j < n_codes (TurboQuant parts). [exact]
void CodebookRows(const uint8_t* rows, int64_t n_rows, size_t row_bytes, size_t code_off,
                  size_t scale_off, int n_codes, int b, const float* cb, float* out, int64_t ld);
// QJL keys: rows with an fp16 norm g at scale_off and m sign bits at bits_off (bit i of byte i/8,
// LSB first); out[r * ld + t] = kappa · g_t · Σ_i (bit_ti ? sq[r][i] : −sq[r][i]), sq [n_q, m].
// [sum m + 1] with terms |kappa·g_t·sq[r][i]| (the ± sum in f32, then the product kappa·g_t).
void SignDotRows(const float* sq, int n_q, int m, const uint8_t* rows, size_t row_bytes,
                 size_t bits_off, size_t scale_off, float kappa, int64_t n, float* out, int64_t ld);
// PolarQuant rows (rotated domain): [nb fp16 radii][nb 46-bit code words: 8 × 4-bit level-1,
// 4 × 2-bit level-2, 2 × 2-bit level-3, 1 × 2-bit level-4 angle codes] -> out [n_rows, 16 · nb].
// trig [8][16]: cos, sin of the level-1 codebook (16 angles), then cos, sin of levels 2, 3, 4
// (4 angles each, rest unused). [exact] vs the codec's scalar recursive decode (ref::PolarRow).
void PolarRows(const uint8_t* rows, int64_t n_rows, size_t row_bytes, int nb, const float* trig,
               float* out);
// Attention over PolarQuant rows without a row-major tile (y_t: row t decoded as PolarRows does,
// bit-identical values; sums in another order): out[r * ld + t] = <q[r], y_t> (q [n_q, 16 · nb])
// and out[r] [16 · nb] += Σ_t p[r * ld + t] · y_t. Dot [sum 16·nb], axpy [sum n + 1] over the
// exactly decoded y_t.
void PolarDotRows(const float* q, int n_q, const uint8_t* rows, int64_t n, size_t row_bytes, int nb,
                  const float* trig, float* out, int64_t ld);
void PolarAxpyRows(const float* p, int64_t ld, int n_q, const uint8_t* rows, int64_t n,
                   size_t row_bytes, int nb, const float* trig, float* out);
// Many rows (row t at rows + t · row_bytes, b-bit code stream at code_off) with an optional fp16
// scale g_t at g_off and offset z_t at z_off (−1: g = 1, z = 0) and optional per-channel mul /
// add [n_codes] (null: 1 / 0): out[t · n_codes + j] = ((cb[code_tj] · g_t) · mul_j + add_j) + z_t;
// then n_sparse slots of 3 bytes at sparse_off, {u8 channel c, fp16 value}, set out[t · n_codes + c]
// = value (c >= n_codes: empty slot). KVQuant rows (keys: mul = per-channel range, add = offset;
// values: per-token g, z; dense-and-sparse outliers, KVQuant §3.4). b <= 8 (same padding rule as
// CodebookRow). [exact] (products and adds in the order written, no FMA).
void CodebookAffineRows(const uint8_t* rows, int64_t n_rows, size_t row_bytes, size_t code_off,
                        int n_codes, int b, const float* cb, int64_t g_off, int64_t z_off,
                        const float* mul, const float* add, int64_t sparse_off, int n_sparse,
                        float* out);
// Many rows of [n_groups × (fp16 s, fp16 z)][codes, group per group]:
// out[t · n_groups·group + j] = code_j · s_g + z_g (KIVI values). [exact] (product, then add).
void AffineGroupRows(const uint8_t* rows, int64_t n_rows, size_t row_bytes, int n_groups, int group,
                     int b, float* out);

// Pre-RoPE codebook keys with tokens in lanes (KVQuant keys): blocks [n_blocks, block_bytes] of
// kRopeBlockTokens = 16 tokens; channel c's 16 b-bit codes (b <= 4) are the LSB-first stream of
// 2·b bytes at byte c · 2b of the block (token t at bit t·b). Key value x_tc = cb[code_tc]·mul_c +
// add_c (codebook [2^b], per-channel mul / add [d]), then the block's n_sparse slots of 4 bytes at
// block + sparse_off, {u16 LE at = t·d + c, fp16 value}, replace x_tc (distinct `at` per block;
// at >= 16·d: empty; KVQuant's dense-and-sparse outliers, a per-block budget); pairs (2i, 2i+1) rotated by the
// angles of the token's position (RopeTrig); out[r · ld + blk · 16 + t] = <q[r], R x_t> for
// post-RoPE query rows q [n_q, d]. No tile, no horizontal sums. Contract vs ref (f32 decode and
// rotation without FMA, double dot): the kernel fuses the affine decode, the rotation and the dot
// (MulAdd) and, with rows + offs, computes cos / sin by angle addition in f32, so
//   |simd − ref| <= (d + 16)·u·M,  M = Σ_i (|q_2i| + |q_2i+1|)·(X_2i + X_2i+1)·T_i
// with X_c = |cb[code_c]·mul_c| + |add_c| (|value| for a sparse outlier) and T_i = |cos_i| +
// |sin_i| (lanes) or (|row cos_i| + |row sin_i|)·(|offs cos| + |offs sin|) (rows + offs): every
// rounding on the way is at most u times a partial sum of those magnitudes, and no chain of
// roundings is longer than d + 16.
constexpr int kRopeBlockTokens = 16;
// cos / sin for CodebookRopeDotBlocks, either
//   lanes: cos(i, col) = lanes[i · stride + col], sin = lanes[(d/2 + i) · stride + col], col =
//          blk · 16 + t (any positions; kv::Rope::LaneTrig fills it), or
//   rows + offs: block blk starts at the position whose interleaved (cos, sin) table row is
//          rows + blk · 16 · d (consecutive positions: kv::Rope::TableRow), token t adds angle
//          t·θ_i with offs [2][d/2][16] = cos, sin of t·θ_i (kv::Rope::LaneOffsets); cos / sin
//          by angle addition in registers (~1e-7 relative), nothing read but one row per block.
struct RopeTrig {
  const float* lanes = nullptr;
  int64_t stride = 0;
  const float* rows = nullptr;
  const float* offs = nullptr;
};
void CodebookRopeDotBlocks(const float* q, int n_q, const uint8_t* blocks, int64_t n_blocks,
                           size_t block_bytes, int d, int b, const float* cb, const float* mul,
                           const float* add, int64_t sparse_off, int n_sparse, const RopeTrig& trig,
                           float* out, int64_t ld);

// RoPE with pairs (2i, 2i+1) (GGUF "llama" order) on many rows: row t is x + t · ld, its first
// n_rot values (n_rot even) are rotated in place by the angles of table row pos[t], table
// [*, n_rot / 2, 2] f32 (cos θ_i, sin θ_i) interleaved (kv::Rope's table). [exact] vs the scalar
// x0·c − x1·s, x0·s + x1·c: two rounded products, then one add, on every target (the last pairs
// of a row go through the same vector code on a padded copy: GCC 12 would otherwise vectorize a
// scalar tail as a fused complex multiply, vfmaddsub, even under -ffp-contract=off).
// RoFormer (Su et al. 2021) eq. 34.
void RotatePairsRows(float* x, int64_t n, int64_t ld, int n_rot, const float* table, const int64_t* pos);

// Glue: score / accumulate n packed rows through a decoded f32 tile (decode(rows, m, tile) turns
// m consecutive rows into [m, d] f32). One tile is at most ~16 KiB, so it stays in L1.
// Decodes n packed rows tile by tile and hands each tile to fn(t0, m, tile) (tile [m, d] f32).
template <class Decode, class Fn>
void ForEachTile(const uint8_t* rows, size_t row_bytes, int64_t n, int d, Decode&& decode, Fn&& fn) {
  thread_local std::vector<float> tile;
  const int64_t tt = d >= 4096 ? 1 : 4096 / d;
  tile.resize(size_t(tt) * d);
  for (int64_t t0 = 0; t0 < n; t0 += tt) {
    const int64_t m = n - t0 < tt ? n - t0 : tt;
    decode(rows + size_t(t0) * row_bytes, m, tile.data());
    fn(t0, m, tile.data());
  }
}
template <class Decode>
void ScoreViaTile(const float* q, int n_q, const uint8_t* rows, size_t row_bytes, int64_t n, int d,
                  float* out, int64_t ld, Decode&& decode) {
  ForEachTile(rows, row_bytes, n, d, decode, [&](int64_t t0, int64_t m, const float* tile) {
    DotF32Rows(q, n_q, tile, m, d, out + t0, ld);
  });
}
template <class Decode>
void AccumulateViaTile(const float* p, int64_t ld, int n_q, const uint8_t* rows, size_t row_bytes,
                       int64_t n, int d, float* out, Decode&& decode) {
  ForEachTile(rows, row_bytes, n, d, decode, [&](int64_t t0, int64_t m, const float* tile) {
    AxpyF32Rows(p + t0, ld, n_q, tile, m, d, out);
  });
}

namespace ref {
void CodebookRopeDotBlocks(const float* q, int n_q, const uint8_t* blocks, int64_t n_blocks,
                           size_t block_bytes, int d, int b, const float* cb, const float* mul,
                           const float* add, int64_t sparse_off, int n_sparse, const RopeTrig& trig,
                           float* out, int64_t ld);
void CodebookAffineRows(const uint8_t* rows, int64_t n_rows, size_t row_bytes, size_t code_off,
                        int n_codes, int b, const float* cb, int64_t g_off, int64_t z_off,
                        const float* mul, const float* add, int64_t sparse_off, int n_sparse,
                        float* out);
void RotatePairsRows(float* x, int64_t n, int64_t ld, int n_rot, const float* table, const int64_t* pos);
void DotF32Rows(const float* q, int n_q, const float* x, int64_t n, int d, float* out, int64_t ld);
void AxpyF32Rows(const float* p, int64_t ld, int n_q, const float* x, int64_t n, int d, float* out);
void CodebookRow(const uint8_t* bits, int n_codes, int b, const float* cb, float g, float* out);
void AffineCodesRow(const uint8_t* bits, int n_codes, int b, float s, float z, float* out);
void AxpyCodes(const uint8_t* bits, int n, int b, float w, float* acc);
void AxpyCodesRows(const uint8_t* bits, int n_streams, size_t stride, int n, int b, const float* w,
                   int n_q, float* acc);
void CodebookRows(const uint8_t* rows, int64_t n_rows, size_t row_bytes, size_t code_off,
                  size_t scale_off, int n_codes, int b, const float* cb, float* out, int64_t ld);
void AffineGroupRows(const uint8_t* rows, int64_t n_rows, size_t row_bytes, int n_groups, int group,
                     int b, float* out);
void SignDotRows(const float* sq, int n_q, int m, const uint8_t* rows, size_t row_bytes,
                 size_t bits_off, size_t scale_off, float kappa, int64_t n, float* out, int64_t ld);
// PolarQuant: codes read bit by bit, recursive decode (level 4 first), double-precision sums.
// PolarRow decodes one row [nb fp16 radii][nb 46-bit code words] -> y [16 · nb] (the recursive
// decode of kv/codecs/polar.h, cos / sin from trig as PolarRows).
void PolarRow(const uint8_t* row, int nb, const float* trig, float* y);
void PolarDotRows(const float* q, int n_q, const uint8_t* rows, int64_t n, size_t row_bytes, int nb,
                  const float* trig, float* out, int64_t ld);
void PolarAxpyRows(const float* p, int64_t ld, int n_q, const uint8_t* rows, int64_t n,
                   size_t row_bytes, int nb, const float* trig, float* out);
}  // namespace ref

}  // namespace kvc::cpu
