// The numeric contracts of src/cpu/kv_kernels.h and ops.h as test tolerances (u = 2^-24).
#pragma once

#include <cstdint>

namespace kvc::test_util {

constexpr double kU = 0x1p-24;  // f32 unit roundoff

// [sum n]: n terms summed in f32 in any order (FMA or not) vs a double reference rounded to f32.
inline double SumBound(int64_t n_terms, double abs_terms) {
  return (double(n_terms) + 2) * kU * abs_terms;
}
// [fma]: a product fused into an add where the reference rounds the product first.
inline double FmaBound(double abs_product, double abs_ref) { return 2 * kU * (abs_product + abs_ref); }

}  // namespace kvc::test_util
