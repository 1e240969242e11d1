#include "calibrate_bits.h"

#include <algorithm>
#include <cmath>
#include <ctime>
#include <filesystem>
#include <map>
#include <sstream>

#include <fmt/format.h>
#include <spdlog/spdlog.h>

#include "bits_search.h"
#include "calibrate.h"
#include "kv_config_file.h"

namespace kvc {

std::vector<std::string> DefaultBitsCandidates(bool keys) {
  if (keys) {
    return {"turbo:bits=2,nc=1,center=1",
            "turbo:bits=2.5,nc=1,center=1", "turbo:bits=3,nc=1,center=1",
            "turbo:bits=3.5,nc=1,center=1", "turbo:bits=4,nc=1,center=1",
            "kivi:bits=4,group=64,residual=64", "q8_0"};
  }
  return {"turbo:bits=1,nc=1", "turbo:bits=1.5,nc=1", "turbo:bits=2,nc=1", "turbo:bits=2.5,nc=1",
          "turbo:bits=3,nc=1", "turbo:bits=4,nc=1",   "q8_0"};
}

Status ParseBitsCandidates(const std::string& text, std::vector<std::string>* k,
                           std::vector<std::string>* v) {
  std::istringstream in(text);
  std::string part;
  bool any = false;
  while (in >> part) {
    const size_t eq = part.find('=');
    const std::string which = eq == std::string::npos ? "" : part.substr(0, eq);
    if (which != "k" && which != "v") {
      return InvalidArgument(fmt::format("--candidates: '{}' is not k=SPEC;SPEC... or v=SPEC;SPEC...", part));
    }
    std::vector<std::string>* dst = which == "k" ? k : v;
    dst->clear();
    if (part.back() == ';') return InvalidArgument(fmt::format("--candidates: empty spec in '{}'", part));
    std::istringstream specs(part.substr(eq + 1));
    std::string spec;
    while (std::getline(specs, spec, ';')) {
      if (spec.empty()) return InvalidArgument(fmt::format("--candidates: empty spec in '{}'", part));
      if (std::find(dst->begin(), dst->end(), spec) != dst->end()) {
        return InvalidArgument(fmt::format("--candidates: '{}' listed twice", spec));
      }
      dst->push_back(spec);
    }
    if (dst->empty()) return InvalidArgument(fmt::format("--candidates: no spec in '{}'", part));
    any = true;
  }
  if (!any) return InvalidArgument("--candidates: empty (k=SPEC;SPEC... v=SPEC;SPEC...)");
  return Status::Ok();
}

std::string DefaultBitsCalibText() {
  const std::string f = "shared/data/pg19/pg1342_pride_and_prejudice_austen.txt";
  for (const std::string& p : {"../" + f, std::string(KVC_SOURCE_DIR) + "/../" + f, "/work/" + f}) {
    std::error_code ec;
    if (std::filesystem::is_regular_file(p, ec)) return p;
  }
  return "";
}

namespace {

// The near-lossless codec whose one-layer KLD is the floor subtracted from every candidate's.
constexpr const char* kBitsReference = "q8_0";

struct Measured {
  double kld = 0, dnll = 0;
};

// Scores the calibration chunks through one cache configuration and compares with the baseline.
class Scorer {
 public:
  Scorer(const Model& m, const std::vector<int32_t>& tokens, const BitsCalibOptions& opt)
      : m_(m), tokens_(tokens), opt_(opt) {}

  Status Baseline() {
    kv::KvCacheConfig cfg;
    KVC_ASSIGN_OR_RETURN(auto s, MakeSession(cfg));
    base_.resize(opt_.chunks);
    for (int64_t ch = 0; ch < opt_.chunks; ++ch) {
      KVC_RETURN_IF_ERROR(ScoreChunk(*s, tokens_.data() + ch * opt_.n_ctx, opt_.n_ctx, true, &base_[ch]));
      n_scored_ += int64_t(base_[ch].nll.size());
    }
    return Status::Ok();
  }

  StatusOr<Measured> Run(const kv::KvCacheConfig& cfg) {
    KVC_ASSIGN_OR_RETURN(auto s, MakeSession(cfg));
    const int nv = m_.config().n_vocab;
    Measured r;
    for (int64_t ch = 0; ch < opt_.chunks; ++ch) {
      KVC_RETURN_IF_ERROR(ScoreChunk(*s, tokens_.data() + ch * opt_.n_ctx, opt_.n_ctx, true, &sc_));
      const ChunkScores& b = base_[ch];
      for (size_t t = 0; t < sc_.nll.size(); ++t) {
        const float* lb = &b.logprobs[t * nv];
        const float* lc = &sc_.logprobs[t * nv];
        double kl = 0;
        for (int v = 0; v < nv; ++v) kl += std::exp(double(lb[v])) * (double(lb[v]) - lc[v]);
        r.kld += std::max(0.0, kl);
        r.dnll += double(sc_.nll[t]) - b.nll[t];
      }
    }
    r.kld /= double(n_scored_);
    r.dnll /= double(n_scored_);
    if (!std::isfinite(r.kld) || !std::isfinite(r.dnll)) {
      return InvalidArgument("calibrate --method bits: a non-finite KL divergence was measured");
    }
    return r;
  }
  int64_t n_scored() const { return n_scored_; }

 private:
  StatusOr<std::unique_ptr<Session>> MakeSession(const kv::KvCacheConfig& cfg) {
    Session::Options so;
    so.n_ctx = opt_.n_ctx;
    so.n_batch = opt_.n_batch;
    return Session::Create(m_, cfg, "", so);
  }
  const Model& m_;
  const std::vector<int32_t>& tokens_;
  const BitsCalibOptions& opt_;
  std::vector<ChunkScores> base_;
  ChunkScores sc_;
  int64_t n_scored_ = 0;
};

// One layer's K (or V) set to spec, every other layer f16.
kv::KvCacheConfig OneLayer(int n_layer, int layer, bool key, const std::string& spec, int sinks) {
  kv::KvCacheConfig cfg;
  cfg.sink_tokens = sinks;
  auto& lay = key ? cfg.k_codec_layer : cfg.v_codec_layer;
  lay.assign(n_layer, "");
  lay[layer] = spec;
  return cfg;
}

// "k=A v=B k@3,7=C v@0=D sinks=1": the most frequent K and V codec as the default, the rest as
// per-layer overrides (layers in increasing order).
std::string ConfigString(const std::vector<std::string>& k, const std::vector<std::string>& v, int sinks) {
  std::string out;
  for (int kind = 0; kind < 2; ++kind) {
    const auto& lay = kind == 0 ? k : v;
    std::map<std::string, std::vector<int>> by;
    for (size_t l = 0; l < lay.size(); ++l) by[lay[l]].push_back(int(l));
    std::string def;
    size_t most = 0;
    for (const auto& [spec, ls] : by) {
      if (ls.size() > most) most = ls.size(), def = spec;  // ties: the first spec in order
    }
    out += fmt::format("{}{}={}", out.empty() ? "" : " ", kind == 0 ? "k" : "v", def);
    for (const auto& [spec, ls] : by) {
      if (spec == def) continue;
      std::string list;
      for (int l : ls) list += (list.empty() ? "" : ",") + std::to_string(l);
      out += fmt::format(" {}@{}={}", kind == 0 ? "k" : "v", list, spec);
    }
  }
  return out + fmt::format(" sinks={}", sinks);
}

Status CheckShape(const std::vector<std::vector<double>>& t, size_t rows, size_t cols, const char* what) {
  if (t.size() != rows) return InvalidArgument(fmt::format("--reuse: {} has {} layers, want {}", what, t.size(), rows));
  for (const auto& r : t) {
    if (r.size() != cols) return InvalidArgument(fmt::format("--reuse: {} rows have {} entries, want {}", what, r.size(), cols));
  }
  return Status::Ok();
}

}  // namespace

StatusOr<nlohmann::json> CalibrateBits(const Model& m, const std::vector<int32_t>& tokens,
                                       const BitsCalibOptions& opt, std::string* summary) {
  const kv::KvShape shape = m.kv_shape();
  const int n_layer = shape.n_layer;
  if (!std::isfinite(opt.budget) || opt.budget <= 0) {
    return InvalidArgument("calibrate --method bits needs --budget B (all-in bits per value, > 0)");
  }
  if (opt.k_cands.empty() || opt.v_cands.empty()) return InvalidArgument("calibrate --method bits: no candidates");
  if (opt.chunks < 1 || opt.n_ctx < 4) return InvalidArgument("calibrate --method bits: need --chunks >= 1 and -c >= 4");
  if (int64_t(tokens.size()) < opt.chunks * opt.n_ctx) {
    return InvalidArgument(fmt::format("the calibration text has {} tokens, fewer than --chunks {} x -c {}",
                                       tokens.size(), opt.chunks, opt.n_ctx));
  }
  if (opt.sinks < 0 || opt.sinks >= opt.n_ctx / 2) return InvalidArgument("calibrate --method bits: bad sink count");

  // Costs: one layer of the model's shape, the candidate on K (V f16) or on V (K f16).
  kv::KvShape one = shape;
  one.n_layer = 1;
  BitsProblem p;
  p.budget = opt.budget;
  for (int kind = 0; kind < 2; ++kind) {
    const auto& cands = kind == 0 ? opt.k_cands : opt.v_cands;
    for (const auto& spec : cands) {
      kv::KvCacheConfig cfg;
      cfg.sink_tokens = opt.sinks;
      (kind == 0 ? cfg.k_codec : cfg.v_codec) = spec;
      auto ab = MeasureAllInBits(one, cfg, int(opt.bits_ctx));
      if (!ab.ok()) {
        return InvalidArgument(fmt::format("{} candidate '{}': {}", kind == 0 ? "K" : "V", spec, ab.status().message()));
      }
      const double bytes = kind == 0 ? ab->k_bytes[0] : ab->v_bytes[0];
      (kind == 0 ? p.k_cost : p.v_cost).push_back(16.0 * bytes / (ab->f16_bytes * n_layer));
    }
  }

  // A budget no mix can meet is refused before the (long) measurement.
  const double cheapest = n_layer * (*std::min_element(p.k_cost.begin(), p.k_cost.end()) +
                                     *std::min_element(p.v_cost.begin(), p.v_cost.end()));
  if (cheapest > opt.budget) {
    return InvalidArgument(fmt::format("--budget {}: the cheapest mix of the candidates costs {:.4f} "
                                       "bits/value all in at {} tokens (add cheaper candidates)",
                                       opt.budget, cheapest, opt.bits_ctx));
  }
  const std::string model_id = ModelIdentity(m);
  Scorer scorer(m, tokens, opt);
  // raw[kind][l][c]: measured mean KLD (and Δnll) with only (l, kind) at candidate c; ref: the same
  // with the reference codec (q8_0) there.
  const size_t nk = opt.k_cands.size(), nv = opt.v_cands.size();
  std::vector<std::vector<double>> k_kld(n_layer, std::vector<double>(nk)), v_kld(n_layer, std::vector<double>(nv));
  std::vector<std::vector<double>> k_dnll = k_kld, v_dnll = v_kld;
  std::vector<double> k_ref(n_layer), v_ref(n_layer), k_ref_dnll(n_layer), v_ref_dnll(n_layer);
  const double t0 = NowSeconds();
  bool reused = false;
  if (!opt.reuse_path.empty()) {
    KVC_ASSIGN_OR_RETURN(KvConfigFile prev, ReadKvConfigFile(opt.reuse_path));
    const auto& s = prev.json.value("search", nlohmann::json::object());
    const auto& cand = prev.json.value("candidates", nlohmann::json::object());
    auto specs = [](const nlohmann::json& a) {
      std::vector<std::string> out;
      if (a.is_array()) for (const auto& x : a) if (x.is_object() && x.contains("spec") && x["spec"].is_string()) out.push_back(x["spec"]);
      return out;
    };
    if (prev.json["model"].value("id", std::string()) != model_id) {
      return InvalidArgument(fmt::format("--reuse '{}': made for another model ({})", opt.reuse_path,
                                         prev.json["model"].value("id", std::string("?"))));
    }
    // This run's candidates must all be in the file's lists (a subset is fine: their columns are
    // picked out), so one measurement serves several candidate sets.
    const std::vector<std::string> file_k = specs(cand.value("k", nlohmann::json()));
    const std::vector<std::string> file_v = specs(cand.value("v", nlohmann::json()));
    std::vector<size_t> k_col, v_col;
    for (int kind = 0; kind < 2; ++kind) {
      const auto& have = kind == 0 ? file_k : file_v;
      for (const auto& spec : kind == 0 ? opt.k_cands : opt.v_cands) {
        const auto it = std::find(have.begin(), have.end(), spec);
        if (it == have.end()) {
          return InvalidArgument(fmt::format("--reuse '{}': {} candidate '{}' was not measured there",
                                             opt.reuse_path, kind == 0 ? "K" : "V", spec));
        }
        (kind == 0 ? k_col : v_col).push_back(size_t(it - have.begin()));
      }
    }
    if (s.value("calib_text", std::string()) != opt.text_path || s.value("calib_ctx", int64_t(0)) != opt.n_ctx ||
        s.value("calib_chunks", int64_t(0)) != opt.chunks || s.value("sinks", -1) != opt.sinks ||
        s.value("reference", std::string()) != kBitsReference) {
      return InvalidArgument(fmt::format("--reuse '{}': other calibration text, -c, --chunks, sinks or "
                                         "reference than this run's", opt.reuse_path));
    }
    try {
      const auto& sens = prev.json.at("sensitivity");
      k_kld = sens.at("k_kld").get<std::vector<std::vector<double>>>();
      v_kld = sens.at("v_kld").get<std::vector<std::vector<double>>>();
      k_dnll = sens.at("k_dnll").get<std::vector<std::vector<double>>>();
      v_dnll = sens.at("v_dnll").get<std::vector<std::vector<double>>>();
      k_ref = sens.at("k_ref_kld").get<std::vector<double>>();
      v_ref = sens.at("v_ref_kld").get<std::vector<double>>();
      k_ref_dnll = sens.at("k_ref_dnll").get<std::vector<double>>();
      v_ref_dnll = sens.at("v_ref_dnll").get<std::vector<double>>();
    } catch (const std::exception& e) {
      return InvalidArgument(fmt::format("--reuse '{}': bad \"sensitivity\": {}", opt.reuse_path, e.what()));
    }
    KVC_RETURN_IF_ERROR(CheckShape(k_kld, n_layer, file_k.size(), "k_kld"));
    KVC_RETURN_IF_ERROR(CheckShape(v_kld, n_layer, file_v.size(), "v_kld"));
    KVC_RETURN_IF_ERROR(CheckShape(k_dnll, n_layer, file_k.size(), "k_dnll"));
    KVC_RETURN_IF_ERROR(CheckShape(v_dnll, n_layer, file_v.size(), "v_dnll"));
    auto pick = [](std::vector<std::vector<double>>* t, const std::vector<size_t>& cols) {
      for (auto& row : *t) {
        std::vector<double> r;
        for (size_t c : cols) r.push_back(row[c]);
        row = std::move(r);
      }
    };
    pick(&k_kld, k_col);
    pick(&k_dnll, k_col);
    pick(&v_kld, v_col);
    pick(&v_dnll, v_col);
    for (const auto* r : {&k_ref, &v_ref, &k_ref_dnll, &v_ref_dnll}) {
      if (int(r->size()) != n_layer) return InvalidArgument(fmt::format("--reuse '{}': reference rows are not {} long", opt.reuse_path, n_layer));
    }
    KVC_RETURN_IF_ERROR(scorer.Baseline());
    reused = true;
  } else {
    KVC_RETURN_IF_ERROR(scorer.Baseline());
    // Every candidate must build before the long loop starts.
    for (int kind = 0; kind < 2; ++kind) {
      for (const auto& spec : kind == 0 ? opt.k_cands : opt.v_cands) {
        auto probe = kv::KvCache::Create(shape, OneLayer(n_layer, 0, kind == 0, spec, opt.sinks));
        if (!probe.ok()) return InvalidArgument(fmt::format("{} candidate '{}': {}", kind == 0 ? "K" : "V", spec, probe.status().message()));
      }
    }
    const int64_t total = int64_t(n_layer) * int64_t(nk + nv);
    int64_t done = 0;
    for (int l = 0; l < n_layer; ++l) {
      for (int kind = 0; kind < 2; ++kind) {
        const auto& cands = kind == 0 ? opt.k_cands : opt.v_cands;
        bool have_ref = false;
        for (size_t c = 0; c < cands.size(); ++c) {
          KVC_ASSIGN_OR_RETURN(Measured r, scorer.Run(OneLayer(n_layer, l, kind == 0, cands[c], opt.sinks)));
          (kind == 0 ? k_kld : v_kld)[l][c] = r.kld;
          (kind == 0 ? k_dnll : v_dnll)[l][c] = r.dnll;
          if (cands[c] == kBitsReference) {
            (kind == 0 ? k_ref : v_ref)[l] = r.kld;
            (kind == 0 ? k_ref_dnll : v_ref_dnll)[l] = r.dnll;
            have_ref = true;
          }
          ++done;
        }
        if (!have_ref) {
          KVC_ASSIGN_OR_RETURN(Measured r, scorer.Run(OneLayer(n_layer, l, kind == 0, kBitsReference, opt.sinks)));
          (kind == 0 ? k_ref : v_ref)[l] = r.kld;
          (kind == 0 ? k_ref_dnll : v_ref_dnll)[l] = r.dnll;
        }
      }
      spdlog::info("calibrate bits: layer {}/{} measured ({} of {} runs, {:.0f} s)", l + 1, n_layer, done,
                   total, NowSeconds() - t0);
    }
  }
  // The loss the selection adds up: the excess over the reference codec in the same place. Any
  // perturbation of one layer (even f32 instead of f16) moves SmolLM2's next-token distribution by
  // a floor of ~0.001-0.005 nats that does not add up over layers (q8_0 in every layer: ~0.004);
  // the raw one-layer KLD would count that floor 60 times.
  p.k_loss = k_kld;
  p.v_loss = v_kld;
  for (int l = 0; l < n_layer; ++l) {
    for (size_t c = 0; c < nk; ++c) p.k_loss[l][c] = std::max(0.0, k_kld[l][c] - k_ref[l]);
    for (size_t c = 0; c < nv; ++c) p.v_loss[l][c] = std::max(0.0, v_kld[l][c] - v_ref[l]);
  }
  const double t_sens = NowSeconds() - t0;

  KVC_ASSIGN_OR_RETURN(BitsChoice ch, SelectBits(p));
  std::vector<std::string> k_sel(n_layer), v_sel(n_layer);
  for (int l = 0; l < n_layer; ++l) {
    k_sel[l] = opt.k_cands[ch.k[l]];
    v_sel[l] = opt.v_cands[ch.v[l]];
  }
  const std::string config = ConfigString(k_sel, v_sel, opt.sinks);
  auto rc = ParseRunConfig(config);
  if (!rc.ok()) return Status(rc.status().code(), "internal: the chosen configuration does not parse: " + rc.status().message());
  KVC_RETURN_IF_ERROR(FitLayerOverrides(&*rc, n_layer));
  // The all-in bits measured on the full shape: must equal the sum of the per-layer costs.
  KVC_ASSIGN_OR_RETURN(AllInBits ab, MeasureAllInBits(shape, rc->cache, int(opt.bits_ctx)));
  if (ab.bits > opt.budget + 1e-9) {
    return InvalidArgument(fmt::format("internal: chosen configuration measures {:.5f} bits/value all in, "
                                       "over the budget {} (per-layer sum {:.5f})", ab.bits, opt.budget, ch.cost));
  }
  // Joint measurements on the calibration chunks: the reference everywhere (the floor) and the
  // chosen configuration. Prediction = floor + Σ chosen excesses.
  kv::KvCacheConfig ref_cfg;
  ref_cfg.k_codec = ref_cfg.v_codec = kBitsReference;
  ref_cfg.sink_tokens = opt.sinks;
  KVC_ASSIGN_OR_RETURN(Measured floor, scorer.Run(ref_cfg));
  KVC_ASSIGN_OR_RETURN(Measured joint, scorer.Run(rc->cache));
  double pred_dnll = floor.dnll;
  for (int l = 0; l < n_layer; ++l) {
    pred_dnll += k_dnll[l][ch.k[l]] - k_ref_dnll[l] + v_dnll[l][ch.v[l]] - v_ref_dnll[l];
  }
  const double pred_kld = floor.kld + ch.loss;

  const std::string name = opt.name.empty() ? fmt::format("bits-{}", opt.budget) : opt.name;
  nlohmann::json j;
  j["format"] = "kvcrunch-kv-config";
  j["version"] = 1;
  j["name"] = name;
  j["config"] = config;
  j["model"] = {{"n_layer", shape.n_layer}, {"n_head_kv", shape.n_head_kv}, {"head_dim", shape.head_dim},
                {"head_dim_v", shape.DimV()}, {"id", model_id}, {"path", opt.model_path}};
  j["all_in_bits"] = ab.bits;
  j["all_in_ctx"] = opt.bits_ctx;
  char when[32] = "";
  const std::time_t now = std::time(nullptr);
  std::strftime(when, sizeof when, "%Y-%m-%dT%H:%M:%SZ", std::gmtime(&now));
  j["search"] = {
      {"method", "per-layer (K, V) codec pairs, dominated pairs pruned, multiple-choice knapsack by DP "
                 "(KVTuner-style, Li et al. ICML 2025)"},
      {"created_by", "kvcrunch calibrate --method bits"}, {"created_at", when},
      {"budget_bits", opt.budget}, {"bits_ctx", opt.bits_ctx}, {"sinks", opt.sinks},
      {"loss", "mean KL divergence vs the f16 cache per scored token (nats) with one layer's K or V at the "
               "candidate, minus the same with that layer's K or V at the reference codec; summed over layers"},
      {"reference", kBitsReference}, {"floor_kld", floor.kld}, {"floor_dnll", floor.dnll},
      {"calib_text", opt.text_path}, {"calib_ctx", opt.n_ctx}, {"calib_chunks", opt.chunks},
      {"calib_tokens_scored", scorer.n_scored()}, {"sensitivity_reused_from", reused ? opt.reuse_path : ""},
      {"sensitivity_seconds", t_sens}, {"grid", p.grid}, {"pairs_total", ch.pairs_total},
      {"pairs_kept", ch.pairs_kept}, {"predicted_bits", ch.cost},
      {"predicted_excess_kld", ch.loss}, {"predicted_kld", pred_kld}, {"joint_kld", joint.kld},
      {"predicted_dnll", pred_dnll}, {"joint_dnll", joint.dnll}};
  for (int kind = 0; kind < 2; ++kind) {
    const auto& cands = kind == 0 ? opt.k_cands : opt.v_cands;
    const auto& cost = kind == 0 ? p.k_cost : p.v_cost;
    nlohmann::json a = nlohmann::json::array();
    for (size_t c = 0; c < cands.size(); ++c) a.push_back({{"spec", cands[c]}, {"cost_bits", cost[c]}, {"layer_bits", cost[c] * n_layer * 2}});
    j["candidates"][kind == 0 ? "k" : "v"] = a;
  }
  j["sensitivity"] = {{"k_kld", k_kld}, {"v_kld", v_kld}, {"k_dnll", k_dnll}, {"v_dnll", v_dnll},
                      {"k_ref_kld", k_ref}, {"v_ref_kld", v_ref}, {"k_ref_dnll", k_ref_dnll},
                      {"v_ref_dnll", v_ref_dnll}};
  nlohmann::json alloc = nlohmann::json::array();
  std::string table = fmt::format("{:>5}  {:<34} {:>6} {:>10}  {:<24} {:>6} {:>10}\n", "layer", "K codec",
                                  "K b/v", "K +KLD", "V codec", "V b/v", "V +KLD");
  for (int l = 0; l < n_layer; ++l) {
    const double kb = p.k_cost[ch.k[l]] * n_layer * 2, vb = p.v_cost[ch.v[l]] * n_layer * 2;
    alloc.push_back({{"layer", l}, {"k", k_sel[l]}, {"v", v_sel[l]}, {"k_bits", kb}, {"v_bits", vb},
                     {"k_excess_kld", p.k_loss[l][ch.k[l]]}, {"v_excess_kld", p.v_loss[l][ch.v[l]]}});
    table += fmt::format("{:>5}  {:<34} {:>6.3f} {:>10.6f}  {:<24} {:>6.3f} {:>10.6f}\n", l, k_sel[l], kb,
                         p.k_loss[l][ch.k[l]], v_sel[l], vb, p.v_loss[l][ch.v[l]]);
  }
  j["allocation"] = alloc;
  if (summary) {
    *summary = table + fmt::format(
        "\n{}: {}\nall in at {} tokens: {:.4f} bits/value measured (per-layer sum {:.4f}, budget {})\n"
        "pairs kept after Pareto pruning: {} of {}\ncalibration: {} chunks x {} tokens of {} "
        "({} scored), sensitivities {} ({:.0f} s)\nKLD vs f16 on the calibration chunks: {} everywhere "
        "(floor) {:.5f}; chosen: additive prediction floor + Σ excess = {:.5f} + {:.5f} = {:.5f}, joint "
        "measurement {:.5f} (joint / predicted {:.2f}); mean Δnll predicted {:+.5f}, joint {:+.5f}\n",
        name, config, opt.bits_ctx, ab.bits, ch.cost, opt.budget, ch.pairs_kept, ch.pairs_total,
        opt.chunks, opt.n_ctx, opt.text_path, scorer.n_scored(), reused ? "reused from " + opt.reuse_path : "measured",
        t_sens, kBitsReference, floor.kld, floor.kld, ch.loss, pred_kld, joint.kld,
        pred_kld > 0 ? joint.kld / pred_kld : 0.0, pred_dnll, joint.dnll);
  }
  return j;
}

}  // namespace kvc
