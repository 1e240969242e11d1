#include "kv/policies/common.h"

#include <algorithm>
#include <cmath>
#include <numeric>

#include <fmt/format.h>

namespace kvc::kv {

int64_t Budget::Kept(int64_t n) const {
  if (n <= 0) return 0;
  if (tokens >= 0) return std::min(n, tokens);
  if (ratio < 0) return n;
  int64_t k = int64_t(std::floor(double(n) * (1.0 - ratio) + 1e-9));
  if (k == 0 && ratio < 1.0) k = 1;  // keep at least one unless asked for none
  return std::clamp<int64_t>(k, 0, n);
}

Status ParseCommon(const CodecSpec& spec, When default_when, CommonParams* p) {
  KVC_ASSIGN_OR_RETURN(int budget, spec.GetInt("budget", -1));
  KVC_ASSIGN_OR_RETURN(double ratio, spec.GetDouble("ratio", -1));
  KVC_ASSIGN_OR_RETURN(double cr, spec.GetDouble("compression_ratio", -1));
  if (cr >= 0) ratio = cr;
  if (spec.params.count("budget") && ratio >= 0) {
    return InvalidArgument(fmt::format("{}: give budget=TOKENS or ratio=FRACTION_REMOVED, not both",
                                       spec.ToString()));
  }
  if (spec.params.count("budget") && budget < 0) {
    return InvalidArgument(fmt::format("{}: budget must be >= 0 tokens", spec.ToString()));
  }
  if ((spec.params.count("ratio") || spec.params.count("compression_ratio")) &&
      !(ratio >= 0 && ratio <= 1)) {
    return InvalidArgument(fmt::format("{}: ratio is the fraction removed, in [0, 1]",
                                       spec.ToString()));
  }
  p->budget.tokens = budget;
  p->budget.ratio = budget >= 0 ? -1 : ratio;
  KVC_ASSIGN_OR_RETURN(std::string when,
                       spec.GetString("when", default_when == When::kStep ? "step" : "prefill"));
  if (when == "prefill") p->when = When::kPrefill;
  else if (when == "step") p->when = When::kStep;
  else return InvalidArgument(fmt::format("{}: when= must be prefill or step", spec.ToString()));
  KVC_ASSIGN_OR_RETURN(p->every, spec.GetInt("every", 0));
  KVC_ASSIGN_OR_RETURN(int target, spec.GetInt("target", -1));
  if (p->every < 0) return InvalidArgument(fmt::format("{}: every must be > 0", spec.ToString()));
  if (p->every > 0) {
    p->when = When::kEvery;
    if (target < 0) target = budget;
    if (target < 0) {
      return InvalidArgument(fmt::format("{}: every=R needs target=TOKENS (or budget=)",
                                         spec.ToString()));
    }
    p->target = target;
  }
  KVC_ASSIGN_OR_RETURN(int sink, spec.GetInt("sink", int(p->sink)));
  if (sink < 0) return InvalidArgument(fmt::format("{}: sink must be >= 0", spec.ToString()));
  p->sink = sink;
  KVC_ASSIGN_OR_RETURN(p->once, spec.GetBool("once", false));
  KVC_ASSIGN_OR_RETURN(std::string pos, spec.GetString("pos", ""));
  if (!pos.empty()) {
    KVC_ASSIGN_OR_RETURN(p->pos, ParsePositionMode(pos));
    p->pos_given = true;
  }
  if (!p->budget.set() && p->when != When::kEvery) {
    return InvalidArgument(fmt::format("{}: needs budget=TOKENS or ratio=FRACTION_REMOVED",
                                       spec.ToString()));
  }
  return Status::Ok();
}

std::vector<int32_t> SelectKeep(const float* scores, int64_t n, int64_t k, int64_t sink,
                                int64_t window) {
  std::vector<int32_t> keep;
  if (k >= n) {
    keep.resize(size_t(n));
    std::iota(keep.begin(), keep.end(), 0);
    return keep;
  }
  if (k <= 0) return keep;
  std::vector<char> mark(size_t(n), 0);
  int64_t cnt = 0;
  for (int64_t i = n - 1; i >= std::max<int64_t>(0, n - window) && cnt < k; --i) {
    mark[i] = 1;
    ++cnt;
  }
  for (int64_t i = 0; i < std::min(sink, n) && cnt < k; ++i) {
    if (!mark[i]) { mark[i] = 1; ++cnt; }
  }
  std::vector<int32_t> cand;
  for (int64_t i = 0; i < n; ++i) if (!mark[i]) cand.push_back(int32_t(i));
  auto sc = [&](int32_t i) {
    const float s = scores[i];
    return std::isnan(s) ? -INFINITY : s;
  };
  const int64_t need = std::min<int64_t>(k - cnt, int64_t(cand.size()));
  // Higher score first; among equal scores the newer (higher index) first: evict the oldest.
  std::partial_sort(cand.begin(), cand.begin() + need, cand.end(), [&](int32_t a, int32_t b) {
    const float x = sc(a), y = sc(b);
    return x > y || (x == y && a > b);
  });
  for (int64_t j = 0; j < need; ++j) mark[cand[j]] = 1;
  for (int64_t i = 0; i < n; ++i) if (mark[i]) keep.push_back(int32_t(i));
  return keep;
}

Status ApplyKeep(KvCache& cache, int layer, int head, const std::vector<int32_t>& keep) {
  KVC_RETURN_IF_ERROR(cache.Keep(layer, head, keep));
  if (cache.config().position_mode == PositionMode::kRerotateOnce) {
    const auto& pos = cache.positions(layer, head);
    const int64_t k = int64_t(pos.size());
    std::vector<int64_t> np(static_cast<size_t>(k));
    std::iota(np.begin(), np.end(), int64_t(0));
    if (np != pos) KVC_RETURN_IF_ERROR(cache.Relabel(layer, head, np));
    cache.set_pos_shift(layer, head, cache.n_consumed() - k);
  }
  return Status::Ok();
}

double RemovedFraction(const KvCache& cache) {
  const auto& s = cache.shape();
  const double total = double(cache.n_consumed()) * s.n_layer * s.n_head_kv;
  if (total <= 0) return 0;
  double cells = 0;
  for (int l = 0; l < s.n_layer; ++l) {
    for (int h = 0; h < s.n_head_kv; ++h) cells += double(cache.n_cells(l, h));
  }
  return 1.0 - cells / total;
}

int64_t ScoredPolicy::ResolvedBudget(int64_t n) const {
  if (fixed_budget_ >= 0) return fixed_budget_;
  return p_.budget.Kept(n);
}

int64_t ScoredPolicy::LayerTarget(int layer, int64_t n, int64_t budget_tokens) const {
  return budget_tokens;
}

Status ScoredPolicy::CompressLayer(KvCache& cache, int layer, int64_t target) {
  std::vector<float> s;
  for (int h = 0; h < cache.shape().n_head_kv; ++h) {
    const int64_t n = cache.n_cells(layer, h);
    if (n <= target) continue;
    s.assign(size_t(n), 0.f);
    Score(cache, layer, h, &s);
    KVC_RETURN_IF_ERROR(
        ApplyKeep(cache, layer, h, SelectKeep(s.data(), n, target, p_.sink, p_.window)));
  }
  return Status::Ok();
}

Status ScoredPolicy::CompressAll(KvCache& cache, int64_t reserve, bool use_target) {
  const auto& shape = cache.shape();
  for (int l = 0; l < shape.n_layer; ++l) {
    int64_t n = 0;
    for (int h = 0; h < shape.n_head_kv; ++h) n = std::max(n, cache.n_cells(l, h));
    if (n == 0) continue;
    int64_t target = use_target ? p_.target : LayerTarget(l, n, ResolvedBudget(n));
    target = std::max<int64_t>(0, target - reserve);
    if (n > target) KVC_RETURN_IF_ERROR(CompressLayer(cache, l, target));
  }
  return Status::Ok();
}

Status ScoredPolicy::LoadState(const std::vector<int64_t>& state) {
  if (state.size() != 3) {
    return InvalidArgument(fmt::format("policy {}: saved state has {} values, expected 3", Name(),
                                       state.size()));
  }
  fixed_budget_ = state[0];
  steps_ = state[1];
  prompts_ = state[2];
  return Status::Ok();
}

Status ScoredPolicy::BeforeWrite(KvCache& cache, int n_incoming) {
  if (p_.when == When::kStep && fixed_budget_ < 0 && p_.budget.tokens >= 0) {
    fixed_budget_ = p_.budget.tokens;
    cache.SetStorageLimit(fixed_budget_);
  }
  if (p_.when == When::kStep && fixed_budget_ >= 0 && n_incoming <= fixed_budget_) {
    return CompressAll(cache, n_incoming, false);
  }
  return Status::Ok();
}

Status ScoredPolicy::AfterPrefill(KvCache& cache, int n_prompt) {
  if (n_prompt <= 0) return InvalidArgument(Name() + ": empty prompt (nothing to compress)");
  if (p_.once && prompts_++ > 0) return Status::Ok();
  switch (p_.when) {
    case When::kPrefill:
      return CompressAll(cache, 0, false);
    case When::kStep:
      if (fixed_budget_ < 0) {
        fixed_budget_ = p_.budget.Kept(cache.n_consumed());
        cache.SetStorageLimit(fixed_budget_);
      }
      return CompressAll(cache, 0, false);
    case When::kEvery:
      return Status::Ok();  // kvpress DecodingPress: the prompt is left whole
  }
  return Status::Ok();
}

int64_t ScoredPolicy::MaxCells(int64_t n_prompt, int64_t n_total, int chunk) const {
  if (p_.when != When::kStep) return n_total;
  if (p_.budget.tokens >= 0) {
    const int64_t b = p_.budget.tokens;
    return std::min(n_total, chunk <= b ? std::max<int64_t>(b, 1) : std::max(b, n_prompt));
  }
  return std::min(n_total, std::max<int64_t>(n_prompt, 1));
}

Status ScoredPolicy::AfterStep(KvCache& cache) {
  if (p_.when == When::kStep) {
    if (fixed_budget_ < 0) {  // a one-token first prompt
      fixed_budget_ = p_.budget.tokens >= 0 ? p_.budget.tokens : p_.budget.Kept(cache.n_consumed());
      cache.SetStorageLimit(fixed_budget_);
    }
    return CompressAll(cache, 0, false);
  }
  if (p_.when == When::kEvery && ++steps_ % p_.every == 0) return CompressAll(cache, 0, true);
  return Status::Ok();
}

}  // namespace kvc::kv
