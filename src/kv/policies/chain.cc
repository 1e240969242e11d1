#include "kv/policies/chain.h"

#include <algorithm>
#include <sstream>
#include <vector>

#include <fmt/format.h>

namespace kvc::kv {
namespace {

class ChainPolicy : public EvictionPolicy {
 public:
  explicit ChainPolicy(std::vector<std::unique_ptr<EvictionPolicy>> s) : stages_(std::move(s)) {}
  std::string Name() const override {
    std::string n;
    for (const auto& s : stages_) n += (n.empty() ? "" : "+") + s->Name();
    return n;
  }
  AttnStatsRequest StatsNeeded() const override {
    AttnStatsRequest r;
    for (const auto& s : stages_) {
      const auto q = s->StatsNeeded();
      r.accumulate = r.accumulate || q.accumulate;
      r.obs_window = std::max(r.obs_window, q.obs_window);
    }
    return r;
  }
  PositionMode position_mode() const override {
    for (const auto& s : stages_) {
      if (s->position_mode() != PositionMode::kOriginal) return s->position_mode();
    }
    return PositionMode::kOriginal;
  }
  Status BeforeWrite(KvCache& c, int n) override {
    for (auto& s : stages_) KVC_RETURN_IF_ERROR(s->BeforeWrite(c, n));
    return Status::Ok();
  }
  Status AfterPrefill(KvCache& c, int n) override {
    for (auto& s : stages_) KVC_RETURN_IF_ERROR(s->AfterPrefill(c, n));
    return Status::Ok();
  }
  Status AfterStep(KvCache& c) override {
    for (auto& s : stages_) KVC_RETURN_IF_ERROR(s->AfterStep(c));
    return Status::Ok();
  }
  // Per stage: its value count, then its values.
  std::vector<int64_t> SaveState() const override {
    std::vector<int64_t> out;
    for (auto& s : stages_) {
      auto v = s->SaveState();
      out.push_back(int64_t(v.size()));
      out.insert(out.end(), v.begin(), v.end());
    }
    return out;
  }
  Status LoadState(const std::vector<int64_t>& state) override {
    size_t i = 0;
    for (auto& s : stages_) {
      if (i >= state.size() || state[i] < 0 || size_t(state[i]) > state.size() - i - 1) {
        return InvalidArgument("policy chain: malformed saved state");
      }
      std::vector<int64_t> v(state.begin() + i + 1, state.begin() + i + 1 + state[i]);
      i += 1 + size_t(state[i]);
      KVC_RETURN_IF_ERROR(s->LoadState(v));
    }
    if (i != state.size()) return InvalidArgument("policy chain: malformed saved state");
    return Status::Ok();
  }

 private:
  std::vector<std::unique_ptr<EvictionPolicy>> stages_;
};

}  // namespace

StatusOr<std::unique_ptr<EvictionPolicy>> MakeChainPolicy(const std::string& text,
                                                           const KvShape& shape) {
  std::vector<std::unique_ptr<EvictionPolicy>> stages;
  std::stringstream ss(text);
  std::string part;
  while (std::getline(ss, part, '+')) {
    if (part.empty() || part.find('+') != std::string::npos) {
      return InvalidArgument(fmt::format("empty stage in policy chain '{}'", text));
    }
    auto p = MakePolicy(part, shape);
    if (!p.ok()) return p.status();
    if (!*p) return InvalidArgument(fmt::format("stage 'none' in policy chain '{}'", text));
    stages.push_back(std::move(p).value());
  }
  if (stages.size() < 2) return InvalidArgument(fmt::format("policy chain '{}' needs 2+ stages", text));
  return std::unique_ptr<EvictionPolicy>(new ChainPolicy(std::move(stages)));
}

}  // namespace kvc::kv
