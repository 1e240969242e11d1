// lowrank: Palu-style low-rank K/V latent cache (Chang et al., "Palu: KV-Cache Compression with
// Low-Rank Projection", ICLR'25, §3.1 M-LRD per-head decomposition; spec §9).
//
// Algorithm. Per (layer, KV head, K|V) a projection P [head_dim, r] with orthonormal columns:
//   store        y = Pᵀ x                 x [head_dim] (keys: *pre-RoPE*), y [r] = the latent
//   keys         x̂ = P y, then RoPE at the cell's position, at attention time (pre_rope() = true:
//                RoPE sits between the projection and the query, so it cannot be folded)
//   values       Σ_t p_t P y_t = P Σ_t p_t y_t  (Reconstruct once per query row; exact)
// P = the top-r eigenvectors of the uncentred second moment C = Σ_t x_t x_tᵀ of calibration
// vectors (pre-RoPE keys / values of that head, gathered by `kvcrunch calibrate`). This minimises
// ||X - X P Pᵀ||_F over calibration tokens (Eckart–Young). It equals Palu's / SVD-LLM's
// activation-whitened SVD of the head's projection W [d_model, head_dim]: with S Sᵀ = Aᵀ A (A the
// calibration inputs, K = A W), SVD(Sᵀ W) = U Σ Vᵀ has Vᵀ's rows = eigenvectors of
// Wᵀ S Sᵀ W = Kᵀ K = C, and the truncated reconstruction A S⁻ᵀ U_r Σ_r V_rᵀ = K V_r V_rᵀ
// (tests/unit/lowrank_test.cc checks this numerically).
// Ranks: uniform r = round(ratio · head_dim) (rounded up to `multiple`); alloc=var: every
// stream starts with `multiple` components, the remaining budget (ratio · head_dim · n_streams in
// total, per K and per V separately) goes greedily to the chunks of `multiple` components with
// the largest explained-energy fraction (λ / Σλ of their stream) across all layers and heads;
// alloc=global: the same greedy over K and V streams together with one budget
// (ratio · head_dim · 2 · n_streams), so ranks differ per layer, head and K/V (keys, whose
// spectra decay faster, end up with lower ranks). K and V must use the same options.
// Optional obj=attn fits the basis to attention-side moments instead of the stream's own:
// keys to Σ_i Σ_t p_it k_t k_tᵀ (keys weighted by the attention they receive), values to the
// second moment of attention outputs o = Σ_t p_t v_t (exact target: Σ_t p_t Π v_t = Π o).
// Optional aware=1 (output-aware, in the spirit of SVD-LLM whitening but on the *consumer* side):
// minimise E||S (x − x̂)||² instead of E||x − x̂||², S = G^{1/2} with G the metric the error is
// seen through: keys G = E_q E_Δ[R(Δ) q qᵀ R(Δ)ᵀ], the group's pre-RoPE query second moment
// averaged over relative RoPE rotations Δ ∈ [0, 4096) (older files: diag of post-RoPE query
// energy), values G = Σ_j W_o,jᵀ W_o,j over the group's query heads. Then Q = top-r
// eigenvectors of S C S, y = (S Q)ᵀ x, x̂ = S⁻¹ Q y (an oblique projection; Forward and
// Reconstruct use different matrices).
// Optional rot=1 folds a normalised Walsh–Hadamard H_r into the basis (P ← P Hᵀ, Palu §3.3) to
// spread latent outliers before low-bit codecs (needs r a power of two).
//
// Spec: lowrank:file=CALIB[,ratio=R][,alloc=uniform|var|global][,obj=plain|attn][,multiple=M]
//       [,rot=0|1][,aware=0|1]
//   ratio = fraction of dimensions *kept* (default: the file's "ratio" metadata, else 0.5).
// Bits per value: the codec's bits · r / head_dim (e.g. f16 at r = 32 of 64: 8 bits/value).
// Worked size example, 128 tokens x head_dim 64, ratio 0.5 (r = 32), f16 latent:
//   128 · 32 · 2 B = 8,192 B per head per K (vs 16,384 B f16 full); with q8_0 on the latent:
//   128 · 34 B = 4,352 B. Parameters: P = 64 · 32 · 4 B = 8,192 B per (layer, head, K|V).
#pragma once

#include <memory>
#include <string>
#include <vector>

#include <Eigen/Dense>

#include "kv/calibration_file.h"
#include "kv/transform.h"

namespace kvc::kv {

// Tensor names in the calibration file (l = layer, h = KV head, kind "k" or "v"):
//   palu.{kind}.basis.{l}.{h}  [head_dim, head_dim] f32, row j = j-th eigenvector (λ descending)
//   palu.{kind}.eig.{l}.{h}    [head_dim] f32, eigenvalues of C / n_tokens, descending
//   palu.v.wo_gram.{l}.{h}     [head_dim_v, head_dim_v] f32, Σ_j W_o,jᵀ W_o,j (aware=1 for V)
//   palu.k.qmetric.{l}.{h}     [head_dim, head_dim] f32, rotation-averaged pre-RoPE query second
//                              moment of the group (aware=1 for K; see tools/cli/lib/calibrate.cc)
//   palu.k.attcov.{l}.{h}      [d, d] Σ_i Σ_t p_it k_t k_tᵀ / rows (pre-RoPE keys by attention)
//   palu.v.outcov.{l}.{h}      [dv, dv] Σ o oᵀ / rows, o = attention output of a group query head
//   palu.{kind}.jcov.{l}       [n_head_kv·d, n_head_kv·d] f32, joint second moment of all KV heads
//                              of layer l (per-head moments are its diagonal blocks; G-LRD study)
std::string PaluTensorName(const char* what, KvKind kind, int layer, int head);
std::string PaluLayerTensorName(const char* what, KvKind kind, int layer);

// Ranks [n_layer * n_head_kv] (layer-major) for one kind. INVALID_ARGUMENT for bad params.
// alloc: uniform | var (per kind) | global (K and V streams share one budget). With aware, the
// greedy gains are the eigenvalues of the whitened covariance S C S (S = G^{1/2}).
StatusOr<std::vector<int>> PaluRanks(const CalibrationFile& f, KvKind kind, int n_layer,
                                     int n_head_kv, int dim, double ratio,
                                     const std::string& alloc, int multiple, bool aware = false,
                                     bool attn_obj = false);

// The second moment a basis is fitted to: obj=plain the stream's own (palu.{k,v}.basis/eig);
// obj=attn (attn_obj) keys weighted by the attention they receive (palu.k.attcov) / values'
// attention outputs o = Σ_t p_t v_t (palu.v.outcov; exact target, since Σ_t p_t Π v_t = Π o).
StatusOr<Eigen::MatrixXd> PaluStreamCov(const CalibrationFile& f, KvKind kind, int layer, int head,
                                        int d, bool attn_obj);

// Eigenvalues (descending) of the stream's covariance, whitened by its aware metric if asked.
StatusOr<std::vector<double>> PaluSpectrum(const CalibrationFile& f, KvKind kind, int layer,
                                           int head, int d, bool aware, bool attn_obj = false);

// The metric G an aware=1 basis minimises E||G^{1/2}(x − x̂)||² in (see the header comment).
StatusOr<Eigen::MatrixXd> PaluAwareMetric(const CalibrationFile& f, KvKind kind, int layer,
                                          int head, int d);

// A low-rank projection transform from an explicit basis p [dim, r] (orthonormal columns).
std::unique_ptr<Transform> MakeLowRankFromBasis(std::vector<float> p, int dim, int r,
                                                bool pre_rope, std::string name);

StatusOr<std::unique_ptr<Transform>> MakeLowRankTransform(const CodecSpec& spec,
                                                          const CodecContext& ctx);

}  // namespace kvc::kv
