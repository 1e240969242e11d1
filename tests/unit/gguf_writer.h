// Test-only GGUF writer: builds valid (and deliberately corrupted) GGUF v2/v3 files in memory.
//
//   kvc::gguf::testutil::GgufWriter w;
//   w.AddString("general.architecture", "llama").AddUint32("llama.block_count", 2)
//    .AddStringArray("tokenizer.ggml.tokens", {"a", "b"})
//    .AddTensorF32("output_norm.weight", {64}, weights)                // ne innermost first
//    .AddTensor("token_embd.weight", GgmlType::kQ8_0, {64, 100},
//               QuantizeQ8_0(embd));                                   // raw block bytes
//   std::vector<uint8_t> bytes = w.Build();   // or w.WriteFile(path)
//
// Layout written (little-endian): magic, version, n_tensors u64, n_kv u64, the key/values in the
// order added, the tensor infos in the order added, zero padding to the alignment, then each
// tensor's data at its aligned offset. The last tensor is NOT padded, so the file ends exactly at
// the end of the last tensor's data (every strict prefix of the file is then invalid).
//
// For corruption tests: AddRawKv (any type id and value bytes), AddRawTensor (any type id, dims,
// data, explicit offset), SetVersion, SetMagic, and the Layout filled by Build (byte offsets of
// every field that tests like to patch).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <optional>
#include <string>
#include <string_view>
#include <type_traits>
#include <vector>

#include "gguf/gguf.h"
#include "gguf/types.h"

namespace kvc::gguf::testutil {

// A tensor exactly as it will be written; nothing is checked.
struct RawTensor {
  std::string name;
  uint32_t type_id = 0;
  std::vector<uint64_t> ne;        // innermost first
  std::vector<uint8_t> data;       // raw bytes, written at `offset`
  std::optional<uint64_t> offset;  // relative to the data section; default: next aligned slot
};

// Byte offsets (from the file start) of the fields of the last Build().
struct GgufLayout {
  size_t n_tensors_offset = 8;
  size_t n_kv_offset = 16;
  std::vector<size_t> kv_offset;             // start of each key/value (its key length)
  std::vector<size_t> kv_type_offset;        // each value-type field
  std::vector<size_t> tensor_info_offset;    // start of each tensor info (its name length)
  std::vector<size_t> tensor_type_offset;    // each tensor's type field
  std::vector<size_t> tensor_offset_offset;  // each tensor's data-offset field
  size_t data_offset = 0;                    // start of the data section
  std::vector<uint64_t> tensor_data_offset;  // relative offset written for each tensor
};

class GgufWriter {
 public:
  GgufWriter& SetVersion(uint32_t version) {
    version_ = version;
    return *this;
  }
  GgufWriter& SetMagic(std::string_view magic4) {
    std::memcpy(magic_, magic4.data(), magic4.size() < 4 ? magic4.size() : 4);
    return *this;
  }
  // Emits general.alignment (uint32) and lays tensors out with it.
  GgufWriter& SetAlignment(uint32_t alignment) {
    alignment_ = alignment;
    return AddUint32("general.alignment", alignment);
  }
  // Zero bytes appended after the last tensor's data (default none).
  GgufWriter& SetTailPadding(size_t n) {
    tail_padding_ = n;
    return *this;
  }

  // --- metadata scalars ---
  GgufWriter& AddUint8(std::string_view k, uint8_t v) { return Scalar(k, MetaType::kUint8, v); }
  GgufWriter& AddInt8(std::string_view k, int8_t v) { return Scalar(k, MetaType::kInt8, v); }
  GgufWriter& AddUint16(std::string_view k, uint16_t v) { return Scalar(k, MetaType::kUint16, v); }
  GgufWriter& AddInt16(std::string_view k, int16_t v) { return Scalar(k, MetaType::kInt16, v); }
  GgufWriter& AddUint32(std::string_view k, uint32_t v) { return Scalar(k, MetaType::kUint32, v); }
  GgufWriter& AddInt32(std::string_view k, int32_t v) { return Scalar(k, MetaType::kInt32, v); }
  GgufWriter& AddUint64(std::string_view k, uint64_t v) { return Scalar(k, MetaType::kUint64, v); }
  GgufWriter& AddInt64(std::string_view k, int64_t v) { return Scalar(k, MetaType::kInt64, v); }
  GgufWriter& AddFloat32(std::string_view k, float v) { return Scalar(k, MetaType::kFloat32, v); }
  GgufWriter& AddFloat64(std::string_view k, double v) { return Scalar(k, MetaType::kFloat64, v); }
  GgufWriter& AddBool(std::string_view k, bool v) {
    return Scalar(k, MetaType::kBool, static_cast<uint8_t>(v ? 1 : 0));
  }
  GgufWriter& AddString(std::string_view k, std::string_view v) {
    std::vector<uint8_t> bytes;
    PutString(bytes, v);
    return AddRawKv(k, static_cast<uint32_t>(MetaType::kString), std::move(bytes));
  }

  // --- metadata arrays ---
  GgufWriter& AddStringArray(std::string_view k, const std::vector<std::string>& values) {
    std::vector<uint8_t> bytes;
    Put(bytes, static_cast<uint32_t>(MetaType::kString));
    Put(bytes, static_cast<uint64_t>(values.size()));
    for (const std::string& s : values) PutString(bytes, s);
    return AddRawKv(k, static_cast<uint32_t>(MetaType::kArray), std::move(bytes));
  }
  // T in {u/int8..64, float, double}; e.g. AddArray<int32_t>("tokenizer.ggml.token_type", types).
  template <typename T>
  GgufWriter& AddArray(std::string_view k, const std::vector<T>& values) {
    static_assert(!std::is_same_v<T, bool>, "use AddBoolArray");
    std::vector<uint8_t> bytes;
    Put(bytes, static_cast<uint32_t>(TypeOf<T>()));
    Put(bytes, static_cast<uint64_t>(values.size()));
    for (const T& v : values) Put(bytes, v);
    return AddRawKv(k, static_cast<uint32_t>(MetaType::kArray), std::move(bytes));
  }
  GgufWriter& AddBoolArray(std::string_view k, const std::vector<bool>& values) {
    std::vector<uint8_t> bytes;
    Put(bytes, static_cast<uint32_t>(MetaType::kBool));
    Put(bytes, static_cast<uint64_t>(values.size()));
    for (bool v : values) bytes.push_back(v ? 1 : 0);
    return AddRawKv(k, static_cast<uint32_t>(MetaType::kArray), std::move(bytes));
  }
  // Any type id followed by exactly `value_bytes` (for unknown types, bad lengths, ...).
  GgufWriter& AddRawKv(std::string_view k, uint32_t type_id, std::vector<uint8_t> value_bytes) {
    kvs_.push_back({std::string(k), type_id, std::move(value_bytes)});
    return *this;
  }

  // --- tensors ---
  // `data` must hold exactly the bytes of the type's blocks for `ne` (checked; aborts otherwise).
  GgufWriter& AddTensor(std::string_view name, GgmlType type, const std::vector<int64_t>& ne,
                        std::vector<uint8_t> data) {
    const TypeTraits* tt = GetTypeTraits(static_cast<uint32_t>(type));
    int64_t n = 1;
    for (int64_t d : ne) n *= d;
    if (tt == nullptr || ne.empty() || ne[0] % tt->block_elems != 0 ||
        data.size() != static_cast<size_t>(n / tt->block_elems) * tt->block_bytes) {
      std::fprintf(stderr, "GgufWriter::AddTensor('%s'): %zu data bytes do not match type/dims\n",
                   std::string(name).c_str(), data.size());
      std::abort();
    }
    RawTensor t;
    t.name = std::string(name);
    t.type_id = static_cast<uint32_t>(type);
    for (int64_t d : ne) t.ne.push_back(static_cast<uint64_t>(d));
    t.data = std::move(data);
    return AddRawTensor(std::move(t));
  }
  // values: [prod(ne)] f32, row-major with ne[0] the row length.
  GgufWriter& AddTensorF32(std::string_view name, const std::vector<int64_t>& ne,
                           const std::vector<float>& values) {
    std::vector<uint8_t> bytes(values.size() * sizeof(float));
    std::memcpy(bytes.data(), values.data(), bytes.size());
    return AddTensor(name, GgmlType::kF32, ne, std::move(bytes));
  }
  GgufWriter& AddTensorF16(std::string_view name, const std::vector<int64_t>& ne,
                           const std::vector<float>& values) {
    std::vector<uint8_t> bytes;
    for (float v : values) Put(bytes, Fp32ToFp16(v));
    return AddTensor(name, GgmlType::kF16, ne, std::move(bytes));
  }
  GgufWriter& AddRawTensor(RawTensor t) {
    tensors_.push_back(std::move(t));
    return *this;
  }

  std::vector<uint8_t> Build(GgufLayout* layout = nullptr) const {
    GgufLayout l;
    std::vector<uint8_t> out(magic_, magic_ + 4);
    Put(out, version_);
    Put(out, static_cast<uint64_t>(tensors_.size()));
    Put(out, static_cast<uint64_t>(kvs_.size()));
    for (const Kv& kv : kvs_) {
      l.kv_offset.push_back(out.size());
      PutString(out, kv.key);
      l.kv_type_offset.push_back(out.size());
      Put(out, kv.type_id);
      out.insert(out.end(), kv.value.begin(), kv.value.end());
    }
    const uint64_t align = alignment_ == 0 ? 1 : alignment_;
    uint64_t next = 0;
    for (const RawTensor& t : tensors_) {
      l.tensor_info_offset.push_back(out.size());
      PutString(out, t.name);
      Put(out, static_cast<uint32_t>(t.ne.size()));
      for (uint64_t d : t.ne) Put(out, d);
      l.tensor_type_offset.push_back(out.size());
      Put(out, t.type_id);
      l.tensor_offset_offset.push_back(out.size());
      const uint64_t off = t.offset.value_or(next);
      Put(out, off);
      l.tensor_data_offset.push_back(off);
      next = AlignUp(off + t.data.size(), align);
    }
    l.data_offset = static_cast<size_t>(AlignUp(out.size(), align));
    size_t end = l.data_offset;
    for (size_t i = 0; i < tensors_.size(); ++i) {
      end = std::max(end, l.data_offset + static_cast<size_t>(l.tensor_data_offset[i]) +
                              tensors_[i].data.size());
    }
    if (!tensors_.empty()) out.resize(end, 0);
    for (size_t i = 0; i < tensors_.size(); ++i) {
      const std::vector<uint8_t>& d = tensors_[i].data;
      std::copy(d.begin(), d.end(), out.begin() + l.data_offset + l.tensor_data_offset[i]);
    }
    out.resize(out.size() + tail_padding_, 0);
    if (layout != nullptr) *layout = std::move(l);
    return out;
  }

  // Returns false if the file cannot be written.
  bool WriteFile(const std::string& path) const {
    const std::vector<uint8_t> bytes = Build();
    std::ofstream f(path, std::ios::binary | std::ios::trunc);
    f.write(reinterpret_cast<const char*>(bytes.data()),
            static_cast<std::streamsize>(bytes.size()));
    return static_cast<bool>(f);
  }

 private:
  struct Kv {
    std::string key;
    uint32_t type_id;
    std::vector<uint8_t> value;
  };

  template <typename T>
  static constexpr MetaType TypeOf() {
    if constexpr (std::is_same_v<T, uint8_t>)
      return MetaType::kUint8;
    else if constexpr (std::is_same_v<T, int8_t>)
      return MetaType::kInt8;
    else if constexpr (std::is_same_v<T, uint16_t>)
      return MetaType::kUint16;
    else if constexpr (std::is_same_v<T, int16_t>)
      return MetaType::kInt16;
    else if constexpr (std::is_same_v<T, uint32_t>)
      return MetaType::kUint32;
    else if constexpr (std::is_same_v<T, int32_t>)
      return MetaType::kInt32;
    else if constexpr (std::is_same_v<T, uint64_t>)
      return MetaType::kUint64;
    else if constexpr (std::is_same_v<T, int64_t>)
      return MetaType::kInt64;
    else if constexpr (std::is_same_v<T, float>)
      return MetaType::kFloat32;
    else {
      static_assert(std::is_same_v<T, double>, "unsupported GGUF array element type");
      return MetaType::kFloat64;
    }
  }
  template <typename T>
  static void Put(std::vector<uint8_t>& out, T v) {
    uint8_t b[sizeof(T)];
    std::memcpy(b, &v, sizeof(T));
    out.insert(out.end(), b, b + sizeof(T));
  }
  static void PutString(std::vector<uint8_t>& out, std::string_view s) {
    Put(out, static_cast<uint64_t>(s.size()));
    out.insert(out.end(), s.begin(), s.end());
  }
  template <typename T>
  GgufWriter& Scalar(std::string_view k, MetaType type, T v) {
    std::vector<uint8_t> bytes;
    Put(bytes, v);
    return AddRawKv(k, static_cast<uint32_t>(type), std::move(bytes));
  }
  static uint64_t AlignUp(uint64_t x, uint64_t a) { return (x + a - 1) / a * a; }

  char magic_[4] = {'G', 'G', 'U', 'F'};
  uint32_t version_ = 3;
  uint32_t alignment_ = 32;
  size_t tail_padding_ = 0;
  std::vector<Kv> kvs_;
  std::vector<RawTensor> tensors_;
};

// --- quantizers for building test models (ggml's reference rounding) ---------------------------

// values: [n] f32, n a multiple of 32 -> n/32 BlockQ8_0 as bytes. d = amax/127, q = round(x/d).
inline std::vector<uint8_t> QuantizeQ8_0(const std::vector<float>& values) {
  std::vector<uint8_t> out(values.size() / kQK * sizeof(BlockQ8_0));
  for (size_t b = 0; b < values.size() / kQK; ++b) {
    const float* x = values.data() + b * kQK;
    float amax = 0;
    for (int j = 0; j < kQK; ++j) amax = std::max(amax, std::fabs(x[j]));
    const float d = amax / 127.0f;
    const float id = d != 0 ? 1.0f / d : 0.0f;
    BlockQ8_0 blk;
    blk.d = Fp32ToFp16(d);
    for (int j = 0; j < kQK; ++j) blk.qs[j] = static_cast<int8_t>(std::lround(x[j] * id));
    std::memcpy(out.data() + b * sizeof(blk), &blk, sizeof(blk));
  }
  return out;
}

// values: [n] f32, n a multiple of 32 -> n/32 BlockQ4_1. d = (max-min)/15, m = min.
inline std::vector<uint8_t> QuantizeQ4_1(const std::vector<float>& values) {
  std::vector<uint8_t> out(values.size() / kQK * sizeof(BlockQ4_1));
  for (size_t b = 0; b < values.size() / kQK; ++b) {
    const float* x = values.data() + b * kQK;
    float lo = x[0], hi = x[0];
    for (int j = 1; j < kQK; ++j) lo = std::min(lo, x[j]), hi = std::max(hi, x[j]);
    const float d = (hi - lo) / 15.0f;
    const float id = d != 0 ? 1.0f / d : 0.0f;
    BlockQ4_1 blk;
    blk.d = Fp32ToFp16(d);
    blk.m = Fp32ToFp16(lo);
    for (int j = 0; j < kQK / 2; ++j) {
      const int q0 = std::min(15, static_cast<int>((x[j] - lo) * id + 0.5f));
      const int q1 = std::min(15, static_cast<int>((x[j + kQK / 2] - lo) * id + 0.5f));
      blk.qs[j] = static_cast<uint8_t>(q0 | (q1 << 4));
    }
    std::memcpy(out.data() + b * sizeof(blk), &blk, sizeof(blk));
  }
  return out;
}

}  // namespace kvc::gguf::testutil
