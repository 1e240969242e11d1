// FingerprintOf(Model): apart from kv_format.cc so that the format can be built without the model
// (the record fuzzer links only the KV library).
#include <fmt/format.h>

#include "model/model.h"
#include "store/kv_format.h"

namespace kvc::store {

ModelFingerprint FingerprintOf(const Model& model) {
  const auto& c = model.config();
  const kv::KvShape sh = model.kv_shape();
  ModelFingerprint fp;
  fp.text = fmt::format(
      "n_layer={} n_head={} n_head_kv={} head_dim={} head_dim_v={} n_vocab={} rope_base={} "
      "file_bytes={} file_xxh128={}",
      sh.n_layer, sh.n_head, sh.n_head_kv, sh.head_dim, sh.DimV(), c.n_vocab, sh.rope.theta,
      model.file().file_size(), model.file_checksum());
  // Keys from W_k with folded smoothing differ from the plain model's: never mix them.
  if (!model.kv_smooth_desc().empty()) fp.text += " kv_smooth=" + model.kv_smooth_desc();
  fp.digest = Sha256(fp.text);
  return fp;
}

}  // namespace kvc::store
