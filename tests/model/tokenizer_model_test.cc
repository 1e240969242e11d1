// Tokenizer against SmolLM2-135M-Instruct: reference ids from HF `tokenizers` (fixture made by
// tests/reference/make_tokenizer_fixtures.py), round trips, chat template, and encoding speed.
#include <gtest/gtest.h>

#include <chrono>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>

#include "gguf/gguf.h"
#include "tokenizer/tokenizer.h"

namespace kvc {
namespace {

const std::string kRoot = KVC_SOURCE_DIR;
const std::string kModel = kRoot + "/models/SmolLM2-135M-Instruct.Q4_1.gguf";
const std::string kFixture = kRoot + "/tests/reference/fixtures/tokenizer_smollm2.json";
const std::string kWiki = "/work/shared/data/wikitext-2-raw/wiki.test.raw";

class SmolLM2Tokenizer : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    if (!std::filesystem::exists(kModel)) return;
    auto f = gguf::GgufFile::Open(kModel);
    ASSERT_TRUE(f.ok()) << f.status().ToString();
    auto t = Tokenizer::FromGguf(**f);
    ASSERT_TRUE(t.ok()) << t.status().ToString();
    tok_ = std::move(t).value().release();
    std::ifstream in(kFixture);
    ASSERT_TRUE(in.good()) << "missing " << kFixture;
    fixture_ = new nlohmann::json(nlohmann::json::parse(in));
  }
  static void TearDownTestSuite() {
    delete tok_;
    delete fixture_;
    tok_ = nullptr;
    fixture_ = nullptr;
  }
  void SetUp() override {
    if (tok_ == nullptr) GTEST_SKIP() << "model not found: " << kModel;
  }
  static Tokenizer* tok_;
  static nlohmann::json* fixture_;
};
Tokenizer* SmolLM2Tokenizer::tok_ = nullptr;
nlohmann::json* SmolLM2Tokenizer::fixture_ = nullptr;

TEST_F(SmolLM2Tokenizer, Metadata) {
  EXPECT_EQ(tok_->n_vocab(), 49152);
  EXPECT_EQ(tok_->n_vocab(), (*fixture_)["n_vocab"].get<int>());
  EXPECT_EQ(tok_->bos_id(), 1);
  EXPECT_EQ(tok_->eos_id(), 2);
  EXPECT_TRUE(tok_->IsEog(2));  // <|im_end|>
  EXPECT_TRUE(tok_->IsEog(0));  // <|endoftext|>
  EXPECT_FALSE(tok_->IsEog(1));
  EXPECT_FALSE(tok_->IsEog(19556));
  // add_bos_token is false in this GGUF: add_bos=true adds nothing.
  auto ids = tok_->Encode("Hello world", /*add_bos=*/true, /*parse_special=*/false);
  ASSERT_TRUE(ids.ok());
  EXPECT_EQ(*ids, (std::vector<int32_t>{19556, 905}));
}

TEST_F(SmolLM2Tokenizer, FixturesMatchReference) {
  int n = 0;
  for (const auto& c : (*fixture_)["cases"]) {
    const std::string text = c["text"];
    const bool special = c["parse_special"];
    const std::vector<int32_t> want = c["ids"].get<std::vector<int32_t>>();
    auto got = tok_->Encode(text, false, special);
    ASSERT_TRUE(got.ok()) << got.status().ToString();
    EXPECT_EQ(*got, want) << "text: '" << text << "' parse_special=" << special;
    EXPECT_EQ(tok_->Decode(*got), text);
    ++n;
  }
  EXPECT_GE(n, 30);
}

TEST_F(SmolLM2Tokenizer, ChatTemplateMatchesJinja) {
  const auto& chat = (*fixture_)["chat"];
  std::vector<ChatMessage> msgs;
  for (const auto& m : chat["messages"]) msgs.push_back({m["role"], m["content"]});
  auto with = tok_->ApplyChatTemplate(msgs, true);
  ASSERT_TRUE(with.ok()) << with.status().ToString();
  EXPECT_EQ(*with, chat["with_generation_prompt"].get<std::string>());
  auto without = tok_->ApplyChatTemplate(msgs, false);
  ASSERT_TRUE(without.ok());
  EXPECT_EQ(*without, chat["without_generation_prompt"].get<std::string>());
  std::vector<ChatMessage> sys;
  for (const auto& m : chat["with_system_messages"]) sys.push_back({m["role"], m["content"]});
  auto with_sys = tok_->ApplyChatTemplate(sys, true);
  ASSERT_TRUE(with_sys.ok());
  EXPECT_EQ(*with_sys, chat["with_system"].get<std::string>());
  // The rendered prompt tokenizes with the ChatML tokens as single ids.
  auto ids = tok_->Encode(*with, false, true);
  ASSERT_TRUE(ids.ok());
  EXPECT_EQ(ids->front(), tok_->TokenId("<|im_start|>"));
  EXPECT_EQ(tok_->Decode(*ids), *with);
}

TEST_F(SmolLM2Tokenizer, WikitextRoundTripAndSpeed) {
  std::ifstream in(kWiki, std::ios::binary);
  if (!in.good()) GTEST_SKIP() << "missing " << kWiki;
  std::stringstream ss;
  ss << in.rdbuf();
  const std::string text = ss.str();
  const auto t0 = std::chrono::steady_clock::now();
  auto ids = tok_->Encode(text, false, false);
  const double secs =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  ASSERT_TRUE(ids.ok()) << ids.status().ToString();
  std::printf("wiki.test.raw: %zu bytes -> %zu tokens in %.3f s\n", text.size(), ids->size(), secs);
  EXPECT_LT(secs, 10.0);
  EXPECT_EQ(tok_->Decode(*ids), text);
}

}  // namespace
}  // namespace kvc
