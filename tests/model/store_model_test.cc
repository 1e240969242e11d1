// Stored KV on the real model (SmolLM2-135M): save -> restore -> continue equals never saved (every
// codec family, sinks, eviction policies; logits bit for bit), malformed files (truncated at every
// offset, flipped bytes) are refused with a clear error, another model file / codec / parameter /
// policy is refused, and the engine's prefix blocks rebuild a cache that continues exactly like
// computing the prompt (window-free and window codecs).
#include <gtest/gtest.h>

#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <string>
#include <vector>

#include "engine/engine.h"
#include "model/model.h"
#include "store/kv_format.h"
#include "store/prefix_cache.h"
#include "store/session_file.h"

namespace kvc::store {
namespace {

const std::string kModel = std::string(KVC_SOURCE_DIR) + "/models/SmolLM2-135M-Instruct.Q4_1.gguf";

class StoreModel : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    if (!std::filesystem::exists(kModel)) return;
    auto m = Model::Load(kModel);
    ASSERT_TRUE(m.ok()) << m.status().ToString();
    model_ = std::move(m).value().release();
  }
  void SetUp() override {
    if (!model_) GTEST_SKIP() << "model file missing: " << kModel;
  }
  static std::vector<int32_t> Tokens(const std::string& text) {
    auto t = model_->tokenizer().Encode(text, false, false);
    EXPECT_TRUE(t.ok());
    return *t;
  }
  static std::string TmpPath(const std::string& name) {
    return (std::filesystem::temp_directory_path() /
            ("kvc_store_test_" + std::to_string(::getpid()) + "_" + name))
        .string();
  }
  static std::unique_ptr<Session> NewSession(const kv::KvCacheConfig& cfg, const std::string& evict) {
    Session::Options o;
    o.n_ctx = 1024;
    o.n_batch = 64;
    auto s = Session::Create(*model_, cfg, evict, o);
    EXPECT_TRUE(s.ok()) << s.status().ToString();
    return std::move(s).value();
  }
  // Greedy: feeds `prompt`, then n tokens one at a time; returns the tokens and every logits row.
  static void Greedy(Session& s, const std::vector<int32_t>& prompt, int n,
                     std::vector<int32_t>* toks, std::vector<std::vector<float>>* rows) {
    std::vector<float> logits;
    ASSERT_TRUE(s.Eval(prompt, false, &logits).ok());
    for (int i = 0; i < n; ++i) {
      rows->push_back(logits);
      const int32_t next = int32_t(std::max_element(logits.begin(), logits.end()) - logits.begin());
      toks->push_back(next);
      ASSERT_TRUE(s.Eval({next}, false, &logits).ok());
    }
    rows->push_back(logits);
  }
  static Model* model_;
};
Model* StoreModel::model_ = nullptr;

struct Cfg {
  const char* k;
  const char* v;
  int sinks;
  const char* evict;
};

// Save after turn 1, restore into a fresh session, run turn 2: identical to running turn 2 in the
// session that was never saved.
TEST_F(StoreModel, SaveRestoreContinueEqualsNeverSaved) {
  const std::vector<Cfg> cfgs = {
      {"f16", "f16", 0, ""},          {"q8_0", "q8_0", 0, ""},
      {"q4_0", "q4_0", 0, ""},        {"fp8", "fp8", 0, ""},
      {"kivi2", "kivi2", 0, ""},      {"kivi4", "kivi4", 0, ""},
      {"turbo3", "turbo3", 0, ""},    {"polar", "q4_0", 0, ""},
      {"qjl", "f16", 0, ""},          {"q4_0", "q4_0", 4, ""},
      {"q4_0", "q4_0", 0, "tova:budget=96,when=step"},
      {"q8_0", "q8_0", 0, "snapkv:budget=64"},
      {"f16", "f16", 0, "streaming:sink=4,window=60"},
      {"kivi2", "kivi2", 0, "h2o:heavy=40,recent=40"},
  };
  std::vector<int32_t> p1 = Tokens(
      "It was the best of times, it was the worst of times, it was the age of wisdom, it was the "
      "age of foolishness, it was the epoch of belief, it was the epoch of incredulity, it was the "
      "season of Light, it was the season of Darkness.");
  const std::vector<int32_t> p2 = Tokens(" Who wrote these words, and in which city is the story set?");
  for (const Cfg& c : cfgs) {
    SCOPED_TRACE(std::string(c.k) + "/" + c.v + " sinks=" + std::to_string(c.sinks) + " " + c.evict);
    kv::KvCacheConfig cfg;
    cfg.k_codec = c.k;
    cfg.v_codec = c.v;
    cfg.sink_tokens = c.sinks;
    if (c.sinks) cfg.sink_codec = "f16";
    // Never saved.
    auto a = NewSession(cfg, c.evict);
    std::vector<int32_t> ta, ta2;
    std::vector<std::vector<float>> la, la2;
    Greedy(*a, p1, 6, &ta, &la);
    // The 6th token was fed; turn 2 continues.
    Greedy(*a, p2, 6, &ta2, &la2);
    // Saved after turn 1, restored into a fresh session.
    auto b = NewSession(cfg, c.evict);
    std::vector<int32_t> tb;
    std::vector<std::vector<float>> lb;
    Greedy(*b, p1, 6, &tb, &lb);
    SessionTokens st;
    st.tokens = p1;
    st.tokens.insert(st.tokens.end(), tb.begin(), tb.end());
    const std::string path = TmpPath("eq.kvc");
    ASSERT_TRUE(SaveSession(*b, st, path).ok());
    b.reset();
    auto r = NewSession(cfg, c.evict);
    auto loaded = LoadSession(r.get(), path);
    ASSERT_TRUE(loaded.ok()) << loaded.status().ToString();
    EXPECT_EQ(loaded->tokens, st.tokens);
    EXPECT_EQ(r->n_past(), int64_t(st.tokens.size()));
    std::vector<int32_t> tr2;
    std::vector<std::vector<float>> lr2;
    Greedy(*r, p2, 6, &tr2, &lr2);
    EXPECT_EQ(tr2, ta2);
    ASSERT_EQ(lr2.size(), la2.size());
    for (size_t i = 0; i < lr2.size(); ++i) {
      ASSERT_EQ(0, std::memcmp(lr2[i].data(), la2[i].data(), lr2[i].size() * sizeof(float)))
          << "logits row " << i << " differ";
    }
    // Memory after restore equals the never-saved session's cells (bytes may differ by capacity).
    EXPECT_EQ(r->cache().Memory().Cells(), a->cache().Memory().Cells());
    std::filesystem::remove(path);
  }
}

TEST_F(StoreModel, MismatchedConfigurationModelOrPolicyIsRefused) {
  kv::KvCacheConfig cfg;
  cfg.k_codec = cfg.v_codec = "q4_0";
  auto s = NewSession(cfg, "");
  std::vector<float> logits;
  const std::vector<int32_t> p = Tokens("A short prompt for the mismatch test.");
  ASSERT_TRUE(s->Eval(p, false, &logits).ok());
  const std::string path = TmpPath("mismatch.kvc");
  ASSERT_TRUE(SaveSession(*s, {p, {}}, path).ok());
  struct Case {
    const char* k;
    const char* v;
    const char* evict;
    const char* expect;
  } cases[] = {
      {"q8_0", "q4_0", "", "another KV configuration"},
      {"q4_0:rot=0", "q4_0", "", "another KV configuration"},   // a parameter
      {"kivi2", "kivi4", "", "another KV configuration"},
      {"q4_0", "q4_0", "tova:budget=64,when=step", "another KV configuration"},
  };
  for (const Case& c : cases) {
    kv::KvCacheConfig o;
    o.k_codec = c.k;
    o.v_codec = c.v;
    auto r = NewSession(o, c.evict);
    auto l = LoadSession(r.get(), path);
    ASSERT_FALSE(l.ok()) << c.k;
    EXPECT_EQ(l.status().code(), StatusCode::kFailedPrecondition);
    EXPECT_NE(l.status().message().find(c.expect), std::string::npos) << l.status().message();
    EXPECT_EQ(r->n_past(), 0);
  }
  // Another model file: the same GGUF with one metadata byte changed (its name) loads as a model
  // whose fingerprint differs.
  {
    std::ifstream in(kModel, std::ios::binary);
    std::string bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    // The last byte belongs to the last tensor's data (quantized weights load whatever it holds).
    bytes.back() = char(bytes.back() ^ 1);
    const std::string other = TmpPath("other.gguf");
    std::ofstream(other, std::ios::binary).write(bytes.data(), std::streamsize(bytes.size()));
    auto m2 = Model::Load(other);
    ASSERT_TRUE(m2.ok()) << m2.status().ToString();
    Session::Options so;
    so.n_ctx = 256;
    auto r = Session::Create(**m2, cfg, "", so);
    ASSERT_TRUE(r.ok());
    auto l = LoadSession(r->get(), path);
    ASSERT_FALSE(l.ok());
    EXPECT_EQ(l.status().code(), StatusCode::kFailedPrecondition);
    EXPECT_NE(l.status().message().find("another model"), std::string::npos) << l.status().message();
    std::filesystem::remove(other);
  }
  std::filesystem::remove(path);
}

// Truncated at every offset and every byte flipped (in a small session): DATA_LOSS with a message,
// no crash, nothing restored.
TEST_F(StoreModel, MalformedSessionFilesAreRefused) {
  kv::KvCacheConfig cfg;
  cfg.k_codec = cfg.v_codec = "q4_0";
  auto s = NewSession(cfg, "");
  std::vector<float> logits;
  ASSERT_TRUE(s->Eval(Tokens("Hi there"), false, &logits).ok());
  SessionTokens st{Tokens("Hi there"), {42}};
  const std::string path = TmpPath("malformed.kvc");
  ASSERT_TRUE(SaveSession(*s, st, path).ok());
  auto good = ReadFile(path);
  ASSERT_TRUE(good.ok());
  const std::string& g = *good;
  ASSERT_TRUE(DecodeRecord(g).ok());
  for (size_t n = 0; n < g.size(); ++n) {
    auto r = DecodeRecord(std::string_view(g.data(), n));
    ASSERT_FALSE(r.ok()) << "truncated at " << n;
    ASSERT_EQ(r.status().code(), StatusCode::kDataLoss) << n;
  }
  std::string bad = g;
  for (size_t i = 0; i < g.size(); ++i) {
    bad[i] = char(bad[i] ^ 0x10);
    auto r = DecodeRecord(bad);
    ASSERT_FALSE(r.ok()) << "flipped byte " << i;
    bad[i] = g[i];
  }
  // Through the file API: a clear error naming the file, and the session stays empty.
  std::string trunc = g.substr(0, g.size() / 2);
  ASSERT_TRUE(WriteFileAtomic(path, trunc).ok());
  auto r = NewSession(cfg, "");
  auto l = LoadSession(r.get(), path);
  ASSERT_FALSE(l.ok());
  EXPECT_EQ(l.status().code(), StatusCode::kDataLoss);
  EXPECT_NE(l.status().message().find(path), std::string::npos);
  EXPECT_NE(l.status().message().find("truncated"), std::string::npos) << l.status().message();
  EXPECT_EQ(r->n_past(), 0);
  ASSERT_TRUE(WriteFileAtomic(path, "not a session").ok());
  l = LoadSession(r.get(), path);
  ASSERT_FALSE(l.ok());
  EXPECT_EQ(LoadSession(r.get(), path + ".missing").status().code(), StatusCode::kNotFound);
  std::filesystem::remove(path);
}

// --- the engine: prefix blocks and saved states ---

struct Out {
  std::vector<int32_t> tokens;
  std::vector<std::vector<float>> logits;
  engine::RequestUsage usage;
  std::shared_ptr<const std::string> state;
  bool done = false;
};

engine::Request MakeRequest(std::vector<int32_t> prompt, const std::string& codec, Out* out) {
  engine::Request r;
  r.prompt = std::move(prompt);
  r.kv.cache.k_codec = r.kv.cache.v_codec = codec;
  r.gen.max_tokens = 8;
  r.gen.sampling.temperature = 0;  // greedy
  r.gen.ignore_eos = true;
  r.gen.return_logits = true;
  r.sink = [out](const engine::Event& ev) {
    if (ev.token >= 0) out->tokens.push_back(ev.token);
    if (!ev.logits.empty()) out->logits.push_back(ev.logits);
    if (ev.finished) {
      out->usage = ev.usage;
      out->state = ev.state;
      out->done = true;
    }
  };
  return r;
}

TEST_F(StoreModel, EnginePrefixBlocksContinueLikeComputingThePrompt) {
  engine::EngineOptions eo;
  eo.kv_budget_bytes = int64_t(256) << 20;
  eo.prefill_chunk = 128;
  eo.max_batch_tokens = 256;
  auto e = engine::Engine::Create(*model_, eo);
  ASSERT_TRUE(e.ok());
  std::string text;
  while (text.size() < 2400) text += "Call me Ishmael. Some years ago, never mind how long precisely, "
                                     "having little or no money in my purse. ";
  std::vector<int32_t> base = Tokens(text);
  base.resize(300);
  for (const char* codec : {"f16", "q4_0", "kivi2", "turbo3"}) {
    SCOPED_TRACE(codec);
    const int B = 64;
    // Request A computes the prompt and exports blocks.
    std::map<std::string, std::shared_ptr<const Record>> blocks;  // key hex -> record
    Out a;
    engine::Request ra = MakeRequest(base, codec, &a);
    ra.export_block_tokens = B;
    ra.prefix_root = Digest{};
    ra.prefix_root[0] = 7;
    ra.on_block = [&](engine::Request::BlockOut o) {
      auto d = DecodeRecord(o.record);
      ASSERT_TRUE(d.ok()) << d.status().ToString();
      EXPECT_EQ(d->info.key, o.keys.back());
      EXPECT_EQ(d->info.t0, o.t0);
      EXPECT_EQ(d->info.t1, o.t1);
      EXPECT_EQ(o.keys.size(), size_t((o.t1 - o.t0) / B));
      EXPECT_EQ(ChainKey(o.parent, o.tokens.data(), B), o.keys[0]);
      blocks[DigestHex(o.keys.back())] = std::make_shared<const Record>(std::move(*d));
    };
    ASSERT_TRUE((*e)->Submit(std::move(ra)).ok());
    (*e)->RunUntilIdle();
    ASSERT_TRUE(a.done);
    // 300 prompt + 8 generated (7 fed): 307 consumed -> blocks up to 256 (window-free: 4 single
    // blocks; kivi: cut at the chunk ends 128, 256).
    ASSERT_FALSE(blocks.empty());
    // Request B: the same first 300 tokens + a different tail; restores from the blocks.
    std::vector<int32_t> pb = base;
    for (int i = 0; i < 20; ++i) pb.push_back(int32_t(300 + i * 7));
    const auto keys = ChainKeys(Digest{7}, pb.data(), int64_t((pb.size() - 1) / B), B);
    auto chain = ResolvePrefix(keys.size(), B, [&](size_t j) -> std::shared_ptr<const Record> {
      auto it = blocks.find(DigestHex(keys[j - 1]));
      return it == blocks.end() ? nullptr : it->second;
    });
    ASSERT_FALSE(chain.empty());
    EXPECT_EQ(chain.back()->info.t1, 256);
    Out b, c;
    engine::Request rb = MakeRequest(pb, codec, &b);
    rb.restore_blocks = chain;
    ASSERT_TRUE((*e)->Submit(std::move(rb)).ok());
    ASSERT_TRUE((*e)->Submit(MakeRequest(pb, codec, &c)).ok());  // computes everything
    (*e)->RunUntilIdle();
    ASSERT_TRUE(b.done && c.done);
    EXPECT_EQ(b.usage.cached_tokens, 256);
    EXPECT_EQ(c.usage.cached_tokens, 0);
    EXPECT_EQ(b.tokens, c.tokens);
    ASSERT_EQ(b.logits.size(), c.logits.size());
    // The restored cache holds the same bytes; the prompt's remaining rows run in a different
    // chunk, so the logits agree to rounding (greedy tokens are equal above).
    for (size_t i = 0; i < b.logits.size(); ++i) {
      float md = 0;
      for (size_t v = 0; v < b.logits[i].size(); ++v) {
        md = std::max(md, std::abs(b.logits[i][v] - c.logits[i][v]));
      }
      EXPECT_LT(md, 1e-3f) << "row " << i;
    }
  }
}

TEST_F(StoreModel, EngineSavedStateContinues) {
  engine::EngineOptions eo;
  eo.kv_budget_bytes = int64_t(128) << 20;
  auto e = engine::Engine::Create(*model_, eo);
  ASSERT_TRUE(e.ok());
  const std::vector<int32_t> p1 = Tokens("The history of the city begins with a small fishing village");
  Out a;
  engine::Request ra = MakeRequest(p1, "q4_0", &a);
  ra.save_state = true;
  ASSERT_TRUE((*e)->Submit(std::move(ra)).ok());
  (*e)->RunUntilIdle();
  ASSERT_TRUE(a.done && a.state);
  auto rec = DecodeRecord(*a.state);
  ASSERT_TRUE(rec.ok()) << rec.status().ToString();
  EXPECT_EQ(rec->info.pending.size(), 1u);  // the last sampled token was not fed
  // Continue: prompt = p1 + generated + more text. With the state vs without.
  std::vector<int32_t> p2 = p1;
  p2.insert(p2.end(), a.tokens.begin(), a.tokens.end());
  const auto more = Tokens(" and the harbour grew.");
  p2.insert(p2.end(), more.begin(), more.end());
  Out b, c;
  engine::Request rb = MakeRequest(p2, "q4_0", &b);
  rb.restore_sequence = std::make_shared<const Record>(std::move(*rec));
  ASSERT_TRUE((*e)->Submit(std::move(rb)).ok());
  ASSERT_TRUE((*e)->Submit(MakeRequest(p2, "q4_0", &c)).ok());
  (*e)->RunUntilIdle();
  EXPECT_EQ(b.usage.cached_tokens, int64_t(p1.size() + a.tokens.size() - 1));
  // Same greedy tokens. (Logits are not bit-equal here: the restored cache holds the generated
  // tokens' K/V as decode steps computed them, one row at a time; c computes them inside a prompt
  // chunk, whose matmul rounding differs, and q4_0 turns a few of those differences into a level.)
  EXPECT_EQ(b.tokens, c.tokens);
  // A record whose tokens are not a prefix of the prompt is refused at Submit.
  Out d;
  engine::Request rd = MakeRequest(Tokens("Something else entirely, longer than before."), "q4_0", &d);
  rd.restore_sequence = b.state ? nullptr : std::make_shared<const Record>(*DecodeRecord(*a.state));
  auto st = (*e)->Submit(std::move(rd));
  EXPECT_FALSE(st.ok());
}

}  // namespace
}  // namespace kvc::store
