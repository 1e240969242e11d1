#include "api.h"
#include "kv_store.h"

#include <openssl/evp.h>

#include <algorithm>
#include <cmath>
#include <sstream>

#include <fmt/format.h>

#include "kv/codec.h"
#include "kv/policy.h"

namespace kvc::server {

// --- errors ------------------------------------------------------------------------------------

json ErrorBody(const ApiError& e) {
  json err = {{"message", e.message}, {"type", e.type}, {"param", nullptr}, {"code", nullptr}};
  if (!e.param.empty()) err["param"] = e.param;
  if (!e.code.empty()) err["code"] = e.code;
  return json{{"error", std::move(err)}};
}

ApiError BadRequest(std::string message, std::string param, std::string code) {
  ApiError e;
  e.status = 400;
  e.message = std::move(message);
  e.param = std::move(param);
  e.code = std::move(code);
  return e;
}

ApiError ErrorFromStatus(const Status& s, std::string param) {
  ApiError e;
  e.message = s.message();
  e.param = std::move(param);
  switch (s.code()) {
    case StatusCode::kInvalidArgument:
    case StatusCode::kNotFound:
    case StatusCode::kUnimplemented:
      e.status = 400;
      e.type = "invalid_request_error";
      break;
    case StatusCode::kOutOfRange:
      e.status = 400;
      e.type = "invalid_request_error";
      e.code = "context_length_exceeded";
      break;
    case StatusCode::kResourceExhausted:
      e.status = 429;
      e.type = "rate_limit_error";
      e.code = "queue_full";
      break;
    case StatusCode::kDataLoss:  // uploaded KV bytes that fail verification
      e.status = 400;
      e.type = "invalid_request_error";
      e.code = "kv_corrupt";
      break;
    case StatusCode::kFailedPrecondition:
      e.status = 409;
      e.type = "invalid_request_error";
      e.code = "kv_mismatch";
      break;
    case StatusCode::kUnavailable:
      e.status = 503;
      e.type = "unavailable_error";
      break;
    default:
      e.status = 500;
      e.type = "server_error";
      break;
  }
  return e;
}

// --- KV policy ---------------------------------------------------------------------------------

namespace {

std::string BaseName(const std::string& spec) { return spec.substr(0, spec.find(':')); }

bool IsCodecName(const std::string& name) {
  for (const auto& c : kv::RegisteredCodecs()) {
    if (c.name == name) return true;
  }
  return kv::CodecAliases().count(name) > 0;
}

bool IsPolicyName(const std::string& name) {
  for (const auto& p : kv::RegisteredPolicies()) {
    if (p.name == name) return true;
  }
  return false;
}

// Spec parameters that name files: a request must not choose what the server reads.
bool NamesFile(const std::string& spec) {
  auto parsed = kv::ParseSpec(kv::ExpandAlias(spec));
  if (!parsed.ok()) return false;  // the engine rejects it with its own message
  for (const auto& [k, v] : parsed->params) {
    if (k == "file" || k == "calib" || k == "path") return true;
  }
  return false;
}

}  // namespace

StatusOr<KvPolicy> KvPolicy::Make(KvRunConfig defaults, const std::string& allow) {
  KvPolicy p;
  p.defaults_ = std::move(defaults);
  std::stringstream ss(allow);
  std::string name;
  while (std::getline(ss, name, ',')) {
    name.erase(0, name.find_first_not_of(" \t"));
    name.erase(name.find_last_not_of(" \t") + 1);
    if (name.empty()) continue;
    if (name == "any") {
      p.any_ = true;
      continue;
    }
    bool known = false;
    if (IsCodecName(name)) {
      p.codecs_.insert(name);
      p.codecs_.insert(BaseName(kv::ExpandAlias(name)));
      known = true;
    }
    if (IsPolicyName(name)) {
      p.policies_.insert(name);
      known = true;
    }
    if (!known) {
      return InvalidArgument(fmt::format("--kv-allow: '{}' is neither a codec, an alias nor an "
                                         "eviction policy (see `kvcrunch info`)", name));
    }
    p.allowed_names_.push_back(name);
  }
  return p;
}

bool KvPolicy::CodecAllowed(const std::string& spec) const {
  const auto& d = defaults_.cache;
  if (spec == d.k_codec || spec == d.v_codec || spec == d.sink_codec) return true;
  if (any_) return true;
  return codecs_.count(BaseName(spec)) > 0 || codecs_.count(BaseName(kv::ExpandAlias(spec))) > 0;
}

bool KvPolicy::PolicyAllowed(const std::string& spec) const {
  if (spec.empty() || spec == "none" || spec == defaults_.evict) return true;
  if (any_) return true;
  return policies_.count(BaseName(spec)) > 0;
}

std::string KvPolicy::AllowedList() const {
  if (any_) return "any registered codec and eviction policy";
  std::set<std::string> names = {defaults_.cache.k_codec, defaults_.cache.v_codec};
  if (!defaults_.evict.empty()) names.insert(defaults_.evict);
  for (const auto& n : allowed_names_) names.insert(n);
  std::string out;
  for (const auto& n : names) out += (out.empty() ? "" : ", ") + n;
  return out;
}

std::vector<std::string> KvPolicy::AllowedCodecs() const {
  std::vector<std::string> out = {defaults_.cache.k_codec};
  if (defaults_.cache.v_codec != defaults_.cache.k_codec) out.push_back(defaults_.cache.v_codec);
  for (const auto& n : allowed_names_) {
    if (IsCodecName(n) && std::find(out.begin(), out.end(), n) == out.end()) out.push_back(n);
  }
  return out;
}

bool KvPolicy::Resolve(const json& kvj, KvRunConfig* out, ApiError* err) const {
  *out = defaults_;
  if (kvj.is_null()) return true;
  if (!kvj.is_object()) {
    *err = BadRequest("'kv' must be an object, e.g. {\"k\": \"q4_0\", \"v\": \"q4_0\"}", "kv");
    return false;
  }
  auto spec_field = [&](const char* key, std::string* dst, bool codec) {
    auto it = kvj.find(key);
    if (it == kvj.end() || it->is_null()) return true;
    const std::string param = std::string("kv.") + key;
    if (!it->is_string() || it->get_ref<const std::string&>().empty() ||
        it->get_ref<const std::string&>().size() > 256) {
      *err = BadRequest(fmt::format("'{}' must be a non-empty spec string (at most 256 bytes)",
                                    param), param);
      return false;
    }
    std::string spec = it->get<std::string>();
    if (!codec && spec == "none") spec = "";
    if (NamesFile(spec)) {
      *err = BadRequest(fmt::format("'{}': spec '{}' names a file; file parameters are the "
                                    "server's (start-up flags), not a request's", param, spec),
                        param, "kv_not_allowed");
      return false;
    }
    const bool ok = codec ? CodecAllowed(spec) : PolicyAllowed(spec);
    if (!ok) {
      if (codec && !IsCodecName(BaseName(spec))) {
        *err = BadRequest(fmt::format("'{}': unknown codec '{}' (allowed here: {})", param, spec,
                                      AllowedList()), param, "kv_unknown");
      } else if (!codec && !IsPolicyName(BaseName(spec))) {
        *err = BadRequest(fmt::format("'{}': unknown eviction policy '{}' (allowed here: {})",
                                      param, spec, AllowedList()), param, "kv_unknown");
      } else {
        *err = BadRequest(fmt::format("'{}': '{}' is not allowed by this server (allowed: {}; "
                                      "see --kv-allow)", param, spec, AllowedList()),
                          param, "kv_not_allowed");
      }
      return false;
    }
    *dst = spec;
    return true;
  };
  if (!spec_field("k", &out->cache.k_codec, true)) return false;
  if (!spec_field("v", &out->cache.v_codec, true)) return false;
  if (!spec_field("sink_codec", &out->cache.sink_codec, true)) return false;
  if (!spec_field("evict", &out->evict, false)) return false;
  if (auto it = kvj.find("sinks"); it != kvj.end() && !it->is_null()) {
    if (!it->is_number_integer() || it->get<int64_t>() < 0 || it->get<int64_t>() > (1 << 20)) {
      *err = BadRequest("'kv.sinks' must be an integer in [0, 1048576]", "kv.sinks");
      return false;
    }
    out->cache.sink_tokens = int(it->get<int64_t>());
  }
  if (auto it = kvj.find("pos"); it != kvj.end() && !it->is_null()) {
    auto mode = it->is_string() ? kv::ParsePositionMode(it->get<std::string>())
                                : StatusOr<kv::PositionMode>(InvalidArgument("not a string"));
    if (!mode.ok()) {
      *err = BadRequest("'kv.pos' must be one of original, in-cache, rerotate", "kv.pos");
      return false;
    }
    out->cache.position_mode = *mode;
    out->cache.position_mode_set = true;
  }
  for (const char* banned : {"kt", "vt", "k_transform", "v_transform"}) {
    if (kvj.contains(banned)) {
      *err = BadRequest(fmt::format("'kv.{}': transforms are set by the server "
                                    "(--kv-transform-k/-v), not per request", banned),
                        std::string("kv.") + banned, "kv_not_allowed");
      return false;
    }
  }
  // Our own extension: a misspelt key must not silently fall back to the defaults.
  static const std::set<std::string> kKeys = {"k", "v", "evict", "sinks", "sink_codec", "pos"};
  for (const auto& [key, value] : kvj.items()) {
    if (!kKeys.count(key)) {
      *err = BadRequest(fmt::format("unknown key 'kv.{}' (k, v, evict, sinks, sink_codec, pos)",
                                    key), "kv." + key);
      return false;
    }
  }
  out->name.clear();
  return true;
}

// --- request parsing ---------------------------------------------------------------------------

bool ParseJsonObject(std::string_view body, json* out, ApiError* err) {
  try {
    *out = json::parse(body.begin(), body.end());
  } catch (const json::exception& e) {  // parse_error, and out_of_range for numbers like 1e400
    *err = BadRequest(fmt::format("malformed JSON body: {}", e.what()), "", "invalid_json");
    return false;
  }
  if (!out->is_object()) {
    *err = BadRequest("the request body must be a JSON object", "", "invalid_json");
    return false;
  }
  return true;
}

namespace {

const char* TypeName(const json& j) { return j.type_name(); }

// Field accessors: absent or null → false without error; wrong type → false with a 400.
struct Fields {
  const json& body;
  ApiError* err;
  bool failed = false;

  const json* Get(const char* key) const {
    auto it = body.find(key);
    if (it == body.end() || it->is_null()) return nullptr;
    return &*it;
  }
  void Fail(const char* key, const char* want, const json& got) {
    *err = BadRequest(fmt::format("'{}' must be {} (got {})", key, want, TypeName(got)), key);
    failed = true;
  }
  bool Bool(const char* key, bool* dst) {
    const json* j = Get(key);
    if (!j || failed) return false;
    if (!j->is_boolean()) return Fail(key, "a boolean", *j), false;
    *dst = j->get<bool>();
    return true;
  }
  bool Number(const char* key, double* dst) {
    const json* j = Get(key);
    if (!j || failed) return false;
    if (!j->is_number()) return Fail(key, "a number", *j), false;
    *dst = j->get<double>();
    return true;
  }
  bool Integer(const char* key, int64_t* dst) {
    const json* j = Get(key);
    if (!j || failed) return false;
    // 16.0 is accepted as 16 (JSON has one number type), 16.5 is not.
    if (j->is_number_float()) {
      const double d = j->get<double>();
      if (std::isfinite(d) && d == std::floor(d) && std::fabs(d) < 9.0e18) {
        *dst = int64_t(d);
        return true;
      }
    }
    if (j->is_number_unsigned() && j->get<uint64_t>() > uint64_t(INT64_MAX)) {
      *err = BadRequest(fmt::format("'{}' is out of range", key), key);
      failed = true;
      return false;
    }
    if (!j->is_number_integer()) return Fail(key, "an integer", *j), false;
    *dst = j->get<int64_t>();
    return true;
  }
  bool String(const char* key, std::string* dst) {
    const json* j = Get(key);
    if (!j || failed) return false;
    if (!j->is_string()) return Fail(key, "a string", *j), false;
    *dst = j->get<std::string>();
    return true;
  }
};

bool ParseStop(const json* j, std::vector<std::string>* out, ApiError* err) {
  if (!j) return true;
  if (j->is_string()) {
    out->push_back(j->get<std::string>());
  } else if (j->is_array()) {
    for (const auto& s : *j) {
      if (!s.is_string()) {
        *err = BadRequest("'stop' must be a string or an array of strings", "stop");
        return false;
      }
      out->push_back(s.get<std::string>());
    }
  } else {
    *err = BadRequest(fmt::format("'stop' must be a string or an array of strings (got {})",
                                  TypeName(*j)), "stop");
    return false;
  }
  if (Status st = engine::ValidateStops(*out); !st.ok()) {
    *err = BadRequest("'stop': " + st.message(), "stop");
    return false;
  }
  return true;
}

bool ParseMessages(const json* j, std::vector<ChatMessage>* out, ApiError* err) {
  if (!j) {
    *err = BadRequest("'messages' is required", "messages");
    return false;
  }
  if (!j->is_array() || j->empty()) {
    *err = BadRequest("'messages' must be a non-empty array of {role, content} objects",
                      "messages");
    return false;
  }
  for (size_t i = 0; i < j->size(); ++i) {
    const json& m = (*j)[i];
    const std::string where = fmt::format("messages[{}]", i);
    if (!m.is_object()) {
      *err = BadRequest(where + " must be an object with 'role' and 'content'", where);
      return false;
    }
    auto role = m.find("role");
    if (role == m.end() || !role->is_string()) {
      *err = BadRequest(where + ".role must be a string", where + ".role");
      return false;
    }
    ChatMessage cm;
    cm.role = role->get<std::string>();
    if (cm.role == "developer") cm.role = "system";  // OpenAI's newer name for system
    if (cm.role != "system" && cm.role != "user" && cm.role != "assistant") {
      *err = BadRequest(fmt::format("{}.role '{}' is not supported (system, user, assistant)",
                                    where, cm.role), where + ".role");
      return false;
    }
    auto content = m.find("content");
    if (content == m.end() || content->is_null()) {
      *err = BadRequest(where + ".content is required", where + ".content");
      return false;
    }
    if (content->is_string()) {
      cm.content = content->get<std::string>();
    } else if (content->is_array()) {
      for (size_t k = 0; k < content->size(); ++k) {
        const json& part = (*content)[k];
        auto type = part.is_object() ? part.find("type") : part.end();
        auto text = part.is_object() ? part.find("text") : part.end();
        if (!part.is_object() || type == part.end() || *type != "text" || text == part.end() ||
            !text->is_string()) {
          *err = BadRequest(fmt::format("{}.content[{}] must be {{\"type\": \"text\", \"text\": "
                                        "STRING}} (only text parts are supported)", where, k),
                            fmt::format("{}.content[{}]", where, k));
          return false;
        }
        cm.content += text->get<std::string>();
      }
    } else {
      *err = BadRequest(fmt::format("{}.content must be a string or an array of text parts "
                                    "(got {})", where, TypeName(*content)), where + ".content");
      return false;
    }
    out->push_back(std::move(cm));
  }
  return true;
}

bool ParsePrompt(const json* j, const Limits& lim, CompletionRequest* r, ApiError* err) {
  if (!j) {
    *err = BadRequest("'prompt' is required", "prompt");
    return false;
  }
  const json* p = j;
  // A batch of one prompt (["text"] or [[ids]]) is that prompt; larger batches are not served.
  if (p->is_array() && p->size() == 1 && ((*p)[0].is_string() || (*p)[0].is_array())) {
    p = &(*p)[0];
  } else if (p->is_array() && !p->empty() && ((*p)[0].is_string() || (*p)[0].is_array())) {
    *err = BadRequest("batched prompts (an array of several prompts) are not supported: send "
                      "one request per prompt", "prompt");
    return false;
  }
  if (p->is_string()) {
    r->prompt = p->get<std::string>();
    if (r->prompt.empty()) {
      *err = BadRequest("'prompt' is empty", "prompt");
      return false;
    }
    return true;
  }
  if (p->is_array()) {
    if (p->empty()) {
      *err = BadRequest("'prompt' is empty", "prompt");
      return false;
    }
    r->prompt_is_ids = true;
    r->prompt_ids.reserve(p->size());
    for (const auto& t : *p) {
      if (!t.is_number_integer() || t.get<int64_t>() < 0 || t.get<int64_t>() >= lim.n_vocab) {
        *err = BadRequest(fmt::format("'prompt' token ids must be integers in [0, {})",
                                      lim.n_vocab), "prompt");
        return false;
      }
      r->prompt_ids.push_back(int32_t(t.get<int64_t>()));
    }
    return true;
  }
  *err = BadRequest(fmt::format("'prompt' must be a string or an array of token ids (got {})",
                                TypeName(*p)), "prompt");
  return false;
}

}  // namespace

bool ParseCompletion(const json& body, bool chat, const Limits& lim, const KvPolicy& kvp,
                     CompletionRequest* r, ApiError* err) {
  *r = CompletionRequest{};
  r->chat = chat;
  Fields f{body, err};
  f.String("model", &r->model);
  if (f.failed) return false;
  if (chat) {
    if (!ParseMessages(f.Get("messages"), &r->messages, err)) return false;
  } else {
    if (!ParsePrompt(f.Get("prompt"), lim, r, err)) return false;
  }
  f.Bool("stream", &r->stream);
  if (const json* so = f.Get("stream_options"); so && !f.failed) {
    if (!so->is_object()) return f.Fail("stream_options", "an object", *so), false;
    Fields sf{*so, err};
    sf.Bool("include_usage", &r->include_usage);
    if (sf.failed) {
      err->param = "stream_options.include_usage";
      return false;
    }
    if (!r->stream) {
      *err = BadRequest("'stream_options' is only allowed with \"stream\": true",
                        "stream_options");
      return false;
    }
  }
  int64_t max_tokens = 0;
  const char* mt_key = "max_tokens";
  if (f.Integer("max_tokens", &max_tokens)) {
    r->max_tokens = max_tokens;
  } else if (!f.failed && chat && f.Integer("max_completion_tokens", &max_tokens)) {
    r->max_tokens = max_tokens;
    mt_key = "max_completion_tokens";
  }
  if (f.failed) return false;
  if (r->max_tokens) {
    if (*r->max_tokens < 1) {
      *err = BadRequest(fmt::format("'{}' must be at least 1 (got {})", mt_key, *r->max_tokens),
                        mt_key);
      return false;
    }
    if (*r->max_tokens > lim.n_ctx) {
      *err = BadRequest(fmt::format("'{}' = {} exceeds the context size {}", mt_key,
                                    *r->max_tokens, lim.n_ctx), mt_key, "context_length_exceeded");
      return false;
    }
  }
  double temperature = 1.0, top_p = 1.0;
  f.Number("temperature", &temperature);
  f.Number("top_p", &top_p);
  if (f.failed) return false;
  if (!(temperature >= 0 && temperature <= 2)) {
    *err = BadRequest("'temperature' must be in [0, 2]", "temperature");
    return false;
  }
  if (!(top_p > 0 && top_p <= 1)) {
    *err = BadRequest("'top_p' must be in (0, 1]", "top_p");
    return false;
  }
  r->gen.sampling.temperature = float(temperature);
  r->gen.sampling.top_p = float(top_p);
  int64_t seed = 0;
  if (f.Integer("seed", &seed)) {
    r->gen.sampling.seed = uint64_t(seed);
    r->seed_given = true;
  }
  if (f.failed) return false;
  if (!ParseStop(f.Get("stop"), &r->gen.stop, err)) return false;
  f.Bool("ignore_eos", &r->gen.ignore_eos);
  if (f.failed) return false;
  // Accepted when they ask for nothing we do not do; refused otherwise (never silently ignored).
  int64_t n = 1;
  if (f.Integer("n", &n) && n != 1) {
    *err = BadRequest("only 'n': 1 is supported", "n");
    return false;
  }
  if (f.failed) return false;
  for (const char* pen : {"presence_penalty", "frequency_penalty"}) {
    double v = 0;
    if (f.Number(pen, &v) && v != 0) {
      *err = BadRequest(fmt::format("'{}' is not supported (only 0)", pen), pen);
      return false;
    }
    if (f.failed) return false;
  }
  if (!chat) {
    bool echo = false;
    if (f.Bool("echo", &echo) && echo) {
      *err = BadRequest("'echo' is not supported", "echo");
      return false;
    }
    if (f.failed) return false;
    if (f.Get("suffix")) {
      *err = BadRequest("'suffix' is not supported", "suffix");
      return false;
    }
    int64_t lp = 0;
    if (f.Integer("logprobs", &lp)) {
      *err = BadRequest("'logprobs' is not supported", "logprobs");
      return false;
    }
    if (f.failed) return false;
  } else {
    bool lp = false;
    if (f.Bool("logprobs", &lp) && lp) {
      *err = BadRequest("'logprobs' is not supported", "logprobs");
      return false;
    }
    if (f.failed) return false;
    if (const json* tools = f.Get("tools"); tools && !(tools->is_array() && tools->empty())) {
      *err = BadRequest("'tools' (function calling) is not supported", "tools");
      return false;
    }
  }
  if (const json* rf = f.Get("response_format")) {
    if (!rf->is_object() || rf->value("type", json()) != "text") {
      *err = BadRequest("'response_format' other than {\"type\": \"text\"} is not supported",
                        "response_format");
      return false;
    }
  }
  if (const json* lb = f.Get("logit_bias"); lb && !(lb->is_object() && lb->empty())) {
    *err = BadRequest("'logit_bias' is not supported", "logit_bias");
    return false;
  }
  int64_t best_of = 1;
  if (f.Integer("best_of", &best_of) && best_of != 1) {
    *err = BadRequest("only 'best_of': 1 is supported", "best_of");
    return false;
  }
  if (f.failed) return false;
  std::string user;
  f.String("user", &user);
  if (f.failed) return false;
  return kvp.Resolve(body.contains("kv") ? body["kv"] : json(), &r->kv, err);
}

bool FinishMaxTokens(CompletionRequest* r, int64_t n_prompt, const Limits& lim, ApiError* err) {
  const bool evicts = !r->kv.evict.empty();
  if (!evicts && n_prompt >= lim.n_ctx) {
    *err = BadRequest(fmt::format("the prompt has {} tokens; the context size is {} (the prompt "
                                  "and at least one generated token must fit)", n_prompt,
                                  lim.n_ctx), r->chat ? "messages" : "prompt",
                      "context_length_exceeded");
    return false;
  }
  if (r->max_tokens) {
    r->gen.max_tokens = int(*r->max_tokens);
  } else {
    int64_t room = evicts ? lim.n_ctx : lim.n_ctx - n_prompt;
    r->gen.max_tokens = int(std::max<int64_t>(1, std::min<int64_t>(lim.default_max_tokens, room)));
  }
  return true;
}

// --- responses ---------------------------------------------------------------------------------

const char* OpenAiFinishReason(engine::FinishReason r) {
  switch (r) {
    case engine::FinishReason::kStop: return "stop";
    case engine::FinishReason::kLength: return "length";
    case engine::FinishReason::kCancelled: return "cancelled";
    case engine::FinishReason::kError: return "error";
    default: return nullptr;
  }
}

json UsageJson(const engine::RequestUsage& u) {
  return {{"prompt_tokens", u.prompt_tokens},
          {"completion_tokens", u.completion_tokens},
          {"total_tokens", u.prompt_tokens + u.completion_tokens},
          {"prompt_tokens_details", {{"cached_tokens", u.cached_tokens}}}};
}

json KvJson(const engine::RequestUsage& u, const KvRunConfig& kv) {
  json j = {{"k", kv.cache.k_codec},
            {"v", kv.cache.v_codec},
            {"evict", kv.evict.empty() ? json(nullptr) : json(kv.evict)},
            {"sinks", kv.cache.sink_tokens},
            {"label", u.kv_label},
            {"bytes_reserved", u.kv_bytes_reserved},
            {"bytes_peak", u.kv_bytes_peak},
            {"cells", u.kv_cells},
            {"k_bits_per_value", u.k_bits_per_value},
            {"v_bits_per_value", u.v_bits_per_value},
            {"preemptions", u.preemptions}};
  if (!kv.cache.k_transform.empty()) j["k_transform"] = kv.cache.k_transform;
  if (!kv.cache.v_transform.empty()) j["v_transform"] = kv.cache.v_transform;
  return j;
}

namespace {
json Finish(engine::FinishReason r) {
  const char* s = OpenAiFinishReason(r);
  return s ? json(s) : json(nullptr);
}
}  // namespace

json CompletionJson(const ResponseMeta& m, const std::string& text, engine::FinishReason reason,
                    const engine::RequestUsage& u, const KvRunConfig& kv) {
  json choice = {{"index", 0}, {"finish_reason", Finish(reason)}, {"logprobs", nullptr}};
  if (m.chat) {
    choice["message"] = {{"role", "assistant"}, {"content", text}};
  } else {
    choice["text"] = text;
  }
  return {{"id", m.id},
          {"object", m.chat ? "chat.completion" : "text_completion"},
          {"created", m.created},
          {"model", m.model},
          {"choices", json::array({std::move(choice)})},
          {"usage", UsageJson(u)},
          {"kv", KvJson(u, kv)}};
}

json ChunkJson(const ResponseMeta& m, const std::string& text, engine::FinishReason finish,
               bool role_only, bool include_usage) {
  json choice = {{"index", 0}, {"finish_reason", Finish(finish)}, {"logprobs", nullptr}};
  if (m.chat) {
    if (role_only) {
      choice["delta"] = {{"role", "assistant"}, {"content", ""}};
    } else if (finish != engine::FinishReason::kNone && text.empty()) {
      choice["delta"] = json::object();
    } else {
      choice["delta"] = {{"content", text}};
    }
  } else {
    choice["text"] = text;
  }
  json j = {{"id", m.id},
            {"object", m.chat ? "chat.completion.chunk" : "text_completion"},
            {"created", m.created},
            {"model", m.model},
            {"choices", json::array({std::move(choice)})}};
  if (include_usage) j["usage"] = nullptr;
  return j;
}

json UsageChunkJson(const ResponseMeta& m, const engine::RequestUsage& u, const KvRunConfig& kv) {
  return {{"id", m.id},
          {"object", m.chat ? "chat.completion.chunk" : "text_completion"},
          {"created", m.created},
          {"model", m.model},
          {"choices", json::array()},
          {"usage", UsageJson(u)},
          {"kv", KvJson(u, kv)}};
}

std::string Dump(const json& j) { return j.dump(-1, ' ', false, json::error_handler_t::replace); }

std::string SseFrame(const json& j) { return "data: " + Dump(j) + "\n\n"; }

// --- metrics -----------------------------------------------------------------------------------

namespace {

std::string EscapeLabel(const std::string& s) {
  std::string o;
  for (char c : s) {
    if (c == '\\') o += "\\\\";
    else if (c == '"') o += "\\\"";
    else if (c == '\n') o += "\\n";
    else o += c;
  }
  return o;
}

std::string Num(double v) {
  if (std::isinf(v)) return v > 0 ? "+Inf" : "-Inf";
  if (std::isnan(v)) return "NaN";
  return fmt::format("{}", v);  // shortest round-trip form
}

struct Writer {
  std::string out;
  std::string labels;  // model_name="..."

  void Head(const char* name, const char* type, const char* help) {
    out += fmt::format("# HELP kvcrunch:{} {}\n# TYPE kvcrunch:{} {}\n", name, help, name, type);
  }
  void Sample(const char* name, double v, const std::string& extra = "") {
    out += fmt::format("kvcrunch:{}{{{}{}}} {}\n", name, labels, extra.empty() ? "" : "," + extra,
                       Num(v));
  }
  void Gauge(const char* name, double v, const char* help) {
    Head(name, "gauge", help);
    Sample(name, v);
  }
  void Counter(const char* name, double v, const char* help) {
    Head(name, "counter", help);
    Sample(name, v);
  }
  void Hist(const char* name, const engine::Histogram& h, const char* help) {
    Head(name, "histogram", help);
    const std::string bucket = std::string(name) + "_bucket";
    uint64_t cum = 0;
    for (size_t i = 0; i < h.bounds.size(); ++i) {
      cum += i < h.counts.size() ? h.counts[i] : 0;
      Sample(bucket.c_str(), double(cum), fmt::format("le=\"{}\"", Num(h.bounds[i])));
    }
    Sample(bucket.c_str(), double(h.count), "le=\"+Inf\"");
    Sample((std::string(name) + "_sum").c_str(), h.sum);
    Sample((std::string(name) + "_count").c_str(), double(h.count));
  }
};

}  // namespace

std::string RenderMetrics(const engine::Stats& s, const HttpCounters& h, const std::string& model) {
  Writer w;
  w.labels = fmt::format("model_name=\"{}\"", EscapeLabel(model));
  w.Gauge("num_requests_running", double(s.running), "Requests running in the engine (holding KV).");
  w.Gauge("num_requests_waiting", double(s.waiting), "Requests queued, waiting for admission.");
  w.Gauge("num_requests_running_peak", double(s.running_peak), "Most requests running at once.");
  w.Gauge("kv_cache_bytes_used", double(s.kv_bytes_used),
          "KV bytes the running sequences hold (allocated capacities).");
  w.Gauge("kv_cache_bytes_budget", double(s.kv_bytes_budget), "KV byte budget (--kv-budget).");
  w.Gauge("kv_cache_bytes_reserved", double(s.kv_bytes_reserved),
          "KV bytes reserved by admitted requests.");
  w.Gauge("kv_cache_bytes_peak", double(s.kv_bytes_peak), "Largest KV bytes held at once.");
  w.Gauge("kv_cache_usage_ratio",
          s.kv_bytes_budget > 0 ? double(s.kv_bytes_used) / double(s.kv_bytes_budget) : 0.0,
          "kv_cache_bytes_used / kv_cache_bytes_budget (0 to 1).");
  w.Counter("num_preemptions_total", double(s.preemptions_total),
            "Requests preempted (KV freed, recomputed later).");
  w.Counter("prompt_tokens_total", double(s.prompt_tokens_total), "Prompt tokens admitted.");
  w.Counter("generation_tokens_total", double(s.generation_tokens_total), "Tokens generated.");
  w.Head("request_success_total", "counter", "Finished requests by finish reason.");
  for (auto r : {engine::FinishReason::kStop, engine::FinishReason::kLength,
                 engine::FinishReason::kCancelled, engine::FinishReason::kError}) {
    w.Sample("request_success_total", double(s.requests_finished_total[int(r)]),
             fmt::format("finished_reason=\"{}\"", OpenAiFinishReason(r)));
  }
  w.Counter("requests_refused_total", double(s.requests_refused_total + h.refused_connections),
            "Requests refused by the engine (queue full, too large, shutting down) or by the "
            "HTTP layer (over --max-connections).");
  w.Counter("engine_steps_total", double(s.steps_total), "Engine scheduler steps.");
  w.Counter("engine_batch_rows_total", double(s.batch_rows_total),
            "Rows (tokens) forwarded over all steps.");
  w.Gauge("http_requests_active", double(h.active),
          "Inference requests the HTTP layer is serving (bounded by --max-connections).");
  w.Gauge("http_requests_active_peak", double(h.active_peak), "Most inference requests at once.");
  w.Counter("http_client_disconnects_total", double(h.disconnects),
            "Clients gone before their request finished (request cancelled, KV freed).");
  w.Head("http_responses_total", "counter", "HTTP responses by status code.");
  for (const auto& [code, n] : h.responses) {
    w.Sample("http_responses_total", double(n), fmt::format("code=\"{}\"", code));
  }
  w.Hist("time_to_first_token_seconds", s.ttft, "Arrival to first generated token.");
  w.Hist("inter_token_latency_seconds", s.itl, "Time between consecutive generated tokens.");
  w.Hist("e2e_request_latency_seconds", s.e2e, "Arrival to finish.");
  w.Hist("request_queue_time_seconds", s.queue_time, "Arrival to first scheduled.");
  return w.out;
}

std::string RenderStoreMetrics(const StoreCounters& c, const std::string& model) {
  Writer w;
  w.labels = fmt::format("model_name=\"{}\"", EscapeLabel(model));
  w.Counter("prefix_cache_queries_total", double(c.queries_tokens),
            "Prompt tokens looked up in the prefix cache (vLLM: prefix_cache_queries).");
  w.Counter("prefix_cache_hits_total", double(c.hit_tokens),
            "Prompt tokens restored from the prefix cache instead of computed (vLLM: prefix_cache_hits).");
  w.Counter("prefix_cache_local_hits_total", double(c.local_hit_tokens), "Hit tokens found in local memory.");
  w.Counter("prefix_cache_remote_hits_total", double(c.remote_hit_tokens), "Hit tokens fetched from the shared tier.");
  w.Counter("prefix_cache_blocks_stored_total", double(c.blocks_stored), "Block records stored in local memory.");
  w.Counter("prefix_cache_evictions_total", double(c.local.evictions), "Block records evicted (LRU).");
  w.Gauge("prefix_cache_entries", double(c.local.entries), "Block records held in local memory.");
  w.Gauge("prefix_cache_bytes", double(c.local.bytes), "Bytes of block records held in local memory.");
  w.Gauge("prefix_cache_bytes_budget", double(c.local.budget_bytes), "--prefix-cache budget.");
  w.Counter("prefix_cache_writes_dropped_total", double(c.writes_dropped),
            "Exported blocks dropped because the store's queue was full.");
  if (c.remote_configured) {
    w.Gauge("kv_store_up", c.remote_up ? 1.0 : 0.0, "1 while the shared tier (--kv-store) answers.");
    w.Counter("kv_store_gets_total", double(c.remote_gets), "Values read from the shared tier.");
    w.Counter("kv_store_get_bytes_total", double(c.remote_get_bytes), "Bytes read from the shared tier.");
    w.Counter("kv_store_sets_total", double(c.remote_sets), "Values written to the shared tier.");
    w.Counter("kv_store_set_bytes_total", double(c.remote_set_bytes), "Bytes written to the shared tier.");
    w.Counter("kv_store_errors_total", double(c.remote_errors),
              "Shared-tier calls that failed (down, slow, refused).");
    w.Counter("kv_store_rejected_total", double(c.remote_rejected),
              "Values refused on read: bad checksum, another model, KV configuration or key.");
  }
  w.Counter("sessions_restored_total", double(c.sessions_restored), "Saved sessions continued.");
  w.Counter("sessions_saved_total", double(c.sessions_saved), "Session states written.");
  w.Counter("sessions_save_errors_total", double(c.sessions_save_errors),
            "Session states not written (session directory gone or unwritable, disk full); logged.");
  w.Counter("sessions_rejected_total", double(c.sessions_rejected),
            "Saved sessions not used: corrupt, or another model or KV configuration.");
  return w.out;
}

// --- flags -------------------------------------------------------------------------------------

StatusOr<int64_t> ParseByteSize(const std::string& text) {
  auto bad = [&] {
    return InvalidArgument(fmt::format("bad size '{}' (expected bytes or a number with KiB, MiB, "
                                       "GiB, TiB: 512MiB, 1GiB)", text));
  };
  size_t i = 0;
  while (i < text.size() && (std::isdigit(static_cast<unsigned char>(text[i])) || text[i] == '.')) ++i;
  if (i == 0) return bad();
  char* end = nullptr;
  const std::string num = text.substr(0, i);
  const double v = std::strtod(num.c_str(), &end);
  if (*end || !std::isfinite(v)) return bad();
  std::string unit = text.substr(i);
  while (!unit.empty() && unit.front() == ' ') unit.erase(0, 1);
  for (auto& c : unit) c = char(std::tolower(static_cast<unsigned char>(c)));
  double mult = 1;
  if (unit.empty() || unit == "b") mult = 1;
  else if (unit == "k" || unit == "kb" || unit == "kib") mult = 1024.0;
  else if (unit == "m" || unit == "mb" || unit == "mib") mult = 1024.0 * 1024;
  else if (unit == "g" || unit == "gb" || unit == "gib") mult = 1024.0 * 1024 * 1024;
  else if (unit == "t" || unit == "tb" || unit == "tib") mult = 1024.0 * 1024 * 1024 * 1024;
  else return bad();
  const double bytes = v * mult;
  if (!(bytes >= 1) || bytes > double(int64_t(1) << 50)) return bad();
  return int64_t(bytes);
}

// --- auth --------------------------------------------------------------------------------------

Digest Sha256(std::string_view s) {
  Digest d{};
  unsigned int n = 0;
  EVP_Digest(s.data(), s.size(), d.data(), &n, EVP_sha256(), nullptr);
  return d;
}

std::string BearerToken(std::string_view h) {
  constexpr std::string_view kScheme = "Bearer ";
  if (h.size() < kScheme.size()) return "";
  for (size_t i = 0; i < kScheme.size(); ++i) {
    if (std::tolower(static_cast<unsigned char>(h[i])) !=
        std::tolower(static_cast<unsigned char>(kScheme[i]))) {
      return "";
    }
  }
  h.remove_prefix(kScheme.size());
  while (!h.empty() && h.front() == ' ') h.remove_prefix(1);
  while (!h.empty() && (h.back() == ' ' || h.back() == '\r')) h.remove_suffix(1);
  return std::string(h);
}

bool KeyMatches(std::string_view presented, const std::vector<Digest>& keys) {
  const Digest p = Sha256(presented);
  unsigned any = 0;
  for (const auto& k : keys) {
    unsigned diff = 0;
    for (size_t i = 0; i < k.size(); ++i) diff |= unsigned(k[i] ^ p[i]);
    any |= unsigned(diff == 0);
  }
  return any != 0 && !presented.empty();
}

}  // namespace kvc::server
