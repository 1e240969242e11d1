#include "kvquant_calib.h"

#include <cstdlib>
#include <filesystem>

#include <fmt/format.h>

#include "kv/rope.h"

namespace kvc {

StatusOr<kv::KvQuantSamples> CollectKvQuantSamples(const Model& m, const std::vector<int32_t>& toks,
                                                   int n_ctx, int n_chunks, const std::string& source) {
  if (n_ctx < 2 || n_chunks < 1 || int64_t(toks.size()) < int64_t(n_ctx) * n_chunks) {
    return InvalidArgument(fmt::format("kvquant calibration needs {} x {} tokens, text has {}",
                                       n_chunks, n_ctx, toks.size()));
  }
  const kv::KvShape shape = m.kv_shape();
  kv::KvQuantSamples s;
  s.n_layer = shape.n_layer;
  s.n_head_kv = shape.n_head_kv;
  s.head_dim = shape.head_dim;
  s.k.resize(s.n_layer);
  s.v.resize(s.n_layer);
  kv::KvCacheConfig cfg;
  cfg.k_codec = cfg.v_codec = "f32";
  Session::Options opt;
  opt.n_ctx = n_ctx;
  KVC_ASSIGN_OR_RETURN(auto sess, Session::Create(m, cfg, "", opt));
  const kv::Rope rope(shape.rope);
  const int hd = shape.head_dim, nh = shape.n_head_kv;
  for (int c = 0; c < n_chunks; ++c) {
    sess->Reset();
    std::vector<int32_t> chunk(toks.begin() + size_t(c) * n_ctx, toks.begin() + size_t(c + 1) * n_ctx);
    KVC_RETURN_IF_ERROR(sess->Eval(chunk, false, nullptr));
    const auto& cache = sess->cache();
    for (int l = 0; l < s.n_layer; ++l) {
      const int64_t n = cache.n_cells(l, 0);
      std::vector<std::vector<float>> kh(nh), vh(nh);
      for (int h = 0; h < nh; ++h) {
        kh[h].resize(size_t(n) * hd);
        vh[h].resize(size_t(n) * hd);
        cache.DecodeKeys(l, h, kh[h].data());
        cache.DecodeValues(l, h, vh[h].data());
        std::vector<int64_t> neg(cache.positions(l, h));
        for (auto& p : neg) p = -p;  // undo RoPE: rotate back by −pos
        rope.Apply(kh[h].data(), int(n), hd, neg.data());
      }
      for (int64_t t = 1; t < n; ++t) {
        for (int h = 0; h < nh; ++h) {
          s.k[l].insert(s.k[l].end(), &kh[h][t * hd], &kh[h][(t + 1) * hd]);
          s.v[l].insert(s.v[l].end(), &vh[h][t * hd], &vh[h][(t + 1) * hd]);
        }
      }
    }
  }
  s.source = fmt::format("{}, {}x{} tokens, f32 cache", source, n_chunks, n_ctx);
  return s;
}

std::string KvQuantCalibrationPath(const std::string& model_path) {
  std::string p = model_path;
  if (p.size() > 5 && p.ends_with(".gguf")) p.resize(p.size() - 5);
  return p + ".kvquant.json";
}

// ../shared/data/pg19/<book> from the working directory or beside the source tree.
static StatusOr<std::string> FindPg19Book(const std::string& book, const char* what) {
  const std::string rel = "shared/data/pg19/" + book;
  for (const std::string& p : {"../" + rel, std::string(KVC_SOURCE_DIR) + "/../" + rel}) {
    if (std::filesystem::exists(p)) return p;
  }
  return NotFound(fmt::format("{}: PG-19 book {} not found under ../shared/data/pg19", what, book));
}

std::string PredictCalibrationPath(const std::string& model_path) {
  std::string p = model_path;
  if (p.size() > 5 && p.ends_with(".gguf")) p.resize(p.size() - 5);
  return p + ".predict.kvc";
}

StatusOr<std::string> EnsurePredictCalibration(const Model& m, const std::string& model_path,
                                               const std::vector<KvRunConfig>& configs) {
  bool need = false;
  for (const auto& c : configs) need = need || c.cache.predict == "auto";
  // KVC_PREDICT_AUTO set by the user wins. Set by an earlier call (this process, maybe for another
  // model: the Python package loads several), it is resolved again for this model: the earlier
  // model's predictors would be used otherwise (refused when the shapes differ, silently wrong
  // when they match).
  static std::string set_here;
  const char* env = std::getenv("KVC_PREDICT_AUTO");
  if (!need || (env && *env && set_here != env)) return std::string();
  const std::string path = PredictCalibrationPath(model_path);
  if (std::filesystem::exists(path)) {
    auto loaded = kv::LoadCalibrationFileShared(path);
    if (!loaded.ok()) {  // truncated or corrupt (an interrupted copy): say how to get a good one
      return Status(loaded.status().code(),
                    loaded.status().message() + " (predict=auto: delete it to recalibrate)");
    }
    std::shared_ptr<const kv::CalibrationFile> f = std::move(loaded).value();
    if (f->MetaOr("model_id", "") != ModelIdentity(m) || f->MetaOr("kind", "") != "kv-predict") {
      return InvalidArgument(fmt::format("predict=auto: {} was made for another model or is not a "
                                         "predictor file; delete it to recalibrate", path));
    }
  } else {
    const std::string book = "pg1342_pride_and_prejudice_austen.txt";
    std::string text_path;
    KVC_ASSIGN_OR_RETURN(text_path, FindPg19Book(book, "predict=auto calibration"));
    // The same as `kvcrunch calibrate --method predict -f <book> -c 1024 --max-tokens 32768`.
    KVC_ASSIGN_OR_RETURN(const std::string text, ReadTextFile(text_path));
    KVC_ASSIGN_OR_RETURN(auto toks, TokenizeText(m, text));
    CalibrateOptions opt;
    opt.n_ctx = 1024;
    opt.max_tokens = 32 * 1024;
    opt.spec = "predict";
    opt.source = text_path;
    fmt::print(stderr, "predict=auto: calibrating on {} (32 x 1024 tokens) -> {}\n", book, path);
    KVC_ASSIGN_OR_RETURN(auto f, Calibrate(m, toks, opt));
    KVC_RETURN_IF_ERROR(kv::WriteCalibrationFile(path, f));
  }
  setenv("KVC_PREDICT_AUTO", path.c_str(), 1);
  set_here = path;
  return path;
}

static bool NeedsKvQuantCalibration(const std::string& spec) {
  return spec.rfind("kvquant", 0) == 0 && spec.find("calib=") == std::string::npos;
}

StatusOr<std::string> EnsureKvQuantCalibration(const Model& m, const std::string& model_path,
                                               const std::vector<KvRunConfig>& configs) {
  bool need = false;
  for (const auto& c : configs) {
    need = need || NeedsKvQuantCalibration(c.cache.k_codec) ||
           NeedsKvQuantCalibration(c.cache.v_codec) ||
           (c.cache.sink_tokens > 0 && NeedsKvQuantCalibration(c.cache.sink_codec));
    for (const auto* lay : {&c.cache.k_codec_layer, &c.cache.v_codec_layer}) {
      for (const auto& s : *lay) need = need || NeedsKvQuantCalibration(s);  // k@L= / v@L=
    }
  }
  KVC_RETURN_IF_ERROR(EnsurePredictCalibration(m, model_path, configs).status());
  if (!need || std::getenv("KVC_KVQUANT_CALIB")) return std::string();
  if (!m.kv_smooth_desc().empty()) {
    // The file beside the model holds thresholds of the plain keys; folded smoothing rescales
    // every key channel, so those thresholds would clamp the wrong ranges.
    return InvalidArgument("kvquant keys with --kv-smooth: the calibration beside the model is for "
                           "the unsmoothed keys; drop --kv-smooth (KVQuant's per-channel ranges make "
                           "smoothing redundant for its keys) or pass kvquant:calib=FILE made on the "
                           "smoothed model");
  }
  const std::string path = KvQuantCalibrationPath(model_path);
  bool make = !std::filesystem::exists(path);
  if (!make) {  // a file of an older format (no Q-Norm constants / outlier percentage): redo it
    auto old = kv::LoadCalibrationJson(path);
    make = old.ok() && !kv::IsCurrentKvQuantCalibration(*old);
    if (make) fmt::print(stderr, "kvquant: {} is an older calibration format; recalibrating\n", path);
  }
  if (make) {
    const std::string book = "pg1342_pride_and_prejudice_austen.txt";
    std::string text_path;
    KVC_ASSIGN_OR_RETURN(text_path, FindPg19Book(book, "kvquant calibration"));
    KVC_ASSIGN_OR_RETURN(const std::string text, ReadTextFile(text_path));
    // Skip the Gutenberg header; 2 x 1,024 tokens.
    KVC_ASSIGN_OR_RETURN(auto toks, TokenizeText(m, text.substr(std::min<size_t>(20000, text.size() / 4))));
    fmt::print(stderr, "kvquant: calibrating on {} (2 x 1024 tokens) -> {}\n", book, path);
    KVC_ASSIGN_OR_RETURN(auto samples, CollectKvQuantSamples(m, toks, 1024, 2, "pg19 " + book));
    KVC_ASSIGN_OR_RETURN(auto cal, kv::CalibrateKvQuant(samples));
    KVC_RETURN_IF_ERROR(kv::SaveCalibrationJson(cal, path));
  }
  setenv("KVC_KVQUANT_CALIB", path.c_str(), 1);
  return path;
}

}  // namespace kvc
