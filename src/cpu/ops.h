// CPU kernels used by the forward pass. Each has a scalar reference (namespace ref) that tests
// compare the SIMD version (Highway, runtime dispatch) against, on every Highway target the
// machine runs (tests/unit/cpu_ops_test.cc, cpu_f16_test.cc; cpu/targets.h).
// Numeric contracts use the vocabulary of cpu/kv_kernels.h ([exact], [sum n], [fma]; u = 2^-24):
// the references sum in double, the kernels in f32 lanes with FMA, compiled -ffp-contract=off.
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

#include "gguf/gguf.h"
#include "kvcrunch/status.h"

namespace kvc::cpu {

// A weight matrix ready for MatMul. Logical shape [n_out, n_in] (row r = output feature r),
// i.e. the GGUF tensor with ne = {n_in, n_out}. May hold a repacked copy of the GGUF bytes
// (a layout friendlier to SIMD), or point into the mapping.
class Weight {
 public:
  virtual ~Weight() = default;
  virtual int64_t n_in() const = 0;
  virtual int64_t n_out() const = 0;
  virtual gguf::GgmlType type() const = 0;
  virtual size_t bytes() const = 0;  // bytes held by this object (0 if it only points into the mapping)
  // Row r dequantized to f32: dst [n_in].
  virtual void DequantizeRow(int64_t r, float* dst) const = 0;
};

// UNIMPLEMENTED naming the tensor and type if the type has no kernel.
StatusOr<std::unique_ptr<Weight>> PrepareWeight(const gguf::TensorInfo& t);

// The weight of `t` with every row r (output channel) multiplied by row_scale[r] ([n_out], finite,
// > 0), from a private copy of the GGUF bytes (the weight owns it; bytes() counts it). How exact:
//   F32: each element times s (one f32 rounding, relative 2^-24);
//   F16: each element times s, rounded to fp16 (relative 2^-11);
//   Q4_0 / Q5_0 / Q8_0: each 32-block's fp16 scale d -> fp16(d·s); Q4_1 also its min m ->
//     fp16(m·s): the integer codes are untouched, so every dequantized value becomes exactly
//     d'·q (+ m') with d' = d·s·(1 + δ), |δ| <= 2^-11 (one fp16 rounding, normal range; a scaled
//     scale in the fp16 subnormal range is off by at most 2^-25 absolute).
// INVALID_ARGUMENT for a bad scale count or value, or a scaled fp16 value beyond 65504;
// UNIMPLEMENTED for other types (BF16, K-quants), naming the tensor and the alternative.
StatusOr<std::unique_ptr<Weight>> PrepareWeightScaledRows(const gguf::TensorInfo& t,
                                                          const std::vector<float>& row_scale);

// y [n_tokens, n_out] f32 = x [n_tokens, n_in] f32 · Wᵀ. Multithreaded (OpenMP, threads as set
// by SetNumThreads). n_tokens == 1 is the decode path (matrix-vector). Contract vs ref::MatMul:
// [sum n_in] over |w_j·x_j|, plus for Q4_0 / Q4_1 / Q5_0 / Q8_0 (x quantized to int8 per
// 32-block, d_x = amax_b / 127) the quantization error Σ_j |w_j|·amax_b(j) / 254 (1 % slack for
// the rounding of d_x and the f32 block sums). Results do not depend on the thread count.
void MatMul(const Weight& w, const float* x, int64_t n_tokens, float* y);

void SetNumThreads(int n);
int NumThreads();

// y[i] = x[i] * w[i] / sqrt(mean(x^2) + eps), per row: x, y [n_rows, n] f32; w [n] f32.
// |y − ref| <= ((n + 2) / 2 + 4)·u·|ref| (the f32 sum of squares is [sum n]; its square root
// halves the relative error; then a division, a square root and two products).
void RmsNorm(const float* x, const float* w, int64_t n_rows, int64_t n, float eps, float* y);
// out[i] = silu(gate[i]) * up[i]; all [n] f32. |out − ref| <= 4e-6·|gate·up| (Highway's f32 Exp,
// a few ulp, then an add, a division and a product; silu(g)/g <= 1.1 bounds |ref| by |gate·up|).
void SwiGlu(const float* gate, const float* up, int64_t n, float* out);
// dot product of two f32 vectors [n]. [sum n]
float Dot(const float* a, const float* b, int64_t n);
// y[i] += a * x[i]; [n] f32. [fma]: |y − ref| <= 2u·(|a·x[i]| + |ref|).
void Axpy(float a, const float* x, int64_t n, float* y);
// in-place softmax over [n] f32; returns nothing; max-subtracted, sums in double-free f32.
// |x − ref| <= 4e-6·ref + 1e-9 (Highway's f32 Exp per element, the f32 sum [sum n] of values
// <= 1 each dominated by the largest, and one division).
void Softmax(float* x, int64_t n);

// fp16 KV rows (IEEE binary16 bit patterns):
// out [n] f32 = h [n] fp16. [exact] (every fp16 is an f32).
void F16ToF32(const uint16_t* h, int64_t n, float* out);
// out[r * ld + t] = <q[r], k[t]>; q [n_q, d] f32, k [n, d] fp16, out rows of stride ld.
// Any d and n_q. k must be finite when d is not a multiple of the vector width: a row's tail is
// read as a whole vector running into the next row, whose lanes meet zero query lanes. [sum d]
void DotF16Rows(const float* q, int n_q, const uint16_t* k, int64_t n, int d, float* out, int64_t ld);
// out[r] += Σ_t p[r * ld + t] · v[t]; p rows of stride ld, v [n, d] fp16, out [n_q, d] f32.
// [sum n + 1] (the n products and out).
void AxpyF16Rows(const float* p, int64_t ld, int n_q, const uint16_t* v, int64_t n, int d, float* out);

// q8_0 KV rows (d / 32 ggml Q8_0 blocks of 34 bytes per row; d % 32 == 0), same contracts as the
// fp16 versions. Checked against the q8_0 codec's scalar Score / AccumulateWeighted (f32 sums in
// another order: within 1e-4·(1 + |ref|) for scores and 1e-3·(1 + |ref|) accumulated, the
// codec-level bound of tests/unit/codec_blocks_test.cc).
void DotQ8Rows(const float* q, int n_q, const uint8_t* rows, int64_t n, int d, float* out, int64_t ld);
void AxpyQ8Rows(const float* p, int64_t ld, int n_q, const uint8_t* rows, int64_t n, int d, float* out);

namespace ref {
void F16ToF32(const uint16_t* h, int64_t n, float* out);
void DotF16Rows(const float* q, int n_q, const uint16_t* k, int64_t n, int d, float* out, int64_t ld);
void AxpyF16Rows(const float* p, int64_t ld, int n_q, const uint16_t* v, int64_t n, int d, float* out);
void MatMul(const Weight& w, const float* x, int64_t n_tokens, float* y);  // dequantize + f64 sums
void RmsNorm(const float* x, const float* w, int64_t n_rows, int64_t n, float eps, float* y);
void SwiGlu(const float* gate, const float* up, int64_t n, float* out);
float Dot(const float* a, const float* b, int64_t n);
void Axpy(float a, const float* x, int64_t n, float* y);
void Softmax(float* x, int64_t n);
}  // namespace ref

}  // namespace kvc::cpu
