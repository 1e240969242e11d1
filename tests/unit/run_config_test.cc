// eval / retrieval --config: per-layer codec keys (k@L=, v@L=, kv@L=) fill KvCacheConfig's
// k_codec_layer / v_codec_layer, FitLayerOverrides pads them to n_layer, and bad lists are errors.
#include <gtest/gtest.h>

#include <random>
#include <set>

#include "../../tools/cli/lib/runner.h"
#include "kv/cache.h"

namespace kvc {
namespace {

TEST(RunConfig, PerLayerCodecs) {
  auto c = ParseRunConfig("k=f16 v=q8_0 k@3-5=turbo3 v@0,7=q4_0 kv@9=fp8 sinks=1");
  ASSERT_TRUE(c.ok()) << c.status().ToString();
  EXPECT_EQ(c->cache.k_codec, "f16");
  EXPECT_EQ(c->cache.v_codec, "q8_0");
  ASSERT_TRUE(FitLayerOverrides(&*c, 12).ok());
  ASSERT_EQ(c->cache.k_codec_layer.size(), 12u);
  ASSERT_EQ(c->cache.v_codec_layer.size(), 12u);
  for (int l = 0; l < 12; ++l) {
    EXPECT_EQ(c->cache.k_codec_layer[l], (l >= 3 && l <= 5) ? "turbo3" : l == 9 ? "fp8" : "") << l;
    EXPECT_EQ(c->cache.v_codec_layer[l], (l == 0 || l == 7) ? "q4_0" : l == 9 ? "fp8" : "") << l;
  }
  EXPECT_EQ(c->Label(), "K:f16 V:q8_0 K@3-5:turbo3 K@9:fp8 V@0:q4_0 V@7:q4_0 V@9:fp8 sinks:1");
  // A codec spec with its own parameters after the '='.
  auto t = ParseRunConfig("q8_0 k@4=turbo:bits=3,nc=1,center=1");
  ASSERT_TRUE(t.ok()) << t.status().ToString();
  ASSERT_EQ(t->cache.k_codec_layer.size(), 5u);
  EXPECT_EQ(t->cache.k_codec_layer[4], "turbo:bits=3,nc=1,center=1");
  EXPECT_TRUE(t->cache.v_codec_layer.empty());
}

TEST(RunConfig, PerLayerCodecErrors) {
  for (const char* bad : {"k@=q8_0", "k@x=q8_0", "k@5-3=q8_0", "k@-1=q8_0", "k@1,=q8_0",
                          "q@1=q8_0", "k@1=", "k@1-2=q8_0 k@2=q4_0", "kv@1=q8_0 v@1=q4_0"}) {
    EXPECT_FALSE(ParseRunConfig(bad).ok()) << bad;
  }
  auto c = ParseRunConfig("q8_0 k@30=turbo3");
  ASSERT_TRUE(c.ok());
  EXPECT_FALSE(FitLayerOverrides(&*c, 30).ok());  // layers 0-29 only
  EXPECT_TRUE(FitLayerOverrides(&*c, 31).ok());
}

}  // namespace
}  // namespace kvc

namespace kvc {
namespace {

TEST(RunConfig, DemoteAndSinkDetectKeys) {
  auto c = ParseRunConfig("q8_0 evict=tova:ratio=0.75 demote=turbo2 sink_detect=4 sink_detect_layer=3");
  ASSERT_TRUE(c.ok()) << c.status().ToString();
  EXPECT_EQ(c->cache.demote_k_codec, "turbo2");
  EXPECT_EQ(c->cache.demote_v_codec, "turbo2");
  EXPECT_FLOAT_EQ(c->cache.sink_detect, 4.f);
  EXPECT_EQ(c->cache.sink_detect_layer, 3);
  EXPECT_NE(c->Label().find("demote:turbo2"), std::string::npos) << c->Label();
  auto d = ParseRunConfig("f16 demote_k=turbo:bits=2,center=1 demote_v=q4_0");
  ASSERT_TRUE(d.ok());
  EXPECT_EQ(d->cache.demote_k_codec, "turbo:bits=2,center=1");
  EXPECT_EQ(d->cache.demote_v_codec, "q4_0");
  EXPECT_EQ(ParseRunConfig("f16 sink_detect=0.5").status().code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(ParseRunConfig("f16 sink_detect=x").status().code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(ParseRunConfig("f16 sink_detect_layer=-1").status().code(), StatusCode::kInvalidArgument);
}

TEST(RunConfigPreset, ExpandsAndOverrides) {
  ASSERT_GE(KvPresets().size(), 4u);
  for (const char* name : {"kvc4", "kvc3", "kvc2", "kvc-25"}) {
    const KvPreset* p = nullptr;
    for (const auto& x : KvPresets()) if (x.name == name) p = &x;
    ASSERT_NE(p, nullptr) << name;
    auto direct = ParseRunConfig(p->config);
    auto via = ParseRunConfig(std::string("preset=") + name);
    ASSERT_TRUE(direct.ok() && via.ok()) << name;
    EXPECT_EQ(via->cache.k_codec, direct->cache.k_codec);
    EXPECT_EQ(via->cache.v_codec, direct->cache.v_codec);
    EXPECT_EQ(via->cache.k_transform, direct->cache.k_transform);
    EXPECT_EQ(via->cache.sink_tokens, direct->cache.sink_tokens);
    EXPECT_EQ(via->cache.k_codec_layer, direct->cache.k_codec_layer);
    EXPECT_EQ(via->evict, direct->evict);
    EXPECT_EQ(via->Label(), name);
    EXPECT_FALSE(p->summary.empty());
  }
  // Keys after the preset override it; the label says so.
  auto o = ParseRunConfig("preset=kvc3 sinks=4 v=q8_0");
  ASSERT_TRUE(o.ok()) << o.status().ToString();
  EXPECT_EQ(o->cache.sink_tokens, 4);
  EXPECT_EQ(o->cache.v_codec, "q8_0");
  EXPECT_EQ(o->Label(), "kvc3 sinks=4 v=q8_0");
  auto named = ParseRunConfig("name=mine preset=kvc4");
  ASSERT_TRUE(named.ok());
  EXPECT_EQ(named->Label(), "mine");
  // Errors: unknown name (lists the known ones), given twice.
  auto bad = ParseRunConfig("preset=kvc1");
  ASSERT_FALSE(bad.ok());
  EXPECT_NE(std::string(bad.status().message()).find("kvc3"), std::string::npos);
  EXPECT_FALSE(ParseRunConfig("preset=kvc3 preset=kvc4").ok());
  EXPECT_FALSE(ParseRunConfig("preset=").ok());
}


// Every preset stays inside its class on SmolLM2-135M's KV shape at 4,096 tokens, counting all
// allocated bytes (sinks, fp16 windows and tails, scales, norms) as eval does.
TEST(RunConfigPreset, AllInBitsWithinClassAt4096) {
  kv::KvShape s;
  s.n_layer = 30;
  // One KV head per layer (SmolLM2 has 3): every head is stored alike, so the ratio is the same
  // and the test runs 3x faster.
  s.n_head = 3;
  s.n_head_kv = 1;
  s.head_dim = 64;
  s.rope.theta = 100000.0;
  s.rope.n_rot = 64;
  const int n = 4096;
  std::mt19937 rng(1);
  std::normal_distribution<float> nd;
  std::vector<float> k(size_t(n) * 64), v(k.size());
  for (auto& x : k) x = nd(rng);
  for (auto& x : v) x = nd(rng);
  std::vector<int64_t> seq(n);
  for (int i = 0; i < n; ++i) seq[i] = i;
  for (const auto& p : KvPresets()) {
    auto rc = ParseRunConfig("preset=" + p.name);
    ASSERT_TRUE(rc.ok()) << p.name;
    ASSERT_TRUE(FitLayerOverrides(&*rc, s.n_layer).ok()) << p.name;
    ASSERT_TRUE(rc->evict.empty()) << p.name << ": eviction presets need a byte count with the policy";
    // Predictive presets store residuals in the same codecs (same bytes: Predictive.* tests); the
    // predictor file ("auto") is prepared by the CLI, not needed to count bytes.
    rc->cache.predict.clear();
    auto cache = kv::KvCache::Create(s, rc->cache);
    ASSERT_TRUE(cache.ok()) << p.name << ": " << cache.status().ToString();
    for (int l = 0; l < s.n_layer; ++l) ASSERT_TRUE((*cache)->Write(l, seq.data(), n, k.data(), v.data()).ok());
    (*cache)->Flush();
    const double f16_bytes = 2.0 * s.n_layer * s.n_head_kv * s.head_dim * 2 * n;
    const double bits = 16.0 * double((*cache)->Memory().KvBytes()) / f16_bytes;
    std::printf("%-7s %.4f bits/value all in (class <= %.2f)\n", p.name.c_str(), bits, p.bits_limit);
    EXPECT_LE(bits, p.bits_limit) << p.name;
  }
}

// The main job's default table: every row parses and builds a cache (KVQuant rows need a
// calibration file and are only parsed), each family's paper recipe is present, a "[best]" row
// always follows a "[paper]" row of its family, and the presets close the list.
TEST(RunConfigDefaults, EveryDefaultRowParsesAndBuilds) {
  const auto rows = DefaultRunConfigs();
  ASSERT_EQ(rows.size(), 26u);
  kv::KvShape s;
  s.n_layer = 30;  // presets name layers up to 29
  s.n_head = 3;
  s.n_head_kv = 1;
  s.head_dim = 64;
  s.rope.theta = 100000.0;
  s.rope.n_rot = 64;
  std::set<std::string> labels;
  int paper = 0, best = 0, preset = 0;
  for (size_t i = 0; i < rows.size(); ++i) {
    KvRunConfig rc = rows[i];
    const std::string label = rc.Label();
    EXPECT_TRUE(labels.insert(label).second) << "duplicate row " << label;
    if (label.rfind("[paper] ", 0) == 0) ++paper;
    if (label.rfind("[preset] ", 0) == 0) ++preset;
    if (label.rfind("[best] ", 0) == 0) {
      ++best;
      ASSERT_GT(i, 0u);
      EXPECT_EQ(rows[i - 1].Label().rfind("[paper] ", 0), 0u) << label << " follows no paper row";
    }
    if (label.find("kvquant") != std::string::npos) continue;
    ASSERT_TRUE(FitLayerOverrides(&rc, s.n_layer).ok()) << label;
    rc.cache.predict.clear();  // "auto" is resolved by the CLI (EnsurePredictCalibration)
    auto cache = kv::KvCache::Create(s, rc.cache);
    EXPECT_TRUE(cache.ok()) << label << ": " << cache.status().ToString();
  }
  EXPECT_EQ(paper, 10);
  EXPECT_EQ(best, 7);
  EXPECT_EQ(preset, 4);
  EXPECT_EQ(rows.back().Label(), "[preset] kvc-25");
}

}  // namespace
}  // namespace kvc

// KV config files (calibrate --method bits output): config=FILE / file=FILE in --config strings,
// LoadRunConfigFile (--kv-config), the shape check, and malformed or NaN files refused.
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <unistd.h>

#include "../../tools/cli/lib/kv_config_file.h"

namespace kvc {
namespace {

std::string WriteTemp(const std::string& name, const std::string& text) {
  const std::string path = (std::filesystem::temp_directory_path() /
                            (name + "." + std::to_string(::getpid()) + ".json")).string();
  std::ofstream(path) << text;
  return path;
}

std::string GoodFile(const std::string& config, int n_layer = 30, const std::string& extra = "") {
  return "{\"format\": \"kvcrunch-kv-config\", \"version\": 1, \"name\": \"bits-test\", \"config\": \"" +
         config + "\", \"model\": {\"n_layer\": " + std::to_string(n_layer) +
         ", \"n_head_kv\": 3, \"head_dim\": 64, \"head_dim_v\": 64, \"id\": \"x\"}, "
         "\"all_in_bits\": 3.2, \"all_in_ctx\": 4096" + extra + "}";
}

kv::KvShape SmolShape() {
  kv::KvShape s;
  s.n_layer = 30;
  s.n_head = 9;
  s.n_head_kv = 3;
  s.head_dim = 64;
  s.rope.theta = 100000.0;
  s.rope.n_rot = 64;
  return s;
}

TEST(KvConfigFile, LoadsExpandsAndOverrides) {
  const std::string path = WriteTemp("kvcfg_good", GoodFile(
      "k=turbo:bits=3,nc=1,center=1 k@0,29=q8_0 v=turbo:bits=2,nc=1 v@5=turbo:bits=4,nc=1 sinks=1",
      30, ", \"search\": {\"budget_bits\": 3.25, \"sensitivity\": [[0.1, 0.2]]}"));
  for (const std::string key : {"config=", "file="}) {
    auto c = ParseRunConfig(key + path);
    ASSERT_TRUE(c.ok()) << c.status().ToString();
    EXPECT_EQ(c->cache.k_codec, "turbo:bits=3,nc=1,center=1");
    EXPECT_EQ(c->cache.v_codec, "turbo:bits=2,nc=1");
    EXPECT_EQ(c->cache.sink_tokens, 1);
    EXPECT_EQ(c->Label(), "bits-test");
    EXPECT_EQ(c->config_file, path);
    ASSERT_TRUE(FitLayerOverrides(&*c, SmolShape()).ok());
    ASSERT_EQ(c->cache.k_codec_layer.size(), 30u);
    EXPECT_EQ(c->cache.k_codec_layer[0], "q8_0");
    EXPECT_EQ(c->cache.k_codec_layer[29], "q8_0");
    EXPECT_EQ(c->cache.k_codec_layer[1], "");
    EXPECT_EQ(c->cache.v_codec_layer[5], "turbo:bits=4,nc=1");
  }
  // Keys after it override it (like preset=), and say so in the label.
  auto o = ParseRunConfig("config=" + path + " sinks=4 v@5=q8_0");
  ASSERT_TRUE(o.ok()) << o.status().ToString();
  EXPECT_EQ(o->cache.sink_tokens, 4);
  ASSERT_TRUE(FitLayerOverrides(&*o, SmolShape()).ok());
  EXPECT_EQ(o->cache.v_codec_layer[5], "q8_0");
  EXPECT_EQ(o->Label(), "bits-test sinks=4 v@5=q8_0");
  // --kv-config FILE gives the same configuration.
  auto f = LoadRunConfigFile(path);
  ASSERT_TRUE(f.ok()) << f.status().ToString();
  EXPECT_EQ(f->cache.k_codec, "turbo:bits=3,nc=1,center=1");
  // The file's all-in bits can be measured like a preset's (1 KV head is enough for the ratio).
  kv::KvShape one = SmolShape();
  one.n_head = 3;
  one.n_head_kv = 1;
  ASSERT_TRUE(FitLayerOverrides(&*f, one.n_layer).ok());
  auto ab = MeasureAllInBits(one, f->cache, 4096);
  ASSERT_TRUE(ab.ok()) << ab.status().ToString();
  double k_sum = 0, v_sum = 0;
  for (double b : ab->k_bytes) k_sum += b;
  for (double b : ab->v_bytes) v_sum += b;
  EXPECT_NEAR(ab->bits, 16.0 * (k_sum + v_sum) / ab->f16_bytes, 1e-9);
  EXPECT_GT(ab->k_bytes[0], ab->k_bytes[1]);   // q8_0 keys in layer 0 cost more than turbo3
  EXPECT_GT(ab->bits, 2.0);
  EXPECT_LT(ab->bits, 4.0);
  std::remove(path.c_str());
}

TEST(KvConfigFile, OtherModelShapeIsAnError) {
  const std::string path = WriteTemp("kvcfg_shape", GoodFile("k=q8_0 v=q8_0 sinks=1", 24));
  auto c = ParseRunConfig("config=" + path);
  ASSERT_TRUE(c.ok()) << c.status().ToString();
  Status st = FitLayerOverrides(&*c, SmolShape());
  ASSERT_FALSE(st.ok());
  EXPECT_NE(std::string(st.message()).find("n_layer=24"), std::string::npos) << st.message();
  EXPECT_NE(std::string(st.message()).find("n_layer=30"), std::string::npos) << st.message();
  kv::KvShape other = SmolShape();
  other.n_layer = 24;
  EXPECT_TRUE(FitLayerOverrides(&*c, other).ok());
  other.n_head_kv = 4;  // same layers, other heads
  auto c2 = ParseRunConfig("config=" + path);
  ASSERT_TRUE(c2.ok());
  EXPECT_FALSE(FitLayerOverrides(&*c2, other).ok());
  std::remove(path.c_str());
}

TEST(KvConfigFile, MalformedOrNanFilesRefused) {
  const std::string good = GoodFile("k=q8_0 v=q8_0 sinks=1");
  struct Case { const char* what; std::string text; const char* msg; };
  std::string nan_text = good;
  nan_text.replace(nan_text.find("3.2"), 3, "NaN");  // not JSON: parse error
  std::string null_num = good;
  null_num.replace(null_num.find("3.2"), 3, "null");  // how NaN comes out of a JSON writer
  const std::vector<Case> cases = {
      {"not JSON", "{\"format\": ", "not valid JSON"},
      {"array", "[1, 2]", "not a JSON object"},
      {"NaN literal", nan_text, "not valid JSON"},
      {"null number", null_num, "null or non-finite"},
      {"nested null", GoodFile("q8_0", 30, ", \"search\": {\"predicted_kld\": null}"), "/search/predicted_kld"},
      {"wrong format", "{\"format\": \"other\", \"version\": 1}", "format"},
      {"wrong version", std::string(good).replace(good.find("\"version\": 1"), 12, "\"version\": 2"), "version"},
      {"no config", std::string(good).replace(good.find("\"config\""), 8, "\"cfg\""), "config"},
      {"nested preset", GoodFile("preset=kvc3"), "may not contain"},
      {"nested config", GoodFile("config=/tmp/x"), "may not contain"},
      {"bad config key", GoodFile("k=q8_0 bogus=1"), "unknown key"},
      {"zero layers", GoodFile("q8_0", 0), "n_layer"},
      {"no model", "{\"format\": \"kvcrunch-kv-config\", \"version\": 1, \"config\": \"q8_0\", \"all_in_bits\": 3, \"all_in_ctx\": 4096}", "model"},
      {"negative bits", std::string(good).replace(good.find("3.2"), 3, "-3"), "all_in_bits"},
  };
  for (const auto& c : cases) {
    const std::string path = WriteTemp("kvcfg_bad", c.text);
    auto r = ParseRunConfig("config=" + path);
    EXPECT_FALSE(r.ok()) << c.what;
    if (!r.ok()) {
      EXPECT_NE(std::string(r.status().message()).find(c.msg), std::string::npos)
          << c.what << ": " << r.status().message();
    }
    EXPECT_FALSE(LoadRunConfigFile(path).ok()) << c.what;
    std::remove(path.c_str());
  }
  EXPECT_EQ(ParseRunConfig("config=/nonexistent/kv.json").status().code(), StatusCode::kNotFound);
  EXPECT_FALSE(ParseRunConfig("config=").ok());
  EXPECT_FALSE(ParseRunConfig("config=" + std::filesystem::temp_directory_path().string()).ok());
  const std::string path = WriteTemp("kvcfg_two", good);
  EXPECT_FALSE(ParseRunConfig("preset=kvc3 config=" + path).ok());
  EXPECT_FALSE(ParseRunConfig("config=" + path + " file=" + path).ok());
  std::remove(path.c_str());
}

}  // namespace
}  // namespace kvc
