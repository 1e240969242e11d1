#include "kv_config_file.h"

#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <sstream>

#include <fmt/format.h>

namespace kvc {

std::string KvShapeString(const kv::KvShape& s) {
  return fmt::format("n_layer={} n_head_kv={} head_dim={} head_dim_v={}", s.n_layer, s.n_head_kv,
                     s.head_dim, s.DimV());
}

namespace {

// The first non-finite or null number in j (its JSON pointer), or "" when there is none.
// nlohmann writes NaN/inf as null and cannot read NaN, so a null where a number belongs is the
// trace of one; we refuse nulls anywhere.
std::string FirstBadNumber(const nlohmann::json& j, const std::string& at) {
  if (j.is_null()) return at.empty() ? "/" : at;
  if (j.is_number_float() && !std::isfinite(j.get<double>())) return at;
  if (j.is_object()) {
    for (auto it = j.begin(); it != j.end(); ++it) {
      std::string r = FirstBadNumber(it.value(), at + "/" + it.key());
      if (!r.empty()) return r;
    }
  } else if (j.is_array()) {
    for (size_t i = 0; i < j.size(); ++i) {
      std::string r = FirstBadNumber(j[i], at + "/" + std::to_string(i));
      if (!r.empty()) return r;
    }
  }
  return "";
}

}  // namespace

StatusOr<KvConfigFile> ParseKvConfigJson(const std::string& text, const std::string& origin) {
  auto bad = [&](const std::string& why) {
    return InvalidArgument(fmt::format("KV config file '{}': {}", origin, why));
  };
  nlohmann::json j = nlohmann::json::parse(text, nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded()) return bad("not valid JSON");
  if (!j.is_object()) return bad("not a JSON object");
  if (j.value("format", std::string()) != "kvcrunch-kv-config") {
    return bad("\"format\" is not \"kvcrunch-kv-config\" (made by `kvcrunch calibrate --method bits`)");
  }
  if (!j.contains("version") || !j["version"].is_number_integer() || j["version"].get<int64_t>() != 1) {
    return bad("unsupported \"version\" (this build reads version 1)");
  }
  if (std::string p = FirstBadNumber(j, ""); !p.empty()) {
    return bad(fmt::format("null or non-finite number at {}", p));
  }
  KvConfigFile f;
  f.path = origin;
  if (!j.contains("config") || !j["config"].is_string() || j["config"].get<std::string>().empty()) {
    return bad("\"config\" (a --config string) missing or empty");
  }
  f.config = j["config"].get<std::string>();
  {
    std::istringstream in(f.config);
    std::string tok;
    while (in >> tok) {
      for (const char* k : {"preset=", "config=", "file="}) {
        if (tok.rfind(k, 0) == 0) return bad(fmt::format("\"config\" may not contain '{}'", k));
      }
    }
  }
  if (j.contains("name")) {
    if (!j["name"].is_string()) return bad("\"name\" is not a string");
    f.name = j["name"].get<std::string>();
    if (f.name.find_first_of(" \t\n") != std::string::npos) return bad("\"name\" has white space");
  }
  if (!j.contains("model") || !j["model"].is_object()) return bad("\"model\" (the shape it was made for) missing");
  const auto& m = j["model"];
  int* dst[] = {&f.shape.n_layer, &f.shape.n_head_kv, &f.shape.head_dim, &f.shape.head_dim_v};
  const char* keys[] = {"n_layer", "n_head_kv", "head_dim", "head_dim_v"};
  for (int i = 0; i < 4; ++i) {
    if (!m.contains(keys[i]) || !m[keys[i]].is_number_integer() || m[keys[i]].get<int64_t>() <= 0 ||
        m[keys[i]].get<int64_t>() > (1 << 20)) {
      return bad(fmt::format("\"model\".\"{}\" missing or not a positive integer", keys[i]));
    }
    *dst[i] = int(m[keys[i]].get<int64_t>());
  }
  if (!j.contains("all_in_bits") || !j["all_in_bits"].is_number() || j["all_in_bits"].get<double>() <= 0) {
    return bad("\"all_in_bits\" missing or not a positive number");
  }
  f.all_in_bits = j["all_in_bits"].get<double>();
  if (!j.contains("all_in_ctx") || !j["all_in_ctx"].is_number_integer() || j["all_in_ctx"].get<int64_t>() <= 0) {
    return bad("\"all_in_ctx\" missing or not a positive integer");
  }
  f.all_in_ctx = j["all_in_ctx"].get<int64_t>();
  f.json = std::move(j);
  return f;
}

StatusOr<KvConfigFile> ReadKvConfigFile(const std::string& path) {
  std::error_code ec;
  if (!std::filesystem::exists(path, ec)) return NotFound(fmt::format("KV config file '{}' not found", path));
  if (!std::filesystem::is_regular_file(path, ec)) {
    return InvalidArgument(fmt::format("KV config file '{}' is not a regular file", path));
  }
  const auto size = std::filesystem::file_size(path, ec);
  if (ec || size > (16u << 20)) return InvalidArgument(fmt::format("KV config file '{}' is larger than 16 MiB", path));
  std::ifstream in(path, std::ios::binary);
  if (!in) return NotFound(fmt::format("cannot open KV config file '{}'", path));
  std::stringstream ss;
  ss << in.rdbuf();
  return ParseKvConfigJson(ss.str(), path);
}

Status WriteKvConfigFile(const std::string& path, const nlohmann::json& j) {
  const std::string tmp = path + ".tmp";
  {
    std::ofstream out(tmp, std::ios::binary | std::ios::trunc);
    if (!out) return InvalidArgument(fmt::format("cannot write '{}'", tmp));
    out << j.dump(1) << "\n";
    if (!out) return InvalidArgument(fmt::format("cannot write '{}'", tmp));
  }
  std::error_code ec;
  std::filesystem::rename(tmp, path, ec);
  if (ec) return InvalidArgument(fmt::format("cannot rename '{}' to '{}': {}", tmp, path, ec.message()));
  return Status::Ok();
}

}  // namespace kvc
