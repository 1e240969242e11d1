// The batched engine on the real model (SmolLM2-135M): batch invariance across codecs and policies
// (a sequence's logits and tokens are bit-identical alone and batched with others), admission,
// queueing and preemption under a tiny KV budget (every request completes, KV bytes as allocated
// never exceed the budget), refusals with numbers, cancellation frees KV, the KV plan bounds what
// caches allocate.
#include <gtest/gtest.h>

#include <chrono>
#include <cstring>
#include <filesystem>
#include <thread>
#include <map>
#include <mutex>
#include <string>
#include <vector>

#include "engine/engine.h"
#include "model/model.h"

namespace kvc::engine {
namespace {

const std::string kModel = std::string(KVC_SOURCE_DIR) + "/models/SmolLM2-135M-Instruct.Q4_1.gguf";

struct Result {
  std::vector<int32_t> tokens;
  std::vector<std::vector<float>> logits;
  std::string text;
  bool finished = false;
  FinishReason reason = FinishReason::kNone;
  Status error;
  RequestUsage usage;
  int finals = 0;
};

class EngineModel : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    if (!std::filesystem::exists(kModel)) return;
    auto m = Model::Load(kModel);
    ASSERT_TRUE(m.ok()) << m.status().ToString();
    model_ = std::move(m).value().release();
  }
  void SetUp() override {
    if (!model_) GTEST_SKIP() << "model file missing: " << kModel;
  }
  std::vector<int32_t> Prompt(int n, int variant) {
    static const char* kTexts[] = {
        "The quick brown fox jumps over the lazy dog near the river bank. ",
        "It was the best of times, it was the worst of times, it was the age of wisdom. ",
        "In the beginning the universe was created. This has made a lot of people angry. ",
        "Call me Ishmael. Some years ago, never mind how long precisely, having little money. ",
    };
    std::string text;
    while (int(text.size()) < n * 6) text += kTexts[variant % 4];
    auto t = model_->tokenizer().Encode(text, false, false);
    EXPECT_TRUE(t.ok());
    t->resize(size_t(n));
    (*t)[0] = int32_t(100 + variant);  // distinct first token per variant
    return *t;
  }
  static KvSettings Kv(const std::string& codec, const std::string& evict = "", int sinks = 0) {
    KvSettings kv;
    kv.cache.k_codec = kv.cache.v_codec = codec;
    kv.cache.sink_tokens = sinks;
    kv.evict = evict;
    return kv;
  }
  // Submits and returns a slot the sink fills.
  static RequestId Submit(Engine& e, std::vector<int32_t> prompt, KvSettings kv, int max_tokens,
                          Result* out, bool logits = true) {
    Request r;
    r.prompt = std::move(prompt);
    r.kv = std::move(kv);
    r.gen.max_tokens = max_tokens;
    r.gen.sampling.temperature = 0;
    r.gen.ignore_eos = true;
    r.gen.return_logits = logits;
    r.sink = [out](const Event& ev) {
      if (ev.token >= 0) {
        out->tokens.push_back(ev.token);
        if (!ev.logits.empty()) out->logits.push_back(ev.logits);
      }
      out->text += ev.text;
      if (ev.finished) {
        out->finished = true;
        out->reason = ev.reason;
        out->error = ev.error;
        out->usage = ev.usage;
        out->finals += 1;
      }
    };
    auto id = e.Submit(std::move(r));
    EXPECT_TRUE(id.ok()) << id.status().ToString();
    return id.ok() ? *id : 0;
  }
  static std::unique_ptr<Engine> Make(EngineOptions o) {
    auto e = Engine::Create(*model_, o);
    EXPECT_TRUE(e.ok()) << e.status().ToString();
    return std::move(e).value();
  }
  static Model* model_;
};
Model* EngineModel::model_ = nullptr;

// One request per configuration, each run alone, then all together in one engine (their prefill
// chunks and decodes share forward steps): bit-identical logits and tokens.
TEST_F(EngineModel, BatchInvarianceAcrossCodecsAndPolicies) {
  const std::vector<KvSettings> kvs = {
      Kv("f16"),
      Kv("q8_0"),
      Kv("q4_0"),
      Kv("kivi:bits=2,group=32,residual=32"),
      Kv("turbo3"),
      Kv("polar"),
      Kv("f16", "snapkv:budget=48,window=8"),
      Kv("q8_0", "tova:budget=64,when=step"),
      Kv("f16", "streaming:sink=4,window=40"),
      Kv("q4_0", "h2o:heavy=24,recent=24"),
  };
  const int kGen = 8;
  EngineOptions o;
  o.kv_budget_bytes = int64_t(1) << 30;
  o.n_ctx = 512;
  o.max_batch_tokens = 96;
  o.prefill_chunk = 32;
  std::vector<Result> alone(kvs.size()), together(kvs.size());
  std::vector<std::vector<int32_t>> prompts;
  for (size_t i = 0; i < kvs.size(); ++i) prompts.push_back(Prompt(50 + 7 * int(i), int(i)));
  for (size_t i = 0; i < kvs.size(); ++i) {
    auto e = Make(o);
    Submit(*e, prompts[i], kvs[i], kGen, &alone[i]);
    e->RunUntilIdle();
    ASSERT_TRUE(alone[i].finished) << kvs[i].Label();
    ASSERT_EQ(alone[i].reason, FinishReason::kLength) << kvs[i].Label() << alone[i].error.ToString();
  }
  auto e = Make(o);
  for (size_t i = 0; i < kvs.size(); ++i) Submit(*e, prompts[i], kvs[i], kGen, &together[i]);
  e->RunUntilIdle();
  const Stats st = e->GetStats();
  EXPECT_GT(st.running_peak, 3);  // they did share steps
  for (size_t i = 0; i < kvs.size(); ++i) {
    SCOPED_TRACE(kvs[i].Label());
    ASSERT_TRUE(together[i].finished);
    EXPECT_EQ(together[i].tokens, alone[i].tokens);
    ASSERT_EQ(together[i].logits.size(), alone[i].logits.size());
    for (size_t t = 0; t < alone[i].logits.size(); ++t) {
      ASSERT_EQ(0, std::memcmp(together[i].logits[t].data(), alone[i].logits[t].data(),
                               alone[i].logits[t].size() * sizeof(float)))
          << "logits of step " << t << " differ";
    }
  }
}

// The engine alone reproduces the single-sequence Session token for token (same chunking).
TEST_F(EngineModel, AloneEqualsSession) {
  const auto prompt = Prompt(80, 1);
  kv::KvCacheConfig cfg;
  cfg.k_codec = cfg.v_codec = "q8_0";
  Session::Options so;
  so.n_ctx = 512;
  so.n_batch = 32;
  auto s = Session::Create(*model_, cfg, "", so);
  ASSERT_TRUE(s.ok());
  std::vector<float> logits;
  ASSERT_TRUE((*s)->Eval(prompt, false, &logits).ok());
  std::vector<int32_t> want;
  for (int i = 0; i < 10; ++i) {
    const int32_t t = int32_t(std::max_element(logits.begin(), logits.end()) - logits.begin());
    want.push_back(t);
    ASSERT_TRUE((*s)->Eval({t}, false, &logits).ok());
  }
  EngineOptions o;
  o.n_ctx = 512;
  o.prefill_chunk = 32;
  o.max_batch_tokens = 64;
  auto e = Make(o);
  Result r;
  KvSettings kv;
  kv.cache = cfg;
  Submit(*e, prompt, kv, 10, &r, false);
  e->RunUntilIdle();
  EXPECT_EQ(r.tokens, want);
}

// A budget that holds about two sequences; six requests, reservations at 30 % of max_tokens so
// running sequences outgrow the budget: preemption (newest first), recompute, every request
// completes with all its tokens, and the KV bytes as allocated never exceed the budget.
TEST_F(EngineModel, TinyBudgetQueuesAndPreempts) {
  EngineOptions o;
  o.n_ctx = 512;
  o.max_batch_tokens = 64;
  o.prefill_chunk = 32;
  o.reserve_ratio = 0.3;
  auto probe = Make(o);
  auto plan = probe->Plan(Kv("f16"));
  ASSERT_TRUE(plan.ok());
  const int kPrompt = 60, kGen = 100;
  // Reservations (60 + 30 tokens) fit three sequences, their growth (160 tokens each) two.
  o.kv_budget_bytes = 2 * (*plan)->Bytes(kPrompt + kGen) + (*plan)->Bytes(16);
  auto e = Make(o);
  std::vector<Result> res(6);
  for (int i = 0; i < 6; ++i) Submit(*e, Prompt(kPrompt, i), Kv("f16"), kGen, &res[size_t(i)]);
  int64_t max_used = 0;
  while (e->Step()) {
    const Stats st = e->GetStats();
    max_used = std::max(max_used, st.kv_bytes_used);
    ASSERT_LE(st.kv_bytes_used, o.kv_budget_bytes);
  }
  e->RunUntilIdle();
  const Stats st = e->GetStats();
  EXPECT_LE(st.kv_bytes_peak, o.kv_budget_bytes);
  EXPECT_GT(st.preemptions_total, 0);
  EXPECT_GE(st.running_peak, 2);
  EXPECT_GT(max_used, 0);
  for (auto& r : res) {
    ASSERT_TRUE(r.finished);
    EXPECT_EQ(r.reason, FinishReason::kLength) << r.error.ToString();
    EXPECT_EQ(int(r.tokens.size()), kGen);
    EXPECT_EQ(r.finals, 1);
  }
  // Preemption does not change a greedy request's tokens: each equals its run without preemption
  // (the recompute replays generated tokens as they were decoded; a prefill chunk takes the tiled
  // attention path, whose rounding differs, and the greedy text diverged).
  EngineOptions big = o;
  big.kv_budget_bytes = int64_t(512) << 20;
  auto eb = Make(big);
  std::vector<Result> ref(6);
  for (int i = 0; i < 6; ++i) Submit(*eb, Prompt(kPrompt, i), Kv("f16"), kGen, &ref[size_t(i)]);
  eb->RunUntilIdle();
  EXPECT_EQ(eb->GetStats().preemptions_total, 0);
  for (int i = 0; i < 6; ++i) {
    EXPECT_EQ(res[size_t(i)].tokens, ref[size_t(i)].tokens)
        << "request " << i << " preempted " << res[size_t(i)].usage.preemptions << " times";
    EXPECT_TRUE(res[size_t(i)].logits == ref[size_t(i)].logits)
        << "request " << i << " preempted " << res[size_t(i)].usage.preemptions << " times";
  }
  // Compressed KV holds more sequences in the same bytes.
  EngineOptions o4 = o;
  o4.reserve_ratio = 1.0;
  auto e4 = Make(o4);
  std::vector<Result> r4(6);
  for (int i = 0; i < 6; ++i) Submit(*e4, Prompt(kPrompt, i), Kv("q4_0"), kGen, &r4[size_t(i)], false);
  e4->RunUntilIdle();
  EXPECT_GT(e4->GetStats().running_peak, 2);
  EXPECT_EQ(e4->GetStats().preemptions_total, 0);
  EXPECT_LE(e4->GetStats().kv_bytes_peak, o4.kv_budget_bytes);
}

TEST_F(EngineModel, RefusalsAndCancel) {
  EngineOptions o;
  o.n_ctx = 256;
  o.kv_budget_bytes = 4 << 20;
  o.max_waiting = 2;
  auto e = Make(o);
  Result r;
  Request bad;
  bad.sink = [](const Event&) {};
  bad.gen.max_tokens = 8;
  EXPECT_EQ(e->Submit(bad).status().code(), StatusCode::kInvalidArgument);  // empty prompt
  bad.prompt = {1, 2, 999999};
  EXPECT_EQ(e->Submit(bad).status().code(), StatusCode::kInvalidArgument);  // bad id
  bad.prompt = {1, 2, 3};
  bad.gen.max_tokens = -1;
  EXPECT_EQ(e->Submit(bad).status().code(), StatusCode::kInvalidArgument);
  bad.gen.max_tokens = 300;  // > n_ctx
  auto st = e->Submit(bad).status();
  EXPECT_EQ(st.code(), StatusCode::kOutOfRange);
  EXPECT_NE(st.message().find("256"), std::string::npos) << st.ToString();
  bad.gen.max_tokens = 8;
  bad.kv = Kv("nosuchcodec");
  EXPECT_EQ(e->Submit(bad).status().code(), StatusCode::kInvalidArgument);
  bad.kv = Kv("f16", "nosuchpolicy:budget=3");
  EXPECT_EQ(e->Submit(bad).status().code(), StatusCode::kInvalidArgument);
  // More sink tokens than the context can hold: refused at once. (Measuring the KV plan of a
  // 1M-token sink segment took minutes and > 1 GB on the submitting thread.)
  bad.kv = Kv("f16");
  bad.kv.cache.sink_tokens = 1 << 20;
  {
    const auto t0 = std::chrono::steady_clock::now();
    st = e->Submit(bad).status();
    EXPECT_EQ(st.code(), StatusCode::kInvalidArgument) << st.ToString();
    EXPECT_NE(st.message().find("sink"), std::string::npos) << st.ToString();
    EXPECT_LT(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count(), 5.0);
  }
  // Demotion / activation-found sinks: the KV plan does not count their side tiers, so the engine
  // (and the server behind it: INVALID_ARGUMENT is its 400) refuses them with a message naming them.
  bad.kv = Kv("q8_0", "tova:ratio=0.5");
  bad.kv.cache.demote_k_codec = bad.kv.cache.demote_v_codec = "turbo2";
  st = e->Submit(bad).status();
  EXPECT_EQ(st.code(), StatusCode::kInvalidArgument) << st.ToString();
  EXPECT_NE(st.message().find("demote="), std::string::npos) << st.ToString();
  bad.kv = Kv("f16");
  bad.kv.cache.sink_detect = 4;
  EXPECT_EQ(e->Submit(bad).status().code(), StatusCode::kInvalidArgument);
  // Can never fit: 250 tokens of f16 need ~6 MB > 4 MiB.
  bad.kv = Kv("f16");
  bad.prompt = Prompt(200, 0);
  bad.gen.max_tokens = 50;
  st = e->Submit(bad).status();
  EXPECT_EQ(st.code(), StatusCode::kOutOfRange);
  EXPECT_NE(st.message().find("KV budget"), std::string::npos) << st.ToString();
  // Queue bound, then cancel: KV freed, one final event each.
  Result a, b;
  const RequestId ia = Submit(*e, Prompt(40, 1), Kv("f16"), 30, &a, false);
  Submit(*e, Prompt(40, 2), Kv("f16"), 30, &b, false);
  bad.prompt = Prompt(10, 3);
  EXPECT_EQ(e->Submit(bad).status().code(), StatusCode::kResourceExhausted);
  e->Step();
  e->Step();
  EXPECT_GT(e->GetStats().kv_bytes_used, 0);
  e->Cancel(ia);
  e->RunUntilIdle();
  EXPECT_EQ(a.reason, FinishReason::kCancelled);
  EXPECT_EQ(a.finals, 1);
  EXPECT_EQ(b.reason, FinishReason::kLength);
  EXPECT_EQ(e->GetStats().kv_bytes_used, 0);
  EXPECT_GE(e->GetStats().requests_refused_total, 8);
}

// Threaded: the engine thread serves requests submitted from other threads; Shutdown(false)
// finishes them; Submit is refused after.
TEST_F(EngineModel, ThreadAndShutdown) {
  EngineOptions o;
  o.n_ctx = 256;
  auto e = Make(o);
  e->Start();
  std::mutex mu;
  std::vector<Result> res(3);
  std::vector<std::thread> th;
  for (int i = 0; i < 3; ++i) {
    th.emplace_back([&, i] {
      Result* out = &res[size_t(i)];
      Request r;
      r.prompt = Prompt(20, i);
      r.gen.max_tokens = 5;
      r.gen.sampling.temperature = 0.7f;
      r.gen.sampling.seed = uint64_t(i);
      r.sink = [out, &mu](const Event& ev) {
        std::lock_guard<std::mutex> lk(mu);
        if (ev.token >= 0) out->tokens.push_back(ev.token);
        if (ev.finished) {
          out->finished = true;
          out->reason = ev.reason;
        }
      };
      EXPECT_TRUE(e->Submit(std::move(r)).ok());
    });
  }
  for (auto& t : th) t.join();
  e->Shutdown(false);
  e->Join();
  for (auto& r : res) {
    EXPECT_TRUE(r.finished);
    EXPECT_NE(r.reason, FinishReason::kCancelled);
  }
  Request late;
  late.prompt = {1, 2};
  late.sink = [](const Event&) {};
  EXPECT_EQ(e->Submit(late).status().code(), StatusCode::kUnavailable);
}

}  // namespace
}  // namespace kvc::engine
