// Session files: save a Session's compressed KV and continue it later (`kvcrunch generate
// --session FILE`, the server's saved sessions use the same kSequence records, kv_format.h).
#pragma once

#include <string>
#include <vector>

#include "kvcrunch/status.h"
#include "model/model.h"

namespace kvc::store {

struct SessionTokens {
  std::vector<int32_t> tokens;   // [n_past] token ids the cache consumed, in order
  std::vector<int32_t> pending;  // sampled tokens not yet fed (feed them first to continue)
};

// Writes the session's whole state atomically (temporary file + rename). tokens must hold
// n_past() ids. INVALID_ARGUMENT / INTERNAL (I/O) errors.
Status SaveSession(const Session& session, const SessionTokens& t, const std::string& path);

// Reads `path` into `session`, which must be freshly created (nothing consumed) with the same
// model, KV configuration and eviction policy as when it was saved. Errors: NOT_FOUND (no file),
// DATA_LOSS (corrupt, truncated: the message says what failed), FAILED_PRECONDITION (another
// model, KV configuration, policy or format version: the message shows both). On error the
// session is reset to empty.
StatusOr<SessionTokens> LoadSession(Session* session, const std::string& path);

}  // namespace kvc::store
