// Token sampling from logits: greedy (temperature 0) or temperature + nucleus (top-p, Holtzman et
// al., "The Curious Case of Neural Text Degeneration", ICLR 2020, §3.1). One Sampler per request:
// its random state is the request's own (seeded), so a request's tokens do not depend on the other
// requests sharing a batch.
#pragma once

#include <cstdint>
#include <random>
#include <vector>

#include "kvcrunch/status.h"

namespace kvc::engine {

struct SamplingParams {
  float temperature = 1.0f;  // >= 0; 0 = greedy (argmax, lowest id on ties)
  float top_p = 1.0f;        // (0, 1]
  uint64_t seed = 0;         // random state seed
};

// INVALID_ARGUMENT for a temperature < 0 or non-finite, top_p outside (0, 1].
Status ValidateSampling(const SamplingParams& p);

class Sampler {
 public:
  explicit Sampler(const SamplingParams& p);
  // logits [n_vocab] f32 (finite). Returns a token id in [0, n_vocab).
  int32_t Sample(const float* logits, int n_vocab);

 private:
  SamplingParams p_;
  std::mt19937 rng_;
  std::vector<std::pair<float, int32_t>> probs_;  // [n_vocab] scratch
};

}  // namespace kvc::engine
