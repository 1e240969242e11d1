#include "kv/codecs/kivi.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <numeric>
#include <vector>

#include <fmt/format.h>

#include "cpu/kv_kernels.h"
#include "cpu/ops.h"
#include "gguf/types.h"
#include "kv/cache_internal.h"

namespace kvc::kv {
namespace {

// codes [n] (each < 2^bits) -> out [n·bits/8], little-endian within a byte.
void Pack(const uint8_t* codes, int n, int bits, uint8_t* out) {
  const int per = 8 / bits;
  std::memset(out, 0, size_t(n) * bits / 8);
  for (int i = 0; i < n; ++i) out[i / per] |= uint8_t(codes[i] << (bits * (i % per)));
}
void Unpack(const uint8_t* in, int n, int bits, uint8_t* codes) {
  const int per = 8 / bits;
  const uint8_t mask = uint8_t((1 << bits) - 1);
  for (int i = 0; i < n; ++i) codes[i] = (in[i / per] >> (bits * (i % per))) & mask;
}

// One group of n values at stride `stride`: writes (s, z) fp16 and codes [n].
void QuantizeGroup(const float* x, int n, int stride, int bits, uint16_t* sz, uint8_t* codes) {
  float mn = x[0], mx = x[0];
  for (int i = 1; i < n; ++i) {
    mn = std::min(mn, x[size_t(i) * stride]);
    mx = std::max(mx, x[size_t(i) * stride]);
  }
  const int qmax = (1 << bits) - 1;
  sz[0] = Fp32ToFp16Sat((mx - mn) / float(qmax));
  sz[1] = Fp32ToFp16Sat(mn);
  const float s = gguf::Fp16ToFp32(sz[0]), z = gguf::Fp16ToFp32(sz[1]);
  const float is = s > 0.f ? 1.f / s : 0.f;
  for (int i = 0; i < n; ++i) {
    const float c = std::nearbyint((x[size_t(i) * stride] - z) * is);
    codes[i] = uint8_t(std::clamp(c, 0.f, float(qmax)));
  }
}

class KiviCodec final : public Codec {
 public:
  KiviCodec(KvKind kind, int d, int bits, int group, int residual)
      : kind_(kind), d_(d), bits_(bits), g_(group), r_(residual) {}

  std::string Name() const override {
    return fmt::format("kivi:bits={},group={},residual={}", bits_, g_, r_);
  }
  int dim() const override { return d_; }
  int block_tokens() const override { return kind_ == KvKind::kKey ? g_ : 1; }
  int residual_tokens() const override { return kind_ == KvKind::kKey ? 0 : r_; }
  int flush_quantum() const override {
    if (kind_ == KvKind::kValue) return 1;
    return r_ == 0 ? g_ : (r_ + g_ - 1) / g_ * g_;
  }
  size_t BlockBytes() const override {
    if (kind_ == KvKind::kKey) return size_t(4) * d_ + size_t(d_) * g_ * bits_ / 8;
    return size_t(4) * (d_ / g_) + size_t(d_) * bits_ / 8;
  }

  void Encode(const float* x, uint8_t* block) override {
    std::vector<uint8_t> codes(std::max(g_, d_));
    if (kind_ == KvKind::kKey) {
      // x [G, d]: channel c is x[t·d + c], t = 0..G-1.
      const size_t cb = size_t(g_) * bits_ / 8;
      for (int c = 0; c < d_; ++c) {
        uint16_t sz[2];
        QuantizeGroup(x + c, g_, d_, bits_, sz, codes.data());
        std::memcpy(block + 4 * c, sz, 4);
        Pack(codes.data(), g_, bits_, block + 4 * d_ + c * cb);
      }
    } else {
      const int ng = d_ / g_;
      for (int gi = 0; gi < ng; ++gi) {
        uint16_t sz[2];
        QuantizeGroup(x + gi * g_, g_, 1, bits_, sz, codes.data() + gi * g_);
        std::memcpy(block + 4 * gi, sz, 4);
      }
      Pack(codes.data(), d_, bits_, block + 4 * ng);
    }
  }

  // Highway decode (cpu::AffineGroupRows / AffineCodesRow: code · s + z, bit-identical to the
  // scalar unpack below, DecodeScalar, which the kernels' tests mirror).
  void Decode(const uint8_t* block, float* x) const override {
    if (kind_ == KvKind::kValue) {
      cpu::AffineGroupRows(block, 1, BlockBytes(), d_ / g_, g_, bits_, x);
      return;
    }
    const size_t cb = size_t(g_) * bits_ / 8;
    float tmp[4096];
    if (g_ > 4096) return DecodeScalar(block, x);
    for (int c = 0; c < d_; ++c) {
      uint16_t sz[2];
      std::memcpy(sz, block + 4 * c, 4);
      cpu::AffineCodesRow(block + 4 * d_ + c * cb, g_, bits_, gguf::Fp16ToFp32(sz[0]),
                          gguf::Fp16ToFp32(sz[1]), tmp);
      for (int t = 0; t < g_; ++t) x[size_t(t) * d_ + c] = tmp[t];
    }
  }
  void DecodeScalar(const uint8_t* block, float* x) const {
    std::vector<float> s, z;
    std::vector<uint8_t> codes;
    Unpacked(block, &s, &z, &codes);
    if (kind_ == KvKind::kKey) {
      for (int c = 0; c < d_; ++c) {
        for (int t = 0; t < g_; ++t) x[size_t(t) * d_ + c] = float(codes[c * g_ + t]) * s[c] + z[c];
      }
    } else {
      for (int c = 0; c < d_; ++c) x[c] = float(codes[c]) * s[c / g_] + z[c / g_];
    }
  }

  void Score(const float* qp, int n_q, const uint8_t* block, float* scores) const override {
    std::vector<float> s, z;
    std::vector<uint8_t> codes;
    Unpacked(block, &s, &z, &codes);
    if (kind_ == KvKind::kKey) {
      // scores [n_q, G]: per row, q∘s and q·z once, then an axpy of each channel's G codes.
      std::vector<float> cf(g_);
      for (int r = 0; r < n_q; ++r) {
        const float* q = qp + size_t(r) * d_;
        float qz = 0.f;
        for (int c = 0; c < d_; ++c) qz += q[c] * z[c];
        float* out = scores + size_t(r) * g_;
        for (int t = 0; t < g_; ++t) out[t] = qz;
        for (int c = 0; c < d_; ++c) {
          const float w = q[c] * s[c];
          const uint8_t* cc = &codes[size_t(c) * g_];
          for (int t = 0; t < g_; ++t) out[t] += w * float(cc[t]);
        }
      }
    } else {
      const int ng = d_ / g_;
      for (int r = 0; r < n_q; ++r) {
        const float* q = qp + size_t(r) * d_;
        float acc = 0.f;
        for (int gi = 0; gi < ng; ++gi) {
          float sc = 0.f, sq = 0.f;
          for (int i = 0; i < g_; ++i) {
            sc += q[gi * g_ + i] * float(codes[gi * g_ + i]);
            sq += q[gi * g_ + i];
          }
          acc += s[gi] * sc + z[gi] * sq;
        }
        scores[r] = acc;
      }
    }
  }

  void AccumulateWeighted(const float* p, int n_q, const uint8_t* block, float* out) const override {
    std::vector<float> s, z;
    std::vector<uint8_t> codes;
    Unpacked(block, &s, &z, &codes);
    if (kind_ == KvKind::kValue) {
      const int ng = d_ / g_;
      for (int r = 0; r < n_q; ++r) {
        if (p[r] == 0.f) continue;
        float* o = out + size_t(r) * d_;
        for (int gi = 0; gi < ng; ++gi) {
          const float ws = p[r] * s[gi], wz = p[r] * z[gi];
          for (int i = 0; i < g_; ++i) o[gi * g_ + i] += ws * float(codes[gi * g_ + i]) + wz;
        }
      }
    } else {
      // out_c += s_c Σ_t p_t code_tc + z_c Σ_t p_t.
      for (int r = 0; r < n_q; ++r) {
        const float* pr = p + size_t(r) * g_;
        float psum = 0.f;
        for (int t = 0; t < g_; ++t) psum += pr[t];
        float* o = out + size_t(r) * d_;
        for (int c = 0; c < d_; ++c) {
          const uint8_t* cc = &codes[size_t(c) * g_];
          float a = 0.f;
          for (int t = 0; t < g_; ++t) a += pr[t] * float(cc[t]);
          o[c] += s[c] * a + z[c] * psum;
        }
      }
    }
  }

 // Many blocks (decode attention), Highway kernels (cpu/kv_kernels.h); Score / AccumulateWeighted
  // above are the scalar references (codec_blocks_test). Keys: per block, q ∘ s and q · z once per
  // query row, then one pass over the channels' packed code streams with the G token scores held
  // in registers. Values: SIMD decode of each token's groups into an f32 tile, SIMD dot / axpy.
  void ScoreBlocks(const float* qp, int n_q, const uint8_t* blocks, int64_t n_blocks, float* scores,
                   int64_t ld) const override {
    const size_t bb = BlockBytes();
    const uint8_t* end = blocks + size_t(n_blocks) * bb;
    if (kind_ == KvKind::kValue) {
      cpu::ScoreViaTile(qp, n_q, blocks, bb, n_blocks, d_, scores, ld,
                        [&](const uint8_t* rows, int64_t m, float* x) { DecodeValueRows(rows, m, end, x); });
      return;
    }
    const size_t cb = size_t(g_) * bits_ / 8;
    std::vector<float> sz(2 * size_t(d_)), w(size_t(n_q) * d_), acc(size_t(n_q) * g_);
    std::vector<uint16_t> h(2 * size_t(d_));
    for (int64_t b = 0; b < n_blocks; ++b) {
      const uint8_t* blk = blocks + size_t(b) * bb;
      std::memcpy(h.data(), blk, 4 * size_t(d_));
      cpu::F16ToF32(h.data(), 2 * d_, sz.data());  // (s_c, z_c) interleaved
      for (int r = 0; r < n_q; ++r) {
        const float* q = qp + size_t(r) * d_;
        float qz = 0.f;
        for (int c = 0; c < d_; ++c) {
          qz += q[c] * sz[2 * c + 1];
          w[size_t(r) * d_ + c] = q[c] * sz[2 * c];
        }
        std::fill(acc.begin() + size_t(r) * g_, acc.begin() + size_t(r + 1) * g_, qz);
      }
      cpu::AxpyCodesRows(blk + 4 * d_, d_, cb, g_, bits_, w.data(), n_q, acc.data());
      for (int r = 0; r < n_q; ++r) {
        std::copy(acc.begin() + size_t(r) * g_, acc.begin() + size_t(r + 1) * g_,
                  scores + size_t(r) * ld + size_t(b) * g_);
      }
    }
  }
  void AccumulateBlocks(const float* p, int64_t ld, int n_q, const uint8_t* blocks, int64_t n_blocks,
                        float* out) const override {
    const size_t bb = BlockBytes();
    if (kind_ == KvKind::kKey) return Codec::AccumulateBlocks(p, ld, n_q, blocks, n_blocks, out);
    const uint8_t* end = blocks + size_t(n_blocks) * bb;
    cpu::AccumulateViaTile(p, ld, n_q, blocks, bb, n_blocks, d_, out,
                           [&](const uint8_t* rows, int64_t m, float* x) { DecodeValueRows(rows, m, end, x); });
  }

 private:
  // Value tokens [m] -> x [m, d] (SIMD, per group code · s + z).
  void DecodeValueRows(const uint8_t* rows, int64_t m, const uint8_t* /*end*/, float* x) const {
    cpu::AffineGroupRows(rows, m, BlockBytes(), d_ / g_, g_, bits_, x);
  }

  // Scales/mins as f32 and all codes unpacked: K: s, z [d], codes [d][G]; V: s, z [d/G], codes [d].
  void Unpacked(const uint8_t* block, std::vector<float>* s, std::vector<float>* z,
                std::vector<uint8_t>* codes) const {
    const int ns = kind_ == KvKind::kKey ? d_ : d_ / g_;
    s->resize(ns);
    z->resize(ns);
    for (int i = 0; i < ns; ++i) {
      uint16_t sz[2];
      std::memcpy(sz, block + 4 * i, 4);
      (*s)[i] = gguf::Fp16ToFp32(sz[0]);
      (*z)[i] = gguf::Fp16ToFp32(sz[1]);
    }
    const int n = kind_ == KvKind::kKey ? d_ * g_ : d_;
    codes->resize(n);
    Unpack(block + 4 * ns, n, bits_, codes->data());
  }

  KvKind kind_;
  int d_, bits_, g_, r_;
};

}  // namespace

StatusOr<std::unique_ptr<Codec>> MakeKiviCodec(const CodecSpec& spec, const CodecContext& ctx) {
  KVC_ASSIGN_OR_RETURN(int bits, spec.GetInt("bits", 2));
  KVC_ASSIGN_OR_RETURN(int group, spec.GetInt("group", 32));
  KVC_ASSIGN_OR_RETURN(int residual, spec.GetInt("residual", 128));
  KVC_RETURN_IF_ERROR(spec.CheckAllUsed());
  if (bits != 2 && bits != 4) {
    return InvalidArgument(fmt::format("kivi: bits={} not supported (use bits=2 or bits=4)", bits));
  }
  if (group <= 0 || group % 8 != 0 || group > 4096) {
    return InvalidArgument(
        fmt::format("kivi: group={} must be a positive multiple of 8, at most 4096 (e.g. 32)", group));
  }
  if (residual < 0 || residual > (1 << 20)) {
    return InvalidArgument(fmt::format("kivi: residual={} must be in [0, 1048576] tokens (e.g. 128)", residual));
  }
  if (ctx.kind == KvKind::kValue && ctx.dim % group != 0) {
    return Unimplemented(fmt::format(
        "kivi values group channels: group={} must divide the dimension {} (try group={})", group,
        ctx.dim, std::gcd(ctx.dim, 32)));
  }
  return std::unique_ptr<Codec>(new KiviCodec(ctx.kind, ctx.dim, bits, group, residual));
}

}  // namespace kvc::kv
