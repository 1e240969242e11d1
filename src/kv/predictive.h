// Predictive KV coding (the AQUA-KV recipe): each layer's keys and values are predicted by small
// linear maps from KV the cache has already reconstructed, and only the residual is stored by the
// layer's codec.
//
// Paper: Shutova et al., "Cache Me If You Must: Adaptive Key-Value Quantization for Large Language
// Models" (AQUA-KV), ICML 2025, arXiv 2501.19392, §3 (inter-layer predictors: a layer's keys from
// the previous layer's reconstructed keys, its values from the previous layer's reconstructed
// values and the same layer's reconstructed keys; the residual is quantized; predictors are fitted
// by least squares on calibration activations, one-shot). Summarised with its numbers in
// ../shared/docs/ref-lowbit-eviction.md §1 and §4 point 3. Differences from the paper: the residual
// goes to any per-token kvcrunch codec (TurboQuant: Haar rotation + Lloyd–Max, instead of HIGGS
// Hadamard + vector grid); predictors are fitted on clean (unquantized) activations with a small
// ridge term; keys are predicted and stored BEFORE RoPE (a linear map across layers is only
// position-independent there).
//
// Map, per layer l, with D_k = n_head_kv·head_dim and D_v = n_head_kv·head_dim_v (all KV heads of
// a layer together: a head of layer l draws on every head of layer l−1):
//   K̃_l = [K̂_{l−1}, V̂_{l−1}, 1] · W_k[l]          W_k[l] [D_k + D_v + 1, D_k]         (l ≥ 1)
//   Ṽ_l = [K̂_{l−1}, V̂_{l−1}, K̂_l, 1] · W_v[l]    W_v[l] [D_k + D_v + D_k + 1, D_v]   (l ≥ 1)
//   K̃_0 = 0,  Ṽ_0 = [K̂_0, 1] · W_v[0]            W_v[0] [D_k + 1, D_v]
//   stored: K_l − K̃_l and V_l − Ṽ_l (pre-RoPE keys), reconstructed K̂_l = K̃_l + decode(stored).
// AQUA-KV predicts keys from the previous layer's keys and values from the previous layer's values
// and the current keys; giving each predictor the whole previous layer (K and V) explains more of
// SmolLM2's variance out of sample (PG-19, mean over layers 1–29: keys 74.5 % → 82.0 %, values
// 76.7 % → 84.3 %; docs/quantization-advanced.md "Predictive coding").
// Closed loop: predictions use reconstructed (decoded) inputs, as the decoder sees them, so the
// error of K̂_l is the codec's error on the residual only; errors do not accumulate over layers.
// Tokens in the cache's sink segment (`sinks=N`, the attention sinks) are stored as they are
// (prediction 0): their massive activations are outside what the predictors were fitted on.
//
// File: a kvcrunch calibration file (calibration_file.h) with meta kind "kv-predict" and tensors
// "predict.k.L<l>" (l = 1..n_layer−1) and "predict.v.L<l>" (l = 0..n_layer−1), row-major [in, out]
// f32 as above, written by `kvcrunch calibrate --method predict` on text disjoint from the
// evaluation text.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "kv/cache.h"
#include "kv/calibration_file.h"

namespace kvc::kv {

class KvPredictor {
 public:
  // Validates every tensor against the shape: INVALID_ARGUMENT on a file for another shape
  // (n_layer, n_head_kv, head_dim, head_dim_v in its meta or tensor sizes), a missing tensor, a
  // non-finite weight, or a file of another kind.
  static StatusOr<std::shared_ptr<const KvPredictor>> FromFile(const CalibrationFile& f,
                                                               const KvShape& shape,
                                                               const std::string& path);
  // Loads (shared per path, size and mtime: calibration_file.h) and validates. "auto": the file
  // named by env KVC_PREDICT_AUTO (set by the CLI's EnsurePredictCalibration); INVALID_ARGUMENT
  // when unset.
  static StatusOr<std::shared_ptr<const KvPredictor>> Load(const std::string& path,
                                                           const KvShape& shape);

  int n_layer() const { return n_layer_; }
  int dk() const { return dk_; }
  int dv() const { return dv_; }
  // Input widths of W_k[l] / W_v[l] (bias row included).
  int InK(int l) const { return l == 0 ? 0 : dk_ + dv_ + 1; }
  int InV(int l) const { return l == 0 ? dk_ + 1 : dk_ + dv_ + dk_ + 1; }
  // out [n, D_k] = [prev_k [n, D_k], prev_v [n, D_v], 1] · W_k[l]; l ≥ 1.
  void PredictK(int l, const float* prev_k, const float* prev_v, int64_t n, float* out) const;
  // out [n, D_v] = [prev_k, prev_v, k [n, D_k], 1] · W_v[l] (prev_* ignored at l = 0).
  void PredictV(int l, const float* prev_k, const float* prev_v, const float* k, int64_t n,
                float* out) const;
  size_t ParamBytes() const;

  // Tensors as written by calibration: W [in, out] row-major.
  std::vector<std::vector<float>> wk, wv;  // [n_layer]; wk[0] empty

 private:
  int n_layer_ = 0, dk_ = 0, dv_ = 0;
};

// Least-squares fit from accumulated second moments (calibrate --method predict).
// g [in, in] = Σ x xᵀ and c [in, out] = Σ x yᵀ over the calibration rows, x's last entry the
// constant 1. Ridge: λ · mean(diag(g) without the bias) added to the non-bias diagonal.
// Returns W [in, out] row-major. INVALID_ARGUMENT when the system is singular or not finite.
StatusOr<std::vector<float>> SolveRidge(const std::vector<double>& g, const std::vector<double>& c,
                                        int in, int out, double lambda);

}  // namespace kvc::kv
