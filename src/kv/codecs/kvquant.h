// KVQuant (Hooper et al., NeurIPS 2024, arXiv 2401.18079; spec-quantization.md §2), per-head
// layout: keys per channel PRE-RoPE with static calibrated thresholds, values per token with
// online thresholds, non-uniform per-layer codebooks (nuqX) from 1-D k-means on calibration
// activations, dense-and-sparse outliers kept in fp16.
//
// Spec: kvquant:bits=2|3|4,outliers=1,calib=PATH      aliases kvquant2 / kvquant3 / kvquant4
//   keys   : wants_pre_rope_keys() = true (the cache stores pre-RoPE keys, RoPE at attention).
//            Per channel c: off_c = (hi_c + lo_c)/2, rng_c = (hi_c − lo_c)/2 from calibration
//            (0.5th / 99.5th percentiles of the pre-RoPE channel over the calibration tokens, so
//            ~1% of values fall outside). u = (x − off)/rng, code = nearest of the layer's K
//            codebook (2^b signposts in [−1, 1]).
//   values : per token: drop the `outliers` values farthest from the median, lo/hi = min/max
//            of the rest, off/rng stored as fp16 (online, per vector), layer V codebook.
//   outliers: a FIXED number of (uint8 channel, fp16 value) slots per vector so blocks stay
//            fixed-size: default 1 per 64-dim vector = 1.6% of values; keys fill the slots with
//            the values farthest outside [lo, hi] (others are clamped), channel 255 = empty slot.
//   first token in fp16: use the cache's sink segment (`sinks=1 sink_codec=f16`), not handled
//            here; calibration skips token 0 of every calibration chunk (attention sink).
// Format. Keys: one block = 16 tokens (block_tokens 16, so up to 15 newest keys wait in the
// cache's fp16 tail until a block fills; flush after attention, as for KIVI):
//   K: codes channel-major — channel c's 16 b-bit codes as an LSB-first 2b-byte stream at byte
//      c·2b (token t at bit t·b) | 16 × outliers × {uint8 channel, fp16 value} (token-major)
//   V (one token per block): fp16 off | fp16 rng | codes (d·b bits, LSB-first) | outliers × {uint8
//      channel, fp16 value}
// Bits per value (d = 64, 1 outlier): K b + 3/8 (3-bit: 16 × 27 B = 432 B per block = 3.375); V
// b + 7/8 (3-bit: 31 B = 3.875). Worked size, 128 tokens × d 64, kvquant3: K 8 blocks × 432 B =
// 3,456 B, V 3,968 B (f16: 16,384 B each).
// Attention on packed keys (ScoreRopeBlocks, the cache's decode path for pre-RoPE keys): tokens
// in lanes — per RoPE pair, 16 tokens' codes of both channels decoded by a codebook permute and
// the per-channel affine, rotated with the cos/sin of their 16 positions, and accumulated into
// each query row's 16 scores (cpu::CodebookRopeDotBlocks); each sparse outlier adds its rotated
// correction. Values: Score / AccumulateBlocks on the per-token codes (q·Σ, per-token scales).
// Calibration (CalibrateKvQuant): plain 1-D k-means (no Fisher sensitivity weighting — that
// needs gradients we do not compute), outliers excluded; see docs/quantization-advanced.md.
// Calibration source, in order: CodecContext.calib (tensors "kvquant.*"), spec calib=PATH, env
// KVC_KVQUANT_CALIB, else the one models/*.kvquant.json whose shape matches (n_layer,
// n_head_kv, head_dim). NOT_FOUND with instructions when none is found.
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

// Per-channel K thresholds (percentiles lo_pct / 100 − lo_pct) and per-layer K/V codebooks for
// bits 2, 3, 4. Tensors: kvquant.shape [3], kvquant.k_lo.L<l> / k_hi.L<l> [n_head_kv·head_dim],
// kvquant.k_cb<b>.L<l> / v_cb<b>.L<l> [2^b].
StatusOr<CalibrationData> CalibrateKvQuant(const KvQuantSamples& s, double lo_pct = 0.5,
                                           int outliers_per_vector = 1);
// JSON {"source": ..., "tensors": {name: [floats]}}; written to PATH.tmp then renamed (atomic).
Status SaveCalibrationJson(const CalibrationData& c, const std::string& path);
StatusOr<CalibrationData> LoadCalibrationJson(const std::string& path);
// The same from the file's text (`path` only names it in messages; the fuzzer's entry point).
StatusOr<CalibrationData> ParseCalibrationJson(const std::string& text, const std::string& path);

}  // namespace kvc::kv
