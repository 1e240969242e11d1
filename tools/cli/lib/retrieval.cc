#include "retrieval.h"

#include <algorithm>
#include <cmath>
#include <fstream>
#include <random>
#include <sstream>

#include <CLI/CLI.hpp>
#include <fmt/format.h>

#include "calibrate.h"
#include "kv/policies/common.h"
#include "kv/policy.h"
#include "model/model.h"

namespace kvc {
namespace {

using nlohmann::json;

StatusOr<KvRunConfig> ConfigOf(const std::string& s, const kv::KvShape& shape) {
  if (s.empty() || s == "full") {
    KvRunConfig c;
    c.name = "full";
    return c;
  }
  KVC_ASSIGN_OR_RETURN(KvRunConfig c, ParseRunConfig(s));
  KVC_RETURN_IF_ERROR(FitLayerOverrides(&c, shape));
  return c;
}

StatusOr<std::unique_ptr<Session>> NewSession(const Model& m, const KvRunConfig& c, int64_t n_ctx) {
  Session::Options o;
  o.n_ctx = n_ctx;
  o.n_batch = 512;
  return Session::Create(m, c.cache, c.evict, o);
}

int32_t Argmax(const std::vector<float>& logits, int n_vocab, int row = 0) {
  const float* p = logits.data() + size_t(row) * n_vocab;
  return int32_t(std::max_element(p, p + n_vocab) - p);
}

// Greedy continuation of the prompt already evaluated (logits of its last token given).
StatusOr<std::string> Greedy(Session& s, std::vector<float> logits, int n) {
  const Model& m = s.model();
  std::string out;
  for (int i = 0; i < n; ++i) {
    const int32_t t = Argmax(logits, m.config().n_vocab);
    if (m.tokenizer().IsEog(t)) break;
    out += m.tokenizer().TokenToPiece(t);
    if (i + 1 < n) KVC_RETURN_IF_ERROR(s.Eval({t}, false, &logits));
  }
  return out;
}

double Nll(const float* logits, int n_vocab, int32_t target) {
  double mx = -1e300;
  for (int v = 0; v < n_vocab; ++v) mx = std::max(mx, double(logits[v]));
  double sum = 0;
  for (int v = 0; v < n_vocab; ++v) sum += std::exp(double(logits[v]) - mx);
  return std::log(sum) + mx - double(logits[target]);
}

struct CacheUse {
  size_t kv_bytes = 0;
  int64_t max_cells = 0;  // largest (layer, head) cell count
};
CacheUse Use(const kv::KvCache& c) {
  CacheUse u;
  u.kv_bytes = c.Memory().KvBytes();
  for (int l = 0; l < c.shape().n_layer; ++l) {
    for (int h = 0; h < c.shape().n_head_kv; ++h) u.max_cells = std::max(u.max_cells, c.n_cells(l, h));
  }
  return u;
}

constexpr const char* kFiller =
    " The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again.";

StatusOr<json> Sinks(const Model& m, const std::vector<int32_t>& toks, int n) {
  KvRunConfig c;
  KVC_ASSIGN_OR_RETURN(auto s, NewSession(m, c, n + 1));
  kv::AttnStatsRequest r;
  r.accumulate = true;
  s->cache().SetStatsRequest(r);
  std::vector<int32_t> p(toks.begin(), toks.begin() + std::min<size_t>(n, toks.size()));
  KVC_RETURN_IF_ERROR(s->Eval(p, false, nullptr));
  json rows = json::array();
  const auto& cache = s->cache();
  const int nl = cache.shape().n_layer, nkv = cache.shape().n_head_kv;
  for (int l = 0; l < nl; ++l) {
    double first1 = 0, first4 = 0, total = 0;
    for (int h = 0; h < nkv; ++h) {
      auto& acc = const_cast<kv::KvCache&>(cache).acc_scores(l, h);
      for (size_t i = 0; i < acc.size(); ++i) {
        total += acc[i];
        if (i < 4) first4 += acc[i];
        if (i < 1) first1 += acc[i];
      }
    }
    rows.push_back({{"layer", l}, {"mass_first1", first1 / total}, {"mass_first4", first4 / total},
                    {"uniform_first4", 4.0 * std::log(double(p.size())) / double(p.size())}});
  }
  return json{{"task", "sinks"}, {"n_tokens", p.size()}, {"rows", rows},
              {"note", "mass = Σ over all query rows of attention to the first tokens / rows; "
                       "uniform_first4 ≈ the share under uniform causal attention"}};
}

}  // namespace

StatusOr<std::vector<int32_t>> PasskeyPrompt(const Model& m, int n_tokens, double depth, int key) {
  const std::string head =
      "There is an important info hidden inside a lot of irrelevant text. Find it and memorize "
      "them. I will quiz you about the important information there.";
  const std::string needle =
      fmt::format(" The pass key is {0}. Remember it. {0} is the pass key.", key);
  const std::string tail = " What is the pass key? The pass key is";
  KVC_ASSIGN_OR_RETURN(auto ft, m.tokenizer().Encode(kFiller, false, false));
  KVC_ASSIGN_OR_RETURN(auto ht, m.tokenizer().Encode(head + needle + tail, false, false));
  const int reps = std::max(0, int((n_tokens - int(ht.size())) / int(std::max<size_t>(ft.size(), 1))));
  const int before = int(std::lround(depth * reps));
  std::string text = head;
  for (int i = 0; i < before; ++i) text += kFiller;
  text += needle;
  for (int i = before; i < reps; ++i) text += kFiller;
  text += tail;
  return m.tokenizer().Encode(text, false, false);
}

StatusOr<PasskeyParts> PasskeyPromptParts(const Model& m, int n_tokens, double depth, int key) {
  // Same text as PasskeyPrompt; the question is tokenized on its own (kvpress pipeline split).
  KVC_ASSIGN_OR_RETURN(auto joint, PasskeyPrompt(m, n_tokens, depth, key));
  const std::string tail = " What is the pass key? The pass key is";
  KVC_ASSIGN_OR_RETURN(auto qt, m.tokenizer().Encode(tail, false, false));
  PasskeyParts p;
  p.question = qt;
  if (joint.size() > qt.size() && std::equal(qt.begin(), qt.end(), joint.end() - qt.size())) {
    p.context.assign(joint.begin(), joint.end() - qt.size());
    return p;
  }
  return Internal("passkey prompt: the question's tokens are not a suffix of the joint prompt");
}

StatusOr<std::vector<PasskeyTrial>> PasskeyTrials(const Model& m, const RetrievalArgs& a) {
  std::vector<PasskeyTrial> out;
  for (int len : a.lengths) {
    for (double d : a.depths) {
      for (int seed = 0; seed < a.seeds; ++seed) {
        std::mt19937 rng(uint32_t(1000 * len + 100 * seed + int(d * 97)));
        PasskeyTrial t;
        t.length = len;
        t.depth = d;
        t.seed = seed;
        t.key = std::uniform_int_distribution<int>(10000, 99999)(rng);
        KVC_ASSIGN_OR_RETURN(t.parts, PasskeyPromptParts(m, len, d, t.key));
        out.push_back(std::move(t));
      }
    }
  }
  return out;
}

nlohmann::json PasskeyTrialsJson(const std::vector<PasskeyTrial>& trials) {
  nlohmann::json rows = nlohmann::json::array();
  for (const auto& t : trials) {
    rows.push_back({{"length", t.length}, {"depth", t.depth}, {"seed", t.seed}, {"key", t.key},
                    {"expected", std::to_string(t.key)},
                    {"n_context", t.parts.context.size()}, {"n_question", t.parts.question.size()},
                    {"context_ids", t.parts.context}, {"question_ids", t.parts.question}});
  }
  return {{"format", "kvcrunch-passkey-prompts/1"},
          {"protocol",
           "context_ids = task description + filler haystack with the needle; question_ids = ' What "
           "is the pass key? The pass key is' (tokenized on its own; context_ids + question_ids = the "
           "joint prompt). No BOS (SmolLM2 add_bos_token = false). Greedy, 8 new tokens, stop at EOG; "
           "correct = the output with leading spaces removed starts with `expected`."},
          {"answer_tokens", 8},
          {"trials", rows}};
}

namespace {

StatusOr<json> Passkey(const Model& m, const RetrievalArgs& a, const KvRunConfig& c,
                       const std::vector<PasskeyTrial>& trials) {
  json rows = json::array();
  int ok = 0, n = 0;
  for (const PasskeyTrial& t : trials) {
    const auto& ctx = t.parts.context;
    const auto& q = t.parts.question;
    std::vector<int32_t> p = ctx;
    p.insert(p.end(), q.begin(), q.end());
    KVC_ASSIGN_OR_RETURN(auto s, NewSession(m, c, int64_t(p.size()) + 16));
    std::vector<float> logits;
    json extra = json::object();
    if (a.question_apart) {
      // kvpress pipeline protocol: the policy sees (and compresses after) the context only; the
      // question follows as a second prompt (use once=1 so a prefill policy does not compress again).
      KVC_RETURN_IF_ERROR(s->Eval(ctx, false, nullptr));
      const CacheUse uc = Use(s->cache());
      extra = {{"kv_bytes_after_context", uc.kv_bytes}, {"max_cells_after_context", uc.max_cells},
               {"removed_after_context", kv::RemovedFraction(s->cache())}};
      KVC_RETURN_IF_ERROR(s->Eval(q, false, &logits));
    } else {
      KVC_RETURN_IF_ERROR(s->Eval(p, false, &logits));
    }
    const CacheUse u = Use(s->cache());
    const double removed = kv::RemovedFraction(s->cache());
    KVC_ASSIGN_OR_RETURN(std::string out, Greedy(*s, logits, 8));
    std::string trimmed = out;
    trimmed.erase(0, trimmed.find_first_not_of(' '));
    const bool hit = trimmed.rfind(std::to_string(t.key), 0) == 0;
    ok += hit;
    ++n;
    json row{{"length", t.length}, {"n_prompt", p.size()}, {"n_context", ctx.size()},
             {"depth", t.depth}, {"seed", t.seed}, {"key", t.key}, {"output", out},
             {"correct", hit}, {"kv_bytes_after_prompt", u.kv_bytes}, {"max_cells", u.max_cells},
             {"removed", removed}};
    row.update(extra);
    rows.push_back(std::move(row));
  }
  return json{{"accuracy", n ? double(ok) / n : 0.0}, {"n", n},
              {"protocol", a.question_apart ? "question-apart" : "joint"}, {"rows", rows}};
}

StatusOr<json> Needle(const Model& m, const RetrievalArgs& a, const KvRunConfig& c,
                      const std::string& book) {
  json rows = json::array();
  int ok = 0, n = 0;
  const std::string q =
      "\nWhat is the special magic number mentioned in the text above? The special magic number is";
  for (int len : a.lengths) {
    for (double d : a.depths) {
      for (int seed = 0; seed < a.seeds; ++seed) {
        std::mt19937 rng(uint32_t(7 * len + 13 * seed + int(d * 89)));
        const int key = std::uniform_int_distribution<int>(1000000, 9999999)(rng);
        const std::string needle = fmt::format(" The special magic number is {}. ", key);
        // Haystack: ~4.2 chars/token of the book, starting at a seed-dependent offset.
        const size_t chars = size_t(len) * 4;
        const size_t off = std::min(book.size() - std::min(book.size(), chars),
                                    size_t(20000 + 50000 * seed));
        std::string hay = book.substr(off, chars);
        size_t at = size_t(d * hay.size());
        const size_t dot = hay.find(". ", at);
        at = dot == std::string::npos ? hay.size() : dot + 1;
        hay.insert(std::min(at, hay.size()), needle);
        KVC_ASSIGN_OR_RETURN(auto p, m.tokenizer().Encode(hay + q, false, false));
        if (int(p.size()) > len) {  // trim the haystack front to the length
          std::vector<int32_t> t(p.end() - len, p.end());
          p.swap(t);
        }
        KVC_ASSIGN_OR_RETURN(auto s, NewSession(m, c, int64_t(p.size()) + 16));
        std::vector<float> logits;
        KVC_RETURN_IF_ERROR(s->Eval(p, false, &logits));
        KVC_ASSIGN_OR_RETURN(std::string out, Greedy(*s, logits, 10));
        const bool hit = out.find(std::to_string(key)) != std::string::npos;
        ok += hit;
        ++n;
        rows.push_back({{"length", len}, {"n_prompt", p.size()}, {"depth", d}, {"seed", seed},
                        {"key", key}, {"output", out}, {"correct", hit},
                        {"kv_bytes_after_prompt", Use(s->cache()).kv_bytes}});
      }
    }
  }
  return json{{"accuracy", n ? double(ok) / n : 0.0}, {"n", n}, {"rows", rows}};
}

StatusOr<json> Streaming(const Model& m, const RetrievalArgs& a, const KvRunConfig& c,
                         const std::vector<int32_t>& toks) {
  // Teacher-forced: token i predicts token i+1. With micro_batch B > 1 the tokens go through the
  // model B at a time (all B rows scored); an eviction-for-space policy then frees B cells before
  // the write, so the first query of a micro-batch sees B-1 fewer old tokens than token-by-token.
  const int64_t n = std::min<int64_t>(a.n_tokens + 1, int64_t(toks.size()));
  const int B = a.micro_batch;
  KVC_ASSIGN_OR_RETURN(auto s, NewSession(m, c, n + 1));
  const int nv = m.config().n_vocab;
  std::vector<float> logits;
  double nll = 0, nll_late = 0, nll_seg = 0;
  int64_t scored = 0, late = 0, seg_n = 0;
  json segments = json::array();
  CacheUse peak;
  size_t min_bytes_late = SIZE_MAX, max_bytes_late = 0;
  const double t0 = NowSeconds();
  for (int64_t i = 0; i + 1 < n; i += B) {
    const int64_t b = std::min<int64_t>(B, n - 1 - i);
    KVC_RETURN_IF_ERROR(s->Eval(std::vector<int32_t>(toks.begin() + i, toks.begin() + i + b),
                                /*all_logits=*/b > 1, &logits));
    for (int64_t r = 0; r < b; ++r) {
      const double x = Nll(logits.data() + size_t(r) * nv, nv, toks[i + r + 1]);
      if (!std::isfinite(x)) return Internal(fmt::format("non-finite NLL at token {}", i + r));
      nll += x;
      ++scored;
      if (i + r >= 1024) { nll_late += x; ++late; }
      nll_seg += x;
      if (++seg_n == a.segment) {
        segments.push_back(std::exp(nll_seg / seg_n));
        nll_seg = 0;
        seg_n = 0;
      }
    }
    const CacheUse u = Use(s->cache());
    peak.kv_bytes = std::max(peak.kv_bytes, u.kv_bytes);
    peak.max_cells = std::max(peak.max_cells, u.max_cells);
    if (i >= 2048) {
      min_bytes_late = std::min(min_bytes_late, u.kv_bytes);
      max_bytes_late = std::max(max_bytes_late, u.kv_bytes);
    }
  }
  if (seg_n > 0) segments.push_back(std::exp(nll_seg / seg_n));
  const double dt = NowSeconds() - t0;
  json out{{"ppl", std::exp(nll / std::max<int64_t>(scored, 1))},
           // null when no token past position 1,024 was scored (a run of <= 1,024 tokens)
           {"ppl_after_1024", late ? json(std::exp(nll_late / late)) : json(nullptr)},
           {"n_scored", scored}, {"micro_batch", B}, {"segment_tokens", a.segment},
           {"ppl_by_segment", segments}, {"peak_kv_bytes", peak.kv_bytes},
           {"peak_cells_per_head", peak.max_cells}, {"tokens_per_second", scored / dt}};
  if (max_bytes_late > 0) {
    out["kv_bytes_after_2048_min"] = min_bytes_late;
    out["kv_bytes_after_2048_max"] = max_bytes_late;
  }
  return out;
}

StatusOr<json> Prefix(const Model& m, const RetrievalArgs& a, const KvRunConfig& c,
                      const std::vector<int32_t>& toks) {
  const int P = a.prefix, C = a.score, nv = m.config().n_vocab;
  double nll = 0;
  int64_t scored = 0;
  size_t kv_bytes = 0;
  double removed = 0;
  int w = 0;
  for (; w < a.windows && int64_t(w + 1) * (P + C) <= int64_t(toks.size()); ++w) {
    const int32_t* base = toks.data() + size_t(w) * (P + C);
    KVC_ASSIGN_OR_RETURN(auto s, NewSession(m, c, P + C + 1));
    KVC_RETURN_IF_ERROR(s->Eval(std::vector<int32_t>(base, base + P), false, nullptr));
    kv_bytes = std::max(kv_bytes, s->cache().Memory().KvBytes());
    removed += kv::RemovedFraction(s->cache());
    std::vector<float> logits;
    // The chunk predicts base[P+1 .. P+C-1] from rows 0..C-2, plus base[P] from the prefix's
    // last token, which is not re-fed: its row is the last prefill row, so start scoring at P+1.
    KVC_RETURN_IF_ERROR(s->Eval(std::vector<int32_t>(base + P, base + P + C), true, &logits));
    for (int i = 0; i + 1 < C; ++i) {
      nll += Nll(logits.data() + size_t(i) * nv, nv, base[P + i + 1]);
      ++scored;
    }
  }
  if (w == 0) return InvalidArgument("text too short for one prefix-compress window");
  return json{{"ppl", std::exp(nll / scored)}, {"n_scored", scored}, {"windows", w},
              {"prefix", P}, {"chunk", C}, {"kv_bytes_after_prefix", kv_bytes},
              {"removed", removed / w}};
}

StatusOr<json> Speed(const Model& m, const RetrievalArgs& a, const KvRunConfig& c,
                     const std::vector<int32_t>& toks) {
  const int64_t n = std::min<int64_t>(a.n_tokens, int64_t(toks.size()) - a.n_decode - 1);
  KVC_ASSIGN_OR_RETURN(auto s, NewSession(m, c, n + a.n_decode + 1));
  std::vector<float> logits;
  const double t0 = NowSeconds();
  KVC_RETURN_IF_ERROR(s->Eval(std::vector<int32_t>(toks.begin(), toks.begin() + n), false, &logits));
  const double t1 = NowSeconds();
  std::vector<double> lat;
  for (int i = 0; i < a.n_decode; ++i) {
    const double u = NowSeconds();
    KVC_RETURN_IF_ERROR(s->Eval({toks[n + i]}, false, &logits));  // teacher-forced decode
    lat.push_back(NowSeconds() - u);
  }
  std::vector<double> sorted = lat;
  std::sort(sorted.begin(), sorted.end());
  const double med = sorted.empty() ? 0 : sorted[sorted.size() / 2];
  return json{{"n_prompt", n}, {"prefill_tps", n / (t1 - t0)}, {"decode_steps", a.n_decode},
              {"decode_median_ms", med * 1e3}, {"decode_tps", med > 0 ? 1.0 / med : 0.0},
              {"kv_bytes", s->cache().Memory().KvBytes()}, {"max_cells", Use(s->cache()).max_cells}};
}

// Context reuse: one compressed context, several questions (TruncateAfter between them),
// against a fresh prefill per question. Context = passkey haystack without the question.
StatusOr<json> Reuse(const Model& m, const RetrievalArgs& a, const KvRunConfig& c) {
  json rows = json::array();
  int ok_reuse = 0, ok_fresh = 0, n = 0;
  const int len = a.lengths.empty() ? 1024 : a.lengths[0];
  const int key = 48213, key2 = 90517;
  KVC_ASSIGN_OR_RETURN(auto ctx_q, PasskeyPrompt(m, len, 0.3, key));
  // Split: context ends before " What is the pass key?"; two keys live in the context.
  const std::string q1 = " What is the pass key? The pass key is";
  const std::string q2 = " Repeat the pass key. The pass key is";
  KVC_ASSIGN_OR_RETURN(auto q1t, m.tokenizer().Encode(q1, false, false));
  KVC_ASSIGN_OR_RETURN(auto q2t, m.tokenizer().Encode(q2, false, false));
  std::vector<int32_t> ctx(ctx_q.begin(), ctx_q.end() - std::min(ctx_q.size(), q1t.size()));
  KVC_ASSIGN_OR_RETURN(auto s, NewSession(m, c, int64_t(ctx.size()) + 64));
  KVC_RETURN_IF_ERROR(s->Eval(ctx, false, nullptr));  // compressed once (prefill policies)
  const int64_t last = s->n_past() - 1;
  const size_t bytes_after = s->cache().Memory().KvBytes();
  (void)key2;
  for (const auto& qt : {q1t, q2t, q1t}) {
    std::vector<float> logits;
    KVC_RETURN_IF_ERROR(s->Eval(qt, false, &logits));
    KVC_ASSIGN_OR_RETURN(std::string out, Greedy(*s, logits, 8));
    KVC_RETURN_IF_ERROR(s->cache().TruncateAfter(last));
    // Fresh: context + question from scratch, same policy.
    KVC_ASSIGN_OR_RETURN(auto f, NewSession(m, c, int64_t(ctx.size()) + 64));
    std::vector<int32_t> full = ctx;
    full.insert(full.end(), qt.begin(), qt.end());
    KVC_RETURN_IF_ERROR(f->Eval(full, false, &logits));
    KVC_ASSIGN_OR_RETURN(std::string out_f, Greedy(*f, logits, 8));
    const bool h1 = out.find(std::to_string(key)) != std::string::npos;
    const bool h2 = out_f.find(std::to_string(key)) != std::string::npos;
    ok_reuse += h1;
    ok_fresh += h2;
    ++n;
    rows.push_back({{"reused_output", out}, {"fresh_output", out_f}, {"reused_correct", h1},
                    {"fresh_correct", h2}});
  }
  return json{{"n_context", ctx.size()}, {"kv_bytes_after_context", bytes_after},
              {"reuse_accuracy", double(ok_reuse) / n}, {"fresh_accuracy", double(ok_fresh) / n},
              {"rows", rows}};
}

}  // namespace

CLI::App* AddRetrievalCommand(CLI::App& app, RetrievalArgs* a) {
  auto* r = app.add_subcommand(
      "retrieval", "eviction evaluation: sinks | passkey | needle | streaming | prefix | speed | reuse");
  r->add_option("--task", a->task, "sinks, passkey, needle, streaming, prefix, speed or reuse");
  r->add_option("--config", a->configs, "KV configuration (repeatable; 'full' = f16 baseline)");
  r->add_option("--lengths", a->lengths, "prompt lengths in tokens (passkey, needle)")->delimiter(',');
  r->add_option("--depths", a->depths, "needle depths in [0, 1]")->delimiter(',');
  r->add_option("--seeds", a->seeds, "keys per (length, depth)");
  r->add_option("-f,--file", a->text, "text (default: the PG-19 books concatenated)");
  r->add_option("--n-tokens", a->n_tokens, "streaming: tokens scored; speed/sinks: prompt tokens");
  r->add_option("--prefix", a->prefix, "prefix-compress: P");
  r->add_option("--score", a->score, "prefix-compress: C");
  r->add_option("--windows", a->windows, "prefix-compress: windows");
  r->add_option("--n-decode", a->n_decode, "speed: decode steps");
  r->add_option("--micro-batch", a->micro_batch,
                "streaming: tokens per forward call (1 = token by token)")->check(CLI::Range(1, 512));
  r->add_option("--segment", a->segment, "streaming: tokens per reported perplexity segment")
      ->check(CLI::Range(int64_t(1), int64_t(1) << 40));
  r->add_option("--dump-prompts", a->dump_prompts,
                "passkey: write every trial's token ids and key as JSON (no --config: only that)");
  r->add_flag("--question-apart", a->question_apart,
              "passkey: prefill (and compress) the context, then the question (kvpress protocol; "
              "add once=1 to prefill policies)");
  r->add_flag("--json", a->json, "JSON output");
  return r;
}

static StatusOr<std::string> DefaultBooks() {
  std::string all;
  for (const char* f : {"pg1342_pride_and_prejudice_austen.txt", "pg2701_moby_dick_melville.txt",
                        "pg145_middlemarch_eliot.txt", "pg766_david_copperfield_dickens.txt"}) {
    for (const char* dir : {"../shared/data/pg19/", "/work/shared/data/pg19/"}) {
      auto t = ReadTextFile(std::string(dir) + f);
      if (t.ok()) {
        all += *t;
        all += "\n\n";
        break;
      }
    }
  }
  if (all.empty()) return NotFound("PG-19 books not found under ../shared/data/pg19 (give -f)");
  return all;
}

StatusOr<json> RunRetrieval(const Model& m, const RetrievalArgs& a) {
  std::string text;
  // Bad numbers are errors before any work (a negative size used to throw or loop).
  // Prompts are built in memory and prefilled whole: far beyond the trained context they only
  // measure extrapolation, and 100M tokens would exhaust memory before any output.
  const int64_t max_len = 16 * int64_t(m.config().n_ctx_train > 0 ? m.config().n_ctx_train : 8192);
  for (int len : a.lengths) {
    if (len < 16) return InvalidArgument(fmt::format("--lengths: {} is too short (>= 16 tokens)", len));
    if (len > max_len) {
      return InvalidArgument(fmt::format("--lengths: {} is more than 16x the model's trained "
                                         "context ({} tokens max)", len, max_len));
    }
  }
  for (double d : a.depths) {
    if (!(d >= 0.0 && d <= 1.0)) return InvalidArgument(fmt::format("--depths: {} is outside [0, 1]", d));
  }
  if (a.seeds < 1) return InvalidArgument("--seeds must be >= 1");
  if (a.n_tokens < 1) return InvalidArgument("--n-tokens must be >= 1");
  if (a.prefix < 1 || a.score < 1 || a.windows < 1) {
    return InvalidArgument("--prefix, --score and --windows must be >= 1");
  }
  if (a.n_decode < 0) return InvalidArgument("--n-decode must be >= 0");
  if (a.task != "passkey" && a.task != "reuse") {
    if (a.text.empty()) {
      KVC_ASSIGN_OR_RETURN(text, DefaultBooks());
    } else {
      KVC_ASSIGN_OR_RETURN(text, ReadTextFile(a.text));
    }
  }
  std::vector<int32_t> toks;
  if (a.task == "streaming" || a.task == "prefix" || a.task == "speed" || a.task == "sinks") {
    // Tokenize only what the task needs: ~4-5 chars per token, plus room for the books' leading
    // whitespace and headers (6 chars per token was too few for short requests).
    const int64_t need = a.task == "prefix" ? int64_t(a.windows) * (a.prefix + a.score)
                                            : a.n_tokens + a.n_decode + 2;
    KVC_ASSIGN_OR_RETURN(toks, TokenizeText(m, text.substr(0, size_t(need) * 8 + 65536)));
  }
  if (a.task == "sinks") return Sinks(m, toks, int(a.n_tokens));
  json out{{"task", a.task}, {"configs", json::array()}};
  if (!a.dump_prompts.empty() && a.task != "passkey") {
    return InvalidArgument("--dump-prompts is for --task passkey");
  }
  std::vector<PasskeyTrial> trials;
  if (a.task == "passkey") {
    KVC_ASSIGN_OR_RETURN(trials, PasskeyTrials(m, a));
    out["protocol"] = a.question_apart ? "question-apart" : "joint";
  }
  if (!a.dump_prompts.empty()) {
    std::ofstream f(a.dump_prompts);
    f << PasskeyTrialsJson(trials).dump() << "\n";
    f.close();
    if (!f) return Internal("cannot write --dump-prompts file " + a.dump_prompts);
    out["dumped"] = a.dump_prompts;
    out["n_trials"] = trials.size();
    if (a.configs.empty()) return out;
  }
  std::vector<std::string> cfgs = a.configs;
  if (cfgs.empty()) cfgs.push_back("full");
  // Every configuration must build before anything runs: a bad one is an error (non-zero exit),
  // not an error row.
  for (const auto& cs : cfgs) {
    KVC_ASSIGN_OR_RETURN(KvRunConfig c, ConfigOf(cs, m.kv_shape()));
    auto probe = kv::KvCache::Create(m.kv_shape(), c.cache);
    if (!probe.ok()) return Status(probe.status().code(), cs + ": " + probe.status().message());
    auto pol = kv::MakePolicy(c.evict, m.kv_shape());
    if (!pol.ok()) return Status(pol.status().code(), cs + ": " + pol.status().message());
    if (Status cal = CheckRunConfigCalibration(c, m); !cal.ok()) {
      return Status(cal.code(), cs + ": " + cal.message());
    }
  }
  for (const auto& cs : cfgs) {
    KVC_ASSIGN_OR_RETURN(KvRunConfig c, ConfigOf(cs, m.kv_shape()));
    StatusOr<json> r = InvalidArgument("unknown --task '" + a.task +
                                       "' (sinks, passkey, needle, streaming, prefix, speed, reuse)");
    const double t0 = NowSeconds();
    if (a.task == "passkey") r = Passkey(m, a, c, trials);
    else if (a.task == "needle") r = Needle(m, a, c, text);
    else if (a.task == "streaming") r = Streaming(m, a, c, toks);
    else if (a.task == "prefix") r = Prefix(m, a, c, toks);
    else if (a.task == "speed") r = Speed(m, a, c, toks);
    else if (a.task == "reuse") r = Reuse(m, a, c);
    if (!r.ok() && r.status().message().rfind("unknown --task", 0) == 0) return r.status();
    json row = r.ok() ? *r : json{{"error", r.status().ToString()}};
    row["config"] = cs.empty() ? "full" : cs;
    row["seconds"] = NowSeconds() - t0;
    out["configs"].push_back(row);
  }
  return out;
}

std::string FormatRetrieval(const json& j) {
  std::string s;
  if (j.value("task", "") == "sinks") {
    s += fmt::format("attention mass on the first tokens ({} tokens)\nlayer  first1  first4  uniform4\n",
                     j["n_tokens"].get<int64_t>());
    for (const auto& r : j["rows"]) {
      s += fmt::format("{:>5}  {:.3f}   {:.3f}   {:.3f}\n", r["layer"].get<int>(),
                       r["mass_first1"].get<double>(), r["mass_first4"].get<double>(),
                       r["uniform_first4"].get<double>());
    }
    return s;
  }
  if (j.contains("dumped")) {
    s += fmt::format("wrote {} passkey trials to {}\n", j["n_trials"].get<int64_t>(),
                     j["dumped"].get<std::string>());
  }
  for (const auto& r : j["configs"]) {
    s += fmt::format("{:<48}", r["config"].get<std::string>());
    for (const char* k : {"accuracy", "ppl", "ppl_after_1024", "n", "n_scored", "peak_cells_per_head",
                          "peak_kv_bytes", "kv_bytes_after_prefix", "removed", "decode_tps",
                          "decode_median_ms", "kv_bytes", "reuse_accuracy", "fresh_accuracy",
                          "kv_bytes_after_context", "tokens_per_second", "ppl_by_segment", "error"}) {
      if (r.contains(k)) s += fmt::format(" {}={}", k, r[k].dump());
    }
    s += "\n";
  }
  return s;
}

}  // namespace kvc
