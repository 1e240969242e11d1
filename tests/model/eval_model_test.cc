// `kvcrunch eval` on the real model: the baseline is row 0 with zero Δppl and zero SE; an f32
// cache is a near-copy of the f16 baseline; a lossy codec gets a positive standard error, and its
// Δppl equals the paired mean NLL difference the SE is computed from.
#include <gtest/gtest.h>

#include <cmath>
#include <filesystem>
#include <vector>

#include "../../tools/cli/lib/eval.h"  // RunEval (kvc_eval)
#include "model/model.h"
#include "../../tools/cli/lib/runner.h"

namespace kvc {
namespace {

const std::string kModel = std::string(KVC_SOURCE_DIR) + "/models/SmolLM2-135M-Instruct.Q4_1.gguf";

TEST(EvalModel, BaselineRowAndPairedStandardError) {
  if (!std::filesystem::exists(kModel)) GTEST_SKIP() << "model file missing: " << kModel;
  auto m = Model::Load(kModel);
  ASSERT_TRUE(m.ok()) << m.status().ToString();
  std::string text;
  for (int i = 0; i < 40; ++i) {
    text += "The river rose in the night and the village woke to water in the streets; " +
            std::to_string(i * 7) + " houses stood in it by morning. ";
  }
  auto toks = (*m)->tokenizer().Encode(text, false, false);
  ASSERT_TRUE(toks.ok());
  std::vector<KvRunConfig> cfgs;
  for (const char* spec : {"f32", "q4_0:rot=0"}) {
    auto c = ParseRunConfig(spec);
    ASSERT_TRUE(c.ok()) << c.status().ToString();
    cfgs.push_back(*c);
  }
  EvalOptions opt;
  opt.ppl.n_ctx = 256;
  opt.ppl.n_batch = 256;
  opt.ppl.max_chunks = 2;
  opt.decode_tokens = 0;
  auto r = RunEval(**m, *toks, cfgs, opt);
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  ASSERT_EQ(r->rows.size(), 3u);
  const auto& base = r->rows[0];
  EXPECT_EQ(base.dppl_pct, 0.0);
  EXPECT_EQ(base.dppl_se_pct, 0.0);
  EXPECT_GT(base.n_scored, 200);
  const auto& f32 = r->rows[1];
  const auto& q4 = r->rows[2];
  ASSERT_TRUE(f32.error.empty() && q4.error.empty()) << f32.error << q4.error;
  EXPECT_LT(std::fabs(f32.dppl_pct), 1.0);
  EXPECT_GT(q4.dppl_se_pct, 0.0);
  EXPECT_GT(q4.dppl_se_pct, f32.dppl_se_pct);  // a 4-bit cache moves each token's NLL more
  EXPECT_GT(q4.kld_mean, f32.kld_mean);
  EXPECT_LT(q4.dppl_se_pct, 20.0);  // an SE in percent points, not a ratio or a variance
}

}  // namespace
}  // namespace kvc
