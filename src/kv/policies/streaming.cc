#include "kv/policies/streaming.h"

#include <algorithm>

#include <fmt/format.h>

#include "kv/policies/common.h"

namespace kvc::kv {
namespace {

class StreamingPolicy : public EvictionPolicy {
 public:
  StreamingPolicy(int64_t sink, int64_t window, PositionMode pos)
      : sink_(sink), window_(window), pos_(pos) {}
  std::string Name() const override {
    return fmt::format("streaming:sink={},window={}", sink_, window_);
  }
  PositionMode position_mode() const override { return pos_; }
  Status BeforeWrite(KvCache& cache, int n_incoming) override {
    // Room for the incoming tokens, but never at the sinks' expense (a batch as large as the
    // budget used to evict the sinks too).
    return Trim(cache, std::max<int64_t>(sink_, sink_ + window_ - n_incoming));
  }
  Status AfterPrefill(KvCache& cache, int n_prompt) override {
    if (n_prompt <= 0) return InvalidArgument("streaming: empty prompt");
    return Trim(cache, sink_ + window_);
  }
  Status AfterStep(KvCache& cache) override { return Trim(cache, sink_ + window_); }
  // Room is made before each write: at most S + W cells, or S + a chunk larger than W.
  int64_t MaxCells(int64_t n_prompt, int64_t n_total, int chunk) const override {
    return std::min(n_total, std::max(sink_ + window_, sink_ + int64_t(chunk)));
  }
  std::vector<int64_t> SaveState() const override { return {limit_set_ ? 1 : 0}; }
  Status LoadState(const std::vector<int64_t>& state) override {
    if (state.size() != 1) return InvalidArgument("streaming: saved state must hold 1 value");
    limit_set_ = state[0] != 0;
    return Status::Ok();
  }

 private:
  // Keeps sinks then the most recent tokens, at most `cap` per (layer, head).
  Status Trim(KvCache& cache, int64_t cap) {
    if (!limit_set_) {
      cache.SetStorageLimit(sink_ + window_);
      limit_set_ = true;
    }
    const auto& s = cache.shape();
    for (int l = 0; l < s.n_layer; ++l) {
      for (int h = 0; h < s.n_head_kv; ++h) {
        const int64_t n = cache.n_cells(l, h);
        if (n <= cap) continue;
        std::vector<int32_t> keep;
        const int64_t ns = std::min(sink_, cap);
        for (int64_t i = 0; i < ns; ++i) keep.push_back(int32_t(i));
        for (int64_t i = std::max(ns, n - (cap - ns)); i < n; ++i) keep.push_back(int32_t(i));
        KVC_RETURN_IF_ERROR(ApplyKeep(cache, l, h, keep));
      }
    }
    return Status::Ok();
  }
  int64_t sink_, window_;
  PositionMode pos_;
  bool limit_set_ = false;
};

}  // namespace

StatusOr<std::unique_ptr<EvictionPolicy>> MakeStreamingPolicy(const CodecSpec& spec,
                                                               const KvShape& shape) {
  KVC_ASSIGN_OR_RETURN(int sink, spec.GetInt("sink", 4));
  KVC_ASSIGN_OR_RETURN(int window, spec.GetInt("window", 1020));
  KVC_ASSIGN_OR_RETURN(std::string pos, spec.GetString("pos", "in-cache"));
  KVC_RETURN_IF_ERROR(spec.CheckAllUsed());
  if (sink < 0 || window < 0 || sink + window < 1) {
    return InvalidArgument(fmt::format(
        "{}: need sink >= 0, window >= 0 and sink + window >= 1 (e.g. streaming:sink=4,window=1020)",
        spec.ToString()));
  }
  KVC_ASSIGN_OR_RETURN(PositionMode pm, ParsePositionMode(pos));
  return std::unique_ptr<EvictionPolicy>(new StreamingPolicy(sink, window, pm));
}

}  // namespace kvc::kv
