// Shared by the attention benchmarks (kv_codec_bench, kv_attend_bench): thread CPU time (the
// machine is shared, and wall time counts other people's work too) and per-call timing against a
// reference measured in the same process.
#pragma once

#include <benchmark/benchmark.h>

#include <time.h>

#include <algorithm>
#include <cstdint>

namespace kvc::bench {

inline double CpuNow() {
  timespec ts;
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
  return double(ts.tv_sec) + 1e-9 * double(ts.tv_nsec);
}

// Seconds per call of fn (thread CPU time): one warm-up call, then the best of 3 runs of reps.
template <class Fn>
double SecondsPerCall(Fn&& fn, int reps) {
  fn();
  double best = 1e30;
  for (int i = 0; i < 3; ++i) {
    const double t0 = CpuNow();
    for (int r = 0; r < reps; ++r) fn();
    best = std::min(best, (CpuNow() - t0) / reps);
  }
  return best;
}

// The benchmark loop over fn (after one warm-up call); sets the counters us_per_tok (µs per call)
// and x_f16 (seconds per call / f16_seconds: < 1 is faster than the f16 reference).
template <class Fn>
void TimeAgainstF16(benchmark::State& state, Fn&& fn, double f16_seconds) {
  fn();
  int64_t iters = 0;
  const double t0 = CpuNow();
  for (auto _ : state) {
    fn();
    ++iters;
  }
  const double sec = (CpuNow() - t0) / double(std::max<int64_t>(iters, 1));
  state.counters["us_per_tok"] = sec * 1e6;
  state.counters["x_f16"] = sec / f16_seconds;
}

}  // namespace kvc::bench
