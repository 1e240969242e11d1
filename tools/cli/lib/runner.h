// Shared by the CLI commands: perplexity (llama.cpp protocol) and the eval comparison.
#pragma once

#include <cstdint>
#include <functional>
#include <random>
#include <string>
#include <vector>

#include "kv/cache.h"
#include "model/model.h"

namespace kvc {

// One KV configuration to evaluate: codecs, transforms, eviction, position mode.
struct KvRunConfig {
  std::string name;               // display name (derived when empty)
  kv::KvCacheConfig cache;
  std::string evict;              // eviction policy spec ("" = none)
  // Loaded from a KV config file (config=FILE / --kv-config FILE): its path and the model shape
  // it was made for (n_layer == 0: none); FitLayerOverrides(KvShape) refuses another shape.
  std::string config_file;
  kv::KvShape file_shape;
  std::string Label() const;      // name or a derived label
};

// Parses "q4_0" (K=V=q4_0) or space-separated key=value pairs:
//   k=SPEC v=SPEC kt=TRANSFORM vt=TRANSFORM evict=POLICY sinks=N sink_codec=SPEC pos=MODE name=NAME
// e.g. "k=q8_0 v=q4_0 evict=snapkv:budget=256". INVALID_ARGUMENT on unknown keys.
// Per-layer codecs: k@L=SPEC, v@L=SPEC, kv@L=SPEC with L = 5, 3-10 or 0,29 (KvCacheConfig's
// k_codec_layer / v_codec_layer; other layers keep k= / v=), e.g. "k=f16 v=f16 k@4=turbo3".
// The lists are sized to the highest layer named: call FitLayerOverrides before building a cache.
StatusOr<KvRunConfig> ParseRunConfig(const std::string& text);
//   preset=NAME  starts from a named complete configuration (KvPresets); keys after it override
//                it, e.g. "preset=kvc3 name=mine" or "preset=kvc3 sinks=4".
//   config=FILE  (or file=FILE) the same from a KV config file (kv_config_file.h, written by
//                `calibrate --method bits`); not combinable with preset=.
// Pads the per-layer codec lists to n_layer; INVALID_ARGUMENT if a layer >= n_layer is named.
Status FitLayerOverrides(KvRunConfig* c, int n_layer);
// The same, and INVALID_ARGUMENT when the configuration came from a KV config file made for
// another model shape (layers, KV heads, head dims). Use this one wherever a model is loaded.
Status FitLayerOverrides(KvRunConfig* c, const kv::KvShape& shape);
// --kv-config FILE: the file's configuration (ParseRunConfig("config=FILE") without the
// white-space split, so any path works).
StatusOr<KvRunConfig> LoadRunConfigFile(const std::string& path);

// All-in bits per value of a cache configuration, measured the way the presets are counted:
// write n_tokens random vectors to every layer of a cache of this shape, flush, and read the
// allocated bytes back (sinks, fp16 windows/tails, scales, norms included):
// bits = 16 · KV bytes / f16 KV bytes. The per-layer K and V bytes come back too.
struct AllInBits {
  double bits = 0;
  double f16_bytes = 0;                    // of the whole cache at n_tokens
  std::vector<double> k_bytes, v_bytes;    // [n_layer] allocated (packed + tail)
};
StatusOr<AllInBits> MeasureAllInBits(const kv::KvShape& shape, const kv::KvCacheConfig& cfg,
                                     int n_tokens);

// Named complete KV configurations (`--kv-preset NAME`, `preset=NAME` in eval/retrieval configs).
// Each is a --config string; the numbers are what docs/results.md measured for it (WikiText-2
// test, -c 4096, 2 chunks, f16 baseline 23.6319): all-in bits per value at 4,096 tokens
// (= 16 · KV bytes / f16 KV bytes, every window, sink, scale and norm included) and Δppl.
struct KvPreset {
  std::string name;
  std::string config;        // ParseRunConfig syntax
  double bits_limit;         // the class: all-in bits per value it must stay within at -c 4096
  std::string summary;       // what it is and what it measured
};
const std::vector<KvPreset>& KvPresets();
std::string KvPresetNames();   // "kvc4, kvc3, ..."

// The default list: every registered codec (in_default_eval) for K and V.
std::vector<KvRunConfig> DefaultRunConfigs();

struct PerplexityOptions {
  int64_t n_ctx = 512;
  int n_batch = 512;
  int64_t max_chunks = -1;   // -1: all
};

// Per-scored-token results of one configuration (for KLD against a baseline).
struct ChunkScores {
  std::vector<float> nll;           // [n_scored]
  std::vector<float> logprobs;      // [n_scored, n_vocab] log-softmax (only if requested)
  std::vector<int32_t> argmax;      // [n_scored]
};

// Tokenizes text; INVALID_ARGUMENT if empty or not UTF-8.
StatusOr<std::vector<int32_t>> TokenizeText(const Model& m, const std::string& text);
StatusOr<std::string> ReadTextFile(const std::string& path);

// Runs one chunk (llama.cpp perplexity protocol: evaluate n_ctx tokens, score positions
// [n_ctx/2, n_ctx-1) predicting the next token). Session is reset first.
Status ScoreChunk(Session& s, const int32_t* tokens, int64_t n_ctx, bool keep_logprobs,
                  ChunkScores* out);

// Measured memory: process peak RSS (VmHWM) and current RSS in bytes.
size_t PeakRssBytes();
size_t CurrentRssBytes();

// Locates defaults: the model under models/ and a real English text (WikiText-2 test) in
// ../shared/data, searched relative to the working directory and the source tree.
std::string DefaultModelPath();
std::string DefaultTextPath();

// Terminal progress bar on stderr (only when stderr is a TTY).
class Progress {
 public:
  Progress(std::string label, int64_t total);
  void Step(int64_t n = 1, const std::string& note = "");
  ~Progress();

 private:
  std::string label_;
  int64_t total_, done_ = 0;
  bool tty_;
  double t0_;
};
double NowSeconds();
// `kvcrunch generate`'s sampler (the Python Model.generate uses the same, to give the CLI's tokens):
// greedy when temp <= 0, else softmax(logits / temp), nucleus of mass top_p (ties by token id), one
// uniform draw from rng. logits [n_vocab] f32.
int32_t SampleGenerateToken(const std::vector<float>& logits, float temp, float top_p, std::mt19937& rng);
// CPU time of this process, all threads (seconds): on a shared machine it counts only our work,
// so ratios of CPU time between configurations stay meaningful under load (at -t 1 especially).
double ProcessCpuSeconds();

}  // namespace kvc
