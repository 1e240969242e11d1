#include "runner.h"

#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <ctime>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <set>
#include <sstream>

#include <fmt/format.h>

namespace kvc {

StatusOr<std::string> ReadTextFile(const std::string& path) {
  std::error_code ec;
  if (std::filesystem::is_directory(path, ec)) {
    return InvalidArgument(fmt::format("text file '{}' is a directory", path));
  }
  std::ifstream f(path, std::ios::binary);
  if (!f) return NotFound(fmt::format("cannot open text file '{}'", path));
  std::stringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

StatusOr<std::vector<int32_t>> TokenizeText(const Model& m, const std::string& text) {
  if (text.empty()) return InvalidArgument("the text is empty");
  return m.tokenizer().Encode(text, /*add_bos=*/false, /*parse_special=*/false);
}

Status ScoreChunk(Session& s, const int32_t* tokens, int64_t n_ctx, bool keep_logprobs,
                  ChunkScores* out) {
  s.Reset();
  const int n_vocab = s.model().config().n_vocab;
  std::vector<int32_t> chunk(tokens, tokens + n_ctx);
  const int64_t first = n_ctx / 2;
  const int64_t n_scored = n_ctx - 1 - first;
  out->nll.assign(n_scored, 0.f);
  out->argmax.assign(n_scored, 0);
  if (keep_logprobs) out->logprobs.assign(size_t(n_scored) * n_vocab, 0.f);
  else out->logprobs.clear();
  // Evaluate in micro-batches, keeping logits only for the scored half.
  const int nb = s.options().n_batch;
  std::vector<float> logits;
  for (int64_t i = 0; i < n_ctx; i += nb) {
    const int64_t e = std::min<int64_t>(n_ctx, i + nb);
    std::vector<int32_t> part(chunk.begin() + i, chunk.begin() + e);
    const bool need = e > first;
    KVC_RETURN_IF_ERROR(s.Eval(part, need, need ? &logits : nullptr));
    if (!need) continue;
    for (int64_t j = std::max(i, first); j < std::min(e, n_ctx - 1); ++j) {
      const float* lg = &logits[size_t(j - i) * n_vocab];
      float mx = lg[0];
      int32_t am = 0;
      for (int v = 1; v < n_vocab; ++v) {
        if (lg[v] > mx) { mx = lg[v]; am = v; }
      }
      double sum = 0;
      for (int v = 0; v < n_vocab; ++v) sum += std::exp(double(lg[v] - mx));
      const double lse = mx + std::log(sum);
      const int64_t r = j - first;
      out->nll[r] = float(lse - lg[chunk[j + 1]]);
      out->argmax[r] = am;
      if (keep_logprobs) {
        float* lp = &out->logprobs[size_t(r) * n_vocab];
        for (int v = 0; v < n_vocab; ++v) lp[v] = float(lg[v] - lse);
      }
    }
  }
  return Status::Ok();
}

static size_t ReadStatusKb(const char* key) {
  std::ifstream f("/proc/self/status");
  std::string line;
  while (std::getline(f, line)) {
    if (line.rfind(key, 0) == 0) return size_t(std::stoll(line.substr(std::strlen(key)))) * 1024;
  }
  return 0;
}
size_t PeakRssBytes() { return ReadStatusKb("VmHWM:"); }
size_t CurrentRssBytes() { return ReadStatusKb("VmRSS:"); }

static std::string FirstExisting(const std::vector<std::string>& cands) {
  for (const auto& c : cands) {
    if (std::filesystem::exists(c)) return c;
  }
  return cands.front();
}

#ifndef KVC_SOURCE_DIR
#define KVC_SOURCE_DIR "."
#endif

std::string DefaultModelPath() {
  const std::string f = "models/SmolLM2-135M-Instruct.Q4_1.gguf";
  return FirstExisting({f, std::string(KVC_SOURCE_DIR) + "/" + f});
}

std::string DefaultTextPath() {
  const std::string f = "shared/data/wikitext-2-raw/wiki.test.raw";
  return FirstExisting({"../" + f, std::string(KVC_SOURCE_DIR) + "/../" + f, f});
}

int32_t SampleGenerateToken(const std::vector<float>& logits, float temp, float top_p, std::mt19937& rng) {
  if (temp <= 0) return int32_t(std::max_element(logits.begin(), logits.end()) - logits.begin());
  const int nv = int(logits.size());
  std::vector<std::pair<float, int32_t>> p(nv);
  float mx = *std::max_element(logits.begin(), logits.end());
  double sum = 0;
  for (int v = 0; v < nv; ++v) {
    p[v] = {float(std::exp((logits[v] - mx) / temp)), v};
    sum += p[v].first;
  }
  std::sort(p.begin(), p.end(), [](auto& a, auto& b) { return a.first > b.first || (a.first == b.first && a.second < b.second); });
  double cum = 0;
  size_t keep = 0;
  while (keep < p.size() && cum < top_p * sum) cum += p[keep++].first;
  std::uniform_real_distribution<double> u(0, cum);
  double r = u(rng), acc = 0;
  int32_t next = p[keep - 1].second;
  for (size_t j = 0; j < keep; ++j) {
    acc += p[j].first;
    if (acc >= r) { next = p[j].second; break; }
  }
  return next;
}

double NowSeconds() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

double ProcessCpuSeconds() {
  timespec ts{};
  clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
  return double(ts.tv_sec) + 1e-9 * double(ts.tv_nsec);
}

Progress::Progress(std::string label, int64_t total)
    : label_(std::move(label)), total_(std::max<int64_t>(total, 1)), tty_(isatty(2)), t0_(NowSeconds()) {}

void Progress::Step(int64_t n, const std::string& note) {
  done_ += n;
  if (!tty_) return;
  const int width = 30;
  const int fill = int(width * std::min<int64_t>(done_, total_) / total_);
  const double el = NowSeconds() - t0_;
  const double eta = done_ > 0 ? el * (total_ - done_) / done_ : 0;
  std::fprintf(stderr, "\r%s [%s%s] %lld/%lld %5.0fs eta %4.0fs %-40.40s", label_.c_str(),
               std::string(fill, '#').c_str(), std::string(width - fill, '.').c_str(),
               (long long)done_, (long long)total_, el, eta, note.c_str());
  std::fflush(stderr);
}

Progress::~Progress() {
  if (tty_) std::fprintf(stderr, "\n");
}

}  // namespace kvc
