// Composition of eviction policies: "A+B+..." runs A's hooks, then B's, on the same cache
// (e.g. knorm:ratio=0.5+snapkv:ratio=0.5 keeps 25%: each ratio applies to the cells present when
// the stage runs). Statistics requested are the union; the position mode is the first stage's
// non-default one. No state of its own (0 B/token).
#pragma once

#include <memory>
#include <string>

#include "kv/policy.h"

namespace kvc::kv {
// text contains '+'. INVALID_ARGUMENT naming the bad stage.
StatusOr<std::unique_ptr<EvictionPolicy>> MakeChainPolicy(const std::string& text,
                                                           const KvShape& shape);
}  // namespace kvc::kv
