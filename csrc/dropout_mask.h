// The dropout mask of xmcnas_fast::dropout: a counter-based stream. Element i
// of a call with seed s is kept iff the 16-bit lane i % 4 of
// splitmix64(s + (i / 4) * phi) is >= round(p * 2^16): one hash serves four
// elements. Forward and backward (and the CPU and CUDA kernels) recompute the
// same mask from (seed, i): nothing is stored. The kept fraction is exactly
// 1 - threshold / 2^16, and the kept values are scaled by its inverse.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define XMCNAS_HD __host__ __device__ __forceinline__
#else
#define XMCNAS_HD inline
#endif

namespace xmcnas_fast {

XMCNAS_HD uint64_t splitmix64(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
  return z ^ (z >> 31);
}

XMCNAS_HD uint64_t dropout_bits(uint64_t seed, uint64_t group) {
  return splitmix64(seed + group * 0x9e3779b97f4a7c15ULL);
}

XMCNAS_HD bool dropout_lane_kept(uint64_t bits, uint64_t i, uint32_t threshold) {
  return static_cast<uint32_t>((bits >> (16 * (i & 3))) & 0xffffu) >= threshold;
}

XMCNAS_HD bool dropout_keep(uint64_t seed, uint64_t i, uint32_t threshold) {
  return dropout_lane_kept(dropout_bits(seed, i >> 2), i, threshold);
}

// p in [0, 1) -> the 16-bit threshold, and the scale 1 / (kept fraction).
inline uint32_t dropout_threshold(double p) { return static_cast<uint32_t>(std::llround(p * 65536.0)); }
inline double dropout_scale(uint32_t threshold) { return 65536.0 / (65536.0 - threshold); }

}  // namespace xmcnas_fast

