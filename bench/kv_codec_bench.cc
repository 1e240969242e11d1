// KV codec speed (issue 3, "Speed"): per codec
//   - Encode / Decode: GB/s of f32 processed (bytes_per_second = tokens · head_dim · 4 per second),
//     4096 tokens of one (layer, KV head) stream, head_dim 64, one thread;
//   - Attention: "decode attention per token" = one query token of SmolLM2-135M's layer shape
//     (9 query heads over 3 KV heads, head_dim 64) scoring and accumulating over N cached tokens of
//     one layer through the codec's fused many-block calls (PrepareQuery, ScoreBlocks, softmax,
//     AccumulateBlocks), N = 4096 and 8192, one thread. Counters (thread CPU time, robust to a
//     shared machine): us_per_tok (µs per query token per layer) and x_f16 (this codec's time /
//     f16's time, measured in the same process just before: < 1 means faster than f16).
// All tokens are packed (no fp16 residual tails), so KIVI's 128-token fp16 window is not in it.
//   build-h1/kv_codec_bench --benchmark_filter=Attention   (or Encode / Decode)
#include <benchmark/benchmark.h>

#include <time.h>

#include <chrono>
#include <map>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "bench_common.h"
#include "cpu/ops.h"
#include "kv/codec.h"

namespace kvc::kv {
namespace {

constexpr int kDim = 64, kHeadsKv = 3, kGroup = 3;

struct Pair {
  const char* label;
  const char* k;
  const char* v;
};
const std::vector<Pair>& Pairs() {
  static const std::vector<Pair> p = {
      {"f16", "f16", "f16"},         {"q8_0", "q8_0", "q8_0"},       {"q4_0", "q4_0", "q4_0"},
      {"q4_1", "q4_1", "q4_1"},      {"q5_0", "q5_0", "q5_0"},       {"fp8", "fp8", "fp8"},
      {"kivi4", "kivi4", "kivi4"},   {"kivi2", "kivi2", "kivi2"},    {"turbo4", "turbo4", "turbo4"},
      {"turbo3", "turbo3", "turbo3"}, {"polar", "polar", "polar"},   {"qjl+q8_0", "qjl", "q8_0"},
  };
  return p;
}

std::unique_ptr<Codec> Make(const std::string& spec, KvKind kind, int head) {
  CodecContext ctx;
  ctx.dim = kDim;
  ctx.kind = kind;
  ctx.layer = 1;
  ctx.n_layer = 30;
  ctx.head = head;
  ctx.n_head_kv = kHeadsKv;
  ctx.seed = 1000 + 17 * uint64_t(head) + (kind == KvKind::kKey ? 0 : 7);
  auto c = MakeCodec(spec, ctx);
  if (!c.ok()) return nullptr;
  return std::move(*c);
}

std::vector<float> RandomRows(int64_t n, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> nd;
  std::vector<float> x(size_t(n) * kDim);
  for (auto& v : x) v = nd(rng);
  return x;
}

// One stream packed: n tokens (a multiple of block_tokens).
struct Packed {
  std::unique_ptr<Codec> c;
  std::vector<uint8_t> blocks;
  int64_t n_blocks = 0;
};
Packed Pack(const std::string& spec, KvKind kind, int head, int64_t n) {
  Packed p;
  p.c = Make(spec, kind, head);
  if (!p.c) return p;
  const int bt = p.c->block_tokens();
  p.n_blocks = n / bt;
  const auto x = RandomRows(n, 7 + head);
  p.blocks.resize(size_t(p.n_blocks) * p.c->BlockBytes());
  for (int64_t b = 0; b < p.n_blocks; ++b) {
    p.c->Encode(&x[size_t(b) * bt * kDim], &p.blocks[size_t(b) * p.c->BlockBytes()]);
  }
  return p;
}

// One layer's cache for one codec pair and one query token's attention over it.
struct Layer {
  std::vector<Packed> k, v;
  std::vector<float> q, qp, s, o;
  int64_t n = 0;
  bool ok = true;
  Layer(const Pair& pr, int64_t n_tok) : n(n_tok) {
    for (int h = 0; h < kHeadsKv; ++h) {
      k.push_back(Pack(pr.k, KvKind::kKey, h, n));
      v.push_back(Pack(pr.v, KvKind::kValue, h, n));
      ok = ok && k.back().c && v.back().c;
    }
    q = RandomRows(kGroup * kHeadsKv, 99);
    s.resize(size_t(kGroup) * n);
    o.resize(size_t(kGroup) * kDim);
  }
  void Attend() {
    for (int h = 0; h < kHeadsKv; ++h) {
      Codec& kc = *k[h].c;
      qp.resize(size_t(kGroup) * kc.PreparedQueryDim());
      kc.PrepareQuery(&q[size_t(h) * kGroup * kDim], kGroup, qp.data());
      kc.ScoreBlocks(qp.data(), kGroup, k[h].blocks.data(), k[h].n_blocks, s.data(), n);
      for (int r = 0; r < kGroup; ++r) {
        float* sr = &s[size_t(r) * n];
        for (int64_t t = 0; t < n; ++t) sr[t] *= 0.125f;
        cpu::Softmax(sr, n);
      }
      std::fill(o.begin(), o.end(), 0.f);
      v[h].c->AccumulateBlocks(s.data(), n, kGroup, v[h].blocks.data(), v[h].n_blocks, o.data());
      benchmark::DoNotOptimize(o.data());
    }
  }
};

// f16 reference time for N tokens, measured once per process (same minute as the codec rows).
double F16Seconds(int64_t n) {
  static std::map<int64_t, double> cache;
  auto it = cache.find(n);
  if (it != cache.end()) return it->second;
  Layer l(Pairs()[0], n);
  const double t = bench::SecondsPerCall([&] { l.Attend(); }, 20);
  cache[n] = t;
  return t;
}

void BM_Attention(benchmark::State& state, Pair pr) {
  const int64_t n = state.range(0);
  const double f16 = F16Seconds(n);
  Layer l(pr, n);
  if (!l.ok) {
    state.SkipWithError("codec not buildable");
    return;
  }
  bench::TimeAgainstF16(state, [&] { l.Attend(); }, f16);
  state.counters["kv_bytes"] = double(l.k[0].blocks.size() + l.v[0].blocks.size()) * kHeadsKv;
}

void BM_Encode(benchmark::State& state, std::string spec, KvKind kind) {
  auto c = Make(spec, kind, 0);
  if (!c) {
    state.SkipWithError("codec not buildable");
    return;
  }
  const int bt = c->block_tokens();
  const int64_t n = 4096 / bt * bt;
  const auto x = RandomRows(n, 5);
  std::vector<uint8_t> out(size_t(n / bt) * c->BlockBytes());
  for (auto _ : state) {
    for (int64_t b = 0; b < n / bt; ++b) c->Encode(&x[size_t(b) * bt * kDim], &out[size_t(b) * c->BlockBytes()]);
    benchmark::DoNotOptimize(out.data());
  }
  state.SetBytesProcessed(int64_t(state.iterations()) * n * kDim * 4);
}

void BM_Decode(benchmark::State& state, std::string spec, KvKind kind) {
  Packed p = Pack(spec, kind, 0, 4096);
  if (!p.c) {
    state.SkipWithError("codec not buildable");
    return;
  }
  const int bt = p.c->block_tokens();
  std::vector<float> x(size_t(p.n_blocks) * bt * kDim);
  for (auto _ : state) {
    for (int64_t b = 0; b < p.n_blocks; ++b) {
      p.c->Decode(&p.blocks[size_t(b) * p.c->BlockBytes()], &x[size_t(b) * bt * kDim]);
    }
    benchmark::DoNotOptimize(x.data());
  }
  state.SetBytesProcessed(int64_t(state.iterations()) * p.n_blocks * bt * kDim * 4);
}

int Register() {
  std::vector<std::string> specs = {"f16",   "q8_0",   "q4_0",   "q4_1",  "q5_0", "fp8",
                                    "kivi4", "kivi2",  "turbo4", "turbo3", "polar", "qjl"};
  for (const auto& s : specs) {
    for (KvKind kind : {KvKind::kKey, KvKind::kValue}) {
      if (s == "qjl" && kind == KvKind::kValue) continue;
      const std::string tag = s + "/" + KvKindName(kind);
      benchmark::RegisterBenchmark(("Encode/" + tag).c_str(), BM_Encode, s, kind)->Unit(benchmark::kMicrosecond);
      benchmark::RegisterBenchmark(("Decode/" + tag).c_str(), BM_Decode, s, kind)->Unit(benchmark::kMicrosecond);
    }
  }
  for (const auto& pr : Pairs()) {
    benchmark::RegisterBenchmark((std::string("Attention/") + pr.label).c_str(), BM_Attention, pr)
        ->Arg(4096)
        ->Arg(8192)
        ->Unit(benchmark::kMicrosecond);
  }
  return 0;
}
const int kRegistered = Register();

}  // namespace
}  // namespace kvc::kv

BENCHMARK_MAIN();
