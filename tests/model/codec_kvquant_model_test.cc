// KVQuant calibration on the real model (creates models/<model>.kvquant.json when missing) and
// the per-channel key statistics behind docs/quantization-advanced.md. Calibration text: a PG-19
// book (disjoint from the WikiText-2 test text used for perplexity). GTEST_SKIP without model.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <numeric>

#include "kv/cache.h"
#include "kv/codecs/kvquant.h"
#include "kv/rope.h"
#include "model/model.h"
#include "../../tools/cli/lib/kvquant_calib.h"  // CollectKvQuantSamples (kvc_eval)
#include "../../tools/cli/lib/runner.h"  // TokenizeText, ReadTextFile (kvc_eval)

namespace kvc {
namespace {

const std::string kRoot = KVC_SOURCE_DIR;
const std::string kModel = kRoot + "/models/SmolLM2-135M-Instruct.Q4_1.gguf";
const std::string kCalibOut = kRoot + "/models/SmolLM2-135M-Instruct.Q4_1.kvquant.json";
const std::string kCalibText = "/work/shared/data/pg19/pg1342_pride_and_prejudice_austen.txt";

TEST(KvQuantModel, CalibratesAndReportsKeyOutlierChannels) {
  if (!std::filesystem::exists(kModel)) GTEST_SKIP() << "model missing: " << kModel;
  if (!std::filesystem::exists(kCalibText)) GTEST_SKIP() << "PG-19 text missing";
  auto m = Model::Load(kModel);
  ASSERT_TRUE(m.ok()) << m.status().ToString();
  auto text = ReadTextFile(kCalibText);
  ASSERT_TRUE(text.ok());
  // Skip the Gutenberg header; 2 x 1024 tokens.
  auto toks = TokenizeText(**m, text->substr(std::min<size_t>(20000, text->size() / 4)));
  ASSERT_TRUE(toks.ok());
  const int n_ctx = 1024, n_chunks = 2;
  ASSERT_GE(int(toks->size()), n_ctx * n_chunks);
  auto s = CollectKvQuantSamples(**m, *toks, n_ctx, n_chunks,
                                kCalibText.substr(kCalibText.rfind('/') + 1));
  ASSERT_TRUE(s.ok()) << s.status().ToString();

  // Per-channel statistics of pre-RoPE keys: max|k| over tokens / median channel RMS per layer.
  const int hd = s->head_dim, nh = s->n_head_kv, w = hd * nh;
  for (int l = 0; l < s->n_layer; ++l) {
    const auto& K = s->k[l];
    const size_t n = K.size() / w;
    std::vector<double> rms(w, 0.0);
    for (size_t t = 0; t < n; ++t)
      for (int c = 0; c < w; ++c) rms[c] += double(K[t * w + c]) * K[t * w + c];
    for (auto& r : rms) r = std::sqrt(r / n);
    std::vector<int> ord(w);
    std::iota(ord.begin(), ord.end(), 0);
    std::sort(ord.begin(), ord.end(), [&](int a, int b) { return rms[a] > rms[b]; });
    std::vector<double> sorted(rms);
    std::sort(sorted.begin(), sorted.end());
    const double med = sorted[w / 2];
    std::printf("layer %2d: median ch RMS %.2f; top (head:ch RMS ratio) %d:%d %.1fx, %d:%d %.1fx, "
                "%d:%d %.1fx\n", l, med, ord[0] / hd, ord[0] % hd, rms[ord[0]] / med,
                ord[1] / hd, ord[1] % hd, rms[ord[1]] / med, ord[2] / hd, ord[2] % hd,
                rms[ord[2]] / med);
  }

  auto cal = kv::CalibrateKvQuant(*s);
  ASSERT_TRUE(cal.ok()) << cal.status().ToString();
  // Q-Norm constants (scale, shift) per layer at 2 bits: the k-means codebook shrinks the spread
  // of the normalised values, so the scale is > 1 everywhere.
  for (int l = 0; l < s->n_layer; l += 7) {
    const auto& kq = cal->tensors.at("kvquant.k_qn2.L" + std::to_string(l));
    const auto& vq = cal->tensors.at("kvquant.v_qn2.L" + std::to_string(l));
    std::printf("layer %2d Q-Norm 2-bit: K scale %.4f shift %+.4f, V scale %.4f shift %+.4f\n", l,
                kq[0], kq[1], vq[0], vq[1]);
    EXPECT_GT(kq[0], 1.f);
    EXPECT_GT(vq[0], 1.f);
  }
  auto old = kv::LoadCalibrationJson(kCalibOut);
  if (!std::filesystem::exists(kCalibOut) || !old.ok() || !kv::IsCurrentKvQuantCalibration(*old)) {
    ASSERT_TRUE(kv::SaveCalibrationJson(*cal, kCalibOut).ok());
    std::printf("wrote %s (%s)\n", kCalibOut.c_str(), cal->source.c_str());
  }
  // The saved file builds codecs for every layer of this model.
  kv::CodecContext ctx;
  ctx.n_layer = s->n_layer;
  ctx.n_head_kv = nh;
  ctx.dim = hd;
  ctx.layer = s->n_layer - 1;
  ctx.head = nh - 1;
  for (const char* spec : {"kvquant:bits=3", "kvquant:bits=2", "kvquant:bits=4"}) {
    auto c = kv::MakeCodec(std::string(spec) + ",calib=" + kCalibOut, ctx);
    ASSERT_TRUE(c.ok()) << c.status().ToString();
    EXPECT_TRUE((*c)->wants_pre_rope_keys());
  }
}

}  // namespace
}  // namespace kvc
