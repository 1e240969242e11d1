// Attention over the cache (KvCache::Attend). Two ways to read a stream, same result:
//   - fused: the codec scores q·k on its packed blocks and accumulates p·v from them (decode
//     steps: few query rows, so reading packed bytes once is what matters);
//   - tiled: decode the stream to f32 once, then GEMM (prefill: many query rows; pre-RoPE keys).
// Both are exact up to float rounding; tests check them against each other.
#include <cblas.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <memory>
#include <mutex>
#include <numeric>

#include "cpu/kv_kernels.h"
#include "cpu/ops.h"
#include "kv/cache.h"
#include "kv/cache_internal.h"
#include "util/check.h"

namespace kvc::kv {
namespace {

constexpr int kRowTileTokens = 64;   // query tokens per task in the tiled path
constexpr int kFusedMaxTokens = 4;   // up to this many query tokens use the fused path

// Rows of one task: query tokens [t0, t1) of the call, times the g heads of the group.
struct HeadPlan {
  const HeadCache* hc = nullptr;
  bool tiled = false;     // keys read through a decoded f32 tile
  bool v_tiled = false;   // values read through a decoded f32 tile
  // Uninitialised (every element is written by DecodeKeys / DecodeValues before it is read):
  // zero-filling n × head_dim floats per head and step was ~5 % of a decode step at 4k.
  std::unique_ptr<float[]> k_tile;   // [n, head_dim] decoded keys (post-RoPE), tiled path
  std::unique_ptr<float[]> v_tile;   // [n, dv]
  std::vector<int64_t> rope_pos;  // [n] key RoPE positions as attention sees them
  // Tokens of window codecs (KIVI) written by this call: they are flushed (encoded) before the
  // tiles are decoded, but each query must see them as a token-by-token stream would: token j is
  // read quantized only if the codec's flush rule had already encoded it when the query's own
  // token arrived; otherwise from its fp16 copy. That makes a batched prefill attend exactly
  // like streaming decode (KIVI §3.2), so perplexity measures what decoding would see.
  struct Pending {
    int64_t begin = 0, end = 0;  // cell range [begin, end)
    int64_t seg_off = 0;         // first cell of the segment
    int64_t residual = 0, quantum = 1;
    std::vector<float> alt;      // [end - begin, dim] fp16 values, reconstructed (+RoPE for keys)
    // Packed tokens of the stream at the moment its token `idx` (segment-local) attends.
    int64_t Boundary(int64_t idx) const {
      return idx - residual >= quantum ? (idx - residual) / quantum * quantum : 0;
    }
  };
  std::vector<Pending> k_pend, v_pend;
  // Side tiers (demoted / pinned cells, cache_internal.h SideTier), all tiers concatenated and
  // decoded once per call: keys post-RoPE at their positions, values; seq for the causal mask
  // (arrival order, not sorted: masked per cell). Empty when the head has none.
  std::vector<int64_t> side_seq;     // [n_side]
  std::vector<float> side_k;         // [n_side, head_dim]
  std::vector<float> side_v;         // [n_side, dv]
};

// Decodes every side tier of a head into plan p (keys rotated at their positions).
void DecodeSide(const HeadCache& hc, const Rope* rope, int hd, int dv, HeadPlan* p) {
  int64_t n = 0;
  for (const auto& t : hc.side) n += t.seg.k.codec ? t.n() : 0;
  p->side_seq.clear();
  if (n == 0) return;
  p->side_k.resize(size_t(n) * hd);
  p->side_v.resize(size_t(n) * dv);
  int64_t off = 0;
  for (const auto& t : hc.side) {
    if (!t.seg.k.codec || t.n() == 0) continue;
    DecodeStreamFull(t.seg.k, rope, t.pos.data(), &p->side_k[size_t(off) * hd]);
    DecodeStreamFull(t.seg.v, nullptr, nullptr, &p->side_v[size_t(off) * dv]);
    p->side_seq.insert(p->side_seq.end(), t.seq.begin(), t.seq.end());
    off += t.n();
  }
}

// Saves the fp16 tail of a window stream as seen before its flush, then flushes it.
void TakePending(Stream& st, int64_t seg_off, const Rope* rope, const int64_t* rope_pos,
                 std::vector<HeadPlan::Pending>* out) {
  if (!st.has_window() || st.n_tail == 0) return;
  HeadPlan::Pending pd;
  pd.seg_off = seg_off;
  pd.begin = seg_off + st.n_packed;
  pd.end = seg_off + st.n();
  pd.residual = st.codec->residual_tokens();
  pd.quantum = st.codec->flush_quantum();
  const int64_t n = st.n_tail;
  std::vector<float> raw(size_t(n) * st.dim);
  Fp16ToFp32Row(st.tail.data(), n * st.dim, raw.data());
  pd.alt.resize(size_t(n) * st.dim_in);
  st.ToInput(raw.data(), n, pd.alt.data(), rope_pos ? rope_pos + pd.begin : nullptr);
  if (rope && st.pre_rope) rope->Apply(pd.alt.data(), int(n), st.dim_in, rope_pos + (pd.begin));
  st.Flush();
  out->push_back(std::move(pd));
}

// Scores of pre-RoPE keys at decode: out[r * ld + j] = <q[r], R(pos[j]) k̂_j> for the first n
// tokens of the stream (packed blocks, then the fp16 tail). Whole blocks go to the codec's
// ScoreRopeBlocks when it has one; otherwise (and for the rest) the stream is decoded in chunks of
// ~128 tokens (a 32 KiB tile that stays in L1/L2), reconstructed (transform, + μ), rotated
// (Rope::Apply: SIMD over the cos/sin table) and scored (DotF32Rows) before the next chunk, so
// no [n, head_dim] tile of the whole stream is written and read back at every step.
// q [rows, dim_in] post-RoPE query rows. Same values as DecodeKeys + GEMM up to summation order.
void ScorePreRopeKeys(const Stream& st, const Rope& rope, const int64_t* pos, const float* q,
                      int rows, int64_t n, float* out, int64_t ld) {
  constexpr int64_t kChunkTokens = 128;
  const int bt = st.block_tokens();
  const size_t bb = st.block_bytes();
  const int64_t chunk = std::max<int64_t>(bt, kChunkTokens / bt * bt);
  thread_local std::vector<float> y, x;
  if (y.size() < size_t(chunk) * st.dim) y.resize(size_t(chunk) * st.dim);
  if (x.size() < size_t(chunk) * st.dim_in) x.resize(size_t(chunk) * st.dim_in);
  float* xs = st.transform ? x.data() : y.data();  // no transform: decode straight into place
  int64_t m = 0, j_start = 0;
  // Codecs that score packed pre-RoPE keys with RoPE on the fly (KVQuant: tokens in lanes) take
  // the whole blocks; the chunks below then cover the rest (a partial block, the fp16 tail).
  const int64_t full = std::min(st.n_packed, n) / bt;
  if (!st.transform && full > 0 &&
      st.codec->ScoreRopeBlocks(q, rows, st.packed.data(), full, rope, pos, out, ld)) {
    j_start = full * bt;
    if (st.center && !st.mu.empty()) {  // stored k − μ (pre-RoPE): add q·R(pos) μ back
      rope.AddDotRotated(q, rows, st.dim_in, st.mu.data(), pos, j_start, out, ld);
    }
  }
  for (int64_t j0 = j_start; j0 < n; j0 += m) {
    if (j0 < st.n_packed) {  // j0 is a multiple of bt here (chunk is)
      const int64_t nb = std::min(chunk, st.n_packed - j0) / bt;
      st.codec->DecodeBlocks(st.packed.data() + size_t(j0 / bt) * bb, nb, y.data());
      m = std::min(nb * bt, n - j0);
    } else {
      m = std::min(chunk, n - j0);
      Fp16ToFp32Row(st.tail.data() + size_t(j0 - st.n_packed) * st.dim, m * st.dim, y.data());
    }
    st.ToInput(y.data(), m, xs, pos + j0);
    rope.Apply(xs, int(m), st.dim_in, pos + j0);
    cpu::DotF32Rows(q, rows, xs, m, st.dim_in, out + j0, ld);
  }
}

}  // namespace

void KvCache::Attend(int layer, const float* q, const int64_t* q_seq, int n_q, float* out) {
  // GEMMs here run inside our own OpenMP tasks: OpenBLAS must not start threads of its own
  // (nested pools oversubscribe the cores and collapse throughput).
  static std::once_flag blas_once;
  std::call_once(blas_once, [] { openblas_set_num_threads(1); });
  if (observer_) observer_->OnQuery(layer, q_seq, n_q, q);
  const int nkv = shape_.n_head_kv, nh = shape_.n_head, g = nh / nkv;
  const int hd = shape_.head_dim, dv = shape_.DimV();
  const float scale = shape_.attn_scale > 0 ? shape_.attn_scale : 1.0f / std::sqrt(float(hd));
  auto& heads = impl_->layers[layer];
  const Rope& rope = *impl_->rope;
  const bool in_cache = cfg_.position_mode == PositionMode::kInCache;
  const bool want_tiled = n_q > kFusedMaxTokens;

  std::vector<HeadPlan> plans(nkv);
  // Predictive caches (kv/predictive.h): the layer's reconstruction (every cell, prediction +
  // decoded residual) is built once here, serially; every head then reads it as an f32 tile.
  const Recon* recon = impl_->pred ? &PredictiveRecon(shape_, *impl_, layer) : nullptr;
  // Phase 1 (parallel over heads): decode tiles where needed.
#pragma omp parallel for schedule(dynamic, 1)
  for (int h = 0; h < nkv; ++h) {
    HeadPlan& p = plans[h];
    const HeadCache& hc = heads[h];
    p.hc = &hc;
    const int64_t n = hc.n();
    p.rope_pos = hc.pos;
    if (in_cache) std::iota(p.rope_pos.begin(), p.rope_pos.end(), 0);
    bool any_window = false;
    for (const auto& seg : hc.segs) {
      any_window = any_window || (seg.k.has_window() && seg.k.n_tail > 0) ||
                   (seg.v.has_window() && seg.v.n_tail > 0);
    }
    // Pre-RoPE keys (KVQuant, low-rank, in-cache positions) must be decoded and rotated. With
    // many query rows that is done once into a tile (then GEMM); at decode each such key stream
    // is decoded, rotated and scored in L1-sized chunks (ScorePreRopeKeys), and the values
    // take the fused path (a low-rank value stream is accumulated in its latent and
    // reconstructed once per query row).
    const bool both_tiled = want_tiled || (n_q > 1 && any_window) || recon;
    p.tiled = both_tiled;
    p.v_tiled = both_tiled;
    if (recon) {
      const int dk_all = nkv * hd, dv_all = nkv * dv;
      p.k_tile.reset(new float[size_t(n) * hd]);
      p.v_tile.reset(new float[size_t(n) * dv]);
      for (int64_t i = 0; i < n; ++i) {
        std::memcpy(&p.k_tile[size_t(i) * hd], &recon->k[size_t(i) * dk_all + size_t(h) * hd],
                    hd * sizeof(float));
        std::memcpy(&p.v_tile[size_t(i) * dv], &recon->v[size_t(i) * dv_all + size_t(h) * dv],
                    dv * sizeof(float));
      }
      rope.Apply(p.k_tile.get(), int(n), hd, p.rope_pos.data());
      continue;
    }
    if (p.tiled && n_q > 1 && any_window) {
      HeadCache& hm = heads[h];
      int64_t off = 0;
      for (auto& seg : hm.segs) {
        TakePending(seg.k, off, &rope, p.rope_pos.data(), &p.k_pend);
        TakePending(seg.v, off, nullptr, nullptr, &p.v_pend);
        off += seg.n();
      }
    }
    if (p.tiled) {
      p.k_tile.reset(new float[size_t(n) * hd]);
      DecodeKeys(layer, h, p.k_tile.get());
    }
    if (p.v_tiled) {
      p.v_tile.reset(new float[size_t(n) * dv]);
      DecodeValues(layer, h, p.v_tile.get());
    }
    if (!hc.side.empty()) DecodeSide(hc, &rope, hd, dv, &p);
  }

  // Tasks: (head, query token tile).
  const int n_tiles = (n_q + kRowTileTokens - 1) / kRowTileTokens;
  const int n_tasks = nkv * n_tiles;
  std::vector<std::vector<float>> acc_part(n_tasks), obs_part(n_tasks);

#pragma omp parallel for schedule(dynamic, 1)
  for (int task = 0; task < n_tasks; ++task) {
    const int h = task / n_tiles, tile = task % n_tiles;
    const HeadPlan& p = plans[h];
    const HeadCache& hc = *p.hc;
    const int t0 = tile * kRowTileTokens, t1 = std::min(n_q, t0 + kRowTileTokens);
    const int nt = t1 - t0, rows = nt * g;
    // Keys visible to any row of this tile (cells are in seq order).
    const int64_t max_seq = q_seq[t1 - 1];
    const int64_t n_eff =
        std::upper_bound(hc.seq.begin(), hc.seq.end(), max_seq) - hc.seq.begin();

    // Q rows of this tile: [rows, hd], row r = (token t0 + r / g, head h*g + r % g), RoPE'd.
    std::vector<float> qh(size_t(rows) * hd);
    for (int i = 0; i < nt; ++i) {
      int64_t qpos;
      if (in_cache) {
        qpos = std::lower_bound(hc.seq.begin(), hc.seq.end(), q_seq[t0 + i]) - hc.seq.begin();
      } else {
        qpos = q_seq[t0 + i] - hc.shift;
      }
      for (int j = 0; j < g; ++j) {
        float* dst = &qh[size_t(i * g + j) * hd];
        std::memcpy(dst, q + (int64_t(t0 + i) * nh + h * g + j) * hd, hd * sizeof(float));
        rope.ApplySame(dst, 1, hd, qpos);
      }
    }

    std::vector<float> s(size_t(rows) * std::max<int64_t>(n_eff, 1));
    std::vector<float> o(size_t(rows) * dv, 0.f);
    // Side-tier scores [rows, n_side]: same scale, causal mask per cell, one softmax with the
    // main cells (so attention over every tier is one distribution, exactly as before demotion).
    const int64_t n_side = int64_t(p.side_seq.size());
    std::vector<float> s2;
    if (n_side > 0) {
      s2.resize(size_t(rows) * n_side);
      cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, rows, int(n_side), hd, 1.0f, qh.data(),
                  hd, p.side_k.data(), hd, 0.0f, s2.data(), int(n_side));
    }
    if (n_eff > 0 || n_side > 0) {
    if (n_eff > 0) {  // main cells' scores (block kept at its pre-demotion indentation)
      // ---- scores
      if (p.tiled) {
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, rows, int(n_eff), hd, 1.0f, qh.data(),
                    hd, p.k_tile.get(), hd, 0.0f, s.data(), int(n_eff));
        for (const auto& pd : p.k_pend) {
          const int64_t a = pd.begin, b = std::min(pd.end, n_eff);
          if (a >= b) continue;
          std::vector<float> sa(size_t(rows) * (b - a));
          cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, rows, int(b - a), hd, 1.0f,
                      qh.data(), hd, pd.alt.data(), hd, 0.0f, sa.data(), int(b - a));
          for (int r = 0; r < rows; ++r) {
            const int64_t ci = std::lower_bound(hc.seq.begin(), hc.seq.end(), q_seq[t0 + r / g]) -
                               hc.seq.begin();
            const int64_t gb = pd.seg_off + pd.Boundary(ci - pd.seg_off);
            for (int64_t j = std::max(a, gb); j < b; ++j) {
              s[size_t(r) * n_eff + j] = sa[size_t(r) * (b - a) + (j - a)];
            }
          }
        }
      } else {
        int64_t off = 0;
        for (const auto& seg : hc.segs) {
          const Stream& st = seg.k;
          const int64_t n_seg = st.n();
          if (off >= n_eff || n_seg == 0) { off += n_seg; continue; }
          if (st.pre_rope) {
            ScorePreRopeKeys(st, rope, p.rope_pos.data() + off, qh.data(), rows,
                             std::min(n_seg, n_eff - off), &s[off], n_eff);
            off += n_seg;
            continue;
          }
          std::vector<float> qf;
          const float* qsrc = qh.data();
          if (st.transform) {
            qf.resize(size_t(rows) * st.dim);
            st.transform->FoldQuery(qh.data(), rows, qf.data());
            qsrc = qf.data();
          }
          const int pqd = st.codec->PreparedQueryDim();
          std::vector<float> qp(size_t(rows) * pqd);
          st.codec->PrepareQuery(qsrc, rows, qp.data());
          const int bt = st.block_tokens();
          const size_t bb = st.block_bytes();
          // Full blocks below n_eff in one call; a block straddling n_eff via a temp buffer.
          const int64_t n_blocks = st.n_packed / bt;
          const int64_t full = std::min(n_blocks, std::max<int64_t>(0, (n_eff - off) / bt));
          if (full > 0) st.codec->ScoreBlocks(qp.data(), rows, st.packed.data(), full, &s[off], n_eff);
          if (full < n_blocks && off + full * bt < n_eff) {
            std::vector<float> tmp(size_t(rows) * bt);
            st.codec->Score(qp.data(), rows, st.packed.data() + full * bb, tmp.data());
            for (int r = 0; r < rows; ++r) {
              for (int t = 0; t < bt && off + full * bt + t < n_eff; ++t) {
                s[size_t(r) * n_eff + off + full * bt + t] = tmp[size_t(r) * bt + t];
              }
            }
          }
          const int64_t tail_n = std::min<int64_t>(st.n_tail, std::max<int64_t>(0, n_eff - off - st.n_packed));
          if (tail_n > 0) {
            cpu::DotF16Rows(qsrc, rows, st.tail.data(), tail_n, st.dim, &s[off + st.n_packed], n_eff);
          }
          if (st.center && !st.mu.empty() && st.mu_rope) {
            // stored k − R(pos) μ: add q·R(pos_j) μ back per key (Stream::mu_rope)
            const int64_t end = std::min(off + n_seg, n_eff);
            st.mu_rope->AddDotRotated(qh.data(), rows, hd, st.mu.data(), p.rope_pos.data() + off,
                                      end - off, &s[off], n_eff);
          } else if (st.center && !st.mu.empty()) {  // stored x − μ: add q·μ back (Stream::center)
            const int64_t end = std::min(off + n_seg, n_eff);
            for (int r = 0; r < rows; ++r) {
              float b = 0.f;
              for (int d = 0; d < hd; ++d) b += qh[size_t(r) * hd + d] * st.mu[d];
              for (int64_t j = off; j < end; ++j) s[size_t(r) * n_eff + j] += b;
            }
          }
          off += n_seg;
        }
      }
      }
      // ---- scale, causal mask, softmax, statistics
      const float neg_inf = -std::numeric_limits<float>::infinity();
      for (int r = 0; r < rows; ++r) {
        const int64_t qs = q_seq[t0 + r / g];
        float* sr = &s[size_t(r) * n_eff];
        for (int64_t c = 0; c < n_eff; ++c) sr[c] = hc.seq[c] <= qs ? sr[c] * scale : neg_inf;
        if (n_side == 0) {
          cpu::Softmax(sr, n_eff);
          continue;
        }
        float* sr2 = &s2[size_t(r) * n_side];
        float m = neg_inf;
        for (int64_t c = 0; c < n_eff; ++c) m = std::max(m, sr[c]);
        for (int64_t c = 0; c < n_side; ++c) {
          sr2[c] = p.side_seq[c] <= qs ? sr2[c] * scale : neg_inf;
          m = std::max(m, sr2[c]);
        }
        double sum = 0;
        for (int64_t c = 0; c < n_eff; ++c) sum += sr[c] = sr[c] == neg_inf ? 0.f : std::exp(sr[c] - m);
        for (int64_t c = 0; c < n_side; ++c) sum += sr2[c] = sr2[c] == neg_inf ? 0.f : std::exp(sr2[c] - m);
        const float inv = sum > 0 ? float(1.0 / sum) : 0.f;
        for (int64_t c = 0; c < n_eff; ++c) sr[c] *= inv;
        for (int64_t c = 0; c < n_side; ++c) sr2[c] *= inv;
      }
      if (stats_.accumulate) {
        auto& a = acc_part[task];
        a.assign(n_eff, 0.f);
        for (int r = 0; r < rows; ++r) cpu::Axpy(1.0f / g, &s[size_t(r) * n_eff], n_eff, a.data());
      }
      if (stats_.obs_window > 0) {
        auto& ob = obs_part[task];
        ob.assign(n_eff, 0.f);
        for (int r = 0; r < rows; ++r) {
          if (t0 + r / g >= n_q - stats_.obs_window) {
            cpu::Axpy(1.0f / g, &s[size_t(r) * n_eff], n_eff, ob.data());
          }
        }
      }
      // ---- values
      if (n_side > 0) {  // o = P_side · V_side first; the main paths below add to o
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, rows, dv, int(n_side), 1.0f,
                    s2.data(), int(n_side), p.side_v.data(), dv, 0.0f, o.data(), dv);
      }
      if (n_eff == 0) {
        // only side cells are visible
      } else if (p.v_tiled) {
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, rows, dv, int(n_eff), 1.0f,
                    s.data(), int(n_eff), p.v_tile.get(), dv, 1.0f, o.data(), dv);
        for (const auto& pd : p.v_pend) {
          const int64_t a = pd.begin, b = std::min(pd.end, n_eff);
          if (a >= b) continue;
          // o += P_fp16-part · (v_fp16 − v_quantized) over the columns still in the window.
          std::vector<float> delta(size_t(b - a) * dv), pm(size_t(rows) * (b - a), 0.f);
          for (int64_t j = a; j < b; ++j) {
            for (int c = 0; c < dv; ++c) {
              delta[size_t(j - a) * dv + c] = pd.alt[size_t(j - a) * dv + c] - p.v_tile[size_t(j) * dv + c];
            }
          }
          for (int r = 0; r < rows; ++r) {
            const int64_t ci = std::lower_bound(hc.seq.begin(), hc.seq.end(), q_seq[t0 + r / g]) -
                               hc.seq.begin();
            const int64_t gb = pd.seg_off + pd.Boundary(ci - pd.seg_off);
            for (int64_t j = std::max(a, gb); j < b; ++j) {
              pm[size_t(r) * (b - a) + (j - a)] = s[size_t(r) * n_eff + j];
            }
          }
          cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, rows, dv, int(b - a), 1.0f,
                      pm.data(), int(b - a), delta.data(), dv, 1.0f, o.data(), dv);
        }
      } else {
        int64_t off = 0;
        for (const auto& seg : hc.segs) {
          const Stream& st = seg.v;
          const int64_t n_seg = st.n();
          if (off >= n_eff || n_seg == 0) { off += n_seg; continue; }
          std::vector<float> acc(size_t(rows) * st.dim, 0.f);
          const int bt = st.block_tokens();
          const size_t bb = st.block_bytes();
          const int64_t n_blocks = st.n_packed / bt;
          const int64_t full = std::min(n_blocks, std::max<int64_t>(0, (n_eff - off) / bt));
          if (full > 0) st.codec->AccumulateBlocks(&s[off], n_eff, rows, st.packed.data(), full, acc.data());
          if (full < n_blocks && off + full * bt < n_eff) {
            std::vector<float> pb(size_t(rows) * bt, 0.f);
            for (int r = 0; r < rows; ++r) {
              for (int t = 0; t < bt && off + full * bt + t < n_eff; ++t) {
                pb[size_t(r) * bt + t] = s[size_t(r) * n_eff + off + full * bt + t];
              }
            }
            st.codec->AccumulateWeighted(pb.data(), rows, st.packed.data() + full * bb, acc.data());
          }
          const int64_t tail_n = std::min<int64_t>(st.n_tail, std::max<int64_t>(0, n_eff - off - st.n_packed));
          if (tail_n > 0) {
            cpu::AxpyF16Rows(&s[off + st.n_packed], n_eff, rows, st.tail.data(), tail_n, st.dim, acc.data());
          }
          if (st.transform) {
            std::vector<float> rec(size_t(rows) * dv);
            st.transform->Reconstruct(acc.data(), rows, rec.data());
            for (size_t i = 0; i < rec.size(); ++i) o[i] += rec[i];
          } else {
            for (size_t i = 0; i < acc.size(); ++i) o[i] += acc[i];
          }
          if (st.center && !st.mu.empty()) {  // stored v − μ: add (Σ p over the segment)·μ
            const int64_t end = std::min(off + n_seg, n_eff);
            for (int r = 0; r < rows; ++r) {
              double mass = 0;
              for (int64_t j = off; j < end; ++j) mass += s[size_t(r) * n_eff + j];
              for (int d = 0; d < dv; ++d) o[size_t(r) * dv + d] += float(mass) * st.mu[d];
            }
          }
          off += n_seg;
        }
      }
    }
    for (int i = 0; i < nt; ++i) {
      for (int j = 0; j < g; ++j) {
        std::memcpy(out + (int64_t(t0 + i) * nh + h * g + j) * dv, &o[size_t(i * g + j) * dv],
                    dv * sizeof(float));
      }
    }
  }

  FlushLayer(layer);
  // A predictive cache's reconstruction buffers are working memory of one forward pass.
  if (recon && layer == shape_.n_layer - 1) ReleasePredictiveRecon(*impl_);

  // Merge statistics (serial, deterministic order).
  if (stats_.accumulate || stats_.obs_window > 0) {
    for (int h = 0; h < nkv; ++h) {
      HeadCache& hc = heads[h];
      if (stats_.accumulate) hc.acc.resize(hc.seq.size(), 0.f);
      if (stats_.obs_window > 0) hc.obs.assign(hc.seq.size(), 0.f);
      for (int tile = 0; tile < n_tiles; ++tile) {
        const int task = h * n_tiles + tile;
        for (size_t c = 0; c < acc_part[task].size(); ++c) hc.acc[c] += acc_part[task][c];
        for (size_t c = 0; c < obs_part[task].size(); ++c) hc.obs[c] += obs_part[task][c];
      }
    }
  }
}

}  // namespace kvc::kv
