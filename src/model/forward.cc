#include "model/forward.h"

#include <fmt/format.h>

#include <algorithm>
#include <cmath>

#include "cpu/ops.h"
#include "model/model.h"

namespace kvc {

void ForwardBatch(const Model& model, std::vector<SeqRows>& seqs, ForwardScratch* sc) {
  const ModelConfig& c = model.config();
  const int E = c.n_embd, hd = c.head_dim, nq = c.n_head * hd, nkv = c.n_head_kv * hd;
  // Row offsets of each sequence in the stacked activations.
  std::vector<int> row0(seqs.size() + 1, 0);
  for (size_t s = 0; s < seqs.size(); ++s) {
    seqs[s].status = Status::Ok();
    row0[s + 1] = row0[s] + seqs[s].n_tokens;
  }
  const int n = row0.back();
  if (n == 0) return;
  sc->x.resize(size_t(n) * E);
  sc->h.resize(size_t(n) * E);
  sc->q.resize(size_t(n) * nq);
  sc->k.resize(size_t(n) * nkv);
  sc->v.resize(size_t(n) * nkv);
  sc->attn.resize(size_t(n) * nq);
  sc->tmp.resize(size_t(n) * E);
  sc->gate.resize(size_t(n) * c.n_ff);
  sc->up.resize(size_t(n) * c.n_ff);
  float* x = sc->x.data();
  float* h = sc->h.data();
  float* tmp = sc->tmp.data();
  const gguf::TensorInfo& emb = model.token_embd();
  const size_t row_bytes = emb.n_bytes / size_t(emb.ne[1]);
  std::vector<int64_t> seq(n);  // [n] stream index of each row
  for (size_t s = 0; s < seqs.size(); ++s) {
    for (int i = 0; i < seqs[s].n_tokens; ++i) {
      const int r = row0[s] + i;
      gguf::DequantizeRow(emb.type(), emb.data + size_t(seqs[s].tokens[i]) * row_bytes,
                          x + size_t(r) * E, E);
      seq[r] = seqs[s].seq0 + i;
    }
  }
  auto add_bias = [&](std::vector<float>& y, const std::vector<float>& b, int w) {
    if (b.empty()) return;
    for (int i = 0; i < n; ++i) {
      for (int j = 0; j < w; ++j) y[size_t(i) * w + j] += b[j];
    }
  };
  // Per-sequence attention: across sequences when there are many (one OpenMP region per layer
  // instead of two per sequence and layer, and no idle thread on a 3-head GQA model), within each
  // sequence's Attend otherwise.
  const int n_threads = cpu::NumThreads();
  const bool parallel_seqs = n_threads > 1 && int(seqs.size()) >= 2 * n_threads;
  std::vector<size_t> order(seqs.size());
  for (size_t s = 0; s < seqs.size(); ++s) order[s] = s;
  std::stable_sort(order.begin(), order.end(),
                   [&](size_t a, size_t b) { return seqs[a].n_tokens > seqs[b].n_tokens; });
  auto fail = [&](size_t s, const Status& st) {
    seqs[s].status = Status(st.code(), "activations: " + st.message());
  };
  for (int l = 0; l < c.n_layer; ++l) {
    const Model::Layer& L = model.layers()[l];
    cpu::RmsNorm(x, L.attn_norm.data(), n, E, c.rms_eps, h);
    if (model.mla()) {
      for (size_t s = 0; s < seqs.size(); ++s) {
        float* out = tmp + size_t(row0[s]) * E;
        if (!seqs[s].status.ok()) {
          std::fill(out, out + size_t(seqs[s].n_tokens) * E, 0.f);
          continue;
        }
        Status st = MlaAttention(*model.mla(), l, *seqs[s].cache, h + size_t(row0[s]) * E,
                                 seq.data() + row0[s], seqs[s].n_tokens, out);
        if (!st.ok()) fail(s, st);
      }
    } else {
      cpu::MatMul(*L.wq, h, n, sc->q.data());
      cpu::MatMul(*L.wk, h, n, sc->k.data());
      cpu::MatMul(*L.wv, h, n, sc->v.data());
      add_bias(sc->q, L.bq, nq);
      add_bias(sc->k, L.bk, nkv);
      add_bias(sc->v, L.bv, nkv);
      auto attend = [&](size_t s) {
        const int r = row0[s], m = seqs[s].n_tokens;
        float* out = sc->attn.data() + size_t(r) * nq;
        if (seqs[s].status.ok()) {
          Status st = seqs[s].cache->Write(l, seq.data() + r, m, sc->k.data() + size_t(r) * nkv,
                                           sc->v.data() + size_t(r) * nkv);
          if (!st.ok()) fail(s, st);
        }
        if (!seqs[s].status.ok()) {  // keep its rows finite; nothing reads them
          std::fill(out, out + size_t(m) * nq, 0.f);
          return;
        }
        seqs[s].cache->Attend(l, sc->q.data() + size_t(r) * nq, seq.data() + r, m, out);
      };
      if (parallel_seqs) {
        // Many sequences: one task per sequence (largest first), each Attend's own parallel
        // loops then run on its thread. Caches are independent and every kernel's result is
        // independent of the thread that runs it, so this changes no number.
#pragma omp parallel for schedule(dynamic, 1) num_threads(n_threads)
        for (int i = 0; i < int(order.size()); ++i) attend(order[size_t(i)]);
      } else {
        for (size_t s = 0; s < seqs.size(); ++s) attend(s);
      }
      cpu::MatMul(*L.wo, sc->attn.data(), n, tmp);
    }
    for (size_t i = 0; i < size_t(n) * E; ++i) x[i] += tmp[i];
    cpu::RmsNorm(x, L.ffn_norm.data(), n, E, c.rms_eps, h);
    cpu::MatMul(*L.w_gate, h, n, sc->gate.data());
    cpu::MatMul(*L.w_up, h, n, sc->up.data());
    cpu::SwiGlu(sc->gate.data(), sc->up.data(), int64_t(n) * c.n_ff, sc->gate.data());
    cpu::MatMul(*L.w_down, sc->gate.data(), n, tmp);
    for (size_t i = 0; i < size_t(n) * E; ++i) x[i] += tmp[i];
  }
  // Logits: the rows asked for, stacked, through one output matmul.
  std::vector<int> out_row;  // stacked row -> activation row
  for (size_t s = 0; s < seqs.size(); ++s) {
    if (!seqs[s].logits || !seqs[s].status.ok()) continue;
    const int first = seqs[s].all_logits ? 0 : seqs[s].n_tokens - 1;
    for (int i = first; i < seqs[s].n_tokens; ++i) out_row.push_back(row0[s] + i);
  }
  if (out_row.empty()) return;
  const int rows = int(out_row.size());
  sc->logit_in.resize(size_t(rows) * E);
  for (int i = 0; i < rows; ++i) {
    std::copy_n(x + size_t(out_row[i]) * E, E, sc->logit_in.data() + size_t(i) * E);
  }
  cpu::RmsNorm(sc->logit_in.data(), model.output_norm().data(), rows, E, c.rms_eps, h);
  std::vector<float> all;
  // Write straight into the caller's buffer when one sequence asks (the common single-sequence
  // case); otherwise stack and scatter.
  int k = 0;
  const bool single = rows == (seqs.size() == 1 ? (seqs[0].all_logits ? seqs[0].n_tokens : 1) : -1);
  float* dst = nullptr;
  if (single) {
    dst = seqs[0].logits;
  } else {
    all.resize(size_t(rows) * c.n_vocab);
    dst = all.data();
  }
  cpu::MatMul(model.output(), h, rows, dst);
  for (size_t s = 0; s < seqs.size(); ++s) {
    if (!seqs[s].logits || !seqs[s].status.ok()) continue;
    const int m = seqs[s].all_logits ? seqs[s].n_tokens : 1;
    const float* src = dst + size_t(k) * c.n_vocab;
    if (!single) std::copy_n(src, size_t(m) * c.n_vocab, seqs[s].logits);
    for (size_t i = 0; i < size_t(m) * c.n_vocab; ++i) {
      if (!std::isfinite(src[i])) {
        seqs[s].status = InvalidArgument(fmt::format(
            "non-finite logit at row {} (activations overflowed)", i / c.n_vocab));
        break;
      }
    }
    k += m;
  }
}

}  // namespace kvc
