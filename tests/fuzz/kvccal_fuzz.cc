// libFuzzer target for the binary calibration file (.kvccal, kv/calibration_file.h: Palu
// low-rank bases, ThinK channel scores): ParseCalibrationFile on arbitrary bytes. When it
// parses, the invariants the format promises are checked (1..4 dims, data size = product of the
// dims) and the accessors the transforms use (Find, Get with a size, MetaOr) are called on
// every tensor. DATA_LOSS / UNIMPLEMENTED errors must carry a message.
#include <cstddef>
#include <cstdint>
#include <string>

#include "fuzz_util.h"
#include "kv/calibration_file.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace kvc;
  const std::string bytes(reinterpret_cast<const char*>(data), size);
  auto f = kv::ParseCalibrationFile(bytes, "fuzz.kvccal");
  if (!f.ok()) {
    fuzz::Require(!f.status().message().empty(), "error without a message");
    return 0;
  }
  (void)f->MetaOr("model_id", "");
  (void)f->MetaOr("kind", "");
  for (const auto& [name, t] : f->tensors) {
    fuzz::Require(!t.dims.empty() && t.dims.size() <= 4, "tensor rank");
    uint64_t prod = 1;
    for (int64_t d : t.dims) {
      fuzz::Require(d > 0, "tensor dim");
      prod *= uint64_t(d);
    }
    fuzz::Require(prod == t.data.size(), "tensor size = product of dims");
    fuzz::Require(f->Find(name) == &t, "Find");
    auto got = f->Get(name, int64_t(prod));
    fuzz::Require(got.ok() && *got == &t, "Get with the right size");
    auto wrong = f->Get(name, int64_t(prod) + 1);
    fuzz::Require(!wrong.ok() && !wrong.status().message().empty(), "Get with a wrong size");
  }
  return 0;
}
