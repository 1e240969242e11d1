// The HTTP layer's pure parts (tools/server/api.h): request parsing and validation, the KV
// extension against --kv-allow, error mapping, response and SSE shapes, Prometheus text, auth.
#include "api.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <set>
#include <sstream>

namespace kvc::server {
namespace {

Limits Lim() {
  Limits l;
  l.n_ctx = 512;
  l.n_vocab = 1000;
  l.default_max_tokens = 64;
  return l;
}

KvPolicy Policy(const std::string& allow = "") {
  KvRunConfig d;
  d.cache.k_codec = d.cache.v_codec = "f16";
  auto p = KvPolicy::Make(d, allow);
  EXPECT_TRUE(p.ok()) << p.status().ToString();
  return *p;
}

// Parses `text` as a completion body; returns the error (status 0 when accepted).
ApiError Parse(const std::string& text, bool chat, CompletionRequest* r = nullptr,
               const KvPolicy& kv = Policy()) {
  json j;
  ApiError err;
  err.status = 0;
  if (!ParseJsonObject(text, &j, &err)) return err;
  CompletionRequest tmp;
  if (!ParseCompletion(j, chat, Lim(), kv, r ? r : &tmp, &err)) return err;
  err.status = 0;
  return err;
}

TEST(ServerApi, AcceptsMinimalCompletionAndChat) {
  CompletionRequest r;
  EXPECT_EQ(Parse(R"({"prompt": "hello", "max_tokens": 5, "temperature": 0})", false, &r).status, 0);
  EXPECT_EQ(r.prompt, "hello");
  EXPECT_EQ(*r.max_tokens, 5);
  EXPECT_EQ(r.gen.sampling.temperature, 0.0f);
  EXPECT_FALSE(r.stream);
  EXPECT_EQ(Parse(R"({"messages": [{"role": "user", "content": "hi"}], "stream": true,
                      "stream_options": {"include_usage": true}, "seed": 7, "stop": ["\n"]})",
                  true, &r).status, 0);
  ASSERT_EQ(r.messages.size(), 1u);
  EXPECT_EQ(r.messages[0].content, "hi");
  EXPECT_TRUE(r.stream && r.include_usage && r.seed_given);
  EXPECT_EQ(r.gen.sampling.seed, 7u);
  EXPECT_EQ(r.gen.stop, std::vector<std::string>{"\n"});
}

TEST(ServerApi, PromptAsTokenIdsAndTextParts) {
  CompletionRequest r;
  EXPECT_EQ(Parse(R"({"prompt": [1, 2, 999]})", false, &r).status, 0);
  EXPECT_TRUE(r.prompt_is_ids);
  EXPECT_EQ(r.prompt_ids, (std::vector<int32_t>{1, 2, 999}));
  EXPECT_EQ(Parse(R"({"prompt": ["one prompt"]})", false, &r).status, 0);
  EXPECT_EQ(r.prompt, "one prompt");
  EXPECT_EQ(Parse(R"({"messages": [{"role": "system", "content": [{"type": "text", "text": "a"},
                      {"type": "text", "text": "b"}]}, {"role": "user", "content": "q"}]})",
                  true, &r).status, 0);
  EXPECT_EQ(r.messages[0].content, "ab");
}

TEST(ServerApi, UnknownFieldsAreIgnoredKnownFieldsOfWrongTypeNamed) {
  EXPECT_EQ(Parse(R"({"prompt": "x", "my_extension": {"a": 1}, "user": "u"})", false).status, 0);
  struct Case {
    const char* body;
    const char* param;
  } cases[] = {
      {R"({"prompt": "x", "max_tokens": "5"})", "max_tokens"},
      {R"({"prompt": "x", "max_tokens": 5.5})", "max_tokens"},
      {R"({"prompt": "x", "temperature": "hot"})", "temperature"},
      {R"({"prompt": "x", "top_p": [1]})", "top_p"},
      {R"({"prompt": "x", "stream": "yes"})", "stream"},
      {R"({"prompt": "x", "seed": "1"})", "seed"},
      {R"({"prompt": "x", "stop": 5})", "stop"},
      {R"({"prompt": "x", "stop": ["a", 1]})", "stop"},
      {R"({"prompt": "x", "ignore_eos": 1})", "ignore_eos"},
      {R"({"prompt": "x", "model": 3})", "model"},
      {R"({"prompt": "x", "kv": "q4_0"})", "kv"},
      {R"({"prompt": "x", "stream": true, "stream_options": {"include_usage": "y"}})",
       "stream_options.include_usage"},
      {R"({"prompt": 5})", "prompt"},
      {R"({"prompt": {"text": "x"}})", "prompt"},
      {R"({"messages": "hi"})", "messages"},
      {R"({"messages": [{"role": "user", "content": 5}]})", "messages[0].content"},
      {R"({"messages": [{"role": 1, "content": "x"}]})", "messages[0].role"},
      {R"({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]})",
       "messages[0].content[0]"},
  };
  for (const auto& c : cases) {
    const bool chat = std::string(c.body).find("messages") != std::string::npos;
    ApiError e = Parse(c.body, chat);
    EXPECT_EQ(e.status, 400) << c.body;
    EXPECT_EQ(e.param, c.param) << c.body << ": " << e.message;
    EXPECT_EQ(e.type, "invalid_request_error");
    EXPECT_FALSE(e.message.empty());
  }
}

TEST(ServerApi, MissingAndEmptyInputs) {
  EXPECT_EQ(Parse(R"({})", false).param, "prompt");
  EXPECT_EQ(Parse(R"({"prompt": ""})", false).param, "prompt");
  EXPECT_EQ(Parse(R"({"prompt": []})", false).param, "prompt");
  EXPECT_EQ(Parse(R"({"prompt": ["a", "b"]})", false).param, "prompt");  // batch: refused
  EXPECT_EQ(Parse(R"({"prompt": [1, 1000]})", false).param, "prompt");   // id >= n_vocab
  EXPECT_EQ(Parse(R"({"prompt": [-1]})", false).param, "prompt");
  EXPECT_EQ(Parse(R"({})", true).param, "messages");
  EXPECT_EQ(Parse(R"({"messages": []})", true).param, "messages");
  EXPECT_EQ(Parse(R"({"messages": [{"role": "tool", "content": "x"}]})", true).param,
            "messages[0].role");
  EXPECT_EQ(Parse(R"({"messages": [{"role": "user"}]})", true).param, "messages[0].content");
}

TEST(ServerApi, MaxTokensAndSamplingRanges) {
  EXPECT_EQ(Parse(R"({"prompt": "x", "max_tokens": -1})", false).param, "max_tokens");
  EXPECT_EQ(Parse(R"({"prompt": "x", "max_tokens": 0})", false).param, "max_tokens");
  ApiError huge = Parse(R"({"prompt": "x", "max_tokens": 100000000000})", false);
  EXPECT_EQ(huge.param, "max_tokens");
  EXPECT_EQ(huge.code, "context_length_exceeded");
  EXPECT_EQ(Parse(R"({"prompt": "x", "max_tokens": 18446744073709551615})", false).param,
            "max_tokens");
  EXPECT_EQ(Parse(R"({"prompt": "x", "max_tokens": 513})", false).status, 400);  // n_ctx 512
  EXPECT_EQ(Parse(R"({"prompt": "x", "max_tokens": 512})", false).status, 0);
  EXPECT_EQ(Parse(R"({"messages": [{"role": "user", "content": "x"}],
                      "max_completion_tokens": -3})", true).param, "max_completion_tokens");
  EXPECT_EQ(Parse(R"({"prompt": "x", "temperature": -0.1})", false).param, "temperature");
  EXPECT_EQ(Parse(R"({"prompt": "x", "temperature": 2.5})", false).param, "temperature");
  EXPECT_EQ(Parse(R"({"prompt": "x", "top_p": 0})", false).param, "top_p");
  EXPECT_EQ(Parse(R"({"prompt": "x", "n": 2})", false).param, "n");
  EXPECT_EQ(Parse(R"({"prompt": "x", "presence_penalty": 0.5})", false).param, "presence_penalty");
  EXPECT_EQ(Parse(R"({"prompt": "x", "echo": true})", false).param, "echo");
  EXPECT_EQ(Parse(R"({"prompt": "x", "best_of": 3})", false).param, "best_of");
  EXPECT_EQ(Parse(R"({"prompt": "x", "logit_bias": {"5": 10}})", false).param, "logit_bias");
  EXPECT_EQ(Parse(R"({"prompt": "x", "logit_bias": {}})", false).status, 0);
  EXPECT_EQ(Parse(R"({"messages": [{"role": "user", "content": "x"}],
                      "response_format": {"type": "json_object"}})", true).param, "response_format");
  EXPECT_EQ(Parse(R"({"messages": [{"role": "user", "content": "x"}],
                      "response_format": {"type": "text"}})", true).status, 0);
  EXPECT_EQ(Parse(R"({"prompt": "x", "logprobs": 3})", false).param, "logprobs");
  EXPECT_EQ(Parse(R"({"prompt": "x", "stream_options": {"include_usage": true}})", false).param,
            "stream_options");
  // 17 stop strings: the engine's limit is 16.
  std::string stops = R"({"prompt": "x", "stop": [)";
  for (int i = 0; i < 17; ++i) {
    if (i) stops += ",";
    stops += "\"s" + std::to_string(i) + "\"";
  }
  EXPECT_EQ(Parse(stops + "]}", false).param, "stop");
  EXPECT_EQ(Parse(R"({"prompt": "x", "stop": [""]})", false).param, "stop");
  EXPECT_EQ(Parse(R"({"prompt": "x", "max_tokens": 16.0})", false).status, 0);  // 16.0 == 16
}

TEST(ServerApi, FinishMaxTokensDefaultsAndContext) {
  CompletionRequest r;
  ApiError e;
  ASSERT_EQ(Parse(R"({"prompt": "x"})", false, &r).status, 0);
  ASSERT_TRUE(FinishMaxTokens(&r, 10, Lim(), &e));
  EXPECT_EQ(r.gen.max_tokens, 64);  // the default
  ASSERT_TRUE(FinishMaxTokens(&r, 500, Lim(), &e));
  EXPECT_EQ(r.gen.max_tokens, 12);  // what the context leaves
  EXPECT_FALSE(FinishMaxTokens(&r, 512, Lim(), &e));
  EXPECT_EQ(e.code, "context_length_exceeded");
  EXPECT_EQ(e.param, "prompt");
  ASSERT_EQ(Parse(R"({"prompt": "x", "max_tokens": 100})", false, &r).status, 0);
  ASSERT_TRUE(FinishMaxTokens(&r, 500, Lim(), &e));
  EXPECT_EQ(r.gen.max_tokens, 100);  // prompt + 100 > n_ctx: the engine refuses (OUT_OF_RANGE)
}

TEST(ServerApi, MalformedJson) {
  json j;
  ApiError e;
  for (const char* bad : {"", "{", "{\"prompt\": }", "[1, 2]", "\"str\"", "nul", "{\"a\":1}x",
                          "{\"prompt\": \"\xff\xfe\"}",
                          // Out of double's range: nlohmann throws out_of_range, not parse_error.
                          "{\"max_tokens\": 1e400}", "{\"a\": [-1e999]}"}) {
    EXPECT_FALSE(ParseJsonObject(bad, &j, &e)) << bad;
    EXPECT_EQ(e.status, 400);
    EXPECT_EQ(e.code, "invalid_json");
  }
  // Deep nesting is parsed without recursion and refused as a request, not a crash.
  std::string deep = "{\"prompt\": " + std::string(100000, '[') + std::string(100000, ']') + "}";
  ASSERT_TRUE(ParseJsonObject(deep, &j, &e));
  CompletionRequest r;
  EXPECT_FALSE(ParseCompletion(j, false, Lim(), Policy(), &r, &e));
  EXPECT_EQ(e.param, "prompt");
}

TEST(ServerApi, KvExtensionAgainstAllowList) {
  CompletionRequest r;
  // Defaults only: f16 is fine, q4_0 is not allowed, an unknown codec is named as unknown.
  EXPECT_EQ(Parse(R"({"prompt": "x", "kv": {"k": "f16"}})", false, &r).status, 0);
  ApiError e = Parse(R"({"prompt": "x", "kv": {"k": "q4_0"}})", false);
  EXPECT_EQ(e.status, 400);
  EXPECT_EQ(e.param, "kv.k");
  EXPECT_EQ(e.code, "kv_not_allowed");
  e = Parse(R"({"prompt": "x", "kv": {"v": "nosuchcodec"}})", false);
  EXPECT_EQ(e.code, "kv_unknown");
  EXPECT_EQ(e.param, "kv.v");
  // Allowed by name (aliases and policies too); parameters pass through to the engine.
  KvPolicy p = Policy("q4_0,kivi2,snapkv");
  EXPECT_EQ(Parse(R"({"prompt": "x", "kv": {"k": "q4_0", "v": "kivi2", "evict": "snapkv:ratio=0.5",
                      "sinks": 4, "pos": "in-cache"}})", false, &r, p).status, 0);
  EXPECT_EQ(r.kv.cache.k_codec, "q4_0");
  EXPECT_EQ(r.kv.cache.v_codec, "kivi2");
  EXPECT_EQ(r.kv.evict, "snapkv:ratio=0.5");
  EXPECT_EQ(r.kv.cache.sink_tokens, 4);
  EXPECT_TRUE(r.kv.cache.position_mode_set);
  EXPECT_EQ(Parse(R"({"prompt": "x", "kv": {"k": "kivi:bits=4"}})", false, &r, p).status, 0);
  EXPECT_EQ(Parse(R"({"prompt": "x", "kv": {"k": "turbo3"}})", false, &r, p).code,
            "kv_not_allowed");
  EXPECT_EQ(Parse(R"({"prompt": "x", "kv": {"evict": "h2o"}})", false, &r, p).code,
            "kv_not_allowed");
  EXPECT_EQ(Parse(R"({"prompt": "x", "kv": {"evict": "none"}})", false, &r, p).status, 0);
  EXPECT_TRUE(r.kv.evict.empty());
  EXPECT_EQ(Parse(R"({"prompt": "x", "kv": {"sinks": -1}})", false, &r, p).param, "kv.sinks");
  EXPECT_EQ(Parse(R"({"prompt": "x", "kv": {"sinks": "4"}})", false, &r, p).param, "kv.sinks");
  EXPECT_EQ(Parse(R"({"prompt": "x", "kv": {"pos": "sideways"}})", false, &r, p).param, "kv.pos");
  EXPECT_EQ(Parse(R"({"prompt": "x", "kv": {"k": 4}})", false, &r, p).param, "kv.k");
  EXPECT_EQ(Parse(R"({"prompt": "x", "kv": {"evcit": "snapkv"}})", false, &r, p).param,
            "kv.evcit");  // a typo is an error, not the default
  // Nothing a request sends may make the server read a file, even with "any".
  KvPolicy any = Policy("any");
  EXPECT_EQ(Parse(R"({"prompt": "x", "kv": {"k": "turbo3", "evict": "h2o:budget=64"}})", false,
                  &r, any).status, 0);
  EXPECT_EQ(Parse(R"({"prompt": "x", "kv": {"k": "kvquant4:calib=/etc/passwd"}})", false, &r,
                  any).code, "kv_not_allowed");
  EXPECT_EQ(Parse(R"({"prompt": "x", "kv": {"kt": "lowrank:file=/etc/passwd"}})", false, &r,
                  any).code, "kv_not_allowed");
  // --kv-allow itself is checked.
  EXPECT_FALSE(KvPolicy::Make(KvRunConfig{}, "q4_0,bogus").ok());
}

TEST(ServerApi, ErrorMappingAndBody) {
  EXPECT_EQ(ErrorFromStatus(InvalidArgument("x")).status, 400);
  ApiError oor = ErrorFromStatus(OutOfRange("prompt too long"));
  EXPECT_EQ(oor.status, 400);
  EXPECT_EQ(oor.code, "context_length_exceeded");
  EXPECT_EQ(ErrorFromStatus(ResourceExhausted("queue")).status, 429);
  EXPECT_EQ(ErrorFromStatus(Unavailable("bye")).status, 503);
  EXPECT_EQ(ErrorFromStatus(Internal("bug")).status, 500);
  json b = ErrorBody(BadRequest("bad thing", "max_tokens"));
  ASSERT_TRUE(b.contains("error"));
  EXPECT_EQ(b["error"]["message"], "bad thing");
  EXPECT_EQ(b["error"]["type"], "invalid_request_error");
  EXPECT_EQ(b["error"]["param"], "max_tokens");
  EXPECT_TRUE(b["error"]["code"].is_null());
  EXPECT_TRUE(ErrorBody(BadRequest("x"))["error"]["param"].is_null());
}

engine::RequestUsage Usage() {
  engine::RequestUsage u;
  u.prompt_tokens = 11;
  u.completion_tokens = 5;
  u.kv_bytes_peak = 4096;
  u.kv_bytes_reserved = 8192;
  u.k_bits_per_value = 4.5;
  u.kv_label = "K=q4_0 V=q4_0";
  return u;
}

TEST(ServerApi, ResponseShapes) {
  KvRunConfig kv;
  kv.cache.k_codec = kv.cache.v_codec = "q4_0";
  ResponseMeta chat{"chatcmpl-1", 1700000000, "smol", true};
  json c = CompletionJson(chat, "Hello", engine::FinishReason::kStop, Usage(), kv);
  EXPECT_EQ(c["object"], "chat.completion");
  EXPECT_EQ(c["choices"][0]["message"]["role"], "assistant");
  EXPECT_EQ(c["choices"][0]["message"]["content"], "Hello");
  EXPECT_EQ(c["choices"][0]["finish_reason"], "stop");
  EXPECT_EQ(c["usage"]["prompt_tokens"], 11);
  EXPECT_EQ(c["usage"]["completion_tokens"], 5);
  EXPECT_EQ(c["usage"]["total_tokens"], 16);
  EXPECT_EQ(c["usage"]["prompt_tokens_details"]["cached_tokens"], 0);
  EXPECT_EQ(c["kv"]["k"], "q4_0");
  EXPECT_EQ(c["kv"]["bytes_peak"], 4096);
  EXPECT_EQ(c["kv"]["bytes_reserved"], 8192);
  EXPECT_TRUE(c["kv"]["evict"].is_null());
  ResponseMeta text{"cmpl-1", 1700000000, "smol", false};
  json t = CompletionJson(text, "abc", engine::FinishReason::kLength, Usage(), kv);
  EXPECT_EQ(t["object"], "text_completion");
  EXPECT_EQ(t["choices"][0]["text"], "abc");
  EXPECT_EQ(t["choices"][0]["finish_reason"], "length");

  json first = ChunkJson(chat, "", engine::FinishReason::kNone, true, true);
  EXPECT_EQ(first["object"], "chat.completion.chunk");
  EXPECT_EQ(first["choices"][0]["delta"]["role"], "assistant");
  EXPECT_TRUE(first["choices"][0]["finish_reason"].is_null());
  EXPECT_TRUE(first.contains("usage") && first["usage"].is_null());
  json mid = ChunkJson(chat, "Hi", engine::FinishReason::kNone, false, false);
  EXPECT_EQ(mid["choices"][0]["delta"]["content"], "Hi");
  EXPECT_FALSE(mid.contains("usage"));
  json last = ChunkJson(chat, "", engine::FinishReason::kStop, false, false);
  EXPECT_TRUE(last["choices"][0]["delta"].is_object() && last["choices"][0]["delta"].empty());
  EXPECT_EQ(last["choices"][0]["finish_reason"], "stop");
  json usage = UsageChunkJson(chat, Usage(), kv);
  EXPECT_TRUE(usage["choices"].is_array() && usage["choices"].empty());
  EXPECT_EQ(usage["usage"]["total_tokens"], 16);
  EXPECT_EQ(usage["id"], "chatcmpl-1");
}

TEST(ServerApi, SseFraming) {
  EXPECT_EQ(SseFrame(json{{"a", 1}}), "data: {\"a\":1}\n\n");
  EXPECT_STREQ(SseDone(), "data: [DONE]\n\n");
  // A token boundary inside a UTF-8 character must not throw: replaced by U+FFFD.
  std::string f = SseFrame(json{{"t", std::string("ok\xe2\x82")}});
  EXPECT_EQ(f, "data: {\"t\":\"ok\xef\xbf\xbd\"}\n\n");
  // Newlines in text are escaped: one frame is one line.
  f = SseFrame(json{{"t", "a\nb"}});
  EXPECT_EQ(std::count(f.begin(), f.end(), '\n'), 2);
}

TEST(ServerApi, PrometheusText) {
  engine::Stats s;
  s.running = 3;
  s.waiting = 2;
  s.kv_bytes_used = 256;
  s.kv_bytes_budget = 1024;
  s.preemptions_total = 1;
  s.requests_finished_total[int(engine::FinishReason::kStop)] = 7;
  s.ttft = engine::Histogram({0.1, 1.0});
  s.ttft.counts = {2, 1, 1};
  s.ttft.count = 4;
  s.ttft.sum = 3.5;
  HttpCounters h;
  h.responses[200] = 9;
  const std::string t = RenderMetrics(s, h, "smol\"m");
  auto has = [&](const std::string& line) {
    return t.find(line + "\n") != std::string::npos;
  };
  EXPECT_TRUE(has("kvcrunch:num_requests_running{model_name=\"smol\\\"m\"} 3")) << t;
  EXPECT_TRUE(has("kvcrunch:num_requests_waiting{model_name=\"smol\\\"m\"} 2"));
  EXPECT_TRUE(has("kvcrunch:kv_cache_bytes_used{model_name=\"smol\\\"m\"} 256"));
  EXPECT_TRUE(has("kvcrunch:kv_cache_bytes_budget{model_name=\"smol\\\"m\"} 1024"));
  EXPECT_TRUE(has("kvcrunch:kv_cache_usage_ratio{model_name=\"smol\\\"m\"} 0.25"));
  EXPECT_TRUE(has("kvcrunch:num_preemptions_total{model_name=\"smol\\\"m\"} 1"));
  EXPECT_TRUE(has("kvcrunch:request_success_total{model_name=\"smol\\\"m\",finished_reason=\"stop\"} 7"));
  EXPECT_TRUE(has("# TYPE kvcrunch:time_to_first_token_seconds histogram"));
  // Buckets are cumulative; +Inf equals _count.
  EXPECT_TRUE(has("kvcrunch:time_to_first_token_seconds_bucket{model_name=\"smol\\\"m\",le=\"0.1\"} 2"));
  EXPECT_TRUE(has("kvcrunch:time_to_first_token_seconds_bucket{model_name=\"smol\\\"m\",le=\"1\"} 3"));
  EXPECT_TRUE(has("kvcrunch:time_to_first_token_seconds_bucket{model_name=\"smol\\\"m\",le=\"+Inf\"} 4"));
  EXPECT_TRUE(has("kvcrunch:time_to_first_token_seconds_sum{model_name=\"smol\\\"m\"} 3.5"));
  EXPECT_TRUE(has("kvcrunch:time_to_first_token_seconds_count{model_name=\"smol\\\"m\"} 4"));
  EXPECT_TRUE(has("kvcrunch:http_responses_total{model_name=\"smol\\\"m\",code=\"200\"} 9"));
  // Every sample line is "name{labels} value" with a name declared by a # TYPE line.
  std::istringstream in(t);
  std::string line;
  std::set<std::string> typed;
  while (std::getline(in, line)) {
    if (line.rfind("# TYPE ", 0) == 0) {
      typed.insert(line.substr(7, line.find(' ', 7) - 7));
      continue;
    }
    if (line.rfind("#", 0) == 0) continue;
    const std::string name = line.substr(0, line.find('{'));
    std::string base = name;
    for (const char* suf : {"_bucket", "_sum", "_count"}) {
      const std::string sfx = suf;
      if (base.size() > sfx.size() && base.compare(base.size() - sfx.size(), sfx.size(), sfx) == 0 &&
          typed.count(base.substr(0, base.size() - sfx.size()))) {
        base = base.substr(0, base.size() - sfx.size());
      }
    }
    EXPECT_TRUE(typed.count(base)) << line;
    EXPECT_NE(line.find("} "), std::string::npos) << line;
  }
}

TEST(ServerApi, AuthCompare) {
  std::vector<Digest> keys = {Sha256("secret-one"), Sha256("secret-two")};
  EXPECT_TRUE(KeyMatches("secret-one", keys));
  EXPECT_TRUE(KeyMatches("secret-two", keys));
  EXPECT_FALSE(KeyMatches("secret-on", keys));
  EXPECT_FALSE(KeyMatches("secret-one ", keys));
  EXPECT_FALSE(KeyMatches("", keys));
  EXPECT_FALSE(KeyMatches("", {Sha256("")}));  // an empty key never authenticates
  EXPECT_EQ(BearerToken("Bearer abc"), "abc");
  EXPECT_EQ(BearerToken("bearer   abc "), "abc");
  EXPECT_EQ(BearerToken("Basic abc"), "");
  EXPECT_EQ(BearerToken(""), "");
  // SHA-256 known answer ("abc", FIPS 180-2).
  Digest d = Sha256("abc");
  EXPECT_EQ(d[0], 0xba);
  EXPECT_EQ(d[31], 0xad);
}

TEST(ServerApi, ByteSizes) {
  EXPECT_EQ(*ParseByteSize("1024"), 1024);
  EXPECT_EQ(*ParseByteSize("512MiB"), int64_t(512) << 20);
  EXPECT_EQ(*ParseByteSize("1GiB"), int64_t(1) << 30);
  EXPECT_EQ(*ParseByteSize("1.5G"), int64_t(3) << 29);
  EXPECT_EQ(*ParseByteSize("64k"), 65536);
  for (const char* bad : {"", "MiB", "-1", "0", "12 parsecs", "1e3", "1PiB"}) {
    EXPECT_FALSE(ParseByteSize(bad).ok()) << bad;
  }
}

}  // namespace
}  // namespace kvc::server
