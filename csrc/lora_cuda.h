// Plain C interface to the CUDA kernels of csrc/lora_cuda.cu: raw pointers, sizes, row strides (in elements)
// and a cudaStream_t passed as void*, so the kernels compile with nvcc and CUDA headers only, and the torch
// binding (csrc/lora_cuda_binding.cpp) compiles without CUDA headers. Every function returns a cudaError_t
// as int (0 on success); coto_cuda_error_string names it.
//
// X-like operands (x, dy, dx) have `dtype` (coto_dtype); the skinny operands are fp32. The dropout arguments
// (keys, threshold, scale) come from coto_mask.h; dropout == 0 ignores them.
#pragma once

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

enum coto_dtype { COTO_FLOAT32 = 0, COTO_BFLOAT16 = 1, COTO_FLOAT16 = 2 };

typedef struct {
  int dropout;        // 0: keep everything (scale ignored)
  uint32_t k0, k1;    // coto::mask_keys(seed)
  int32_t threshold;  // coto::keep_threshold(p)
  float scale;        // 1 / (1 - p)
} coto_dropout;

// out[m, j] = alpha * sum_k drop(X)[m, k] * w[j, k]            (X: M x K, w: J x K fp32, out: M x J fp32)
// With dropout: S = drop(X) A^T. Without: dS = s dY B (w = B^T, alpha = s).
int coto_cuda_rows_times_wt(const void* x, int64_t ldx, int dtype, const float* w, float* out, int64_t M,
                            int64_t K, int64_t J, float alpha, coto_dropout dropout, void* stream);

// part[z, j, k] = alpha * sum_{m in split z} g[m, j] * drop(X)[m, k]   (g: M x J fp32, part: splits x J x K fp32)
// Sum `part` over z for dA = dS^T drop(X) (J = r) or dB^T = s S^T dY (no dropout). Deterministic (no atomics).
int coto_cuda_gt_times_rows(const float* g, const void* x, int64_t ldx, int dtype, float* part, int64_t M,
                            int64_t K, int64_t J, int64_t splits, float alpha, coto_dropout dropout, void* stream);

// dx[m, k] += keep(m, k) * scale * sum_j g[m, j] * w[j, k]      (dx: M x K of `dtype`, in place)
// dX += drop'(dS A).
int coto_cuda_add_masked_g_times_w(void* dx, int64_t lddx, int dtype, const float* g, const float* w, int64_t M,
                                   int64_t K, int64_t J, coto_dropout dropout, void* stream);

// mask[m, k] = keep(m, k) as bytes (M x K, contiguous): for tests and references.
int coto_cuda_keep_mask(uint8_t* mask, int64_t M, int64_t K, coto_dropout dropout, void* stream);

const char* coto_cuda_error_string(int error);

#ifdef __cplusplus
}
#endif
