// `kvcrunch retrieval`: what eviction does to a model (spec-eviction-lowrank-eval.md §10, §11).
//   sinks     : share of attention mass each layer puts on its first tokens (AttnStatsRequest)
//   passkey   : Landmark/LongLoRA passkey prompt, 5-digit key, greedy, exact match;
//               --question-apart: kvpress protocol (prefill + compress the context, then the
//               question); --dump-prompts FILE writes every trial's token ids (JSON) so a peer
//               (bench/compare/kvpress_passkey.py) runs the very same prompts
//   needle    : numeric needle in a PG-19 book, greedy, string containment
//   streaming : token-by-token perplexity over a text with the policy applied every step
//               (StreamingLLM protocol); reports the largest cache ever held
//   prefix    : prefix-compress perplexity: prefill P tokens, compress, score the next C tokens
//               as one chunk against the compressed prefix
//   speed     : decode tokens/s after an n-token prompt
//   reuse     : compress a context once, answer several passkey questions from the same cache
//               (KvCache::TruncateAfter between questions) vs a fresh prefill per question
// Every row carries the configuration label, token counts and KV bytes; --json prints them all.
#pragma once

#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "runner.h"

namespace CLI {
class App;
}

namespace kvc {

struct RetrievalArgs {
  std::string task = "passkey";
  std::vector<std::string> configs;   // run configs (ParseRunConfig); "" or "full" = f16 baseline
  std::vector<int> lengths = {1024, 2048};
  std::vector<double> depths = {0, 0.25, 0.5, 0.75, 1.0};
  int seeds = 3;
  std::string text;                   // text file (needle haystack / streaming / prefix)
  int64_t n_tokens = 2000;            // streaming: tokens scored; speed: prompt length
  int prefix = 1024, score = 256, windows = 4;  // prefix-compress protocol
  int n_decode = 32;                  // speed: decode steps timed
  int micro_batch = 1;                // streaming: tokens per forward call (1 = token by token)
  int64_t segment = 10000;            // streaming: tokens per reported perplexity segment
  std::string dump_prompts;           // passkey: write the trials (token ids, key) as JSON here
  bool question_apart = false;        // passkey: context evaluated (and compressed) before the question
  bool json = false;
};

// Adds the `retrieval` subcommand (its flags bound to *args).
CLI::App* AddRetrievalCommand(CLI::App& app, RetrievalArgs* args);

// Runs the task; JSON with one entry per row (and a summary per configuration).
StatusOr<nlohmann::json> RunRetrieval(const Model& model, const RetrievalArgs& args);
std::string FormatRetrieval(const nlohmann::json& j);

// Passkey prompt text with the key at `depth` in [0, 1], about n_tokens tokens long.
StatusOr<std::vector<int32_t>> PasskeyPrompt(const Model& m, int n_tokens, double depth, int key);

// The same prompt split as kvpress splits it: context (task description + haystack with the
// needle) and question (" What is the pass key? The pass key is"), tokenized separately.
// context + question equals PasskeyPrompt's tokens for the same arguments (the question starts
// a new pre-token, so the split does not change the BPE; tested).
struct PasskeyParts {
  std::vector<int32_t> context, question;
};
StatusOr<PasskeyParts> PasskeyPromptParts(const Model& m, int n_tokens, double depth, int key);

// One passkey trial of the (length, depth, seed) grid: the key is a pure function of the three.
struct PasskeyTrial {
  int length = 0;
  double depth = 0;
  int seed = 0;
  int key = 0;
  PasskeyParts parts;
};
StatusOr<std::vector<PasskeyTrial>> PasskeyTrials(const Model& m, const RetrievalArgs& a);
nlohmann::json PasskeyTrialsJson(const std::vector<PasskeyTrial>& trials);

}  // namespace kvc
