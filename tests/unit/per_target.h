// Kernel tests that run once per Highway target: every target compiled into src/cpu and
// supported by this CPU, plus the portable fallback (SCALAR with GCC 12.2, EMU128 with newer
// compilers; cpu/targets.h) — on an AVX-512 machine with VNNI AVX3_DL, AVX3, AVX2, SSE4, SSSE3
// and SCALAR each run, on an AVX2-only one AVX2, SSE4, SSSE3 and SCALAR.
// Each instance is named by its target ("Hwy/KvKernels.RotatePairsRowsEqualReference/AVX2"), so
// the ctest log lists the targets that ran. ctest runs every case in its own process, so pinning
// the target (hwy::SetSupportedTargetsForTest) cannot leak into other tests; SetUp also checks
// that every kernel file really dispatches to the pinned target (a file compiled without it
// would silently fall back to the portable target).
//
//   KVC_PER_TARGET_SUITE(KvKernels);
//   TEST_P(KvKernels, Something) { ... }
#pragma once

#include <gtest/gtest.h>

#include <cstdint>
#include <string>

#include "cpu/targets.h"
#include "hwy/targets.h"

namespace kvc::test_util {

class PerTarget : public ::testing::TestWithParam<int64_t> {
 protected:
  void SetUp() override {
    hwy::SetSupportedTargetsForTest(GetParam());
    for (const auto& f : cpu::KernelTargets()) {
      ASSERT_EQ(f.dispatched, GetParam())
          << f.file << " dispatched to " << hwy::TargetName(f.dispatched) << ", not the pinned "
          << hwy::TargetName(GetParam());
    }
  }
  void TearDown() override { hwy::SetSupportedTargetsForTest(0); }
};

inline std::string TargetParamName(const ::testing::TestParamInfo<int64_t>& info) {
  return hwy::TargetName(info.param);
}

}  // namespace kvc::test_util

#define KVC_PER_TARGET_SUITE(suite)                                                     \
  class suite : public ::kvc::test_util::PerTarget {};                                  \
  INSTANTIATE_TEST_SUITE_P(Hwy, suite, ::testing::ValuesIn(::kvc::cpu::RunnableTargets()), \
                           ::kvc::test_util::TargetParamName)
