// The dropout mask of the LoRA path, bit-identical to coto_kernels/kernels/dropout_mask.py (its docstring is
// the definition and says why it has this shape): element (m, k) is kept when 15 bits of
// pair(m, k >> 1) = (row(m) ^ col(k >> 1)) * C are >= t = round(p * 2**15); row() and col() are keyed by the
// seed. Plain C++ and CUDA (host and device).
#pragma once

#include <stdint.h>

#include <cmath>

#if defined(__CUDACC__)
#define COTO_HD __host__ __device__ __forceinline__
#else
#define COTO_HD inline
#endif

namespace coto {

// The two keys derived from the seed: Python computes `int32(seed * C >> s)` on arbitrary-precision integers;
// bits s..s+31 of that product only depend on the product mod 2**64 (also for negative seeds, whose
// two's-complement bits Python's arithmetic shift keeps), so a wrapping 64-bit multiply reproduces it.
struct MaskKeys {
  uint32_t k0;
  uint32_t k1;
};

COTO_HD MaskKeys mask_keys(int64_t seed) {
  const uint64_t s = static_cast<uint64_t>(seed);
  MaskKeys keys;
  keys.k0 = static_cast<uint32_t>((s * 0x9E3779B97F4A7C15ull) >> 16);
  keys.k1 = static_cast<uint32_t>((s * 0xBF58476D1CE4E5B9ull) >> 24);
  return keys;
}

// row(m), col(w) and pair(m, w) of the definition; element (m, k) reads half k & 1 of pair(m, k >> 1).
COTO_HD uint32_t row_key(uint32_t row, MaskKeys keys) {
  uint32_t h = row * 0x9E3779B1u + keys.k0;
  h ^= h >> 15;
  return h * 0x85EBCA6Bu;
}

COTO_HD uint32_t column_key(uint32_t pair_column, MaskKeys keys) {
  uint32_t h = pair_column * 0x85EBCA77u + keys.k1;
  h ^= h >> 16;
  h *= 0x85EBCA6Bu;
  h ^= h >> 13;
  h *= 0xC2B2AE35u;
  return h ^ (h >> 16);
}

COTO_HD uint32_t pair_hash(uint32_t row, uint32_t column) { return (row ^ column) * 0x27D4EB2Fu; }

// The 15 bits of `pair` that decide column k (its half: k & 1), compared with the threshold.
COTO_HD bool keep_half(uint32_t pair, uint32_t column, int32_t threshold) {
  return static_cast<int32_t>((pair >> ((column & 1u) * 16u)) & 0x7FFFu) >= threshold;
}

// t = round(p * 2**15) with Python's round-half-even (p * 2**15 is exact in double); p in [0, 1).
inline int32_t keep_threshold(double dropout_p) { return static_cast<int32_t>(std::nearbyint(dropout_p * 32768.0)); }

COTO_HD bool keep(int64_t row, int64_t column, MaskKeys keys, int32_t threshold) {
  const uint32_t k = static_cast<uint32_t>(column);
  return keep_half(pair_hash(row_key(static_cast<uint32_t>(row), keys), column_key(k >> 1, keys)), k, threshold);
}

}  // namespace coto
