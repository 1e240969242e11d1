#include "engine/kv_plan.h"

#include <algorithm>
#include <random>
#include <vector>

namespace kvc::engine {

namespace {
int64_t CeilDiv(int64_t a, int64_t b) { return (a + b - 1) / b; }
}  // namespace

StatusOr<std::unique_ptr<KvPlan>> KvPlan::Measure(const kv::KvShape& shape,
                                                  const kv::KvCacheConfig& cfg,
                                                  const kv::AttnStatsRequest& stats) {
  KVC_ASSIGN_OR_RETURN(auto cache, kv::KvCache::Create(shape, cfg));
  cache->SetStatsRequest(stats);
  std::unique_ptr<KvPlan> p(new KvPlan());
  p->step_ = std::max(cfg.grow_tokens, 1);
  p->k_bits_ = cache->KBitsPerValue();
  p->v_bits_ = cache->VBitsPerValue();
  p->describe_ = cache->Describe();
  // Probe lengths: past the sink segment and any fp16 window (KIVI's residual is ≤ 128 tokens by
  // default; windows are r + q tokens at most), so both points sit on the linear part.
  int64_t window = 0;  // the largest fp16 window (r + q tokens) of any body codec
  for (int l = 0; l < shape.n_layer; ++l) {
    for (kv::KvKind kind : {kv::KvKind::kKey, kv::KvKind::kValue}) {
      const kv::Codec& c = cache->body_codec(l, kind);
      if (c.residual_tokens() > 0 || c.flush_quantum() > 1) {  // tokens wait in an fp16 tail
        window = std::max<int64_t>(window, c.residual_tokens() + c.flush_quantum());
      }
    }
  }
  p->window_ = window;
  const int64_t n1 = std::max<int64_t>(
      4 * p->step_, CeilDiv(cfg.sink_tokens + 2 * window + 128, p->step_) * p->step_);
  const int64_t n2 = 2 * n1;
  const int hd = shape.head_dim, dv = shape.DimV(), nkv = shape.n_head_kv;
  std::mt19937 rng(1234);
  std::normal_distribution<float> nd(0.f, 1.f);
  const int64_t block = p->step_;
  std::vector<float> k(size_t(block) * nkv * hd), v(size_t(block) * nkv * dv);
  std::vector<int64_t> seq(static_cast<size_t>(block));
  int64_t b1 = 0, b2 = 0;
  std::vector<int64_t>& meas = p->measured_;
  std::vector<float> q(size_t(shape.n_head) * hd), out(size_t(shape.n_head) * dv);
  for (auto& x : q) x = nd(rng);
  auto attend_last = [&](int64_t last_seq) {
    for (int l = 0; l < shape.n_layer; ++l) cache->Attend(l, q.data(), &last_seq, 1, out.data());
  };
  for (int64_t n = 0; n < n2; n += block) {
    for (auto& x : k) x = nd(rng);
    for (auto& x : v) x = nd(rng);
    for (int64_t i = 0; i < block; ++i) seq[size_t(i)] = n + i;
    for (int l = 0; l < shape.n_layer; ++l) {
      KVC_RETURN_IF_ERROR(cache->Write(l, seq.data(), int(block), k.data(), v.data()));
      cache->FlushLayer(l);
    }
    meas.push_back(int64_t(cache->Memory().TotalBytes()));
    if (n + block == n1) {
      attend_last(n1 - 1);
      b1 = int64_t(cache->Memory().TotalBytes());
    }
  }
  attend_last(n2 - 1);
  b2 = int64_t(cache->Memory().TotalBytes());
  const int64_t s1 = n1 / p->step_, s2 = n2 / p->step_;
  // Per step, rounded up; the intercept makes the line pass through the larger of the two points
  // (so both measured points are covered).
  p->per_step_ = std::max<int64_t>(0, CeilDiv(b2 - b1, s2 - s1));
  p->base_ = std::max(b1 - p->per_step_ * s1, b2 - p->per_step_ * s2);
  p->base_ = std::max<int64_t>(p->base_, 0);
  return p;
}

int64_t KvPlan::Bytes(int64_t n_cells) const {
  const int64_t steps = CeilDiv(std::max<int64_t>(n_cells, 0), step_);
  int64_t b = base_ + per_step_ * steps;
  // While fp16 windows fill (n below r + q) bytes run above the line: cover them with what the
  // probe measured at the step boundaries up to ceil(n / step) · step (measured_[j] is at (j + 1) · step).
  const int64_t last = window_ > 0 ? steps : steps - 1;  // a window can peak inside a step
  for (int64_t j = 0; j < int64_t(measured_.size()) && j <= last; ++j) b = std::max(b, measured_[j]);
  return b;
}

}  // namespace kvc::engine
