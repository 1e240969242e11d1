#include "engine/sampler.h"

#include <algorithm>
#include <cmath>

namespace kvc::engine {

Status ValidateSampling(const SamplingParams& p) {
  if (!(p.temperature >= 0) || !std::isfinite(p.temperature)) {
    return InvalidArgument("temperature must be a finite number >= 0 (0 = greedy)");
  }
  if (!(p.top_p > 0 && p.top_p <= 1)) return InvalidArgument("top_p must be in (0, 1]");
  return Status::Ok();
}

Sampler::Sampler(const SamplingParams& p) : p_(p), rng_(uint32_t(p.seed ^ (p.seed >> 32))) {}

int32_t Sampler::Sample(const float* logits, int n_vocab) {
  if (p_.temperature <= 0) {
    return int32_t(std::max_element(logits, logits + n_vocab) - logits);  // first max on ties
  }
  // Softmax at temperature T, then the smallest prefix of tokens (by probability, ties by id)
  // whose mass reaches top_p, then one draw from that prefix.
  probs_.resize(size_t(n_vocab));
  const float mx = *std::max_element(logits, logits + n_vocab);
  double sum = 0;
  for (int v = 0; v < n_vocab; ++v) {
    probs_[v] = {float(std::exp((logits[v] - mx) / p_.temperature)), v};
    sum += probs_[v].first;
  }
  auto by_prob = [](const auto& a, const auto& b) {
    return a.first > b.first || (a.first == b.first && a.second < b.second);
  };
  double cum = 0;
  size_t keep = 0;
  if (p_.top_p >= 1) {
    keep = probs_.size();
    cum = sum;
    std::sort(probs_.begin(), probs_.end(), by_prob);
  } else {
    std::sort(probs_.begin(), probs_.end(), by_prob);
    while (keep < probs_.size() && cum < p_.top_p * sum) cum += probs_[keep++].first;
  }
  std::uniform_real_distribution<double> u(0, cum);
  const double r = u(rng_);
  double acc = 0;
  for (size_t j = 0; j < keep; ++j) {
    acc += probs_[j].first;
    if (acc >= r) return probs_[j].second;
  }
  return probs_[keep - 1].second;
}

}  // namespace kvc::engine
