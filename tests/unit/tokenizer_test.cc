// Tokenizer on tiny hand-made vocabularies (no model file).
#include <gtest/gtest.h>

#include "tokenizer/tokenizer.h"

namespace kvc {
namespace {

using tokenizer_internal::ByteToUnicode;

// Byte-level vocabulary: ids 0..255 are the byte tokens in byte order, then the merge results and
// the special tokens below.
VocabSpec ByteLevelSpec(std::vector<std::string> merges, std::string pre = "gpt2") {
  VocabSpec s;
  s.model = "gpt2";
  s.pre = std::move(pre);
  for (int b = 0; b < 256; ++b) s.tokens.push_back(ByteToUnicode()[b]);
  s.token_types.assign(256, 1);
  for (const char* t : {"ab", "bc", "abc", "aa", "Ġa", "12", "Ġab"}) {
    s.tokens.push_back(t);
    s.token_types.push_back(1);
  }
  for (const auto& [t, ty] : std::vector<std::pair<std::string, int>>{
           {"<|s|>", 3}, {"<|s|>x", 3}, {"<user>", 4}, {"<|end|>", 3}}) {
    s.tokens.push_back(t);
    s.token_types.push_back(ty);
  }
  s.merges = std::move(merges);
  s.bos_id = 263;  // <|s|>
  s.eos_id = 266;  // <|end|>
  return s;
}

std::unique_ptr<Tokenizer> Make(VocabSpec spec) {
  auto t = Tokenizer::FromVocab(std::move(spec));
  EXPECT_TRUE(t.ok()) << t.status().ToString();
  return t.ok() ? std::move(t).value() : nullptr;
}

std::vector<int32_t> Enc(const Tokenizer& t, std::string_view s, bool special = false) {
  auto r = t.Encode(s, false, special);
  EXPECT_TRUE(r.ok()) << r.status().ToString();
  return r.ok() ? *r : std::vector<int32_t>{};
}

int32_t B(char c) { return static_cast<uint8_t>(c); }  // byte token id

TEST(TokenizerTest, MergeOrderFollowsRank) {
  auto t1 = Make(ByteLevelSpec({"a b", "b c", "ab c"}));
  auto t2 = Make(ByteLevelSpec({"b c", "a b", "ab c"}));
  const int32_t ab = t1->TokenId("ab"), bc = t1->TokenId("bc"), abc = t1->TokenId("abc");
  EXPECT_EQ(Enc(*t1, "abc"), (std::vector<int32_t>{abc}));
  EXPECT_EQ(Enc(*t2, "abc"), (std::vector<int32_t>{B('a'), bc}));
  EXPECT_EQ(Enc(*t1, "ab"), (std::vector<int32_t>{ab}));
}

TEST(TokenizerTest, EqualRankMergesLeftmostFirst) {
  auto t = Make(ByteLevelSpec({"a a"}));
  const int32_t aa = t->TokenId("aa");
  EXPECT_EQ(Enc(*t, "aaa"), (std::vector<int32_t>{aa, B('a')}));
  EXPECT_EQ(Enc(*t, "aaaa"), (std::vector<int32_t>{aa, aa}));
}

TEST(TokenizerTest, PreTokenizerSplitsWords) {
  auto t = Make(ByteLevelSpec({"Ġ a", "a b", "Ġa b"}));
  // " ab" is one pre-token ("Ġab"); "ab ab" -> "ab", "Ġab".
  EXPECT_EQ(Enc(*t, "ab ab"),
            (std::vector<int32_t>{t->TokenId("ab"), t->TokenId("Ġab")}));
  // Merges never cross pre-token boundaries: "a" + "," are separate words.
  EXPECT_EQ(Enc(*t, "b,a"), (std::vector<int32_t>{B('b'), B(','), B('a')}));
}

TEST(TokenizerTest, DigitsSplitIndividuallyOnlyForSmollm) {
  auto gpt2 = Make(ByteLevelSpec({"1 2"}, "gpt2"));
  auto smollm = Make(ByteLevelSpec({"1 2"}, "smollm"));
  EXPECT_EQ(Enc(*gpt2, "12"), (std::vector<int32_t>{gpt2->TokenId("12")}));
  EXPECT_EQ(Enc(*smollm, "12"), (std::vector<int32_t>{B('1'), B('2')}));
}

TEST(TokenizerTest, FallsBackToByteLevelAlphabet) {
  auto t = Make(ByteLevelSpec({"a b"}));
  // "é" = C3 A9 has no merge: one token per byte; emoji likewise.
  EXPECT_EQ(Enc(*t, "é"), (std::vector<int32_t>{0xC3, 0xA9}));
  EXPECT_EQ(Enc(*t, "😀"), (std::vector<int32_t>{0xF0, 0x9F, 0x98, 0x80}));
  EXPECT_EQ(t->TokenToPiece(0xC3), "\xC3");  // partial UTF-8 sequence
  EXPECT_EQ(t->Decode(Enc(*t, "é😀 ab\n\t")), "é😀 ab\n\t");
}

TEST(TokenizerTest, SpecialTokensSplitLongestFirst) {
  auto t = Make(ByteLevelSpec({"a b"}));
  const int32_t s = t->TokenId("<|s|>"), sx = t->TokenId("<|s|>x"), user = t->TokenId("<user>");
  EXPECT_EQ(Enc(*t, "ab<|s|>ab", true), (std::vector<int32_t>{t->TokenId("ab"), s, t->TokenId("ab")}));
  EXPECT_EQ(Enc(*t, "<|s|>x<|s|>", true), (std::vector<int32_t>{sx, s}));
  // Without parse_special control tokens are plain text...
  std::vector<int32_t> plain = Enc(*t, "<|s|>", false);
  EXPECT_EQ(plain.size(), 5u);
  EXPECT_EQ(t->Decode(plain), "<|s|>");
  // ...but user-defined tokens are always recognised.
  EXPECT_EQ(Enc(*t, "a<user>", false), (std::vector<int32_t>{B('a'), user}));
  EXPECT_EQ(t->Decode({s, t->TokenId("ab"), user}), "<|s|>ab<user>");
}

TEST(TokenizerTest, InvalidUtf8IsAnError) {
  auto t = Make(ByteLevelSpec({}));
  for (const auto& [text, offset] : std::vector<std::pair<std::string, std::string>>{
           {"ab\xff" "cd", "offset 2"},       // invalid lead byte
           {"abc\xe2\x82", "offset 3"},       // truncated
           {"\xc0\xaf", "offset 0"},          // overlong
           {"x\xed\xa0\x80", "offset 1"},     // surrogate
           {"xy\xf4\x90\x80\x80", "offset 2"},  // > U+10FFFF
           {"\x80", "offset 0"}}) {           // stray continuation
    auto r = t->Encode(text, false, false);
    ASSERT_FALSE(r.ok());
    EXPECT_EQ(r.status().code(), StatusCode::kInvalidArgument);
    EXPECT_NE(r.status().message().find(offset), std::string::npos) << r.status().message();
  }
}

TEST(TokenizerTest, EmptyTextAndBos) {
  auto t = Make(ByteLevelSpec({}));
  EXPECT_TRUE(Enc(*t, "").empty());
  auto with_bos = t->Encode("", true, false);  // add_bos_token unset: no BOS
  ASSERT_TRUE(with_bos.ok());
  EXPECT_TRUE(with_bos->empty());
  VocabSpec spec = ByteLevelSpec({});
  spec.add_bos = true;
  auto tb = Make(std::move(spec));
  auto r = tb->Encode("", true, false);
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(*r, (std::vector<int32_t>{263}));
  EXPECT_EQ(tb->bos_id(), 263);
}

TEST(TokenizerTest, EndOfGeneration) {
  auto t = Make(ByteLevelSpec({}));
  EXPECT_TRUE(t->IsEog(t->eos_id()));
  EXPECT_TRUE(t->IsEog(t->TokenId("<|end|>")));
  EXPECT_FALSE(t->IsEog(B('a')));
  EXPECT_FALSE(t->IsEog(-1));
  EXPECT_FALSE(t->IsEog(1 << 20));
}

TEST(TokenizerTest, BadVocabulariesAreRejected) {
  VocabSpec s = ByteLevelSpec({});
  s.pre = "no-such-pre";
  EXPECT_EQ(Tokenizer::FromVocab(s).status().code(), StatusCode::kUnimplemented);
  s = ByteLevelSpec({});
  s.model = "bert";
  EXPECT_EQ(Tokenizer::FromVocab(s).status().code(), StatusCode::kUnimplemented);
  s = ByteLevelSpec({});
  s.token_types.pop_back();
  EXPECT_EQ(Tokenizer::FromVocab(s).status().code(), StatusCode::kDataLoss);
  s = ByteLevelSpec({"nospace"});
  EXPECT_EQ(Tokenizer::FromVocab(s).status().code(), StatusCode::kDataLoss);
  s = ByteLevelSpec({});
  s.eos_id = 100000;
  EXPECT_EQ(Tokenizer::FromVocab(s).status().code(), StatusCode::kDataLoss);
  s = ByteLevelSpec({});
  s.tokens.clear();
  s.token_types.clear();
  EXPECT_EQ(Tokenizer::FromVocab(s).status().code(), StatusCode::kDataLoss);
}

TEST(TokenizerTest, ChatMlTemplate) {
  VocabSpec s = ByteLevelSpec({});
  auto none = Make(s);
  EXPECT_EQ(none->ApplyChatTemplate({{"user", "hi"}}, true).status().code(),
            StatusCode::kNotFound);
  s.chat_template = "{{ bos_token }}{% for m in messages %}[INST] ...";
  EXPECT_EQ(Make(s)->ApplyChatTemplate({{"user", "hi"}}, true).status().code(),
            StatusCode::kUnimplemented);
  s.chat_template =
      "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + "
      "message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}"
      "{{ '<|im_start|>assistant\\n' }}{% endif %}";
  auto plain = Make(s);
  auto r = plain->ApplyChatTemplate({{"user", "hi"}, {"assistant", "yo"}}, true);
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(*r, "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nyo<|im_end|>\n"
                "<|im_start|>assistant\n");
  // A default system prompt literal (SmolLM2 style) is used when the first message is not system.
  s.chat_template =
      "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
      "{{ '<|im_start|>system\nBe nice.<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + "
      "message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}";
  auto smol = Make(s);
  r = smol->ApplyChatTemplate({{"user", "hi"}}, false);
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(*r, "<|im_start|>system\nBe nice.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n");
  r = smol->ApplyChatTemplate({{"system", "S"}, {"user", "hi"}}, false);
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(*r, "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n");
}

// SentencePiece-style ("llama") vocabulary.
VocabSpec SpmSpec() {
  VocabSpec s;
  s.model = "llama";
  s.tokens = {"<unk>", "<s>", "</s>"};
  s.token_types = {2, 3, 3};
  s.scores = {0, 0, 0};
  for (int b = 0; b < 256; ++b) {
    char buf[8];
    std::snprintf(buf, sizeof(buf), "<0x%02X>", b);
    s.tokens.push_back(buf);
    s.token_types.push_back(6);
    s.scores.push_back(0);
  }
  const std::vector<std::pair<std::string, float>> words = {
      {"\xE2\x96\x81", -1}, {"a", -2}, {"b", -2}, {"\xE2\x96\x81" "a", -3}, {"ab", -4},
      {"\xE2\x96\x81" "ab", -1.5}};
  for (const auto& [w, score] : words) {
    s.tokens.push_back(w);
    s.token_types.push_back(1);
    s.scores.push_back(score);
  }
  s.unk_id = 0, s.bos_id = 1, s.eos_id = 2;
  s.add_bos = true;
  return s;
}

TEST(TokenizerTest, SentencePieceScoresAndByteFallback) {
  auto t = Make(SpmSpec());
  const int32_t sp = t->TokenId("\xE2\x96\x81"), sp_ab = t->TokenId("\xE2\x96\x81" "ab");
  auto r = t->Encode("ab", true, false);
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(*r, (std::vector<int32_t>{1, sp_ab}));
  // "é" is not in the vocabulary: <0xC3><0xA9>.
  auto e = Enc(*t, "ab é");
  EXPECT_EQ(e, (std::vector<int32_t>{sp_ab, sp, 3 + 0xC3, 3 + 0xA9}));
  EXPECT_EQ(t->Decode(e), "ab é");
  EXPECT_EQ(t->Decode(*r), "<s>ab");
  EXPECT_EQ(t->TokenToPiece(3 + 0x41), "A");
}

}  // namespace
}  // namespace kvc
