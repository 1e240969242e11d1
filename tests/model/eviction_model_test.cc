// Eviction on the real model (SmolLM2-135M): the budget's bytes are never exceeded while
// generating, a budget above the prompt changes nothing, compressed contexts can be reused for
// several questions exactly, policies compose with quantized codecs, decisions are deterministic.
#include <gtest/gtest.h>

#include <cmath>
#include <filesystem>
#include <vector>

#include "cpu/ops.h"
#include "kv/policies/common.h"
#include "model/model.h"

namespace kvc {
namespace {

const std::string kModel = std::string(KVC_SOURCE_DIR) + "/models/SmolLM2-135M-Instruct.Q4_1.gguf";

class EvictionModel : public ::testing::Test {
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
  std::vector<int32_t> Prompt(int n) {
    std::string text;
    while (int(text.size()) < n * 6) text += "The quick brown fox jumps over the lazy dog near the river bank. ";
    auto t = model_->tokenizer().Encode(text, false, false);
    EXPECT_TRUE(t.ok());
    t->resize(n);
    return *t;
  }
  std::unique_ptr<Session> Make(const std::string& evict, const std::string& codec = "f16",
                                kv::PositionMode pos = kv::PositionMode::kOriginal) {
    kv::KvCacheConfig cfg;
    cfg.k_codec = cfg.v_codec = codec;
    cfg.position_mode = pos;
    Session::Options o;
    o.n_ctx = 4096;
    auto s = Session::Create(*model_, cfg, evict, o);
    EXPECT_TRUE(s.ok()) << s.status().ToString();
    return std::move(s).value();
  }
  static Model* model_;
};
Model* EvictionModel::model_ = nullptr;

int32_t Argmax(const std::vector<float>& l) {
  return int32_t(std::max_element(l.begin(), l.end()) - l.begin());
}

TEST_F(EvictionModel, StreamingBudgetBytesNeverExceeded) {
  for (const char* codec : {"f16", "q8_0"}) {
    auto s = Make("streaming:sink=4,window=60", codec);
    const auto& c = s->cache();
    std::vector<float> logits;
    ASSERT_TRUE(s->Eval(Prompt(32), false, &logits).ok());
    const size_t per_token = size_t(c.shape().n_layer) * c.shape().n_head_kv * 2 *
                             c.body_codec(0, kv::KvKind::kKey).BlockBytes();
    for (int i = 0; i < 200; ++i) {
      ASSERT_TRUE(s->Eval({Argmax(logits)}, false, &logits).ok());
      ASSERT_LE(c.Memory().KvBytes(), per_token * 64) << codec << " step " << i;
    }
    EXPECT_EQ(c.n_cells(29, 2), 64);
  }
}

TEST_F(EvictionModel, BudgetAbovePromptChangesNothing) {
  const auto p = Prompt(96);
  std::vector<float> a, b;
  ASSERT_TRUE(Make("")->Eval(p, false, &a).ok());
  auto s = Make("snapkv:budget=1024", "f16", kv::PositionMode::kRerotateOnce);
  ASSERT_TRUE(s->Eval(p, false, &b).ok());
  float worst = 0;
  for (size_t i = 0; i < a.size(); ++i) worst = std::max(worst, std::fabs(a[i] - b[i]));
  EXPECT_LE(worst, 1e-4f);
  EXPECT_EQ(s->cache().n_cells(0, 0), 96);
}

TEST_F(EvictionModel, CompressedContextReusedForSeveralQuestions) {
  const auto ctx = Prompt(160);
  const std::vector<int32_t> q1 = Prompt(8), q12 = Prompt(12);
  const std::vector<int32_t> q2(q12.begin() + 4, q12.end());
  for (const char* evict : {"snapkv:ratio=0.5,once=1", "knorm:ratio=0.5,pos=rerotate,once=1"}) {
    auto reuse = Make(evict);
    ASSERT_TRUE(reuse->Eval(ctx, false, nullptr).ok());
    const int64_t last = reuse->n_past() - 1;
    std::vector<float> l1, l2;
    ASSERT_TRUE(reuse->Eval(q1, false, &l1).ok());
    ASSERT_TRUE(reuse->cache().TruncateAfter(last).ok());
    ASSERT_TRUE(reuse->Eval(q2, false, &l2).ok());
    auto fresh = Make(evict);
    ASSERT_TRUE(fresh->Eval(ctx, false, nullptr).ok());
    std::vector<float> f2;
    ASSERT_TRUE(fresh->Eval(q2, false, &f2).ok());
    float worst = 0;
    for (size_t i = 0; i < f2.size(); ++i) worst = std::max(worst, std::fabs(l2[i] - f2[i]));
    EXPECT_LE(worst, 1e-3f) << evict;
  }
}

TEST_F(EvictionModel, PolicyComposesWithQuantizedCodecAndFreesBytes) {
  const auto p = Prompt(256);
  auto full = Make("", "q8_0");
  ASSERT_TRUE(full->Eval(p, false, nullptr).ok());
  auto s = Make("snapkv:budget=64", "q8_0");
  ASSERT_TRUE(s->Eval(p, false, nullptr).ok());
  EXPECT_EQ(s->cache().n_cells(5, 1), 64);
  EXPECT_LE(double(s->cache().Memory().KvBytes()), 0.26 * full->cache().Memory().KvBytes());
  EXPECT_NEAR(kv::RemovedFraction(s->cache()), 0.75, 1e-9);
}

TEST_F(EvictionModel, DeterministicAcrossRunsAndThreads) {
  const auto p = Prompt(200);
  std::vector<std::vector<int64_t>> kept;
  for (int threads : {1, 2, 2}) {
    cpu::SetNumThreads(threads);
    auto s = Make("adakv:base=snapkv,budget=48,window=8");
    ASSERT_TRUE(s->Eval(p, false, nullptr).ok());
    std::vector<int64_t> all;
    for (int l = 0; l < 30; ++l) {
      for (int h = 0; h < 3; ++h) {
        all.insert(all.end(), s->cache().seqs(l, h).begin(), s->cache().seqs(l, h).end());
      }
    }
    kept.push_back(all);
  }
  cpu::SetNumThreads(2);
  EXPECT_EQ(kept[1], kept[2]) << "same thread count, two runs";
  EXPECT_EQ(kept[0], kept[1]) << "1 vs 2 threads";
}

}  // namespace
}  // namespace kvc

namespace kvc {
namespace {
// An explicitly requested position mode wins over the policy's default, even when it is
// "original" (the default value of the field): StreamingLLM defaults to in-cache positions.
TEST_F(EvictionModel, ExplicitOriginalPositionsWinOverStreamingDefault) {
  kv::KvCacheConfig cfg;
  Session::Options o;
  o.n_ctx = 256;
  auto def = Session::Create(*model_, cfg, "streaming:sink=4,window=60", o);
  ASSERT_TRUE(def.ok()) << def.status().ToString();
  EXPECT_NE((*def)->cache().Describe().find("pos=in-cache"), std::string::npos);
  cfg.position_mode = kv::PositionMode::kOriginal;
  cfg.position_mode_set = true;
  auto orig = Session::Create(*model_, cfg, "streaming:sink=4,window=60", o);
  ASSERT_TRUE(orig.ok()) << orig.status().ToString();
  EXPECT_EQ((*orig)->cache().Describe().find("in-cache"), std::string::npos)
      << (*orig)->cache().Describe();
}
}  // namespace
}  // namespace kvc
