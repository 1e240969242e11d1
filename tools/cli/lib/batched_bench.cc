#include "batched_bench.h"

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <cstdio>
#include <random>

#include "kv/policy.h"
#include "model/forward.h"

namespace kvc {

Status RunBatchedBench(const Model& model, const KvRunConfig& rc, const BatchedBenchOptions& o,
                       bool json) {
  for (const auto* v : {&o.npp, &o.ntg, &o.npl}) {
    if (v->empty()) return InvalidArgument("-npp, -ntg and -npl need at least one value");
    for (int x : *v) {
      if (x < 1 || x > 65536) return InvalidArgument("-npp, -ntg and -npl values must be in [1, 65536]");
    }
  }
  if (o.n_batch < 1 || o.reps < 1) return InvalidArgument("-b and -r must be >= 1");
  const int n_vocab = model.config().n_vocab;
  std::mt19937 rng(0);
  std::uniform_int_distribution<int> tok(100, n_vocab - 1);
  if (!json) {
    std::printf("| %6s | %6s | %4s | %8s | %8s | %10s | %8s | %10s | %8s | %10s | %14s |\n", "PP",
                "TG", "B", "N_KV", "T_PP s", "S_PP t/s", "T_TG s", "S_TG t/s", "T s", "S t/s",
                "KV bytes");
    std::printf("|%s|\n", std::string(126, '-').c_str());
  }
  ForwardScratch scratch;
  for (int pp : o.npp) {
    for (int tg : o.ntg) {
      for (int b : o.npl) {
        std::vector<double> tpp, ttg;
        size_t kv_bytes = 0;
        for (int r = 0; r <= o.reps; ++r) {  // r = 0: warm-up
          std::vector<std::unique_ptr<kv::KvCache>> caches;
          std::vector<std::unique_ptr<kv::EvictionPolicy>> policies;
          kv::KvCacheConfig cfg = rc.cache;
          cfg.rope_table_positions = std::max<int64_t>(cfg.rope_table_positions, pp + tg);
          for (int s = 0; s < b; ++s) {
            KVC_ASSIGN_OR_RETURN(auto p, kv::MakePolicy(rc.evict, model.kv_shape()));
            kv::KvCacheConfig c = cfg;
            if (p && !c.position_mode_set) c.position_mode = p->position_mode();
            KVC_ASSIGN_OR_RETURN(auto cache, kv::KvCache::Create(model.kv_shape(), c));
            if (p) cache->SetStatsRequest(p->StatsNeeded());
            caches.push_back(std::move(cache));
            policies.push_back(std::move(p));
          }
          std::vector<std::vector<int32_t>> prompts(b, std::vector<int32_t>(pp));
          for (auto& p : prompts) for (auto& t : p) t = tok(rng);
          std::vector<std::vector<float>> logits(b, std::vector<float>(size_t(n_vocab)));
          // Prefill: rows of all sequences, n_batch rows per forward (whole prompts per sequence
          // while they fit, as llama-batched-bench fills one batch).
          const double t0 = NowSeconds();
          for (int off = 0; off < pp;) {
            const int per_seq = std::max(1, std::min(pp - off, o.n_batch / b));
            std::vector<SeqRows> rows(b);
            for (int s = 0; s < b; ++s) {
              if (policies[s]) KVC_RETURN_IF_ERROR(policies[s]->BeforeWrite(*caches[s], per_seq));
              rows[s].cache = caches[s].get();
              rows[s].tokens = prompts[s].data() + off;
              rows[s].n_tokens = per_seq;
              rows[s].seq0 = off;
              rows[s].logits = off + per_seq == pp ? logits[s].data() : nullptr;
            }
            ForwardBatch(model, rows, &scratch);
            for (auto& rr : rows) KVC_RETURN_IF_ERROR(rr.status);
            off += per_seq;
          }
          for (int s = 0; s < b; ++s) {
            if (policies[s]) KVC_RETURN_IF_ERROR(policies[s]->AfterPrefill(*caches[s], pp));
          }
          const double t1 = NowSeconds();
          std::vector<int32_t> next(b);
          for (int i = 0; i < tg; ++i) {
            std::vector<SeqRows> rows(b);
            for (int s = 0; s < b; ++s) {
              next[s] = int32_t(std::max_element(logits[s].begin(), logits[s].end()) - logits[s].begin());
              if (policies[s]) KVC_RETURN_IF_ERROR(policies[s]->BeforeWrite(*caches[s], 1));
              rows[s].cache = caches[s].get();
              rows[s].tokens = &next[s];
              rows[s].n_tokens = 1;
              rows[s].seq0 = pp + i;
              rows[s].logits = logits[s].data();
            }
            ForwardBatch(model, rows, &scratch);
            for (int s = 0; s < b; ++s) {
              KVC_RETURN_IF_ERROR(rows[s].status);
              if (policies[s]) KVC_RETURN_IF_ERROR(policies[s]->AfterStep(*caches[s]));
            }
          }
          const double t2 = NowSeconds();
          kv_bytes = 0;
          for (auto& c : caches) kv_bytes += c->Memory().TotalBytes();
          if (r == 0) continue;
          tpp.push_back(t1 - t0);
          ttg.push_back(t2 - t1);
        }
        auto median = [](std::vector<double> v) {
          std::sort(v.begin(), v.end());
          return v[v.size() / 2];
        };
        const double a = median(tpp), g = median(ttg);
        const int64_t n_kv = int64_t(b) * (pp + tg);
        if (json) {
          nlohmann::json j = {{"pp", pp},  {"tg", tg},  {"b", b},
                              {"n_kv", n_kv},
                              {"t_pp", a}, {"speed_pp", double(b) * pp / a},
                              {"t_tg", g}, {"speed_tg", double(b) * tg / g},
                              {"t", a + g}, {"speed", double(n_kv) / (a + g)},
                              {"kv_bytes", kv_bytes}, {"cache", rc.Label()}};
          std::printf("%s\n", j.dump().c_str());
        } else {
          std::printf("| %6d | %6d | %4d | %8lld | %8.3f | %10.2f | %8.3f | %10.2f | %8.3f | %10.2f | %14zu |\n",
                      pp, tg, b, (long long)n_kv, a, double(b) * pp / a, g, double(b) * tg / g, a + g,
                      double(n_kv) / (a + g), kv_bytes);
        }
        std::fflush(stdout);
      }
    }
  }
  return Status::Ok();
}

}  // namespace kvc
