#include "eval.h"

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <memory>

#include <fmt/format.h>

#include "cpu/ops.h"

namespace kvc {

StatusOr<EvalResult> RunEval(const Model& model, const std::vector<int32_t>& tokens,
                             std::vector<KvRunConfig> configs, const EvalOptions& opt) {
  const int64_t n_ctx = opt.ppl.n_ctx;
  if (n_ctx < 4) return InvalidArgument("context size must be at least 4 tokens");
  int64_t n_chunks = int64_t(tokens.size()) / n_ctx;
  if (opt.ppl.max_chunks > 0) n_chunks = std::min(n_chunks, opt.ppl.max_chunks);
  if (n_chunks < 1) {
    return InvalidArgument(fmt::format("the text has {} tokens, fewer than one chunk of {} (lower -c)",
                                       tokens.size(), n_ctx));
  }
  const int n_vocab = model.config().n_vocab;
  KvRunConfig base;
  base.name = "f16 (baseline)";
  configs.insert(configs.begin(), base);

  struct Run {
    KvRunConfig cfg;
    std::unique_ptr<Session> s;
    std::vector<double> kld;
    std::vector<double> nll;   // per scored token, in order (same tokens for every run)
    double nll_sum = 0;
    int64_t n = 0, agree = 0;
    double prefill_s = 0;
    int64_t prefill_tokens = 0;
    EvalRow row;
  };
  std::vector<Run> runs(configs.size());
  Session::Options so;
  so.n_ctx = n_ctx + opt.decode_tokens;
  so.n_batch = opt.ppl.n_batch;
  for (size_t i = 0; i < configs.size(); ++i) {
    runs[i].cfg = configs[i];
    runs[i].row.method = configs[i].Label();
    auto s = Session::Create(model, configs[i].cache, configs[i].evict, so);
    if (!s.ok()) {
      if (i == 0) return s.status();
      runs[i].row.error = s.status().message();
      continue;
    }
    runs[i].s = std::move(s).value();
    runs[i].row.describe = runs[i].s->cache().Describe();
    runs[i].row.k_bits = runs[i].s->cache().KBitsPerValue();
    runs[i].row.v_bits = runs[i].s->cache().VBitsPerValue();
  }

  Progress prog("eval", n_chunks * int64_t(runs.size()) + int64_t(runs.size()));
  ChunkScores base_scores, sc;
  for (int64_t ch = 0; ch < n_chunks; ++ch) {
    const int32_t* chunk = tokens.data() + ch * n_ctx;
    for (size_t i = 0; i < runs.size(); ++i) {
      Run& r = runs[i];
      if (!r.s) { prog.Step(); continue; }
      const double t0 = NowSeconds();
      ChunkScores& out = i == 0 ? base_scores : sc;
      Status st = ScoreChunk(*r.s, chunk, n_ctx, /*keep_logprobs=*/true, &out);
      r.prefill_s += NowSeconds() - t0;
      r.prefill_tokens += n_ctx;
      if (!st.ok()) {
        if (i == 0) return st;
        r.row.error = st.message();
        r.s.reset();
        prog.Step();
        continue;
      }
      const int64_t ns = int64_t(out.nll.size());
      for (int64_t t = 0; t < ns; ++t) {
        r.nll_sum += out.nll[t];
        r.nll.push_back(out.nll[t]);
        r.agree += out.argmax[t] == base_scores.argmax[t];
        const float* lb = &base_scores.logprobs[size_t(t) * n_vocab];
        const float* lc = &out.logprobs[size_t(t) * n_vocab];
        double kl = 0;
        for (int v = 0; v < n_vocab; ++v) kl += std::exp(double(lb[v])) * (double(lb[v]) - lc[v]);
        r.kld.push_back(std::max(0.0, kl));
      }
      r.n += ns;
      prog.Step(1, r.row.method);
    }
  }
  // Decode speed: after the last chunk every configuration decodes decode_tokens more tokens
  // (the text's continuation, wrapping to its start) one at a time, interleaved: step i of every
  // configuration, in an order rotated each step, before step i + 1 of any. A burst of load from
  // other jobs then hits all configurations alike instead of the one that happened to run then.
  // Each step is timed in process CPU time and wall time, on one thread: with more, the CPU time
  // also counts OpenMP threads spin-waiting at barriers, which grows with the machine's load (on
  // 2 busy cores, load 6: -t 2 read 134 ms of CPU per f16 step, -t 1 7 ms, passive waiting 13 ms).
  const int64_t dec_start = n_chunks * n_ctx;
  const int threads = cpu::NumThreads();
  cpu::SetNumThreads(1);
  std::vector<std::vector<double>> cpu_ms(runs.size()), wall_ms(runs.size());
  std::vector<float> lg;
  for (int i = 0; i < opt.decode_tokens; ++i) {
    const int32_t tok = tokens[(dec_start + i) % tokens.size()];
    for (size_t k = 0; k < runs.size(); ++k) {
      const size_t ri = (k + size_t(i)) % runs.size();
      Run& r = runs[ri];
      if (!r.s) continue;
      const double w0 = NowSeconds(), c0 = ProcessCpuSeconds();
      Status st = r.s->Eval({tok}, false, &lg);
      const double c1 = ProcessCpuSeconds(), w1 = NowSeconds();
      if (!st.ok()) {
        r.row.error = st.message();
        r.s.reset();
        continue;
      }
      cpu_ms[ri].push_back(1e3 * (c1 - c0));
      wall_ms[ri].push_back(1e3 * (w1 - w0));
    }
  }
  cpu::SetNumThreads(threads);
  auto quantile = [](std::vector<double> v, double q) {
    std::sort(v.begin(), v.end());
    const double x = q * double(v.size() - 1);
    const size_t lo = size_t(x);
    return lo + 1 < v.size() ? v[lo] + (x - double(lo)) * (v[lo + 1] - v[lo]) : v[lo];
  };
  for (size_t ri = 0; ri < runs.size(); ++ri) {
    Run& r = runs[ri];
    if (!cpu_ms[ri].empty()) {
      r.row.decode_steps = int(cpu_ms[ri].size());
      r.row.decode_cpu_ms = quantile(cpu_ms[ri], 0.5);
      r.row.decode_cpu_ms_q1 = quantile(cpu_ms[ri], 0.25);
      r.row.decode_cpu_ms_q3 = quantile(cpu_ms[ri], 0.75);
      r.row.decode_wall_ms = quantile(wall_ms[ri], 0.5);
    }
    if (r.s) {
      const auto mem = r.s->cache().Memory();
      r.row.kv_bytes = mem.KvBytes();
      r.row.tail_bytes = mem.TailBytes();
      // Every token the cache holds, demoted / pinned ones (side tiers, demote= / sink_detect=)
      // included: their bytes are in KvBytes().
      const int64_t cells = (mem.Cells() + mem.SideCells()) /
                            std::max(1, model.config().n_layer * model.config().n_head_kv);
      r.row.kv_bytes_per_token = cells > 0 ? double(mem.KvBytes()) / cells : 0;
    }
    prog.Step(1, "decode " + r.row.method);
  }
  EvalResult res;
  res.n_ctx = n_ctx;
  res.n_chunks = n_chunks;
  res.n_tokens_text = int64_t(tokens.size());
  res.threads = cpu::NumThreads();
  const double base_ppl = runs[0].n ? std::exp(runs[0].nll_sum / runs[0].n) : 0;
  const double base_bytes = double(runs[0].row.kv_bytes);
  for (auto& r : runs) {
    EvalRow row = r.row;
    row.n_scored = r.n;
    if (r.n > 0 && row.error.empty()) {
      row.ppl = std::exp(r.nll_sum / r.n);
      row.dppl_pct = 100.0 * (row.ppl / base_ppl - 1.0);
      if (&r != &runs[0] && r.nll.size() == runs[0].nll.size() && r.n > 1) {
        double m = 0, m2 = 0;
        for (size_t t = 0; t < r.nll.size(); ++t) m += r.nll[t] - runs[0].nll[t];
        m /= double(r.n);
        for (size_t t = 0; t < r.nll.size(); ++t) {
          const double d = r.nll[t] - runs[0].nll[t] - m;
          m2 += d * d;
        }
        row.dppl_se_pct = 100.0 * std::exp(m) * std::sqrt(m2 / double(r.n - 1) / double(r.n));
      }
      double s = 0;
      for (double k : r.kld) s += k;
      row.kld_mean = s / r.kld.size();
      std::vector<double> sorted = r.kld;
      std::sort(sorted.begin(), sorted.end());
      row.kld_p999 = sorted[std::min(sorted.size() - 1, size_t(std::ceil(0.999 * sorted.size())) - 1)];
      row.top1_pct = 100.0 * r.agree / r.n;
      row.compression = row.kv_bytes ? base_bytes / row.kv_bytes : 0;
      row.prefill_tps = r.prefill_s > 0 ? r.prefill_tokens / r.prefill_s : 0;
    }
    res.rows.push_back(row);
  }
  res.peak_rss = PeakRssBytes();
  return res;
}

std::string FormatTable(const EvalResult& r) {
  std::string s = fmt::format("{:<34} {:>6} {:>6} {:>11} {:>6} {:>9} {:>8} {:>6} {:>9} {:>9} {:>7}\n",
                              "method", "K bpv", "V bpv", "KV bytes", "comp×", "ppl", "Δppl%",
                              "±SE", "KLD", "KLD p99.9", "top1%");
  for (const auto& x : r.rows) {
    if (!x.error.empty()) {
      s += fmt::format("{:<34} ERROR: {}\n", x.method, x.error);
      continue;
    }
    s += fmt::format("{:<34} {:>6.2f} {:>6.2f} {:>11} {:>6.2f} {:>9.4f} {:>+8.3f} {:>6.3f} {:>9.5f} {:>9.4f} {:>7.2f}\n",
                     x.method.substr(0, 34), x.k_bits, x.v_bits, x.kv_bytes, x.compression, x.ppl,
                     x.dppl_pct, x.dppl_se_pct, x.kld_mean, x.kld_p999, x.top1_pct);
  }
  s += fmt::format("\n{} chunks x {} tokens ({} scored per config), {} threads, peak RSS {:.1f} MiB\n",
                   r.n_chunks, r.n_ctx, r.rows.empty() ? 0 : r.rows[0].n_scored, r.threads,
                   r.peak_rss / 1048576.0);
  return s;
}

// How the speed section was measured, for the table and the report.
static std::string SpeedMethod(const EvalResult& r) {
  const int steps = r.rows.empty() ? 0 : r.rows[0].decode_steps;
  return fmt::format(
      "Decode speed: {} single-token steps per configuration at depth {} (after the last chunk), "
      "interleaved across configurations (step i of every one, in a rotated order, before step "
      "i + 1 of any), on 1 thread (the chunks above ran on {}). CPU ms = process CPU time per "
      "step: the work a step costs, whatever else runs on the machine (on one thread no OpenMP "
      "thread spin-waits, which would count as CPU time and grow with the load); median "
      "[quartiles] over the steps; x f16 = ratio of medians to the baseline. Wall ms = elapsed "
      "time per step (median): it includes waiting for a CPU on a busy machine, so it is not "
      "comparable across rows or runs. Compare codecs' cost by CPU ms, where the quartile "
      "ranges do not overlap.",
      steps, r.n_ctx, r.threads);
}

std::string FormatSpeed(const EvalResult& r) {
  if (r.rows.empty() || r.rows[0].decode_steps == 0) return "";
  const double base = r.rows[0].decode_cpu_ms;
  std::string s = fmt::format("{:<34} {:>9} {:>17} {:>7} {:>9}\n", "method", "CPU ms", "[q1, q3]",
                              "x f16", "wall ms");
  for (const auto& x : r.rows) {
    if (!x.error.empty() || x.decode_steps == 0) continue;
    s += fmt::format("{:<34} {:>9.2f} {:>17} {:>7.2f} {:>9.2f}\n", x.method.substr(0, 34),
                     x.decode_cpu_ms, fmt::format("[{:.2f}, {:.2f}]", x.decode_cpu_ms_q1, x.decode_cpu_ms_q3),
                     base > 0 ? x.decode_cpu_ms / base : 0.0, x.decode_wall_ms);
  }
  return s + "\n" + SpeedMethod(r) + "\n";
}

nlohmann::json ToJson(const EvalResult& r) {
  nlohmann::json j;
  j["model"] = r.model;
  j["text"] = r.text;
  j["n_ctx"] = r.n_ctx;
  j["n_chunks"] = r.n_chunks;
  j["threads"] = r.threads;
  j["peak_rss_bytes"] = r.peak_rss;
  for (const auto& x : r.rows) {
    nlohmann::json o;
    o["method"] = x.method;
    o["describe"] = x.describe;
    if (!x.error.empty()) {
      o["error"] = x.error;
    } else {
      o["k_bits_per_value"] = x.k_bits;
      o["v_bits_per_value"] = x.v_bits;
      o["kv_bytes"] = x.kv_bytes;
      o["residual_bytes"] = x.tail_bytes;
      o["kv_bytes_per_token"] = x.kv_bytes_per_token;
      o["compression"] = x.compression;
      o["ppl"] = x.ppl;
      o["dppl_pct"] = x.dppl_pct;
      o["dppl_se_pct"] = x.dppl_se_pct;
      o["kld_mean"] = x.kld_mean;
      o["kld_p999"] = x.kld_p999;
      o["top1_pct"] = x.top1_pct;
      o["decode_steps"] = x.decode_steps;
      o["decode_cpu_ms_per_step"] = x.decode_cpu_ms;
      o["decode_cpu_ms_q1"] = x.decode_cpu_ms_q1;
      o["decode_cpu_ms_q3"] = x.decode_cpu_ms_q3;
      o["decode_wall_ms_per_step"] = x.decode_wall_ms;
      o["prefill_tokens_per_second"] = x.prefill_tps;
      o["n_scored"] = x.n_scored;
    }
    j["rows"].push_back(o);
  }
  return j;
}

std::string ToCsv(const EvalResult& r) {
  std::string s = "method,k_bits,v_bits,kv_bytes,compression,ppl,dppl_pct,dppl_se_pct,kld_mean,kld_p999,top1_pct,decode_cpu_ms,decode_cpu_ms_q1,decode_cpu_ms_q3,decode_wall_ms,error\n";
  for (const auto& x : r.rows) {
    s += fmt::format("\"{}\",{:.4f},{:.4f},{},{:.4f},{:.6f},{:.4f},{:.4f},{:.6f},{:.6f},{:.3f},{:.3f},{:.3f},{:.3f},{:.3f},\"{}\"\n",
                     x.method, x.k_bits, x.v_bits, x.kv_bytes, x.compression, x.ppl, x.dppl_pct,
                     x.dppl_se_pct, x.kld_mean, x.kld_p999, x.top1_pct, x.decode_cpu_ms,
                     x.decode_cpu_ms_q1, x.decode_cpu_ms_q3, x.decode_wall_ms, x.error);
  }
  return s;
}

static std::string Esc(const std::string& s) {
  std::string o;
  for (char c : s) {
    if (c == '<') o += "&lt;";
    else if (c == '>') o += "&gt;";
    else if (c == '&') o += "&amp;";
    else o += c;
  }
  return o;
}

Status WriteReport(const EvalResult& r, const std::string& dir) {
  std::error_code ec;
  std::filesystem::create_directories(dir, ec);
  if (ec) return InvalidArgument(fmt::format("cannot create report dir '{}': {}", dir, ec.message()));
  {
    std::ofstream md(dir + "/report.md");
    if (!md) return InvalidArgument(fmt::format("cannot write {}/report.md", dir));
    md << "# kvcrunch eval\n\n";
    md << fmt::format("Model `{}`, text `{}`, {} chunks x {} tokens, {} threads, peak RSS {:.1f} MiB.\n\n",
                      r.model, r.text, r.n_chunks, r.n_ctx, r.threads, r.peak_rss / 1048576.0);
    md << "| method | K bits | V bits | KV bytes | compression x | ppl | Δppl % | ± SE | mean KLD | KLD p99.9 | top-1 % |\n";
    md << "|---|---|---|---|---|---|---|---|---|---|---|\n";
    for (const auto& x : r.rows) {
      if (!x.error.empty()) {
        md << fmt::format("| {} | error: {} |||||||||| \n", x.method, x.error);
        continue;
      }
      md << fmt::format("| {} | {:.2f} | {:.2f} | {} | {:.2f} | {:.4f} | {:+.3f} | {:.3f} | {:.5f} | {:.4f} | {:.2f} |\n",
                        x.method, x.k_bits, x.v_bits, x.kv_bytes, x.compression, x.ppl, x.dppl_pct,
                        x.dppl_se_pct, x.kld_mean, x.kld_p999, x.top1_pct);
    }
    if (!r.rows.empty() && r.rows[0].decode_steps > 0) {
      const double base = r.rows[0].decode_cpu_ms;
      md << "\n## Decode speed (bench)\n\n";
      md << "| method | CPU ms / step | [q1, q3] | x f16 | wall ms / step |\n|---|---|---|---|---|\n";
      for (const auto& x : r.rows) {
        if (!x.error.empty() || x.decode_steps == 0) continue;
        md << fmt::format("| {} | {:.2f} | [{:.2f}, {:.2f}] | {:.2f} | {:.2f} |\n", x.method,
                          x.decode_cpu_ms, x.decode_cpu_ms_q1, x.decode_cpu_ms_q3,
                          base > 0 ? x.decode_cpu_ms / base : 0.0, x.decode_wall_ms);
      }
      md << "\n" << SpeedMethod(r) << "\n";
    }
    md << "\n![quality vs KV bytes](quality_vs_bytes.svg)\n";
  }
  // SVG: x = KV bytes per token (log2), y = mean KLD (log10); Pareto front = min KLD at <= bytes.
  std::vector<const EvalRow*> pts;
  for (const auto& x : r.rows) {
    if (x.error.empty() && x.kv_bytes_per_token > 0) pts.push_back(&x);
  }
  const double W = 760, H = 480, L = 80, R = 220, T = 30, B = 60;
  double xmin = 1e300, xmax = -1e300, ymin = 1e300, ymax = -1e300;
  auto yv = [](const EvalRow* p) { return std::log10(std::max(p->kld_mean, 1e-6)); };
  for (auto* p : pts) {
    xmin = std::min(xmin, std::log2(p->kv_bytes_per_token));
    xmax = std::max(xmax, std::log2(p->kv_bytes_per_token));
    ymin = std::min(ymin, yv(p));
    ymax = std::max(ymax, yv(p));
  }
  if (pts.empty()) { xmin = 0; xmax = 1; ymin = -6; ymax = 0; }
  xmin -= 0.3; xmax += 0.3; ymin -= 0.3; ymax += 0.3;
  auto X = [&](double v) { return L + (v - xmin) / (xmax - xmin) * (W - L - R); };
  auto Y = [&](double v) { return T + (ymax - v) / (ymax - ymin) * (H - T - B); };
  std::ofstream svg(dir + "/quality_vs_bytes.svg");
  if (!svg) return InvalidArgument(fmt::format("cannot write {}/quality_vs_bytes.svg", dir));
  svg << fmt::format("<svg xmlns='http://www.w3.org/2000/svg' width='{}' height='{}' font-family='sans-serif' font-size='11'>\n", W, H);
  svg << fmt::format("<rect x='0' y='0' width='{}' height='{}' fill='white'/>\n", W, H);
  svg << fmt::format("<line x1='{}' y1='{}' x2='{}' y2='{}' stroke='black'/>\n", L, H - B, W - R, H - B);
  svg << fmt::format("<line x1='{}' y1='{}' x2='{}' y2='{}' stroke='black'/>\n", L, T, L, H - B);
  for (int e = int(std::ceil(xmin)); e <= int(std::floor(xmax)); ++e) {
    svg << fmt::format("<text x='{:.1f}' y='{}' text-anchor='middle'>{}</text>\n", X(e), H - B + 15, 1LL << std::max(e, 0));
  }
  for (int e = int(std::ceil(ymin)); e <= int(std::floor(ymax)); ++e) {
    svg << fmt::format("<text x='{}' y='{:.1f}' text-anchor='end'>1e{}</text>\n", L - 5, Y(e) + 4, e);
  }
  svg << fmt::format("<text x='{}' y='{}' text-anchor='middle'>KV bytes per token, all layers (log scale)</text>\n", (L + W - R) / 2, H - 20);
  svg << fmt::format("<text x='15' y='{}' transform='rotate(-90 15 {})' text-anchor='middle'>mean KL divergence vs f16 (log)</text>\n", (T + H - B) / 2, (T + H - B) / 2);
  // Pareto front: sort by bytes, keep points with KLD lower than every cheaper point.
  std::vector<const EvalRow*> s = pts;
  std::sort(s.begin(), s.end(), [](auto* a, auto* b) { return a->kv_bytes_per_token < b->kv_bytes_per_token; });
  std::string path;
  double best = 1e300;
  for (auto* p : s) {
    if (p->kld_mean < best) {
      best = p->kld_mean;
      path += fmt::format("{}{:.1f},{:.1f} ", path.empty() ? "M" : "L", X(std::log2(p->kv_bytes_per_token)), Y(yv(p)));
    }
  }
  if (!path.empty()) svg << "<path d='" << path << "' fill='none' stroke='#c33' stroke-width='1.5'/>\n";
  int i = 0;
  for (auto* p : pts) {
    const double px = X(std::log2(p->kv_bytes_per_token)), py = Y(yv(p));
    svg << fmt::format("<circle cx='{:.1f}' cy='{:.1f}' r='4' fill='#36c'/>\n", px, py);
    svg << fmt::format("<text x='{:.1f}' y='{:.1f}'>{}</text>\n", px + 6, py - 4, Esc(p->method.substr(0, 28)));
    svg << fmt::format("<text x='{}' y='{}'>{:.2f} B/tok  {}</text>\n", W - R + 10, T + 14 * i++, p->kv_bytes_per_token, Esc(p->method.substr(0, 22)));
  }
  svg << "</svg>\n";
  return Status::Ok();
}

}  // namespace kvc
