// kvcrunch: run GGUF Llama-family models through a compressed, pluggable KV cache.
// Flag names follow llama.cpp where the concept exists.
#include <unistd.h>

#include <algorithm>
#include <filesystem>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <iostream>
#include <random>
#include <sstream>

#include <CLI/CLI.hpp>
#include <fmt/format.h>
#include <spdlog/sinks/stdout_color_sinks.h>
#include <spdlog/spdlog.h>

#include "cpu/targets.h"
#include "hwy/targets.h"
#include "cpu/ops.h"
#include "calibrate.h"
#include "calibrate_bits.h"
#include "kv_config_file.h"
#include "engine/engine.h"
#include "eval.h"
#include "kvquant_calib.h"
#include "kv/codec.h"
#include "kv/policy.h"
#include "kv/transform.h"
#include "model/model.h"
#include "batched_bench.h"
#include "retrieval.h"
#include "runner.h"
#include "server.h"
#include "store/session_file.h"

using namespace kvc;

namespace {

struct Common {
  std::string model;
  int threads = 2;
  int64_t ctx = 0;  // 0 = command default
  int batch = 512;
  std::string ctk = "f16", ctv = "f16", kt, vt, evict, pos, lowrank;  // pos "": policy default
  std::string preset;  // --kv-preset NAME: a complete KV configuration (runner.h KvPresets)
  std::string kv_config;  // --kv-config FILE: a complete KV configuration from a file (kv_config_file.h)
  int sinks = 0;
  std::string sink_codec = "f16";
  std::string kv_smooth;  // --kv-smooth FILE: key smoothing folded into W_q / W_k at load
  double kv_smooth_alpha = 0.5;
  std::string kv_smooth_stat = "max";
};

void AddModelFlags(CLI::App* app, Common& c) {
  app->add_option("-m,--model", c.model, "GGUF model path (default: models/SmolLM2-135M-Instruct.Q4_1.gguf)");
  app->add_option("-t,--threads", c.threads, "threads")->check(CLI::Range(1, 256));
  app->add_option("--kv-smooth", c.kv_smooth,
                  "smoothing FILE (`calibrate --method smooth`): fold the per-channel key scales into "
                  "W_q / W_k at load (exact in attention up to the weights' fp16 scale rounding, no "
                  "per-token cost, works with every K codec)");
  app->add_option("--kv-smooth-alpha", c.kv_smooth_alpha, "α of --kv-smooth (default 0.5)")
      ->check(CLI::Range(0.0, 1.0));
  app->add_option("--kv-smooth-stat", c.kv_smooth_stat, "statistic of --kv-smooth: max (default) | rms")
      ->check(CLI::IsMember({"max", "rms"}));
}

void AddKvFlags(CLI::App* app, Common& c) {
  app->add_option("-c,--ctx-size", c.ctx, "context size (tokens)")->check(CLI::Range(int64_t(4), int64_t(1) << 24));
  app->add_option("-b,--batch-size", c.batch, "micro-batch size for prompt processing")->check(CLI::Range(1, 1 << 16));
  app->add_option("--cache-type-k", c.ctk, "K codec spec, also -ctk (see `kvcrunch info`)");
  app->add_option("--cache-type-v", c.ctv, "V codec spec, also -ctv");
  app->add_option("--kv-transform-k", c.kt, "K transform spec (e.g. hadamard)");
  app->add_option("--kv-transform-v", c.vt, "V transform spec");
  app->add_option("--kv-lowrank", c.lowrank, "calibration FILE: Palu low-rank K and V (= lowrank:file=FILE for K and V)");
  app->add_option("--kv-evict", c.evict, "eviction policy spec (e.g. streaming:sink=4,window=1020)");
  auto* sinks = app->add_option("--kv-sinks", c.sinks, "first N tokens kept in their own segment")
                    ->check(CLI::Range(0, 1 << 20));
  app->add_option("--kv-sink-codec", c.sink_codec, "codec of the sink segment (needs --kv-sinks)")
      ->needs(sinks);
  auto* pos = app->add_option("--kv-positions", c.pos, "positions after eviction: original | in-cache | rerotate (default: original, or the policy's own: streaming in-cache)");
  // A preset is the whole KV configuration: the flags it would set cannot be combined with it.
  auto* preset = app->add_option("--kv-preset", c.preset, "a complete KV configuration by name: " + KvPresetNames() + " (`kvcrunch info` shows what each expands to)");
  auto* kv_config = app->add_option("--kv-config", c.kv_config, "a complete KV configuration from a file made by `kvcrunch calibrate --method bits` (`kvcrunch info --kv-config FILE` shows it)");
  for (const char* name : {"--cache-type-k", "--cache-type-v", "--kv-transform-k", "--kv-transform-v", "--kv-lowrank", "--kv-evict", "--kv-sinks", "--kv-sink-codec"}) {
    if (auto* o = app->get_option_no_throw(name)) {
      preset->excludes(o);
      kv_config->excludes(o);
    }
  }
  preset->excludes(pos);
  kv_config->excludes(pos);
  kv_config->excludes(preset);
}

// Eviction acts between batches: the tokens of one batch attend to each other (and to the cache)
// before the policy runs. With whole-chunk batches, perplexity rows of eviction configurations
// therefore measure almost the full cache. Say so instead of printing a misleading number.
void WarnEvictionBatch(const std::vector<KvRunConfig>& configs, int64_t n_batch, int64_t n_ctx) {
  for (const auto& rc : configs) {
    if (!rc.evict.empty() && n_batch > 16) {
      spdlog::warn("eviction ({}) runs between batches of -b {} tokens: tokens inside one batch attend "
                   "uncompressed, so with -b >= -c ({}) its perplexity is close to the full cache's; "
                   "use -b 16 for step policies (streaming, h2o, tova) or `retrieval --task "
                   "streaming|prefix` for protocol-correct numbers (docs/eviction.md)",
                   rc.evict, n_batch, n_ctx);
      return;
    }
  }
}

// KVQuant keeps the first token in fp16 (KVQuant §3.5, "attention sink"); our codec leaves that
// to the cache's sink segment. Without it kvquant4 measured +29.7 % instead of +2.0 % at -c 4096.
void WarnKvQuantWithoutSink(const std::vector<KvRunConfig>& configs) {
  for (const auto& rc : configs) {
    bool kvq = kv::ExpandAlias(rc.cache.k_codec).rfind("kvquant", 0) == 0;
    for (const auto& l : rc.cache.k_codec_layer) kvq = kvq || kv::ExpandAlias(l).rfind("kvquant", 0) == 0;
    if (kvq && rc.cache.sink_tokens == 0) {
      spdlog::warn("{}: kvquant keys without an fp16 first token; KVQuant keeps it in fp16 "
                   "(§3.5): add --kv-sinks 1 (eval: sinks=1) — kvquant4 at -c 4096 is +29.7 % "
                   "without it, +2.0 % with it (docs/results.md)", rc.Label());
      return;
    }
  }
}

int Fail(const Status& s) {
  std::fprintf(stderr, "kvcrunch: error: %s\n", s.ToString().c_str());
  return 1;
}

StatusOr<std::unique_ptr<Model>> LoadModel(Common& c) {
  if (c.model.empty()) c.model = DefaultModelPath();
  cpu::SetNumThreads(c.threads);
  // Every x86-64 CPU runs kvcrunch: without SSSE3 the kernels take the portable C++ path.
  if (const std::string w = cpu::ApplySimdLimitFromEnv(); !w.empty()) spdlog::warn("{}", w);
  if (const std::string t = cpu::ActiveTargetName(); t == "SCALAR" || t == "EMU128") {
    spdlog::warn("the SIMD kernels run their portable {} path (no SSSE3/SSE4/AVX2/AVX-512 on this "
                 "CPU, or KVC_SIMD): several times slower (see README, 'Supported CPUs')", t);
  }
  ModelLoadOptions opt;
  opt.kv_smooth = c.kv_smooth;
  opt.kv_smooth_alpha = c.kv_smooth_alpha;
  opt.kv_smooth_stat = c.kv_smooth_stat;
  return Model::Load(c.model, opt);
}

StatusOr<KvRunConfig> RunConfigFromFlags(const Common& c) {
  if (!c.preset.empty()) return ParseRunConfig("preset=" + c.preset);
  if (!c.kv_config.empty()) return LoadRunConfigFile(c.kv_config);
  KvRunConfig r;
  r.cache.k_codec = c.ctk;
  r.cache.v_codec = c.ctv;
  r.cache.k_transform = c.kt;
  r.cache.v_transform = c.vt;
  if (!c.lowrank.empty()) {
    if (!c.kt.empty() || !c.vt.empty()) return InvalidArgument("--kv-lowrank sets both transforms; drop --kv-transform-k/v");
    r.cache.k_transform = r.cache.v_transform = "lowrank:file=" + c.lowrank;
  }
  r.cache.sink_tokens = c.sinks;
  r.cache.sink_codec = c.sink_codec;
  if (!c.pos.empty()) {
    KVC_ASSIGN_OR_RETURN(r.cache.position_mode, kv::ParsePositionMode(c.pos));
    r.cache.position_mode_set = true;
  }
  r.evict = c.evict;
  return r;
}

StatusOr<std::vector<int32_t>> ParseIds(const std::string& s, int n_vocab) {
  std::vector<int32_t> ids;
  std::stringstream ss(s);
  std::string tok;
  while (std::getline(ss, tok, ',')) {
    char* end = nullptr;
    const long v = std::strtol(tok.c_str(), &end, 10);
    if (tok.empty() || *end || v < 0 || v >= n_vocab) {
      return InvalidArgument(fmt::format("bad token id '{}' (expected integers in [0, {}))", tok, n_vocab));
    }
    ids.push_back(int32_t(v));
  }
  if (ids.empty()) return InvalidArgument("--tokens is empty");
  return ids;
}

int CmdInfo(Common& c) {
  auto m = LoadModel(c);
  if (!m.ok()) return Fail(m.status());
  const ModelConfig& mc = (*m)->config();
  fmt::print("model        {}\n", c.model);
  fmt::print("name         {}\n", mc.name);
  fmt::print("architecture {}\n", mc.arch);
  fmt::print("n_layer      {}\nn_embd       {}\nn_head       {}\nn_head_kv    {}\nhead_dim     {}\n",
             mc.n_layer, mc.n_embd, mc.n_head, mc.n_head_kv, mc.head_dim);
  fmt::print("n_ff         {}\nn_vocab      {}\nn_ctx_train  {}\nrope         theta {} n_rot {} {}\n",
             mc.n_ff, mc.n_vocab, mc.n_ctx_train, mc.rope.theta, mc.rope.n_rot,
             mc.rope.neox ? "neox" : "normal");
  fmt::print("tied output  {}\nweights      {:.1f} MiB (file {:.1f} MiB)\n", mc.tied_output,
             (*m)->weight_bytes() / 1048576.0, (*m)->file().file_size() / 1048576.0);
  std::string runnable;
  for (int64_t t : cpu::RunnableTargets()) runnable += std::string(runnable.empty() ? "" : " ") + hwy::TargetName(t);
  fmt::print("SIMD         {} (runnable here: {})\n", cpu::ActiveTargetName(), runnable);
  const double f16_tok = mc.KvBytesPerToken(16, 16);
  const double mha_tok = f16_tok * mc.n_head / mc.n_head_kv;
  if ((*m)->mla()) {
    fmt::print("\n{}\n", DescribeMlaKv((*m)->mla()->cfg, mc.n_layer, 2));  // f16
  } else {
    fmt::print("\nKV bytes per token = 2 · n_layer · n_head_kv · head_dim · bytes = 2·{}·{}·{}·2 = {:.0f} B at f16\n",
               mc.n_layer, mc.n_head_kv, mc.head_dim, f16_tok);
    fmt::print("with full multi-head attention (n_head_kv = n_head = {}): {:.0f} B/token; GQA saves {:.1f}x\n\n",
               mc.n_head, mha_tok, mha_tok / f16_tok);
  }
  fmt::print("{:<12} {:>10} {:>14} {:>14} {:>12}  {}\n", "codec", "bits/value", "bytes/token", "bytes @ n_ctx", "measured", "summary");
  kv::KvShape shape = (*m)->kv_shape();
  for (const auto& info : kv::RegisteredCodecs()) {
    kv::KvCacheConfig cfg;
    cfg.k_codec = cfg.v_codec = info.name;
    auto cache = kv::KvCache::Create(shape, cfg);
    std::string label = info.name;
    if (!cache.ok()) {
      // Key-only codecs (QJL): show them with f16 values, labelled so.
      cfg.v_codec = "f16";
      auto k_only = kv::KvCache::Create(shape, cfg);
      if (!k_only.ok()) {
        fmt::print("{:<12} unavailable: {}\n", info.name, cache.status().message());
        continue;
      }
      cache = std::move(k_only);
      label = info.name + "+f16V";
    }
    // Measure: write 256 random tokens per layer and read the allocation back.
    const int n = 256;
    std::mt19937 rng(1);
    std::normal_distribution<float> nd;
    std::vector<float> k(size_t(n) * shape.n_head_kv * shape.head_dim), v(k.size());
    for (auto& x : k) x = nd(rng);
    for (auto& x : v) x = nd(rng);
    std::vector<int64_t> seq(n);
    for (int i = 0; i < n; ++i) seq[i] = i;
    bool ok = true;
    for (int l = 0; l < shape.n_layer && ok; ++l) ok = (*cache)->Write(l, seq.data(), n, k.data(), v.data()).ok();
    (*cache)->Flush();  // window codecs encode after attention; no attention runs here
    const double bpv = ((*cache)->KBitsPerValue() + (*cache)->VBitsPerValue()) / 2;
    const double per_tok = mc.KvBytesPerToken((*cache)->KBitsPerValue(), (*cache)->VBitsPerValue());
    const double measured = ok ? double((*cache)->Memory().KvBytes()) / n : 0;
    fmt::print("{:<12} {:>10.3f} {:>14.1f} {:>14.0f} {:>12.1f}  {}\n", label, bpv, per_tok,
               per_tok * mc.n_ctx_train, measured, info.summary);
  }
  // Presets: what each expands to and its bits per value, measured the way eval counts them:
  // allocated KV bytes after 4,096 tokens (sinks, fp16 windows/tails, scales, norms included)
  // relative to f16's 16 bits.
  fmt::print("\nKV presets (--kv-preset NAME, or preset=NAME in eval / retrieval configs); bits/value "
             "all in at 4,096 tokens (random vectors; body codecs + sinks + fp16 tails):\n");
  for (const auto& p : KvPresets()) {
    auto rc = ParseRunConfig("preset=" + p.name);
    Status st = rc.ok() ? FitLayerOverrides(&*rc, shape) : rc.status();
    std::string bits = "n/a";
    if (st.ok() && rc->evict.empty() && rc->cache.k_transform.find("file=") == std::string::npos) {
      auto ab = MeasureAllInBits(shape, rc->cache, 4096);
      kv::KvCacheConfig body = rc->cache;
      body.predict.clear();  // residuals in the same codecs: same bytes
      auto cache = kv::KvCache::Create(shape, body);
      if (ab.ok() && cache.ok()) {
        bits = fmt::format("{:.3f} (K body {:.3f}, V body {:.3f})", ab->bits, (*cache)->KBitsPerValue(),
                           (*cache)->VBitsPerValue());
        if (rc->cache.predict == "auto") {
          bits += fmt::format("; predictor file {} (made on first use)", PredictCalibrationPath(c.model));
        }
      } else {
        bits = "unavailable: " + std::string(ab.ok() ? cache.status().message() : ab.status().message());
      }
    }
    fmt::print("  {:<7} = \"{}\"\n          class <= {:.2f} b/v; bits/value here: {}\n          {}\n", p.name,
               p.config, p.bits_limit, bits, p.summary);
  }
  if (!c.kv_config.empty()) {
    auto rc = LoadRunConfigFile(c.kv_config);
    Status st = rc.ok() ? FitLayerOverrides(&*rc, shape) : rc.status();
    if (!st.ok()) return Fail(st);
    auto f = ReadKvConfigFile(c.kv_config);
    auto ab = MeasureAllInBits(shape, rc->cache, int(f->all_in_ctx));
    if (!ab.ok()) return Fail(ab.status());
    KvRunConfig unnamed = *rc;
    unnamed.name.clear();  // the derived label lists every per-layer codec
    fmt::print("\nKV config file {} ({}):\n  {}\n  expands to: {}\n  bits/value all in at {} tokens: "
               "{:.4f} measured here ({:.4f} recorded in the file)\n",
               c.kv_config, f->name, f->config, unnamed.Label(), f->all_in_ctx, ab->bits, f->all_in_bits);
    if (f->json.contains("search")) fmt::print("  search: {}\n", f->json["search"].dump());
  }
  fmt::print("\naliases:");
  for (const auto& [a, s] : kv::CodecAliases()) fmt::print(" {}={}", a, s);
  fmt::print("\ntransforms:");
  for (const auto& t : kv::RegisteredTransforms()) fmt::print(" {}", t.name);
  fmt::print("\neviction policies:");
  for (const auto& p : kv::RegisteredPolicies()) fmt::print(" {}", p.name);
  fmt::print("\n('measured' = allocated KV bytes per token after writing 256 tokens to every layer)\n");
  return 0;
}

int CmdGenerate(Common& c, const std::string& prompt, const std::string& file, const std::string& ids,
                bool chat, int n_predict, float temp, float top_p, uint32_t seed, bool print_ids,
                const std::string& session_path) {
  auto m = LoadModel(c);
  if (!m.ok()) return Fail(m.status());
  const Model& model = **m;
  std::vector<int32_t> toks;
  if (!ids.empty()) {
    auto r = ParseIds(ids, model.config().n_vocab);
    if (!r.ok()) return Fail(r.status());
    toks = *r;
  } else {
    std::string text = prompt;
    if (!file.empty()) {
      auto t = ReadTextFile(file);
      if (!t.ok()) return Fail(t.status());
      text = *t;
    }
    if (text.empty() && session_path.empty()) {
      return Fail(InvalidArgument("empty prompt: give -p TEXT, -f FILE or --tokens"));
    }
    if (chat && !text.empty()) {
      auto t = model.tokenizer().ApplyChatTemplate({{"user", text}}, true);
      if (!t.ok()) return Fail(t.status());
      text = *t;
    }
    if (!text.empty()) {
      auto r = model.tokenizer().Encode(text, false, /*parse_special=*/chat);
      if (!r.ok()) return Fail(r.status());
      toks = *r;
      if (toks.empty()) return Fail(InvalidArgument("the prompt tokenizes to nothing"));
    }
  }
  if (n_predict < 0) return Fail(InvalidArgument("-n must be >= 0 (number of tokens to generate; generation also stops at EOS)"));
  if (!(temp >= 0) || !std::isfinite(temp) || !(top_p > 0 && top_p <= 1)) {
    return Fail(InvalidArgument("--temp must be >= 0 and --top-p in (0, 1]"));
  }
  auto rc = RunConfigFromFlags(c);
  if (!rc.ok()) return Fail(rc.status());
  if (auto kq = EnsureKvQuantCalibration(**m, c.model, {*rc}); !kq.ok()) return Fail(kq.status());
  if (Status fs = FitLayerOverrides(&*rc, model.kv_shape()); !fs.ok()) return Fail(fs);
  if (Status cs = CheckRunConfigCalibration(*rc, model); !cs.ok()) return Fail(cs);
  Session::Options so;
  so.n_ctx = c.ctx > 0 ? c.ctx : std::min<int64_t>(model.config().n_ctx_train, 4096);
  so.n_batch = c.batch;
  if (rc->evict.empty() && int64_t(toks.size()) > so.n_ctx) {
    return Fail(OutOfRange(fmt::format("the prompt has {} tokens, more than the context size {} (raise -c)",
                                       toks.size(), so.n_ctx)));
  }
  auto s = Session::Create(model, rc->cache, rc->evict, so);
  if (!s.ok()) return Fail(s.status());
  // --session FILE: continue the saved conversation (its pending token, then this prompt), and
  // save the state again at the end. A missing file starts a new session.
  store::SessionTokens saved;
  if (!session_path.empty()) {
    // Checked before generating: a directory read as a record said "KV record of 0 bytes ...
    // truncated", and a missing parent directory failed only at the save, after the whole run.
    namespace fs = std::filesystem;
    std::error_code ec;
    if (fs::is_directory(session_path, ec)) {
      return Fail(InvalidArgument(fmt::format("--session {}: is a directory (give a file path)", session_path)));
    }
    const fs::path parent = fs::path(session_path).parent_path();
    if (!parent.empty() && !fs::is_directory(parent, ec)) {
      return Fail(InvalidArgument(fmt::format("--session {}: {} is not a directory", session_path,
                                              parent.string())));
    }
  }
  if (!session_path.empty() && std::filesystem::exists(session_path)) {
    auto l = store::LoadSession(s->get(), session_path);
    if (!l.ok()) return Fail(l.status());
    saved = std::move(*l);
    std::fprintf(stderr, "session: restored %zu tokens (%zu pending) from %s\n", saved.tokens.size(),
                 saved.pending.size(), session_path.c_str());
    toks.insert(toks.begin(), saved.pending.begin(), saved.pending.end());
  }
  if (toks.empty()) {
    return Fail(InvalidArgument("nothing to evaluate: the session has no pending token; give a prompt"));
  }
  if (rc->evict.empty() && (*s)->n_past() + int64_t(toks.size()) > so.n_ctx) {
    return Fail(OutOfRange(fmt::format("the session ({} tokens) + the prompt ({}) exceed the context "
                                       "size {} (raise -c)",
                                       (*s)->n_past(), toks.size(), so.n_ctx)));
  }
  std::vector<int32_t> consumed = saved.tokens;  // every token the cache consumed, in order
  std::vector<float> logits;
  const double t0 = NowSeconds();
  Status st = (*s)->Eval(toks, false, &logits);
  consumed.insert(consumed.end(), toks.begin(), toks.end());
  if (!st.ok()) return Fail(st);
  const double t1 = NowSeconds();
  std::mt19937 rng(seed);
  std::vector<int32_t> out;
  for (int i = 0; i < n_predict; ++i) {
    const int32_t next = SampleGenerateToken(logits, temp, top_p, rng);
    out.push_back(next);
    if (model.tokenizer().IsEog(next)) break;
    if (!print_ids) {
      std::fputs(model.tokenizer().TokenToPiece(next).c_str(), stdout);
      std::fflush(stdout);
    }
    if (!(*s)->policy() && (*s)->n_past() + 1 > so.n_ctx) {
      std::fprintf(stderr, "\n[context full at %lld tokens]\n", (long long)(*s)->n_past());
      break;
    }
    st = (*s)->Eval({next}, false, &logits);
    if (!st.ok()) return Fail(st);
    consumed.push_back(next);
  }
  const double t2 = NowSeconds();
  if (!session_path.empty()) {
    store::SessionTokens t;
    t.tokens = consumed;
    // The last sampled token was not fed when generation stopped at EOS or the context limit.
    const size_t fed_out = consumed.size() - saved.tokens.size() - toks.size();
    if (fed_out < out.size()) t.pending.assign(out.begin() + fed_out, out.end());
    if (Status ss = store::SaveSession(**s, t, session_path); !ss.ok()) return Fail(ss);
    std::fprintf(stderr, "session: saved %zu tokens (%zu pending) to %s\n", t.tokens.size(),
                 t.pending.size(), session_path.c_str());
  }
  if (print_ids) {
    std::string line;
    for (size_t i = 0; i < out.size(); ++i) line += (i ? "," : "") + std::to_string(out[i]);
    std::printf("%s\n", line.c_str());
  } else {
    std::printf("\n");
    std::fflush(stdout);
  }
  const auto mem = (*s)->cache().Memory();
  std::fprintf(stderr, "prompt %zu tokens %.1f t/s | generated %zu tokens %.1f t/s | KV %zu bytes (%s)\n",
               toks.size(), toks.size() / (t1 - t0), out.size(),
               out.size() > 1 ? (out.size() - 1) / (t2 - t1) : 0.0, mem.KvBytes(),
               (*s)->cache().Describe().c_str());
  return 0;
}

int CmdLogits(Common& c, const std::string& ids, const std::string& out_path) {
  auto m = LoadModel(c);
  if (!m.ok()) return Fail(m.status());
  auto toks = ParseIds(ids, (*m)->config().n_vocab);
  if (!toks.ok()) return Fail(toks.status());
  auto rc = RunConfigFromFlags(c);
  if (!rc.ok()) return Fail(rc.status());
  if (Status fs = FitLayerOverrides(&*rc, (*m)->kv_shape()); !fs.ok()) return Fail(fs);
  if (Status cs = CheckRunConfigCalibration(*rc, **m); !cs.ok()) return Fail(cs);
  if (auto kq = EnsureKvQuantCalibration(**m, c.model, {*rc}); !kq.ok()) return Fail(kq.status());
  Session::Options so;
  so.n_ctx = c.ctx > 0 ? c.ctx : int64_t(toks->size());
  so.n_batch = c.batch;
  auto s = Session::Create(**m, rc->cache, rc->evict, so);
  if (!s.ok()) return Fail(s.status());
  std::vector<float> logits;
  Status st = (*s)->Eval(*toks, true, &logits);
  if (!st.ok()) return Fail(st);
  std::ofstream f(out_path, std::ios::binary);
  if (!f) return Fail(InvalidArgument("cannot write " + out_path));
  f.write(reinterpret_cast<const char*>(logits.data()), std::streamsize(logits.size() * sizeof(float)));
  return f ? 0 : Fail(Internal("write failed: " + out_path));
}

int CmdPerplexity(Common& c, const std::string& file, int64_t chunks, bool json) {
  auto m = LoadModel(c);
  if (!m.ok()) return Fail(m.status());
  const std::string path = file.empty() ? DefaultTextPath() : file;
  auto text = ReadTextFile(path);
  if (!text.ok()) return Fail(text.status());
  auto toks = TokenizeText(**m, *text);
  if (!toks.ok()) return Fail(toks.status());
  auto rc = RunConfigFromFlags(c);
  if (!rc.ok()) return Fail(rc.status());
  if (auto kq = EnsureKvQuantCalibration(**m, c.model, {*rc}); !kq.ok()) return Fail(kq.status());
  if (Status fs = FitLayerOverrides(&*rc, (*m)->kv_shape()); !fs.ok()) return Fail(fs);
  if (Status cs = CheckRunConfigCalibration(*rc, **m); !cs.ok()) return Fail(cs);
  const int64_t n_ctx = c.ctx > 0 ? c.ctx : 512;
  WarnEvictionBatch({*rc}, std::min<int64_t>(c.batch, n_ctx), n_ctx);
  WarnKvQuantWithoutSink({*rc});
  if (n_ctx < 4) return Fail(InvalidArgument("-c must be at least 4"));
  int64_t n_chunks = int64_t(toks->size()) / n_ctx;
  if (chunks > 0) n_chunks = std::min(n_chunks, chunks);
  if (n_chunks < 1) {
    return Fail(InvalidArgument(fmt::format("the text has {} tokens, fewer than one chunk of {} (lower -c)",
                                            toks->size(), n_ctx)));
  }
  if (n_ctx > (*m)->config().n_ctx_train) {
    spdlog::warn("-c {} exceeds the trained context {}", n_ctx, (*m)->config().n_ctx_train);
  }
  Session::Options so;
  so.n_ctx = n_ctx;
  so.n_batch = c.batch;
  auto s = Session::Create(**m, rc->cache, rc->evict, so);
  if (!s.ok()) return Fail(s.status());
  double nll = 0;
  int64_t n = 0;
  size_t kv_bytes = 0, tail_bytes = 0;
  Progress prog("perplexity", n_chunks);
  const double t0 = NowSeconds();
  ChunkScores sc;
  for (int64_t ch = 0; ch < n_chunks; ++ch) {
    Status st = ScoreChunk(**s, toks->data() + ch * n_ctx, n_ctx, false, &sc);
    if (!st.ok()) return Fail(st);
    for (float x : sc.nll) nll += x;
    n += int64_t(sc.nll.size());
    const auto mem = (*s)->cache().Memory();
    kv_bytes = std::max(kv_bytes, mem.KvBytes());
    tail_bytes = std::max(tail_bytes, mem.TailBytes());
    prog.Step(1, fmt::format("ppl {:.4f}", std::exp(nll / n)));
    if (!json && !isatty(2)) std::fprintf(stderr, "[%lld] %.4f\n", (long long)ch + 1, std::exp(nll / n));
  }
  const double dt = NowSeconds() - t0;
  const double ppl = std::exp(nll / n);
  const auto& cache = (*s)->cache();
  if (json) {
    nlohmann::json j;
    j["model"] = c.model;
    j["file"] = path;
    j["n_ctx"] = n_ctx;
    j["n_chunks"] = n_chunks;
    j["ppl"] = ppl;
    j["n_tokens"] = n;
    j["kv_bytes"] = kv_bytes;
    j["kv_residual_bytes"] = tail_bytes;
    j["kv_bits_per_value"] = (cache.KBitsPerValue() + cache.VBitsPerValue()) / 2;
    j["k_bits_per_value"] = cache.KBitsPerValue();
    j["v_bits_per_value"] = cache.VBitsPerValue();
    j["kv_bytes_per_token_descriptor"] = (*m)->config().KvBytesPerToken(cache.KBitsPerValue(), cache.VBitsPerValue());
    j["tokens_per_second"] = double(n_chunks * n_ctx) / dt;
    j["cache"] = cache.Describe();
    j["peak_rss_bytes"] = PeakRssBytes();
    std::printf("%s\n", j.dump(2).c_str());
  } else {
    std::printf("%s\nppl = %.4f over %lld scored tokens (%lld chunks of %lld), KV %zu bytes, %.1f t/s\n",
                cache.Describe().c_str(), ppl, (long long)n, (long long)n_chunks, (long long)n_ctx,
                kv_bytes, double(n_chunks * n_ctx) / dt);
  }
  return 0;
}

int CmdCalibrateBits(Common& c, std::string file, const std::string& out_path, BitsCalibOptions opt,
                     const std::string& candidates) {
  if (!(opt.budget > 0) || !std::isfinite(opt.budget)) {
    return Fail(InvalidArgument("calibrate --method bits needs --budget B: all-in bits per value at "
                                "--bits-ctx tokens, > 0 (e.g. 3.25)"));
  }
  opt.k_cands = DefaultBitsCandidates(true);
  opt.v_cands = DefaultBitsCandidates(false);
  if (!candidates.empty()) {
    if (Status st = ParseBitsCandidates(candidates, &opt.k_cands, &opt.v_cands); !st.ok()) return Fail(st);
  }
  if (std::error_code ec; std::filesystem::is_directory(out_path, ec)) {
    return Fail(InvalidArgument(fmt::format("-o '{}' is a directory; give a file path", out_path)));
  }
  if (file.empty()) file = DefaultBitsCalibText();
  if (file.empty()) return Fail(NotFound("no --calib-text given and the PG-19 books are not under ../shared/data/pg19"));
  auto m = LoadModel(c);
  if (!m.ok()) return Fail(m.status());
  auto text = ReadTextFile(file);
  if (!text.ok()) return Fail(text.status());
  auto toks = TokenizeText(**m, *text);
  if (!toks.ok()) return Fail(toks.status());
  opt.n_ctx = c.ctx > 0 ? c.ctx : 512;
  opt.n_batch = c.batch;
  opt.text_path = file;
  opt.model_path = c.model;
  std::string summary;
  auto j = CalibrateBits(**m, *toks, opt, &summary);
  if (!j.ok()) return Fail(j.status());
  if (Status st = WriteKvConfigFile(out_path, *j); !st.ok()) return Fail(st);
  std::printf("%s\nwrote %s\nuse: --kv-config %s  or  eval --config 'config=%s'\n", summary.c_str(),
              out_path.c_str(), out_path.c_str(), out_path.c_str());
  return 0;
}

int CmdCalibrate(Common& c, const std::string& file, const std::string& out_path, int64_t max_tokens) {
  auto m = LoadModel(c);
  if (!m.ok()) return Fail(m.status());
  if (!c.kv_smooth.empty()) {
    return Fail(InvalidArgument("calibrate --kv-smooth: calibration statistics are taken on the plain "
                                "model (a file made on a smoothed model would carry the same model_id "
                                "but describe rescaled keys); drop --kv-smooth"));
  }
  if (file.empty()) return Fail(InvalidArgument("calibrate needs -f TEXT (use text disjoint from the evaluation text, e.g. a PG-19 book)"));
  // Refuse an output path that cannot be written before the (minutes-long) calibration runs.
  if (std::error_code ec; std::filesystem::is_directory(out_path, ec)) {
    return Fail(InvalidArgument(fmt::format("-o '{}' is a directory; give a file path", out_path)));
  }
  auto text = ReadTextFile(file);
  if (!text.ok()) return Fail(text.status());
  auto toks = TokenizeText(**m, *text);
  if (!toks.ok()) return Fail(toks.status());
  CalibrateOptions opt;
  opt.n_ctx = c.ctx > 0 ? c.ctx : 512;
  opt.max_tokens = max_tokens;
  opt.spec = c.lowrank.empty() ? "palu:ratio=0.5" : c.lowrank;
  opt.source = file;
  const double t0 = NowSeconds();
  auto f = Calibrate(**m, *toks, opt);
  if (!f.ok()) return Fail(f.status());
  Status st = kv::WriteCalibrationFile(out_path, *f);
  if (!st.ok()) return Fail(st);
  if (f->MetaOr("method", "") == "predict") {
    std::printf("%s", f->MetaOr("report", "").c_str());
    std::printf("wrote %s: %s tokens of %s, %.1f s\nuse: eval --config 'k=turbo3 v=turbo3 sinks=1 predict=%s'\n",
                out_path.c_str(), f->MetaOr("n_tokens", "?").c_str(), file.c_str(), NowSeconds() - t0,
                out_path.c_str());
    return 0;
  }
  if (f->MetaOr("method", "") == "smooth") {
    std::printf("%s", DescribeSmooth(*f).c_str());
    std::printf("wrote %s: %s tokens of %s, %.1f s\nuse: --kv-transform-k smooth:file=%s  or  eval --config 'k=turbo3 v=turbo3 kt=smooth:file=%s'\n",
                out_path.c_str(), f->MetaOr("n_tokens", "?").c_str(), file.c_str(), NowSeconds() - t0,
                out_path.c_str(), out_path.c_str());
    return 0;
  }
  std::printf("%s", DescribePaluRanks(*f, std::atof(f->MetaOr("ratio", "0.5").c_str()), f->MetaOr("alloc", "uniform")).c_str());
  std::printf("wrote %s: %s tokens of %s, %.1f s\nuse: --kv-lowrank %s  or  eval --config 'kt=lowrank:file=%s vt=lowrank:file=%s'  or  kt=think:file=%s,ratio=0.4\n",
              out_path.c_str(), f->MetaOr("n_tokens", "?").c_str(), file.c_str(), NowSeconds() - t0,
              out_path.c_str(), out_path.c_str(), out_path.c_str(), out_path.c_str());
  return 0;
}

int CmdEval(Common& c, const std::string& file, int64_t chunks, const std::vector<std::string>& cfgs,
            bool json, bool csv, const std::string& report, int decode_tokens) {
  if (!report.empty()) {  // fail before the run, not after it
    std::error_code ec;
    std::filesystem::create_directories(report, ec);
    if (ec || !std::filesystem::is_directory(report)) {
      return Fail(InvalidArgument(fmt::format("cannot create --report directory '{}'{}", report,
                                              ec ? ": " + ec.message() : "")));
    }
  }
  auto m = LoadModel(c);
  if (!m.ok()) return Fail(m.status());
  EvalOptions opt;
  opt.text_path = file.empty() ? DefaultTextPath() : file;
  auto text = ReadTextFile(opt.text_path);
  if (!text.ok()) return Fail(text.status());
  auto toks = TokenizeText(**m, *text);
  if (!toks.ok()) return Fail(toks.status());
  opt.ppl.n_ctx = c.ctx > 0 ? c.ctx : 512;
  opt.ppl.n_batch = c.batch;
  opt.ppl.max_chunks = chunks;
  opt.decode_tokens = decode_tokens;
  std::vector<KvRunConfig> configs;
  for (const auto& s : cfgs) {
    auto r = ParseRunConfig(s);
    if (!r.ok()) return Fail(r.status());
    if (Status fs = FitLayerOverrides(&*r, (*m)->kv_shape()); !fs.ok()) return Fail(fs);
    if (Status cs = CheckRunConfigCalibration(*r, **m); !cs.ok()) return Fail(cs);
    configs.push_back(*r);
  }
  if (configs.empty()) {
    configs = DefaultRunConfigs();  // presets name per-layer codecs: fit them like parsed configs
    for (auto& r : configs) {
      if (Status fs = FitLayerOverrides(&r, (*m)->kv_shape()); !fs.ok()) return Fail(fs);
    }
  }
  auto kq = EnsureKvQuantCalibration(**m, c.model, configs);
  WarnEvictionBatch(configs, std::min<int64_t>(c.batch, opt.ppl.n_ctx), opt.ppl.n_ctx);
  WarnKvQuantWithoutSink(configs);
  if (!kq.ok()) return Fail(kq.status());
  // Every configuration must build before anything runs: bad input is an error, not a table row.
  for (const auto& cfg : configs) {
    auto probe = kv::KvCache::Create((*m)->kv_shape(), cfg.cache);
    if (!probe.ok()) return Fail(Status(probe.status().code(), cfg.Label() + ": " + probe.status().message()));
    auto pol = kv::MakePolicy(cfg.evict, (*m)->kv_shape());
    if (!pol.ok()) return Fail(Status(pol.status().code(), cfg.Label() + ": " + pol.status().message()));
  }
  auto res = RunEval(**m, *toks, configs, opt);
  if (!res.ok()) return Fail(res.status());
  res->model = c.model;
  res->text = opt.text_path;
  if (json) std::printf("%s\n", ToJson(*res).dump(2).c_str());
  else if (csv) std::printf("%s", ToCsv(*res).c_str());
  else {
    std::printf("%s", FormatTable(*res).c_str());
    // Speed in its own section, with how it was measured (never a column of the quality table).
    if (const std::string sp = FormatSpeed(*res); !sp.empty()) std::printf("\nbench: decode speed\n%s", sp.c_str());
  }
  if (!report.empty()) {
    Status st = WriteReport(*res, report);
    if (!st.ok()) return Fail(st);
    std::fprintf(stderr, "report written to %s/report.md\n", report.c_str());
  }
  return 0;
}

int CmdRetrieval(Common& c, const RetrievalArgs& a) {
  auto m = LoadModel(c);
  if (!m.ok()) return Fail(m.status());
  {
    // predict=auto (presets kvc4/kvc3/kvc2) and KVQuant without calib= need their calibration
    // files made (or checked) first, as eval does; configs that do not parse fail in RunRetrieval.
    std::vector<KvRunConfig> rcs;
    for (const auto& cs : a.configs) {
      if (cs.empty() || cs == "full") continue;
      if (auto rc = ParseRunConfig(cs); rc.ok()) rcs.push_back(*rc);
    }
    if (auto kq = EnsureKvQuantCalibration(**m, c.model, rcs); !kq.ok()) return Fail(kq.status());
  }
  auto r = RunRetrieval(**m, a);
  if (!r.ok()) return Fail(r.status());
  r->emplace("model", c.model);
  r->emplace("threads", c.threads);
  std::printf("%s", a.json ? (r->dump(2) + "\n").c_str() : FormatRetrieval(*r).c_str());
  return 0;
}

// llama-bench style speed: pp = n_prompt tokens in one batch from an empty cache; tg = n_gen
// single-token steps after a depth-token context. Fixed pseudo-random token ids; median of reps
// after one warm-up. Peak RSS (VmHWM) is reported too, and the process CPU time per decode step
// (tg_cpu_ms_per_token): wall-clock t/s on a shared machine counts other jobs' load, CPU time
// does not, so compare configurations by CPU time there (at -t 1 it is the work done).
int CmdBench(Common& c, int n_prompt, int n_gen, int depth, int reps, bool json) {
  auto m = LoadModel(c);
  if (!m.ok()) return Fail(m.status());
  if (n_prompt < 1 || n_gen < 1 || depth < 1 || reps < 1) {
    return Fail(InvalidArgument("-p, -n, --depth and -r must be >= 1"));
  }
  const int64_t max_depth = 16 * int64_t(std::max<int64_t>((*m)->config().n_ctx_train, 8192));
  if (int64_t(depth) + n_gen > max_depth || n_prompt > max_depth) {
    return Fail(InvalidArgument(fmt::format(
        "--depth + -n and -p must be at most {} tokens (16x the model's trained context)", max_depth)));
  }
  auto rc = RunConfigFromFlags(c);
  if (!rc.ok()) return Fail(rc.status());
  if (Status fs = FitLayerOverrides(&*rc, (*m)->kv_shape()); !fs.ok()) return Fail(fs);
  if (Status cs = CheckRunConfigCalibration(*rc, **m); !cs.ok()) return Fail(cs);
  if (auto kq = EnsureKvQuantCalibration(**m, c.model, {*rc}); !kq.ok()) return Fail(kq.status());
  Session::Options so;
  so.n_ctx = std::max<int64_t>(n_prompt, depth + n_gen);
  so.n_batch = std::max(n_prompt, depth);
  auto s = Session::Create(**m, rc->cache, rc->evict, so);
  if (!s.ok()) return Fail(s.status());
  std::mt19937 rng(0);
  std::uniform_int_distribution<int> tok(100, (*m)->config().n_vocab - 1);
  std::vector<int32_t> prompt(n_prompt), ctx(depth), gen(n_gen);
  for (auto& t : prompt) t = tok(rng);
  for (auto& t : ctx) t = tok(rng);
  for (auto& t : gen) t = tok(rng);
  std::vector<double> pp, tg, tg_cpu;
  std::vector<float> logits;
  size_t kv_bytes = 0;
  for (int r = 0; r <= reps; ++r) {
    (*s)->Reset();
    double t0 = NowSeconds();
    Status st = (*s)->Eval(prompt, false, &logits);
    if (!st.ok()) return Fail(st);
    const double tpp = NowSeconds() - t0;
    (*s)->Reset();
    st = (*s)->Eval(ctx, false, &logits);
    if (!st.ok()) return Fail(st);
    t0 = NowSeconds();
    const double c0 = ProcessCpuSeconds();
    for (int32_t t : gen) {
      st = (*s)->Eval({t}, false, &logits);
      if (!st.ok()) return Fail(st);
    }
    const double ttg = NowSeconds() - t0;
    const double ctg = ProcessCpuSeconds() - c0;
    kv_bytes = (*s)->cache().Memory().KvBytes();
    if (r == 0) continue;  // warm-up
    pp.push_back(n_prompt / tpp);
    tg.push_back(n_gen / ttg);
    tg_cpu.push_back(1e3 * ctg / n_gen);
  }
  auto median = [](std::vector<double> v) {
    std::sort(v.begin(), v.end());
    return v[v.size() / 2];
  };
  nlohmann::json j;
  j["model"] = c.model;
  j["threads"] = c.threads;
  j["cache"] = (*s)->cache().Describe();
  j["n_prompt"] = n_prompt;
  j["n_gen"] = n_gen;
  j["depth"] = depth;
  j["pp_tokens_per_second"] = median(pp);
  j["tg_tokens_per_second"] = median(tg);
  j["tg_cpu_ms_per_token"] = median(tg_cpu);
  j["kv_bytes"] = kv_bytes;
  j["weight_bytes"] = (*m)->weight_bytes();
  j["gguf_bytes"] = (*m)->file().file_size();
  j["peak_rss_bytes"] = PeakRssBytes();
  if (json) {
    std::printf("%s\n", j.dump(2).c_str());
  } else {
    std::printf("%s | pp%d %.1f t/s | tg%d @ d%d %.1f t/s (CPU %.2f ms/tok) | KV %zu B | "
                "peak RSS %.1f MiB\n",
                (*s)->cache().Describe().c_str(), n_prompt, median(pp), n_gen, depth, median(tg),
                median(tg_cpu), kv_bytes, PeakRssBytes() / 1048576.0);
  }
  return 0;
}


struct ServeArgs {
  std::string host = "127.0.0.1";
  int port = 8080;
  std::string kv_budget = "512MiB";
  int max_batch_tokens = 512, prefill_chunk = 256, max_running = 256, max_waiting = 1024;
  double reserve_ratio = 1.0;
  std::string kv_allow;
  std::vector<std::string> api_keys;
  std::string api_key_file;
  std::string max_body = "4MiB";
  std::string max_session_bytes = "1GiB";
  int max_connections = 64;
  std::string prefix_cache = "256MiB";  // local prefix cache budget ("0": off)
  int prefix_block = 64;
  std::string session_dir;
  std::string kv_store, kv_events, kv_events_replay, kv_events_topic;
  int64_t kv_store_ttl = 3600;
  int kv_store_timeout_ms = 200;
  std::string model_alias;
  int default_max_tokens = 256;
  double shutdown_grace = 30;
  double sse_ping = 15;
};

// `kvcrunch serve`: the OpenAI-compatible server (docs/serving.md).
int CmdServe(Common& c, const ServeArgs& a) {
  // SIGTERM/SIGINT from now on: a graceful stop (exit 0), also while the model loads.
  server::InstallTerminationHandlers();
  std::vector<std::string> keys;
  for (const auto& k : a.api_keys) {
    std::stringstream ss(k);
    std::string one;
    while (std::getline(ss, one, ',')) if (!one.empty()) keys.push_back(one);
  }
  if (!a.api_keys.empty() && keys.empty()) {  // `--api-key "$UNSET_VAR"` must not mean "no auth"
    return Fail(InvalidArgument("--api-key is empty"));
  }
  if (!a.api_key_file.empty()) {
    auto text = ReadTextFile(a.api_key_file);
    if (!text.ok()) return Fail(text.status());
    std::stringstream ss(*text);
    std::string line;
    while (std::getline(ss, line)) {
      while (!line.empty() && (line.back() == '\r' || line.back() == ' ')) line.pop_back();
      if (!line.empty() && line[0] != '#') keys.push_back(line);
    }
    if (keys.empty()) return Fail(InvalidArgument("--api-key-file " + a.api_key_file + " holds no key"));
  }
  auto m = LoadModel(c);
  if (!m.ok()) return Fail(m.status());
  const Model& model = **m;
  auto rc = RunConfigFromFlags(c);
  if (!rc.ok()) return Fail(rc.status());
  if (Status fs = FitLayerOverrides(&*rc, model.kv_shape()); !fs.ok()) return Fail(fs);
  if (!rc->cache.predict.empty()) {
    // The engine's KV plan does not count the reconstruction buffers ([n, D_k + D_v] f32 per layer
    // pair and sequence) and decode rebuilds every cell per layer and step (kv/predictive.h).
    return Fail(InvalidArgument("predictive coding (predict=, in presets kvc4 / kvc3 / kvc2) is for "
                                "generate, perplexity, eval and retrieval; kvcrunch serve does not "
                                "offer it yet: use --kv-preset kvc4-serve / kvc3-serve / kvc2-serve "
                                "(the best recipes without it) or -ctk/-ctv"));
  }
  if (Status cs = CheckRunConfigCalibration(*rc, model); !cs.ok()) return Fail(cs);
  auto kvp = server::KvPolicy::Make(*rc, a.kv_allow);
  if (!kvp.ok()) return Fail(kvp.status());
  {  // KVQuant calibration for every KVQuant codec a request may name (made once, on disk).
    std::vector<KvRunConfig> cfgs = {*rc};
    for (const auto& codec : kvp->AllowedCodecs()) {
      KvRunConfig k = *rc;
      k.cache.k_codec = k.cache.v_codec = codec;
      cfgs.push_back(k);
    }
    if (auto kq = EnsureKvQuantCalibration(model, c.model, cfgs); !kq.ok()) return Fail(kq.status());
  }
  engine::EngineOptions eo;
  auto budget = server::ParseByteSize(a.kv_budget);
  if (!budget.ok()) return Fail(Status(budget.status().code(), "--kv-budget: " + budget.status().message()));
  eo.kv_budget_bytes = *budget;
  eo.n_ctx = c.ctx > 0 ? c.ctx : std::min<int64_t>(model.config().n_ctx_train, 4096);
  if (rc->cache.sink_tokens > eo.n_ctx) {  // the engine refuses every such request
    return Fail(InvalidArgument(fmt::format("--kv-sinks {} exceeds the context -c {}",
                                            rc->cache.sink_tokens, eo.n_ctx)));
  }
  eo.max_batch_tokens = a.max_batch_tokens;
  eo.prefill_chunk = std::min(a.prefill_chunk, a.max_batch_tokens);
  eo.max_running = a.max_running;
  eo.max_waiting = a.max_waiting;
  eo.reserve_ratio = a.reserve_ratio;
  auto eng = engine::Engine::Create(model, eo);
  if (!eng.ok()) return Fail(eng.status());

  // What the budget holds, per codec a request may use (vLLM prints the same for its one dtype).
  std::fprintf(stderr, "kvcrunch: KV budget %.1f MiB, context %lld tokens per request\n",
               double(eo.kv_budget_bytes) / 1048576.0, (long long)eo.n_ctx);
  std::vector<std::pair<std::string, KvRunConfig>> shown = {{"default " + rc->Label(), *rc}};
  for (const auto& codec : kvp->AllowedCodecs()) {
    if (codec == rc->cache.k_codec && codec == rc->cache.v_codec) continue;
    KvRunConfig k = *rc;
    k.cache.k_codec = k.cache.v_codec = codec;
    k.name.clear();
    shown.push_back({k.Label(), k});
  }
  for (const auto& [label, cfg] : shown) {
    engine::KvSettings ks;
    ks.cache = cfg.cache;
    ks.evict = cfg.evict;
    auto plan = (*eng)->Plan(ks);
    if (!plan.ok() && &cfg == &shown.front().second) {  // the defaults must work
      return Fail(Status(plan.status().code(), "default KV settings (" + rc->Label() + "): " +
                                                   plan.status().message()));
    }
    if (!plan.ok()) {
      std::fprintf(stderr, "kvcrunch:   %-40s unavailable: %s\n", label.c_str(),
                   plan.status().message().c_str());
      continue;
    }
    auto cells = (*eng)->MaxCells(ks, 1, eo.n_ctx);
    const int64_t per_req = (*plan)->Bytes(cells.ok() ? *cells : eo.n_ctx);
    std::fprintf(stderr, "kvcrunch:   %-40s KV cache size: %lld tokens (%.1f B/token), maximum "
                 "concurrency for %lld tokens per request: %.2fx\n", label.c_str(),
                 (long long)(double(eo.kv_budget_bytes) / (*plan)->BytesPerToken()),
                 (*plan)->BytesPerToken(), (long long)eo.n_ctx,
                 double(eo.kv_budget_bytes) / double(std::max<int64_t>(1, per_req)));
    if (per_req > eo.kv_budget_bytes) {
      spdlog::warn("{}: one request of the full context ({} tokens) needs {} KV bytes, more than "
                   "the budget: such requests are refused (raise --kv-budget or lower -c)",
                   label, eo.n_ctx, per_req);
    }
  }
  std::fprintf(stderr, "kvcrunch: per-request KV settings allowed: %s\n", kvp->AllowedList().c_str());

  server::ServerOptions so;
  so.host = a.host;
  so.port = a.port;
  so.model_id = a.model_alias.empty() ? std::filesystem::path(c.model).stem().string() : a.model_alias;
  auto body = server::ParseByteSize(a.max_body);
  if (!body.ok()) return Fail(Status(body.status().code(), "--max-body-bytes: " + body.status().message()));
  so.max_body_bytes = *body;
  auto sbody = server::ParseByteSize(a.max_session_bytes);
  if (!sbody.ok()) {
    return Fail(Status(sbody.status().code(), "--max-session-bytes: " + sbody.status().message()));
  }
  so.max_session_bytes = *sbody;
  so.max_connections = a.max_connections;
  for (const auto& k : keys) so.api_keys.push_back(server::Sha256(k));
  so.limits.n_ctx = eo.n_ctx;
  so.limits.n_vocab = model.config().n_vocab;
  so.limits.default_max_tokens = a.default_max_tokens;
  so.shutdown_grace_seconds = a.shutdown_grace;
  so.sse_ping_seconds = a.sse_ping;
  server::StoreOptions sto;
  auto pc = server::ParseByteSize(a.prefix_cache);
  if (!pc.ok() && a.prefix_cache != "0") {
    return Fail(Status(pc.status().code(), "--prefix-cache: " + pc.status().message()));
  }
  sto.prefix_cache_bytes = pc.ok() ? *pc : 0;
  sto.block_tokens = a.prefix_block;
  sto.session_dir = a.session_dir;
  if (!sto.session_dir.empty()) {
    std::error_code ec;
    std::filesystem::create_directories(sto.session_dir, ec);
    if (ec || !std::filesystem::is_directory(sto.session_dir)) {
      return Fail(InvalidArgument(fmt::format("--session-dir {}: cannot create the directory ({})",
                                              sto.session_dir, ec.message())));
    }
  }
  if (!a.kv_store.empty()) {
    auto r = server::MakeRedisRemote(a.kv_store, a.kv_store_ttl, a.kv_store_timeout_ms);
    if (!r.ok()) return Fail(Status(r.status().code(), "--kv-store: " + r.status().message()));
    sto.remote = std::move(*r);
  }
  if (!a.kv_events.empty()) {
    auto e = server::MakeEventPublisher(a.kv_events, a.kv_events_replay, a.kv_events_topic);
    if (!e.ok()) return Fail(Status(e.status().code(), "--kv-events: " + e.status().message()));
    sto.events = std::move(*e);
  }
  if (sto.prefix_cache_bytes == 0 && (sto.remote || sto.events)) {
    return Fail(InvalidArgument("--kv-store and --kv-events need the prefix cache (--prefix-cache > 0)"));
  }
  server::KvStore store(model, std::move(sto));
  if (!a.kv_store.empty()) {
    std::fprintf(stderr, "kvcrunch: shared KV tier %s (TTL %lld s)\n", a.kv_store.c_str(),
                 (long long)a.kv_store_ttl);
  }
  if (store.prefix_enabled()) {
    std::fprintf(stderr, "kvcrunch: prefix cache: %s in memory, blocks of %d tokens\n",
                 a.prefix_cache.c_str(), a.prefix_block);
  }
  return server::Serve(**eng, model.tokenizer(), *kvp, so, &store);
}

int CmdBatchedBench(Common& c, const BatchedBenchOptions& o, bool json) {
  auto m = LoadModel(c);
  if (!m.ok()) return Fail(m.status());
  auto rc = RunConfigFromFlags(c);
  if (!rc.ok()) return Fail(rc.status());
  if (Status fs = FitLayerOverrides(&*rc, (*m)->kv_shape()); !fs.ok()) return Fail(fs);
  if (Status cs = CheckRunConfigCalibration(*rc, **m); !cs.ok()) return Fail(cs);
  if (auto kq = EnsureKvQuantCalibration(**m, c.model, {*rc}); !kq.ok()) return Fail(kq.status());
  BatchedBenchOptions opt = o;
  if (c.batch > 0) opt.n_batch = c.batch;
  if (Status st = RunBatchedBench(**m, *rc, opt, json); !st.ok()) return Fail(st);
  if (!json) {
    std::printf("\n%s, %d threads, peak RSS %.1f MiB\n", rc->Label().c_str(), cpu::NumThreads(),
                PeakRssBytes() / 1048576.0);
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  // OpenMP threads that spin at barriers (libgomp's default, up to ~300k spins) collapse
  // throughput as soon as the cores are shared; sleeping at once (OMP_WAIT_POLICY=PASSIVE) halves
  // idle decode speed instead. Measured on 2 cores: streaming eval at load 7, -t 2: default 444 s,
  // 10k spins 32 s, passive 10 s; idle tg @ d4096: default 52.3 t/s, 5k spins 49.1, 20k 51.9,
  // passive 28.0. So spin briefly, then sleep. libgomp reads this when it loads, before main:
  // re-exec once with GOMP_SPINCOUNT=10000 unless the user set a policy or a spin count.
  if (!std::getenv("OMP_WAIT_POLICY") && !std::getenv("GOMP_SPINCOUNT")) {
    setenv("GOMP_SPINCOUNT", "10000", 1);
    execv("/proc/self/exe", argv);  // only returns on failure: continue with the default policy
  }
  // Log lines go to stderr: stdout carries results (--json output must stay parseable).
  spdlog::set_default_logger(spdlog::stderr_color_mt("kvcrunch"));
  spdlog::set_pattern("kvcrunch: %l: %v");
  CLI::App app{"kvcrunch: LLM inference with a compressed, pluggable KV cache"};
  app.require_subcommand(1);
  Common c;

  auto* info = app.add_subcommand("info", "model hyper-parameters and KV bytes per token per codec");
  AddModelFlags(info, c);
  info->add_option("--kv-config", c.kv_config, "also show what this KV config file expands to and its all-in bits");

  std::string prompt, file, ids, out_path, report, session_path;
  bool chat = false, print_ids = false, json = false, csv = false;
  int n_predict = 128, decode_tokens = 32;
  float temp = 0.8f, top_p = 0.95f;
  uint32_t seed = 42;
  int64_t chunks = -1;
  std::vector<std::string> cfgs;

  auto* gen = app.add_subcommand("generate", "generate text from a prompt (streamed)");
  AddModelFlags(gen, c);
  AddKvFlags(gen, c);
  auto* gen_p = gen->add_option("-p,--prompt", prompt, "prompt text");
  auto* gen_f = gen->add_option("-f,--file", file, "read the prompt from a file")->excludes(gen_p);
  gen->add_option("--tokens", ids, "prompt as comma-separated token ids")->excludes(gen_p)->excludes(gen_f);
  gen->add_flag("--chat", chat, "wrap the prompt in the model's chat template");
  gen->add_option("-n,--n-predict", n_predict, "tokens to generate");
  gen->add_option("--temp", temp, "temperature (0 = greedy)");
  gen->add_option("--top-p", top_p, "nucleus sampling threshold");
  gen->add_option("--seed", seed, "sampling seed");
  gen->add_flag("--print-ids", print_ids, "print generated token ids (comma-separated) instead of text");
  gen->add_option("--session", session_path,
                  "session file: continue the conversation saved there (its KV, compressed as saved; "
                  "the prompt is appended), then save it again; a missing file starts one (docs/store.md)");

  auto* lg = app.add_subcommand("logits", "write logits of every position as raw f32 [n_tokens, n_vocab]");
  AddModelFlags(lg, c);
  AddKvFlags(lg, c);
  lg->add_option("--tokens", ids, "comma-separated token ids")->required();
  lg->add_option("--out", out_path, "output file")->required();

  auto* ppl = app.add_subcommand("perplexity", "perplexity, llama.cpp protocol (score 2nd half of each chunk)");
  AddModelFlags(ppl, c);
  AddKvFlags(ppl, c);
  ppl->add_option("-f,--file", file, "text file (default: WikiText-2 raw test)");
  ppl->add_option("--chunks", chunks, "max chunks (0 or less: every chunk of the file)");
  ppl->add_flag("--json", json, "print one JSON object");

  auto* ev = app.add_subcommand("eval", "compare KV configurations against the f16 cache (the main job)");
  AddModelFlags(ev, c);
  AddKvFlags(ev, c);
  ev->add_option("-f,--file", file, "text file (default: WikiText-2 raw test)");
  ev->add_option("--chunks", chunks, "max chunks (default 4; 0: every chunk of the file)");
  ev->add_option("--config", cfgs, "KV configuration, repeatable: 'q4_0' or 'k=q8_0 v=q4_0 evict=...'; "
                 "per-layer codecs: k@L=, v@L=, kv@L= with L = 5, 3-10 or 0,29 ('q8_0 k@4=turbo3')");
  auto* ev_json = ev->add_flag("--json", json, "JSON output");
  ev->add_flag("--csv", csv, "CSV output")->excludes(ev_json);
  ev->add_option("--report", report, "write DIR/report.md and DIR/quality_vs_bytes.svg");
  ev->add_option("--decode-tokens", decode_tokens, "decode steps timed per configuration")->check(CLI::Range(0, 100000));

  int64_t cal_tokens = 16384;
  auto* cal = app.add_subcommand("calibrate", "K/V statistics for low-rank (Palu) and ThinK transforms -> calibration file");
  AddModelFlags(cal, c);
  cal->add_option("-f,--file,--calib-text", file, "calibration text (disjoint from the eval text, e.g. a PG-19 book; --method bits: default Pride and Prejudice from ../shared/data/pg19)");
  cal->add_option("--kv-lowrank,--method", c.lowrank, "method spec stored as the file's defaults: palu:ratio=0.5[,alloc=uniform|var], think, smooth (key-smoothing statistics only), predict[:lambda=L] (AQUA-KV predictors for predict=FILE), or bits (per-layer K/V codecs under --budget: a KV config file)");
  BitsCalibOptions bits_opt;
  std::string bits_candidates;
  cal->add_option("--budget", bits_opt.budget, "--method bits: all-in bits per value at --bits-ctx tokens (sinks, scales, norms, windows counted)");
  cal->add_option("--candidates", bits_candidates, "--method bits: 'k=SPEC;SPEC;... v=SPEC;SPEC;...' (default: turbo 1-4 bits nc=1 (keys center=1), kivi-4 keys, q8_0)");
  cal->add_option("--chunks", bits_opt.chunks, "--method bits: calibration chunks of -c tokens (default 2)")->check(CLI::Range(int64_t(1), int64_t(1) << 20));
  cal->add_option("--bits-ctx", bits_opt.bits_ctx, "--method bits: context at which all-in bits are counted (default 4096)")->check(CLI::Range(int64_t(1), int64_t(1) << 20));
  cal->add_option("--sinks", bits_opt.sinks, "--method bits: fp16 first tokens in every layer (default 1)")->check(CLI::Range(0, 1 << 16));
  cal->add_option("--reuse", bits_opt.reuse_path, "--method bits: take the sensitivities from an earlier output (same model, text, -c, --chunks, sinks; --candidates a subset of its candidates) and only solve for --budget");
  cal->add_option("--name", bits_opt.name, "--method bits: label of the configuration (default bits-BUDGET)");
  cal->add_option("-c,--ctx-size", c.ctx, "tokens per calibration chunk (default 512)")
      ->check(CLI::Range(int64_t(4), int64_t(1) << 24));
  cal->add_option("--max-tokens", cal_tokens, "calibration tokens (whole chunks)")
      ->check(CLI::Range(int64_t(1), int64_t(1) << 40));
  cal->add_option("-o,--out", out_path, "output calibration file")->required();

  // llama.cpp's -ctk/-ctv: CLI11 2.1 rejects multi-letter single-dash names, so translate them.
  std::vector<std::string> args(argv, argv + argc);
  for (auto& a : args) {
    if (a == "-ctk") a = "--cache-type-k";
    if (a == "-ctv") a = "--cache-type-v";
    if (a == "-npp" || a == "-ntg" || a == "-npl") a = "-" + a;  // batched-bench, as llama.cpp spells them
  }
  std::vector<char*> argv2;
  for (auto& a : args) argv2.push_back(a.data());
  RetrievalArgs retrieval_args;
  auto* rt = AddRetrievalCommand(app, &retrieval_args);
  AddModelFlags(rt, c);

  int bench_p = 512, bench_n = 128, bench_depth = 512, bench_reps = 3;
  auto* bn = app.add_subcommand("bench", "speed: prompt processing and decode tokens/s (llama-bench style)");
  AddModelFlags(bn, c);
  AddKvFlags(bn, c);
  bn->add_option("-p,--n-prompt", bench_p, "prompt tokens (pp)");
  bn->add_option("-n,--n-gen", bench_n, "generated tokens (tg)");
  bn->add_option("--depth", bench_depth, "context before tg");
  bn->add_option("-r,--reps", bench_reps, "repetitions after one warm-up (median reported)");
  bn->add_flag("--json", json, "JSON output");

  ServeArgs sa;
  auto* sv = app.add_subcommand("serve", "OpenAI-compatible HTTP server over the batched engine (docs/serving.md)");
  AddModelFlags(sv, c);
  AddKvFlags(sv, c);  // -c: context per request; -ctk/-ctv/--kv-*: the defaults of every request
  sv->add_option("--host", sa.host, "address to listen on (default 127.0.0.1: this machine only)");
  sv->add_option("--port", sa.port, "TCP port (0: any free port)")->check(CLI::Range(0, 65535));
  sv->add_option("--kv-budget", sa.kv_budget, "KV bytes all running requests may hold: bytes or 512MiB, 2GiB");
  sv->add_option("--max-batch-tokens", sa.max_batch_tokens, "tokens per engine step (decodes + prefill chunks)")->check(CLI::Range(1, 1 << 16));
  sv->add_option("--prefill-chunk", sa.prefill_chunk, "prompts are processed in chunks of this many tokens")->check(CLI::Range(1, 1 << 16));
  sv->add_option("--max-running", sa.max_running, "requests running at once")->check(CLI::Range(1, 1 << 16));
  sv->add_option("--max-waiting", sa.max_waiting, "requests queued; more get 429")->check(CLI::Range(1, 1 << 20));
  sv->add_option("--reserve-ratio", sa.reserve_ratio, "fraction of max_tokens reserved at admission, (0, 1]")->check(CLI::Range(0.001, 1.0));
  sv->add_option("--kv-allow", sa.kv_allow, "codecs and eviction policies requests may choose in \"kv\": comma list or 'any' (default: only the server's own settings)");
  sv->add_option("--api-key", sa.api_keys, "require 'Authorization: Bearer KEY' on every route but /health (repeatable or comma list)");
  sv->add_option("--api-key-file", sa.api_key_file, "file with one API key per line");
  sv->add_option("--max-body-bytes", sa.max_body, "largest request body (413 beyond): bytes or 4MiB");
  sv->add_option("--max-connections", sa.max_connections, "inference requests served at once, streams included (503 beyond)")->check(CLI::Range(1, 900));
  sv->add_option("--prefix-cache", sa.prefix_cache, "bytes of KV blocks kept to reuse shared prompt prefixes (LRU; 0: off; docs/store.md)");
  sv->add_option("--max-session-bytes", sa.max_session_bytes, "largest session upload (PUT /v1/sessions/NAME/kv): bytes or 1GiB");
  sv->add_option("--kv-store", sa.kv_store, "shared KV tier for prefix blocks: redis://HOST:PORT or redis-cluster://H1:P1,H2:P2 (docs/store.md)");
  sv->add_option("--kv-store-ttl", sa.kv_store_ttl, "seconds a block lives in the shared tier (0: until Redis evicts it)")->check(CLI::Range(int64_t(0), int64_t(1) << 31));
  sv->add_option("--kv-store-timeout-ms", sa.kv_store_timeout_ms, "per-call deadline of the shared tier; slower counts as down")->check(CLI::Range(1, 60000));
  sv->add_option("--kv-events", sa.kv_events, "publish KV block events (vLLM's ZMQ + msgpack format): tcp://*:5557 binds; tcp://HOST:PORT connects to a subscriber that binds (vLLM's rule)");
  sv->add_option("--kv-events-replay", sa.kv_events_replay, "ZMQ ROUTER endpoint that replays recent event batches");
  sv->add_option("--kv-events-topic", sa.kv_events_topic, "topic frame of every event message (llm-d: kv@POD@MODEL)");
  sv->add_option("--prefix-block", sa.prefix_block, "tokens per prefix-cache block")->check(CLI::Range(16, 4096));
  sv->add_option("--session-dir", sa.session_dir, "directory for named sessions (\"session\": NAME in a request; /v1/sessions)");
  sv->add_option("--model-alias", sa.model_alias, "model id in /v1/models and responses (default: the GGUF file name)");
  sv->add_option("--default-max-tokens", sa.default_max_tokens, "max_tokens of a request that sets none (capped by the context)")->check(CLI::Range(1, 1 << 24));
  sv->add_option("--sse-ping-interval", sa.sse_ping, "seconds without tokens after which a stream gets an SSE comment (0: never)")->check(CLI::Range(0.0, 3600.0));
  sv->add_option("--shutdown-grace", sa.shutdown_grace, "seconds running requests may finish after SIGTERM before they are cancelled")->check(CLI::Range(0.0, 3600.0));

  BatchedBenchOptions bb;
  auto* bbc = app.add_subcommand(
      "batched-bench", "aggregate decode speed of B sequences in one batch (llama-batched-bench protocol)");
  AddModelFlags(bbc, c);
  AddKvFlags(bbc, c);
  // llama-batched-bench's -npp/-ntg/-npl (translated below like -ctk).
  bbc->add_option("--npp", bb.npp, "prompt tokens per sequence (list)")->delimiter(',');
  bbc->add_option("--ntg", bb.ntg, "generated tokens per sequence (list)")->delimiter(',');
  bbc->add_option("--npl", bb.npl, "sequences in the batch (list)")->delimiter(',');
  bbc->add_option("-r,--reps", bb.reps, "repetitions after one warm-up (median reported)");
  bbc->add_flag("--json", json, "JSON lines output");

  CLI11_PARSE(app, int(argv2.size()), argv2.data());
  // Errors are Status values; an exception reaching here (out of memory for a huge request, an
  // I/O failure inside a library) still ends with one clear line and exit 1, not an abort.
  try {
    if (*sv) return CmdServe(c, sa);
    if (*bn) return CmdBench(c, bench_p, bench_n, bench_depth, bench_reps, json);
    if (*bbc) return CmdBatchedBench(c, bb, json);
    if (*info) return CmdInfo(c);
    if (*gen) return CmdGenerate(c, prompt, file, ids, chat, n_predict, temp, top_p, seed, print_ids, session_path);
    if (*lg) return CmdLogits(c, ids, out_path);
    if (*ppl) return CmdPerplexity(c, file, chunks, json);
    if (*cal && c.lowrank == "bits") return CmdCalibrateBits(c, file, out_path, bits_opt, bits_candidates);
    if (*cal) return CmdCalibrate(c, file, out_path, cal_tokens);
    if (*rt) return CmdRetrieval(c, retrieval_args);
    if (*ev) return CmdEval(c, file, chunks < 0 ? 4 : chunks, cfgs, json, csv, report, decode_tokens);
  } catch (const std::bad_alloc&) {
    std::fprintf(stderr, "kvcrunch: error: RESOURCE_EXHAUSTED: out of memory (the request is too "
                         "large for this machine: lower -c / --depth / --lengths)\n");
    return 1;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "kvcrunch: error: INTERNAL: %s\n", e.what());
    return 1;
  }
  return 0;
}
