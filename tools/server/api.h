// The OpenAI-compatible API surface of `kvcrunch serve`, without any HTTP or engine: parsing and
// validating request bodies into engine terms, the per-request KV extension checked against what
// the server allows, error objects with their HTTP status, response and stream-chunk JSON, SSE
// framing, the Prometheus text exposition of engine::Stats, and the API-key compare. Everything
// here is a pure function of its inputs, so tests/unit/server_api_test.cc covers it without a model.
#pragma once

#include <array>
#include <cstdint>
#include <map>
#include <optional>
#include <set>
#include <string>
#include <string_view>
#include <vector>

#include <nlohmann/json.hpp>

#include "engine/engine.h"
#include "engine/text_stream.h"
#include "kvcrunch/status.h"
#include "runner.h"
#include "tokenizer/tokenizer.h"

namespace kvc::server {

using nlohmann::json;

// An OpenAI-style error: {"error": {"message", "type", "param", "code"}} with its HTTP status.
// param and code are null when empty.
struct ApiError {
  int status = 400;
  std::string type = "invalid_request_error";
  std::string message;
  std::string param;
  std::string code;
};
json ErrorBody(const ApiError& e);
ApiError BadRequest(std::string message, std::string param = "", std::string code = "");
// engine::Engine::Submit's status codes → HTTP:
//   INVALID_ARGUMENT → 400 invalid_request_error; OUT_OF_RANGE → 400 with code
//   context_length_exceeded; RESOURCE_EXHAUSTED → 429 rate_limit_error (code queue_full);
//   UNAVAILABLE-like (the engine is shutting down) → 503 unavailable_error; anything else → 500.
ApiError ErrorFromStatus(const Status& s, std::string param = "");

// Which KV settings a request may choose ("kv" extension field), over the server's defaults.
class KvPolicy {
 public:
  // allow: "" (only the defaults), "any" (every registered codec and policy), or a comma list of
  // codec names and eviction-policy names (aliases allowed: "q4_0,turbo3,kivi2,snapkv,streaming").
  // INVALID_ARGUMENT for a name that is neither a codec, an alias nor a policy.
  static StatusOr<KvPolicy> Make(KvRunConfig defaults, const std::string& allow);
  // A request's "kv" object: {"k": SPEC, "v": SPEC, "evict": SPEC|"none", "sinks": N,
  // "sink_codec": SPEC, "pos": MODE}; absent keys keep the defaults. Specs may carry parameters
  // ("kivi:bits=2"), except ones that name files (file=, calib=, path=): a request must not make
  // the server read its disk. Transforms are the server's (--kv-transform-k/v) only.
  bool Resolve(const json& kv, KvRunConfig* out, ApiError* err) const;
  const KvRunConfig& defaults() const { return defaults_; }
  // "f16, q4_0, snapkv" or "any" (for error messages and the start-up log).
  std::string AllowedList() const;
  // Every codec spec a client may name (defaults and the allowed names), for start-up capacity.
  std::vector<std::string> AllowedCodecs() const;

 private:
  bool CodecAllowed(const std::string& spec) const;
  bool PolicyAllowed(const std::string& spec) const;
  KvRunConfig defaults_;
  bool any_ = false;
  std::set<std::string> codecs_;    // base names ("q4_0", "kivi") and alias names ("kivi2")
  std::set<std::string> policies_;  // base names
  std::vector<std::string> allowed_names_;  // as given, for messages
};

struct Limits {
  int64_t n_ctx = 4096;           // per sequence (engine option)
  int32_t n_vocab = 0;
  int default_max_tokens = 256;   // max_tokens when the request gives none (capped by n_ctx)
};

// One /v1/completions or /v1/chat/completions request, validated, before tokenization.
struct CompletionRequest {
  bool chat = false;
  std::string model;                 // as sent (echoed only as our own model id)
  std::string prompt;                // completions: prompt text
  std::vector<int32_t> prompt_ids;   // completions: prompt given as token ids
  bool prompt_is_ids = false;
  std::vector<ChatMessage> messages; // chat
  bool stream = false;
  bool include_usage = false;        // stream_options.include_usage
  std::optional<int64_t> max_tokens; // as sent (max_tokens, or max_completion_tokens for chat)
  engine::GenerationParams gen;      // sampling, stop, ignore_eos; max_tokens set by FinishMaxTokens
  bool seed_given = false;
  KvRunConfig kv;                    // resolved KV settings
};

// Types, ranges, required fields. Unknown fields are ignored (extensions); known fields of the
// wrong type are a 400 naming the field. Does not tokenize.
bool ParseCompletion(const json& body, bool chat, const Limits& lim, const KvPolicy& kv,
                     CompletionRequest* out, ApiError* err);
// Parses body text as a JSON object: 400 "malformed JSON" (with the parser's position) otherwise.
bool ParseJsonObject(std::string_view body, json* out, ApiError* err);
// After tokenization: sets gen.max_tokens (the request's, or the default capped by what the
// context leaves), 400 context_length_exceeded when the prompt alone fills the context without
// an eviction policy. The engine checks prompt + max_tokens against n_ctx itself.
bool FinishMaxTokens(CompletionRequest* r, int64_t n_prompt, const Limits& lim, ApiError* err);

// --- responses ---------------------------------------------------------------------------------

struct ResponseMeta {
  std::string id;       // "cmpl-…" / "chatcmpl-…"
  int64_t created = 0;  // unix seconds
  std::string model;    // the served model id
  bool chat = false;
};
// "stop" / "length" for those reasons; cancelled and error requests are not answered with a
// completion object (the server sends an error instead).
const char* OpenAiFinishReason(engine::FinishReason r);
// usage: prompt/completion/total tokens, prompt_tokens_details.cached_tokens (always 0: no
// prefix cache).
json UsageJson(const engine::RequestUsage& u);
// The KV extension beside usage: codecs, policy, bytes reserved and peak, bits per value,
// preemptions.
json KvJson(const engine::RequestUsage& u, const KvRunConfig& kv);
json CompletionJson(const ResponseMeta& m, const std::string& text, engine::FinishReason reason,
                    const engine::RequestUsage& u, const KvRunConfig& kv);
// One streamed chunk: chat.completion.chunk (delta) or text_completion (text). role_only: the
// first chat chunk, delta {"role": "assistant", "content": ""}. finish: kNone for none (null).
json ChunkJson(const ResponseMeta& m, const std::string& text, engine::FinishReason finish,
               bool role_only, bool include_usage);
// The last chunk with stream_options.include_usage: empty choices, usage and kv.
json UsageChunkJson(const ResponseMeta& m, const engine::RequestUsage& u, const KvRunConfig& kv);
// JSON text; invalid UTF-8 (a token boundary inside a character at the very end) is replaced
// with U+FFFD rather than throwing.
std::string Dump(const json& j);
// "data: <json>\n\n"; SseDone() is "data: [DONE]\n\n".
std::string SseFrame(const json& j);
inline const char* SseDone() { return "data: [DONE]\n\n"; }

// --- metrics -----------------------------------------------------------------------------------

// Counters the HTTP layer keeps (the engine keeps the rest).
struct HttpCounters {
  int64_t active = 0;                    // inference requests being served now
  int64_t active_peak = 0;
  int64_t refused_connections = 0;       // 503: over --max-connections
  std::map<int, int64_t> responses;      // by HTTP status
  int64_t disconnects = 0;               // clients gone before their request finished
};
// Prometheus text exposition format 0.0.4 (# HELP, # TYPE, cumulative le buckets, _sum, _count),
// every series labelled model_name. Names mirror vLLM's with the kvcrunch: prefix.
std::string RenderMetrics(const engine::Stats& s, const HttpCounters& h, const std::string& model);
// The stored-KV counters (kv_store.h), same conventions.
struct StoreCounters;
std::string RenderStoreMetrics(const StoreCounters& c, const std::string& model);

// --- flags -------------------------------------------------------------------------------------

// "536870912", "512MiB", "512M", "1GiB", "1.5G", "64KiB" (binary units; K/M/G/T with or without
// "iB"/"B"). INVALID_ARGUMENT for anything else, zero, or more than 2^50 bytes.
StatusOr<int64_t> ParseByteSize(const std::string& text);

// --- auth --------------------------------------------------------------------------------------

using Digest = std::array<uint8_t, 32>;
Digest Sha256(std::string_view s);
// The key from "Authorization: Bearer <key>" ("" when absent or another scheme).
std::string BearerToken(std::string_view authorization_header);
// Constant-time in the presented key and in which key matches: the SHA-256 of the presented key
// is compared with every configured key's digest, all 32 bytes, no early exit.
bool KeyMatches(std::string_view presented, const std::vector<Digest>& keys);

}  // namespace kvc::server
