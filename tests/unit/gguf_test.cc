// GGUF reader: parsing, validation of corrupted files, dequantization and half/bf16 conversion.
#include "gguf/gguf.h"

#include <gtest/gtest.h>
#include <unistd.h>

#include <bit>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <limits>
#include <string>
#include <vector>

#include "gguf/types.h"
#include "gguf_writer.h"

namespace kvc::gguf {
namespace {

using ::kvc::gguf::testutil::GgufLayout;
using ::kvc::gguf::testutil::GgufWriter;
using ::kvc::gguf::testutil::RawTensor;

// gtest only (no gmock): substring check with a readable failure.
::testing::AssertionResult Contains(const std::string& text, const std::string& part) {
  if (text.find(part) != std::string::npos) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure() << "'" << text << "' does not contain '" << part << "'";
}

StatusOr<std::unique_ptr<GgufFile>> Parse(const std::vector<uint8_t>& bytes) {
  return GgufFile::FromBuffer(bytes.data(), bytes.size());
}

template <typename T>
void Patch(std::vector<uint8_t>& bytes, size_t offset, T value) {
  ASSERT_LE(offset + sizeof(T), bytes.size());
  std::memcpy(bytes.data() + offset, &value, sizeof(T));
}

std::vector<float> Iota(size_t n, float scale) {
  std::vector<float> v(n);
  for (size_t i = 0; i < n; ++i) v[i] = (static_cast<float>(i) - n / 2.0f) * scale;
  return v;
}

// A small file with a bit of everything: used by the round trip and the prefix tests.
GgufWriter SmallWriter() {
  GgufWriter w;
  w.AddString("general.architecture", "llama")
      .AddUint32("llama.block_count", 2)
      .AddFloat32("llama.attention.layer_norm_rms_epsilon", 1e-5f)
      .AddStringArray("tokenizer.ggml.tokens", {"<s>", "a", "", "\xc3\xa9"})
      .AddArray<int32_t>("tokenizer.ggml.token_type", {1, 2, 3, 1})
      .AddTensorF32("output_norm.weight", {8}, Iota(8, 0.5f))
      .AddTensor("token_embd.weight", GgmlType::kQ8_0, {32, 3},
                 testutil::QuantizeQ8_0(Iota(96, 0.01f)))
      .AddTensorF16("blk.0.attn_q.weight", {4, 2}, Iota(8, 0.25f));
  return w;
}

// ------------------------------------------------------------------------------------------------
// Parsing

TEST(GgufTest, RoundTripEveryMetadataType) {
  for (uint32_t version : {2u, 3u}) {
    GgufWriter w = SmallWriter();
    w.SetVersion(version)
        .AddUint8("u8", 200)
        .AddInt8("i8", -100)
        .AddUint16("u16", 60000)
        .AddInt16("i16", -30000)
        .AddUint32("u32", 4000000000u)
        .AddInt32("i32", -2000000000)
        .AddUint64("u64", 1ull << 63)
        .AddInt64("i64", -(1ll << 62))
        .AddFloat32("f32", 0.1f)
        .AddFloat64("f64", 0.1)
        .AddBool("yes", true)
        .AddBool("no", false)
        .AddString("empty", "")
        .AddArray<uint8_t>("a_u8", {1, 255})
        .AddArray<int8_t>("a_i8", {-1, 127})
        .AddArray<uint16_t>("a_u16", {65535})
        .AddArray<int16_t>("a_i16", {-32768})
        .AddArray<uint32_t>("a_u32", {})
        .AddArray<uint64_t>("a_u64", {1ull << 40})
        .AddArray<int64_t>("a_i64", {-5})
        .AddArray<float>("a_f32", {0.5f, -2.0f})
        .AddArray<double>("a_f64", {1e300})
        .AddBoolArray("a_bool", {true, false, true});
    const std::vector<uint8_t> bytes = w.Build();
    auto file_or = Parse(bytes);
    ASSERT_TRUE(file_or.ok()) << file_or.status().ToString();
    const GgufFile& f = **file_or;
    EXPECT_EQ(f.version(), version);
    EXPECT_EQ(f.file_size(), bytes.size());
    EXPECT_EQ(*f.GetString("general.architecture"), "llama");
    EXPECT_EQ(*f.GetInt("llama.block_count"), 2);
    EXPECT_FLOAT_EQ(*f.GetFloat("llama.attention.layer_norm_rms_epsilon"), 1e-5f);
    EXPECT_EQ(*f.GetInt("u8"), 200);
    EXPECT_EQ(*f.GetInt("i8"), -100);
    EXPECT_EQ(*f.GetInt("u16"), 60000);
    EXPECT_EQ(*f.GetInt("i16"), -30000);
    EXPECT_EQ(*f.GetInt("u32"), 4000000000ll);
    EXPECT_EQ(*f.GetInt("i32"), -2000000000);
    EXPECT_EQ(std::get<uint64_t>(f.Find("u64")->scalar), 1ull << 63);
    EXPECT_EQ(f.GetInt("u64").status().code(), StatusCode::kInvalidArgument);  // > INT64_MAX
    EXPECT_EQ(*f.GetInt("i64"), -(1ll << 62));
    EXPECT_EQ(*f.GetFloat("f32"), static_cast<double>(0.1f));
    EXPECT_EQ(*f.GetFloat("f64"), 0.1);
    EXPECT_EQ(*f.GetFloat("u32"), 4e9);
    EXPECT_TRUE(*f.GetBool("yes"));
    EXPECT_FALSE(*f.GetBool("no"));
    EXPECT_EQ(*f.GetString("empty"), "");

    const MetaValue* toks = f.Find("tokenizer.ggml.tokens");
    ASSERT_NE(toks, nullptr);
    EXPECT_EQ(toks->type, MetaType::kArray);
    EXPECT_EQ(toks->array_type, MetaType::kString);
    EXPECT_EQ(toks->str_array, (std::vector<std::string>{"<s>", "a", "", "\xc3\xa9"}));
    EXPECT_EQ(f.Find("tokenizer.ggml.token_type")->int_array, (std::vector<int64_t>{1, 2, 3, 1}));
    EXPECT_EQ(f.Find("a_u8")->int_array, (std::vector<int64_t>{1, 255}));
    EXPECT_EQ(f.Find("a_i8")->int_array, (std::vector<int64_t>{-1, 127}));
    EXPECT_EQ(f.Find("a_u16")->num_array, (std::vector<double>{65535}));
    EXPECT_EQ(f.Find("a_i16")->int_array, (std::vector<int64_t>{-32768}));
    EXPECT_TRUE(f.Find("a_u32")->int_array.empty());
    EXPECT_EQ(f.Find("a_u32")->array_type, MetaType::kUint32);
    EXPECT_EQ(f.Find("a_u64")->int_array, (std::vector<int64_t>{1ll << 40}));
    EXPECT_EQ(f.Find("a_i64")->int_array, (std::vector<int64_t>{-5}));
    EXPECT_EQ(f.Find("a_f32")->num_array, (std::vector<double>{0.5, -2.0}));
    EXPECT_TRUE(f.Find("a_f32")->int_array.empty());
    EXPECT_EQ(f.Find("a_f64")->num_array, (std::vector<double>{1e300}));
    EXPECT_EQ(f.Find("a_bool")->num_array, (std::vector<double>{1, 0, 1}));

    ASSERT_EQ(f.tensors().size(), 3u);
    const TensorInfo* norm = f.FindTensor("output_norm.weight");
    ASSERT_NE(norm, nullptr);
    EXPECT_EQ(norm->type(), GgmlType::kF32);
    EXPECT_EQ(norm->NumElements(), 8);
    EXPECT_EQ(norm->n_bytes, 32u);
    float row[32];  // f32 scratch
    DequantizeRow(norm->type(), norm->data, row, 8);
    EXPECT_EQ(std::vector<float>(row, row + 8), Iota(8, 0.5f));

    const TensorInfo* embd = f.FindTensor("token_embd.weight");
    ASSERT_NE(embd, nullptr);
    EXPECT_EQ(embd->ne, (std::vector<int64_t>{32, 3}));
    EXPECT_EQ(embd->RowLength(), 32);
    EXPECT_EQ(embd->NumRows(), 3);
    EXPECT_EQ(embd->n_bytes, 3 * sizeof(BlockQ8_0));
    EXPECT_EQ((embd->data - bytes.data()) % 32, 0);
    DequantizeRow(embd->type(), embd->data + 2 * sizeof(BlockQ8_0), row, 32);
    const std::vector<float> src = Iota(96, 0.01f);
    for (int i = 0; i < 32; ++i) EXPECT_NEAR(row[i], src[64 + i], 0.5f / 127 * 0.5f + 1e-3f);

    const TensorInfo* q = f.FindTensor("blk.0.attn_q.weight");
    ASSERT_NE(q, nullptr);
    DequantizeRow(q->type(), q->data, row, 8);
    EXPECT_EQ(std::vector<float>(row, row + 8), Iota(8, 0.25f));  // exact in fp16
    EXPECT_EQ(f.FindTensor("nope"), nullptr);
  }
}

TEST(GgufTest, GettersReportMissingAndWrongType) {
  const std::vector<uint8_t> bytes = SmallWriter().Build();
  auto f = Parse(bytes);
  ASSERT_TRUE(f.ok());
  EXPECT_EQ((*f)->GetString("missing").status().code(), StatusCode::kNotFound);
  const Status wrong = (*f)->GetInt("general.architecture").status();
  EXPECT_EQ(wrong.code(), StatusCode::kInvalidArgument);
  EXPECT_TRUE(Contains(wrong.message(), "general.architecture"));
  EXPECT_EQ((*f)->GetString("llama.block_count").status().code(), StatusCode::kInvalidArgument);
  EXPECT_EQ((*f)->GetBool("llama.block_count").status().code(), StatusCode::kInvalidArgument);
  EXPECT_EQ((*f)->GetFloat("tokenizer.ggml.tokens").status().code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(*(*f)->GetIntOr("llama.context_length", 2048), 2048);
  EXPECT_EQ(*(*f)->GetIntOr("llama.block_count", 7), 2);
  EXPECT_EQ((*f)->GetIntOr("general.architecture", 7).status().code(),
            StatusCode::kInvalidArgument);
  EXPECT_EQ(*(*f)->GetFloatOr("llama.rope.freq_base", 10000.0), 10000.0);
}

TEST(GgufTest, EveryPrefixIsAnError) {
  for (uint32_t alignment : {32u, 1u, 64u}) {
    GgufWriter w = SmallWriter();
    if (alignment != 32) w.SetAlignment(alignment);
    const std::vector<uint8_t> bytes = w.Build();
    ASSERT_TRUE(Parse(bytes).ok());
    for (size_t n = 0; n < bytes.size(); ++n) {
      // A heap copy of exactly n bytes, so ASan catches any read past the end.
      std::vector<uint8_t> prefix(bytes.begin(), bytes.begin() + n);
      auto f = Parse(prefix);
      ASSERT_FALSE(f.ok()) << "prefix of " << n << " bytes parsed (alignment " << alignment << ")";
      EXPECT_EQ(f.status().code(), StatusCode::kDataLoss) << f.status().ToString();
      EXPECT_TRUE(Contains(f.status().message(), "offset")) << f.status().ToString();
    }
  }
}

TEST(GgufTest, BadMagic) {
  std::vector<uint8_t> bytes = SmallWriter().SetMagic("GGML").Build();
  auto f = Parse(bytes);
  EXPECT_EQ(f.status().code(), StatusCode::kDataLoss);
  EXPECT_TRUE(Contains(f.status().message(), "bad magic at offset 0"));
  EXPECT_EQ(Parse({}).status().code(), StatusCode::kDataLoss);
}

TEST(GgufTest, BadVersion) {
  for (uint32_t v : {0u, 1u, 4u, 0x03000000u}) {
    auto f = Parse(SmallWriter().SetVersion(v).Build());
    EXPECT_EQ(f.status().code(), StatusCode::kDataLoss);
    EXPECT_TRUE(Contains(f.status().message(), "version " + std::to_string(v) + " at offset 4"));
  }
  EXPECT_TRUE(Contains(Parse(SmallWriter().SetVersion(0x03000000u).Build()).status().message(),
                       "big-endian"));
}

TEST(GgufTest, MisalignedTensorOffset) {
  GgufWriter w;
  w.AddRawTensor({"a", 0, {8}, std::vector<uint8_t>(32), 0});
  w.AddRawTensor({"b", 0, {8}, std::vector<uint8_t>(32), 36});
  auto f = Parse(w.Build());
  EXPECT_EQ(f.status().code(), StatusCode::kDataLoss);
  EXPECT_TRUE(Contains(f.status().message(),
                       "tensor 'b' (#1): data offset 36 is not a multiple of the alignment 32"));
}

TEST(GgufTest, TensorPastEndOfFile) {
  GgufWriter w;
  w.AddTensorF32("x", {8}, Iota(8, 1));
  GgufLayout layout;
  std::vector<uint8_t> bytes = w.Build(&layout);
  Patch<uint64_t>(bytes, layout.tensor_offset_offset[0], 32);
  auto f = Parse(bytes);
  EXPECT_EQ(f.status().code(), StatusCode::kDataLoss);
  EXPECT_TRUE(Contains(f.status().message(),
                       "tensor 'x' (#0): data [offset " + std::to_string(layout.data_offset) +
                           "+32, 32 bytes] exceeds file size " + std::to_string(bytes.size())));
  // An offset that overflows when added to the data section start.
  Patch<uint64_t>(bytes, layout.tensor_offset_offset[0], ~uint64_t{31});
  EXPECT_TRUE(Contains(Parse(bytes).status().message(), "exceeds file size"));
}

TEST(GgufTest, DuplicateNames) {
  GgufWriter w;
  w.AddTensorF32("x", {8}, Iota(8, 1)).AddTensorF32("x", {8}, Iota(8, 1));
  auto f = Parse(w.Build());
  EXPECT_EQ(f.status().code(), StatusCode::kDataLoss);
  EXPECT_TRUE(Contains(f.status().message(), "tensor 'x' (#1)"));
  EXPECT_TRUE(Contains(f.status().message(), "duplicate tensor name (also tensor #0)"));

  GgufWriter kv;
  kv.AddUint32("k", 1).AddUint32("k", 2);
  auto g = Parse(kv.Build());
  EXPECT_EQ(g.status().code(), StatusCode::kDataLoss);
  EXPECT_TRUE(Contains(g.status().message(), "metadata key #1 'k' at offset 41: duplicate key"));
}

TEST(GgufTest, BadDims) {
  struct Case {
    std::vector<uint64_t> ne;
    const char* message;
  };
  const Case cases[] = {
      {{1ull << 32, 1ull << 32}, "overflows the element count"},
      {{8, 1ull << 62, 4}, "overflows the element count"},
      {{8, 0}, "ne[1] at offset"},
      {{1ull << 63}, "expected 1..2^63-1"},
      {{}, "n_dims 0"},
      {{8, 1, 1, 1, 1}, "n_dims 5"},
  };
  for (const Case& c : cases) {
    GgufWriter w;
    w.AddRawTensor({"t", 0, c.ne, std::vector<uint8_t>(32), std::nullopt});
    auto f = Parse(w.Build());
    EXPECT_EQ(f.status().code(), StatusCode::kDataLoss);
    EXPECT_TRUE(Contains(f.status().message(), c.message));
    EXPECT_TRUE(Contains(f.status().message(), "tensor 't' (#0) at offset 24"));
  }
  // Element count fine but byte count overflows: 2^62 f32 elements are 2^64 bytes.
  GgufWriter w;
  w.AddRawTensor({"big", 0, {1ull << 31, 1ull << 31}, {}, std::nullopt});
  EXPECT_TRUE(Contains(Parse(w.Build()).status().message(), "overflows 64 bits"));
  // Row length not a multiple of the block size.
  GgufWriter r;
  r.AddRawTensor({"q", 8, {31, 2}, std::vector<uint8_t>(68), std::nullopt});
  EXPECT_TRUE(Contains(Parse(r.Build()).status().message(),
                       "row length ne[0] = 31 is not a multiple of the Q8_0 block size 32"));
}

TEST(GgufTest, UnsupportedTensorType) {
  GgufWriter w;
  w.AddTensorF32("ok", {8}, Iota(8, 1));
  w.AddRawTensor({"x", 16, {256}, std::vector<uint8_t>(66), std::nullopt});
  auto f = Parse(w.Build());
  EXPECT_EQ(f.status().code(), StatusCode::kUnimplemented);
  EXPECT_TRUE(Contains(f.status().message(), "tensor 'x' (#1) has type IQ2_XXS (16) (at offset"));
  EXPECT_TRUE(Contains(f.status().message(),
                       "which kvcrunch does not read; supported: F32, F16, BF16, Q4_0, Q4_1, "
                       "Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K"));
  GgufWriter u;
  u.AddRawTensor({"y", 4242, {8}, std::vector<uint8_t>(32), std::nullopt});
  auto g = Parse(u.Build());
  EXPECT_EQ(g.status().code(), StatusCode::kUnimplemented);
  EXPECT_TRUE(Contains(g.status().message(), "unknown type id 4242"));
}

TEST(GgufTest, BadMetadata) {
  GgufLayout layout;
  GgufWriter w;
  w.AddUint32("a", 1).AddRawKv("llama.block_count", 42, {0, 0, 0, 0});
  auto f = Parse(w.Build(&layout));
  EXPECT_EQ(f.status().code(), StatusCode::kDataLoss);
  EXPECT_TRUE(Contains(f.status().message(), "metadata key #1 'llama.block_count' at offset " +
                                                 std::to_string(layout.kv_offset[1]) +
                                                 ": unknown value type 42"));

  // Bool other than 0/1.
  GgufWriter b;
  b.AddRawKv("flag", static_cast<uint32_t>(MetaType::kBool), {2});
  EXPECT_TRUE(Contains(Parse(b.Build()).status().message(), "expected 0 or 1"));

  // Unknown and nested array element types.
  GgufWriter a;
  a.AddRawKv("arr", static_cast<uint32_t>(MetaType::kArray), {13, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0});
  EXPECT_TRUE(Contains(Parse(a.Build()).status().message(), "unknown array element type 13"));
  GgufWriter n;
  n.AddRawKv("arr", static_cast<uint32_t>(MetaType::kArray), {9, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0});
  EXPECT_EQ(Parse(n.Build()).status().code(), StatusCode::kUnimplemented);

  // general.alignment not a power of two / wrong type.
  EXPECT_TRUE(Contains(Parse(GgufWriter().SetAlignment(24).Build()).status().message(),
                       "'general.alignment' is 24"));
  EXPECT_TRUE(Contains(Parse(GgufWriter().SetAlignment(0).Build()).status().message(),
                       "'general.alignment' is 0"));
  EXPECT_TRUE(
      Contains(Parse(GgufWriter().AddString("general.alignment", "32").Build()).status().message(),
               "expected uint32"));
}

TEST(GgufTest, HugeCountsAreRejectedWithoutAllocating) {
  GgufLayout layout;
  const std::vector<uint8_t> good = SmallWriter().Build(&layout);
  {
    std::vector<uint8_t> bytes = good;
    Patch<uint64_t>(bytes, layout.n_tensors_offset, 1ull << 62);
    EXPECT_TRUE(Contains(Parse(bytes).status().message(), "cannot fit in the remaining"));
  }
  {
    std::vector<uint8_t> bytes = good;
    Patch<uint64_t>(bytes, layout.n_kv_offset, ~uint64_t{0});
    EXPECT_TRUE(Contains(Parse(bytes).status().message(), "cannot fit in the remaining"));
  }
  {  // String length of the first key.
    std::vector<uint8_t> bytes = good;
    Patch<uint64_t>(bytes, layout.kv_offset[0], ~uint64_t{0});
    auto f = Parse(bytes);
    EXPECT_EQ(f.status().code(), StatusCode::kDataLoss);
    EXPECT_TRUE(Contains(f.status().message(), "key at offset 24 has length"));
  }
  {  // Array length of tokenizer.ggml.tokens (kv #3): after key, type, element type.
    std::vector<uint8_t> bytes = good;
    const size_t len_at = layout.kv_type_offset[3] + 4 + 4;
    Patch<uint64_t>(bytes, len_at, 1ull << 60);
    auto f = Parse(bytes);
    EXPECT_TRUE(Contains(f.status().message(), "'tokenizer.ggml.tokens' at offset " +
                                                   std::to_string(layout.kv_offset[3]) +
                                                   ": array length 1152921504606846976 at offset " +
                                                   std::to_string(len_at)));
  }
}

TEST(GgufTest, OpenMapsFile) {
  const std::string path = (std::filesystem::temp_directory_path() /
                            ("kvc_gguf_test_" + std::to_string(getpid()) + ".gguf"))
                               .string();
  ASSERT_TRUE(SmallWriter().WriteFile(path));
  {
    auto f = GgufFile::Open(path);
    ASSERT_TRUE(f.ok()) << f.status().ToString();
    EXPECT_EQ((*f)->tensors().size(), 3u);
    EXPECT_EQ(*(*f)->GetString("general.architecture"), "llama");
  }
  std::filesystem::resize_file(path, 100);
  auto t = GgufFile::Open(path);
  EXPECT_EQ(t.status().code(), StatusCode::kDataLoss);
  EXPECT_TRUE(Contains(t.status().message(), path + ": "));
  std::filesystem::remove(path);
  EXPECT_EQ(GgufFile::Open(path).status().code(), StatusCode::kNotFound);
  EXPECT_EQ(GgufFile::Open(std::filesystem::temp_directory_path().string()).status().code(),
            StatusCode::kNotFound);
}

// ------------------------------------------------------------------------------------------------
// Dequantization against blocks built by hand. Expected values come from the format definitions,
// written element by element (not in the loop order of the dequantizers).

constexpr uint16_t kHalfOne = 0x3C00, kHalfHalf = 0x3800, kHalfQuarter = 0x3400;
constexpr uint16_t kHalfMinusOne = 0xBC00, kHalfEighth = 0x3000;

template <typename Block>
std::vector<float> Dequant(GgmlType type, const Block& block, int n) {
  std::vector<float> out(n);  // [n] f32
  DequantizeRow(type, &block, out.data(), n);
  return out;
}

TEST(DequantTest, Q4_0) {
  BlockQ4_0 b{};
  b.d = kHalfHalf;  // 0.5
  for (int j = 0; j < 16; ++j) b.qs[j] = static_cast<uint8_t>(j | ((15 - j) << 4));
  const std::vector<float> y = Dequant(GgmlType::kQ4_0, b, 32);
  for (int j = 0; j < 16; ++j) {
    EXPECT_EQ(y[j], 0.5f * (j - 8)) << j;            // low nibble: element j
    EXPECT_EQ(y[16 + j], 0.5f * (15 - j - 8)) << j;  // high nibble: element 16 + j
  }
  EXPECT_EQ(y[0], -4.0f);
  EXPECT_EQ(y[16], 3.5f);
}

TEST(DequantTest, Q4_1) {
  BlockQ4_1 b{};
  b.d = kHalfQuarter;   // 0.25
  b.m = kHalfMinusOne;  // -1
  for (int j = 0; j < 16; ++j) b.qs[j] = static_cast<uint8_t>(((j * 7) & 15) | (j << 4));
  const std::vector<float> y = Dequant(GgmlType::kQ4_1, b, 32);
  for (int j = 0; j < 16; ++j) {
    EXPECT_EQ(y[j], 0.25f * ((j * 7) & 15) - 1.0f);  // x = d*q + m
    EXPECT_EQ(y[16 + j], 0.25f * j - 1.0f);
  }
  EXPECT_EQ(y[31], 2.75f);
}

TEST(DequantTest, Q5_0AndQ5_1) {
  const uint32_t qh = 0xA5C3F00Fu;  // bit i = fifth bit of element i
  uint8_t qs[16];
  for (int j = 0; j < 16; ++j) qs[j] = static_cast<uint8_t>((j * 5 + 3) & 15) | ((j & 15) << 4);
  auto nibble = [&](int i) { return i < 16 ? (qs[i] & 15) : (qs[i - 16] >> 4); };

  BlockQ5_0 b0{};
  b0.d = kHalfHalf;
  std::memcpy(b0.qh, &qh, 4);
  std::memcpy(b0.qs, qs, 16);
  const std::vector<float> y0 = Dequant(GgmlType::kQ5_0, b0, 32);
  for (int i = 0; i < 32; ++i) {
    const int q = nibble(i) | static_cast<int>(((qh >> i) & 1) << 4);
    EXPECT_EQ(y0[i], 0.5f * (q - 16)) << i;  // x = d*(q - 16)
  }
  EXPECT_EQ(y0[0], 0.5f * ((3 | 16) - 16));  // qh bit 0 set
  EXPECT_EQ(y0[4], 0.5f * (7 - 16));         // qh bit 4 clear

  BlockQ5_1 b1{};
  b1.d = kHalfQuarter;
  b1.m = kHalfMinusOne;
  std::memcpy(b1.qh, &qh, 4);
  std::memcpy(b1.qs, qs, 16);
  const std::vector<float> y1 = Dequant(GgmlType::kQ5_1, b1, 32);
  for (int i = 0; i < 32; ++i) {
    const int q = nibble(i) | static_cast<int>(((qh >> i) & 1) << 4);
    EXPECT_EQ(y1[i], 0.25f * q - 1.0f) << i;  // x = d*q + m
  }
  EXPECT_EQ(y1[31], 0.25f * (15 | 16) - 1.0f);  // qh bit 31 set, nibble 15
}

TEST(DequantTest, Q8_0) {
  BlockQ8_0 b[2]{};
  b[0].d = kHalfEighth;  // 0.125
  b[1].d = Fp32ToFp16(-3.0f);
  for (int j = 0; j < 32; ++j) b[0].qs[j] = static_cast<int8_t>(j * 8 - 128);
  for (int j = 0; j < 32; ++j) b[1].qs[j] = static_cast<int8_t>(127 - j);
  std::vector<float> y(64);
  DequantizeRow(GgmlType::kQ8_0, b, y.data(), 64);
  for (int j = 0; j < 32; ++j) {
    EXPECT_EQ(y[j], 0.125f * (j * 8 - 128));
    EXPECT_EQ(y[32 + j], -3.0f * (127 - j));
  }
  EXPECT_EQ(y[0], -16.0f);
  EXPECT_EQ(y[32], -381.0f);
}

// Packs eight 6-bit scales and mins into the 12-byte Q4_K / Q5_K layout.
void PackScalesK4(const int sc[8], const int mn[8], uint8_t out[12]) {
  for (int j = 0; j < 4; ++j) {
    out[j] = static_cast<uint8_t>((sc[j] & 63) | ((sc[j + 4] >> 4) << 6));
    out[j + 4] = static_cast<uint8_t>((mn[j] & 63) | ((mn[j + 4] >> 4) << 6));
    out[j + 8] = static_cast<uint8_t>((sc[j + 4] & 15) | ((mn[j + 4] & 15) << 4));
  }
}

constexpr int kScales[8] = {1, 17, 33, 63, 5, 48, 60, 31};
constexpr int kMins[8] = {2, 40, 9, 63, 62, 16, 33, 7};

TEST(DequantTest, Q4_KScaleUnpackingOnKnownBytes) {
  // All scale bytes 0xFF: every scale and min is 63. q = 1 everywhere: x = d*63 - dmin*63.
  BlockQ4_K b{};
  b.d = kHalfOne;
  b.dmin = kHalfHalf;
  std::memset(b.scales, 0xFF, 12);
  std::memset(b.qs, 0x11, sizeof(b.qs));
  for (float v : Dequant(GgmlType::kQ4_K, b, 256)) EXPECT_EQ(v, 63.0f - 31.5f);
  // Only byte 8 set (0x21): sub-block 4 gets scale 1 and min 2; all others are 0.
  std::memset(b.scales, 0, 12);
  b.scales[8] = 0x21;
  const std::vector<float> y = Dequant(GgmlType::kQ4_K, b, 256);
  for (int i = 0; i < 256; ++i) EXPECT_EQ(y[i], i / 32 == 4 ? 1.0f - 1.0f : 0.0f) << i;
  std::memset(b.qs, 0x33, sizeof(b.qs));  // q = 3
  EXPECT_EQ(Dequant(GgmlType::kQ4_K, b, 256)[128], 3.0f - 1.0f);
}

TEST(DequantTest, Q4_K) {
  BlockQ4_K b{};
  b.d = kHalfQuarter;
  b.dmin = kHalfEighth;
  PackScalesK4(kScales, kMins, b.scales);
  for (int i = 0; i < 128; ++i) b.qs[i] = static_cast<uint8_t>((i % 16) | ((15 - i % 13) << 4));
  const std::vector<float> y = Dequant(GgmlType::kQ4_K, b, 256);
  // Element i: sub-block s = i/32; 64-element chunk c = i/64 uses qs[32c .. 32c+31], the low
  // nibbles for its first 32 elements (even s) and the high nibbles for the next 32 (odd s).
  for (int i = 0; i < 256; ++i) {
    const int s = i / 32, l = i % 32;
    const uint8_t byte = b.qs[32 * (s / 2) + l];
    const int q = (s % 2 == 0) ? (byte & 15) : (byte >> 4);
    EXPECT_EQ(y[i], (0.25f * kScales[s]) * q - 0.125f * kMins[s]) << i;
  }
  EXPECT_EQ(y[255], (0.25f * 31) * (15 - 127 % 13) - 0.125f * 7);
}

TEST(DequantTest, Q5_K) {
  BlockQ5_K b{};
  b.d = kHalfHalf;
  b.dmin = kHalfQuarter;
  PackScalesK4(kScales, kMins, b.scales);
  for (int i = 0; i < 128; ++i) b.qs[i] = static_cast<uint8_t>((i * 3) & 0xFF);
  for (int i = 0; i < 32; ++i) b.qh[i] = static_cast<uint8_t>(0x5A ^ (i * 37));
  const std::vector<float> y = Dequant(GgmlType::kQ5_K, b, 256);
  // As Q4_K, plus a fifth bit: sub-block s takes bit s of qh[l].
  for (int i = 0; i < 256; ++i) {
    const int s = i / 32, l = i % 32;
    const uint8_t byte = b.qs[32 * (s / 2) + l];
    const int q = ((s % 2 == 0) ? (byte & 15) : (byte >> 4)) | (((b.qh[l] >> s) & 1) << 4);
    EXPECT_EQ(y[i], (0.5f * kScales[s]) * q - 0.25f * kMins[s]) << i;
  }
}

TEST(DequantTest, Q6_K) {
  BlockQ6_K b{};
  b.d = kHalfEighth;
  for (int i = 0; i < 128; ++i) b.ql[i] = static_cast<uint8_t>((i * 11 + 5) & 0xFF);
  for (int i = 0; i < 64; ++i) b.qh[i] = static_cast<uint8_t>((i * 53 + 1) & 0xFF);
  for (int i = 0; i < 16; ++i) b.scales[i] = static_cast<int8_t>(i * 17 - 128);
  const std::vector<float> y = Dequant(GgmlType::kQ6_K, b, 256);
  // Element i: half h = i/128; quarter k = (i%128)/32; l = i%32. Low 4 bits: ql[64h + l] (k=0),
  // ql[64h + 32 + l] (k=1), their high nibbles for k=2,3. High 2 bits: qh[32h + l] bits 2k..2k+1.
  // Scale: scales[i/16] (one int8 per 16 elements). x = d * scale * (q - 32).
  for (int i = 0; i < 256; ++i) {
    const int h = i / 128, k = (i % 128) / 32, l = i % 32;
    const uint8_t lo_byte = b.ql[64 * h + 32 * (k % 2) + l];
    const int lo = k < 2 ? (lo_byte & 15) : (lo_byte >> 4);
    const int hi = (b.qh[32 * h + l] >> (2 * k)) & 3;
    const int q = (lo | (hi << 4)) - 32;
    EXPECT_EQ(y[i], 0.125f * b.scales[i / 16] * q) << i;
  }
  EXPECT_EQ(y[0], 0.125f * -128 * ((5 | (1 << 4)) - 32));
}

TEST(DequantTest, UnalignedSource) {
  BlockQ6_K b{};
  b.d = kHalfEighth;
  for (int i = 0; i < 16; ++i) b.scales[i] = static_cast<int8_t>(i + 1);
  for (int i = 0; i < 128; ++i) b.ql[i] = static_cast<uint8_t>(i);
  std::vector<uint8_t> buf(sizeof(b) + 1);  // [1 + 210] bytes: the block at an odd address
  std::memcpy(buf.data() + 1, &b, sizeof(b));
  std::vector<float> y(256);
  DequantizeRow(GgmlType::kQ6_K, buf.data() + 1, y.data(), 256);
  EXPECT_EQ(y, Dequant(GgmlType::kQ6_K, b, 256));
}

TEST(DequantTest, FloatTypes) {
  const float f32[4] = {1.5f, -0.0f, 1e-40f, 3.0e38f};
  float out[4];
  DequantizeRow(GgmlType::kF32, f32, out, 4);
  EXPECT_EQ(std::memcmp(out, f32, sizeof(out)), 0);
  const uint16_t f16[3] = {0x3C00, 0xC100, 0x0001};
  DequantizeRow(GgmlType::kF16, f16, out, 3);
  EXPECT_EQ(out[0], 1.0f);
  EXPECT_EQ(out[1], -2.5f);
  EXPECT_EQ(out[2], std::ldexp(1.0f, -24));
  const uint16_t bf16[2] = {0x3FC0, 0xC2F7};
  DequantizeRow(GgmlType::kBF16, bf16, out, 2);
  EXPECT_EQ(out[0], 1.5f);
  EXPECT_EQ(out[1], -123.5f);
}

TEST(TypesTest, Traits) {
  EXPECT_EQ(GetTypeTraits(8)->block_bytes, 34u);
  EXPECT_EQ(GetTypeTraits(14)->block_bytes, 210u);
  EXPECT_EQ(GetTypeTraits(30)->block_elems, 1);
  EXPECT_FALSE(GetTypeTraits(16)->supported);
  EXPECT_EQ(GetTypeTraits(4), nullptr);
  EXPECT_EQ(GetTypeTraits(1000), nullptr);
  EXPECT_EQ(TypeName(3), "Q4_1");
  EXPECT_EQ(TypeName(77), "unknown type 77");
}

// ------------------------------------------------------------------------------------------------
// Half and bfloat16.

uint32_t Bits(float f) { return std::bit_cast<uint32_t>(f); }
float FromBits(uint32_t u) { return std::bit_cast<float>(u); }

TEST(Fp16Test, ToFp32) {
  EXPECT_EQ(Fp16ToFp32(0x3C00), 1.0f);
  EXPECT_EQ(Fp16ToFp32(0xC000), -2.0f);
  EXPECT_EQ(Fp16ToFp32(0x7BFF), 65504.0f);
  EXPECT_EQ(Fp16ToFp32(0x0400), std::ldexp(1.0f, -14));     // smallest normal
  EXPECT_EQ(Fp16ToFp32(0x0001), std::ldexp(1.0f, -24));     // smallest subnormal
  EXPECT_EQ(Fp16ToFp32(0x03FF), std::ldexp(1023.0f, -24));  // largest subnormal
  EXPECT_EQ(Fp16ToFp32(0x8001), -std::ldexp(1.0f, -24));
  EXPECT_EQ(Bits(Fp16ToFp32(0x8000)), 0x80000000u);  // -0
  EXPECT_EQ(Fp16ToFp32(0x7C00), std::numeric_limits<float>::infinity());
  EXPECT_EQ(Fp16ToFp32(0xFC00), -std::numeric_limits<float>::infinity());
  EXPECT_TRUE(std::isnan(Fp16ToFp32(0x7E00)));
  EXPECT_TRUE(std::isnan(Fp16ToFp32(0x7C01)));  // signalling nan stays nan
}

TEST(Fp16Test, RoundTripAllHalves) {
  for (uint32_t h = 0; h < 0x10000; ++h) {
    const float f = Fp16ToFp32(static_cast<uint16_t>(h));
    if (std::isnan(f)) {
      EXPECT_TRUE(std::isnan(Fp16ToFp32(Fp32ToFp16(f)))) << h;
    } else {
      ASSERT_EQ(Fp32ToFp16(f), h) << h;
    }
  }
}

TEST(Fp16Test, RoundsToNearestEven) {
  EXPECT_EQ(Fp32ToFp16(1.0f + std::ldexp(1.0f, -11)), 0x3C00);      // tie -> even (down)
  EXPECT_EQ(Fp32ToFp16(1.0f + 3 * std::ldexp(1.0f, -11)), 0x3C02);  // tie -> even (up)
  EXPECT_EQ(Fp32ToFp16(std::nextafter(1.0f + std::ldexp(1.0f, -11), 2.0f)), 0x3C01);
  EXPECT_EQ(Fp32ToFp16(65504.0f), 0x7BFF);
  EXPECT_EQ(Fp32ToFp16(65519.0f), 0x7BFF);
  EXPECT_EQ(Fp32ToFp16(65520.0f), 0x7C00);  // rounds up to inf
  EXPECT_EQ(Fp32ToFp16(1e10f), 0x7C00);
  EXPECT_EQ(Fp32ToFp16(-1e10f), 0xFC00);
  EXPECT_EQ(Fp32ToFp16(std::numeric_limits<float>::infinity()), 0x7C00);
  EXPECT_EQ(Fp32ToFp16(std::ldexp(1.0f, -25)), 0x0000);  // tie -> even zero
  EXPECT_EQ(Fp32ToFp16(std::ldexp(1.5f, -25)), 0x0001);
  EXPECT_EQ(Fp32ToFp16(std::ldexp(3.0f, -25)), 0x0002);  // 1.5 ulp: tie -> even 2
  EXPECT_EQ(Fp32ToFp16(std::ldexp(5.0f, -25)), 0x0002);  // 2.5 ulp: tie -> even 2
  EXPECT_EQ(Fp32ToFp16(std::ldexp(1.0f, -30)), 0x0000);
  EXPECT_EQ(Fp32ToFp16(-std::ldexp(1.0f, -30)), 0x8000);
  EXPECT_EQ(Fp32ToFp16(std::nextafter(std::ldexp(1.0f, -14), 0.0f)), 0x0400);  // up to normal
  EXPECT_EQ(Fp32ToFp16(FromBits(1)), 0x0000);                                  // f32 subnormal
  const uint16_t nan = Fp32ToFp16(std::numeric_limits<float>::quiet_NaN());
  EXPECT_EQ(nan & 0x7C00, 0x7C00);
  EXPECT_NE(nan & 0x3FF, 0);
}

#if defined(__FLT16_MAX__)
// The compiler's _Float16 conversion is correctly rounded: compare on a sweep of f32 patterns.
TEST(Fp16Test, MatchesCompilerConversion) {
  for (uint64_t u = 0; u < (1ull << 32); u += 65521) {
    const float f = FromBits(static_cast<uint32_t>(u));
    if (std::isnan(f)) {
      continue;
    }
    const _Float16 h = static_cast<_Float16>(f);
    uint16_t expected;
    std::memcpy(&expected, &h, 2);
    ASSERT_EQ(Fp32ToFp16(f), expected) << std::hex << u;
  }
}
#endif

TEST(Bf16Test, Conversions) {
  EXPECT_EQ(Bf16ToFp32(0x3F80), 1.0f);
  EXPECT_EQ(Bf16ToFp32(0x0001), FromBits(0x00010000));  // subnormal kept
  EXPECT_EQ(Fp32ToBf16(1.0f), 0x3F80);
  EXPECT_EQ(Fp32ToBf16(FromBits(0x3F808000)), 0x3F80);  // tie -> even (down)
  EXPECT_EQ(Fp32ToBf16(FromBits(0x3F818000)), 0x3F82);  // tie -> even (up)
  EXPECT_EQ(Fp32ToBf16(FromBits(0x3F808001)), 0x3F81);
  EXPECT_EQ(Fp32ToBf16(FromBits(0x00008000)), 0x0000);  // subnormal tie -> 0
  EXPECT_EQ(Fp32ToBf16(FromBits(0x00018000)), 0x0002);
  EXPECT_EQ(Fp32ToBf16(FromBits(0x80000001)), 0x8000);
  EXPECT_EQ(Fp32ToBf16(std::numeric_limits<float>::infinity()), 0x7F80);
  EXPECT_EQ(Fp32ToBf16(-std::numeric_limits<float>::infinity()), 0xFF80);
  EXPECT_EQ(Fp32ToBf16(std::numeric_limits<float>::max()), 0x7F80);  // rounds to inf
  EXPECT_EQ(Fp32ToBf16(FromBits(0x7F800001)), 0x7FC0);               // nan stays nan (quiet)
  EXPECT_EQ(Fp32ToBf16(FromBits(0xFFC00000)), 0xFFC0);
  for (uint32_t h = 0; h < 0x10000; ++h) {
    const float f = Bf16ToFp32(static_cast<uint16_t>(h));
    if (!std::isnan(f)) {
      ASSERT_EQ(Fp32ToBf16(f), h);
    }
  }
}

// ------------------------------------------------------------------------------------------------
// Fuzz seeds (tests/fuzz/README.md): KVC_GGUF_FUZZ_SEEDS=dir ./kvc_unit_tests
// --gtest_filter=*Seeds*

TEST(GgufTest, WriteFuzzSeeds) {
  const char* dir = std::getenv("KVC_GGUF_FUZZ_SEEDS");
  if (dir == nullptr) GTEST_SKIP() << "set KVC_GGUF_FUZZ_SEEDS=dir to write the fuzz seed corpus";
  // One tensor of every supported type, with patterned bytes.
  GgufWriter all;
  all.AddString("general.architecture", "llama").AddBool("b", true).AddFloat64("f", 2.5);
  int k = 0;
  for (GgmlType type : {GgmlType::kF32, GgmlType::kF16, GgmlType::kBF16, GgmlType::kQ4_0,
                        GgmlType::kQ4_1, GgmlType::kQ5_0, GgmlType::kQ5_1, GgmlType::kQ8_0,
                        GgmlType::kQ4_K, GgmlType::kQ5_K, GgmlType::kQ6_K}) {
    const TypeTraits* t = GetTypeTraits(static_cast<uint32_t>(type));
    std::vector<uint8_t> bytes(2 * t->block_bytes);  // [2 rows, 1 block] raw
    for (size_t i = 0; i < bytes.size(); ++i) bytes[i] = static_cast<uint8_t>(i * 29 + k);
    all.AddTensor(std::string("t.") + t->name, type, {t->block_elems, 2}, std::move(bytes));
    ++k;
  }
  const std::pair<const char*, GgufWriter> seeds[] = {
      {"small_v3.gguf", SmallWriter()},
      {"small_v2_align1.gguf", SmallWriter().SetVersion(2).SetAlignment(1)},
      {"all_types.gguf", all},
  };
  for (const auto& [name, w] : seeds) {
    ASSERT_TRUE(Parse(w.Build()).ok()) << name;
    ASSERT_TRUE(w.WriteFile(std::string(dir) + "/" + name)) << dir << "/" << name;
  }
}

// ------------------------------------------------------------------------------------------------
// The real model, when present (git-ignored). Reference values: numpy via the PyPI `gguf`
// package (GGUFReader + gguf.quants.dequantize) on the same file.

TEST(GgufModelTest, SmolLM2) {
  const std::string path = std::string(KVC_SOURCE_DIR) + "/models/SmolLM2-135M-Instruct.Q4_1.gguf";
  if (!std::filesystem::exists(path)) GTEST_SKIP() << path << " not present";
  auto f_or = GgufFile::Open(path);
  ASSERT_TRUE(f_or.ok()) << f_or.status().ToString();
  const GgufFile& f = **f_or;
  EXPECT_EQ(*f.GetString("general.architecture"), "llama");
  EXPECT_EQ(f.tensors().size(), 272u);

  struct Ref {
    const char* tensor;
    GgmlType type;
    std::vector<int64_t> ne;
    double row0_sum;
    std::vector<std::pair<int, float>> values;  // (index in row 0, value)
  };
  const Ref refs[] = {
      {"token_embd.weight",
       GgmlType::kQ8_0,
       {576, 49152},
       -2.2541093826293945,
       {{0, -0.106544495f},
        {1, 0.032978058f},
        {2, 0.0481987f},
        {31, -0.20040512f},
        {32, -0.093486786f},
        {100, 0.05316162f},
        {255, -0.14762878f},
        {333, -0.09017372f},
        {575, 0.029754639f}}},
      {"blk.0.attn_q.weight",
       GgmlType::kQ4_1,
       {576, 576},
       1.00726318359375,
       {{0, -0.09631348f},
        {1, 0.15734863f},
        {2, -0.09631348f},
        {31, -0.09631348f},
        {32, -0.3461914f},
        {100, 0.21411133f},
        {255, 0.6903076f},
        {333, -0.36566162f},
        {575, 0.123535156f}}},
  };
  for (const Ref& ref : refs) {
    SCOPED_TRACE(ref.tensor);
    const TensorInfo* t = f.FindTensor(ref.tensor);
    ASSERT_NE(t, nullptr);
    EXPECT_EQ(t->type(), ref.type);
    EXPECT_EQ(t->ne, ref.ne);
    std::vector<float> row(t->RowLength());  // [ne[0]] f32
    DequantizeRow(t->type(), t->data, row.data(), t->RowLength());
    for (const auto& [i, v] : ref.values) EXPECT_NEAR(row[i], v, 1e-6) << i;
    double sum = 0;
    for (float v : row) sum += v;
    EXPECT_NEAR(sum, ref.row0_sum, 1e-9);
  }
}

}  // namespace
}  // namespace kvc::gguf
