// Decode attention through the whole cache (KvCache::Attend), issue 3/5 "Speed": one query token
// of SmolLM2-135M's layer shape (9 query heads over 3 KV heads, head_dim 64) over N cached tokens
// of one layer, N = 4096 / 8192, one thread. Unlike kv_codec_bench (the codecs' fused calls alone)
// this goes through the cache's read paths, so it covers what those calls cannot: keys stored
// before RoPE (KVQuant, low-rank keys, in-cache positions) that must be rotated at every step,
// transforms, centering and sink segments.
// Counters (thread CPU time, robust to a shared machine): us_per_tok = µs per query token per
// layer; x_f16 = this configuration's time / the f16 cache's time measured in the same process
// (< 1: faster than f16).
//   build/kv_attend_bench                      (all rows)
//   build/kv_attend_bench --benchmark_filter='Attend/(f16|kvquant4)/'
// Calibration inputs are synthetic (random activations); they set codebooks and bases, not speed.
#include <benchmark/benchmark.h>

#include <time.h>
#include <unistd.h>

#include <cstdio>
#include <filesystem>
#include <map>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "bench_common.h"
#include "kv/cache.h"
#include "kv/calibration_file.h"
#include "kv/codecs/kvquant.h"
#include "kv/transforms/lowrank.h"

namespace kvc::kv {
namespace {

constexpr int kDim = 64, kHeadsKv = 3, kHeads = 9;

KvShape Shape() {
  KvShape s;
  s.n_layer = 1;
  s.n_head = kHeads;
  s.n_head_kv = kHeadsKv;
  s.head_dim = kDim;
  s.rope.theta = 100000.0;
  s.rope.n_rot = kDim;
  return s;
}

std::vector<float> Randn(size_t n, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> nd;
  std::vector<float> x(n);
  for (auto& v : x) v = nd(rng);
  return x;
}

// KVQuant codebooks/thresholds from random activations (for the shape only).
const CalibrationData* KvQuantCalib() {
  static CalibrationData* c = [] {
    KvQuantSamples s;
    s.n_layer = 1;
    s.n_head_kv = kHeadsKv;
    s.head_dim = kDim;
    s.k.push_back(Randn(size_t(2048) * kHeadsKv * kDim, 11));
    s.v.push_back(Randn(size_t(2048) * kHeadsKv * kDim, 12));
    auto r = CalibrateKvQuant(s);
    return r.ok() ? new CalibrationData(std::move(*r)) : nullptr;
  }();
  return c;
}

// A kv-stats file with random orthonormal-ish bases (identity) and decaying spectra, written once.
const std::string& LowRankFile() {
  static std::string path = [] {
    CalibrationFile f;
    f.meta = {{"kind", "kv-stats"}, {"n_layer", "1"}, {"n_head_kv", std::to_string(kHeadsKv)},
              {"head_dim", std::to_string(kDim)}, {"head_dim_v", std::to_string(kDim)},
              {"ratio", "0.5"}, {"model_id", "bench"}};
    for (KvKind kind : {KvKind::kKey, KvKind::kValue}) {
      for (int h = 0; h < kHeadsKv; ++h) {
        CalibrationFile::Tensor b, e;
        b.dims = {kDim, kDim};
        e.dims = {kDim};
        for (int j = 0; j < kDim; ++j) {
          e.data.push_back(1.0f / float(1 + j));
          for (int i = 0; i < kDim; ++i) b.data.push_back(i == j ? 1.f : 0.f);
        }
        f.tensors[PaluTensorName("basis", kind, 0, h)] = b;
        f.tensors[PaluTensorName("eig", kind, 0, h)] = e;
      }
    }
    const std::string p =
        (std::filesystem::temp_directory_path() / ("kv_attend_bench." + std::to_string(getpid()) + ".kvccal"))
            .string();
    if (!WriteCalibrationFile(p, f).ok()) return std::string();
    std::atexit([] { std::remove(LowRankFile().c_str()); });
    return p;
  }();
  return path;
}

struct Config {
  const char* label;
  const char* k;
  const char* v;
  const char* kt = "";        // K transform ("lowrank" gets the synthetic file)
  const char* vt = "";
  PositionMode pos = PositionMode::kOriginal;
};

const std::vector<Config>& Configs() {
  static const std::vector<Config> c = {
      {"f16", "f16", "f16"},
      {"f16-incache", "f16", "f16", "", "", PositionMode::kInCache},  // pre-RoPE f16 keys
      {"q4_0", "q4_0", "q4_0"},
      {"kvquant4", "kvquant4", "kvquant4"},
      {"kvquant3", "kvquant3", "kvquant3"},
      {"kvquant2", "kvquant2", "kvquant2"},
      {"turbo4-center", "turbo:bits=4,center=1", "turbo4"},
      {"turbo3-nc-center", "turbo:bits=3,nc=1,center=1", "turbo:bits=3,nc=1"},
      {"nsn2-center", "nsn2:center=1", "nsn2:center=1"},
      {"nsn2.5-center", "nsn2.5:center=1", "nsn2.5:center=1"},
      {"nsn3-center", "nsn3:center=1", "nsn3:center=1"},
      {"nsn3.25-center", "nsn3.25:center=1", "nsn3.25:center=1"},
      {"nsn2.5-center-lut", "nsn2.5:center=1,lut=1", "nsn2.5:center=1,lut=1"},
      {"nsn3.25-center-lut", "nsn3.25:center=1,lut=1", "nsn3.25:center=1,lut=1"},
      {"palu-k25-v75", "f16", "f16", "lowrank:ratio=0.25", "lowrank:ratio=0.75"},
      {"palu-k25-v75+q4_0", "q4_0", "q4_0", "lowrank:ratio=0.25", "lowrank:ratio=0.75"},
  };
  return c;
}

std::string WithFile(const char* t) {
  std::string s = t;
  if (s.rfind("lowrank", 0) == 0) s += ",file=" + LowRankFile();
  return s;
}

struct Layer {
  std::unique_ptr<KvCache> cache;
  std::vector<float> q, out;
  int64_t n = 0;
  std::string error;
  Layer(const Config& c, int64_t n_tok) : n(n_tok) {
    KvCacheConfig cfg;
    cfg.k_codec = c.k;
    cfg.v_codec = c.v;
    cfg.k_transform = WithFile(c.kt);
    cfg.v_transform = WithFile(c.vt);
    cfg.position_mode = c.pos;
    cfg.position_mode_set = true;
    cfg.calib = KvQuantCalib();
    auto made = KvCache::Create(Shape(), cfg);
    if (!made.ok()) {
      error = made.status().ToString();
      return;
    }
    cache = std::move(*made);
    constexpr int kBatch = 256;
    for (int64_t t0 = 0; t0 < n; t0 += kBatch) {
      const int nb = int(std::min<int64_t>(kBatch, n - t0));
      const auto k = Randn(size_t(nb) * kHeadsKv * kDim, uint32_t(1 + t0));
      const auto v = Randn(size_t(nb) * kHeadsKv * kDim, uint32_t(2 + t0));
      std::vector<int64_t> seq(nb);
      for (int i = 0; i < nb; ++i) seq[i] = t0 + i;
      Status s = cache->Write(0, seq.data(), nb, k.data(), v.data());
      if (!s.ok()) {
        error = s.ToString();
        return;
      }
    }
    cache->Flush();
    q = Randn(size_t(kHeads) * kDim, 99);
    out.resize(size_t(kHeads) * kDim);
  }
  void Attend() {
    const int64_t qs = n - 1;  // the last cached token's own query (sees all n tokens)
    cache->Attend(0, q.data(), &qs, 1, out.data());
    benchmark::DoNotOptimize(out.data());
  }
};

double F16Seconds(int64_t n) {
  static std::map<int64_t, double> cache;
  auto it = cache.find(n);
  if (it != cache.end()) return it->second;
  Layer l(Configs()[0], n);
  return cache[n] = bench::SecondsPerCall([&] { l.Attend(); }, 20);
}

void BM_Attend(benchmark::State& state, Config c) {
  const int64_t n = state.range(0);
  const double f16 = F16Seconds(n);
  Layer l(c, n);
  if (!l.error.empty()) {
    state.SkipWithError(l.error.c_str());
    return;
  }
  bench::TimeAgainstF16(state, [&] { l.Attend(); }, f16);
  state.counters["kv_bytes"] = double(l.cache->Memory().KvBytes());
}

int Register() {
  for (const auto& c : Configs()) {
    benchmark::RegisterBenchmark((std::string("Attend/") + c.label + "/").c_str(), BM_Attend, c)
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
