// MatMul throughput for SmolLM2-135M's linear shapes (Q4_1 layers, Q8_0 tied output), decode
// (n_tokens 1) and prefill (512), on 1 and 2 threads. Counters: GFLOP/s (2 n_in n_out n_tokens
// per call) and GB/s of weight bytes read (the packed matrix once per call).
// "AllLinear" runs one decode/prefill step through every linear layer of the model (30 layers,
// 96 MB of weights, so decode streams from DRAM as in the real forward pass).
//
// Run: cpu_ops_bench --benchmark_filter=MatMul  (weights are random; speed does not depend on it)
#include <benchmark/benchmark.h>

#include <cstring>
#include <memory>
#include <random>
#include <vector>

#include "cpu/ops.h"
#include "gguf/types.h"

namespace kvc::cpu {
namespace {

using gguf::GgmlType;

// Random GGUF bytes for [n_out, n_in] Q4_1 or Q8_0 with finite fp16 scales.
std::vector<uint8_t> RandomWeights(GgmlType type, int64_t n_in, int64_t n_out, uint32_t seed) {
  const size_t block_bytes = type == GgmlType::kQ4_1 ? 20 : 34;
  const int64_t n_blocks = n_in / gguf::kQK * n_out;
  std::vector<uint8_t> data(n_blocks * block_bytes);
  std::mt19937 rng(seed);
  for (auto& b : data) b = static_cast<uint8_t>(rng());
  for (int64_t i = 0; i < n_blocks; ++i) {
    const uint16_t d = 0x1C00 | (rng() & 0x3FF), m = 0xA800 | (rng() & 0x3FF);
    std::memcpy(data.data() + i * block_bytes, &d, 2);
    if (type == GgmlType::kQ4_1) std::memcpy(data.data() + i * block_bytes + 2, &m, 2);
  }
  return data;
}

struct Matrix {
  std::vector<uint8_t> data;  // GGUF bytes [n_out, n_in/32] blocks
  std::unique_ptr<Weight> w;
};

Matrix MakeMatrix(GgmlType type, int64_t n_in, int64_t n_out, uint32_t seed) {
  Matrix m;
  m.data = RandomWeights(type, n_in, n_out, seed);
  gguf::TensorInfo t;
  t.name = "bench";
  t.type_id = static_cast<uint32_t>(type);
  t.ne = {n_in, n_out};
  t.n_bytes = m.data.size();
  t.data = m.data.data();
  m.w = std::move(PrepareWeight(t).value());
  return m;
}

std::vector<float> RandomX(int64_t n, uint32_t seed) {  // [n] f32
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<float> x(n);
  for (auto& v : x) v = normal(rng);
  return x;
}

// Args: n_in, n_out, type id, n_tokens, threads.
void BM_MatMul(benchmark::State& state) {
  const int64_t n_in = state.range(0), n_out = state.range(1), n_tokens = state.range(3);
  const auto type = static_cast<GgmlType>(state.range(2));
  SetNumThreads(static_cast<int>(state.range(4)));
  const Matrix m = MakeMatrix(type, n_in, n_out, 1);
  const std::vector<float> x = RandomX(n_tokens * n_in, 2);  // [n_tokens, n_in]
  std::vector<float> y(n_tokens * n_out);                    // [n_tokens, n_out]
  for (auto _ : state) {
    MatMul(*m.w, x.data(), n_tokens, y.data());
    benchmark::DoNotOptimize(y.data());
    benchmark::ClobberMemory();
  }
  state.counters["GFLOP/s"] = benchmark::Counter(2.0 * n_in * n_out * n_tokens / 1e9,
                                                 benchmark::Counter::kIsIterationInvariantRate);
  state.counters["GB/s"] = benchmark::Counter(static_cast<double>(m.w->bytes()) / 1e9,
                                              benchmark::Counter::kIsIterationInvariantRate);
  SetNumThreads(0);
}

void MatMulArgs(benchmark::internal::Benchmark* b) {
  const int64_t q41 = static_cast<int64_t>(GgmlType::kQ4_1);
  const int64_t q80 = static_cast<int64_t>(GgmlType::kQ8_0);
  const int64_t shapes[][3] = {
      {576, 576, q41}, {576, 192, q41}, {576, 1536, q41}, {1536, 576, q41}, {576, 49152, q80}};
  for (int64_t n_tokens : {1, 512}) {
    for (int64_t threads : {1, 2}) {
      for (const auto& s : shapes) b->Args({s[0], s[1], s[2], n_tokens, threads});
    }
  }
  b->ArgNames({"n_in", "n_out", "type", "n_tokens", "threads"});
  b->Unit(benchmark::kMicrosecond);
  b->UseRealTime();
}
BENCHMARK(BM_MatMul)->Apply(MatMulArgs);

// Every linear layer of SmolLM2-135M (30 x {q, k, v, o, gate, up, down} Q4_1 + output Q8_0).
// Args: n_tokens, threads. tokens/s = n_tokens / time.
void BM_AllLinear(benchmark::State& state) {
  const int64_t n_tokens = state.range(0);
  SetNumThreads(static_cast<int>(state.range(1)));
  constexpr int kLayers = 30;
  const int64_t shapes[][2] = {{576, 576},  {576, 192},  {576, 192}, {576, 576},
                               {576, 1536}, {576, 1536}, {1536, 576}};
  std::vector<Matrix> ms;
  uint32_t seed = 10;
  for (int l = 0; l < kLayers; ++l) {
    for (const auto& s : shapes) ms.push_back(MakeMatrix(GgmlType::kQ4_1, s[0], s[1], seed++));
  }
  ms.push_back(MakeMatrix(GgmlType::kQ8_0, 576, 49152, seed++));
  const std::vector<float> x = RandomX(n_tokens * 1536, 3);  // [n_tokens, <= 1536]
  std::vector<float> y(n_tokens * 49152);                    // [n_tokens, <= 49152]
  double flops = 0.0, bytes = 0.0;
  for (const Matrix& m : ms) {
    flops += 2.0 * m.w->n_in() * m.w->n_out() * n_tokens;
    bytes += static_cast<double>(m.w->bytes());
  }
  for (auto _ : state) {
    for (const Matrix& m : ms) MatMul(*m.w, x.data(), n_tokens, y.data());
    benchmark::ClobberMemory();
  }
  state.counters["tok/s"] = benchmark::Counter(static_cast<double>(n_tokens),
                                               benchmark::Counter::kIsIterationInvariantRate);
  state.counters["GFLOP/s"] =
      benchmark::Counter(flops / 1e9, benchmark::Counter::kIsIterationInvariantRate);
  state.counters["GB/s"] =
      benchmark::Counter(bytes / 1e9, benchmark::Counter::kIsIterationInvariantRate);
  SetNumThreads(0);
}
BENCHMARK(BM_AllLinear)
    ->ArgsProduct({{1, 512}, {1, 2}})
    ->ArgNames({"n_tokens", "threads"})
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime();

// Elementwise ops at model sizes (n_embd 576, n_ff 1536, softmax over 2048 positions).
void BM_Ops(benchmark::State& state) {
  std::vector<float> a = RandomX(2048, 4), b = RandomX(2048, 5), w = RandomX(576, 6), o(2048);
  for (auto _ : state) {
    RmsNorm(a.data(), w.data(), 1, 576, 1e-5f, o.data());
    SwiGlu(a.data(), b.data(), 1536, o.data());
    benchmark::DoNotOptimize(Dot(a.data(), b.data(), 576));
    Axpy(0.5f, a.data(), 576, o.data());
    Softmax(b.data(), 2048);
    benchmark::ClobberMemory();
  }
}
BENCHMARK(BM_Ops);

}  // namespace
}  // namespace kvc::cpu

BENCHMARK_MAIN();
