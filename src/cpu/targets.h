// Highway SIMD targets: what the kernels in src/cpu are compiled for, which one this CPU runs.
//
// Every kernel file (ops.cc, matmul.cc, f16.cc, kv_kernels.cc) is compiled for the same x86-64
// targets — AVX3_DL (AVX-512 + VNNI/VBMI2…), AVX3 (AVX-512F/BW/DQ/VL), AVX2 (+FMA, F16C, BMI2),
// SSE4, SSSE3 — plus a portable fallback in plain C++ that runs on any x86-64: HWY_SCALAR when
// built with GCC < 12.3 (Highway 1.0 marks EMU128 broken there; Debian 12's GCC 12.2), else
// HWY_EMU128. HWY_DYNAMIC_DISPATCH picks the best target the CPU supports on the first call.
// Tests pin each runnable target in turn (hwy::SetSupportedTargetsForTest) and use
// KernelTargets() to check that every file really dispatched to the pinned target.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace kvc::cpu {

struct KernelFileTargets {
  const char* file;    // "ops.cc", ...
  int64_t compiled;    // HWY_TARGETS of that translation unit (bit set of HWY_* targets)
  int64_t dispatched;  // the target HWY_DYNAMIC_DISPATCH calls now
};
// One entry per Highway kernel file. `dispatched` honours hwy::SetSupportedTargetsForTest.
std::vector<KernelFileTargets> KernelTargets();

// Targets compiled into every kernel file and supported by this CPU, best first, one HWY_* bit
// each; the last one is the portable fallback (SCALAR or EMU128). Call it without a target pinned.
std::vector<int64_t> RunnableTargets();

// Name of the target the kernels dispatch to now ("AVX3_DL", "AVX2", "SCALAR", ...), or
// "mixed(...)" naming each file's when the files disagree (a build error: see targets.cc).
std::string ActiveTargetName();

// KVC_SIMD=<target> (AVX3_DL, AVX3, AVX2, SSE4, SSSE3, SCALAR / EMU128): dispatch to that target
// at most, as on a CPU without the better ones (e.g. KVC_SIMD=AVX2 runs an AVX-512 machine as an
// AVX2-only one). Called by Model::Load and the CLI; acts once per process; the first call
// returns a message for an unknown or unsupported name ("" when fine, unset or not the first
// call), and dispatch is then left alone.
std::string ApplySimdLimitFromEnv();

}  // namespace kvc::cpu
