// `kvcrunch calibrate`: K/V statistics over calibration text for the low-rank (Palu) and
// key-channel (ThinK) transforms, written as a calibration file (src/kv/calibration_file.h).
//
// Collected per (layer, KV head) through a KvObserver on the session's cache (zero cost otherwise):
//   palu.k.basis/eig   eigen-decomposition of Σ_t k_t k_tᵀ / n over *pre-RoPE* keys (head_dim²)
//   palu.v.basis/eig   same over values
//   think.q2 / think.k2  Σ of squared *post-RoPE* query (the group's heads) / key channels
//   palu.k.qmetric     rotation-averaged pre-RoPE query second moment of the group (aware=1 keys)
//   palu.k.attcov / palu.v.outcov  attention-weighted key moment / attention-output moment
//                      (obj=attn); the observer recomputes each layer's causal attention
//   palu.{k,v}.jcov.{l}  joint moment of all KV heads of a layer (G-LRD energy study)
// With --method smooth only the key-smoothing statistics (smooth.{k,q}{max,rms}.{l}.{h}, see
// src/kv/transforms/smooth.h) are collected: one forward pass per chunk.
// Use text disjoint from the evaluation text (docs/lowrank.md uses a PG-19 book; WikiText-2 test is
// the evaluation text).
#pragma once

#include <string>
#include <vector>

#include "kv/calibration_file.h"
#include "model/model.h"
#include "runner.h"

namespace kvc {

struct CalibrateOptions {
  int64_t n_ctx = 512;          // tokens per chunk (each chunk starts from an empty cache)
  int64_t max_tokens = 16384;   // calibration tokens used (whole chunks)
  std::string spec = "palu:ratio=0.5";  // palu:ratio=R[,alloc=uniform|var]: defaults stored in the file
  std::string source;           // text path, for the file's metadata
};

// "arch=... name=... n_layer=... n_head=... n_head_kv=... head_dim=... head_dim_v=... n_embd=...
//  n_vocab=... w0=<FNV-1a 64 of the first layer's K (or KV down-) projection bytes>".
std::string ModelIdentity(const Model& m);

StatusOr<kv::CalibrationFile> Calibrate(const Model& m, const std::vector<int32_t>& tokens,
                                        const CalibrateOptions& opt);

// For every transform spec of `rc` with a file= parameter: the file must exist, be valid and
// have been made for this model (FAILED_PRECONDITION-style INVALID_ARGUMENT naming both models).
Status CheckRunConfigCalibration(const KvRunConfig& rc, const Model& m);

// One line per layer: the largest key channel (x median) and smoothing scale per head.
std::string DescribeSmooth(const kv::CalibrationFile& f);

// One line per layer: ranks and retained variance for a ratio (for the CLI summary).
std::string DescribePaluRanks(const kv::CalibrationFile& f, double ratio, const std::string& alloc);

}  // namespace kvc
