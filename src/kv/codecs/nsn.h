// NSN vector codec: a calibration-free vector quantizer in the NSNQuant recipe (Son, Choi, Yoo,
// "NSNQuant: A Double Normalization Approach for Calibration-Free Low-Bit Vector Quantization of
// KV Cache", NeurIPS 2025, arXiv 2505.18231, abstract and §1: Normalize, Shift (channel mean),
// Normalize, then a Hadamard transform, so every coordinate is close to N(0, 1) and ONE codebook
// trained on Gaussian data serves every layer and head without calibration).
//
// What is the paper's and what is ours. Only the paper's abstract and introduction were readable
// here (the search store holds the first part of the arXiv page), so the recipe above is the
// paper's and the following choices are ours, not claims about the paper:
//   - Shift: the cache's generic centering (`center=1` in the spec, cache_internal.h Stream): μ is
//     the per-channel mean of the first batch written to the stream (the prefill), frozen, kept in
//     the pre-RoPE frame for post-RoPE keys and applied as R(pos) μ, exact in attention (q·μ and
//     (Σp)·μ added back). The paper takes the mean of *normalized* tokens (first Normalize); ours
//     is the mean of the raw tokens (a norm-weighted mean of the normalized ones), because only the
//     cache knows positions, and a post-RoPE mean is wrong far from the batch it came from
//     (measured in cache_internal.h). Without `center=1` the codec is Normalize + Hadamard + VQ.
//   - Normalize after the shift: per token γ = ‖x − μ‖, y = √d · H·S·(x − μ) / γ (S = seeded ±1
//     signs, H the normalized Sylvester Hadamard matrix), so ‖y‖² = d and y_j ≈ N(0, 1).
//   - Codebook: one per (sub-dimension D, entries K = 2^(bits·D)), k-means (LBG splitting + Lloyd
//     steps, each on a fresh fixed-seed N(0, I_D) sample), generated in-process and cached
//     (GaussianVqCodebook). A process that restores a saved cache regenerates the same codebook
//     (same seeds; Box–Muller uses libm log/cos/sin, so another libm could differ in the last ulp).
//   - No fp16 recent window inside the codec (the cache's `sinks=` keeps the first tokens exact);
//     the bits below are all-in.
//
// Spec: nsn:bits=B,dim=D[,nc=0|1][,lut=0|1]; aliases nsn2 (B=1.75, D=4), nsn2.5 (2.25, 4),
//       nsn3 (2.75, 4), nsn3.25 (3, 2). Usual use: `k=nsn3.25:center=1` (the Shift on keys).
//   bits  code bits per value, B·D must be an integer in [1, 12] (K = 2^(B·D) codewords of D
//         dims), e.g. D=4: 1.75 (K=128), 2 (256), 2.25 (512), 2.5 (1024), 2.75 (2048), 3 (4096).
//   dim   codebook dimension D in {1, 2, 4, 8}, D divides head_dim (default 4).
//   nc    (default 1) store γ/‖ŷ‖ so ‖x̂ − μ‖ = ‖x − μ‖ (norm-preserving, as turbo's nc=1);
//         nc=0 stores γ/√d.
//   lut   (default 0) score / accumulate through per-query lookup tables (below); same bytes.
// Errors: INVALID_ARGUMENT for bad bits/dim/nc or unknown keys (the message names the key and the
// allowed values); UNIMPLEMENTED for a head_dim that is not a power of 2 in [8, 512] or not a
// multiple of D. Non-finite input never reaches Encode (KvCache::Write refuses it with
// INVALID_ARGUMENT "non-finite key value ..."); values beyond fp16 range give a finite block (s
// saturates at 65504, so such a token's norm is capped).
//
// Format, one token (block_tokens = 1), shapes outermost first:
//   bytes [0, 2)  fp16 s (saturated to ±65504): γ/‖ŷ‖ (nc=1) or γ/√d
//   bytes [2, ..) codes [d/D] of B·D bits each, LSB-first bit stream, padded to a byte.
// Reconstruction: x̂ = S·H·(s · ŷ) (+ μ by the cache), ŷ [d] = (c[idx_0], …, c[idx_{d/D−1}]).
// Bits per value (d = 64): B + 16/64 = B + 0.25, with nothing else stored per token. Per stream
//   (not per token): μ [d] f32 (the cache's, only with center=1) and the ±1 signs (regenerated
//   from the seed). Codebooks are global (K·D f32, at most 4096 × 8 × 4 B).
//   nsn2  = 2 + 14 = 16 B/token → 2.0 b/v     nsn2.5 = 2 + 18 = 20 B → 2.5 b/v
//   nsn3  = 2 + 22 = 24 B → 3.0 b/v           nsn3.25 = 2 + 24 = 26 B → 3.25 b/v
// Worked size, 128 tokens × d 64: nsn2.5 128 × 20 B = 2,560 B (f16: 16,384 B); nsn3 3,072 B.
// An all-zero token stores s = 0 (decodes to exactly 0).
//
// Attention on packed data: PrepareQuery rotates q once (q' = H·S·q, orthogonal, so
// q·x̂ = s · q'·ŷ); keys are never rotated back. Score (scalar reference) sums the D-dim dot of q'
// with each codeword. Default (lut=0) ScoreBlocks decodes s·ŷ rows (codeword copies, no
// rotation) into an f32 tile and dots them with the SIMD cpu::DotF32Rows; AccumulateBlocks adds
// p·s·ŷ in the rotated domain (cpu::AxpyF32Rows) and applies S·H once per query row per call.
// lut=1 (the VQ lookup-table form): ScoreBlocks builds T[r][i][k] = q'_i · c_k (i < d/D) once per
// call and scores a token as s · Σ_i T[r][i][idx_i]; AccumulateBlocks accumulates in the codebook
// domain, W[r][i][k] += p·s, then Σ_k W[r][i][k] c_k and one S·H per row; both fall back to the
// reference below K/4 tokens. On this CPU lut=1 measured slower (kv_attend_bench, nsn2.5 at 4k:
// 3.3x vs 2.1x the f16 time; docs/quantization-advanced.md), so it is not the default.
// AccumulateWeighted (decode-then-axpy) is the value reference. The codec's own loops are scalar
// C++ (no Highway VQ kernel); tests check every path equal to the references.
#pragma once

#include <memory>
#include <vector>

#include "kv/codec.h"

namespace kvc::kv {

StatusOr<std::unique_ptr<Codec>> MakeNsnCodec(const CodecSpec& spec, const CodecContext& ctx);

// A vector codebook for N(0, I_dim), trained once per (dim, code_bits) with a fixed seed
// (deterministic on every platform: splitmix64 + Box–Muller, no std distributions) and cached;
// thread-safe. dim in {1, 2, 4, 8}, 1 <= code_bits <= 12.
struct VqCodebook {
  int dim = 0;
  int entries = 0;
  std::vector<float> c;      // [entries, dim] codewords
  std::vector<float> norm2;  // [entries] ‖c_k‖²
  double train_mse = 0;      // per coordinate, on one more sample of the training generator
  double test_mse = 0;       // per coordinate, on an independent Gaussian sample (another seed)
};
const VqCodebook& GaussianVqCodebook(int dim, int code_bits);

// Index of the codeword nearest to y [cb.dim] (ties: lowest index).
int NearestCodeword(const VqCodebook& cb, const float* y);

}  // namespace kvc::kv
