// The Llama-family forward pass over a batch of sequences (DESIGN.md "One forward, many
// sequences"): the weight matmuls run once over the rows of every sequence in the batch; attention
// runs per sequence through that sequence's own KvCache (its codecs, transforms, positions), so
// sequences with different KV configurations share one batch.
//
// Batch invariance (tested, engine_model_test): a sequence's logits do not depend on which other
// sequences share its batch. It holds by construction: every row's matmul output is computed by one
// thread from that row's activations alone (per-row int8 activation scales, integer block sums,
// the same float accumulation order for any number of rows: cpu/ops.h MatMul), RMSNorm and SwiGLU
// are row-wise, and attention reads only the sequence's own cache.
#pragma once

#include <cstdint>
#include <vector>

#include "kv/cache.h"
#include "kvcrunch/status.h"

namespace kvc {

class Model;

// One sequence's share of a forward step.
struct SeqRows {
  kv::KvCache* cache = nullptr;  // the sequence's cache (written and attended); not owned
  const int32_t* tokens = nullptr;  // [n_tokens] ids in [0, n_vocab) (checked by the caller)
  int n_tokens = 0;
  int64_t seq0 = 0;         // stream index of tokens[0] (tokens already consumed by the cache)
  bool all_logits = false;  // logits rows: all n_tokens (true) or the last token only
  float* logits = nullptr;  // null: no logits; else [all_logits ? n_tokens : 1, n_vocab] f32
  Status status;            // out: OK, or INVALID_ARGUMENT (non-finite activations / logits)
};

// Reusable activation buffers, sized to the largest batch seen ([n_rows, ...] f32).
struct ForwardScratch {
  std::vector<float> x, h, q, k, v, attn, tmp, gate, up, logit_in;
};

// Runs every layer for all rows of `seqs`. A sequence whose cache refuses its K/V (NaN/inf
// activations) gets a non-OK status and takes no further part (its cache is then partly written:
// the caller drops or resets it); the other sequences are unaffected. Never fails as a whole.
void ForwardBatch(const Model& model, std::vector<SeqRows>& seqs, ForwardScratch* scratch);

}  // namespace kvc
