#include "cpu/targets.h"

#include <cstdlib>
#include <mutex>

#include "hwy/targets.h"

namespace kvc::cpu {

// Defined at the end of each kernel file (HWY_ONCE part).
int64_t OpsCompiledTargets();
int64_t OpsDispatchedTarget();
int64_t MatMulCompiledTargets();
int64_t MatMulDispatchedTarget();
int64_t F16CompiledTargets();
int64_t F16DispatchedTarget();
int64_t KvKernelsCompiledTargets();
int64_t KvKernelsDispatchedTarget();

std::vector<KernelFileTargets> KernelTargets() {
  return {{"ops.cc", OpsCompiledTargets(), OpsDispatchedTarget()},
          {"matmul.cc", MatMulCompiledTargets(), MatMulDispatchedTarget()},
          {"f16.cc", F16CompiledTargets(), F16DispatchedTarget()},
          {"kv_kernels.cc", KvKernelsCompiledTargets(), KvKernelsDispatchedTarget()}};
}

std::vector<int64_t> RunnableTargets() {
  int64_t common = ~int64_t(0);
  for (const auto& f : KernelTargets()) common &= f.compiled;
  std::vector<int64_t> out;
  // Lower bits are better targets (HWY_AVX3_DL < HWY_AVX3 < ... < HWY_EMU128).
  for (int64_t t = hwy::SupportedTargets() & common; t != 0; t &= t - 1) out.push_back(t & -t);
  return out;
}

std::string ActiveTargetName() {
  const auto files = KernelTargets();
  bool same = true;
  for (const auto& f : files) same = same && f.dispatched == files[0].dispatched;
  if (same) return hwy::TargetName(files[0].dispatched);
  std::string s = "mixed(";
  for (const auto& f : files) s += std::string(f.file) + ":" + hwy::TargetName(f.dispatched) + " ";
  s.back() = ')';
  return s;
}

std::string ApplySimdLimitFromEnv() {
  static std::once_flag once;
  std::string msg;  // set on the first call only, so the caller warns once
  std::call_once(once, [&msg] {
    const char* e = std::getenv("KVC_SIMD");
    if (!e || !*e) return;
    std::string names;
    for (int64_t t : RunnableTargets()) {
      if (std::string(hwy::TargetName(t)) == e) {
        // This target and the worse ones (higher bits). hwy::DisableTargets (Highway 1.0.3) did
        // not move an already initialised dispatch; the tests' mechanism does (it resets it).
        hwy::SetSupportedTargetsForTest(hwy::SupportedTargets() & ~(t - 1));
        return;
      }
      names += std::string(names.empty() ? "" : ", ") + hwy::TargetName(t);
    }
    msg = std::string("KVC_SIMD=") + e + " is not a target this CPU runs (" + names + "); ignored";
  });
  return msg;
}

}  // namespace kvc::cpu
