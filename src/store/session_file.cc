#include "store/session_file.h"

#include <fmt/format.h>

#include "store/kv_format.h"

namespace kvc::store {

namespace {
KvFingerprint SessionFingerprint(const Session& s) {
  return FingerprintOf(s.cache(), s.policy() ? s.policy()->Name() : "");
}
}  // namespace

Status SaveSession(const Session& session, const SessionTokens& t, const std::string& path) {
  KVC_ASSIGN_OR_RETURN(std::string rec,
                       EncodeSequence(session.cache(), session.policy(), FingerprintOf(session.model()),
                                      SessionFingerprint(session), t.tokens, t.pending));
  return WriteFileAtomic(path, rec);
}

StatusOr<SessionTokens> LoadSession(Session* session, const std::string& path) {
  if (session->n_past() != 0) return InvalidArgument("LoadSession needs a fresh session");
  KVC_ASSIGN_OR_RETURN(std::string bytes, ReadFile(path));
  auto rec = DecodeRecord(bytes);
  if (!rec.ok()) return Status(rec.status().code(), fmt::format("{}: {}", path, rec.status().message()));
  if (rec->info.kind != RecordKind::kSequence) {
    return InvalidArgument(fmt::format("{}: a prefix-cache block, not a session", path));
  }
  if (Status st = CheckMatches(*rec, FingerprintOf(session->model()), SessionFingerprint(*session));
      !st.ok()) {
    return Status(st.code(), fmt::format("{}: {}", path, st.message()));
  }
  Status st = ApplySequence(*rec, &session->cache(), session->mutable_policy());
  if (!st.ok()) {
    session->Reset();
    return Status(st.code(), fmt::format("{}: {}", path, st.message()));
  }
  session->set_n_past(rec->info.t1);
  return SessionTokens{rec->info.tokens, rec->info.pending};
}

}  // namespace kvc::store
