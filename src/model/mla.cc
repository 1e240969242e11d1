#include "model/mla.h"

#include <cblas.h>
#include <fmt/format.h>
#include <fmt/ranges.h>

#include <algorithm>
#include <cmath>
#include <limits>

#include "kv/rope.h"

namespace kvc {

float MlaConfig::Scale() const { return 1.0f / std::sqrt(float(qk_nope + qk_rope)); }

size_t MlaLayer::bytes() const {
  size_t s = wkv_b.size() * sizeof(float) + (wkv_a ? wkv_a->bytes() : 0) + (wo ? wo->bytes() : 0);
  for (const auto* w : {&wq, &wq_a, &wq_b}) s += *w ? (*w)->bytes() : 0;
  return s;
}

size_t MlaWeights::bytes() const {
  size_t s = 0;
  for (const auto& L : layers) s += L.bytes();
  return s;
}

namespace {

// Whole tensor dequantized to f32, row by row; ne must equal `ne` (innermost first).
StatusOr<std::vector<float>> LoadDense(const gguf::GgufFile& f, const std::string& name,
                                       const std::vector<int64_t>& ne) {
  const gguf::TensorInfo* t = f.FindTensor(name);
  if (!t) return NotFound(fmt::format("missing tensor '{}'", name));
  std::vector<int64_t> got(t->ne.begin(), t->ne.end());
  while (got.size() > 1 && got.back() == 1) got.pop_back();
  if (got != ne) {
    return InvalidArgument(fmt::format("tensor '{}' has dims [{}], expected [{}]", name,
                                       fmt::join(got, "x"), fmt::join(ne, "x")));
  }
  const auto* tr = gguf::GetTypeTraits(t->type_id);
  if (!tr || !tr->supported) {
    return Unimplemented(fmt::format("tensor '{}' has unsupported type {}", name,
                                     gguf::TypeName(t->type_id)));
  }
  const int64_t n_in = ne[0], rows = t->NumElements() / n_in;
  std::vector<float> out(size_t(n_in * rows));
  const size_t row_bytes = t->n_bytes / size_t(rows);
  for (int64_t r = 0; r < rows; ++r) {
    gguf::DequantizeRow(t->type(), t->data + r * row_bytes, out.data() + r * n_in, n_in);
  }
  return out;
}

StatusOr<std::unique_ptr<cpu::Weight>> LoadMat(const gguf::GgufFile& f, const std::string& name,
                                               int64_t n_in, int64_t n_out) {
  const gguf::TensorInfo* t = f.FindTensor(name);
  if (!t) return NotFound(fmt::format("missing tensor '{}'", name));
  if (t->ne.size() != 2 || t->ne[0] != n_in || t->ne[1] != n_out) {
    return InvalidArgument(fmt::format("tensor '{}' has the wrong shape (expected [{}x{}])", name,
                                       n_in, n_out));
  }
  return cpu::PrepareWeight(*t);
}

}  // namespace

StatusOr<MlaConfig> LoadMlaConfig(const gguf::GgufFile& f, int n_layer, int n_embd, int n_head,
                                  float rms_eps) {
  const std::string p = "deepseek2.";
  MlaConfig c;
  c.n_head = n_head;
  c.n_embd = n_embd;
  c.rms_eps = rms_eps;
  int64_t v;
  KVC_ASSIGN_OR_RETURN(v, f.GetInt(p + "attention.kv_lora_rank"));
  c.kv_lora_rank = int(v);
  KVC_ASSIGN_OR_RETURN(v, f.GetIntOr(p + "attention.q_lora_rank", 0));
  c.q_lora_rank = int(v);
  KVC_ASSIGN_OR_RETURN(v, f.GetInt(p + "rope.dimension_count"));
  c.qk_rope = int(v);
  KVC_ASSIGN_OR_RETURN(v, f.GetInt(p + "attention.key_length"));
  c.qk_nope = int(v) - c.qk_rope;
  KVC_ASSIGN_OR_RETURN(v, f.GetInt(p + "attention.value_length"));
  c.v_head_dim = int(v);
  if (auto klm = f.GetInt(p + "attention.key_length_mla"); klm.ok()) {
    // Newer llama.cpp conversions (split attn_k_b / attn_v_b): key_length / value_length describe
    // the MQA view over the latent (kv_lora_rank + rope, kv_lora_rank); the per-head sizes move to
    // the *_mla keys.
    if (c.qk_nope + c.qk_rope != c.kv_lora_rank + c.qk_rope || c.v_head_dim != c.kv_lora_rank) {
      return InvalidArgument(fmt::format(
          "deepseek2: with attention.key_length_mla, key_length ({}) / value_length ({}) must be "
          "kv_lora_rank + rope ({}) / kv_lora_rank ({})", c.qk_nope + c.qk_rope, c.v_head_dim,
          c.kv_lora_rank + c.qk_rope, c.kv_lora_rank));
    }
    c.split_kv_b = true;
    c.qk_nope = int(*klm) - c.qk_rope;
    KVC_ASSIGN_OR_RETURN(v, f.GetInt(p + "attention.value_length_mla"));
    c.v_head_dim = int(v);
  }
  auto scaling = f.GetString(p + "rope.scaling.type");
  if (scaling.ok() && *scaling != "none") {
    return Unimplemented(fmt::format("deepseek2: rope scaling '{}' is not supported (YaRN "
                                     "attention-factor/mscale not implemented); only none",
                                     *scaling));
  }
  KVC_ASSIGN_OR_RETURN(v, f.GetIntOr(p + "expert_count", 0));
  int64_t lead;
  KVC_ASSIGN_OR_RETURN(lead, f.GetIntOr(p + "leading_dense_block_count", n_layer));
  if (v > 0 && lead < n_layer) {
    return Unimplemented(fmt::format(
        "deepseek2: mixture-of-experts layers are not supported ({} experts, only the first {} of "
        "{} layers are dense)", v, lead, n_layer));
  }
  if (c.kv_lora_rank <= 0 || c.qk_rope <= 0 || c.qk_rope % 2 || c.qk_nope <= 0 ||
      c.v_head_dim <= 0 || c.q_lora_rank < 0) {
    return InvalidArgument(fmt::format(
        "deepseek2: inconsistent MLA sizes: kv_lora_rank {} q_lora_rank {} key_length {} "
        "rope.dimension_count {} value_length {}", c.kv_lora_rank, c.q_lora_rank,
        c.qk_nope + c.qk_rope, c.qk_rope, c.v_head_dim));
  }
  return c;
}

StatusOr<MlaLayer> LoadMlaLayer(const gguf::GgufFile& f, const MlaConfig& c, int layer) {
  const std::string b = fmt::format("blk.{}.", layer);
  for (const char* moe : {"ffn_gate_inp.weight", "ffn_gate_exps.weight", "ffn_up_exps.weight",
                          "ffn_down_exps.weight", "ffn_gate_shexp.weight", "exp_probs_b.bias"}) {
    if (f.FindTensor(b + moe)) {
      return Unimplemented(fmt::format("deepseek2: layer {} is a mixture-of-experts layer ('{}'); "
                                       "only dense FFN layers are supported", layer, b + moe));
    }
  }
  MlaLayer L;
  const int nq = c.n_head * c.KeyLength();
  if (c.q_lora_rank > 0) {
    KVC_ASSIGN_OR_RETURN(L.wq_a, LoadMat(f, b + "attn_q_a.weight", c.n_embd, c.q_lora_rank));
    KVC_ASSIGN_OR_RETURN(L.q_a_norm, LoadDense(f, b + "attn_q_a_norm.weight", {c.q_lora_rank}));
    KVC_ASSIGN_OR_RETURN(L.wq_b, LoadMat(f, b + "attn_q_b.weight", c.q_lora_rank, nq));
  } else {
    KVC_ASSIGN_OR_RETURN(L.wq, LoadMat(f, b + "attn_q.weight", c.n_embd, nq));
  }
  KVC_ASSIGN_OR_RETURN(L.wkv_a, LoadMat(f, b + "attn_kv_a_mqa.weight", c.n_embd, c.LatentDim()));
  KVC_ASSIGN_OR_RETURN(L.kv_a_norm, LoadDense(f, b + "attn_kv_a_norm.weight", {c.kv_lora_rank}));
  const int R = c.kv_lora_rank, H = c.n_head, Wrow = c.qk_nope + c.v_head_dim;
  if (!c.split_kv_b) {
    KVC_ASSIGN_OR_RETURN(L.wkv_b, LoadDense(f, b + "attn_kv_b.weight", {R, int64_t(H) * Wrow}));
  } else {
    // Split layout: attn_k_b [qk_nope, R, H] (W_UK,hᵀ per head), attn_v_b [R, v_head_dim, H].
    std::vector<float> kb, vb;
    KVC_ASSIGN_OR_RETURN(kb, LoadDense(f, b + "attn_k_b.weight", {c.qk_nope, R, H}));
    KVC_ASSIGN_OR_RETURN(vb, LoadDense(f, b + "attn_v_b.weight", {R, c.v_head_dim, H}));
    L.wkv_b.resize(size_t(H) * Wrow * R);
    for (int h = 0; h < H; ++h) {
      for (int d = 0; d < c.qk_nope; ++d) {
        for (int e = 0; e < R; ++e) {
          L.wkv_b[(size_t(h) * Wrow + d) * R + e] = kb[(size_t(h) * R + e) * c.qk_nope + d];
        }
      }
      for (int d = 0; d < c.v_head_dim; ++d) {
        std::copy_n(&vb[(size_t(h) * c.v_head_dim + d) * R], R,
                    &L.wkv_b[(size_t(h) * Wrow + c.qk_nope + d) * R]);
      }
    }
  }
  KVC_ASSIGN_OR_RETURN(L.wo, LoadMat(f, b + "attn_output.weight", c.n_head * c.v_head_dim,
                                     c.n_embd));
  return L;
}

std::string DescribeMlaKv(const MlaConfig& c, int n_layer, double bytes) {
  const double lat = double(c.LatentDim()) * bytes * n_layer;
  const double vcopy = double(c.kv_lora_rank) * bytes * n_layer;
  const double mha = double(c.n_head) * (c.KeyLength() + c.v_head_dim) * bytes * n_layer;
  return fmt::format(
      "MLA latent KV bytes per token = (kv_lora_rank + rope dims) · bytes · n_layer = "
      "({} + {})·{}·{} = {:.0f} B\n"
      "  + V copy of the latent (the seam stores V separately) = {}·{}·{} = {:.0f} B -> stored "
      "{:.0f} B/token\n"
      "equivalent multi-head attention = n_head · (key_length + value_length) · bytes · n_layer = "
      "{}·({} + {})·{}·{} = {:.0f} B/token; latent saves {:.1f}x ({:.1f}x as stored)\n",
      c.kv_lora_rank, c.qk_rope, bytes, n_layer, lat, c.kv_lora_rank, bytes, n_layer, vcopy,
      lat + vcopy, c.n_head, c.KeyLength(), c.v_head_dim, bytes, n_layer, mha, mha / lat,
      mha / (lat + vcopy));
}

kv::KvShape MlaKvShape(const MlaConfig& c, int n_layer, double rope_theta) {
  kv::KvShape s;
  s.n_layer = n_layer;
  s.n_head = c.n_head;
  s.n_head_kv = 1;
  s.head_dim = c.LatentDim();
  s.head_dim_v = c.kv_lora_rank;
  s.attn_scale = c.Scale();
  s.rope.theta = rope_theta;
  s.rope.n_rot = c.qk_rope;
  s.rope.rot_offset = c.kv_lora_rank;
  s.rope.neox = false;  // llama.cpp: LLM_ARCH_DEEPSEEK2 -> LLAMA_ROPE_TYPE_NORM
  return s;
}

void MlaProject(const MlaConfig& c, const MlaLayer& L, const float* h, int n, float* q, float* lat) {
  if (L.wq) {
    cpu::MatMul(*L.wq, h, n, q);
  } else {
    std::vector<float> qa(size_t(n) * c.q_lora_rank), qn(qa.size());  // [n, q_lora_rank]
    cpu::MatMul(*L.wq_a, h, n, qa.data());
    cpu::RmsNorm(qa.data(), L.q_a_norm.data(), n, c.q_lora_rank, c.rms_eps, qn.data());
    cpu::MatMul(*L.wq_b, qn.data(), n, q);
  }
  const int D = c.LatentDim(), R = c.kv_lora_rank;
  cpu::MatMul(*L.wkv_a, h, n, lat);
  std::vector<float> cn(R);  // [kv_lora_rank] (RmsNorm must not run in place: restrict args)
  for (int i = 0; i < n; ++i) {
    float* row = lat + size_t(i) * D;
    cpu::RmsNorm(row, L.kv_a_norm.data(), 1, R, c.rms_eps, cn.data());
    std::copy(cn.begin(), cn.end(), row);
  }
}

Status MlaAttention(const MlaWeights& w, int layer, kv::KvCache& cache, const float* h,
                    const int64_t* seq, int n, float* out) {
  const MlaConfig& c = w.cfg;
  const MlaLayer& L = w.layers[layer];
  const int H = c.n_head, kl = c.KeyLength(), D = c.LatentDim(), R = c.kv_lora_rank;
  const int Wrow = c.qk_nope + c.v_head_dim;  // rows of W_kv_b per head
  std::vector<float> q(size_t(n) * H * kl);   // [n, H, qk_nope + qk_rope]
  std::vector<float> lat(size_t(n) * D);      // [n, R + qk_rope]
  MlaProject(c, L, h, n, q.data(), lat.data());
  std::vector<float> v(size_t(n) * R);        // [n, R] V = c_kv (copy of K's first R dims)
  for (int i = 0; i < n; ++i) std::copy_n(&lat[size_t(i) * D], R, &v[size_t(i) * R]);
  Status st = cache.Write(layer, seq, n, lat.data(), v.data());
  if (!st.ok()) return Status(st.code(), "activations: " + st.message());
  // Absorbed queries [n, H, D]: [W_UK,iᵀ q_nope,i ; q_rope,i].
  std::vector<float> qa(size_t(n) * H * D);
  for (int i = 0; i < H; ++i) {
    const float* wuk = &L.wkv_b[size_t(i) * Wrow * R];  // [qk_nope, R]
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, n, R, c.qk_nope, 1.0f,
                &q[size_t(i) * kl], H * kl, wuk, R, 0.0f, &qa[size_t(i) * D], H * D);
    for (int t = 0; t < n; ++t) {
      std::copy_n(&q[(size_t(t) * H + i) * kl + c.qk_nope], c.qk_rope,
                  &qa[(size_t(t) * H + i) * D + R]);
    }
  }
  std::vector<float> o_lat(size_t(n) * H * R);  // [n, H, R] Σ p c_kv per head
  cache.Attend(layer, qa.data(), seq, n, o_lat.data());
  std::vector<float> o(size_t(n) * H * c.v_head_dim);  // [n, H * v_head_dim]
  for (int i = 0; i < H; ++i) {
    const float* wuv = &L.wkv_b[(size_t(i) * Wrow + c.qk_nope) * R];  // [v_head_dim, R]
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, n, c.v_head_dim, R, 1.0f,
                &o_lat[size_t(i) * R], H * R, wuv, R, 0.0f, &o[size_t(i) * c.v_head_dim],
                H * c.v_head_dim);
  }
  cpu::MatMul(*L.wo, o.data(), n, out);
  return Status::Ok();
}

void MlaNaiveAttention(const MlaConfig& c, const MlaLayer& L, const kv::RopeParams& rope_in,
                       const float* lat, const int64_t* pos, int n_ctx, const float* q,
                       const int64_t* q_pos, int n_q, float* out) {
  const int H = c.n_head, kl = c.KeyLength(), D = c.LatentDim(), R = c.kv_lora_rank;
  const int Wrow = c.qk_nope + c.v_head_dim, dv = c.v_head_dim;
  kv::RopeParams rp = rope_in;
  rp.rot_offset = 0;
  rp.n_rot = c.qk_rope;
  const kv::Rope rope(rp);
  // Shared rotated key part kr [n_ctx, qk_rope].
  std::vector<double> kr(size_t(n_ctx) * c.qk_rope);
  {
    std::vector<float> tmp(c.qk_rope);
    for (int j = 0; j < n_ctx; ++j) {
      std::copy_n(lat + size_t(j) * D + R, c.qk_rope, tmp.data());
      rope.ApplySame(tmp.data(), 1, c.qk_rope, pos[j]);
      for (int d = 0; d < c.qk_rope; ++d) kr[size_t(j) * c.qk_rope + d] = tmp[d];
    }
  }
  std::vector<double> k(size_t(n_ctx) * c.qk_nope), vv(size_t(n_ctx) * dv), s(n_ctx);
  std::vector<float> qr(c.qk_rope);
  for (int i = 0; i < H; ++i) {
    // Decompress this head: k_nope = W_UK,i c_kv, v = W_UV,i c_kv (double accumulation).
    for (int j = 0; j < n_ctx; ++j) {
      const float* cj = lat + size_t(j) * D;
      for (int r = 0; r < Wrow; ++r) {
        const float* wr = &L.wkv_b[(size_t(i) * Wrow + r) * R];
        double acc = 0;
        for (int e = 0; e < R; ++e) acc += double(wr[e]) * cj[e];
        if (r < c.qk_nope) k[size_t(j) * c.qk_nope + r] = acc;
        else vv[size_t(j) * dv + r - c.qk_nope] = acc;
      }
    }
    for (int t = 0; t < n_q; ++t) {
      const float* qi = q + (size_t(t) * H + i) * kl;
      std::copy_n(qi + c.qk_nope, c.qk_rope, qr.data());
      rope.ApplySame(qr.data(), 1, c.qk_rope, q_pos[t]);
      double mx = -std::numeric_limits<double>::infinity();
      for (int j = 0; j < n_ctx; ++j) {
        if (pos[j] > q_pos[t]) { s[j] = -std::numeric_limits<double>::infinity(); continue; }
        double acc = 0;
        for (int d = 0; d < c.qk_nope; ++d) acc += double(qi[d]) * k[size_t(j) * c.qk_nope + d];
        for (int d = 0; d < c.qk_rope; ++d) acc += double(qr[d]) * kr[size_t(j) * c.qk_rope + d];
        s[j] = acc * c.Scale();
        mx = std::max(mx, s[j]);
      }
      double z = 0;
      for (int j = 0; j < n_ctx; ++j) z += s[j] = std::isinf(s[j]) ? 0.0 : std::exp(s[j] - mx);
      float* o = out + (size_t(t) * H + i) * dv;
      for (int d = 0; d < dv; ++d) {
        double acc = 0;
        for (int j = 0; j < n_ctx; ++j) acc += s[j] * vv[size_t(j) * dv + d];
        o[d] = float(acc / z);
      }
    }
  }
}

}  // namespace kvc
