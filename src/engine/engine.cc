#include "engine/engine.h"

#include <fmt/format.h>
#include <spdlog/spdlog.h>

#include <algorithm>
#include <chrono>

#include "engine/text_stream.h"
#include "kv/policy.h"
#include "model/model.h"
#include "store/prefix_cache.h"

namespace kvc::engine {

namespace {
// Prometheus-style buckets (seconds), as vLLM uses for its latency histograms.
const std::vector<double> kLatencyBuckets = {0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25,
                                             0.5,   0.75,  1.0,  2.5,  5.0,  7.5,  10,   20,  40,
                                             80,    160,   640,  2560};
constexpr int64_t kMaxSequenceTokens = 262144;  // the RoPE table's limit (kv/cache.h)
constexpr double kRatioDecaySteps = 600;
}  // namespace

const char* FinishReasonName(FinishReason r) {
  switch (r) {
    case FinishReason::kNone: return "none";
    case FinishReason::kStop: return "stop";
    case FinishReason::kLength: return "length";
    case FinishReason::kCancelled: return "cancelled";
    case FinishReason::kError: return "error";
  }
  return "?";
}

std::string KvSettings::Label() const {
  std::string s = fmt::format("K={} V={}", cache.k_codec, cache.v_codec);
  for (size_t l = 0; l < cache.k_codec_layer.size(); ++l) {
    if (!cache.k_codec_layer[l].empty()) s += fmt::format(" K@{}={}", l, cache.k_codec_layer[l]);
  }
  for (size_t l = 0; l < cache.v_codec_layer.size(); ++l) {
    if (!cache.v_codec_layer[l].empty()) s += fmt::format(" V@{}={}", l, cache.v_codec_layer[l]);
  }
  if (!cache.k_transform.empty()) s += " kt=" + cache.k_transform;
  if (!cache.v_transform.empty()) s += " vt=" + cache.v_transform;
  if (cache.sink_tokens > 0) s += fmt::format(" sinks={}:{}", cache.sink_tokens, cache.sink_codec);
  if (cache.position_mode_set || cache.position_mode != kv::PositionMode::kOriginal) {
    s += fmt::format(" pos={}", kv::PositionModeName(cache.position_mode));
  }
  if (cache.grow_tokens != 64) s += fmt::format(" grow={}", cache.grow_tokens);
  if (!evict.empty()) s += " evict=" + evict;
  return s;
}

Histogram::Histogram(std::vector<double> b)
    : bounds(b.empty() ? kLatencyBuckets : std::move(b)), counts(bounds.size() + 1, 0) {}

void Histogram::Observe(double v) {
  const size_t i = size_t(std::lower_bound(bounds.begin(), bounds.end(), v) - bounds.begin());
  counts[i] += 1;
  sum += v;
  count += 1;
}

// One request's state. Sampler, text stream and generated tokens survive a preemption; the cache
// and policy do not (recompute).
struct Engine::Seq {
  RequestId id = 0;
  Request req;
  std::unique_ptr<Sampler> sampler;
  std::unique_ptr<TextStream> text;
  std::shared_ptr<const KvPlan> plan;
  std::vector<int32_t> generated;
  // While running:
  std::unique_ptr<kv::KvCache> cache;
  std::unique_ptr<kv::EvictionPolicy> policy;
  std::vector<int32_t> feed;   // the tokens to prefill: prompt, + generated after a preemption
  int64_t n_fed = 0;           // feed tokens consumed
  int64_t n_past = 0;          // tokens the cache has consumed
  int32_t next_token = -1;     // sampled, not yet fed
  int64_t reserved = 0;        // KV bytes reserved at admission
  int64_t bytes = 0;           // KV bytes allocated after the last step
  bool cancel = false;
  double t_last = -1;          // time of the last emitted token
  RequestUsage usage;
  std::vector<float> logits;   // [n_vocab] of the last row fed
  int64_t n_cached = 0;        // prompt tokens restored from stored KV (0: none)
  std::unique_ptr<store::BlockExporter> exporter;  // null: not exporting
  store::KvFingerprint kv_fp;  // of this sequence's configuration (export, save)
  std::vector<store::Digest> chain;  // chain keys of the blocks cut so far
  bool window_free = false;
  bool prefilling() const { return n_fed < int64_t(feed.size()); }
};

Engine::Engine(const Model& m, EngineOptions o) : model_(m), opt_(o) {
  t0_ = 0;
  t0_ = Now();
  reserve_ratio_ = o.reserve_ratio;
}

double Engine::Now() const {
  using namespace std::chrono;
  return duration<double>(steady_clock::now().time_since_epoch()).count() - t0_;
}

StatusOr<std::unique_ptr<Engine>> Engine::Create(const Model& model, EngineOptions opt) {
  if (opt.kv_budget_bytes <= 0) return InvalidArgument("the KV budget must be > 0 bytes");
  if (opt.n_ctx < 1 || opt.n_ctx > kMaxSequenceTokens) {
    return InvalidArgument(fmt::format("n_ctx must be in [1, {}]", kMaxSequenceTokens));
  }
  if (opt.max_batch_tokens < 1) return InvalidArgument("max_batch_tokens must be >= 1");
  if (opt.prefill_chunk < 1 || opt.prefill_chunk > opt.max_batch_tokens) {
    return InvalidArgument(fmt::format("prefill_chunk must be in [1, max_batch_tokens = {}]",
                                       opt.max_batch_tokens));
  }
  if (opt.max_running < 1) return InvalidArgument("max_running must be >= 1");
  if (opt.max_waiting < 0) return InvalidArgument("max_waiting must be >= 0");
  if (!(opt.reserve_ratio > 0 && opt.reserve_ratio <= 1)) {
    return InvalidArgument("reserve_ratio must be in (0, 1]");
  }
  std::unique_ptr<Engine> e(new Engine(model, opt));
  e->stats_.kv_bytes_budget = opt.kv_budget_bytes;
  return e;
}

Engine::~Engine() {
  Shutdown(true);
  if (thread_.joinable()) {
    thread_.join();
  } else {
    RunUntilIdle();  // deliver the final events of whatever was cancelled
  }
}

namespace {
// Plans are a function of the KV shape and the configuration: measured once per process.
std::mutex g_plan_mu;
std::map<std::string, std::shared_ptr<const KvPlan>> g_plans;
}  // namespace

StatusOr<std::shared_ptr<const KvPlan>> Engine::Plan(const KvSettings& kv) {
  const kv::KvShape sh = model_.kv_shape();
  const std::string key = fmt::format("{}x{}x{}x{}x{} {} calib={}", sh.n_layer, sh.n_head,
                                      sh.n_head_kv, sh.head_dim, sh.DimV(), kv.Label(),
                                      static_cast<const void*>(kv.cache.calib));
  {
    std::lock_guard<std::mutex> lk(g_plan_mu);
    auto it = g_plans.find(key);
    if (it != g_plans.end()) return it->second;
  }
  kv::KvCacheConfig cfg = kv.cache;
  // Measured without evicting; the policy's statistics arrays are included. Its position mode
  // does not change the bytes per cell.
  KVC_ASSIGN_OR_RETURN(auto policy, kv::MakePolicy(kv.evict, model_.kv_shape()));
  const kv::AttnStatsRequest stats = policy ? policy->StatsNeeded() : kv::AttnStatsRequest{};
  KVC_ASSIGN_OR_RETURN(auto plan, KvPlan::Measure(model_.kv_shape(), cfg, stats));
  std::shared_ptr<const KvPlan> p(std::move(plan));
  std::lock_guard<std::mutex> lk(g_plan_mu);
  g_plans.emplace(key, p);
  return p;
}

StatusOr<int64_t> Engine::MaxCells(const KvSettings& kv, int64_t n_prompt, int64_t n_total) {
  KVC_ASSIGN_OR_RETURN(auto policy, kv::MakePolicy(kv.evict, model_.kv_shape()));
  if (!policy) return n_total;
  return policy->MaxCells(n_prompt, n_total, opt_.prefill_chunk);
}

Status Engine::Validate(const Request& r) const {
  const int n_vocab = model_.config().n_vocab;
  if (!r.sink) return InvalidArgument("request without an event sink");
  if (r.prompt.empty()) return InvalidArgument("empty prompt: nothing to evaluate");
  for (size_t i = 0; i < r.prompt.size(); ++i) {
    if (r.prompt[i] < 0 || r.prompt[i] >= n_vocab) {
      return InvalidArgument(fmt::format("token id {} at index {} outside the vocabulary [0, {})",
                                         r.prompt[i], i, n_vocab));
    }
  }
  if (r.gen.max_tokens < 0) return InvalidArgument("max_tokens must be >= 0");
  // Checked before the KV plan is measured: measuring writes past the sink segment, so a huge
  // count would cost minutes and gigabytes on the submitting thread.
  if (r.kv.cache.sink_tokens < 0 || r.kv.cache.sink_tokens > opt_.n_ctx) {
    return InvalidArgument(fmt::format("sink tokens ({}) must be in [0, n_ctx = {}]",
                                       r.kv.cache.sink_tokens, opt_.n_ctx));
  }
  // The KV plan reserves bytes for the policy's MaxCells at the main codecs; demoted cells (every
  // evicted token, at the demote codec) and pinned sinks are not in that bound, so admission would
  // under-reserve. Refused until kv_plan counts the side tiers (docs/eviction.md "Demotion").
  if (!r.kv.cache.demote_k_codec.empty() || !r.kv.cache.demote_v_codec.empty() ||
      r.kv.cache.sink_detect > 0) {
    return InvalidArgument(
        "demotion (demote=) and activation-found sinks (sink_detect=) are not supported by the "
        "engine/server: its KV byte reservation does not count their side tiers yet; use them "
        "with the CLI's eval / retrieval / generate");
  }
  KVC_RETURN_IF_ERROR(ValidateSampling(r.gen.sampling));
  KVC_RETURN_IF_ERROR(ValidateStops(r.gen.stop));
  if (r.restore_sequence && !r.restore_blocks.empty()) {
    return InvalidArgument("restore from a sequence record or from blocks, not both");
  }
  // The restored tokens must be a proper prefix of the prompt.
  int64_t t = 0;
  auto check = [&](const store::Record& rec) -> Status {
    if (rec.info.t0 != t) return InvalidArgument("stored KV records are not consecutive from token 0");
    const auto& tk = rec.info.tokens;
    if (rec.info.t1 >= int64_t(r.prompt.size()) ||
        !std::equal(tk.begin(), tk.end(), r.prompt.begin() + rec.info.t0)) {
      return InvalidArgument("the stored KV's tokens are not a prefix of the prompt (with at least "
                             "one token after it)");
    }
    t = rec.info.t1;
    return Status::Ok();
  };
  if (r.restore_sequence) KVC_RETURN_IF_ERROR(check(*r.restore_sequence));
  for (const auto& b : r.restore_blocks) KVC_RETURN_IF_ERROR(check(*b));
  if (r.export_block_tokens < 0 || (r.export_block_tokens > 0 && !r.on_block)) {
    return InvalidArgument("export_block_tokens needs on_block");
  }
  return Status::Ok();
}

StatusOr<RequestId> Engine::Submit(Request r) {
  auto refuse = [&](Status st) -> StatusOr<RequestId> {
    std::lock_guard<std::mutex> lk(mu_);
    stats_.requests_refused_total += 1;
    return st;
  };
  if (Status st = Validate(r); !st.ok()) return refuse(st);
  const int64_t n_prompt = int64_t(r.prompt.size());
  const int64_t n_total = n_prompt + r.gen.max_tokens;
  auto plan = Plan(r.kv);
  if (!plan.ok()) return refuse(plan.status());
  auto cells = MaxCells(r.kv, n_prompt, n_total);
  if (!cells.ok()) return refuse(cells.status());
  if (r.kv.evict.empty() && n_total > opt_.n_ctx) {
    return refuse(OutOfRange(fmt::format(
        "prompt ({} tokens) + max_tokens ({}) = {} tokens exceeds the context size {}", n_prompt,
        r.gen.max_tokens, n_total, opt_.n_ctx)));
  }
  if (n_total > kMaxSequenceTokens) {
    return refuse(OutOfRange(fmt::format("prompt + max_tokens = {} tokens exceeds {}", n_total,
                                         kMaxSequenceTokens)));
  }
  const int64_t need = (*plan)->Bytes(*cells);
  if (need > opt_.kv_budget_bytes) {
    return refuse(OutOfRange(fmt::format(
        "this request needs {} KV bytes ({} cells per head with {}; prompt {} + max_tokens {}), "
        "more than the whole KV budget of {} bytes",
        need, *cells, r.kv.Label(), n_prompt, r.gen.max_tokens, opt_.kv_budget_bytes)));
  }
  auto s = std::make_unique<Seq>();
  s->plan = *plan;
  s->sampler = std::make_unique<Sampler>(r.gen.sampling);
  s->text = std::make_unique<TextStream>(model_.tokenizer(), r.gen.stop);
  s->usage.prompt_tokens = n_prompt;
  s->usage.kv_label = r.kv.Label();
  s->usage.k_bits_per_value = (*plan)->k_bits_per_value();
  s->usage.v_bits_per_value = (*plan)->v_bits_per_value();
  s->req = std::move(r);
  std::lock_guard<std::mutex> lk(mu_);
  if (shutting_down_) {
    stats_.requests_refused_total += 1;
    return Unavailable("the server is shutting down");
  }
  if (waiting_count_ >= opt_.max_waiting) {
    stats_.requests_refused_total += 1;
    return ResourceExhausted(fmt::format("{} requests are already waiting (the queue limit)",
                                         waiting_count_));
  }
  s->id = next_id_++;
  s->usage.t_arrival = Now();
  const RequestId id = s->id;
  inbox_.push_back(std::move(s));
  waiting_count_ += 1;
  stats_.waiting = waiting_count_;
  cv_.notify_all();
  return id;
}

void Engine::Cancel(RequestId id) {
  std::lock_guard<std::mutex> lk(mu_);
  cancels_.push_back(id);
  cv_.notify_all();
}

void Engine::Shutdown(bool cancel_running) {
  std::lock_guard<std::mutex> lk(mu_);
  shutting_down_ = true;
  if (cancel_running) cancel_all_ = true;
  cv_.notify_all();
}

void Engine::TakeInbox() {
  std::vector<RequestId> cancels;
  bool cancel_all = false;
  {
    std::lock_guard<std::mutex> lk(mu_);
    while (!inbox_.empty()) {
      waiting_.push_back(std::move(inbox_.front()));
      inbox_.pop_front();
    }
    cancels.swap(cancels_);
    cancel_all = cancel_all_;
  }
  for (RequestId id : cancels) {
    for (auto& s : waiting_) if (s->id == id) s->cancel = true;
    for (auto& s : running_) if (s->id == id) s->cancel = true;
  }
  if (cancel_all) {
    for (auto& s : waiting_) s->cancel = true;
    for (auto& s : running_) s->cancel = true;
  }
  // Cancelled requests end here: their KV is freed before this step is planned.
  for (auto it = waiting_.begin(); it != waiting_.end();) {
    if ((*it)->cancel) {
      Finish(**it, FinishReason::kCancelled);
      it = waiting_.erase(it);
    } else {
      ++it;
    }
  }
  for (auto it = running_.begin(); it != running_.end();) {
    if ((*it)->cancel) {
      Finish(**it, FinishReason::kCancelled);
      it = running_.erase(it);
    } else {
      ++it;
    }
  }
}

void Engine::Finish(Seq& s, FinishReason reason, Status err) {
  Event ev;
  ev.id = s.id;
  ev.finished = true;
  ev.reason = reason;
  ev.error = err;
  if (reason != FinishReason::kError && !s.text->stopped()) ev.text = s.text->Finish();
  s.usage.t_finish = Now();
  s.usage.completion_tokens = int64_t(s.generated.size());
  if (s.cache && s.req.save_state && reason != FinishReason::kError) {
    std::vector<int32_t> all = s.req.prompt;
    all.insert(all.end(), s.generated.begin(), s.generated.end());
    const size_t n = size_t(s.n_past);
    auto rec = store::EncodeSequence(*s.cache, s.policy.get(), store::FingerprintOf(model_), s.kv_fp,
                                     std::vector<int32_t>(all.begin(), all.begin() + n),
                                     std::vector<int32_t>(all.begin() + n, all.end()));
    if (rec.ok()) {
      ev.state = std::make_shared<const std::string>(std::move(*rec));
    } else {
      spdlog::warn("request {}: state not saved: {}", s.id, rec.status().message());
    }
  }
  if (s.cache) {
    s.usage.kv_cells = s.cache->Memory().Cells();
    s.usage.kv_bytes_peak = std::max<int64_t>(s.usage.kv_bytes_peak, s.cache->Memory().TotalBytes());
  }
  s.cache.reset();
  s.policy.reset();
  ev.usage = s.usage;
  {
    std::lock_guard<std::mutex> lk(mu_);
    stats_.requests_finished_total[int(reason)] += 1;
    stats_.e2e.Observe(s.usage.t_finish - s.usage.t_arrival);
  }
  s.req.sink(ev);
}

void Engine::Preempt(Seq& s) {
  spdlog::warn("KV budget: preempting request {} ({} tokens consumed, {} KV bytes); it will be "
               "recomputed",
               s.id, s.n_past, s.bytes);
  s.cache.reset();
  s.policy.reset();
  s.bytes = 0;
  s.reserved = 0;
  s.usage.preemptions += 1;
  // Admission becomes conservative after a preemption (reserve all of max_tokens), then relaxes
  // back to reserve_ratio over kRatioDecaySteps steps (SGLang's new_token_ratio does the same), so
  // a preempted request is not re-admitted only to be preempted again.
  reserve_ratio_ = 1.0;
  std::lock_guard<std::mutex> lk(mu_);
  stats_.preemptions_total += 1;
}

int64_t Engine::Reservation(const Seq& s) {
  // Tokens consumed or to be consumed now, plus reserve_ratio_ of the tokens still to generate.
  const int64_t fed = int64_t(s.req.prompt.size() + s.generated.size());
  const int64_t remaining = std::max<int64_t>(0, s.req.gen.max_tokens - int64_t(s.generated.size()));
  const int64_t tokens = fed + int64_t(double(remaining) * reserve_ratio_ + 0.999);
  auto cells = MaxCells(s.req.kv, int64_t(s.req.prompt.size()), tokens);
  return s.plan->Bytes(cells.ok() ? *cells : tokens);
}

void Engine::Admit() {
  // What the running sequences hold: their bytes, or more if their reservation at the ratio now in
  // force is larger (after a preemption that is all of their max_tokens).
  int64_t held = 0;
  for (const auto& s : running_) held += std::max(s->bytes, Reservation(*s));
  while (!waiting_.empty() && int64_t(running_.size()) < opt_.max_running) {
    Seq& s = *waiting_.front();
    std::vector<int32_t> feed = s.req.prompt;
    feed.insert(feed.end(), s.generated.begin(), s.generated.end());
    const int64_t remaining = s.req.gen.max_tokens - int64_t(s.generated.size());
    const int64_t need = Reservation(s);
    if (held + need > opt_.kv_budget_bytes) break;  // first come, first served: wait
    // Build the cache and policy (validated at Submit; an error here ends the request).
    kv::KvCacheConfig cfg = s.req.kv.cache;
    auto policy = kv::MakePolicy(s.req.kv.evict, model_.kv_shape());
    Status st = policy.status();
    if (st.ok() && *policy && !cfg.position_mode_set &&
        cfg.position_mode == kv::PositionMode::kOriginal) {
      cfg.position_mode = (*policy)->position_mode();
    }
    cfg.rope_table_positions = std::max<int64_t>(
        cfg.rope_table_positions,
        std::min<int64_t>(int64_t(feed.size()) + std::max<int64_t>(remaining, 0), opt_.n_ctx));
    StatusOr<std::unique_ptr<kv::KvCache>> cache = st.ok() ? kv::KvCache::Create(model_.kv_shape(), cfg)
                                                           : StatusOr<std::unique_ptr<kv::KvCache>>(st);
    std::unique_ptr<Seq> owned = std::move(waiting_.front());
    waiting_.pop_front();
    if (!cache.ok()) {
      Finish(*owned, FinishReason::kError, cache.status());
      continue;
    }
    owned->cache = std::move(*cache);
    owned->policy = std::move(*policy);
    if (owned->policy) owned->cache->SetStatsRequest(owned->policy->StatsNeeded());
    owned->feed = std::move(feed);
    owned->n_fed = 0;
    owned->n_past = 0;
    owned->next_token = -1;
    RestoreStored(*owned, cfg);
    owned->reserved = need;
    owned->bytes = int64_t(owned->cache->Memory().TotalBytes());
    owned->usage.kv_bytes_reserved = std::max(owned->usage.kv_bytes_reserved, need);
    held += need;
    if (owned->usage.t_scheduled < 0) {
      owned->usage.t_scheduled = Now();
      std::lock_guard<std::mutex> lk(mu_);
      stats_.queue_time.Observe(owned->usage.t_scheduled - owned->usage.t_arrival);
      stats_.prompt_tokens_total += owned->usage.prompt_tokens;
    }
    running_.push_back(std::move(owned));
  }
}

void Engine::RestoreStored(Seq& s, const kv::KvCacheConfig& cfg) {
  const Request& r = s.req;
  s.kv_fp = store::FingerprintOf(*s.cache, s.policy ? s.policy->Name() : "");
  int64_t t = 0;
  if (r.restore_sequence || !r.restore_blocks.empty()) {
    Status st = r.restore_sequence ? store::ApplySequence(*r.restore_sequence, s.cache.get(), s.policy.get())
                                   : store::ApplyBlocks(r.restore_blocks, s.cache.get());
    if (st.ok()) {
      t = s.cache->n_consumed();
    } else {
      spdlog::warn("request {}: stored KV not used ({}); computing the whole prompt", s.id,
                   st.message());
      auto fresh = kv::KvCache::Create(model_.kv_shape(), cfg);
      auto pol = kv::MakePolicy(r.kv.evict, model_.kv_shape());
      if (fresh.ok() && pol.ok()) {
        s.cache = std::move(*fresh);
        s.policy = std::move(*pol);
        if (s.policy) s.cache->SetStatsRequest(s.policy->StatsNeeded());
      }
    }
  }
  s.n_fed = t;
  s.n_past = t;
  s.n_cached = t;
  s.usage.cached_tokens = t;
  // Export blocks from here on (not after a preemption: the blocks before it were exported).
  s.exporter.reset();
  s.chain.clear();
  if (r.export_block_tokens > 0 && !s.policy && s.usage.preemptions == 0) {
    s.exporter = std::make_unique<store::BlockExporter>();
    if (!s.exporter->StartAt(*s.cache, r.export_block_tokens)) s.exporter.reset();
    s.window_free = store::BlockExporter::WindowFree(*s.cache);
  }
}

void Engine::ExportBlocks(Seq& s) {
  const int64_t B = s.req.export_block_tokens;
  const int64_t target = (s.n_past / B) * B;
  if (target <= s.exporter->t1()) return;
  if (!s.window_free && target != s.n_past) return;  // cut only at the current length
  std::vector<int32_t> all = s.req.prompt;
  all.insert(all.end(), s.generated.begin(), s.generated.end());
  // Chain keys up to the target block.
  while (int64_t(s.chain.size()) * B < target) {
    const store::Digest& parent = s.chain.empty() ? s.req.prefix_root : s.chain.back();
    s.chain.push_back(store::ChainKey(parent, all.data() + s.chain.size() * B, int(B)));
  }
  const store::ModelFingerprint& mfp = store::FingerprintOf(model_);
  const int64_t step = s.window_free ? B : target - s.exporter->t1();
  while (s.exporter->t1() < target) {
    const int64_t t0 = s.exporter->t1(), t1 = t0 + step;
    std::vector<int32_t> toks(all.begin() + t0, all.begin() + t1);
    auto rec = s.exporter->Next(*s.cache, t1, mfp, s.kv_fp, s.chain[size_t(t1 / B) - 1], toks);
    if (!rec.ok()) {
      spdlog::debug("request {}: prefix blocks no longer exported: {}", s.id, rec.status().message());
      s.exporter.reset();
      return;
    }
    Request::BlockOut out;
    out.keys.assign(s.chain.begin() + t0 / B, s.chain.begin() + t1 / B);
    out.parent = t0 == 0 ? s.req.prefix_root : s.chain[size_t(t0 / B) - 1];
    out.t0 = t0;
    out.t1 = t1;
    out.tokens = std::move(toks);
    out.record = std::move(*rec);
    s.req.on_block(std::move(out));
  }
}

void Engine::PublishCounts() {
  std::lock_guard<std::mutex> lk(mu_);
  waiting_count_ = int64_t(inbox_.size() + waiting_.size());
  stats_.waiting = waiting_count_;
  stats_.running = int64_t(running_.size());
}

bool Engine::Step() {
  reserve_ratio_ = std::max(opt_.reserve_ratio,
                            reserve_ratio_ - (1.0 - opt_.reserve_ratio) / kRatioDecaySteps);
  TakeInbox();
  Admit();
  PublishCounts();  // before this step's events, so a client sees counts that include them
  if (running_.empty()) {
    std::lock_guard<std::mutex> lk(mu_);
    waiting_count_ = int64_t(inbox_.size() + waiting_.size());
    stats_.waiting = waiting_count_;
    stats_.running = 0;
    stats_.kv_bytes_used = 0;
    return false;
  }
  // --- schedule: decodes first, then prefill chunks at fixed boundaries; preempt on overflow.
  struct Item {
    Seq* s;
    int n;            // rows
    const int32_t* tokens;
  };
  std::vector<Item> items;
  for (;;) {
    items.clear();
    int budget = opt_.max_batch_tokens;
    for (auto& s : running_) {
      if (s->prefilling() || budget == 0) continue;
      items.push_back({s.get(), 1, &s->next_token});
      budget -= 1;
    }
    for (auto& s : running_) {
      if (!s->prefilling()) continue;
      // After a preemption the feed is prompt + generated tokens. The prompt keeps its chunks;
      // the generated tokens are replayed one row per step, as they were decoded: a multi-row
      // chunk takes the tiled attention path, whose rounding differs from the decode path's, and
      // the recomputed cache (and greedy text) would differ from the uninterrupted run.
      const int64_t n_prompt = int64_t(s->req.prompt.size());
      const int64_t left = s->n_fed < n_prompt ? n_prompt - s->n_fed : 1;
      const int64_t to_boundary = opt_.prefill_chunk - s->n_fed % opt_.prefill_chunk;
      const int n = int(std::min(left, to_boundary));
      if (n > budget && !items.empty()) break;  // whole chunks only; admission order
      items.push_back({s.get(), n, s->feed.data() + s->n_fed});
      budget -= std::min(budget, n);
    }
    // KV bytes after this step: scheduled sequences at their plan bound, the others as they are.
    int64_t projected = 0;
    for (auto& s : running_) projected += s->bytes;
    for (const Item& it : items) {
      Seq& s = *it.s;
      const int64_t total = s.n_past + it.n;
      int64_t cells = total;
      if (s.policy) cells = s.policy->MaxCells(int64_t(s.req.prompt.size()), total, opt_.prefill_chunk);
      projected += std::max<int64_t>(0, s.plan->Bytes(cells) - s.bytes);
    }
    if (projected <= opt_.kv_budget_bytes || running_.size() == 1) break;
    // Preempt the newest running sequence and requeue it at the front.
    std::unique_ptr<Seq> victim = std::move(running_.back());
    running_.pop_back();
    Preempt(*victim);
    waiting_.push_front(std::move(victim));
  }

  // --- forward
  std::vector<SeqRows> rows;
  rows.reserve(items.size());
  const int n_vocab = model_.config().n_vocab;
  for (const Item& it : items) {
    Seq& s = *it.s;
    if (s.policy) {
      if (Status st = s.policy->BeforeWrite(*s.cache, it.n); !st.ok()) {
        s.cancel = true;  // ended below with the error
        s.logits.clear();
        Finish(s, FinishReason::kError, st);
        continue;
      }
    }
    const bool last_chunk = !s.prefilling() || s.n_fed + it.n == int64_t(s.feed.size());
    SeqRows r;
    r.cache = s.cache.get();
    r.tokens = it.tokens;
    r.n_tokens = it.n;
    r.seq0 = s.n_past;
    r.all_logits = false;
    s.logits.resize(size_t(n_vocab));
    r.logits = last_chunk ? s.logits.data() : nullptr;
    rows.push_back(r);
  }
  // Drop items whose policy failed (Finish already sent).
  {
    std::vector<Item> kept;
    for (const Item& it : items) if (!it.s->cancel) kept.push_back(it);
    items.swap(kept);
  }
  ForwardBatch(model_, rows, &scratch_);

  // --- per sequence: hooks, sampling, events
  std::vector<Seq*> done;
  int64_t gen_tokens = 0;
  std::vector<std::pair<Seq*, FinishReason>> finished;
  std::vector<std::pair<Seq*, Status>> failed;
  for (size_t i = 0; i < items.size(); ++i) {
    Seq& s = *items[i].s;
    const int n = items[i].n;
    if (!rows[i].status.ok()) {
      failed.push_back({&s, rows[i].status});
      continue;
    }
    const bool was_prefill = s.prefilling();
    s.n_past += n;
    if (was_prefill) s.n_fed += n;
    Status hook;
    if (s.policy) {
      if (was_prefill && !s.prefilling()) {
        hook = int64_t(s.feed.size()) > 1 ? s.policy->AfterPrefill(*s.cache, int(s.feed.size()))
                                          : s.policy->AfterStep(*s.cache);
      } else if (!was_prefill) {
        hook = s.policy->AfterStep(*s.cache);
      }
    }
    if (!hook.ok()) {
      failed.push_back({&s, hook});
      continue;
    }
    if (s.exporter) ExportBlocks(s);
    if (s.prefilling()) continue;  // more chunks to come; no token yet
    // The prompt (or the last token) is in: sample the next token unless done.
    if (int64_t(s.generated.size()) >= s.req.gen.max_tokens) {
      finished.push_back({&s, FinishReason::kLength});
      continue;
    }
    const int32_t tok = s.sampler->Sample(s.logits.data(), n_vocab);
    s.generated.push_back(tok);
    s.next_token = tok;
    gen_tokens += 1;
    const double now = Now();
    Event ev;
    ev.id = s.id;
    ev.token = tok;
    if (s.req.gen.return_logits) ev.logits = s.logits;
    FinishReason reason = FinishReason::kNone;
    if (!s.req.gen.ignore_eos && model_.tokenizer().IsEog(tok)) {
      reason = FinishReason::kStop;
    } else {
      bool stopped = false;
      ev.text = s.text->Push(tok, &stopped);
      if (stopped) reason = FinishReason::kStop;
    }
    if (reason == FinishReason::kNone && int64_t(s.generated.size()) >= s.req.gen.max_tokens) {
      reason = FinishReason::kLength;
    }
    {
      std::lock_guard<std::mutex> lk(mu_);
      if (s.usage.t_first_token < 0) {
        s.usage.t_first_token = now;
        stats_.ttft.Observe(now - s.usage.t_arrival);
      } else if (s.t_last >= 0) {
        stats_.itl.Observe(now - s.t_last);
      }
    }
    s.t_last = now;
    s.req.sink(ev);
    if (reason != FinishReason::kNone) finished.push_back({&s, reason});
  }
  // Bytes as allocated, after the step.
  int64_t used = 0;
  for (auto& s : running_) {
    if (s->cache) {
      s->bytes = int64_t(s->cache->Memory().TotalBytes());
      s->usage.kv_bytes_peak = std::max(s->usage.kv_bytes_peak, s->bytes);
      used += s->bytes;
    }
  }
  const int64_t running_now = int64_t(running_.size());
  for (auto& [s, st] : failed) Finish(*s, FinishReason::kError, st);
  for (auto& [s, reason] : finished) Finish(*s, reason);
  running_.erase(std::remove_if(running_.begin(), running_.end(),
                                [](const std::unique_ptr<Seq>& s) { return !s->cache; }),
                 running_.end());
  {
    std::lock_guard<std::mutex> lk(mu_);
    stats_.steps_total += 1;
    for (const Item& it : items) stats_.batch_rows_total += it.n;
    stats_.generation_tokens_total += gen_tokens;
    stats_.kv_bytes_peak = std::max(stats_.kv_bytes_peak, used);
    stats_.running_peak = std::max(stats_.running_peak, running_now);
    int64_t used_after = 0;
    for (auto& s : running_) used_after += s->bytes;
    stats_.kv_bytes_used = used_after;
    stats_.running = int64_t(running_.size());
    waiting_count_ = int64_t(inbox_.size() + waiting_.size());
    stats_.waiting = waiting_count_;
  }
  return true;
}

void Engine::RunUntilIdle() {
  for (;;) {
    const bool worked = Step();
    if (worked) continue;
    std::lock_guard<std::mutex> lk(mu_);
    if (inbox_.empty() && cancels_.empty() && waiting_.empty() && running_.empty()) return;
  }
}

void Engine::Start() {
  if (thread_.joinable()) return;
  thread_ = std::thread([this] {
    for (;;) {
      const bool worked = Step();
      std::unique_lock<std::mutex> lk(mu_);
      const bool idle = inbox_.empty() && cancels_.empty() && waiting_.empty() && running_.empty();
      if (shutting_down_ && idle) return;
      if (!worked) {
        cv_.wait_for(lk, std::chrono::milliseconds(50),
                     [&] { return !inbox_.empty() || !cancels_.empty() || shutting_down_; });
      }
    }
  });
}

void Engine::Join() {
  if (thread_.joinable()) thread_.join();
}

Stats Engine::GetStats() const {
  std::lock_guard<std::mutex> lk(mu_);
  return stats_;
}

}  // namespace kvc::engine
