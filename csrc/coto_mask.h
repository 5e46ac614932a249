// The dropout mask of the LoRA path, bit-identical to coto_kernels/kernels/dropout_mask.py (its docstring is
// the definition): keep[i] = h(seed, i mod 2**32) >= t, t = round(p * 2**32) - 2**31, with h an int32
// counter-based hash (MurmurHash3's fmix32 without its last xor-shift). Plain C++ and CUDA (host and device).
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

// h(seed, i) as an int32; `index` is the flat row-major element index taken modulo 2**32.
COTO_HD int32_t mask_hash(uint32_t index, MaskKeys keys) {
  uint32_t h = ((index * 0x9E3779B1u) ^ keys.k1) + keys.k0;
  h ^= h >> 16;
  h *= 0x85EBCA6Bu;
  h ^= h >> 13;
  h *= 0xC2B2AE35u;
  return static_cast<int32_t>(h);
}

// t = round(p * 2**32) - 2**31 with Python's round-half-even (p * 2**32 is exact in double). Returned as int64:
// it equals 2**31 (nothing kept, not representable in int32) only for p within 2**-33 of 1, which callers reject.
inline int64_t keep_threshold(double dropout_p) {
  return static_cast<int64_t>(std::nearbyint(dropout_p * 4294967296.0)) - 2147483648LL;
}

COTO_HD bool keep(uint32_t index, MaskKeys keys, int32_t threshold) {
  return mask_hash(index, keys) >= threshold;
}

}  // namespace coto
