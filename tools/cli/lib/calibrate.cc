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

namespace kvc {

namespace {

// Accumulates second moments (pre-RoPE K, V) and post-RoPE channel energies (Q, K).
class StatsObserver final : public kv::KvObserver {
 public:
  explicit StatsObserver(const kv::KvShape& s) : s_(s), rope_(s.rope) {
    const int n = s.n_layer * s.n_head_kv;
    ck_.assign(n, Eigen::MatrixXd::Zero(s.head_dim, s.head_dim));
    cv_.assign(n, Eigen::MatrixXd::Zero(s.DimV(), s.DimV()));
    q2_.assign(n, std::vector<double>(s.head_dim, 0.0));
    k2_.assign(n, std::vector<double>(s.head_dim, 0.0));
  }
  void OnWrite(int layer, const int64_t* seq, int n, const float* k, const float* v) override {
    const int nkv = s_.n_head_kv, hd = s_.head_dim, dv = s_.DimV();
    std::vector<float> rows(size_t(n) * hd);
    for (int h = 0; h < nkv; ++h) {
      const int idx = layer * nkv + h;
      Eigen::MatrixXd xk(n, hd), xv(n, dv);
      for (int i = 0; i < n; ++i) {
        for (int c = 0; c < hd; ++c) xk(i, c) = k[(int64_t(i) * nkv + h) * hd + c];
        for (int c = 0; c < dv; ++c) xv(i, c) = v[(int64_t(i) * nkv + h) * dv + c];
        std::memcpy(&rows[size_t(i) * hd], k + (int64_t(i) * nkv + h) * hd, hd * sizeof(float));
      }
      ck_[idx].selfadjointView<Eigen::Lower>().rankUpdate(xk.transpose());
      cv_[idx].selfadjointView<Eigen::Lower>().rankUpdate(xv.transpose());
      rope_.Apply(rows.data(), n, hd, seq);
      for (size_t i = 0; i < rows.size(); ++i) k2_[idx][i % hd] += double(rows[i]) * rows[i];
    }
    if (layer == 0) n_tokens_ += n;
  }
  void OnQuery(int layer, const int64_t* q_seq, int n_q, const float* q) override {
    const int nh = s_.n_head, nkv = s_.n_head_kv, g = nh / nkv, hd = s_.head_dim;
    std::vector<float> row(hd);
    for (int i = 0; i < n_q; ++i) {
      for (int qh = 0; qh < nh; ++qh) {
        std::memcpy(row.data(), q + (int64_t(i) * nh + qh) * hd, hd * sizeof(float));
        rope_.ApplySame(row.data(), 1, hd, q_seq[i]);
        auto& acc = q2_[layer * nkv + qh / g];
        for (int c = 0; c < hd; ++c) acc[c] += double(row[c]) * row[c];
      }
    }
  }

  void Store(kv::CalibrationFile* f) const {
    const int nkv = s_.n_head_kv;
    for (int l = 0; l < s_.n_layer; ++l) {
      for (int h = 0; h < nkv; ++h) {
        const int idx = l * nkv + h;
        StoreEigen(f, ck_[idx], kv::KvKind::kKey, l, h);
        StoreEigen(f, cv_[idx], kv::KvKind::kValue, l, h);
        auto put = [&](const char* what, const std::vector<double>& x) {
          kv::CalibrationFile::Tensor t;
          t.dims = {int64_t(x.size())};
          t.data.assign(x.begin(), x.end());
          f->tensors[kv::ThinkTensorName(what, l, h)] = std::move(t);
        };
        put("q2", q2_[idx]);
        put("k2", k2_[idx]);
      }
    }
  }
  int64_t n_tokens() const { return n_tokens_; }

 private:
  void StoreEigen(kv::CalibrationFile* f, const Eigen::MatrixXd& c_lower, kv::KvKind kind, int l,
                  int h) const {
    const int d = int(c_lower.rows());
    Eigen::MatrixXd c = c_lower.selfadjointView<Eigen::Lower>();
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

  kv::KvShape s_;
  kv::Rope rope_;
  std::vector<Eigen::MatrixXd> ck_, cv_;         // [n_layer*n_head_kv] of [d, d] (lower half)
  std::vector<std::vector<double>> q2_, k2_;     // [n_layer*n_head_kv][head_dim]
  int64_t n_tokens_ = 0;
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

std::string ModelIdentity(const Model& m) {
  const ModelConfig& c = m.config();
  const kv::KvShape s = m.kv_shape();
  uint64_t w0 = 0;
  for (const char* name : {"blk.0.attn_k.weight", "blk.0.attn_kv_a_mqa.weight"}) {
    if (const gguf::TensorInfo* t = m.file().FindTensor(name)) {
      w0 = kv::Fnv1a64(t->data, t->n_bytes);
      break;
    }
  }
  return fmt::format("arch={} name={} n_layer={} n_head={} n_head_kv={} head_dim={} head_dim_v={} "
                     "n_embd={} n_vocab={} w0={:016x}", c.arch, c.name, s.n_layer, s.n_head,
                     s.n_head_kv, s.head_dim, s.DimV(), c.n_embd, c.n_vocab, w0);
}

StatusOr<kv::CalibrationFile> Calibrate(const Model& m, const std::vector<int32_t>& tokens,
                                        const CalibrateOptions& opt) {
  auto spec = kv::ParseSpec(opt.spec);
  if (!spec.ok()) return spec.status();
  if (spec->name != "palu" && spec->name != "lowrank" && spec->name != "think") {
    return InvalidArgument(fmt::format("calibrate: unknown method '{}' (palu:ratio=R[,alloc=uniform|"
                                       "var], think:ratio=R)", spec->name));
  }
  double ratio;
  std::string alloc;
  KVC_ASSIGN_OR_RETURN(ratio, spec->GetDouble("ratio", spec->name == "think" ? 0.4 : 0.5));
  KVC_ASSIGN_OR_RETURN(alloc, spec->GetString("alloc", "uniform"));
  KVC_RETURN_IF_ERROR(spec->CheckAllUsed());
  if (!(ratio > 0 && ratio <= 1)) return InvalidArgument("calibrate: ratio must be in (0, 1]");
  if (alloc != "uniform" && alloc != "var") {
    return InvalidArgument(fmt::format("calibrate: alloc '{}' unknown (uniform, var)", alloc));
  }
  if (opt.n_ctx < 2) return InvalidArgument("calibrate: -c must be >= 2");
  const int64_t n_chunks = std::min<int64_t>(int64_t(tokens.size()), opt.max_tokens) / opt.n_ctx;
  if (n_chunks < 1) {
    return InvalidArgument(fmt::format("calibration text has {} tokens, fewer than one chunk of {}",
                                       tokens.size(), opt.n_ctx));
  }
  const kv::KvShape shape = m.kv_shape();
  Session::Options so;
  so.n_ctx = opt.n_ctx;
  kv::KvCacheConfig cc;
  cc.k_codec = cc.v_codec = "f32";
  std::unique_ptr<Session> s;
  KVC_ASSIGN_OR_RETURN(s, Session::Create(m, cc, "", so));
  StatsObserver obs(shape);
  s->cache().SetObserver(&obs);
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
  kv::CalibrationFile f;
  f.meta["kind"] = "kv-stats";
  f.meta["model_id"] = ModelIdentity(m);
  f.meta["n_layer"] = std::to_string(shape.n_layer);
  f.meta["n_head_kv"] = std::to_string(shape.n_head_kv);
  f.meta["head_dim"] = std::to_string(shape.head_dim);
  f.meta["head_dim_v"] = std::to_string(shape.DimV());
  f.meta["ratio"] = fmt::format("{}", ratio);
  f.meta["alloc"] = alloc;
  f.meta["method"] = spec->name;
  f.meta["source"] = opt.source;
  f.meta["n_tokens"] = std::to_string(obs.n_tokens());
  f.meta["n_ctx"] = std::to_string(opt.n_ctx);
  f.meta["created_by"] = "kvcrunch calibrate";
  obs.Store(&f);
  StoreWoGram(m, &f);
  return f;
}

Status CheckRunConfigCalibration(const KvRunConfig& rc, const Model& m) {
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
  }
  return out;
}

}  // namespace kvc
