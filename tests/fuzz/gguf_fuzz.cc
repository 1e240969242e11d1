// libFuzzer target for the GGUF reader: parse arbitrary bytes, and when they parse, touch every
// metadata value and dequantize the first and last row of every tensor. See README.md.
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include "gguf/gguf.h"
#include "gguf/types.h"

namespace {

void Require(bool ok, const char* what) {
  if (!ok) {
    std::fprintf(stderr, "gguf_fuzz invariant failed: %s\n", what);
    std::abort();
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace kvc::gguf;
  auto file_or = GgufFile::FromBuffer(data, size);
  if (!file_or.ok()) {
    Require(!file_or.status().message().empty(), "error without a message");
    return 0;
  }
  const GgufFile& f = **file_or;
  Require(f.version() == 2 || f.version() == 3, "version");

  size_t touched = 0;
  for (const auto& [key, v] : f.metadata()) {
    touched += key.size() + v.str_array.size() + v.num_array.size() + v.int_array.size();
    for (const std::string& s : v.str_array) touched += s.size();
    if (v.type == MetaType::kArray) {
      Require(v.int_array.empty() || v.int_array.size() == v.num_array.size(), "int/num arrays");
    }
    // Every getter must answer (value or status) without crashing.
    (void)f.GetString(key);
    (void)f.GetInt(key);
    (void)f.GetFloat(key);
    (void)f.GetBool(key);
    (void)f.GetIntOr(key, 0);
    Require(f.Find(key) == &v, "Find");
  }

  std::vector<float> row;  // [row length] f32 scratch
  for (const TensorInfo& t : f.tensors()) {
    Require(f.FindTensor(t.name) == &t, "FindTensor");
    const TypeTraits* traits = GetTypeTraits(t.type_id);
    Require(traits != nullptr && traits->supported, "unsupported type accepted");
    Require(t.data >= data && t.n_bytes <= size &&
                t.data - data <= static_cast<ptrdiff_t>(size - t.n_bytes),
            "tensor data outside the buffer");
    Require(t.RowLength() % traits->block_elems == 0, "row length vs block");
    const int64_t rows = t.NumRows();
    const size_t row_bytes =
        static_cast<size_t>(t.RowLength() / traits->block_elems) * traits->block_bytes;
    Require(static_cast<uint64_t>(rows) * row_bytes == t.n_bytes, "n_bytes = rows * row bytes");
    row.resize(static_cast<size_t>(t.RowLength()));
    DequantizeRow(t.type(), t.data, row.data(), t.RowLength());
    DequantizeRow(t.type(), t.data + (rows - 1) * row_bytes, row.data(), t.RowLength());
    touched += row.size();
  }
  return touched == 0 ? 0 : 0;
}
