// Device helper shared by the CUDA kernels that map a packed row back to its segment.
#pragma once
#include <cstdint>

namespace localgp {

// The segment holding `value` in non-decreasing offsets[0..n]: the last e in [0, n) with
// offsets[e] <= value. Empty segments before it share its offset and so come first.
template <typename Offset>
__device__ __forceinline__ int64_t segment_of(const Offset* offsets, int64_t n, int64_t value) {
  int64_t lo = 0, hi = n;  // offsets[lo] <= value < offsets[hi]
  while (hi - lo > 1) {
    const int64_t mid = (lo + hi) >> 1;
    if (offsets[mid] <= value) {
      lo = mid;
    } else {
      hi = mid;
    }
  }
  return lo;
}

}  // namespace localgp
