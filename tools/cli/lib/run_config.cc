// KV run configurations: the --config "k=SPEC v=SPEC ..." parser (runner.h) and the default
// list. Kept apart from the model-running code so the spec fuzzer (tests/fuzz/kv_spec_fuzz.cc)
// links only the KV library.
#include <cstdlib>
#include <filesystem>
#include <random>
#include <set>
#include <sstream>

#include <fmt/format.h>

#include "kv_config_file.h"
#include "runner.h"

namespace kvc {

std::string KvRunConfig::Label() const {
  if (!name.empty()) return name;
  std::string l = cache.k_codec == cache.v_codec ? cache.k_codec
                                                  : "K:" + cache.k_codec + " V:" + cache.v_codec;
  if (!cache.k_transform.empty()) l += " Kt:" + cache.k_transform;
  if (!cache.v_transform.empty()) l += " Vt:" + cache.v_transform;
  // Per-layer overrides (k@L=SPEC / v@L=SPEC), runs of equal codecs collapsed: " K@3-10:q8_0".
  for (const auto* lay : {&cache.k_codec_layer, &cache.v_codec_layer}) {
    const char* kv = lay == &cache.k_codec_layer ? "K" : "V";
    for (size_t a = 0; a < lay->size();) {
      size_t b = a;
      while (b + 1 < lay->size() && (*lay)[b + 1] == (*lay)[a]) ++b;
      if (!(*lay)[a].empty()) {
        l += a == b ? fmt::format(" {}@{}:{}", kv, a, (*lay)[a])
                    : fmt::format(" {}@{}-{}:{}", kv, a, b, (*lay)[a]);
      }
      a = b + 1;
    }
  }
  if (cache.sink_tokens > 0) l += fmt::format(" sinks:{}", cache.sink_tokens);
  if (!cache.predict.empty()) l += " predict";
  if (cache.sink_detect > 0) l += fmt::format(" sink_detect:{}@L{}", cache.sink_detect, cache.sink_detect_layer);
  if (!evict.empty()) l += " evict:" + evict;
  if (!cache.demote_k_codec.empty()) {
    l += cache.demote_k_codec == cache.demote_v_codec
             ? " demote:" + cache.demote_k_codec
             : " demote:K=" + cache.demote_k_codec + ",V=" + cache.demote_v_codec;
  }
  return l;
}

namespace {

// "5", "3-10" or "0,2,29-29" -> layer indices (each < 4096). INVALID_ARGUMENT otherwise.
StatusOr<std::vector<int>> ParseLayerList(const std::string& s, const std::string& text) {
  std::vector<int> out;
  std::istringstream in(s);
  std::string part;
  auto bad = [&] {
    return InvalidArgument(fmt::format("bad layer list '{}' in config '{}' (e.g. k@5=q8_0, "
                                       "k@3-10=q8_0, k@0,29=q8_0)", s, text));
  };
  auto num = [](const std::string& t, long* v) {
    char* end = nullptr;
    *v = std::strtol(t.c_str(), &end, 10);
    return !t.empty() && !*end && t[0] != '-' && t[0] != '+' && *v >= 0 && *v < 4096;
  };
  if (s.empty() || s.back() == ',') return bad();
  while (std::getline(in, part, ',')) {
    const size_t dash = part.find('-');
    long a = 0, b = 0;
    if (dash == std::string::npos) {
      if (!num(part, &a)) return bad();
      b = a;
    } else if (!num(part.substr(0, dash), &a) || !num(part.substr(dash + 1), &b) || b < a) {
      return bad();
    }
    for (long l = a; l <= b; ++l) out.push_back(int(l));
  }
  return out;
}

}  // namespace

std::string KvPresetNames() {
  std::string out;
  for (const auto& p : KvPresets()) out += (out.empty() ? "" : ", ") + p.name;
  return out;
}

namespace {

// The configuration of a KV config file, with its shape and path recorded.
StatusOr<KvRunConfig> FromConfigFile(const std::string& path) {
  KVC_ASSIGN_OR_RETURN(KvConfigFile f, ReadKvConfigFile(path));
  auto c = ParseRunConfig(f.config);
  if (!c.ok()) return InvalidArgument(fmt::format("KV config file '{}': {}", path, c.status().message()));
  c->config_file = path;
  c->file_shape = f.shape;
  if (c->name.empty()) {
    c->name = f.name.empty() ? "config:" + std::filesystem::path(path).filename().string() : f.name;
  }
  return c;
}

}  // namespace

StatusOr<KvRunConfig> LoadRunConfigFile(const std::string& path) { return FromConfigFile(path); }

StatusOr<KvRunConfig> ParseRunConfig(const std::string& text) {
  KvRunConfig c;
  std::istringstream in(text);
  std::string tok;
  bool any = false;
  std::set<std::string> seen;
  // preset=NAME (anywhere in the string) is applied first; the other keys then override it.
  std::vector<std::string> toks;
  std::string preset_name;
  while (in >> tok) {
    if (tok.rfind("config=", 0) == 0 || tok.rfind("file=", 0) == 0) {
      if (!preset_name.empty()) {
        return InvalidArgument(fmt::format("config '{}': give one of preset=, config= (file=)", text));
      }
      const std::string path = tok.substr(tok.find('=') + 1);
      if (path.empty()) return InvalidArgument(fmt::format("key 'config' has no value in config '{}'", text));
      preset_name = "config:" + path;
      KVC_ASSIGN_OR_RETURN(c, FromConfigFile(path));
      any = true;
    } else if (tok.rfind("preset=", 0) == 0) {
      if (!preset_name.empty()) {
        return InvalidArgument(fmt::format("key 'preset' given twice (or with config=) in config '{}'", text));
      }
      preset_name = tok.substr(7);
      const KvPreset* found = nullptr;
      for (const auto& p : KvPresets()) if (p.name == preset_name) found = &p;
      if (!found) {
        return InvalidArgument(fmt::format("unknown KV preset '{}' (known: {}; `kvcrunch info` lists "
                                           "what each expands to)", preset_name, KvPresetNames()));
      }
      auto base = ParseRunConfig(found->config);
      if (!base.ok()) return base.status();
      c = *base;
      any = true;
    } else {
      toks.push_back(tok);
    }
  }
  const KvRunConfig preset_base = c;
  for (const std::string& t : toks) {
    tok = t;
    any = true;
    const size_t eq = tok.find('=');
    // A bare codec spec (may carry its own parameters: "q4_0:rot=0") sets K = V.
    if (eq == std::string::npos || tok.find(':') < eq) {
      // bare codec: K = V = codec
      c.cache.k_codec = c.cache.v_codec = tok;
      continue;
    }
    const std::string key = tok.substr(0, eq), val = tok.substr(eq + 1);
    if (!seen.insert(key).second) {
      return InvalidArgument(fmt::format("key '{}' given twice in config '{}'", key, text));
    }
    if (val.empty()) {
      return InvalidArgument(fmt::format("key '{}' has no value in config '{}'", key, text));
    }
    if (const size_t at = key.find('@'); at != std::string::npos) {
      // Per-layer override: k@L=SPEC, v@L=SPEC or kv@L=SPEC (L: 5, 3-10, 0,29). Sized to the
      // highest layer named; FitLayerOverrides pads it to the model's n_layer.
      const std::string which = key.substr(0, at);
      if (which != "k" && which != "v" && which != "kv") {
        return InvalidArgument(fmt::format("unknown key '{}' in config '{}' (per-layer codecs: "
                                           "k@L=, v@L=, kv@L=)", key, text));
      }
      KVC_ASSIGN_OR_RETURN(auto layers, ParseLayerList(key.substr(at + 1), text));
      for (auto* lay : {&c.cache.k_codec_layer, &c.cache.v_codec_layer}) {
        if ((lay == &c.cache.k_codec_layer) ? which == "v" : which == "k") continue;
        for (int l : layers) {
          if (int(lay->size()) <= l) lay->resize(l + 1);
          const auto& base_lay = lay == &c.cache.k_codec_layer ? preset_base.cache.k_codec_layer
                                                                : preset_base.cache.v_codec_layer;
          const bool from_preset = l < int(base_lay.size()) && !base_lay[l].empty() &&
                                   (*lay)[l] == base_lay[l];
          if (!(*lay)[l].empty() && !from_preset) {
            return InvalidArgument(fmt::format("layer {} {} codec given twice in config '{}'", l,
                                               lay == &c.cache.k_codec_layer ? "K" : "V", text));
          }
          (*lay)[l] = val;
        }
      }
      continue;
    }
    if (key == "k") c.cache.k_codec = val;
    else if (key == "v") c.cache.v_codec = val;
    else if (key == "kt") c.cache.k_transform = val;
    else if (key == "vt") c.cache.v_transform = val;
    else if (key == "evict") c.evict = val;
    else if (key == "sink_codec") c.cache.sink_codec = val;
    else if (key == "demote") c.cache.demote_k_codec = c.cache.demote_v_codec = val;
    else if (key == "demote_k") c.cache.demote_k_codec = val;
    else if (key == "demote_v") c.cache.demote_v_codec = val;
    else if (key == "sink_detect") {
      char* end = nullptr;
      const double v = std::strtod(val.c_str(), &end);
      if (*end || !(v == 0 || v > 1)) {
        return InvalidArgument(fmt::format("sink_detect must be 0 (off) or a ratio > 1, got '{}'", val));
      }
      c.cache.sink_detect = float(v);
    } else if (key == "sink_detect_layer") {
      char* end = nullptr;
      const long v = std::strtol(val.c_str(), &end, 10);
      if (*end || v < 0 || v > 4096) return InvalidArgument("sink_detect_layer must be a layer index >= 0");
      c.cache.sink_detect_layer = int(v);
    }
    else if (key == "name") c.name = val;
    else if (key == "predict") c.cache.predict = val;
    else if (key == "sinks") {
      char* end = nullptr;
      const long v = std::strtol(val.c_str(), &end, 10);
      if (*end || v < 0 || v > 1 << 20) return InvalidArgument("sinks must be a count >= 0");
      c.cache.sink_tokens = int(v);
    } else if (key == "pos") {
      KVC_ASSIGN_OR_RETURN(c.cache.position_mode, kv::ParsePositionMode(val));
      c.cache.position_mode_set = true;
    } else {
      return InvalidArgument(fmt::format("unknown key '{}' in config '{}' (preset, k, v, kt, vt, "
                                         "evict, sinks, sink_codec, demote, demote_k, demote_v, sink_detect, sink_detect_layer, pos, predict, name, k@L, v@L, kv@L)", key, text));
    }
  }
  if (!any) return InvalidArgument("empty KV configuration");
  if (!c.cache.predict.empty() && !c.evict.empty()) {
    return InvalidArgument(fmt::format("config '{}': predict= (predictive coding) keeps every token "
                                       "and cannot be combined with evict=", text));
  }
  if (!preset_name.empty()) {
    bool named = false;
    std::string rest;
    for (const auto& t : toks) {
      named = named || t.rfind("name=", 0) == 0;
      rest += " " + t;
    }
    // A preset's label is its name; a file's is the name it carries (set by FromConfigFile).
    if (!named) c.name = (preset_base.name.empty() ? preset_name : preset_base.name) + rest;
  }
  return c;
}

Status FitLayerOverrides(KvRunConfig* c, int n_layer) {
  for (auto* lay : {&c->cache.k_codec_layer, &c->cache.v_codec_layer}) {
    if (lay->empty()) continue;
    if (int(lay->size()) > n_layer) {
      return InvalidArgument(fmt::format("{}: layer {} named, but the model has {} layers (0-{})",
                                         c->Label(), lay->size() - 1, n_layer, n_layer - 1));
    }
    lay->resize(n_layer);
  }
  return Status::Ok();
}

Status FitLayerOverrides(KvRunConfig* c, const kv::KvShape& shape) {
  if (c->file_shape.n_layer > 0) {
    kv::KvShape want = shape;
    if (want.head_dim_v == 0) want.head_dim_v = want.head_dim;
    if (c->file_shape.n_layer != want.n_layer || c->file_shape.n_head_kv != want.n_head_kv ||
        c->file_shape.head_dim != want.head_dim || c->file_shape.DimV() != want.DimV()) {
      return InvalidArgument(fmt::format("KV config file '{}' was made for a model with {}, but this "
                                         "model has {} (run `kvcrunch calibrate --method bits` for it)",
                                         c->config_file, KvShapeString(c->file_shape), KvShapeString(shape)));
    }
  }
  return FitLayerOverrides(c, shape.n_layer);
}

StatusOr<AllInBits> MeasureAllInBits(const kv::KvShape& shape, const kv::KvCacheConfig& cfg,
                                     int n_tokens) {
  if (n_tokens < 1) return InvalidArgument("all-in bits: n_tokens must be >= 1");
  // Predictive coding stores residuals in the same codecs: same bytes (Predictive.* unit tests),
  // so the predictor file (maybe "auto", resolved only by the CLI) is not needed here.
  kv::KvCacheConfig c = cfg;
  c.predict.clear();
  // One KV head per layer: every head is stored alike (same codecs, sinks, windows), so the ratio
  // to f16 is the same and the measurement (encoding n_tokens × n_layer vectors, slow for the VQ
  // codecs' brute-force search) is n_head_kv times cheaper.
  kv::KvShape one = shape;
  one.n_head_kv = 1;
  one.n_head = std::max(1, shape.n_head / std::max(1, shape.n_head_kv));
  KVC_ASSIGN_OR_RETURN(auto cache, kv::KvCache::Create(one, c));
  std::mt19937 rng(1);
  std::normal_distribution<float> nd;
  std::vector<float> k(size_t(n_tokens) * shape.head_dim);
  std::vector<float> v(size_t(n_tokens) * shape.DimV());
  for (auto& x : k) x = nd(rng);
  for (auto& x : v) x = nd(rng);
  std::vector<int64_t> seq(n_tokens);
  for (int i = 0; i < n_tokens; ++i) seq[i] = i;
  for (int l = 0; l < shape.n_layer; ++l) {
    KVC_RETURN_IF_ERROR(cache->Write(l, seq.data(), n_tokens, k.data(), v.data()));
  }
  cache->Flush();  // window codecs encode after attention; no attention runs here
  AllInBits r;
  r.f16_bytes = 2.0 * shape.n_layer * shape.n_head_kv * (shape.head_dim + shape.DimV()) * double(n_tokens);
  const auto mem = cache->Memory();
  for (const auto& l : mem.layers) {
    r.k_bytes.push_back(double(l.k_packed + l.k_tail) * shape.n_head_kv);
    r.v_bytes.push_back(double(l.v_packed + l.v_tail) * shape.n_head_kv);
  }
  r.bits = 16.0 * double(mem.KvBytes()) * shape.n_head_kv / r.f16_bytes;
  return r;
}

std::vector<KvRunConfig> DefaultRunConfigs() {
  // The main job's table: for each method family the paper's recipe ("[paper]") and, where
  // kvcrunch measured a better one at about the same bits, kvcrunch's best ("[best]"; numbers and
  // provenance in docs/results.md and docs/quantization-advanced.md, -c 4096 WikiText-2), then
  // the presets. Families without a second row have one recipe (bf16, q8_0, fp8, q4_1, q5_0).
  struct Row {
    const char* tag;
    const char* config;
  };
  static const Row kRows[] = {
      {"", "bf16"},
      {"", "q8_0"},
      {"", "fp8"},
      // llama.cpp's q4_0 has no rotation; kvcrunch rotates by default (Hadamard, QuaRot-style).
      {"[paper]", "q4_0:rot=0"},
      {"[best]", "q4_0"},
      {"", "q4_1"},
      {"", "q5_0"},
      // KIVI (G=32, R=128 fp16 window); best 4-bit: its per-channel keys with TurboQuant-4 values
      // (= preset kvc4); 2-bit: the first 4 tokens in fp16 (StreamingLLM sinks).
      {"[paper]", "kivi4"},
      {"[best]", "k=kivi:bits=4,group=64,residual=64 v=turbo:bits=4,nc=1 sinks=1"},
      {"[paper]", "kivi2"},
      {"[best]", "kivi2 sinks=4"},
      // TurboQuant (Zandieh et al. 2025, mse variant); best: norm correction, pre-RoPE key mean
      // removed, first token fp16 (docs/quantization-advanced.md "Centering").
      {"[paper]", "turbo4"},
      {"[best]", "turbo:bits=4,nc=1,center=1 sinks=1"},
      {"[paper]", "turbo3"},
      {"[best]", "k=turbo:bits=3,nc=1,center=1 v=turbo:bits=3,nc=1 sinks=1"},
      // PolarQuant (Han et al. 2025); best: centred, first token fp16.
      {"[paper]", "polar"},
      {"[best]", "polar:center=1 sinks=1"},
      // KVQuant (Hooper et al. 2024) keeps the first token in fp16 (§3.5) in its own recipe.
      {"[paper]", "kvquant4 sinks=1"},
      {"[paper]", "kvquant3 sinks=1"},
      {"[paper]", "kvquant2 sinks=1"},
      // QJL (Zandieh et al. 2024) is keys only; values q8_0. Best: centred keys, first token fp16.
      {"[paper]", "k=qjl:m=256 v=q8_0"},
      {"[best]", "k=qjl:m=256,center=1 v=q8_0 sinks=1"},
      // Presets (issue 15): the best measured recipe per bit class.
      {"[preset]", "preset=kvc4"},
      {"[preset]", "preset=kvc3"},
      {"[preset]", "preset=kvc2"},
      {"[preset]", "preset=kvc-25"},
  };
  std::vector<KvRunConfig> out;
  for (const Row& row : kRows) {
    auto r = ParseRunConfig(row.config);
    if (!r.ok()) continue;  // RunConfigDefaults.EveryDefaultRowParses keeps this list honest
    if (*row.tag) r->name = std::string(row.tag) + " " + r->Label();
    out.push_back(*r);
  }
  return out;
}

}  // namespace kvc

namespace kvc {

const std::vector<KvPreset>& KvPresets() {
  // Chosen from what docs/results.md measured ("Presets" section, -c 4096, 2 chunks of WikiText-2
  // test, baseline f16 23.6971 on this build). All-in bits = 16 · allocated KV bytes / f16 bytes.
  static const std::vector<KvPreset> kPresets = {
      {"kvc4", "k=turbo:bits=4,nc=1 v=turbo:bits=4,nc=1 sinks=4 predict=auto", 4.5,
       "predictive coding (AQUA-KV predictors, residual in TurboQuant-4), 4 fp16 sink tokens: "
       "4.266 b/v all in, -0.04 +- 0.22 % ppl, KLD 0.0078 (target <= +0.5 %: met). Predictor file "
       "made on first use (PG-19, ~3 min)"},
      {"kvc3", "k=turbo:bits=3,nc=1 v=turbo:bits=3,nc=1 v@0=turbo:bits=2,nc=1 sinks=4 predict=auto", 3.25,
       "predictive coding (AQUA-KV: each layer's K/V predicted from the previous layer's "
       "reconstruction, residual in TurboQuant-3), layer 0's values at 2 bits to pay for 4 fp16 "
       "sink tokens: 3.249 b/v all in, +1.15 +- 0.36 % ppl, KLD 0.0215 (target <= +2 %, KLD <= 0.03: "
       "met). Predictor file made on first use (PG-19, ~3 min)"},
      {"kvc2", "k=nsn3 v=nsn2 k@29=nsn2.5 sinks=1 predict=auto", 2.5,
       "predictive coding (AQUA-KV predictors) with NSN vector-quantized residuals: keys 3 b/v "
       "(layer 29: 2.5), values 2 b/v, first token fp16: 2.496 b/v all in, +2.82 +- 0.53 % ppl, "
       "KLD 0.041 (target <= +6 %: met). Predictor file made on first use (PG-19, ~3 min)"},
      {"kvc-25", "k=kivi:bits=4,group=128,residual=128 v=turbo:bits=3,nc=1 sinks=1", 4.0,
       "<= 25 % of the f16 KV bytes by quantization alone (no token evicted): KIVI-4 keys (groups of "
       "128, 128-token fp16 window) + TurboQuant-3 values, first token fp16: 3.94 b/v = 24.6 % of "
       "f16, +2.41 +- 0.46 % ppl, passkey 20/20 at 4k (TOVA at 25 % kept: 11/20)"},
      // The best recipes without predictive coding: what `kvcrunch serve` offers (predict= is
      // refused there) and what decodes at codec speed.
      {"kvc4-serve", "k=kivi:bits=4,group=64,residual=64 v=turbo:bits=4,nc=1 sinks=1", 4.5,
       "KIVI-4 keys per channel (groups of 64 tokens, 64-token fp16 window) + TurboQuant-4 values "
       "with norm correction, first token fp16: 4.47 b/v all in, +0.51 +- 0.31 % ppl, KLD 0.014"},
      {"kvc3-serve", "k=nsn3.25:center=1 v=nsn3.25 v@0=nsn3 sinks=1", 3.25,
       "NSN vector codec (2-D universal codebook, Hadamard), keys centred, layer 0's values at 3 b: "
       "3.2497 b/v all in, +4.81 +- 0.62 % ppl, KLD 0.056"},
      {"kvc2-serve", "k=nsn2.5:center=1 v=nsn2.5 v@0=nsn2 v@1=nsn2 sinks=1", 2.5,
       "NSN vector codec (4-D universal codebook), keys centred, layers 0-1 values at 2 b: 2.487 "
       "b/v all in, +19.2 +- 1.3 % ppl, KLD 0.174"},
  };
  return kPresets;
}

}  // namespace kvc
