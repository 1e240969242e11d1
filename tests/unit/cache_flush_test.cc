// Flush boundaries of block codecs through KvCache::Write (KIVI, group 32): a prompt of P tokens
// then 168 single-token steps must decode exactly like writing all tokens at once, and with a
// residual window longer than the sequence the cache must attend bit-identically to f16.
//
// Residual smaller than the group (R = 16 < G = 32): keys flush whole groups (flush quantum = R
// rounded up to G = 32, tail 0..31), values keep a FIFO of 16 fp16 tokens (kivi.h).
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include <gtest/gtest.h>

#include "kv/cache.h"

namespace kvc::kv {
namespace {

constexpr int kHd = 64, kKv = 2, kHeads = 4, kSteps = 168;

KvShape Shape() {
  KvShape s;
  s.n_layer = 2;
  s.n_head = kHeads;
  s.n_head_kv = kKv;
  s.head_dim = kHd;
  s.rope.n_rot = kHd;
  return s;
}

std::vector<float> RandomVec(size_t n, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> nd(0.f, 1.f);
  std::vector<float> v(n);
  for (auto& x : v) x = nd(rng);
  return v;
}

struct Data {
  int n;
  std::vector<float> k, v, q;
  std::vector<int64_t> seq;
  explicit Data(int n_tokens) : n(n_tokens) {
    k = RandomVec(size_t(n) * kKv * kHd, 1);
    v = RandomVec(size_t(n) * kKv * kHd, 2);
    q = RandomVec(size_t(n) * kHeads * kHd, 3);
    for (int i = 0; i < n; ++i) k[size_t(i) * kKv * kHd + 5] += 6.f;  // a key outlier channel
    seq.resize(n);
    for (int i = 0; i < n; ++i) seq[i] = i;
  }
};

std::unique_ptr<KvCache> MakeCache(const std::string& codec) {
  KvCacheConfig c;
  c.k_codec = c.v_codec = codec;
  auto r = KvCache::Create(Shape(), c);
  EXPECT_TRUE(r.ok()) << r.status().message();
  return std::move(r).value();
}

// Writes [from, to) in one call to every layer.
void WriteRange(KvCache& c, const Data& d, int from, int to) {
  for (int l = 0; l < 2; ++l) {
    ASSERT_TRUE(c.Write(l, &d.seq[from], to - from, &d.k[size_t(from) * kKv * kHd],
                        &d.v[size_t(from) * kKv * kHd])
                    .ok());
  }
}

std::vector<float> DecodeAll(const KvCache& c) {
  std::vector<float> out;
  for (int l = 0; l < 2; ++l) {
    for (int h = 0; h < kKv; ++h) {
      const int64_t n = c.n_cells(l, h);
      std::vector<float> k(size_t(n) * kHd), v(size_t(n) * kHd);
      c.DecodeKeys(l, h, k.data());
      c.DecodeValues(l, h, v.data());
      out.insert(out.end(), k.begin(), k.end());
      out.insert(out.end(), v.begin(), v.end());
    }
  }
  return out;
}

class FlushTest : public ::testing::TestWithParam<std::tuple<int, int>> {};

TEST_P(FlushTest, StreamedEqualsOneShot) {
  const auto [residual, prompt] = GetParam();
  for (int bits : {2, 4}) {
    const std::string spec =
        "kivi:bits=" + std::to_string(bits) + ",group=32,residual=" + std::to_string(residual);
    Data d(prompt + kSteps);
    auto streamed = MakeCache(spec);
    WriteRange(*streamed, d, 0, prompt);
    for (int t = prompt; t < d.n; ++t) WriteRange(*streamed, d, t, t + 1);
    auto oneshot = MakeCache(spec);
    WriteRange(*oneshot, d, 0, d.n);
    // Window codecs flush after attention (KvCache::Attend); with no Attend here, apply the
    // pending flushes explicitly so both caches are in their steady state.
    streamed->Flush();
    oneshot->Flush();
    const auto a = DecodeAll(*streamed), b = DecodeAll(*oneshot);
    ASSERT_EQ(a.size(), b.size());
    for (size_t i = 0; i < a.size(); ++i) {
      if (a[i] != b[i]) {
        ADD_FAILURE() << spec << " first difference at float " << i << " of " << a.size() << ": "
                      << a[i] << " vs " << b[i];
        break;
      }
    }
    EXPECT_EQ(std::memcmp(a.data(), b.data(), a.size() * sizeof(float)), 0) << spec;
    // Memory agrees too (same packed/tail split).
    EXPECT_EQ(streamed->Memory().PackedBytes() > 0, oneshot->Memory().PackedBytes() > 0);
    // And attention through the packed blocks matches the one-shot cache.
    int64_t qs = d.n - 1;
    std::vector<float> oa(kHeads * kHd), ob(kHeads * kHd);
    streamed->Attend(1, &d.q[size_t(qs) * kHeads * kHd], &qs, 1, oa.data());
    oneshot->Attend(1, &d.q[size_t(qs) * kHeads * kHd], &qs, 1, ob.data());
    EXPECT_EQ(std::memcmp(oa.data(), ob.data(), oa.size() * sizeof(float)), 0) << spec;
  }
}

INSTANTIATE_TEST_SUITE_P(GroupsAndPrompts, FlushTest,
                         ::testing::Combine(::testing::Values(16, 32, 64),
                                            ::testing::Values(1, 31, 32, 33, 37)));

TEST(Flush, ResidualLongerThanSequenceIsF16) {
  for (int prompt : {1, 31, 32, 33, 37}) {
    Data d(prompt + kSteps);  // <= 205 tokens < residual 256: everything stays in the fp16 tail
    auto kivi = MakeCache("kivi:bits=2,group=32,residual=256");
    auto f16 = MakeCache("f16");
    WriteRange(*kivi, d, 0, prompt);
    WriteRange(*f16, d, 0, prompt);
    for (int t = prompt; t < d.n; ++t) {
      WriteRange(*kivi, d, t, t + 1);
      WriteRange(*f16, d, t, t + 1);
      int64_t qs = t;
      std::vector<float> oa(kHeads * kHd), ob(kHeads * kHd);
      kivi->Attend(0, &d.q[size_t(t) * kHeads * kHd], &qs, 1, oa.data());
      f16->Attend(0, &d.q[size_t(t) * kHeads * kHd], &qs, 1, ob.data());
      ASSERT_EQ(std::memcmp(oa.data(), ob.data(), oa.size() * sizeof(float)), 0)
          << "prompt " << prompt << " step " << t;
    }
    EXPECT_EQ(kivi->Memory().PackedBytes(), 0u);
    // Prefill-style (many query rows, tiled path) as well.
    std::vector<float> oa(size_t(d.n) * kHeads * kHd), ob(oa.size());
    kivi->Attend(1, d.q.data(), d.seq.data(), d.n, oa.data());
    f16->Attend(1, d.q.data(), d.seq.data(), d.n, ob.data());
    EXPECT_EQ(std::memcmp(oa.data(), ob.data(), oa.size() * sizeof(float)), 0);
  }
}

}  // namespace
}  // namespace kvc::kv
