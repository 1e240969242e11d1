// kivi: KIVI asymmetric 2/4-bit quantization (Liu, Yuan et al., "KIVI: A Tuning-Free Asymmetric
// 2bit Quantization for KV Cache", ICML 2024, arXiv 2402.02750, §3.3 + Algorithm 1; repo
// jy-yuan/KIVI). Spec "kivi:bits=2|4,group=G,residual=R" (defaults 2, 32, 128); aliases kivi2,
// kivi4. One codec, two layouts chosen by CodecContext.kind:
//
// Keys — per channel over G tokens (block_tokens = G):
//   block = [d][2] fp16 (scale s_c, min z_c per channel) then codes [d][G·b/8] (channel c's G codes
//   packed along tokens, code i at bits b·(i mod 8/b) of byte i / (8/b))
//   bytes = 4d + d·G·b/8; bits/value = b + 32/G (3.0 for b=2, G=32; 5.0 for b=4).
//   Flush: residual_tokens 0, flush_quantum = R rounded up to a multiple of G (G if R = 0): the
//   fp16 key tail fills to R then is quantized at once, so it oscillates 0..R'−1 (KIVI Alg. 1).
// Values — per token, groups of G consecutive channels (block_tokens = 1, needs G | d):
//   block = [d/G][2] fp16 (s_g, z_g) then codes [d·b/8] packed along channels
//   bytes = 4d/G + d·b/8; bits/value = b + 32/G. Flush: residual_tokens R, quantum 1: the fp16
//   value tail is a FIFO of exactly R tokens (once n >= R).
// A residual smaller than the group (e.g. G=32, R=16): keys still flush whole groups (quantum 32,
// tail 0..31), values keep a 16-token FIFO. R = 0: keys flush every G tokens, values are
// quantized on write.
// Quantizer (both): z = min X, s = (max X − min X)/(2^b − 1), both stored fp16 (saturating at
// ±65504); code = clamp(RNE((x − z)/s), 0, 2^b − 1) against the stored s, z; x̂ = code·s + z.
// s = 0 (constant group) stores code 0 (the official code divides by zero there).
// Worked example, 128 tokens x head_dim 64, kivi2 (G=32): K = 4 blocks · (256 + 512) B = 3,072 B,
// V = 128 · (8 + 16) B = 3,072 B; each 3.0 bits/value, i.e. 5.33x below f16 16,384 B (+ the fp16
// tails, reported separately: up to R'−1 keys and R values).
// Fused kernels (KIVI §3.3 "Q_MatMul"): keys q·k̂_t = Σ_c (q_c s_c) code_tc + Σ_c q_c z_c per block
// (q∘s and q·z computed once per block); values out_c += p·s_g·code_c + p·z_g.
#pragma once

#include <memory>

#include "kv/codec.h"

namespace kvc::kv {

StatusOr<std::unique_ptr<Codec>> MakeKiviCodec(const CodecSpec& spec, const CodecContext& ctx);

}  // namespace kvc::kv
