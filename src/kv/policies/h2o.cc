#include "kv/policies/h2o.h"

#include <cmath>

#include <fmt/format.h>

#include "kv/policies/common.h"

namespace kvc::kv {
namespace {

class H2oPolicy : public ScoredPolicy {
 public:
  H2oPolicy(CommonParams p, double heavy, double recent)
      : ScoredPolicy(std::move(p)), heavy_(heavy), recent_(recent) {
    if (heavy_ >= 1 && recent_ >= 1) Resolve(0);
  }
  std::string Name() const override { return fmt::format("h2o:heavy={},recent={}", heavy_, recent_); }
  AttnStatsRequest StatsNeeded() const override {
    AttnStatsRequest r;
    r.accumulate = true;
    return r;
  }
  void Score(KvCache& cache, int layer, int head, std::vector<float>* s) override {
    const auto& acc = cache.acc_scores(layer, head);
    for (size_t i = 0; i < s->size() && i < acc.size(); ++i) (*s)[i] = acc[i];
  }
  Status AfterPrefill(KvCache& cache, int n_prompt) override {
    if (n_prompt <= 0) return InvalidArgument("h2o: empty prompt");
    if (!p_.budget.set()) Resolve(n_prompt);
    return ScoredPolicy::AfterPrefill(cache, n_prompt);
  }
  Status AfterStep(KvCache& cache) override {
    if (!p_.budget.set()) Resolve(cache.n_consumed());
    return ScoredPolicy::AfterStep(cache);
  }

 private:
  void Resolve(int64_t n_prompt) {
    auto count = [&](double x) {
      return x >= 1 ? int64_t(x) : int64_t(std::floor(x * double(n_prompt) + 1e-9));
    };
    const int64_t h = count(heavy_), r = count(recent_);
    p_.window = r;
    p_.budget.tokens = std::max<int64_t>(h + r, (heavy_ + recent_ > 0) ? 1 : 0);
  }
  double heavy_, recent_;
};

}  // namespace

StatusOr<std::unique_ptr<EvictionPolicy>> MakeH2oPolicy(const CodecSpec& spec, const KvShape&) {
  // H2O's budget is heavy + recent (fractions of the prompt, or tokens); a plain budget= or
  // ratio= would be silently ignored, so refuse it with the right spelling.
  for (const char* k : {"budget", "ratio", "compression_ratio"}) {
    if (spec.params.count(k)) {
      return InvalidArgument(fmt::format("{}: h2o takes heavy= and recent= (fractions of the prompt "
                                         "when < 1, tokens when >= 1), not {}=", spec.ToString(), k));
    }
  }
  KVC_ASSIGN_OR_RETURN(double heavy, spec.GetDouble("heavy", 0.1));
  KVC_ASSIGN_OR_RETURN(double recent, spec.GetDouble("recent", 0.1));
  if (!(heavy >= 0) || !(recent >= 0)) {
    return InvalidArgument(fmt::format("{}: heavy and recent must be >= 0 (fractions of the prompt "
                                       "when < 1, tokens when >= 1)", spec.ToString()));
  }
  CommonParams p;
  p.budget.tokens = 0;  // placeholder so ParseCommon accepts the spec; resolved below
  CodecSpec rest = spec;
  rest.params.erase("heavy");
  rest.params.erase("recent");
  rest.params["budget"] = "0";
  KVC_RETURN_IF_ERROR(ParseCommon(rest, When::kStep, &p));
  KVC_RETURN_IF_ERROR(rest.CheckAllUsed());
  p.budget = Budget{};  // resolved from heavy/recent
  return std::unique_ptr<EvictionPolicy>(new H2oPolicy(p, heavy, recent));
}

}  // namespace kvc::kv
