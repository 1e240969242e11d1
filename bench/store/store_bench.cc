// Throughput of RedisTier (src/store/redis_tier.h) on one Redis: T threads each SET then GET values
// of one size over a small key space, like `redis-benchmark -c T -r K -d SIZE -t set,get`, so the
// two print comparable numbers (bench/store/run.sh prints them side by side).
//
//   store_bench --url redis://127.0.0.1:PORT --size BYTES [--threads 4] [--ops 200] [--keys 64]
//               [--mget 0]
// Prints one line per operation: "op size threads ops seconds ops_per_s GB_per_s" (GB = 1e9 bytes
// of values). --mget N also times MGet of N keys per call. Exit status 1 on any error or miss.
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <thread>
#include <vector>

#include "store/redis_tier.h"

namespace {

struct Args {
  std::string url;
  size_t size = 1 << 20;
  int threads = 4, ops = 200, keys = 64, mget = 0;
};

bool ParseArgs(int argc, char** argv, Args* a) {
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string k = argv[i], v = argv[i + 1];
    if (k == "--url") a->url = v;
    else if (k == "--size") a->size = std::strtoull(v.c_str(), nullptr, 10);
    else if (k == "--threads") a->threads = std::atoi(v.c_str());
    else if (k == "--ops") a->ops = std::atoi(v.c_str());
    else if (k == "--keys") a->keys = std::atoi(v.c_str());
    else if (k == "--mget") a->mget = std::atoi(v.c_str());
    else return false;
  }
  return !a->url.empty() && a->size > 0 && a->threads > 0 && a->ops > 0 && a->keys > 0 &&
         a->mget >= 0;
}

}  // namespace

int main(int argc, char** argv) {
  Args a;
  if (!ParseArgs(argc, argv, &a)) {
    std::fprintf(stderr,
                 "usage: store_bench --url URL --size BYTES [--threads T] [--ops N] [--keys K] "
                 "[--mget N]\n");
    return 2;
  }
  kvc::store::RedisOptions o;
  o.url = a.url;
  o.timeout_ms = 5000;  // a benchmark, not a latency bound: never count slowness as down
  o.pool_size = a.threads;
  auto tier = kvc::store::RedisTier::Create(o);
  if (!tier.ok()) {
    std::fprintf(stderr, "%s\n", tier.status().ToString().c_str());
    return 1;
  }
  std::string value(a.size, '\0');
  for (size_t i = 0; i < a.size; ++i) value[i] = static_cast<char>((i * 2654435761u) >> 24);
  std::atomic<int> errors{0};
  auto key = [&](int t, int i) { return "bench:" + std::to_string((t * a.ops + i) % a.keys); };

  auto run = [&](const char* op, auto&& body, int64_t ops_per_thread, int64_t values_per_op) {
    std::vector<std::thread> th;
    const auto t0 = std::chrono::steady_clock::now();
    for (int t = 0; t < a.threads; ++t) th.emplace_back([&, t] { body(t); });
    for (auto& x : th) x.join();
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    const double ops = static_cast<double>(ops_per_thread) * a.threads;
    std::printf("%-5s %9zu %2d %7.0f %7.3f %10.1f %7.3f\n", op, a.size, a.threads, ops, s, ops / s,
                ops * values_per_op * static_cast<double>(a.size) / s / 1e9);
  };
  std::printf("op         size  T     ops       s      ops/s    GB/s\n");
  run("SET",
      [&](int t) {
        for (int i = 0; i < a.ops; ++i) {
          if (!(*tier)->Set(key(t, i), value).ok()) ++errors;
        }
      },
      a.ops, 1);
  run("GET",
      [&](int t) {
        for (int i = 0; i < a.ops; ++i) {
          auto g = (*tier)->Get(key(t, i));
          if (!g.ok() || g->size() != a.size) ++errors;
        }
      },
      a.ops, 1);
  if (a.mget > 0) {
    const int calls = std::max(1, a.ops / a.mget);
    run("MGET",
        [&](int t) {
          for (int c = 0; c < calls; ++c) {
            std::vector<std::string> ks;
            for (int j = 0; j < a.mget; ++j) ks.push_back(key(t, c * a.mget + j));
            for (auto& r : (*tier)->MGet(ks)) {
              if (!r.ok() || r->size() != a.size) ++errors;
            }
          }
        },
        calls, a.mget);
  }
  const auto st = (*tier)->GetStats();
  if (errors.load() != 0) {
    std::fprintf(stderr, "store_bench: %d errors/misses (last: %s)\n", errors.load(),
                 st.last_error.c_str());
    return 1;
  }
  return 0;
}
