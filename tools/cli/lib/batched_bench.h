// `kvcrunch batched-bench`: aggregate decode throughput of B sequences advancing together, with
// llama.cpp's llama-batched-bench protocol and columns (examples/batched-bench: no shared prompt,
// N_KV = B·(PP + TG)), through the engine's batched forward pass (model/forward.h): each of B
// sequences gets PP random prompt tokens (prefilled together, as one batch per n_batch rows), then
// TG decode steps of B rows each. S_TG = B·TG / T_TG is the aggregate decode rate.
#pragma once

#include <string>
#include <vector>

#include "model/model.h"
#include "runner.h"

namespace kvc {

struct BatchedBenchOptions {
  std::vector<int> npp = {512};             // prompt tokens per sequence
  std::vector<int> ntg = {128};             // generated tokens per sequence
  std::vector<int> npl = {1, 2, 4, 8, 16};  // sequences in the batch
  int n_batch = 2048;                       // rows per prefill forward
  int reps = 1;                             // repetitions per row (median reported)
};

// Prints a markdown table (or JSON lines). INVALID_ARGUMENT for out-of-range options.
Status RunBatchedBench(const Model& model, const KvRunConfig& rc, const BatchedBenchOptions& o,
                       bool json);

}  // namespace kvc
