// Calibration file: named f32 tensors + string metadata gathered on calibration text, for
// transforms/codecs that need statistics (Palu low-rank bases, ThinK channel scores; see
// docs/lowrank.md). Written by `kvcrunch calibrate`, read by `lowrank:file=...` / `think:file=...`.
//
// Format, version 1 (all integers little-endian):
//   offset 0   magic          8 bytes  "KVCCALIB"
//   offset 8   version        u32      = 1
//   offset 12  reserved       u32      = 0
//   offset 16  payload_bytes  u64      length of the payload that follows
//   offset 24  checksum       u64      FNV-1a 64 of the payload bytes
//   offset 32  payload:
//     n_meta   u32, then n_meta x { u32 len, key bytes, u32 len, value bytes }
//     n_tensor u32, then n_tensor x { u32 len, name bytes, u32 ndim (1..4), i64 dims[ndim],
//                                     f32 data[prod(dims)] }
// Required metadata: "model_id" (architecture, shapes, name and a hash of the first layer's K
// projection; see tools/cli/lib/calibrate.h), "kind" (what the tensors are).
// Writing goes to PATH.tmp.<pid> then rename(2), so a reader never sees a half-written file.
// Errors on read: NOT_FOUND (missing file), DATA_LOSS (bad magic, truncated, checksum mismatch,
// trailing bytes, malformed records), UNIMPLEMENTED (unknown version).
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "kvcrunch/status.h"

namespace kvc::kv {

struct CalibrationFile {
  static constexpr uint32_t kVersion = 1;
  struct Tensor {
    std::vector<int64_t> dims;  // outermost first
    std::vector<float> data;    // [prod(dims)] f32, row-major
  };
  std::map<std::string, std::string> meta;
  std::map<std::string, Tensor> tensors;

  const Tensor* Find(const std::string& name) const;
  // NOT_FOUND naming the tensor and the file's "source" when missing or of the wrong size.
  StatusOr<const Tensor*> Get(const std::string& name, int64_t n_elements) const;
  std::string MetaOr(const std::string& key, const std::string& dflt) const;
};

uint64_t Fnv1a64(const void* data, size_t n, uint64_t h = 0xcbf29ce484222325ull);

Status WriteCalibrationFile(const std::string& path, const CalibrationFile& f);
StatusOr<CalibrationFile> ReadCalibrationFile(const std::string& path);
// The same from the file's bytes (`path` only names it in messages; the fuzzer's entry point).
StatusOr<CalibrationFile> ParseCalibrationFile(const std::string& bytes, const std::string& path);
// Reads once per (path, size, mtime) and shares the result (transforms are built per layer/head).
StatusOr<std::shared_ptr<const CalibrationFile>> LoadCalibrationFileShared(const std::string& path);

}  // namespace kvc::kv
