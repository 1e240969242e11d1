// KVQuant (Hooper et al., NeurIPS 2024, arXiv 2401.18079; spec-quantization.md §2), per-head
// layout: keys per channel PRE-RoPE with static calibrated thresholds (paper §3.1–3.2), values per
// token with online thresholds, non-uniform per-layer codebooks (nuqX, §3.3) from 1-D k-means on
// calibration activations, per-vector dense-and-sparse outliers in fp16 (§3.4), and Q-Norm
// (the paper's contribution (v), for 2-bit; defined in its appendix — appendix letter not checked).
//
// Spec: kvquant:bits=2|3|4,outliers=PCT,qnorm=0|1,calib=PATH    aliases kvquant2 / 3 / 4
//   outliers: percentage of values kept exactly (fp16 value + index), default the calibration's
//            (1 = the paper's "-1%"). Slot budgets are fixed so blocks stay fixed-size:
//            keys  round(PCT% × 16 × d) per 16-token block  (1 %, d 64: 10 slots of 1,024 = 0.98 %)
//            values round(PCT% × d) per vector              (1 %, d 64: 1 slot of 64 = 1.56 %; the
//            paper's per-token vector is the whole v_proj row over all heads, ours is one head).
//   keys   : wants_pre_rope_keys() = true (the cache stores pre-RoPE keys, RoPE at attention).
//            Per channel c: off_c = (hi_c + lo_c)/2, rng_c = (hi_c − lo_c)/2 from calibration
//            (the PCT/2-th and (100 − PCT/2)-th percentiles of the pre-RoPE channel over the
//            calibration tokens, recorded in the file as kvquant.outlier_pct). u = (x − off)/rng,
//            code = nearest of the layer's K signposts of clamp(u, −1, 1). The block's slots go to
//            the values with the largest clamping error |x − clamp(x)| (largest first, ties by
//            position); further values beyond the thresholds are clamped (the paper's sparse
//            matrix is unbounded; ours is capped per block).
//   values : per token: drop the slot-count values farthest from the median, lo/hi = min/max of
//            the rest, off/rng stored as fp16 (online, per vector), layer V codebook.
//   qnorm  : (default on at every width — the paper uses it for 2-bit; on SmolLM2 it also helped
//            at 3 and 4 bits, docs/quantization-advanced.md; qnorm=0 turns it off) the decode table is
//            cb·s + t with per-layer, per-K/V constants s = σ_u/σ_q, t = μ_u − μ_q·s from the
//            calibration (u: normalised non-outlier values, q: their nearest signposts), so the
//            dequantised distribution keeps the calibration mean and standard deviation; encoding
//            still rounds to the plain centroids (as the authors' reference does). Zero cost per
//            token (folded into the 2^b-entry table at construction).
//   NOT implemented: Fisher-weighted k-means (§3.3 weights each sample by the diagonal Fisher
//            information, squared gradients of the loss w.r.t. the activation); this runtime has
//            no backward pass, so the k-means is unweighted. Nothing here is called Fisher.
//   first token in fp16: use the cache's sink segment (`sinks=1 sink_codec=f16`, §3.5), not
//            handled here; calibration skips token 0 of every calibration chunk (attention sink).
// Format. Keys: one block = 16 tokens (block_tokens 16, so up to 15 newest keys wait in the
// cache's fp16 tail until a block fills; flush after attention, as for KIVI):
//   K: codes channel-major — channel c's 16 b-bit codes as an LSB-first 2b-byte stream at byte
//      c·2b (token t at bit t·b) | S × {u16 LE position t·d + c (0xFFFF: empty), fp16 value}
//   V (one token per block): fp16 off | fp16 rng | codes (d·b bits, LSB-first) | S_v × {uint8
//      channel (255: empty), fp16 value}
// Bits per value (d = 64, outliers=1: S = 10, S_v = 1): K b + 320/1024 = b + 0.3125 (3-bit:
// 384 + 40 = 424 B per block = 3.3125); V b + 7/8 (3-bit: 31 B = 3.875). Worked size, 128 tokens
// × d 64, kvquant3: K 8 blocks × 424 B = 3,392 B, V 3,968 B (f16: 16,384 B each).
// Attention on packed keys (ScoreRopeBlocks, the cache's decode path for pre-RoPE keys): tokens
// in lanes — per RoPE pair, 16 tokens' codes of both channels decoded by a codebook permute and
// the per-channel affine, rotated with the cos/sin of their 16 positions, and accumulated into
// each query row's 16 scores (cpu::CodebookRopeDotBlocks); each sparse outlier adds its rotated
// correction. Values: Score / AccumulateBlocks on the per-token codes (q·Σ, per-token scales).
// Calibration source, in order: CodecContext.calib (tensors "kvquant.*"), spec calib=PATH, env
// KVC_KVQUANT_CALIB, else the one models/*.kvquant.json whose shape matches (n_layer,
// n_head_kv, head_dim). NOT_FOUND with instructions when none is found; FAILED_PRECONDITION for a
// file of an older format (kvquant.version != 2); INVALID_ARGUMENT for non-finite or inconsistent
// tensors (lo > hi, codebook not ascending, Q-Norm scale <= 0) and for another model's shape.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "kv/codec.h"

namespace kvc::kv {

StatusOr<std::unique_ptr<Codec>> MakeKvQuantCodec(const CodecSpec& spec, const CodecContext& ctx);

// Calibration activations: per layer, k [n_tok, n_head_kv, head_dim] PRE-RoPE and
// v [n_tok, n_head_kv, head_dim] f32 (attention-sink tokens already removed).
struct KvQuantSamples {
  int n_layer = 0, n_head_kv = 0, head_dim = 0;
  std::vector<std::vector<float>> k, v;  // [n_layer][n_tok * n_head_kv * head_dim]
  std::string source;                     // text file + token count, for reports
};

// Per-channel K thresholds (percentiles outlier_pct/2 and 100 − outlier_pct/2) and per-layer K/V
// codebooks (unweighted 1-D k-means, outliers excluded) with their Q-Norm constants for bits 2,
// 3, 4. Tensors: kvquant.shape [3], kvquant.version [1] = 2, kvquant.outlier_pct [1],
// kvquant.k_lo.L<l> / k_hi.L<l> [n_head_kv·head_dim], kvquant.k_cb<b>.L<l> / v_cb<b>.L<l> [2^b],
// kvquant.k_qn<b>.L<l> / v_qn<b>.L<l> [2] = (scale, shift). INVALID_ARGUMENT for a bad shape,
// fewer than 16 tokens, or a non-finite sample.
StatusOr<CalibrationData> CalibrateKvQuant(const KvQuantSamples& s, double outlier_pct = 1.0);
// True when `c` is a KVQuant calibration of the current format (kvquant.version 2).
bool IsCurrentKvQuantCalibration(const CalibrationData& c);
// JSON {"source": ..., "tensors": {name: [floats]}}; written to PATH.tmp then renamed (atomic).
Status SaveCalibrationJson(const CalibrationData& c, const std::string& path);
StatusOr<CalibrationData> LoadCalibrationJson(const std::string& path);
// The same from the file's text (`path` only names it in messages; the fuzzer's entry point).
StatusOr<CalibrationData> ParseCalibrationJson(const std::string& text, const std::string& path);

}  // namespace kvc::kv
