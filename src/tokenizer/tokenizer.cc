// Tokenizer: vocabulary loading (GGUF / VocabSpec), special-token splitting, decoding and the
// chat template. The encoding algorithms live in bpe.cc.
#include "tokenizer/tokenizer.h"

#include <algorithm>
#include <cstdio>
#include <utility>

namespace kvc {

namespace {

using gguf::MetaType;
using gguf::MetaValue;

// Reads an optional string array; NOT_FOUND only when `required`.
Status ReadStrArray(const gguf::GgufFile& f, std::string_view key, bool required,
                    std::vector<std::string>* out) {
  const MetaValue* v = f.Find(key);
  if (v == nullptr) {
    return required ? NotFound("GGUF has no " + std::string(key) + " (not a tokenizer-bearing model?)")
                    : Status::Ok();
  }
  if (v->type != MetaType::kArray || v->array_type != MetaType::kString) {
    return DataLoss("GGUF key " + std::string(key) + " must be an array of strings");
  }
  *out = v->str_array;
  return Status::Ok();
}

Status ReadBoolOr(const gguf::GgufFile& f, std::string_view key, bool dflt, bool* out) {
  *out = dflt;
  if (f.Find(key) == nullptr) return Status::Ok();
  KVC_ASSIGN_OR_RETURN(*out, f.GetBool(key));
  return Status::Ok();
}

// Control tokens that end a turn in common chat formats (as llama.cpp's EOG detection).
constexpr const char* kEogTexts[] = {
    "<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "<|eom_id|>",
    "<EOT>", "<|end_of_text|>", "<|return|>", "<|call|>", "<｜end▁of▁sentence｜>",
};

// Finds a jinja string literal that contains both `a` and `b`; returns its unescaped value.
std::string FindLiteralWith(const std::string& tmpl, std::string_view a, std::string_view b) {
  for (size_t at = tmpl.find(a); at != std::string::npos; at = tmpl.find(a, at + 1)) {
    // Walk back to the opening quote of the literal that contains `at`.
    size_t q = tmpl.find_last_of("'\"", at);
    if (q == std::string::npos) continue;
    const char quote = tmpl[q];
    std::string value;
    size_t i = q + 1;
    bool closed = false;
    for (; i < tmpl.size(); ++i) {
      const char c = tmpl[i];
      if (c == '\\' && i + 1 < tmpl.size()) {
        const char e = tmpl[++i];
        value += e == 'n' ? '\n' : e == 't' ? '\t' : e == 'r' ? '\r' : e;
      } else if (c == quote) {
        closed = true;
        break;
      } else {
        value += c;
      }
    }
    if (closed && value.find(a) == 0 && value.find(b) != std::string::npos) return value;
  }
  return "";
}

}  // namespace

StatusOr<std::unique_ptr<Tokenizer>> Tokenizer::FromGguf(const gguf::GgufFile& f) {
  VocabSpec spec;
  KVC_ASSIGN_OR_RETURN(spec.model, f.GetString("tokenizer.ggml.model"));
  if (f.Find("tokenizer.ggml.pre") != nullptr) {
    KVC_ASSIGN_OR_RETURN(spec.pre, f.GetString("tokenizer.ggml.pre"));
  }
  KVC_RETURN_IF_ERROR(ReadStrArray(f, "tokenizer.ggml.tokens", true, &spec.tokens));
  KVC_RETURN_IF_ERROR(ReadStrArray(f, "tokenizer.ggml.merges", false, &spec.merges));
  if (const MetaValue* v = f.Find("tokenizer.ggml.token_type")) {
    if (v->type != MetaType::kArray || v->array_type == MetaType::kString ||
        v->array_type == MetaType::kFloat32 || v->array_type == MetaType::kFloat64) {
      return DataLoss("GGUF key tokenizer.ggml.token_type must be an array of integers");
    }
    spec.token_types.assign(v->int_array.begin(), v->int_array.end());
  }
  if (const MetaValue* v = f.Find("tokenizer.ggml.scores")) {
    if (v->type != MetaType::kArray || v->array_type == MetaType::kString) {
      return DataLoss("GGUF key tokenizer.ggml.scores must be an array of numbers");
    }
    spec.scores.assign(v->num_array.begin(), v->num_array.end());
  }
  const std::pair<const char*, int32_t*> ids[] = {
      {"tokenizer.ggml.bos_token_id", &spec.bos_id},
      {"tokenizer.ggml.eos_token_id", &spec.eos_id},
      {"tokenizer.ggml.unknown_token_id", &spec.unk_id},
      {"tokenizer.ggml.eot_token_id", &spec.eot_id},
      {"tokenizer.ggml.eom_token_id", &spec.eom_id},
  };
  for (const auto& [key, dst] : ids) {
    KVC_ASSIGN_OR_RETURN(int64_t v, f.GetIntOr(key, -1));
    if (v < -1 || v >= static_cast<int64_t>(spec.tokens.size())) {
      return DataLoss(std::string(key) + " = " + std::to_string(v) + " is outside the vocabulary"
                      " of " + std::to_string(spec.tokens.size()) + " tokens");
    }
    *dst = static_cast<int32_t>(v);
  }
  // llama.cpp defaults: SentencePiece vocabularies add BOS and a space prefix, BPE ones do not.
  const bool spm = spec.model == "llama";
  KVC_RETURN_IF_ERROR(ReadBoolOr(f, "tokenizer.ggml.add_bos_token", spm, &spec.add_bos));
  KVC_RETURN_IF_ERROR(ReadBoolOr(f, "tokenizer.ggml.add_space_prefix", true,
                                 &spec.add_space_prefix));
  if (f.Find("tokenizer.chat_template") != nullptr) {
    KVC_ASSIGN_OR_RETURN(spec.chat_template, f.GetString("tokenizer.chat_template"));
  }
  return FromVocab(std::move(spec));
}

StatusOr<std::unique_ptr<Tokenizer>> Tokenizer::FromVocab(VocabSpec spec) {
  std::unique_ptr<Tokenizer> t(new Tokenizer());
  KVC_RETURN_IF_ERROR(t->Init(std::move(spec)));
  return t;
}

Status Tokenizer::Init(VocabSpec spec) {
  const size_t n = spec.tokens.size();
  if (n == 0) return DataLoss("tokenizer.ggml.tokens is empty");
  if (n > static_cast<size_t>(INT32_MAX)) return DataLoss("vocabulary too large");
  if (spec.model == "gpt2") {
    model_ = Model::kBpe;
  } else if (spec.model == "llama") {
    model_ = Model::kSpm;
  } else {
    return Unimplemented("tokenizer.ggml.model = '" + spec.model +
                         "' is not supported (supported: 'gpt2' byte-level BPE, 'llama' "
                         "SentencePiece BPE)");
  }
  if (spec.token_types.empty()) spec.token_types.assign(n, 1);
  if (spec.token_types.size() != n) {
    return DataLoss("tokenizer.ggml.token_type has " + std::to_string(spec.token_types.size()) +
                    " entries for " + std::to_string(n) + " tokens");
  }
  if (spec.scores.empty()) spec.scores.assign(n, 0.0f);
  if (spec.scores.size() != n) {
    return DataLoss("tokenizer.ggml.scores has " + std::to_string(spec.scores.size()) +
                    " entries for " + std::to_string(n) + " tokens");
  }
  for (int32_t id : {spec.bos_id, spec.eos_id, spec.unk_id, spec.eot_id, spec.eom_id}) {
    if (id < -1 || id >= static_cast<int64_t>(n)) {
      return DataLoss("special token id " + std::to_string(id) + " is outside the vocabulary");
    }
  }
  tokens_ = std::move(spec.tokens);
  types_ = std::move(spec.token_types);
  scores_ = std::move(spec.scores);
  bos_id_ = spec.bos_id;
  eos_id_ = spec.eos_id;
  unk_id_ = spec.unk_id;
  add_bos_ = spec.add_bos;
  add_space_prefix_ = spec.add_space_prefix;
  chat_template_ = std::move(spec.chat_template);

  token_to_id_.reserve(n);
  for (size_t i = 0; i < n; ++i) token_to_id_.emplace(tokens_[i], static_cast<int32_t>(i));

  auto is_special = [&](int32_t id) {
    const auto ty = static_cast<TokenType>(types_[id]);
    return ty == TokenType::kControl || ty == TokenType::kUserDefined || ty == TokenType::kUnknown;
  };
  // Decoded bytes of every token.
  pieces_.resize(n);
  for (size_t i = 0; i < n; ++i) {
    const std::string& tok = tokens_[i];
    if (is_special(static_cast<int32_t>(i))) {
      pieces_[i] = tok;
    } else if (model_ == Model::kBpe) {
      if (!tokenizer_internal::UnicodeToBytes(tok, &pieces_[i])) pieces_[i] = tok;
    } else if (static_cast<TokenType>(types_[i]) == TokenType::kByte && tok.size() == 6 &&
               tok.rfind("<0x", 0) == 0 && tok[5] == '>') {
      pieces_[i] = std::string(1, static_cast<char>(std::stoi(tok.substr(3, 2), nullptr, 16)));
    } else {
      std::string& p = pieces_[i];
      for (size_t k = 0; k < tok.size(); ++k) {
        if (tok.compare(k, 3, "\xE2\x96\x81") == 0) {
          p += ' ';
          k += 2;
        } else {
          p += tok[k];
        }
      }
    }
  }
  // Byte tokens.
  for (int b = 0; b < 256; ++b) {
    std::string key;
    if (model_ == Model::kBpe) {
      key = tokenizer_internal::ByteToUnicode()[b];
    } else {
      char buf[8];
      std::snprintf(buf, sizeof(buf), "<0x%02X>", b);
      key = buf;
    }
    auto it = token_to_id_.find(key);
    byte_tokens_[b] = it == token_to_id_.end() ? -1 : it->second;
  }
  // Merges (rank = index). Pairs whose parts or result are not tokens can never apply.
  if (model_ == Model::kBpe) {
    merges_.reserve(spec.merges.size());
    for (size_t r = 0; r < spec.merges.size(); ++r) {
      const std::string& m = spec.merges[r];
      const size_t sp = m.find(' ', 1);
      if (sp == std::string::npos) {
        return DataLoss("tokenizer.ggml.merges[" + std::to_string(r) + "] = '" + m +
                        "' is not of the form 'left right'");
      }
      auto l = token_to_id_.find(m.substr(0, sp));
      auto rt = token_to_id_.find(m.substr(sp + 1));
      auto merged = token_to_id_.find(m.substr(0, sp) + m.substr(sp + 1));
      if (l == token_to_id_.end() || rt == token_to_id_.end() || merged == token_to_id_.end()) {
        continue;
      }
      const uint64_t key = (static_cast<uint64_t>(l->second) << 32) |
                           static_cast<uint32_t>(rt->second);
      merges_.emplace(key, std::make_pair(static_cast<int32_t>(r), merged->second));
    }
    KVC_RETURN_IF_ERROR(InitPreTokenizer(spec.pre.empty() ? "default" : spec.pre));
  }
  // Special tokens, longest text first.
  for (size_t i = 0; i < n; ++i) {
    if (tokens_[i].empty() || !is_special(static_cast<int32_t>(i))) continue;
    auto& dst = static_cast<TokenType>(types_[i]) == TokenType::kUserDefined ? specials_always_
                                                                             : specials_parse_;
    dst.push_back(static_cast<int32_t>(i));
  }
  auto longer = [&](int32_t a, int32_t b) { return tokens_[a].size() > tokens_[b].size(); };
  std::stable_sort(specials_always_.begin(), specials_always_.end(), longer);
  std::stable_sort(specials_parse_.begin(), specials_parse_.end(), longer);
  // End-of-generation set.
  eog_.assign(n, false);
  for (int32_t id : {spec.eos_id, spec.eot_id, spec.eom_id}) {
    if (id >= 0) eog_[id] = true;
  }
  for (const char* text : kEogTexts) {
    const int32_t id = TokenId(text);
    if (id >= 0 && static_cast<TokenType>(types_[id]) == TokenType::kControl) eog_[id] = true;
  }
  // ChatML default system prompt, if the template has one.
  if (chat_template_.find("<|im_start|>") != std::string::npos) {
    chat_default_system_ = FindLiteralWith(chat_template_, "<|im_start|>system", "<|im_end|>");
  }
  return Status::Ok();
}

int32_t Tokenizer::TokenId(std::string_view token) const {
  auto it = token_to_id_.find(std::string(token));
  return it == token_to_id_.end() ? -1 : it->second;
}

bool Tokenizer::IsEog(int32_t id) const {
  return id >= 0 && id < n_vocab() && eog_[id];
}

StatusOr<std::vector<int32_t>> Tokenizer::Encode(std::string_view text, bool add_bos,
                                                 bool parse_special) const {
  KVC_RETURN_IF_ERROR(tokenizer_internal::ValidateUtf8(text));
  std::vector<int32_t> out;
  out.reserve(text.size() / 3 + 2);
  if (add_bos && add_bos_ && bos_id_ >= 0) out.push_back(bos_id_);
  std::unordered_map<std::string, std::vector<int32_t>> cache;
  bool prev_special = true;
  auto emit_text = [&](std::string_view frag) {
    if (frag.empty()) return;
    if (model_ == Model::kBpe) {
      EncodeBpe(frag, &cache, &out);
    } else if (add_space_prefix_ && prev_special) {
      EncodeSpm(" " + std::string(frag), &out);
    } else {
      EncodeSpm(frag, &out);
    }
    prev_special = false;
  };

  std::vector<int32_t> cands = specials_always_;
  if (parse_special) {
    cands.insert(cands.end(), specials_parse_.begin(), specials_parse_.end());
    std::stable_sort(cands.begin(), cands.end(), [&](int32_t a, int32_t b) {
      return tokens_[a].size() > tokens_[b].size();
    });
  }
  // Leftmost-longest scan; next occurrence of each candidate at or after `pos` is cached.
  std::vector<size_t> occ(cands.size(), 0);
  std::vector<bool> known(cands.size(), false);
  size_t pos = 0;
  while (!cands.empty()) {
    size_t best_at = std::string_view::npos;
    int best = -1;
    for (size_t k = 0; k < cands.size(); ++k) {
      if (!known[k] || (occ[k] != std::string_view::npos && occ[k] < pos)) {
        occ[k] = text.find(tokens_[cands[k]], pos);
        known[k] = true;
      }
      if (occ[k] < best_at) {  // strict: the longer of equal positions wins (sorted longest first)
        best_at = occ[k];
        best = static_cast<int>(k);
      }
    }
    if (best < 0) break;
    emit_text(text.substr(pos, best_at - pos));
    out.push_back(cands[best]);
    prev_special = true;
    pos = best_at + tokens_[cands[best]].size();
  }
  emit_text(text.substr(pos));
  return out;
}

std::string Tokenizer::TokenToPiece(int32_t id) const {
  if (id < 0 || id >= n_vocab()) return "";
  return pieces_[id];
}

std::string Tokenizer::Decode(const std::vector<int32_t>& ids) const {
  std::string out;
  bool strip = model_ == Model::kSpm && add_space_prefix_;
  for (int32_t id : ids) {
    if (id < 0 || id >= n_vocab()) continue;
    const std::string& p = pieces_[id];
    const auto ty = static_cast<TokenType>(types_[id]);
    if (ty == TokenType::kControl || ty == TokenType::kUserDefined) {
      out += p;
      strip = model_ == Model::kSpm && add_space_prefix_;
      continue;
    }
    if (strip && !p.empty() && p[0] == ' ') {
      out.append(p, 1);
    } else {
      out += p;
    }
    strip = false;
  }
  return out;
}

StatusOr<std::string> Tokenizer::ApplyChatTemplate(const std::vector<ChatMessage>& msgs,
                                                   bool add_generation_prompt) const {
  if (chat_template_.empty()) {
    return NotFound("the model has no chat template (tokenizer.chat_template)");
  }
  if (chat_template_.find("<|im_start|>") == std::string::npos) {
    return Unimplemented("chat template not recognised (only ChatML is implemented); it starts: " +
                         chat_template_.substr(0, 80));
  }
  std::string out;
  for (size_t i = 0; i < msgs.size(); ++i) {
    if (i == 0 && msgs[0].role != "system") out += chat_default_system_;
    out += "<|im_start|>" + msgs[i].role + "\n" + msgs[i].content + "<|im_end|>\n";
  }
  if (add_generation_prompt) out += "<|im_start|>assistant\n";
  return out;
}

}  // namespace kvc
