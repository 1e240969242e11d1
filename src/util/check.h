// Always-on invariant checks (not for user input: that returns Status).
#pragma once
#include <cstdio>
#include <cstdlib>

#define KVC_CHECK(cond)                                                        \
  do {                                                                         \
    if (!(cond)) {                                                             \
      std::fprintf(stderr, "%s:%d: CHECK failed: %s\n", __FILE__, __LINE__, #cond); \
      std::abort();                                                            \
    }                                                                          \
  } while (0)

#define KVC_CHECK_OP(a, op, b)                                                   \
  do {                                                                           \
    const auto kvc_a_ = (a);                                                     \
    const auto kvc_b_ = (b);                                                     \
    if (!(kvc_a_ op kvc_b_)) {                                                   \
      std::fprintf(stderr, "%s:%d: CHECK failed: %s %s %s (%lld vs %lld)\n", __FILE__, __LINE__, \
                   #a, #op, #b, (long long)kvc_a_, (long long)kvc_b_);           \
      std::abort();                                                              \
    }                                                                            \
  } while (0)
#define KVC_CHECK_EQ(a, b) KVC_CHECK_OP(a, ==, b)
#define KVC_CHECK_LT(a, b) KVC_CHECK_OP(a, <, b)
#define KVC_CHECK_LE(a, b) KVC_CHECK_OP(a, <=, b)
#define KVC_CHECK_GE(a, b) KVC_CHECK_OP(a, >=, b)
