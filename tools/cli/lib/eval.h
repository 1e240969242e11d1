// `kvcrunch eval`: the same text through the f16 baseline and each KV configuration.
#pragma once

#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "runner.h"

namespace kvc {

struct EvalOptions {
  PerplexityOptions ppl;
  // Single-token decode steps timed per configuration after the last chunk, interleaved across
  // configurations (step i of every configuration before step i + 1 of any; see RunEval).
  int decode_tokens = 32;
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
  // Decode speed, measured apart from the quality numbers (FormatSpeed): per single-token step at
  // depth n_ctx, the process CPU time (all threads: what the step costs, whatever else runs on
  // the machine) and the wall time; median and quartiles over decode_steps interleaved steps.
  int decode_steps = 0;
  double decode_cpu_ms = 0, decode_cpu_ms_q1 = 0, decode_cpu_ms_q3 = 0;
  double decode_wall_ms = 0;
  double prefill_tps = 0;   // wall clock over the scored chunks (busy-machine noise included)
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
// The decode-speed section: CPU ms per step (median, quartiles, ratio to the baseline) and wall
// ms, with a line saying how it was measured. Empty when no decode steps were timed.
std::string FormatSpeed(const EvalResult& r);
nlohmann::json ToJson(const EvalResult& r);
std::string ToCsv(const EvalResult& r);
// Writes DIR/report.md and DIR/quality_vs_bytes.svg (Pareto front drawn).
Status WriteReport(const EvalResult& r, const std::string& dir);

}  // namespace kvc
