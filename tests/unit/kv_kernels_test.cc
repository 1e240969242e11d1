// Every Highway packed-KV kernel (src/cpu/kv_kernels.cc) against its scalar reference, once per
// Highway target the machine runs (per_target.h), on random data with odd row counts, odd
// dimensions and partial vectors. Each test asserts the kernel's contract as stated in
// cpu/kv_kernels.h ([exact]: bit-identical; [sum n] / [fma]: fp_bounds.h), nothing looser.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <random>
#include <vector>

#include "cpu/kv_kernels.h"
#include "gguf/types.h"
#include "kv/cache_internal.h"
#include "kv/codecs/fp8.h"
#include "kv/codecs/q4_0.h"
#include "kv/codecs/q4_1.h"
#include "kv/codecs/q5_0.h"
#include "fp_bounds.h"
#include "per_target.h"

namespace kvc::cpu {
namespace {

using test_util::FmaBound;
using test_util::SumBound;

std::vector<float> Randn(size_t n, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> nd;
  std::vector<float> v(n);
  for (auto& x : v) x = nd(rng);
  return v;
}
std::vector<uint8_t> RandBytes(size_t n, uint32_t seed) {
  std::mt19937 rng(seed);
  std::vector<uint8_t> v(n);
  for (auto& x : v) x = uint8_t(rng());
  return v;
}

KVC_PER_TARGET_SUITE(KvKernels);

TEST_P(KvKernels, DotAndAxpyF32RowsMatchReference) {
  for (int d : {64, 32, 17, 128, 5}) {
    for (int n_q : {1, 3, 4, 5, 9}) {
      for (int64_t n : {1, 3, 4, 5, 7, 33, 130}) {
        const int64_t ld = n + 3;
        const auto q = Randn(size_t(n_q) * d, 1), x = Randn(size_t(n) * d, 2);
        std::vector<float> got(size_t(n_q) * ld, -7.f), want(got);
        DotF32Rows(q.data(), n_q, x.data(), n, d, got.data(), ld);
        ref::DotF32Rows(q.data(), n_q, x.data(), n, d, want.data(), ld);
        for (int r = 0; r < n_q; ++r) {
          for (int64_t t = 0; t < ld; ++t) {
            double mag = 0;
            for (int c = 0; c < d && t < n; ++c) mag += std::fabs(q[size_t(r) * d + c] * x[t * d + c]);
            ASSERT_NEAR(got[size_t(r) * ld + t], want[size_t(r) * ld + t], SumBound(d, mag))
                << "d=" << d << " n_q=" << n_q << " n=" << n << " r=" << r << " t=" << t;
          }
        }
        const auto p = Randn(size_t(n_q) * ld, 3);
        const std::vector<float> y0 = Randn(size_t(n_q) * d, 4);
        std::vector<float> ya = y0, yb = y0;
        AxpyF32Rows(p.data(), ld, n_q, x.data(), n, d, ya.data());
        ref::AxpyF32Rows(p.data(), ld, n_q, x.data(), n, d, yb.data());
        for (int r = 0; r < n_q; ++r) {
          for (int c = 0; c < d; ++c) {
            double mag = std::fabs(y0[size_t(r) * d + c]);
            for (int64_t t = 0; t < n; ++t) mag += std::fabs(p[size_t(r) * ld + t] * x[t * d + c]);
            ASSERT_NEAR(ya[size_t(r) * d + c], yb[size_t(r) * d + c], SumBound(n + 1, mag))
                << "d=" << d << " n_q=" << n_q << " n=" << n;
          }
        }
      }
    }
  }
}

TEST_P(KvKernels, LegacyRowDecodersEqualScalarDequantizers) {
  for (int d : {32, 64, 128}) {
    for (int64_t n : {1, 3, 17}) {
      const auto x = Randn(size_t(n) * d, 5);
      struct F {
        size_t bytes;
        void (*quant)(const float*, int, uint8_t*);
        void (*deq)(const uint8_t*, int, float*);
        void (*rows)(const uint8_t*, int64_t, int, float*);
      } fs[] = {{kv::q4_0::kBlockBytes, kv::q4_0::QuantizeRowRef, kv::q4_0::DequantizeRowRef, DecodeQ4_0Rows},
                {kv::q4_1::kBlockBytes, kv::q4_1::QuantizeRowRef, kv::q4_1::DequantizeRowRef, DecodeQ4_1Rows},
                {kv::q5_0::kBlockBytes, kv::q5_0::QuantizeRowRef, kv::q5_0::DequantizeRowRef, DecodeQ5_0Rows}};
      for (const F& f : fs) {
        const size_t rb = size_t(d / 32) * f.bytes;
        std::vector<uint8_t> rows(size_t(n) * rb);
        for (int64_t t = 0; t < n; ++t) f.quant(&x[size_t(t) * d], d, &rows[size_t(t) * rb]);
        std::vector<float> got(size_t(n) * d), want(size_t(n) * d);
        f.rows(rows.data(), n, d, got.data());
        for (int64_t t = 0; t < n; ++t) f.deq(&rows[size_t(t) * rb], d, &want[size_t(t) * d]);
        for (size_t i = 0; i < got.size(); ++i) {
          ASSERT_EQ(got[i], want[i]) << "bytes=" << f.bytes << " d=" << d << " i=" << i;
        }
      }
    }
  }
}

TEST_P(KvKernels, E4M3RowsEqualTableForEveryCode) {
  for (int d : {256, 64, 19}) {
    const int64_t n = 3;
    std::vector<uint8_t> rows(size_t(n) * (d + 2));
    const float scales[3] = {1.f, 0.0371f, 1234.5f};
    for (int64_t t = 0; t < n; ++t) {
      uint8_t* row = &rows[size_t(t) * (d + 2)];
      const uint16_t h = kv::Fp32ToFp16Sat(scales[t]);
      std::memcpy(row, &h, 2);
      for (int i = 0; i < d; ++i) {
        uint8_t c = uint8_t((i * 37 + t * 11) & 0xFF);
        if ((c & 0x7F) == 0x7F) c ^= 1;  // NaN codes are never written
        row[2 + i] = c;
      }
    }
    std::vector<float> got(size_t(n) * d);
    DecodeE4M3Rows(rows.data(), n, d, got.data());
    for (int64_t t = 0; t < n; ++t) {
      const uint8_t* row = &rows[size_t(t) * (d + 2)];
      uint16_t h;
      std::memcpy(&h, row, 2);
      const float s = gguf::Fp16ToFp32(h);
      for (int i = 0; i < d; ++i) {
        ASSERT_EQ(got[size_t(t) * d + i], kv::fp8::E4M3ToFloat(row[2 + i]) * s) << "code " << int(row[2 + i]);
      }
    }
  }
  // All 254 non-NaN codes, scale 1.
  std::vector<uint8_t> row(2 + 256, 0);
  const uint16_t one = 0x3C00;
  std::memcpy(row.data(), &one, 2);
  for (int c = 0; c < 256; ++c) row[2 + c] = uint8_t((c & 0x7F) == 0x7F ? 0 : c);
  std::vector<float> got(256);
  DecodeE4M3Rows(row.data(), 1, 256, got.data());
  for (int c = 0; c < 256; ++c) EXPECT_EQ(got[c], kv::fp8::E4M3ToFloat(row[2 + c])) << c;
}

TEST_P(KvKernels, CodeStreamKernelsMatchReference) {
  for (int b = 1; b <= 8; ++b) {
    std::vector<float> cb = Randn(size_t(1) << b, 6 + b);
    for (int n : {1, 5, 8, 15, 16, 17, 31, 32, 33, 64, 100}) {
      const size_t nbytes = (size_t(n) * b + 7) / 8;
      auto bits = RandBytes(nbytes + 8, 9 * b + n);  // +8: b > 4 may read 3 bytes past the stream
      std::vector<float> got(n), want(n);
      CodebookRow(bits.data(), n, b, cb.data(), 0.75f, got.data());
      ref::CodebookRow(bits.data(), n, b, cb.data(), 0.75f, want.data());
      for (int j = 0; j < n; ++j) ASSERT_EQ(got[j], want[j]) << "b=" << b << " n=" << n << " j=" << j;
      AffineCodesRow(bits.data(), n, b, 0.3f, -1.25f, got.data());
      ref::AffineCodesRow(bits.data(), n, b, 0.3f, -1.25f, want.data());
      for (int j = 0; j < n; ++j) ASSERT_EQ(got[j], want[j]) << "b=" << b << " n=" << n << " j=" << j;
      std::vector<float> codes(n);  // code_j exactly (code · 1 + 0)
      ref::AffineCodesRow(bits.data(), n, b, 1.f, 0.f, codes.data());
      std::vector<float> a = Randn(n, 10), r = a;
      AxpyCodes(bits.data(), n, b, -0.7f, a.data());
      ref::AxpyCodes(bits.data(), n, b, -0.7f, r.data());
      for (int j = 0; j < n; ++j) {
        ASSERT_NEAR(a[j], r[j], FmaBound(std::fabs(-0.7 * codes[j]), std::fabs(r[j]))) << "b=" << b << " n=" << n;
      }

      // Many streams (KIVI keys) and many rows (turbo parts, KIVI value groups).
      for (int n_q : {1, 3, 5}) {
        const int ns = 7;
        const size_t stride = nbytes + 1;
        auto sb = RandBytes(stride * ns + 8, 77 + b + n);
        auto w = Randn(size_t(n_q) * ns, 11);
        const auto acc0 = Randn(size_t(n_q) * n, 12);
        auto acc = acc0, accr = acc0;
        AxpyCodesRows(sb.data(), ns, stride, n, b, w.data(), n_q, acc.data());
        ref::AxpyCodesRows(sb.data(), ns, stride, n, b, w.data(), n_q, accr.data());
        std::vector<float> sc(size_t(ns) * n);  // stream c's codes
        for (int c = 0; c < ns; ++c) ref::AffineCodesRow(sb.data() + c * stride, n, b, 1.f, 0.f, &sc[size_t(c) * n]);
        for (int r = 0; r < n_q; ++r) {
          for (int j = 0; j < n; ++j) {
            double mag = std::fabs(acc0[size_t(r) * n + j]);
            for (int c = 0; c < ns; ++c) mag += std::fabs(double(w[size_t(r) * ns + c]) * sc[size_t(c) * n + j]);
            ASSERT_NEAR(acc[size_t(r) * n + j], accr[size_t(r) * n + j], SumBound(ns + 1, mag))
                << "b=" << b << " n=" << n << " n_q=" << n_q;
          }
        }
      }
      const int64_t n_rows = 5;
      const size_t row_bytes = 3 + 2 + nbytes;  // 3 bytes of other header, fp16 g at 3, codes at 5
      auto rows = RandBytes(row_bytes * n_rows + 8, 5 * b + n);
      for (int64_t t = 0; t < n_rows; ++t) {
        const uint16_t h = uint16_t(0x3800 + 37 * t);  // positive normal fp16 scales
        std::memcpy(&rows[t * row_bytes + 3], &h, 2);
      }
      const int64_t ld = n + 2;
      std::vector<float> mg(size_t(n_rows) * ld, 0.f), mr(mg);
      CodebookRows(rows.data(), n_rows, row_bytes, 5, 3, n, b, cb.data(), mg.data(), ld);
      ref::CodebookRows(rows.data(), n_rows, row_bytes, 5, 3, n, b, cb.data(), mr.data(), ld);
      for (size_t i = 0; i < mg.size(); ++i) ASSERT_EQ(mg[i], mr[i]) << "b=" << b << " n=" << n << " i=" << i;
    }
  }
  for (int b : {2, 4}) {
    for (int group : {8, 16, 32, 64}) {
      for (int ng : {1, 2, 4}) {
        const size_t row_bytes = 4 * size_t(ng) + size_t(ng) * group * b / 8;
        const int64_t n_rows = 7;
        auto rows = RandBytes(row_bytes * n_rows, 100 + b + group + ng);
        for (int64_t t = 0; t < n_rows; ++t) {
          for (int g = 0; g < ng; ++g) {
            const uint16_t sz[2] = {uint16_t(0x3000 + 13 * g + t), uint16_t(0xBC00 + 7 * g)};
            std::memcpy(&rows[t * row_bytes + 4 * g], sz, 4);
          }
        }
        std::vector<float> got(size_t(n_rows) * ng * group), want(got.size());
        AffineGroupRows(rows.data(), n_rows, row_bytes, ng, group, b, got.data());
        ref::AffineGroupRows(rows.data(), n_rows, row_bytes, ng, group, b, want.data());
        for (size_t i = 0; i < got.size(); ++i) {
          ASSERT_EQ(got[i], want[i]) << "b=" << b << " G=" << group << " i=" << i;
        }
      }
    }
  }
}

// KVQuant rows: codebook, per-row fp16 scale / offset, per-channel affine; bit-identical.
TEST_P(KvKernels, CodebookAffineRowsEqualReference) {
  for (int b = 2; b <= 4; ++b) {
    std::vector<float> cb = Randn(size_t(1) << b, 40 + b);
    for (int n : {16, 48, 64, 70}) {  // 70: not a multiple of the vector width (fallback)
      const size_t nbytes = (size_t(n) * b + 7) / 8;
      const size_t row_bytes = 4 + nbytes + 6;  // fp16 z at 0, fp16 g at 2, codes at 4, 2 slots
      const int64_t n_rows = 9;
      auto rows = RandBytes(row_bytes * n_rows + 8, 31 * b + n);
      for (int64_t t = 0; t < n_rows; ++t) {
        const uint16_t zg[2] = {uint16_t(0xB800 + 11 * t), uint16_t(0x3400 + 29 * t)};
        std::memcpy(&rows[t * row_bytes], zg, 4);
        uint8_t* sl = &rows[t * row_bytes + 4 + nbytes];  // slot 0: channel t·7 mod n, slot 1 empty
        sl[0] = uint8_t(t * 7 % n);
        const uint16_t v = uint16_t(0xC500 + 3 * t);  // a finite fp16 (random bytes could be NaN)
        std::memcpy(sl + 1, &v, 2);
        sl[3] = t % 2 ? uint8_t(255) : uint8_t(n - 1);
      }
      const auto mul = Randn(n, 3), add = Randn(n, 4);
      for (int mode = 0; mode < 2; ++mode) {  // 0: keys (per channel), 1: values (per row)
        std::vector<float> got(size_t(n_rows) * n), want(got.size());
        const int64_t g_off = mode ? 2 : -1, z_off = mode ? 0 : -1;
        const float* m = mode ? nullptr : mul.data();
        const float* a = mode ? nullptr : add.data();
        const int64_t sp = int64_t(4 + nbytes);
        CodebookAffineRows(rows.data(), n_rows, row_bytes, 4, n, b, cb.data(), g_off, z_off, m, a, sp, 2,
                           got.data());
        ref::CodebookAffineRows(rows.data(), n_rows, row_bytes, 4, n, b, cb.data(), g_off, z_off, m, a, sp, 2,
                                want.data());
        for (size_t i = 0; i < got.size(); ++i) ASSERT_EQ(got[i], want[i]) << "b=" << b << " n=" << n << " i=" << i;
      }
    }
  }
}

// KVQuant keys with tokens in lanes: codebook, per-channel affine, RoPE on the fly, dot; random
// codes, sparse outlier slots (some empty), trig from a random table with a stride, several
// blocks and 1..6 query rows; the (d + 16)·u·M contract of cpu/kv_kernels.h.
TEST_P(KvKernels, CodebookRopeDotBlocksMatchReference) {
  for (int b = 1; b <= 4; ++b) {
    for (int d : {64, 32, 6}) {
      const std::vector<float> cb = Randn(size_t(1) << b, 70 + b), mul = Randn(d, 71), add = Randn(d, 72);
      const int64_t nb = 3, n = nb * kRopeBlockTokens, stride = n + 9;
      // Block-level slots after the codes: {u16 t·d + c, fp16}; distinct positions, some empty.
      const int n_sparse = 5;
      const size_t sparse_off = size_t(d) * 2 * b, block_bytes = sparse_off + 4 * n_sparse;
      auto blocks = RandBytes(block_bytes * nb, 73 + b + d);
      for (int64_t k = 0; k < nb; ++k) {
        uint8_t* sl = &blocks[k * block_bytes + sparse_off];
        for (int i = 0; i < n_sparse; ++i) {
          // token (3i + k) mod 16, channel (7i + 2k) mod d: distinct per block for i < 5; slot 3
          // of block 1 empty (0xFFFF), slot 4 of block 2 just past the end (16·d: empty too).
          uint16_t at = uint16_t(((3 * i + k) % 16) * d + (7 * i + 2 * k) % d);
          if (k == 1 && i == 3) at = 0xFFFF;
          if (k == 2 && i == 4) at = uint16_t(16 * d);
          const uint16_t v = uint16_t((i % 2 ? 0xC100 : 0x4200) + 7 * i + int(k));  // finite fp16
          std::memcpy(sl + 4 * i, &at, 2);
          std::memcpy(sl + 4 * i + 2, &v, 2);
        }
      }
      const auto trig = Randn(size_t(d) * stride, 74 + d);
      for (int n_q : {1, 3, 6}) {
        const auto q = Randn(size_t(n_q) * d, 75 + n_q);
        const int64_t ld = n + 2;
        // Both trig inputs: lanes with a stride, and rows + offsets (angle addition).
        RopeTrig lanes, rec;
        lanes.lanes = trig.data();
        lanes.stride = stride;
        const auto rows = Randn(size_t(nb) * 16 * d, 76 + d), offs = Randn(size_t(d) * 16, 77 + d);
        rec.rows = rows.data();
        rec.offs = offs.data();
        float codes16[16];
        for (const RopeTrig* tg : {&lanes, &rec}) {
          std::vector<float> got(size_t(n_q) * ld, 0.f), want(got);
          CodebookRopeDotBlocks(q.data(), n_q, blocks.data(), nb, block_bytes, d, b, cb.data(), mul.data(),
                                add.data(), sparse_off, n_sparse, *tg, got.data(), ld);
          ref::CodebookRopeDotBlocks(q.data(), n_q, blocks.data(), nb, block_bytes, d, b, cb.data(), mul.data(),
                                     add.data(), sparse_off, n_sparse, *tg, want.data(), ld);
          // The contract's M = Σ_i (|q_2i| + |q_2i+1|)·(X_2i + X_2i+1)·T_i per (query row, token).
          const int half = d / 2;
          for (int64_t blk = 0; blk < nb; ++blk) {
            const uint8_t* bk = &blocks[blk * block_bytes];
            for (int t = 0; t < 16; ++t) {
              std::vector<double> xm(d);  // X_c
              for (int c = 0; c < d; ++c) {
                ref::AffineCodesRow(bk + size_t(c) * 2 * b, 16, b, 1.f, 0.f, codes16);
                xm[c] = std::fabs(double(cb[size_t(codes16[t])]) * mul[c]) + std::fabs(add[c]);
              }
              const uint8_t* sl = bk + sparse_off;
              for (int i = 0; i < n_sparse; ++i) {
                uint16_t at, h;
                std::memcpy(&at, sl + 4 * i, 2);
                std::memcpy(&h, sl + 4 * i + 2, 2);
                if (at < 16 * d && at / d == t) xm[at % d] = std::fabs(gguf::Fp16ToFp32(h));
              }
              const int64_t col = blk * 16 + t;
              for (int r = 0; r < n_q; ++r) {
                double m_bound = 0;
                for (int i = 0; i < half; ++i) {
                  double ti;
                  if (tg == &lanes) {
                    ti = std::fabs(trig[size_t(i) * stride + col]) + std::fabs(trig[size_t(half + i) * stride + col]);
                  } else {
                    const float* row = &rows[size_t(blk) * 16 * d];
                    ti = (std::fabs(row[2 * i]) + std::fabs(row[2 * i + 1])) *
                         (std::fabs(offs[size_t(i) * 16 + t]) + std::fabs(offs[size_t(half + i) * 16 + t]));
                  }
                  m_bound += (std::fabs(q[size_t(r) * d + 2 * i]) + std::fabs(q[size_t(r) * d + 2 * i + 1])) *
                             (xm[2 * i] + xm[2 * i + 1]) * ti;
                }
                const size_t k = size_t(r) * ld + col;
                ASSERT_NEAR(got[k], want[k], (d + 16) * test_util::kU * m_bound)
                    << "b=" << b << " d=" << d << " r=" << r << " col=" << col
                    << (tg == &rec ? " rows+offs" : " lanes");
              }
            }
          }
          for (int r = 0; r < n_q; ++r) {  // ld > n: the padding is untouched
            for (int64_t c = n; c < ld; ++c) ASSERT_EQ(got[size_t(r) * ld + c], 0.f);
          }
        }
      }
    }
  }
}

// RoPE over many rows from the cos/sin table (kv::Rope's layout), odd widths and gaps in the
// positions; bit-identical to the scalar rotation.
TEST_P(KvKernels, RotatePairsRowsEqualReference) {
  for (int n_rot : {2, 6, 16, 32, 64, 80, 128}) {
    const int positions = 50, ld = n_rot + 5;
    auto table = Randn(size_t(positions) * n_rot, 8 + n_rot);
    const int64_t n = 13;
    std::vector<int64_t> pos(n);
    for (int64_t t = 0; t < n; ++t) pos[t] = (7 * t + 3) % positions;
    auto x = Randn(size_t(n) * ld, 9 + n_rot), y = x;
    RotatePairsRows(x.data(), n, ld, n_rot, table.data(), pos.data());
    ref::RotatePairsRows(y.data(), n, ld, n_rot, table.data(), pos.data());
    for (size_t i = 0; i < x.size(); ++i) ASSERT_EQ(x[i], y[i]) << "n_rot=" << n_rot << " i=" << i;
  }
}

TEST_P(KvKernels, SignDotRowsMatchReference) {
  for (int m : {8, 16, 64, 72, 128, 256}) {
    for (int n_q : {1, 3, 5}) {
      for (int64_t n : {1, 3, 4, 7, 33}) {
        const size_t row_bytes = 2 + m / 8;
        auto rows = RandBytes(row_bytes * n, m + n_q + n);
        for (int64_t t = 0; t < n; ++t) {
          const uint16_t h = uint16_t(0x4000 + 97 * t);
          std::memcpy(&rows[t * row_bytes], &h, 2);
        }
        const auto sq = Randn(size_t(n_q) * m, 21);
        const int64_t ld = n + 1;
        std::vector<float> got(size_t(n_q) * ld, 0.f), want(got);
        SignDotRows(sq.data(), n_q, m, rows.data(), row_bytes, 2, 0, 0.05f, n, got.data(), ld);
        ref::SignDotRows(sq.data(), n_q, m, rows.data(), row_bytes, 2, 0, 0.05f, n, want.data(), ld);
        for (int r = 0; r < n_q; ++r) {
          double mag = 0;
          for (int i = 0; i < m; ++i) mag += std::fabs(sq[size_t(r) * m + i]);
          for (int64_t t = 0; t < n; ++t) {
            uint16_t h;
            std::memcpy(&h, &rows[t * row_bytes], 2);
            const double kg = std::fabs(0.05 * gguf::Fp16ToFp32(h));
            ASSERT_NEAR(got[size_t(r) * ld + t], want[size_t(r) * ld + t], SumBound(m + 1, kg * mag))
                << "m=" << m << " n_q=" << n_q << " n=" << n;
          }
        }
      }
    }
  }
}

TEST_P(KvKernels, PolarRowsEqualRecursiveDecode) {
  const auto trig = Randn(8 * 16, 31);
  for (int nb : {1, 3, 4, 8}) {
    const size_t row_bytes = 2 * nb + (size_t(nb) * 46 + 7) / 8;
    const int64_t n = 9;
    auto rows = RandBytes(row_bytes * n, 40 + nb);
    for (int64_t t = 0; t < n; ++t) {
      for (int b = 0; b < nb; ++b) {
        const uint16_t h = uint16_t(0x3C00 + 101 * b + 7 * t);
        std::memcpy(&rows[t * row_bytes + 2 * b], &h, 2);
      }
    }
    std::vector<float> got(size_t(n) * nb * 16), want(got.size());
    PolarRows(rows.data(), n, row_bytes, nb, trig.data(), got.data());
    for (int64_t t = 0; t < n; ++t) ref::PolarRow(&rows[t * row_bytes], nb, trig.data(), &want[size_t(t) * nb * 16]);
    for (size_t i = 0; i < got.size(); ++i) ASSERT_EQ(got[i], want[i]) << "nb=" << nb << " i=" << i;
  }
}

// The tokens-in-lanes attention kernels against ref:: (bit-by-bit codes, recursive decode, double
// sums) and against the decoded rows: odd token counts (partial groups of 16), more tokens than
// one staged tile (nb 4: 512), 1-9 query rows, ld > n.
TEST_P(KvKernels, PolarDotAndAxpyRowsMatchReference) {
  auto trig = Randn(8 * 16, 33);
  for (auto& v : trig) v = std::tanh(v);  // cos / sin-sized factors
  for (int nb : {1, 3, 4, 8}) {
    const int d = nb * 16;
    const size_t row_bytes = 2 * nb + (size_t(nb) * 46 + 7) / 8;
    for (int64_t n : {1, 5, 16, 17, 130, 600}) {
      auto rows = RandBytes(row_bytes * n, 50 + nb + uint32_t(n));
      for (int64_t t = 0; t < n; ++t) {
        for (int b = 0; b < nb; ++b) {
          const uint16_t h = gguf::Fp32ToFp16(0.5f + 0.01f * float((t * 7 + b * 3) % 100));
          std::memcpy(&rows[t * row_bytes + 2 * b], &h, 2);
        }
      }
      std::vector<float> y(size_t(n) * d);
      PolarRows(rows.data(), n, row_bytes, nb, trig.data(), y.data());
      for (int n_q : {1, 3, 5, 9}) {
        const int64_t ld = n + 3;
        const auto q = Randn(size_t(n_q) * d, 60 + n_q);
        std::vector<float> got(size_t(n_q) * ld, -7.f), want(got.size(), -7.f);
        PolarDotRows(q.data(), n_q, rows.data(), n, row_bytes, nb, trig.data(), got.data(), ld);
        ref::PolarDotRows(q.data(), n_q, rows.data(), n, row_bytes, nb, trig.data(), want.data(), ld);
        for (int r = 0; r < n_q; ++r) {
          for (int64_t t = 0; t < n; ++t) {
            double mag = 0;
            for (int c = 0; c < d; ++c) mag += std::fabs(double(q[size_t(r) * d + c]) * y[size_t(t) * d + c]);
            ASSERT_NEAR(got[size_t(r) * ld + t], want[size_t(r) * ld + t], SumBound(d, mag))
                << "nb=" << nb << " n=" << n << " n_q=" << n_q << " r=" << r << " t=" << t;
          }
          for (int64_t t = n; t < ld; ++t) ASSERT_EQ(got[size_t(r) * ld + t], -7.f);
        }
        auto p = Randn(size_t(n_q) * ld, 70 + n_q);
        for (auto& v : p) v = std::fabs(v);
        const auto out0 = Randn(size_t(n_q) * d, 80 + n_q);
        std::vector<float> ga = out0, wa = out0;
        PolarAxpyRows(p.data(), ld, n_q, rows.data(), n, row_bytes, nb, trig.data(), ga.data());
        ref::PolarAxpyRows(p.data(), ld, n_q, rows.data(), n, row_bytes, nb, trig.data(), wa.data());
        for (int r = 0; r < n_q; ++r) {
          for (int c = 0; c < d; ++c) {
            double mag = std::fabs(out0[size_t(r) * d + c]);
            for (int64_t t = 0; t < n; ++t) mag += std::fabs(double(p[size_t(r) * ld + t]) * y[size_t(t) * d + c]);
            ASSERT_NEAR(ga[size_t(r) * d + c], wa[size_t(r) * d + c], SumBound(n + 1, mag))
                << "nb=" << nb << " n=" << n << " n_q=" << n_q << " r=" << r << " c=" << c;
          }
        }
      }
    }
  }
}

}  // namespace
}  // namespace kvc::cpu
