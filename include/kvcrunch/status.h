// Status / StatusOr: how every setup step and every reader of user input reports failure.
// Kernels never fail; invariants use KVC_CHECK (src/util/check.h).
#pragma once

#include <cstdlib>
#include <string>
#include <utility>
#include <variant>

namespace kvc {

enum class StatusCode {
  kOk = 0,
  kInvalidArgument,   // bad flag value, bad spec string, empty prompt, ...
  kNotFound,          // missing file, missing tensor or metadata key
  kDataLoss,          // malformed / truncated file
  kUnimplemented,     // unsupported tensor type, architecture, codec pair
  kOutOfRange,        // prompt longer than the context, position beyond limits
  kResourceExhausted, // cache full (a status, not a crash)
  kInternal,
  kUnavailable,       // not serving now (shutting down); retry elsewhere or later
  kFailedPrecondition,  // valid input that does not fit this state: KV saved with another model,
                        // KV configuration or format version
};

const char* StatusCodeName(StatusCode code);

class [[nodiscard]] Status {
 public:
  Status() = default;
  Status(StatusCode code, std::string message) : code_(code), message_(std::move(message)) {}
  static Status Ok() { return Status(); }
  bool ok() const { return code_ == StatusCode::kOk; }
  StatusCode code() const { return code_; }
  const std::string& message() const { return message_; }
  // "INVALID_ARGUMENT: message"
  std::string ToString() const;

 private:
  StatusCode code_ = StatusCode::kOk;
  std::string message_;
};

inline Status InvalidArgument(std::string m) { return {StatusCode::kInvalidArgument, std::move(m)}; }
inline Status NotFound(std::string m) { return {StatusCode::kNotFound, std::move(m)}; }
inline Status DataLoss(std::string m) { return {StatusCode::kDataLoss, std::move(m)}; }
inline Status Unimplemented(std::string m) { return {StatusCode::kUnimplemented, std::move(m)}; }
inline Status OutOfRange(std::string m) { return {StatusCode::kOutOfRange, std::move(m)}; }
inline Status ResourceExhausted(std::string m) { return {StatusCode::kResourceExhausted, std::move(m)}; }
inline Status Internal(std::string m) { return {StatusCode::kInternal, std::move(m)}; }
inline Status Unavailable(std::string m) { return {StatusCode::kUnavailable, std::move(m)}; }
inline Status FailedPrecondition(std::string m) {
  return {StatusCode::kFailedPrecondition, std::move(m)};
}

template <typename T>
class [[nodiscard]] StatusOr {
 public:
  StatusOr(T value) : v_(std::move(value)) {}          // NOLINT: implicit by design
  StatusOr(Status status) : v_(std::move(status)) {    // NOLINT
    if (std::get<Status>(v_).ok()) v_ = Status(StatusCode::kInternal, "StatusOr built from OK");
  }
  bool ok() const { return std::holds_alternative<T>(v_); }
  Status status() const { return ok() ? Status() : std::get<Status>(v_); }
  T& value() & { Check(); return std::get<T>(v_); }
  const T& value() const& { Check(); return std::get<T>(v_); }
  T&& value() && { Check(); return std::get<T>(std::move(v_)); }
  T& operator*() & { return value(); }
  const T& operator*() const& { return value(); }
  T* operator->() { return &value(); }
  const T* operator->() const { return &value(); }

 private:
  void Check() const {
    if (!ok()) std::abort();  // value() on an error is a programming bug
  }
  std::variant<Status, T> v_;
};

}  // namespace kvc

#define KVC_CONCAT_INNER(a, b) a##b
#define KVC_CONCAT(a, b) KVC_CONCAT_INNER(a, b)

// Return early from a function returning Status / StatusOr on error.
#define KVC_RETURN_IF_ERROR(expr)             \
  do {                                        \
    ::kvc::Status kvc_status_ = (expr);       \
    if (!kvc_status_.ok()) return kvc_status_; \
  } while (0)

#define KVC_ASSIGN_OR_RETURN(lhs, expr) \
  KVC_ASSIGN_OR_RETURN_IMPL(KVC_CONCAT(kvc_statusor_, __LINE__), lhs, expr)
#define KVC_ASSIGN_OR_RETURN_IMPL(tmp, lhs, expr) \
  auto tmp = (expr);                              \
  if (!tmp.ok()) return tmp.status();             \
  lhs = std::move(tmp).value()
