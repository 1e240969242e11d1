// Tokenizer driven by GGUF metadata (tokenizer.ggml.*).
//
// Sources of truth, all read by FromGguf():
//   tokenizer.ggml.model        "gpt2"  byte-level BPE (GPT-2 byte<->unicode alphabet, ranked merges)
//                               "llama" SentencePiece-style BPE (scores, "▁" for space, <0xXX>
//                                       byte fallback)
//   tokenizer.ggml.pre          pre-tokenizer regex set for "gpt2" (see kPreTokenizers in bpe.cc;
//                               lists follow llama.cpp's llama-vocab.cpp). Missing -> "default"
//                               (as llama.cpp); unknown name -> UNIMPLEMENTED naming it.
//   tokenizer.ggml.tokens       [n_vocab] string
//   tokenizer.ggml.token_type   [n_vocab] int (1 normal, 2 unknown, 3 control, 4 user-defined,
//                               5 unused, 6 byte); absent -> all normal
//   tokenizer.ggml.scores       [n_vocab] f32, "llama" only
//   tokenizer.ggml.merges       [n_merges] "left right", "gpt2" only; rank = index
//   tokenizer.ggml.{bos,eos,unknown,eot,eom}_token_id, tokenizer.ggml.add_bos_token,
//   tokenizer.ggml.add_space_prefix ("llama"), tokenizer.chat_template.
//
// Special tokens: control (3) and unknown (2) tokens are recognised in text only with
// parse_special; user-defined (4) tokens are always recognised (as llama.cpp and HF added tokens
// do). Matching is leftmost-longest (as HF's added-token matcher).
//
// A Tokenizer is immutable after construction; Encode/Decode are safe to call concurrently.
#pragma once

#include <array>
#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

#include "gguf/gguf.h"
#include "kvcrunch/status.h"

namespace kvc {

struct ChatMessage {
  std::string role, content;
};

// Token types as stored in tokenizer.ggml.token_type.
enum class TokenType : int32_t {
  kUndefined = 0, kNormal = 1, kUnknown = 2, kControl = 3, kUserDefined = 4, kUnused = 5,
  kByte = 6,
};

// Everything the tokenizer needs, independent of where it came from (GGUF, or a hand-made
// vocabulary in tests). Ids are -1 when absent.
struct VocabSpec {
  std::string model = "gpt2";            // "gpt2" | "llama"
  std::string pre = "default";           // pre-tokenizer name ("gpt2" model only)
  std::vector<std::string> tokens;       // [n_vocab]
  std::vector<int32_t> token_types;      // [n_vocab] TokenType values, or empty (all normal)
  std::vector<float> scores;             // [n_vocab] "llama" only (empty -> all 0)
  std::vector<std::string> merges;       // [n_merges] "left right", rank = index; "gpt2" only
  int32_t bos_id = -1, eos_id = -1, unk_id = -1, eot_id = -1, eom_id = -1;
  bool add_bos = false;                  // Encode(add_bos=true) only adds BOS when this is set
  bool add_space_prefix = true;          // "llama" only: prepend "▁" to text fragments
  std::string chat_template;             // jinja text, may be empty
};

class Tokenizer {
 public:
  // Reads the keys listed above. Errors: NOT_FOUND (tokens / model missing), DATA_LOSS (array
  // lengths disagree, ids out of range, merge not "a b"), UNIMPLEMENTED (model other than
  // "gpt2"/"llama", unknown pre-tokenizer).
  static StatusOr<std::unique_ptr<Tokenizer>> FromGguf(const gguf::GgufFile& f);
  // Same validation for a vocabulary given directly (tests).
  static StatusOr<std::unique_ptr<Tokenizer>> FromVocab(VocabSpec spec);
  ~Tokenizer();
  Tokenizer(const Tokenizer&) = delete;
  Tokenizer& operator=(const Tokenizer&) = delete;

  // Text -> ids [n_tokens]. INVALID_ARGUMENT for text that is not valid UTF-8 (naming the byte
  // offset). add_bos: prepend bos_id() when the vocabulary says so (tokenizer.ggml.add_bos_token)
  // and a BOS exists. parse_special: recognise control tokens written literally in text
  // (e.g. "<|im_start|>"); without it they are tokenized as plain text. Empty text -> [] (or
  // [bos]). Pieces that are not in the vocabulary even as bytes map to the unknown token if there
  // is one and are dropped otherwise.
  StatusOr<std::vector<int32_t>> Encode(std::string_view text, bool add_bos,
                                        bool parse_special) const;
  // Bytes of one token (may be a partial UTF-8 sequence). Control / user-defined tokens give their
  // text ("<|im_end|>"); ids out of range give "".
  std::string TokenToPiece(int32_t id) const;
  // Concatenation of TokenToPiece; for "llama" with add_space_prefix the space Encode added in
  // front of the first text fragment is removed, so Decode(Encode(s)) == s.
  std::string Decode(const std::vector<int32_t>& ids) const;

  int32_t n_vocab() const { return static_cast<int32_t>(tokens_.size()); }
  int32_t bos_id() const { return bos_id_; }
  int32_t eos_id() const { return eos_id_; }
  // End of generation: eos, eot, eom, and control tokens such as <|im_end|>, <|endoftext|>,
  // <|eot_id|>, <end_of_turn>.
  bool IsEog(int32_t id) const;
  // Token id for an exact token string, -1 if absent.
  int32_t TokenId(std::string_view token) const;
  const std::string& TokenText(int32_t id) const { return tokens_.at(id); }

  // Renders the conversation with the model's chat template. Recognised: ChatML (template text
  // contains "<|im_start|>"), including a default system prompt when the template inserts one for
  // conversations that do not start with a system message (the prompt text is read from the
  // template, e.g. SmolLM2's "You are a helpful AI assistant named SmolLM, ..."). UNIMPLEMENTED
  // for other templates, NOT_FOUND when the model has none.
  StatusOr<std::string> ApplyChatTemplate(const std::vector<ChatMessage>& msgs,
                                          bool add_generation_prompt) const;

 private:
  struct PreTokenizer;  // compiled PCRE2 regexes, bpe.cc
  enum class Model { kBpe, kSpm };

  Tokenizer();
  Status Init(VocabSpec spec);
  // Builds pre_ for a pre-tokenizer name; sets ignore_merges_ for llama3-style vocabs (bpe.cc).
  Status InitPreTokenizer(const std::string& pre);
  // Appends the ids of one text fragment (no special tokens inside) to `out`.
  void EncodeBpe(std::string_view text,
                 std::unordered_map<std::string, std::vector<int32_t>>* cache,
                 std::vector<int32_t>* out) const;
  void BpeWord(std::string_view word, std::vector<int32_t>* out) const;
  void EncodeSpm(std::string_view text, std::vector<int32_t>* out) const;
  void PushBytes(std::string_view bytes, std::vector<int32_t>* out) const;

  Model model_ = Model::kBpe;
  std::vector<std::string> tokens_;        // [n_vocab] as stored
  std::vector<int32_t> types_;             // [n_vocab]
  std::vector<float> scores_;              // [n_vocab]
  std::vector<std::string> pieces_;        // [n_vocab] decoded bytes
  std::unordered_map<std::string, int32_t> token_to_id_;
  // BPE merges: (left_id << 32 | right_id) -> (rank, merged_id).
  std::unordered_map<uint64_t, std::pair<int32_t, int32_t>> merges_;
  std::array<int32_t, 256> byte_tokens_{};  // byte -> token id (-1 if absent)
  std::vector<int32_t> specials_always_;    // user-defined ids, longest text first
  std::vector<int32_t> specials_parse_;     // control/unknown ids, longest text first
  std::vector<bool> eog_;                   // [n_vocab]
  std::unique_ptr<PreTokenizer> pre_;
  bool ignore_merges_ = false;              // llama3: a word in the vocab is one token
  bool add_bos_ = false;
  bool add_space_prefix_ = true;
  int32_t bos_id_ = -1, eos_id_ = -1, unk_id_ = -1;
  std::string chat_template_;
  // ChatML: text the template emits before a conversation that does not start with a system
  // message (a complete "<|im_start|>system\n...<|im_end|>\n" literal), or empty.
  std::string chat_default_system_;
};

namespace tokenizer_internal {
// Returns OK or INVALID_ARGUMENT naming the byte offset of the first invalid sequence.
Status ValidateUtf8(std::string_view s);
// GPT-2 byte-level alphabet: byte -> UTF-8 of its code point, and the inverse.
const std::array<std::string, 256>& ByteToUnicode();
// Decodes a byte-level token string; returns false if it contains a char outside the alphabet.
bool UnicodeToBytes(std::string_view s, std::string* out);
}  // namespace tokenizer_internal

}  // namespace kvc
