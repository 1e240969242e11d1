// KVQuant calibration (Hooper et al., "KVQuant", 2024, §3.1-3.4: per-channel pre-RoPE key
// ranges, per-layer non-uniform codebooks, outliers) collected from the real model over a PG-19
// book — text disjoint from the WikiText-2 evaluation text — and saved next to the model.
#pragma once

#include <string>
#include <vector>

#include "kv/codecs/kvquant.h"
#include "calibrate.h"
#include "model/model.h"
#include "runner.h"

namespace kvc {

// Runs `n_chunks` chunks of `n_ctx` tokens of `toks` through an f32 cache and returns the pre-RoPE
// keys and the values per layer: k[l], v[l] [n_tokens · n_head_kv · head_dim] f32 (token 0 of
// each chunk, the attention sink, left out). INVALID_ARGUMENT if toks is shorter than
// n_chunks · n_ctx.
StatusOr<kv::KvQuantSamples> CollectKvQuantSamples(const Model& m, const std::vector<int32_t>& toks,
                                                   int n_ctx, int n_chunks, const std::string& source);

// The calibration file beside the model: <model path without .gguf>.kvquant.json.
std::string KvQuantCalibrationPath(const std::string& model_path);

// If any configuration uses a kvquant codec without `calib=` and KVC_KVQUANT_CALIB is unset:
// uses the calibration file beside the model, creating it first when missing (2 × 1,024 tokens of
// PG-19 "Pride and Prejudice", ~10 s), then points KVC_KVQUANT_CALIB at it. Returns the path used
// ("" when no configuration needs one). NOT_FOUND when the book is missing.
// Also calls EnsurePredictCalibration (every caller that prepares KVQuant calibration prepares the
// predictive-coding file too).
StatusOr<std::string> EnsureKvQuantCalibration(const Model& m, const std::string& model_path,
                                               const std::vector<KvRunConfig>& configs);

// The predictive-coding file beside the model: <model path without .gguf>.predict.kvc.
std::string PredictCalibrationPath(const std::string& model_path);

// If any configuration says `predict=auto` (the presets do) and KVC_PREDICT_AUTO is unset (or was
// set by an earlier call of this function, maybe for another model): uses
// the predictor file beside the model, creating it first when missing (what `kvcrunch calibrate
// --method predict -f <PG-19 Pride and Prejudice> -c 1024 --max-tokens 32768` writes: 32 × 1,024
// tokens, disjoint from the WikiText-2 evaluation text; 2.5 min on 2 idle cores), then points KVC_PREDICT_AUTO at it (KvCache resolves "auto" there).
// INVALID_ARGUMENT when the existing file was made for another model; NOT_FOUND when the book is
// missing. Returns the path used ("" when no configuration needs one).
StatusOr<std::string> EnsurePredictCalibration(const Model& m, const std::string& model_path,
                                               const std::vector<KvRunConfig>& configs);

}  // namespace kvc
