#include "model/model.h"

#include <xxhash.h>

#include <spdlog/spdlog.h>
#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <fstream>
#include <iterator>

#include "cpu/targets.h"
#include "kv/calibration_file.h"
#include "kv/transforms/smooth.h"
#include "model/forward.h"
#include "util/check.h"

namespace kvc {

double ModelConfig::KvBytesPerToken(double k_bits, double v_bits) const {
  const int dv = head_dim_v > 0 ? head_dim_v : head_dim;
  return double(n_layer) * n_head_kv * (head_dim * k_bits + dv * v_bits) / 8.0;
}

namespace {

// Architectures sharing the Llama block structure. rope_neox: qwen2 uses NeoX pairing; GGUF llama
// files were permuted at conversion for adjacent pairs.
struct ArchInfo {
  const char* name;
  bool rope_neox;
  bool qkv_bias;
};
constexpr ArchInfo kArchs[] = {
    {"llama", false, false},
    {"mistral", false, false},
    {"smollm", false, false},
    {"qwen2", true, true},
    {"deepseek2", false, false},  // multi-head latent attention (model/mla.h), dense FFN only
};

StatusOr<std::vector<float>> LoadF32(const gguf::GgufFile& f, const std::string& name, int64_t n) {
  const gguf::TensorInfo* t = f.FindTensor(name);
  if (!t) return NotFound(fmt::format("missing tensor '{}'", name));
  if (t->NumElements() != n) {
    return InvalidArgument(fmt::format("tensor '{}' has {} elements, expected {}", name,
                                       t->NumElements(), n));
  }
  const auto* tr = gguf::GetTypeTraits(t->type_id);
  if (!tr || !tr->supported) {
    return Unimplemented(fmt::format("tensor '{}' has unsupported type {}", name,
                                     gguf::TypeName(t->type_id)));
  }
  std::vector<float> out(n);
  gguf::DequantizeRow(t->type(), t->data, out.data(), n);
  return out;
}

// row_scale: empty, or [n_out] per-row factors folded into a private copy (PrepareWeightScaledRows).
StatusOr<std::unique_ptr<cpu::Weight>> LoadW(const gguf::GgufFile& f, const std::string& name,
                                             int64_t n_in, int64_t n_out,
                                             const std::vector<float>& row_scale = {}) {
  const gguf::TensorInfo* t = f.FindTensor(name);
  if (!t) return NotFound(fmt::format("missing tensor '{}'", name));
  if (t->ne.size() != 2 || t->ne[0] != n_in || t->ne[1] != n_out) {
    std::string dims;
    for (auto d : t->ne) dims += (dims.empty() ? "" : "x") + std::to_string(d);
    return InvalidArgument(fmt::format("tensor '{}' has dims [{}], expected [{}x{}]", name, dims,
                                       n_in, n_out));
  }
  auto w = row_scale.empty() ? cpu::PrepareWeight(*t) : cpu::PrepareWeightScaledRows(*t, row_scale);
  // A repacked weight owns its bytes: drop the mapped copy from RSS as we go, so the peak never
  // holds both (pages fault back in if the mapping is read again).
  if (w.ok() && (*w)->bytes() > 0) f.ReleasePages(*t);
  return w;
}

}  // namespace

StatusOr<std::unique_ptr<Model>> Model::Load(const std::string& path) {
  return Load(path, ModelLoadOptions());
}

StatusOr<std::unique_ptr<Model>> Model::Load(const std::string& path, const ModelLoadOptions& opt) {
  if (const std::string w = cpu::ApplySimdLimitFromEnv(); !w.empty()) spdlog::warn("{}", w);
  std::unique_ptr<Model> m(new Model());
  KVC_ASSIGN_OR_RETURN(m->file_, gguf::GgufFile::Open(path));
  const gguf::GgufFile& f = *m->file_;
  ModelConfig& c = m->cfg_;
  KVC_ASSIGN_OR_RETURN(c.arch, f.GetString("general.architecture"));
  const ArchInfo* arch = nullptr;
  for (const auto& a : kArchs) {
    if (c.arch == a.name) arch = &a;
  }
  if (!arch) {
    return Unimplemented(fmt::format(
        "architecture '{}' is not supported (supported: llama, mistral, smollm, qwen2, deepseek2)", c.arch));
  }
  auto name = f.GetString("general.name");
  c.name = name.ok() ? *name : "";
  const std::string p = c.arch + ".";
  int64_t v;
  KVC_ASSIGN_OR_RETURN(v, f.GetInt(p + "block_count"));
  c.n_layer = int(v);
  KVC_ASSIGN_OR_RETURN(v, f.GetInt(p + "embedding_length"));
  c.n_embd = int(v);
  KVC_ASSIGN_OR_RETURN(v, f.GetInt(p + "attention.head_count"));
  c.n_head = int(v);
  KVC_ASSIGN_OR_RETURN(v, f.GetIntOr(p + "attention.head_count_kv", c.n_head));
  c.n_head_kv = int(v);
  KVC_ASSIGN_OR_RETURN(v, f.GetInt(p + "feed_forward_length"));
  c.n_ff = int(v);
  KVC_ASSIGN_OR_RETURN(c.n_ctx_train, f.GetIntOr(p + "context_length", 2048));
  double d;
  KVC_ASSIGN_OR_RETURN(d, f.GetFloatOr(p + "attention.layer_norm_rms_epsilon", 1e-5));
  c.rms_eps = float(d);
  if (c.n_layer <= 0 || c.n_layer > 1024 || c.n_embd <= 0 || c.n_head <= 0 || c.n_head_kv <= 0 ||
      c.n_head % c.n_head_kv != 0 || c.n_embd % c.n_head != 0 || c.n_ff <= 0) {
    return InvalidArgument(fmt::format("inconsistent hyper-parameters: n_layer {} n_embd {} n_head {} "
                                       "n_head_kv {} n_ff {}", c.n_layer, c.n_embd, c.n_head,
                                       c.n_head_kv, c.n_ff));
  }
  c.head_dim = c.n_embd / c.n_head;
  KVC_ASSIGN_OR_RETURN(c.rope.theta, f.GetFloatOr(p + "rope.freq_base", 10000.0));
  if (c.arch == "deepseek2") {
    m->mla_ = std::make_unique<MlaWeights>();
    KVC_ASSIGN_OR_RETURN(m->mla_->cfg, LoadMlaConfig(f, c.n_layer, c.n_embd, c.n_head, c.rms_eps));
    const kv::KvShape s = MlaKvShape(m->mla_->cfg, c.n_layer, c.rope.theta);
    c.n_head_kv = s.n_head_kv;
    c.head_dim = s.head_dim;
    c.head_dim_v = s.head_dim_v;
    c.attn_scale = s.attn_scale;
    c.rope = s.rope;
  }
  KVC_ASSIGN_OR_RETURN(v, f.GetIntOr(p + "attention.key_length", c.head_dim));
  if (!m->mla_ && v != c.head_dim) return Unimplemented("attention.key_length != n_embd / n_head");
  KVC_ASSIGN_OR_RETURN(v, f.GetIntOr(p + "rope.dimension_count", c.head_dim));
  if (!m->mla_) c.rope.n_rot = int(v);
  if (c.rope.n_rot <= 0 || c.rope.rot_offset + c.rope.n_rot > c.head_dim || c.rope.n_rot % 2) {
    return InvalidArgument(fmt::format("rope.dimension_count {} invalid for head_dim {}",
                                       c.rope.n_rot, c.head_dim));
  }
  c.rope.neox = arch->rope_neox;
  auto scaling = f.GetString(p + "rope.scaling.type");
  if (scaling.ok() && *scaling == "linear" && !m->mla_) {
    KVC_ASSIGN_OR_RETURN(d, f.GetFloatOr(p + "rope.scaling.factor", 1.0));
    if (d <= 0) return InvalidArgument("rope.scaling.factor must be > 0");
    c.rope.freq_scale = 1.0 / d;
  } else if (scaling.ok() && *scaling != "none") {
    return Unimplemented(fmt::format("rope scaling '{}' is not supported (none, linear)", *scaling));
  }
  c.qkv_bias = arch->qkv_bias;

  KVC_ASSIGN_OR_RETURN(m->tokenizer_, Tokenizer::FromGguf(f));
  c.n_vocab = m->tokenizer_->n_vocab();

  m->token_embd_ = f.FindTensor("token_embd.weight");
  if (!m->token_embd_) return NotFound("missing tensor 'token_embd.weight'");
  if (m->token_embd_->ne.size() != 2 || m->token_embd_->ne[0] != c.n_embd ||
      m->token_embd_->ne[1] != c.n_vocab) {
    return InvalidArgument("tensor 'token_embd.weight' shape does not match n_embd x n_vocab");
  }
  const auto* tr = gguf::GetTypeTraits(m->token_embd_->type_id);
  if (!tr || !tr->supported) return Unimplemented("token_embd.weight has an unsupported type");

  const int hd = c.head_dim;
  // Load-time key smoothing: per layer, W_k row h·hd + c scaled by 1/s_h,c, W_q row j·hd + c by
  // s_h(j),c with h(j) = j / (n_head / n_head_kv) (GQA group).
  const bool smooth = !opt.kv_smooth.empty();
  if (smooth && m->mla_) {
    return Unimplemented("--kv-smooth: multi-head latent attention (deepseek2) has no per-head W_k "
                         "to fold the scales into");
  }
  if (smooth && (c.n_head_kv <= 0 || c.n_head % c.n_head_kv != 0)) {
    return InvalidArgument("--kv-smooth: n_head must be a multiple of n_head_kv");
  }
  if (smooth) {
    std::ifstream in(opt.kv_smooth, std::ios::binary);
    if (!in) return NotFound(fmt::format("--kv-smooth: cannot open '{}'", opt.kv_smooth));
    const std::string bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    const XXH128_hash_t h = XXH3_128bits(bytes.data(), bytes.size());
    std::shared_ptr<const kv::CalibrationFile> cf;
    KVC_ASSIGN_OR_RETURN(cf, kv::LoadCalibrationFileShared(opt.kv_smooth));
    const std::string want = m->Identity(), have = cf->MetaOr("model_id", "(none)");
    if (want != have) {
      return InvalidArgument(fmt::format("--kv-smooth: calibration file '{}' was made for a different "
                                         "model:\n  file : {}\n  model: {}\nre-run `kvcrunch calibrate "
                                         "--method smooth` with this model", opt.kv_smooth, have, want));
    }
    m->kv_smooth_desc_ = fmt::format("smooth:file={},alpha={},stat={},xxh={:016x}{:016x}", opt.kv_smooth,
                                     opt.kv_smooth_alpha, opt.kv_smooth_stat, h.high64, h.low64);
  }
  m->layers_.resize(c.n_layer);
  for (int l = 0; l < c.n_layer; ++l) {
    auto& L = m->layers_[l];
    const std::string b = fmt::format("blk.{}.", l);
    KVC_ASSIGN_OR_RETURN(L.attn_norm, LoadF32(f, b + "attn_norm.weight", c.n_embd));
    KVC_ASSIGN_OR_RETURN(L.ffn_norm, LoadF32(f, b + "ffn_norm.weight", c.n_embd));
    if (m->mla_) {
      KVC_ASSIGN_OR_RETURN(MlaLayer ml, LoadMlaLayer(f, m->mla_->cfg, l));
      m->mla_->layers.push_back(std::move(ml));
    } else {
      std::vector<float> sq, sk;  // row scales [n_head·hd], [n_head_kv·hd] (empty: no smoothing)
      if (smooth) {
        const int group = c.n_head / c.n_head_kv;
        sq.resize(size_t(c.n_head) * hd);
        sk.resize(size_t(c.n_head_kv) * hd);
        for (int h = 0; h < c.n_head_kv; ++h) {
          KVC_ASSIGN_OR_RETURN(auto sc, kv::LoadSmoothScales(opt.kv_smooth, opt.kv_smooth_alpha,
                                                             opt.kv_smooth_stat, c.n_layer, c.n_head_kv,
                                                             hd, l, h));
          for (int ch = 0; ch < hd; ++ch) {
            sk[size_t(h) * hd + ch] = 1.0f / sc[ch];
            for (int j = h * group; j < (h + 1) * group; ++j) sq[size_t(j) * hd + ch] = sc[ch];
          }
        }
      }
      KVC_ASSIGN_OR_RETURN(L.wq, LoadW(f, b + "attn_q.weight", c.n_embd, c.n_head * hd, sq));
      KVC_ASSIGN_OR_RETURN(L.wk, LoadW(f, b + "attn_k.weight", c.n_embd, c.n_head_kv * hd, sk));
      if (smooth && c.qkv_bias) {
        KVC_ASSIGN_OR_RETURN(L.bq, LoadF32(f, b + "attn_q.bias", c.n_head * hd));
        KVC_ASSIGN_OR_RETURN(L.bk, LoadF32(f, b + "attn_k.bias", c.n_head_kv * hd));
        for (size_t i = 0; i < sq.size(); ++i) L.bq[i] *= sq[i];
        for (size_t i = 0; i < sk.size(); ++i) L.bk[i] *= sk[i];
      }
      KVC_ASSIGN_OR_RETURN(L.wv, LoadW(f, b + "attn_v.weight", c.n_embd, c.n_head_kv * hd));
      KVC_ASSIGN_OR_RETURN(L.wo, LoadW(f, b + "attn_output.weight", c.n_head * hd, c.n_embd));
    }
    KVC_ASSIGN_OR_RETURN(L.w_gate, LoadW(f, b + "ffn_gate.weight", c.n_embd, c.n_ff));
    KVC_ASSIGN_OR_RETURN(L.w_up, LoadW(f, b + "ffn_up.weight", c.n_embd, c.n_ff));
    KVC_ASSIGN_OR_RETURN(L.w_down, LoadW(f, b + "ffn_down.weight", c.n_ff, c.n_embd));
    if (c.qkv_bias) {
      if (!smooth) {
        KVC_ASSIGN_OR_RETURN(L.bq, LoadF32(f, b + "attn_q.bias", c.n_head * hd));
        KVC_ASSIGN_OR_RETURN(L.bk, LoadF32(f, b + "attn_k.bias", c.n_head_kv * hd));
      }
      KVC_ASSIGN_OR_RETURN(L.bv, LoadF32(f, b + "attn_v.bias", c.n_head_kv * hd));
    }
  }
  KVC_ASSIGN_OR_RETURN(m->output_norm_, LoadF32(f, "output_norm.weight", c.n_embd));
  if (f.FindTensor("output.weight")) {
    KVC_ASSIGN_OR_RETURN(m->output_, LoadW(f, "output.weight", c.n_embd, c.n_vocab));
  } else {
    c.tied_output = true;
    KVC_ASSIGN_OR_RETURN(m->output_, cpu::PrepareWeight(*m->token_embd_));
  }
  // Quantized weights were repacked into their own buffers; the mapped copy is only read again
  // for embedding rows (and by non-repacked types), so let the kernel drop it from RSS.
  m->file_->ReleasePages();
  return m;
}

std::string Model::Identity() const {
  const ModelConfig& c = cfg_;
  const kv::KvShape s = kv_shape();
  uint64_t w0 = 0;
  for (const char* name : {"blk.0.attn_k.weight", "blk.0.attn_kv_a_mqa.weight"}) {
    if (const gguf::TensorInfo* t = file_->FindTensor(name)) {
      w0 = kv::Fnv1a64(t->data, t->n_bytes);
      break;
    }
  }
  return fmt::format("arch={} name={} n_layer={} n_head={} n_head_kv={} head_dim={} head_dim_v={} "
                     "n_embd={} n_vocab={} w0={:016x}", c.arch, c.name, s.n_layer, s.n_head,
                     s.n_head_kv, s.head_dim, s.DimV(), c.n_embd, c.n_vocab, w0);
}

kv::KvShape Model::kv_shape() const {
  kv::KvShape s;
  s.n_layer = cfg_.n_layer;
  s.n_head = cfg_.n_head;
  s.n_head_kv = cfg_.n_head_kv;
  s.head_dim = cfg_.head_dim;
  s.head_dim_v = cfg_.head_dim_v;
  s.attn_scale = cfg_.attn_scale;
  s.rope = cfg_.rope;
  return s;
}

const std::string& Model::file_checksum() const {
  std::call_once(checksum_once_, [this] {
    const XXH128_hash_t h = XXH3_128bits(file_->file_bytes(), file_->file_size());
    file_checksum_ = fmt::format("{:016x}{:016x}", h.high64, h.low64);
  });
  return file_checksum_;
}

size_t Model::weight_bytes() const {
  size_t s = output_->bytes() + (mla_ ? mla_->bytes() : 0);
  for (const auto& L : layers_) {
    for (const auto* w : {&L.wq, &L.wk, &L.wv, &L.wo, &L.w_gate, &L.w_up, &L.w_down}) {
      s += *w ? (*w)->bytes() : 0;
    }
  }
  return s;
}

// ------------------------------------------------------------------ Session

StatusOr<std::unique_ptr<Session>> Session::Create(const Model& model, kv::KvCacheConfig cache_cfg,
                                                   const std::string& evict_spec, Options opt) {
  if (opt.n_ctx <= 0) return InvalidArgument("context size must be > 0");
  if (opt.n_batch <= 0) return InvalidArgument("batch size must be > 0");
  if (opt.n_ctx > model.config().n_ctx_train) {
    spdlog::warn("context size {} exceeds the model's trained context {}; quality may degrade",
                 opt.n_ctx, model.config().n_ctx_train);
  }
  std::unique_ptr<Session> s(new Session(model));
  s->opt_ = opt;
  KVC_ASSIGN_OR_RETURN(s->policy_, kv::MakePolicy(evict_spec, model.kv_shape()));
  // An explicit position mode (not the default) wins; otherwise the policy's own (StreamingLLM:
  // in-cache). Policies take a `pos=` parameter too.
  if (s->policy_ && !cache_cfg.position_mode_set &&
      cache_cfg.position_mode == kv::PositionMode::kOriginal) {
    cache_cfg.position_mode = s->policy_->position_mode();
  }
  // Pre-RoPE keys are rotated from a cos/sin table; size it to the context.
  cache_cfg.rope_table_positions = std::max<int64_t>(cache_cfg.rope_table_positions, opt.n_ctx);
  KVC_ASSIGN_OR_RETURN(s->cache_, kv::KvCache::Create(model.kv_shape(), cache_cfg));
  if (s->policy_) s->cache_->SetStatsRequest(s->policy_->StatsNeeded());
  return s;
}

void Session::Reset() {
  cache_->Clear();
  n_past_ = 0;
}

Status Session::Eval(const std::vector<int32_t>& tokens, bool all_logits, std::vector<float>* logits) {
  const ModelConfig& c = model_.config();
  if (tokens.empty()) return InvalidArgument("empty input: nothing to evaluate");
  for (size_t i = 0; i < tokens.size(); ++i) {
    if (tokens[i] < 0 || tokens[i] >= c.n_vocab) {
      return InvalidArgument(fmt::format("token id {} at index {} outside the vocabulary [0, {})",
                                         tokens[i], i, c.n_vocab));
    }
  }
  if (!policy_ && n_past_ + int64_t(tokens.size()) > opt_.n_ctx) {
    return OutOfRange(fmt::format("{} tokens after {} already in the cache exceed the context size "
                                  "{} (raise -c or use an eviction policy)",
                                  tokens.size(), n_past_, opt_.n_ctx));
  }
  const int64_t n = int64_t(tokens.size());
  if (logits) logits->assign(size_t(all_logits ? n : 1) * c.n_vocab, 0.f);
  for (int64_t i = 0; i < n; i += opt_.n_batch) {
    const int nb = int(std::min<int64_t>(opt_.n_batch, n - i));
    if (policy_) KVC_RETURN_IF_ERROR(policy_->BeforeWrite(*cache_, nb));
    float* out = nullptr;
    if (logits) out = all_logits ? logits->data() + size_t(i) * c.n_vocab : logits->data();
    const bool want = logits && (all_logits || i + nb == n);
    KVC_RETURN_IF_ERROR(Forward(tokens.data() + i, nb, all_logits, want ? out : nullptr));
  }
  if (policy_) {
    if (n > 1) KVC_RETURN_IF_ERROR(policy_->AfterPrefill(*cache_, int(n)));
    else KVC_RETURN_IF_ERROR(policy_->AfterStep(*cache_));
  }
  return Status::Ok();
}

Status Session::Forward(const int32_t* tokens, int n, bool all_logits, float* logits) {
  std::vector<SeqRows> rows(1);
  rows[0].cache = cache_.get();
  rows[0].tokens = tokens;
  rows[0].n_tokens = n;
  rows[0].seq0 = n_past_;
  rows[0].all_logits = all_logits;
  rows[0].logits = logits;
  ForwardBatch(model_, rows, &scratch_);
  if (rows[0].status.ok()) n_past_ += n;
  return rows[0].status;
}

}  // namespace kvc
