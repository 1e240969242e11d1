// Helpers shared by the libFuzzer targets in tests/fuzz/.
#pragma once

#include <cstdio>
#include <cstdlib>
#include <vector>

#include "kv/codec.h"

namespace kvc::fuzz {

inline void Require(bool ok, const char* what) {
  if (!ok) {
    std::fprintf(stderr, "fuzz invariant failed: %s\n", what);
    std::abort();
  }
}

// Deterministic finite test data (no RNG state carried between inputs).
inline std::vector<float> Wave(size_t n, float scale) {
  std::vector<float> v(n);
  for (size_t i = 0; i < n; ++i) v[i] = scale * float(int((i * 2654435761u) % 2001) - 1000) / 1000.f;
  return v;
}

// One codec through its whole interface: Encode a block, Decode it (finite out), Score and
// AccumulateWeighted on it and on several blocks (ScoreBlocks / AccumulateBlocks / DecodeBlocks,
// the SIMD paths). Any out-of-bounds access is the sanitizer's to report.
inline void ExerciseCodec(kv::Codec& c) {
  const int bt = c.block_tokens(), d = c.dim();
  Require(bt >= 1 && d >= 1 && c.BlockBytes() > 0, "codec shape");
  if (size_t(bt) * d > (1u << 16) || c.BlockBytes() > (1u << 20)) return;  // keep inputs cheap
  const int nb = 3, n_q = 2;
  const std::vector<float> x = Wave(size_t(nb) * bt * d, 2.f);
  std::vector<uint8_t> blocks(nb * c.BlockBytes());
  for (int b = 0; b < nb; ++b) c.Encode(&x[size_t(b) * bt * d], &blocks[b * c.BlockBytes()]);
  std::vector<float> y(size_t(nb) * bt * d);
  c.Decode(blocks.data(), y.data());
  c.DecodeBlocks(blocks.data(), nb, y.data());
  const std::vector<float> q = Wave(size_t(n_q) * d, 1.f);
  std::vector<float> qp(size_t(n_q) * c.PreparedQueryDim());
  c.PrepareQuery(q.data(), n_q, qp.data());
  const int64_t ld = int64_t(nb) * bt;
  std::vector<float> s(size_t(n_q) * ld), out(size_t(n_q) * d);
  c.Score(qp.data(), n_q, blocks.data(), s.data());
  c.ScoreBlocks(qp.data(), n_q, blocks.data(), nb, s.data(), ld);
  std::vector<float> p(size_t(n_q) * ld, 1.f / float(ld));
  c.AccumulateWeighted(p.data(), n_q, blocks.data(), out.data());
  c.AccumulateBlocks(p.data(), ld, n_q, blocks.data(), nb, out.data());
}

}  // namespace kvc::fuzz
