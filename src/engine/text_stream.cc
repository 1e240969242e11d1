#include "engine/text_stream.h"

#include <fmt/format.h>

namespace kvc::engine {

Status ValidateStops(const std::vector<std::string>& stop) {
  if (stop.size() > 16) return InvalidArgument(fmt::format("at most 16 stop strings ({} given)", stop.size()));
  for (const auto& s : stop) {
    if (s.empty() || s.size() > 256) return InvalidArgument("each stop string must have 1..256 bytes");
  }
  return Status::Ok();
}

TextStream::TextStream(const Tokenizer& tok, std::vector<std::string> stop)
    : tok_(tok), stop_(std::move(stop)) {}

namespace {
// Bytes at the end of s that start an incomplete UTF-8 sequence (0 if s ends on a boundary).
size_t IncompleteUtf8Tail(const std::string& s) {
  const size_t n = s.size();
  for (size_t back = 1; back <= 4 && back <= n; ++back) {
    const unsigned char c = static_cast<unsigned char>(s[n - back]);
    if ((c & 0xC0) == 0x80) continue;  // continuation byte: keep looking for the lead
    size_t len = 1;
    if ((c & 0xE0) == 0xC0) len = 2;
    else if ((c & 0xF0) == 0xE0) len = 3;
    else if ((c & 0xF8) == 0xF0) len = 4;
    return len > back ? back : 0;
  }
  return 0;
}
}  // namespace

std::string TextStream::Push(int32_t token, bool* stopped) {
  *stopped = stopped_;
  if (stopped_) return {};
  pending_ += tok_.TokenToPiece(token);
  // A completed stop string: release what precedes its earliest occurrence, drop the rest.
  size_t cut = std::string::npos;
  for (const auto& s : stop_) {
    const size_t at = pending_.find(s);
    if (at != std::string::npos && at < cut) cut = at;
  }
  if (cut != std::string::npos) {
    stopped_ = *stopped = true;
    std::string out = pending_.substr(0, cut);
    pending_.clear();
    return out;
  }
  // Hold back the longest suffix that is a proper prefix of some stop string, and an incomplete
  // UTF-8 character.
  size_t hold = IncompleteUtf8Tail(pending_);
  for (const auto& s : stop_) {
    for (size_t k = std::min(s.size() - 1, pending_.size()); k > hold; --k) {
      if (pending_.compare(pending_.size() - k, k, s, 0, k) == 0) {
        hold = k;
        break;
      }
    }
  }
  std::string out = pending_.substr(0, pending_.size() - hold);
  pending_.erase(0, pending_.size() - hold);
  return out;
}

std::string TextStream::Finish() {
  std::string out;
  out.swap(pending_);
  return out;
}

}  // namespace kvc::engine
