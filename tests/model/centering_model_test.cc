// Why `center=1` hurt TurboQuant (docs/results.md, "Centering and KVQuant's sink"), measured on the real model's keys, values and queries (one WikiText-2 test chunk, the
// same tokens eval/perplexity read as chunk 0). Prints, per layer and per cache configuration,
// the key reconstruction error, the attention KL the key error causes with the real queries, and
// the value-output error; plus the key statistics that explain them (energy of x − μ relative to
// x, by position: for a post-RoPE μ of the first batch — the cache's estimator before it moved
// μ to the pre-RoPE frame — for a whole-chunk μ, and for the pre-RoPE μ the cache uses now;
// attention-weighted, and for token 0, the attention sink). Measurement, not a pass/fail check of
// the numbers (it asserts only sanity). GTEST_SKIP without the model or the text.
//
//   KVC_CENTER_CTX   tokens (default 1024, ~35 s; docs/results.md used 4096, ~4 min)
//   KVC_CENTER_BATCH write batch (default 512, as eval -b)
//   KVC_CENTER_SPECS cache specs separated by ';' (default: see below)
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <string>
#include <vector>

#include "kv/cache.h"
#include "kv/rope.h"
#include "model/model.h"
#include "../../tools/cli/lib/runner.h"  // TokenizeText, ReadTextFile, DefaultTextPath (kvc_eval)

namespace kvc {
namespace {

const std::string kRoot = KVC_SOURCE_DIR;
const std::string kModel = kRoot + "/models/SmolLM2-135M-Instruct.Q4_1.gguf";

// raw[t] = ‖x_t‖², centered[t] = ‖x_t − μ‖² for rows x [n, d] (float), μ [d] (double).
void RawAndCenteredNorms(const float* x, int n, int d, const std::vector<double>& mu,
                         std::vector<double>* raw, std::vector<double>* centered) {
  for (int t = 0; t < n; ++t) {
    double e = 0, c = 0;
    for (int i = 0; i < d; ++i) {
      const double v = x[size_t(t) * d + i];
      e += v * v;
      c += (v - mu[i]) * (v - mu[i]);
    }
    (*raw)[t] = e;
    (*centered)[t] = c;
  }
}

int EnvInt(const char* name, int def) {
  const char* v = std::getenv(name);
  return v && *v ? std::atoi(v) : def;
}

// Raw K (pre-RoPE), V and sampled Q (pre-RoPE) of every layer, captured from Write/Attend.
struct Capture : kv::KvObserver {
  int nkv, nh, hd, dv, every;
  std::vector<std::vector<float>> k, v;             // [layer][n, nkv, hd]
  std::vector<std::vector<float>> q;                // [layer][rows, nh, hd] sampled rows
  std::vector<std::vector<int64_t>> kseq, qseq;     // [layer][..]
  void OnWrite(int layer, const int64_t* seq, int n, const float* kk, const float* vv) override {
    k[layer].insert(k[layer].end(), kk, kk + size_t(n) * nkv * hd);
    v[layer].insert(v[layer].end(), vv, vv + size_t(n) * nkv * dv);
    kseq[layer].insert(kseq[layer].end(), seq, seq + n);
  }
  void OnQuery(int layer, const int64_t* seq, int n, const float* qq) override {
    for (int i = 0; i < n; ++i) {
      if (seq[i] % every != every - 1) continue;
      q[layer].insert(q[layer].end(), qq + size_t(i) * nh * hd, qq + size_t(i + 1) * nh * hd);
      qseq[layer].push_back(seq[i]);
    }
  }
};

struct LayerStats {
  double k_err = 0, k_energy = 0;          // Σ‖k − k̂‖², Σ‖k‖² over tokens 1..n−1
  double k_err_late = 0, k_energy_late = 0;  // tokens >= batch (after the batch μ came from)
  double k0_rel = 0;                       // token 0: ‖k − k̂‖²/‖k‖², mean over heads
  double kl = 0;                           // mean KL(p ‖ p̂) per (query row, head), keys only
  double kl_late = 0;                      // same, query rows in the scored half (pos >= n/2)
  double ko_err = 0;                       // ‖Σ(p̂ − p) v‖² (keys-only error of the output)
  int rows_late = 0;
  double kl_cm = 0;                        // Var_p(e)/2: second-order term of the KL (common mode cancels)
  double e_mean2 = 0, e_var = 0;           // unweighted over keys: mean(e)², var(e) (per row, averaged)
  double v_err = 0, v_energy = 0;          // ‖Σp(v̂ − v)‖², ‖Σp v‖² with the true p
  int rows = 0;
};

TEST(CenteringModel, KeyAndScoreErrorRawVsCentered) {
  if (!std::filesystem::exists(kModel)) GTEST_SKIP() << "model missing: " << kModel;
  const std::string text_path = DefaultTextPath();
  if (text_path.empty() || !std::filesystem::exists(text_path)) GTEST_SKIP() << "WikiText-2 missing";
  const int n_ctx = EnvInt("KVC_CENTER_CTX", 1024);
  const int batch = EnvInt("KVC_CENTER_BATCH", 512);
  std::vector<std::string> specs = {"f16",   "turbo4", "turbo4:center=1", "turbo3", "turbo3:center=1",
                                    "fp8",   "fp8:center=1", "q4_0", "q4_0:center=1"};
  if (const char* e = std::getenv("KVC_CENTER_SPECS"); e && *e) {
    specs.clear();
    std::string s = e;
    for (size_t a = 0; a <= s.size();) {
      size_t b = s.find(';', a);
      if (b == std::string::npos) b = s.size();
      if (b > a) specs.push_back(s.substr(a, b - a));
      a = b + 1;
    }
  }

  auto m = Model::Load(kModel);
  ASSERT_TRUE(m.ok()) << m.status().ToString();
  auto text = ReadTextFile(text_path);
  ASSERT_TRUE(text.ok());
  auto toks = TokenizeText(**m, *text);
  ASSERT_TRUE(toks.ok());
  ASSERT_GE(int64_t(toks->size()), n_ctx);
  const kv::KvShape shape = (*m)->kv_shape();
  const int L = shape.n_layer, nkv = shape.n_head_kv, nh = shape.n_head, hd = shape.head_dim;
  const int dv = shape.DimV(), g = nh / nkv;
  const float scale = shape.attn_scale > 0 ? shape.attn_scale : 1.0f / std::sqrt(float(hd));

  Capture cap;
  cap.nkv = nkv; cap.nh = nh; cap.hd = hd; cap.dv = dv;
  cap.every = std::max(1, n_ctx / 96);  // ~96 query rows per layer, spread over the chunk
  cap.k.resize(L); cap.v.resize(L); cap.q.resize(L); cap.kseq.resize(L); cap.qseq.resize(L);
  {
    kv::KvCacheConfig cfg;
    cfg.k_codec = cfg.v_codec = "f32";
    Session::Options opt;
    opt.n_ctx = n_ctx;
    opt.n_batch = batch;
    auto sess = Session::Create(**m, cfg, "", opt);
    ASSERT_TRUE(sess.ok());
    (*sess)->cache().SetObserver(&cap);
    std::vector<int32_t> chunk(toks->begin(), toks->begin() + n_ctx);
    for (int i = 0; i < n_ctx; i += batch) {
      std::vector<int32_t> part(chunk.begin() + i, chunk.begin() + std::min(n_ctx, i + batch));
      ASSERT_TRUE((*sess)->Eval(part, false, nullptr).ok());
    }
    (*sess)->cache().SetObserver(nullptr);
  }
  const kv::Rope rope(shape.rope, n_ctx);
  // Post-RoPE keys per (layer, head): kr[l][h] [n, hd]; queries post-RoPE qr[l] [rows, nh, hd].
  const int n = n_ctx;
  std::vector<std::vector<std::vector<float>>> kr(L, std::vector<std::vector<float>>(nkv));
  std::vector<std::vector<std::vector<float>>> vr(L, std::vector<std::vector<float>>(nkv));
  std::vector<std::vector<float>> qr(L);
  for (int l = 0; l < L; ++l) {
    ASSERT_EQ(int(cap.kseq[l].size()), n);
    for (int h = 0; h < nkv; ++h) {
      kr[l][h].resize(size_t(n) * hd);
      vr[l][h].resize(size_t(n) * dv);
      for (int t = 0; t < n; ++t) {
        std::copy_n(&cap.k[l][(size_t(t) * nkv + h) * hd], hd, &kr[l][h][size_t(t) * hd]);
        std::copy_n(&cap.v[l][(size_t(t) * nkv + h) * dv], dv, &vr[l][h][size_t(t) * dv]);
      }
      rope.Apply(kr[l][h].data(), n, hd, cap.kseq[l].data());
    }
    qr[l] = cap.q[l];
    const int rows = int(cap.qseq[l].size());
    for (int r = 0; r < rows; ++r) rope.ApplySame(&qr[l][size_t(r) * nh * hd], nh, hd, cap.qseq[l][r]);
  }

  // ---- Key statistics: energy of k − μ relative to k, μ = post-RoPE mean of tokens 1..b−1 of
  // the first batch (the old estimator), μ over the whole chunk, and the pre-RoPE μ (the cache's).
  std::printf("\nKey energy kept after centering, ‖k−μ‖²/‖k‖² (post-RoPE, n_ctx %d, first batch %d):\n"
              "layer | μ=first batch: tok 1..%d, tok %d..%d, tok 0 | μ=whole chunk: all | attn-weighted(first-batch μ)"
              " | V: tok 0, attn-weighted | mean p(token 0) | pre-RoPE μ (first batch): tok 1..%d, tok %d..%d |"
              " attn-weighted w/o token 0: post-RoPE μ, pre-RoPE μ\n",
              n, batch, batch - 1, batch, n - 1, batch - 1, batch, n - 1);
  double tot_pre_e = 0, tot_pre_l = 0;
  double tot_e = 0, tot_c_early = 0, tot_e_early = 0, tot_c_late = 0, tot_e_late = 0, tot_c_all = 0;
  for (int l = 0; l < L; ++l) {
    double ee = 0, ce = 0, el = 0, cl = 0, r0 = 0, call = 0, eall = 0, pw_c = 0, pw_e = 0;
    double v_r0 = 0, pwv_c = 0, pwv_e = 0, p0 = 0, np0 = 0;
    double pre_ce = 0, pre_cl = 0, pw1_e = 0, pw1_c = 0, pw1_cp = 0;
    for (int h = 0; h < nkv; ++h) {
      const float* K = kr[l][h].data();
      std::vector<double> mu(hd, 0.0), mua(hd, 0.0);
      const int nb = std::min(batch, n);
      for (int t = 1; t < nb; ++t) for (int d = 0; d < hd; ++d) mu[d] += K[size_t(t) * hd + d];
      for (int t = 1; t < n; ++t) for (int d = 0; d < hd; ++d) mua[d] += K[size_t(t) * hd + d];
      for (int d = 0; d < hd; ++d) { mu[d] /= (nb - 1); mua[d] /= (n - 1); }
      for (int t = 0; t < n; ++t) {
        double e = 0, c = 0, ca = 0;
        for (int d = 0; d < hd; ++d) {
          const double x = K[size_t(t) * hd + d];
          e += x * x;
          c += (x - mu[d]) * (x - mu[d]);
          ca += (x - mua[d]) * (x - mua[d]);
        }
        if (t == 0) { r0 += c / e / nkv; continue; }
        (t < nb ? ee : el) += e;
        (t < nb ? ce : cl) += c;
        eall += e; call += ca;
      }
      // Pre-RoPE μ (mean of R(−t) k_t over the first batch) subtracted as R(t) μ_pre at position t:
      // ‖k_t − R(t) μ_pre‖ = ‖k_pre,t − μ_pre‖ (RoPE is a rotation), no drift with position.
      std::vector<double> mup(hd, 0.0), cpn(n);
      auto kpre = [&](int t, int d) { return double(cap.k[l][(size_t(t) * nkv + h) * hd + d]); };
      for (int t = 1; t < nb; ++t) for (int d = 0; d < hd; ++d) mup[d] += kpre(t, d);
      for (int d = 0; d < hd; ++d) mup[d] /= (nb - 1);
      for (int t = 0; t < n; ++t) {
        double c = 0;
        for (int d = 0; d < hd; ++d) c += (kpre(t, d) - mup[d]) * (kpre(t, d) - mup[d]);
        cpn[t] = c;
        if (t > 0) (t < nb ? pre_ce : pre_cl) += c;
      }
      // Attention-weighted: Σ_rows Σ_j p_j ‖k_j − μ‖² vs ‖k_j‖² with the real queries.
      const int rows = int(cap.qseq[l].size());
      std::vector<double> kn(n), cn(n);
      RawAndCenteredNorms(K, n, hd, mu, &kn, &cn);
      // Values: same, μ_v from the first batch.
      const float* V = vr[l][h].data();
      std::vector<double> muv(dv, 0.0), vn(n), vcn(n);
      for (int t = 1; t < nb; ++t) for (int d = 0; d < dv; ++d) muv[d] += V[size_t(t) * dv + d];
      for (int d = 0; d < dv; ++d) muv[d] /= (nb - 1);
      RawAndCenteredNorms(V, n, dv, muv, &vn, &vcn);
      v_r0 += vcn[0] / vn[0] / nkv;
      std::vector<double> s(n);
      for (int r = 0; r < rows; ++r) {
        const int64_t qs = cap.qseq[l][r];
        for (int j = 0; j < g; ++j) {
          const float* q = &qr[l][(size_t(r) * nh + h * g + j) * hd];
          double mx = -1e300;
          for (int t = 0; t <= qs; ++t) {
            double a = 0;
            for (int d = 0; d < hd; ++d) a += double(q[d]) * K[size_t(t) * hd + d];
            s[t] = a * scale;
            mx = std::max(mx, s[t]);
          }
          double z = 0;
          for (int t = 0; t <= qs; ++t) z += (s[t] = std::exp(s[t] - mx));
          for (int t = 0; t <= qs; ++t) {
            pw_e += s[t] / z * kn[t]; pw_c += s[t] / z * cn[t];
            pwv_e += s[t] / z * vn[t]; pwv_c += s[t] / z * vcn[t];
            if (t > 0) { pw1_e += s[t] / z * kn[t]; pw1_c += s[t] / z * cn[t]; pw1_cp += s[t] / z * cpn[t]; }
          }
          p0 += s[0] / z; np0 += 1;
        }
      }
    }
    std::printf("%5d | %6.3f %6.3f %6.2f | %6.3f | %6.3f | %6.2f %6.3f | %5.2f | %6.3f %6.3f | %6.3f %6.3f\n", l,
                ce / ee, cl / el, r0, call / eall, pw_c / pw_e, v_r0, pwv_c / pwv_e, p0 / np0, pre_ce / ee,
                pre_cl / el, pw1_c / pw1_e, pw1_cp / pw1_e);
    tot_pre_e += pre_ce; tot_pre_l += pre_cl;
    tot_e += ee + el; tot_e_early += ee; tot_c_early += ce; tot_e_late += el; tot_c_late += cl; tot_c_all += call;
  }
  std::printf("  all | %6.3f %6.3f        | %6.3f |        |               |       | %6.3f %6.3f |\n",
              tot_c_early / tot_e_early, tot_c_late / tot_e_late, tot_c_all / tot_e, tot_pre_e / tot_e_early,
              tot_pre_l / tot_e_late);

  // ---- Per configuration: write the captured K/V into a cache as eval does (batches of `batch`,
  // post-RoPE keys, μ from the first batch), decode, and measure against the f32 originals.
  struct Row { std::string spec; std::vector<LayerStats> ls; };
  std::vector<Row> results;
  for (const std::string& spec : specs) {
    auto rc = ParseRunConfig(spec);  // same syntax as eval --config ("k=turbo4:center=1 v=f16 sinks=1")
    ASSERT_TRUE(rc.ok()) << spec << ": " << rc.status().ToString();
    auto c = kv::KvCache::Create(shape, rc->cache);
    ASSERT_TRUE(c.ok()) << spec << ": " << c.status().ToString();
    Row row{spec, std::vector<LayerStats>(L)};
    for (int l = 0; l < L; ++l) {
      for (int i = 0; i < n; i += batch) {
        const int cnt = std::min(batch, n - i);
        ASSERT_TRUE((*c)->Write(l, &cap.kseq[l][i], cnt, &cap.k[l][size_t(i) * nkv * hd],
                                &cap.v[l][size_t(i) * nkv * dv]).ok());
      }
      LayerStats& st = row.ls[l];
      std::vector<float> kh(size_t(n) * hd), vh(size_t(n) * dv);
      std::vector<double> s(n), e(n);
      for (int h = 0; h < nkv; ++h) {
        (*c)->DecodeKeys(l, h, kh.data());
        (*c)->DecodeValues(l, h, vh.data());
        const float* K = kr[l][h].data();
        const float* V = vr[l][h].data();
        for (int t = 0; t < n; ++t) {
          double err = 0, en = 0;
          for (int d = 0; d < hd; ++d) {
            const double x = K[size_t(t) * hd + d], y = kh[size_t(t) * hd + d];
            err += (x - y) * (x - y); en += x * x;
          }
          if (t == 0) { st.k0_rel += err / en / nkv; continue; }
          st.k_err += err; st.k_energy += en;
          if (t >= batch) { st.k_err_late += err; st.k_energy_late += en; }
        }
        const int rows = int(cap.qseq[l].size());
        for (int r = 0; r < rows; ++r) {
          const int64_t qs = cap.qseq[l][r];
          const int nk = int(qs) + 1;
          for (int j = 0; j < g; ++j) {
            const float* q = &qr[l][(size_t(r) * nh + h * g + j) * hd];
            double mx = -1e300, mxh = -1e300;
            for (int t = 0; t < nk; ++t) {
              double a = 0, b = 0;
              for (int d = 0; d < hd; ++d) {
                a += double(q[d]) * K[size_t(t) * hd + d];
                b += double(q[d]) * kh[size_t(t) * hd + d];
              }
              s[t] = a * scale;
              e[t] = (b - a) * scale;
              mx = std::max(mx, s[t]);
              mxh = std::max(mxh, s[t] + e[t]);
            }
            double z = 0, zh = 0, em = 0, e2 = 0;
            for (int t = 0; t < nk; ++t) {
              z += std::exp(s[t] - mx);
              zh += std::exp(s[t] + e[t] - mxh);
              em += e[t];
              e2 += e[t] * e[t];
            }
            em /= nk;
            st.e_mean2 += em * em;
            st.e_var += e2 / nk - em * em;
            // KL(p ‖ p̂) = Σ p (log p − log p̂); Var_p(e)/2 is its second-order term.
            double kl = 0, pe = 0, pe2 = 0;
            std::vector<double> ov(dv, 0.0), oe(dv, 0.0);
            for (int t = 0; t < nk; ++t) {
              const double p = std::exp(s[t] - mx) / z;
              const double lp = s[t] - mx - std::log(z), lph = s[t] + e[t] - mxh - std::log(zh);
              kl += p * (lp - lph);
              pe += p * e[t]; pe2 += p * e[t] * e[t];
              for (int d = 0; d < dv; ++d) {
                ov[d] += p * V[size_t(t) * dv + d];
                oe[d] += p * (double(vh[size_t(t) * dv + d]) - V[size_t(t) * dv + d]);
              }
            }
            st.kl += kl;
            if (qs >= n / 2) { st.kl_late += kl; ++st.rows_late; }
            std::vector<double> ko(dv, 0.0);
            for (int t = 0; t < nk; ++t) {
              const double dp = std::exp(s[t] + e[t] - mxh) / zh - std::exp(s[t] - mx) / z;
              for (int d = 0; d < dv; ++d) ko[d] += dp * V[size_t(t) * dv + d];
            }
            for (int d = 0; d < dv; ++d) st.ko_err += ko[d] * ko[d];
            st.kl_cm += 0.5 * (pe2 - pe * pe);
            for (int d = 0; d < dv; ++d) { st.v_err += oe[d] * oe[d]; st.v_energy += ov[d] * ov[d]; }
            ++st.rows;
          }
        }
      }
    }
    results.push_back(std::move(row));
  }

  std::printf("\nSummary over %d layers (keys: tokens 1..%d; KL per query row and head, mean; "
              "e = score error q·(k̂−k)/√d):\n"
              "spec                           | K rel err | K rel err tok>=%d | tok0 rel | attn KL(keys) | KL rows>=%d |"
              " Var_p(e)/2 | mean(e)² | var(e) | out rel err (K) | out rel err (V)\n", L, n - 1, batch, n / 2);
  for (const Row& r : results) {
    LayerStats a;
    for (const auto& s : r.ls) {
      a.k_err += s.k_err; a.k_energy += s.k_energy; a.k_err_late += s.k_err_late;
      a.k_energy_late += s.k_energy_late; a.k0_rel += s.k0_rel / L; a.kl += s.kl; a.kl_cm += s.kl_cm;
      a.e_mean2 += s.e_mean2; a.e_var += s.e_var; a.v_err += s.v_err; a.v_energy += s.v_energy;
      a.rows += s.rows; a.kl_late += s.kl_late; a.rows_late += s.rows_late; a.ko_err += s.ko_err;
    }
    std::printf("%-30s | %9.4f | %17.4f | %8.4f | %13.5f | %11.5f | %10.5f | %8.4f | %6.4f | %15.5f | %.5f\n",
                r.spec.c_str(), a.k_err / a.k_energy, a.k_err_late / std::max(a.k_energy_late, 1e-30),
                a.k0_rel, a.kl / a.rows, a.kl_late / std::max(a.rows_late, 1), a.kl_cm / a.rows,
                a.e_mean2 / a.rows, a.e_var / a.rows, a.ko_err / a.v_energy, a.v_err / a.v_energy);
    EXPECT_TRUE(std::isfinite(a.kl)) << r.spec;
  }
  // Per layer: each spec's K rel err and attention KL.
  std::printf("\nPer layer: K rel err / attention KL (keys only) / out rel err (K) / out rel err (V)\nlayer");
  for (const Row& r : results) std::printf(" | %-30s", r.spec.c_str());
  std::printf("\n");
  for (int l = 0; l < L; ++l) {
    std::printf("%5d", l);
    for (const Row& r : results) {
      const auto& s = r.ls[l];
      std::printf(" | %6.4f %7.5f %7.5f %7.5f", s.k_err / s.k_energy, s.kl / s.rows, s.ko_err / s.v_energy,
                  s.v_err / s.v_energy);
    }
    std::printf("\n");
  }
}

}  // namespace
}  // namespace kvc
