// `kvcrunch calibrate --method bits`: "bits where the loss is" — a per-layer (K codec, V codec)
// choice under an all-in bits-per-value budget, after KVTuner (Li et al., ICML 2025, PMLR
// 267:36451-36485, arXiv 2502.04420: offline search over per-layer K/V precision pairs with
// intra-layer pruning of dominated pairs; see bits_search.h for what differs).
//
// 1. Sensitivity, on calibration text disjoint from the WikiText-2 evaluation (a PG-19 book):
//    for every layer l and candidate c, the mean KL divergence of the next-token distribution vs
//    the f16 cache (llama.cpp protocol: each chunk's second half is scored) when only layer l's K
//    (or only its V) uses c and every other layer stays f16 (sinks as configured in both).
//    n_layer · (|K candidates| + |V candidates|) runs of `chunks` chunks of n_ctx tokens.
//    The selection adds up *excesses*: that KLD minus the KLD with the reference codec (q8_0) in
//    the same place, because any one-layer perturbation (even f32 for f16) costs SmolLM2 a floor
//    of ~0.001-0.005 nats that does not add over layers.
// 2. Cost: each candidate's allocated bytes in one layer at bits_ctx tokens (MeasureAllInBits:
//    sinks, tails, scales and norms as the presets count them), as a share of the whole cache's
//    f16 bytes, so a configuration's all-in bits are the sum over layers.
// 3. Selection: SelectBits (Pareto pruning per layer, DP over a 1/16384-bit grid).
// 4. Verification: the chosen configuration's all-in bits measured on the full shape, and its
//    KLD measured jointly on the same calibration chunks, next to the additive prediction.
// The result is a KV config file (kv_config_file.h) with the sensitivities as provenance.
#pragma once

#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "model/model.h"
#include "runner.h"

namespace kvc {

struct BitsCalibOptions {
  double budget = 0;                    // all-in bits per value at bits_ctx tokens
  std::vector<std::string> k_cands, v_cands;
  int64_t n_ctx = 512;                  // tokens per calibration chunk
  int64_t chunks = 2;                   // calibration chunks
  int64_t bits_ctx = 4096;              // context at which the all-in bits are counted
  int sinks = 1;                        // fp16 first tokens, in every run and in the result
  int n_batch = 512;
  std::string text_path, model_path;
  std::string reuse_path;               // earlier output: reuse its sensitivities (same model,
                                        // text, n_ctx, chunks, sinks; candidates a subset of its)
  std::string name;                     // label of the result ("" = bits-<budget>)
};

// Default candidates (7 + 7): keys TurboQuant 2/2.5/3/3.5/4 bits with norm correction, centred
// (pre-RoPE mean removed), KIVI-4 (groups of 64, 64-token fp16 window), q8_0; values TurboQuant
// 1/1.5/2/2.5/3/4 with norm correction, q8_0. q8_0 is also the reference (its excess is 0).
std::vector<std::string> DefaultBitsCandidates(bool keys);
// "k=SPEC;SPEC;... v=SPEC;..." (either part may be left out: the default list is used).
Status ParseBitsCandidates(const std::string& text, std::vector<std::string>* k,
                           std::vector<std::string>* v);
// The PG-19 book used when no --calib-text is given ("" if not found).
std::string DefaultBitsCalibText();

// Runs the search; returns the KV config file's JSON and a human summary (per-layer table).
StatusOr<nlohmann::json> CalibrateBits(const Model& m, const std::vector<int32_t>& tokens,
                                       const BitsCalibOptions& opt, std::string* summary);

}  // namespace kvc
