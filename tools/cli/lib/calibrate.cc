#include "calibrate.h"

#include <algorithm>
#include <cmath>
#include <cstring>

#include <Eigen/Dense>
#include <fmt/format.h>

#include "gguf/types.h"
#include "kv/rope.h"
#include "kv/transforms/lowrank.h"
#include "kv/transforms/think.h"
#include "kv/transforms/smooth.h"
#include "kv/predictive.h"

namespace kvc {

namespace {

// Accumulates second moments (pre-RoPE K, V) and post-RoPE channel energies (Q, K).
class StatsObserver final : public kv::KvObserver {
 public:
  explicit StatsObserver(const kv::KvShape& s) : s_(s), rope_(s.rope) {
    const int n = s.n_layer * s.n_head_kv;
    jk_.assign(s.n_layer, Eigen::MatrixXd::Zero(s.n_head_kv * s.head_dim, s.n_head_kv * s.head_dim));
    jv_.assign(s.n_layer, Eigen::MatrixXd::Zero(s.n_head_kv * s.DimV(), s.n_head_kv * s.DimV()));
    qq_.assign(n, Eigen::MatrixXd::Zero(s.head_dim, s.head_dim));
    ka_.assign(n, Eigen::MatrixXd::Zero(s.head_dim, s.head_dim));
    oc_.assign(n, Eigen::MatrixXd::Zero(s.DimV(), s.DimV()));
    bk_.resize(s.n_layer);
    bv_.resize(s.n_layer);
    bseq_.resize(s.n_layer);
    q2_.assign(n, std::vector<double>(s.head_dim, 0.0));
    k2_.assign(n, std::vector<double>(s.head_dim, 0.0));
  }
  void OnWrite(int layer, const int64_t* seq, int n, const float* k, const float* v) override {
    const int nkv = s_.n_head_kv, hd = s_.head_dim, dv = s_.DimV();
    if (n > 0 && (bseq_[layer].empty() || seq[0] <= bseq_[layer].back())) {  // a new chunk
      bk_[layer].clear();
      bv_[layer].clear();
      bseq_[layer].clear();
    }
    bk_[layer].insert(bk_[layer].end(), k, k + int64_t(n) * nkv * hd);
    bv_[layer].insert(bv_[layer].end(), v, v + int64_t(n) * nkv * dv);
    bseq_[layer].insert(bseq_[layer].end(), seq, seq + n);
    std::vector<float> rows(size_t(n) * hd);
    // Joint second moments over all KV heads of the layer (per-head moments are its diagonal
    // blocks; the off-diagonal blocks are what a group-head (G-LRD) factorization can exploit).
    Eigen::MatrixXd xk(n, nkv * hd), xv(n, nkv * dv);
    for (int i = 0; i < n; ++i) {
      for (int c = 0; c < nkv * hd; ++c) xk(i, c) = k[int64_t(i) * nkv * hd + c];
      for (int c = 0; c < nkv * dv; ++c) xv(i, c) = v[int64_t(i) * nkv * dv + c];
    }
    jk_[layer].selfadjointView<Eigen::Lower>().rankUpdate(xk.transpose());
    jv_[layer].selfadjointView<Eigen::Lower>().rankUpdate(xv.transpose());
    for (int h = 0; h < nkv; ++h) {
      const int idx = layer * nkv + h;
      for (int i = 0; i < n; ++i) {
        std::memcpy(&rows[size_t(i) * hd], k + (int64_t(i) * nkv + h) * hd, hd * sizeof(float));
      }
      rope_.Apply(rows.data(), n, hd, seq);
      for (size_t i = 0; i < rows.size(); ++i) k2_[idx][i % hd] += double(rows[i]) * rows[i];
    }
    if (layer == 0) n_tokens_ += n;
  }
  void OnQuery(int layer, const int64_t* q_seq, int n_q, const float* q) override {
    const int nh = s_.n_head, nkv = s_.n_head_kv, g = nh / nkv, hd = s_.head_dim;
    std::vector<float> row(hd);
    for (int h = 0; h < nkv; ++h) {  // pre-RoPE query second moment of the group
      Eigen::MatrixXd xq(int64_t(n_q) * g, hd);
      for (int i = 0; i < n_q; ++i)
        for (int j = 0; j < g; ++j)
          for (int c = 0; c < hd; ++c) xq(int64_t(i) * g + j, c) = q[(int64_t(i) * nh + h * g + j) * hd + c];
      qq_[layer * nkv + h].selfadjointView<Eigen::Lower>().rankUpdate(xq.transpose());
    }
    if (layer == 0) n_q_ += n_q;
    AttentionStats(layer, q_seq, n_q, q);
    for (int i = 0; i < n_q; ++i) {
      for (int qh = 0; qh < nh; ++qh) {
        std::memcpy(row.data(), q + (int64_t(i) * nh + qh) * hd, hd * sizeof(float));
        rope_.ApplySame(row.data(), 1, hd, q_seq[i]);
        auto& acc = q2_[layer * nkv + qh / g];
        for (int c = 0; c < hd; ++c) acc[c] += double(row[c]) * row[c];
      }
    }
  }

  void AttentionStats(int layer, const int64_t* q_seq, int n_q, const float* q) {
    const int nh = s_.n_head, nkv = s_.n_head_kv, g = nh / nkv, hd = s_.head_dim, dv = s_.DimV();
    const int64_t t_n = int64_t(bseq_[layer].size());
    if (t_n == 0 || n_q == 0) return;
    const float scale = s_.attn_scale > 0 ? s_.attn_scale : 1.0f / std::sqrt(float(hd));
    using MatF = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
    for (int h = 0; h < nkv; ++h) {
      MatF kp(t_n, hd), kr(t_n, hd), vv(t_n, dv);
      for (int64_t t = 0; t < t_n; ++t) {
        for (int c = 0; c < hd; ++c) kp(t, c) = bk_[layer][(t * nkv + h) * hd + c];
        for (int c = 0; c < dv; ++c) vv(t, c) = bv_[layer][(t * nkv + h) * dv + c];
      }
      kr = kp;
      rope_.Apply(kr.data(), int(t_n), hd, bseq_[layer].data());
      Eigen::VectorXf w = Eigen::VectorXf::Zero(t_n);
      for (int j = 0; j < g; ++j) {
        MatF qr(n_q, hd);
        for (int i = 0; i < n_q; ++i)
          for (int c = 0; c < hd; ++c) qr(i, c) = q[(int64_t(i) * nh + h * g + j) * hd + c];
        rope_.Apply(qr.data(), n_q, hd, q_seq);
        MatF sc = (qr * kr.transpose()) * scale;
        for (int i = 0; i < n_q; ++i) {
          float mx = -INFINITY;
          for (int64_t t = 0; t < t_n; ++t) {
            if (bseq_[layer][t] > q_seq[i]) sc(i, t) = -INFINITY;
            mx = std::max(mx, sc(i, t));
          }
          float sum = 0;
          for (int64_t t = 0; t < t_n; ++t) {
            const float e = sc(i, t) == -INFINITY ? 0.f : std::exp(sc(i, t) - mx);
            sc(i, t) = e;
            sum += e;
          }
          sc.row(i) /= sum;
        }
        const MatF o = sc * vv;
        oc_[layer * nkv + h].noalias() += (o.transpose() * o).cast<double>();
        w.noalias() += sc.colwise().sum().transpose();
      }
      ka_[layer * nkv + h].noalias() +=
          (kp.transpose() * w.asDiagonal() * kp).cast<double>();
    }
    if (layer == 0) n_qrows_ += int64_t(n_q) * g;
  }

  void Store(kv::CalibrationFile* f) const {
    const int nkv = s_.n_head_kv;
    for (int l = 0; l < s_.n_layer; ++l) {
      for (int h = 0; h < nkv; ++h) {
        const int idx = l * nkv + h;
        const int hd = s_.head_dim, dv = s_.DimV();
        const Eigen::MatrixXd jk = jk_[l].selfadjointView<Eigen::Lower>();
        const Eigen::MatrixXd jv = jv_[l].selfadjointView<Eigen::Lower>();
        StoreEigen(f, jk.block(h * hd, h * hd, hd, hd), kv::KvKind::kKey, l, h);
        StoreEigen(f, jv.block(h * dv, h * dv, dv, dv), kv::KvKind::kValue, l, h);
        StoreQueryMetric(f, qq_[idx], l, h);
        auto put_mat = [&](const char* what, kv::KvKind kind, const Eigen::MatrixXd& m) {
          const int64_t n = m.rows();
          const double inv = 1.0 / double(std::max<int64_t>(n_qrows_, 1));
          kv::CalibrationFile::Tensor t;
          t.dims = {n, n};
          t.data.resize(size_t(n) * n);
          for (int64_t a = 0; a < n; ++a)
            for (int64_t b = 0; b < n; ++b)
              t.data[size_t(a * n + b)] = float(0.5 * (m(a, b) + m(b, a)) * inv);
          f->tensors[kv::PaluTensorName(what, kind, l, h)] = std::move(t);
        };
        put_mat("attcov", kv::KvKind::kKey, ka_[idx]);
        put_mat("outcov", kv::KvKind::kValue, oc_[idx]);
        auto put = [&](const char* what, const std::vector<double>& x) {
          kv::CalibrationFile::Tensor t;
          t.dims = {int64_t(x.size())};
          t.data.assign(x.begin(), x.end());
          f->tensors[kv::ThinkTensorName(what, l, h)] = std::move(t);
        };
        put("q2", q2_[idx]);
        put("k2", k2_[idx]);
      }
      for (auto kind : {kv::KvKind::kKey, kv::KvKind::kValue}) {
        const Eigen::MatrixXd& j = kind == kv::KvKind::kKey ? jk_[l] : jv_[l];
        const int64_t n = j.rows();
        const Eigen::MatrixXd full = j.selfadjointView<Eigen::Lower>();
        kv::CalibrationFile::Tensor t;
        t.dims = {n, n};
        t.data.resize(size_t(n) * n);
        const double inv = 1.0 / double(std::max<int64_t>(n_tokens_, 1));
        for (int64_t a = 0; a < n; ++a)
          for (int64_t b = 0; b < n; ++b) t.data[size_t(a * n + b)] = float(full(a, b) * inv);
        f->tensors[kv::PaluLayerTensorName("jcov", kind, l)] = std::move(t);
      }
    }
  }
  int64_t n_tokens() const { return n_tokens_; }

 private:
  void StoreEigen(kv::CalibrationFile* f, const Eigen::MatrixXd& c_full, kv::KvKind kind, int l,
                  int h) const {
    const int d = int(c_full.rows());
    Eigen::MatrixXd c = c_full;
    c /= double(std::max<int64_t>(n_tokens_, 1));
    Eigen::SelfAdjointEigenSolver<Eigen::MatrixXd> es(c);  // ascending eigenvalues
    kv::CalibrationFile::Tensor basis, eig;
    basis.dims = {d, d};
    eig.dims = {d};
    basis.data.resize(size_t(d) * d);
    eig.data.resize(d);
    for (int j = 0; j < d; ++j) {
      const int src = d - 1 - j;  // descending
      eig.data[j] = float(std::max(0.0, es.eigenvalues()(src)));
      for (int i = 0; i < d; ++i) basis.data[size_t(j) * d + i] = float(es.eigenvectors()(i, src));
    }
    f->tensors[kv::PaluTensorName("basis", kind, l, h)] = std::move(basis);
    f->tensors[kv::PaluTensorName("eig", kind, l, h)] = std::move(eig);
  }

  // palu.k.qmetric.{l}.{h} [d, d]: the metric through which a *pre-RoPE* key error e is seen
  // by the group's queries, E_q E_Δ [(R(Δ) q)(R(Δ) q)ᵀ] with Δ = query − key position uniform
  // over [0, kRopeAvgSpan) (score error (R(p_q) q)ᵀ R(p_k) e = qᵀ R(−Δ) e = (R(Δ) q)ᵀ e). Keeps
  // the cross-channel terms of the slowly rotating pairs, which a per-channel diagonal loses.
  void StoreQueryMetric(kv::CalibrationFile* f, const Eigen::MatrixXd& qq_lower, int l, int h) const {
    const int d = int(qq_lower.rows());
    const Eigen::MatrixXd qq = Eigen::MatrixXd(qq_lower.selfadjointView<Eigen::Lower>()) /
                               double(std::max<int64_t>(n_q_, 1));
    std::vector<float> base(size_t(d) * d), y(size_t(d) * d), yt(size_t(d) * d);
    for (int a = 0; a < d; ++a)
      for (int b = 0; b < d; ++b) base[size_t(a) * d + b] = float(qq(a, b));
    Eigen::MatrixXd acc = Eigen::MatrixXd::Zero(d, d);
    int cnt = 0;
    for (int delta = 0; delta < kRopeAvgSpan; delta += kRopeAvgStride, ++cnt) {
      // rows of Q2 rotated by R(Δ): Q2 R(Δ)ᵀ; transposed and rotated again: R(Δ) Q2 R(Δ)ᵀ
      y = base;
      rope_.ApplySame(y.data(), d, d, delta);
      for (int a = 0; a < d; ++a)
        for (int b = 0; b < d; ++b) yt[size_t(b) * d + a] = y[size_t(a) * d + b];
      rope_.ApplySame(yt.data(), d, d, delta);
      for (int a = 0; a < d; ++a)
        for (int b = 0; b < d; ++b) acc(a, b) += yt[size_t(a) * d + b];
    }
    acc /= double(std::max(cnt, 1));
    kv::CalibrationFile::Tensor t;
    t.dims = {d, d};
    t.data.resize(size_t(d) * d);
    for (int a = 0; a < d; ++a)
      for (int b = 0; b < d; ++b) t.data[size_t(a) * d + b] = float(0.5 * (acc(a, b) + acc(b, a)));
    f->tensors[kv::PaluTensorName("qmetric", kv::KvKind::kKey, l, h)] = std::move(t);
  }
  static constexpr int kRopeAvgSpan = 4096, kRopeAvgStride = 4;

  kv::KvShape s_;
  kv::Rope rope_;
  std::vector<Eigen::MatrixXd> jk_, jv_;         // [n_layer] of [nkv*d, nkv*d] (lower half)
  std::vector<Eigen::MatrixXd> qq_;              // [n_layer*n_head_kv] pre-RoPE group Σ q qᵀ
  // Attention-side statistics (the calibration pass recomputes each layer's causal attention
  // from the chunk's K/V): ka_ = Σ_i Σ_t p_it k_t k_tᵀ over the group's query heads (pre-RoPE
  // keys weighted by the attention they receive), oc_ = Σ o oᵀ over the group's attention
  // outputs o = Σ_t p_t v_t (what a value projection P Pᵀ actually acts on: Σ p P Pᵀ v = P Pᵀ o).
  std::vector<Eigen::MatrixXd> ka_, oc_;
  std::vector<std::vector<float>> bk_, bv_;      // [n_layer] chunk's pre-RoPE k / v so far
  std::vector<std::vector<int64_t>> bseq_;
  int64_t n_qrows_ = 0;                          // Σ over layer-0 queries of group heads
  std::vector<std::vector<double>> q2_, k2_;     // [n_layer*n_head_kv][head_dim]
  int64_t n_tokens_ = 0;
  int64_t n_q_ = 0;  // query tokens seen (layer 0)
};

// Key-smoothing statistics (src/kv/transforms/smooth.h): per (layer, KV head) and channel, the
// max and the RMS over calibration tokens of the RoPE-pair amplitude of the keys and of the GQA
// group's queries. Pair amplitudes are rotation-invariant, so the pre-RoPE vectors the observer
// sees give the post-RoPE statistics. Token 0 of each chunk (the attention sink) is left out.
class SmoothObserver final : public kv::KvObserver {
 public:
  explicit SmoothObserver(const kv::KvShape& s)
      : s_(s), partner_(kv::RopePartners(s.rope, s.head_dim)) {
    const size_t n = size_t(s.n_layer) * s.n_head_kv;
    for (auto* v : {&kmax_, &k2_, &qmax_, &q2_}) v->assign(n, std::vector<double>(s.head_dim, 0.0));
    nk_.assign(n, 0);
    nq_.assign(n, 0);
  }
  void OnWrite(int layer, const int64_t* seq, int n, const float* k, const float*) override {
    Accumulate(layer, seq, n, k, s_.n_head_kv, 1, &kmax_, &k2_, &nk_);
  }
  void OnQuery(int layer, const int64_t* q_seq, int n_q, const float* q) override {
    Accumulate(layer, q_seq, n_q, q, s_.n_head, s_.n_head / s_.n_head_kv, &qmax_, &q2_, &nq_);
  }
  int64_t n_tokens() const { return nk_.empty() ? 0 : nk_[0]; }
  void Store(kv::CalibrationFile* f) const {
    const int hd = s_.head_dim;
    for (int l = 0; l < s_.n_layer; ++l) {
      for (int h = 0; h < s_.n_head_kv; ++h) {
        const size_t i = size_t(l) * s_.n_head_kv + h;
        auto put = [&](const char* what, const std::vector<double>& x, double div) {
          kv::CalibrationFile::Tensor t;
          t.dims = {hd};
          t.data.resize(hd);
          for (int c = 0; c < hd; ++c) t.data[c] = float(div > 0 ? std::sqrt(x[c] / div) : x[c]);
          f->tensors[kv::SmoothTensorName(what, l, h)] = std::move(t);
        };
        put("kmax", kmax_[i], 0);
        put("qmax", qmax_[i], 0);
        put("krms", k2_[i], double(std::max<int64_t>(nk_[i], 1)));
        put("qrms", q2_[i], double(std::max<int64_t>(nq_[i], 1)));
      }
    }
  }

 private:
  // rows [n, n_heads, head_dim]; heads h*g .. h*g+g-1 belong to KV head h.
  void Accumulate(int layer, const int64_t* seq, int n, const float* x, int n_heads, int g,
                  std::vector<std::vector<double>>* mx, std::vector<std::vector<double>>* sq,
                  std::vector<int64_t>* cnt) {
    const int hd = s_.head_dim;
    std::vector<float> a(hd);
    for (int i = 0; i < n; ++i) {
      if (seq[i] == 0) continue;
      for (int qh = 0; qh < n_heads; ++qh) {
        const size_t idx = size_t(layer) * s_.n_head_kv + qh / g;
        kv::PairAmplitudes(x + (int64_t(i) * n_heads + qh) * hd, partner_, a.data());
        for (int c = 0; c < hd; ++c) {
          (*mx)[idx][c] = std::max((*mx)[idx][c], double(a[c]));
          (*sq)[idx][c] += double(a[c]) * a[c];
        }
        ++(*cnt)[idx];
      }
    }
  }
  kv::KvShape s_;
  std::vector<int> partner_;
  std::vector<std::vector<double>> kmax_, k2_, qmax_, q2_;  // [n_layer*n_head_kv][head_dim]
  std::vector<int64_t> nk_, nq_;                            // rows accumulated per (layer, head)
};

// palu.v.wo_gram.{l}.{h} [dv, dv] = Σ_{query heads j of KV head h} W_o,jᵀ W_o,j, W_o,j the
// [n_embd, dv] block of attn_output that consumes head j's attention output. Skipped (with the
// aware=1 option then unavailable for V) when the tensor is missing or unreadable.
void StoreWoGram(const Model& m, kv::CalibrationFile* f) {
  const kv::KvShape s = m.kv_shape();
  const int dv = s.DimV(), nh = s.n_head, g = nh / s.n_head_kv;
  for (int l = 0; l < s.n_layer; ++l) {
    const gguf::TensorInfo* t = m.file().FindTensor(fmt::format("blk.{}.attn_output.weight", l));
    if (!t || t->ne.size() != 2 || t->ne[0] != int64_t(nh) * dv) return;
    const int64_t rows = t->ne[1], in = t->ne[0];
    const size_t row_bytes = t->n_bytes / size_t(rows);
    std::vector<Eigen::MatrixXd> gram(s.n_head_kv, Eigen::MatrixXd::Zero(dv, dv));
    std::vector<float> row(in);
    for (int64_t r = 0; r < rows; ++r) {
      gguf::DequantizeRow(t->type(), t->data + size_t(r) * row_bytes, row.data(), in);
      for (int qh = 0; qh < nh; ++qh) {
        Eigen::Map<const Eigen::VectorXf> w(row.data() + size_t(qh) * dv, dv);
        const Eigen::VectorXd wd = w.cast<double>();
        gram[qh / g].noalias() += wd * wd.transpose();
      }
    }
    for (int h = 0; h < s.n_head_kv; ++h) {
      kv::CalibrationFile::Tensor tt;
      tt.dims = {dv, dv};
      tt.data.resize(size_t(dv) * dv);
      for (int i = 0; i < dv; ++i)
        for (int j = 0; j < dv; ++j) tt.data[size_t(i) * dv + j] = float(gram[h](i, j));
      f->tensors[kv::PaluTensorName("wo_gram", kv::KvKind::kValue, l, h)] = std::move(tt);
    }
  }
}

}  // namespace

std::string ModelIdentity(const Model& m) { return m.Identity(); }

// Feeds the calibration text, in chunks of opt.n_ctx tokens (at most opt.max_tokens), through a
// session with an f32 cache and `obs` attached. Returns the number of chunks.
static StatusOr<int64_t> FeedChunks(const Model& m, const std::vector<int32_t>& tokens,
                                    const CalibrateOptions& opt, kv::KvObserver* obs) {
  if (opt.n_ctx < 2) return InvalidArgument("calibrate: -c must be >= 2");
  const int64_t n_chunks = std::min<int64_t>(int64_t(tokens.size()), opt.max_tokens) / opt.n_ctx;
  if (n_chunks < 1) {
    return InvalidArgument(fmt::format("calibration text has {} tokens, fewer than one chunk of {}",
                                       tokens.size(), opt.n_ctx));
  }
  Session::Options so;
  so.n_ctx = opt.n_ctx;
  kv::KvCacheConfig cc;
  cc.k_codec = cc.v_codec = "f32";
  std::unique_ptr<Session> s;
  KVC_ASSIGN_OR_RETURN(s, Session::Create(m, cc, "", so));
  s->cache().SetObserver(obs);
  Progress prog("calibrate", n_chunks);
  for (int64_t ch = 0; ch < n_chunks; ++ch) {
    s->Reset();
    std::vector<int32_t> chunk(tokens.begin() + ch * opt.n_ctx, tokens.begin() + (ch + 1) * opt.n_ctx);
    Status st = s->Eval(chunk, false, nullptr);
    if (!st.ok()) {
      s->cache().SetObserver(nullptr);
      return st;
    }
    prog.Step();
  }
  s->cache().SetObserver(nullptr);
  return n_chunks;
}

// `calibrate --method predict` (kv/predictive.h, AQUA-KV §3): second moments for the linear
// predictors K_l ≈ [K_{l−1}, V_{l−1}, 1]·W_k[l] and V_l ≈ [K_{l−1}, V_{l−1}, K_l, 1]·W_v[l]
// (V_0 ≈ [K_0, 1]·W_v[0]),
// all KV heads of a layer side by side, pre-RoPE keys. The forward pass writes layers 0, 1, ... for
// the same tokens, so layer l−1's rows of the current batch are kept until layer l arrives.
// Tokens with seq 0 (the attention sink, kept apart by `sinks=1`) are left out of the fit.
class PredictObserver final : public kv::KvObserver {
 public:
  explicit PredictObserver(const kv::KvShape& s)
      : s_(s), dk_(s.n_head_kv * s.head_dim), dv_(s.n_head_kv * s.DimV()) {
    for (int l = 0; l < s.n_layer; ++l) {
      const int ik = dk_ + dv_ + 1, iv = l == 0 ? dk_ + 1 : dk_ + dv_ + dk_ + 1;
      gk_.push_back(Eigen::MatrixXd::Zero(l == 0 ? 1 : ik, l == 0 ? 1 : ik));
      ck_.push_back(Eigen::MatrixXd::Zero(l == 0 ? 1 : ik, dk_));
      gv_.push_back(Eigen::MatrixXd::Zero(iv, iv));
      cv_.push_back(Eigen::MatrixXd::Zero(iv, dv_));
    }
    yk_.assign(s.n_layer, Eigen::MatrixXd::Zero(dk_, 1));
    yk2_.assign(s.n_layer, 0.0);
    yv_.assign(s.n_layer, Eigen::MatrixXd::Zero(dv_, 1));
    yv2_.assign(s.n_layer, 0.0);
    cnt_.assign(s.n_layer, 0);
  }
  void OnWrite(int layer, const int64_t* seq, int n, const float* k, const float* v) override {
    std::vector<int> rows;
    for (int i = 0; i < n; ++i) if (seq[i] != 0) rows.push_back(i);
    const bool have_prev = layer > 0 && prev_layer_ == layer - 1 && prev_seq_.size() == size_t(n) &&
                           std::equal(prev_seq_.begin(), prev_seq_.end(), seq);
    const int m = int(rows.size());
    if (m > 0 && (layer == 0 || have_prev)) {
      Eigen::MatrixXd K(m, dk_), V(m, dv_);
      for (int r = 0; r < m; ++r) {
        for (int c = 0; c < dk_; ++c) K(r, c) = k[size_t(rows[r]) * dk_ + c];
        for (int c = 0; c < dv_; ++c) V(r, c) = v[size_t(rows[r]) * dv_ + c];
      }
      // Layer l−1's K and V of these rows: the first D_k + D_v inputs of both predictors.
      const int off = layer == 0 ? 0 : dk_ + dv_;
      Eigen::MatrixXd P(m, off);
      for (int r = 0; r < m && layer > 0; ++r) {
        for (int c = 0; c < dk_; ++c) P(r, c) = prev_k_[size_t(rows[r]) * dk_ + c];
        for (int c = 0; c < dv_; ++c) P(r, dk_ + c) = prev_v_[size_t(rows[r]) * dv_ + c];
      }
      if (layer > 0) {
        Eigen::MatrixXd X(m, off + 1);
        X << P, Eigen::MatrixXd::Ones(m, 1);
        gk_[layer].selfadjointView<Eigen::Lower>().rankUpdate(X.transpose());
        ck_[layer] += X.transpose() * K;
      }
      Eigen::MatrixXd X(m, off + dk_ + 1);
      if (layer > 0) X.leftCols(off) = P;
      X.middleCols(off, dk_) = K;
      X.col(off + dk_).setOnes();
      gv_[layer].selfadjointView<Eigen::Lower>().rankUpdate(X.transpose());
      cv_[layer] += X.transpose() * V;
      yk_[layer] += K.colwise().sum().transpose();
      yk2_[layer] += K.squaredNorm();
      yv_[layer] += V.colwise().sum().transpose();
      yv2_[layer] += V.squaredNorm();
      cnt_[layer] += m;
    }
    prev_layer_ = layer;
    prev_seq_.assign(seq, seq + n);
    prev_k_.assign(k, k + size_t(n) * dk_);
    prev_v_.assign(v, v + size_t(n) * dv_);
  }
  int64_t n_tokens() const { return cnt_.empty() ? 0 : cnt_[0]; }
  // Solves every predictor into f; r2 (fraction of the centred variance explained on the
  // calibration rows) per layer for K and V, for the report.
  Status Store(kv::CalibrationFile* f, double lambda, std::string* report) const {
    std::string r2k, r2v;
    *report += "layer  K: var. explained by [K,V][l-1]   V: by [K,V][l-1], K[l]\n";
    for (int l = 0; l < s_.n_layer; ++l) {
      if (cnt_[l] < 2 * (2 * dk_ + dv_ + 1)) {
        return InvalidArgument(fmt::format("calibrate --method predict: layer {} saw {} calibration "
                                           "tokens; need at least {} (give more text or -c)", l,
                                           cnt_[l], 2 * (2 * dk_ + dv_ + 1)));
      }
      double r2[2] = {0, 0};
      for (int kv = 0; kv < 2; ++kv) {
        if (kv == 0 && l == 0) continue;
        Eigen::MatrixXd G = (kv == 0 ? gk_ : gv_)[l];
        G = G.selfadjointView<Eigen::Lower>();
        const Eigen::MatrixXd& C = (kv == 0 ? ck_ : cv_)[l];
        const int in = int(G.rows()), out = int(C.cols());
        std::vector<double> g(size_t(in) * in), c(size_t(in) * out);
        for (int i = 0; i < in; ++i) {
          for (int j = 0; j < in; ++j) g[size_t(i) * in + j] = G(i, j);
          for (int j = 0; j < out; ++j) c[size_t(i) * out + j] = C(i, j);
        }
        std::vector<float> w;
        KVC_ASSIGN_OR_RETURN(w, kv::SolveRidge(g, c, in, out, lambda));
        Eigen::MatrixXd W(in, out);
        for (int i = 0; i < in; ++i) for (int j = 0; j < out; ++j) W(i, j) = w[size_t(i) * out + j];
        // SSE = Σ‖y‖² − 2 tr(Wᵀ C) + tr(Wᵀ G W); SST = Σ‖y‖² − ‖Σ y‖² / n.
        const double yy = kv == 0 ? yk2_[l] : yv2_[l];
        const Eigen::MatrixXd& ys = kv == 0 ? yk_[l] : yv_[l];
        const double sse = yy - 2.0 * (W.transpose() * C).trace() + (W.transpose() * G * W).trace();
        const double sst = yy - ys.squaredNorm() / double(cnt_[l]);
        r2[kv] = sst > 0 ? 1.0 - sse / sst : 0.0;
        kv::CalibrationFile::Tensor t;
        t.dims = {in, out};
        t.data = std::move(w);
        f->tensors[fmt::format("predict.{}.L{}", kv == 0 ? "k" : "v", l)] = std::move(t);
      }
      r2k += fmt::format("{}{:.4f}", l ? "," : "", r2[0]);
      r2v += fmt::format("{}{:.4f}", l ? "," : "", r2[1]);
      *report += fmt::format("{:5d}  {:>27}   {:.3f}\n", l, l == 0 ? "-" : fmt::format("{:.3f}", r2[0]), r2[1]);
    }
    f->meta["r2_k"] = r2k;
    f->meta["r2_v"] = r2v;
    return Status::Ok();
  }

 private:
  kv::KvShape s_;
  int dk_, dv_;
  std::vector<Eigen::MatrixXd> gk_, ck_, gv_, cv_, yk_, yv_;
  std::vector<double> yk2_, yv2_;
  std::vector<int64_t> cnt_;
  int prev_layer_ = -1;
  std::vector<int64_t> prev_seq_;
  std::vector<float> prev_k_, prev_v_;
};

// The metadata every kv-stats calibration file carries.
static kv::CalibrationFile StatsFile(const Model& m, const CalibrateOptions& opt) {
  const kv::KvShape shape = m.kv_shape();
  kv::CalibrationFile f;
  f.meta["kind"] = "kv-stats";
  f.meta["model_id"] = ModelIdentity(m);
  f.meta["n_layer"] = std::to_string(shape.n_layer);
  f.meta["n_head_kv"] = std::to_string(shape.n_head_kv);
  f.meta["head_dim"] = std::to_string(shape.head_dim);
  f.meta["head_dim_v"] = std::to_string(shape.DimV());
  f.meta["source"] = opt.source;
  f.meta["n_ctx"] = std::to_string(opt.n_ctx);
  return f;
}

// `calibrate --method smooth`: only the key-smoothing statistics (one forward pass per chunk, no
// attention recomputation: seconds, not minutes).
static StatusOr<kv::CalibrationFile> CalibrateSmooth(const Model& m, const std::vector<int32_t>& tokens,
                                                     const CalibrateOptions& opt) {
  SmoothObserver obs(m.kv_shape());
  int64_t n_chunks;
  KVC_ASSIGN_OR_RETURN(n_chunks, FeedChunks(m, tokens, opt, &obs));
  kv::CalibrationFile f = StatsFile(m, opt);
  f.meta["method"] = "smooth";
  f.meta["n_tokens"] = std::to_string(n_chunks * opt.n_ctx);
  f.meta["created_by"] = "kvcrunch calibrate --method smooth";
  obs.Store(&f);
  return f;
}

// `calibrate --method predict[:lambda=L]`: the AQUA-KV predictors (one forward pass per chunk).
static StatusOr<kv::CalibrationFile> CalibratePredict(const Model& m, const std::vector<int32_t>& tokens,
                                                      const CalibrateOptions& opt, double lambda) {
  PredictObserver obs(m.kv_shape());
  int64_t n_chunks;
  KVC_ASSIGN_OR_RETURN(n_chunks, FeedChunks(m, tokens, opt, &obs));
  kv::CalibrationFile f = StatsFile(m, opt);
  f.meta["kind"] = "kv-predict";
  f.meta["method"] = "predict";
  f.meta["lambda"] = fmt::format("{}", lambda);
  f.meta["n_tokens"] = std::to_string(obs.n_tokens());
  f.meta["created_by"] = "kvcrunch calibrate --method predict";
  std::string report;
  KVC_RETURN_IF_ERROR(obs.Store(&f, lambda, &report));
  f.meta["report"] = report;
  return f;
}

StatusOr<kv::CalibrationFile> Calibrate(const Model& m, const std::vector<int32_t>& tokens,
                                        const CalibrateOptions& opt) {
  auto spec = kv::ParseSpec(opt.spec);
  if (!spec.ok()) return spec.status();
  if (spec->name != "palu" && spec->name != "lowrank" && spec->name != "think" &&
      spec->name != "smooth" && spec->name != "predict") {
    return InvalidArgument(fmt::format("calibrate: unknown method '{}' (palu:ratio=R[,alloc=uniform|"
                                       "var], think:ratio=R, smooth, predict[:lambda=L])", spec->name));
  }
  if (spec->name == "predict") {
    double lambda;
    KVC_ASSIGN_OR_RETURN(lambda, spec->GetDouble("lambda", 1e-3));
    KVC_RETURN_IF_ERROR(spec->CheckAllUsed());
    if (!(lambda >= 0 && lambda < 1)) return InvalidArgument("calibrate: predict lambda must be in [0, 1)");
    return CalibratePredict(m, tokens, opt, lambda);
  }
  if (spec->name == "smooth") {
    if (!spec->params.empty()) {
      return InvalidArgument("calibrate --method smooth takes no parameters (alpha and stat are "
                             "chosen at use: kt=smooth:file=F,alpha=0.5,stat=max)");
    }
    return CalibrateSmooth(m, tokens, opt);
  }
  double ratio;
  std::string alloc;
  KVC_ASSIGN_OR_RETURN(ratio, spec->GetDouble("ratio", spec->name == "think" ? 0.4 : 0.5));
  KVC_ASSIGN_OR_RETURN(alloc, spec->GetString("alloc", "uniform"));
  KVC_RETURN_IF_ERROR(spec->CheckAllUsed());
  if (!(ratio > 0 && ratio <= 1)) return InvalidArgument("calibrate: ratio must be in (0, 1]");
  if (alloc != "uniform" && alloc != "var" && alloc != "global") {
    return InvalidArgument(fmt::format("calibrate: alloc '{}' unknown (uniform, var, global)", alloc));
  }
  const kv::KvShape shape = m.kv_shape();
  StatsObserver obs(shape);
  KVC_RETURN_IF_ERROR(FeedChunks(m, tokens, opt, &obs).status());
  kv::CalibrationFile f = StatsFile(m, opt);
  f.meta["ratio"] = fmt::format("{}", ratio);
  f.meta["alloc"] = alloc;
  f.meta["method"] = spec->name;
  f.meta["n_tokens"] = std::to_string(obs.n_tokens());
  f.meta["created_by"] = "kvcrunch calibrate";
  obs.Store(&f);
  StoreWoGram(m, &f);
  return f;
}

Status CheckRunConfigCalibration(const KvRunConfig& rc, const Model& m) {
  if (!rc.cache.predict.empty() && rc.cache.predict != "auto") {  // auto: EnsurePredictCalibration
    std::shared_ptr<const kv::CalibrationFile> f;
    KVC_ASSIGN_OR_RETURN(f, kv::LoadCalibrationFileShared(rc.cache.predict));
    const std::string want = ModelIdentity(m), have = f->MetaOr("model_id", "(none)");
    if (want != have) {
      return InvalidArgument(fmt::format("predict file '{}' was made for a different model:\n  file:  "
                                         "{}\n  model: {}\nmake one with: kvcrunch calibrate --method "
                                         "predict -f TEXT -o FILE", rc.cache.predict, have, want));
    }
  }
  for (const std::string* t : {&rc.cache.k_transform, &rc.cache.v_transform}) {
    if (t->empty()) continue;
    auto spec = kv::ParseSpec(*t);
    if (!spec.ok()) return spec.status();
    auto it = spec->params.find("file");
    if (it == spec->params.end()) continue;
    std::shared_ptr<const kv::CalibrationFile> f;
    KVC_ASSIGN_OR_RETURN(f, kv::LoadCalibrationFileShared(it->second));
    const std::string want = ModelIdentity(m), have = f->MetaOr("model_id", "(none)");
    if (want != have) {
      return InvalidArgument(fmt::format("calibration file '{}' was made for a different model:\n"
                                         "  file : {}\n  model: {}\nre-run `kvcrunch calibrate` "
                                         "with this model", it->second, have, want));
    }
  }
  return Status::Ok();
}

std::string DescribePaluRanks(const kv::CalibrationFile& f, double ratio, const std::string& alloc) {
  const int nl = std::atoi(f.MetaOr("n_layer", "0").c_str());
  const int nkv = std::atoi(f.MetaOr("n_head_kv", "0").c_str());
  std::string out;
  for (auto kind : {kv::KvKind::kKey, kv::KvKind::kValue}) {
    const int d = std::atoi(f.MetaOr(kind == kv::KvKind::kKey ? "head_dim" : "head_dim_v", "0").c_str());
    auto ranks = kv::PaluRanks(f, kind, nl, nkv, d, ratio, alloc, 1);
    if (!ranks.ok()) return ranks.status().message();
    double kept_all = 0, tot_all = 0;
    out += fmt::format("{} ranks (retained variance %) per layer:", kv::KvKindName(kind));
    for (int l = 0; l < nl; ++l) {
      out += fmt::format("{}", l % 6 == 0 ? "\n  " : "  ");
      for (int h = 0; h < nkv; ++h) {
        const auto* e = f.Find(kv::PaluTensorName("eig", kind, l, h));
        const int r = (*ranks)[l * nkv + h];
        double kept = 0, tot = 0;
        for (int i = 0; i < d; ++i) (i < r ? kept : tot) += e->data[i];
        tot += kept;
        kept_all += kept;
        tot_all += tot;
        out += fmt::format("{}{}({:.1f})", h ? "," : fmt::format("L{}:", l), r, 100 * kept / tot);
      }
    }
    out += fmt::format("\n  total retained variance {:.2f}%\n", 100 * kept_all / tot_all);
    // G-LRD study: one latent shared by all KV heads of a layer, same total rank (Σ_h r_h).
    double g_kept = 0, g_tot = 0;
    bool have_joint = true;
    for (int l = 0; l < nl && have_joint; ++l) {
      const auto* j = f.Find(kv::PaluLayerTensorName("jcov", kind, l));
      const int n = nkv * d;
      if (!j || int64_t(j->data.size()) != int64_t(n) * n) {
        have_joint = false;
        break;
      }
      Eigen::MatrixXd c(n, n);
      for (int a = 0; a < n; ++a)
        for (int b = 0; b < n; ++b) c(a, b) = j->data[size_t(a) * n + b];
      Eigen::SelfAdjointEigenSolver<Eigen::MatrixXd> es(c, Eigen::EigenvaluesOnly);
      int rt = 0;
      for (int h = 0; h < nkv; ++h) rt += (*ranks)[l * nkv + h];
      for (int i = 0; i < n; ++i) {
        const double e = std::max(0.0, es.eigenvalues()(n - 1 - i));
        (i < rt ? g_kept : g_tot) += e;
      }
    }
    if (have_joint && nkv > 1) {
      out += fmt::format("  group-head (G-LRD, {} heads jointly, same total rank) would retain "
                         "{:.2f}%\n", nkv, 100 * g_kept / (g_kept + g_tot));
    }
  }
  return out;
}

std::string DescribeSmooth(const kv::CalibrationFile& f) {
  const int nl = std::atoi(f.MetaOr("n_layer", "0").c_str());
  const int nkv = std::atoi(f.MetaOr("n_head_kv", "0").c_str());
  const int d = std::atoi(f.MetaOr("head_dim", "0").c_str());
  // bound = (Σ_c a_q a_k)² / (Σ a_q² · Σ a_k²) over RMS amplitudes: the smallest factor by which
  // any diagonal smoothing can lower the expected q·k error of a codec whose error is isotropic
  // with energy ∝ ‖k‖² (a rotation codec: TurboQuant, rotated q4_0); reached at alpha=0.5 with
  // stat=rms (Cauchy–Schwarz). Near 1 when the queries' large channels are the keys' large ones.
  std::string out = "key channels (RoPE pairs) with the largest max amplitude, x the head's median "
                    "(head:channel), the largest smoothing scale at alpha=0.5, and the bound on the "
                    "score-error ratio any smoothing can reach for a rotation codec (rms stats):";
  double bound_sum = 0;
  int bound_n = 0;
  for (int l = 0; l < nl; ++l) {
    out += fmt::format("\n  L{:<2}", l);
    for (int h = 0; h < nkv; ++h) {
      const auto* k = f.Find(kv::SmoothTensorName("kmax", l, h));
      const auto* q = f.Find(kv::SmoothTensorName("qmax", l, h));
      if (!k || !q || int(k->data.size()) != d || int(q->data.size()) != d || d == 0) return out + " (missing)\n";
      std::vector<float> sorted = k->data;
      std::sort(sorted.begin(), sorted.end());
      const float med = sorted[d / 2];
      const int top = int(std::max_element(k->data.begin(), k->data.end()) - k->data.begin());
      const auto s = kv::SmoothScales(k->data, q->data, 0.5);
      double qk = 0, qq = 0, kk = 0;
      const auto* kr = f.Find(kv::SmoothTensorName("krms", l, h));
      const auto* qr = f.Find(kv::SmoothTensorName("qrms", l, h));
      if (kr && qr && int(kr->data.size()) == d && int(qr->data.size()) == d) {
        for (int c = 0; c < d; ++c) {
          qk += double(qr->data[c]) * kr->data[c];
          qq += double(qr->data[c]) * qr->data[c];
          kk += double(kr->data[c]) * kr->data[c];
        }
      }
      const double bound = qq > 0 && kk > 0 ? qk * qk / (qq * kk) : 1.0;
      bound_sum += bound;
      ++bound_n;
      out += fmt::format(" {}:{} {:.1f}x s_max {:.2f} bound {:.2f}", h, top,
                         med > 0 ? k->data[top] / med : 0.0, *std::max_element(s.begin(), s.end()),
                         bound);
    }
  }
  return out + fmt::format("\n  mean bound over layers and heads: {:.3f}\n",
                            bound_n ? bound_sum / bound_n : 1.0);
}

}  // namespace kvc
