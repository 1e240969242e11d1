// KV run configurations: the --config "k=SPEC v=SPEC ..." parser (runner.h) and the default
// list. Kept apart from the model-running code so the spec fuzzer (tests/fuzz/kv_spec_fuzz.cc)
// links only the KV library.
#include <cstdlib>
#include <set>
#include <sstream>

#include <fmt/format.h>

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
    if (tok.rfind("preset=", 0) == 0) {
      if (!preset_name.empty()) return InvalidArgument(fmt::format("key 'preset' given twice in config '{}'", text));
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
                                         "evict, sinks, sink_codec, demote, demote_k, demote_v, sink_detect, sink_detect_layer, pos, name, k@L, v@L, kv@L)", key, text));
    }
  }
  if (!any) return InvalidArgument("empty KV configuration");
  if (!preset_name.empty() && c.name.empty()) {
    std::string rest;
    for (const auto& t : toks) rest += " " + t;
    c.name = preset_name + rest;
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

std::vector<KvRunConfig> DefaultRunConfigs() {
  std::vector<KvRunConfig> out;
  for (const auto& info : kv::RegisteredCodecs()) {
    if (!info.in_default_eval) continue;
    KvRunConfig c;
    c.cache.k_codec = c.cache.v_codec = info.name;
    out.push_back(c);
  }
  // Composition rows: the attention-sink-aware variant (first 4 tokens in an fp16 segment,
  // KVQuant §3.5 / StreamingLLM) of the 2-bit codec, the one that needs it most on SmolLM2.
  // KVQuant with its first token in fp16 (§3.5; the codec itself has no sink slot) and QJL keys
  // (keys-only codec) with q8_0 values. KVQuant's calibration file is made on first use
  // (EnsureKvQuantCalibration, PG-19 text).
  for (const char* s : {"kivi2 sinks=4", "kvquant4 sinks=1", "kvquant3 sinks=1", "kvquant2 sinks=1",
                        "k=qjl:m=256 v=q8_0"}) {
    auto r = ParseRunConfig(s);
    if (r.ok()) out.push_back(*r);
  }
  return out;
}

}  // namespace kvc

namespace kvc {

const std::vector<KvPreset>& KvPresets() {
  // Chosen from what docs/results.md measured ("Presets" section, -c 4096, 2 chunks of WikiText-2
  // test, baseline f16 23.6971 on this build). All-in bits = 16 · allocated KV bytes / f16 bytes.
  static const std::vector<KvPreset> kPresets = {
      {"kvc4", "k=kivi:bits=4,group=64,residual=64 v=turbo:bits=4,nc=1 sinks=1", 4.5,
       "KIVI-4 keys per channel (groups of 64 tokens, 64-token fp16 window) + TurboQuant-4 values "
       "with norm correction, first token fp16: 4.47 b/v all in, +0.51 +- 0.31 % ppl, KLD 0.014 "
       "(target <= +0.5 %: missed by 0.01 points, within 1 SE)"},
      {"kvc3", "k=turbo:bits=3,nc=1,center=1 v=turbo:bits=3,nc=1 v@0=turbo:bits=2.5,nc=1 sinks=1", 3.25,
       "TurboQuant-3 keys (norm correction, pre-RoPE mean removed) and values, layer 0's values at "
       "2.5 bits to pay for the fp16 first token: 3.25 b/v all in, +5.79 +- 0.69 % ppl, KLD 0.065 "
       "(target <= +2 %, KLD <= 0.03: missed by 3.8 points)"},
      {"kvc2", "k=turbo:bits=2.5,nc=1,center=1 v=turbo:bits=1.5,nc=1 v@0=turbo:bits=1,nc=1 sinks=1", 2.5,
       "TurboQuant-2.5 keys (32 ch at 3 b + 32 at 2 b, centred) + TurboQuant-1.5 values, layer 0's "
       "values at 1 bit, first token fp16: 2.49 b/v all in, +38.2 +- 2.2 % ppl, KLD 0.354 "
       "(target <= +6 %: missed by 32 points)"},
      {"kvc-25", "k=kivi:bits=4,group=128,residual=128 v=turbo:bits=3,nc=1 sinks=1", 4.0,
       "<= 25 % of the f16 KV bytes by quantization alone (no token evicted): KIVI-4 keys (groups of "
       "128, 128-token fp16 window) + TurboQuant-3 values, first token fp16: 3.94 b/v = 24.6 % of "
       "f16, +2.41 +- 0.46 % ppl, passkey 20/20 at 4k (TOVA at 25 % kept: 11/20)"},
  };
  return kPresets;
}

}  // namespace kvc
