#include "kv/cache.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <cstdio>
#include <cstdlib>
#include <numeric>

#include <fmt/format.h>

#include "cpu/ops.h"
#include "gguf/types.h"
#include "kv/cache_internal.h"
#include "util/check.h"

namespace kvc::kv {

uint16_t Fp32ToFp16Sat(float f) {
  if (f > 65504.f) f = 65504.f;
  if (f < -65504.f) f = -65504.f;
  return gguf::Fp32ToFp16(f);
}
void Fp16ToFp32Row(const uint16_t* h, int64_t n, float* out) { cpu::F16ToF32(h, n, out); }
void Fp32ToFp16SatRow(const float* x, int64_t n, uint16_t* out) {
  for (int64_t i = 0; i < n; ++i) out[i] = Fp32ToFp16Sat(x[i]);
}

const char* PositionModeName(PositionMode m) {
  switch (m) {
    case PositionMode::kOriginal: return "original";
    case PositionMode::kInCache: return "in-cache";
    case PositionMode::kRerotateOnce: return "rerotate";
  }
  return "?";
}

StatusOr<PositionMode> ParsePositionMode(const std::string& s) {
  if (s == "original" || s == "gaps") return PositionMode::kOriginal;
  if (s == "in-cache" || s == "incache") return PositionMode::kInCache;
  if (s == "rerotate" || s == "rerotate-once") return PositionMode::kRerotateOnce;
  return InvalidArgument(fmt::format("unknown position mode '{}' (original, in-cache, rerotate)", s));
}

// ---------------------------------------------------------------- Stream

// Positions covered by the cos/sin table of caches that store pre-RoPE keys (or centre post-RoPE
// keys): KvCacheConfig::rope_table_positions (the session's n_ctx) clamped to [8192, 262144],
// 256 bytes per position at head_dim 64. Later positions use the direct (double-angle) path.
constexpr int kRopeTablePositions = 8192;
constexpr int64_t kRopeTableMax = 262144;

static int64_t RoundUp(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

void Stream::ReservePacked(int64_t tokens) {
  const int64_t bt = block_tokens();
  const int64_t step = RoundUp(std::max<int64_t>(grow_tokens, 1), bt);
  const size_t need = size_t(RoundUp(tokens, bt) / bt) * block_bytes();
  if (need <= packed.capacity()) return;
  int64_t want_tokens = RoundUp(tokens, step);
  if (limit_tokens >= 0) want_tokens = std::max(tokens, std::min(want_tokens, limit_tokens));
  const size_t want = size_t(RoundUp(want_tokens, bt) / bt) * block_bytes();
  packed.reserve(want);  // exact-size reserve; growth never doubles
}

void Stream::EncodeBlocks(const float* x, int64_t n_tokens) {
  const int64_t bt = block_tokens();
  KVC_CHECK(n_tokens % bt == 0);
  ReservePacked(n_packed + n_tokens);
  const size_t bb = block_bytes();
  const size_t old = packed.size();
  packed.resize(old + size_t(n_tokens / bt) * bb);
  for (int64_t b = 0; b < n_tokens / bt; ++b) {
    codec->Encode(x + b * bt * dim, packed.data() + old + b * bb);
  }
  n_packed += n_tokens;
}

void Stream::Append(const float* y, int64_t n, bool defer) {
  const int64_t bt = block_tokens();
  const int64_t r = codec->residual_tokens();
  const int64_t q = codec->flush_quantum();
  int64_t start = 0;
  // Per-token formats with no residual window encode straight from f32. Block formats always
  // pass through the fp16 tail, so a block is encoded from the same (fp16) values whether its
  // tokens arrived in one Write or one at a time (streamed == one-shot; cache_flush_test).
  if (r == 0 && q == bt && bt == 1 && n_tail == 0) {
    const int64_t direct = n / bt * bt;
    if (direct > 0) EncodeBlocks(y, direct);
    start = direct;
  }
  if (start == n) return;
  // Everything else passes through the fp16 tail.
  const int64_t add = n - start;
  if (int64_t(tail.capacity()) < (n_tail + add) * dim) {
    int64_t want_tokens = RoundUp(n_tail + add, std::max(grow_tokens, 1));
    // A window never holds more than r + q tokens between flushes (KVQuant keys: 16), so do not
    // reserve a whole growth step of fp16 for it.
    if (r + q > 1) want_tokens = std::max(n_tail + add, std::min(want_tokens, r + q));
    if (limit_tokens >= 0) want_tokens = std::max(n_tail + add, std::min(want_tokens, limit_tokens));
    tail.reserve(size_t(want_tokens * dim));
  }
  tail.resize(size_t((n_tail + add) * dim));
  Fp32ToFp16SatRow(y + start * dim, add * dim, tail.data() + n_tail * dim);
  n_tail += add;
  if (!defer) Flush();
}

bool Stream::has_window() const {
  return codec->residual_tokens() > 0 || codec->flush_quantum() > 1;
}

void Stream::Flush() {
  const int64_t r = codec->residual_tokens();
  const int64_t q = codec->flush_quantum();
  if (n_tail - r >= q) {
    const int64_t cnt = (n_tail - r) / q * q;
    std::vector<float> tmp(size_t(cnt * dim));
    Fp16ToFp32Row(tail.data(), cnt * dim, tmp.data());
    EncodeBlocks(tmp.data(), cnt);
    tail.erase(tail.begin(), tail.begin() + cnt * dim);
    n_tail -= cnt;
    // A large batch (prefill) passed through the tail: do not keep its capacity. From here the
    // window holds at most r + q tokens, so release anything beyond that; Memory() reports
    // capacities, and KIVI's fp16 window must not cost a batch.
    const size_t keep = size_t(std::max<int64_t>(n_tail, r + q) * dim);
    if (tail.capacity() > keep) {
      std::vector<uint16_t> shrunk;
      shrunk.reserve(std::max(keep, tail.size()));
      shrunk.assign(tail.begin(), tail.end());
      tail.swap(shrunk);
    }
  }
}

void Stream::DecodeAll(float* out) const {
  codec->DecodeBlocks(packed.data(), n_packed / block_tokens(), out);
  Fp16ToFp32Row(tail.data(), n_tail * dim, out + n_packed * dim);
}

void Stream::MuRows(const int64_t* pos, int64_t n, float* out) const {
  for (int64_t i = 0; i < n; ++i) std::memcpy(out + i * dim_in, mu.data(), size_t(dim_in) * sizeof(float));
  if (mu_rope) {
    KVC_CHECK(pos != nullptr);
    mu_rope->Apply(out, int(n), dim_in, pos);
  }
}

void Stream::ToInput(const float* y, int64_t n, float* x, const int64_t* pos) const {
  if (transform) transform->Reconstruct(y, int(n), x);
  else if (x != y) std::memcpy(x, y, size_t(n) * dim * sizeof(float));
  if (center && !mu.empty() && n > 0) {
    std::vector<float> m(size_t(n) * dim_in);
    MuRows(pos, n, m.data());
    for (size_t i = 0; i < m.size(); ++i) x[i] += m[i];
  }
}

void Stream::Center(float* x, int64_t n, const int64_t* seq, const int64_t* pos) {
  if (!center || n <= 0) return;
  if (mu_rope) KVC_CHECK(pos != nullptr);
  if (mu.empty()) {
    mu.assign(dim_in, 0.f);
    std::vector<double> s(dim_in, 0.0);
    std::vector<float> row(dim_in);
    int64_t used = 0;
    for (int64_t i = 0; i < n; ++i) {
      if (n > 1 && seq[i] == 0) continue;  // token 0 is the attention sink: an outlier key
      std::memcpy(row.data(), x + i * dim_in, size_t(dim_in) * sizeof(float));
      if (mu_rope) {  // back to the pre-RoPE frame: R(−pos) x
        const int64_t back = -pos[i];
        mu_rope->Apply(row.data(), 1, dim_in, &back);
      }
      for (int d = 0; d < dim_in; ++d) s[d] += row[d];
      ++used;
    }
    for (int d = 0; d < dim_in; ++d) mu[d] = float(s[d] / double(used));
  }
  std::vector<float> m(size_t(n) * dim_in);
  MuRows(pos, n, m.data());
  for (size_t i = 0; i < m.size(); ++i) x[i] -= m[i];
}

void Stream::Rebuild(const float* y, int64_t n) {
  packed.clear();
  packed.shrink_to_fit();
  tail.clear();
  tail.shrink_to_fit();
  n_packed = n_tail = 0;
  if (n > 0) Append(y, n);
}

// ---------------------------------------------------------------- MemoryReport

size_t MemoryReport::PackedBytes() const {
  size_t s = 0;
  for (auto& l : layers) s += l.k_packed + l.v_packed;
  return s;
}
size_t MemoryReport::TailBytes() const {
  size_t s = 0;
  for (auto& l : layers) s += l.k_tail + l.v_tail;
  return s;
}
size_t MemoryReport::KvBytes() const { return PackedBytes() + TailBytes(); }
size_t MemoryReport::TotalBytes() const {
  size_t s = KvBytes() + scratch;
  for (auto& l : layers) s += l.cells + l.transform;
  return s;
}
int64_t MemoryReport::SideCells() const {
  int64_t s = 0;
  for (auto& l : layers) s += l.n_side_cells;
  return s;
}
int64_t MemoryReport::Cells() const {
  int64_t s = 0;
  for (auto& l : layers) s += l.n_cells;
  return s;
}

// ---------------------------------------------------------------- KvCache

KvCache::~KvCache() = default;

// Generic codec-spec key "rot" (any codec): rot=1 puts a "hadamard" transform in front of the
// codec on this stream, as llama.cpp (PR #21038) rotates every quantized cache; aliases make it the
// default ("q4_0" -> "q4_0:rot=1"). An explicitly configured transform wins (no double rotation).
// A default (alias-implied) rotation is skipped for a non-power-of-2 dimension; an explicit rot=1
// there is an error. Returns the codec spec without "rot" and the transform spec to use.
static Status ApplyRotParam(const std::string& codec_text, int dim_in, std::string* codec_spec,
                            std::string* transform_spec) {
  *codec_spec = ExpandAlias(codec_text);
  auto parsed = ParseSpec(*codec_spec);
  if (!parsed.ok() || !parsed->params.count("rot")) return Status::Ok();
  auto rot = parsed->GetBool("rot", false);
  if (!rot.ok()) return rot.status();
  parsed->params.erase("rot");
  *codec_spec = parsed->ToString();
  const bool explicit_rot = codec_text.find("rot=") != std::string::npos;
  const bool pow2 = dim_in > 0 && (dim_in & (dim_in - 1)) == 0;
  if (*rot && transform_spec->empty() && (pow2 || explicit_rot)) *transform_spec = "hadamard";
  // Key smoothing (a diagonal scale) composes with the rotation: smooth:...,rot=1 applies the
  // Hadamard after the scales (src/kv/transforms/smooth.h), unless the smooth spec says rot=.
  if (*rot && (pow2 || explicit_rot) && transform_spec->rfind("smooth", 0) == 0) {
    auto ts = ParseSpec(*transform_spec);
    if (ts.ok() && ts->name == "smooth" && !ts->params.count("rot")) {
      ts->params["rot"] = "1";
      *transform_spec = ts->ToString();
    }
  }
  return Status::Ok();
}

static StatusOr<Stream> MakeStreamImpl(const std::string& codec_text,
                                       const std::string& transform_text, CodecContext ctx,
                                       int dim_in, const KvCacheConfig& cfg) {
  std::string codec_spec, transform_spec = transform_text;
  KVC_RETURN_IF_ERROR(ApplyRotParam(codec_text, dim_in, &codec_spec, &transform_spec));
  Stream s;
  // Generic codec-spec key "center" (any codec): store x − μ (see Stream::center).
  if (auto parsed = ParseSpec(codec_spec); parsed.ok() && parsed->params.count("center")) {
    auto on = parsed->GetBool("center", false);
    if (!on.ok()) return on.status();
    s.center = *on;
    parsed->params.erase("center");
    codec_spec = parsed->ToString();
  }
  s.dim_in = dim_in;
  s.grow_tokens = cfg.grow_tokens;
  ctx.dim = dim_in;
  // KVQuant keys are quantized per channel of the raw pre-RoPE keys with offsets and ranges
  // calibrated on them: a transform in front (Hadamard, low-rank, ThinK) or centring would feed
  // it vectors its calibration never saw (measured: kvquant4 + Hadamard ppl 23.96 -> 59.6).
  if (ctx.kind == KvKind::kKey) {
    auto parsed = ParseSpec(ExpandAlias(codec_spec));
    if (parsed.ok() && parsed->name == "kvquant") {
      if (!transform_spec.empty()) {
        return InvalidArgument(fmt::format(
            "kvquant keys are calibrated per channel on the raw pre-RoPE keys and cannot follow a "
            "K transform ('{}'); use kvquant for values only, or another K codec", transform_spec));
      }
      if (s.center) {
        return InvalidArgument("center=1 cannot be used with kvquant keys: their per-channel offsets "
                               "are calibrated on the raw keys");
      }
    }
  }
  if (!transform_spec.empty()) {
    auto t = MakeTransform(transform_spec, ctx);
    if (!t.ok()) {
      return Status(t.status().code(), fmt::format("transform '{}': {}", transform_spec,
                                                   t.status().message()));
    }
    s.transform = std::move(t).value();
    if (s.transform->in_dim() != dim_in) {
      return InvalidArgument(fmt::format("transform '{}' expects dim {} but {} has dim {}",
                                         transform_spec, s.transform->in_dim(),
                                         KvKindName(ctx.kind), dim_in));
    }
  }
  s.dim = s.transform ? s.transform->out_dim() : dim_in;
  ctx.dim = s.dim;
  auto c = MakeCodec(codec_spec, ctx);
  if (!c.ok()) return c.status();
  s.codec = std::move(c).value();
  if (s.codec->dim() != s.dim) return Internal("codec dim mismatch");
  if (s.codec->flush_quantum() % s.codec->block_tokens() != 0) {
    return Internal(fmt::format("codec {}: flush quantum not a multiple of block", codec_spec));
  }
  if (ctx.kind == KvKind::kKey) {
    s.pre_rope = s.codec->wants_pre_rope_keys() || (s.transform && s.transform->pre_rope()) ||
                 cfg.position_mode == PositionMode::kInCache || !cfg.predict.empty();
  }
  if (ctx.kind == KvKind::kValue && s.codec->wants_pre_rope_keys()) {
    // Harmless: values have no RoPE.
  }
  return s;
}

// Every configuration error names the layer, K or V, the segment (sink or main) and the spec as
// the user wrote it (an alias, not its expansion), e.g.
// "layer 0 K codec 'turbo4:center=2': turbo: parameter center='2' is not a boolean".
static StatusOr<Stream> MakeStream(const std::string& codec_text, const std::string& transform_text,
                                   const CodecContext& ctx, int dim_in, const KvCacheConfig& cfg,
                                   bool sink) {
  auto s = MakeStreamImpl(codec_text, transform_text, ctx, dim_in, cfg);
  if (s.ok()) return s;
  const std::string msg(s.status().message());
  const bool transform_error = msg.rfind("transform '", 0) == 0;  // labelled by MakeStreamImpl
  return Status(s.status().code(),
                fmt::format("layer {} {} {}{}{}", ctx.layer, KvKindName(ctx.kind),
                            sink ? "sink segment (--kv-sink-codec) " : "",
                            transform_error ? "" : fmt::format("codec '{}': ", codec_text), msg));
}

StatusOr<std::unique_ptr<KvCache>> KvCache::Create(const KvShape& shape, const KvCacheConfig& cfg) {
  if (shape.n_layer <= 0 || shape.n_head <= 0 || shape.n_head_kv <= 0 || shape.head_dim <= 0 ||
      shape.n_head % shape.n_head_kv != 0) {
    return InvalidArgument(fmt::format("bad KV shape: n_layer {} n_head {} n_head_kv {} head_dim {}",
                                       shape.n_layer, shape.n_head, shape.n_head_kv, shape.head_dim));
  }
  if (cfg.sink_tokens < 0) return InvalidArgument("sink_tokens must be >= 0");
  if (!cfg.k_codec_layer.empty() && int(cfg.k_codec_layer.size()) != shape.n_layer) {
    return InvalidArgument("per-layer K codec list must have n_layer entries");
  }
  if (!cfg.v_codec_layer.empty() && int(cfg.v_codec_layer.size()) != shape.n_layer) {
    return InvalidArgument("per-layer V codec list must have n_layer entries");
  }
  if (cfg.demote_k_codec.empty() != cfg.demote_v_codec.empty()) {
    return InvalidArgument("demotion needs both a K and a V codec (demote=SPEC sets both; "
                           "demote_k= / demote_v= set one)");
  }
  if (!(cfg.sink_detect >= 0) ||
      (cfg.sink_detect > 0 && (cfg.sink_detect_layer < 0 || cfg.sink_detect_layer >= shape.n_layer))) {
    return InvalidArgument(fmt::format("sink_detect must be >= 0 (0 = off) and its layer in [0, {}) "
                                       "(got {} at layer {})", shape.n_layer, cfg.sink_detect,
                                       cfg.sink_detect_layer));
  }
  if (cfg.sink_detect > 0 && cfg.sink_detect <= 1) {
    return InvalidArgument(fmt::format("sink_detect={} is a ratio to the channel median and must be "
                                       "> 1 (e.g. 8), or 0 for off", cfg.sink_detect));
  }
  const bool side = !cfg.demote_k_codec.empty() || cfg.sink_detect > 0;
  if (side && cfg.position_mode != PositionMode::kOriginal) {
    return InvalidArgument(fmt::format(
        "demotion (demote=) and activation-found sinks (sink_detect=) keep each cell's original "
        "RoPE position; position mode '{}' (in-cache / rerotate, e.g. from the streaming policy or "
        "pos=) relabels cells and is not supported with them", PositionModeName(cfg.position_mode)));
  }
  std::unique_ptr<KvCache> c(new KvCache());
  c->shape_ = shape;
  c->cfg_ = cfg;
  c->impl_ = std::make_unique<Impl>();
  c->impl_->layers.resize(shape.n_layer);
  for (int l = 0; l < shape.n_layer; ++l) {
    const std::string kc = cfg.k_codec_layer.empty() || cfg.k_codec_layer[l].empty()
                               ? cfg.k_codec : cfg.k_codec_layer[l];
    const std::string vc = cfg.v_codec_layer.empty() || cfg.v_codec_layer[l].empty()
                               ? cfg.v_codec : cfg.v_codec_layer[l];
    auto& heads = c->impl_->layers[l];
    heads.resize(shape.n_head_kv);
    for (int h = 0; h < shape.n_head_kv; ++h) {
      const int n_seg = cfg.sink_tokens > 0 ? 2 : 1;
      for (int sgi = 0; sgi < n_seg; ++sgi) {
        const bool sink = n_seg == 2 && sgi == 0;
        CodecContext ctx;
        ctx.layer = l;
        ctx.n_layer = shape.n_layer;
        ctx.head = h;
        ctx.n_head_kv = shape.n_head_kv;
        ctx.calib = cfg.calib;
        Segment seg;
        seg.capacity = sink ? cfg.sink_tokens : -1;
        ctx.kind = KvKind::kKey;
        ctx.seed = cfg.seed ^ (uint64_t(l) * 0x9E3779B97F4A7C15ull) ^ (uint64_t(h) << 32) ^ 0x4b;
        auto ks = MakeStream(sink ? cfg.sink_codec : kc, cfg.k_transform, ctx, shape.head_dim, cfg,
                             sink);
        if (!ks.ok()) return ks.status();
        seg.k = std::move(ks).value();
        ctx.kind = KvKind::kValue;
        ctx.seed = cfg.seed ^ (uint64_t(l) * 0x9E3779B97F4A7C15ull) ^ (uint64_t(h) << 32) ^ 0x56;
        auto vs = MakeStream(sink ? cfg.sink_codec : vc, cfg.v_transform, ctx, shape.DimV(), cfg,
                             sink);
        if (!vs.ok()) return vs.status();
        seg.v = std::move(vs).value();
        if (sink) seg.k.limit_tokens = seg.v.limit_tokens = cfg.sink_tokens;  // no 64-token step
        heads[h].segs.push_back(std::move(seg));
      }
      if (!side) continue;
      // Side tiers (cache_internal.h SideTier): pinned sinks at sink_codec, demoted cells at the
      // demote codecs. A tier that is not configured has no codec and is skipped everywhere.
      heads[h].side.resize(kNumSideTiers);
      for (int t = 0; t < kNumSideTiers; ++t) {
        const bool pinned = t == kPinnedTier;
        if (pinned ? cfg.sink_detect <= 0 : cfg.demote_k_codec.empty()) continue;
        CodecContext ctx;
        ctx.layer = l;
        ctx.n_layer = shape.n_layer;
        ctx.head = h;
        ctx.n_head_kv = shape.n_head_kv;
        ctx.calib = cfg.calib;
        const uint64_t base = cfg.seed ^ (uint64_t(l) * 0x9E3779B97F4A7C15ull) ^ (uint64_t(h) << 32);
        ctx.kind = KvKind::kKey;
        ctx.seed = base ^ (pinned ? 0x504bull : 0x444bull);
        auto ks = MakeStream(pinned ? cfg.sink_codec : cfg.demote_k_codec, "", ctx, shape.head_dim,
                             cfg, pinned);
        if (!ks.ok()) {
          return Status(ks.status().code(), std::string(pinned ? "" : "demoted tier (demote_k=): ") +
                                                std::string(ks.status().message()));
        }
        ctx.kind = KvKind::kValue;
        ctx.seed = base ^ (pinned ? 0x5056ull : 0x4456ull);
        auto vs = MakeStream(pinned ? cfg.sink_codec : cfg.demote_v_codec, "", ctx, shape.DimV(),
                             cfg, pinned);
        if (!vs.ok()) {
          return Status(vs.status().code(), std::string(pinned ? "" : "demoted tier (demote_v=): ") +
                                                std::string(vs.status().message()));
        }
        heads[h].side[t].seg.k = std::move(ks).value();
        heads[h].side[t].seg.v = std::move(vs).value();
      }
    }
  }
  if (!cfg.predict.empty()) {
    if (!cfg.demote_k_codec.empty() || !cfg.demote_v_codec.empty() || cfg.sink_detect > 0) {
      return InvalidArgument("predict=: demotion (demote=) and activation-found sinks (sink_detect=) "
                             "cannot be combined with predictive coding (cells must stay aligned "
                             "across layers)");
    }
    if (cfg.position_mode != PositionMode::kOriginal) {
      return InvalidArgument("predict=: a predictive cache keeps original positions (no --kv-positions "
                             "in-cache / rerotate)");
    }
    if (!cfg.k_transform.empty() || !cfg.v_transform.empty()) {
      return InvalidArgument("predict=: K/V transforms (kt=, vt=) cannot be combined with predictive "
                             "coding: the predictors act on the raw pre-RoPE keys and values");
    }
    for (int l = 0; l < shape.n_layer; ++l) {
      for (const auto& seg : c->impl_->layers[l][0].segs) {
        for (const Stream* st : {&seg.k, &seg.v}) {
          if (st->block_tokens() != 1 || st->has_window() || st->center || st->transform) {
            return InvalidArgument(fmt::format(
                "predict=: layer {} {} codec '{}' must be a per-token codec without an fp16 window, "
                "centring or rotation transform (e.g. turbo3, turbo:bits=2.5,nc=1, nsn3, q8_0, f16; "
                "q4_0/q4_1/q5_0 only with rot=0); KIVI, KVQuant and center=1 are not supported "
                "with predictive coding",
                l, st == &seg.k ? "K" : "V", st->codec->Name()));
          }
        }
      }
    }
    auto p = KvPredictor::Load(cfg.predict, shape);
    if (!p.ok()) return p.status();
    c->impl_->pred = std::move(p).value();
  }
  // Every cache rotates from a cos/sin table (bit-identical to the direct path): pre-RoPE keys
  // (in-cache positions, KVQuant, low-rank keys) are rotated again at every attention call,
  // centred post-RoPE keys add q·R(pos_j) μ per key (Stream::mu_rope), and every new key and query
  // is rotated once (direct cos/sin per head and token cost ~6 % of batched decode). The table
  // depends only on the RoPE parameters and its length, so one copy is shared by every cache of
  // the process (8,192 positions: 2 MiB at n_rot 64), not counted in any cache's Memory().
  const int64_t table = std::clamp<int64_t>(cfg.rope_table_positions, kRopeTablePositions, kRopeTableMax);
  c->impl_->rope = SharedRope(shape.rope, int(table));
  for (auto& heads : c->impl_->layers) {
    for (auto& hc : heads) {
      for (auto& seg : hc.segs) {
        if (seg.k.center && !seg.k.pre_rope) seg.k.mu_rope = c->impl_->rope.get();
      }
      for (auto& t : hc.side) {
        if (t.seg.k.codec && t.seg.k.center && !t.seg.k.pre_rope) t.seg.k.mu_rope = c->impl_->rope.get();
      }
    }
  }
  return c;
}

// Cell bookkeeping grows in the streams' steps (not by doubling), so the bytes a head holds are a
// step function of its cells that the engine's KV plan can bound (engine/kv_plan.h).
static void AppendCells(HeadCache& hc, const int64_t* seq, const int64_t* pos, int n, int grow_tokens,
                        bool accumulate) {
  if (int64_t(hc.seq.capacity()) < hc.n() + n) {
    const int64_t need = hc.n() + n;
    int64_t want = RoundUp(need, std::max(grow_tokens, 1));
    if (hc.limit_tokens >= 0) want = std::max(need, std::min(want, hc.limit_tokens));
    hc.seq.reserve(size_t(want));
    hc.pos.reserve(size_t(want));
    if (accumulate) hc.acc.reserve(size_t(want));
  }
  for (int i = 0; i < n; ++i) {
    hc.seq.push_back(seq[i]);
    hc.pos.push_back(pos[i]);
    if (accumulate) hc.acc.push_back(0.f);
  }
}

// Appends n cells to a side tier: k [n, head_dim] post-RoPE at pos (modified in place), v [n, dv]
// (modified). The tier's codecs may want pre-RoPE keys (rotated back by −pos), centring
// (Stream::Center) or a rotation (rot=1). Encoded at once (no deferred window flush).
static void SideAppend(SideTier& t, const Rope& rope, float* k, float* v, const int64_t* seq,
                       const int64_t* pos, int64_t n, int hd) {
  if (n <= 0) return;
  Stream& ks = t.seg.k;
  Stream& vs = t.seg.v;
  if (ks.pre_rope) {
    std::vector<int64_t> back(pos, pos + n);
    for (auto& p : back) p = -p;
    rope.Apply(k, int(n), hd, back.data());
  }
  ks.Center(k, n, seq, pos);
  std::vector<float> y;
  if (ks.transform) {
    y.resize(size_t(n) * ks.dim);
    ks.transform->Forward(k, int(n), y.data());
    ks.Append(y.data(), n);
  } else {
    ks.Append(k, n);
  }
  vs.Center(v, n, seq);
  if (vs.transform) {
    y.resize(size_t(n) * vs.dim);
    vs.transform->Forward(v, int(n), y.data());
    vs.Append(y.data(), n);
  } else {
    vs.Append(v, n);
  }
  t.seq.insert(t.seq.end(), seq, seq + n);
  t.pos.insert(t.pos.end(), pos, pos + n);
}

Status KvCache::Write(int layer, const int64_t* seq, int n, const float* k, const float* v) {
  KVC_CHECK(layer >= 0 && layer < shape_.n_layer);
  if (n <= 0) return Status::Ok();
  const int hd = shape_.head_dim, dv = shape_.DimV(), nkv = shape_.n_head_kv;
  for (int64_t i = 0; i < int64_t(n) * nkv * hd; ++i) {
    if (!std::isfinite(k[i])) {
      return InvalidArgument(fmt::format("non-finite key value {} at layer {}, token seq {}",
                                         k[i], layer, seq[i / (int64_t(nkv) * hd)]));
    }
  }
  for (int64_t i = 0; i < int64_t(n) * nkv * dv; ++i) {
    if (!std::isfinite(v[i])) {
      return InvalidArgument(fmt::format("non-finite value {} at layer {}, token seq {}", v[i],
                                         layer, seq[i / (int64_t(nkv) * dv)]));
    }
  }
  for (int i = 1; i < n; ++i) {
    if (seq[i] <= seq[i - 1]) return InvalidArgument("Write: seq must be strictly increasing");
  }
  auto& heads = impl_->layers[layer];
  for (int h = 0; h < nkv; ++h) {
    int64_t last = heads[h].seq.empty() ? -1 : heads[h].seq.back();
    for (const auto& t : heads[h].side) {
      for (int64_t x : t.seq) last = std::max(last, x);
    }
    if (last >= 0 && seq[0] <= last) {
      return InvalidArgument(fmt::format("Write: layer {} seq {} not after cached seq {}", layer,
                                         seq[0], last));
    }
  }
  if (observer_) observer_->OnWrite(layer, seq, n, k, v);
  if (impl_->pred) return WritePredictive(layer, seq, n, k, v);
  const int n_in = n;
  // KVSink (sink_detect): tokens found as sinks (this layer or an earlier one) go to the pinned
  // tier; the rest continue below as main cells.
  std::vector<int64_t> main_seq;
  std::vector<float> main_k, main_v;
  if (cfg_.sink_detect > 0) {
    if (layer >= cfg_.sink_detect_layer) DetectSinks(layer, seq, n, k, v);
    else if (layer == 0) sink_streak_.clear();
    std::vector<int> pin;
    for (int i = 0; i < n; ++i) {
      // Tokens of the sink segment (the first sink_tokens) are already kept at sink_codec there.
      if (seq[i] >= cfg_.sink_tokens &&
          std::binary_search(sink_seqs_.begin(), sink_seqs_.end(), seq[i])) {
        pin.push_back(i);
      }
    }
    if (!pin.empty()) {
      const int np = int(pin.size());
      std::vector<float> pk(size_t(np) * hd), pv(size_t(np) * dv);
      std::vector<int64_t> ps(np), pp(np);
      for (int h = 0; h < nkv; ++h) {
        HeadCache& hc = heads[h];
        for (int j = 0; j < np; ++j) {
          const int i = pin[j];
          std::memcpy(&pk[size_t(j) * hd], k + (int64_t(i) * nkv + h) * hd, hd * sizeof(float));
          std::memcpy(&pv[size_t(j) * dv], v + (int64_t(i) * nkv + h) * dv, dv * sizeof(float));
          ps[j] = seq[i];
          pp[j] = seq[i] - hc.shift;
        }
        impl_->rope->Apply(pk.data(), np, hd, pp.data());
        SideAppend(hc.side[kPinnedTier], *impl_->rope, pk.data(), pv.data(), ps.data(), pp.data(),
                   np, hd);
      }
      for (int i = 0, j = 0; i < n; ++i) {
        if (j < np && pin[j] == i) { ++j; continue; }
        main_seq.push_back(seq[i]);
        main_k.insert(main_k.end(), k + int64_t(i) * nkv * hd, k + int64_t(i + 1) * nkv * hd);
        main_v.insert(main_v.end(), v + int64_t(i) * nkv * dv, v + int64_t(i + 1) * nkv * dv);
      }
      seq = main_seq.data();
      k = main_k.data();
      v = main_v.data();
      n = int(main_seq.size());
    }
  }
  std::vector<float> kx(size_t(n) * hd), vx(size_t(n) * dv), y;
  std::vector<int64_t> pos(n);
  for (int h = 0; h < nkv; ++h) {
    HeadCache& hc = heads[h];
    // Tokens still waiting from a Write that was not followed by Attend.
    for (auto& seg : hc.segs) {
      seg.k.Flush();
      seg.v.Flush();
    }
    for (int i = 0; i < n; ++i) {
      std::memcpy(&kx[size_t(i) * hd], k + (int64_t(i) * nkv + h) * hd, hd * sizeof(float));
      std::memcpy(&vx[size_t(i) * dv], v + (int64_t(i) * nkv + h) * dv, dv * sizeof(float));
      pos[i] = cfg_.position_mode == PositionMode::kInCache ? hc.n() + i : seq[i] - hc.shift;
    }
    int done = 0;
    for (auto& seg : hc.segs) {
      if (done == n) break;
      int take = n - done;
      if (seg.capacity >= 0) take = int(std::min<int64_t>(take, seg.capacity - seg.n()));
      if (take <= 0) continue;
      // Keys: rotate now unless stored pre-RoPE; then transform; then codec.
      float* kp = &kx[size_t(done) * hd];
      if (!seg.k.pre_rope) impl_->rope->Apply(kp, take, hd, &pos[done]);
      seg.k.Center(kp, take, seq + done, &pos[done]);
      if (seg.k.transform) {
        y.resize(size_t(take) * seg.k.dim);
        seg.k.transform->Forward(kp, take, y.data());
        seg.k.Append(y.data(), take, seg.k.has_window());
      } else {
        seg.k.Append(kp, take, seg.k.has_window());
      }
      float* vp = &vx[size_t(done) * dv];
      seg.v.Center(vp, take, seq + done);
      if (seg.v.transform) {
        y.resize(size_t(take) * seg.v.dim);
        seg.v.transform->Forward(vp, take, y.data());
        seg.v.Append(y.data(), take, seg.v.has_window());
      } else {
        seg.v.Append(vp, take, seg.v.has_window());
      }
      done += take;
    }
    KVC_CHECK_EQ(done, n);
    AppendCells(hc, seq, pos.data(), n, cfg_.grow_tokens, stats_.accumulate);
  }
  if (layer == 0) n_consumed_ += n_in;
  return Status::Ok();
}

// Predictive write (kv/predictive.h): residuals against the predictions from the previous layer's
// reconstruction (and, for values, this layer's reconstructed keys). Keys stay pre-RoPE; codecs
// are per-token without windows (checked in Create), so a token's stored row is final at once.
Status KvCache::WritePredictive(int layer, const int64_t* seq, int n, const float* k, const float* v) {
  const int hd = shape_.head_dim, dv = shape_.DimV(), nkv = shape_.n_head_kv;
  const int dk_all = nkv * hd, dv_all = nkv * dv;
  const KvPredictor& pr = *impl_->pred;
  auto& heads = impl_->layers[layer];
  const int64_t n_old = heads[0].n();
  const Recon* prev = nullptr;
  if (layer > 0) {
    if (impl_->layers[layer - 1][0].n() < n_old + n) {
      return FailedPrecondition(fmt::format(
          "predictive cache: layer {} written before layer {} holds these tokens (write layers in "
          "order, as a forward pass does)", layer, layer - 1));
    }
    prev = &PredictiveRecon(shape_, *impl_, layer - 1);
  }
  // Tokens going to the sink segment are stored as they are (prediction 0).
  const int64_t sink_cap = heads[0].segs.size() == 2 ? heads[0].segs[0].capacity : 0;
  const int n_sink = int(std::clamp<int64_t>(sink_cap - n_old, 0, n));
  const int m = n - n_sink;
  std::vector<float> kres(k, k + size_t(n) * dk_all), vres(v, v + size_t(n) * dv_all);
  std::vector<float> pk(size_t(m) * dk_all, 0.f), khat(size_t(n) * dk_all), pv(size_t(m) * dv_all);
  if (layer > 0 && m > 0) {
    pr.PredictK(layer, prev->k.data() + size_t(n_old + n_sink) * dk_all,
                prev->v.data() + size_t(n_old + n_sink) * dv_all, m, pk.data());
    for (size_t i = 0; i < pk.size(); ++i) kres[size_t(n_sink) * dk_all + i] -= pk[i];
  }
  std::vector<int64_t> pos(n);
  for (int i = 0; i < n; ++i) pos[i] = seq[i] - heads[0].shift;
  std::vector<float> x(size_t(n) * std::max(hd, dv)), dec(size_t(n) * std::max(hd, dv));
  // Appends rows [0, n) of one head (x: [n, dim]) to its segments; decodes the stored rows back
  // into dec (what the decoder will read).
  auto append_head = [&](HeadCache& hc, bool keys, int dim) {
    int done = 0;
    for (auto& seg : hc.segs) {
      if (done == n) break;
      Stream& st = keys ? seg.k : seg.v;
      int take = n - done;  // capacity of this stream (keys go in first, so not seg.n())
      if (seg.capacity >= 0) take = int(std::min<int64_t>(take, seg.capacity - st.n()));
      if (take <= 0) continue;
      st.Append(&x[size_t(done) * dim], take);
      KVC_CHECK_EQ(st.n_tail, 0);
      st.codec->DecodeBlocks(st.packed.data() + size_t(st.n_packed - take) * st.block_bytes(), take,
                             &dec[size_t(done) * dim]);
      done += take;
    }
    KVC_CHECK_EQ(done, n);
  };
  for (int h = 0; h < nkv; ++h) {
    for (int i = 0; i < n; ++i) {
      std::memcpy(&x[size_t(i) * hd], &kres[(size_t(i) * nkv + h) * hd], hd * sizeof(float));
    }
    append_head(heads[h], true, hd);
    for (int i = 0; i < n; ++i) {
      std::memcpy(&khat[(size_t(i) * nkv + h) * hd], &dec[size_t(i) * hd], hd * sizeof(float));
    }
  }
  for (size_t i = 0; i < pk.size(); ++i) khat[size_t(n_sink) * dk_all + i] += pk[i];
  if (m > 0) {
    pr.PredictV(layer, layer > 0 ? prev->k.data() + size_t(n_old + n_sink) * dk_all : nullptr,
                layer > 0 ? prev->v.data() + size_t(n_old + n_sink) * dv_all : nullptr,
                khat.data() + size_t(n_sink) * dk_all, m, pv.data());
    for (size_t i = 0; i < pv.size(); ++i) vres[size_t(n_sink) * dv_all + i] -= pv[i];
  }
  for (int h = 0; h < nkv; ++h) {
    for (int i = 0; i < n; ++i) {
      std::memcpy(&x[size_t(i) * dv], &vres[(size_t(i) * nkv + h) * dv], dv * sizeof(float));
    }
    append_head(heads[h], false, dv);
    AppendCells(heads[h], seq, pos.data(), n, cfg_.grow_tokens, stats_.accumulate);
  }
  if (layer == 0) n_consumed_ += n;
  return Status::Ok();
}

const Recon& PredictiveRecon(const KvShape& shape, KvCache::Impl& im, int l) {
  auto& heads = im.layers[l];
  const int64_t n = heads[0].n();
  Recon& r = im.recon[l % 2];
  if (r.layer == l && r.n == n && r.gen == im.gen) return r;
  const Recon* prev = nullptr;
  if (l > 0) {
    KVC_CHECK(im.layers[l - 1][0].n() >= n);
    prev = &PredictiveRecon(shape, im, l - 1);
  }
  const int nkv = shape.n_head_kv, hd = shape.head_dim, dv = shape.DimV();
  const int dk_all = nkv * hd, dv_all = nkv * dv;
  r.layer = -1;
  r.k.resize(size_t(n) * dk_all);
  r.v.resize(size_t(n) * dv_all);
  std::vector<float> rows;
  for (int h = 0; h < nkv; ++h) {
    int64_t off = 0;
    for (const auto& seg : heads[h].segs) {
      for (const Stream* st : {&seg.k, &seg.v}) {
        const int dim = st == &seg.k ? hd : dv;
        const int all = st == &seg.k ? dk_all : dv_all;
        float* dst = st == &seg.k ? r.k.data() : r.v.data();
        rows.resize(size_t(st->n()) * dim);
        st->DecodeAll(rows.data());
        for (int64_t i = 0; i < st->n(); ++i) {
          std::memcpy(dst + size_t(off + i) * all + size_t(h) * dim, &rows[size_t(i) * dim],
                      dim * sizeof(float));
        }
      }
      off += seg.n();
    }
  }
  const int64_t n_sink = heads[0].segs.size() == 2 ? heads[0].segs[0].n() : 0;
  const int64_t m = n - n_sink;
  if (m > 0) {
    std::vector<float> p(size_t(m) * std::max(dk_all, dv_all));
    if (l > 0) {
      im.pred->PredictK(l, prev->k.data() + size_t(n_sink) * dk_all,
                        prev->v.data() + size_t(n_sink) * dv_all, m, p.data());
      float* dst = r.k.data() + size_t(n_sink) * dk_all;
      for (size_t i = 0; i < size_t(m) * dk_all; ++i) dst[i] += p[i];
    }
    im.pred->PredictV(l, l > 0 ? prev->k.data() + size_t(n_sink) * dk_all : nullptr,
                      l > 0 ? prev->v.data() + size_t(n_sink) * dv_all : nullptr,
                      r.k.data() + size_t(n_sink) * dk_all, m, p.data());
    float* dst = r.v.data() + size_t(n_sink) * dv_all;
    for (size_t i = 0; i < size_t(m) * dv_all; ++i) dst[i] += p[i];
  }
  r.layer = l;
  r.n = n;
  r.gen = im.gen;
  return r;
}

void ReleasePredictiveRecon(KvCache::Impl& im) {
  for (Recon& r : im.recon) {
    r = Recon();
  }
}

int64_t KvCache::n_cells(int layer, int head) const { return impl_->layers[layer][head].n(); }
const std::vector<int64_t>& KvCache::seqs(int layer, int head) const {
  return impl_->layers[layer][head].seq;
}
const std::vector<int64_t>& KvCache::positions(int layer, int head) const {
  return impl_->layers[layer][head].pos;
}
std::vector<float>& KvCache::acc_scores(int layer, int head) {
  auto& hc = impl_->layers[layer][head];
  hc.acc.resize(hc.seq.size(), 0.f);
  return hc.acc;
}
const std::vector<float>& KvCache::obs_scores(int layer, int head) const {
  return impl_->layers[layer][head].obs;
}
int64_t KvCache::pos_shift(int layer, int head) const { return impl_->layers[layer][head].shift; }
void KvCache::set_pos_shift(int layer, int head, int64_t s) { impl_->layers[layer][head].shift = s; }

// Decodes one stream fully into the head_dim domain: reconstructs transforms, applies RoPE for
// pre-RoPE keys at `rope_pos` (null for values). out [n, dim_in].
void DecodeStreamFull(const Stream& s, const Rope* rope, const int64_t* rope_pos, float* out) {
  const int64_t n = s.n();
  if (n == 0) return;
  if (s.transform) {
    thread_local std::vector<float> y;  // latent rows, reused across calls (no zero-fill)
    if (y.size() < size_t(n) * s.dim) y.resize(size_t(n) * s.dim);
    s.DecodeAll(y.data());
    s.ToInput(y.data(), n, out, rope_pos);
  } else {
    s.DecodeAll(out);
    s.ToInput(out, n, out, rope_pos);
  }
  if (rope && s.pre_rope) rope->Apply(out, int(n), s.dim_in, rope_pos);
}

void KvCache::DecodeKeys(int layer, int head, float* k) const {
  const auto& hc = impl_->layers[layer][head];
  if (impl_->pred) {
    const Recon& r = PredictiveRecon(shape_, *impl_, layer);
    const int hd = shape_.head_dim, all = shape_.n_head_kv * hd;
    for (int64_t i = 0; i < hc.n(); ++i) {
      std::memcpy(k + i * hd, &r.k[size_t(i) * all + size_t(head) * hd], hd * sizeof(float));
    }
    impl_->rope->Apply(k, int(hc.n()), hd, hc.pos.data());
    return;
  }
  std::vector<int64_t> rp(hc.pos);
  if (cfg_.position_mode == PositionMode::kInCache) std::iota(rp.begin(), rp.end(), 0);
  int64_t off = 0;
  for (const auto& seg : hc.segs) {
    DecodeStreamFull(seg.k, impl_->rope.get(), rp.data() + off, k + off * shape_.head_dim);
    off += seg.n();
  }
}

// KVSink-style sink detection (Su & Yuan, "KVSink", arXiv 2508.04257, abstract and Fig. 1: sink tokens beyond
// position 0 carry stable massive activations and are predicted from them). The hidden states are
// not reachable from the cache, so the rule reads their trace in the values: a sink token's value
// vectors are tiny (its attention mass is a no-op). Measured on SmolLM2-135M, WikiText-2, 512
// tokens (docs/eviction.md "Activation-found sinks"): ||v|| of token 0 is 0.09-0.38x the median in
// layers 12-29, and 15-17 other tokens sit at 0.11-0.23x in every layer 3-9 while no other token
// goes below 0.4x in any layer; key channels showed no such separation (max |k_c| / median: the
// same 6-14x for all tokens). Rule: in layers >= sink_detect_layer, a token whose ||v|| (all KV
// heads of the layer) is below median / sink_detect in kSinkStableLayers consecutive layers is a
// sink from that layer on. The median is the write batch's (>= 16 tokens) or, for smaller batches
// (decode), the last such batch's of that layer.
constexpr int kSinkStableLayers = 3;
constexpr int kSinkMinBatch = 16;

void KvCache::DetectSinks(int layer, const int64_t* seq, int n, const float* k, const float* v) {
  (void)k;
  const int wv = shape_.n_head_kv * shape_.DimV();
  if (sink_ref_.size() != size_t(shape_.n_layer)) sink_ref_.assign(shape_.n_layer, 0.f);
  std::vector<float> vn(n);
  for (int i = 0; i < n; ++i) {
    double s = 0;
    for (int c = 0; c < wv; ++c) s += double(v[int64_t(i) * wv + c]) * v[int64_t(i) * wv + c];
    vn[i] = float(std::sqrt(s));
  }
  if (n >= kSinkMinBatch) {
    std::vector<float> t(vn);
    std::nth_element(t.begin(), t.begin() + n / 2, t.end());
    sink_ref_[layer] = t[n / 2];
  }
  const float ref = sink_ref_[layer];
  for (int i = 0; i < n; ++i) {
    const bool low = ref > 0 && vn[i] * cfg_.sink_detect < ref;
    int& streak = sink_streak_[seq[i]];
    streak = low ? streak + 1 : 0;
    if (streak >= kSinkStableLayers) {
      auto it = std::lower_bound(sink_seqs_.begin(), sink_seqs_.end(), seq[i]);
      if (it == sink_seqs_.end() || *it != seq[i]) sink_seqs_.insert(it, seq[i]);
    }
  }
  if (const char* dump = std::getenv("KVC_SINK_DUMP")) {  // debug: per-token ||v|| per layer
    if (std::FILE* f = std::fopen(dump, "a")) {
      std::fprintf(f, "{\"layer\":%d,\"ref\":%.5g,\"seq\":[", layer, ref);
      for (int i = 0; i < n; ++i) std::fprintf(f, "%s%lld", i ? "," : "", (long long)seq[i]);
      std::fprintf(f, "],\"vnorm\":[");
      for (int i = 0; i < n; ++i) std::fprintf(f, "%s%.4g", i ? "," : "", vn[i]);
      std::fprintf(f, "]}\n");
      std::fclose(f);
    }
  }
  // Streaks only span one forward pass (layers in order): forget them after the last layer.
  if (layer == shape_.n_layer - 1) {
    for (int i = 0; i < n; ++i) sink_streak_.erase(seq[i]);
  }
}

int64_t KvCache::n_demoted(int layer, int head) const {
  const auto& hc = impl_->layers[layer][head];
  return hc.side.empty() ? 0 : hc.side[kDemotedTier].n();
}
int64_t KvCache::n_pinned(int layer, int head) const {
  const auto& hc = impl_->layers[layer][head];
  return hc.side.empty() ? 0 : hc.side[kPinnedTier].n();
}
std::vector<int64_t> KvCache::demoted_seqs(int layer, int head) const {
  const auto& hc = impl_->layers[layer][head];
  return hc.side.empty() ? std::vector<int64_t>{} : hc.side[kDemotedTier].seq;
}
std::vector<int64_t> KvCache::pinned_seqs(int layer, int head) const {
  const auto& hc = impl_->layers[layer][head];
  return hc.side.empty() ? std::vector<int64_t>{} : hc.side[kPinnedTier].seq;
}

void KvCache::DecodeAllTiers(int layer, int head, std::vector<int64_t>* seq,
                             std::vector<int64_t>* pos, std::vector<float>* k,
                             std::vector<float>* v) const {
  const auto& hc = impl_->layers[layer][head];
  const int hd = shape_.head_dim, dv = shape_.DimV();
  *seq = hc.seq;
  *pos = hc.pos;
  k->assign(size_t(hc.n()) * hd, 0.f);
  v->assign(size_t(hc.n()) * dv, 0.f);
  DecodeKeys(layer, head, k->data());
  DecodeValues(layer, head, v->data());
  for (const auto& t : hc.side) {
    if (!t.seg.k.codec || t.n() == 0) continue;
    const size_t k0 = k->size(), v0 = v->size();
    k->resize(k0 + size_t(t.n()) * hd);
    v->resize(v0 + size_t(t.n()) * dv);
    DecodeStreamFull(t.seg.k, impl_->rope.get(), t.pos.data(), k->data() + k0);
    DecodeStreamFull(t.seg.v, nullptr, nullptr, v->data() + v0);
    seq->insert(seq->end(), t.seq.begin(), t.seq.end());
    pos->insert(pos->end(), t.pos.begin(), t.pos.end());
  }
}

void KvCache::DecodeValues(int layer, int head, float* v) const {
  const auto& hc = impl_->layers[layer][head];
  if (impl_->pred) {
    const Recon& r = PredictiveRecon(shape_, *impl_, layer);
    const int dv = shape_.DimV(), all = shape_.n_head_kv * dv;
    for (int64_t i = 0; i < hc.n(); ++i) {
      std::memcpy(v + i * dv, &r.v[size_t(i) * all + size_t(head) * dv], dv * sizeof(float));
    }
    return;
  }
  int64_t off = 0;
  for (const auto& seg : hc.segs) {
    DecodeStreamFull(seg.v, nullptr, nullptr, v + off * shape_.DimV());
    off += seg.n();
  }
}

// Re-encodes a stream keeping rows `keep` (indices local to the stream). Per-token formats with
// no tail move packed rows; anything else decodes and re-encodes the kept rows.
static void KeepRows(Stream& s, const std::vector<int32_t>& keep) {
  const int64_t n = s.n();
  if (int64_t(keep.size()) == n) return;
  if (s.block_tokens() == 1 && s.n_tail == 0) {
    const size_t bb = s.block_bytes();
    for (size_t i = 0; i < keep.size(); ++i) {
      if (int64_t(i) != keep[i]) {
        std::memmove(s.packed.data() + i * bb, s.packed.data() + size_t(keep[i]) * bb, bb);
      }
    }
    s.packed.resize(keep.size() * bb);
    std::vector<uint8_t> shrunk;
    const int64_t step = std::max(s.grow_tokens, 1);
    int64_t want_tokens = RoundUp(int64_t(keep.size()), step);
    if (s.limit_tokens >= 0) {
      want_tokens = std::max(int64_t(keep.size()), std::min(want_tokens, s.limit_tokens));
    }
    shrunk.reserve(size_t(want_tokens) * bb);
    shrunk.assign(s.packed.begin(), s.packed.end());
    s.packed.swap(shrunk);
    s.n_packed = int64_t(keep.size());
    return;
  }
  std::vector<float> all(size_t(n) * s.dim), kept(keep.size() * size_t(s.dim));
  s.DecodeAll(all.data());
  for (size_t i = 0; i < keep.size(); ++i) {
    std::memcpy(&kept[i * s.dim], &all[size_t(keep[i]) * s.dim], s.dim * sizeof(float));
  }
  s.Rebuild(kept.data(), int64_t(keep.size()));
}

Status KvCache::Keep(int layer, int head, const std::vector<int32_t>& keep) {
  return KeepCells(layer, head, keep, demotes());
}

Status KvCache::KeepCells(int layer, int head, const std::vector<int32_t>& keep, bool demote) {
  if (layer < 0 || layer >= shape_.n_layer || head < 0 || head >= shape_.n_head_kv) {
    return InvalidArgument("Keep: layer/head out of range");
  }
  auto& hc = impl_->layers[layer][head];
  for (size_t i = 0; i < keep.size(); ++i) {
    if (keep[i] < 0 || keep[i] >= hc.n() || (i > 0 && keep[i] <= keep[i - 1])) {
      return InvalidArgument("Keep: indices must be sorted, unique and in range");
    }
  }
  if (impl_->pred && int64_t(keep.size()) != hc.n()) {
    if (!impl_->truncating) {
      return FailedPrecondition("a predictive cache (predict=) keeps every token: its cells must stay "
                                "aligned across layers, so eviction is not supported");
    }
    ++impl_->gen;
  }
  if (demote && int64_t(keep.size()) < hc.n()) {
    // MiKV: the cells not kept move to the demoted tier. They are decoded from their current codec
    // (post-RoPE keys at their positions, values) and re-encoded with the demote codecs, so a
    // demoted token carries the error of both codecs (the main codec's is small next to ~2 bits).
    const int hd = shape_.head_dim, dv = shape_.DimV();
    const int64_t n = hc.n();
    std::vector<float> ak(size_t(n) * hd), av(size_t(n) * dv);
    DecodeKeys(layer, head, ak.data());
    DecodeValues(layer, head, av.data());
    std::vector<float> dk, dvv;
    std::vector<int64_t> ds, dp;
    size_t j = 0;
    for (int64_t i = 0; i < n; ++i) {
      if (j < keep.size() && keep[j] == i) { ++j; continue; }
      dk.insert(dk.end(), ak.begin() + i * hd, ak.begin() + (i + 1) * hd);
      dvv.insert(dvv.end(), av.begin() + i * dv, av.begin() + (i + 1) * dv);
      ds.push_back(hc.seq[i]);
      dp.push_back(hc.pos[i]);
    }
    SideAppend(hc.side[kDemotedTier], *impl_->rope, dk.data(), dvv.data(), ds.data(), dp.data(),
               int64_t(ds.size()), hd);
  }
  int64_t off = 0;
  for (auto& seg : hc.segs) {
    const int64_t n = seg.n();
    std::vector<int32_t> local;
    for (int32_t idx : keep) {
      if (idx >= off && idx < off + n) local.push_back(int32_t(idx - off));
    }
    KeepRows(seg.k, local);
    KeepRows(seg.v, local);
    off += n;
  }
  auto pick = [&](auto& vec) {
    if (vec.size() != hc.seq.size()) { vec.clear(); return; }
    std::remove_reference_t<decltype(vec)> out;
    out.reserve(keep.size());
    for (int32_t idx : keep) out.push_back(vec[idx]);
    vec.swap(out);
  };
  pick(hc.acc);
  pick(hc.obs);
  pick(hc.pos);
  pick(hc.seq);
  return Status::Ok();
}

Status KvCache::Relabel(int layer, int head, const std::vector<int64_t>& new_pos) {
  auto& hc = impl_->layers[layer][head];
  if (impl_->pred) {
    return FailedPrecondition("a predictive cache (predict=) keeps original positions: Relabel is "
                              "not supported");
  }
  if (int64_t(new_pos.size()) != hc.n()) return InvalidArgument("Relabel: size mismatch");
  int64_t off = 0;
  const int hd = shape_.head_dim;
  for (auto& seg : hc.segs) {
    const int64_t n = seg.n();
    if (!seg.k.pre_rope && n > 0) {
      // Re-rotate: decode stored keys (post-RoPE), rotate by the delta, re-encode.
      std::vector<float> y(size_t(n) * seg.k.dim), x(size_t(n) * hd);
      seg.k.DecodeAll(y.data());
      seg.k.ToInput(y.data(), n, x.data(), hc.pos.data() + off);
      std::vector<int64_t> delta(n);
      for (int64_t i = 0; i < n; ++i) delta[i] = new_pos[off + i] - hc.pos[off + i];
      impl_->rope->Apply(x.data(), int(n), hd, delta.data());
      // The stream's μ (set: it holds tokens), at the new positions.
      seg.k.Center(x.data(), n, hc.seq.data() + off, new_pos.data() + off);
      if (seg.k.transform) {
        seg.k.transform->Forward(x.data(), int(n), y.data());
        seg.k.Rebuild(y.data(), n);
      } else {
        seg.k.Rebuild(x.data(), n);
      }
    }
    off += n;
  }
  hc.pos = new_pos;
  return Status::Ok();
}

void KvCache::SetStorageLimit(int64_t tokens) {
  for (auto& heads : impl_->layers) {
    for (auto& hc : heads) {
      hc.limit_tokens = tokens;
      for (auto& seg : hc.segs) {
        // A bounded segment (sinks) never needs more than its capacity.
        int64_t lim = tokens;
        if (seg.capacity >= 0) lim = lim < 0 ? seg.capacity : std::min(lim, seg.capacity);
        seg.k.limit_tokens = lim;
        seg.v.limit_tokens = lim;
      }
    }
  }
}

Status KvCache::TruncateAfter(int64_t last_seq) {
  for (int l = 0; l < shape_.n_layer; ++l) {
    for (int h = 0; h < shape_.n_head_kv; ++h) {
      auto& hc = impl_->layers[l][h];
      const int64_t n_keep =
          std::upper_bound(hc.seq.begin(), hc.seq.end(), last_seq) - hc.seq.begin();
      if (n_keep < hc.n()) {
        std::vector<int32_t> keep(static_cast<size_t>(n_keep));
        std::iota(keep.begin(), keep.end(), 0);
        impl_->truncating = true;
        const Status st = KeepCells(l, h, keep, /*demote=*/false);
        impl_->truncating = false;
        KVC_RETURN_IF_ERROR(st);
      }
      // Side tiers are in arrival order: filter by seq (the tokens after last_seq never existed).
      for (auto& t : hc.side) {
        if (!t.seg.k.codec) continue;
        std::vector<int32_t> keep;
        for (int64_t i = 0; i < t.n(); ++i) {
          if (t.seq[i] <= last_seq) keep.push_back(int32_t(i));
        }
        if (int64_t(keep.size()) == t.n()) continue;
        KeepRows(t.seg.k, keep);
        KeepRows(t.seg.v, keep);
        std::vector<int64_t> s2, p2;
        for (int32_t i : keep) { s2.push_back(t.seq[i]); p2.push_back(t.pos[i]); }
        t.seq.swap(s2);
        t.pos.swap(p2);
      }
      // The next token (seq n_consumed_) continues at position (last_seq + 1) - old shift.
      hc.shift += n_consumed_ - (last_seq + 1);
    }
  }
  return Status::Ok();
}

void KvCache::FlushLayer(int layer) {
  for (auto& hc : impl_->layers[layer]) {
    for (auto& seg : hc.segs) {
      seg.k.Flush();
      seg.v.Flush();
    }
  }
}

void KvCache::Flush() {
  for (int l = 0; l < shape_.n_layer; ++l) FlushLayer(l);
}

void KvCache::Clear() {
  for (auto& heads : impl_->layers) {
    for (auto& hc : heads) {
      for (auto& seg : hc.segs) {
        seg.k.Rebuild(nullptr, 0);
        seg.v.Rebuild(nullptr, 0);
      }
      hc.seq.clear(); hc.seq.shrink_to_fit();
      hc.pos.clear(); hc.pos.shrink_to_fit();
      hc.acc.clear(); hc.acc.shrink_to_fit();
      hc.obs.clear(); hc.obs.shrink_to_fit();
      hc.shift = 0;
      for (auto& t : hc.side) {
        if (!t.seg.k.codec) continue;
        t.seg.k.Rebuild(nullptr, 0);
        t.seg.v.Rebuild(nullptr, 0);
        t.seg.k.mu.clear();  // a new sequence: centring restarts from its first batch
        t.seg.v.mu.clear();
        t.seq.clear(); t.seq.shrink_to_fit();
        t.pos.clear(); t.pos.shrink_to_fit();
      }
    }
  }
  ++impl_->gen;
  ReleasePredictiveRecon(*impl_);
  sink_seqs_.clear();
  sink_streak_.clear();
  sink_ref_.clear();
  n_consumed_ = 0;
}

MemoryReport KvCache::Memory() const {
  MemoryReport r;
  r.layers.resize(shape_.n_layer);
  for (int l = 0; l < shape_.n_layer; ++l) {
    auto& L = r.layers[l];
    for (const auto& hc : impl_->layers[l]) {
      for (const auto& seg : hc.segs) {
        L.k_packed += seg.k.packed_bytes();
        L.v_packed += seg.v.packed_bytes();
        L.k_tail += seg.k.tail_bytes();
        L.v_tail += seg.v.tail_bytes();
        if (seg.k.transform) L.transform += seg.k.transform->ParamBytes();
        if (seg.v.transform) L.transform += seg.v.transform->ParamBytes();
        L.transform += (seg.k.mu.capacity() + seg.v.mu.capacity()) * sizeof(float);
      }
      L.cells += (hc.seq.capacity() + hc.pos.capacity()) * sizeof(int64_t) +
                 (hc.acc.capacity() + hc.obs.capacity()) * sizeof(float);
      L.n_cells += hc.n();
      for (const auto& t : hc.side) {
        if (!t.seg.k.codec) continue;
        L.k_packed += t.seg.k.packed_bytes();
        L.v_packed += t.seg.v.packed_bytes();
        L.k_tail += t.seg.k.tail_bytes();
        L.v_tail += t.seg.v.tail_bytes();
        if (t.seg.k.transform) L.transform += t.seg.k.transform->ParamBytes();
        if (t.seg.v.transform) L.transform += t.seg.v.transform->ParamBytes();
        L.transform += (t.seg.k.mu.capacity() + t.seg.v.mu.capacity()) * sizeof(float);
        L.cells += (t.seq.capacity() + t.pos.capacity()) * sizeof(int64_t);
        L.n_side_cells += t.n();
      }
    }
  }
  for (const Recon& rc : impl_->recon) r.scratch += (rc.k.capacity() + rc.v.capacity()) * sizeof(float);
  return r;
}

const Codec& KvCache::body_codec(int layer, KvKind kind) const {
  const auto& seg = impl_->layers[layer][0].segs.back();
  return kind == KvKind::kKey ? *seg.k.codec : *seg.v.codec;
}

// Bits per stored value relative to head_dim values (so a rank-r latent counts as fewer bits).
static double StreamBits(const Stream& s) { return s.codec->BitsPerValue() * s.dim / s.dim_in; }

double KvCache::KBitsPerValue() const {
  double s = 0;
  for (int l = 0; l < shape_.n_layer; ++l) s += StreamBits(impl_->layers[l][0].segs.back().k);
  return s / shape_.n_layer;
}
double KvCache::VBitsPerValue() const {
  double s = 0;
  for (int l = 0; l < shape_.n_layer; ++l) s += StreamBits(impl_->layers[l][0].segs.back().v);
  return s / shape_.n_layer;
}

std::string KvCache::Describe() const {
  const auto& seg = impl_->layers[0][0].segs.back();
  std::string d = fmt::format("K={} V={}", seg.k.codec->Name(), seg.v.codec->Name());
  if (seg.k.transform) d += " Kt=" + seg.k.transform->Name();
  if (seg.v.transform) d += " Vt=" + seg.v.transform->Name();
  if (seg.k.center) d += " Kcenter";
  if (seg.v.center) d += " Vcenter";
  if (cfg_.sink_tokens > 0) d += fmt::format(" sinks={}@{}", cfg_.sink_tokens, cfg_.sink_codec);
  if (cfg_.sink_detect > 0) {
    d += fmt::format(" sink_detect={}@L{}:{}", cfg_.sink_detect, cfg_.sink_detect_layer, cfg_.sink_codec);
  }
  if (demotes()) d += fmt::format(" demote=K:{},V:{}", cfg_.demote_k_codec, cfg_.demote_v_codec);
  if (impl_->pred) d += " predict=" + cfg_.predict;
  if (cfg_.position_mode != PositionMode::kOriginal) {
    d += std::string(" pos=") + PositionModeName(cfg_.position_mode);
  }
  return d;
}

}  // namespace kvc::kv
