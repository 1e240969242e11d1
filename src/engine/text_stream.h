// Incremental detokenization with stop strings (engine side, so a stopped request frees its KV at
// once). Text is released only when it is final: complete UTF-8 characters that can no longer be
// the beginning of a stop string.
#pragma once

#include <string>
#include <vector>

#include "kvcrunch/status.h"
#include "tokenizer/tokenizer.h"

namespace kvc::engine {

// INVALID_ARGUMENT for more than 16 stop strings or one that is empty or over 256 bytes.
Status ValidateStops(const std::vector<std::string>& stop);

class TextStream {
 public:
  TextStream(const Tokenizer& tok, std::vector<std::string> stop);
  // Appends a token's bytes. Returns the text that became final. *stopped is set when a stop
  // string completed: the returned text ends just before it; later calls return nothing.
  std::string Push(int32_t token, bool* stopped);
  // The held-back text at the end of generation (a partial stop-string prefix, or an incomplete
  // UTF-8 sequence as is).
  std::string Finish();
  bool stopped() const { return stopped_; }

 private:
  const Tokenizer& tok_;
  std::vector<std::string> stop_;
  std::string pending_;  // bytes not yet released
  bool stopped_ = false;
};

}  // namespace kvc::engine
