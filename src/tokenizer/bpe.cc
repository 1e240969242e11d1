// Encoding algorithms: UTF-8 validation, the GPT-2 byte-level alphabet, PCRE2 pre-tokenization,
// byte-level BPE ("gpt2") and SentencePiece-style BPE ("llama").
#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <queue>
#include <utility>

#include "tokenizer/tokenizer.h"

namespace kvc {
namespace tokenizer_internal {

Status ValidateUtf8(std::string_view s) {
  const auto* p = reinterpret_cast<const uint8_t*>(s.data());
  const size_t n = s.size();
  size_t i = 0;
  while (i < n) {
    const uint8_t c = p[i];
    if (c < 0x80) {
      ++i;
      continue;
    }
    int len = 0;
    uint32_t cp = 0;
    if ((c & 0xE0) == 0xC0) {
      len = 2, cp = c & 0x1F;
    } else if ((c & 0xF0) == 0xE0) {
      len = 3, cp = c & 0x0F;
    } else if ((c & 0xF8) == 0xF0) {
      len = 4, cp = c & 0x07;
    }
    bool ok = len > 0 && i + len <= n;
    for (int k = 1; ok && k < len; ++k) {
      ok = (p[i + k] & 0xC0) == 0x80;
      cp = (cp << 6) | (p[i + k] & 0x3F);
    }
    if (ok) {
      static constexpr uint32_t kMin[5] = {0, 0, 0x80, 0x800, 0x10000};
      ok = cp >= kMin[len] && cp <= 0x10FFFF && !(cp >= 0xD800 && cp <= 0xDFFF);
    }
    if (!ok) {
      char buf[96];
      std::snprintf(buf, sizeof(buf), "text is not valid UTF-8: bad sequence starting with 0x%02X "
                    "at byte offset %zu", c, i);
      return InvalidArgument(buf);
    }
    i += len;
  }
  return Status::Ok();
}

namespace {

void AppendUtf8(uint32_t cp, std::string* out) {
  if (cp < 0x80) {
    out->push_back(static_cast<char>(cp));
  } else if (cp < 0x800) {
    out->push_back(static_cast<char>(0xC0 | (cp >> 6)));
    out->push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  } else if (cp < 0x10000) {
    out->push_back(static_cast<char>(0xE0 | (cp >> 12)));
    out->push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
    out->push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  } else {
    out->push_back(static_cast<char>(0xF0 | (cp >> 18)));
    out->push_back(static_cast<char>(0x80 | ((cp >> 12) & 0x3F)));
    out->push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
    out->push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  }
}

// Code point -> byte for the byte-level alphabet (all code points are < 324).
struct ByteTables {
  std::array<std::string, 256> to_unicode;
  std::array<int16_t, 512> to_byte;
  ByteTables() {
    to_byte.fill(-1);
    int extra = 0;
    for (int b = 0; b < 256; ++b) {
      const bool printable = (b >= 33 && b <= 126) || (b >= 161 && b <= 172) || b >= 174;
      const uint32_t cp = printable ? b : 256 + extra++;
      AppendUtf8(cp, &to_unicode[b]);
      to_byte[cp] = static_cast<int16_t>(b);
    }
  }
};

const ByteTables& Tables() {
  static const ByteTables t;
  return t;
}

// Length of the UTF-8 sequence starting with lead byte c (1 for invalid leads).
inline size_t Utf8Len(uint8_t c) {
  if (c < 0x80) return 1;
  if ((c & 0xE0) == 0xC0) return 2;
  if ((c & 0xF0) == 0xE0) return 3;
  if ((c & 0xF8) == 0xF0) return 4;
  return 1;
}

}  // namespace

const std::array<std::string, 256>& ByteToUnicode() { return Tables().to_unicode; }

bool UnicodeToBytes(std::string_view s, std::string* out) {
  const auto& t = Tables();
  size_t i = 0;
  while (i < s.size()) {
    const auto c = static_cast<uint8_t>(s[i]);
    uint32_t cp;
    size_t len = Utf8Len(c);
    if (i + len > s.size()) return false;
    if (len == 1) {
      cp = c;
    } else if (len == 2) {
      cp = ((c & 0x1F) << 6) | (s[i + 1] & 0x3F);
    } else {
      return false;  // alphabet code points are all < 0x800
    }
    if (cp >= t.to_byte.size() || t.to_byte[cp] < 0) return false;
    out->push_back(static_cast<char>(t.to_byte[cp]));
    i += len;
  }
  return true;
}

}  // namespace tokenizer_internal

// ------------------------------------------------------------------------------------------------
// Pre-tokenizer: a sequence of regexes; each one splits every piece produced by the previous one
// into matches and the (non-empty) gaps between them, as llama.cpp's unicode_regex_split does and
// as an HF Sequence of Split pre-tokenizers does. Matching never looks beyond the current piece.

namespace {

struct PreTokenizerDef {
  std::vector<const char*> names;
  std::vector<const char*> regexes;
  bool ignore_merges;
};

constexpr const char* kGpt2Regex =
    "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)";
constexpr const char* kLlama3Regex =
    "(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|"
    "\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+";
constexpr const char* kQwen2Regex =
    "(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|"
    "\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+";

// Names and regex lists follow llama.cpp (src/llama-vocab.cpp, llm_tokenizer_bpe). The "smollm"
// set equals SmolLM2's tokenizer.json: Digits(individual_digits) then ByteLevel's GPT-2 regex.
const std::vector<PreTokenizerDef>& PreTokenizerDefs() {
  static const std::vector<PreTokenizerDef> defs = {
      {{"default"},
       {"[\\p{P}\\$\\+<=>\\^~\\|`]+", kGpt2Regex, "\\p{N}+", "[0-9][0-9][0-9]"},
       false},
      {{"llama3", "llama-v3", "llama-bpe", "falcon3", "pixtral", "dbrx", "smaug-bpe"},
       {kLlama3Regex},
       true},
      {{"qwen2", "deepseek-r1-qwen", "stablelm2", "megrez"}, {kQwen2Regex}, false},
      {{"gpt2", "gpt-2", "phi-2", "mpt", "olmo", "jina-es", "jina-de", "jina-v1-en", "jina-v2-es",
        "jina-v2-de", "jina-v2-code", "gigachat", "roberta-bpe"},
       {kGpt2Regex},
       false},
      {{"smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva-7b"},
       {"\\p{N}", kGpt2Regex},
       false},
      {{"falcon"}, {"[\\p{P}\\$\\+<=>\\^~\\|`]+", kGpt2Regex, "[0-9][0-9][0-9]"}, false},
  };
  return defs;
}

// PCRE2 (before 10.43) counts U+180E as \s under UCP; HF (Oniguruma) and llama.cpp use the
// Unicode White_Space property. Rewrites \s and \S to that explicit set.
constexpr const char* kWhiteSpace =
    "\\t-\\r\\x{20}\\x{85}\\x{a0}\\x{1680}\\x{2000}-\\x{200a}\\x{2028}\\x{2029}\\x{202f}"
    "\\x{205f}\\x{3000}";

std::string ExpandWhiteSpace(std::string_view rx) {
  std::string out;
  bool in_class = false;
  for (size_t i = 0; i < rx.size(); ++i) {
    const char c = rx[i];
    if (c == '\\' && i + 1 < rx.size()) {
      const char e = rx[++i];
      if (e == 's') {
        out += in_class ? std::string(kWhiteSpace) : "[" + std::string(kWhiteSpace) + "]";
      } else if (e == 'S' && !in_class) {
        out += "[^" + std::string(kWhiteSpace) + "]";
      } else {
        out += c;
        out += e;
      }
      continue;
    }
    if (c == '[') in_class = true;
    if (c == ']') in_class = false;
    out += c;
  }
  return out;
}

}  // namespace

struct Tokenizer::PreTokenizer {
  struct Regex {
    pcre2_code* code = nullptr;
  };
  std::vector<Regex> regexes;
  ~PreTokenizer() {
    for (auto& r : regexes) pcre2_code_free(r.code);
  }

  // Splits `text` (valid UTF-8) into pieces (views into text).
  void Split(std::string_view text, std::vector<std::string_view>* out) const {
    std::vector<std::string_view> cur{text}, next;
    pcre2_match_data* md = pcre2_match_data_create(1, nullptr);
    for (const Regex& re : regexes) {
      next.clear();
      for (std::string_view piece : cur) {
        const auto* subject = reinterpret_cast<PCRE2_SPTR>(piece.data());
        size_t pos = 0, gap_start = 0;
        while (pos < piece.size()) {
          const int rc = pcre2_match(re.code, subject, piece.size(), pos, PCRE2_NO_UTF_CHECK, md,
                                     nullptr);
          if (rc < 0) break;
          const PCRE2_SIZE* ov = pcre2_get_ovector_pointer(md);
          size_t start = ov[0], end = ov[1];
          if (end == start) {  // empty match: step one code point, never emit it
            pos = start + 1;
            while (pos < piece.size() && (static_cast<uint8_t>(piece[pos]) & 0xC0) == 0x80) ++pos;
            continue;
          }
          if (start > gap_start) next.push_back(piece.substr(gap_start, start - gap_start));
          next.push_back(piece.substr(start, end - start));
          pos = gap_start = end;
        }
        if (gap_start < piece.size()) next.push_back(piece.substr(gap_start));
      }
      std::swap(cur, next);
    }
    pcre2_match_data_free(md);
    out->insert(out->end(), cur.begin(), cur.end());
  }
};

Tokenizer::Tokenizer() = default;
Tokenizer::~Tokenizer() = default;

Status Tokenizer::InitPreTokenizer(const std::string& pre) {
  const PreTokenizerDef* def = nullptr;
  for (const auto& d : PreTokenizerDefs()) {
    for (const char* n : d.names) {
      if (pre == n) def = &d;
    }
  }
  if (def == nullptr) {
    return Unimplemented("unknown pre-tokenizer type tokenizer.ggml.pre = '" + pre +
                         "'; supported: default, gpt2, llama3/llama-bpe, qwen2, smollm, "
                         "starcoder, falcon and their llama.cpp aliases");
  }
  ignore_merges_ = def->ignore_merges;
  auto p = std::make_unique<PreTokenizer>();
  for (const char* raw : def->regexes) {
    const std::string rx = ExpandWhiteSpace(raw);
    int err = 0;
    PCRE2_SIZE err_off = 0;
    pcre2_code* code = pcre2_compile(reinterpret_cast<PCRE2_SPTR>(rx.c_str()), rx.size(),
                                     PCRE2_UTF | PCRE2_UCP, &err, &err_off, nullptr);
    if (code == nullptr) {
      PCRE2_UCHAR msg[256];
      pcre2_get_error_message(err, msg, sizeof(msg));
      return Internal("pre-tokenizer '" + pre + "' regex does not compile at offset " +
                      std::to_string(err_off) + ": " + reinterpret_cast<char*>(msg));
    }
    pcre2_jit_compile(code, PCRE2_JIT_COMPLETE);  // optional speed-up; falls back if unavailable
    p->regexes.push_back({code});
  }
  pre_ = std::move(p);
  return Status::Ok();
}

// ------------------------------------------------------------------------------------------------
// Byte-level BPE.

void Tokenizer::PushBytes(std::string_view bytes, std::vector<int32_t>* out) const {
  for (char c : bytes) {
    const int32_t id = byte_tokens_[static_cast<uint8_t>(c)];
    if (id >= 0) {
      out->push_back(id);
    } else if (unk_id_ >= 0) {
      out->push_back(unk_id_);
    }
  }
}

void Tokenizer::EncodeBpe(std::string_view text,
                          std::unordered_map<std::string, std::vector<int32_t>>* cache,
                          std::vector<int32_t>* out) const {
  std::vector<std::string_view> words;
  pre_->Split(text, &words);
  for (std::string_view w : words) {
    auto it = cache->find(std::string(w));
    if (it == cache->end()) {
      std::vector<int32_t> ids;
      BpeWord(w, &ids);
      it = cache->emplace(std::string(w), std::move(ids)).first;
    }
    out->insert(out->end(), it->second.begin(), it->second.end());
  }
}

// Merges adjacent symbols lowest rank first, leftmost on ties (as HF and llama.cpp). Symbols are
// token ids: the initial ones are the byte tokens, every merge result is a vocabulary token.
void Tokenizer::BpeWord(std::string_view word, std::vector<int32_t>* out) const {
  if (ignore_merges_) {
    std::string mapped;
    for (char c : word) mapped += tokenizer_internal::ByteToUnicode()[static_cast<uint8_t>(c)];
    auto it = token_to_id_.find(mapped);
    if (it != token_to_id_.end()) {
      out->push_back(it->second);
      return;
    }
  }
  const int n = static_cast<int>(word.size());
  std::vector<int32_t> id(n), prev(n), next(n);
  for (int i = 0; i < n; ++i) {
    id[i] = byte_tokens_[static_cast<uint8_t>(word[i])];
    prev[i] = i - 1;
    next[i] = i + 1 < n ? i + 1 : -1;
  }
  struct Cand {
    int32_t rank, left, left_id, right_id;
    bool operator>(const Cand& o) const {
      return rank != o.rank ? rank > o.rank : left > o.left;
    }
  };
  std::priority_queue<Cand, std::vector<Cand>, std::greater<Cand>> heap;
  auto try_add = [&](int l) {
    if (l < 0) return;
    const int r = next[l];
    if (r < 0 || id[l] < 0 || id[r] < 0) return;
    auto it = merges_.find((static_cast<uint64_t>(id[l]) << 32) | static_cast<uint32_t>(id[r]));
    if (it != merges_.end()) heap.push({it->second.first, l, id[l], id[r]});
  };
  for (int i = 0; i + 1 < n; ++i) try_add(i);
  while (!heap.empty()) {
    const Cand c = heap.top();
    heap.pop();
    const int l = c.left;
    const int r = next[l];
    // Stale: the left symbol was absorbed (id changed) or its right neighbour changed.
    if (id[l] != c.left_id || r < 0 || id[r] != c.right_id) continue;
    id[l] = merges_.at((static_cast<uint64_t>(id[l]) << 32) | static_cast<uint32_t>(id[r])).second;
    id[r] = -2;  // dead
    next[l] = next[r];
    if (next[r] >= 0) prev[next[r]] = l;
    try_add(prev[l]);
    try_add(l);
  }
  // Walk the surviving symbols. A symbol is dead only after being merged into its left neighbour,
  // so following `next` from 0 visits exactly the survivors.
  for (int i = 0; i >= 0 && i < n; i = next[i]) {
    if (id[i] >= 0) {
      out->push_back(id[i]);
    } else {
      PushBytes(word.substr(i, 1), out);  // byte not in the vocabulary
    }
  }
}

// ------------------------------------------------------------------------------------------------
// SentencePiece-style BPE (llama.cpp llm_tokenizer_spm): repeatedly merge the adjacent pair whose
// concatenation is a vocabulary token with the highest score (leftmost on ties); symbols that end
// up outside the vocabulary fall back to <0xXX> byte tokens.

void Tokenizer::EncodeSpm(std::string_view text, std::vector<int32_t>* out) const {
  // Space -> U+2581 "▁".
  std::string s;
  s.reserve(text.size() + 8);
  for (char c : text) {
    if (c == ' ') {
      s += "\xE2\x96\x81";
    } else {
      s += c;
    }
  }
  struct Sym {
    int prev, next;
    size_t off, len;
  };
  std::vector<Sym> sym;
  for (size_t i = 0; i < s.size();) {
    const size_t len = std::min(s.size() - i, tokenizer_internal::Utf8Len(
                                                  static_cast<uint8_t>(s[i])));
    sym.push_back({static_cast<int>(sym.size()) - 1, static_cast<int>(sym.size()) + 1, i, len});
    i += len;
  }
  if (sym.empty()) return;
  sym.back().next = -1;
  struct Cand {
    float score;
    int left;
    size_t len;
    bool operator<(const Cand& o) const {
      return score != o.score ? score < o.score : left > o.left;
    }
  };
  std::priority_queue<Cand> heap;
  auto try_add = [&](int l) {
    if (l < 0 || sym[l].next < 0) return;
    const Sym& a = sym[l];
    const Sym& b = sym[a.next];
    auto it = token_to_id_.find(s.substr(a.off, a.len + b.len));
    if (it == token_to_id_.end()) return;
    heap.push({scores_[it->second], l, a.len + b.len});
  };
  for (int i = 0; i + 1 < static_cast<int>(sym.size()); ++i) try_add(i);
  while (!heap.empty()) {
    const Cand c = heap.top();
    heap.pop();
    Sym& a = sym[c.left];
    if (a.len == 0 || a.next < 0 || a.len + sym[a.next].len != c.len) continue;  // stale
    Sym& b = sym[a.next];
    a.len += b.len;
    b.len = 0;
    a.next = b.next;
    if (a.next >= 0) sym[a.next].prev = c.left;
    try_add(a.prev);
    try_add(c.left);
  }
  for (int i = 0; i >= 0; i = sym[i].next) {
    auto it = token_to_id_.find(s.substr(sym[i].off, sym[i].len));
    if (it != token_to_id_.end()) {
      out->push_back(it->second);
    } else {
      PushBytes(std::string_view(s).substr(sym[i].off, sym[i].len), out);
    }
  }
}

}  // namespace kvc
