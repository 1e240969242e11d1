#include "kv/policies/knorm.h"

#include <cmath>

#include <fmt/format.h>

#include "kv/policies/common.h"

namespace kvc::kv {
namespace {

class KnormPolicy : public ScoredPolicy {
 public:
  explicit KnormPolicy(CommonParams p) : ScoredPolicy(std::move(p)) {}
  std::string Name() const override { return "knorm"; }
  void Score(KvCache& cache, int layer, int head, std::vector<float>* s) override {
    const int hd = cache.shape().head_dim;
    const int64_t n = int64_t(s->size());
    std::vector<float> k(size_t(n) * hd);  // [n, head_dim] f32 post-RoPE
    cache.DecodeKeys(layer, head, k.data());
    for (int64_t i = 0; i < n; ++i) {
      double ss = 0;
      for (int d = 0; d < hd; ++d) ss += double(k[size_t(i) * hd + d]) * k[size_t(i) * hd + d];
      (*s)[i] = -float(std::sqrt(ss));
    }
  }
};

}  // namespace

StatusOr<std::unique_ptr<EvictionPolicy>> MakeKnormPolicy(const CodecSpec& spec, const KvShape&) {
  CommonParams p;
  KVC_RETURN_IF_ERROR(ParseCommon(spec, When::kPrefill, &p));
  KVC_ASSIGN_OR_RETURN(int window, spec.GetInt("window", 0));
  KVC_RETURN_IF_ERROR(spec.CheckAllUsed());
  if (window < 0) return InvalidArgument(fmt::format("{}: window must be >= 0", spec.ToString()));
  p.window = window;
  return std::unique_ptr<EvictionPolicy>(new KnormPolicy(p));
}

}  // namespace kvc::kv
