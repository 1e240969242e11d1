#include "kv/codecs/q5_0.h"
#include "kv/codecs/legacy_block.h"

#include <cmath>
#include <cstring>

#include <fmt/format.h>

#include "cpu/kv_kernels.h"
#include "gguf/types.h"
#include "kv/cache_internal.h"

namespace kvc::kv {
namespace q5_0 {

static float BlockScale(const uint8_t* b) {
  uint16_t dh;
  std::memcpy(&dh, b, 2);
  return gguf::Fp16ToFp32(dh);
}

// Codes 0..31 of one block: c [32].
static inline void Codes(const uint8_t* ib, int* c) {
  uint32_t qh;
  std::memcpy(&qh, ib + 2, 4);
  const uint8_t* qs = ib + 6;
  for (int j = 0; j < 16; ++j) {
    const int h0 = ((qh >> j) << 4) & 0x10;
    const int h1 = (qh >> (j + 12)) & 0x10;
    c[j] = (qs[j] & 0x0F) | h0;
    c[j + 16] = (qs[j] >> 4) | h1;
  }
}

void QuantizeRowRef(const float* x, int n, uint8_t* out) {
  for (int b = 0; b < n / kBlock; ++b) {
    const float* xb = x + b * kBlock;
    uint8_t* ob = out + b * kBlockBytes;
    float amax = 0.f, max = 0.f;
    for (int j = 0; j < kBlock; ++j) {
      if (amax < std::fabs(xb[j])) {
        amax = std::fabs(xb[j]);
        max = xb[j];
      }
    }
    const float d = max / -16.f;
    const float id = d != 0.f ? 1.0f / d : 0.f;
    const uint16_t dh = Fp32ToFp16Sat(d);
    std::memcpy(ob, &dh, 2);
    uint32_t qh = 0;
    for (int j = 0; j < 16; ++j) {
      const float x0 = xb[j] * id, x1 = xb[16 + j] * id;
      const uint32_t q0 = uint32_t(std::min(31, int(int8_t(x0 + 16.5f))));
      const uint32_t q1 = uint32_t(std::min(31, int(int8_t(x1 + 16.5f))));
      ob[6 + j] = uint8_t((q0 & 0x0F) | ((q1 & 0x0F) << 4));
      qh |= ((q0 & 0x10u) >> 4) << j;
      qh |= ((q1 & 0x10u) >> 4) << (j + 16);
    }
    std::memcpy(ob + 2, &qh, 4);
  }
}

void DequantizeRowRef(const uint8_t* blocks, int n, float* x) {
  int c[kBlock];
  for (int b = 0; b < n / kBlock; ++b) {
    const uint8_t* ib = blocks + b * kBlockBytes;
    const float d = BlockScale(ib);
    Codes(ib, c);
    for (int j = 0; j < kBlock; ++j) x[b * kBlock + j] = float(c[j] - 16) * d;
  }
}

float DotRef(const float* q, const uint8_t* blocks, int n) {
  double acc = 0;
  int c[kBlock];
  for (int b = 0; b < n / kBlock; ++b) {
    const uint8_t* ib = blocks + b * kBlockBytes;
    Codes(ib, c);
    double s = 0;
    for (int j = 0; j < kBlock; ++j) s += double(q[b * kBlock + j]) * (c[j] - 16);
    acc += double(BlockScale(ib)) * s;
  }
  return float(acc);
}

void AxpyRef(float a, const uint8_t* blocks, int n, float* y) {
  int c[kBlock];
  for (int b = 0; b < n / kBlock; ++b) {
    const uint8_t* ib = blocks + b * kBlockBytes;
    Codes(ib, c);
    const float w = a * BlockScale(ib);
    for (int j = 0; j < kBlock; ++j) y[b * kBlock + j] += w * float(c[j] - 16);
  }
}

float Dot(const float* q, const uint8_t* blocks, int n) {
  float acc = 0.f;
  int c[kBlock];
  alignas(32) float cf[kBlock];
  for (int b = 0; b < n / kBlock; ++b) {
    const uint8_t* ib = blocks + b * kBlockBytes;
    Codes(ib, c);
    for (int j = 0; j < kBlock; ++j) cf[j] = float(c[j] - 16);
    float part[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    const float* qb = q + b * kBlock;
    for (int j = 0; j < kBlock; j += 8) {
      for (int l = 0; l < 8; ++l) part[l] += qb[j + l] * cf[j + l];
    }
    float s = 0.f;
    for (int l = 0; l < 8; ++l) s += part[l];
    acc += BlockScale(ib) * s;
  }
  return acc;
}

void Axpy(float a, const uint8_t* blocks, int n, float* y) {
  int c[kBlock];
  for (int b = 0; b < n / kBlock; ++b) {
    const uint8_t* ib = blocks + b * kBlockBytes;
    Codes(ib, c);
    const float w = a * BlockScale(ib);
    float* yb = y + b * kBlock;
    for (int j = 0; j < kBlock; ++j) yb[j] += w * float(c[j] - 16);
  }
}

}  // namespace q5_0

StatusOr<std::unique_ptr<Codec>> MakeQ5_0Codec(const CodecSpec& spec, const CodecContext& ctx) {
  static const LegacyBlockFormat kFormat = {"q5_0", q5_0::kBlockBytes, q5_0::QuantizeRowRef,
                                            q5_0::DequantizeRowRef, q5_0::Dot, q5_0::Axpy,
                                            cpu::DecodeQ5_0Rows};
  return MakeLegacyBlockCodec(kFormat, spec, ctx);
}

}  // namespace kvc::kv
