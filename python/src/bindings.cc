// kvcrunch._core: the C++ codecs, eviction policies, KV cache and runtime, bound with nanobind.
// The Python layer (python/kvcrunch/*.py) converts inputs to C-contiguous float32 numpy arrays
// (zero-copy when they already are) and documents shapes; this file checks them again, so a bad
// call raises, never crashes. Status codes map to exceptions: INVALID_ARGUMENT, UNIMPLEMENTED and
// OUT_OF_RANGE -> ValueError (the C++ message unchanged), NOT_FOUND -> FileNotFoundError,
// anything else -> RuntimeError.
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/map.h>
#include <nanobind/stl/pair.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <map>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "cpu/ops.h"
#include "calibrate.h"
#include "eval.h"
#include "kv/cache.h"
#include "kv/codec.h"
#include "kv/policy.h"
#include "kvquant_calib.h"
#include "model/model.h"
#include "runner.h"

namespace nb = nanobind;
using namespace kvc;

namespace {

using F32In = nb::ndarray<const float, nb::c_contig, nb::device::cpu>;
using I32In = nb::ndarray<const int32_t, nb::ndim<1>, nb::c_contig, nb::device::cpu>;

[[noreturn]] void Throw(const Status& s) {
  switch (s.code()) {
    case StatusCode::kInvalidArgument:
    case StatusCode::kUnimplemented:
    case StatusCode::kOutOfRange:
      throw nb::value_error(s.message().c_str());
    case StatusCode::kNotFound:
      PyErr_SetString(PyExc_FileNotFoundError, s.message().c_str());
      throw nb::python_error();
    default:
      throw std::runtime_error(s.ToString());
  }
}
void Check(const Status& s) {
  if (!s.ok()) Throw(s);
}
template <class T>
T Take(StatusOr<T>&& r) {
  if (!r.ok()) Throw(r.status());
  return std::move(*r);
}
[[noreturn]] void BadArg(const std::string& m) { throw nb::value_error(m.c_str()); }

// A numpy array owning `v` (no copy).
template <class T>
nb::ndarray<nb::numpy, T> Own(std::vector<T>&& v, std::vector<size_t> shape) {
  auto* p = new std::vector<T>(std::move(v));
  nb::capsule owner(p, [](void* q) noexcept { delete static_cast<std::vector<T>*>(q); });
  return nb::ndarray<nb::numpy, T>(p->data(), shape.size(), shape.data(), owner);
}

void CheckFinite(const float* x, size_t n, const char* what) {
  for (size_t i = 0; i < n; ++i) {
    if (!std::isfinite(x[i])) BadArg(std::string(what) + " has a non-finite value (NaN or inf) at flat index " + std::to_string(i));
  }
}

kv::KvKind ParseKind(const std::string& k) {
  if (k == "key" || k == "k" || k == "K") return kv::KvKind::kKey;
  if (k == "value" || k == "v" || k == "V") return kv::KvKind::kValue;
  BadArg("kind must be 'key' or 'value', got '" + k + "'");
}

// ---------------------------------------------------------------------------------------------
// Codec on arrays.

struct CodecHandle;

// x [n_tokens, dim] packed: full blocks through the codec, the remaining tokens (fewer than
// block_tokens) in an fp16 tail, as the cache's streams hold them.
struct Packed {
  std::shared_ptr<kv::Codec> codec;
  std::shared_ptr<kv::Codec> tail_codec;  // f16
  int64_t n_tokens = 0, n_blocks = 0, n_tail = 0;
  int dim = 0;
  std::vector<uint8_t> blocks;  // [n_blocks, BlockBytes()]
  std::vector<uint8_t> tail;    // [n_tail, dim] f16

  size_t nbytes() const { return blocks.size() + tail.size(); }
  double bits_per_value() const {
    return n_tokens ? 8.0 * double(nbytes()) / (double(n_tokens) * dim) : 0.0;
  }
  nb::ndarray<nb::numpy, float> Decode() const {
    std::vector<float> x(size_t(n_tokens) * dim);
    const int bt = codec->block_tokens();
    if (n_blocks) codec->DecodeBlocks(blocks.data(), n_blocks, x.data());
    const size_t tb = tail_codec->BlockBytes();
    for (int64_t t = 0; t < n_tail; ++t) {
      tail_codec->Decode(tail.data() + t * tb, x.data() + size_t(n_blocks * bt + t) * dim);
    }
    return Own(std::move(x), {size_t(n_tokens), size_t(dim)});
  }
  nb::ndarray<nb::numpy, float> Score(F32In q) const {
    if (q.ndim() != 2 || int64_t(q.shape(1)) != dim) {
      BadArg("score: q must be [n_q, dim=" + std::to_string(dim) + "] float32, got ndim " +
             std::to_string(q.ndim()) + (q.ndim() >= 2 ? " with dim " + std::to_string(q.shape(1)) : ""));
    }
    const int n_q = int(q.shape(0));
    CheckFinite(q.data(), q.size(), "q");
    std::vector<float> s(size_t(n_q) * n_tokens, 0.f);
    const int bt = codec->block_tokens();
    if (n_blocks && n_q) {
      std::vector<float> qp(size_t(n_q) * codec->PreparedQueryDim());
      codec->PrepareQuery(q.data(), n_q, qp.data());
      codec->ScoreBlocks(qp.data(), n_q, blocks.data(), n_blocks, s.data(), n_tokens);
    }
    if (n_tail && n_q) {
      std::vector<float> xt(dim);
      const size_t tb = tail_codec->BlockBytes();
      for (int64_t t = 0; t < n_tail; ++t) {
        tail_codec->Decode(tail.data() + t * tb, xt.data());
        for (int r = 0; r < n_q; ++r) {
          double acc = 0;
          const float* qr = q.data() + size_t(r) * dim;
          for (int d = 0; d < dim; ++d) acc += double(qr[d]) * xt[d];
          s[size_t(r) * n_tokens + n_blocks * bt + t] = float(acc);
        }
      }
    }
    return Own(std::move(s), {size_t(n_q), size_t(n_tokens)});
  }
  nb::bytes Data() const {
    std::string b(blocks.begin(), blocks.end());
    b.append(tail.begin(), tail.end());
    return nb::bytes(b.data(), b.size());
  }
};

struct CodecHandle {
  std::string spec;
  kv::CodecContext ctx;
  std::map<int, std::shared_ptr<kv::Codec>> by_dim;
  std::map<int, std::shared_ptr<kv::Codec>> f16_by_dim;

  CodecHandle(const std::string& s, int dim, const std::string& kind, int layer, int n_layer,
              int head, int n_head_kv, uint64_t seed)
      : spec(s) {
    if (dim <= 0) BadArg("dim must be > 0, got " + std::to_string(dim));
    if (n_layer < 1 || layer < 0 || layer >= n_layer) BadArg("need 0 <= layer < n_layer");
    if (n_head_kv < 1 || head < 0 || head >= n_head_kv) BadArg("need 0 <= head < n_head_kv");
    ctx.kind = ParseKind(kind);
    ctx.layer = layer;
    ctx.n_layer = n_layer;
    ctx.head = head;
    ctx.n_head_kv = n_head_kv;
    ctx.seed = seed;
    Get(dim);  // validates the spec now: a bad spec raises ValueError from the constructor
  }
  std::shared_ptr<kv::Codec> Get(int dim) {
    auto it = by_dim.find(dim);
    if (it != by_dim.end()) return it->second;
    kv::CodecContext c = ctx;
    c.dim = dim;
    std::shared_ptr<kv::Codec> codec(Take(kv::MakeCodec(spec, c)).release());
    by_dim[dim] = codec;
    kv::CodecContext cf = c;
    f16_by_dim[dim] = std::shared_ptr<kv::Codec>(Take(kv::MakeCodec("f16", cf)).release());
    return codec;
  }
  std::shared_ptr<kv::Codec> First() { return by_dim.begin()->second; }

  Packed Encode(F32In x) {
    if (x.ndim() != 2) BadArg("encode: x must be [n_tokens, dim] float32, got ndim " + std::to_string(x.ndim()));
    const int64_t n = int64_t(x.shape(0));
    const int dim = int(x.shape(1));
    if (dim <= 0) BadArg("encode: dim must be > 0");
    CheckFinite(x.data(), x.size(), "x");
    Packed p;
    p.codec = Get(dim);
    p.tail_codec = f16_by_dim[dim];
    p.dim = dim;
    p.n_tokens = n;
    const int bt = p.codec->block_tokens();
    p.n_blocks = n / bt;
    p.n_tail = n - p.n_blocks * bt;
    const size_t bb = p.codec->BlockBytes();
    p.blocks.resize(size_t(p.n_blocks) * bb);
    for (int64_t b = 0; b < p.n_blocks; ++b) {
      p.codec->Encode(x.data() + size_t(b) * bt * dim, p.blocks.data() + size_t(b) * bb);
    }
    const size_t tb = p.tail_codec->BlockBytes();
    p.tail.resize(size_t(p.n_tail) * tb);
    for (int64_t t = 0; t < p.n_tail; ++t) {
      p.tail_codec->Encode(x.data() + size_t(p.n_blocks * bt + t) * dim, p.tail.data() + t * tb);
    }
    return p;
  }
};

// ---------------------------------------------------------------------------------------------
// Eviction policy on arrays: builds a one-sequence KvCache from the tensors (no RoPE applied:
// keys and queries are taken as given), gathers the statistics the policy asks for through the
// cache's attention, runs AfterPrefill and reads back the kept cells.

kv::KvShape ArrayShape(int n_layer, int n_head, int n_head_kv, int head_dim, int head_dim_v) {
  kv::KvShape s;
  s.n_layer = n_layer;
  s.n_head = n_head;
  s.n_head_kv = n_head_kv;
  s.head_dim = head_dim;
  s.head_dim_v = head_dim_v == head_dim ? 0 : head_dim_v;
  s.rope.n_rot = 0;  // identity: the arrays carry their own positions (post-RoPE keys)
  return s;
}

struct PolicyHandle {
  std::string spec;
  std::string name;
  explicit PolicyHandle(const std::string& s) : spec(s) {
    if (s.empty() || s == "none") BadArg("Policy: empty spec (give e.g. 'snapkv:ratio=0.5')");
    auto p = Take(kv::MakePolicy(s, ArrayShape(1, 1, 1, 64, 64)));
    name = p->Name();
  }
  // keys [n_head_kv, n_tokens, head_dim]; values [n_head_kv, n_tokens, head_dim_v] or empty;
  // queries [n_head, n_q, head_dim] or empty. Returns kept token indices per KV head.
  std::vector<std::vector<int64_t>> Select(F32In keys, nb::object values_o, nb::object queries_o,
                                           int layer, int n_layer) {
    if (keys.ndim() != 3) BadArg("select: keys must be [n_head_kv, n_tokens, head_dim] float32");
    const int hkv = int(keys.shape(0));
    const int64_t n = int64_t(keys.shape(1));
    const int hd = int(keys.shape(2));
    if (hkv < 1 || n < 1 || hd < 1) BadArg("select: keys must be non-empty");
    if (n_layer < 1 || layer < 0 || layer >= n_layer) BadArg("select: need 0 <= layer < n_layer");
    CheckFinite(keys.data(), keys.size(), "keys");
    std::vector<float> vbuf;
    int hdv = hd;
    if (!values_o.is_none()) {
      F32In v = nb::cast<F32In>(values_o);
      if (v.ndim() != 3 || int(v.shape(0)) != hkv || int64_t(v.shape(1)) != n) {
        BadArg("select: values must be [n_head_kv, n_tokens, head_dim_v] like keys");
      }
      hdv = int(v.shape(2));
      CheckFinite(v.data(), v.size(), "values");
      vbuf.resize(size_t(n) * hkv * hdv);
      for (int h = 0; h < hkv; ++h)
        for (int64_t t = 0; t < n; ++t)
          std::memcpy(&vbuf[(size_t(t) * hkv + h) * hdv], v.data() + (size_t(h) * n + t) * hdv, hdv * sizeof(float));
    } else {
      vbuf.assign(size_t(n) * hkv * hdv, 0.f);
    }
    int n_head = hkv, n_q = 0;
    std::vector<float> qbuf;
    if (!queries_o.is_none()) {
      F32In q = nb::cast<F32In>(queries_o);
      if (q.ndim() != 3 || int(q.shape(2)) != hd) BadArg("select: queries must be [n_head, n_q, head_dim] float32");
      n_head = int(q.shape(0));
      n_q = int(q.shape(1));
      if (n_head % hkv != 0) BadArg("select: n_head (queries.shape[0]) must be a multiple of n_head_kv (keys.shape[0])");
      if (n_q > n) BadArg("select: more queries than tokens (the queries are the last n_q tokens' queries)");
      CheckFinite(q.data(), q.size(), "queries");
      qbuf.resize(size_t(n_q) * n_head * hd);
      for (int h = 0; h < n_head; ++h)
        for (int t = 0; t < n_q; ++t)
          std::memcpy(&qbuf[(size_t(t) * n_head + h) * hd], q.data() + (size_t(h) * n_q + t) * hd, hd * sizeof(float));
    }
    const kv::KvShape shape = ArrayShape(n_layer, n_head, hkv, hd, hdv);
    auto policy = Take(kv::MakePolicy(spec, shape));
    kv::KvCacheConfig cfg;
    cfg.k_codec = cfg.v_codec = "f32";
    cfg.position_mode = kv::PositionMode::kOriginal;
    cfg.position_mode_set = true;
    auto cache = Take(kv::KvCache::Create(shape, cfg));
    const kv::AttnStatsRequest stats = policy->StatsNeeded();
    if ((stats.accumulate || stats.obs_window > 0) && n_q == 0) {
      BadArg("policy '" + policy->Name() + "' scores tokens by attention: pass queries [n_head, n_q, head_dim]");
    }
    cache->SetStatsRequest(stats);
    std::vector<float> kbuf(size_t(n) * hkv * hd);
    for (int h = 0; h < hkv; ++h)
      for (int64_t t = 0; t < n; ++t)
        std::memcpy(&kbuf[(size_t(t) * hkv + h) * hd], keys.data() + (size_t(h) * n + t) * hd, hd * sizeof(float));
    std::vector<int64_t> seq(n);
    for (int64_t t = 0; t < n; ++t) seq[t] = t;
    // Every layer gets the same tensors (policies act on all layers of a cache; pyramid budgets
    // depend on the layer index), and the result of `layer` is returned.
    for (int l = 0; l < n_layer; ++l) {
      Check(cache->Write(l, seq.data(), int(n), kbuf.data(), vbuf.data()));
      if (n_q) {
        std::vector<int64_t> qs(n_q);
        for (int i = 0; i < n_q; ++i) qs[i] = n - n_q + i;
        std::vector<float> out(size_t(n_q) * n_head * hdv);
        cache->Attend(l, qbuf.data(), qs.data(), n_q, out.data());
      }
    }
    Check(policy->AfterPrefill(*cache, int(n)));
    std::vector<std::vector<int64_t>> kept(hkv);
    for (int h = 0; h < hkv; ++h) kept[h] = cache->seqs(layer, h);
    return kept;
  }
};

// ---------------------------------------------------------------------------------------------
// The packed store behind kvcrunch.hf.Cache (python/kvcrunch/hf.py): one KvCache per batch row,
// keys stored as transformers hands them (post-RoPE; the store applies no RoPE). Every token of a
// layer gets a sequence number from that layer's clock (monotonic, never reused), so the cache's
// ordering rules hold across crops and re-assignments. hf.py keeps the logical lengths.

class PackedKv {
 public:
  PackedKv(int n_layer, int n_head_kv, int head_dim, int head_dim_v, const std::string& k,
           const std::string& v, const std::string& evict, int sinks, const std::string& sink_codec)
      : evict_(evict == "none" ? "" : evict) {
    if (n_layer < 1 || n_head_kv < 1 || head_dim < 1) BadArg("n_layer, n_head_kv and head_dim must be >= 1");
    if (sinks < 0) BadArg("sinks must be >= 0");
    shape_ = ArrayShape(n_layer, n_head_kv, n_head_kv, head_dim, head_dim_v > 0 ? head_dim_v : head_dim);
    cfg_.k_codec = k;
    cfg_.v_codec = v;
    cfg_.sink_tokens = sinks;
    cfg_.sink_codec = sink_codec;
    cfg_.position_mode = kv::PositionMode::kOriginal;  // keys keep the RoPE position they came with
    cfg_.position_mode_set = true;
    auto probe = Take(kv::KvCache::Create(shape_, cfg_));
    describe_ = probe->Describe();
    k_bits_ = probe->KBitsPerValue();
    v_bits_ = probe->VBitsPerValue();
    if (!evict_.empty()) {
      auto p = Take(kv::MakePolicy(evict_, shape_));
      const auto st = p->StatsNeeded();
      if (st.accumulate || st.obs_window > 0) {
        BadArg("eviction policy '" + p->Name() + "' scores tokens by attention, which transformers' "
               "attention does not report to a Cache; use an attention-free policy here (streaming, "
               "knorm) or this policy as a kvpress press (kvcrunch.kvpress.PolicyPress)");
      }
      policy_name_ = p->Name();
    }
    clock_.assign(n_layer, 0);
  }
  PackedKv(const PackedKv&) = delete;
  PackedKv& operator=(const PackedKv&) = delete;
  std::string describe() const { return describe_; }
  std::string policy_name() const { return policy_name_; }
  double k_bits() const { return k_bits_; }
  double v_bits() const { return v_bits_; }
  int batch() const { return int(rows_.size()); }

  // k [B, n_head_kv, q_len, head_dim] f32, v [B, n_head_kv, q_len, head_dim_v] f32: appended to
  // `layer` of every row (batch rows are created on the first write).
  void Write(int layer, F32In k, F32In v) {
    CheckLayer(layer);
    const int hd = shape_.head_dim, hdv = shape_.DimV(), H = shape_.n_head_kv;
    if (k.ndim() != 4 || int(k.shape(1)) != H || int(k.shape(3)) != hd) {
      BadArg("keys must be [batch, n_head_kv=" + std::to_string(H) + ", q_len, head_dim=" + std::to_string(hd) + "]");
    }
    const int B = int(k.shape(0)), q = int(k.shape(2));
    if (v.ndim() != 4 || int(v.shape(0)) != B || int(v.shape(1)) != H || int(v.shape(2)) != q || int(v.shape(3)) != hdv) {
      BadArg("values must be [batch, n_head_kv, q_len, head_dim_v] matching the keys");
    }
    if (q < 1 || B < 1) BadArg("empty keys");
    if (rows_.empty()) {
      if (B > 1 && !evict_.empty()) {
        BadArg("eviction with batch > 1 is not supported by kvcrunch.hf.Cache: rows would keep "
               "different tokens, which one attention mask cannot describe (run rows one at a time)");
      }
      for (int b = 0; b < B; ++b) {
        Row r;
        r.cache = Take(kv::KvCache::Create(shape_, cfg_));
        if (!evict_.empty()) r.policy = Take(kv::MakePolicy(evict_, shape_));
        rows_.push_back(std::move(r));
      }
    } else if (B != batch()) {
      BadArg("batch size changed from " + std::to_string(batch()) + " to " + std::to_string(B) + "; call reset() first");
    }
    std::vector<float> kb(size_t(q) * H * hd), vb(size_t(q) * H * hdv);
    std::vector<int64_t> seq(q);
    for (int t = 0; t < q; ++t) seq[t] = clock_[layer] + t;
    for (int b = 0; b < B; ++b) {
      for (int h = 0; h < H; ++h)
        for (int t = 0; t < q; ++t) {
          std::memcpy(&kb[(size_t(t) * H + h) * hd], k.data() + ((size_t(b) * H + h) * q + t) * hd, hd * sizeof(float));
          std::memcpy(&vb[(size_t(t) * H + h) * hdv], v.data() + ((size_t(b) * H + h) * q + t) * hdv, hdv * sizeof(float));
        }
      Check(rows_[b].cache->Write(layer, seq.data(), q, kb.data(), vb.data()));
    }
    clock_[layer] += q;
  }

  // The layer's cells decoded: K [B, n_head_kv, n_cells, head_dim], V [.., head_dim_v] f32.
  // ValueError if heads or rows hold different numbers of cells.
  std::pair<nb::ndarray<nb::numpy, float>, nb::ndarray<nb::numpy, float>> Dense(int layer) const {
    CheckLayer(layer);
    const int hd = shape_.head_dim, hdv = shape_.DimV(), H = shape_.n_head_kv, B = batch();
    const int64_t n = n_cells(layer);
    std::vector<float> ko(size_t(B) * H * n * hd), vo(size_t(B) * H * n * hdv);
    for (int b = 0; b < B; ++b)
      for (int h = 0; h < H; ++h) {
        rows_[b].cache->DecodeKeys(layer, h, ko.data() + (size_t(b) * H + h) * n * hd);
        rows_[b].cache->DecodeValues(layer, h, vo.data() + (size_t(b) * H + h) * n * hdv);
      }
    return {Own(std::move(ko), {size_t(B), size_t(H), size_t(n), size_t(hd)}),
            Own(std::move(vo), {size_t(B), size_t(H), size_t(n), size_t(hdv)})};
  }
  // Window codecs (KIVI): encode what their flush rule allows (after the step's attention).
  void Flush(int layer) {
    CheckLayer(layer);
    for (auto& r : rows_) r.cache->FlushLayer(layer);
  }
  // Cells per (layer); the same for every row and head or ValueError.
  int64_t n_cells(int layer) const {
    CheckLayer(layer);
    if (rows_.empty()) return 0;
    const int64_t n = rows_[0].cache->n_cells(layer, 0);
    for (const auto& r : rows_)
      for (int h = 0; h < shape_.n_head_kv; ++h)
        if (r.cache->n_cells(layer, h) != n) BadArg("heads or rows of layer " + std::to_string(layer) + " hold different numbers of tokens (not one dense tensor)");
    return n;
  }
  // Policy hooks (all layers of every row): after a prompt of n_prompt tokens, after a 1-token step.
  void AfterPrefill(int n_prompt) {
    for (auto& r : rows_) if (r.policy) Check(r.policy->AfterPrefill(*r.cache, n_prompt));
  }
  void AfterStep() {
    for (auto& r : rows_) if (r.policy) Check(r.policy->AfterStep(*r.cache));
  }
  // Cell sequence numbers of one row, layer, KV head (the layer clock at write time) [n_cells].
  std::vector<int64_t> seqs(int row, int layer, int head) const {
    CheckLayer(layer);
    if (row < 0 || row >= batch() || head < 0 || head >= shape_.n_head_kv) BadArg("row/head out of range");
    return rows_[row].cache->seqs(layer, head);
  }
  // keep [B, n_head_kv, n_keep] int32: indices into the layer's current cells, sorted, unique.
  // Packed rows are moved (per-token codecs) or re-encoded (block codecs); storage shrinks.
  void Keep(int layer, nb::ndarray<const int32_t, nb::ndim<3>, nb::c_contig, nb::device::cpu> keep) {
    CheckLayer(layer);
    if (int(keep.shape(0)) != batch() || int(keep.shape(1)) != shape_.n_head_kv) BadArg("keep must be [batch, n_head_kv, n_keep] int32");
    const int nk = int(keep.shape(2));
    for (int b = 0; b < batch(); ++b)
      for (int h = 0; h < shape_.n_head_kv; ++h) {
        const int32_t* p = keep.data() + (size_t(b) * shape_.n_head_kv + h) * nk;
        Check(rows_[b].cache->Keep(layer, h, std::vector<int32_t>(p, p + nk)));
      }
  }
  // Replaces the layer's cells by k/v [B, H, n, D] (encoded afresh: a second quantization when
  // they came from a lossy codec).
  void Replace(int layer, F32In k, F32In v) {
    CheckLayer(layer);
    for (auto& r : rows_)
      for (int h = 0; h < shape_.n_head_kv; ++h) Check(r.cache->Keep(layer, h, {}));
    if (k.ndim() == 4 && k.shape(2) == 0) return;
    Write(layer, k, v);
  }
  void Reset() {
    rows_.clear();
    std::fill(clock_.begin(), clock_.end(), 0);
  }
  // Bytes as allocated by the caches (all rows and layers), not formulas.
  std::map<std::string, int64_t> Memory() const {
    std::map<std::string, int64_t> m{{"kv_bytes", 0}, {"packed_bytes", 0}, {"tail_bytes", 0},
                                     {"total_bytes", 0}, {"cells", 0}};
    for (const auto& r : rows_) {
      const auto rep = r.cache->Memory();
      m["kv_bytes"] += int64_t(rep.KvBytes());
      m["packed_bytes"] += int64_t(rep.PackedBytes());
      m["tail_bytes"] += int64_t(rep.TailBytes());
      m["total_bytes"] += int64_t(rep.TotalBytes());
      m["cells"] += rep.Cells();
    }
    return m;
  }

 private:
  struct Row {
    std::unique_ptr<kv::KvCache> cache;
    std::unique_ptr<kv::EvictionPolicy> policy;
  };
  void CheckLayer(int layer) const {
    if (layer < 0 || layer >= shape_.n_layer) BadArg("layer " + std::to_string(layer) + " out of range [0, " + std::to_string(shape_.n_layer) + ")");
  }
  kv::KvShape shape_;
  kv::KvCacheConfig cfg_;
  std::string evict_, describe_, policy_name_;
  double k_bits_ = 0, v_bits_ = 0;
  std::vector<Row> rows_;
  std::vector<int64_t> clock_;  // [n_layer]
};

// ---------------------------------------------------------------------------------------------
// The runtime: the CLI's generate / perplexity / eval, computed the same way (tools/cli/main.cc).

struct ModelHandle {
  ModelHandle() = default;
  ModelHandle(const ModelHandle&) = delete;
  std::unique_ptr<Model> model;
  std::string path;
};

StatusOr<KvRunConfig> MakeRunConfig(const Model& m, const std::string& k, const std::string& v,
                                    const std::string& evict, int sinks, const std::string& sink_codec,
                                    const std::string& kt, const std::string& vt, const std::string& pos) {
  KvRunConfig r;
  r.cache.k_codec = k;
  r.cache.v_codec = v;
  r.cache.k_transform = kt;
  r.cache.v_transform = vt;
  r.cache.sink_tokens = sinks;
  r.cache.sink_codec = sink_codec;
  if (!pos.empty()) {
    KVC_ASSIGN_OR_RETURN(r.cache.position_mode, kv::ParsePositionMode(pos));
    r.cache.position_mode_set = true;
  }
  r.evict = evict;
  return r;
}

nb::dict Generate(ModelHandle& mh, const std::vector<int32_t>& prompt, int n_predict, float temp,
                  float top_p, uint32_t seed, int64_t n_ctx, int n_batch, const std::string& k,
                  const std::string& v, const std::string& evict, int sinks, const std::string& sink_codec,
                  const std::string& kt, const std::string& vt, const std::string& pos) {
  const Model& model = *mh.model;
  if (prompt.empty()) BadArg("empty prompt");
  if (n_predict < 0) BadArg("n_predict must be >= 0 (number of tokens to generate; generation also stops at EOS)");
  if (!(temp >= 0) || !std::isfinite(temp) || !(top_p > 0 && top_p <= 1)) BadArg("temp must be >= 0 and top_p in (0, 1]");
  if (n_batch < 1) BadArg("n_batch must be >= 1");
  const int nv = model.config().n_vocab;
  for (int32_t t : prompt) if (t < 0 || t >= nv) BadArg("token id " + std::to_string(t) + " not in [0, n_vocab)");
  auto rc = Take(MakeRunConfig(model, k, v, evict, sinks, sink_codec, kt, vt, pos));
  Take(EnsureKvQuantCalibration(model, mh.path, {rc}));
  Check(CheckRunConfigCalibration(rc, model));
  Session::Options so;
  so.n_ctx = n_ctx > 0 ? n_ctx : std::min<int64_t>(model.config().n_ctx_train, 4096);
  so.n_batch = n_batch;
  if (rc.evict.empty() && int64_t(prompt.size()) > so.n_ctx) {
    BadArg("the prompt has " + std::to_string(prompt.size()) + " tokens, more than the context size " + std::to_string(so.n_ctx));
  }
  std::vector<int32_t> out;
  double t0, t1, t2;
  std::string describe;
  kv::MemoryReport mem;
  {
    nb::gil_scoped_release nogil;
    auto s = Take(Session::Create(model, rc.cache, rc.evict, so));
    std::vector<float> logits;
    t0 = NowSeconds();
    Check(s->Eval(prompt, false, &logits));
    t1 = NowSeconds();
    std::mt19937 rng(seed);
    for (int i = 0; i < n_predict; ++i) {  // the CLI's sampling loop, step for step
      const int32_t next = SampleGenerateToken(logits, temp, top_p, rng);
      out.push_back(next);
      if (model.tokenizer().IsEog(next)) break;
      if (!s->policy() && s->n_past() + 1 > so.n_ctx) break;
      Check(s->Eval({next}, false, &logits));
    }
    t2 = NowSeconds();
    mem = s->cache().Memory();
    describe = s->cache().Describe();
  }
  nb::dict d;
  d["tokens"] = out;
  d["text"] = model.tokenizer().Decode(out);
  d["n_prompt"] = prompt.size();
  d["prompt_tokens_per_second"] = prompt.size() / std::max(t1 - t0, 1e-9);
  d["gen_tokens_per_second"] = out.size() > 1 ? (out.size() - 1) / std::max(t2 - t1, 1e-9) : 0.0;
  d["kv_bytes"] = mem.KvBytes();
  d["cache"] = describe;
  return d;
}

std::string Perplexity(ModelHandle& mh, const std::string& text, int64_t n_ctx, int n_batch,
                       int64_t chunks, const std::string& k, const std::string& v,
                       const std::string& evict, int sinks, const std::string& sink_codec,
                       const std::string& kt, const std::string& vt, const std::string& pos) {
  const Model& model = *mh.model;
  auto toks = Take(TokenizeText(model, text));
  auto rc = Take(MakeRunConfig(model, k, v, evict, sinks, sink_codec, kt, vt, pos));
  Take(EnsureKvQuantCalibration(model, mh.path, {rc}));
  Check(CheckRunConfigCalibration(rc, model));
  if (n_ctx < 4) BadArg("n_ctx must be at least 4");
  if (n_batch < 1) BadArg("n_batch must be >= 1");
  int64_t n_chunks = int64_t(toks.size()) / n_ctx;
  if (chunks > 0) n_chunks = std::min(n_chunks, chunks);
  if (n_chunks < 1) {
    BadArg("the text has " + std::to_string(toks.size()) + " tokens, fewer than one chunk of " + std::to_string(n_ctx) + " (lower n_ctx)");
  }
  nlohmann::json j;
  {
    nb::gil_scoped_release nogil;
    Session::Options so;
    so.n_ctx = n_ctx;
    so.n_batch = n_batch;
    auto s = Take(Session::Create(model, rc.cache, rc.evict, so));
    double nll = 0;
    int64_t n = 0;
    size_t kv_bytes = 0, tail_bytes = 0;
    const double t0 = NowSeconds();
    ChunkScores sc;
    for (int64_t ch = 0; ch < n_chunks; ++ch) {
      Check(ScoreChunk(*s, toks.data() + ch * n_ctx, n_ctx, false, &sc));
      for (float x : sc.nll) nll += x;
      n += int64_t(sc.nll.size());
      const auto mem = s->cache().Memory();
      kv_bytes = std::max(kv_bytes, mem.KvBytes());
      tail_bytes = std::max(tail_bytes, mem.TailBytes());
    }
    const double dt = NowSeconds() - t0;
    const auto& cache = s->cache();
    j["model"] = mh.path;
    j["n_ctx"] = n_ctx;
    j["n_chunks"] = n_chunks;
    j["ppl"] = std::exp(nll / n);
    j["n_tokens"] = n;
    j["kv_bytes"] = kv_bytes;
    j["kv_residual_bytes"] = tail_bytes;
    j["kv_bits_per_value"] = (cache.KBitsPerValue() + cache.VBitsPerValue()) / 2;
    j["k_bits_per_value"] = cache.KBitsPerValue();
    j["v_bits_per_value"] = cache.VBitsPerValue();
    j["kv_bytes_per_token_descriptor"] = model.config().KvBytesPerToken(cache.KBitsPerValue(), cache.VBitsPerValue());
    j["tokens_per_second"] = double(n_chunks * n_ctx) / dt;
    j["cache"] = cache.Describe();
    j["peak_rss_bytes"] = PeakRssBytes();
  }
  return j.dump();
}

std::string Eval(ModelHandle& mh, const std::string& text, const std::string& text_path,
                 const std::vector<std::string>& configs, int64_t n_ctx, int n_batch, int64_t chunks,
                 int decode_tokens) {
  const Model& model = *mh.model;
  EvalOptions opt;
  opt.text_path = text_path;
  auto toks = Take(TokenizeText(model, text));
  if (n_ctx < 4) BadArg("n_ctx must be at least 4");
  if (n_batch < 1) BadArg("n_batch must be >= 1");
  if (decode_tokens < 0) BadArg("decode_tokens must be >= 0");
  opt.ppl.n_ctx = n_ctx;
  opt.ppl.n_batch = n_batch;
  opt.ppl.max_chunks = chunks;
  opt.decode_tokens = decode_tokens;
  std::vector<KvRunConfig> cfgs;
  for (const auto& c : configs) {
    auto r = Take(ParseRunConfig(c));
    Check(FitLayerOverrides(&r, model.kv_shape()));  // also: a config=FILE made for another shape
    Check(CheckRunConfigCalibration(r, model));
    cfgs.push_back(r);
  }
  if (cfgs.empty()) {
    cfgs = DefaultRunConfigs();  // presets name per-layer codecs: fit them like parsed configs
    for (auto& r : cfgs) Check(FitLayerOverrides(&r, model.kv_shape()));
  }
  Take(EnsureKvQuantCalibration(model, mh.path, cfgs));
  for (const auto& c : cfgs) {  // every configuration builds before anything runs (as the CLI)
    auto probe = kv::KvCache::Create(model.kv_shape(), c.cache);
    if (!probe.ok()) Throw(Status(probe.status().code(), c.Label() + ": " + probe.status().message()));
    auto pol = kv::MakePolicy(c.evict, model.kv_shape());
    if (!pol.ok()) Throw(Status(pol.status().code(), c.Label() + ": " + pol.status().message()));
  }
  std::string out;
  {
    nb::gil_scoped_release nogil;
    auto res = Take(RunEval(model, toks, cfgs, opt));
    res.model = mh.path;
    res.text = text_path;
    out = ToJson(res).dump();
  }
  return out;
}

}  // namespace

NB_MODULE(_core, m) {
  m.doc() = "kvcrunch C++ core (nanobind). Use the documented wrappers in the kvcrunch package.";

  nb::class_<Packed>(m, "Packed")
      .def_prop_ro("nbytes", &Packed::nbytes)
      .def_prop_ro("bits_per_value", &Packed::bits_per_value)
      .def_prop_ro("n_tokens", [](const Packed& p) { return p.n_tokens; })
      .def_prop_ro("dim", [](const Packed& p) { return p.dim; })
      .def_prop_ro("n_blocks", [](const Packed& p) { return p.n_blocks; })
      .def_prop_ro("n_tail", [](const Packed& p) { return p.n_tail; })
      .def_prop_ro("codec", [](const Packed& p) { return p.codec->Name(); })
      .def("decode", &Packed::Decode)
      .def("score", &Packed::Score, nb::arg("q"))
      .def("tobytes", &Packed::Data);

  nb::class_<CodecHandle>(m, "CodecCore")
      .def(nb::init<const std::string&, int, const std::string&, int, int, int, int, uint64_t>(),
           nb::arg("spec"), nb::arg("dim"), nb::arg("kind"), nb::arg("layer"), nb::arg("n_layer"),
           nb::arg("head"), nb::arg("n_head_kv"), nb::arg("seed"))
      .def("encode", &CodecHandle::Encode, nb::arg("x"))
      .def("name", [](CodecHandle& c, int dim) { return c.Get(dim)->Name(); })
      .def("bits_per_value", [](CodecHandle& c, int dim) { return c.Get(dim)->BitsPerValue(); })
      .def("block_bytes", [](CodecHandle& c, int dim) { return c.Get(dim)->BlockBytes(); })
      .def("block_tokens", [](CodecHandle& c, int dim) { return c.Get(dim)->block_tokens(); })
      .def("residual_tokens", [](CodecHandle& c, int dim) { return c.Get(dim)->residual_tokens(); });

  nb::class_<PolicyHandle>(m, "PolicyCore")
      .def(nb::init<const std::string&>(), nb::arg("spec"))
      .def_ro("name", &PolicyHandle::name)
      .def("select", &PolicyHandle::Select, nb::arg("keys"), nb::arg("values").none(),
           nb::arg("queries").none(), nb::arg("layer"), nb::arg("n_layer"));

  nb::class_<PackedKv>(m, "PackedKv")
      .def(nb::init<int, int, int, int, const std::string&, const std::string&, const std::string&, int, const std::string&>(),
           nb::arg("n_layer"), nb::arg("n_head_kv"), nb::arg("head_dim"), nb::arg("head_dim_v"),
           nb::arg("k"), nb::arg("v"), nb::arg("evict"), nb::arg("sinks"), nb::arg("sink_codec"))
      .def("describe", &PackedKv::describe)
      .def("policy_name", &PackedKv::policy_name)
      .def("k_bits", &PackedKv::k_bits)
      .def("v_bits", &PackedKv::v_bits)
      .def("batch", &PackedKv::batch)
      .def("write", &PackedKv::Write, nb::arg("layer"), nb::arg("k"), nb::arg("v"))
      .def("dense", &PackedKv::Dense, nb::arg("layer"))
      .def("flush", &PackedKv::Flush, nb::arg("layer"))
      .def("n_cells", &PackedKv::n_cells, nb::arg("layer"))
      .def("after_prefill", &PackedKv::AfterPrefill, nb::arg("n_prompt"))
      .def("after_step", &PackedKv::AfterStep)
      .def("seqs", &PackedKv::seqs, nb::arg("row"), nb::arg("layer"), nb::arg("head"))
      .def("keep", &PackedKv::Keep, nb::arg("layer"), nb::arg("keep"))
      .def("replace", &PackedKv::Replace, nb::arg("layer"), nb::arg("k"), nb::arg("v"))
      .def("reset", &PackedKv::Reset)
      .def("memory", &PackedKv::Memory);

  nb::class_<ModelHandle>(m, "ModelCore")
      .def("__init__", [](ModelHandle* self, const std::string& path, int threads) {
        if (threads < 1 || threads > 256) BadArg("threads must be in [1, 256]");
        cpu::SetNumThreads(threads);
        new (self) ModelHandle();
        {
          nb::gil_scoped_release nogil;
          auto m = Model::Load(path);
          if (!m.ok()) { nb::gil_scoped_acquire g; self->~ModelHandle(); Throw(m.status()); }
          self->model = std::move(*m);
        }
        self->path = path;
      }, nb::arg("path"), nb::arg("threads"))
      .def("config", [](const ModelHandle& h) {
        const auto& c = h.model->config();
        nb::dict d;
        d["arch"] = c.arch; d["name"] = c.name; d["n_layer"] = c.n_layer; d["n_embd"] = c.n_embd;
        d["n_head"] = c.n_head; d["n_head_kv"] = c.n_head_kv; d["head_dim"] = c.head_dim;
        d["n_ff"] = c.n_ff; d["n_vocab"] = c.n_vocab; d["n_ctx_train"] = c.n_ctx_train;
        d["rope_theta"] = c.rope.theta;
        return d;
      })
      .def("tokenize", [](const ModelHandle& h, const std::string& text, bool add_bos, bool special) {
        return Take(h.model->tokenizer().Encode(text, add_bos, special));
      }, nb::arg("text"), nb::arg("add_bos"), nb::arg("special"))
      .def("detokenize", [](const ModelHandle& h, const std::vector<int32_t>& ids) {
        for (int32_t t : ids) if (t < 0 || t >= h.model->config().n_vocab) BadArg("token id out of range");
        return h.model->tokenizer().Decode(ids);
      }, nb::arg("ids"))
      .def("chat_prompt", [](const ModelHandle& h, const std::string& text) {
        return Take(h.model->tokenizer().ApplyChatTemplate({{"user", text}}, true));
      }, nb::arg("text"))
      .def("generate", &Generate)
      .def("perplexity", &Perplexity)
      .def("eval", &Eval);
  m.def("codecs", [] {
    std::vector<std::pair<std::string, std::string>> r;
    for (const auto& c : kv::RegisteredCodecs()) r.emplace_back(c.name, c.summary);
    return r;
  });
  m.def("codec_aliases", [] { return kv::CodecAliases(); });
  m.def("policies", [] {
    std::vector<std::pair<std::string, std::string>> r;
    for (const auto& p : kv::RegisteredPolicies()) r.emplace_back(p.name, p.summary);
    return r;
  });
  m.def("default_text_path", [] { return DefaultTextPath(); });
  m.def("default_model_path", [] { return DefaultModelPath(); });
  m.def("peak_rss_bytes", [] { return PeakRssBytes(); });
  m.def("current_rss_bytes", [] { return CurrentRssBytes(); });
}
