// libFuzzer target for KVQuant calibration JSON (models/<model>.kvquant.json, kvquant:calib=PATH):
// ParseCalibrationJson on arbitrary text; when it parses, kvquant K and V codecs of 2, 3 and 4
// bits are built from it (the factory must refuse tensors of the wrong size or non-finite values
// with a message) and the ones that build encode, decode, score and accumulate a few blocks.
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <string>

#include "fuzz_util.h"
#include "kv/codecs/kvquant.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace kvc;
  if (size > (1 << 16)) return 0;
  const std::string text(reinterpret_cast<const char*>(data), size);
  auto calib = kv::ParseCalibrationJson(text, "fuzz.kvquant.json");
  if (!calib.ok()) {
    fuzz::Require(!calib.status().message().empty(), "error without a message");
    return 0;
  }
  // The shape the file claims when it is small and sane, else 1 layer, 1 head, head_dim 64.
  int n_layer = 1, n_head_kv = 1, dim = 64;
  if (auto it = calib->tensors.find("kvquant.shape"); it != calib->tensors.end() && it->second.size() == 3) {
    const auto& s = it->second;
    if (s[0] >= 1 && s[0] <= 4 && s[1] >= 1 && s[1] <= 4 && s[2] >= 2 && s[2] <= 256) {
      n_layer = int(s[0]);
      n_head_kv = int(s[1]);
      dim = int(s[2]);
    }
  }
  for (int bits = 2; bits <= 4; ++bits) {
    for (kv::KvKind kind : {kv::KvKind::kKey, kv::KvKind::kValue}) {
      kv::CodecContext ctx;
      ctx.n_layer = n_layer;
      ctx.layer = n_layer - 1;
      ctx.n_head_kv = n_head_kv;
      ctx.head = n_head_kv - 1;
      ctx.dim = dim;
      ctx.kind = kind;
      ctx.calib = &*calib;
      auto c = kv::MakeCodec("kvquant:bits=" + std::to_string(bits), ctx);
      if (!c.ok()) {
        fuzz::Require(!c.status().message().empty(), "MakeCodec error without a message");
        continue;
      }
      fuzz::ExerciseCodec(**c);
    }
  }
  return 0;
}
