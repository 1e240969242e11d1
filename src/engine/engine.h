// The batched multi-sequence engine (DESIGN.md "Engine, server and store"): many sequences advance
// in one forward step under one KV memory budget.
//
// Step (Engine::Step, one scheduler iteration):
//   1. take new requests and cancellations from the inbox (thread-safe Submit / Cancel);
//   2. admit waiting requests in arrival order while their KV reservation fits the budget
//      (reservation = KvPlan bytes for the cells the request can ever hold: prompt + max_tokens,
//      capped by its eviction policy's budget; EngineOptions::reserve_ratio < 1 reserves only that
//      fraction of max_tokens and relies on preemption, as SGLang's new_token_ratio does; after a
//      preemption the whole max_tokens is reserved again, relaxing over 600 steps);
//   3. schedule: every running decode first (one row each), then prefill chunks in admission order
//      while the step's token budget (max_batch_tokens) lasts. A sequence's prompt is cut at fixed
//      boundaries (multiples of prefill_chunk from its first token), never at a boundary that
//      depends on the other sequences, so chunking cannot change its results;
//   4. growth check: if the KV bytes the running sequences will hold after this step (KvPlan bound
//      per sequence) exceed the budget, preempt one victim, the newest, requeue it at the front of
//      the waiting queue with its generated tokens kept (recompute, as vLLM V1 does), repeat;
//   5. one forward over all scheduled rows (model/forward.h); per sequence: eviction hooks, then
//      sampling, stop conditions, events.
// Batch invariance: a sequence's tokens do not depend on which other sequences share its steps
// (forward.h; per-request sampler state; fixed chunk boundaries). A preempted sequence recomputes
// its prompt in the same chunks, then replays its generated tokens one row per step, as they were
// decoded: with per-token codecs its cache and logits equal the uninterrupted ones (tested);
// eviction policies see one longer prompt instead (documented difference).
//
// Memory: "KV bytes" are KvCache::Memory().TotalBytes() summed over running sequences (allocated
// capacities: packed blocks, fp16 windows, cell bookkeeping, transform parameters), checked against
// the budget after every step (Stats::kv_bytes_peak never exceeds it; tested). Activations of a step
// (ForwardScratch, at most max_batch_tokens rows) and a prefill chunk's transient fp16 tail are
// outside the KV budget.
//
// Threads: Submit, Cancel, GetStats, Shutdown may be called from any thread. Step runs on one
// thread at a time (the engine thread started by Start, or the caller's in tests / the CLI). Event
// sinks run on the stepping thread and must not block (the server pushes into a per-request queue).
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "engine/kv_plan.h"
#include "engine/sampler.h"
#include "kv/cache.h"
#include "kvcrunch/status.h"
#include "model/forward.h"
#include "store/kv_format.h"

namespace kvc {
class Model;
}

namespace kvc::engine {

using RequestId = uint64_t;

// A KV configuration for one request (codecs, transforms, sinks, positions, eviction policy).
struct KvSettings {
  kv::KvCacheConfig cache;  // calib must outlive the engine when set
  std::string evict;        // eviction policy spec ("" = none)
  std::string Label() const;  // e.g. "K=q4_0 V=q4_0 evict=tova:budget=512"
};

struct GenerationParams {
  SamplingParams sampling;              // temperature (0 = greedy), top_p, seed
  int max_tokens = 16;                  // tokens to generate, >= 0 (0: prompt only, e.g. logits)
  std::vector<std::string> stop;        // stop strings (≤ 16, each 1..256 bytes); not returned
  bool ignore_eos = false;              // generate max_tokens even past end-of-generation tokens
  // Return the prompt's last-token logits and every step's logits to the sink (tests; costs a
  // copy of n_vocab floats per token).
  bool return_logits = false;
};

enum class FinishReason { kNone, kStop, kLength, kCancelled, kError };
const char* FinishReasonName(FinishReason r);  // "stop", "length", "cancelled", "error"

// Per-request accounting, final in the last event. Times are seconds on a steady clock since the
// engine was created.
struct RequestUsage {
  int64_t prompt_tokens = 0;
  int64_t completion_tokens = 0;
  int64_t preemptions = 0;           // times this request was preempted and recomputed
  int64_t kv_bytes_reserved = 0;     // at admission
  int64_t kv_bytes_peak = 0;         // largest KvCache::Memory().TotalBytes() while it ran
  int64_t kv_cells = 0;              // cells held (Σ layers, heads) at the end
  double k_bits_per_value = 0, v_bits_per_value = 0;
  std::string kv_label;              // KvSettings::Label()
  int64_t cached_tokens = 0;         // prompt tokens restored from stored KV, not computed
  double t_arrival = 0, t_scheduled = -1, t_first_token = -1, t_finish = -1;
};

// What a sink receives. One event per generated token (text may be empty while a stop string or a
// UTF-8 sequence is incomplete), then exactly one final event (finished = true; it may also carry
// the last token). A request refused at Submit gets no events.
struct Event {
  RequestId id = 0;
  int32_t token = -1;          // generated token id, -1 if none in this event
  std::string text;            // UTF-8 text that became final with this event
  std::vector<float> logits;   // [n_vocab] f32, only with GenerationParams::return_logits
  bool finished = false;
  FinishReason reason = FinishReason::kNone;
  Status error;                // reason == kError: why (e.g. non-finite activations)
  RequestUsage usage;          // filled when finished
  // Request::save_state: the encoded kSequence record (kv_format.h) of the state at the end:
  // every token the cache consumed, and the sampled token not yet fed as pending. Null when the
  // request failed or was cancelled before its cache existed.
  std::shared_ptr<const std::string> state;
};
using EventSink = std::function<void(const Event&)>;

struct Request {
  std::vector<int32_t> prompt;  // [n_prompt] token ids, non-empty
  GenerationParams gen;
  KvSettings kv;
  EventSink sink;               // required

  // --- stored KV (src/store/, docs/store.md) ---
  // Start from saved KV instead of computing the first t prompt tokens: one kSequence record
  // (a saved session) or kBlock records covering [0, t) in order (the prefix cache). The caller
  // verified them (DecodeRecord + CheckMatches for this model and KV configuration); Submit checks
  // that their tokens are the first t tokens of `prompt` and t < prompt size (INVALID_ARGUMENT
  // otherwise). If rebuilding the cache fails anyway, the request computes its whole prompt and
  // logs why. usage.cached_tokens = t when used.
  std::shared_ptr<const store::Record> restore_sequence;
  std::vector<std::shared_ptr<const store::Record>> restore_blocks;
  // Prefix-cache export: with export_block_tokens = B > 0, each time the tokens the cache consumed
  // (prompt and generated) pass a multiple of B, on_block gets kBlock records (kv_format.h
  // BlockExporter) keyed by ChainKey from prefix_root (prefix_cache.h), on the engine thread (it
  // must not block). Export stops for good when the sequence's cells stop being the token indices
  // (an eviction policy), or its streams are centred.
  int export_block_tokens = 0;
  store::Digest prefix_root{};
  struct BlockOut {
    std::vector<store::Digest> keys;  // chain keys of the blocks in [t0, t1); the record is stored
                                      // under keys.back()
    store::Digest parent;             // chain key before t0 (prefix_root when t0 = 0)
    int64_t t0 = 0, t1 = 0;
    std::vector<int32_t> tokens;      // [t1 - t0]
    std::string record;               // encoded kBlock record
  };
  std::function<void(BlockOut)> on_block;
  // The final event carries the encoded state (Event::state).
  bool save_state = false;
};

struct EngineOptions {
  int64_t kv_budget_bytes = int64_t(512) << 20;  // KV bytes all running sequences may hold
  int64_t n_ctx = 4096;          // per sequence: prompt + max_tokens without an eviction policy
  int max_batch_tokens = 512;    // rows per forward step (decodes + prefill chunks)
  int prefill_chunk = 256;       // a prompt is cut into chunks of this many tokens (≤ max_batch_tokens)
  int max_running = 256;         // sequences running at once
  int max_waiting = 1024;        // queued requests; Submit refuses beyond (RESOURCE_EXHAUSTED)
  double reserve_ratio = 1.0;    // fraction of max_tokens reserved at admission, in (0, 1]
};

// Histogram with fixed upper bounds (Prometheus "le" buckets), seconds.
struct Histogram {
  std::vector<double> bounds;     // ascending upper bounds; +Inf implied
  std::vector<uint64_t> counts;   // [bounds.size() + 1] non-cumulative
  double sum = 0;
  uint64_t count = 0;
  explicit Histogram(std::vector<double> b = {});
  void Observe(double v);
};

struct Stats {
  int64_t running = 0, waiting = 0;
  int64_t running_peak = 0;
  int64_t kv_bytes_used = 0, kv_bytes_budget = 0, kv_bytes_peak = 0;
  int64_t kv_bytes_reserved = 0;
  int64_t preemptions_total = 0;
  int64_t prompt_tokens_total = 0;       // prompt tokens admitted (recomputed ones not counted twice)
  int64_t generation_tokens_total = 0;
  int64_t requests_finished_total[5] = {};  // by FinishReason (index = enum value)
  int64_t requests_refused_total = 0;
  int64_t steps_total = 0;
  int64_t batch_rows_total = 0;
  Histogram ttft{}, itl{}, e2e{}, queue_time{};  // seconds
};

class Engine {
 public:
  // INVALID_ARGUMENT for options out of range (budget <= 0, chunk > max_batch_tokens, ...).
  static StatusOr<std::unique_ptr<Engine>> Create(const Model& model, EngineOptions opt);
  ~Engine();  // Shutdown(true) then joins the engine thread

  // Validates and queues a request. Errors (nothing is queued then):
  //   INVALID_ARGUMENT   empty prompt, token id outside the vocabulary, max_tokens < 0,
  //                      bad sampling values, bad stop strings, bad KV settings (codec/policy
  //                      spec errors name the spec), no sink;
  //   OUT_OF_RANGE       prompt + max_tokens > n_ctx without an eviction policy, or the request's
  //                      reservation exceeds the whole KV budget (message gives both numbers);
  //   RESOURCE_EXHAUSTED the waiting queue holds max_waiting requests;
  //   UNAVAILABLE        the engine is shutting down.
  StatusOr<RequestId> Submit(Request r);
  // Cancels a queued or running request (any thread; unknown or finished ids are ignored). Its KV
  // is freed at the next step, and its sink gets a final event with reason kCancelled.
  void Cancel(RequestId id);

  // One scheduler iteration (see the header comment). Returns false when there was nothing to do.
  bool Step();
  // Steps until no request is queued or running (tests, CLI).
  void RunUntilIdle();
  // Starts the engine thread (Step in a loop, sleeping while idle).
  void Start();
  // Stops admitting (Submit → UNAVAILABLE). cancel_running: cancel everything now; otherwise let
  // queued and running requests finish. Then the engine thread exits. Idempotent.
  void Shutdown(bool cancel_running);
  // Waits until the engine thread has exited (after Shutdown).
  void Join();

  Stats GetStats() const;
  const EngineOptions& options() const { return opt_; }
  const Model& model() const { return model_; }
  // The KV plan for a configuration (measured once per process and configuration, kv_plan.h).
  // INVALID_ARGUMENT for a bad configuration.
  StatusOr<std::shared_ptr<const KvPlan>> Plan(const KvSettings& kv);
  // Cells a request may hold at most: prompt + max_tokens, capped by the eviction policy.
  StatusOr<int64_t> MaxCells(const KvSettings& kv, int64_t n_prompt, int64_t n_total);

 private:
  struct Seq;
  Engine(const Model& m, EngineOptions o);
  Status Validate(const Request& r) const;
  void TakeInbox();
  void Admit();
  void PublishCounts();  // waiting / running into stats_ (engine thread)
  int64_t Reservation(const Seq& s);  // KV bytes reserved for s at the ratio in force
  void Finish(Seq& s, FinishReason reason, Status err = Status::Ok());
  void Preempt(Seq& s);
  // Rebuilds the cache from the request's stored KV (if any) and sets up block export.
  void RestoreStored(Seq& s, const kv::KvCacheConfig& cfg);
  void ExportBlocks(Seq& s);
  double Now() const;

  const Model& model_;
  EngineOptions opt_;
  double t0_ = 0;

  mutable std::mutex mu_;               // guards inbox_, cancels_, stats_, shutting_down_
  std::condition_variable cv_;
  std::deque<std::unique_ptr<Seq>> inbox_;
  std::vector<RequestId> cancels_;
  Stats stats_;
  bool shutting_down_ = false;
  bool cancel_all_ = false;
  RequestId next_id_ = 1;
  int64_t waiting_count_ = 0;           // inbox_ + waiting_ (Submit's bound)

  // Engine-thread state.
  std::deque<std::unique_ptr<Seq>> waiting_;
  std::vector<std::unique_ptr<Seq>> running_;  // admission order (newest last)
  ForwardScratch scratch_;
  double reserve_ratio_ = 1.0;  // in force: 1 after a preemption, decaying to opt_.reserve_ratio
  std::thread thread_;
};

}  // namespace kvc::engine
