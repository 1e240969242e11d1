// eval / retrieval --config: per-layer codec keys (k@L=, v@L=, kv@L=) fill KvCacheConfig's
// k_codec_layer / v_codec_layer, FitLayerOverrides pads them to n_layer, and bad lists are errors.
#include <gtest/gtest.h>

#include "../../tools/cli/lib/runner.h"

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
