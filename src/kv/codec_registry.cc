// The codec and transform registries: one row per plug-in. Adding a codec = one file pair in
// src/kv/codecs/ + one row here.
#include <algorithm>

#include <fmt/format.h>

#include "kv/codec.h"
#include "kv/codecs/fp8.h"
#include "kv/codecs/kivi.h"
#include "kv/codecs/kvquant.h"
#include "kv/codecs/nsn.h"
#include "kv/codecs/plain.h"
#include "kv/codecs/polar.h"
#include "kv/codecs/q4_0.h"
#include "kv/codecs/q4_1.h"
#include "kv/codecs/q5_0.h"
#include "kv/codecs/q8_0.h"
#include "kv/codecs/qjl.h"
#include "kv/codecs/turbo.h"
#include "kv/transform.h"
#include "kv/transforms/hadamard.h"
#include "kv/transforms/lowrank.h"
#include "kv/transforms/think.h"
#include "kv/transforms/smooth.h"

namespace kvc::kv {

const std::vector<CodecInfo>& RegisteredCodecs() {
  static const std::vector<CodecInfo> kCodecs = {
      {"f32", "IEEE float32, 32 bits/value (reference)", {}, MakeF32Codec, false},
      {"f16", "IEEE float16, 16 bits/value (the baseline)", {}, MakeF16Codec, false},
      {"bf16", "bfloat16, 16 bits/value", {}, MakeBf16Codec, true},
      {"q8_0", "llama.cpp q8_0: int8 + fp16 scale per 32 values, 8.5 bits/value", {}, MakeQ8_0Codec, true},
      {"q4_0", "llama.cpp q4_0 (+Hadamard rotation unless rot=0): 4.5 bits/value", {}, MakeQ4_0Codec, true},
      {"q4_1", "llama.cpp q4_1 (+Hadamard rotation unless rot=0): 5.0 bits/value", {}, MakeQ4_1Codec, true},
      {"q5_0", "llama.cpp q5_0 (+Hadamard rotation unless rot=0): 5.5 bits/value", {}, MakeQ5_0Codec, true},
      {"fp8", "OCP fp8 e4m3 + fp16 absmax scale per vector: 8 + 16/head_dim bits/value", {}, MakeFp8Codec, true},
      {"kivi", "KIVI: K per-channel / V per-token asym. 2|4-bit, fp16 window: kivi:bits=2,group=32,residual=128", {}, MakeKiviCodec, false},
      {"kivi2", "KIVI 2-bit, G=32, R=128: 3.0 bits/value + fp16 window", {}, MakeKiviCodec, true},
      {"kivi4", "KIVI 4-bit, G=32, R=128: 5.0 bits/value + fp16 window", {}, MakeKiviCodec, true},
      {"turbo", "TurboQuant: Haar rotation + sphere Lloyd-Max + fp16 norm: turbo:bits=2|2.5|3|3.5|4,variant=mse|prod", {}, MakeTurboCodec, false},
      {"turbo2", "TurboQuant mse 2-bit + fp16 norm: 2.25 bits/value (d=64)", {}, MakeTurboCodec, false},
      {"turbo2.5", "TurboQuant mse 32@3b + 32@2b split + 2 norms: 3.0 bits/value (d=64)", {}, MakeTurboCodec, false},
      {"turbo3", "TurboQuant mse 3-bit + fp16 norm: 3.25 bits/value (d=64)", {}, MakeTurboCodec, true},
      {"turbo3.5", "TurboQuant mse 32@4b + 32@3b split + 2 norms: 4.0 bits/value (d=64)", {}, MakeTurboCodec, false},
      {"turbo4", "TurboQuant mse 4-bit + fp16 norm: 4.25 bits/value (d=64)", {}, MakeTurboCodec, true},
      {"kvquant", "KVQuant nuq: pre-RoPE per-channel K, per-token V, calibrated codebooks, 1 % fp16 outliers, Q-Norm: kvquant:bits=3,outliers=1,qnorm=1", {}, MakeKvQuantCodec, false},
      {"kvquant2", "KVQuant nuq2-1% + Q-Norm: K 2.3125 / V 2.875 bits/value (d=64)", {}, MakeKvQuantCodec, false},
      {"kvquant3", "KVQuant nuq3-1% + Q-Norm: K 3.3125 / V 3.875 bits/value (d=64)", {}, MakeKvQuantCodec, false},
      {"kvquant4", "KVQuant nuq4-1% + Q-Norm: K 4.3125 / V 4.875 bits/value (d=64)", {}, MakeKvQuantCodec, false},
      {"qjl", "QJL 1-bit JL sketch of keys (K only) + fp16 norm: qjl:m=64 -> (16+m)/d bits/value", {}, MakeQjlCodec, false},
      {"polar", "PolarQuant: rotation + 4-level polar angles 4/2/2/2 bits + fp16 radius per 16: 3.875 bits/value", {}, MakePolarCodec, true},
      {"nsn", "NSNQuant-style: normalize + Hadamard + universal Gaussian VQ codebook + fp16 scale (use center=1 for the shift): nsn:bits=B,dim=D", {}, MakeNsnCodec, false},
      {"nsn2", "NSN VQ 4-D, 128 codewords (7 bits / 4 values) + fp16 scale: 2.0 bits/value (d=64)", {}, MakeNsnCodec, false},
      {"nsn2.5", "NSN VQ 4-D, 512 codewords (9 bits / 4 values) + fp16 scale: 2.5 bits/value (d=64)", {}, MakeNsnCodec, false},
      {"nsn3", "NSN VQ 4-D, 2048 codewords (11 bits / 4 values) + fp16 scale: 3.0 bits/value (d=64)", {}, MakeNsnCodec, false},
      {"nsn3.25", "NSN VQ 2-D, 64 codewords (6 bits / 2 values) + fp16 scale: 3.25 bits/value (d=64)", {}, MakeNsnCodec, false},
  };
  return kCodecs;
}

const std::map<std::string, std::string>& CodecAliases() {
  static const std::map<std::string, std::string> kAliases = {
      {"fp16", "f16"},
      {"fp32", "f32"},
      {"q4_0", "q4_0:rot=1"},
      {"q4_1", "q4_1:rot=1"},
      {"q5_0", "q5_0:rot=1"},
      {"kivi2", "kivi:bits=2,group=32,residual=128"},
      {"kivi4", "kivi:bits=4,group=32,residual=128"},
      {"turbo2", "turbo:bits=2,variant=mse"},
      {"turbo2.5", "turbo:bits=2.5,variant=mse"},
      {"turbo3", "turbo:bits=3,variant=mse"},
      {"turbo3.5", "turbo:bits=3.5,variant=mse"},
      {"turbo4", "turbo:bits=4,variant=mse"},
      {"kvquant2", "kvquant:bits=2"},
      {"kvquant3", "kvquant:bits=3"},
      {"kvquant4", "kvquant:bits=4"},
      {"nsn2", "nsn:bits=1.75,dim=4"},
      {"nsn2.5", "nsn:bits=2.25,dim=4"},
      {"nsn3", "nsn:bits=2.75,dim=4"},
      {"nsn3.25", "nsn:bits=3,dim=2"},
  };
  return kAliases;
}

std::string ExpandAlias(const std::string& spec) {
  const auto& a = CodecAliases();
  auto it = a.find(spec);
  if (it != a.end()) return it->second;
  // "alias:key=value,...": the alias's expansion with these parameters added or overriding
  // (e.g. "turbo4:center=1" -> "turbo:bits=4,center=1,variant=mse").
  const size_t colon = spec.find(':');
  if (colon == std::string::npos) return spec;
  it = a.find(spec.substr(0, colon));
  if (it == a.end()) return spec;
  auto base = ParseSpec(it->second);
  auto extra = ParseSpec(spec.substr(0, colon) + spec.substr(colon));
  if (!base.ok() || !extra.ok()) return spec;
  for (const auto& [k, v] : extra->params) base->params[k] = v;
  return base->ToString();
}

StatusOr<std::unique_ptr<Codec>> MakeCodec(const std::string& text, const CodecContext& ctx) {
  auto spec = ParseSpec(ExpandAlias(text));
  if (!spec.ok()) return spec.status();
  for (const auto& c : RegisteredCodecs()) {
    if (c.name == spec->name) return c.factory(*spec, ctx);
  }
  // Codecs in registration order, then the aliases that are not also codec names.
  std::vector<std::string> names;
  for (const auto& c : RegisteredCodecs()) names.push_back(c.name);
  for (const auto& [k, v] : CodecAliases()) {
    if (std::find(names.begin(), names.end(), k) == names.end()) names.push_back(k);
  }
  return InvalidArgument(fmt::format("unknown cache type '{}' (known: {})", text,
                                     fmt::join(names, ", ")));
}

const std::vector<TransformInfo>& RegisteredTransforms() {
  static const std::vector<TransformInfo> kTransforms = {
      {"hadamard", "normalized Walsh-Hadamard rotation per head (power-of-2 dim), exact query fold: hadamard[:signs=1]", MakeHadamardTransform},
      {"lowrank", "Palu low-rank latent (calibrated eigenbasis, pre-RoPE keys): lowrank:file=F,ratio=0.5", MakeLowRankTransform},
      {"think", "ThinK key-channel pruning by query-key score: think:file=F,ratio=0.4 (pruned)", MakeThinkTransform},
      {"smooth", "static key smoothing (QServe SmoothAttention / MiKV balancer), exact query fold: smooth:file=F[,alpha=0.5][,stat=max|rms][,rot=1]", MakeSmoothTransform},
  };
  return kTransforms;
}

StatusOr<std::unique_ptr<Transform>> MakeTransform(const std::string& text, const CodecContext& ctx) {
  auto spec = ParseSpec(text);
  if (!spec.ok()) return spec.status();
  for (const auto& t : RegisteredTransforms()) {
    if (t.name == spec->name) return t.factory(*spec, ctx);
  }
  std::string known;
  for (const auto& t : RegisteredTransforms()) known += (known.empty() ? "" : ", ") + t.name;
  return InvalidArgument(fmt::format("unknown transform '{}' (known: {})", text, known));
}

}  // namespace kvc::kv
