#include "kv/codecs/q4_1.h"
#include "kv/codecs/legacy_block.h"

#include <cfloat>
#include <cmath>
#include <cstring>

#include <fmt/format.h>

#include "cpu/kv_kernels.h"
#include "gguf/types.h"
#include "kv/cache_internal.h"

namespace kvc::kv {
namespace q4_1 {

static void BlockDm(const uint8_t* b, float* d, float* m) {
  uint16_t h[2];
  std::memcpy(h, b, 4);
  *d = gguf::Fp16ToFp32(h[0]);
  *m = gguf::Fp16ToFp32(h[1]);
}

void QuantizeRowRef(const float* x, int n, uint8_t* out) {
  for (int b = 0; b < n / kBlock; ++b) {
    const float* xb = x + b * kBlock;
    uint8_t* ob = out + b * kBlockBytes;
    float min = FLT_MAX, max = -FLT_MAX;
    for (int j = 0; j < kBlock; ++j) {
      min = std::min(min, xb[j]);
      max = std::max(max, xb[j]);
    }
    const float d = (max - min) / 15.f;
    const float id = d != 0.f ? 1.0f / d : 0.f;
    const uint16_t h[2] = {Fp32ToFp16Sat(d), Fp32ToFp16Sat(min)};
    std::memcpy(ob, h, 4);
    for (int j = 0; j < kBlock / 2; ++j) {
      const float x0 = (xb[j] - min) * id, x1 = (xb[16 + j] - min) * id;
      const uint8_t q0 = uint8_t(std::min(15, int(int8_t(x0 + 0.5f))));
      const uint8_t q1 = uint8_t(std::min(15, int(int8_t(x1 + 0.5f))));
      ob[4 + j] = uint8_t(q0 | (q1 << 4));
    }
  }
}

void DequantizeRowRef(const uint8_t* blocks, int n, float* x) {
  for (int b = 0; b < n / kBlock; ++b) {
    const uint8_t* ib = blocks + b * kBlockBytes;
    float d, m;
    BlockDm(ib, &d, &m);
    for (int j = 0; j < 16; ++j) {
      x[b * kBlock + j] = float(ib[4 + j] & 0x0F) * d + m;
      x[b * kBlock + j + 16] = float(ib[4 + j] >> 4) * d + m;
    }
  }
}

float DotRef(const float* q, const uint8_t* blocks, int n) {
  double acc = 0;
  for (int b = 0; b < n / kBlock; ++b) {
    const uint8_t* ib = blocks + b * kBlockBytes;
    float d, m;
    BlockDm(ib, &d, &m);
    double sc = 0, sq = 0;
    for (int j = 0; j < 16; ++j) {
      sc += double(q[b * kBlock + j]) * (ib[4 + j] & 0x0F);
      sc += double(q[b * kBlock + j + 16]) * (ib[4 + j] >> 4);
      sq += double(q[b * kBlock + j]) + double(q[b * kBlock + j + 16]);
    }
    acc += double(d) * sc + double(m) * sq;
  }
  return float(acc);
}

void AxpyRef(float a, const uint8_t* blocks, int n, float* y) {
  for (int b = 0; b < n / kBlock; ++b) {
    const uint8_t* ib = blocks + b * kBlockBytes;
    float d, m;
    BlockDm(ib, &d, &m);
    for (int j = 0; j < 16; ++j) {
      y[b * kBlock + j] += a * (float(ib[4 + j] & 0x0F) * d + m);
      y[b * kBlock + j + 16] += a * (float(ib[4 + j] >> 4) * d + m);
    }
  }
}

float Dot(const float* q, const uint8_t* blocks, int n) {
  float acc = 0.f;
  alignas(32) float c[kBlock];
  for (int b = 0; b < n / kBlock; ++b) {
    const uint8_t* ib = blocks + b * kBlockBytes;
    float d, m;
    BlockDm(ib, &d, &m);
    for (int j = 0; j < 16; ++j) {
      c[j] = float(ib[4 + j] & 0x0F);
      c[j + 16] = float(ib[4 + j] >> 4);
    }
    float pc[8] = {0, 0, 0, 0, 0, 0, 0, 0}, pq[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    const float* qb = q + b * kBlock;
    for (int j = 0; j < kBlock; j += 8) {
      for (int l = 0; l < 8; ++l) {
        pc[l] += qb[j + l] * c[j + l];
        pq[l] += qb[j + l];
      }
    }
    float sc = 0.f, sq = 0.f;
    for (int l = 0; l < 8; ++l) { sc += pc[l]; sq += pq[l]; }
    acc += d * sc + m * sq;
  }
  return acc;
}

void Axpy(float a, const uint8_t* blocks, int n, float* y) {
  for (int b = 0; b < n / kBlock; ++b) {
    const uint8_t* ib = blocks + b * kBlockBytes;
    float d, m;
    BlockDm(ib, &d, &m);
    const float ad = a * d, am = a * m;
    float* yb = y + b * kBlock;
    for (int j = 0; j < 16; ++j) {
      yb[j] += ad * float(ib[4 + j] & 0x0F) + am;
      yb[j + 16] += ad * float(ib[4 + j] >> 4) + am;
    }
  }
}

}  // namespace q4_1

StatusOr<std::unique_ptr<Codec>> MakeQ4_1Codec(const CodecSpec& spec, const CodecContext& ctx) {
  static const LegacyBlockFormat kFormat = {"q4_1", q4_1::kBlockBytes, q4_1::QuantizeRowRef,
                                            q4_1::DequantizeRowRef, q4_1::Dot, q4_1::Axpy,
                                            cpu::DecodeQ4_1Rows};
  return MakeLegacyBlockCodec(kFormat, spec, ctx);
}

}  // namespace kvc::kv
