// The skinny, dropout-fused parts of the gated LoRA layer as torch.library ops (namespace coto_kernels_native),
// and their CPU implementations. The dense GEMMs (X W^T, dY W) stay with BLAS; see
// coto_kernels/kernels/lora_native.py. Math (coto_kernels/kernels/interface.py), with drop(X) = keep * X / (1-p):
//
//   lora_down(x, a, seed, p)             -> S = drop(X) A^T                               fp32 [M, r]
//   lora_dy(dy, b, s, scaling, ...)      -> dS = s dY B,  dB = s dY^T S,  colsum(dY)       one pass over dY
//   lora_dx_da(dx?, x, ds, a, seed, p)   -> dX += drop'(dS A) in place,  dA = dS^T drop(X) one pass over X, dX
//
// The keep mask is regenerated from coto_mask.h inside the loops (one row block x column chunk at a time): no
// M x K temporary exists. Accumulation is fp32 for fp32, bf16 and fp16 inputs. Parallel over rows with
// at::parallel_for; reductions over rows (dB, colsum, dA) go through per-thread partial sums in a fixed order,
// so results are deterministic for a given thread count.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "coto_mask.h"

// The hot loops are compiled twice (AVX2+FMA and the baseline) and picked at load time, so the build is
// portable and still vectorised on the machines that have AVX2.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define COTO_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define COTO_CLONES
#endif

namespace coto {
namespace {

using at::Tensor;

constexpr int64_t kRows = 4;     // rows per register block
constexpr int64_t kChunk = 256;  // columns of X per cache block
constexpr int kLanes = 8;
typedef float v8 __attribute__((vector_size(32)));

inline v8 load8(const float* p) {
  v8 v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
inline void store8(float* p, v8 v) { std::memcpy(p, &v, sizeof(v)); }
inline v8 splat(float x) { return v8{x, x, x, x, x, x, x, x}; }
inline float hsum(v8 v) { return ((v[0] + v[4]) + (v[1] + v[5])) + ((v[2] + v[6]) + (v[3] + v[7])); }

struct Dropout {
  MaskKeys keys;
  int32_t threshold;
  bool on;
  float scale;  // 1 / (1 - p)
};

Dropout make_dropout(int64_t seed, double p) {
  TORCH_CHECK(p >= 0.0 && p < 1.0, "coto_kernels_native: dropout_p must lie in [0, 1), got ", p);
  const int64_t threshold = keep_threshold(p);
  TORCH_CHECK(threshold < 2147483648LL, "coto_kernels_native: dropout_p ", p, " rounds to 1 on the 2**-32 grid");
  return Dropout{mask_keys(seed), static_cast<int32_t>(threshold), p > 0.0, static_cast<float>(1.0 / (1.0 - p))};
}

// Flat row-major index of (row, 0) modulo 2**32, as the mask definition reads it.
inline uint32_t row_index(int64_t row, int64_t cols) {
  return static_cast<uint32_t>(static_cast<uint64_t>(row) * static_cast<uint64_t>(cols));
}

// out[k] = keep * x[k] * scale (the dropped row chunk in fp32) and, when factor != nullptr, factor[k] = keep * scale.
template <typename T>
inline void dropped_chunk(const T* x, int64_t n, uint32_t index0, const Dropout& d, float* out, float* factor) {
  if (!d.on) {
    for (int64_t k = 0; k < n; ++k) out[k] = static_cast<float>(x[k]);
    if (factor != nullptr) std::fill(factor, factor + n, 1.0f);
    return;
  }
  for (int64_t k = 0; k < n; ++k) {
    const float f = mask_hash(index0 + static_cast<uint32_t>(k), d.keys) >= d.threshold ? d.scale : 0.0f;
    out[k] = static_cast<float>(x[k]) * f;
    if (factor != nullptr) factor[k] = f;
  }
}

// ---------------------------------------------------------------------------------------------------------------
// S = drop(X) A^T for rows [row0, row0 + rows), rows <= kRows.
template <typename T>
COTO_CLONES void down_block(const T* x, int64_t ldx, int64_t row0, int64_t rows, int64_t K, const float* a,
                            int64_t r, const Dropout& d, float* s) {
  alignas(32) float xd[kRows][kChunk];
  std::fill(s + row0 * r, s + (row0 + rows) * r, 0.0f);
  for (int64_t i = rows; i < kRows; ++i) std::fill(xd[i], xd[i] + kChunk, 0.0f);
  for (int64_t k0 = 0; k0 < K; k0 += kChunk) {
    const int64_t n = std::min(kChunk, K - k0);
    for (int64_t i = 0; i < rows; ++i) {
      dropped_chunk(x + (row0 + i) * ldx + k0, n, row_index(row0 + i, K) + static_cast<uint32_t>(k0), d, xd[i],
                    nullptr);
    }
    const int64_t nv = n - n % kLanes;
    for (int64_t j = 0; j < r; ++j) {
      const float* aj = a + j * K + k0;
      v8 acc0 = splat(0), acc1 = splat(0), acc2 = splat(0), acc3 = splat(0);
      for (int64_t k = 0; k < nv; k += kLanes) {
        const v8 av = load8(aj + k);
        acc0 += load8(xd[0] + k) * av;
        acc1 += load8(xd[1] + k) * av;
        acc2 += load8(xd[2] + k) * av;
        acc3 += load8(xd[3] + k) * av;
      }
      float tail[kRows] = {0, 0, 0, 0};
      for (int64_t k = nv; k < n; ++k) {
        for (int64_t i = 0; i < kRows; ++i) tail[i] += xd[i][k] * aj[k];
      }
      const float sums[kRows] = {hsum(acc0) + tail[0], hsum(acc1) + tail[1], hsum(acc2) + tail[2],
                                 hsum(acc3) + tail[3]};
      for (int64_t i = 0; i < rows; ++i) s[(row0 + i) * r + j] += sums[i];
    }
  }
}

Tensor as_fp32_contiguous(const Tensor& t) { return t.to(at::kFloat).contiguous(); }

Tensor unit_col_stride(const Tensor& t) { return t.stride(1) == 1 ? t : t.contiguous(); }

void check_2d(const Tensor& t, const char* name) {
  TORCH_CHECK(t.dim() == 2, "coto_kernels_native: ", name, " must be 2-D, got shape ", t.sizes());
}

Tensor lora_down_cpu(const Tensor& x_in, const Tensor& a_in, int64_t seed, double dropout_p) {
  check_2d(x_in, "x");
  check_2d(a_in, "lora_a");
  TORCH_CHECK(x_in.size(1) == a_in.size(1), "coto_kernels_native.lora_down: x ", x_in.sizes(), " and lora_a ",
              a_in.sizes(), " disagree on K");
  const Dropout d = make_dropout(seed, dropout_p);
  const Tensor x = unit_col_stride(x_in);
  const Tensor a = as_fp32_contiguous(a_in);
  const int64_t M = x.size(0), K = x.size(1), r = a.size(0);
  Tensor s = at::empty({M, r}, x.options().dtype(at::kFloat));
  if (M == 0) return s;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "lora_down", [&] {
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const float* ap = a.const_data_ptr<float>();
    float* sp = s.mutable_data_ptr<float>();
    const int64_t blocks = (M + kRows - 1) / kRows;
    at::parallel_for(0, blocks, 8, [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) {
        const int64_t row0 = b * kRows;
        down_block(xp, x.stride(0), row0, std::min(kRows, M - row0), K, ap, r, d, sp);
      }
    });
  });
  return s;
}

// ---------------------------------------------------------------------------------------------------------------
// One pass over dY for rows [row0, row0 + rows): dS rows (rank block rb of 8 ranks), and, in the partial sums of
// the calling thread, dB += dY^T S and colsum += dY. B and S are fp32, padded to rp = ceil(r / 8) * 8 ranks.
template <typename T>
COTO_CLONES void dy_block(const T* dy, int64_t N, int64_t row0, int64_t rows, const float* b, const float* s,
                          int64_t rp, float* ds, float* db_part, float* colsum_part) {
  alignas(32) float dyf[kRows][kChunk];
  for (int64_t i = rows; i < kRows; ++i) std::fill(dyf[i], dyf[i] + kChunk, 0.0f);
  std::vector<float> acc(static_cast<size_t>(kRows * rp), 0.0f);  // dS of the block, [kRows][rp]
  for (int64_t n0 = 0; n0 < N; n0 += kChunk) {
    const int64_t nn = std::min(kChunk, N - n0);
    for (int64_t i = 0; i < rows; ++i) {
      const T* row = dy + (row0 + i) * N + n0;
      for (int64_t n = 0; n < nn; ++n) dyf[i][n] = static_cast<float>(row[n]);
    }
    if (colsum_part != nullptr) {
      for (int64_t n = 0; n < nn; ++n) colsum_part[n0 + n] += (dyf[0][n] + dyf[1][n]) + (dyf[2][n] + dyf[3][n]);
    }
    for (int64_t rb = 0; rb < rp; rb += kLanes) {
      v8 acc0 = load8(&acc[0 * rp + rb]), acc1 = load8(&acc[1 * rp + rb]);
      v8 acc2 = load8(&acc[2 * rp + rb]), acc3 = load8(&acc[3 * rp + rb]);
      if (db_part != nullptr) {
        const v8 s0 = load8(s + (row0 + 0) * rp + rb);
        const v8 s1 = rows > 1 ? load8(s + (row0 + 1) * rp + rb) : splat(0);
        const v8 s2 = rows > 2 ? load8(s + (row0 + 2) * rp + rb) : splat(0);
        const v8 s3 = rows > 3 ? load8(s + (row0 + 3) * rp + rb) : splat(0);
        for (int64_t n = 0; n < nn; ++n) {
          const v8 bv = load8(b + (n0 + n) * rp + rb);
          const float d0 = dyf[0][n], d1 = dyf[1][n], d2 = dyf[2][n], d3 = dyf[3][n];
          acc0 += d0 * bv;
          acc1 += d1 * bv;
          acc2 += d2 * bv;
          acc3 += d3 * bv;
          float* dbp = db_part + (n0 + n) * rp + rb;
          store8(dbp, load8(dbp) + ((d0 * s0 + d1 * s1) + (d2 * s2 + d3 * s3)));
        }
      } else {
        for (int64_t n = 0; n < nn; ++n) {
          const v8 bv = load8(b + (n0 + n) * rp + rb);
          acc0 += dyf[0][n] * bv;
          acc1 += dyf[1][n] * bv;
          acc2 += dyf[2][n] * bv;
          acc3 += dyf[3][n] * bv;
        }
      }
      store8(&acc[0 * rp + rb], acc0);
      store8(&acc[1 * rp + rb], acc1);
      store8(&acc[2 * rp + rb], acc2);
      store8(&acc[3 * rp + rb], acc3);
    }
  }
  for (int64_t i = 0; i < rows; ++i) {
    std::copy(&acc[i * rp], &acc[i * rp] + rp, ds + (row0 + i) * rp);
  }
}

Tensor padded_ranks(const Tensor& t, int64_t rp) {
  Tensor out = at::zeros({t.size(0), rp}, t.options().dtype(at::kFloat));
  out.narrow(1, 0, t.size(1)).copy_(t);
  return out;
}

// Split [0, rows) into at most one range per thread (fixed given the thread count: deterministic sums).
int64_t partition_count(int64_t rows) {
  const int64_t blocks = (rows + kRows - 1) / kRows;
  return std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), blocks / 4));
}

std::tuple<Tensor, Tensor, Tensor> lora_dy_cpu(const Tensor& dy_in, const Tensor& b_in, const Tensor& s_in,
                                               double scaling, bool need_db, bool need_colsum) {
  check_2d(dy_in, "dy");
  check_2d(b_in, "lora_b");
  check_2d(s_in, "s");
  TORCH_CHECK(dy_in.size(1) == b_in.size(0) && s_in.size(0) == dy_in.size(0) && s_in.size(1) == b_in.size(1),
              "coto_kernels_native.lora_dy: dy ", dy_in.sizes(), ", lora_b ", b_in.sizes(), " and s ", s_in.sizes(),
              " do not fit together");
  const Tensor dy = dy_in.contiguous();
  const int64_t M = dy.size(0), N = dy.size(1), r = b_in.size(1);
  const int64_t rp = (r + kLanes - 1) / kLanes * kLanes;
  const Tensor b = padded_ranks(b_in, rp);
  const Tensor s = need_db ? padded_ranks(s_in, rp) : Tensor();
  Tensor ds = at::empty({M, rp}, dy.options().dtype(at::kFloat));
  const int64_t parts = partition_count(M);
  Tensor db_parts = need_db ? at::zeros({parts, N, rp}, ds.options()) : Tensor();
  Tensor colsum_parts = need_colsum ? at::zeros({parts, N}, ds.options()) : Tensor();
  if (M > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dy.scalar_type(), "lora_dy", [&] {
      const scalar_t* dyp = dy.const_data_ptr<scalar_t>();
      const int64_t blocks = (M + kRows - 1) / kRows;
      at::parallel_for(0, parts, 1, [&](int64_t begin, int64_t end) {
        for (int64_t part = begin; part < end; ++part) {
          float* db_part = need_db ? db_parts.mutable_data_ptr<float>() + part * N * rp : nullptr;
          float* colsum_part = need_colsum ? colsum_parts.mutable_data_ptr<float>() + part * N : nullptr;
          for (int64_t blk = part * blocks / parts; blk < (part + 1) * blocks / parts; ++blk) {
            const int64_t row0 = blk * kRows;
            dy_block(dyp, N, row0, std::min(kRows, M - row0), b.const_data_ptr<float>(),
                     need_db ? s.const_data_ptr<float>() : nullptr, rp, ds.mutable_data_ptr<float>(), db_part,
                     colsum_part);
          }
        }
      });
    });
  }
  const Tensor ds_out = ds.narrow(1, 0, r).mul_(scaling);
  Tensor db = need_db ? db_parts.sum(0).narrow(1, 0, r).mul_(scaling) : at::empty({0}, ds.options());
  Tensor colsum = need_colsum ? colsum_parts.sum(0) : at::empty({0}, ds.options());
  return {ds_out.contiguous(), db.contiguous(), colsum};
}

// ---------------------------------------------------------------------------------------------------------------
// One pass over X and dX for rows [row0, row0 + rows): dX += keep/(1-p) * (dS A) and dA_part += dS^T drop(X).
template <typename T>
COTO_CLONES void dx_da_block(T* dx, int64_t lddx, const T* x, int64_t ldx, int64_t row0, int64_t rows, int64_t K,
                             const float* ds, const float* a, int64_t r, const Dropout& d, float* da_part) {
  alignas(32) float xd[kRows][kChunk];
  alignas(32) float factor[kRows][kChunk];
  alignas(32) float delta[kChunk];
  for (int64_t i = rows; i < kRows; ++i) {
    std::fill(xd[i], xd[i] + kChunk, 0.0f);
    std::fill(factor[i], factor[i] + kChunk, 0.0f);
  }
  for (int64_t k0 = 0; k0 < K; k0 += kChunk) {
    const int64_t n = std::min(kChunk, K - k0);
    const int64_t nv = n - n % kLanes;
    for (int64_t i = 0; i < rows; ++i) {
      dropped_chunk(x + (row0 + i) * ldx + k0, n, row_index(row0 + i, K) + static_cast<uint32_t>(k0), d, xd[i],
                    factor[i]);
    }
    if (da_part != nullptr) {
      for (int64_t j = 0; j < r; ++j) {
        const float g0 = ds[(row0 + 0) * r + j];
        const float g1 = rows > 1 ? ds[(row0 + 1) * r + j] : 0.0f;
        const float g2 = rows > 2 ? ds[(row0 + 2) * r + j] : 0.0f;
        const float g3 = rows > 3 ? ds[(row0 + 3) * r + j] : 0.0f;
        float* daj = da_part + j * K + k0;
        for (int64_t k = 0; k < nv; k += kLanes) {
          store8(daj + k, load8(daj + k) + ((g0 * load8(xd[0] + k) + g1 * load8(xd[1] + k)) +
                                            (g2 * load8(xd[2] + k) + g3 * load8(xd[3] + k))));
        }
        for (int64_t k = nv; k < n; ++k) daj[k] += (g0 * xd[0][k] + g1 * xd[1][k]) + (g2 * xd[2][k] + g3 * xd[3][k]);
      }
    }
    if (dx != nullptr) {
      for (int64_t i = 0; i < rows; ++i) {
        const float* dsi = ds + (row0 + i) * r;
        for (int64_t k = 0; k < nv; k += kLanes) {
          v8 acc = splat(0);
          for (int64_t j = 0; j < r; ++j) acc += dsi[j] * load8(a + j * K + k0 + k);
          store8(delta + k, acc);
        }
        for (int64_t k = nv; k < n; ++k) {
          float acc = 0.0f;
          for (int64_t j = 0; j < r; ++j) acc += dsi[j] * a[j * K + k0 + k];
          delta[k] = acc;
        }
        T* dxi = dx + (row0 + i) * lddx + k0;
        for (int64_t k = 0; k < n; ++k) dxi[k] = static_cast<T>(static_cast<float>(dxi[k]) + factor[i][k] * delta[k]);
      }
    }
  }
}

Tensor lora_dx_da_cpu(const std::optional<Tensor>& dx_opt, const Tensor& x_in, const Tensor& ds_in,
                      const Tensor& a_in, int64_t seed, double dropout_p, bool need_da) {
  check_2d(x_in, "x");
  check_2d(ds_in, "ds");
  check_2d(a_in, "lora_a");
  TORCH_CHECK(x_in.size(0) == ds_in.size(0) && x_in.size(1) == a_in.size(1) && ds_in.size(1) == a_in.size(0),
              "coto_kernels_native.lora_dx_da: x ", x_in.sizes(), ", ds ", ds_in.sizes(), " and lora_a ",
              a_in.sizes(), " do not fit together");
  const Dropout d = make_dropout(seed, dropout_p);
  const Tensor x = unit_col_stride(x_in);
  const Tensor ds = as_fp32_contiguous(ds_in);
  const Tensor a = as_fp32_contiguous(a_in);
  const int64_t M = x.size(0), K = x.size(1), r = a.size(0);
  const bool has_dx = dx_opt.has_value() && dx_opt->defined();
  if (has_dx) {
    TORCH_CHECK(dx_opt->sizes() == x.sizes() && dx_opt->scalar_type() == x.scalar_type() && dx_opt->stride(1) == 1,
                "coto_kernels_native.lora_dx_da: dx must have x's shape ", x.sizes(), " and dtype ",
                x.scalar_type(), " with unit column stride; got ", dx_opt->sizes(), " ", dx_opt->scalar_type());
  }
  const int64_t parts = partition_count(M);
  Tensor da_parts = need_da ? at::zeros({parts, r, K}, ds.options()) : Tensor();
  if (M > 0 && (has_dx || need_da)) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "lora_dx_da", [&] {
      scalar_t* dxp = has_dx ? dx_opt->mutable_data_ptr<scalar_t>() : nullptr;
      const int64_t lddx = has_dx ? dx_opt->stride(0) : 0;
      const int64_t blocks = (M + kRows - 1) / kRows;
      at::parallel_for(0, parts, 1, [&](int64_t begin, int64_t end) {
        for (int64_t part = begin; part < end; ++part) {
          float* da_part = need_da ? da_parts.mutable_data_ptr<float>() + part * r * K : nullptr;
          for (int64_t blk = part * blocks / parts; blk < (part + 1) * blocks / parts; ++blk) {
            const int64_t row0 = blk * kRows;
            dx_da_block(dxp, lddx, x.const_data_ptr<scalar_t>(), x.stride(0), row0, std::min(kRows, M - row0), K,
                        ds.const_data_ptr<float>(), a.const_data_ptr<float>(), r, d, da_part);
          }
        }
      });
    });
  }
  if (!need_da) return at::empty({0}, ds.options());
  return parts == 1 ? da_parts[0] : da_parts.sum(0);
}

// ---------------------------------------------------------------------------------------------------------------
// The keep mask itself (bool, x's shape): for tests and references; the ops above never materialise it.
Tensor keep_mask_cpu(const Tensor& x, int64_t seed, double dropout_p) {
  check_2d(x, "x");
  const Dropout d = make_dropout(seed, dropout_p);
  const int64_t M = x.size(0), K = x.size(1);
  Tensor mask = at::empty({M, K}, x.options().dtype(at::kBool));
  bool* out = mask.mutable_data_ptr<bool>();
  at::parallel_for(0, M, 64, [&](int64_t begin, int64_t end) {
    for (int64_t m = begin; m < end; ++m) {
      const uint32_t index0 = row_index(m, K);
      for (int64_t k = 0; k < K; ++k) {
        out[m * K + k] = !d.on || keep(index0 + static_cast<uint32_t>(k), d.keys, d.threshold);
      }
    }
  });
  return mask;
}

}  // namespace
}  // namespace coto

TORCH_LIBRARY(coto_kernels_native, m) {
  m.def("keep_mask(Tensor x, int seed, float dropout_p) -> Tensor");
  m.def("lora_down(Tensor x, Tensor lora_a, int seed, float dropout_p) -> Tensor");
  m.def(
      "lora_dy(Tensor dy, Tensor lora_b, Tensor s, float scaling, bool need_db, bool need_colsum)"
      " -> (Tensor, Tensor, Tensor)");
  m.def(
      "lora_dx_da(Tensor(a!)? dx, Tensor x, Tensor ds, Tensor lora_a, int seed, float dropout_p, bool need_da)"
      " -> Tensor");
}

TORCH_LIBRARY_IMPL(coto_kernels_native, CPU, m) {
  m.impl("keep_mask", &coto::keep_mask_cpu);
  m.impl("lora_down", &coto::lora_down_cpu);
  m.impl("lora_dy", &coto::lora_dy_cpu);
  m.impl("lora_dx_da", &coto::lora_dx_da_cpu);
}
