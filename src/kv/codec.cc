#include "kv/codec.h"

#include <cstdlib>
#include <vector>

#include <fmt/format.h>

#include "cpu/ops.h"

namespace kvc::kv {

std::string CodecSpec::ToString() const {
  std::string s = name;
  bool first = true;
  for (const auto& [k, v] : params) {
    s += first ? ":" : ",";
    s += k + "=" + v;
    first = false;
  }
  return s;
}

StatusOr<CodecSpec> ParseSpec(const std::string& text) {
  CodecSpec spec;
  const size_t colon = text.find(':');
  spec.name = text.substr(0, colon);
  if (spec.name.empty()) return InvalidArgument(fmt::format("empty name in spec '{}'", text));
  if (colon == std::string::npos) return spec;
  std::string rest = text.substr(colon + 1);
  size_t start = 0;
  while (start <= rest.size()) {
    size_t comma = rest.find(',', start);
    if (comma == std::string::npos) comma = rest.size();
    const std::string kv = rest.substr(start, comma - start);
    if (!kv.empty()) {
      const size_t eq = kv.find('=');
      if (eq == std::string::npos || eq == 0 || eq + 1 == kv.size()) {
        return InvalidArgument(
            fmt::format("malformed parameter '{}' in spec '{}' (expected key=value)", kv, text));
      }
      const std::string key = kv.substr(0, eq);
      if (spec.params.count(key)) {
        return InvalidArgument(fmt::format("parameter '{}' given twice in '{}'", key, text));
      }
      spec.params[key] = kv.substr(eq + 1);
    }
    start = comma + 1;
  }
  return spec;
}

StatusOr<int> CodecSpec::GetInt(const std::string& key, int dflt) const {
  auto it = params.find(key);
  used_[key] = true;
  if (it == params.end()) return dflt;
  char* end = nullptr;
  const long v = std::strtol(it->second.c_str(), &end, 10);
  if (end == it->second.c_str() || *end != '\0' || v < -(1L << 30) || v > (1L << 30)) {
    return InvalidArgument(fmt::format("{}: parameter {}='{}' is not an integer", name, key, it->second));
  }
  return int(v);
}

StatusOr<double> CodecSpec::GetDouble(const std::string& key, double dflt) const {
  auto it = params.find(key);
  used_[key] = true;
  if (it == params.end()) return dflt;
  char* end = nullptr;
  const double v = std::strtod(it->second.c_str(), &end);
  if (end == it->second.c_str() || *end != '\0' || !(v == v)) {
    return InvalidArgument(fmt::format("{}: parameter {}='{}' is not a number", name, key, it->second));
  }
  return v;
}

StatusOr<bool> CodecSpec::GetBool(const std::string& key, bool dflt) const {
  auto it = params.find(key);
  used_[key] = true;
  if (it == params.end()) return dflt;
  const std::string& v = it->second;
  if (v == "1" || v == "true" || v == "on" || v == "yes") return true;
  if (v == "0" || v == "false" || v == "off" || v == "no") return false;
  return InvalidArgument(fmt::format("{}: parameter {}='{}' is not a boolean", name, key, v));
}

StatusOr<std::string> CodecSpec::GetString(const std::string& key, const std::string& dflt) const {
  auto it = params.find(key);
  used_[key] = true;
  if (it == params.end()) return dflt;
  return it->second;
}

Status CodecSpec::CheckAllUsed() const {
  std::string unknown;
  for (const auto& [k, v] : params) {
    if (!used_.count(k)) unknown += (unknown.empty() ? "" : ", ") + k;
  }
  if (!unknown.empty()) {
    return InvalidArgument(fmt::format("{}: unknown parameter(s) {}", name, unknown));
  }
  return Status::Ok();
}

void Codec::PrepareQuery(const float* q, int n_q, float* q_prepared) const {
  std::copy(q, q + size_t(n_q) * dim(), q_prepared);
}

void Codec::Score(const float* q_prepared, int n_q, const uint8_t* block, float* scores) const {
  const int bt = block_tokens(), d = dim();
  std::vector<float> x(size_t(bt) * d);
  Decode(block, x.data());
  for (int r = 0; r < n_q; ++r) {
    for (int t = 0; t < bt; ++t) {
      scores[size_t(r) * bt + t] = cpu::Dot(q_prepared + size_t(r) * d, &x[size_t(t) * d], d);
    }
  }
}

void Codec::AccumulateWeighted(const float* p, int n_q, const uint8_t* block, float* out) const {
  const int bt = block_tokens(), d = dim();
  std::vector<float> x(size_t(bt) * d);
  Decode(block, x.data());
  for (int r = 0; r < n_q; ++r) {
    for (int t = 0; t < bt; ++t) {
      const float w = p[size_t(r) * bt + t];
      if (w != 0.f) cpu::Axpy(w, &x[size_t(t) * d], d, out + size_t(r) * d);
    }
  }
}

void Codec::DecodeBlocks(const uint8_t* blocks, int64_t n_blocks, float* x) const {
  const size_t bb = BlockBytes();
  const size_t per_block = size_t(block_tokens()) * dim();
  for (int64_t b = 0; b < n_blocks; ++b) Decode(blocks + b * bb, x + b * per_block);
}

void Codec::ScoreBlocks(const float* qp, int n_q, const uint8_t* blocks, int64_t n_blocks,
                        float* scores, int64_t ld) const {
  const int bt = block_tokens();
  const size_t bb = BlockBytes();
  std::vector<float> tmp(size_t(n_q) * bt);
  for (int64_t b = 0; b < n_blocks; ++b) {
    Score(qp, n_q, blocks + b * bb, tmp.data());
    for (int r = 0; r < n_q; ++r) {
      std::copy(&tmp[size_t(r) * bt], &tmp[size_t(r) * bt] + bt, scores + r * ld + b * bt);
    }
  }
}

void Codec::AccumulateBlocks(const float* p, int64_t ld, int n_q, const uint8_t* blocks,
                             int64_t n_blocks, float* out) const {
  const int bt = block_tokens();
  const size_t bb = BlockBytes();
  std::vector<float> pb(size_t(n_q) * bt);
  for (int64_t b = 0; b < n_blocks; ++b) {
    bool any = false;
    for (int r = 0; r < n_q; ++r) {
      for (int t = 0; t < bt; ++t) {
        pb[size_t(r) * bt + t] = p[r * ld + b * bt + t];
        any = any || pb[size_t(r) * bt + t] != 0.f;
      }
    }
    if (any) AccumulateWeighted(pb.data(), n_q, blocks + b * bb, out);
  }
}

}  // namespace kvc::kv
