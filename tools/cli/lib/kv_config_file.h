// KV configuration file: a complete KV configuration (a --config string) plus the model shape it
// was made for and how it was made. Written by `kvcrunch calibrate --method bits`; loaded by
// `--kv-config FILE` (generate, perplexity, bench, serve, ...) and `config=FILE` (or `file=FILE`)
// inside eval / retrieval --config strings, where later keys override it like preset=.
//
// Format (JSON object, version 1):
//   "format": "kvcrunch-kv-config", "version": 1
//   "config": "k=... v=... k@L=... sinks=1"     ParseRunConfig syntax; no preset=/config= inside
//   "name":   "bits-3.25"                       label in tables (optional)
//   "model":  {"n_layer", "n_head_kv", "head_dim", "head_dim_v": positive integers (required),
//              "id": ModelIdentity string, "path": GGUF path (provenance, optional)}
//   "all_in_bits": number > 0 (required): 16 · allocated KV bytes / f16 KV bytes at
//              "all_in_ctx" tokens (required, > 0), every sink, scale and norm counted
//   anything else ("search": budget, calibration text, candidates, sensitivities, predicted and
//   measured loss, allocation) is provenance; every number anywhere in the file must be finite.
// Errors: NOT_FOUND (missing), INVALID_ARGUMENT (not a regular file, > 16 MiB, malformed JSON,
// wrong format/version, missing or non-finite fields, a nested config=/preset=).
#pragma once

#include <string>

#include <nlohmann/json.hpp>

#include "kv/cache.h"
#include "kvcrunch/status.h"

namespace kvc {

struct KvConfigFile {
  std::string path;
  std::string config;          // ParseRunConfig string
  std::string name;            // may be empty
  kv::KvShape shape;           // n_layer, n_head_kv, head_dim, head_dim_v (others zero)
  double all_in_bits = 0;
  int64_t all_in_ctx = 0;
  nlohmann::json json;         // the whole file
};

// "n_layer=30 n_head_kv=3 head_dim=64 head_dim_v=64": what a file must match.
std::string KvShapeString(const kv::KvShape& s);

StatusOr<KvConfigFile> ParseKvConfigJson(const std::string& text, const std::string& origin);
StatusOr<KvConfigFile> ReadKvConfigFile(const std::string& path);
// Writes PATH.tmp then renames. INVALID_ARGUMENT when it cannot be written.
Status WriteKvConfigFile(const std::string& path, const nlohmann::json& j);

}  // namespace kvc
