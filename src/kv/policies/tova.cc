#include "kv/policies/tova.h"

#include <cmath>
#include <cstdio>
#include <cstdlib>

#include <fmt/format.h>

#include "kv/policies/common.h"

namespace kvc::kv {
namespace {

class TovaPolicy : public ScoredPolicy {
 public:
  explicit TovaPolicy(CommonParams p) : ScoredPolicy(std::move(p)) {}
  std::string Name() const override { return "tova"; }
  AttnStatsRequest StatsNeeded() const override {
    AttnStatsRequest r;
    r.obs_window = 1;
    return r;
  }
  void Score(KvCache& cache, int layer, int head, std::vector<float>* s) override {
    const int64_t n = int64_t(s->size());
    const int nkv = cache.shape().n_head_kv;
    bool shared = true;
    for (int h = 0; h < nkv; ++h) shared = shared && cache.n_cells(layer, h) == n;
    std::fill(s->begin(), s->end(), 0.f);
    int used = 0;
    for (int h = 0; h < nkv; ++h) {
      if (!shared && h != head) continue;
      const auto& obs = cache.obs_scores(layer, h);
      for (int64_t i = 0; i < n; ++i) (*s)[i] += i < int64_t(obs.size()) ? obs[i] : INFINITY;
      ++used;
    }
    for (auto& x : *s) x /= float(used);
  }
  // One decision per layer (kvpress TOVAPress): score once from the mean over every query head,
  // *then* apply the same kept set to every KV head. (Scoring head by head after compressing the
  // earlier ones made heads 1.. see unequal cell counts and fall back to their own group's row.)
  // Heads that already differ (not reachable through this policy alone) keep per-head scores.
  Status CompressLayer(KvCache& cache, int layer, int64_t target) override {
    const int nkv = cache.shape().n_head_kv;
    const int64_t n = cache.n_cells(layer, 0);
    for (int h = 1; h < nkv; ++h) {
      if (cache.n_cells(layer, h) != n || cache.seqs(layer, h) != cache.seqs(layer, 0)) {
        return ScoredPolicy::CompressLayer(cache, layer, target);
      }
    }
    if (n <= target) return Status::Ok();
    std::vector<float> s(size_t(n), 0.f);
    Score(cache, layer, 0, &s);
    const std::vector<int32_t> keep = SelectKeep(s.data(), n, target, p_.sink, p_.window);
    if (const char* dump = std::getenv("KVC_TOVA_DUMP")) DumpLayer(dump, cache, layer, s, keep);
    for (int h = 0; h < nkv; ++h) KVC_RETURN_IF_ERROR(ApplyKeep(cache, layer, h, keep));
    return Status::Ok();
  }

 private:
  // Debug (KVC_TOVA_DUMP=FILE): appends one JSON line per compressed layer: the layer's score per
  // cell (with its sequence position) and the kept cell indices. Off the hot path: once per layer
  // per compression, and only when the variable is set.
  static void DumpLayer(const char* path, const KvCache& cache, int layer,
                        const std::vector<float>& s, const std::vector<int32_t>& keep) {
    std::FILE* f = std::fopen(path, "a");
    if (!f) return;
    const auto& seq = cache.seqs(layer, 0);
    std::fprintf(f, "{\"layer\":%d,\"n_consumed\":%lld,\"seq\":[", layer,
                 (long long)cache.n_consumed());
    for (size_t i = 0; i < seq.size(); ++i) std::fprintf(f, "%s%lld", i ? "," : "", (long long)seq[i]);
    std::fprintf(f, "],\"score\":[");
    for (size_t i = 0; i < s.size(); ++i) std::fprintf(f, "%s%.9g", i ? "," : "", s[i]);
    std::fprintf(f, "],\"keep\":[");
    for (size_t i = 0; i < keep.size(); ++i) std::fprintf(f, "%s%d", i ? "," : "", keep[i]);
    std::fprintf(f, "]}\n");
    std::fclose(f);
  }
};

}  // namespace

StatusOr<std::unique_ptr<EvictionPolicy>> MakeTovaPolicy(const CodecSpec& spec, const KvShape&) {
  CommonParams p;
  KVC_RETURN_IF_ERROR(ParseCommon(spec, When::kStep, &p));
  KVC_ASSIGN_OR_RETURN(int window, spec.GetInt("window", 0));
  KVC_RETURN_IF_ERROR(spec.CheckAllUsed());
  if (window < 0) return InvalidArgument(fmt::format("{}: window must be >= 0", spec.ToString()));
  p.window = window;
  return std::unique_ptr<EvictionPolicy>(new TovaPolicy(p));
}

}  // namespace kvc::kv
