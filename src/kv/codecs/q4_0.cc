#include "kv/codecs/q4_0.h"
#include "kv/codecs/legacy_block.h"

#include <cmath>
#include <cstring>

#include <fmt/format.h>

#include "cpu/kv_kernels.h"
#include "gguf/types.h"
#include "kv/cache_internal.h"

namespace kvc::kv {
namespace q4_0 {

static float BlockScale(const uint8_t* b) {
  uint16_t dh;
  std::memcpy(&dh, b, 2);
  return gguf::Fp16ToFp32(dh);
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
    const float d = max / -8.f;
    const float id = d != 0.f ? 1.0f / d : 0.f;
    const uint16_t dh = Fp32ToFp16Sat(d);
    std::memcpy(ob, &dh, 2);
    for (int j = 0; j < kBlock / 2; ++j) {
      const float x0 = xb[j] * id, x1 = xb[kBlock / 2 + j] * id;
      // x / d lies in [-8, 8], so x + 8.5 > 0 and the int8 cast truncates like ggml's.
      const uint8_t q0 = uint8_t(std::min(15, int(int8_t(x0 + 8.5f))));
      const uint8_t q1 = uint8_t(std::min(15, int(int8_t(x1 + 8.5f))));
      ob[2 + j] = uint8_t(q0 | (q1 << 4));
    }
  }
}

void DequantizeRowRef(const uint8_t* blocks, int n, float* x) {
  for (int b = 0; b < n / kBlock; ++b) {
    const uint8_t* ib = blocks + b * kBlockBytes;
    const float d = BlockScale(ib);
    for (int j = 0; j < kBlock / 2; ++j) {
      x[b * kBlock + j] = float(int(ib[2 + j] & 0x0F) - 8) * d;
      x[b * kBlock + j + kBlock / 2] = float(int(ib[2 + j] >> 4) - 8) * d;
    }
  }
}

float DotRef(const float* q, const uint8_t* blocks, int n) {
  double acc = 0;
  for (int b = 0; b < n / kBlock; ++b) {
    const uint8_t* ib = blocks + b * kBlockBytes;
    const double d = BlockScale(ib);
    double s = 0;
    for (int j = 0; j < kBlock / 2; ++j) {
      s += double(q[b * kBlock + j]) * (int(ib[2 + j] & 0x0F) - 8);
      s += double(q[b * kBlock + j + 16]) * (int(ib[2 + j] >> 4) - 8);
    }
    acc += d * s;
  }
  return float(acc);
}

void AxpyRef(float a, const uint8_t* blocks, int n, float* y) {
  for (int b = 0; b < n / kBlock; ++b) {
    const uint8_t* ib = blocks + b * kBlockBytes;
    const float w = a * BlockScale(ib);
    for (int j = 0; j < kBlock / 2; ++j) {
      y[b * kBlock + j] += w * float(int(ib[2 + j] & 0x0F) - 8);
      y[b * kBlock + j + 16] += w * float(int(ib[2 + j] >> 4) - 8);
    }
  }
}

// Unpack the 32 codes to float (c - 8) with straight-line loops the compiler vectorizes, then a
// dot with 8 independent partial sums (vectorizable without -ffast-math).
static inline void Unpack(const uint8_t* qs, float* c) {
  for (int j = 0; j < 16; ++j) {
    c[j] = float(int(qs[j] & 0x0F) - 8);
    c[j + 16] = float(int(qs[j] >> 4) - 8);
  }
}

float Dot(const float* q, const uint8_t* blocks, int n) {
  float acc = 0.f;
  alignas(32) float c[kBlock];
  for (int b = 0; b < n / kBlock; ++b) {
    const uint8_t* ib = blocks + b * kBlockBytes;
    Unpack(ib + 2, c);
    float part[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    const float* qb = q + b * kBlock;
    for (int j = 0; j < kBlock; j += 8) {
      for (int l = 0; l < 8; ++l) part[l] += qb[j + l] * c[j + l];
    }
    const float s = ((part[0] + part[1]) + (part[2] + part[3])) +
                    ((part[4] + part[5]) + (part[6] + part[7]));
    acc += BlockScale(ib) * s;
  }
  return acc;
}

void Axpy(float a, const uint8_t* blocks, int n, float* y) {
  alignas(32) float c[kBlock];
  for (int b = 0; b < n / kBlock; ++b) {
    const uint8_t* ib = blocks + b * kBlockBytes;
    Unpack(ib + 2, c);
    const float w = a * BlockScale(ib);
    float* yb = y + b * kBlock;
    for (int j = 0; j < kBlock; ++j) yb[j] += w * c[j];
  }
}

}  // namespace q4_0

StatusOr<std::unique_ptr<Codec>> MakeQ4_0Codec(const CodecSpec& spec, const CodecContext& ctx) {
  static const LegacyBlockFormat kFormat = {"q4_0", q4_0::kBlockBytes, q4_0::QuantizeRowRef,
                                            q4_0::DequantizeRowRef, q4_0::Dot, q4_0::Axpy,
                                            cpu::DecodeQ4_0Rows};
  return MakeLegacyBlockCodec(kFormat, spec, ctx);
}

}  // namespace kvc::kv
