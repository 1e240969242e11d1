// The codec and transform registries: one row per plug-in. Adding a codec = one file pair in
// src/kv/codecs/ + one row here.
#include <fmt/format.h>

#include "kv/codec.h"
#include "kv/codecs/plain.h"
#include "kv/codecs/q8_0.h"
#include "kv/transform.h"

namespace kvc::kv {

const std::vector<CodecInfo>& RegisteredCodecs() {
  static const std::vector<CodecInfo> kCodecs = {
      {"f32", "IEEE float32, 32 bits/value (reference)", {}, MakeF32Codec, false},
      {"f16", "IEEE float16, 16 bits/value (the baseline)", {}, MakeF16Codec, false},
      {"bf16", "bfloat16, 16 bits/value", {}, MakeBf16Codec, true},
      {"q8_0", "llama.cpp q8_0: int8 + fp16 scale per 32 values, 8.5 bits/value", {}, MakeQ8_0Codec, true},
  };
  return kCodecs;
}

const std::map<std::string, std::string>& CodecAliases() {
  static const std::map<std::string, std::string> kAliases = {
      {"fp16", "f16"},
      {"fp32", "f32"},
  };
  return kAliases;
}

std::string ExpandAlias(const std::string& spec) {
  const auto& a = CodecAliases();
  auto it = a.find(spec);
  return it == a.end() ? spec : it->second;
}

StatusOr<std::unique_ptr<Codec>> MakeCodec(const std::string& text, const CodecContext& ctx) {
  auto spec = ParseSpec(ExpandAlias(text));
  if (!spec.ok()) return spec.status();
  for (const auto& c : RegisteredCodecs()) {
    if (c.name == spec->name) return c.factory(*spec, ctx);
  }
  std::string known;
  for (const auto& c : RegisteredCodecs()) known += (known.empty() ? "" : ", ") + c.name;
  for (const auto& [k, v] : CodecAliases()) known += ", " + k;
  return InvalidArgument(fmt::format("unknown cache type '{}' (known: {})", text, known));
}

const std::vector<TransformInfo>& RegisteredTransforms() {
  static const std::vector<TransformInfo> kTransforms = {};
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
