// libFuzzer target for the KV configuration parser: the --config strings of `kvcrunch eval` /
// `retrieval` (ParseRunConfig: k= v= kt= vt= evict= sinks= sink_codec= pos= name= k@L= ...) and,
// through them, every codec / transform / policy spec parser (ParseSpec, aliases, each factory's
// parameter checks). A parsed configuration is built into a small KvCache (2 layers, 4 query
// heads, 2 KV heads, head_dim 64) that takes a few writes and attends; its codecs' kernels run.
// Any crash, sanitizer report or hang is a bug; an error Status must carry a message.
#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "fuzz_util.h"
#include "kv/cache.h"
#include "kv/policy.h"
#include "runner.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace kvc;
  if (size > 512) return 0;  // configs are short; long inputs only slow the search
  const std::string text(reinterpret_cast<const char*>(data), size);
  auto rc = ParseRunConfig(text);
  if (!rc.ok()) {
    fuzz::Require(!rc.status().message().empty(), "ParseRunConfig error without a message");
    return 0;
  }
  (void)rc->Label();
  kv::KvShape shape;
  shape.n_layer = 2;
  shape.n_head = 4;
  shape.n_head_kv = 2;
  shape.head_dim = 64;
  shape.rope.n_rot = 64;
  if (Status st = FitLayerOverrides(&*rc, shape.n_layer); !st.ok()) {
    fuzz::Require(!st.message().empty(), "FitLayerOverrides error without a message");
    return 0;
  }
  if (!rc->evict.empty()) {
    auto pol = kv::MakePolicy(rc->evict, shape);
    if (!pol.ok()) {
      fuzz::Require(!pol.status().message().empty(), "MakePolicy error without a message");
      return 0;
    }
  }
  rc->cache.rope_table_positions = 64;
  auto cache = kv::KvCache::Create(shape, rc->cache);
  if (!cache.ok()) {
    fuzz::Require(!cache.status().message().empty(), "KvCache::Create error without a message");
    return 0;
  }
  // Two writes (a 5-token prefill, one decode token) and an attend per layer.
  const int kv_dim = shape.n_head_kv * shape.head_dim;
  int64_t seq[5] = {0, 1, 2, 3, 4};
  for (int step = 0; step < 2; ++step) {
    const int n = step == 0 ? 5 : 1;
    if (step == 1) seq[0] = 5;
    const std::vector<float> k = fuzz::Wave(size_t(n) * kv_dim, 1.5f), v = fuzz::Wave(size_t(n) * kv_dim, 0.7f);
    const std::vector<float> q = fuzz::Wave(size_t(n) * shape.n_head * shape.head_dim, 1.f);
    std::vector<float> out(size_t(n) * shape.n_head * shape.DimV());
    for (int l = 0; l < shape.n_layer; ++l) {
      Status st = (*cache)->Write(l, seq, n, k.data(), v.data());
      fuzz::Require(st.ok(), "Write of finite values failed");
      (*cache)->Attend(l, q.data(), seq, n, out.data());
      for (float o : out) fuzz::Require(o == o, "attention output is NaN");
    }
  }
  return 0;
}
