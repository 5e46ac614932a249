// CUDA kernels of the native backend (interface: csrc/lora_cuda.h; math: coto_kernels/kernels/interface.py).
// Only CUDA headers and csrc's own: this file compiles with `nvcc -Icsrc -c` without torch.
//
// Three shared-memory tiled kernels over the skinny operands (fp32 accumulation, int64 offsets), the keep mask
// regenerated from coto_mask.h while X tiles are staged (never stored):
//   rows_times_wt        out = alpha * drop(X) W^T             (S = drop(X) A^T;  dS = s dY B)
//   gt_times_rows        part_z = alpha * G_z^T drop(X_z)      (dA = dS^T drop(X);  dB^T = s S^T dY), split over
//                        rows into fixed partial sums (deterministic: no atomics), summed by the caller
//   add_masked_g_times_w dX += keep * scale * (G W)            (dX += drop'(dS A))
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "coto_mask.h"
#include "lora_cuda.h"

namespace {

constexpr int kThreads = 256;

template <typename T>
__device__ __forceinline__ float to_float(T v);
template <>
__device__ __forceinline__ float to_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }
template <>
__device__ __forceinline__ float to_float<__half>(__half v) { return __half2float(v); }

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16(v); }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half(v); }

// keep(m, k) * scale (coto_mask.h: the mask depends on the row and column only, not on K).
__device__ __forceinline__ float keep_factor(int64_t m, int64_t k, const coto_dropout& d) {
  coto::MaskKeys keys;
  keys.k0 = d.k0;
  keys.k1 = d.k1;
  return coto::keep(m, k, keys, d.threshold) ? d.scale : 0.0f;
}

// ---- out[M, J] = alpha * drop(X)[M, K] W[J, K]^T -------------------------------------------------------------
constexpr int kRowsA = 64, kColsA = 16, kDepthA = 32;

template <typename T, bool kDropout>
__global__ void __launch_bounds__(kThreads) rows_times_wt(const T* __restrict__ x, int64_t ldx,
                                                          const float* __restrict__ w, float* __restrict__ out,
                                                          int64_t M, int64_t K, int64_t J, float alpha,
                                                          coto_dropout d) {
  __shared__ float xs[kRowsA][kDepthA + 1];
  __shared__ float ws[kColsA][kDepthA + 1];
  const int t = threadIdx.x;
  const int tj = t % kColsA, tm = t / kColsA;  // 16 x 16 threads, 4 rows each
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * kRowsA;
  const int64_t j0 = static_cast<int64_t>(blockIdx.y) * kColsA;
  float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
  for (int64_t k0 = 0; k0 < K; k0 += kDepthA) {
#pragma unroll
    for (int i = 0; i < kRowsA * kDepthA / kThreads; ++i) {
      const int e = t + i * kThreads, row = e / kDepthA, col = e % kDepthA;
      const int64_t m = m0 + row, k = k0 + col;
      float v = 0.0f;
      if (m < M && k < K) {
        v = to_float(x[m * ldx + k]);
        if (kDropout) v *= keep_factor(m, k, d);
      }
      xs[row][col] = v;
    }
#pragma unroll
    for (int i = 0; i < kColsA * kDepthA / kThreads; ++i) {
      const int e = t + i * kThreads, row = e / kDepthA, col = e % kDepthA;
      const int64_t j = j0 + row, k = k0 + col;
      ws[row][col] = (j < J && k < K) ? w[j * K + k] : 0.0f;
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < kDepthA; ++kk) {
      const float wv = ws[tj][kk];
#pragma unroll
      for (int i = 0; i < 4; ++i) acc[i] += xs[tm * 4 + i][kk] * wv;
    }
    __syncthreads();
  }
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int64_t m = m0 + tm * 4 + i, j = j0 + tj;
    if (m < M && j < J) out[m * J + j] = alpha * acc[i];
  }
}

// ---- part[z, J, K] = alpha * G[rows_z, J]^T drop(X)[rows_z, K] ---------------------------------------------
constexpr int kColsB = 16, kWidthB = 64, kDepthB = 32;

template <typename T, bool kDropout>
__global__ void __launch_bounds__(kThreads) gt_times_rows(const float* __restrict__ g, const T* __restrict__ x,
                                                          int64_t ldx, float* __restrict__ part, int64_t M,
                                                          int64_t K, int64_t J, int64_t rows_per_split,
                                                          float alpha, coto_dropout d) {
  __shared__ float gs[kDepthB][kColsB + 1];
  __shared__ float xs[kDepthB][kWidthB + 1];
  const int t = threadIdx.x;
  const int tj = t / 16, tk = t % 16;  // one j, 4 columns tk + 16 c
  const int64_t k0 = static_cast<int64_t>(blockIdx.x) * kWidthB;
  const int64_t j0 = static_cast<int64_t>(blockIdx.y) * kColsB;
  const int64_t z = blockIdx.z;
  const int64_t m_begin = z * rows_per_split;
  const int64_t m_end = m_begin + rows_per_split < M ? m_begin + rows_per_split : M;
  float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
  for (int64_t mb = m_begin; mb < m_end; mb += kDepthB) {
#pragma unroll
    for (int i = 0; i < kDepthB * kWidthB / kThreads; ++i) {
      const int e = t + i * kThreads, row = e / kWidthB, col = e % kWidthB;
      const int64_t m = mb + row, k = k0 + col;
      float v = 0.0f;
      if (m < m_end && k < K) {
        v = to_float(x[m * ldx + k]);
        if (kDropout) v *= keep_factor(m, k, d);
      }
      xs[row][col] = v;
    }
#pragma unroll
    for (int i = 0; i < kDepthB * kColsB / kThreads; ++i) {
      const int e = t + i * kThreads, row = e / kColsB, col = e % kColsB;
      const int64_t m = mb + row, j = j0 + col;
      gs[row][col] = (m < m_end && j < J) ? g[m * J + j] : 0.0f;
    }
    __syncthreads();
#pragma unroll 8
    for (int mm = 0; mm < kDepthB; ++mm) {
      const float gv = gs[mm][tj];
#pragma unroll
      for (int c = 0; c < 4; ++c) acc[c] += gv * xs[mm][tk + 16 * c];
    }
    __syncthreads();
  }
  const int64_t j = j0 + tj;
#pragma unroll
  for (int c = 0; c < 4; ++c) {
    const int64_t k = k0 + tk + 16 * c;
    if (j < J && k < K) part[(z * J + j) * K + k] = alpha * acc[c];
  }
}

// ---- dx[M, K] += keep * scale * G[M, J] W[J, K] --------------------------------------------------------------
constexpr int kRowsC = 64, kWidthC = 64, kDepthC = 16;

template <typename T, bool kDropout>
__global__ void __launch_bounds__(kThreads) add_masked_g_times_w(T* __restrict__ dx, int64_t lddx,
                                                                 const float* __restrict__ g,
                                                                 const float* __restrict__ w, int64_t M, int64_t K,
                                                                 int64_t J, coto_dropout d) {
  __shared__ float gs[kRowsC][kDepthC + 1];
  __shared__ float ws[kDepthC][kWidthC + 1];
  const int t = threadIdx.x;
  const int tm = t / 16, tk = t % 16;  // 4 rows tm * 4 + i, 4 columns tk + 16 c
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * kRowsC;
  const int64_t k0 = static_cast<int64_t>(blockIdx.y) * kWidthC;
  float acc[4][4] = {};
  for (int64_t jb = 0; jb < J; jb += kDepthC) {
#pragma unroll
    for (int i = 0; i < kRowsC * kDepthC / kThreads; ++i) {
      const int e = t + i * kThreads, row = e / kDepthC, col = e % kDepthC;
      const int64_t m = m0 + row, j = jb + col;
      gs[row][col] = (m < M && j < J) ? g[m * J + j] : 0.0f;
    }
#pragma unroll
    for (int i = 0; i < kDepthC * kWidthC / kThreads; ++i) {
      const int e = t + i * kThreads, row = e / kWidthC, col = e % kWidthC;
      const int64_t j = jb + row, k = k0 + col;
      ws[row][col] = (j < J && k < K) ? w[j * K + k] : 0.0f;
    }
    __syncthreads();
#pragma unroll
    for (int jj = 0; jj < kDepthC; ++jj) {
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const float gv = gs[tm * 4 + i][jj];
#pragma unroll
        for (int c = 0; c < 4; ++c) acc[i][c] += gv * ws[jj][tk + 16 * c];
      }
    }
    __syncthreads();
  }
#pragma unroll
  for (int i = 0; i < 4; ++i) {
#pragma unroll
    for (int c = 0; c < 4; ++c) {
      const int64_t m = m0 + tm * 4 + i, k = k0 + tk + 16 * c;
      if (m < M && k < K) {
        const float f = kDropout ? keep_factor(m, k, d) : 1.0f;
        T* p = dx + m * lddx + k;
        *p = from_float<T>(to_float(*p) + f * acc[i][c]);
      }
    }
  }
}

__global__ void __launch_bounds__(kThreads) keep_mask_kernel(uint8_t* __restrict__ mask, int64_t M, int64_t K,
                                                             coto_dropout d) {
  const int64_t total = M * K;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; e < total;
       e += static_cast<int64_t>(gridDim.x) * kThreads) {
    mask[e] = d.dropout ? (keep_factor(e / K, e % K, d) != 0.0f) : 1;
  }
}

unsigned int blocks_for(int64_t n, int64_t per_block) { return static_cast<unsigned int>((n + per_block - 1) / per_block); }

// Calls launch.template operator()<T, kDropout>() for the runtime dtype and dropout flag.
template <typename Launch>
int dispatch(int dtype, bool dropout, Launch launch) {
  switch (dtype) {
    case COTO_FLOAT32:
      dropout ? launch.template operator()<float, true>() : launch.template operator()<float, false>();
      break;
    case COTO_BFLOAT16:
      dropout ? launch.template operator()<__nv_bfloat16, true>() : launch.template operator()<__nv_bfloat16, false>();
      break;
    case COTO_FLOAT16:
      dropout ? launch.template operator()<__half, true>() : launch.template operator()<__half, false>();
      break;
    default:
      return static_cast<int>(cudaErrorInvalidValue);
  }
  return static_cast<int>(cudaGetLastError());
}

// Launchers of the kernels above for one (dtype, dropout) pair, called through dispatch().
struct RowsTimesWt {
  const void* x; int64_t ldx; const float* w; float* out; int64_t M, K, J; float alpha; coto_dropout d;
  dim3 grid; cudaStream_t s;
  template <typename T, bool kDropout>
  void operator()() const {
    rows_times_wt<T, kDropout><<<grid, kThreads, 0, s>>>(static_cast<const T*>(x), ldx, w, out, M, K, J, alpha, d);
  }
};

struct GtTimesRows {
  const float* g; const void* x; int64_t ldx; float* part; int64_t M, K, J, rows; float alpha; coto_dropout d;
  dim3 grid; cudaStream_t s;
  template <typename T, bool kDropout>
  void operator()() const {
    gt_times_rows<T, kDropout><<<grid, kThreads, 0, s>>>(g, static_cast<const T*>(x), ldx, part, M, K, J, rows,
                                                         alpha, d);
  }
};

struct AddMaskedGTimesW {
  void* dx; int64_t lddx; const float* g; const float* w; int64_t M, K, J; coto_dropout d; dim3 grid;
  cudaStream_t s;
  template <typename T, bool kDropout>
  void operator()() const {
    add_masked_g_times_w<T, kDropout><<<grid, kThreads, 0, s>>>(static_cast<T*>(dx), lddx, g, w, M, K, J, d);
  }
};

}  // namespace

extern "C" int coto_cuda_rows_times_wt(const void* x, int64_t ldx, int dtype, const float* w, float* out, int64_t M,
                                       int64_t K, int64_t J, float alpha, coto_dropout dropout, void* stream) {
  if (M == 0 || J == 0) return 0;
  const dim3 grid(blocks_for(M, kRowsA), blocks_for(J, kColsA));
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  return dispatch(dtype, dropout.dropout != 0, RowsTimesWt{x, ldx, w, out, M, K, J, alpha, dropout, grid, s});
}

extern "C" int coto_cuda_gt_times_rows(const float* g, const void* x, int64_t ldx, int dtype, float* part, int64_t M,
                                       int64_t K, int64_t J, int64_t splits, float alpha, coto_dropout dropout,
                                       void* stream) {
  if (K == 0 || J == 0 || splits <= 0) return 0;
  const int64_t rows_per_split = (M + splits - 1) / splits;
  const dim3 grid(blocks_for(K, kWidthB), blocks_for(J, kColsB), static_cast<unsigned int>(splits));
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  return dispatch(dtype, dropout.dropout != 0,
                  GtTimesRows{g, x, ldx, part, M, K, J, rows_per_split, alpha, dropout, grid, s});
}

extern "C" int coto_cuda_add_masked_g_times_w(void* dx, int64_t lddx, int dtype, const float* g, const float* w,
                                              int64_t M, int64_t K, int64_t J, coto_dropout dropout, void* stream) {
  if (M == 0 || K == 0) return 0;
  const dim3 grid(blocks_for(M, kRowsC), blocks_for(K, kWidthC));
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  return dispatch(dtype, dropout.dropout != 0, AddMaskedGTimesW{dx, lddx, g, w, M, K, J, dropout, grid, s});
}

extern "C" int coto_cuda_keep_mask(uint8_t* mask, int64_t M, int64_t K, coto_dropout dropout, void* stream) {
  if (M == 0 || K == 0) return 0;
  const int64_t blocks = (M * K + kThreads - 1) / kThreads;
  keep_mask_kernel<<<static_cast<unsigned int>(blocks < 4096 ? blocks : 4096), kThreads, 0,
                     static_cast<cudaStream_t>(stream)>>>(mask, M, K, dropout);
  return static_cast<int>(cudaGetLastError());
}

extern "C" const char* coto_cuda_error_string(int error) {
  return cudaGetErrorString(static_cast<cudaError_t>(error));
}
