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
// Helpers of the cloned loops must be inlined into them to be compiled for the clone's instruction set.
#define COTO_INLINE inline __attribute__((always_inline))

namespace coto {
namespace {

using at::Tensor;

constexpr int64_t kRows = 4;     // rows per register block
constexpr int64_t kChunk = 256;  // columns of X per cache block
constexpr int kLanes = 8;
typedef float v8 __attribute__((vector_size(32)));

COTO_INLINE v8 load8(const float* p) {
  v8 v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
COTO_INLINE void store8(float* p, v8 v) { std::memcpy(p, &v, sizeof(v)); }
COTO_INLINE v8 splat(float x) { return v8{x, x, x, x, x, x, x, x}; }
COTO_INLINE float hsum(v8 v) { return ((v[0] + v[4]) + (v[1] + v[5])) + ((v[2] + v[6]) + (v[3] + v[7])); }

struct Dropout {
  MaskKeys keys;
  int32_t threshold;
  bool on;
  float scale;  // 1 / (1 - p)
  // col(k >> 1) for every column k of X (each pair's key twice), computed once per call and shared by all rows:
  // the per-element work is then one xor, one multiply, one variable shift and the compare (vectorised).
  std::vector<uint32_t> column_keys;
};

Dropout make_dropout(int64_t seed, double p, int64_t columns) {
  TORCH_CHECK(p >= 0.0 && p < 1.0, "coto_kernels_native: dropout_p must lie in [0, 1), got ", p);
  Dropout d{mask_keys(seed), keep_threshold(p), p > 0.0, static_cast<float>(1.0 / (1.0 - p)), {}};
  if (d.on) {
    d.column_keys.resize(static_cast<size_t>(columns));
    for (int64_t k = 0; k < columns; ++k) d.column_keys[k] = column_key(static_cast<uint32_t>(k) >> 1, d.keys);
  }
  return d;
}

// out[k] = keep * x[k] * scale for columns [k0, k0 + n) of row `row` (the dropped row chunk in fp32) and, when
// factor != nullptr, factor[k] = keep * scale. The dropout fields are copied into locals so the compiler knows
// the float stores cannot change them (the loop then vectorises: 8 lanes per AVX2 instruction sequence).
template <typename T>
COTO_INLINE void dropped_chunk(const T* __restrict__ x, int64_t n, int64_t row, int64_t k0, const Dropout& d,
                          float* __restrict__ out, float* __restrict__ factor) {
  if (!d.on) {
    for (int64_t k = 0; k < n; ++k) out[k] = static_cast<float>(x[k]);
    if (factor != nullptr) std::fill(factor, factor + n, 1.0f);
    return;
  }
  const uint32_t row_hash = row_key(static_cast<uint32_t>(row), d.keys);
  const uint32_t* __restrict__ columns = d.column_keys.data() + k0;
  const uint32_t parity = static_cast<uint32_t>(k0);
  const int32_t threshold = d.threshold;
  const float scale = d.scale;
  const uint32_t count = static_cast<uint32_t>(n);
  if (factor == nullptr) {
    for (uint32_t k = 0; k < count; ++k) {
      const float value = static_cast<float>(x[k]);  // loaded unconditionally, so the loop vectorises
      out[k] = value * (keep_half(pair_hash(row_hash, columns[k]), parity + k, threshold) ? scale : 0.0f);
    }
    return;
  }
  for (uint32_t k = 0; k < count; ++k) {
    const float f = keep_half(pair_hash(row_hash, columns[k]), parity + k, threshold) ? scale : 0.0f;
    factor[k] = f;
    out[k] = static_cast<float>(x[k]) * f;
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Register blocks shared by the kernels below. Chunks are zero-padded to a multiple of 8 columns (xd rows and the
// padded fp32 copy of A), so the vector loops need no scalar tails.

inline int64_t round_up8(int64_t n) { return (n + kLanes - 1) / kLanes * kLanes; }

// sums[i][jj] = sum_k xd[i][k] * w[jj][k] for the 4 rows of a block and NJ weight rows.
template <int NJ>
COTO_INLINE void dot_rows(const float (*xd)[kChunk], const float* const* w, int64_t nvu, float (*sums)[NJ]) {
  v8 acc[kRows][NJ];
  for (int i = 0; i < kRows; ++i)
    for (int jj = 0; jj < NJ; ++jj) acc[i][jj] = splat(0);
  for (int64_t k = 0; k < nvu; k += kLanes) {
    v8 wv[NJ];
    for (int jj = 0; jj < NJ; ++jj) wv[jj] = load8(w[jj] + k);
    for (int i = 0; i < kRows; ++i) {
      const v8 xv = load8(xd[i] + k);
      for (int jj = 0; jj < NJ; ++jj) acc[i][jj] += xv * wv[jj];
    }
  }
  for (int i = 0; i < kRows; ++i)
    for (int jj = 0; jj < NJ; ++jj) sums[i][jj] = hsum(acc[i][jj]);
}

// out[jj][k] += sum_i g[i][jj] * xd[i][k] for NJ output rows (the rank-4 update of dA).
template <int NJ>
COTO_INLINE void rank_update(const float (*xd)[kChunk], const float (*g)[NJ], int64_t nvu, float* const* out) {
  v8 gv[kRows][NJ];
  for (int i = 0; i < kRows; ++i)
    for (int jj = 0; jj < NJ; ++jj) gv[i][jj] = splat(g[i][jj]);
  for (int64_t k = 0; k < nvu; k += kLanes) {
    v8 xv[kRows];
    for (int i = 0; i < kRows; ++i) xv[i] = load8(xd[i] + k);
    for (int jj = 0; jj < NJ; ++jj) {
      v8 o = load8(out[jj] + k);
      for (int i = 0; i < kRows; ++i) o += gv[i][jj] * xv[i];
      store8(out[jj] + k, o);
    }
  }
}

// S = drop(X) A^T for rows [row0, row0 + rows), rows <= kRows; a is fp32 [r, Kp] with zero padding.
template <typename T>
COTO_CLONES void down_block(const T* x, int64_t ldx, int64_t row0, int64_t rows, int64_t K, const float* a,
                            int64_t Kp, int64_t r, const Dropout& d, float* s) {
  alignas(32) float xd[kRows][kChunk];
  std::fill(s + row0 * r, s + (row0 + rows) * r, 0.0f);
  std::fill(&xd[0][0], &xd[0][0] + kRows * kChunk, 0.0f);
  for (int64_t k0 = 0; k0 < K; k0 += kChunk) {
    const int64_t n = std::min(kChunk, K - k0), nvu = round_up8(n);
    for (int64_t i = 0; i < rows; ++i) {
      dropped_chunk(x + (row0 + i) * ldx + k0, n, row0 + i, k0, d, xd[i],
                    nullptr);
      std::fill(xd[i] + n, xd[i] + nvu, 0.0f);
    }
    int64_t j = 0;
    for (; j + 2 <= r; j += 2) {
      const float* w[2] = {a + j * Kp + k0, a + (j + 1) * Kp + k0};
      float sums[kRows][2];
      dot_rows<2>(xd, w, nvu, sums);
      for (int64_t i = 0; i < rows; ++i) {
        s[(row0 + i) * r + j] += sums[i][0];
        s[(row0 + i) * r + j + 1] += sums[i][1];
      }
    }
    if (j < r) {
      const float* w[1] = {a + j * Kp + k0};
      float sums[kRows][1];
      dot_rows<1>(xd, w, nvu, sums);
      for (int64_t i = 0; i < rows; ++i) s[(row0 + i) * r + j] += sums[i][0];
    }
  }
}

// A as fp32 [r, Kp], Kp = K rounded up to 8, zero-padded.
Tensor padded_columns(const Tensor& a) {
  const int64_t K = a.size(1);
  Tensor out = at::zeros({a.size(0), round_up8(K)}, a.options().dtype(at::kFloat));
  out.narrow(1, 0, K).copy_(a);
  return out;
}

// t as fp32 with zero rows appended up to a multiple of kRows (row blocks then need no bounds checks).
Tensor padded_rows(const Tensor& t) {
  const int64_t rows = t.size(0);
  Tensor out = at::zeros({(rows + kRows - 1) / kRows * kRows, t.size(1)}, t.options().dtype(at::kFloat));
  out.narrow(0, 0, rows).copy_(t);
  return out;
}

Tensor unit_col_stride(const Tensor& t) { return t.stride(1) == 1 ? t : t.contiguous(); }

void check_2d(const Tensor& t, const char* name) {
  TORCH_CHECK(t.dim() == 2, "coto_kernels_native: ", name, " must be 2-D, got shape ", t.sizes());
}

Tensor lora_down_cpu(const Tensor& x_in, const Tensor& a_in, int64_t seed, double dropout_p) {
  check_2d(x_in, "x");
  check_2d(a_in, "lora_a");
  TORCH_CHECK(x_in.size(1) == a_in.size(1), "coto_kernels_native.lora_down: x ", x_in.sizes(), " and lora_a ",
              a_in.sizes(), " disagree on K");
  const Dropout d = make_dropout(seed, dropout_p, x_in.size(1));
  const Tensor x = unit_col_stride(x_in);
  const Tensor a = padded_columns(a_in);
  const int64_t M = x.size(0), K = x.size(1), r = a.size(0), Kp = a.size(1);
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
        down_block(xp, x.stride(0), row0, std::min(kRows, M - row0), K, ap, Kp, r, d, sp);
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
// a is fp32 [r, Kp] and da_part [r, Kp] (zero-padded columns); ds has zero rows up to a multiple of kRows.
template <typename T>
COTO_CLONES void dx_da_block(T* dx, int64_t lddx, const T* x, int64_t ldx, int64_t row0, int64_t rows, int64_t K,
                             const float* ds, const float* a, int64_t Kp, int64_t r, const Dropout& d,
                             float* da_part) {
  alignas(32) float xd[kRows][kChunk];
  alignas(32) float factor[kRows][kChunk];
  alignas(32) float delta[kRows][kChunk];
  std::fill(&xd[0][0], &xd[0][0] + kRows * kChunk, 0.0f);
  std::fill(&factor[0][0], &factor[0][0] + kRows * kChunk, 0.0f);
  const float* g_rows = ds + row0 * r;
  const auto g_at = [&](int64_t i, int64_t j) { return g_rows[i * r + j]; };
  for (int64_t k0 = 0; k0 < K; k0 += kChunk) {
    const int64_t n = std::min(kChunk, K - k0), nvu = round_up8(n);
    for (int64_t i = 0; i < rows; ++i) {
      dropped_chunk(x + (row0 + i) * ldx + k0, n, row0 + i, k0, d, xd[i],
                    factor[i]);
      std::fill(xd[i] + n, xd[i] + nvu, 0.0f);
    }
    if (da_part != nullptr) {
      int64_t j = 0;
      for (; j + 2 <= r; j += 2) {
        float g[kRows][2];
        for (int64_t i = 0; i < kRows; ++i) g[i][0] = g_at(i, j), g[i][1] = g_at(i, j + 1);
        float* out[2] = {da_part + j * Kp + k0, da_part + (j + 1) * Kp + k0};
        rank_update<2>(xd, g, nvu, out);
      }
      if (j < r) {
        float g[kRows][1];
        for (int64_t i = 0; i < kRows; ++i) g[i][0] = g_at(i, j);
        float* out[1] = {da_part + j * Kp + k0};
        rank_update<1>(xd, g, nvu, out);
      }
    }
    if (dx != nullptr) {
      // delta[i][k] = sum_j dS[i, j] A[j, k]: 4 rows x 8 columns of accumulators, A loaded once per j.
      for (int64_t k = 0; k < nvu; k += kLanes) {
        v8 acc0 = splat(0), acc1 = splat(0), acc2 = splat(0), acc3 = splat(0);
        for (int64_t j = 0; j < r; ++j) {
          const v8 av = load8(a + j * Kp + k0 + k);
          acc0 += g_at(0, j) * av;
          acc1 += g_at(1, j) * av;
          acc2 += g_at(2, j) * av;
          acc3 += g_at(3, j) * av;
        }
        store8(delta[0] + k, acc0);
        store8(delta[1] + k, acc1);
        store8(delta[2] + k, acc2);
        store8(delta[3] + k, acc3);
      }
      for (int64_t i = 0; i < rows; ++i) {
        T* dxi = dx + (row0 + i) * lddx + k0;
        for (int64_t k = 0; k < n; ++k) {
          dxi[k] = static_cast<T>(static_cast<float>(dxi[k]) + factor[i][k] * delta[i][k]);
        }
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
  const Dropout d = make_dropout(seed, dropout_p, x_in.size(1));
  const Tensor x = unit_col_stride(x_in);
  const Tensor ds = padded_rows(ds_in);
  const Tensor a = padded_columns(a_in);
  const int64_t M = x.size(0), K = x.size(1), r = a.size(0), Kp = a.size(1);
  const bool has_dx = dx_opt.has_value() && dx_opt->defined();
  if (has_dx) {
    TORCH_CHECK(dx_opt->sizes() == x.sizes() && dx_opt->scalar_type() == x.scalar_type() && dx_opt->stride(1) == 1,
                "coto_kernels_native.lora_dx_da: dx must have x's shape ", x.sizes(), " and dtype ",
                x.scalar_type(), " with unit column stride; got ", dx_opt->sizes(), " ", dx_opt->scalar_type());
  }
  const int64_t parts = partition_count(M);
  Tensor da_parts = need_da ? at::zeros({parts, r, Kp}, ds.options()) : Tensor();
  if (M > 0 && (has_dx || need_da)) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "lora_dx_da", [&] {
      scalar_t* dxp = has_dx ? dx_opt->mutable_data_ptr<scalar_t>() : nullptr;
      const int64_t lddx = has_dx ? dx_opt->stride(0) : 0;
      const int64_t blocks = (M + kRows - 1) / kRows;
      at::parallel_for(0, parts, 1, [&](int64_t begin, int64_t end) {
        for (int64_t part = begin; part < end; ++part) {
          float* da_part = need_da ? da_parts.mutable_data_ptr<float>() + part * r * Kp : nullptr;
          for (int64_t blk = part * blocks / parts; blk < (part + 1) * blocks / parts; ++blk) {
            const int64_t row0 = blk * kRows;
            dx_da_block(dxp, lddx, x.const_data_ptr<scalar_t>(), x.stride(0), row0, std::min(kRows, M - row0), K,
                        ds.const_data_ptr<float>(), a.const_data_ptr<float>(), Kp, r, d, da_part);
          }
        }
      });
    });
  }
  if (!need_da) return at::empty({0}, ds.options());
  const Tensor da = parts == 1 ? da_parts[0] : da_parts.sum(0);
  return Kp == K ? da : da.narrow(1, 0, K).contiguous();
}

// ---------------------------------------------------------------------------------------------------------------
// The keep mask itself (bool, x's shape): for tests and references; the ops above never materialise it.
Tensor keep_mask_cpu(const Tensor& x, int64_t seed, double dropout_p) {
  check_2d(x, "x");
  const Dropout d = make_dropout(seed, dropout_p, 0);  // keep() hashes the column keys itself
  const int64_t M = x.size(0), K = x.size(1);
  Tensor mask = at::empty({M, K}, x.options().dtype(at::kBool));
  bool* out = mask.mutable_data_ptr<bool>();
  at::parallel_for(0, M, 64, [&](int64_t begin, int64_t end) {
    for (int64_t m = begin; m < end; ++m) {
      for (int64_t k = 0; k < K; ++k) out[m * K + k] = !d.on || keep(m, k, d.keys, d.threshold);
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
