// GGUF reader: mmaps a file and validates everything before any tensor byte is touched.
// Format: https://github.com/ggml-org/ggml/blob/master/docs/gguf.md (v2 and v3).
//
// Validation done by Open(): magic, version (2 or 3), tensor/kv counts against the file length,
// every string length, every metadata type id (and array element type / length), tensor name
// uniqueness, n_dims (1..4), dims > 0 with no overflow of the element count, the element count a
// multiple of the type's block size, general.alignment (a power of two), each tensor offset aligned
// and data_offset + offset + nbytes <= file size. Any failure is a DATA_LOSS (or UNIMPLEMENTED for an
// unknown tensor type) whose message names the field and its byte offset in the file.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <variant>
#include <vector>

#include "gguf/types.h"
#include "kvcrunch/status.h"

namespace kvc::gguf {

enum class MetaType : uint32_t {
  kUint8 = 0, kInt8 = 1, kUint16 = 2, kInt16 = 3, kUint32 = 4, kInt32 = 5, kFloat32 = 6,
  kBool = 7, kString = 8, kArray = 9, kUint64 = 10, kInt64 = 11, kFloat64 = 12,
};

// One metadata value. Arrays of strings keep their strings; numeric arrays are widened.
struct MetaValue {
  MetaType type = MetaType::kUint8;
  MetaType array_type = MetaType::kUint8;       // element type when type == kArray
  std::variant<uint64_t, int64_t, double, bool, std::string> scalar;  // non-array values
  std::vector<std::string> str_array;           // kArray of kString
  std::vector<double> num_array;                // kArray of numbers / bools (widened)
  std::vector<int64_t> int_array;               // kArray of integer types (exact)
};

struct TensorInfo {
  std::string name;
  uint32_t type_id = 0;            // GgmlType value
  std::vector<int64_t> ne;         // dims innermost first, as GGUF stores them (ne[0] = row length)
  uint64_t offset = 0;             // relative to the data section
  uint64_t n_bytes = 0;
  const uint8_t* data = nullptr;   // points into the mapping, valid while the GgufFile lives
  int64_t NumElements() const;
  int64_t RowLength() const { return ne.empty() ? 0 : ne[0]; }
  int64_t NumRows() const;         // product of ne[1..]
  GgmlType type() const { return static_cast<GgmlType>(type_id); }
};

class GgufFile {
 public:
  // Maps and validates `path`. Errors: NOT_FOUND (cannot open), DATA_LOSS (malformed; the message
  // names the field and byte offset), UNIMPLEMENTED (tensor of a type we do not read, naming it).
  static StatusOr<std::unique_ptr<GgufFile>> Open(const std::string& path);
  // Same validation over a caller-owned buffer (used by the fuzzer and tests); the buffer must
  // outlive the GgufFile.
  static StatusOr<std::unique_ptr<GgufFile>> FromBuffer(const uint8_t* data, size_t size);
  ~GgufFile();
  GgufFile(const GgufFile&) = delete;
  GgufFile& operator=(const GgufFile&) = delete;

  uint32_t version() const { return version_; }
  size_t file_size() const { return size_; }
  // The whole file as mapped [file_size()] (model fingerprints hash it).
  const uint8_t* file_bytes() const { return base_; }
  const std::map<std::string, MetaValue>& metadata() const { return meta_; }
  const std::vector<TensorInfo>& tensors() const { return tensors_; }

  // Drops the mapped pages from the resident set (madvise MADV_DONTNEED; the mapping stays valid
  // and pages fault back in from the file when read). Called after weights were repacked so the
  // process does not hold both copies. No-op for FromBuffer files.
  void ReleasePages() const;
  // The same for the whole pages inside one tensor's data (after that tensor was repacked).
  void ReleasePages(const TensorInfo& t) const;

  const MetaValue* Find(std::string_view key) const;
  const TensorInfo* FindTensor(std::string_view name) const;

  // Typed getters: NOT_FOUND if missing, INVALID_ARGUMENT naming the key if of another type.
  StatusOr<std::string> GetString(std::string_view key) const;
  StatusOr<int64_t> GetInt(std::string_view key) const;      // any integer type
  StatusOr<double> GetFloat(std::string_view key) const;     // float32/64 or integer
  StatusOr<bool> GetBool(std::string_view key) const;
  // Convenience with default when absent (still an error if present with a wrong type).
  StatusOr<int64_t> GetIntOr(std::string_view key, int64_t dflt) const;
  StatusOr<double> GetFloatOr(std::string_view key, double dflt) const;

 private:
  GgufFile() = default;
  Status Parse();

  const uint8_t* base_ = nullptr;
  size_t size_ = 0;
  bool owns_mapping_ = false;
  uint32_t version_ = 0;
  uint64_t alignment_ = 32;
  uint64_t data_offset_ = 0;
  std::map<std::string, MetaValue> meta_;
  std::vector<TensorInfo> tensors_;
  std::map<std::string, size_t, std::less<>> tensor_index_;
};

}  // namespace kvc::gguf
