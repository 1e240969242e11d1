// Calibration file format: round trip, and every corruption mode gives a clear error.
#include <gtest/gtest.h>

#include <unistd.h>

#include <cstdio>
#include <filesystem>
#include <fstream>
#include <string>

#include "kv/calibration_file.h"

namespace kvc::kv {
namespace {

std::string TmpPath(const std::string& name) {
  return (std::filesystem::temp_directory_path() /
          (name + "." + std::to_string(getpid()) + ".kvccal")).string();
}

CalibrationFile Sample() {
  CalibrationFile f;
  f.meta["kind"] = "kv-stats";
  f.meta["model_id"] = "arch=test";
  CalibrationFile::Tensor t;
  t.dims = {2, 3};
  t.data = {1, 2, 3, 4, 5, -6.5f};
  f.tensors["a"] = t;
  t.dims = {1};
  t.data = {42};
  f.tensors["b.c"] = t;
  return f;
}

std::string ReadAll(const std::string& p) {
  std::ifstream in(p, std::ios::binary);
  return std::string((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
}
void WriteAll(const std::string& p, const std::string& s) {
  std::ofstream(p, std::ios::binary | std::ios::trunc).write(s.data(), std::streamsize(s.size()));
}

TEST(CalibrationFile, RoundTrip) {
  const std::string p = TmpPath("rt");
  ASSERT_TRUE(WriteCalibrationFile(p, Sample()).ok());
  auto f = ReadCalibrationFile(p);
  ASSERT_TRUE(f.ok()) << f.status().ToString();
  EXPECT_EQ(f->meta, Sample().meta);
  ASSERT_EQ(f->tensors.size(), 2u);
  EXPECT_EQ(f->tensors.at("a").dims, (std::vector<int64_t>{2, 3}));
  EXPECT_EQ(f->tensors.at("a").data, Sample().tensors.at("a").data);
  EXPECT_FLOAT_EQ(f->tensors.at("b.c").data[0], 42.f);
  EXPECT_TRUE(f->Get("a", 6).ok());
  EXPECT_EQ(f->Get("a", 5).status().code(), StatusCode::kNotFound);
  EXPECT_EQ(f->Get("zz", 1).status().code(), StatusCode::kNotFound);
  // No temporary left behind.
  for (const auto& e : std::filesystem::directory_iterator(std::filesystem::temp_directory_path())) {
    EXPECT_EQ(e.path().string().find(p + ".tmp"), std::string::npos);
  }
  std::remove(p.c_str());
}

TEST(CalibrationFile, Errors) {
  const std::string p = TmpPath("err");
  EXPECT_EQ(ReadCalibrationFile(p + ".missing").status().code(), StatusCode::kNotFound);
  ASSERT_TRUE(WriteCalibrationFile(p, Sample()).ok());
  const std::string good = ReadAll(p);

  WriteAll(p, good.substr(0, good.size() - 5));  // truncated
  auto r = ReadCalibrationFile(p);
  EXPECT_EQ(r.status().code(), StatusCode::kDataLoss);
  EXPECT_NE(r.status().message().find("truncated"), std::string::npos) << r.status().message();

  std::string bad = good;
  bad[bad.size() - 2] ^= 0x40;  // flip a payload bit
  WriteAll(p, bad);
  r = ReadCalibrationFile(p);
  EXPECT_EQ(r.status().code(), StatusCode::kDataLoss);
  EXPECT_NE(r.status().message().find("checksum"), std::string::npos) << r.status().message();

  bad = good;
  bad[8] = 7;  // version
  WriteAll(p, bad);
  r = ReadCalibrationFile(p);
  EXPECT_EQ(r.status().code(), StatusCode::kUnimplemented);
  EXPECT_NE(r.status().message().find("version 7"), std::string::npos) << r.status().message();

  bad = good;
  bad[0] = 'X';  // magic
  WriteAll(p, bad);
  EXPECT_EQ(ReadCalibrationFile(p).status().code(), StatusCode::kDataLoss);

  WriteAll(p, good + "xx");  // trailing bytes
  EXPECT_EQ(ReadCalibrationFile(p).status().code(), StatusCode::kDataLoss);
  std::remove(p.c_str());
}

TEST(CalibrationFile, SharedLoadSeesRewrites) {
  const std::string p = TmpPath("shared");
  ASSERT_TRUE(WriteCalibrationFile(p, Sample()).ok());
  auto a = LoadCalibrationFileShared(p);
  auto b = LoadCalibrationFileShared(p);
  ASSERT_TRUE(a.ok() && b.ok());
  EXPECT_EQ(a->get(), b->get());  // cached
  CalibrationFile f2 = Sample();
  f2.meta["kind"] = "other";
  f2.meta["pad"] = "make the size differ";
  ASSERT_TRUE(WriteCalibrationFile(p, f2).ok());
  auto c = LoadCalibrationFileShared(p);
  ASSERT_TRUE(c.ok());
  EXPECT_EQ((*c)->MetaOr("kind", ""), "other");
  std::remove(p.c_str());
}

TEST(CalibrationFile, Fnv1a64KnownValues) {
  // Reference values of 64-bit FNV-1a.
  EXPECT_EQ(Fnv1a64("", 0), 0xcbf29ce484222325ull);
  EXPECT_EQ(Fnv1a64("a", 1), 0xaf63dc4c8601ec8cull);
  EXPECT_EQ(Fnv1a64("foobar", 6), 0x85944171f73967e8ull);
}

}  // namespace
}  // namespace kvc::kv
