// Per-layer (K codec, V codec) choice under an all-in bits-per-value budget: the selection step of
// `kvcrunch calibrate --method bits` (calibrate_bits.cc measures the inputs).
//
// Idea from KVTuner (Li et al., "KVTuner: Sensitivity-Aware Layer-Wise Mixed-Precision KV Cache
// Quantization for Efficient and Nearly Lossless LLM Inference", ICML 2025, PMLR 267:36451-36485,
// arXiv 2502.04420; its offline search: per-layer (K, V) precision pairs, intra-layer pruning of
// dominated pairs, inter-layer clustering, multi-objective optimization; code cmd2001/KVTuner). What differs here: KVTuner clusters layers and runs a multi-objective evolutionary search
// because each of its candidate evaluations is a full model run; with an *additive* loss model
// (per-layer sensitivities measured one layer at a time, summed) the budgeted choice is a
// multiple-choice knapsack that a DP over a fine bit grid solves exactly, so no clustering is
// needed at 30 layers. The additive model is an approximation (layers interact); the caller
// measures the chosen configuration jointly and reports the gap.
//
// Units: a candidate's cost is its contribution to the whole cache's all-in bits per value
// (16 · its allocated bytes in one layer / f16 bytes of the whole cache), so a configuration's
// all-in bits are the sum of its per-layer K and V costs. Loss: any additive per-layer loss
// (calibrate uses mean KL divergence vs the f16 cache on calibration text).
#pragma once

#include <string>
#include <vector>

#include "kvcrunch/status.h"

namespace kvc {

struct BitsProblem {
  std::vector<double> k_cost;                  // [n_k] all-in bits contribution of one layer's K
  std::vector<double> v_cost;                  // [n_v]
  std::vector<std::vector<double>> k_loss;     // [n_layer][n_k] loss when only that layer's K uses it
  std::vector<std::vector<double>> v_loss;     // [n_layer][n_v]
  double budget = 0;                           // all-in bits per value, the sum of costs must be <=
  int grid = 16384;                            // cost grid: units of 1/grid bit (costs rounded up)
};

struct BitsChoice {
  std::vector<int> k, v;       // [n_layer] chosen candidate indices
  double cost = 0;             // Σ exact (unrounded) costs: all-in bits per value predicted
  double loss = 0;             // Σ per-layer losses: the additive prediction
  int pairs_total = 0;         // (K, V) pairs over all layers before pruning
  int pairs_kept = 0;          // after removing dominated pairs (per layer)
};

// Per layer, the (K, V) pairs not dominated by another pair of the same layer (another pair with
// cost <= and loss <=, one strictly; of exact ties the first in (k, v) order is kept). Returned as
// k * n_v + v indices, sorted by cost. Exposed for the tests.
std::vector<std::vector<int>> ParetoPairs(const BitsProblem& p);

// The pair per layer minimizing Σ loss subject to Σ cost <= budget. Exact for the costs rounded up
// to the grid (so the budget is never exceeded); a mix whose exact cost fits but whose rounded
// cost does not is missed, which can cost at most n_layer / grid bits of budget.
// INVALID_ARGUMENT: sizes disagree, empty candidate lists, a cost or loss NaN/inf/negative, a
// budget no mix fits (the message gives the cheapest mix's bits).
StatusOr<BitsChoice> SelectBits(const BitsProblem& p);

}  // namespace kvc
