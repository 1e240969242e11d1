#include "kv/transforms/lowrank.h"

#include <cblas.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <map>
#include <mutex>
#include <numeric>

#include <Eigen/Dense>
#include <fmt/format.h>

#include "kv/transforms/think.h"

namespace kvc::kv {

namespace {

class LowRankTransform final : public Transform {
 public:
  LowRankTransform(std::vector<float> a, std::vector<float> b, int dim, int r, bool pre_rope,
                   std::string name)
      : a_(std::move(a)), b_(std::move(b)), dim_(dim), r_(r), pre_rope_(pre_rope),
        name_(std::move(name)) {}
  std::string Name() const override { return name_; }
  int in_dim() const override { return dim_; }
  int out_dim() const override { return r_; }
  bool pre_rope() const override { return pre_rope_; }
  size_t ParamBytes() const override {
    return (a_.capacity() + (b_.empty() ? 0 : b_.capacity())) * sizeof(float);
  }
  // y [n, r] = x [n, dim] · A [dim, r]
  void Forward(const float* x, int n, float* y) const override { Mul(x, n, a_, y); }
  // x [n, dim] = y [n, r] · Bᵀ
  void Reconstruct(const float* y, int n, float* x) const override {
    if (n <= 0) return;
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, n, dim_, r_, 1.0f, y, r_, B().data(), r_,
                0.0f, x, dim_);
  }
  // qf [n, r] = q [n, dim] · B  (<q, B y> = <Bᵀ q, y>)
  void FoldQuery(const float* q, int n, float* qf) const override { Mul(q, n, B(), qf); }

 private:
  const std::vector<float>& B() const { return b_.empty() ? a_ : b_; }
  void Mul(const float* x, int n, const std::vector<float>& m, float* y) const {
    if (n <= 0) return;
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, n, r_, dim_, 1.0f, x, dim_, m.data(),
                r_, 0.0f, y, r_);
  }
  std::vector<float> a_;  // [dim, r] f32 row-major: y = Aᵀ x
  std::vector<float> b_;  // [dim, r] f32: x̂ = B y; empty: B = A (orthonormal columns)
  int dim_, r_;
  bool pre_rope_;
  std::string name_;
};

int RoundUpTo(int x, int m) { return (x + m - 1) / m * m; }

// Normalised Walsh–Hadamard matrix [n, n] (n a power of two), Sylvester construction.
std::vector<float> Hadamard(int n) {
  std::vector<float> h(size_t(n) * n);
  const float s = 1.0f / std::sqrt(float(n));
  for (int i = 0; i < n; ++i) {
    for (int j = 0; j < n; ++j) h[size_t(i) * n + j] = (__builtin_popcount(i & j) & 1) ? -s : s;
  }
  return h;
}

}  // namespace

std::string PaluTensorName(const char* what, KvKind kind, int layer, int head) {
  return fmt::format("palu.{}.{}.{}.{}", kind == KvKind::kKey ? "k" : "v", what, layer, head);
}

std::string PaluLayerTensorName(const char* what, KvKind kind, int layer) {
  return fmt::format("palu.{}.{}.{}", kind == KvKind::kKey ? "k" : "v", what, layer);
}

StatusOr<Eigen::MatrixXd> PaluAwareMetric(const CalibrationFile& f, KvKind kind, int layer,
                                          int head, int d) {
  Eigen::MatrixXd g = Eigen::MatrixXd::Zero(d, d);
  if (kind == KvKind::kKey) {
    if (const CalibrationFile::Tensor* qm = f.Find(PaluTensorName("qmetric", kind, layer, head));
        qm && int64_t(qm->data.size()) == int64_t(d) * d) {
      for (int i = 0; i < d; ++i)
        for (int j = 0; j < d; ++j) g(i, j) = qm->data[size_t(i) * d + j];
      return g;
    }
    // Older files: the per-channel post-RoPE query energy (diagonal approximation).
    const CalibrationFile::Tensor* q2;
    KVC_ASSIGN_OR_RETURN(q2, f.Get(ThinkTensorName("q2", layer, head), d));
    for (int i = 0; i < d; ++i) g(i, i) = std::max(0.0f, q2->data[i]);
    return g;
  }
  const CalibrationFile::Tensor* gram;
  KVC_ASSIGN_OR_RETURN(gram, f.Get(PaluTensorName("wo_gram", kind, layer, head), int64_t(d) * d));
  for (int i = 0; i < d; ++i)
    for (int j = 0; j < d; ++j) g(i, j) = gram->data[size_t(i) * d + j];
  return g;
}

namespace {

// S = G^{1/2} and S⁻¹ with G's eigenvalues floored at 1e-6 · max.
void MetricRoots(const Eigen::MatrixXd& g, Eigen::MatrixXd* s, Eigen::MatrixXd* si) {
  Eigen::SelfAdjointEigenSolver<Eigen::MatrixXd> eg(g);
  const Eigen::VectorXd gl =
      eg.eigenvalues().cwiseMax(1e-6 * std::max(eg.eigenvalues().maxCoeff(), 1e-30));
  *s = eg.eigenvectors() * gl.cwiseSqrt().asDiagonal() * eg.eigenvectors().transpose();
  if (si) {
    *si = eg.eigenvectors() * gl.cwiseSqrt().cwiseInverse().asDiagonal() *
          eg.eigenvectors().transpose();
  }
}

Eigen::MatrixXd CovFromEig(const CalibrationFile::Tensor& basis, const CalibrationFile::Tensor& eig,
                           int d) {
  Eigen::MatrixXd bm(d, d);  // column j = eigenvector j
  for (int j = 0; j < d; ++j)
    for (int i = 0; i < d; ++i) bm(i, j) = basis.data[size_t(j) * d + i];
  Eigen::VectorXd lam(d);
  for (int j = 0; j < d; ++j) lam(j) = std::max(0.0f, eig.data[j]);
  return bm * lam.asDiagonal() * bm.transpose();
}

}  // namespace

StatusOr<Eigen::MatrixXd> PaluStreamCov(const CalibrationFile& f, KvKind kind, int layer, int head,
                                        int d, bool attn_obj) {
  if (attn_obj) {
    const char* what = kind == KvKind::kKey ? "attcov" : "outcov";
    const CalibrationFile::Tensor* t;
    KVC_ASSIGN_OR_RETURN(t, f.Get(PaluTensorName(what, kind, layer, head), int64_t(d) * d));
    Eigen::MatrixXd c(d, d);
    for (int i = 0; i < d; ++i)
      for (int j = 0; j < d; ++j) c(i, j) = t->data[size_t(i) * d + j];
    return c;
  }
  const CalibrationFile::Tensor *basis, *eig;
  KVC_ASSIGN_OR_RETURN(eig, f.Get(PaluTensorName("eig", kind, layer, head), d));
  KVC_ASSIGN_OR_RETURN(basis, f.Get(PaluTensorName("basis", kind, layer, head), int64_t(d) * d));
  return CovFromEig(*basis, *eig, d);
}

StatusOr<std::vector<double>> PaluSpectrum(const CalibrationFile& f, KvKind kind, int layer,
                                           int head, int d, bool aware, bool attn_obj) {
  std::vector<double> out(d);
  if (!aware && !attn_obj) {
    const CalibrationFile::Tensor* eig;
    KVC_ASSIGN_OR_RETURN(eig, f.Get(PaluTensorName("eig", kind, layer, head), d));
    for (int i = 0; i < d; ++i) out[i] = std::max(0.0f, eig->data[i]);
    return out;
  }
  Eigen::MatrixXd c;
  KVC_ASSIGN_OR_RETURN(c, PaluStreamCov(f, kind, layer, head, d, attn_obj));
  if (aware) {
    Eigen::MatrixXd g, s;
    KVC_ASSIGN_OR_RETURN(g, PaluAwareMetric(f, kind, layer, head, d));
    MetricRoots(g, &s, nullptr);
    c = s * c * s;
  }
  Eigen::SelfAdjointEigenSolver<Eigen::MatrixXd> es(c, Eigen::EigenvaluesOnly);
  for (int i = 0; i < d; ++i) out[i] = std::max(0.0, es.eigenvalues()(d - 1 - i));
  return out;
}

namespace {

struct Chunk {
  double gain;
  int stream;
};

// Chunks of `multiple` components of one stream (chunk 0 excluded: always kept); gain = the
// chunk's fraction of the stream's total (weighted) energy.
void AddChunks(const std::vector<double>& lam, int multiple, int stream, std::vector<Chunk>* out) {
  double tot = 0;
  for (double e : lam) tot += e;
  if (tot <= 0) tot = 1;
  const int per = int(lam.size()) / multiple;
  for (int c = 1; c < per; ++c) {
    double g = 0;
    for (int i = c * multiple; i < (c + 1) * multiple; ++i) g += lam[i];
    out->push_back({g / tot, stream});
  }
}

}  // namespace

StatusOr<std::vector<int>> PaluRanks(const CalibrationFile& f, KvKind kind, int n_layer,
                                     int n_head_kv, int dim, double ratio,
                                     const std::string& alloc, int multiple, bool aware,
                                     bool attn_obj) {
  if (!(ratio > 0 && ratio <= 1)) {
    return InvalidArgument(fmt::format("lowrank: ratio {} must be in (0, 1] (fraction of "
                                       "dimensions kept)", ratio));
  }
  if (multiple < 1 || dim % multiple != 0) {
    return InvalidArgument(fmt::format("lowrank: multiple={} must divide head_dim {}", multiple,
                                       dim));
  }
  const int n_streams = n_layer * n_head_kv;
  const int uniform = std::min(dim, RoundUpTo(std::max(1, int(std::lround(ratio * dim))), multiple));
  std::vector<int> ranks(n_streams, uniform);
  if (alloc == "uniform") return ranks;
  if (alloc != "var" && alloc != "global") {
    return InvalidArgument(fmt::format("lowrank: alloc '{}' unknown (uniform, var, global)", alloc));
  }
  // Results are cached: every (layer, head, K|V) instance asks for the same allocation.
  static std::mutex mu;
  static std::map<std::string, std::vector<int>> cache;
  const std::string key = fmt::format("{}|{}|{}|{}|{}|{}|{}|{}|{}|{}",
                                      static_cast<const void*>(&f), f.MetaOr("model_id", ""),
                                      f.tensors.size(), int(kind), ratio, alloc, multiple, aware,
                                      attn_obj, dim);
  {
    std::lock_guard<std::mutex> lock(mu);
    if (auto it = cache.find(key); it != cache.end()) return it->second;
  }
  // var: per kind, chunks ranked by their stream's explained (weighted) energy fraction.
  // global: the same greedy over K and V streams together, one budget for both, so the kind
  // whose spectrum decays faster (keys here) ends with the lower ranks. Each component costs
  // the same bytes only when K and V have the same dim and codec; the budget counts components.
  std::vector<Chunk> chunks;
  int64_t budget = 0;
  std::vector<int> all;  // [2 * n_streams] for global (K streams, then V streams)
  const std::vector<KvKind> kinds =
      alloc == "global" ? std::vector<KvKind>{KvKind::kKey, KvKind::kValue} : std::vector<KvKind>{kind};
  for (size_t ki = 0; ki < kinds.size(); ++ki) {
    const int d = kinds[ki] == kind ? dim
                  : std::atoi(f.MetaOr(kinds[ki] == KvKind::kKey ? "head_dim" : "head_dim_v",
                                       "0").c_str());
    if (d != dim) {
      return InvalidArgument(fmt::format("lowrank: alloc=global needs equal K and V head dims "
                                         "(file: {} vs {})", d, dim));
    }
    for (int l = 0; l < n_layer; ++l) {
      for (int h = 0; h < n_head_kv; ++h) {
        std::vector<double> lam;
        KVC_ASSIGN_OR_RETURN(lam, PaluSpectrum(f, kinds[ki], l, h, dim, aware, attn_obj));
        AddChunks(lam, multiple, int(ki) * n_streams + l * n_head_kv + h, &chunks);
      }
    }
    budget += std::llround(ratio * dim / multiple * n_streams) - n_streams;
  }
  // Stable order: larger gain first, then lower stream index; within a stream chunks are
  // already in descending order, so taking a prefix keeps each stream's chunks contiguous.
  std::stable_sort(chunks.begin(), chunks.end(),
                   [](const Chunk& a, const Chunk& b) { return a.gain > b.gain; });
  all.assign(kinds.size() * n_streams, multiple);
  for (int64_t i = 0; i < budget && i < int64_t(chunks.size()); ++i) {
    all[chunks[i].stream] += multiple;
  }
  const int off = (alloc == "global" && kind == KvKind::kValue) ? n_streams : 0;
  ranks.assign(all.begin() + off, all.begin() + off + n_streams);
  std::lock_guard<std::mutex> lock(mu);
  cache[key] = ranks;
  return ranks;
}

std::unique_ptr<Transform> MakeLowRankFromBasis(std::vector<float> p, int dim, int r,
                                                bool pre_rope, std::string name) {
  return std::make_unique<LowRankTransform>(std::move(p), std::vector<float>(), dim, r, pre_rope,
                                            std::move(name));
}

namespace {

// Weighted basis (see header): C = Σ_j λ_j b_j b_jᵀ, S = G^{1/2}; Q = top-r eigenvectors of
// S C S; A = S Q, B = S⁻¹ Q. Eigenvalues of G are floored at 1e-6 · max for the inverse.
void WeightedBasis(const Eigen::MatrixXd& c, const Eigen::MatrixXd& g, int d, int r,
                   std::vector<float>* a, std::vector<float>* b) {
  Eigen::MatrixXd s, si;
  MetricRoots(g, &s, &si);
  Eigen::SelfAdjointEigenSolver<Eigen::MatrixXd> es(s * c * s);
  Eigen::MatrixXd q(d, r);
  for (int j = 0; j < r; ++j) q.col(j) = es.eigenvectors().col(d - 1 - j);
  const Eigen::MatrixXd am = s * q, bmat = si * q;
  a->resize(size_t(d) * r);
  b->resize(size_t(d) * r);
  for (int i = 0; i < d; ++i) {
    for (int j = 0; j < r; ++j) {
      (*a)[size_t(i) * r + j] = float(am(i, j));
      (*b)[size_t(i) * r + j] = float(bmat(i, j));
    }
  }
}

}  // namespace

StatusOr<std::unique_ptr<Transform>> MakeLowRankTransform(const CodecSpec& spec,
                                                          const CodecContext& ctx) {
  std::string path, alloc_in;
  KVC_ASSIGN_OR_RETURN(path, spec.GetString("file", ""));
  if (path.empty()) {
    return InvalidArgument("lowrank needs a calibration file: lowrank:file=PATH[,ratio=0.5] "
                           "(create one with `kvcrunch calibrate -m MODEL -f TEXT -o PATH`)");
  }
  std::shared_ptr<const CalibrationFile> f;
  KVC_ASSIGN_OR_RETURN(f, LoadCalibrationFileShared(path));
  if (f->MetaOr("kind", "") != "kv-stats") {
    return InvalidArgument(fmt::format("'{}' is not a K/V statistics calibration file (kind '{}')",
                                       path, f->MetaOr("kind", "")));
  }
  const int f_layers = std::atoi(f->MetaOr("n_layer", "0").c_str());
  const int f_heads = std::atoi(f->MetaOr("n_head_kv", "0").c_str());
  const int f_dim = std::atoi(
      f->MetaOr(ctx.kind == KvKind::kKey ? "head_dim" : "head_dim_v", "0").c_str());
  if (f_layers != ctx.n_layer || f_heads != ctx.n_head_kv || f_dim != ctx.dim) {
    return InvalidArgument(fmt::format(
        "calibration file '{}' was made for n_layer {} n_head_kv {} dim {} (model '{}'), but "
        "this cache has n_layer {} n_head_kv {} dim {}: calibrate for this model", path, f_layers,
        f_heads, f_dim, f->MetaOr("model_id", "?"), ctx.n_layer, ctx.n_head_kv, ctx.dim));
  }
  double ratio;
  int multiple;
  bool rot;
  KVC_ASSIGN_OR_RETURN(ratio, spec.GetDouble("ratio", std::atof(f->MetaOr("ratio", "0.5").c_str())));
  KVC_ASSIGN_OR_RETURN(alloc_in, spec.GetString("alloc", f->MetaOr("alloc", "uniform")));
  KVC_ASSIGN_OR_RETURN(multiple, spec.GetInt("multiple", 1));
  KVC_ASSIGN_OR_RETURN(rot, spec.GetBool("rot", false));
  bool aware;
  KVC_ASSIGN_OR_RETURN(aware, spec.GetBool("aware", false));
  std::string obj;
  KVC_ASSIGN_OR_RETURN(obj, spec.GetString("obj", "plain"));
  if (obj != "plain" && obj != "attn") {
    return InvalidArgument(fmt::format("lowrank: obj '{}' unknown (plain: K/V second moment; "
                                       "attn: attention-weighted keys / attention outputs)", obj));
  }
  const bool attn_obj = obj == "attn";
  KVC_RETURN_IF_ERROR(spec.CheckAllUsed());
  std::vector<int> ranks;
  KVC_ASSIGN_OR_RETURN(ranks, PaluRanks(*f, ctx.kind, ctx.n_layer, ctx.n_head_kv, ctx.dim, ratio,
                                        alloc_in, multiple, aware, attn_obj));
  const int d = ctx.dim, r = ranks[ctx.layer * ctx.n_head_kv + ctx.head];
  const CalibrationFile::Tensor* basis;
  KVC_ASSIGN_OR_RETURN(basis, f->Get(PaluTensorName("basis", ctx.kind, ctx.layer, ctx.head),
                                     int64_t(d) * d));
  std::vector<float> p(size_t(d) * r);  // [d, r]: column j = eigenvector j
  for (int j = 0; j < r; ++j) {
    for (int i = 0; i < d; ++i) p[size_t(i) * r + j] = basis->data[size_t(j) * d + i];
  }
  std::vector<float> b;  // empty: reconstruct with P
  if (aware || attn_obj) {
    // C: the stream's second moment (obj=plain) or its attention-side counterpart (obj=attn).
    // G (aware=1): keys: the rotation-averaged pre-RoPE query metric of the group
    // (palu.k.qmetric; older files: diag of post-RoPE query energy); values: Σ_j W_o,jᵀ W_o,j.
    Eigen::MatrixXd c, g = Eigen::MatrixXd::Identity(d, d);
    KVC_ASSIGN_OR_RETURN(c, PaluStreamCov(*f, ctx.kind, ctx.layer, ctx.head, d, attn_obj));
    if (aware) {
      KVC_ASSIGN_OR_RETURN(g, PaluAwareMetric(*f, ctx.kind, ctx.layer, ctx.head, d));
    }
    WeightedBasis(c, g, d, r, &p, &b);
    if (!aware) b.clear();  // orthonormal: B = A
  }
  if (rot) {
    if (r & (r - 1)) {
      return InvalidArgument(fmt::format("lowrank: rot=1 needs a power-of-two rank, layer {} head "
                                         "{} has rank {} (use multiple=16/32 or uniform ranks)",
                                         ctx.layer, ctx.head, r));
    }
    const std::vector<float> h = Hadamard(r);
    std::vector<float> ph(p.size());
    // P' [d, r] = P [d, r] · Hᵀ [r, r]
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, d, r, r, 1.0f, p.data(), r, h.data(), r,
                0.0f, ph.data(), r);
    p.swap(ph);
    if (!b.empty()) {
      cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, d, r, r, 1.0f, b.data(), r, h.data(), r,
                  0.0f, ph.data(), r);
      b.swap(ph);
    }
  }
  const std::string name = fmt::format("lowrank:ratio={},alloc={},r={}{}{}{}", ratio, alloc_in, r,
                                       rot ? ",rot=1" : "", aware ? ",aware=1" : "",
                                       attn_obj ? ",obj=attn" : "");
  std::unique_ptr<Transform> t = std::make_unique<LowRankTransform>(
      std::move(p), std::move(b), d, r, ctx.kind == KvKind::kKey, name);
  return t;
}

}  // namespace kvc::kv
