// `kvcrunch eval`: the same text through the f16 baseline and each KV configuration.
#pragma once

#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "runner.h"

namespace kvc {

struct EvalOptions {
  PerplexityOptions ppl;
  int decode_tokens = 32;   // single-token steps timed after the last chunk (decode tokens/s)
  std::string text_path;
};

struct EvalRow {
  std::string method;
  std::string describe;      // codecs/transforms as built
  double k_bits = 0, v_bits = 0;   // from the descriptors
  size_t kv_bytes = 0;       // allocated (packed + tail) after the last chunk, measured
  size_t tail_bytes = 0;     // of which residual windows
  double kv_bytes_per_token = 0;
  double compression = 0;    // baseline kv_bytes / kv_bytes
  double ppl = 0, dppl_pct = 0;
  // Standard error of dppl_pct from the paired per-token NLL differences (config − baseline on
  // the same tokens), treating tokens as independent: 100·exp(m)·sd(d)/√n. Neighbouring tokens
  // are correlated, so read it as a lower bound on the noise. 0 for the baseline.
  double dppl_se_pct = 0;
  double kld_mean = 0, kld_p999 = 0;  // vs baseline (nats)
  double top1_pct = 0;       // argmax agreement with the baseline
  double decode_tps = 0;
  double prefill_tps = 0;
  int64_t n_scored = 0;
  std::string error;         // non-empty: this configuration failed (shown, never dropped)
};

struct EvalResult {
  std::string model, text;
  int64_t n_ctx = 0, n_chunks = 0, n_tokens_text = 0;
  int threads = 0;
  size_t peak_rss = 0;
  std::vector<EvalRow> rows;   // rows[0] is the baseline
};

StatusOr<EvalResult> RunEval(const Model& model, const std::vector<int32_t>& tokens,
                             std::vector<KvRunConfig> configs, const EvalOptions& opt);

std::string FormatTable(const EvalResult& r);
nlohmann::json ToJson(const EvalResult& r);
std::string ToCsv(const EvalResult& r);
// Writes DIR/report.md and DIR/quality_vs_bytes.svg (Pareto front drawn).
Status WriteReport(const EvalResult& r, const std::string& dir);

}  // namespace kvc
